//! The Intel 82371SB (PIIX3) IDE controller, PCI function 00:01.1 (8086:7010), with two
//! legacy channels of two units each (ATA disks in [`crate::ata`], ATAPI CD-ROMs in
//! [`crate::atapi`]) and bus-master DMA.
//!
//! Emulated: the PCI function (class 0x010180: IDE, legacy mode on both channels, bus
//! master capable; BAR4 = the 16-byte bus-master I/O block; no INTx, the channels use ISA
//! IRQ 14/15), the IDE timing registers 0x40..=0x44 (IDETIM bit 15 is the channel's decode
//! enable and is honoured: a disabled channel's legacy ports read 0xff and ignore writes;
//! unlike the datasheet both channels power on enabled, as firmware-less guests expect),
//! per channel the command block (8 ports, 0x1f0 / 0x170) and the control block (1 port,
//! 0x3f6 / 0x376: alternate status, device control with nIEN, SRST and HOB) as
//! [`SharedDevice`]s, task-file registers with the 48-bit "previous content" (HOB) copies,
//! 16- and 32-bit data-port PIO, INTRQ as a level on the channel's IRQ line (masked by
//! nIEN, cleared by a status read or a new command), software reset with the ATA / ATAPI
//! signatures, EXECUTE DEVICE DIAGNOSTIC, and the bus-master registers (command: start and
//! direction, status: active, error, interrupt (write-1-to-clear), drive DMA capable bits,
//! PRD table address).
//!
//! DMA runs synchronously: when Start is set with a DMA command pending, or when a DMA
//! command is issued while the engine is active. The PRD table is walked in guest memory:
//! buffer addresses with bit 0 masked, byte counts with bit 0 masked (0 = 64 KiB), EOT in
//! bit 31; the walk never leaves the 64 KiB page the table starts in (at most 8192 entries),
//! so an unterminated table ends. A table shorter than the transfer, a table or buffer
//! outside guest RAM, or bus mastering disabled in the PCI command register abort the
//! command before any byte moves (ATA ERR + ABRT, ATAPI CHECK CONDITION) and set the
//! bus-master error and interrupt bits. A table longer than the transfer leaves Active set,
//! as the datasheet describes.
//!
//! Not emulated: timing (commands complete at once, BSY is only seen during SRST), the
//! PIIX3 slave timing / UDMA registers beyond 0x44 (stored only), native-mode operation
//! (the prog-if is read-only), PIO and DMA in flight across save/restore (the state holds
//! registers and settings; a command in progress is lost), overlapped / queued commands.

use crate::ata::{AtaDisk, AtaDiskSettings};
use crate::atapi::{AtapiCdrom, AtapiState};
use crate::block::BlockBackend;
use crate::bus::{BusDevice, SharedDevice};
use crate::irq::IrqLine;
use crate::pci::{PciConfigSpace, PciFunction, REG_COMMAND, REG_STATUS};
use crate::GuestMemory;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, MutexGuard};
use vm_memory::{Bytes, GuestAddress};

pub const VENDOR_INTEL: u16 = 0x8086;
pub const DEVICE_82371SB_IDE: u16 = 0x7010;
/// Mass storage / IDE / legacy mode on both channels, bus master.
pub const CLASS_IDE_LEGACY_BUS_MASTER: u32 = 0x01_01_80;
/// The bus-master I/O block.
pub const BUS_MASTER_BAR: usize = 4;
pub const BUS_MASTER_BAR_SIZE: u64 = 16;

pub const CHANNELS: usize = 2;
pub const UNITS_PER_CHANNEL: usize = 2;
/// Legacy command block bases and the control block ports (primary, secondary).
pub const COMMAND_BLOCK_BASES: [u64; CHANNELS] = [0x1f0, 0x170];
pub const CONTROL_BLOCK_PORTS: [u64; CHANNELS] = [0x3f6, 0x376];
pub const COMMAND_BLOCK_LEN: u64 = 8;
pub const CONTROL_BLOCK_LEN: u64 = 1;
/// ISA IRQs of the two channels.
pub const CHANNEL_IRQS: [u8; CHANNELS] = [14, 15];

/// IDE timing registers (IDETIM primary at 0x40, secondary at 0x42; SIDETIM at 0x44).
pub const REG_IDETIM: usize = 0x40;
/// IDETIM bit 15: the channel decodes its legacy ports.
pub const IDETIM_DECODE_ENABLE: u16 = 0x8000;

// Status register.
pub const STATUS_ERR: u8 = 0x01;
pub const STATUS_DRQ: u8 = 0x08;
pub const STATUS_DSC: u8 = 0x10;
pub const STATUS_DF: u8 = 0x20;
pub const STATUS_DRDY: u8 = 0x40;
pub const STATUS_BSY: u8 = 0x80;
// Error register.
pub const ERROR_AMNF: u8 = 0x01;
pub const ERROR_ABRT: u8 = 0x04;
pub const ERROR_IDNF: u8 = 0x10;
pub const ERROR_UNC: u8 = 0x40;
/// Error register value after reset / diagnostics: device 0 passed.
pub const ERROR_DIAGNOSTIC_PASSED: u8 = 0x01;
// Device control register.
pub const CONTROL_NIEN: u8 = 0x02;
pub const CONTROL_SRST: u8 = 0x04;
pub const CONTROL_HOB: u8 = 0x80;
/// Device register bit 4: unit 1 selected; bit 6: LBA addressing.
pub const DEVICE_UNIT1: u8 = 0x10;
pub const DEVICE_LBA: u8 = 0x40;

// Bus-master registers (offsets inside a channel's 8 bytes).
pub const BM_COMMAND: u64 = 0;
pub const BM_STATUS: u64 = 2;
pub const BM_PRD_ADDRESS: u64 = 4;
pub const BM_COMMAND_START: u8 = 0x01;
/// 1 = the bus master writes memory (a device-to-host transfer).
pub const BM_COMMAND_WRITE_MEMORY: u8 = 0x08;
pub const BM_STATUS_ACTIVE: u8 = 0x01;
pub const BM_STATUS_ERROR: u8 = 0x02;
pub const BM_STATUS_INTERRUPT: u8 = 0x04;
pub const BM_STATUS_DRIVE0_DMA: u8 = 0x20;
pub const BM_STATUS_DRIVE1_DMA: u8 = 0x40;

/// ATA command handled by the channel (it concerns both units).
const CMD_EXECUTE_DEVICE_DIAGNOSTIC: u8 = 0x90;
/// PRD entries never cross out of the 64 KiB page the table starts in.
const PRD_TABLE_PAGE: u64 = 0x1_0000;
const PRD_ENTRY_SIZE: u64 = 8;
const PRD_EOT: u32 = 0x8000_0000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdeError {
    #[error("IDE channel {0} does not exist (0 = primary, 1 = secondary)")]
    NoSuchChannel(usize),
    #[error("IDE unit {0} does not exist (0 = master, 1 = slave)")]
    NoSuchUnit(usize),
    #[error("IDE {channel}:{unit} is not a CD-ROM drive, its medium cannot be changed")]
    NotACdrom { channel: usize, unit: usize },
    #[error(
        "the guest has locked the CD-ROM tray of IDE {channel}:{unit}; it was asked to eject, \
         try again when it has, or force the change"
    )]
    MediumLocked { channel: usize, unit: usize },
}

/// What is attached to a unit.
pub enum Drive {
    /// An ATA hard disk.
    Disk(Box<dyn BlockBackend>),
    /// An ATAPI CD/DVD-ROM drive, with or without a medium.
    Cdrom(Option<Box<dyn BlockBackend>>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DriveKind {
    Disk,
    Cdrom,
}

/// I/O counters of one attached drive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoCounters {
    pub read_bytes: u64,
    pub read_ops: u64,
    pub write_bytes: u64,
    pub write_ops: u64,
    pub flushes: u64,
}

/// Counters of a drive, as [`PiixIde::stats`] reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveStats {
    pub channel: usize,
    pub unit: usize,
    pub kind: DriveKind,
    pub counters: IoCounters,
}

