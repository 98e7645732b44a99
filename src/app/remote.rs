//! A VNC client session for showing a remote VM in the console: connects with `vnc-rs` on a
//! tokio runtime of its own thread, assembles the server's updates (desktop size, raw
//! rectangles, copy rectangles) into a local XRGB8888 framebuffer with a generation counter
//! (like the engine's display), and sends keys and the absolute pointer back. Keys arrive as
//! evdev codes and leave as the X11 keysyms a US layout gives with the Shift, AltGr and Caps
//! Lock state the session follows (`deskvm_ui::keysym::KeyboardState`); typed text goes out
//! as each character's keysym with Shift around it where the US layout needs it.
//!
//! The TCP stream is watched during the RFB handshake ([`TappedStream`]) to learn the
//! desktop name (`vnc-rs` keeps it to itself) and to refuse what `vnc-rs` would mishandle:
//! a SecurityResult other than 0 or 1, a desktop name longer than [`MAX_NAME_LEN`] (it
//! would allocate it whole) and an endless handshake (more than [`HANDSHAKE_LIMIT`] bytes).
//!
//! Supported: RFB 3.3–3.8 with no authentication or VNC Authentication (what `vnc-rs`
//! speaks), the Raw, CopyRect and ZRLE encodings and DesktopSize, screenshots of the remote
//! frame as PNG (through gdk-pixbuf, no GTK widgets). Not supported: QEMU's Extended Key
//! Event (`vnc-rs` can neither announce pseudo-encoding -258 nor send message 255, so keys
//! go by keysym only), Tight/JPEG, the server's cursor image (the local pointer is shown),
//! clipboard and bell. Frames larger than [`MAX_DIMENSION`] in either direction are
//! clipped. A server sending SetColorMapEntries makes `vnc-rs`'s decoder task panic; tokio
//! contains it and the session ends as closed.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use deskvm_ui::keysym::{text_to_keysym_events, KeyboardState};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use vnc::{PixelFormat, VncConnector, VncEncoding, VncError, VncEvent, X11Event};

/// The largest frame width or height kept (larger desktops are clipped).
pub const MAX_DIMENSION: u32 = 8192;
/// How long connecting (resolving, TCP and the RFB handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an incremental update is requested.
const REFRESH_INTERVAL: Duration = Duration::from_millis(30);
/// The longest desktop name accepted from a server, in bytes.
pub const MAX_NAME_LEN: u32 = 16 * 1024;
/// The most bytes a server may send before its ServerInit message is complete.
pub const HANDSHAKE_LIMIT: usize = 64 * 1024;
/// The most characters of the desktop name shown.
const SHOWN_NAME_CHARS: usize = 120;

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTarget {
    pub host: String,
    pub port: u16,
    /// Empty: no password.
    pub password: String,
}

/// Why a remote session failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    #[error("“{host}” is not a host name or address that can be found: {reason}")]
    BadHost { host: String, reason: String },
    #[error("The connection to {addr} was refused: is the VNC server running and the port right?")]
    ConnectionRefused { addr: String },
    #[error("Cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{addr} did not answer within {seconds} seconds")]
    Timeout { addr: String, seconds: u64 },
    #[error("The server needs a password: enter it and connect again")]
    PasswordRequired,
    #[error("Authentication failed: the password is wrong ({reason})")]
    AuthFailed { reason: String },
    #[error("The VNC connection failed: {0}")]
    Protocol(String),
    #[error("Cannot start the connection thread: {0}")]
    Thread(String),
}

/// Why a screenshot of the remote screen was not saved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScreenshotError {
    #[error("There is no remote screen to save yet")]
    NoFrame,
    #[error("Cannot write the screenshot to {path}: {reason}")]
    Write { path: String, reason: String },
}

/// Where a session is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteStatus {
    Connecting,
    Connected,
    /// The server closed the connection (or the session was closed).
    Closed,
    Failed(RemoteError),
}

