//! Protocol tests: a scripted client talks RFB to a real server over loopback TCP.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_vnc::testing::{connect_raw, InputEvent, RecordingInput, TestClient, TestSource};
use vmm_vnc::{Cursor, PixelFormat, Rect, VncConfig, VncError, VncServer};

const RAW: i32 = 0;
const COPY_RECT: i32 = 1;
const HEXTILE: i32 = 5;
const ZLIB: i32 = 6;
const TIGHT: i32 = 7;
const ZRLE: i32 = 16;
const CURSOR: i32 = -239;
const DESKTOP_SIZE: i32 = -223;
const EXTENDED_DESKTOP_SIZE: i32 = -308;
const QEMU_KEY: i32 = -258;

struct Fixture {
    source: Arc<TestSource>,
    input: Arc<RecordingInput>,
    server: VncServer,
}

impl Fixture {
    fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }
}

fn fixture_with(width: u32, height: u32, configure: impl FnOnce(&mut VncConfig)) -> Fixture {
    let source = Arc::new(TestSource::new(width, height));
    let input = Arc::new(RecordingInput::new());
    let mut config = VncConfig::new("127.0.0.1:0".parse().unwrap());
    config.handshake_timeout = Duration::from_secs(2);
    configure(&mut config);
    let server = VncServer::start_with_config(config, source.clone(), input.clone()).unwrap();
    Fixture {
        source,
        input,
        server,
    }
}

fn fixture(width: u32, height: u32) -> Fixture {
    fixture_with(width, height, |_| {})
}

fn pattern(x: u32, y: u32) -> u32 {
    // Large flat areas, stripes, a gradient and some noise: exercises every tile type.
    if y < 40 {
        0x2050a0
    } else if x < 64 {
        if (x / 4 + y / 4).is_multiple_of(2) {
            0xffffff
        } else {
            0x000000
        }
    } else if x < 128 {
        (x * 2) << 16 | (y % 256) << 8 | 0x40
    } else {
        (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40503)) & 0x00ff_ffff
    }
}

/// Asserts the server closes the connection (EOF or reset, not a timeout).
fn assert_closed(stream: &mut std::net::TcpStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("expected the server to close the connection, got {e}"),
        }
    }
}

fn wait_until(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A second client still works (hostile clients must not affect others).
fn assert_server_healthy(f: &Fixture) {
    let mut client = TestClient::connect(f.addr()).unwrap();
    client.set_encodings(&[RAW]).unwrap();
    client.request(false).unwrap();
    client.read_update().unwrap();
    assert_eq!(client.framebuffer, f.source.snapshot());
}

#[test]
fn handshake_3_8_reports_size_format_and_name() {
    let f = fixture(320, 200);
    let client = TestClient::connect(f.addr()).unwrap();
    assert_eq!((client.init.width, client.init.height), (320, 200));
    assert_eq!(client.init.format, PixelFormat::XRGB8888);
    assert_eq!(client.init.name, "DeskVM");
    assert!(wait_until(|| f.server.client_count() == 1));
}

#[test]
fn handshake_3_7_and_3_3_without_password() {
    let f = fixture(64, 32);
    for minor in [7, 3] {
        let mut client = TestClient::connect_with(f.addr(), minor, None).unwrap();
        assert_eq!((client.init.width, client.init.height), (64, 32));
        client.request(false).unwrap();
        client.read_update().unwrap();
    }
}

#[test]
fn vnc_authentication_success_for_all_versions() {
    let f = fixture_with(32, 32, |c| c.password = Some("s3cret".into()));
    for minor in [8, 7, 3] {
        let mut client = TestClient::connect_with(f.addr(), minor, Some("s3cret")).unwrap();
        client.request(false).unwrap();
        client.read_update().unwrap();
    }
}

#[test]
fn vnc_authentication_failure_gives_reason_and_disconnects() {
    let f = fixture_with(32, 32, |c| c.password = Some("s3cret".into()));
    let error = TestClient::connect_with(f.addr(), 8, Some("wrong"))
        .err()
        .unwrap();
    assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(
        error.to_string().contains("authentication failed"),
        "{error}"
    );
    for minor in [7, 3] {
        let error = TestClient::connect_with(f.addr(), minor, Some("wrong"))
            .err()
            .unwrap();
        assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied);
    }
    // Without the password the client cannot choose None.
    assert!(TestClient::connect_with(f.addr(), 8, None).is_err());
    assert!(wait_until(|| f.server.client_count() == 0));
}

