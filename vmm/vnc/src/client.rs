//! One VNC client connection: the RFB handshake (versions 3.3, 3.7 and 3.8; security None or
//! VNC Authentication), the reader (client-to-server messages: SetPixelFormat, SetEncodings,
//! FramebufferUpdateRequest, KeyEvent, PointerEvent, ClientCutText, SetDesktopSize, QEMU
//! Extended Key Event) and the writer (FramebufferUpdates, sent only when requested).
//!
//! The writer keeps a shadow copy of what the client shows and sends only the 64x64 tiles
//! that differ from it within the source's damage (or everywhere when damage is unknown).
//! Any protocol violation, over-long message or stalled socket disconnects only this client.
//! Not handled: colour maps, continuous updates, fences, clipboard contents (discarded).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::des;
use crate::encoding::{self, tight::TightStreams, ZlibStream};
use crate::keysym::{keysym_to_evdev, qnum_to_evdev};
use crate::pixel_format::PixelFormat;
use crate::server::ServerShared;
use crate::{Rect, VncConfig};

/// Longest ClientCutText accepted (read and discarded); longer ones disconnect the client.
pub const MAX_CUT_TEXT: u32 = 1 << 20;
/// Size of the tiles compared against the client's shadow copy.
const TILE: u32 = 64;
/// How long the writer sleeps between checks for a change, request or stop.
const POLL: Duration = Duration::from_millis(100);

/// Why a client was disconnected.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("handshake not completed within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("authentication failed")]
    AuthenticationFailed,
    #[error("compression failed: {0}")]
    Compress(#[from] encoding::CompressError),
}

fn protocol(message: impl Into<String>) -> ClientError {
    ClientError::Protocol(message.into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V3_3,
    V3_7,
    V3_8,
}

fn parse_version(bytes: &[u8; 12]) -> Result<Version, ClientError> {
    let text = std::str::from_utf8(bytes).map_err(|_| protocol("version is not ASCII"))?;
    let invalid = || protocol(format!("bad ProtocolVersion {text:?}"));
    if !text.starts_with("RFB ") || !text.ends_with('\n') || text.as_bytes()[7] != b'.' {
        return Err(invalid());
    }
    let major: u32 = text[4..7].parse().map_err(|_| invalid())?;
    let minor: u32 = text[8..11].parse().map_err(|_| invalid())?;
    match (major, minor) {
        (3, 7) => Ok(Version::V3_7),
        (3, 8..) => Ok(Version::V3_8),
        (3, _) => Ok(Version::V3_3),
        _ => Err(protocol(format!("unsupported RFB version {major}.{minor}"))),
    }
}

/// Which encodings the client accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Encodings {
    /// RAW, HEXTILE, ZLIB, TIGHT or ZRLE: the first of those in the client's list.
    preferred: i32,
    copy_rect: bool,
    cursor: bool,
    desktop_size: bool,
    extended_desktop_size: bool,
    qemu_key_event: bool,
}

