//! The standard IBM VGA core: registers, planar video memory and the renderer, following
//! QEMU's `hw/display/vga.c`, FreeVGA and the IBM VGA reference as behavioural references.
//! The Cirrus CL-GD5446 (`cirrus.rs`) wraps a [`Vga`]; it can also be used on its own.
//!
//! Ports: the device sees offsets 0..0x30 from 0x3b0 ([`VGA_PORT_BASE`]). Misc output
//! (0x3c2 write, 0x3cc read), input status 0 (0x3c2) and 1 (0x3ba/0x3da: vertical retrace
//! and display-disabled bits toggle on every read so polling loops end; the read resets
//! the attribute flip-flop), feature control (0x3ba/0x3da write, 0x3ca read), sequencer
//! (0x3c4/5), CRTC at 0x3b4/5 or 0x3d4/5 by misc bit 0 (the other pair reads 0xff) with
//! the CR11 write protection of CR0-7 (CR07 bit 4 stays writable), graphics controller
//! (0x3ce/f), attribute controller (0x3c0/1, index/data flip-flop, palette address source
//! bit), DAC (0x3c6 pixel mask, 0x3c7/0x3c8 read/write index, 0x3c9 three-step 6-bit RGB
//! with index wrap, 0x3c7 read = DAC state). A multi-byte access (a 16-bit `OUT` to an
//! index port) is split into bytes at consecutive ports. CR22 (latch), CR24 (flip-flop)
//! and CR26 (attribute index) read back as on IBM VGA.
//!
//! Memory: offsets 0..0x20000 from 0xa0000 ([`VGA_MEMORY_BASE`]), decoded by GR6's memory
//! map select. VRAM stores the four planes interleaved: planar address `a`, plane `p` is
//! byte `a * 4 + p` of the [`Vram`]. CPU access modes: chain-4 (SR4 bit 3: CPU byte `A`
//! is VRAM byte `A`, so it is the same byte a linear framebuffer sees, as in QEMU/Bochs),
//! odd/even writes (SR4 bit 2 clear: planar address `A & !1`, even bytes to planes 0/2,
//! odd to 1/3) and reads (GR5 bit 4: plane `(GR4 & 2) | (A & 1)`), otherwise planar. Every
//! write goes through the graphics controller: write modes 0-3, data rotate, logical
//! operation, set/reset and enable set/reset, bit mask, map mask SR2; every read loads the
//! 32-bit latch and returns read mode 0 (GR4 plane) or read mode 1 (colour compare GR2
//! with colour don't care GR7).
//!
//! Rendering ([`DisplayDevice::refresh`]): text (8/9-dot cells, 40-column dot doubling,
//! glyphs from plane 2 at the SR3 character maps A/B, attribute blink or background
//! intensity per AR10, line-graphics 9th column, underline row CR14, cursor CR0A/0B/0E/0F
//! with blink, any CR09 cell height e.g. 80x25 and 80x50, double scan), 16-colour planar
//! graphics (modes 0Dh-12h, EGA/CGA 2-colour mode 6), the CGA 4-colour shift mode
//! (GR5 bit 5, modes 4/5) and 256 colours (GR5 bit 6, mode 13h and unchained "mode X",
//! pixels doubled). The CRTC model generates addresses like the hardware: start address
//! CR0C/0D plus byte panning CR08, offset CR13, byte/word mode with the CR17 address wrap,
//! the CGA bank substitution (CR17 bits 0/1), preset row scan CR08, max scan line CR09 and
//! double scan, line compare (split screen, CR18/CR07/CR09, with AR10 bit 5 pel-panning
//! reset) and pel panning AR13. Colours go through AR0-F, colour plane enable AR12, AR10
//! bit 7 and AR14, the DAC mask and the DAC; 256-colour pixels index the DAC directly (as
//! QEMU). The screen is blank (black) while the palette address source bit is clear or
//! SR1 bit 5 (screen off) is set. The surface size is the display area from CR01, SR1
//! and CR12/CR07, clamped to [`MAX_SURFACE_WIDTH`] x [`MAX_SURFACE_HEIGHT`].
//!
//! Redraw is incremental: the displayed register set and the 256-entry colour table are
//! compared with the previous refresh (any change redraws everything, as does
//! [`Vga::invalidate`] or a surface of the wrong size); text keeps a per scan line,
//! per character cache (character, attribute, cursor and blink state) plus a copy of the
//! two active fonts; graphics redraw the scan lines whose VRAM pages are dirty
//! (`Vram::take_dirty` plus the `guest_dirty` argument). Damage is reported as rectangles
//! merged from consecutive changed scan lines. Blinking uses a frame number: the refresh
//! count, or `now / 16.67 ms` after [`Vga::set_time_ns`]; the cursor toggles every 8
//! frames and blinking characters every 16.
//!
//! Not emulated: timing (retrace is a toggle, not a clock), the CRTC horizontal timing
//! registers and sync (only the display-end values size the screen), doubleword-mode
//! address rotation (doubleword mode reads the linear chain-4 layout instead), the misc
//! output odd/even page bit, cursor skew, the 256-colour path through the attribute
//! palette (bypassed, as in QEMU), blinking in graphics modes, the overscan border colour,
//! SR0 reset, EGA compatibility quirks, and fonts: the guest's VGA BIOS loads them
//! ([`Vga::set_standard_mode`] programs registers and the DAC only).
//!
//! Public API (the Cirrus wrapper calls these; it intercepts its extended registers, the
//! hidden DAC and its linear modes, renders SVGA modes itself and must call
//! [`Vga::invalidate`] when it gives the surface back to the VGA renderer):
//! [`Vga::new`], [`Vga::vram`]/[`Vga::vram_mut`], [`Vga::port_read`]/[`Vga::port_write`]
//! (offset from 0x3b0), [`Vga::mem_read`]/[`Vga::mem_write`] (offset from 0xa0000),
//! sequencer/graphics/CRTC index and register accessors (`set_*` behave like the guest's
//! data-port write, with masks and write protection), [`Vga::attribute`],
//! [`Vga::attribute_index`], [`Vga::dac_rgb`], [`Vga::dac_mask`], [`Vga::palette_lut`],
//! [`Vga::misc_output`], [`Vga::latch`]/[`Vga::set_latch`], [`Vga::invalidate`],
//! [`Vga::reset`], [`Vga::state`]/[`Vga::restore`], [`Vga::set_time_ns`],
//! [`Vga::set_standard_mode`], [`Vga::is_text_mode`], [`Vga::display_size`], plus
//! [`BusDevice`] (ports) and [`DisplayDevice`].

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::display::{DisplayDevice, Rect, RefreshOutcome, Surface, SURFACE_BYTES_PER_PIXEL};
use crate::vram::{DirtyPages, Vram};

/// First port of the device's range.
pub const VGA_PORT_BASE: u64 = 0x3b0;
/// Number of ports (0x3b0..=0x3df).
pub const VGA_PORT_COUNT: u64 = 0x30;
/// Guest physical base of the legacy video memory window.
pub const VGA_MEMORY_BASE: u64 = 0xa0000;
/// Size of the legacy window (0xa0000..=0xbffff).
pub const VGA_MEMORY_SIZE: u64 = 0x20000;
/// Largest surface the renderer produces, whatever the CRTC says.
pub const MAX_SURFACE_WIDTH: u32 = 2048;
/// Largest surface the renderer produces, whatever the CRTC says.
pub const MAX_SURFACE_HEIGHT: u32 = 2048;

const SEQUENCER_COUNT: usize = 8;
const GRAPHICS_COUNT: usize = 16;
const CRTC_COUNT: usize = 0x19;
const ATTRIBUTE_COUNT: usize = 0x15;
const PALETTE_BYTES: usize = 256 * 3;

/// Writable bits of SR0-7 (as QEMU's `sr_mask`).
const SEQUENCER_MASK: [u8; SEQUENCER_COUNT] = [0x03, 0x3d, 0x0f, 0x3f, 0x0e, 0, 0, 0];
/// Writable bits of GR0-15 (as QEMU's `gr_mask`).
const GRAPHICS_MASK: [u8; GRAPHICS_COUNT] = [
    0x0f, 0x0f, 0x0f, 0x1f, 0x03, 0x7b, 0x0f, 0x0f, 0xff, 0, 0, 0, 0, 0, 0, 0,
];

/// Planar addresses the CRTC generates (64 K per plane: 256 KiB of VRAM).
const CRTC_ADDRESS_MASK: u32 = 0xffff;
/// VRAM bytes the renderer looks at (four planes of 64 KiB).
const PLANES_BYTES: usize = 0x40000;
/// Bytes of one font (256 characters of 32 scan lines) in plane 2.
const FONT_BYTES: usize = 256 * 32;
/// Surface used while the screen is blank and the CRTC describes no usable size.
const BLANK_FALLBACK: (u32, u32) = (640, 480);
/// One frame at 60 Hz, for [`Vga::set_time_ns`].
const FRAME_NS: u64 = 16_666_667;

// Port numbers (absolute).
const PORT_ATTRIBUTE_WRITE: u64 = 0x3c0;
const PORT_ATTRIBUTE_READ: u64 = 0x3c1;
const PORT_MISC_WRITE_STATUS0: u64 = 0x3c2;
const PORT_SEQUENCER_INDEX: u64 = 0x3c4;
const PORT_SEQUENCER_DATA: u64 = 0x3c5;
const PORT_DAC_MASK: u64 = 0x3c6;
const PORT_DAC_READ_INDEX: u64 = 0x3c7;
const PORT_DAC_WRITE_INDEX: u64 = 0x3c8;
const PORT_DAC_DATA: u64 = 0x3c9;
const PORT_FEATURE_READ: u64 = 0x3ca;
const PORT_MISC_READ: u64 = 0x3cc;
const PORT_GRAPHICS_INDEX: u64 = 0x3ce;
const PORT_GRAPHICS_DATA: u64 = 0x3cf;

/// Input status 1: display disabled (in a retrace).
const STATUS1_DISPLAY_DISABLED: u8 = 0x01;
/// Input status 1: vertical retrace.
const STATUS1_VERTICAL_RETRACE: u8 = 0x08;

/// Standard BIOS modes that [`Vga::set_standard_mode`] programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StandardMode {
    /// Mode 03h: 80x25 colour text, 9x16 cells, 720x400.
    Text80x25,
    /// Mode 12h: 640x480, 16 colours, planar.
    Planar640x480,
    /// Mode 13h: 320x200, 256 colours, chain-4 (shown as 640x400).
    Chain4_320x200,
}

struct ModeTable {
    misc: u8,
    sequencer: [u8; 5],
    crtc: [u8; CRTC_COUNT],
    graphics: [u8; 9],
    attribute: [u8; ATTRIBUTE_COUNT],
}

/// The IBM VGA BIOS parameter tables (public data from the VGA documentation).
const MODE_03H: ModeTable = ModeTable {
    misc: 0x67,
    sequencer: [0x03, 0x00, 0x03, 0x00, 0x02],
    crtc: [
        0x5f, 0x4f, 0x50, 0x82, 0x55, 0x81, 0xbf, 0x1f, 0x00, 0x4f, 0x0d, 0x0e, 0x00, 0x00, 0x00,
        0x00, 0x9c, 0x8e, 0x8f, 0x28, 0x1f, 0x96, 0xb9, 0xa3, 0xff,
    ],
    graphics: [0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x0e, 0x00, 0xff],
    attribute: [
        0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x14, 0x07, 0x38, 0x39, 0x3a, 0x3b, 0x3c, 0x3d, 0x3e,
        0x3f, 0x0c, 0x00, 0x0f, 0x08, 0x00,
    ],
};