/// One unit's task-file registers (writes reach both units of a channel, as on the cable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFile {
    pub feature: u8,
    pub hob_feature: u8,
    pub sector_count: u8,
    pub hob_sector_count: u8,
    pub lba_low: u8,
    pub hob_lba_low: u8,
    pub lba_mid: u8,
    pub hob_lba_mid: u8,
    pub lba_high: u8,
    pub hob_lba_high: u8,
    pub device: u8,
    pub status: u8,
    pub error: u8,
}

impl TaskFile {
    /// 28-bit LBA from the registers (device bits 3:0 are LBA 27:24).
    pub fn lba28(&self) -> u64 {
        u64::from(self.device & 0x0f) << 24
            | u64::from(self.lba_high) << 16
            | u64::from(self.lba_mid) << 8
            | u64::from(self.lba_low)
    }

    pub fn lba48(&self) -> u64 {
        u64::from(self.hob_lba_high) << 40
            | u64::from(self.hob_lba_mid) << 32
            | u64::from(self.hob_lba_low) << 24
            | u64::from(self.lba_high) << 16
            | u64::from(self.lba_mid) << 8
            | u64::from(self.lba_low)
    }

    /// Sector count of a 28-bit command (0 means 256).
    pub fn count28(&self) -> u32 {
        match self.sector_count {
            0 => 256,
            n => u32::from(n),
        }
    }

    /// Sector count of a 48-bit command (0 means 65536).
    pub fn count48(&self) -> u32 {
        match u32::from(self.hob_sector_count) << 8 | u32::from(self.sector_count) {
            0 => 65536,
            n => n,
        }
    }

    pub fn set_lba28(&mut self, lba: u64) {
        self.lba_low = lba as u8;
        self.lba_mid = (lba >> 8) as u8;
        self.lba_high = (lba >> 16) as u8;
        self.device = (self.device & 0xf0) | ((lba >> 24) as u8 & 0x0f);
    }

    pub fn set_lba48(&mut self, lba: u64) {
        self.lba_low = lba as u8;
        self.lba_mid = (lba >> 8) as u8;
        self.lba_high = (lba >> 16) as u8;
        self.hob_lba_low = (lba >> 24) as u8;
        self.hob_lba_mid = (lba >> 32) as u8;
        self.hob_lba_high = (lba >> 40) as u8;
    }

    /// The reset / diagnostic signature: 0x00/0x00 for a disk, 0x14/0xeb for ATAPI.
    pub fn set_signature(&mut self, atapi: bool) {
        self.sector_count = 1;
        self.lba_low = 1;
        (self.lba_mid, self.lba_high) = if atapi { (0x14, 0xeb) } else { (0, 0) };
        self.device &= DEVICE_UNIT1;
    }
}

/// A PIO data transfer in progress.
pub(crate) struct Pio {
    pub(crate) data: Vec<u8>,
    pub(crate) pos: usize,
    /// Device to host (the guest reads the data port).
    pub(crate) to_host: bool,
}

/// The part of a unit the command sets drive: registers, the transfer in progress,
/// the interrupt request and the counters.
#[derive(Default)]
pub(crate) struct UnitIo {
    pub(crate) regs: TaskFile,
    pub(crate) pio: Option<Pio>,
    pub(crate) dma_pending: bool,
    irq_request: bool,
    pub(crate) counters: IoCounters,
}

impl UnitIo {
    pub(crate) fn raise_irq(&mut self) {
        self.irq_request = true;
    }

    /// Data for the guest to read; status DRQ.
    pub(crate) fn start_pio_in(&mut self, data: Vec<u8>, irq: bool) {
        self.pio = Some(Pio {
            data,
            pos: 0,
            to_host: true,
        });
        self.dma_pending = false;
        self.regs.status = STATUS_DRDY | STATUS_DSC | STATUS_DRQ;
        if irq {
            self.raise_irq();
        }
    }

    /// Room for `len` bytes the guest writes; status DRQ.
    pub(crate) fn start_pio_out(&mut self, len: usize, irq: bool) {
        self.pio = Some(Pio {
            data: vec![0; len],
            pos: 0,
            to_host: false,
        });
        self.dma_pending = false;
        self.regs.status = STATUS_DRDY | STATUS_DSC | STATUS_DRQ;
        if irq {
            self.raise_irq();
        }
    }

    /// A DMA command waits for the bus master.
    pub(crate) fn start_dma(&mut self) {
        self.pio = None;
        self.dma_pending = true;
        self.regs.status = STATUS_DRDY | STATUS_DSC | STATUS_DRQ;
    }

    /// The command finished without error and interrupts.
    pub(crate) fn complete(&mut self) {
        self.finish_quietly();
        self.raise_irq();
    }

    /// The command finished without error, no interrupt (end of a PIO read).
    pub(crate) fn finish_quietly(&mut self) {
        self.pio = None;
        self.dma_pending = false;
        self.regs.status = STATUS_DRDY | STATUS_DSC;
        self.regs.error = 0;
    }

    /// The command failed with `error` bits and interrupts.
    pub(crate) fn abort(&mut self, error: u8) {
        self.pio = None;
        self.dma_pending = false;
        self.regs.status = STATUS_DRDY | STATUS_DSC | STATUS_ERR;
        self.regs.error = error;
        self.raise_irq();
    }

    fn cancel(&mut self) {
        self.pio = None;
        self.dma_pending = false;
    }
}

/// Why a DMA transfer could not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DmaFault {
    /// The PRD table ends (or leaves its 64 KiB page) before the transfer does.
    ShortTable,
    /// A PRD or a buffer lies outside guest RAM, or bus mastering is disabled.
    Memory,
}

/// The guest buffers a PRD table describes, consumed in order.
pub(crate) struct PrdCursor<'a> {
    memory: &'a GuestMemory,
    segments: Vec<(u64, usize)>,
    index: usize,
    offset: usize,
}

impl PrdCursor<'_> {
    /// Copies `data` into the guest buffers.
    pub(crate) fn copy_to_guest(&mut self, mut data: &[u8]) -> Result<(), DmaFault> {
        while !data.is_empty() {
            let &(addr, len) = self.segments.get(self.index).ok_or(DmaFault::ShortTable)?;
            let n = (len - self.offset).min(data.len());
            let (now, rest) = data.split_at(n);
            self.memory
                .write_slice(now, GuestAddress(addr + self.offset as u64))
                .map_err(|_| DmaFault::Memory)?;
            data = rest;
            self.advance(n, len);
        }
        Ok(())
    }

    /// Fills `buf` from the guest buffers.
    pub(crate) fn copy_from_guest(&mut self, mut buf: &mut [u8]) -> Result<(), DmaFault> {
        while !buf.is_empty() {
            let &(addr, len) = self.segments.get(self.index).ok_or(DmaFault::ShortTable)?;
            let n = (len - self.offset).min(buf.len());
            let (now, rest) = std::mem::take(&mut buf).split_at_mut(n);
            self.memory
                .read_slice(now, GuestAddress(addr + self.offset as u64))
                .map_err(|_| DmaFault::Memory)?;
            buf = rest;
            self.advance(n, len);
        }
        Ok(())
    }

    fn advance(&mut self, n: usize, len: usize) {
        self.offset += n;
        if self.offset >= len {
            self.index += 1;
            self.offset = 0;
        }
    }
}

