//! ACPI end to end: SeaBIOS builds its ACPI tables around the PIIX4 power-management
//! function, and guest code finds our ports through them exactly as an OS does.
//!
//! - A guest program (a boot sector plus a second stage, booted from an IDE disk by
//!   SeaBIOS) finds the RSDP, walks the RSDT to the FADT and scans the DSDT/SSDTs for the
//!   `_S5_` package, as Linux's ACPICA and GRUB's `halt` do. It reports what it found,
//!   waits for a byte on COM1, switches to ACPI mode through SMI_CMD, enables the power
//!   button and waits for the SCI. The host presses the power button (before the guest
//!   listens: refused; after: delivered), the guest's interrupt handler sees PWRBTN_STS
//!   and powers off with SLP_TYP from `_S5_` | SLP_EN, and the VM stops by itself.
//! - A boot sector asks SeaBIOS's APM BIOS to power off (int 15h AX=5307h), which SeaBIOS
//!   does by writing soft-off to the PM1a control register it programmed.
//!
//! Not covered here (no OS boots on these hosts, see TESTING.md): Linux's own ACPI driver.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use vmm::{BootOrder, DriveConfig, DriveKind, PowerButton, VmConfig, VmHandle, VmState};

/// Stage 1 loads 8 sectors after it to 0x7e00 (int 13h), switches to 32-bit protected mode
/// with flat segments and jumps to stage 2 at 0x7e00.
const PROGRAM: &str = r#"
bits 16
org 0x7c00
%define DEBUGCON 0x402
%define COM1 0x3f8
start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    sti
    mov [boot_drive], dl
    mov ax, 0x0208          ; read 8 sectors
    mov cx, 0x0002          ; cylinder 0, sector 2
    xor dh, dh
    mov dl, [boot_drive]
    mov bx, 0x7e00
    int 0x13
    jc load_failed
    cli
    lgdt [gdt_descriptor]
    mov eax, cr0
    or al, 1
    mov cr0, eax
    jmp dword 0x08:stage2

load_failed:
    mov si, msg_load_failed
.out:
    lodsb
    test al, al
    jz .halt
    mov dx, DEBUGCON
    out dx, al
    jmp .out
.halt:
    hlt
    jmp .halt

boot_drive: db 0
msg_load_failed: db "FAIL load", 10, 0
align 8
gdt:
    dq 0
    dq 0x00cf9a000000ffff   ; 0x08: flat 32-bit code
    dq 0x00cf92000000ffff   ; 0x10: flat 32-bit data
gdt_descriptor:
    dw gdt_descriptor - gdt - 1
    dd gdt
idt_descriptor:
    dw 0x72 * 8 - 1
    dd idt
    times 510-($-$$) db 0
    dw 0xaa55

; ---- stage 2 (32-bit) ----------------------------------------------------------------
bits 32
stage2:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x7c00

    ; 1. RSDP: "RSD PTR " on a 16-byte boundary in 0xe0000..0xfffff.
    mov esi, 0xe0000
.scan_rsdp:
    cmp dword [esi], 'RSD '
    jne .next_rsdp
    cmp dword [esi + 4], 'PTR '
    je .found_rsdp
.next_rsdp:
    add esi, 16
    cmp esi, 0x100000
    jb .scan_rsdp
    mov esi, msg_no_rsdp
    jmp fail

.found_rsdp:
    mov esi, [esi + 16]     ; RSDT
    cmp dword [esi], 'RSDT'
    je .rsdt_ok
    mov esi, msg_no_rsdt
    jmp fail
.rsdt_ok:
    mov ecx, [esi + 4]      ; length
    sub ecx, 36
    shr ecx, 2              ; entries
    lea ebx, [esi + 36]
.entry:
    test ecx, ecx
    jz .entries_done
    mov edi, [ebx]
    cmp dword [edi], 'FACP'
    jne .not_fadt
    mov [fadt], edi
    push ecx
    push ebx
    mov esi, [edi + 40]     ; DSDT
    call scan_s5
    pop ebx
    pop ecx
    jmp .next_entry
.not_fadt:
    cmp dword [edi], 'SSDT'
    jne .next_entry
    push ecx
    push ebx
    mov esi, edi
    call scan_s5
    pop ebx
    pop ecx
.next_entry:
    add ebx, 4
    dec ecx
    jmp .entry

.entries_done:
    mov edi, [fadt]
    test edi, edi
    jnz .have_fadt
    mov esi, msg_no_fadt
    jmp fail
.have_fadt:
    movzx eax, word [edi + 46]
    mov [sci], eax
    mov eax, [edi + 48]
    mov [smi_cmd], eax
    movzx eax, byte [edi + 52]
    mov [acpi_enable], eax
    mov eax, [edi + 56]
    mov [pm1a_evt], eax
    mov eax, [edi + 64]
    mov [pm1a_cnt], eax
    cmp dword [s5_type], 0xffffffff
    jne .have_s5
    mov esi, msg_no_s5
    jmp fail
