//! A minimal scripted RFB client for tests: handshake (3.3/3.7/3.8, None or VNC
//! Authentication), client messages, and decoding of Raw, CopyRect, Hextile, Zlib, ZRLE,
//! Cursor, DesktopSize and ExtendedDesktopSize into a local framebuffer. It only decodes the
//! server's native pixel format (32 bpp little-endian 0x00RRGGBB); after
//! [`TestClient::set_pixel_format`] use [`TestClient::read_update_raw`].

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use flate2::{Decompress, FlushDecompress};

use crate::des;
use crate::encoding;
use crate::pixel_format::PixelFormat;

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

fn read_u8(r: &mut dyn Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u16(r: &mut dyn Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut dyn Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_pixel(r: &mut dyn Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], 0]))
}

fn read_vec(r: &mut dyn Read, length: usize) -> io::Result<Vec<u8>> {
    let mut data = vec![0u8; length];
    r.read_exact(&mut data)?;
    Ok(data)
}

/// Decodes Hextile data (native pixel format) of a `width` x `height` rectangle.
pub fn decode_hextile(r: &mut dyn Read, width: usize, height: usize) -> io::Result<Vec<u32>> {
    const TILE: usize = 16;
    let mut image = vec![0u32; width * height];
    let (mut background, mut foreground) = (None, None);
    for tile_y in (0..height).step_by(TILE) {
        for tile_x in (0..width).step_by(TILE) {
            let tw = TILE.min(width - tile_x);
            let th = TILE.min(height - tile_y);
            let mask = read_u8(r)?;
            if mask & 1 != 0 {
                for y in 0..th {
                    for x in 0..tw {
                        image[(tile_y + y) * width + tile_x + x] = read_pixel(r)?;
                    }
                }
                background = None;
                foreground = None;
                continue;
            }
            if mask & 2 != 0 {
                background = Some(read_pixel(r)?);
            }
            if mask & 4 != 0 {
                foreground = Some(read_pixel(r)?);
            }
            let bg = background.ok_or_else(|| invalid("hextile: no background"))?;
            for y in 0..th {
                for x in 0..tw {
                    image[(tile_y + y) * width + tile_x + x] = bg;
                }
            }
            if mask & 8 != 0 {
                let count = read_u8(r)?;
                for _ in 0..count {
                    let colour = if mask & 16 != 0 {
                        read_pixel(r)?
                    } else {
                        foreground.ok_or_else(|| invalid("hextile: no foreground"))?
                    };
                    let xy = read_u8(r)?;
                    let wh = read_u8(r)?;
                    let (sx, sy) = (usize::from(xy >> 4), usize::from(xy & 15));
                    let (sw, sh) = (usize::from(wh >> 4) + 1, usize::from(wh & 15) + 1);
                    if sx + sw > tw || sy + sh > th {
                        return Err(invalid("hextile: subrect outside tile"));
                    }
                    for y in sy..sy + sh {
                        for x in sx..sx + sw {
                            image[(tile_y + y) * width + tile_x + x] = colour;
                        }
                    }
                }
                if mask & 16 != 0 {
                    foreground = None;
                }
            }
        }
    }
    Ok(image)
}

fn inflate_block(
    r: &mut dyn Read,
    inflate: &mut Decompress,
    expected: usize,
) -> io::Result<Vec<u8>> {
    let length = read_u32(r)? as usize;
    if length > 64 << 20 {
        return Err(invalid("compressed block too long"));
    }
    let compressed = read_vec(r, length)?;
    let mut plain = Vec::with_capacity(expected + 1024);
    let start = inflate.total_in();
    loop {
        let consumed = (inflate.total_in() - start) as usize;
        let before = (inflate.total_in(), inflate.total_out());
        inflate
            .decompress_vec(&compressed[consumed..], &mut plain, FlushDecompress::Sync)
            .map_err(|e| invalid(format!("inflate: {e}")))?;
        let consumed = (inflate.total_in() - start) as usize;
        if consumed == compressed.len() && plain.len() < plain.capacity() {
            break;
        }
        if before == (inflate.total_in(), inflate.total_out()) && plain.len() < plain.capacity() {
            return Err(invalid("inflate made no progress"));
        }
        if plain.len() == plain.capacity() {
            plain.reserve(plain.len().max(1024));
        }
    }
    Ok(plain)
}

