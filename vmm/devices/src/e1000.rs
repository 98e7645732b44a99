//! Intel 82540EM gigabit Ethernet controller (PCI 8086:100e), the "e1000" every guest knows.
//!
//! Emulated: BAR0 128 KiB MMIO register file, BAR1 I/O window (IOADDR/IODATA indirect
//! access), optional expansion ROM (bytes given by the engine); the EEPROM (64 words:
//! MAC in words 0..=2, the 82540EM initialisation words, checksum word 0x3f making the sum
//! 0xBABA) through EERD and bit-banged Microwire on EECD; the M88E1011 PHY through MDIC
//! (BMCR, BMSR with link / autonegotiation complete, PHY ID 0x0141/0x0c20, ANAR/ANLPAR,
//! 1000BASE-T control/status, PHY specific status); CTRL (RST, SLU, VME), STATUS (LU, FD,
//! 1000 Mb/s), link changes with the LSC interrupt; receive: RCTL (EN, UPE/MPE/BAM, BSIZE/
//! BSEX, SECRC, LPE, VFE, MO), the legacy descriptor ring (RDBA/RDLEN/RDH/RDT), frames
//! spread over several buffers, 16 receive address filters, the 4096-bit multicast hash
//! (MTA, MO 0..3), the VLAN filter table, VLAN tag stripping (CTRL.VME), receive checksum
//! offload (RXCSUM IPOFLD/TUOFLD: IPCS/TCPCS status, IPE/TCPE errors, otherwise IXSM); transmit:
//! TCTL (EN, PSP), legacy descriptors (EOP, RS → DD, IC/CSO/CSS), context + data descriptors
//! (IPCSS/IPCSO/IPCSE, TUCSS/TUCSO/TUCSE, IXSM/TXSM checksum insertion), TCP segmentation
//! (TSE with HDRLEN/MSS, IPv4 and IPv6), VLAN tag insertion (VLE); ICR (read-to-clear, W1C),
//! ICS, IMS, IMC, ITR interrupt throttling (through [`Timed`]); the statistics registers
//! (0x4000..0x4100, clear-on-read: CRCERRS..TSCTFC, the ones a NIC without errors can count:
//! GPRC, BPRC, MPRC, GPTC, BPTC, MPTC, GORC, GOTC, TOR, TOT, TPR, TPT, MPC, RNBC, ROC, RUC,
//! TSCTC, size buckets). Every other register in the 128 KiB window is plain storage.
//!
//! Not emulated: RDTR/RADV/TIDV/TADV delays (interrupts are immediate, throttled by ITR
//! only), flow control (registers stored), wake-up / manageability, the receive and transmit
//! FIFOs (PBA stored), loopback, UDP fragmentation offload (TSE with a UDP context is
//! dropped), MSI (the 82540EM has none), EEPROM writes, PHY interrupts. Frames received
//! while the receive ring has no room are dropped and counted (MPC, RNBC, ICR.RXO); the
//! engine is expected to ask `can_receive` first.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::clock::{Clock, Timed};
use crate::irq::IrqLine;
use crate::net::{
    self, DropReason, FrameSink, NetworkCard, NicCounters, ReceiveOutcome, TsoParams, ETH_FCS_LEN,
    ETH_HEADER_LEN, ETH_MAX_FRAME_LEN_VLAN, MAX_JUMBO_FRAME_LEN, MAX_TSO_FRAME_LEN,
};
use crate::pci::{PciConfigSpace, PciFunction, ROM_BAR};
use crate::GuestMemory;

pub const VENDOR_INTEL: u16 = 0x8086;
pub const DEVICE_82540EM: u16 = 0x100e;
/// Network controller / Ethernet.
pub const CLASS_ETHERNET: u32 = 0x02_00_00;
/// Size of BAR0, the memory-mapped register file.
pub const MMIO_BAR_SIZE: u64 = 0x2_0000;
/// Size of BAR1, the I/O window (IOADDR at 0, IODATA at 4).
pub const IO_BAR_SIZE: u64 = 0x40;
pub const BAR_MMIO: usize = 0;
pub const BAR_IO: usize = 1;

const REG_WORDS: usize = (MMIO_BAR_SIZE / 4) as usize;
const EEPROM_WORDS: usize = 64;
const PHY_REGS: usize = 32;
/// The PHY answers at this MDIO address only.
const PHY_ADDRESS: u32 = 1;
/// Number of receive address register pairs.
const RA_ENTRIES: usize = 16;

// Register offsets.
const CTRL: usize = 0x0000;
const STATUS: usize = 0x0008;
const EECD: usize = 0x0010;
const EERD: usize = 0x0014;
const MDIC: usize = 0x0020;
const VET: usize = 0x0038;
const ICR: usize = 0x00c0;
const ITR: usize = 0x00c4;
const ICS: usize = 0x00c8;
const IMS: usize = 0x00d0;
const IMC: usize = 0x00d8;
const RCTL: usize = 0x0100;
const TCTL: usize = 0x0400;
const TIPG: usize = 0x0410;
const LEDCTL: usize = 0x0e00;
const PBA: usize = 0x1000;
const RDBAL: usize = 0x2800;
const RDBAH: usize = 0x2804;
const RDLEN: usize = 0x2808;
const RDH: usize = 0x2810;
const RDT: usize = 0x2818;
const TDBAL: usize = 0x3800;
const TDBAH: usize = 0x3804;
const TDLEN: usize = 0x3808;
const TDH: usize = 0x3810;
const TDT: usize = 0x3818;
const STATS_START: usize = 0x4000;
const STATS_END: usize = 0x4100;
const MPC: usize = 0x4010;
const PRC64: usize = 0x405c;
const GPRC: usize = 0x4074;
const BPRC: usize = 0x4078;
const MPRC: usize = 0x407c;
const GPTC: usize = 0x4080;
const GORCL: usize = 0x4088;
const GOTCL: usize = 0x4090;
const RNBC: usize = 0x40a0;
const RUC: usize = 0x40a4;
const ROC: usize = 0x40ac;
const TORL: usize = 0x40c0;
const TOTL: usize = 0x40c8;
const TPR: usize = 0x40d0;
const TPT: usize = 0x40d4;
const PTC64: usize = 0x40d8;
const MPTC: usize = 0x40f0;
const BPTC: usize = 0x40f4;
const TSCTC: usize = 0x40f8;
const TSCTFC: usize = 0x40fc;
const RXCSUM: usize = 0x5000;
const MTA: usize = 0x5200;
const RA: usize = 0x5400;
const VFTA: usize = 0x5600;

// CTRL bits.
const CTRL_SLU: u32 = 1 << 6;
const CTRL_RST: u32 = 1 << 26;
const CTRL_VME: u32 = 1 << 30;
const CTRL_PHY_RST: u32 = 1 << 31;

// STATUS bits.
const STATUS_FD: u32 = 1 << 0;
const STATUS_LU: u32 = 1 << 1;
const STATUS_SPEED_1000: u32 = 2 << 6;
const STATUS_ASDV_1000: u32 = 2 << 8;
const STATUS_MTXCKOK: u32 = 1 << 10;

// EECD bits.
const EECD_SK: u32 = 1 << 0;
const EECD_CS: u32 = 1 << 1;
const EECD_DI: u32 = 1 << 2;
const EECD_DO: u32 = 1 << 3;
const EECD_FWE_MASK: u32 = 3 << 4;
const EECD_REQ: u32 = 1 << 6;
const EECD_GNT: u32 = 1 << 7;
const EECD_PRES: u32 = 1 << 8;
/// Microwire READ opcode with its start bit (binary 110).
const MICROWIRE_READ: u32 = 0b110;
const MICROWIRE_ADDRESS_BITS: u32 = 6;

// EERD bits (82540: address in 15:8, data in 31:16).
const EERD_START: u32 = 1 << 0;
const EERD_DONE: u32 = 1 << 4;

// MDIC.
const MDIC_OP_WRITE: u32 = 1 << 26;
const MDIC_OP_READ: u32 = 2 << 26;
const MDIC_READY: u32 = 1 << 28;
const MDIC_INT_EN: u32 = 1 << 29;
const MDIC_ERROR: u32 = 1 << 30;

// Interrupt causes.
pub const ICR_TXDW: u32 = 1 << 0;
pub const ICR_TXQE: u32 = 1 << 1;
pub const ICR_LSC: u32 = 1 << 2;
pub const ICR_RXDMT0: u32 = 1 << 4;
pub const ICR_RXO: u32 = 1 << 6;
pub const ICR_RXT0: u32 = 1 << 7;
pub const ICR_MDAC: u32 = 1 << 9;
/// Cause bits that exist on the 82540EM.
const ICR_VALID: u32 = 0x0001_f6df;

// RCTL bits.
const RCTL_EN: u32 = 1 << 1;
const RCTL_UPE: u32 = 1 << 3;
const RCTL_MPE: u32 = 1 << 4;
const RCTL_LPE: u32 = 1 << 5;
const RCTL_RDMTS_SHIFT: u32 = 8;
const RCTL_MO_SHIFT: u32 = 12;
const RCTL_BAM: u32 = 1 << 15;
const RCTL_BSIZE_SHIFT: u32 = 16;
const RCTL_VFE: u32 = 1 << 18;
const RCTL_BSEX: u32 = 1 << 25;
const RCTL_SECRC: u32 = 1 << 26;

// RXCSUM bits.
const RXCSUM_IPOFLD: u32 = 1 << 8;
const RXCSUM_TUOFLD: u32 = 1 << 9;

// Receive descriptor status / errors.
const RXD_STAT_DD: u8 = 1 << 0;
const RXD_STAT_EOP: u8 = 1 << 1;
const RXD_STAT_IXSM: u8 = 1 << 2;
const RXD_STAT_VP: u8 = 1 << 3;
const RXD_STAT_TCPCS: u8 = 1 << 5;
const RXD_STAT_IPCS: u8 = 1 << 6;
const RXD_ERR_TCPE: u8 = 1 << 5;
const RXD_ERR_IPE: u8 = 1 << 6;
const RXD_ERR_RXE: u8 = 1 << 7;

// TCTL bits.
const TCTL_EN: u32 = 1 << 1;
const TCTL_PSP: u32 = 1 << 3;

// Transmit descriptor command bits (in the top byte of the second dword).
const TXD_CMD_EOP: u32 = 1 << 24;
const TXD_CMD_IC: u32 = 1 << 26;
const TXD_CMD_TSE: u32 = 1 << 26;
const TXD_CMD_RS: u32 = 1 << 27;
const TXD_CMD_DEXT: u32 = 1 << 29;
const TXD_CMD_VLE: u32 = 1 << 30;
/// Context TUCMD: TCP (else UDP).
const TXD_CMD_TCP: u32 = 1 << 24;
const TXD_DTYP_DATA: u32 = 1;
const TXD_STAT_DD: u8 = 1 << 0;
const TXD_POPTS_IXSM: u32 = 1 << 0;
const TXD_POPTS_TXSM: u32 = 1 << 1;

