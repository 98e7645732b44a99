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
    let path = CIRRUS_VGABIOS_SEARCH_PATH
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| VmmError::FirmwareNotFound {
            searched: CIRRUS_VGABIOS_SEARCH_PATH.join(", "),
        })?;
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
    BIOS_SEARCH_PATH
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| VmmError::FirmwareNotFound {
            searched: BIOS_SEARCH_PATH.join(", "),
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