/// The PRD buffers covering `needed` bytes, and whether the table ends exactly there.
fn walk_prd_table(
    memory: &GuestMemory,
    table: u32,
    needed: u64,
) -> Result<(Vec<(u64, usize)>, bool), DmaFault> {
    let mut entry = u64::from(table & !3);
    let page = entry & !(PRD_TABLE_PAGE - 1);
    let mut segments = Vec::new();
    let mut covered = 0u64;
    loop {
        if entry & !(PRD_TABLE_PAGE - 1) != page {
            return Err(DmaFault::ShortTable);
        }
        let mut raw = [0u8; 8];
        memory
            .read_slice(&mut raw, GuestAddress(entry))
            .map_err(|_| DmaFault::Memory)?;
        let address = u64::from(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) & !1);
        let flags = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
        let len = match flags & 0xfffe {
            0 => 0x1_0000,
            n => u64::from(n),
        };
        let used = len.min(needed - covered);
        if used > 0 {
            if !vm_memory::GuestMemoryBackend::check_range(
                memory,
                GuestAddress(address),
                used as usize,
            ) {
                return Err(DmaFault::Memory);
            }
            segments.push((address, used as usize));
        }
        covered += used;
        let end_of_table = flags & PRD_EOT != 0;
        if covered >= needed {
            return Ok((segments, end_of_table && used == len));
        }
        if end_of_table {
            return Err(DmaFault::ShortTable);
        }
        entry += PRD_ENTRY_SIZE;
    }
}

/// What a unit holds.
pub(crate) enum UnitDevice {
    Absent,
    Disk(AtaDisk),
    Cdrom(AtapiCdrom),
}

pub(crate) struct Unit {
    pub(crate) io: UnitIo,
    pub(crate) device: UnitDevice,
}

impl Unit {
    fn absent() -> Self {
        Self {
            io: UnitIo::default(),
            device: UnitDevice::Absent,
        }
    }

    fn present(&self) -> bool {
        !matches!(self.device, UnitDevice::Absent)
    }

    fn is_atapi(&self) -> bool {
        matches!(self.device, UnitDevice::Cdrom(_))
    }

    /// Power-on / software reset: signature, diagnostic code, ready status.
    fn reset(&mut self) {
        self.io.cancel();
        self.io.regs.set_signature(self.is_atapi());
        self.io.regs.error = ERROR_DIAGNOSTIC_PASSED;
        self.io.regs.status = match self.device {
            UnitDevice::Disk(_) => STATUS_DRDY | STATUS_DSC,
            UnitDevice::Cdrom(_) | UnitDevice::Absent => 0,
        };
        match &mut self.device {
            UnitDevice::Disk(disk) => disk.reset(),
            UnitDevice::Cdrom(cdrom) => cdrom.reset(),
            UnitDevice::Absent => {}
        }
    }

    fn execute(&mut self, command: u8) {
        match &mut self.device {
            UnitDevice::Disk(disk) => disk.execute(&mut self.io, command),
            UnitDevice::Cdrom(cdrom) => cdrom.execute(&mut self.io, command),
            UnitDevice::Absent => {}
        }
    }

    fn pio_done(&mut self, data: Vec<u8>) {
        match &mut self.device {
            UnitDevice::Disk(disk) => disk.pio_done(&mut self.io, data),
            UnitDevice::Cdrom(cdrom) => cdrom.pio_done(&mut self.io, data),
            UnitDevice::Absent => {}
        }
    }

    fn dma_length(&self) -> u64 {
        match &self.device {
            UnitDevice::Disk(disk) => disk.dma_length(),
            UnitDevice::Cdrom(cdrom) => cdrom.dma_length(),
            UnitDevice::Absent => 0,
        }
    }

    fn run_dma(&mut self, cursor: &mut PrdCursor) -> Result<(), DmaFault> {
        match &mut self.device {
            UnitDevice::Disk(disk) => disk.run_dma(&mut self.io, cursor),
            UnitDevice::Cdrom(cdrom) => cdrom.run_dma(&mut self.io, cursor),
            UnitDevice::Absent => Ok(()),
        }
    }

    fn fail_dma(&mut self) {
        match &mut self.device {
            UnitDevice::Disk(disk) => disk.fail_dma(&mut self.io),
            UnitDevice::Cdrom(cdrom) => cdrom.fail_dma(&mut self.io),
            UnitDevice::Absent => self.io.cancel(),
        }
    }
}

/// Save/restore state of one channel's registers (transfers in flight are not kept).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelState {
    pub registers: [TaskFile; UNITS_PER_CHANNEL],
    pub selected: usize,
    pub device_control: u8,
    pub irq_pending: bool,
    pub bm_command: u8,
    pub bm_status: u8,
    pub prd_address: u32,
    /// Settings of the disk units (None for other units).
    pub disks: [Option<AtaDiskSettings>; UNITS_PER_CHANNEL],
    /// Sense, lock and event state of the CD-ROM units (None for other units).
    pub cdroms: [Option<AtapiState>; UNITS_PER_CHANNEL],
}

/// One IDE channel: two units, the shared control register, the bus master.
pub(crate) struct Channel {
    units: [Unit; UNITS_PER_CHANNEL],
    selected: usize,
    device_control: u8,
    irq_pending: bool,
    line_high: bool,
    irq: Arc<dyn IrqLine>,
    memory: GuestMemory,
    bm_command: u8,
    bm_status: u8,
    prd_address: u32,
    decode_enabled: bool,
    bus_master_enabled: bool,
    /// Units whose medium the guest ejected since the engine last asked.
    guest_ejects: Vec<usize>,
}

impl Channel {
    fn new(memory: GuestMemory, irq: Arc<dyn IrqLine>) -> Self {
        Self {
            units: [Unit::absent(), Unit::absent()],
            selected: 0,
            device_control: 0,
            irq_pending: false,
            line_high: false,
            irq,
            memory,
            bm_command: 0,
            bm_status: 0,
            prd_address: 0,
            decode_enabled: true,
            bus_master_enabled: false,
            guest_ejects: Vec::new(),
        }
    }

    fn any_present(&self) -> bool {
        self.units.iter().any(Unit::present)
    }

    fn selected_unit(&mut self) -> &mut Unit {
        &mut self.units[self.selected & 1]
    }

    /// Hardware reset: registers, bus master, line low.
    fn hardware_reset(&mut self) {
        for unit in &mut self.units {
            unit.io.regs = TaskFile::default();
            unit.reset();
        }
        self.selected = 0;
        self.device_control = 0;
        self.bm_command = 0;
        self.bm_status &= BM_STATUS_DRIVE0_DMA | BM_STATUS_DRIVE1_DMA;
        self.prd_address = 0;
        self.irq_pending = false;
        self.update_irq();
    }

    /// Turns interrupt requests of the units into the channel's pending interrupt.
    fn collect_irqs(&mut self) {
        let mut raised = false;
        for unit in &mut self.units {
            raised |= std::mem::take(&mut unit.io.irq_request);
        }
        for index in 0..UNITS_PER_CHANNEL {
            if let UnitDevice::Cdrom(cdrom) = &mut self.units[index].device {
                if cdrom.take_guest_eject() && !self.guest_ejects.contains(&index) {
                    self.guest_ejects.push(index);
                }
            }
        }
        if raised {
            self.irq_pending = true;
            self.bm_status |= BM_STATUS_INTERRUPT;
        }
        self.update_irq();
    }

    fn update_irq(&mut self) {
        let level = self.irq_pending && self.device_control & CONTROL_NIEN == 0;
        if level != self.line_high {
            self.line_high = level;
            self.irq.set_level(level);
        }
    }

