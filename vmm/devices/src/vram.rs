//! Video memory shared by a display card, the guest's linear-framebuffer mapping and the
//! renderer.
//!
//! The memory is one anonymous mapping (a `vm-memory` region at offset 0). The engine maps
//! the same host pages into the guest as a KVM memory slot with dirty logging, so guest
//! writes through the linear framebuffer never exit; the device reads and writes it through
//! the bounded accessors below (planar VGA access, the banked window, the blitter), and
//! those writes are recorded in the device-side dirty bitmap. Every accessor clips to the
//! VRAM size: an out-of-range read returns 0xff bytes, an out-of-range write is dropped.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Size of a dirty-tracking page (KVM's dirty log granularity).
pub const PAGE_SIZE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum VramError {
    #[error("video memory of {0} bytes is not a non-zero multiple of 4 KiB")]
    BadSize(usize),
    #[error("cannot allocate {bytes} bytes of video memory: {reason}")]
    Allocation { bytes: usize, reason: String },
}

/// A set of dirty 4 KiB pages of VRAM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyPages {
    bits: Vec<u64>,
    pages: usize,
}

impl DirtyPages {
    /// An empty set for `pages` pages.
    pub fn new(pages: usize) -> Self {
        Self {
            bits: vec![0; pages.div_ceil(64)],
            pages,
        }
    }

    /// All `pages` pages dirty (a full redraw).
    pub fn all(pages: usize) -> Self {
        let mut d = Self::new(pages);
        d.mark_range(0, pages * PAGE_SIZE);
        d
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Marks every page touching `[offset, offset + len)`.
    pub fn mark_range(&mut self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE;
        let last = (offset.saturating_add(len - 1) / PAGE_SIZE).min(self.pages.saturating_sub(1));
        for page in first..=last {
            if page < self.pages {
                self.bits[page / 64] |= 1 << (page % 64);
            }
        }
    }

    pub fn is_dirty(&self, page: usize) -> bool {
        page < self.pages && self.bits[page / 64] & (1 << (page % 64)) != 0
    }

    /// Whether any page touching `[offset, offset + len)` is dirty.
    pub fn any_in(&self, offset: usize, len: usize) -> bool {
        if len == 0 {
            return false;
        }
        let first = offset / PAGE_SIZE;
        let last = offset.saturating_add(len - 1) / PAGE_SIZE;
        (first..=last.min(self.pages.saturating_sub(1))).any(|p| self.is_dirty(p))
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }

    /// Adds the pages of a KVM dirty-log bitmap (bit n of word n/64 = page n).
    pub fn merge_bitmap(&mut self, bitmap: &[u64]) {
        for (word, extra) in self.bits.iter_mut().zip(bitmap) {
            *word |= *extra;
        }
        self.clear_tail();
    }

    /// Adds another set.
    pub fn merge(&mut self, other: &DirtyPages) {
        self.merge_bitmap(&other.bits);
    }

    pub fn clear(&mut self) {
        self.bits.iter_mut().for_each(|w| *w = 0);
    }

    fn clear_tail(&mut self) {
        if !self.pages.is_multiple_of(64) {
            if let Some(last) = self.bits.last_mut() {
                *last &= (1u64 << (self.pages % 64)) - 1;
            }
        }
    }
}

/// Video memory.
pub struct Vram {
    memory: GuestMemoryMmap,
    len: usize,
    dirty: DirtyPages,
}

impl Vram {
    /// Allocates `len` bytes (a multiple of 4 KiB), zero-filled.
    pub fn new(len: usize) -> Result<Self, VramError> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(VramError::BadSize(len));
        }
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).map_err(|e| {
            VramError::Allocation {
                bytes: len,
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            memory,
            len,
            dirty: DirtyPages::new(len / PAGE_SIZE),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The backing memory: the engine maps its single region into the guest.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Clips `[offset, offset + len)` to VRAM: the in-range length.
    fn clip(&self, offset: usize, len: usize) -> usize {
        if offset >= self.len {
            0
        } else {
            len.min(self.len - offset)
        }
    }

    /// Reads `buf.len()` bytes at `offset`; bytes beyond VRAM read as 0xff.
    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        let n = self.clip(offset, buf.len());
        if n > 0
            && self
                .memory
                .read_slice(&mut buf[..n], GuestAddress(offset as u64))
                .is_err()
        {
            buf[..n].fill(0xff);
        }
        buf[n..].fill(0xff);
    }

    /// Writes `data` at `offset`; bytes beyond VRAM are dropped. Marks the pages dirty.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let n = self.clip(offset, data.len());
        if n > 0 {
            let _ = self
                .memory
                .write_slice(&data[..n], GuestAddress(offset as u64));
            self.dirty.mark_range(offset, n);
        }
    }

    pub fn read_u8(&self, offset: usize) -> u8 {
        let mut b = [0u8; 1];
        self.read(offset, &mut b);
        b[0]
    }

    pub fn write_u8(&mut self, offset: usize, value: u8) {
        self.write(offset, &[value]);
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write_u32(&mut self, offset: usize, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }

    /// Fills `[offset, offset + len)` with `value` (clipped).
    pub fn fill(&mut self, offset: usize, len: usize, value: u8) {
        let n = self.clip(offset, len);
        if n > 0 {
            self.write(offset, &vec![value; n]);
        }
    }

    /// Marks pages dirty that were written behind the device's back (never needed for
    /// writes through [`Self::write`]).
    pub fn mark_dirty(&mut self, offset: usize, len: usize) {
        self.dirty.mark_range(offset, len);
    }

    /// The pages the device wrote since the last call, then clears the set.
    pub fn take_dirty(&mut self) -> DirtyPages {
        let pages = self.dirty.pages();
        std::mem::replace(&mut self.dirty, DirtyPages::new(pages))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_are_clipped_and_tracked() {
        let mut v = Vram::new(2 * PAGE_SIZE).unwrap();
        v.write(PAGE_SIZE * 2 - 2, &[1, 2, 3, 4]);
        let mut buf = [0u8; 4];
        v.read(PAGE_SIZE * 2 - 2, &mut buf);
        assert_eq!(buf, [1, 2, 0xff, 0xff]);
        v.write(usize::MAX - 1, &[9; 8]);
        assert_eq!(v.read_u8(usize::MAX), 0xff);
        let d = v.take_dirty();
        assert!(!d.is_dirty(0) && d.is_dirty(1));
        assert!(v.take_dirty().is_empty());
        v.fill(10, 3 * PAGE_SIZE, 7);
        assert_eq!(v.read_u8(PAGE_SIZE * 2 - 1), 7);
        assert!(v.take_dirty().is_dirty(0));
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(Vram::new(0), Err(VramError::BadSize(0))));
        assert!(matches!(Vram::new(100), Err(VramError::BadSize(100))));
    }

    #[test]
    fn dirty_pages_merge_and_range_queries() {
        let mut d = DirtyPages::new(70);
        assert!(!d.any_in(0, 70 * PAGE_SIZE));
        d.merge_bitmap(&[1 << 3, u64::MAX]);
        assert!(d.is_dirty(3) && d.is_dirty(69) && !d.is_dirty(70));
        assert!(d.any_in(3 * PAGE_SIZE + 5, 1));
        assert!(!d.any_in(4 * PAGE_SIZE, PAGE_SIZE));
        d.mark_range(usize::MAX - 3, 10);
        assert!(!d.any_in(usize::MAX - 3, 3));
        assert_eq!(DirtyPages::all(3).pages(), 3);
        assert!(DirtyPages::all(3).is_dirty(2));
    }
}
