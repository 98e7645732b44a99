//! The BitBLT engine of the Cirrus Logic CL-GD5446 (graphics registers GR20..GR3F and their
//! memory-mapped aliases), used by [`crate::cirrus`].
//!
//! Emulated: screen-to-screen copies forward and backward (GR30 bit 0) with byte-serial
//! overlap semantics, the 16 raster operations the 5446 encodes in GR32 (any other code
//! is a no-op, as on QEMU), 8/16/24/32 bits per pixel (GR30 bits 5:4), colour expansion of a
//! monochrome source to the foreground / background colours (GR30 bit 7) with optional
//! transparency and inversion (GR30 bit 3, GR33 bit 1), 8x8 pattern fills in colour and
//! monochrome (GR30 bit 6, vertical preset from source address bits 2:0, left skip from
//! GR2F), source transparency against the key in GR34/GR35 for 8 and 16 bpp copies, solid
//! fill with the foreground colour (GR33 bit 2), and system-to-video blits (GR30 bit 2)
//! whose source the CPU streams in: one line of `width` bytes padded to 32 bits, or of one
//! bit per pixel padded to a byte (a dword with GR33 bit 0) for colour expansion, or one
//! 8x8 pattern.
//!
//! Safety: every blit is validated once as a whole before it touches memory: the
//! destination (and a video-memory source) must lie entirely inside VRAM for the whole
//! footprint `pitch * (height - 1) + width`, counted downwards from the address for
//! backward blits; zero pitches are refused (as QEMU's fixed code does for CVE-2014-8106,
//! CVE-2016-9922, CVE-2017-2615, CVE-2017-2620, CVE-2017-7718 and CVE-2017-7980). A
//! refused blit changes no byte and just finishes. All memory access goes through the
//! clipping accessors of [`Vram`] as a second line of defence.
//!
//! Not emulated: video-to-system blits (GR30 bit 1, ignored like QEMU), the destination
//! write mask (GR2F bits 7:5), the transparent colour mask (GR38/GR39), the line-draw
//! engine of later chips, backward system-to-video blits (the direction bit is ignored for
//! a CPU source) and blit timing (every blit completes instantly).

use serde::{Deserialize, Serialize};

use crate::vram::Vram;

/// Widest blit line the engine accepts, in bytes (QEMU's `CIRRUS_BLTBUFSIZE`).
pub const MAX_BLIT_WIDTH: usize = 8192;

/// GR30 (BLT mode) bits.
pub const MODE_BACKWARDS: u8 = 0x01;
pub const MODE_MEMSYS_DEST: u8 = 0x02;
pub const MODE_MEMSYS_SRC: u8 = 0x04;
pub const MODE_TRANSPARENT: u8 = 0x08;
pub const MODE_PIXEL_WIDTH_MASK: u8 = 0x30;
pub const MODE_PATTERN: u8 = 0x40;
pub const MODE_COLOR_EXPAND: u8 = 0x80;

/// GR31 (BLT start / status) bits.
pub const STATUS_BUSY: u8 = 0x01;
pub const STATUS_START: u8 = 0x02;
pub const STATUS_RESET: u8 = 0x04;
pub const STATUS_FIFO_USED: u8 = 0x10;
pub const STATUS_AUTOSTART: u8 = 0x80;

/// GR33 (BLT mode extensions) bits.
pub const MODEEXT_DWORD_GRANULARITY: u8 = 0x01;
pub const MODEEXT_EXPAND_INVERT: u8 = 0x02;
pub const MODEEXT_SOLID_FILL: u8 = 0x04;

/// A raster operation as GR32 encodes it on the 5446.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rop {
    Zero,
    SrcAndDst,
    Nop,
    SrcAndNotDst,
    NotDst,
    Src,
    One,
    NotSrcAndDst,
    SrcXorDst,
    SrcOrDst,
    NotSrcOrNotDst,
    SrcNotXorDst,
    SrcOrNotDst,
    NotSrc,
    NotSrcOrDst,
    NotSrcAndNotDst,
}

impl Rop {
    /// Every operation, in GR32 code order of QEMU's table.
    pub const ALL: [Rop; 16] = [
        Rop::Zero,
        Rop::SrcAndDst,
        Rop::Nop,
        Rop::SrcAndNotDst,
        Rop::NotDst,
        Rop::Src,
        Rop::One,
        Rop::NotSrcAndDst,
        Rop::SrcXorDst,
        Rop::SrcOrDst,
        Rop::NotSrcOrNotDst,
        Rop::SrcNotXorDst,
        Rop::SrcOrNotDst,
        Rop::NotSrc,
        Rop::NotSrcOrDst,
        Rop::NotSrcAndNotDst,
    ];

    /// Decodes GR32; codes the 5446 does not define do nothing.
    pub fn from_code(code: u8) -> Rop {
        match code {
            0x00 => Rop::Zero,
            0x05 => Rop::SrcAndDst,
            0x06 => Rop::Nop,
            0x09 => Rop::SrcAndNotDst,
            0x0b => Rop::NotDst,
            0x0d => Rop::Src,
            0x0e => Rop::One,
            0x50 => Rop::NotSrcAndDst,
            0x59 => Rop::SrcXorDst,
            0x6d => Rop::SrcOrDst,
            0x90 => Rop::NotSrcOrNotDst,
            0x95 => Rop::SrcNotXorDst,
            0xad => Rop::SrcOrNotDst,
            0xd0 => Rop::NotSrc,
            0xd6 => Rop::NotSrcOrDst,
            0xda => Rop::NotSrcAndNotDst,
            _ => Rop::Nop,
        }
    }

    /// The GR32 code of the operation.
    pub fn code(self) -> u8 {
        match self {
            Rop::Zero => 0x00,
            Rop::SrcAndDst => 0x05,
            Rop::Nop => 0x06,
            Rop::SrcAndNotDst => 0x09,
            Rop::NotDst => 0x0b,
            Rop::Src => 0x0d,
            Rop::One => 0x0e,
            Rop::NotSrcAndDst => 0x50,
            Rop::SrcXorDst => 0x59,
            Rop::SrcOrDst => 0x6d,
            Rop::NotSrcOrNotDst => 0x90,
            Rop::SrcNotXorDst => 0x95,
            Rop::SrcOrNotDst => 0xad,
            Rop::NotSrc => 0xd0,
            Rop::NotSrcOrDst => 0xd6,
            Rop::NotSrcAndNotDst => 0xda,
        }
    }

    /// The new destination byte.
    pub fn apply(self, dst: u8, src: u8) -> u8 {
        match self {
            Rop::Zero => 0,
            Rop::SrcAndDst => src & dst,
            Rop::Nop => dst,
            Rop::SrcAndNotDst => src & !dst,
            Rop::NotDst => !dst,
            Rop::Src => src,
            Rop::One => 0xff,
            Rop::NotSrcAndDst => !src & dst,
            Rop::SrcXorDst => src ^ dst,
            Rop::SrcOrDst => src | dst,
            Rop::NotSrcOrNotDst => !src | !dst,
            Rop::SrcNotXorDst => !(src ^ dst),
            Rop::SrcOrNotDst => src | !dst,
            Rop::NotSrc => !src,
            Rop::NotSrcOrDst => !src | dst,
            Rop::NotSrcAndNotDst => !src & !dst,
        }
    }
}

