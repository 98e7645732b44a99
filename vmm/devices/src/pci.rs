//! PCI bus 0 as a PC chipset presents it: type-0 configuration spaces, configuration
//! mechanism #1 (ports 0xcf8/0xcfc) and BAR decoding.
//!
//! Emulated: a 256-byte configuration header per function with per-byte write masks and
//! write-1-to-clear bits (status register), I/O, 32/64-bit memory and expansion-ROM BARs with
//! the usual sizing semantics, the command register's I/O / memory decode bits (BAR regions
//! are reported to a [`BarMapper`] whenever the decoded set changes), a capability-list
//! helper, the CONFIG_ADDRESS / CONFIG_DATA ports with byte, word and dword data accesses,
//! forwarding of byte accesses to 0xcf9 (reset control register) to a separate handler, and
//! the i440FX/PIIX INTx swizzle ([`pirq_for_slot`]).
//!
//! Not emulated: buses other than 0 (no PCI-PCI bridges, reads return all ones), type-1
//! headers, configuration mechanism #2, PCIe extended configuration space / MMCONFIG, MSI
//! (devices can build the capability themselves with [`PciConfigSpace::add_capability`]),
//! bus-master arbitration and parity / SERR signalling.

use crate::bus::{Bus, BusDevice, SharedDevice};
use crate::irq::IrqLine;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Size of a conventional PCI configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Number of base address registers of a type-0 header.
pub const NUM_BARS: usize = 6;
/// The `bar` index used for the expansion ROM BAR in [`BarRegion`] and the BAR callbacks.
pub const ROM_BAR: usize = 6;

pub const REG_VENDOR_ID: usize = 0x00;
pub const REG_DEVICE_ID: usize = 0x02;
pub const REG_COMMAND: usize = 0x04;
pub const REG_STATUS: usize = 0x06;
pub const REG_REVISION_ID: usize = 0x08;
/// Programming interface, sub-class, base class (3 bytes).
pub const REG_CLASS_CODE: usize = 0x09;
pub const REG_CACHE_LINE_SIZE: usize = 0x0c;
pub const REG_LATENCY_TIMER: usize = 0x0d;
pub const REG_HEADER_TYPE: usize = 0x0e;
pub const REG_BAR0: usize = 0x10;
pub const REG_SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const REG_SUBSYSTEM_ID: usize = 0x2e;
pub const REG_ROM_ADDRESS: usize = 0x30;
pub const REG_CAPABILITIES: usize = 0x34;
pub const REG_INTERRUPT_LINE: usize = 0x3c;
pub const REG_INTERRUPT_PIN: usize = 0x3d;
/// First byte after the standard header (device-specific registers, capabilities).
pub const DEVICE_SPECIFIC_START: usize = 0x40;

pub const COMMAND_IO_SPACE: u16 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_PARITY_RESPONSE: u16 = 1 << 6;
pub const COMMAND_SERR_ENABLE: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Command bits a guest can change on every function.
const COMMAND_WRITABLE: u16 = COMMAND_IO_SPACE
    | COMMAND_MEMORY_SPACE
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY_RESPONSE
    | COMMAND_SERR_ENABLE
    | COMMAND_INTX_DISABLE;

pub const STATUS_INTERRUPT: u16 = 1 << 3;
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// Error bits of the status register: master data parity error, signalled / received target
/// abort, received master abort, signalled system error, detected parity error.
pub const STATUS_WRITE_ONE_TO_CLEAR: u16 = 0xf900;

/// Header type bit 7: the device has more than one function.
pub const HEADER_TYPE_MULTI_FUNCTION: u8 = 0x80;

const BAR_IO_SPACE: u32 = 0x1;
const BAR_MEMORY_64BIT: u32 = 0x4;
const BAR_MEMORY_PREFETCHABLE: u32 = 0x8;
const ROM_ENABLE: u32 = 0x1;
const ROM_ADDRESS_MASK: u32 = 0xffff_f800;
/// x86 port space is 64 KiB; an I/O BAR beyond it decodes nothing.
const IO_SPACE_END: u64 = 0x1_0000;
/// Widest guest-physical address a 64-bit BAR may decode (x86 maximum, 52 bits).
const MEMORY_64BIT_END: u64 = 1 << 52;

/// 256 bytes stored so that serde can handle them (arrays up to 32 elements).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct ConfigBytes([[u8; 32]; 8]);

impl ConfigBytes {
    fn get(&self, offset: usize) -> u8 {
        self.0
            .get(offset / 32)
            .and_then(|row| row.get(offset % 32))
            .copied()
            .unwrap_or(0)
    }

    fn set(&mut self, offset: usize, value: u8) {
        if let Some(byte) = self
            .0
            .get_mut(offset / 32)
            .and_then(|row| row.get_mut(offset % 32))
        {
            *byte = value;
        }
    }
}

/// What a BAR slot of a configuration space holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
enum BarSlot {
    #[default]
    Unused,
    Io {
        size: u64,
    },
    Memory {
        size: u64,
        prefetchable: bool,
        is_64bit: bool,
    },
    /// The upper dword of the 64-bit BAR in the slot below.
    Upper64,
    Rom {
        size: u64,
    },
}

/// Address space a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BarKind {
    Io,
    Memory,
}

/// A BAR region a configuration space currently decodes (see
/// [`PciConfigSpace::decoded_regions`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodedBar {
    /// 0..=5, or [`ROM_BAR`].
    pub bar: usize,
    pub kind: BarKind,
    pub base: u64,
    pub size: u64,
}

/// One function's 256-byte type-0 configuration space.
///
/// Device code sets up identity and BARs with the `set_*` / `add_*` helpers and changes
/// read-only state with the raw `set_u8/u16/u32`; guest writes go through [`Self::write`],
/// which honours the writable and write-1-to-clear masks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigSpace {
    bytes: ConfigBytes,
    writable: ConfigBytes,
    write_one_to_clear: ConfigBytes,
    bars: [BarSlot; 7],
    /// Offset of the last capability in the list (0 = none).
    last_capability: u8,
}

impl Default for PciConfigSpace {
    fn default() -> Self {
        Self::new()
    }
}

impl PciConfigSpace {
    /// An all-zero header with the standard writable fields: command decode / master /
    /// parity / SERR / INTx-disable bits, cache line size, latency timer and interrupt line;
    /// status error bits are write-1-to-clear.
    pub fn new() -> Self {
        let mut space = Self {
            bytes: ConfigBytes::default(),
            writable: ConfigBytes::default(),
            write_one_to_clear: ConfigBytes::default(),
            bars: [BarSlot::Unused; 7],
            last_capability: 0,
        };
        space.set_writable(REG_COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        space.set_write_one_to_clear(REG_STATUS, &STATUS_WRITE_ONE_TO_CLEAR.to_le_bytes());
        space.set_writable(REG_CACHE_LINE_SIZE, &[0xff, 0xff]);
        space.set_writable(REG_INTERRUPT_LINE, &[0xff]);
        space
    }

    // ---- raw access (device side, ignores masks) ----

    pub fn read_u8(&self, offset: usize) -> u8 {
        self.bytes.get(offset)
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([
            self.bytes.get(offset),
            self.bytes.get(offset.wrapping_add(1)),
        ])
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = self.bytes.get(offset.wrapping_add(i));
        }
        u32::from_le_bytes(b)
    }

    pub fn set_u8(&mut self, offset: usize, value: u8) {
        self.bytes.set(offset, value);
    }

