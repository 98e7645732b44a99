//! Realtek RTL8139C+ 10/100 Ethernet controller (PCI 10ec:8139, revision 0x20).
//!
//! Emulated: BAR0 256 bytes of I/O ports and BAR1 the same registers memory-mapped; IDR0-5
//! (MAC), MAR0-7 (multicast hash, Linux `ether_crc` top 6 bits), CR (RST, RE, TE, BUFE),
//! the C-mode ring-buffer receiver (RBSTART, CAPR/CBR, 4-byte header with status and length
//! including CRC, 8/16/32/64 KiB buffers, RCR.WRAP writing past the end), RCR accept bits
//! (AAP, APM, AM, AB), the four C-mode transmit descriptors (TSAD0-3 / TSD0-3 with OWN, TOK,
//! TABT, size; TSAD status summary at 0x60), IMR/ISR (write 1 to clear), TCR (with the
//! RTL8139C+ hardware version bits) / RCR, MPC, the 93C46 EEPROM bit-banged through 9346CR
//! (words 0..=2 ID 0x8129/10ec/8139, MAC in words 7..=9; auto-load), CONFIG0-5 (CONFIG1/3/4/5
//! writable only while 9346CR unlocks them), BMCR/BMSR/ANAR/ANLPAR/ANER and MSR for the
//! link, TCTR/TimerInt (33 MHz, TimeOut interrupt through [`Timed`]), MULINT (stored); C+
//! mode (CPCR C+ TX/RX enable, RX checksum, RX VLAN): 16-byte descriptor rings at
//! TNPDS (transmit, kicked by TPPoll NPQ) and RDSAR (receive), OWN/EOR/FS/LS, IPCS/UDPCS/
//! TCPCS transmit checksum offload, LGSEN TCP segmentation, VLAN tag insertion (TAGC) and
//! stripping, receive checksum status (protocol, IP/UDP/TCP fail bits), the DTCCR tally
//! counter dump. Link changes raise ISR LinkChg.
//!
//! Not emulated: the high-priority transmit queue (THPDS is stored, HPQ polls do nothing),
//! early transmit/receive thresholds and interrupts, FIFO overflow, wake-on-LAN and power
//! management, EEPROM writes, loopback, 8129 external MII, MULINT interrupt moderation
//! (interrupts are immediate), flow control. C+ receive never splits a frame over several
//! descriptors (as Linux 8139cp expects); a frame larger than the descriptor's buffer is
//! dropped and counted.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::clock::{Clock, Timed};
use crate::irq::IrqLine;
use crate::net::{
    self, DropReason, FrameSink, NetworkCard, NicCounters, ReceiveOutcome, TsoParams, ETH_FCS_LEN,
    ETH_HEADER_LEN, ETH_MAX_FRAME_LEN_VLAN, MAX_JUMBO_FRAME_LEN, MAX_TSO_FRAME_LEN,
};
use crate::pci::{PciConfigSpace, PciFunction};
use crate::GuestMemory;

pub const VENDOR_REALTEK: u16 = 0x10ec;
pub const DEVICE_RTL8139: u16 = 0x8139;
/// Revision 0x20 and up is a C+ chip (Linux then binds 8139cp instead of 8139too).
pub const REVISION_8139CPLUS: u8 = 0x20;
pub const CLASS_ETHERNET: u32 = 0x02_00_00;
/// Both BARs are 256 bytes.
pub const REGISTER_SPACE_SIZE: u64 = 0x100;
pub const BAR_IO: usize = 0;
pub const BAR_MMIO: usize = 1;

const EEPROM_WORDS: usize = 64;
/// Largest frame a C-mode transmit descriptor may carry (datasheet: 1792 bytes).
const MAX_CMODE_TX_LEN: usize = 1792;
/// Descriptor rings of C+ mode wrap after this many descriptors even without EOR.
const CPLUS_RING_MAX: u32 = 64;
/// TCTR frequency.
const TIMER_HZ: u128 = 33_000_000;

// Register offsets.
const IDR0: usize = 0x00;
const MAR0: usize = 0x08;
const TSD0: usize = 0x10;
const DTCCR: usize = 0x10;
const TSAD0: usize = 0x20;
const TNPDS: usize = 0x20;
const RBSTART: usize = 0x30;
const CR: usize = 0x37;
const CAPR: usize = 0x38;
const CBR: usize = 0x3a;
const IMR: usize = 0x3c;
const ISR: usize = 0x3e;
const TCR: usize = 0x40;
const RCR: usize = 0x44;
const TCTR: usize = 0x48;
const MPC: usize = 0x4c;
const CR9346: usize = 0x50;
const CONFIG0: usize = 0x51;
const CONFIG1: usize = 0x52;
const TIMER_INT: usize = 0x54;
const MSR: usize = 0x58;
const CONFIG3: usize = 0x59;
const CONFIG4: usize = 0x5a;
const TSAD_SUMMARY: usize = 0x60;
const BMCR: usize = 0x62;
const BMSR: usize = 0x64;
const ANAR: usize = 0x66;
const ANLPAR: usize = 0x68;
const ANER: usize = 0x6a;
const CONFIG5: usize = 0xd8;
const TPPOLL: usize = 0xd9;
const CPCR: usize = 0xe0;
const RDSAR: usize = 0xe4;

// CR bits.
const CR_BUFE: u8 = 1 << 0;
const CR_TE: u8 = 1 << 2;
const CR_RE: u8 = 1 << 3;
const CR_RST: u8 = 1 << 4;

// Interrupt bits (ISR/IMR).
pub const INT_ROK: u16 = 1 << 0;
pub const INT_RER: u16 = 1 << 1;
pub const INT_TOK: u16 = 1 << 2;
pub const INT_TER: u16 = 1 << 3;
/// Receive buffer overflow (C+: receive descriptor unavailable).
pub const INT_RXOVW: u16 = 1 << 4;
pub const INT_LINK_CHANGE: u16 = 1 << 5;
pub const INT_SOFTWARE: u16 = 1 << 8;
pub const INT_TIMEOUT: u16 = 1 << 14;
const INT_VALID: u16 = 0xe1ff;

// TSD bits.
const TSD_SIZE_MASK: u32 = 0x1fff;
const TSD_OWN: u32 = 1 << 13;
const TSD_TOK: u32 = 1 << 15;
const TSD_TABT: u32 = 1 << 30;
/// Bits the driver writes (size, early TX threshold); status bits are the chip's.
const TSD_WRITABLE: u32 = 0x003f_1fff;

// RCR bits.
const RCR_AAP: u32 = 1 << 0;
const RCR_APM: u32 = 1 << 1;
const RCR_AM: u32 = 1 << 2;
const RCR_AB: u32 = 1 << 3;
const RCR_WRAP: u32 = 1 << 7;
const RCR_RBLEN_SHIFT: u32 = 11;

/// TCR hardware version: RTL8139C+ (HWVERID bits 30:26 = 11101, 23:22 = 10).
const TCR_HWVERID_8139CPLUS: u32 = 0x7480_0000;
const TCR_HWVERID_MASK: u32 = 0x7cc0_0000;

// Receive packet header status.
const RX_STATUS_ROK: u16 = 1 << 0;
const RX_STATUS_BAR: u16 = 1 << 13;
const RX_STATUS_PAM: u16 = 1 << 14;
const RX_STATUS_MAR: u16 = 1 << 15;

// 9346CR.
const EEM_SHIFT: u8 = 6;
const EEM_NORMAL: u8 = 0;
const EEM_AUTOLOAD: u8 = 1;
const EEM_PROGRAM: u8 = 2;
const EEM_CONFIG_WRITE: u8 = 3;
const EE_CS: u8 = 1 << 3;
const EE_SK: u8 = 1 << 2;
const EE_DI: u8 = 1 << 1;
const EE_DO: u8 = 1 << 0;
const EEPROM_ADDRESS_BITS: u32 = 6;
const EEPROM_READ_OPCODE: u32 = 0b10;

// MSR.
const MSR_LINKB: u8 = 1 << 2;

// MII.
const BMCR_RESET: u16 = 1 << 15;
const BMCR_DEFAULT: u16 = 0x3100;
const BMSR_BASE: u16 = 0x7809;
const BMSR_LINK: u16 = 1 << 2;
const BMSR_AN_COMPLETE: u16 = 1 << 5;

// TPPoll.
const TPPOLL_NPQ: u8 = 1 << 6;
const TPPOLL_FSWINT: u8 = 1 << 0;

// CPCR.
const CPCR_TX_ENABLE: u16 = 1 << 0;
const CPCR_RX_ENABLE: u16 = 1 << 1;
const CPCR_RX_CHECKSUM: u16 = 1 << 5;
const CPCR_RX_VLAN: u16 = 1 << 6;
const CPCR_WRITABLE: u16 = 0x007b;

// C+ descriptor opts1 bits.
const DESC_OWN: u32 = 1 << 31;
const DESC_EOR: u32 = 1 << 30;
const DESC_FS: u32 = 1 << 29;
const DESC_LS: u32 = 1 << 28;
const TX_LGSEN: u32 = 1 << 27;
const TX_MSS_SHIFT: u32 = 16;
const TX_MSS_MASK: u32 = 0x7ff;
const TX_IPCS: u32 = 1 << 18;
const TX_UDPCS: u32 = 1 << 17;
const TX_TCPCS: u32 = 1 << 16;
const TX_LEN_MASK: u32 = 0xffff;
const TX_VLAN_TAG: u32 = 1 << 17;
const RX_LEN_MASK: u32 = 0x1fff;
const RX_MULTICAST: u32 = 1 << 26;
const RX_PROTO_TCP: u32 = 1 << 16;
const RX_PROTO_UDP: u32 = 2 << 16;
const RX_PROTO_IP: u32 = 3 << 16;
const RX_IP_FAIL: u32 = 1 << 15;
const RX_UDP_FAIL: u32 = 1 << 14;
const RX_TCP_FAIL: u32 = 1 << 13;
const RX_VLAN_TAGGED: u32 = 1 << 16;
/// DTCCR command bit: dump the tally counters (self-clearing).
const DTCCR_DUMP: u64 = 1 << 3;

