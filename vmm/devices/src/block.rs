//! Block storage as disk controllers see it.
//!
//! The engine adapts `vmm-disk` images (raw, qcow2, ISO) to this trait; controllers only
//! read, write and flush byte ranges. Offsets and lengths come from the guest: backends
//! must refuse ranges beyond the end with an error, never panic.

use std::io;

/// A disk or CD image opened for a drive.
pub trait BlockBackend: Send {
    /// Size in bytes the guest sees.
    fn size(&self) -> u64;
    /// Whether writes are refused (a CD image, a read-only disk).
    fn read_only(&self) -> bool;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable (the guest's FLUSH CACHE).
    fn flush(&mut self) -> io::Result<()>;
}

/// An in-memory backend, for device tests and scratch media.
pub struct MemoryBackend {
    pub data: Vec<u8>,
    pub read_only: bool,
    /// Flushes seen.
    pub flushes: u64,
}

impl MemoryBackend {
    pub fn new(data: Vec<u8>, read_only: bool) -> Self {
        Self {
            data,
            read_only,
            flushes: 0,
        }
    }

    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).ok();
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.data.len() => Ok(s..e),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} is beyond the end of the image ({} bytes)",
                    self.data.len()
                ),
            )),
        }
    }
}

impl BlockBackend for MemoryBackend {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the medium is read-only",
            ));
        }
        let r = self.range(offset, data.len())?;
        self.data[r].copy_from_slice(data);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flushes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_backend_bounds_and_read_only() {
        let mut b = MemoryBackend::new(vec![0; 1024], false);
        b.write_at(1020, &[1, 2, 3, 4]).unwrap();
        assert!(b.write_at(1021, &[0; 4]).is_err());
        assert!(b.read_at(u64::MAX, &mut [0; 1]).is_err());
        let mut buf = [0; 4];
        b.read_at(1020, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        let mut ro = MemoryBackend::new(vec![0; 16], true);
        assert_eq!(
            ro.write_at(0, &[1]).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
    }
}
