//! Storage end to end: the PIIX3 IDE controller with real images behind it, driven by real
//! guest code.
//!
//! - A GRUB rescue ISO (built here with `grub-mkrescue`) boots from the IDE CD-ROM through
//!   SeaBIOS's El Torito support; its menu is driven over COM1.
//! - A boot sector on disk 0 writes a pattern to the second disk (a qcow2 image) through
//!   SeaBIOS's int 13h extensions; after a power-off a new VM reads it back, and
//!   `qemu-img check`/`qemu-io` confirm the image and the data.
//! - CD-ROM media change while the VM runs, with its error cases.
//! - Images that cannot be opened (missing, truncated, unknown qcow2 feature, locked) fail
//!   `VmHandle::create` with a message naming the file, and are left untouched.
//!
//! Not covered here: ATA DMA and ATAPI commands from guest code of our own (the IDE unit
//! tests in vmm-devices do that), guest-visible media-change events.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use vmm::storage::{create, ImageBackend, ImageFormat};
use vmm::{BootOrder, CharOutput, DriveConfig, DriveKind, VmConfig, VmHandle, VmState};

/// Booting GRUB from the CD took about 36 s under QEMU+KVM on the nested-KVM hosts.
const GRUB_TIMEOUT: Duration = Duration::from_secs(300);

fn drive(kind: DriveKind, path: Option<PathBuf>) -> DriveConfig {
    DriveConfig {
        kind,
        path,
        read_only: false,
    }
}

/// A config that boots SeaBIOS with its debug console and COM1 into `dir`.
fn seabios_serial_config(dir: &Path, name: &str, bios: PathBuf, memory_mib: u64) -> VmConfig {
    let mut config = seabios_config(dir, name, bios, memory_mib);
    config.serial = CharOutput::File(dir.join(format!("{name}.serial")));
    config
}

// ---------------------------------------------------------------------------------------
// 1. GRUB rescue ISO from the IDE CD-ROM, menu over the serial port.

const GRUB_CFG: &str = r#"serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=30
set default=0
menuentry "entry-alpha" {
    echo MARKER-ALPHA
    sleep 600
}
menuentry "entry-beta" {
    echo MARKER-BETA
    sleep 600
}
"#;

/// The GRUB rescue ISO, built once per test run (None: a tool is missing, reported).
fn grub_iso() -> Option<PathBuf> {
    static ISO: OnceLock<Option<PathBuf>> = OnceLock::new();
    ISO.get_or_init(|| {
        // Kept for the whole test run (the process ends with the tests).
        let dir = tempfile::tempdir().unwrap().keep();
        grub_rescue_iso(&dir, "grub-rescue.iso", GRUB_CFG, "cdboot.img")
    })
    .clone()
}

#[test]
fn grub_rescue_iso_boots_from_the_ide_cdrom_and_its_menu_obeys_the_serial_port() {
    if require_kvm().is_none() {
        return;
    }
    let Some(bios) = require_seabios() else {
        return;
    };
    let Some(iso) = grub_iso() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = seabios_serial_config(dir.path(), "grub", bios, 256);
    config.drives = vec![
        drive(
            DriveKind::Disk,
            Some(raw_disk(dir.path(), "empty.img", &[])),
        ),
        drive(DriveKind::Cdrom, None),
        drive(DriveKind::Cdrom, Some(iso)),
    ];
    config.boot_order = BootOrder::Cd;
    let serial = dir.path().join("grub.serial");
    let vm = VmHandle::create(config.clone()).unwrap();
    vm.start().unwrap();

    let menu_shown = wait_for_text(&serial, "entry-beta", GRUB_TIMEOUT);
    assert!(
        menu_shown,
        "no GRUB menu on the serial port; state {:?}\nserial: {}\ndebugcon: {}",
        vm.state(),
        read_text(&serial),
        output_of(&config)
    );
    let text = read_text(&serial);
    assert!(text.contains("entry-alpha"), "{text}");
    assert!(
        !text.contains("MARKER-"),
        "an entry ran before a key: {text}"
    );
    // Down to the second entry (VT100 cursor down), then Enter.
    assert_eq!(vm.input().serial_input(b"\x1b[B"), 3);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(vm.input().serial_input(b"\r"), 1);
    assert!(
        wait_for_text(&serial, "MARKER-BETA", GRUB_TIMEOUT),
        "entry-beta did not run; state {:?}\nserial: {}",
        vm.state(),
        read_text(&serial)
    );
    assert!(!read_text(&serial).contains("MARKER-ALPHA"));
    let stats = vm.stats();
    // Drives in attach order: disk (0:0), empty CD (0:1), GRUB CD (1:0).
    assert_eq!(stats.disks.len(), 3, "{stats:?}");
    assert!(
        stats.disks[2].read_bytes > 64 * 1024,
        "GRUB's modules were read from the CD: {stats:?}"
    );
    assert_eq!(stats.disks[2].write_bytes, 0);
    assert_eq!(stats.disks[1].read_bytes, 0);
    assert_eq!(vm.state(), VmState::Running);
    vm.power_off().unwrap();
}

