//! The ATA hard-disk command set of an IDE unit (the controller is [`crate::ide`]).
//!
//! Emulated: IDENTIFY DEVICE ("DeskVM HARDDISK", LBA28 / LBA48 capacities, CHS geometry,
//! PIO 4, multiword DMA 2, UDMA 5, write cache, FLUSH CACHE (EXT), integrity word), READ /
//! WRITE SECTORS (EXT), READ / WRITE MULTIPLE (EXT) with SET MULTIPLE MODE (up to 16
//! sectors per block), READ / WRITE DMA (EXT), READ VERIFY SECTORS (EXT), FLUSH CACHE (EXT)
//! reaching the backend's flush, SET FEATURES (transfer mode, write cache on / off, look-ahead
//! and revert-to-defaults accepted), INITIALIZE DEVICE PARAMETERS (the logical CHS geometry
//! used by CHS addressing), READ NATIVE MAX ADDRESS (EXT), IDLE / STANDBY / SLEEP (accepted,
//! the disk stays active), CHECK POWER MODE, SEEK, RECALIBRATE. Disabling the write cache
//! flushes after every write command. Unknown commands abort (ERR + ABRT); sectors beyond
//! the disk give IDNF, backend read errors UNC, write errors and writes to a read-only
//! backend ABRT.
//!
//! Not emulated: SMART, security, HPA (SET MAX), power-management timers, DCO,
//! TRIM / DATA SET MANAGEMENT, NCQ, 4 KiB physical sectors.

use crate::block::BlockBackend;
use crate::ide::{DmaFault, PrdCursor, UnitIo, DEVICE_LBA, ERROR_ABRT, ERROR_IDNF, ERROR_UNC};
use serde::{Deserialize, Serialize};

pub const SECTOR_SIZE: usize = 512;
/// Model string of IDENTIFY DEVICE.
pub const DISK_MODEL: &str = "DeskVM HARDDISK";
pub const FIRMWARE_REVISION: &str = "1.0";
/// Largest READ / WRITE MULTIPLE block.
pub const MAX_MULTIPLE_SECTORS: u8 = 16;
/// Sectors read or written per backend call during DMA.
const DMA_CHUNK_SECTORS: u64 = 128;
const LBA28_LIMIT: u64 = 1 << 28;

pub const CMD_RECALIBRATE: u8 = 0x10;
pub const CMD_READ_SECTORS: u8 = 0x20;
pub const CMD_READ_SECTORS_NO_RETRY: u8 = 0x21;
pub const CMD_READ_SECTORS_EXT: u8 = 0x24;
pub const CMD_READ_DMA_EXT: u8 = 0x25;
pub const CMD_READ_NATIVE_MAX_EXT: u8 = 0x27;
pub const CMD_READ_MULTIPLE_EXT: u8 = 0x29;
pub const CMD_WRITE_SECTORS: u8 = 0x30;
pub const CMD_WRITE_SECTORS_NO_RETRY: u8 = 0x31;
pub const CMD_WRITE_SECTORS_EXT: u8 = 0x34;
pub const CMD_WRITE_DMA_EXT: u8 = 0x35;
pub const CMD_WRITE_MULTIPLE_EXT: u8 = 0x39;
pub const CMD_READ_VERIFY: u8 = 0x40;
pub const CMD_READ_VERIFY_NO_RETRY: u8 = 0x41;
pub const CMD_READ_VERIFY_EXT: u8 = 0x42;
pub const CMD_SEEK: u8 = 0x70;
pub const CMD_INITIALIZE_DEVICE_PARAMETERS: u8 = 0x91;
pub const CMD_READ_MULTIPLE: u8 = 0xc4;
pub const CMD_WRITE_MULTIPLE: u8 = 0xc5;
pub const CMD_SET_MULTIPLE_MODE: u8 = 0xc6;
pub const CMD_READ_DMA: u8 = 0xc8;
pub const CMD_READ_DMA_NO_RETRY: u8 = 0xc9;
pub const CMD_WRITE_DMA: u8 = 0xca;
pub const CMD_WRITE_DMA_NO_RETRY: u8 = 0xcb;
pub const CMD_STANDBY_IMMEDIATE: u8 = 0xe0;
pub const CMD_IDLE_IMMEDIATE: u8 = 0xe1;
pub const CMD_STANDBY: u8 = 0xe2;
pub const CMD_IDLE: u8 = 0xe3;
pub const CMD_CHECK_POWER_MODE: u8 = 0xe5;
pub const CMD_SLEEP: u8 = 0xe6;
pub const CMD_FLUSH_CACHE: u8 = 0xe7;
pub const CMD_IDENTIFY_DEVICE: u8 = 0xec;
pub const CMD_FLUSH_CACHE_EXT: u8 = 0xea;
pub const CMD_SET_FEATURES: u8 = 0xef;
pub const CMD_READ_NATIVE_MAX: u8 = 0xf8;

pub const FEATURE_ENABLE_WRITE_CACHE: u8 = 0x02;
pub const FEATURE_SET_TRANSFER_MODE: u8 = 0x03;
pub const FEATURE_DISABLE_WRITE_CACHE: u8 = 0x82;

/// Guest-visible settings of a disk (save/restore).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AtaDiskSettings {
    /// Sectors per READ / WRITE MULTIPLE block, 0 = disabled.
    pub multiple_sectors: u8,
    pub write_cache: bool,
    /// The SET FEATURES transfer mode value (0x08|n PIO, 0x20|n MWDMA, 0x40|n UDMA).
    pub transfer_mode: u8,
    /// Logical geometry of CHS addressing (INITIALIZE DEVICE PARAMETERS).
    pub heads: u8,
    pub sectors_per_track: u8,
}

/// How a command addresses its first sector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Addressing {
    /// LBA28 or CHS, per the device register.
    Short,
    Lba48,
}

