//! Machine assembly: the only place that places devices at the addresses of `layout.rs`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_devices::cirrus::{CirrusPorts, CirrusVga, CirrusWindow, BAR_LINEAR};
use vmm_devices::clock::{Clock, HostClock};
use vmm_devices::debugcon::DebugCon;
use vmm_devices::display::DisplayDevice;
use vmm_devices::e1000::E1000;
use vmm_devices::fw_cfg::{self, FwCfg};
use vmm_devices::i440fx::I440fxHostBridge;
use vmm_devices::i8042::I8042;
use vmm_devices::ide::{Drive, PiixIde};
use vmm_devices::net::NetworkCard;
use vmm_devices::pci::{BarRegion, DirectBar, PciBarDevice, SharedPciFunction, ROM_BAR};
use vmm_devices::pci::{BusBarMapper, PciRoot};
use vmm_devices::piix3::{PciIrqRouter, Piix3IsaBridge};
use vmm_devices::piix4_pm::{self, ApmPorts, Gpe0Block, Piix4Pm};
use vmm_devices::reset::{ResetControl, SystemPortA};
use vmm_devices::rtc::{Rtc, RtcState};
use vmm_devices::rtl8139::Rtl8139;
use vmm_devices::serial::{Serial, SerialOutput};
use vmm_devices::uhci::Uhci;
use vmm_devices::usb_hid::{HidInput, UsbHid};
use vmm_devices::virtio_net::VirtioNet;
use vmm_devices::virtio_pci::{MsiSink, VirtioPciMode};
use vmm_devices::vram::DirtyPages;
use vmm_devices::vram::Vram;
use vmm_devices::{Bus, BusDevice, IrqLine, SystemControl, Timed};

use crate::coalesced::CoalescedRing;
use crate::config::{BootOrder, CharOutput, DriveKind, NicModel, VmConfig};
use crate::display::DisplayShared;
use crate::error::{Result, VmmError};
use crate::layout::*;
use crate::linux_boot::{load_linux, LinuxEntry};
use crate::memory::{
    host_memory_bytes, BiosShadowWindow, FirmwareRom, FramebufferSlot, GuestRam, MemoryMap,
    RomSlot, SLOT_ROM_FIRST,
};
use crate::net::NetBackend;
use crate::storage::{ide_boot_path, ide_position, open_drive};
use crate::vcpu::{cpuid_for, ResetState};

/// Engine options that are not part of a VM's configuration.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The KVM device node (normally /dev/kvm).
    pub kvm_path: PathBuf,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            kvm_path: PathBuf::from("/dev/kvm"),
        }
    }
}

/// An interrupt input of KVM's in-kernel PIC/IOAPIC, counting rising edges.
pub struct KvmIrqLine {
    vm: Arc<VmFd>,
    gsi: u32,
    level: AtomicBool,
    raised: Arc<InterruptCounts>,
}

/// Rising edges per GSI, shared with the facade's statistics.
pub type InterruptCounts = Vec<AtomicU64>;

