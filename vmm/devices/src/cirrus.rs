//! The Cirrus Logic CL-GD5446 PCI display card (PCI 1013:00b8, subsystem 1af4:1100, class
//! 0x030000, revision 0 as QEMU's `cirrus-vga`), wrapping the standard VGA core of
//! [`crate::vga`]. The BitBLT engine lives in [`crate::cirrus_blit`].
//!
//! Emulated: the extended sequencer (SR06 unlock returning 0x12 for a written 0x12/0x92,
//! SR07 extended mode / bits per pixel, scratch and clock registers, SR0F/SR15/SR17/SR1F
//! memory configuration as QEMU reports a 4 MiB 5446, SR10/SR11 cursor position with the
//! low three bits in index bits 7:5, SR12 cursor attributes, SR13 cursor pattern), the
//! extended graphics controller (GR00/GR01 full 8-bit colours, GR05 write modes 4/5, GR09/
//! GR0A bank offsets, GR0B 4/16 KiB granularity, dual banks, extended write modes and
//! by-8/by-16 addressing, GR0E, GR10-GR15 colour high bytes, GR20-GR3F blitter), the
//! extended CRTC (CR19-CR1D, CR1A interlace, CR1B/CR1D start address and offset bits, CR25
//! part status, CR27 = 0xb8 device ID; CR22/CR24/CR26 from the VGA core), the hidden DAC
//! register (read 0x3c6 four times, then the next read or write reaches it: 15 or 16 bpp),
//! the hidden palette entries 0 and 15 for the cursor colours (SR12 bit 1 redirects 0x3c9),
//! banked access through 0xa0000 (two 32 KiB windows with dual banks), write modes 4 and 5
//! (colour expansion of CPU bytes at 8 and 16 bpp), the memory-mapped blitter registers at
//! 0xb8000 (SR17 bits 2/6) and at the top of the linear aperture, BAR0 (32 MiB: linear VRAM
//! at 0, the system-to-video blit source window at 16 MiB), BAR1 (4 KiB: 0x00-0xff are the
//! VGA ports 0x3c0.., 0x100.. the blitter registers), the expansion ROM BAR, the hardware
//! cursor (32x32 and 64x64, two planes: transparent, inverted, colour 0, colour 15), and
//! rendering of the extended modes: 8 bpp through the DAC, 15 bpp (555), 16 bpp (565),
//! 24 bpp and 32 bpp, from the start address (CR0C/CR0D + CR1B bits 0/2/3 + CR1D bit 7, in
//! units of 4 bytes) with the pitch (CR13 + CR1B bit 4, in units of 8 bytes), the size
//! from CR01/CR12/CR07 (CR1A bit 0 doubles the height), scan lines repeated per CR09
//! (max scan line and double scan). Only scan lines on dirty VRAM pages are recomposed; a
//! mode or palette change redraws everything. Screen-to-screen blits inside the visible
//! screen are reported as copy rectangles.
//!
//! Not emulated: the byte-swapping apertures of BAR0, video-to-system blits, the line
//! draw engine, video capture / overlay (CR1D bits 0-6 other than the start address bit),
//! dual-scan / interlaced rendering beyond doubling the height, line compare (split
//! screen) in extended modes, SR06 locking (extensions always respond, as on QEMU: Linux's
//! driver never unlocks), the attribute controller in extended modes (pixels index the
//! DAC directly), DDC / I2C (SR08), power management states (GR0E is storage), and the
//! memory size above 4 MiB in SR0F/SR15 (an 8 or 16 MiB card reports 4 MiB to the BIOS;
//! the linear aperture and the blitter address the whole VRAM).
//!
//! # API the engine calls
//!
//! * [`CirrusVga::new`]`(vram, rom) -> Result<CirrusVga, CirrusError>` (VRAM of 4, 8 or
//!   16 MiB; ROM empty or a 55 AA image of at most 128 KiB).
//! * Legacy ports 0x3b0..0x3e0: [`CirrusVga::vga_port_read`]/[`CirrusVga::vga_port_write`]
//!   `(offset from 0x3b0, &mut [u8] / &[u8])`; a wide access covers consecutive ports.
//! * Legacy window 0xa0000..0xc0000: [`CirrusVga::window_read`]/[`CirrusVga::window_write`]
//!   `(offset from 0xa0000, bytes)`. [`CirrusPorts`] and [`CirrusWindow`] wrap a shared
//!   card as [`BusDevice`]s for those two ranges.
//! * PCI: [`PciFunction`] (config space, `bar_read`/`bar_write` for BAR0 = [`BAR_LINEAR`],
//!   BAR1 = [`BAR_MMIO`] and [`ROM_BAR`], `reset`).
//! * Linear framebuffer: map [`CirrusVga::vram`]`().memory()` at BAR0 offset 0 as a dirty-
//!   logged KVM slot while [`CirrusVga::linear_direct_ok`] is true; trap BAR0 to
//!   `bar_write(BAR_LINEAR, ..)` otherwise. The answer can change after any port, window,
//!   BAR0 or BAR1 write: re-check after those. BAR0 offsets from [`BLIT_SOURCE_WINDOW`] on
//!   are never VRAM and always trap.
//! * Display: [`DisplayDevice`] (`refresh` with the KVM dirty log of the LFB slot,
//!   `cursor`, `text_screen`), plus [`CirrusVga::compose_cursor`] for consumers without a
//!   cursor channel (draw into a copy of the surface, never into the one `refresh` keeps).
//! * Save/restore: [`CirrusVga::state`]/[`CirrusVga::restore`] (a blit waiting for CPU data
//!   is not saved, as on QEMU).

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::cirrus_blit::{
    BlitRegisters, BlitStart, Blitter, VideoCopy, STATUS_AUTOSTART, STATUS_BUSY, STATUS_FIFO_USED,
    STATUS_RESET, STATUS_START,
};
use crate::display::{
    CopyRect, CursorImage, CursorState, DisplayDevice, Rect, RefreshOutcome, Surface,
    SURFACE_BYTES_PER_PIXEL,
};
use crate::pci::{PciConfigSpace, PciFunction, ROM_BAR};
use crate::vga::{Vga, VgaState, MAX_SURFACE_HEIGHT, MAX_SURFACE_WIDTH};
use crate::vram::{DirtyPages, Vram};

pub const VENDOR_CIRRUS: u16 = 0x1013;
pub const DEVICE_CLGD5446: u16 = 0x00b8;
pub const SUBSYSTEM_VENDOR: u16 = 0x1af4;
pub const SUBSYSTEM_ID: u16 = 0x1100;
/// Display controller / VGA compatible.
pub const CLASS_VGA: u32 = 0x03_00_00;
/// The part ID CR27 reports (QEMU's `CIRRUS_ID_CLGD5446`).
pub const CR27_ID_CLGD5446: u8 = 0xb8;

/// BAR0: linear framebuffer and blit source window.
pub const BAR_LINEAR: usize = 0;
/// BAR1: memory-mapped VGA and blitter registers.
pub const BAR_MMIO: usize = 1;
pub const LINEAR_BAR_SIZE: u64 = 32 << 20;
pub const MMIO_BAR_SIZE: u64 = 4096;
/// BAR0 offset of the system-to-video blit source window (writes feed the blitter).
pub const BLIT_SOURCE_WINDOW: u64 = 0x100_0000;
const BLIT_SOURCE_WINDOW_SIZE: u64 = 0x40_0000;
/// Largest VGA BIOS the card accepts (the 0xc0000..0xe0000 option ROM area).
pub const MAX_ROM_SIZE: usize = 128 * 1024;
/// Memory the BIOS is told about (SR0F = 0x98).
const REPORTED_MEMORY: usize = 4 << 20;
/// The hardware cursor patterns live in the last 16 KiB of the reported memory.
const CURSOR_AREA: usize = 16 * 1024;

const PORT_SEQUENCER_INDEX: u64 = 0x14;
const PORT_SEQUENCER_DATA: u64 = 0x15;
const PORT_DAC_MASK: u64 = 0x16;
const PORT_DAC_READ_INDEX: u64 = 0x17;
const PORT_DAC_WRITE_INDEX: u64 = 0x18;
const PORT_DAC_DATA: u64 = 0x19;
const PORT_GRAPHICS_INDEX: u64 = 0x1e;
const PORT_GRAPHICS_DATA: u64 = 0x1f;
const PORT_CRTC_INDEX_MONO: u64 = 0x04;
const PORT_CRTC_DATA_MONO: u64 = 0x05;
const PORT_CRTC_INDEX_COLOUR: u64 = 0x24;
const PORT_CRTC_DATA_COLOUR: u64 = 0x25;

/// SR07 bit 0: extended (SVGA) mode.
const SR07_EXTENDED: u8 = 0x01;
/// SR12 bits.
const CURSOR_SHOW: u8 = 0x01;
const CURSOR_HIDDEN_PALETTE: u8 = 0x02;
const CURSOR_LARGE: u8 = 0x04;
/// SR17: memory-mapped I/O enable and "at the top of the linear aperture" select.
const SR17_MMIO_ENABLE: u8 = 0x04;
const SR17_MMIO_LINEAR: u8 = 0x40;
/// GR0B bits.
const GR0B_DUAL_BANK: u8 = 0x01;
const GR0B_BY8: u8 = 0x02;
const GR0B_EXTENDED_WRITE_MODES: u8 = 0x04;
const GR0B_BY16: u8 = 0x14;
const GR0B_16K_GRANULARITY: u8 = 0x20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CirrusError {
    #[error("video memory of {0} bytes is not supported: the CL-GD5446 takes 4, 8 or 16 MiB")]
    VramSize(usize),
    #[error("the VGA BIOS image has {0} bytes; at most {MAX_ROM_SIZE} fit the option ROM area")]
    RomTooLarge(usize),
    #[error("the VGA BIOS image does not start with the 55 AA option ROM signature")]
    RomSignature,
}

/// The card's own registers (the standard ones are in [`VgaState`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CirrusRegisters {
    pub sequencer_index: u8,
    pub graphics_index: u8,
    pub crtc_index: u8,
    /// SR00..SR1F (SR00-SR04 live in the VGA core).
    pub sequencer: Vec<u8>,
    /// GR00..GR3F: GR00/GR01 full 8-bit colours, GR05 with the extended write modes,
    /// GR09.. the extensions (GR02-GR08 live in the VGA core).
    pub graphics: Vec<u8>,
    /// CR19..CR27 at their index (CR00-CR18 live in the VGA core).
    pub crtc: Vec<u8>,
    pub cursor_x: u16,
    pub cursor_y: u16,
    pub hidden_dac_reads: u8,
    pub hidden_dac: u8,
    /// 16 RGB triplets (6-bit); entries 0 and 15 are the cursor colours.
    pub hidden_palette: Vec<u8>,
    pub dac_read_index: u8,
    pub dac_write_index: u8,
    pub dac_sub_index: u8,
}

impl CirrusRegisters {
    fn power_on() -> Self {
        let mut regs = Self {
            sequencer_index: 0,
            graphics_index: 0,
            crtc_index: 0,
            sequencer: vec![0; 0x20],
            graphics: vec![0; 0x40],
            crtc: vec![0; 0x28],
            cursor_x: 0,
            cursor_y: 0,
            hidden_dac_reads: 0,
            hidden_dac: 0,
            hidden_palette: vec![0; 48],
            dac_read_index: 0,
            dac_write_index: 0,
            dac_sub_index: 0,
        };
        // QEMU's cirrus_reset for the 5446: 4 MiB, 64-bit memory, PCI bus.
        regs.sequencer[0x06] = 0x0f;
        regs.sequencer[0x0f] = 0x98;
        regs.sequencer[0x15] = 0x04;
        regs.sequencer[0x17] = 0x20;
        regs.sequencer[0x1f] = 0x2d;
        regs.graphics[0x18] = 0x0f;
        regs.crtc[0x27] = CR27_ID_CLGD5446;
        regs
    }