/// Decodes ZRLE data (native pixel format, 3-byte CPIXELs) using the connection's stream.
pub fn decode_zrle(
    r: &mut dyn Read,
    width: usize,
    height: usize,
    inflate: &mut Decompress,
) -> io::Result<Vec<u32>> {
    const TILE: usize = 64;
    let plain = inflate_block(r, inflate, width * height * 4)?;
    let mut data = &plain[..];
    let d = &mut data;
    let cpixel = |d: &mut &[u8]| -> io::Result<u32> {
        let mut b = [0u8; 3];
        d.read_exact(&mut b)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], 0]))
    };
    let run = |d: &mut &[u8]| -> io::Result<usize> {
        let mut length = 1;
        loop {
            let value = read_u8(d)?;
            length += usize::from(value);
            if value != 255 {
                return Ok(length);
            }
        }
    };
    let mut image = vec![0u32; width * height];
    for tile_y in (0..height).step_by(TILE) {
        for tile_x in (0..width).step_by(TILE) {
            let tw = TILE.min(width - tile_x);
            let th = TILE.min(height - tile_y);
            let mut tile = Vec::with_capacity(tw * th);
            let sub = read_u8(d)?;
            match sub {
                0 => {
                    for _ in 0..tw * th {
                        tile.push(cpixel(d)?);
                    }
                }
                1 => {
                    let colour = cpixel(d)?;
                    tile.resize(tw * th, colour);
                }
                2..=16 => {
                    let palette: Vec<u32> =
                        (0..sub).map(|_| cpixel(d)).collect::<io::Result<_>>()?;
                    let bits = match sub {
                        2 => 1,
                        3..=4 => 2,
                        _ => 4,
                    };
                    for _ in 0..th {
                        let mut used = 8;
                        let mut current = 0u8;
                        for _ in 0..tw {
                            if used == 8 {
                                current = read_u8(d)?;
                                used = 0;
                            }
                            let entry = (current >> (8 - bits - used)) & ((1 << bits) - 1);
                            used += bits;
                            tile.push(
                                *palette
                                    .get(usize::from(entry))
                                    .ok_or_else(|| invalid("zrle: index"))?,
                            );
                        }
                    }
                }
                128 => {
                    while tile.len() < tw * th {
                        let colour = cpixel(d)?;
                        let length = run(d)?;
                        tile.extend(std::iter::repeat_n(colour, length));
                    }
                }
                130..=255 => {
                    let palette: Vec<u32> = (0..sub - 128)
                        .map(|_| cpixel(d))
                        .collect::<io::Result<_>>()?;
                    while tile.len() < tw * th {
                        let entry = read_u8(d)?;
                        let colour = *palette
                            .get(usize::from(entry & 127))
                            .ok_or_else(|| invalid("zrle: index"))?;
                        let length = if entry & 128 != 0 { run(d)? } else { 1 };
                        tile.extend(std::iter::repeat_n(colour, length));
                    }
                }
                _ => return Err(invalid(format!("zrle: bad subencoding {sub}"))),
            }
            if tile.len() != tw * th {
                return Err(invalid("zrle: run crosses the tile end"));
            }
            for y in 0..th {
                let at = (tile_y + y) * width + tile_x;
                image[at..at + tw].copy_from_slice(&tile[y * tw..(y + 1) * tw]);
            }
        }
    }
    if !d.is_empty() {
        return Err(invalid("zrle: trailing data"));
    }
    Ok(image)
}

/// The client side of the Tight zlib streams.
pub struct TightInflaters {
    streams: [Decompress; 4],
}

impl Default for TightInflaters {
    fn default() -> Self {
        TightInflaters {
            streams: std::array::from_fn(|_| Decompress::new(true)),
        }
    }
}