/// The 93C46 serial EEPROM state machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eeprom93c46 {
    /// 0 idle (waiting for the start bit), 1 command, 2 data out, 3 ignoring until deselect.
    pub phase: u8,
    pub bits: u32,
    pub command: u32,
    pub address: u32,
    pub output: u16,
    pub data_out: bool,
    pub last_control: u8,
}

/// The hardware tally counters (what DTCCR dumps), besides [`NicCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub tx_ok: u64,
    pub rx_ok: u64,
    pub tx_err: u64,
    pub rx_err: u32,
    pub missed: u16,
    pub rx_ok_physical: u64,
    pub rx_ok_broadcast: u64,
    pub rx_ok_multicast: u32,
    pub tx_abort: u16,
}

/// Everything that survives save/restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rtl8139State {
    /// Plain storage registers (256 bytes).
    pub regs: Vec<u8>,
    pub tsd: [u32; 4],
    pub dtccr: u64,
    pub command: u8,
    pub imr: u16,
    pub isr: u16,
    /// Ring-buffer receive: where the chip writes next (CBR) and where the driver reads
    /// (CAPR + 16), offsets inside the buffer.
    pub rx_write: u32,
    pub rx_read: u32,
    pub missed: u32,
    pub bmcr: u16,
    pub anar: u16,
    pub cpcr: u16,
    pub eeprom: Vec<u16>,
    pub eeprom_io: Eeprom93c46,
    pub cplus_tx_index: u32,
    pub cplus_rx_index: u32,
    pub cplus_tx_packet: Vec<u8>,
    pub cplus_tx_dropping: bool,
    pub link_up: bool,
    pub counters: NicCounters,
    pub tally: Tally,
    /// TCTR counts from this monotonic time.
    pub timer_base_ns: u64,
    /// TCTR value (as a 64-bit count since the base) at which TimeOut fires next.
    pub timer_next_tick: Option<u64>,
    pub irq_asserted: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rtl8139Error {
    #[error("saved RTL8139 state has {found} {what}, expected {expected}; the snapshot is damaged or from another version")]
    BadLength {
        what: &'static str,
        found: usize,
        expected: usize,
    },
}

/// An RTL8139C+ on the PCI bus.
pub struct Rtl8139 {
    config: PciConfigSpace,
    state: Rtl8139State,
    mac: [u8; 6],
    memory: GuestMemory,
    irq: Arc<dyn IrqLine>,
    sink: Arc<dyn FrameSink>,
    clock: Arc<dyn Clock>,
}

fn eeprom_image(mac: [u8; 6]) -> Vec<u16> {
    let mut words = vec![0u16; EEPROM_WORDS];
    words[0] = 0x8129; // RTL8139 EEPROM ID
    words[1] = VENDOR_REALTEK;
    words[2] = DEVICE_RTL8139;
    words[3] = VENDOR_REALTEK; // subsystem vendor
    words[4] = DEVICE_RTL8139; // subsystem
    words[5] = 0x4020; // MIN_GNT / MAX_LAT
    words[6] = 0xe112; // CONFIG3 / CONFIG1 defaults
    for (i, pair) in mac.chunks_exact(2).enumerate() {
        words[7 + i] = u16::from_le_bytes([pair[0], pair[1]]);
    }
    words
}

/// Frame filtering result: accepted with the receive header's address-match status bits.
fn match_bits(dst: &[u8; 6], mac: &[u8; 6]) -> u16 {
    if net::is_broadcast(dst) {
        RX_STATUS_BAR
    } else if net::is_multicast(dst) {
        RX_STATUS_MAR
    } else if dst == mac {
        RX_STATUS_PAM
    } else {
        0
    }
}

impl Rtl8139 {
    pub fn new(
        mac: [u8; 6],
        memory: GuestMemory,
        irq: Arc<dyn IrqLine>,
        sink: Arc<dyn FrameSink>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let mut config = PciConfigSpace::new();
        config.set_ids(VENDOR_REALTEK, DEVICE_RTL8139);
        config.set_revision(REVISION_8139CPLUS);
        config.set_class(CLASS_ETHERNET);
        config.set_subsystem(VENDOR_REALTEK, DEVICE_RTL8139);
        config.set_interrupt_pin(1);
        config.add_io_bar(BAR_IO, REGISTER_SPACE_SIZE);
        config.add_memory_bar(BAR_MMIO, REGISTER_SPACE_SIZE, false, false);
        let mut card = Self {
            config,
            state: Rtl8139State {
                regs: vec![0; REGISTER_SPACE_SIZE as usize],
                tsd: [TSD_OWN; 4],
                dtccr: 0,
                command: 0,
                imr: 0,
                isr: 0,
                rx_write: 0,
                rx_read: 0,
                missed: 0,
                bmcr: BMCR_DEFAULT,
                anar: 0x05e1,
                cpcr: 0,
                eeprom: eeprom_image(mac),
                eeprom_io: Eeprom93c46::default(),
                cplus_tx_index: 0,
                cplus_rx_index: 0,
                cplus_tx_packet: Vec::new(),
                cplus_tx_dropping: false,
                link_up: true,
                counters: NicCounters::default(),
                tally: Tally::default(),
                timer_base_ns: 0,
                timer_next_tick: None,
                irq_asserted: false,
            },
            mac,
            memory,
            irq,
            sink,
            clock,
        };
        card.hard_reset();
        card
    }

    pub fn state(&self) -> Rtl8139State {
        self.state.clone()
    }

    /// Restores a saved state (the MAC stays the one given at construction).
    pub fn restore(&mut self, state: Rtl8139State) -> Result<(), Rtl8139Error> {
        for (what, found, expected) in [
            (
                "register bytes",
                state.regs.len(),
                REGISTER_SPACE_SIZE as usize,
            ),
            ("EEPROM words", state.eeprom.len(), EEPROM_WORDS),
        ] {
            if found != expected {
                return Err(Rtl8139Error::BadLength {
                    what,
                    found,
                    expected,
                });
            }
        }
        self.state = state;
        let len = self.rx_buffer_len();
        self.state.rx_write %= len;
        self.state.rx_read %= len;
        self.state.cplus_tx_index %= CPLUS_RING_MAX;
        self.state.cplus_rx_index %= CPLUS_RING_MAX;
        if self.state.cplus_tx_packet.len() > MAX_TSO_FRAME_LEN {
            self.state.cplus_tx_packet = Vec::new();
        }
        self.update_irq();
        Ok(())
    }

    /// Power-on state: every register, IDR reloaded from the EEPROM.
    fn hard_reset(&mut self) {
        let s = &mut self.state;
        s.regs.iter_mut().for_each(|b| *b = 0);
        s.regs[IDR0..IDR0 + 6].copy_from_slice(&self.mac);
        s.regs[CONFIG0] = 0;
        s.regs[CONFIG1] = 0x00;
        s.regs[CONFIG4] = 0x00;
        s.regs[CONFIG5] = 0x00;
        s.bmcr = BMCR_DEFAULT;
        s.anar = 0x05e1;
        s.cpcr = 0;
        s.eeprom_io = Eeprom93c46::default();
        s.timer_base_ns = self.clock.monotonic_ns();
        s.timer_next_tick = None;
        s.dtccr = 0;
        self.soft_reset();
    }

    /// CR.RST: transmitter and receiver off, buffers empty, interrupts cleared; IDR, MAR,
    /// RCR/TCR and PCI configuration are kept.
    fn soft_reset(&mut self) {
        let s = &mut self.state;
        s.command = 0;
        s.imr = 0;
        s.isr = 0;
        s.tsd = [TSD_OWN; 4];
        s.rx_write = 0;
        s.rx_read = 0;
        s.cplus_tx_index = 0;
        s.cplus_rx_index = 0;
        s.cplus_tx_packet = Vec::new();
        s.cplus_tx_dropping = false;
        self.update_irq();
    }