// ---------------------------------------------------------------------------------------
// 2. A guest writes the second disk through int 13h; the data survives a power-off.

/// Offset of the mode byte in the boot sector: 0 = write and check, 1 = read and print,
/// 2 = write one sector per 64 KiB cluster, round and round, forever.
const MODE_OFFSET: usize = 509;
const PATTERN: u8 = 0x5a;
const PATTERN_LBA: u64 = 100;

const BOOT_SECTOR: &str = r#"
bits 16
org 0x7c00
%define DEBUGCON 0x402
%define BUF 0x1000
start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    cld
    mov si, msg_boot
    call puts
    ; int 13h extensions present on drive 0x81?
    mov ah, 0x41
    mov bx, 0x55aa
    mov dl, 0x81
    int 0x13
    jc fail_edd
    cmp bx, 0xaa55
    jne fail_edd
    cmp byte [mode], 2
    je forever
    cmp byte [mode], 0
    jne verify
    ; Write PATTERN to LBA 100 of drive 0x81.
    mov di, BUF
    mov cx, 512
    mov al, 0x5a
    rep stosb
    mov word [dap_count], 1
    mov si, dap
    mov ax, 0x4300
    mov dl, 0x81
    int 0x13
    jc fail_write
    ; Clear the buffer and read the sector back.
    mov di, BUF
    mov cx, 512
    xor al, al
    rep stosb
    call read_sector
    mov di, BUF
    mov cx, 512
    mov al, 0x5a
    repe scasb
    jne fail_compare
    mov si, msg_write_ok
    call puts
    jmp halt
verify:
    call read_sector
    mov si, msg_data
    call puts
    mov si, BUF
    mov cx, 512
.byte:
    lodsb
    call hex8
    loop .byte
    mov si, msg_end
    call puts
    jmp halt
forever:
    mov si, msg_loop
    call puts
.next:
    mov word [dap_count], 1
    mov si, dap
    mov ax, 0x4300
    mov dl, 0x81
    int 0x13
    jc fail_write
    add dword [dap + 8], 128
    cmp dword [dap + 8], 32000
    jb .next
    mov dword [dap + 8], 100
    jmp .next
read_sector:
    mov word [dap_count], 1
    mov si, dap
    mov ah, 0x42
    mov dl, 0x81
    int 0x13
    jc fail_read
    ret
fail_edd:
    mov si, msg_fail_edd
    jmp fail
fail_write:
    mov si, msg_fail_write
    jmp fail
fail_read:
    mov si, msg_fail_read
    jmp fail
fail_compare:
    mov si, msg_fail_compare
fail:
    push ax
    call puts
    pop ax
    mov al, ah
    call hex8
    mov al, 10
    out dx, al
halt:
    cli
    hlt
    jmp halt
; puts: string at ds:si
puts:
    lodsb
    test al, al
    jz .done
    mov dx, DEBUGCON
    out dx, al
    jmp puts
.done:
    ret
; hex8: al as two hex digits
hex8:
    push ax
    shr al, 4
    call nibble
    pop ax
nibble:
    and al, 0x0f
    add al, '0'
    cmp al, '9'
    jbe .out
    add al, 'a' - '0' - 10
.out:
    mov dx, DEBUGCON
    out dx, al
    ret
align 4
dap:
    db 16, 0
dap_count:
    dw 1
    dw BUF, 0
    dq 100
msg_boot: db "BOOTSECTOR", 10, 0
msg_write_ok: db "WRITE-OK", 10, 0
msg_loop: db "LOOP", 10, 0
msg_data: db "DATA:", 0
msg_end: db ":END", 10, 0
msg_fail_edd: db "FAIL-EDD ", 0
msg_fail_write: db "FAIL-WRITE ", 0
msg_fail_read: db "FAIL-READ ", 0
msg_fail_compare: db "FAIL-COMPARE ", 0
    times 509-($-$$) db 0
