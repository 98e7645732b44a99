//! An ATAPI CD/DVD-ROM drive on an IDE unit (the controller is [`crate::ide`]), after
//! SFF-8020 / MMC and QEMU's behaviour.
//!
//! Emulated: IDENTIFY PACKET DEVICE (IDENTIFY DEVICE aborts with the ATAPI signature, as
//! guests expect), DEVICE RESET, PACKET with 12-byte CDBs, data by PIO (in DRQ blocks bounded
//! by the byte count limit in LBA mid/high) or DMA (feature bit 0); commands TEST UNIT READY,
//! REQUEST SENSE (sense key / ASC / ASCQ of the last error, cleared by a good command),
//! INQUIRY, READ CAPACITY, READ(10), READ(12), READ CD (user data only), READ TOC (formats 0
//! and 1, MSF and LBA), READ DISC INFORMATION, GET CONFIGURATION (profile list with DVD-ROM
//! or CD-ROM current by size, as QEMU, core and removable-medium features), MODE SENSE(10)
//! (pages 0x01, 0x2a, 0x3f), GET EVENT STATUS NOTIFICATION (polled, media class: new media,
//! eject request), START STOP UNIT (eject refused while locked), PREVENT ALLOW MEDIUM
//! REMOVAL, MECHANISM STATUS, SEEK, SET CD SPEED; 2048-byte sectors. A medium change raises
//! a unit attention (06/28) reported once by the next command other than INQUIRY,
//! REQUEST SENSE, GET CONFIGURATION or GET EVENT STATUS NOTIFICATION.
//!
//! Not emulated: audio play, raw sectors (READ CD with headers / EDC), READ DVD STRUCTURE,
//! MODE SELECT, writing, multiple sessions or tracks (one data track from LBA 0), the tray
//! as a separate state (an ejected medium is gone until the engine inserts one).

use crate::block::BlockBackend;
use crate::ide::{DmaFault, PrdCursor, UnitIo, ERROR_ABRT, STATUS_DRDY, STATUS_DSC, STATUS_ERR};
use serde::{Deserialize, Serialize};

pub const CD_SECTOR_SIZE: u64 = 2048;
pub const CDROM_MODEL: &str = "DeskVM DVD-ROM";
/// Above this many 2048-byte sectors (80 minutes) the medium is a DVD (QEMU's rule).
pub const CD_MAX_SECTORS: u64 = 80 * 60 * 75;
/// Sectors read from the backend per step of a transfer.
const READ_CHUNK_SECTORS: u64 = 32;

const ATA_IDENTIFY_PACKET_DEVICE: u8 = 0xa1;
const ATA_IDENTIFY_DEVICE: u8 = 0xec;
const ATA_PACKET: u8 = 0xa0;
const ATA_DEVICE_RESET: u8 = 0x08;

pub const TEST_UNIT_READY: u8 = 0x00;
pub const REQUEST_SENSE: u8 = 0x03;
pub const INQUIRY: u8 = 0x12;
pub const START_STOP_UNIT: u8 = 0x1b;
pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
pub const READ_CAPACITY: u8 = 0x25;
pub const READ_10: u8 = 0x28;
pub const SEEK_10: u8 = 0x2b;
pub const READ_TOC: u8 = 0x43;
pub const GET_CONFIGURATION: u8 = 0x46;
pub const GET_EVENT_STATUS_NOTIFICATION: u8 = 0x4a;
pub const READ_DISC_INFORMATION: u8 = 0x51;
pub const MODE_SENSE_10: u8 = 0x5a;
pub const READ_12: u8 = 0xa8;
pub const SET_CD_SPEED: u8 = 0xbb;
pub const MECHANISM_STATUS: u8 = 0xbd;
pub const READ_CD: u8 = 0xbe;

pub const SENSE_NONE: u8 = 0;
pub const SENSE_NOT_READY: u8 = 2;
pub const SENSE_MEDIUM_ERROR: u8 = 3;
pub const SENSE_ILLEGAL_REQUEST: u8 = 5;
pub const SENSE_UNIT_ATTENTION: u8 = 6;
pub const ASC_INVALID_OPCODE: u8 = 0x20;
pub const ASC_LBA_OUT_OF_RANGE: u8 = 0x21;
pub const ASC_INVALID_FIELD: u8 = 0x24;
pub const ASC_MEDIUM_MAY_HAVE_CHANGED: u8 = 0x28;
pub const ASC_SAVING_NOT_SUPPORTED: u8 = 0x39;
pub const ASC_MEDIUM_NOT_PRESENT: u8 = 0x3a;
pub const ASC_UNRECOVERED_READ_ERROR: u8 = 0x11;
pub const ASC_MEDIUM_REMOVAL_PREVENTED: u8 = 0x53;

/// Interrupt reason (sector count register): CoD and IO.
const REASON_COMMAND: u8 = 0x01;
const REASON_TO_HOST: u8 = 0x02;

/// Sense data of the last error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

/// Guest-visible state that survives save/restore (the medium itself is the engine's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AtapiState {
    pub sense: Sense,
    pub unit_attention: bool,
    pub locked: bool,
    pub new_media_event: bool,
    pub eject_request_event: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    /// Waiting for the 12 CDB bytes.
    Packet,
    /// Data going to the host (PIO blocks or one DMA transfer).
    DataIn,
}

pub struct AtapiCdrom {
    media: Option<Box<dyn BlockBackend>>,
    state: AtapiState,
    phase: Phase,
    /// PACKET asked for DMA (feature bit 0).
    dma: bool,
    /// Reply bytes staged for the host, and how many were handed out.
    staged: Vec<u8>,
    staged_pos: usize,
    /// Sectors still to read from the medium after `staged`.
    next_lba: u64,
    sectors_left: u64,
    guest_ejected: bool,
    /// The transfer in progress reads the medium (counted as a read operation).
    reading_medium: bool,
}

impl AtapiCdrom {
    pub fn new(media: Option<Box<dyn BlockBackend>>) -> Self {
        Self {
            media,
            state: AtapiState::default(),
            phase: Phase::Idle,
            dma: false,
            staged: Vec::new(),
            staged_pos: 0,
            next_lba: 0,
            sectors_left: 0,
            guest_ejected: false,
            reading_medium: false,
        }
    }

