//! The contract between network cards and the engine's network backend, and the frame
//! helpers the cards share (checksum offload, TCP segmentation, address filters, FCS).
//!
//! Data flow:
//! - guest → wire: a card DMAs a frame out of guest RAM when the guest rings its transmit
//!   doorbell and hands it to its [`FrameSink`] (the engine's NAT or TAP backend). Frames
//!   handed to the sink never carry an FCS; checksum offloads and TCP segmentation have
//!   already been applied.
//! - wire → guest: the engine's I/O thread calls [`NetworkCard::receive`] with one Ethernet
//!   frame without FCS. Before that it asks [`NetworkCard::can_receive`]: while that is
//!   false it holds frames back in its own bounded queue (and drops the oldest when that
//!   overflows). A frame given while `can_receive` is false is lost and counted.
//!
//! Receive rules every card follows: frames shorter than [`ETH_HEADER_LEN`] are runts and
//! dropped; frames shorter than [`ETH_MIN_FRAME_LEN`] are zero-padded to it (as the sender's
//! MAC would have); frames longer than [`ETH_MAX_FRAME_LEN_VLAN`] (1522) are dropped unless
//! the card accepts long packets, and frames longer than [`MAX_JUMBO_FRAME_LEN`] always are.
//!
//! Locking: a card lives in an `Arc<Mutex<..>>` shared by the PCI bus (vCPU threads) and the
//! I/O thread. A card calls its sink with its own lock held, so a sink must never call back
//! into the card; it should queue the frame and return.
//!
//! Not here: the backends themselves (NAT, TAP) and multi-queue (one queue per direction).

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Destination + source MAC + EtherType.
pub const ETH_HEADER_LEN: usize = 14;
/// Shortest frame on the wire without FCS (64 with it).
pub const ETH_MIN_FRAME_LEN: usize = 60;
/// Longest untagged standard frame without FCS.
pub const ETH_MAX_FRAME_LEN: usize = 1514;
/// Longest 802.1Q-tagged standard frame without FCS.
pub const ETH_MAX_FRAME_LEN_VLAN: usize = 1518 + 4;
/// Frame check sequence length.
pub const ETH_FCS_LEN: usize = 4;
/// Longest jumbo frame any card here accepts (without FCS).
pub const MAX_JUMBO_FRAME_LEN: usize = 16384;
/// Longest frame a guest may hand over for TCP segmentation (64 KiB of IP plus headers).
pub const MAX_TSO_FRAME_LEN: usize = 65536 + 256;
/// Smallest MSS accepted for segmentation (smaller ones are treated as hostile).
pub const MIN_TSO_MSS: usize = 64;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const IP_PROTO_TCP: u8 = 6;
pub const IP_PROTO_UDP: u8 = 17;

const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_PSH: u8 = 0x08;
const TCP_FLAG_CWR: u8 = 0x80;

/// Card → backend: where transmitted frames go.
pub trait FrameSink: Send + Sync {
    /// One complete Ethernet frame without FCS, as the guest transmitted it (after offloads).
    fn send(&self, frame: &[u8]);
    /// The guest just gave the card receive buffers (a doorbell write): a good moment to
    /// retry frames held back while `can_receive` was false. Called with the card locked,
    /// so it must only signal (wake the I/O thread), never call into the card. Cards whose
    /// guests return buffers without a doorbell (RTL8139 C+ mode) do not call it: the
    /// engine must also retry on its own (for instance every millisecond while it holds
    /// frames back).
    fn rx_ready(&self) {}
}

/// Why a card dropped a received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DropReason {
    /// The cable is unplugged.
    LinkDown,
    /// The guest has not enabled reception (or reset the card).
    ReceiverDisabled,
    /// Shorter than an Ethernet header.
    Runt,
    /// Longer than the card accepts.
    TooLong,
    /// The receive ring or buffer lies outside guest RAM, or bus mastering is off.
    DmaError,
}

