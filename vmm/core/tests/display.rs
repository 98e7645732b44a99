//! The display end to end: SeaBIOS with `vgabios-cirrus.bin` draws its text screen on the
//! Cirrus card, a real VNC client (`vncsnapshot`) reads the same pixels the engine composed and
//! `tesseract` reads the text off them; a boot-sector guest sets a VBE linear-framebuffer mode
//! and paints it through the framebuffer's KVM memory slot (so the dirty log is what makes the
//! pixels appear), seen by the engine and by a minimal RFB client written here; and a static
//! text screen costs no recomposition except the blinking cursor's cell.
//!
//! Not covered here: VNC input (the vmm-vnc crate's own tests), the Cirrus blitter and
//! hardware cursor (device unit tests), and graphics modes drawn through the banked window.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::*;
use vmm::{BootOrder, DriveConfig, DriveKind, Event, VmConfig, VmHandle, VmmError, VncConfig};

/// How long a text screen must stay unchanged to count as drawn.
const SETTLE: Duration = Duration::from_millis(500);

// ---- prerequisites and VM set-up ------------------------------------------------------

const VGABIOS: &str = "/usr/share/seabios/vgabios-cirrus.bin";

fn require_vgabios() -> Option<()> {
    if Path::new(VGABIOS).is_file() {
        Some(())
    } else {
        missing("vgabios-cirrus.bin (Debian package seabios)")
    }
}

static NEXT_DISPLAY: AtomicU16 = AtomicU16::new(0);

/// Creates the VM with a VNC server on a display number unlikely to be taken (40..90,
/// from the process id), moving on to the next number while one is in use.
fn create_with_vnc(mut config: VmConfig) -> VmHandle {
    let base = 40 + (std::process::id() % 50) as u16;
    let mut last_error = String::new();
    for _ in 0..50 {
        let step = NEXT_DISPLAY.fetch_add(1, Ordering::Relaxed);
        let display = 40 + (base - 40 + step) % 50;
        config.display.vnc = Some(VncConfig {
            address: "127.0.0.1".into(),
            display,
            password: None,
        });
        match VmHandle::create(config.clone()) {
            Ok(vm) => return vm,
            Err(VmmError::Vnc(message)) => last_error = message,
            Err(e) => panic!("VM not created: {e}"),
        }
    }
    panic!("no free VNC display between 40 and 89: {last_error}");
}

/// Waits until `predicate` holds for the text screen; returns it, or panics with what was
/// on screen.
fn wait_for_screen_text(
    vm: &VmHandle,
    timeout: Duration,
    predicate: impl Fn(&str) -> bool,
) -> String {
    let display = vm.display();
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < timeout {
        last = display.text_screen();
        if last.as_deref().is_some_and(&predicate) {
            return last.unwrap_or_default();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("text screen never matched; last seen:\n{last:?}");
}

/// Waits until the frame has not changed for `SETTLE` (a text screen's blinking cursor
/// aside, which changes only its own cell), so that two readers see the same pixels.
fn wait_until_static(vm: &VmHandle, timeout: Duration) {
    let display = vm.display();
    let start = Instant::now();
    let mut since = display.generation();
    let mut quiet_from = Instant::now();
    while start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(50));
        let (now, big_change) = display.with_frame(since, |_, change| match change {
            None => true,
            Some((damage, copies)) => !copies.is_empty() || damage.iter().any(|r| !cursor_sized(r)),
        });
        if now != since && big_change {
            quiet_from = Instant::now();
        }
        since = now;
        if quiet_from.elapsed() >= SETTLE {
            return;
        }
    }
    panic!("the screen never stopped changing");
}

/// A text cell or less (9x16 is the largest VGA text cell SeaBIOS uses; 8x16 is common).
fn cursor_sized(r: &vmm::Rect) -> bool {
    r.width <= 9 && r.height <= 16
}

// ---- test 1: SeaBIOS text screen through vncsnapshot and tesseract ---------------------

