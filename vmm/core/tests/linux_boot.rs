//! Direct Linux boot through the boot protocol, with a small bzImage built here: its
//! 32-bit entry prints the command line, the initrd and the e820 entry count it finds
//! through the zero page (conventional RAM, the BIOS hole, RAM above 1 MiB and the
//! reserved KVM pages: four).

mod common;

use common::*;
use vmm::{CharOutput, LinuxBootConfig, VmConfig, VmHandle};

const PAYLOAD: &str = r#"
bits 32
org 0x100000
start:
    mov dx, 0x402
    mov ebx, [esi + 0x228]
.cmdline:
    mov al, [ebx]
    test al, al
    jz .cmdline_done
    out dx, al
    inc ebx
    jmp .cmdline
.cmdline_done:
    mov al, '|'
    out dx, al
    mov ebx, [esi + 0x218]
    mov ecx, [esi + 0x21c]
.initrd:
    jecxz .initrd_done
    mov al, [ebx]
    out dx, al
    inc ebx
    dec ecx
    jmp .initrd
.initrd_done:
    mov al, '|'
    out dx, al
    mov al, [esi + 0x1e8]
    add al, '0'
    out dx, al
    mov al, 10
    out dx, al
.halt:
    cli
    hlt
    jmp .halt
"#;

fn bzimage(payload: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; 5 * 512];
    img[0x1f1] = 4; // setup_sects
    img[0x1fe] = 0x55;
    img[0x1ff] = 0xaa;
    img[0x201] = 0x6a; // header length after 0x202
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 0x01; // LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
    img.extend_from_slice(payload);
    img
}

#[test]
fn kernel_initrd_and_cmdline_reach_the_kernel() {
    if require_kvm().is_none() || require_nasm().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let payload = assemble(dir.path(), "kernel", PAYLOAD);
    let kernel = dir.path().join("bzImage");
    std::fs::write(&kernel, bzimage(&payload)).unwrap();
    let initrd = dir.path().join("initrd.img");
    std::fs::write(&initrd, b"INITRD-CONTENT").unwrap();
    let log = dir.path().join("debugcon.txt");
    let config = VmConfig {
        name: "linux".into(),
        memory_mib: 64,
        linux_boot: Some(LinuxBootConfig {
            kernel,
            initrd: Some(initrd),
            cmdline: "console=ttyS0 deskvm.test=1".into(),
        }),
        debugcon: CharOutput::File(log.clone()),
        ..VmConfig::default()
    };
    let vm = VmHandle::create(config).unwrap();
    vm.start().unwrap();
    assert!(wait_for_text(&log, "\n", LONG));
    let expected = "console=ttyS0 deskvm.test=1|INITRD-CONTENT|4\n";
    assert_eq!(std::fs::read_to_string(&log).unwrap(), expected);
    // A reset boots the kernel again.
    vm.reset().unwrap();
    assert!(
        wait_for_text(&log, &expected.repeat(2), LONG),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
}