/// The blitter registers as the guest programmed them (the card gathers them from GR00..
/// GR3F when a blit starts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlitRegisters {
    /// GR20/GR21: width in bytes minus one (13 bits).
    pub width_minus_one: u16,
    /// GR22/GR23: height in lines minus one (13 bits).
    pub height_minus_one: u16,
    /// GR24/GR25: destination pitch in bytes.
    pub dst_pitch: u16,
    /// GR26/GR27: source pitch in bytes.
    pub src_pitch: u16,
    /// GR28..GR2A: destination address.
    pub dst_addr: u32,
    /// GR2C..GR2E: source address.
    pub src_addr: u32,
    /// GR2F: left skip (bits 2:0, bits 4:0 at 24 bpp).
    pub skip: u8,
    /// GR30: mode.
    pub mode: u8,
    /// GR32: raster operation.
    pub rop: u8,
    /// GR33: mode extensions.
    pub mode_ext: u8,
    /// Foreground colour bytes: GR01 (full byte), GR11, GR13, GR15.
    pub fg: [u8; 4],
    /// Background colour bytes: GR00 (full byte), GR10, GR12, GR14.
    pub bg: [u8; 4],
    /// GR34/GR35: transparency key.
    pub transparent_key: u16,
}

/// Why a blit was not run (it finishes without touching memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlitRejected {
    #[error("video-to-system blits are not supported")]
    VideoToSystem,
    #[error("source and destination both in system memory")]
    SystemToSystem,
    #[error("source transparency needs 8 or 16 bits per pixel")]
    TransparencyDepth,
    #[error("the destination does not lie inside video memory")]
    DestinationOutside,
    #[error("the source does not lie inside video memory")]
    SourceOutside,
}

/// What starting a blit did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlitStart {
    /// Refused; no byte changed, the engine is idle.
    Rejected(BlitRejected),
    /// Ran to completion.
    Completed(Option<VideoCopy>),
    /// Waits for the CPU to write the source ([`Blitter::write_source`]).
    WaitingForSource,
}

/// A plain screen-to-screen copy (ROP "source", no transparency) that just completed, in
/// byte addresses of the top-left corners; the card turns it into a `CopyRect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VideoCopy {
    pub src_top_left: usize,
    pub dst_top_left: usize,
    pub src_pitch: usize,
    pub dst_pitch: usize,
    pub width_bytes: usize,
    pub height: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    /// Every destination byte combined with the foreground colour.
    Fill,
    /// A byte source (video memory or the CPU), optionally with the GR34/35 key.
    Copy { transparent: bool },
    /// A bit-per-pixel source expanded to the foreground / background colours.
    Expand { transparent: bool, invert: bool },
    /// An 8x8 colour pattern.
    Pattern,
    /// An 8x8 monochrome pattern expanded to the colours.
    PatternExpand { transparent: bool, invert: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// No source (fills).
    None,
    /// Video memory at `addr` (lowest address of the first line read), `pitch` apart.
    Video { addr: usize, pitch: usize },
    /// A pattern in video memory at the aligned address.
    VideoPattern { addr: usize },
    /// The CPU writes `bytes` per line (or the whole pattern).
    System { bytes: usize },
}

/// A validated blit.
#[derive(Clone, Debug)]
struct Plan {
    width: usize,
    height: usize,
    bytes_per_pixel: usize,
    /// Address of the first line as programmed (its last byte when backward).
    dst: usize,
    dst_pitch: usize,
    /// Only plain video copies run backward.
    backward: bool,
    source: Source,
    op: Operation,
    rop: Rop,
    fg: u32,
    bg: u32,
    /// Bytes skipped at the left of each destination line.
    dst_skip: usize,
    /// Pixels (bits, pattern columns) skipped at the left of each source line.
    src_skip: usize,
    /// First pattern row (source address bits 2:0).
    pattern_row: usize,
    key: u16,
}

/// Bytes of one 8x8 colour pattern row, as the 5446 lays patterns out.
fn pattern_row_pitch(bytes_per_pixel: usize) -> usize {
    match bytes_per_pixel {
        1 => 8,
        2 => 16,
        _ => 32,
    }
}

/// Whether `height` lines of `width` bytes `pitch` apart from `addr` (downwards when
/// `backward`, `addr` then being the last byte of the first line) lie inside `len` bytes.
fn region_inside(
    addr: usize,
    pitch: usize,
    backward: bool,
    width: usize,
    height: usize,
    len: usize,
) -> bool {
    if pitch == 0 || width == 0 || height == 0 {
        return false;
    }
    let Some(span) = pitch
        .checked_mul(height - 1)
        .and_then(|s| s.checked_add(width))
    else {
        return false;
    };
    if backward {
        addr < len && addr + 1 >= span
    } else {
        addr.checked_add(span).is_some_and(|end| end <= len)
    }
}

fn color_of(bytes: [u8; 4], bytes_per_pixel: usize) -> u32 {
    let full = u32::from_le_bytes(bytes);
    match bytes_per_pixel {
        1 => full & 0xff,
        2 => full & 0xffff,
        3 => full & 0xff_ffff,
        _ => full,
    }
}

