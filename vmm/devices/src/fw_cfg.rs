//! QEMU's firmware configuration device (fw_cfg), x86 port-I/O flavour, as SeaBIOS, OVMF and
//! Linux's `qemu_fw_cfg` driver read it.
//!
//! Emulated (register the device at port 0x510, length 12):
//! - offset 0 (0x510): selector, a 16-bit little-endian write (an 8-bit write selects the
//!   zero-extended byte); 8-bit reads at offsets 0 and 1 return the next byte of the selected
//!   item (0 once past its end), as QEMU's combined port does;
//! - offset 1 (0x511): data port (reads as above; writes are ignored, as since QEMU 2.4);
//! - offsets 4..12 (0x514..0x51b): the big-endian 64-bit DMA address register. A 32-bit
//!   write at 4 sets the high half (and clears the low half), a write covering offset 11
//!   (the 32-bit write at 8, or a 64-bit write at 4) completes the address and runs the
//!   transfer; byte-sized writes merge into the register. Reads return "QEMU CFG".
//! - DMA (`FWCfgDmaAccess`: be32 control, be32 length, be64 address) with SELECT, READ
//!   (zero fill past the item end), SKIP and WRITE (ignored: every item is read-only, the
//!   offset advances as for a skip). Control is written back as 0, or ERROR (1) on the first
//!   guest address that is not RAM. Zero fill goes in 64 KiB chunks; nothing is allocated
//!   from a guest-supplied length.
//! - Items by key, the file directory (key 0x19, sorted by name like QEMU), and helpers for
//!   the files SeaBIOS reads: `etc/e820`, `bootorder`, `etc/show-boot-menu`,
//!   `etc/boot-menu-wait`.
//!
//! Not emulated: the MMIO flavour (ARM), writable items / write callbacks, select callbacks,
//! QEMU's legacy (pre-sorting) file order. Unlike QEMU, which renumbers file selectors so
//! that they follow the sorted directory, a file keeps the selector it was given when added
//! (0x20 upwards in insertion order); firmware reads selectors from the directory, so this
//! is invisible to the guest and keeps the selector returned by [`FwCfg::add_file`] valid.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::BusDevice;

/// Base of the port range on x86.
pub const FW_CFG_PORT_BASE: u64 = 0x510;
/// Length of the port range (selector/data at 0..2, DMA address at 4..12).
pub const FW_CFG_PORT_LEN: u64 = 12;

/// "QEMU": read from key [`SIGNATURE`].
pub const SIGNATURE: u16 = 0x00;
/// Feature bits: bit 0 traditional interface, bit 1 DMA.
pub const ID: u16 = 0x01;
pub const UUID: u16 = 0x02;
pub const RAM_SIZE: u16 = 0x03;
pub const NOGRAPHIC: u16 = 0x04;
pub const NB_CPUS: u16 = 0x05;
pub const MACHINE_ID: u16 = 0x06;
pub const KERNEL_ADDR: u16 = 0x07;
pub const KERNEL_SIZE: u16 = 0x08;
pub const KERNEL_CMDLINE: u16 = 0x09;
pub const INITRD_ADDR: u16 = 0x0a;
pub const INITRD_SIZE: u16 = 0x0b;
pub const BOOT_DEVICE: u16 = 0x0c;
pub const NUMA: u16 = 0x0d;
pub const BOOT_MENU: u16 = 0x0e;
pub const MAX_CPUS: u16 = 0x0f;
pub const KERNEL_ENTRY: u16 = 0x10;
pub const KERNEL_DATA: u16 = 0x11;
pub const INITRD_DATA: u16 = 0x12;
pub const CMDLINE_ADDR: u16 = 0x13;
pub const CMDLINE_SIZE: u16 = 0x14;
pub const CMDLINE_DATA: u16 = 0x15;
pub const SETUP_ADDR: u16 = 0x16;
pub const SETUP_SIZE: u16 = 0x17;
pub const SETUP_DATA: u16 = 0x18;
/// The file directory.
pub const FILE_DIR: u16 = 0x19;
/// Selector of the first file.
pub const FILE_FIRST: u16 = 0x20;
/// Architecture-specific keys have this bit set.
pub const ARCH_LOCAL: u16 = 0x8000;
pub const ACPI_TABLES: u16 = 0x8000;
pub const SMBIOS_ENTRIES: u16 = 0x8001;
pub const IRQ0_OVERRIDE: u16 = 0x8002;
pub const E820_TABLE: u16 = 0x8003;
pub const HPET: u16 = 0x8004;

/// Selector bit asking for the (obsolete) write channel; ignored for lookups, as in QEMU.
const WRITE_CHANNEL: u16 = 0x4000;

/// Value of key [`ID`]: traditional interface and DMA.
pub const ID_TRADITIONAL: u32 = 0x01;
pub const ID_DMA: u32 = 0x02;

/// Signature read back from the DMA address register ("QEMU CFG").
pub const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;

/// DMA control bits.
pub const DMA_CTL_ERROR: u32 = 0x01;
pub const DMA_CTL_READ: u32 = 0x02;
pub const DMA_CTL_SKIP: u32 = 0x04;
pub const DMA_CTL_SELECT: u32 = 0x08;
pub const DMA_CTL_WRITE: u32 = 0x10;