impl Default for Encodings {
    fn default() -> Self {
        Encodings {
            preferred: encoding::RAW,
            copy_rect: false,
            cursor: false,
            desktop_size: false,
            extended_desktop_size: false,
            qemu_key_event: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UpdateRequest {
    incremental: bool,
    rect: Rect,
}

fn merge_requests(a: Option<UpdateRequest>, b: Option<UpdateRequest>) -> Option<UpdateRequest> {
    match (a, b) {
        (Some(a), Some(b)) => {
            let x0 = a.rect.x.min(b.rect.x);
            let y0 = a.rect.y.min(b.rect.y);
            let x1 = (a.rect.x + a.rect.width).max(b.rect.x + b.rect.width);
            let y1 = (a.rect.y + a.rect.height).max(b.rect.y + b.rect.height);
            Some(UpdateRequest {
                incremental: a.incremental && b.incremental,
                rect: Rect::new(x0, y0, x1 - x0, y1 - y0),
            })
        }
        (a, b) => a.or(b),
    }
}

/// State the reader changes and the writer acts on.
struct SessionState {
    format: PixelFormat,
    encodings: Encodings,
    /// The client just enabled ExtendedDesktopSize and must be told the current layout.
    announce_layout: bool,
    request: Option<UpdateRequest>,
    /// Answers owed to SetDesktopSize messages.
    resize_replies: usize,
    /// The frame size the client knows (for pointer scaling).
    client_size: (u32, u32),
    closed: bool,
}

struct Session {
    state: Mutex<SessionState>,
    wake: Condvar,
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }
}

/// Reads with an optional overall deadline (the handshake timeout).
struct Reader {
    stream: TcpStream,
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    deadline: Option<(Instant, Duration)>,
}

impl Reader {
    fn new(stream: TcpStream) -> Reader {
        Reader {
            stream,
            buffer: vec![0; 8192],
            start: 0,
            end: 0,
            deadline: None,
        }
    }

    fn set_deadline(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.deadline = timeout.map(|t| (Instant::now() + t, t));
        if timeout.is_none() {
            self.stream.set_read_timeout(None)?;
        }
        Ok(())
    }

    fn fill(&mut self) -> Result<(), ClientError> {
        if let Some((deadline, timeout)) = self.deadline {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ClientError::HandshakeTimeout(timeout));
            }
            self.stream.set_read_timeout(Some(remaining))?;
        }
        match self.stream.read(&mut self.buffer) {
            Ok(0) => Err(ClientError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(count) => {
                self.start = 0;
                self.end = count;
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                match self.deadline {
                    Some((_, timeout)) => Err(ClientError::HandshakeTimeout(timeout)),
                    None => Err(e.into()),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn read_exact(&mut self, out: &mut [u8]) -> Result<(), ClientError> {
        let mut filled = 0;
        while filled < out.len() {
            if self.start == self.end {
                self.fill()?;
                continue;
            }
            let count = (self.end - self.start).min(out.len() - filled);
            out[filled..filled + count]
                .copy_from_slice(&self.buffer[self.start..self.start + count]);
            self.start += count;
            filled += count;
        }
        Ok(())
    }

    fn skip(&mut self, mut count: u64) -> Result<(), ClientError> {
        let mut scratch = [0u8; 1024];
        while count > 0 {
            let chunk = count.min(scratch.len() as u64) as usize;
            self.read_exact(&mut scratch[..chunk])?;
            count -= chunk as u64;
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, ClientError> {
        let mut b = [0u8; 1];
        self.read_exact(&mut b)?;
        Ok(b[0])
    }

    fn u16(&mut self) -> Result<u16, ClientError> {
        let mut b = [0u8; 2];
        self.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u32(&mut self) -> Result<u32, ClientError> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
}

fn random_challenge() -> [u8; 16] {
    let mut challenge = [0u8; 16];
    let from_os =
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut challenge));
    if from_os.is_err() {
        use std::hash::{BuildHasher, Hasher};
        for chunk in challenge.chunks_mut(8) {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            chunk.copy_from_slice(&hasher.finish().to_le_bytes()[..chunk.len()]);
        }
    }
    challenge
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn write_failure(stream: &mut TcpStream, version: Version, reason: &str) {
    let mut message = 1u32.to_be_bytes().to_vec();
    if version == Version::V3_8 {
        message.extend_from_slice(&(reason.len() as u32).to_be_bytes());
        message.extend_from_slice(reason.as_bytes());
    }
    let _ = stream.write_all(&message);
}

/// Runs the handshake up to and including ServerInit; returns the frame size sent.
fn handshake(
    reader: &mut Reader,
    stream: &mut TcpStream,
    config: &VncConfig,
    shared: &ServerShared,
) -> Result<(u32, u32), ClientError> {
    stream.write_all(b"RFB 003.008\n")?;
    let mut version = [0u8; 12];
    reader.read_exact(&mut version)?;
    let version = parse_version(&version)?;
    let password = config.password.as_deref().filter(|p| !p.is_empty());
    let security_type: u8 = if password.is_some() { 2 } else { 1 };
    if version == Version::V3_3 {
        stream.write_all(&u32::from(security_type).to_be_bytes())?;
    } else {
        stream.write_all(&[1, security_type])?;
        let chosen = reader.u8()?;
        if chosen != security_type {
            write_failure(stream, version, "security type not offered");
            return Err(protocol(format!("client chose security type {chosen}")));
        }
    }
    if let Some(password) = password {
        let challenge = random_challenge();
        stream.write_all(&challenge)?;
        let mut response = [0u8; 16];
        reader.read_exact(&mut response)?;
        if !constant_time_eq(&response, &des::vnc_response(password, &challenge)) {
            write_failure(stream, version, "authentication failed: wrong password");
            return Err(ClientError::AuthenticationFailed);
        }
        stream.write_all(&0u32.to_be_bytes())?;
    } else if version == Version::V3_8 {
        stream.write_all(&0u32.to_be_bytes())?;
    }
    let _shared_flag = reader.u8()?;
    let (width, height) = frame_size(shared);
    let mut init = Vec::with_capacity(24 + config.name.len());
    init.extend_from_slice(&(width as u16).to_be_bytes());
    init.extend_from_slice(&(height as u16).to_be_bytes());
    init.extend_from_slice(&PixelFormat::XRGB8888.to_bytes());
    init.extend_from_slice(&(config.name.len() as u32).to_be_bytes());
    init.extend_from_slice(config.name.as_bytes());
    stream.write_all(&init)?;
    Ok((width, height))
}

fn frame_size(shared: &ServerShared) -> (u32, u32) {
    let mut size = (0, 0);
    shared
        .source
        .with_frame(0, &mut |frame, _| size = usable_size(&frame));
    size
}

/// The part of a frame the server uses: at most 65535 pixels each way (RFB's limit) and no
/// more rows and columns than the pixel buffer and stride really hold.
fn usable_size(frame: &crate::FrameRef<'_>) -> (u32, u32) {
    let columns = (frame.stride / 4).min(u16::MAX.into()) as u32;
    let width = frame.width.min(columns);
    let row_bytes = width as usize * 4;
    let rows = match frame.pixels.len().checked_sub(row_bytes) {
        Some(rest) if row_bytes > 0 => rest / frame.stride + 1,
        _ => 0,
    };
    let height = frame.height.min(rows.min(u16::MAX.into()) as u32);
    if width == 0 || height == 0 {
        (0, 0)
    } else {
        (width, height)
    }
}

/// Serves one connection until it closes, fails, or the server stops.
pub(crate) fn serve(shared: Arc<ServerShared>, stream: TcpStream) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "unknown".to_string(), |a| a.to_string());
    match run(&shared, stream) {
        Ok(()) => log::info!("VNC client {peer} disconnected"),
        Err(e) => log::info!("VNC client {peer} disconnected: {e}"),
    }
}

fn run(shared: &Arc<ServerShared>, stream: TcpStream) -> Result<(), ClientError> {
    let config = &shared.config;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(config.write_timeout))?;
    let mut writer_stream = stream.try_clone()?;
    let mut reader = Reader::new(stream.try_clone()?);
    reader.set_deadline(Some(config.handshake_timeout))?;
    let size = handshake(&mut reader, &mut writer_stream, config, shared)?;
    reader.set_deadline(None)?;

    let session = Arc::new(Session {
        state: Mutex::new(SessionState {
            format: PixelFormat::XRGB8888,
            encodings: Encodings::default(),
            announce_layout: false,
            request: None,
            resize_replies: 0,
            client_size: size,
            closed: false,
        }),
        wake: Condvar::new(),
    });
    let writer = {
        let session = Arc::clone(&session);
        let shared = Arc::clone(shared);
        std::thread::Builder::new()
            .name("vnc-writer".into())
            .spawn(move || {
                let mut writer = Writer::new(shared, writer_stream, size);
                let result = writer.run(&session);
                if let Err(e) = &result {
                    log::info!("VNC client writer stopped: {e}");
                }
                session.close();
                let _ = writer.stream.shutdown(Shutdown::Both);
            })?
    };
    let mut pressed = Vec::new();
    let result = read_messages(shared, &session, &mut reader, &mut pressed);
    for code in pressed {
        shared.input.key(code, false);
    }
    session.close();
    let _ = stream.shutdown(Shutdown::Both);
    let _ = writer.join();
    result
}

fn read_messages(
    shared: &ServerShared,
    session: &Session,
    reader: &mut Reader,
    pressed: &mut Vec<u16>,
) -> Result<(), ClientError> {
    let mut buttons_before = 0u8;
    loop {
        if shared.stop.load(Ordering::Relaxed) || session.lock().closed {
            return Ok(());
        }
        let message_type = match reader.u8() {
            Ok(t) => t,
            Err(ClientError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        match message_type {
            0 => {
                let mut bytes = [0u8; 19];
                reader.read_exact(&mut bytes)?;
                let mut format_bytes = [0u8; 16];
                format_bytes.copy_from_slice(&bytes[3..]);
                let format = PixelFormat::parse(&format_bytes)
                    .map_err(|e| protocol(format!("SetPixelFormat refused: {e}")))?;
                session.lock().format = format;
            }
            2 => {
                let _pad = reader.u8()?;
                let count = reader.u16()?;
                let mut encodings = Encodings::default();
                let mut preferred = None;
                for _ in 0..count {
                    let value = reader.u32()? as i32;
                    match value {
                        encoding::RAW
                        | encoding::HEXTILE
                        | encoding::ZLIB
                        | encoding::TIGHT
                        | encoding::ZRLE => {
                            preferred.get_or_insert(value);
                        }
                        encoding::COPY_RECT => encodings.copy_rect = true,
                        encoding::PSEUDO_CURSOR => encodings.cursor = true,
                        encoding::PSEUDO_DESKTOP_SIZE => encodings.desktop_size = true,
                        encoding::PSEUDO_EXTENDED_DESKTOP_SIZE => {
                            encodings.extended_desktop_size = true
                        }
                        encoding::PSEUDO_QEMU_EXTENDED_KEY_EVENT => encodings.qemu_key_event = true,
                        _ => {}
                    }
                }
                encodings.preferred = preferred.unwrap_or(encoding::RAW);
                let mut state = session.lock();
                if encodings.extended_desktop_size && !state.encodings.extended_desktop_size {
                    state.announce_layout = true;
                }
                state.encodings = encodings;
                drop(state);
                session.wake.notify_all();
            }
            3 => {
                let incremental = reader.u8()? != 0;
                let x = reader.u16()?;
                let y = reader.u16()?;
                let width = reader.u16()?;
                let height = reader.u16()?;
                let request = UpdateRequest {
                    incremental,
                    rect: Rect::new(x.into(), y.into(), width.into(), height.into()),
                };
                let mut state = session.lock();
                state.request = merge_requests(state.request.take(), Some(request));
                drop(state);
                session.wake.notify_all();
            }
            4 => {
                let down = reader.u8()? != 0;
                let _pad = reader.u16()?;
                let keysym = reader.u32()?;
                match keysym_to_evdev(keysym) {
                    Some(code) => press(shared, pressed, code, down),
                    None => log::debug!("VNC: no key for keysym {keysym:#x}"),
                }
            }
            5 => {
                let mask = reader.u8()?;
                let x = reader.u16()?;
                let y = reader.u16()?;
                let (width, height) = session.lock().client_size;
                let scale = |value: u16, size: u32| -> u16 {
                    let last = size.saturating_sub(1).max(1);
                    let value = u32::from(value).min(last);
                    (value * 0x7fff / last) as u16
                };
                let newly = mask & !buttons_before;
                let wheel = if newly & 0x08 != 0 {
                    1
                } else if newly & 0x10 != 0 {
                    -1
                } else {
                    0
                };
                buttons_before = mask;
                shared
                    .input
                    .pointer(scale(x, width), scale(y, height), mask & 0x07, wheel);
            }
            6 => {
                let mut pad = [0u8; 3];
                reader.read_exact(&mut pad)?;
                let length = reader.u32()?;
                if length > MAX_CUT_TEXT {
                    return Err(protocol(format!(
                        "ClientCutText of {length} bytes exceeds the {MAX_CUT_TEXT} byte limit"
                    )));
                }
                reader.skip(length.into())?;
            }
            251 => {
                let _pad = reader.u8()?;
                let _width = reader.u16()?;
                let _height = reader.u16()?;
                let screens = reader.u8()?;
                let _pad = reader.u8()?;
                reader.skip(u64::from(screens) * 16)?;
                let mut state = session.lock();
                if state.encodings.extended_desktop_size {
                    state.resize_replies = state.resize_replies.saturating_add(1).min(16);
                }
                drop(state);
                session.wake.notify_all();
            }
            255 => {
                let sub = reader.u8()?;
                if sub != 0 {
                    return Err(protocol(format!("unknown QEMU client message {sub}")));
                }
                let down = reader.u16()? != 0;
                let keysym = reader.u32()?;
                let keycode = reader.u32()?;
                match qnum_to_evdev(keycode).or_else(|| keysym_to_evdev(keysym)) {
                    Some(code) => press(shared, pressed, code, down),
                    None => {
                        log::debug!("VNC: no key for scancode {keycode:#x} / keysym {keysym:#x}")
                    }
                }
            }
            other => return Err(protocol(format!("unknown message type {other}"))),
        }
    }
}

fn press(shared: &ServerShared, pressed: &mut Vec<u16>, code: u16, down: bool) {
    if down {
        if !pressed.contains(&code) && pressed.len() < 64 {
            pressed.push(code);
        }
    } else {
        pressed.retain(|&c| c != code);
    }
    shared.input.key(code, down);
}

/// A framebuffer update being assembled.
#[derive(Default)]
struct Update {
    count: usize,
    body: Vec<u8>,
    /// Where each rectangle starts in `body`.
    starts: Vec<usize>,
}

impl Update {
    fn header(&mut self, x: u32, y: u32, width: u32, height: u32, encoding: i32) {
        self.count += 1;
        self.starts.push(self.body.len());
        self.body
            .extend_from_slice(&(x.min(65535) as u16).to_be_bytes());
        self.body
            .extend_from_slice(&(y.min(65535) as u16).to_be_bytes());
        self.body
            .extend_from_slice(&(width.min(65535) as u16).to_be_bytes());
        self.body
            .extend_from_slice(&(height.min(65535) as u16).to_be_bytes());
        self.body.extend_from_slice(&encoding.to_be_bytes());
    }

    fn extended_desktop_size(&mut self, reason: u32, status: u32, size: (u32, u32)) {
        self.header(
            reason,
            status,
            size.0,
            size.1,
            encoding::PSEUDO_EXTENDED_DESKTOP_SIZE,
        );
        self.body.extend_from_slice(&[1, 0, 0, 0]);
        self.body.extend_from_slice(&0u32.to_be_bytes()); // screen id
        self.body.extend_from_slice(&[0, 0, 0, 0]); // x, y
        self.body
            .extend_from_slice(&(size.0.min(65535) as u16).to_be_bytes());
        self.body
            .extend_from_slice(&(size.1.min(65535) as u16).to_be_bytes());
        self.body.extend_from_slice(&0u32.to_be_bytes()); // flags
    }

    /// The message(s) on the wire: one FramebufferUpdate per 65535 rectangles.
    fn into_message(self) -> Vec<u8> {
        let mut message = Vec::with_capacity(self.body.len() + 4);
        let mut starts = self.starts;
        starts.push(self.body.len());
        for chunk in starts
            .windows(2)
            .collect::<Vec<_>>()
            .chunks(usize::from(u16::MAX))
        {
            let (Some(first), Some(last)) = (chunk.first(), chunk.last()) else {
                continue;
            };
            message.extend_from_slice(&[0, 0]);
            message.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            message.extend_from_slice(self.body.get(first[0]..last[1]).unwrap_or(&[]));
        }
        message
    }
}

struct Writer {
    shared: Arc<ServerShared>,
    stream: TcpStream,
    /// What the client shows, 0x00RRGGBB.
    shadow: Vec<u32>,
    shadow_size: (u32, u32),
    /// The size the client was last told about.
    client_size: (u32, u32),
    last_generation: Option<u64>,
    /// Something outside the last sent area may differ from the shadow: compare everything.
    compare_all: bool,
    cursor_sent: Option<u64>,
    cursor_encodings: bool,
    zrle_stream: ZlibStream,
    zlib_stream: ZlibStream,
    tight_streams: TightStreams,
}

impl Writer {
    fn new(shared: Arc<ServerShared>, stream: TcpStream, size: (u32, u32)) -> Writer {
        Writer {
            shared,
            stream,
            shadow: Vec::new(),
            shadow_size: (0, 0),
            client_size: size,
            last_generation: None,
            compare_all: true,
            cursor_sent: None,
            cursor_encodings: false,
            zrle_stream: ZlibStream::default(),
            zlib_stream: ZlibStream::default(),
            tight_streams: TightStreams::default(),
        }
    }

    fn send(&mut self, update: Update) -> Result<(), ClientError> {
        let message = update.into_message();
        self.stream.write_all(&message).map_err(|e| {
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                protocol(format!(
                    "client did not read for {:?}",
                    self.shared.config.write_timeout
                ))
            } else {
                e.into()
            }
        })?;
        self.shared
            .bytes_sent
            .fetch_add(message.len() as u64, Ordering::Relaxed);
        self.shared.updates_sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn run(&mut self, session: &Session) -> Result<(), ClientError> {
        loop {
            let (request, format, encodings, announce, replies) = {
                let mut state = session.lock();
                loop {
                    if state.closed || self.shared.stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    if state.request.is_some() || state.resize_replies > 0 {
                        break;
                    }
                    state = match session.wake.wait_timeout(state, POLL) {
                        Ok((guard, _)) => guard,
                        Err(p) => p.into_inner().0,
                    };
                }
                let replies = std::mem::take(&mut state.resize_replies);
                let request = state.request.take();
                // The layout announcement goes with the next requested update.
                let announce = request.is_some() && std::mem::take(&mut state.announce_layout);
                (request, state.format, state.encodings, announce, replies)
            };

            if replies > 0 {
                let mut update = Update::default();
                for _ in 0..replies {
                    update.extended_desktop_size(1, 1, self.client_size);
                }
                self.send(update)?;
            }
            let Some(request) = request else { continue };
            if encodings.cursor != self.cursor_encodings {
                self.cursor_encodings = encodings.cursor;
                self.cursor_sent = None;
            }
            let generation = self.shared.source.generation();
            let cursor = if encodings.cursor {
                self.shared.source.cursor()
            } else {
                None
            };
            let cursor_generation = cursor.as_ref().map(|(g, _)| *g);
            let cursor_changed = encodings.cursor && cursor_generation != self.cursor_sent;
            let anything = announce
                || !request.incremental
                || self.last_generation != Some(generation)
                || self.compare_all
                || cursor_changed;
            let mut sent = false;
            if anything {
                let mut update = Update::default();
                if announce {
                    update.extended_desktop_size(0, 0, self.client_size);
                }
                if cursor_changed {
                    let image = cursor.map(|(_, image)| image).unwrap_or_default();
                    update.header(
                        image.hot_x,
                        image.hot_y,
                        image.width,
                        image.height,
                        encoding::PSEUDO_CURSOR,
                    );
                    encoding::encode_cursor(&image, &format, &mut update.body);
                    self.cursor_sent = cursor_generation;
                }
                self.collect_pixels(&request, &format, &encodings, &mut update)?;
                if update.count > 0 {
                    self.send(update)?;
                    sent = true;
                }
            }
            if !sent {
                // Nothing changed: keep the request and wait for the frame to change.
                let mut state = session.lock();
                state.request = merge_requests(Some(request), state.request.take());
                drop(state);
                let since = self.last_generation.unwrap_or(generation);
                self.shared.source.wait_for_change(since, POLL);
            } else {
                session.lock().client_size = self.client_size;
            }
        }
    }

    /// Brings the shadow up to date and appends the changed tiles (and any size change).
    fn collect_pixels(
        &mut self,
        request: &UpdateRequest,
        format: &PixelFormat,
        encodings: &Encodings,
        update: &mut Update,
    ) -> Result<(), ClientError> {
        let since = self.last_generation.unwrap_or(0);
        let mut copies_to_send = Vec::new();
        // Per tile: the part that changed (the whole tile when forced).
        let mut changed_tiles: Vec<Option<Rect>> = Vec::new();
        let mut tiles_across = 0u32;
        let mut resized = false;
        let mut outside_request = false;
        let full_compare = self.compare_all || self.last_generation.is_none();
        let shadow = &mut self.shadow;
        let shadow_size = &mut self.shadow_size;
        let generation = self.shared.source.with_frame(since, &mut |frame, damage| {
            let (width, height) = usable_size(&frame);
            let mut candidates: Vec<Rect> = Vec::new();
            let mut compare_everything = full_compare || !request.incremental;
            if (width, height) != *shadow_size {
                *shadow_size = (width, height);
                shadow.clear();
                shadow.resize(width as usize * height as usize, 0);
                resized = true;
                compare_everything = true;
            }
            match damage {
                Some((rects, copies)) if !compare_everything => {
                    for copy in copies {
                        let dst = copy.dst.clip(width, height);
                        let src = Rect::new(copy.src_x, copy.src_y, dst.width, dst.height);
                        let valid =
                            !dst.is_empty() && dst == copy.dst && src.clip(width, height) == src;
                        if valid && encodings.copy_rect {
                            apply_copy(shadow, width, src, dst);
                            copies_to_send.push((src, dst));
                        }
                        candidates.push(dst);
                    }
                    candidates.extend(rects.iter().map(|r| r.clip(width, height)));
                }
                _ => candidates.push(Rect::new(0, 0, width, height)),
            }
            tiles_across = width.div_ceil(TILE);
            let tiles_down = height.div_ceil(TILE);
            let mut candidate_tiles = vec![false; (tiles_across * tiles_down) as usize];
            for rect in candidates.iter().filter(|r| !r.is_empty()) {
                for ty in rect.y / TILE..=(rect.y + rect.height - 1) / TILE {
                    for tx in rect.x / TILE..=(rect.x + rect.width - 1) / TILE {
                        if let Some(t) = candidate_tiles.get_mut((ty * tiles_across + tx) as usize)
                        {
                            *t = true;
                        }
                    }
                }
            }
            changed_tiles = vec![None; candidate_tiles.len()];
            let request_rect = request.rect;
            for (index, _) in candidate_tiles.iter().enumerate().filter(|(_, c)| **c) {
                let tx = index as u32 % tiles_across;
                let ty = index as u32 / tiles_across;
                let tile = Rect::new(tx * TILE, ty * TILE, TILE, TILE).clip(width, height);
                let in_request = !tile.intersect(&request_rect).is_empty();
                let forced = resized || (!request.incremental && in_request);
                let bounds = if forced {
                    tile
                } else {
                    match tile_diff_bounds(&frame, shadow, width, &tile) {
                        Some(bounds) => bounds,
                        None => continue,
                    }
                };
                if !in_request && !resized {
                    outside_request = true;
                    continue;
                }
                copy_tile(&frame, shadow, width, &tile);
                changed_tiles[index] = Some(bounds);
            }
        });

        self.last_generation = Some(generation);
        self.compare_all = outside_request;

        if resized && self.shadow_size != self.client_size {
            self.client_size = self.shadow_size;
            if encodings.extended_desktop_size {
                update.extended_desktop_size(0, 0, self.client_size);
            } else if encodings.desktop_size {
                update.header(
                    0,
                    0,
                    self.client_size.0,
                    self.client_size.1,
                    encoding::PSEUDO_DESKTOP_SIZE,
                );
            }
        }
        for (src, dst) in copies_to_send {
            update.header(dst.x, dst.y, dst.width, dst.height, encoding::COPY_RECT);
            update.body.extend_from_slice(&(src.x as u16).to_be_bytes());
            update.body.extend_from_slice(&(src.y as u16).to_be_bytes());
        }
        // Merge horizontal runs of changed tiles into rectangles.
        let (width, height) = self.shadow_size;
        for (row_index, row) in changed_tiles
            .chunks(tiles_across.max(1) as usize)
            .enumerate()
        {
            let mut tx = 0usize;
            while tx < row.len() {
                if row[tx].is_none() {
                    tx += 1;
                    continue;
                }
                let start = tx;
                while tx < row.len() && row[tx].is_some() {
                    tx += 1;
                }
                // A lone changed tile sends only its changed part (a blinking text cursor
                // is a 9x16 cell, not a 64x64 tile); runs are sent as whole tiles.
                let rect = match row[start] {
                    Some(bounds) if tx - start == 1 => bounds,
                    _ => Rect::new(
                        start as u32 * TILE,
                        row_index as u32 * TILE,
                        (tx - start) as u32 * TILE,
                        TILE,
                    )
                    .clip(width, height),
                };
                self.encode_rect(&rect, format, encodings, update)?;
            }
        }
        Ok(())
    }

    fn encode_rect(
        &mut self,
        rect: &Rect,
        format: &PixelFormat,
        encodings: &Encodings,
        update: &mut Update,
    ) -> Result<(), ClientError> {
        if encodings.preferred == encoding::TIGHT {
            // Tight: one rectangle per 64x64 tile (keeps each well under Tight's limits).
            for y in (rect.y..rect.y + rect.height).step_by(TILE as usize) {
                for x in (rect.x..rect.x + rect.width).step_by(TILE as usize) {
                    let tile = Rect::new(x, y, TILE, TILE).intersect(rect);
                    let pixels = encoding::extract(&self.shadow, self.shadow_size.0, &tile);
                    update.header(tile.x, tile.y, tile.width, tile.height, encoding::TIGHT);
                    encoding::tight::encode(
                        &pixels,
                        tile.width as usize,
                        format,
                        &mut self.tight_streams,
                        &mut update.body,
                    )?;
                }
            }
            return Ok(());
        }
        let pixels = encoding::extract(&self.shadow, self.shadow_size.0, rect);
        let (w, h) = (rect.width as usize, rect.height as usize);
        update.header(rect.x, rect.y, rect.width, rect.height, encodings.preferred);
        match encodings.preferred {
            encoding::HEXTILE => encoding::hextile::encode(&pixels, w, h, format, &mut update.body),
            encoding::ZRLE => encoding::zrle::encode(
                &pixels,
                w,
                h,
                format,
                &mut self.zrle_stream,
                &mut update.body,
            )?,
            encoding::ZLIB => {
                encoding::encode_zlib(&pixels, format, &mut self.zlib_stream, &mut update.body)?
            }
            _ => encoding::encode_raw(&pixels, format, &mut update.body),
        }
        Ok(())
    }
}

fn frame_row<'a>(frame: &crate::FrameRef<'a>, y: u32, x: u32, width: u32) -> Option<&'a [u8]> {
    let start = (y as usize)
        .checked_mul(frame.stride)?
        .checked_add(x as usize * 4)?;
    frame
        .pixels
        .get(start..start.checked_add(width as usize * 4)?)
}

/// The smallest rectangle of `tile` whose pixels differ from the client's shadow copy, or
/// None when the tile is unchanged (the whole tile when it cannot be compared).
fn tile_diff_bounds(
    frame: &crate::FrameRef<'_>,
    shadow: &[u32],
    shadow_width: u32,
    tile: &Rect,
) -> Option<Rect> {
    let (mut left, mut right, mut top, mut bottom) = (u32::MAX, 0u32, u32::MAX, 0u32);
    for y in tile.y..tile.y + tile.height {
        let at = y as usize * shadow_width as usize + tile.x as usize;
        let (Some(old), Some(new)) = (
            shadow.get(at..at + tile.width as usize),
            frame_row(frame, y, tile.x, tile.width),
        ) else {
            return Some(*tile);
        };
        for (x, (b, &o)) in (tile.x..).zip(new.chunks_exact(4).zip(old)) {
            if u32::from_le_bytes([b[0], b[1], b[2], 0]) != o {
                left = left.min(x);
                right = right.max(x);
                top = top.min(y);
                bottom = bottom.max(y);
            }
        }
    }
    (left <= right).then(|| Rect::new(left, top, right - left + 1, bottom - top + 1))
}

fn copy_tile(frame: &crate::FrameRef<'_>, shadow: &mut [u32], shadow_width: u32, tile: &Rect) {
    for y in tile.y..tile.y + tile.height {
        let at = y as usize * shadow_width as usize + tile.x as usize;
        let Some(old) = shadow.get_mut(at..at + tile.width as usize) else {
            continue;
        };
        match frame_row(frame, y, tile.x, tile.width) {
            Some(new) => {
                for (o, b) in old.iter_mut().zip(new.chunks_exact(4)) {
                    *o = u32::from_le_bytes([b[0], b[1], b[2], 0]);
                }
            }
            None => old.fill(0),
        }
    }
}

fn apply_copy(shadow: &mut [u32], width: u32, src: Rect, dst: Rect) {
    let source = encoding::extract(shadow, width, &src);
    for (row, pixels) in source.chunks(src.width.max(1) as usize).enumerate() {
        let at = (dst.y as usize + row) * width as usize + dst.x as usize;
        if let Some(target) = shadow.get_mut(at..at + pixels.len()) {
            target.copy_from_slice(pixels);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version(b"RFB 003.008\n").unwrap(), Version::V3_8);
        assert_eq!(parse_version(b"RFB 003.007\n").unwrap(), Version::V3_7);
        assert_eq!(parse_version(b"RFB 003.003\n").unwrap(), Version::V3_3);
        assert_eq!(parse_version(b"RFB 003.005\n").unwrap(), Version::V3_3);
        assert_eq!(parse_version(b"RFB 003.889\n").unwrap(), Version::V3_8);
        assert!(parse_version(b"RFB 004.000\n").is_err());
        assert!(parse_version(b"HTTP/1.1 200").is_err());
        assert!(parse_version(b"RFB 0x3.008\n").is_err());
        assert!(parse_version(&[0xff; 12]).is_err());
    }

    #[test]
    fn frame_size_is_limited_by_the_buffer() {
        let pixels = vec![0u8; 100 * 4 * 10];
        let frame = |width, height, stride| crate::FrameRef {
            width,
            height,
            stride,
            pixels: &pixels,
        };
        assert_eq!(usable_size(&frame(100, 10, 400)), (100, 10));
        assert_eq!(usable_size(&frame(100, 1000, 400)), (100, 10));
        assert_eq!(usable_size(&frame(5000, 10, 400)), (100, 10));
        assert_eq!(usable_size(&frame(100, 10, 0)), (0, 0));
        assert_eq!(usable_size(&frame(u32::MAX, u32::MAX, 4)), (1, 1000));
        // The last row needs only its pixels, not a whole stride.
        assert_eq!(usable_size(&frame(50, 20, 400 + 200)), (50, 7));
    }

    #[test]
    fn huge_updates_split_into_several_messages() {
        let mut update = Update::default();
        for _ in 0..70_000 {
            update.header(0, 0, 0, 0, 0);
        }
        let message = update.into_message();
        assert_eq!(message.len(), 2 * 4 + 70_000 * 12);
        assert_eq!(&message[..4], &[0, 0, 0xff, 0xff]);
        let second = 4 + 65535 * 12;
        assert_eq!(&message[second..second + 4], &[0, 0, 0x11, 0x71]);
    }

    #[test]
    fn requests_merge_to_bounding_box() {
        let a = UpdateRequest {
            incremental: true,
            rect: Rect::new(0, 0, 10, 10),
        };
        let b = UpdateRequest {
            incremental: false,
            rect: Rect::new(20, 5, 5, 30),
        };
        let merged = merge_requests(Some(a), Some(b)).unwrap();
        assert!(!merged.incremental);
        assert_eq!(merged.rect, Rect::new(0, 0, 25, 35));
        assert_eq!(merge_requests(None, Some(a)), Some(a));
    }

    #[test]
    fn copy_inside_shadow_handles_overlap() {
        let mut shadow: Vec<u32> = (0..16).collect();
        apply_copy(&mut shadow, 4, Rect::new(0, 0, 3, 3), Rect::new(1, 1, 3, 3));
        assert_eq!(
            shadow,
            vec![0, 1, 2, 3, 4, 0, 1, 2, 8, 4, 5, 6, 12, 8, 9, 10]
        );
    }
}