    pub fn set_u16(&mut self, offset: usize, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Raw store of several bytes (out-of-range bytes are dropped).
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            if let Some(off) = offset.checked_add(i) {
                self.bytes.set(off, v);
            }
        }
    }

    /// Which bits of the bytes at `offset..` the guest may change.
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        for (i, &m) in mask.iter().enumerate() {
            if let Some(off) = offset.checked_add(i) {
                self.writable.set(off, m);
            }
        }
    }

    /// Makes every bit of `offset..offset + len` writable (device-specific registers).
    pub fn set_writable_range(&mut self, offset: usize, len: usize) {
        for i in 0..len.min(CONFIG_SPACE_SIZE) {
            if let Some(off) = offset.checked_add(i) {
                self.writable.set(off, 0xff);
            }
        }
    }

    /// Which bits of the bytes at `offset..` are cleared by writing 1.
    pub fn set_write_one_to_clear(&mut self, offset: usize, mask: &[u8]) {
        for (i, &m) in mask.iter().enumerate() {
            if let Some(off) = offset.checked_add(i) {
                self.write_one_to_clear.set(off, m);
            }
        }
    }

    // ---- guest access ----

    /// Guest read of `data.len()` bytes; bytes past the end read 0xff.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset.checked_add(i) {
                Some(off) if off < CONFIG_SPACE_SIZE => self.bytes.get(off),
                _ => 0xff,
            };
        }
    }

    /// Guest write: only writable bits change, write-1-to-clear bits clear when written 1.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let off = match offset.checked_add(i) {
                Some(off) if off < CONFIG_SPACE_SIZE => off,
                _ => break,
            };
            let old = self.bytes.get(off);
            let writable = self.writable.get(off);
            let clear = self.write_one_to_clear.get(off) & value;
            let new = ((old & !writable) | (value & writable)) & !clear;
            self.bytes.set(off, new);
        }
    }

    // ---- identity helpers ----

    pub fn set_vendor_id(&mut self, vendor: u16) {
        self.set_u16(REG_VENDOR_ID, vendor);
    }

    pub fn set_device_id(&mut self, device: u16) {
        self.set_u16(REG_DEVICE_ID, device);
    }

    pub fn set_ids(&mut self, vendor: u16, device: u16) {
        self.set_vendor_id(vendor);
        self.set_device_id(device);
    }

    pub fn set_revision(&mut self, revision: u8) {
        self.set_u8(REG_REVISION_ID, revision);
    }

    /// `class_code` = base class << 16 | sub-class << 8 | programming interface.
    pub fn set_class(&mut self, class_code: u32) {
        self.set_bytes(REG_CLASS_CODE, &class_code.to_le_bytes()[..3]);
    }

    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.set_u16(REG_SUBSYSTEM_VENDOR_ID, vendor);
        self.set_u16(REG_SUBSYSTEM_ID, id);
    }

    /// 0 = no interrupt, 1..=4 = INTA#..INTD#.
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.set_u8(REG_INTERRUPT_PIN, pin.min(4));
    }

    pub fn set_header_type(&mut self, header_type: u8) {
        self.set_u8(REG_HEADER_TYPE, header_type);
    }

    /// Appends a capability with `id` and `body` (the bytes after the id / next pointer) at
    /// `offset` (dword aligned, inside 0x40..0x100) to the capability list and sets the
    /// status capability bit. The capability itself is read-only; make parts of `body`
    /// writable with [`Self::set_writable`]. Returns false (and changes nothing) when the
    /// capability does not fit.
    pub fn add_capability(&mut self, offset: usize, id: u8, body: &[u8]) -> bool {
        let fits = offset >= DEVICE_SPECIFIC_START
            && offset.is_multiple_of(4)
            && offset
                .checked_add(2 + body.len())
                .is_some_and(|end| end <= CONFIG_SPACE_SIZE);
        if !fits {
            log::warn!("pci: capability {id:#x} at {offset:#x} does not fit");
            return false;
        }
        self.set_u8(offset, id);
        self.set_u8(offset + 1, 0);
        self.set_bytes(offset + 2, body);
        if self.last_capability == 0 {
            self.set_u8(REG_CAPABILITIES, offset as u8);
        } else {
            self.set_u8(usize::from(self.last_capability) + 1, offset as u8);
        }
        self.last_capability = offset as u8;
        let status = self.read_u16(REG_STATUS) | STATUS_CAPABILITIES_LIST;
        self.set_u16(REG_STATUS, status);
        true
    }

    // ---- state helpers ----

    pub fn vendor_id(&self) -> u16 {
        self.read_u16(REG_VENDOR_ID)
    }

    pub fn device_id(&self) -> u16 {
        self.read_u16(REG_DEVICE_ID)
    }

    pub fn command(&self) -> u16 {
        self.read_u16(REG_COMMAND)
    }

    pub fn io_enabled(&self) -> bool {
        self.command() & COMMAND_IO_SPACE != 0
    }

    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY_SPACE != 0
    }

    /// The guest allowed the function to master the bus (DMA).
    pub fn bus_master_enabled(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// The guest masked the function's INTx output (command bit 10).
    pub fn intx_disabled(&self) -> bool {
        self.command() & COMMAND_INTX_DISABLE != 0
    }

    pub fn interrupt_pin(&self) -> u8 {
        self.read_u8(REG_INTERRUPT_PIN)
    }

    pub fn interrupt_line(&self) -> u8 {
        self.read_u8(REG_INTERRUPT_LINE)
    }

    /// Status bit 3, which a device sets while its INTx is asserted.
    pub fn set_interrupt_status(&mut self, asserted: bool) {
        let status = self.read_u16(REG_STATUS);
        let status = if asserted {
            status | STATUS_INTERRUPT
        } else {
            status & !STATUS_INTERRUPT
        };
        self.set_u16(REG_STATUS, status);
    }

    /// Records `asserted` in status bit 3 and returns the level INTx# must have: low
    /// while the guest masks INTx (command bit 10), `asserted` otherwise.
    pub fn intx_level(&mut self, asserted: bool) -> bool {
        self.set_interrupt_status(asserted);
        asserted && !self.intx_disabled()
    }

    /// Records `asserted` in status bit 3 and drives `irq` to the INTx# level that follows
    /// from it and the command register's INTx mask.
    pub fn drive_intx(&mut self, irq: &dyn IrqLine, asserted: bool) {
        irq.set_level(self.intx_level(asserted));
    }

    // ---- BARs ----

    fn bar_offset(index: usize) -> usize {
        if index == ROM_BAR {
            REG_ROM_ADDRESS
        } else {
            REG_BAR0 + 4 * index
        }
    }

    /// Frees BAR slot `index` (and the other half of a 64-bit BAR it belongs to).
    fn clear_bar(&mut self, index: usize) {
        let Some(slot) = self.bars.get(index).copied() else {
            return;
        };
        match slot {
            BarSlot::Memory { is_64bit: true, .. } => self.clear_bar_slot(index + 1),
            BarSlot::Upper64 if index > 0 => self.clear_bar_slot(index - 1),
            _ => {}
        }
        self.clear_bar_slot(index);
    }

    fn clear_bar_slot(&mut self, index: usize) {
        if let Some(slot) = self.bars.get_mut(index) {
            *slot = BarSlot::Unused;
            let offset = Self::bar_offset(index);
            self.set_u32(offset, 0);
            self.set_writable(offset, &[0; 4]);
        }
    }

    /// Declares BAR `index` (0..=5) as an I/O BAR of `size` bytes (rounded up to a power of
    /// two, at least 4).
    pub fn add_io_bar(&mut self, index: usize, size: u64) {
        if index >= NUM_BARS {
            log::warn!("pci: I/O BAR index {index} out of range");
            return;
        }
        let Some(size) = size
            .max(4)
            .checked_next_power_of_two()
            .filter(|&s| s <= 1 << 31)
        else {
            log::warn!("pci: I/O BAR size {size:#x} too large");
            return;
        };
        self.clear_bar(index);
        self.bars[index] = BarSlot::Io { size };
        let offset = Self::bar_offset(index);
        let mask = !((size - 1) as u32) & 0xffff_fffc;
        self.set_u32(offset, BAR_IO_SPACE);
        self.set_writable(offset, &mask.to_le_bytes());
    }

    /// Declares BAR `index` as a memory BAR of `size` bytes (rounded up to a power of two, at
    /// least 16). A 64-bit BAR also occupies `index + 1`, so `index` must be at most 4.
    pub fn add_memory_bar(&mut self, index: usize, size: u64, prefetchable: bool, is_64bit: bool) {
        if index >= NUM_BARS || (is_64bit && index + 1 >= NUM_BARS) {
            log::warn!("pci: memory BAR index {index} out of range");
            return;
        }
        let limit = if is_64bit { 1 << 63 } else { 1 << 31 };
        let Some(size) = size
            .max(16)
            .checked_next_power_of_two()
            .filter(|&s| s <= limit)
        else {
            log::warn!("pci: memory BAR size {size:#x} too large");
            return;
        };
        self.clear_bar(index);
        if is_64bit {
            self.clear_bar(index + 1);
        }
        self.bars[index] = BarSlot::Memory {
            size,
            prefetchable,
            is_64bit,
        };
        let offset = Self::bar_offset(index);
        let mask = !(size - 1) & !0xf;
        let mut type_bits = 0;
        if prefetchable {
            type_bits |= BAR_MEMORY_PREFETCHABLE;
        }
        if is_64bit {
            type_bits |= BAR_MEMORY_64BIT;
        }
        self.set_u32(offset, type_bits);
        self.set_writable(offset, &(mask as u32).to_le_bytes());
        if is_64bit {
            self.bars[index + 1] = BarSlot::Upper64;
            self.set_u32(offset + 4, 0);
            self.set_writable(offset + 4, &((mask >> 32) as u32).to_le_bytes());
        }
    }

    /// Declares an expansion ROM BAR of `size` bytes (rounded up to a power of two, at least
    /// 2 KiB); bit 0 of the register is the ROM enable bit.
    pub fn set_rom_bar(&mut self, size: u64) {
        let Some(size) = size
            .max(0x800)
            .checked_next_power_of_two()
            .filter(|&s| s <= 1 << 31)
        else {
            log::warn!("pci: ROM BAR size {size:#x} too large");
            return;
        };
        self.bars[ROM_BAR] = BarSlot::Rom { size };
        let mask = (!((size - 1) as u32) & ROM_ADDRESS_MASK) | ROM_ENABLE;
        self.set_u32(REG_ROM_ADDRESS, 0);
        self.set_writable(REG_ROM_ADDRESS, &mask.to_le_bytes());
    }

    /// Size of BAR `index` (0..=5 or [`ROM_BAR`]), None if it is not implemented.
    pub fn bar_size(&self, index: usize) -> Option<u64> {
        match self.bars.get(index)? {
            BarSlot::Io { size } | BarSlot::Memory { size, .. } | BarSlot::Rom { size } => {
                Some(*size)
            }
            BarSlot::Unused | BarSlot::Upper64 => None,
        }
    }

    /// The address programmed into BAR `index`, whether or not it is decoded.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let offset = Self::bar_offset(index);
        match *self.bars.get(index)? {
            BarSlot::Io { size } => {
                Some(u64::from(self.read_u32(offset) & 0xffff_fffc) & !(size - 1))
            }
            BarSlot::Memory { size, is_64bit, .. } => {
                let low = u64::from(self.read_u32(offset) & !0xf);
                let high = if is_64bit {
                    u64::from(self.read_u32(offset + 4))
                } else {
                    0
                };
                Some(((high << 32) | low) & !(size - 1))
            }
            BarSlot::Rom { size } => {
                Some(u64::from(self.read_u32(offset) & ROM_ADDRESS_MASK) & !(size - 1))
            }
            BarSlot::Unused | BarSlot::Upper64 => None,
        }
    }

    /// The BAR regions the function decodes now: enabled by the command register (and the
    /// ROM enable bit), base not 0, not a sizing pattern (a 32-bit region ending at
    /// 0xffff_ffff, an I/O region beyond 64 KiB, a 64-bit region beyond 52 bits).
    pub fn decoded_regions(&self) -> Vec<DecodedBar> {
        let mut regions = Vec::new();
        let command = self.command();
        for (index, slot) in self.bars.iter().enumerate() {
            let Some(base) = self.bar_address(index) else {
                continue;
            };
            let (kind, size, decoded) = match *slot {
                BarSlot::Io { size } => (
                    BarKind::Io,
                    size,
                    command & COMMAND_IO_SPACE != 0 && base != 0 && base + size <= IO_SPACE_END,
                ),
                BarSlot::Memory { size, is_64bit, .. } => (
                    BarKind::Memory,
                    size,
                    command & COMMAND_MEMORY_SPACE != 0
                        && memory_region_valid(base, size, is_64bit),
                ),
                BarSlot::Rom { size } => (
                    BarKind::Memory,
                    size,
                    command & COMMAND_MEMORY_SPACE != 0
                        && self.read_u32(REG_ROM_ADDRESS) & ROM_ENABLE != 0
                        && memory_region_valid(base, size, false),
                ),
                BarSlot::Unused | BarSlot::Upper64 => continue,
            };
            if decoded {
                regions.push(DecodedBar {
                    bar: index,
                    kind,
                    base,
                    size,
                });
            }
        }
        regions
    }

    /// Power-on state of the standard header: command 0, status error and interrupt bits
    /// clear, BAR addresses and ROM 0 (type bits kept), interrupt line, cache line size and
    /// latency timer 0. Identity, capabilities and device-specific registers are kept.
    pub fn reset_header(&mut self) {
        self.set_u16(REG_COMMAND, 0);
        let status = self.read_u16(REG_STATUS) & !(STATUS_WRITE_ONE_TO_CLEAR | STATUS_INTERRUPT);
        self.set_u16(REG_STATUS, status);
        for index in 0..NUM_BARS {
            let value = match self.bars[index] {
                BarSlot::Io { .. } => BAR_IO_SPACE,
                BarSlot::Memory {
                    prefetchable,
                    is_64bit,
                    ..
                } => {
                    (if prefetchable {
                        BAR_MEMORY_PREFETCHABLE
                    } else {
                        0
                    }) | (if is_64bit { BAR_MEMORY_64BIT } else { 0 })
                }
                BarSlot::Unused | BarSlot::Upper64 | BarSlot::Rom { .. } => 0,
            };
            self.set_u32(Self::bar_offset(index), value);
        }
        self.set_u32(REG_ROM_ADDRESS, 0);
        self.set_u8(REG_INTERRUPT_LINE, 0);
        self.set_u8(REG_CACHE_LINE_SIZE, 0);
        self.set_u8(REG_LATENCY_TIMER, 0);
    }
}