    fn reg_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = self.state.regs.get(offset + i).copied().unwrap_or(0);
        }
        u32::from_le_bytes(b)
    }

    fn reg_u64(&self, offset: usize) -> u64 {
        u64::from(self.reg_u32(offset + 4)) << 32 | u64::from(self.reg_u32(offset))
    }

    fn rx_buffer_len(&self) -> u32 {
        8192 << ((self.reg_u32(RCR) >> RCR_RBLEN_SHIFT) & 3)
    }

    fn cplus_tx(&self) -> bool {
        self.state.cpcr & CPCR_TX_ENABLE != 0
    }

    fn cplus_rx(&self) -> bool {
        self.state.cpcr & CPCR_RX_ENABLE != 0
    }

    fn eeprom_mode(&self) -> u8 {
        self.state.regs[CR9346] >> EEM_SHIFT
    }

    fn bmsr(&self) -> u16 {
        if self.state.link_up {
            BMSR_BASE | BMSR_LINK | BMSR_AN_COMPLETE
        } else {
            BMSR_BASE
        }
    }

    fn timer_ticks(&self, now: u64) -> u64 {
        let elapsed = u128::from(now.saturating_sub(self.state.timer_base_ns));
        (elapsed * TIMER_HZ / 1_000_000_000) as u64
    }

    fn tsad_summary(&self) -> u16 {
        let mut v = 0u16;
        for (i, tsd) in self.state.tsd.iter().enumerate() {
            if tsd & TSD_OWN != 0 {
                v |= 1 << i;
            }
            if tsd & TSD_TABT != 0 {
                v |= 1 << (4 + i);
            }
            if tsd & TSD_TOK != 0 {
                v |= 1 << (12 + i);
            }
        }
        v
    }

    // ---- register access ----

    fn read_byte(&self, offset: usize) -> u8 {
        let s = &self.state;
        let byte_of = |value: u64, base: usize| (value >> (8 * (offset - base))) as u8;
        match offset {
            0x10..=0x17 if self.cplus_tx() => byte_of(s.dtccr, DTCCR),
            0x10..=0x1f => {
                let index = (offset - TSD0) / 4;
                byte_of(u64::from(s.tsd[index]), TSD0 + index * 4)
            }
            0x34..=0x36 => 0,
            CR => {
                let empty = s.rx_read == s.rx_write;
                (s.command & (CR_RE | CR_TE)) | if empty { CR_BUFE } else { 0 }
            }
            0x38..=0x39 => byte_of(u64::from(s.rx_read.wrapping_sub(16) as u16), CAPR),
            0x3a..=0x3b => byte_of(u64::from(s.rx_write as u16), CBR),
            0x3c..=0x3d => byte_of(u64::from(s.imr), IMR),
            0x3e..=0x3f => byte_of(u64::from(s.isr), ISR),
            0x40..=0x43 => byte_of(
                u64::from(self.reg_u32(TCR) & !TCR_HWVERID_MASK | TCR_HWVERID_8139CPLUS),
                TCR,
            ),
            0x48..=0x4b => byte_of(
                self.timer_ticks(self.clock.monotonic_ns()) & 0xffff_ffff,
                TCTR,
            ),
            0x4c..=0x4f => byte_of(u64::from(s.missed & 0x00ff_ffff), MPC),
            CR9346 => {
                let mut v = s.regs[CR9346] & !EE_DO;
                if self.eeprom_mode() == EEM_PROGRAM && s.eeprom_io.data_out {
                    v |= EE_DO;
                }
                v
            }
            MSR => {
                if s.link_up {
                    0
                } else {
                    MSR_LINKB
                }
            }
            0x60..=0x61 => byte_of(u64::from(self.tsad_summary()), TSAD_SUMMARY),
            0x62..=0x63 => byte_of(u64::from(s.bmcr), BMCR),
            0x64..=0x65 => byte_of(u64::from(self.bmsr()), BMSR),
            0x66..=0x67 => byte_of(u64::from(s.anar), ANAR),
            0x68..=0x69 => {
                let lpar: u16 = if s.link_up { 0x45e1 } else { 0 };
                byte_of(u64::from(lpar), ANLPAR)
            }
            0x6a..=0x6b => byte_of(1, ANER),
            TPPOLL => 0,
            0xe0..=0xe1 => byte_of(u64::from(s.cpcr), CPCR),
            _ => s.regs.get(offset).copied().unwrap_or(0xff),
        }
    }

    /// Stores one byte; returns the deferred side effect to run after the whole access.
    fn write_byte(&mut self, offset: usize, value: u8, effects: &mut Effects) {
        let set_byte = |target: &mut u64, base: usize| {
            let shift = 8 * (offset - base);
            *target = (*target & !(0xff << shift)) | (u64::from(value) << shift);
        };
        match offset {
            0x10..=0x17 if self.cplus_tx() => {
                set_byte(&mut self.state.dtccr, DTCCR);
                effects.dtccr = true;
            }
            0x10..=0x1f => {
                let index = (offset - TSD0) / 4;
                let mut v = u64::from(self.state.tsd[index]);
                set_byte(&mut v, TSD0 + index * 4);
                // Writing the descriptor hands it to the chip: status bits clear.
                self.state.tsd[index] = v as u32 & TSD_WRITABLE;
                effects.transmit |= 1 << index;
            }
            0x20..=0x27 => {
                self.state.regs[offset] = value;
                self.state.cplus_tx_index = 0;
            }
            CR => {
                if value & CR_RST != 0 {
                    self.soft_reset();
                    return;
                }
                let was = self.state.command;
                self.state.command = value & (CR_RE | CR_TE);
                if was & CR_TE == 0 && value & CR_TE != 0 {
                    effects.transmit |= 0xf;
                }
                if was & CR_RE == 0 && value & CR_RE != 0 {
                    effects.rx_ready = true;
                }
            }
            0x38..=0x39 => {
                let current = self.state.rx_read.wrapping_sub(16) as u16;
                let mut capr = u64::from(effects.capr.unwrap_or(current));
                set_byte(&mut capr, CAPR);
                effects.capr = Some(capr as u16);
            }
            0x3a..=0x3b | 0x34..=0x36 => {}
            0x3c..=0x3d => {
                let mut imr = u64::from(self.state.imr);
                set_byte(&mut imr, IMR);
                self.state.imr = imr as u16 & INT_VALID;
                effects.irq = true;
            }
            0x3e..=0x3f => {
                let shift = 8 * (offset - ISR);
                self.state.isr &= !(u16::from(value) << shift);
                effects.irq = true;
            }
            0x40..=0x43 => self.state.regs[offset] = value,
            0x44..=0x47 => {
                self.state.regs[offset] = value;
                let len = self.rx_buffer_len();
                self.state.rx_write %= len;
                self.state.rx_read %= len;
            }
            0x48..=0x4b => effects.timer = true,
            0x4c..=0x4f => self.state.missed = 0,
            CR9346 => self.write_9346cr(value),
            CONFIG0 | MSR | 0x5e..=0x61 | 0x64..=0x65 | 0x68..=0x6b => {}
            CONFIG1 | CONFIG3 | CONFIG4 | CONFIG5 => {
                if self.eeprom_mode() == EEM_CONFIG_WRITE {
                    self.state.regs[offset] = value;
                }
            }
            0x54..=0x57 => {
                self.state.regs[offset] = value;
                effects.timer_int = true;
            }
            0x62..=0x63 => {
                let mut bmcr = u64::from(self.state.bmcr);
                set_byte(&mut bmcr, BMCR);
                self.state.bmcr = if bmcr as u16 & BMCR_RESET != 0 {
                    BMCR_DEFAULT
                } else {
                    bmcr as u16
                };
            }
            0x66..=0x67 => {
                let mut anar = u64::from(self.state.anar);
                set_byte(&mut anar, ANAR);
                self.state.anar = anar as u16;
            }
            TPPOLL => {
                if value & TPPOLL_NPQ != 0 {
                    effects.cplus_transmit = true;
                }
                if value & TPPOLL_FSWINT != 0 {
                    self.state.isr |= INT_SOFTWARE;
                    effects.irq = true;
                }
            }
            0xe0..=0xe1 => {
                let mut cpcr = u64::from(self.state.cpcr);
                set_byte(&mut cpcr, CPCR);
                let was_rx = self.cplus_rx();
                self.state.cpcr = cpcr as u16 & CPCR_WRITABLE;
                if !was_rx && self.cplus_rx() {
                    effects.rx_ready = true;
                }
            }
            0xe4..=0xeb => {
                self.state.regs[offset] = value;
                self.state.cplus_rx_index = 0;
            }
            _ => {
                if let Some(r) = self.state.regs.get_mut(offset) {
                    *r = value;
                }
            }
        }
    }

    fn access_read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .filter(|&o| o < REGISTER_SPACE_SIZE as usize)
                .map(|o| self.read_byte(o))
                .unwrap_or(0xff);
        }
    }

    fn access_write(&mut self, offset: u64, data: &[u8]) {
        let mut effects = Effects::default();
        for (i, b) in data.iter().enumerate() {
            if let Some(o) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .filter(|&o| o < REGISTER_SPACE_SIZE as usize)
            {
                self.write_byte(o, *b, &mut effects);
            }
        }
        if let Some(capr) = effects.capr {
            self.state.rx_read = u32::from(capr.wrapping_add(16)) % self.rx_buffer_len();
            effects.rx_ready = true;
        }
        if effects.timer {
            self.state.timer_base_ns = self.clock.monotonic_ns();
            effects.timer_int = true;
        }
        if effects.timer_int {
            let interval = self.reg_u32(TIMER_INT);
            let now_ticks = self.timer_ticks(self.clock.monotonic_ns());
            self.state.timer_next_tick = (interval != 0).then(|| {
                let period = 1u64 << 32;
                let base = now_ticks - now_ticks % period + u64::from(interval);
                if base > now_ticks {
                    base
                } else {
                    base + period
                }
            });
        }
        if effects.dtccr && self.state.dtccr & DTCCR_DUMP != 0 {
            self.dump_tally();
        }
        if effects.transmit != 0 && !self.cplus_tx() {
            for index in 0..4 {
                if effects.transmit & (1 << index) != 0 {
                    self.transmit_cmode(index);
                }
            }
        }
        if effects.cplus_transmit {
            self.transmit_cplus();
        }
        if effects.rx_ready {
            self.sink.rx_ready();
        }
        self.update_irq();
    }

    fn write_9346cr(&mut self, value: u8) {
        let mode = value >> EEM_SHIFT;
        self.state.regs[CR9346] = value & 0xce;
        if mode == EEM_AUTOLOAD {
            // Reload IDR from the EEPROM and return to normal mode.
            let words = [
                self.state.eeprom[7],
                self.state.eeprom[8],
                self.state.eeprom[9],
            ];
            for (i, w) in words.iter().enumerate() {
                self.state.regs[IDR0 + 2 * i..IDR0 + 2 * i + 2].copy_from_slice(&w.to_le_bytes());
            }
            self.state.regs[CR9346] = EEM_NORMAL << EEM_SHIFT;
            return;
        }
        let e = &mut self.state.eeprom_io;
        let old = e.last_control;
        e.last_control = value;
        if mode != EEM_PROGRAM || value & EE_CS == 0 {
            *e = Eeprom93c46 {
                last_control: value,
                ..Eeprom93c46::default()
            };
            return;
        }
        if old & EE_SK != 0 || value & EE_SK == 0 {
            return; // not a rising clock edge
        }
        let di = u32::from(value & EE_DI != 0);
        match e.phase {
            0 if di == 1 => {
                e.phase = 1;
                e.bits = 0;
                e.command = 0;
            }
            1 => {
                e.command = (e.command << 1) | di;
                e.bits += 1;
                if e.bits == 2 + EEPROM_ADDRESS_BITS {
                    if e.command >> EEPROM_ADDRESS_BITS == EEPROM_READ_OPCODE {
                        e.address = e.command & ((1 << EEPROM_ADDRESS_BITS) - 1);
                        e.output = self.state.eeprom[e.address as usize % EEPROM_WORDS];
                        e.phase = 2;
                        e.bits = 0;
                        e.data_out = false; // the dummy zero bit
                    } else {
                        e.phase = 3;
                    }
                }
            }
            2 => {
                e.data_out = e.output & 0x8000 != 0;
                e.output <<= 1;
                e.bits += 1;
                if e.bits == 16 {
                    e.address = (e.address + 1) % EEPROM_WORDS as u32;
                    e.output = self.state.eeprom[e.address as usize];
                    e.bits = 0;
                }
            }
            _ => {}
        }
    }

    fn dump_tally(&mut self) {
        let t = self.state.tally;
        let mut dump = [0u8; 64];
        dump[0..8].copy_from_slice(&t.tx_ok.to_le_bytes());
        dump[8..16].copy_from_slice(&t.rx_ok.to_le_bytes());
        dump[16..24].copy_from_slice(&t.tx_err.to_le_bytes());
        dump[24..28].copy_from_slice(&t.rx_err.to_le_bytes());
        dump[28..30].copy_from_slice(&t.missed.to_le_bytes());
        dump[44..52].copy_from_slice(&t.rx_ok_physical.to_le_bytes());
        dump[52..60].copy_from_slice(&t.rx_ok_broadcast.to_le_bytes());
        dump[60..64].copy_from_slice(&t.rx_ok_multicast.to_le_bytes());
        let address = self.state.dtccr & !0x3f;
        if self
            .memory
            .write_slice(&dump, GuestAddress(address))
            .is_err()
        {
            log::debug!("rtl8139: tally dump address {address:#x} outside guest RAM");
        }
        self.state.dtccr &= !DTCCR_DUMP;
    }

    // ---- interrupts ----

    fn update_irq(&mut self) {
        let asserted = self.state.isr & self.state.imr != 0;
        self.state.irq_asserted = asserted;
        self.config.drive_intx(self.irq.as_ref(), asserted);
    }

    fn raise(&mut self, bits: u16) {
        self.state.isr |= bits & INT_VALID;
        self.update_irq();
    }

    // ---- transmit ----

    /// Hands a complete frame to the backend (dropped while the link is down).
    fn send_frame(&mut self, frame: &[u8]) -> bool {
        if !self.state.link_up {
            self.state.counters.tx_dropped += 1;
            return false;
        }
        let frame = net::pad_to_minimum(frame);
        self.sink.send(&frame);
        self.state.counters.count_tx(frame.len());
        self.state.tally.tx_ok += 1;
        true
    }

    fn transmit_cmode(&mut self, index: usize) {
        if self.state.command & CR_TE == 0 {
            return;
        }
        let tsd = self.state.tsd[index];
        if tsd & TSD_OWN != 0 {
            return;
        }
        let size = (tsd & TSD_SIZE_MASK) as usize;
        let address = self.reg_u32(TSAD0 + 4 * index);
        let mut frame = vec![0u8; size.min(MAX_CMODE_TX_LEN)];
        let ok = (ETH_HEADER_LEN..=MAX_CMODE_TX_LEN).contains(&size)
            && self.config.bus_master_enabled()
            && self
                .memory
                .read_slice(&mut frame, GuestAddress(u64::from(address)))
                .is_ok();
        if ok {
            self.send_frame(&frame);
            self.state.tsd[index] = tsd | TSD_OWN | TSD_TOK;
            self.raise(INT_TOK);
        } else {
            log::debug!(
                "rtl8139: transmit descriptor {index} ({size} bytes at {address:#x}) aborted"
            );
            self.state.counters.tx_dropped += 1;
            self.state.tally.tx_err += 1;
            self.state.tally.tx_abort = self.state.tally.tx_abort.saturating_add(1);
            self.state.tsd[index] = tsd | TSD_OWN | TSD_TABT;
            self.raise(INT_TER);
        }
    }

    fn transmit_cplus(&mut self) {
        if !self.cplus_tx() || self.state.command & CR_TE == 0 {
            return;
        }
        let base = self.reg_u64(TNPDS);
        let mut processed = 0;
        let mut errors = false;
        // At most one pass over the largest ring per poll.
        for _ in 0..CPLUS_RING_MAX {
            let index = self.state.cplus_tx_index;
            let Some(address) = base.checked_add(u64::from(index) * 16) else {
                break;
            };
            let mut raw = [0u8; 16];
            if !self.config.bus_master_enabled()
                || self
                    .memory
                    .read_slice(&mut raw, GuestAddress(address))
                    .is_err()
            {
                break;
            }
            let opts1 = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
            let opts2 = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
            let buffer = u64::from_le_bytes([
                raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
            ]);
            if opts1 & DESC_OWN == 0 {
                break;
            }
            if opts1 & DESC_FS != 0 {
                self.state.cplus_tx_packet.clear();
                self.state.cplus_tx_dropping = false;
            }
            let length = (opts1 & TX_LEN_MASK) as usize;
            let limit = if opts1 & TX_LGSEN != 0 {
                MAX_TSO_FRAME_LEN
            } else {
                MAX_JUMBO_FRAME_LEN
            };
            if !self.state.cplus_tx_dropping {
                let start = self.state.cplus_tx_packet.len();
                if start + length > limit {
                    self.state.cplus_tx_dropping = true;
                    self.state.cplus_tx_packet = Vec::new();
                } else {
                    self.state.cplus_tx_packet.resize(start + length, 0);
                    if self
                        .memory
                        .read_slice(
                            &mut self.state.cplus_tx_packet[start..],
                            GuestAddress(buffer),
                        )
                        .is_err()
                    {
                        self.state.cplus_tx_dropping = true;
                        self.state.cplus_tx_packet = Vec::new();
                    }
                }
            }
            let done = (opts1 & !DESC_OWN).to_le_bytes();
            let _ = self.memory.write_slice(&done, GuestAddress(address));
            self.state.cplus_tx_index = if opts1 & DESC_EOR != 0 {
                0
            } else {
                (index + 1) % CPLUS_RING_MAX
            };
            processed += 1;
            if opts1 & DESC_LS != 0 {
                let packet = std::mem::take(&mut self.state.cplus_tx_packet);
                let dropping = std::mem::replace(&mut self.state.cplus_tx_dropping, false);
                let vlan = (opts2 & TX_VLAN_TAG != 0).then_some((opts2 as u16).swap_bytes());
                if dropping || !self.transmit_cplus_packet(packet, opts1, vlan) {
                    errors = true;
                }
            }
        }
        if processed > 0 {
            self.raise(if errors { INT_TOK | INT_TER } else { INT_TOK });
        }
    }

    /// Applies the offloads of the last descriptor and sends; false if dropped as bad.
    fn transmit_cplus_packet(
        &mut self,
        mut packet: Vec<u8>,
        opts1: u32,
        vlan: Option<u16>,
    ) -> bool {
        if packet.len() < ETH_HEADER_LEN {
            self.state.counters.tx_dropped += 1;
            self.state.tally.tx_err += 1;
            return false;
        }
        if opts1 & TX_LGSEN != 0 {
            let mss = ((opts1 >> TX_MSS_SHIFT) & TX_MSS_MASK) as usize;
            let mut segments = Vec::new();
            let result = TsoParams::from_frame(&packet, mss).and_then(|params| {
                net::segment_tcp(&packet, &params, &mut |s| segments.push(s.to_vec()))
            });
            return match result {
                Ok(_) => {
                    for segment in segments {
                        self.send_tagged(segment, vlan);
                    }
                    true
                }
                Err(e) => {
                    log::debug!("rtl8139: segmentation failed: {e}");
                    self.state.counters.tx_dropped += 1;
                    self.state.tally.tx_err += 1;
                    false
                }
            };
        }
        if opts1 & (TX_IPCS | TX_TCPCS | TX_UDPCS) != 0 {
            if let Some(ip) = net::parse_ip(&packet) {
                if opts1 & TX_IPCS != 0 {
                    let _ = net::fill_ipv4_header_checksum(&mut packet, &ip);
                }
                let wanted = (opts1 & TX_TCPCS != 0 && ip.protocol == net::IP_PROTO_TCP)
                    || (opts1 & TX_UDPCS != 0 && ip.protocol == net::IP_PROTO_UDP);
                if wanted {
                    let _ = net::fill_l4_checksum(&mut packet, &ip);
                }
            }
        }
        self.send_tagged(packet, vlan);
        true
    }

    fn send_tagged(&mut self, frame: Vec<u8>, vlan: Option<u16>) {
        match vlan {
            Some(tci) => {
                let tagged = net::insert_vlan_tag(&frame, net::ETHERTYPE_VLAN, tci);
                self.send_frame(&tagged);
            }
            None => {
                self.send_frame(&frame);
            }
        }
    }

    // ---- receive ----

    fn accepts(&self, frame: &[u8]) -> Option<u16> {
        let rcr = self.reg_u32(RCR);
        let dst = net::destination(frame);
        let bits = match_bits(&dst, &self.mac_register());
        let accepted = if rcr & RCR_AAP != 0 {
            true
        } else if net::is_broadcast(&dst) {
            rcr & RCR_AB != 0
        } else if net::is_multicast(&dst) {
            let index = (net::ether_crc_be(&dst) >> 26) as usize;
            rcr & RCR_AM != 0 && self.state.regs[MAR0 + index / 8] & (1 << (index % 8)) != 0
        } else {
            rcr & RCR_APM != 0 && bits == RX_STATUS_PAM
        };
        accepted.then_some(bits)
    }

    /// The address in IDR0-5 (what the driver programmed).
    fn mac_register(&self) -> [u8; 6] {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.state.regs[IDR0..IDR0 + 6]);
        mac
    }

    fn drop_rx(&mut self, reason: DropReason) -> ReceiveOutcome {
        self.state.counters.rx_dropped += 1;
        ReceiveOutcome::Dropped(reason)
    }

    fn missed(&mut self) -> ReceiveOutcome {
        self.state.missed = self.state.missed.saturating_add(1);
        self.state.tally.missed = self.state.tally.missed.saturating_add(1);
        self.state.counters.rx_dropped += 1;
        self.raise(INT_RXOVW);
        ReceiveOutcome::NoBuffers
    }

    fn receive_frame(&mut self, frame: &[u8]) -> ReceiveOutcome {
        if frame.len() < ETH_HEADER_LEN {
            self.state.tally.rx_err += 1;
            return self.drop_rx(DropReason::Runt);
        }
        if !self.state.link_up {
            return self.drop_rx(DropReason::LinkDown);
        }
        if self.state.command & CR_RE == 0 {
            return self.drop_rx(DropReason::ReceiverDisabled);
        }
        if frame.len() > ETH_MAX_FRAME_LEN_VLAN {
            self.state.tally.rx_err += 1;
            return self.drop_rx(DropReason::TooLong);
        }
        let Some(match_status) = self.accepts(frame) else {
            return ReceiveOutcome::Filtered;
        };
        if !self.config.bus_master_enabled() {
            return self.drop_rx(DropReason::DmaError);
        }
        let outcome = if self.cplus_rx() {
            self.receive_cplus(frame)
        } else {
            self.receive_ring_buffer(frame, match_status)
        };
        if outcome == ReceiveOutcome::Delivered {
            self.state.counters.count_rx(frame.len());
            self.state.tally.rx_ok += 1;
            match match_status {
                RX_STATUS_BAR => self.state.tally.rx_ok_broadcast += 1,
                RX_STATUS_MAR => self.state.tally.rx_ok_multicast += 1,
                _ => self.state.tally.rx_ok_physical += 1,
            }
            self.raise(INT_ROK);
        }
        outcome
    }

    /// Free bytes in the receive ring buffer (one byte always kept so that full and empty
    /// differ).
    fn ring_free(&self) -> u32 {
        let len = self.rx_buffer_len();
        let used = (self.state.rx_write + len - self.state.rx_read % len) % len;
        len - used
    }

    fn receive_ring_buffer(&mut self, frame: &[u8], match_status: u16) -> ReceiveOutcome {
        let data = net::pad_to_minimum(frame);
        let packet_len = data.len() + ETH_FCS_LEN;
        let mut record = Vec::with_capacity(4 + packet_len);
        record.extend_from_slice(&(RX_STATUS_ROK | match_status).to_le_bytes());
        record.extend_from_slice(&(packet_len as u16).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&net::fcs(&data));
        let total = (record.len() as u32 + 3) & !3;
        if total >= self.ring_free() {
            return self.missed();
        }
        let len = self.rx_buffer_len();
        let base = u64::from(self.reg_u32(RBSTART));
        let offset = self.state.rx_write;
        let contiguous = self.reg_u32(RCR) & RCR_WRAP != 0 && len < 65536;
        let result = if contiguous || offset + record.len() as u32 <= len {
            self.memory
                .write_slice(&record, GuestAddress(base + u64::from(offset)))
        } else {
            let first = (len - offset) as usize;
            self.memory
                .write_slice(&record[..first], GuestAddress(base + u64::from(offset)))
                .and_then(|_| {
                    self.memory
                        .write_slice(&record[first..], GuestAddress(base))
                })
        };
        if result.is_err() {
            log::debug!("rtl8139: receive buffer at {base:#x} is outside guest RAM");
            self.state.tally.rx_err += 1;
            return self.drop_rx(DropReason::DmaError);
        }
        self.state.rx_write = (offset + total) % len;
        ReceiveOutcome::Delivered
    }

    fn receive_cplus(&mut self, frame: &[u8]) -> ReceiveOutcome {
        let mut data = frame.to_vec();
        let mut vlan = None;
        if self.state.cpcr & CPCR_RX_VLAN != 0 {
            if let Some((untagged, tci)) = net::strip_vlan_tag(frame, net::ETHERTYPE_VLAN) {
                data = untagged;
                vlan = Some(tci);
            }
        }
        if data.len() < net::ETH_MIN_FRAME_LEN {
            data.resize(net::ETH_MIN_FRAME_LEN, 0);
        }
        let checksum_bits = if self.state.cpcr & CPCR_RX_CHECKSUM != 0 {
            rx_checksum_bits(&data)
        } else {
            0
        };
        let fcs = net::fcs(&data);
        data.extend_from_slice(&fcs);
        let index = self.state.cplus_rx_index;
        let Some(address) = self.reg_u64(RDSAR).checked_add(u64::from(index) * 16) else {
            return self.drop_rx(DropReason::DmaError);
        };
        let mut raw = [0u8; 16];
        if self
            .memory
            .read_slice(&mut raw, GuestAddress(address))
            .is_err()
        {
            return self.drop_rx(DropReason::DmaError);
        }
        let opts1 = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let buffer = u64::from_le_bytes([
            raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
        ]);
        if opts1 & DESC_OWN == 0 || (opts1 & RX_LEN_MASK) < data.len() as u32 {
            return self.missed();
        }
        if self
            .memory
            .write_slice(&data, GuestAddress(buffer))
            .is_err()
        {
            return self.drop_rx(DropReason::DmaError);
        }
        let mut status = (opts1 & DESC_EOR) | DESC_FS | DESC_LS | checksum_bits;
        status |= data.len() as u32 & RX_LEN_MASK;
        if net::is_multicast(&data) {
            status |= RX_MULTICAST;
        }
        let opts2 = vlan.map_or(0, |tci| RX_VLAN_TAGGED | u32::from(tci.swap_bytes()));
        let mut writeback = [0u8; 8];
        writeback[..4].copy_from_slice(&status.to_le_bytes());
        writeback[4..].copy_from_slice(&opts2.to_le_bytes());
        if self
            .memory
            .write_slice(&writeback, GuestAddress(address))
            .is_err()
        {
            return self.drop_rx(DropReason::DmaError);
        }
        self.state.cplus_rx_index = if opts1 & DESC_EOR != 0 {
            0
        } else {
            (index + 1) % CPLUS_RING_MAX
        };
        ReceiveOutcome::Delivered
    }

    /// The next receive descriptor belongs to the chip. Its size is not checked: Linux
    /// 8139cp gives 1522-byte buffers, and a frame that does not fit is dropped at receive.
    fn cplus_rx_descriptor_available(&self) -> bool {
        let Some(address) = self
            .reg_u64(RDSAR)
            .checked_add(u64::from(self.state.cplus_rx_index) * 16)
        else {
            return false;
        };
        self.memory
            .read_obj::<u32>(GuestAddress(address))
            .is_ok_and(|opts1| opts1 & DESC_OWN != 0)
    }
}

