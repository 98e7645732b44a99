//! RFB pixel formats (RFC 6143 7.4): parsing, validation and conversion of 0x00RRGGBB pixels
//! into a client's true-colour format (8, 16 or 32 bits per pixel, any shifts, either byte
//! order). Colour-map formats are not supported and are rejected by [`PixelFormat::parse`].

/// A client's pixel format as sent in ServerInit / SetPixelFormat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelFormat {
    pub bits_per_pixel: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub true_colour: bool,
    pub red_max: u16,
    pub green_max: u16,
    pub blue_max: u16,
    pub red_shift: u8,
    pub green_shift: u8,
    pub blue_shift: u8,
}

/// Why a pixel format was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PixelFormatError {
    #[error("bits per pixel {0} is not 8, 16 or 32")]
    BitsPerPixel(u8),
    #[error("colour-map pixel formats are not supported")]
    ColourMap,
    #[error("a colour maximum is 0")]
    ZeroMax,
    #[error("colour channel max {max} << shift {shift} does not fit in {bpp} bits")]
    ChannelOutOfRange { max: u16, shift: u8, bpp: u8 },
}

impl PixelFormat {
    /// The server's native format: 32 bpp, depth 24, little-endian, 0x00RRGGBB.
    pub const XRGB8888: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        true_colour: true,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    /// Parses and validates the 16-byte wire form.
    pub fn parse(bytes: &[u8; 16]) -> Result<PixelFormat, PixelFormatError> {
        let format = PixelFormat {
            bits_per_pixel: bytes[0],
            depth: bytes[1],
            big_endian: bytes[2] != 0,
            true_colour: bytes[3] != 0,
            red_max: u16::from_be_bytes([bytes[4], bytes[5]]),
            green_max: u16::from_be_bytes([bytes[6], bytes[7]]),
            blue_max: u16::from_be_bytes([bytes[8], bytes[9]]),
            red_shift: bytes[10],
            green_shift: bytes[11],
            blue_shift: bytes[12],
        };
        format.validate()?;
        Ok(format)
    }

    pub fn validate(&self) -> Result<(), PixelFormatError> {
        let bpp = self.bits_per_pixel;
        if !matches!(bpp, 8 | 16 | 32) {
            return Err(PixelFormatError::BitsPerPixel(bpp));
        }
        if !self.true_colour {
            return Err(PixelFormatError::ColourMap);
        }
        for (max, shift) in [
            (self.red_max, self.red_shift),
            (self.green_max, self.green_shift),
            (self.blue_max, self.blue_shift),
        ] {
            if max == 0 {
                return Err(PixelFormatError::ZeroMax);
            }
            let fits =
                u32::from(shift) < u32::from(bpp) && (u64::from(max) << shift) < (1u64 << bpp);
            if !fits {
                return Err(PixelFormatError::ChannelOutOfRange { max, shift, bpp });
            }
        }
        Ok(())
    }