/// A read or write in progress.
#[derive(Clone, Copy, Debug)]
struct Transfer {
    lba: u64,
    remaining: u64,
    /// Sectors per DRQ block.
    block: u64,
    write: bool,
    addressing: Addressing,
}

pub struct AtaDisk {
    backend: Box<dyn BlockBackend>,
    sectors: u64,
    cylinders: u16,
    settings: AtaDiskSettings,
    transfer: Option<Transfer>,
}

impl AtaDisk {
    pub fn new(backend: Box<dyn BlockBackend>) -> Self {
        let sectors = backend.size() / SECTOR_SIZE as u64;
        let cylinders = (sectors / (16 * 63)).clamp(1, 16383) as u16;
        Self {
            backend,
            sectors,
            cylinders,
            settings: Self::default_settings(),
            transfer: None,
        }
    }

    fn default_settings() -> AtaDiskSettings {
        AtaDiskSettings {
            multiple_sectors: 0,
            write_cache: true,
            transfer_mode: 0x40 | 5,
            heads: 16,
            sectors_per_track: 63,
        }
    }

    pub fn settings(&self) -> AtaDiskSettings {
        self.settings
    }

    pub fn restore_settings(&mut self, settings: &AtaDiskSettings) {
        self.settings = *settings;
        self.settings.multiple_sectors = settings.multiple_sectors.min(MAX_MULTIPLE_SECTORS);
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Hardware / software reset: the transfer is dropped, settings survive (as with
    /// "reverting to defaults" disabled).
    pub(crate) fn reset(&mut self) {
        self.transfer = None;
    }

    pub(crate) fn execute(&mut self, io: &mut UnitIo, command: u8) {
        self.transfer = None;
        match command {
            CMD_IDENTIFY_DEVICE => io.start_pio_in(self.identify(), true),
            CMD_READ_SECTORS | CMD_READ_SECTORS_NO_RETRY => {
                self.start_pio(io, Addressing::Short, 1, false)
            }
            CMD_READ_SECTORS_EXT => self.start_pio(io, Addressing::Lba48, 1, false),
            CMD_WRITE_SECTORS | CMD_WRITE_SECTORS_NO_RETRY => {
                self.start_pio(io, Addressing::Short, 1, true)
            }
            CMD_WRITE_SECTORS_EXT => self.start_pio(io, Addressing::Lba48, 1, true),
            CMD_READ_MULTIPLE
            | CMD_READ_MULTIPLE_EXT
            | CMD_WRITE_MULTIPLE
            | CMD_WRITE_MULTIPLE_EXT => {
                let block = u64::from(self.settings.multiple_sectors);
                if block == 0 {
                    io.abort(ERROR_ABRT);
                    return;
                }
                let addressing = if command == CMD_READ_MULTIPLE || command == CMD_WRITE_MULTIPLE {
                    Addressing::Short
                } else {
                    Addressing::Lba48
                };
                let write = command == CMD_WRITE_MULTIPLE || command == CMD_WRITE_MULTIPLE_EXT;
                self.start_pio(io, addressing, block, write);
            }
            CMD_READ_DMA | CMD_READ_DMA_NO_RETRY => self.start_dma(io, Addressing::Short, false),
            CMD_READ_DMA_EXT => self.start_dma(io, Addressing::Lba48, false),
            CMD_WRITE_DMA | CMD_WRITE_DMA_NO_RETRY => self.start_dma(io, Addressing::Short, true),
            CMD_WRITE_DMA_EXT => self.start_dma(io, Addressing::Lba48, true),
            CMD_READ_VERIFY | CMD_READ_VERIFY_NO_RETRY => self.verify(io, Addressing::Short),
            CMD_READ_VERIFY_EXT => self.verify(io, Addressing::Lba48),
            CMD_FLUSH_CACHE | CMD_FLUSH_CACHE_EXT => {
                if self.flush(io) {
                    io.complete();
                }
            }
            CMD_SET_FEATURES => self.set_features(io),
            CMD_INITIALIZE_DEVICE_PARAMETERS => {
                self.settings.heads = (io.regs.device & 0x0f) + 1;
                self.settings.sectors_per_track = io.regs.sector_count;
                io.complete();
            }
            CMD_SET_MULTIPLE_MODE => {
                let n = io.regs.sector_count;
                if n <= MAX_MULTIPLE_SECTORS && (n == 0 || n.is_power_of_two()) {
                    self.settings.multiple_sectors = n;
                    io.complete();
                } else {
                    io.abort(ERROR_ABRT);
                }
            }
            CMD_STANDBY_IMMEDIATE
            | CMD_IDLE_IMMEDIATE
            | CMD_STANDBY
            | CMD_IDLE
            | CMD_SLEEP
            | 0x94..=0x99 => {
                if command == CMD_CHECK_POWER_MODE || command == 0x98 {
                    io.regs.sector_count = 0xff;
                }
                io.complete();
            }
            CMD_CHECK_POWER_MODE => {
                io.regs.sector_count = 0xff; // active or idle
                io.complete();
            }
            CMD_SEEK..=0x7f | CMD_RECALIBRATE..=0x1f => io.complete(),
            CMD_READ_NATIVE_MAX => {
                io.regs.set_lba28(self.sectors.clamp(1, LBA28_LIMIT) - 1);
                io.complete();
            }
            CMD_READ_NATIVE_MAX_EXT => {
                io.regs.set_lba48(self.sectors.max(1) - 1);
                io.complete();
            }
            _ => {
                log::debug!("ata: unsupported command {command:#04x}");
                io.abort(ERROR_ABRT);
            }
        }
    }

    /// First sector and count of the command in the registers; None (after aborting) for an
    /// invalid CHS address or a range beyond the disk.
    fn range(&self, io: &mut UnitIo, addressing: Addressing) -> Option<(u64, u64)> {
        let regs = &io.regs;
        let (lba, count) = match addressing {
            Addressing::Lba48 => (Some(regs.lba48()), u64::from(regs.count48())),
            Addressing::Short if regs.device & DEVICE_LBA != 0 => {
                (Some(regs.lba28()), u64::from(regs.count28()))
            }
            Addressing::Short => {
                let cylinder = u64::from(regs.lba_high) << 8 | u64::from(regs.lba_mid);
                let head = u64::from(regs.device & 0x0f);
                let sector = u64::from(regs.lba_low);
                let heads = u64::from(self.settings.heads);
                let spt = u64::from(self.settings.sectors_per_track);
                let valid = sector >= 1 && sector <= spt && head < heads;
                (
                    valid.then(|| (cylinder * heads + head) * spt + sector - 1),
                    u64::from(regs.count28()),
                )
            }
        };
        match lba {
            Some(lba)
                if lba
                    .checked_add(count)
                    .is_some_and(|end| end <= self.sectors) =>
            {
                Some((lba, count))
            }
            _ => {
                io.abort(ERROR_IDNF | ERROR_ABRT);
                None
            }
        }
    }

    /// Writes the address of `lba` back into the registers, in the command's addressing.
    fn report_address(&self, io: &mut UnitIo, addressing: Addressing, lba: u64) {
        match addressing {
            Addressing::Lba48 => io.regs.set_lba48(lba),
            Addressing::Short if io.regs.device & DEVICE_LBA != 0 => io.regs.set_lba28(lba),
            Addressing::Short => {
                let heads = u64::from(self.settings.heads.max(1));
                let spt = u64::from(self.settings.sectors_per_track.max(1));
                let cylinder = lba / (heads * spt);
                io.regs.lba_low = (lba % spt + 1) as u8;
                io.regs.lba_mid = cylinder as u8;
                io.regs.lba_high = (cylinder >> 8) as u8;
                io.regs.device = (io.regs.device & 0xf0) | ((lba / spt) % heads) as u8;
            }
        }
    }

    fn start_pio(&mut self, io: &mut UnitIo, addressing: Addressing, block: u64, write: bool) {
        if write && self.backend.read_only() {
            io.abort(ERROR_ABRT);
            return;
        }
        let Some((lba, count)) = self.range(io, addressing) else {
            return;
        };
        let transfer = Transfer {
            lba,
            remaining: count,
            block,
            write,
            addressing,
        };
        self.transfer = Some(transfer);
        if write {
            io.start_pio_out(transfer_block_bytes(&transfer), false);
        } else {
            self.read_next_block(io);
        }
    }

    fn read_next_block(&mut self, io: &mut UnitIo) {
        let Some(t) = self.transfer.as_mut() else {
            return;
        };
        let mut buf = vec![0u8; transfer_block_bytes(t)];
        let n = (buf.len() / SECTOR_SIZE) as u64;
        if let Err(e) = self.backend.read_at(t.lba * SECTOR_SIZE as u64, &mut buf) {
            log::warn!("ata: read of sector {} failed: {e}", t.lba);
            let (lba, addressing) = (t.lba, t.addressing);
            self.transfer = None;
            self.report_address(io, addressing, lba);
            io.abort(ERROR_UNC);
            return;
        }
        io.counters.read_bytes += buf.len() as u64;
        io.counters.read_ops += 1;
        t.lba += n;
        t.remaining -= n;
        io.start_pio_in(buf, true);
    }

    /// The guest read or wrote a whole DRQ block.
    pub(crate) fn pio_done(&mut self, io: &mut UnitIo, data: Vec<u8>) {
        let Some(t) = self.transfer else {
            io.finish_quietly();
            return;
        };
        if !t.write {
            if t.remaining > 0 {
                self.read_next_block(io);
            } else {
                self.transfer = None;
                self.report_address(io, t.addressing, t.lba.saturating_sub(1));
                io.finish_quietly();
            }
            return;
        }
        if let Err(e) = self.backend.write_at(t.lba * SECTOR_SIZE as u64, &data) {
            log::warn!("ata: write of sector {} failed: {e}", t.lba);
            self.transfer = None;
            self.report_address(io, t.addressing, t.lba);
            io.abort(ERROR_ABRT);
            return;
        }
        io.counters.write_bytes += data.len() as u64;
        io.counters.write_ops += 1;
        let n = (data.len() / SECTOR_SIZE) as u64;
        let next = Transfer {
            lba: t.lba + n,
            remaining: t.remaining - n,
            ..t
        };
        if next.remaining > 0 {
            self.transfer = Some(next);
            io.start_pio_out(transfer_block_bytes(&next), true);
        } else {
            self.transfer = None;
            self.report_address(io, t.addressing, next.lba - 1);
            if self.write_through(io) {
                io.complete();
            }
        }
    }

    fn start_dma(&mut self, io: &mut UnitIo, addressing: Addressing, write: bool) {
        if write && self.backend.read_only() {
            io.abort(ERROR_ABRT);
            return;
        }
        let Some((lba, count)) = self.range(io, addressing) else {
            return;
        };
        self.transfer = Some(Transfer {
            lba,
            remaining: count,
            block: count,
            write,
            addressing,
        });
        io.start_dma();
    }

    pub(crate) fn dma_length(&self) -> u64 {
        self.transfer
            .map_or(0, |t| t.remaining * SECTOR_SIZE as u64)
    }

    /// Moves the whole DMA transfer through the PRD buffers and completes the command.
    pub(crate) fn run_dma(
        &mut self,
        io: &mut UnitIo,
        cursor: &mut PrdCursor,
    ) -> Result<(), DmaFault> {
        let Some(mut t) = self.transfer.take() else {
            return Ok(());
        };
        let mut buf = Vec::new();
        while t.remaining > 0 {
            let n = t.remaining.min(DMA_CHUNK_SECTORS);
            buf.resize(n as usize * SECTOR_SIZE, 0);
            let offset = t.lba * SECTOR_SIZE as u64;
            if t.write {
                cursor.copy_from_guest(&mut buf)?;
                if let Err(e) = self.backend.write_at(offset, &buf) {
                    log::warn!("ata: DMA write of sector {} failed: {e}", t.lba);
                    self.report_address(io, t.addressing, t.lba);
                    io.abort(ERROR_ABRT);
                    return Ok(());
                }
                io.counters.write_bytes += buf.len() as u64;
            } else {
                if let Err(e) = self.backend.read_at(offset, &mut buf) {
                    log::warn!("ata: DMA read of sector {} failed: {e}", t.lba);
                    self.report_address(io, t.addressing, t.lba);
                    io.abort(ERROR_UNC);
                    return Ok(());
                }
                cursor.copy_to_guest(&buf)?;
                io.counters.read_bytes += buf.len() as u64;
            }
            t.lba += n;
            t.remaining -= n;
        }
        if t.write {
            io.counters.write_ops += 1;
        } else {
            io.counters.read_ops += 1;
        }
        self.report_address(io, t.addressing, t.lba - 1);
        if !t.write || self.write_through(io) {
            io.complete();
        }
        Ok(())
    }

    /// The bus master could not move the data.
    pub(crate) fn fail_dma(&mut self, io: &mut UnitIo) {
        self.transfer = None;
        io.abort(ERROR_ABRT);
    }

    /// Flushes when the write cache is off; false (after aborting) when that failed.
    fn write_through(&mut self, io: &mut UnitIo) -> bool {
        self.settings.write_cache || self.flush(io)
    }

    fn flush(&mut self, io: &mut UnitIo) -> bool {
        io.counters.flushes += 1;
        match self.backend.flush() {
            Ok(()) => true,
            Err(e) => {
                log::warn!("ata: flush failed: {e}");
                io.abort(ERROR_ABRT);
                false
            }
        }
    }

    fn verify(&mut self, io: &mut UnitIo, addressing: Addressing) {
        if let Some((lba, count)) = self.range(io, addressing) {
            self.report_address(io, addressing, lba + count - 1);
            io.complete();
        }
    }

    fn set_features(&mut self, io: &mut UnitIo) {
        match io.regs.feature {
            FEATURE_ENABLE_WRITE_CACHE => self.settings.write_cache = true,
            FEATURE_DISABLE_WRITE_CACHE => self.settings.write_cache = false,
            FEATURE_SET_TRANSFER_MODE => {
                let mode = io.regs.sector_count;
                let valid = match mode >> 3 {
                    0 => mode <= 1,
                    1 => mode & 7 <= 4,
                    4 => mode & 7 <= 2,
                    8 => mode & 7 <= 5,
                    _ => false,
                };
                if !valid {
                    io.abort(ERROR_ABRT);
                    return;
                }
                self.settings.transfer_mode = mode;
            }
            // Read look-ahead on / off, reverting to power-on defaults on / off.
            0x55 | 0xaa | 0x66 | 0xcc => {}
            _ => {
                io.abort(ERROR_ABRT);
                return;
            }
        }
        io.complete();
    }

    /// The 512-byte IDENTIFY DEVICE data.
    pub fn identify(&self) -> Vec<u8> {
        let mut w = [0u16; 256];
        let cylinders = self.cylinders;
        let chs_sectors = u32::from(cylinders) * 16 * 63;
        w[0] = 0x0040; // fixed device
        w[1] = cylinders;
        w[3] = 16;
        w[6] = 63;
        put_string(&mut w[10..20], &self.serial());
        put_string(&mut w[23..27], FIRMWARE_REVISION);
        put_string(&mut w[27..47], DISK_MODEL);
        w[47] = 0x8000 | u16::from(MAX_MULTIPLE_SECTORS);
        w[49] = 0x0b00; // IORDY, LBA, DMA
        w[50] = 0x4000;
        w[51] = 0x0200;
        w[52] = 0x0200;
        w[53] = 0x0007; // words 54-58, 64-70 and 88 are valid
        let heads = u32::from(self.settings.heads);
        let spt = u32::from(self.settings.sectors_per_track);
        let current_cylinders = if heads * spt == 0 {
            0
        } else {
            (self.sectors.min(u64::from(chs_sectors)) / u64::from(heads * spt)).min(65535) as u32
        };
        w[54] = current_cylinders as u16;
        w[55] = heads as u16;
        w[56] = spt as u16;
        let current_capacity = current_cylinders * heads * spt;
        w[57] = current_capacity as u16;
        w[58] = (current_capacity >> 16) as u16;
        if self.settings.multiple_sectors != 0 {
            w[59] = 0x0100 | u16::from(self.settings.multiple_sectors);
        }
        let lba28 = self.sectors.min(LBA28_LIMIT - 1) as u32;
        w[60] = lba28 as u16;
        w[61] = (lba28 >> 16) as u16;
        let mode = self.settings.transfer_mode;
        w[63] = 0x0007
            | if mode >> 3 == 4 {
                0x100 << (mode & 7)
            } else {
                0
            };
        w[64] = 0x0003; // PIO 3 and 4
        w[65] = 120;
        w[66] = 120;
        w[67] = 120;
        w[68] = 120;
        w[80] = 0x00f0; // ATA/ATAPI-4..7
        w[81] = 0x0016;
        w[82] = 0x4000 | 0x0020; // write cache supported
        w[83] = 0x4000 | 0x2000 | 0x1000 | 0x0400; // FLUSH CACHE EXT, FLUSH CACHE, LBA48
        w[84] = 0x4000;
        w[85] = 0x4000 | if self.settings.write_cache { 0x0020 } else { 0 };
        w[86] = 0x2000 | 0x1000 | 0x0400;
        w[87] = 0x4000;
        w[88] = 0x003f
            | if mode >> 3 == 8 {
                0x100 << (mode & 7)
            } else {
                0
            };
        w[93] = 0x4000 | 0x2000 | 0x0001; // 80-wire cable, device 0 passed
        for (i, chunk) in w[100..104].iter_mut().enumerate() {
            *chunk = (self.sectors >> (16 * i)) as u16;
        }
        finish_identify(w)
    }

    fn serial(&self) -> String {
        format!("DV{:016X}", self.sectors)
    }
}

fn transfer_block_bytes(t: &Transfer) -> usize {
    (t.remaining.min(t.block) as usize) * SECTOR_SIZE
}

/// Stores an ATA string (two characters per word, first in the high byte, space padded).
pub(crate) fn put_string(words: &mut [u16], text: &str) {
    let mut bytes = text.bytes();
    for word in words.iter_mut() {
        let hi = bytes.next().unwrap_or(b' ');
        let lo = bytes.next().unwrap_or(b' ');
        *word = u16::from(hi) << 8 | u16::from(lo);
    }
}

/// Adds the integrity word (signature 0xa5 and checksum) and returns the bytes.
pub(crate) fn finish_identify(mut words: [u16; 256]) -> Vec<u8> {
    words[255] = 0x00a5;
    let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let sum = bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b));
    bytes[511] = sum.wrapping_neg();
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemoryBackend;
    use crate::ide::tests::{disk_image, Machine, RAM_SIZE};
    use crate::ide::*;
    use crate::pci::PciFunction;
    use std::io;
    use vm_memory::Bytes;