/// Receive checksum status of C+ mode: protocol (IPv4 only) and failure bits.
fn rx_checksum_bits(frame: &[u8]) -> u32 {
    let Some(ip) = net::parse_ip(frame) else {
        return 0;
    };
    if !ip.is_ipv4 {
        return 0;
    }
    let checks = net::verify_checksums(frame);
    let mut bits = if checks.ipv4_header == Some(false) {
        RX_IP_FAIL
    } else {
        0
    };
    if let Some(valid) = checks.tcp {
        bits |= RX_PROTO_TCP | if valid { 0 } else { RX_TCP_FAIL };
    } else if let Some(valid) = checks.udp {
        bits |= RX_PROTO_UDP | if valid { 0 } else { RX_UDP_FAIL };
    } else {
        bits |= RX_PROTO_IP;
    }
    bits
}

/// Side effects collected during one register access.
#[derive(Default)]
struct Effects {
    /// TSD n written (bit n), or TE just enabled (all).
    transmit: u8,
    cplus_transmit: bool,
    capr: Option<u16>,
    dtccr: bool,
    timer: bool,
    timer_int: bool,
    irq: bool,
    rx_ready: bool,
}

impl NetworkCard for Rtl8139 {
    fn receive(&mut self, frame: &[u8]) -> ReceiveOutcome {
        self.receive_frame(frame)
    }