/// What became of a frame given to [`NetworkCard::receive`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReceiveOutcome {
    /// Written to guest RAM (the guest will see it).
    Delivered,
    /// Not for this card (address filters); not counted as a drop.
    Filtered,
    /// The guest gave no room for it; dropped and counted (missed packet).
    NoBuffers,
    /// Dropped and counted for another reason.
    Dropped(DropReason),
}

/// Traffic counters of one card, in the guest's view (bytes without FCS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames the card could not deliver (no buffers, bad size, DMA errors, link down).
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames the guest queued that were not sent (bad size, bad offload, link down).
    pub tx_dropped: u64,
}

impl NicCounters {
    pub fn count_rx(&mut self, len: usize) {
        self.rx_packets += 1;
        self.rx_bytes += len as u64;
    }
    pub fn count_tx(&mut self, len: usize) {
        self.tx_packets += 1;
        self.tx_bytes += len as u64;
    }
}

/// Backend → card. Implemented by every network card model.
pub trait NetworkCard: Send {
    /// Delivers one frame (no FCS) to the guest.
    fn receive(&mut self, frame: &[u8]) -> ReceiveOutcome;
    /// Whether a maximum-size frame fits in the guest's receive buffers now.
    fn can_receive(&self) -> bool;
    /// Plugs (`true`) or unplugs the cable; the guest sees a link-change interrupt.
    fn set_link(&mut self, up: bool);
    fn link_up(&self) -> bool;
    fn counters(&self) -> NicCounters;
    /// The card's factory MAC address (what its EEPROM holds).
    fn mac(&self) -> [u8; 6];
}

/// A sink that keeps every frame, for tests (of cards and of the engine).
#[derive(Default)]
pub struct RecordingSink {
    frames: Mutex<Vec<Vec<u8>>>,
}

impl RecordingSink {
    pub fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self::default())
    }
    /// The frames sent so far, removing them.
    pub fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.frames.lock().unwrap_or_else(|e| e.into_inner()))
    }
    pub fn len(&self) -> usize {
        self.frames.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FrameSink for RecordingSink {
    fn send(&self, frame: &[u8]) {
        self.frames
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(frame.to_vec());
    }
}

/// A sink that discards everything (a card with no backend attached).
pub struct NullSink;
impl FrameSink for NullSink {
    fn send(&self, _frame: &[u8]) {}
}

// ---- addresses ----

pub fn is_broadcast(mac: &[u8]) -> bool {
    mac.len() >= 6 && mac[..6] == [0xff; 6]
}

/// Group bit set (broadcast included).
pub fn is_multicast(mac: &[u8]) -> bool {
    mac.first().is_some_and(|b| b & 1 != 0)
}

/// The destination address of a frame (caller guarantees at least 6 bytes, else zeros).
pub fn destination(frame: &[u8]) -> [u8; 6] {
    let mut dst = [0u8; 6];
    if let Some(d) = frame.get(..6) {
        dst.copy_from_slice(d);
    }
    dst
}

/// The Ethernet CRC as the Linux `ether_crc` computes it (bits taken LSB first, shifted
/// left, polynomial 0x04c11db7, no final inversion): RTL8139 multicast hash is its top 6 bits.
pub fn ether_crc_be(data: &[u8]) -> u32 {
    let mut crc: u32 = 0xffff_ffff;
    for &byte in data {
        let mut octet = byte;
        for _ in 0..8 {
            let feedback = (crc >> 31) ^ u32::from(octet & 1);
            crc <<= 1;
            if feedback != 0 {
                crc ^= 0x04c1_1db7;
            }
            octet >>= 1;
        }
    }
    crc
}

/// IEEE 802.3 CRC-32 (reflected, as in the FCS and zlib).
pub fn crc32_ieee(data: &[u8]) -> u32 {
    let mut crc: u32 = 0xffff_ffff;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

/// The 4 FCS bytes as they follow the frame on the wire.
pub fn fcs(frame: &[u8]) -> [u8; 4] {
    crc32_ieee(frame).to_le_bytes()
}

/// Zero-pads `frame` to the minimum Ethernet length.
pub fn pad_to_minimum(frame: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if frame.len() >= ETH_MIN_FRAME_LEN {
        std::borrow::Cow::Borrowed(frame)
    } else {
        let mut padded = frame.to_vec();
        padded.resize(ETH_MIN_FRAME_LEN, 0);
        std::borrow::Cow::Owned(padded)
    }
}

// ---- checksums ----

/// Adds `data` as big-endian 16-bit words (odd tail padded with zero) to `sum`.
pub fn ones_complement_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([pair[0], pair[1]])));
        // Fold early so that even 4 GiB of data cannot overflow.
        if sum > 0xffff_0000 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

