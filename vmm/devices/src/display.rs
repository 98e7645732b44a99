//! What a display card hands to the engine's frame pipeline.
//!
//! A card renders the guest's screen into a [`Surface`] of XRGB8888 pixels (in memory
//! order B, G, R, X: GTK's `B8g8r8x8`, and VNC's usual little-endian true colour), only
//! where something changed, and says where ([`RefreshOutcome::damage`]). Screen-to-screen
//! blits are also reported as copies so that a VNC server can send CopyRect.

use serde::{Deserialize, Serialize};

use crate::vram::DirtyPages;

/// Bytes per pixel of every surface (XRGB8888).
pub const SURFACE_BYTES_PER_PIXEL: usize = 4;

/// A rectangle in surface pixels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    pub fn new(x: u32, y: u32, width: u32, height: u32) -> Self {
        Self {
            x,
            y,
            width,
            height,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// The part of `self` inside a `width` x `height` surface.
    pub fn clip(&self, width: u32, height: u32) -> Rect {
        let x = self.x.min(width);
        let y = self.y.min(height);
        Rect {
            x,
            y,
            width: self.width.min(width - x),
            height: self.height.min(height - y),
        }
    }

    /// The smallest rectangle holding both.
    pub fn union(&self, other: &Rect) -> Rect {
        if self.is_empty() {
            return *other;
        }
        if other.is_empty() {
            return *self;
        }
        let x = self.x.min(other.x);
        let y = self.y.min(other.y);
        let right = (self.x + self.width).max(other.x + other.width);
        let bottom = (self.y + self.height).max(other.y + other.height);
        Rect::new(x, y, right - x, bottom - y)
    }
}

/// `dst` now holds what was at (`src_x`, `src_y`) before (a screen-to-screen blit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyRect {
    pub src_x: u32,
    pub src_y: u32,
    pub dst: Rect,
}

/// The composed screen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Surface {
    pub width: u32,
    pub height: u32,
    /// Bytes per row (at least `width * 4`).
    pub stride: usize,
    /// `stride * height` bytes, XRGB8888.
    pub pixels: Vec<u8>,
}

impl Surface {
    /// A black surface.
    pub fn new(width: u32, height: u32) -> Self {
        let stride = width as usize * SURFACE_BYTES_PER_PIXEL;
        Self {
            width,
            height,
            stride,
            pixels: vec![0; stride * height as usize],
        }
    }

    /// Changes the size (contents become black); returns whether it changed.
    pub fn resize(&mut self, width: u32, height: u32) -> bool {
        if self.width == width && self.height == height {
            return false;
        }
        *self = Surface::new(width, height);
        true
    }

    /// The pixel at (x, y) as 0x00RRGGBB, or None outside.
    pub fn pixel(&self, x: u32, y: u32) -> Option<u32> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let at = y as usize * self.stride + x as usize * SURFACE_BYTES_PER_PIXEL;
        let p = self.pixels.get(at..at + 4)?;
        Some(u32::from_le_bytes([p[0], p[1], p[2], 0]))
    }

    /// Row `y` as a mutable slice of `width * 4` bytes (empty outside).
    pub fn row_mut(&mut self, y: u32) -> &mut [u8] {
        if y >= self.height {
            return &mut [];
        }
        let start = y as usize * self.stride;
        let end = start + self.width as usize * SURFACE_BYTES_PER_PIXEL;
        &mut self.pixels[start..end]
    }
}

/// What one refresh changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RefreshOutcome {
    /// The surface changed size (the whole surface is damaged).
    pub resized: bool,
    /// Rectangles whose pixels changed.
    pub damage: Vec<Rect>,
    /// Screen-to-screen copies, applied before `damage` (damage also covers them).
    pub copies: Vec<CopyRect>,
}

impl RefreshOutcome {
    pub fn is_empty(&self) -> bool {
        !self.resized && self.damage.is_empty()
    }
}

/// The hardware cursor's image: ARGB8888 (0xAARRGGBB per pixel, straight alpha).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CursorImage {
    pub width: u32,
    pub height: u32,
    pub hot_x: u32,
    pub hot_y: u32,
    pub pixels: Vec<u32>,
}

/// The hardware cursor: where and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CursorState {
    pub visible: bool,
    /// Position of the image's top-left corner in surface pixels (may be negative).
    pub x: i32,
    pub y: i32,
    pub image: Option<CursorImage>,
}

/// A display card as the frame pipeline drives it.
pub trait DisplayDevice: Send {
    /// Composes the screen into `surface` where VRAM or registers changed since the last
    /// call. `guest_dirty` are the VRAM pages the guest wrote through the linear mapping
    /// (KVM's dirty log), if mapped; the device adds its own writes.
    fn refresh(
        &mut self,
        guest_dirty: Option<&DirtyPages>,
        surface: &mut Surface,
    ) -> RefreshOutcome;

    /// The hardware cursor, when the card has one enabled.
    fn cursor(&self) -> Option<CursorState> {
        None
    }

    /// In a text mode, the characters on screen (rows joined with '\n'); None otherwise.
    fn text_screen(&self) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rect_clip_and_union() {
        let r = Rect::new(10, 10, 100, 100).clip(50, 200);
        assert_eq!(r, Rect::new(10, 10, 40, 100));
        assert!(Rect::new(60, 0, 5, 5).clip(50, 50).is_empty());
        let u = Rect::new(0, 0, 2, 2).union(&Rect::new(5, 5, 1, 1));
        assert_eq!(u, Rect::new(0, 0, 6, 6));
        assert_eq!(Rect::default().union(&u), u);
    }

    #[test]
    fn surface_pixels_and_resize() {
        let mut s = Surface::new(4, 2);
        s.row_mut(1)[4..8].copy_from_slice(&[0x33, 0x22, 0x11, 0]);
        assert_eq!(s.pixel(1, 1), Some(0x112233));
        assert_eq!(s.pixel(4, 0), None);
        assert!(s.row_mut(5).is_empty());
        assert!(!s.resize(4, 2));
        assert!(s.resize(8, 8));
        assert_eq!(s.pixels.len(), 8 * 8 * 4);
    }
}