mode:
    db 0
    dw 0xaa55
"#;

fn run_tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed: {text}");
    text
}

#[test]
fn data_a_guest_writes_through_int13_survives_power_off_and_passes_qemu_img_check() {
    if require_kvm().is_none() || require_nasm().is_none() {
        return;
    }
    let Some(bios) = require_seabios() else {
        return;
    };
    if require_tool("qemu-img", &["--version"], "qemu-utils").is_none()
        || require_tool("qemu-io", &["--version"], "qemu-utils").is_none()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sector = assemble(dir.path(), "bootsector", BOOT_SECTOR);
    assert_eq!(sector.len(), 512);
    assert_eq!(sector[MODE_OFFSET], 0);
    let boot_disk = raw_disk(dir.path(), "boot.img", &sector);
    let data_disk = dir.path().join("data.qcow2");
    create(&data_disk, ImageFormat::Qcow2, 16 << 20, None).unwrap();

    let mut config = seabios_serial_config(dir.path(), "int13", bios, 64);
    config.drives = vec![
        drive(DriveKind::Disk, Some(boot_disk.clone())),
        drive(DriveKind::Disk, Some(data_disk.clone())),
    ];
    config.boot_order = BootOrder::Disk;
    let log = debugcon_path(&config);

    // First start: write and check.
    let vm = VmHandle::create(config.clone()).unwrap();
    vm.start().unwrap();
    assert!(
        wait_for_text(&log, "WRITE-OK", LONG) || read_text(&log).contains("FAIL"),
        "state {:?}: {}",
        vm.state(),
        read_text(&log)
    );
    let text = read_text(&log);
    assert!(text.contains("BOOTSECTOR\nWRITE-OK"), "{text}");
    let stats = vm.stats();
    assert_eq!(stats.disks.len(), 2, "{stats:?}");
    assert!(
        stats.disks[1].write_bytes >= 512 && stats.disks[1].write_ops >= 1,
        "{stats:?}"
    );
    assert!(stats.disks[1].read_bytes >= 512, "{stats:?}");
    assert!(
        stats.disks[0].read_bytes >= 512,
        "boot sector read: {stats:?}"
    );
    assert_eq!(stats.disks[0].write_bytes, 0, "{stats:?}");
    vm.power_off().unwrap();
    assert_eq!(vm.state(), VmState::Stopped);
    drop(vm);

    // The image is consistent and holds the pattern where the guest put it.
    run_tool(
        "qemu-img",
        &["check", "-f", "qcow2", data_disk.to_str().unwrap()],
    );
    let read_cmd = format!("read -P {PATTERN:#x} {} 512", PATTERN_LBA * 512);
    let io = run_tool(
        "qemu-io",
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            &read_cmd,
            data_disk.to_str().unwrap(),
        ],
    );
    assert!(
        io.contains("read 512/512 bytes at offset 51200") && !io.contains("failed"),
        "{io}"
    );

    // Second VM, same config, the boot sector switched to "read and print".
    let mut disk = std::fs::read(&boot_disk).unwrap();
    disk[MODE_OFFSET] = 1;
    std::fs::write(&boot_disk, disk).unwrap();
    let vm = VmHandle::create(config.clone()).unwrap();
    vm.start().unwrap();
    assert!(
        wait_for_text(&log, ":END", LONG) || read_text(&log).contains("FAIL"),
        "state {:?}: {}",
        vm.state(),
        read_text(&log)
    );
    let text = read_text(&log);
    let expected = format!("DATA:{}:END", format!("{PATTERN:02x}").repeat(512));
    assert!(text.contains(&expected), "{text}");
    let stats = vm.stats();
    assert_eq!(stats.disks[1].write_bytes, 0, "{stats:?}");
    vm.power_off().unwrap();
    drop(vm);
    run_tool(
        "qemu-img",
        &["check", "-f", "qcow2", data_disk.to_str().unwrap()],
    );
}

// ---------------------------------------------------------------------------------------
// 3. CD media change while the VM runs.

/// Set in the child process of the kill test: the folder holding its disks.
const CRASH_CHILD: &str = "DESKVM_TEST_CRASH_CHILD";