impl IrqLine for KvmIrqLine {
    fn set_level(&self, high: bool) {
        let was = self.level.swap(high, Ordering::SeqCst);
        if high && !was {
            if let Some(count) = self.raised.get(self.gsi as usize) {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Err(e) = self.vm.set_irq_line(self.gsi, high) {
            log::warn!("KVM_IRQ_LINE {} failed: {e}", self.gsi);
        }
    }
}

/// Opens KVM, turning the usual failures into advice.
pub fn open_kvm(options: &EngineOptions) -> Result<Kvm> {
    let path = &options.kvm_path;
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        VmmError::KvmOpen {
            path: path.clone(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        }
    })?;
    Kvm::new_with_path(c_path.as_c_str()).map_err(|e| kvm_open_error(path.clone(), e.errno()))
}

pub(crate) fn kvm_open_error(path: PathBuf, errno: i32) -> VmmError {
    match errno {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmmError::KvmMissing { path },
        libc::EACCES | libc::EPERM => VmmError::KvmPermission { path },
        e => VmmError::KvmOpen {
            path,
            source: std::io::Error::from_raw_os_error(e),
        },
    }
}

fn open_output(what: &'static str, out: &CharOutput) -> Result<Box<dyn std::io::Write + Send>> {
    let target = match out {
        CharOutput::None => SerialOutput::Discard,
        CharOutput::Stdio => SerialOutput::Stdio,
        CharOutput::File(p) => SerialOutput::File(p.clone()),
    };
    target.open().map_err(|e| VmmError::Output {
        what,
        path: match out {
            CharOutput::File(p) => p.clone(),
            _ => PathBuf::from(out.to_string()),
        },
        source: std::io::Error::other(e.to_string()),
    })
}

/// Checks the host can give what the config asks for.
pub fn check_host_resources(kvm: &Kvm, config: &VmConfig) -> Result<()> {
    if config.cpus == 0 {
        return Err(VmmError::NoCpus);
    }
    let host_cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let available = host_cpus.min(kvm.get_max_vcpus()) as u32;
    if config.cpus > available {
        return Err(VmmError::TooManyCpus {
            requested: config.cpus,
            available,
        });
    }
    if config.memory_mib < MIN_RAM_MIB {
        return Err(VmmError::TooLittleMemory {
            requested_mib: config.memory_mib,
            min_mib: MIN_RAM_MIB,
        });
    }
    if let Some(host) = host_memory_bytes() {
        if config.memory_mib > host >> 20 {
            return Err(VmmError::NotEnoughHostMemory {
                requested_mib: config.memory_mib,
                host_mib: host >> 20,
            });
        }
    }
    Ok(())
}

/// A built machine: KVM VM, memory, buses, devices and (not yet running) vCPUs.
pub struct Machine {
    pub config: VmConfig,
    pub vm: Arc<VmFd>,
    pub memory: Arc<MemoryMap>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub vcpus: Vec<(VcpuFd, ResetState)>,
    pub linux_entry: Option<LinuxEntry>,
    pub i8042: Arc<Mutex<I8042>>,
    pub rtc: Arc<Mutex<Rtc>>,
    pub serial: Arc<Mutex<Serial>>,
    pub fw_cfg: Arc<Mutex<FwCfg>>,
    pub pci: Arc<Mutex<PciRoot>>,
    pub irq_lines: Vec<Arc<KvmIrqLine>>,
    pub interrupt_counts: Arc<InterruptCounts>,
    pub clock: Arc<dyn Clock>,
    /// The display card the frame pipeline refreshes.
    pub cirrus: Arc<Mutex<CirrusVga>>,
    pub linear_bar: Arc<CirrusLinearBar>,
    pub ide: Arc<Mutex<PiixIde>>,
    pub uhci: Arc<Mutex<Uhci>>,
    /// ACPI power management (power button, soft-off).
    pub pm: Arc<Mutex<Piix4Pm>>,
    pub tablet: Option<HidInput>,
    pub usb_keyboard: Option<HidInput>,
    /// Devices with timers the engine thread runs (besides the RTC).
    pub timed: Vec<Arc<Mutex<dyn Timed>>>,
    /// Guest writes to the VGA window queued by KVM (see `coalesced.rs`).
    pub coalesced: Option<Arc<CoalescedRing>>,
    /// Network cards in configuration order, each with its backend.
    pub nics: Vec<NicSlot>,
    /// The boot order to switch to after the first reset ("CD once").
    pub boot_order_after_reset: Option<Vec<String>>,
    initial_irqchips: Vec<kvm_irqchip>,
    initial_pit: kvm_pit_state2,
    // Kept so their devices stay alive with the machine.
    _resettables: Vec<Arc<Mutex<dyn Resettable>>>,
}

/// A network card as the machine holds it: the card, its PCI function, its timers.
type CardParts = (
    Arc<Mutex<dyn NetworkCard>>,
    SharedPciFunction,
    Arc<Mutex<dyn Timed>>,
);

/// Message-signalled interrupts through KVM (the in-kernel local APICs).
struct KvmMsi {
    vm: Arc<VmFd>,
}

impl MsiSink for KvmMsi {
    fn send_msi(&self, address: u64, data: u32) {
        let msi = kvm_bindings::kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        if let Err(e) = self.vm.signal_msi(msi) {
            log::warn!("KVM_SIGNAL_MSI: {e}");
        }
    }
}

/// A network card and the backend that carries its frames.
pub struct NicSlot {
    pub card: Arc<Mutex<dyn NetworkCard>>,
    pub backend: NetBackend,
}

/// Devices with a machine-reset behaviour beyond what is rebuilt.
pub trait Resettable: Send {
    fn machine_reset(&mut self);
}

impl Resettable for ResetControl {
    fn machine_reset(&mut self) {
        self.reset();
    }
}
impl Resettable for SystemPortA {
    fn machine_reset(&mut self) {
        self.reset();
    }
}

/// The RTC's ports: after a guest access that moved the RTC's next deadline (interrupt
/// enables, rate, time), the engine's timer is woken to re-arm.
pub struct RtcPorts {
    pub rtc: Arc<Mutex<Rtc>>,
    pub notify: Arc<dyn Fn() + Send + Sync>,
}

impl RtcPorts {
    fn after_access(&self, rtc: &mut Rtc) {
        if rtc.take_deadline_changed() {
            (self.notify)();
        }
    }
}

impl BusDevice for RtcPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut rtc = lock(&self.rtc);
        rtc.read(offset, data);
        self.after_access(&mut rtc);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut rtc = lock(&self.rtc);
        rtc.write(offset, data);
        self.after_access(&mut rtc);
    }
}