    fn sanitized(mut self) -> Self {
        self.sequencer.resize(0x20, 0);
        self.graphics.resize(0x40, 0);
        self.crtc.resize(0x28, 0);
        self.hidden_palette.resize(48, 0);
        self.hidden_palette.iter_mut().for_each(|v| *v &= 0x3f);
        self.crtc[0x27] = CR27_ID_CLGD5446;
        self.cursor_x &= 0x7ff;
        self.cursor_y &= 0x7ff;
        self.dac_sub_index %= 3;
        self.hidden_dac_reads = self.hidden_dac_reads.min(4);
        self
    }

    fn sr(&self, index: usize) -> u8 {
        self.sequencer.get(index).copied().unwrap_or(0)
    }

    fn gr(&self, index: usize) -> u8 {
        self.graphics.get(index).copied().unwrap_or(0)
    }

    fn cr(&self, index: usize) -> u8 {
        self.crtc.get(index).copied().unwrap_or(0)
    }
}

/// Everything that survives save/restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CirrusState {
    pub vga: VgaState,
    pub cirrus: CirrusRegisters,
    pub config: PciConfigSpace,
}

/// Pixel layout of an extended mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Depth {
    Palette8,
    Rgb555,
    Rgb565,
    Rgb888,
    Xrgb8888,
}

impl Depth {
    fn bytes_per_pixel(self) -> usize {
        match self {
            Depth::Palette8 => 1,
            Depth::Rgb555 | Depth::Rgb565 => 2,
            Depth::Rgb888 => 3,
            Depth::Xrgb8888 => 4,
        }
    }
}

/// What the CRTC shows in an extended mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ExtendedMode {
    width: u32,
    height: u32,
    depth: Depth,
    /// Byte address of the first pixel.
    start: usize,
    /// Bytes from one source line to the next.
    pitch: usize,
    /// Output lines per source line (max scan line + 1, doubled by CR09 bit 7).
    repeat: u32,
    blank: bool,
}

#[derive(Default)]
struct RenderCache {
    extended: bool,
    mode: Option<ExtendedMode>,
    palette: Option<[u32; 256]>,
}

/// The CL-GD5446.
pub struct CirrusVga {
    vga: Vga,
    config: PciConfigSpace,
    rom: Vec<u8>,
    regs: CirrusRegisters,
    blitter: Blitter,
    cache: RenderCache,
    pending_copies: Vec<CopyRect>,
}

fn c6_to_8(v: u8) -> u32 {
    let v = u32::from(v & 0x3f);
    (v << 2) | (v >> 4)
}

fn c5_to_8(v: u16) -> u32 {
    let v = u32::from(v & 0x1f);
    (v << 3) | (v >> 2)
}

impl CirrusVga {
    /// A card on `vram` (4, 8 or 16 MiB) with the VGA BIOS `rom` (empty: no ROM BAR).
    pub fn new(vram: Vram, rom: Vec<u8>) -> Result<Self, CirrusError> {
        if ![4usize << 20, 8 << 20, 16 << 20].contains(&vram.len()) {
            return Err(CirrusError::VramSize(vram.len()));
        }
        if rom.len() > MAX_ROM_SIZE {
            return Err(CirrusError::RomTooLarge(rom.len()));
        }
        if !rom.is_empty() && !rom.starts_with(&[0x55, 0xaa]) {
            return Err(CirrusError::RomSignature);
        }
        let mut config = PciConfigSpace::new();
        config.set_ids(VENDOR_CIRRUS, DEVICE_CLGD5446);
        config.set_revision(0);
        config.set_class(CLASS_VGA);
        config.set_subsystem(SUBSYSTEM_VENDOR, SUBSYSTEM_ID);
        config.add_memory_bar(BAR_LINEAR, LINEAR_BAR_SIZE, true, false);
        config.add_memory_bar(BAR_MMIO, MMIO_BAR_SIZE, false, false);
        if !rom.is_empty() {
            config.set_rom_bar(rom.len() as u64);
        }
        Ok(Self {
            vga: Vga::new(vram),
            config,
            rom,
            regs: CirrusRegisters::power_on(),
            blitter: Blitter::new(),
            cache: RenderCache::default(),
            pending_copies: Vec::new(),
        })
    }

    pub fn vram(&self) -> &Vram {
        self.vga.vram()
    }

    pub fn vram_mut(&mut self) -> &mut Vram {
        self.vga.vram_mut()
    }

    /// The wrapped VGA core (e.g. for [`Vga::set_time_ns`]).
    pub fn vga(&self) -> &Vga {
        &self.vga
    }

    pub fn vga_mut(&mut self) -> &mut Vga {
        &mut self.vga
    }

    /// Machine reset of the card (the PCI header is reset by [`PciFunction::reset`]).
    pub fn reset_card(&mut self) {
        self.vga.reset();
        self.regs = CirrusRegisters::power_on();
        self.blitter.reset();
        self.cache = RenderCache::default();
        self.pending_copies.clear();
    }

    pub fn state(&self) -> CirrusState {
        CirrusState {
            vga: self.vga.state(),
            cirrus: self.regs.clone(),
            config: self.config.clone(),
        }
    }

    pub fn restore(&mut self, state: CirrusState) {
        self.vga.restore(state.vga);
        self.regs = state.cirrus.sanitized();
        self.config = state.config;
        self.blitter.reset();
        self.cache = RenderCache::default();
        self.pending_copies.clear();
    }

    fn addr_mask(&self) -> usize {
        self.vram().len() - 1
    }

    fn extended(&self) -> bool {
        self.regs.sr(0x07) & SR07_EXTENDED != 0
    }

    /// Whether the engine may map VRAM straight into BAR0 (guest writes never exit). False
    /// while a system-to-video blit waits for data, in extended write modes 4/5, with
    /// by-8/by-16 addressing, or with the blitter registers at the top of the aperture.
    pub fn linear_direct_ok(&self) -> bool {
        let gr0b = self.regs.gr(0x0b);
        let write_mode = self.regs.gr(0x05) & 7;
        !(self.blitter.is_waiting_for_source()
            || self.regs.sr(0x17) & (SR17_MMIO_ENABLE | SR17_MMIO_LINEAR)
                == SR17_MMIO_ENABLE | SR17_MMIO_LINEAR
            || gr0b & GR0B_BY16 == GR0B_BY16
            || gr0b & GR0B_BY8 != 0
            || ((4..=5).contains(&write_mode) && gr0b & GR0B_EXTENDED_WRITE_MODES != 0))
    }

    // ---- ports ----------------------------------------------------------------------

    fn crtc_ports(&self) -> (u64, u64) {
        if self.vga.misc_output() & 1 != 0 {
            (PORT_CRTC_INDEX_COLOUR, PORT_CRTC_DATA_COLOUR)
        } else {
            (PORT_CRTC_INDEX_MONO, PORT_CRTC_DATA_MONO)
        }
    }

