//! Engine tests with tiny real-mode guest programs (assembled here with nasm) that poke
//! the machine's devices and report over the debug console at port 0x402.

mod common;

use std::time::Duration;

use common::*;
use vmm::{CharOutput, Event, VmHandle, VmState};

fn prerequisites() -> Option<()> {
    require_kvm()?;
    require_nasm()
}

#[test]
fn guest_sees_pci_fw_cfg_cmos_i8042_and_serial() {
    if prerequisites().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let body = r#"
start:
    cli
    PUTS hello
    ; PCI 00:00.0 vendor/device through mechanism #1
    mov dx, 0xcf8
    mov eax, 0x80000000
    out dx, eax
    mov dx, 0xcfc
    in eax, dx
    call hex32
    PUTC ' '
    ; PCI 00:01.0 (PIIX3)
    mov dx, 0xcf8
    mov eax, 0x80000800
    out dx, eax
    mov dx, 0xcfc
    in eax, dx
    call hex32
    PUTC ' '
    ; PCI 00:00.0 subsystem (reg 0x2c)
    mov dx, 0xcf8
    mov eax, 0x8000002c
    out dx, eax
    mov dx, 0xcfc
    in eax, dx
    call hex32
    PUTC ' '
    ; fw_cfg signature
    mov dx, 0x510
    mov ax, 0
    out dx, ax
    mov cx, 4
.sig:
    mov dx, 0x511
    in al, dx
    mov dx, DEBUGCON
    out dx, al
    loop .sig
    PUTC ' '
    ; fw_cfg NB_CPUS (key 5), 16-bit little endian
    mov dx, 0x510
    mov ax, 5
    out dx, ax
    mov dx, 0x511
    in al, dx
    mov bl, al
    in al, dx
    mov ah, al
    mov al, bl
    call hex16
    PUTC ' '
    ; CMOS 0x34/0x35: RAM above 16 MiB in 64 KiB units; status D
    mov al, 0x35
    out 0x70, al
    in al, 0x71
    mov ah, al
    mov al, 0x34
    out 0x70, al
    in al, 0x71
    call hex16
    PUTC ' '
    mov al, 0x0d
    out 0x70, al
    in al, 0x71
    call hex8
    PUTC ' '
    ; i8042 self test
    mov al, 0xaa
    out 0x64, al
.obf:
    in al, 0x64
    test al, 1
    jz .obf
    in al, 0x60
    call hex8
    PUTC ' '
    ; debug console readback
    mov dx, DEBUGCON
    in al, dx
    call hex8
    PUTC 10
    ; COM1: 8N1, then a line
    mov si, serial_text
.tx:
    mov al, [cs:si]
    test al, al
    jz .txdone
    mov bl, al
.thre:
    mov dx, 0x3fd
    in al, dx
    test al, 0x20
    jz .thre
    mov dx, 0x3f8
    mov al, bl
    out dx, al
    inc si
    jmp .tx
.txdone:
    PUTS done
    jmp halt_forever
hello: db "HELLO", 10, 0
done: db "DONE", 10, 0
serial_text: db "SERIAL OK", 10, 0
"#;
    let mut config = program_config(dir.path(), "devices", body);
    config.serial = CharOutput::File(dir.path().join("serial.txt"));
    let vm = VmHandle::create(config.clone()).unwrap();
    vm.start().unwrap();
    assert!(
        wait_for_text(&debugcon_path(&config), "DONE", LONG),
        "output: {}",
        output_of(&config)
    );
    let out = output_of(&config);
    // 64 MiB: (64 - 16) MiB / 64 KiB = 0x300 units above 16 MiB.
    assert_eq!(
        out, "HELLO\n12378086 70008086 11001af4 QEMU 0001 0300 80 55 e9\nDONE\n",
        "guest saw the wrong machine"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("serial.txt")).unwrap(),
        "SERIAL OK\n"
    );
    let stats = vm.stats();
    assert!(stats.vcpus[0].exits.io_out > 20, "{stats:?}");
    assert!(stats.vcpus[0].exits.io_in > 5, "{stats:?}");
    vm.power_off().unwrap();
    assert_eq!(vm.state(), VmState::Stopped);
}

