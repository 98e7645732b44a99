//! Tests against real VNC clients: `vncsnapshot` (Debian package vncsnapshot) takes JPEG
//! screenshots, `vncdo` (PyPI vncdotool, looked up in $VNCDO, /work/targets/venv/bin and
//! $PATH) sends keys and pointer events and captures PNG screenshots. A missing tool skips
//! the test, except when CI=true, where setup must have installed it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_vnc::testing::{InputEvent, RecordingInput, TestSource};
use vmm_vnc::{Rect, VncConfig, VncServer};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Returns the tool, or None after printing SKIPPED (panics in CI).
fn require(tool: Option<PathBuf>, name: &str, install: &str) -> Option<PathBuf> {
    match tool {
        Some(path) => Some(path),
        None if in_ci() => panic!("{name} is missing in CI: {install}"),
        None => {
            println!("SKIPPED: {name} not found ({install})");
            None
        }
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

fn vncsnapshot() -> Option<PathBuf> {
    require(
        find_in_path("vncsnapshot"),
        "vncsnapshot",
        "apt-get install vncsnapshot",
    )
}

fn vncdo() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("VNCDO").map(PathBuf::from),
        Some(PathBuf::from("/work/targets/venv/bin/vncdo")),
        find_in_path("vncdo"),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.is_file());
    require(
        found,
        "vncdo",
        "python3 -m venv /work/targets/venv && /work/targets/venv/bin/pip install vncdotool",
    )
}

const QUADRANTS: [u32; 4] = [0xff0000, 0x00ff00, 0x0000ff, 0xffffff];

fn quadrant_pattern(width: u32, height: u32) -> impl Fn(u32, u32) -> u32 {
    move |x, y| {
        let index = usize::from(x >= width / 2) + 2 * usize::from(y >= height / 2);
        // A thin black grid inside the quadrants exercises Hextile subrectangles.
        if x % 40 == 5 || y % 40 == 5 {
            0x000000
        } else {
            QUADRANTS[index]
        }
    }
}

struct Served {
    source: Arc<TestSource>,
    input: Arc<RecordingInput>,
    server: VncServer,
    dir: PathBuf,
}

