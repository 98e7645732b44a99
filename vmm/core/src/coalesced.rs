//! KVM's coalesced MMIO ring: guest writes to the legacy VGA window are queued by the kernel
//! instead of exiting one by one (a 4 MiB VBE clear through the 64 KiB bank would otherwise
//! be two million exits), and applied to the devices in order at the next exit of any vCPU
//! and before every display refresh. Reads from the window still exit; every exit drains
//! the ring first, so a guest always reads what it wrote.

use std::os::fd::AsRawFd;
use std::sync::Mutex;

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vmm_devices::Bus;

use crate::error::{Result, VmmError};

/// The per-VM ring page, mapped once and shared by the vCPUs and the engine thread.
pub struct CoalescedRing {
    page: *mut u8,
    page_size: usize,
    /// Serialises draining: the ring is one per VM.
    lock: Mutex<()>,
}

// SAFETY: the mapping is owned by this object and only accessed under `lock`.
unsafe impl Send for CoalescedRing {}
// SAFETY: as above; all access to the page goes through `drain`, which takes `lock`.
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Maps the ring of `vm` through one of its vCPUs and registers `zones` (guest-physical
    /// ranges whose writes may be delayed). None when KVM lacks coalesced MMIO.
    pub fn new(kvm: &Kvm, vm: &VmFd, vcpu: &VcpuFd, zones: &[(u64, u32)]) -> Result<Option<Self>> {
        let offset_pages = kvm.check_extension_int(Cap::CoalescedMmio);
        if offset_pages <= 0 {
            return Ok(None);
        }
        // SAFETY: sysconf has no preconditions.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // SAFETY: maps one page of the vCPU fd at the offset KVM reported for the coalesced
        // MMIO ring; the result is checked and the mapping is owned (and unmapped) by
        // the returned object.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset_pages as libc::off_t * page_size as libc::off_t,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(VmmError::kvm("mmap of the coalesced MMIO ring")(
                vmm_sys_util::errno::Error::last(),
            ));
        }
        let ring = Self {
            page: page.cast(),
            page_size,
            lock: Mutex::new(()),
        };
        for &(addr, size) in zones {
            vm.register_coalesced_mmio(IoEventAddress::Mmio(addr), size)
                .map_err(VmmError::kvm("KVM_REGISTER_COALESCED_MMIO"))?;
        }
        Ok(Some(ring))
    }

    fn capacity(&self) -> u32 {
        ((self.page_size - std::mem::size_of::<kvm_coalesced_mmio_ring>())
            / std::mem::size_of::<kvm_coalesced_mmio>()) as u32
    }

    /// Applies every queued write to `mmio`, oldest first.
    pub fn drain(&self, mmio: &Bus) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let ring = self.page as *mut kvm_coalesced_mmio_ring;
        let capacity = self.capacity();
        loop {
            // SAFETY: `ring` points at the mapped ring page (valid for this object's life);
            // `first` is ours to advance, `last` is written by the kernel, so both are read
            // volatile; entries below `capacity` lie inside the page.
            let entry = unsafe {
                let first = std::ptr::read_volatile(&(*ring).first);
                let last = std::ptr::read_volatile(&(*ring).last);
                if first == last || first >= capacity {
                    break;
                }
                std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
                let entries = (*ring).coalesced_mmio.as_ptr();
                let entry = std::ptr::read_volatile(entries.add(first as usize));
                std::ptr::write_volatile(&mut (*ring).first, (first + 1) % capacity);
                entry
            };
            let len = (entry.len as usize).min(entry.data.len());
            mmio.write(entry.phys_addr, &entry.data[..len]);
        }
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: unmaps the page mapped in `new`; nothing refers to it any more.
        unsafe {
            libc::munmap(self.page.cast(), self.page_size);
        }
    }
}