/// The remote desktop as 32-bit XRGB8888 little-endian pixels (bytes B, G, R, X), the
/// engine's frame format. Every update is clipped to the frame; nothing here panics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteFramebuffer {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl RemoteFramebuffer {
    #[allow(dead_code)] // used by tests/remote_vnc.rs
    pub fn width(&self) -> u32 {
        self.width
    }

    #[allow(dead_code)] // used by tests/remote_vnc.rs
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The pixels, `width * 4` bytes a row.
    #[allow(dead_code)] // used by tests/remote_vnc.rs
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// The pixel at (x, y) as 0x00RRGGBB.
    #[allow(dead_code)] // used by tests/remote_vnc.rs
    pub fn pixel(&self, x: u32, y: u32) -> Option<u32> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let at = (y as usize * self.width as usize + x as usize) * 4;
        let b = self.pixels.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], 0]))
    }

    /// A new black frame (sizes above [`MAX_DIMENSION`] are clipped).
    pub fn resize(&mut self, width: u32, height: u32) {
        self.width = width.min(MAX_DIMENSION);
        self.height = height.min(MAX_DIMENSION);
        self.pixels = vec![0; self.width as usize * self.height as usize * 4];
    }

    /// Draws a `width` x `height` rectangle of 4-byte pixels (rows packed) at (x, y); parts
    /// outside the frame or missing from `data` are skipped. Returns whether anything changed.
    pub fn put_raw(&mut self, x: u32, y: u32, width: u32, height: u32, data: &[u8]) -> bool {
        let src_stride = width as usize * 4;
        let visible_w = width.min(self.width.saturating_sub(x)) as usize;
        let visible_h = height.min(self.height.saturating_sub(y)) as usize;
        if visible_w == 0 || visible_h == 0 {
            return false;
        }
        let dst_stride = self.width as usize * 4;
        let mut changed = false;
        for row in 0..visible_h {
            let src_at = row * src_stride;
            let Some(src) = data.get(src_at..src_at + visible_w * 4) else {
                break;
            };
            let dst_at = (y as usize + row) * dst_stride + x as usize * 4;
            if let Some(dst) = self.pixels.get_mut(dst_at..dst_at + visible_w * 4) {
                dst.copy_from_slice(src);
                changed = true;
            }
        }
        changed
    }

    /// Copies a `width` x `height` rectangle from (src_x, src_y) to (dst_x, dst_y), as RFB
    /// CopyRect does (overlap allowed); clipped so both rectangles lie inside the frame.
    pub fn copy_rect(
        &mut self,
        (src_x, src_y): (u32, u32),
        (dst_x, dst_y): (u32, u32),
        width: u32,
        height: u32,
    ) -> bool {
        let w = width
            .min(self.width.saturating_sub(src_x))
            .min(self.width.saturating_sub(dst_x)) as usize;
        let h = height
            .min(self.height.saturating_sub(src_y))
            .min(self.height.saturating_sub(dst_y)) as usize;
        if w == 0 || h == 0 {
            return false;
        }
        let stride = self.width as usize * 4;
        let row_offset = |x: u32, y: u32, row: usize| (y as usize + row) * stride + x as usize * 4;
        let mut copy_row = |row: usize| {
            let from = row_offset(src_x, src_y, row);
            let to = row_offset(dst_x, dst_y, row);
            if from + w * 4 <= self.pixels.len() && to + w * 4 <= self.pixels.len() {
                self.pixels.copy_within(from..from + w * 4, to);
            }
        };
        // Rows moving down are copied bottom-up so an overlapping source is read first.
        if dst_y > src_y {
            (0..h).rev().for_each(&mut copy_row);
        } else {
            (0..h).for_each(&mut copy_row);
        }
        true
    }

    /// Applies one event of the VNC client; returns whether the frame changed.
    pub fn apply(&mut self, event: &VncEvent) -> bool {
        match event {
            VncEvent::SetResolution(screen) => {
                self.resize(u32::from(screen.width), u32::from(screen.height));
                true
            }
            VncEvent::RawImage(rect, data) => self.put_raw(
                u32::from(rect.x),
                u32::from(rect.y),
                u32::from(rect.width),
                u32::from(rect.height),
                data,
            ),
            VncEvent::Copy(dst, src) => self.copy_rect(
                (u32::from(src.x), u32::from(src.y)),
                (u32::from(dst.x), u32::from(dst.y)),
                u32::from(dst.width),
                u32::from(dst.height),
            ),
            _ => false,
        }
    }
}

/// A copy of the frame for the GTK side.
pub struct RemoteFrame {
    pub width: u32,
    pub height: u32,
    /// XRGB8888, `width * 4` bytes a row.
    pub pixels: Vec<u8>,
}

impl RemoteFrame {
    /// The frame as packed 8-bit RGB rows (for PNG).
    fn to_rgb(&self) -> Vec<u8> {
        self.pixels
            .chunks_exact(4)
            .flat_map(|bgrx| [bgrx[2], bgrx[1], bgrx[0]])
            .collect()
    }

    /// Writes the frame to `path` as an RGB PNG.
    pub fn save_png(&self, path: &Path) -> Result<(), ScreenshotError> {
        use gtk::gdk_pixbuf::{Colorspace, Pixbuf};
        let write_error = |reason: String| ScreenshotError::Write {
            path: path.display().to_string(),
            reason,
        };
        let (Ok(width), Ok(height)) = (i32::try_from(self.width), i32::try_from(self.height))
        else {
            return Err(write_error("the frame is too large".into()));
        };
        if width == 0 || height == 0 {
            return Err(ScreenshotError::NoFrame);
        }
        let rgb = self.to_rgb();
        if rgb.len() != self.width as usize * self.height as usize * 3 {
            return Err(write_error("the frame is incomplete".into()));
        }
        let pixbuf = Pixbuf::from_bytes(
            &gtk::glib::Bytes::from_owned(rgb),
            Colorspace::Rgb,
            false,
            8,
            width,
            height,
            width * 3,
        );
        pixbuf
            .savev(path, "png", &[])
            .map_err(|e| write_error(e.to_string()))
    }
}

struct SharedState {
    status: RemoteStatus,
    frame: RemoteFramebuffer,
    generation: u64,
    /// The name the server gave its desktop in ServerInit, cleaned for display.
    desktop_name: Option<String>,
}

struct Shared {
    state: Mutex<SharedState>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_status(&self, status: RemoteStatus) {
        let mut state = self.lock();
        // A failure or close is final.
        if matches!(
            state.status,
            RemoteStatus::Connecting | RemoteStatus::Connected
        ) {
            state.status = status;
        }
        drop(state);
        self.changed.notify_all();
    }
}

enum Command {
    Key(u32, bool),
    Pointer(u16, u16, u8),
}

