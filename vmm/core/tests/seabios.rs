//! SeaBIOS from Debian's seabios package boots on the engine: it recognises QEMU/KVM,
//! reads fw_cfg, builds its e820 map from ours, brings up both vCPUs and the PS/2
//! keyboard, reaches boot selection, and an Esc typed through `InputHandle` opens its
//! boot menu.

mod common;

use common::*;
use vmm::{CharOutput, InputRoute, VmConfig, VmState};

const KEY_ESC: u16 = 1;

#[test]
fn seabios_reaches_boot_selection_and_esc_opens_the_boot_menu() {
    if require_kvm().is_none() {
        return;
    }
    let Some(bios) = require_seabios() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("seabios.log");
    let mut config = VmConfig {
        name: "seabios".into(),
        // More than fits below the PCI hole, so RAM continues above 4 GiB.
        memory_mib: 4608,
        cpus: 2,
        debugcon: CharOutput::File(log.clone()),
        nvram: Some(dir.path().join("nvram.toml")),
        ..VmConfig::default()
    };
    config.firmware.bios = Some(bios);
    config.firmware.boot_menu = true;
    config.firmware.boot_menu_timeout_ms = Some(30_000);
    let (vm, _) = start_until_debugcon_shows(config, "Press ESC for boot menu");
    assert_eq!(vm.input().tap(KEY_ESC), InputRoute::Ps2Keyboard);
    assert!(
        wait_for_text(&log, "Select boot device", LONG),
        "{}",
        read_text(&log)
    );

    let text = read_text(&log);
    for expected in [
        "SeaBIOS (version",
        "Running on QEMU (i440fx)",
        "Running on KVM",
        "Found QEMU fw_cfg",
        "QEMU fw_cfg DMA interface supported",
        "qemu/e820: addr 0x0000000000000000 len 0x00000000e0000000 [RAM]",
        "qemu/e820: addr 0x0000000100000000 len 0x0000000040000000 [RAM]",
        "PCI: init bdf=00:00.0 id=8086:1237",
        "PCI: init bdf=00:01.0 id=8086:7000",
        "Found 2 cpu(s) max supported 2 cpu(s)",
        "PCI: init bdf=00:01.3 id=8086:7113",
        "ACPI DSDT=",
        "PS2 keyboard initialized",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    let stats = vm.stats();
    assert_eq!(stats.vcpus.len(), 2);
    assert!(
        stats.interrupts[1] > 0,
        "keyboard IRQ 1 never raised: {stats:?}"
    );
    assert_eq!(vm.state(), VmState::Running);
    vm.power_off().unwrap();
    assert!(dir.path().join("nvram.toml").is_file(), "NVRAM not saved");
}

/// Two single-core sockets (CPUID tells two packages, no HTT): SeaBIOS finds both vCPUs.
/// (Sparse APIC IDs need at least 3 vCPUs, more than these 2-core hosts may run; the
/// packing is unit-tested in vcpu.rs and config.rs.)
#[test]
fn seabios_finds_every_vcpu_of_a_two_socket_topology() {
    if require_kvm().is_none() {
        return;
    }
    let Some(bios) = require_seabios() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = seabios_config(dir.path(), "topology", bios, 128);
    config.cpus = 2;
    config.topology = Some(vmm::CpuTopology {
        sockets: 2,
        cores: 1,
        threads: 1,
    });
    let (vm, log) = start_until_debugcon_shows(config, "cpu(s) max supported");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let text = read_text(&log);
    assert!(
        text.contains("Found 2 cpu(s) max supported 2 cpu(s)"),
        "{text}"
    );
    assert_eq!(vm.stats().vcpus.len(), 2);
    vm.power_off().unwrap();
}

/// Network boot: with a boot file configured, each card model carries Debian's iPXE ROM
/// (the transitional virtio-net one with its PCI IDs patched) and SeaBIOS runs it. (iPXE
/// itself cannot run under this host's KVM, see bench/ipxe_net.py.)
#[test]
fn seabios_runs_the_ipxe_rom_of_every_card_model() {
    if require_kvm().is_none() {
        return;
    }
    let Some(bios) = require_seabios() else {
        return;
    };
    if !std::path::Path::new("/usr/lib/ipxe/qemu/pxe-e1000.rom").is_file()
        && missing("iPXE ROMs (Debian package ipxe-qemu)").is_none()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for model in [
        vmm::NicModel::E1000,
        vmm::NicModel::Rtl8139,
        vmm::NicModel::VirtioNet,
        vmm::NicModel::VirtioNetModern,
    ] {
        let name = format!("{model:?}").to_lowercase();
        let mut config = seabios_config(dir.path(), &name, bios.clone(), 128);
        config.nics = vec![vmm::NicConfig {
            model,
            mac: None,
            link_up: true,
            backend: vmm::NetBackendConfig::Nat,
            forwards: vec![],
            boot_file: Some("http://10.0.2.2/boot.ipxe".into()),
        }];
        // The VGA BIOS is the first option ROM (c000); the card's is the next one.
        let (vm, log) = start_until_debugcon_shows(config, "Running option rom at ca00");
        let text = read_text(&log);
        assert!(
            text.contains("bdf=00:03.0  bar 6"),
            "{model:?}: no ROM BAR mapped\n{text}"
        );
        vm.power_off().unwrap();
    }
}