    fn read_status(&mut self, clear_irq: bool) -> u8 {
        if !self.any_present() {
            return 0xff;
        }
        let unit = self.selected_unit();
        if !unit.present() {
            return 0;
        }
        let status = unit.io.regs.status;
        if clear_irq {
            self.irq_pending = false;
            self.update_irq();
        }
        status
    }

    fn read_register(&mut self, offset: u64) -> u8 {
        if offset == 7 {
            return self.read_status(true);
        }
        if !self.any_present() {
            return 0xff;
        }
        let hob = self.device_control & CONTROL_HOB != 0;
        let regs = &self.selected_unit().io.regs;
        match (offset, hob) {
            (1, false) => regs.error,
            (1, true) => regs.hob_feature,
            (2, false) => regs.sector_count,
            (2, true) => regs.hob_sector_count,
            (3, false) => regs.lba_low,
            (3, true) => regs.hob_lba_low,
            (4, false) => regs.lba_mid,
            (4, true) => regs.hob_lba_mid,
            (5, false) => regs.lba_high,
            (5, true) => regs.hob_lba_high,
            (6, _) => regs.device,
            _ => 0xff,
        }
    }

    fn write_register(&mut self, offset: u64, value: u8) {
        if (1..=6).contains(&offset) {
            self.device_control &= !CONTROL_HOB;
        }
        for unit in &mut self.units {
            let r = &mut unit.io.regs;
            match offset {
                1 => (r.hob_feature, r.feature) = (r.feature, value),
                2 => (r.hob_sector_count, r.sector_count) = (r.sector_count, value),
                3 => (r.hob_lba_low, r.lba_low) = (r.lba_low, value),
                4 => (r.hob_lba_mid, r.lba_mid) = (r.lba_mid, value),
                5 => (r.hob_lba_high, r.lba_high) = (r.lba_high, value),
                6 => r.device = value,
                _ => {}
            }
        }
        match offset {
            6 => self.selected = usize::from(value & DEVICE_UNIT1 != 0),
            7 => self.write_command(value),
            _ => {}
        }
    }

    fn write_command(&mut self, command: u8) {
        if self.device_control & CONTROL_SRST != 0 {
            return;
        }
        let selected = self.selected & 1;
        if !self.units[selected].present() {
            return;
        }
        // BSY is never visible outside SRST; a new command replaces any transfer.
        self.irq_pending = false;
        if command == CMD_EXECUTE_DEVICE_DIAGNOSTIC {
            for unit in &mut self.units {
                unit.reset();
            }
            self.units[selected].io.raise_irq();
        } else {
            self.units[selected].io.cancel();
            self.units[selected].execute(command);
        }
        self.collect_irqs();
        if self.units[selected].io.dma_pending && self.bm_status & BM_STATUS_ACTIVE != 0 {
            self.run_dma();
        }
    }

    fn write_device_control(&mut self, value: u8) {
        let was_reset = self.device_control & CONTROL_SRST != 0;
        self.device_control = value;
        if value & CONTROL_SRST != 0 && !was_reset {
            for unit in &mut self.units {
                unit.io.cancel();
                if unit.present() {
                    unit.io.regs.status = STATUS_BSY;
                }
            }
            self.irq_pending = false;
        } else if value & CONTROL_SRST == 0 && was_reset {
            for unit in &mut self.units {
                unit.reset();
            }
            self.selected = 0;
        }
        self.update_irq();
    }

    fn read_data(&mut self, out: &mut [u8]) {
        out.fill(0);
        let unit = self.selected_unit();
        let Some(pio) = unit.io.pio.as_mut().filter(|p| p.to_host) else {
            return;
        };
        let rest = pio.data.get(pio.pos..).unwrap_or(&[]);
        let n = rest.len().min(out.len());
        out[..n].copy_from_slice(&rest[..n]);
        pio.pos += n;
        if pio.pos >= pio.data.len() {
            if let Some(pio) = unit.io.pio.take() {
                unit.io.regs.status &= !STATUS_DRQ;
                unit.pio_done(pio.data);
            }
            self.collect_irqs();
        }
    }

    fn write_data(&mut self, data: &[u8]) {
        let unit = self.selected_unit();
        let Some(pio) = unit.io.pio.as_mut().filter(|p| !p.to_host) else {
            return;
        };
        let room = pio.data.get_mut(pio.pos..).unwrap_or(&mut []);
        let n = room.len().min(data.len());
        room[..n].copy_from_slice(&data[..n]);
        pio.pos += n;
        if pio.pos >= pio.data.len() {
            if let Some(pio) = unit.io.pio.take() {
                unit.io.regs.status &= !STATUS_DRQ;
                unit.pio_done(pio.data);
            }
            self.collect_irqs();
            let unit = self.selected & 1;
            if self.units[unit].io.dma_pending && self.bm_status & BM_STATUS_ACTIVE != 0 {
                self.run_dma();
            }
        }
    }

    fn bm_read(&self, offset: u64) -> u8 {
        match offset {
            BM_COMMAND => self.bm_command,
            BM_STATUS => self.bm_status,
            4..=7 => self.prd_address.to_le_bytes()[(offset - 4) as usize],
            _ => 0,
        }
    }

    fn bm_write(&mut self, offset: u64, value: u8) {
        match offset {
            BM_COMMAND => {
                let was_started = self.bm_command & BM_COMMAND_START != 0;
                self.bm_command = value & (BM_COMMAND_START | BM_COMMAND_WRITE_MEMORY);
                let start = value & BM_COMMAND_START != 0;
                if start && !was_started {
                    self.bm_status |= BM_STATUS_ACTIVE;
                    self.run_dma();
                } else if !start {
                    self.bm_status &= !BM_STATUS_ACTIVE;
                }
            }
            BM_STATUS => {
                let clear = value & (BM_STATUS_ERROR | BM_STATUS_INTERRUPT);
                let capable = BM_STATUS_DRIVE0_DMA | BM_STATUS_DRIVE1_DMA;
                self.bm_status = (self.bm_status & !clear & !capable) | (value & capable);
            }
            4..=7 => {
                let mut bytes = self.prd_address.to_le_bytes();
                bytes[(offset - 4) as usize] = value;
                self.prd_address = u32::from_le_bytes(bytes) & !3;
            }
            _ => {}
        }
    }

    /// Runs the pending DMA command of a unit through the PRD table.
    fn run_dma(&mut self) {
        let Some(index) = (0..UNITS_PER_CHANNEL).find(|&u| self.units[u].io.dma_pending) else {
            return;
        };
        let needed = self.units[index].dma_length();
        let walked = if self.bus_master_enabled {
            walk_prd_table(&self.memory, self.prd_address, needed)
        } else {
            Err(DmaFault::Memory)
        };
        let result = walked.and_then(|(segments, exhausted)| {
            let mut cursor = PrdCursor {
                memory: &self.memory,
                segments,
                index: 0,
                offset: 0,
            };
            self.units[index].run_dma(&mut cursor).map(|()| exhausted)
        });
        match result {
            Ok(exhausted) => {
                if exhausted {
                    self.bm_status &= !BM_STATUS_ACTIVE;
                }
            }
            Err(fault) => {
                log::debug!("ide: DMA aborted: {fault:?}");
                self.units[index].fail_dma();
                self.bm_status = (self.bm_status & !BM_STATUS_ACTIVE) | BM_STATUS_ERROR;
            }
        }
        self.units[index].io.dma_pending = false;
        self.collect_irqs();
    }

