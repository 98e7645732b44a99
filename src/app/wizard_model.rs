//! The create-VM wizard's model: the user's choices, the per-OS defaults table, every
//! validation rule with a message the user can act on, and the `VmConfig` the choices make.
//! Pure: no GTK, so every rule is unit-tested.
//!
//! Rules: an ISO must exist and carry the ISO 9660 "CD001" signature at 0x8001; an
//! existing image must exist; the name must be non-empty, unique in the library, a valid
//! folder name (no '/', not starting with '.', at most 64 bytes); 1..=255 vCPUs; memory at
//! least 16 MiB and not above the host's total; a new disk 1..=65536 GiB; something to boot
//! from. Warnings (allowed): memory above what the host has free, more vCPUs than host CPUs.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use vmm::config::{BootOrder, DriveConfig, DriveKind, InputConfig, NicConfig, NicModel, OsInfo};
use vmm::VmConfig;

/// Where the guest OS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Install from an ISO image (attached as a CD-ROM, booted once).
    Iso(PathBuf),
    /// Boot an existing disk image.
    ExistingImage(PathBuf),
    /// An empty machine (network boot, or an image added later).
    Empty,
}

/// The guest OS family, which picks the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OsFamily {
    Linux,
    Windows,
    Bsd,
    Other,
}

impl OsFamily {
    pub const ALL: [OsFamily; 4] = [
        OsFamily::Linux,
        OsFamily::Windows,
        OsFamily::Bsd,
        OsFamily::Other,
    ];

    /// The value stored in `vm.toml`.
    pub fn id(self) -> &'static str {
        match self {
            OsFamily::Linux => "linux",
            OsFamily::Windows => "windows",
            OsFamily::Bsd => "bsd",
            OsFamily::Other => "other",
        }
    }

    /// The versions offered in the wizard (free text is also allowed).
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            OsFamily::Linux => &[
                "Debian 12",
                "Ubuntu 24.04",
                "Fedora 40",
                "Alpine 3.20",
                "Arch Linux",
                "Other Linux",
            ],
            OsFamily::Windows => &["Windows XP", "Windows 7", "Windows 10", "Windows 11"],
            OsFamily::Bsd => &["FreeBSD 14", "OpenBSD 7", "NetBSD 10"],
            OsFamily::Other => &["MS-DOS", "FreeDOS", "Other"],
        }
    }
}

/// What a new VM of an OS gets unless the user changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OsDefaults {
    pub memory_mib: u64,
    pub cpus: u32,
    pub disk_gib: u64,
    pub nic_model: NicModel,
    pub usb_tablet: bool,
}

/// The defaults table.
pub fn defaults_for(family: OsFamily, version: &str) -> OsDefaults {
    let base = OsDefaults {
        memory_mib: 2048,
        cpus: 2,
        disk_gib: 20,
        nic_model: NicModel::VirtioNet,
        usb_tablet: true,
    };
    match (family, version) {
        (OsFamily::Linux, "Alpine 3.20") => OsDefaults {
            memory_mib: 512,
            cpus: 1,
            disk_gib: 4,
            ..base
        },
        (OsFamily::Linux, _) => base,
        (OsFamily::Windows, "Windows XP") => OsDefaults {
            memory_mib: 512,
            cpus: 1,
            disk_gib: 10,
            nic_model: NicModel::Rtl8139,
            usb_tablet: true,
        },
        (OsFamily::Windows, "Windows 7") => OsDefaults {
            memory_mib: 2048,
            disk_gib: 32,
            nic_model: NicModel::E1000,
            ..base
        },
        (OsFamily::Windows, _) => OsDefaults {
            memory_mib: 4096,
            disk_gib: 64,
            nic_model: NicModel::E1000,
            ..base
        },
        (OsFamily::Bsd, _) => OsDefaults {
            memory_mib: 1024,
            disk_gib: 16,
            nic_model: NicModel::E1000,
            usb_tablet: false,
            ..base
        },
        (OsFamily::Other, _) => OsDefaults {
            memory_mib: 64,
            cpus: 1,
            disk_gib: 1,
            nic_model: NicModel::Rtl8139,
            usb_tablet: false,
        },
    }
}

/// The network card models the app offers, with their names.
pub const NIC_MODELS: [(NicModel, &str); 4] = [
    (NicModel::E1000, "Intel e1000"),
    (NicModel::Rtl8139, "Realtek RTL8139"),
    (NicModel::VirtioNet, "virtio-net"),
    (NicModel::VirtioNetModern, "virtio-net (modern only)"),
];

