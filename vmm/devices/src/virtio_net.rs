//! virtio-net (VIRTIO 1.2 section 5.1) over the virtio-pci transport: the paravirtual
//! network card Linux, Windows (NetKVM) and iPXE drive through `virtio_net`.
//!
//! Emulated: one receive queue (0), one transmit queue (1) and the control queue (2), 256
//! entries each; the transitional function 1af4:1000 (legacy BAR0 + modern BAR4, QEMU's
//! default) or the modern-only 1af4:1041 (see [`crate::virtio_pci`] for the BAR layout);
//! MSI-X with 4 vectors (configuration + one per queue) or INTx. Features offered: MAC,
//! STATUS (link state with a configuration interrupt on change), CSUM (NEEDS_CSUM applied on
//! transmit at csum_start/csum_offset), GUEST_CSUM (received TCP/UDP frames whose checksums
//! verify are marked DATA_VALID), HOST_TSO4/HOST_TSO6 (TCP segmentation with
//! [`net::segment_tcp`]), MRG_RXBUF (frames spread over several receive buffers with
//! `num_buffers`), CTRL_VQ with CTRL_RX (promiscuous / all-multicast / the extra modes),
//! MAC_TABLE_SET, CTRL_MAC_ADDR and ANNOUNCE_ACK, EVENT_IDX, INDIRECT_DESC, ANY_LAYOUT and
//! VERSION_1. The header is 12 bytes with VERSION_1 or MRG_RXBUF, 10 bytes otherwise; a legacy
//! driver that negotiated neither CTRL_MAC_ADDR nor VERSION_1 may write the MAC into the
//! device configuration.
//!
//! Guest mistakes: a malformed ring or chain (addresses outside RAM, loops, nested indirect
//! tables, avail index jumps, receive chains with device-readable or no writable buffers)
//! sets DEVICE_NEEDS_RESET and the device stops using its queues until reset; a bad frame
//! (writable buffers on transmit, too short, too long, a checksum offset outside the frame,
//! an unsupported GSO type) is dropped and counted and its chain returned. Transmit handles at
//! most [`TX_CHAINS_PER_KICK`] chains per doorbell and resumes through [`Timed`].
//!
//! Not emulated: multiqueue (MQ), VLAN filtering (CTRL_VLAN), guest offloads (GUEST_TSO/UFO,
//! receive of GSO frames), UFO/USO, MTU, speed/duplex, RSS and hash reports, standby.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::{Clock, Timed};
use crate::irq::IrqLine;
use crate::net::{
    self, DropReason, FrameSink, NetworkCard, NicCounters, ReceiveOutcome, TsoParams,
    ETH_HEADER_LEN, ETH_MAX_FRAME_LEN, ETH_MAX_FRAME_LEN_VLAN, MAX_JUMBO_FRAME_LEN,
    MAX_TSO_FRAME_LEN,
};
use crate::pci::{PciConfigSpace, PciFunction};
use crate::virtio_pci::{
    MsiSink, TransportError, TransportEvent, TransportState, VirtioPciMode, VirtioPciTransport,
    VIRTIO_F_ANY_LAYOUT, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use crate::virtio_queue::DescriptorChain;
use crate::GuestMemory;

/// Virtio device type of network cards.
pub const VIRTIO_ID_NET: u16 = 1;
/// Network controller / Ethernet.
pub const CLASS_ETHERNET: u32 = 0x02_00_00;

pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
pub const VIRTIO_NET_F_CTRL_RX: u64 = 1 << 18;
pub const VIRTIO_NET_F_CTRL_RX_EXTRA: u64 = 1 << 20;
pub const VIRTIO_NET_F_CTRL_MAC_ADDR: u64 = 1 << 23;

/// What this card offers (VERSION_1 is added by the transport).
pub const DEVICE_FEATURES: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_NET_F_STATUS
    | VIRTIO_NET_F_CTRL_VQ
    | VIRTIO_NET_F_CTRL_RX
    | VIRTIO_NET_F_CTRL_RX_EXTRA
    | VIRTIO_NET_F_CTRL_MAC_ADDR
    | VIRTIO_F_ANY_LAYOUT
    | VIRTIO_F_RING_INDIRECT_DESC
    | VIRTIO_F_RING_EVENT_IDX;

pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const CTRL_QUEUE: usize = 2;
pub const QUEUE_SIZE: u16 = 256;
/// Configuration + receive + transmit + control.
pub const MSIX_VECTORS: u16 = 4;
/// Transmit chains handled per doorbell before the rest waits for [`Timed::on_timer`].
pub const TX_CHAINS_PER_KICK: usize = 256;
/// How soon the remaining transmit work is resumed.
const TX_RESUME_DELAY_NS: u64 = 20_000;
/// Longest control command accepted (two MAC tables of [`MAC_TABLE_ENTRIES`] plus headers).
const MAX_CTRL_COMMAND: usize = 4096;
/// Entries kept per MAC filter table; longer tables make that class of address pass.
pub const MAC_TABLE_ENTRIES: usize = 64;

const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;
const CTRL_CLASS_RX: u8 = 0;
const CTRL_CLASS_MAC: u8 = 1;
const CTRL_CLASS_ANNOUNCE: u8 = 3;
const CTRL_MAC_TABLE_SET: u8 = 0;
const CTRL_MAC_ADDR_SET: u8 = 1;
const CTRL_ANNOUNCE_ACK: u8 = 0;

/// Receive filter programmed through the control queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RxFilter {
    pub promiscuous: bool,
    pub all_multicast: bool,
    pub all_unicast: bool,
    pub no_multicast: bool,
    pub no_unicast: bool,
    pub no_broadcast: bool,
    pub unicast: Vec<[u8; 6]>,
    pub multicast: Vec<[u8; 6]>,
    /// The driver gave more unicast / multicast entries than kept: pass the class.
    pub unicast_overflow: bool,
    pub multicast_overflow: bool,
}

impl Default for RxFilter {
    /// Promiscuous until the driver says otherwise (what QEMU does; iPXE never does).
    fn default() -> Self {
        Self {
            promiscuous: true,
            all_multicast: false,
            all_unicast: false,
            no_multicast: false,
            no_unicast: false,
            no_broadcast: false,
            unicast: Vec::new(),
            multicast: Vec::new(),
            unicast_overflow: false,
            multicast_overflow: false,
        }
    }
}

impl RxFilter {
    fn accepts(&self, frame: &[u8], mac: [u8; 6]) -> bool {
        if self.promiscuous {
            return true;
        }
        let dst = net::destination(frame);
        if net::is_broadcast(&dst) {
            !self.no_broadcast
        } else if net::is_multicast(&dst) {
            !self.no_multicast
                && (self.all_multicast || self.multicast_overflow || self.multicast.contains(&dst))
        } else {
            !self.no_unicast
                && (self.all_unicast
                    || self.unicast_overflow
                    || dst == mac
                    || self.unicast.contains(&dst))
        }
    }
}

/// Everything that survives save/restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetState {
    pub transport: TransportState,
    pub link_up: bool,
    pub counters: NicCounters,
    pub filter: RxFilter,
    /// The MAC the guest set (MAC_ADDR_SET or a legacy config write).
    pub current_mac: [u8; 6],
    pub tx_resume_ns: Option<u64>,
}

/// Errors of [`VirtioNet::restore`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VirtioNetError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("saved virtio-net state has a MAC filter table of {0} entries (at most {MAC_TABLE_ENTRIES}); the snapshot is damaged")]
    FilterTooLong(usize),
}

/// Why a chain could not be used (the device then needs a reset).
#[derive(Debug, thiserror::Error)]
enum ChainFault {
    #[error("a receive chain has device-readable buffers")]
    ReadableReceiveBuffer,
    #[error("a receive chain has no writable bytes")]
    EmptyReceiveBuffer,
}

/// A virtio-net card on the PCI bus.
pub struct VirtioNet {
    transport: VirtioPciTransport,
    link_up: bool,
    counters: NicCounters,
    filter: RxFilter,
    current_mac: [u8; 6],
    tx_resume_ns: Option<u64>,
    mac: [u8; 6],
    sink: Arc<dyn FrameSink>,
    clock: Arc<dyn Clock>,
}

/// The virtio_net_hdr fields the device looks at.
#[derive(Clone, Copy, Debug, Default)]
struct NetHeader {
    flags: u8,
    gso_type: u8,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
}

impl NetHeader {
    fn parse(bytes: &[u8]) -> Self {
        let word = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        Self {
            flags: bytes[0],
            gso_type: bytes[1],
            gso_size: word(4),
            csum_start: word(6),
            csum_offset: word(8),
        }
    }
}