impl Machine {
    pub fn build(
        config: &VmConfig,
        options: &EngineOptions,
        system: Arc<dyn SystemControl>,
        timer_notify: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Machine> {
        config
            .validate()
            .map_err(|e| VmmError::Device(e.to_string()))?;
        let kvm = open_kvm(options)?;
        check_host_resources(&kvm, config)?;

        // Firmware first: a missing file should be reported before anything heavy.
        let firmware = if config.linux_boot.is_none() {
            let path = crate::firmware::locate_bios(config.firmware.bios.as_deref())?;
            Some(FirmwareRom::new(&crate::firmware::load_bios(&path)?)?)
        } else {
            None
        };

        let vm = Arc::new(kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?);
        vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(VmmError::kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.set_tss_address(KVM_TSS_START as usize)
            .map_err(VmmError::kvm("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(VmmError::kvm("KVM_CREATE_IRQCHIP"))?;
        let pit_config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit_config)
            .map_err(VmmError::kvm("KVM_CREATE_PIT2"))?;

        let ram = GuestRam::new(config.memory_mib << 20)?;
        let memory = MemoryMap::new(vm.clone(), ram.clone(), firmware)?;

        let interrupt_counts: Arc<InterruptCounts> =
            Arc::new((0..GSI_COUNT).map(|_| AtomicU64::new(0)).collect());
        let irq_lines: Vec<Arc<KvmIrqLine>> = (0..GSI_COUNT)
            .map(|gsi| {
                Arc::new(KvmIrqLine {
                    vm: vm.clone(),
                    gsi,
                    level: AtomicBool::new(false),
                    raised: interrupt_counts.clone(),
                })
            })
            .collect();
        let irq = |n: u32| -> Arc<dyn IrqLine> { irq_lines[n as usize].clone() };

        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let clock: Arc<dyn Clock> = HostClock::new();

        // Legacy devices.
        let i8042 = Arc::new(Mutex::new(I8042::new(
            irq(KEYBOARD_IRQ),
            irq(MOUSE_IRQ),
            system.clone(),
        )));
        pio.insert(I8042_PORT as u64, I8042_PORT_LEN, i8042.clone())?;

        let mut rtc = Rtc::new(irq(RTC_IRQ), clock.clone());
        if let Some(path) = &config.nvram {
            if let Some(state) = load_nvram(path)? {
                rtc.restore(&state)
                    .map_err(|e| VmmError::Device(format!("NVRAM {}: {e}", path.display())))?;
            }
        }
        rtc.set_memory_sizes(ram.below_4g(), ram.above_4g());
        rtc.set_cpu_count(config.cpus);
        let rtc = Arc::new(Mutex::new(rtc));
        pio.insert(
            RTC_PORT as u64,
            RTC_PORT_LEN,
            Arc::new(Mutex::new(RtcPorts {
                rtc: rtc.clone(),
                notify: timer_notify.clone(),
            })),
        )?;

        let port_a = Arc::new(Mutex::new(SystemPortA::new(system.clone())));
        pio.insert(SYSTEM_PORT_A as u64, 1, port_a.clone())?;
        let serial = Arc::new(Mutex::new(Serial::new(
            irq(COM1_IRQ),
            open_output("serial", &config.serial)?,
        )));
        pio.insert(COM1_PORT as u64, COM1_PORT_LEN, serial.clone())?;
        let debugcon = Arc::new(Mutex::new(DebugCon::new(open_output(
            "debug console",
            &config.debugcon,
        )?)));
        pio.insert(DEBUGCON_PORT as u64, 1, debugcon)?;

        // fw_cfg: what SeaBIOS learns about the machine.
        let mut cfg = FwCfg::new(ram.mem.clone());
        // Firmware enumerates APIC IDs below MAX_CPUS (sparse when the topology is).
        let topology = config.cpu_topology();
        let apic_id_limit = topology.apic_id(config.cpus.saturating_sub(1)) + 1;
        cfg.add_u16(fw_cfg::NB_CPUS, config.cpus as u16);
        cfg.add_u16(fw_cfg::MAX_CPUS, apic_id_limit as u16);
        cfg.add_u64(fw_cfg::RAM_SIZE, config.memory_mib << 20);
        cfg.add_u32(fw_cfg::IRQ0_OVERRIDE, 1);
        let fw_err = |e: fw_cfg::FwCfgError| VmmError::Device(format!("fw_cfg: {e}"));
        cfg.add_file("etc/e820", fw_cfg::e820_file_bytes(&ram.e820()))
            .map_err(fw_err)?;
        let (boot_order, boot_order_after_reset) = boot_orders(config);
        cfg.add_file("bootorder", fw_cfg::bootorder_bytes(&boot_order))
            .map_err(fw_err)?;
        // Sleep states the firmware's ACPI tables offer (S0..S5, bit 7 = offered): only
        // soft-off, since suspend is not emulated; SeaBIOS renames _S3_/_S4_ away.
        cfg.add_file("etc/system-states", vec![0x80, 0, 0, 0, 0, 0x80])
            .map_err(fw_err)?;
        cfg.set_boot_menu(
            config.firmware.boot_menu,
            config.firmware.boot_menu_timeout_ms.unwrap_or(2500),
        );
        let fw_cfg = Arc::new(Mutex::new(cfg));
        pio.insert(FW_CFG_PORT as u64, FW_CFG_PORT_LEN, fw_cfg.clone())?;

        // PCI bus 0: host bridge and ISA bridge; 0xcf9 is the reset control register.
        let mapper = Arc::new(BusBarMapper::new(pio.clone(), mmio.clone()));
        let mut pci = PciRoot::new(mapper.clone());
        let reset_control = Arc::new(Mutex::new(ResetControl::new(system.clone())));
        pci.set_port_cf9_handler(reset_control.clone());
        let pci_err = |e: vmm_devices::pci::PciError| VmmError::Device(e.to_string());
        let host_bridge = Arc::new(Mutex::new(I440fxHostBridge::new(memory.clone())));
        pci.add(PCI_HOST_BRIDGE_SLOT.0, PCI_HOST_BRIDGE_SLOT.1, host_bridge)
            .map_err(pci_err)?;
        let isa_lines: Vec<Arc<dyn IrqLine>> = (0..ISA_IRQ_COUNT).map(irq).collect();
        let router = PciIrqRouter::new(isa_lines);
        let isa_bridge = Arc::new(Mutex::new(Piix3IsaBridge::new(router.clone())));
        pci.add(PCI_ISA_BRIDGE_SLOT.0, PCI_ISA_BRIDGE_SLOT.1, isa_bridge)
            .map_err(pci_err)?;
        // IDE on 00:01.1 in legacy mode: fixed ports and ISA IRQs 14/15.
        let ide = PiixIde::new(ram.mem.clone(), irq(IDE_IRQS[0]), irq(IDE_IRQS[1]));
        for channel in 0..2 {
            pio.insert(
                IDE_COMMAND_PORTS[channel] as u64,
                IDE_COMMAND_PORT_LEN,
                ide.command_block(channel),
            )?;
            pio.insert(
                IDE_CONTROL_PORTS[channel] as u64,
                1,
                ide.control_block(channel),
            )?;
        }
        for (index, drive) in config.drives.iter().enumerate() {
            let (channel, unit) = ide_position(index);
            let backend = open_drive(drive)?;
            let device = match drive.kind {
                DriveKind::Disk => match backend {
                    Some(b) => Drive::Disk(Box::new(b)),
                    None => continue,
                },
                DriveKind::Cdrom => Drive::Cdrom(
                    backend.map(|b| Box::new(b) as Box<dyn vmm_devices::block::BlockBackend>),
                ),
            };
            ide.attach(channel, unit, device)
                .map_err(|e| VmmError::Device(format!("IDE drive {index}: {e}")))?;
        }
        let ide = Arc::new(Mutex::new(ide));
        pci.add(PCI_IDE_SLOT.0, PCI_IDE_SLOT.1, ide.clone())
            .map_err(pci_err)?;

        // UHCI on 00:01.2 with the configured USB input devices.
        let mut timed: Vec<Arc<Mutex<dyn Timed>>> = Vec::new();
        let mut uhci = Uhci::new(
            router.intx_line(PCI_UHCI_SLOT.0, PCI_UHCI_PIN),
            clock.clone(),
            ram.mem.clone(),
        );
        let usb_err = |e: vmm_devices::usb::UsbError| VmmError::Device(format!("USB: {e}"));
        let tablet = if config.input.usb_tablet {
            let device = UsbHid::tablet();
            let input = device.input();
            uhci.attach(USB_TABLET_PORT, Box::new(device))
                .map_err(usb_err)?;
            Some(input)
        } else {
            None
        };
        let usb_keyboard = if config.input.usb_keyboard {
            let device = UsbHid::keyboard();
            let input = device.input();
            uhci.attach(USB_KEYBOARD_PORT, Box::new(device))
                .map_err(usb_err)?;
            Some(input)
        } else {
            None
        };
        let uhci = Arc::new(Mutex::new(uhci));
        timed.push(uhci.clone());
        pci.add(PCI_UHCI_SLOT.0, PCI_UHCI_SLOT.1, uhci.clone())
            .map_err(pci_err)?;
        mapper.set_after_write(PCI_UHCI_SLOT.0, PCI_UHCI_SLOT.1, timer_notify.clone());

        // PIIX4 power management on 00:01.3: ACPI soft-off, power button, PM timer.
        let pm = Arc::new(Mutex::new(Piix4Pm::new(
            PCI_PM_SLOT,
            mapper.clone(),
            router.isa_line(ACPI_SCI_IRQ as usize),
            system.clone(),
            clock.clone(),
        )));
        pci.add(PCI_PM_SLOT.0, PCI_PM_SLOT.1, pm.clone())
            .map_err(pci_err)?;
        mapper.set_after_write(PCI_PM_SLOT.0, PCI_PM_SLOT.1, timer_notify.clone());
        timed.push(pm.clone());
        pio.insert(
            APM_PORT as u64,
            piix4_pm::APM_PORT_LEN,
            Arc::new(Mutex::new(ApmPorts(pm.clone()))),
        )?;
        pio.insert(
            ACPI_GPE0_PORT as u64,
            piix4_pm::GPE0_LEN,
            Arc::new(Mutex::new(Gpe0Block(pm.clone()))),
        )?;

        // Cirrus CL-GD5446 on 00:02.0: legacy ports and window, VRAM as a KVM slot.
        let vram = Vram::new((config.display.vram_mib as usize) << 20)
            .map_err(|e| VmmError::Device(e.to_string()))?;
        let vram_memory = vram.memory().clone();
        let rom = if config.linux_boot.is_none() {
            crate::firmware::load_cirrus_vgabios()?
        } else {
            Vec::new()
        };
        if !rom.is_empty() {
            mapper.set_direct(
                PCI_VGA_SLOT.0,
                PCI_VGA_SLOT.1,
                ROM_BAR,
                rom_bar(&vm, SLOT_ROM_FIRST, rom.clone()),
            );
        }
        let cirrus = Arc::new(Mutex::new(
            CirrusVga::new(vram, rom).map_err(|e| VmmError::Device(e.to_string()))?,
        ));
        pio.insert(
            VGA_PORT as u64,
            VGA_PORT_LEN,
            Arc::new(Mutex::new(CirrusPorts(cirrus.clone()))),
        )?;
        mmio.insert(
            VGA_WINDOW_START,
            VGA_WINDOW_SIZE,
            Arc::new(Mutex::new(CirrusWindow(cirrus.clone()))),
        )?;
        let linear_bar = Arc::new(CirrusLinearBar {
            card: cirrus.clone(),
            function: cirrus.clone(),
            slot: FramebufferSlot::new(vm.clone(), vram_memory),
            mmio: mmio.clone(),
            placed: Mutex::new(None),
        });
        mapper.set_direct(
            PCI_VGA_SLOT.0,
            PCI_VGA_SLOT.1,
            BAR_LINEAR,
            linear_bar.clone(),
        );
        pci.add(PCI_VGA_SLOT.0, PCI_VGA_SLOT.1, cirrus.clone())
            .map_err(pci_err)?;

        // Network cards on 00:03.0, 00:04.0, ... each with its NAT or TAP backend.
        let mut nics = Vec::new();
        for (index, nic) in config.nics.iter().enumerate() {
            let slot = PCI_NIC_FIRST_SLOT + index as u8;
            let mac = config.nic_mac(index);
            let irq = router.intx_line(slot, 1);
            let net_err = |e: crate::net::NetError| VmmError::Network {
                index,
                reason: e.to_string(),
            };
            let (sink, port) = NetBackend::channel().map_err(net_err)?;
            let (card, function, timed_card): CardParts = match nic.model {
                NicModel::E1000 => {
                    // The ROM BAR itself is served by the KVM slot set up below.
                    let c = Arc::new(Mutex::new(E1000::new(
                        mac,
                        ram.mem.clone(),
                        irq,
                        sink,
                        clock.clone(),
                        None,
                    )));
                    (c.clone(), c.clone(), c)
                }
                NicModel::Rtl8139 => {
                    let c = Arc::new(Mutex::new(Rtl8139::new(
                        mac,
                        ram.mem.clone(),
                        irq,
                        sink,
                        clock.clone(),
                    )));
                    (c.clone(), c.clone(), c)
                }
                NicModel::VirtioNet | NicModel::VirtioNetModern => {
                    let mode = if nic.model == NicModel::VirtioNet {
                        VirtioPciMode::Transitional
                    } else {
                        VirtioPciMode::Modern
                    };
                    let c = Arc::new(Mutex::new(VirtioNet::new(
                        mac,
                        ram.mem.clone(),
                        irq,
                        Arc::new(KvmMsi { vm: vm.clone() }),
                        sink,
                        clock.clone(),
                        mode,
                    )));
                    (c.clone(), c.clone(), c)
                }
            };
            lock(&card).set_link(nic.link_up);
            // Network boot: the card's iPXE ROM from the ipxe-qemu package, in a ROM BAR
            // that is a read-only KVM slot.
            if nic.boot_file.is_some() {
                let (name, ids) = match nic.model {
                    NicModel::E1000 => ("e1000", None),
                    NicModel::Rtl8139 => ("rtl8139", None),
                    // Debian's pxe-virtio.rom is built for 1af4:1041.
                    NicModel::VirtioNet => ("virtio", Some((0x1af4, 0x1000))),
                    NicModel::VirtioNetModern => ("virtio", None),
                };
                if let Some(mut image) = crate::firmware::load_nic_rom(name) {
                    if let Some((vendor, device)) = ids {
                        crate::firmware::patch_rom_ids(&mut image, vendor, device);
                    }
                    lock(&function)
                        .config_mut()
                        .set_rom_bar((image.len() as u64).next_power_of_two().max(2048));
                    mapper.set_direct(
                        slot,
                        0,
                        ROM_BAR,
                        rom_bar(&vm, SLOT_ROM_FIRST + 1 + index as u32, image),
                    );
                } else {
                    log::warn!(
                        "network card {index}: no iPXE ROM for {name} (install ipxe-qemu); network boot unavailable"
                    );
                }
            }
            pci.add(slot, 0, function).map_err(pci_err)?;
            mapper.set_after_write(slot, 0, timer_notify.clone());
            timed.push(timed_card);
            let backend = NetBackend::start(index, nic, card.clone(), port).map_err(net_err)?;
            nics.push(NicSlot { card, backend });
        }

        let pci = Arc::new(Mutex::new(pci));
        pio.insert(PCI_CONFIG_PORT as u64, PCI_CONFIG_PORT_LEN, pci.clone())?;

        // The BIOS area's accesses that no KVM slot satisfies.
        mmio.insert(
            BIOS_SHADOW_START,
            BIOS_SHADOW_END - BIOS_SHADOW_START,
            Arc::new(Mutex::new(BiosShadowWindow {
                map: memory.clone(),
            })),
        )?;

        // Direct Linux boot, if asked for.
        let linux_entry = load_configured_kernel(config, &ram)?;

        // vCPUs with a consistent topology.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for index in 0..config.cpus {
            // KVM gives each vCPU the APIC ID of its id.
            let vcpu = vm
                .create_vcpu(u64::from(topology.apic_id(index)))
                .map_err(VmmError::kvm("KVM_CREATE_VCPU"))?;
            vcpu.set_cpuid2(&cpuid_for(&supported, index, &topology))
                .map_err(VmmError::kvm("KVM_SET_CPUID2"))?;
            let reset_state = ResetState::capture(&vcpu)?;
            vcpus.push((vcpu, reset_state));
        }

        let coalesced = match vcpus.first() {
            Some((vcpu, _)) => CoalescedRing::new(
                &kvm,
                &vm,
                vcpu,
                &[(VGA_WINDOW_START, VGA_WINDOW_SIZE as u32)],
            )?
            .map(Arc::new),
            None => None,
        };

        let mut initial_irqchips = Vec::new();
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(VmmError::kvm("KVM_GET_IRQCHIP"))?;
            initial_irqchips.push(chip);
        }
        let initial_pit = vm.get_pit2().map_err(VmmError::kvm("KVM_GET_PIT2"))?;

        Ok(Machine {
            config: config.clone(),
            vm,
            memory,
            pio,
            mmio,
            vcpus,
            linux_entry,
            i8042,
            rtc,
            serial,
            fw_cfg,
            pci,
            irq_lines,
            interrupt_counts,
            clock,
            cirrus,
            linear_bar,
            ide,
            uhci,
            pm,
            tablet,
            usb_keyboard,
            timed,
            boot_order_after_reset,
            nics,
            coalesced,
            initial_irqchips,
            initial_pit,
            _resettables: vec![reset_control, port_a],
        })
    }

    /// Resets devices and the in-kernel interrupt controllers (vCPUs reset themselves).
    /// Call with all vCPUs parked.
    pub fn reset_devices(&self) -> Result<()> {
        for chip in &self.initial_irqchips {
            self.vm
                .set_irqchip(chip)
                .map_err(VmmError::kvm("KVM_SET_IRQCHIP"))?;
        }
        self.vm
            .set_pit2(&self.initial_pit)
            .map_err(VmmError::kvm("KVM_SET_PIT2"))?;
        for line in &self.irq_lines {
            line.level.store(false, Ordering::SeqCst);
        }
        lock(&self.pci).reset();
        lock(&self.i8042).reset();
        lock(&self.rtc).reset();
        lock(&self.serial).reset();
        lock(&self.fw_cfg).reset();
        for dev in &self._resettables {
            lock(dev).machine_reset();
        }
        // A reset boots the kernel again from a fresh copy.
        load_configured_kernel(&self.config, self.memory.ram())?;
        Ok(())
    }

    /// Composes the screen into the frame pipeline: applies queued VGA-window writes, gives
    /// the card the time (text blink), and hands it the pages the guest wrote through the
    /// linear framebuffer. Returns whether the frame changed.
    pub(crate) fn refresh_display(&self, pipeline: &DisplayShared, now_ns: u64) -> bool {
        if let Some(ring) = &self.coalesced {
            ring.drain(&self.mmio);
        }
        let guest_dirty = self.display_guest_dirty();
        lock(&self.cirrus).vga_mut().set_time_ns(now_ns);
        let card: &Mutex<dyn DisplayDevice> = &*self.cirrus;
        pipeline.refresh(card, guest_dirty.as_ref())
    }

    /// VRAM pages the guest wrote through the linear framebuffer since the last call
    /// (KVM's dirty log), when the framebuffer is mapped as a memory slot. Also switches
    /// the framebuffer between direct and trapped access as the card requires.
    fn display_guest_dirty(&self) -> Option<DirtyPages> {
        self.linear_bar.sync();
        let bitmap = self.linear_bar.slot.take_dirty_log()?;
        let pages = (self.linear_bar.slot.size() as usize).div_ceil(vmm_devices::vram::PAGE_SIZE);
        let mut dirty = DirtyPages::new(pages);
        dirty.merge_bitmap(&bitmap);
        Some(dirty)
    }

    /// After the first reset of a "CD once" start, the firmware boots from disk.
    pub fn apply_boot_order_after_reset(&mut self) {
        if let Some(order) = self.boot_order_after_reset.take() {
            if let Err(e) =
                lock(&self.fw_cfg).set_file("bootorder", fw_cfg::bootorder_bytes(&order))
            {
                log::warn!("fw_cfg bootorder: {e}");
            }
        }
    }

    /// Writes the CMOS NVRAM (and guest clock offset) where the config keeps it.
    pub fn save_nvram(&self) -> Result<()> {
        let Some(path) = &self.config.nvram else {
            return Ok(());
        };
        let state = lock(&self.rtc).state();
        let text = toml::to_string(&state).unwrap_or_default();
        crate::config::write_atomically(path, text.as_bytes()).map_err(|source| VmmError::Nvram {
            path: path.clone(),
            source,
        })
    }
}

/// The fw_cfg `bootorder` for this start, and the one to switch to after the first reset
/// when the order is "CD once".
fn boot_orders(config: &VmConfig) -> (Vec<String>, Option<Vec<String>>) {
    let paths = |kind: DriveKind| -> Vec<String> {
        config
            .drives
            .iter()
            .enumerate()
            .filter(|(_, d)| d.kind == kind)
            .map(|(i, _)| {
                let (channel, unit) = ide_position(i);
                ide_boot_path(channel, unit)
            })
            .collect()
    };
    let disk_first: Vec<String> = paths(DriveKind::Disk)
        .into_iter()
        .chain(paths(DriveKind::Cdrom))
        .collect();
    let cd_first: Vec<String> = paths(DriveKind::Cdrom)
        .into_iter()
        .chain(paths(DriveKind::Disk))
        .collect();
    match config.boot_order {
        BootOrder::Disk => (disk_first, None),
        BootOrder::Cd => (cd_first, None),
        BootOrder::CdOnce => (cd_first, Some(disk_first)),
    }
}

/// The Cirrus card's BAR0: VRAM as a dirty-logged KVM memory slot while the card allows
/// direct access, otherwise trapped to the card; the part above VRAM (the blit source
/// window) is always trapped.
pub struct CirrusLinearBar {
    card: Arc<Mutex<CirrusVga>>,
    function: SharedPciFunction,
    pub slot: FramebufferSlot,
    mmio: Arc<Bus>,
    /// Where the BAR is decoded and whether VRAM is mapped directly.
    placed: Mutex<Option<(BarRegion, bool)>>,
}

/// A ROM BAR served by a read-only KVM slot.
struct RomBar {
    slot: RomSlot,
    mapped: Mutex<bool>,
}

impl DirectBar for RomBar {
    fn map(&self, region: BarRegion) -> bool {
        match self.slot.map(region.base, region.size) {
            Ok(()) => {
                *lock(&self.mapped) = true;
                true
            }
            Err(e) => {
                log::warn!("option ROM not mapped directly: {e}");
                false
            }
        }
    }

