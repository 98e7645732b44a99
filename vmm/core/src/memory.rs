//! Guest memory with the PC layout, and how it is mapped into KVM.
//!
//! RAM is one anonymous mapping for everything below the PCI hole plus one for RAM above
//! 4 GiB. The VGA window (0xa0000..0xc0000) is never mapped: accesses exit to the display
//! device. The BIOS area 0xc0000..0x100000 is mapped per 16/64 KiB segment as the i440FX
//! PAM registers say: to shadow RAM (read/write or read-only), to the firmware ROM's
//! alias (0xe0000..0x100000), or not at all; writes that KVM cannot map (write-only RAM
//! under readable ROM, read-only segments) exit and are handled by [`BiosShadowWindow`].
//! The firmware image is a read-only slot ending at 4 GiB.

use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_devices::fw_cfg::E820Entry;
use vmm_devices::i440fx::{pam_segments, PamListener, PamMode};
use vmm_devices::BusDevice;

use crate::error::{Result, VmmError};
use crate::layout::*;

const SLOT_LOW_RAM: u32 = 0;
const SLOT_EXTENDED_RAM: u32 = 1;
const SLOT_HIGH_RAM: u32 = 2;
const SLOT_FIRMWARE: u32 = 3;
const SLOT_PAM_FIRST: u32 = 4;

/// Host address of guest address `addr` in `mem` (a mapping this module owns).
fn host_address_in(mem: &GuestMemoryMmap, addr: u64) -> Result<u64> {
    mem.get_host_address(GuestAddress(addr))
        .map(|p| p as u64)
        .map_err(|e| VmmError::GuestMemory {
            mib: mem.iter().map(|r| r.len()).sum::<u64>() >> 20,
            reason: e.to_string(),
        })
}

/// Deletes KVM memory slot `slot`: guest accesses there exit again.
fn delete_slot(vm: &VmFd, slot: u32) -> Result<()> {
    let region = kvm_userspace_memory_region {
        slot,
        ..Default::default()
    };
    // SAFETY: a zero-sized region deletes the slot; no memory is referenced.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(VmmError::kvm("KVM_SET_USER_MEMORY_REGION"))
}

/// Guest RAM with the PC split around the PCI hole.
#[derive(Clone)]
pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    below_4g: u64,
    above_4g: u64,
}

impl GuestRam {
    pub fn new(ram_bytes: u64) -> Result<Self> {
        let below_4g = ram_bytes.min(PCI_HOLE_START);
        let above_4g = ram_bytes - below_4g;
        let mut ranges = vec![(GuestAddress(0), below_4g as usize)];
        if above_4g > 0 {
            ranges.push((GuestAddress(HIGH_RAM_START), above_4g as usize));
        }
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmmError::GuestMemory {
            mib: ram_bytes >> 20,
            reason: e.to_string(),
        })?;
        Ok(Self {
            mem,
            below_4g,
            above_4g,
        })
    }

    /// Bytes of guest RAM the host has backed with real memory so far (pages the guest
    /// or a device touched), from `mincore`.
    pub fn resident_bytes(&self) -> u64 {
        let page = 4096usize;
        let mut resident = 0u64;
        for region in self.mem.iter() {
            let len = region.len() as usize;
            let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
                continue;
            };
            let mut vec = vec![0u8; len.div_ceil(page)];
            // SAFETY: `host..host + len` is this region's live anonymous mapping (page
            // aligned, owned by `self.mem`), and `vec` has one byte per page of it.
            let rc = unsafe { libc::mincore(host as *mut libc::c_void, len, vec.as_mut_ptr()) };
            if rc == 0 {
                resident += vec.iter().filter(|b| *b & 1 != 0).count() as u64 * page as u64;
            }
        }
        resident
    }

    pub fn below_4g(&self) -> u64 {
        self.below_4g
    }

    pub fn above_4g(&self) -> u64 {
        self.above_4g
    }

    /// The memory map the firmware and the OS see (e820), as QEMU's `pc` gives it.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut map = vec![E820Entry {
            addr: 0,
            size: self.below_4g,
            kind: E820_RAM,
        }];
        map.push(E820Entry {
            addr: KVM_IDENTITY_MAP_START,
            size: KVM_PRIVATE_END - KVM_IDENTITY_MAP_START,
            kind: E820_RESERVED,
        });
        if self.above_4g > 0 {
            map.push(E820Entry {
                addr: HIGH_RAM_START,
                size: self.above_4g,
                kind: E820_RAM,
            });
        }
        map
    }

    fn host_address(&self, addr: u64) -> Result<u64> {
        host_address_in(&self.mem, addr)
    }
}

