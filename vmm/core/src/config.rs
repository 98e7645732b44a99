//! The VM configuration (`vm.toml`): what the user chose, validated before anything starts.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layout::MIN_RAM_MIB;

/// Where a character device's output goes (serial port, debug console).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum CharOutput {
    /// Discarded.
    #[default]
    None,
    /// This process's standard output.
    Stdio,
    /// A file, created or truncated at start.
    File(PathBuf),
}

impl fmt::Display for CharOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CharOutput::None => f.write_str("none"),
            CharOutput::Stdio => f.write_str("stdio"),
            CharOutput::File(p) => write!(f, "{}", p.display()),
        }
    }
}

impl From<CharOutput> for String {
    fn from(c: CharOutput) -> String {
        c.to_string()
    }
}

impl TryFrom<String> for CharOutput {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "" => Err("expected \"none\", \"stdio\" or a file path".into()),
            "none" => Ok(CharOutput::None),
            "stdio" => Ok(CharOutput::Stdio),
            _ => Ok(CharOutput::File(PathBuf::from(s))),
        }
    }
}

impl std::str::FromStr for CharOutput {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        CharOutput::try_from(s.to_string())
    }
}

/// Firmware and boot-menu settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirmwareConfig {
    /// SeaBIOS `bios.bin`; found in the seabios package's folder when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bios: Option<PathBuf>,
    /// Offer SeaBIOS's "Press ESC for boot menu".
    #[serde(default)]
    pub boot_menu: bool,
    /// How long the boot-menu prompt waits, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_menu_timeout_ms: Option<u16>,
}

/// Direct Linux boot (instead of firmware): kernel, initrd and command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinuxBootConfig {
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
}

/// One virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub name: String,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default)]
    pub firmware: FirmwareConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linux_boot: Option<LinuxBootConfig>,
    #[serde(default)]
    pub serial: CharOutput,
    #[serde(default)]
    pub debugcon: CharOutput,
    /// CMOS NVRAM kept across runs; a VM in the library keeps it in its folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram: Option<PathBuf>,
}

fn default_memory_mib() -> u64 {
    1024
}

fn default_cpus() -> u32 {
    1
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            name: "vm".into(),
            memory_mib: default_memory_mib(),
            cpus: default_cpus(),
            firmware: FirmwareConfig::default(),
            linux_boot: None,
            serial: CharOutput::None,
            debugcon: CharOutput::None,
            nvram: None,
        }
    }
}

/// The most vCPUs a config may name; the host may allow fewer.
pub const MAX_CPUS: u32 = 255;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read VM configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid VM configuration: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("cannot write VM configuration {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl VmConfig {
    /// Parses TOML text; `origin` names the file in error messages.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let config: VmConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a `vm.toml`; relative paths in it are relative to its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::from_toml_str(&text, path)?;
        if let Some(dir) = path.parent() {
            config.resolve_relative_paths(dir);
        }
        Ok(config)
    }

    fn resolve_relative_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        if let Some(b) = self.firmware.bios.as_mut() {
            fix(b);
        }
        if let Some(lb) = self.linux_boot.as_mut() {
            fix(&mut lb.kernel);
            if let Some(i) = lb.initrd.as_mut() {
                fix(i);
            }
        }
        if let Some(n) = self.nvram.as_mut() {
            fix(n);
        }
        for out in [&mut self.serial, &mut self.debugcon] {
            if let CharOutput::File(p) = out {
                fix(p);
            }
        }
    }

    /// Checks what can be checked without the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(ConfigError::Invalid {
                field: "name",
                reason: "the name is empty".into(),
            });
        }
        if self.memory_mib < MIN_RAM_MIB {
            return Err(ConfigError::Invalid {
                field: "memory_mib",
                reason: format!(
                    "{} MiB is less than the minimum of {MIN_RAM_MIB} MiB",
                    self.memory_mib
                ),
            });
        }
        if self.memory_mib > (1 << 22) {
            return Err(ConfigError::Invalid {
                field: "memory_mib",
                reason: format!("{} MiB is more than 4 TiB", self.memory_mib),
            });
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError::Invalid {
                field: "cpus",
                reason: format!("{} is not between 1 and {MAX_CPUS}", self.cpus),
            });
        }
        if let Some(lb) = &self.linux_boot {
            if lb.cmdline.len() as u64 >= crate::layout::CMDLINE_MAX_SIZE {
                return Err(ConfigError::Invalid {
                    field: "linux_boot.cmdline",
                    reason: "the kernel command line is longer than 64 KiB".into(),
                });
            }
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        // Serialising a plain struct of strings and numbers cannot fail.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Writes the config atomically: a temporary file, fsync, rename, fsync of the folder.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let err = |source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        };
        write_atomically(path, self.to_toml().as_bytes()).map_err(err)
    }
}