// PHY registers and bits.
const PHY_BMCR: usize = 0;
const PHY_BMSR: usize = 1;
const PHY_ID1: usize = 2;
const PHY_ID2: usize = 3;
const PHY_ANAR: usize = 4;
const PHY_ANLPAR: usize = 5;
const PHY_ANER: usize = 6;
const PHY_1000T_CTRL: usize = 9;
const PHY_1000T_STATUS: usize = 10;
const PHY_EXT_STATUS: usize = 15;
const PHY_SPEC_CTRL: usize = 16;
const PHY_SPEC_STATUS: usize = 17;
const PHY_EXT_SPEC_CTRL: usize = 20;
const BMCR_RESET: u16 = 1 << 15;
const BMCR_RESTART_AN: u16 = 1 << 9;
const BMSR_LINK: u16 = 1 << 2;
const BMSR_AN_COMPLETE: u16 = 1 << 5;
/// 100BASE-TX/10BASE-T full/half, extended status, preamble suppression, autoneg capable,
/// extended capabilities (link and autoneg-complete bits are added while the link is up).
const BMSR_BASE: u16 = 0x7949;
const PHY_SPEC_STATUS_LINK_UP_1000_FD: u16 = 0xac00;
const PHY_SPEC_STATUS_DOWN: u16 = 0x8000 | 0x2000;
/// Read-only PHY registers (writes ignored).
const PHY_READ_ONLY: [usize; 8] = [
    PHY_BMSR,
    PHY_ID1,
    PHY_ID2,
    PHY_ANLPAR,
    PHY_ANER,
    PHY_1000T_STATUS,
    PHY_EXT_STATUS,
    PHY_SPEC_STATUS,
];

/// The 82540EM EEPROM image words 3..=62 (words 0..=2 are the MAC, 63 the checksum),
/// as shipped on the 82540EM desktop adapter and used by QEMU: compatibility, PBA number,
/// initialisation control words, subsystem and device IDs, PHY and LED settings.
const EEPROM_INIT_WORDS: [u16; 60] = [
    0x0000,
    0xffff,
    0x0000,
    0x0000,
    0x0000, // 3..=7
    0x3000,
    0x1000,
    0x6403,
    DEVICE_82540EM,
    0x8086,
    DEVICE_82540EM,
    0x8086,
    0x3040, // 8..=15
    0x0008,
    0x2000,
    0x7e14,
    0x0048,
    0x1000,
    0x00d8,
    0x0000,
    0x2700, // 16..=23
    0x6cc9,
    0x3150,
    0x0722,
    0x040b,
    0x0984,
    0x0000,
    0xc000,
    0x0706, // 24..=31
    0x1008,
    0x0000,
    0x0f04,
    0x7fff,
    0x4d01,
    0xffff,
    0xffff,
    0xffff, // 32..=39
    0xffff,
    0xffff,
    0xffff,
    0xffff,
    0xffff,
    0xffff,
    0xffff,
    0xffff, // 40..=47
    0x0100,
    0x4000,
    0x121c,
    0xffff,
    0xffff,
    0xffff,
    0xffff,
    0xffff, // 48..=55
    0xffff,
    0xffff,
    0xffff,
    0xffff,
    0xffff,
    0xffff,
    0xffff, // 56..=62
];
/// Transmit work (bytes DMAed plus bytes sent) done per doorbell before the rest of the
/// ring is deferred to [`Timed::on_timer`], so that a flooding guest cannot stall its vCPU.
pub const TX_WORK_PER_PASS: usize = 1 << 20;
/// Words 0..=0x3f of a valid EEPROM sum to this.
pub const EEPROM_CHECKSUM_TARGET: u16 = 0xbaba;

/// The bit-banged Microwire interface of the EEPROM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EecdState {
    /// Last value written to EECD (SK, CS, DI, FWE, REQ).
    pub last_written: u32,
    /// Bits shifted in since CS rose (start bit, opcode, address).
    pub bits_in: u32,
    pub value_in: u32,
    /// Reading: index of the data bit now on DO (word * 16 + bit from the MSB).
    pub reading: bool,
    pub out_position: u32,
}

/// The offload parameters of the last context descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxContext {
    pub ipcss: u8,
    pub ipcso: u8,
    pub ipcse: u16,
    pub tucss: u8,
    pub tucso: u8,
    pub tucse: u16,
    pub paylen: u32,
    pub hdr_len: u8,
    pub mss: u16,
    pub tcp: bool,
}

/// A packet being gathered from transmit descriptors until EOP.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxPacket {
    pub data: Vec<u8>,
    /// A descriptor of this packet already contributed (options come from the first).
    pub started: bool,
    /// Something was wrong (too long, DMA error): drop at EOP.
    pub dropping: bool,
    pub tse: bool,
    pub insert_ip_checksum: bool,
    pub insert_l4_checksum: bool,
    /// Legacy IC: (CSS, CSO).
    pub legacy_checksum: Option<(u8, u8)>,
}

/// Everything that survives save/restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct E1000State {
    /// The 128 KiB register file as 32-bit words.
    pub regs: Vec<u32>,
    pub phy: Vec<u16>,
    pub eeprom: Vec<u16>,
    pub eecd: EecdState,
    /// IOADDR of the I/O window.
    pub io_address: u32,
    pub tx_context: TxContext,
    pub tx_packet: TxPacket,
    pub link_up: bool,
    pub counters: NicCounters,
    /// The interrupt is asserted (ICR & IMS, let through by ITR).
    pub irq_asserted: bool,
    pub last_irq_ns: Option<u64>,
    pub irq_deadline_ns: Option<u64>,
    /// The transmit work budget of a doorbell ran out with descriptors left: continue at
    /// this time (from `on_timer`).
    #[serde(default)]
    pub tx_resume_ns: Option<u64>,
}

/// Errors of [`E1000::restore`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum E1000Error {
    #[error("saved e1000 state has {found} {what}, expected {expected}; the snapshot is damaged or from another version")]
    BadLength {
        what: &'static str,
        found: usize,
        expected: usize,
    },
}

/// An 82540EM on the PCI bus.
pub struct E1000 {
    config: PciConfigSpace,
    state: E1000State,
    mac: [u8; 6],
    memory: GuestMemory,
    irq: Arc<dyn IrqLine>,
    sink: Arc<dyn FrameSink>,
    clock: Arc<dyn Clock>,
    rom: Option<Vec<u8>>,
    /// Bytes read from guest RAM and handed to the sink during this transmit pass.
    tx_work: usize,
}

fn eeprom_image(mac: [u8; 6]) -> Vec<u16> {
    let mut words = vec![0u16; EEPROM_WORDS];
    for (i, pair) in mac.chunks_exact(2).enumerate() {
        words[i] = u16::from_le_bytes([pair[0], pair[1]]);
    }
    words[3..63].copy_from_slice(&EEPROM_INIT_WORDS);
    let sum = words[..63].iter().fold(0u16, |a, w| a.wrapping_add(*w));
    words[63] = EEPROM_CHECKSUM_TARGET.wrapping_sub(sum);
    words
}

fn phy_reset_values(link_up: bool) -> Vec<u16> {
    let mut phy = vec![0u16; PHY_REGS];
    phy[PHY_BMCR] = 0x1140; // autoneg enabled, full duplex, 1000 Mb/s
    phy[PHY_ID1] = 0x0141;
    phy[PHY_ID2] = 0x0c20;
    phy[PHY_ANAR] = 0x0de1;
    phy[PHY_1000T_CTRL] = 0x0e00;
    phy[PHY_EXT_STATUS] = 0x3000;
    phy[PHY_SPEC_CTRL] = 0x0360;
    phy[PHY_EXT_SPEC_CTRL] = 0x0c60;
    set_phy_link(&mut phy, link_up);
    phy
}

fn set_phy_link(phy: &mut [u16], up: bool) {
    if up {
        phy[PHY_BMSR] = BMSR_BASE | BMSR_LINK | BMSR_AN_COMPLETE;
        phy[PHY_ANLPAR] = 0x45e1;
        phy[PHY_ANER] = 0x000f;
        phy[PHY_1000T_STATUS] = 0x3c00;
        phy[PHY_SPEC_STATUS] = PHY_SPEC_STATUS_LINK_UP_1000_FD;
    } else {
        phy[PHY_BMSR] = BMSR_BASE;
        phy[PHY_ANLPAR] = 0;
        phy[PHY_ANER] = 0x0004;
        phy[PHY_1000T_STATUS] = 0;
        phy[PHY_SPEC_STATUS] = PHY_SPEC_STATUS_DOWN;
    }
}

/// A decoded transmit descriptor.
struct TxDescriptor {
    buffer: u64,
    lower: u32,
    upper: u32,
}

impl E1000 {
    /// A card with factory MAC `mac`, DMA into `memory`, INTA# on `irq`, transmitted frames
    /// to `sink`; `rom` is an optional option-ROM image (e.g. iPXE) for the ROM BAR.
    pub fn new(
        mac: [u8; 6],
        memory: GuestMemory,
        irq: Arc<dyn IrqLine>,
        sink: Arc<dyn FrameSink>,
        clock: Arc<dyn Clock>,
        rom: Option<Vec<u8>>,
    ) -> Self {
        let mut config = PciConfigSpace::new();
        config.set_ids(VENDOR_INTEL, DEVICE_82540EM);
        config.set_revision(3);
        config.set_class(CLASS_ETHERNET);
        config.set_subsystem(VENDOR_INTEL, DEVICE_82540EM);
        config.set_interrupt_pin(1);
        config.add_memory_bar(BAR_MMIO, MMIO_BAR_SIZE, false, false);
        config.add_io_bar(BAR_IO, IO_BAR_SIZE);
        let rom = rom.filter(|r| !r.is_empty());
        if let Some(image) = &rom {
            config.set_rom_bar(image.len() as u64);
        }
        let mut card = Self {
            config,
            state: E1000State {
                regs: vec![0; REG_WORDS],
                phy: phy_reset_values(true),
                eeprom: eeprom_image(mac),
                eecd: EecdState::default(),
                io_address: 0,
                tx_context: TxContext::default(),
                tx_packet: TxPacket::default(),
                link_up: true,
                counters: NicCounters::default(),
                irq_asserted: false,
                last_irq_ns: None,
                irq_deadline_ns: None,
                tx_resume_ns: None,
            },
            tx_work: 0,
            mac,
            memory,
            irq,
            sink,
            clock,
            rom,
        };
        card.reset_registers();
        card
    }

    pub fn state(&self) -> E1000State {
        self.state.clone()
    }

    /// Restores a saved state (the MAC stays the one given at construction).
    pub fn restore(&mut self, state: E1000State) -> Result<(), E1000Error> {
        for (what, found, expected) in [
            ("register words", state.regs.len(), REG_WORDS),
            ("PHY registers", state.phy.len(), PHY_REGS),
            ("EEPROM words", state.eeprom.len(), EEPROM_WORDS),
        ] {
            if found != expected {
                return Err(E1000Error::BadLength {
                    what,
                    found,
                    expected,
                });
            }
        }
        self.state = state;
        if self.state.tx_packet.data.len() > MAX_TSO_FRAME_LEN {
            self.state.tx_packet = TxPacket::default();
        }
        self.drive_irq();
        Ok(())
    }

