//! Intel 82371AB (PIIX4) power-management function, PCI 00:01.3 (8086:7113): the ACPI
//! hardware a guest OS uses to power off (S5) and to hear the power button.
//!
//! Emulated, as QEMU's `pc` machine has it beside the PIIX3 (behaviour read from the PIIX4
//! datasheet and the ACPI specification):
//! - configuration space: identity (class 0x068000, revision 3, INTA#), PMBA (0x40, I/O base
//!   of the 64-byte PM register block, bits 15:6) and PMREGMISC (0x80, bit 0 enables it),
//!   DEVACTB (0x58) with APMC_EN (bit 25) set at reset because SMM is not emulated (so
//!   SeaBIOS skips its SMM relocation, as with QEMU's `smm=off`), the rest of 0x44..0xff as
//!   plain storage;
//! - the PM register block: PM1_STS (write 1 to clear: TMR, GBL, PWRBTN, RTC, WAK), PM1_EN,
//!   PM1_CNT (SCI_EN, BM_RLD, GBL_RLS; SLP_TYP with SLP_EN: type 0 = soft-off asks the
//!   machine to power off; other types are ignored since sleep states are not offered), and
//!   the 24-bit ACPI PM timer at 3.579545 MHz with TMR_STS on bit-23 toggles (an engine
//!   timer raises it when TMR_EN is set);
//! - the legacy GPE0 block QEMU puts at 0xafe0 (status write-1-to-clear, enable); no GPE
//!   sources exist, so status stays 0;
//! - the APM control/status ports 0xb2/0xb3: writing ACPI_ENABLE (0xf1) / ACPI_DISABLE
//!   (0xf0) sets / clears SCI_EN, as the FADT's SMI_CMD hand-shake expects;
//! - the SCI on ISA IRQ 9, level high while (PM1_STS & PM1_EN) or (GPE_STS & GPE_EN) has a
//!   bit of TMR, GBL, PWRBTN or RTC;
//! - the power button: [`Piix4Pm::press_power_button`] latches PWRBTN_STS only when the
//!   guest enabled PWRBTN_EN (an OS that listens), and says whether it did.
//!
//! Not emulated: SMM/SMI generation, suspend to RAM/disk, the SMBus host controller (its
//! I/O range reads as open bus), GPIO and device monitors, throttling (P_CNT), the RTC
//! alarm as a wake event.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::clock::{Clock, Timed};
use crate::irq::IrqLine;
use crate::pci::{BarKind, BarMapper, BarRegion, PciConfigSpace, PciFunction};
use crate::system::SystemControl;

pub const VENDOR_INTEL: u16 = 0x8086;
pub const DEVICE_82371AB_PM: u16 = 0x7113;
/// Bridge / other bridge.
pub const CLASS_OTHER_BRIDGE: u32 = 0x06_80_00;
const REVISION: u8 = 0x03;

/// Power management base address (bits 15:6; bit 0 reads 1, an I/O address).
pub const REG_PMBA: usize = 0x40;
/// Device activity B; byte 0x5b bit 1 is APMC_EN (SMI on writes to port 0xb2).
pub const REG_DEVACTB: usize = 0x58;
const DEVACTB_APMC_EN_BYTE: usize = 0x5b;
const APMC_EN: u8 = 0x02;
/// Miscellaneous power management; bit 0 enables the PM I/O block.
pub const REG_PMREGMISC: usize = 0x80;
const PMIOSE: u8 = 0x01;
/// SMBus base address (bit 0 reads 1) and host configuration (not emulated beyond storage).
pub const REG_SMBBA: usize = 0x90;

/// Size of the PM register block decoded at PMBA.
pub const PM_IO_SIZE: u64 = 64;
/// Region index the PM block is announced with to the [`BarMapper`]: above the six BARs
/// and the ROM BAR, so it can never collide with a standard BAR of this function.
pub const PM_IO_REGION: usize = 8;

/// Offsets inside the PM block.
pub const PM1_STS: u64 = 0x00;
pub const PM1_EN: u64 = 0x02;
pub const PM1_CNT: u64 = 0x04;
pub const PM_TMR: u64 = 0x08;