/// The name of a network card model.
pub fn nic_model_label(model: NicModel) -> &'static str {
    match model {
        NicModel::E1000 => NIC_MODELS[0].1,
        NicModel::Rtl8139 => NIC_MODELS[1].1,
        NicModel::VirtioNet => NIC_MODELS[2].1,
        NicModel::VirtioNetModern => NIC_MODELS[3].1,
    }
}

/// The VM's hard disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// A new image of this many GiB in the VM's folder.
    New {
        size_gib: u64,
    },
    /// An existing image.
    Existing(PathBuf),
    None,
}

/// The VM's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    Nat(NicModel),
    None,
}

/// What the wizard needs to know about the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostResources {
    pub cpus: u32,
    pub total_memory_mib: u64,
    pub available_memory_mib: u64,
}

/// The longest VM name (it is a folder name).
pub const MAX_NAME_LEN: usize = 64;
/// The least memory the engine accepts.
pub const MIN_MEMORY_MIB: u64 = 16;
/// The largest new disk.
pub const MAX_DISK_GIB: u64 = 65536;

/// A choice the wizard cannot accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WizardError {
    #[error("{0} does not exist: choose another ISO image")]
    IsoMissing(PathBuf),
    #[error("{0} is not an ISO 9660 image (no CD001 signature): choose a CD/DVD image")]
    NotAnIso(PathBuf),
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{0} does not exist: choose another disk image")]
    ImageMissing(PathBuf),
    /// Corrupt, of an unsupported kind, or in use by a running VM.
    #[error("{0}")]
    ImageUnusable(String),
    #[error("choose an ISO image or a disk image")]
    NoPathChosen,
    #[error("the name is empty: type a name for the VM")]
    NameEmpty,
    #[error("a VM named '{0}' already exists: choose another name")]
    NameTaken(String),
    #[error("a name cannot contain '/'")]
    NameHasSlash,
    #[error("a name cannot start with '.'")]
    NameStartsWithDot,
    #[error("the name is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong,
    #[error("the name may contain only letters, digits, spaces, '.', '-' and '_'")]
    NameBadCharacter,
    #[error("a VM needs at least one CPU")]
    ZeroCpus,
    #[error("at most {} CPUs", vmm::config::MAX_CPUS)]
    TooManyCpus,
    #[error("a VM needs at least {MIN_MEMORY_MIB} MiB of memory")]
    MemoryTooSmall,
    #[error("{wanted} MiB is more than this computer's {host} MiB of memory")]
    MemoryOverHost { wanted: u64, host: u64 },
    #[error("a disk needs at least 1 GiB")]
    DiskTooSmall,
    #[error("a new disk can be at most {MAX_DISK_GIB} GiB")]
    DiskTooLarge,
    #[error("nothing to boot from: choose an ISO, a disk image or a new disk")]
    NothingToBoot,
}

/// A choice the wizard accepts but points out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WizardWarning {
    /// More memory than the host has free now.
    MemoryOvercommit { wanted: u64, available: u64 },
    /// More vCPUs than the host has CPUs.
    CpuOvercommit { wanted: u32, host: u32 },
}

impl std::fmt::Display for WizardWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WizardWarning::MemoryOvercommit { wanted, available } => write!(
                f,
                "{wanted} MiB is more than the {available} MiB free now: the host may swap"
            ),
            WizardWarning::CpuOvercommit { wanted, host } => write!(
                f,
                "{wanted} CPUs is more than this computer's {host}: the VM will be slower"
            ),
        }
    }
}

/// The wizard's steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Source,
    Os,
    Resources,
    Storage,
    Network,
    Summary,
}

impl Step {
    pub const ALL: [Step; 6] = [
        Step::Source,
        Step::Os,
        Step::Resources,
        Step::Storage,
        Step::Network,
        Step::Summary,
    ];
}

/// Everything the user chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WizardModel {
    pub source: Source,
    pub os_family: OsFamily,
    pub os_version: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub storage: Storage,
    pub network: Network,
    pub name: String,
    pub customize_before_start: bool,
}