    const READY: u8 = STATUS_DRDY | STATUS_DSC;

    fn words(bytes: &[u8]) -> Vec<u16> {
        bytes
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    fn ata_string(words: &[u16]) -> String {
        words
            .iter()
            .flat_map(|w| [(w >> 8) as u8, *w as u8])
            .map(char::from)
            .collect::<String>()
            .trim_end()
            .to_string()
    }

    #[test]
    fn seabios_probe_reset_signature_identify() {
        let m = Machine::with_disk(100_000);
        // ata_reset: SRST with nIEN, then release; master selected, signature present.
        m.device_control(0, CONTROL_NIEN | CONTROL_SRST);
        assert_eq!(m.alt_status(0) & STATUS_BSY, STATUS_BSY);
        m.device_control(0, CONTROL_NIEN);
        assert_eq!(m.inb(0, 7), READY);
        assert_eq!(m.inb(0, 1), ERROR_DIAGNOSTIC_PASSED);
        assert_eq!((m.inb(0, 2), m.inb(0, 3)), (1, 1));
        assert_eq!((m.inb(0, 4), m.inb(0, 5)), (0x00, 0x00));
        // ata_detect presence check: registers hold what is written.
        m.outb(0, 2, 0x55);
        m.outb(0, 3, 0xaa);
        assert_eq!((m.inb(0, 2), m.inb(0, 3)), (0x55, 0xaa));
        // IDENTIFY PACKET on a disk aborts; IDENTIFY DEVICE works (polled, nIEN set).
        m.outb(0, 6, 0xa0);
        m.outb(0, 7, 0xa1);
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR);
        assert_eq!(m.inb(0, 1), ERROR_ABRT);
        m.outb(0, 7, CMD_IDENTIFY_DEVICE);
        assert_eq!(m.inb(0, 7), READY | STATUS_DRQ);
        assert_eq!(m.irqs[0].count(), 0, "nIEN masked every interrupt");
        let id = m.read_words(0, 256);
        assert_eq!(m.inb(0, 7), READY);
        let w = words(&id);
        assert_eq!(w[0], 0x0040);
        assert_eq!(ata_string(&w[27..47]), "DeskVM HARDDISK");
        assert_eq!(ata_string(&w[23..27]), "1.0");
        assert!(!ata_string(&w[10..20]).is_empty());
        assert_eq!((w[1], w[3], w[6]), (99, 16, 63));
        assert_eq!(u32::from(w[60]) | u32::from(w[61]) << 16, 100_000);
        assert_eq!(w[100], 100_000u32 as u16);
        assert_eq!(w[101], 1);
        assert_eq!(w[83] & 0x2400, 0x2400, "LBA48 + FLUSH CACHE EXT");
        assert_eq!(w[82] & 0x20, 0x20);
        assert_eq!(w[85] & 0x20, 0x20, "write cache on");
        assert_eq!(w[63] & 7, 7);
        assert_eq!(w[88] & 0x3f, 0x3f);
        assert_eq!(w[49] & 0x0300, 0x0300);
        assert_eq!(id.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        assert_eq!(w[255] & 0xff, 0xa5);
    }

    #[test]
    fn linux_set_features_read_dma_ext_and_flush() {
        let mut m = Machine::with_disk(4096);
        // SET FEATURES XFER: UDMA 5, then MWDMA 2 (what ata_piix picks on a PIIX3).
        m.outb(0, 1, FEATURE_SET_TRANSFER_MODE);
        m.outb(0, 2, 0x45);
        m.outb(0, 6, 0xa0);
        m.outb(0, 7, CMD_SET_FEATURES);
        assert_eq!(m.inb(0, 7), READY);
        m.outb(0, 2, 0x22);
        m.outb(0, 7, CMD_SET_FEATURES);
        assert_eq!(m.inb(0, 7), READY);
        m.outb(0, 7, CMD_IDENTIFY_DEVICE);
        let w = words(&m.read_words(0, 256));
        assert_eq!(w[63] >> 8, 0x04, "MWDMA2 selected");
        assert_eq!(w[88] >> 8, 0);
        m.outb(0, 2, 0x47); // UDMA 7 does not exist
        m.outb(0, 7, CMD_SET_FEATURES);
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR);
        // READ DMA EXT of 24 sectors at 1000 through a 3-entry PRD table.
        m.fill_ram(0xcc);
        m.write_prds(
            0x1000,
            &[
                (0x10000, 4096, false),
                (0x30000, 0, false),
                (0x50000, 4096, true),
            ],
        );
        // That is 4 KiB + 64 KiB + 4 KiB: more than the 12 KiB transfer.
        m.write_prds(0x1000, &[(0x10000, 4096, false), (0x30000, 8192, true)]);
        m.bm_setup(0, 0x1000, true);
        let before = m.irqs[0].count();
        m.lba48_command(0, CMD_READ_DMA_EXT, 1000, 24);
        assert_eq!(
            m.alt_status(0) & STATUS_DRQ,
            STATUS_DRQ,
            "waiting for the engine"
        );
        m.bm_start(0, true);
        assert_eq!(m.irqs[0].count(), before + 1);
        let bm = m.bm_inb(0, BM_STATUS);
        assert_eq!(
            bm & (BM_STATUS_INTERRUPT | BM_STATUS_ERROR | BM_STATUS_ACTIVE),
            BM_STATUS_INTERRUPT
        );
        m.bm_stop(0);
        assert_eq!(m.inb(0, 7), READY);
        let image = disk_image(4096);
        assert_eq!(m.ram(0x10000, 4096), image[1000 * 512..1008 * 512]);
        assert_eq!(m.ram(0x30000, 8192), image[1008 * 512..1024 * 512]);
        assert_eq!(m.ram(0x30000 + 8192, 16), vec![0xcc; 16]);
        assert_eq!(m.ram(0x10000 + 4096, 16), vec![0xcc; 16]);
        // The registers point at the last sector.
        m.device_control(0, CONTROL_HOB);
        assert_eq!(m.inb(0, 3), 0);
        m.device_control(0, 0);
        assert_eq!(m.inb(0, 3), (1023 & 0xff) as u8);
        // FLUSH CACHE EXT reaches the backend.
        m.outb(0, 7, CMD_FLUSH_CACHE_EXT);
        assert_eq!(m.inb(0, 7), READY);
        let stats = m.ide.stats();
        assert_eq!(stats[0].counters.flushes, 1);
        assert_eq!(stats[0].counters.read_bytes, 24 * 512);
        assert_eq!(stats[0].counters.read_ops, 1);
    }