    fn can_receive(&self) -> bool {
        if !self.state.link_up || self.state.command & CR_RE == 0 {
            return false;
        }
        if self.cplus_rx() {
            self.cplus_rx_descriptor_available()
        } else {
            // Room for a maximum frame with header, CRC and alignment.
            self.ring_free() > (4 + ETH_MAX_FRAME_LEN_VLAN + ETH_FCS_LEN + 3) as u32
        }
    }

    fn set_link(&mut self, up: bool) {
        if self.state.link_up == up {
            return;
        }
        self.state.link_up = up;
        self.raise(INT_LINK_CHANGE);
    }

    fn link_up(&self) -> bool {
        self.state.link_up
    }

    fn counters(&self) -> NicCounters {
        self.state.counters
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }
}

impl PciFunction for Rtl8139 {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg + offset, data);
        self.update_irq();
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match bar {
            BAR_IO | BAR_MMIO => self.access_read(offset, data),
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if matches!(bar, BAR_IO | BAR_MMIO) {
            self.access_write(offset, data);
        }
    }

    fn reset(&mut self) {
        self.config.reset_header();
        self.hard_reset();
    }
}

impl Timed for Rtl8139 {
    fn next_deadline_ns(&self) -> Option<u64> {
        let tick = u128::from(self.state.timer_next_tick?);
        let offset = (tick * 1_000_000_000).div_ceil(TIMER_HZ);
        Some(
            self.state
                .timer_base_ns
                .saturating_add(u64::try_from(offset).unwrap_or(u64::MAX)),
        )
    }