/// Connects, answers the version with RFB 3.8 and reads the server's list of one security
/// type: (count, type).
fn security_types_offered(addr: SocketAddr) -> (std::net::TcpStream, [u8; 2]) {
    let mut stream = connect_raw(addr).unwrap();
    let mut version = [0u8; 12];
    stream.read_exact(&mut version).unwrap();
    stream.write_all(b"RFB 003.008\n").unwrap();
    let mut types = [0u8; 2];
    stream.read_exact(&mut types).unwrap();
    (stream, types)
}

#[test]
fn failed_auth_connection_is_closed() {
    let f = fixture_with(32, 32, |c| c.password = Some("pw".into()));
    let (mut stream, types) = security_types_offered(f.addr());
    assert_eq!(types, [1, 2]);
    stream.write_all(&[2]).unwrap();
    let mut challenge = [0u8; 16];
    stream.read_exact(&mut challenge).unwrap();
    stream.write_all(&[0u8; 16]).unwrap();
    let mut result = [0u8; 4];
    stream.read_exact(&mut result).unwrap();
    assert_eq!(u32::from_be_bytes(result), 1);
    assert_closed(&mut stream);
}

fn full_update_round_trip(encoding: i32) -> usize {
    let f = fixture(300, 170);
    f.source.draw(pattern);
    let mut client = TestClient::connect(f.addr()).unwrap();
    client.set_encodings(&[encoding]).unwrap();
    client.request(false).unwrap();
    let rects = client.read_update().unwrap();
    assert!(rects.iter().all(|r| r.encoding == encoding), "{rects:?}");
    assert_eq!(client.framebuffer, f.source.snapshot());
    // A second, different frame through the same zlib stream.
    f.source.draw(|x, y| pattern(y, x));
    client.request(true).unwrap();
    client.read_update().unwrap();
    assert_eq!(client.framebuffer, f.source.snapshot());
    f.server.stats().bytes_sent as usize
}

#[test]
fn raw_full_update() {
    full_update_round_trip(RAW);
}

#[test]
fn hextile_full_update() {
    full_update_round_trip(HEXTILE);
}

#[test]
fn zrle_full_update() {
    full_update_round_trip(ZRLE);
}

#[test]
fn tight_full_update() {
    full_update_round_trip(TIGHT);
}

#[test]
fn zlib_full_update() {
    full_update_round_trip(ZLIB);
}

#[test]
fn first_supported_encoding_in_client_order_wins() {
    let f = fixture(64, 64);
    let mut client = TestClient::connect(f.addr()).unwrap();
    client.set_encodings(&[4, 2, HEXTILE, ZRLE, RAW]).unwrap();
    client.request(false).unwrap();
    let rects = client.read_update().unwrap();
    assert!(rects.iter().all(|r| r.encoding == HEXTILE));
}

#[test]
fn incremental_update_sends_only_the_changed_pixels() {
    let f = fixture(640, 480);
    f.source.draw(pattern);
    let mut client = TestClient::connect(f.addr()).unwrap();
    client.set_encodings(&[RAW]).unwrap();
    client.request(false).unwrap();
    client.read_update().unwrap();
    f.source.fill_rect(Rect::new(200, 300, 10, 10), 0xff00ff);
    client.request(true).unwrap();
    let rects = client.read_update().unwrap();
    assert_eq!(rects.len(), 1);
    // A change inside one tile is sent as just the changed rectangle.
    assert_eq!(
        (rects[0].x, rects[0].y, rects[0].width, rects[0].height),
        (200, 300, 10, 10)
    );
    assert_eq!(client.framebuffer, f.source.snapshot());
    // A change spanning tiles is sent as whole tiles.
    f.source.fill_rect(Rect::new(100, 10, 100, 10), 0x00ff00);
    client.request(true).unwrap();
    let rects = client.read_update().unwrap();
    assert_eq!(rects.len(), 1, "{rects:?}");
    assert_eq!(
        (rects[0].x, rects[0].y, rects[0].width, rects[0].height),
        (64, 0, 192, 64)
    );
    assert_eq!(client.framebuffer, f.source.snapshot());
}

