//! A 16550A UART (COM1 at 0x3f8, IRQ 4), written here rather than wrapping `vm-superio`.
//!
//! Emulated: RBR/THR, IER (bits 0..3), IIR with interrupt priorities and the FIFO-enabled
//! bits 0xC0 that follow FCR bit 0, FCR (enable, clear RX/TX, receive trigger level), LCR
//! with the DLAB divisor latch, MCR (bits 0..4) with loopback, LSR (DR, OE, THRE, TEMT),
//! MSR (fixed DCD|DSR|CTS, or the MCR outputs in loopback), the scratch register, a
//! 16-byte receive FIFO (1 byte with the FIFO disabled) and a level-driven interrupt line.
//! Transmission is instantaneous: THR and the shift register are always empty again right
//! after a write, so THRE/TEMT always read 1 and a THR write re-arms the THRE interrupt
//! (the line drops and rises again, giving edge-triggered controllers a fresh edge).
//! The receive timeout is modelled as already expired: data below the FIFO trigger level
//! is reported at once as a character-timeout interrupt (IIR 0x0C).
//!
//! Not emulated: baud timing, parity/framing errors, break (so no magic SysRq), modem
//! status delta bits and the modem status interrupt, the 16750 64-byte mode, EFR and other
//! vendor extensions, DMA mode. MCR OUT2 does not gate the interrupt (as in QEMU).
//!
//! Why not `vm_superio::Serial` (0.8): it reports the FIFO bits 0xC0 in IIR whatever FCR
//! says and ignores FCR writes (no FIFO clear), clears *every* pending interrupt when IIR
//! is read (also "data available" while data is still waiting), ORs simultaneous
//! identifications into 0x06 (which means "line status"), signals interrupts as edges
//! only, and its state is not serde. Fixing that in a wrapper would mean intercepting
//! IIR, FCR, IER, RBR and the interrupt logic, i.e. most of the device, so the UART is
//! implemented directly; it follows QEMU's `serial.c` behaviour as the reference.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::irq::IrqLine;

/// Number of I/O ports the UART decodes.
pub const SERIAL_PORT_COUNT: u64 = 8;
/// Depth of the 16550A receive FIFO.
pub const RX_FIFO_CAPACITY: usize = 16;

// Register offsets.
const DATA: u64 = 0; // RBR (read) / THR (write) / DLL (DLAB)
const IER: u64 = 1; // IER / DLM (DLAB)
const IIR_FCR: u64 = 2; // IIR (read) / FCR (write)
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCRATCH: u64 = 7;

const IER_RX_DATA: u8 = 0x01;
const IER_THR_EMPTY: u8 = 0x02;
const IER_LINE_STATUS: u8 = 0x04;
const IER_VALID: u8 = 0x0f;

const IIR_NO_INTERRUPT: u8 = 0x01;
const IIR_THR_EMPTY: u8 = 0x02;
const IIR_RX_DATA: u8 = 0x04;
const IIR_LINE_STATUS: u8 = 0x06;
const IIR_RX_TIMEOUT: u8 = 0x0c;
const IIR_FIFO_ENABLED: u8 = 0xc0;

const FCR_ENABLE_FIFO: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;
const FCR_CLEAR_TX: u8 = 0x04;
/// The FCR bits a 16550A keeps: enable, DMA mode, receive trigger level.
const FCR_STORED: u8 = 0xc9;

const LCR_DLAB: u8 = 0x80;

const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOPBACK: u8 = 0x10;
const MCR_VALID: u8 = 0x1f;

const LSR_DATA_READY: u8 = 0x01;
const LSR_OVERRUN: u8 = 0x02;
const LSR_THR_EMPTY: u8 = 0x20;
const LSR_TRANSMITTER_EMPTY: u8 = 0x40;

const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

/// 115200 / 12 = 9600 baud until the guest programs the divisor.
const DEFAULT_DIVISOR: u16 = 12;

/// The UART registers and receive FIFO: everything that survives save/restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub divisor: u16,
    pub interrupt_enable: u8,
    pub fifo_control: u8,
    pub line_control: u8,
    pub modem_control: u8,
    /// Sticky error bits of LSR (only overrun is ever set), cleared by reading LSR.
    pub line_status_errors: u8,
    pub scratch: u8,
    /// A THR-empty interrupt is pending (cleared by reading it from IIR or writing THR).
    pub thr_interrupt_pending: bool,
    pub rx_fifo: VecDeque<u8>,
}