/// PM1 status / enable bits.
pub const TMR_STS: u16 = 1 << 0;
pub const BM_STS: u16 = 1 << 4;
pub const GBL_STS: u16 = 1 << 5;
pub const PWRBTN_STS: u16 = 1 << 8;
pub const RTC_STS: u16 = 1 << 10;
pub const WAK_STS: u16 = 1 << 15;
const PM1_STS_BITS: u16 = TMR_STS | BM_STS | GBL_STS | PWRBTN_STS | RTC_STS | WAK_STS;
pub const TMR_EN: u16 = TMR_STS;
pub const GBL_EN: u16 = GBL_STS;
pub const PWRBTN_EN: u16 = PWRBTN_STS;
pub const RTC_EN: u16 = RTC_STS;
const PM1_EN_BITS: u16 = TMR_EN | GBL_EN | PWRBTN_EN | RTC_EN;
/// The events that raise the SCI.
const SCI_EVENTS: u16 = TMR_STS | GBL_STS | PWRBTN_STS | RTC_STS;

/// PM1 control bits.
pub const SCI_EN: u16 = 1 << 0;
pub const BM_RLD: u16 = 1 << 1;
pub const GBL_RLS: u16 = 1 << 2;
pub const SLP_TYP_SHIFT: u16 = 10;
pub const SLP_TYP_MASK: u16 = 7 << SLP_TYP_SHIFT;
pub const SLP_EN: u16 = 1 << 13;
const PM1_CNT_STORED: u16 = SCI_EN | BM_RLD | GBL_RLS | SLP_TYP_MASK;
/// The sleep type the firmware's `_S5` package gives for soft-off.
pub const SLP_TYP_SOFT_OFF: u16 = 0;

/// APM control (SMI_CMD) values of the FADT.
pub const ACPI_ENABLE: u8 = 0xf1;
pub const ACPI_DISABLE: u8 = 0xf0;
/// Offsets inside the two APM ports (0xb2 control, 0xb3 status).
pub const APM_CONTROL: u64 = 0;
pub const APM_STATUS: u64 = 1;
pub const APM_PORT_LEN: u64 = 2;

/// Offsets inside the 4-byte GPE0 block (status word, enable word).
pub const GPE0_STS: u64 = 0;
pub const GPE0_EN: u64 = 2;
pub const GPE0_LEN: u64 = 4;

/// The ACPI PM timer runs at 3.579545 MHz.
pub const PM_TIMER_HZ: u64 = 3_579_545;
const NS_PER_SEC: u128 = 1_000_000_000;
/// TMR_STS is set whenever bit 23 of the counter changes (every 2^23 ticks).
const TIMER_STATUS_PERIOD_TICKS: u64 = 1 << 23;
const TIMER_MASK: u64 = 0x00ff_ffff;

/// Saved state of the PM registers (the configuration space is saved with the PCI root).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piix4PmState {
    pub pm1_sts: u16,
    pub pm1_en: u16,
    pub pm1_cnt: u16,
    pub gpe_sts: u16,
    pub gpe_en: u16,
    pub apm_control: u8,
    pub apm_status: u8,
}

/// The PIIX4 PM function.
pub struct Piix4Pm {
    config: PciConfigSpace,
    regs: Piix4PmState,
    /// Where this function sits (for announcing the PM block to the mapper).
    slot: (u8, u8),
    mapper: Arc<dyn BarMapper>,
    /// The PM block's current decode, if enabled.
    mapped: Option<BarRegion>,
    sci: Arc<dyn IrqLine>,
    sci_level: bool,
    system: Arc<dyn SystemControl>,
    clock: Arc<dyn Clock>,
    /// Timer tick at which TMR_STS is next set.
    next_timer_status_tick: u64,
}

impl Piix4Pm {
    /// `slot` is (device, function) on bus 0; `sci` the ISA IRQ 9 line.
    pub fn new(
        slot: (u8, u8),
        mapper: Arc<dyn BarMapper>,
        sci: Arc<dyn IrqLine>,
        system: Arc<dyn SystemControl>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let mut config = PciConfigSpace::new();
        config.set_ids(VENDOR_INTEL, DEVICE_82371AB_PM);
        config.set_revision(REVISION);
        config.set_class(CLASS_OTHER_BRIDGE);
        config.set_interrupt_pin(1);
        config.set_writable_range(0x44, 0x100 - 0x44);
        config.set_writable(REG_PMBA, &[0xc0, 0xff, 0x00, 0x00]);
        config.set_writable(REG_SMBBA, &[0xf0, 0xff, 0x00, 0x00]);
        let mut pm = Self {
            config,
            regs: Piix4PmState::default(),
            slot,
            mapper,
            mapped: None,
            sci,
            sci_level: false,
            system,
            clock,
            next_timer_status_tick: 0,
        };
        pm.power_on();
        pm
    }

