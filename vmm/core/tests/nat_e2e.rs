//! End to end without KVM: the real card models (e1000, RTL8139 in C+ mode) in guest RAM,
//! the user-mode NAT backend on its thread, and this test playing the guest's driver and
//! IP stack: ring setup as Linux does it, DHCP DISCOVER/OFFER/REQUEST/ACK, a TCP
//! connection to a server on the host's loopback through 10.0.2.2, a host-to-guest port
//! forward, a forward that cannot bind, and malformed frames from the guest.
//!
//! Every frame the "guest" sends is built here byte by byte (Ethernet/IPv4/UDP/TCP/BOOTP)
//! and every frame it receives comes out of the receive ring in guest memory.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::config::PortForward;
use vmm::net::{NatConfig, NetBackend, NetError};
use vmm_devices::clock::ManualClock;
use vmm_devices::e1000::E1000;
use vmm_devices::irq::CountingIrq;
use vmm_devices::net::{
    fill_ipv4_header_checksum, fill_l4_checksum, parse_ip, verify_checksums, NetworkCard,
};
use vmm_devices::pci::{
    PciFunction, COMMAND_BUS_MASTER, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE, REG_COMMAND,
};
use vmm_devices::rtl8139::Rtl8139;
use vmm_devices::virtio_net::VirtioNet;
use vmm_devices::virtio_pci::{NoMsi, VirtioPciMode};

const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
const MEM_SIZE: usize = 4 << 20;
const WAIT: Duration = Duration::from_secs(10);

// ---- the guest's drivers ----

/// What the test's "guest" needs from a card driver.
trait GuestDriver {
    fn mac(&self) -> [u8; 6];
    /// Puts one frame on the transmit ring and rings the doorbell.
    fn transmit(&mut self, frame: &[u8]);
    /// The next received frame (without FCS), giving its buffer back to the card.
    fn poll_receive(&mut self) -> Option<Vec<u8>>;
}

/// Intel e1000 driven as Linux's e1000 driver does (legacy descriptors).
struct E1000Driver {
    card: Arc<Mutex<E1000>>,
    mem: GuestMemoryMmap,
    mac: [u8; 6],
    rx_next: u64,
    tx_tail: u64,
}

mod e1000_regs {
    pub const CTRL: u64 = 0x0000;
    pub const CTRL_SLU: u32 = 1 << 6;
    pub const CTRL_RST: u32 = 1 << 26;
    pub const ICR: u64 = 0x00c0;
    pub const IMS: u64 = 0x00d0;
    pub const IMC: u64 = 0x00d8;
    pub const RCTL: u64 = 0x0100;
    pub const RCTL_EN: u32 = 1 << 1;
    pub const RCTL_BAM: u32 = 1 << 15;
    pub const RCTL_SECRC: u32 = 1 << 26;
    pub const TCTL: u64 = 0x0400;
    pub const TCTL_EN: u32 = 1 << 1;
    pub const TCTL_PSP: u32 = 1 << 3;
    pub const RDBAL: u64 = 0x2800;
    pub const RDBAH: u64 = 0x2804;
    pub const RDLEN: u64 = 0x2808;
    pub const RDH: u64 = 0x2810;
    pub const RDT: u64 = 0x2818;
    pub const TDBAL: u64 = 0x3800;
    pub const TDBAH: u64 = 0x3804;
    pub const TDLEN: u64 = 0x3808;
    pub const TDH: u64 = 0x3810;
    pub const TDT: u64 = 0x3818;
    pub const TXD_CMD_EOP: u32 = 1 << 24;
    pub const TXD_CMD_IFCS: u32 = 1 << 25;
    pub const TXD_CMD_RS: u32 = 1 << 27;
    pub const RXD_STAT_DD: u8 = 1 << 0;
    pub const RX_RING: u64 = 0x10000;
    pub const TX_RING: u64 = 0x20000;
    pub const RX_BUFFERS: u64 = 0x100000;
    pub const TX_BUFFERS: u64 = 0x200000;
    pub const RX_DESCRIPTORS: u64 = 32;
    pub const TX_DESCRIPTORS: u64 = 64;
    pub const BUFFER_SIZE: u64 = 2048;
}

impl E1000Driver {
    fn write(&self, offset: u64, value: u32) {
        self.card.lock().unwrap().bar_write(
            vmm_devices::e1000::BAR_MMIO,
            offset,
            &value.to_le_bytes(),
        );
    }

