//! Split virtqueues (VIRTIO 1.2 section 2.7) as a device sees them: the descriptor table,
//! the available ring the driver fills and the used ring the device fills.
//!
//! Emulated: direct and indirect descriptors (`VIRTQ_DESC_F_INDIRECT`, one level, the table
//! at most queue-size entries since no chain may be longer than the queue), chains walked
//! with a bound of the queue size (a looping chain is an error, never a hang), the used ring
//! written entry first and index after, interrupt suppression by
//! `VIRTQ_AVAIL_F_NO_INTERRUPT` or by the event index (`used_event` read, `avail_event`
//! written, as VIRTIO_F_EVENT_IDX asks).
//!
//! Every address the driver gives is checked against guest RAM before it is used: ring
//! placement when the queue is enabled ([`Queue::validate`]) and every buffer when its chain
//! is popped, so that writing into a popped chain never writes past a buffer. A malformed
//! ring or chain is a [`QueueError`]; the device then sets DEVICE_NEEDS_RESET.
//!
//! Not emulated: packed virtqueues (VIRTIO_F_RING_PACKED), in-order use, notification data.

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemory;

/// The buffer continues in the descriptor named by `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// The buffer is device-writable (otherwise device-readable).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// The buffer holds a table of indirect descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Driver → device: do not interrupt when using buffers (without EVENT_IDX).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Largest queue size a split virtqueue may have.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// "No MSI-X vector" in the vector registers.
pub const NO_VECTOR: u16 = 0xffff;

const DESCRIPTOR_SIZE: u64 = 16;
const USED_ELEMENT_SIZE: u64 = 8;

/// Why a queue or one of its descriptor chains cannot be used.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("the virtqueue is not enabled")]
    NotReady,
    #[error("queue size {0} is not a power of two between 1 and the device maximum")]
    BadSize(u16),
    #[error("the {what} at {address:#x} ({len} bytes) lies outside guest RAM or is misaligned")]
    RingOutOfRange {
        what: &'static str,
        address: u64,
        len: u64,
    },
    #[error("the driver advanced the available index by {0}, more than the queue size")]
    AvailIndexJump(u16),
    #[error("descriptor index {0} is beyond the queue size")]
    IndexOutOfRange(u16),
    #[error("descriptor chain longer than {0} descriptors (a loop in the chain)")]
    ChainTooLong(usize),
    #[error("buffer at {address:#x} ({len} bytes) lies outside guest RAM")]
    BufferOutOfRange { address: u64, len: u32 },
    #[error("an indirect descriptor table points to another indirect table")]
    NestedIndirect,
    #[error("indirect descriptor table length {0} is not a non-zero multiple of 16 with at most queue-size entries")]
    BadIndirectLength(u32),
    #[error("a descriptor has both INDIRECT and NEXT set")]
    IndirectWithNext,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("guest memory access at {0:#x} failed")]
    Memory(u64),
}

/// One buffer of a chain, already checked to lie inside guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub address: u64,
    pub len: u32,
    pub writable: bool,
}

/// The buffers of one available entry, in order (device-readable ones first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorChain {
    /// Index of the head descriptor (what goes into the used ring).
    pub head: u16,
    pub descriptors: Vec<Descriptor>,
}

impl DescriptorChain {
    pub fn readable_len(&self) -> u64 {
        self.descriptors
            .iter()
            .filter(|d| !d.writable)
            .map(|d| u64::from(d.len))
            .sum()
    }

    pub fn writable_len(&self) -> u64 {
        self.descriptors
            .iter()
            .filter(|d| d.writable)
            .map(|d| u64::from(d.len))
            .sum()
    }

    pub fn has_writable(&self) -> bool {
        self.descriptors.iter().any(|d| d.writable)
    }

    pub fn has_readable(&self) -> bool {
        self.descriptors.iter().any(|d| !d.writable)
    }