#[test]
fn seabios_text_screen_reaches_a_real_vnc_client_and_ocr() {
    if require_kvm().is_none() || require_vgabios().is_none() {
        return;
    }
    let Some(bios) = require_seabios() else {
        return;
    };
    if require_program("vncsnapshot", "-h", "vncsnapshot").is_none()
        || require_program("tesseract", "--version", "tesseract-ocr").is_none()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = seabios_config(dir.path(), "vnc-text", bios, 128);
    config.firmware.boot_menu = true;
    config.firmware.boot_menu_timeout_ms = Some(60_000);
    let vm = create_with_vnc(config);
    vm.start().unwrap();

    let text = wait_for_screen_text(&vm, LONG, |t| {
        t.contains("SeaBIOS") && t.contains("Press ESC for boot menu")
    });
    assert!(text.contains("SeaBIOS (version"), "{text}");
    wait_until_static(&vm, LONG);
    assert_eq!(
        vm.display().size(),
        (720, 400),
        "80x25 text with 9-dot cells"
    );

    // The real client: raw transfer (no lossy transmission), a JPEG file at quality 100.
    let address = vm.vnc_address().unwrap();
    let shot = dir.path().join("vncsnapshot.jpg");
    let output = Command::new("vncsnapshot")
        .args([
            "-quiet",
            "-nojpeg",
            "-quality",
            "100",
            "-nocursor",
            "-encodings",
            "raw",
        ])
        .arg(format!("127.0.0.1:{}", address.port() - 5900))
        .arg(&shot)
        .output()
        .unwrap();
    assert!(
        output.status.success() && shot.is_file(),
        "vncsnapshot failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let (width, height, client_rgb) = decode_jpeg(&shot);
    let (engine_width, engine_height, engine) = vm.display().snapshot_rgb();
    assert_eq!(
        (width, height),
        (engine_width, engine_height),
        "client size"
    );

    // Same pixels, up to JPEG's loss (quality 100 still rounds and subsamples colour). The
    // cursor cell may have blinked between the two reads.
    let mut total = 0u64;
    let mut far = 0usize;
    for (i, &rgb) in engine.iter().enumerate() {
        let diff = (0..3)
            .map(|c| {
                let e = ((rgb >> (16 - 8 * c)) & 0xff) as i32;
                (e - i32::from(client_rgb[i * 3 + c])).unsigned_abs()
            })
            .max()
            .unwrap();
        total += u64::from(diff);
        if diff > 96 {
            far += 1;
        }
    }
    let mean = total as f64 / engine.len() as f64;
    assert!(
        mean < 6.0 && far < engine.len() / 200,
        "the VNC client's image differs from the engine's frame: mean {mean:.2}, {far} pixels far off"
    );
    let lit = engine.iter().filter(|&&p| p != 0).count();
    assert!(
        lit > 1000,
        "the engine's frame is nearly black ({lit} lit pixels)"
    );

    // OCR what the client saw: light-on-dark text, so invert and enlarge it first.
    let pgm = dir.path().join("ocr.pgm");
    write_inverted_scaled_pgm(&pgm, width, height, &client_rgb, 3);
    let output = Command::new("tesseract")
        .arg(&pgm)
        .arg("stdout")
        .args(["--psm", "6"])
        .output()
        .unwrap();
    let ocr = String::from_utf8_lossy(&output.stdout);
    // Case aside: at VGA font size tesseract sometimes reads the "B" as "b".
    assert!(
        output.status.success() && ocr.to_lowercase().contains("seabios"),
        "tesseract did not read \"SeaBIOS\" off the VNC client's image:\n{ocr}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        ocr.contains("Press ESC"),
        "boot-menu prompt not read:\n{ocr}"
    );
    vm.power_off().unwrap();
}

/// Decodes a JPEG file into (width, height, RGB bytes).
fn decode_jpeg(path: &Path) -> (u32, u32, Vec<u8>) {
    let file = std::fs::File::open(path).unwrap();
    let mut decoder = jpeg_decoder::Decoder::new(std::io::BufReader::new(file));
    let pixels = decoder.decode().unwrap();
    let info = decoder.info().unwrap();
    let rgb = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => pixels,
        jpeg_decoder::PixelFormat::L8 => pixels.iter().flat_map(|&l| [l, l, l]).collect(),
        other => panic!("unexpected JPEG pixel format {other:?}"),
    };
    (u32::from(info.width), u32::from(info.height), rgb)
}

/// Writes a greyscale PGM, inverted and enlarged `scale` times (tesseract reads dark text on
/// light best, at more pixels per glyph than a VGA font has).
fn write_inverted_scaled_pgm(path: &Path, width: u32, height: u32, rgb: &[u8], scale: u32) {
    let mut out = format!("P5\n{} {}\n255\n", width * scale, height * scale).into_bytes();
    for y in 0..height * scale {
        for x in 0..width * scale {
            let i = ((y / scale) * width + x / scale) as usize * 3;
            let luma =
                (u32::from(rgb[i]) * 3 + u32::from(rgb[i + 1]) * 6 + u32::from(rgb[i + 2])) / 10;
            out.push(255 - luma as u8);
        }
    }
    std::fs::write(path, out).unwrap();
}

