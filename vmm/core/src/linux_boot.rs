//! Direct Linux boot through the x86 Linux boot protocol (Documentation/arch/x86/boot.rst).
//!
//! The protected-mode kernel of a bzImage is loaded at 1 MiB, the setup header is copied
//! into a zero page with the command line, initrd and e820 map filled in, and the boot CPU
//! starts at the 32-bit entry point in flat protected mode with ESI pointing at the zero
//! page. No firmware runs. Not supported: 16-bit real-mode entry, EFI handover, 64-bit
//! entry, kernels older than protocol 2.02.

use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_devices::fw_cfg::E820Entry;

use crate::error::{Result, VmmError};
use crate::layout::*;

const SETUP_HEADER_OFFSET: usize = 0x1f1;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADED_HIGH: u8 = 0x01;
const CAN_USE_HEAP: u8 = 0x80;
const E820_MAX_ZERO_PAGE_ENTRIES: usize = 128;

/// Where the boot CPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxEntry {
    pub entry_point: u64,
    pub zero_page: u64,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Loads `kernel` (and `initrd`) into guest memory and prepares the zero page.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    ram_below_4g: u64,
    e820: &[E820Entry],
    kernel_path: &Path,
    initrd_path: Option<&Path>,
    cmdline: &str,
) -> Result<LinuxEntry> {
    let invalid = |reason: String| VmmError::KernelInvalid {
        path: kernel_path.to_path_buf(),
        reason,
    };
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| VmmError::ReadFile {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    let image = read("kernel", kernel_path)?;
    if image.len() < 0x264 {
        return Err(invalid("the file is too small to be a bzImage".into()));
    }
    if u32_at(&image, 0x202) != HDRS_MAGIC {
        return Err(invalid(
            "no Linux boot-protocol header (\"HdrS\") at offset 0x202".into(),
        ));
    }
    let version = u16_at(&image, 0x206);
    if version < 0x0202 {
        return Err(invalid(format!(
            "boot protocol {}.{:02} is older than the 2.02 this loader needs",
            version >> 8,
            version & 0xff
        )));
    }
    let loadflags = image[0x211];
    if loadflags & LOADED_HIGH == 0 {
        return Err(invalid(
            "a zImage (loaded low) is not supported; use a bzImage".into(),
        ));
    }
    let setup_sects = match image[SETUP_HEADER_OFFSET] {
        0 => 4,
        n => n as usize,
    };
    let kernel_offset = (setup_sects + 1) * 512;
    if kernel_offset >= image.len() {
        return Err(invalid(
            "the setup code runs past the end of the file".into(),
        ));
    }
    let kernel = &image[kernel_offset..];
    let kernel_end = KERNEL_START + kernel.len() as u64;
    if kernel_end > ram_below_4g {
        return Err(invalid(format!(
            "the kernel needs {} MiB of memory below 4 GiB",
            kernel_end.div_ceil(1 << 20)
        )));
    }
    let guest_write = |data: &[u8], addr: u64| {
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|e| invalid(format!("cannot write guest memory at {addr:#x}: {e}")))
    };
    guest_write(kernel, KERNEL_START)?;

    // The zero page: the setup header as the kernel has it, then our fields.
    let mut zero_page = vec![0u8; 4096];
    let header_end = (0x202 + image[0x201] as usize).clamp(0x264, image.len().min(0x290));
    zero_page[SETUP_HEADER_OFFSET..header_end]
        .copy_from_slice(&image[SETUP_HEADER_OFFSET..header_end]);
    zero_page[0x210] = 0xff; // type_of_loader: undefined
    zero_page[0x211] = loadflags | CAN_USE_HEAP;
    zero_page[0x224..0x226].copy_from_slice(&0xfe00u16.to_le_bytes()); // heap_end_ptr

    let cmdline_bytes: Vec<u8> = cmdline.bytes().chain(std::iter::once(0)).collect();
    if cmdline_bytes.len() as u64 > CMDLINE_MAX_SIZE {
        return Err(invalid("the command line is longer than 64 KiB".into()));
    }
    guest_write(&cmdline_bytes, CMDLINE_START)?;
    zero_page[0x228..0x22c].copy_from_slice(&(CMDLINE_START as u32).to_le_bytes());

    if let Some(initrd_path) = initrd_path {
        let initrd = read("initrd", initrd_path)?;
        let initrd_addr_max = if version >= 0x0203 {
            u32_at(&image, 0x22c) as u64
        } else {
            0x37ff_ffff
        };
        let top = ram_below_4g.min(initrd_addr_max + 1);
        let addr = top
            .checked_sub(initrd.len() as u64)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= kernel_end)
            .ok_or_else(|| VmmError::KernelInvalid {
                path: initrd_path.to_path_buf(),
                reason: "the initrd does not fit in memory above the kernel".into(),
            })?;
        guest_write(&initrd, addr)?;
        zero_page[0x218..0x21c].copy_from_slice(&(addr as u32).to_le_bytes());
        zero_page[0x21c..0x220].copy_from_slice(&(initrd.len() as u32).to_le_bytes());
    }

    let entries = e820_for_linux(e820, ram_below_4g);
    let count = entries.len().min(E820_MAX_ZERO_PAGE_ENTRIES);
    zero_page[0x1e8] = count as u8;
    for (i, e) in entries.iter().take(count).enumerate() {
        let off = 0x2d0 + i * 20;
        zero_page[off..off + 8].copy_from_slice(&e.addr.to_le_bytes());
        zero_page[off + 8..off + 16].copy_from_slice(&e.size.to_le_bytes());
        zero_page[off + 16..off + 20].copy_from_slice(&e.kind.to_le_bytes());
    }
    guest_write(&zero_page, ZERO_PAGE_START)?;

    // Flat 4 GiB code (0x10) and data (0x18) segments, as the protocol requires.
    let gdt: [u64; 4] = [0, 0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    guest_write(&gdt_bytes, BOOT_GDT_START)?;

    let code32_start = u32_at(&image, 0x214) as u64;
    Ok(LinuxEntry {
        entry_point: if code32_start == 0 {
            KERNEL_START
        } else {
            code32_start
        },
        zero_page: ZERO_PAGE_START,
    })
}