    fn read(&self, offset: u64) -> u32 {
        let mut bytes = [0u8; 4];
        self.card
            .lock()
            .unwrap()
            .bar_read(vmm_devices::e1000::BAR_MMIO, offset, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    /// e1000_reset + e1000_configure_rx/tx + e1000_open.
    fn bring_up(card: Arc<Mutex<E1000>>, mem: GuestMemoryMmap, mac: [u8; 6]) -> Self {
        use e1000_regs::*;
        card.lock().unwrap().config_write(
            REG_COMMAND,
            0,
            &(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER).to_le_bytes(),
        );
        let driver = Self {
            card,
            mem,
            mac,
            rx_next: 0,
            tx_tail: 0,
        };
        driver.write(CTRL, CTRL_RST);
        driver.write(CTRL, CTRL_SLU);
        driver.write(IMC, 0xffff_ffff);
        driver.read(ICR);
        for i in 0..RX_DESCRIPTORS {
            let descriptor = RX_RING + i * 16;
            driver
                .mem
                .write_obj(RX_BUFFERS + i * BUFFER_SIZE, GuestAddress(descriptor))
                .unwrap();
            driver
                .mem
                .write_obj(0u64, GuestAddress(descriptor + 8))
                .unwrap();
        }
        driver.write(RDBAL, RX_RING as u32);
        driver.write(RDBAH, 0);
        driver.write(RDLEN, (RX_DESCRIPTORS * 16) as u32);
        driver.write(RDH, 0);
        driver.write(RDT, (RX_DESCRIPTORS - 1) as u32);
        driver.write(TDBAL, TX_RING as u32);
        driver.write(TDBAH, 0);
        driver.write(TDLEN, (TX_DESCRIPTORS * 16) as u32);
        driver.write(TDH, 0);
        driver.write(TDT, 0);
        driver.write(TCTL, TCTL_EN | TCTL_PSP);
        driver.write(RCTL, RCTL_EN | RCTL_BAM | RCTL_SECRC);
        driver.write(IMS, 0x9d);
        driver
    }
}

impl GuestDriver for E1000Driver {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn transmit(&mut self, frame: &[u8]) {
        use e1000_regs::*;
        let buffer = TX_BUFFERS + self.tx_tail * BUFFER_SIZE;
        self.mem.write_slice(frame, GuestAddress(buffer)).unwrap();
        let descriptor = TX_RING + self.tx_tail * 16;
        let lower = frame.len() as u32 | TXD_CMD_EOP | TXD_CMD_IFCS | TXD_CMD_RS;
        self.mem
            .write_obj(buffer, GuestAddress(descriptor))
            .unwrap();
        self.mem
            .write_obj(lower, GuestAddress(descriptor + 8))
            .unwrap();
        self.mem
            .write_obj(0u32, GuestAddress(descriptor + 12))
            .unwrap();
        self.tx_tail = (self.tx_tail + 1) % TX_DESCRIPTORS;
        self.write(TDT, self.tx_tail as u32);
    }

    fn poll_receive(&mut self) -> Option<Vec<u8>> {
        use e1000_regs::*;
        let descriptor = RX_RING + self.rx_next * 16;
        let status: u8 = self.mem.read_obj(GuestAddress(descriptor + 12)).unwrap();
        if status & RXD_STAT_DD == 0 {
            return None;
        }
        let len: u16 = self.mem.read_obj(GuestAddress(descriptor + 8)).unwrap();
        let mut frame = vec![0u8; usize::from(len)];
        self.mem
            .read_slice(
                &mut frame,
                GuestAddress(RX_BUFFERS + self.rx_next * BUFFER_SIZE),
            )
            .unwrap();
        self.mem
            .write_obj(0u64, GuestAddress(descriptor + 8))
            .unwrap();
        // As Linux: the tail moves onto the descriptor just cleaned.
        self.write(RDT, self.rx_next as u32);
        self.rx_next = (self.rx_next + 1) % RX_DESCRIPTORS;
        Some(frame)
    }
}

/// RTL8139C+ driven as Linux's 8139cp does (C+ descriptor rings). Receive buffers are given
/// back by setting OWN only, with no register write (the backend must retry on its own).
struct Rtl8139Driver {
    card: Arc<Mutex<Rtl8139>>,
    mem: GuestMemoryMmap,
    mac: [u8; 6],
    rx_next: u64,
    tx_next: u64,
}

mod rtl_regs {
    pub const TNPDS: u64 = 0x20;
    pub const CR: u64 = 0x37;
    pub const CR_RST: u8 = 1 << 4;
    pub const CR_RE: u8 = 1 << 3;
    pub const CR_TE: u8 = 1 << 2;
    pub const IMR: u64 = 0x3c;
    pub const RCR: u64 = 0x44;
    pub const RCR_APM: u32 = 1 << 1;
    pub const RCR_AB: u32 = 1 << 3;
    pub const TPPOLL: u64 = 0xd9;
    pub const TPPOLL_NPQ: u8 = 1 << 6;
    pub const CPCR: u64 = 0xe0;
    pub const CPCR_TX_ENABLE: u16 = 1 << 0;
    pub const CPCR_RX_ENABLE: u16 = 1 << 1;
    pub const CPCR_RX_CHECKSUM: u16 = 1 << 5;
    pub const RDSAR: u64 = 0xe4;
    pub const DESC_OWN: u32 = 1 << 31;
    pub const DESC_EOR: u32 = 1 << 30;
    pub const DESC_FS: u32 = 1 << 29;
    pub const DESC_LS: u32 = 1 << 28;
    pub const RX_LEN_MASK: u32 = 0x1fff;
    pub const TX_RING: u64 = 0x50000;
    pub const RX_RING: u64 = 0x51000;
    pub const RX_BUFFERS: u64 = 0x100000;
    pub const TX_BUFFERS: u64 = 0x200000;
    pub const RX_DESCRIPTORS: u64 = 16;
    pub const TX_DESCRIPTORS: u64 = 16;
    pub const BUFFER_SIZE: u64 = 0x800;
    pub const RX_BUFFER_LEN: u32 = 1536;
}

impl Rtl8139Driver {
    fn w8(&self, offset: u64, value: u8) {
        self.card
            .lock()
            .unwrap()
            .bar_write(vmm_devices::rtl8139::BAR_IO, offset, &[value]);
    }
    fn w16(&self, offset: u64, value: u16) {
        self.card.lock().unwrap().bar_write(
            vmm_devices::rtl8139::BAR_IO,
            offset,
            &value.to_le_bytes(),
        );
    }
    fn w32(&self, offset: u64, value: u32) {
        self.card.lock().unwrap().bar_write(
            vmm_devices::rtl8139::BAR_IO,
            offset,
            &value.to_le_bytes(),
        );
    }

    fn give_rx(&self, index: u64) {
        use rtl_regs::*;
        let eor = if index + 1 == RX_DESCRIPTORS {
            DESC_EOR
        } else {
            0
        };
        let descriptor = RX_RING + index * 16;
        self.mem
            .write_obj(0u32, GuestAddress(descriptor + 4))
            .unwrap();
        self.mem
            .write_obj(
                RX_BUFFERS + index * BUFFER_SIZE,
                GuestAddress(descriptor + 8),
            )
            .unwrap();
        self.mem
            .write_obj(DESC_OWN | eor | RX_BUFFER_LEN, GuestAddress(descriptor))
            .unwrap();
    }

    /// cp_init_rings + cp_start_hw.
    fn bring_up(card: Arc<Mutex<Rtl8139>>, mem: GuestMemoryMmap, mac: [u8; 6]) -> Self {
        use rtl_regs::*;
        card.lock().unwrap().config_write(
            REG_COMMAND,
            0,
            &(COMMAND_IO_SPACE | COMMAND_BUS_MASTER).to_le_bytes(),
        );
        let driver = Self {
            card,
            mem,
            mac,
            rx_next: 0,
            tx_next: 0,
        };
        driver.w8(CR, CR_RST);
        driver.w16(CPCR, CPCR_TX_ENABLE | CPCR_RX_ENABLE | CPCR_RX_CHECKSUM);
        for i in 0..RX_DESCRIPTORS {
            driver.give_rx(i);
        }
        driver.w32(RDSAR, RX_RING as u32);
        driver.w32(RDSAR + 4, 0);
        driver.w32(TNPDS, TX_RING as u32);
        driver.w32(TNPDS + 4, 0);
        driver.w8(CR, CR_RE | CR_TE);
        driver.w32(RCR, RCR_APM | RCR_AB);
        driver.w16(IMR, 0x80ff);
        driver
    }
}

impl GuestDriver for Rtl8139Driver {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn transmit(&mut self, frame: &[u8]) {
        use rtl_regs::*;
        let buffer = TX_BUFFERS + self.tx_next * BUFFER_SIZE;
        self.mem.write_slice(frame, GuestAddress(buffer)).unwrap();
        let descriptor = TX_RING + self.tx_next * 16;
        let eor = if self.tx_next + 1 == TX_DESCRIPTORS {
            DESC_EOR
        } else {
            0
        };
        self.mem
            .write_obj(0u32, GuestAddress(descriptor + 4))
            .unwrap();
        self.mem
            .write_obj(buffer, GuestAddress(descriptor + 8))
            .unwrap();
        self.mem
            .write_obj(
                DESC_OWN | eor | DESC_FS | DESC_LS | frame.len() as u32,
                GuestAddress(descriptor),
            )
            .unwrap();
        self.tx_next = (self.tx_next + 1) % TX_DESCRIPTORS;
        self.w8(TPPOLL, TPPOLL_NPQ);
    }

    fn poll_receive(&mut self) -> Option<Vec<u8>> {
        use rtl_regs::*;
        let descriptor = RX_RING + self.rx_next * 16;
        let opts1: u32 = self.mem.read_obj(GuestAddress(descriptor)).unwrap();
        if opts1 & DESC_OWN != 0 {
            return None;
        }
        let len = (opts1 & RX_LEN_MASK) as usize;
        assert!(len >= 4 + 14, "frame of {len} bytes with FCS");
        let mut frame = vec![0u8; len - 4];
        self.mem
            .read_slice(
                &mut frame,
                GuestAddress(RX_BUFFERS + self.rx_next * BUFFER_SIZE),
            )
            .unwrap();
        self.give_rx(self.rx_next);
        self.rx_next = (self.rx_next + 1) % RX_DESCRIPTORS;
        Some(frame)
    }
}

/// virtio-net driven through the legacy (virtio 0.9.5) interface in BAR0, as Linux's
/// `virtio_net` does on a transitional device without VERSION_1: MAC feature only, a
/// 10-byte header, one writable buffer per receive chain, header + frame chained on transmit.
struct VirtioNetDriver {
    card: Arc<Mutex<VirtioNet>>,
    mem: GuestMemoryMmap,
    mac: [u8; 6],
    rx_last_used: u16,
    rx_avail: u16,
    tx_avail: u16,
}

mod virtio_regs {
    pub const GUEST_FEATURES: u64 = 4;
    pub const QUEUE_PFN: u64 = 8;
    pub const QUEUE_SIZE: u64 = 12;
    pub const QUEUE_SELECT: u64 = 14;
    pub const QUEUE_NOTIFY: u64 = 16;
    pub const STATUS: u64 = 18;
    pub const FEATURE_MAC: u32 = 1 << 5;
    pub const DESC_F_NEXT: u16 = 1;
    pub const DESC_F_WRITE: u16 = 2;
    pub const HEADER_LEN: usize = 10;
    pub const RX_QUEUE_BASE: u64 = 0x60000;
    pub const TX_QUEUE_BASE: u64 = 0x70000;
    pub const RX_BUFFERS: u64 = 0x100000;
    pub const TX_BUFFERS: u64 = 0x200000;
    pub const BUFFER_SIZE: u64 = 0x800;
    pub const RX_CHAINS: u16 = 32;
    /// Transmit chains in flight (two descriptors each).
    pub const TX_CHAINS: u16 = 64;
}

impl VirtioNetDriver {
    fn write(&self, offset: u64, data: &[u8]) {
        self.card
            .lock()
            .unwrap()
            .bar_write(vmm_devices::virtio_pci::BAR_LEGACY, offset, data);
    }

    fn read16(&self, offset: u64) -> u16 {
        let mut bytes = [0u8; 2];
        self.card
            .lock()
            .unwrap()
            .bar_read(vmm_devices::virtio_pci::BAR_LEGACY, offset, &mut bytes);
        u16::from_le_bytes(bytes)
    }

    fn queue_size(&self) -> u64 {
        u64::from(vmm_devices::virtio_net::QUEUE_SIZE)
    }

    fn used_ring(&self, base: u64) -> u64 {
        let avail = base + 16 * self.queue_size();
        (avail + 6 + 2 * self.queue_size()).next_multiple_of(4096)
    }

    fn put_descriptor(&self, base: u64, index: u16, address: u64, len: u32, flags: u16, next: u16) {
        let d = base + 16 * u64::from(index);
        self.mem.write_obj(address, GuestAddress(d)).unwrap();
        self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
    }

    /// Appends a chain head to a queue's available ring (index published after the entry).
    fn publish(&self, base: u64, avail_index: &mut u16, head: u16) {
        let avail = base + 16 * self.queue_size();
        let slot = u64::from(*avail_index) % self.queue_size();
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        *avail_index = avail_index.wrapping_add(1);
        self.mem
            .write_obj(*avail_index, GuestAddress(avail + 2))
            .unwrap();
    }

    fn post_rx(&mut self, index: u16) {
        use virtio_regs::*;
        self.put_descriptor(
            RX_QUEUE_BASE,
            index,
            RX_BUFFERS + u64::from(index) * BUFFER_SIZE,
            BUFFER_SIZE as u32,
            DESC_F_WRITE,
            0,
        );
        let mut avail = self.rx_avail;
        self.publish(RX_QUEUE_BASE, &mut avail, index);
        self.rx_avail = avail;
    }

    /// virtio_dev_probe + virtnet_probe + init_vqs + try_fill_recv (legacy transport).
    fn bring_up(card: Arc<Mutex<VirtioNet>>, mem: GuestMemoryMmap, mac: [u8; 6]) -> Self {
        use virtio_regs::*;
        card.lock().unwrap().config_write(
            REG_COMMAND,
            0,
            &(COMMAND_IO_SPACE | COMMAND_BUS_MASTER).to_le_bytes(),
        );
        let mut driver = Self {
            card,
            mem,
            mac,
            rx_last_used: 0,
            rx_avail: 0,
            tx_avail: 0,
        };
        driver.write(STATUS, &[0]);
        driver.write(STATUS, &[1]);
        driver.write(STATUS, &[1 | 2]);
        driver.write(GUEST_FEATURES, &FEATURE_MAC.to_le_bytes());
        for (queue, base) in [(0u16, RX_QUEUE_BASE), (1, TX_QUEUE_BASE)] {
            driver.write(QUEUE_SELECT, &queue.to_le_bytes());
            assert_eq!(u64::from(driver.read16(QUEUE_SIZE)), driver.queue_size());
            driver.write(QUEUE_PFN, &((base >> 12) as u32).to_le_bytes());
        }
        driver.write(STATUS, &[1 | 2 | 4]);
        for index in 0..RX_CHAINS {
            driver.post_rx(index);
        }
        driver.write(QUEUE_NOTIFY, &0u16.to_le_bytes());
        driver
    }
}

impl GuestDriver for VirtioNetDriver {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn transmit(&mut self, frame: &[u8]) {
        use virtio_regs::*;
        let slot = self.tx_avail % TX_CHAINS;
        let header = TX_BUFFERS + u64::from(slot) * BUFFER_SIZE;
        self.mem
            .write_slice(&[0; HEADER_LEN], GuestAddress(header))
            .unwrap();
        self.mem
            .write_slice(frame, GuestAddress(header + HEADER_LEN as u64))
            .unwrap();
        let head = slot * 2;
        self.put_descriptor(
            TX_QUEUE_BASE,
            head,
            header,
            HEADER_LEN as u32,
            DESC_F_NEXT,
            head + 1,
        );
        self.put_descriptor(
            TX_QUEUE_BASE,
            head + 1,
            header + HEADER_LEN as u64,
            frame.len() as u32,
            0,
            0,
        );
        let mut avail = self.tx_avail;
        self.publish(TX_QUEUE_BASE, &mut avail, head);
        self.tx_avail = avail;
        self.write(QUEUE_NOTIFY, &1u16.to_le_bytes());
    }

    fn poll_receive(&mut self) -> Option<Vec<u8>> {
        use virtio_regs::*;
        let used = self.used_ring(RX_QUEUE_BASE);
        let used_index: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        if used_index == self.rx_last_used {
            return None;
        }
        let slot = u64::from(self.rx_last_used) % self.queue_size();
        let id: u32 = self
            .mem
            .read_obj(GuestAddress(used + 4 + 8 * slot))
            .unwrap();
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(used + 8 + 8 * slot))
            .unwrap();
        self.rx_last_used = self.rx_last_used.wrapping_add(1);
        let id = u16::try_from(id).unwrap();
        assert!(id < RX_CHAINS, "used id {id}");
        let len = len as usize;
        assert!(len >= HEADER_LEN + 14, "used length {len}");
        let mut frame = vec![0u8; len - HEADER_LEN];
        self.mem
            .read_slice(
                &mut frame,
                GuestAddress(RX_BUFFERS + u64::from(id) * BUFFER_SIZE + HEADER_LEN as u64),
            )
            .unwrap();
        self.post_rx(id);
        self.write(QUEUE_NOTIFY, &0u16.to_le_bytes());
        Some(frame)
    }
}

// ---- building the guest's frames ----

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Ethernet + IPv4 (+ the transport bytes given), with correct IP and L4 checksums.
fn ipv4_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    transport: &[u8],
) -> Vec<u8> {
    let total = 20 + transport.len();
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0x12,
        0x34,
        0x40,
        0,
        64,
        protocol,
        0,
        0,
    ];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(transport);
    let mut frame = ethernet(dst_mac, src_mac, 0x0800, &ip);
    let info = parse_ip(&frame).unwrap();
    fill_ipv4_header_checksum(&mut frame, &info).unwrap();
    // TCP/UDP only; a transport header cut too short keeps its (bogus) bytes.
    let _ = fill_l4_checksum(&mut frame, &info);
    frame
}

fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut udp = Vec::with_capacity(len);
    udp.extend_from_slice(&src.1.to_be_bytes());
    udp.extend_from_slice(&dst.1.to_be_bytes());
    udp.extend_from_slice(&(len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    ipv4_frame(dst_mac, src_mac, src.0, dst.0, 17, &udp)
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

#[allow(clippy::too_many_arguments)]
fn tcp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&src.1.to_be_bytes());
    tcp.extend_from_slice(&dst.1.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    ipv4_frame(dst_mac, src_mac, src.0, dst.0, 6, &tcp)
}

const DHCP_DISCOVER: u8 = 1;
const DHCP_OFFER: u8 = 2;
const DHCP_REQUEST: u8 = 3;
const DHCP_ACK: u8 = 5;

/// A DHCP client message as Linux's dhclient sends it (broadcast, from 0.0.0.0).
fn dhcp_frame(mac: [u8; 6], xid: u32, kind: u8, request: Option<(Ipv4Addr, Ipv4Addr)>) -> Vec<u8> {
    let mut bootp = vec![0u8; 236];
    bootp[0] = 1; // BOOTREQUEST
    bootp[1] = 1; // Ethernet
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&xid.to_be_bytes());
    bootp[28..34].copy_from_slice(&mac);
    bootp.extend_from_slice(&[99, 130, 83, 99]);
    bootp.extend_from_slice(&[53, 1, kind]);
    if let Some((address, server)) = request {
        bootp.extend_from_slice(&[50, 4]);
        bootp.extend_from_slice(&address.octets());
        bootp.extend_from_slice(&[54, 4]);
        bootp.extend_from_slice(&server.octets());
    }
    bootp.extend_from_slice(&[55, 5, 1, 3, 6, 15, 67]);
    bootp.push(255);
    bootp.resize(300, 0);
    udp_frame(
        [0xff; 6],
        mac,
        (Ipv4Addr::UNSPECIFIED, 68),
        (Ipv4Addr::BROADCAST, 67),
        &bootp,
    )
}