impl Plan {
    fn new(regs: &BlitRegisters, vram_len: usize) -> Result<Plan, BlitRejected> {
        let width = usize::from(regs.width_minus_one & 0x1fff) + 1;
        let height = usize::from(regs.height_minus_one & 0x1fff) + 1;
        let dst_pitch = usize::from(regs.dst_pitch & 0x1fff);
        let src_pitch = usize::from(regs.src_pitch & 0x1fff);
        let dst = regs.dst_addr as usize & 0x3f_ffff;
        let src_addr = regs.src_addr as usize & 0x3f_ffff;
        let bytes_per_pixel = usize::from((regs.mode & MODE_PIXEL_WIDTH_MASK) >> 4) + 1;
        let from_system = regs.mode & MODE_MEMSYS_SRC != 0;
        let to_system = regs.mode & MODE_MEMSYS_DEST != 0;
        if from_system && to_system {
            return Err(BlitRejected::SystemToSystem);
        }
        let fg = color_of(regs.fg, bytes_per_pixel);
        let bg = color_of(regs.bg, bytes_per_pixel);
        let invert = regs.mode_ext & MODEEXT_EXPAND_INVERT != 0;
        let transparent = regs.mode & MODE_TRANSPARENT != 0;
        let expand = regs.mode & MODE_COLOR_EXPAND != 0;
        let pattern = regs.mode & MODE_PATTERN != 0;
        let solid = regs.mode_ext & MODEEXT_SOLID_FILL != 0
            && regs.mode & (MODE_MEMSYS_DEST | MODE_TRANSPARENT | MODE_PATTERN | MODE_COLOR_EXPAND)
                == (MODE_PATTERN | MODE_COLOR_EXPAND);
        let (dst_skip, src_skip) = if bytes_per_pixel == 3 {
            let d = usize::from(regs.skip & 0x1f);
            (d, d / 3)
        } else {
            let s = usize::from(regs.skip & 0x07);
            (s * bytes_per_pixel, s)
        };
        let op = if solid {
            Operation::Fill
        } else if pattern && expand {
            Operation::PatternExpand {
                transparent,
                invert,
            }
        } else if pattern {
            Operation::Pattern
        } else if expand {
            Operation::Expand {
                transparent,
                invert,
            }
        } else {
            if transparent && bytes_per_pixel > 2 {
                return Err(BlitRejected::TransparencyDepth);
            }
            Operation::Copy { transparent }
        };
        if to_system && op != Operation::Fill {
            return Err(BlitRejected::VideoToSystem);
        }
        let backward =
            matches!(op, Operation::Copy { .. }) && !from_system && regs.mode & MODE_BACKWARDS != 0;
        if !region_inside(dst, dst_pitch, backward, width, height, vram_len) {
            return Err(BlitRejected::DestinationOutside);
        }
        let pixels_per_line = width.saturating_sub(dst_skip).div_ceil(bytes_per_pixel);
        let source = match op {
            Operation::Fill => Source::None,
            Operation::Pattern | Operation::PatternExpand { .. } => {
                let size = if matches!(op, Operation::Pattern) {
                    8 * pattern_row_pitch(bytes_per_pixel)
                } else {
                    8
                };
                if from_system {
                    // QEMU's count: 8 bytes mono, 64 pixels in colour.
                    let bytes = if matches!(op, Operation::Pattern) {
                        64 * bytes_per_pixel
                    } else {
                        8
                    };
                    Source::System { bytes }
                } else {
                    let addr = src_addr & !(size - 1);
                    if addr + size > vram_len {
                        return Err(BlitRejected::SourceOutside);
                    }
                    Source::VideoPattern { addr }
                }
            }
            Operation::Expand { .. } => {
                if from_system {
                    let pixels = width / bytes_per_pixel;
                    let bytes = if regs.mode_ext & MODEEXT_DWORD_GRANULARITY != 0 {
                        pixels.div_ceil(32) * 4
                    } else {
                        pixels.div_ceil(8)
                    };
                    Source::System {
                        bytes: bytes.max(1),
                    }
                } else {
                    // Video-memory source: packed lines, no pitch.
                    let line = (src_skip + pixels_per_line).div_ceil(8).max(1);
                    if !region_inside(src_addr, line, false, line, height, vram_len) {
                        return Err(BlitRejected::SourceOutside);
                    }
                    Source::Video {
                        addr: src_addr,
                        pitch: line,
                    }
                }
            }
            Operation::Copy { .. } => {
                if from_system {
                    Source::System {
                        bytes: (width + 3) & !3,
                    }
                } else {
                    if !region_inside(src_addr, src_pitch, backward, width, height, vram_len) {
                        return Err(BlitRejected::SourceOutside);
                    }
                    Source::Video {
                        addr: src_addr,
                        pitch: src_pitch,
                    }
                }
            }
        };
        Ok(Plan {
            width,
            height,
            bytes_per_pixel,
            dst,
            dst_pitch,
            backward,
            source,
            op,
            rop: Rop::from_code(regs.rop),
            fg,
            bg,
            dst_skip,
            src_skip,
            pattern_row: src_addr & 7,
            key: regs.transparent_key,
        })
    }

    /// Lowest address of destination line `y`.
    fn dst_line(&self, y: usize) -> usize {
        if self.backward {
            self.dst - y * self.dst_pitch - (self.width - 1)
        } else {
            self.dst + y * self.dst_pitch
        }
    }

    /// Lowest address of video source line `y` of a copy.
    fn src_line(&self, addr: usize, pitch: usize, y: usize) -> usize {
        if self.backward {
            addr - y * pitch - (self.width - 1)
        } else {
            addr + y * pitch
        }
    }

    fn color_byte(color: u32, byte: usize) -> u8 {
        (color >> (8 * (byte & 3))) as u8
    }

    /// Writes pixel colour `color` at byte `x` of `line` (clipped to the line).
    fn put_pixel(&self, line: &mut [u8], x: usize, color: u32) {
        for b in 0..self.bytes_per_pixel {
            if let Some(d) = line.get_mut(x + b) {
                *d = self.rop.apply(*d, Self::color_byte(color, b));
            }
        }
    }

    /// Runs one destination line whose source bytes are `src` (a line of a copy, the packed
    /// bits of an expansion, or the whole pattern).
    fn run_line(&self, vram: &mut Vram, y: usize, src: &[u8]) {
        let at = self.dst_line(y);
        let mut line = vec![0u8; self.width];
        vram.read(at, &mut line);
        let bpp = self.bytes_per_pixel;
        match self.op {
            Operation::Fill => {
                let mut x = 0;
                while x < self.width {
                    self.put_pixel(&mut line, x, self.fg);
                    x += bpp;
                }
            }
            Operation::Copy { transparent } => {
                let original = line.clone();
                for (d, s) in line.iter_mut().zip(src) {
                    *d = self.rop.apply(*d, *s);
                }
                if transparent {
                    self.restore_transparent(&mut line, &original);
                }
            }
            Operation::Expand {
                transparent,
                invert,
            } => {
                let mut x = self.dst_skip;
                let mut bit = self.src_skip;
                while x < self.width {
                    let byte = src.get(bit / 8).copied().unwrap_or(0);
                    let set = byte & (0x80 >> (bit % 8)) != 0;
                    self.expand_pixel(&mut line, x, set, transparent, invert);
                    x += bpp;
                    bit += 1;
                }
            }
            Operation::Pattern => {
                let row = (self.pattern_row + y) & 7;
                let pitch = pattern_row_pitch(bpp);
                let mut x = self.dst_skip;
                let mut column = self.src_skip;
                while x < self.width {
                    let at = row * pitch + (column & 7) * bpp;
                    let mut bytes = [0u8; 4];
                    for (b, v) in bytes.iter_mut().enumerate().take(bpp) {
                        *v = src.get(at + b).copied().unwrap_or(0);
                    }
                    self.put_pixel(&mut line, x, u32::from_le_bytes(bytes));
                    x += bpp;
                    column += 1;
                }
            }
            Operation::PatternExpand {
                transparent,
                invert,
            } => {
                let bits = src.get((self.pattern_row + y) & 7).copied().unwrap_or(0);
                let mut x = self.dst_skip;
                let mut column = self.src_skip;
                while x < self.width {
                    let set = bits & (0x80 >> (column & 7)) != 0;
                    self.expand_pixel(&mut line, x, set, transparent, invert);
                    x += bpp;
                    column += 1;
                }
            }
        }
        vram.write(at, &line);
    }

    fn expand_pixel(&self, line: &mut [u8], x: usize, set: bool, transparent: bool, invert: bool) {
        if transparent {
            if set != invert {
                let color = if invert { self.bg } else { self.fg };
                self.put_pixel(line, x, color);
            }
        } else {
            self.put_pixel(line, x, if set { self.fg } else { self.bg });
        }
    }

    /// Source transparency: pixels whose result equals the GR34/35 key keep their old
    /// value. Pixels are counted from the line's start in the direction of the blit.
    fn restore_transparent(&self, line: &mut [u8], original: &[u8]) {
        let key = self.key.to_le_bytes();
        if self.bytes_per_pixel == 1 {
            for (d, o) in line.iter_mut().zip(original) {
                if *d == key[0] {
                    *d = *o;
                }
            }
            return;
        }
        let width = line.len();
        let mut k = 0;
        while k + 1 < width {
            let (lo, hi) = if self.backward {
                (width - 2 - k, width - 1 - k)
            } else {
                (k, k + 1)
            };
            if line[lo] == key[0] && line[hi] == key[1] {
                line[lo] = original[lo];
                line[hi] = original[hi];
            }
            k += 2;
        }
    }