fn memory_region_valid(base: u64, size: u64, is_64bit: bool) -> bool {
    if base == 0 || size == 0 {
        return false;
    }
    let Some(end) = base.checked_add(size - 1) else {
        return false;
    };
    if is_64bit {
        end < MEMORY_64BIT_END && end != 0xffff_ffff
    } else {
        end < 0xffff_ffff
    }
}

/// One function of a PCI device as bus 0 sees it.
pub trait PciFunction: Send {
    fn config(&self) -> &PciConfigSpace;
    fn config_mut(&mut self) -> &mut PciConfigSpace;

    /// Reads the dword register at `reg` (a multiple of 4, below 256).
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config().read_u32(reg)
    }

    /// Guest writes `data` at byte `offset` (0..4, `offset + data.len() <= 4`) of the dword
    /// register `reg`. The default applies the configuration space's masks.
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config_mut().write(reg + offset, data);
    }

    /// Guest read inside BAR `bar` (0..=5, [`ROM_BAR`]); `offset` is relative to the BAR.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let _ = (bar, offset);
        data.fill(0xff);
    }

    /// Guest write inside BAR `bar`; `offset` is relative to the BAR.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let _ = (bar, offset, data);
    }

    /// Machine reset. The default resets the standard header.
    fn reset(&mut self) {
        self.config_mut().reset_header();
    }
}

/// A function shared between the PCI root, BAR mappings and the engine.
pub type SharedPciFunction = Arc<Mutex<dyn PciFunction>>;

/// A BAR region decoded on the I/O or memory bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BarRegion {
    pub device: u8,
    pub function: u8,
    /// 0..=5, or [`ROM_BAR`] (6) for the expansion ROM.
    pub bar: usize,
    pub kind: BarKind,
    pub base: u64,
    pub size: u64,
}

/// Places BAR regions on the engine's buses. Called with the PCI root locked but the
/// function unlocked; implementations must not call back into the root.
pub trait BarMapper: Send + Sync {
    /// The function now decodes `region`.
    fn map(&self, region: BarRegion);
    /// The function no longer decodes `region` (always a region passed to `map` before).
    fn unmap(&self, region: BarRegion);
    /// A function was added to the root (lets mappers route BAR accesses to it).
    fn function_added(&self, device: u8, function: u8, pci_function: &SharedPciFunction) {
        let _ = (device, function, pci_function);
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("PCI slot {device:02x}.{function} is already taken")]
    SlotTaken { device: u8, function: u8 },
    #[error("PCI slot {device:#x}.{function} is out of range (device 0..32, function 0..8)")]
    OutOfRange { device: u8, function: u8 },
}

/// The INTx swizzle of the i440FX/PIIX board (as QEMU and SeaBIOS wire it): interrupt pin
/// `pin` (1 = INTA# .. 4 = INTD#, the config-space value) of `device` on bus 0 drives PIRQ
/// `(device + pin - 2) & 3` (0 = PIRQA). None when the function has no interrupt pin.
pub fn pirq_for_slot(device: u8, pin: u8) -> Option<usize> {
    if !(1..=4).contains(&pin) {
        return None;
    }
    Some((usize::from(device) + usize::from(pin) + 2) & 3)
}

struct Slot {
    function: SharedPciFunction,
    /// Regions currently reported to the mapper.
    mapped: Vec<BarRegion>,
}

/// Save/restore state of the root itself (functions save their own configuration space).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciRootState {
    pub config_address: u32,
}

const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Bits of CONFIG_ADDRESS that hold state (enable, bus, device, function, register).
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;
const SLOTS: usize = 32 * 8;

/// PCI bus 0 and configuration mechanism #1.
///
/// Register it as a port device at 0xcf8 with length 8: offset 0 (dword) is CONFIG_ADDRESS,
/// offsets 4..8 are CONFIG_DATA, and a byte access at offset 1 (port 0xcf9) goes to the
/// handler set with [`Self::set_port_cf9_handler`].
pub struct PciRoot {
    config_address: u32,
    slots: Vec<Option<Slot>>,
    mapper: Arc<dyn BarMapper>,
    port_cf9: Option<SharedDevice>,
}