fn serve(width: u32, height: u32, password: Option<&str>, tag: &str) -> Served {
    let source = Arc::new(TestSource::new(width, height));
    source.draw(quadrant_pattern(width, height));
    let input = Arc::new(RecordingInput::new());
    let mut config = VncConfig::new("127.0.0.1:0".parse().unwrap());
    config.password = password.map(str::to_string);
    let server = VncServer::start_with_config(config, source.clone(), input.clone()).unwrap();
    let dir = std::env::temp_dir().join(format!("vmm-vnc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Served {
        source,
        input,
        server,
        dir,
    }
}

/// Runs a command with a time limit; returns whether it exited successfully, and its stderr.
fn run_bounded(mut command: Command, limit: Duration) -> (bool, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let output = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            return (status.success(), text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (false, "timed out".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn close(a: u8, b: u8, tolerance: u8) -> bool {
    a.abs_diff(b) <= tolerance
}

fn snapshot_with(encodings: Option<&str>, tag: &str) {
    let Some(tool) = vncsnapshot() else { return };
    let (width, height) = (320, 240);
    let served = serve(width, height, None, tag);
    let out = served.dir.join("shot.jpg");
    let mut command = Command::new(&tool);
    command.args(["-quiet", "-quality", "100", "-nocursor"]);
    if let Some(encodings) = encodings {
        command.args(["-encodings", encodings]);
    }
    command
        .arg(format!("127.0.0.1::{}", served.server.local_addr().port()))
        .arg(&out);
    let (ok, text) = run_bounded(command, Duration::from_secs(20));
    assert!(ok, "vncsnapshot failed: {text}");
    let data = std::fs::read(&out).unwrap();
    let mut decoder = jpeg_decoder::Decoder::new(&data[..]);
    let pixels = decoder.decode().unwrap();
    let info = decoder.info().unwrap();
    assert_eq!(
        (u32::from(info.width), u32::from(info.height)),
        (width, height)
    );
    assert_eq!(info.pixel_format, jpeg_decoder::PixelFormat::RGB24);
    let pattern = quadrant_pattern(width, height);
    // Sample points away from the grid lines and quadrant borders (JPEG blurs edges).
    for (x, y) in [
        (25, 25),
        (60, 100),
        (185, 25),
        (300, 100),
        (25, 145),
        (100, 220),
        (185, 145),
        (300, 220),
    ] {
        let expected = pattern(x, y);
        let at = ((y * width + x) * 3) as usize;
        let got = &pixels[at..at + 3];
        let want = [
            (expected >> 16) as u8,
            (expected >> 8) as u8,
            expected as u8,
        ];
        assert!(
            got.iter().zip(want).all(|(&g, w)| close(g, w, 40)),
            "pixel ({x},{y}) is {got:?}, expected {want:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&served.dir);
}

#[test]
fn vncsnapshot_default_encodings() {
    snapshot_with(None, "snap-default");
}

#[test]
fn vncsnapshot_raw() {
    snapshot_with(Some("raw"), "snap-raw");
}

#[test]
fn vncsnapshot_hextile_and_copyrect() {
    snapshot_with(Some("copyrect hextile"), "snap-hextile");
}

#[test]
fn vncsnapshot_tight() {
    snapshot_with(Some("tight"), "snap-tight");
}

#[test]
fn vncsnapshot_zlib() {
    snapshot_with(Some("zlib raw"), "snap-zlib");
}

fn read_png(path: &Path) -> (u32, u32, Vec<u8>, png::ColorType) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buffer = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buffer).unwrap();
    buffer.truncate(info.buffer_size());
    (info.width, info.height, buffer, info.color_type)
}

fn vncdo_command(tool: &Path, served: &Served, password: Option<&str>) -> Command {
    let mut command = Command::new(tool);
    command
        .arg("-s")
        .arg(format!("127.0.0.1::{}", served.server.local_addr().port()))
        .args(["-t", "15", "--delay", "1", "--nocursor"]);
    if let Some(password) = password {
        command.args(["-p", password]);
    }
    command
}

#[test]
fn vncdo_capture_is_pixel_exact() {
    let Some(tool) = vncdo() else { return };
    let (width, height) = (200, 120);
    let served = serve(width, height, None, "vncdo-capture");
    served.source.fill_rect(Rect::new(10, 10, 7, 3), 0x123456);
    let out = served.dir.join("capture.png");
    let mut command = vncdo_command(&tool, &served, None);
    command.arg("capture").arg(&out);
    let (ok, text) = run_bounded(command, Duration::from_secs(30));
    assert!(ok, "vncdo failed: {text}");
    let (w, h, pixels, colour) = read_png(&out);
    assert_eq!((w, h), (width, height));
    let channels = match colour {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    let expected = served.source.snapshot();
    for (index, want) in expected.iter().enumerate() {
        let got = &pixels[index * channels..index * channels + 3];
        let want = [(want >> 16) as u8, (want >> 8) as u8, *want as u8];
        assert_eq!(got, want, "pixel {index}");
    }
    let _ = std::fs::remove_dir_all(&served.dir);
}

#[test]
fn vncdo_keys_and_pointer_reach_the_input_sink() {
    let Some(tool) = vncdo() else { return };
    let served = serve(201, 101, Some("pass1234"), "vncdo-input");
    let mut command = vncdo_command(&tool, &served, Some("pass1234"));
    command.args([
        "key",
        "a",
        "key",
        "shift-b",
        "key",
        "enter",
        "key",
        "ctrl-alt-del",
        "move",
        "100",
        "50",
        "click",
        "1",
        "click",
        "4",
        "move",
        "200",
        "100",
    ]);
    let (ok, text) = run_bounded(command, Duration::from_secs(30));
    assert!(ok, "vncdo failed: {text}");
    let events = served.input.wait_for(1, Duration::from_secs(5));
    let keys: Vec<(u16, bool)> = events
        .iter()
        .filter_map(|e| match e {
            InputEvent::Key { code, down } => Some((*code, *down)),
            _ => None,
        })
        .collect();
    // a; shift+b; enter; ctrl+alt+delete.
    let presses: Vec<u16> = keys.iter().filter(|(_, d)| *d).map(|(c, _)| *c).collect();
    assert_eq!(presses, vec![30, 42, 48, 28, 29, 56, 111], "{keys:?}");
    assert_eq!(
        keys.iter().filter(|(_, d)| !*d).count(),
        presses.len(),
        "every key released"
    );
    let pointer: Vec<(u16, u16, u8, i8)> = events
        .iter()
        .filter_map(|e| match e {
            InputEvent::Pointer {
                x,
                y,
                buttons,
                wheel,
            } => Some((*x, *y, *buttons, *wheel)),
            _ => None,
        })
        .collect();
    // move 100,50 on a 201x101 frame is the exact middle.
    assert!(pointer.contains(&(0x3fff, 0x3fff, 0, 0)), "{pointer:?}");
    assert!(
        pointer.contains(&(0x3fff, 0x3fff, 1, 0)),
        "left press: {pointer:?}"
    );
    assert!(
        pointer.contains(&(0x3fff, 0x3fff, 0, 1)),
        "wheel up: {pointer:?}"
    );
    assert!(pointer.contains(&(0x7fff, 0x7fff, 0, 0)), "{pointer:?}");
    let _ = std::fs::remove_dir_all(&served.dir);
}

#[test]
fn vncdo_wrong_password_fails() {
    let Some(tool) = vncdo() else { return };
    let served = serve(32, 32, Some("right"), "vncdo-badpw");
    let mut command = vncdo_command(&tool, &served, Some("wrong"));
    command.args(["key", "a"]);
    let (ok, _text) = run_bounded(command, Duration::from_secs(30));
    assert!(!ok, "vncdo succeeded with a wrong password");
    assert!(served.input.events().is_empty());
}

const CAPTURE_WITH_ENCODING: &str = r#"
import sys
from vncdotool import api, rfb, client
client.VNCDoToolClient.encoding = {"zrle": rfb.Encoding.ZRLE, "hextile": rfb.Encoding.HEXTILE}[sys.argv[2]]
proxy = api.connect(sys.argv[1])
proxy.timeout = 15
try:
    proxy.captureScreen(sys.argv[3])
    proxy.disconnect()
finally:
    api.shutdown()
"#;

/// vncdotool's own ZRLE and Hextile decoders read our output pixel-exactly.
#[test]
fn vncdotool_decodes_zrle_and_hextile() {
    let Some(tool) = vncdo() else { return };
    let sibling = tool.with_file_name("python3");
    let python = if sibling.is_file() {
        sibling
    } else {
        PathBuf::from("python3")
    };
    for encoding in ["zrle", "hextile"] {
        let (width, height) = (300, 200);
        let served = serve(width, height, None, &format!("vncdo-{encoding}"));
        // Noise on the right half: raw/RLE tiles next to solid and palette tiles.
        served.source.draw(|x, y| {
            if x >= 150 {
                (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40503)) & 0x00ff_ffff
            } else {
                quadrant_pattern(300, 200)(x, y)
            }
        });
        let out = served.dir.join("capture.png");
        let mut command = Command::new(&python);
        command
            .arg("-c")
            .arg(CAPTURE_WITH_ENCODING)
            .arg(format!("127.0.0.1::{}", served.server.local_addr().port()))
            .arg(encoding)
            .arg(&out);
        let (ok, text) = run_bounded(command, Duration::from_secs(30));
        assert!(ok, "vncdotool {encoding} capture failed: {text}");
        let (w, h, pixels, colour) = read_png(&out);
        assert_eq!((w, h), (width, height));
        let channels = if colour == png::ColorType::Rgba { 4 } else { 3 };
        for (index, want) in served.source.snapshot().iter().enumerate() {
            let got = &pixels[index * channels..index * channels + 3];
            let want = [(want >> 16) as u8, (want >> 8) as u8, *want as u8];
            assert_eq!(got, want, "{encoding}: pixel {index}");
        }
        let _ = std::fs::remove_dir_all(&served.dir);
    }
}