const MODE_12H: ModeTable = ModeTable {
    misc: 0xe3,
    sequencer: [0x03, 0x01, 0x0f, 0x00, 0x06],
    crtc: [
        0x5f, 0x4f, 0x50, 0x82, 0x54, 0x80, 0x0b, 0x3e, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0xea, 0x8c, 0xdf, 0x28, 0x00, 0xe7, 0x04, 0xe3, 0xff,
    ],
    graphics: [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x05, 0x0f, 0xff],
    attribute: [
        0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x14, 0x07, 0x38, 0x39, 0x3a, 0x3b, 0x3c, 0x3d, 0x3e,
        0x3f, 0x01, 0x00, 0x0f, 0x00, 0x00,
    ],
};

const MODE_13H: ModeTable = ModeTable {
    misc: 0x63,
    sequencer: [0x03, 0x01, 0x0f, 0x00, 0x0e],
    crtc: [
        0x5f, 0x4f, 0x50, 0x82, 0x54, 0x80, 0xbf, 0x1f, 0x00, 0x41, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x9c, 0x8e, 0x8f, 0x28, 0x40, 0x96, 0xb9, 0xa3, 0xff,
    ],
    graphics: [0x00, 0x00, 0x00, 0x00, 0x00, 0x40, 0x05, 0x0f, 0xff],
    attribute: [
        0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e,
        0x0f, 0x41, 0x00, 0x0f, 0x00, 0x00,
    ],
};

/// The VGA registers: everything that survives save/restore except the VRAM contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VgaState {
    pub misc_output: u8,
    pub feature_control: u8,
    /// The full index byte as written (data accesses use its low 3 bits).
    pub sequencer_index: u8,
    pub sequencer: [u8; SEQUENCER_COUNT],
    /// The full index byte as written (data accesses use its low 4 bits).
    pub graphics_index: u8,
    pub graphics: [u8; GRAPHICS_COUNT],
    pub crtc_index: u8,
    pub crtc: [u8; CRTC_COUNT],
    /// Bits 0-4 index, bit 5 palette address source.
    pub attribute_index: u8,
    pub attribute: [u8; ATTRIBUTE_COUNT],
    /// The next write to 0x3c0 is data (not an index).
    pub attribute_flip_flop: bool,
    pub dac_mask: u8,
    pub dac_read_index: u8,
    pub dac_write_index: u8,
    /// Which of R, G, B the next 0x3c9 access is (0..=2).
    pub dac_sub_index: u8,
    /// 0x3c7 was written last (the DAC state reads 3), not 0x3c8.
    pub dac_reading: bool,
    /// The components written so far for the entry at `dac_write_index`.
    pub dac_pending: [u8; 3],
    /// 256 RGB triplets of 6-bit values.
    pub palette: Vec<u8>,
    pub latch: u32,
}

impl Default for VgaState {
    fn default() -> Self {
        Self {
            misc_output: 0,
            feature_control: 0,
            sequencer_index: 0,
            sequencer: [0; SEQUENCER_COUNT],
            graphics_index: 0,
            graphics: [0; GRAPHICS_COUNT],
            crtc_index: 0,
            crtc: [0; CRTC_COUNT],
            attribute_index: 0,
            attribute: [0; ATTRIBUTE_COUNT],
            attribute_flip_flop: false,
            dac_mask: 0xff,
            dac_read_index: 0,
            dac_write_index: 0,
            dac_sub_index: 0,
            dac_reading: false,
            dac_pending: [0; 3],
            palette: vec![0; PALETTE_BYTES],
            latch: 0,
        }
    }
}

impl VgaState {
    /// Clamps every field to what the hardware can hold.
    fn sanitized(mut self) -> Self {
        for (value, mask) in self.sequencer.iter_mut().zip(SEQUENCER_MASK) {
            *value &= mask;
        }
        for (value, mask) in self.graphics.iter_mut().zip(GRAPHICS_MASK) {
            *value &= mask;
        }
        self.attribute_index &= 0x3f;
        for (index, value) in self.attribute.iter_mut().enumerate() {
            *value &= attribute_mask(index);
        }
        self.dac_sub_index %= 3;
        self.dac_pending.iter_mut().for_each(|v| *v &= 0x3f);
        self.palette.resize(PALETTE_BYTES, 0);
        self.palette.iter_mut().for_each(|v| *v &= 0x3f);
        self
    }
}

/// Writable bits of attribute register `index`.
fn attribute_mask(index: usize) -> u8 {
    match index {
        0..=0x0f => 0x3f,
        0x10 => 0xef,
        0x11 => 0xff,
        0x12 => 0x3f,
        0x13 | 0x14 => 0x0f,
        _ => 0,
    }
}

/// One byte replicated into the four plane lanes.
fn replicate(byte: u8) -> u32 {
    u32::from_le_bytes([byte; 4])
}

/// A 4-bit plane set expanded to 0xff lanes.
fn expand_planes(planes: u8) -> u32 {
    (0..4)
        .filter(|plane| planes & (1 << plane) != 0)
        .fold(0, |acc, plane| acc | (0xff << (8 * plane)))
}

/// A 6-bit DAC component scaled to 8 bits.
fn dac_component(value: u8) -> u32 {
    let v = u32::from(value & 0x3f);
    (v << 2) | (v >> 4)
}

/// How the shift registers turn memory into pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PixelFormat {
    Text,
    Planar16,
    Cga4,
    Color256,
}

/// The display parameters derived from the registers for one refresh.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    format: PixelFormat,
    blank: bool,
    width: u32,
    height: u32,
    /// Character clocks per scan line (CR01 + 1).
    columns: u32,
    /// Dots per character clock (8 or 9).
    char_width: u32,
    /// Surface pixels per dot (2 with SR1 bit 3).
    dot_repeat: u32,
    max_scan: u32,
    /// 1 when CR09 bit 7 doubles every scan line.
    double_scan: u32,
    preset_row_scan: u32,
    start_address: u32,
    /// Address counter increment per character row.
    offset: u32,
    line_compare: u32,
    pan_dots: u32,
    pan_reset_at_split: bool,
    crtc_mode: u8,
    doubleword: bool,
}

impl Geometry {
    fn scans_per_row(&self) -> u32 {
        (self.max_scan + 1) << self.double_scan
    }

    /// Planar address of address-counter value `counter` on row scan `row_scan`.
    fn address(&self, counter: u32, row_scan: u32) -> u32 {
        let counter = counter & CRTC_ADDRESS_MASK;
        let mut address = if self.doubleword || self.crtc_mode & 0x40 != 0 {
            counter
        } else {
            let low = if self.crtc_mode & 0x20 != 0 {
                (counter >> 15) & 1
            } else {
                (counter >> 13) & 1
            };
            ((counter << 1) | low) & CRTC_ADDRESS_MASK
        };
        if self.crtc_mode & 0x01 == 0 {
            address = (address & !0x2000) | ((row_scan & 1) << 13);
        }
        if self.crtc_mode & 0x02 == 0 {
            address = (address & !0x4000) | ((row_scan & 2) << 13);
        }
        address
    }

    /// Where each scan line fetches from.
    fn scan_plan(&self) -> Vec<ScanLine> {
        let mut lines = Vec::with_capacity(self.height as usize);
        let scans_per_row = self.scans_per_row();
        let mut row_counter = self.start_address;
        let mut sub = self.preset_row_scan.min(self.max_scan) << self.double_scan;
        let mut pan_dots = self.pan_dots;
        for y in 0..self.height {
            if y == self.line_compare {
                row_counter = 0;
                sub = 0;
                if self.pan_reset_at_split {
                    pan_dots = 0;
                }
            }
            lines.push(ScanLine {
                y,
                row_counter,
                row_scan: sub >> self.double_scan,
                pan_dots,
            });
            sub += 1;
            if sub >= scans_per_row {
                sub = 0;
                row_counter = row_counter.wrapping_add(self.offset) & CRTC_ADDRESS_MASK;
            }
        }
        lines
    }
}

#[derive(Clone, Copy, Debug)]
struct ScanLine {
    y: u32,
    row_counter: u32,
    row_scan: u32,
    pan_dots: u32,
}

/// What the screen looked like at the last refresh, to redraw only what changed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RenderKey {
    registers: Vec<u8>,
    colours: Vec<u32>,
}

#[derive(Default)]
struct RenderCache {
    key: Option<RenderKey>,
    force_full: bool,
    /// Text: per scan line, per fetched character, the last drawn cell key.
    text_cells: Vec<u32>,
    /// Text: the two active fonts as last drawn.
    fonts: Vec<u8>,
    /// Copy of the first 256 KiB of VRAM for this refresh.
    planes: Vec<u8>,
}

/// Collects per-scan-line damage spans into rectangles.
#[derive(Default)]
struct DamageCollector {
    rects: Vec<Rect>,
    /// (first line, end line, x start, x end) of the open rectangle.
    open: Option<(u32, u32, u32, u32)>,
}

impl DamageCollector {
    fn line(&mut self, y: u32, span: Option<(u32, u32)>) {
        match (span, self.open) {
            (Some((x0, x1)), Some((top, bottom, ox0, ox1))) if bottom == y => {
                self.open = Some((top, y + 1, ox0.min(x0), ox1.max(x1)));
            }
            (Some((x0, x1)), _) => {
                self.flush();
                self.open = Some((y, y + 1, x0, x1));
            }
            (None, _) => self.flush(),
        }
    }

    fn flush(&mut self) {
        if let Some((top, bottom, x0, x1)) = self.open.take() {
            let rect = Rect::new(x0, top, x1 - x0, bottom - top);
            if !rect.is_empty() {
                self.rects.push(rect);
            }
        }
    }

    fn finish(mut self) -> Vec<Rect> {
        self.flush();
        self.rects
    }
}

fn put_pixel(row: &mut [u8], x: u32, rgb: u32) {
    let at = x as usize * SURFACE_BYTES_PER_PIXEL;
    if let Some(pixel) = row.get_mut(at..at + SURFACE_BYTES_PER_PIXEL) {
        pixel.copy_from_slice(&rgb.to_le_bytes());
        pixel[3] = 0;
    }
}

/// Code page 437 as Unicode, for [`DisplayDevice::text_screen`].
const CP437_LOW: &str = " ☺☻♥♦♣♠•◘○◙♂♀♪♫☼►◄↕‼¶§▬↨↑↓→←∟↔▲▼";
const CP437_HIGH: &str = "ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»░▒▓│┤╡╢╖╕╣║╗╝╜╛┐└┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■ ";

fn cp437(byte: u8) -> char {
    match byte {
        0x20..=0x7e => char::from(byte),
        0x7f => '⌂',
        0x00..=0x1f => CP437_LOW.chars().nth(byte as usize).unwrap_or(' '),
        _ => CP437_HIGH.chars().nth(byte as usize - 0x80).unwrap_or(' '),
    }
}