    pub fn state(&self) -> AtapiState {
        self.state
    }

    pub fn restore_state(&mut self, state: &AtapiState) {
        self.state = *state;
    }

    pub fn locked(&self) -> bool {
        self.state.locked
    }

    pub fn has_media(&self) -> bool {
        self.media.is_some()
    }

    /// The guest ejected the medium since the last call.
    pub(crate) fn take_guest_eject(&mut self) -> bool {
        std::mem::take(&mut self.guest_ejected)
    }

    /// Engine-side medium change; Err(()) when the guest holds the tray locked and the
    /// change is not forced (the guest then sees an eject request event).
    pub(crate) fn change_media(
        &mut self,
        media: Option<Box<dyn BlockBackend>>,
        force: bool,
    ) -> Result<(), ()> {
        if self.state.locked && !force {
            self.state.eject_request_event = true;
            return Err(());
        }
        if force {
            self.state.locked = false;
        }
        self.abandon_transfer();
        let inserted = media.is_some();
        self.media = media;
        if inserted {
            self.state.unit_attention = true;
            self.state.new_media_event = true;
        }
        Ok(())
    }

    fn sectors(&self) -> u64 {
        self.media.as_ref().map_or(0, |m| m.size() / CD_SECTOR_SIZE)
    }

    fn abandon_transfer(&mut self) {
        self.phase = Phase::Idle;
        self.staged.clear();
        self.staged_pos = 0;
        self.sectors_left = 0;
        self.reading_medium = false;
    }

    pub(crate) fn reset(&mut self) {
        self.abandon_transfer();
        self.dma = false;
    }

    pub(crate) fn execute(&mut self, io: &mut UnitIo, command: u8) {
        match command {
            ATA_IDENTIFY_PACKET_DEVICE => {
                self.abandon_transfer();
                io.start_pio_in(self.identify(), true);
            }
            ATA_PACKET => {
                if io.regs.feature & 0x02 != 0 {
                    io.abort(ERROR_ABRT); // overlapped
                    return;
                }
                self.abandon_transfer();
                self.dma = io.regs.feature & 0x01 != 0;
                self.phase = Phase::Packet;
                io.regs.sector_count = (io.regs.sector_count & !7) | REASON_COMMAND;
                io.start_pio_out(12, false);
            }
            ATA_DEVICE_RESET => {
                self.abandon_transfer();
                io.regs.set_signature(true);
                io.regs.status = 0;
                io.regs.error = 0x01;
            }
            ATA_IDENTIFY_DEVICE => {
                io.regs.set_signature(true);
                io.abort(ERROR_ABRT);
            }
            // SET FEATURES (transfer mode), power management, CHECK POWER MODE.
            0xef | 0xe0..=0xe3 | 0xe6 | 0x94..=0x97 | 0x99 => io.complete(),
            0xe5 | 0x98 => {
                io.regs.sector_count = 0xff;
                io.complete();
            }
            _ => {
                log::debug!("atapi: unsupported ATA command {command:#04x}");
                io.abort(ERROR_ABRT);
            }
        }
    }

    pub(crate) fn pio_done(&mut self, io: &mut UnitIo, data: Vec<u8>) {
        match self.phase {
            Phase::Packet => {
                let mut cdb = [0u8; 12];
                let n = data.len().min(12);
                cdb[..n].copy_from_slice(&data[..n]);
                self.run_packet(io, &cdb);
            }
            Phase::DataIn => self.next_pio_block(io),
            Phase::Idle => io.finish_quietly(),
        }
    }

    fn ok(&mut self, io: &mut UnitIo) {
        self.abandon_transfer();
        self.state.sense = Sense::default();
        io.regs.sector_count = (io.regs.sector_count & !7) | REASON_COMMAND | REASON_TO_HOST;
        io.complete();
    }

    /// CHECK CONDITION with the given sense.
    fn fail(&mut self, io: &mut UnitIo, key: u8, asc: u8, ascq: u8) {
        self.abandon_transfer();
        self.state.sense = Sense { key, asc, ascq };
        io.regs.sector_count = (io.regs.sector_count & !7) | REASON_COMMAND | REASON_TO_HOST;
        io.abort(key << 4);
        io.regs.status = STATUS_DRDY | STATUS_DSC | STATUS_ERR;
    }

    fn illegal(&mut self, io: &mut UnitIo, asc: u8) {
        self.fail(io, SENSE_ILLEGAL_REQUEST, asc, 0);
    }

    /// Sends `data` (cut to `allocation` bytes) to the host.
    fn reply(&mut self, io: &mut UnitIo, mut data: Vec<u8>, allocation: usize) {
        data.truncate(allocation);
        self.staged = data;
        self.staged_pos = 0;
        self.sectors_left = 0;
        self.start_data(io);
    }

    fn reply_sectors(&mut self, io: &mut UnitIo, lba: u64, count: u64) {
        if lba
            .checked_add(count)
            .is_none_or(|end| end > self.sectors())
        {
            self.illegal(io, ASC_LBA_OUT_OF_RANGE);
            return;
        }
        self.staged.clear();
        self.staged_pos = 0;
        self.next_lba = lba;
        self.sectors_left = count;
        self.reading_medium = count > 0;
        self.start_data(io);
    }

    fn start_data(&mut self, io: &mut UnitIo) {
        if self.staged.is_empty() && self.sectors_left == 0 {
            self.ok(io);
            return;
        }
        self.phase = Phase::DataIn;
        if self.dma {
            io.start_dma();
        } else {
            self.next_pio_block(io);
        }
    }

    /// Reads the next chunk of sectors into `staged`; false (after failing) on error.
    fn refill(&mut self, io: &mut UnitIo) -> bool {
        let n = self.sectors_left.min(READ_CHUNK_SECTORS);
        let Some(media) = self.media.as_mut() else {
            self.fail(io, SENSE_NOT_READY, ASC_MEDIUM_NOT_PRESENT, 0);
            return false;
        };
        self.staged.clear();
        self.staged.resize((n * CD_SECTOR_SIZE) as usize, 0);
        self.staged_pos = 0;
        if let Err(e) = media.read_at(self.next_lba * CD_SECTOR_SIZE, &mut self.staged) {
            log::warn!("atapi: read of sector {} failed: {e}", self.next_lba);
            self.fail(io, SENSE_MEDIUM_ERROR, ASC_UNRECOVERED_READ_ERROR, 0);
            return false;
        }
        io.counters.read_bytes += self.staged.len() as u64;
        self.next_lba += n;
        self.sectors_left -= n;
        true
    }

