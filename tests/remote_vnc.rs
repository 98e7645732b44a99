//! The remote console's VNC session (src/app/remote.rs, without GTK) against DeskVM's own
//! VNC server serving a known pattern: the frame arrives with the right pixels, keys and
//! the pointer reach the server, typed text arrives with Shift where needed, a wrong
//! password gives an authentication error and a closed port a connection error. And against
//! a scripted RFB 3.8 server written here: the exact keysyms sent (Shift, Caps Lock, typed
//! text), the desktop name, a PNG screenshot of the remote pixels, and hostile handshakes
//! and messages (bad SecurityResult, a 4 GiB name, SetColorMapEntries) ending the session
//! without a panic.

#[allow(dead_code)]
#[path = "../src/app/remote.rs"]
mod remote;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use remote::{RemoteError, RemoteSession, RemoteStatus, RemoteTarget};
use vmm_vnc::testing::{InputEvent, RecordingInput, TestSource};

/// Linux evdev codes used below.
const KEY_LEFTSHIFT: u16 = 42;
const KEY_1: u16 = 2;
const KEY_A: u16 = 30;
const KEY_H: u16 = 35;
const KEY_I: u16 = 23;
const KEY_SLASH: u16 = 53;
const KEY_CAPSLOCK: u16 = 58;
/// X11 keysyms.
const XK_SHIFT_L: u32 = 0xffe1;
const XK_CAPS_LOCK: u32 = 0xffe5;
use vmm_vnc::{Rect, VncServer};

const WAIT: Duration = Duration::from_secs(10);

fn pattern(x: u32, y: u32) -> u32 {
    ((x * 7) & 0xff) << 16 | ((y * 5) & 0xff) << 8 | ((x + y) & 0xff)
}

fn serve(password: Option<&str>) -> (VncServer, Arc<TestSource>, Arc<RecordingInput>) {
    let source = Arc::new(TestSource::new(64, 48));
    source.draw(pattern);
    let input = Arc::new(RecordingInput::new());
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = VncServer::start(
        listen,
        password.map(str::to_string),
        source.clone(),
        input.clone(),
    )
    .unwrap();
    (server, source, input)
}

fn target(server: &VncServer, password: &str) -> RemoteTarget {
    RemoteTarget {
        host: "127.0.0.1".into(),
        port: server.local_addr().port(),
        password: password.into(),
    }
}

/// Waits until `check` holds for the session's frame.
fn wait_until(session: &RemoteSession, check: impl Fn(&RemoteSession) -> bool) -> bool {
    let mut generation = session.generation();
    for _ in 0..50 {
        if check(session) {
            return true;
        }
        generation = session.wait_for_frame(generation, Duration::from_millis(200));
    }
    check(session)
}

#[test]
fn the_frame_arrives_and_updates_and_input_goes_back() {
    let (server, source, input) = serve(Some("secret"));
    let session = RemoteSession::start(target(&server, "secret"));
    assert_eq!(session.wait_connected(WAIT), RemoteStatus::Connected);
    assert!(
        wait_until(&session, |s| s.pixel(63, 47) == Some(pattern(63, 47))),
        "status {:?}",
        session.status()
    );
    for (x, y) in [(0, 0), (10, 3), (31, 40), (63, 0)] {
        assert_eq!(session.pixel(x, y), Some(pattern(x, y)), "({x}, {y})");
    }
    assert_eq!(session.pixel(64, 0), None);

    // An update after the first frame.
    source.fill_rect(Rect::new(8, 8, 4, 4), 0x00ff_0000);
    assert!(wait_until(&session, |s| s.pixel(9, 9) == Some(0xff0000)));
    assert_eq!(session.pixel(12, 9), Some(pattern(12, 9)));

    // A resize.
    source.resize(80, 60);
    assert!(wait_until(&session, |s| s
        .frame_since(0)
        .is_some_and(|(_, f)| (f.width, f.height) == (80, 60))));

    // Key A (evdev 30) and the pointer in the middle with the left button.
    session.key(30, true);
    session.key(30, false);
    session.pointer_absolute(0x4000, 0x4000, 1);
    let events = input.wait_for(3, WAIT);
    assert!(events.contains(&InputEvent::Key {
        code: 30,
        down: true
    }));
    assert!(events.contains(&InputEvent::Key {
        code: 30,
        down: false
    }));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, InputEvent::Pointer { buttons: 1, .. })),
        "{events:?}"
    );

    drop(session);
    drop(server);
}

