//! RFB rectangle encodings (RFC 6143 7.7): Raw, Hextile, Zlib, Tight and ZRLE pixel data, and the
//! Cursor pseudo-encoding payload. Input pixels are 0x00RRGGBB `u32`s, row-major, exactly
//! `width * height` of them; output is in the client's [`PixelFormat`]. CopyRect, DesktopSize
//! and ExtendedDesktopSize carry no pixel data and are written by the client module.
//! Not implemented: RRE, CoRRE, TRLE, Tight's JPEG and gradient modes.

pub mod hextile;
pub mod tight;
pub mod zrle;

use flate2::{Compress, Compression, FlushCompress};

use crate::pixel_format::PixelFormat;
use crate::Cursor;

pub const RAW: i32 = 0;
pub const COPY_RECT: i32 = 1;
pub const HEXTILE: i32 = 5;
pub const ZLIB: i32 = 6;
pub const TIGHT: i32 = 7;
pub const ZRLE: i32 = 16;
pub const PSEUDO_CURSOR: i32 = -239;
pub const PSEUDO_DESKTOP_SIZE: i32 = -223;
pub const PSEUDO_EXTENDED_DESKTOP_SIZE: i32 = -308;
pub const PSEUDO_QEMU_EXTENDED_KEY_EVENT: i32 = -258;

/// How many sync-flush calls one block may need before the stream is declared broken.
const MAX_FLUSH_CALLS: usize = 64;

/// The zlib stream failed (should not happen; the client is dropped).
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("zlib compression failed: {0}")]
    Zlib(#[from] flate2::CompressError),
    #[error("zlib sync flush did not complete")]
    FlushIncomplete,
}

/// A per-connection zlib stream (RFC 6143 requires one stream for the life of a connection).
pub struct ZlibStream {
    compress: Compress,
}

impl Default for ZlibStream {
    fn default() -> Self {
        ZlibStream {
            compress: Compress::new(Compression::new(6), true),
        }
    }
}

impl ZlibStream {
    /// Compresses `input` with a sync flush and appends it to `out` as a u32 big-endian length
    /// followed by the compressed bytes.
    pub fn write_compressed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CompressError> {
        let length_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let data_at = out.len();
        // Feed everything, then sync-flush until the output ends with the sync marker
        // (00 00 ff ff). miniz_oxide may stop a flush early with room left in the output, so
        // spare capacity alone does not prove the flush finished; an extra empty block from a
        // repeated flush is harmless to decoders.
        let start_in = self.compress.total_in();
        loop {
            let consumed = (self.compress.total_in() - start_in) as usize;
            let Some(rest) = input.get(consumed..).filter(|rest| !rest.is_empty()) else {
                break;
            };
            out.reserve(rest.len() / 2 + 1024);
            self.compress.compress_vec(rest, out, FlushCompress::None)?;
        }
        let mut flushed = false;
        for _ in 0..MAX_FLUSH_CALLS {
            out.reserve(1024 + (out.len() - data_at) / 8);
            self.compress.compress_vec(&[], out, FlushCompress::Sync)?;
            let compressed = out.get(data_at..).unwrap_or(&[]);
            if out.len() < out.capacity() && compressed.ends_with(&[0, 0, 0xff, 0xff]) {
                flushed = true;
                break;
            }
        }
        if !flushed {
            return Err(CompressError::FlushIncomplete);
        }
        let length = (out.len() - data_at) as u32;
        out[length_at..data_at].copy_from_slice(&length.to_be_bytes());
        Ok(())
    }
}

/// Raw encoding: every pixel in the client's format.
pub fn encode_raw(pixels: &[u32], format: &PixelFormat, out: &mut Vec<u8>) {
    format.write_pixels(pixels, out);
}

/// Zlib encoding: Raw data through the connection's zlib stream.
pub fn encode_zlib(
    pixels: &[u32],
    format: &PixelFormat,
    stream: &mut ZlibStream,
    out: &mut Vec<u8>,
) -> Result<(), CompressError> {
    let mut raw = Vec::with_capacity(pixels.len() * format.bytes_per_pixel());
    format.write_pixels(pixels, &mut raw);
    stream.write_compressed(&raw, out)
}

