//! The Intel 8042 keyboard controller (ports 0x60 data, 0x64 status/command) with a PS/2
//! keyboard ([`Ps2Keyboard`]) on its first port and a PS/2 mouse ([`Ps2Mouse`]) on its
//! AUX port, following QEMU's `pckbd.c`.
//!
//! The engine registers the device at 0x60 with length 5: offset 0 is the data port,
//! offset 4 the status (read) / command (write) port, offsets 1..=3 read 0xff and ignore
//! writes (0x61 belongs to the PIT/speaker, handled in KVM).
//!
//! Emulated: the status register (OBF, AUX OBF, system flag, command/data, keylock
//! "not locked"; IBF never sets because every write is processed at once), the command
//! byte and the other 31 bytes of internal RAM (0x20..0x3F / 0x60..0x7F), controller
//! commands 0xA4 (no password), 0xA7/0xA8, 0xA9 and 0xAB interface tests (0x00),
//! 0xAA self test (0x55; the status system flag then stays set), 0xAD/0xAE, 0xC0 input port, 0xD0/0xD1
//! output port (bit 0 low = system reset, bit 1 = A20, tracked only), 0xD2/0xD3 writes to
//! the output buffer "as if from" the keyboard / the AUX device (0xD3 is the AUX loopback
//! Linux uses to find the AUX port; bytes come back unchanged, so Linux's active-MUX
//! detection finds no MUX, as on QEMU), 0xD4 to the mouse, 0xDD/0xDF A20, 0xE0 test
//! inputs, 0xF0..0xFF output-port pulses (0xFE resets the machine).
//! One output buffer: a controller reply goes first, then keyboard data (preferred), then
//! mouse data, each only while its interface is enabled. IRQ 1 / IRQ 12 are driven as
//! levels that are high while the output buffer holds a keyboard / AUX byte and the
//! command byte enables that interrupt (the keyboard one also needs the keyboard interface
//! enabled, as in QEMU); reading port 0x60 drops the line and loading the next byte raises
//! it again, so the edge-triggered PIC sees one edge per byte. With command byte bit 6
//! the controller translates keyboard bytes from set 2 to set 1 (0xF0 -> OR 0x80).
//!
//! Not emulated: timing (commands complete instantly), parity/timeout errors, the
//! keylock, passwords, active multiplexing (MUX), the A20 gate itself (KVM has none),
//! 0xC1/0xC2 input-port polling and vendor commands (ignored).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::irq::IrqLine;
use crate::ps2_keyboard::{Ps2Keyboard, KBD_QUEUE_CAPACITY, KBD_REPLY_CAPACITY, SET2_TO_SET1};
use crate::ps2_mouse::Ps2Mouse;
use crate::system::SystemControl;

/// I/O base of the controller.
pub const I8042_PORT_BASE: u64 = 0x60;
/// Number of ports the engine registers (0x60..=0x64).
pub const I8042_PORT_COUNT: u64 = 5;
/// Offset of the data port (0x60).
pub const DATA_OFFSET: u64 = 0;
/// Offset of the status/command port (0x64).
pub const COMMAND_OFFSET: u64 = 4;

/// Status: output buffer full.
pub const STATUS_OUTPUT_FULL: u8 = 0x01;
/// Status: input buffer full (never set: writes are processed at once).
pub const STATUS_INPUT_FULL: u8 = 0x02;
/// Status: system flag (set by the self test, or by command byte bit 2).
pub const STATUS_SYSTEM_FLAG: u8 = 0x04;
/// Status: the last write went to the command port.
pub const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
/// Status: keyboard not locked.
pub const STATUS_NOT_LOCKED: u8 = 0x10;
/// Status: the output buffer holds AUX (mouse) data.
pub const STATUS_AUX_DATA: u8 = 0x20;
/// Status: general timeout (never set).
pub const STATUS_TIMEOUT: u8 = 0x40;
/// Status: parity error (never set).
pub const STATUS_PARITY_ERROR: u8 = 0x80;

/// Command byte: keyboard data raises IRQ 1.
pub const CB_KBD_INTERRUPT: u8 = 0x01;
/// Command byte: AUX data raises IRQ 12.
pub const CB_AUX_INTERRUPT: u8 = 0x02;
/// Command byte: system flag.
pub const CB_SYSTEM_FLAG: u8 = 0x04;
/// Command byte: ignore the keylock.
pub const CB_IGNORE_KEYLOCK: u8 = 0x08;
/// Command byte: keyboard interface (clock) disabled.
pub const CB_KBD_DISABLED: u8 = 0x10;
/// Command byte: AUX interface (clock) disabled.
pub const CB_AUX_DISABLED: u8 = 0x20;
/// Command byte: translate keyboard set 2 to set 1.
pub const CB_TRANSLATE: u8 = 0x40;

/// Output port: 1 = CPU running; writing 0 resets the machine.
pub const OUTPUT_PORT_RESET: u8 = 0x01;
/// Output port: A20 gate.
pub const OUTPUT_PORT_A20: u8 = 0x02;
/// Output port: output buffer full with keyboard data (IRQ 1).
pub const OUTPUT_PORT_KBD_FULL: u8 = 0x10;
/// Output port: output buffer full with AUX data (IRQ 12).
pub const OUTPUT_PORT_AUX_FULL: u8 = 0x20;
/// Output port after power-on (QEMU's value: running, A20 on, unused bits high).
const OUTPUT_PORT_POWER_ON: u8 = 0xCF;
/// Command byte after power-on (QEMU's value; the BIOS programs its own).
const COMMAND_BYTE_POWER_ON: u8 = CB_KBD_INTERRUPT | CB_AUX_INTERRUPT;
/// Reply to 0xAA.
pub const SELF_TEST_OK: u8 = 0x55;

/// A byte in (or for) the output buffer and the port it appears to come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct OutputByte {
    value: u8,
    from_aux: bool,
}

/// Everything that survives save/restore, devices included.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct I8042State {
    pub keyboard: Ps2Keyboard,
    pub mouse: Ps2Mouse,
    /// Internal RAM; byte 0 is the command byte.
    ram: [u8; 32],
    output_port: u8,
    /// The output buffer; `None` when empty.
    output: Option<OutputByte>,
    /// The last byte loaded into the output buffer (a read of an empty buffer returns it).
    last_output: u8,
    /// A controller reply waiting for the output buffer.
    controller_reply: Option<OutputByte>,
    /// A command that takes a data byte (0x60..0x7F, 0xD1..0xD4).
    awaiting_data_for: Option<u8>,
    last_write_was_command: bool,
    /// The self test (0xAA) ran: the status system flag stays set (as in QEMU).
    self_test_passed: bool,
    /// Translation saw a 0xF0: the next translated byte gets bit 7.
    translate_release: bool,
    kbd_irq_level: bool,
    aux_irq_level: bool,
}