    fn state(&self) -> ChannelState {
        ChannelState {
            registers: [self.units[0].io.regs, self.units[1].io.regs],
            selected: self.selected,
            device_control: self.device_control,
            irq_pending: self.irq_pending,
            bm_command: self.bm_command,
            bm_status: self.bm_status,
            prd_address: self.prd_address,
            disks: self.units.each_ref().map(|u| match &u.device {
                UnitDevice::Disk(disk) => Some(disk.settings()),
                _ => None,
            }),
            cdroms: self.units.each_ref().map(|u| match &u.device {
                UnitDevice::Cdrom(cdrom) => Some(cdrom.state()),
                _ => None,
            }),
        }
    }

    fn restore(&mut self, state: &ChannelState) {
        for (unit, regs) in self.units.iter_mut().zip(state.registers.iter()) {
            unit.io.cancel();
            unit.io.regs = *regs;
            // A transfer in flight is lost: do not claim DRQ or BSY for it.
            unit.io.regs.status &= !(STATUS_DRQ | STATUS_BSY);
        }
        for (index, unit) in self.units.iter_mut().enumerate() {
            match &mut unit.device {
                UnitDevice::Disk(disk) => {
                    if let Some(Some(settings)) = state.disks.get(index) {
                        disk.restore_settings(settings);
                    }
                }
                UnitDevice::Cdrom(cdrom) => {
                    if let Some(Some(saved)) = state.cdroms.get(index) {
                        cdrom.restore_state(saved);
                    }
                }
                UnitDevice::Absent => {}
            }
        }
        self.selected = state.selected & 1;
        self.device_control = state.device_control;
        self.irq_pending = state.irq_pending;
        self.bm_command = state.bm_command & (BM_COMMAND_START | BM_COMMAND_WRITE_MEMORY);
        self.bm_status = state.bm_status & !BM_STATUS_ACTIVE;
        self.prd_address = state.prd_address & !3;
        self.update_irq();
    }
}

fn lock(channel: &Mutex<Channel>) -> MutexGuard<'_, Channel> {
    channel.lock().unwrap_or_else(|e| e.into_inner())
}

/// A channel's command block (8 ports: data, error/feature, sector count, LBA low/mid/high,
/// device, status/command).
struct CommandBlock(Arc<Mutex<Channel>>);

impl BusDevice for CommandBlock {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut channel = lock(&self.0);
        if !channel.decode_enabled {
            data.fill(0xff);
            return;
        }
        if offset == 0 {
            channel.read_data(data);
            return;
        }
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = channel.read_register(offset.saturating_add(i as u64));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut channel = lock(&self.0);
        if !channel.decode_enabled {
            return;
        }
        if offset == 0 {
            channel.write_data(data);
            return;
        }
        for (i, &byte) in data.iter().enumerate() {
            channel.write_register(offset.saturating_add(i as u64), byte);
        }
    }
}

/// A channel's control block (alternate status / device control).
struct ControlBlock(Arc<Mutex<Channel>>);

impl BusDevice for ControlBlock {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let mut channel = lock(&self.0);
        let value = if channel.decode_enabled {
            channel.read_status(false)
        } else {
            0xff
        };
        data.fill(value);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut channel = lock(&self.0);
        if let (true, Some(&value)) = (channel.decode_enabled, data.first()) {
            channel.write_device_control(value);
        }
    }
}

/// Save/restore state of the controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PiixIdeState {
    pub config: PciConfigSpace,
    pub channels: [ChannelState; CHANNELS],
}

/// The PIIX3 IDE function. The engine registers [`Self::command_block`] and
/// [`Self::control_block`] of each channel at the legacy ports and the function itself at
/// 00:01.1.
pub struct PiixIde {
    config: PciConfigSpace,
    channels: [Arc<Mutex<Channel>>; CHANNELS],
}

impl PiixIde {
    pub fn new(
        memory: GuestMemory,
        irq_primary: Arc<dyn IrqLine>,
        irq_secondary: Arc<dyn IrqLine>,
    ) -> Self {
        let mut config = PciConfigSpace::new();
        config.set_ids(VENDOR_INTEL, DEVICE_82371SB_IDE);
        config.set_class(CLASS_IDE_LEGACY_BUS_MASTER);
        config.add_io_bar(BUS_MASTER_BAR, BUS_MASTER_BAR_SIZE);
        config.set_interrupt_pin(0);
        config.set_writable_range(REG_IDETIM, 5);
        let mut ide = Self {
            config,
            channels: [
                Arc::new(Mutex::new(Channel::new(memory.clone(), irq_primary))),
                Arc::new(Mutex::new(Channel::new(memory, irq_secondary))),
            ],
        };
        ide.power_on();
        ide
    }

    fn power_on(&mut self) {
        self.config.set_u16(REG_STATUS, 0x0280); // fast back-to-back, DEVSEL medium
        self.config.set_u16(REG_IDETIM, IDETIM_DECODE_ENABLE);
        self.config.set_u16(REG_IDETIM + 2, IDETIM_DECODE_ENABLE);
        self.config.set_u8(REG_IDETIM + 4, 0);
        for channel in &self.channels {
            lock(channel).hardware_reset();
        }
        self.sync_config();
    }

    /// Pushes the decode enables and bus-master enable into the channels.
    fn sync_config(&self) {
        let bus_master = self.config.bus_master_enabled();
        for (index, channel) in self.channels.iter().enumerate() {
            let idetim = self.config.read_u16(REG_IDETIM + 2 * index);
            let mut channel = lock(channel);
            channel.decode_enabled = idetim & IDETIM_DECODE_ENABLE != 0;
            channel.bus_master_enabled = bus_master;
        }
    }

    fn channel(&self, channel: usize) -> Result<&Arc<Mutex<Channel>>, IdeError> {
        self.channels
            .get(channel)
            .ok_or(IdeError::NoSuchChannel(channel))
    }

    /// The command block of `channel` (register it at [`COMMAND_BLOCK_BASES`], 8 ports).
    /// An out-of-range channel gets the secondary's.
    pub fn command_block(&self, channel: usize) -> SharedDevice {
        Arc::new(Mutex::new(CommandBlock(
            self.channels[channel.min(CHANNELS - 1)].clone(),
        )))
    }

    /// The control block of `channel` (register it at [`CONTROL_BLOCK_PORTS`], 1 port).
    pub fn control_block(&self, channel: usize) -> SharedDevice {
        Arc::new(Mutex::new(ControlBlock(
            self.channels[channel.min(CHANNELS - 1)].clone(),
        )))
    }

    /// Attaches (or replaces) the drive of `channel`:`unit`; the unit comes up as after a
    /// reset, with its signature.
    pub fn attach(&self, channel: usize, unit: usize, drive: Drive) -> Result<(), IdeError> {
        let channel = self.channel(channel)?;
        if unit >= UNITS_PER_CHANNEL {
            return Err(IdeError::NoSuchUnit(unit));
        }
        let mut channel = lock(channel);
        let slot = &mut channel.units[unit];
        slot.device = match drive {
            Drive::Disk(backend) => UnitDevice::Disk(AtaDisk::new(backend)),
            Drive::Cdrom(media) => UnitDevice::Cdrom(AtapiCdrom::new(media)),
        };
        slot.reset();
        let dma_capable = if unit == 0 {
            BM_STATUS_DRIVE0_DMA
        } else {
            BM_STATUS_DRIVE1_DMA
        };
        channel.bm_status |= dma_capable;
        Ok(())
    }

    /// Removes the drive of `channel`:`unit`.
    pub fn detach(&self, channel: usize, unit: usize) -> Result<(), IdeError> {
        let channel = self.channel(channel)?;
        let mut channel = lock(channel);
        let slot = channel
            .units
            .get_mut(unit)
            .ok_or(IdeError::NoSuchUnit(unit))?;
        *slot = Unit::absent();
        Ok(())
    }