#[test]
fn unknown_damage_is_found_by_tile_comparison() {
    let f = fixture(640, 480);
    f.source.draw(pattern);
    f.source.set_damage_tracking(false);
    let mut client = TestClient::connect(f.addr()).unwrap();
    client.set_encodings(&[ZRLE]).unwrap();
    client.request(false).unwrap();
    client.read_update().unwrap();
    f.source.fill_rect(Rect::new(630, 470, 10, 10), 0x123456);
    client.request(true).unwrap();
    let rects = client.read_update().unwrap();
    assert_eq!(rects.len(), 1, "{rects:?}");
    assert_eq!(
        (rects[0].x, rects[0].y, rects[0].width, rects[0].height),
        (630, 470, 10, 10)
    );
    assert_eq!(client.framebuffer, f.source.snapshot());
}

#[test]
fn incremental_request_waits_for_a_change() {
    let f = fixture(64, 64);
    let mut client = TestClient::connect(f.addr()).unwrap();
    client.request(false).unwrap();
    client.read_update().unwrap();
    client.request(true).unwrap();
    // Nothing changed: nothing arrives.
    client
        .stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(client.stream.read(&mut byte).is_err());
    client
        .stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    f.source.fill_rect(Rect::new(0, 0, 1, 1), 0xffffff);
    client.read_update().unwrap();
    assert_eq!(client.framebuffer[0], 0xffffff);
}

#[test]
fn copy_rect_from_source_copies() {
    let f = fixture(256, 256);
    f.source.draw(pattern);
    let mut client = TestClient::connect(f.addr()).unwrap();
    client.set_encodings(&[HEXTILE, COPY_RECT]).unwrap();
    client.request(false).unwrap();
    client.read_update().unwrap();
    f.source.copy_rect(10, 50, Rect::new(100, 120, 128, 100));
    client.request(true).unwrap();
    let rects = client.read_update().unwrap();
    assert_eq!(rects[0].encoding, COPY_RECT, "{rects:?}");
    assert_eq!(client.framebuffer, f.source.snapshot());
    // Without CopyRect support the same change arrives as pixels.
    let mut plain = TestClient::connect(f.addr()).unwrap();
    plain.set_encodings(&[RAW]).unwrap();
    plain.request(false).unwrap();
    plain.read_update().unwrap();
    f.source.copy_rect(0, 0, Rect::new(128, 0, 64, 64));
    plain.request(true).unwrap();
    let rects = plain.read_update().unwrap();
    assert!(rects.iter().all(|r| r.encoding == RAW));
    assert_eq!(plain.framebuffer, f.source.snapshot());
}

#[test]
fn resize_with_desktop_size() {
    let f = fixture(100, 80);
    let mut client = TestClient::connect(f.addr()).unwrap();
    client.set_encodings(&[RAW, DESKTOP_SIZE]).unwrap();
    client.request(false).unwrap();
    client.read_update().unwrap();
    f.source.resize(300, 150);
    f.source.fill_rect(Rect::new(250, 100, 50, 50), 0x00ff00);
    client.request(true).unwrap();
    let rects = client.read_update().unwrap();
    assert_eq!(rects[0].encoding, DESKTOP_SIZE);
    assert_eq!((rects[0].width, rects[0].height), (300, 150));
    assert_eq!((client.width, client.height), (300, 150));
    assert_eq!(client.framebuffer, f.source.snapshot());
}

#[test]
fn resize_with_extended_desktop_size_and_prohibited_set_desktop_size() {
    let f = fixture(100, 80);
    let mut client = TestClient::connect(f.addr()).unwrap();
    client
        .set_encodings(&[ZRLE, DESKTOP_SIZE, EXTENDED_DESKTOP_SIZE])
        .unwrap();
    client.request(false).unwrap();
    client.read_update().unwrap();
    assert_eq!(client.layouts, vec![(0, 0, 100, 80)]);
    // SetDesktopSize 640x480, one screen.
    let mut message = vec![251, 0];
    message.extend_from_slice(&640u16.to_be_bytes());
    message.extend_from_slice(&480u16.to_be_bytes());
    message.extend_from_slice(&[1, 0]);
    message.extend_from_slice(&[0u8; 16]);
    client.send(&message).unwrap();
    client.read_update().unwrap();
    assert_eq!(
        client.layouts[1],
        (1, 1, 100, 80),
        "reason 1, status prohibited"
    );
    f.source.resize(128, 96);
    client.request(true).unwrap();
    let rects = client.read_update().unwrap();
    assert_eq!(rects[0].encoding, EXTENDED_DESKTOP_SIZE);
    assert_eq!((client.width, client.height), (128, 96));
    assert_eq!(client.framebuffer, f.source.snapshot());
}