impl Default for WizardModel {
    fn default() -> Self {
        let d = defaults_for(OsFamily::Linux, "Debian 12");
        Self {
            source: Source::Iso(PathBuf::new()),
            os_family: OsFamily::Linux,
            os_version: "Debian 12".into(),
            cpus: d.cpus,
            memory_mib: d.memory_mib,
            storage: Storage::New {
                size_gib: d.disk_gib,
            },
            network: Network::Nat(d.nic_model),
            name: String::new(),
            customize_before_start: false,
        }
    }
}

/// Whether the file at `path` is an ISO 9660 image ("CD001" at byte 0x8001).
pub fn check_iso(path: &Path) -> Result<(), WizardError> {
    if path.as_os_str().is_empty() {
        return Err(WizardError::NoPathChosen);
    }
    if !path.is_file() {
        return Err(WizardError::IsoMissing(path.to_path_buf()));
    }
    let unreadable = |e: std::io::Error| WizardError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut file = std::fs::File::open(path).map_err(unreadable)?;
    file.seek(SeekFrom::Start(0x8001)).map_err(unreadable)?;
    let mut signature = [0u8; 5];
    match file.read_exact(&mut signature) {
        Ok(()) if &signature == b"CD001" => Ok(()),
        Ok(()) => Err(WizardError::NotAnIso(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(WizardError::NotAnIso(path.to_path_buf()))
        }
        Err(e) => Err(unreadable(e)),
    }
}

fn check_image(path: &Path) -> Result<(), WizardError> {
    if path.as_os_str().is_empty() {
        return Err(WizardError::NoPathChosen);
    }
    if !path.is_file() {
        return Err(WizardError::ImageMissing(path.to_path_buf()));
    }
    // Opened (and closed again) as the new VM will open it: a corrupt image or one a
    // running VM writes is refused here, before any VM folder is written.
    vmm::storage::check_usable(path, false)
        .map(|_| ())
        .map_err(|e| WizardError::ImageUnusable(e.to_string()))
}

/// Checks a VM name against the library's names (the same rules as the library folder).
pub fn check_name(name: &str, taken: &[String]) -> Result<(), WizardError> {
    if name.trim().is_empty() {
        return Err(WizardError::NameEmpty);
    }
    if name.contains('/') {
        return Err(WizardError::NameHasSlash);
    }
    if name.starts_with('.') {
        return Err(WizardError::NameStartsWithDot);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(WizardError::NameTooLong);
    }
    if !name
        .chars()
        .all(|c| c.is_alphanumeric() || matches!(c, ' ' | '.' | '-' | '_'))
    {
        return Err(WizardError::NameBadCharacter);
    }
    if taken.iter().any(|t| t == name) {
        return Err(WizardError::NameTaken(name.to_string()));
    }
    Ok(())
}

/// A free name based on `base`: "Debian 12", then "Debian 12 2", ... (library names
/// allow letters, digits, spaces, '.', '-' and '_').
pub fn unique_name(base: &str, taken: &[String]) -> String {
    let base: String = base
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, ' ' | '.' | '-' | '_') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let base = base.trim_start_matches('.').trim();
    let base = if base.is_empty() { "VM" } else { base };
    let base: String = base.chars().take(MAX_NAME_LEN - 6).collect();
    if !taken.contains(&base) {
        return base;
    }
    (2..)
        .map(|n| format!("{base} {n}"))
        .find(|candidate| !taken.contains(candidate))
        .unwrap_or_default()
}

impl WizardModel {
    /// Applies the defaults of the chosen OS (memory, CPUs, disk size, NIC model).
    pub fn apply_os_defaults(&mut self) {
        let d = defaults_for(self.os_family, &self.os_version);
        self.memory_mib = d.memory_mib;
        self.cpus = d.cpus;
        if let Storage::New { .. } = self.storage {
            self.storage = Storage::New {
                size_gib: d.disk_gib,
            };
        }
        if let Network::Nat(_) = self.network {
            self.network = Network::Nat(d.nic_model);
        }
    }