    fn power_on(&mut self) {
        for offset in 0x40..0x100 {
            self.config.set_u8(offset, 0);
        }
        self.config.set_u8(REG_PMBA, 0x01);
        self.config.set_u8(REG_SMBBA, 0x01);
        self.config.set_u8(DEVACTB_APMC_EN_BYTE, APMC_EN);
        self.regs = Piix4PmState::default();
        self.next_timer_status_tick = self.next_status_tick_after(self.timer_ticks());
        self.update_decode();
        self.update_sci();
    }

    pub fn state(&self) -> Piix4PmState {
        self.regs
    }

    /// Restores the PM registers (after the configuration space was restored).
    pub fn restore_state(&mut self, state: &Piix4PmState) {
        self.regs = *state;
        self.regs.pm1_sts &= PM1_STS_BITS;
        self.regs.pm1_en &= PM1_EN_BITS;
        self.regs.pm1_cnt &= PM1_CNT_STORED;
        self.update_decode();
        self.update_sci();
    }

    /// The I/O base of the PM block while the guest has it enabled.
    pub fn pm_io_base(&self) -> Option<u16> {
        let enabled = self.config.read_u8(REG_PMREGMISC) & PMIOSE != 0;
        let base = (self.config.read_u32(REG_PMBA) & 0xffc0) as u16;
        (enabled && base != 0).then_some(base)
    }

    /// Whether the guest switched to ACPI mode (SCI_EN).
    pub fn acpi_enabled(&self) -> bool {
        self.regs.pm1_cnt & SCI_EN != 0
    }

    /// Presses the power button: latches PWRBTN_STS (raising the SCI) when the guest
    /// listens for it (PWRBTN_EN). Returns whether it did; a guest without an ACPI OS
    /// running (firmware, boot loader, an OS without ACPI) does not listen.
    pub fn press_power_button(&mut self) -> bool {
        if self.regs.pm1_en & PWRBTN_EN == 0 {
            return false;
        }
        self.regs.pm1_sts |= PWRBTN_STS;
        self.update_sci();
        true
    }

    /// Whether the SCI is asserted now.
    pub fn sci_asserted(&self) -> bool {
        self.sci_level
    }

    // ---- the PM timer ----

    fn timer_ticks(&self) -> u64 {
        let ns = u128::from(self.clock.monotonic_ns());
        (ns * u128::from(PM_TIMER_HZ) / NS_PER_SEC) as u64
    }

    fn next_status_tick_after(&self, ticks: u64) -> u64 {
        (ticks / TIMER_STATUS_PERIOD_TICKS + 1) * TIMER_STATUS_PERIOD_TICKS
    }

    /// Latches TMR_STS if bit 23 toggled since it was last evaluated; returns the ticks
    /// it looked at.
    fn update_timer_status(&mut self) -> u64 {
        let ticks = self.timer_ticks();
        if ticks >= self.next_timer_status_tick {
            self.regs.pm1_sts |= TMR_STS;
            self.next_timer_status_tick = self.next_status_tick_after(ticks);
        }
        ticks
    }

    // ---- SCI and decode ----

    fn update_sci(&mut self) {
        let pm1 = self.regs.pm1_sts & self.regs.pm1_en & SCI_EVENTS != 0;
        let gpe = self.regs.gpe_sts & self.regs.gpe_en != 0;
        let level = pm1 || gpe;
        if level != self.sci_level {
            self.sci_level = level;
            self.sci.set_level(level);
        }
    }

    fn update_decode(&mut self) {
        let wanted = self.pm_io_base().map(|base| BarRegion {
            device: self.slot.0,
            function: self.slot.1,
            bar: PM_IO_REGION,
            kind: BarKind::Io,
            base: u64::from(base),
            size: PM_IO_SIZE,
        });
        if wanted == self.mapped {
            return;
        }
        if let Some(old) = self.mapped.take() {
            self.mapper.unmap(old);
        }
        if let Some(new) = wanted {
            self.mapper.map(new);
            self.mapped = Some(new);
        }
    }

    // ---- register block ----

    /// The PM block's first 12 bytes as the guest reads them.
    fn register_image(&mut self) -> [u8; 12] {
        let timer = (self.update_timer_status() & TIMER_MASK) as u32;
        let mut image = [0u8; 12];
        image[0..2].copy_from_slice(&self.regs.pm1_sts.to_le_bytes());
        image[2..4].copy_from_slice(&self.regs.pm1_en.to_le_bytes());
        image[4..6].copy_from_slice(&self.regs.pm1_cnt.to_le_bytes());
        image[8..12].copy_from_slice(&timer.to_le_bytes());
        image
    }

