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

/// The guest OS, as the user or the wizard named it (drives defaults, shown in the library).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsInfo {
    /// "linux", "windows", "bsd" or "other".
    #[serde(default)]
    pub family: String,
    /// Free text, e.g. "Debian 12".
    #[serde(default)]
    pub version: String,
}

/// A VNC server for the VM's screen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VncConfig {
    /// Address to listen on; loopback by default.
    #[serde(default = "default_vnc_address")]
    pub address: String,
    /// VNC display number: the server listens on TCP port 5900 + display.
    pub display: u16,
    /// VNC authentication password (at most 8 characters count); none when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

fn default_vnc_address() -> String {
    "127.0.0.1".into()
}

impl VncConfig {
    pub fn port(&self) -> u16 {
        5900u16.saturating_add(self.display)
    }
}

/// The display card (a Cirrus CL-GD5446).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisplayConfig {
    /// Video memory in MiB: 4 (the default, like QEMU) or 8 or 16.
    #[serde(default = "default_vram_mib")]
    pub vram_mib: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc: Option<VncConfig>,
}

fn default_vram_mib() -> u32 {
    4
}

impl Default for DisplayConfig {
    fn default() -> Self {
        Self {
            vram_mib: default_vram_mib(),
            vnc: None,
        }
    }
}

/// What a drive holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriveKind {
    /// An ATA hard disk (raw or qcow2 image).
    #[default]
    Disk,
    /// An ATAPI CD/DVD-ROM drive (ISO image, or empty).
    Cdrom,
}

/// One IDE drive: a disk or a CD-ROM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    #[serde(default)]
    pub kind: DriveKind,
    /// The image (raw, qcow2 or ISO); a CD-ROM may be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Open the image read-only (always so for a CD-ROM).
    #[serde(default)]
    pub read_only: bool,
}

/// The order the firmware tries boot devices in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootOrder {
    /// Hard disk first, then CD-ROM.
    #[default]
    Disk,
    /// CD-ROM first, then hard disk.
    Cd,
    /// CD-ROM first for the next start only (an install), then disk first.
    CdOnce,
}

/// The network card model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NicModel {
    /// Intel 82540EM.
    #[default]
    E1000,
    /// Realtek RTL8139C+.
    Rtl8139,
    /// virtio-net (paravirtual), transitional: legacy and modern interfaces (1af4:1000).
    VirtioNet,
    /// virtio-net with the modern (virtio 1.0) interface only (1af4:1041).
    VirtioNetModern,
}

/// A host-to-guest port forward of the NAT backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// "tcp" or "udp".
    #[serde(default = "default_forward_protocol")]
    pub protocol: String,
    #[serde(default = "default_forward_address")]
    pub host_address: String,
    pub host_port: u16,
    pub guest_port: u16,
}

fn default_forward_protocol() -> String {
    "tcp".into()
}

fn default_forward_address() -> String {
    "127.0.0.1".into()
}

/// Where a network card's frames go.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type", deny_unknown_fields)]
pub enum NetBackendConfig {
    /// User-mode NAT (no privileges): 10.0.2.0/24, gateway 10.0.2.2, DNS 10.0.2.3.
    #[default]
    Nat,
    /// An existing TAP device.
    Tap { name: String },
}

/// One network card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    #[serde(default)]
    pub model: NicModel,
    /// "52:54:00:xx:xx:xx"; derived from the VM's name when left out (stable across runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Cable connected at start.
    #[serde(default = "default_true")]
    pub link_up: bool,
    #[serde(default)]
    pub backend: NetBackendConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<PortForward>,
    /// NAT only: the boot file name given in DHCP answers (network boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_file: Option<String>,
}

fn default_true() -> bool {
    true
}

/// Input devices besides the always-present PS/2 keyboard and mouse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// A USB tablet (absolute pointer) on the UHCI controller.
    #[serde(default)]
    pub usb_tablet: bool,
    /// A USB keyboard; keys go to it instead of PS/2.
    #[serde(default)]
    pub usb_keyboard: bool,
}

/// How the vCPUs are grouped as the guest sees them (CPUID leaves 1, 4, 0xb/0x1f and
/// 0x80000008, and the APIC IDs): `sockets × cores × threads` must equal the vCPU count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTopology {
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
}

