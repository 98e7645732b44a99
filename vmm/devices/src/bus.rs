//! Port-I/O and MMIO buses: map non-overlapping address ranges to devices.
//!
//! A device is called with the offset of the access inside the range it was registered
//! with, never with the absolute address. Overlapping registrations are rejected.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a port or MMIO bus.
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset` inside the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset` inside the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between a bus and the engine.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error(
        "range {base:#x}+{len:#x} overlaps the device already at {other_base:#x}+{other_len:#x}"
    )]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
    #[error("range {base:#x}+{len:#x} is empty or wraps around the address space")]
    BadRange { base: u64, len: u64 },
    #[error("no device is registered at {0:#x}")]
    NotFound(u64),
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A bus: address ranges mapped to devices. Cheap to share (`Arc<Bus>`); lookups take a
/// read lock, so vCPUs dispatch concurrently.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(&self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        // The closest range starting at or below `end - 1` is the only one that can overlap.
        if let Some((&other_base, other)) = ranges.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.len,
                });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the device registered at exactly `base`.
    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound(base))
    }

    /// Moves the device at `old_base` to `new_base` (for PCI BAR reprogramming).
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        let entry = {
            let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
            ranges
                .get(&old_base)
                .cloned()
                .ok_or(BusError::NotFound(old_base))?
        };
        self.remove(old_base)?;
        if let Err(e) = self.insert(new_base, entry.len, entry.device.clone()) {
            // Put it back where it was so nothing is lost.
            let _ = self.insert(old_base, entry.len, entry.device);
            return Err(e);
        }
        Ok(())
    }

    fn resolve(&self, addr: u64, len: usize) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (&base, entry) = ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must lie inside the range.
        if offset.checked_add(len as u64)? <= entry.len {
            Some((offset, entry.device.clone()))
        } else {
            None
        }
    }

    /// Dispatches a read; returns false (and fills `data` with 0xff, as an open bus
    /// does) when no device owns the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device owns the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }

    /// The registered ranges, `(base, len)`, in address order.
    /// Removes every device (breaks reference cycles between buses and the devices that
    /// map BARs onto them when a machine is torn down).
    pub fn clear(&self) {
        self.ranges
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        ranges.iter().map(|(b, e)| (*b, e.len)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = Some((offset, data.to_vec()));
        }
    }

    fn dev() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn overlapping_ranges_are_rejected() {
        let bus = Bus::new();
        bus.insert(0x60, 1, dev()).unwrap();
        bus.insert(0x64, 1, dev()).unwrap();
        assert!(matches!(
            bus.insert(0x5f, 2, dev()),
            Err(BusError::Overlap {
                other_base: 0x60,
                ..
            })
        ));
        assert!(matches!(
            bus.insert(0x64, 1, dev()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x00, 0x100, dev()),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(
            bus.insert(0x10, 0, dev()),
            Err(BusError::BadRange { base: 0x10, len: 0 }).map(|_: ()| ())
        );
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev()),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(0x61, 3, dev()).unwrap();
        assert_eq!(bus.ranges(), vec![(0x60, 1), (0x61, 3), (0x64, 1)]);
    }

    #[test]
    fn devices_see_offsets_and_unowned_reads_float_high() {
        let bus = Bus::new();
        let d = dev();
        bus.insert(0x3f8, 8, d.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fb, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x3f9, &[0xaa]));
        assert_eq!(d.lock().unwrap().last, Some((1, vec![0xaa])));
        let mut w = [0u8; 2];
        assert!(
            !bus.read(0x3ff, &mut w),
            "access crossing the end is not the device's"
        );
        assert_eq!(w, [0xff, 0xff]);
        assert!(!bus.write(0x400, &[1]));
    }

    #[test]
    fn relocate_moves_and_restores_on_conflict() {
        let bus = Bus::new();
        bus.insert(0x1000, 0x100, dev()).unwrap();
        bus.insert(0x3000, 0x100, dev()).unwrap();
        bus.relocate(0x1000, 0x2000).unwrap();
        assert_eq!(bus.ranges(), vec![(0x2000, 0x100), (0x3000, 0x100)]);
        assert!(bus.relocate(0x2000, 0x3080).is_err());
        assert_eq!(bus.ranges(), vec![(0x2000, 0x100), (0x3000, 0x100)]);
        assert!(matches!(
            bus.remove(0x1234),
            Err(BusError::NotFound(0x1234))
        ));
    }
}
