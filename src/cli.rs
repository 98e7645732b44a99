//! The command line: `deskvm run` and friends.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use vmm::{
    BootOrder, CharOutput, DriveConfig, DriveKind, LinuxBootConfig, NetBackendConfig, NicConfig,
    NicModel, PortForward, VmConfig, VmHandle, VmState, VncConfig,
};

use crate::library;

#[derive(Parser, Debug)]
#[command(
    name = "deskvm",
    version,
    about = "DeskVM: virtual machines on your desktop, with their own KVM engine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run one VM headless until it powers off or Ctrl+C.
    Run(Box<RunArgs>),
    /// List the VMs in the library.
    List,
    /// Create and inspect disk images.
    #[command(subcommand)]
    Disk(DiskCommand),
}

#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// Create a new, sparse disk image.
    Create {
        /// The new image file (never overwritten).
        path: PathBuf,
        /// Virtual size, e.g. 20G, 512M (bytes without a suffix); with --backing, 0 or
        /// left out takes the backing image's size.
        size: Option<String>,
        /// qcow2 (default) or raw.
        #[arg(long, default_value = "qcow2", value_parser = parse_format)]
        format: vmm::storage::ImageFormat,
        /// A base image the new qcow2 reads through (copy-on-write).
        #[arg(long, value_name = "IMAGE")]
        backing: Option<PathBuf>,
    },
    /// Show an image's format, sizes and backing file.
    Info { path: PathBuf },
}

pub fn parse_format(text: &str) -> Result<vmm::storage::ImageFormat, String> {
    match text {
        "qcow2" => Ok(vmm::storage::ImageFormat::Qcow2),
        "raw" => Ok(vmm::storage::ImageFormat::Raw),
        _ => Err(format!("\"{text}\" is not qcow2 or raw")),
    }
}

/// "20G", "512M", "1T", "4096" → bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => {
                    return Err(format!(
                        "\"{text}\": unknown size suffix '{c}' (K, M, G, T)"
                    ))
                }
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("\"{text}\" is not a size like 20G or 512M"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("\"{text}\" is too large"))
}