    /// The device-readable bytes of the chain, at most `limit` of them.
    pub fn read_readable(&self, mem: &GuestMemory, limit: usize) -> Result<Vec<u8>, QueueError> {
        let total = usize::try_from(self.readable_len())
            .unwrap_or(usize::MAX)
            .min(limit);
        let mut out = vec![0u8; total];
        let mut filled = 0;
        for d in self.descriptors.iter().filter(|d| !d.writable) {
            if filled == total {
                break;
            }
            let take = (d.len as usize).min(total - filled);
            mem.read_slice(&mut out[filled..filled + take], GuestAddress(d.address))
                .map_err(|_| QueueError::Memory(d.address))?;
            filled += take;
        }
        Ok(out)
    }

    /// Writes `data` into the device-writable buffers starting `offset` bytes into them;
    /// returns how many bytes fitted (the rest is cut off).
    pub fn write_writable(
        &self,
        mem: &GuestMemory,
        offset: usize,
        data: &[u8],
    ) -> Result<usize, QueueError> {
        let mut skip = offset;
        let mut written = 0;
        for d in self.descriptors.iter().filter(|d| d.writable) {
            if written == data.len() {
                break;
            }
            let len = d.len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let room = len - skip;
            let take = room.min(data.len() - written);
            let address = d.address + skip as u64;
            mem.write_slice(&data[written..written + take], GuestAddress(address))
                .map_err(|_| QueueError::Memory(address))?;
            written += take;
            skip = 0;
        }
        Ok(written)
    }
}

/// Whether `address..address + len` lies inside guest RAM (no wrap-around).
pub fn range_in_ram(mem: &GuestMemory, address: u64, len: u64) -> bool {
    let Ok(len_usize) = usize::try_from(len) else {
        return false;
    };
    if address.checked_add(len).is_none() {
        return false;
    }
    len == 0 || vm_memory::GuestMemoryBackend::check_range(mem, GuestAddress(address), len_usize)
}

/// One split virtqueue: what the driver programmed and where the device stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queue {
    /// Largest size the device offers (power of two).
    pub max_size: u16,
    /// Size the driver chose (power of two, at most `max_size`).
    pub size: u16,
    /// Enabled by the driver (modern queue_enable, legacy non-zero PFN) and validated.
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// Next available-ring slot the device will read (free-running).
    pub next_avail: u16,
    /// Next used-ring slot the device will write (free-running).
    pub next_used: u16,
    /// Used index at the last interrupt decision (EVENT_IDX), None before the first one.
    pub signalled_used: Option<u16>,
    /// MSI-X vector of this queue.
    pub msix_vector: u16,
    /// VIRTIO_F_EVENT_IDX was negotiated.
    pub event_idx: bool,
}