// ---- test 3: a static screen costs nothing but the cursor -----------------------------

#[test]
fn static_text_screen_is_only_recomposed_for_the_cursor() {
    if require_kvm().is_none() || require_vgabios().is_none() {
        return;
    }
    let Some(bios) = require_seabios() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = seabios_config(dir.path(), "static", bios, 128);
    config.firmware.boot_menu = true;
    config.firmware.boot_menu_timeout_ms = Some(60_000);
    let vm = VmHandle::create(config).unwrap();
    vm.start().unwrap();
    wait_for_screen_text(&vm, LONG, |t| t.contains("Press ESC for boot menu"));
    wait_until_static(&vm, LONG);

    // Poll over many refresh ticks (30 ms each): every change must be one text cell.
    let display = vm.display();
    let mut since = display.generation();
    let mut cells = Vec::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let (now, damage) = display.with_frame(since, |_, change| {
            change.map(|(damage, copies)| {
                assert!(copies.is_empty(), "copies on a static screen: {copies:?}");
                damage.to_vec()
            })
        });
        if now == since {
            continue;
        }
        let damage = damage.unwrap_or_else(|| {
            panic!("a full-frame change on a static screen (generation {since} -> {now})")
        });
        for r in &damage {
            assert!(
                cursor_sized(r),
                "damage larger than the cursor's cell: {r:?}"
            );
            if !cells.contains(r) {
                cells.push(*r);
            }
        }
        since = now;
    }
    assert!(
        cells.len() <= 1,
        "several cells change on a static screen (only the cursor may blink): {cells:?}"
    );
    vm.power_off().unwrap();
}

// ---- test 2: VBE linear framebuffer modes from a boot sector ---------------------------

/// A boot sector: VBE mode info (4F01) and mode set with the linear framebuffer (4F02) for
/// the mode word at offset 0x1fa, a report on the debug console, then 32-bit protected
/// mode, red top half and blue bottom half in the mode's pixel format, "VBE-DONE", halt.
const VBE_BOOT_SECTOR: &str = r#"
bits 16
org 0x7c00
%define DEBUGCON 0x402
%define INFO 0x600
start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7c00
    sti
    mov si, msg_boot
    call puts
    mov ax, 0x4f01
    mov cx, [mode]
    mov di, INFO
    int 0x10
    cmp ax, 0x004f
    jne fail
    ; linear framebuffer, and keep VRAM (clearing 4 MiB through the trapped banked
    ; window takes SeaBIOS about two million MMIO exits)
    mov ax, 0x4f02
    mov bx, [mode]
    or bx, 0xc000
    int 0x10
    cmp ax, 0x004f
    jne fail
    ; "VBE pitch xres yres bpp lfb"
    mov si, msg_vbe
    call puts
    mov ax, [INFO + 0x10]
    call hex16
    call space
    mov ax, [INFO + 0x12]
    call hex16
    call space
    mov ax, [INFO + 0x14]
    call hex16
    call space
    mov al, [INFO + 0x19]
    call hex8
    call space
    mov ax, [INFO + 0x2a]
    call hex16
    mov ax, [INFO + 0x28]
    call hex16
    mov al, 10
    call putc
    cli
    lgdt [gdt_descriptor]
    mov eax, cr0
    or al, 1
    mov cr0, eax
    jmp dword 0x08:protected

fail:
    push ax
    mov si, msg_fail
    call puts
    pop ax
    call hex16
    mov al, 10
    call putc
    jmp halt

space:
    mov al, ' '
putc:
    mov dx, DEBUGCON
    out dx, al
    ret
puts:
    lodsb
    test al, al
    jz .done
    call putc
    jmp puts
.done:
    ret
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
    jbe putc
    add al, 'a' - '0' - 10
    jmp putc