/// Folds a 32-bit sum into 16 bits (not complemented).
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum (RFC 1071) of `data`: complement of the folded sum.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(ones_complement_add(0, data))
}

/// Where the IP header of a frame starts, skipping one 802.1Q tag; with the EtherType.
pub fn l3_offset(frame: &[u8]) -> Option<(usize, u16)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if ethertype == ETHERTYPE_VLAN {
        let inner = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
        Some((18, inner))
    } else {
        Some((ETH_HEADER_LEN, ethertype))
    }
}

/// What the IP layer of a frame says, all offsets from the start of the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpInfo {
    pub ip_offset: usize,
    pub is_ipv4: bool,
    pub ip_header_len: usize,
    /// Transport protocol (IPv6: the Next Header of the fixed header, no extension walk).
    pub protocol: u8,
    pub l4_offset: usize,
    /// End of the IP packet (the IP length field, clamped to the frame).
    pub ip_end: usize,
    /// IPv4 fragment (MF set or offset non-zero): no transport checksum possible.
    pub is_fragment: bool,
}

/// Parses the IPv4 or IPv6 header starting at `ip_offset`.
pub fn parse_ip_at(frame: &[u8], ip_offset: usize) -> Option<IpInfo> {
    let first = *frame.get(ip_offset)?;
    match first >> 4 {
        4 => {
            let ip_header_len = usize::from(first & 0x0f) * 4;
            if ip_header_len < 20 || frame.len() < ip_offset + ip_header_len {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([
                frame[ip_offset + 2],
                frame[ip_offset + 3],
            ]));
            let flags_fragment = u16::from_be_bytes([frame[ip_offset + 6], frame[ip_offset + 7]]);
            let ip_end = if total == 0 {
                frame.len()
            } else {
                (ip_offset + total).min(frame.len())
            };
            Some(IpInfo {
                ip_offset,
                is_ipv4: true,
                ip_header_len,
                protocol: frame[ip_offset + 9],
                l4_offset: ip_offset + ip_header_len,
                ip_end: ip_end.max(ip_offset + ip_header_len),
                is_fragment: flags_fragment & 0x3fff != 0,
            })
        }
        6 => {
            if frame.len() < ip_offset + 40 {
                return None;
            }
            let payload = usize::from(u16::from_be_bytes([
                frame[ip_offset + 4],
                frame[ip_offset + 5],
            ]));
            let ip_end = if payload == 0 {
                frame.len()
            } else {
                (ip_offset + 40 + payload).min(frame.len())
            };
            Some(IpInfo {
                ip_offset,
                is_ipv4: false,
                ip_header_len: 40,
                protocol: frame[ip_offset + 6],
                l4_offset: ip_offset + 40,
                ip_end,
                is_fragment: false,
            })
        }
        _ => None,
    }
}

/// Parses the IP header of an Ethernet frame (after an optional VLAN tag).
pub fn parse_ip(frame: &[u8]) -> Option<IpInfo> {
    let (offset, ethertype) = l3_offset(frame)?;
    match ethertype {
        ETHERTYPE_IPV4 | ETHERTYPE_IPV6 => parse_ip_at(frame, offset),
        _ => None,
    }
}