    #[test]
    fn write_dma_with_start_already_set_and_short_table() {
        let mut m = Machine::with_disk(256);
        let payload: Vec<u8> = (0..2048u32).map(|i| (i * 13) as u8).collect();
        m.memory
            .write_slice(&payload, vm_memory::GuestAddress(0x20000))
            .unwrap();
        m.write_prds(0x800, &[(0x20000, 2048, true)]);
        m.bm_setup(0, 0x800, false);
        m.bm_start(0, false);
        m.lba28_command(0, 0, CMD_WRITE_DMA, 10, 4);
        assert_eq!(m.inb(0, 7), READY);
        assert_eq!(m.bm_inb(0, BM_STATUS) & 7, BM_STATUS_INTERRUPT);
        m.bm_stop(0);
        m.lba28_command(0, 0, CMD_READ_SECTORS, 10, 4);
        assert_eq!(m.read_words(0, 1024), payload);
        // A table shorter than the transfer: nothing moves, errors everywhere.
        m.fill_ram(0x11);
        m.write_prds(0x800, &[(0x20000, 1024, true)]);
        m.bm_setup(0, 0x800, true);
        m.lba28_command(0, 0, CMD_READ_DMA, 0, 4);
        m.bm_start(0, true);
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR);
        assert_eq!(m.inb(0, 1), ERROR_ABRT);
        assert_eq!(
            m.bm_inb(0, BM_STATUS) & 7,
            BM_STATUS_INTERRUPT | BM_STATUS_ERROR
        );
        assert_eq!(m.ram(0x20000, 2048), vec![0x11; 2048]);
        // Bus mastering disabled in PCI: DMA error.
        m.bm_stop(0);
        m.ide.config_write(0x04, 0, &[0x01, 0]);
        m.write_prds(0x800, &[(0x20000, 2048, true)]);
        m.bm_setup(0, 0x800, true);
        m.lba28_command(0, 0, CMD_READ_DMA, 0, 4);
        m.bm_start(0, true);
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR);
        assert_eq!(m.ram(0x20000, 2048), vec![0x11; 2048]);
    }

    #[test]
    fn hostile_prd_tables_never_touch_memory_outside() {
        let mut m = Machine::with_disk(300);
        m.fill_ram(0x77);
        // Buffer beyond RAM, table beyond RAM, unterminated table filling its page.
        type Prds = Vec<(u32, u32, bool)>;
        let cases: Vec<(u32, Prds)> = vec![
            (0x1000, vec![(RAM_SIZE as u32 + 0x1000, 4096, true)]),
            (
                0x1000,
                vec![(0x8000, 512, false), (0xffff_0000, 4096, true)],
            ),
            (0xffff_fff0, vec![]),
            (0xf000, vec![(0x40000, 2, false); 0x1000 / 8]),
        ];
        for (table, entries) in cases {
            m.write_prds(u64::from(table), &entries);
            m.bm_setup(0, table, true);
            m.lba28_command(0, 0, CMD_READ_DMA, 0, 200);
            m.bm_start(0, true);
            assert_eq!(m.inb(0, 7) & STATUS_ERR, STATUS_ERR, "table {table:#x}");
            assert_eq!(m.bm_inb(0, BM_STATUS) & BM_STATUS_ERROR, BM_STATUS_ERROR);
            m.bm_stop(0);
        }
        let ram = m.ram(0, RAM_SIZE);
        for (i, &b) in ram.iter().enumerate() {
            let in_table = (0x1000..0x1010).contains(&i) || (0xf000..0x10000).contains(&i);
            if !in_table {
                assert_eq!(b, 0x77, "byte {i:#x} changed");
            }
        }
        // The disk still works.
        m.lba28_command(0, 0, CMD_READ_SECTORS, 299, 1);
        assert_eq!(m.read_words(0, 256), disk_image(300)[299 * 512..]);
    }

    #[test]
    fn pio_lba28_lba48_chs_single_and_multiple() {
        let m = Machine::with_disk(2048);
        let image = disk_image(2048);
        // READ SECTORS: an interrupt per sector.
        m.lba28_command(0, 0, CMD_READ_SECTORS, 5, 3);
        let mut got = Vec::new();
        for i in 0..3 {
            assert_eq!(m.irqs[0].count(), i + 1);
            assert_eq!(m.inb(0, 7), READY | STATUS_DRQ);
            got.extend(m.read_words(0, 256));
        }
        assert_eq!(m.inb(0, 7), READY);
        assert_eq!(got, image[5 * 512..8 * 512]);
        // READ SECTORS EXT with a 48-bit address beyond 28 bits is out of range here.
        m.lba48_command(0, CMD_READ_SECTORS_EXT, 1 << 30, 1);
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR);
        assert_eq!(m.inb(0, 1), ERROR_IDNF | ERROR_ABRT);
        m.lba48_command(0, CMD_READ_SECTORS_EXT, 2040, 8);
        let got = m.read_words(0, 8 * 256);
        assert_eq!(got, image[2040 * 512..]);
        // Multiple mode: refused before SET MULTIPLE, blocks of 4 after.
        m.lba28_command(0, 0, CMD_READ_MULTIPLE, 0, 6);
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR);
        m.outb(0, 2, 3);
        m.outb(0, 7, CMD_SET_MULTIPLE_MODE);
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR, "3 is not a power of two");
        m.outb(0, 2, 4);
        m.outb(0, 7, CMD_SET_MULTIPLE_MODE);
        assert_eq!(m.inb(0, 7), READY);
        let irqs = m.irqs[0].count();
        m.lba28_command(0, 0, CMD_READ_MULTIPLE, 100, 6);
        assert_eq!(m.inb(0, 7), READY | STATUS_DRQ);
        let mut got = m.read_words(0, 4 * 256);
        assert_eq!(m.inb(0, 7), READY | STATUS_DRQ);
        got.extend(m.read_words(0, 2 * 256));
        assert_eq!(m.inb(0, 7), READY);
        assert_eq!(m.irqs[0].count(), irqs + 2, "blocks of 4 and 2 sectors");
        assert_eq!(got, image[100 * 512..106 * 512]);
        // WRITE MULTIPLE EXT then WRITE SECTORS with CHS, read back with CHS.
        let data: Vec<u8> = (0..6 * 512).map(|i| (i % 251) as u8).collect();
        m.lba48_command(0, CMD_WRITE_MULTIPLE_EXT, 300, 6);
        assert_eq!(m.inb(0, 7), READY | STATUS_DRQ);
        m.write_bytes(0, &data);
        assert_eq!(m.inb(0, 7), READY);
        m.lba28_command(0, 0, CMD_READ_SECTORS, 300, 6);
        assert_eq!(m.read_words(0, 6 * 256), data);
        // CHS: cylinder 1, head 2, sector 3 with 16 heads / 63 sectors = LBA 1136.
        let chs = |cmd: u8, count: u8| {
            m.outb(0, 6, 0xa2);
            m.outb(0, 2, count);
            m.outb(0, 3, 3);
            m.outb(0, 4, 1);
            m.outb(0, 5, 0);
            m.outb(0, 7, cmd);
        };
        chs(CMD_WRITE_SECTORS, 1);
        m.write_bytes(0, &[0xab; 512]);
        assert_eq!(m.inb(0, 7), READY);
        m.lba28_command(0, 0, CMD_READ_SECTORS, (16 + 2) * 63 + 2, 1);
        assert_eq!(m.read_words(0, 256), vec![0xab; 512]);
        chs(CMD_READ_SECTORS, 1);
        assert_eq!(m.read_words(0, 256), vec![0xab; 512]);
        // INITIALIZE DEVICE PARAMETERS changes the translation: 4 heads, 17 sectors.
        m.outb(0, 6, 0xa3);
        m.outb(0, 2, 17);
        m.outb(0, 7, CMD_INITIALIZE_DEVICE_PARAMETERS);
        assert_eq!(m.inb(0, 7), READY);
        chs(CMD_READ_SECTORS, 1); // (1 * 4 + 2) * 17 + 2 = 104
        assert_eq!(m.read_words(0, 256), image[104 * 512..105 * 512]);
        // Sector 0 is not a CHS address.
        m.outb(0, 6, 0xa0);
        m.outb(0, 3, 0);
        m.outb(0, 7, CMD_READ_SECTORS);
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR);
        assert_eq!(m.inb(0, 1) & ERROR_IDNF, ERROR_IDNF);
        // 32-bit data port access.
        m.lba28_command(0, 0, CMD_READ_SECTORS, 7, 1);
        let mut dword = [0u8; 4];
        m.ide.command_block(0).lock().unwrap().read(0, &mut dword);
        assert_eq!(dword, image[7 * 512..7 * 512 + 4]);
    }

    #[test]
    fn sector_counts_beyond_the_disk_and_lba48_max() {
        let m = Machine::with_disk(64);
        m.lba28_command(0, 0, CMD_READ_SECTORS, 60, 5);
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR);
        assert_eq!(m.inb(0, 1) & ERROR_IDNF, ERROR_IDNF);
        m.lba28_command(0, 0, CMD_READ_SECTORS, 0, 0); // 256 sectors
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR);
        m.lba48_command(0, CMD_READ_SECTORS_EXT, (1 << 48) - 1, 0);
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR);
        m.lba48_command(0, CMD_WRITE_SECTORS_EXT, (1 << 48) - 1, 0xffff);
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR);
        m.lba48_command(0, CMD_READ_VERIFY_EXT, 63, 1);
        assert_eq!(m.inb(0, 7), READY);
        m.outb(0, 7, CMD_READ_NATIVE_MAX_EXT);
        assert_eq!(m.inb(0, 3), 63);
        m.lba48_command(0, CMD_READ_VERIFY_EXT, 64, 1);
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR);
        // A 48-bit-sized disk reports its capacity in words 100-103 and caps 60-61.
        let big = AtaDisk::new(Box::new(SizedBackend(1 << 40)));
        let w = words(&big.identify());
        assert_eq!(u32::from(w[60]) | u32::from(w[61]) << 16, (1 << 28) - 1);
        assert_eq!(w[100..104], [0, 0x8000, 0, 0]);
        assert_eq!(w[1], 16383);
    }

    /// A backend of a given size whose reads and writes fail.
    struct SizedBackend(u64);
    impl BlockBackend for SizedBackend {
        fn size(&self) -> u64 {
            self.0
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&mut self, _: u64, _: &mut [u8]) -> io::Result<()> {
            Err(io::Error::other("bad sector"))
        }
        fn write_at(&mut self, _: u64, _: &[u8]) -> io::Result<()> {
            Err(io::Error::other("disk full"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::other("flush failed"))
        }
    }

    #[test]
    fn backend_errors_and_read_only_report_errors() {
        let mut m = Machine::new();
        m.ide
            .attach(0, 0, Drive::Disk(Box::new(SizedBackend(1 << 20))))
            .unwrap();
        m.lba28_command(0, 0, CMD_READ_SECTORS, 0, 1);
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR);
        assert_eq!(m.inb(0, 1), ERROR_UNC);
        m.lba28_command(0, 0, CMD_WRITE_SECTORS, 0, 1);
        m.write_bytes(0, &[0; 512]);
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR);
        assert_eq!(m.inb(0, 1), ERROR_ABRT);
        m.outb(0, 7, CMD_FLUSH_CACHE);
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR);
        m.write_prds(0x100, &[(0x1000, 512, true)]);
        m.bm_setup(0, 0x100, true);
        m.lba28_command(0, 0, CMD_READ_DMA, 0, 1);
        m.bm_start(0, true);
        assert_eq!(m.inb(0, 7), READY | STATUS_ERR);
        assert_eq!(m.inb(0, 1), ERROR_UNC);
        assert_eq!(
            m.bm_inb(0, BM_STATUS) & BM_STATUS_ERROR,
            0,
            "device error, not bus"
        );
        // Read-only disk: writes abort at once, reads work.
        m.attach_disk(1, 0, disk_image(8), true);
        m.lba28_command(1, 0, CMD_WRITE_SECTORS, 0, 1);
        assert_eq!(m.inb(1, 7), READY | STATUS_ERR);
        assert_eq!(m.inb(1, 1), ERROR_ABRT);
        m.lba28_command(1, 0, CMD_WRITE_DMA, 0, 1);
        assert_eq!(m.inb(1, 7), READY | STATUS_ERR);
        m.lba28_command(1, 0, CMD_READ_SECTORS, 1, 1);
        assert_eq!(m.read_words(1, 256), disk_image(8)[512..1024]);
    }

    #[test]
    fn write_cache_off_flushes_every_write_and_misc_commands() {
        let m = Machine::with_disk(64);
        m.outb(0, 1, FEATURE_DISABLE_WRITE_CACHE);
        m.outb(0, 6, 0xa0);
        m.outb(0, 7, CMD_SET_FEATURES);
        assert_eq!(m.inb(0, 7), READY);
        m.lba28_command(0, 0, CMD_WRITE_SECTORS, 1, 2);
        m.write_bytes(0, &[1; 1024]);
        assert_eq!(m.inb(0, 7), READY);
        let c = m.ide.stats()[0].counters;
        assert_eq!((c.flushes, c.write_ops, c.write_bytes), (1, 2, 1024));
        m.outb(0, 7, CMD_IDENTIFY_DEVICE);
        assert_eq!(words(&m.read_words(0, 256))[85] & 0x20, 0);
        for cmd in [
            0x10,
            0x70,
            CMD_IDLE_IMMEDIATE,
            CMD_STANDBY,
            CMD_IDLE,
            0x94,
            CMD_SLEEP,
        ] {
            m.outb(0, 7, cmd);
            assert_eq!(m.inb(0, 7), READY, "command {cmd:#x}");
        }
        m.outb(0, 2, 0);
        m.outb(0, 7, CMD_CHECK_POWER_MODE);
        assert_eq!(m.inb(0, 2), 0xff);
        // Unknown commands, NOP, SMART, DEVICE RESET on a disk: abort.
        for cmd in [0x00, 0xb0, 0x08, 0xff, 0x50, 0xf9] {
            m.outb(0, 7, cmd);
            assert_eq!(m.inb(0, 7), READY | STATUS_ERR, "command {cmd:#x}");
            assert_eq!(m.inb(0, 1), ERROR_ABRT);
        }
        // EXECUTE DEVICE DIAGNOSTIC: signature and code, interrupt.
        let irqs = m.irqs[0].count();
        m.outb(0, 7, 0x90);
        assert_eq!(m.irqs[0].count(), irqs + 1);
        assert_eq!(m.inb(0, 1), ERROR_DIAGNOSTIC_PASSED);
        assert_eq!((m.inb(0, 2), m.inb(0, 3), m.inb(0, 4)), (1, 1, 0));
    }

    #[test]
    fn memory_backend_flush_is_counted_by_backend() {
        let mut disk = AtaDisk::new(Box::new(MemoryBackend::new(vec![0; 4096], false)));
        let mut io = crate::ide::UnitIo::default();
        disk.execute(&mut io, CMD_FLUSH_CACHE_EXT);
        assert_eq!(io.counters.flushes, 1);
        assert_eq!(disk.settings().multiple_sectors, 0);
        disk.restore_settings(&AtaDiskSettings {
            multiple_sectors: 200,
            ..disk.settings()
        });
        assert_eq!(disk.settings().multiple_sectors, MAX_MULTIPLE_SECTORS);
    }
}