/// The VGA device.
pub struct Vga {
    vram: Vram,
    state: VgaState,
    /// Input status 1 reads so far (the retrace bits toggle on each).
    status_reads: u64,
    refresh_count: u64,
    time_ns: Option<u64>,
    cache: RenderCache,
}

impl Vga {
    /// A VGA on `vram` with power-on (all-zero) registers; the guest's BIOS sets a mode.
    pub fn new(vram: Vram) -> Self {
        Self {
            vram,
            state: VgaState::default(),
            status_reads: 0,
            refresh_count: 0,
            time_ns: None,
            cache: RenderCache {
                force_full: true,
                ..RenderCache::default()
            },
        }
    }

    pub fn vram(&self) -> &Vram {
        &self.vram
    }

    pub fn vram_mut(&mut self) -> &mut Vram {
        &mut self.vram
    }

    /// Machine reset: power-on registers (VRAM is kept), full redraw next time.
    pub fn reset(&mut self) {
        self.state = VgaState::default();
        self.status_reads = 0;
        self.invalidate();
    }

    /// The registers, for save/restore.
    pub fn state(&self) -> VgaState {
        self.state.clone()
    }

    /// Loads saved registers (sanitized); the next refresh redraws everything.
    pub fn restore(&mut self, state: VgaState) {
        self.state = state.sanitized();
        self.invalidate();
    }

    /// Forces a full redraw on the next refresh (call after drawing into the surface
    /// yourself).
    pub fn invalidate(&mut self) {
        self.cache.force_full = true;
    }

    /// Gives blinking a clock: the frame number becomes `now_ns / 16.67 ms` instead of
    /// the refresh count.
    pub fn set_time_ns(&mut self, now_ns: u64) {
        self.time_ns = Some(now_ns);
    }

    fn frame(&self) -> u64 {
        self.time_ns
            .map(|now| now / FRAME_NS)
            .unwrap_or(self.refresh_count)
    }

    /// The surface size the next refresh uses (width, height) in the current mode.
    pub fn display_size(&self) -> (u32, u32) {
        let g = self.geometry();
        (g.width, g.height)
    }

    /// GR6 bit 0 clear: alphanumeric mode.
    pub fn is_text_mode(&self) -> bool {
        self.state.graphics[6] & 0x01 == 0
    }

    fn colour_crtc(&self) -> bool {
        self.state.misc_output & 0x01 != 0
    }

    // ---- register accessors -------------------------------------------------------

    pub fn misc_output(&self) -> u8 {
        self.state.misc_output
    }

    pub fn sequencer_index(&self) -> u8 {
        self.state.sequencer_index
    }

    pub fn sequencer(&self, index: u8) -> u8 {
        self.state.sequencer[usize::from(index) % SEQUENCER_COUNT]
    }

    /// A guest write to sequencer register `index` (masked to the writable bits).
    pub fn set_sequencer(&mut self, index: u8, value: u8) {
        let i = usize::from(index) % SEQUENCER_COUNT;
        self.state.sequencer[i] = value & SEQUENCER_MASK[i];
    }

    pub fn graphics_index(&self) -> u8 {
        self.state.graphics_index
    }

    pub fn graphics(&self, index: u8) -> u8 {
        self.state.graphics[usize::from(index) % GRAPHICS_COUNT]
    }

    /// A guest write to graphics controller register `index` (masked).
    pub fn set_graphics(&mut self, index: u8, value: u8) {
        let i = usize::from(index) % GRAPHICS_COUNT;
        self.state.graphics[i] = value & GRAPHICS_MASK[i];
    }

    pub fn crtc_index(&self) -> u8 {
        self.state.crtc_index
    }

    /// CRTC register `index`; CR22/CR24/CR26 read the latch / flip-flop / attribute
    /// index, other indices past CR18 read 0.
    pub fn crtc(&self, index: u8) -> u8 {
        match index {
            0x22 => {
                let plane = u32::from(self.state.graphics[4] & 3);
                (self.state.latch >> (8 * plane)) as u8
            }
            0x24 => u8::from(self.state.attribute_flip_flop) << 7,
            0x26 => self.state.attribute_index,
            _ => self
                .state
                .crtc
                .get(usize::from(index))
                .copied()
                .unwrap_or(0),
        }
    }

    /// A guest write to CRTC register `index`, honouring the CR11 bit 7 protection of
    /// CR0-7 (CR07 bit 4 stays writable). Indices past CR18 are ignored.
    pub fn set_crtc(&mut self, index: u8, value: u8) {
        let i = usize::from(index);
        if self.state.crtc[0x11] & 0x80 != 0 && i <= 7 {
            if i == 7 {
                self.state.crtc[7] = (self.state.crtc[7] & !0x10) | (value & 0x10);
            }
            return;
        }
        if let Some(register) = self.state.crtc.get_mut(i) {
            *register = value;
        }
    }

    /// Attribute index register (bits 0-4 index, bit 5 palette address source).
    pub fn attribute_index(&self) -> u8 {
        self.state.attribute_index
    }

    pub fn attribute(&self, index: u8) -> u8 {
        self.state
            .attribute
            .get(usize::from(index))
            .copied()
            .unwrap_or(0)
    }

    fn set_attribute(&mut self, index: u8, value: u8) {
        let i = usize::from(index);
        if let Some(register) = self.state.attribute.get_mut(i) {
            *register = value & attribute_mask(i);
        }
    }

    pub fn dac_mask(&self) -> u8 {
        self.state.dac_mask
    }

    /// DAC entry `index` as 0x00RRGGBB (6-bit components scaled to 8 bits).
    pub fn dac_rgb(&self, index: u8) -> u32 {
        let at = usize::from(index) * 3;
        let component =
            |i: usize| dac_component(self.state.palette.get(at + i).copied().unwrap_or(0));
        (component(0) << 16) | (component(1) << 8) | component(2)
    }

    /// The colour of every 8-bit pixel value after the DAC mask (0x00RRGGBB).
    pub fn palette_lut(&self) -> [u32; 256] {
        let mut lut = [0u32; 256];
        for (value, colour) in lut.iter_mut().enumerate() {
            *colour = self.dac_rgb(value as u8 & self.state.dac_mask);
        }
        lut
    }

    pub fn latch(&self) -> u32 {
        self.state.latch
    }

    pub fn set_latch(&mut self, latch: u32) {
        self.state.latch = latch;
    }

    // ---- ports --------------------------------------------------------------------

    /// Whether `port` belongs to the CRTC/status block that misc bit 0 disables.
    fn port_disabled(&self, port: u64) -> bool {
        match port {
            0x3b0..=0x3bf => self.colour_crtc(),
            0x3d0..=0x3df => !self.colour_crtc(),
            _ => false,
        }
    }

    /// A guest read of port `0x3b0 + offset`.
    pub fn port_read(&mut self, offset: u64) -> u8 {
        if offset >= VGA_PORT_COUNT {
            return 0xff;
        }
        let port = VGA_PORT_BASE + offset;
        if self.port_disabled(port) {
            return 0xff;
        }
        let s = &mut self.state;
        match port {
            PORT_ATTRIBUTE_WRITE => s.attribute_index,
            PORT_ATTRIBUTE_READ => self.attribute(self.state.attribute_index & 0x1f),
            PORT_MISC_WRITE_STATUS0 => 0,
            PORT_SEQUENCER_INDEX => s.sequencer_index,
            PORT_SEQUENCER_DATA => self.sequencer(self.state.sequencer_index),
            PORT_DAC_MASK => s.dac_mask,
            PORT_DAC_READ_INDEX => {
                if s.dac_reading {
                    3
                } else {
                    0
                }
            }
            PORT_DAC_WRITE_INDEX => s.dac_write_index,
            PORT_DAC_DATA => {
                let at = usize::from(s.dac_read_index) * 3 + usize::from(s.dac_sub_index % 3);
                let value = s.palette.get(at).copied().unwrap_or(0);
                s.dac_sub_index += 1;
                if s.dac_sub_index >= 3 {
                    s.dac_sub_index = 0;
                    s.dac_read_index = s.dac_read_index.wrapping_add(1);
                }
                value
            }
            PORT_FEATURE_READ => s.feature_control,
            PORT_MISC_READ => s.misc_output,
            PORT_GRAPHICS_INDEX => s.graphics_index,
            PORT_GRAPHICS_DATA => self.graphics(self.state.graphics_index),
            0x3b4 | 0x3d4 => s.crtc_index,
            0x3b5 | 0x3d5 => self.crtc(self.state.crtc_index),
            0x3ba | 0x3da => {
                s.attribute_flip_flop = false;
                self.status_reads = self.status_reads.wrapping_add(1);
                if self.status_reads % 2 == 1 {
                    STATUS1_VERTICAL_RETRACE | STATUS1_DISPLAY_DISABLED
                } else {
                    0
                }
            }
            _ => 0xff,
        }
    }

    /// A guest write of `value` to port `0x3b0 + offset`.
    pub fn port_write(&mut self, offset: u64, value: u8) {
        if offset >= VGA_PORT_COUNT {
            return;
        }
        let port = VGA_PORT_BASE + offset;
        if self.port_disabled(port) {
            return;
        }
        match port {
            PORT_ATTRIBUTE_WRITE => {
                if self.state.attribute_flip_flop {
                    self.set_attribute(self.state.attribute_index & 0x1f, value);
                } else {
                    self.state.attribute_index = value & 0x3f;
                }
                self.state.attribute_flip_flop = !self.state.attribute_flip_flop;
            }
            PORT_MISC_WRITE_STATUS0 => self.state.misc_output = value,
            PORT_SEQUENCER_INDEX => self.state.sequencer_index = value,
            PORT_SEQUENCER_DATA => self.set_sequencer(self.state.sequencer_index, value),
            PORT_DAC_MASK => self.state.dac_mask = value,
            PORT_DAC_READ_INDEX => {
                self.state.dac_read_index = value;
                self.state.dac_sub_index = 0;
                self.state.dac_reading = true;
            }
            PORT_DAC_WRITE_INDEX => {
                self.state.dac_write_index = value;
                self.state.dac_sub_index = 0;
                self.state.dac_reading = false;
            }
            PORT_DAC_DATA => self.dac_data_write(value),
            PORT_GRAPHICS_INDEX => self.state.graphics_index = value,
            PORT_GRAPHICS_DATA => self.set_graphics(self.state.graphics_index, value),
            0x3b4 | 0x3d4 => self.state.crtc_index = value,
            0x3b5 | 0x3d5 => self.set_crtc(self.state.crtc_index, value),
            0x3ba | 0x3da => self.state.feature_control = value,
            _ => {}
        }
    }

    fn dac_data_write(&mut self, value: u8) {
        let s = &mut self.state;
        let sub = usize::from(s.dac_sub_index % 3);
        s.dac_pending[sub] = value & 0x3f;
        if sub == 2 {
            let at = usize::from(s.dac_write_index) * 3;
            if let Some(entry) = s.palette.get_mut(at..at + 3) {
                entry.copy_from_slice(&s.dac_pending);
            }
            s.dac_write_index = s.dac_write_index.wrapping_add(1);
            s.dac_sub_index = 0;
        } else {
            s.dac_sub_index = sub as u8 + 1;
        }
    }