impl VirtioNet {
    /// A card with factory MAC `mac`, DMA into `memory`, INTA# on `irq`, MSI-X messages to
    /// `msi`, transmitted frames to `sink`, exposed as `mode` (transitional 1af4:1000 or
    /// modern 1af4:1041).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mac: [u8; 6],
        memory: GuestMemory,
        irq: Arc<dyn IrqLine>,
        msi: Arc<dyn MsiSink>,
        sink: Arc<dyn FrameSink>,
        clock: Arc<dyn Clock>,
        mode: VirtioPciMode,
    ) -> Self {
        let transport = VirtioPciTransport::new(
            mode,
            VIRTIO_ID_NET,
            CLASS_ETHERNET,
            DEVICE_FEATURES,
            &[QUEUE_SIZE; 3],
            MSIX_VECTORS,
            Vec::new(),
            memory,
            irq,
            msi,
        );
        let mut card = Self {
            transport,
            link_up: true,
            counters: NicCounters::default(),
            filter: RxFilter::default(),
            current_mac: mac,
            tx_resume_ns: None,
            mac,
            sink,
            clock,
        };
        card.refresh_device_config();
        card
    }

    pub fn state(&self) -> VirtioNetState {
        VirtioNetState {
            transport: self.transport.state(),
            link_up: self.link_up,
            counters: self.counters,
            filter: self.filter.clone(),
            current_mac: self.current_mac,
            tx_resume_ns: self.tx_resume_ns,
        }
    }

    /// Restores a saved state (the factory MAC stays the one given at construction).
    pub fn restore(&mut self, state: VirtioNetState) -> Result<(), VirtioNetError> {
        for table in [&state.filter.unicast, &state.filter.multicast] {
            if table.len() > MAC_TABLE_ENTRIES {
                return Err(VirtioNetError::FilterTooLong(table.len()));
            }
        }
        self.transport.restore(state.transport)?;
        self.link_up = state.link_up;
        self.counters = state.counters;
        self.filter = state.filter;
        self.current_mac = state.current_mac;
        self.tx_resume_ns = state.tx_resume_ns;
        self.refresh_device_config();
        Ok(())
    }

    /// The transport, for the engine's diagnostics and tests.
    pub fn transport(&self) -> &VirtioPciTransport {
        &self.transport
    }

    /// The virtio_net_config bytes: mac, status, max_virtqueue_pairs.
    fn refresh_device_config(&mut self) {
        let status = if self.link_up {
            VIRTIO_NET_S_LINK_UP
        } else {
            0
        };
        let mut bytes = Vec::with_capacity(10);
        bytes.extend_from_slice(&self.current_mac);
        bytes.extend_from_slice(&status.to_le_bytes());
        bytes.extend_from_slice(&1u16.to_le_bytes());
        *self.transport.device_config_mut() = bytes;
    }

    fn header_len(&self) -> usize {
        if self.transport.features() & (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF) != 0 {
            12
        } else {
            10
        }
    }

    fn reset_device(&mut self) {
        self.filter = RxFilter::default();
        self.current_mac = self.mac;
        self.tx_resume_ns = None;
        self.refresh_device_config();
    }

    fn handle_event(&mut self, event: Option<TransportEvent>) {
        match event {
            Some(TransportEvent::QueueNotify(q)) => match usize::from(q) {
                RX_QUEUE => self.sink.rx_ready(),
                TX_QUEUE => self.process_tx(),
                CTRL_QUEUE => self.process_ctrl(),
                _ => log::debug!("virtio-net: notify for unknown queue {q}"),
            },
            Some(TransportEvent::Reset) => self.reset_device(),
            Some(TransportEvent::DriverOk) => {
                self.sink.rx_ready();
                self.process_tx();
            }
            Some(TransportEvent::DeviceConfigWrite { offset, data }) => {
                let legacy_mac_write = !self.transport.has_feature(VIRTIO_F_VERSION_1)
                    && !self.transport.has_feature(VIRTIO_NET_F_CTRL_MAC_ADDR);
                if legacy_mac_write {
                    for (i, byte) in data.iter().enumerate() {
                        let Some(slot) = offset
                            .checked_add(i as u64)
                            .and_then(|o| usize::try_from(o).ok())
                            .and_then(|o| self.current_mac.get_mut(o))
                        else {
                            continue;
                        };
                        *slot = *byte;
                    }
                    self.refresh_device_config();
                }
            }
            None => {}
        }
    }

    // ---- receive ----

    fn drop_rx(&mut self, reason: DropReason) -> ReceiveOutcome {
        self.counters.rx_dropped += 1;
        ReceiveOutcome::Dropped(reason)
    }

    fn receive_ready(&self) -> bool {
        self.transport.driver_ok()
            && self.transport.queues_usable()
            && self.transport.queue(RX_QUEUE).is_some_and(|q| q.ready)
    }

    fn receive_frame(&mut self, frame: &[u8]) -> ReceiveOutcome {
        if !self.link_up {
            return self.drop_rx(DropReason::LinkDown);
        }
        if !self.transport.driver_ok() || !self.transport.queue(RX_QUEUE).is_some_and(|q| q.ready) {
            return self.drop_rx(DropReason::ReceiverDisabled);
        }
        if !self.transport.queues_usable() {
            return self.drop_rx(DropReason::DmaError);
        }
        if frame.len() < ETH_HEADER_LEN {
            return self.drop_rx(DropReason::Runt);
        }
        if frame.len() > ETH_MAX_FRAME_LEN_VLAN {
            return self.drop_rx(DropReason::TooLong);
        }
        if !self.filter.accepts(frame, self.current_mac) {
            return ReceiveOutcome::Filtered;
        }
        let frame = net::pad_to_minimum(frame);
        let header_len = self.header_len();
        let mut header = [0u8; 12];
        if self.transport.has_feature(VIRTIO_NET_F_GUEST_CSUM) {
            let checks = net::verify_checksums(&frame);
            let l4_valid = checks.tcp.or(checks.udp) == Some(true);
            if l4_valid && checks.ipv4_header != Some(false) {
                header[0] = VIRTIO_NET_HDR_F_DATA_VALID;
            }
        }
        let packet_len = header_len + frame.len();
        let mergeable = self.transport.has_feature(VIRTIO_NET_F_MRG_RXBUF);

        // Take enough chains (one without merging), or give them all back.
        let mut chains: Vec<DescriptorChain> = Vec::new();
        let mut capacity = 0u64;
        let Some((queue, memory)) = self.transport.queue_and_memory(RX_QUEUE) else {
            return self.drop_rx(DropReason::ReceiverDisabled);
        };
        let mut fault: Option<String> = None;
        while capacity < packet_len as u64 && (mergeable || chains.is_empty()) {
            match queue.pop(memory) {
                Ok(Some(chain)) => {
                    if chain.has_readable() {
                        fault = Some(ChainFault::ReadableReceiveBuffer.to_string());
                        break;
                    }
                    if chain.writable_len() == 0 {
                        fault = Some(ChainFault::EmptyReceiveBuffer.to_string());
                        break;
                    }
                    capacity += chain.writable_len();
                    chains.push(chain);
                }
                Ok(None) => {
                    if let Err(e) = queue.undo_pop(memory, chains.len() as u16) {
                        self.transport.set_needs_reset(&e);
                        return self.drop_rx(DropReason::DmaError);
                    }
                    self.counters.rx_dropped += 1;
                    return ReceiveOutcome::NoBuffers;
                }
                Err(e) => {
                    fault = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(reason) = fault {
            self.transport.set_needs_reset(&reason);
            return self.drop_rx(DropReason::DmaError);
        }
        if capacity < packet_len as u64 {
            // Without merging the one chain is too small: hand it back empty.
            for chain in &chains {
                if let Err(e) = queue.add_used(memory, chain.head, 0) {
                    self.transport.set_needs_reset(&e);
                    return self.drop_rx(DropReason::DmaError);
                }
            }
            self.transport.notify_used(RX_QUEUE);
            return self.drop_rx(DropReason::TooLong);
        }
        if header_len == 12 {
            header[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes());
        }
        let mut packet = Vec::with_capacity(packet_len);
        packet.extend_from_slice(&header[..header_len]);
        packet.extend_from_slice(&frame);
        let mut used = Vec::with_capacity(chains.len());
        let mut position = 0usize;
        for chain in &chains {
            let written = match chain.write_writable(memory, 0, &packet[position..]) {
                Ok(n) => n,
                Err(e) => {
                    self.transport.set_needs_reset(&e);
                    return self.drop_rx(DropReason::DmaError);
                }
            };
            position += written;
            used.push((chain.head, written as u32));
        }
        for (head, len) in used {
            if let Err(e) = queue.add_used(memory, head, len) {
                self.transport.set_needs_reset(&e);
                return self.drop_rx(DropReason::DmaError);
            }
        }
        self.transport.notify_used(RX_QUEUE);
        self.counters.count_rx(frame.len());
        ReceiveOutcome::Delivered
    }

    // ---- transmit ----

    fn process_tx(&mut self) {
        self.tx_resume_ns = None;
        if !self.transport.driver_ok()
            || !self.transport.queues_usable()
            || !self.transport.queue(TX_QUEUE).is_some_and(|q| q.ready)
        {
            return;
        }
        let mut handled = 0usize;
        loop {
            if handled >= TX_CHAINS_PER_KICK {
                self.tx_resume_ns =
                    Some(self.clock.monotonic_ns().saturating_add(TX_RESUME_DELAY_NS));
                break;
            }
            let Some((queue, memory)) = self.transport.queue_and_memory(TX_QUEUE) else {
                return;
            };
            let chain = match queue.pop(memory) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    self.transport.set_needs_reset(&e);
                    break;
                }
            };
            self.transmit_chain(&chain);
            let Some((queue, memory)) = self.transport.queue_and_memory(TX_QUEUE) else {
                return;
            };
            if let Err(e) = queue.add_used(memory, chain.head, 0) {
                self.transport.set_needs_reset(&e);
                break;
            }
            handled += 1;
        }
        if handled > 0 {
            self.transport.notify_used(TX_QUEUE);
        }
    }

    fn drop_tx(&mut self, why: &str) {
        log::debug!("virtio-net: transmit dropped: {why}");
        self.counters.tx_dropped += 1;
    }

    fn transmit_chain(&mut self, chain: &DescriptorChain) {
        if chain.has_writable() {
            return self.drop_tx("transmit chain has device-writable buffers");
        }
        let header_len = self.header_len();
        let total = chain.readable_len();
        if total > (header_len + MAX_TSO_FRAME_LEN) as u64 {
            return self.drop_tx("frame longer than the largest segmentation frame");
        }
        let data = match chain.read_readable(self.transport.memory(), total as usize) {
            Ok(d) => d,
            Err(_) => return self.drop_tx("buffer unreadable"),
        };
        if data.len() < header_len + ETH_HEADER_LEN {
            return self.drop_tx("shorter than header and Ethernet header");
        }
        if !self.link_up {
            return self.drop_tx("link down");
        }
        let header = NetHeader::parse(&data[..header_len]);
        let mut frame = data[header_len..].to_vec();
        let gso = header.gso_type & !VIRTIO_NET_HDR_GSO_ECN;
        if gso == VIRTIO_NET_HDR_GSO_NONE {
            if frame.len() > MAX_JUMBO_FRAME_LEN {
                return self.drop_tx("frame too long without segmentation");
            }
            if header.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
                let start = usize::from(header.csum_start);
                let field = start + usize::from(header.csum_offset);
                // A zero UDP checksum means "none": store 0xffff instead.
                let udp = header.csum_offset == 6;
                if !net::insert_checksum(&mut frame, start, None, field, udp) {
                    return self.drop_tx("checksum offsets outside the frame");
                }
            }
            self.sink.send(&frame);
            self.counters.count_tx(frame.len());
            return;
        }
        let allowed = match gso {
            VIRTIO_NET_HDR_GSO_TCPV4 => self.transport.has_feature(VIRTIO_NET_F_HOST_TSO4),
            VIRTIO_NET_HDR_GSO_TCPV6 => self.transport.has_feature(VIRTIO_NET_F_HOST_TSO6),
            _ => false,
        };
        if !allowed {
            return self.drop_tx("segmentation type not negotiated");
        }
        let params = match TsoParams::from_frame(&frame, usize::from(header.gso_size)) {
            Ok(p) => p,
            Err(e) => return self.drop_tx(&e.to_string()),
        };
        let is_ipv4 = net::parse_ip(&frame).is_some_and(|ip| ip.is_ipv4);
        if is_ipv4 != (gso == VIRTIO_NET_HDR_GSO_TCPV4) {
            return self.drop_tx("segmentation type does not match the IP version");
        }
        let sink = Arc::clone(&self.sink);
        let mut sent = Vec::new();
        let result = net::segment_tcp(&frame, &params, &mut |segment| {
            sink.send(segment);
            sent.push(segment.len());
        });
        for len in sent {
            self.counters.count_tx(len);
        }
        if let Err(e) = result {
            self.drop_tx(&e.to_string());
        }
    }

    // ---- control queue ----

    fn process_ctrl(&mut self) {
        if !self.transport.has_feature(VIRTIO_NET_F_CTRL_VQ)
            || !self.transport.driver_ok()
            || !self.transport.queues_usable()
            || !self.transport.queue(CTRL_QUEUE).is_some_and(|q| q.ready)
        {
            return;
        }
        let mut handled = false;
        loop {
            let Some((queue, memory)) = self.transport.queue_and_memory(CTRL_QUEUE) else {
                return;
            };
            let chain = match queue.pop(memory) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    self.transport.set_needs_reset(&e);
                    break;
                }
            };
            let command = chain
                .read_readable(self.transport.memory(), MAX_CTRL_COMMAND)
                .unwrap_or_default();
            let ack = match command.as_slice() {
                [class, cmd, data @ ..] if chain.readable_len() <= MAX_CTRL_COMMAND as u64 => {
                    self.control_command(*class, *cmd, data)
                }
                _ => CTRL_ERR,
            };
            let Some((queue, memory)) = self.transport.queue_and_memory(CTRL_QUEUE) else {
                return;
            };
            let written = chain.write_writable(memory, 0, &[ack]).unwrap_or(0);
            if let Err(e) = queue.add_used(memory, chain.head, written as u32) {
                self.transport.set_needs_reset(&e);
                break;
            }
            handled = true;
        }
        if handled {
            self.transport.notify_used(CTRL_QUEUE);
        }
    }

    fn control_command(&mut self, class: u8, command: u8, data: &[u8]) -> u8 {
        match (class, command) {
            (CTRL_CLASS_RX, 0..=5) if data.len() == 1 => {
                if command >= 2 && !self.transport.has_feature(VIRTIO_NET_F_CTRL_RX_EXTRA) {
                    return CTRL_ERR;
                }
                let on = data[0] != 0;
                let f = &mut self.filter;
                match command {
                    0 => f.promiscuous = on,
                    1 => f.all_multicast = on,
                    2 => f.all_unicast = on,
                    3 => f.no_multicast = on,
                    4 => f.no_unicast = on,
                    _ => f.no_broadcast = on,
                }
                CTRL_OK
            }
            (CTRL_CLASS_MAC, CTRL_MAC_TABLE_SET) => match parse_mac_tables(data) {
                Some((unicast, multicast)) => {
                    let f = &mut self.filter;
                    f.unicast_overflow = unicast.len() > MAC_TABLE_ENTRIES;
                    f.multicast_overflow = multicast.len() > MAC_TABLE_ENTRIES;
                    f.unicast = unicast.into_iter().take(MAC_TABLE_ENTRIES).collect();
                    f.multicast = multicast.into_iter().take(MAC_TABLE_ENTRIES).collect();
                    CTRL_OK
                }
                None => CTRL_ERR,
            },
            (CTRL_CLASS_MAC, CTRL_MAC_ADDR_SET)
                if data.len() == 6 && self.transport.has_feature(VIRTIO_NET_F_CTRL_MAC_ADDR) =>
            {
                self.current_mac.copy_from_slice(data);
                self.refresh_device_config();
                CTRL_OK
            }
            (CTRL_CLASS_ANNOUNCE, CTRL_ANNOUNCE_ACK) => CTRL_OK,
            _ => CTRL_ERR,
        }
    }
}