.have_s5:
    ; "TABLES evt=.. cnt=.. sci=.. smi=.. enable=.. s5=.."
    mov esi, msg_tables
    call puts
    mov eax, [pm1a_evt]
    call hex32
    mov esi, msg_cnt
    call puts
    mov eax, [pm1a_cnt]
    call hex32
    mov esi, msg_sci
    call puts
    mov eax, [sci]
    call hex32
    mov esi, msg_smi
    call puts
    mov eax, [smi_cmd]
    call hex32
    mov esi, msg_enable
    call puts
    mov eax, [acpi_enable]
    call hex32
    mov esi, msg_s5
    call puts
    mov eax, [s5_type]
    call hex32
    mov al, 10
    call putc
    cmp dword [sci], 9
    je .sci_ok
    mov esi, msg_bad_sci
    jmp fail
.sci_ok:

    ; 2. Wait for the host's go (a byte on COM1).
.wait_serial:
    mov dx, COM1 + 5
    in al, dx
    test al, 1
    jz .wait_serial
    mov dx, COM1
    in al, dx

    ; 3. ACPI mode: ACPI_ENABLE to SMI_CMD, then SCI_EN must read back set.
    mov edx, [smi_cmd]
    mov eax, [acpi_enable]
    out dx, al
    mov ecx, 100000
.wait_sci_en:
    mov edx, [pm1a_cnt]
    in ax, dx
    test ax, 1
    jnz .acpi_on
    loop .wait_sci_en
    mov esi, msg_no_sci_en
    jmp fail
.acpi_on:

    ; 4. SCI (IRQ 9 = slave IRQ 1, vector 0x71 as SeaBIOS programmed the PICs) only.
    mov eax, sci_handler
    mov word [idt + 0x71 * 8], ax
    mov word [idt + 0x71 * 8 + 2], 0x08
    mov word [idt + 0x71 * 8 + 4], 0x8e00
    shr eax, 16
    mov word [idt + 0x71 * 8 + 6], ax
    lidt [idt_descriptor]
    mov al, 0xfb
    out 0x21, al
    mov al, 0xfd
    out 0xa1, al

    ; 5. Power button enable, then wait.
    mov edx, [pm1a_evt]
    add edx, 2
    mov ax, 0x0100
    out dx, ax
    mov esi, msg_ready
    call puts
    sti
.idle:
    hlt
    jmp .idle

sci_handler:
    mov edx, [pm1a_evt]
    in ax, dx
    test ax, 0x0100
    jz .spurious
    mov esi, msg_button
    call puts
    mov ax, 0x0100          ; clear PWRBTN_STS
    out dx, ax
    mov al, 0x20
    out 0xa0, al
    out 0x20, al
    mov esi, msg_soft_off
    call puts
    mov eax, [s5_type]
    shl eax, 10
    or eax, 0x2001          ; SLP_EN | SLP_TYP | SCI_EN
    mov edx, [pm1a_cnt]
    out dx, ax
.dead:
    cli
    hlt
    jmp .dead
.spurious:
    mov esi, msg_spurious
    call puts
    mov al, 0x20
    out 0xa0, al
    out 0x20, al
    iretd

; Scans the ACPI table at esi (header length at +4) for "_S5_" PackageOp and stores the
; first element (SLP_TYPa) in s5_type, as GRUB's halt does.
scan_s5:
    mov ecx, [esi + 4]
    lea edx, [esi + ecx]    ; end
    add esi, 36
.look:
    lea eax, [esi + 8]
    cmp eax, edx
    jae .done
    cmp dword [esi], '_S5_'
    jne .advance
    cmp byte [esi + 4], 0x12        ; PackageOp
    jne .advance
    movzx eax, byte [esi + 5]       ; PkgLength lead byte
    shr eax, 6                      ; extra length bytes
    lea edi, [esi + 6 + eax]        ; NumElements
    inc edi                         ; first element
    movzx eax, byte [edi]
    cmp al, 0x0a                    ; BytePrefix
    jne .small
    movzx eax, byte [edi + 1]
    jmp .store
.small:
    cmp al, 1                       ; ZeroOp / OneOp
    ja .advance
.store:
    mov [s5_type], eax
    ret
.advance:
    inc esi
    jmp .look
.done:
    ret

fail:
    call puts
    mov al, 10
    call putc
.halt:
    cli
    hlt
    jmp .halt

putc:
    push edx
    mov dx, DEBUGCON
    out dx, al
    pop edx
    ret
puts:
    push eax
.next:
    mov al, [esi]
    test al, al
    jz .done
    call putc
    inc esi
    jmp .next
.done:
    pop eax
    ret
hex32:
    push ecx
    mov ecx, 8
.digit:
    rol eax, 4
    push eax
    and al, 0x0f
    add al, '0'
    cmp al, '9'
    jbe .emit
    add al, 'a' - '0' - 10
.emit:
    call putc
    pop eax
    loop .digit
    pop ecx
    ret