impl Default for SerialState {
    fn default() -> Self {
        Self {
            divisor: DEFAULT_DIVISOR,
            interrupt_enable: 0,
            fifo_control: 0,
            line_control: 0x03, // 8N1
            modem_control: MCR_OUT2,
            line_status_errors: 0,
            scratch: 0,
            thr_interrupt_pending: false,
            rx_fifo: VecDeque::with_capacity(RX_FIFO_CAPACITY),
        }
    }
}

impl SerialState {
    fn fifo_enabled(&self) -> bool {
        self.fifo_control & FCR_ENABLE_FIFO != 0
    }

    fn loopback(&self) -> bool {
        self.modem_control & MCR_LOOPBACK != 0
    }

    fn dlab(&self) -> bool {
        self.line_control & LCR_DLAB != 0
    }

    /// Bytes the receiver holds at most in the current mode.
    fn rx_capacity(&self) -> usize {
        if self.fifo_enabled() {
            RX_FIFO_CAPACITY
        } else {
            1
        }
    }

    fn rx_trigger_level(&self) -> usize {
        match self.fifo_control >> 6 {
            0 => 1,
            1 => 4,
            2 => 8,
            _ => 14,
        }
    }

    /// The highest-priority enabled pending interrupt, as the IIR identification bits.
    fn interrupt_id(&self) -> u8 {
        let ier = self.interrupt_enable;
        if ier & IER_LINE_STATUS != 0 && self.line_status_errors & LSR_OVERRUN != 0 {
            IIR_LINE_STATUS
        } else if ier & IER_RX_DATA != 0 && !self.rx_fifo.is_empty() {
            if self.fifo_enabled() && self.rx_fifo.len() < self.rx_trigger_level() {
                IIR_RX_TIMEOUT
            } else {
                IIR_RX_DATA
            }
        } else if ier & IER_THR_EMPTY != 0 && self.thr_interrupt_pending {
            IIR_THR_EMPTY
        } else {
            IIR_NO_INTERRUPT
        }
    }

    fn line_status(&self) -> u8 {
        let mut lsr = LSR_THR_EMPTY | LSR_TRANSMITTER_EMPTY | self.line_status_errors;
        if !self.rx_fifo.is_empty() {
            lsr |= LSR_DATA_READY;
        }
        lsr
    }

    fn modem_status(&self) -> u8 {
        if !self.loopback() {
            return MSR_DCD | MSR_DSR | MSR_CTS;
        }
        let mcr = self.modem_control;
        let mut msr = 0;
        if mcr & MCR_RTS != 0 {
            msr |= MSR_CTS;
        }
        if mcr & MCR_DTR != 0 {
            msr |= MSR_DSR;
        }
        if mcr & MCR_OUT1 != 0 {
            msr |= MSR_RI;
        }
        if mcr & MCR_OUT2 != 0 {
            msr |= MSR_DCD;
        }
        msr
    }

    /// Clamps a state that may come from a hostile or corrupt snapshot.
    fn sanitized(mut self) -> Self {
        self.interrupt_enable &= IER_VALID;
        self.fifo_control = if self.fifo_control & FCR_ENABLE_FIFO != 0 {
            self.fifo_control & FCR_STORED
        } else {
            0
        };
        self.modem_control &= MCR_VALID;
        self.line_status_errors &= LSR_OVERRUN;
        let capacity = self.rx_capacity();
        self.rx_fifo.truncate(capacity);
        self
    }
}

/// The 16550A device. Register it for [`SERIAL_PORT_COUNT`] ports.
pub struct Serial {
    state: SerialState,
    irq: Arc<dyn IrqLine>,
    line_high: bool,
    out: Box<dyn Write + Send>,
    bytes_transmitted: u64,
    output_errors: u64,
}

impl Serial {
    /// A UART in its power-on state writing the guest's output to `out`.
    pub fn new(irq: Arc<dyn IrqLine>, out: Box<dyn Write + Send>) -> Self {
        Self {
            state: SerialState::default(),
            irq,
            line_high: false,
            out,
            bytes_transmitted: 0,
            output_errors: 0,
        }
    }

