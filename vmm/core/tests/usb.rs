//! The UHCI controller (PCI 00:01.2) with its USB keyboard and tablet, end to end against
//! real guest code: SeaBIOS from Debian's seabios package enumerates the controller and
//! the keyboard (and leaves the tablet alone: it is not a boot-protocol device), an Esc
//! typed through the USB keyboard opens SeaBIOS's boot menu, `InputHandle` routes events
//! to the devices the VM has, and GRUB's own UHCI and USB keyboard drivers (a rescue ISO
//! built here with grub-mkrescue) take Down and Enter from the USB keyboard to pick the
//! second menu entry. The firmware reads the CD's identify data with `rep insw`, so a guest
//! program checks that string I/O reaches the IDE data port too.
//!
//! Not covered here: the tablet's reports reaching a guest driver (no firmware or boot
//! loader here drives a non-boot HID device; the device unit tests cover its reports).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use vmm::{BootOrder, CharOutput, DriveConfig, DriveKind, InputRoute, VmConfig, VmHandle};

const KEY_ESC: u16 = 1;
const KEY_ENTER: u16 = 28;
const KEY_A: u16 = 30;
const KEY_DOWN: u16 = 108;

/// GRUB under KVM here shows its menu after about 36 s; allow much more.
const GRUB_TIMEOUT: Duration = Duration::from_secs(300);

/// SeaBIOS with its boot menu offered for a long time, the debug console into `dir`.
fn seabios_config(dir: &Path, name: &str, usb_keyboard: bool, usb_tablet: bool) -> VmConfig {
    let mut config = common::seabios_config(dir, name, PathBuf::from(SEABIOS), 128);
    config.firmware.boot_menu = true;
    config.firmware.boot_menu_timeout_ms = Some(60_000);
    config.input.usb_keyboard = usb_keyboard;
    config.input.usb_tablet = usb_tablet;
    config
}

/// What SeaBIOS prints when a USB transfer on the controller goes wrong.
const SEABIOS_USB_ERRORS: [&str; 5] = [
    "Timeout on wait_pipe",
    "wait_td error",
    "USB transmission failed",
    "Unable to configure",
    "No usb hid intr in?",
];

