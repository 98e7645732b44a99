//! The details editor's model: a working copy of a VM's `VmConfig` with one edit method
//! per setting, the add/remove-hardware rules, validation mapped to the row that shows the
//! error, and whether a running VM must restart to see the change. Pure: no GTK.
//!
//! Not editable here: the name (it is the VM's folder name), Linux direct boot, port
//! forwards and TAP backends (kept as they are in `vm.toml`).

use std::path::{Path, PathBuf};

use vmm::config::{
    parse_mac, BootOrder, CharOutput, DriveConfig, DriveKind, NetBackendConfig, NicConfig,
    NicModel, VncConfig, MAX_DRIVES, MAX_NICS,
};
use vmm::{ConfigError, VmConfig};

use super::i18n::tr;

/// Why an edit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("IDE has room for {MAX_DRIVES} drives: remove one first")]
    TooManyDrives,
    #[error("at most {MAX_NICS} network cards")]
    TooManyNics,
    #[error("there is no drive {0}")]
    NoSuchDrive(usize),
    #[error("there is no network card {0}")]
    NoSuchNic(usize),
    #[error("\"{0}\" is not a unicast MAC address like 52:54:00:12:34:56")]
    BadMac(String),
    #[error("only a CD-ROM can be changed while the VM runs")]
    NotACdrom,
}

/// A working copy of a VM's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetailsModel {
    pub saved: VmConfig,
    pub config: VmConfig,
}

impl DetailsModel {
    pub fn new(config: VmConfig) -> Self {
        Self {
            saved: config.clone(),
            config,
        }
    }

    /// Whether there are unsaved edits.
    pub fn is_dirty(&self) -> bool {
        self.saved != self.config
    }

    /// Whether a running VM sees the edits only after its next start (all edits but a CD
    /// change, which goes to the running VM directly).
    pub fn applies_at_next_start(&self, running: bool) -> bool {
        running && self.is_dirty()
    }

    pub fn set_description(&mut self, text: &str) {
        self.config.description = text.to_string();
    }

    pub fn set_cpus(&mut self, cpus: u32) {
        self.config.cpus = cpus;
    }

    /// None: one socket with every vCPU a core (the default grouping).
    pub fn set_topology(&mut self, topology: Option<vmm::CpuTopology>) {
        self.config.topology = topology;
    }

    pub fn set_memory_mib(&mut self, mib: u64) {
        self.config.memory_mib = mib;
    }

    pub fn set_boot_order(&mut self, order: BootOrder) {
        self.config.boot_order = order;
    }

    pub fn set_boot_menu(&mut self, on: bool) {
        self.config.firmware.boot_menu = on;
    }

    pub fn add_drive(&mut self, kind: DriveKind) -> Result<usize, EditError> {
        if self.config.drives.len() >= MAX_DRIVES {
            return Err(EditError::TooManyDrives);
        }
        self.config.drives.push(DriveConfig {
            kind,
            path: None,
            read_only: kind == DriveKind::Cdrom,
        });
        Ok(self.config.drives.len() - 1)
    }

    pub fn remove_drive(&mut self, index: usize) -> Result<DriveConfig, EditError> {
        if index >= self.config.drives.len() {
            return Err(EditError::NoSuchDrive(index));
        }
        Ok(self.config.drives.remove(index))
    }

    fn drive_mut(&mut self, index: usize) -> Result<&mut DriveConfig, EditError> {
        self.config
            .drives
            .get_mut(index)
            .ok_or(EditError::NoSuchDrive(index))
    }

    pub fn set_drive_path(&mut self, index: usize, path: Option<PathBuf>) -> Result<(), EditError> {
        self.drive_mut(index)?.path = path;
        Ok(())
    }

    pub fn set_drive_read_only(&mut self, index: usize, read_only: bool) -> Result<(), EditError> {
        let d = self.drive_mut(index)?;
        d.read_only = read_only || d.kind == DriveKind::Cdrom;
        Ok(())
    }