/// The map a kernel gets: conventional memory, the BIOS hole, then the configured map.
fn e820_for_linux(e820: &[E820Entry], ram_below_4g: u64) -> Vec<E820Entry> {
    let mut out = vec![
        E820Entry {
            addr: 0,
            size: LOW_RAM_END,
            kind: E820_RAM,
        },
        E820Entry {
            addr: LOW_RAM_END,
            size: HIGH_MEMORY_START - LOW_RAM_END,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIGH_MEMORY_START,
            size: ram_below_4g - HIGH_MEMORY_START,
            kind: E820_RAM,
        },
    ];
    out.extend(e820.iter().filter(|e| e.addr >= ram_below_4g).cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bzimage(version: u16, payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512];
        img[0x1f1] = 4;
        img[0x201] = 0x62;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x211] = LOADED_HIGH;
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        img.extend_from_slice(payload);
        img
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap()
    }

    #[test]
    fn loads_kernel_cmdline_initrd_and_e820() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("bzImage");
        std::fs::write(&k, bzimage(0x020f, b"KERNEL")).unwrap();
        let i = dir.path().join("initrd");
        std::fs::write(&i, b"INITRD-DATA").unwrap();
        let m = mem();
        let e820 = [E820Entry {
            addr: 0,
            size: 32 << 20,
            kind: E820_RAM,
        }];
        let entry = load_linux(&m, 32 << 20, &e820, &k, Some(&i), "console=ttyS0 quiet").unwrap();
        assert_eq!(
            entry,
            LinuxEntry {
                entry_point: 0x10_0000,
                zero_page: ZERO_PAGE_START
            }
        );
        let mut buf = [0u8; 6];
        m.read_slice(&mut buf, GuestAddress(KERNEL_START)).unwrap();
        assert_eq!(&buf, b"KERNEL");
        let mut zp = [0u8; 4096];
        m.read_slice(&mut zp, GuestAddress(ZERO_PAGE_START))
            .unwrap();
        let cmd_ptr = u32_at(&zp, 0x228) as u64;
        let mut cmd = [0u8; 20];
        m.read_slice(&mut cmd, GuestAddress(cmd_ptr)).unwrap();
        assert_eq!(&cmd[..19], b"console=ttyS0 quiet");
        assert_eq!(cmd[19], 0);
        let (ird, irs) = (u32_at(&zp, 0x218) as u64, u32_at(&zp, 0x21c) as usize);
        assert_eq!(irs, 11);
        assert_eq!(ird % 4096, 0);
        let mut ir = vec![0u8; irs];
        m.read_slice(&mut ir, GuestAddress(ird)).unwrap();
        assert_eq!(ir, b"INITRD-DATA");
        assert_eq!(zp[0x1e8], 3);
        assert_eq!(zp[0x210], 0xff);
        assert_eq!(u32_at(&zp, 0x202), HDRS_MAGIC);
    }

    #[test]
    fn refuses_what_it_cannot_boot() {
        let dir = tempfile::tempdir().unwrap();
        let m = mem();
        let k = dir.path().join("k");
        let e820 = [];
        std::fs::write(&k, vec![0u8; 4096]).unwrap();
        let e = load_linux(&m, 32 << 20, &e820, &k, None, "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("HdrS"), "{e}");
        std::fs::write(&k, bzimage(0x0201, b"x")).unwrap();
        assert!(load_linux(&m, 32 << 20, &e820, &k, None, "")
            .unwrap_err()
            .to_string()
            .contains("2.02"));
        std::fs::write(&k, [1u8; 16]).unwrap();
        assert!(load_linux(&m, 32 << 20, &e820, &k, None, "")
            .unwrap_err()
            .to_string()
            .contains("too small"));
        std::fs::write(&k, bzimage(0x020f, &vec![0u8; 40 << 20])).unwrap();
        assert!(load_linux(&m, 32 << 20, &e820, &k, None, "")
            .unwrap_err()
            .to_string()
            .contains("MiB"));
        let missing =
            load_linux(&m, 32 << 20, &e820, &dir.path().join("none"), None, "").unwrap_err();
        assert!(matches!(missing, VmmError::ReadFile { what: "kernel", .. }));
        std::fs::write(&k, bzimage(0x020f, b"x")).unwrap();
        let e = load_linux(
            &m,
            32 << 20,
            &e820,
            &k,
            Some(&dir.path().join("no-initrd")),
            "",
        )
        .unwrap_err();
        assert!(matches!(e, VmmError::ReadFile { what: "initrd", .. }));
    }
}