type MacTable = Vec<[u8; 6]>;

/// The two tables of VIRTIO_NET_CTRL_MAC_TABLE_SET: each a le32 count and count MACs.
fn parse_mac_tables(data: &[u8]) -> Option<(MacTable, MacTable)> {
    let mut rest = data;
    let mut tables = Vec::with_capacity(2);
    for _ in 0..2 {
        let count = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let bytes = count.checked_mul(6)?;
        let entries = rest.get(4..4usize.checked_add(bytes)?)?;
        tables.push(
            entries
                .chunks_exact(6)
                .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]])
                .collect::<Vec<_>>(),
        );
        rest = &rest[4 + bytes..];
    }
    if !rest.is_empty() {
        return None;
    }
    let multicast = tables.pop()?;
    let unicast = tables.pop()?;
    Some((unicast, multicast))
}

impl NetworkCard for VirtioNet {
    fn receive(&mut self, frame: &[u8]) -> ReceiveOutcome {
        self.receive_frame(frame)
    }

    fn can_receive(&self) -> bool {
        if !self.link_up || !self.receive_ready() {
            return false;
        }
        // Linux's small buffers hold an untagged maximum frame (1514 + 4 spare).
        let needed = (self.header_len() + ETH_MAX_FRAME_LEN) as u64;
        let one_chain = !self.transport.has_feature(VIRTIO_NET_F_MRG_RXBUF);
        self.transport.queue(RX_QUEUE).is_some_and(|q| {
            q.writable_capacity_at_least(self.transport.memory(), needed, one_chain)
        })
    }

    fn set_link(&mut self, up: bool) {
        if self.link_up == up {
            return;
        }
        self.link_up = up;
        self.refresh_device_config();
        if self.transport.driver_ok() {
            self.transport.config_changed();
        }
    }

    fn link_up(&self) -> bool {
        self.link_up
    }

    fn counters(&self) -> NicCounters {
        self.counters
    }

    fn mac(&self) -> [u8; 6] {
        self.mac
    }
}

impl PciFunction for VirtioNet {
    fn config(&self) -> &PciConfigSpace {
        self.transport.config()
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        self.transport.config_mut()
    }

    fn config_read(&mut self, reg: usize) -> u32 {
        self.transport.config_read(reg)
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let event = self.transport.config_write(reg, offset, data);
        self.handle_event(event);
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        self.transport.bar_read(bar, offset, data);
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let event = self.transport.bar_write(bar, offset, data);
        self.handle_event(event);
    }

    fn reset(&mut self) {
        self.transport.pci_reset();
        self.reset_device();
    }
}

impl Timed for VirtioNet {
    fn next_deadline_ns(&self) -> Option<u64> {
        self.tx_resume_ns
    }