    fn unmap(&self, _region: BarRegion) {
        let mut mapped = lock(&self.mapped);
        if *mapped {
            if let Err(e) = self.slot.unmap() {
                log::warn!("option ROM unmap: {e}");
            }
            *mapped = false;
        }
    }
}

fn rom_bar(vm: &Arc<VmFd>, slot: u32, image: Vec<u8>) -> Arc<RomBar> {
    Arc::new(RomBar {
        slot: RomSlot::new(vm.clone(), slot, image),
        mapped: Mutex::new(false),
    })
}

/// A BAR's bus accesses at `offset_base` + offset.
struct OffsetBarDevice {
    function: SharedPciFunction,
    bar: usize,
    offset_base: u64,
}

impl BusDevice for OffsetBarDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.function).bar_read(self.bar, self.offset_base + offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.function).bar_write(self.bar, self.offset_base + offset, data);
    }
}

impl CirrusLinearBar {
    fn insert(&self, region: BarRegion, direct: bool) -> bool {
        let vram = self.slot.size().min(region.size);
        if direct {
            if let Err(e) = self.slot.map(region.base) {
                log::warn!("cirrus: direct framebuffer mapping failed: {e}");
                return self.insert(region, false);
            }
            if region.size > vram {
                let tail = OffsetBarDevice {
                    function: self.function.clone(),
                    bar: region.bar,
                    offset_base: vram,
                };
                if let Err(e) = self.mmio.insert(
                    region.base + vram,
                    region.size - vram,
                    Arc::new(Mutex::new(tail)),
                ) {
                    log::warn!("cirrus: BAR0 window not mapped: {e}");
                }
            }
            true
        } else {
            let device = PciBarDevice::new(self.function.clone(), region.bar);
            if let Err(e) = self
                .mmio
                .insert(region.base, region.size, Arc::new(Mutex::new(device)))
            {
                log::warn!("cirrus: BAR0 not mapped: {e}");
            }
            false
        }
    }