    /// A CD change while running: saved at once too, so the next start keeps the disc.
    pub fn change_cdrom(&mut self, index: usize, path: Option<PathBuf>) -> Result<(), EditError> {
        if self.drive_mut(index)?.kind != DriveKind::Cdrom {
            return Err(EditError::NotACdrom);
        }
        self.drive_mut(index)?.path = path.clone();
        if let Some(d) = self.saved.drives.get_mut(index) {
            d.path = path;
        }
        Ok(())
    }

    pub fn add_nic(&mut self, model: NicModel) -> Result<usize, EditError> {
        if self.config.nics.len() >= MAX_NICS {
            return Err(EditError::TooManyNics);
        }
        self.config.nics.push(NicConfig {
            model,
            mac: None,
            link_up: true,
            backend: NetBackendConfig::Nat,
            forwards: Vec::new(),
            boot_file: None,
        });
        Ok(self.config.nics.len() - 1)
    }

    pub fn remove_nic(&mut self, index: usize) -> Result<NicConfig, EditError> {
        if index >= self.config.nics.len() {
            return Err(EditError::NoSuchNic(index));
        }
        Ok(self.config.nics.remove(index))
    }

    fn nic_mut(&mut self, index: usize) -> Result<&mut NicConfig, EditError> {
        self.config
            .nics
            .get_mut(index)
            .ok_or(EditError::NoSuchNic(index))
    }

    pub fn set_nic_model(&mut self, index: usize, model: NicModel) -> Result<(), EditError> {
        self.nic_mut(index)?.model = model;
        Ok(())
    }

    /// Sets the MAC; empty text means "derived from the VM".
    pub fn set_nic_mac(&mut self, index: usize, text: &str) -> Result<(), EditError> {
        let text = text.trim();
        let mac = if text.is_empty() {
            None
        } else if parse_mac(text).is_some() {
            Some(text.to_ascii_lowercase())
        } else {
            return Err(EditError::BadMac(text.to_string()));
        };
        self.nic_mut(index)?.mac = mac;
        Ok(())
    }

    pub fn set_nic_link(&mut self, index: usize, up: bool) -> Result<(), EditError> {
        self.nic_mut(index)?.link_up = up;
        Ok(())
    }

    pub fn set_vram_mib(&mut self, mib: u32) {
        self.config.display.vram_mib = mib;
    }

    pub fn set_vnc_enabled(&mut self, on: bool) {
        if on && self.config.display.vnc.is_none() {
            self.config.display.vnc = Some(VncConfig {
                address: "127.0.0.1".into(),
                display: 0,
                password: None,
            });
        } else if !on {
            self.config.display.vnc = None;
        }
    }

    pub fn set_vnc_address(&mut self, address: &str) {
        if let Some(v) = self.config.display.vnc.as_mut() {
            v.address = address.trim().to_string();
        }
    }

    pub fn set_vnc_display(&mut self, display: u16) {
        if let Some(v) = self.config.display.vnc.as_mut() {
            v.display = display;
        }
    }

    pub fn set_vnc_password(&mut self, password: &str) {
        if let Some(v) = self.config.display.vnc.as_mut() {
            v.password = (!password.is_empty()).then(|| password.to_string());
        }
    }

    pub fn set_usb_tablet(&mut self, on: bool) {
        self.config.input.usb_tablet = on;
    }

    pub fn set_usb_keyboard(&mut self, on: bool) {
        self.config.input.usb_keyboard = on;
    }

    /// The serial port's output: "none", "stdio" or a file path (relative to the folder).
    pub fn set_serial(&mut self, text: &str) {
        self.config.serial = text.trim().parse().unwrap_or(CharOutput::None);
    }