pub fn disk(command: &DiskCommand) -> Result<(), CliError> {
    match command {
        DiskCommand::Create {
            path,
            size,
            format,
            backing,
        } => {
            let size = match size {
                Some(s) => parse_size(s).map_err(CliError::Usage)?,
                None if backing.is_some() => 0,
                None => return Err(CliError::Usage("give the size, e.g. 20G".into())),
            };
            vmm::storage::create(path, *format, size, backing.as_deref())?;
            let info = vmm::storage::info(path)?;
            println!(
                "Created {} ({}, {})",
                path.display(),
                info.format.as_str(),
                human_size(info.virtual_size)
            );
        }
        DiskCommand::Info { path } => {
            let info = vmm::storage::info(path)?;
            println!("image:          {}", path.display());
            println!("format:         {}", info.format.as_str());
            println!(
                "virtual size:   {} ({} bytes)",
                human_size(info.virtual_size),
                info.virtual_size
            );
            println!("disk size:      {}", human_size(info.allocated_bytes));
            if let Some(c) = info.cluster_size {
                println!("cluster size:   {c}");
            }
            if let Some(v) = info.qcow2_version {
                println!("qcow2 version:  {v}");
            }
            if let Some(b) = &info.backing_file {
                println!("backing file:   {b}");
            }
            if info.dirty {
                println!("dirty:          yes (run `qemu-img check -r all` on it)");
            }
            if info.corrupt {
                println!("corrupt:        yes");
            }
        }
    }
    Ok(())
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[derive(Args, Debug, Default, Clone)]
pub struct RunArgs {
    /// The name of a VM in the library.
    pub name: Option<String>,
    /// A VM configuration file (TOML).
    #[arg(long, value_name = "FILE", conflicts_with = "name")]
    pub config: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u64>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// SeaBIOS image (default: the seabios package's bios.bin).
    #[arg(long, value_name = "PATH")]
    pub firmware: Option<PathBuf>,
    /// Boot this Linux kernel (bzImage) directly, without firmware.
    #[arg(long, value_name = "BZIMAGE")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for --kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(long, value_name = "CMDLINE", requires = "kernel")]
    pub append: Option<String>,
    /// Where COM1 output goes: stdio, none or a file.
    #[arg(long, value_name = "stdio|FILE")]
    pub serial: Option<CharOutput>,
    /// Where the debug console (port 0x402) output goes: stdio, none or a file.
    #[arg(long, value_name = "stdio|FILE")]
    pub debugcon: Option<CharOutput>,
    /// Offer the firmware's boot menu (Esc).
    #[arg(long)]
    pub boot_menu: bool,
    /// Serve the screen over VNC on port 5900+DISPLAY (loopback unless ADDR is given).
    #[arg(long, value_name = "[ADDR:]DISPLAY", value_parser = parse_vnc)]
    pub vnc: Option<VncConfig>,
    /// Video memory of the Cirrus card in MiB (4, 8 or 16).
    #[arg(long, value_name = "MIB")]
    pub vram: Option<u32>,
    /// A CD-ROM drive with this ISO image (replaces the configured CD-ROM drives).
    #[arg(long, value_name = "ISO")]
    pub cdrom: Option<PathBuf>,
    /// A hard disk image (raw or qcow2); repeatable (replaces the configured disks).
    #[arg(long, value_name = "IMAGE")]
    pub disk: Vec<PathBuf>,
    /// Boot order: disk first, CD first, or CD for this start only.
    #[arg(long, value_name = "cd|disk|cd-once", value_parser = parse_boot)]
    pub boot: Option<BootOrder>,
    /// USB input devices: tablet, keyboard, both ("tablet,keyboard") or none.
    #[arg(long, value_name = "tablet,keyboard|none")]
    pub usb: Option<String>,
    /// A network card: MODEL[,mac=MAC][,forward=tcp:HOSTADDR:PORT-GUESTPORT]... with MODEL
    /// e1000, rtl8139 or virtio-net; repeatable; "none" for no network.
    #[arg(long, value_name = "MODEL[,mac=..][,forward=..]", value_parser = parse_nic)]
    pub nic: Vec<NicArg>,
}

/// One `--nic` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicArg {
    None,
    Card(NicConfig),
}

/// `[ADDR:]DISPLAY`, as QEMU's -vnc.
pub fn parse_vnc(text: &str) -> Result<VncConfig, String> {
    let (address, display) = match text.rsplit_once(':') {
        Some((a, d)) => (a.trim_matches(['[', ']']).to_string(), d),
        None => ("127.0.0.1".to_string(), text),
    };
    let display: u16 = display
        .parse()
        .map_err(|_| format!("\"{display}\" is not a display number (0 = port 5900)"))?;
    let address = if address.is_empty() {
        "0.0.0.0".to_string()
    } else if address == "localhost" {
        "127.0.0.1".to_string()
    } else {
        address
    };
    Ok(VncConfig {
        address,
        display,
        password: None,
    })
}

pub fn parse_boot(text: &str) -> Result<BootOrder, String> {
    match text {
        "cd" | "cdrom" => Ok(BootOrder::Cd),
        "disk" | "hd" => Ok(BootOrder::Disk),
        "cd-once" => Ok(BootOrder::CdOnce),
        _ => Err(format!("\"{text}\" is not cd, disk or cd-once")),
    }
}