impl PciRoot {
    pub fn new(mapper: Arc<dyn BarMapper>) -> Self {
        Self {
            config_address: 0,
            slots: (0..SLOTS).map(|_| None).collect(),
            mapper,
            port_cf9: None,
        }
    }

    fn slot_index(device: u8, function: u8) -> Option<usize> {
        (device < 32 && function < 8).then(|| usize::from(device) * 8 + usize::from(function))
    }

    /// Places `pci_function` at 00:`device`.`function` and maps whatever it already decodes.
    pub fn add(
        &mut self,
        device: u8,
        function: u8,
        pci_function: SharedPciFunction,
    ) -> Result<(), PciError> {
        let index =
            Self::slot_index(device, function).ok_or(PciError::OutOfRange { device, function })?;
        let slot = self
            .slots
            .get_mut(index)
            .ok_or(PciError::OutOfRange { device, function })?;
        if slot.is_some() {
            return Err(PciError::SlotTaken { device, function });
        }
        self.mapper.function_added(device, function, &pci_function);
        *slot = Some(Slot {
            function: pci_function,
            mapped: Vec::new(),
        });
        self.refresh_slot(index);
        Ok(())
    }

    /// The function at 00:`device`.`function`.
    pub fn function(&self, device: u8, function: u8) -> Option<SharedPciFunction> {
        let index = Self::slot_index(device, function)?;
        self.slots.get(index)?.as_ref().map(|s| s.function.clone())
    }

    /// Byte accesses to port 0xcf9 (offset 1 of this device) go to `handler` at offset 0.
    pub fn set_port_cf9_handler(&mut self, handler: SharedDevice) {
        self.port_cf9 = Some(handler);
    }

    /// Reads the dword register `reg & 0xfc` of 00:`device`.`function`; all ones when absent.
    pub fn config_read(&self, device: u8, function: u8, reg: usize) -> u32 {
        let Some(index) = Self::slot_index(device, function) else {
            return u32::MAX;
        };
        match self.slots.get(index) {
            Some(Some(slot)) => lock(&slot.function).config_read(reg & 0xfc),
            _ => u32::MAX,
        }
    }

    /// Writes `data` at byte `offset` of 00:`device`.`function`'s configuration space (bytes
    /// beyond the dword that holds `offset` are dropped), then updates BAR mappings.
    pub fn config_write(&mut self, device: u8, function: u8, offset: usize, data: &[u8]) {
        let Some(index) = Self::slot_index(device, function) else {
            return;
        };
        let reg = offset & 0xfc;
        let byte = offset & 3;
        let data = &data[..data.len().min(4 - byte)];
        if data.is_empty() {
            return;
        }
        match self.slots.get(index) {
            Some(Some(slot)) => lock(&slot.function).config_write(reg, byte, data),
            _ => return,
        }
        self.refresh_slot(index);
    }

    /// Compares what function `index` decodes with what was mapped and tells the mapper.
    fn refresh_slot(&mut self, index: usize) {
        let device = (index / 8) as u8;
        let function = (index % 8) as u8;
        let Some(Some(slot)) = self.slots.get_mut(index) else {
            return;
        };
        let now: Vec<BarRegion> = lock(&slot.function)
            .config()
            .decoded_regions()
            .into_iter()
            .map(|d| BarRegion {
                device,
                function,
                bar: d.bar,
                kind: d.kind,
                base: d.base,
                size: d.size,
            })
            .collect();
        if now == slot.mapped {
            return;
        }
        for old in slot.mapped.iter().filter(|r| !now.contains(r)) {
            self.mapper.unmap(*old);
        }
        for new in now.iter().filter(|r| !slot.mapped.contains(r)) {
            self.mapper.map(*new);
        }
        slot.mapped = now;
    }

    /// Re-reads every function's BARs and command register and updates the mappings (after
    /// restoring function state).
    pub fn refresh_mappings(&mut self) {
        for index in 0..SLOTS {
            self.refresh_slot(index);
        }
    }

    /// Machine reset: CONFIG_ADDRESS 0, every function reset, mappings updated.
    pub fn reset(&mut self) {
        self.config_address = 0;
        for slot in self.slots.iter().flatten() {
            lock(&slot.function).reset();
        }
        self.refresh_mappings();
    }

    pub fn state(&self) -> PciRootState {
        PciRootState {
            config_address: self.config_address,
        }
    }

    pub fn restore_state(&mut self, state: &PciRootState) {
        self.config_address = state.config_address & CONFIG_ADDRESS_MASK;
    }

    /// (device, function, register) CONFIG_ADDRESS selects, None when disabled or not bus 0.
    fn selected(&self) -> Option<(u8, u8, usize)> {
        let address = self.config_address;
        if address & CONFIG_ADDRESS_ENABLE == 0 || (address >> 16) & 0xff != 0 {
            return None;
        }
        Some((
            ((address >> 11) & 0x1f) as u8,
            ((address >> 8) & 0x7) as u8,
            (address & 0xfc) as usize,
        ))
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.config_address.to_le_bytes()),
            (1, 1) => match &self.port_cf9 {
                Some(handler) => lock(handler).read(0, data),
                None => data.fill(0xff),
            },
            (4..=7, len) if len > 0 && (offset as usize - 4) + len <= 4 => {
                data.fill(0xff);
                if let Some((device, function, reg)) = self.selected() {
                    let value = self.config_read(device, function, reg).to_le_bytes();
                    let start = offset as usize - 4;
                    for (dst, src) in data.iter_mut().zip(value.iter().skip(start)) {
                        *dst = *src;
                    }
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.config_address = u32::from_le_bytes(b) & CONFIG_ADDRESS_MASK;
            }
            (1, 1) => {
                if let Some(handler) = &self.port_cf9 {
                    lock(handler).write(0, data);
                }
            }
            (4..=7, len) if len > 0 && (offset as usize - 4) + len <= 4 => {
                if let Some((device, function, reg)) = self.selected() {
                    self.config_write(device, function, reg + (offset as usize - 4), data);
                }
            }
            _ => {}
        }
    }
}

/// Called after every guest write into a function's BARs (e.g. to re-arm the engine's
/// timer when a controller starts or stops).
pub type AfterWriteHook = Arc<dyn Fn() + Send + Sync>;

/// Routes a mapped BAR's bus accesses to its function with BAR-relative offsets.
pub struct PciBarDevice {
    function: SharedPciFunction,
    bar: usize,
    after_write: Option<AfterWriteHook>,
}

impl PciBarDevice {
    pub fn new(function: SharedPciFunction, bar: usize) -> Self {
        Self {
            function,
            bar,
            after_write: None,
        }
    }

    pub fn with_after_write(mut self, hook: Option<AfterWriteHook>) -> Self {
        self.after_write = hook;
        self
    }
}

impl BusDevice for PciBarDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.function).bar_read(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.function).bar_write(self.bar, offset, data);
        if let Some(hook) = &self.after_write {
            hook();
        }
    }
}

/// A BAR the engine maps itself (a framebuffer as a KVM memory slot) instead of trapping
/// every access on a bus.
pub trait DirectBar: Send + Sync {
    /// The BAR now decodes `region`; returns false to fall back to a trapped bus mapping.
    fn map(&self, region: BarRegion) -> bool;
    /// The BAR no longer decodes `region` (only called after `map` returned true).
    fn unmap(&self, region: BarRegion);
}

#[derive(Default)]
struct BusBarMapperState {
    functions: BTreeMap<(u8, u8), SharedPciFunction>,
    hooks: BTreeMap<(u8, u8), AfterWriteHook>,
    direct: BTreeMap<(u8, u8, usize), Arc<dyn DirectBar>>,
    /// Regions mapped by a [`DirectBar`].
    direct_mapped: Vec<BarRegion>,
    /// Regions actually inserted on a bus (an insertion can fail on overlap).
    inserted: Vec<BarRegion>,
}

/// A [`BarMapper`] that puts each decoded BAR on the port or MMIO bus as a
/// [`PciBarDevice`]. Regions that overlap something already on the bus are refused (logged)
/// and stay unmapped; the engine can wrap this mapper to treat special BARs (a framebuffer
/// as a KVM memory slot) differently.
pub struct BusBarMapper {
    io: Arc<Bus>,
    mmio: Arc<Bus>,
    state: Mutex<BusBarMapperState>,
}

impl BusBarMapper {
    pub fn new(io: Arc<Bus>, mmio: Arc<Bus>) -> Self {
        Self {
            io,
            mmio,
            state: Mutex::new(BusBarMapperState::default()),
        }
    }

    fn bus(&self, kind: BarKind) -> &Bus {
        match kind {
            BarKind::Io => &self.io,
            BarKind::Memory => &self.mmio,
        }
    }

    /// Regions currently on a bus.
    pub fn mapped(&self) -> Vec<BarRegion> {
        lock(&self.state).inserted.clone()
    }