    /// Guest reads ports `0x3b0 + offset ..` (one byte per port).
    pub fn vga_port_read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.port_read_byte(offset.saturating_add(i as u64));
        }
    }

    /// Guest writes ports `0x3b0 + offset ..` (a 16-bit OUT to an index port sets index
    /// and data).
    pub fn vga_port_write(&mut self, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            self.port_write_byte(offset.saturating_add(i as u64), *byte);
        }
    }

    fn port_read_byte(&mut self, offset: u64) -> u8 {
        if (PORT_DAC_READ_INDEX..=PORT_DAC_DATA).contains(&offset) {
            self.regs.hidden_dac_reads = 0;
        }
        let (_, crtc_data) = self.crtc_ports();
        match offset {
            PORT_SEQUENCER_DATA => self.sequencer_read(),
            PORT_GRAPHICS_DATA => self.graphics_read(self.regs.graphics_index),
            PORT_DAC_MASK => {
                self.regs.hidden_dac_reads += 1;
                if self.regs.hidden_dac_reads >= 5 {
                    self.regs.hidden_dac_reads = 0;
                    self.regs.hidden_dac
                } else {
                    self.vga.port_read(offset)
                }
            }
            PORT_DAC_DATA if self.regs.sr(0x12) & CURSOR_HIDDEN_PALETTE != 0 => {
                let at = usize::from(self.regs.dac_read_index & 0x0f) * 3
                    + usize::from(self.regs.dac_sub_index % 3);
                let value = self.regs.hidden_palette.get(at).copied().unwrap_or(0);
                self.advance_dac(false);
                value
            }
            PORT_DAC_DATA => {
                self.advance_dac(false);
                self.vga.port_read(offset)
            }
            _ if offset == crtc_data && self.regs.crtc_index > 0x18 => {
                self.crtc_read(self.regs.crtc_index)
            }
            _ => self.vga.port_read(offset),
        }
    }

    fn port_write_byte(&mut self, offset: u64, value: u8) {
        if (PORT_DAC_READ_INDEX..=PORT_DAC_DATA).contains(&offset) {
            self.regs.hidden_dac_reads = 0;
        }
        let (crtc_index, crtc_data) = self.crtc_ports();
        match offset {
            PORT_SEQUENCER_INDEX => {
                self.regs.sequencer_index = value;
                self.vga.port_write(offset, value);
            }
            PORT_SEQUENCER_DATA => self.sequencer_write(value),
            PORT_GRAPHICS_INDEX => {
                self.regs.graphics_index = value;
                self.vga.port_write(offset, value);
            }
            PORT_GRAPHICS_DATA => self.graphics_write(self.regs.graphics_index, value),
            PORT_DAC_MASK => {
                if self.regs.hidden_dac_reads == 4 {
                    self.regs.hidden_dac = value;
                } else {
                    self.vga.port_write(offset, value);
                }
                self.regs.hidden_dac_reads = 0;
            }
            PORT_DAC_READ_INDEX => {
                self.regs.dac_read_index = value;
                self.regs.dac_sub_index = 0;
                self.vga.port_write(offset, value);
            }
            PORT_DAC_WRITE_INDEX => {
                self.regs.dac_write_index = value;
                self.regs.dac_sub_index = 0;
                self.vga.port_write(offset, value);
            }
            PORT_DAC_DATA if self.regs.sr(0x12) & CURSOR_HIDDEN_PALETTE != 0 => {
                let at = usize::from(self.regs.dac_write_index & 0x0f) * 3
                    + usize::from(self.regs.dac_sub_index % 3);
                if let Some(entry) = self.regs.hidden_palette.get_mut(at) {
                    *entry = value & 0x3f;
                }
                self.advance_dac(true);
            }
            PORT_DAC_DATA => {
                self.advance_dac(true);
                self.vga.port_write(offset, value);
            }
            _ if offset == crtc_index => {
                self.regs.crtc_index = value;
                self.vga.port_write(offset, value);
            }
            _ if offset == crtc_data && self.regs.crtc_index > 0x18 => {
                self.crtc_write(self.regs.crtc_index, value)
            }
            _ => self.vga.port_write(offset, value),
        }
    }

    /// Mirrors the DAC's R/G/B step (for the hidden palette).
    fn advance_dac(&mut self, write: bool) {
        self.regs.dac_sub_index += 1;
        if self.regs.dac_sub_index >= 3 {
            self.regs.dac_sub_index = 0;
            if write {
                self.regs.dac_write_index = self.regs.dac_write_index.wrapping_add(1);
            } else {
                self.regs.dac_read_index = self.regs.dac_read_index.wrapping_add(1);
            }
        }
    }

    fn sequencer_read(&mut self) -> u8 {
        let index = self.regs.sequencer_index;
        match index {
            0x00..=0x04 => self.vga.port_read(PORT_SEQUENCER_DATA),
            _ if index & 0x1f == 0x10 || index & 0x1f == 0x11 => {
                self.regs.sr(usize::from(index & 0x1f))
            }
            0x05..=0x1f => self.regs.sr(usize::from(index)),
            _ => 0xff,
        }
    }

    fn sequencer_write(&mut self, value: u8) {
        let index = self.regs.sequencer_index;
        let sr = &mut self.regs.sequencer;
        match index {
            0x00..=0x04 => self.vga.port_write(PORT_SEQUENCER_DATA, value),
            _ if index & 0x1f == 0x10 => {
                sr[0x10] = value;
                self.regs.cursor_x = (u16::from(value) << 3) | u16::from(index >> 5);
            }
            _ if index & 0x1f == 0x11 => {
                sr[0x11] = value;
                self.regs.cursor_y = (u16::from(value) << 3) | u16::from(index >> 5);
            }
            0x06 => sr[0x06] = if value & 0x17 == 0x12 { 0x12 } else { 0x0f },
            0x17 => sr[0x17] = (sr[0x17] & 0x38) | (value & 0xc7),
            0x05 | 0x07..=0x1f => sr[usize::from(index)] = value,
            _ => {}
        }
    }

    fn graphics_read(&mut self, index: u8) -> u8 {
        match index {
            0x00 | 0x01 | 0x05 => self.regs.gr(usize::from(index)),
            0x02..=0x08 => self.vga.graphics(index),
            0x09..=0x39 => self.regs.gr(usize::from(index)),
            _ => 0xff,
        }
    }

    fn graphics_write(&mut self, index: u8, value: u8) {
        let i = usize::from(index);
        match index {
            0x00 | 0x01 => {
                self.regs.graphics[i] = value;
                self.vga.set_graphics(index, value);
            }
            0x05 => {
                self.regs.graphics[i] = value & 0x7f;
                self.vga.set_graphics(index, value);
            }
            0x02..=0x08 => self.vga.set_graphics(index, value),
            0x21 | 0x23 | 0x25 | 0x27 => self.regs.graphics[i] = value & 0x1f,
            0x2a => {
                self.regs.graphics[i] = value & 0x3f;
                if self.regs.gr(0x31) & STATUS_AUTOSTART != 0 {
                    self.start_blit();
                }
            }
            0x2e => self.regs.graphics[i] = value & 0x3f,
            0x31 => self.write_blit_status(value),
            0x09..=0x39 => self.regs.graphics[i] = value,
            _ => {}
        }
    }

    fn crtc_read(&mut self, index: u8) -> u8 {
        match index {
            0x19..=0x1d | 0x25 | 0x27 => self.regs.cr(usize::from(index)),
            0x22 | 0x24 | 0x26 => self.vga.crtc(index),
            _ => 0xff,
        }
    }

    fn crtc_write(&mut self, index: u8, value: u8) {
        if let 0x19..=0x1d = index {
            self.regs.crtc[usize::from(index)] = value;
        }
    }

    // ---- blitter --------------------------------------------------------------------

    fn write_blit_status(&mut self, value: u8) {
        let old = self.regs.gr(0x31);
        self.regs.graphics[0x31] = value;
        if old & STATUS_RESET != 0 && value & STATUS_RESET == 0 {
            self.finish_blit();
            self.blitter.reset();
        } else if old & STATUS_START == 0 && value & STATUS_START != 0 {
            self.start_blit();
        }
    }

    fn finish_blit(&mut self) {
        self.regs.graphics[0x31] &= !(STATUS_START | STATUS_BUSY | STATUS_FIFO_USED);
    }

    fn blit_registers(&self) -> BlitRegisters {
        let g = |i: usize| self.regs.gr(i);
        let word = |i: usize| u16::from_le_bytes([g(i), g(i + 1)]);
        BlitRegisters {
            width_minus_one: word(0x20),
            height_minus_one: word(0x22),
            dst_pitch: word(0x24),
            src_pitch: word(0x26),
            dst_addr: u32::from_le_bytes([g(0x28), g(0x29), g(0x2a), 0]),
            src_addr: u32::from_le_bytes([g(0x2c), g(0x2d), g(0x2e), 0]),
            skip: g(0x2f),
            mode: g(0x30),
            rop: g(0x32),
            mode_ext: g(0x33),
            fg: [g(0x01), g(0x11), g(0x13), g(0x15)],
            bg: [g(0x00), g(0x10), g(0x12), g(0x14)],
            transparent_key: word(0x34),
        }
    }

    fn start_blit(&mut self) {
        self.regs.graphics[0x31] |= STATUS_BUSY;
        let regs = self.blit_registers();
        match self.blitter.start(&regs, self.vga.vram_mut()) {
            BlitStart::WaitingForSource => {}
            BlitStart::Rejected(_) => self.finish_blit(),
            BlitStart::Completed(copy) => {
                self.finish_blit();
                if let Some(copy) = copy {
                    self.note_copy(copy);
                }
            }
        }
    }

    /// CPU data for a system-to-video blit.
    fn feed_blit(&mut self, byte: u8) {
        let Self { blitter, vga, .. } = self;
        if blitter.write_source(vga.vram_mut(), &[byte]) {
            self.finish_blit();
        }
    }

    /// Turns a finished screen-to-screen copy into a copy rectangle when both areas lie
    /// inside the visible screen with the screen's pitch.
    fn note_copy(&mut self, copy: VideoCopy) {
        let Some(mode) = self.extended_mode() else {
            return;
        };
        let bpp = mode.depth.bytes_per_pixel();
        if mode.blank
            || mode.repeat != 1
            || mode.pitch == 0
            || copy.src_pitch != mode.pitch
            || copy.dst_pitch != mode.pitch
            || !copy.width_bytes.is_multiple_of(bpp)
        {
            return;
        }
        let locate = |addr: usize| -> Option<(u32, u32)> {
            let relative = addr.checked_sub(mode.start)?;
            let x_bytes = relative % mode.pitch;
            if x_bytes % bpp != 0 {
                return None;
            }
            let x = u32::try_from(x_bytes / bpp).ok()?;
            let y = u32::try_from(relative / mode.pitch).ok()?;
            let w = u32::try_from(copy.width_bytes / bpp).ok()?;
            let h = u32::try_from(copy.height).ok()?;
            (x.checked_add(w)? <= mode.width && y.checked_add(h)? <= mode.height).then_some((x, y))
        };
        if let (Some((src_x, src_y)), Some((dst_x, dst_y))) =
            (locate(copy.src_top_left), locate(copy.dst_top_left))
        {
            self.pending_copies.push(CopyRect {
                src_x,
                src_y,
                dst: Rect::new(
                    dst_x,
                    dst_y,
                    (copy.width_bytes / bpp) as u32,
                    copy.height as u32,
                ),
            });
        }
    }

    /// The blitter register behind byte `offset` of the memory-mapped block.
    fn mmio_register(offset: u64) -> Option<u8> {
        Some(match offset {
            0x00 => 0x00,
            0x01 => 0x10,
            0x02 => 0x12,
            0x03 => 0x14,
            0x04 => 0x01,
            0x05 => 0x11,
            0x06 => 0x13,
            0x07 => 0x15,
            0x08..=0x12 => 0x20 + (offset - 0x08) as u8,
            0x14..=0x18 => 0x2c + (offset - 0x14) as u8,
            0x1a => 0x32,
            0x1b => 0x33,
            0x1c => 0x34,
            0x1d => 0x35,
            0x20 => 0x38,
            0x21 => 0x39,
            0x40 => 0x31,
            _ => return None,
        })
    }

    fn mmio_blit_read(&mut self, offset: u64) -> u8 {
        match Self::mmio_register(offset) {
            Some(index) => self.graphics_read(index),
            None => 0xff,
        }
    }

    fn mmio_blit_write(&mut self, offset: u64, value: u8) {
        if let Some(index) = Self::mmio_register(offset) {
            self.graphics_write(index, value);
        }
    }

    // ---- memory ---------------------------------------------------------------------

    /// Base and limit of bank 0 (offsets 0..0x8000) or 1 (0x8000..0x10000).
    fn bank(&self, bank: usize) -> (usize, usize) {
        let gr0b = self.regs.gr(0x0b);
        let register = if gr0b & GR0B_DUAL_BANK != 0 {
            self.regs.gr(0x09 + bank)
        } else {
            self.regs.gr(0x09)
        };
        let shift = if gr0b & GR0B_16K_GRANULARITY != 0 {
            14
        } else {
            12
        };
        let mut base = usize::from(register) << shift;
        let mut limit = self.vram().len().saturating_sub(base);
        if gr0b & GR0B_DUAL_BANK == 0 && bank != 0 {
            if limit > 0x8000 {
                base += 0x8000;
                limit -= 0x8000;
            } else {
                limit = 0;
            }
        }
        if limit == 0 {
            (0, 0)
        } else {
            (base, limit)
        }
    }

    /// VRAM address of a linear or banked byte address after by-8/by-16 addressing.
    fn scaled_address(&self, addr: usize) -> usize {
        let gr0b = self.regs.gr(0x0b);
        let addr = if gr0b & GR0B_BY16 == GR0B_BY16 {
            addr << 4
        } else if gr0b & GR0B_BY8 != 0 {
            addr << 3
        } else {
            addr
        };
        addr & self.addr_mask()
    }

    fn banked_address(&self, offset: u64) -> Option<usize> {
        let offset = offset as usize;
        let (base, limit) = self.bank(offset >> 15);
        let within = offset & 0x7fff;
        (within < limit).then(|| self.scaled_address(base + within))
    }

    /// A CPU byte written to VRAM address `addr`: plain, or expanded by write mode 4/5.
    fn write_vram_byte(&mut self, addr: usize, value: u8) {
        let gr0b = self.regs.gr(0x0b);
        let mode = self.regs.gr(0x05) & 7;
        if !(4..=5).contains(&mode) || gr0b & GR0B_EXTENDED_WRITE_MODES == 0 {
            self.vram_mut().write_u8(addr, value);
            return;
        }
        let wide = gr0b & GR0B_BY16 == GR0B_BY16;
        let fg = [self.regs.gr(0x01), self.regs.gr(0x11)];
        let bg = [self.regs.gr(0x00), self.regs.gr(0x10)];
        let bytes = if wide { 2 } else { 1 };
        let mut buf = vec![0u8; 8 * bytes];
        self.vram().read(addr, &mut buf);
        for bit in 0..8 {
            let colour = if value & (0x80 >> bit) != 0 {
                Some(fg)
            } else if mode == 5 {
                Some(bg)
            } else {
                None
            };
            if let Some(colour) = colour {
                buf[bit * bytes..(bit + 1) * bytes].copy_from_slice(&colour[..bytes]);
            }
        }
        let mask = self.addr_mask();
        if addr + buf.len() <= mask + 1 {
            self.vram_mut().write(addr, &buf);
        } else {
            for (i, b) in buf.iter().enumerate() {
                let at = (addr + i) & mask;
                self.vram_mut().write_u8(at, *b);
            }
        }
    }

    /// Guest reads the legacy window at `0xa0000 + offset ..`.
    pub fn window_read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.window_read_byte(offset.saturating_add(i as u64));
        }
    }

    /// Guest writes the legacy window at `0xa0000 + offset ..`.
    pub fn window_write(&mut self, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            self.window_write_byte(offset.saturating_add(i as u64), *byte);
        }
    }

    fn mmio_at_b8000(&self) -> bool {
        self.regs.sr(0x17) & (SR17_MMIO_ENABLE | SR17_MMIO_LINEAR) == SR17_MMIO_ENABLE
    }

    fn window_read_byte(&mut self, offset: u64) -> u8 {
        if !self.extended() {
            return self.vga.mem_read(offset);
        }
        match offset {
            0..=0xffff => match self.banked_address(offset) {
                Some(addr) => self.vram().read_u8(addr),
                None => 0xff,
            },
            0x18000..=0x180ff if self.mmio_at_b8000() => self.mmio_blit_read(offset - 0x18000),
            _ => 0xff,
        }
    }

    fn window_write_byte(&mut self, offset: u64, value: u8) {
        if !self.extended() {
            self.vga.mem_write(offset, value);
            return;
        }
        match offset {
            0..=0xffff => {
                if self.blitter.is_waiting_for_source() {
                    self.feed_blit(value);
                } else if let Some(addr) = self.banked_address(offset) {
                    self.write_vram_byte(addr, value);
                }
            }
            0x18000..=0x180ff if self.mmio_at_b8000() => {
                self.mmio_blit_write(offset - 0x18000, value)
            }
            _ => {}
        }
    }

    fn mmio_in_linear(&self, addr: usize) -> bool {
        let mmio_mask = self.vram().len() - 256;
        self.regs.sr(0x17) & (SR17_MMIO_ENABLE | SR17_MMIO_LINEAR)
            == SR17_MMIO_ENABLE | SR17_MMIO_LINEAR
            && addr & mmio_mask == mmio_mask
    }

    fn linear_read_byte(&mut self, offset: u64) -> u8 {
        if offset >= BLIT_SOURCE_WINDOW {
            return 0xff;
        }
        let addr = offset as usize & self.addr_mask();
        if self.mmio_in_linear(addr) {
            return self.mmio_blit_read((addr & 0xff) as u64);
        }
        let at = self.scaled_address(addr);
        self.vram().read_u8(at)
    }

    fn linear_write_byte(&mut self, offset: u64, value: u8) {
        if offset >= BLIT_SOURCE_WINDOW {
            if offset < BLIT_SOURCE_WINDOW + BLIT_SOURCE_WINDOW_SIZE
                && self.blitter.is_waiting_for_source()
            {
                self.feed_blit(value);
            }
            return;
        }
        let addr = offset as usize & self.addr_mask();
        if self.mmio_in_linear(addr) {
            self.mmio_blit_write((addr & 0xff) as u64, value);
        } else if self.blitter.is_waiting_for_source() {
            self.feed_blit(value);
        } else {
            let at = self.scaled_address(addr);
            self.write_vram_byte(at, value);
        }
    }

    fn mmio_read_byte(&mut self, offset: u64) -> u8 {
        if offset >= 0x100 {
            self.mmio_blit_read(offset - 0x100)
        } else if offset < 0x20 {
            self.port_read_byte(offset + 0x10)
        } else {
            0xff
        }
    }

    fn mmio_write_byte(&mut self, offset: u64, value: u8) {
        if offset >= 0x100 {
            self.mmio_blit_write(offset - 0x100, value);
        } else if offset < 0x20 {
            self.port_write_byte(offset + 0x10, value);
        }
    }

    // ---- rendering ------------------------------------------------------------------

    fn depth(&self) -> Depth {
        let sixteen = if self.regs.hidden_dac & 0x0f == 1 {
            Depth::Rgb565
        } else {
            Depth::Rgb555
        };
        match self.regs.sr(0x07) & 0x0e {
            0x02 | 0x06 => sixteen,
            0x04 => Depth::Rgb888,
            0x08 => Depth::Xrgb8888,
            _ => Depth::Palette8,
        }
    }

    fn extended_mode(&self) -> Option<ExtendedMode> {
        if !self.extended() {
            return None;
        }
        let cr = |i: u8| self.vga.crtc(i);
        let ext = |i: usize| self.regs.cr(i);
        let width = (u32::from(cr(0x01)) + 1) * 8;
        let mut height = (u32::from(cr(0x12))
            | (u32::from(cr(0x07) & 0x02) << 7)
            | (u32::from(cr(0x07) & 0x40) << 3))
            + 1;
        if ext(0x1a) & 0x01 != 0 {
            height *= 2;
        }
        let start = usize::from(cr(0x0d))
            | usize::from(cr(0x0c)) << 8
            | usize::from(ext(0x1b) & 0x01) << 16
            | usize::from(ext(0x1b) & 0x0c) << 15
            | usize::from(ext(0x1d) & 0x80) << 12;
        let pitch = (usize::from(cr(0x13)) | usize::from(ext(0x1b) & 0x10) << 4) * 8;
        let max_scan = u32::from(cr(0x09) & 0x1f) + 1;
        let repeat = if cr(0x09) & 0x80 != 0 {
            max_scan * 2
        } else {
            max_scan
        };
        Some(ExtendedMode {
            width: width.min(MAX_SURFACE_WIDTH),
            height: height.min(MAX_SURFACE_HEIGHT),
            depth: self.depth(),
            start: start * 4,
            pitch,
            repeat,
            blank: self.vga.attribute_index() & 0x20 == 0,
        })
    }

    /// Reads `buf.len()` bytes at `addr`, wrapping at the end of VRAM like the CRTC does.
    fn read_wrapped(&self, addr: usize, buf: &mut [u8]) {
        let len = self.vram().len();
        let addr = addr % len;
        let first = buf.len().min(len - addr);
        let (head, tail) = buf.split_at_mut(first);
        self.vram().read(addr, head);
        let mut at = 0;
        for chunk in tail.chunks_mut(len) {
            self.vram().read(at, chunk);
            at = 0;
        }
    }

    fn line_dirty(&self, dirty: &DirtyPages, addr: usize, bytes: usize) -> bool {
        let len = self.vram().len();
        let addr = addr % len;
        let first = bytes.min(len - addr);
        dirty.any_in(addr, first) || (bytes > first && dirty.any_in(0, (bytes - first).min(len)))
    }

    fn render_extended(
        &mut self,
        mode: ExtendedMode,
        guest_dirty: Option<&DirtyPages>,
        surface: &mut Surface,
    ) -> RefreshOutcome {
        let mut dirty = self.vga.vram_mut().take_dirty();
        if let Some(extra) = guest_dirty {
            dirty.merge(extra);
        }
        let resized = surface.resize(mode.width, mode.height);
        let palette = (mode.depth == Depth::Palette8).then(|| self.vga.palette_lut());
        let full = resized
            || !self.cache.extended
            || self.cache.mode != Some(mode)
            || (palette.is_some() && self.cache.palette != palette);
        self.cache.extended = true;
        self.cache.mode = Some(mode);
        self.cache.palette = palette;
        let copies = std::mem::take(&mut self.pending_copies);
        if mode.blank {
            if full {
                surface.pixels.fill(0);
                return RefreshOutcome {
                    resized,
                    damage: vec![Rect::new(0, 0, mode.width, mode.height)],
                    copies: Vec::new(),
                };
            }
            return RefreshOutcome::default();
        }
        let bpp = mode.depth.bytes_per_pixel();
        let line_bytes = mode.width as usize * bpp;
        let mut line = vec![0u8; line_bytes];
        let mut damage: Vec<Rect> = Vec::new();
        let lut = palette.unwrap_or([0; 256]);
        for y in 0..mode.height {
            let source_line = (y / mode.repeat.max(1)) as usize;
            let addr = mode
                .start
                .wrapping_add(source_line.wrapping_mul(mode.pitch));
            if !full && !self.line_dirty(&dirty, addr, line_bytes) {
                continue;
            }
            self.read_wrapped(addr, &mut line);
            let row = surface.row_mut(y);
            for (pixel, out) in line
                .chunks_exact(bpp)
                .zip(row.chunks_exact_mut(SURFACE_BYTES_PER_PIXEL))
            {
                let rgb = match mode.depth {
                    Depth::Palette8 => lut[usize::from(pixel[0])],
                    Depth::Rgb555 => {
                        let v = u16::from_le_bytes([pixel[0], pixel[1]]);
                        c5_to_8(v >> 10) << 16 | c5_to_8(v >> 5) << 8 | c5_to_8(v)
                    }
                    Depth::Rgb565 => {
                        let v = u16::from_le_bytes([pixel[0], pixel[1]]);
                        let g = u32::from((v >> 5) & 0x3f);
                        c5_to_8(v >> 11) << 16 | ((g << 2) | (g >> 4)) << 8 | c5_to_8(v)
                    }
                    Depth::Rgb888 | Depth::Xrgb8888 => {
                        u32::from_le_bytes([pixel[0], pixel[1], pixel[2], 0])
                    }
                };
                out.copy_from_slice(&rgb.to_le_bytes());
            }
            match damage.last_mut() {
                Some(last) if last.y + last.height == y => last.height += 1,
                _ => damage.push(Rect::new(0, y, mode.width, 1)),
            }
        }
        RefreshOutcome {
            resized,
            damage,
            copies: if full { Vec::new() } else { copies },
        }
    }

    // ---- cursor ---------------------------------------------------------------------

    /// Size and the two planes' bit at (x, y) of the enabled cursor pattern.
    fn cursor_pattern(&self) -> Option<(u32, Vec<(bool, bool)>)> {
        let sr12 = self.regs.sr(0x12);
        if sr12 & CURSOR_SHOW == 0 || !self.extended() {
            return None;
        }
        let area = self.vram().len().min(REPORTED_MEMORY) - CURSOR_AREA;
        let sr13 = usize::from(self.regs.sr(0x13));
        let large = sr12 & CURSOR_LARGE != 0;
        let (size, base) = if large {
            (64u32, area + (sr13 & 0x3c) * 256)
        } else {
            (32u32, area + (sr13 & 0x3f) * 256)
        };
        let mut bytes = vec![0u8; if large { 1024 } else { 256 }];
        self.vram().read(base, &mut bytes);
        let mut bits = Vec::with_capacity((size * size) as usize);
        for y in 0..size as usize {
            for x in 0..size as usize {
                let (p0, p1) = if large {
                    (y * 16 + x / 8, y * 16 + 8 + x / 8)
                } else {
                    (y * 4 + x / 8, 128 + y * 4 + x / 8)
                };
                let mask = 0x80 >> (x % 8);
                bits.push((bytes[p0] & mask != 0, bytes[p1] & mask != 0));
            }
        }
        Some((size, bits))
    }

    fn cursor_colour(&self, entry: usize) -> u32 {
        let p = &self.regs.hidden_palette;
        let c = |i: usize| c6_to_8(p.get(entry * 3 + i).copied().unwrap_or(0));
        c(0) << 16 | c(1) << 8 | c(2)
    }

    /// Draws the hardware cursor into `surface` (inverted pixels XOR the screen), returning
    /// the rectangle drawn. Use a copy of the refreshed surface: the card's incremental
    /// refresh does not repair pixels drawn over.
    pub fn compose_cursor(&self, surface: &mut Surface) -> Option<Rect> {
        let (size, bits) = self.cursor_pattern()?;
        let colour0 = self.cursor_colour(0);
        let colour1 = self.cursor_colour(15);
        let (cx, cy) = (u32::from(self.regs.cursor_x), u32::from(self.regs.cursor_y));
        let area = Rect::new(cx, cy, size, size).clip(surface.width, surface.height);
        if area.is_empty() {
            return None;
        }
        for y in area.y..area.y + area.height {
            let row = surface.row_mut(y);
            for x in area.x..area.x + area.width {
                let (p0, p1) = bits[((y - cy) * size + (x - cx)) as usize];
                let at = x as usize * SURFACE_BYTES_PER_PIXEL;
                let Some(pixel) = row.get_mut(at..at + 3) else {
                    continue;
                };
                let new = match (p0, p1) {
                    (false, false) => continue,
                    (true, false) => {
                        let old = u32::from_le_bytes([pixel[0], pixel[1], pixel[2], 0]);
                        old ^ 0xff_ffff
                    }
                    (false, true) => colour0,
                    (true, true) => colour1,
                };
                pixel.copy_from_slice(&new.to_le_bytes()[..3]);
            }
        }
        Some(area)
    }
}