/// Sum of the TCP/UDP pseudo-header for `l4_len` bytes of transport data.
fn pseudo_header_sum(frame: &[u8], ip: &IpInfo, l4_len: usize) -> u32 {
    let o = ip.ip_offset;
    let addresses = if ip.is_ipv4 {
        frame.get(o + 12..o + 20)
    } else {
        frame.get(o + 8..o + 40)
    };
    let mut sum = ones_complement_add(0, addresses.unwrap_or(&[]));
    sum = sum.wrapping_add(u32::from(ip.protocol));
    sum = sum.wrapping_add((l4_len as u32) >> 16);
    sum.wrapping_add((l4_len as u32) & 0xffff)
}

/// Offset of the checksum field inside a TCP or UDP header.
fn l4_checksum_field(protocol: u8) -> Option<usize> {
    match protocol {
        IP_PROTO_TCP => Some(16),
        IP_PROTO_UDP => Some(6),
        _ => None,
    }
}

/// Errors of the offload helpers (the card drops the frame and counts it).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OffloadError {
    #[error("the frame carries no IPv4/IPv6 header the card can parse")]
    NotIp,
    #[error("the frame is not TCP (or UDP) where an offload needs it")]
    NotTcpOrUdp,
    #[error("a header offset or length points outside the frame")]
    OutOfRange,
    #[error("segmentation MSS {0} is below the minimum of {MIN_TSO_MSS}")]
    BadMss(usize),
}

/// Writes the IPv4 header checksum of the header at `ip.ip_offset`.
pub fn fill_ipv4_header_checksum(frame: &mut [u8], ip: &IpInfo) -> Result<(), OffloadError> {
    if !ip.is_ipv4 {
        return Ok(());
    }
    let header = frame
        .get_mut(ip.ip_offset..ip.ip_offset + ip.ip_header_len)
        .ok_or(OffloadError::OutOfRange)?;
    header[10] = 0;
    header[11] = 0;
    let sum = internet_checksum(header);
    header[10..12].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Computes the TCP or UDP checksum from scratch (pseudo-header included) and writes it.
pub fn fill_l4_checksum(frame: &mut [u8], ip: &IpInfo) -> Result<(), OffloadError> {
    let field = l4_checksum_field(ip.protocol).ok_or(OffloadError::NotTcpOrUdp)?;
    if ip.is_fragment {
        return Err(OffloadError::NotTcpOrUdp);
    }
    let end = ip.ip_end.min(frame.len());
    if end < ip.l4_offset + field + 2 {
        return Err(OffloadError::OutOfRange);
    }
    let l4_len = end - ip.l4_offset;
    frame[ip.l4_offset + field] = 0;
    frame[ip.l4_offset + field + 1] = 0;
    let sum = pseudo_header_sum(frame, ip, l4_len);
    let mut checksum = !fold(ones_complement_add(sum, &frame[ip.l4_offset..end]));
    if checksum == 0 && ip.protocol == IP_PROTO_UDP {
        checksum = 0xffff;
    }
    frame[ip.l4_offset + field..ip.l4_offset + field + 2].copy_from_slice(&checksum.to_be_bytes());
    Ok(())
}

/// Intel-style checksum insertion: the complemented sum of `frame[start..=end]` (`end` None
/// or past the frame: to the end) stored big-endian at `field`. The guest seeds the field
/// (with the pseudo-header sum for TCP/UDP). A zero result is stored as 0xffff when
/// `nonzero`. Out-of-range offsets do nothing and return false.
pub fn insert_checksum(
    frame: &mut [u8],
    start: usize,
    end: Option<usize>,
    field: usize,
    nonzero: bool,
) -> bool {
    let stop = match end {
        Some(e) if e < frame.len() => e + 1,
        _ => frame.len(),
    };
    if start >= stop || field + 2 > frame.len() {
        return false;
    }
    let mut sum = !fold(ones_complement_add(0, &frame[start..stop]));
    if sum == 0 && nonzero {
        sum = 0xffff;
    }
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    true
}

/// What a card's receive checksum offload reports about a frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxChecksums {
    /// IPv4 header checksum checked: Some(valid).
    pub ipv4_header: Option<bool>,
    /// TCP checksum checked: Some(valid).
    pub tcp: Option<bool>,
    /// UDP checksum checked: Some(valid) (a zero UDP checksum over IPv4 is valid).
    pub udp: Option<bool>,
}

