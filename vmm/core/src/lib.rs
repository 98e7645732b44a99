//! DeskVM engine: a PC on KVM.
//!
//! The app, the CLI and the tests use only this crate's facade: [`VmConfig`],
//! [`VmHandle`] (start, pause, resume, reset, power off, events, stats) and
//! [`InputHandle`]. Everything that touches KVM lives here; device models live in
//! `vmm-devices` and see only offsets.

pub mod coalesced;
pub mod config;
pub mod display;
pub mod error;
pub mod firmware;
pub mod layout;
pub mod linux_boot;
pub mod machine;
pub mod memory;
pub mod net;
pub mod storage;
pub mod vcpu;
pub mod vm;
pub mod vnc;

pub use config::{
    BootOrder, CharOutput, ConfigError, CpuTopology, DisplayConfig, DriveConfig, DriveKind,
    FirmwareConfig, InputConfig, LinuxBootConfig, NetBackendConfig, NicConfig, NicModel, OsInfo,
    PortForward, VmConfig, VncConfig,
};
pub use display::{CopyRect, CursorState, DisplayHandle, Frame, Rect};
pub use error::VmmError;
pub use machine::EngineOptions;
pub use vcpu::ExitStats;
pub use vm::{
    DiskStats, Event, InputHandle, InputRoute, NicStats, PowerButton, UsbDevice, VcpuStats,
    VmHandle, VmState, VmStats,
};