    /// The next PIO DRQ block, or the end of the command.
    fn next_pio_block(&mut self, io: &mut UnitIo) {
        if self.staged_pos >= self.staged.len() {
            if self.sectors_left == 0 {
                if self.reading_medium {
                    io.counters.read_ops += 1;
                }
                self.ok(io);
                return;
            }
            if !self.refill(io) {
                return;
            }
        }
        let limit = match u16::from(io.regs.lba_high) << 8 | u16::from(io.regs.lba_mid) {
            0 | 0xffff => 0xfffe,
            n => n & !1,
        }
        .max(2) as usize;
        let end = self.staged.len().min(self.staged_pos + limit);
        let block = self.staged[self.staged_pos..end].to_vec();
        self.staged_pos = end;
        io.regs.lba_mid = block.len() as u8;
        io.regs.lba_high = (block.len() >> 8) as u8;
        io.regs.sector_count = (io.regs.sector_count & !7) | REASON_TO_HOST;
        io.start_pio_in(block, true);
    }

    pub(crate) fn dma_length(&self) -> u64 {
        (self.staged.len() - self.staged_pos.min(self.staged.len())) as u64
            + self.sectors_left * CD_SECTOR_SIZE
    }

    pub(crate) fn run_dma(
        &mut self,
        io: &mut UnitIo,
        cursor: &mut PrdCursor,
    ) -> Result<(), DmaFault> {
        loop {
            let rest = self.staged.get(self.staged_pos..).unwrap_or(&[]);
            cursor.copy_to_guest(rest)?;
            self.staged_pos = self.staged.len();
            if self.sectors_left == 0 {
                break;
            }
            if !self.refill(io) {
                return Ok(());
            }
        }
        if self.reading_medium {
            io.counters.read_ops += 1;
        }
        self.ok(io);
        Ok(())
    }

    pub(crate) fn fail_dma(&mut self, io: &mut UnitIo) {
        self.fail(io, SENSE_ILLEGAL_REQUEST, ASC_INVALID_FIELD, 0);
        io.regs.error |= ERROR_ABRT;
    }

    fn run_packet(&mut self, io: &mut UnitIo, cdb: &[u8; 12]) {
        let op = cdb[0];
        let allowed_under_attention = matches!(
            op,
            INQUIRY | REQUEST_SENSE | GET_CONFIGURATION | GET_EVENT_STATUS_NOTIFICATION
        );
        if self.state.unit_attention && !allowed_under_attention {
            self.state.unit_attention = false;
            self.fail(io, SENSE_UNIT_ATTENTION, ASC_MEDIUM_MAY_HAVE_CHANGED, 0);
            return;
        }
        let needs_media = matches!(
            op,
            TEST_UNIT_READY
                | READ_CAPACITY
                | READ_10
                | READ_12
                | READ_CD
                | READ_TOC
                | SEEK_10
                | READ_DISC_INFORMATION
        );
        if needs_media && self.media.is_none() {
            self.fail(io, SENSE_NOT_READY, ASC_MEDIUM_NOT_PRESENT, 0);
            return;
        }
        let be16 = |at: usize| usize::from(cdb[at]) << 8 | usize::from(cdb[at + 1]);
        let be32 = |at: usize| u32::from_be_bytes([cdb[at], cdb[at + 1], cdb[at + 2], cdb[at + 3]]);
        match op {
            TEST_UNIT_READY | SET_CD_SPEED => self.ok(io),
            REQUEST_SENSE => {
                let s = self.state.sense;
                let mut data = vec![0u8; 18];
                data[0] = 0x70;
                data[2] = s.key;
                data[7] = 10;
                data[12] = s.asc;
                data[13] = s.ascq;
                self.reply(io, data, usize::from(cdb[4]));
            }
            INQUIRY => {
                if cdb[1] & 1 != 0 {
                    self.illegal(io, ASC_INVALID_FIELD);
                    return;
                }
                let mut data = vec![0u8; 36];
                data[0] = 0x05; // CD/DVD
                data[1] = 0x80; // removable
                data[2] = 0x00;
                data[3] = 0x21;
                data[4] = 31;
                data[8..16].copy_from_slice(b"DeskVM  ");
                data[16..32].copy_from_slice(b"DeskVM DVD-ROM  ");
                data[32..36].copy_from_slice(b"1.0 ");
                self.reply(io, data, usize::from(cdb[4]));
            }
            READ_CAPACITY => {
                let last = self.sectors().saturating_sub(1).min(u64::from(u32::MAX)) as u32;
                let mut data = last.to_be_bytes().to_vec();
                data.extend_from_slice(&(CD_SECTOR_SIZE as u32).to_be_bytes());
                self.reply(io, data, 8);
            }
            READ_10 => self.reply_sectors(io, u64::from(be32(2)), be16(7) as u64),
            READ_12 => self.reply_sectors(io, u64::from(be32(2)), u64::from(be32(6))),
            READ_CD => {
                let count = u64::from(cdb[6]) << 16 | u64::from(cdb[7]) << 8 | u64::from(cdb[8]);
                match cdb[9] & 0xf8 {
                    0x00 => self.ok(io),
                    0x10 => self.reply_sectors(io, u64::from(be32(2)), count),
                    _ => self.illegal(io, ASC_INVALID_FIELD),
                }
            }
            SEEK_10 => {
                if u64::from(be32(2)) >= self.sectors() {
                    self.illegal(io, ASC_LBA_OUT_OF_RANGE);
                } else {
                    self.ok(io);
                }
            }
            READ_TOC => self.read_toc(io, cdb, be16(7)),
            READ_DISC_INFORMATION => {
                if cdb[1] & 7 != 0 {
                    self.illegal(io, ASC_INVALID_FIELD);
                    return;
                }
                let mut data = vec![0u8; 34];
                data[1] = 32;
                data[2] = 0x0e; // last session complete, disc complete
                data[3] = 1; // first track
                data[4] = 1; // sessions
                data[5] = 1; // first track of last session
                data[6] = 1; // last track of last session
                data[7] = 0x20; // unrestricted use
                self.reply(io, data, be16(7));
            }
            GET_CONFIGURATION => self.get_configuration(io, cdb, be16(7)),
            MODE_SENSE_10 => self.mode_sense(io, cdb, be16(7)),
            GET_EVENT_STATUS_NOTIFICATION => self.event_status(io, cdb, be16(7)),
            START_STOP_UNIT => {
                let start = cdb[4] & 1 != 0;
                let load_eject = cdb[4] & 2 != 0;
                if load_eject && !start {
                    if self.state.locked {
                        self.fail(io, SENSE_ILLEGAL_REQUEST, ASC_MEDIUM_REMOVAL_PREVENTED, 2);
                        return;
                    }
                    if self.media.take().is_some() {
                        self.guest_ejected = true;
                    }
                }
                self.ok(io);
            }
            PREVENT_ALLOW_MEDIUM_REMOVAL => {
                self.state.locked = cdb[4] & 1 != 0;
                self.ok(io);
            }
            MECHANISM_STATUS => {
                let mut data = vec![0u8; 8];
                if self.media.is_none() {
                    data[1] = 0x10; // door open
                }
                self.reply(io, data, be16(8));
            }
            _ => {
                log::debug!("atapi: unsupported packet command {op:#04x}");
                self.illegal(io, ASC_INVALID_OPCODE);
            }
        }
    }