    fn on_timer(&mut self, now_ns: u64) {
        if self.tx_resume_ns.is_some_and(|t| now_ns >= t) {
            self.process_tx();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::irq::CountingIrq;
    use crate::net::tests::{tcp_frame, udp_frame};
    use crate::net::RecordingSink;
    use crate::pci::{COMMAND_BUS_MASTER, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE, REG_COMMAND};
    use crate::test_support::TestRng;
    use crate::virtio_pci::{
        RecordingMsiSink, BAR_LEGACY, BAR_MODERN, BAR_MSIX, CAP_MSIX, DEVICE_CFG_OFFSET,
        ISR_CFG_OFFSET, NOTIFY_CFG_OFFSET, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
        STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
    };
    use crate::virtio_queue::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const PEER: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
    const MEM_SIZE: usize = 4 << 20;
    const QUEUE_BASE: u64 = 0x10000;
    const RX_BUFFERS: u64 = 0x100000;
    const TX_BUFFERS: u64 = 0x200000;
    const CTRL_BUFFERS: u64 = 0x300000;

    /// The driver's view of one queue (legacy-compatible layout for every transport).
    struct DriverQueue {
        base: u64,
        size: u16,
        next_desc: u16,
        avail_idx: u16,
        last_used: u16,
    }

    impl DriverQueue {
        fn desc(&self) -> u64 {
            self.base
        }
        fn avail(&self) -> u64 {
            self.base + 16 * u64::from(self.size)
        }
        fn used(&self) -> u64 {
            (self.avail() + 6 + 2 * u64::from(self.size)).next_multiple_of(4096)
        }
    }

    struct Rig {
        net: VirtioNet,
        mem: GuestMemoryMmap,
        irq: Arc<CountingIrq>,
        msi: Arc<RecordingMsiSink>,
        sink: Arc<RecordingSink>,
        clock: Arc<ManualClock>,
        queues: Vec<DriverQueue>,
        modern: bool,
    }

    impl Rig {
        fn new(mode: VirtioPciMode) -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let irq = CountingIrq::new();
            let msi = RecordingMsiSink::new();
            let sink = RecordingSink::new();
            let clock = ManualClock::new(0);
            let mut net = VirtioNet::new(
                MAC,
                mem.clone(),
                irq.clone(),
                msi.clone(),
                sink.clone(),
                clock.clone(),
                mode,
            );
            net.config_write(
                REG_COMMAND,
                0,
                &(COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER).to_le_bytes(),
            );
            let queues = (0..3)
                .map(|i| DriverQueue {
                    base: QUEUE_BASE + 0x4000 * i,
                    size: QUEUE_SIZE,
                    next_desc: 0,
                    avail_idx: 0,
                    last_used: 0,
                })
                .collect();
            Self {
                net,
                mem,
                irq,
                msi,
                sink,
                clock,
                queues,
                modern: false,
            }
        }

        fn read(&mut self, bar: usize, offset: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.net.bar_read(bar, offset, &mut b[..len]);
            u64::from_le_bytes(b)
        }

        fn write(&mut self, bar: usize, offset: u64, len: usize, value: u64) {
            self.net.bar_write(bar, offset, &value.to_le_bytes()[..len]);
        }

        fn common_read(&mut self, offset: u64, len: usize) -> u64 {
            self.read(BAR_MODERN, offset, len)
        }

        fn common_write(&mut self, offset: u64, len: usize, value: u64) {
            self.write(BAR_MODERN, offset, len, value);
        }

        fn enable_msix(&mut self) {
            self.net.config_write(CAP_MSIX, 2, &0x8000u16.to_le_bytes());
            for v in 0..u64::from(MSIX_VECTORS) {
                self.write(BAR_MSIX, 16 * v, 4, 0xfee0_0000);
                self.write(BAR_MSIX, 16 * v + 4, 4, 0);
                self.write(BAR_MSIX, 16 * v + 8, 4, 0x30 + v);
                self.write(BAR_MSIX, 16 * v + 12, 4, 0);
            }
        }

        /// Linux virtio_pci_modern + virtio_net probe: reset, ACKNOWLEDGE, DRIVER, features,
        /// FEATURES_OK (checked), queues (size, rings, vector, enable), DRIVER_OK.
        fn probe_modern(&mut self, wanted: u64, vectors: Option<[u16; 4]>) -> u64 {
            self.modern = true;
            self.common_write(0x14, 1, 0);
            assert_eq!(self.common_read(0x14, 1), 0);
            self.common_write(0x14, 1, u64::from(STATUS_ACKNOWLEDGE));
            self.common_write(0x14, 1, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
            self.common_write(0x00, 4, 0);
            let low = self.common_read(0x04, 4);
            self.common_write(0x00, 4, 1);
            let high = self.common_read(0x04, 4);
            let offered = low | (high << 32);
            let features = offered & wanted;
            self.common_write(0x08, 4, 0);
            self.common_write(0x0c, 4, features & 0xffff_ffff);
            self.common_write(0x08, 4, 1);
            self.common_write(0x0c, 4, features >> 32);
            let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
            self.common_write(0x14, 1, u64::from(s));
            assert_eq!(
                self.common_read(0x14, 1),
                u64::from(s),
                "FEATURES_OK refused"
            );
            if let Some(v) = vectors {
                self.enable_msix();
                self.common_write(0x10, 2, u64::from(v[0]));
                assert_eq!(self.common_read(0x10, 2), u64::from(v[0]));
            }
            let queues = self.common_read(0x12, 2);
            assert_eq!(queues, 3);
            let count = if features & VIRTIO_NET_F_CTRL_VQ != 0 {
                3
            } else {
                2
            };
            for q in 0..count {
                self.common_write(0x16, 2, q as u64);
                assert_eq!(self.common_read(0x18, 2), u64::from(QUEUE_SIZE));
                let (desc, avail, used) = {
                    let dq = &self.queues[q];
                    (dq.desc(), dq.avail(), dq.used())
                };
                self.common_write(0x20, 4, desc);
                self.common_write(0x24, 4, 0);
                self.common_write(0x28, 4, avail);
                self.common_write(0x2c, 4, 0);
                self.common_write(0x30, 4, used);
                self.common_write(0x34, 4, 0);
                if let Some(v) = vectors {
                    self.common_write(0x1a, 2, u64::from(v[q + 1]));
                }
                assert_eq!(self.common_read(0x1e, 2), q as u64);
                self.common_write(0x1c, 2, 1);
                assert_eq!(self.common_read(0x1c, 2), 1);
            }
            self.common_write(0x14, 1, u64::from(s | STATUS_DRIVER_OK));
            assert!(self.net.transport().driver_ok());
            features
        }

        /// Legacy probe as Linux virtio_pci_legacy and iPXE do it.
        fn probe_legacy(&mut self, wanted: u32) -> u32 {
            self.modern = false;
            self.write(BAR_LEGACY, 18, 1, 0);
            self.write(BAR_LEGACY, 18, 1, u64::from(STATUS_ACKNOWLEDGE));
            self.write(
                BAR_LEGACY,
                18,
                1,
                u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER),
            );
            let offered = self.read(BAR_LEGACY, 0, 4) as u32;
            assert_eq!(u64::from(offered) & VIRTIO_F_VERSION_1, 0);
            let features = offered & wanted;
            self.write(BAR_LEGACY, 4, 4, u64::from(features));
            let count = if u64::from(features) & VIRTIO_NET_F_CTRL_VQ != 0 {
                3
            } else {
                2
            };
            for q in 0..count {
                self.write(BAR_LEGACY, 14, 2, q as u64);
                assert_eq!(self.read(BAR_LEGACY, 12, 2), u64::from(QUEUE_SIZE));
                let pfn = self.queues[q].base >> 12;
                self.write(BAR_LEGACY, 8, 4, pfn);
                assert_eq!(self.read(BAR_LEGACY, 8, 4), pfn);
            }
            self.write(
                BAR_LEGACY,
                18,
                1,
                u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK),
            );
            assert!(self.net.transport().driver_ok());
            features
        }

        fn put_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            self.mem
                .write_slice(&raw, GuestAddress(table + 16 * u64::from(i)))
                .unwrap();
        }

        /// Publishes `head` in the available ring of `q`.
        fn publish(&mut self, q: usize, head: u16) {
            let dq = &mut self.queues[q];
            let slot = u64::from(dq.avail_idx % dq.size);
            let avail = dq.avail();
            dq.avail_idx = dq.avail_idx.wrapping_add(1);
            let idx = dq.avail_idx;
            self.mem
                .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
                .unwrap();
            self.mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
        }

        /// Adds a chain of (address, length, device-writable) buffers to queue `q`.
        fn add_chain(&mut self, q: usize, buffers: &[(u64, u32, bool)]) -> u16 {
            let (table, size) = (self.queues[q].desc(), self.queues[q].size);
            let head = self.queues[q].next_desc;
            let mut index = head;
            for (n, &(addr, len, writable)) in buffers.iter().enumerate() {
                let next = (index + 1) % size;
                let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
                if n + 1 < buffers.len() {
                    flags |= VIRTQ_DESC_F_NEXT;
                }
                self.put_desc(table, index, addr, len, flags, next);
                index = next;
            }
            self.queues[q].next_desc = index;
            self.publish(q, head);
            head
        }

