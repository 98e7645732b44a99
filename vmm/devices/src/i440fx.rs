//! Intel 82441FX (i440FX) host bridge, PCI 00:00.0, as QEMU's "pc" machine presents it.
//!
//! Emulated: the identity firmware and guests look for (8086:1237 rev 02, class 0x060000,
//! subsystem 1af4:1100 so SeaBIOS knows it runs on QEMU-like hardware), the seven PAM
//! registers (0x59..=0x5f) that control shadowing of 0xc0000..0x100000 — every change is
//! reported to a [`PamListener`], and [`pam_segments`] says what each piece of the area
//! does — and the SMRAM register (0x72), which is stored only.
//!
//! Not emulated: SMM / SMRAM decoding, DRAM configuration registers (memory size comes from
//! fw_cfg), the error reporting registers, the PCI-side arbiter.

use crate::pci::{PciConfigSpace, PciFunction};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub const VENDOR_INTEL: u16 = 0x8086;
pub const DEVICE_82441: u16 = 0x1237;
pub const REVISION: u8 = 0x02;
/// Bridge / host bridge.
pub const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;
/// Red Hat / QEMU subsystem ids.
pub const SUBSYSTEM_VENDOR: u16 = 0x1af4;
pub const SUBSYSTEM_ID: u16 = 0x1100;

/// First PAM register (PAM0, controls 0xf0000..0x100000).
pub const REG_PAM0: usize = 0x59;
/// Number of PAM registers (PAM0..PAM6).
pub const PAM_COUNT: usize = 7;
/// SMRAM control register.
pub const REG_SMRAM: usize = 0x72;
/// SMRAM power-on value: C_BASE_SEG = 010 (0xa0000), everything else off.
const SMRAM_RESET: u8 = 0x02;
/// D_OPEN, D_CLS, D_LCK, G_SMRAME; C_BASE_SEG is fixed.
const SMRAM_WRITABLE: u8 = 0x78;
/// PAM0's low nibble is reserved; the others have read-enable / write-enable per nibble.
const PAM0_WRITABLE: u8 = 0x30;
const PAM_WRITABLE: u8 = 0x33;

/// Told about every change of the PAM registers (the engine remaps 0xc0000..0x100000).
pub trait PamListener: Send + Sync {
    /// `pam[0]` = PAM0 (register 0x59) .. `pam[6]` = PAM6 (0x5f).
    fn pam_changed(&self, pam: [u8; PAM_COUNT]);
}

/// What one PAM-controlled segment does with reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PamMode {
    /// Reads and writes go to PCI (the BIOS / option ROM side).
    Disabled,
    /// Reads come from RAM, writes go to PCI (RAM is write-protected).
    ReadOnly,
    /// Writes go to RAM, reads come from PCI.
    WriteOnly,
    /// RAM, readable and writable.
    ReadWrite,
}

impl PamMode {
    fn from_bits(bits: u8) -> Self {
        match bits & 3 {
            0 => PamMode::Disabled,
            1 => PamMode::ReadOnly,
            2 => PamMode::WriteOnly,
            _ => PamMode::ReadWrite,
        }
    }
}

/// A piece of the 0xc0000..0x100000 area and its PAM mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PamSegment {
    pub base: u64,
    pub size: u64,
    pub mode: PamMode,
}

/// Decodes the PAM registers into 13 segments in address order: twelve 16 KiB pieces of
/// 0xc0000..0xf0000 (PAM1..PAM6, low nibble = lower 16 KiB, high nibble = upper 16 KiB)
/// and 0xf0000..0x100000 (PAM0 high nibble).
pub fn pam_segments(pam: [u8; PAM_COUNT]) -> Vec<PamSegment> {
    const PIECE: u64 = 0x4000;
    let mut segments = Vec::with_capacity(13);
    for (i, &reg) in pam.iter().enumerate().skip(1) {
        let base = 0xc0000 + (i as u64 - 1) * 2 * PIECE;
        segments.push(PamSegment {
            base,
            size: PIECE,
            mode: PamMode::from_bits(reg),
        });
        segments.push(PamSegment {
            base: base + PIECE,
            size: PIECE,
            mode: PamMode::from_bits(reg >> 4),
        });
    }
    segments.push(PamSegment {
        base: 0xf0000,
        size: 0x10000,
        mode: PamMode::from_bits(pam[0] >> 4),
    });
    segments
}