    fn on_timer(&mut self, now_ns: u64) {
        let Some(next) = self.state.timer_next_tick else {
            return;
        };
        if self.timer_ticks(now_ns) >= next {
            self.state.timer_next_tick = Some(next + (1u64 << 32));
            self.raise(INT_TIMEOUT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::irq::CountingIrq;
    use crate::net::tests::{reference_l4_checksum, tcp_frame, udp_frame};
    use crate::net::RecordingSink;
    use crate::pci::{COMMAND_BUS_MASTER, COMMAND_IO_SPACE, REG_COMMAND};
    use crate::test_support::TestRng;
    use vm_memory::GuestMemoryMmap;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];
    const OTHER: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
    const MEM_SIZE: usize = 4 << 20;
    const RX_BUFFER: u64 = 0x10000;
    const TX_BUFFER: u64 = 0x40000;
    const TX_RING: u64 = 0x50000;
    const RX_RING: u64 = 0x51000;
    const RX_BUFFERS: u64 = 0x100000;

    struct Rig {
        card: Rtl8139,
        mem: GuestMemoryMmap,
        irq: Arc<CountingIrq>,
        sink: Arc<RecordingSink>,
        clock: Arc<ManualClock>,
    }

    impl Rig {
        fn new() -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let irq = CountingIrq::new();
            let sink = RecordingSink::new();
            let clock = ManualClock::new(0);
            let mut card = Rtl8139::new(MAC, mem.clone(), irq.clone(), sink.clone(), clock.clone());
            card.config_write(
                REG_COMMAND,
                0,
                &(COMMAND_IO_SPACE | COMMAND_BUS_MASTER).to_le_bytes(),
            );
            Self {
                card,
                mem,
                irq,
                sink,
                clock,
            }
        }
        fn r8(&mut self, o: usize) -> u8 {
            let mut b = [0u8; 1];
            self.card.bar_read(BAR_IO, o as u64, &mut b);
            b[0]
        }
        fn r16(&mut self, o: usize) -> u16 {
            let mut b = [0u8; 2];
            self.card.bar_read(BAR_IO, o as u64, &mut b);
            u16::from_le_bytes(b)
        }
        fn r32(&mut self, o: usize) -> u32 {
            let mut b = [0u8; 4];
            self.card.bar_read(BAR_IO, o as u64, &mut b);
            u32::from_le_bytes(b)
        }
        fn w8(&mut self, o: usize, v: u8) {
            self.card.bar_write(BAR_IO, o as u64, &[v]);
        }
        fn w16(&mut self, o: usize, v: u16) {
            self.card.bar_write(BAR_IO, o as u64, &v.to_le_bytes());
        }
        fn w32(&mut self, o: usize, v: u32) {
            self.card.bar_write(BAR_IO, o as u64, &v.to_le_bytes());
        }

        /// 8139too's rtl8139_hw_start: reset, enable, RCR, ring buffer, IMR.
        fn bring_up_cmode(&mut self, rcr_extra: u32) {
            self.w8(CR, CR_RST);
            assert_eq!(self.r8(CR) & CR_RST, 0);
            self.w8(CR9346, 0xc0);
            self.w8(CR, CR_RE | CR_TE);
            self.w32(RCR, RCR_APM | RCR_AB | rcr_extra);
            self.w32(TCR, 0x0300_0700);
            self.w8(CR9346, 0);
            self.w32(RBSTART, RX_BUFFER as u32);
            self.w32(MPC, 0);
            self.w16(IMR, 0xe07f);
        }

        /// 8139cp's cp_start_hw / cp_init_rings.
        fn bring_up_cplus(&mut self, rx_descriptors: u32, buffer_size: u32) {
            self.w8(CR, CR_RST);
            self.w16(CPCR, CPCR_TX_ENABLE | CPCR_RX_ENABLE | CPCR_RX_CHECKSUM);
            for i in 0..rx_descriptors {
                let eor = if i + 1 == rx_descriptors { DESC_EOR } else { 0 };
                self.put_rx_descriptor(i, DESC_OWN | eor | buffer_size);
            }
            self.w32(RDSAR, RX_RING as u32);
            self.w32(RDSAR + 4, 0);
            self.w32(TNPDS, TX_RING as u32);
            self.w32(TNPDS + 4, 0);
            self.w8(CR, CR_RE | CR_TE);
            self.w32(RCR, RCR_APM | RCR_AB);
            self.w16(IMR, 0x80ff);
        }

        fn put_rx_descriptor(&mut self, i: u32, opts1: u32) {
            let d = RX_RING + u64::from(i) * 16;
            self.mem.write_obj(opts1, GuestAddress(d)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(d + 4)).unwrap();
            self.mem
                .write_obj(RX_BUFFERS + u64::from(i) * 0x2000, GuestAddress(d + 8))
                .unwrap();
        }

        fn put_tx_descriptor(&mut self, i: u32, opts1: u32, opts2: u32, buffer: u64) {
            let d = TX_RING + u64::from(i) * 16;
            self.mem.write_obj(opts1, GuestAddress(d)).unwrap();
            self.mem.write_obj(opts2, GuestAddress(d + 4)).unwrap();
            self.mem.write_obj(buffer, GuestAddress(d + 8)).unwrap();
        }
    }

    /// 8139too's read_eeprom.
    fn eeprom_read(rig: &mut Rig, location: u32, addr_len: u32) -> u16 {
        let enable = 0x80 | EE_CS;
        let command = location | (0b110 << addr_len);
        rig.w8(CR9346, 0x80);
        rig.w8(CR9346, enable);
        for i in (0..=4 + addr_len).rev() {
            let di = if command >> i & 1 != 0 { EE_DI } else { 0 };
            rig.w8(CR9346, enable | di);
            rig.w8(CR9346, enable | di | EE_SK);
        }
        rig.w8(CR9346, enable);
        let mut value = 0u16;
        for _ in 0..16 {
            rig.w8(CR9346, enable | EE_SK);
            value = (value << 1) | u16::from(rig.r8(CR9346) & EE_DO != 0);
            rig.w8(CR9346, enable);
        }
        rig.w8(CR9346, 0);
        value
    }

    #[test]
    fn pci_identity_and_chip_version() {
        let mut rig = Rig::new();
        let c = rig.card.config();
        assert_eq!((c.vendor_id(), c.device_id()), (0x10ec, 0x8139));
        assert_eq!(c.read_u8(crate::pci::REG_REVISION_ID), 0x20);
        assert_eq!(c.bar_size(BAR_IO), Some(256));
        assert_eq!(c.bar_size(BAR_MMIO), Some(256));
        assert_eq!(rig.r32(TCR) & TCR_HWVERID_MASK, TCR_HWVERID_8139CPLUS);
        // IDR holds the MAC, also through the MMIO BAR.
        let mut idr = [0u8; 6];
        rig.card.bar_read(BAR_MMIO, 0, &mut idr);
        assert_eq!(idr, MAC);
        // iPXE's C+ detection: CPCR bits stick.
        rig.w16(CPCR, CPCR_TX_ENABLE | CPCR_RX_ENABLE);
        assert_eq!(rig.r16(CPCR), CPCR_TX_ENABLE | CPCR_RX_ENABLE);
    }

    #[test]
    fn eeprom_93c46_as_8139too_reads_it() {
        let mut rig = Rig::new();
        // The driver probes with 8 address bits: a 93C46 answers garbage, not the ID.
        assert_ne!(eeprom_read(&mut rig, 0, 8), 0x8129);
        assert_eq!(eeprom_read(&mut rig, 0, 6), 0x8129);
        let mut mac = Vec::new();
        for i in 0..3 {
            mac.extend_from_slice(&eeprom_read(&mut rig, 7 + i, 6).to_le_bytes());
        }
        assert_eq!(mac, MAC.to_vec());
        // Auto-load puts the EEPROM MAC back into IDR.
        rig.w32(IDR0, 0);
        rig.w8(CR9346, EEM_AUTOLOAD << EEM_SHIFT);
        assert_eq!(
            rig.r32(IDR0),
            u32::from_le_bytes([MAC[0], MAC[1], MAC[2], MAC[3]])
        );
        assert_eq!(rig.r8(CR9346) >> EEM_SHIFT, EEM_NORMAL);
    }

    #[test]
    fn config_registers_locked_unless_unlocked() {
        let mut rig = Rig::new();
        rig.w8(CONFIG1, 0x55);
        assert_eq!(rig.r8(CONFIG1), 0);
        rig.w8(CR9346, 0xc0);
        rig.w8(CONFIG1, 0x55);
        rig.w8(CR9346, 0);
        assert_eq!(rig.r8(CONFIG1), 0x55);
    }

    #[test]
    fn mii_and_msr_report_link() {
        let mut rig = Rig::new();
        let bmsr = rig.r16(BMSR);
        assert!(bmsr & BMSR_LINK != 0 && bmsr & BMSR_AN_COMPLETE != 0);
        assert_eq!(rig.r8(MSR) & MSR_LINKB, 0);
        rig.w16(IMR, INT_LINK_CHANGE);
        rig.card.set_link(false);
        assert!(rig.irq.level());
        assert_eq!(rig.r16(ISR) & INT_LINK_CHANGE, INT_LINK_CHANGE);
        assert_eq!(rig.r16(BMSR) & BMSR_LINK, 0);
        assert_eq!(rig.r8(MSR) & MSR_LINKB, MSR_LINKB);
        rig.w16(ISR, INT_LINK_CHANGE);
        assert!(!rig.irq.level());
        rig.w16(BMCR, BMCR_RESET);
        assert_eq!(rig.r16(BMCR), BMCR_DEFAULT);
    }

    #[test]
    fn cmode_transmit_four_descriptors() {
        let mut rig = Rig::new();
        rig.bring_up_cmode(0);
        let frame = udp_frame(OTHER, MAC, 100);
        rig.mem
            .write_slice(&frame, GuestAddress(TX_BUFFER))
            .unwrap();
        for i in 0..6usize {
            let n = i % 4;
            rig.w32(TSAD0 + 4 * n, TX_BUFFER as u32);
            rig.w32(TSD0 + 4 * n, frame.len() as u32);
            let tsd = rig.r32(TSD0 + 4 * n);
            assert_eq!(tsd & (TSD_OWN | TSD_TOK), TSD_OWN | TSD_TOK);
        }
        assert_eq!(rig.sink.take(), vec![frame.clone(); 6]);
        assert!(rig.irq.level());
        assert_eq!(rig.r16(ISR) & INT_TOK, INT_TOK);
        assert_eq!(rig.r16(TSAD_SUMMARY) & 0xf00f, 0xf00f);
        // Oversized and truncated: aborted, counted, nothing sent.
        rig.w32(TSD0, 4000);
        assert!(rig.r32(TSD0) & TSD_TABT != 0);
        rig.w32(TSD0 + 4, 10);
        assert!(rig.r32(TSD0 + 4) & TSD_TABT != 0);
        assert_eq!(rig.r16(ISR) & INT_TER, INT_TER);
        rig.w32(TSAD0 + 8, 0xffff_0000);
        rig.w32(TSD0 + 8, 100);
        assert!(rig.r32(TSD0 + 8) & TSD_TABT != 0);
        assert!(rig.sink.is_empty());
        let c = rig.card.counters();
        assert_eq!((c.tx_packets, c.tx_dropped), (6, 3));
        // Transmitter disabled: held until TE.
        rig.w8(CR, CR_RE);
        rig.w32(TSAD0 + 12, TX_BUFFER as u32);
        rig.w32(TSD0 + 12, frame.len() as u32);
        assert!(rig.sink.is_empty());
        assert_eq!(rig.r32(TSD0 + 12) & TSD_OWN, 0);
        rig.w8(CR, CR_RE | CR_TE);
        assert_eq!(rig.sink.take(), vec![frame]);
    }

    #[test]
    fn cmode_receive_ring_buffer_with_header_and_wrap() {
        let mut rig = Rig::new();
        rig.bring_up_cmode(0);
        assert!(rig.r8(CR) & CR_BUFE != 0);
        let frame = udp_frame(MAC, OTHER, 200);
        let edges = rig.irq.count();
        assert_eq!(rig.card.receive(&frame), ReceiveOutcome::Delivered);
        assert_eq!(rig.irq.count(), edges + 1);
        assert_eq!(rig.r16(ISR) & INT_ROK, INT_ROK);
        assert_eq!(rig.r8(CR) & CR_BUFE, 0);
        let mut header = [0u8; 4];
        rig.mem
            .read_slice(&mut header, GuestAddress(RX_BUFFER))
            .unwrap();
        let status = u16::from_le_bytes([header[0], header[1]]);
        let length = u16::from_le_bytes([header[2], header[3]]) as usize;
        assert_eq!(status, RX_STATUS_ROK | RX_STATUS_PAM);
        assert_eq!(length, frame.len() + 4);
        let mut got = vec![0u8; length];
        rig.mem
            .read_slice(&mut got, GuestAddress(RX_BUFFER + 4))
            .unwrap();
        assert_eq!(&got[..frame.len()], frame.as_slice());
        assert_eq!(&got[frame.len()..], net::fcs(&frame).as_slice());
        let cbr = rig.r16(CBR) as u32;
        assert_eq!(cbr, (4 + length as u32 + 3) & !3);
        // The driver consumes it: CAPR = read offset - 16.
        rig.w16(CAPR, (cbr as u16).wrapping_sub(16));
        assert!(rig.r8(CR) & CR_BUFE != 0);
        // Fill up the 8 KiB ring and check the wrap-around split.
        let mut delivered = 0;
        loop {
            match rig.card.receive(&frame) {
                ReceiveOutcome::Delivered => delivered += 1,
                ReceiveOutcome::NoBuffers => break,
                other => panic!("{other:?}"),
            }
            assert!(delivered < 100);
        }
        assert!(delivered >= 30);
        assert!(!rig.card.can_receive());
        assert_eq!(rig.r32(MPC), 1);
        assert_eq!(rig.r16(ISR) & INT_RXOVW, INT_RXOVW);
        // Walk the records like 8139too does, across the wrap.
        let mut read = cbr;
        for _ in 0..delivered {
            let mut h = [0u8; 4];
            for (i, b) in h.iter_mut().enumerate() {
                *b = rig
                    .mem
                    .read_obj(GuestAddress(
                        RX_BUFFER + u64::from((read + i as u32) % 8192),
                    ))
                    .unwrap();
            }
            assert_eq!(u16::from_le_bytes([h[2], h[3]]) as usize, frame.len() + 4);
            let mut body = Vec::new();
            for i in 0..frame.len() as u32 {
                let b: u8 = rig
                    .mem
                    .read_obj(GuestAddress(RX_BUFFER + u64::from((read + 4 + i) % 8192)))
                    .unwrap();
                body.push(b);
            }
            assert_eq!(body, frame);
            read = (read + 4 + frame.len() as u32 + 4 + 3) & !3;
            read %= 8192;
            rig.w16(CAPR, (read as u16).wrapping_sub(16));
        }
        assert!(rig.r8(CR) & CR_BUFE != 0);
        assert!(rig.card.can_receive());
        assert_eq!(rig.card.counters().rx_dropped, 1);
    }

    #[test]
    fn receive_filters() {
        let mut rig = Rig::new();
        rig.bring_up_cmode(0);
        assert_eq!(
            rig.card.receive(&udp_frame(OTHER, MAC, 10)),
            ReceiveOutcome::Filtered
        );
        assert_eq!(
            rig.card.receive(&udp_frame([0xff; 6], OTHER, 10)),
            ReceiveOutcome::Delivered
        );
        let group = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];
        let mcast = udp_frame(group, OTHER, 10);
        rig.w32(RCR, RCR_APM | RCR_AB | RCR_AM);
        assert_eq!(rig.card.receive(&mcast), ReceiveOutcome::Filtered);
        let index = (net::ether_crc_be(&group) >> 26) as usize;
        rig.w8(MAR0 + index / 8, 1 << (index % 8));
        assert_eq!(rig.card.receive(&mcast), ReceiveOutcome::Delivered);
        rig.w32(RCR, RCR_APM);
        assert_eq!(
            rig.card.receive(&udp_frame([0xff; 6], OTHER, 10)),
            ReceiveOutcome::Filtered
        );
        rig.w32(RCR, RCR_AAP);
        assert_eq!(
            rig.card.receive(&udp_frame(OTHER, MAC, 10)),
            ReceiveOutcome::Delivered
        );
        // The driver may change its MAC in IDR.
        rig.w32(RCR, RCR_APM);
        rig.card.bar_write(BAR_IO, 0, &OTHER);
        assert_eq!(
            rig.card.receive(&udp_frame(OTHER, MAC, 10)),
            ReceiveOutcome::Delivered
        );
    }