    /// Programs one of the standard BIOS modes through the register ports (index/data
    /// pairs, as a BIOS does) and loads the default EGA palette into DAC 0-63 (mode 13h
    /// also gets a grey ramp at 16-31). VRAM and fonts are left alone.
    pub fn set_standard_mode(&mut self, mode: StandardMode) {
        let table = match mode {
            StandardMode::Text80x25 => &MODE_03H,
            StandardMode::Planar640x480 => &MODE_12H,
            StandardMode::Chain4_320x200 => &MODE_13H,
        };
        let port = |p: u64| p - VGA_PORT_BASE;
        self.port_write(port(PORT_MISC_WRITE_STATUS0), table.misc);
        for (i, v) in table.sequencer.iter().enumerate() {
            self.port_write(port(PORT_SEQUENCER_INDEX), i as u8);
            self.port_write(port(PORT_SEQUENCER_DATA), *v);
        }
        let crtc_index = if table.misc & 1 != 0 { 0x3d4 } else { 0x3b4 };
        // Unlock CR0-7 first.
        self.port_write(port(crtc_index), 0x11);
        self.port_write(port(crtc_index + 1), 0);
        for (i, v) in table.crtc.iter().enumerate() {
            self.port_write(port(crtc_index), i as u8);
            self.port_write(port(crtc_index + 1), *v);
        }
        for (i, v) in table.graphics.iter().enumerate() {
            self.port_write(port(PORT_GRAPHICS_INDEX), i as u8);
            self.port_write(port(PORT_GRAPHICS_DATA), *v);
        }
        self.port_read(port(crtc_index + 6)); // reset the flip-flop
        for (i, v) in table.attribute.iter().enumerate() {
            self.port_write(port(PORT_ATTRIBUTE_WRITE), i as u8);
            self.port_write(port(PORT_ATTRIBUTE_WRITE), *v);
        }
        self.port_write(port(PORT_ATTRIBUTE_WRITE), 0x20); // palette address source: video
        self.port_write(port(PORT_DAC_MASK), 0xff);
        self.port_write(port(PORT_DAC_WRITE_INDEX), 0);
        for index in 0..64u8 {
            let primary = |bit: u8| if index & (1 << bit) != 0 { 0x2a } else { 0 };
            let secondary = |bit: u8| if index & (1 << bit) != 0 { 0x15 } else { 0 };
            for (p, s) in [(2, 5), (1, 4), (0, 3)] {
                self.port_write(port(PORT_DAC_DATA), primary(p) + secondary(s));
            }
        }
        if mode == StandardMode::Chain4_320x200 {
            // DAC 0-15 are the 16 CGA colours (EGA indices of AR0-F in mode 3).
            let cga: Vec<[u8; 3]> = MODE_03H.attribute[..16]
                .iter()
                .map(|ega| {
                    let at = usize::from(*ega) * 3;
                    [
                        self.state.palette[at],
                        self.state.palette[at + 1],
                        self.state.palette[at + 2],
                    ]
                })
                .collect();
            self.port_write(port(PORT_DAC_WRITE_INDEX), 0);
            for rgb in cga {
                rgb.iter()
                    .for_each(|c| self.port_write(port(PORT_DAC_DATA), *c));
            }
            for grey in 0..16u8 {
                let level = grey * 4 + grey / 4;
                (0..3).for_each(|_| self.port_write(port(PORT_DAC_DATA), level));
            }
        }
        self.invalidate();
    }

    // ---- memory -------------------------------------------------------------------

    /// The offset inside the window GR6 maps, for an offset from 0xa0000.
    fn window_offset(&self, offset: u64) -> Option<u32> {
        if offset >= VGA_MEMORY_SIZE {
            return None;
        }
        let a = offset as u32;
        match (self.state.graphics[6] >> 2) & 3 {
            0 => Some(a),
            1 => (a < 0x10000).then_some(a),
            2 => a.checked_sub(0x10000).filter(|a| *a < 0x8000),
            _ => a.checked_sub(0x18000).filter(|a| *a < 0x8000),
        }
    }

    fn planar_in_vram(&self, planar: u32) -> bool {
        (planar as usize).saturating_mul(4) < self.vram.len()
    }

    /// A guest read at `offset` from 0xa0000 through the standard planar path: loads the
    /// latches and applies read mode 0/1. Outside the mapped window or VRAM: 0xff.
    pub fn mem_read(&mut self, offset: u64) -> u8 {
        let Some(a) = self.window_offset(offset) else {
            return 0xff;
        };
        let gr = &self.state.graphics;
        let (planar, plane) = if self.state.sequencer[4] & 0x08 != 0 {
            (a >> 2, a & 3)
        } else if gr[5] & 0x10 != 0 {
            (a & !1, u32::from(gr[4] & 2) | (a & 1))
        } else {
            (a, u32::from(gr[4] & 3))
        };
        if !self.planar_in_vram(planar) {
            return 0xff;
        }
        let latch = self.vram.read_u32(planar as usize * 4);
        self.state.latch = latch;
        if gr[5] & 0x08 == 0 {
            (latch >> (8 * plane)) as u8
        } else {
            let mut result = 0xffu8;
            for p in 0..4 {
                if gr[7] & (1 << p) != 0 {
                    let byte = (latch >> (8 * p)) as u8;
                    let colour = if gr[2] & (1 << p) != 0 { 0xff } else { 0 };
                    result &= !(byte ^ colour);
                }
            }
            result
        }
    }

    /// The 32-bit value a CPU write of `value` produces before the map mask.
    fn write_data(&self, value: u8) -> u32 {
        let gr = &self.state.graphics;
        let latch = self.state.latch;
        let rotate = u32::from(gr[3] & 7);
        let mut bit_mask = gr[8];
        let data = match gr[5] & 3 {
            0 => {
                let enabled = expand_planes(gr[1]);
                (replicate(value.rotate_right(rotate)) & !enabled)
                    | (expand_planes(gr[0]) & enabled)
            }
            1 => return latch,
            2 => expand_planes(value),
            _ => {
                bit_mask &= value.rotate_right(rotate);
                expand_planes(gr[0])
            }
        };
        let data = match (gr[3] >> 3) & 3 {
            1 => data & latch,
            2 => data | latch,
            3 => data ^ latch,
            _ => data,
        };
        let mask = replicate(bit_mask);
        (data & mask) | (latch & !mask)
    }

    /// A guest write at `offset` from 0xa0000 through the standard planar path.
    pub fn mem_write(&mut self, offset: u64, value: u8) {
        let Some(a) = self.window_offset(offset) else {
            return;
        };
        let sr4 = self.state.sequencer[4];
        let (planar, planes) = if sr4 & 0x08 != 0 {
            (a >> 2, 1u8 << (a & 3))
        } else if sr4 & 0x04 == 0 {
            (a & !1, if a & 1 != 0 { 0b1010 } else { 0b0101 })
        } else {
            (a, 0b1111)
        };
        let planes = planes & self.state.sequencer[2] & 0x0f;
        if planes == 0 || !self.planar_in_vram(planar) {
            return;
        }
        let data = self.write_data(value);
        let write_mask = expand_planes(planes);
        let at = planar as usize * 4;
        let old = self.vram.read_u32(at);
        self.vram
            .write_u32(at, (old & !write_mask) | (data & write_mask));
    }

    // ---- rendering ----------------------------------------------------------------

    fn geometry(&self) -> Geometry {
        let s = &self.state;
        let cr = |i: usize| u32::from(s.crtc[i]);
        let sr1 = s.sequencer[1];
        let gr5 = s.graphics[5];
        let format = if s.graphics[6] & 0x01 == 0 {
            PixelFormat::Text
        } else if gr5 & 0x40 != 0 {
            PixelFormat::Color256
        } else if gr5 & 0x20 != 0 {
            PixelFormat::Cga4
        } else {
            PixelFormat::Planar16
        };
        let blank = s.attribute_index & 0x20 == 0 || sr1 & 0x20 != 0;
        let columns = cr(0x01) + 1;
        let char_width = if format == PixelFormat::Text && sr1 & 0x01 == 0 {
            9
        } else {
            8
        };
        let dot_repeat = if sr1 & 0x08 != 0 { 2 } else { 1 };
        let overflow = cr(0x07);
        let max_scan_reg = cr(0x09);
        let display_end = (cr(0x12) | ((overflow & 0x02) << 7) | ((overflow & 0x40) << 3)) + 1;
        let line_compare = cr(0x18) | ((overflow & 0x10) << 4) | ((max_scan_reg & 0x40) << 3);
        let ar13 = u32::from(s.attribute[0x13] & 0x0f);
        let pan_dots = match format {
            PixelFormat::Text if char_width == 9 => {
                if ar13 >= 8 {
                    0
                } else {
                    ar13 + 1
                }
            }
            PixelFormat::Color256 => ((ar13 >> 1) & 3) * 2,
            _ => ar13 & 7,
        };
        let mut width = (columns * char_width * dot_repeat).min(MAX_SURFACE_WIDTH);
        let mut height = display_end.min(MAX_SURFACE_HEIGHT);
        if blank && (width < 64 || height < 64) {
            (width, height) = BLANK_FALLBACK;
        }
        Geometry {
            format,
            blank,
            width,
            height,
            columns,
            char_width,
            dot_repeat,
            max_scan: max_scan_reg & 0x1f,
            double_scan: (max_scan_reg >> 7) & 1,
            preset_row_scan: cr(0x08) & 0x1f,
            start_address: (((cr(0x0c) << 8) | cr(0x0d)) + ((cr(0x08) >> 5) & 3))
                & CRTC_ADDRESS_MASK,
            offset: cr(0x13) * 2,
            line_compare,
            pan_dots,
            pan_reset_at_split: s.attribute[0x10] & 0x20 != 0,
            crtc_mode: s.crtc[0x17],
            doubleword: s.crtc[0x14] & 0x40 != 0,
        }
    }

    /// The registers whose change redraws the whole screen (not the cursor: text cells
    /// track it), plus the colour table.
    fn render_key(&self) -> RenderKey {
        let s = &self.state;
        let mut registers = vec![
            s.misc_output,
            s.sequencer[1],
            s.sequencer[3],
            s.graphics[5] & 0x60,
            s.graphics[6] & 0x01,
            s.attribute_index & 0x20,
        ];
        registers.extend(
            s.crtc
                .iter()
                .enumerate()
                .filter(|(i, _)| !matches!(i, 0x0a | 0x0b | 0x0e | 0x0f))
                .map(|(_, v)| *v),
        );
        registers.extend_from_slice(&s.attribute);
        RenderKey {
            registers,
            colours: self.palette_lut().to_vec(),
        }
    }

    /// The DAC index a 4-bit attribute/planar colour selects (AR12, AR0-F, AR10, AR14).
    fn attribute_dac_index(&self, colour: u8) -> u8 {
        let ar = &self.state.attribute;
        let entry = ar[usize::from(colour & ar[0x12] & 0x0f)] & 0x3f;
        let low = if ar[0x10] & 0x80 != 0 {
            (entry & 0x0f) | ((ar[0x14] & 0x03) << 4)
        } else {
            entry
        };
        low | ((ar[0x14] & 0x0c) << 4)
    }

    /// Colours of the 16 attribute values.
    fn colours16(&self, lut: &[u32; 256]) -> [u32; 16] {
        let mut colours = [0u32; 16];
        for (value, colour) in colours.iter_mut().enumerate() {
            *colour = lut[usize::from(self.attribute_dac_index(value as u8))];
        }
        colours
    }