    fn read_toc(&mut self, io: &mut UnitIo, cdb: &[u8; 12], allocation: usize) {
        let msf = cdb[1] & 2 != 0;
        let format = match cdb[2] & 0x0f {
            0 => cdb[9] >> 6, // SFF-8020 style
            f => f,
        };
        let sectors = self.sectors();
        let address = |lba: u64| -> [u8; 4] {
            if msf {
                let frames = lba + 150;
                let m = (frames / (60 * 75)).min(255) as u8;
                [0, m, ((frames / 75) % 60) as u8, (frames % 75) as u8]
            } else {
                (lba.min(u64::from(u32::MAX)) as u32).to_be_bytes()
            }
        };
        let mut data = vec![0u8, 0, 1, 1];
        match format {
            0 => {
                let start = cdb[6];
                if start > 1 && start != 0xaa {
                    self.illegal(io, ASC_INVALID_FIELD);
                    return;
                }
                if start <= 1 {
                    data.extend_from_slice(&[0, 0x14, 1, 0]);
                    data.extend_from_slice(&address(0));
                }
                data.extend_from_slice(&[0, 0x14, 0xaa, 0]);
                data.extend_from_slice(&address(sectors));
            }
            1 => {
                data.extend_from_slice(&[0, 0x14, 1, 0]);
                data.extend_from_slice(&address(0));
            }
            _ => {
                self.illegal(io, ASC_INVALID_FIELD);
                return;
            }
        }
        let len = (data.len() - 2) as u16;
        data[..2].copy_from_slice(&len.to_be_bytes());
        self.reply(io, data, allocation);
    }

    fn get_configuration(&mut self, io: &mut UnitIo, cdb: &[u8; 12], allocation: usize) {
        let profile: u16 = match self.media {
            None => 0,
            Some(_) if self.sectors() > CD_MAX_SECTORS => 0x0010,
            Some(_) => 0x0008,
        };
        let start_feature = u16::from(cdb[2]) << 8 | u16::from(cdb[3]);
        let mut data = vec![0u8; 8];
        data[6..8].copy_from_slice(&profile.to_be_bytes());
        // Feature 0: profile list.
        if start_feature == 0 {
            data.extend_from_slice(&[0, 0, 0x03, 8]);
            data.extend_from_slice(&[0x00, 0x10, u8::from(profile == 0x10), 0]);
            data.extend_from_slice(&[0x00, 0x08, u8::from(profile == 0x08), 0]);
        }
        // Feature 1: core (ATAPI interface).
        if start_feature <= 1 {
            data.extend_from_slice(&[0, 1, 0x0b, 8, 0, 0, 0, 2, 1, 0, 0, 0]);
        }
        // Feature 3: removable medium (tray, eject, lock).
        if start_feature <= 3 {
            data.extend_from_slice(&[0, 3, 0x0b, 4, 0x29, 0, 0, 0]);
        }
        let len = (data.len() - 4) as u32;
        data[..4].copy_from_slice(&len.to_be_bytes());
        self.reply(io, data, allocation);
    }

    fn mode_sense(&mut self, io: &mut UnitIo, cdb: &[u8; 12], allocation: usize) {
        let page_control = cdb[2] >> 6;
        let page = cdb[2] & 0x3f;
        if page_control == 3 {
            self.fail(io, SENSE_ILLEGAL_REQUEST, ASC_SAVING_NOT_SUPPORTED, 0);
            return;
        }
        let error_recovery = [0x01, 0x06, 0x00, 0x05, 0, 0, 0, 0];
        let mut capabilities = [0u8; 22];
        capabilities[0] = 0x2a;
        capabilities[1] = 0x14;
        capabilities[2] = 0x3b; // reads CD-R, CD-RW, DVD-ROM, method 2
        capabilities[4] = 0x71; // audio play, multi-session, mode 2 form 1/2
        capabilities[5] = 0xff;
        capabilities[6] = 0x2d | if self.state.locked { 0x02 } else { 0 }; // lock, eject, tray
        capabilities[8..10].copy_from_slice(&706u16.to_be_bytes());
        capabilities[10..12].copy_from_slice(&2u16.to_be_bytes());
        capabilities[12..14].copy_from_slice(&512u16.to_be_bytes());
        capabilities[14..16].copy_from_slice(&706u16.to_be_bytes());
        let mut data = vec![0u8; 8];
        data[2] = if self.media.is_some() { 0x01 } else { 0x70 };
        match page {
            0x01 => data.extend_from_slice(&error_recovery),
            0x2a => data.extend_from_slice(&capabilities),
            0x3f => {
                data.extend_from_slice(&error_recovery);
                data.extend_from_slice(&capabilities);
            }
            _ => {
                self.illegal(io, ASC_INVALID_FIELD);
                return;
            }
        }
        let len = (data.len() - 2) as u16;
        data[..2].copy_from_slice(&len.to_be_bytes());
        self.reply(io, data, allocation);
    }