/// Decodes Tight data (native pixel format, no JPEG or gradient) of a rectangle.
pub fn decode_tight(
    r: &mut dyn Read,
    width: usize,
    height: usize,
    inflaters: &mut TightInflaters,
) -> io::Result<Vec<u32>> {
    let tpixel = |r: &mut dyn Read| -> io::Result<u32> {
        let mut b = [0u8; 3];
        r.read_exact(&mut b)?;
        Ok(u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]))
    };
    let control = read_u8(r)?;
    for (bit, stream) in inflaters.streams.iter_mut().enumerate() {
        if control & (1 << bit) != 0 {
            *stream = Decompress::new(true);
        }
    }
    let kind = control >> 4;
    if kind == 8 {
        return Ok(vec![tpixel(r)?; width * height]);
    }
    if kind > 7 {
        return Err(invalid(format!("tight: unsupported compression {kind}")));
    }
    let stream = usize::from(kind & 3);
    let filter = if kind & 4 != 0 { read_u8(r)? } else { 0 };
    let (palette, length) = match filter {
        0 => (Vec::new(), width * height * 3),
        1 => {
            let count = usize::from(read_u8(r)?) + 1;
            let palette: Vec<u32> = (0..count).map(|_| tpixel(r)).collect::<io::Result<_>>()?;
            let length = if count == 2 {
                width.div_ceil(8) * height
            } else {
                width * height
            };
            (palette, length)
        }
        other => return Err(invalid(format!("tight: unsupported filter {other}"))),
    };
    let data = if length < 12 {
        read_vec(r, length)?
    } else {
        let mut compressed_length = 0usize;
        for shift in [0, 7, 14] {
            let byte = read_u8(r)?;
            compressed_length |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let compressed = read_vec(r, compressed_length)?;
        let inflate = &mut inflaters.streams[stream];
        let mut plain = Vec::with_capacity(length + 64);
        let start = inflate.total_in();
        while ((inflate.total_in() - start) as usize) < compressed.len() {
            let consumed = (inflate.total_in() - start) as usize;
            let before = inflate.total_out();
            plain.reserve(1024);
            inflate
                .decompress_vec(&compressed[consumed..], &mut plain, FlushDecompress::Sync)
                .map_err(|e| invalid(format!("tight inflate: {e}")))?;
            if inflate.total_out() == before && (inflate.total_in() - start) as usize == consumed {
                return Err(invalid("tight inflate made no progress"));
            }
        }
        if plain.len() != length {
            return Err(invalid(format!(
                "tight: {} bytes, expected {length}",
                plain.len()
            )));
        }
        plain
    };
    let mut image = Vec::with_capacity(width * height);
    match (filter, palette.len()) {
        (0, _) => {
            for b in data.chunks_exact(3) {
                image.push(u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]));
            }
        }
        (_, 2) => {
            for row in data.chunks(width.div_ceil(8)) {
                for x in 0..width {
                    let bit = (row[x / 8] >> (7 - x % 8)) & 1;
                    image.push(palette[usize::from(bit)]);
                }
            }
        }
        _ => {
            for &entry in &data {
                image.push(
                    *palette
                        .get(usize::from(entry))
                        .ok_or_else(|| invalid("tight: index"))?,
                );
            }
        }
    }
    Ok(image)
}

/// One decoded rectangle header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateRect {
    pub x: u16,
    pub y: u16,
    pub width: u16,
    pub height: u16,
    pub encoding: i32,
}

/// A Cursor pseudo-rectangle as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedCursor {
    pub hot_x: u16,
    pub hot_y: u16,
    pub width: u16,
    pub height: u16,
    /// Pixels in the native format (4 bytes each).
    pub pixels: Vec<u8>,
    /// 1-bit mask, rows padded to bytes.
    pub mask: Vec<u8>,
}

/// What the server sent in ServerInit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInit {
    pub width: u16,
    pub height: u16,
    pub format: PixelFormat,
    pub name: String,
}

/// A scripted client.
pub struct TestClient {
    pub stream: TcpStream,
    pub init: ServerInit,
    /// The client's copy of the screen (native format), `width * height`.
    pub framebuffer: Vec<u32>,
    pub width: usize,
    pub height: usize,
    /// Last cursor received.
    pub cursor: Option<ReceivedCursor>,
    /// ExtendedDesktopSize rectangles received: (x = reason, y = status, width, height).
    pub layouts: Vec<(u16, u16, u16, u16)>,
    zrle: Decompress,
    zlib: Decompress,
    tight: TightInflaters,
}

