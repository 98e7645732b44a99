//! The VM library: one folder per VM under the XDG data directory, each with `vm.toml`.

use std::path::{Path, PathBuf};

use vmm::{ConfigError, VmConfig};

#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("no data directory: set $HOME or $XDG_DATA_HOME")]
    NoDataDir,
    #[error("no VM named '{name}' in the library ({dir}); `deskvm list` shows the VMs there")]
    NotFound { name: String, dir: PathBuf },
    #[error("'{0}' cannot be a VM name: use letters, digits, spaces, '.', '-' or '_', not starting with '.'")]
    BadName(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read the library folder {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The library folder: `$XDG_DATA_HOME/deskvm/vms`.
pub fn library_dir() -> Result<PathBuf, LibraryError> {
    dirs::data_dir()
        .map(|d| d.join("deskvm").join("vms"))
        .ok_or(LibraryError::NoDataDir)
}

/// Whether `name` can be used as a VM's folder name.
pub fn valid_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, ' ' | '.' | '-' | '_'))
}

/// The folder of the VM `name`.
pub fn vm_dir(library: &Path, name: &str) -> Result<PathBuf, LibraryError> {
    if !valid_vm_name(name) {
        return Err(LibraryError::BadName(name.to_string()));
    }
    Ok(library.join(name))
}

/// Loads the VM `name` from the library; its NVRAM lives in its folder.
pub fn load_vm(library: &Path, name: &str) -> Result<VmConfig, LibraryError> {
    let dir = vm_dir(library, name)?;
    let path = dir.join("vm.toml");
    if !path.is_file() {
        return Err(LibraryError::NotFound {
            name: name.to_string(),
            dir: library.to_path_buf(),
        });
    }
    let mut config = VmConfig::load(&path)?;
    if config.nvram.is_none() {
        config.nvram = Some(dir.join("nvram.toml"));
    }
    Ok(config)
}

/// A VM found in the library: its name and its config, or why it cannot be loaded.
pub type LibraryEntry = (String, Result<VmConfig, LibraryError>);

/// Every VM in the library, by name, with its config or the error that stops loading it.
pub fn list_vms(library: &Path) -> Result<Vec<LibraryEntry>, LibraryError> {
    let entries = match std::fs::read_dir(library) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LibraryError::Io {
                path: library.to_path_buf(),
                source,
            })
        }
    };
    let mut vms: Vec<_> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("vm.toml").is_file())
        .map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let config = load_vm(library, &name);
            (name, config)
        })
        .collect();
    vms.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_vm_name("Debian 12"));
        assert!(valid_vm_name("win-11_test.2"));
        for bad in ["", ".hidden", "a/b", "..", "x\0y", &"a".repeat(65)] {
            assert!(!valid_vm_name(bad), "{bad:?}");
        }
        assert!(matches!(
            vm_dir(Path::new("/l"), "../etc"),
            Err(LibraryError::BadName(_))
        ));
    }

    #[test]
    fn load_and_list() {
        let lib = tempfile::tempdir().unwrap();
        let dir = lib.path().join("alpha");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vm.toml"), "name = \"alpha\"\nmemory_mib = 64\n").unwrap();
        let bad = lib.path().join("broken");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("vm.toml"), "name = 3\n").unwrap();
        let c = load_vm(lib.path(), "alpha").unwrap();
        assert_eq!(c.memory_mib, 64);
        assert_eq!(c.nvram, Some(dir.join("nvram.toml")));
        let e = load_vm(lib.path(), "gamma").unwrap_err().to_string();
        assert!(e.contains("no VM named 'gamma'"), "{e}");
        let list = list_vms(lib.path()).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].0, "alpha");
        let broken = list[1].1.as_ref().unwrap_err().to_string();
        assert!(
            broken.contains("vm.toml") && broken.contains("line 1"),
            "{broken}"
        );
        assert!(list_vms(&lib.path().join("none")).unwrap().is_empty());
    }
}