/// One connection to a VNC server; dropping it disconnects.
pub struct RemoteSession {
    #[allow(dead_code)] // used by tests/remote_vnc.rs
    target: RemoteTarget,
    shared: Arc<Shared>,
    keyboard: Mutex<KeyboardState>,
    commands: mpsc::UnboundedSender<Command>,
    /// Dropped to stop the session thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl RemoteSession {
    /// Starts connecting in the background; follow it with [`RemoteSession::status`].
    pub fn start(target: RemoteTarget) -> RemoteSession {
        let shared = Arc::new(Shared {
            state: Mutex::new(SharedState {
                status: RemoteStatus::Connecting,
                frame: RemoteFramebuffer::default(),
                generation: 0,
                desktop_name: None,
            }),
            changed: Condvar::new(),
        });
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let thread_shared = Arc::clone(&shared);
        let thread_target = target.clone();
        let spawned = std::thread::Builder::new()
            .name("vnc-remote".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        thread_shared
                            .set_status(RemoteStatus::Failed(RemoteError::Thread(e.to_string())));
                        return;
                    }
                };
                runtime.block_on(async {
                    tokio::select! {
                        _ = run(thread_target, &thread_shared, command_rx) => {}
                        _ = stop_rx => {}
                    }
                });
                thread_shared.set_status(RemoteStatus::Closed);
            });
        if let Err(e) = spawned {
            shared.set_status(RemoteStatus::Failed(RemoteError::Thread(e.to_string())));
        }
        RemoteSession {
            target,
            shared,
            keyboard: Mutex::new(KeyboardState::new()),
            commands,
            _stop: stop,
        }
    }

    #[allow(dead_code)] // used by tests/remote_vnc.rs
    pub fn target(&self) -> &RemoteTarget {
        &self.target
    }

    /// The desktop name the server sent (None before connecting or when it sent none).
    pub fn desktop_name(&self) -> Option<String> {
        self.shared.lock().desktop_name.clone()
    }

    pub fn status(&self) -> RemoteStatus {
        self.shared.lock().status.clone()
    }

    /// Waits (up to `timeout`) until the session is no longer connecting; returns its status.
    #[allow(dead_code)] // used by tests/remote_vnc.rs
    pub fn wait_connected(&self, timeout: Duration) -> RemoteStatus {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        while state.status == RemoteStatus::Connecting {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = match self.shared.changed.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        state.status.clone()
    }

    /// Waits (up to `timeout`) for a frame newer than generation `since`; returns the
    /// generation then.
    #[allow(dead_code)] // used by tests/remote_vnc.rs
    pub fn wait_for_frame(&self, since: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        while state.generation == since
            && matches!(
                state.status,
                RemoteStatus::Connecting | RemoteStatus::Connected
            )
        {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = match self.shared.changed.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        state.generation
    }

    /// Changes whenever the frame changes (0: no frame yet).
    pub fn generation(&self) -> u64 {
        self.shared.lock().generation
    }

    /// The frame with its generation when it changed since generation `since`.
    pub fn frame_since(&self, since: u64) -> Option<(u64, RemoteFrame)> {
        let state = self.shared.lock();
        if state.generation == since || state.frame.width == 0 || state.frame.height == 0 {
            return None;
        }
        Some((
            state.generation,
            RemoteFrame {
                width: state.frame.width,
                height: state.frame.height,
                pixels: state.frame.pixels.clone(),
            },
        ))
    }

    /// The remote pixel at (x, y) as 0x00RRGGBB.
    #[allow(dead_code)] // used by tests/remote_vnc.rs
    pub fn pixel(&self, x: u32, y: u32) -> Option<u32> {
        self.shared.lock().frame.pixel(x, y)
    }

    /// Writes the remote screen to `path` as a PNG file.
    pub fn screenshot_png(&self, path: &Path) -> Result<(), ScreenshotError> {
        let frame = self.frame_since(0).ok_or(ScreenshotError::NoFrame)?.1;
        frame.save_png(path)
    }

    fn keyboard(&self) -> MutexGuard<'_, KeyboardState> {
        self.keyboard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A key press or release as a Linux evdev code, sent as the keysym the US layout gives
    /// with the Shift, AltGr and Caps Lock state so far; keys without a keysym are dropped.
    pub fn key(&self, evdev_code: u16, down: bool) {
        for (keysym, down) in self.keyboard().key(evdev_code, down) {
            let _ = self.commands.send(Command::Key(keysym, down));
        }
    }

    /// Whether Caps Lock is on as far as the session knows (it assumes off at the start).
    #[allow(dead_code)] // used by tests/remote_vnc.rs
    pub fn caps_lock(&self) -> bool {
        self.keyboard().caps_lock()
    }

    /// A keysym press or release as it is (typing text, see [`text_to_keysym_events`]).
    pub fn keysym(&self, keysym: u32, down: bool) {
        let _ = self.commands.send(Command::Key(keysym, down));
    }

    /// Types `text` at once on a US layout; returns how many characters had no key and were
    /// skipped. (The console paces long texts itself with [`RemoteSession::keysym`].)
    #[allow(dead_code)] // used by tests/remote_vnc.rs
    pub fn type_text(&self, text: &str) -> usize {
        let (events, skipped) = text_to_keysym_events(text);
        for (keysym, down) in events {
            self.keysym(keysym, down);
        }
        skipped
    }

    /// Releases every key the session holds down (Caps Lock stays as it is).
    pub fn release_all_keys(&self) {
        for (keysym, down) in self.keyboard().release_all() {
            let _ = self.commands.send(Command::Key(keysym, down));
        }
    }

    /// Frame pixel coordinates of a position in the console's absolute scale (0..=0x7fff).
    fn to_pixels(&self, x: u16, y: u16) -> (u16, u16) {
        let (width, height) = {
            let state = self.shared.lock();
            (state.frame.width, state.frame.height)
        };
        let scale = |v: u16, size: u32| -> u16 {
            let pixel = u32::from(v.min(0x7fff)) * size / 0x8000;
            u16::try_from(pixel).unwrap_or(u16::MAX)
        };
        (scale(x, width), scale(y, height))
    }

    /// The pointer at (x, y) in 0..=0x7fff of the frame (the console's absolute scale), with
    /// the console's buttons (bit 0 left, bit 1 right, bit 2 middle).
    pub fn pointer_absolute(&self, x: u16, y: u16, console_buttons: u8) {
        let (px, py) = self.to_pixels(x, y);
        let _ = self
            .commands
            .send(Command::Pointer(px, py, rfb_buttons(console_buttons)));
    }

    /// Mouse wheel notches (positive: up) at (x, y) in the console's absolute scale, as RFB
    /// button 4/5 clicks.
    pub fn wheel(&self, x: u16, y: u16, notches: i32, console_buttons: u8) {
        let (px, py) = self.to_pixels(x, y);
        let held = rfb_buttons(console_buttons);
        let bit = if notches > 0 { 8 } else { 16 };
        for _ in 0..notches.unsigned_abs().min(16) {
            let _ = self.commands.send(Command::Pointer(px, py, held | bit));
            let _ = self.commands.send(Command::Pointer(px, py, held));
        }
    }
}

/// The console's button bits (left 1, right 2, middle 4) as RFB's (left 1, middle 2, right 4).
pub fn rfb_buttons(console_buttons: u8) -> u8 {
    let mut out = 0;
    if console_buttons & 1 != 0 {
        out |= 1;
    }
    if console_buttons & 2 != 0 {
        out |= 4;
    }
    if console_buttons & 4 != 0 {
        out |= 2;
    }
    out
}

/// Turns the host field into something to resolve: trims it and removes IPv6 brackets.
fn clean_host(host: &str) -> Result<String, RemoteError> {
    let trimmed = host.trim();
    let inner = trimmed
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(trimmed);
    if inner.is_empty() || inner.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(RemoteError::BadHost {
            host: host.to_string(),
            reason: "enter a host name or an IP address".into(),
        });
    }
    Ok(inner.to_string())
}