/// Bits of the APIC ID a level with `n` members takes (0 for one member).
fn id_bits(n: u32) -> u32 {
    32 - n.max(1).saturating_sub(1).leading_zeros()
}

impl CpuTopology {
    /// One socket with every vCPU a core of its own (the default).
    pub fn flat(cpus: u32) -> Self {
        Self {
            sockets: 1,
            cores: cpus.max(1),
            threads: 1,
        }
    }

    pub fn cpus(&self) -> u64 {
        u64::from(self.sockets)
            .saturating_mul(u64::from(self.cores))
            .saturating_mul(u64::from(self.threads))
    }

    /// APIC ID bits of the thread and core levels.
    pub fn thread_bits(&self) -> u32 {
        id_bits(self.threads)
    }
    pub fn core_bits(&self) -> u32 {
        id_bits(self.cores)
    }

    /// The APIC ID of vCPU `index` (sockets, cores and threads packed as real CPUs do,
    /// so IDs are sparse when a level is not a power of two).
    pub fn apic_id(&self, index: u32) -> u32 {
        let threads = self.threads.max(1);
        let cores = self.cores.max(1);
        let thread = index % threads;
        let core = (index / threads) % cores;
        let socket = index / (threads * cores);
        (socket << (self.core_bits() + self.thread_bits())) | (core << self.thread_bits()) | thread
    }
}

/// One virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Stable identity (SMBIOS-style UUID text); set when the VM is created.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uuid: String,
    #[serde(default)]
    pub os: OsInfo,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// None: one socket, `cpus` cores, one thread each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,
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
    #[serde(default)]
    pub display: DisplayConfig,
    /// IDE drives in order: primary master, primary slave, secondary master, secondary slave.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<DriveConfig>,
    #[serde(default)]
    pub boot_order: BootOrder,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicConfig>,
    #[serde(default)]
    pub input: InputConfig,
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
            topology: None,
            firmware: FirmwareConfig::default(),
            linux_boot: None,
            serial: CharOutput::None,
            debugcon: CharOutput::None,
            nvram: None,
            description: String::new(),
            uuid: String::new(),
            os: OsInfo::default(),
            display: DisplayConfig::default(),
            drives: Vec::new(),
            boot_order: BootOrder::default(),
            nics: Vec::new(),
            input: InputConfig::default(),
        }
    }
}

/// Most IDE drives: two channels, master and slave.
pub const MAX_DRIVES: usize = 4;
/// Most network cards (PCI slots 3..=10).
pub const MAX_NICS: usize = 8;