    /// Queues host input for the guest. Returns how many bytes were accepted: at most the
    /// free room of the receive FIFO (16 bytes, 1 with the FIFO disabled), none while the
    /// guest has the UART in loopback mode. The caller retries the rest later (see
    /// [`Serial::rx_space`]).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if self.state.loopback() {
            return 0;
        }
        let accepted = self.rx_space().min(bytes.len());
        self.state
            .rx_fifo
            .extend(bytes.iter().take(accepted).copied());
        self.update_irq();
        accepted
    }

    /// Free room in the receive FIFO right now (0 in loopback mode).
    pub fn rx_space(&self) -> usize {
        if self.state.loopback() {
            return 0;
        }
        self.state
            .rx_capacity()
            .saturating_sub(self.state.rx_fifo.len())
    }

    /// Bytes the guest transmitted that reached the writer.
    pub fn bytes_transmitted(&self) -> u64 {
        self.bytes_transmitted
    }

    /// Bytes lost because the writer failed.
    pub fn output_errors(&self) -> u64 {
        self.output_errors
    }

    /// The registers and FIFO contents, for save/restore.
    pub fn state(&self) -> SerialState {
        self.state.clone()
    }

    /// Loads a saved state (sanitized) and drives the interrupt line to match it.
    pub fn restore(&mut self, state: SerialState) {
        self.state = state.sanitized();
        self.line_high = self.state.interrupt_id() != IIR_NO_INTERRUPT;
        self.irq.set_level(self.line_high);
    }

    /// Machine reset: power-on registers, empty FIFO, line low. Output counters are kept.
    pub fn reset(&mut self) {
        self.restore(SerialState::default());
    }

    fn update_irq(&mut self) {
        let high = self.state.interrupt_id() != IIR_NO_INTERRUPT;
        if high != self.line_high {
            self.line_high = high;
            self.irq.set_level(high);
        }
    }

    fn transmit(&mut self, byte: u8) {
        // The transmitter is busy for an instant: THRE drops, which also withdraws a
        // pending THRE interrupt, then comes back once the byte is gone.
        self.state.thr_interrupt_pending = false;
        self.update_irq();
        if self.state.loopback() {
            if self.state.rx_fifo.len() < self.state.rx_capacity() {
                self.state.rx_fifo.push_back(byte);
            } else if self.state.fifo_enabled() {
                // A full FIFO keeps its contents; the new character is lost.
                self.state.line_status_errors |= LSR_OVERRUN;
            } else {
                // Without FIFO the new character overwrites the unread one.
                self.state.rx_fifo.clear();
                self.state.rx_fifo.push_back(byte);
                self.state.line_status_errors |= LSR_OVERRUN;
            }
        } else {
            match self.out.write_all(&[byte]).and_then(|()| self.out.flush()) {
                Ok(()) => self.bytes_transmitted += 1,
                Err(e) => {
                    if self.output_errors == 0 {
                        log::warn!("serial: output failed, dropping guest output: {e}");
                    }
                    self.output_errors += 1;
                }
            }
        }
        self.state.thr_interrupt_pending = true;
        self.update_irq();
    }

    fn write_fifo_control(&mut self, value: u8) {
        let mut value = value;
        // Switching the FIFO on or off clears both FIFOs.
        if (value ^ self.state.fifo_control) & FCR_ENABLE_FIFO != 0 {
            value |= FCR_CLEAR_RX | FCR_CLEAR_TX;
        }
        if value & FCR_CLEAR_RX != 0 {
            self.state.rx_fifo.clear();
        }
        if value & FCR_CLEAR_TX != 0 {
            self.state.thr_interrupt_pending = true;
        }
        // The other bits are only programmed together with the enable bit.
        self.state.fifo_control = if value & FCR_ENABLE_FIFO != 0 {
            value & FCR_STORED
        } else {
            0
        };
    }

    fn write_interrupt_enable(&mut self, value: u8) {
        let old = self.state.interrupt_enable;
        self.state.interrupt_enable = value & IER_VALID;
        // Enabling THRE while THR is empty raises it again even if it had been
        // acknowledged (Linux's THRE test and Windows rely on it); disabling drops it.
        if (old ^ self.state.interrupt_enable) & IER_THR_EMPTY != 0 {
            self.state.thr_interrupt_pending = self.state.interrupt_enable & IER_THR_EMPTY != 0;
        }
    }

    fn read_register(&mut self, offset: u64) -> u8 {
        let state = &mut self.state;
        match offset {
            DATA if state.dlab() => state.divisor.to_le_bytes()[0],
            IER if state.dlab() => state.divisor.to_le_bytes()[1],
            DATA => state.rx_fifo.pop_front().unwrap_or(0),
            IER => state.interrupt_enable,
            IIR_FCR => {
                let id = state.interrupt_id();
                if id == IIR_THR_EMPTY {
                    state.thr_interrupt_pending = false;
                }
                let fifo_bits = if state.fifo_enabled() {
                    IIR_FIFO_ENABLED
                } else {
                    0
                };
                id | fifo_bits
            }
            LCR => state.line_control,
            MCR => state.modem_control,
            LSR => {
                let lsr = state.line_status();
                state.line_status_errors = 0;
                lsr
            }
            MSR => state.modem_status(),
            SCRATCH => state.scratch,
            _ => 0xff,
        }
    }

    fn write_register(&mut self, offset: u64, value: u8) {
        match offset {
            DATA if self.state.dlab() => {
                let [_, high] = self.state.divisor.to_le_bytes();
                self.state.divisor = u16::from_le_bytes([value, high]);
            }
            IER if self.state.dlab() => {
                let [low, _] = self.state.divisor.to_le_bytes();
                self.state.divisor = u16::from_le_bytes([low, value]);
            }
            DATA => self.transmit(value),
            IER => self.write_interrupt_enable(value),
            IIR_FCR => self.write_fifo_control(value),
            LCR => self.state.line_control = value,
            MCR => self.state.modem_control = value & MCR_VALID,
            SCRATCH => self.state.scratch = value,
            // LSR and MSR are read-only (factory test writes are ignored).
            _ => {}
        }
    }
}