/// Resolves the host and opens a TCP connection to the first address that answers.
async fn open_tcp(target: &RemoteTarget) -> Result<TcpStream, RemoteError> {
    let host = clean_host(&target.host)?;
    let bad_host = |reason: String| RemoteError::BadHost {
        host: target.host.trim().to_string(),
        reason,
    };
    let addrs: Vec<SocketAddr> = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::lookup_host((host, target.port)),
    )
    .await
    .map_err(|_| bad_host("the name lookup timed out".into()))?
    .map_err(|e| bad_host(e.to_string()))?
    .collect();
    let mut last = Err(bad_host("it has no address".into()));
    for addr in addrs {
        let shown = addr.to_string();
        last = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Err(RemoteError::ConnectionRefused { addr: shown })
            }
            Ok(Err(e)) => Err(RemoteError::Connect {
                addr: shown,
                reason: e.to_string(),
            }),
            Err(_) => Err(RemoteError::Timeout {
                addr: shown,
                seconds: CONNECT_TIMEOUT.as_secs(),
            }),
        };
    }
    last
}

/// The RFB handshake's errors in the user's terms.
fn handshake_error(e: VncError) -> RemoteError {
    match e {
        VncError::NoPassword => RemoteError::PasswordRequired,
        VncError::WrongPassword => RemoteError::AuthFailed {
            reason: "the server refused it".into(),
        },
        VncError::General(message)
            if message.to_lowercase().contains("auth")
                || message.to_lowercase().contains("password") =>
        {
            RemoteError::AuthFailed { reason: message }
        }
        other => RemoteError::Protocol(other.to_string()),
    }
}

/// What the RFB handshake has shown so far, read from the bytes both sides sent.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HandshakeProgress {
    /// More bytes are needed to know.
    Incomplete,
    /// The server refused the connection or the password; `reason_len` is the length
    /// it announced for its reason text, when it sends one.
    Refused { reason_len: Option<u32> },
    /// A security type `vnc-rs` does not speak: it stops by itself.
    Unsupported,
    /// The SecurityResult is neither 0 (OK) nor 1 (failed).
    BadSecurityResult(u32),
    /// ServerInit has started; its name is `name_len` bytes, `name` has those that came.
    ServerInit { name_len: u32, name: Vec<u8> },
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Follows the RFB handshake (RFC 6143 §7.1–7.3) over the bytes the server and the client
/// sent: the protocol version the client chose, the security types, the challenge and
/// SecurityResult of VNC Authentication, then ServerInit.
fn handshake_progress(server: &[u8], client: &[u8]) -> HandshakeProgress {
    use HandshakeProgress::*;
    const VERSION_LEN: usize = 12;
    const SECURITY_NONE: u32 = 1;
    const SECURITY_VNC_AUTH: u32 = 2;
    if server.len() < VERSION_LEN {
        return Incomplete;
    }
    // The client answers with the version both speak ("RFB 003.008\n").
    let Some(minor) = client
        .get(8..11)
        .and_then(|digits| std::str::from_utf8(digits).ok())
        .and_then(|digits| digits.parse::<u32>().ok())
    else {
        return Incomplete;
    };
    let mut at = VERSION_LEN;
    let chosen = if minor >= 7 {
        let Some(&count) = server.get(at) else {
            return Incomplete;
        };
        at += 1;
        if count == 0 {
            return Refused {
                reason_len: be_u32(server, at),
            };
        }
        at += usize::from(count);
        if server.len() < at {
            return Incomplete;
        }
        match client.get(VERSION_LEN) {
            Some(&chosen) => u32::from(chosen),
            None => return Incomplete,
        }
    } else {
        let Some(chosen) = be_u32(server, at) else {
            return Incomplete;
        };
        at += 4;
        if chosen == 0 {
            return Refused {
                reason_len: be_u32(server, at),
            };
        }
        chosen
    };
    let result_at = match chosen {
        SECURITY_NONE if minor >= 8 => Some(at),
        SECURITY_NONE => None,
        SECURITY_VNC_AUTH => Some(at + 16),
        _ => return Unsupported,
    };
    if let Some(result_at) = result_at {
        let Some(result) = be_u32(server, result_at) else {
            return Incomplete;
        };
        at = result_at + 4;
        match result {
            0 => {}
            1 => {
                return Refused {
                    reason_len: if minor >= 8 { be_u32(server, at) } else { None },
                }
            }
            other => return BadSecurityResult(other),
        }
    }
    // ServerInit: width, height, pixel format (20 bytes), name length, name.
    let Some(name_len) = be_u32(server, at + 20) else {
        return Incomplete;
    };
    let name_at = at + 24;
    let name_end = name_at.saturating_add(name_len as usize).min(server.len());
    ServerInit {
        name_len,
        name: server.get(name_at..name_end).unwrap_or_default().to_vec(),
    }
}