/// The most vCPUs a config may name; the host may allow fewer.
pub const MAX_CPUS: u32 = 255;
/// xAPIC IDs go up to 254 (255 is the broadcast ID).
pub const MAX_APIC_ID: u32 = 255;

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
    /// The topology the guest sees (the configured one or the flat default).
    pub fn cpu_topology(&self) -> CpuTopology {
        self.topology.unwrap_or(CpuTopology::flat(self.cpus))
    }

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
        for drive in &mut self.drives {
            if let Some(p) = drive.path.as_mut() {
                fix(p);
            }
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
        if let Some(t) = &self.topology {
            if t.sockets == 0 || t.cores == 0 || t.threads == 0 {
                return Err(ConfigError::Invalid {
                    field: "topology",
                    reason: "sockets, cores and threads must each be at least 1".into(),
                });
            }
            if t.cpus() != u64::from(self.cpus) {
                return Err(ConfigError::Invalid {
                    field: "topology",
                    reason: format!(
                        "{} sockets × {} cores × {} threads make {} vCPUs, but the VM has {}",
                        t.sockets,
                        t.cores,
                        t.threads,
                        t.cpus(),
                        self.cpus
                    ),
                });
            }
            let highest = t.apic_id(self.cpus - 1);
            if highest >= MAX_APIC_ID {
                return Err(ConfigError::Invalid {
                    field: "topology",
                    reason: format!(
                        "this grouping needs APIC ID {highest}; the PC's interrupt controllers \
                         address at most {}: use powers of two for cores and threads",
                        MAX_APIC_ID - 1
                    ),
                });
            }
        }
        if let Some(lb) = &self.linux_boot {
            if lb.cmdline.len() as u64 >= crate::layout::CMDLINE_MAX_SIZE {
                return Err(ConfigError::Invalid {
                    field: "linux_boot.cmdline",
                    reason: "the kernel command line is longer than 64 KiB".into(),
                });
            }
        }
        if ![4, 8, 16].contains(&self.display.vram_mib) {
            return Err(ConfigError::Invalid {
                field: "display.vram_mib",
                reason: format!("{} MiB is not 4, 8 or 16", self.display.vram_mib),
            });
        }
        if let Some(vnc) = &self.display.vnc {
            if vnc.display > 100 {
                return Err(ConfigError::Invalid {
                    field: "display.vnc.display",
                    reason: format!("display {} is above 100 (port 6000)", vnc.display),
                });
            }
            if vnc.address.parse::<std::net::IpAddr>().is_err() {
                return Err(ConfigError::Invalid {
                    field: "display.vnc.address",
                    reason: format!("\"{}\" is not an IP address", vnc.address),
                });
            }
        }
        if self.drives.len() > MAX_DRIVES {
            return Err(ConfigError::Invalid {
                field: "drives",
                reason: format!(
                    "{} drives, but IDE has room for {MAX_DRIVES}",
                    self.drives.len()
                ),
            });
        }
        for drive in &self.drives {
            if drive.kind == DriveKind::Disk && drive.path.is_none() {
                return Err(ConfigError::Invalid {
                    field: "drives.path",
                    reason: "a disk needs an image file".into(),
                });
            }
        }
        if self.nics.len() > MAX_NICS {
            return Err(ConfigError::Invalid {
                field: "nics",
                reason: format!("{} cards, at most {MAX_NICS}", self.nics.len()),
            });
        }
        for nic in &self.nics {
            if let Some(mac) = &nic.mac {
                if parse_mac(mac).is_none() {
                    return Err(ConfigError::Invalid {
                        field: "nics.mac",
                        reason: format!(
                            "\"{mac}\" is not a unicast MAC address like 52:54:00:12:34:56"
                        ),
                    });
                }
            }
            for fwd in &nic.forwards {
                if fwd.protocol != "tcp" && fwd.protocol != "udp" {
                    return Err(ConfigError::Invalid {
                        field: "nics.forwards.protocol",
                        reason: format!("\"{}\" is not tcp or udp", fwd.protocol),
                    });
                }
                if fwd.host_address.parse::<std::net::IpAddr>().is_err() {
                    return Err(ConfigError::Invalid {
                        field: "nics.forwards.host_address",
                        reason: format!("\"{}\" is not an IP address", fwd.host_address),
                    });
                }
            }
        }
        Ok(())
    }

    /// The MAC of card `index`: the configured one, or a locally administered address
    /// derived from the VM's UUID (or name) and the index, stable across runs.
    pub fn nic_mac(&self, index: usize) -> [u8; 6] {
        if let Some(mac) = self.nics.get(index).and_then(|n| n.mac.as_deref()) {
            if let Some(m) = parse_mac(mac) {
                return m;
            }
        }
        let seed = if self.uuid.is_empty() {
            &self.name
        } else {
            &self.uuid
        };
        // FNV-1a: a stable hash (std's hasher is randomly keyed per process).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes().chain(std::iter::once(index as u8)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_le_bytes();
        [0x52, 0x54, 0x00, b[0], b[1], b[2]]
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

/// Parses "aa:bb:cc:dd:ee:ff" (or with '-'); refuses multicast addresses.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (mac[0] & 1 == 0).then_some(mac)
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
            topology: Some(CpuTopology {
                sockets: 1,
                cores: 1,
                threads: 2,
            }),
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
            description: "test VM".into(),
            uuid: "6f1d2c5e-0000-4000-8000-000000000001".into(),
            os: OsInfo {
                family: "linux".into(),
                version: "Debian 12".into(),
            },
            display: DisplayConfig {
                vram_mib: 8,
                vnc: Some(VncConfig {
                    address: "0.0.0.0".into(),
                    display: 3,
                    password: Some("secret".into()),
                }),
            },
            drives: vec![
                DriveConfig {
                    kind: DriveKind::Disk,
                    path: Some("/d.qcow2".into()),
                    read_only: false,
                },
                DriveConfig {
                    kind: DriveKind::Cdrom,
                    path: None,
                    read_only: true,
                },
            ],
            boot_order: BootOrder::CdOnce,
            nics: vec![NicConfig {
                model: NicModel::VirtioNet,
                mac: Some("52:54:00:12:34:56".into()),
                link_up: false,
                backend: NetBackendConfig::Nat,
                forwards: vec![PortForward {
                    protocol: "tcp".into(),
                    host_address: "127.0.0.1".into(),
                    host_port: 2222,
                    guest_port: 22,
                }],
                boot_file: Some("http://10.0.2.2/boot.ipxe".into()),
            }],
            input: InputConfig {
                usb_tablet: true,
                usb_keyboard: false,
            },
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
    fn bad_hardware_settings_name_the_field() {
        let cases = [
            ("[display]\nvram_mib = 5\n", "display.vram_mib"),
            ("[display.vnc]\ndisplay = 200\n", "display.vnc.display"),
            (
                "[display.vnc]\ndisplay = 1\naddress = \"localhost:1\"\n",
                "display.vnc.address",
            ),
            ("[[drives]]\nkind = \"disk\"\n", "drives.path"),
            ("[[nics]]\nmac = \"01:00:00:00:00:01\"\n", "nics.mac"),
            ("[[nics]]\nmac = \"52:54:00:1:2:3\"\n", "nics.mac"),
            (
                "[[nics]]\n[[nics.forwards]]\nprotocol = \"sctp\"\nhost_port = 1\nguest_port = 2\n",
                "nics.forwards.protocol",
            ),
        ];
        for (body, field) in cases {
            let text = format!("name = \"a\"\n{body}");
            match VmConfig::from_toml_str(&text, Path::new("f")) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        let e = VmConfig::from_toml_str(
            "name = \"a\"\n[[nics]]\nmodel = \"ne2000\"\n",
            Path::new("f"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ne2000") && e.contains("line"), "{e}");
        let drives = "[[drives]]\nkind = \"cdrom\"\n".repeat(5);
        let e = VmConfig::from_toml_str(&format!("name = \"a\"\n{drives}"), Path::new("f"));
        assert!(matches!(
            e,
            Err(ConfigError::Invalid {
                field: "drives",
                ..
            })
        ));
    }

    #[test]
    fn nic_mac_is_stable_unique_and_locally_administered() {
        let mut c = VmConfig {
            nics: vec![
                NicConfig {
                    model: NicModel::E1000,
                    mac: None,
                    link_up: true,
                    backend: NetBackendConfig::Nat,
                    forwards: vec![],
                    boot_file: None,
                };
                2
            ],
            ..VmConfig::default()
        };
        let a0 = c.nic_mac(0);
        assert_eq!(a0, c.nic_mac(0));
        assert_ne!(a0, c.nic_mac(1));
        assert_eq!(a0[0] & 1, 0, "unicast");
        assert_eq!(&a0[..3], &[0x52, 0x54, 0x00]);
        let mut other = c.clone();
        other.name = "other".into();
        assert_ne!(other.nic_mac(0), a0);
        c.nics[0].mac = Some("52:54:00:aa:bb:cc".into());
        assert_eq!(c.nic_mac(0), [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
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

    #[test]
    fn cpu_topology_must_match_the_vcpu_count_and_fit_apic_ids() {
        let mut c = VmConfig {
            cpus: 4,
            ..VmConfig::default()
        };
        assert_eq!(c.cpu_topology(), CpuTopology::flat(4));
        c.topology = Some(CpuTopology {
            sockets: 2,
            cores: 2,
            threads: 1,
        });
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("[topology]"), "{text}");
        assert_eq!(toml::from_str::<VmConfig>(&text).unwrap(), c);
        c.cpus = 3;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("topology") && e.contains("make 4 vCPUs, but the VM has 3"),
            "{e}"
        );
        c.topology = Some(CpuTopology {
            sockets: 0,
            cores: 3,
            threads: 1,
        });
        assert!(c.validate().unwrap_err().to_string().contains("at least 1"));
        // 85 sockets of 3 cores: core IDs take 2 bits, so vCPU 254 (socket 84, core 2)
        // needs APIC ID 338.
        c.cpus = 255;
        c.topology = Some(CpuTopology {
            sockets: 85,
            cores: 3,
            threads: 1,
        });
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("APIC ID 338"), "{e}");
        // Overflowing products are refused, not wrapped.
        c.topology = Some(CpuTopology {
            sockets: u32::MAX,
            cores: u32::MAX,
            threads: 2,
        });
        assert!(c.validate().is_err());
    }
}