/// Replaces `path` with `data` so that a crash leaves either the old or the new file.
pub fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_takes_defaults() {
        let c = VmConfig::from_toml_str("name = \"a\"\n", Path::new("vm.toml")).unwrap();
        assert_eq!(c.memory_mib, 1024);
        assert_eq!(c.cpus, 1);
        assert_eq!(c.serial, CharOutput::None);
    }

    #[test]
    fn round_trip() {
        let c = VmConfig {
            name: "deb".into(),
            memory_mib: 2048,
            cpus: 2,
            firmware: FirmwareConfig {
                bios: Some("/x/bios.bin".into()),
                boot_menu: true,
                boot_menu_timeout_ms: Some(2500),
            },
            linux_boot: Some(LinuxBootConfig {
                kernel: "/k".into(),
                initrd: Some("/i".into()),
                cmdline: "console=ttyS0".into(),
            }),
            serial: CharOutput::Stdio,
            debugcon: CharOutput::File("/tmp/d.txt".into()),
            nvram: Some("/n".into()),
        };
        let text = c.to_toml();
        assert_eq!(VmConfig::from_toml_str(&text, Path::new("x")).unwrap(), c);
    }

    #[test]
    fn malformed_config_names_file_line_and_field() {
        let text = "name = \"a\"\nmemory_mib = \"lots\"\n";
        let e = VmConfig::from_toml_str(text, Path::new("/vms/a/vm.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/vms/a/vm.toml: "), "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("memory_mib"), "{e}");

        let e = VmConfig::from_toml_str("name = \"a\"\nmemroy_mib = 4\n", Path::new("f.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field `memroy_mib`") && e.contains("line 2"),
            "{e}"
        );

        let e = VmConfig::from_toml_str("name = \"a\"\ncpus = 0\n", Path::new("f")).unwrap_err();
        assert!(
            matches!(e, ConfigError::Invalid { field: "cpus", .. }),
            "{e}"
        );
        let e =
            VmConfig::from_toml_str("name = \"a\"\nmemory_mib = 4\n", Path::new("f")).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    field: "memory_mib",
                    ..
                }
            ),
            "{e}"
        );
        let e = VmConfig::from_toml_str("memory_mib = 64\n", Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `name`"), "{e}");
        let e = VmConfig::from_toml_str("name = \"a\"\nserial = \"\"\n", Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("serial") || e.contains("line 2"), "{e}");
    }

    #[test]
    fn load_resolves_relative_paths_and_reports_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(
            &path,
            "name = \"a\"\nnvram = \"nvram.bin\"\nserial = \"serial.log\"\n",
        )
        .unwrap();
        let c = VmConfig::load(&path).unwrap();
        assert_eq!(c.nvram, Some(dir.path().join("nvram.bin")));
        assert_eq!(c.serial, CharOutput::File(dir.path().join("serial.log")));
        let e = VmConfig::load(&dir.path().join("nope.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.toml") && e.contains("cannot read"), "{e}");
    }

    #[test]
    fn atomic_save_replaces_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(&path, "old").unwrap();
        let c = VmConfig::default();
        c.save(&path).unwrap();
        assert_eq!(VmConfig::load(&path).unwrap(), c);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
        let e = c.save(&dir.path().join("missing-dir/vm.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Write { .. }));
    }
}
