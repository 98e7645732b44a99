//! Intel 82371SB (PIIX3) USB UHCI host controller, PCI 00:01.2 (8086:7020, class 0x0c0300).
//!
//! Emulated: the 32-byte I/O register block behind BAR4 (USBCMD with run/stop, host
//! controller reset, global reset, global suspend / force resume, software debug mode
//! (one TD per run), configure flag and max packet bit; USBSTS with write-1-to-clear bits
//! and a halted bit that follows run/stop; USBINTR; FRNUM; FLBASEADD; SOFMOD; PORTSC1/2
//! with connect / enable change bits, reset, resume detect, suspend, line status and
//! low-speed attach), byte / word / dword access to all of them, the legacy support
//! register USBLEGSUP (config 0xc0) and SBRN (0x60), INTx pin D (as the PIIX3) with the command register's
//! INTx disable and the status interrupt bit. While running, one 1 ms frame per timer
//! callback ([`Timed`]): FRNUM counts, the frame list entry is read from guest RAM and the
//! QH / TD schedule is walked (depth / breadth first, terminate bits, queue advance, NAK
//! retry, error counter, short packet detect stopping a queue, IOC, stall / babble /
//! timeout / data buffer errors). Two root ports take any [`UsbDevice`]; a TD reaches the
//! device whose address matches on an enabled, not suspended port, otherwise it times out.
//!
//! Hostile schedules are bounded: at most [`MAX_ELEMENTS_PER_FRAME`] QHs / TDs and
//! [`MAX_BYTES_PER_FRAME`] bytes per frame (a looping schedule just ends the frame), at
//! most [`MAX_CATCH_UP_FRAMES`] frames per late timer callback (the rest are skipped);
//! schedule pointers outside RAM raise host system error and halt, data buffers outside
//! RAM fail the TD with a data buffer error, TD lengths above [`MAX_TD_LENGTH`] babble,
//! an invalid PID raises host controller process error and halts.
//!
//! Not emulated: isochronous timing (an isochronous TD is run like any other), data toggle
//! and low-speed checks, bandwidth reclamation timing and the SOF length (SOFMOD is
//! storage), legacy keyboard emulation and SMI (USBLEGSUP is storage; interrupts go to INTx
//! whatever its PIRQ enable bit says, like QEMU), the debug mode's single stepping within
//! a frame beyond stopping after one TD.

use crate::clock::{Clock, Timed};
use crate::irq::IrqLine;
use crate::pci::{PciConfigSpace, PciFunction};
use crate::usb::{PacketResult, Pid, UsbDevice, UsbError, UsbSpeed};
use crate::GuestMemory;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

pub const VENDOR_INTEL: u16 = 0x8086;
pub const DEVICE_82371SB_UHCI: u16 = 0x7020;
/// Serial bus / USB / UHCI.
pub const CLASS_USB_UHCI: u32 = 0x0c_03_00;
/// The BAR holding the I/O registers.
pub const UHCI_BAR: usize = 4;
pub const UHCI_IO_SIZE: u64 = 32;
/// Serial bus release number (USB 1.0 / 1.1 = 0x10).
pub const REG_SBRN: usize = 0x60;
/// Legacy support register.
pub const REG_USBLEGSUP: usize = 0xc0;
pub const USBLEGSUP_DEFAULT: u16 = 0x2000;
pub const NUM_PORTS: usize = 2;

/// One frame.
pub const FRAME_NS: u64 = 1_000_000;
/// Frames run by one late timer callback; the rest are skipped.
pub const MAX_CATCH_UP_FRAMES: u64 = 8;
/// QHs and TDs visited per frame at most.
pub const MAX_ELEMENTS_PER_FRAME: usize = 1024;
/// Data bytes moved per frame at most (a full-speed frame carries about 1500).
pub const MAX_BYTES_PER_FRAME: usize = 8 * 1024;
/// Longest TD the spec allows (MaxLen 0x4ff).
pub const MAX_TD_LENGTH: usize = 1280;

// I/O register offsets.
pub const USBCMD: u64 = 0x00;
pub const USBSTS: u64 = 0x02;
pub const USBINTR: u64 = 0x04;
pub const FRNUM: u64 = 0x06;
pub const FLBASEADD: u64 = 0x08;
pub const SOFMOD: u64 = 0x0c;
pub const PORTSC1: u64 = 0x10;

pub const CMD_RS: u16 = 1 << 0;
pub const CMD_HCRESET: u16 = 1 << 1;
pub const CMD_GRESET: u16 = 1 << 2;
pub const CMD_EGSM: u16 = 1 << 3;
pub const CMD_FGR: u16 = 1 << 4;
pub const CMD_SWDBG: u16 = 1 << 5;
pub const CMD_CF: u16 = 1 << 6;
pub const CMD_MAXP: u16 = 1 << 7;

pub const STS_USBINT: u16 = 1 << 0;
pub const STS_ERROR: u16 = 1 << 1;
pub const STS_RESUME: u16 = 1 << 2;
pub const STS_HSE: u16 = 1 << 3;
pub const STS_HCPE: u16 = 1 << 4;
pub const STS_HCH: u16 = 1 << 5;
const STS_WRITE_ONE_TO_CLEAR: u16 = STS_USBINT | STS_ERROR | STS_RESUME | STS_HSE | STS_HCPE;

pub const INTR_TIMEOUT_CRC: u16 = 1 << 0;
pub const INTR_RESUME: u16 = 1 << 1;
pub const INTR_IOC: u16 = 1 << 2;
pub const INTR_SPD: u16 = 1 << 3;

pub const PORT_CCS: u16 = 1 << 0;
pub const PORT_CSC: u16 = 1 << 1;
pub const PORT_PE: u16 = 1 << 2;
pub const PORT_PEC: u16 = 1 << 3;
/// Line status D+ (a full-speed device idles with D+ high).
pub const PORT_LINE_DPLUS: u16 = 1 << 4;
/// Line status D- (a low-speed device idles with D- high).
pub const PORT_LINE_DMINUS: u16 = 1 << 5;
pub const PORT_RD: u16 = 1 << 6;
/// Reserved, always reads 1 (Linux counts ports by it).
pub const PORT_ALWAYS_ONE: u16 = 1 << 7;
pub const PORT_LSDA: u16 = 1 << 8;
pub const PORT_PR: u16 = 1 << 9;
pub const PORT_SUSP: u16 = 1 << 12;
const PORT_WRITE_ONE_TO_CLEAR: u16 = PORT_CSC | PORT_PEC;
const PORT_READ_WRITE: u16 = PORT_PE | PORT_RD | PORT_PR | PORT_SUSP;

// Link pointers.
pub const LINK_TERMINATE: u32 = 1 << 0;
pub const LINK_QH: u32 = 1 << 1;
pub const LINK_DEPTH_FIRST: u32 = 1 << 2;
const LINK_ADDRESS_MASK: u32 = !0xf;

// TD control / status dword.
pub const TD_ACTLEN_MASK: u32 = 0x7ff;
pub const TD_STATUS_BITSTUFF: u32 = 1 << 17;
pub const TD_STATUS_CRC_TIMEOUT: u32 = 1 << 18;
pub const TD_STATUS_NAK: u32 = 1 << 19;
pub const TD_STATUS_BABBLE: u32 = 1 << 20;
pub const TD_STATUS_DATA_BUFFER: u32 = 1 << 21;
pub const TD_STATUS_STALLED: u32 = 1 << 22;
pub const TD_STATUS_ACTIVE: u32 = 1 << 23;
pub const TD_IOC: u32 = 1 << 24;
pub const TD_ISO: u32 = 1 << 25;
pub const TD_LOW_SPEED: u32 = 1 << 26;
pub const TD_CERR_SHIFT: u32 = 27;
pub const TD_CERR_MASK: u32 = 3 << TD_CERR_SHIFT;
pub const TD_SPD: u32 = 1 << 29;
const TD_STATUS_ERRORS: u32 = TD_STATUS_BITSTUFF
    | TD_STATUS_CRC_TIMEOUT
    | TD_STATUS_NAK
    | TD_STATUS_BABBLE
    | TD_STATUS_DATA_BUFFER
    | TD_STATUS_STALLED;
/// TD token MaxLen field value meaning a zero-length packet.
pub const TD_MAXLEN_ZERO: u32 = 0x7ff;

/// The I/O registers (save/restore state; the ports' devices are re-attached by the
/// engine).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UhciRegisters {
    pub command: u16,
    /// Without the halted bit, which follows run/stop.
    pub status: u16,
    pub interrupt_enable: u16,
    pub frame_number: u16,
    pub frame_list_base: u32,
    pub sof_modify: u8,
    pub ports: [u16; NUM_PORTS],
    /// IOC / short packet completions behind USBINT, to gate them by USBINTR.
    pub ioc_pending: bool,
    pub short_packet_pending: bool,
}

