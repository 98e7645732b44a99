//! Library operations behind the library page's buttons: create a VM folder atomically,
//! clone a VM, delete a VM with or without its disk images. Works on the folder layout of
//! `crate::library` (one folder per VM with `vm.toml`).
//!
//! A new VM's folder is filled under a hidden temporary name and renamed into place, so a
//! crash leaves no half-made VM in the library. New disks are qcow2 images.

use std::path::{Path, PathBuf};

use vmm::config::DriveKind;
use vmm::VmConfig;

use super::wizard_model::{new_uuid, unique_name};
use crate::library::{self, LibraryError};

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Library(#[from] LibraryError),
    #[error(transparent)]
    Config(#[from] vmm::ConfigError),
    #[error("a VM named '{0}' already exists")]
    Exists(String),
    #[error("cannot create the disk image {path}: {reason}")]
    Disk { path: PathBuf, reason: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> OpError + 'a {
    move |source| OpError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates a qcow2 disk image of `size_bytes` (the guest's size; the file starts small).
pub fn create_disk_image(path: &Path, size_bytes: u64) -> Result<(), OpError> {
    vmm::storage::create(path, vmm::storage::ImageFormat::Qcow2, size_bytes, None).map_err(|e| {
        OpError::Disk {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })
}

/// Creates the VM folder for `config` (named `config.name`) with a new disk of
/// `new_disk_bytes` at the config's path when given; all or nothing.
pub fn create_vm(
    library_dir: &Path,
    config: &VmConfig,
    new_disk: Option<(&Path, u64)>,
) -> Result<PathBuf, OpError> {
    let dir = library::vm_dir(library_dir, &config.name)?;
    config.validate()?;
    if dir.exists() {
        return Err(OpError::Exists(config.name.clone()));
    }
    std::fs::create_dir_all(library_dir).map_err(io("cannot create", library_dir))?;
    let tmp = library_dir.join(format!(".{}.creating-{}", config.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        std::fs::create_dir(&tmp).map_err(io("cannot create", &tmp))?;
        if let Some((disk, size)) = new_disk {
            let name = disk.file_name().unwrap_or_default();
            create_disk_image(&tmp.join(name), size)?;
        }
        config.save(&tmp.join("vm.toml"))?;
        std::fs::rename(&tmp, &dir).map_err(io("cannot move into place", &dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| dir)
}

/// Copies the VM `name` to a new unused name ("NAME copy"); disk images inside its folder
/// are copied, images elsewhere are shared. The copy gets a new UUID and derived MACs.
pub fn clone_vm(library_dir: &Path, name: &str) -> Result<String, OpError> {
    let src_dir = library::vm_dir(library_dir, name)?;
    let mut config = library::load_vm(library_dir, name)?;
    let taken: Vec<String> = library::list_vms(library_dir)?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let new_name = unique_name(&format!("{name} copy"), &taken);
    let dst_dir = library::vm_dir(library_dir, &new_name)?;
    let tmp = library_dir.join(format!(".{new_name}.cloning-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        std::fs::create_dir(&tmp).map_err(io("cannot create", &tmp))?;
        for drive in &mut config.drives {
            let Some(path) = drive.path.as_mut() else {
                continue;
            };
            if drive.kind == DriveKind::Disk && path.starts_with(&src_dir) {
                let rel = path.strip_prefix(&src_dir).unwrap_or(path).to_path_buf();
                std::fs::copy(&*path, tmp.join(&rel)).map_err(io("cannot copy", path))?;
                *path = dst_dir.join(rel);
            }
        }
        config.name = new_name.clone();
        config.uuid = new_uuid();
        config.nvram = Some(dst_dir.join("nvram.toml"));
        for nic in &mut config.nics {
            nic.mac = None;
        }
        config.save(&tmp.join("vm.toml"))?;
        std::fs::rename(&tmp, &dst_dir).map_err(io("cannot move into place", &dst_dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|()| new_name)
}

/// Removes the VM `name` from the library. With `delete_disks`, its disk images go too
/// (CD/DVD images never); without, they stay where they are (the folder stays if it
/// holds them). Returns the files kept.
pub fn delete_vm(
    library_dir: &Path,
    name: &str,
    delete_disks: bool,
) -> Result<Vec<PathBuf>, OpError> {
    let dir = library::vm_dir(library_dir, name)?;
    let config = VmConfig::load(&dir.join("vm.toml"))?;
    let disks: Vec<PathBuf> = config
        .drives
        .iter()
        .filter(|d| d.kind == DriveKind::Disk)
        .filter_map(|d| d.path.clone())
        .collect();
    let mut kept = Vec::new();
    if delete_disks {
        for disk in &disks {
            match std::fs::remove_file(disk) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("cannot delete", disk)(e)),
            }
        }
    } else {
        kept = disks.into_iter().filter(|d| d.exists()).collect();
    }
    let vm_toml = dir.join("vm.toml");
    std::fs::remove_file(&vm_toml).map_err(io("cannot delete", &vm_toml))?;
    let nvram = config.nvram.unwrap_or_else(|| dir.join("nvram.toml"));
    if nvram.starts_with(&dir) {
        let _ = std::fs::remove_file(nvram);
    }
    if !kept.iter().any(|k| k.starts_with(&dir)) {
        std::fs::remove_dir_all(&dir).map_err(io("cannot delete", &dir))?;
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::config::DriveConfig;

    fn make(lib: &Path, name: &str) -> VmConfig {
        let dir = lib.join(name);
        let config = VmConfig {
            name: name.into(),
            uuid: "u".into(),
            nvram: Some(dir.join("nvram.toml")),
            drives: vec![
                DriveConfig {
                    kind: DriveKind::Disk,
                    path: Some(dir.join("disk.qcow2")),
                    read_only: false,
                },
                DriveConfig {
                    kind: DriveKind::Cdrom,
                    path: Some(lib.join("os.iso")),
                    read_only: true,
                },
            ],
            ..VmConfig::default()
        };
        create_vm(lib, &config, Some((&dir.join("disk.qcow2"), 1 << 20))).unwrap();
        std::fs::write(lib.join("os.iso"), b"iso").unwrap();
        config
    }

    #[test]
    fn create_is_all_or_nothing() {
        let lib = tempfile::tempdir().unwrap();
        let c = make(lib.path(), "a");
        let dir = lib.path().join("a");
        assert_eq!(VmConfig::load(&dir.join("vm.toml")).unwrap(), c);
        let disk = vmm::storage::info(&dir.join("disk.qcow2")).unwrap();
        assert_eq!(disk.format, vmm::storage::ImageFormat::Qcow2);
        assert_eq!(disk.virtual_size, 1 << 20);
        assert!(matches!(
            create_vm(lib.path(), &c, None),
            Err(OpError::Exists(_))
        ));
        let mut bad = c.clone();
        bad.name = "b".into();
        bad.cpus = 0;
        assert!(create_vm(lib.path(), &bad, None).is_err());
        assert!(!lib.path().join("b").exists());
        let names: Vec<_> = std::fs::read_dir(lib.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
        bad.name = "../escape".into();
        assert!(matches!(
            create_vm(lib.path(), &bad, None),
            Err(OpError::Library(_))
        ));
    }

    #[test]
    fn clone_copies_inner_disks_and_shares_isos() {
        let lib = tempfile::tempdir().unwrap();
        make(lib.path(), "a");
        let name = clone_vm(lib.path(), "a").unwrap();
        assert_eq!(name, "a copy");
        let c = library::load_vm(lib.path(), &name).unwrap();
        let dir = lib.path().join("a copy");
        assert_eq!(c.drives[0].path, Some(dir.join("disk.qcow2")));
        assert!(dir.join("disk.qcow2").is_file());
        assert_eq!(c.drives[1].path, Some(lib.path().join("os.iso")));
        assert_ne!(c.uuid, "u");
        assert_eq!(clone_vm(lib.path(), "a").unwrap(), "a copy 2");
        assert!(clone_vm(lib.path(), "missing").is_err());
    }

    #[test]
    fn delete_with_and_without_disks() {
        let lib = tempfile::tempdir().unwrap();
        make(lib.path(), "keep");
        let kept = delete_vm(lib.path(), "keep", false).unwrap();
        let dir = lib.path().join("keep");
        assert_eq!(kept, vec![dir.join("disk.qcow2")]);
        assert!(dir.join("disk.qcow2").is_file());
        assert!(!dir.join("vm.toml").exists());
        assert!(library::list_vms(lib.path()).unwrap().is_empty());

        make(lib.path(), "gone");
        assert!(delete_vm(lib.path(), "gone", true).unwrap().is_empty());
        assert!(!lib.path().join("gone").exists());
        assert!(
            lib.path().join("os.iso").is_file(),
            "ISOs are never deleted"
        );
        assert!(delete_vm(lib.path(), "gone", true).is_err());
        assert!(delete_vm(lib.path(), "../x", true).is_err());
    }
}
