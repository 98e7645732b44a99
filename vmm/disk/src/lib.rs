//! Disk images for DeskVM: raw and qcow2.
//!
//! - [`create`] makes a sparse raw file or an empty qcow2 v3 image laid out exactly like
//!   `qemu-img create -f qcow2` (64 KiB clusters, 16-bit refcounts, no lazy refcounts,
//!   optional backing file name and format). Existing files are never replaced unless
//!   [`CreateOptions::overwrite`] says so.
//! - [`open`] detects the format by content (qcow2 magic), treats `.iso` files as raw and
//!   read-only, locks the file (exclusive for read-write, shared for read-only) and returns a
//!   [`DiskImage`].
//! - [`info`] reports format, sizes, cluster size, backing file and dirty/corrupt flags
//!   without locking (it works on images in use).
//!
//! qcow2 is implemented here (see `qcow2.rs` for why the `imago` crate is not used, and for
//! the crash-safe write-back order). qcow2 version 2 images, images with internal snapshots
//! and images with refcount widths other than 16 bits are opened read-only only.
#![forbid(unsafe_code)]

mod error;
mod lock;
mod qcow2;
pub mod qcow2_header;
mod raw;

pub use error::DiskError;
pub use qcow2::{Qcow2Image, MAX_BACKING_DEPTH};
pub use raw::RawImage;

use qcow2_header::{has_qcow2_magic, new_image_bytes, Qcow2Header, DEFAULT_CLUSTER_BITS};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Image file formats DeskVM reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The name qemu-img uses ("raw", "qcow2").
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to open an image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Refuse writes and take only a shared lock. ISO files are read-only regardless.
    pub read_only: bool,
}

/// Extra choices for [`create_with_options`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// Replace an existing file (refused while another program holds it locked).
    pub overwrite: bool,
}

/// An open disk image. Offsets and lengths are in bytes of the virtual disk.
pub trait DiskImage: Send {
    /// Virtual disk size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Fills `buf` from `off`; reading past the end is an error.
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    /// Writes `data` at `off`; writing past the end is an error.
    fn write_at(&mut self, off: u64, data: &[u8]) -> Result<(), DiskError>;
    /// Makes every completed write durable (metadata in a crash-safe order, then fsync).
    fn flush(&mut self) -> Result<(), DiskError>;
    /// Makes `len` bytes from `off` read as zeroes (qcow2: zero clusters where aligned).
    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<(), DiskError>;
}

/// Information about an image file, as `qemu-img info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    /// Size the guest sees.
    pub virtual_size: u64,
    /// Bytes the file occupies on the host disk (sparse parts not counted).
    pub allocated_bytes: u64,
    /// Length of the file.
    pub file_length: u64,
    /// qcow2 cluster size; `None` for raw.
    pub cluster_size: Option<u64>,
    /// qcow2 version (2 or 3); `None` for raw.
    pub qcow2_version: Option<u32>,
    /// Backing file name as stored in the image (relative to the image's directory).
    pub backing_file: Option<String>,
    /// Backing format as stored in the image, if any.
    pub backing_format: Option<String>,
    /// qcow2 dirty bit (unclean shutdown with lazy refcounts).
    pub dirty: bool,
    /// qcow2 corrupt bit.
    pub corrupt: bool,
    /// True for ISO files: always opened read-only.
    pub read_only_media: bool,
}

/// `.iso` files are always raw and read-only.
pub(crate) fn is_iso_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("iso"))
}

/// Errors unless `[off, off + len)` lies inside a disk of `size` bytes.
pub(crate) fn check_range(path: &Path, off: u64, len: u64, size: u64) -> Result<(), DiskError> {
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange {
            path: path.to_path_buf(),
            offset: off,
            len,
            size,
        }),
    }
}

fn open_file(path: &Path, write: bool) -> Result<File, DiskError> {
    File::options()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|e| DiskError::io(path, "opening the image", e))
}