/// `MODEL[,mac=..][,forward=PROTO:HOSTADDR:PORT-GUESTPORT]...` or `none`.
pub fn parse_nic(text: &str) -> Result<NicArg, String> {
    let mut parts = text.split(',');
    let model = match parts.next().unwrap_or_default() {
        "none" => return Ok(NicArg::None),
        "e1000" => NicModel::E1000,
        "rtl8139" => NicModel::Rtl8139,
        "virtio-net" | "virtio" => NicModel::VirtioNet,
        "virtio-net-modern" => NicModel::VirtioNetModern,
        other => {
            return Err(format!(
                "\"{other}\" is not a card model (e1000, rtl8139, virtio-net, virtio-net-modern or none)"
            ))
        }
    };
    let mut nic = NicConfig {
        model,
        mac: None,
        link_up: true,
        backend: NetBackendConfig::Nat,
        forwards: Vec::new(),
        boot_file: None,
    };
    for part in parts {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("\"{part}\" is not KEY=VALUE"))?;
        match key {
            "mac" => {
                if vmm::config::parse_mac(value).is_none() {
                    return Err(format!("\"{value}\" is not a unicast MAC address"));
                }
                nic.mac = Some(value.to_string());
            }
            "forward" => nic.forwards.push(parse_forward(value)?),
            "bootfile" => nic.boot_file = Some(value.to_string()),
            "tap" => nic.backend = NetBackendConfig::Tap { name: value.into() },
            _ => return Err(format!("unknown NIC option \"{key}\"")),
        }
    }
    Ok(NicArg::Card(nic))
}

