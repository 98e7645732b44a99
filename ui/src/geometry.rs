//! Console geometry: where the guest frame goes in the widget (scaled to fit or one guest
//! pixel per device pixel), and how pointer positions in the widget become guest
//! coordinates (absolute 0..=0x7fff for a tablet, relative pixel deltas for a mouse).
//! Pure arithmetic: no GTK.

/// How the frame is scaled into the widget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScaleMode {
    /// As large as fits, aspect ratio kept, centred.
    #[default]
    Fit,
    /// One guest pixel per device pixel (crisp on HiDPI), centred, clipped when larger.
    OneToOne,
}

/// A rectangle in widget (logical) coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FrameRect {
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
}

/// Where a `frame_w`×`frame_h` guest frame is drawn in a `widget_w`×`widget_h` widget
/// whose device scale factor is `scale_factor` (2 on a HiDPI screen). `None` when either
/// size is empty.
pub fn frame_rect(
    widget_w: f64,
    widget_h: f64,
    frame_w: u32,
    frame_h: u32,
    mode: ScaleMode,
    scale_factor: f64,
) -> Option<FrameRect> {
    if frame_w == 0 || frame_h == 0 || widget_w <= 0.0 || widget_h <= 0.0 {
        return None;
    }
    let (fw, fh) = (f64::from(frame_w), f64::from(frame_h));
    let (width, height) = match mode {
        ScaleMode::Fit => {
            let s = (widget_w / fw).min(widget_h / fh);
            (fw * s, fh * s)
        }
        ScaleMode::OneToOne => {
            let sf = if scale_factor >= 1.0 {
                scale_factor
            } else {
                1.0
            };
            (fw / sf, fh / sf)
        }
    };
    // Centred when smaller; pinned to the top left when larger. Whole device pixels.
    let snap = |v: f64| (v * scale_factor.max(1.0)).round() / scale_factor.max(1.0);
    let x = snap(((widget_w - width) / 2.0).max(0.0));
    let y = snap(((widget_h - height) / 2.0).max(0.0));
    Some(FrameRect {
        x,
        y,
        width,
        height,
    })
}

/// The absolute pointer value of the engine's tablet: 0..=ABS_MAX on both axes.
pub const ABS_MAX: u16 = 0x7fff;

/// A widget position as tablet coordinates; positions outside the frame are clamped to
/// its edge.
pub fn to_guest_absolute(x: f64, y: f64, rect: &FrameRect) -> (u16, u16) {
    let axis = |v: f64, origin: f64, len: f64| -> u16 {
        if len <= 0.0 || !v.is_finite() {
            return 0;
        }
        let t = ((v - origin) / len).clamp(0.0, 1.0);
        (t * f64::from(ABS_MAX)).round() as u16
    };
    (axis(x, rect.x, rect.width), axis(y, rect.y, rect.height))
}

/// Whether a widget position lies on the frame.
pub fn is_on_frame(x: f64, y: f64, rect: &FrameRect) -> bool {
    x >= rect.x && y >= rect.y && x < rect.x + rect.width && y < rect.y + rect.height
}

/// Turns widget-space pointer motion into whole guest-pixel deltas, carrying the
/// fractions so slow movements are not lost.
#[derive(Debug, Clone, Default)]
pub struct RelativeMotion {
    last: Option<(f64, f64)>,
    carry: (f64, f64),
}

impl RelativeMotion {
    /// The guest delta for a move to (x, y), where one guest pixel is `guest_per_widget`
    /// guest pixels per widget unit (frame width / drawn width). The first move only
    /// records the position.
    pub fn motion(&mut self, x: f64, y: f64, guest_per_widget: f64) -> (i32, i32) {
        let Some((lx, ly)) = self.last.replace((x, y)) else {
            return (0, 0);
        };
        let scale = if guest_per_widget.is_finite() && guest_per_widget > 0.0 {
            guest_per_widget
        } else {
            1.0
        };
        let fx = (x - lx) * scale + self.carry.0;
        let fy = (y - ly) * scale + self.carry.1;
        let (dx, dy) = (fx.trunc(), fy.trunc());
        self.carry = (fx - dx, fy - dy);
        let clamp = |v: f64| v.clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i32;
        (clamp(dx), clamp(dy))
    }

    /// Forgets the last position (pointer left or grab ended).
    pub fn reset(&mut self) {
        self.last = None;
        self.carry = (0.0, 0.0);
    }
}

/// The engine's button bits (bit 0 left, 1 right, 2 middle, 3 side, 4 extra) for a GDK
/// button number (1 left, 2 middle, 3 right, 8 back, 9 forward).
pub fn button_bit(gdk_button: u32) -> u8 {
    match gdk_button {
        1 => 1,
        3 => 2,
        2 => 4,
        8 => 8,
        9 => 16,
        _ => 0,
    }
}

/// Checks a frame buffer's size: stride at least width×4 and enough bytes for every row.
pub fn frame_fits(width: u32, height: u32, stride: usize, len: usize) -> bool {
    let row = (width as usize).checked_mul(4);
    match row {
        Some(row) if width > 0 && height > 0 && stride >= row => stride
            .checked_mul(height as usize - 1)
            .and_then(|v| v.checked_add(row))
            .is_some_and(|needed| needed <= len),
        _ => false,
    }
}

