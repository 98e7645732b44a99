//! Devices plugged in and out while the VM runs: USB tablet and keyboard, and the network
//! cable (link state reaches the card and the statistics).

mod common;

use common::*;
use vmm::{InputRoute, NicConfig, NicModel, UsbDevice, VmHandle};

#[test]
fn usb_devices_plug_and_unplug_while_running_and_input_follows() {
    if require_kvm().is_none() || require_nasm().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let body = r#"
start:
    cli
    PUTS ready
.halt:
    hlt
    jmp .halt
ready: db "READY", 10, 0
"#;
    let mut config = program_config(dir.path(), "hotplug", body);
    config.nics = vec![NicConfig {
        model: NicModel::E1000,
        mac: None,
        link_up: true,
        backend: vmm::NetBackendConfig::Nat,
        forwards: vec![],
        boot_file: None,
    }];
    let vm = VmHandle::create(config.clone()).unwrap();
    vm.start().unwrap();
    assert!(wait_for_text(&debugcon_path(&config), "READY", LONG));
    let input = vm.input();
    assert_eq!(input.pointer_absolute(10, 10, 0), InputRoute::Dropped);
    assert_eq!(input.key(30, true), InputRoute::Ps2Keyboard);
    input.key(30, false);

    vm.set_usb_device(UsbDevice::Tablet, true).unwrap();
    assert!(input.has_absolute_pointer());
    assert_eq!(input.pointer_absolute(0x7fff, 0, 1), InputRoute::UsbTablet);
    vm.set_usb_device(UsbDevice::Keyboard, true).unwrap();
    assert_eq!(input.key(30, true), InputRoute::UsbKeyboard);
    input.key(30, false);
    // Plugging twice is harmless.
    vm.set_usb_device(UsbDevice::Keyboard, true).unwrap();

    vm.set_usb_device(UsbDevice::Tablet, false).unwrap();
    vm.set_usb_device(UsbDevice::Keyboard, false).unwrap();
    assert!(!input.has_absolute_pointer());
    assert_eq!(input.pointer_absolute(1, 1, 0), InputRoute::Dropped);
    assert_eq!(input.key(30, true), InputRoute::Ps2Keyboard);
    input.key(30, false);

    // The network cable.
    assert!(vm.stats().nics[0].link_up);
    vm.set_nic_link(0, false).unwrap();
    assert!(!vm.stats().nics[0].link_up);
    vm.set_nic_link(0, true).unwrap();
    assert!(vm.stats().nics[0].link_up);
    let e = vm.set_nic_link(3, false).unwrap_err().to_string();
    assert!(e.contains("no network card 3"), "{e}");

    // The choice is kept for the next start of this handle.
    vm.set_usb_device(UsbDevice::Tablet, true).unwrap();
    vm.power_off().unwrap();
    vm.start().unwrap();
    assert!(input.has_absolute_pointer());
    vm.power_off().unwrap();
}