/// Verifies the IPv4 header and TCP/UDP checksums of a received frame.
pub fn verify_checksums(frame: &[u8]) -> RxChecksums {
    let mut result = RxChecksums::default();
    let Some(ip) = parse_ip(frame) else {
        return result;
    };
    if ip.is_ipv4 {
        if let Some(header) = frame.get(ip.ip_offset..ip.ip_offset + ip.ip_header_len) {
            result.ipv4_header = Some(fold(ones_complement_add(0, header)) == 0xffff);
        }
    }
    if ip.is_fragment || ip.ip_end < ip.l4_offset {
        return result;
    }
    let Some(segment) = frame.get(ip.l4_offset..ip.ip_end) else {
        return result;
    };
    let valid = || {
        let sum = pseudo_header_sum(frame, &ip, segment.len());
        fold(ones_complement_add(sum, segment)) == 0xffff
    };
    match ip.protocol {
        IP_PROTO_TCP if segment.len() >= 20 => result.tcp = Some(valid()),
        IP_PROTO_UDP if segment.len() >= 8 => {
            let zero = segment[6] == 0 && segment[7] == 0;
            result.udp = Some((zero && ip.is_ipv4) || valid());
        }
        _ => {}
    }
    result
}

// ---- VLAN ----

/// The frame with a 802.1Q tag (`tpid`, `tci`) inserted after the source address.
pub fn insert_vlan_tag(frame: &[u8], tpid: u16, tci: u16) -> Vec<u8> {
    let mut tagged = Vec::with_capacity(frame.len() + 4);
    let split = frame.len().min(12);
    tagged.extend_from_slice(&frame[..split]);
    tagged.extend_from_slice(&tpid.to_be_bytes());
    tagged.extend_from_slice(&tci.to_be_bytes());
    tagged.extend_from_slice(&frame[split..]);
    tagged
}

/// If the frame carries a tag with `tpid`, the frame without it and the TCI.
pub fn strip_vlan_tag(frame: &[u8], tpid: u16) -> Option<(Vec<u8>, u16)> {
    if frame.len() < 18 || u16::from_be_bytes([frame[12], frame[13]]) != tpid {
        return None;
    }
    let tci = u16::from_be_bytes([frame[14], frame[15]]);
    let mut untagged = Vec::with_capacity(frame.len() - 4);
    untagged.extend_from_slice(&frame[..12]);
    untagged.extend_from_slice(&frame[16..]);
    Some((untagged, tci))
}

// ---- TCP segmentation ----

/// Where the headers of a frame to segment are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TsoParams {
    pub ip_offset: usize,
    pub l4_offset: usize,
    /// Bytes of headers (Ethernet + IP + TCP) copied in front of every segment.
    pub header_len: usize,
    /// Payload bytes per segment.
    pub mss: usize,
}

impl TsoParams {
    /// Derives the header layout from the frame itself (IPv4/IPv6 + TCP).
    pub fn from_frame(frame: &[u8], mss: usize) -> Result<Self, OffloadError> {
        let ip = parse_ip(frame).ok_or(OffloadError::NotIp)?;
        if ip.protocol != IP_PROTO_TCP {
            return Err(OffloadError::NotTcpOrUdp);
        }
        let data_offset = frame
            .get(ip.l4_offset + 12)
            .ok_or(OffloadError::OutOfRange)?;
        let tcp_len = usize::from(data_offset >> 4) * 4;
        Ok(Self {
            ip_offset: ip.ip_offset,
            l4_offset: ip.l4_offset,
            header_len: ip.l4_offset + tcp_len.max(20),
            mss,
        })
    }
}