impl Default for I8042State {
    fn default() -> Self {
        let mut ram = [0u8; 32];
        ram[0] = COMMAND_BYTE_POWER_ON;
        Self {
            keyboard: Ps2Keyboard::new(),
            mouse: Ps2Mouse::new(),
            ram,
            output_port: OUTPUT_PORT_POWER_ON,
            output: None,
            last_output: 0,
            controller_reply: None,
            awaiting_data_for: None,
            last_write_was_command: true,
            self_test_passed: false,
            translate_release: false,
            kbd_irq_level: false,
            aux_irq_level: false,
        }
    }
}

/// The i8042 with its keyboard and mouse.
pub struct I8042 {
    state: I8042State,
    kbd_irq: Arc<dyn IrqLine>,
    mouse_irq: Arc<dyn IrqLine>,
    system: Arc<dyn SystemControl>,
}

impl I8042 {
    /// `kbd_irq` is ISA IRQ 1, `mouse_irq` ISA IRQ 12; both are driven as levels.
    pub fn new(
        kbd_irq: Arc<dyn IrqLine>,
        mouse_irq: Arc<dyn IrqLine>,
        system: Arc<dyn SystemControl>,
    ) -> Self {
        Self {
            state: I8042State::default(),
            kbd_irq,
            mouse_irq,
            system,
        }
    }

    /// Machine reset: controller, keyboard and mouse back to power-on, both lines low.
    pub fn reset(&mut self) {
        self.state = I8042State::default();
        self.kbd_irq.set_level(false);
        self.mouse_irq.set_level(false);
    }

    /// A copy of the whole state for save/restore.
    pub fn state(&self) -> I8042State {
        self.state.clone()
    }

    /// Loads a saved state and drives both interrupt lines to the levels it implies.
    pub fn restore(&mut self, state: I8042State) {
        self.state = state;
        self.update_irq_lines();
        self.kbd_irq.set_level(self.state.kbd_irq_level);
        self.mouse_irq.set_level(self.state.aux_irq_level);
    }

    /// A host key event (Linux evdev code), delivered through the keyboard.
    pub fn key_event(&mut self, evdev_code: u16, down: bool) {
        self.state.keyboard.key_event(evdev_code, down);
        self.fill_output();
    }

    /// Host relative pointer motion, delivered through the mouse (see [`Ps2Mouse::motion`]).
    pub fn mouse_motion(&mut self, dx: i32, dy: i32, dz: i32, buttons: u8) {
        self.state.mouse.motion(dx, dy, dz, buttons);
        self.fill_output();
    }

    pub fn keyboard(&self) -> &Ps2Keyboard {
        &self.state.keyboard
    }

    pub fn mouse(&self) -> &Ps2Mouse {
        &self.state.mouse
    }

    /// The command byte (controller RAM byte 0).
    pub fn command_byte(&self) -> u8 {
        self.state.ram[0]
    }

    /// Whether the controller translates set 2 to set 1 (command byte bit 6).
    pub fn translation_enabled(&self) -> bool {
        self.command_byte() & CB_TRANSLATE != 0
    }

    /// Whether the controller's keyboard interface is enabled (command byte bit 4 clear).
    pub fn keyboard_port_enabled(&self) -> bool {
        self.command_byte() & CB_KBD_DISABLED == 0
    }

    /// Whether the controller's AUX interface is enabled (command byte bit 5 clear).
    pub fn aux_port_enabled(&self) -> bool {
        self.command_byte() & CB_AUX_DISABLED == 0
    }

    /// Whether keys reach the guest: keyboard interface enabled and keyboard scanning.
    pub fn keyboard_enabled(&self) -> bool {
        self.keyboard_port_enabled() && self.state.keyboard.scanning_enabled()
    }

    /// Whether the guest has a mouse driver listening (reporting on, AUX interface on).
    pub fn mouse_enabled(&self) -> bool {
        self.aux_port_enabled() && self.state.mouse.reporting_enabled()
    }

    /// Keyboard LEDs: bit 0 Scroll Lock, bit 1 Num Lock, bit 2 Caps Lock.
    pub fn leds(&self) -> u8 {
        self.state.keyboard.leds()
    }

    /// Whether the guest has the A20 gate open (output port bit 1).
    pub fn a20_enabled(&self) -> bool {
        self.state.output_port & OUTPUT_PORT_A20 != 0
    }

