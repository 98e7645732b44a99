//! Disk and CD images (crate `vmm-disk`) as the IDE drives' block backends.

use std::io;
use std::path::{Path, PathBuf};

use vmm_devices::block::BlockBackend;
use vmm_disk::{DiskImage, OpenOptions};

use crate::config::{DriveConfig, DriveKind};
use crate::error::{Result, VmmError};

pub use vmm_disk::{create, info, DiskError, ImageFormat, ImageInfo};

/// An open image behind a drive.
pub struct ImageBackend {
    image: Box<dyn DiskImage>,
    path: PathBuf,
}

impl ImageBackend {
    /// Opens `path` for a drive of `kind` (a CD-ROM is always read-only).
    pub fn open(path: &Path, kind: DriveKind, read_only: bool) -> Result<Self> {
        let read_only = read_only || kind == DriveKind::Cdrom;
        let image =
            vmm_disk::open(path, OpenOptions { read_only }).map_err(|e| disk_error(path, e))?;
        Ok(Self {
            image,
            path: path.to_path_buf(),
        })
    }
}

fn disk_error(path: &Path, e: DiskError) -> VmmError {
    VmmError::Disk {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn to_io(e: DiskError) -> io::Error {
    let kind = match &e {
        DiskError::ReadOnly { .. } => io::ErrorKind::PermissionDenied,
        DiskError::OutOfRange { .. } => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e.to_string())
}

impl BlockBackend for ImageBackend {
    fn size(&self) -> u64 {
        self.image.size()
    }
    fn read_only(&self) -> bool {
        self.image.read_only()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.image.read_at(offset, buf).map_err(to_io)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.image.write_at(offset, data).map_err(|e| {
            log::warn!("{}: {e}", self.path.display());
            to_io(e)
        })
    }
    fn flush(&mut self) -> io::Result<()> {
        self.image.flush().map_err(to_io)
    }
}

/// Checks that `path` can serve as a drive the way a VM would open it (format, header,
/// qcow2 features, lock: a disk another VM or program writes is refused) and describes
/// it. The image is opened and closed again; nothing is written.
pub fn check_usable(path: &Path, read_only: bool) -> Result<ImageInfo> {
    drop(ImageBackend::open(path, DriveKind::Disk, read_only)?);
    info(path).map_err(|e| disk_error(path, e))
}

/// The backend for a configured drive: None for an empty CD-ROM drive.
pub fn open_drive(drive: &DriveConfig) -> Result<Option<ImageBackend>> {
    match &drive.path {
        Some(path) => ImageBackend::open(path, drive.kind, drive.read_only).map(Some),
        None => Ok(None),
    }
}

/// IDE channel and unit of the configured drive at `index` (primary master, primary
/// slave, secondary master, secondary slave).
pub fn ide_position(index: usize) -> (usize, usize) {
    (index / 2, index % 2)
}

/// SeaBIOS's device path for an IDE drive (as QEMU writes it into `bootorder`).
pub fn ide_boot_path(channel: usize, unit: usize) -> String {
    format!("/pci@i0cf8/ide@1,1/drive@{channel}/disk@{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_corrupt_images_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.qcow2");
        let e = ImageBackend::open(&missing, DriveKind::Disk, false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("none.qcow2"), "{e}");
        let bad = dir.path().join("bad.qcow2");
        let mut header = b"QFI\xfb".to_vec();
        header.extend_from_slice(&[0xff; 60]);
        std::fs::write(&bad, &header).unwrap();
        let e = ImageBackend::open(&bad, DriveKind::Disk, false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("bad.qcow2"), "{e}");
    }

    #[test]
    fn check_usable_refuses_corrupt_and_in_use_images_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.qcow2");
        create(&good, ImageFormat::Qcow2, 1 << 30, None).unwrap();
        let before = std::fs::read(&good).unwrap();
        let info = check_usable(&good, false).unwrap();
        assert_eq!(info.format, ImageFormat::Qcow2);
        assert_eq!(info.virtual_size, 1 << 30);
        assert_eq!(
            std::fs::read(&good).unwrap(),
            before,
            "probing wrote nothing"
        );
        // In use by a running VM (an exclusive open elsewhere).
        let held = ImageBackend::open(&good, DriveKind::Disk, false).unwrap();
        let e = check_usable(&good, false).unwrap_err().to_string();
        assert!(e.contains("good.qcow2") && e.contains("in use"), "{e}");
        drop(held);
        check_usable(&good, false).unwrap();
        // Corrupt: qcow2 magic with a nonsense header.
        let bad = dir.path().join("bad.qcow2");
        let mut header = b"QFI\xfb".to_vec();
        header.extend_from_slice(&[0xff; 100]);
        std::fs::write(&bad, &header).unwrap();
        let e = check_usable(&bad, false).unwrap_err().to_string();
        assert!(e.contains("bad.qcow2"), "{e}");
        assert_eq!(std::fs::read(&bad).unwrap(), header, "left as it was");
    }

    #[test]
    fn cdrom_is_read_only_and_disk_writes_land() {
        let dir = tempfile::tempdir().unwrap();
        let iso = dir.path().join("x.iso");
        std::fs::write(&iso, vec![0u8; 4096]).unwrap();
        let mut cd = ImageBackend::open(&iso, DriveKind::Cdrom, false).unwrap();
        assert!(cd.read_only());
        assert_eq!(
            cd.write_at(0, &[1]).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
        let disk = dir.path().join("d.qcow2");
        create(&disk, ImageFormat::Qcow2, 1 << 20, None).unwrap();
        let mut d = ImageBackend::open(&disk, DriveKind::Disk, false).unwrap();
        d.write_at(512, &[7; 512]).unwrap();
        d.flush().unwrap();
        assert!(d.read_at(1 << 20, &mut [0; 1]).is_err());
        drop(d);
        let mut d = ImageBackend::open(&disk, DriveKind::Disk, true).unwrap();
        let mut buf = [0; 512];
        d.read_at(512, &mut buf).unwrap();
        assert_eq!(buf, [7; 512]);
        assert_eq!(ide_position(3), (1, 1));
        assert_eq!(ide_boot_path(1, 0), "/pci@i0cf8/ide@1,1/drive@1/disk@0");
    }
}