/// Cursor pseudo-encoding payload: the image in the client's format, then a 1-bit mask
/// (MSB first, rows padded to bytes) set where alpha >= 128.
pub fn encode_cursor(cursor: &Cursor, format: &PixelFormat, out: &mut Vec<u8>) {
    let width = cursor.width as usize;
    let height = cursor.height as usize;
    let pixel = |x: usize, y: usize| cursor.argb.get(y * width + x).copied().unwrap_or(0);
    for y in 0..height {
        for x in 0..width {
            format.write_pixel(pixel(x, y) & 0x00ff_ffff, out);
        }
    }
    let row_bytes = width.div_ceil(8);
    for y in 0..height {
        let mut row = vec![0u8; row_bytes];
        for x in 0..width {
            if pixel(x, y) >> 24 >= 0x80 {
                row[x / 8] |= 0x80 >> (x % 8);
            }
        }
        out.extend_from_slice(&row);
    }
}

/// Copies `rect` out of a `width`-wide pixel buffer (pixels outside read as black).
pub fn extract(buffer: &[u32], buffer_width: u32, rect: &crate::Rect) -> Vec<u32> {
    let mut out = Vec::with_capacity(rect.width as usize * rect.height as usize);
    for y in rect.y..rect.y.saturating_add(rect.height) {
        let start = y as usize * buffer_width as usize + rect.x as usize;
        match buffer.get(start..start + rect.width as usize) {
            Some(row) if rect.x.saturating_add(rect.width) <= buffer_width => {
                out.extend_from_slice(row)
            }
            _ => out.extend(std::iter::repeat_n(0, rect.width as usize)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    #[test]
    fn zlib_stream_is_continuous_across_rectangles() {
        let mut stream = ZlibStream::default();
        let format = PixelFormat::XRGB8888;
        let first: Vec<u32> = (0..1000).map(|i| i * 7).collect();
        let second: Vec<u32> = vec![0x123456; 500];
        let mut out1 = Vec::new();
        let mut out2 = Vec::new();
        encode_zlib(&first, &format, &mut stream, &mut out1).unwrap();
        encode_zlib(&second, &format, &mut stream, &mut out2).unwrap();
        let mut inflate = Decompress::new(true);
        for (out, pixels) in [(&out1, &first), (&out2, &second)] {
            let length = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
            assert_eq!(length, out.len() - 4);
            let mut plain = Vec::with_capacity(pixels.len() * 4 + 64);
            inflate
                .decompress_vec(&out[4..], &mut plain, FlushDecompress::Sync)
                .unwrap();
            let mut expected = Vec::new();
            format.write_pixels(pixels, &mut expected);
            assert_eq!(plain, expected);
        }
    }

    #[test]
    fn cursor_mask_from_alpha() {
        let cursor = Cursor {
            width: 9,
            height: 1,
            hot_x: 0,
            hot_y: 0,
            argb: vec![
                0xff00_00ff,
                0x0000_00ff,
                0x8000_0000,
                0,
                0,
                0,
                0,
                0,
                0xffff_ffff,
            ],
        };
        let mut out = Vec::new();
        encode_cursor(&cursor, &PixelFormat::XRGB8888, &mut out);
        assert_eq!(out.len(), 9 * 4 + 2);
        assert_eq!(&out[..4], &[0xff, 0, 0, 0]);
        assert_eq!(&out[36..], &[0b1010_0000, 0b1000_0000]);
    }

    #[test]
    fn cursor_with_short_pixel_buffer_does_not_panic() {
        let cursor = Cursor {
            width: 4,
            height: 4,
            hot_x: 9,
            hot_y: 9,
            argb: vec![0xffff_ffff],
        };
        let mut out = Vec::new();
        encode_cursor(&cursor, &PixelFormat::XRGB8888, &mut out);
        assert_eq!(out.len(), 16 * 4 + 4);
    }

    #[test]
    fn extract_clips_safely() {
        let buffer: Vec<u32> = (0..16).collect();
        let rect = crate::Rect::new(1, 1, 2, 2);
        assert_eq!(extract(&buffer, 4, &rect), vec![5, 6, 9, 10]);
        let outside = crate::Rect::new(3, 3, 2, 2);
        assert_eq!(extract(&buffer, 4, &outside), vec![0, 0, 0, 0]);
    }
}
