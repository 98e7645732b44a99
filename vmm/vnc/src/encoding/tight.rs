//! Tight encoding (RFB community extension, encoding 7) without JPEG: each rectangle is sent
//! as a solid fill, a two-colour bitmap (palette filter, 1 bit per pixel), an indexed image of
//! up to 256 colours (palette filter, 1 byte per pixel) or full colour (copy filter), using
//! zlib streams 0 (full colour), 1 (bitmaps) and 2 (indexed) that live as long as the
//! connection. Not implemented: the gradient filter, JPEG, compression-level pseudo-encodings.
//! Callers keep rectangles within 2048 pixels wide (this server sends 64x64 tiles).

use std::collections::HashMap;

use super::{CompressError, ZlibStream};
use crate::pixel_format::PixelFormat;

const FILL: u8 = 0x80;
const EXPLICIT_FILTER: u8 = 0x40;
const PALETTE_FILTER: u8 = 1;
/// Data shorter than this is sent without zlib (Tight rule).
const MIN_TO_COMPRESS: usize = 12;

/// The connection's Tight zlib streams.
#[derive(Default)]
pub struct TightStreams {
    streams: [ZlibStream; 3],
}

/// Whether TPIXELs are 3 bytes (R, G, B) for this format.
fn packed_tpixel(format: &PixelFormat) -> bool {
    format.bits_per_pixel == 32
        && format.depth == 24
        && format.true_colour
        && format.red_max == 255
        && format.green_max == 255
        && format.blue_max == 255
}

fn write_tpixel(rgb: u32, format: &PixelFormat, out: &mut Vec<u8>) {
    if packed_tpixel(format) {
        out.extend_from_slice(&[(rgb >> 16) as u8, (rgb >> 8) as u8, rgb as u8]);
    } else {
        format.write_pixel(rgb, out);
    }
}

fn write_compact_length(length: usize, out: &mut Vec<u8>) {
    let mut value = length;
    for _ in 0..3 {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn write_data(
    data: &[u8],
    stream: &mut ZlibStream,
    out: &mut Vec<u8>,
) -> Result<(), CompressError> {
    if data.len() < MIN_TO_COMPRESS {
        out.extend_from_slice(data);
        return Ok(());
    }
    let mut compressed = Vec::with_capacity(data.len() / 2 + 64);
    stream.write_compressed(data, &mut compressed)?;
    // write_compressed prefixes a u32 length; Tight wants a compact length instead.
    let body = compressed.get(4..).unwrap_or(&[]);
    write_compact_length(body.len(), out);
    out.extend_from_slice(body);
    Ok(())
}

/// Appends the Tight data of a `width` x `height` rectangle.
pub fn encode(
    pixels: &[u32],
    width: usize,
    format: &PixelFormat,
    streams: &mut TightStreams,
    out: &mut Vec<u8>,
) -> Result<(), CompressError> {
    let mut palette: Vec<u32> = Vec::new();
    let mut index: HashMap<u32, u8> = HashMap::new();
    for &pixel in pixels {
        if index.contains_key(&pixel) {
            continue;
        }
        if palette.len() == 256 {
            palette.clear();
            break;
        }
        index.insert(pixel, palette.len() as u8);
        palette.push(pixel);
    }
    let [full_stream, mono_stream, indexed_stream] = &mut streams.streams;
    match palette.len() {
        1 => {
            out.push(FILL);
            write_tpixel(palette[0], format, out);
        }
        2 => {
            out.push(EXPLICIT_FILTER | (1 << 4));
            out.push(PALETTE_FILTER);
            out.push(1);
            write_tpixel(palette[0], format, out);
            write_tpixel(palette[1], format, out);
            let mut bits = Vec::with_capacity(pixels.len() / 8 + 1);
            for row in pixels.chunks(width.max(1)) {
                for byte_pixels in row.chunks(8) {
                    let mut byte = 0u8;
                    for (bit, pixel) in byte_pixels.iter().enumerate() {
                        if *pixel == palette[1] {
                            byte |= 0x80 >> bit;
                        }
                    }
                    bits.push(byte);
                }
            }
            write_data(&bits, mono_stream, out)?;
        }
        3..=256 if palette.len() * 3 < pixels.len() => {
            out.push(EXPLICIT_FILTER | (2 << 4));
            out.push(PALETTE_FILTER);
            out.push((palette.len() - 1) as u8);
            for &colour in &palette {
                write_tpixel(colour, format, out);
            }
            let indices: Vec<u8> = pixels
                .iter()
                .map(|p| index.get(p).copied().unwrap_or(0))
                .collect();
            write_data(&indices, indexed_stream, out)?;
        }
        _ => {
            out.push(0);
            let mut data = Vec::with_capacity(pixels.len() * 3);
            for &pixel in pixels {
                write_tpixel(pixel, format, &mut data);
            }
            write_data(&data, full_stream, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(
        pixels: &[u32],
        width: usize,
        height: usize,
        streams: &mut TightStreams,
        inflaters: &mut crate::testing::TightInflaters,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        encode(pixels, width, &PixelFormat::XRGB8888, streams, &mut out).unwrap();
        let mut data = &out[..];
        let decoded = crate::testing::decode_tight(&mut data, width, height, inflaters).unwrap();
        assert!(data.is_empty(), "trailing bytes");
        assert_eq!(decoded, pixels);
        out
    }

    #[test]
    fn compact_length() {
        let mut out = Vec::new();
        write_compact_length(5, &mut out);
        write_compact_length(200, &mut out);
        write_compact_length(20000, &mut out);
        assert_eq!(out, [5, 0xc8, 0x01, 0xa0, 0x9c, 0x01]);
    }

    #[test]
    fn all_kinds_round_trip_on_shared_streams() {
        let mut streams = TightStreams::default();
        let mut inflaters = crate::testing::TightInflaters::default();
        let (w, h) = (64, 64);
        let solid = vec![0x123456; w * h];
        let out = round_trip(&solid, w, h, &mut streams, &mut inflaters);
        assert_eq!(out, [FILL, 0x12, 0x34, 0x56]);
        let mono: Vec<u32> = (0..w * h)
            .map(|i| if i % 5 == 0 { 0xffffff } else { 0 })
            .collect();
        let out = round_trip(&mono, w, h, &mut streams, &mut inflaters);
        assert_eq!(out[0], EXPLICIT_FILTER | 0x10);
        let indexed: Vec<u32> = (0..w * h).map(|i| (i % 37) as u32 * 0x030201).collect();
        let out = round_trip(&indexed, w, h, &mut streams, &mut inflaters);
        assert_eq!(out[0], EXPLICIT_FILTER | 0x20);
        let mut state = 3u32;
        let noise: Vec<u32> = (0..w * h)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (state >> 8) & 0xffffff
            })
            .collect();
        let out = round_trip(&noise, w, h, &mut streams, &mut inflaters);
        assert_eq!(out[0], 0);
        // Tiny rectangles skip zlib.
        let tiny = [0x000001, 0x000002, 0x000003];
        let out = round_trip(&tiny, 3, 1, &mut streams, &mut inflaters);
        assert_eq!(out.len(), 1 + 9);
        // And the streams stay in sync afterwards.
        round_trip(&mono, w, h, &mut streams, &mut inflaters);
        round_trip(&noise, w, h, &mut streams, &mut inflaters);
    }
}
