//! Chipset reset ports: the PIIX3 reset control register (0xcf9) and System Control
//! Port A (0x92, "fast A20 and reset"), both one byte wide.
//!
//! Emulated, following QEMU's `piix` `rcr_write` and `port92`:
//! - 0xcf9: a write with bit 2 (RST_CPU) set requests a system reset (hard or soft per
//!   bit 1, both treated as a full system reset) and stores nothing; any other write
//!   stores only bit 1 (SYS_RST, the reset type). Reads return the stored value.
//! - 0x92: the written byte is stored; bit 1 is the A20 gate (readable through
//!   [`SystemPortA::a20_enabled`]; KVM does not mask A20, so it has no other effect); a
//!   0->1 transition of bit 0 requests a system reset. Reads return the stored value with
//!   bit 0 clear.
//!
//! Accesses at an offset other than 0 are ignored (reads give 0xff); of a wider access
//! only the first byte counts, the others read as 0xff.
//! Not emulated: the CPU-only (INIT) reset distinction, the port 0x92 password lock bit.
//! On machine reset the engine must call `reset()` on both (0x92 then forgets bit 0, so
//! the next reset request is again a 0->1 transition).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::system::SystemControl;

/// Port of the PIIX3 reset control register.
pub const RESET_CONTROL_PORT: u64 = 0xcf9;
/// Port of System Control Port A.
pub const SYSTEM_PORT_A: u64 = 0x92;

const RCR_SYS_RST: u8 = 0x02;
const RCR_RST_CPU: u8 = 0x04;

const PORT_A_FAST_RESET: u8 = 0x01;
const PORT_A_A20: u8 = 0x02;

/// Saved state of [`ResetControl`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetControlState {
    pub value: u8,
}

/// The reset control register at 0xcf9.
pub struct ResetControl {
    state: ResetControlState,
    system: Arc<dyn SystemControl>,
}

impl ResetControl {
    pub fn new(system: Arc<dyn SystemControl>) -> Self {
        Self {
            state: ResetControlState::default(),
            system,
        }
    }

    pub fn state(&self) -> ResetControlState {
        self.state
    }

    pub fn restore(&mut self, state: ResetControlState) {
        self.state.value = state.value & RCR_SYS_RST;
    }

    /// Machine reset: the register returns to 0.
    pub fn reset(&mut self) {
        self.state = ResetControlState::default();
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset == 0 {
            if let Some(first) = data.first_mut() {
                *first = self.state.value;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first().filter(|_| offset == 0) else {
            return;
        };
        if value & RCR_RST_CPU != 0 {
            self.system.request_reset();
            return;
        }
        self.state.value = value & RCR_SYS_RST;
    }
}

/// Saved state of [`SystemPortA`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemPortAState {
    pub value: u8,
}

/// System Control Port A at 0x92.
pub struct SystemPortA {
    state: SystemPortAState,
    system: Arc<dyn SystemControl>,
}

impl SystemPortA {
    pub fn new(system: Arc<dyn SystemControl>) -> Self {
        Self {
            state: SystemPortAState::default(),
            system,
        }
    }

    /// Whether the guest opened the A20 gate through this port.
    pub fn a20_enabled(&self) -> bool {
        self.state.value & PORT_A_A20 != 0
    }

    pub fn state(&self) -> SystemPortAState {
        self.state
    }

    pub fn restore(&mut self, state: SystemPortAState) {
        self.state = state;
    }