impl Queue {
    pub fn new(max_size: u16) -> Self {
        let max_size = if max_size.is_power_of_two() && max_size <= MAX_QUEUE_SIZE {
            max_size
        } else {
            256
        };
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            next_avail: 0,
            next_used: 0,
            signalled_used: None,
            msix_vector: NO_VECTOR,
            event_idx: false,
        }
    }

    /// Back to the state after device reset.
    pub fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }

    /// Sets the size the driver asked for; an invalid size is ignored (returns false).
    pub fn set_size(&mut self, size: u16) -> bool {
        if size.is_power_of_two() && size <= self.max_size {
            self.size = size;
            true
        } else {
            false
        }
    }

    fn avail_len(&self) -> u64 {
        6 + 2 * u64::from(self.size)
    }

    fn used_len(&self) -> u64 {
        6 + USED_ELEMENT_SIZE * u64::from(self.size)
    }

    /// Checks size, alignment and placement of the three rings in guest RAM.
    pub fn validate(&self, mem: &GuestMemory) -> Result<(), QueueError> {
        if !self.size.is_power_of_two() || self.size > self.max_size {
            return Err(QueueError::BadSize(self.size));
        }
        for (what, address, len, align) in [
            (
                "descriptor table",
                self.desc_table,
                DESCRIPTOR_SIZE * u64::from(self.size),
                16,
            ),
            ("available ring", self.avail_ring, self.avail_len(), 2),
            ("used ring", self.used_ring, self.used_len(), 4),
        ] {
            if !address.is_multiple_of(align) || !range_in_ram(mem, address, len) {
                return Err(QueueError::RingOutOfRange { what, address, len });
            }
        }
        Ok(())
    }

    /// Places the rings as the legacy interface does: one area at `pfn * 4096`, the used
    /// ring at the next 4096-byte boundary after the available ring.
    pub fn set_legacy_rings(&mut self, pfn: u32) {
        let base = u64::from(pfn) << 12;
        self.desc_table = base;
        self.avail_ring = base + DESCRIPTOR_SIZE * u64::from(self.size);
        self.used_ring = (self.avail_ring + self.avail_len()).next_multiple_of(4096);
    }

    fn read_u16(mem: &GuestMemory, address: u64) -> Result<u16, QueueError> {
        mem.read_obj::<u16>(GuestAddress(address))
            .map(u16::from_le)
            .map_err(|_| QueueError::Memory(address))
    }

    fn write_u16(mem: &GuestMemory, address: u64, value: u16) -> Result<(), QueueError> {
        mem.write_slice(&value.to_le_bytes(), GuestAddress(address))
            .map_err(|_| QueueError::Memory(address))
    }

    /// How many chains the driver has made available and the device not yet taken.
    pub fn pending(&self, mem: &GuestMemory) -> Result<u16, QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        let avail_idx = Self::read_u16(mem, self.avail_ring + 2)?;
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending > self.size {
            return Err(QueueError::AvailIndexJump(pending));
        }
        Ok(pending)
    }

    /// Takes the next available chain, or None if the ring is empty.
    pub fn pop(&mut self, mem: &GuestMemory) -> Result<Option<DescriptorChain>, QueueError> {
        if self.pending(mem)? == 0 {
            return Ok(None);
        }
        let slot = u64::from(self.next_avail % self.size);
        let head = Self::read_u16(mem, self.avail_ring + 4 + 2 * slot)?;
        let descriptors = self.walk_chain(mem, head)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        if self.event_idx {
            self.write_avail_event(mem)?;
        }
        Ok(Some(DescriptorChain { head, descriptors }))
    }

    /// Gives back the last `count` popped chains (they will be popped again) and, with
    /// EVENT_IDX, asks the driver again to notify from the first of them on.
    pub fn undo_pop(&mut self, mem: &GuestMemory, count: u16) -> Result<(), QueueError> {
        self.next_avail = self.next_avail.wrapping_sub(count);
        if self.event_idx && self.ready {
            self.write_avail_event(mem)?;
        }
        Ok(())
    }

    /// Tells the driver (EVENT_IDX) to notify when it makes entry `next_avail` available.
    pub fn write_avail_event(&self, mem: &GuestMemory) -> Result<(), QueueError> {
        let address = self.used_ring + 4 + USED_ELEMENT_SIZE * u64::from(self.size);
        Self::write_u16(mem, address, self.next_avail)
    }

    fn read_descriptor(
        mem: &GuestMemory,
        table: u64,
        index: u16,
    ) -> Result<(u64, u32, u16, u16), QueueError> {
        let address = table + DESCRIPTOR_SIZE * u64::from(index);
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, GuestAddress(address))
            .map_err(|_| QueueError::Memory(address))?;
        let buffer = u64::from_le_bytes([
            raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
        ]);
        let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        Ok((buffer, len, flags, next))
    }

    fn push_buffer(
        mem: &GuestMemory,
        out: &mut Vec<Descriptor>,
        address: u64,
        len: u32,
        flags: u16,
    ) -> Result<(), QueueError> {
        let writable = flags & VIRTQ_DESC_F_WRITE != 0;
        if !writable && out.iter().any(|d| d.writable) {
            return Err(QueueError::ReadableAfterWritable);
        }
        if !range_in_ram(mem, address, u64::from(len)) {
            return Err(QueueError::BufferOutOfRange { address, len });
        }
        if len > 0 {
            out.push(Descriptor {
                address,
                len,
                writable,
            });
        }
        Ok(())
    }

    /// Follows a chain from `head`, at most `size` descriptors in the table and at most the
    /// indirect table's entry count inside one indirect table.
    fn walk_chain(&self, mem: &GuestMemory, head: u16) -> Result<Vec<Descriptor>, QueueError> {
        let mut out = Vec::new();
        let mut index = head;
        let mut visited = 0usize;
        loop {
            if index >= self.size {
                return Err(QueueError::IndexOutOfRange(index));
            }
            visited += 1;
            if visited > usize::from(self.size) {
                return Err(QueueError::ChainTooLong(usize::from(self.size)));
            }
            let (address, len, flags, next) = Self::read_descriptor(mem, self.desc_table, index)?;
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(QueueError::IndirectWithNext);
                }
                Self::walk_indirect(mem, &mut out, address, len, self.size)?;
                return Ok(out);
            }
            Self::push_buffer(mem, &mut out, address, len, flags)?;
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(out);
            }
            index = next;
        }
    }

    fn walk_indirect(
        mem: &GuestMemory,
        out: &mut Vec<Descriptor>,
        table: u64,
        len: u32,
        max_entries: u16,
    ) -> Result<(), QueueError> {
        let entries = len / DESCRIPTOR_SIZE as u32;
        if len == 0
            || !u64::from(len).is_multiple_of(DESCRIPTOR_SIZE)
            || entries > u32::from(max_entries)
        {
            return Err(QueueError::BadIndirectLength(len));
        }
        if !range_in_ram(mem, table, u64::from(len)) {
            return Err(QueueError::RingOutOfRange {
                what: "indirect descriptor table",
                address: table,
                len: u64::from(len),
            });
        }
        let entries = entries as u16;
        let mut index = 0u16;
        let mut visited = 0usize;
        loop {
            if index >= entries {
                return Err(QueueError::IndexOutOfRange(index));
            }
            visited += 1;
            if visited > usize::from(entries) {
                return Err(QueueError::ChainTooLong(usize::from(entries)));
            }
            let (address, len, flags, next) = Self::read_descriptor(mem, table, index)?;
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(QueueError::NestedIndirect);
            }
            Self::push_buffer(mem, out, address, len, flags)?;
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(());
            }
            index = next;
        }
    }

    /// Puts chain `head` in the used ring with `len` bytes written, then publishes the index.
    pub fn add_used(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<(), QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        let slot = u64::from(self.next_used % self.size);
        let element = self.used_ring + 4 + USED_ELEMENT_SIZE * slot;
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        raw[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(element))
            .map_err(|_| QueueError::Memory(element))?;
        self.next_used = self.next_used.wrapping_add(1);
        Self::write_u16(mem, self.used_ring + 2, self.next_used)
    }

    /// Whether the driver wants an interrupt for the used entries added since the last call
    /// (`used_event` with EVENT_IDX, else the NO_INTERRUPT flag). Remembers the decision.
    pub fn needs_notification(&mut self, mem: &GuestMemory) -> bool {
        if !self.ready {
            return false;
        }
        let new = self.next_used;
        if self.event_idx {
            let old = self.signalled_used.replace(new);
            let Some(old) = old else {
                return true;
            };
            let event_address = self.avail_ring + 4 + 2 * u64::from(self.size);
            let Ok(event) = Self::read_u16(mem, event_address) else {
                return true;
            };
            // vring_need_event: the driver asked to hear when used passes `event`.
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            match Self::read_u16(mem, self.avail_ring) {
                Ok(flags) => flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0,
                Err(_) => true,
            }
        }
    }

    /// Whether the chains now available hold at least `bytes` device-writable bytes in
    /// total (without popping them); false on any ring error.
    pub fn writable_capacity_at_least(
        &self,
        mem: &GuestMemory,
        bytes: u64,
        one_chain: bool,
    ) -> bool {
        let Ok(pending) = self.pending(mem) else {
            return false;
        };
        let mut total = 0u64;
        for i in 0..pending {
            let slot = u64::from(self.next_avail.wrapping_add(i) % self.size);
            let Ok(head) = Self::read_u16(mem, self.avail_ring + 4 + 2 * slot) else {
                return false;
            };
            let Ok(chain) = self.walk_chain(mem, head) else {
                return false;
            };
            let capacity = chain
                .iter()
                .filter(|d| d.writable)
                .map(|d| u64::from(d.len))
                .sum::<u64>();
            if one_chain {
                if capacity >= bytes {
                    return true;
                }
                // Without merging only the next chain counts.
                return false;
            }
            total += capacity;
            if total >= bytes {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const MEM_SIZE: usize = 1 << 20;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn queue(mem: &GuestMemoryMmap, size: u16) -> Queue {
        let mut q = Queue::new(256);
        assert!(q.set_size(size));
        q.desc_table = DESC;
        q.avail_ring = AVAIL;
        q.used_ring = USED;
        q.validate(mem).unwrap();
        q.ready = true;
        q
    }

    fn put_desc(
        mem: &GuestMemoryMmap,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }

    fn offer(mem: &GuestMemoryMmap, q: &Queue, idx: u16, head: u16) {
        let slot = u64::from(idx % q.size);
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    #[test]
    fn pops_direct_and_indirect_chains_and_fills_used_ring() {
        let mem = memory();
        let mut q = queue(&mem, 8);
        put_desc(&mem, DESC, 0, 0x10000, 100, VIRTQ_DESC_F_NEXT, 3);
        put_desc(&mem, DESC, 3, 0x11000, 200, VIRTQ_DESC_F_WRITE, 0);
        offer(&mem, &q, 0, 0);
        let chain = q.pop(&mem).unwrap().unwrap();
        assert_eq!(chain.head, 0);
        assert_eq!(chain.readable_len(), 100);
        assert_eq!(chain.writable_len(), 200);
        assert!(q.pop(&mem).unwrap().is_none());
        // Indirect: table of two entries.
        put_desc(&mem, 0x8000, 0, 0x12000, 10, VIRTQ_DESC_F_NEXT, 1);
        put_desc(&mem, 0x8000, 1, 0x13000, 20, VIRTQ_DESC_F_WRITE, 0);
        put_desc(&mem, DESC, 1, 0x8000, 32, VIRTQ_DESC_F_INDIRECT, 0);
        offer(&mem, &q, 1, 1);
        let chain = q.pop(&mem).unwrap().unwrap();
        assert_eq!(chain.descriptors.len(), 2);
        assert_eq!(chain.writable_len(), 20);
        q.add_used(&mem, chain.head, 7).unwrap();
        let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        let id: u32 = mem.read_obj(GuestAddress(USED + 4)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(USED + 8)).unwrap();
        assert_eq!((used_idx, id, len), (1, 1, 7));
    }

    #[test]
    fn write_writable_spans_buffers_and_stops_at_capacity() {
        let mem = memory();
        let chain = DescriptorChain {
            head: 0,
            descriptors: vec![
                Descriptor {
                    address: 0x1000,
                    len: 4,
                    writable: false,
                },
                Descriptor {
                    address: 0x2000,
                    len: 3,
                    writable: true,
                },
                Descriptor {
                    address: 0x3000,
                    len: 3,
                    writable: true,
                },
            ],
        };
        mem.write_slice(&[0xee; 8], GuestAddress(0x3000)).unwrap();
        let n = chain
            .write_writable(&mem, 1, &[1, 2, 3, 4, 5, 6, 7])
            .unwrap();
        assert_eq!(n, 5);
        let mut b = [0u8; 3];
        mem.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert_eq!(b, [0, 1, 2]);
        let mut c = [0u8; 4];
        mem.read_slice(&mut c, GuestAddress(0x3000)).unwrap();
        assert_eq!(c, [3, 4, 5, 0xee]);
    }

    #[test]
    fn hostile_chains_are_errors_not_hangs() {
        let mem = memory();
        let mut q = queue(&mem, 4);
        // A loop 0 -> 1 -> 0.
        put_desc(&mem, DESC, 0, 0x10000, 1, VIRTQ_DESC_F_NEXT, 1);
        put_desc(&mem, DESC, 1, 0x10000, 1, VIRTQ_DESC_F_NEXT, 0);
        offer(&mem, &q, 0, 0);
        assert_eq!(q.pop(&mem), Err(QueueError::ChainTooLong(4)));
        // Buffer outside RAM, and one that runs past its end.
        let mut q = queue(&mem, 4);
        put_desc(&mem, DESC, 0, MEM_SIZE as u64 - 4, 8, 0, 0);
        offer(&mem, &q, 0, 0);
        assert!(matches!(
            q.pop(&mem),
            Err(QueueError::BufferOutOfRange { .. })
        ));
        let mut q = queue(&mem, 4);
        put_desc(&mem, DESC, 0, u64::MAX - 2, 8, 0, 0);
        offer(&mem, &q, 0, 0);
        assert!(matches!(
            q.pop(&mem),
            Err(QueueError::BufferOutOfRange { .. })
        ));
        // Head and next beyond the size.
        let mut q = queue(&mem, 4);
        offer(&mem, &q, 0, 9);
        assert_eq!(q.pop(&mem), Err(QueueError::IndexOutOfRange(9)));
        let mut q = queue(&mem, 4);
        put_desc(&mem, DESC, 0, 0x10000, 1, VIRTQ_DESC_F_NEXT, 77);
        offer(&mem, &q, 0, 0);
        assert_eq!(q.pop(&mem), Err(QueueError::IndexOutOfRange(77)));
        // Nested indirect, indirect + next, bad length, indirect loop.
        let mut q = queue(&mem, 4);
        put_desc(&mem, 0x8000, 0, 0x9000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        put_desc(&mem, DESC, 0, 0x8000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        offer(&mem, &q, 0, 0);
        assert_eq!(q.pop(&mem), Err(QueueError::NestedIndirect));
        let mut q = queue(&mem, 4);
        put_desc(
            &mem,
            DESC,
            0,
            0x8000,
            16,
            VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT,
            1,
        );
        offer(&mem, &q, 0, 0);
        assert_eq!(q.pop(&mem), Err(QueueError::IndirectWithNext));
        let mut q = queue(&mem, 4);
        put_desc(&mem, DESC, 0, 0x8000, 17, VIRTQ_DESC_F_INDIRECT, 0);
        offer(&mem, &q, 0, 0);
        assert_eq!(q.pop(&mem), Err(QueueError::BadIndirectLength(17)));
        let mut q = queue(&mem, 4);
        put_desc(&mem, DESC, 0, 0x8000, 16 * 5, VIRTQ_DESC_F_INDIRECT, 0);
        offer(&mem, &q, 0, 0);
        assert_eq!(q.pop(&mem), Err(QueueError::BadIndirectLength(80)));
        let mut q = queue(&mem, 4);
        put_desc(&mem, 0x8000, 0, 0x9000, 4, VIRTQ_DESC_F_NEXT, 1);
        put_desc(&mem, 0x8000, 1, 0x9000, 4, VIRTQ_DESC_F_NEXT, 0);
        put_desc(&mem, DESC, 0, 0x8000, 32, VIRTQ_DESC_F_INDIRECT, 0);
        offer(&mem, &q, 0, 0);
        assert_eq!(q.pop(&mem), Err(QueueError::ChainTooLong(2)));
        let mut q = queue(&mem, 4);
        put_desc(
            &mem,
            DESC,
            0,
            MEM_SIZE as u64 - 16,
            32,
            VIRTQ_DESC_F_INDIRECT,
            0,
        );
        offer(&mem, &q, 0, 0);
        assert!(matches!(
            q.pop(&mem),
            Err(QueueError::RingOutOfRange { .. })
        ));
        // Readable after writable.
        let mut q = queue(&mem, 4);
        put_desc(
            &mem,
            DESC,
            0,
            0x10000,
            4,
            VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
            1,
        );
        put_desc(&mem, DESC, 1, 0x10000, 4, 0, 0);
        offer(&mem, &q, 0, 0);
        assert_eq!(q.pop(&mem), Err(QueueError::ReadableAfterWritable));
        // Avail index jumping by more than the size.
        let mut q = queue(&mem, 4);
        mem.write_obj(5u16, GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(q.pop(&mem), Err(QueueError::AvailIndexJump(5)));
        // A zero-length buffer anywhere is accepted and skipped, even at a wild address.
        let mut q = queue(&mem, 4);
        put_desc(&mem, DESC, 0, u64::MAX, 0, VIRTQ_DESC_F_WRITE, 0);
        offer(&mem, &q, 0, 0);
        let chain = q.pop(&mem).unwrap().unwrap();
        assert!(chain.descriptors.is_empty());
    }

    #[test]
    fn sizes_and_ring_placement_are_validated() {
        let mem = memory();
        let mut q = Queue::new(256);
        assert!(!q.set_size(100));
        assert!(!q.set_size(0));
        assert!(!q.set_size(512));
        assert!(!q.set_size(65535));
        assert_eq!(q.size, 256);
        q.desc_table = MEM_SIZE as u64 - 16;
        q.avail_ring = AVAIL;
        q.used_ring = USED;
        assert!(matches!(
            q.validate(&mem),
            Err(QueueError::RingOutOfRange {
                what: "descriptor table",
                ..
            })
        ));
        q.desc_table = DESC + 8;
        assert!(q.validate(&mem).is_err());
        q.desc_table = DESC;
        q.used_ring = u64::MAX - 8;
        assert!(q.validate(&mem).is_err());
        q.used_ring = USED;
        assert!(q.validate(&mem).is_ok());
        q.set_legacy_rings(1);
        assert_eq!(
            (q.desc_table, q.avail_ring, q.used_ring),
            (0x1000, 0x2000, 0x3000)
        );
    }

    #[test]
    fn event_index_and_no_interrupt_flag_suppress_notifications() {
        let mem = memory();
        let mut q = queue(&mem, 8);
        // Without EVENT_IDX: flag decides.
        q.next_used = 1;
        assert!(q.needs_notification(&mem));
        mem.write_obj(VIRTQ_AVAIL_F_NO_INTERRUPT, GuestAddress(AVAIL))
            .unwrap();
        assert!(!q.needs_notification(&mem));
        // With EVENT_IDX: used_event = 2 means "tell me when used passes index 2".
        q.event_idx = true;
        let used_event = AVAIL + 4 + 2 * 8;
        mem.write_obj(2u16, GuestAddress(used_event)).unwrap();
        q.next_used = 1;
        assert!(q.needs_notification(&mem)); // first decision always notifies
        q.next_used = 2;
        assert!(!q.needs_notification(&mem)); // used 1 -> 2 does not pass entry 2
        q.next_used = 3;
        assert!(q.needs_notification(&mem)); // entry 2 now used
        q.next_used = 4;
        assert!(!q.needs_notification(&mem));
        // avail_event written on pop.
        put_desc(&mem, DESC, 0, 0x10000, 4, 0, 0);
        offer(&mem, &q, 0, 0);
        q.pop(&mem).unwrap().unwrap();
        let avail_event: u16 = mem.read_obj(GuestAddress(USED + 4 + 8 * 8)).unwrap();
        assert_eq!(avail_event, 1);
        q.undo_pop(&mem, 1).unwrap();
        let avail_event: u16 = mem.read_obj(GuestAddress(USED + 4 + 8 * 8)).unwrap();
        assert_eq!(avail_event, 0);
        assert_eq!(q.pop(&mem).unwrap().unwrap().head, 0);
    }
}
