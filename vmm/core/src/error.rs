//! Errors the engine reports; each message says what the user can do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{path} does not exist: KVM is not available. Enable hardware virtualization (VT-x or AMD-V) in the firmware settings and load the kvm_intel or kvm_amd module")]
    KvmMissing { path: PathBuf },
    #[error("no permission to open {path}: add your user to the 'kvm' group (sudo usermod -aG kvm $USER) and log in again")]
    KvmPermission { path: PathBuf },
    #[error("cannot use KVM at {path}: {source}")]
    KvmOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("KVM call {call} failed: {source}")]
    Kvm {
        call: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("the VM asks for {requested_mib} MiB of memory but this host has only {host_mib} MiB")]
    NotEnoughHostMemory { requested_mib: u64, host_mib: u64 },
    #[error("the VM needs at least {min_mib} MiB of memory (asked for {requested_mib} MiB)")]
    TooLittleMemory { requested_mib: u64, min_mib: u64 },
    #[error("the VM asks for {requested} vCPUs but this host can give at most {available}")]
    TooManyCpus { requested: u32, available: u32 },
    #[error("a VM needs at least one vCPU")]
    NoCpus,
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    GuestMemory { mib: u64, reason: String },
    #[error("firmware {path} not found: install the Debian package 'seabios' (sudo apt install seabios) or give the path of a bios.bin with --firmware")]
    FirmwareMissing { path: PathBuf },
    #[error("no SeaBIOS firmware found (looked in {searched}): install the Debian package 'seabios' (sudo apt install seabios)")]
    FirmwareNotFound { searched: String },
    #[error("firmware {path} is not usable: {reason}")]
    FirmwareInvalid { path: PathBuf, reason: String },
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path} cannot be booted directly: {reason}")]
    KernelInvalid { path: PathBuf, reason: String },
    #[error("cannot open {what} output {path}: {source}")]
    Output {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("device placement failed: {0}")]
    Bus(#[from] vmm_devices::BusError),
    #[error("device set-up failed: {0}")]
    Device(String),
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("the VM is {state}; cannot {action}")]
    InvalidState { state: String, action: &'static str },
    #[error("the engine has stopped")]
    EngineGone,
    #[error("cannot save NVRAM to {path}: {source}")]
    Nvram {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image: {reason}")]
    Disk { path: PathBuf, reason: String },
    #[error("network card {index}: {reason}")]
    Network { index: usize, reason: String },
    #[error("the VNC server cannot start: {0}")]
    Vnc(String),
    #[error("cannot write the screenshot {path}: {source}")]
    Screenshot {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl VmmError {
    pub(crate) fn kvm(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
        move |source| VmmError::Kvm { call, source }
    }
}

pub type Result<T> = std::result::Result<T, VmmError>;