/// The kill test's VM: the boot sector (mode 2) writing clusters of a 16 MiB qcow2 forever.
fn crash_config(dir: &Path, bios: PathBuf) -> VmConfig {
    let mut config = seabios_serial_config(dir, "crash", bios, 64);
    config.drives = vec![
        drive(DriveKind::Disk, Some(dir.join("boot.img"))),
        drive(DriveKind::Disk, Some(dir.join("data.qcow2"))),
    ];
    config.boot_order = BootOrder::Disk;
    config
}

/// An engine killed (SIGKILL) while the guest allocates qcow2 clusters leaves an image that
/// `qemu-img check` finds free of corruption (leaked clusters are allowed). The engine runs
/// in a child process: this same test binary, re-run with `CRASH_CHILD` set.
#[test]
fn an_engine_killed_mid_write_leaves_a_qcow2_without_corruption() {
    if let Some(dir) = std::env::var_os(CRASH_CHILD) {
        let dir = PathBuf::from(dir);
        let vm = VmHandle::create(crash_config(&dir, PathBuf::from(SEABIOS))).unwrap();
        vm.start().unwrap();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    if require_kvm().is_none() || require_nasm().is_none() {
        return;
    }
    let Some(bios) = require_seabios() else {
        return;
    };
    if require_tool("qemu-img", &["--version"], "qemu-utils").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut sector = assemble(dir.path(), "bootsector", BOOT_SECTOR);
    sector[MODE_OFFSET] = 2;
    raw_disk(dir.path(), "boot.img", &sector);
    let data = dir.path().join("data.qcow2");
    create(&data, ImageFormat::Qcow2, 16 << 20, None).unwrap();
    let log = debugcon_path(&crash_config(dir.path(), bios));

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "an_engine_killed_mid_write_leaves_a_qcow2_without_corruption",
            "--exact",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD, dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = wait_for_text(&log, "LOOP", LONG);
    // Let the guest allocate a good number of clusters, then pull the plug mid-stream.
    let deadline = std::time::Instant::now() + LONG;
    while std::fs::metadata(&data).map(|m| m.len()).unwrap_or(0) < 4 << 20
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let text = read_text(&log);
    assert!(started && !text.contains("FAIL"), "{text}");
    let grown = std::fs::metadata(&data).unwrap().len();
    assert!(
        grown >= 4 << 20,
        "the guest wrote only {grown} bytes: {text}"
    );

    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&data)
        .output()
        .unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // 0: clean, 3: leaked clusters only; 2 would be corruption.
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "qemu-img check found corruption after the kill: {report}"
    );
    assert!(!report.contains("ERROR"), "{report}");
}

#[test]
fn cdrom_media_can_be_changed_and_ejected_while_running() {
    if require_kvm().is_none() {
        return;
    }
    let Some(bios) = require_seabios() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let iso = dir.path().join("media.iso");
    std::fs::write(&iso, vec![0u8; 64 * 2048]).unwrap();
    let mut config = seabios_serial_config(dir.path(), "cdchange", bios.clone(), 64);
    config.drives = vec![
        drive(DriveKind::Disk, Some(raw_disk(dir.path(), "disk.img", &[]))),
        drive(
            DriveKind::Disk,
            Some(raw_disk(dir.path(), "disk2.img", &[])),
        ),
        drive(DriveKind::Cdrom, None),
    ];
    config.firmware.boot_menu = true;
    config.firmware.boot_menu_timeout_ms = Some(60_000);
    let log = debugcon_path(&config);
    let vm = VmHandle::create(config.clone()).unwrap();
    vm.start().unwrap();
    assert!(
        wait_for_text(&log, "Press ESC for boot menu", LONG),
        "{}",
        read_text(&log)
    );

    vm.change_cdrom(Some(&iso), false).unwrap();
    vm.change_cdrom(None, false).unwrap();
    vm.change_cdrom(Some(&iso), false).unwrap();

    let absent = dir.path().join("no-such-disc.iso");
    let e = vm
        .change_cdrom(Some(&absent), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no-such-disc.iso"), "{e}");
    assert!(e.to_lowercase().contains("no such file"), "{e}");
    // The failed change left the medium that was in.
    vm.change_cdrom(None, false).unwrap();
    assert_eq!(vm.state(), VmState::Running);
    assert_eq!(vm.stats().disks.len(), 3);
    vm.power_off().unwrap();
    drop(vm);

    // A VM without a CD-ROM drive says so.
    let mut config = seabios_serial_config(dir.path(), "nocd", bios, 64);
    config.drives = vec![drive(
        DriveKind::Disk,
        Some(raw_disk(dir.path(), "disk3.img", &[])),
    )];
    let vm = VmHandle::create(config).unwrap();
    let e = vm.change_cdrom(Some(&iso), false).unwrap_err().to_string();
    assert!(e.contains("no CD-ROM drive"), "{e}");
    vm.start().unwrap();
    let e = vm.change_cdrom(None, false).unwrap_err().to_string();
    assert!(e.contains("no CD-ROM drive"), "{e}");
    vm.power_off().unwrap();
}

// ---------------------------------------------------------------------------------------
// 4. Images that cannot be used fail VM creation, naming the file, and are not changed.

fn qcow2_image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    create(&path, ImageFormat::Qcow2, 16 << 20, None).unwrap();
    path
}

