//! Every guest-physical address, port, IRQ and PCI slot of the DeskVM PC, in one place.
//!
//! Only the machine builder (`machine.rs`) reads these to place devices; devices themselves
//! see offsets inside their own ranges.

// ---- Guest-physical memory map -------------------------------------------------------

/// Conventional memory ends where the VGA window starts (640 KiB).
pub const LOW_RAM_END: u64 = 0xa_0000;
/// The legacy VGA memory window (0xa0000..0xc0000), routed to the display device.
pub const VGA_WINDOW_START: u64 = 0xa_0000;
pub const VGA_WINDOW_SIZE: u64 = 0x2_0000;
/// The BIOS area shadowed through the i440FX PAM registers (option ROMs + system BIOS).
pub const BIOS_SHADOW_START: u64 = 0xc_0000;
pub const BIOS_SHADOW_END: u64 = 0x10_0000;
/// The part of the BIOS area where the last 128 KiB of the firmware image appears when PAM
/// routes reads to ROM.
pub const ISA_BIOS_START: u64 = 0xe_0000;
pub const ISA_BIOS_SIZE: u64 = 0x2_0000;
/// RAM above 1 MiB starts here.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// RAM below 4 GiB ends at most here; above it is the 32-bit PCI hole (as QEMU's `pc`).
pub const PCI_HOLE_START: u64 = 0xe000_0000;
/// IOAPIC and local APIC (in KVM's kernel).
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's real-mode TSS (three pages) and identity-map page, both reserved in the e820 map.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfeff_c000;
pub const KVM_TSS_START: u64 = 0xfeff_d000;
pub const KVM_PRIVATE_END: u64 = 0xff00_0000;
/// The firmware image ends at 4 GiB.
pub const FIRMWARE_END: u64 = 0x1_0000_0000;
/// RAM that does not fit below the PCI hole continues here.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// Smallest and default guest RAM.
pub const MIN_RAM_MIB: u64 = 16;

// ---- Direct Linux boot ---------------------------------------------------------------

/// Where the boot loader GDT lives.
pub const BOOT_GDT_START: u64 = 0x500;
/// The Linux "zero page" (struct boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: u64 = 0x1_0000;
/// The protected-mode kernel is loaded at 1 MiB.
pub const KERNEL_START: u64 = HIGH_MEMORY_START;

// ---- I/O ports -----------------------------------------------------------------------

pub const I8042_PORT: u16 = 0x60; // data 0x60, status/command 0x64
pub const I8042_PORT_LEN: u64 = 5;
pub const RTC_PORT: u16 = 0x70;
pub const RTC_PORT_LEN: u64 = 2;
pub const SYSTEM_PORT_A: u16 = 0x92;
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_PORT_LEN: u64 = 8;
pub const DEBUGCON_PORT: u16 = 0x402;
pub const FW_CFG_PORT: u16 = 0x510; // selector 0x510, data 0x511, DMA 0x514..0x51c
pub const FW_CFG_PORT_LEN: u64 = 12;
/// PCI configuration mechanism #1 (0xcf8 address, 0xcfc data); 0xcf9 is the reset
/// control register, forwarded by the PCI port device.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
pub const PCI_CONFIG_PORT_LEN: u64 = 8;
/// VGA registers (0x3b0..0x3e0: MDA/CGA CRTC aliases, attribute, sequencer, DAC, GC).
pub const VGA_PORT: u16 = 0x3b0;
pub const VGA_PORT_LEN: u64 = 0x30;
/// IDE channels: command block (8 ports) and control block (1 port) per channel.
pub const IDE_COMMAND_PORTS: [u16; 2] = [0x1f0, 0x170];
pub const IDE_CONTROL_PORTS: [u16; 2] = [0x3f6, 0x376];
pub const IDE_COMMAND_PORT_LEN: u64 = 8;
/// APM control and status (0xb2, 0xb3): the FADT's SMI_CMD port for the ACPI hand-shake.
pub const APM_PORT: u16 = 0xb2;
/// The legacy GPE0 block SeaBIOS's FADT names (status word, enable word).
pub const ACPI_GPE0_PORT: u16 = 0xafe0;

// ---- ISA interrupts (GSIs of KVM's in-kernel PIC/IOAPIC) -------------------------------

pub const KEYBOARD_IRQ: u32 = 1;
pub const COM1_IRQ: u32 = 4;
pub const RTC_IRQ: u32 = 8;
/// The PIIX4's ACPI system control interrupt (hard-wired, level, shared through the PIRQ
/// router so a PCI function routed to IRQ 9 does not clobber it).
pub const ACPI_SCI_IRQ: u32 = 9;
pub const MOUSE_IRQ: u32 = 12;
/// Legacy-mode IDE channels.
pub const IDE_IRQS: [u32; 2] = [14, 15];
pub const ISA_IRQ_COUNT: u32 = 16;
/// Inputs of KVM's in-kernel IOAPIC.
pub const GSI_COUNT: u32 = 24;

// ---- PCI bus 0 -----------------------------------------------------------------------

pub const PCI_HOST_BRIDGE_SLOT: (u8, u8) = (0, 0);
pub const PCI_ISA_BRIDGE_SLOT: (u8, u8) = (1, 0);
pub const PCI_IDE_SLOT: (u8, u8) = (1, 1);
pub const PCI_UHCI_SLOT: (u8, u8) = (1, 2);
/// The PIIX3's UHCI interrupt pin (INTD#).
pub const PCI_UHCI_PIN: u8 = 4;
/// PIIX4 power management (ACPI) function; its register block is wherever the guest puts
/// PMBA (SeaBIOS: 0xb000).
pub const PCI_PM_SLOT: (u8, u8) = (1, 3);
pub const PCI_VGA_SLOT: (u8, u8) = (2, 0);
/// Network cards take slots 3, 4, ... in configuration order.
pub const PCI_NIC_FIRST_SLOT: u8 = 3;
/// Root ports of the UHCI controller the USB tablet and keyboard are plugged into.
pub const USB_TABLET_PORT: usize = 0;
pub const USB_KEYBOARD_PORT: usize = 1;

// ---- fw_cfg identities ---------------------------------------------------------------

/// e820 entry kinds.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;