    fn pm_read(&mut self, offset: u64, data: &mut [u8]) {
        let image = self.register_image();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| image.get(o).copied())
                .unwrap_or(0);
        }
        self.update_sci();
    }

    /// Bytes of a write that fall on the 16-bit register at `reg`: (mask of written bytes,
    /// value), or None when the write does not touch it.
    fn word_part(offset: u64, data: &[u8], reg: u64) -> Option<(u16, u16)> {
        let mut mask = 0u16;
        let mut value = 0u16;
        for (i, &byte) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u64) else {
                break;
            };
            if at == reg || at == reg + 1 {
                let shift = (at - reg) * 8;
                mask |= 0xff << shift;
                value |= u16::from(byte) << shift;
            }
        }
        (mask != 0).then_some((mask, value))
    }

    fn pm_write(&mut self, offset: u64, data: &[u8]) {
        if let Some((mask, value)) = Self::word_part(offset, data, PM1_STS) {
            self.update_timer_status();
            self.regs.pm1_sts &= !(value & mask & PM1_STS_BITS);
        }
        if let Some((mask, value)) = Self::word_part(offset, data, PM1_EN) {
            self.regs.pm1_en = (self.regs.pm1_en & !mask) | (value & mask & PM1_EN_BITS);
        }
        if let Some((mask, value)) = Self::word_part(offset, data, PM1_CNT) {
            let written = (self.regs.pm1_cnt & !mask) | (value & mask);
            self.regs.pm1_cnt = written & PM1_CNT_STORED;
            if written & SLP_EN != 0 {
                self.sleep((written & SLP_TYP_MASK) >> SLP_TYP_SHIFT);
            }
        }
        self.update_sci();
    }

    fn sleep(&mut self, sleep_type: u16) {
        if sleep_type == SLP_TYP_SOFT_OFF {
            self.system.request_poweroff();
        } else {
            log::info!("piix4-pm: sleep type {sleep_type} is not offered; ignored");
        }
    }

    fn apm_write(&mut self, offset: u64, value: u8) {
        match offset {
            APM_CONTROL => {
                self.regs.apm_control = value;
                match value {
                    ACPI_ENABLE => self.regs.pm1_cnt |= SCI_EN,
                    ACPI_DISABLE => self.regs.pm1_cnt &= !SCI_EN,
                    _ => {}
                }
            }
            APM_STATUS => self.regs.apm_status = value,
            _ => {}
        }
    }

    fn apm_read(&self, offset: u64) -> u8 {
        match offset {
            APM_CONTROL => self.regs.apm_control,
            APM_STATUS => self.regs.apm_status,
            _ => 0xff,
        }
    }

    fn gpe_read(&self, offset: u64, data: &mut [u8]) {
        let mut image = [0u8; 4];
        image[0..2].copy_from_slice(&self.regs.gpe_sts.to_le_bytes());
        image[2..4].copy_from_slice(&self.regs.gpe_en.to_le_bytes());
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| image.get(o).copied())
                .unwrap_or(0xff);
        }
    }

    fn gpe_write(&mut self, offset: u64, data: &[u8]) {
        if let Some((mask, value)) = Self::word_part(offset, data, GPE0_STS) {
            self.regs.gpe_sts &= !(value & mask);
        }
        if let Some((mask, value)) = Self::word_part(offset, data, GPE0_EN) {
            self.regs.gpe_en = (self.regs.gpe_en & !mask) | (value & mask);
        }
        self.update_sci();
    }
}

impl PciFunction for Piix4Pm {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg + offset, data);
        self.update_decode();
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == PM_IO_REGION {
            self.pm_read(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == PM_IO_REGION {
            self.pm_write(offset, data);
        }
    }

    fn reset(&mut self) {
        self.config.reset_header();
        self.power_on();
    }
}

impl Timed for Piix4Pm {
    /// Only while the guest enabled the timer interrupt and has no TMR_STS pending.
    fn next_deadline_ns(&self) -> Option<u64> {
        if self.regs.pm1_en & TMR_EN == 0 || self.regs.pm1_sts & TMR_STS != 0 {
            return None;
        }
        let tick = u128::from(self.next_timer_status_tick);
        let hz = u128::from(PM_TIMER_HZ);
        let ns = (tick * NS_PER_SEC).div_ceil(hz);
        Some(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    fn on_timer(&mut self, _now_ns: u64) {
        self.update_timer_status();
        self.update_sci();
    }
}

/// The APM ports 0xb2/0xb3 of a shared [`Piix4Pm`].
pub struct ApmPorts(pub Arc<std::sync::Mutex<Piix4Pm>>);

impl BusDevice for ApmPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let pm = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .map_or(0xff, |o| pm.apm_read(o));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut pm = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (i, &byte) in data.iter().enumerate() {
            if let Some(o) = offset.checked_add(i as u64) {
                pm.apm_write(o, byte);
            }
        }
    }
}