/// Copies an XRGB8888 frame (bytes B,G,R,X) into a tightly packed buffer with the X byte
/// set to 0xff, which GTK 4.8 can show as an opaque B8G8R8A8 texture. `None` when the
/// buffer is smaller than the sizes say.
pub fn xrgb_to_opaque(width: u32, height: u32, stride: usize, pixels: &[u8]) -> Option<Vec<u8>> {
    if !frame_fits(width, height, stride, pixels.len()) {
        return None;
    }
    let row = width as usize * 4;
    let mut out = Vec::with_capacity(row * height as usize);
    for y in 0..height as usize {
        let start = y * stride;
        let src = pixels.get(start..start + row)?;
        out.extend_from_slice(src);
    }
    for px in out.chunks_exact_mut(4) {
        px[3] = 0xff;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_aspect_and_centres() {
        let r = frame_rect(800.0, 800.0, 640, 480, ScaleMode::Fit, 1.0).unwrap();
        assert_eq!((r.width, r.height), (800.0, 600.0));
        assert_eq!((r.x, r.y), (0.0, 100.0));
        let r = frame_rect(100.0, 50.0, 640, 480, ScaleMode::Fit, 1.0).unwrap();
        assert!((r.height - 50.0).abs() < 1e-9 && r.width < 100.0);
        assert!(frame_rect(0.0, 10.0, 640, 480, ScaleMode::Fit, 1.0).is_none());
        assert!(frame_rect(10.0, 10.0, 0, 480, ScaleMode::Fit, 1.0).is_none());
    }

    #[test]
    fn one_to_one_maps_guest_pixels_to_device_pixels() {
        let r = frame_rect(1000.0, 1000.0, 640, 480, ScaleMode::OneToOne, 2.0).unwrap();
        assert_eq!((r.width, r.height), (320.0, 240.0));
        assert_eq!((r.x, r.y), (340.0, 380.0));
        // Larger than the widget: pinned top left.
        let r = frame_rect(100.0, 100.0, 640, 480, ScaleMode::OneToOne, 1.0).unwrap();
        assert_eq!((r.x, r.y, r.width), (0.0, 0.0, 640.0));
        // A nonsense scale factor counts as 1.
        let r = frame_rect(1000.0, 1000.0, 640, 480, ScaleMode::OneToOne, 0.0).unwrap();
        assert_eq!(r.width, 640.0);
    }

    #[test]
    fn absolute_pointer_spans_the_frame_and_clamps() {
        let rect = FrameRect {
            x: 10.0,
            y: 20.0,
            width: 100.0,
            height: 50.0,
        };
        assert_eq!(to_guest_absolute(10.0, 20.0, &rect), (0, 0));
        assert_eq!(to_guest_absolute(110.0, 70.0, &rect), (ABS_MAX, ABS_MAX));
        assert_eq!(to_guest_absolute(60.0, 45.0, &rect), (16384, 16384));
        assert_eq!(to_guest_absolute(-500.0, 900.0, &rect), (0, ABS_MAX));
        assert_eq!(to_guest_absolute(f64::NAN, 20.0, &rect), (0, 0));
        assert!(is_on_frame(10.0, 20.0, &rect));
        assert!(!is_on_frame(110.0, 20.0, &rect));
        let empty = FrameRect::default();
        assert_eq!(to_guest_absolute(5.0, 5.0, &empty), (0, 0));
    }

    #[test]
    fn relative_motion_scales_and_keeps_fractions() {
        let mut m = RelativeMotion::default();
        assert_eq!(m.motion(100.0, 100.0, 2.0), (0, 0));
        assert_eq!(m.motion(103.0, 99.0, 2.0), (6, -2));
        // Half a guest pixel twice makes one.
        assert_eq!(m.motion(103.25, 99.0, 2.0), (0, 0));
        assert_eq!(m.motion(103.5, 99.0, 2.0), (1, 0));
        assert_eq!(m.motion(1e12, 99.0, 1.0), (i32::from(i16::MAX), 0));
        m.reset();
        assert_eq!(m.motion(0.0, 0.0, f64::NAN), (0, 0));
        assert_eq!(m.motion(1.0, 1.0, f64::NAN), (1, 1));
    }

    #[test]
    fn buttons() {
        assert_eq!(button_bit(1), 1);
        assert_eq!(button_bit(3), 2);
        assert_eq!(button_bit(2), 4);
        assert_eq!(button_bit(8), 8);
        assert_eq!(button_bit(9), 16);
        assert_eq!(button_bit(0), 0);
        assert_eq!(button_bit(42), 0);
    }

    #[test]
    fn frame_copies_check_sizes_and_set_alpha() {
        // 2x2, stride 12 (4 bytes of padding per row).
        let mut px = vec![0u8; 24];
        px[0..4].copy_from_slice(&[1, 2, 3, 0]);
        px[12..16].copy_from_slice(&[4, 5, 6, 0]);
        let out = xrgb_to_opaque(2, 2, 12, &px).unwrap();
        assert_eq!(out.len(), 16);
        assert_eq!(&out[0..4], &[1, 2, 3, 255]);
        assert_eq!(&out[8..12], &[4, 5, 6, 255]);
        // The last row needs only width*4 bytes.
        assert!(xrgb_to_opaque(2, 2, 12, &px[..20]).is_some());
        assert!(xrgb_to_opaque(2, 2, 12, &px[..19]).is_none());
        assert!(xrgb_to_opaque(2, 2, 7, &px).is_none());
        assert!(xrgb_to_opaque(0, 2, 8, &px).is_none());
        assert!(!frame_fits(u32::MAX, u32::MAX, usize::MAX, usize::MAX));
    }
}