fadt: dd 0
sci: dd 0
smi_cmd: dd 0
acpi_enable: dd 0
pm1a_evt: dd 0
pm1a_cnt: dd 0
s5_type: dd 0xffffffff
msg_tables: db "TABLES evt=", 0
msg_cnt: db " cnt=", 0
msg_sci: db " sci=", 0
msg_smi: db " smi=", 0
msg_enable: db " enable=", 0
msg_s5: db " s5=", 0
msg_ready: db "READY", 10, 0
msg_button: db "POWER-BUTTON", 10, 0
msg_soft_off: db "SOFT-OFF", 10, 0
msg_spurious: db "FAIL spurious SCI", 10, 0
msg_no_rsdp: db "FAIL no RSDP", 0
msg_no_rsdt: db "FAIL no RSDT", 0
msg_no_fadt: db "FAIL no FADT", 0
msg_no_s5: db "FAIL no _S5_", 0
msg_bad_sci: db "FAIL SCI is not IRQ 9", 0
msg_no_sci_en: db "FAIL SCI_EN did not come on", 0
align 8
idt:
    times 0x72 * 8 db 0
    times 9 * 512 - ($ - $$) db 0
"#;

/// A boot sector that asks the APM BIOS to power the machine off.
const APM_BOOT_SECTOR: &str = r#"
bits 16
org 0x7c00
start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    sti
    mov si, msg_apm
    call puts
    mov ax, 0x5301          ; APM real-mode interface connect
    xor bx, bx
    int 0x15
    mov ax, 0x5307          ; set power state
    mov bx, 0x0001          ; all devices
    mov cx, 0x0003          ; off
    int 0x15
    mov si, msg_failed
    call puts
.halt:
    hlt
    jmp .halt
puts:
    lodsb
    test al, al
    jz .done
    mov dx, 0x402
    out dx, al
    jmp puts
.done:
    ret
msg_apm: db "APM-OFF", 10, 0
msg_failed: db "FAIL still running", 10, 0
    times 510-($-$$) db 0
    dw 0xaa55
"#;

fn disk_config(dir: &Path, name: &str, bios: PathBuf, disk: PathBuf) -> VmConfig {
    let mut config = seabios_config(dir, name, bios, 128);
    config.drives = vec![DriveConfig {
        kind: DriveKind::Disk,
        path: Some(disk),
        read_only: true,
    }];
    config.boot_order = BootOrder::Disk;
    config
}

fn wait_stopped(vm: &VmHandle, log: &Path) {
    let state = vm.wait_for_stop(Some(LONG));
    assert_eq!(state, VmState::Stopped, "{}", read_text(log));
}

#[test]
fn power_button_reaches_an_acpi_guest_that_then_powers_off_through_s5() {
    if require_kvm().is_none() || require_nasm().is_none() {
        return;
    }
    let Some(bios) = require_seabios() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = assemble(dir.path(), "acpi", PROGRAM);
    assert_eq!(image.len(), 9 * 512);
    let disk = raw_disk(dir.path(), "acpi.img", &image);
    let config = disk_config(dir.path(), "acpi", bios, disk);
    let (vm, log) = start_until_debugcon_shows(config, "TABLES");
    assert!(
        wait_for_text(&log, "s5=", LONG),
        "tables line: {}",
        read_text(&log)
    );
    std::thread::sleep(Duration::from_millis(200)); // let the line finish
    let text = read_text(&log);
    assert!(!text.contains("FAIL"), "{text}");
    // SeaBIOS programs PMBA to 0xb000 and describes it, SCI 9, SMI_CMD 0xb2, 0xf1, S5 = 0.
    assert!(
        text.contains(
            "TABLES evt=0000b000 cnt=0000b004 sci=00000009 smi=000000b2 enable=000000f1 s5=00000000"
        ),
        "{text}"
    );

    // The guest is waiting for the go and has not enabled the power button: not heard.
    assert_eq!(vm.press_power_button().unwrap(), PowerButton::NotListening);
    assert_eq!(vm.state(), VmState::Running);
    assert_eq!(vm.input().serial_input(b"g"), 1);
    assert!(wait_for_text(&log, "READY", LONG), "{}", read_text(&log));

    assert_eq!(vm.press_power_button().unwrap(), PowerButton::Delivered);
    wait_stopped(&vm, &log);
    let text = read_text(&log);
    assert!(
        text.contains("READY\nPOWER-BUTTON\nSOFT-OFF\n") && !text.contains("FAIL"),
        "{text}"
    );
    assert!(
        vm.stats().interrupts.get(9).copied().unwrap_or(0) >= 1,
        "the SCI reached the guest on IRQ 9: {:?}",
        vm.stats().interrupts
    );
    // A stopped VM has no button to press.
    assert!(vm.press_power_button().is_err());
}

#[test]
fn apm_bios_power_off_goes_through_the_pm1a_control_register() {
    if require_kvm().is_none() || require_nasm().is_none() {
        return;
    }
    let Some(bios) = require_seabios() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sector = assemble(dir.path(), "apm", APM_BOOT_SECTOR);
    let disk = raw_disk(dir.path(), "apm.img", &sector);
    let config = disk_config(dir.path(), "apm", bios, disk);
    let log = debugcon_path(&config);
    let vm = VmHandle::create(config).unwrap();
    vm.start().unwrap();
    wait_stopped(&vm, &log);
    let text = read_text(&log);
    assert!(text.contains("APM-OFF") && !text.contains("FAIL"), "{text}");
}