/// Detects the format of an existing image: `.iso` is raw, qcow2 magic is qcow2, else raw.
pub fn detect_format(path: &Path) -> Result<ImageFormat, DiskError> {
    if is_iso_path(path) {
        return Ok(ImageFormat::Raw);
    }
    let file = open_file(path, false)?;
    let (head, _) = qcow2::read_head(&file, path)?;
    Ok(if has_qcow2_magic(&head) {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// Creates a new image; refuses to replace an existing file.
///
/// `size_bytes` is the virtual size; for qcow2 with a backing file, 0 means "the backing
/// file's size". `backing` (qcow2 only) is stored as given; a relative path is relative to
/// the new image's directory and must exist.
pub fn create(
    path: &Path,
    format: ImageFormat,
    size_bytes: u64,
    backing: Option<&Path>,
) -> Result<(), DiskError> {
    create_with_options(path, format, size_bytes, backing, CreateOptions::default())
}

/// [`create`] with options (overwrite).
pub fn create_with_options(
    path: &Path,
    format: ImageFormat,
    size_bytes: u64,
    backing: Option<&Path>,
    options: CreateOptions,
) -> Result<(), DiskError> {
    let invalid = |reason: String| DiskError::InvalidArgument {
        path: path.to_path_buf(),
        reason,
    };
    if is_iso_path(path) {
        return Err(invalid(
            "ISO images are read-only media and cannot be created here".into(),
        ));
    }
    let content = match format {
        ImageFormat::Raw => {
            if backing.is_some() {
                return Err(invalid(
                    "raw images cannot have a backing file; use qcow2".into(),
                ));
            }
            None
        }
        ImageFormat::Qcow2 => {
            let mut size = size_bytes;
            let backing_entry = match backing {
                None => None,
                Some(backing_path) => {
                    let name = backing_path.to_str().ok_or_else(|| {
                        invalid(format!(
                            "backing file name {} is not valid UTF-8",
                            backing_path.display()
                        ))
                    })?;
                    let resolved = qcow2::resolve_backing(path, name);
                    let backing_info = info(&resolved).map_err(|e| DiskError::Backing {
                        path: path.to_path_buf(),
                        reason: format!("cannot use {} as backing file: {e}", resolved.display()),
                    })?;
                    if size == 0 {
                        size = backing_info.virtual_size;
                    }
                    Some((name.to_string(), backing_info.format.as_str()))
                }
            };
            if !size.is_multiple_of(512) {
                return Err(invalid(format!(
                    "qcow2 size {size} is not a multiple of 512 bytes"
                )));
            }
            let bytes = new_image_bytes(
                size,
                DEFAULT_CLUSTER_BITS,
                backing_entry
                    .as_ref()
                    .map(|(name, fmt)| (name.as_str(), *fmt)),
            )
            .map_err(invalid)?;
            Some(bytes)
        }
    };

    let file = if options.overwrite {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| DiskError::io(path, "creating the image", e))?;
        lock::lock_file(&file, path, lock::LockKind::Exclusive)?;
        file.set_len(0)
            .map_err(|e| DiskError::io(path, "truncating the old image", e))?;
        file
    } else {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => DiskError::AlreadyExists {
                    path: path.to_path_buf(),
                },
                _ => DiskError::io(path, "creating the image", e),
            })?;
        lock::lock_file(&file, path, lock::LockKind::Exclusive)?;
        file
    };
    let mut file = file;
    match content {
        None => file
            .set_len(size_bytes)
            .map_err(|e| DiskError::io(path, "setting the image size", e))?,
        Some(bytes) => file
            .write_all(&bytes)
            .map_err(|e| DiskError::io(path, "writing the qcow2 metadata", e))?,
    }
    file.sync_all()
        .map_err(|e| DiskError::io(path, "syncing the new image", e))
}

/// Opens an image, detecting its format (`.iso` files: raw, always read-only).
pub fn open(path: &Path, options: OpenOptions) -> Result<Box<dyn DiskImage>, DiskError> {
    let format = detect_format(path)?;
    open_image(path, format, options, true)
}

/// Opens an image whose format the caller knows (no detection; a raw image opened this way
/// may be given any content, including a qcow2 header).
pub fn open_as(
    path: &Path,
    format: ImageFormat,
    options: OpenOptions,
) -> Result<Box<dyn DiskImage>, DiskError> {
    open_image(path, format, options, false)
}

fn open_image(
    path: &Path,
    format: ImageFormat,
    options: OpenOptions,
    format_was_probed: bool,
) -> Result<Box<dyn DiskImage>, DiskError> {
    let read_only = options.read_only || is_iso_path(path);
    match format {
        ImageFormat::Raw => {
            let file = open_file(path, !read_only)?;
            let kind = if read_only {
                lock::LockKind::Shared
            } else {
                lock::LockKind::Exclusive
            };
            lock::lock_file(&file, path, kind)?;
            Ok(Box::new(RawImage::new(
                file,
                path.to_path_buf(),
                read_only,
                format_was_probed,
            )?))
        }
        ImageFormat::Qcow2 => Ok(Box::new(Qcow2Image::open(path, read_only)?)),
    }
}

/// Describes an image without locking it.
pub fn info(path: &Path) -> Result<ImageInfo, DiskError> {
    let file = open_file(path, false)?;
    let metadata = file
        .metadata()
        .map_err(|e| DiskError::io(path, "reading file metadata", e))?;
    let (head, file_length) = qcow2::read_head(&file, path)?;
    let allocated_bytes = metadata.blocks() * 512;
    let read_only_media = is_iso_path(path);
    if read_only_media || !has_qcow2_magic(&head) {
        return Ok(ImageInfo {
            format: ImageFormat::Raw,
            virtual_size: file_length,
            allocated_bytes,
            file_length,
            cluster_size: None,
            qcow2_version: None,
            backing_file: None,
            backing_format: None,
            dirty: false,
            corrupt: false,
            read_only_media,
        });
    }
    let header = Qcow2Header::parse(path, &head, file_length)?;
    Ok(ImageInfo {
        format: ImageFormat::Qcow2,
        virtual_size: header.size,
        allocated_bytes,
        file_length,
        cluster_size: Some(header.cluster_size()),
        qcow2_version: Some(header.version),
        backing_file: header.backing_file.clone(),
        backing_format: header.backing_format.clone(),
        dirty: header.incompatible_features & qcow2_header::INCOMPAT_DIRTY != 0,
        corrupt: header.incompatible_features & qcow2_header::INCOMPAT_CORRUPT != 0,
        read_only_media,
    })
}