        fn kick(&mut self, q: usize) {
            if self.modern {
                self.write(BAR_MODERN, NOTIFY_CFG_OFFSET + 4 * q as u64, 2, q as u64);
            } else {
                self.write(BAR_LEGACY, 16, 2, q as u64);
            }
        }

        /// New used entries of queue `q` (id, len).
        fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
            let dq = &mut self.queues[q];
            let used = dq.used();
            let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
            let mut out = Vec::new();
            while dq.last_used != idx {
                let slot = u64::from(dq.last_used % dq.size);
                let id: u32 = self
                    .mem
                    .read_obj(GuestAddress(used + 4 + 8 * slot))
                    .unwrap();
                let len: u32 = self
                    .mem
                    .read_obj(GuestAddress(used + 8 + 8 * slot))
                    .unwrap();
                out.push((id, len));
                dq.last_used = dq.last_used.wrapping_add(1);
            }
            out
        }

        fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut b = vec![0u8; len];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            b
        }

        fn fill(&self, addr: u64, len: usize, value: u8) {
            self.mem
                .write_slice(&vec![value; len], GuestAddress(addr))
                .unwrap();
        }

        fn status(&self) -> u8 {
            self.net.transport().status()
        }

        fn isr(&mut self) -> u8 {
            if self.modern {
                self.read(BAR_MODERN, ISR_CFG_OFFSET, 1) as u8
            } else {
                self.read(BAR_LEGACY, 19, 1) as u8
            }
        }

        /// Transmits `frame` behind a header, header and frame in separate descriptors.
        fn transmit(&mut self, header: &[u8], frame: &[u8]) {
            self.mem
                .write_slice(header, GuestAddress(TX_BUFFERS))
                .unwrap();
            self.mem
                .write_slice(frame, GuestAddress(TX_BUFFERS + 0x1000))
                .unwrap();
            self.add_chain(
                TX_QUEUE,
                &[
                    (TX_BUFFERS, header.len() as u32, false),
                    (TX_BUFFERS + 0x1000, frame.len() as u32, false),
                ],
            );
            self.kick(TX_QUEUE);
        }

        /// Posts `count` receive buffers of `len` bytes each (one descriptor per chain).
        fn post_rx(&mut self, count: u64, len: u32) {
            for i in 0..count {
                self.add_chain(RX_QUEUE, &[(RX_BUFFERS + i * 0x1000, len, true)]);
            }
            self.kick(RX_QUEUE);
        }
    }

    fn header(
        flags: u8,
        gso_type: u8,
        gso_size: u16,
        csum_start: u16,
        csum_offset: u16,
    ) -> Vec<u8> {
        let mut h = vec![flags, gso_type];
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(&gso_size.to_le_bytes());
        h.extend_from_slice(&csum_start.to_le_bytes());
        h.extend_from_slice(&csum_offset.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes());
        h
    }

    /// The UDP frame as Linux hands it over with CHECKSUM_PARTIAL: the checksum field holds
    /// the folded pseudo-header sum.
    fn partial_udp(f: &[u8]) -> Vec<u8> {
        let mut g = f.to_vec();
        let udp_len = (f.len() - 34) as u32;
        let sum = net::ones_complement_add(0, &f[26..34]) + u32::from(net::IP_PROTO_UDP) + udp_len;
        g[40..42].copy_from_slice(&net::fold(sum).to_be_bytes());
        g
    }

    const LINUX_FEATURES: u64 = DEVICE_FEATURES | VIRTIO_F_VERSION_1;

    #[test]
    fn modern_probe_reads_mac_and_link_then_transmits_udp_with_needs_csum() {
        let mut rig = Rig::new(VirtioPciMode::Modern);
        let features = rig.probe_modern(LINUX_FEATURES, None);
        assert_ne!(features & VIRTIO_F_VERSION_1, 0);
        let mac: Vec<u8> = (0..6)
            .map(|i| rig.read(BAR_MODERN, DEVICE_CFG_OFFSET + i, 1) as u8)
            .collect();
        assert_eq!(mac, MAC);
        assert_eq!(rig.read(BAR_MODERN, DEVICE_CFG_OFFSET + 6, 2), 1);
        let f = udp_frame(PEER, MAC, 101);
        rig.transmit(
            &header(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 34, 6),
            &partial_udp(&f),
        );
        assert_eq!(rig.sink.take(), vec![f.clone()]);
        assert_eq!(rig.take_used(TX_QUEUE), vec![(0, 0)]);
        assert!(rig.irq.level());
        assert_eq!(rig.isr(), 1);
        assert!(!rig.irq.level());
        let c = rig.net.counters();
        assert_eq!((c.tx_packets, c.tx_bytes), (1, f.len() as u64));
    }

    #[test]
    fn legacy_probe_like_ipxe_transmits_and_receives_with_10_byte_header() {
        let mut rig = Rig::new(VirtioPciMode::Transitional);
        let features = rig.probe_legacy(VIRTIO_NET_F_MAC as u32);
        assert_eq!(u64::from(features), VIRTIO_NET_F_MAC);
        let mac: Vec<u8> = (0..6)
            .map(|i| rig.read(BAR_LEGACY, 20 + i, 1) as u8)
            .collect();
        assert_eq!(mac, MAC);
        // Transmit: 10-byte header, no offload.
        let f = udp_frame(PEER, MAC, 20);
        rig.transmit(&header(0, 0, 0, 0, 0)[..10], &f);
        assert_eq!(rig.sink.take(), vec![f]);
        assert_eq!(rig.isr(), 1);
        // Receive: iPXE posts header and data as two writable descriptors.
        rig.fill(RX_BUFFERS, 0x2000, 0xee);
        rig.add_chain(
            RX_QUEUE,
            &[(RX_BUFFERS, 10, true), (RX_BUFFERS + 0x100, 1514, true)],
        );
        rig.kick(RX_QUEUE);
        assert!(rig.net.can_receive());
        let incoming = udp_frame(MAC, PEER, 64);
        assert_eq!(rig.net.receive(&incoming), ReceiveOutcome::Delivered);
        assert_eq!(rig.bytes(RX_BUFFERS, 10), vec![0; 10]);
        assert_eq!(rig.bytes(RX_BUFFERS + 10, 1), vec![0xee]);
        assert_eq!(rig.bytes(RX_BUFFERS + 0x100, incoming.len()), incoming);
        assert_eq!(
            rig.bytes(RX_BUFFERS + 0x100 + incoming.len() as u64, 1),
            vec![0xee]
        );
        assert_eq!(
            rig.take_used(RX_QUEUE),
            vec![(0, 10 + incoming.len() as u32)]
        );
        assert_eq!(rig.isr(), 1);
        assert!(!rig.net.can_receive());
        assert_eq!(rig.net.receive(&incoming), ReceiveOutcome::NoBuffers);
        assert_eq!(rig.net.counters().rx_dropped, 1);
        // Short frames are padded, runts dropped.
        rig.post_rx(1, 2048);
        assert_eq!(rig.net.receive(&incoming[..42]), ReceiveOutcome::Delivered);
        assert_eq!(rig.take_used(RX_QUEUE)[0].1, 10 + 60);
        assert_eq!(
            rig.net.receive(&incoming[..10]),
            ReceiveOutcome::Dropped(DropReason::Runt)
        );
    }

    #[test]
    fn legacy_driver_may_write_the_mac_into_config() {
        let mut rig = Rig::new(VirtioPciMode::Transitional);
        rig.probe_legacy((VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS) as u32);
        for (i, b) in PEER.iter().enumerate() {
            rig.write(BAR_LEGACY, 20 + i as u64, 1, u64::from(*b));
        }
        let mac: Vec<u8> = (0..6)
            .map(|i| rig.read(BAR_LEGACY, 20 + i, 1) as u8)
            .collect();
        assert_eq!(mac, PEER);
        assert_eq!(rig.net.mac(), MAC);
        // A modern driver cannot.
        let mut rig = Rig::new(VirtioPciMode::Modern);
        rig.probe_modern(LINUX_FEATURES, None);
        rig.write(BAR_MODERN, DEVICE_CFG_OFFSET, 1, 0x77);
        assert_eq!(
            rig.read(BAR_MODERN, DEVICE_CFG_OFFSET, 1),
            u64::from(MAC[0])
        );
    }

    #[test]
    fn mergeable_receive_spreads_over_buffers_with_num_buffers() {
        let mut rig = Rig::new(VirtioPciMode::Transitional);
        rig.probe_modern(LINUX_FEATURES, None);
        rig.fill(RX_BUFFERS, 0x5000, 0xee);
        rig.post_rx(4, 512);
        assert!(rig.net.can_receive());
        let f = udp_frame(MAC, PEER, 1400 - 42);
        assert_eq!(f.len(), 1400);
        assert_eq!(rig.net.receive(&f), ReceiveOutcome::Delivered);
        assert_eq!(rig.take_used(RX_QUEUE), vec![(0, 512), (1, 512), (2, 388)]);
        let first = rig.bytes(RX_BUFFERS, 512);
        assert_eq!(u16::from_le_bytes([first[10], first[11]]), 3);
        let mut got = first[12..].to_vec();
        got.extend(rig.bytes(RX_BUFFERS + 0x1000, 512));
        got.extend(rig.bytes(RX_BUFFERS + 0x2000, 388));
        assert_eq!(got, f);
        assert_eq!(rig.bytes(RX_BUFFERS + 0x2000 + 388, 1), vec![0xee]);
        // GUEST_CSUM: the verified UDP checksum is reported as DATA_VALID.
        assert_eq!(first[0], VIRTIO_NET_HDR_F_DATA_VALID);
        // One buffer left (512) is not enough for 1400: nothing taken, NoBuffers.
        assert!(!rig.net.can_receive());
        assert_eq!(rig.net.receive(&f), ReceiveOutcome::NoBuffers);
        assert!(rig.take_used(RX_QUEUE).is_empty());
        // A small frame still fits the remaining buffer.
        let small = udp_frame(MAC, PEER, 100);
        assert_eq!(rig.net.receive(&small), ReceiveOutcome::Delivered);
        assert_eq!(rig.take_used(RX_QUEUE), vec![(3, 12 + small.len() as u32)]);
    }

    #[test]
    fn without_mergeable_buffers_a_frame_must_fit_one_chain() {
        let mut rig = Rig::new(VirtioPciMode::Modern);
        rig.probe_modern(LINUX_FEATURES & !VIRTIO_NET_F_MRG_RXBUF, None);
        rig.post_rx(2, 256);
        assert!(!rig.net.can_receive());
        let f = udp_frame(MAC, PEER, 500);
        assert_eq!(
            rig.net.receive(&f),
            ReceiveOutcome::Dropped(DropReason::TooLong)
        );
        // The too-small chain is handed back empty; the next one is untouched.
        assert_eq!(rig.take_used(RX_QUEUE), vec![(0, 0)]);
        let small = udp_frame(MAC, PEER, 100);
        assert_eq!(rig.net.receive(&small), ReceiveOutcome::Delivered);
        // VERSION_1 without MRG_RXBUF: still a 12-byte header, num_buffers 1.
        assert_eq!(rig.take_used(RX_QUEUE), vec![(1, 12 + small.len() as u32)]);
        assert_eq!(rig.bytes(RX_BUFFERS + 0x1000 + 10, 2), vec![1, 0]);
    }

    #[test]
    fn event_index_suppresses_and_requests_interrupts() {
        let mut rig = Rig::new(VirtioPciMode::Modern);
        let features = rig.probe_modern(LINUX_FEATURES, Some([0, 1, 2, 3]));
        assert_ne!(features & VIRTIO_F_RING_EVENT_IDX, 0);
        rig.post_rx(8, 2048);
        // avail_event written as the device consumes (here after each pop).
        let f = udp_frame(MAC, PEER, 50);
        let used_event_addr = rig.queues[RX_QUEUE].avail() + 4 + 2 * u64::from(QUEUE_SIZE);
        // The driver wants an interrupt only once entry 2 is used.
        rig.mem
            .write_obj(2u16, GuestAddress(used_event_addr))
            .unwrap();
        assert_eq!(rig.net.receive(&f), ReceiveOutcome::Delivered);
        assert_eq!(rig.msi.take().len(), 1, "first decision always interrupts");
        assert_eq!(rig.net.receive(&f), ReceiveOutcome::Delivered);
        assert!(
            rig.msi.take().is_empty(),
            "used 1 -> 2 does not pass entry 2"
        );
        assert_eq!(rig.net.receive(&f), ReceiveOutcome::Delivered);
        assert_eq!(rig.msi.take(), vec![(0xfee0_0000, 0x31)]);
        assert_eq!(rig.net.receive(&f), ReceiveOutcome::Delivered);
        assert!(rig.msi.take().is_empty());
        let avail_event_addr = rig.queues[RX_QUEUE].used() + 4 + 8 * u64::from(QUEUE_SIZE);
        let avail_event: u16 = rig.mem.read_obj(GuestAddress(avail_event_addr)).unwrap();
        assert_eq!(avail_event, 4);
        assert!(!rig.irq.level(), "no INTx while MSI-X is on");
    }

    #[test]
    fn no_interrupt_flag_without_event_index() {
        let mut rig = Rig::new(VirtioPciMode::Modern);
        rig.probe_modern(LINUX_FEATURES & !VIRTIO_F_RING_EVENT_IDX, None);
        rig.post_rx(2, 2048);
        let flags_addr = rig.queues[RX_QUEUE].avail();
        rig.mem.write_obj(1u16, GuestAddress(flags_addr)).unwrap();
        let f = udp_frame(MAC, PEER, 50);
        assert_eq!(rig.net.receive(&f), ReceiveOutcome::Delivered);
        assert!(!rig.irq.level());
        rig.mem.write_obj(0u16, GuestAddress(flags_addr)).unwrap();
        assert_eq!(rig.net.receive(&f), ReceiveOutcome::Delivered);
        assert!(rig.irq.level());
    }

    #[test]
    fn msix_vectors_per_queue_and_for_config_changes() {
        let mut rig = Rig::new(VirtioPciMode::Transitional);
        rig.probe_modern(LINUX_FEATURES, Some([0, 1, 2, 3]));
        rig.post_rx(1, 2048);
        assert!(rig.net.receive(&udp_frame(MAC, PEER, 10)) == ReceiveOutcome::Delivered);
        assert_eq!(rig.msi.take(), vec![(0xfee0_0000, 0x31)]);
        rig.transmit(&header(0, 0, 0, 0, 0), &udp_frame(PEER, MAC, 10));
        assert_eq!(rig.msi.take(), vec![(0xfee0_0000, 0x32)]);
        rig.net.set_link(false);
        assert_eq!(rig.msi.take(), vec![(0xfee0_0000, 0x30)]);
        assert!(!rig.irq.level());
        // Masking vector 2 holds the transmit interrupt pending until unmasked.
        rig.write(BAR_MSIX, 2 * 16 + 12, 4, 1);
        let used_event = rig.queues[TX_QUEUE].avail() + 4 + 2 * u64::from(QUEUE_SIZE);
        rig.mem.write_obj(1u16, GuestAddress(used_event)).unwrap();
        rig.net.set_link(true);
        rig.msi.take();
        rig.transmit(&header(0, 0, 0, 0, 0), &udp_frame(PEER, MAC, 10));
        assert!(rig.msi.take().is_empty());
        assert_eq!(rig.read(BAR_MSIX, 0x800, 1), 0b100);
        rig.write(BAR_MSIX, 2 * 16 + 12, 4, 0);
        assert_eq!(rig.msi.take(), vec![(0xfee0_0000, 0x32)]);
        // Legacy view: with MSI-X on, the config moves to offset 24.
        assert_eq!(rig.read(BAR_LEGACY, 24, 1), u64::from(MAC[0]));
    }

    #[test]
    fn link_changes_raise_config_interrupt_and_stop_traffic() {
        let mut rig = Rig::new(VirtioPciMode::Modern);
        rig.probe_modern(LINUX_FEATURES, None);
        rig.post_rx(2, 2048);
        let generation = rig.common_read(0x15, 1);
        rig.net.set_link(false);
        assert!(!rig.net.link_up());
        assert!(rig.irq.level());
        assert_eq!(rig.isr(), 2);
        assert!(!rig.irq.level());
        assert_eq!(rig.read(BAR_MODERN, DEVICE_CFG_OFFSET + 6, 2), 0);
        assert_ne!(rig.common_read(0x15, 1), generation);
        assert!(!rig.net.can_receive());
        assert_eq!(
            rig.net.receive(&udp_frame(MAC, PEER, 10)),
            ReceiveOutcome::Dropped(DropReason::LinkDown)
        );
        rig.transmit(&header(0, 0, 0, 0, 0), &udp_frame(PEER, MAC, 10));
        assert!(rig.sink.is_empty());
        assert_eq!(rig.net.counters().tx_dropped, 1);
        assert_eq!(rig.take_used(TX_QUEUE).len(), 1);
        rig.isr();
        rig.net.set_link(false); // no change, no interrupt
        assert!(!rig.irq.level());
        rig.net.set_link(true);
        assert_eq!(rig.isr(), 2);
        assert_eq!(rig.read(BAR_MODERN, DEVICE_CFG_OFFSET + 6, 2), 1);
        assert!(rig.net.can_receive());
    }

    /// Sends one control command (class, command, data) and returns the ack byte.
    fn control(rig: &mut Rig, class: u8, command: u8, data: &[u8]) -> u8 {
        let mut out = vec![class, command];
        out.extend_from_slice(data);
        rig.mem
            .write_slice(&out, GuestAddress(CTRL_BUFFERS))
            .unwrap();
        rig.fill(CTRL_BUFFERS + 0x800, 1, 0xee);
        rig.add_chain(
            CTRL_QUEUE,
            &[
                (CTRL_BUFFERS, 2, false),
                (CTRL_BUFFERS + 2, data.len() as u32, false),
                (CTRL_BUFFERS + 0x800, 1, true),
            ],
        );
        rig.kick(CTRL_QUEUE);
        let used = rig.take_used(CTRL_QUEUE);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].1, 1);
        rig.bytes(CTRL_BUFFERS + 0x800, 1)[0]
    }

    #[test]
    fn control_queue_rx_mode_mac_table_and_mac_address() {
        let mut rig = Rig::new(VirtioPciMode::Modern);
        rig.probe_modern(LINUX_FEATURES, None);
        rig.post_rx(16, 2048);
        let other = [0x52, 0x54, 0x00, 0x99, 0x99, 0x99];
        // Promiscuous by default.
        assert_eq!(
            rig.net.receive(&udp_frame(other, PEER, 10)),
            ReceiveOutcome::Delivered
        );
        assert_eq!(control(&mut rig, 0, 0, &[0]), CTRL_OK); // promisc off
        assert_eq!(control(&mut rig, 0, 1, &[0]), CTRL_OK); // allmulti off
        assert_eq!(
            rig.net.receive(&udp_frame(other, PEER, 10)),
            ReceiveOutcome::Filtered
        );
        assert_eq!(
            rig.net.receive(&udp_frame(MAC, PEER, 10)),
            ReceiveOutcome::Delivered
        );
        assert_eq!(
            rig.net.receive(&udp_frame([0xff; 6], PEER, 10)),
            ReceiveOutcome::Delivered
        );
        let group = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];
        assert_eq!(
            rig.net.receive(&udp_frame(group, PEER, 10)),
            ReceiveOutcome::Filtered
        );
        // MAC table: one unicast, one multicast.
        let mut table = 1u32.to_le_bytes().to_vec();
        table.extend_from_slice(&other);
        table.extend_from_slice(&1u32.to_le_bytes());
        table.extend_from_slice(&group);
        assert_eq!(control(&mut rig, 1, 0, &table), CTRL_OK);
        assert_eq!(
            rig.net.receive(&udp_frame(other, PEER, 10)),
            ReceiveOutcome::Delivered
        );
        assert_eq!(
            rig.net.receive(&udp_frame(group, PEER, 10)),
            ReceiveOutcome::Delivered
        );
        // A table whose counts lie is refused.
        let mut bad = 1000u32.to_le_bytes().to_vec();
        bad.extend_from_slice(&other);
        assert_eq!(control(&mut rig, 1, 0, &bad), CTRL_ERR);
        // Extra modes: no broadcast.
        assert_eq!(control(&mut rig, 0, 5, &[1]), CTRL_OK);
        assert_eq!(
            rig.net.receive(&udp_frame([0xff; 6], PEER, 10)),
            ReceiveOutcome::Filtered
        );
        // MAC address set.
        assert_eq!(control(&mut rig, 1, 1, &PEER), CTRL_OK);
        assert_eq!(
            rig.read(BAR_MODERN, DEVICE_CFG_OFFSET, 1),
            u64::from(PEER[0])
        );
        assert_eq!(
            rig.net.receive(&udp_frame(PEER, MAC, 10)),
            ReceiveOutcome::Delivered
        );
        // Announce ack, unknown class, VLAN (not offered), malformed command.
        assert_eq!(control(&mut rig, 3, 0, &[]), CTRL_OK);
        assert_eq!(control(&mut rig, 2, 0, &[0, 1]), CTRL_ERR);
        assert_eq!(control(&mut rig, 77, 3, &[1, 2, 3]), CTRL_ERR);
        assert_eq!(control(&mut rig, 0, 0, &[1, 2]), CTRL_ERR);
    }

    #[test]
    fn tcp_segmentation_offload_splits_large_frames() {
        let mut rig = Rig::new(VirtioPciMode::Modern);
        rig.probe_modern(LINUX_FEATURES, None);
        let big = tcp_frame(PEER, MAC, 3000);
        let h = header(
            VIRTIO_NET_HDR_F_NEEDS_CSUM,
            VIRTIO_NET_HDR_GSO_TCPV4,
            1000,
            34,
            16,
        );
        rig.transmit(&h, &big);
        let segments = rig.sink.take();
        assert_eq!(segments.len(), 3);
        let mut payload = Vec::new();
        for s in &segments {
            let v = net::verify_checksums(s);
            assert_eq!((v.ipv4_header, v.tcp), (Some(true), Some(true)));
            payload.extend_from_slice(&s[54..]);
        }
        assert_eq!(payload, big[54..].to_vec());
        assert_eq!(rig.net.counters().tx_packets, 3);
        // UFO and a GSO type that does not match the frame are dropped.
        rig.transmit(
            &header(0, VIRTIO_NET_HDR_GSO_UDP, 1000, 0, 0),
            &udp_frame(PEER, MAC, 3000),
        );
        rig.transmit(&header(0, VIRTIO_NET_HDR_GSO_TCPV6, 1000, 0, 0), &big);
        assert!(rig.sink.is_empty());
        assert_eq!(rig.net.counters().tx_dropped, 2);
    }

    #[test]
    fn device_reset_returns_to_power_on_state() {
        let mut rig = Rig::new(VirtioPciMode::Modern);
        rig.probe_modern(LINUX_FEATURES, None);
        rig.post_rx(2, 2048);
        assert_eq!(control(&mut rig, 1, 1, &PEER), CTRL_OK);
        rig.common_write(0x14, 1, 0);
        assert_eq!(rig.status(), 0);
        assert_eq!(rig.net.transport().features(), 0);
        assert!(!rig.net.transport().queue(RX_QUEUE).unwrap().ready);
        assert_eq!(
            rig.read(BAR_MODERN, DEVICE_CFG_OFFSET, 1),
            u64::from(MAC[0])
        );
        assert!(!rig.net.can_receive());
        assert_eq!(
            rig.net.receive(&udp_frame(MAC, PEER, 10)),
            ReceiveOutcome::Dropped(DropReason::ReceiverDisabled)
        );
        // A second probe works from scratch.
        for q in &mut rig.queues {
            q.next_desc = 0;
            q.avail_idx = 0;
            q.last_used = 0;
        }
        rig.fill(QUEUE_BASE, 0xc000, 0);
        rig.probe_modern(LINUX_FEATURES, None);
        rig.post_rx(1, 2048);
        assert_eq!(
            rig.net.receive(&udp_frame(MAC, PEER, 10)),
            ReceiveOutcome::Delivered
        );
        // PCI reset too.
        rig.net.reset();
        assert_eq!(rig.status(), 0);
        assert_eq!(rig.net.config().command(), 0);
    }

    // ---- hostile guests ----

    fn probed() -> Rig {
        let mut rig = Rig::new(VirtioPciMode::Modern);
        rig.probe_modern(LINUX_FEATURES, None);
        rig
    }

    fn assert_needs_reset(rig: &mut Rig) {
        assert_ne!(rig.status() & STATUS_NEEDS_RESET, 0);
        assert_eq!(rig.isr() & 2, 2, "configuration interrupt for NEEDS_RESET");
        assert!(!rig.net.can_receive());
    }

    #[test]
    fn transmit_descriptor_outside_ram_needs_reset() {
        let mut rig = probed();
        rig.add_chain(TX_QUEUE, &[(MEM_SIZE as u64 - 8, 64, false)]);
        rig.kick(TX_QUEUE);
        assert!(rig.sink.is_empty());
        assert_needs_reset(&mut rig);
        // Further kicks do nothing until reset.
        rig.transmit(&header(0, 0, 0, 0, 0), &udp_frame(PEER, MAC, 10));
        assert!(rig.sink.is_empty());
        assert!(rig.take_used(TX_QUEUE).is_empty());
    }

    #[test]
    fn receive_buffer_past_end_of_ram_leaves_memory_untouched() {
        let mut rig = probed();
        let tail = MEM_SIZE as u64 - 100;
        rig.fill(tail, 100, 0xee);
        rig.add_chain(RX_QUEUE, &[(tail, 200, true)]);
        assert_eq!(
            rig.net.receive(&udp_frame(MAC, PEER, 10)),
            ReceiveOutcome::Dropped(DropReason::DmaError)
        );
        assert_eq!(rig.bytes(tail, 100), vec![0xee; 100]);
        assert_needs_reset(&mut rig);
    }

    #[test]
    fn looping_chains_and_avail_jumps_need_reset_without_hanging() {
        let mut rig = probed();
        let table = rig.queues[TX_QUEUE].desc();
        rig.put_desc(table, 0, TX_BUFFERS, 64, VIRTQ_DESC_F_NEXT, 1);
        rig.put_desc(table, 1, TX_BUFFERS, 64, VIRTQ_DESC_F_NEXT, 0);
        rig.publish(TX_QUEUE, 0);
        rig.kick(TX_QUEUE);
        assert_needs_reset(&mut rig);

        let mut rig = probed();
        let avail = rig.queues[RX_QUEUE].avail();
        rig.mem.write_obj(1000u16, GuestAddress(avail + 2)).unwrap();
        assert!(!rig.net.can_receive());
        assert_eq!(
            rig.net.receive(&udp_frame(MAC, PEER, 10)),
            ReceiveOutcome::Dropped(DropReason::DmaError)
        );
        assert_needs_reset(&mut rig);
    }

    #[test]
    fn indirect_tables_work_and_nesting_needs_reset() {
        let mut rig = probed();
        // A good indirect transmit chain: header + frame.
        let f = udp_frame(PEER, MAC, 30);
        let h = header(0, 0, 0, 0, 0);
        rig.mem.write_slice(&h, GuestAddress(TX_BUFFERS)).unwrap();
        rig.mem
            .write_slice(&f, GuestAddress(TX_BUFFERS + 0x100))
            .unwrap();
        let indirect = TX_BUFFERS + 0x8000;
        rig.put_desc(indirect, 0, TX_BUFFERS, 12, VIRTQ_DESC_F_NEXT, 1);
        rig.put_desc(indirect, 1, TX_BUFFERS + 0x100, f.len() as u32, 0, 0);
        let table = rig.queues[TX_QUEUE].desc();
        rig.put_desc(table, 0, indirect, 32, VIRTQ_DESC_F_INDIRECT, 0);
        rig.publish(TX_QUEUE, 0);
        rig.kick(TX_QUEUE);
        assert_eq!(rig.sink.take(), vec![f]);
        // Nested.
        rig.put_desc(indirect, 0, indirect, 32, VIRTQ_DESC_F_INDIRECT, 0);
        rig.put_desc(table, 1, indirect, 32, VIRTQ_DESC_F_INDIRECT, 0);
        rig.publish(TX_QUEUE, 1);
        rig.kick(TX_QUEUE);
        assert_needs_reset(&mut rig);
    }

    #[test]
    fn receive_chain_flag_misuse_and_zero_length_need_reset() {
        let mut rig = probed();
        rig.fill(RX_BUFFERS, 0x1000, 0xee);
        rig.add_chain(RX_QUEUE, &[(RX_BUFFERS, 2048, false)]);
        assert_eq!(
            rig.net.receive(&udp_frame(MAC, PEER, 10)),
            ReceiveOutcome::Dropped(DropReason::DmaError)
        );
        assert_eq!(rig.bytes(RX_BUFFERS, 0x1000), vec![0xee; 0x1000]);
        assert_needs_reset(&mut rig);

        let mut rig = probed();
        rig.add_chain(RX_QUEUE, &[(RX_BUFFERS, 0, true)]);
        assert_eq!(
            rig.net.receive(&udp_frame(MAC, PEER, 10)),
            ReceiveOutcome::Dropped(DropReason::DmaError)
        );
        assert_needs_reset(&mut rig);
    }

    #[test]
    fn bad_transmit_frames_are_dropped_counted_and_returned() {
        let mut rig = probed();
        // Writable buffer in a transmit chain.
        rig.add_chain(
            TX_QUEUE,
            &[(TX_BUFFERS, 12, false), (TX_BUFFERS + 0x100, 64, true)],
        );
        rig.kick(TX_QUEUE);
        // Header only, and a zero-length frame buffer.
        rig.add_chain(
            TX_QUEUE,
            &[(TX_BUFFERS, 12, false), (TX_BUFFERS + 0x100, 0, false)],
        );
        rig.kick(TX_QUEUE);
        // Huge frame: 1 MiB of readable data.
        rig.add_chain(
            TX_QUEUE,
            &[(TX_BUFFERS, 12, false), (0x100000, 0x100000, false)],
        );
        rig.kick(TX_QUEUE);
        // Checksum offsets outside the frame.
        rig.transmit(
            &header(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 5000, 6),
            &udp_frame(PEER, MAC, 10),
        );
        rig.transmit(
            &header(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 34, 4000),
            &udp_frame(PEER, MAC, 10),
        );
        // Segmentation with a hostile MSS.
        rig.transmit(
            &header(0, VIRTIO_NET_HDR_GSO_TCPV4, 1, 0, 0),
            &tcp_frame(PEER, MAC, 3000),
        );
        assert!(rig.sink.is_empty());
        assert_eq!(rig.net.counters().tx_dropped, 6);
        assert_eq!(rig.take_used(TX_QUEUE).len(), 6);
        assert_eq!(rig.status() & STATUS_NEEDS_RESET, 0);
        // Oversized received frames are dropped too.
        rig.post_rx(1, 4096);
        assert_eq!(
            rig.net.receive(&vec![0u8; 2000]),
            ReceiveOutcome::Dropped(DropReason::TooLong)
        );
    }

    #[test]
    fn transmit_flood_is_bounded_per_doorbell_and_resumed_by_timer() {
        let mut rig = probed();
        let f = udp_frame(PEER, MAC, 10);
        let h = header(0, 0, 0, 0, 0);
        rig.mem.write_slice(&h, GuestAddress(TX_BUFFERS)).unwrap();
        rig.mem
            .write_slice(&f, GuestAddress(TX_BUFFERS + 0x100))
            .unwrap();
        // Fill the ring (256 chains of one descriptor each can't exist with 2 descriptors:
        // use single-descriptor chains with header and frame contiguous).
        let mut packet = h.clone();
        packet.extend_from_slice(&f);
        rig.mem
            .write_slice(&packet, GuestAddress(TX_BUFFERS + 0x200))
            .unwrap();
        for _ in 0..TX_CHAINS_PER_KICK {
            rig.add_chain(
                TX_QUEUE,
                &[(TX_BUFFERS + 0x200, packet.len() as u32, false)],
            );
        }
        rig.kick(TX_QUEUE);
        assert_eq!(rig.sink.take().len(), TX_CHAINS_PER_KICK);
        assert_eq!(rig.net.next_deadline_ns(), Some(TX_RESUME_DELAY_NS));
        for _ in 0..10 {
            rig.add_chain(
                TX_QUEUE,
                &[(TX_BUFFERS + 0x200, packet.len() as u32, false)],
            );
        }
        rig.clock.advance_ns(TX_RESUME_DELAY_NS);
        rig.net.on_timer(rig.clock.monotonic_ns());
        assert_eq!(rig.sink.take().len(), 10);
        assert_eq!(rig.net.next_deadline_ns(), None);
    }

    #[test]
    fn random_register_and_ring_garbage_never_panics() {
        for mode in [VirtioPciMode::Transitional, VirtioPciMode::Modern] {
            let mut rig = Rig::new(mode);
            if mode == VirtioPciMode::Modern {
                rig.probe_modern(LINUX_FEATURES, Some([0, 1, 2, 3]));
            } else {
                rig.probe_legacy(DEVICE_FEATURES as u32);
            }
            let mut rng = TestRng(0xfeed_beef);
            let frame = udp_frame(MAC, PEER, 200);
            for step in 0..20_000u32 {
                let r = rng.next();
                match r % 8 {
                    0 | 1 => {
                        let bar = [0usize, 1, 4][((r >> 8) % 3) as usize];
                        let offset = (r >> 16) % 0x4000;
                        let len = [1usize, 2, 4][((r >> 40) % 3) as usize];
                        rig.write(bar, offset, len, rng.next());
                    }
                    2 => {
                        let bar = [0usize, 1, 4][((r >> 8) % 3) as usize];
                        rig.read(bar, (r >> 16) % 0x4000, 4);
                    }
                    3 => {
                        // Scribble over the rings.
                        let addr = QUEUE_BASE + (r >> 8) % 0xc000;
                        rig.mem
                            .write_obj(rng.next() as u16, GuestAddress(addr))
                            .unwrap();
                    }
                    4 => {
                        let _ = rig.net.receive(&frame);
                        let _ = rig.net.can_receive();
                    }
                    5 => rig.kick(((r >> 8) % 4) as usize),
                    6 => {
                        let reg = ((r >> 8) % 64) as usize * 4;
                        rig.net
                            .config_write(reg, 0, &(rng.next() as u32).to_le_bytes());
                        let _ = rig.net.config_read(reg);
                    }
                    _ => {
                        if step % 1000 == 0 {
                            rig.net.set_link(r & 1 == 0);
                        }
                        rig.net.on_timer(u64::MAX);
                    }
                }
            }
        }
    }

    #[test]
    fn state_round_trips_and_restore_rejects_damage() {
        let mut rig = probed();
        rig.post_rx(2, 2048);
        assert_eq!(control(&mut rig, 0, 0, &[0]), CTRL_OK);
        let state = rig.net.state();
        // A fresh card on the same guest RAM continues where the saved one stopped.
        let mut restored = VirtioNet::new(
            MAC,
            rig.mem.clone(),
            rig.irq.clone(),
            rig.msi.clone(),
            rig.sink.clone(),
            rig.clock.clone(),
            VirtioPciMode::Modern,
        );
        restored.restore(state.clone()).unwrap();
        assert_eq!(restored.state(), state);
        assert_eq!(
            restored.receive(&udp_frame(PEER, MAC, 10)),
            ReceiveOutcome::Filtered
        );
        assert_eq!(
            restored.receive(&udp_frame(MAC, PEER, 10)),
            ReceiveOutcome::Delivered
        );
        assert_eq!(rig.take_used(RX_QUEUE), vec![(0, 12 + 60)]);
        let mut bad = state.clone();
        bad.transport.queues.pop();
        assert!(matches!(
            rig.net.restore(bad),
            Err(VirtioNetError::Transport(TransportError::BadLength { .. }))
        ));
        let mut bad = state;
        bad.filter.unicast = vec![[0; 6]; MAC_TABLE_ENTRIES + 1];
        assert_eq!(
            rig.net.restore(bad),
            Err(VirtioNetError::FilterTooLong(MAC_TABLE_ENTRIES + 1))
        );
    }
}