bits 32
protected:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x7c00
    ; colour = ((1 << size) - 1) << position, from the mode's red and blue fields
    mov cl, [INFO + 0x1f]
    mov ch, [INFO + 0x20]
    call field_mask
    mov [red], eax
    mov cl, [INFO + 0x23]
    mov ch, [INFO + 0x24]
    call field_mask
    mov [blue], eax
    movzx eax, byte [INFO + 0x19]
    add eax, 7
    shr eax, 3
    mov [bytes_per_pixel], eax
    movzx eax, word [INFO + 0x14]
    shr eax, 1
    mov [half_rows], eax
    mov edi, [INFO + 0x28]
    mov edx, [red]
    call fill_half
    mov edx, [blue]
    call fill_half
    mov esi, msg_done
.out:
    mov al, [esi]
    test al, al
    jz halt
    mov dx, DEBUGCON
    out dx, al
    inc esi
    jmp .out

field_mask:
    mov eax, 1
    shl eax, cl
    dec eax
    mov cl, ch
    shl eax, cl
    ret

; Paints half_rows rows from edi in colour edx: the first row pixel by pixel, the others
; copied from it. Leaves edi at the row after.
fill_half:
    push edi
    movzx ecx, word [INFO + 0x12]
.pixel:
    mov [edi], edx
    add edi, [bytes_per_pixel]
    loop .pixel
    pop esi
    movzx ebx, word [INFO + 0x10]
    lea edi, [esi + ebx]
    mov ebp, [half_rows]
    dec ebp
.row:
    push esi
    mov ecx, ebx
    shr ecx, 2
    rep movsd
    pop esi
    dec ebp
    jnz .row
    ret

halt:
    cli
    hlt
    jmp halt

align 8
gdt:
    dq 0
    dq 0x00cf9a000000ffff
    dq 0x00cf92000000ffff
gdt_descriptor:
    dw gdt_descriptor - gdt - 1
    dd gdt

red: dd 0
blue: dd 0
bytes_per_pixel: dd 0
half_rows: dd 0
msg_boot: db "BOOT", 10, 0
msg_vbe: db "VBE ", 0
msg_fail: db "VBE-FAIL ", 0
msg_done: db "VBE-DONE", 10, 0
    times 0x1fa - ($ - $$) db 0
mode: dw 0xffff
    dw 0
    dw 0xaa55
"#;

/// Offset of the mode word in the assembled boot sector.
const MODE_OFFSET: usize = 0x1fa;

fn vbe_disk(dir: &Path, mode: u16) -> PathBuf {
    let mut sector = assemble(dir, "vbe", VBE_BOOT_SECTOR);
    assert_eq!(sector.len(), 512, "boot sector must be one sector");
    assert_eq!(&sector[MODE_OFFSET..MODE_OFFSET + 2], &[0xff, 0xff]);
    sector[MODE_OFFSET..MODE_OFFSET + 2].copy_from_slice(&mode.to_le_bytes());
    sector.resize(1 << 20, 0);
    let path = dir.join(format!("vbe-{mode:x}.img"));
    std::fs::write(&path, sector).unwrap();
    path
}

fn run_vbe_mode(mode: u16, width: u32, height: u32, bits_per_pixel: u32) {
    if require_kvm().is_none() || require_nasm().is_none() || require_vgabios().is_none() {
        return;
    }
    let Some(bios) = require_seabios() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let disk = vbe_disk(dir.path(), mode);
    let mut config = seabios_config(dir.path(), &format!("vbe-{mode:x}"), bios, 128);
    config.drives = vec![DriveConfig {
        kind: DriveKind::Disk,
        path: Some(disk),
        read_only: false,
    }];
    config.boot_order = BootOrder::Disk;
    let log = debugcon_path(&config);
    let vm = create_with_vnc(config);
    let events = vm.subscribe();
    vm.start().unwrap();
    // The client connects while SeaBIOS still shows text, so it must follow the resize.
    let mut client = RfbClient::connect(vm.vnc_address().unwrap());

    assert!(
        wait_for_text(&log, "VBE-DONE", LONG),
        "the guest never finished drawing:\n{}",
        tail(&read_text(&log))
    );
    let out = read_text(&log);
    let pitch = width * bits_per_pixel.div_ceil(8);
    let expected = format!("VBE {pitch:04x} {width:04x} {height:04x} {bits_per_pixel:02x} ");
    assert!(
        out.contains(&expected),
        "mode info {expected:?} not in:\n{}",
        tail(&out)
    );

    // The engine's frame: new size, red above, blue below.
    let display = vm.display();
    let start = Instant::now();
    let mut verdict = String::new();
    while start.elapsed() < LONG {
        let (w, h, rgb) = display.snapshot_rgb();
        match check_red_over_blue(w, h, |x, y| rgb[(y * w + x) as usize], (width, height)) {
            Ok(()) => {
                verdict.clear();
                break;
            }
            Err(e) => verdict = e,
        }
        display.wait_for_change(display.generation(), Duration::from_millis(500));
    }
    assert!(
        verdict.is_empty(),
        "the engine's frame never showed the guest's drawing (the framebuffer slot's dirty log \
         is not reaching the card?): {verdict}"
    );
    let resized = collect_events(&events)
        .into_iter()
        .any(|e| e == Event::DisplayResized { width, height });
    assert!(resized, "no DisplayResized {{ {width}, {height} }} event");

    // The VNC client: it followed the resize and holds the same picture.
    let frame = client.wait_for(LONG, |fb| {
        check_red_over_blue(fb.width, fb.height, |x, y| fb.pixel(x, y), (width, height)).is_ok()
    });
    let (w, h) = (frame.width, frame.height);
    check_red_over_blue(w, h, |x, y| frame.pixel(x, y), (width, height))
        .unwrap_or_else(|e| panic!("VNC client: {e}"));
    assert!(
        client.resizes > 0,
        "the VNC client was never told the new size"
    );
    vm.power_off().unwrap();
}