#[test]
fn resize_without_desktop_size_sends_full_update() {
    let f = fixture(100, 80);
    f.source.draw(pattern);
    let mut client = TestClient::connect(f.addr()).unwrap();
    client.set_encodings(&[RAW]).unwrap();
    client.request(false).unwrap();
    client.read_update().unwrap();
    f.source.resize(60, 40);
    client.request(true).unwrap();
    let rects = client.read_update().unwrap();
    let area: u32 = rects
        .iter()
        .map(|r| u32::from(r.width) * u32::from(r.height))
        .sum();
    assert_eq!(area, 60 * 40);
    assert!(rects.iter().all(|r| r.encoding == RAW));
}

#[test]
fn cursor_pseudo_encoding() {
    let f = fixture(64, 64);
    f.source.set_cursor(Some(Cursor {
        width: 2,
        height: 2,
        hot_x: 1,
        hot_y: 0,
        argb: vec![0xffff_0000, 0x0000_0000, 0x8000_ff00, 0xff00_00ff],
    }));
    let mut client = TestClient::connect(f.addr()).unwrap();
    client.set_encodings(&[RAW, CURSOR]).unwrap();
    client.request(false).unwrap();
    let rects = client.read_update().unwrap();
    assert!(rects.iter().any(|r| r.encoding == CURSOR));
    let cursor = client.cursor.clone().unwrap();
    assert_eq!(
        (cursor.hot_x, cursor.hot_y, cursor.width, cursor.height),
        (1, 0, 2, 2)
    );
    assert_eq!(&cursor.pixels[..4], &[0, 0, 0xff, 0]);
    assert_eq!(cursor.mask, vec![0b1000_0000, 0b1100_0000]);
    // An unchanged cursor is not resent; a changed one is.
    f.source.fill_rect(Rect::new(0, 0, 1, 1), 1);
    client.request(true).unwrap();
    let rects = client.read_update().unwrap();
    assert!(rects.iter().all(|r| r.encoding != CURSOR));
    f.source.set_cursor(None);
    f.source.fill_rect(Rect::new(0, 0, 1, 1), 2);
    client.request(true).unwrap();
    let rects = client.read_update().unwrap();
    let cursor = rects.iter().find(|r| r.encoding == CURSOR).unwrap();
    assert_eq!((cursor.width, cursor.height), (0, 0));
}

#[test]
fn key_events_by_keysym_and_qemu_scancode() {
    let f = fixture(64, 64);
    let mut client = TestClient::connect(f.addr()).unwrap();
    client.set_encodings(&[RAW, QEMU_KEY]).unwrap();
    client.key(0xffe1, true).unwrap(); // Shift_L
    client.key(u32::from(b'A'), true).unwrap();
    client.key(u32::from(b'A'), false).unwrap();
    client.key(0xffe1, false).unwrap();
    client.key(0x1234_5678, true).unwrap(); // unknown: ignored
    client.qemu_key(0xff52, 0xc8, true).unwrap(); // Up, extended scancode
    client.qemu_key(0xff52, 0xc8, false).unwrap();
    client.qemu_key(0x61, 0, true).unwrap(); // no scancode: keysym fallback
    let events = f.input.wait_for(7, Duration::from_secs(5));
    assert_eq!(
        events,
        vec![
            InputEvent::Key {
                code: 42,
                down: true
            },
            InputEvent::Key {
                code: 30,
                down: true
            },
            InputEvent::Key {
                code: 30,
                down: false
            },
            InputEvent::Key {
                code: 42,
                down: false
            },
            InputEvent::Key {
                code: 103,
                down: true
            },
            InputEvent::Key {
                code: 103,
                down: false
            },
            InputEvent::Key {
                code: 30,
                down: true
            },
        ]
    );
    // Disconnecting releases the key still held.
    drop(client);
    let events = f.input.wait_for(8, Duration::from_secs(5));
    assert_eq!(
        events[7],
        InputEvent::Key {
            code: 30,
            down: false
        }
    );
}