    /// Inserts `media` into (Some) or removes it from (None) the CD-ROM drive at
    /// `channel`:`unit`. While the guest has locked the tray the change is refused (and the
    /// guest is sent an eject request) unless `force` is set. A new medium raises a unit
    /// attention and a "new media" event.
    pub fn change_media(
        &self,
        channel: usize,
        unit: usize,
        media: Option<Box<dyn BlockBackend>>,
        force: bool,
    ) -> Result<(), IdeError> {
        let index = channel;
        let channel = self.channel(channel)?;
        let mut channel = lock(channel);
        let slot = channel
            .units
            .get_mut(unit)
            .ok_or(IdeError::NoSuchUnit(unit))?;
        let UnitDevice::Cdrom(cdrom) = &mut slot.device else {
            return Err(IdeError::NotACdrom {
                channel: index,
                unit,
            });
        };
        cdrom
            .change_media(media, force)
            .map_err(|()| IdeError::MediumLocked {
                channel: index,
                unit,
            })
    }

    /// Whether the guest has locked the tray of the CD-ROM at `channel`:`unit`.
    pub fn medium_locked(&self, channel: usize, unit: usize) -> bool {
        self.channels.get(channel).is_some_and(|c| {
            matches!(lock(c).units.get(unit).map(|u| &u.device),
                Some(UnitDevice::Cdrom(cd)) if cd.locked())
        })
    }

    /// The CD-ROM units the guest ejected (START STOP UNIT) since the last call, as
    /// `(channel, unit)`; their media are already out.
    pub fn take_eject_requests(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (index, channel) in self.channels.iter().enumerate() {
            let mut channel = lock(channel);
            channel.collect_irqs();
            out.extend(channel.guest_ejects.drain(..).map(|unit| (index, unit)));
        }
        out
    }

    /// Counters of every attached drive.
    pub fn stats(&self) -> Vec<DriveStats> {
        let mut out = Vec::new();
        for (index, channel) in self.channels.iter().enumerate() {
            let channel = lock(channel);
            for (unit_index, unit) in channel.units.iter().enumerate() {
                let kind = match unit.device {
                    UnitDevice::Disk(_) => DriveKind::Disk,
                    UnitDevice::Cdrom(_) => DriveKind::Cdrom,
                    UnitDevice::Absent => continue,
                };
                out.push(DriveStats {
                    channel: index,
                    unit: unit_index,
                    kind,
                    counters: unit.io.counters,
                });
            }
        }
        out
    }

    pub fn state(&self) -> PiixIdeState {
        PiixIdeState {
            config: self.config.clone(),
            channels: [
                lock(&self.channels[0]).state(),
                lock(&self.channels[1]).state(),
            ],
        }
    }

    pub fn restore_state(&mut self, state: &PiixIdeState) {
        self.config = state.config.clone();
        for (channel, saved) in self.channels.iter().zip(state.channels.iter()) {
            lock(channel).restore(saved);
        }
        self.sync_config();
    }
}