/// The GPE0 block (0xafe0) of a shared [`Piix4Pm`].
pub struct Gpe0Block(pub Arc<std::sync::Mutex<Piix4Pm>>);

impl BusDevice for Gpe0Block {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .gpe_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .gpe_write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::clock::ManualClock;
    use crate::irq::CountingIrq;
    use crate::pci::{BarEvent, PciRoot, RecordingBarMapper};
    use crate::system::RecordingControl;
    use crate::test_support::TestRng;
    use std::sync::Mutex;

    const SLOT: (u8, u8) = (1, 3);
    const PM_BASE: u64 = 0xb000;

    struct Board {
        ports: Bus,
        pm: Arc<Mutex<Piix4Pm>>,
        mapper: Arc<RecordingBarMapper>,
        sci: Arc<CountingIrq>,
        system: Arc<RecordingControl>,
        clock: Arc<ManualClock>,
    }

    impl Board {
        fn new() -> Self {
            let mapper = RecordingBarMapper::new();
            let sci = CountingIrq::new();
            let system = Arc::new(RecordingControl::default());
            let clock = ManualClock::new(0);
            let pm = Arc::new(Mutex::new(Piix4Pm::new(
                SLOT,
                mapper.clone(),
                sci.clone(),
                system.clone(),
                clock.clone(),
            )));
            let root = Arc::new(Mutex::new(PciRoot::new(RecordingBarMapper::new())));
            root.lock()
                .unwrap()
                .add(SLOT.0, SLOT.1, pm.clone())
                .unwrap();
            let ports = Bus::new();
            ports.insert(0xcf8, 8, root).unwrap();
            ports
                .insert(
                    0xb2,
                    APM_PORT_LEN,
                    Arc::new(Mutex::new(ApmPorts(pm.clone()))),
                )
                .unwrap();
            ports
                .insert(
                    0xafe0,
                    GPE0_LEN,
                    Arc::new(Mutex::new(Gpe0Block(pm.clone()))),
                )
                .unwrap();
            Self {
                ports,
                pm,
                mapper,
                sci,
                system,
                clock,
            }
        }

        fn cfg_addr(reg: u8) -> u32 {
            0x8000_0000 | (u32::from(SLOT.0) << 11) | (u32::from(SLOT.1) << 8) | u32::from(reg)
        }

        fn cfg_readl(&self, reg: u8) -> u32 {
            self.ports
                .write(0xcf8, &Self::cfg_addr(reg & 0xfc).to_le_bytes());
            let mut b = [0u8; 4];
            self.ports.read(0xcfc, &mut b);
            u32::from_le_bytes(b)
        }

        fn cfg_write(&self, reg: u8, data: &[u8]) {
            self.ports
                .write(0xcf8, &Self::cfg_addr(reg & 0xfc).to_le_bytes());
            self.ports.write(0xcfc + u16::from(reg & 3) as u64, data);
        }

        /// What SeaBIOS's piix4_pm_setup does.
        fn seabios_setup(&self) {
            self.cfg_write(0x3c, &[9]);
            self.cfg_write(0x40, &(PM_BASE as u32 | 1).to_le_bytes());
            self.cfg_write(0x80, &[0x01]);
            self.cfg_write(0x90, &(0xb100u32 | 1).to_le_bytes());
            self.cfg_write(0xd2, &[0x09]);
        }

        /// Guest access to the PM block (through the function, as the mapper would route it).
        fn pm_readw(&self, offset: u64) -> u16 {
            let mut b = [0u8; 2];
            self.pm
                .lock()
                .unwrap()
                .bar_read(PM_IO_REGION, offset, &mut b);
            u16::from_le_bytes(b)
        }

        fn pm_readl(&self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.pm
                .lock()
                .unwrap()
                .bar_read(PM_IO_REGION, offset, &mut b);
            u32::from_le_bytes(b)
        }

        fn pm_writew(&self, offset: u64, value: u16) {
            self.pm
                .lock()
                .unwrap()
                .bar_write(PM_IO_REGION, offset, &value.to_le_bytes());
        }