/// Size of a `FWCfgDmaAccess` descriptor in guest memory.
const DMA_DESCRIPTOR_LEN: usize = 16;
/// Largest zero-fill write issued at once.
const ZERO_CHUNK: usize = 64 * 1024;
static ZEROES: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// Room for a file name in a directory entry, including the terminating NUL.
pub const FILE_NAME_SIZE: usize = 56;
/// Longest file name accepted (one byte is kept for the NUL).
pub const MAX_FILE_NAME_LEN: usize = FILE_NAME_SIZE - 1;
/// Size of one directory entry: size, select, reserved, name.
pub const FILE_DIR_ENTRY_SIZE: usize = 4 + 2 + 2 + FILE_NAME_SIZE;
/// Most files this device holds (QEMU defaults to 32 slots; SeaBIOS has no limit).
pub const MAX_FILES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FwCfgError {
    #[error("fw_cfg file name {name:?} is {len} bytes long; at most {MAX_FILE_NAME_LEN} fit")]
    NameTooLong { name: String, len: usize },
    #[error("fw_cfg file name {0:?} is empty or contains a NUL byte")]
    InvalidName(String),
    #[error("fw_cfg file {0:?} already exists")]
    DuplicateName(String),
    #[error("fw_cfg file table is full ({MAX_FILES} files)")]
    TooManyFiles,
    #[error("fw_cfg file {name:?} is {len} bytes; the directory records sizes in 32 bits")]
    FileTooLarge { name: String, len: usize },
}

/// The guest-visible register state; items themselves are configuration and are rebuilt by
/// the engine on restore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgState {
    /// Selected key as the guest wrote it.
    pub selector: u16,
    /// Read offset inside the selected item (never beyond its end).
    pub offset: u64,
    /// DMA address register being assembled (reset to 0 after each transfer, as QEMU).
    pub dma_address: u64,
}

/// One e820 map entry as QEMU puts it in "etc/e820".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl E820Entry {
    pub const RAM: u32 = 1;
    pub const RESERVED: u32 = 2;
    pub const ACPI: u32 = 3;
    pub const NVS: u32 = 4;

    /// Size of one entry in "etc/e820".
    pub const ENCODED_LEN: usize = 20;
}

/// Contents of "etc/e820": packed `{u64 address, u64 length, u32 type}` little-endian.
pub fn e820_file_bytes(entries: &[E820Entry]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(entries.len() * E820Entry::ENCODED_LEN);
    for entry in entries {
        bytes.extend_from_slice(&entry.addr.to_le_bytes());
        bytes.extend_from_slice(&entry.size.to_le_bytes());
        bytes.extend_from_slice(&entry.kind.to_le_bytes());
    }
    bytes
}

/// Contents of "bootorder" as QEMU builds it: the device paths separated by newlines, the
/// whole NUL-terminated; no paths gives an empty file.
pub fn bootorder_bytes(paths: &[String]) -> Vec<u8> {
    if paths.is_empty() {
        return Vec::new();
    }
    let mut bytes = paths.join("\n").into_bytes();
    bytes.push(0);
    bytes
}

#[derive(Debug, Clone)]
struct FileEntry {
    name: String,
    selector: u16,
}

/// The fw_cfg device. Register at [`FW_CFG_PORT_BASE`] with length [`FW_CFG_PORT_LEN`].
pub struct FwCfg {
    mem: GuestMemoryMmap,
    /// Items by key with the write-channel bit stripped (the arch bit is kept).
    items: BTreeMap<u16, Vec<u8>>,
    /// Files in insertion order; file `i` has selector `FILE_FIRST + i`.
    files: Vec<FileEntry>,
    state: FwCfgState,
}