/// Opens a TCP connection with a 5 s read timeout.
pub fn connect_raw(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

impl TestClient {
    /// Connects with RFB 3.8 and no password.
    pub fn connect(addr: SocketAddr) -> io::Result<TestClient> {
        TestClient::connect_with(addr, 8, None)
    }

    /// Connects claiming RFB 3.`minor`, answering VNC Authentication with `password`.
    pub fn connect_with(
        addr: SocketAddr,
        minor: u8,
        password: Option<&str>,
    ) -> io::Result<TestClient> {
        let mut stream = connect_raw(addr)?;
        let mut version = [0u8; 12];
        stream.read_exact(&mut version)?;
        if &version != b"RFB 003.008\n" {
            return Err(invalid("server version"));
        }
        stream.write_all(format!("RFB 003.00{minor}\n").as_bytes())?;
        let security = if minor >= 7 {
            let count = read_u8(&mut stream)?;
            if count == 0 {
                let length = read_u32(&mut stream)? as usize;
                let reason = read_vec(&mut stream, length.min(4096))?;
                return Err(invalid(String::from_utf8_lossy(&reason).to_string()));
            }
            let types = read_vec(&mut stream, count.into())?;
            let chosen = if password.is_some() { 2 } else { 1 };
            if !types.contains(&chosen) {
                return Err(invalid(format!("security types {types:?}")));
            }
            stream.write_all(&[chosen])?;
            chosen
        } else {
            read_u32(&mut stream)? as u8
        };
        if security == 2 {
            let mut challenge = [0u8; 16];
            stream.read_exact(&mut challenge)?;
            stream.write_all(&des::vnc_response(password.unwrap_or(""), &challenge))?;
        }
        if security == 2 || minor >= 8 {
            let result = read_u32(&mut stream)?;
            if result != 0 {
                let reason = if minor >= 8 {
                    let length = read_u32(&mut stream)? as usize;
                    String::from_utf8_lossy(&read_vec(&mut stream, length.min(4096))?).to_string()
                } else {
                    String::new()
                };
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("security result {result}: {reason}"),
                ));
            }
        }
        stream.write_all(&[1])?;
        let width = read_u16(&mut stream)?;
        let height = read_u16(&mut stream)?;
        let mut format = [0u8; 16];
        stream.read_exact(&mut format)?;
        let format = PixelFormat::parse(&format).map_err(|e| invalid(e.to_string()))?;
        let name_length = read_u32(&mut stream)? as usize;
        let name =
            String::from_utf8_lossy(&read_vec(&mut stream, name_length.min(4096))?).to_string();
        Ok(TestClient {
            stream,
            init: ServerInit {
                width,
                height,
                format,
                name,
            },
            framebuffer: vec![0; usize::from(width) * usize::from(height)],
            width: width.into(),
            height: height.into(),
            cursor: None,
            layouts: Vec::new(),
            zrle: Decompress::new(true),
            zlib: Decompress::new(true),
            tight: TightInflaters::default(),
        })
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn set_encodings(&mut self, encodings: &[i32]) -> io::Result<()> {
        let mut message = vec![2, 0];
        message.extend_from_slice(&(encodings.len() as u16).to_be_bytes());
        for e in encodings {
            message.extend_from_slice(&e.to_be_bytes());
        }
        self.send(&message)
    }

    pub fn set_pixel_format(&mut self, format: &PixelFormat) -> io::Result<()> {
        let mut message = vec![0, 0, 0, 0];
        message.extend_from_slice(&format.to_bytes());
        self.send(&message)
    }

    pub fn request(&mut self, incremental: bool) -> io::Result<()> {
        let (w, h) = (self.width as u16, self.height as u16);
        self.request_rect(incremental, 0, 0, w, h)
    }

    pub fn request_rect(
        &mut self,
        incremental: bool,
        x: u16,
        y: u16,
        w: u16,
        h: u16,
    ) -> io::Result<()> {
        let mut message = vec![3, u8::from(incremental)];
        for v in [x, y, w, h] {
            message.extend_from_slice(&v.to_be_bytes());
        }
        self.send(&message)
    }

    pub fn key(&mut self, keysym: u32, down: bool) -> io::Result<()> {
        let mut message = vec![4, u8::from(down), 0, 0];
        message.extend_from_slice(&keysym.to_be_bytes());
        self.send(&message)
    }

    pub fn qemu_key(&mut self, keysym: u32, scancode: u32, down: bool) -> io::Result<()> {
        let mut message = vec![255, 0];
        message.extend_from_slice(&u16::from(down).to_be_bytes());
        message.extend_from_slice(&keysym.to_be_bytes());
        message.extend_from_slice(&scancode.to_be_bytes());
        self.send(&message)
    }

    pub fn pointer(&mut self, mask: u8, x: u16, y: u16) -> io::Result<()> {
        let mut message = vec![5, mask];
        message.extend_from_slice(&x.to_be_bytes());
        message.extend_from_slice(&y.to_be_bytes());
        self.send(&message)
    }

    /// Reads one FramebufferUpdate, applies it to `framebuffer`, returns its rectangles.
    pub fn read_update(&mut self) -> io::Result<Vec<UpdateRect>> {
        let message_type = read_u8(&mut self.stream)?;
        if message_type != 0 {
            return Err(invalid(format!("unexpected server message {message_type}")));
        }
        let _pad = read_u8(&mut self.stream)?;
        let count = read_u16(&mut self.stream)?;
        let mut rects = Vec::new();
        for _ in 0..count {
            let rect = UpdateRect {
                x: read_u16(&mut self.stream)?,
                y: read_u16(&mut self.stream)?,
                width: read_u16(&mut self.stream)?,
                height: read_u16(&mut self.stream)?,
                encoding: read_u32(&mut self.stream)? as i32,
            };
            self.apply(&rect)
                .map_err(|e| io::Error::new(e.kind(), format!("{rect:?}: {e}")))?;
            rects.push(rect);
        }
        Ok(rects)
    }

    /// Reads one FramebufferUpdate of Raw rectangles in any format, returning the raw bytes.
    pub fn read_update_raw(
        &mut self,
        bytes_per_pixel: usize,
    ) -> io::Result<Vec<(UpdateRect, Vec<u8>)>> {
        let message_type = read_u8(&mut self.stream)?;
        if message_type != 0 {
            return Err(invalid(format!("unexpected server message {message_type}")));
        }
        let _pad = read_u8(&mut self.stream)?;
        let count = read_u16(&mut self.stream)?;
        let mut rects = Vec::new();
        for _ in 0..count {
            let rect = UpdateRect {
                x: read_u16(&mut self.stream)?,
                y: read_u16(&mut self.stream)?,
                width: read_u16(&mut self.stream)?,
                height: read_u16(&mut self.stream)?,
                encoding: read_u32(&mut self.stream)? as i32,
            };
            if rect.encoding != encoding::RAW {
                return Err(invalid("read_update_raw: not Raw"));
            }
            let length = usize::from(rect.width) * usize::from(rect.height) * bytes_per_pixel;
            rects.push((rect, read_vec(&mut self.stream, length)?));
        }
        Ok(rects)
    }

    fn apply(&mut self, rect: &UpdateRect) -> io::Result<()> {
        let (x, y) = (usize::from(rect.x), usize::from(rect.y));
        let (w, h) = (usize::from(rect.width), usize::from(rect.height));
        let pixels = match rect.encoding {
            encoding::RAW => {
                let data = read_vec(&mut self.stream, w * h * 4)?;
                data.chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], 0]))
                    .collect()
            }
            encoding::COPY_RECT => {
                let sx = usize::from(read_u16(&mut self.stream)?);
                let sy = usize::from(read_u16(&mut self.stream)?);
                if sx + w > self.width || sy + h > self.height {
                    return Err(invalid("copyrect source outside"));
                }
                let mut pixels = Vec::with_capacity(w * h);
                for row in sy..sy + h {
                    pixels.extend_from_slice(&self.framebuffer[row * self.width + sx..][..w]);
                }
                pixels
            }
            encoding::HEXTILE => decode_hextile(&mut self.stream, w, h)?,
            encoding::ZRLE => decode_zrle(&mut self.stream, w, h, &mut self.zrle)?,
            encoding::TIGHT => decode_tight(&mut self.stream, w, h, &mut self.tight)?,
            encoding::ZLIB => {
                let plain = inflate_block(&mut self.stream, &mut self.zlib, w * h * 4)?;
                if plain.len() != w * h * 4 {
                    return Err(invalid("zlib: wrong length"));
                }
                plain
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], 0]))
                    .collect()
            }
            encoding::PSEUDO_CURSOR => {
                let image = read_vec(&mut self.stream, w * h * 4)?;
                let mask = read_vec(&mut self.stream, w.div_ceil(8) * h)?;
                self.cursor = Some(ReceivedCursor {
                    hot_x: rect.x,
                    hot_y: rect.y,
                    width: rect.width,
                    height: rect.height,
                    pixels: image,
                    mask,
                });
                return Ok(());
            }
            encoding::PSEUDO_DESKTOP_SIZE => {
                self.resize(w, h);
                return Ok(());
            }
            encoding::PSEUDO_EXTENDED_DESKTOP_SIZE => {
                let screens = read_u8(&mut self.stream)?;
                read_vec(&mut self.stream, 3 + usize::from(screens) * 16)?;
                self.layouts.push((rect.x, rect.y, rect.width, rect.height));
                if rect.y == 0 {
                    self.resize(w, h);
                }
                return Ok(());
            }
            other => return Err(invalid(format!("unknown encoding {other}"))),
        };
        if x + w > self.width || y + h > self.height {
            return Err(invalid(format!(
                "rectangle {rect:?} outside {}x{}",
                self.width, self.height
            )));
        }
        for row in 0..h {
            let at = (y + row) * self.width + x;
            self.framebuffer[at..at + w].copy_from_slice(&pixels[row * w..(row + 1) * w]);
        }
        Ok(())
    }

    fn resize(&mut self, width: usize, height: usize) {
        self.width = width;
        self.height = height;
        self.framebuffer = vec![0; width * height];
    }
}