#[test]
fn every_reset_path_reboots_the_guest() {
    if prerequisites().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // CMOS byte 0x40 counts boots; each boot leaves through a different reset path.
    let body = r#"
start:
    cli
    mov al, 0x40
    out 0x70, al
    in al, 0x71
    inc al
    mov bl, al
    mov al, 0x40
    out 0x70, al
    mov al, bl
    out 0x71, al
    PUTC 'B'
    mov al, bl
    add al, '0'
    mov dx, DEBUGCON
    out dx, al
    PUTC 10
    cmp bl, 1
    je via_cf9
    cmp bl, 2
    je via_i8042
    cmp bl, 3
    je via_port92
    PUTS the_end
    jmp halt_forever
via_cf9:
    mov dx, 0xcf9
    mov al, 0x02
    out dx, al
    mov al, 0x06
    out dx, al
    jmp halt_forever
via_i8042:
    mov al, 0xfe
    out 0x64, al
    jmp halt_forever
via_port92:
    in al, 0x92
    or al, 1
    out 0x92, al
    jmp halt_forever
the_end: db "END", 10, 0
"#;
    let config = program_config(dir.path(), "resets", body);
    let vm = VmHandle::create(config.clone()).unwrap();
    let events = vm.subscribe();
    vm.start().unwrap();
    assert!(
        wait_for_text(&debugcon_path(&config), "END", LONG),
        "output: {} state {:?} stats {:?}",
        output_of(&config),
        vm.state(),
        vm.stats()
    );
    assert_eq!(output_of(&config), "B1\nB2\nB3\nB4\nEND\n");
    assert_eq!(vm.stats().resets, 3);
    let seen: Vec<Event> = events.try_iter().collect();
    assert_eq!(
        seen.iter().filter(|e| **e == Event::GuestReset).count(),
        3,
        "{seen:?}"
    );
    assert_eq!(vm.state(), VmState::Running);
}

#[test]
fn garbage_on_every_device_port_neither_panics_nor_hangs() {
    if prerequisites().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Each boot: bump a CMOS counter, then write and read pseudo-random values of random
    // widths at every port a device owns. Garbage may reset the machine (0x92, 0xcf9,
    // i8042); the counter makes each boot use another seed. After four boots: ALIVE.
    let body = r#"
start:
    cli
    mov al, 0x41
    out 0x70, al
    in al, 0x71
    inc al
    mov bl, al
    mov al, 0x41
    out 0x70, al
    mov al, bl
    out 0x71, al
    cmp bl, 4
    ja alive
    movzx ebp, bl
    imul ebp, ebp, 0x9e3779b1
    or ebp, 1
    mov ecx, 6000
.next:
    ; xorshift32 in ebp
    mov eax, ebp
    shl eax, 13
    xor ebp, eax
    mov eax, ebp
    shr eax, 17
    xor ebp, eax
    mov eax, ebp
    shl eax, 5
    xor ebp, eax
    movzx esi, bp
    and si, 31
    mov dx, [cs:ports + esi * 2]
    mov eax, ebp
    rol eax, 11
    test ebp, 0x300000
    jz .byte
    test ebp, 0x400000
    jz .word
    and dx, 0xfffc
    out dx, eax
    in eax, dx
    jmp .done
.word:
    out dx, ax
    in ax, dx
    jmp .done
.byte:
    out dx, al
    in al, dx
.done:
    dec ecx
    jnz .next
    ; survived this boot without a reset: force one to move on
    mov dx, 0xcf9
    mov al, 0x06
    out dx, al
    jmp halt_forever
alive:
    PUTS alive_text
    jmp halt_forever
ports:
    dw 0x60, 0x64, 0x70, 0x71, 0x92, 0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff
    dw 0x402, 0x510, 0x511, 0x514, 0x515, 0x518, 0x519, 0x51b, 0xcf8, 0xcf9, 0xcfc
    dw 0xcfd, 0xcfe, 0xcff, 0x61, 0x62, 0x63, 0x402, 0x3f8
alive_text: db 10, "ALIVE", 10, 0
"#;
    let config = program_config(dir.path(), "garbage", body);
    let vm = VmHandle::create(config.clone()).unwrap();
    vm.start().unwrap();
    let alive = wait_for_text(&debugcon_path(&config), "ALIVE", LONG);
    assert!(
        alive,
        "output {:?} state {:?}",
        output_of(&config),
        vm.state()
    );
    assert_eq!(vm.state(), VmState::Running);
    assert!(
        vm.stats().resets >= 1,
        "garbage never reset the machine: {:?}",
        vm.stats()
    );
    vm.power_off().unwrap();
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    if prerequisites().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Spins writing to an unowned port: every iteration is one I/O exit.
    let body = r#"
start:
    cli
    PUTS ready
.spin:
    mov dx, 0x80
    out dx, al
    jmp .spin
ready: db "READY", 10, 0
"#;
    let config = program_config(dir.path(), "spin", body);
    let vm = VmHandle::create(config.clone()).unwrap();
    let events = vm.subscribe();
    assert!(vm.pause().is_err(), "a stopped VM cannot pause");
    vm.start().unwrap();
    assert!(vm.start().is_err(), "a running VM cannot start again");
    assert!(wait_for_text(&debugcon_path(&config), "READY", LONG));
    std::thread::sleep(Duration::from_millis(200));
    vm.pause().unwrap();
    let paused = vm.stats();
    assert!(paused.vcpus[0].exits.io_out > 10, "{paused:?}");
    assert!(paused.vcpus[0].cpu_time_ns > 0, "{paused:?}");
    std::thread::sleep(Duration::from_millis(300));
    let still = vm.stats();
    assert_eq!(
        still.vcpus[0].exits.io_out, paused.vcpus[0].exits.io_out,
        "a paused guest ran"
    );
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let resumed = vm.stats();
    assert!(resumed.vcpus[0].exits.io_out > paused.vcpus[0].exits.io_out);
    vm.power_off().unwrap();
    let states: Vec<Event> = events.try_iter().collect();
    assert_eq!(
        states,
        vec![
            Event::StateChanged(VmState::Running),
            Event::StateChanged(VmState::Paused),
            Event::StateChanged(VmState::Running),
            Event::StateChanged(VmState::Stopped),
        ]
    );
    // A stopped VM starts again from a fresh machine.
    std::fs::write(debugcon_path(&config), b"").unwrap();
    vm.start().unwrap();
    assert!(wait_for_text(&debugcon_path(&config), "READY", LONG));
    vm.reset().unwrap();
    assert_eq!(vm.state(), VmState::Running);
}