/// The i440FX host bridge function. Its state is its configuration space
/// ([`PciFunction::config`]); after restoring one, call [`I440fxHostBridge::notify_pam`].
pub struct I440fxHostBridge {
    config: PciConfigSpace,
    listener: Arc<dyn PamListener>,
}

impl I440fxHostBridge {
    pub fn new(listener: Arc<dyn PamListener>) -> Self {
        let mut config = PciConfigSpace::new();
        config.set_ids(VENDOR_INTEL, DEVICE_82441);
        config.set_revision(REVISION);
        config.set_class(CLASS_HOST_BRIDGE);
        config.set_subsystem(SUBSYSTEM_VENDOR, SUBSYSTEM_ID);
        config.set_header_type(0);
        config.set_writable(REG_PAM0, &[PAM0_WRITABLE]);
        config.set_writable(REG_PAM0 + 1, &[PAM_WRITABLE; PAM_COUNT - 1]);
        config.set_writable(REG_SMRAM, &[SMRAM_WRITABLE]);
        config.set_u8(REG_SMRAM, SMRAM_RESET);
        Self { config, listener }
    }

    /// The PAM registers, PAM0 first.
    pub fn pam(&self) -> [u8; PAM_COUNT] {
        let mut pam = [0u8; PAM_COUNT];
        for (i, reg) in pam.iter_mut().enumerate() {
            *reg = self.config.read_u8(REG_PAM0 + i);
        }
        pam
    }

    pub fn smram(&self) -> u8 {
        self.config.read_u8(REG_SMRAM)
    }

    /// Reports the current PAM registers to the listener (after a restore).
    pub fn notify_pam(&self) {
        self.listener.pam_changed(self.pam());
    }
}