// ---- reading the frames the guest receives ----

struct Ipv4Packet<'a> {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    transport: &'a [u8],
}

fn parse_ipv4(frame: &[u8]) -> Option<Ipv4Packet<'_>> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let info = parse_ip(frame)?;
    let header = frame.get(14..34)?;
    Some(Ipv4Packet {
        src: Ipv4Addr::new(header[12], header[13], header[14], header[15]),
        dst: Ipv4Addr::new(header[16], header[17], header[18], header[19]),
        protocol: info.protocol,
        transport: frame.get(info.l4_offset..info.ip_end)?,
    })
}

struct DhcpReply {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    xid: u32,
    yiaddr: Ipv4Addr,
    file: String,
    options: Vec<(u8, Vec<u8>)>,
}

impl DhcpReply {
    fn option(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }
    fn message_type(&self) -> Option<u8> {
        self.option(53).and_then(|v| v.first().copied())
    }
}

fn parse_dhcp(frame: &[u8]) -> Option<DhcpReply> {
    let ip = parse_ipv4(frame)?;
    if ip.protocol != 17 || ip.transport.get(0..4)? != [0, 67, 0, 68] {
        return None;
    }
    let bootp = ip.transport.get(8..)?;
    if *bootp.first()? != 2 || bootp.get(236..240)? != [99, 130, 83, 99] {
        return None;
    }
    let file_bytes = bootp.get(108..236)?;
    let file_len = file_bytes.iter().position(|b| *b == 0).unwrap_or(128);
    let mut options = Vec::new();
    let mut rest = bootp.get(240..)?;
    while let Some((&code, tail)) = rest.split_first() {
        match code {
            0 => rest = tail,
            255 => break,
            _ => {
                let (&len, tail) = tail.split_first()?;
                let value = tail.get(..usize::from(len))?;
                options.push((code, value.to_vec()));
                rest = tail.get(usize::from(len)..)?;
            }
        }
    }
    Some(DhcpReply {
        dst_mac: frame[0..6].try_into().ok()?,
        src_mac: frame[6..12].try_into().ok()?,
        xid: u32::from_be_bytes(bootp.get(4..8)?.try_into().ok()?),
        yiaddr: Ipv4Addr::new(bootp[16], bootp[17], bootp[18], bootp[19]),
        file: String::from_utf8_lossy(&file_bytes[..file_len]).into_owned(),
        options,
    })
}