#[test]
fn a_wrong_password_is_an_authentication_error() {
    let (server, _, _) = serve(Some("secret"));
    let session = RemoteSession::start(target(&server, "wrong"));
    match session.wait_connected(WAIT) {
        RemoteStatus::Failed(RemoteError::AuthFailed { .. }) => {}
        other => panic!("expected an authentication error, got {other:?}"),
    }
    let session = RemoteSession::start(target(&server, ""));
    assert_eq!(
        session.wait_connected(WAIT),
        RemoteStatus::Failed(RemoteError::PasswordRequired)
    );
}

#[test]
fn a_closed_port_is_a_connection_error() {
    // A port that was free a moment ago.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let session = RemoteSession::start(RemoteTarget {
        host: "127.0.0.1".into(),
        port,
        password: String::new(),
    });
    match session.wait_connected(WAIT) {
        RemoteStatus::Failed(e @ RemoteError::ConnectionRefused { .. }) => {
            assert!(e.to_string().contains("refused"), "{e}");
        }
        other => panic!("expected connection refused, got {other:?}"),
    }
}

#[test]
fn a_bad_host_is_reported_as_such() {
    let session = RemoteSession::start(RemoteTarget {
        host: "no such host".into(),
        port: 5900,
        password: String::new(),
    });
    assert!(matches!(
        session.wait_connected(WAIT),
        RemoteStatus::Failed(RemoteError::BadHost { .. })
    ));
}

#[test]
fn typed_text_and_shifted_keys_reach_deskvms_server_with_shift() {
    let (server, _source, input) = serve(None);
    let session = RemoteSession::start(target(&server, ""));
    assert_eq!(session.wait_connected(WAIT), RemoteStatus::Connected);
    assert_eq!(session.type_text("Hi!"), 0);
    let key = |code: u16, down: bool| InputEvent::Key { code, down };
    let expected = vec![
        key(KEY_LEFTSHIFT, true),
        key(KEY_H, true),
        key(KEY_H, false),
        key(KEY_LEFTSHIFT, false),
        key(KEY_I, true),
        key(KEY_I, false),
        key(KEY_LEFTSHIFT, true),
        key(KEY_1, true),
        key(KEY_1, false),
        key(KEY_LEFTSHIFT, false),
    ];
    let keys_only = |events: Vec<InputEvent>| -> Vec<InputEvent> {
        events
            .into_iter()
            .filter(|e| matches!(e, InputEvent::Key { .. }))
            .collect()
    };
    assert_eq!(keys_only(input.wait_for(expected.len(), WAIT)), expected);
}

/// What the scripted server received from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ClientMessage {
    Key(u32, bool),
    Pointer(u16, u16, u8),
}

/// How the scripted server behaves.
struct Script {
    security_result: [u8; 4],
    /// The name length announced in ServerInit (the name's own length when None).
    name_len: Option<u32>,
    name: Vec<u8>,
    /// Bytes sent right after ServerInit.
    after_init: Vec<u8>,
}

impl Script {
    fn friendly(name: &str) -> Self {
        Script {
            security_result: [0; 4],
            name_len: None,
            name: name.as_bytes().to_vec(),
            after_init: Vec::new(),
        }
    }
}

const SCRIPTED_WIDTH: u16 = 4;
const SCRIPTED_HEIGHT: u16 = 2;

/// The scripted screen's pixel at (x, y) as 0x00RRGGBB.
fn scripted_pixel(x: u16, y: u16) -> u32 {
    0x0010_2030 + u32::from(x) * 0x0010_0000 + u32::from(y) * 0x0000_4000 + u32::from(x)
}

fn read_exact(stream: &mut TcpStream, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0; len];
    stream.read_exact(&mut buf).ok()?;
    Some(buf)
}

/// Runs an RFB 3.8 server with no authentication for one client following `script`;
/// what the client sends comes out of the returned channel.
fn scripted_server(script: Script) -> (u16, mpsc::Receiver<ClientMessage>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
        let _ = serve_script(&mut stream, &script, &tx);
    });
    (port, rx)
}