    /// Machine reset: the fast-reset bit clears, the A20 bit is kept (as QEMU does).
    pub fn reset(&mut self) {
        self.state.value &= !PORT_A_FAST_RESET;
    }
}

impl BusDevice for SystemPortA {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset == 0 {
            if let Some(first) = data.first_mut() {
                *first = self.state.value & !PORT_A_FAST_RESET;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first().filter(|_| offset == 0) else {
            return;
        };
        let old = self.state.value;
        self.state.value = value;
        if value & PORT_A_FAST_RESET != 0 && old & PORT_A_FAST_RESET == 0 {
            self.system.request_reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::RecordingControl;

    fn inb(dev: &mut dyn BusDevice) -> u8 {
        let mut b = [0u8];
        dev.read(0, &mut b);
        b[0]
    }

    #[test]
    fn seabios_and_linux_cf9_reboot_sequences_reset_once() {
        let control = Arc::new(RecordingControl::default());
        let mut rcr = ResetControl::new(control.clone());
        // SeaBIOS pci_reboot / Linux reboot=pci (warm): v = inb & ~6; outb(v|2); outb(v|6).
        let v = inb(&mut rcr) & !0x06;
        rcr.write(0, &[v | 0x02]);
        assert_eq!(
            control.resets(),
            0,
            "selecting the reset type does not reset"
        );
        assert_eq!(inb(&mut rcr), 0x02);
        rcr.write(0, &[v | 0x06]);
        assert_eq!(control.resets(), 1);
        assert_eq!(inb(&mut rcr), 0x02, "the reset write is not stored");

        // Linux cold reboot=pci: writes 0x02 then 0x0e.
        rcr.reset();
        assert_eq!(inb(&mut rcr), 0);
        let v = inb(&mut rcr) & !0x0e;
        rcr.write(0, &[v | 0x02]);
        rcr.write(0, &[v | 0x0e]);
        assert_eq!(control.resets(), 2);
        // A soft reset request (bit 2 without bit 1) is a reset too.
        rcr.write(0, &[0x04]);
        assert_eq!(control.resets(), 3);
        assert_eq!(control.poweroffs(), 0);
    }

    #[test]
    fn cf9_stores_only_the_reset_type_bit() {
        let control = Arc::new(RecordingControl::default());
        let mut rcr = ResetControl::new(control.clone());
        rcr.write(0, &[0xfb]);
        assert_eq!(inb(&mut rcr), 0x02);
        rcr.write(0, &[0x08]);
        assert_eq!(inb(&mut rcr), 0x00);
        assert_eq!(control.resets(), 0);
        rcr.restore(ResetControlState { value: 0xff });
        assert_eq!(rcr.state(), ResetControlState { value: 0x02 });
    }

    #[test]
    fn port92_fast_reset_on_rising_bit0_only() {
        let control = Arc::new(RecordingControl::default());
        let mut port = SystemPortA::new(control.clone());
        // Reboot the way boot loaders do it: outb(inb(0x92) | 1, 0x92).
        port.write(0, &[PORT_A_A20]);
        let v = inb(&mut port);
        assert_eq!(v, PORT_A_A20);
        port.write(0, &[v | 1]);
        assert_eq!(control.resets(), 1);
        assert_eq!(inb(&mut port), PORT_A_A20, "bit 0 reads as 0");
        port.write(0, &[v | 1]);
        assert_eq!(control.resets(), 1, "no new transition, no new reset");
        port.reset();
        assert!(port.a20_enabled(), "A20 survives the reset like QEMU");
        let v = inb(&mut port);
        port.write(0, &[v | 1]);
        assert_eq!(
            control.resets(),
            2,
            "after machine reset the next request works"
        );
        // Writing 0 then 1 is a fresh transition too.
        port.write(0, &[0]);
        port.write(0, &[1]);
        assert_eq!(control.resets(), 3);
    }

    #[test]
    fn port92_a20_toggling_does_not_reset() {
        let control = Arc::new(RecordingControl::default());
        let mut port = SystemPortA::new(control.clone());
        assert!(!port.a20_enabled());
        for _ in 0..10 {
            let v = inb(&mut port);
            port.write(0, &[v | PORT_A_A20]);
            assert!(port.a20_enabled());
            assert_eq!(inb(&mut port) & PORT_A_A20, PORT_A_A20);
            let v = inb(&mut port);
            port.write(0, &[v & !PORT_A_A20]);
            assert!(!port.a20_enabled());
        }
        assert_eq!(control.resets(), 0);
        port.restore(SystemPortAState { value: 0x03 });
        assert_eq!(inb(&mut port), 0x02);
    }

    #[test]
    fn hostile_input_never_panics_and_resets_match_the_rules() {
        let control = Arc::new(RecordingControl::default());
        let mut rcr = ResetControl::new(control.clone());
        let mut port = SystemPortA::new(control.clone());
        let mut expected_resets = 0u32;
        let mut port_bit0 = false;
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..50_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 5) as usize;
            let offset = if seed & 0x10 == 0 { 0 } else { seed >> 40 };
            let bytes = (seed >> 8).to_le_bytes();
            let data = &bytes[..len];
            let first_counts = offset == 0 && len > 0;
            if seed & 0x20 == 0 {
                let mut buf = [0u8; 4];
                rcr.read(offset, &mut buf[..len]);
                port.read(offset, &mut buf[..len]);
                if first_counts {
                    assert_eq!(buf[0] & PORT_A_FAST_RESET, 0);
                }
                assert!(buf[len.min(1)..len].iter().all(|&b| b == 0xff));
            } else if seed & 0x40 == 0 {
                rcr.write(offset, data);
                if first_counts && data[0] & RCR_RST_CPU != 0 {
                    expected_resets += 1;
                }
            } else {
                port.write(offset, data);
                if first_counts {
                    let bit0 = data[0] & PORT_A_FAST_RESET != 0;
                    if bit0 && !port_bit0 {
                        expected_resets += 1;
                    }
                    port_bit0 = bit0;
                }
            }
            assert_eq!(rcr.state().value & !RCR_SYS_RST, 0);
        }
        assert_eq!(control.resets(), expected_resets);
        assert!(expected_resets > 0);
    }
}