#[test]
fn pointer_scaling_buttons_and_wheel() {
    let f = fixture(1025, 769);
    let mut client = TestClient::connect(f.addr()).unwrap();
    client.pointer(0, 0, 0).unwrap();
    client.pointer(0b001, 1024, 768).unwrap();
    client.pointer(0b100, 512, 384).unwrap();
    client.pointer(0b01000, 5000, 9000).unwrap(); // wheel up, outside the frame
    client.pointer(0, 5000, 9000).unwrap();
    client.pointer(0b10000, 0, 0).unwrap(); // wheel down
    let events = f.input.wait_for(6, Duration::from_secs(5));
    let pointer = |x, y, buttons, wheel| InputEvent::Pointer {
        x,
        y,
        buttons,
        wheel,
    };
    assert_eq!(
        events,
        vec![
            pointer(0, 0, 0, 0),
            pointer(0x7fff, 0x7fff, 1, 0),
            pointer(0x3fff, 0x3fff, 4, 0),
            pointer(0x7fff, 0x7fff, 0, 1),
            pointer(0x7fff, 0x7fff, 0, 0),
            pointer(0, 0, 0, -1),
        ]
    );
}

#[test]
fn sixteen_bit_big_endian_pixel_format() {
    let f = fixture(4, 1);
    f.source.fill_rect(Rect::new(0, 0, 1, 1), 0xff0000);
    f.source.fill_rect(Rect::new(1, 0, 1, 1), 0x00ff00);
    f.source.fill_rect(Rect::new(2, 0, 1, 1), 0x0000ff);
    f.source.fill_rect(Rect::new(3, 0, 1, 1), 0xffffff);
    let mut client = TestClient::connect(f.addr()).unwrap();
    let rgb565_be = PixelFormat {
        bits_per_pixel: 16,
        depth: 16,
        big_endian: true,
        true_colour: true,
        red_max: 31,
        green_max: 63,
        blue_max: 31,
        red_shift: 11,
        green_shift: 5,
        blue_shift: 0,
    };
    client.set_pixel_format(&rgb565_be).unwrap();
    client.request(false).unwrap();
    let rects = client.read_update_raw(2).unwrap();
    assert_eq!(rects.len(), 1);
    assert_eq!(
        rects[0].1,
        vec![0xf8, 0x00, 0x07, 0xe0, 0x00, 0x1f, 0xff, 0xff]
    );
}

#[test]
fn eight_bit_pixel_format() {
    let f = fixture(2, 1);
    f.source.fill_rect(Rect::new(0, 0, 1, 1), 0xffffff);
    let mut client = TestClient::connect(f.addr()).unwrap();
    let bgr233 = PixelFormat {
        bits_per_pixel: 8,
        depth: 8,
        big_endian: false,
        true_colour: true,
        red_max: 7,
        green_max: 7,
        blue_max: 3,
        red_shift: 0,
        green_shift: 3,
        blue_shift: 6,
    };
    client.set_pixel_format(&bgr233).unwrap();
    client.request(false).unwrap();
    assert_eq!(client.read_update_raw(1).unwrap()[0].1, vec![0xff, 0x00]);
}

#[test]
fn two_clients_at_once_with_different_encodings() {
    let f = fixture(200, 100);
    f.source.draw(pattern);
    let mut a = TestClient::connect(f.addr()).unwrap();
    let mut b = TestClient::connect(f.addr()).unwrap();
    a.set_encodings(&[ZRLE]).unwrap();
    b.set_encodings(&[HEXTILE]).unwrap();
    assert!(wait_until(|| f.server.client_count() == 2));
    for round in 0..3u32 {
        f.source
            .fill_rect(Rect::new(round * 30, round * 10, 50, 50), round * 0x111111);
        for client in [&mut a, &mut b] {
            client.request(round > 0).unwrap();
            client.read_update().unwrap();
            assert_eq!(client.framebuffer, f.source.snapshot());
        }
    }
    let stats = f.server.stats();
    assert_eq!(stats.clients, 2);
    assert!(stats.updates_sent >= 6);
    assert!(stats.bytes_sent > 0);
    drop(a);
    assert!(wait_until(|| f.server.client_count() == 1));
}