    /// Copies the first 256 KiB of VRAM (0xff past its end) for this refresh.
    fn snapshot_planes(&mut self) {
        self.cache.planes.resize(PLANES_BYTES, 0);
        self.vram.read(0, &mut self.cache.planes);
    }

    fn plane_byte(planes: &[u8], planar: u32, plane: u32) -> u8 {
        planes
            .get(planar as usize * 4 + plane as usize)
            .copied()
            .unwrap_or(0xff)
    }

    /// Planar offsets of the fonts for attribute bit 3 clear (map B) and set (map A).
    fn font_offsets(&self) -> [u32; 2] {
        let sr3 = self.state.sequencer[3];
        let map_b = ((sr3 >> 2) & 0x04) | (sr3 & 0x03);
        let map_a = ((sr3 >> 3) & 0x04) | ((sr3 >> 2) & 0x03);
        let offset = |map: u8| u32::from(map & 3) * 0x4000 + u32::from(map >> 2) * 0x2000;
        [offset(map_b), offset(map_a)]
    }

    fn render_text(&mut self, g: &Geometry, mut full: bool, surface: &mut Surface) -> Vec<Rect> {
        let font_offsets = self.font_offsets();
        let mut fonts = Vec::with_capacity(2 * FONT_BYTES);
        for base in font_offsets {
            for i in 0..FONT_BYTES as u32 {
                fonts.push(Self::plane_byte(&self.cache.planes, base + i, 2));
            }
        }
        if fonts != self.cache.fonts {
            full = true;
            self.cache.fonts = fonts;
        }
        let fetch = g.columns + 1;
        let cache_len = g.height as usize * fetch as usize;
        if full || self.cache.text_cells.len() != cache_len {
            self.cache.text_cells = vec![u32::MAX; cache_len];
        }
        let lut = self.palette_lut();
        let colours = self.colours16(&lut);
        let s = &self.state;
        let cursor_location = (u32::from(s.crtc[0x0e]) << 8) | u32::from(s.crtc[0x0f]);
        let frame = self.frame();
        let cursor_shown = s.crtc[0x0a] & 0x20 == 0 && frame & 8 == 0;
        let cursor_start = u32::from(s.crtc[0x0a] & 0x1f);
        let cursor_end = u32::from(s.crtc[0x0b] & 0x1f);
        let blink_enabled = s.attribute[0x10] & 0x08 != 0;
        let blink_visible = frame & 16 == 0;
        let line_graphics = s.attribute[0x10] & 0x04 != 0;
        let underline_row = u32::from(s.crtc[0x14] & 0x1f);
        let cell_px = i64::from(g.char_width * g.dot_repeat);
        let width = i64::from(g.width);
        let mut damage = DamageCollector::default();
        for scan in g.scan_plan() {
            let pan_px = i64::from(scan.pan_dots * g.dot_repeat);
            let mut span: Option<(u32, u32)> = None;
            let row = surface.row_mut(scan.y);
            for i in 0..fetch {
                let counter = scan.row_counter.wrapping_add(i) & CRTC_ADDRESS_MASK;
                let address = g.address(counter, scan.row_scan);
                let ch = Self::plane_byte(&self.cache.planes, address, 0);
                let attr = Self::plane_byte(&self.cache.planes, address, 1);
                let cursor_line = cursor_shown
                    && counter == cursor_location
                    && cursor_start <= scan.row_scan
                    && scan.row_scan <= cursor_end;
                let hidden = blink_enabled && attr & 0x80 != 0 && !blink_visible;
                let key = u32::from(ch)
                    | (u32::from(attr) << 8)
                    | (u32::from(cursor_line) << 16)
                    | (u32::from(hidden) << 17);
                let slot = scan.y as usize * fetch as usize + i as usize;
                match self.cache.text_cells.get_mut(slot) {
                    Some(cached) if *cached == key => continue,
                    Some(cached) => *cached = key,
                    None => {}
                }
                let x0 = i64::from(i) * cell_px - pan_px;
                if x0 >= width || x0 + cell_px <= 0 {
                    continue;
                }
                let glyph_at = usize::from((attr >> 3) & 1) * FONT_BYTES
                    + usize::from(ch) * 32
                    + scan.row_scan as usize;
                let glyph = self.cache.fonts.get(glyph_at).copied().unwrap_or(0);
                let mut dots = u16::from(glyph) << 1;
                if g.char_width == 9 && line_graphics && (0xc0..=0xdf).contains(&ch) {
                    dots |= u16::from(glyph & 1);
                }
                if scan.row_scan == underline_row && attr & 0x77 == 0x01 {
                    dots = 0x1ff;
                }
                if hidden {
                    dots = 0;
                }
                if cursor_line {
                    dots = 0x1ff;
                }
                let foreground = colours[usize::from(attr & 0x0f)];
                let background_index = if blink_enabled {
                    (attr >> 4) & 7
                } else {
                    attr >> 4
                };
                let background = colours[usize::from(background_index)];
                for d in 0..g.char_width {
                    let on = dots & (0x100 >> d) != 0;
                    let colour = if on { foreground } else { background };
                    for r in 0..g.dot_repeat {
                        let x = x0 + i64::from(d * g.dot_repeat + r);
                        if (0..width).contains(&x) {
                            put_pixel(row, x as u32, colour);
                        }
                    }
                }
                let left = x0.max(0) as u32;
                let right = (x0 + cell_px).min(width) as u32;
                span = Some(match span {
                    Some((a, b)) => (a.min(left), b.max(right)),
                    None => (left, right),
                });
            }
            damage.line(scan.y, span);
        }
        damage.finish()
    }

    fn render_graphics(
        &mut self,
        g: &Geometry,
        full: bool,
        dirty: &DirtyPages,
        surface: &mut Surface,
    ) -> Vec<Rect> {
        let lut = self.palette_lut();
        let colours16 = self.colours16(&lut);
        let fetch = g.columns + 1;
        let mut dots = vec![0u8; fetch as usize * 8];
        let mut damage = DamageCollector::default();
        for scan in g.scan_plan() {
            let addresses: Vec<u32> = (0..fetch)
                .map(|i| g.address(scan.row_counter.wrapping_add(i), scan.row_scan))
                .collect();
            let low = addresses.iter().copied().min().unwrap_or(0);
            let high = addresses.iter().copied().max().unwrap_or(0);
            let changed = full || dirty.any_in(low as usize * 4, (high - low + 1) as usize * 4);
            if !changed {
                damage.line(scan.y, None);
                continue;
            }
            for (i, address) in addresses.iter().enumerate() {
                let p = |plane| Self::plane_byte(&self.cache.planes, *address, plane);
                let (p0, p1, p2, p3) = (p(0), p(1), p(2), p(3));
                let out = &mut dots[i * 8..i * 8 + 8];
                match g.format {
                    PixelFormat::Color256 => {
                        for (k, value) in [p0, p1, p2, p3].iter().enumerate() {
                            out[2 * k] = *value;
                            out[2 * k + 1] = *value;
                        }
                    }
                    PixelFormat::Cga4 => {
                        for k in 0..4 {
                            let shift = 6 - 2 * k;
                            out[k] = ((p0 >> shift) & 3) | (((p2 >> shift) & 3) << 2);
                            out[k + 4] = ((p1 >> shift) & 3) | (((p3 >> shift) & 3) << 2);
                        }
                    }
                    _ => {
                        for (k, value) in out.iter_mut().enumerate() {
                            let bit = 7 - k;
                            *value = ((p0 >> bit) & 1)
                                | (((p1 >> bit) & 1) << 1)
                                | (((p2 >> bit) & 1) << 2)
                                | (((p3 >> bit) & 1) << 3);
                        }
                    }
                }
            }
            let row = surface.row_mut(scan.y);
            for x in 0..g.width {
                let dot = (x / g.dot_repeat + scan.pan_dots) as usize;
                let value = dots.get(dot).copied().unwrap_or(0);
                let colour = if g.format == PixelFormat::Color256 {
                    lut[usize::from(value)]
                } else {
                    colours16[usize::from(value & 0x0f)]
                };
                put_pixel(row, x, colour);
            }
            damage.line(scan.y, Some((0, g.width)));
        }
        damage.finish()
    }

    fn text_screen_string(&self) -> Option<String> {
        if !self.is_text_mode() {
            return None;
        }
        let g = self.geometry();
        let rows = g.height / g.scans_per_row().max(1);
        let mut lines = Vec::with_capacity(rows as usize);
        for row in 0..rows {
            let row_counter = g.start_address.wrapping_add(row.wrapping_mul(g.offset));
            let line: String = (0..g.columns)
                .map(|column| {
                    let address = g.address(row_counter.wrapping_add(column), 0);
                    cp437(self.vram.read_u8(address as usize * 4))
                })
                .collect();
            lines.push(line.trim_end().to_string());
        }
        Some(lines.join("\n"))
    }
}

impl DisplayDevice for Vga {
    fn refresh(
        &mut self,
        guest_dirty: Option<&DirtyPages>,
        surface: &mut Surface,
    ) -> RefreshOutcome {
        self.refresh_count = self.refresh_count.wrapping_add(1);
        let mut dirty = self.vram.take_dirty();
        if let Some(extra) = guest_dirty {
            dirty.merge(extra);
        }
        let g = self.geometry();
        let resized = surface.resize(g.width, g.height);
        let key = self.render_key();
        let full = resized || self.cache.force_full || self.cache.key.as_ref() != Some(&key);
        self.cache.key = Some(key);
        self.cache.force_full = false;
        let damage = if g.blank {
            if full {
                surface.pixels.fill(0);
                self.cache.text_cells.clear();
                vec![Rect::new(0, 0, g.width, g.height)]
            } else {
                Vec::new()
            }
        } else {
            self.snapshot_planes();
            match g.format {
                PixelFormat::Text => self.render_text(&g, full, surface),
                _ => self.render_graphics(&g, full, &dirty, surface),
            }
        };
        RefreshOutcome {
            resized,
            damage,
            copies: Vec::new(),
        }
    }

    fn text_screen(&self) -> Option<String> {
        self.text_screen_string()
    }
}