/// A desktop name as shown: UTF-8 (or Latin-1 when it is not), without control
/// characters, trimmed and shortened; None when nothing is left.
fn clean_desktop_name(raw: &[u8]) -> Option<String> {
    let text = match std::str::from_utf8(raw) {
        Ok(text) => text.to_string(),
        Err(_) => raw.iter().map(|b| char::from(*b)).collect(),
    };
    let cleaned: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let trimmed = cleaned.trim();
    if trimmed.is_empty() {
        return None;
    }
    let mut shown: String = trimmed.chars().take(SHOWN_NAME_CHARS).collect();
    if trimmed.chars().count() > SHOWN_NAME_CHARS {
        shown.push('…');
    }
    Some(shown)
}

/// The handshake bytes seen by a [`TappedStream`].
#[derive(Debug, Default)]
struct HandshakeLog {
    from_server: Vec<u8>,
    from_client: Vec<u8>,
    /// The raw desktop name, once ServerInit is complete (then nothing more is logged).
    name: Option<Vec<u8>>,
}

impl HandshakeLog {
    /// Logs bytes the server sent and checks the handshake so far; an error ends it.
    fn on_server_bytes(&mut self, bytes: &[u8]) -> Result<(), String> {
        if self.name.is_some() || bytes.is_empty() {
            return Ok(());
        }
        self.from_server.extend_from_slice(bytes);
        match handshake_progress(&self.from_server, &self.from_client) {
            HandshakeProgress::BadSecurityResult(result) => {
                return Err(format!(
                    "the server sent an invalid security result ({result})"
                ))
            }
            HandshakeProgress::Refused {
                reason_len: Some(len),
            } if len > MAX_NAME_LEN => {
                return Err(format!("the server sent a refusal text of {len} bytes"))
            }
            HandshakeProgress::ServerInit { name_len, .. } if name_len > MAX_NAME_LEN => {
                return Err(format!(
                    "the server sent a desktop name of {name_len} bytes"
                ))
            }
            HandshakeProgress::ServerInit { name_len, name } if name.len() == name_len as usize => {
                self.name = Some(name);
                self.from_server = Vec::new();
                self.from_client = Vec::new();
                return Ok(());
            }
            _ => {}
        }
        if self.from_server.len() > HANDSHAKE_LIMIT {
            return Err(format!(
                "the server sent more than {HANDSHAKE_LIMIT} bytes before its desktop description"
            ));
        }
        Ok(())
    }

    fn on_client_bytes(&mut self, bytes: &[u8]) {
        if self.name.is_none() && self.from_client.len() < HANDSHAKE_LIMIT {
            self.from_client.extend_from_slice(bytes);
        }
    }
}

/// The TCP stream given to `vnc-rs`, watching the handshake through a [`HandshakeLog`].
struct TappedStream {
    inner: TcpStream,
    log: Arc<Mutex<HandshakeLog>>,
}

impl TappedStream {
    fn log(&self) -> MutexGuard<'_, HandshakeLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AsyncRead for TappedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            let fresh = buf.filled().get(before..).unwrap_or_default();
            if let Err(reason) = this.log().on_server_bytes(fresh) {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    reason,
                )));
            }
        }
        poll
    }
}

impl AsyncWrite for TappedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = &poll {
            this.log()
                .on_client_bytes(buf.get(..*written).unwrap_or_default());
        }
        poll
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A connected client and the desktop name the server sent.
async fn connect(target: &RemoteTarget) -> Result<(vnc::VncClient, Option<String>), RemoteError> {
    let log = Arc::new(Mutex::new(HandshakeLog::default()));
    let stream = TappedStream {
        inner: open_tcp(target).await?,
        log: Arc::clone(&log),
    };
    type Password = std::future::Ready<Result<String, VncError>>;
    let mut connector = VncConnector::<TappedStream, Password>::new(stream)
        .add_encoding(VncEncoding::Zrle)
        .add_encoding(VncEncoding::CopyRect)
        .add_encoding(VncEncoding::Raw)
        .add_encoding(VncEncoding::DesktopSizePseudo)
        .allow_shared(true)
        .set_pixel_format(PixelFormat::bgra());
    if !target.password.is_empty() {
        connector = connector.set_auth_method(std::future::ready(Ok(target.password.clone())));
    }
    let handshake = async {
        connector
            .build()
            .map_err(handshake_error)?
            .try_start()
            .await
            .map_err(handshake_error)?
            .finish()
            .map_err(handshake_error)
    };
    let client = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| RemoteError::Timeout {
            addr: format!("{}:{}", target.host.trim(), target.port),
            seconds: CONNECT_TIMEOUT.as_secs(),
        })??;
    let name = log
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .name
        .as_deref()
        .and_then(clean_desktop_name);
    Ok((client, name))
}