    /// Calls `hook` after every guest write into the BARs of 00:`device`.`function`.
    pub fn set_after_write(&self, device: u8, function: u8, hook: AfterWriteHook) {
        lock(&self.state).hooks.insert((device, function), hook);
    }

    /// Lets `handler` map BAR `bar` of 00:`device`.`function` itself.
    pub fn set_direct(&self, device: u8, function: u8, bar: usize, handler: Arc<dyn DirectBar>) {
        lock(&self.state)
            .direct
            .insert((device, function, bar), handler);
    }
}

impl BarMapper for BusBarMapper {
    fn map(&self, region: BarRegion) {
        let mut state = lock(&self.state);
        let Some(function) = state
            .functions
            .get(&(region.device, region.function))
            .cloned()
        else {
            log::warn!(
                "pci: BAR of unknown function {:02x}.{}",
                region.device,
                region.function
            );
            return;
        };
        if let Some(direct) = state
            .direct
            .get(&(region.device, region.function, region.bar))
            .cloned()
        {
            if direct.map(region) {
                state.direct_mapped.push(region);
                return;
            }
        }
        let hook = state.hooks.get(&(region.device, region.function)).cloned();
        let device = Arc::new(Mutex::new(
            PciBarDevice::new(function, region.bar).with_after_write(hook),
        ));
        match self
            .bus(region.kind)
            .insert(region.base, region.size, device)
        {
            Ok(()) => state.inserted.push(region),
            Err(e) => log::warn!(
                "pci: {:02x}.{} BAR {} not mapped: {e}",
                region.device,
                region.function,
                region.bar
            ),
        }
    }

    fn unmap(&self, region: BarRegion) {
        let mut state = lock(&self.state);
        if let Some(pos) = state.direct_mapped.iter().position(|r| *r == region) {
            state.direct_mapped.swap_remove(pos);
            if let Some(direct) = state
                .direct
                .get(&(region.device, region.function, region.bar))
                .cloned()
            {
                direct.unmap(region);
            }
            return;
        }
        if let Some(pos) = state.inserted.iter().position(|r| *r == region) {
            state.inserted.swap_remove(pos);
            if let Err(e) = self.bus(region.kind).remove(region.base) {
                log::warn!("pci: unmapping BAR at {:#x}: {e}", region.base);
            }
        }
    }

    fn function_added(&self, device: u8, function: u8, pci_function: &SharedPciFunction) {
        lock(&self.state)
            .functions
            .insert((device, function), pci_function.clone());
    }
}

/// A mapper call, as recorded by [`RecordingBarMapper`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarEvent {
    Map(BarRegion),
    Unmap(BarRegion),
}

/// A [`BarMapper`] for tests: records every call.
#[derive(Default)]
pub struct RecordingBarMapper {
    events: Mutex<Vec<BarEvent>>,
}

impl RecordingBarMapper {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn events(&self) -> Vec<BarEvent> {
        lock(&self.events).clone()
    }

    /// Returns and forgets the events recorded so far.
    pub fn take_events(&self) -> Vec<BarEvent> {
        std::mem::take(&mut *lock(&self.events))
    }

    /// The regions mapped now (replaying all events).
    pub fn mapped(&self) -> Vec<BarRegion> {
        let mut mapped: Vec<BarRegion> = Vec::new();
        for event in lock(&self.events).iter() {
            match event {
                BarEvent::Map(r) => mapped.push(*r),
                BarEvent::Unmap(r) => mapped.retain(|m| m != r),
            }
        }
        mapped
    }
}

impl BarMapper for RecordingBarMapper {
    fn map(&self, region: BarRegion) {
        lock(&self.events).push(BarEvent::Map(region));
    }