impl PciFunction for PiixIde {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg + offset, data);
        if reg == REG_COMMAND || reg == REG_IDETIM {
            self.sync_config();
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *byte = match (bar, self.channels.get((at / 8) as usize)) {
                (BUS_MASTER_BAR, Some(channel)) => lock(channel).bm_read(at % 8),
                _ => 0xff,
            };
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            let at = offset.saturating_add(i as u64);
            if let (BUS_MASTER_BAR, Some(channel)) = (bar, self.channels.get((at / 8) as usize)) {
                lock(channel).bm_write(at % 8, byte);
            }
        }
    }

    fn reset(&mut self) {
        self.config.reset_header();
        self.power_on();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::block::MemoryBackend;
    use crate::irq::CountingIrq;
    use crate::test_support::TestRng;
    use vm_memory::GuestMemoryMmap;

    pub(crate) const RAM_SIZE: usize = 1 << 20;

    /// A controller on a small RAM with port devices, as the engine wires it.
    pub(crate) struct Machine {
        pub ide: PiixIde,
        pub memory: GuestMemory,
        pub irqs: [Arc<CountingIrq>; 2],
        command: [SharedDevice; 2],
        control: [SharedDevice; 2],
    }

    impl Machine {
        pub fn new() -> Self {
            let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap();
            let irqs = [CountingIrq::new(), CountingIrq::new()];
            let mut ide = PiixIde::new(memory.clone(), irqs[0].clone(), irqs[1].clone());
            // Firmware: BAR4 at 0xc000, I/O + bus master on.
            ide.config_write(0x20, 0, &0xc000u32.to_le_bytes());
            ide.config_write(0x04, 0, &[0x05, 0x00]);
            let command = [ide.command_block(0), ide.command_block(1)];
            let control = [ide.control_block(0), ide.control_block(1)];
            Self {
                ide,
                memory,
                irqs,
                command,
                control,
            }
        }

        pub fn with_disk(sectors: usize) -> Self {
            let m = Self::new();
            m.attach_disk(0, 0, disk_image(sectors), false);
            m
        }

        pub fn attach_disk(&self, ch: usize, unit: usize, data: Vec<u8>, read_only: bool) {
            self.ide
                .attach(
                    ch,
                    unit,
                    Drive::Disk(Box::new(MemoryBackend::new(data, read_only))),
                )
                .unwrap();
        }

        pub fn outb(&self, ch: usize, reg: u64, value: u8) {
            self.command[ch].lock().unwrap().write(reg, &[value]);
        }
        pub fn inb(&self, ch: usize, reg: u64) -> u8 {
            let mut b = [0u8];
            self.command[ch].lock().unwrap().read(reg, &mut b);
            b[0]
        }
        pub fn inw(&self, ch: usize) -> u16 {
            let mut b = [0u8; 2];
            self.command[ch].lock().unwrap().read(0, &mut b);
            u16::from_le_bytes(b)
        }
        pub fn outw(&self, ch: usize, value: u16) {
            self.command[ch]
                .lock()
                .unwrap()
                .write(0, &value.to_le_bytes());
        }
        pub fn alt_status(&self, ch: usize) -> u8 {
            let mut b = [0u8];
            self.control[ch].lock().unwrap().read(0, &mut b);
            b[0]
        }
        pub fn device_control(&self, ch: usize, value: u8) {
            self.control[ch].lock().unwrap().write(0, &[value]);
        }
        /// Reads `words` 16-bit words from the data port.
        pub fn read_words(&self, ch: usize, words: usize) -> Vec<u8> {
            let mut out = Vec::with_capacity(words * 2);
            for _ in 0..words {
                out.extend_from_slice(&self.inw(ch).to_le_bytes());
            }
            out
        }
        pub fn write_bytes(&self, ch: usize, data: &[u8]) {
            for pair in data.chunks(2) {
                let mut w = [0u8; 2];
                w[..pair.len()].copy_from_slice(pair);
                self.outw(ch, u16::from_le_bytes(w));
            }
        }
        /// Loads LBA28 registers and issues `command`.
        pub fn lba28_command(&self, ch: usize, unit: u8, command: u8, lba: u32, count: u8) {
            self.outb(ch, 6, 0xe0 | unit << 4 | ((lba >> 24) as u8 & 0xf));
            self.outb(ch, 2, count);
            self.outb(ch, 3, lba as u8);
            self.outb(ch, 4, (lba >> 8) as u8);
            self.outb(ch, 5, (lba >> 16) as u8);
            self.outb(ch, 7, command);
        }
        /// Loads LBA48 registers (HOB first, as Linux does) and issues `command`.
        pub fn lba48_command(&self, ch: usize, command: u8, lba: u64, count: u16) {
            self.outb(ch, 6, 0x40);
            self.outb(ch, 2, (count >> 8) as u8);
            self.outb(ch, 3, (lba >> 24) as u8);
            self.outb(ch, 4, (lba >> 32) as u8);
            self.outb(ch, 5, (lba >> 40) as u8);
            self.outb(ch, 2, count as u8);
            self.outb(ch, 3, lba as u8);
            self.outb(ch, 4, (lba >> 8) as u8);
            self.outb(ch, 5, (lba >> 16) as u8);
            self.outb(ch, 7, command);
        }
        pub fn bm_outb(&mut self, ch: usize, reg: u64, value: u8) {
            self.ide
                .bar_write(BUS_MASTER_BAR, ch as u64 * 8 + reg, &[value]);
        }
        pub fn bm_outl(&mut self, ch: usize, reg: u64, value: u32) {
            self.ide
                .bar_write(BUS_MASTER_BAR, ch as u64 * 8 + reg, &value.to_le_bytes());
        }
        pub fn bm_inb(&mut self, ch: usize, reg: u64) -> u8 {
            let mut b = [0u8];
            self.ide
                .bar_read(BUS_MASTER_BAR, ch as u64 * 8 + reg, &mut b);
            b[0]
        }
        /// Writes a PRD table at `table`: (address, byte count, end of table).
        pub fn write_prds(&self, table: u64, entries: &[(u32, u32, bool)]) {
            for (i, &(addr, count, eot)) in entries.iter().enumerate() {
                let flags = (count & 0xffff) | if eot { PRD_EOT } else { 0 };
                let at = GuestAddress(table + 8 * i as u64);
                self.memory.write_obj(addr, at).unwrap();
                self.memory
                    .write_obj(flags, GuestAddress(at.0 + 4))
                    .unwrap();
            }
        }
        /// Linux ata_bmdma_setup + start: table address, direction, clear, start.
        pub fn bm_setup(&mut self, ch: usize, table: u32, to_memory: bool) {
            self.bm_outl(ch, BM_PRD_ADDRESS, table);
            let dir = if to_memory {
                BM_COMMAND_WRITE_MEMORY
            } else {
                0
            };
            self.bm_outb(ch, BM_COMMAND, dir);
            self.bm_outb(ch, BM_STATUS, BM_STATUS_ERROR | BM_STATUS_INTERRUPT);
        }
        pub fn bm_start(&mut self, ch: usize, to_memory: bool) {
            let dir = if to_memory {
                BM_COMMAND_WRITE_MEMORY
            } else {
                0
            };
            self.bm_outb(ch, BM_COMMAND, dir | BM_COMMAND_START);
        }
        pub fn bm_stop(&mut self, ch: usize) {
            self.bm_outb(ch, BM_COMMAND, 0);
        }
        pub fn ram(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            self.memory
                .read_slice(&mut buf, GuestAddress(addr))
                .unwrap();
            buf
        }
        pub fn fill_ram(&self, value: u8) {
            self.memory
                .write_slice(&vec![value; RAM_SIZE], GuestAddress(0))
                .unwrap();
        }
    }

    /// A disk image whose sector n is filled with a pattern derived from n.
    pub(crate) fn disk_image(sectors: usize) -> Vec<u8> {
        let mut data = vec![0u8; sectors * 512];
        for (i, b) in data.iter_mut().enumerate() {
            let sector = i / 512;
            *b = (sector as u8).wrapping_mul(7) ^ (i % 512) as u8 ^ (sector >> 8) as u8;
        }
        data
    }

    #[test]
    fn pci_identity_bar4_and_timing_registers() {
        let mut m = Machine::new();
        let c = m.ide.config();
        assert_eq!(c.read_u32(0), 0x7010_8086);
        assert_eq!(c.read_u32(0x08) >> 8, 0x01_01_80);
        assert_eq!(c.interrupt_pin(), 0, "no INTx: ISA IRQ 14/15");
        assert_eq!(c.read_u32(0x10), 0, "legacy mode: BAR0..3 unused");
        assert_eq!(c.bar_size(BUS_MASTER_BAR), Some(16));
        assert_eq!(c.read_u32(0x20), 0xc001);
        // BAR4 sizing.
        m.ide.config_write(0x20, 0, &[0xff; 4]);
        assert_eq!(m.ide.config().read_u32(0x20), 0xffff_fff1);
        // IDETIM is writable; SeaBIOS writes 0x8000 to both.
        m.ide.config_write(0x40, 0, &0xa307_8000u32.to_le_bytes());
        assert_eq!(m.ide.config().read_u32(0x40), 0xa307_8000);
        m.ide.config_write(0x00, 0, &[0; 4]);
        assert_eq!(m.ide.config().read_u32(0), 0x7010_8086);
        // Reset restores the decode enables.
        m.ide.reset();
        assert_eq!(m.ide.config().read_u16(0x40), 0x8000);
        assert_eq!(m.ide.config().read_u16(0x42), 0x8000);
    }

    #[test]
    fn idetim_decode_enable_is_honoured() {
        let mut m = Machine::with_disk(64);
        assert_eq!(m.inb(0, 7), STATUS_DRDY | STATUS_DSC);
        m.ide.config_write(0x40, 0, &[0x00, 0x00]);
        assert_eq!(m.inb(0, 7), 0xff);
        assert_eq!(m.alt_status(0), 0xff);
        m.outb(0, 2, 0x55);
        m.ide.config_write(0x40, 0, &[0x00, 0x80]);
        assert_eq!(m.inb(0, 2), 1, "the write while disabled was ignored");
    }

    #[test]
    fn empty_channel_floats_and_absent_slave_reads_zero_status() {
        let m = Machine::with_disk(64);
        assert_eq!(m.inb(1, 7), 0xff);
        assert_eq!(m.alt_status(1), 0xff);
        m.outb(0, 6, 0xb0);
        assert_eq!(m.inb(0, 7), 0);
        // SeaBIOS presence check: registers of the absent unit still hold what was written
        // (the write reached the cable), but a command goes nowhere.
        m.outb(0, 2, 0x55);
        assert_eq!(m.inb(0, 2), 0x55);
        m.outb(0, 7, 0xec);
        assert_eq!(m.inb(0, 7), 0);
        assert_eq!(m.irqs[0].count(), 0);
    }

    #[test]
    fn irq_level_follows_status_reads_and_nien() {
        let m = Machine::with_disk(64);
        m.outb(0, 6, 0xa0);
        m.outb(0, 7, 0xe7); // FLUSH CACHE
        assert!(m.irqs[0].level());
        assert_eq!(m.irqs[0].count(), 1);
        assert_eq!(m.alt_status(0), STATUS_DRDY | STATUS_DSC);
        assert!(m.irqs[0].level(), "alternate status leaves INTRQ alone");
        assert_eq!(m.inb(0, 7), STATUS_DRDY | STATUS_DSC);
        assert!(!m.irqs[0].level(), "status read clears INTRQ");
        // nIEN masks the line; clearing nIEN with the request still pending shows it.
        m.device_control(0, CONTROL_NIEN);
        m.outb(0, 7, 0xe7);
        assert!(!m.irqs[0].level());
        assert_eq!(m.irqs[0].count(), 1);
        m.device_control(0, 0);
        assert!(m.irqs[0].level());
        assert_eq!(m.irqs[0].count(), 2);
        m.inb(0, 7);
        assert!(!m.irqs[1].level() && m.irqs[1].count() == 0);
    }

    #[test]
    fn hob_readback_and_device_register_select() {
        let m = Machine::with_disk(64);
        m.outb(0, 3, 0x11);
        m.outb(0, 3, 0x22);
        assert_eq!(m.inb(0, 3), 0x22);
        m.device_control(0, CONTROL_HOB);
        assert_eq!(m.inb(0, 3), 0x11);
        m.outb(0, 4, 0x33); // clears HOB
        assert_eq!(m.inb(0, 3), 0x22);
    }

    #[test]
    fn bus_master_registers() {
        let mut m = Machine::with_disk(64);
        m.attach_disk(1, 1, disk_image(8), false);
        assert_eq!(m.bm_inb(0, BM_STATUS), BM_STATUS_DRIVE0_DMA);
        assert_eq!(m.bm_inb(1, BM_STATUS), BM_STATUS_DRIVE1_DMA);
        m.bm_outl(0, BM_PRD_ADDRESS, 0x1234_5677);
        let mut b = [0u8; 4];
        m.ide.bar_read(BUS_MASTER_BAR, 4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1234_5674);
        m.bm_outb(0, BM_COMMAND, 0xff);
        assert_eq!(m.bm_inb(0, BM_COMMAND), 0x09);
        assert_eq!(
            m.bm_inb(0, BM_STATUS) & BM_STATUS_ACTIVE,
            1,
            "start with nothing pending: active, waiting"
        );
        m.bm_outb(0, BM_COMMAND, 0);
        assert_eq!(m.bm_inb(0, BM_STATUS) & BM_STATUS_ACTIVE, 0);
        m.bm_outb(0, BM_STATUS, 0x60);
        assert_eq!(m.bm_inb(0, BM_STATUS), 0x60);
        m.bm_outb(0, BM_STATUS, 0x00);
        assert_eq!(m.bm_inb(0, BM_STATUS), 0x00);
        // Reads past the two channels float.
        let mut wide = [0u8; 2];
        m.ide.bar_read(BUS_MASTER_BAR, 15, &mut wide);
        assert_eq!(wide[1], 0xff);
        m.ide.bar_read(0, 0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }

    #[test]
    fn prd_walk_bounds() {
        let m = Machine::new();
        // Unterminated table filling its 64 KiB page with 8-byte entries: ends.
        m.write_prds(0x10000, &vec![(0x2000, 2, false); 8192]);
        assert_eq!(
            walk_prd_table(&m.memory, 0x10000, 1 << 40).unwrap_err(),
            DmaFault::ShortTable
        );
        // Buffer outside RAM.
        m.write_prds(0x100, &[(0xfff0_0000, 512, true)]);
        assert_eq!(
            walk_prd_table(&m.memory, 0x100, 512).unwrap_err(),
            DmaFault::Memory
        );
        // Buffer crossing the end of RAM.
        m.write_prds(0x100, &[(RAM_SIZE as u32 - 256, 512, true)]);
        assert_eq!(
            walk_prd_table(&m.memory, 0x100, 512).unwrap_err(),
            DmaFault::Memory
        );
        // Table outside RAM.
        assert_eq!(
            walk_prd_table(&m.memory, 0xffff_fff8, 512).unwrap_err(),
            DmaFault::Memory
        );
        // Count 0 = 64 KiB, bit 0 of address and count ignored.
        m.write_prds(0x100, &[(0x20001, 0, false), (0x40000, 0x201, true)]);
        let (segs, exhausted) = walk_prd_table(&m.memory, 0x100, 0x10200).unwrap();
        assert_eq!(segs, vec![(0x20000, 0x10000), (0x40000, 0x200)]);
        assert!(exhausted);
        let (segs, exhausted) = walk_prd_table(&m.memory, 0x100, 0x100).unwrap();
        assert_eq!(segs, vec![(0x20000, 0x100)]);
        assert!(!exhausted, "longer table: not exhausted");
    }

    #[test]
    fn hostile_register_garbage_never_panics() {
        let mut m = Machine::with_disk(256);
        m.attach_disk(0, 1, disk_image(16), true);
        m.ide
            .attach(
                1,
                0,
                Drive::Cdrom(Some(Box::new(MemoryBackend::new(
                    vec![0x5a; 2048 * 40],
                    true,
                )))),
            )
            .unwrap();
        // Everything outside the guard window must stay untouched by DMA.
        m.fill_ram(0xee);
        // Every table the guest can point at (0x8000..0x8078) ends at 0x8078.
        m.write_prds(0x8078, &[(0x9000, 2, true)]);
        let mut rng = TestRng(0xdead_beef_1234_5678);
        for step in 0..200_000u32 {
            let r = rng.next();
            let ch = (r & 1) as usize;
            let value = (r >> 8) as u8;
            match (r >> 1) % 16 {
                0..=5 => m.outb(ch, 1 + (r >> 16) % 7, value),
                6 => m.outb(
                    ch,
                    7,
                    [0x20, 0x24, 0x30, 0xc8, 0x25, 0xca, 0xa0, 0xa1, 0xec][value as usize % 9],
                ),
                7 | 8 => {
                    m.inb(ch, (r >> 16) % 8);
                }
                9 => m.outw(ch, value as u16),
                10 => {
                    m.inw(ch);
                }
                11 => m.device_control(ch, value & 0x86),
                12 => m.bm_outb(ch, (r >> 16) % 4, value),
                13 => m.bm_outl(ch, BM_PRD_ADDRESS, 0x8000 | (value as u32 & 0x78)),
                14 => {
                    // PRD entries inside the guard window only.
                    let at = 0x8000 + (r >> 16) % 0x78;
                    let addr = 0x9000 + ((r >> 24) as u32 % 0x4000);
                    m.memory.write_obj(addr, GuestAddress(at & !7)).unwrap();
                    m.memory
                        .write_obj(
                            (r >> 40) as u32 & 0x8000_0ffe | 2,
                            GuestAddress((at & !7) + 4),
                        )
                        .unwrap();
                }
                _ => {
                    m.ide.config_write(0x04, 0, &[(value & 4) | 1, 0]);
                }
            }
            if step % 50_000 == 0 {
                let _ = m.ide.stats();
            }
        }
        let ram = m.ram(0, RAM_SIZE);
        assert!(ram[..0x8000].iter().all(|&b| b == 0xee));
        assert!(ram[0x9000 + 0x4000 + 0x1000..].iter().all(|&b| b == 0xee));
        assert_eq!(m.ide.config().read_u32(0), 0x7010_8086);
    }

    #[test]
    fn state_round_trip() {
        let mut m = Machine::with_disk(64);
        m.outb(0, 3, 0x42);
        m.bm_outl(0, BM_PRD_ADDRESS, 0x1000);
        m.outb(0, 2, 8);
        m.outb(0, 7, 0xc6); // SET MULTIPLE MODE 8
        m.inb(0, 7);
        m.outb(0, 3, 0x42);
        let state = m.ide.state();
        assert_eq!(state.channels[0].disks[0].unwrap().multiple_sectors, 8);
        m.outb(0, 3, 0x00);
        m.bm_outl(0, BM_PRD_ADDRESS, 0);
        m.ide.restore_state(&state);
        assert_eq!(m.inb(0, 3), 0x42);
        assert_eq!(m.bm_inb(0, 5), 0x10);
        assert_eq!(m.ide.state(), state);
    }

    #[test]
    fn attach_errors() {
        let m = Machine::new();
        let d = || Drive::Disk(Box::new(MemoryBackend::new(vec![0; 512], false)));
        assert_eq!(m.ide.attach(2, 0, d()), Err(IdeError::NoSuchChannel(2)));
        assert_eq!(m.ide.attach(0, 2, d()), Err(IdeError::NoSuchUnit(2)));
        m.ide.attach(0, 0, d()).unwrap();
        assert_eq!(
            m.ide.change_media(0, 0, None, false),
            Err(IdeError::NotACdrom {
                channel: 0,
                unit: 0
            })
        );
        assert_eq!(m.ide.stats().len(), 1);
        m.ide.detach(0, 0).unwrap();
        assert!(m.ide.stats().is_empty());
    }
}
