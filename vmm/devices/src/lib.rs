//! DeskVM device models.
//!
//! Every device here sees only offsets inside its own range (`BusDevice::read/write`) and
//! raises interrupts through [`irq::IrqLine`]; none of them knows about KVM, threads or the
//! app. The engine (`vmm`) places them on buses at the addresses in its layout file.
//! Guest input is hostile: no register sequence may make a device panic or loop.
#![forbid(unsafe_code)]

pub mod block;
pub mod bus;
pub mod clock;
pub mod display;
pub mod irq;
pub mod net;
pub mod system;
pub mod vram;

pub mod ata;
pub mod atapi;
pub mod cirrus;
pub mod cirrus_blit;
pub mod debugcon;
pub mod e1000;
pub mod fw_cfg;
pub mod i440fx;
pub mod i8042;
pub mod ide;
pub mod pci;
pub mod piix3;
pub mod piix4_pm;
pub mod ps2_keyboard;
pub mod ps2_mouse;
pub mod reset;
pub mod rtc;
pub mod rtl8139;
pub mod serial;
pub mod uhci;
pub mod usb;
pub mod usb_hid;
pub mod vga;
pub mod virtio_net;
pub mod virtio_pci;
pub mod virtio_queue;

#[cfg(test)]
pub(crate) mod test_support;

pub use bus::{Bus, BusDevice, BusError};
pub use clock::{Clock, Timed};
pub use irq::IrqLine;
pub use system::SystemControl;

/// Guest RAM as DMA-capable devices see it (bounds-checked reads and writes by guest
/// physical address through `vm_memory::Bytes`).
pub type GuestMemory = vm_memory::GuestMemoryMmap;