    /// A copy whose source line overlaps its destination line on the side the engine reads
    /// after writing: byte-serial, as the hardware (and QEMU) does it.
    fn run_line_serial(&self, vram: &mut Vram, y: usize, src_at: usize) {
        let dst_at = self.dst_line(y);
        let transparent = matches!(self.op, Operation::Copy { transparent: true });
        let group = if transparent { self.bytes_per_pixel } else { 1 };
        let key = self.key.to_le_bytes();
        let count = self.width / group;
        for n in 0..count {
            let offset = if self.backward {
                self.width - group * (n + 1)
            } else {
                group * n
            };
            let mut result = [0u8; 2];
            for (b, r) in result.iter_mut().enumerate().take(group) {
                let d = vram.read_u8(dst_at + offset + b);
                let s = vram.read_u8(src_at + offset + b);
                *r = self.rop.apply(d, s);
            }
            if transparent && result[..group] == key[..group] {
                continue;
            }
            vram.write(dst_at + offset, &result[..group]);
        }
        // An odd trailing byte of a 16 bpp transparent line is never written (as QEMU).
    }

    fn run_video(&self, vram: &mut Vram) {
        match self.source {
            Source::None => {
                for y in 0..self.height {
                    self.run_line(vram, y, &[]);
                }
            }
            Source::VideoPattern { addr } => {
                let size = if matches!(self.op, Operation::Pattern) {
                    8 * pattern_row_pitch(self.bytes_per_pixel)
                } else {
                    8
                };
                let mut pattern = vec![0u8; size];
                vram.read(addr, &mut pattern);
                for y in 0..self.height {
                    self.run_line(vram, y, &pattern);
                }
            }
            Source::Video { addr, pitch } => {
                let is_copy = matches!(self.op, Operation::Copy { .. });
                let mut src = vec![0u8; if is_copy { self.width } else { pitch }];
                for y in 0..self.height {
                    let src_at = if is_copy {
                        self.src_line(addr, pitch, y)
                    } else {
                        addr + y * pitch
                    };
                    let dst_at = self.dst_line(y);
                    let overlaps =
                        is_copy && src_at < dst_at + self.width && dst_at < src_at + self.width;
                    let reads_written = if self.backward {
                        dst_at < src_at
                    } else {
                        dst_at > src_at
                    };
                    if overlaps && reads_written {
                        self.run_line_serial(vram, y, src_at);
                    } else {
                        vram.read(src_at, &mut src);
                        self.run_line(vram, y, &src);
                    }
                }
            }
            Source::System { .. } => {}
        }
    }

    fn plain_copy(&self) -> Option<VideoCopy> {
        match (self.op, self.source, self.rop) {
            (Operation::Copy { transparent: false }, Source::Video { addr, pitch }, Rop::Src) => {
                Some(VideoCopy {
                    src_top_left: self
                        .src_line(addr, pitch, self.height - 1)
                        .min(self.src_line(addr, pitch, 0)),
                    dst_top_left: self.dst_line(self.height - 1).min(self.dst_line(0)),
                    src_pitch: pitch,
                    dst_pitch: self.dst_pitch,
                    width_bytes: self.width,
                    height: self.height,
                })
            }
            _ => None,
        }
    }
}

/// A system-to-video blit collecting its source from the CPU.
#[derive(Clone, Debug)]
struct Pending {
    plan: Plan,
    /// Bytes per source line (or per pattern).
    bytes: usize,
    buffer: Vec<u8>,
    line: usize,
}

/// The blit engine: runs video-memory blits at once and system-to-video blits as the CPU
/// supplies the source.
#[derive(Clone, Debug, Default)]
pub struct Blitter {
    pending: Option<Pending>,
}