    fn remove(&self, region: BarRegion, direct: bool) {
        if direct {
            let _ = self.slot.unmap();
            let vram = self.slot.size().min(region.size);
            if region.size > vram {
                let _ = self.mmio.remove(region.base + vram);
            }
        } else {
            let _ = self.mmio.remove(region.base);
        }
    }

    /// Switches between direct and trapped access when the card's mode asks for it.
    pub fn sync(&self) {
        let mut placed = lock(&self.placed);
        let Some((region, direct)) = *placed else {
            return;
        };
        let want = lock(&self.card).linear_direct_ok();
        if want != direct {
            self.remove(region, direct);
            let now = self.insert(region, want);
            *placed = Some((region, now));
        }
    }
}

impl DirectBar for CirrusLinearBar {
    fn map(&self, region: BarRegion) -> bool {
        let direct = lock(&self.card).linear_direct_ok();
        let now = self.insert(region, direct);
        *lock(&self.placed) = Some((region, now));
        true
    }

    fn unmap(&self, region: BarRegion) {
        if let Some((placed, direct)) = lock(&self.placed).take() {
            if placed == region {
                self.remove(region, direct);
            }
        }
    }
}

impl Machine {
    /// Plugs a USB HID device into its root port, or unplugs it (the guest sees a connect
    /// change on the port).
    pub fn set_usb_device(&mut self, device: crate::vm::UsbDevice, plugged: bool) -> Result<()> {
        use crate::vm::UsbDevice;
        let (port, slot) = match device {
            UsbDevice::Tablet => (USB_TABLET_PORT, &mut self.tablet),
            UsbDevice::Keyboard => (USB_KEYBOARD_PORT, &mut self.usb_keyboard),
        };
        let mut uhci = lock(&self.uhci);
        if plugged == slot.is_some() {
            return Ok(());
        }
        if plugged {
            let hid = match device {
                UsbDevice::Tablet => UsbHid::tablet(),
                UsbDevice::Keyboard => UsbHid::keyboard(),
            };
            let input = hid.input();
            uhci.attach(port, Box::new(hid))
                .map_err(|e| VmmError::Device(format!("USB: {e}")))?;
            *slot = Some(input);
        } else {
            uhci.detach(port);
            *slot = None;
        }
        Ok(())
    }