impl Default for UhciRegisters {
    fn default() -> Self {
        Self {
            command: 0,
            status: 0,
            interrupt_enable: 0,
            frame_number: 0,
            frame_list_base: 0,
            sof_modify: 64,
            ports: [PORT_ALWAYS_ONE; NUM_PORTS],
            ioc_pending: false,
            short_packet_pending: false,
        }
    }
}

/// Registers by (offset, width in bytes).
const REGISTERS: [(u64, u64); 8] = [
    (USBCMD, 2),
    (USBSTS, 2),
    (USBINTR, 2),
    (FRNUM, 2),
    (FLBASEADD, 4),
    (SOFMOD, 1),
    (PORTSC1, 2),
    (PORTSC1 + 2, 2),
];

/// A transfer descriptor as read from guest RAM.
#[derive(Clone, Copy, Debug)]
struct TransferDescriptor {
    link: u32,
    control: u32,
    token: u32,
    buffer: u32,
}

/// What executing one TD did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TdOutcome {
    /// Transferred; `stop_queue` for a short packet with SPD set.
    Completed { stop_queue: bool },
    /// The device NAKed or an error left the TD active for a retry.
    Retry,
    /// The TD was retired with an error.
    Failed,
    /// The frame's byte budget is used up; the TD was not touched.
    Deferred,
    /// The controller halted (process error).
    Halted,
}

/// The PIIX3 UHCI function.
pub struct Uhci {
    config: PciConfigSpace,
    regs: UhciRegisters,
    ports: [Option<Box<dyn UsbDevice>>; NUM_PORTS],
    memory: GuestMemory,
    irq: Arc<dyn IrqLine>,
    irq_level: bool,
    clock: Arc<dyn Clock>,
    next_frame_ns: u64,
    bytes_this_frame: usize,
}

impl Uhci {
    /// `irq` is the INTx line the engine routed (PIRQ of slot 1, pin D); `memory` is guest
    /// RAM for the schedule; `clock` times the frames.
    pub fn new(irq: Arc<dyn IrqLine>, clock: Arc<dyn Clock>, memory: GuestMemory) -> Self {
        let mut config = PciConfigSpace::new();
        config.set_ids(VENDOR_INTEL, DEVICE_82371SB_UHCI);
        config.set_class(CLASS_USB_UHCI);
        config.set_revision(0x01);
        config.set_interrupt_pin(4);
        config.add_io_bar(UHCI_BAR, UHCI_IO_SIZE);
        config.set_u8(REG_SBRN, 0x10);
        config.set_u16(REG_USBLEGSUP, USBLEGSUP_DEFAULT);
        // Bits 7:0 trap / SMI enables and 13 PIRQ enable are read/write; 11:8 trap status
        // and 15 A20 pass-through status are write-1-to-clear.
        config.set_writable(REG_USBLEGSUP, &[0xff, 0x20]);
        config.set_write_one_to_clear(REG_USBLEGSUP, &[0x00, 0x8f]);
        Self {
            config,
            regs: UhciRegisters::default(),
            ports: [None, None],
            memory,
            irq,
            irq_level: false,
            clock,
            next_frame_ns: 0,
            bytes_this_frame: 0,
        }
    }

    /// Plugs `device` into root port `port` (0 or 1): connect status change, and resume
    /// detect if the bus is globally suspended.
    pub fn attach(&mut self, port: usize, mut device: Box<dyn UsbDevice>) -> Result<(), UsbError> {
        let slot = self.ports.get_mut(port).ok_or(UsbError::NoSuchPort {
            port,
            ports: NUM_PORTS,
        })?;
        if slot.is_some() {
            return Err(UsbError::PortInUse { port });
        }
        device.reset();
        let low_speed = device.speed() == UsbSpeed::Low;
        *slot = Some(device);
        let status = PORT_ALWAYS_ONE | PORT_CCS | PORT_CSC | if low_speed { PORT_LSDA } else { 0 };
        if let Some(sc) = self.regs.ports.get_mut(port) {
            *sc = status;
        }
        if self.regs.command & CMD_EGSM != 0 {
            self.signal_resume();
        }
        self.update_irq();
        Ok(())
    }

    /// Unplugs the device of root port `port`; the port is disabled (enable change) and
    /// reports the connect status change.
    pub fn detach(&mut self, port: usize) -> Option<Box<dyn UsbDevice>> {
        let device = self.ports.get_mut(port)?.take()?;
        if let Some(sc) = self.regs.ports.get_mut(port) {
            let was_enabled = *sc & PORT_PE != 0;
            *sc = PORT_ALWAYS_ONE
                | PORT_CSC
                | (*sc & PORT_PEC)
                | if was_enabled { PORT_PEC } else { 0 };
        }
        self.update_irq();
        Some(device)
    }

    /// The device on `port`, if any.
    pub fn device(&self, port: usize) -> Option<&dyn UsbDevice> {
        self.ports.get(port)?.as_deref()
    }

    /// The controller executes frames (run/stop set).
    pub fn is_running(&self) -> bool {
        self.regs.command & CMD_RS != 0
    }

    pub fn registers(&self) -> UhciRegisters {
        self.regs
    }

    /// Restores registers saved with [`Self::registers`] (devices are attached apart).
    pub fn restore_registers(&mut self, regs: UhciRegisters) {
        self.regs = regs;
        self.regs.frame_number &= 0x7ff;
        self.regs.frame_list_base &= !0xfff;
        self.next_frame_ns = self.clock.monotonic_ns().saturating_add(FRAME_NS);
        self.update_irq();
    }

    // ---- registers ----

    fn status_register(&self) -> u16 {
        let halted = if self.is_running() { 0 } else { STS_HCH };
        self.regs.status | halted
    }

    fn port_register(&self, port: usize) -> u16 {
        let Some(&sc) = self.regs.ports.get(port) else {
            return 0;
        };
        let mut value = sc | PORT_ALWAYS_ONE;
        // Line status: idle J state unless in reset (SE0) or disconnected.
        if sc & PORT_CCS != 0 && sc & PORT_PR == 0 {
            value |= if sc & PORT_LSDA != 0 {
                PORT_LINE_DMINUS
            } else {
                PORT_LINE_DPLUS
            };
        }
        value
    }

    fn register_file(&self) -> [u8; UHCI_IO_SIZE as usize] {
        let mut bytes = [0u8; UHCI_IO_SIZE as usize];
        let mut put = |offset: usize, data: &[u8]| {
            if let Some(dst) = bytes.get_mut(offset..offset + data.len()) {
                dst.copy_from_slice(data);
            }
        };
        put(USBCMD as usize, &self.regs.command.to_le_bytes());
        put(USBSTS as usize, &self.status_register().to_le_bytes());
        put(USBINTR as usize, &self.regs.interrupt_enable.to_le_bytes());
        put(FRNUM as usize, &self.regs.frame_number.to_le_bytes());
        put(FLBASEADD as usize, &self.regs.frame_list_base.to_le_bytes());
        put(SOFMOD as usize, &[self.regs.sof_modify]);
        for port in 0..NUM_PORTS {
            put(
                PORTSC1 as usize + 2 * port,
                &self.port_register(port).to_le_bytes(),
            );
        }
        bytes
    }

