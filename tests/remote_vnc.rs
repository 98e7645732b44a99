//! The remote console's VNC session (src/app/remote.rs, without GTK) against DeskVM's own
//! VNC server serving a known pattern: the frame arrives with the right pixels, keys and
//! the pointer reach the server, a wrong password gives an authentication error and a
//! closed port a connection error.

#[allow(dead_code)]
#[path = "../src/app/remote.rs"]
mod remote;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use remote::{RemoteError, RemoteSession, RemoteStatus, RemoteTarget};
use vmm_vnc::testing::{InputEvent, RecordingInput, TestSource};
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