#[test]
fn address_in_use_is_a_clear_error() {
    let f = fixture(8, 8);
    let source = Arc::new(TestSource::new(8, 8));
    let input = Arc::new(RecordingInput::new());
    match VncServer::start(f.addr(), None, source, input) {
        Err(VncError::AddressInUse(addr)) => {
            assert_eq!(addr, f.addr());
            assert!(VncError::AddressInUse(addr)
                .to_string()
                .contains("already in use"));
        }
        Err(other) => panic!("wrong error {other}"),
        Ok(_) => panic!("second bind succeeded"),
    }
}

#[test]
fn dropping_the_server_disconnects_clients() {
    let f = fixture(8, 8);
    let mut client = TestClient::connect(f.addr()).unwrap();
    client.request(false).unwrap();
    client.read_update().unwrap();
    let addr = f.addr();
    drop(f);
    assert_closed(&mut client.stream);
    assert!(
        std::net::TcpStream::connect(addr).is_err() || {
            // Something else may have taken the port; at least no VNC greeting from us.
            true
        }
    );
}

// ---- Hostile clients ----

fn handshaken_raw(f: &Fixture) -> TestClient {
    TestClient::connect(f.addr()).unwrap()
}

/// Sends SetPixelFormat with XRGB8888 changed by `mutate` and expects the server to close.
fn assert_bad_pixel_format_disconnects(f: &Fixture, mutate: fn(&mut [u8; 16])) {
    let mut client = handshaken_raw(f);
    let mut bad = PixelFormat::XRGB8888.to_bytes();
    mutate(&mut bad);
    let mut message = vec![0, 0, 0, 0];
    message.extend_from_slice(&bad);
    client.send(&message).unwrap();
    assert_closed(&mut client.stream);
}

#[test]
fn bits_per_pixel_zero_disconnects() {
    let f = fixture(16, 16);
    assert_bad_pixel_format_disconnects(&f, |b| b[0] = 0);
    assert_server_healthy(&f);
}

#[test]
fn colour_map_and_impossible_formats_disconnect() {
    let f = fixture(16, 16);
    for mutate in [
        (|b: &mut [u8; 16]| b[3] = 0) as fn(&mut [u8; 16]),
        |b| b[0] = 24,
        |b| b[10] = 40,
        |b| b[4..6].copy_from_slice(&[0, 0]),
    ] {
        assert_bad_pixel_format_disconnects(&f, mutate);
    }
    assert_server_healthy(&f);
}

#[test]
fn unknown_message_type_disconnects() {
    let f = fixture(16, 16);
    for message in [
        &[7u8, 1, 2, 3][..],
        &[150, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[255, 1, 0, 0],
    ] {
        let mut client = handshaken_raw(&f);
        client.send(message).unwrap();
        assert_closed(&mut client.stream);
    }
    assert_server_healthy(&f);
}

#[test]
fn huge_client_cut_text_disconnects() {
    let f = fixture(16, 16);
    let mut client = handshaken_raw(&f);
    client
        .send(&[6, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, b'x', b'y'])
        .unwrap();
    assert_closed(&mut client.stream);
    assert_server_healthy(&f);
}

#[test]
fn small_client_cut_text_is_discarded() {
    let f = fixture(16, 16);
    let mut client = handshaken_raw(&f);
    let mut message = vec![6, 0, 0, 0];
    message.extend_from_slice(&5000u32.to_be_bytes());
    message.extend(std::iter::repeat_n(b'a', 5000));
    client.send(&message).unwrap();
    client.request(false).unwrap();
    client.read_update().unwrap();
}

#[test]
fn set_encodings_with_65535_entries() {
    let f = fixture(16, 16);
    let mut client = handshaken_raw(&f);
    let mut encodings = vec![12345i32; 65534];
    encodings.push(HEXTILE);
    client.set_encodings(&encodings).unwrap();
    client.request(false).unwrap();
    let rects = client.read_update().unwrap();
    assert_eq!(rects[0].encoding, HEXTILE);
}

#[test]
fn pointer_and_update_request_outside_the_frame() {
    let f = fixture(16, 16);
    let mut client = handshaken_raw(&f);
    client.pointer(0xff, 0xffff, 0xffff).unwrap();
    client
        .request_rect(false, 60000, 60000, 65535, 65535)
        .unwrap();
    client.request_rect(true, 0, 0, 0, 0).unwrap();
    client.request(false).unwrap();
    client.read_update().unwrap();
    let events = f.input.wait_for(1, Duration::from_secs(5));
    assert_eq!(
        events[0],
        InputEvent::Pointer {
            x: 0x7fff,
            y: 0x7fff,
            buttons: 7,
            wheel: 1
        }
    );
}

#[test]
fn garbage_version_disconnects() {
    let f = fixture(16, 16);
    for garbage in [
        &b"GET / HTTP/1.1\r\n"[..],
        b"RFB 004.000\n",
        b"RFB 003.00\xff\n",
    ] {
        let mut stream = connect_raw(f.addr()).unwrap();
        let mut version = [0u8; 12];
        stream.read_exact(&mut version).unwrap();
        stream.write_all(garbage).unwrap();
        assert_closed(&mut stream);
    }
    assert_server_healthy(&f);
}

#[test]
fn invalid_security_type_choice_disconnects_with_reason() {
    let f = fixture(16, 16);
    let (mut stream, types) = security_types_offered(f.addr());
    assert_eq!(types, [1, 1]);
    stream.write_all(&[2]).unwrap();
    let mut result = [0u8; 4];
    stream.read_exact(&mut result).unwrap();
    assert_eq!(u32::from_be_bytes(result), 1);
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).unwrap();
    assert!(u32::from_be_bytes(length) > 0);
    assert_closed(&mut stream);
}