impl DisplayDevice for CirrusVga {
    fn refresh(
        &mut self,
        guest_dirty: Option<&DirtyPages>,
        surface: &mut Surface,
    ) -> RefreshOutcome {
        match self.extended_mode() {
            Some(mode) => self.render_extended(mode, guest_dirty, surface),
            None => {
                if self.cache.extended {
                    self.cache.extended = false;
                    self.cache.mode = None;
                    self.vga.invalidate();
                }
                self.pending_copies.clear();
                self.vga.refresh(guest_dirty, surface)
            }
        }
    }

    /// The cursor image: colour 0 and colour 15 opaque, inverted pixels opaque black
    /// (the best an overlay can do without the screen below), the rest transparent.
    fn cursor(&self) -> Option<CursorState> {
        let (size, bits) = self.cursor_pattern()?;
        let colour0 = 0xff00_0000 | self.cursor_colour(0);
        let colour1 = 0xff00_0000 | self.cursor_colour(15);
        let pixels = bits
            .iter()
            .map(|bits| match bits {
                (false, false) => 0,
                (true, false) => 0xff00_0000,
                (false, true) => colour0,
                (true, true) => colour1,
            })
            .collect();
        Some(CursorState {
            visible: true,
            x: i32::from(self.regs.cursor_x),
            y: i32::from(self.regs.cursor_y),
            image: Some(CursorImage {
                width: size,
                height: size,
                hot_x: 0,
                hot_y: 0,
                pixels,
            }),
        })
    }

    fn text_screen(&self) -> Option<String> {
        if self.extended() {
            None
        } else {
            self.vga.text_screen()
        }
    }
}