    /// The status register as port 0x64 reads it.
    pub fn status(&self) -> u8 {
        let state = &self.state;
        let mut status = STATUS_NOT_LOCKED;
        if let Some(output) = state.output {
            status |= STATUS_OUTPUT_FULL;
            if output.from_aux {
                status |= STATUS_AUX_DATA;
            }
        }
        if state.self_test_passed || state.ram[0] & CB_SYSTEM_FLAG != 0 {
            status |= STATUS_SYSTEM_FLAG;
        }
        if state.last_write_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    /// The output port as 0xD0 reports it.
    fn output_port_value(&self) -> u8 {
        let mut value = self.state.output_port & !(OUTPUT_PORT_KBD_FULL | OUTPUT_PORT_AUX_FULL);
        match self.state.output {
            Some(OutputByte {
                from_aux: false, ..
            }) => value |= OUTPUT_PORT_KBD_FULL,
            Some(OutputByte { from_aux: true, .. }) => value |= OUTPUT_PORT_AUX_FULL,
            None => {}
        }
        value
    }

    /// Port 0x60 read: takes the output buffer and loads the next byte.
    pub fn read_data(&mut self) -> u8 {
        match self.state.output.take() {
            Some(output) => {
                // Drop the line first so the next byte makes a fresh edge.
                self.update_irq_lines();
                self.fill_output();
                output.value
            }
            None => self.state.last_output,
        }
    }

    /// Port 0x60 write: data for a pending controller command, else a keyboard byte.
    pub fn write_data(&mut self, value: u8) {
        self.state.last_write_was_command = false;
        match self.state.awaiting_data_for.take() {
            None => {
                self.state.keyboard.write(value);
                // Sending to the keyboard enables its interface (as QEMU and real 8042s).
                self.state.ram[0] &= !CB_KBD_DISABLED;
            }
            Some(command @ 0x60..=0x7F) => {
                self.state.ram[usize::from(command & 0x1F)] = value;
                if value & CB_TRANSLATE == 0 && command == 0x60 {
                    self.state.translate_release = false;
                }
            }
            Some(0xD1) => self.write_output_port(value),
            Some(0xD2) => self.queue_reply(value, false),
            Some(0xD3) => self.queue_reply(value, true),
            Some(0xD4) => {
                self.state.mouse.write(value);
                self.state.ram[0] &= !CB_AUX_DISABLED;
            }
            Some(_) => {}
        }
        self.fill_output();
    }

    /// Port 0x64 write: a controller command.
    pub fn write_command(&mut self, command: u8) {
        self.state.last_write_was_command = true;
        // A new command cancels one still waiting for its data byte.
        self.state.awaiting_data_for = None;
        match command {
            0x20..=0x3F => {
                let value = self.state.ram[usize::from(command & 0x1F)];
                self.queue_reply(value, false);
            }
            0x60..=0x7F | 0xD1..=0xD4 => self.state.awaiting_data_for = Some(command),
            0xA4 => self.queue_reply(0xF1, false), // no password installed
            0xA7 => self.state.ram[0] |= CB_AUX_DISABLED,
            0xA8 => self.state.ram[0] &= !CB_AUX_DISABLED,
            0xA9 | 0xAB => self.queue_reply(0x00, false), // interface test: no error
            0xAA => {
                self.state.self_test_passed = true;
                self.queue_reply(SELF_TEST_OK, false);
            }
            0xAD => self.state.ram[0] |= CB_KBD_DISABLED,
            0xAE => self.state.ram[0] &= !CB_KBD_DISABLED,
            0xC0 => self.queue_reply(0x80, false), // input port: keyboard not inhibited
            0xD0 => {
                let value = self.output_port_value();
                self.queue_reply(value, false);
            }
            0xDD => self.state.output_port &= !OUTPUT_PORT_A20,
            0xDF => self.state.output_port |= OUTPUT_PORT_A20,
            0xE0 => self.queue_reply(0x00, false), // test inputs
            0xF0..=0xFF => {
                // Pulse the output-port bits whose command bit is 0; bit 0 is CPU reset.
                if command & 0x01 == 0 {
                    self.system.request_reset();
                }
            }
            _ => log::debug!("i8042: unsupported command {command:#04x}"),
        }
        self.fill_output();
    }

    fn write_output_port(&mut self, value: u8) {
        self.state.output_port = value;
        if value & OUTPUT_PORT_RESET == 0 {
            self.system.request_reset();
        }
    }

    /// A controller-generated byte; a later one replaces one still waiting (as QEMU).
    fn queue_reply(&mut self, value: u8, from_aux: bool) {
        self.state.controller_reply = Some(OutputByte { value, from_aux });
    }

    /// The next keyboard byte, translated to set 1 when the command byte asks for it.
    fn next_keyboard_byte(&mut self) -> Option<u8> {
        let translate = self.command_byte() & CB_TRANSLATE != 0;
        for _ in 0..=(KBD_QUEUE_CAPACITY + KBD_REPLY_CAPACITY) {
            let byte = self.state.keyboard.read_byte()?;
            if !translate {
                return Some(byte);
            }
            if byte == 0xF0 {
                self.state.translate_release = true;
                continue;
            }
            let mut translated = SET2_TO_SET1[usize::from(byte)];
            if std::mem::take(&mut self.state.translate_release) {
                translated |= 0x80;
            }
            return Some(translated);
        }
        None
    }

    /// Loads the output buffer if it is empty and something may go there, then updates
    /// the interrupt lines.
    fn fill_output(&mut self) {
        if self.state.output.is_none() {
            let next = if let Some(reply) = self.state.controller_reply.take() {
                Some(reply)
            } else if self.keyboard_port_enabled() && self.state.keyboard.has_data() {
                self.next_keyboard_byte().map(|value| OutputByte {
                    value,
                    from_aux: false,
                })
            } else {
                None
            };
            let next = next.or_else(|| {
                if self.aux_port_enabled() {
                    self.state.mouse.read_byte().map(|value| OutputByte {
                        value,
                        from_aux: true,
                    })
                } else {
                    None
                }
            });
            if let Some(output) = next {
                self.state.last_output = output.value;
                self.state.output = Some(output);
            }
        }
        self.update_irq_lines();
    }

    fn update_irq_lines(&mut self) {
        let command_byte = self.command_byte();
        let (kbd, aux) = match self.state.output {
            Some(OutputByte {
                from_aux: false, ..
            }) => (
                command_byte & CB_KBD_INTERRUPT != 0 && command_byte & CB_KBD_DISABLED == 0,
                false,
            ),
            Some(OutputByte { from_aux: true, .. }) => {
                (false, command_byte & CB_AUX_INTERRUPT != 0)
            }
            None => (false, false),
        };
        if kbd != self.state.kbd_irq_level {
            self.state.kbd_irq_level = kbd;
            self.kbd_irq.set_level(kbd);
        }
        if aux != self.state.aux_irq_level {
            self.state.aux_irq_level = aux;
            self.mouse_irq.set_level(aux);
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some((first, rest)) = data.split_first_mut() else {
            return;
        };
        *first = match offset {
            DATA_OFFSET => self.read_data(),
            COMMAND_OFFSET => self.status(),
            _ => 0xff,
        };
        rest.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            DATA_OFFSET => self.write_data(value),
            COMMAND_OFFSET => self.write_command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::CountingIrq;
    use crate::ps2_keyboard::evdev::*;
    use crate::ps2_mouse::{BUTTON_LEFT, ID_EXPLORER, ID_INTELLIMOUSE};
    use crate::system::RecordingControl;

    // Linux drivers/input/serio/i8042.h command encodings: low byte = command,
    // bits 8..11 = bytes to receive, bits 12..15 = bytes to send.
    const I8042_CMD_CTL_RCTR: u16 = 0x0120;
    const I8042_CMD_CTL_WCTR: u16 = 0x1060;
    const I8042_CMD_CTL_TEST: u16 = 0x01aa;
    const I8042_CMD_KBD_TEST: u16 = 0x01ab;
    const I8042_CMD_AUX_DISABLE: u16 = 0x00a7;
    const I8042_CMD_AUX_ENABLE: u16 = 0x00a8;
    const I8042_CMD_AUX_SEND: u16 = 0x10d4;
    const I8042_CMD_AUX_LOOP: u16 = 0x11d3;
    const I8042_BUFFER_SIZE: usize = 16;

    struct Machine {
        dev: I8042,
        kbd_irq: Arc<CountingIrq>,
        aux_irq: Arc<CountingIrq>,
        control: Arc<RecordingControl>,
        kbd_edges_seen: u64,
        aux_edges_seen: u64,
    }

    impl Machine {
        fn new() -> Self {
            let kbd_irq = CountingIrq::new();
            let aux_irq = CountingIrq::new();
            let control = Arc::new(RecordingControl::default());
            let dev = I8042::new(kbd_irq.clone(), aux_irq.clone(), control.clone());
            Self {
                dev,
                kbd_irq,
                aux_irq,
                control,
                kbd_edges_seen: 0,
                aux_edges_seen: 0,
            }
        }

        fn inb(&mut self, port: u16) -> u8 {
            let mut byte = [0u8];
            self.dev.read(u64::from(port) - I8042_PORT_BASE, &mut byte);
            byte[0]
        }

        fn outb(&mut self, port: u16, value: u8) {
            self.dev.write(u64::from(port) - I8042_PORT_BASE, &[value]);
        }

        fn status(&mut self) -> u8 {
            self.inb(0x64)
        }

        /// Linux `i8042_wait_read` (bounded polling).
        fn wait_read(&mut self) -> Result<(), ()> {
            (0..100)
                .find(|_| self.status() & STATUS_OUTPUT_FULL != 0)
                .map(|_| ())
                .ok_or(())
        }

        /// Linux `i8042_wait_write`.
        fn wait_write(&mut self) -> Result<(), ()> {
            (0..100)
                .find(|_| self.status() & STATUS_INPUT_FULL == 0)
                .map(|_| ())
                .ok_or(())
        }

        /// Linux `i8042_flush`: fails when more than I8042_BUFFER_SIZE bytes come out.
        fn flush(&mut self) -> Result<usize, ()> {
            let mut count = 0;
            while self.status() & STATUS_OUTPUT_FULL != 0 {
                if count >= I8042_BUFFER_SIZE {
                    return Err(());
                }
                self.inb(0x60);
                count += 1;
            }
            self.sync_edges();
            Ok(count)
        }

        /// Linux `__i8042_command` (also what SeaBIOS's `__i8042_command` does).
        fn command(&mut self, param: &mut [u8; 2], command: u16) -> Result<(), ()> {
            let receive = usize::from((command >> 8) & 0xf);
            let send = usize::from((command >> 12) & 0xf);
            self.wait_write()?;
            self.outb(0x64, command as u8);
            for &byte in param.iter().take(send) {
                self.wait_write()?;
                self.outb(0x60, byte);
            }
            for slot in param.iter_mut().take(receive) {
                self.wait_read()?;
                if command == I8042_CMD_AUX_LOOP && self.status() & STATUS_AUX_DATA == 0 {
                    return Err(());
                }
                *slot = self.inb(0x60);
            }
            self.sync_edges();
            Ok(())
        }

        fn read_ctr(&mut self) -> u8 {
            let mut param = [0; 2];
            self.command(&mut param, I8042_CMD_CTL_RCTR).unwrap();
            param[0]
        }

        fn write_ctr(&mut self, ctr: u8) {
            self.command(&mut [ctr, 0], I8042_CMD_CTL_WCTR).unwrap();
        }

        /// Forget edges raised while polling.
        fn sync_edges(&mut self) {
            self.kbd_edges_seen = self.kbd_irq.count();
            self.aux_edges_seen = self.aux_irq.count();
        }

        /// What Linux's `i8042_interrupt` does when a line fires: read status, then data.
        /// Checks that each byte came with exactly one fresh edge on the right line.
        fn interrupt(&mut self) -> Option<(u8, bool)> {
            let kbd = self.kbd_irq.level();
            let aux = self.aux_irq.level();
            if !kbd && !aux {
                assert_eq!(self.kbd_irq.count(), self.kbd_edges_seen, "stray IRQ1 edge");
                assert_eq!(
                    self.aux_irq.count(),
                    self.aux_edges_seen,
                    "stray IRQ12 edge"
                );
                return None;
            }
            assert!(!(kbd && aux), "both lines high");
            let status = self.status();
            assert!(status & STATUS_OUTPUT_FULL != 0, "IRQ without data");
            assert_eq!(
                status & STATUS_AUX_DATA != 0,
                aux,
                "IRQ line and AUX bit disagree"
            );
            if aux {
                self.aux_edges_seen += 1;
                assert_eq!(
                    self.aux_irq.count(),
                    self.aux_edges_seen,
                    "one IRQ12 edge per byte"
                );
            } else {
                self.kbd_edges_seen += 1;
                assert_eq!(
                    self.kbd_irq.count(),
                    self.kbd_edges_seen,
                    "one IRQ1 edge per byte"
                );
            }
            Some((self.inb(0x60), aux))
        }

        /// All bytes the interrupt handler collects, with their port.
        fn interrupts(&mut self) -> Vec<(u8, bool)> {
            let mut bytes = Vec::new();
            while let Some(byte) = self.interrupt() {
                bytes.push(byte);
                assert!(bytes.len() < 4096);
            }
            bytes
        }

        fn kbd_bytes(&mut self) -> Vec<u8> {
            self.interrupts()
                .into_iter()
                .map(|(byte, aux)| {
                    assert!(!aux, "keyboard byte {byte:#x} came as AUX data");
                    byte
                })
                .collect()
        }

        fn aux_bytes(&mut self) -> Vec<u8> {
            self.interrupts()
                .into_iter()
                .map(|(byte, aux)| {
                    assert!(aux, "mouse byte {byte:#x} came as keyboard data");
                    byte
                })
                .collect()
        }

        /// libps2 over `i8042_kbd_write`: each byte is ACKed through IRQ 1, then the
        /// reply bytes follow.
        fn atkbd_command(&mut self, bytes: &[u8]) -> Vec<u8> {
            let mut replies = Vec::new();
            for &byte in bytes {
                self.wait_write().unwrap();
                self.outb(0x60, byte);
                replies.extend(self.kbd_bytes());
            }
            replies
        }

        /// libps2 over `i8042_aux_write` (0xD4 + byte); replies come through IRQ 12.
        fn psmouse_command(&mut self, bytes: &[u8]) -> Vec<u8> {
            let mut replies = Vec::new();
            for &byte in bytes {
                self.wait_write().unwrap();
                self.outb(0x64, I8042_CMD_AUX_SEND as u8);
                self.wait_write().unwrap();
                self.outb(0x60, byte);
                replies.extend(self.aux_bytes());
            }
            replies
        }

        /// Linux `i8042_set_mux_mode`; returns the MUX version or Err when there is no
        /// MUX, with the three loopback answers.
        fn set_mux_mode(&mut self, multiplex: bool) -> (Result<u8, ()>, Vec<u8>) {
            let mut answers = Vec::new();
            self.flush().unwrap();
            let sequence: [u8; 3] = if multiplex {
                [0xf0, 0x56, 0xa4]
            } else {
                [0xf0, 0xf6, 0xa5]
            };
            for (index, &sent) in sequence.iter().enumerate() {
                let mut param = [sent, 0];
                if self.command(&mut param, I8042_CMD_AUX_LOOP).is_err() {
                    return (Err(()), answers);
                }
                answers.push(param[0]);
                let last = index == 2;
                if (!last && param[0] != sent) || (last && (param[0] == sent || param[0] == 0xac)) {
                    return (Err(()), answers);
                }
            }
            (Ok(answers[2]), answers)
        }

        /// SeaBIOS `ps2_recvbyte` (bounded).
        fn seabios_recvbyte(&mut self, aux: bool, needack: bool) -> Result<u8, ()> {
            for _ in 0..64 {
                let status = self.status();
                if status & STATUS_OUTPUT_FULL != 0 {
                    let data = self.inb(0x60);
                    if (status & STATUS_AUX_DATA != 0) == aux
                        && (!needack || data == 0xfa || data == 0xfe)
                    {
                        return Ok(data);
                    }
                }
            }
            Err(())
        }

        /// SeaBIOS `ps2_sendbyte`.
        fn seabios_sendbyte(&mut self, aux: bool, byte: u8) -> Result<(), ()> {
            if aux {
                self.command(&mut [byte, 0], I8042_CMD_AUX_SEND)?;
            } else {
                self.wait_write()?;
                self.outb(0x60, byte);
            }
            match self.seabios_recvbyte(aux, true)? {
                0xfa => Ok(()),
                _ => Err(()),
            }
        }

        /// SeaBIOS `__ps2_command`: ports and interrupts off, the target port on,
        /// exchange by polling, then the saved command byte back.
        fn seabios_ps2_command(
            &mut self,
            ps2ctr: u8,
            aux: bool,
            command: u16,
            param: &mut [u8; 2],
        ) -> Result<(), ()> {
            let newctr = (ps2ctr | CB_AUX_DISABLED | CB_KBD_DISABLED)
                & !(CB_KBD_INTERRUPT | CB_AUX_INTERRUPT);
            self.command(&mut [newctr, 0], I8042_CMD_CTL_WCTR)?;
            let newctr = if aux {
                newctr & !CB_AUX_DISABLED
            } else {
                newctr & !CB_KBD_DISABLED
            };
            self.command(&mut [newctr, 0], I8042_CMD_CTL_WCTR)?;
            let result = self.seabios_exchange(aux, command, param);
            self.command(&mut [ps2ctr, 0], I8042_CMD_CTL_WCTR)?;
            result
        }

        fn seabios_exchange(
            &mut self,
            aux: bool,
            command: u16,
            param: &mut [u8; 2],
        ) -> Result<(), ()> {
            let receive = usize::from((command >> 8) & 0xf);
            let send = usize::from((command >> 12) & 0xf);
            if command == 0x02ff {
                self.seabios_sendbyte(aux, 0xff)?;
                param[0] = self.seabios_recvbyte(aux, false)?;
                // "Some devices only respond with one byte on reset."
                param[1] = self.seabios_recvbyte(aux, false).unwrap_or(0);
                return Ok(());
            }
            self.seabios_sendbyte(aux, command as u8)?;
            for byte in (*param).into_iter().take(send) {
                self.seabios_sendbyte(aux, byte)?;
            }
            for slot in param.iter_mut().take(receive) {
                *slot = self.seabios_recvbyte(aux, false)?;
            }
            Ok(())
        }

        /// SeaBIOS `ps2_keyboard_setup`; returns the command byte it leaves.
        fn seabios_keyboard_setup(&mut self) -> u8 {
            self.flush().unwrap();
            let mut param = [0u8; 2];
            self.command(&mut param, I8042_CMD_CTL_TEST).unwrap();
            assert_eq!(param[0], 0x55, "controller self test");
            self.command(&mut param, I8042_CMD_KBD_TEST).unwrap();
            assert_eq!(param[0], 0x00, "keyboard interface test");
            let mut ps2ctr = CB_KBD_DISABLED | CB_AUX_DISABLED;
            self.seabios_ps2_command(ps2ctr, false, 0x02ff, &mut param)
                .unwrap();
            assert_eq!(
                param,
                [0xaa, 0x00],
                "BAT, and no second reset byte from a keyboard"
            );
            self.seabios_ps2_command(ps2ctr, false, 0x00f5, &mut param)
                .unwrap();
            param[0] = 0x02;
            self.seabios_ps2_command(ps2ctr, false, 0x10f0, &mut param)
                .unwrap();
            ps2ctr = CB_AUX_DISABLED | CB_TRANSLATE | CB_KBD_INTERRUPT;
            self.seabios_ps2_command(ps2ctr, false, 0x00f4, &mut param)
                .unwrap();
            self.sync_edges();
            ps2ctr
        }

        /// SeaBIOS `handle_09`: status, data, then 0xAE.
        fn seabios_irq1(&mut self) -> Option<u8> {
            let (byte, aux) = self.interrupt()?;
            assert!(!aux);
            // i8042_command(I8042_CMD_KBD_ENABLE) without forgetting the next edge.
            self.wait_write().unwrap();
            self.outb(0x64, 0xae);
            Some(byte)
        }
    }

    #[test]
    fn power_on_state() {
        let mut m = Machine::new();
        assert_eq!(m.status(), STATUS_NOT_LOCKED | STATUS_LAST_WAS_COMMAND);
        assert_eq!(m.read_ctr(), CB_KBD_INTERRUPT | CB_AUX_INTERRUPT);
        assert_eq!(
            m.inb(0x60),
            COMMAND_BYTE_POWER_ON,
            "empty buffer repeats the last byte"
        );
        for port in 0x61..=0x63 {
            assert_eq!(m.inb(port), 0xff);
            m.outb(port, 0x00);
        }
        let mut wide = [0u8; 2];
        m.dev.read(DATA_OFFSET, &mut wide);
        assert_eq!(wide[1], 0xff);
        assert!(m.dev.a20_enabled());
        assert!(!m.dev.translation_enabled());
        assert!(m.dev.keyboard_enabled());
        assert!(!m.dev.mouse_enabled());
        assert_eq!(m.control.resets(), 0);
        assert!(!m.kbd_irq.level() && !m.aux_irq.level());
    }

    #[test]
    fn seabios_init_then_esc_reads_set1_codes_at_port_60() {
        let mut m = Machine::new();
        let ctr = m.seabios_keyboard_setup();
        assert_eq!(m.dev.command_byte(), 0x61);
        assert_eq!(ctr, 0x61);
        assert!(m.dev.translation_enabled() && m.dev.keyboard_enabled());
        assert_eq!(
            m.status() & STATUS_SYSTEM_FLAG,
            STATUS_SYSTEM_FLAG,
            "self test set SYS"
        );
        assert_eq!(m.dev.keyboard().scan_code_set(), 2);
        m.dev.key_event(KEY_ESC, true);
        assert_eq!(m.seabios_irq1(), Some(0x01));
        assert_eq!(m.seabios_irq1(), None);
        m.dev.key_event(KEY_ESC, false);
        assert_eq!(m.seabios_irq1(), Some(0x81));
        m.dev.key_event(KEY_UP, true);
        m.dev.key_event(KEY_UP, false);
        let bytes: Vec<u8> = std::iter::from_fn(|| m.seabios_irq1()).collect();
        assert_eq!(bytes, vec![0xE0, 0x48, 0xE0, 0xC8]);
        m.dev.key_event(KEY_PAUSE, true);
        let bytes: Vec<u8> = std::iter::from_fn(|| m.seabios_irq1()).collect();
        assert_eq!(bytes, vec![0xE1, 0x1D, 0x45, 0xE1, 0x9D, 0xC5]);
        assert_eq!(m.aux_irq.count(), 0);
        assert_eq!(m.control.resets(), 0);
    }

    #[test]
    fn linux_i8042_probe_finds_the_aux_port_and_no_mux() {
        let mut m = Machine::new();
        // i8042_controller_check + i8042_controller_selftest
        assert_eq!(m.flush(), Ok(0));
        let mut param = [0u8; 2];
        m.command(&mut param, I8042_CMD_CTL_TEST).unwrap();
        assert_eq!(param[0], 0x55);
        // i8042_controller_init: a stable CTR read, keyboard off, keylock check.
        let first = m.read_ctr();
        assert_eq!(m.read_ctr(), first);
        let mut ctr = first;
        ctr |= CB_KBD_DISABLED;
        ctr &= !CB_KBD_INTERRUPT;
        assert_ne!(m.status() & STATUS_NOT_LOCKED, 0, "keylock not active");
        let direct = ctr & CB_TRANSLATE == 0;
        assert!(direct, "QEMU-like power-on command byte is untranslated");
        m.write_ctr(ctr);
        m.flush().unwrap();

        // i8042_check_aux: internal loopback.
        m.flush().unwrap();
        let mut param = [0x5a, 0];
        assert_eq!(m.command(&mut param, I8042_CMD_AUX_LOOP), Ok(()));
        assert_eq!(param[0], 0x5a);
        // Bit assignment test (i8042_toggle_aux).
        m.command(&mut param, I8042_CMD_AUX_DISABLE).unwrap();
        assert_ne!(m.read_ctr() & CB_AUX_DISABLED, 0);
        m.command(&mut param, I8042_CMD_AUX_ENABLE).unwrap();
        assert_eq!(m.read_ctr() & CB_AUX_DISABLED, 0);
        // AUX IRQ delivery test: enable the port, loop 0xa5 back without polling for it.
        ctr &= !CB_AUX_DISABLED;
        ctr |= CB_AUX_INTERRUPT;
        m.write_ctr(ctr);
        let edges = m.aux_irq.count();
        m.command(&mut [0xa5, 0], I8042_CMD_AUX_LOOP & 0xf0ff)
            .unwrap();
        assert_eq!(m.aux_irq.count(), edges + 1, "IRQ 12 delivered");
        // i8042_aux_test_irq
        let status = m.status();
        assert_eq!(
            status & (STATUS_OUTPUT_FULL | STATUS_AUX_DATA),
            STATUS_OUTPUT_FULL | STATUS_AUX_DATA
        );
        assert_eq!(m.inb(0x60), 0xa5);
        assert!(!m.aux_irq.level());
        ctr |= CB_AUX_DISABLED;
        ctr &= !CB_AUX_INTERRUPT;
        m.write_ctr(ctr);

        // i8042_check_mux: the loopback returns every byte unchanged, so no MUX.
        let (result, answers) = m.set_mux_mode(true);
        assert_eq!(result, Err(()));
        assert_eq!(answers, vec![0xf0, 0x56, 0xa4]);

        // i8042_setup_aux / i8042_setup_kbd
        ctr &= !CB_AUX_DISABLED;
        ctr |= CB_AUX_INTERRUPT;
        m.write_ctr(ctr);
        ctr &= !CB_KBD_DISABLED;
        ctr |= CB_KBD_INTERRUPT;
        m.write_ctr(ctr);
        assert_eq!(m.dev.command_byte(), ctr);
        assert_eq!(ctr, 0x03, "interrupts on, ports on, untranslated");
        assert_eq!(m.control.resets(), 0);

        // atkbd on the raw port, then a key press in set 2.
        m.sync_edges();
        assert_eq!(m.atkbd_command(&[0xf2]), vec![0xfa, 0xab, 0x83]);
        m.dev.key_event(KEY_A, true);
        m.dev.key_event(KEY_A, false);
        assert_eq!(m.kbd_bytes(), vec![0x1c, 0xf0, 0x1c]);
    }

    #[test]
    fn atkbd_probe_on_a_translated_port() {
        let mut m = Machine::new();
        let ctr = m.seabios_keyboard_setup();
        // Linux keeps the BIOS's translation: kbd port on, IRQ on.
        m.write_ctr(ctr | CB_KBD_INTERRUPT);
        m.sync_edges();
        // atkbd_probe: reset, GETID (translated second byte), deactivate.
        assert_eq!(m.atkbd_command(&[0xff]), vec![0xfa, 0xaa]);
        assert_eq!(m.atkbd_command(&[0xf2]), vec![0xfa, 0xab, 0x41]);
        assert_eq!(m.atkbd_command(&[0xf5]), vec![0xfa]);
        // atkbd_select_set: translated, stays in set 2; query answers the translated 2.
        assert_eq!(m.atkbd_command(&[0xf0, 0x00]), vec![0xfa, 0xfa, 0x41]);
        // atkbd_reset_state + atkbd_activate
        assert_eq!(m.atkbd_command(&[0xed, 0x00]), vec![0xfa, 0xfa]);
        assert_eq!(m.atkbd_command(&[0xf3, 0x00]), vec![0xfa, 0xfa]);
        assert_eq!(m.dev.keyboard().typematic(), 0x00);
        assert_eq!(m.atkbd_command(&[0xf4]), vec![0xfa]);
        // Caps Lock on: LEDs.
        assert_eq!(m.atkbd_command(&[0xed, 0x04]), vec![0xfa, 0xfa]);
        assert_eq!(m.dev.leds(), 0x04);
        m.dev.key_event(KEY_KPENTER, true);
        m.dev.key_event(KEY_KPENTER, false);
        assert_eq!(m.kbd_bytes(), vec![0xE0, 0x1C, 0xE0, 0x9C]);
        assert_eq!(m.aux_irq.count(), 0);
    }

    #[test]
    fn psmouse_probe_and_explorer_packets() {
        let mut m = Machine::new();
        // i8042_enable_aux_port
        m.write_ctr(COMMAND_BYTE_POWER_ON & !CB_AUX_DISABLED);
        m.sync_edges();
        // psmouse_probe: GETID, then reset-and-disable.
        assert_eq!(m.psmouse_command(&[0xf2]), vec![0xfa, 0x00]);
        assert_eq!(m.psmouse_command(&[0xf6]), vec![0xfa]);
        assert_eq!(m.psmouse_command(&[0xff]), vec![0xfa, 0xaa, 0x00]);
        // intellimouse_detect
        assert_eq!(
            m.psmouse_command(&[0xf3, 200, 0xf3, 100, 0xf3, 80]),
            vec![0xfa; 6]
        );
        assert_eq!(m.psmouse_command(&[0xf2]), vec![0xfa, ID_INTELLIMOUSE]);
        // im_explorer_detect
        assert_eq!(
            m.psmouse_command(&[0xf3, 200, 0xf3, 200, 0xf3, 80]),
            vec![0xfa; 6]
        );
        assert_eq!(m.psmouse_command(&[0xf2]), vec![0xfa, ID_EXPLORER]);
        // Status request: stream mode, disabled, 1:1, resolution 2, last rate 80.
        assert_eq!(m.psmouse_command(&[0xe9]), vec![0xfa, 0x00, 0x02, 80]);
        // psmouse_initialize / activate
        assert_eq!(
            m.psmouse_command(&[0xe8, 0x03, 0xf3, 100, 0xe6, 0xf4]),
            vec![0xfa; 6]
        );
        assert!(m.dev.mouse_enabled());
        m.dev.mouse_motion(10, 5, -1, BUTTON_LEFT);
        assert_eq!(m.aux_bytes(), vec![0x09 | 0x20, 10, (-5i8) as u8, 0x0f]);
        assert_eq!(m.kbd_irq.count(), 0, "nothing on IRQ 1");
    }

    #[test]
    fn keyboard_data_goes_first_and_to_irq1() {
        let mut m = Machine::new();
        m.write_ctr(CB_KBD_INTERRUPT | CB_AUX_INTERRUPT);
        m.sync_edges();
        assert_eq!(m.psmouse_command(&[0xf4]), vec![0xfa]);
        // Both interfaces off: nothing reaches the output buffer.
        m.write_ctr(CB_KBD_INTERRUPT | CB_AUX_INTERRUPT | CB_KBD_DISABLED | CB_AUX_DISABLED);
        m.dev.mouse_motion(1, 0, 0, 0);
        m.dev.key_event(KEY_A, true);
        assert_eq!(m.status() & STATUS_OUTPUT_FULL, 0);
        assert_eq!(m.interrupts(), vec![]);
        // Both on: the keyboard byte wins, then the mouse packet.
        m.outb(0x64, 0x60);
        m.outb(0x60, CB_KBD_INTERRUPT | CB_AUX_INTERRUPT);
        assert_eq!(
            m.interrupts(),
            vec![(0x1c, false), (0x08, true), (0x01, true), (0x00, true)]
        );
        // A key arriving in the middle of a packet is preferred over the rest of it.
        m.dev.mouse_motion(2, 0, 0, 0);
        assert_eq!(m.interrupt(), Some((0x08, true)));
        m.dev.key_event(KEY_A, false);
        assert_eq!(
            m.interrupts(),
            vec![(0x02, true), (0xf0, false), (0x1c, false), (0x00, true)],
            "the byte already loaded goes first, then keyboard data"
        );
    }

    #[test]
    fn interrupt_enables_and_disable_commands() {
        let mut m = Machine::new();
        // No keyboard interrupt: data can be polled but no edge.
        m.write_ctr(0x00);
        m.sync_edges();
        m.dev.key_event(KEY_A, true);
        assert_eq!(m.status() & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        assert_eq!(m.kbd_irq.count(), m.kbd_edges_seen);
        // Enabling the interrupt with the byte waiting raises the line.
        m.write_ctr(CB_KBD_INTERRUPT);
        // write_ctr polls, so look at the line directly.
        assert!(m.kbd_irq.level());
        assert_eq!(m.inb(0x60), 0x1c);
        assert!(!m.kbd_irq.level());
        m.sync_edges();
        // 0xAD holds keys back, 0xAE lets them through.
        m.outb(0x64, 0xad);
        assert!(!m.dev.keyboard_port_enabled());
        m.dev.key_event(KEY_A, false);
        assert_eq!(m.interrupts(), vec![]);
        m.outb(0x64, 0xae);
        assert_eq!(m.kbd_bytes(), vec![0xf0, 0x1c]);
        // 0xA7/0xA8 for the mouse.
        m.write_ctr(CB_KBD_INTERRUPT | CB_AUX_INTERRUPT);
        m.sync_edges();
        assert_eq!(m.psmouse_command(&[0xf4]), vec![0xfa]);
        m.outb(0x64, 0xa7);
        m.dev.mouse_motion(0, 0, 0, BUTTON_LEFT);
        assert_eq!(m.interrupts(), vec![]);
        m.outb(0x64, 0xa8);
        assert_eq!(m.aux_bytes(), vec![0x09, 0, 0]);
        // A data byte for the keyboard re-enables its interface (QEMU behaviour).
        m.outb(0x64, 0xad);
        m.outb(0x60, 0xee);
        assert!(m.dev.keyboard_port_enabled());
        assert_eq!(m.kbd_bytes(), vec![0xee]);
    }

    #[test]
    fn scan_code_translation_follows_the_command_byte() {
        let mut m = Machine::new();
        m.write_ctr(CB_KBD_INTERRUPT | CB_TRANSLATE);
        m.sync_edges();
        assert!(m.dev.translation_enabled());
        m.dev.key_event(KEY_LEFTCTRL, true);
        m.dev.key_event(KEY_RIGHTCTRL, true);
        m.dev.key_event(KEY_RIGHTCTRL, false);
        m.dev.key_event(KEY_LEFTCTRL, false);
        assert_eq!(m.kbd_bytes(), vec![0x1D, 0xE0, 0x1D, 0xE0, 0x9D, 0x9D]);
        m.write_ctr(CB_KBD_INTERRUPT);
        m.sync_edges();
        m.dev.key_event(KEY_F1, false);
        assert_eq!(m.kbd_bytes(), vec![0xf0, 0x05]);
        // The keyboard's own set 1 is sent as is when the controller does not translate.
        assert_eq!(m.atkbd_command(&[0xf0, 0x01]), vec![0xfa, 0xfa]);
        m.dev.key_event(KEY_F1, false);
        assert_eq!(m.kbd_bytes(), vec![0xbb]);
    }

    #[test]
    fn write_output_buffer_commands_pick_the_irq() {
        let mut m = Machine::new();
        m.write_ctr(CB_KBD_INTERRUPT | CB_AUX_INTERRUPT | CB_TRANSLATE);
        m.sync_edges();
        m.outb(0x64, 0xd2);
        m.outb(0x60, 0x76);
        assert_eq!(
            m.interrupts(),
            vec![(0x76, false)],
            "0xD2 data is not translated"
        );
        m.outb(0x64, 0xd3);
        m.outb(0x60, 0x99);
        assert_eq!(m.interrupts(), vec![(0x99, true)]);
        // A later controller reply replaces one still waiting.
        m.outb(0x64, 0xd2);
        m.outb(0x60, 0x01);
        m.outb(0x64, 0xd2);
        m.outb(0x60, 0x02);
        m.outb(0x64, 0xd2);
        m.outb(0x60, 0x03);
        assert_eq!(m.interrupts(), vec![(0x01, false), (0x03, false)]);
    }

    #[test]
    fn reset_and_a20_through_the_output_port() {
        let mut m = Machine::new();
        m.outb(0x64, 0xfe);
        assert_eq!(m.control.resets(), 1);
        m.outb(0x64, 0xff);
        m.outb(0x64, 0xf1);
        assert_eq!(
            m.control.resets(),
            1,
            "pulses that leave bit 0 alone do nothing"
        );
        m.outb(0x64, 0xf0);
        assert_eq!(m.control.resets(), 2);
        // Output port: A20 off and on, as DOS extenders and old kernels do.
        m.command(&mut [0xdd, 0], 0x10d1).unwrap();
        assert!(!m.dev.a20_enabled());
        let mut param = [0u8; 2];
        m.command(&mut param, 0x01d0).unwrap();
        assert_eq!(param[0], 0xcd);
        m.outb(0x64, 0xdf);
        assert!(m.dev.a20_enabled());
        m.outb(0x64, 0xdd);
        assert!(!m.dev.a20_enabled());
        m.command(&mut [0xdf, 0], 0x10d1).unwrap();
        assert!(m.dev.a20_enabled());
        assert_eq!(m.control.resets(), 2);
        // Bit 0 low resets.
        m.command(&mut [0xde, 0], 0x10d1).unwrap();
        assert_eq!(m.control.resets(), 3);
        // The engine resets the device: back to power-on.
        m.dev.reset();
        assert_eq!(m.read_ctr(), COMMAND_BYTE_POWER_ON);
        m.command(&mut param, 0x01d0).unwrap();
        assert_eq!(param[0], OUTPUT_PORT_POWER_ON);
    }

    #[test]
    fn misc_commands_and_ram() {
        let mut m = Machine::new();
        let mut param = [0u8; 2];
        m.command(&mut [0x5a, 0], 0x1061).unwrap();
        m.command(&mut param, 0x0121).unwrap();
        assert_eq!(param[0], 0x5a);
        for (command, expected) in [
            (0x01a9, 0x00),
            (0x01ab, 0x00),
            (0x01c0, 0x80),
            (0x01e0, 0x00),
            (0x01a4, 0xf1),
        ] {
            m.command(&mut param, command).unwrap();
            assert_eq!(param[0], expected, "command {command:#x}");
        }
        // Command/data flag follows the last write.
        m.outb(0x64, 0xa8);
        assert_ne!(m.status() & STATUS_LAST_WAS_COMMAND, 0);
        m.outb(0x64, 0x60);
        m.outb(0x60, 0x03);
        assert_eq!(m.status() & STATUS_LAST_WAS_COMMAND, 0);
        // A command cancels a pending data byte: this 0xf4 goes to the keyboard.
        m.outb(0x64, 0xd4);
        m.outb(0x64, 0xa8);
        m.outb(0x60, 0xf4);
        assert_eq!(m.kbd_bytes(), vec![0xfa]);
        assert!(!m.dev.mouse().reporting_enabled());
    }

    #[test]
    fn flush_stays_within_linux_buffer_size_under_key_flood() {
        let mut m = Machine::new();
        for _ in 0..100 {
            m.dev.key_event(KEY_A, true);
            m.dev.key_event(KEY_A, false);
        }
        let count = m.flush().expect("Linux's i8042_flush must succeed");
        assert_eq!(count, I8042_BUFFER_SIZE);
    }

    #[test]
    fn save_and_restore_redrive_the_lines() {
        let mut m = Machine::new();
        m.dev.key_event(KEY_ESC, true);
        m.dev.key_event(KEY_ESC, false);
        assert!(m.kbd_irq.level());
        let saved = m.dev.state();
        let mut other = Machine::new();
        other.dev.restore(saved);
        assert!(other.kbd_irq.level());
        assert_eq!(other.kbd_irq.count(), 1);
        other.sync_edges();
        other.kbd_edges_seen -= 1;
        assert_eq!(other.kbd_bytes(), vec![0x76, 0xf0, 0x76]);
        assert_eq!(m.kbd_bytes().len(), 3, "the original is untouched");
    }

    fn assert_consistent(m: &mut Machine) {
        let status = m.status();
        if m.kbd_irq.level() {
            assert_eq!(
                status & (STATUS_OUTPUT_FULL | STATUS_AUX_DATA),
                STATUS_OUTPUT_FULL
            );
        }
        if m.aux_irq.level() {
            assert_eq!(
                status & (STATUS_OUTPUT_FULL | STATUS_AUX_DATA),
                STATUS_OUTPUT_FULL | STATUS_AUX_DATA
            );
        }
        if status & STATUS_AUX_DATA != 0 {
            assert_ne!(status & STATUS_OUTPUT_FULL, 0);
        }
        assert_eq!(
            status & (STATUS_INPUT_FULL | STATUS_TIMEOUT | STATUS_PARITY_ERROR),
            0
        );
        assert!(m.dev.keyboard().pending_len() <= KBD_QUEUE_CAPACITY + KBD_REPLY_CAPACITY);
        assert!(
            m.dev.mouse().pending_len()
                <= crate::ps2_mouse::MOUSE_QUEUE_CAPACITY + crate::ps2_mouse::MOUSE_REPLY_CAPACITY
        );
    }

    /// Drains the output buffer (bounded) and checks the controller still self-tests.
    fn assert_still_works(m: &mut Machine) {
        for _ in 0..2048 {
            if m.status() & STATUS_OUTPUT_FULL == 0 {
                break;
            }
            m.inb(0x60);
        }
        let mut param = [0u8; 2];
        m.command(&mut param, I8042_CMD_CTL_TEST).unwrap();
        assert_eq!(param[0], 0x55);
    }

    #[test]
    fn every_command_with_every_kind_of_data_byte() {
        for command in 0..=255u8 {
            for data in [0x00, 0x01, 0x55, 0xaa, 0xed, 0xf0, 0xf2, 0xf4, 0xfe, 0xff] {
                let mut m = Machine::new();
                m.outb(0x64, command);
                m.outb(0x60, data);
                m.outb(0x60, data);
                assert_consistent(&mut m);
                assert_still_works(&mut m);
            }
        }
    }

    #[test]
    fn random_register_sequences_and_input() {
        let mut m = Machine::new();
        let mut seed = 0x9e37_79b9u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for _ in 0..100_000 {
            let roll = next();
            let value = (roll >> 8) as u8;
            match roll % 8 {
                0 | 1 => {
                    let mut buf = [0u8; 3];
                    let len = 1 + (roll >> 16) as usize % 3;
                    m.dev.read(u64::from((roll >> 20) % 5), &mut buf[..len]);
                }
                2 => m.dev.write(u64::from((roll >> 20) % 5), &[value]),
                3 => m.outb(0x64, value),
                4 => m.outb(0x60, value),
                5 => m
                    .dev
                    .key_event((roll >> 16) as u16 % 260, roll & 0x100 != 0),
                6 => m.dev.mouse_motion(
                    (roll as i32) >> 10,
                    (roll as i32) >> 22,
                    (roll as i32) >> 28,
                    value,
                ),
                _ => {
                    m.inb(0x60);
                }
            }
            m.dev.write(DATA_OFFSET, &[]);
            m.dev.read(COMMAND_OFFSET, &mut []);
            assert_consistent(&mut m);
        }
        m.dev.reset();
        assert!(!m.kbd_irq.level() && !m.aux_irq.level());
        assert_still_works(&mut m);
    }
}