fn serve_script(
    stream: &mut TcpStream,
    script: &Script,
    tx: &mpsc::Sender<ClientMessage>,
) -> Option<()> {
    stream.write_all(b"RFB 003.008\n").ok()?;
    read_exact(stream, 12)?;
    stream.write_all(&[1, 1]).ok()?; // one security type: None
    read_exact(stream, 1)?;
    stream.write_all(&script.security_result).ok()?;
    read_exact(stream, 1)?; // ClientInit
    let mut init = Vec::new();
    init.extend_from_slice(&SCRIPTED_WIDTH.to_be_bytes());
    init.extend_from_slice(&SCRIPTED_HEIGHT.to_be_bytes());
    // 32 bpp, depth 24, little-endian, true colour, max 255, shifts 16/8/0.
    init.extend_from_slice(&[32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
    let name_len = script.name_len.unwrap_or(script.name.len() as u32);
    init.extend_from_slice(&name_len.to_be_bytes());
    init.extend_from_slice(&script.name);
    stream.write_all(&init).ok()?;
    stream.write_all(&script.after_init).ok()?;
    let mut sent_frame = false;
    loop {
        let kind = read_exact(stream, 1)?[0];
        match kind {
            0 => {
                read_exact(stream, 19)?;
            }
            2 => {
                let head = read_exact(stream, 3)?;
                let count = u16::from_be_bytes([head[1], head[2]]);
                read_exact(stream, usize::from(count) * 4)?;
            }
            3 => {
                read_exact(stream, 9)?;
                if !sent_frame {
                    sent_frame = true;
                    // One raw rectangle with the whole screen, in the client's BGRX format.
                    let mut update = vec![0, 0, 0, 1, 0, 0, 0, 0];
                    update.extend_from_slice(&SCRIPTED_WIDTH.to_be_bytes());
                    update.extend_from_slice(&SCRIPTED_HEIGHT.to_be_bytes());
                    update.extend_from_slice(&0u32.to_be_bytes());
                    for y in 0..SCRIPTED_HEIGHT {
                        for x in 0..SCRIPTED_WIDTH {
                            update.extend_from_slice(&scripted_pixel(x, y).to_le_bytes());
                        }
                    }
                    stream.write_all(&update).ok()?;
                }
            }
            4 => {
                let body = read_exact(stream, 7)?;
                let keysym = u32::from_be_bytes([body[3], body[4], body[5], body[6]]);
                tx.send(ClientMessage::Key(keysym, body[0] != 0)).ok()?;
            }
            5 => {
                let body = read_exact(stream, 5)?;
                tx.send(ClientMessage::Pointer(
                    u16::from_be_bytes([body[1], body[2]]),
                    u16::from_be_bytes([body[3], body[4]]),
                    body[0],
                ))
                .ok()?;
            }
            6 => {
                let head = read_exact(stream, 7)?;
                let len = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
                read_exact(stream, len.min(1 << 20) as usize)?;
            }
            _ => return None,
        }
    }
}

fn scripted_target(port: u16) -> RemoteTarget {
    RemoteTarget {
        host: "127.0.0.1".into(),
        port,
        password: String::new(),
    }
}

/// The next `count` key events the scripted server receives.
fn next_keys(rx: &mpsc::Receiver<ClientMessage>, count: usize) -> Vec<(u32, bool)> {
    let mut keys = Vec::new();
    while keys.len() < count {
        match rx.recv_timeout(WAIT) {
            Ok(ClientMessage::Key(keysym, down)) => keys.push((keysym, down)),
            Ok(ClientMessage::Pointer(..)) => {}
            Err(e) => panic!("after {keys:x?}: {e}"),
        }
    }
    keys
}

#[test]
fn keys_leave_as_the_keysyms_shift_and_caps_lock_give() {
    let (port, rx) = scripted_server(Script::friendly("Scripted Desk"));
    let session = RemoteSession::start(scripted_target(port));
    assert_eq!(session.wait_connected(WAIT), RemoteStatus::Connected);
    assert_eq!(session.desktop_name().as_deref(), Some("Scripted Desk"));

    // Shift+1 is exclam, Shift+a is A, Shift+/ is question; released as pressed, even
    // when Shift goes up first.
    for (code, down) in [
        (KEY_LEFTSHIFT, true),
        (KEY_1, true),
        (KEY_1, false),
        (KEY_A, true),
        (KEY_A, false),
        (KEY_SLASH, true),
        (KEY_LEFTSHIFT, false),
        (KEY_SLASH, false),
        (KEY_1, true),
        (KEY_1, false),
    ] {
        session.key(code, down);
    }
    assert_eq!(
        next_keys(&rx, 10),
        vec![
            (XK_SHIFT_L, true),
            (0x21, true),
            (0x21, false),
            (u32::from(b'A'), true),
            (u32::from(b'A'), false),
            (u32::from(b'?'), true),
            (XK_SHIFT_L, false),
            (u32::from(b'?'), false),
            (u32::from(b'1'), true),
            (u32::from(b'1'), false),
        ]
    );

    // Caps Lock: letters upper case, digits not.
    for (code, down) in [
        (KEY_CAPSLOCK, true),
        (KEY_CAPSLOCK, false),
        (KEY_A, true),
        (KEY_A, false),
        (KEY_1, true),
        (KEY_1, false),
    ] {
        session.key(code, down);
    }
    assert!(session.caps_lock());
    assert_eq!(
        next_keys(&rx, 6),
        vec![
            (XK_CAPS_LOCK, true),
            (XK_CAPS_LOCK, false),
            (u32::from(b'A'), true),
            (u32::from(b'A'), false),
            (u32::from(b'1'), true),
            (u32::from(b'1'), false),
        ]
    );

    // Typed text gives each character's keysym, Shift only where the US layout needs it,
    // whatever Caps Lock is.
    assert_eq!(session.type_text("a~\u{e9}"), 1);
    assert_eq!(
        next_keys(&rx, 6),
        vec![
            (u32::from(b'a'), true),
            (u32::from(b'a'), false),
            (XK_SHIFT_L, true),
            (u32::from(b'~'), true),
            (u32::from(b'~'), false),
            (XK_SHIFT_L, false),
        ]
    );

    // Keys held when the console lets go are released (Shift with Caps Lock: lower case).
    session.key(KEY_LEFTSHIFT, true);
    session.key(KEY_A, true);
    session.release_all_keys();
    let mut released = next_keys(&rx, 4);
    released[2..].sort_unstable();
    assert_eq!(
        released,
        vec![
            (XK_SHIFT_L, true),
            (u32::from(b'a'), true),
            (u32::from(b'a'), false),
            (XK_SHIFT_L, false),
        ]
    );
}

#[test]
fn a_screenshot_is_a_png_of_the_remote_pixels() {
    let (port, _rx) = scripted_server(Script::friendly(""));
    let session = RemoteSession::start(scripted_target(port));
    assert_eq!(session.wait_connected(WAIT), RemoteStatus::Connected);
    assert_eq!(session.desktop_name(), None);
    let last = (SCRIPTED_WIDTH - 1, SCRIPTED_HEIGHT - 1);
    assert!(wait_until(&session, |s| s
        .pixel(u32::from(last.0), u32::from(last.1))
        == Some(scripted_pixel(last.0, last.1))));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("remote.png");
    session.screenshot_png(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&bytes[12..16], b"IHDR");
    assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 4);
    assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 2);
    let png = gtk::gdk_pixbuf::Pixbuf::from_file(&path).unwrap();
    assert_eq!((png.width(), png.height()), (4, 2));
    assert_eq!(png.bits_per_sample(), 8);
    let channels = png.n_channels() as usize;
    let stride = png.rowstride() as usize;
    let pixels = png.read_pixel_bytes();
    for y in 0..SCRIPTED_HEIGHT {
        for x in 0..SCRIPTED_WIDTH {
            let at = usize::from(y) * stride + usize::from(x) * channels;
            let rgb = u32::from(pixels[at]) << 16
                | u32::from(pixels[at + 1]) << 8
                | u32::from(pixels[at + 2]);
            assert_eq!(rgb, scripted_pixel(x, y), "({x}, {y})");
        }
    }

    // No frame yet: an error, no file.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unconnected = RemoteSession::start(scripted_target(port));
    let missing = dir.path().join("none.png");
    assert_eq!(
        unconnected.screenshot_png(&missing),
        Err(remote::ScreenshotError::NoFrame)
    );
    assert!(!missing.exists());
}