#[derive(Debug)]
struct TcpSegment {
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    seq: u32,
    ack: u32,
    flags: u8,
    payload: Vec<u8>,
}

fn parse_tcp(frame: &[u8]) -> Option<TcpSegment> {
    let ip = parse_ipv4(frame)?;
    if ip.protocol != 6 {
        return None;
    }
    let t = ip.transport;
    let offset = usize::from(*t.get(12)? >> 4) * 4;
    Some(TcpSegment {
        src: (ip.src, u16::from_be_bytes([t[0], t[1]])),
        dst: (ip.dst, u16::from_be_bytes([t[2], t[3]])),
        seq: u32::from_be_bytes(t.get(4..8)?.try_into().ok()?),
        ack: u32::from_be_bytes(t.get(8..12)?.try_into().ok()?),
        flags: *t.get(13)?,
        payload: t.get(offset..)?.to_vec(),
    })
}

// ---- the guest ----

struct Guest<D: GuestDriver> {
    driver: D,
    backend: NetBackend,
    /// The NAT's MAC (learned from its DHCP answers).
    gateway_mac: [u8; 6],
}

impl<D: GuestDriver> Guest<D> {
    /// Receives frames until one satisfies `select`, answering ARP requests for the guest
    /// address on the way (as a guest stack would).
    fn wait_for<T>(&mut self, what: &str, mut select: impl FnMut(&[u8]) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.driver.poll_receive() {
                Some(frame) => {
                    // Everything the NAT sends is well formed.
                    let checks = verify_checksums(&frame);
                    assert_ne!(checks.ipv4_header, Some(false), "bad IP checksum");
                    assert_ne!(checks.tcp, Some(false), "bad TCP checksum");
                    assert_ne!(checks.udp, Some(false), "bad UDP checksum");
                    if self.answer_arp(&frame) {
                        continue;
                    }
                    if let Some(found) = select(&frame) {
                        return found;
                    }
                }
                None => {
                    assert!(
                        Instant::now() < deadline,
                        "timed out waiting for {what}; backend {:?}",
                        self.backend.stats()
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    fn answer_arp(&mut self, frame: &[u8]) -> bool {
        if frame.get(12..14) != Some(&[0x08, 0x06][..]) {
            return false;
        }
        let Some(arp) = frame.get(14..42) else {
            return true;
        };
        // Request (op 1) for our address.
        if arp[6..8] == [0, 1] && arp[24..28] == GUEST_IP.octets() {
            let requester_mac: [u8; 6] = arp[8..14].try_into().unwrap();
            let mut reply = vec![0, 1, 8, 0, 6, 4, 0, 2];
            reply.extend_from_slice(&self.driver.mac());
            reply.extend_from_slice(&GUEST_IP.octets());
            reply.extend_from_slice(&arp[8..18]);
            let frame = ethernet(requester_mac, self.driver.mac(), 0x0806, &reply);
            self.driver.transmit(&frame);
        }
        true
    }

    /// DISCOVER → OFFER → REQUEST → ACK; returns the OFFER and the ACK.
    fn dhcp(&mut self, xid: u32) -> (DhcpReply, DhcpReply) {
        let mac = self.driver.mac();
        self.driver
            .transmit(&dhcp_frame(mac, xid, DHCP_DISCOVER, None));
        let offer = self.wait_for("DHCP OFFER", |f| {
            parse_dhcp(f).filter(|d| d.xid == xid && d.message_type() == Some(DHCP_OFFER))
        });
        assert_eq!(offer.yiaddr, GUEST_IP);
        assert_eq!(offer.option(1), Some(&[255, 255, 255, 0][..]), "netmask");
        assert_eq!(offer.option(3), Some(&GATEWAY_IP.octets()[..]), "router");
        assert_eq!(offer.option(6), Some(&DNS_IP.octets()[..]), "DNS");
        assert_eq!(
            offer.option(54),
            Some(&GATEWAY_IP.octets()[..]),
            "server id"
        );
        let server = Ipv4Addr::new(10, 0, 2, 2);
        self.driver.transmit(&dhcp_frame(
            mac,
            xid,
            DHCP_REQUEST,
            Some((offer.yiaddr, server)),
        ));
        let ack = self.wait_for("DHCP ACK", |f| {
            parse_dhcp(f).filter(|d| d.xid == xid && d.message_type() == Some(DHCP_ACK))
        });
        assert_eq!(ack.yiaddr, GUEST_IP);
        self.gateway_mac = ack.src_mac;
        (offer, ack)
    }

    fn tcp_send(
        &mut self,
        local_port: u16,
        remote: (Ipv4Addr, u16),
        seq: u32,
        ack: u32,
        flags: u8,
        payload: &[u8],
    ) {
        let frame = tcp_frame(
            self.gateway_mac,
            self.driver.mac(),
            (GUEST_IP, local_port),
            remote,
            seq,
            ack,
            flags,
            payload,
        );
        self.driver.transmit(&frame);
    }

    /// Waits for a segment of the connection (local port, remote) matching `want`.
    fn tcp_wait(
        &mut self,
        what: &str,
        local_port: u16,
        remote: (Ipv4Addr, u16),
        mut want: impl FnMut(&TcpSegment) -> bool,
    ) -> TcpSegment {
        self.wait_for(what, |f| {
            parse_tcp(f).filter(|s| {
                s.dst == (GUEST_IP, local_port) && s.src == remote && {
                    assert_eq!(s.flags & TCP_RST, 0, "connection reset: {s:?}");
                    want(s)
                }
            })
        })
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

const E1000_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const RTL_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];

fn e1000_guest(config: &NatConfig) -> Result<Guest<E1000Driver>, NetError> {
    let mem = memory();
    let (sink, port) = NetBackend::channel()?;
    let card = Arc::new(Mutex::new(E1000::new(
        E1000_MAC,
        mem.clone(),
        CountingIrq::new(),
        sink,
        ManualClock::new(0),
        None,
    )));
    let driver = E1000Driver::bring_up(card.clone(), mem, E1000_MAC);
    let backend = NetBackend::start_nat(0, config, card, port)?;
    Ok(Guest {
        driver,
        backend,
        gateway_mac: [0xff; 6],
    })
}

fn rtl8139_guest(config: &NatConfig) -> Result<Guest<Rtl8139Driver>, NetError> {
    let mem = memory();
    let (sink, port) = NetBackend::channel()?;
    let card = Arc::new(Mutex::new(Rtl8139::new(
        RTL_MAC,
        mem.clone(),
        CountingIrq::new(),
        sink,
        ManualClock::new(0),
    )));
    let driver = Rtl8139Driver::bring_up(card.clone(), mem, RTL_MAC);
    let backend = NetBackend::start_nat(1, config, card, port)?;
    Ok(Guest {
        driver,
        backend,
        gateway_mac: [0xff; 6],
    })
}

const VIRTIO_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x58];

fn virtio_net_guest(config: &NatConfig) -> Result<Guest<VirtioNetDriver>, NetError> {
    let mem = memory();
    let (sink, port) = NetBackend::channel()?;
    let card = Arc::new(Mutex::new(VirtioNet::new(
        VIRTIO_MAC,
        mem.clone(),
        CountingIrq::new(),
        Arc::new(NoMsi),
        sink,
        ManualClock::new(0),
        VirtioPciMode::Transitional,
    )));
    let driver = VirtioNetDriver::bring_up(card.clone(), mem, VIRTIO_MAC);
    let backend = NetBackend::start_nat(2, config, card, port)?;
    Ok(Guest {
        driver,
        backend,
        gateway_mac: [0xff; 6],
    })
}

// ---- the scenarios, run for each card ----

fn dhcp_with_boot_file<D: GuestDriver>(guest: &mut Guest<D>) {
    let (offer, ack) = guest.dhcp(0x1234_5678);
    assert_eq!(offer.file, "pxelinux.0");
    assert_eq!(ack.file, "pxelinux.0");
    // The NAT answers from its own unicast MAC, to the broadcast or the guest's MAC.
    assert_eq!(offer.src_mac[0] & 1, 0);
    assert!(offer.dst_mac == [0xff; 6] || offer.dst_mac == guest.driver.mac());
    assert!(guest.backend.stats().from_guest >= 2);
    assert!(guest.backend.stats().to_guest >= 2);
}

/// The guest connects to a server on the host's loopback through 10.0.2.2, sends, gets an
/// answer, and both sides close.
fn tcp_to_host<D: GuestDriver>(guest: &mut Guest<D>) {
    guest.dhcp(0x0bad_cafe);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (report_tx, report_rx) = std::sync::mpsc::channel::<String>();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut request = [0u8; 16];
        stream.read_exact(&mut request).unwrap();
        report_tx
            .send(String::from_utf8_lossy(&request).into_owned())
            .unwrap();
        stream.write_all(b"hello from host").unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        report_tx
            .send(format!("eof after {} bytes", rest.len()))
            .unwrap();
    });

    let remote = (GATEWAY_IP, port);
    let local = 40000;
    let isn = 1000u32;
    guest.tcp_send(local, remote, isn, 0, TCP_SYN, &[]);
    let syn_ack = guest.tcp_wait("SYN-ACK", local, remote, |s| {
        s.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
    });
    assert_eq!(syn_ack.ack, isn + 1);
    let mut their_next = syn_ack.seq.wrapping_add(1);
    let mut our_next = isn + 1;
    guest.tcp_send(local, remote, our_next, their_next, TCP_ACK, &[]);
    guest.tcp_send(
        local,
        remote,
        our_next,
        their_next,
        TCP_ACK | TCP_PSH,
        b"hello from guest",
    );
    our_next += 16;
    assert_eq!(
        report_rx.recv_timeout(WAIT).unwrap(),
        "hello from guest",
        "what the host server read"
    );

    let mut answer = Vec::new();
    while answer.len() < 15 {
        let segment = guest.tcp_wait("the host's answer", local, remote, |s| {
            !s.payload.is_empty()
        });
        assert_eq!(segment.seq, their_next, "in order");
        answer.extend_from_slice(&segment.payload);
        their_next = their_next.wrapping_add(segment.payload.len() as u32);
        guest.tcp_send(local, remote, our_next, their_next, TCP_ACK, &[]);
    }
    assert_eq!(answer, b"hello from host");

    guest.tcp_send(local, remote, our_next, their_next, TCP_FIN | TCP_ACK, &[]);
    our_next += 1;
    assert_eq!(report_rx.recv_timeout(WAIT).unwrap(), "eof after 0 bytes");
    server.join().unwrap();
    let fin = guest.tcp_wait("the host's FIN", local, remote, |s| s.flags & TCP_FIN != 0);
    assert_eq!(fin.seq, their_next);
    assert_eq!(fin.ack, our_next, "our FIN acknowledged");
    guest.tcp_send(
        local,
        remote,
        our_next,
        their_next.wrapping_add(1),
        TCP_ACK,
        &[],
    );
}

/// A free port on 127.0.0.1 (bound and released; good enough for a test).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn forward_config(host_port: u16, guest_port: u16) -> NatConfig {
    NatConfig {
        forwards: vec![PortForward {
            protocol: "tcp".into(),
            host_address: "127.0.0.1".into(),
            host_port,
            guest_port,
        }],
        ..NatConfig::default()
    }
}

/// A host connection to the forwarded port arrives in the guest as a SYN; the guest
/// accepts and its data reaches the host.
fn host_to_guest_forward<D: GuestDriver>(guest: &mut Guest<D>, host_port: u16) {
    guest.dhcp(0x600d_f00d);
    let mut client = TcpStream::connect(("127.0.0.1", host_port)).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let syn = guest.wait_for("the forwarded SYN", |f| {
        parse_tcp(f).filter(|s| s.dst == (GUEST_IP, 22) && s.flags & TCP_SYN != 0)
    });
    assert_eq!(syn.flags & TCP_ACK, 0, "a plain SYN");
    let remote = syn.src;
    let our_isn = 7000u32;
    let their_next = syn.seq.wrapping_add(1);
    guest.tcp_send(22, remote, our_isn, their_next, TCP_SYN | TCP_ACK, &[]);
    guest.tcp_wait("the handshake's ACK", 22, remote, |s| {
        s.flags & TCP_ACK != 0 && s.ack == our_isn + 1
    });
    guest.tcp_send(
        22,
        remote,
        our_isn + 1,
        their_next,
        TCP_ACK | TCP_PSH,
        b"SSH-2.0-guest\r\n",
    );
    let mut banner = [0u8; 15];
    client.read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"SSH-2.0-guest\r\n");
}