impl FwCfg {
    /// A device reading and writing `mem` for DMA, with the signature, the ID (traditional
    /// interface + DMA) and an empty file directory.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        let mut fw_cfg = Self {
            mem,
            items: BTreeMap::new(),
            files: Vec::new(),
            state: FwCfgState::default(),
        };
        fw_cfg.add_item(SIGNATURE, b"QEMU".to_vec());
        fw_cfg.add_u32(ID, ID_TRADITIONAL | ID_DMA);
        fw_cfg.rebuild_directory();
        fw_cfg
    }

    /// Sets item `key` (replacing any previous data). Keys of files (0x20 and up, without the
    /// arch bit) should be set through [`FwCfg::add_file`]/[`FwCfg::set_file`]; if set here,
    /// the directory still reports their new size.
    pub fn add_item(&mut self, key: u16, data: Vec<u8>) {
        let key = lookup_key(key);
        self.items.insert(key, data);
        if key >= FILE_FIRST && key & ARCH_LOCAL == 0 {
            self.rebuild_directory();
        }
    }

    /// Stores `value` little-endian, like QEMU's `fw_cfg_add_i16`.
    pub fn add_u16(&mut self, key: u16, value: u16) {
        self.add_item(key, value.to_le_bytes().to_vec());
    }

    /// Stores `value` little-endian, like QEMU's `fw_cfg_add_i32`.
    pub fn add_u32(&mut self, key: u16, value: u32) {
        self.add_item(key, value.to_le_bytes().to_vec());
    }

    /// Stores `value` little-endian, like QEMU's `fw_cfg_add_i64`.
    pub fn add_u64(&mut self, key: u16, value: u64) {
        self.add_item(key, value.to_le_bytes().to_vec());
    }

    /// Stores `value` NUL-terminated, like QEMU's `fw_cfg_add_string` (e.g. the kernel
    /// command line).
    pub fn add_string(&mut self, key: u16, value: &str) {
        let mut data = value.as_bytes().to_vec();
        data.push(0);
        self.add_item(key, data);
    }

    /// Adds a named file and returns its selector.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        validate_file(name, &data)?;
        if self.file_selector(name).is_some() {
            return Err(FwCfgError::DuplicateName(name.to_string()));
        }
        if self.files.len() >= MAX_FILES {
            return Err(FwCfgError::TooManyFiles);
        }
        // MAX_FILES keeps this far below the write-channel bit.
        let selector = FILE_FIRST + self.files.len() as u16;
        self.files.push(FileEntry {
            name: name.to_string(),
            selector,
        });
        self.items.insert(selector, data);
        self.rebuild_directory();
        Ok(selector)
    }

    /// Adds the file, or replaces the contents of an existing file of that name (like QEMU's
    /// `fw_cfg_modify_file`); returns its selector.
    pub fn set_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        match self.file_selector(name) {
            Some(selector) => {
                validate_file(name, &data)?;
                self.items.insert(selector, data);
                self.rebuild_directory();
                Ok(selector)
            }
            None => self.add_file(name, data),
        }
    }

    /// Selector of the file called `name`.
    pub fn file_selector(&self, name: &str) -> Option<u16> {
        self.files
            .iter()
            .find(|file| file.name == name)
            .map(|file| file.selector)
    }

    /// The data of item `key` (files included, by selector).
    pub fn item(&self, key: u16) -> Option<&[u8]> {
        self.items.get(&lookup_key(key)).map(Vec::as_slice)
    }

    /// The boot menu as QEMU's `-boot menu=on|off,splash-time=N` sets it: key BOOT_MENU
    /// (u16), "etc/show-boot-menu" (u16, SeaBIOS reads it with `romfile_loadint`) and
    /// "etc/boot-menu-wait" (u16 milliseconds, little-endian).
    pub fn set_boot_menu(&mut self, show: bool, timeout_ms: u16) {
        let show = u16::from(show);
        self.add_u16(BOOT_MENU, show);
        for (name, value) in [
            ("etc/show-boot-menu", show),
            ("etc/boot-menu-wait", timeout_ms),
        ] {
            if let Err(e) = self.set_file(name, value.to_le_bytes().to_vec()) {
                log::warn!("fw_cfg: cannot set {name}: {e}");
            }
        }
    }

    /// Guest-visible register state, for save/restore.
    pub fn state(&self) -> FwCfgState {
        self.state
    }

    /// Restores register state saved by [`FwCfg::state`] (items must be configured first).
    pub fn restore_state(&mut self, state: FwCfgState) {
        self.state = state;
        let len = self.selected_len() as u64;
        self.state.offset = self.state.offset.min(len);
    }

    /// Device reset: select the signature, clear the DMA address.
    pub fn reset(&mut self) {
        self.state = FwCfgState::default();
    }

    fn rebuild_directory(&mut self) {
        let mut sorted: Vec<&FileEntry> = self.files.iter().collect();
        sorted.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        let mut dir = Vec::with_capacity(4 + sorted.len() * FILE_DIR_ENTRY_SIZE);
        dir.extend_from_slice(&(sorted.len() as u32).to_be_bytes());
        for file in sorted {
            let size = self.items.get(&file.selector).map_or(0, Vec::len);
            dir.extend_from_slice(&u32::try_from(size).unwrap_or(u32::MAX).to_be_bytes());
            dir.extend_from_slice(&file.selector.to_be_bytes());
            dir.extend_from_slice(&0u16.to_be_bytes());
            let mut name = [0u8; FILE_NAME_SIZE];
            let bytes = file.name.as_bytes();
            let len = bytes.len().min(MAX_FILE_NAME_LEN);
            name[..len].copy_from_slice(&bytes[..len]);
            dir.extend_from_slice(&name);
        }
        self.items.insert(FILE_DIR, dir);
    }

    fn select(&mut self, key: u16) {
        self.state.selector = key;
        self.state.offset = 0;
    }

    fn selected(&self) -> &[u8] {
        self.items
            .get(&lookup_key(self.state.selector))
            .map_or(&[], Vec::as_slice)
    }

    fn selected_len(&self) -> usize {
        self.selected().len()
    }

    fn current_offset(&self) -> usize {
        usize::try_from(self.state.offset).unwrap_or(usize::MAX)
    }

    /// Next byte of the selected item through the data port; 0 past the end.
    fn read_data_byte(&mut self) -> u8 {
        let offset = self.current_offset();
        match self.selected().get(offset).copied() {
            Some(byte) => {
                self.state.offset += 1;
                byte
            }
            None => 0,
        }
    }

    fn write_dma_register(&mut self, reg_offset: usize, data: &[u8]) {
        if reg_offset == 0 && data.len() == 4 {
            // High half; QEMU clears the low half here.
            let high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
            self.state.dma_address = u64::from(high) << 32;
            return;
        }
        let mut image = self.state.dma_address.to_be_bytes();
        let mut completes = false;
        for (i, &byte) in data.iter().enumerate() {
            let Some(slot) = image.get_mut(reg_offset + i) else {
                break;
            };
            *slot = byte;
            completes |= reg_offset + i == image.len() - 1;
        }
        self.state.dma_address = u64::from_be_bytes(image);
        if completes {
            let descriptor = self.state.dma_address;
            self.state.dma_address = 0;
            self.dma_transfer(descriptor);
        }
    }

    fn dma_transfer(&mut self, descriptor_addr: u64) {
        let mut descriptor = [0u8; DMA_DESCRIPTOR_LEN];
        let descriptor_ok = descriptor_addr
            .checked_add(DMA_DESCRIPTOR_LEN as u64)
            .is_some()
            && self
                .mem
                .read_slice(&mut descriptor, GuestAddress(descriptor_addr))
                .is_ok();
        if !descriptor_ok {
            // As QEMU: try to report the error; fails silently if the control word is not RAM.
            self.write_control(descriptor_addr, DMA_CTL_ERROR);
            return;
        }
        let control =
            u32::from_be_bytes([descriptor[0], descriptor[1], descriptor[2], descriptor[3]]);
        let length =
            u32::from_be_bytes([descriptor[4], descriptor[5], descriptor[6], descriptor[7]]);
        let mut address_bytes = [0u8; 8];
        address_bytes.copy_from_slice(&descriptor[8..16]);
        let address = u64::from_be_bytes(address_bytes);

        if control & DMA_CTL_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let result = if control & DMA_CTL_READ != 0 {
            self.dma_read(length, address)
        } else if control & (DMA_CTL_WRITE | DMA_CTL_SKIP) != 0 {
            // Items are read-only: a write consumes the item like a skip and is dropped.
            self.dma_skip(length);
            0
        } else {
            0
        };
        self.write_control(descriptor_addr, result);
    }

    fn write_control(&self, descriptor_addr: u64, control: u32) {
        let _ = self
            .mem
            .write_slice(&control.to_be_bytes(), GuestAddress(descriptor_addr));
    }

    fn dma_skip(&mut self, length: u32) {
        let available = self.selected_len().saturating_sub(self.current_offset());
        let step = available.min(length as usize);
        self.state.offset += step as u64;
    }

    /// Copies `length` bytes of the selected item to `address`, zero-filling past its end.
    /// Returns the control word to report.
    fn dma_read(&mut self, length: u32, address: u64) -> u32 {
        let mut remaining = length as usize;
        let mut address = address;
        let offset = self.current_offset();
        let available = self.selected_len().saturating_sub(offset);
        let from_item = available.min(remaining);
        if from_item > 0 {
            let Some(chunk) = self.selected().get(offset..offset + from_item) else {
                return DMA_CTL_ERROR;
            };
            let ok = fits(address, from_item)
                && self.mem.write_slice(chunk, GuestAddress(address)).is_ok();
            self.state.offset += from_item as u64;
            if !ok {
                return DMA_CTL_ERROR;
            }
            address += from_item as u64;
            remaining -= from_item;
        }
        // Zero fill: at most 4 GiB / 64 KiB iterations, stopping at the first bad address.
        while remaining > 0 {
            let step = remaining.min(ZERO_CHUNK);
            if !fits(address, step)
                || self
                    .mem
                    .write_slice(&ZEROES[..step], GuestAddress(address))
                    .is_err()
            {
                return DMA_CTL_ERROR;
            }
            address += step as u64;
            remaining -= step;
        }
        0
    }
}