    /// Checks the working copy; the error names the field whose row shows it.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        match self.config.validate() {
            Ok(()) => Ok(()),
            Err(ConfigError::Invalid { field, reason }) => Err((field, reason)),
            Err(e) => Err(("", e.to_string())),
        }
    }

    /// Validates and writes `vm.toml` atomically; the working copy becomes the saved one.
    pub fn save(&mut self, path: &Path) -> Result<(), String> {
        self.validate().map_err(|(field, reason)| {
            if field.is_empty() {
                reason
            } else {
                format!("{field}: {reason}")
            }
        })?;
        self.config.save(path).map_err(|e| e.to_string())?;
        self.saved = self.config.clone();
        Ok(())
    }

    /// Drops the edits.
    pub fn revert(&mut self) {
        self.config = self.saved.clone();
    }
}

/// Where drive `index` sits on the IDE bus, in words ("IDE primary master", ...).
pub fn drive_bus_label(index: usize) -> String {
    let (channel, unit) = vmm::storage::ide_position(index);
    let position = match (channel, unit) {
        (0, 0) => tr("primary master"),
        (0, _) => tr("primary slave"),
        (1, 0) => tr("secondary master"),
        _ => tr("secondary slave"),
    };
    format!("IDE {position}")
}

/// The row that shows errors of a `VmConfig::validate` field.
pub fn row_for_field(field: &str) -> &'static str {
    match field.split('.').next().unwrap_or("") {
        "cpus" => "cpus",
        "topology" => "topology",
        "memory_mib" => "memory",
        "display" => "display",
        "drives" => "drives",
        "nics" => "nics",
        "name" => "overview",
        _ => "overview",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmConfig {
        VmConfig {
            name: "t".into(),
            uuid: "6f1d2c5e-0000-4000-8000-000000000001".into(),
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
            ..VmConfig::default()
        }
    }

    #[test]
    fn every_edit_survives_a_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        let mut m = DetailsModel::new(sample());
        assert!(!m.is_dirty());
        m.set_description("desc");
        m.set_cpus(4);
        m.set_memory_mib(3072);
        m.set_boot_order(BootOrder::Cd);
        m.set_boot_menu(true);
        m.set_drive_path(1, Some("/x.iso".into())).unwrap();
        m.set_drive_read_only(0, true).unwrap();
        let n = m.add_nic(NicModel::Rtl8139).unwrap();
        m.set_nic_mac(n, "52:54:00:AA:BB:CC").unwrap();
        m.set_nic_link(n, false).unwrap();
        m.set_nic_model(n, NicModel::E1000).unwrap();
        m.set_vram_mib(16);
        m.set_vnc_enabled(true);
        m.set_vnc_address("0.0.0.0");
        m.set_vnc_display(5);
        m.set_vnc_password("pw");
        m.set_usb_tablet(true);
        m.set_usb_keyboard(true);
        m.set_serial("serial.log");
        assert!(m.is_dirty());
        assert!(m.applies_at_next_start(true));
        assert!(!m.applies_at_next_start(false));
        m.save(&path).unwrap();
        assert!(!m.is_dirty());
        let loaded = VmConfig::load(&path).unwrap();
        let mut expected = m.config.clone();
        expected.serial = CharOutput::File(dir.path().join("serial.log"));
        assert_eq!(loaded, expected);
        assert_eq!(loaded.nics[0].mac.as_deref(), Some("52:54:00:aa:bb:cc"));
        assert!(!loaded.nics[0].link_up);
        assert_eq!(loaded.display.vnc.as_ref().unwrap().port(), 5905);
        assert_eq!(loaded.boot_order, BootOrder::Cd);
        assert!(loaded.drives[0].read_only);
    }

    #[test]
    fn hardware_limits() {
        let mut m = DetailsModel::new(sample());
        assert_eq!(m.add_drive(DriveKind::Cdrom), Ok(2));
        assert_eq!(m.add_drive(DriveKind::Disk), Ok(3));
        assert_eq!(m.add_drive(DriveKind::Disk), Err(EditError::TooManyDrives));
        assert!(m.remove_drive(3).is_ok());
        assert_eq!(m.remove_drive(9), Err(EditError::NoSuchDrive(9)));
        assert_eq!(m.set_drive_path(9, None), Err(EditError::NoSuchDrive(9)));
        for _ in 0..MAX_NICS {
            m.add_nic(NicModel::E1000).unwrap();
        }
        assert_eq!(m.add_nic(NicModel::E1000), Err(EditError::TooManyNics));
        assert_eq!(m.remove_nic(MAX_NICS), Err(EditError::NoSuchNic(MAX_NICS)));
        assert_eq!(
            m.set_nic_mac(0, "01:00:00:00:00:01"),
            Err(EditError::BadMac("01:00:00:00:00:01".into()))
        );
        assert_eq!(
            m.set_nic_mac(0, "nonsense"),
            Err(EditError::BadMac("nonsense".into()))
        );
        m.set_nic_mac(0, "").unwrap();
        assert_eq!(m.config.nics[0].mac, None);
        // A CD-ROM stays read-only.
        m.set_drive_read_only(1, false).unwrap();
        assert!(m.config.drives[1].read_only);
    }

    #[test]
    fn validation_errors_name_the_row_and_block_saving() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        let mut m = DetailsModel::new(sample());
        m.set_cpus(0);
        let (field, _) = m.validate().unwrap_err();
        assert_eq!(row_for_field(field), "cpus");
        assert!(m.save(&path).unwrap_err().contains("cpus"));
        assert!(!path.exists(), "nothing written");
        m.set_cpus(1);
        m.set_memory_mib(1);
        assert_eq!(row_for_field(m.validate().unwrap_err().0), "memory");
        m.set_memory_mib(64);
        m.set_vram_mib(5);
        assert_eq!(row_for_field(m.validate().unwrap_err().0), "display");
        m.set_vram_mib(8);
        m.set_vnc_enabled(true);
        m.set_vnc_address("not an ip");
        assert_eq!(m.validate().unwrap_err().0, "display.vnc.address");
        m.set_vnc_enabled(false);
        m.add_drive(DriveKind::Disk).unwrap();
        assert_eq!(row_for_field(m.validate().unwrap_err().0), "drives");
        m.revert();
        assert!(m.validate().is_ok());
        assert!(!m.is_dirty());
    }

    #[test]
    fn cd_change_is_saved_at_once_and_only_for_cdroms() {
        let mut m = DetailsModel::new(sample());
        m.change_cdrom(1, Some("/new.iso".into())).unwrap();
        assert!(!m.is_dirty(), "a CD change needs no restart");
        assert_eq!(m.saved.drives[1].path, Some(PathBuf::from("/new.iso")));
        assert_eq!(m.change_cdrom(0, None), Err(EditError::NotACdrom));
        assert_eq!(m.change_cdrom(7, None), Err(EditError::NoSuchDrive(7)));
    }

    #[test]
    fn topology_edits_are_validated_in_their_own_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        let mut m = DetailsModel::new(VmConfig::default());
        m.set_cpus(4);
        m.set_topology(Some(vmm::CpuTopology {
            sockets: 2,
            cores: 1,
            threads: 1,
        }));
        let e = m.save(&path).unwrap_err();
        assert!(e.contains("make 2 vCPUs, but the VM has 4"), "{e}");
        assert_eq!(row_for_field("topology"), "topology");
        assert!(!path.exists(), "nothing written on error");
        m.set_topology(Some(vmm::CpuTopology {
            sockets: 2,
            cores: 2,
            threads: 1,
        }));
        m.save(&path).unwrap();
        let saved = VmConfig::load(&path).unwrap();
        assert_eq!(saved.cpu_topology().sockets, 2);
        m.set_topology(None);
        m.save(&path).unwrap();
        assert_eq!(VmConfig::load(&path).unwrap().topology, None);
    }

    #[test]
    fn drives_are_labelled_with_their_ide_position() {
        assert_eq!(drive_bus_label(0), "IDE primary master");
        assert_eq!(drive_bus_label(1), "IDE primary slave");
        assert_eq!(drive_bus_label(2), "IDE secondary master");
        assert_eq!(drive_bus_label(3), "IDE secondary slave");
    }
}