/// Malformed frames from the guest: the NAT ignores them and keeps working.
fn malformed_frames_then_dhcp<D: GuestDriver>(guest: &mut Guest<D>) {
    let mac = guest.driver.mac();
    let mut bad_frames: Vec<Vec<u8>> = Vec::new();
    // An Ethernet header announcing IPv4 and nothing after it (the card pads it).
    bad_frames.push(ethernet([0xff; 6], mac, 0x0800, &[]));
    // IHL says 60 bytes of header; the frame ends before.
    let mut frame = udp_frame([0xff; 6], mac, (GUEST_IP, 1000), (GATEWAY_IP, 2000), b"x");
    frame[14] = 0x4f;
    bad_frames.push(frame);
    // Total length far beyond the frame, then shorter than the header (checksums redone).
    for total in [0xffffu16, 10, 0] {
        let mut frame = udp_frame(
            [0xff; 6],
            mac,
            (GUEST_IP, 1000),
            (GATEWAY_IP, 2000),
            b"payload",
        );
        frame[16..18].copy_from_slice(&total.to_be_bytes());
        frame[24..26].copy_from_slice(&[0, 0]);
        let sum = vmm_devices::net::internet_checksum(&frame[14..34]);
        frame[24..26].copy_from_slice(&sum.to_be_bytes());
        bad_frames.push(frame);
    }
    // UDP length 0xffff to the DHCP server; and a DHCP request cut to 8 bytes of BOOTP.
    let mut frame = udp_frame(
        [0xff; 6],
        mac,
        (Ipv4Addr::UNSPECIFIED, 68),
        (Ipv4Addr::BROADCAST, 67),
        &[1; 40],
    );
    frame[38..40].copy_from_slice(&[0xff, 0xff]);
    bad_frames.push(frame);
    bad_frames.push(udp_frame(
        [0xff; 6],
        mac,
        (Ipv4Addr::UNSPECIFIED, 68),
        (Ipv4Addr::BROADCAST, 67),
        &[1, 1, 6, 0, 1, 2, 3, 4],
    ));
    // A DHCP DISCOVER whose options run past the end (length byte 200).
    let mut frame = dhcp_frame(mac, 1, DHCP_DISCOVER, None);
    let options = 14 + 20 + 8 + 240;
    frame[options..options + 2].copy_from_slice(&[53, 200]);
    let info = parse_ip(&frame).unwrap();
    fill_l4_checksum(&mut frame, &info).unwrap();
    bad_frames.push(frame);
    // TCP with a data offset of 60 bytes in a 20-byte segment; and a TCP header cut short.
    let mut frame = tcp_frame(
        [0xff; 6],
        mac,
        (GUEST_IP, 1234),
        (GATEWAY_IP, 1),
        1,
        0,
        TCP_SYN,
        &[],
    );
    frame[46] = 0xf0;
    let info = parse_ip(&frame).unwrap();
    fill_l4_checksum(&mut frame, &info).unwrap();
    bad_frames.push(frame);
    bad_frames.push(ipv4_frame(
        [0xff; 6],
        mac,
        GUEST_IP,
        GATEWAY_IP,
        6,
        &[0, 1, 0, 2, 0, 0],
    ));
    // An IPv4 fragment at the largest offset, and an ICMP echo cut to 3 bytes.
    let mut frame = udp_frame(
        [0xff; 6],
        mac,
        (GUEST_IP, 1000),
        (GATEWAY_IP, 2000),
        &[7; 100],
    );
    frame[20..22].copy_from_slice(&[0x3f, 0xff]);
    frame[24..26].copy_from_slice(&[0, 0]);
    let sum = vmm_devices::net::internet_checksum(&frame[14..34]);
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
    bad_frames.push(frame);
    bad_frames.push(ipv4_frame(
        [0xff; 6],
        mac,
        GUEST_IP,
        GATEWAY_IP,
        1,
        &[8, 0, 0],
    ));
    // ARP cut short; IPv6 with a payload length beyond the frame; an unknown EtherType.
    bad_frames.push(ethernet([0xff; 6], mac, 0x0806, &[0, 1, 8, 0, 6]));
    let mut ipv6 = vec![0x60, 0, 0, 0, 0xff, 0xff, 58, 255];
    ipv6.extend_from_slice(&[0; 32]);
    ipv6.extend_from_slice(&[133, 0, 0, 0]);
    bad_frames.push(ethernet([0x33, 0x33, 0, 0, 0, 2], mac, 0x86dd, &ipv6));
    bad_frames.push(ethernet([0xff; 6], mac, 0x1234, &[0xaa; 100]));
    // An IPv4 header with a bad checksum.
    let mut frame = udp_frame([0xff; 6], mac, (GUEST_IP, 1000), (GATEWAY_IP, 2000), b"x");
    frame[24] ^= 0xff;
    bad_frames.push(frame);

    let count = bad_frames.len() as u64;
    for frame in &bad_frames {
        guest.driver.transmit(frame);
    }
    let deadline = Instant::now() + WAIT;
    while guest.backend.stats().from_guest < count {
        assert!(Instant::now() < deadline, "{:?}", guest.backend.stats());
        std::thread::sleep(Duration::from_millis(1));
    }
    let (offer, _) = guest.dhcp(0x5151_5151);
    assert_eq!(offer.file, "", "no boot file configured");
}