    // ---- registers ----

    fn reg(&self, offset: usize) -> u32 {
        self.state.regs.get(offset / 4).copied().unwrap_or(0)
    }

    fn set_reg(&mut self, offset: usize, value: u32) {
        if let Some(r) = self.state.regs.get_mut(offset / 4) {
            *r = value;
        }
    }

    fn add_stat(&mut self, offset: usize, amount: u32) {
        let v = self.reg(offset).saturating_add(amount);
        self.set_reg(offset, v);
    }

    /// 64-bit statistics pair (low register at `offset`).
    fn add_stat64(&mut self, offset: usize, amount: u64) {
        let value = (u64::from(self.reg(offset + 4)) << 32 | u64::from(self.reg(offset)))
            .saturating_add(amount);
        self.set_reg(offset, value as u32);
        self.set_reg(offset + 4, (value >> 32) as u32);
    }

    /// Power-on / CTRL.RST state of the registers (PCI configuration is untouched).
    fn reset_registers(&mut self) {
        let link_up = self.state.link_up;
        self.state.regs.iter_mut().for_each(|r| *r = 0);
        self.set_reg(CTRL, CTRL_SLU | 0x0000_0200 | 0x0000_0008);
        self.set_reg(STATUS, self.status_value());
        self.set_reg(EECD, 0);
        self.set_reg(LEDCTL, 0x0706_8302);
        self.set_reg(PBA, 0x0010_0030);
        self.set_reg(VET, u32::from(net::ETHERTYPE_VLAN));
        self.set_reg(TIPG, 0x0060_200a);
        self.set_reg(RXCSUM, 0x300);
        self.set_reg(ITR, 0);
        // Receive address 0 from the EEPROM, marked valid.
        let mac = self.mac;
        self.set_reg(RA, u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]));
        self.set_reg(
            RA + 4,
            u32::from(u16::from_le_bytes([mac[4], mac[5]])) | 1 << 31,
        );
        self.state.phy = phy_reset_values(link_up);
        self.state.eecd = EecdState::default();
        self.state.tx_context = TxContext::default();
        self.state.tx_packet = TxPacket::default();
        self.state.irq_deadline_ns = None;
        self.state.last_irq_ns = None;
        self.state.irq_asserted = false;
        self.drive_irq();
    }

    fn status_value(&self) -> u32 {
        let base = STATUS_FD | STATUS_SPEED_1000 | STATUS_ASDV_1000 | STATUS_MTXCKOK;
        if self.state.link_up {
            base | STATUS_LU
        } else {
            base
        }
    }

    fn read_register(&mut self, offset: usize) -> u32 {
        match offset {
            ICR => {
                let value = self.reg(ICR);
                self.set_reg(ICR, 0);
                self.update_irq();
                value
            }
            STATUS => self.status_value(),
            EECD => self.eecd_value(),
            ICS | IMC => 0,
            STATS_START..STATS_END => {
                let value = self.reg(offset);
                self.set_reg(offset, 0);
                value
            }
            _ => self.reg(offset),
        }
    }

    fn write_register(&mut self, offset: usize, value: u32) {
        match offset {
            CTRL => {
                if value & CTRL_RST != 0 {
                    self.reset_registers();
                    return;
                }
                if value & CTRL_PHY_RST != 0 {
                    self.state.phy = phy_reset_values(self.state.link_up);
                }
                self.set_reg(CTRL, value & !(CTRL_RST | CTRL_PHY_RST));
            }
            STATUS => {}
            EECD => self.write_eecd(value),
            EERD => {
                if value & EERD_START != 0 {
                    let address = (value >> 8) & 0xff;
                    let word = self
                        .state
                        .eeprom
                        .get(address as usize)
                        .copied()
                        .unwrap_or(0);
                    self.set_reg(EERD, u32::from(word) << 16 | address << 8 | EERD_DONE);
                } else {
                    self.set_reg(EERD, value & !EERD_DONE);
                }
            }
            MDIC => self.write_mdic(value),
            ICR => {
                let v = self.reg(ICR) & !value;
                self.set_reg(ICR, v);
                self.update_irq();
            }
            ICS => self.raise(value),
            IMS => {
                let v = self.reg(IMS) | (value & ICR_VALID);
                self.set_reg(IMS, v);
                self.update_irq();
            }
            IMC => {
                let v = self.reg(IMS) & !value;
                self.set_reg(IMS, v);
                self.update_irq();
            }
            ITR => {
                self.set_reg(ITR, value & 0xffff);
                self.update_irq();
            }
            RDBAL | TDBAL => self.set_reg(offset, value & !0xf),
            RDLEN | TDLEN => self.set_reg(offset, value & 0x000f_ff80),
            RDH | TDH => self.set_reg(offset, value & 0xffff),
            RDT => {
                self.set_reg(RDT, value & 0xffff);
                self.sink.rx_ready();
            }
            RCTL => {
                let was_enabled = self.reg(RCTL) & RCTL_EN != 0;
                self.set_reg(RCTL, value);
                if !was_enabled && value & RCTL_EN != 0 {
                    self.sink.rx_ready();
                }
            }
            TDT => {
                self.set_reg(TDT, value & 0xffff);
                self.process_tx();
            }
            TCTL => {
                self.set_reg(TCTL, value);
                self.process_tx();
            }
            STATS_START..STATS_END => {}
            _ => self.set_reg(offset, value),
        }
    }

    // ---- EEPROM ----

    fn eecd_value(&self) -> u32 {
        let e = &self.state.eecd;
        let kept = e.last_written & (EECD_SK | EECD_CS | EECD_DI | EECD_FWE_MASK | EECD_REQ);
        let mut value = kept | EECD_PRES | EECD_GNT;
        if e.reading {
            let word = (e.out_position / 16) as usize % EEPROM_WORDS;
            let bit = 15 - (e.out_position % 16);
            if self
                .state
                .eeprom
                .get(word)
                .is_some_and(|w| w >> bit & 1 != 0)
            {
                value |= EECD_DO;
            }
        }
        value
    }

    fn write_eecd(&mut self, value: u32) {
        let old = self.state.eecd.last_written;
        self.state.eecd.last_written = value;
        let e = &mut self.state.eecd;
        if value & EECD_CS == 0 {
            // Deselected: the next selection starts a new command.
            e.bits_in = 0;
            e.value_in = 0;
            e.reading = false;
            return;
        }
        let rising = old & EECD_SK == 0 && value & EECD_SK != 0;
        if !rising {
            return;
        }
        if e.reading {
            // Sequential read runs on into the next word.
            e.out_position = (e.out_position + 1) % (EEPROM_WORDS as u32 * 16);
            return;
        }
        let di = u32::from(value & EECD_DI != 0);
        if e.bits_in == 0 && di == 0 {
            return; // waiting for the start bit
        }
        e.value_in = (e.value_in << 1) | di;
        e.bits_in += 1;
        if e.bits_in == 3 + MICROWIRE_ADDRESS_BITS {
            if e.value_in >> MICROWIRE_ADDRESS_BITS == MICROWIRE_READ {
                let address = e.value_in & ((1 << MICROWIRE_ADDRESS_BITS) - 1);
                e.reading = true;
                // The next rising edge presents bit 15 of the addressed word.
                e.out_position =
                    (address * 16 + EEPROM_WORDS as u32 * 16 - 1) % (EEPROM_WORDS as u32 * 16);
            } else {
                // Writes / erase / EWEN are not supported: wait for deselect.
                e.bits_in = u32::MAX / 2;
            }
        }
    }

    // ---- PHY ----

    fn write_mdic(&mut self, value: u32) {
        let reg = ((value >> 16) & 0x1f) as usize;
        let phy_address = (value >> 21) & 0x1f;
        let op = value & (3 << 26);
        let mut result = value & !(MDIC_READY | MDIC_ERROR);
        if phy_address != PHY_ADDRESS || (op != MDIC_OP_READ && op != MDIC_OP_WRITE) {
            result |= MDIC_ERROR;
        } else if op == MDIC_OP_READ {
            let data = self.state.phy.get(reg).copied().unwrap_or(0);
            result = (result & !0xffff) | u32::from(data);
        } else {
            self.write_phy(reg, value as u16);
        }
        result |= MDIC_READY;
        self.set_reg(MDIC, result);
        if value & MDIC_INT_EN != 0 {
            self.raise(ICR_MDAC);
        }
    }

    fn write_phy(&mut self, reg: usize, value: u16) {
        if PHY_READ_ONLY.contains(&reg) {
            return;
        }
        if reg == PHY_BMCR {
            if value & BMCR_RESET != 0 {
                self.state.phy = phy_reset_values(self.state.link_up);
                return;
            }
            // Autonegotiation completes at once (with the link up).
            let link = self.state.link_up;
            set_phy_link(&mut self.state.phy, link);
            if let Some(r) = self.state.phy.get_mut(PHY_BMCR) {
                *r = value & !(BMCR_RESET | BMCR_RESTART_AN);
            }
            return;
        }
        if let Some(r) = self.state.phy.get_mut(reg) {
            *r = value;
        }
    }

    // ---- interrupts ----

    fn raise(&mut self, causes: u32) {
        let v = self.reg(ICR) | (causes & ICR_VALID);
        self.set_reg(ICR, v);
        self.update_irq();
    }

    fn update_irq(&mut self) {
        let pending = self.reg(ICR) & self.reg(IMS) != 0;
        if !pending {
            self.state.irq_deadline_ns = None;
            if self.state.irq_asserted {
                self.state.irq_asserted = false;
                self.drive_irq();
            }
            return;
        }
        if self.state.irq_asserted {
            return;
        }
        let interval_ns = u64::from(self.reg(ITR) & 0xffff) * 256;
        let now = self.clock.monotonic_ns();
        match self.state.last_irq_ns {
            Some(last) if interval_ns != 0 && now < last.saturating_add(interval_ns) => {
                self.state.irq_deadline_ns = Some(last.saturating_add(interval_ns));
            }
            _ => {
                self.state.irq_deadline_ns = None;
                self.state.irq_asserted = true;
                self.state.last_irq_ns = Some(now);
                self.drive_irq();
            }
        }
    }

    /// Drives INTA# and the configuration status bit from `irq_asserted`.
    fn drive_irq(&mut self) {
        let asserted = self.state.irq_asserted;
        self.config.drive_intx(self.irq.as_ref(), asserted);
    }

    // ---- transmit ----

    fn ring(&self, base_low: usize, base_high: usize, len: usize) -> (u64, u32) {
        let base = u64::from(self.reg(base_high)) << 32 | u64::from(self.reg(base_low));
        (base, self.reg(len) / 16)
    }

    fn process_tx(&mut self) {
        self.state.tx_resume_ns = None;
        if self.reg(TCTL) & TCTL_EN == 0 || !self.config.bus_master_enabled() {
            return;
        }
        self.tx_work = 0;
        let (base, size) = self.ring(TDBAL, TDBAH, TDLEN);
        let mut head = self.reg(TDH);
        let tail = self.reg(TDT);
        if size == 0 || head >= size || tail >= size {
            return;
        }
        let mut processed = 0;
        // At most one pass over the ring per doorbell.
        while head != tail && processed < size {
            if self.tx_work >= TX_WORK_PER_PASS {
                self.state.tx_resume_ns = Some(self.clock.monotonic_ns());
                break;
            }
            let Some(address) = base.checked_add(u64::from(head) * 16) else {
                break;
            };
            let mut raw = [0u8; 16];
            if self
                .memory
                .read_slice(&mut raw, GuestAddress(address))
                .is_err()
            {
                log::debug!("e1000: transmit descriptor at {address:#x} is outside guest RAM");
                break;
            }
            let descriptor = TxDescriptor {
                buffer: u64::from_le_bytes(raw[..8].try_into().unwrap_or_default()),
                lower: u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
                upper: u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default()),
            };
            self.process_tx_descriptor(&descriptor);
            if descriptor.lower & TXD_CMD_RS != 0 {
                let status = (descriptor.upper as u8) | TXD_STAT_DD;
                let _ = self
                    .memory
                    .write_slice(&[status], GuestAddress(address + 12));
            }
            head = (head + 1) % size;
            processed += 1;
        }
        self.set_reg(TDH, head);
        if processed > 0 {
            let mut causes = ICR_TXDW;
            if head == tail {
                causes |= ICR_TXQE;
            }
            self.raise(causes);
        }
    }

    fn process_tx_descriptor(&mut self, d: &TxDescriptor) {
        let extended = d.lower & TXD_CMD_DEXT != 0;
        let dtyp = (d.lower >> 20) & 0xf;
        if extended && dtyp == 0 {
            // Context descriptor.
            let ip = d.buffer as u32;
            let tu = (d.buffer >> 32) as u32;
            self.state.tx_context = TxContext {
                ipcss: ip as u8,
                ipcso: (ip >> 8) as u8,
                ipcse: (ip >> 16) as u16,
                tucss: tu as u8,
                tucso: (tu >> 8) as u8,
                tucse: (tu >> 16) as u16,
                paylen: d.lower & 0xf_ffff,
                hdr_len: (d.upper >> 8) as u8,
                mss: (d.upper >> 16) as u16,
                tcp: d.lower & TXD_CMD_TCP != 0,
            };
            return;
        }
        let length = if extended {
            if dtyp != TXD_DTYP_DATA {
                log::debug!("e1000: transmit descriptor type {dtyp} ignored");
                return;
            }
            d.lower & 0xf_ffff
        } else {
            d.lower & 0xffff
        } as usize;
        let packet = &mut self.state.tx_packet;
        if !packet.started {
            packet.started = true;
            if extended {
                let popts = (d.upper >> 8) & 0xff;
                packet.tse = d.lower & TXD_CMD_TSE != 0;
                packet.insert_ip_checksum = popts & TXD_POPTS_IXSM != 0;
                packet.insert_l4_checksum = popts & TXD_POPTS_TXSM != 0;
            } else if d.lower & TXD_CMD_IC != 0 {
                packet.legacy_checksum = Some(((d.upper >> 8) as u8, (d.lower >> 16) as u8));
            }
        }
        let limit = if packet.tse {
            MAX_TSO_FRAME_LEN
        } else {
            MAX_JUMBO_FRAME_LEN
        };
        if !packet.dropping && length > 0 {
            let start = packet.data.len();
            if start + length > limit {
                log::debug!("e1000: transmit packet longer than {limit} bytes dropped");
                packet.dropping = true;
                packet.data = Vec::new();
            } else {
                self.tx_work += length;
                packet.data.resize(start + length, 0);
                if self
                    .memory
                    .read_slice(&mut packet.data[start..], GuestAddress(d.buffer))
                    .is_err()
                {
                    log::debug!("e1000: transmit buffer {:#x} outside guest RAM", d.buffer);
                    packet.dropping = true;
                    packet.data = Vec::new();
                }
            }
        }
        if d.lower & TXD_CMD_EOP != 0 {
            let packet = std::mem::take(&mut self.state.tx_packet);
            let vlan = (d.lower & TXD_CMD_VLE != 0 && self.reg(CTRL) & CTRL_VME != 0)
                .then_some((d.upper >> 16) as u16);
            self.transmit_packet(packet, vlan);
        }
    }

    fn transmit_packet(&mut self, mut packet: TxPacket, vlan: Option<u16>) {
        if packet.dropping || packet.data.len() < ETH_HEADER_LEN {
            self.state.counters.tx_dropped += 1;
            return;
        }
        let ctx = self.state.tx_context;
        if packet.tse {
            let params = TsoParams {
                ip_offset: usize::from(ctx.ipcss),
                l4_offset: usize::from(ctx.tucss),
                header_len: usize::from(ctx.hdr_len),
                mss: usize::from(ctx.mss),
            };
            if !ctx.tcp {
                log::debug!("e1000: UDP segmentation offload is not supported");
                self.state.counters.tx_dropped += 1;
                return;
            }
            let mut segments = Vec::new();
            let result =
                net::segment_tcp(&packet.data, &params, &mut |s| segments.push(s.to_vec()));
            match result {
                Ok(_) => {
                    for segment in segments {
                        self.send_frame(&segment, vlan);
                    }
                    self.add_stat(TSCTC, 1);
                }
                Err(e) => {
                    log::debug!("e1000: segmentation failed: {e}");
                    self.add_stat(TSCTFC, 1);
                    self.state.counters.tx_dropped += 1;
                }
            }
            return;
        }
        let data = &mut packet.data;
        if packet.insert_ip_checksum {
            let end = (ctx.ipcse != 0).then_some(usize::from(ctx.ipcse));
            net::insert_checksum(
                data,
                usize::from(ctx.ipcss),
                end,
                usize::from(ctx.ipcso),
                false,
            );
        }
        if packet.insert_l4_checksum {
            let end = (ctx.tucse != 0).then_some(usize::from(ctx.tucse));
            net::insert_checksum(
                data,
                usize::from(ctx.tucss),
                end,
                usize::from(ctx.tucso),
                true,
            );
        }
        if let Some((css, cso)) = packet.legacy_checksum {
            if cso > css {
                net::insert_checksum(data, usize::from(css), None, usize::from(cso), false);
            }
        }
        let frame = std::mem::take(data);
        self.send_frame(&frame, vlan);
    }

    fn send_frame(&mut self, frame: &[u8], vlan: Option<u16>) {
        let tagged;
        let mut frame = frame;
        if let Some(tci) = vlan {
            tagged = net::insert_vlan_tag(frame, self.reg(VET) as u16, tci);
            frame = &tagged;
        }
        let padded;
        if self.reg(TCTL) & TCTL_PSP != 0 {
            padded = net::pad_to_minimum(frame);
            frame = &padded;
        }
        if !self.state.link_up {
            self.state.counters.tx_dropped += 1;
            return;
        }
        self.sink.send(frame);
        self.tx_work += frame.len();
        self.state.counters.count_tx(frame.len());
        let wire_len = (frame.len() + ETH_FCS_LEN) as u64;
        self.add_stat(GPTC, 1);
        self.add_stat(TPT, 1);
        self.add_stat64(GOTCL, wire_len);
        self.add_stat64(TOTL, wire_len);
        if net::is_broadcast(frame) {
            self.add_stat(BPTC, 1);
        } else if net::is_multicast(frame) {
            self.add_stat(MPTC, 1);
        }
        self.add_stat(size_bucket(PTC64, frame.len() + ETH_FCS_LEN), 1);
    }

    // ---- receive ----

    fn receive_buffer_size(&self) -> usize {
        let rctl = self.reg(RCTL);
        let code = (rctl >> RCTL_BSIZE_SHIFT) & 3;
        if rctl & RCTL_BSEX != 0 {
            match code {
                1 => 16384,
                2 => 8192,
                3 => 4096,
                _ => 2048,
            }
        } else {
            match code {
                1 => 1024,
                2 => 512,
                3 => 256,
                _ => 2048,
            }
        }
    }

    /// Free receive descriptors, None when the ring is unusable.
    fn free_rx_descriptors(&self) -> Option<(u64, u32, u32)> {
        let (base, size) = self.ring(RDBAL, RDBAH, RDLEN);
        let head = self.reg(RDH);
        let tail = self.reg(RDT);
        if size == 0 || head >= size || tail >= size {
            return None;
        }
        Some((base, size, (tail + size - head) % size))
    }

    fn max_frame_len(&self) -> usize {
        if self.reg(RCTL) & RCTL_LPE != 0 {
            MAX_JUMBO_FRAME_LEN
        } else {
            ETH_MAX_FRAME_LEN_VLAN
        }
    }

    fn accepts(&self, frame: &[u8]) -> bool {
        let rctl = self.reg(RCTL);
        let vet = self.reg(VET) as u16;
        if rctl & RCTL_VFE != 0
            && frame.len() >= 16
            && u16::from_be_bytes([frame[12], frame[13]]) == vet
        {
            let vid = usize::from(u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff);
            if self.reg(VFTA + (vid >> 5) * 4) & (1 << (vid & 31)) == 0 {
                return false;
            }
        }
        let dst = net::destination(frame);
        if net::is_broadcast(&dst) && rctl & RCTL_BAM != 0 {
            return true;
        }
        let multicast = net::is_multicast(&dst);
        if (multicast && rctl & RCTL_MPE != 0) || (!multicast && rctl & RCTL_UPE != 0) {
            return true;
        }
        for entry in 0..RA_ENTRIES {
            let high = self.reg(RA + entry * 8 + 4);
            if high & (1 << 31) == 0 || high & (3 << 16) != 0 {
                continue;
            }
            let low = self.reg(RA + entry * 8).to_le_bytes();
            let high = high.to_le_bytes();
            if dst == [low[0], low[1], low[2], low[3], high[0], high[1]] {
                return true;
            }
        }
        if multicast {
            let hash = mta_hash(&dst, (rctl >> RCTL_MO_SHIFT) & 3);
            return self.reg(MTA + (hash >> 5) * 4) & (1 << (hash & 31)) != 0;
        }
        false
    }

    fn drop_rx(&mut self, reason: DropReason) -> ReceiveOutcome {
        self.state.counters.rx_dropped += 1;
        ReceiveOutcome::Dropped(reason)
    }

    fn receive_frame(&mut self, frame: &[u8]) -> ReceiveOutcome {
        if frame.len() < ETH_HEADER_LEN {
            self.add_stat(RUC, 1);
            return self.drop_rx(DropReason::Runt);
        }
        if !self.state.link_up {
            return self.drop_rx(DropReason::LinkDown);
        }
        if self.reg(RCTL) & RCTL_EN == 0 {
            return self.drop_rx(DropReason::ReceiverDisabled);
        }
        if frame.len() > self.max_frame_len() {
            self.add_stat(ROC, 1);
            return self.drop_rx(DropReason::TooLong);
        }
        if !self.accepts(frame) {
            return ReceiveOutcome::Filtered;
        }
        if !self.config.bus_master_enabled() {
            return self.drop_rx(DropReason::DmaError);
        }
        // VLAN stripping, then padding and FCS as the wire would have them.
        let mut vlan = None;
        let mut data = match self.reg(CTRL) & CTRL_VME != 0 {
            true => match net::strip_vlan_tag(frame, self.reg(VET) as u16) {
                Some((untagged, tci)) => {
                    vlan = Some(tci);
                    untagged
                }
                None => frame.to_vec(),
            },
            false => frame.to_vec(),
        };
        if data.len() < net::ETH_MIN_FRAME_LEN {
            data.resize(net::ETH_MIN_FRAME_LEN, 0);
        }
        let frame_len = data.len();
        let (status_bits, errors, csum) = self.rx_checksum(&data);
        if self.reg(RCTL) & RCTL_SECRC == 0 {
            let fcs = net::fcs(&data);
            data.extend_from_slice(&fcs);
        }
        let Some((base, size, free)) = self.free_rx_descriptors() else {
            return self.missed();
        };
        let buffer_size = self.receive_buffer_size();
        let needed = data.len().div_ceil(buffer_size);
        if needed as u32 > free {
            return self.missed();
        }
        let mut head = self.reg(RDH);
        let mut dma_failed = false;
        let chunks = data.chunks(buffer_size).count();
        for (index, chunk) in data.chunks(buffer_size).enumerate() {
            let Some(address) = base.checked_add(u64::from(head) * 16) else {
                dma_failed = true;
                break;
            };
            let mut buffer = [0u8; 8];
            if self
                .memory
                .read_slice(&mut buffer, GuestAddress(address))
                .is_err()
            {
                dma_failed = true;
                break;
            }
            let buffer = u64::from_le_bytes(buffer);
            let mut chunk_errors = 0;
            if buffer != 0
                && self
                    .memory
                    .write_slice(chunk, GuestAddress(buffer))
                    .is_err()
            {
                dma_failed = true;
                chunk_errors |= RXD_ERR_RXE;
            }
            let last = index + 1 == chunks;
            let mut status = RXD_STAT_DD;
            let mut special = 0;
            if last {
                status |= RXD_STAT_EOP | status_bits;
                chunk_errors |= errors;
                if let Some(tci) = vlan {
                    status |= RXD_STAT_VP;
                    special = tci;
                }
            }
            let mut writeback = [0u8; 8];
            writeback[0..2].copy_from_slice(&(chunk.len() as u16).to_le_bytes());
            writeback[2..4].copy_from_slice(&csum.to_le_bytes());
            writeback[4] = status;
            writeback[5] = chunk_errors;
            writeback[6..8].copy_from_slice(&special.to_le_bytes());
            if self
                .memory
                .write_slice(&writeback, GuestAddress(address + 8))
                .is_err()
            {
                dma_failed = true;
            }
            head = (head + 1) % size;
        }
        self.set_reg(RDH, head);
        let mut causes = ICR_RXT0;
        let remaining = free.saturating_sub(needed as u32);
        let threshold_shift = match (self.reg(RCTL) >> RCTL_RDMTS_SHIFT) & 3 {
            0 => 1,
            1 => 2,
            _ => 3,
        };
        if remaining <= size >> threshold_shift {
            causes |= ICR_RXDMT0;
        }
        self.raise(causes);
        if dma_failed {
            return self.drop_rx(DropReason::DmaError);
        }
        let wire_len = (frame_len + ETH_FCS_LEN) as u64;
        self.add_stat(GPRC, 1);
        self.add_stat(TPR, 1);
        self.add_stat64(GORCL, wire_len);
        self.add_stat64(TORL, wire_len);
        let dst = net::destination(frame);
        if net::is_broadcast(&dst) {
            self.add_stat(BPRC, 1);
        } else if net::is_multicast(&dst) {
            self.add_stat(MPRC, 1);
        }
        self.add_stat(size_bucket(PRC64, frame_len + ETH_FCS_LEN), 1);
        self.state.counters.count_rx(frame.len());
        ReceiveOutcome::Delivered
    }

    /// No room in the ring: a missed packet.
    fn missed(&mut self) -> ReceiveOutcome {
        self.add_stat(MPC, 1);
        self.add_stat(RNBC, 1);
        self.raise(ICR_RXO);
        self.state.counters.rx_dropped += 1;
        ReceiveOutcome::NoBuffers
    }

    /// Status bits, error bits and the packet checksum field for a received frame.
    fn rx_checksum(&self, frame: &[u8]) -> (u8, u8, u16) {
        let rxcsum = self.reg(RXCSUM);
        let start = (rxcsum & 0xff) as usize;
        let csum = frame
            .get(start..)
            .map(|d| net::fold(net::ones_complement_add(0, d)))
            .unwrap_or(0);
        if rxcsum & (RXCSUM_IPOFLD | RXCSUM_TUOFLD) == 0 {
            return (RXD_STAT_IXSM, 0, csum);
        }
        let checks = net::verify_checksums(frame);
        let mut status = 0;
        let mut errors = 0;
        if rxcsum & RXCSUM_IPOFLD != 0 {
            if let Some(valid) = checks.ipv4_header {
                status |= RXD_STAT_IPCS;
                if !valid {
                    errors |= RXD_ERR_IPE;
                }
            }
        }
        if rxcsum & RXCSUM_TUOFLD != 0 {
            if let Some(valid) = checks.tcp.or(checks.udp) {
                status |= RXD_STAT_TCPCS;
                if !valid {
                    errors |= RXD_ERR_TCPE;
                }
            }
        }
        (status, errors, csum)
    }

    // ---- access plumbing ----

    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let Ok(offset) = usize::try_from(offset) else {
            data.fill(0xff);
            return;
        };
        let aligned = offset & !3;
        let shift = offset & 3;
        let value = if aligned < MMIO_BAR_SIZE as usize {
            self.read_register(aligned)
        } else {
            0
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(shift + i).copied().unwrap_or(0);
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        let aligned = offset & !3;
        if aligned >= MMIO_BAR_SIZE as usize {
            return;
        }
        let shift = offset & 3;
        let value = if shift == 0 && data.len() >= 4 {
            u32::from_le_bytes([data[0], data[1], data[2], data[3]])
        } else {
            // Narrow write: merge into the stored value (no read side effects).
            let mut bytes = self.reg(aligned).to_le_bytes();
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = bytes.get_mut(shift + i) {
                    *slot = *b;
                }
            }
            u32::from_le_bytes(bytes)
        };
        self.write_register(aligned, value);
    }

    fn io_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset & !3 {
            0 => {
                let bytes = self.state.io_address.to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bytes.get((offset & 3) as usize + i).copied().unwrap_or(0);
                }
            }
            4 => {
                let address = u64::from(self.state.io_address & 0x1_fffc);
                self.mmio_read(address + (offset & 3), data);
            }
            _ => data.fill(0xff),
        }
    }

    fn io_write(&mut self, offset: u64, data: &[u8]) {
        match offset & !3 {
            0 => {
                let mut bytes = self.state.io_address.to_le_bytes();
                for (i, b) in data.iter().enumerate() {
                    if let Some(slot) = bytes.get_mut((offset & 3) as usize + i) {
                        *slot = *b;
                    }
                }
                self.state.io_address = u32::from_le_bytes(bytes);
            }
            4 => {
                let address = u64::from(self.state.io_address & 0x1_fffc);
                self.mmio_write(address + (offset & 3), data);
            }
            _ => {}
        }
    }
}

