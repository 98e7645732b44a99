//! The command line: `deskvm run` and friends.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use vmm::{CharOutput, LinuxBootConfig, VmConfig, VmHandle, VmState};

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
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Library(#[from] library::LibraryError),
    #[error(transparent)]
    Config(#[from] vmm::ConfigError),
    #[error(transparent)]
    Engine(#[from] vmm::VmmError),
    #[error("the VM failed: {0}")]
    Failed(String),
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
    config.validate()?;
    Ok(config)
}

/// Runs a VM until it stops; Ctrl+C and SIGTERM power it off cleanly (NVRAM saved).
pub fn run(args: &RunArgs) -> Result<(), CliError> {
    let config = run_config(args)?;
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