impl PciFunction for I440fxHostBridge {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let before = self.pam();
        self.config.write(reg + offset, data);
        let after = self.pam();
        if after != before {
            self.listener.pam_changed(after);
        }
    }

    fn reset(&mut self) {
        self.config.reset_header();
        for i in 0..PAM_COUNT {
            self.config.set_u8(REG_PAM0 + i, 0);
        }
        self.config.set_u8(REG_SMRAM, SMRAM_RESET);
        self.notify_pam();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::pci::{PciRoot, RecordingBarMapper};
    use std::sync::Mutex;

    #[derive(Default)]
    struct RecordingPam {
        calls: Mutex<Vec<[u8; PAM_COUNT]>>,
    }
    impl PamListener for RecordingPam {
        fn pam_changed(&self, pam: [u8; PAM_COUNT]) {
            self.calls.lock().unwrap().push(pam);
        }
    }
    impl RecordingPam {
        fn take(&self) -> Vec<[u8; PAM_COUNT]> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    struct Machine {
        ports: Bus,
        root: Arc<Mutex<PciRoot>>,
        pam: Arc<RecordingPam>,
        bridge: Arc<Mutex<I440fxHostBridge>>,
    }

    impl Machine {
        fn new() -> Self {
            let pam = Arc::new(RecordingPam::default());
            let bridge = Arc::new(Mutex::new(I440fxHostBridge::new(pam.clone())));
            let root = Arc::new(Mutex::new(PciRoot::new(RecordingBarMapper::new())));
            root.lock().unwrap().add(0, 0, bridge.clone()).unwrap();
            let ports = Bus::new();
            ports.insert(0xcf8, 8, root.clone()).unwrap();
            Self {
                ports,
                root,
                pam,
                bridge,
            }
        }
        fn select(&self, reg: u32) {
            self.ports
                .write(0xcf8, &(0x8000_0000 | (reg & 0xfc)).to_le_bytes());
        }
        fn readl(&self, reg: u32) -> u32 {
            self.select(reg);
            let mut b = [0u8; 4];
            self.ports.read(0xcfc, &mut b);
            u32::from_le_bytes(b)
        }
        fn readw(&self, reg: u32) -> u16 {
            self.select(reg);
            let mut b = [0u8; 2];
            self.ports.read(0xcfc + u64::from(reg & 2), &mut b);
            u16::from_le_bytes(b)
        }
        fn readb(&self, reg: u32) -> u8 {
            self.select(reg);
            let mut b = [0u8; 1];
            self.ports.read(0xcfc + u64::from(reg & 3), &mut b);
            b[0]
        }
        fn writel(&self, reg: u32, v: u32) {
            self.select(reg);
            self.ports.write(0xcfc, &v.to_le_bytes());
        }
        fn writeb(&self, reg: u32, v: u8) {
            self.select(reg);
            self.ports.write(0xcfc + u64::from(reg & 3), &[v]);
        }

        /// SeaBIOS make_bios_writable_intel / make_bios_readonly_intel: read the two
        /// dwords at 0x58 and 0x5c, change PAM bytes, write both back.
        fn seabios_pam_update(&self, update: impl Fn(&mut [u8; 8])) {
            let mut bytes = [0u8; 8];
            bytes[..4].copy_from_slice(&self.readl(0x58).to_le_bytes());
            bytes[4..].copy_from_slice(&self.readl(0x5c).to_le_bytes());
            update(&mut bytes);
            self.writel(
                0x58,
                u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            );
            self.writel(
                0x5c,
                u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            );
        }
    }

    #[test]
    fn identity_seen_through_configuration_ports() {
        let m = Machine::new();
        assert_eq!(m.readl(0x00), 0x1237_8086);
        assert_eq!(m.readl(0x08), 0x0600_0002, "class 06/00/00, revision 02");
        assert_eq!(m.readl(0x2c), 0x1100_1af4, "subsystem 1af4:1100");
        assert_eq!(m.readb(0x0e), 0x00, "single-function type-0 header");
        assert_eq!(m.readw(0x2c), 0x1af4);
        assert_eq!(m.readw(0x2e), 0x1100);
        assert_eq!(m.readb(0x72), 0x02);
        assert_eq!(m.readl(0x10), 0, "no BARs");
    }

    #[test]
    fn seabios_make_bios_writable_then_readonly() {
        let m = Machine::new();
        // make_bios_writable: PAM0 byte read to decide whether RAM already backs 0xf0000.
        assert_eq!(m.readb(0x59) & 0x10, 0);
        m.seabios_pam_update(|b| {
            for i in 0..6 {
                b[2 + i] = 0x33;
            }
            b[1] = 0x30;
        });
        assert_eq!(
            m.pam.take(),
            vec![
                [0x30, 0x33, 0x33, 0, 0, 0, 0],
                [0x30, 0x33, 0x33, 0x33, 0x33, 0x33, 0x33]
            ]
        );
        assert_eq!(m.readb(0x59), 0x30);
        assert!(pam_segments(m.bridge.lock().unwrap().pam())
            .iter()
            .all(|s| s.mode == PamMode::ReadWrite));
        // make_bios_readonly with option ROMs up to 0xc8000 (rom_get_last) and malloc'd
        // upper memory to 0xd0000: PAM1 = 0x11, PAM2 = 0x31 (partly), PAM0 = 0x10.
        m.seabios_pam_update(|b| {
            b[2] = 0x11;
            b[3] = 0x31;
            b[1] = 0x10;
        });
        assert_eq!(
            m.pam.take(),
            vec![[0x10, 0x11, 0x31, 0x33, 0x33, 0x33, 0x33]],
            "the 0x5c dword did not change, so only one notification"
        );
        let segments = pam_segments(m.bridge.lock().unwrap().pam());
        let mode_at = |addr: u64| {
            segments
                .iter()
                .find(|s| s.base <= addr && addr < s.base + s.size)
                .unwrap()
                .mode
        };
        assert_eq!(mode_at(0xc0000), PamMode::ReadOnly);
        assert_eq!(mode_at(0xc4000), PamMode::ReadOnly);
        assert_eq!(mode_at(0xc8000), PamMode::ReadOnly);
        assert_eq!(mode_at(0xcc000), PamMode::ReadWrite);
        assert_eq!(mode_at(0xd0000), PamMode::ReadWrite);
        assert_eq!(mode_at(0xfffff), PamMode::ReadOnly);
        // The second time make_bios_writable sees RAM present.
        assert_eq!(m.readb(0x59) & 0x10, 0x10);
    }

    #[test]
    fn pam_masks_and_notifications() {
        let m = Machine::new();
        // Reserved bits do not stick: PAM0 low nibble, bits 2/3/6/7.
        m.writeb(0x59, 0xff);
        m.writeb(0x5a, 0xff);
        assert_eq!(m.readw(0x5a) & 0xff, 0x33);
        assert_eq!(m.readb(0x59), 0x30);
        assert_eq!(
            m.pam.take(),
            vec![[0x30, 0, 0, 0, 0, 0, 0], [0x30, 0x33, 0, 0, 0, 0, 0]]
        );
        // Same value again: no notification. Register 0x58 is read-only.
        m.writeb(0x59, 0x30);
        m.writeb(0x58, 0xff);
        assert_eq!(m.readb(0x58), 0);
        assert!(m.pam.take().is_empty());
        // Writes elsewhere never notify; SMRAM keeps its fixed base segment bits.
        m.writeb(0x72, 0xff);
        assert_eq!(m.readb(0x72), 0x7a);
        m.writeb(0x72, 0x4a);
        assert_eq!(m.readb(0x72), 0x4a);
        assert_eq!(m.bridge.lock().unwrap().smram(), 0x4a);
        assert!(m.pam.take().is_empty());
        // Reset: PAM 0, SMRAM default, listener told.
        m.root.lock().unwrap().reset();
        assert_eq!(m.pam.take(), vec![[0; 7]]);
        assert_eq!(m.readb(0x72), 0x02);
        assert_eq!(m.readl(0x58), 0);
    }

    #[test]
    fn segment_decode_covers_the_area_in_order() {
        let pam = [0x20, 0x21, 0x03, 0x30, 0x12, 0x00, 0x31];
        let segments = pam_segments(pam);
        assert_eq!(segments.len(), 13);
        let mut next = 0xc0000;
        for s in &segments {
            assert_eq!(s.base, next);
            next += s.size;
        }
        assert_eq!(next, 0x100000);
        let modes: Vec<PamMode> = segments.iter().map(|s| s.mode).collect();
        use PamMode::*;
        assert_eq!(
            modes,
            vec![
                ReadOnly, WriteOnly, // PAM1 0x21: c0000 RO, c4000 WO
                ReadWrite, Disabled, // PAM2 0x03
                Disabled, ReadWrite, // PAM3 0x30
                WriteOnly, ReadOnly, // PAM4 0x12
                Disabled, Disabled, // PAM5
                ReadOnly, ReadWrite, // PAM6 0x31
                WriteOnly, // PAM0 0x20: f0000
            ]
        );
    }

    use crate::test_support::TestRng as Rng;

    #[test]
    fn hostile_config_writes_keep_identity_and_valid_pam() {
        let m = Machine::new();
        let mut rng = Rng(0xfeed_f00d_dead_beef);
        for _ in 0..50_000 {
            let r = rng.next();
            let offset = (r % 256) as usize;
            let len = [1usize, 2, 4][((r >> 8) % 3) as usize];
            let data = rng.next().to_le_bytes();
            m.root
                .lock()
                .unwrap()
                .config_write(0, 0, offset, &data[..len]);
            if r & 0x100_0000 != 0 {
                let mut port = [0u8; 4];
                m.ports.read(0xcfc + (r >> 32) % 4, &mut port[..1]);
            }
        }
        assert_eq!(m.readl(0x00), 0x1237_8086);
        assert_eq!(m.readl(0x08), 0x0600_0002);
        assert_eq!(m.readl(0x2c), 0x1100_1af4);
        let pam = m.bridge.lock().unwrap().pam();
        assert_eq!(pam[0] & !0x30, 0);
        assert!(pam[1..].iter().all(|&p| p & !0x33 == 0));
        // Notifications only on change; the last one is the current state.
        let calls = m.pam.take();
        assert!(!calls.is_empty());
        assert!(calls.windows(2).all(|w| w[0] != w[1]));
        assert_eq!(*calls.last().unwrap(), pam);
        assert_eq!(m.readb(0x72) & 0x87, 0x02);
        // Direct calls with the last byte of the space do not panic either.
        let mut bridge = m.bridge.lock().unwrap();
        bridge.config_write(0xfc, 3, &[0xff]);
        assert_eq!(bridge.config_read(0xfc), 0);
    }
}
