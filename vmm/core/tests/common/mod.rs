//! Shared helpers of the engine tests: prerequisites (which skip outside CI and fail in
//! it), assembling tiny guest programs with nasm, and waiting for guest output.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmm::{CharOutput, VmConfig, VmHandle};

/// Reports a missing prerequisite: a failure under CI=true, a printed skip otherwise.
pub fn missing(what: &str) -> Option<()> {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what} is missing; CI must not skip (scripts/setup.sh test installs it)");
    }
    eprintln!("SKIPPED: {what} is missing");
    None
}

pub fn require_kvm() -> Option<()> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Some(()),
        Err(e) => missing(&format!("usable /dev/kvm ({e})")),
    }
}

pub fn require_nasm() -> Option<()> {
    match Command::new("nasm").arg("-v").output() {
        Ok(o) if o.status.success() => Some(()),
        _ => missing("nasm (Debian package nasm)"),
    }
}

/// Requires `program` to run and exit successfully with `args` (a version query).
pub fn require_tool(program: &str, args: &[&str], package: &str) -> Option<()> {
    let works = Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success());
    if works {
        Some(())
    } else {
        missing(&format!("{program} (Debian package {package})"))
    }
}

/// Requires `program` to start at all (for tools whose help exits with a failure).
pub fn require_program(program: &str, arg: &str, package: &str) -> Option<()> {
    match Command::new(program).arg(arg).output() {
        Ok(_) => Some(()),
        Err(_) => missing(&format!("{program} (Debian package {package})")),
    }
}

pub const SEABIOS: &str = "/usr/share/seabios/bios.bin";

pub fn require_seabios() -> Option<PathBuf> {
    let p = PathBuf::from(SEABIOS);
    if p.is_file() {
        Some(p)
    } else {
        missing("SeaBIOS (Debian package seabios)").map(|_| p)
    }
}

/// A config that boots `bios` with its debug console into `dir`/`name`.debugcon.
pub fn seabios_config(dir: &Path, name: &str, bios: PathBuf, memory_mib: u64) -> VmConfig {
    let mut config = VmConfig {
        name: name.into(),
        memory_mib,
        debugcon: CharOutput::File(dir.join(format!("{name}.debugcon"))),
        ..VmConfig::default()
    };
    config.firmware.bios = Some(bios);
    config
}

/// Builds `dir`/`iso_name`, a GRUB rescue ISO whose grub.cfg is `grub_cfg`, or says
/// which tool is missing. `module` is a GRUB BIOS file the ISO needs (for example
/// `cdboot.img` or `uhci.mod` under /usr/lib/grub/i386-pc).
pub fn grub_rescue_iso(
    dir: &Path,
    iso_name: &str,
    grub_cfg: &str,
    module: &str,
) -> Option<PathBuf> {
    require_tool("grub-mkrescue", &["--version"], "grub-common")?;
    require_tool("xorriso", &["-version"], "xorriso")?;
    require_tool("mformat", &["--version"], "mtools")?;
    if !Path::new("/usr/lib/grub/i386-pc").join(module).is_file() {
        return missing("GRUB's BIOS modules (Debian package grub-pc-bin)").and(None);
    }
    let root = dir.join(format!("{iso_name}.root"));
    std::fs::create_dir_all(root.join("boot/grub")).unwrap();
    std::fs::write(root.join("boot/grub/grub.cfg"), grub_cfg).unwrap();
    let iso = dir.join(iso_name);
    let out = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(&iso)
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success() && iso.is_file(),
        "grub-mkrescue failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(iso)
}

/// A 1 MiB raw disk image `dir`/`name` that starts with `first` (a boot sector or more).
pub fn raw_disk(dir: &Path, name: &str, first: &[u8]) -> PathBuf {
    let path = dir.join(name);
    let mut bytes = first.to_vec();
    bytes.resize(1 << 20, 0);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The text in `path` so far (empty when it does not exist yet).
pub fn read_text(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// Assembles `source` with nasm into a flat binary.
pub fn assemble(dir: &Path, name: &str, source: &str) -> Vec<u8> {
    let src = dir.join(format!("{name}.asm"));
    let out = dir.join(format!("{name}.bin"));
    std::fs::write(&src, source).unwrap();
    let result = Command::new("nasm")
        .args(["-f", "bin", "-o"])
        .arg(&out)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "nasm failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::read(&out).unwrap()
}

/// Macros and the reset vector for a 64 KiB real-mode "firmware" that runs at
/// 0xffff0000 (CS base after reset) and never far-jumps, so PAM changes cannot move it.
pub const PROLOGUE: &str = r#"
bits 16
org 0
%define DEBUGCON 0x402
%macro PUTC 1
    mov dx, DEBUGCON
    mov al, %1
    out dx, al
%endmacro
%macro PUTS 1
    mov si, %1
    call puts
%endmacro
"#;

/// Subroutines (puts: string at cs:si; hex8/hex16/hex32: al/ax/eax as hex) and the
/// reset vector. Append after the program.
pub const EPILOGUE: &str = r#"
puts:
    mov al, [cs:si]
    test al, al
    jz .done
    mov dx, DEBUGCON
    out dx, al
    inc si
    jmp puts
.done:
    ret
hex32:
    push eax
    shr eax, 16
    call hex16
    pop eax
hex16:
    push ax
    mov al, ah
    call hex8
    pop ax
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
halt_forever:
    cli
    hlt
    jmp halt_forever
    times 0xfff0-($-$$) db 0xff
reset_vector:
    jmp start
    times 0x10000-($-$$) db 0xff
"#;

/// Writes a guest program as a firmware image and returns a config that boots it.
pub fn program_config(dir: &Path, name: &str, body: &str) -> VmConfig {
    let image = assemble(dir, name, &format!("{PROLOGUE}\n{body}\n{EPILOGUE}"));
    let bios = dir.join(format!("{name}.rom"));
    std::fs::write(&bios, image).unwrap();
    let mut config = VmConfig {
        name: name.into(),
        memory_mib: 64,
        debugcon: CharOutput::File(dir.join(format!("{name}.debugcon"))),
        ..VmConfig::default()
    };
    config.firmware.bios = Some(bios);
    config
}

pub fn output_of(config: &VmConfig) -> String {
    match &config.debugcon {
        CharOutput::File(p) => read_text(p),
        _ => String::new(),
    }
}

/// Waits (generously; never a timing assertion) until `file` contains `needle`.
pub fn wait_for_text(file: &Path, needle: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(bytes) = std::fs::read(file) {
            if String::from_utf8_lossy(&bytes).contains(needle) {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

pub fn debugcon_path(config: &VmConfig) -> PathBuf {
    match &config.debugcon {
        CharOutput::File(p) => p.clone(),
        _ => panic!("debugcon is not a file"),
    }
}

/// Creates and starts a VM from `config`, waits until its debug console (a file) shows
/// `needle` and returns the VM with that file.
pub fn start_until_debugcon_shows(config: VmConfig, needle: &str) -> (VmHandle, PathBuf) {
    let log = debugcon_path(&config);
    let vm = VmHandle::create(config).unwrap();
    vm.start().unwrap();
    assert!(wait_for_text(&log, needle, LONG), "{}", read_text(&log));
    (vm, log)
}

pub const LONG: Duration = Duration::from_secs(60);