    /// The 16-byte wire form (3 padding bytes at the end).
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0] = self.bits_per_pixel;
        out[1] = self.depth;
        out[2] = u8::from(self.big_endian);
        out[3] = u8::from(self.true_colour);
        out[4..6].copy_from_slice(&self.red_max.to_be_bytes());
        out[6..8].copy_from_slice(&self.green_max.to_be_bytes());
        out[8..10].copy_from_slice(&self.blue_max.to_be_bytes());
        out[10] = self.red_shift;
        out[11] = self.green_shift;
        out[12] = self.blue_shift;
        out
    }

    pub fn bytes_per_pixel(&self) -> usize {
        usize::from(self.bits_per_pixel / 8)
    }

    /// Converts 0x00RRGGBB to the client's pixel value (not yet byte-ordered).
    pub fn pixel_value(&self, rgb: u32) -> u32 {
        let channel = |value: u32, max: u16, shift: u8| -> u32 {
            let max = u32::from(max);
            ((value * max + 127) / 255) << shift
        };
        channel((rgb >> 16) & 0xff, self.red_max, self.red_shift)
            | channel((rgb >> 8) & 0xff, self.green_max, self.green_shift)
            | channel(rgb & 0xff, self.blue_max, self.blue_shift)
    }

    /// Appends one converted pixel in the client's byte order.
    pub fn write_pixel(&self, rgb: u32, out: &mut Vec<u8>) {
        if *self == PixelFormat::XRGB8888 {
            out.extend_from_slice(&(rgb & 0x00ff_ffff).to_le_bytes());
            return;
        }
        let value = self.pixel_value(rgb);
        match (self.bits_per_pixel, self.big_endian) {
            (8, _) => out.push(value as u8),
            (16, false) => out.extend_from_slice(&(value as u16).to_le_bytes()),
            (16, true) => out.extend_from_slice(&(value as u16).to_be_bytes()),
            (_, false) => out.extend_from_slice(&value.to_le_bytes()),
            (_, true) => out.extend_from_slice(&value.to_be_bytes()),
        }
    }

    /// Appends many pixels.
    pub fn write_pixels(&self, pixels: &[u32], out: &mut Vec<u8>) {
        out.reserve(pixels.len() * self.bytes_per_pixel());
        for &pixel in pixels {
            self.write_pixel(pixel, out);
        }
    }

    /// ZRLE's compressed pixel (CPIXEL, RFC 6143 7.7.6): for 32 bpp formats of depth <= 24
    /// whose colour bits all lie in the low or high three bytes, the range of the 4 wire bytes
    /// to keep; None when CPIXEL equals PIXEL.
    pub fn cpixel_range(&self) -> Option<std::ops::Range<usize>> {
        if self.bits_per_pixel != 32 || self.depth > 24 || !self.true_colour {
            return None;
        }
        let mask = |max: u16, shift: u8| u64::from(max) << shift;
        let all = mask(self.red_max, self.red_shift)
            | mask(self.green_max, self.green_shift)
            | mask(self.blue_max, self.blue_shift);
        let fits_low = all <= 0x00ff_ffff;
        let fits_high = all & 0xff == 0;
        match (fits_low, fits_high, self.big_endian) {
            (true, _, false) => Some(0..3),
            (true, _, true) => Some(1..4),
            (false, true, false) => Some(1..4),
            (false, true, true) => Some(0..3),
            _ => None,
        }
    }

    /// Appends one ZRLE CPIXEL.
    pub fn write_cpixel(
        &self,
        rgb: u32,
        cpixel: &Option<std::ops::Range<usize>>,
        out: &mut Vec<u8>,
    ) {
        match cpixel {
            None => self.write_pixel(rgb, out),
            Some(range) => {
                let mut wire = Vec::with_capacity(4);
                self.write_pixel(rgb, &mut wire);
                if let Some(part) = wire.get(range.clone()) {
                    out.extend_from_slice(part);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format(bpp: u8, depth: u8, be: bool, max: [u16; 3], shift: [u8; 3]) -> PixelFormat {
        PixelFormat {
            bits_per_pixel: bpp,
            depth,
            big_endian: be,
            true_colour: true,
            red_max: max[0],
            green_max: max[1],
            blue_max: max[2],
            red_shift: shift[0],
            green_shift: shift[1],
            blue_shift: shift[2],
        }
    }

    #[test]
    fn wire_round_trip() {
        let f = format(16, 16, true, [31, 63, 31], [11, 5, 0]);
        assert_eq!(PixelFormat::parse(&f.to_bytes()).unwrap(), f);
        assert_eq!(
            PixelFormat::parse(&PixelFormat::XRGB8888.to_bytes()).unwrap(),
            PixelFormat::XRGB8888
        );
    }

    #[test]
    fn native_format_is_bgrx_bytes() {
        let mut out = Vec::new();
        PixelFormat::XRGB8888.write_pixel(0x112233, &mut out);
        assert_eq!(out, [0x33, 0x22, 0x11, 0]);
    }

    #[test]
    fn rgb565_both_endians() {
        let le = format(16, 16, false, [31, 63, 31], [11, 5, 0]);
        let be = PixelFormat {
            big_endian: true,
            ..le
        };
        let mut out = Vec::new();
        le.write_pixel(0xff0000, &mut out);
        be.write_pixel(0xff0000, &mut out);
        le.write_pixel(0x00ff00, &mut out);
        assert_eq!(out, [0x00, 0xf8, 0xf8, 0x00, 0xe0, 0x07]);
    }

    #[test]
    fn bgr233_and_scaling() {
        let f = format(8, 8, false, [7, 7, 3], [0, 3, 6]);
        let mut out = Vec::new();
        f.write_pixels(
            &[0xffffff, 0x000000, 0xff0000, 0x0000ff, 0x808080],
            &mut out,
        );
        assert_eq!(out, [0xff, 0x00, 0x07, 0xc0, 4 | (4 << 3) | (2 << 6)]);
    }

    #[test]
    fn big_endian_32_with_odd_shifts() {
        let f = format(32, 24, true, [255, 255, 255], [0, 8, 16]);
        let mut out = Vec::new();
        f.write_pixel(0x112233, &mut out);
        // value = 0x00332211, big-endian on the wire.
        assert_eq!(out, [0x00, 0x33, 0x22, 0x11]);
    }

    #[test]
    fn invalid_formats_are_rejected() {
        let mut bytes = PixelFormat::XRGB8888.to_bytes();
        bytes[0] = 0;
        assert_eq!(
            PixelFormat::parse(&bytes),
            Err(PixelFormatError::BitsPerPixel(0))
        );
        bytes[0] = 24;
        assert_eq!(
            PixelFormat::parse(&bytes),
            Err(PixelFormatError::BitsPerPixel(24))
        );
        let mut bytes = PixelFormat::XRGB8888.to_bytes();
        bytes[3] = 0;
        assert_eq!(PixelFormat::parse(&bytes), Err(PixelFormatError::ColourMap));
        let bad_shift = format(16, 16, false, [31, 63, 31], [12, 5, 0]);
        assert!(bad_shift.validate().is_err());
        let huge_shift = format(32, 24, false, [255, 255, 255], [200, 8, 0]);
        assert!(huge_shift.validate().is_err());
        let zero_max = format(32, 24, false, [0, 255, 255], [16, 8, 0]);
        assert_eq!(zero_max.validate(), Err(PixelFormatError::ZeroMax));
        let max_65535 = format(32, 32, false, [65535, 255, 255], [17, 8, 0]);
        assert!(max_65535.validate().is_err());
    }

    #[test]
    fn cpixel_ranges() {
        assert_eq!(PixelFormat::XRGB8888.cpixel_range(), Some(0..3));
        let be = PixelFormat {
            big_endian: true,
            ..PixelFormat::XRGB8888
        };
        assert_eq!(be.cpixel_range(), Some(1..4));
        let high = format(32, 24, false, [255, 255, 255], [24, 16, 8]);
        assert_eq!(high.cpixel_range(), Some(1..4));
        let deep = PixelFormat {
            depth: 32,
            ..PixelFormat::XRGB8888
        };
        assert_eq!(deep.cpixel_range(), None);
        let mut out = Vec::new();
        high.write_cpixel(0x112233, &high.cpixel_range(), &mut out);
        assert_eq!(out, [0x33, 0x22, 0x11]);
    }
}