impl PciFunction for CirrusVga {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *byte = match bar {
                BAR_LINEAR if at < LINEAR_BAR_SIZE => self.linear_read_byte(at),
                BAR_MMIO if at < MMIO_BAR_SIZE => self.mmio_read_byte(at),
                ROM_BAR => usize::try_from(at)
                    .ok()
                    .and_then(|at| self.rom.get(at))
                    .copied()
                    .unwrap_or(0xff),
                _ => 0xff,
            };
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            let at = offset.saturating_add(i as u64);
            match bar {
                BAR_LINEAR if at < LINEAR_BAR_SIZE => self.linear_write_byte(at, *byte),
                BAR_MMIO if at < MMIO_BAR_SIZE => self.mmio_write_byte(at, *byte),
                _ => {}
            }
        }
    }

    fn reset(&mut self) {
        self.config.reset_header();
        self.reset_card();
    }
}

/// The card's legacy ports (0x3b0, length 0x30) as a bus device.
pub struct CirrusPorts(pub Arc<Mutex<CirrusVga>>);

impl BusDevice for CirrusPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut card = self.0.lock().unwrap_or_else(|e| e.into_inner());
        card.vga_port_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut card = self.0.lock().unwrap_or_else(|e| e.into_inner());
        card.vga_port_write(offset, data);
    }
}

/// The card's legacy memory window (0xa0000, length 0x20000) as a bus device.
pub struct CirrusWindow(pub Arc<Mutex<CirrusVga>>);