    /// Flushes and closes every drive's image (so qcow2 metadata is written and the image
    /// locks are released) before the machine goes away.
    pub fn close_drives(&self) {
        let ide = lock(&self.ide);
        for channel in 0..2 {
            for unit in 0..2 {
                let _ = ide.detach(channel, unit);
            }
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.close_drives();
        // The port bus holds the PCI root, whose BAR mapper holds the buses: empty them so
        // that every device (and what it owns: images, sockets, VRAM) is dropped with the
        // machine.
        self.pio.clear();
        self.mmio.clear();
    }
}

/// Loads the configured kernel for direct Linux boot, if there is one.
fn load_configured_kernel(config: &VmConfig, ram: &GuestRam) -> Result<Option<LinuxEntry>> {
    config
        .linux_boot
        .as_ref()
        .map(|lb| {
            load_linux(
                &ram.mem,
                ram.below_4g(),
                &ram.e820(),
                &lb.kernel,
                lb.initrd.as_deref(),
                &lb.cmdline,
            )
        })
        .transpose()
}

fn load_nvram(path: &std::path::Path) -> Result<Option<RtcState>> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map(Some).map_err(|e| {
            VmmError::Device(format!(
                "NVRAM file {} is damaged ({}); move it away to start with fresh CMOS settings",
                path.display(),
                e.message()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(VmmError::ReadFile {
            what: "NVRAM",
            path: path.to_path_buf(),
            source,
        }),
    }
}

pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_open_errors_say_what_to_do() {
        let p = PathBuf::from("/dev/kvm");
        let e = kvm_open_error(p.clone(), libc::EACCES).to_string();
        assert!(e.contains("kvm' group") && e.contains("usermod"), "{e}");
        let e = kvm_open_error(p.clone(), libc::ENOENT).to_string();
        assert!(e.contains("does not exist") && e.contains("VT-x"), "{e}");
        let e = kvm_open_error(p, libc::EIO).to_string();
        assert!(e.contains("cannot use KVM"), "{e}");
    }

    #[test]
    fn missing_kvm_node_is_reported() {
        let options = EngineOptions {
            kvm_path: PathBuf::from("/nonexistent/kvm"),
        };
        assert!(matches!(
            open_kvm(&options),
            Err(VmmError::KvmMissing { .. })
        ));
    }
}