/// Where the path of a backing file named in `image` resolves to.
pub fn backing_path(image: &Path, stored_name: &str) -> PathBuf {
    qcow2::resolve_backing(image, stored_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_refuses_to_overwrite_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        create(&path, ImageFormat::Raw, 1 << 20, None).unwrap();
        let err = create(&path, ImageFormat::Qcow2, 1 << 20, None).unwrap_err();
        assert!(matches!(err, DiskError::AlreadyExists { .. }));
        assert_eq!(detect_format(&path).unwrap(), ImageFormat::Raw);
        create_with_options(
            &path,
            ImageFormat::Qcow2,
            1 << 20,
            None,
            CreateOptions { overwrite: true },
        )
        .unwrap();
        assert_eq!(detect_format(&path).unwrap(), ImageFormat::Qcow2);
    }

    #[test]
    fn raw_create_is_sparse_and_info_reports_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        create(&path, ImageFormat::Raw, 1 << 30, None).unwrap();
        let info = info(&path).unwrap();
        assert_eq!(info.format, ImageFormat::Raw);
        assert_eq!(info.virtual_size, 1 << 30);
        assert!(info.allocated_bytes < 1 << 20);
        assert!(matches!(
            create(
                &dir.path().join("x.img"),
                ImageFormat::Raw,
                4096,
                Some(&path)
            ),
            Err(DiskError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn qcow2_info_and_backing_size_default() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        create(&base, ImageFormat::Raw, 3 << 20, None).unwrap();
        let top = dir.path().join("top.qcow2");
        create(&top, ImageFormat::Qcow2, 0, Some(Path::new("base.img"))).unwrap();
        let info = info(&top).unwrap();
        assert_eq!(info.format, ImageFormat::Qcow2);
        assert_eq!(info.virtual_size, 3 << 20);
        assert_eq!(info.cluster_size, Some(65536));
        assert_eq!(info.backing_file.as_deref(), Some("base.img"));
        assert_eq!(info.backing_format.as_deref(), Some("raw"));
        assert!(!info.dirty && !info.corrupt);
        assert!(matches!(
            create(
                &dir.path().join("c.qcow2"),
                ImageFormat::Qcow2,
                0,
                Some(Path::new("nope"))
            ),
            Err(DiskError::Backing { .. })
        ));
        assert!(matches!(
            create(&dir.path().join("d.qcow2"), ImageFormat::Qcow2, 1000, None),
            Err(DiskError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn iso_files_are_raw_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cd.ISO");
        // Even with a qcow2 magic inside, an .iso is raw.
        let mut content = vec![0u8; 4096];
        content[..4].copy_from_slice(b"QFI\xfb");
        std::fs::write(&path, &content).unwrap();
        assert_eq!(detect_format(&path).unwrap(), ImageFormat::Raw);
        let mut disk = open(&path, OpenOptions { read_only: false }).unwrap();
        assert!(disk.read_only());
        assert_eq!(disk.size(), 4096);
        assert!(matches!(
            disk.write_at(0, &[0]),
            Err(DiskError::ReadOnly { .. })
        ));
        let mut buf = [0u8; 4];
        disk.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"QFI\xfb");
        assert!(info(&path).unwrap().read_only_media);
    }

    #[test]
    fn second_writer_is_locked_out_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        for format in [ImageFormat::Raw, ImageFormat::Qcow2] {
            let path = dir.path().join(format!("d.{format}"));
            create(&path, format, 1 << 20, None).unwrap();
            let writer = open(&path, OpenOptions { read_only: false }).unwrap();
            let err = open(&path, OpenOptions { read_only: false }).err().unwrap();
            assert!(matches!(err, DiskError::Locked { .. }), "{err}");
            assert!(err.to_string().contains(&*path.to_string_lossy()));
            assert!(matches!(
                open(&path, OpenOptions { read_only: true }).err().unwrap(),
                DiskError::Locked { .. }
            ));
            drop(writer);
            let reader_a = open(&path, OpenOptions { read_only: true }).unwrap();
            let _reader_b = open(&path, OpenOptions { read_only: true }).unwrap();
            assert!(matches!(
                open(&path, OpenOptions { read_only: false }).err().unwrap(),
                DiskError::Locked { .. }
            ));
            drop(reader_a);
        }
    }

    #[test]
    fn check_range_rejects_overflow() {
        let p = Path::new("x");
        check_range(p, 0, 10, 10).unwrap();
        check_range(p, 10, 0, 10).unwrap();
        assert!(check_range(p, 10, 1, 10).is_err());
        assert!(check_range(p, u64::MAX, 2, 10).is_err());
    }
}
