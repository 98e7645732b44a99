//! Raw disk images: the file is the disk, byte for byte. ISO files are opened this way,
//! always read-only.
//!
//! A raw image whose format was *detected* (not named by the caller) refuses guest writes
//! that would put a qcow2 magic into its first bytes: otherwise the next open would detect
//! it as qcow2 and follow guest-chosen backing file names (QEMU guards probed raw images the
//! same way). Not done: hole punching for `write_zeroes` (zeroes are written as data).

use crate::error::DiskError;
use crate::qcow2_header::has_qcow2_magic;
use crate::{check_range, DiskImage};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Largest zero buffer `write_zeroes` writes at once.
const ZERO_CHUNK: usize = 1 << 20;

/// An open raw image.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    format_was_probed: bool,
}

impl RawImage {
    /// Wraps an already opened and locked file.
    pub(crate) fn new(
        file: File,
        path: PathBuf,
        read_only: bool,
        format_was_probed: bool,
    ) -> Result<Self, DiskError> {
        let size = file
            .metadata()
            .map_err(|e| DiskError::io(&path, "reading the file size", e))?
            .len();
        Ok(RawImage {
            file,
            path,
            size,
            read_only,
            format_was_probed,
        })
    }

    fn check_writable(&self, off: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        }
        check_range(&self.path, off, len, self.size)
    }

    /// Refuses a write that would make a probed raw image look like qcow2.
    fn check_no_format_magic(&self, off: u64, data: &[u8]) -> Result<(), DiskError> {
        if !self.format_was_probed || off >= 4 {
            return Ok(());
        }
        let mut first = [0u8; 4];
        let readable = self.size.min(4) as usize;
        self.file
            .read_exact_at(&mut first[..readable], 0)
            .map_err(|e| DiskError::io(&self.path, "reading sector 0", e))?;
        for (index, byte) in data.iter().enumerate() {
            let at = off as usize + index;
            if at >= 4 {
                break;
            }
            first[at] = *byte;
        }
        if has_qcow2_magic(&first) {
            return Err(DiskError::InvalidArgument {
                path: self.path.clone(),
                reason: "refusing to write a qcow2 signature into the first sector of a raw \
                         image whose format was detected; name the format explicitly \
                         (open_as with ImageFormat::Raw) to allow it"
                    .into(),
            });
        }
        Ok(())
    }
}

impl DiskImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_range(&self.path, off, buf.len() as u64, self.size)?;
        self.file
            .read_exact_at(buf, off)
            .map_err(|e| DiskError::io(&self.path, format!("reading at offset {off}"), e))
    }

    fn write_at(&mut self, off: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check_writable(off, data.len() as u64)?;
        self.check_no_format_magic(off, data)?;
        self.file
            .write_all_at(data, off)
            .map_err(|e| DiskError::io(&self.path, format!("writing at offset {off}"), e))
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| DiskError::io(&self.path, "syncing to disk", e))
    }

    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<(), DiskError> {
        self.check_writable(off, len)?;
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let chunk = (len - done).min(zeroes.len() as u64) as usize;
            let at = off + done;
            self.file
                .write_all_at(&zeroes[..chunk], at)
                .map_err(|e| DiskError::io(&self.path, format!("zeroing at offset {at}"), e))?;
            done += chunk as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: u64, read_only: bool, probed: bool) -> (tempfile::TempDir, RawImage) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(len).unwrap();
        let image = RawImage::new(file, path, read_only, probed).unwrap();
        (dir, image)
    }

    #[test]
    fn reads_back_what_was_written() {
        let (_dir, mut disk) = image(8192, false, false);
        disk.write_at(1000, &[7u8; 3000]).unwrap();
        let mut buf = vec![0u8; 4096];
        disk.read_at(0, &mut buf).unwrap();
        assert!(buf[..1000].iter().all(|&b| b == 0));
        assert!(buf[1000..4000].iter().all(|&b| b == 7));
        disk.write_zeroes(1500, 100).unwrap();
        disk.read_at(0, &mut buf).unwrap();
        assert!(buf[1500..1600].iter().all(|&b| b == 0));
        assert_eq!(buf[1600], 7);
        disk.flush().unwrap();
    }

    #[test]
    fn out_of_range_and_read_only_are_errors() {
        let (_dir, mut disk) = image(4096, false, false);
        let mut buf = [0u8; 16];
        assert!(matches!(
            disk.read_at(4090, &mut buf),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.read_at(u64::MAX, &mut buf),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.write_at(4096, &[1]),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.write_zeroes(0, 4097),
            Err(DiskError::OutOfRange { .. })
        ));
        let (_dir2, mut ro) = image(4096, true, false);
        assert!(matches!(
            ro.write_at(0, &[1]),
            Err(DiskError::ReadOnly { .. })
        ));
        assert!(matches!(
            ro.write_zeroes(0, 1),
            Err(DiskError::ReadOnly { .. })
        ));
        ro.read_at(0, &mut buf).unwrap();
    }

    #[test]
    fn probed_raw_refuses_qcow2_magic_in_sector_zero() {
        let (_dir, mut disk) = image(4096, false, true);
        assert!(matches!(
            disk.write_at(0, b"QFI\xfbrest"),
            Err(DiskError::InvalidArgument { .. })
        ));
        disk.write_at(0, b"QF").unwrap();
        assert!(disk.write_at(2, b"I\xfb").is_err());
        disk.write_at(0, b"MBR!").unwrap();
        let (_dir2, mut named) = image(4096, false, false);
        named.write_at(0, b"QFI\xfb").unwrap();
    }
}