impl BusDevice for CirrusWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut card = self.0.lock().unwrap_or_else(|e| e.into_inner());
        card.window_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut card = self.0.lock().unwrap_or_else(|e| e.into_inner());
        card.window_write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cirrus_blit::{
        MODEEXT_SOLID_FILL, MODE_BACKWARDS, MODE_COLOR_EXPAND, MODE_MEMSYS_SRC, MODE_PATTERN,
    };
    use crate::test_support::TestRng;

    const MIB: usize = 1 << 20;

    fn card() -> CirrusVga {
        let mut c = CirrusVga::new(Vram::new(4 * MIB).unwrap(), Vec::new()).unwrap();
        outb(&mut c, 0x3c2, 0x67); // colour CRTC at 0x3d4, as the BIOS leaves it
        c
    }

    fn outb(c: &mut CirrusVga, port: u16, value: u8) {
        c.vga_port_write(u64::from(port) - 0x3b0, &[value]);
    }

    fn inb(c: &mut CirrusVga, port: u16) -> u8 {
        let mut b = [0u8];
        c.vga_port_read(u64::from(port) - 0x3b0, &mut b);
        b[0]
    }

    /// `outw(index | value << 8, port)`, as SeaBIOS programs its tables.
    fn outw(c: &mut CirrusVga, port: u16, word: u16) {
        c.vga_port_write(u64::from(port) - 0x3b0, &word.to_le_bytes());
    }

    fn sr(c: &mut CirrusVga, index: u8, value: u8) {
        outb(c, 0x3c4, index);
        outb(c, 0x3c5, value);
    }

    fn read_sr(c: &mut CirrusVga, index: u8) -> u8 {
        outb(c, 0x3c4, index);
        inb(c, 0x3c5)
    }

    fn gr(c: &mut CirrusVga, index: u8, value: u8) {
        outb(c, 0x3ce, index);
        outb(c, 0x3cf, value);
    }

    fn read_gr(c: &mut CirrusVga, index: u8) -> u8 {
        outb(c, 0x3ce, index);
        inb(c, 0x3cf)
    }

    fn cr(c: &mut CirrusVga, index: u8, value: u8) {
        outb(c, 0x3d4, index);
        outb(c, 0x3d5, value);
    }

    fn read_cr(c: &mut CirrusVga, index: u8) -> u8 {
        outb(c, 0x3d4, index);
        inb(c, 0x3d5)
    }

    fn write_hidden_dac(c: &mut CirrusVga, value: u8) {
        for _ in 0..4 {
            inb(c, 0x3c6);
        }
        outb(c, 0x3c6, value);
    }

    /// Screen on: palette address source bit of the attribute index.
    fn enable_display(c: &mut CirrusVga) {
        inb(c, 0x3da);
        outb(c, 0x3c0, 0x20);
    }

    /// Programs an extended mode through the registers.
    fn set_mode(c: &mut CirrusVga, width: u32, height: u32, sr07: u8, pitch: usize, start: usize) {
        cr(c, 0x11, 0x00);
        cr(c, 0x01, (width / 8 - 1) as u8);
        let v = height - 1;
        cr(c, 0x12, v as u8);
        cr(c, 0x07, (((v >> 8) & 1) << 1 | ((v >> 9) & 1) << 6) as u8);
        cr(c, 0x09, 0x00);
        let offset = pitch / 8;
        cr(c, 0x13, offset as u8);
        let s = start / 4;
        cr(c, 0x0d, s as u8);
        cr(c, 0x0c, (s >> 8) as u8);
        let cr1b = ((offset >> 8) & 1) << 4 | ((s >> 16) & 1) | ((s >> 17) & 3) << 2;
        cr(c, 0x1b, cr1b as u8);
        cr(c, 0x1d, (((s >> 19) & 1) << 7) as u8);
        sr(c, 0x07, sr07);
        enable_display(c);
    }

    fn refresh(c: &mut CirrusVga, surface: &mut Surface) -> RefreshOutcome {
        c.refresh(None, surface)
    }

    #[test]
    fn pci_identity_bars_and_rom() {
        let mut rom = vec![0u8; 40 * 1024];
        rom[0] = 0x55;
        rom[1] = 0xaa;
        rom[2] = 0x50;
        let mut c = CirrusVga::new(Vram::new(8 * MIB).unwrap(), rom).unwrap();
        let cfg = c.config();
        assert_eq!(cfg.vendor_id(), 0x1013);
        assert_eq!(cfg.device_id(), 0x00b8);
        assert_eq!(cfg.read_u32(0x08) >> 8, 0x030000);
        assert_eq!(cfg.read_u8(0x08), 0);
        assert_eq!(cfg.read_u16(0x2c), 0x1af4);
        assert_eq!(cfg.read_u16(0x2e), 0x1100);
        assert_eq!(cfg.bar_size(0), Some(32 * MIB as u64));
        assert_eq!(cfg.read_u32(0x10) & 0xf, 0x8, "prefetchable 32-bit memory");
        assert_eq!(cfg.bar_size(1), Some(4096));
        assert_eq!(cfg.bar_size(ROM_BAR), Some(64 * 1024));
        let mut b = [0u8; 4];
        c.bar_read(ROM_BAR, 0, &mut b);
        assert_eq!(b, [0x55, 0xaa, 0x50, 0]);
        c.bar_read(ROM_BAR, 63 * 1024, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert_eq!(
            CirrusVga::new(Vram::new(2 * MIB).unwrap(), Vec::new()).err(),
            Some(CirrusError::VramSize(2 * MIB))
        );
        assert_eq!(
            CirrusVga::new(Vram::new(4 * MIB).unwrap(), vec![0x55, 0xab]).err(),
            Some(CirrusError::RomSignature)
        );
        let mut big = vec![0; MAX_ROM_SIZE + 1];
        big[0] = 0x55;
        big[1] = 0xaa;
        assert_eq!(
            CirrusVga::new(Vram::new(4 * MIB).unwrap(), big).err(),
            Some(CirrusError::RomTooLarge(MAX_ROM_SIZE + 1))
        );
        let c = CirrusVga::new(Vram::new(16 * MIB).unwrap(), Vec::new()).unwrap();
        assert_eq!(c.config().bar_size(ROM_BAR), None);
    }

    #[test]
    fn identification_registers() {
        let mut c = card();
        sr(&mut c, 0x06, 0x92);
        assert_eq!(read_sr(&mut c, 0x06), 0x12);
        sr(&mut c, 0x06, 0x00);
        assert_eq!(read_sr(&mut c, 0x06), 0x0f);
        assert_eq!(read_cr(&mut c, 0x27), 0xb8);
        cr(&mut c, 0x27, 0x00);
        assert_eq!(read_cr(&mut c, 0x27), 0xb8, "read-only");
        assert_eq!(read_sr(&mut c, 0x0f), 0x98);
        assert_eq!(read_sr(&mut c, 0x15), 0x04);
        assert_eq!(read_sr(&mut c, 0x17) & 0x38, 0x20, "PCI bus");
        sr(&mut c, 0x17, 0xff);
        assert_eq!(read_sr(&mut c, 0x17), 0xe7, "bus type bits are read-only");
        assert_eq!(read_gr(&mut c, 0x3a), 0xff);
        // Standard registers still reach the VGA core.
        sr(&mut c, 0x02, 0x0f);
        assert_eq!(c.vga().sequencer(2), 0x0f);
        // Index aliases: SR08 is an extended register, not SR00.
        sr(&mut c, 0x08, 0x5a);
        assert_eq!(read_sr(&mut c, 0x08), 0x5a);
        assert_ne!(c.vga().sequencer(0), 0x5a);
        // GR00/GR01 keep all 8 bits for the blitter.
        gr(&mut c, 0x01, 0xa5);
        assert_eq!(read_gr(&mut c, 0x01), 0xa5);
        assert_eq!(c.vga().graphics(1), 0x05);
    }

    #[test]
    fn hidden_dac_selects_15_or_16_bpp() {
        let mut c = card();
        write_hidden_dac(&mut c, 0xe1);
        for _ in 0..4 {
            assert_eq!(inb(&mut c, 0x3c6), 0xff, "pel mask");
        }
        assert_eq!(inb(&mut c, 0x3c6), 0xe1, "fifth read is the hidden DAC");
        // Any other DAC access resets the count: this write is the pel mask.
        inb(&mut c, 0x3c6);
        inb(&mut c, 0x3c6);
        inb(&mut c, 0x3c8);
        inb(&mut c, 0x3c6);
        inb(&mut c, 0x3c6);
        outb(&mut c, 0x3c6, 0x0f);
        assert_eq!(c.vga().dac_mask(), 0x0f);
        outb(&mut c, 0x3c6, 0xff);
        sr(&mut c, 0x07, 0x07);
        assert_eq!(c.depth(), Depth::Rgb565);
        write_hidden_dac(&mut c, 0xf0);
        assert_eq!(c.depth(), Depth::Rgb555);
    }

    fn fill_rows(c: &mut CirrusVga, start: usize, pitch: usize, bytes: usize, rows: usize) {
        for y in 0..rows {
            let line: Vec<u8> = (0..bytes).map(|x| (x * 3 + y * 11) as u8).collect();
            c.vram_mut().write(start + y * pitch, &line);
        }
    }

    #[test]
    fn renders_every_depth_with_pitch_and_start_offset() {
        // (SR07, hidden DAC, bytes per pixel)
        let depths = [
            (0x11u8, 0u8, 1usize),
            (0x17, 0xf0, 2),
            (0x17, 0xe1, 2),
            (0x15, 0, 3),
            (0x19, 0, 4),
        ];
        for (sr07, dac, bpp) in depths {
            let mut c = card();
            write_hidden_dac(&mut c, dac);
            // A palette for 8 bpp: entry n = (n, 63 - n, n / 2) in 6 bits.
            outb(&mut c, 0x3c8, 0);
            for n in 0..64u8 {
                outb(&mut c, 0x3c9, n);
                outb(&mut c, 0x3c9, 63 - n);
                outb(&mut c, 0x3c9, n / 2);
            }
            let (w, h) = (64u32, 20u32);
            let pitch = 64 * bpp + 40;
            let start = 0x1_0000 + 4 * 33;
            set_mode(&mut c, w, h, sr07, pitch, start);
            fill_rows(&mut c, start, pitch, w as usize * bpp, h as usize);
            let mut s = Surface::default();
            let out = refresh(&mut c, &mut s);
            assert!(out.resized);
            assert_eq!((s.width, s.height), (w, h));
            for (x, y) in [(0u32, 0u32), (5, 3), (63, 19), (17, 11)] {
                let at = start + y as usize * pitch + x as usize * bpp;
                let mut px = [0u8; 4];
                c.vram().read(at, &mut px[..bpp]);
                let expect = match (bpp, dac) {
                    (1, _) => {
                        let n = u32::from(px[0] & 0x3f);
                        let e = |v: u32| (v << 2) | (v >> 4);
                        if px[0] < 64 {
                            e(n) << 16 | e(63 - n) << 8 | e(n / 2)
                        } else {
                            0
                        }
                    }
                    (2, 0xf0) => {
                        let v = u32::from(u16::from_le_bytes([px[0], px[1]]));
                        let e = |v: u32| ((v & 31) << 3) | ((v & 31) >> 2);
                        e(v >> 10) << 16 | e(v >> 5) << 8 | e(v)
                    }
                    (2, _) => {
                        let v = u32::from(u16::from_le_bytes([px[0], px[1]]));
                        let e5 = |v: u32| ((v & 31) << 3) | ((v & 31) >> 2);
                        let g = (v >> 5) & 63;
                        e5(v >> 11) << 16 | ((g << 2) | (g >> 4)) << 8 | e5(v)
                    }
                    _ => u32::from_le_bytes([px[0], px[1], px[2], 0]),
                };
                assert_eq!(s.pixel(x, y), Some(expect), "sr07 {sr07:#x} at {x},{y}");
            }
        }
    }

    #[test]
    fn only_dirty_lines_are_recomposed_and_palette_changes_redraw_everything() {
        let mut c = card();
        set_mode(&mut c, 640, 480, 0x19, 2560, 0);
        let mut s = Surface::default();
        refresh(&mut c, &mut s);
        assert!(refresh(&mut c, &mut s).is_empty(), "nothing changed");
        // A device write on line 100.
        c.vram_mut().write_u32(100 * 2560 + 40, 0x00ff_8040);
        let out = refresh(&mut c, &mut s);
        assert_eq!(s.pixel(10, 100), Some(0xff8040));
        let rows: u32 = out.damage.iter().map(|r| r.height).sum();
        assert!(out
            .damage
            .iter()
            .all(|r| r.y <= 100 && r.y + r.height > 100 || r.y > 90));
        assert!(
            rows < 10,
            "only the lines on the dirty page: {:?}",
            out.damage
        );
        // A guest LFB write reported through the dirty log only.
        c.vram_mut().write_u32(300 * 2560, 0x0012_3456);
        let log = c.vram_mut().take_dirty();
        assert!(
            refresh(&mut c, &mut s).is_empty(),
            "not reported, not drawn"
        );
        let out = c.refresh(Some(&log), &mut s);
        assert_eq!(s.pixel(0, 300), Some(0x123456));
        assert!(!out.damage.is_empty());
        // 8 bpp: a palette change redraws the whole screen.
        set_mode(&mut c, 640, 480, 0x11, 640, 0);
        refresh(&mut c, &mut s);
        assert!(refresh(&mut c, &mut s).is_empty());
        outb(&mut c, 0x3c8, 7);
        for v in [1, 2, 3] {
            outb(&mut c, 0x3c9, v);
        }
        let out = refresh(&mut c, &mut s);
        assert_eq!(out.damage, vec![Rect::new(0, 0, 640, 480)]);
    }

    #[test]
    fn double_scan_and_interlace_repeat_lines() {
        let mut c = card();
        set_mode(&mut c, 64, 20, 0x19, 256, 0);
        cr(&mut c, 0x09, 0x80);
        c.vram_mut().write_u32(256 + 4, 0x00abcdef);
        let mut s = Surface::default();
        refresh(&mut c, &mut s);
        assert_eq!(s.height, 20);
        assert_eq!(s.pixel(1, 2), Some(0xabcdef));
        assert_eq!(s.pixel(1, 3), Some(0xabcdef));
        assert_eq!(s.pixel(1, 1), Some(0));
        cr(&mut c, 0x09, 0x00);
        outb(&mut c, 0x3d4, 0x1a);
        outb(&mut c, 0x3d5, 0x01);
        refresh(&mut c, &mut s);
        assert_eq!(s.height, 40);
    }

    #[test]
    fn banked_window_with_4k_16k_and_dual_banks() {
        let mut c = card();
        sr(&mut c, 0x07, 0x01);
        // 4 KiB granularity, single bank: bank 1 is the second 32 KiB of the same base.
        gr(&mut c, 0x09, 0x10);
        c.window_write(0x10, &[0xa1]);
        assert_eq!(c.vram().read_u8(0x10_010), 0xa1);
        c.window_write(0x8000, &[0xa2]);
        assert_eq!(c.vram().read_u8(0x10_000 + 0x8000), 0xa2);
        // 16 KiB granularity.
        gr(&mut c, 0x0b, 0x20);
        gr(&mut c, 0x09, 0x03);
        c.window_write(0x5, &[0xb1]);
        assert_eq!(c.vram().read_u8(3 * 0x4000 + 5), 0xb1);
        let mut b = [0u8];
        c.window_read(0x5, &mut b);
        assert_eq!(b[0], 0xb1);
        // Dual banks: GR0A for 0x8000..0x10000.
        gr(&mut c, 0x0b, 0x21);
        gr(&mut c, 0x0a, 0x05);
        c.window_write(0x8001, &[0xc1]);
        assert_eq!(c.vram().read_u8(5 * 0x4000 + 1), 0xc1);
        // A bank past the end of VRAM reads 0xff and drops writes.
        gr(&mut c, 0x09, 0xff);
        gr(&mut c, 0x0b, 0x20);
        c.window_read(0x0, &mut b);
        assert_eq!(b[0], c.vram().read_u8(0xff * 0x4000));
        gr(&mut c, 0x0b, 0x00);
        let before = c.vram().read_u8(0);
        c.window_write(0x1_0000, &[0x99]);
        c.window_read(0x1_0000, &mut b);
        assert_eq!(b[0], 0xff, "0xb0000 is not VRAM in extended mode");
        assert_eq!(c.vram().read_u8(0), before);
        // Standard mode goes through the VGA core's planar path (chain-4 here).
        sr(&mut c, 0x07, 0x00);
        sr(&mut c, 0x04, 0x0e);
        sr(&mut c, 0x02, 0x0f);
        gr(&mut c, 0x06, 0x05);
        gr(&mut c, 0x08, 0xff);
        c.window_write(0x123, &[0x77]);
        assert_eq!(c.vram().read_u8(0x123), 0x77);
    }

    #[test]
    fn write_modes_4_and_5_expand_cpu_bytes_at_8_and_16_bpp() {
        for (mode, wide) in [(4u8, false), (5, false), (4, true), (5, true)] {
            let mut c = card();
            sr(&mut c, 0x07, 0x01);
            c.vram_mut().fill(0, 0x10000, 0x33);
            gr(&mut c, 0x00, 0xb0);
            gr(&mut c, 0x10, 0xb1);
            gr(&mut c, 0x01, 0xf0);
            gr(&mut c, 0x11, 0xf1);
            gr(&mut c, 0x05, mode);
            gr(&mut c, 0x0b, if wide { 0x14 | 0x04 } else { 0x04 | 0x02 });
            assert!(!c.linear_direct_ok(), "mode {mode} traps the LFB");
            // Window offset 2 -> VRAM 16 (by 8) or 32 (by 16).
            c.window_write(2, &[0b1010_0000]);
            let bytes = if wide { 2 } else { 1 };
            let at = 2 * 8 * bytes;
            let mut out = vec![0u8; 8 * bytes];
            c.vram().read(at, &mut out);
            for bit in 0..8 {
                let set = 0b1010_0000u8 & (0x80 >> bit) != 0;
                let px = &out[bit * bytes..(bit + 1) * bytes];
                let expect: &[u8] = match (set, mode, wide) {
                    (true, _, false) => &[0xf0],
                    (true, _, true) => &[0xf0, 0xf1],
                    (false, 5, false) => &[0xb0],
                    (false, 5, true) => &[0xb0, 0xb1],
                    (false, _, false) => &[0x33],
                    (false, _, true) => &[0x33, 0x33],
                };
                assert_eq!(px, expect, "mode {mode} wide {wide} bit {bit}");
            }
            assert_eq!(c.vram().read_u8(at + 8 * bytes), 0x33);
            // The same through the trapped linear framebuffer.
            c.bar_write(BAR_LINEAR, 4, &[0xff]);
            let mut out = vec![0u8; 8 * bytes];
            c.vram().read(4 * 8 * bytes, &mut out);
            assert!(out.chunks(bytes).all(|p| p[0] == 0xf0));
            gr(&mut c, 0x05, 0);
            gr(&mut c, 0x0b, 0);
            assert!(c.linear_direct_ok());
        }
    }

    fn set_cursor_colours(c: &mut CirrusVga, bg: [u8; 3], fg: [u8; 3]) {
        let sr12 = read_sr(c, 0x12);
        sr(c, 0x12, sr12 | 0x02);
        outb(c, 0x3c8, 0x00);
        for v in bg {
            outb(c, 0x3c9, v);
        }
        outb(c, 0x3c8, 0x0f);
        for v in fg {
            outb(c, 0x3c9, v);
        }
        outb(c, 0x3c7, 0x0f);
        assert_eq!(inb(c, 0x3c9), fg[0], "hidden palette reads back");
        sr(c, 0x12, sr12);
    }

    #[test]
    fn hardware_cursor_32_and_64() {
        let mut c = card();
        set_mode(&mut c, 320, 200, 0x19, 1280, 0);
        // The normal palette is untouched by hidden writes.
        set_cursor_colours(&mut c, [0x3f, 0, 0], [0, 0x3f, 0]);
        assert_eq!(c.vga().dac_rgb(0), 0);
        assert_eq!(c.vga().dac_rgb(15), 0);
        let area = 4 * MIB - 16 * 1024;
        // 32x32, pattern 2: row 0 = plane0 0xc0.., plane1 0xa0.. -> pixels 0..3:
        // (1,1)=colour 15, (1,0)=invert, (0,1)=colour 0, (0,0)=transparent.
        let base = area + 2 * 256;
        c.vram_mut().write(base, &[0b1100_0000]);
        c.vram_mut().write(base + 128, &[0b1010_0000]);
        sr(&mut c, 0x13, 2);
        assert!(c.cursor().is_none(), "hidden until SR12 bit 0");
        sr(&mut c, 0x12, 0x01);
        // Position 0x123 x: SR10 = 0x24, low bits 3 in the index.
        outb(&mut c, 0x3c4, 0x10 | (3 << 5));
        outb(&mut c, 0x3c5, 0x24);
        outb(&mut c, 0x3c4, 0x11 | (1 << 5));
        outb(&mut c, 0x3c5, 0x02);
        let state = c.cursor().unwrap();
        assert_eq!((state.x, state.y), (0x123, 0x11));
        let image = state.image.unwrap();
        assert_eq!((image.width, image.height), (32, 32));
        assert_eq!(
            &image.pixels[..4],
            &[0xff00_ff00, 0xff00_0000, 0xffff_0000, 0]
        );
        assert!(image.pixels[4..].iter().all(|&p| p == 0));
        // Composed: XOR and colours land at the position, clipped to the surface.
        let mut s = Surface::new(320, 200);
        for px in s.pixels.chunks_mut(4) {
            px.copy_from_slice(&[0x10, 0x20, 0x30, 0]);
        }
        outb(&mut c, 0x3c4, 0x10);
        outb(&mut c, 0x3c5, 10);
        outb(&mut c, 0x3c4, 0x11);
        outb(&mut c, 0x3c5, 5);
        let rect = c.compose_cursor(&mut s).unwrap();
        assert_eq!(rect, Rect::new(80, 40, 32, 32));
        assert_eq!(s.pixel(80, 40), Some(0x00ff00));
        assert_eq!(s.pixel(81, 40), Some(0x302010 ^ 0xffffff));
        assert_eq!(s.pixel(82, 40), Some(0xff0000));
        assert_eq!(s.pixel(83, 40), Some(0x302010));
        // 64x64, pattern select 0x3c bits: pattern 4 at 4 * 256, 16 bytes a row.
        sr(&mut c, 0x12, 0x05);
        sr(&mut c, 0x13, 0x07);
        let base = area + 4 * 256;
        c.vram_mut().write(base + 63 * 16 + 7, &[0x01]);
        c.vram_mut().write(base + 63 * 16 + 8 + 7, &[0x01]);
        let image = c.cursor().unwrap().image.unwrap();
        assert_eq!((image.width, image.height), (64, 64));
        assert_eq!(image.pixels[63 * 64 + 63], 0xff00_ff00);
        assert_eq!(image.pixels.iter().filter(|&&p| p != 0).count(), 1);
        outb(&mut c, 0x3c4, 0x10);
        outb(&mut c, 0x3c5, 0xff);
        let mut s = Surface::new(320, 200);
        assert_eq!(c.compose_cursor(&mut s), None, "entirely off screen");
    }

    /// Programs the blitter through GR20.. and starts it through GR31.
    #[allow(clippy::too_many_arguments)]
    fn blit(
        c: &mut CirrusVga,
        width: u16,
        height: u16,
        dst: u32,
        dst_pitch: u16,
        src: u32,
        src_pitch: u16,
        mode: u8,
        rop: u8,
    ) {
        let w = width - 1;
        let h = height - 1;
        for (i, v) in [
            (0x20, w as u8),
            (0x21, (w >> 8) as u8),
            (0x22, h as u8),
            (0x23, (h >> 8) as u8),
            (0x24, dst_pitch as u8),
            (0x25, (dst_pitch >> 8) as u8),
            (0x26, src_pitch as u8),
            (0x27, (src_pitch >> 8) as u8),
            (0x28, dst as u8),
            (0x29, (dst >> 8) as u8),
            (0x2a, (dst >> 16) as u8),
            (0x2c, src as u8),
            (0x2d, (src >> 8) as u8),
            (0x2e, (src >> 16) as u8),
            (0x30, mode),
            (0x32, rop),
        ] {
            gr(c, i, v);
        }
        gr(c, 0x31, 0x02);
    }

    #[test]
    fn screen_copy_through_ports_reports_a_copy_rect() {
        let mut c = card();
        set_mode(&mut c, 320, 200, 0x19, 1280, 0);
        let mut s = Surface::default();
        refresh(&mut c, &mut s);
        c.vram_mut().write_u32(10 * 1280 + 8 * 4, 0x00_11_22_33);
        // Copy 16x8 pixels from (8,10) to (100,50).
        blit(
            &mut c,
            64,
            8,
            50 * 1280 + 400,
            1280,
            10 * 1280 + 32,
            1280,
            0x30,
            0x0d,
        );
        assert_eq!(read_gr(&mut c, 0x31) & 0x03, 0, "finished, not busy");
        let out = refresh(&mut c, &mut s);
        assert_eq!(
            out.copies,
            vec![CopyRect {
                src_x: 8,
                src_y: 10,
                dst: Rect::new(100, 50, 16, 8)
            }]
        );
        assert_eq!(s.pixel(100, 50), Some(0x112233));
        assert!(out.damage.iter().any(|r| r.y <= 50 && r.y + r.height >= 58));
        // A backward copy is reported with its top-left corners too.
        let last = 60 * 1280 + 200 * 4 + 63;
        blit(
            &mut c,
            64,
            8,
            last as u32,
            1280,
            (last - 1280) as u32,
            1280,
            0x30 | MODE_BACKWARDS,
            0x0d,
        );
        let out = refresh(&mut c, &mut s);
        assert_eq!(
            out.copies,
            vec![CopyRect {
                src_x: 200,
                src_y: 52,
                dst: Rect::new(200, 53, 16, 8)
            }]
        );
        // Through the MMIO BAR: a solid fill (no copy reported).
        let mmio = |c: &mut CirrusVga, off: u64, v: u8| c.bar_write(BAR_MMIO, 0x100 + off, &[v]);
        mmio(&mut c, 0x04, 0x44);
        mmio(&mut c, 0x05, 0x55);
        mmio(&mut c, 0x06, 0x66);
        mmio(&mut c, 0x07, 0x00);
        mmio(&mut c, 0x08, 15);
        mmio(&mut c, 0x0a, 1);
        mmio(&mut c, 0x0c, 0x00);
        mmio(&mut c, 0x0d, 0x05);
        mmio(&mut c, 0x10, 0);
        mmio(&mut c, 0x11, 0);
        mmio(&mut c, 0x12, 0);
        mmio(&mut c, 0x18, MODE_PATTERN | MODE_COLOR_EXPAND | 0x30);
        mmio(&mut c, 0x1a, 0x0d);
        mmio(&mut c, 0x1b, MODEEXT_SOLID_FILL);
        mmio(&mut c, 0x40, 0x02);
        let mut status = [0u8];
        c.bar_read(BAR_MMIO, 0x140, &mut status);
        assert_eq!(status[0] & 1, 0);
        assert_eq!(c.vram().read_u32(1280 + 12), 0x0066_5544);
        let out = refresh(&mut c, &mut s);
        assert!(out.copies.is_empty());
        assert_eq!(s.pixel(3, 1), Some(0x665544));
    }

    #[test]
    fn system_to_video_through_window_and_blit_window() {
        let mut c = card();
        set_mode(&mut c, 320, 200, 0x11, 320, 0);
        // 6 bytes a line -> 8 bytes written per line; 2 lines.
        blit(&mut c, 6, 2, 1000, 320, 0, 0, MODE_MEMSYS_SRC, 0x0d);
        assert_eq!(read_gr(&mut c, 0x31) & 1, 1, "busy while waiting");
        assert!(!c.linear_direct_ok());
        c.window_write(0x0, &[1, 2, 3, 4]);
        assert_eq!(
            c.vram().read_u8(0),
            0,
            "the window feeds the blitter, not VRAM"
        );
        assert_eq!(c.vram().read_u8(1000), 0, "a line is written once complete");
        c.window_write(0x4, &[5, 6, 0, 0]);
        assert_eq!(c.vram().read_u8(1000), 1);
        // Second line through the BAR0 blit source window.
        c.bar_write(BAR_LINEAR, BLIT_SOURCE_WINDOW + 0x40, &[7, 8, 9, 10]);
        c.bar_write(BAR_LINEAR, BLIT_SOURCE_WINDOW, &[11, 12, 0, 0]);
        assert_eq!(read_gr(&mut c, 0x31) & 1, 0);
        assert!(c.linear_direct_ok());
        let mut out = [0u8; 6];
        c.vram().read(1000, &mut out);
        assert_eq!(out, [1, 2, 3, 4, 5, 6]);
        c.vram().read(1320, &mut out);
        assert_eq!(out, [7, 8, 9, 10, 11, 12]);
        // Now the window writes VRAM again.
        c.window_write(0x0, &[0xee]);
        assert_eq!(c.vram().read_u8(0), 0xee);
        // A GR31 reset abandons a waiting blit.
        blit(&mut c, 6, 2, 2000, 320, 0, 0, MODE_MEMSYS_SRC, 0x0d);
        gr(&mut c, 0x31, 0x04);
        gr(&mut c, 0x31, 0x00);
        assert!(c.linear_direct_ok());
        c.bar_write(BAR_LINEAR, 2000, &[0x42]);
        assert_eq!(c.vram().read_u8(2000), 0x42);
    }

    #[test]
    fn autostart_and_mmio_at_b8000() {
        let mut c = card();
        sr(&mut c, 0x07, 0x01);
        sr(&mut c, 0x17, 0x04);
        let w = |c: &mut CirrusVga, off: u64, v: u8| c.window_write(0x18000 + off, &[v]);
        w(&mut c, 0x04, 0x9c);
        w(&mut c, 0x08, 3);
        w(&mut c, 0x0c, 16);
        w(&mut c, 0x18, MODE_PATTERN | MODE_COLOR_EXPAND);
        w(&mut c, 0x1a, 0x0d);
        w(&mut c, 0x1b, MODEEXT_SOLID_FILL);
        w(&mut c, 0x40, 0x80); // autostart
        w(&mut c, 0x10, 0x40);
        w(&mut c, 0x11, 0x00);
        assert_eq!(c.vram().read_u32(0x40), 0);
        w(&mut c, 0x12, 0x00); // GR2A write starts the blit
        assert_eq!(c.vram().read_u32(0x40), 0x9c9c_9c9c);
        let mut b = [0u8];
        c.window_read(0x18004, &mut b);
        assert_eq!(b[0], 0x9c);
    }

    #[test]
    fn cve_2016_9921_copy_in_standard_vga_mode_has_no_depth_to_divide_by() {
        // QEMU divided by bpp / 8 = 0 when a screen-to-screen copy ran in VGA mode.
        let mut c = card();
        sr(&mut c, 0x07, 0x00);
        c.vram_mut().write(0x100, &[1, 2, 3, 4]);
        blit(&mut c, 4, 1, 0x200, 64, 0x100, 64, 0x00, 0x0d);
        assert_eq!(c.vram().read_u32(0x200), 0x0403_0201);
        let mut s = Surface::default();
        let out = refresh(&mut c, &mut s);
        assert!(out.copies.is_empty());
        // And with an extended mode but pitches that do not match the screen, or zero.
        set_mode(&mut c, 64, 8, 0x11, 64, 0);
        blit(&mut c, 4, 2, 0x200, 0, 0x100, 0, 0x00, 0x0d);
        assert_eq!(read_gr(&mut c, 0x31) & 1, 0);
        let out = refresh(&mut c, &mut s);
        assert!(out.copies.is_empty());
    }

    #[test]
    fn cve_2017_2615_replayed_through_the_ports() {
        // The published reproducer: a backward blit whose start is near address 0.
        let mut c = card();
        set_mode(&mut c, 640, 480, 0x11, 640, 0);
        let before: Vec<u8> = {
            let mut b = vec![0u8; 4 * MIB];
            c.vram().read(0, &mut b);
            b
        };
        blit(
            &mut c,
            0x1000,
            0x10,
            0x10,
            0x1000,
            0x0,
            0x1000,
            MODE_BACKWARDS,
            0x0d,
        );
        assert_eq!(read_gr(&mut c, 0x31) & 3, 0);
        let mut after = vec![0u8; 4 * MIB];
        c.vram().read(0, &mut after);
        assert!(after == before, "nothing written");
    }

    #[test]
    fn cve_2018_7858_display_past_the_end_of_vram_wraps() {
        // The display area starts near the end of VRAM and runs far past it.
        let mut c = card();
        set_mode(&mut c, 2048, 1024, 0x19, 8184, 0);
        // Start address at the maximum CR0C/0D/1B/1D can hold (20 bits * 4 = 4 MiB - 4).
        cr(&mut c, 0x0c, 0xff);
        cr(&mut c, 0x0d, 0xff);
        cr(&mut c, 0x1b, 0x1d | 0x10);
        cr(&mut c, 0x1d, 0x80);
        c.vram_mut().write_u32(0, 0x00aa_bbcc);
        c.vram_mut().write_u32(4 * MIB - 4, 0x0011_2233);
        let mut s = Surface::default();
        let out = refresh(&mut c, &mut s);
        assert_eq!((s.width, s.height), (2048, 1024));
        assert!(out.resized);
        assert_eq!(s.pixel(0, 0), Some(0x112233), "last pixel of VRAM");
        assert_eq!(s.pixel(1, 0), Some(0xaabbcc), "wrapped to the start");
        // The cursor reads inside VRAM whatever SR13 says.
        sr(&mut c, 0x12, 0x05);
        sr(&mut c, 0x13, 0xff);
        assert!(c.cursor().is_some());
    }

    #[test]
    fn seabios_detects_the_card_and_sets_vbe_1024x768x16_with_banking() {
        let mut c = card();
        // Mode 3 from POST leaves the attribute controller enabled.
        enable_display(&mut c);
        // cirrus_check
        sr(&mut c, 0x06, 0x92);
        assert_eq!(read_sr(&mut c, 0x06), 0x12);
        // clext_init
        let v = read_sr(&mut c, 0x0f);
        let x = (v >> 3) & 3;
        let memsize: u32 = if x == 3 && v & 0x80 != 0 {
            0x40
        } else {
            4 << x
        };
        assert_eq!(memsize * 64 * 1024, 4 * MIB as u32);
        sr(&mut c, 0x0a, v & 0x18);
        sr(&mut c, 0x07, 0x00);
        gr(&mut c, 0x31, 0x04);
        gr(&mut c, 0x31, 0x00);
        // INT 10h AX=4F02h BX=0117h -> cirrus mode 0x74, no LFB flag.
        sr(&mut c, 0x06, 0x12);
        for w in [
            0x0300u16, 0x2101, 0x0f02, 0x0003, 0x0e04, 0x1707, 0x760b, 0x760c, 0x760d, 0x760e,
            0x0412, 0x0013, 0x2017, 0x341b, 0x341c, 0x341d, 0x341e,
        ] {
            outw(&mut c, 0x3c4, w);
        }
        for w in [
            0x0000u16, 0x0001, 0x0002, 0x0003, 0x0004, 0x4005, 0x0506, 0x0f07, 0xff08, 0x0009,
            0x000a, 0x000b,
        ] {
            outw(&mut c, 0x3ce, w);
        }
        for w in [
            0x2911u16, 0xa300, 0x7f01, 0x7f02, 0x8603, 0x8304, 0x9405, 0x2406, 0xf507, 0x6009,
            0x000c, 0x000d, 0x0310, 0xff12, 0x0013, 0x4014, 0xff15, 0x2416, 0xc317, 0xff18, 0x001a,
            0x321b, 0x001d,
        ] {
            outw(&mut c, 0x3d4, w);
        }
        outb(&mut c, 0x3c6, 0x00);
        for _ in 0..4 {
            inb(&mut c, 0x3c6);
        }
        outb(&mut c, 0x3c6, 0xe1);
        outb(&mut c, 0x3c6, 0xff);
        // stdvga_attr_mask(0x10, 0x01, 0x01)
        inb(&mut c, 0x3da);
        let orig = inb(&mut c, 0x3c0);
        outb(&mut c, 0x3c0, 0x10);
        let v = inb(&mut c, 0x3c1);
        outb(&mut c, 0x3c0, v | 0x01);
        outb(&mut c, 0x3c0, orig);
        // cirrus_enable_16k_granularity, then clear VRAM bank by bank through 0xa0000.
        let gr0b = read_gr(&mut c, 0x0b);
        gr(&mut c, 0x0b, gr0b | 0x20);
        c.vram_mut().fill(0, 4 * MIB, 0x5a);
        let last_bank = (1024 * 768 * 2 / 0x4000 - 1) as u8;
        let pixel_bank = ((700 * 2048 + 1000 * 2) / 0x4000) as u8;
        for bank in [0, 1, pixel_bank, last_bank - 1, last_bank] {
            gr(&mut c, 0x09, bank);
            c.window_write(0, &vec![0; 0x4000]);
        }
        gr(&mut c, 0x09, 0);
        // The guest draws a red pixel at (1000, 700) through the bank window.
        let at = 700 * 2048 + 1000 * 2;
        gr(&mut c, 0x09, (at / 0x4000) as u8);
        c.window_write((at % 0x4000) as u64, &0xf800u16.to_le_bytes());
        let mut s = Surface::default();
        let out = refresh(&mut c, &mut s);
        assert!(out.resized);
        assert_eq!((s.width, s.height), (1024, 768));
        assert_eq!(c.depth(), Depth::Rgb565);
        assert_eq!(s.pixel(1000, 700), Some(0xff0000));
        assert_eq!(s.pixel(999, 700), Some(0));
        assert_eq!(s.pixel(1023, 767), Some(0), "cleared through the banks");
        assert_eq!(s.pixel(0, 15), Some(0), "bank 1");
        assert_eq!(s.pixel(0, 16), Some(0x5a_49d6), "bank 2 was not cleared");
        assert!(c.linear_direct_ok());
    }

    #[test]
    fn linux_cirrus_driver_sets_800x600x32_through_mmio() {
        let mut c = card();
        let w = |c: &mut CirrusVga, reg: u64, v: u8| c.bar_write(BAR_MMIO, reg, &[v]);
        let r = |c: &mut CirrusVga, reg: u64| {
            let mut b = [0u8];
            c.bar_read(BAR_MMIO, reg, &mut b);
            b[0]
        };
        let wreg_crt = |c: &mut CirrusVga, reg: u8, v: u8| {
            w(c, 0x14, reg);
            w(c, 0x15, v);
        };
        // cirrus_mode_set for 800x600@60 (htotal 1056, hsync 840-968, vtotal 628).
        let htotal = 1056 / 8 - 5;
        let hdispend = 800 / 8 - 1;
        let vtotal = 628 - 2;
        let vdispend = 600 - 1;
        wreg_crt(&mut c, 0x11, 0x20);
        wreg_crt(&mut c, 0x00, htotal as u8);
        wreg_crt(&mut c, 0x01, hdispend as u8);
        wreg_crt(&mut c, 0x04, (840 / 8 + 1) as u8);
        wreg_crt(&mut c, 0x05, (968 / 8 + 1) as u8);
        wreg_crt(&mut c, 0x06, vtotal as u8);
        wreg_crt(&mut c, 0x12, vdispend as u8);
        let mut tmp = 0x40;
        if (vdispend + 1) & 512 != 0 {
            tmp |= 0x20;
        }
        wreg_crt(&mut c, 0x09, tmp);
        let mut tmp = 0x10;
        if vtotal & 0x100 != 0 {
            tmp |= 0x01;
        }
        if vdispend & 0x100 != 0 {
            tmp |= 0x02;
        }
        if (vdispend + 1) & 0x100 != 0 {
            tmp |= 0x08;
        }
        if vtotal & 0x200 != 0 {
            tmp |= 0x20;
        }
        if vdispend & 0x200 != 0 {
            tmp |= 0x40;
        }
        wreg_crt(&mut c, 0x07, tmp);
        let mut tmp = 0;
        if (htotal + 5) & 0x40 != 0 {
            tmp |= 0x10;
        }
        if (htotal + 5) & 0x80 != 0 {
            tmp |= 0x20;
        }
        wreg_crt(&mut c, 0x1a, tmp);
        wreg_crt(&mut c, 0x17, 0x03);
        // cirrus_format_set(XRGB8888)
        w(&mut c, 0x04, 0x07);
        let sr07 = (r(&mut c, 0x05) & 0xe0) | 0x19;
        w(&mut c, 0x05, sr07);
        w(&mut c, 0x0e, 0x05);
        w(&mut c, 0x0f, 0x40);
        w(&mut c, 0x0e, 0x06);
        w(&mut c, 0x0f, 0x01);
        for _ in 0..4 {
            r(&mut c, 0x06);
        }
        w(&mut c, 0x06, 0xc5);
        // cirrus_pitch_set(3200) and start address 0.
        let pitch = 3200usize;
        wreg_crt(&mut c, 0x13, (pitch / 8) as u8);
        let cr1b = 0x22 | ((pitch >> 7) & 0x10) as u8 | ((pitch >> 6) & 0x40) as u8;
        wreg_crt(&mut c, 0x1b, cr1b);
        wreg_crt(&mut c, 0x0c, 0);
        wreg_crt(&mut c, 0x0d, 0);
        w(&mut c, 0x14, 0x1b);
        let t = r(&mut c, 0x15) & 0xf2;
        w(&mut c, 0x15, t);
        w(&mut c, 0x14, 0x1d);
        let t = r(&mut c, 0x15) & 0x7f;
        w(&mut c, 0x15, t);
        // outb(0x20, 0x3c0)
        outb(&mut c, 0x3c0, 0x20);
        assert!(c.linear_direct_ok());
        // The driver's damage blit writes the LFB; the engine maps it directly.
        c.vram_mut().write_u32(599 * 3200 + 799 * 4, 0x00c0_ffee);
        let log = c.vram_mut().take_dirty();
        let mut s = Surface::default();
        c.refresh(Some(&log), &mut s);
        assert_eq!((s.width, s.height), (800, 600));
        assert_eq!(s.pixel(799, 599), Some(0xc0ffee));
        // Trapped LFB writes land in the same place.
        c.bar_write(BAR_LINEAR, 3200 + 4, &0x0012_3456u32.to_le_bytes());
        let out = c.refresh(None, &mut s);
        assert_eq!(s.pixel(1, 1), Some(0x123456));
        assert!(!out.damage.is_empty());
        let mut b = [0u8; 4];
        c.bar_read(BAR_LINEAR, 3200 + 4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x123456);
    }

    #[test]
    fn returning_to_standard_vga_redraws_through_the_core() {
        let mut c = card();
        set_mode(&mut c, 64, 16, 0x19, 256, 0);
        let mut s = Surface::default();
        refresh(&mut c, &mut s);
        assert_eq!((s.width, s.height), (64, 16));
        c.vga_mut()
            .set_standard_mode(crate::vga::StandardMode::Text80x25);
        sr(&mut c, 0x07, 0x00);
        enable_display(&mut c);
        let out = refresh(&mut c, &mut s);
        assert!(out.resized);
        assert!(c.text_screen().is_some());
        assert!(c.cursor().is_none());
    }

    #[test]
    fn state_round_trips_and_reset_restores_power_on() {
        let mut c = card();
        set_mode(&mut c, 64, 16, 0x19, 256, 0);
        gr(&mut c, 0x09, 0x12);
        set_cursor_colours(&mut c, [1, 2, 3], [4, 5, 6]);
        let state = c.state();
        let mut d = card();
        d.restore(state.clone());
        assert_eq!(d.state(), state);
        assert_eq!(read_gr(&mut d, 0x09), 0x12);
        PciFunction::reset(&mut d);
        assert_eq!(read_gr(&mut d, 0x09), 0x00);
        assert_eq!(read_sr(&mut d, 0x07), 0x00);
        assert_eq!(read_sr(&mut d, 0x0f), 0x98);
        // A hostile saved state is sanitized.
        let mut bad = state;
        bad.cirrus.graphics.truncate(3);
        bad.cirrus.hidden_palette.clear();
        bad.cirrus.crtc[0x27] = 0;
        d.restore(bad);
        assert_eq!(read_gr(&mut d, 0x31), 0);
        assert_eq!(read_cr(&mut d, 0x27), 0xb8);
    }

    #[test]
    fn random_hostile_traffic_never_panics() {
        let mut rng = TestRng(0x5446_0000_dead_beef);
        let mut c = card();
        let mut s = Surface::default();
        for round in 0..12_000u32 {
            let r = rng.next();
            let v = (r >> 8) as u8;
            match r % 10 {
                0..=2 => {
                    // Index/data pairs on the interesting ports.
                    let port = [0x3c4u16, 0x3ce, 0x3d4][(r >> 16) as usize % 3];
                    outb(&mut c, port, (r >> 24) as u8);
                    outb(&mut c, port + 1, v);
                }
                3 => {
                    let port = 0x3b0 + ((r >> 16) % 0x30) as u16;
                    if r & 0x100_0000 != 0 {
                        outb(&mut c, port, v);
                    } else {
                        inb(&mut c, port);
                    }
                }
                4 => c.window_write((r >> 16) % 0x20000, &[v, v ^ 0xff]),
                5 => {
                    let mut b = [0u8; 3];
                    c.window_read((r >> 16) % 0x20000, &mut b);
                }
                6 => c.bar_write(BAR_LINEAR, (r >> 16) % (LINEAR_BAR_SIZE + 16), &[v; 4]),
                7 => c.bar_write(BAR_MMIO, (r >> 16) % 0x1100, &[v]),
                8 => {
                    let mut b = [0u8; 2];
                    let bar = [BAR_LINEAR, BAR_MMIO, ROM_BAR, 3][(r >> 16) as usize % 4];
                    c.bar_read(bar, (r >> 20) % (LINEAR_BAR_SIZE + 16), &mut b);
                }
                _ => {
                    // Blit registers with a start.
                    gr(&mut c, 0x20 + ((r >> 16) % 0x1a) as u8, v);
                    if r & 0x1000_0000 != 0 {
                        gr(&mut c, 0x31, 0x02);
                        gr(&mut c, 0x31, 0x00);
                    }
                }
            }
            if round % 3000 == 0 {
                enable_display(&mut c);
                let _ = c.refresh(None, &mut s);
                let _ = c.cursor();
                let mut copy = s.clone();
                let _ = c.compose_cursor(&mut copy);
                let _ = c.linear_direct_ok();
            }
        }
        assert_eq!(c.vram().len(), 4 * MIB);
        assert_eq!(c.config().device_id(), DEVICE_CLGD5446);
    }
}