    fn unmap(&self, region: BarRegion) {
        lock(&self.events).push(BarEvent::Unmap(region));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain function: identity, BARs, and a BAR backing store that records accesses.
    struct TestFunction {
        config: PciConfigSpace,
        bar_accesses: Vec<(usize, u64, Vec<u8>)>,
        resets: u32,
    }

    impl TestFunction {
        fn new(vendor: u16, device: u16, header_type: u8) -> Self {
            let mut config = PciConfigSpace::new();
            config.set_ids(vendor, device);
            config.set_header_type(header_type);
            Self {
                config,
                bar_accesses: Vec::new(),
                resets: 0,
            }
        }
    }

    impl PciFunction for TestFunction {
        fn config(&self) -> &PciConfigSpace {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfigSpace {
            &mut self.config
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (bar as u8) << 4 | (offset as u8).wrapping_add(i as u8);
            }
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.bar_accesses.push((bar, offset, data.to_vec()));
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.config.reset_header();
        }
    }

    fn shared(f: TestFunction) -> Arc<Mutex<TestFunction>> {
        Arc::new(Mutex::new(f))
    }

    /// Port bus with the root at 0xcf8..0xd00, as the engine wires it.
    struct Machine {
        ports: Bus,
        root: Arc<Mutex<PciRoot>>,
        mapper: Arc<RecordingBarMapper>,
    }

    impl Machine {
        fn new() -> Self {
            let mapper = RecordingBarMapper::new();
            let root = Arc::new(Mutex::new(PciRoot::new(mapper.clone())));
            let ports = Bus::new();
            ports.insert(0xcf8, 8, root.clone()).unwrap();
            Self {
                ports,
                root,
                mapper,
            }
        }
        fn add(&self, device: u8, function: u8, f: SharedPciFunction) {
            self.root.lock().unwrap().add(device, function, f).unwrap();
        }
        fn outl(&self, port: u64, v: u32) {
            self.ports.write(port, &v.to_le_bytes());
        }
        fn outw(&self, port: u64, v: u16) {
            self.ports.write(port, &v.to_le_bytes());
        }
        fn outb(&self, port: u64, v: u8) {
            self.ports.write(port, &[v]);
        }
        fn inl(&self, port: u64) -> u32 {
            let mut b = [0u8; 4];
            self.ports.read(port, &mut b);
            u32::from_le_bytes(b)
        }
        fn inw(&self, port: u64) -> u16 {
            let mut b = [0u8; 2];
            self.ports.read(port, &mut b);
            u16::from_le_bytes(b)
        }
        fn inb(&self, port: u64) -> u8 {
            let mut b = [0u8; 1];
            self.ports.read(port, &mut b);
            b[0]
        }
        fn select(&self, bdf: u16, reg: u32) {
            self.outl(0xcf8, 0x8000_0000 | u32::from(bdf) << 8 | (reg & 0xfc));
        }
        // SeaBIOS-style accessors.
        fn readl(&self, bdf: u16, reg: u32) -> u32 {
            self.select(bdf, reg);
            self.inl(0xcfc)
        }
        fn readw(&self, bdf: u16, reg: u32) -> u16 {
            self.select(bdf, reg);
            self.inw(0xcfc + u64::from(reg & 2))
        }
        fn readb(&self, bdf: u16, reg: u32) -> u8 {
            self.select(bdf, reg);
            self.inb(0xcfc + u64::from(reg & 3))
        }
        fn writel(&self, bdf: u16, reg: u32, v: u32) {
            self.select(bdf, reg);
            self.outl(0xcfc, v);
        }
        fn writew(&self, bdf: u16, reg: u32, v: u16) {
            self.select(bdf, reg);
            self.outw(0xcfc + u64::from(reg & 2), v);
        }
    }

    fn bdf(device: u16, function: u16) -> u16 {
        device << 3 | function
    }

    /// Bus-0 enumeration as SeaBIOS's pci_next does it: skip functions 1..7 of a device whose
    /// function 0 is not multi-function; a vendor of 0 or 0xffff means "absent".
    fn probe_bus0(m: &Machine) -> Vec<(u16, u16, u16)> {
        let mut found = Vec::new();
        let mut bdf: u16 = 0;
        let mut first = true;
        loop {
            if !first {
                let single = bdf & 7 == 0 && m.readb(bdf, 0x0e) & 0x80 == 0;
                bdf += if single { 8 } else { 1 };
            }
            first = false;
            loop {
                if bdf >= 256 {
                    return found;
                }
                let vendor = m.readw(bdf, 0);
                if vendor != 0 && vendor != 0xffff {
                    break;
                }
                bdf += if bdf & 7 == 0 { 8 } else { 1 };
            }
            found.push((bdf, m.readw(bdf, 0), m.readw(bdf, 2)));
        }
    }

    #[test]
    fn drive_intx_sets_the_status_bit_and_the_line_unless_the_guest_masks_intx() {
        let irq = crate::irq::CountingIrq::new();
        let mut config = PciConfigSpace::new();
        config.drive_intx(irq.as_ref(), true);
        assert!(irq.level());
        assert_ne!(config.read_u16(REG_STATUS) & STATUS_INTERRUPT, 0);

        config.write(REG_COMMAND, &COMMAND_INTX_DISABLE.to_le_bytes());
        config.drive_intx(irq.as_ref(), true);
        assert!(!irq.level(), "a masked INTx must stay low");
        assert_ne!(config.read_u16(REG_STATUS) & STATUS_INTERRUPT, 0);

        config.drive_intx(irq.as_ref(), false);
        assert!(!irq.level());
        assert_eq!(config.read_u16(REG_STATUS) & STATUS_INTERRUPT, 0);
        assert!(!config.intx_level(false));
    }

    #[test]
    fn seabios_style_probe_finds_functions_and_honours_multifunction_bit() {
        let m = Machine::new();
        m.add(0, 0, shared(TestFunction::new(0x8086, 0x1237, 0)));
        m.add(1, 0, shared(TestFunction::new(0x8086, 0x7000, 0x80)));
        m.add(1, 1, shared(TestFunction::new(0x8086, 0x7010, 0)));
        m.add(1, 3, shared(TestFunction::new(0x8086, 0x7113, 0)));
        m.add(2, 0, shared(TestFunction::new(0x1013, 0x00b8, 0)));
        // Function 1 of a single-function device: firmware must not find it.
        m.add(2, 1, shared(TestFunction::new(0x1234, 0x5678, 0)));
        m.add(31, 0, shared(TestFunction::new(0x10ec, 0x8139, 0)));
        let found = probe_bus0(&m);
        assert_eq!(
            found,
            vec![
                (bdf(0, 0), 0x8086, 0x1237),
                (bdf(1, 0), 0x8086, 0x7000),
                (bdf(1, 1), 0x8086, 0x7010),
                (bdf(1, 3), 0x8086, 0x7113),
                (bdf(2, 0), 0x1013, 0x00b8),
                (bdf(31, 0), 0x10ec, 0x8139),
            ]
        );
        // Absent functions read all ones at every width.
        assert_eq!(m.readl(bdf(5, 0), 0), 0xffff_ffff);
        assert_eq!(m.readw(bdf(1, 2), 0x0e), 0xffff);
        assert_eq!(m.readb(bdf(1, 7), 0x3d), 0xff);
        // Bus 1 does not exist.
        m.outl(0xcf8, 0x8001_0000);
        assert_eq!(m.inl(0xcfc), 0xffff_ffff);
    }

    #[test]
    fn data_port_byte_word_dword_accesses_at_every_offset() {
        let m = Machine::new();
        let f = shared(TestFunction::new(0x1af4, 0x1000, 0));
        {
            let mut f = f.lock().unwrap();
            f.config.set_bytes(0x40, &[0x11, 0x22, 0x33, 0x44]);
            f.config.set_writable_range(0x48, 4);
        }
        m.add(3, 0, f.clone());
        m.select(bdf(3, 0), 0x40);
        for n in 0..4u64 {
            assert_eq!(m.inb(0xcfc + n), 0x11 * (n as u8 + 1), "byte at 0xcfc+{n}");
        }
        assert_eq!(m.inw(0xcfc), 0x2211);
        assert_eq!(m.inw(0xcfd), 0x3322);
        assert_eq!(m.inw(0xcfe), 0x4433);
        assert_eq!(m.inl(0xcfc), 0x4433_2211);
        // Accesses crossing the end of the data port belong to nobody.
        assert_eq!(m.inw(0xcff), 0xffff);

        m.select(bdf(3, 0), 0x48);
        for n in 0..4u64 {
            m.outb(0xcfc + n, 0xa0 + n as u8);
        }
        assert_eq!(m.inl(0xcfc), 0xa3a2_a1a0);
        m.outw(0xcfd, 0xbeef);
        assert_eq!(m.inl(0xcfc), 0xa3be_efa0);
        m.outw(0xcfe, 0x1234);
        assert_eq!(m.inl(0xcfc), 0x1234_efa0);
        m.outl(0xcfc, 0xdead_beef);
        assert_eq!(f.lock().unwrap().config.read_u32(0x48), 0xdead_beef);
        // Bits 1:0 of CONFIG_ADDRESS are ignored: 0x49 selects dword 0x48.
        m.outl(0xcf8, 0x8000_0000 | u32::from(bdf(3, 0)) << 8 | 0x49);
        assert_eq!(m.inl(0xcfc), 0xdead_beef);
        // Read-only bytes ignore writes.
        m.select(bdf(3, 0), 0x40);
        m.outl(0xcfc, 0);
        assert_eq!(m.inl(0xcfc), 0x4433_2211);
    }

    #[test]
    fn config_address_register_and_disabled_accesses() {
        let m = Machine::new();
        let f = shared(TestFunction::new(0x8086, 0x1237, 0));
        f.lock().unwrap().config.set_writable_range(0x50, 4);
        m.add(0, 0, f.clone());
        // Linux's type-1 probe: byte write to 0xcfb, then dword 0x80000000 reads back.
        m.outb(0xcfb, 0x01);
        m.outl(0xcf8, 0x8000_0000);
        assert_eq!(m.inl(0xcf8), 0x8000_0000);
        assert_eq!(m.inl(0xcfc), 0x1237_8086);
        // Reserved bits do not stick.
        m.outl(0xcf8, 0xffff_ffff);
        assert_eq!(m.inl(0xcf8), 0x80ff_fffc);
        // Byte and word accesses to 0xcf8..0xcfb do not touch CONFIG_ADDRESS.
        m.outl(0xcf8, 0x8000_0050);
        m.outb(0xcf8, 0x00);
        m.outb(0xcfa, 0x00);
        m.outw(0xcfa, 0x0000);
        assert_eq!(m.inl(0xcf8), 0x8000_0050);
        assert_eq!(m.inb(0xcf8), 0xff);
        assert_eq!(
            m.inb(0xcfa),
            0xff,
            "must not look like configuration mechanism #2"
        );
        // Enable bit clear: data reads all ones, writes are dropped.
        m.outl(0xcf8, 0x0000_0050);
        assert_eq!(m.inl(0xcfc), 0xffff_ffff);
        assert_eq!(m.inw(0xcfe), 0xffff);
        assert_eq!(m.inb(0xcfd), 0xff);
        m.outl(0xcfc, 0x1234_5678);
        assert_eq!(f.lock().unwrap().config.read_u32(0x50), 0);
        m.outl(0xcf8, 0x8000_0050);
        m.outl(0xcfc, 0x1234_5678);
        assert_eq!(f.lock().unwrap().config.read_u32(0x50), 0x1234_5678);
        // Writes to a non-zero bus are dropped too.
        m.outl(0xcf8, 0x8002_0050);
        m.outl(0xcfc, 0);
        assert_eq!(f.lock().unwrap().config.read_u32(0x50), 0x1234_5678);
    }

    #[test]
    fn add_rejects_taken_and_out_of_range_slots() {
        let m = Machine::new();
        m.add(4, 0, shared(TestFunction::new(1, 2, 0)));
        let mut root = m.root.lock().unwrap();
        assert_eq!(
            root.add(4, 0, shared(TestFunction::new(1, 2, 0))),
            Err(PciError::SlotTaken {
                device: 4,
                function: 0
            })
        );
        assert_eq!(
            root.add(32, 0, shared(TestFunction::new(1, 2, 0))),
            Err(PciError::OutOfRange {
                device: 32,
                function: 0
            })
        );
        assert_eq!(
            root.add(0, 8, shared(TestFunction::new(1, 2, 0))),
            Err(PciError::OutOfRange {
                device: 0,
                function: 8
            })
        );
        assert!(root.function(4, 0).is_some());
        assert!(root.function(4, 1).is_none());
    }

    fn bar_device() -> Arc<Mutex<TestFunction>> {
        let mut f = TestFunction::new(0x10ec, 0x8139, 0);
        f.config.add_io_bar(0, 0x100);
        f.config.add_memory_bar(1, 0x1000, false, false);
        f.config.add_memory_bar(2, 16 << 20, true, true);
        f.config.add_io_bar(4, 0x20);
        f.config.set_rom_bar(0x10000);
        shared(f)
    }

    #[test]
    fn bar_sizing_reads_back_size_masks_with_type_bits() {
        let m = Machine::new();
        m.add(3, 0, bar_device());
        let d = bdf(3, 0);
        // Initial type bits.
        assert_eq!(m.readl(d, 0x10), 0x1);
        assert_eq!(m.readl(d, 0x14), 0x0);
        assert_eq!(m.readl(d, 0x18), 0xc);
        assert_eq!(m.readl(d, 0x1c), 0x0);
        assert_eq!(m.readl(d, 0x24), 0x0, "unimplemented BAR5");
        let size = |reg: u32| {
            let old = m.readl(d, reg);
            m.writel(d, reg, 0xffff_ffff);
            let v = m.readl(d, reg);
            m.writel(d, reg, old);
            v
        };
        assert_eq!(size(0x10), 0xffff_ff01);
        assert_eq!(size(0x14), 0xffff_f000);
        assert_eq!(size(0x18), 0xff00_000c);
        assert_eq!(size(0x1c), 0xffff_ffff);
        assert_eq!(size(0x20), 0xffff_ffe1);
        assert_eq!(size(0x24), 0);
        // ROM: SeaBIOS writes the address mask (enable clear), Linux all ones.
        m.writel(d, 0x30, 0xffff_f800);
        assert_eq!(m.readl(d, 0x30), 0xffff_0000);
        m.writel(d, 0x30, 0xffff_ffff);
        assert_eq!(m.readl(d, 0x30), 0xffff_0001);
        m.writel(d, 0x30, 0);
        // Addresses are masked to the BAR alignment.
        m.writel(d, 0x10, 0xc0ff);
        assert_eq!(m.readl(d, 0x10), 0xc001);
        m.writel(d, 0x14, 0xfebf_1234);
        assert_eq!(m.readl(d, 0x14), 0xfebf_1000);
        // A big 64-bit BAR has size bits in the upper dword.
        let mut f = TestFunction::new(1, 2, 0);
        f.config.add_memory_bar(0, 8 << 30, true, true);
        m.add(4, 0, shared(f));
        m.writel(bdf(4, 0), 0x10, 0xffff_ffff);
        m.writel(bdf(4, 0), 0x14, 0xffff_ffff);
        assert_eq!(m.readl(bdf(4, 0), 0x10), 0x0000_000c);
        assert_eq!(m.readl(bdf(4, 0), 0x14), 0xffff_fffe);
        assert!(
            m.mapper.events().is_empty(),
            "nothing decodes while the command register is 0"
        );
    }

    fn region(bar: usize, kind: BarKind, base: u64, size: u64) -> BarRegion {
        BarRegion {
            device: 3,
            function: 0,
            bar,
            kind,
            base,
            size,
        }
    }

    #[test]
    fn bar_mapping_follows_command_bits_and_addresses() {
        let m = Machine::new();
        m.add(3, 0, bar_device());
        let d = bdf(3, 0);
        // Firmware order: program BARs with decoding off, then enable I/O + memory.
        m.writel(d, 0x10, 0xc000);
        m.writel(d, 0x14, 0xfebf_0000);
        m.writel(d, 0x18, 0x0000_0000);
        m.writel(d, 0x1c, 0x0000_0008); // 64-bit BAR at 0x8_0000_0000
        m.writel(d, 0x20, 0xc100);
        assert!(m.mapper.take_events().is_empty());
        m.writew(d, 0x04, COMMAND_IO_SPACE);
        assert_eq!(
            m.mapper.take_events(),
            vec![
                BarEvent::Map(region(0, BarKind::Io, 0xc000, 0x100)),
                BarEvent::Map(region(4, BarKind::Io, 0xc100, 0x20)),
            ]
        );
        m.writew(d, 0x04, COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE);
        assert_eq!(
            m.mapper.take_events(),
            vec![
                BarEvent::Map(region(1, BarKind::Memory, 0xfebf_0000, 0x1000)),
                BarEvent::Map(region(2, BarKind::Memory, 0x8_0000_0000, 16 << 20)),
            ]
        );
        // ROM: address alone does nothing, the enable bit maps it.
        m.writel(d, 0x30, 0xfeb0_0000);
        assert!(m.mapper.take_events().is_empty());
        m.writel(d, 0x30, 0xfeb0_0001);
        assert_eq!(
            m.mapper.take_events(),
            vec![BarEvent::Map(region(
                ROM_BAR,
                BarKind::Memory,
                0xfeb0_0000,
                0x10000
            ))]
        );
        m.writel(d, 0x30, 0xfeb0_0000);
        assert_eq!(
            m.mapper.take_events(),
            vec![BarEvent::Unmap(region(
                ROM_BAR,
                BarKind::Memory,
                0xfeb0_0000,
                0x10000
            ))]
        );
        // Moving a BAR while decoding: unmap old, map new.
        m.writel(d, 0x10, 0xd000);
        assert_eq!(
            m.mapper.take_events(),
            vec![
                BarEvent::Unmap(region(0, BarKind::Io, 0xc000, 0x100)),
                BarEvent::Map(region(0, BarKind::Io, 0xd000, 0x100)),
            ]
        );
        // Sizing with decoding on: the all-ones pattern decodes nothing, restore re-maps.
        m.writel(d, 0x14, 0xffff_ffff);
        assert_eq!(
            m.mapper.take_events(),
            vec![BarEvent::Unmap(region(
                1,
                BarKind::Memory,
                0xfebf_0000,
                0x1000
            ))]
        );
        m.writel(d, 0x14, 0xfebf_0000);
        assert_eq!(
            m.mapper.take_events(),
            vec![BarEvent::Map(region(
                1,
                BarKind::Memory,
                0xfebf_0000,
                0x1000
            ))]
        );
        m.writel(d, 0x1c, 0xffff_ffff);
        assert_eq!(
            m.mapper.take_events(),
            vec![BarEvent::Unmap(region(
                2,
                BarKind::Memory,
                0x8_0000_0000,
                16 << 20
            ))]
        );
        m.writel(d, 0x18, 0xffff_ffff);
        m.writel(d, 0x1c, 0);
        assert!(
            m.mapper.take_events().is_empty(),
            "low-half sizing pattern with high 0 is not decoded"
        );
        m.writel(d, 0x18, 0xe000_0000);
        assert_eq!(
            m.mapper.take_events(),
            vec![BarEvent::Map(region(
                2,
                BarKind::Memory,
                0xe000_0000,
                16 << 20
            ))]
        );
        // I/O BAR sizing pattern decodes nothing either.
        m.writel(d, 0x20, 0xffff_ffff);
        assert_eq!(
            m.mapper.take_events(),
            vec![BarEvent::Unmap(region(4, BarKind::Io, 0xc100, 0x20))]
        );
        m.writel(d, 0x20, 0);
        assert!(m.mapper.take_events().is_empty(), "base 0 is not decoded");
        // Memory decode off: memory BARs vanish, I/O stays.
        m.writew(d, 0x04, COMMAND_IO_SPACE);
        assert_eq!(
            m.mapper.take_events(),
            vec![
                BarEvent::Unmap(region(1, BarKind::Memory, 0xfebf_0000, 0x1000)),
                BarEvent::Unmap(region(2, BarKind::Memory, 0xe000_0000, 16 << 20)),
            ]
        );
        // Byte write to the command register low byte clears I/O decode too.
        m.select(d, 0x04);
        m.outb(0xcfc, 0);
        assert_eq!(
            m.mapper.take_events(),
            vec![BarEvent::Unmap(region(0, BarKind::Io, 0xd000, 0x100))]
        );
        assert!(m.mapper.mapped().is_empty());
    }

    #[test]
    fn reset_unmaps_and_clears_bars() {
        let m = Machine::new();
        let f = bar_device();
        m.add(3, 0, f.clone());
        let d = bdf(3, 0);
        m.writel(d, 0x10, 0xc000);
        m.writel(d, 0x3c, 0x0b);
        m.writew(d, 0x04, COMMAND_IO_SPACE | COMMAND_BUS_MASTER);
        assert_eq!(m.mapper.mapped().len(), 1);
        m.root.lock().unwrap().reset();
        assert!(m.mapper.mapped().is_empty());
        assert_eq!(f.lock().unwrap().resets, 1);
        assert_eq!(m.inl(0xcf8), 0);
        assert_eq!(m.readl(d, 0x10), 0x1);
        assert_eq!(m.readl(d, 0x04) & 0xffff, 0);
        assert_eq!(m.readb(d, 0x3c), 0);
        assert_eq!(m.readl(d, 0), 0x8139_10ec);
    }

    #[test]
    fn status_error_bits_are_write_one_to_clear_and_ids_read_only() {
        let m = Machine::new();
        let f = shared(TestFunction::new(0x8086, 0x100e, 0));
        {
            let mut f = f.lock().unwrap();
            f.config.set_u16(REG_STATUS, 0x2000 | 0x0200);
            f.config.set_interrupt_status(true);
            assert!(f.config.add_capability(0x50, 0x05, &[0; 10]));
            assert!(f.config.add_capability(0x60, 0x11, &[0; 6]));
            assert!(!f.config.add_capability(0xfc, 0x09, &[0; 4]));
        }
        m.add(3, 0, f.clone());
        let d = bdf(3, 0);
        assert_eq!(m.readw(d, 0x06), 0x2218);
        assert_eq!(m.readb(d, 0x34), 0x50);
        assert_eq!(m.readw(d, 0x50), 0x6005);
        assert_eq!(m.readw(d, 0x60), 0x0011);
        // Writing all ones to command/status: command gets its writable bits, status error
        // bits clear, status read-only bits stay.
        m.writel(d, 0x04, 0xffff_ffff);
        assert_eq!(m.readl(d, 0x04), 0x0218_0547);
        m.writel(d, 0x00, 0);
        m.writel(d, 0x08, 0);
        m.writel(d, 0x34, 0);
        assert_eq!(m.readl(d, 0x00), 0x100e_8086);
        assert_eq!(m.readb(d, 0x34), 0x50);
    }

    #[test]
    fn port_cf9_byte_accesses_reach_the_handler() {
        #[derive(Default)]
        struct ResetRegister {
            writes: Vec<(u64, Vec<u8>)>,
            value: u8,
        }
        impl BusDevice for ResetRegister {
            fn read(&mut self, offset: u64, data: &mut [u8]) {
                assert_eq!(offset, 0);
                data.fill(self.value);
            }
            fn write(&mut self, offset: u64, data: &[u8]) {
                self.writes.push((offset, data.to_vec()));
                self.value = data[0];
            }
        }
        let m = Machine::new();
        assert_eq!(m.inb(0xcf9), 0xff, "no handler: open bus");
        m.outb(0xcf9, 0x06);
        let reg = Arc::new(Mutex::new(ResetRegister::default()));
        m.root.lock().unwrap().set_port_cf9_handler(reg.clone());
        // SeaBIOS qemu_reboot: outb(0x02, 0xcf9); outb(0x06, 0xcf9).
        m.outl(0xcf8, 0x8000_0000);
        m.outb(0xcf9, 0x02);
        m.outb(0xcf9, 0x06);
        assert_eq!(m.inb(0xcf9), 0x06);
        assert_eq!(
            reg.lock().unwrap().writes,
            vec![(0, vec![0x02]), (0, vec![0x06])]
        );
        assert_eq!(
            m.inl(0xcf8),
            0x8000_0000,
            "0xcf9 byte writes leave CONFIG_ADDRESS alone"
        );
        // Dword and word accesses at 0xcf8 never reach the handler.
        m.outl(0xcf8, 0x8000_0600);
        m.outw(0xcf8, 0x0606);
        assert_eq!(reg.lock().unwrap().writes.len(), 2);
    }

    #[test]
    fn bus_bar_mapper_routes_accesses_with_bar_relative_offsets() {
        let io = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let mapper = Arc::new(BusBarMapper::new(io.clone(), mmio.clone()));
        let mut root = PciRoot::new(mapper.clone());
        let a = bar_device();
        let b = bar_device();
        root.add(3, 0, a.clone()).unwrap();
        root.add(4, 0, b.clone()).unwrap();
        root.config_write(3, 0, 0x10, &0xc000u32.to_le_bytes());
        root.config_write(3, 0, 0x14, &0xfebf_0000u32.to_le_bytes());
        root.config_write(3, 0, 0x04, &[0x03, 0x00]);
        let mut byte = [0u8; 1];
        assert!(io.read(0xc005, &mut byte));
        assert_eq!(byte[0], 0x05, "BAR0 offset 5");
        assert!(mmio.write(0xfebf_0010, &[0xaa, 0xbb]));
        assert_eq!(
            a.lock().unwrap().bar_accesses,
            vec![(1, 0x10, vec![0xaa, 0xbb])]
        );
        // Device 4 programs a BAR overlapping device 3's: refused, device 3 keeps it.
        root.config_write(4, 0, 0x10, &0xc000u32.to_le_bytes());
        root.config_write(4, 0, 0x04, &[0x01, 0x00]);
        assert_eq!(mapper.mapped().len(), 2);
        root.config_write(4, 0, 0x04, &[0x00, 0x00]);
        assert!(
            io.read(0xc001, &mut byte),
            "device 3's BAR survives device 4's unmap"
        );
        // Relocation.
        root.config_write(3, 0, 0x10, &0xe000u32.to_le_bytes());
        assert!(!io.read(0xc001, &mut byte));
        assert!(io.read(0xe010, &mut byte));
        assert_eq!(byte[0], 0x10);
        root.reset();
        assert!(io.ranges().is_empty());
        assert!(mmio.ranges().is_empty());
    }

    #[test]
    fn swizzle_matches_the_i440fx_board() {
        // Device 1 INTA -> PIRQA, device 2 INTA -> PIRQB, device 3 INTA -> PIRQC.
        assert_eq!(pirq_for_slot(1, 1), Some(0));
        assert_eq!(pirq_for_slot(2, 1), Some(1));
        assert_eq!(pirq_for_slot(3, 1), Some(2));
        assert_eq!(pirq_for_slot(4, 1), Some(3));
        assert_eq!(pirq_for_slot(5, 1), Some(0));
        assert_eq!(pirq_for_slot(3, 2), Some(3));
        assert_eq!(pirq_for_slot(3, 4), Some(1));
        assert_eq!(pirq_for_slot(0, 1), Some(3));
        assert_eq!(pirq_for_slot(31, 4), Some(1));
        assert_eq!(pirq_for_slot(3, 0), None);
        assert_eq!(pirq_for_slot(3, 5), None);
    }

    use crate::test_support::TestRng as Rng;

    #[test]
    fn hostile_port_and_config_traffic_never_panics_and_keeps_ids() {
        let m = Machine::new();
        let ids = [
            (3u8, 0x10ecu16, 0x8139u16),
            (4, 0x8086, 0x100e),
            (5, 0x1af4, 0x1000),
        ];
        for &(dev, vendor, device) in &ids {
            let f = bar_device();
            f.lock().unwrap().config.set_ids(vendor, device);
            f.lock().unwrap().config.set_interrupt_pin(1);
            m.add(dev, 0, f);
        }
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..200_000 {
            let r = rng.next();
            let len = [1usize, 2, 4, 3, 8][(r % 5) as usize];
            let port = 0xcf8 + (r >> 8) % 8;
            let value = rng.next().to_le_bytes();
            if r & 0x10 != 0 {
                m.ports.write(port, &value[..len]);
            } else {
                let mut buf = vec![0u8; len];
                m.ports.read(port, &mut buf);
            }
            // Keep the address mostly pointed at real functions.
            if r & 0xe0 == 0 {
                let dev = 3 + (r >> 20) % 3;
                m.outl(
                    0xcf8,
                    0x8000_0000 | (dev as u32) << 11 | ((r >> 24) as u32 & 0xfc),
                );
            }
        }
        let mut root = m.root.lock().unwrap();
        for _ in 0..50_000 {
            let r = rng.next();
            let device = (r % 40) as u8;
            let function = ((r >> 8) % 9) as u8;
            let offset = ((r >> 16) % 300) as usize;
            let len = ((r >> 32) % 6) as usize;
            let data = rng.next().to_le_bytes();
            root.config_write(device, function, offset, &data[..len]);
            let _ = root.config_read(device, function, offset);
        }
        for &(dev, vendor, device) in &ids {
            assert_eq!(
                root.config_read(dev, 0, 0),
                u32::from(device) << 16 | u32::from(vendor)
            );
            assert_eq!(
                (root.config_read(dev, 0, 0x3c) >> 8) & 0xff,
                1,
                "interrupt pin is read-only"
            );
            // Whatever is mapped must match what the function decodes now.
            let f = root.function(dev, 0).unwrap();
            let decoded = f.lock().unwrap().config().decoded_regions();
            let mut mapped: Vec<_> = m
                .mapper
                .mapped()
                .into_iter()
                .filter(|r| r.device == dev)
                .collect();
            mapped.sort_by_key(|r| r.bar);
            assert_eq!(mapped.len(), decoded.len());
            for (r, d) in mapped.iter().zip(decoded.iter()) {
                assert_eq!(
                    (r.bar, r.kind, r.base, r.size),
                    (d.bar, d.kind, d.base, d.size)
                );
            }
        }
        // Event stream consistency: never unmap what is not mapped, never map twice.
        let mut live: Vec<BarRegion> = Vec::new();
        for e in m.mapper.events() {
            match e {
                BarEvent::Map(r) => {
                    assert!(!live.contains(&r));
                    live.push(r);
                }
                BarEvent::Unmap(r) => {
                    let pos = live
                        .iter()
                        .position(|l| *l == r)
                        .expect("unmap of unmapped region");
                    live.remove(pos);
                }
            }
        }
    }

    #[test]
    fn config_space_snapshot_restores_through_the_trait() {
        let f = bar_device();
        let snapshot = f.lock().unwrap().config().clone();
        f.lock().unwrap().config_mut().write(0x10, &[0xff; 4]);
        assert_ne!(*f.lock().unwrap().config(), snapshot);
        *f.lock().unwrap().config_mut() = snapshot.clone();
        assert_eq!(*f.lock().unwrap().config(), snapshot);
    }
}