        fn outb(&self, port: u64, value: u8) {
            self.ports.write(port, &[value]);
        }

        fn inb(&self, port: u64) -> u8 {
            let mut b = [0u8; 1];
            self.ports.read(port, &mut b);
            b[0]
        }
    }

    #[test]
    fn identity_and_reset_values() {
        let b = Board::new();
        assert_eq!(b.cfg_readl(0x00), 0x7113_8086);
        assert_eq!(b.cfg_readl(0x08), 0x0680_0003);
        assert_eq!(b.cfg_readl(0x3c) >> 8 & 0xff, 1, "INTA#");
        assert_eq!(b.cfg_readl(0x40), 0x0000_0001, "PMBA: I/O indicator");
        assert_eq!(
            b.cfg_readl(0x58) & (1 << 25),
            1 << 25,
            "APMC_EN preset: SMM is not emulated, firmware must skip SMM set-up"
        );
        assert_eq!(b.cfg_readl(0x80) & 1, 0, "PM block disabled at reset");
        assert!(b.mapper.events().is_empty(), "nothing decoded at reset");
    }

    #[test]
    fn pm_block_decodes_where_and_when_the_guest_says() {
        let b = Board::new();
        b.cfg_write(0x40, &(0xb000u32 | 1).to_le_bytes());
        assert!(b.mapper.events().is_empty(), "PMIOSE still clear");
        b.cfg_write(0x80, &[0x01]);
        let region = BarRegion {
            device: SLOT.0,
            function: SLOT.1,
            bar: PM_IO_REGION,
            kind: BarKind::Io,
            base: 0xb000,
            size: PM_IO_SIZE,
        };
        assert_eq!(b.mapper.events(), vec![BarEvent::Map(region)]);
        assert_eq!(b.pm.lock().unwrap().pm_io_base(), Some(0xb000));
        // Low bits are not writable; the base moves in 64-byte steps.
        b.cfg_write(0x40, &0x0000_0621u32.to_le_bytes());
        assert_eq!(b.cfg_readl(0x40), 0x0000_0601);
        let moved = BarRegion {
            base: 0x600,
            ..region
        };
        assert_eq!(
            b.mapper.events()[1..],
            [BarEvent::Unmap(region), BarEvent::Map(moved)]
        );
        b.cfg_write(0x80, &[0x00]);
        assert_eq!(b.mapper.events().last(), Some(&BarEvent::Unmap(moved)));
        // A machine reset drops the decode too.
        b.cfg_write(0x80, &[0x01]);
        b.pm.lock().unwrap().reset();
        assert_eq!(b.mapper.events().last(), Some(&BarEvent::Unmap(moved)));
        assert_eq!(b.pm.lock().unwrap().pm_io_base(), None);
    }

    #[test]
    fn acpi_enable_handshake_through_the_apm_port() {
        let b = Board::new();
        b.seabios_setup();
        assert_eq!(b.pm_readw(PM1_CNT) & SCI_EN, 0);
        b.outb(0xb2, ACPI_ENABLE);
        assert_eq!(b.pm_readw(PM1_CNT) & SCI_EN, SCI_EN);
        assert_eq!(b.inb(0xb2), ACPI_ENABLE);
        b.outb(0xb3, 0x5a);
        assert_eq!(b.inb(0xb3), 0x5a, "APM status is a scratch register");
        b.outb(0xb2, ACPI_DISABLE);
        assert_eq!(b.pm_readw(PM1_CNT) & SCI_EN, 0);
        assert!(b.pm.lock().unwrap().state().apm_control == ACPI_DISABLE);
    }

    #[test]
    fn power_button_raises_the_sci_only_for_a_listening_guest() {
        let b = Board::new();
        b.seabios_setup();
        assert!(
            !b.pm.lock().unwrap().press_power_button(),
            "firmware does not listen"
        );
        assert_eq!(b.pm_readw(PM1_STS) & PWRBTN_STS, 0);
        assert_eq!(b.sci.count(), 0);
        // The OS: ACPI mode, power button enabled.
        b.outb(0xb2, ACPI_ENABLE);
        b.pm_writew(PM1_EN, PWRBTN_EN);
        assert!(b.pm.lock().unwrap().press_power_button());
        assert!(b.sci.level());
        assert_eq!(b.sci.count(), 1);
        assert_eq!(b.pm_readw(PM1_STS) & PWRBTN_STS, PWRBTN_STS);
        // Writing 0 changes nothing; writing 1 clears it and drops the SCI.
        b.pm_writew(PM1_STS, 0);
        assert!(b.sci.level());
        b.pm_writew(PM1_STS, PWRBTN_STS);
        assert!(!b.sci.level());
        assert_eq!(b.pm_readw(PM1_STS) & PWRBTN_STS, 0);
        // Pressed while masked: status latches (enabled) but the SCI follows the enable.
        b.pm.lock().unwrap().press_power_button();
        b.pm_writew(PM1_EN, 0);
        assert!(!b.sci.level());
        b.pm_writew(PM1_EN, PWRBTN_EN);
        assert!(b.sci.level());
    }

