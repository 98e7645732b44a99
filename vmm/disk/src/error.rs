//! Errors of the disk-image layer: every variant names the image file and says what to do.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong creating, opening or accessing a disk image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// An operating-system I/O error on the image file.
    #[error("{}: {context}: {source}", path.display())]
    Io {
        path: PathBuf,
        context: String,
        #[source]
        source: io::Error,
    },

    /// `create` refuses to replace an existing file.
    #[error("{}: file already exists; choose another name or delete the file first", path.display())]
    AlreadyExists { path: PathBuf },

    /// Another program (another DeskVM, or QEMU) holds a conflicting lock on the image.
    #[error(
        "{}: disk image is in use by another program; shut down the VM using it, \
         or open this image read-only",
        path.display()
    )]
    Locked { path: PathBuf },

    /// A write to an image opened read-only (ISO images are always read-only).
    #[error("{}: image is read-only; the write was refused", path.display())]
    ReadOnly { path: PathBuf },

    /// A read or write that does not fit inside the virtual disk.
    #[error(
        "{}: access of {len} bytes at offset {offset} is beyond the end of the {size}-byte disk",
        path.display()
    )]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },

    /// The image uses a feature this implementation does not handle.
    #[error("{}: {feature} is not supported; {hint}", path.display())]
    Unsupported {
        path: PathBuf,
        feature: String,
        hint: String,
    },

    /// The qcow2 dirty bit is set: refcounts may be stale after an unclean shutdown.
    #[error(
        "{0}: image was not closed cleanly (qcow2 dirty bit set); repair it with \
         `qemu-img check -r all {0}`",
        path.display()
    )]
    Dirty { path: PathBuf },

    /// The qcow2 corrupt bit is set (QEMU found inconsistent metadata).
    #[error(
        "{0}: image is marked corrupt; repair it with `qemu-img check -r all {0}` \
         (keep a copy first)",
        path.display()
    )]
    MarkedCorrupt { path: PathBuf },

    /// The file's structures are inconsistent (bad header field, offset outside the file, ...).
    #[error(
        "{}: invalid or corrupt image: {reason}; check it with `qemu-img check`",
        path.display()
    )]
    Corrupt { path: PathBuf, reason: String },

    /// The file ends before a structure it claims to contain.
    #[error("{}: image file is truncated: {what}", path.display())]
    Truncated { path: PathBuf, what: String },

    /// The backing-file chain cannot be opened (missing file, too deep, loop).
    #[error("{}: backing file problem: {reason}", path.display())]
    Backing { path: PathBuf, reason: String },

    /// A caller passed a value that cannot work (zero size, size not a multiple of 512, ...).
    #[error("{}: {reason}", path.display())]
    InvalidArgument { path: PathBuf, reason: String },
}

impl DiskError {
    /// Wraps an `io::Error` with the file it happened on and what was being done.
    pub(crate) fn io(
        path: &std::path::Path,
        context: impl Into<String>,
        source: io::Error,
    ) -> Self {
        DiskError::Io {
            path: path.to_path_buf(),
            context: context.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: &std::path::Path, reason: impl Into<String>) -> Self {
        DiskError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(
        path: &std::path::Path,
        feature: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        DiskError::Unsupported {
            path: path.to_path_buf(),
            feature: feature.into(),
            hint: hint.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_path_and_the_remedy() {
        let dirty = DiskError::Dirty {
            path: PathBuf::from("/vms/a.qcow2"),
        };
        let text = dirty.to_string();
        assert!(text.contains("/vms/a.qcow2"));
        assert!(text.contains("qemu-img check -r all /vms/a.qcow2"));

        let locked = DiskError::Locked {
            path: PathBuf::from("/vms/b.qcow2"),
        };
        assert!(locked
            .to_string()
            .starts_with("/vms/b.qcow2: disk image is in use"));
    }
}