#[test]
fn a_guest_that_breaks_its_vcpu_fails_the_vm_not_the_process() {
    if prerequisites().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Executing from the VGA hole (no memory there) is an emulation failure in KVM.
    let body = r#"
start:
    cli
    PUTS jumping
    jmp 0xa000:0x0000
jumping: db "JUMP", 10, 0
"#;
    let config = program_config(dir.path(), "broken", body);
    let vm = VmHandle::create(config.clone()).unwrap();
    let events = vm.subscribe();
    vm.start().unwrap();
    let state = vm.wait_for_stop(Some(LONG));
    let VmState::Failed(message) = state else {
        panic!("expected a failed VM, got {state:?}");
    };
    assert!(message.contains("vCPU 0"), "{message}");
    let seen: Vec<Event> = events.try_iter().collect();
    assert!(
        seen.iter().any(|e| matches!(e, Event::Error(_))),
        "{seen:?}"
    );
    // The process is fine and the VM can be started again.
    vm.start().unwrap();
    assert_eq!(vm.wait_for_stop(Some(LONG)), VmState::Failed(message));
}

#[test]
fn pam_registers_shadow_the_bios_area() {
    if prerequisites().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 0xf0000 is the ROM alias (the program's first byte, `cli` = 0xfa) until PAM 0x59
    // says otherwise; 0xc0000 is nothing (0xff) until PAM 0x5a maps RAM there.
    let body = r#"
%macro PAM 2
    mov dx, 0xcf8
    mov eax, 0x80000058 | (%1 & 0xfc)
    out dx, eax
    mov dx, 0xcfc + (%1 & 3)
    mov al, %2
    out dx, al
%endmacro
%macro SHOW 1
    mov al, [es:%1]
    call hex8
    PUTC ' '
%endmacro
start:
    cli
    mov ax, 0xf000
    mov es, ax
    SHOW 0
    PAM 0x59, 0x30
    mov byte [es:0], 0x5a
    SHOW 0
    PAM 0x59, 0x10
    mov byte [es:0], 0x77
    SHOW 0
    PAM 0x59, 0x20
    mov byte [es:0], 0x66
    SHOW 0
    PAM 0x59, 0x30
    SHOW 0
    PAM 0x59, 0x00
    SHOW 0
    mov ax, 0xc000
    mov es, ax
    SHOW 0
    PAM 0x5a, 0x03
    mov byte [es:0], 0x3c
    SHOW 0
    PUTC 10
    jmp halt_forever
"#;
    let config = program_config(dir.path(), "pam", body);
    let vm = VmHandle::create(config.clone()).unwrap();
    vm.start().unwrap();
    assert!(
        wait_for_text(&debugcon_path(&config), "\n", LONG),
        "{:?}",
        vm.state()
    );
    assert_eq!(output_of(&config), "fa 5a 5a fa 66 fa ff 3c \n");
}

#[test]
fn rtc_update_interrupt_reaches_irq8_from_the_engine_timer() {
    if prerequisites().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Enable the update-ended interrupt (status B = UIE | 24 h) and wait; only the
    // engine's timer thread can raise IRQ 8 while the guest never touches the RTC again.
    let body = r#"
start:
    cli
    mov al, 0x0b
    out 0x70, al
    mov al, 0x12
    out 0x71, al
    PUTS armed
    jmp halt_forever
armed: db "ARMED", 10, 0
"#;
    let config = program_config(dir.path(), "rtc", body);
    let vm = VmHandle::create(config.clone()).unwrap();
    vm.start().unwrap();
    assert!(wait_for_text(&debugcon_path(&config), "ARMED", LONG));
    let start = std::time::Instant::now();
    while vm.stats().interrupts[8] == 0 && start.elapsed() < LONG {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        vm.stats().interrupts[8],
        1,
        "IRQ 8 rises once and stays high until C is read"
    );
}

#[test]
fn string_port_instructions_reach_the_device_item_by_item() {
    if prerequisites().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // `rep outsb` of 17 bytes is one KVM exit with count 17; the debug console (a one-port
    // device) must see 17 single-byte writes. Then `rep insb` reads the port 4 times into
    // RAM (the debug console reads back 0xe9) and the program prints what it got.
    let body = r#"
start:
    cli
    push cs
    pop ds
    xor ax, ax
    mov es, ax
    cld
    mov si, msg
    mov cx, msg_end - msg
    mov dx, DEBUGCON
    rep outsb
    mov di, 0x600
    mov cx, 4
    mov dx, DEBUGCON
    rep insb
    mov eax, [es:0x600]
    call hex32
    PUTS done
.halt:
    hlt
    jmp .halt
msg: db "STRING-IO-WORKS", 13, 10
msg_end:
done: db 10, "DONE", 10, 0
"#;
    let (vm, log) =
        start_until_debugcon_shows(program_config(dir.path(), "stringio", body), "DONE");
    let out = read_text(&log);
    assert!(out.contains("STRING-IO-WORKS\r\n"), "{out}");
    assert!(out.to_lowercase().contains("e9e9e9e9"), "{out}");
    vm.power_off().unwrap();
}

#[test]
fn vga_window_writes_are_queued_without_exits_and_read_back_in_order() {
    if prerequisites().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 4096 byte writes to the VGA window (planes enabled, bit mask open; power-on odd/even
    // mode sends even addresses to plane 0, which reads return), then reads: KVM's
    // coalesced MMIO ring takes the writes without an exit each, and the first read (an
    // exit) must see all of them applied, in order.
    let body = r#"
start:
    cli
    mov dx, 0x3c4
    mov ax, 0x0f02
    out dx, ax
    mov dx, 0x3ce
    mov ax, 0xff08
    out dx, ax
    mov ax, 0xa000
    mov es, ax
    xor di, di
    mov cx, 0x1000
    mov al, 0x5a
    cld
    rep stosb
    mov byte [es:0x0ffe], 0xa5
    mov al, [es:0x0ffe]
    call hex8
    mov al, [es:0x0800]
    call hex8
    PUTS done
.halt:
    hlt
    jmp .halt
done: db 10, "DONE", 10, 0
"#;
    let (vm, log) =
        start_until_debugcon_shows(program_config(dir.path(), "vgaqueue", body), "DONE");
    let out = read_text(&log);
    assert!(out.to_lowercase().contains("a55a"), "{out}");
    let exits = vm.stats().vcpus[0].exits.mmio_write;
    assert!(
        exits < 1000,
        "{exits} MMIO write exits for 4097 window writes: the writes are not queued"
    );
    vm.power_off().unwrap();
}