fn port_taken_is_a_clear_error(result: Result<NetBackend, NetError>, port: u16) {
    match result {
        Err(error @ NetError::Forward { .. }) => {
            let NetError::Forward {
                ref address,
                port: p,
                ref protocol,
                ..
            } = error
            else {
                unreachable!()
            };
            assert_eq!(
                (address.as_str(), p, protocol.as_str()),
                ("127.0.0.1", port, "tcp")
            );
            let message = error.to_string();
            assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
            assert!(message.contains("already in use"), "{message}");
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("a forward of a taken port started"),
    }
}

/// The checks every card goes through against the NAT, as a module of tests named after
/// the card: `$guest` builds a guest driving that card for a NAT config.
macro_rules! nat_checks_for_card {
    ($card:ident, $guest:ident) => {
        mod $card {
            use super::*;

            #[test]
            fn dhcp_offers_address_router_dns_and_boot_file() {
                dhcp_with_boot_file(&mut $guest(&boot_file_config()).unwrap());
            }

            #[test]
            fn tcp_connection_to_a_host_server() {
                tcp_to_host(&mut $guest(&NatConfig::default()).unwrap());
            }

            #[test]
            fn host_forward_reaches_the_guest() {
                let port = free_port();
                host_to_guest_forward(&mut $guest(&forward_config(port, 22)).unwrap(), port);
            }

            #[test]
            fn malformed_frames_do_not_break_the_nat() {
                malformed_frames_then_dhcp(&mut $guest(&NatConfig::default()).unwrap());
            }
        }
    };
}

/// A forward whose host port is taken fails when the card's backend starts.
fn forward_of_a_taken_port_fails_at_start<D: GuestDriver>(
    guest: fn(&NatConfig) -> Result<Guest<D>, NetError>,
) {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    port_taken_is_a_clear_error(guest(&forward_config(port, 22)).map(|g| g.backend), port);
}

fn boot_file_config() -> NatConfig {
    NatConfig {
        boot_file: Some("pxelinux.0".into()),
        ..NatConfig::default()
    }
}

// ---- e1000 ----

nat_checks_for_card!(e1000, e1000_guest);

#[test]
fn e1000_forward_of_a_taken_port_fails_at_start() {
    forward_of_a_taken_port_fails_at_start(e1000_guest);
}

// ---- RTL8139 (C+ mode) ----

nat_checks_for_card!(rtl8139, rtl8139_guest);

#[test]
fn rtl8139_forward_of_a_taken_port_fails_at_start() {
    forward_of_a_taken_port_fails_at_start(rtl8139_guest);
}

/// More frames than the C+ receive ring holds arrive while the guest is not looking; the
/// backend holds them and delivers them as the guest frees descriptors (OWN bit only, no
/// doorbell).
#[test]
fn rtl8139_frames_beyond_the_ring_are_held_and_delivered_later() {
    let mut guest = rtl8139_guest(&NatConfig::default()).unwrap();
    guest.dhcp(0x4242_4242);
    let mac = guest.driver.mac();
    // 24 ICMP echo requests to the gateway: 24 replies for a 16-descriptor ring.
    let requests = 24u16;
    for sequence in 0..requests {
        let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34];
        icmp.extend_from_slice(&sequence.to_be_bytes());
        icmp.extend_from_slice(b"ping payload");
        let sum = vmm_devices::net::internet_checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let frame = ipv4_frame(guest.gateway_mac, mac, GUEST_IP, GATEWAY_IP, 1, &icmp);
        guest.driver.transmit(&frame);
    }
    // The NAT answers echo requests to 10.0.2.2 itself: with the ring unread, 16 replies
    // fill it and the rest wait in the backend.
    let deadline = Instant::now() + WAIT;
    while guest.backend.stats().held < u64::from(requests) - 16 {
        assert!(Instant::now() < deadline, "{:?}", guest.backend.stats());
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < usize::from(requests) {
        let sequence = guest.wait_for("echo replies", |f| {
            let ip = parse_ipv4(f)?;
            (ip.protocol == 1 && ip.transport.first() == Some(&0))
                .then(|| u16::from_be_bytes([ip.transport[6], ip.transport[7]]))
        });
        seen.insert(sequence);
    }
    assert_eq!(guest.backend.stats().to_guest_dropped, 0);
    assert_eq!(guest.backend.stats().held, 0);
    let counters = guest.driver.card.lock().unwrap().counters();
    assert_eq!(counters.rx_dropped, 0, "nothing given to a full ring");
}

// ---- virtio-net (legacy interface) ----

nat_checks_for_card!(virtio_net, virtio_net_guest);