#[test]
fn hostile_handshakes_fail_the_session_without_panicking() {
    // A SecurityResult that is neither OK nor failed.
    let (port, _rx) = scripted_server(Script {
        security_result: [0, 0, 0, 7],
        ..Script::friendly("x")
    });
    let session = RemoteSession::start(scripted_target(port));
    match session.wait_connected(WAIT) {
        RemoteStatus::Failed(RemoteError::Protocol(message)) => {
            assert!(message.contains("security result"), "{message}")
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }

    // A desktop name of 4 GiB is refused before anything is allocated for it.
    let (port, _rx) = scripted_server(Script {
        name_len: Some(u32::MAX),
        ..Script::friendly("x")
    });
    let session = RemoteSession::start(scripted_target(port));
    match session.wait_connected(WAIT) {
        RemoteStatus::Failed(RemoteError::Protocol(message)) => {
            assert!(message.contains("desktop name"), "{message}")
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[test]
fn a_colour_map_message_ends_the_session_without_taking_the_app_down() {
    // SetColorMapEntries: vnc-rs's decoder has no code for it.
    let (port, _rx) = scripted_server(Script {
        after_init: vec![1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        ..Script::friendly("x")
    });
    let session = RemoteSession::start(scripted_target(port));
    let mut status = session.wait_connected(WAIT);
    for _ in 0..50 {
        if !matches!(status, RemoteStatus::Connecting | RemoteStatus::Connected) {
            break;
        }
        session.wait_for_frame(session.generation(), Duration::from_millis(200));
        status = session.status();
    }
    assert!(
        matches!(status, RemoteStatus::Closed | RemoteStatus::Failed(_)),
        "{status:?}"
    );
    // Input after the end is dropped quietly.
    session.key(KEY_A, true);
    session.type_text("abc");
    session.release_all_keys();
}