#[test]
fn vbe_1024x768x16_linear_framebuffer_reaches_engine_and_vnc() {
    run_vbe_mode(0x117, 1024, 768, 16);
}

#[test]
fn vbe_800x600x24_linear_framebuffer_reaches_engine_and_vnc() {
    run_vbe_mode(0x115, 800, 600, 24);
}

/// Checks a picture of `size` whose top half is saturated red and bottom half saturated blue
/// (sampled on a grid, all of it).
fn check_red_over_blue(
    width: u32,
    height: u32,
    pixel: impl Fn(u32, u32) -> u32,
    size: (u32, u32),
) -> Result<(), String> {
    if (width, height) != size {
        return Err(format!(
            "size {width}x{height}, expected {}x{}",
            size.0, size.1
        ));
    }
    let channels = |p: u32| ((p >> 16) & 0xff, (p >> 8) & 0xff, p & 0xff);
    let is_red = |p: u32| matches!(channels(p), (0xf0.., ..0x10, ..0x10));
    let is_blue = |p: u32| matches!(channels(p), (..0x10, ..0x10, 0xf0..));
    for y in (0..height)
        .step_by(7)
        .chain([0, height / 2 - 1, height / 2, height - 1])
    {
        for x in (0..width).step_by(5).chain([width - 1]) {
            let p = pixel(x, y);
            let ok = if y < height / 2 {
                is_red(p)
            } else {
                is_blue(p)
            };
            if !ok {
                return Err(format!("pixel ({x}, {y}) is {p:06x}"));
            }
        }
    }
    Ok(())
}

fn collect_events(events: &Receiver<Event>) -> Vec<Event> {
    events.try_iter().collect()
}

fn tail(text: &str) -> &str {
    let start = text.len().saturating_sub(3000);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    &text[start..]
}

// ---- a minimal RFB client (RFC 6143): None security, 32-bit pixels, Raw, DesktopSize ---

struct Framebuffer {
    width: u32,
    height: u32,
    /// 0x00RRGGBB per pixel.
    pixels: Vec<u32>,
}

impl Framebuffer {
    fn pixel(&self, x: u32, y: u32) -> u32 {
        self.pixels[(y * self.width + x) as usize]
    }
}

struct RfbClient {
    stream: TcpStream,
    fb: Framebuffer,
    resizes: u32,
}

const ENCODING_RAW: i32 = 0;
const ENCODING_DESKTOP_SIZE: i32 = -223;

impl RfbClient {
    fn connect(address: SocketAddr) -> RfbClient {
        let mut stream = TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(LONG)).unwrap();
        let mut version = [0u8; 12];
        stream.read_exact(&mut version).unwrap();
        assert_eq!(&version[..4], b"RFB ", "not an RFB server");
        stream.write_all(b"RFB 003.008\n").unwrap();
        let count = read_u8(&mut stream);
        assert!(count > 0, "server refused the connection");
        let mut types = vec![0u8; count as usize];
        stream.read_exact(&mut types).unwrap();
        assert!(types.contains(&1), "no None security offered: {types:?}");
        stream.write_all(&[1]).unwrap();
        assert_eq!(read_u32(&mut stream), 0, "security handshake failed");
        stream.write_all(&[1]).unwrap(); // ClientInit: shared
        let width = u32::from(read_u16(&mut stream));
        let height = u32::from(read_u16(&mut stream));
        let mut server_format = [0u8; 16];
        stream.read_exact(&mut server_format).unwrap();
        let name_length = read_u32(&mut stream);
        let mut name = vec![0u8; name_length as usize];
        stream.read_exact(&mut name).unwrap();