impl BusDevice for Vga {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.port_read(offset.saturating_add(i as u64));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            self.port_write(offset.saturating_add(i as u64), *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TestRng;

    const BLACK: u32 = 0x000000;
    const BLUE: u32 = 0x0000aa;
    const LIGHT_GREY: u32 = 0xaaaaaa;
    const YELLOW: u32 = 0xffff55;
    const WHITE: u32 = 0xffffff;
    const TEXT_MEMORY: u64 = 0x18000;

    fn new_vga() -> Vga {
        Vga::new(Vram::new(256 * 1024).unwrap())
    }

    fn out(vga: &mut Vga, port: u64, value: u8) {
        vga.port_write(port - VGA_PORT_BASE, value);
    }

    fn inb(vga: &mut Vga, port: u64) -> u8 {
        vga.port_read(port - VGA_PORT_BASE)
    }

    fn crtc_write(vga: &mut Vga, index: u8, value: u8) {
        out(vga, 0x3d4, index);
        out(vga, 0x3d5, value);
    }

    fn attribute_write(vga: &mut Vga, index: u8, value: u8) {
        inb(vga, 0x3da);
        out(vga, 0x3c0, index | 0x20);
        out(vga, 0x3c0, value);
    }

    fn dac_write(vga: &mut Vga, index: u8, rgb: [u8; 3]) {
        out(vga, 0x3c8, index);
        rgb.iter().for_each(|c| out(vga, 0x3c9, *c));
    }

    /// Loads glyph rows for `ch` into font 0 of plane 2 the way a BIOS does.
    fn load_glyph(vga: &mut Vga, ch: u8, rows: &[u8]) {
        let saved = [
            vga.sequencer(2),
            vga.sequencer(4),
            vga.graphics(4),
            vga.graphics(5),
            vga.graphics(6),
        ];
        vga.set_sequencer(2, 0x04);
        vga.set_sequencer(4, 0x06);
        vga.set_graphics(4, 0x02);
        vga.set_graphics(5, 0x00);
        vga.set_graphics(6, 0x04);
        for (line, bits) in rows.iter().enumerate() {
            vga.mem_write(u64::from(ch) * 32 + line as u64, *bits);
        }
        vga.set_sequencer(2, saved[0]);
        vga.set_sequencer(4, saved[1]);
        vga.set_graphics(4, saved[2]);
        vga.set_graphics(5, saved[3]);
        vga.set_graphics(6, saved[4]);
    }

    /// Writes a character and attribute at text cell `cell` through b8000 (odd/even).
    fn put_char(vga: &mut Vga, cell: u64, ch: u8, attr: u8) {
        vga.mem_write(TEXT_MEMORY + cell * 2, ch);
        vga.mem_write(TEXT_MEMORY + cell * 2 + 1, attr);
    }

    fn text_vga() -> Vga {
        let mut vga = new_vga();
        vga.set_standard_mode(StandardMode::Text80x25);
        vga.set_time_ns(0);
        vga
    }

    fn refresh(vga: &mut Vga, surface: &mut Surface) -> RefreshOutcome {
        vga.refresh(None, surface)
    }

    fn px(surface: &Surface, x: u32, y: u32) -> u32 {
        surface.pixel(x, y).unwrap()
    }

    #[test]
    fn text_glyph_is_drawn_in_attribute_colours() {
        let mut vga = text_vga();
        crtc_write(&mut vga, 0x0a, 0x20); // cursor off
        let mut glyph = [0u8; 16];
        glyph[2] = 0b1000_0001;
        load_glyph(&mut vga, b'A', &glyph);
        load_glyph(&mut vga, 0xc4, &glyph);
        put_char(&mut vga, 82, b'A', 0x1e); // row 1, column 2: yellow on blue
        put_char(&mut vga, 84, 0xc4, 0x1e); // line-graphics character
        let mut surface = Surface::default();
        let outcome = refresh(&mut vga, &mut surface);
        assert!(outcome.resized);
        assert_eq!((surface.width, surface.height), (720, 400));
        let (x0, y0) = (18, 16);
        assert_eq!(px(&surface, x0, y0 + 2), YELLOW);
        assert_eq!(px(&surface, x0 + 1, y0 + 2), BLUE);
        assert_eq!(px(&surface, x0 + 7, y0 + 2), YELLOW);
        assert_eq!(
            px(&surface, x0 + 8, y0 + 2),
            BLUE,
            "9th column is background"
        );
        assert_eq!(px(&surface, x0, y0), BLUE);
        assert_eq!(px(&surface, x0 + 9, y0 + 2), BLACK, "next cell is empty");
        // Line-graphics characters repeat the 8th column in the 9th.
        assert_eq!(px(&surface, 36 + 8, y0 + 2), YELLOW);
        attribute_write(&mut vga, 0x10, 0x08);
        refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 36 + 8, y0 + 2), BLUE);
        // 8-dot cells (SR1 bit 0) shrink the screen to 640 pixels.
        out(&mut vga, 0x3c4, 1);
        out(&mut vga, 0x3c5, 0x01);
        let outcome = refresh(&mut vga, &mut surface);
        assert!(outcome.resized);
        assert_eq!(surface.width, 640);
        assert_eq!(px(&surface, 16 + 7, y0 + 2), YELLOW);
    }

    #[test]
    fn cursor_shape_position_and_blink() {
        let mut vga = text_vga();
        let mut surface = Surface::default();
        put_char(&mut vga, 0, b' ', 0x07);
        refresh(&mut vga, &mut surface);
        // Mode 3 cursor: scan lines 13-14 of cell 0.
        assert_eq!(px(&surface, 0, 12), BLACK);
        assert_eq!(px(&surface, 0, 13), LIGHT_GREY);
        assert_eq!(px(&surface, 8, 14), LIGHT_GREY);
        assert_eq!(px(&surface, 0, 15), BLACK);
        // Blink: off after 8 frames, on again after 16.
        vga.set_time_ns(8 * FRAME_NS);
        let outcome = refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 13), BLACK);
        assert_eq!(outcome.damage, vec![Rect::new(0, 13, 9, 2)]);
        vga.set_time_ns(16 * FRAME_NS);
        refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 13), LIGHT_GREY);
        // Full block shape at cell 5 (drawn in the cell's foreground colour).
        put_char(&mut vga, 5, b' ', 0x07);
        crtc_write(&mut vga, 0x0a, 0x00);
        crtc_write(&mut vga, 0x0b, 0x0f);
        crtc_write(&mut vga, 0x0f, 5);
        refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 13), BLACK, "cursor left cell 0");
        assert_eq!(px(&surface, 45, 0), LIGHT_GREY);
        assert_eq!(px(&surface, 53, 15), LIGHT_GREY);
        // Start > end or the disable bit: no cursor.
        crtc_write(&mut vga, 0x0a, 0x20);
        refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 45, 0), BLACK);
    }

    #[test]
    fn blinking_characters_and_background_intensity() {
        let mut vga = text_vga();
        crtc_write(&mut vga, 0x0a, 0x20);
        load_glyph(&mut vga, b'B', &[0xff; 16]);
        put_char(&mut vga, 0, b'B', 0x87); // blinking light grey on black
        put_char(&mut vga, 1, b' ', 0xf0); // background 15, or 7 with blink enabled
        let mut surface = Surface::default();
        refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 0), LIGHT_GREY);
        assert_eq!(
            px(&surface, 9, 0),
            LIGHT_GREY,
            "blink bit masks background bit 3"
        );
        vga.set_time_ns(16 * FRAME_NS);
        let outcome = refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 0), BLACK, "blinking character hidden");
        // Both cells have the blink bit set, so both are redrawn; nothing else is.
        assert_eq!(outcome.damage, vec![Rect::new(0, 0, 18, 16)]);
        // Blink disabled: intensity background, the character stays.
        attribute_write(&mut vga, 0x10, 0x04);
        refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 0), LIGHT_GREY);
        assert_eq!(px(&surface, 9, 0), WHITE);
    }

    #[test]
    fn underline_on_the_cr14_row_for_blue_attributes() {
        let mut vga = text_vga();
        crtc_write(&mut vga, 0x0a, 0x20);
        crtc_write(&mut vga, 0x14, 0x0f);
        put_char(&mut vga, 0, b' ', 0x01);
        put_char(&mut vga, 1, b' ', 0x02);
        let mut surface = Surface::default();
        refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 15), BLUE);
        assert_eq!(px(&surface, 0, 14), BLACK);
        assert_eq!(
            px(&surface, 9, 15),
            BLACK,
            "only attribute x1 is underlined"
        );
    }

    #[test]
    fn eighty_by_fifty_with_eight_line_cells() {
        let mut vga = text_vga();
        crtc_write(&mut vga, 0x0a, 0x20);
        crtc_write(&mut vga, 0x09, 0x47);
        load_glyph(&mut vga, b'X', &[0xff; 8]);
        put_char(&mut vga, 80 * 30 + 1, b'X', 0x0f);
        let mut surface = Surface::default();
        refresh(&mut vga, &mut surface);
        assert_eq!((surface.width, surface.height), (720, 400));
        assert_eq!(px(&surface, 9, 240), WHITE);
        assert_eq!(px(&surface, 9, 247), WHITE);
        assert_eq!(px(&surface, 9, 248), BLACK);
        let text = vga.text_screen().unwrap();
        assert_eq!(text.split('\n').count(), 50);
        assert_eq!(text.split('\n').nth(30), Some(" X"));
    }

    #[test]
    fn dac_palette_and_mask_change_colours() {
        let mut vga = text_vga();
        crtc_write(&mut vga, 0x0a, 0x20);
        put_char(&mut vga, 0, b' ', 0x10);
        let mut surface = Surface::default();
        refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 0), BLUE);
        assert!(refresh(&mut vga, &mut surface).is_empty());
        dac_write(&mut vga, 1, [0x3f, 0, 0]);
        let outcome = refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 0), 0xff0000);
        assert_eq!(
            outcome.damage,
            vec![Rect::new(0, 0, 720, 400)],
            "full redraw"
        );
        assert_eq!(vga.dac_rgb(1), 0xff0000);
        out(&mut vga, 0x3c6, 0x00);
        refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 0), BLACK, "mask sends every pixel to DAC 0");
        assert_eq!(inb(&mut vga, 0x3c6), 0);
    }

    #[test]
    fn dac_indices_wrap_and_read_back() {
        let mut vga = new_vga();
        out(&mut vga, 0x3c8, 0xff);
        for value in [1, 2, 0xff, 4, 5, 6] {
            out(&mut vga, 0x3c9, value);
        }
        assert_eq!(inb(&mut vga, 0x3c8), 1);
        assert_eq!(vga.state().palette[765..], [1, 2, 0x3f]);
        assert_eq!(vga.state().palette[..3], [4, 5, 6]);
        out(&mut vga, 0x3c7, 0xff);
        assert_eq!(inb(&mut vga, 0x3c7), 3, "DAC state: reading");
        let read: Vec<u8> = (0..6).map(|_| inb(&mut vga, 0x3c9)).collect();
        assert_eq!(read, [1, 2, 0x3f, 4, 5, 6]);
        out(&mut vga, 0x3c8, 0);
        assert_eq!(inb(&mut vga, 0x3c7), 0);
        // A partial triplet does not change the entry.
        out(&mut vga, 0x3c9, 9);
        assert_eq!(vga.state().palette[..3], [4, 5, 6]);
        assert_eq!(vga.dac_rgb(255), 0x0408ff);
    }

    #[test]
    fn mode_13h_chain4_pixels_are_linear_and_doubled() {
        let mut vga = new_vga();
        vga.set_standard_mode(StandardMode::Chain4_320x200);
        dac_write(&mut vga, 5, [0x3f, 0, 0]);
        vga.mem_write(2 * 320 + 3, 5);
        assert_eq!(
            vga.vram().read_u8(2 * 320 + 3),
            5,
            "chain-4 byte A is VRAM byte A"
        );
        assert_eq!(vga.mem_read(2 * 320 + 3), 5);
        let mut surface = Surface::default();
        let outcome = refresh(&mut vga, &mut surface);
        assert!(outcome.resized);
        assert_eq!((surface.width, surface.height), (640, 400));
        for (x, y) in [(6, 4), (7, 4), (6, 5), (7, 5)] {
            assert_eq!(px(&surface, x, y), 0xff0000);
        }
        assert_eq!(px(&surface, 8, 4), BLACK);
        assert_eq!(px(&surface, 6, 6), BLACK);
        // A pixel written through the linear view (as a Cirrus LFB would) shows too.
        vga.vram_mut().write_u8(320 + 1, 5);
        let outcome = refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 2, 2), 0xff0000);
        // Damage follows 4 KiB VRAM pages: page 0 holds rows 0-12 (lines 0-25).
        assert_eq!(outcome.damage, vec![Rect::new(0, 0, 640, 26)]);
        assert!(refresh(&mut vga, &mut surface).is_empty());
        vga.mem_write(320 * 150, 5);
        let outcome = refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 300), 0xff0000);
        assert_eq!(outcome.damage.len(), 1);
        let rect = outcome.damage[0];
        assert!(rect.y <= 300 && rect.y + rect.height > 301 && rect.height <= 28);
        // Map mask: plane 1 disabled drops writes to A % 4 == 1.
        out(&mut vga, 0x3c4, 2);
        out(&mut vga, 0x3c5, 0x0d);
        vga.mem_write(1, 5);
        assert_eq!(vga.vram().read_u8(1), 0);
    }

    fn planar_vga() -> Vga {
        let mut vga = new_vga();
        vga.set_standard_mode(StandardMode::Planar640x480);
        vga
    }

    fn gr(vga: &mut Vga, index: u8, value: u8) {
        out(vga, 0x3ce, index);
        out(vga, 0x3cf, value);
    }

    #[test]
    fn mode_12h_write_modes_and_read_modes() {
        let mut vga = planar_vga();
        // Write mode 0 with set/reset to colour 0xc on the left four pixels.
        gr(&mut vga, 1, 0x0f);
        gr(&mut vga, 0, 0x0c);
        gr(&mut vga, 8, 0xf0);
        vga.mem_write(0, 0x00);
        assert_eq!(vga.vram().read_u32(0), 0xf0f0_0000);
        // Read mode 0 follows GR4; read mode 1 compares colours.
        gr(&mut vga, 4, 2);
        assert_eq!(vga.mem_read(0), 0xf0);
        gr(&mut vga, 4, 0);
        assert_eq!(vga.mem_read(0), 0x00);
        gr(&mut vga, 5, 0x08);
        gr(&mut vga, 2, 0x0c);
        assert_eq!(vga.mem_read(0), 0xf0);
        gr(&mut vga, 2, 0x00);
        assert_eq!(vga.mem_read(0), 0x0f);
        gr(&mut vga, 7, 0x00);
        assert_eq!(vga.mem_read(0), 0xff, "colour don't care everywhere");
        gr(&mut vga, 7, 0x0f);
        assert_eq!(vga.latch(), 0xf0f0_0000);
        // Write mode 1 copies the latches to row 1.
        gr(&mut vga, 5, 0x01);
        vga.mem_write(80, 0x55);
        assert_eq!(vga.vram().read_u32(80 * 4), 0xf0f0_0000);
        // Write mode 2: colour 9 on the right four pixels of row 2, latch elsewhere.
        vga.mem_read(160);
        gr(&mut vga, 5, 0x02);
        gr(&mut vga, 8, 0x0f);
        vga.mem_write(160, 0x09);
        // Write mode 3: colour 4 on pixels 0 and 2 of row 3 (rotated data & bit mask).
        vga.mem_read(240);
        gr(&mut vga, 5, 0x03);
        gr(&mut vga, 0, 0x04);
        gr(&mut vga, 8, 0xff);
        gr(&mut vga, 3, 0x01); // rotate right by 1
        vga.mem_write(240, 0b0100_0001);
        // Logical XOR with the latches in write mode 0, row 4.
        vga.mem_read(0);
        gr(&mut vga, 5, 0x00);
        gr(&mut vga, 1, 0x00);
        gr(&mut vga, 3, 0x18);
        vga.mem_write(320, 0xff);
        assert_eq!(vga.vram().read_u32(320 * 4), 0x0f0f_ffff);
        // Map mask: only plane 0 written.
        gr(&mut vga, 3, 0x00);
        out(&mut vga, 0x3c4, 2);
        out(&mut vga, 0x3c5, 0x01);
        vga.mem_write(400, 0xff);
        assert_eq!(vga.vram().read_u32(400 * 4), 0x0000_00ff);

        let mut surface = Surface::default();
        refresh(&mut vga, &mut surface);
        assert_eq!((surface.width, surface.height), (640, 480));
        let colour_c = 0xff5555;
        let colour_9 = 0x5555ff;
        let colour_4 = 0xaa0000;
        assert_eq!(px(&surface, 0, 0), colour_c);
        assert_eq!(px(&surface, 3, 0), colour_c);
        assert_eq!(px(&surface, 4, 0), BLACK);
        assert_eq!(px(&surface, 0, 1), colour_c);
        assert_eq!(px(&surface, 3, 2), BLACK);
        assert_eq!(px(&surface, 4, 2), colour_9);
        assert_eq!(px(&surface, 0, 3), colour_4);
        assert_eq!(px(&surface, 1, 3), BLACK);
        assert_eq!(px(&surface, 2, 3), colour_4);
        assert_eq!(
            px(&surface, 0, 4),
            0x0000aa | 0x00aa00,
            "planes 0+1 = colour 3"
        );
        assert_eq!(px(&surface, 4, 4), 0xffffff);
        assert_eq!(px(&surface, 0, 5), BLUE);
    }

    #[test]
    fn start_address_and_offset_move_the_picture() {
        let mut vga = new_vga();
        vga.set_standard_mode(StandardMode::Chain4_320x200);
        dac_write(&mut vga, 7, [0, 0x3f, 0]);
        vga.mem_write(640, 7);
        let mut surface = Surface::default();
        refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 4), 0x00ff00);
        crtc_write(&mut vga, 0x0c, 0);
        crtc_write(&mut vga, 0x0d, 80); // one row of 320 pixels down
        refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 4), BLACK);
        assert_eq!(px(&surface, 0, 2), 0x00ff00);
        crtc_write(&mut vga, 0x0d, 0);
        crtc_write(&mut vga, 0x13, 0x50); // 640-byte rows
        refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 2), 0x00ff00);
        assert_eq!(px(&surface, 0, 4), BLACK);
    }

    #[test]
    fn split_screen_restarts_at_address_zero() {
        let mut vga = planar_vga();
        gr(&mut vga, 1, 0x0f);
        gr(&mut vga, 0, 0x0f);
        vga.mem_write(0, 0);
        let start = 80 * 200;
        crtc_write(&mut vga, 0x0c, (start >> 8) as u8);
        crtc_write(&mut vga, 0x0d, start as u8);
        crtc_write(&mut vga, 0x18, 100);
        crtc_write(&mut vga, 0x07, 0x2e); // clear line compare bit 8
        crtc_write(&mut vga, 0x09, 0x00); // and bit 9
        let mut surface = Surface::default();
        refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 0), BLACK);
        assert_eq!(px(&surface, 0, 99), BLACK);
        assert_eq!(px(&surface, 0, 100), WHITE);
        assert_eq!(px(&surface, 0, 101), BLACK);
    }

    #[test]
    fn pel_panning_shifts_pixels_left() {
        let mut vga = planar_vga();
        gr(&mut vga, 1, 0x0f);
        gr(&mut vga, 0, 0x0f);
        gr(&mut vga, 8, 0x10); // pixel 3
        vga.mem_write(0, 0);
        let mut surface = Surface::default();
        refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 3, 0), WHITE);
        attribute_write(&mut vga, 0x13, 3);
        refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 0), WHITE);
        assert_eq!(px(&surface, 3, 0), BLACK);
    }

    #[test]
    fn damage_is_small_for_one_cell_and_empty_without_changes() {
        let mut vga = text_vga();
        let mut surface = Surface::default();
        let first = refresh(&mut vga, &mut surface);
        assert_eq!(first.damage, vec![Rect::new(0, 0, 720, 400)]);
        assert!(refresh(&mut vga, &mut surface).is_empty());
        put_char(&mut vga, 80 * 3 + 10, b'Q', 0x07);
        let outcome = refresh(&mut vga, &mut surface);
        assert!(!outcome.resized);
        assert_eq!(outcome.damage, vec![Rect::new(90, 48, 9, 16)]);
        assert!(refresh(&mut vga, &mut surface).is_empty());
        // Cursor moves: the old and the new cell only.
        crtc_write(&mut vga, 0x0f, 1);
        let outcome = refresh(&mut vga, &mut surface);
        assert_eq!(outcome.damage, vec![Rect::new(0, 13, 18, 2)]);
        // Graphics: one byte dirties one scan line.
        vga.set_standard_mode(StandardMode::Planar640x480);
        refresh(&mut vga, &mut surface);
        assert!(refresh(&mut vga, &mut surface).is_empty());
        // One byte dirties the scan lines of its 4 KiB VRAM page (1024 planar bytes).
        vga.mem_write(80 * 100, 0xff);
        let damage = refresh(&mut vga, &mut surface).damage;
        assert_eq!(damage.len(), 1);
        assert!(damage[0].y <= 100 && damage[0].y + damage[0].height > 100);
        assert!(damage[0].height <= 14 && damage[0].width == 640);
        // Guest writes reported by the caller are redrawn too.
        let mut guest = DirtyPages::new(vga.vram().len() / crate::vram::PAGE_SIZE);
        guest.mark_range(80 * 300 * 4, 4);
        let damage = vga.refresh(Some(&guest), &mut surface).damage;
        assert_eq!(damage.len(), 1);
        assert!(damage[0].y <= 300 && damage[0].y + damage[0].height > 300);
        vga.invalidate();
        assert_eq!(
            refresh(&mut vga, &mut surface).damage,
            vec![Rect::new(0, 0, 640, 480)]
        );
    }

    #[test]
    fn mode_switches_resize_the_surface() {
        let mut vga = text_vga();
        let mut surface = Surface::default();
        assert!(refresh(&mut vga, &mut surface).resized);
        assert_eq!((surface.width, surface.height), (720, 400));
        vga.set_standard_mode(StandardMode::Planar640x480);
        assert_eq!(vga.display_size(), (640, 480));
        assert!(refresh(&mut vga, &mut surface).resized);
        assert_eq!((surface.width, surface.height), (640, 480));
        vga.set_standard_mode(StandardMode::Chain4_320x200);
        assert!(refresh(&mut vga, &mut surface).resized);
        assert_eq!((surface.width, surface.height), (640, 400));
        assert!(!refresh(&mut vga, &mut surface).resized);
    }

    #[test]
    fn text_screen_reads_characters() {
        let mut vga = text_vga();
        for (i, ch) in b"Hello".iter().enumerate() {
            put_char(&mut vga, i as u64, *ch, 0x07);
        }
        for (i, ch) in [b'W', 0xc4, 0x01].iter().enumerate() {
            put_char(&mut vga, 82 + i as u64, *ch, 0x07);
        }
        put_char(&mut vga, 90, b' ', 0x07);
        let text = vga.text_screen().unwrap();
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines.len(), 25);
        assert_eq!(lines[0], "Hello");
        assert_eq!(lines[1], "  W─☺");
        assert_eq!(lines[2], "");
        assert_eq!(CP437_HIGH.chars().count(), 128);
        assert_eq!(CP437_LOW.chars().count(), 32);
        vga.set_standard_mode(StandardMode::Planar640x480);
        assert_eq!(vga.text_screen(), None);
    }

    #[test]
    fn word_writes_and_crtc_port_selection() {
        let mut vga = new_vga();
        vga.write(0x3c4 - VGA_PORT_BASE, &[0x02, 0x0f]);
        assert_eq!(vga.sequencer(2), 0x0f);
        let mut word = [0u8; 2];
        vga.read(0x3c4 - VGA_PORT_BASE, &mut word);
        assert_eq!(word, [0x02, 0x0f]);
        vga.write(0x3ce - VGA_PORT_BASE, &[0x05, 0x40]);
        assert_eq!(vga.graphics(5), 0x40);
        // Misc bit 0 clear: the CRTC is at 0x3b4.
        vga.write(0x3b4 - VGA_PORT_BASE, &[0x0c, 0x12]);
        assert_eq!(vga.crtc(0x0c), 0x12);
        vga.write(0x3d4 - VGA_PORT_BASE, &[0x0c, 0x34]);
        assert_eq!(vga.crtc(0x0c), 0x12);
        assert_eq!(inb(&mut vga, 0x3d5), 0xff);
        out(&mut vga, 0x3c2, 0x01);
        assert_eq!(inb(&mut vga, 0x3cc), 0x01);
        vga.write(0x3d4 - VGA_PORT_BASE, &[0x0c, 0x34]);
        assert_eq!(vga.crtc(0x0c), 0x34);
        assert_eq!(inb(&mut vga, 0x3b5), 0xff);
        assert_eq!(inb(&mut vga, 0x3d5), 0x34);
    }

    #[test]
    fn crtc_write_protect_keeps_cr0_to_cr7() {
        let mut vga = text_vga();
        crtc_write(&mut vga, 0x11, 0x8e);
        crtc_write(&mut vga, 0x01, 0x10);
        assert_eq!(vga.crtc(0x01), 0x4f);
        crtc_write(&mut vga, 0x07, 0x00);
        assert_eq!(
            vga.crtc(0x07),
            0x0f,
            "only the line compare bit 8 is writable"
        );
        crtc_write(&mut vga, 0x08, 0x03);
        assert_eq!(vga.crtc(0x08), 0x03);
        crtc_write(&mut vga, 0x11, 0x0e);
        crtc_write(&mut vga, 0x01, 0x10);
        assert_eq!(vga.crtc(0x01), 0x10);
    }

    #[test]
    fn attribute_flip_flop_status_and_blanking() {
        let mut vga = text_vga();
        let first = inb(&mut vga, 0x3da);
        let second = inb(&mut vga, 0x3da);
        assert_ne!(first & 0x08, second & 0x08, "vertical retrace toggles");
        assert_ne!(first & 0x01, second & 0x01);
        out(&mut vga, 0x3c0, 0x12); // index, palette source cleared: blank
        assert_eq!(inb(&mut vga, 0x3c0), 0x12);
        assert_eq!(inb(&mut vga, 0x3c1), 0x0f);
        out(&mut vga, 0x3c0, 0x07);
        assert_eq!(vga.attribute(0x12), 0x07);
        assert_eq!(vga.crtc(0x24), 0x00);
        out(&mut vga, 0x3c0, 0x10);
        assert_eq!(vga.crtc(0x24), 0x80, "flip-flop now at data");
        inb(&mut vga, 0x3da);
        assert_eq!(vga.crtc(0x24), 0x00, "status read resets the flip-flop");
        put_char(&mut vga, 0, b' ', 0x70);
        let mut surface = Surface::default();
        refresh(&mut vga, &mut surface);
        assert!(
            surface.pixels.iter().all(|b| *b == 0),
            "blank while the CPU owns the palette"
        );
        out(&mut vga, 0x3c0, 0x20);
        refresh(&mut vga, &mut surface);
        assert_eq!(px(&surface, 0, 0), LIGHT_GREY);
    }

    #[test]
    fn memory_map_select_decodes_the_window() {
        let mut vga = text_vga();
        // Mode 3 maps b8000-bffff only.
        vga.mem_write(0, 0x41);
        assert_eq!(vga.vram().read_u32(0), 0);
        assert_eq!(vga.mem_read(0x10000), 0xff);
        vga.mem_write(TEXT_MEMORY + 1, 0x1f);
        assert_eq!(vga.vram().read_u8(1), 0x1f, "odd byte goes to plane 1");
        assert_eq!(vga.mem_read(TEXT_MEMORY + 1), 0x1f);
        assert_eq!(vga.mem_read(0x20000), 0xff);
        vga.mem_write(u64::MAX, 1);
        gr(&mut vga, 6, 0x0a); // b0000-b7fff
        vga.mem_write(0x10002, 0x42);
        assert_eq!(vga.vram().read_u8(2 * 4), 0x42);
        assert_eq!(vga.mem_read(0x18000), 0xff);
    }

    #[test]
    fn small_vram_clips_planar_access() {
        let mut vga = Vga::new(Vram::new(16 * 1024).unwrap());
        vga.set_standard_mode(StandardMode::Planar640x480);
        vga.mem_write(0x8000, 0xff);
        assert_eq!(vga.mem_read(0x8000), 0xff);
        assert!(vga.vram_mut().take_dirty().is_empty(), "nothing written");
        vga.mem_write(0x0fff, 0xff);
        assert_eq!(vga.vram().read_u32(0x0fff * 4), 0xffff_ffff);
        let mut surface = Surface::default();
        refresh(&mut vga, &mut surface);
        assert_eq!((surface.width, surface.height), (640, 480));
    }

    #[test]
    fn cga_four_colour_mode_uses_interleaved_banks() {
        let mut vga = new_vga();
        vga.set_standard_mode(StandardMode::Text80x25);
        // Mode 4 style: CGA shift mode, CGA bank addressing, odd/even, dot clock / 2.
        crtc_write(&mut vga, 0x11, 0x0e); // unprotect CR0-7
        out(&mut vga, 0x3c4, 1);
        out(&mut vga, 0x3c5, 0x09);
        crtc_write(&mut vga, 0x01, 0x27);
        crtc_write(&mut vga, 0x09, 0xc1);
        crtc_write(&mut vga, 0x13, 0x14);
        crtc_write(&mut vga, 0x17, 0xa2);
        gr(&mut vga, 5, 0x30);
        gr(&mut vga, 6, 0x0f);
        for (i, v) in [0u8, 0x13, 0x15, 0x17].iter().enumerate() {
            attribute_write(&mut vga, i as u8, *v);
        }
        attribute_write(&mut vga, 0x10, 0x01);
        // Line 0 (bank 0): first pixel colour 3; line 1 (bank 1 at 0x2000): colour 1.
        vga.mem_write(TEXT_MEMORY, 0b1100_0000);
        vga.mem_write(TEXT_MEMORY + 0x2000 + 1, 0b0100_0000);
        let mut surface = Surface::default();
        refresh(&mut vga, &mut surface);
        assert_eq!((surface.width, surface.height), (640, 400));
        let colour3 = vga.dac_rgb(0x17);
        let colour1 = vga.dac_rgb(0x13);
        assert_eq!(px(&surface, 0, 0), colour3);
        assert_eq!(px(&surface, 1, 1), colour3);
        assert_eq!(px(&surface, 2, 0), BLACK);
        assert_eq!(
            px(&surface, 8, 2),
            colour1,
            "odd byte = pixels 4-7, odd line"
        );
        assert_eq!(px(&surface, 8, 0), BLACK);
    }

    #[test]
    fn hostile_ports_and_memory_never_panic_and_stay_bounded() {
        let mut rng = TestRng(0x5eed_1234_abcd_0001);
        let mut vga = new_vga();
        let mut surface = Surface::default();
        for round in 0..40_000u32 {
            let r = rng.next();
            match r % 4 {
                0 | 1 => vga.port_write((r >> 8) % 0x40, (r >> 16) as u8),
                2 => vga.mem_write((r >> 8) % 0x30000, (r >> 32) as u8),
                _ => {
                    vga.port_read((r >> 8) % 0x40);
                    vga.mem_read((r >> 8) % 0x30000);
                }
            }
            if round % 4000 == 0 {
                // Make sure some rounds render with the screen on.
                out(&mut vga, 0x3c0, 0x20);
                vga.set_sequencer(1, vga.sequencer(1) & !0x20);
                let outcome = refresh(&mut vga, &mut surface);
                assert!(surface.width <= MAX_SURFACE_WIDTH);
                assert!(surface.height <= MAX_SURFACE_HEIGHT);
                assert_eq!(
                    surface.pixels.len(),
                    surface.stride * surface.height as usize
                );
                for rect in outcome.damage {
                    assert!(rect.x + rect.width <= surface.width);
                    assert!(rect.y + rect.height <= surface.height);
                }
                let _ = vga.text_screen();
            }
        }
        assert_eq!(vga.vram().len(), 256 * 1024);
    }

    #[test]
    fn huge_crtc_values_clamp_the_surface() {
        // Text, 16-colour, CGA and 256-colour shift modes.
        for (graphics, gr5) in [(0x00u8, 0x00u8), (0x01, 0x00), (0x01, 0x20), (0x01, 0x40)] {
            let mut vga = new_vga();
            vga.set_standard_mode(StandardMode::Text80x25);
            crtc_write(&mut vga, 0x11, 0x00);
            for index in 0..CRTC_COUNT as u8 {
                if index != 0x11 {
                    crtc_write(&mut vga, index, 0xff);
                }
            }
            out(&mut vga, 0x3c4, 1);
            out(&mut vga, 0x3c5, 0x08);
            gr(&mut vga, 5, gr5);
            gr(&mut vga, 6, 0x0c | graphics);
            attribute_write(&mut vga, 0x13, 0x0f);
            let mut surface = Surface::default();
            refresh(&mut vga, &mut surface);
            assert_eq!(surface.width, MAX_SURFACE_WIDTH);
            assert_eq!(surface.height, 1024);
            let _ = vga.text_screen();
        }
    }

    #[test]
    fn state_round_trips_and_hostile_state_is_sanitized() {
        let mut vga = text_vga();
        dac_write(&mut vga, 3, [1, 2, 3]);
        let state = vga.state();
        let mut other = new_vga();
        other.restore(state.clone());
        assert_eq!(other.state(), state);
        assert_eq!(other.dac_rgb(3), vga.dac_rgb(3));
        let hostile = VgaState {
            sequencer: [0xff; SEQUENCER_COUNT],
            palette: vec![0xff; 5],
            dac_sub_index: 200,
            dac_write_index: 0xff,
            attribute: [0xff; ATTRIBUTE_COUNT],
            ..VgaState::default()
        };
        other.restore(hostile);
        let restored = other.state();
        assert_eq!(restored.palette.len(), PALETTE_BYTES);
        assert!(restored.palette.iter().all(|v| *v <= 0x3f));
        assert_eq!(restored.sequencer[4], 0x0e);
        assert!(restored.dac_sub_index < 3);
        for _ in 0..9 {
            out(&mut other, 0x3c9, 0xff);
            inb(&mut other, 0x3c9);
        }
        let mut surface = Surface::default();
        refresh(&mut other, &mut surface);
        other.reset();
        assert_eq!(other.state(), VgaState::default());
    }
}