    #[test]
    fn soft_off_requests_power_off_and_other_sleep_types_are_ignored() {
        let b = Board::new();
        b.seabios_setup();
        // S3-style request (type 1): not offered, nothing happens.
        b.pm_writew(PM1_CNT, SCI_EN | (1 << SLP_TYP_SHIFT) | SLP_EN);
        assert_eq!(b.system.poweroffs(), 0);
        assert_eq!(
            b.pm_readw(PM1_CNT) & SLP_EN,
            0,
            "SLP_EN is write-only and reads 0"
        );
        // SLP_TYP written first, SLP_EN in a separate byte write (as some OSes do).
        b.pm.lock()
            .unwrap()
            .bar_write(PM_IO_REGION, PM1_CNT, &[SCI_EN as u8]);
        b.pm.lock()
            .unwrap()
            .bar_write(PM_IO_REGION, PM1_CNT + 1, &[(SLP_EN >> 8) as u8]);
        assert_eq!(b.system.poweroffs(), 1);
        // What SeaBIOS's APM shutdown writes: 0x2000.
        b.pm_writew(PM1_CNT, 0x2000);
        assert_eq!(b.system.poweroffs(), 2);
        assert_eq!(b.system.resets(), 0);
    }

    #[test]
    fn pm_timer_counts_at_3_58_mhz_and_wraps_at_24_bits() {
        let b = Board::new();
        b.seabios_setup();
        let t0 = b.pm_readl(PM_TMR);
        b.clock.advance_ns(1_000_000); // 1 ms
        let t1 = b.pm_readl(PM_TMR);
        assert_eq!(t1.wrapping_sub(t0) & 0xff_ffff, 3579, "ticks in 1 ms");
        b.clock.advance_ns(10_000_000_000); // 10 s: wraps 24 bits twice
        let t2 = b.pm_readl(PM_TMR);
        assert!(t2 <= 0xff_ffff, "24-bit counter");
        assert_eq!(
            t2,
            ((10_001_000_000u128 * 3_579_545 / 1_000_000_000) & 0xff_ffff) as u32
        );
        // Byte reads of the timer are consistent with the dword.
        let mut byte = [0u8; 1];
        b.pm.lock()
            .unwrap()
            .bar_read(PM_IO_REGION, PM_TMR + 3, &mut byte);
        assert_eq!(byte[0], 0, "bits 31:24 read 0");
    }

    #[test]
    fn timer_status_on_bit_23_toggle_and_its_sci_through_the_engine_timer() {
        let b = Board::new();
        b.seabios_setup();
        assert_eq!(
            b.pm.lock().unwrap().next_deadline_ns(),
            None,
            "TMR_EN clear"
        );
        b.pm_writew(PM1_EN, TMR_EN);
        let deadline = b.pm.lock().unwrap().next_deadline_ns().unwrap();
        // 2^23 ticks at 3.579545 MHz = 2.3435 s.
        assert_eq!(deadline, 2_343_484_438);
        b.clock.advance_ns(deadline - 1);
        b.pm.lock().unwrap().on_timer(deadline - 1);
        assert!(!b.sci.level(), "not yet");
        b.clock.advance_ns(1);
        b.pm.lock().unwrap().on_timer(deadline);
        assert!(b.sci.level());
        assert_eq!(b.pm_readw(PM1_STS) & TMR_STS, TMR_STS);
        assert_eq!(b.pm.lock().unwrap().next_deadline_ns(), None, "pending");
        b.pm_writew(PM1_STS, TMR_STS);
        assert!(!b.sci.level());
        let next = b.pm.lock().unwrap().next_deadline_ns().unwrap();
        assert_eq!(next, 4_686_968_875);
        // Without TMR_EN the status still latches (polled), but no SCI.
        b.pm_writew(PM1_EN, 0);
        b.clock.advance_ns(3_000_000_000);
        assert_eq!(b.pm_readw(PM1_STS) & TMR_STS, TMR_STS);
        assert!(!b.sci.level());
    }