/// `tcp:127.0.0.1:2222-22` (address optional: `tcp::2222-22`, `tcp:2222-22`).
fn parse_forward(text: &str) -> Result<PortForward, String> {
    let bad =
        || format!("\"{text}\" is not PROTO:[HOSTADDR]:PORT-GUESTPORT (tcp:127.0.0.1:2222-22)");
    let (protocol, rest) = text.split_once(':').ok_or_else(bad)?;
    let (host, guest_port) = rest.rsplit_once('-').ok_or_else(bad)?;
    let (host_address, host_port) = match host.rsplit_once(':') {
        Some((a, p)) if !a.is_empty() => (a.to_string(), p),
        Some((_, p)) => ("127.0.0.1".to_string(), p),
        None => ("127.0.0.1".to_string(), host),
    };
    Ok(PortForward {
        protocol: protocol.to_string(),
        host_address,
        host_port: host_port.parse().map_err(|_| bad())?,
        guest_port: guest_port.parse().map_err(|_| bad())?,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Library(#[from] library::LibraryError),
    #[error(transparent)]
    Config(#[from] vmm::ConfigError),
    #[error(transparent)]
    Engine(#[from] vmm::VmmError),
    #[error(transparent)]
    Disk(#[from] vmm::storage::DiskError),
    #[error("the VM failed: {0}")]
    Failed(String),
    #[error("{0}")]
    Usage(String),
    #[error("cannot install the Ctrl+C handler: {0}")]
    Signals(std::io::Error),
}

/// The config `deskvm run` uses: from the library, a file, or quick options alone, with
/// quick options overriding what the file says.
pub fn run_config(args: &RunArgs) -> Result<VmConfig, CliError> {
    let mut config = if let Some(path) = &args.config {
        VmConfig::load(path)?
    } else if let Some(name) = &args.name {
        library::load_vm(&library::library_dir()?, name)?
    } else {
        VmConfig {
            name: "throw-away".into(),
            memory_mib: 512,
            ..VmConfig::default()
        }
    };
    if let Some(m) = args.memory {
        config.memory_mib = m;
    }
    if let Some(c) = args.cpus {
        config.cpus = c;
    }
    if let Some(f) = &args.firmware {
        config.firmware.bios = Some(f.clone());
    }
    if args.boot_menu {
        config.firmware.boot_menu = true;
    }
    if let Some(k) = &args.kernel {
        config.linux_boot = Some(LinuxBootConfig {
            kernel: k.clone(),
            initrd: args.initrd.clone(),
            cmdline: args.append.clone().unwrap_or_default(),
        });
    }
    if let Some(s) = &args.serial {
        config.serial = s.clone();
    }
    if let Some(d) = &args.debugcon {
        config.debugcon = d.clone();
    }
    if let Some(v) = &args.vnc {
        config.display.vnc = Some(v.clone());
    }
    if let Some(v) = args.vram {
        config.display.vram_mib = v;
    }
    if !args.disk.is_empty() {
        config.drives.retain(|d| d.kind != DriveKind::Disk);
        for (i, path) in args.disk.iter().enumerate() {
            config.drives.insert(
                i,
                DriveConfig {
                    kind: DriveKind::Disk,
                    path: Some(path.clone()),
                    read_only: false,
                },
            );
        }
    }
    if let Some(iso) = &args.cdrom {
        config.drives.retain(|d| d.kind != DriveKind::Cdrom);
        config.drives.push(DriveConfig {
            kind: DriveKind::Cdrom,
            path: Some(iso.clone()),
            read_only: true,
        });
    }
    if let Some(b) = args.boot {
        config.boot_order = b;
    }
    if let Some(usb) = &args.usb {
        config.input.usb_tablet = false;
        config.input.usb_keyboard = false;
        for dev in usb.split(',').filter(|d| !d.is_empty()) {
            match dev {
                "tablet" => config.input.usb_tablet = true,
                "keyboard" => config.input.usb_keyboard = true,
                "none" => {}
                other => {
                    return Err(CliError::Usage(format!(
                        "--usb: \"{other}\" is not tablet, keyboard or none"
                    )))
                }
            }
        }
    }
    if !args.nic.is_empty() {
        config.nics = args
            .nic
            .iter()
            .filter_map(|n| match n {
                NicArg::None => None,
                NicArg::Card(c) => Some(c.clone()),
            })
            .collect();
    }
    config.validate()?;
    Ok(config)
}

/// Runs a VM until it stops; Ctrl+C and SIGTERM power it off cleanly (NVRAM saved).
pub fn run(args: &RunArgs) -> Result<(), CliError> {
    let config = run_config(args)?;
    let serial_on_terminal = config.serial == CharOutput::Stdio;
    let vm = Arc::new(VmHandle::create(config)?);
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(CliError::Signals)?;
    let signal_handle = signals.handle();
    let vm_for_signals = vm.clone();
    let watcher = std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            log::info!("signal {sig}: powering off");
            let _ = vm_for_signals.power_off();
        }
    });
    if let Some(addr) = vm.vnc_address() {
        eprintln!("deskvm: VNC server for the screen on {addr}");
    }
    if serial_on_terminal {
        // What is typed on the terminal goes to the guest's COM1.
        let input = vm.input();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut sent = 0;
                while sent < n {
                    let accepted = input.serial_input(&buf[sent..n]);
                    sent += accepted;
                    if accepted == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        });
    }
    vm.start()?;
    let state = vm.wait_for_stop(None);
    signal_handle.close();
    let _ = watcher.join();
    match state {
        VmState::Failed(m) => Err(CliError::Failed(m)),
        _ => Ok(()),
    }
}

pub fn list() -> Result<(), CliError> {
    let dir = library::library_dir()?;
    let vms = library::list_vms(&dir)?;
    if vms.is_empty() {
        println!("No VMs in {}", dir.display());
    }
    for (name, config) in vms {
        match config {
            Ok(c) => println!("{name}\t{} MiB\t{} vCPU", c.memory_mib, c.cpus),
            Err(e) => println!("{name}\t(unreadable: {e})"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_disk_commands_parse() {
        assert_eq!(parse_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12X").unwrap_err().contains("suffix"));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
        let cli = Cli::try_parse_from(["deskvm", "disk", "create", "/tmp/a.qcow2", "2G"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Disk(DiskCommand::Create { .. }))
        ));
        assert!(
            Cli::try_parse_from(["deskvm", "disk", "create", "x", "1G", "--format", "vdi"])
                .is_err()
        );
        assert_eq!(human_size(3 << 30), "3.0 GiB");
    }

    #[test]
    fn hardware_quick_options() {
        let cli = Cli::try_parse_from([
            "deskvm",
            "run",
            "--vnc",
            ":3",
            "--cdrom",
            "/isos/grub.iso",
            "--disk",
            "/d/a.qcow2",
            "--disk",
            "/d/b.img",
            "--boot",
            "cd-once",
            "--usb",
            "tablet,keyboard",
            "--nic",
            "e1000,mac=52:54:00:01:02:03,forward=tcp:127.0.0.1:2222-22",
            "--nic",
            "virtio-net,forward=udp::5353-53",
        ])
        .unwrap();
        let Some(Command::Run(a)) = cli.command else {
            panic!("not run")
        };
        let c = run_config(&a).unwrap();
        let vnc = c.display.vnc.clone().unwrap();
        assert_eq!((vnc.address.as_str(), vnc.port()), ("0.0.0.0", 5903));
        assert_eq!(c.drives.len(), 3);
        assert_eq!(c.drives[1].path.as_deref(), Some("/d/b.img".as_ref()));
        assert_eq!(c.drives[2].kind, DriveKind::Cdrom);
        assert_eq!(c.boot_order, BootOrder::CdOnce);
        assert!(c.input.usb_tablet && c.input.usb_keyboard);
        assert_eq!(c.nics.len(), 2);
        assert_eq!(c.nics[0].forwards[0].host_port, 2222);
        assert_eq!(c.nics[0].forwards[0].guest_port, 22);
        assert_eq!(c.nics[1].model, NicModel::VirtioNet);
        assert_eq!(c.nics[1].forwards[0].protocol, "udp");
        assert_eq!(c.nics[1].forwards[0].host_address, "127.0.0.1");

        assert_eq!(parse_vnc("5").unwrap().address, "127.0.0.1");
        assert_eq!(parse_vnc("192.168.1.2:1").unwrap().port(), 5901);
        assert!(parse_vnc("x").is_err());
        assert!(parse_boot("floppy").is_err());
        assert!(parse_nic("ne2k").unwrap_err().contains("ne2k"));
        assert!(parse_nic("e1000,mac=01:00:00:00:00:00").is_err());
        assert!(parse_nic("e1000,forward=tcp:22").is_err());
        assert!(parse_nic("e1000,speed=10").is_err());
        assert_eq!(parse_nic("none").unwrap(), NicArg::None);
        let none = run_config(&RunArgs {
            nic: vec![NicArg::None],
            ..Default::default()
        })
        .unwrap();
        assert!(none.nics.is_empty());
        let e = run_config(&RunArgs {
            usb: Some("mouse".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("mouse"), "{e}");
    }

    #[test]
    fn quick_options_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(&path, "name = \"x\"\nmemory_mib = 128\ncpus = 2\n").unwrap();
        let args = RunArgs {
            config: Some(path),
            memory: Some(256),
            serial: Some(CharOutput::Stdio),
            kernel: Some("/boot/k".into()),
            append: Some("quiet".into()),
            ..Default::default()
        };
        let c = run_config(&args).unwrap();
        assert_eq!((c.memory_mib, c.cpus), (256, 2));
        assert_eq!(c.serial, CharOutput::Stdio);
        assert_eq!(c.linux_boot.unwrap().cmdline, "quiet");
    }

    #[test]
    fn quick_options_alone_make_a_throwaway_vm() {
        let c = run_config(&RunArgs {
            memory: Some(64),
            cpus: Some(1),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.memory_mib, 64);
        let e = run_config(&RunArgs {
            memory: Some(1),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("memory_mib"), "{e}");
    }

    #[test]
    fn cli_parses_examples() {
        let cli = Cli::try_parse_from([
            "deskvm",
            "run",
            "--memory",
            "256",
            "--cpus",
            "2",
            "--serial",
            "stdio",
            "--debugcon",
            "/tmp/d.log",
        ])
        .unwrap();
        let Some(Command::Run(a)) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.debugcon, Some(CharOutput::File("/tmp/d.log".into())));
        assert!(Cli::try_parse_from(["deskvm", "run", "--initrd", "x"]).is_err());
        assert!(Cli::try_parse_from(["deskvm", "run", "vm1", "--config", "f"]).is_err());
    }
}
