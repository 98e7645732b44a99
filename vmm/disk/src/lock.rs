//! Image file locking: read-write opens hold an exclusive lock, read-only opens a shared one,
//! so a second DeskVM cannot write an image that is in use.
//!
//! Uses `std::fs::File::try_lock`/`try_lock_shared` (flock(2) on Linux). Not emulated: QEMU's
//! own byte-range (OFD) permission locks; flock and fcntl locks do not see each other on
//! Linux, so this guards DeskVM against DeskVM, not against a QEMU using the same file.

use crate::error::DiskError;
use std::fs::{File, TryLockError};
use std::path::Path;

/// Which lock an open takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// Readers: many may share the image, no writer may join.
    Shared,
    /// The one writer: no other reader or writer.
    Exclusive,
}

/// Takes the lock; a conflict that lasts is `DiskError::Locked` naming the path.
///
/// A conflict is retried for a short while: when any thread of this process starts a
/// program, the child holds copies of every open descriptor between fork and exec, and
/// with them the flock of an image this process just closed.
pub fn lock_file(file: &File, path: &Path, kind: LockKind) -> Result<(), DiskError> {
    const ATTEMPTS: u32 = 20;
    for attempt in 1..=ATTEMPTS {
        let result = match kind {
            LockKind::Shared => file.try_lock_shared(),
            LockKind::Exclusive => file.try_lock(),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(TryLockError::WouldBlock) if attempt < ATTEMPTS => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(TryLockError::WouldBlock) => break,
            Err(TryLockError::Error(source)) => {
                return Err(DiskError::io(path, "locking the image", source))
            }
        }
    }
    Err(DiskError::Locked {
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_conflicts_and_shared_coexists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"x").unwrap();
        let open = || File::open(&path).unwrap();

        let reader_a = open();
        let reader_b = open();
        lock_file(&reader_a, &path, LockKind::Shared).unwrap();
        lock_file(&reader_b, &path, LockKind::Shared).unwrap();
        let writer = open();
        let err = lock_file(&writer, &path, LockKind::Exclusive).unwrap_err();
        assert!(matches!(err, DiskError::Locked { .. }));
        assert!(err.to_string().contains(&*path.to_string_lossy()));
        drop(reader_a);
        drop(reader_b);
        lock_file(&writer, &path, LockKind::Exclusive).unwrap();
        let late_reader = open();
        assert!(matches!(
            lock_file(&late_reader, &path, LockKind::Shared),
            Err(DiskError::Locked { .. })
        ));
    }
}