impl BusDevice for Serial {
    /// Wider accesses are split into byte accesses at consecutive registers, as the ISA
    /// bus does for an 8-bit device.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (index, byte) in data.iter_mut().enumerate() {
            *byte = match offset.checked_add(index as u64) {
                Some(register) => self.read_register(register),
                None => 0xff,
            };
        }
        self.update_irq();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (index, &byte) in data.iter().enumerate() {
            if let Some(register) = offset.checked_add(index as u64) {
                self.write_register(register, byte);
            }
        }
        self.update_irq();
    }
}

/// Where the guest's serial output goes, parsed from the CLI/config value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    /// The engine's standard output.
    Stdio,
    /// Dropped.
    Discard,
    /// A file, created or truncated when opened.
    File(PathBuf),
}

/// Errors building a serial output writer.
#[derive(Debug, thiserror::Error)]
pub enum SerialOutputError {
    #[error("cannot open serial output file {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl SerialOutput {
    /// `None`, `""`, `"none"` or `"null"` discard; `"stdio"` is standard output;
    /// `"file:PATH"` or any other value is a file path (use `./none` for a file so named).
    pub fn parse(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            None | Some("") | Some("none") | Some("null") => Self::Discard,
            Some("stdio") => Self::Stdio,
            Some(other) => Self::File(PathBuf::from(other.strip_prefix("file:").unwrap_or(other))),
        }
    }

    /// Opens the writer to hand to [`Serial::new`] (or `DebugCon::new`).
    pub fn open(&self) -> Result<Box<dyn Write + Send>, SerialOutputError> {
        match self {
            Self::Stdio => Ok(Box::new(io::stdout())),
            Self::Discard => Ok(Box::new(io::sink())),
            Self::File(path) => match std::fs::File::create(path) {
                Ok(file) => Ok(Box::new(file)),
                Err(source) => Err(SerialOutputError::Open {
                    path: path.clone(),
                    source,
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::CountingIrq;

    /// An in-memory writer the test keeps a handle to.
    use crate::test_support::SharedBuffer;

    struct BrokenPipe;
    impl Write for BrokenPipe {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    fn uart() -> (Serial, Arc<CountingIrq>, SharedBuffer) {
        let irq = CountingIrq::new();
        let out = SharedBuffer::default();
        let serial = Serial::new(irq.clone(), Box::new(out.clone()));
        (serial, irq, out)
    }

    fn inb(dev: &mut Serial, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    fn outb(dev: &mut Serial, offset: u64, value: u8) {
        dev.write(offset, &[value]);
    }

    #[test]
    fn linux_8250_autoconfig_sees_a_16550a() {
        let (mut s, _irq, out) = uart();
        // Scratch register test (autoconfig_8250 style).
        outb(&mut s, SCRATCH, 0xa5);
        assert_eq!(inb(&mut s, SCRATCH), 0xa5);
        outb(&mut s, SCRATCH, 0x5a);
        assert_eq!(inb(&mut s, SCRATCH), 0x5a);

        // IER existence test.
        let saved_ier = inb(&mut s, IER);
        outb(&mut s, IER, 0);
        assert_eq!(inb(&mut s, IER) & 0x0f, 0);
        outb(&mut s, IER, 0x0f);
        assert_eq!(inb(&mut s, IER) & 0x0f, 0x0f);
        outb(&mut s, IER, saved_ier);

        // Loopback test: MCR = LOOP | OUT2 | RTS -> MSR status = DCD | CTS.
        let saved_mcr = inb(&mut s, MCR);
        let saved_lcr = inb(&mut s, LCR);
        outb(&mut s, MCR, 0x10 | 0x0a);
        assert_eq!(inb(&mut s, MSR) & 0xf0, 0x90);
        outb(&mut s, MCR, saved_mcr);
        assert_eq!(inb(&mut s, MSR) & 0xf0, 0xb0, "lines back to DCD|DSR|CTS");

        // EFR clear (LCR 0xbf: offset 2 is FCR for us), then enable FIFO.
        outb(&mut s, LCR, 0xbf);
        outb(&mut s, IIR_FCR, 0);
        outb(&mut s, LCR, 0);
        assert_eq!(
            inb(&mut s, IIR_FCR) >> 6,
            0,
            "FIFO bits clear while disabled"
        );
        outb(&mut s, IIR_FCR, FCR_ENABLE_FIFO);
        assert_eq!(inb(&mut s, IIR_FCR) >> 6, 3, "16550A");

        // autoconfig_16550a: EFR probes read IIR, which must be non-zero.
        outb(&mut s, LCR, 0x80);
        assert_ne!(inb(&mut s, IIR_FCR), 0);
        outb(&mut s, LCR, 0xbf);
        assert_ne!(inb(&mut s, IIR_FCR), 0);
        // 16750 test: bit 5 must never show.
        outb(&mut s, LCR, 0);
        outb(&mut s, IIR_FCR, FCR_ENABLE_FIFO | 0x20);
        let status1 = inb(&mut s, IIR_FCR) & 0xe0;
        outb(&mut s, IIR_FCR, 0);
        outb(&mut s, LCR, 0x80);
        outb(&mut s, IIR_FCR, FCR_ENABLE_FIFO | 0x20);
        let status2 = inb(&mut s, IIR_FCR) & 0xe0;
        outb(&mut s, IIR_FCR, 0);
        outb(&mut s, LCR, 0);
        assert_eq!((status1, status2), (0xc0, 0xc0), "not a 16750");
        // IER UUE bit (XScale) does not stick.
        outb(&mut s, IER, 0x40);
        assert_eq!(inb(&mut s, IER) & 0x40, 0);
        outb(&mut s, IER, 0);

        // Divisor latch: 115200 baud.
        outb(&mut s, LCR, LCR_DLAB | 0x03);
        outb(&mut s, DATA, 0x01);
        outb(&mut s, IER, 0x00);
        assert_eq!((inb(&mut s, DATA), inb(&mut s, IER)), (0x01, 0x00));
        outb(&mut s, LCR, 0x03);
        assert_eq!(s.state().divisor, 1);
        assert_eq!(inb(&mut s, IER), 0, "IER is visible again without DLAB");
        outb(&mut s, LCR, saved_lcr);
        assert!(out.contents().is_empty(), "divisor writes are not output");
    }

    #[test]
    fn seabios_detection_sees_a_thre_interrupt() {
        let (mut s, irq, _out) = uart();
        outb(&mut s, IER, 0x02);
        assert_eq!(inb(&mut s, IER), 0x02);
        assert_eq!(inb(&mut s, IIR_FCR) & 0x3f, 0x02);
        outb(&mut s, IER, 0);
        assert!(!irq.level());
    }

    #[test]
    fn thr_writes_reach_the_writer() {
        let (mut s, _irq, out) = uart();
        for &b in b"Hello, world\r\n" {
            assert_eq!(inb(&mut s, LSR) & 0x60, 0x60, "ready to send");
            outb(&mut s, DATA, b);
        }
        assert_eq!(out.contents(), b"Hello, world\r\n");
        assert_eq!(s.bytes_transmitted(), 14);
        assert_eq!(s.output_errors(), 0);
    }

    #[test]
    fn thre_interrupt_is_a_level_cleared_by_iir_and_rearmed() {
        let (mut s, irq, _out) = uart();
        outb(&mut s, IIR_FCR, FCR_ENABLE_FIFO);
        outb(&mut s, IER, IER_THR_EMPTY);
        assert!(irq.level());
        assert_eq!(irq.count(), 1);
        assert_eq!(inb(&mut s, IIR_FCR), 0xc2);
        assert!(!irq.level(), "reading IIR acknowledges THRE");
        assert_eq!(inb(&mut s, IIR_FCR), 0xc1);

        // Each THR write gives a fresh edge once the byte is sent.
        outb(&mut s, DATA, b'x');
        assert!(irq.level());
        assert_eq!(irq.count(), 2);
        outb(&mut s, DATA, b'y');
        assert_eq!(
            irq.count(),
            3,
            "write drops THRE, completion raises it again"
        );

        // Linux's THRE test: IER=THRI, IIR, IER=0, IER=THRI, IIR must show THRE again.
        outb(&mut s, IER, 0);
        assert!(!irq.level());
        outb(&mut s, IER, IER_THR_EMPTY);
        assert_eq!(inb(&mut s, IIR_FCR) & 0x0f, IIR_THR_EMPTY);
        outb(&mut s, IER, 0);
        outb(&mut s, IER, IER_THR_EMPTY);
        assert_eq!(inb(&mut s, IIR_FCR) & 0x0f, IIR_THR_EMPTY);
        // Rewriting the same IER value does not re-arm it.
        outb(&mut s, IER, IER_THR_EMPTY);
        assert_eq!(inb(&mut s, IIR_FCR) & 0x0f, IIR_NO_INTERRUPT);
        assert!(!irq.level());
    }

    #[test]
    fn receive_without_fifo_holds_one_byte() {
        let (mut s, irq, _out) = uart();
        outb(&mut s, IER, IER_RX_DATA);
        assert!(!irq.level());
        assert_eq!(s.enqueue_input(b"abc"), 1);
        assert!(irq.level());
        assert_eq!(inb(&mut s, IIR_FCR), IIR_RX_DATA);
        assert_eq!(
            inb(&mut s, IIR_FCR),
            IIR_RX_DATA,
            "IIR read does not ack data"
        );
        assert_eq!(inb(&mut s, LSR) & LSR_DATA_READY, 1);
        assert_eq!(inb(&mut s, DATA), b'a');
        assert!(!irq.level());
        assert_eq!(inb(&mut s, LSR) & LSR_DATA_READY, 0);
        assert_eq!(inb(&mut s, IIR_FCR), IIR_NO_INTERRUPT);
        assert_eq!(s.enqueue_input(b"bc"), 1);
        assert_eq!(irq.count(), 2);
    }

    #[test]
    fn receive_fifo_is_bounded_and_ordered() {
        let (mut s, irq, _out) = uart();
        outb(&mut s, IIR_FCR, FCR_ENABLE_FIFO | 0x80); // trigger level 8
        outb(&mut s, IER, IER_RX_DATA);
        let input: Vec<u8> = (0..40).collect();
        assert_eq!(s.enqueue_input(&input[..3]), 3);
        assert!(irq.level());
        assert_eq!(inb(&mut s, IIR_FCR), 0xcc, "below trigger level: timeout");
        assert_eq!(s.enqueue_input(&input[3..]), RX_FIFO_CAPACITY - 3);
        assert_eq!(s.rx_space(), 0);
        assert_eq!(s.enqueue_input(&input[16..]), 0);
        assert_eq!(
            inb(&mut s, IIR_FCR),
            0xc4,
            "at trigger level: data available"
        );
        for expected in 0..16u8 {
            assert_eq!(inb(&mut s, LSR) & LSR_DATA_READY, 1);
            assert_eq!(inb(&mut s, DATA), expected);
        }
        assert_eq!(inb(&mut s, LSR) & LSR_DATA_READY, 0);
        assert!(!irq.level());
        assert_eq!(inb(&mut s, IIR_FCR), 0xc1);
        assert_eq!(inb(&mut s, DATA), 0, "empty RBR reads 0");

        // FCR clear-RX drops pending input and the interrupt with it.
        assert_eq!(s.enqueue_input(b"zz"), 2);
        assert!(irq.level());
        outb(&mut s, IIR_FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RX);
        assert!(!irq.level());
        assert_eq!(inb(&mut s, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn polled_receive_works_with_interrupts_disabled() {
        let (mut s, irq, _out) = uart();
        outb(&mut s, IIR_FCR, FCR_ENABLE_FIFO);
        assert_eq!(s.enqueue_input(b"ok"), 2);
        assert!(!irq.level());
        assert_eq!(inb(&mut s, LSR) & LSR_DATA_READY, 1);
        assert_eq!([inb(&mut s, DATA), inb(&mut s, DATA)], *b"ok");
        assert_eq!(irq.count(), 0);
    }

    /// A Linux-like interrupt handler draining input the host keeps retrying.
    #[test]
    fn host_retries_until_guest_has_read_everything() {
        let (mut s, irq, _out) = uart();
        outb(&mut s, IIR_FCR, FCR_ENABLE_FIFO | 0x80);
        outb(&mut s, MCR, MCR_OUT2 | MCR_RTS | MCR_DTR);
        outb(&mut s, IER, IER_RX_DATA | IER_LINE_STATUS);
        let input: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).collect();
        let mut sent = 0;
        let mut received = Vec::new();
        for _ in 0..100 {
            sent += s.enqueue_input(&input[sent..]);
            if irq.level() {
                let iir = inb(&mut s, IIR_FCR);
                assert_eq!(iir & 1, 0);
                for _ in 0..256 {
                    if inb(&mut s, LSR) & LSR_DATA_READY == 0 {
                        break;
                    }
                    received.push(inb(&mut s, DATA));
                }
                assert!(!irq.level());
            }
            if received.len() == input.len() {
                break;
            }
        }
        assert_eq!(received, input);
    }

    #[test]
    fn loopback_feeds_the_receiver_and_reports_overrun() {
        let (mut s, irq, out) = uart();
        outb(&mut s, IIR_FCR, FCR_ENABLE_FIFO);
        outb(&mut s, MCR, MCR_LOOPBACK);
        assert_eq!(
            s.enqueue_input(b"host"),
            0,
            "input pin disconnected in loopback"
        );
        for b in 0..16u8 {
            outb(&mut s, DATA, b);
        }
        assert!(out.contents().is_empty());
        outb(&mut s, IER, IER_LINE_STATUS);
        assert!(!irq.level());
        outb(&mut s, DATA, 0xee);
        assert!(irq.level(), "overrun raises the line status interrupt");
        assert_eq!(inb(&mut s, IIR_FCR), 0xc6);
        assert_eq!(inb(&mut s, LSR) & (LSR_OVERRUN | LSR_DATA_READY), 0x03);
        assert_eq!(inb(&mut s, LSR) & LSR_OVERRUN, 0, "LSR read clears OE");
        assert!(!irq.level());
        for b in 0..16u8 {
            assert_eq!(inb(&mut s, DATA), b);
        }
        outb(&mut s, MCR, MCR_OUT2);
        outb(&mut s, DATA, b'!');
        assert_eq!(out.contents(), b"!");
    }

    #[test]
    fn failing_writer_is_counted_not_fatal() {
        let irq = CountingIrq::new();
        let mut s = Serial::new(irq.clone(), Box::new(BrokenPipe));
        outb(&mut s, IER, IER_THR_EMPTY);
        for b in 0..100u8 {
            outb(&mut s, DATA, b);
        }
        assert_eq!(s.output_errors(), 100);
        assert_eq!(s.bytes_transmitted(), 0);
        assert_eq!(inb(&mut s, LSR) & 0x60, 0x60);
        assert_eq!(inb(&mut s, IIR_FCR), IIR_THR_EMPTY);
    }

    #[test]
    fn wide_accesses_are_split_into_bytes() {
        let (mut s, _irq, out) = uart();
        s.write(DATA, &[b'h', IER_THR_EMPTY]);
        assert_eq!(out.contents(), b"h");
        assert_eq!(inb(&mut s, IER), IER_THR_EMPTY);
        let mut two = [0u8; 2];
        s.read(LSR, &mut two);
        assert_eq!(two, [0x60, 0xb0]);
        s.write(SCRATCH, &[0x42, 1, 2, 3]);
        assert_eq!(inb(&mut s, SCRATCH), 0x42);
        let mut four = [0u8; 4];
        s.read(SCRATCH, &mut four);
        assert_eq!(four, [0x42, 0xff, 0xff, 0xff]);
        s.write(u64::MAX, &[1, 2]);
        s.read(u64::MAX, &mut two);
        assert_eq!(two, [0xff, 0xff]);
    }

    #[test]
    fn state_round_trips_and_hostile_state_is_clamped() {
        let (mut s, irq, _out) = uart();
        outb(&mut s, IIR_FCR, FCR_ENABLE_FIFO);
        outb(&mut s, IER, IER_RX_DATA);
        s.enqueue_input(b"saved");
        let saved = s.state();

        let irq2 = CountingIrq::new();
        let mut restored = Serial::new(irq2.clone(), Box::new(io::sink()));
        restored.restore(saved.clone());
        assert_eq!(restored.state(), saved);
        assert!(
            irq2.level(),
            "pending data interrupt is driven after restore"
        );
        assert_eq!(inb(&mut restored, DATA), b's');

        let hostile = SerialState {
            interrupt_enable: 0xff,
            fifo_control: 0xfe,
            modem_control: 0xff,
            line_status_errors: 0xff,
            rx_fifo: (0..=255).collect(),
            ..SerialState::default()
        };
        s.restore(hostile);
        let clamped = s.state();
        assert_eq!(clamped.interrupt_enable, 0x0f);
        assert_eq!(clamped.fifo_control, 0, "FIFO off: other bits not kept");
        assert_eq!(clamped.modem_control, 0x1f);
        assert_eq!(clamped.line_status_errors, LSR_OVERRUN);
        assert_eq!(clamped.rx_fifo.len(), 1);

        s.reset();
        assert_eq!(s.state(), SerialState::default());
        assert!(!irq.level());
    }

    #[test]
    fn hostile_register_traffic_keeps_invariants() {
        let (mut s, irq, _out) = uart();
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200_000 {
            let r = next();
            let offset = (r >> 8) % 10;
            let len = 1 + ((r >> 16) % 4) as usize;
            match r % 5 {
                0 | 1 => {
                    let mut buf = [0u8; 4];
                    s.read(offset, &mut buf[..len]);
                }
                2 | 3 => {
                    let bytes = (r >> 24).to_le_bytes();
                    s.write(offset, &bytes[..len]);
                }
                _ => {
                    let bytes = (r >> 32).to_le_bytes();
                    let accepted = s.enqueue_input(&bytes[..len]);
                    assert!(accepted <= len);
                }
            }
            let st = s.state();
            assert!(st.rx_fifo.len() <= st.rx_capacity());
            assert_eq!(st.interrupt_enable & !IER_VALID, 0);
            assert_eq!(
                irq.level(),
                st.interrupt_id() != IIR_NO_INTERRUPT,
                "line level follows the pending interrupt"
            );
        }
        assert!(irq.count() > 0, "the traffic did raise interrupts");
    }

    #[test]
    fn serial_output_parsing_and_opening() {
        assert_eq!(SerialOutput::parse(Some("stdio")), SerialOutput::Stdio);
        assert_eq!(SerialOutput::parse(Some("none")), SerialOutput::Discard);
        assert_eq!(SerialOutput::parse(Some("null")), SerialOutput::Discard);
        assert_eq!(SerialOutput::parse(None), SerialOutput::Discard);
        assert_eq!(
            SerialOutput::parse(Some("file:/tmp/x.log")),
            SerialOutput::File(PathBuf::from("/tmp/x.log"))
        );
        assert_eq!(
            SerialOutput::parse(Some("console.log")),
            SerialOutput::File(PathBuf::from("console.log"))
        );
        assert!(SerialOutput::Discard.open().is_ok());

        let path =
            std::env::temp_dir().join(format!("deskvm-serial-test-{}.log", std::process::id()));
        std::fs::write(&path, b"old contents that must go").unwrap();
        {
            let mut writer = SerialOutput::File(path.clone()).open().unwrap();
            writer.write_all(b"boot\n").unwrap();
            writer.flush().unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"boot\n");
        let _ = std::fs::remove_file(&path);

        let bad = path.join("no/such/dir/out.log");
        let err = match SerialOutput::File(bad.clone()).open() {
            Ok(_) => panic!("opening under a missing directory must fail"),
            Err(e) => e,
        };
        assert!(err.to_string().contains(&bad.display().to_string()));
        assert!(matches!(err, SerialOutputError::Open { ref path, .. } if *path == bad));
    }
}