    #[test]
    fn cplus_transmit_with_checksum_offload_and_vlan() {
        let mut rig = Rig::new();
        rig.bring_up_cplus(4, 2048);
        let reference = udp_frame(OTHER, MAC, 90);
        let mut frame = reference.clone();
        frame[24] = 0;
        frame[25] = 0;
        frame[40] = 0x12;
        frame[41] = 0x34;
        rig.mem
            .write_slice(&frame, GuestAddress(TX_BUFFER))
            .unwrap();
        // Two fragments, checksum flags as 8139cp sets them.
        let flags = TX_IPCS | TX_UDPCS;
        rig.put_tx_descriptor(0, DESC_OWN | DESC_FS | flags | 30, 0, TX_BUFFER);
        rig.put_tx_descriptor(
            1,
            DESC_OWN | DESC_LS | flags | (frame.len() as u32 - 30),
            0,
            TX_BUFFER + 30,
        );
        rig.w8(TPPOLL, TPPOLL_NPQ);
        let sent = rig.sink.take();
        assert_eq!(sent, vec![reference.clone()]);
        assert_eq!(
            u16::from_be_bytes([sent[0][40], sent[0][41]]),
            reference_l4_checksum(&sent[0])
        );
        let opts1: u32 = rig.mem.read_obj(GuestAddress(TX_RING + 16)).unwrap();
        assert_eq!(opts1 & DESC_OWN, 0);
        assert_eq!(rig.r16(ISR) & INT_TOK, INT_TOK);
        // VLAN tag insertion (TCI byte-swapped in opts2).
        rig.put_tx_descriptor(
            2,
            DESC_OWN | DESC_FS | DESC_LS | reference.len() as u32,
            TX_VLAN_TAG | u32::from(0x0123u16.swap_bytes()),
            TX_BUFFER,
        );
        rig.mem
            .write_slice(&reference, GuestAddress(TX_BUFFER))
            .unwrap();
        rig.w8(TPPOLL, TPPOLL_NPQ);
        let sent = rig.sink.take();
        assert_eq!(sent, vec![net::insert_vlan_tag(&reference, 0x8100, 0x0123)]);
    }