    #[test]
    fn gpe_block_has_no_sources_but_behaves_as_registers() {
        let b = Board::new();
        let mut four = [0u8; 4];
        b.ports.read(0xafe0, &mut four);
        assert_eq!(four, [0, 0, 0, 0]);
        b.ports.write(0xafe2, &[0xff, 0xff]);
        b.ports.read(0xafe0, &mut four);
        assert_eq!(four, [0, 0, 0xff, 0xff], "enables stored, no status");
        b.ports.write(0xafe0, &[0xff, 0xff]);
        assert!(!b.sci.level());
        b.pm.lock().unwrap().reset();
        b.ports.read(0xafe0, &mut four);
        assert_eq!(four, [0, 0, 0, 0], "reset clears the enables");
    }

    #[test]
    fn reset_clears_registers_and_lowers_the_sci() {
        let b = Board::new();
        b.seabios_setup();
        b.outb(0xb2, ACPI_ENABLE);
        b.pm_writew(PM1_EN, PWRBTN_EN);
        b.pm.lock().unwrap().press_power_button();
        assert!(b.sci.level());
        b.pm.lock().unwrap().reset();
        assert!(!b.sci.level());
        let pm = b.pm.lock().unwrap();
        assert_eq!(pm.state(), Piix4PmState::default());
        assert!(!pm.acpi_enabled());
    }

    #[test]
    fn restore_state_masks_reserved_bits_and_recomputes_the_sci() {
        let b = Board::new();
        b.seabios_setup();
        let hostile = Piix4PmState {
            pm1_sts: 0xffff,
            pm1_en: 0xffff,
            pm1_cnt: 0xffff,
            gpe_sts: 0,
            gpe_en: 0,
            apm_control: 0,
            apm_status: 0,
        };
        b.pm.lock().unwrap().restore_state(&hostile);
        let state = b.pm.lock().unwrap().state();
        assert_eq!(state.pm1_sts, PM1_STS_BITS);
        assert_eq!(state.pm1_en, PM1_EN_BITS);
        assert_eq!(state.pm1_cnt & SLP_EN, 0, "no sleep request restored");
        assert!(b.sci.level());
        assert_eq!(b.system.poweroffs(), 0);
    }

    #[test]
    fn hostile_guest_accesses_never_panic_and_keep_invariants() {
        let b = Board::new();
        b.seabios_setup();
        let mut rng = TestRng(0x9e37_79b9_7f4a_7c15);
        let mut next = || rng.next();
        for _ in 0..20_000 {
            let r = next();
            let offset = r % 80; // past the 64-byte block too
            let len = [1usize, 2, 4, 8][(r >> 8) as usize % 4];
            let mut data = vec![0u8; len];
            let value = next().to_le_bytes();
            data.copy_from_slice(&value[..len]);
            // Never request soft-off by accident: keep SLP_EN out of PM1_CNT writes.
            for (i, byte) in data.iter_mut().enumerate() {
                if offset + i as u64 == PM1_CNT + 1 {
                    *byte &= !((SLP_EN >> 8) as u8);
                }
            }
            match (r >> 16) % 6 {
                0 => b.pm.lock().unwrap().bar_write(PM_IO_REGION, offset, &data),
                1 => {
                    b.pm.lock()
                        .unwrap()
                        .bar_read(PM_IO_REGION, offset, &mut data)
                }
                2 => {
                    b.ports.write(0xafe0 + offset % 6, &data[..len.min(2)]);
                }
                3 => {
                    b.ports.write(0xb2 + offset % 2, &data[..1]);
                }
                4 => b.cfg_write((0x40 + (r >> 24) % 0xc0) as u8 & 0xfc, &data[..len.min(4)]),
                _ => b.pm.lock().unwrap().bar_read(3, offset, &mut data),
            }
            b.clock.advance_ns(next() % 5_000_000);
            let pm = b.pm.lock().unwrap();
            let s = pm.state();
            assert_eq!(s.pm1_sts & !PM1_STS_BITS, 0);
            assert_eq!(s.pm1_en & !PM1_EN_BITS, 0);
            assert_eq!(s.pm1_cnt & SLP_EN, 0);
            let expected = s.pm1_sts & s.pm1_en & SCI_EVENTS != 0 || s.gpe_sts & s.gpe_en != 0;
            assert_eq!(pm.sci_asserted(), expected);
            assert_eq!(b.sci.level(), expected);
        }
        assert_eq!(b.system.poweroffs(), 0);
    }
}