    /// The problems of one step.
    pub fn check_step(
        &self,
        step: Step,
        host: &HostResources,
        taken: &[String],
    ) -> Vec<WizardError> {
        let mut errors = Vec::new();
        match step {
            Step::Source => match &self.source {
                Source::Iso(p) => errors.extend(check_iso(p).err()),
                Source::ExistingImage(p) => errors.extend(check_image(p).err()),
                Source::Empty => {}
            },
            Step::Os => {}
            Step::Resources => {
                if self.cpus == 0 {
                    errors.push(WizardError::ZeroCpus);
                } else if self.cpus > vmm::config::MAX_CPUS {
                    errors.push(WizardError::TooManyCpus);
                }
                if self.memory_mib < MIN_MEMORY_MIB {
                    errors.push(WizardError::MemoryTooSmall);
                } else if host.total_memory_mib > 0 && self.memory_mib > host.total_memory_mib {
                    errors.push(WizardError::MemoryOverHost {
                        wanted: self.memory_mib,
                        host: host.total_memory_mib,
                    });
                }
            }
            Step::Storage => {
                match &self.storage {
                    Storage::New { size_gib } if *size_gib == 0 => {
                        errors.push(WizardError::DiskTooSmall)
                    }
                    Storage::New { size_gib } if *size_gib > MAX_DISK_GIB => {
                        errors.push(WizardError::DiskTooLarge)
                    }
                    Storage::Existing(p) => errors.extend(check_image(p).err()),
                    _ => {}
                }
                let has_boot = !matches!(self.source, Source::Empty)
                    || !matches!(self.storage, Storage::None)
                    || matches!(self.network, Network::Nat(_));
                if !has_boot {
                    errors.push(WizardError::NothingToBoot);
                }
            }
            Step::Network => {}
            Step::Summary => errors.extend(check_name(&self.name, taken).err()),
        }
        errors
    }

    /// The problems of every step, in step order.
    pub fn check_all(&self, host: &HostResources, taken: &[String]) -> Vec<WizardError> {
        Step::ALL
            .iter()
            .flat_map(|s| self.check_step(*s, host, taken))
            .collect()
    }

    /// What is allowed but worth a warning.
    pub fn warnings(&self, host: &HostResources) -> Vec<WizardWarning> {
        let mut w = Vec::new();
        if host.available_memory_mib > 0
            && self.memory_mib > host.available_memory_mib
            && self.memory_mib <= host.total_memory_mib
        {
            w.push(WizardWarning::MemoryOvercommit {
                wanted: self.memory_mib,
                available: host.available_memory_mib,
            });
        }
        if host.cpus > 0 && self.cpus > host.cpus {
            w.push(WizardWarning::CpuOvercommit {
                wanted: self.cpus,
                host: host.cpus,
            });
        }
        w
    }

    /// The file name of a new disk inside the VM's folder.
    pub const NEW_DISK_FILE: &'static str = "disk.qcow2";

    /// The configuration these choices make for a VM whose folder is `vm_dir`; `uuid` is
    /// its new identity.
    pub fn to_config(&self, vm_dir: &Path, uuid: &str) -> VmConfig {
        let disk = |p: PathBuf| DriveConfig {
            kind: DriveKind::Disk,
            path: Some(p),
            read_only: false,
        };
        let mut layout = Vec::new();
        if let Source::ExistingImage(p) = &self.source {
            layout.push(disk(p.clone()));
        }
        match &self.storage {
            Storage::New { .. } => layout.push(disk(vm_dir.join(Self::NEW_DISK_FILE))),
            Storage::Existing(p) if !layout.iter().any(|d| d.path.as_ref() == Some(p)) => {
                layout.push(disk(p.clone()))
            }
            _ => {}
        }
        // Disks first, then the CD-ROM (empty unless installing from an ISO).
        layout.truncate(vmm::config::MAX_DRIVES - 1);
        layout.push(DriveConfig {
            kind: DriveKind::Cdrom,
            path: match &self.source {
                Source::Iso(p) => Some(p.clone()),
                _ => None,
            },
            read_only: true,
        });
        let defaults = defaults_for(self.os_family, &self.os_version);
        VmConfig {
            name: self.name.clone(),
            uuid: uuid.to_string(),
            os: OsInfo {
                family: self.os_family.id().into(),
                version: self.os_version.clone(),
            },
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            topology: None,
            nvram: Some(vm_dir.join("nvram.toml")),
            drives: layout,
            boot_order: match self.source {
                Source::Iso(_) => BootOrder::CdOnce,
                _ => BootOrder::Disk,
            },
            nics: match self.network {
                Network::Nat(model) => vec![NicConfig {
                    model,
                    mac: None,
                    link_up: true,
                    backend: vmm::config::NetBackendConfig::Nat,
                    forwards: Vec::new(),
                    boot_file: None,
                }],
                Network::None => Vec::new(),
            },
            input: InputConfig {
                usb_tablet: defaults.usb_tablet,
                usb_keyboard: false,
            },
            ..VmConfig::default()
        }
    }
}