/// MTA bit index for a multicast address; `mo` selects which 12 address bits (RCTL.MO).
fn mta_hash(dst: &[u8; 6], mo: u32) -> usize {
    let (a4, a5) = (u16::from(dst[4]), u16::from(dst[5]));
    let hash = match mo {
        0 => (a4 >> 4) | (a5 << 4),
        1 => (a4 >> 3) | (a5 << 5),
        2 => (a4 >> 2) | (a5 << 6),
        _ => a4 | (a5 << 8),
    };
    usize::from(hash & 0x0fff)
}

/// The size-bucket statistics register (64, 65-127, ..., 1024-max) for `len` bytes.
fn size_bucket(first: usize, len: usize) -> usize {
    let index = match len {
        0..=64 => 0,
        65..=127 => 1,
        128..=255 => 2,
        256..=511 => 3,
        512..=1023 => 4,
        _ => 5,
    };
    first + index * 4
}

impl NetworkCard for E1000 {
    fn receive(&mut self, frame: &[u8]) -> ReceiveOutcome {
        self.receive_frame(frame)
    }

    fn can_receive(&self) -> bool {
        if !self.state.link_up || self.reg(RCTL) & RCTL_EN == 0 {
            return false;
        }
        let Some((_, size, free)) = self.free_rx_descriptors() else {
            return false;
        };
        let per_frame = (self.max_frame_len() + ETH_FCS_LEN).div_ceil(self.receive_buffer_size());
        free as usize >= per_frame.min(size.saturating_sub(1) as usize).max(1)
    }