        // SetPixelFormat: 32 bpp, depth 24, little endian, true colour, 8 bits each at 16/8/0.
        let mut message = vec![0u8, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0];
        message.extend_from_slice(&[0, 0, 0]);
        // SetEncodings: Raw and DesktopSize.
        message.extend_from_slice(&[2, 0, 0, 2]);
        message.extend_from_slice(&ENCODING_RAW.to_be_bytes());
        message.extend_from_slice(&ENCODING_DESKTOP_SIZE.to_be_bytes());
        stream.write_all(&message).unwrap();
        let mut client = RfbClient {
            stream,
            fb: Framebuffer {
                width,
                height,
                pixels: vec![0; (width * height) as usize],
            },
            resizes: 0,
        };
        client.request(false);
        client
    }

    fn request(&mut self, incremental: bool) {
        let mut message = vec![3u8, u8::from(incremental), 0, 0, 0, 0];
        message.extend_from_slice(&(self.fb.width as u16).to_be_bytes());
        message.extend_from_slice(&(self.fb.height as u16).to_be_bytes());
        self.stream.write_all(&message).unwrap();
    }

    /// Reads updates (asking for the next after each) until `done` holds for the
    /// framebuffer or `timeout` passes.
    fn wait_for(&mut self, timeout: Duration, done: impl Fn(&Framebuffer) -> bool) -> &Framebuffer {
        let start = Instant::now();
        while !done(&self.fb) {
            let left = timeout.checked_sub(start.elapsed()).unwrap_or_else(|| {
                panic!(
                    "the VNC client never saw the expected picture ({}x{})",
                    self.fb.width, self.fb.height
                )
            });
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            self.read_message();
        }
        &self.fb
    }

    fn read_message(&mut self) {
        let kind = read_u8(&mut self.stream);
        match kind {
            0 => {
                read_u8(&mut self.stream);
                let rectangles = read_u16(&mut self.stream);
                let mut resized = false;
                for _ in 0..rectangles {
                    let x = u32::from(read_u16(&mut self.stream));
                    let y = u32::from(read_u16(&mut self.stream));
                    let w = u32::from(read_u16(&mut self.stream));
                    let h = u32::from(read_u16(&mut self.stream));
                    let encoding = read_u32(&mut self.stream) as i32;
                    match encoding {
                        ENCODING_RAW => {
                            let mut data = vec![0u8; (w * h * 4) as usize];
                            self.stream.read_exact(&mut data).unwrap();
                            assert!(x + w <= self.fb.width && y + h <= self.fb.height);
                            for row in 0..h {
                                for col in 0..w {
                                    let i = ((row * w + col) * 4) as usize;
                                    let p =
                                        u32::from_le_bytes([data[i], data[i + 1], data[i + 2], 0]);
                                    let at = ((y + row) * self.fb.width + x + col) as usize;
                                    self.fb.pixels[at] = p;
                                }
                            }
                        }
                        ENCODING_DESKTOP_SIZE => {
                            self.fb = Framebuffer {
                                width: w,
                                height: h,
                                pixels: vec![0; (w * h) as usize],
                            };
                            self.resizes += 1;
                            resized = true;
                        }
                        other => panic!("server sent encoding {other}, which was not asked for"),
                    }
                }
                // After a resize ask for everything again.
                self.request(!resized);
            }
            2 => {} // Bell
            3 => {
                let mut pad = [0u8; 3];
                self.stream.read_exact(&mut pad).unwrap();
                let length = read_u32(&mut self.stream);
                let mut text = vec![0u8; length as usize];
                self.stream.read_exact(&mut text).unwrap();
            }
            other => panic!("unexpected server message type {other}"),
        }
    }
}

fn read_u8(s: &mut TcpStream) -> u8 {
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    b[0]
}

fn read_u16(s: &mut TcpStream) -> u16 {
    let mut b = [0u8; 2];
    s.read_exact(&mut b).unwrap();
    u16::from_be_bytes(b)
}

fn read_u32(s: &mut TcpStream) -> u32 {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    u32::from_be_bytes(b)
}