impl Blitter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates and starts the blit `regs` describes.
    pub fn start(&mut self, regs: &BlitRegisters, vram: &mut Vram) -> BlitStart {
        self.pending = None;
        let plan = match Plan::new(regs, vram.len()) {
            Ok(plan) => plan,
            Err(reason) => {
                log::debug!("cirrus: blit refused: {reason} ({regs:x?})");
                return BlitStart::Rejected(reason);
            }
        };
        if let Source::System { bytes } = plan.source {
            self.pending = Some(Pending {
                plan,
                bytes,
                buffer: Vec::with_capacity(bytes),
                line: 0,
            });
            return BlitStart::WaitingForSource;
        }
        plan.run_video(vram);
        BlitStart::Completed(plan.plain_copy())
    }

    /// A system-to-video blit is waiting for source bytes.
    pub fn is_waiting_for_source(&self) -> bool {
        self.pending.is_some()
    }

    /// The CPU writes source bytes; returns true when this completed the blit.
    pub fn write_source(&mut self, vram: &mut Vram, data: &[u8]) -> bool {
        for &byte in data {
            let Some(pending) = self.pending.as_mut() else {
                return false;
            };
            pending.buffer.push(byte);
            if pending.buffer.len() < pending.bytes {
                continue;
            }
            let plan = &pending.plan;
            let pattern = matches!(
                plan.op,
                Operation::Pattern | Operation::PatternExpand { .. }
            );
            if pattern {
                let mut full = pending.buffer.clone();
                full.resize(8 * pattern_row_pitch(plan.bytes_per_pixel), 0);
                for y in 0..plan.height {
                    plan.run_line(vram, y, &full);
                }
                self.pending = None;
                return true;
            }
            plan.run_line(vram, pending.line, &pending.buffer);
            pending.line += 1;
            pending.buffer.clear();
            if pending.line >= plan.height {
                self.pending = None;
                return true;
            }
        }
        false
    }

    /// Abandons a blit in progress (GR31 reset bit, machine reset).
    pub fn reset(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TestRng;

    const VRAM: usize = 64 * 1024;

    fn vram_with_pattern() -> Vram {
        let mut v = Vram::new(VRAM).unwrap();
        let bytes: Vec<u8> = (0..VRAM).map(|i| (i * 7 + i / 251) as u8).collect();
        v.write(0, &bytes);
        v.take_dirty();
        v
    }

    fn snapshot(v: &Vram) -> Vec<u8> {
        let mut b = vec![0; v.len()];
        v.read(0, &mut b);
        b
    }

    fn regs(width: usize, height: usize, dst: usize, dst_pitch: usize) -> BlitRegisters {
        BlitRegisters {
            width_minus_one: (width - 1) as u16,
            height_minus_one: (height - 1) as u16,
            dst_pitch: dst_pitch as u16,
            src_pitch: dst_pitch as u16,
            dst_addr: dst as u32,
            rop: Rop::Src.code(),
            ..Default::default()
        }
    }

    /// Asserts that only bytes inside the rectangle(s) of `allowed` changed.
    fn assert_unchanged_outside(before: &[u8], after: &[u8], allowed: impl Fn(usize) -> bool) {
        for (i, (a, b)) in before.iter().zip(after).enumerate() {
            if !allowed(i) {
                assert_eq!(a, b, "byte {i:#x} outside the destination changed");
            }
        }
    }

    /// Whether byte `i` lies in one of `height` lines of `width` bytes `pitch` apart (lines
    /// may overlap when the pitch is smaller than the width).
    fn in_rect(i: usize, top_left: usize, pitch: usize, width: usize, height: usize) -> bool {
        let Some(offset) = i.checked_sub(top_left) else {
            return false;
        };
        let mut line = (offset / pitch).min(height - 1);
        loop {
            if offset - line * pitch < width {
                return true;
            }
            if line == 0 || offset - line * pitch >= width + pitch {
                return false;
            }
            line -= 1;
        }
    }

    #[test]
    fn rop_codes_round_trip_and_unknown_codes_do_nothing() {
        for rop in Rop::ALL {
            assert_eq!(Rop::from_code(rop.code()), rop);
        }
        assert_eq!(Rop::from_code(0x42), Rop::Nop);
        assert_eq!(Rop::from_code(0x42).apply(0x12, 0x34), 0x12);
    }

    /// The reference formula: the 5446 codes are the ROP3 bits of the equivalent
    /// source/destination function, whose value for (s, d) bits is bit (s*2+d)... we check
    /// against a truth table written out independently.
    fn reference(rop: Rop, d: u8, s: u8) -> u8 {
        let table: fn(bool, bool) -> bool = match rop {
            Rop::Zero => |_, _| false,
            Rop::SrcAndDst => |s, d| s && d,
            Rop::Nop => |_, d| d,
            Rop::SrcAndNotDst => |s, d| s && !d,
            Rop::NotDst => |_, d| !d,
            Rop::Src => |s, _| s,
            Rop::One => |_, _| true,
            Rop::NotSrcAndDst => |s, d| !s && d,
            Rop::SrcXorDst => |s, d| s != d,
            Rop::SrcOrDst => |s, d| s || d,
            Rop::NotSrcOrNotDst => |s, d| !s || !d,
            Rop::SrcNotXorDst => |s, d| s == d,
            Rop::SrcOrNotDst => |s, d| s || !d,
            Rop::NotSrc => |s, _| !s,
            Rop::NotSrcOrDst => |s, d| !s || d,
            Rop::NotSrcAndNotDst => |s, d| !s && !d,
        };
        (0..8).fold(0u8, |acc, bit| {
            let sb = s & (1 << bit) != 0;
            let db = d & (1 << bit) != 0;
            acc | (u8::from(table(sb, db)) << bit)
        })
    }

    #[test]
    fn all_sixteen_rops_on_a_screen_copy_match_the_reference() {
        for rop in Rop::ALL {
            let mut v = vram_with_pattern();
            let before = snapshot(&v);
            let mut r = regs(24, 5, 0x4000, 100);
            r.src_addr = 0x100;
            r.src_pitch = 64;
            r.rop = rop.code();
            let mut b = Blitter::new();
            let copy = b.start(&r, &mut v);
            let after = snapshot(&v);
            for y in 0..5 {
                for x in 0..24 {
                    let d = 0x4000 + y * 100 + x;
                    let s = 0x100 + y * 64 + x;
                    assert_eq!(
                        after[d],
                        reference(rop, before[d], before[s]),
                        "{rop:?} at {x},{y}"
                    );
                }
            }
            assert_unchanged_outside(&before, &after, |i| in_rect(i, 0x4000, 100, 24, 5));
            let expect_copy = rop == Rop::Src;
            assert_eq!(
                matches!(copy, BlitStart::Completed(Some(_))),
                expect_copy,
                "{rop:?}"
            );
        }
    }

    #[test]
    fn every_rop_applies_to_fills_expansion_and_patterns_per_byte() {
        for rop in Rop::ALL {
            // Solid fill at 16 bpp.
            let mut v = vram_with_pattern();
            let before = snapshot(&v);
            let mut r = regs(8, 3, 0x2000, 32);
            r.mode = MODE_PATTERN | MODE_COLOR_EXPAND | 0x10;
            r.mode_ext = MODEEXT_SOLID_FILL;
            r.rop = rop.code();
            r.fg = [0x5a, 0xc3, 0, 0];
            Blitter::new().start(&r, &mut v);
            let after = snapshot(&v);
            for y in 0..3 {
                for x in 0..8 {
                    let at = 0x2000 + y * 32 + x;
                    let s = if x % 2 == 0 { 0x5a } else { 0xc3 };
                    assert_eq!(after[at], reference(rop, before[at], s), "{rop:?}");
                }
            }
            assert_unchanged_outside(&before, &after, |i| in_rect(i, 0x2000, 32, 8, 3));
        }
    }

    #[test]
    fn solid_fill_at_every_depth() {
        for bpp in 1..=4usize {
            let mut v = vram_with_pattern();
            let before = snapshot(&v);
            let mut r = regs(12 * bpp, 4, 0x1000, 256);
            r.mode = MODE_PATTERN | MODE_COLOR_EXPAND | (((bpp - 1) as u8) << 4);
            r.mode_ext = MODEEXT_SOLID_FILL;
            r.fg = [0x11, 0x22, 0x33, 0x44];
            assert!(matches!(
                Blitter::new().start(&r, &mut v),
                BlitStart::Completed(None)
            ));
            let after = snapshot(&v);
            for y in 0..4 {
                for x in 0..12 * bpp {
                    assert_eq!(after[0x1000 + y * 256 + x], r.fg[x % bpp], "bpp {bpp}");
                }
            }
            assert_unchanged_outside(&before, &after, |i| in_rect(i, 0x1000, 256, 12 * bpp, 4));
        }
    }

    #[test]
    fn colour_expansion_from_video_memory_at_every_depth() {
        for bpp in 1..=4usize {
            for transparent in [false, true] {
                for invert in [false, true] {
                    let mut v = vram_with_pattern();
                    // 10 pixels per line, packed 2 bytes per line.
                    let bits: [u8; 6] = [0b1010_0110, 0b1100_0000, 0xf0, 0x00, 0x81, 0x40];
                    v.write(0x8000, &bits);
                    let before = snapshot(&v);
                    let mut r = regs(10 * bpp, 3, 0x100, 128);
                    r.src_addr = 0x8000;
                    r.mode = MODE_COLOR_EXPAND
                        | (((bpp - 1) as u8) << 4)
                        | if transparent { MODE_TRANSPARENT } else { 0 };
                    r.mode_ext = if invert { MODEEXT_EXPAND_INVERT } else { 0 };
                    r.fg = [0xf1, 0xf2, 0xf3, 0xf4];
                    r.bg = [0xb1, 0xb2, 0xb3, 0xb4];
                    Blitter::new().start(&r, &mut v);
                    let after = snapshot(&v);
                    for y in 0..3 {
                        for px in 0..10 {
                            let set = bits[y * 2 + px / 8] & (0x80 >> (px % 8)) != 0;
                            for b in 0..bpp {
                                let at = 0x100 + y * 128 + px * bpp + b;
                                let expect = match (transparent, invert, set) {
                                    (false, _, true) => r.fg[b],
                                    (false, _, false) => r.bg[b],
                                    (true, false, true) => r.fg[b],
                                    (true, true, false) => r.bg[b],
                                    (true, _, _) => before[at],
                                };
                                assert_eq!(
                                    after[at], expect,
                                    "bpp {bpp} t {transparent} i {invert} px {px} y {y}"
                                );
                            }
                        }
                    }
                    assert_unchanged_outside(&before, &after, |i| {
                        in_rect(i, 0x100, 128, 10 * bpp, 3)
                    });
                }
            }
        }
    }

    #[test]
    fn colour_and_mono_pattern_fills_with_vertical_preset_and_skip() {
        for bpp in 1..=4usize {
            let mut v = vram_with_pattern();
            let pitch = pattern_row_pitch(bpp);
            let base = 0x8000;
            let before = snapshot(&v);
            // Colour pattern: 8 rows at `pitch` bytes, vertical preset 3.
            let mut r = regs(16 * bpp, 10, 0x200, 512);
            r.src_addr = (base + 3) as u32;
            r.mode = MODE_PATTERN | (((bpp - 1) as u8) << 4);
            Blitter::new().start(&r, &mut v);
            let after = snapshot(&v);
            for y in 0..10 {
                for px in 0..16 {
                    for b in 0..bpp {
                        let row = (y + 3) & 7;
                        let expect = before[base + row * pitch + (px & 7) * bpp + b];
                        assert_eq!(after[0x200 + y * 512 + px * bpp + b], expect, "bpp {bpp}");
                    }
                }
            }
            assert_unchanged_outside(&before, &after, |i| in_rect(i, 0x200, 512, 16 * bpp, 10));
        }
        // Monochrome pattern at 8 bpp with a left skip of 2 pixels, opaque.
        let mut v = vram_with_pattern();
        let pattern = [0x80u8, 0x40, 0x20, 0x10, 0x08, 0x04, 0x02, 0x01];
        v.write(0x9000, &pattern);
        let before = snapshot(&v);
        let mut r = regs(16, 8, 0x300, 64);
        r.src_addr = 0x9000;
        r.skip = 2;
        r.mode = MODE_PATTERN | MODE_COLOR_EXPAND;
        r.fg = [0xff, 0, 0, 0];
        r.bg = [0x11, 0, 0, 0];
        Blitter::new().start(&r, &mut v);
        let after = snapshot(&v);
        for (y, bits) in pattern.iter().enumerate() {
            for x in 0..16 {
                let at = 0x300 + y * 64 + x;
                let expect = if x < 2 {
                    before[at]
                } else if bits & (0x80 >> (x & 7)) != 0 {
                    0xff
                } else {
                    0x11
                };
                assert_eq!(after[at], expect, "mono pattern {x},{y}");
            }
        }
    }

    #[test]
    fn source_transparency_keeps_key_coloured_pixels() {
        // 8 bpp.
        let mut v = vram_with_pattern();
        v.write(0x1000, &[1, 2, 0x77, 4, 0x77, 6]);
        let before = snapshot(&v);
        let mut r = regs(6, 1, 0x2000, 16);
        r.src_addr = 0x1000;
        r.mode = MODE_TRANSPARENT;
        r.transparent_key = 0x77;
        Blitter::new().start(&r, &mut v);
        let after = snapshot(&v);
        assert_eq!(
            &after[0x2000..0x2006],
            &[1, 2, before[0x2002], 4, before[0x2004], 6]
        );
        // 16 bpp: a pixel is skipped only when both bytes match.
        let mut v = vram_with_pattern();
        v.write(0x1000, &[0x34, 0x12, 0x34, 0x99, 0x00, 0x12]);
        let before = snapshot(&v);
        let mut r = regs(6, 1, 0x2000, 16);
        r.src_addr = 0x1000;
        r.mode = MODE_TRANSPARENT | 0x10;
        r.transparent_key = 0x1234;
        Blitter::new().start(&r, &mut v);
        let after = snapshot(&v);
        assert_eq!(
            &after[0x2000..0x2006],
            &[before[0x2000], before[0x2001], 0x34, 0x99, 0x00, 0x12]
        );
        // 24 bpp transparency is refused.
        let mut r = regs(6, 1, 0x2000, 16);
        r.mode = MODE_TRANSPARENT | 0x20;
        assert_eq!(
            Blitter::new().start(&r, &mut v),
            BlitStart::Rejected(BlitRejected::TransparencyDepth)
        );
    }

    #[test]
    fn overlapping_copies_forward_and_backward() {
        // Scroll up (dst below src in memory): forward is correct.
        let mut v = vram_with_pattern();
        let before = snapshot(&v);
        let mut r = regs(40, 20, 0x1000, 64);
        r.src_addr = 0x1000 + 64 * 3 + 5;
        Blitter::new().start(&r, &mut v);
        let after = snapshot(&v);
        for y in 0..20 {
            for x in 0..40 {
                assert_eq!(
                    after[0x1000 + y * 64 + x],
                    before[0x1000 + (y + 3) * 64 + x + 5]
                );
            }
        }
        // Scroll down/right: backward from the last byte is correct.
        let mut v = vram_with_pattern();
        let before = snapshot(&v);
        let dst_last = 0x1000 + 64 * 22 + 44;
        let mut r = regs(40, 20, dst_last, 64);
        r.src_addr = (dst_last - 64 * 3 - 5) as u32;
        r.mode = MODE_BACKWARDS;
        let result = Blitter::new().start(&r, &mut v);
        let after = snapshot(&v);
        let dst_top = dst_last - 64 * 19 - 39;
        let src_top = dst_top - 64 * 3 - 5;
        for y in 0..20 {
            for x in 0..40 {
                assert_eq!(
                    after[dst_top + y * 64 + x],
                    before[src_top + y * 64 + x],
                    "{x},{y}"
                );
            }
        }
        assert_unchanged_outside(&before, &after, |i| in_rect(i, dst_top, 64, 40, 20));
        assert_eq!(
            result,
            BlitStart::Completed(Some(VideoCopy {
                src_top_left: src_top,
                dst_top_left: dst_top,
                src_pitch: 64,
                dst_pitch: 64,
                width_bytes: 40,
                height: 20
            }))
        );
        // The wrong direction smears byte by byte on one line, like the hardware.
        let mut v = vram_with_pattern();
        v.write(0x100, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut r = regs(6, 1, 0x102, 64);
        r.src_addr = 0x100;
        Blitter::new().start(&r, &mut v);
        let mut out = [0u8; 8];
        v.read(0x100, &mut out);
        assert_eq!(out, [1, 2, 1, 2, 1, 2, 1, 2]);
    }

    #[test]
    fn system_to_video_copy_counts_padded_lines() {
        let mut v = vram_with_pattern();
        let before = snapshot(&v);
        // 5 bytes per line -> 8 bytes written per line.
        let mut r = regs(5, 3, 0x400, 32);
        r.mode = MODE_MEMSYS_SRC;
        let mut b = Blitter::new();
        assert_eq!(b.start(&r, &mut v), BlitStart::WaitingForSource);
        let lines: [[u8; 8]; 3] = [
            [1, 2, 3, 4, 5, 0xee, 0xee, 0xee],
            [6, 7, 8, 9, 10, 0xee, 0xee, 0xee],
            [11, 12, 13, 14, 15, 0xee, 0xee, 0xee],
        ];
        assert!(!b.write_source(&mut v, &lines[0]));
        assert!(!b.write_source(&mut v, &lines[1][..3]));
        assert!(b.is_waiting_for_source());
        assert!(!b.write_source(&mut v, &lines[1][3..]));
        assert!(b.write_source(&mut v, &lines[2]));
        assert!(!b.is_waiting_for_source());
        let after = snapshot(&v);
        for y in 0..3 {
            assert_eq!(&after[0x400 + y * 32..0x405 + y * 32], &lines[y][..5]);
        }
        assert_unchanged_outside(&before, &after, |i| in_rect(i, 0x400, 32, 5, 3));
        // Extra bytes after completion are ignored.
        assert!(!b.write_source(&mut v, &[1, 2, 3]));
        assert_eq!(snapshot(&v), after);
    }

    #[test]
    fn system_to_video_colour_expansion_with_byte_and_dword_granularity() {
        for dword in [false, true] {
            let mut v = vram_with_pattern();
            let before = snapshot(&v);
            // 12 pixels at 16 bpp = 24 bytes; 2 bytes of bits (4 with dword padding).
            let mut r = regs(24, 2, 0x600, 64);
            r.mode = MODE_MEMSYS_SRC | MODE_COLOR_EXPAND | 0x10 | MODE_TRANSPARENT;
            r.mode_ext = if dword { MODEEXT_DWORD_GRANULARITY } else { 0 };
            r.fg = [0xaa, 0xbb, 0, 0];
            let mut b = Blitter::new();
            assert_eq!(b.start(&r, &mut v), BlitStart::WaitingForSource);
            let line_bytes = if dword { 4 } else { 2 };
            let mut data = Vec::new();
            for bits in [[0xf0u8, 0x30], [0x0f, 0xc0]] {
                data.extend_from_slice(&bits);
                data.resize(data.len() + line_bytes - 2, 0xff);
            }
            assert!(b.write_source(&mut v, &data));
            let after = snapshot(&v);
            let rows = [[0xf0u8, 0x30], [0x0f, 0xc0]];
            for (y, bits) in rows.iter().enumerate() {
                for px in 0..12 {
                    let set = bits[px / 8] & (0x80 >> (px % 8)) != 0;
                    let at = 0x600 + y * 64 + px * 2;
                    if set {
                        assert_eq!(&after[at..at + 2], &[0xaa, 0xbb], "dword {dword}");
                    } else {
                        assert_eq!(&after[at..at + 2], &before[at..at + 2]);
                    }
                }
            }
            assert_unchanged_outside(&before, &after, |i| in_rect(i, 0x600, 64, 24, 2));
        }
    }

    #[test]
    fn system_to_video_pattern() {
        let mut v = vram_with_pattern();
        let mut r = regs(8, 9, 0x700, 16);
        r.mode = MODE_MEMSYS_SRC | MODE_PATTERN;
        let mut b = Blitter::new();
        assert_eq!(b.start(&r, &mut v), BlitStart::WaitingForSource);
        let pattern: Vec<u8> = (0..64).collect();
        assert!(b.write_source(&mut v, &pattern));
        let after = snapshot(&v);
        for y in 0..9 {
            for x in 0..8 {
                assert_eq!(after[0x700 + y * 16 + x], pattern[(y & 7) * 8 + x]);
            }
        }
    }

    #[test]
    fn refused_blits_change_nothing() {
        let cases: Vec<(&str, BlitRegisters)> = vec![
            ("zero pitch", {
                let mut r = regs(16, 4, 0x100, 0);
                r.src_addr = 0x2000;
                r
            }),
            ("destination past the end", regs(64, 4, VRAM - 100, 64)),
            ("backward below zero", {
                let mut r = regs(64, 4, 10, 64);
                r.mode = MODE_BACKWARDS;
                r.src_addr = 0x8000;
                r
            }),
            ("source past the end", {
                let mut r = regs(64, 4, 0, 64);
                r.src_addr = (VRAM - 64) as u32;
                r
            }),
            ("video to system", {
                let mut r = regs(4, 1, 0, 64);
                r.mode = MODE_MEMSYS_DEST;
                r
            }),
            ("system to system", {
                let mut r = regs(4, 1, 0, 64);
                r.mode = MODE_MEMSYS_DEST | MODE_MEMSYS_SRC;
                r
            }),
        ];
        for (name, r) in cases {
            let mut v = vram_with_pattern();
            let before = snapshot(&v);
            let mut b = Blitter::new();
            assert!(
                matches!(b.start(&r, &mut v), BlitStart::Rejected(_)),
                "{name}"
            );
            assert!(!b.is_waiting_for_source());
            assert_eq!(snapshot(&v), before, "{name}");
            assert!(v.take_dirty().is_empty(), "{name}");
        }
    }

    /// Runs `regs` on fresh VRAM and asserts it was refused and changed nothing.
    fn assert_refused(name: &str, regs: BlitRegisters) {
        let mut v = vram_with_pattern();
        let before = snapshot(&v);
        let mut b = Blitter::new();
        let result = b.start(&regs, &mut v);
        assert!(
            matches!(result, BlitStart::Rejected(_)),
            "{name}: {result:?}"
        );
        assert!(!b.is_waiting_for_source(), "{name}");
        // Whatever the CPU writes next goes nowhere.
        assert!(!b.write_source(&mut v, &[0xab; 4096]), "{name}");
        assert_eq!(snapshot(&v), before, "{name}");
    }

    #[test]
    fn cve_2014_8106_copy_and_fill_beyond_vram_are_refused() {
        // The original bug: no bounds check at all on screen-to-screen copies and fills.
        let mut r = regs(0x800, 0x100, 0x8000, 0x800);
        r.src_addr = 0;
        assert_refused("copy dst past end", r);
        let mut r = regs(0x800, 0x10, 0, 0x800);
        r.src_addr = (VRAM - 0x100) as u32;
        assert_refused("copy src past end", r);
        let mut r = regs(0x1000, 0x40, VRAM - 0x1000, 0x1000);
        r.mode = MODE_PATTERN | MODE_COLOR_EXPAND;
        r.mode_ext = MODEEXT_SOLID_FILL;
        assert_refused("solid fill past end", r);
        // Addresses beyond the 22 bits the registers hold are cut, never used raw.
        let mut r = regs(16, 1, 0, 64);
        r.dst_addr = 0xffff_ffff;
        assert_refused("huge dst", r);
    }

    #[test]
    fn cve_2016_9922_zero_pitches_are_refused() {
        // Pitch 0 divided by in QEMU's copy notification.
        let mut r = regs(64, 8, 0x100, 0);
        r.src_pitch = 0;
        r.src_addr = 0x4000;
        assert_refused("both pitches 0", r);
        let mut r = regs(64, 8, 0x100, 64);
        r.src_pitch = 0;
        r.src_addr = 0x4000;
        assert_refused("src pitch 0", r);
        let mut r = regs(64, 8, 0x100, 0);
        r.mode = MODE_PATTERN;
        assert_refused("pattern dst pitch 0", r);
    }

    #[test]
    fn cve_2017_2615_backward_copies_below_address_zero_are_refused() {
        // Backward blit whose last line starts before VRAM: QEMU checked the wrong sign.
        let mut r = regs(0x100, 1, 0x10, 0x100);
        r.src_addr = 0x8000;
        r.mode = MODE_BACKWARDS;
        assert_refused("dst width below zero", r);
        let mut r = regs(0x10, 0x20, 0x8000, 0x100);
        r.src_addr = 0x100;
        r.mode = MODE_BACKWARDS;
        assert_refused("src lines below zero", r);
        // Exactly reaching address 0 is fine.
        let mut v = vram_with_pattern();
        let mut r = regs(0x10, 2, 0x10f, 0x100);
        r.src_addr = 0x810f;
        r.mode = MODE_BACKWARDS;
        assert!(matches!(
            Blitter::new().start(&r, &mut v),
            BlitStart::Completed(_)
        ));
    }

    #[test]
    fn cve_2017_2620_system_to_video_outside_vram_is_refused() {
        // cputovideo had no destination check; the guest then streamed data over the heap.
        let mut r = regs(0x2000, 0x100, VRAM - 0x100, 0x2000);
        r.mode = MODE_MEMSYS_SRC;
        assert_refused("cpu copy past end", r);
        let mut r = regs(0x2000, 4, VRAM - 0x100, 0x2000);
        r.mode = MODE_MEMSYS_SRC | MODE_COLOR_EXPAND;
        assert_refused("cpu expand past end", r);
        // The widest legal line streams fine and lands exactly where it should.
        let mut v = vram_with_pattern();
        let before = snapshot(&v);
        let mut r = regs(MAX_BLIT_WIDTH, 1, 0x100, 0x1fff);
        r.mode = MODE_MEMSYS_SRC;
        let mut b = Blitter::new();
        assert_eq!(b.start(&r, &mut v), BlitStart::WaitingForSource);
        assert!(b.write_source(&mut v, &vec![0x5a; MAX_BLIT_WIDTH + 100]));
        let after = snapshot(&v);
        let end = 0x100 + MAX_BLIT_WIDTH;
        assert!(after[0x100..end].iter().all(|&x| x == 0x5a));
        assert_eq!(&after[end..], &before[end..]);
        assert_eq!(&after[..0x100], &before[..0x100]);
    }

    #[test]
    fn cve_2017_7718_pattern_and_expansion_sources_at_the_end_are_refused() {
        // A pattern source whose 256 bytes run past VRAM.
        let mut r = regs(32, 4, 0, 64);
        r.src_addr = (VRAM + 8) as u32;
        r.mode = MODE_PATTERN | 0x30;
        assert_refused("32 bpp pattern past the end", r);
        let mut r = regs(32, 4, 0, 64);
        r.src_addr = (VRAM + 0x100) as u32;
        r.mode = MODE_PATTERN | MODE_COLOR_EXPAND;
        assert_refused("mono pattern beyond", r);
        // Colour expansion from video memory reading past the end.
        let mut r = regs(0x800, 0x40, 0, 0x800);
        r.src_addr = (VRAM - 0x10) as u32;
        r.mode = MODE_COLOR_EXPAND;
        assert_refused("expansion source past end", r);
    }

    #[test]
    fn cve_2017_7980_edge_blits_stay_inside_their_footprint() {
        // The generic out-of-bounds fix: backward transparent 16 bpp at the very start,
        // 24 bpp patterns with odd widths at the very end, 32 bpp pixels wider than the
        // blit width. Each either runs inside its footprint or is refused.
        let edge_cases: Vec<BlitRegisters> = vec![
            {
                let mut r = regs(2, 1, 1, 2);
                r.src_addr = 1;
                r.mode = MODE_BACKWARDS | MODE_TRANSPARENT | 0x10;
                r
            },
            {
                let mut r = regs(3, 1, 0, 4);
                r.src_addr = 0x3000;
                r.mode = MODE_BACKWARDS | MODE_TRANSPARENT | 0x10;
                r
            },
            {
                let mut r = regs(31, 3, VRAM - 31 - 2 * 64, 64);
                r.src_addr = 0x100;
                r.skip = 0x1f;
                r.mode = MODE_PATTERN | 0x20;
                r
            },
            {
                let mut r = regs(1, 3, VRAM - 1 - 2 * 64, 64);
                r.mode = MODE_PATTERN | MODE_COLOR_EXPAND | 0x30;
                r.mode_ext = MODEEXT_SOLID_FILL;
                r.fg = [1, 2, 3, 4];
                r
            },
            {
                let mut r = regs(5, 2, VRAM - 5 - 64, 64);
                r.src_addr = 0x200;
                r.skip = 7;
                r.mode = MODE_COLOR_EXPAND | 0x30;
                r
            },
        ];
        for (n, r) in edge_cases.into_iter().enumerate() {
            let mut v = vram_with_pattern();
            let before = snapshot(&v);
            let plan = Plan::new(&r, VRAM);
            let result = Blitter::new().start(&r, &mut v);
            let after = snapshot(&v);
            match plan {
                Ok(plan) => {
                    assert!(matches!(result, BlitStart::Completed(_)), "case {n}");
                    let top = plan.dst_line(0).min(plan.dst_line(plan.height - 1));
                    assert_unchanged_outside(&before, &after, |i| {
                        in_rect(i, top, plan.dst_pitch, plan.width, plan.height)
                    });
                }
                Err(_) => assert_eq!(after, before, "case {n}"),
            }
        }
    }

    #[test]
    fn random_hostile_registers_never_touch_memory_outside_the_validated_footprint() {
        let mut rng = TestRng(0xc1a5_5e5e_0bad_f00d);
        let mut v = vram_with_pattern();
        let mut b = Blitter::new();
        for _ in 0..1500 {
            let r = rng.next();
            let s = rng.next();
            let regs = BlitRegisters {
                width_minus_one: (r & 0x1fff) as u16 % 300,
                height_minus_one: ((r >> 13) & 0x1fff) as u16 % 40,
                dst_pitch: ((r >> 26) & 0x1fff) as u16,
                src_pitch: ((r >> 39) & 0x1fff) as u16,
                dst_addr: (s & 0x3f_ffff) as u32 % (VRAM as u32 + 2048),
                src_addr: ((s >> 22) & 0x3f_ffff) as u32 % (VRAM as u32 + 2048),
                skip: (s >> 44) as u8,
                mode: (s >> 52) as u8,
                rop: Rop::ALL[(r >> 60) as usize].code(),
                mode_ext: (s >> 60) as u8,
                fg: (r as u32).to_le_bytes(),
                bg: ((r >> 32) as u32).to_le_bytes(),
                transparent_key: (s >> 8) as u16,
            };
            let before = snapshot(&v);
            let plan = Plan::new(&regs, VRAM);
            match b.start(&regs, &mut v) {
                BlitStart::WaitingForSource => {
                    let data: Vec<u8> = (0..(rng.next() % 600)).map(|i| i as u8).collect();
                    b.write_source(&mut v, &data);
                }
                BlitStart::Rejected(_) | BlitStart::Completed(_) => {}
            }
            let after = snapshot(&v);
            match plan {
                Ok(plan) => {
                    let top = plan.dst_line(0).min(plan.dst_line(plan.height - 1));
                    assert_unchanged_outside(&before, &after, |i| {
                        in_rect(i, top, plan.dst_pitch, plan.width, plan.height)
                    });
                }
                Err(_) => assert_eq!(before, after),
            }
        }
    }
}