#[test]
fn seabios_enumerates_uhci_and_the_usb_keyboard_but_not_the_tablet() {
    if require_kvm().is_none() || require_seabios().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = seabios_config(dir.path(), "usb-enum", true, true);
    let (vm, log) = start_until_debugcon_shows(config, "Press ESC for boot menu");
    let text = read_text(&log);
    for expected in [
        "PCI: init bdf=00:01.2 id=8086:7020",
        "UHCI init on dev 00:01.2",
        "USB keyboard initialized",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // SeaBIOS's HID driver takes only boot-protocol devices; the tablet (interface
    // subclass 0, like QEMU's usb-tablet) is skipped without a message.
    assert!(!text.contains("USB mouse"), "{text}");
    for error in SEABIOS_USB_ERRORS {
        assert!(!text.contains(error), "{error:?} in:\n{text}");
    }
    vm.power_off().unwrap();
}

#[test]
fn esc_on_the_usb_keyboard_opens_the_seabios_boot_menu() {
    if require_kvm().is_none() || require_seabios().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = seabios_config(dir.path(), "usb-esc", true, false);
    let (vm, log) = start_until_debugcon_shows(config, "Press ESC for boot menu");
    assert!(read_text(&log).contains("USB keyboard initialized"));
    // The key goes to the USB keyboard only: the PS/2 keyboard never sees it.
    assert_eq!(vm.input().tap(KEY_ESC), InputRoute::UsbKeyboard);
    assert!(
        wait_for_text(&log, "Select boot device", LONG),
        "Esc through the USB keyboard did not open the boot menu:\n{}",
        read_text(&log)
    );
    let stats = vm.stats();
    assert_eq!(
        stats.interrupts.get(1).copied().unwrap_or(0),
        0,
        "the key must not have come through the PS/2 keyboard (IRQ 1): {stats:?}"
    );
    vm.power_off().unwrap();
}

#[test]
fn input_goes_to_the_devices_the_vm_has() {
    if require_kvm().is_none() || require_seabios().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();

    // No USB devices: keys to PS/2, absolute positions nowhere, relative motion to PS/2.
    let vm = VmHandle::create(seabios_config(dir.path(), "plain", false, false)).unwrap();
    vm.start().unwrap();
    let input = vm.input();
    assert!(!input.has_absolute_pointer());
    assert_eq!(input.key(KEY_A, true), InputRoute::Ps2Keyboard);
    assert_eq!(input.key(KEY_A, false), InputRoute::Ps2Keyboard);
    assert_eq!(input.pointer_absolute(100, 200, 1), InputRoute::Dropped);
    assert_eq!(input.pointer_relative(3, -2, 0, 0), InputRoute::Ps2Mouse);
    vm.power_off().unwrap();
    assert_eq!(input.key(KEY_A, true), InputRoute::Dropped);
    assert_eq!(input.pointer_relative(1, 1, 0, 0), InputRoute::Dropped);
    drop(vm);

    // The tablet only: absolute positions to it, keys still to PS/2.
    let vm = VmHandle::create(seabios_config(dir.path(), "tablet", false, true)).unwrap();
    vm.start().unwrap();
    let input = vm.input();
    assert!(input.has_absolute_pointer());
    assert_eq!(input.pointer_absolute(0x7fff, 0, 0), InputRoute::UsbTablet);
    // Out-of-range coordinates are clamped, not refused.
    assert_eq!(
        input.pointer_absolute(u16::MAX, u16::MAX, 0x1f),
        InputRoute::UsbTablet
    );
    assert_eq!(input.tap(KEY_A), InputRoute::Ps2Keyboard);
    assert_eq!(input.pointer_relative(1, 1, 1, 0), InputRoute::Ps2Mouse);
    vm.power_off().unwrap();
    assert!(!input.has_absolute_pointer());
    assert_eq!(input.pointer_absolute(1, 1, 0), InputRoute::Dropped);
    drop(vm);

    // Both: keys to the USB keyboard.
    let vm = VmHandle::create(seabios_config(dir.path(), "both", true, true)).unwrap();
    vm.start().unwrap();
    let input = vm.input();
    assert_eq!(input.tap(KEY_A), InputRoute::UsbKeyboard);
    assert_eq!(input.pointer_absolute(5, 5, 0), InputRoute::UsbTablet);
    vm.power_off().unwrap();
}

/// The GRUB script: serial console first, then every module the script needs, and GRUB's
/// UHCI driver last: loading a native controller driver stops GRUB's BIOS disk access
/// (`grub_stop_disk_firmware`), so no module can be read from the CD after it. The `usb`
/// command (usbtest) enumerates the bus at once and lists what it finds; the USB keyboard
/// then registers itself as an active input terminal (`usb_keyboard0`).
const GRUB_CFG: &str = r#"serial --unit=0 --speed=115200
terminal_output serial console
insmod echo
insmod sleep
insmod terminal
insmod usbtest
insmod usb_keyboard
insmod uhci
usb
echo usb-e2e-grub-ready
terminal_input
set timeout=-1
menuentry "usb-e2e first entry" {
  echo usb-e2e-marker-FIRST
  sleep 3600
}
menuentry "usb-e2e second entry" {
  echo usb-e2e-marker-SECOND
  sleep 3600
}
"#;

#[test]
fn grub_usb_keyboard_driver_picks_the_second_menu_entry() {
    if require_kvm().is_none() || require_seabios().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(iso) = grub_rescue_iso(dir.path(), "grub-usb.iso", GRUB_CFG, "uhci.mod") else {
        return;
    };
    let serial = dir.path().join("grub.serial");
    let mut config = VmConfig {
        name: "grub-usb".into(),
        memory_mib: 256,
        serial: CharOutput::File(serial.clone()),
        debugcon: CharOutput::File(dir.path().join("grub-usb.debugcon")),
        drives: vec![DriveConfig {
            kind: DriveKind::Cdrom,
            path: Some(iso),
            read_only: true,
        }],
        boot_order: BootOrder::Cd,
        ..VmConfig::default()
    };
    config.firmware.bios = Some(PathBuf::from(SEABIOS));
    config.input.usb_keyboard = true;
    let vm = VmHandle::create(config).unwrap();
    vm.start().unwrap();

    assert!(
        wait_for_text(&serial, "usb-e2e second entry", GRUB_TIMEOUT),
        "GRUB's menu did not appear on the serial port; state {:?}\nserial:\n{}\nscreen:\n{}\ndebugcon:\n{}",
        vm.state(),
        read_text(&serial),
        vm.display().text_screen().unwrap_or_default(),
        read_text(&dir.path().join("grub-usb.debugcon"))
    );
    let before_keys = read_text(&serial);
    assert!(before_keys.contains("usb-e2e-grub-ready"), "{before_keys}");
    // GRUB's `usb` command lists the boot keyboard it enumerated on the UHCI root port,
    // and its driver became an input terminal.
    for expected in [
        "Class: (0x03) HID, Subclass: 0x01",
        "Endpoint #1: IN, max packed size: 8, transfer type: Interrupt",
        "usb_keyboard0",
    ] {
        assert!(
            before_keys.contains(expected),
            "GRUB did not take the USB keyboard ({expected:?} missing):\n{before_keys}"
        );
    }
    assert!(!before_keys.contains("usb-e2e-marker"), "{before_keys}");

    assert_eq!(vm.input().tap(KEY_DOWN), InputRoute::UsbKeyboard);
    // Let GRUB redraw the highlight before Enter (its menu polls between redraws).
    let len = before_keys.len();
    wait_until_grows(&serial, len, Duration::from_secs(60));
    assert_eq!(vm.input().tap(KEY_ENTER), InputRoute::UsbKeyboard);
    assert!(
        wait_for_text(&serial, "usb-e2e-marker-SECOND", GRUB_TIMEOUT),
        "Down + Enter on the USB keyboard did not start the second entry:\n{}",
        read_text(&serial)
    );
    assert!(!read_text(&serial).contains("usb-e2e-marker-FIRST"));
    vm.power_off().unwrap();
}

/// Waits (generously, never asserting) until `file` is longer than `len` bytes and then
/// a moment more for the rest of a redraw.
fn wait_until_grows(file: &Path, len: usize, timeout: Duration) {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if std::fs::metadata(file)
            .map(|m| m.len() as usize)
            .unwrap_or(0)
            > len
        {
            std::thread::sleep(Duration::from_millis(500));
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The GRUB test above needs SeaBIOS to find the CD-ROM, which reads IDENTIFY PACKET
/// DEVICE data with `rep insw`: KVM hands such string I/O to the engine as one exit of
/// `count` elements. This guest program does the same on the primary master ATAPI drive
/// and prints word 0 of the identify data (0x85c0: ATAPI CD-ROM, removable) and the status
/// afterwards (DRQ clear once all 256 words were read).
#[test]
fn rep_insw_reads_the_ide_identify_data_the_firmware_needs() {
    if require_kvm().is_none() || require_nasm().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let body = r#"
start:
    mov dx, 0x1f6
    mov al, 0xa0
    out dx, al
    mov dx, 0x1f7
    mov al, 0xa1            ; IDENTIFY PACKET DEVICE
    out dx, al
    in al, dx
    call hex8
    PUTC ' '
    mov ax, 0x1000
    mov es, ax
    xor di, di
    mov cx, 256
    mov dx, 0x1f0
    cld
    rep insw
    mov ax, [es:0]
    call hex16
    PUTC ' '
    mov dx, 0x1f7
    in al, dx
    call hex8
    PUTS done
    jmp halt_forever
done: db ' done', 10, 0
"#;
    let mut config = program_config(dir.path(), "rep-insw", body);
    config.drives = vec![DriveConfig {
        kind: DriveKind::Cdrom,
        path: None,
        read_only: true,
    }];
    let log = debugcon_path(&config);
    let vm = VmHandle::create(config).unwrap();
    vm.start().unwrap();
    assert!(wait_for_text(&log, " done", LONG), "{}", read_text(&log));
    let text = read_text(&log);
    // Status 0x58 after the command (DRQ), then word 0 = 0x85c0 and DRQ clear.
    assert!(
        text.starts_with("58 85c0 "),
        "rep insw did not read the identify data: {text}"
    );
    let status = u8::from_str_radix(text.get(8..10).unwrap_or(""), 16).unwrap();
    assert_eq!(
        status & 0x88,
        0,
        "BSY/DRQ still set after 256 words: {text}"
    );
    vm.power_off().unwrap();
}
