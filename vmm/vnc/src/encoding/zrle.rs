//! ZRLE encoding (RFC 6143 7.7.6): 64x64 tiles, each raw, solid, packed palette, plain RLE or
//! palette RLE (whichever is smallest), using compressed pixels (CPIXEL) and the connection's
//! single zlib stream.

use std::collections::HashMap;
use std::ops::Range;

use super::{CompressError, ZlibStream};
use crate::pixel_format::PixelFormat;

const TILE: usize = 64;
const MAX_PALETTE: usize = 127;

fn run_length(mut length: usize, out: &mut Vec<u8>) {
    length -= 1;
    while length >= 255 {
        out.push(255);
        length -= 255;
    }
    out.push(length as u8);
}

fn run_length_size(length: usize) -> usize {
    (length - 1) / 255 + 1
}

fn encode_tile(
    tile: &[u32],
    width: usize,
    format: &PixelFormat,
    cpixel: &Option<Range<usize>>,
    out: &mut Vec<u8>,
) {
    let cpixel_size = cpixel
        .as_ref()
        .map_or(format.bytes_per_pixel(), |r| r.len());
    // Runs (across rows) and palette.
    let mut runs: Vec<(u32, usize)> = Vec::new();
    for &pixel in tile {
        match runs.last_mut() {
            Some((colour, length)) if *colour == pixel => *length += 1,
            _ => runs.push((pixel, 1)),
        }
    }
    let mut palette: Vec<u32> = Vec::new();
    let mut index: HashMap<u32, u8> = HashMap::new();
    for &(colour, _) in &runs {
        if palette.len() > MAX_PALETTE {
            break;
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = index.entry(colour) {
            slot.insert(palette.len() as u8);
            palette.push(colour);
        }
    }

    if palette.len() == 1 {
        out.push(1);
        format.write_cpixel(palette[0], cpixel, out);
        return;
    }

    let height = tile.len() / width.max(1);
    let raw_size = tile.len() * cpixel_size;
    let plain_rle_size: usize = runs
        .iter()
        .map(|&(_, length)| cpixel_size + run_length_size(length))
        .sum();
    let usable_palette = palette.len() <= MAX_PALETTE;
    let palette_rle_size = usable_palette.then(|| {
        palette.len() * cpixel_size
            + runs
                .iter()
                .map(|&(_, length)| {
                    if length == 1 {
                        1
                    } else {
                        1 + run_length_size(length)
                    }
                })
                .sum::<usize>()
    });
    let bits = match palette.len() {
        2 => 1,
        3..=4 => 2,
        5..=16 => 4,
        _ => 0,
    };
    let packed_size =
        (bits > 0).then(|| palette.len() * cpixel_size + height * (width * bits).div_ceil(8));

    let mut best = (raw_size, 0u8);
    if plain_rle_size < best.0 {
        best = (plain_rle_size, 128);
    }
    if let Some(size) = palette_rle_size {
        if size < best.0 {
            best = (size, 130);
        }
    }
    if let Some(size) = packed_size {
        if size < best.0 {
            best = (size, 2);
        }
    }

    match best.1 {
        0 => {
            out.push(0);
            for &pixel in tile {
                format.write_cpixel(pixel, cpixel, out);
            }
        }
        128 => {
            out.push(128);
            for &(colour, length) in &runs {
                format.write_cpixel(colour, cpixel, out);
                run_length(length, out);
            }
        }
        130 => {
            out.push(128 + palette.len() as u8);
            for &colour in &palette {
                format.write_cpixel(colour, cpixel, out);
            }
            for &(colour, length) in &runs {
                let entry = index.get(&colour).copied().unwrap_or(0);
                if length == 1 {
                    out.push(entry);
                } else {
                    out.push(entry | 128);
                    run_length(length, out);
                }
            }
        }
        _ => {
            out.push(palette.len() as u8);
            for &colour in &palette {
                format.write_cpixel(colour, cpixel, out);
            }
            for row in tile.chunks(width.max(1)) {
                let mut byte = 0u8;
                let mut used = 0;
                for pixel in row {
                    let entry = index.get(pixel).copied().unwrap_or(0);
                    byte |= entry << (8 - bits - used);
                    used += bits;
                    if used == 8 {
                        out.push(byte);
                        byte = 0;
                        used = 0;
                    }
                }
                if used > 0 {
                    out.push(byte);
                }
            }
        }
    }
}

/// Appends the ZRLE data (u32 length + zlib data) of a `width` x `height` rectangle.
pub fn encode(
    pixels: &[u32],
    width: usize,
    height: usize,
    format: &PixelFormat,
    stream: &mut ZlibStream,
    out: &mut Vec<u8>,
) -> Result<(), CompressError> {
    let cpixel = format.cpixel_range();
    let mut plain = Vec::with_capacity(pixels.len());
    let mut tile = Vec::with_capacity(TILE * TILE);
    for tile_y in (0..height).step_by(TILE) {
        for tile_x in (0..width).step_by(TILE) {
            let tile_width = TILE.min(width - tile_x);
            let tile_height = TILE.min(height - tile_y);
            tile.clear();
            for y in tile_y..tile_y + tile_height {
                let start = y * width + tile_x;
                tile.extend_from_slice(pixels.get(start..start + tile_width).unwrap_or(&[]));
            }
            tile.resize(tile_width * tile_height, 0);
            encode_tile(&tile, tile_width, format, &cpixel, &mut plain);
        }
    }
    stream.write_compressed(&plain, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(seed: u32, count: usize) -> Vec<u32> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (state >> 8) & 0x00ff_ffff
            })
            .collect()
    }

    #[test]
    fn round_trips_all_tile_kinds_on_one_stream() {
        let mut stream = ZlibStream::default();
        let mut inflate = flate2::Decompress::new(true);
        let (width, height) = (150, 70);
        let n = width * height;
        let mut images: Vec<Vec<u32>> = vec![
            vec![0x336699; n],
            pseudo_random(1, n),
            (0..n).map(|i| [0xff0000, 0x00ff00][(i / 3) % 2]).collect(),
            (0..n).map(|i| ((i % 13) as u32) * 0x010101).collect(),
            (0..n).map(|i| ((i / 7 % 100) as u32) * 0x020201).collect(),
            (0..n).map(|i| ((i / 40) as u32) * 0x000301).collect(),
        ];
        let mut mixed = pseudo_random(9, width * height);
        for (i, pixel) in mixed.iter_mut().enumerate() {
            if (i % width) < 64 {
                *pixel = 0x111111 * ((i / 1000) as u32 % 3);
            }
        }
        images.push(mixed);
        for image in &images {
            let mut out = Vec::new();
            encode(
                image,
                width,
                height,
                &PixelFormat::XRGB8888,
                &mut stream,
                &mut out,
            )
            .unwrap();
            let mut data = &out[..];
            let decoded = crate::testing::decode_zrle(&mut data, width, height, &mut inflate)
                .expect("decodes");
            assert!(data.is_empty());
            assert_eq!(&decoded, image);
        }
    }

    #[test]
    fn subencoding_choice() {
        let n = 64 * 64;
        let first_byte = |tile: Vec<u32>| {
            let mut out = Vec::new();
            encode_tile(&tile, 64, &PixelFormat::XRGB8888, &Some(0..3), &mut out);
            out[0]
        };
        assert_eq!(first_byte(vec![5; n]), 1);
        assert_eq!(first_byte(pseudo_random(1, n)), 0);
        assert_eq!(first_byte((0..n).map(|i| (i % 2) as u32).collect()), 2);
        assert_eq!(first_byte((0..n).map(|i| (i % 13) as u32).collect()), 13);
        assert_eq!(
            first_byte((0..n).map(|i| (i / 7 % 100) as u32).collect()),
            128 + 100
        );
        assert_eq!(
            first_byte((0..n).map(|i| (i / 16) as u32 * 0x010203).collect()),
            128
        );
    }

    #[test]
    fn every_block_is_completely_flushed() {
        // Regression: passing input and a sync flush to one compress call could leave bytes
        // in the compressor when the output vector already held earlier rectangles.
        fn pattern(x: u32, y: u32) -> u32 {
            if y < 40 {
                0x2050a0
            } else if x < 64 {
                0xffffff * ((x / 4 + y / 4) % 2)
            } else if x < 128 {
                ((x * 2) << 16) | ((y % 256) << 8) | 0x40
            } else {
                (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40503)) & 0x00ff_ffff
            }
        }
        let mut stream = ZlibStream::default();
        let mut inflate = flate2::Decompress::new(true);
        let (width, height) = (640usize, 64usize);
        let mut out = Vec::new();
        let mut images = Vec::new();
        for y0 in [0u32, 64, 128, 192] {
            let image: Vec<u32> = (0..width * height)
                .map(|i| pattern((i % width) as u32, (i / width) as u32 + y0))
                .collect();
            encode(
                &image,
                width,
                height,
                &PixelFormat::XRGB8888,
                &mut stream,
                &mut out,
            )
            .unwrap();
            images.push(image);
        }
        let mut data = &out[..];
        for image in &images {
            let decoded =
                crate::testing::decode_zrle(&mut data, width, height, &mut inflate).unwrap();
            assert!(&decoded == image);
        }
        assert!(data.is_empty());
    }

    #[test]
    fn long_runs_use_255_continuation_bytes() {
        let mut out = Vec::new();
        run_length(1, &mut out);
        run_length(256, &mut out);
        run_length(600, &mut out);
        assert_eq!(out, [0, 255, 0, 255, 255, 89]);
    }

    #[test]
    fn solid_tile_is_subencoding_1() {
        let mut out = Vec::new();
        encode_tile(
            &[0x112233; 64],
            8,
            &PixelFormat::XRGB8888,
            &Some(0..3),
            &mut out,
        );
        assert_eq!(out, [1, 0x33, 0x22, 0x11]);
    }

    #[test]
    fn small_and_odd_rectangles() {
        let mut stream = ZlibStream::default();
        let mut inflate = flate2::Decompress::new(true);
        for (width, height) in [(1, 1), (65, 1), (1, 129), (64, 64), (100, 3)] {
            let image = pseudo_random(width as u32, width * height);
            let mut out = Vec::new();
            encode(
                &image,
                width,
                height,
                &PixelFormat::XRGB8888,
                &mut stream,
                &mut out,
            )
            .unwrap();
            let decoded =
                crate::testing::decode_zrle(&mut &out[..], width, height, &mut inflate).unwrap();
            assert_eq!(decoded, image);
        }
    }
}