    fn event_status(&mut self, io: &mut UnitIo, cdb: &[u8; 12], allocation: usize) {
        if cdb[1] & 1 == 0 {
            self.illegal(io, ASC_INVALID_FIELD); // asynchronous mode
            return;
        }
        let data = if cdb[4] & 0x10 != 0 {
            let code = if std::mem::take(&mut self.state.new_media_event) {
                2
            } else if std::mem::take(&mut self.state.eject_request_event) {
                1
            } else {
                0
            };
            let status = if self.media.is_some() { 0x02 } else { 0 };
            vec![0, 6, 0x04, 0x10, code, status, 0, 0]
        } else {
            vec![0, 2, 0x80, 0x10]
        };
        self.reply(io, data, allocation);
    }

    /// The 512-byte IDENTIFY PACKET DEVICE data.
    pub fn identify(&self) -> Vec<u8> {
        let mut w = [0u16; 256];
        w[0] = 0x85c0; // ATAPI, CD-ROM, removable, 50 us DRQ, 12-byte packets
        crate::ata::put_string(&mut w[10..20], "DVCD0000000000000001");
        crate::ata::put_string(&mut w[23..27], crate::ata::FIRMWARE_REVISION);
        crate::ata::put_string(&mut w[27..47], CDROM_MODEL);
        w[49] = 0x0b00; // IORDY, LBA, DMA
        w[53] = 0x0007;
        w[62] = 0x0007;
        w[63] = 0x0007;
        w[64] = 0x0003;
        w[65] = 120;
        w[66] = 120;
        w[67] = 120;
        w[68] = 120;
        w[71] = 30;
        w[72] = 30;
        w[80] = 0x001e; // ATAPI-4..
        w[82] = 0x4214; // NOP, DEVICE RESET, PACKET, removable media
        w[83] = 0x4000;
        w[84] = 0x4000;
        w[85] = 0x4214;
        w[87] = 0x4000;
        w[88] = 0x003f;
        w[93] = 0x6001;
        crate::ata::finish_identify(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemoryBackend;
    use crate::ide::tests::Machine;
    use crate::ide::*;

    const READY: u8 = STATUS_DRDY | STATUS_DSC;

    /// A CD image whose sector n starts with n (u32 LE) and has an El Torito boot record
    /// volume descriptor at sector 17.
    fn iso(sectors: usize) -> Vec<u8> {
        let mut data = vec![0u8; sectors * 2048];
        for (n, sector) in data.chunks_mut(2048).enumerate() {
            sector[..4].copy_from_slice(&(n as u32).to_le_bytes());
            sector[4] = 0xc0;
        }
        let brvd = &mut data[17 * 2048..18 * 2048];
        brvd[0] = 0;
        brvd[1..6].copy_from_slice(b"CD001");
        brvd[6] = 1;
        brvd[7..30].copy_from_slice(b"EL TORITO SPECIFICATION");
        brvd[0x47..0x4b].copy_from_slice(&19u32.to_le_bytes());
        data
    }

    fn media(sectors: usize) -> Option<Box<dyn BlockBackend>> {
        Some(Box::new(MemoryBackend::new(iso(sectors), true)))
    }

    fn machine(sectors: usize) -> Machine {
        let m = Machine::new();
        m.ide.attach(1, 0, Drive::Cdrom(media(sectors))).unwrap();
        m
    }

    /// SeaBIOS atapi_cmd_data / Linux PIO: PACKET with a byte count limit, the CDB, then
    /// every DRQ block. Returns (data, final status).
    fn packet(m: &Machine, cdb: &[u8], byte_limit: u16) -> (Vec<u8>, u8) {
        m.outb(1, 6, 0xa0);
        m.outb(1, 1, 0);
        m.outb(1, 4, byte_limit as u8);
        m.outb(1, 5, (byte_limit >> 8) as u8);
        m.outb(1, 7, 0xa0);
        assert_eq!(m.alt_status(1), READY | STATUS_DRQ);
        assert_eq!(m.inb(1, 2) & 3, 1, "CoD: waiting for the packet");
        let mut full = [0u8; 12];
        full[..cdb.len()].copy_from_slice(cdb);
        m.write_bytes(1, &full);
        let mut data = Vec::new();
        loop {
            let status = m.inb(1, 7);
            if status & STATUS_DRQ == 0 {
                assert_eq!(m.inb(1, 2) & 3, 3, "IO|CoD at completion");
                return (data, status);
            }
            assert_eq!(m.inb(1, 2) & 3, 2, "IO: data to the host");
            let len = usize::from(m.inb(1, 4)) | usize::from(m.inb(1, 5)) << 8;
            assert!(
                len <= usize::from(byte_limit.max(2)),
                "block {len} over limit"
            );
            data.extend(m.read_words(1, len.div_ceil(2)));
            data.truncate(data.len() - len % 2);
        }
    }

    fn sense(m: &Machine) -> (u8, u8, u8) {
        let (d, status) = packet(m, &[REQUEST_SENSE, 0, 0, 0, 18], 18);
        assert_eq!(status, READY);
        (d[2], d[12], d[13])
    }

    #[test]
    fn seabios_probe_signature_identify_packet() {
        let m = machine(64);
        m.device_control(1, CONTROL_NIEN | CONTROL_SRST);
        m.device_control(1, CONTROL_NIEN);
        assert_eq!(m.inb(1, 7), 0, "ATAPI: status 0 after reset");
        assert_eq!((m.inb(1, 4), m.inb(1, 5)), (0x14, 0xeb));
        m.outb(1, 6, 0xa0);
        m.outb(1, 7, 0xec);
        assert_eq!(m.inb(1, 7), READY | STATUS_ERR);
        assert_eq!((m.inb(1, 4), m.inb(1, 5)), (0x14, 0xeb));
        m.outb(1, 7, 0xa1);
        let id = m.read_words(1, 256);
        assert_eq!(u16::from_le_bytes([id[0], id[1]]), 0x85c0);
        let model: String = id[54..94]
            .chunks(2)
            .flat_map(|c| [c[1] as char, c[0] as char])
            .collect();
        assert_eq!(model.trim_end(), CDROM_MODEL);
        assert_eq!(id.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        // DEVICE RESET: signature again, no interrupt.
        assert_eq!(m.inb(1, 7), READY);
        m.device_control(1, 0);
        let irqs = m.irqs[1].count();
        m.outb(1, 7, 0x08);
        assert_eq!(m.irqs[1].count(), irqs);
        assert_eq!(m.inb(1, 7), 0);
        assert_eq!((m.inb(1, 4), m.inb(1, 5)), (0x14, 0xeb));
    }

    #[test]
    fn el_torito_boot_record_via_read10_and_pio_blocks() {
        let m = machine(64);
        let (d, status) = packet(&m, &[TEST_UNIT_READY], 0);
        assert_eq!((d.len(), status), (0, READY));
        let (d, status) = packet(&m, &[READ_10, 0, 0, 0, 0, 17, 0, 0, 1], 2048);
        assert_eq!(status, READY);
        assert_eq!(&d[1..6], b"CD001");
        assert_eq!(&d[7..30], b"EL TORITO SPECIFICATION");
        // Several sectors with a small odd byte count limit: blocks of 1000 bytes.
        let (d, _) = packet(&m, &[READ_10, 0, 0, 0, 0, 20, 0, 0, 3], 1001);
        assert_eq!(d.len(), 3 * 2048);
        assert_eq!(d[2048..2052], 21u32.to_le_bytes());
        let (d, _) = packet(&m, &[READ_12, 0, 0, 0, 0, 62, 0, 0, 0, 2], 0xffff);
        assert_eq!(d[2048..2052], 63u32.to_le_bytes());
        let (d, _) = packet(&m, &[READ_CD, 0, 0, 0, 0, 5, 0, 0, 1, 0x10], 0xfffe);
        assert_eq!(d.len(), 2048);
        assert_eq!(d[..4], 5u32.to_le_bytes());
        let (_, status) = packet(&m, &[READ_CD, 0, 0, 0, 0, 5, 0, 0, 1, 0xf8], 0xfffe);
        assert_eq!(status & STATUS_ERR, STATUS_ERR);
        assert_eq!(sense(&m), (5, 0x24, 0));
        // Beyond the end.
        let (_, status) = packet(&m, &[READ_10, 0, 0, 0, 0, 63, 0, 0, 2], 2048);
        assert_eq!(status, READY | STATUS_ERR);
        assert_eq!(m.inb(1, 1) >> 4, SENSE_ILLEGAL_REQUEST);
        assert_eq!(sense(&m), (5, 0x21, 0));
        assert_eq!(sense(&m), (0, 0, 0), "a good command clears the sense");
        let c = m.ide.stats()[0].counters;
        assert_eq!(c.read_bytes, (1 + 3 + 2 + 1) * 2048);
        assert_eq!(c.read_ops, 4);
    }

    #[test]
    fn inquiry_capacity_toc_config_mode_sense_and_friends() {
        let m = machine(400_000); // more than 80 minutes: a DVD
        let (d, _) = packet(&m, &[INQUIRY, 0, 0, 0, 36], 36);
        assert_eq!(d[0], 5);
        assert_eq!(&d[16..30], b"DeskVM DVD-ROM");
        let (d, _) = packet(&m, &[INQUIRY, 0, 0, 0, 5], 36);
        assert_eq!(d.len(), 5, "allocation length");
        let (d, _) = packet(&m, &[READ_CAPACITY], 8);
        assert_eq!(d, [0, 6, 0x1a, 0x7f, 0, 0, 8, 0]);
        // TOC format 0, LBA then MSF.
        let (d, _) = packet(&m, &[READ_TOC, 0, 0, 0, 0, 0, 0, 0, 100], 100);
        assert_eq!(d.len(), 20);
        assert_eq!(d[..4], [0, 18, 1, 1]);
        assert_eq!(d[4..12], [0, 0x14, 1, 0, 0, 0, 0, 0]);
        assert_eq!(d[12..20], [0, 0x14, 0xaa, 0, 0, 6, 0x1a, 0x80]);
        let (d, _) = packet(&m, &[READ_TOC, 2, 0, 0, 0, 0, 0, 0, 100], 100);
        assert_eq!(d[8..12], [0, 0, 2, 0], "track 1 at 00:02:00");
        let frames = 400_000 + 150;
        assert_eq!(
            d[16..20],
            [
                0,
                (frames / 4500) as u8,
                ((frames / 75) % 60) as u8,
                (frames % 75) as u8
            ]
        );
        let (d, _) = packet(&m, &[READ_TOC, 0, 0, 0, 0, 0, 0xaa, 0, 100], 100);
        assert_eq!(d.len(), 12);
        let (_, status) = packet(&m, &[READ_TOC, 0, 0, 0, 0, 0, 5, 0, 100], 100);
        assert_eq!(status & STATUS_ERR, STATUS_ERR);
        // Format 1 (session info), via the old byte 9 encoding too.
        let (d, _) = packet(&m, &[READ_TOC, 0, 1, 0, 0, 0, 0, 0, 12], 12);
        assert_eq!(d, [0, 10, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0]);
        let (d2, _) = packet(&m, &[READ_TOC, 0, 0, 0, 0, 0, 0, 0, 12, 0x40], 12);
        assert_eq!(d2, d);
        let (_, status) = packet(&m, &[READ_TOC, 0, 2, 0, 0, 0, 0, 0, 12], 12);
        assert_eq!(status & STATUS_ERR, STATUS_ERR);
        // GET CONFIGURATION: DVD-ROM current.
        let (d, _) = packet(&m, &[GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 200], 200);
        assert_eq!(d[6..8], [0, 0x10]);
        assert_eq!(d[8..12], [0, 0, 3, 8]);
        assert_eq!(d[12..16], [0, 0x10, 1, 0]);
        assert_eq!(d[16..20], [0, 0x08, 0, 0]);
        assert_eq!(
            u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize,
            d.len() - 4
        );
        // MODE SENSE(10): 0x2a, 0x01, 0x3f; saved values refused; unknown page refused.
        let (d, _) = packet(&m, &[MODE_SENSE_10, 0, 0x2a, 0, 0, 0, 0, 0, 255], 255);
        assert_eq!(d.len(), 30);
        assert_eq!(d[8..10], [0x2a, 0x14]);
        let (d, _) = packet(&m, &[MODE_SENSE_10, 0, 0x01, 0, 0, 0, 0, 0, 255], 255);
        assert_eq!(d[8..10], [0x01, 0x06]);
        let (d, _) = packet(&m, &[MODE_SENSE_10, 0, 0x3f, 0, 0, 0, 0, 0, 255], 255);
        assert_eq!(d.len(), 8 + 8 + 22);
        assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, d.len() - 2);
        let (_, status) = packet(&m, &[MODE_SENSE_10, 0, 0xea, 0, 0, 0, 0, 0, 255], 255);
        assert_eq!(status & STATUS_ERR, STATUS_ERR);
        assert_eq!(sense(&m), (5, 0x39, 0));
        let (_, status) = packet(&m, &[MODE_SENSE_10, 0, 0x05, 0, 0, 0, 0, 0, 255], 255);
        assert_eq!(status & STATUS_ERR, STATUS_ERR);
        // Disc information, mechanism status, seek, speed.
        let (d, _) = packet(&m, &[READ_DISC_INFORMATION, 0, 0, 0, 0, 0, 0, 0, 34], 34);
        assert_eq!(d[..8], [0, 32, 0x0e, 1, 1, 1, 1, 0x20]);
        let (d, _) = packet(&m, &[MECHANISM_STATUS, 0, 0, 0, 0, 0, 0, 0, 0, 8], 8);
        assert_eq!(d, [0; 8]);
        let (_, status) = packet(&m, &[SEEK_10, 0, 0, 0, 0x10, 0], 0);
        assert_eq!(status, READY);
        let (_, status) = packet(&m, &[SEEK_10, 0, 0xff, 0, 0, 0], 0);
        assert_eq!(status & STATUS_ERR, STATUS_ERR);
        let (_, status) = packet(&m, &[SET_CD_SPEED, 0, 0xff, 0xff], 0);
        assert_eq!(status, READY);
        // Unknown opcode.
        let (_, status) = packet(&m, &[0x55], 0);
        assert_eq!(status & STATUS_ERR, STATUS_ERR);
        assert_eq!(sense(&m), (5, 0x20, 0));
        // A small image is a CD.
        let cd = machine(100);
        let (d, _) = packet(&cd, &[GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 8], 8);
        assert_eq!(d[6..8], [0, 0x08]);
    }

    #[test]
    fn media_change_unit_attention_then_ready_and_events() {
        let m = Machine::new();
        m.ide.attach(1, 1, Drive::Cdrom(None)).unwrap();
        let (_, status) = packet_unit1(&m, &[TEST_UNIT_READY]);
        assert_eq!(status & STATUS_ERR, STATUS_ERR);
        assert_eq!(m.inb(1, 1) >> 4, SENSE_NOT_READY);
        let (d, _) = packet_unit1(&m, &[REQUEST_SENSE, 0, 0, 0, 18]);
        assert_eq!((d[2], d[12]), (2, 0x3a));
        let (d, _) = packet_unit1(&m, &[GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 8]);
        assert_eq!(d[6..8], [0, 0], "no profile without media");
        m.ide.change_media(1, 1, media(32), false).unwrap();
        // GESN reports the new medium once; it is allowed under unit attention.
        let gesn = [GET_EVENT_STATUS_NOTIFICATION, 1, 0, 0, 0x10, 0, 0, 0, 8];
        let (d, _) = packet_unit1(&m, &gesn);
        assert_eq!(d, [0, 6, 4, 0x10, 2, 2, 0, 0]);
        let (d, _) = packet_unit1(&m, &gesn);
        assert_eq!(d[4], 0);
        // Unit attention, then ready.
        let (_, status) = packet_unit1(&m, &[TEST_UNIT_READY]);
        assert_eq!(status & STATUS_ERR, STATUS_ERR);
        assert_eq!(m.inb(1, 1) >> 4, SENSE_UNIT_ATTENTION);
        let (d, _) = packet_unit1(&m, &[REQUEST_SENSE, 0, 0, 0, 18]);
        assert_eq!((d[2], d[12]), (6, 0x28));
        let (_, status) = packet_unit1(&m, &[TEST_UNIT_READY]);
        assert_eq!(status, READY);
        // Asynchronous GESN is refused; other classes get "no event available".
        let (_, status) = packet_unit1(&m, &[GET_EVENT_STATUS_NOTIFICATION, 0, 0, 0, 0x10]);
        assert_eq!(status & STATUS_ERR, STATUS_ERR);
        let (d, _) = packet_unit1(
            &m,
            &[GET_EVENT_STATUS_NOTIFICATION, 1, 0, 0, 0x04, 0, 0, 0, 8],
        );
        assert_eq!(d, [0, 2, 0x80, 0x10]);
    }

    fn packet_unit1(m: &Machine, cdb: &[u8]) -> (Vec<u8>, u8) {
        m.outb(1, 6, 0xb0);
        m.outb(1, 4, 0x00);
        m.outb(1, 5, 0x08);
        m.outb(1, 7, 0xa0);
        let mut full = [0u8; 12];
        full[..cdb.len()].copy_from_slice(cdb);
        m.write_bytes(1, &full);
        let mut data = Vec::new();
        while m.inb(1, 7) & STATUS_DRQ != 0 {
            let len = usize::from(m.inb(1, 4)) | usize::from(m.inb(1, 5)) << 8;
            data.extend(m.read_words(1, len.div_ceil(2)));
        }
        (data, m.inb(1, 7))
    }

    #[test]
    fn eject_locked_and_unlocked() {
        let m = machine(32);
        let (_, status) = packet(&m, &[PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1], 0);
        assert_eq!(status, READY);
        assert!(m.ide.medium_locked(1, 0));
        let (d, _) = packet(&m, &[MODE_SENSE_10, 0, 0x2a, 0, 0, 0, 0, 0, 30], 30);
        assert_eq!(d[14] & 0x02, 0x02, "lock state in the capabilities page");
        // The guest's own eject is refused while locked.
        let (_, status) = packet(&m, &[START_STOP_UNIT, 0, 0, 0, 0x02], 0);
        assert_eq!(status & STATUS_ERR, STATUS_ERR);
        assert_eq!(sense(&m), (5, 0x53, 2));
        // The engine's change is refused too, and the guest gets an eject request.
        assert_eq!(
            m.ide.change_media(1, 0, None, false),
            Err(IdeError::MediumLocked {
                channel: 1,
                unit: 0
            })
        );
        let gesn = [GET_EVENT_STATUS_NOTIFICATION, 1, 0, 0, 0x10, 0, 0, 0, 8];
        let (d, _) = packet(&m, &gesn, 8);
        assert_eq!(d[4..6], [1, 2], "eject request, medium present");
        // The guest unlocks and ejects: the engine hears of it.
        packet(&m, &[PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 0], 0);
        let (_, status) = packet(&m, &[START_STOP_UNIT, 0, 0, 0, 0x02], 0);
        assert_eq!(status, READY);
        assert_eq!(m.ide.take_eject_requests(), vec![(1, 0)]);
        assert!(m.ide.take_eject_requests().is_empty());
        let (_, status) = packet(&m, &[TEST_UNIT_READY], 0);
        assert_eq!(status & STATUS_ERR, STATUS_ERR);
        assert_eq!(sense(&m), (2, 0x3a, 0));
        let (d, _) = packet(&m, &[MECHANISM_STATUS, 0, 0, 0, 0, 0, 0, 0, 0, 8], 8);
        assert_eq!(d[1], 0x10);
        // Forced change while locked works.
        packet(&m, &[PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1], 0);
        m.ide.change_media(1, 0, media(32), true).unwrap();
        assert!(!m.ide.medium_locked(1, 0));
        let (_, status) = packet(&m, &[READ_CAPACITY], 8);
        assert_eq!(status & STATUS_ERR, STATUS_ERR, "unit attention first");
        let (d, _) = packet(&m, &[READ_CAPACITY], 8);
        assert_eq!(d[..4], [0, 0, 0, 31]);
    }

    #[test]
    fn packet_dma_reads_and_hostile_prds() {
        let mut m = machine(64);
        m.fill_ram(0x33);
        m.write_prds(0x1000, &[(0x4000, 4096, false), (0x10000, 2048, true)]);
        m.bm_setup(1, 0x1000, true);
        m.outb(1, 6, 0xa0);
        m.outb(1, 1, 1); // DMA
        m.outb(1, 7, 0xa0);
        m.write_bytes(1, &[READ_10, 0, 0, 0, 0, 17, 0, 0, 3, 0, 0, 0]);
        assert_eq!(m.alt_status(1) & STATUS_DRQ, STATUS_DRQ);
        m.bm_start(1, true);
        assert_eq!(m.inb(1, 7), READY);
        assert_eq!(m.bm_inb(1, BM_STATUS) & 7, BM_STATUS_INTERRUPT);
        assert_eq!(&m.ram(0x4001, 5), b"CD001");
        assert_eq!(m.ram(0x4800, 4), 18u32.to_le_bytes());
        assert_eq!(m.ram(0x10000, 4), 19u32.to_le_bytes());
        assert_eq!(m.ram(0x10800, 4), [0x33; 4]);
        m.bm_stop(1);
        // A DMA INQUIRY (small reply) with a table reaching beyond RAM: error, untouched.
        m.write_prds(0x1000, &[(0x4000, 16, false), (0xfff0_0000, 64, true)]);
        m.fill_ram(0x44);
        m.write_prds(0x1000, &[(0x4000, 16, false), (0xfff0_0000, 64, true)]);
        m.bm_setup(1, 0x1000, true);
        m.outb(1, 1, 1);
        m.outb(1, 7, 0xa0);
        m.write_bytes(1, &[INQUIRY, 0, 0, 0, 36, 0, 0, 0, 0, 0, 0, 0]);
        m.bm_start(1, true);
        assert_eq!(m.inb(1, 7) & STATUS_ERR, STATUS_ERR);
        assert_eq!(m.bm_inb(1, BM_STATUS) & BM_STATUS_ERROR, BM_STATUS_ERROR);
        assert_eq!(m.ram(0x4000, 16), [0x44; 16]);
    }

    #[test]
    fn hostile_cdbs_never_panic() {
        let m = machine(40);
        let mut rng = crate::test_support::TestRng(0x5eed_cafe_f00d_0001);
        for _ in 0..3000 {
            let mut cdb = [0u8; 12];
            for b in cdb.iter_mut() {
                *b = rng.next() as u8;
            }
            // Bias toward implemented opcodes, keep transfers small.
            let ops = [
                READ_10,
                READ_12,
                READ_CD,
                READ_TOC,
                MODE_SENSE_10,
                GET_CONFIGURATION,
                GET_EVENT_STATUS_NOTIFICATION,
                INQUIRY,
                REQUEST_SENSE,
                MECHANISM_STATUS,
                START_STOP_UNIT,
                SEEK_10,
                READ_DISC_INFORMATION,
                cdb[0],
            ];
            cdb[0] = ops[(rng.next() % ops.len() as u64) as usize];
            if matches!(cdb[0], READ_10 | READ_12 | READ_CD) {
                cdb[2..6].copy_from_slice(&[0, 0, 0, (rng.next() % 50) as u8]);
                cdb[6..10].copy_from_slice(&[0, 0, 0, (rng.next() % 4) as u8]);
                if cdb[0] == READ_CD {
                    cdb[9] = 0x10;
                }
            }
            let limit = (rng.next() & 0xffff) as u16;
            m.outb(1, 6, 0xa0);
            m.outb(1, 1, 0);
            m.outb(1, 4, limit as u8);
            m.outb(1, 5, (limit >> 8) as u8);
            m.outb(1, 7, 0xa0);
            m.write_bytes(1, &cdb);
            let mut guard = 0;
            while m.inb(1, 7) & STATUS_DRQ != 0 {
                m.inw(1);
                guard += 1;
                assert!(guard < 200_000, "transfer never ends");
            }
            if rng.next().is_multiple_of(7) {
                let _ = m.ide.change_media(1, 0, media(40), true);
            }
        }
    }
}