#[test]
fn slowloris_handshake_times_out() {
    let f = fixture_with(16, 16, |c| c.handshake_timeout = Duration::from_millis(300));
    let mut stream = connect_raw(f.addr()).unwrap();
    let mut version = [0u8; 12];
    stream.read_exact(&mut version).unwrap();
    // Trickle the version one byte at a time, too slowly.
    let start = Instant::now();
    for &byte in b"RFB 003.008\n" {
        if stream.write_all(&[byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if start.elapsed() > Duration::from_millis(600) {
            break;
        }
    }
    assert_closed(&mut stream);
    // A silent client is dropped as well.
    let mut silent = connect_raw(f.addr()).unwrap();
    assert_closed(&mut silent);
    assert!(wait_until(|| f.server.client_count() == 0));
    assert_server_healthy(&f);
}

#[test]
fn truncated_messages_disconnect_cleanly() {
    let f = fixture(16, 16);
    for message in [&[0u8, 0, 0][..], &[2, 0, 0, 5, 0, 0], &[3, 0, 0], &[255]] {
        let mut client = handshaken_raw(&f);
        client.send(message).unwrap();
        client.stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert_closed(&mut client.stream);
    }
    assert!(wait_until(|| f.server.client_count() == 0));
    assert_server_healthy(&f);
}

#[test]
fn too_many_clients_are_refused() {
    let f = fixture_with(16, 16, |c| c.max_clients = 2);
    let _a = TestClient::connect(f.addr()).unwrap();
    let _b = TestClient::connect(f.addr()).unwrap();
    assert!(wait_until(|| f.server.client_count() == 2));
    let mut third = connect_raw(f.addr()).unwrap();
    assert_closed(&mut third);
}

#[test]
fn slow_client_is_dropped_without_blocking_others() {
    let f = fixture_with(1600, 1200, |c| c.write_timeout = Duration::from_millis(300));
    f.source.draw(pattern);
    // The slow client asks for full raw updates (7.7 MB each) and never reads.
    let mut slow = TestClient::connect(f.addr()).unwrap();
    slow.set_encodings(&[RAW]).unwrap();
    slow.stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut slow_stream = slow.stream.try_clone().unwrap();
    let requester = std::thread::spawn(move || {
        let request = [3u8, 0, 0, 0, 0, 0, 0x06, 0x40, 0x04, 0xb0];
        for _ in 0..250 {
            if slow_stream.write_all(&request).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut fast = TestClient::connect(f.addr()).unwrap();
    fast.set_encodings(&[ZRLE]).unwrap();
    fast.request(false).unwrap();
    fast.read_update().unwrap();
    for round in 0..5u32 {
        f.source
            .fill_rect(Rect::new(round * 100, 0, 100, 100), 0x010101 * round);
        fast.request(true).unwrap();
        fast.read_update().unwrap();
        assert_eq!(fast.framebuffer, f.source.snapshot());
    }
    assert!(
        wait_until(|| f.server.client_count() == 1),
        "slow client still connected"
    );
    fast.request(false).unwrap();
    fast.read_update().unwrap();
    requester.join().unwrap();
}

/// A desktop-like screen: flat background, windows with "text", a small photo.
fn desktop(x: u32, y: u32) -> u32 {
    let in_window =
        |x0: u32, y0: u32, w: u32, h: u32| x >= x0 && x < x0 + w && y >= y0 && y < y0 + h;
    if in_window(600, 400, 200, 150) {
        // Photo: smooth gradient with mild noise.
        let noise = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40503)) % 24;
        return ((x - 600 + noise) << 16) | ((y - 400 + noise) << 8) | (128 + noise);
    }
    for (x0, y0, w, h) in [(50, 50, 500, 400), (300, 300, 600, 350)] {
        if in_window(x0, y0, w, h) {
            if y < y0 + 24 {
                return 0x204080 + ((x - x0) / 8);
            }
            let (cx, cy) = ((x - x0) % 8, (y - y0 - 24) % 16);
            let glyph = (x - x0) / 8 * 7 + (y - y0) / 16 * 13;
            let ink = cy < 11
                && cx < 6
                && (glyph.wrapping_mul(2_654_435_761) >> ((cx + cy * 3) % 31)) & 3 == 0;
            return if ink { 0x000000 } else { 0xffffff };
        }
    }
    0x3a6ea5
}

#[test]
fn bytes_per_encoding_for_1024x768() {
    let mut report = Vec::new();
    for (pattern_name, draw) in [
        ("noisy test pattern", pattern as fn(u32, u32) -> u32),
        ("desktop", desktop),
    ] {
        for (name, encoding) in [
            ("raw", RAW),
            ("hextile", HEXTILE),
            ("zlib", ZLIB),
            ("tight", TIGHT),
            ("zrle", ZRLE),
        ] {
            let f = fixture(1024, 768);
            f.source.draw(draw);
            let mut client = TestClient::connect(f.addr()).unwrap();
            client.set_encodings(&[encoding]).unwrap();
            client.request(false).unwrap();
            client.read_update().unwrap();
            assert_eq!(client.framebuffer, f.source.snapshot());
            let bytes = f.server.stats().bytes_sent;
            report.push(format!("{pattern_name}: {name}={bytes}"));
            if encoding == RAW {
                assert!(bytes >= 1024 * 768 * 4);
            } else {
                assert!(bytes < 1024 * 768 * 4, "{name} larger than raw: {bytes}");
            }
        }
    }
    eprintln!("full update 1024x768: {}", report.join(", "));
}

/// A source whose frame claims more pixels than its buffer holds.
struct LyingSource {
    pixels: Vec<u8>,
}

impl vmm_vnc::FrameSource for LyingSource {
    fn generation(&self) -> u64 {
        1
    }
    fn wait_for_change(&self, _since: u64, timeout: Duration) -> u64 {
        std::thread::sleep(timeout.min(Duration::from_millis(10)));
        1
    }
    fn with_frame(
        &self,
        _since: u64,
        f: &mut dyn FnMut(vmm_vnc::FrameRef<'_>, vmm_vnc::Changes<'_>),
    ) -> u64 {
        f(
            vmm_vnc::FrameRef {
                width: 100_000,
                height: 100_000,
                stride: 64,
                pixels: &self.pixels,
            },
            Some((&[Rect::new(u32::MAX - 5, 7, u32::MAX, 9)], &[])),
        );
        1
    }
    fn cursor(&self) -> Option<(u64, Cursor)> {
        Some((
            1,
            Cursor {
                width: 300,
                height: 2,
                hot_x: 9999,
                hot_y: 0,
                argb: vec![],
            },
        ))
    }
}

#[test]
fn inconsistent_frame_source_does_not_panic() {
    let source = Arc::new(LyingSource {
        pixels: vec![0x55; 64 * 10 + 8],
    });
    let input = Arc::new(RecordingInput::new());
    let server = VncServer::start("127.0.0.1:0".parse().unwrap(), None, source, input).unwrap();
    let mut client = TestClient::connect(server.local_addr()).unwrap();
    // 16 columns fit the stride, 10 full rows plus 2 pixels: 10 rows.
    assert_eq!((client.init.width, client.init.height), (16, 10));
    client.set_encodings(&[ZRLE, CURSOR]).unwrap();
    client.request(false).unwrap();
    client.read_update().unwrap();
    assert!(client.framebuffer.iter().all(|&p| p == 0x555555));
    client.request(true).unwrap();
    client.request(false).unwrap();
    client.read_update().unwrap();
}