/// The firmware image, kept in its own memory and mapped read-only below 4 GiB.
pub struct FirmwareRom {
    mem: GuestMemoryMmap,
    base: u64,
    size: u64,
}

impl FirmwareRom {
    pub fn new(image: &[u8]) -> Result<Self> {
        let size = image.len() as u64;
        let base = FIRMWARE_END - size;
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(base), image.len())]).map_err(|e| {
                VmmError::GuestMemory {
                    mib: size >> 20,
                    reason: e.to_string(),
                }
            })?;
        mem.write_slice(image, GuestAddress(base))
            .map_err(|e| VmmError::GuestMemory {
                mib: size >> 20,
                reason: e.to_string(),
            })?;
        Ok(Self { mem, base, size })
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of the ROM byte that appears at `isa_addr` (0xe0000..0x100000).
    fn isa_alias_host_address(&self, isa_addr: u64) -> Option<u64> {
        let offset_in_alias = isa_addr.checked_sub(ISA_BIOS_START)?;
        let rom_addr = FIRMWARE_END - ISA_BIOS_SIZE + offset_in_alias;
        if rom_addr < self.base {
            return None;
        }
        self.mem
            .get_host_address(GuestAddress(rom_addr))
            .ok()
            .map(|p| p as u64)
    }

    fn read_isa_alias(&self, isa_addr: u64, data: &mut [u8]) -> bool {
        let rom_addr = FIRMWARE_END - ISA_BIOS_SIZE + (isa_addr - ISA_BIOS_START);
        rom_addr >= self.base && self.mem.read_slice(data, GuestAddress(rom_addr)).is_ok()
    }
}

/// KVM slot of the display card's linear framebuffer.
const SLOT_FRAMEBUFFER: u32 = 32;

/// The display card's VRAM mapped into the guest as a KVM memory slot with dirty
/// logging, so that framebuffer writes never exit; the frame pipeline reads the dirty log.
pub struct FramebufferSlot {
    vm: Arc<VmFd>,
    /// Keeps the VRAM mapping alive while KVM may refer to it.
    vram: GuestMemoryMmap,
    size: u64,
    mapped_at: Mutex<Option<u64>>,
}