    #[test]
    fn cplus_large_send() {
        let mut rig = Rig::new();
        rig.bring_up_cplus(4, 2048);
        let big = tcp_frame(OTHER, MAC, 3000);
        rig.mem.write_slice(&big, GuestAddress(TX_BUFFER)).unwrap();
        let mss = 1400u32;
        rig.put_tx_descriptor(
            0,
            DESC_OWN
                | DESC_FS
                | DESC_LS
                | DESC_EOR
                | TX_LGSEN
                | mss << TX_MSS_SHIFT
                | big.len() as u32,
            0,
            TX_BUFFER,
        );
        rig.w8(TPPOLL, TPPOLL_NPQ);
        let sent = rig.sink.take();
        assert_eq!(sent.len(), 3);
        let mut payload = Vec::new();
        for s in &sent {
            let v = net::verify_checksums(s);
            assert_eq!((v.ipv4_header, v.tcp), (Some(true), Some(true)));
            payload.extend_from_slice(&s[54..]);
        }
        assert_eq!(payload, big[54..].to_vec());
    }

    #[test]
    fn cplus_receive_descriptors_and_checksum_status() {
        let mut rig = Rig::new();
        rig.bring_up_cplus(2, 2048);
        assert!(rig.card.can_receive());
        let frame = udp_frame(MAC, OTHER, 300);
        assert_eq!(rig.card.receive(&frame), ReceiveOutcome::Delivered);
        let opts1: u32 = rig.mem.read_obj(GuestAddress(RX_RING)).unwrap();
        assert_eq!(opts1 & DESC_OWN, 0);
        assert_eq!(opts1 & (DESC_FS | DESC_LS), DESC_FS | DESC_LS);
        assert_eq!((opts1 & RX_LEN_MASK) as usize, frame.len() + 4);
        assert_eq!(opts1 & RX_PROTO_IP, RX_PROTO_UDP);
        assert_eq!(opts1 & (RX_IP_FAIL | RX_UDP_FAIL), 0);
        let mut got = vec![0u8; frame.len()];
        rig.mem
            .read_slice(&mut got, GuestAddress(RX_BUFFERS))
            .unwrap();
        assert_eq!(got, frame);
        assert_eq!(rig.r16(ISR) & INT_ROK, INT_ROK);
        // Second descriptor has EOR; a bad TCP checksum is flagged.
        let mut bad = tcp_frame(MAC, OTHER, 40);
        bad[60] ^= 0xff;
        assert_eq!(rig.card.receive(&bad), ReceiveOutcome::Delivered);
        let opts1: u32 = rig.mem.read_obj(GuestAddress(RX_RING + 16)).unwrap();
        assert_eq!(opts1 & DESC_EOR, DESC_EOR);
        assert_eq!(opts1 & RX_PROTO_IP, RX_PROTO_TCP);
        assert_eq!(opts1 & RX_TCP_FAIL, RX_TCP_FAIL);
        // Both descriptors now belong to the driver: no buffers.
        assert!(!rig.card.can_receive());
        assert_eq!(rig.card.receive(&frame), ReceiveOutcome::NoBuffers);
        assert_eq!(rig.r16(ISR) & INT_RXOVW, INT_RXOVW);
        // The driver returns the first one (ring wrapped to index 0 by EOR).
        rig.put_rx_descriptor(0, DESC_OWN | 2048);
        assert!(rig.card.can_receive());
        assert_eq!(rig.card.receive(&frame), ReceiveOutcome::Delivered);
        // A buffer too small for the frame: dropped, counted.
        rig.put_rx_descriptor(1, DESC_OWN | DESC_EOR | 64);
        assert_eq!(rig.card.receive(&frame), ReceiveOutcome::NoBuffers);
        assert_eq!(rig.card.counters().rx_dropped, 2);
    }

    #[test]
    fn tally_counter_dump() {
        let mut rig = Rig::new();
        rig.bring_up_cplus(4, 2048);
        rig.card.receive(&udp_frame(MAC, OTHER, 30));
        rig.w32(DTCCR + 4, 0);
        rig.w32(DTCCR, 0x8000 | DTCCR_DUMP as u32);
        assert_eq!(rig.r32(DTCCR) & DTCCR_DUMP as u32, 0);
        let rx_ok: u64 = rig.mem.read_obj(GuestAddress(0x8008)).unwrap();
        assert_eq!(rx_ok, 1);
    }

    #[test]
    fn timer_interrupt() {
        let mut rig = Rig::new();
        rig.w16(IMR, INT_TIMEOUT);
        rig.w32(TCTR, 0);
        rig.w32(TIMER_INT, 33_000); // 1 ms
        let deadline = rig.card.next_deadline_ns().unwrap();
        assert_eq!(deadline, 1_000_000);
        rig.clock.advance_ns(500_000);
        assert_eq!(rig.r32(TCTR), 16_500);
        rig.card.on_timer(500_000);
        assert!(!rig.irq.level());
        rig.clock.advance_ns(500_000);
        rig.card.on_timer(1_000_000);
        assert!(rig.irq.level());
        assert_eq!(rig.r16(ISR) & INT_TIMEOUT, INT_TIMEOUT);
        rig.w32(TIMER_INT, 0);
        assert_eq!(rig.card.next_deadline_ns(), None);
    }

    #[test]
    fn link_down_blocks_traffic() {
        let mut rig = Rig::new();
        rig.bring_up_cmode(0);
        rig.card.set_link(false);
        assert!(!rig.card.can_receive());
        assert_eq!(
            rig.card.receive(&udp_frame(MAC, OTHER, 10)),
            ReceiveOutcome::Dropped(DropReason::LinkDown)
        );
        let frame = udp_frame(OTHER, MAC, 100);
        rig.mem
            .write_slice(&frame, GuestAddress(TX_BUFFER))
            .unwrap();
        rig.w32(TSAD0, TX_BUFFER as u32);
        rig.w32(TSD0, frame.len() as u32);
        assert!(rig.sink.is_empty());
        assert_eq!(rig.card.counters().tx_dropped, 1);
        rig.card.set_link(true);
        assert!(rig.card.link_up());
    }

    #[test]
    fn hostile_inputs() {
        let mut rig = Rig::new();
        rig.bring_up_cmode(0);
        // Runt, oversized, disabled receiver.
        assert_eq!(
            rig.card.receive(&[0; 5]),
            ReceiveOutcome::Dropped(DropReason::Runt)
        );
        assert_eq!(
            rig.card.receive(&[0xff; 2000]),
            ReceiveOutcome::Dropped(DropReason::TooLong)
        );
        // Receive buffer outside RAM.
        rig.w32(RBSTART, 0xffff_f000);
        assert_eq!(
            rig.card.receive(&udp_frame(MAC, OTHER, 10)),
            ReceiveOutcome::Dropped(DropReason::DmaError)
        );
        // C+ rings outside RAM, chains without EOR, owned-forever descriptors.
        rig.bring_up_cplus(0, 0);
        rig.w32(RDSAR + 4, 0xffff_ffff);
        assert!(!rig.card.can_receive());
        assert_eq!(
            rig.card.receive(&udp_frame(MAC, OTHER, 10)),
            ReceiveOutcome::Dropped(DropReason::DmaError)
        );
        for i in 0..64 {
            rig.put_tx_descriptor(i, DESC_OWN | 0xffff, 0, TX_BUFFER);
        }
        rig.w8(TPPOLL, TPPOLL_NPQ);
        assert!(rig.sink.is_empty());
        // Descriptors handed back: the guest re-arms them all; still bounded per poll.
        for i in 0..64 {
            rig.put_tx_descriptor(i, DESC_OWN | 0x10, 0, 0xffff_ffff_ffff);
        }
        rig.w8(TPPOLL, TPPOLL_NPQ);
        rig.w32(TNPDS + 4, 0xffff_ffff);
        rig.w32(TNPDS, 0xffff_fff0);
        rig.w8(TPPOLL, TPPOLL_NPQ);
        assert!(rig.sink.is_empty());
        // Bad TSO (MSS 0, not TCP).
        rig.w32(TNPDS, TX_RING as u32);
        rig.w32(TNPDS + 4, 0);
        let frame = udp_frame(OTHER, MAC, 100);
        rig.mem
            .write_slice(&frame, GuestAddress(TX_BUFFER))
            .unwrap();
        rig.put_tx_descriptor(
            0,
            DESC_OWN | DESC_FS | DESC_LS | TX_LGSEN | frame.len() as u32,
            0,
            TX_BUFFER,
        );
        rig.w8(TPPOLL, TPPOLL_NPQ);
        assert!(rig.sink.is_empty());
        assert!(rig.card.counters().tx_dropped >= 1);
    }

    #[test]
    fn random_register_garbage_never_panics() {
        let mut rig = Rig::new();
        rig.bring_up_cmode(RCR_WRAP);
        let mut rng = TestRng(0x8139);
        let frame = udp_frame(MAC, OTHER, 64);
        for i in 0..30_000u32 {
            let offset = (rng.next() % 0x100) as usize;
            let len = [1usize, 2, 4][(rng.next() % 3) as usize];
            let value = rng.next().to_le_bytes();
            match rng.next() % 4 {
                0 => {
                    let mut b = vec![0u8; len];
                    rig.card.bar_read(BAR_IO, offset as u64, &mut b);
                }
                1 => rig.card.bar_write(BAR_MMIO, offset as u64, &value[..len]),
                2 => {
                    // Keep the chip alive: re-enable now and then.
                    if i.is_multiple_of(50) {
                        rig.w8(CR, CR_RE | CR_TE);
                    }
                    rig.card.receive(&frame);
                }
                _ => {
                    rig.clock.advance_ns(rng.next() % 1_000_000);
                    let now = rig.clock.monotonic_ns();
                    rig.card.on_timer(now);
                    let addr = rng.next() % (MEM_SIZE as u64 - 8);
                    rig.mem.write_obj(rng.next(), GuestAddress(addr)).unwrap();
                }
            }
        }
        let state = rig.card.state();
        rig.card.restore(state.clone()).unwrap();
        assert_eq!(rig.card.state(), state);
        let mut damaged = state;
        damaged.regs.clear();
        assert!(rig.card.restore(damaged).is_err());
    }
}