fn assert_create_fails(config: &VmConfig, file: &Path, problem: &str) {
    let e = match VmHandle::create(config.clone()) {
        Ok(_) => panic!("VM with {} was created", file.display()),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(&*file.to_string_lossy()), "{e}");
    assert!(e.contains(problem), "expected {problem:?} in: {e}");
}

#[test]
fn unusable_images_fail_vm_creation_with_the_file_and_the_problem_and_stay_unchanged() {
    if require_kvm().is_none() {
        return;
    }
    let Some(bios) = require_seabios() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let good = qcow2_image(dir.path(), "good.qcow2");
    let base = {
        let mut c = seabios_serial_config(dir.path(), "bad-images", bios, 64);
        c.serial = CharOutput::None;
        c.debugcon = CharOutput::None;
        c
    };
    let with_disks = |disks: &[&Path]| {
        let mut c = base.clone();
        c.drives = disks
            .iter()
            .map(|p| drive(DriveKind::Disk, Some(p.to_path_buf())))
            .collect();
        c
    };

    // Missing.
    let absent = dir.path().join("absent.qcow2");
    assert_create_fails(&with_disks(&[&absent]), &absent, "No such file");
    assert!(!absent.exists(), "a missing image must not be created");

    // Truncated: the refcount table lies beyond the end of the file.
    let truncated = qcow2_image(dir.path(), "truncated.qcow2");
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..65536 + 1000]).unwrap();
    let before = std::fs::read(&truncated).unwrap();
    let good_before = std::fs::read(&good).unwrap();
    // The good image is opened read-write first, then dropped with the failed machine.
    assert_create_fails(&with_disks(&[&good, &truncated]), &truncated, "truncated");
    assert_eq!(std::fs::read(&truncated).unwrap(), before);
    assert_eq!(
        std::fs::read(&good).unwrap(),
        good_before,
        "good image changed"
    );

    // An incompatible feature bit this implementation does not know (bit 40).
    let unknown = qcow2_image(dir.path(), "unknown-feature.qcow2");
    let mut bytes = std::fs::read(&unknown).unwrap();
    let incompatible = u64::from_be_bytes(bytes[72..80].try_into().unwrap()) | 1 << 40;
    bytes[72..80].copy_from_slice(&incompatible.to_be_bytes());
    std::fs::write(&unknown, &bytes).unwrap();
    assert_create_fails(
        &with_disks(&[&unknown]),
        &unknown,
        "unknown qcow2 incompatible feature bits 0x10000000000",
    );
    assert_eq!(std::fs::read(&unknown).unwrap(), bytes);

    // Locked by another read-write open (another VM using it).
    let locked = qcow2_image(dir.path(), "locked.qcow2");
    let before = std::fs::read(&locked).unwrap();
    let holder = ImageBackend::open(&locked, DriveKind::Disk, false).unwrap();
    assert_create_fails(
        &with_disks(&[&locked]),
        &locked,
        "in use by another program",
    );
    // A CD-ROM drive (shared lock) cannot take it either while it is written.
    let mut cd = base.clone();
    cd.drives = vec![drive(DriveKind::Cdrom, Some(locked.clone()))];
    assert_create_fails(&cd, &locked, "in use by another program");
    assert_eq!(std::fs::read(&locked).unwrap(), before);
    drop(holder);
    assert_eq!(std::fs::read(&locked).unwrap(), before);
    // Free again: the VM can be created.
    drop(VmHandle::create(with_disks(&[&locked])).unwrap());
    assert_eq!(std::fs::read(&locked).unwrap(), before);
}