    fn set_link(&mut self, up: bool) {
        if self.state.link_up == up {
            return;
        }
        self.state.link_up = up;
        set_phy_link(&mut self.state.phy, up);
        self.raise(ICR_LSC);
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

impl PciFunction for E1000 {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg + offset, data);
        // INTx disable may have changed.
        self.drive_irq();
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match bar {
            BAR_MMIO => self.mmio_read(offset, data),
            BAR_IO => self.io_read(offset, data),
            ROM_BAR => {
                let rom = self.rom.as_deref().unwrap_or(&[]);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = usize::try_from(offset)
                        .ok()
                        .and_then(|o| rom.get(o + i))
                        .copied()
                        .unwrap_or(0xff);
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            BAR_MMIO => self.mmio_write(offset, data),
            BAR_IO => self.io_write(offset, data),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.config.reset_header();
        self.reset_registers();
    }
}

impl Timed for E1000 {
    fn next_deadline_ns(&self) -> Option<u64> {
        match (self.state.irq_deadline_ns, self.state.tx_resume_ns) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn on_timer(&mut self, now_ns: u64) {
        if self.state.tx_resume_ns.is_some_and(|t| now_ns >= t) {
            self.process_tx();
        }
        if let Some(deadline) = self.state.irq_deadline_ns {
            if now_ns >= deadline {
                self.state.irq_deadline_ns = None;
                self.update_irq();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::irq::CountingIrq;
    use crate::net::tests::{reference_checksum, reference_l4_checksum, tcp_frame, udp_frame};
    use crate::net::RecordingSink;
    use crate::pci::{COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_MEMORY_SPACE, REG_COMMAND};
    use crate::test_support::TestRng;
    use vm_memory::GuestMemoryMmap;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const OTHER: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
    const MEM_SIZE: usize = 4 << 20;
    const RX_RING: u64 = 0x10000;
    const TX_RING: u64 = 0x20000;
    const RX_BUFFERS: u64 = 0x100000;
    const TX_BUFFERS: u64 = 0x200000;

    struct Rig {
        card: E1000,
        mem: GuestMemoryMmap,
        irq: Arc<CountingIrq>,
        sink: Arc<RecordingSink>,
        clock: Arc<ManualClock>,
        tx_tail: u32,
    }

    impl Rig {
        fn new() -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let irq = CountingIrq::new();
            let sink = RecordingSink::new();
            let clock = ManualClock::new(0);
            let mut card = E1000::new(
                MAC,
                mem.clone(),
                irq.clone(),
                sink.clone(),
                clock.clone(),
                None,
            );
            card.config_write(
                REG_COMMAND,
                0,
                &(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER).to_le_bytes(),
            );
            Self {
                card,
                mem,
                irq,
                sink,
                clock,
                tx_tail: 0,
            }
        }

        fn read(&mut self, offset: usize) -> u32 {
            let mut b = [0u8; 4];
            self.card.bar_read(BAR_MMIO, offset as u64, &mut b);
            u32::from_le_bytes(b)
        }

        fn write(&mut self, offset: usize, value: u32) {
            self.card
                .bar_write(BAR_MMIO, offset as u64, &value.to_le_bytes());
        }

        /// What Linux e1000 / iPXE do: reset, link up, rings, enable.
        fn bring_up(&mut self, rx_descriptors: u32, rctl_extra: u32) {
            self.write(CTRL, CTRL_RST);
            self.write(CTRL, CTRL_SLU);
            self.write(IMC, 0xffff_ffff);
            self.read(ICR);
            for i in 0..rx_descriptors {
                let d = RX_RING + u64::from(i) * 16;
                let buffer = RX_BUFFERS + u64::from(i) * 2048;
                self.mem.write_obj(buffer, GuestAddress(d)).unwrap();
                self.mem.write_obj(0u64, GuestAddress(d + 8)).unwrap();
            }
            self.write(RDBAL, RX_RING as u32);
            self.write(RDBAH, 0);
            self.write(RDLEN, rx_descriptors * 16);
            self.write(RDH, 0);
            self.write(RDT, rx_descriptors - 1);
            self.write(TDBAL, TX_RING as u32);
            self.write(TDBAH, 0);
            self.write(TDLEN, 64 * 16);
            self.write(TDH, 0);
            self.write(TDT, 0);
            self.tx_tail = 0;
            self.write(TCTL, TCTL_EN | TCTL_PSP);
            self.write(RCTL, RCTL_EN | RCTL_BAM | RCTL_SECRC | rctl_extra);
            self.write(IMS, ICR_TXDW | ICR_RXT0 | ICR_LSC | ICR_RXO | ICR_RXDMT0);
        }

        fn put_tx(&mut self, buffer: u64, lower: u32, upper: u32) {
            let d = TX_RING + u64::from(self.tx_tail) * 16;
            self.mem.write_obj(buffer, GuestAddress(d)).unwrap();
            self.mem.write_obj(lower, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(upper, GuestAddress(d + 12)).unwrap();
            self.tx_tail = (self.tx_tail + 1) % 64;
        }

        fn kick_tx(&mut self) {
            let t = self.tx_tail;
            self.write(TDT, t);
        }

        fn rx_descriptor(&self, index: u64) -> (u16, u16, u8, u8, u16) {
            let d = RX_RING + index * 16;
            let len: u16 = self.mem.read_obj(GuestAddress(d + 8)).unwrap();
            let csum: u16 = self.mem.read_obj(GuestAddress(d + 10)).unwrap();
            let status: u8 = self.mem.read_obj(GuestAddress(d + 12)).unwrap();
            let errors: u8 = self.mem.read_obj(GuestAddress(d + 13)).unwrap();
            let special: u16 = self.mem.read_obj(GuestAddress(d + 14)).unwrap();
            (len, csum, status, errors, special)
        }

        fn rx_buffer(&self, index: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.mem
                .read_slice(&mut v, GuestAddress(RX_BUFFERS + index * 2048))
                .unwrap();
            v
        }
    }

    /// Linux e1000_shift_out_ee_bits / shift_in_ee_bits.
    fn bitbang_read(rig: &mut Rig, address: u32) -> u16 {
        let base = EECD_REQ;
        rig.write(EECD, base);
        assert!(rig.read(EECD) & EECD_GNT != 0);
        rig.write(EECD, base | EECD_CS);
        let command = (MICROWIRE_READ << 6) | address;
        for bit in (0..9).rev() {
            let di = if command >> bit & 1 != 0 { EECD_DI } else { 0 };
            rig.write(EECD, base | EECD_CS | di);
            rig.write(EECD, base | EECD_CS | di | EECD_SK);
            rig.write(EECD, base | EECD_CS | di);
        }
        let mut word = 0u16;
        for _ in 0..16 {
            rig.write(EECD, base | EECD_CS | EECD_SK);
            let do_bit = rig.read(EECD) & EECD_DO != 0;
            word = (word << 1) | u16::from(do_bit);
            rig.write(EECD, base | EECD_CS);
        }
        rig.write(EECD, 0);
        word
    }

    fn eerd_read(rig: &mut Rig, address: u32) -> u16 {
        rig.write(EERD, EERD_START | address << 8);
        let v = rig.read(EERD);
        assert!(v & EERD_DONE != 0);
        (v >> 16) as u16
    }

    fn mdic_read(rig: &mut Rig, reg: u32) -> u16 {
        rig.write(MDIC, MDIC_OP_READ | PHY_ADDRESS << 21 | reg << 16);
        let v = rig.read(MDIC);
        assert!(v & MDIC_READY != 0);
        assert!(v & MDIC_ERROR == 0);
        v as u16
    }

    #[test]
    fn pci_identity_and_bars() {
        let rig = Rig::new();
        let c = rig.card.config();
        assert_eq!(c.vendor_id(), 0x8086);
        assert_eq!(c.device_id(), 0x100e);
        assert_eq!(c.bar_size(BAR_MMIO), Some(0x20000));
        assert_eq!(c.bar_size(BAR_IO), Some(0x40));
        assert_eq!(c.bar_size(ROM_BAR), None);
        assert_eq!(c.interrupt_pin(), 1);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
        let mut with_rom = E1000::new(
            MAC,
            mem,
            CountingIrq::new(),
            RecordingSink::new(),
            ManualClock::new(0),
            Some(vec![0x55, 0xaa, 0x10]),
        );
        assert_eq!(with_rom.config().bar_size(ROM_BAR), Some(0x800));
        let mut b = [0u8; 4];
        with_rom.bar_read(ROM_BAR, 1, &mut b);
        assert_eq!(b, [0xaa, 0x10, 0xff, 0xff]);
    }

    #[test]
    fn eeprom_through_eerd_and_bitbang_holds_mac_and_checksum() {
        let mut rig = Rig::new();
        let mut sum = 0u16;
        for address in 0..64 {
            let a = eerd_read(&mut rig, address);
            let b = bitbang_read(&mut rig, address);
            assert_eq!(a, b, "word {address}");
            sum = sum.wrapping_add(a);
        }
        assert_eq!(sum, EEPROM_CHECKSUM_TARGET);
        assert_eq!(eerd_read(&mut rig, 0), 0x5452);
        assert_eq!(eerd_read(&mut rig, 1), 0x1200);
        assert_eq!(eerd_read(&mut rig, 2), 0x5634);
        assert_eq!(eerd_read(&mut rig, 0x0d), 0x100e);
        // The receive address 0 is loaded from it.
        assert_eq!(rig.read(RA), 0x1200_5452);
        assert_eq!(rig.read(RA + 4), 0x8000_5634);
    }

    #[test]
    fn phy_reports_link_id_and_autoneg() {
        let mut rig = Rig::new();
        assert_eq!(mdic_read(&mut rig, 2), 0x0141);
        assert_eq!(mdic_read(&mut rig, 3), 0x0c20);
        let bmsr = mdic_read(&mut rig, 1);
        assert!(bmsr & BMSR_LINK != 0 && bmsr & BMSR_AN_COMPLETE != 0);
        assert_eq!(
            rig.read(STATUS) & (STATUS_LU | STATUS_FD),
            STATUS_LU | STATUS_FD
        );
        assert_eq!(rig.read(STATUS) & (3 << 6), STATUS_SPEED_1000);
        // Restart autoneg, write ANAR.
        rig.write(MDIC, MDIC_OP_WRITE | PHY_ADDRESS << 21 | 4 << 16 | 0x01e1);
        assert_eq!(mdic_read(&mut rig, 4), 0x01e1);
        rig.write(MDIC, MDIC_OP_WRITE | PHY_ADDRESS << 21 | 0x1340);
        assert_eq!(mdic_read(&mut rig, 0) & BMCR_RESTART_AN, 0);
        // BMSR is read-only.
        rig.write(MDIC, MDIC_OP_WRITE | PHY_ADDRESS << 21 | 1 << 16);
        assert_eq!(mdic_read(&mut rig, 1), bmsr);
        // Another PHY address answers with an error.
        rig.write(MDIC, MDIC_OP_READ | 2 << 21 | 1 << 16);
        assert!(rig.read(MDIC) & MDIC_ERROR != 0);
    }

    #[test]
    fn transmit_legacy_frame_exact_bytes_and_writeback() {
        let mut rig = Rig::new();
        rig.bring_up(8, 0);
        let frame = udp_frame(OTHER, MAC, 100);
        rig.mem
            .write_slice(&frame, GuestAddress(TX_BUFFERS))
            .unwrap();
        // Split over two descriptors; RS on the last.
        rig.put_tx(TX_BUFFERS, 20, 0);
        rig.put_tx(
            TX_BUFFERS + 20,
            (frame.len() as u32 - 20) | TXD_CMD_EOP | TXD_CMD_RS | (1 << 25),
            0,
        );
        let edges = rig.irq.count();
        rig.kick_tx();
        assert_eq!(rig.sink.take(), vec![frame.clone()]);
        let status: u8 = rig.mem.read_obj(GuestAddress(TX_RING + 16 + 12)).unwrap();
        assert_eq!(status & TXD_STAT_DD, TXD_STAT_DD);
        let status0: u8 = rig.mem.read_obj(GuestAddress(TX_RING + 12)).unwrap();
        assert_eq!(status0 & TXD_STAT_DD, 0, "no RS, no writeback");
        assert_eq!(rig.read(TDH), 2);
        assert!(rig.irq.count() > edges);
        assert!(rig.irq.level());
        let icr = rig.read(ICR);
        assert!(icr & ICR_TXDW != 0 && icr & ICR_TXQE != 0);
        assert!(!rig.irq.level(), "ICR read clears and lowers the line");
        let c = rig.card.counters();
        assert_eq!((c.tx_packets, c.tx_bytes), (1, frame.len() as u64));
        assert_eq!(rig.read(GPTC), 1);
        assert_eq!(rig.read(GPTC), 0, "statistics clear on read");
        assert_eq!(rig.read(GOTCL), frame.len() as u32 + 4);
    }

    #[test]
    fn transmit_context_checksum_offload_fills_ip_and_udp() {
        let mut rig = Rig::new();
        rig.bring_up(8, 0);
        let reference = udp_frame(OTHER, MAC, 77);
        let mut frame = reference.clone();
        // What Linux hands over for CHECKSUM_PARTIAL: IP checksum 0, UDP field seeded with
        // the folded pseudo-header sum.
        frame[24] = 0;
        frame[25] = 0;
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&frame[26..34]);
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&((frame.len() - 34) as u16).to_be_bytes());
        let seed = !reference_checksum(&pseudo);
        frame[40..42].copy_from_slice(&seed.to_be_bytes());
        rig.mem
            .write_slice(&frame, GuestAddress(TX_BUFFERS))
            .unwrap();
        // Context: IPCSS 14, IPCSO 24, IPCSE 33; TUCSS 34, TUCSO 40, TUCSE 0.
        let ip = 14u64 | 24 << 8 | 33 << 16;
        let tu = 34u64 | 40 << 8;
        rig.put_tx(ip | tu << 32, TXD_CMD_DEXT | 1 << 25, 0);
        rig.put_tx(
            TX_BUFFERS,
            frame.len() as u32 | TXD_CMD_DEXT | TXD_DTYP_DATA << 20 | TXD_CMD_EOP | TXD_CMD_RS,
            (TXD_POPTS_IXSM | TXD_POPTS_TXSM) << 8,
        );
        rig.kick_tx();
        let sent = rig.sink.take();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0], reference);
        assert_eq!(
            u16::from_be_bytes([sent[0][40], sent[0][41]]),
            reference_l4_checksum(&sent[0])
        );
    }

    #[test]
    fn tcp_segmentation_offload() {
        let mut rig = Rig::new();
        rig.bring_up(8, 0);
        let big = tcp_frame(OTHER, MAC, 4000);
        rig.mem.write_slice(&big, GuestAddress(TX_BUFFERS)).unwrap();
        let ip = 14u64 | 24 << 8 | 33 << 16;
        let tu = 34u64 | 50 << 8;
        let mss = 1460u32;
        rig.put_tx(
            ip | tu << 32,
            TXD_CMD_DEXT | TXD_CMD_TCP | 1 << 25 | TXD_CMD_TSE | 4000,
            54 << 8 | mss << 16,
        );
        rig.put_tx(
            TX_BUFFERS,
            54 | TXD_CMD_DEXT | TXD_DTYP_DATA << 20 | TXD_CMD_TSE,
            (TXD_POPTS_IXSM | TXD_POPTS_TXSM) << 8,
        );
        rig.put_tx(
            TX_BUFFERS + 54,
            (big.len() as u32 - 54)
                | TXD_CMD_DEXT
                | TXD_DTYP_DATA << 20
                | TXD_CMD_TSE
                | TXD_CMD_EOP
                | TXD_CMD_RS,
            0,
        );
        rig.kick_tx();
        let sent = rig.sink.take();
        assert_eq!(sent.len(), 3);
        let mut payload = Vec::new();
        for s in &sent {
            assert!(s.len() <= 54 + 1460);
            let v = net::verify_checksums(s);
            assert_eq!((v.ipv4_header, v.tcp), (Some(true), Some(true)));
            payload.extend_from_slice(&s[54..]);
        }
        assert_eq!(payload, big[54..].to_vec());
        assert_eq!(rig.read(TSCTC), 1);
    }

    #[test]
    fn receive_into_ring_with_writeback_irq_and_checksum_status() {
        let mut rig = Rig::new();
        rig.bring_up(8, 0);
        assert!(rig.card.can_receive());
        let frame = udp_frame(MAC, OTHER, 200);
        let edges = rig.irq.count();
        assert_eq!(rig.card.receive(&frame), ReceiveOutcome::Delivered);
        let (len, _csum, status, errors, _) = rig.rx_descriptor(0);
        assert_eq!(len as usize, frame.len());
        assert_eq!(
            status & (RXD_STAT_DD | RXD_STAT_EOP | RXD_STAT_IPCS | RXD_STAT_TCPCS),
            RXD_STAT_DD | RXD_STAT_EOP | RXD_STAT_IPCS | RXD_STAT_TCPCS
        );
        assert_eq!(errors, 0);
        assert_eq!(rig.rx_buffer(0, frame.len()), frame);
        assert_eq!(rig.read(RDH), 1);
        assert_eq!(rig.irq.count(), edges + 1);
        assert!(rig.read(ICR) & ICR_RXT0 != 0);
        // Bad UDP checksum: TCPE reported; checksum offload off: IXSM.
        let mut bad = frame.clone();
        bad[60] ^= 1;
        rig.card.receive(&bad);
        let (_, _, status, errors, _) = rig.rx_descriptor(1);
        assert!(status & RXD_STAT_TCPCS != 0 && errors & RXD_ERR_TCPE != 0);
        rig.write(RXCSUM, 0);
        rig.card.receive(&frame);
        assert_eq!(rig.rx_descriptor(2).2 & RXD_STAT_IXSM, RXD_STAT_IXSM);
        // Short frames are padded to 60; FCS appended without SECRC.
        rig.write(RCTL, RCTL_EN | RCTL_BAM);
        let arp: Vec<u8> = [[0xff; 6].as_slice(), &OTHER, &[0x08, 0x06], &[1; 28]].concat();
        assert_eq!(rig.card.receive(&arp), ReceiveOutcome::Delivered);
        let (len, ..) = rig.rx_descriptor(3);
        assert_eq!(len, 64);
        let got = rig.rx_buffer(3, 64);
        let mut padded = arp.clone();
        padded.resize(60, 0);
        assert_eq!(&got[..60], padded.as_slice());
        assert_eq!(&got[60..], net::fcs(&padded).as_slice());
        assert_eq!(rig.card.counters().rx_packets, 4);
        assert_eq!(rig.read(GPRC), 4);
    }

    #[test]
    fn receive_spans_small_buffers() {
        let mut rig = Rig::new();
        // 256-byte buffers (BSIZE 3).
        rig.bring_up(16, 3 << RCTL_BSIZE_SHIFT);
        let frame = udp_frame(MAC, OTHER, 600);
        assert_eq!(rig.card.receive(&frame), ReceiveOutcome::Delivered);
        let pieces = frame.len().div_ceil(256);
        let mut got = Vec::new();
        for i in 0..pieces as u64 {
            let (len, _, status, ..) = rig.rx_descriptor(i);
            assert!(status & RXD_STAT_DD != 0);
            assert_eq!(status & RXD_STAT_EOP != 0, i as usize == pieces - 1);
            got.extend(rig.rx_buffer(i, len as usize));
        }
        assert_eq!(got, frame);
    }

    #[test]
    fn receive_filters_unicast_broadcast_multicast_vlan() {
        let mut rig = Rig::new();
        rig.bring_up(16, 0);
        let to_other = udp_frame(OTHER, [2, 0, 0, 0, 0, 9], 10);
        assert_eq!(rig.card.receive(&to_other), ReceiveOutcome::Filtered);
        let broadcast = udp_frame([0xff; 6], OTHER, 10);
        assert_eq!(rig.card.receive(&broadcast), ReceiveOutcome::Delivered);
        rig.write(RCTL, RCTL_EN | RCTL_SECRC);
        assert_eq!(rig.card.receive(&broadcast), ReceiveOutcome::Filtered);
        // Multicast 01:00:5e:00:00:fb through the MTA with MO=0.
        let group = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];
        let mcast = udp_frame(group, OTHER, 10);
        assert_eq!(rig.card.receive(&mcast), ReceiveOutcome::Filtered);
        let hash = mta_hash(&group, 0);
        assert_eq!(hash, (0xfb << 4) & 0xfff);
        rig.write(MTA + (hash >> 5) * 4, 1 << (hash & 31));
        assert_eq!(rig.card.receive(&mcast), ReceiveOutcome::Delivered);
        // Promiscuous.
        rig.write(RCTL, RCTL_EN | RCTL_SECRC | RCTL_UPE);
        assert_eq!(rig.card.receive(&to_other), ReceiveOutcome::Delivered);
        // A second receive address.
        rig.write(RCTL, RCTL_EN | RCTL_SECRC);
        rig.write(
            RA + 8,
            u32::from_le_bytes([OTHER[0], OTHER[1], OTHER[2], OTHER[3]]),
        );
        rig.write(
            RA + 12,
            u32::from(u16::from_le_bytes([OTHER[4], OTHER[5]])) | 1 << 31,
        );
        assert_eq!(rig.card.receive(&to_other), ReceiveOutcome::Delivered);
        // VLAN filter and stripping.
        let tagged = net::insert_vlan_tag(&udp_frame(MAC, OTHER, 100), 0x8100, 5);
        rig.write(RCTL, RCTL_EN | RCTL_SECRC | RCTL_VFE);
        assert_eq!(rig.card.receive(&tagged), ReceiveOutcome::Filtered);
        rig.write(VFTA, 1 << 5);
        rig.write(CTRL, CTRL_SLU | CTRL_VME);
        let head = u64::from(rig.read(RDH));
        assert_eq!(rig.card.receive(&tagged), ReceiveOutcome::Delivered);
        let (len, _, status, _, special) = rig.rx_descriptor(head);
        assert_eq!(len as usize, tagged.len() - 4);
        assert!(status & RXD_STAT_VP != 0);
        assert_eq!(special, 5);
        assert_eq!(rig.card.counters().rx_dropped, 0);
    }

    #[test]
    fn ring_full_is_no_buffers_and_counted() {
        let mut rig = Rig::new();
        rig.bring_up(8, 0);
        let frame = udp_frame(MAC, OTHER, 50);
        for _ in 0..7 {
            assert_eq!(rig.card.receive(&frame), ReceiveOutcome::Delivered);
        }
        assert!(!rig.card.can_receive());
        assert_eq!(rig.card.receive(&frame), ReceiveOutcome::NoBuffers);
        assert_eq!(rig.card.counters().rx_dropped, 1);
        assert_eq!(rig.read(MPC), 1);
        assert!(rig.read(ICR) & ICR_RXO != 0);
        // The guest hands back buffers (RDMTS: half the ring free raises RXDMT0 no more).
        rig.write(RDT, 3);
        assert!(rig.card.can_receive());
        assert_eq!(rig.card.receive(&frame), ReceiveOutcome::Delivered);
    }

    #[test]
    fn link_down_raises_lsc_and_stops_traffic() {
        let mut rig = Rig::new();
        rig.bring_up(8, 0);
        rig.read(ICR);
        rig.card.set_link(false);
        assert!(!rig.card.link_up());
        assert!(rig.irq.level());
        assert!(rig.read(ICR) & ICR_LSC != 0);
        assert_eq!(rig.read(STATUS) & STATUS_LU, 0);
        assert_eq!(mdic_read(&mut rig, 1) & BMSR_LINK, 0);
        assert!(!rig.card.can_receive());
        let frame = udp_frame(MAC, OTHER, 50);
        assert_eq!(
            rig.card.receive(&frame),
            ReceiveOutcome::Dropped(DropReason::LinkDown)
        );
        rig.mem
            .write_slice(&frame, GuestAddress(TX_BUFFERS))
            .unwrap();
        rig.put_tx(TX_BUFFERS, frame.len() as u32 | TXD_CMD_EOP | TXD_CMD_RS, 0);
        rig.kick_tx();
        assert!(rig.sink.is_empty());
        assert_eq!(rig.card.counters().tx_dropped, 1);
        assert_eq!(rig.read(TDH), rig.tx_tail, "descriptors still complete");
        rig.card.set_link(true);
        assert!(rig.read(ICR) & ICR_LSC != 0);
        assert!(rig.read(STATUS) & STATUS_LU != 0);
    }

    #[test]
    fn itr_throttles_interrupts_until_timer() {
        let mut rig = Rig::new();
        rig.bring_up(16, 0);
        rig.write(ITR, 1000); // 256 us
        let frame = udp_frame(MAC, OTHER, 50);
        rig.card.receive(&frame);
        assert!(rig.irq.level());
        rig.read(ICR);
        assert!(!rig.irq.level());
        rig.clock.advance_ns(1000);
        rig.card.receive(&frame);
        assert!(!rig.irq.level(), "held back by ITR");
        let deadline = rig.card.next_deadline_ns().unwrap();
        assert_eq!(deadline, 256_000);
        rig.card.on_timer(deadline - 1);
        assert!(!rig.irq.level());
        rig.clock.advance_ns(deadline);
        rig.card.on_timer(deadline);
        assert!(rig.irq.level());
        assert_eq!(rig.card.next_deadline_ns(), None);
    }

    #[test]
    fn intx_disable_masks_the_line_but_not_the_status_bit() {
        let mut rig = Rig::new();
        rig.bring_up(8, 0);
        rig.write(ICS, ICR_LSC);
        assert!(rig.irq.level());
        assert!(rig.card.config().read_u16(crate::pci::REG_STATUS) & 0x8 != 0);
        rig.card.config_write(
            REG_COMMAND,
            0,
            &(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE).to_le_bytes(),
        );
        assert!(!rig.irq.level());
        assert!(rig.card.config().read_u16(crate::pci::REG_STATUS) & 0x8 != 0);
        rig.write(IMC, u32::MAX);
        assert!(rig.card.config().read_u16(crate::pci::REG_STATUS) & 0x8 == 0);
    }

    #[test]
    fn io_window_reaches_registers() {
        let mut rig = Rig::new();
        rig.card
            .bar_write(BAR_IO, 0, &(STATUS as u32).to_le_bytes());
        let mut b = [0u8; 4];
        rig.card.bar_read(BAR_IO, 4, &mut b);
        assert!(u32::from_le_bytes(b) & STATUS_LU != 0);
        rig.card.bar_write(BAR_IO, 0, &(IMS as u32).to_le_bytes());
        rig.card.bar_write(BAR_IO, 4, &ICR_LSC.to_le_bytes());
        assert_eq!(rig.read(IMS), ICR_LSC);
    }

    #[test]
    fn hostile_rings_and_descriptors() {
        let mut rig = Rig::new();
        rig.bring_up(8, 0);
        let frame = udp_frame(MAC, OTHER, 50);
        // Receive ring outside guest RAM.
        rig.write(RDBAL, 0xfff0_0000);
        rig.write(RDBAH, 0xffff_ffff);
        assert_eq!(
            rig.card.receive(&frame),
            ReceiveOutcome::Dropped(DropReason::DmaError)
        );
        // Head/tail out of range, zero length.
        rig.write(RDBAL, RX_RING as u32);
        rig.write(RDBAH, 0);
        rig.write(RDH, 1000);
        assert_eq!(rig.card.receive(&frame), ReceiveOutcome::NoBuffers);
        assert!(!rig.card.can_receive());
        rig.write(RDH, 0);
        rig.write(RDLEN, 0);
        assert_eq!(rig.card.receive(&frame), ReceiveOutcome::NoBuffers);
        // Receive buffer outside RAM: descriptor consumed with RXE, counted.
        rig.write(RDLEN, 8 * 16);
        rig.write(RDT, 7);
        rig.mem
            .write_obj(0xffff_ffff_0000u64, GuestAddress(RX_RING))
            .unwrap();
        assert_eq!(
            rig.card.receive(&frame),
            ReceiveOutcome::Dropped(DropReason::DmaError)
        );
        assert_eq!(rig.rx_descriptor(0).3 & RXD_ERR_RXE, RXD_ERR_RXE);
        // Oversized and runt receive.
        let big = vec![0u8; 3000];
        assert_eq!(
            rig.card.receive(&big),
            ReceiveOutcome::Dropped(DropReason::TooLong)
        );
        assert_eq!(
            rig.card.receive(&[1, 2, 3]),
            ReceiveOutcome::Dropped(DropReason::Runt)
        );
        assert_eq!(rig.read(ROC), 1);
        let dropped = rig.card.counters().rx_dropped;
        assert_eq!(dropped, 6);

        // Transmit: huge legacy length, buffers outside RAM, truncated frames, huge
        // extended lengths, TDT out of range, a ring full of non-EOP descriptors.
        let before = rig.card.counters().tx_dropped;
        rig.put_tx(0xffff_ffff_ffff_0000, 100 | TXD_CMD_EOP, 0);
        rig.put_tx(TX_BUFFERS, 10 | TXD_CMD_EOP, 0);
        rig.put_tx(
            TX_BUFFERS,
            0xf_ffff | TXD_CMD_DEXT | TXD_DTYP_DATA << 20 | TXD_CMD_EOP,
            0,
        );
        for _ in 0..3 {
            rig.put_tx(TX_BUFFERS, 0xffff, 0);
        }
        rig.put_tx(TX_BUFFERS, 0xffff | TXD_CMD_EOP, 0);
        rig.kick_tx();
        assert!(rig.sink.is_empty());
        assert_eq!(rig.card.counters().tx_dropped, before + 4);
        rig.write(TDT, 5000);
        assert_eq!(rig.read(TDH), rig.tx_tail);
        // TSO with garbage context: dropped, no panic.
        rig.put_tx(
            u64::MAX,
            TXD_CMD_DEXT | TXD_CMD_TCP | TXD_CMD_TSE,
            0xffff_ff00,
        );
        rig.put_tx(
            TX_BUFFERS,
            100 | TXD_CMD_DEXT | TXD_DTYP_DATA << 20 | TXD_CMD_TSE | TXD_CMD_EOP,
            0,
        );
        rig.kick_tx();
        assert!(rig.sink.is_empty());
        // Transmit ring outside RAM.
        rig.write(TDBAL, 0xffff_f000);
        rig.write(TDBAH, 0xffff);
        rig.write(TDT, 3);
        assert!(rig.sink.is_empty());
    }

    #[test]
    fn transmit_flood_is_bounded_per_doorbell() {
        let mut rig = Rig::new();
        rig.bring_up(8, 0);
        let frame = udp_frame(OTHER, MAC, 50);
        rig.mem
            .write_slice(&frame, GuestAddress(TX_BUFFERS))
            .unwrap();
        for _ in 0..63 {
            rig.put_tx(TX_BUFFERS, frame.len() as u32 | TXD_CMD_EOP | TXD_CMD_RS, 0);
        }
        rig.kick_tx();
        assert_eq!(rig.sink.take().len(), 63);
        assert_eq!(rig.read(TDH), 63);
        // Again around the ring, from the descriptors still there.
        // Descriptor 63 was never filled (zero length, no EOP): it joins the frame of
        // descriptor 0, so 63 descriptors give 62 frames.
        rig.write(TDT, 62);
        assert_eq!(rig.sink.take().len(), 62);
        assert_eq!(rig.read(TDH), 62);
    }

    #[test]
    fn transmit_work_per_doorbell_is_budgeted_and_resumed_by_timer() {
        let mut rig = Rig::new();
        rig.bring_up(8, 0);
        let frame = udp_frame(OTHER, MAC, 16000);
        rig.mem
            .write_slice(&frame, GuestAddress(TX_BUFFERS))
            .unwrap();
        for _ in 0..63 {
            rig.put_tx(TX_BUFFERS, frame.len() as u32 | TXD_CMD_EOP | TXD_CMD_RS, 0);
        }
        rig.kick_tx();
        let first = rig.sink.take().len();
        assert!(first > 0 && first < 63, "{first} frames in the first pass");
        assert_eq!(rig.read(TDH) as usize, first);
        let deadline = rig.card.next_deadline_ns().unwrap();
        let mut total = first;
        for _ in 0..10 {
            rig.card.on_timer(deadline);
            total += rig.sink.take().len();
        }
        assert_eq!(total, 63);
        assert_eq!(rig.read(TDH), 63);
        assert_eq!(rig.card.next_deadline_ns(), None);
    }

    #[test]
    fn random_register_garbage_never_panics() {
        let mut rig = Rig::new();
        rig.bring_up(8, 0);
        let mut rng = TestRng(0x1000e);
        let frame = udp_frame(MAC, OTHER, 64);
        let interesting = [
            CTRL, EECD, EERD, MDIC, ICR, ICS, IMS, IMC, ITR, RCTL, TCTL, RDBAL, RDBAH, RDLEN, RDH,
            RDT, TDBAL, TDBAH, TDLEN, TDH, TDT, RXCSUM, VET, 0x0018,
        ];
        for i in 0..20_000u32 {
            let offset = if rng.next().is_multiple_of(2) {
                interesting[(rng.next() % interesting.len() as u64) as usize]
            } else {
                (rng.next() % MMIO_BAR_SIZE) as usize
            };
            let value = rng.next() as u32;
            // Keep RST rare so that state can build up.
            let value = if offset == CTRL && value & CTRL_RST != 0 && !i.is_multiple_of(7) {
                value & !CTRL_RST
            } else {
                value
            };
            match rng.next() % 4 {
                0 => {
                    rig.read(offset);
                }
                1 => rig.write(offset, value),
                2 => rig
                    .card
                    .bar_write(BAR_IO, rng.next() % 8, &value.to_le_bytes()[..2]),
                _ => {
                    rig.card.receive(&frame);
                    rig.clock.advance_ns(rng.next() % 100_000);
                    let now = rig.clock.monotonic_ns();
                    rig.card.on_timer(now);
                }
            }
            // Also garbage in the rings themselves.
            let addr = (rng.next() % (MEM_SIZE as u64 - 8)) & !7;
            if i.is_multiple_of(5) {
                rig.mem.write_obj(rng.next(), GuestAddress(addr)).unwrap();
            }
        }
        let state = rig.card.state();
        rig.card.restore(state.clone()).unwrap();
        assert_eq!(rig.card.state(), state);
    }

    #[test]
    fn restore_rejects_damaged_state() {
        let mut rig = Rig::new();
        let mut state = rig.card.state();
        state.regs.truncate(10);
        assert!(matches!(
            rig.card.restore(state),
            Err(E1000Error::BadLength { .. })
        ));
    }
}
