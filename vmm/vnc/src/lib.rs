//! An RFB (VNC) server for a VM's screen (RFC 6143).
//!
//! Emulated: RFB 3.3, 3.7 and 3.8 handshakes; security types None and VNC Authentication
//! (DES challenge); several clients at once (the ClientInit shared flag is ignored), each
//! served by its own reader and writer thread; true-colour pixel formats of 8, 16 and 32 bits
//! per pixel with any shifts and byte order; the Raw, CopyRect, Hextile, Zlib, Tight (no JPEG)
//! and ZRLE encodings; the DesktopSize, ExtendedDesktopSize (client resizes are answered with
//! "prohibited"), Cursor and QEMU Extended Key Event pseudo-encodings; keysym and XT scancode
//! translation to Linux evdev key codes; absolute pointer scaled to 0..=0x7fff with a wheel.
//!
//! Not emulated: colour-map pixel formats (such clients are disconnected with a logged reason),
//! Tight's JPEG and gradient modes, RRE/CoRRE, continuous updates, fences, clipboard transfer (client cut text is read
//! and discarded), TLS/VeNCrypt and the QEMU audio messages.
//!
//! The engine implements [`FrameSource`] (its display pipeline) and [`InputSink`] (its input
//! handle) and calls [`VncServer::start`]. [`testing`] has a drawable framebuffer and an input
//! recorder for tests.
#![forbid(unsafe_code)]

mod client;
mod des;
mod encoding;
mod keysym;
mod pixel_format;
mod server;
pub mod testing;

use std::time::Duration;

pub use keysym::{evdev, keysym_to_evdev, qnum_to_evdev};
pub use pixel_format::PixelFormat;
pub use server::{VncConfig, VncServer, VncStats};

/// A rectangle of the frame in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    pub const fn new(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// The part of this rectangle inside `0..width, 0..height` (may be empty).
    pub fn clip(&self, width: u32, height: u32) -> Rect {
        self.intersect(&Rect::new(0, 0, width, height))
    }

    pub fn intersect(&self, other: &Rect) -> Rect {
        let x0 = self.x.max(other.x);
        let y0 = self.y.max(other.y);
        let x1 = (self.x.saturating_add(self.width)).min(other.x.saturating_add(other.width));
        let y1 = (self.y.saturating_add(self.height)).min(other.y.saturating_add(other.height));
        if x1 <= x0 || y1 <= y0 {
            Rect::default()
        } else {
            Rect::new(x0, y0, x1 - x0, y1 - y0)
        }
    }
}

/// A screen-to-screen copy: the pixels at `dst` came from the same-sized area at
/// (`src_x`, `src_y`) of the previous frame contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyRect {
    pub src_x: u32,
    pub src_y: u32,
    pub dst: Rect,
}

/// A borrowed XRGB8888 frame: each pixel is 4 bytes in memory order B, G, R, X; rows are
/// `stride` bytes apart.
#[derive(Debug, Clone, Copy)]
pub struct FrameRef<'a> {
    pub width: u32,
    pub height: u32,
    pub stride: usize,
    pub pixels: &'a [u8],
}

impl FrameRef<'_> {
    /// The pixel at (x, y) as 0x00RRGGBB, or None outside the frame or the buffer.
    pub fn pixel(&self, x: u32, y: u32) -> Option<u32> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let offset = (y as usize)
            .checked_mul(self.stride)?
            .checked_add((x as usize).checked_mul(4)?)?;
        let bytes = self.pixels.get(offset..offset.checked_add(4)?)?;
        Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], 0]))
    }
}

/// A pointer image: `argb` holds `width * height` pixels, 0xAARRGGBB, row-major.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cursor {
    pub width: u32,
    pub height: u32,
    pub hot_x: u32,
    pub hot_y: u32,
    pub argb: Vec<u32>,
}

/// What changed since a generation: damage rectangles and screen-to-screen copies, or None
/// when unknown (the server then compares the whole frame with what each client has).
pub type Changes<'a> = Option<(&'a [Rect], &'a [CopyRect])>;

/// The VM's screen, as the engine's display pipeline keeps it.
pub trait FrameSource: Send + Sync + 'static {
    /// The current frame generation; it changes whenever the frame (contents or size) changes.
    fn generation(&self) -> u64;
    /// Blocks until the generation differs from `since` or `timeout` passes; returns the
    /// generation.
    fn wait_for_change(&self, since: u64, timeout: Duration) -> u64;
    /// Calls `f` with the latest frame and what changed since generation `since`: damage
    /// rectangles and screen-to-screen copies (None = unknown, treat everything as changed).
    /// Returns the generation of the frame passed to `f`. The server re-checks every damaged
    /// or copied tile against what it last sent, so the order of copies relative to damage
    /// does not need to be exact, but nothing outside damage and copy destinations may change.
    fn with_frame(&self, since: u64, f: &mut dyn FnMut(FrameRef<'_>, Changes<'_>)) -> u64;
    /// The guest's pointer image and its generation (changes whenever the image does), or
    /// None when there is no pointer image.
    fn cursor(&self) -> Option<(u64, Cursor)>;
}

/// The VM's keyboard and absolute pointer.
pub trait InputSink: Send + Sync + 'static {
    /// A key press or release, as a Linux evdev key code (KEY_A = 30, ...).
    fn key(&self, evdev_code: u16, down: bool);
    /// Absolute pointer position, each axis 0..=0x7fff scaled from the frame size; `buttons`
    /// bit 0 = left, bit 1 = middle, bit 2 = right; `wheel` is +1 (up) / -1 (down) per notch.
    fn pointer(&self, x: u16, y: u16, buttons: u8, wheel: i8);
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum VncError {
    #[error(
        "VNC: address {0} is already in use; choose another port or stop the program using it"
    )]
    AddressInUse(std::net::SocketAddr),
    #[error("VNC: cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("VNC: cannot start the server thread: {0}")]
    Thread(std::io::Error),
}
