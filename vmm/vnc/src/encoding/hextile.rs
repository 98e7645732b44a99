//! Hextile encoding (RFC 6143 7.7.4): 16x16 tiles, each sent raw, as a background colour, or
//! as background plus single-colour or coloured subrectangles, whichever is smaller.
//! Background/foreground colours carry over between tiles as the spec allows.

use crate::pixel_format::PixelFormat;

const RAW: u8 = 1;
const BACKGROUND_SPECIFIED: u8 = 2;
const FOREGROUND_SPECIFIED: u8 = 4;
const ANY_SUBRECTS: u8 = 8;
const SUBRECTS_COLOURED: u8 = 16;

const TILE: usize = 16;

struct Subrect {
    colour: u32,
    x: usize,
    y: usize,
    width: usize,
    height: usize,
}

/// Finds subrectangles covering every non-background pixel of a tile.
fn subrects(tile: &[u32], width: usize, height: usize, background: u32) -> Vec<Subrect> {
    let mut covered = [false; TILE * TILE];
    let mut found = Vec::new();
    for y in 0..height {
        for x in 0..width {
            let index = y * width + x;
            if covered[index] || tile[index] == background {
                continue;
            }
            let colour = tile[index];
            let mut run = 1;
            while x + run < width && tile[index + run] == colour && !covered[index + run] {
                run += 1;
            }
            let mut rows = 1;
            'grow: while y + rows < height {
                let start = (y + rows) * width + x;
                for i in start..start + run {
                    if tile[i] != colour || covered[i] {
                        break 'grow;
                    }
                }
                rows += 1;
            }
            for row in y..y + rows {
                for cell in &mut covered[row * width + x..row * width + x + run] {
                    *cell = true;
                }
            }
            found.push(Subrect {
                colour,
                x,
                y,
                width: run,
                height: rows,
            });
        }
    }
    found
}

/// Appends the Hextile data of a `width` x `height` rectangle.
pub fn encode(
    pixels: &[u32],
    width: usize,
    height: usize,
    format: &PixelFormat,
    out: &mut Vec<u8>,
) {
    let bytes_per_pixel = format.bytes_per_pixel();
    let mut last_background: Option<u32> = None;
    let mut last_foreground: Option<u32> = None;
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
            if tile.len() != tile_width * tile_height {
                tile.resize(tile_width * tile_height, 0);
            }

            // Count colours (up to three distinct ones matter).
            let mut colours: Vec<(u32, usize)> = Vec::with_capacity(3);
            for &pixel in &tile {
                if let Some(entry) = colours.iter_mut().find(|(colour, _)| *colour == pixel) {
                    entry.1 += 1;
                } else if colours.len() < 3 {
                    colours.push((pixel, 1));
                }
            }
            let background = colours
                .iter()
                .max_by_key(|(_, count)| *count)
                .map(|(colour, _)| *colour)
                .unwrap_or(0);
            let background_changed = last_background != Some(background);
            let raw_size = 1 + tile.len() * bytes_per_pixel;

            if colours.len() == 1 {
                let mask = if background_changed {
                    BACKGROUND_SPECIFIED
                } else {
                    0
                };
                out.push(mask);
                if background_changed {
                    format.write_pixel(background, out);
                }
                last_background = Some(background);
                continue;
            }

            let rects = subrects(&tile, tile_width, tile_height, background);
            let two_colour = colours.len() == 2;
            let foreground = colours
                .iter()
                .find(|(colour, _)| *colour != background)
                .map(|(colour, _)| *colour)
                .unwrap_or(0);
            let foreground_changed = two_colour && last_foreground != Some(foreground);
            let per_rect = if two_colour { 2 } else { 2 + bytes_per_pixel };
            let encoded_size = 2
                + usize::from(background_changed) * bytes_per_pixel
                + usize::from(foreground_changed) * bytes_per_pixel
                + rects.len() * per_rect;
            if rects.len() > 255 || encoded_size >= raw_size {
                out.push(RAW);
                format.write_pixels(&tile, out);
                last_background = None;
                last_foreground = None;
                continue;
            }
            let mut mask = ANY_SUBRECTS;
            if background_changed {
                mask |= BACKGROUND_SPECIFIED;
            }
            if foreground_changed {
                mask |= FOREGROUND_SPECIFIED;
            }
            if !two_colour {
                mask |= SUBRECTS_COLOURED;
            }
            out.push(mask);
            if background_changed {
                format.write_pixel(background, out);
            }
            if foreground_changed {
                format.write_pixel(foreground, out);
            }
            out.push(rects.len() as u8);
            for rect in &rects {
                if !two_colour {
                    format.write_pixel(rect.colour, out);
                }
                out.push(((rect.x as u8) << 4) | rect.y as u8);
                out.push((((rect.width - 1) as u8) << 4) | (rect.height - 1) as u8);
            }
            last_background = Some(background);
            last_foreground = if two_colour { Some(foreground) } else { None };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(pixels: &[u32], width: usize, height: usize) -> usize {
        let mut out = Vec::new();
        encode(pixels, width, height, &PixelFormat::XRGB8888, &mut out);
        let mut data = &out[..];
        let decoded = crate::testing::decode_hextile(&mut data, width, height).expect("decodes");
        assert!(data.is_empty(), "trailing bytes");
        assert_eq!(decoded, pixels);
        out.len()
    }

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
    fn solid_rectangle_is_tiny() {
        let pixels = vec![0x00ff_8000; 64 * 48];
        let size = round_trip(&pixels, 64, 48);
        // First tile: mask + colour, the other 11: one byte each.
        assert_eq!(size, 5 + 11);
    }

    #[test]
    fn two_colour_text_like_tiles() {
        let (width, height) = (37, 21);
        let pixels: Vec<u32> = (0..width * height)
            .map(|i| {
                if (i % width) % 5 == 0 || (i / width) % 7 == 3 {
                    0xffffff
                } else {
                    0x102030
                }
            })
            .collect();
        let size = round_trip(&pixels, width, height);
        assert!(size < width * height * 4 / 4, "size {size}");
    }

    #[test]
    fn many_colour_and_noise_tiles() {
        let (width, height) = (50, 33);
        let mut pixels = pseudo_random(7, width * height);
        // Left part: three colours in blocks (coloured subrects).
        for y in 0..height {
            for x in 0..20 {
                pixels[y * width + x] = [0xff0000, 0x00ff00, 0x0000ff][(x / 4 + y / 5) % 3];
            }
        }
        round_trip(&pixels, width, height);
    }

    #[test]
    fn odd_sizes() {
        for (width, height) in [(1, 1), (17, 1), (1, 17), (16, 16), (15, 31)] {
            let pixels = pseudo_random(width as u32 * 31 + height as u32, width * height);
            round_trip(&pixels, width, height);
            let stripes: Vec<u32> = (0..width * height)
                .map(|i| (i % 3) as u32 * 0x404040)
                .collect();
            round_trip(&stripes, width, height);
        }
    }

    #[test]
    fn other_pixel_formats_have_the_right_length() {
        let format = PixelFormat {
            bits_per_pixel: 16,
            depth: 16,
            big_endian: false,
            true_colour: true,
            red_max: 31,
            green_max: 63,
            blue_max: 31,
            red_shift: 11,
            green_shift: 5,
            blue_shift: 0,
        };
        let pixels = pseudo_random(3, 16 * 16);
        let mut out = Vec::new();
        encode(&pixels, 16, 16, &format, &mut out);
        assert_eq!(out.len(), 1 + 16 * 16 * 2);
    }
}
