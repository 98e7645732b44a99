//! Finding and loading the firmware (SeaBIOS from Debian's `seabios` package).

use std::path::{Path, PathBuf};

use crate::error::{Result, VmmError};

/// Where Debian (and other distributions) install SeaBIOS's `bios.bin`.
pub const BIOS_SEARCH_PATH: &[&str] = &[
    "/usr/share/seabios/bios.bin",
    "/usr/share/qemu/bios.bin",
    "/usr/share/seabios/bios-256k.bin",
];

/// Where Debian installs SeaBIOS's VGA BIOS for the Cirrus card.
pub const CIRRUS_VGABIOS_SEARCH_PATH: &[&str] = &[
    "/usr/share/seabios/vgabios-cirrus.bin",
    "/usr/share/qemu/vgabios-cirrus.bin",
];

/// The Cirrus VGA BIOS (the card's option ROM), from the seabios package.
pub fn load_cirrus_vgabios() -> Result<Vec<u8>> {
    let path = first_existing(CIRRUS_VGABIOS_SEARCH_PATH)?;
    std::fs::read(&path).map_err(|source| VmmError::ReadFile {
        what: "VGA BIOS",
        path,
        source,
    })
}

/// A network card's iPXE option ROM from Debian's ipxe-qemu package (for network boot),
/// if installed.
pub fn load_nic_rom(model: &str) -> Option<Vec<u8>> {
    ["/usr/lib/ipxe/qemu/pxe-", "/usr/share/ipxe/qemu/pxe-"]
        .iter()
        .map(|dir| PathBuf::from(format!("{dir}{model}.rom")))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::read(p).ok())
}

/// Rewrites the PCI vendor and device IDs in an option ROM's PCI data structure (so that the
/// firmware runs it for a card with other IDs, as QEMU does for its virtio ROMs) and keeps
/// the image's byte sum unchanged through the checksum byte at offset 6 (iPXE's). Returns
/// false, leaving the image as it was, when it has no valid PCI data structure.
pub fn patch_rom_ids(rom: &mut [u8], vendor: u16, device: u16) -> bool {
    if rom.len() < 0x1a || rom[0] != 0x55 || rom[1] != 0xaa {
        return false;
    }
    let pcir = usize::from(u16::from_le_bytes([rom[0x18], rom[0x19]]));
    if pcir + 8 > rom.len() || &rom[pcir..pcir + 4] != b"PCIR" {
        return false;
    }
    let sum_of = |r: &[u8]| r.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    let before = sum_of(&rom[pcir + 4..pcir + 8]);
    rom[pcir + 4..pcir + 6].copy_from_slice(&vendor.to_le_bytes());
    rom[pcir + 6..pcir + 8].copy_from_slice(&device.to_le_bytes());
    let after = sum_of(&rom[pcir + 4..pcir + 8]);
    rom[6] = rom[6].wrapping_sub(after.wrapping_sub(before));
    true
}

/// The firmware file to use: the configured one, or the first found in the search path.
pub fn locate_bios(configured: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = configured {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(VmmError::FirmwareMissing {
                path: path.to_path_buf(),
            })
        };
    }
    first_existing(BIOS_SEARCH_PATH)
}

/// The first file of a search path that exists, or an error naming them all.
fn first_existing(search_path: &[&str]) -> Result<PathBuf> {
    search_path
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| VmmError::FirmwareNotFound {
            searched: search_path.join(", "),
        })
}

/// Reads a firmware image and checks it can be mapped below 4 GiB.
pub fn load_bios(path: &Path) -> Result<Vec<u8>> {
    let image = std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            VmmError::FirmwareMissing {
                path: path.to_path_buf(),
            }
        } else {
            VmmError::ReadFile {
                what: "firmware",
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let invalid = |reason: &str| VmmError::FirmwareInvalid {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if image.len() < 64 << 10 || image.len() > 16 << 20 {
        return Err(invalid("a BIOS image is between 64 KiB and 16 MiB"));
    }
    if image.len() % 4096 != 0 {
        return Err(invalid("the image size is not a multiple of 4 KiB"));
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rom_ids_are_patched_and_the_sum_kept() {
        let mut rom = vec![0u8; 512];
        rom[0] = 0x55;
        rom[1] = 0xaa;
        rom[2] = 1;
        rom[0x18] = 0x40;
        rom[0x40..0x44].copy_from_slice(b"PCIR");
        rom[0x44..0x48].copy_from_slice(&[0xf4, 0x1a, 0x41, 0x10]);
        let sum = |r: &[u8]| r.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        let before = sum(&rom);
        assert!(patch_rom_ids(&mut rom, 0x1af4, 0x1000));
        assert_eq!(&rom[0x44..0x48], &[0xf4, 0x1a, 0x00, 0x10]);
        assert_eq!(sum(&rom), before);
        let mut junk = vec![0u8; 64];
        assert!(!patch_rom_ids(&mut junk, 1, 2));
        let mut bad_pointer = rom.clone();
        bad_pointer[0x18] = 0xff;
        bad_pointer[0x19] = 0xff;
        assert!(!patch_rom_ids(&mut bad_pointer, 1, 2));
    }

    #[test]
    fn missing_configured_firmware_names_the_package() {
        let e = locate_bios(Some(Path::new("/nonexistent/bios.bin")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/bios.bin") && e.contains("seabios"),
            "{e}"
        );
    }

    #[test]
    fn bad_images_are_refused_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.bin");
        std::fs::write(&small, [0u8; 1000]).unwrap();
        let e = load_bios(&small).unwrap_err().to_string();
        assert!(e.contains("between 64 KiB and 16 MiB"), "{e}");
        let odd = dir.path().join("odd.bin");
        std::fs::write(&odd, vec![0u8; (128 << 10) + 1]).unwrap();
        assert!(load_bios(&odd)
            .unwrap_err()
            .to_string()
            .contains("multiple of 4 KiB"));
        assert!(matches!(
            load_bios(&dir.path().join("none.bin")),
            Err(VmmError::FirmwareMissing { .. })
        ));
    }
}