/// A version-4 UUID text from 16 random bytes.
pub fn uuid_from_bytes(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A new random UUID (from /dev/urandom; from the clock and process id if that fails).
pub fn new_uuid() -> String {
    let mut bytes = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    if !ok {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mixed = t ^ (u128::from(std::process::id()) << 64);
        bytes = mixed.to_le_bytes();
    }
    uuid_from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostResources = HostResources {
        cpus: 4,
        total_memory_mib: 8192,
        available_memory_mib: 4096,
    };

    fn iso(dir: &Path) -> PathBuf {
        let p = dir.join("install.iso");
        let mut data = vec![0u8; 0x8800];
        data[0x8000] = 1;
        data[0x8001..0x8006].copy_from_slice(b"CD001");
        std::fs::write(&p, data).unwrap();
        p
    }

    fn valid(dir: &Path) -> WizardModel {
        WizardModel {
            source: Source::Iso(iso(dir)),
            name: "Debian 12".into(),
            ..WizardModel::default()
        }
    }

    #[test]
    fn a_complete_model_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let m = valid(dir.path());
        assert_eq!(m.check_all(&HOST, &[]), vec![]);
        assert!(m.warnings(&HOST).is_empty());
    }

    #[test]
    fn iso_must_exist_and_have_the_signature() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(check_iso(&iso(dir.path())), Ok(()));
        let missing = dir.path().join("missing.iso");
        assert_eq!(
            check_iso(&missing),
            Err(WizardError::IsoMissing(missing.clone()))
        );
        assert_eq!(check_iso(Path::new("")), Err(WizardError::NoPathChosen));
        let short = dir.path().join("short.iso");
        std::fs::write(&short, b"CD001").unwrap();
        assert_eq!(check_iso(&short), Err(WizardError::NotAnIso(short.clone())));
        let wrong = dir.path().join("wrong.iso");
        std::fs::write(&wrong, vec![0u8; 0x9000]).unwrap();
        assert_eq!(check_iso(&wrong), Err(WizardError::NotAnIso(wrong.clone())));
        // A folder is not an ISO.
        assert_eq!(
            check_iso(dir.path()),
            Err(WizardError::IsoMissing(dir.path().to_path_buf()))
        );
        let mut m = valid(dir.path());
        m.source = Source::Iso(wrong.clone());
        assert_eq!(
            m.check_step(Step::Source, &HOST, &[]),
            vec![WizardError::NotAnIso(wrong)]
        );
    }

    #[test]
    fn existing_image_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = valid(dir.path());
        let missing = dir.path().join("nope.qcow2");
        m.source = Source::ExistingImage(missing.clone());
        m.storage = Storage::None;
        assert_eq!(
            m.check_step(Step::Source, &HOST, &[]),
            vec![WizardError::ImageMissing(missing.clone())]
        );
        m.source = Source::Empty;
        m.storage = Storage::Existing(missing.clone());
        assert_eq!(
            m.check_step(Step::Storage, &HOST, &[]),
            vec![WizardError::ImageMissing(missing)]
        );
        m.storage = Storage::Existing(PathBuf::new());
        assert_eq!(
            m.check_step(Step::Storage, &HOST, &[]),
            vec![WizardError::NoPathChosen]
        );
    }

    #[test]
    fn corrupt_or_in_use_images_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.qcow2");
        vmm::storage::create(&good, vmm::storage::ImageFormat::Qcow2, 1 << 30, None).unwrap();
        let mut m = valid(dir.path());
        m.source = Source::ExistingImage(good.clone());
        m.storage = Storage::None;
        assert_eq!(m.check_step(Step::Source, &HOST, &[]), vec![]);
        // In use: a running VM holds it.
        let held = vmm::storage::ImageBackend::open(&good, vmm::DriveKind::Disk, false).unwrap();
        let errors = m.check_step(Step::Source, &HOST, &[]);
        assert!(
            matches!(&errors[..], [WizardError::ImageUnusable(t)]
                if t.contains("good.qcow2") && t.contains("in use")),
            "{errors:?}"
        );
        drop(held);
        assert_eq!(m.check_step(Step::Source, &HOST, &[]), vec![]);
        // Corrupt, chosen as the existing disk of the storage step.
        let bad = dir.path().join("bad.qcow2");
        let mut header = b"QFI\xfb".to_vec();
        header.extend_from_slice(&[0xff; 100]);
        std::fs::write(&bad, &header).unwrap();
        m.source = Source::Empty;
        m.storage = Storage::Existing(bad.clone());
        let errors = m.check_step(Step::Storage, &HOST, &[]);
        assert!(
            matches!(&errors[..], [WizardError::ImageUnusable(t)] if t.contains("bad.qcow2")),
            "{errors:?}"
        );
        assert_eq!(
            std::fs::read(&bad).unwrap(),
            header,
            "the image is untouched"
        );
    }

    #[test]
    fn names_are_checked() {
        let taken = vec!["Debian 12".to_string()];
        assert_eq!(check_name("Debian 12 2", &taken), Ok(()));
        assert_eq!(
            check_name("Debian 12", &taken),
            Err(WizardError::NameTaken("Debian 12".into()))
        );
        assert_eq!(check_name("", &taken), Err(WizardError::NameEmpty));
        assert_eq!(check_name("   ", &taken), Err(WizardError::NameEmpty));
        assert_eq!(check_name("a/b", &taken), Err(WizardError::NameHasSlash));
        assert_eq!(check_name("../x", &taken), Err(WizardError::NameHasSlash));
        assert_eq!(
            check_name(".hidden", &taken),
            Err(WizardError::NameStartsWithDot)
        );
        assert_eq!(
            check_name(&"a".repeat(65), &taken),
            Err(WizardError::NameTooLong)
        );
        assert_eq!(check_name(&"a".repeat(64), &taken), Ok(()));
        assert_eq!(
            check_name("a:b", &taken),
            Err(WizardError::NameBadCharacter)
        );
        assert_eq!(
            check_name("a\0b", &taken),
            Err(WizardError::NameBadCharacter)
        );
        // The wizard's rules agree with the library's.
        let long = "é".repeat(33);
        for name in [
            "ok",
            "Debian 12 (2)",
            "a/b",
            ".x",
            "a:b",
            "x_y-z.1",
            "",
            long.as_str(),
        ] {
            assert_eq!(
                check_name(name, &[]).is_ok(),
                crate::library::valid_vm_name(name),
                "{name}"
            );
        }
    }

    #[test]
    fn unique_names() {
        let taken = vec!["Debian 12".to_string(), "Debian 12 2".to_string()];
        assert_eq!(unique_name("Debian 12", &taken), "Debian 12 3");
        assert_eq!(unique_name("Fedora 40", &taken), "Fedora 40");
        assert_eq!(unique_name("a/b", &[]), "a-b");
        assert_eq!(unique_name("..", &[]), "VM");
        let long = unique_name(&"x".repeat(100), &[]);
        assert!(check_name(&long, &[]).is_ok());
        let (plus, _) = ("Windows 11", 0);
        assert!(check_name(&unique_name(plus, &[]), &[]).is_ok());
    }

    #[test]
    fn cpus_and_memory_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = valid(dir.path());
        m.cpus = 0;
        assert_eq!(
            m.check_step(Step::Resources, &HOST, &[]),
            vec![WizardError::ZeroCpus]
        );
        m.cpus = 256;
        assert_eq!(
            m.check_step(Step::Resources, &HOST, &[]),
            vec![WizardError::TooManyCpus]
        );
        m.cpus = 1;
        m.memory_mib = 8193;
        assert_eq!(
            m.check_step(Step::Resources, &HOST, &[]),
            vec![WizardError::MemoryOverHost {
                wanted: 8193,
                host: 8192
            }]
        );
        m.memory_mib = 8;
        assert_eq!(
            m.check_step(Step::Resources, &HOST, &[]),
            vec![WizardError::MemoryTooSmall]
        );
        m.memory_mib = 8192;
        assert!(m.check_step(Step::Resources, &HOST, &[]).is_empty());
    }

    #[test]
    fn overcommit_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = valid(dir.path());
        m.memory_mib = 6000;
        m.cpus = 8;
        assert_eq!(
            m.warnings(&HOST),
            vec![
                WizardWarning::MemoryOvercommit {
                    wanted: 6000,
                    available: 4096
                },
                WizardWarning::CpuOvercommit { wanted: 8, host: 4 }
            ]
        );
        assert!(m.check_all(&HOST, &[]).is_empty());
        let text = m.warnings(&HOST)[0].to_string();
        assert!(text.contains("6000 MiB"), "{text}");
    }

    #[test]
    fn storage_sizes_and_boot_device() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = valid(dir.path());
        m.storage = Storage::New { size_gib: 0 };
        assert_eq!(
            m.check_step(Step::Storage, &HOST, &[]),
            vec![WizardError::DiskTooSmall]
        );
        m.storage = Storage::New {
            size_gib: MAX_DISK_GIB + 1,
        };
        assert_eq!(
            m.check_step(Step::Storage, &HOST, &[]),
            vec![WizardError::DiskTooLarge]
        );
        m.source = Source::Empty;
        m.storage = Storage::None;
        m.network = Network::None;
        assert_eq!(
            m.check_step(Step::Storage, &HOST, &[]),
            vec![WizardError::NothingToBoot]
        );
        m.network = Network::Nat(NicModel::E1000);
        assert!(m.check_step(Step::Storage, &HOST, &[]).is_empty());
    }

    #[test]
    fn os_defaults_follow_the_table() {
        let mut m = WizardModel {
            os_family: OsFamily::Windows,
            os_version: "Windows 11".into(),
            ..WizardModel::default()
        };
        m.apply_os_defaults();
        assert_eq!(m.memory_mib, 4096);
        assert_eq!(m.storage, Storage::New { size_gib: 64 });
        assert_eq!(m.network, Network::Nat(NicModel::E1000));
        m.storage = Storage::None;
        m.network = Network::None;
        m.os_version = "Windows XP".into();
        m.apply_os_defaults();
        assert_eq!(m.storage, Storage::None, "a choice of no disk stays");
        assert_eq!(m.network, Network::None);
        assert_eq!(m.memory_mib, 512);
        for f in OsFamily::ALL {
            assert!(!f.id().is_empty());
            for v in f.versions() {
                let d = defaults_for(f, v);
                assert!(d.memory_mib >= MIN_MEMORY_MIB && d.cpus >= 1 && d.disk_gib >= 1);
            }
        }
    }

    #[test]
    fn config_from_an_iso_install() {
        let dir = tempfile::tempdir().unwrap();
        let m = valid(dir.path());
        let vm_dir = dir.path().join("Debian 12");
        let c = m.to_config(&vm_dir, "u-1");
        c.validate().unwrap();
        assert_eq!(c.name, "Debian 12");
        assert_eq!(c.uuid, "u-1");
        assert_eq!(c.os.family, "linux");
        assert_eq!(c.boot_order, BootOrder::CdOnce);
        assert_eq!(c.drives.len(), 2);
        assert_eq!(c.drives[0].kind, DriveKind::Disk);
        assert_eq!(c.drives[0].path, Some(vm_dir.join("disk.qcow2")));
        assert_eq!(c.drives[1].kind, DriveKind::Cdrom);
        assert_eq!(c.drives[1].path, Some(dir.path().join("install.iso")));
        assert_eq!(c.nics.len(), 1);
        assert_eq!(c.nics[0].model, NicModel::VirtioNet);
        assert!(c.input.usb_tablet);
        assert_eq!(c.nvram, Some(vm_dir.join("nvram.toml")));
        // The config survives a save and load.
        let path = dir.path().join("vm.toml");
        c.save(&path).unwrap();
        assert_eq!(VmConfig::load(&path).unwrap(), c);
    }

    #[test]
    fn config_from_an_image_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("old.qcow2");
        let mut m = WizardModel {
            source: Source::ExistingImage(img.clone()),
            storage: Storage::None,
            network: Network::None,
            name: "old".into(),
            ..WizardModel::default()
        };
        let c = m.to_config(dir.path(), "u");
        c.validate().unwrap();
        assert_eq!(c.boot_order, BootOrder::Disk);
        assert_eq!(c.drives[0].path, Some(img));
        assert!(c.nics.is_empty());
        m.source = Source::Empty;
        m.network = Network::Nat(NicModel::Rtl8139);
        let c = m.to_config(dir.path(), "u");
        c.validate().unwrap();
        assert_eq!(c.drives.len(), 1);
        assert_eq!(c.drives[0].kind, DriveKind::Cdrom);
    }

    #[test]
    fn uuids_are_version_4() {
        let u = uuid_from_bytes([0xff; 16]);
        assert_eq!(u, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        let a = new_uuid();
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
        assert_ne!(a, new_uuid());
    }
}