/// Cuts a large TCP frame into MSS-sized frames: per segment the IPv4 total length, ID
/// (+1 per segment) and header checksum, or the IPv6 payload length, the TCP sequence
/// number, FIN/PSH (last segment only), CWR (first only) and the TCP checksum (computed from
/// scratch) are fixed up. Calls `emit` once per segment and returns the number of segments.
pub fn segment_tcp(
    frame: &[u8],
    params: &TsoParams,
    emit: &mut dyn FnMut(&[u8]),
) -> Result<usize, OffloadError> {
    if params.mss < MIN_TSO_MSS {
        return Err(OffloadError::BadMss(params.mss));
    }
    let header_len = params.header_len;
    if header_len > frame.len()
        || params.l4_offset + 20 > header_len
        || params.ip_offset + 20 > params.l4_offset
    {
        return Err(OffloadError::OutOfRange);
    }
    let header = &frame[..header_len];
    let ip = parse_ip_at(header, params.ip_offset).ok_or(OffloadError::NotIp)?;
    if ip.protocol != IP_PROTO_TCP {
        return Err(OffloadError::NotTcpOrUdp);
    }
    let payload = &frame[header_len..];
    let l4 = params.l4_offset;
    let seq0 = u32::from_be_bytes([
        header[l4 + 4],
        header[l4 + 5],
        header[l4 + 6],
        header[l4 + 7],
    ]);
    let flags0 = header[l4 + 13];
    let id0 = if ip.is_ipv4 {
        u16::from_be_bytes([header[ip.ip_offset + 4], header[ip.ip_offset + 5]])
    } else {
        0
    };
    let chunks: Vec<&[u8]> = if payload.is_empty() {
        vec![&[][..]]
    } else {
        payload.chunks(params.mss).collect()
    };
    let count = chunks.len();
    let mut segment = Vec::with_capacity(header_len + params.mss);
    for (index, chunk) in chunks.into_iter().enumerate() {
        segment.clear();
        segment.extend_from_slice(header);
        segment.extend_from_slice(chunk);
        let seg_len = segment.len();
        let o = params.ip_offset;
        if ip.is_ipv4 {
            let total = (seg_len - o) as u16;
            segment[o + 2..o + 4].copy_from_slice(&total.to_be_bytes());
            let id = id0.wrapping_add(index as u16);
            segment[o + 4..o + 6].copy_from_slice(&id.to_be_bytes());
        } else {
            let payload_len = (seg_len - o - 40) as u16;
            segment[o + 4..o + 6].copy_from_slice(&payload_len.to_be_bytes());
        }
        let seq = seq0.wrapping_add((index * params.mss) as u32);
        segment[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if index + 1 != count {
            flags &= !(TCP_FLAG_FIN | TCP_FLAG_PSH);
        }
        if index != 0 {
            flags &= !TCP_FLAG_CWR;
        }
        segment[l4 + 13] = flags;
        let seg_ip = IpInfo {
            ip_end: seg_len,
            l4_offset: l4,
            ..ip
        };
        fill_ipv4_header_checksum(&mut segment, &seg_ip)?;
        fill_l4_checksum(&mut segment, &seg_ip)?;
        emit(&segment);
    }
    Ok(count)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A real Ethernet/IPv4/UDP frame from 10.0.2.15:1234 to 10.0.2.2:53 with correct
    /// checksums, `payload_len` bytes of payload.
    pub(crate) fn udp_frame(dst: [u8; 6], src: [u8; 6], payload_len: usize) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let total = 20 + 8 + payload_len;
        f.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0x12,
            0x34,
            0x40,
            0,
        ]);
        f.extend_from_slice(&[64, IP_PROTO_UDP, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2]);
        let udp_len = 8 + payload_len;
        f.extend_from_slice(&[0x04, 0xd2, 0, 53, (udp_len >> 8) as u8, udp_len as u8, 0, 0]);
        f.extend((0..payload_len).map(|i| (i * 7 + 3) as u8));
        let ip = parse_ip(&f).unwrap();
        fill_ipv4_header_checksum(&mut f, &ip).unwrap();
        fill_l4_checksum(&mut f, &ip).unwrap();
        f
    }

    /// An Ethernet/IPv4/TCP frame with correct checksums.
    pub(crate) fn tcp_frame(dst: [u8; 6], src: [u8; 6], payload_len: usize) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let total = 20 + 20 + payload_len;
        f.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0x00,
            0x10,
            0x40,
            0,
        ]);
        f.extend_from_slice(&[64, IP_PROTO_TCP, 0, 0, 10, 0, 2, 15, 93, 184, 216, 34]);
        f.extend_from_slice(&[0xc0, 0x01, 0, 80, 0, 0, 0x10, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0x50, 0x18 | 0x01, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend((0..payload_len).map(|i| (i * 13 + 1) as u8));
        let ip = parse_ip(&f).unwrap();
        fill_ipv4_header_checksum(&mut f, &ip).unwrap();
        fill_l4_checksum(&mut f, &ip).unwrap();
        f
    }

    /// Reference checksum: straightforward RFC 1071 with u64 accumulation.
    pub(crate) fn reference_checksum(data: &[u8]) -> u16 {
        let mut sum: u64 = 0;
        for (i, b) in data.iter().enumerate() {
            sum += if i.is_multiple_of(2) {
                u64::from(*b) << 8
            } else {
                u64::from(*b)
            };
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// Reference UDP/TCP-over-IPv4 checksum of a frame (field included as zero).
    pub(crate) fn reference_l4_checksum(frame: &[u8]) -> u16 {
        let ihl = usize::from(frame[14] & 0xf) * 4;
        let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
        let l4 = &frame[14 + ihl..14 + total];
        let proto = frame[23];
        let field = if proto == IP_PROTO_TCP { 16 } else { 6 };
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&frame[26..34]);
        pseudo.extend_from_slice(&[0, proto]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        let mut seg = l4.to_vec();
        seg[field] = 0;
        seg[field + 1] = 0;
        pseudo.extend_from_slice(&seg);
        reference_checksum(&pseudo)
    }

    #[test]
    fn checksum_matches_rfc1071_examples_and_reference() {
        // RFC 1071 section 3 example: sum 0xddf2, checksum 0x220d.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&data), 0x220d);
        let mut rng = crate::test_support::TestRng(7);
        for len in [0usize, 1, 2, 3, 59, 60, 1499, 1500, 9000] {
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            assert_eq!(
                internet_checksum(&data),
                reference_checksum(&data),
                "len {len}"
            );
        }
    }

    #[test]
    fn crc_functions_match_known_values() {
        assert_eq!(crc32_ieee(b"123456789"), 0xcbf4_3926);
        // Linux ether_crc of the all-hosts group 01:00:5e:00:00:01: top 6 bits index MAR.
        let idx = ether_crc_be(&[0x01, 0x00, 0x5e, 0x00, 0x00, 0x01]) >> 26;
        assert!(idx < 64);
        // Determinism and sensitivity.
        assert_ne!(ether_crc_be(&[1, 2, 3]), ether_crc_be(&[1, 2, 4]));
    }

    #[test]
    fn udp_and_tcp_checksums_verify_and_match_reference() {
        let f = udp_frame([0xff; 6], [2, 0, 0, 0, 0, 1], 100);
        assert_eq!(
            u16::from_be_bytes([f[40], f[41]]),
            reference_l4_checksum(&f)
        );
        assert_eq!(
            u16::from_be_bytes([f[24], f[25]]),
            reference_checksum(&{
                let mut h = f[14..34].to_vec();
                h[10] = 0;
                h[11] = 0;
                h
            })
        );
        let v = verify_checksums(&f);
        assert_eq!(v.ipv4_header, Some(true));
        assert_eq!(v.udp, Some(true));
        let mut bad = f.clone();
        bad[50] ^= 0xff;
        assert_eq!(verify_checksums(&bad).udp, Some(false));
        let t = tcp_frame([0xff; 6], [2, 0, 0, 0, 0, 1], 33);
        assert_eq!(verify_checksums(&t).tcp, Some(true));
        assert_eq!(
            u16::from_be_bytes([t[50], t[51]]),
            reference_l4_checksum(&t)
        );
    }

    #[test]
    fn intel_style_insertion_with_seeded_pseudo_header() {
        let f = udp_frame([0xff; 6], [2, 0, 0, 0, 0, 1], 31);
        let mut g = f.clone();
        // Seed: the pseudo-header sum (not complemented), as Linux does for CHECKSUM_PARTIAL.
        let ip = parse_ip(&g).unwrap();
        let seed = fold(pseudo_header_sum(&g, &ip, g.len() - 34));
        g[40..42].copy_from_slice(&seed.to_be_bytes());
        assert!(insert_checksum(&mut g, 34, None, 40, true));
        assert_eq!(g, f);
        assert!(!insert_checksum(&mut g, 34, None, 5000, true));
        assert!(!insert_checksum(&mut g, 5000, None, 40, true));
    }

    #[test]
    fn segmentation_produces_valid_segments() {
        let big = tcp_frame([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], 3000);
        let params = TsoParams::from_frame(&big, 1000).unwrap();
        let mut segs = Vec::new();
        let n = segment_tcp(&big, &params, &mut |s| segs.push(s.to_vec())).unwrap();
        assert_eq!(n, 3);
        let mut payload = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert_eq!(s.len(), 54 + 1000);
            let v = verify_checksums(s);
            assert_eq!(v.ipv4_header, Some(true));
            assert_eq!(v.tcp, Some(true));
            let seq = u32::from_be_bytes([s[38], s[39], s[40], s[41]]);
            assert_eq!(seq, 0x1000 + 1000 * i as u32);
            assert_eq!(u16::from_be_bytes([s[18], s[19]]), 0x10 + i as u16);
            let fin = s[47] & TCP_FLAG_FIN != 0;
            assert_eq!(fin, i == 2);
            payload.extend_from_slice(&s[54..]);
        }
        assert_eq!(payload, big[54..].to_vec());
        assert_eq!(
            segment_tcp(&big, &TsoParams { mss: 1, ..params }, &mut |_| {}),
            Err(OffloadError::BadMss(1))
        );
        assert_eq!(
            segment_tcp(
                &big[..40],
                &TsoParams {
                    header_len: 54,
                    ..params
                },
                &mut |_| {}
            ),
            Err(OffloadError::OutOfRange)
        );
    }

    #[test]
    fn vlan_tags_round_trip() {
        let f = udp_frame([0xff; 6], [2, 0, 0, 0, 0, 1], 10);
        let t = insert_vlan_tag(&f, ETHERTYPE_VLAN, 0x2005);
        assert_eq!(t.len(), f.len() + 4);
        assert_eq!(parse_ip(&t).unwrap().ip_offset, 18);
        let (u, tci) = strip_vlan_tag(&t, ETHERTYPE_VLAN).unwrap();
        assert_eq!((u, tci), (f.clone(), 0x2005));
        assert!(strip_vlan_tag(&f, ETHERTYPE_VLAN).is_none());
    }

    #[test]
    fn parsers_survive_garbage() {
        let mut rng = crate::test_support::TestRng(99);
        for _ in 0..2000 {
            let len = (rng.next() % 120) as usize;
            let mut f: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if len > 14 {
                f[12] = 0x08;
                f[13] = 0;
                f[14] = if rng.next().is_multiple_of(2) {
                    0x45
                } else {
                    0x6f
                };
            }
            let _ = verify_checksums(&f);
            if let Some(ip) = parse_ip(&f) {
                let _ = fill_ipv4_header_checksum(&mut f, &ip);
                let _ = fill_l4_checksum(&mut f, &ip);
            }
            if let Ok(p) = TsoParams::from_frame(&f, 64) {
                let _ = segment_tcp(&f, &p, &mut |_| {});
            }
            let _ = strip_vlan_tag(&f, ETHERTYPE_VLAN);
        }
    }
}