    fn io_read(&self, offset: u64, data: &mut [u8]) {
        let file = self.register_file();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| file.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn io_write(&mut self, offset: u64, data: &[u8]) {
        for (reg, width) in REGISTERS {
            let mut value = 0u32;
            let mut mask = 0u32;
            for (i, &byte) in data.iter().enumerate() {
                let Some(address) = offset.checked_add(i as u64) else {
                    continue;
                };
                if address >= reg && address < reg + width {
                    let shift = (address - reg) * 8;
                    value |= u32::from(byte) << shift;
                    mask |= 0xff << shift;
                }
            }
            if mask != 0 {
                self.write_register(reg, value, mask);
            }
        }
        self.update_irq();
    }

    fn write_register(&mut self, reg: u64, value: u32, mask: u32) {
        let merge16 = |old: u16| ((u32::from(old) & !mask) | (value & mask)) as u16;
        match reg {
            USBCMD => self.write_command(merge16(self.regs.command)),
            USBSTS => {
                let clear = (value & mask) as u16 & STS_WRITE_ONE_TO_CLEAR;
                self.regs.status &= !clear;
                if self.regs.status & STS_USBINT == 0 {
                    self.regs.ioc_pending = false;
                    self.regs.short_packet_pending = false;
                }
            }
            USBINTR => self.regs.interrupt_enable = merge16(self.regs.interrupt_enable) & 0x000f,
            FRNUM => {
                // Only while stopped (UHCI 2.1.4).
                if !self.is_running() {
                    self.regs.frame_number = merge16(self.regs.frame_number) & 0x07ff;
                }
            }
            FLBASEADD => {
                let merged = (self.regs.frame_list_base & !mask) | (value & mask);
                self.regs.frame_list_base = merged & !0xfff;
            }
            SOFMOD => self.regs.sof_modify = (value & 0x7f) as u8,
            _ => {
                let port = ((reg - PORTSC1) / 2) as usize;
                self.write_port(port, value as u16, mask as u16);
            }
        }
    }

    fn write_command(&mut self, value: u16) {
        let old = self.regs.command;
        if value & CMD_HCRESET != 0 {
            // Self-clearing: everything back to defaults, devices see a bus reset.
            self.controller_reset();
            return;
        }
        if value & CMD_GRESET != 0 && old & CMD_GRESET == 0 {
            self.controller_reset();
        }
        self.regs.command = value & 0x00fd;
        if value & CMD_RS != 0 && old & CMD_RS == 0 {
            self.next_frame_ns = self.clock.monotonic_ns().saturating_add(FRAME_NS);
        }
    }

    fn write_port(&mut self, port: usize, value: u16, mask: u16) {
        let Some(&current) = self.regs.ports.get(port) else {
            return;
        };
        let connected = current & PORT_CCS != 0;
        let cleared = value & mask & PORT_WRITE_ONE_TO_CLEAR;
        let read_write = (current & PORT_READ_WRITE & !mask) | (value & mask & PORT_READ_WRITE);
        let mut status = (current & !PORT_READ_WRITE & !cleared) | read_write;
        let reset_started = read_write & PORT_PR != 0 && current & PORT_PR == 0;
        let reset_ended = read_write & PORT_PR == 0 && current & PORT_PR != 0;
        if reset_started {
            if let Some(Some(device)) = self.ports.get_mut(port) {
                device.reset();
            }
            status &= !(PORT_SUSP | PORT_RD);
        }
        if status & PORT_PR != 0 {
            status &= !PORT_PE;
        }
        if reset_ended && connected {
            // The port comes out of reset enabled.
            status |= PORT_PE;
        }
        if !connected {
            status &= !(PORT_PE | PORT_SUSP | PORT_RD);
        }
        if let Some(sc) = self.regs.ports.get_mut(port) {
            *sc = status;
        }
    }

    /// HCRESET / GRESET / PCI reset: registers to defaults, ports disabled, attached
    /// devices reset and reported as newly connected.
    fn controller_reset(&mut self) {
        self.regs = UhciRegisters::default();
        for (slot, sc) in self.ports.iter_mut().zip(self.regs.ports.iter_mut()) {
            if let Some(device) = slot {
                device.reset();
                let low = device.speed() == UsbSpeed::Low;
                *sc = PORT_ALWAYS_ONE | PORT_CCS | PORT_CSC | if low { PORT_LSDA } else { 0 };
            }
        }
        self.update_irq();
    }

    fn signal_resume(&mut self) {
        self.regs.status |= STS_RESUME;
        if self.regs.command & CMD_EGSM != 0 {
            self.regs.command |= CMD_FGR;
        }
    }

    fn update_irq(&mut self) {
        let status = self.regs.status;
        let enable = self.regs.interrupt_enable;
        let asserted = (status & STS_USBINT != 0
            && ((self.regs.ioc_pending && enable & INTR_IOC != 0)
                || (self.regs.short_packet_pending && enable & INTR_SPD != 0)))
            || (status & STS_ERROR != 0 && enable & INTR_TIMEOUT_CRC != 0)
            || (status & STS_RESUME != 0 && enable & INTR_RESUME != 0)
            || status & (STS_HSE | STS_HCPE) != 0;
        let level = self.config.intx_level(asserted);
        if level != self.irq_level {
            self.irq_level = level;
            self.irq.set_level(level);
        }
    }

    // ---- frames ----

    fn halt_with(&mut self, status_bit: u16) {
        self.regs.status |= status_bit;
        self.regs.command &= !CMD_RS;
    }

    fn read_dwords<const N: usize>(&self, address: u64) -> Option<[u32; N]> {
        let mut bytes = vec![0u8; N * 4];
        self.memory
            .read_slice(&mut bytes, GuestAddress(address))
            .ok()?;
        let mut out = [0u32; N];
        for (dword, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *dword = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        Some(out)
    }

    fn write_dword(&self, address: u64, value: u32) -> bool {
        self.memory
            .write_slice(&value.to_le_bytes(), GuestAddress(address))
            .is_ok()
    }

    /// One 1 ms frame.
    fn run_frame(&mut self) {
        let mut resume = false;
        for (slot, sc) in self.ports.iter_mut().zip(self.regs.ports.iter_mut()) {
            let Some(device) = slot else { continue };
            if *sc & PORT_PE == 0 {
                continue;
            }
            if *sc & PORT_SUSP != 0 {
                if *sc & PORT_RD == 0 && device.wakeup_pending() {
                    *sc |= PORT_RD;
                    resume = true;
                }
            } else {
                device.start_of_frame();
            }
        }
        if resume {
            self.signal_resume();
        }
        if self.config.bus_master_enabled() && self.regs.command & CMD_EGSM == 0 {
            let index = u64::from(self.regs.frame_number & 0x3ff);
            let entry_address = u64::from(self.regs.frame_list_base) + index * 4;
            match self.read_dwords::<1>(entry_address) {
                Some([entry]) => self.walk_schedule(entry),
                None => self.halt_with(STS_HSE),
            }
        }
        if self.is_running() {
            self.regs.frame_number = (self.regs.frame_number + 1) & 0x7ff;
        }
        self.update_irq();
    }

    /// Walks one frame's schedule starting at frame list entry `entry`.
    fn walk_schedule(&mut self, entry: u32) {
        self.bytes_this_frame = 0;
        let mut link = entry;
        // The queue head whose element is being processed: (address, its head link).
        let mut queue: Option<(u64, u32)> = None;
        for _ in 0..MAX_ELEMENTS_PER_FRAME {
            if !self.is_running() {
                return;
            }
            if link & LINK_TERMINATE != 0 {
                match queue.take() {
                    Some((_, head)) => {
                        link = head;
                        continue;
                    }
                    None => return,
                }
            }
            let address = u64::from(link & LINK_ADDRESS_MASK);
            if link & LINK_QH != 0 {
                let Some([head, element]) = self.read_dwords::<2>(address) else {
                    self.halt_with(STS_HSE);
                    return;
                };
                if element & LINK_TERMINATE != 0 {
                    queue = None;
                    link = head;
                } else {
                    // A QH as element replaces this context (nested queues lose the outer
                    // horizontal link, as in QEMU; no guest driver builds them).
                    queue = Some((address, head));
                    link = element;
                }
                continue;
            }
            let Some([td_link, control, token, buffer]) = self.read_dwords::<4>(address) else {
                self.halt_with(STS_HSE);
                return;
            };
            let mut td = TransferDescriptor {
                link: td_link,
                control,
                token,
                buffer,
            };
            let active = td.control & TD_STATUS_ACTIVE != 0;
            let outcome = if active {
                let outcome = self.execute_td(&mut td);
                match outcome {
                    TdOutcome::Deferred | TdOutcome::Halted => return,
                    _ => {
                        if !self.write_dword(address + 4, td.control) {
                            self.halt_with(STS_HSE);
                            return;
                        }
                    }
                }
                if self.regs.command & CMD_SWDBG != 0 {
                    // Software debug mode: stop after each TD.
                    self.regs.command &= !CMD_RS;
                    return;
                }
                Some(outcome)
            } else {
                None
            };
            match (queue, outcome) {
                (None, _) => link = td.link,
                (Some((qh_address, head)), Some(TdOutcome::Completed { stop_queue: false })) => {
                    // Advance the queue to the next TD.
                    if !self.write_dword(qh_address + 4, td.link) {
                        self.halt_with(STS_HSE);
                        return;
                    }
                    if td.link & LINK_DEPTH_FIRST != 0 && td.link & LINK_TERMINATE == 0 {
                        link = td.link;
                    } else {
                        queue = None;
                        link = head;
                    }
                }
                (Some((_, head)), _) => {
                    // Inactive element, NAK, error or short packet: the queue waits.
                    queue = None;
                    link = head;
                }
            }
        }
    }

    /// The port whose enabled, running device answers to `address`.
    fn port_for_address(&self, address: u8) -> Option<usize> {
        (0..NUM_PORTS).find(|&port| {
            let sc = self.regs.ports.get(port).copied().unwrap_or(0);
            sc & (PORT_PE | PORT_SUSP | PORT_PR) == PORT_PE
                && self
                    .ports
                    .get(port)
                    .and_then(|d| d.as_ref())
                    .is_some_and(|d| d.address() == address)
        })
    }

    fn retire_with_error(&mut self, td: &mut TransferDescriptor, bits: u32) -> TdOutcome {
        td.control = (td.control & !TD_STATUS_ACTIVE) | bits;
        self.regs.status |= STS_ERROR;
        if td.control & TD_IOC != 0 {
            self.regs.status |= STS_USBINT;
            self.regs.ioc_pending = true;
        }
        TdOutcome::Failed
    }

    /// No handshake (no device at the address): count down the error counter.
    fn timeout(&mut self, td: &mut TransferDescriptor) -> TdOutcome {
        td.control |= TD_STATUS_CRC_TIMEOUT;
        match (td.control & TD_CERR_MASK) >> TD_CERR_SHIFT {
            // 0: no limit, retry forever.
            0 => TdOutcome::Retry,
            1 => {
                td.control &= !TD_CERR_MASK;
                self.retire_with_error(td, TD_STATUS_STALLED)
            }
            count => {
                td.control = (td.control & !TD_CERR_MASK) | ((count - 1) << TD_CERR_SHIFT);
                TdOutcome::Retry
            }
        }
    }

    fn execute_td(&mut self, td: &mut TransferDescriptor) -> TdOutcome {
        let Some(pid) = Pid::from_token(td.token as u8) else {
            self.halt_with(STS_HCPE);
            return TdOutcome::Halted;
        };
        let max_field = td.token >> 21;
        let max_len = if max_field == TD_MAXLEN_ZERO {
            0
        } else {
            max_field as usize + 1
        };
        if max_len > MAX_TD_LENGTH {
            return self.retire_with_error(td, TD_STATUS_BABBLE | TD_STATUS_STALLED);
        }
        if self.bytes_this_frame > 0 && self.bytes_this_frame + max_len > MAX_BYTES_PER_FRAME {
            return TdOutcome::Deferred;
        }
        self.bytes_this_frame += max_len.max(1);
        let device_address = ((td.token >> 8) & 0x7f) as u8;
        let endpoint = ((td.token >> 15) & 0x0f) as u8;
        let Some(port) = self.port_for_address(device_address) else {
            return self.timeout(td);
        };
        let mut data = vec![0u8; max_len];
        if pid != Pid::In
            && max_len > 0
            && self
                .memory
                .read_slice(&mut data, GuestAddress(u64::from(td.buffer)))
                .is_err()
        {
            return self.retire_with_error(td, TD_STATUS_DATA_BUFFER | TD_STATUS_STALLED);
        }
        let result = match self.ports.get_mut(port).and_then(|d| d.as_mut()) {
            Some(device) => device.handle_packet(pid, endpoint, &mut data),
            None => return self.timeout(td),
        };
        match result {
            PacketResult::Ack(n) => {
                let transferred = if pid == Pid::In {
                    n.min(max_len)
                } else {
                    max_len
                };
                if pid == Pid::In && transferred > 0 {
                    let buffer = GuestAddress(u64::from(td.buffer));
                    // Check first: a partial write would touch RAM before failing.
                    let written = data.get(..transferred).is_some_and(|chunk| {
                        self.memory.check_range(buffer, chunk.len())
                            && self.memory.write_slice(chunk, buffer).is_ok()
                    });
                    if !written {
                        return self
                            .retire_with_error(td, TD_STATUS_DATA_BUFFER | TD_STATUS_STALLED);
                    }
                }
                let actual = (transferred as u32).wrapping_sub(1) & TD_ACTLEN_MASK;
                td.control =
                    (td.control & !(TD_STATUS_ACTIVE | TD_STATUS_ERRORS | TD_ACTLEN_MASK)) | actual;
                if td.control & TD_IOC != 0 {
                    self.regs.status |= STS_USBINT;
                    self.regs.ioc_pending = true;
                }
                let short = pid == Pid::In && transferred < max_len;
                let stop_queue = short && td.control & TD_SPD != 0;
                if stop_queue {
                    self.regs.status |= STS_USBINT;
                    self.regs.short_packet_pending = true;
                }
                TdOutcome::Completed { stop_queue }
            }
            PacketResult::Nak => {
                td.control |= TD_STATUS_NAK;
                TdOutcome::Retry
            }
            PacketResult::Stall => self.retire_with_error(td, TD_STATUS_STALLED),
        }
    }
}

impl Timed for Uhci {
    /// The next frame while running, None while stopped (no timer cost).
    fn next_deadline_ns(&self) -> Option<u64> {
        self.is_running().then_some(self.next_frame_ns)
    }

    fn on_timer(&mut self, now_ns: u64) {
        if !self.is_running() || now_ns < self.next_frame_ns {
            return;
        }
        let due = (now_ns - self.next_frame_ns) / FRAME_NS + 1;
        for _ in 0..due.min(MAX_CATCH_UP_FRAMES) {
            if !self.is_running() {
                break;
            }
            self.run_frame();
        }
        self.next_frame_ns = self
            .next_frame_ns
            .saturating_add(due.saturating_mul(FRAME_NS));
    }
}

impl PciFunction for Uhci {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg + offset, data);
        // The command register's INTx disable bit may have changed.
        self.update_irq();
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == UHCI_BAR {
            self.io_read(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == UHCI_BAR {
            self.io_write(offset, data);
        }
    }

    fn reset(&mut self) {
        self.config.reset_header();
        self.config.set_u16(REG_USBLEGSUP, USBLEGSUP_DEFAULT);
        self.controller_reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::irq::CountingIrq;
    use crate::pci::{COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_IO_SPACE, REG_COMMAND};
    use crate::test_support::TestRng;
    use crate::usb::{SetupPacket, PID_IN, PID_OUT, PID_SETUP};
    use crate::usb_hid::{UsbHid, HID_SET_IDLE, HID_SET_PROTOCOL};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::GuestMemoryMmap;

    const RAM: usize = 1 << 20;
    const FRAME_LIST: u64 = 0x1000;
    const QH: u64 = 0x2000;
    const TDS: u64 = 0x3000;
    const BUFFERS: u64 = 0x8000;

    struct Host {
        uhci: Uhci,
        mem: GuestMemoryMmap,
        clock: Arc<ManualClock>,
        irq: Arc<CountingIrq>,
    }

    fn td_token(pid: u8, address: u8, endpoint: u8, toggle: bool, len: usize) -> u32 {
        let max = if len == 0 {
            TD_MAXLEN_ZERO
        } else {
            len as u32 - 1
        };
        (max << 21)
            | (u32::from(toggle) << 19)
            | (u32::from(endpoint) << 15)
            | (u32::from(address) << 8)
            | u32::from(pid)
    }

    impl Host {
        fn new() -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
            let clock = ManualClock::new(0);
            let irq = CountingIrq::new();
            let uhci = Uhci::new(irq.clone(), clock.clone(), mem.clone());
            let mut host = Self {
                uhci,
                mem,
                clock,
                irq,
            };
            host.uhci.config_write(
                REG_COMMAND,
                0,
                &(COMMAND_IO_SPACE | COMMAND_BUS_MASTER).to_le_bytes(),
            );
            host
        }

        fn w16(&mut self, offset: u64, value: u16) {
            self.uhci.bar_write(UHCI_BAR, offset, &value.to_le_bytes());
        }
        fn w32(&mut self, offset: u64, value: u32) {
            self.uhci.bar_write(UHCI_BAR, offset, &value.to_le_bytes());
        }
        fn r16(&mut self, offset: u64) -> u16 {
            let mut b = [0u8; 2];
            self.uhci.bar_read(UHCI_BAR, offset, &mut b);
            u16::from_le_bytes(b)
        }
        fn r32(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.uhci.bar_read(UHCI_BAR, offset, &mut b);
            u32::from_le_bytes(b)
        }
        fn put32(&self, address: u64, value: u32) {
            self.mem.write_obj(value, GuestAddress(address)).unwrap();
        }
        fn get32(&self, address: u64) -> u32 {
            self.mem.read_obj(GuestAddress(address)).unwrap()
        }
        fn frames(&mut self, n: usize) {
            for _ in 0..n {
                self.clock.advance_ns(FRAME_NS);
                let now = self.clock.monotonic_ns();
                if self.uhci.next_deadline_ns().is_some_and(|d| d <= now) {
                    self.uhci.on_timer(now);
                }
            }
        }

        /// Every frame list entry points at one QH (terminated horizontally).
        fn setup_schedule(&mut self) {
            for i in 0..1024 {
                self.put32(FRAME_LIST + i * 4, QH as u32 | LINK_QH);
            }
            self.put32(QH, LINK_TERMINATE);
            self.put32(QH + 4, LINK_TERMINATE);
            self.w32(FLBASEADD, FRAME_LIST as u32);
        }

        /// What SeaBIOS's usb-uhci.c does: legacy support off, global reset, frame list,
        /// run; then each port reset and enabled by hand.
        fn seabios_init(&mut self) {
            self.uhci
                .config_write(REG_USBLEGSUP, 0, &0x8f00u16.to_le_bytes());
            self.w16(USBCMD, CMD_GRESET);
            self.frames(50);
            self.w16(USBCMD, 0);
            self.w16(USBINTR, 0);
            self.setup_schedule();
            self.w16(FRNUM, 0);
            self.w16(USBCMD, CMD_RS | CMD_CF | CMD_MAXP);
            for port in 0..NUM_PORTS as u64 {
                let reg = PORTSC1 + 2 * port;
                if self.r16(reg) & PORT_CCS == 0 {
                    continue;
                }
                self.w16(reg, PORT_PR);
                self.frames(50);
                self.w16(reg, 0);
                self.w16(reg, PORT_PE);
                assert_ne!(self.r16(reg) & PORT_PE, 0, "port {port} enabled");
            }
        }

        /// Builds a TD at `TDS + 32 * index`.
        fn td(&self, index: u64, link: u32, control: u32, token: u32, buffer: u64) -> u64 {
            let at = TDS + 32 * index;
            self.put32(at, link);
            self.put32(at + 4, control);
            self.put32(at + 8, token);
            self.put32(at + 12, buffer as u32);
            at
        }

        /// A control transfer through the schedule (8-byte packets, depth first).
        /// Returns the IN data, or the failing TD's status.
        fn control(&mut self, address: u8, setup: SetupPacket, out: &[u8]) -> Result<Vec<u8>, u32> {
            let active = TD_STATUS_ACTIVE | (3 << TD_CERR_SHIFT);
            let mut tds = Vec::new();
            self.mem
                .write_slice(&setup.to_bytes(), GuestAddress(BUFFERS))
                .unwrap();
            tds.push((td_token(PID_SETUP, address, 0, false, 8), BUFFERS));
            let total = usize::from(setup.length);
            let mut toggle = true;
            let mut offset = 0;
            while offset < total {
                let n = (total - offset).min(8);
                let buffer = BUFFERS + 0x100 + offset as u64;
                let pid = if setup.is_device_to_host() {
                    PID_IN
                } else {
                    self.mem
                        .write_slice(&out[offset..offset + n], GuestAddress(buffer))
                        .unwrap();
                    PID_OUT
                };
                tds.push((td_token(pid, address, 0, toggle, n), buffer));
                toggle = !toggle;
                offset += n;
            }
            let status_pid = if setup.is_device_to_host() && total > 0 {
                PID_OUT
            } else {
                PID_IN
            };
            tds.push((td_token(status_pid, address, 0, true, 0), 0));
            let count = tds.len() as u64;
            for (i, (token, buffer)) in tds.iter().enumerate() {
                let i = i as u64;
                let last = i + 1 == count;
                let link = if last {
                    LINK_TERMINATE
                } else {
                    (TDS + 32 * (i + 1)) as u32 | LINK_DEPTH_FIRST
                };
                let control = active | if last { TD_IOC } else { 0 } | TD_SPD;
                self.td(i, link, control, *token, *buffer);
            }
            self.put32(QH + 4, TDS as u32);
            for _ in 0..20 {
                self.frames(1);
                if self.get32(QH + 4) & LINK_TERMINATE != 0 {
                    break;
                }
                // A stalled or short TD stops the queue.
                let element = u64::from(self.get32(QH + 4) & LINK_ADDRESS_MASK);
                let status = self.get32(element + 4);
                if status & TD_STATUS_ACTIVE == 0 {
                    if status & TD_STATUS_ERRORS != 0 {
                        self.put32(QH + 4, LINK_TERMINATE);
                        return Err(status);
                    }
                    // Short packet: skip to the status TD.
                    self.put32(QH + 4, (TDS + 32 * (count - 1)) as u32);
                }
            }
            assert_ne!(self.get32(QH + 4) & LINK_TERMINATE, 0, "transfer finished");
            let mut data = Vec::new();
            for i in 1..count - 1 {
                let status = self.get32(TDS + 32 * i + 4);
                if status & TD_STATUS_ACTIVE != 0 {
                    break;
                }
                let n = ((status + 1) & TD_ACTLEN_MASK) as usize;
                let mut chunk = vec![0u8; n];
                let buffer = u64::from(self.get32(TDS + 32 * i + 12));
                self.mem
                    .read_slice(&mut chunk, GuestAddress(buffer))
                    .unwrap();
                data.extend_from_slice(&chunk);
                if n < 8 {
                    break;
                }
            }
            Ok(data)
        }

        /// One interrupt IN TD (endpoint 1, `len` bytes) in the QH; frames run until it
        /// completes or `max_frames` pass. Returns the data or None (still NAKing).
        fn interrupt_in(&mut self, address: u8, len: usize, max_frames: usize) -> Option<Vec<u8>> {
            let buffer = BUFFERS + 0x800;
            let td = self.td(
                0,
                LINK_TERMINATE,
                TD_STATUS_ACTIVE | TD_IOC | (3 << TD_CERR_SHIFT),
                td_token(PID_IN, address, 1, false, len),
                buffer,
            );
            self.put32(QH + 4, td as u32);
            for _ in 0..max_frames {
                self.frames(1);
                let status = self.get32(td + 4);
                if status & TD_STATUS_ACTIVE == 0 {
                    assert_eq!(status & TD_STATUS_ERRORS, 0, "TD failed: {status:#x}");
                    let n = ((status + 1) & TD_ACTLEN_MASK) as usize;
                    let mut out = vec![0u8; n];
                    self.mem.read_slice(&mut out, GuestAddress(buffer)).unwrap();
                    return Some(out);
                }
                assert_ne!(status & TD_STATUS_NAK, 0, "NAK recorded while waiting");
            }
            self.put32(QH + 4, LINK_TERMINATE);
            None
        }
    }

    fn req(request_type: u8, request: u8, value: u16, index: u16, length: u16) -> SetupPacket {
        SetupPacket {
            request_type,
            request,
            value,
            index,
            length,
        }
    }

    /// A device that counts transactions and always answers the same.
    struct Probe {
        calls: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
        answer: PacketResult,
        speed: UsbSpeed,
    }

    impl UsbDevice for Probe {
        fn speed(&self) -> UsbSpeed {
            self.speed
        }
        fn reset(&mut self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
        fn address(&self) -> u8 {
            0
        }
        fn handle_packet(&mut self, _pid: Pid, _ep: u8, data: &mut [u8]) -> PacketResult {
            self.calls.fetch_add(1, Ordering::SeqCst);
            data.fill(0xab);
            self.answer
        }
    }

    fn probe(answer: PacketResult) -> (Box<Probe>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let resets = Arc::new(AtomicUsize::new(0));
        let device = Box::new(Probe {
            calls: calls.clone(),
            resets: resets.clone(),
            answer,
            speed: UsbSpeed::Full,
        });
        (device, calls, resets)
    }

    #[test]
    fn pci_identity_and_legacy_register() {
        let mut host = Host::new();
        let c = host.uhci.config();
        assert_eq!((c.vendor_id(), c.device_id()), (0x8086, 0x7020));
        assert_eq!(c.read_u32(0x08) >> 8, 0x0c0300);
        assert_eq!(c.bar_size(UHCI_BAR), Some(32));
        assert_eq!(c.interrupt_pin(), 4);
        assert_eq!(c.read_u16(REG_USBLEGSUP), 0x2000);
        // Linux's reset writes the write-1-to-clear bits: PIRQ enable drops, then it
        // writes the default back.
        host.uhci
            .config_write(REG_USBLEGSUP, 0, &0x8f00u16.to_le_bytes());
        assert_eq!(host.uhci.config().read_u16(REG_USBLEGSUP), 0);
        host.uhci
            .config_write(REG_USBLEGSUP, 0, &0xffffu16.to_le_bytes());
        assert_eq!(host.uhci.config().read_u16(REG_USBLEGSUP), 0x20ff);
        // Other BARs read all ones and ignore writes.
        let mut b = [0u8; 2];
        host.uhci.bar_read(0, 0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn register_defaults_and_access_widths() {
        let mut host = Host::new();
        assert_eq!(host.r16(USBCMD), 0);
        assert_eq!(host.r16(USBSTS), STS_HCH);
        assert_eq!(host.r16(PORTSC1), PORT_ALWAYS_ONE);
        assert_eq!(host.r16(PORTSC1 + 2), PORT_ALWAYS_ONE);
        // Linux counts ports until bit 7 is clear.
        assert_eq!(host.r16(PORTSC1 + 4) & PORT_ALWAYS_ONE, 0);
        let mut sof = [0u8; 1];
        host.uhci.bar_read(UHCI_BAR, SOFMOD, &mut sof);
        assert_eq!(sof, [64]);
        host.w32(FLBASEADD, 0x1234_5fff);
        assert_eq!(host.r32(FLBASEADD), 0x1234_5000);
        // Byte writes to the frame list base merge.
        host.uhci.bar_write(UHCI_BAR, FLBASEADD + 3, &[0x00]);
        assert_eq!(host.r32(FLBASEADD), 0x0034_5000);
        host.w16(USBINTR, 0xffff);
        assert_eq!(host.r16(USBINTR), 0x000f);
        host.w16(FRNUM, 0xffff);
        assert_eq!(host.r16(FRNUM), 0x07ff);
        // Dword read across USBCMD / USBSTS.
        assert_eq!(host.r32(USBCMD), u32::from(STS_HCH) << 16);
        // HCRESET self-clears and restores defaults.
        host.w16(USBCMD, CMD_HCRESET);
        assert_eq!(host.r16(USBCMD), 0);
        assert_eq!(host.r16(USBINTR), 0);
        assert_eq!(host.r32(FLBASEADD), 0);
        // Reads past the block are 0, writes ignored.
        let mut b = [0xaau8; 4];
        host.uhci.bar_read(UHCI_BAR, 30, &mut b);
        assert_eq!(b, [0, 0, 0, 0]);
        host.uhci.bar_write(UHCI_BAR, u64::MAX - 1, &[1, 2, 3, 4]);
    }

    #[test]
    fn frames_follow_run_stop_with_bounded_catch_up() {
        let mut host = Host::new();
        host.setup_schedule();
        assert_eq!(host.uhci.next_deadline_ns(), None, "halted: no timer");
        host.w16(USBCMD, CMD_RS);
        assert_eq!(host.r16(USBSTS) & STS_HCH, 0);
        assert_eq!(host.uhci.next_deadline_ns(), Some(FRAME_NS));
        host.frames(10);
        assert_eq!(host.r16(FRNUM), 10);
        // FRNUM cannot be written while running.
        host.w16(FRNUM, 500);
        assert_eq!(host.r16(FRNUM), 10);
        // Late by a second: at most 8 frames, deadline moves past now.
        host.clock.advance_ns(1_000 * FRAME_NS);
        let now = host.clock.monotonic_ns();
        host.uhci.on_timer(now);
        assert_eq!(host.r16(FRNUM), 18);
        let next = host.uhci.next_deadline_ns().unwrap();
        assert!(next > now && next <= now + FRAME_NS);
        // Wraps at 11 bits.
        host.w16(USBCMD, 0);
        assert_eq!(host.uhci.next_deadline_ns(), None);
        assert_ne!(host.r16(USBSTS) & STS_HCH, 0);
        host.w16(FRNUM, 0x7ff);
        host.w16(USBCMD, CMD_RS);
        host.frames(1);
        assert_eq!(host.r16(FRNUM), 0);
    }

    #[test]
    fn ports_connect_reset_enable_and_detach() {
        let mut host = Host::new();
        let (device, _, resets) = probe(PacketResult::Nak);
        // Enable cannot be set without a device.
        host.w16(PORTSC1, PORT_PE);
        assert_eq!(host.r16(PORTSC1) & PORT_PE, 0);
        host.uhci.attach(0, device).unwrap();
        let sc = host.r16(PORTSC1);
        assert_eq!(
            sc & (PORT_CCS | PORT_CSC | PORT_LINE_DPLUS),
            PORT_CCS | PORT_CSC | PORT_LINE_DPLUS
        );
        assert_eq!(sc & PORT_LSDA, 0);
        assert!(matches!(
            host.uhci.attach(0, probe(PacketResult::Nak).0),
            Err(UsbError::PortInUse { port: 0 })
        ));
        assert!(matches!(
            host.uhci.attach(2, probe(PacketResult::Nak).0),
            Err(UsbError::NoSuchPort { port: 2, .. })
        ));
        // CSC is write-1-to-clear.
        host.w16(PORTSC1, PORT_CSC);
        assert_eq!(host.r16(PORTSC1) & PORT_CSC, 0);
        // Reset: the device is reset, line shows SE0, the port is disabled meanwhile and
        // comes out enabled.
        let before = resets.load(Ordering::SeqCst);
        host.w16(PORTSC1, PORT_PR);
        assert_eq!(resets.load(Ordering::SeqCst), before + 1);
        let sc = host.r16(PORTSC1);
        assert_eq!(sc & (PORT_PE | PORT_LINE_DPLUS | PORT_LINE_DMINUS), 0);
        host.w16(PORTSC1, 0);
        assert_ne!(host.r16(PORTSC1) & PORT_PE, 0);
        // Suspend and resume bits are storage while connected.
        host.w16(PORTSC1, PORT_PE | PORT_SUSP);
        assert_ne!(host.r16(PORTSC1) & PORT_SUSP, 0);
        host.w16(PORTSC1, PORT_PE);
        // Detach: disabled, connect and enable change.
        assert!(host.uhci.detach(0).is_some());
        let sc = host.r16(PORTSC1);
        assert_eq!(sc & (PORT_CCS | PORT_PE), 0);
        assert_eq!(sc & (PORT_CSC | PORT_PEC), PORT_CSC | PORT_PEC);
        assert!(host.uhci.detach(0).is_none());
        assert!(host.uhci.detach(7).is_none());
        // Low-speed device.
        let (mut low, _, _) = probe(PacketResult::Nak);
        low.speed = UsbSpeed::Low;
        host.uhci.attach(1, low).unwrap();
        let sc = host.r16(PORTSC1 + 2);
        assert_eq!(
            sc & (PORT_LSDA | PORT_LINE_DMINUS),
            PORT_LSDA | PORT_LINE_DMINUS
        );
    }

    #[test]
    fn seabios_enumerates_the_tablet_end_to_end() {
        let mut host = Host::new();
        let tablet = UsbHid::tablet();
        let input = tablet.input();
        host.uhci.attach(0, Box::new(tablet)).unwrap();
        host.seabios_init();
        // GET_DESCRIPTOR device, first 8 bytes (max packet) then all of it.
        let d = host.control(0, req(0x80, 6, 0x0100, 0, 8), &[]).unwrap();
        assert_eq!(d, [18, 1, 0x10, 0x01, 0, 0, 0, 8]);
        let d = host.control(0, req(0x80, 6, 0x0100, 0, 18), &[]).unwrap();
        assert_eq!(&d[8..12], [0x27, 0x06, 0x01, 0x00]);
        host.control(0, req(0, 5, 2, 0, 0), &[]).unwrap();
        assert_eq!(host.uhci.device(0).unwrap().address(), 2);
        // Address 0 no longer answers: timeout, error counter runs out.
        let err = host
            .control(0, req(0x80, 6, 0x0100, 0, 8), &[])
            .unwrap_err();
        assert_ne!(err & TD_STATUS_CRC_TIMEOUT, 0);
        let config = host.control(2, req(0x80, 6, 0x0200, 0, 9), &[]).unwrap();
        assert_eq!(config[2], 34);
        let config = host.control(2, req(0x80, 6, 0x0200, 0, 34), &[]).unwrap();
        assert_eq!(config.len(), 34);
        host.control(2, req(0, 9, 1, 0, 0), &[]).unwrap();
        host.control(2, req(0x21, HID_SET_IDLE, 0, 0, 0), &[])
            .unwrap();
        let report = host.control(2, req(0x81, 6, 0x2200, 0, 255), &[]).unwrap();
        assert_eq!(report, crate::usb_hid::TABLET_REPORT_DESCRIPTOR);
        // Nothing to report: the interrupt TD NAKs and stays active.
        assert_eq!(host.interrupt_in(2, 8, 5), None);
        input.pointer_absolute(0, 0x7fff, 1, 1);
        assert_eq!(
            host.interrupt_in(2, 8, 5),
            Some(vec![1, 0, 0, 0xff, 0x7f, 1])
        );
        input.pointer_absolute(0x7fff, 0, 0, -1);
        assert_eq!(
            host.interrupt_in(2, 8, 5),
            Some(vec![0, 0xff, 0x7f, 0, 0, 0xff])
        );
        assert_eq!(host.interrupt_in(2, 8, 3), None);
    }

    #[test]
    fn keyboard_boot_protocol_through_the_controller() {
        let mut host = Host::new();
        let keyboard = UsbHid::keyboard();
        let input = keyboard.input();
        host.uhci.attach(1, Box::new(keyboard)).unwrap();
        host.seabios_init();
        host.control(0, req(0, 5, 1, 0, 0), &[]).unwrap();
        host.control(1, req(0, 9, 1, 0, 0), &[]).unwrap();
        host.control(1, req(0x21, HID_SET_PROTOCOL, 0, 0, 0), &[])
            .unwrap();
        host.control(1, req(0x21, HID_SET_IDLE, 0, 0, 0), &[])
            .unwrap();
        // LED output report through a control write with a data stage.
        host.control(1, req(0x21, 0x09, 0x0200, 0, 1), &[0x02])
            .unwrap();
        assert_eq!(input.leds(), 0x02);
        assert_eq!(host.interrupt_in(1, 8, 3), None);
        input.key(29, true); // LEFTCTRL
        input.key(46, true); // C
        assert_eq!(
            host.interrupt_in(1, 8, 5),
            Some(vec![1, 0, 0, 0, 0, 0, 0, 0])
        );
        assert_eq!(
            host.interrupt_in(1, 8, 5),
            Some(vec![1, 0, 6, 0, 0, 0, 0, 0])
        );
        for code in 2..=7 {
            input.key(code, true);
        }
        let mut last = None;
        while let Some(r) = host.interrupt_in(1, 8, 2) {
            last = Some(r);
        }
        assert_eq!(last, Some(vec![1, 0, 1, 1, 1, 1, 1, 1]));
    }

    #[test]
    fn linux_start_sequence_and_ioc_interrupt() {
        let mut host = Host::new();
        host.uhci.attach(0, Box::new(UsbHid::tablet())).unwrap();
        // uhci_reset_hc
        host.uhci
            .config_write(REG_USBLEGSUP, 0, &0x8f00u16.to_le_bytes());
        host.w16(USBCMD, CMD_HCRESET);
        assert_eq!(host.r16(USBCMD) & CMD_HCRESET, 0);
        host.w16(USBINTR, 0);
        host.w16(USBCMD, 0);
        // configure_hc
        host.uhci.bar_write(UHCI_BAR, SOFMOD, &[64]);
        host.setup_schedule();
        host.w16(FRNUM, 0);
        host.uhci
            .config_write(REG_USBLEGSUP, 0, &USBLEGSUP_DEFAULT.to_le_bytes());
        // start_rh
        host.w16(
            USBINTR,
            INTR_TIMEOUT_CRC | INTR_RESUME | INTR_IOC | INTR_SPD,
        );
        host.w16(USBCMD, CMD_RS | CMD_CF | CMD_MAXP);
        // The hub driver sees the connect change; it clears it and resets the port with
        // read-modify-write (RWC bits masked), then sets PE.
        let sc = host.r16(PORTSC1);
        assert_ne!(sc & PORT_CSC, 0);
        host.w16(PORTSC1, (sc & !(PORT_CSC | PORT_PEC)) | PORT_CSC);
        let sc = host.r16(PORTSC1) & !(PORT_CSC | PORT_PEC);
        host.w16(PORTSC1, sc | PORT_PR);
        host.frames(50);
        let sc = host.r16(PORTSC1) & !(PORT_CSC | PORT_PEC);
        host.w16(PORTSC1, sc & !PORT_PR);
        let sc = host.r16(PORTSC1) & !(PORT_CSC | PORT_PEC);
        host.w16(PORTSC1, sc | PORT_PE);
        assert_ne!(host.r16(PORTSC1) & PORT_PE, 0);
        assert!(!host.irq.level());
        host.control(0, req(0x80, 6, 0x0100, 0, 64), &[]).unwrap();
        assert!(host.irq.level(), "IOC raised INTx");
        assert!(host.uhci.config().read_u16(0x06) & crate::pci::STATUS_INTERRUPT != 0);
        let sts = host.r16(USBSTS);
        assert_eq!(sts & (STS_USBINT | STS_ERROR), STS_USBINT);
        // INTx disable masks the line but not the status bit.
        host.uhci.config_write(
            REG_COMMAND,
            0,
            &(COMMAND_IO_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE).to_le_bytes(),
        );
        assert!(!host.irq.level());
        assert!(host.uhci.config().read_u16(0x06) & crate::pci::STATUS_INTERRUPT != 0);
        host.uhci.config_write(
            REG_COMMAND,
            0,
            &(COMMAND_IO_SPACE | COMMAND_BUS_MASTER).to_le_bytes(),
        );
        assert!(host.irq.level());
        host.w16(USBSTS, 0xffff);
        assert!(!host.irq.level());
        assert_eq!(host.r16(USBSTS), 0);
    }

    #[test]
    fn short_packet_stops_queue_and_interrupts() {
        let mut host = Host::new();
        let tablet = UsbHid::tablet();
        let input = tablet.input();
        host.uhci.attach(0, Box::new(tablet)).unwrap();
        host.seabios_init();
        host.w16(USBINTR, INTR_SPD);
        host.control(0, req(0, 5, 1, 0, 0), &[]).unwrap();
        host.control(1, req(0, 9, 1, 0, 0), &[]).unwrap();
        input.pointer_absolute(5, 5, 0, 0);
        let second = host.td(
            1,
            LINK_TERMINATE,
            TD_STATUS_ACTIVE,
            td_token(PID_IN, 1, 1, true, 8),
            BUFFERS,
        );
        let first = host.td(
            0,
            second as u32 | LINK_DEPTH_FIRST,
            TD_STATUS_ACTIVE | TD_SPD,
            td_token(PID_IN, 1, 1, false, 8),
            BUFFERS,
        );
        host.put32(QH + 4, first as u32);
        assert!(!host.irq.level());
        host.frames(1);
        let status = host.get32(first + 4);
        assert_eq!(status & TD_STATUS_ACTIVE, 0);
        assert_eq!((status + 1) & TD_ACTLEN_MASK, 6, "6-byte report");
        assert_eq!(host.get32(QH + 4), first as u32, "queue not advanced");
        assert_ne!(host.get32(second + 4) & TD_STATUS_ACTIVE, 0);
        assert_ne!(host.r16(USBSTS) & STS_USBINT, 0);
        assert!(host.irq.level());
        // IOC not enabled: clearing USBINT drops the line.
        host.w16(USBSTS, STS_USBINT);
        assert!(!host.irq.level());
    }

    #[test]
    fn errors_raise_usberrint() {
        let mut host = Host::new();
        let (device, _, _) = probe(PacketResult::Stall);
        host.uhci.attach(0, device).unwrap();
        host.seabios_init();
        host.w16(USBINTR, INTR_TIMEOUT_CRC);
        // Stall.
        let td = host.td(
            0,
            LINK_TERMINATE,
            TD_STATUS_ACTIVE | (3 << TD_CERR_SHIFT),
            td_token(PID_IN, 0, 1, false, 8),
            BUFFERS,
        );
        host.put32(QH + 4, td as u32);
        host.frames(1);
        let status = host.get32(td + 4);
        assert_eq!(
            status & (TD_STATUS_ACTIVE | TD_STATUS_STALLED),
            TD_STATUS_STALLED
        );
        assert_eq!(host.r16(USBSTS) & STS_ERROR, STS_ERROR);
        assert!(host.irq.level());
        host.w16(USBSTS, STS_ERROR);
        assert!(!host.irq.level());
        // No device at address 9: C_ERR 2 counts down over two frames.
        let td = host.td(
            0,
            LINK_TERMINATE,
            TD_STATUS_ACTIVE | (2 << TD_CERR_SHIFT),
            td_token(PID_IN, 9, 1, false, 8),
            BUFFERS,
        );
        host.put32(QH + 4, td as u32);
        host.frames(1);
        assert_ne!(host.get32(td + 4) & TD_STATUS_ACTIVE, 0);
        assert!(!host.irq.level());
        host.frames(1);
        let status = host.get32(td + 4);
        assert_eq!(status & TD_STATUS_ACTIVE, 0);
        assert_ne!(status & TD_STATUS_CRC_TIMEOUT, 0);
        assert!(host.irq.level());
    }

    #[test]
    fn hostile_loops_are_bounded_per_frame() {
        let mut host = Host::new();
        let (device, calls, _) = probe(PacketResult::Nak);
        host.uhci.attach(0, device).unwrap();
        host.seabios_init();
        // QH pointing at itself with an empty element.
        host.put32(QH, QH as u32 | LINK_QH);
        host.frames(3);
        assert!(host.uhci.is_running());
        // A cycle of active TDs that NAK (not in a queue: the controller follows links).
        let token = td_token(PID_IN, 0, 1, false, 8);
        let b = host.td(
            1,
            (TDS) as u32 | LINK_DEPTH_FIRST,
            TD_STATUS_ACTIVE,
            token,
            BUFFERS,
        );
        let a = host.td(0, b as u32, TD_STATUS_ACTIVE, token, BUFFERS);
        let frame = u64::from(host.r16(FRNUM) & 0x3ff);
        host.put32(FRAME_LIST + 4 * frame, a as u32);
        let before = calls.load(Ordering::SeqCst);
        host.frames(1);
        let per_frame = calls.load(Ordering::SeqCst) - before;
        assert!(
            per_frame > 0 && per_frame <= MAX_ELEMENTS_PER_FRAME,
            "{per_frame}"
        );
        // A queue whose element TDs loop depth-first with ACKs: still bounded.
        let (acker, acks, _) = probe(PacketResult::Ack(0));
        host.uhci.detach(0);
        host.uhci.attach(0, acker).unwrap();
        host.w16(PORTSC1, PORT_PR);
        host.w16(PORTSC1, 0);
        for i in 0..1024 {
            host.put32(FRAME_LIST + i * 4, QH as u32 | LINK_QH);
        }
        host.put32(QH, LINK_TERMINATE);
        let b = host.td(
            1,
            TDS as u32 | LINK_DEPTH_FIRST,
            TD_STATUS_ACTIVE,
            token,
            BUFFERS,
        );
        let a = host.td(
            0,
            b as u32 | LINK_DEPTH_FIRST,
            TD_STATUS_ACTIVE,
            token,
            BUFFERS,
        );
        host.put32(QH + 4, a as u32);
        host.frames(1);
        // Each TD runs once: after that the elements are inactive and the queue is skipped.
        assert_eq!(acks.load(Ordering::SeqCst), 2);
        assert!(host.uhci.is_running());
    }

    #[test]
    fn bad_pointers_and_lengths() {
        let mut host = Host::new();
        let (device, calls, _) = probe(PacketResult::Ack(8));
        host.uhci.attach(0, device).unwrap();
        host.seabios_init();
        host.w16(USBINTR, INTR_TIMEOUT_CRC);
        // MaxLen 0x500 (1281 bytes): babble, device never sees it.
        let td = host.td(
            0,
            LINK_TERMINATE,
            TD_STATUS_ACTIVE,
            td_token(PID_OUT, 0, 1, false, 0x501),
            BUFFERS,
        );
        host.put32(QH + 4, td as u32);
        host.frames(1);
        let status = host.get32(td + 4);
        assert_eq!(
            status & (TD_STATUS_ACTIVE | TD_STATUS_BABBLE),
            TD_STATUS_BABBLE
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        // IN buffer straddling the end of RAM: data buffer error, RAM untouched.
        let near_end = RAM as u64 - 4;
        host.put32(near_end, 0x1122_3344);
        let td = host.td(
            0,
            LINK_TERMINATE,
            TD_STATUS_ACTIVE,
            td_token(PID_IN, 0, 1, false, 8),
            near_end,
        );
        host.put32(QH + 4, td as u32);
        host.frames(1);
        let status = host.get32(td + 4);
        assert_eq!(
            status & (TD_STATUS_ACTIVE | TD_STATUS_DATA_BUFFER),
            TD_STATUS_DATA_BUFFER
        );
        assert_eq!(host.get32(near_end), 0x1122_3344);
        // OUT buffer beyond RAM.
        let td = host.td(
            0,
            LINK_TERMINATE,
            TD_STATUS_ACTIVE,
            td_token(PID_OUT, 0, 1, false, 8),
            0xffff_fff0,
        );
        host.put32(QH + 4, td as u32);
        host.frames(1);
        assert_ne!(host.get32(td + 4) & TD_STATUS_DATA_BUFFER, 0);
        assert!(host.uhci.is_running());
        // Invalid PID: process error, halted.
        let td = host.td(0, LINK_TERMINATE, TD_STATUS_ACTIVE, 0x0000_0012, BUFFERS);
        host.put32(QH + 4, td as u32);
        host.frames(1);
        assert!(!host.uhci.is_running());
        assert_ne!(host.r16(USBSTS) & STS_HCPE, 0);
        assert!(host.irq.level());
        assert_eq!(host.uhci.next_deadline_ns(), None);
        // Link to a QH outside RAM: host system error, halted.
        host.w16(USBSTS, 0xffff);
        host.put32(QH, 0xfff0_0000 | LINK_QH);
        host.put32(QH + 4, LINK_TERMINATE);
        host.w16(USBCMD, CMD_RS);
        host.frames(1);
        assert!(!host.uhci.is_running());
        assert_ne!(host.r16(USBSTS) & STS_HSE, 0);
        // Frame list outside RAM.
        host.w16(USBSTS, 0xffff);
        host.w32(FLBASEADD, 0xffff_f000);
        host.w16(USBCMD, CMD_RS);
        host.frames(2);
        assert!(!host.uhci.is_running());
        assert_ne!(host.r16(USBSTS) & STS_HSE, 0);
    }

    #[test]
    fn port_reset_storm_and_detach_while_running() {
        let mut host = Host::new();
        let (device, _, resets) = probe(PacketResult::Nak);
        host.uhci.attach(0, device).unwrap();
        host.seabios_init();
        let before = resets.load(Ordering::SeqCst);
        for _ in 0..10_000 {
            host.w16(PORTSC1, PORT_PR | PORT_PE);
            host.w16(PORTSC1, PORT_PE);
        }
        assert_eq!(resets.load(Ordering::SeqCst), before + 10_000);
        assert_ne!(host.r16(PORTSC1) & PORT_PE, 0);
        host.frames(2);
        assert!(host.uhci.detach(0).is_some());
        host.frames(2);
        host.uhci.attach(0, Box::new(UsbHid::tablet())).unwrap();
        assert_ne!(host.r16(PORTSC1) & PORT_CSC, 0);
        assert!(host.uhci.is_running());
    }

    #[test]
    fn suspended_port_reports_resume_on_input() {
        let mut host = Host::new();
        let tablet = UsbHid::tablet();
        let input = tablet.input();
        host.uhci.attach(0, Box::new(tablet)).unwrap();
        host.seabios_init();
        host.control(0, req(0, 5, 1, 0, 0), &[]).unwrap();
        host.control(1, req(0, 9, 1, 0, 0), &[]).unwrap();
        host.control(1, req(0, 3, 1, 0, 0), &[]).unwrap(); // remote wakeup
        host.w16(USBINTR, INTR_RESUME);
        host.w16(PORTSC1, PORT_PE | PORT_SUSP);
        host.frames(2);
        assert_eq!(host.r16(PORTSC1) & PORT_RD, 0);
        input.pointer_absolute(1, 2, 0, 0);
        host.frames(1);
        assert_ne!(host.r16(PORTSC1) & PORT_RD, 0);
        assert_ne!(host.r16(USBSTS) & STS_RESUME, 0);
        assert!(host.irq.level());
    }

    #[test]
    fn random_register_and_memory_garbage() {
        let mut host = Host::new();
        host.uhci.attach(0, Box::new(UsbHid::tablet())).unwrap();
        host.uhci.attach(1, Box::new(UsbHid::keyboard())).unwrap();
        let mut rng = TestRng(0x5eed_1234_abcd_0001);
        // Garbage in the low 64 KiB, where the frame list will often point.
        for address in (0..0x10000u64).step_by(4) {
            host.put32(address, rng.next() as u32 & 0x0001_fff7);
        }
        for round in 0..20_000 {
            let value = rng.next();
            let offset = value % 40;
            let width = [1usize, 2, 4][(value >> 8) as usize % 3];
            let bytes = (value >> 16).to_le_bytes();
            if round % 3 == 0 {
                let mut b = [0u8; 4];
                host.uhci.bar_read(UHCI_BAR, offset, &mut b[..width]);
            } else {
                host.uhci.bar_write(UHCI_BAR, offset, &bytes[..width]);
            }
            if round % 16 == 0 {
                // Keep it running and pointed at RAM most of the time.
                host.w32(FLBASEADD, (rng.next() as u32) & 0xf000);
                host.w16(USBCMD, CMD_RS);
                host.frames(1);
            }
            if round % 1000 == 0 {
                host.uhci
                    .config_write(REG_USBLEGSUP, 0, &(rng.next() as u16).to_le_bytes());
                PciFunction::reset(&mut host.uhci);
                host.uhci.config_write(
                    REG_COMMAND,
                    0,
                    &(COMMAND_IO_SPACE | COMMAND_BUS_MASTER).to_le_bytes(),
                );
            }
        }
        // Still usable afterwards.
        host.uhci
            .bar_write(UHCI_BAR, USBCMD, &CMD_HCRESET.to_le_bytes());
        assert_eq!(host.r16(USBCMD), 0);
        assert_eq!(host.r16(PORTSC1) & PORT_CCS, PORT_CCS);
    }
}