impl FramebufferSlot {
    pub fn new(vm: Arc<VmFd>, vram: GuestMemoryMmap) -> Self {
        let size = vram.iter().map(|r| r.len()).sum();
        Self {
            vm,
            vram,
            size,
            mapped_at: Mutex::new(None),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the framebuffer is mapped now.
    pub fn mapped_at(&self) -> Option<u64> {
        *self.mapped_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Maps VRAM at guest-physical `base` (moving it if it was elsewhere).
    pub fn map(&self, base: u64) -> Result<()> {
        let mut at = self.mapped_at.lock().unwrap_or_else(|e| e.into_inner());
        if *at == Some(base) {
            return Ok(());
        }
        if at.is_some() {
            delete_slot(&self.vm, SLOT_FRAMEBUFFER)?;
            *at = None;
        }
        let host = host_address_in(&self.vram, 0)?;
        let region = kvm_userspace_memory_region {
            slot: SLOT_FRAMEBUFFER,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: base,
            memory_size: self.size,
            userspace_addr: host,
        };
        // SAFETY: `host..host + size` is the VRAM mapping owned by `self.vram`, which lives
        // as long as this slot object; `Drop` removes the slot before the mapping can go.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(VmmError::kvm("KVM_SET_USER_MEMORY_REGION (framebuffer)"))?;
        *at = Some(base);
        Ok(())
    }

    /// Removes the mapping; guest accesses exit again.
    pub fn unmap(&self) -> Result<()> {
        let mut at = self.mapped_at.lock().unwrap_or_else(|e| e.into_inner());
        if at.take().is_some() {
            delete_slot(&self.vm, SLOT_FRAMEBUFFER)?;
        }
        Ok(())
    }

    /// Pages the guest wrote since the last call (bit n = page n), when mapped.
    pub fn take_dirty_log(&self) -> Option<Vec<u64>> {
        self.mapped_at()?;
        self.vm
            .get_dirty_log(SLOT_FRAMEBUFFER, self.size as usize)
            .map_err(|e| log::warn!("KVM_GET_DIRTY_LOG: {e}"))
            .ok()
    }
}

impl Drop for FramebufferSlot {
    fn drop(&mut self) {
        let _ = self.unmap();
    }
}

/// First KVM slot for PCI expansion ROMs (one per function with a ROM).
pub const SLOT_ROM_FIRST: u32 = 40;

/// A PCI expansion ROM mapped as a read-only KVM slot wherever the guest puts the ROM BAR:
/// the firmware copies option ROMs with tens of thousands of reads, which then never exit.
/// Guest writes to it exit and are ignored (nothing is on the MMIO bus there).
pub struct RomSlot {
    vm: Arc<VmFd>,
    slot: u32,
    image: Vec<u8>,
    /// The mapping for the current BAR size (the ROM padded with 0xff).
    memory: Mutex<Option<(u64, GuestMemoryMmap)>>,
}

impl RomSlot {
    pub fn new(vm: Arc<VmFd>, slot: u32, image: Vec<u8>) -> Self {
        Self {
            vm,
            slot,
            image,
            memory: Mutex::new(None),
        }
    }

    /// Maps the ROM at `base` for a BAR of `size` bytes.
    pub fn map(&self, base: u64, size: u64) -> Result<()> {
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        if memory.as_ref().map(|(s, _)| *s) != Some(size) {
            let mem =
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).map_err(|e| {
                    VmmError::GuestMemory {
                        mib: size >> 20,
                        reason: e.to_string(),
                    }
                })?;
            let mut padded = vec![0xffu8; size as usize];
            let n = self.image.len().min(padded.len());
            padded[..n].copy_from_slice(&self.image[..n]);
            mem.write_slice(&padded, GuestAddress(0))
                .map_err(|e| VmmError::GuestMemory {
                    mib: size >> 20,
                    reason: e.to_string(),
                })?;
            *memory = Some((size, mem));
        }
        let Some((_, mem)) = memory.as_ref() else {
            return Ok(());
        };
        let host = host_address_in(mem, 0)?;
        let region = kvm_userspace_memory_region {
            slot: self.slot,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: base,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: `host..host + size` is the mapping held in `self.memory`, which is only
        // replaced after the slot is removed (`unmap`) and lives as long as this object;
        // `Drop` removes the slot.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(VmmError::kvm("KVM_SET_USER_MEMORY_REGION (option ROM)"))
    }

    pub fn unmap(&self) -> Result<()> {
        delete_slot(&self.vm, self.slot)
    }
}

impl Drop for RomSlot {
    fn drop(&mut self) {
        if self
            .memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            let _ = self.unmap();
        }
    }
}

/// Owns the KVM memory slots of a VM and re-maps the BIOS area when PAM changes.
pub struct MemoryMap {
    vm: Arc<VmFd>,
    ram: GuestRam,
    firmware: Option<FirmwareRom>,
    pam: Mutex<PamMapping>,
}

/// The PAM registers last applied and which BIOS-area slots exist in KVM.
#[derive(Default)]
struct PamMapping {
    registers: [u8; 7],
    slot_mapped: [bool; 13],
}

impl MemoryMap {
    pub fn new(vm: Arc<VmFd>, ram: GuestRam, firmware: Option<FirmwareRom>) -> Result<Arc<Self>> {
        let map = Arc::new(Self {
            vm,
            ram,
            firmware,
            pam: Mutex::new(PamMapping::default()),
        });
        map.map_fixed()?;
        map.apply_pam([0; 7])?;
        Ok(map)
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    fn set_slot(&self, slot: u32, guest: u64, size: u64, host: u64, readonly: bool) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: if readonly { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: guest,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: `host..host+size` lies inside a mapping owned by `self.ram` or
        // `self.firmware`, which live as long as this MemoryMap and therefore as long as
        // the VM's slots refer to them (the VM fd is dropped with the machine).
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(VmmError::kvm("KVM_SET_USER_MEMORY_REGION"))
    }

    fn clear_slot(&self, slot: u32) -> Result<()> {
        delete_slot(&self.vm, slot)
    }

    fn map_fixed(&self) -> Result<()> {
        self.set_slot(
            SLOT_LOW_RAM,
            0,
            LOW_RAM_END,
            self.ram.host_address(0)?,
            false,
        )?;
        if self.ram.below_4g > HIGH_MEMORY_START {
            self.set_slot(
                SLOT_EXTENDED_RAM,
                HIGH_MEMORY_START,
                self.ram.below_4g - HIGH_MEMORY_START,
                self.ram.host_address(HIGH_MEMORY_START)?,
                false,
            )?;
        }
        if self.ram.above_4g > 0 {
            self.set_slot(
                SLOT_HIGH_RAM,
                HIGH_RAM_START,
                self.ram.above_4g,
                self.ram.host_address(HIGH_RAM_START)?,
                false,
            )?;
        }
        if let Some(fw) = &self.firmware {
            let host = host_address_in(&fw.mem, fw.base)?;
            self.set_slot(SLOT_FIRMWARE, fw.base, fw.size, host, true)?;
        }
        Ok(())
    }

    /// Maps the BIOS area as the PAM registers `pam` (config 0x59..=0x5f) say.
    pub fn apply_pam(&self, pam: [u8; 7]) -> Result<()> {
        let mut state = self.pam.lock().unwrap_or_else(|e| e.into_inner());
        state.registers = pam;
        for (i, seg) in pam_segments(pam)
            .iter()
            .enumerate()
            .take(state.slot_mapped.len())
        {
            let slot = SLOT_PAM_FIRST + i as u32;
            let ram_host = self.ram.host_address(seg.base)?;
            let rom_host = self
                .firmware
                .as_ref()
                .and_then(|fw| fw.isa_alias_host_address(seg.base));
            let mapping = match seg.mode {
                PamMode::ReadWrite => Some((ram_host, false)),
                PamMode::ReadOnly => Some((ram_host, true)),
                PamMode::Disabled | PamMode::WriteOnly => rom_host.map(|h| (h, true)),
            };
            // A slot's flags cannot change in place: delete, then add.
            if state.slot_mapped[i] {
                self.clear_slot(slot)?;
                state.slot_mapped[i] = false;
            }
            if let Some((host, readonly)) = mapping {
                self.set_slot(slot, seg.base, seg.size, host, readonly)?;
                state.slot_mapped[i] = true;
            }
        }
        Ok(())
    }

    fn pam_mode_at(&self, addr: u64) -> PamMode {
        let pam = self.pam.lock().unwrap_or_else(|e| e.into_inner()).registers;
        pam_segments(pam)
            .into_iter()
            .find(|s| addr >= s.base && addr < s.base + s.size)
            .map(|s| s.mode)
            .unwrap_or(PamMode::Disabled)
    }
}

impl PamListener for MemoryMap {
    fn pam_changed(&self, pam: [u8; 7]) {
        if let Err(e) = self.apply_pam(pam) {
            log::error!("cannot re-map the BIOS area: {e}");
        }
    }
}

/// The MMIO side of the BIOS area: the accesses KVM could not satisfy from a slot.
pub struct BiosShadowWindow {
    pub map: Arc<MemoryMap>,
}

impl BusDevice for BiosShadowWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let addr = BIOS_SHADOW_START + offset;
        data.fill(0xff);
        if addr >= ISA_BIOS_START {
            if let Some(fw) = &self.map.firmware {
                fw.read_isa_alias(addr, data);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let addr = BIOS_SHADOW_START + offset;
        if matches!(
            self.map.pam_mode_at(addr),
            PamMode::WriteOnly | PamMode::ReadWrite
        ) {
            let _ = self.map.ram.mem.write_slice(data, GuestAddress(addr));
        }
    }
}

/// Total RAM of the host, in bytes, from /proc/meminfo.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_vm_has_no_ram_above_4g() {
        let ram = GuestRam::new(256 << 20).unwrap();
        assert_eq!(ram.below_4g(), 256 << 20);
        assert_eq!(ram.above_4g(), 0);
        let e820 = ram.e820();
        assert_eq!(e820[0].addr, 0);
        assert_eq!(e820[0].size, 256 << 20);
        assert!(e820.iter().all(|e| e.addr != HIGH_RAM_START));
    }

    #[test]
    fn large_vm_splits_around_the_pci_hole() {
        let ram = GuestRam::new(5 << 30).unwrap();
        assert_eq!(ram.below_4g(), PCI_HOLE_START);
        assert_eq!(ram.above_4g(), (5 << 30) - PCI_HOLE_START);
        let high = ram
            .e820()
            .into_iter()
            .find(|e| e.addr == HIGH_RAM_START)
            .unwrap();
        assert_eq!(high.size, (5 << 30) - PCI_HOLE_START);
        assert_eq!(high.kind, E820_RAM);
    }

    #[test]
    fn isa_alias_is_the_last_128k_of_the_image() {
        let mut image = vec![0u8; 256 << 10];
        image[(128 << 10) + 5] = 0xab; // lands at 0xe0005
        image[(256 << 10) - 16] = 0xea; // the reset vector at 0xffff0
        let fw = FirmwareRom::new(&image).unwrap();
        assert_eq!(fw.base(), FIRMWARE_END - (256 << 10));
        let mut b = [0u8; 1];
        assert!(fw.read_isa_alias(0xe0005, &mut b));
        assert_eq!(b[0], 0xab);
        assert!(fw.read_isa_alias(0xffff0, &mut b));
        assert_eq!(b[0], 0xea);
    }
}