/// Whether `[address, address + len)` does not wrap around the address space.
fn fits(address: u64, len: usize) -> bool {
    address.checked_add(len as u64).is_some()
}

/// Key under which an item is stored: the write-channel bit plays no part in lookups.
fn lookup_key(key: u16) -> u16 {
    key & !WRITE_CHANNEL
}

fn validate_file(name: &str, data: &[u8]) -> Result<(), FwCfgError> {
    if name.len() > MAX_FILE_NAME_LEN {
        return Err(FwCfgError::NameTooLong {
            name: name.to_string(),
            len: name.len(),
        });
    }
    if name.is_empty() || name.contains('\0') {
        return Err(FwCfgError::InvalidName(name.to_string()));
    }
    if u32::try_from(data.len()).is_err() {
        return Err(FwCfgError::FileTooLarge {
            name: name.to_string(),
            len: data.len(),
        });
    }
    Ok(())
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *byte = match at {
                0 | 1 => self.read_data_byte(),
                4..=11 => DMA_SIGNATURE.to_be_bytes()[(at - 4) as usize],
                _ => 0,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [low]) => self.select(u16::from(*low)),
            (0, [low, high, ..]) => self.select(u16::from_le_bytes([*low, *high])),
            // Data writes are ignored (QEMU >= 2.4); 2..4 is unused.
            (1..=3, _) => {}
            (4..=11, _) => self.write_dma_register((offset - 4) as usize, data),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM_SIZE: usize = 1 << 20;
    const DESC: u64 = 0x1000;
    const BUF: u64 = 0x2000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn device() -> (FwCfg, GuestMemoryMmap) {
        let mem = memory();
        (FwCfg::new(mem.clone()), mem)
    }

    /// `outw(key, 0x510)`.
    fn select(fw: &mut FwCfg, key: u16) {
        fw.write(0, &key.to_le_bytes());
    }

    /// `insb(0x511, buf, len)`.
    fn read_bytes(fw: &mut FwCfg, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                let mut b = [0u8];
                fw.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    /// SeaBIOS: `outl(cpu_to_be32(high), 0x514); outl(cpu_to_be32(low), 0x518)`.
    fn kick_dma(fw: &mut FwCfg, descriptor: u64) {
        fw.write(4, &((descriptor >> 32) as u32).to_be_bytes());
        fw.write(8, &(descriptor as u32).to_be_bytes());
    }

    /// Writes a descriptor at DESC, runs it, returns the control word read back.
    fn dma(fw: &mut FwCfg, mem: &GuestMemoryMmap, control: u32, length: u32, address: u64) -> u32 {
        write_descriptor(mem, DESC, control, length, address);
        kick_dma(fw, DESC);
        read_control(mem, DESC)
    }

    fn write_descriptor(mem: &GuestMemoryMmap, at: u64, control: u32, length: u32, address: u64) {
        let mut d = Vec::new();
        d.extend_from_slice(&control.to_be_bytes());
        d.extend_from_slice(&length.to_be_bytes());
        d.extend_from_slice(&address.to_be_bytes());
        mem.write_slice(&d, GuestAddress(at)).unwrap();
    }

    fn read_control(mem: &GuestMemoryMmap, at: u64) -> u32 {
        let mut c = [0u8; 4];
        mem.read_slice(&mut c, GuestAddress(at)).unwrap();
        u32::from_be_bytes(c)
    }

    fn guest_bytes(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    fn parse_directory(dir: &[u8]) -> Vec<(u32, u16, String)> {
        let count = u32::from_be_bytes(dir[0..4].try_into().unwrap()) as usize;
        assert_eq!(dir.len(), 4 + count * FILE_DIR_ENTRY_SIZE);
        (0..count)
            .map(|i| {
                let e = &dir[4 + i * FILE_DIR_ENTRY_SIZE..][..FILE_DIR_ENTRY_SIZE];
                let size = u32::from_be_bytes(e[0..4].try_into().unwrap());
                let select = u16::from_be_bytes(e[4..6].try_into().unwrap());
                assert_eq!(&e[6..8], &[0, 0], "reserved");
                let name_field = &e[8..];
                let end = name_field.iter().position(|&b| b == 0).unwrap();
                assert!(name_field[end..].iter().all(|&b| b == 0), "NUL padded");
                (
                    size,
                    select,
                    String::from_utf8(name_field[..end].to_vec()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn signature_and_id_through_the_ports() {
        let (mut fw, _) = device();
        select(&mut fw, SIGNATURE);
        assert_eq!(read_bytes(&mut fw, 4), b"QEMU");
        select(&mut fw, ID);
        let id = read_bytes(&mut fw, 4);
        assert_eq!(u32::from_le_bytes(id.try_into().unwrap()), 3);
        // After reset the signature is selected (SeaBIOS probes by reading right away too).
        fw.reset();
        assert_eq!(read_bytes(&mut fw, 4), b"QEMU");
        // An 8-bit selector write selects the zero-extended byte; 0x510 reads data too.
        select(&mut fw, 0x8003);
        fw.write(0, &[SIGNATURE as u8]);
        let mut b = [0u8];
        fw.read(0, &mut b);
        assert_eq!(b[0], b'Q');
    }

    #[test]
    fn dma_register_reads_back_the_signature() {
        let (mut fw, _) = device();
        let mut all = [0u8; 8];
        fw.read(4, &mut all);
        assert_eq!(&all, b"QEMU CFG");
        assert_eq!(u64::from_be_bytes(all), DMA_SIGNATURE);
        let (mut high, mut low) = ([0u8; 4], [0u8; 4]);
        fw.read(4, &mut high);
        fw.read(8, &mut low);
        assert_eq!(&high, b"QEMU");
        assert_eq!(&low, b" CFG");
        let mut one = [0u8];
        fw.read(11, &mut one);
        assert_eq!(one[0], b'G');
    }

    #[test]
    fn select_and_read_an_item_then_past_its_end() {
        let (mut fw, _) = device();
        fw.add_u32(NB_CPUS, 0x0403_0201);
        fw.add_u16(MAX_CPUS, 0x0807);
        fw.add_u64(RAM_SIZE, 0x1122_3344_5566_7788);
        select(&mut fw, NB_CPUS);
        assert_eq!(read_bytes(&mut fw, 6), [1, 2, 3, 4, 0, 0]);
        assert_eq!(fw.state().offset, 4, "offset stops at the end");
        select(&mut fw, MAX_CPUS);
        assert_eq!(read_bytes(&mut fw, 2), [7, 8]);
        select(&mut fw, RAM_SIZE);
        assert_eq!(
            read_bytes(&mut fw, 8),
            0x1122_3344_5566_7788u64.to_le_bytes()
        );
        // Reselecting starts over; the write-channel bit does not change the item.
        select(&mut fw, RAM_SIZE | WRITE_CHANNEL);
        assert_eq!(read_bytes(&mut fw, 1), [0x88]);
        // Unknown keys read as zero; data-port writes are ignored.
        select(&mut fw, 0x3abc);
        fw.write(1, &[0x55]);
        assert_eq!(read_bytes(&mut fw, 3), [0, 0, 0]);
        fw.add_string(KERNEL_CMDLINE, "console=ttyS0");
        select(&mut fw, KERNEL_CMDLINE);
        assert_eq!(read_bytes(&mut fw, 14), b"console=ttyS0\0");
    }

    #[test]
    fn file_directory_layout_is_sorted_with_stable_selectors() {
        let (mut fw, _) = device();
        select(&mut fw, FILE_DIR);
        assert_eq!(read_bytes(&mut fw, 4), [0, 0, 0, 0], "empty directory");
        assert_eq!(fw.add_file("etc/e820", vec![0xaa; 40]).unwrap(), 0x20);
        assert_eq!(fw.add_file("bootorder", b"/pci\0".to_vec()).unwrap(), 0x21);
        assert_eq!(
            fw.add_file("genroms/vgabios.bin", vec![1; 512]).unwrap(),
            0x22
        );
        assert_eq!(
            fw.add_file("etc/boot-menu-wait", vec![0x10, 0x27]).unwrap(),
            0x23
        );

        select(&mut fw, FILE_DIR);
        let dir = read_bytes(&mut fw, 4 + 4 * FILE_DIR_ENTRY_SIZE + 8);
        assert_eq!(&dir[0..4], &[0, 0, 0, 4]);
        // First entry byte for byte.
        let mut first = vec![0, 0, 0, 5, 0x00, 0x21, 0, 0];
        let mut name = b"bootorder".to_vec();
        name.resize(FILE_NAME_SIZE, 0);
        first.extend_from_slice(&name);
        assert_eq!(&dir[4..4 + FILE_DIR_ENTRY_SIZE], first.as_slice());
        assert!(
            dir[4 + 4 * FILE_DIR_ENTRY_SIZE..].iter().all(|&b| b == 0),
            "past end"
        );

        let entries = parse_directory(fw.item(FILE_DIR).unwrap());
        assert_eq!(
            entries,
            vec![
                (5, 0x21, "bootorder".to_string()),
                (2, 0x23, "etc/boot-menu-wait".to_string()),
                (40, 0x20, "etc/e820".to_string()),
                (512, 0x22, "genroms/vgabios.bin".to_string()),
            ]
        );
        // Replacing a file's contents keeps its selector and updates the size.
        assert_eq!(fw.set_file("etc/e820", vec![0; 60]).unwrap(), 0x20);
        let entries = parse_directory(fw.item(FILE_DIR).unwrap());
        assert_eq!(entries[2], (60, 0x20, "etc/e820".to_string()));
        // A 55-byte name fills the field up to its NUL.
        let long = "x".repeat(MAX_FILE_NAME_LEN);
        fw.add_file(&long, vec![]).unwrap();
        let entries = parse_directory(fw.item(FILE_DIR).unwrap());
        assert_eq!(entries.last().unwrap().2, long);
    }

    #[test]
    fn seabios_style_lookup_then_dma_read_of_e820() {
        let (mut fw, mem) = device();
        let e820 = e820_file_bytes(&[
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820Entry::RAM,
            },
            E820Entry {
                addr: 0x100000,
                size: 0x7f00000,
                kind: E820Entry::RAM,
            },
            E820Entry {
                addr: 0xfeffc000,
                size: 0x4000,
                kind: E820Entry::RESERVED,
            },
        ]);
        fw.add_file(
            "bootorder",
            bootorder_bytes(&["/rom@genroms/x.bin".to_string()]),
        )
        .unwrap();
        fw.add_file("etc/e820", e820.clone()).unwrap();
        fw.add_file("etc/acpi/tables", vec![7; 100]).unwrap();

        // qemu_cfg_init: signature, ID, then walk the directory through the data port.
        select(&mut fw, SIGNATURE);
        assert_eq!(read_bytes(&mut fw, 4), b"QEMU");
        select(&mut fw, ID);
        let id = u32::from_le_bytes(read_bytes(&mut fw, 4).try_into().unwrap());
        assert_ne!(id & ID_DMA, 0);
        select(&mut fw, FILE_DIR);
        let count = u32::from_be_bytes(read_bytes(&mut fw, 4).try_into().unwrap());
        let mut found = None;
        for _ in 0..count {
            let entry = read_bytes(&mut fw, FILE_DIR_ENTRY_SIZE);
            let size = u32::from_be_bytes(entry[0..4].try_into().unwrap());
            let select = u16::from_be_bytes(entry[4..6].try_into().unwrap());
            if entry[8..].starts_with(b"etc/e820\0") {
                found = Some((size, select));
            }
        }
        let (size, selector) = found.expect("etc/e820 listed");
        assert_eq!(size as usize, e820.len());

        // qemu_cfg_read_entry with DMA: SELECT | READ in one descriptor.
        let control = (u32::from(selector) << 16) | DMA_CTL_SELECT | DMA_CTL_READ;
        assert_eq!(dma(&mut fw, &mem, control, size, BUF), 0);
        assert_eq!(guest_bytes(&mem, BUF, e820.len()), e820);
        assert_eq!(
            fw.state().dma_address,
            0,
            "address register reset after the transfer"
        );
    }

    #[test]
    fn dma_skip_read_and_zero_fill() {
        let (mut fw, mem) = device();
        let data: Vec<u8> = (1..=16).collect();
        let sel = fw.add_file("etc/test", data.clone()).unwrap();
        mem.write_slice(&[0xee; 32], GuestAddress(BUF)).unwrap();

        // Select + skip 4, then read 8: bytes 5..=12.
        let skip = (u32::from(sel) << 16) | DMA_CTL_SELECT | DMA_CTL_SKIP;
        assert_eq!(dma(&mut fw, &mem, skip, 4, 0), 0);
        assert_eq!(fw.state().offset, 4);
        assert_eq!(dma(&mut fw, &mem, DMA_CTL_READ, 8, BUF), 0);
        assert_eq!(guest_bytes(&mem, BUF, 9), [5, 6, 7, 8, 9, 10, 11, 12, 0xee]);
        // The data port continues where DMA stopped.
        assert_eq!(read_bytes(&mut fw, 1), [13]);

        // Reading more than is left: 3 item bytes, then zeroes.
        assert_eq!(dma(&mut fw, &mem, DMA_CTL_READ, 10, BUF), 0);
        assert_eq!(
            guest_bytes(&mem, BUF, 11),
            [14, 15, 16, 0, 0, 0, 0, 0, 0, 0, 0xee]
        );
        assert_eq!(fw.state().offset, 16);

        // A descriptor without an operation does nothing but select.
        let only_select = (u32::from(ID) << 16) | DMA_CTL_SELECT;
        assert_eq!(dma(&mut fw, &mem, only_select, 100, BUF), 0);
        assert_eq!(fw.state().selector, ID);
        assert_eq!(guest_bytes(&mem, BUF, 4), [14, 15, 16, 0], "untouched");
    }

    #[test]
    fn dma_write_is_ignored_and_items_stay_read_only() {
        let (mut fw, mem) = device();
        let sel = fw.add_file("etc/ro", vec![1, 2, 3, 4]).unwrap();
        mem.write_slice(&[9, 9], GuestAddress(BUF)).unwrap();
        let write = (u32::from(sel) << 16) | DMA_CTL_SELECT | DMA_CTL_WRITE;
        assert_eq!(dma(&mut fw, &mem, write, 2, BUF), 0);
        assert_eq!(fw.item(sel).unwrap(), &[1, 2, 3, 4]);
        assert_eq!(fw.state().offset, 2, "consumed like a skip");
        assert_eq!(read_bytes(&mut fw, 2), [3, 4]);
    }

    #[test]
    fn descriptor_outside_memory_writes_nothing() {
        let (mut fw, mem) = device();
        let before = guest_bytes(&mem, 0, MEM_SIZE);
        kick_dma(&mut fw, MEM_SIZE as u64 + 0x1000);
        kick_dma(&mut fw, 0xffff_ffff_ffff_fff8);
        kick_dma(&mut fw, u64::MAX);
        assert_eq!(guest_bytes(&mem, 0, MEM_SIZE), before);
        // A descriptor straddling the end of RAM is unreadable: ERROR lands in its control.
        let at = MEM_SIZE as u64 - 8;
        mem.write_slice(&DMA_CTL_READ.to_be_bytes(), GuestAddress(at))
            .unwrap();
        kick_dma(&mut fw, at);
        assert_eq!(read_control(&mem, at), DMA_CTL_ERROR);
    }

    #[test]
    fn target_outside_memory_reports_error() {
        let (mut fw, mem) = device();
        let control = (u32::from(SIGNATURE) << 16) | DMA_CTL_SELECT | DMA_CTL_READ;
        assert_eq!(
            dma(&mut fw, &mem, control, 4, MEM_SIZE as u64),
            DMA_CTL_ERROR
        );
        // Wrapping target address.
        assert_eq!(dma(&mut fw, &mem, control, 4, u64::MAX - 1), DMA_CTL_ERROR);
        // Target crossing the end of RAM in the zero-fill part.
        let end = MEM_SIZE as u64 - 6;
        assert_eq!(dma(&mut fw, &mem, control, 12, end), DMA_CTL_ERROR);
        // The register was reset each time and a good transfer still works.
        assert_eq!(dma(&mut fw, &mem, control, 4, BUF), 0);
        assert_eq!(guest_bytes(&mem, BUF, 4), b"QEMU");
    }

    #[test]
    fn huge_length_is_bounded_by_memory() {
        let (mut fw, mem) = device();
        mem.write_slice(&[0xff; 0x1000], GuestAddress(MEM_SIZE as u64 - 0x1000))
            .unwrap();
        let control = (u32::from(SIGNATURE) << 16) | DMA_CTL_SELECT | DMA_CTL_READ;
        assert_eq!(dma(&mut fw, &mem, control, u32::MAX, BUF), DMA_CTL_ERROR);
        assert_eq!(guest_bytes(&mem, BUF, 4), b"QEMU");
        assert!(guest_bytes(&mem, MEM_SIZE as u64 - 0x1000, 0x1000)
            .iter()
            .all(|&b| b == 0));
        assert_eq!(fw.state().offset, 4);
        // A huge skip just moves to the end.
        let skip = (u32::from(ID) << 16) | DMA_CTL_SELECT | DMA_CTL_SKIP;
        assert_eq!(dma(&mut fw, &mem, skip, u32::MAX, 0), 0);
        assert_eq!(fw.state().offset, 4);
    }

    #[test]
    fn dma_register_accepts_64_bit_and_byte_writes() {
        let (mut fw, mem) = device();
        let control = (u32::from(SIGNATURE) << 16) | DMA_CTL_SELECT | DMA_CTL_READ;
        write_descriptor(&mem, DESC, control, 4, BUF);
        // One 64-bit big-endian write at offset 4 (MMIO-style).
        fw.write(4, &DESC.to_be_bytes());
        assert_eq!(read_control(&mem, DESC), 0);
        assert_eq!(guest_bytes(&mem, BUF, 4), b"QEMU");
        // Byte writes: nothing happens until the last byte.
        mem.write_slice(&[0; 4], GuestAddress(BUF)).unwrap();
        write_descriptor(&mem, DESC, control, 4, BUF);
        for (i, byte) in DESC.to_be_bytes().iter().enumerate() {
            if i == 7 {
                assert_eq!(guest_bytes(&mem, BUF, 4), [0; 4], "not started early");
            }
            fw.write(4 + i as u64, &[*byte]);
        }
        assert_eq!(guest_bytes(&mem, BUF, 4), b"QEMU");
        // SeaBIOS writes only the low half; the high half was reset to 0.
        mem.write_slice(&[0; 4], GuestAddress(BUF)).unwrap();
        write_descriptor(&mem, DESC, control, 4, BUF);
        fw.write(8, &(DESC as u32).to_be_bytes());
        assert_eq!(guest_bytes(&mem, BUF, 4), b"QEMU");
        // A stale high half puts the descriptor outside RAM: nothing happens.
        mem.write_slice(&[0; 4], GuestAddress(BUF)).unwrap();
        write_descriptor(&mem, DESC, control, 4, BUF);
        fw.write(4, &1u32.to_be_bytes());
        fw.write(8, &(DESC as u32).to_be_bytes());
        assert_eq!(guest_bytes(&mem, BUF, 4), [0; 4]);
        assert_eq!(read_control(&mem, DESC), control);
    }

    #[test]
    fn e820_bytes_layout() {
        let bytes = e820_file_bytes(&[
            E820Entry {
                addr: 0x0102_0304_0506_0708,
                size: 0x1000,
                kind: E820Entry::RAM,
            },
            E820Entry {
                addr: 0xfee0_0000,
                size: 0x10_0000,
                kind: E820Entry::NVS,
            },
        ]);
        assert_eq!(bytes.len(), 40);
        assert_eq!(&bytes[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&bytes[8..16], &[0, 0x10, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[16..20], &[1, 0, 0, 0]);
        assert_eq!(&bytes[20..28], &[0, 0, 0xe0, 0xfe, 0, 0, 0, 0]);
        assert_eq!(&bytes[28..36], &[0, 0, 0x10, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[36..40], &[4, 0, 0, 0]);
        assert!(e820_file_bytes(&[]).is_empty());
        assert_eq!((E820Entry::RESERVED, E820Entry::ACPI), (2, 3));
    }

    #[test]
    fn bootorder_bytes_layout() {
        let paths = vec![
            "/pci@i0cf8/ide@1,1/drive@0/disk@0".to_string(),
            "/pci@i0cf8/ethernet@3/ethernet-phy@0".to_string(),
        ];
        assert_eq!(
            bootorder_bytes(&paths),
            b"/pci@i0cf8/ide@1,1/drive@0/disk@0\n/pci@i0cf8/ethernet@3/ethernet-phy@0\0"
        );
        assert_eq!(
            bootorder_bytes(&paths[..1]),
            b"/pci@i0cf8/ide@1,1/drive@0/disk@0\0"
        );
        assert!(bootorder_bytes(&[]).is_empty());
    }

    #[test]
    fn boot_menu_sets_key_and_files() {
        let (mut fw, mem) = device();
        fw.set_boot_menu(true, 5000);
        select(&mut fw, BOOT_MENU);
        assert_eq!(read_bytes(&mut fw, 2), [1, 0]);
        let show = fw.file_selector("etc/show-boot-menu").unwrap();
        let wait = fw.file_selector("etc/boot-menu-wait").unwrap();
        assert_eq!(fw.item(show).unwrap(), &[1, 0]);
        let control = (u32::from(wait) << 16) | DMA_CTL_SELECT | DMA_CTL_READ;
        assert_eq!(dma(&mut fw, &mem, control, 2, BUF), 0);
        assert_eq!(
            u16::from_le_bytes(guest_bytes(&mem, BUF, 2).try_into().unwrap()),
            5000
        );
        // Changing it again replaces instead of failing on duplicates.
        fw.set_boot_menu(false, 0);
        assert_eq!(fw.item(BOOT_MENU).unwrap(), &[0, 0]);
        assert_eq!(fw.item(show).unwrap(), &[0, 0]);
        assert_eq!(fw.item(wait).unwrap(), &[0, 0]);
        let names: Vec<String> = parse_directory(fw.item(FILE_DIR).unwrap())
            .into_iter()
            .map(|e| e.2)
            .collect();
        assert_eq!(names, ["etc/boot-menu-wait", "etc/show-boot-menu"]);
    }

    #[test]
    fn add_file_errors() {
        let (mut fw, _) = device();
        let long = "y".repeat(56);
        assert_eq!(
            fw.add_file(&long, vec![]),
            Err(FwCfgError::NameTooLong {
                name: long.clone(),
                len: 56
            })
        );
        assert!(matches!(
            fw.add_file("", vec![]),
            Err(FwCfgError::InvalidName(_))
        ));
        assert!(matches!(
            fw.add_file("a\0b", vec![]),
            Err(FwCfgError::InvalidName(_))
        ));
        fw.add_file("etc/e820", vec![1]).unwrap();
        assert_eq!(
            fw.add_file("etc/e820", vec![2]),
            Err(FwCfgError::DuplicateName("etc/e820".to_string()))
        );
        assert_eq!(fw.item(0x20).unwrap(), &[1], "the first file is kept");
        for i in 1..MAX_FILES {
            fw.add_file(&format!("genroms/{i}.bin"), vec![i as u8])
                .unwrap();
        }
        assert_eq!(
            fw.add_file("one-too-many", vec![]),
            Err(FwCfgError::TooManyFiles)
        );
        let entries = parse_directory(fw.item(FILE_DIR).unwrap());
        assert_eq!(entries.len(), MAX_FILES);
        assert!(entries.windows(2).all(|w| w[0].2 < w[1].2), "sorted");
    }

    #[test]
    fn state_round_trips_and_is_clamped() {
        let (mut fw, _) = device();
        select(&mut fw, SIGNATURE);
        read_bytes(&mut fw, 2);
        let saved = fw.state();
        let (mut other, _) = device();
        other.restore_state(saved);
        assert_eq!(read_bytes(&mut other, 2), b"MU");
        other.restore_state(FwCfgState {
            selector: ID,
            offset: 1 << 40,
            dma_address: 0,
        });
        assert_eq!(other.state().offset, 4);
        assert_eq!(read_bytes(&mut other, 1), [0]);
    }

    /// xorshift64*: deterministic, no dependencies.
    use crate::test_support::TestRng as Prng;

    #[test]
    fn hostile_port_and_dma_sequences_do_not_panic() {
        let (mut fw, mem) = device();
        fw.add_file("etc/e820", vec![0x11; 60]).unwrap();
        fw.add_file("bootorder", vec![0x22; 10]).unwrap();
        fw.add_u64(RAM_SIZE, 1 << 30);
        let mut rng = Prng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let r = rng.next();
            let len = 1 + (r >> 8) as usize % 8;
            let offset = (r >> 16) % 16;
            match r % 5 {
                0 => {
                    let bytes = rng.next().to_le_bytes();
                    fw.write(offset, &bytes[..len]);
                }
                1 => {
                    let mut buf = [0u8; 8];
                    fw.read(offset, &mut buf[..len]);
                    if offset >= 4 && offset + len as u64 <= 12 {
                        assert_eq!(&buf[..len], &b"QEMU CFG"[offset as usize - 4..][..len]);
                    }
                }
                2 => select(&mut fw, rng.next() as u16),
                _ => {
                    // A random descriptor, usually in RAM, with a random target.
                    let at = match rng.next() % 4 {
                        0 => rng.next(),
                        _ => rng.next() % MEM_SIZE as u64,
                    };
                    let control = rng.next() as u32;
                    let length = match rng.next() % 3 {
                        0 => rng.next() as u32,
                        _ => (rng.next() % 256) as u32,
                    };
                    let address = match rng.next() % 3 {
                        0 => rng.next(),
                        _ => rng.next() % MEM_SIZE as u64,
                    };
                    if at.checked_add(16).is_some_and(|end| end <= MEM_SIZE as u64) {
                        write_descriptor(&mem, at, control, length, address);
                    }
                    kick_dma(&mut fw, at);
                }
            }
            let state = fw.state();
            assert!(state.offset as usize <= fw.item(state.selector).map_or(0, <[u8]>::len));
        }
        // Still serves firmware correctly afterwards.
        fw.reset();
        assert_eq!(read_bytes(&mut fw, 4), b"QEMU");
        assert_eq!(
            fw.item(FILE_DIR).map(|d| d.len()),
            Some(4 + 2 * FILE_DIR_ENTRY_SIZE)
        );
    }
}