/// Connects and then applies the server's updates and forwards input until either side
/// closes.
async fn run(
    target: RemoteTarget,
    shared: &Shared,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let client = match connect(&target).await {
        Ok((client, name)) => {
            shared.lock().desktop_name = name;
            client
        }
        Err(e) => return shared.set_status(RemoteStatus::Failed(e)),
    };
    shared.set_status(RemoteStatus::Connected);
    let mut refresh = tokio::time::interval(REFRESH_INTERVAL);
    loop {
        tokio::select! {
            command = commands.recv() => {
                let event = match command {
                    None => break,
                    Some(Command::Key(keysym, down)) => X11Event::KeyEvent((keysym, down).into()),
                    Some(Command::Pointer(x, y, buttons)) => {
                        X11Event::PointerEvent((x, y, buttons).into())
                    }
                };
                let _ = client.input(event).await;
            }
            event = client.recv_event() => match event {
                Ok(VncEvent::Error(message)) => {
                    shared.set_status(RemoteStatus::Failed(RemoteError::Protocol(message)));
                    break;
                }
                Ok(event) => {
                    let mut state = shared.lock();
                    if state.frame.apply(&event) {
                        state.generation = state.generation.wrapping_add(1).max(1);
                        drop(state);
                        shared.changed.notify_all();
                    }
                }
                Err(_) => break,
            },
            _ = refresh.tick() => {
                let _ = client.input(X11Event::Refresh).await;
            }
        }
    }
    let _ = client.close().await;
    shared.set_status(RemoteStatus::Closed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use vnc::{Rect, Screen};

    fn rect(x: u16, y: u16, width: u16, height: u16) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    fn solid(width: usize, height: usize, rgb: u32) -> Vec<u8> {
        std::iter::repeat_n(rgb.to_le_bytes(), width * height)
            .flatten()
            .collect()
    }

    fn frame(width: u16, height: u16) -> RemoteFramebuffer {
        let mut fb = RemoteFramebuffer::default();
        assert!(fb.apply(&VncEvent::SetResolution(Screen::from((width, height)))));
        fb
    }

    #[test]
    fn resolution_then_raw_rectangles_make_pixels() {
        let mut fb = frame(8, 4);
        assert_eq!((fb.width(), fb.height()), (8, 4));
        assert_eq!(fb.pixel(0, 0), Some(0));
        assert!(fb.apply(&VncEvent::RawImage(
            rect(2, 1, 3, 2),
            solid(3, 2, 0x00ff_8000)
        )));
        assert_eq!(fb.pixel(2, 1), Some(0xff8000));
        assert_eq!(fb.pixel(4, 2), Some(0xff8000));
        assert_eq!(fb.pixel(5, 1), Some(0));
        assert_eq!(fb.pixel(1, 1), Some(0));
        assert_eq!(fb.pixel(2, 3), Some(0));
        assert_eq!(fb.pixel(8, 0), None);
    }

    #[test]
    fn out_of_range_rectangles_are_clipped() {
        let mut fb = frame(4, 4);
        // Partly outside: only the visible corner is drawn.
        assert!(fb.apply(&VncEvent::RawImage(rect(3, 3, 2, 2), solid(2, 2, 0x123456))));
        assert_eq!(fb.pixel(3, 3), Some(0x123456));
        assert_eq!(fb.pixel(2, 3), Some(0));
        // Entirely outside, and huge: nothing changes.
        let before = fb.clone();
        assert!(!fb.apply(&VncEvent::RawImage(rect(4, 0, 1, 1), solid(1, 1, 1))));
        assert!(!fb.apply(&VncEvent::RawImage(
            rect(u16::MAX, u16::MAX, u16::MAX, u16::MAX),
            vec![0xff; 64]
        )));
        assert_eq!(fb, before);
    }

    #[test]
    fn short_data_draws_only_the_rows_it_has() {
        let mut fb = frame(4, 4);
        // A 4x4 rectangle with data for one row and a half.
        assert!(fb.apply(&VncEvent::RawImage(rect(0, 0, 4, 4), solid(6, 1, 0xabcdef))));
        assert_eq!(fb.pixel(3, 0), Some(0xabcdef));
        assert_eq!(fb.pixel(0, 1), Some(0));
        assert!(!fb.apply(&VncEvent::RawImage(rect(0, 0, 4, 4), Vec::new())));
    }

    #[test]
    fn copy_rect_moves_pixels_even_when_overlapping() {
        let mut fb = frame(6, 6);
        let mut pattern = Vec::new();
        for i in 0..36u32 {
            pattern.extend_from_slice(&i.to_le_bytes());
        }
        fb.apply(&VncEvent::RawImage(rect(0, 0, 6, 6), pattern));
        // Move the 3x3 block at (0,0) one down and one right (overlapping).
        assert!(fb.apply(&VncEvent::Copy(rect(1, 1, 3, 3), rect(0, 0, 3, 3))));
        assert_eq!(fb.pixel(1, 1), Some(0));
        assert_eq!(fb.pixel(3, 3), Some(2 * 6 + 2));
        assert_eq!(fb.pixel(2, 1), Some(1));
        // And back up (overlapping the other way).
        assert!(fb.apply(&VncEvent::Copy(rect(0, 0, 3, 3), rect(1, 1, 3, 3))));
        assert_eq!(fb.pixel(0, 0), Some(0));
        assert_eq!(fb.pixel(2, 2), Some(2 * 6 + 2));
    }

    #[test]
    fn copy_rect_outside_the_frame_is_clipped() {
        let mut fb = frame(4, 4);
        fb.apply(&VncEvent::RawImage(rect(0, 0, 1, 1), solid(1, 1, 0x00ff00)));
        assert!(fb.apply(&VncEvent::Copy(rect(3, 3, 100, 100), rect(0, 0, 100, 100))));
        assert_eq!(fb.pixel(3, 3), Some(0x00ff00));
        assert!(!fb.apply(&VncEvent::Copy(rect(0, 0, 5, 5), rect(60000, 0, 5, 5))));
        assert!(!fb.apply(&VncEvent::Copy(
            rect(u16::MAX, u16::MAX, u16::MAX, u16::MAX),
            rect(0, 0, u16::MAX, u16::MAX)
        )));
    }

    #[test]
    fn hostile_sizes_are_capped_and_never_panic() {
        let fb = frame(u16::MAX, 1);
        assert_eq!(fb.width(), MAX_DIMENSION);
        assert_eq!(fb.pixels().len(), MAX_DIMENSION as usize * 4);
        let mut fb = frame(0, 0);
        assert_eq!(fb.pixel(0, 0), None);
        assert!(!fb.apply(&VncEvent::RawImage(rect(0, 0, 10, 10), solid(10, 10, 1))));
        assert!(!fb.apply(&VncEvent::Copy(rect(0, 0, 10, 10), rect(0, 0, 10, 10))));
        assert!(!fb.apply(&VncEvent::Bell));
        // Drawing before any resolution is harmless too.
        let mut fb = RemoteFramebuffer::default();
        assert!(!fb.apply(&VncEvent::RawImage(rect(0, 0, 1, 1), solid(1, 1, 1))));
    }

    #[test]
    fn console_buttons_become_rfb_buttons() {
        assert_eq!(rfb_buttons(0), 0);
        assert_eq!(rfb_buttons(1), 1);
        assert_eq!(rfb_buttons(2), 4);
        assert_eq!(rfb_buttons(4), 2);
        assert_eq!(rfb_buttons(0xff), 7);
    }

    #[test]
    fn bad_host_fields_are_rejected_before_connecting() {
        assert!(matches!(clean_host("  "), Err(RemoteError::BadHost { .. })));
        assert!(matches!(
            clean_host("a b"),
            Err(RemoteError::BadHost { .. })
        ));
        assert_eq!(clean_host(" [::1] ").ok().as_deref(), Some("::1"));
        assert_eq!(
            clean_host("example.org").ok().as_deref(),
            Some("example.org")
        );
    }

    #[test]
    fn handshake_errors_are_explained() {
        assert_eq!(
            handshake_error(VncError::NoPassword),
            RemoteError::PasswordRequired
        );
        assert!(matches!(
            handshake_error(VncError::WrongPassword),
            RemoteError::AuthFailed { .. }
        ));
        assert!(matches!(
            handshake_error(VncError::General(
                "authentication failed: wrong password".into()
            )),
            RemoteError::AuthFailed { .. }
        ));
        assert!(matches!(
            handshake_error(VncError::WrongServerMessage),
            RemoteError::Protocol(_)
        ));
    }

    const V38: &[u8; 12] = b"RFB 003.008\n";
    const V37: &[u8; 12] = b"RFB 003.007\n";
    const V33: &[u8; 12] = b"RFB 003.003\n";

    fn server_init(name: &[u8]) -> Vec<u8> {
        let mut init = vec![0, 64, 0, 48];
        init.extend_from_slice(&[0; 16]);
        init.extend_from_slice(&(name.len() as u32).to_be_bytes());
        init.extend_from_slice(name);
        init
    }

    /// (server bytes, client bytes) of whole handshakes up to ServerInit named "Desk".
    fn handshakes() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
        let init = server_init(b"Desk");
        let cat = |parts: &[&[u8]]| parts.concat();
        vec![
            (
                "3.8 none",
                cat(&[V38, &[1, 1], &[0; 4], &init]),
                cat(&[V38, &[1], &[1]]),
            ),
            (
                "3.8 vnc auth",
                cat(&[V38, &[2, 16, 2], &[7; 16], &[0; 4], &init]),
                cat(&[V38, &[2], &[9; 16], &[1]]),
            ),
            (
                "3.7 none",
                cat(&[V37, &[1, 1], &init]),
                cat(&[V37, &[1], &[1]]),
            ),
            (
                "3.7 vnc auth",
                cat(&[V37, &[1, 2], &[7; 16], &[0; 4], &init]),
                cat(&[V37, &[2], &[9; 16], &[1]]),
            ),
            (
                "3.3 none",
                cat(&[V33, &[0, 0, 0, 1], &init]),
                cat(&[V33, &[1]]),
            ),
            (
                "3.3 vnc auth",
                cat(&[V33, &[0, 0, 0, 2], &[7; 16], &[0; 4], &init]),
                cat(&[V33, &[9; 16], &[1]]),
            ),
        ]
    }

    #[test]
    fn the_desktop_name_is_found_after_every_kind_of_handshake() {
        for (kind, server, client) in handshakes() {
            assert_eq!(
                handshake_progress(&server, &client),
                HandshakeProgress::ServerInit {
                    name_len: 4,
                    name: b"Desk".to_vec()
                },
                "{kind}"
            );
            // Fed in pieces, the log holds the name once ServerInit is complete.
            let mut log = HandshakeLog::default();
            log.on_client_bytes(&client);
            for piece in server.chunks(3) {
                assert_eq!(log.on_server_bytes(piece), Ok(()), "{kind}");
            }
            assert_eq!(log.name.as_deref(), Some(&b"Desk"[..]), "{kind}");
            // Framebuffer updates after it are not logged or checked.
            assert_eq!(log.on_server_bytes(&[0xff; 100_000]), Ok(()));
            assert!(log.from_server.is_empty());
            // Any shorter prefix is still incomplete or in ServerInit without the name.
            for cut in 0..server.len() {
                match handshake_progress(&server[..cut], &client) {
                    HandshakeProgress::Incomplete => {}
                    HandshakeProgress::ServerInit { name, .. } => assert!(name.len() < 4),
                    other => panic!("{kind} cut at {cut}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_security_result_other_than_ok_or_failed_ends_the_handshake() {
        let server = [V38.as_slice(), &[1, 2], &[7; 16], &[0, 0, 0, 2]].concat();
        let client = [V38.as_slice(), &[2], &[9; 16]].concat();
        assert_eq!(
            handshake_progress(&server, &client),
            HandshakeProgress::BadSecurityResult(2)
        );
        let mut log = HandshakeLog::default();
        log.on_client_bytes(&client);
        let error = log.on_server_bytes(&server).unwrap_err();
        assert!(error.contains("security result"), "{error}");
        // A plain failure is left to vnc-rs (it reports the wrong password).
        let failed = [
            V38.as_slice(),
            &[1, 2],
            &[7; 16],
            &[0, 0, 0, 1],
            &[0, 0, 0, 5],
        ]
        .concat();
        assert_eq!(
            handshake_progress(&failed, &client),
            HandshakeProgress::Refused {
                reason_len: Some(5)
            }
        );
        let mut log = HandshakeLog::default();
        log.on_client_bytes(&client);
        assert_eq!(log.on_server_bytes(&failed), Ok(()));
    }

    #[test]
    fn huge_names_refusal_texts_and_endless_handshakes_are_refused() {
        let client = [V38.as_slice(), &[1], &[1]].concat();
        let mut huge_name = [V38.as_slice(), &[1, 1], &[0; 4], &server_init(b"")].concat();
        let len_at = huge_name.len() - 4;
        huge_name[len_at..].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut log = HandshakeLog::default();
        log.on_client_bytes(&client);
        let error = log.on_server_bytes(&huge_name).unwrap_err();
        assert!(error.contains("desktop name"), "{error}");

        let refusal = [V38.as_slice(), &[0], &[0xff, 0xff, 0xff, 0xff]].concat();
        let mut log = HandshakeLog::default();
        log.on_client_bytes(&client);
        assert!(log.on_server_bytes(&refusal).is_err());

        // A refusal with a short announced length but endless text.
        let refusal = [V38.as_slice(), &[0], &[0, 0, 0, 4]].concat();
        let mut log = HandshakeLog::default();
        log.on_client_bytes(&client);
        assert_eq!(log.on_server_bytes(&refusal), Ok(()));
        let mut result = Ok(());
        for _ in 0..100 {
            result = log.on_server_bytes(&[b'x'; 1024]);
            if result.is_err() {
                break;
            }
        }
        assert!(result.unwrap_err().contains("more than"));

        // Unknown security types and garbage never panic.
        let odd = [V38.as_slice(), &[1, 99], &[0; 64]].concat();
        let odd_client = [V38.as_slice(), &[99]].concat();
        assert_eq!(
            handshake_progress(&odd, &odd_client),
            HandshakeProgress::Unsupported
        );
        for len in 0..64 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let _ = handshake_progress(&junk, &junk);
            let _ = handshake_progress(&junk, V33);
            let _ = handshake_progress(&junk, V38);
        }
    }

    #[test]
    fn desktop_names_are_cleaned_for_the_title() {
        assert_eq!(
            clean_desktop_name(b"QEMU (win11)").as_deref(),
            Some("QEMU (win11)")
        );
        assert_eq!(
            clean_desktop_name(b" a\nb\x1b[31m ").as_deref(),
            Some("a b [31m")
        );
        assert_eq!(
            clean_desktop_name("Büro".as_bytes()).as_deref(),
            Some("Büro")
        );
        // Not UTF-8: read as Latin-1.
        assert_eq!(clean_desktop_name(b"B\xfcro").as_deref(), Some("Büro"));
        assert_eq!(clean_desktop_name(b""), None);
        assert_eq!(clean_desktop_name(b" \t\x00 "), None);
        let long = clean_desktop_name(&[b'x'; 1000]).unwrap();
        assert_eq!(long.chars().count(), SHOWN_NAME_CHARS + 1);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn frames_become_rgb_rows_for_png() {
        let frame = RemoteFrame {
            width: 2,
            height: 1,
            pixels: vec![0x30, 0x20, 0x10, 0, 0xcc, 0xbb, 0xaa, 0xff],
        };
        assert_eq!(frame.to_rgb(), vec![0x10, 0x20, 0x30, 0xaa, 0xbb, 0xcc]);
        let empty = RemoteFrame {
            width: 0,
            height: 0,
            pixels: Vec::new(),
        };
        assert_eq!(
            empty.save_png(Path::new("/nonexistent/x.png")),
            Err(ScreenshotError::NoFrame)
        );
        let short = RemoteFrame {
            width: 4,
            height: 4,
            pixels: vec![0; 8],
        };
        assert!(matches!(
            short.save_png(Path::new("/nonexistent/x.png")),
            Err(ScreenshotError::Write { .. })
        ));
    }
}
