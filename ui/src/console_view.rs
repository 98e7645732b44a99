//! `ConsoleView`: a widget that shows a VM's screen and turns the user's keyboard and
//! pointer into guest input through callbacks. It knows nothing of KVM: the app pushes
//! frames with [`ConsoleView::set_frame`] (a whole frame) or
//! [`ConsoleView::update_frame_xrgb`] (a guest frame plus the rectangles that changed) and
//! forwards the callbacks to the engine.
//!
//! The frame is kept as tiles of [`TILE_SIZE`] pixels, each its own `gdk::MemoryTexture`
//! (with a one-pixel apron of its neighbours, clipped away when drawn, so linear filtering
//! shows no seams). An update replaces only the tiles whose pixels changed, and the render
//! node of every other tile is reused, so GTK's renderer sees (and redraws) only the
//! changed tiles' area: a blinking text cursor costs one small texture upload and a small
//! redraw instead of the whole window. Smooth scaling draws texture nodes; the sharp filter
//! (when the frame is scaled) draws each tile with Cairo's nearest-neighbour filter. Scaled
//! to fit or one guest pixel per device pixel; tile edges are snapped to device pixels.
//! Keyboard grab: while grabbed the window's system shortcuts are inhibited, the pointer is
//! hidden and moves the guest mouse relatively, and a hint shows the release combination
//! (default Ctrl+Alt). Not done: pointer confinement/warping (GTK 4 has no API for it),
//! touch input, clipboard sharing.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;

use gtk::prelude::*;
use gtk::subclass::prelude::*;
use gtk::{gdk, glib, graphene, gsk};

use crate::geometry::{
    button_bit, frame_fits, frame_rect, is_on_frame, to_guest_absolute, xrgb_to_opaque, FrameRect,
    RelativeMotion, ScaleMode,
};
use crate::keymap::{combo_label, evdev_from_hardware_keycode, GrabReleaseDetector, Modifiers};

/// How a scaled frame is filtered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScaleFilter {
    /// Linear filtering: smooth, for text that is scaled down.
    #[default]
    Smooth,
    /// Nearest neighbour: crisp pixels.
    Sharp,
}

/// How pointer motion reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PointerMode {
    /// Absolute positions (a USB tablet): the guest pointer follows the host pointer.
    #[default]
    Absolute,
    /// Relative motion (a PS/2 mouse): only while grabbed.
    Relative,
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a {width}x{height} frame with stride {stride} does not fit in {len} bytes")]
    TooSmall {
        width: u32,
        height: u32,
        stride: usize,
        len: usize,
    },
    #[error("a {width}x{height} frame is larger than GTK can show")]
    TooLarge { width: u32, height: u32 },
}

/// The side of a square tile of the frame, in frame pixels.
pub const TILE_SIZE: u32 = 128;

/// A rectangle of the frame in frame pixels (what changed since the last update).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DamageRect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl DamageRect {
    pub fn new(x: u32, y: u32, width: u32, height: u32) -> Self {
        Self {
            x,
            y,
            width,
            height,
        }
    }
}

/// How a frame is cut into tiles: pure arithmetic, no GTK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TileGrid {
    width: u32,
    height: u32,
    tile: u32,
    columns: u32,
    rows: u32,
}

impl TileGrid {
    /// A grid of `tile`-pixel tiles over a `width`×`height` frame (edge tiles are smaller).
    pub(crate) fn new(width: u32, height: u32, tile: u32) -> Self {
        let tile = tile.max(1);
        Self {
            width,
            height,
            tile,
            columns: width.div_ceil(tile),
            rows: height.div_ceil(tile),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.columns as usize * self.rows as usize
    }

    /// The pixels tile `index` shows (row-major order).
    pub(crate) fn tile_rect(&self, index: usize) -> DamageRect {
        let columns = self.columns.max(1) as usize;
        let (column, row) = ((index % columns) as u32, (index / columns) as u32);
        let x = column.saturating_mul(self.tile).min(self.width);
        let y = row.saturating_mul(self.tile).min(self.height);
        DamageRect {
            x,
            y,
            width: self.tile.min(self.width - x),
            height: self.tile.min(self.height - y),
        }
    }

    /// The pixels tile `index`'s texture holds: its own plus a one-pixel apron from its
    /// neighbours (so linear filtering blends across tile edges), within the frame.
    pub(crate) fn texture_rect(&self, index: usize) -> DamageRect {
        let r = self.tile_rect(index);
        let x = r.x.saturating_sub(1);
        let y = r.y.saturating_sub(1);
        let right = (r.x + r.width).saturating_add(1).min(self.width);
        let bottom = (r.y + r.height).saturating_add(1).min(self.height);
        DamageRect {
            x,
            y,
            width: right - x,
            height: bottom - y,
        }
    }

    /// `rect` cut to the frame; `None` when nothing of it is inside.
    pub(crate) fn clamp(&self, rect: &DamageRect) -> Option<DamageRect> {
        if rect.x >= self.width || rect.y >= self.height || rect.width == 0 || rect.height == 0 {
            return None;
        }
        Some(DamageRect {
            x: rect.x,
            y: rect.y,
            width: rect.width.min(self.width - rect.x),
            height: rect.height.min(self.height - rect.y),
        })
    }

    /// The tiles (indices) whose textures hold a pixel of `rect`, apron included.
    pub(crate) fn tiles_touched(&self, rect: &DamageRect) -> Vec<usize> {
        let Some(r) = self.clamp(rect) else {
            return Vec::new();
        };
        // Tile c's texture spans pixels c*T-1 ..= (c+1)*T, so pixel p is in tiles
        // ceil(p/T)-1 ..= (p+1)/T.
        let span = |first: u32, last: u32, count: u32| {
            let from = first.div_ceil(self.tile).saturating_sub(1);
            let to = ((last + 1) / self.tile).min(count.saturating_sub(1));
            from..=to
        };
        let columns = span(r.x, r.x + r.width - 1, self.columns);
        let rows = span(r.y, r.y + r.height - 1, self.rows);
        let mut out = Vec::new();
        for row in rows {
            for column in columns.clone() {
                out.push(row as usize * self.columns as usize + column as usize);
            }
        }
        out
    }
}

/// How a tile is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TileDrawing {
    /// A texture node: the GL renderer uploads the texture once and keeps it.
    Texture,
    /// A Cairo node that paints the tile's pixels (linear filter): GTK 4.8's Cairo renderer
    /// would copy every texture node's pixels on every frame, changed or not, while a
    /// Cairo node is only replayed, clipped to what changed.
    CairoSmooth,
    /// A Cairo node with the nearest-neighbour filter (the sharp filter, scaled).
    CairoSharp,
}

/// Where the cached render nodes were made for: the frame's place in the widget, the
/// device scale and how tiles are drawn. Any change makes every tile's node again.
#[derive(Debug, Clone, Copy, PartialEq)]
struct NodeKey {
    rect: FrameRect,
    scale_factor: i32,
    drawing: TileDrawing,
}

struct Tile {
    /// Opaque BGRA pixels of the grid's `texture_rect`, packed rows.
    bytes: glib::Bytes,
    texture: gdk::MemoryTexture,
    node: RefCell<Option<(NodeKey, gsk::RenderNode)>>,
}

struct Frame {
    width: u32,
    height: u32,
    grid: TileGrid,
    /// The whole frame: opaque BGRA, `width * 4` bytes per row.
    pixels: Vec<u8>,
    tiles: Vec<Tile>,
}

impl Frame {
    /// A frame from `height` rows of `stride` bytes of B,G,R,X pixels (X ignored).
    fn new(width: u32, height: u32, stride: usize, source: &[u8]) -> Option<Self> {
        let pixels = xrgb_to_opaque(width, height, stride, source)?;
        let grid = TileGrid::new(width, height, TILE_SIZE);
        let mut frame = Self {
            width,
            height,
            grid,
            pixels,
            tiles: Vec::with_capacity(grid.len()),
        };
        for index in 0..grid.len() {
            let tile = frame.make_tile(index);
            frame.tiles.push(tile);
        }
        Some(frame)
    }

    fn make_tile(&self, index: usize) -> Tile {
        let r = self.grid.texture_rect(index);
        let frame_row = self.width as usize * 4;
        let row = r.width as usize * 4;
        let mut data = Vec::with_capacity(row * r.height as usize);
        for y in r.y..r.y + r.height {
            let start = y as usize * frame_row + r.x as usize * 4;
            data.extend_from_slice(&self.pixels[start..start + row]);
        }
        let bytes = glib::Bytes::from_owned(data);
        let texture = gdk::MemoryTexture::new(
            r.width as i32,
            r.height as i32,
            gdk::MemoryFormat::B8g8r8a8Premultiplied,
            &bytes,
            row,
        );
        Tile {
            bytes,
            texture,
            node: RefCell::new(None),
        }
    }

    /// Copies the pixels of `damage` (None: all) from `source` (same size as the frame,
    /// rows of `stride` bytes, B,G,R,X) and remakes the tiles whose pixels changed.
    /// Returns whether any did.
    fn update(&mut self, stride: usize, source: &[u8], damage: Option<&[DamageRect]>) -> bool {
        let dirty = copy_damage(&self.grid, &mut self.pixels, stride, source, damage);
        let mut changed = false;
        for (index, is_dirty) in dirty.into_iter().enumerate() {
            if is_dirty && index < self.tiles.len() {
                let tile = self.make_tile(index);
                self.tiles[index] = tile;
                changed = true;
            }
        }
        changed
    }

    /// The render node of tile `index` for `key`, made when missing or made for another key.
    fn tile_node(&self, index: usize, key: &NodeKey) -> Option<gsk::RenderNode> {
        let tile = self.tiles.get(index)?;
        if let Some((k, node)) = tile.node.borrow().as_ref() {
            if k == key {
                return Some(node.clone());
            }
        }
        let node = self.make_node(index, tile, key)?;
        *tile.node.borrow_mut() = Some((*key, node.clone()));
        Some(node)
    }

    fn make_node(&self, index: usize, tile: &Tile, key: &NodeKey) -> Option<gsk::RenderNode> {
        let rect = &key.rect;
        let scale = f64::from(key.scale_factor.max(1));
        let sx = rect.width / f64::from(self.width);
        let sy = rect.height / f64::from(self.height);
        let map_x = |x: u32| rect.x + f64::from(x) * sx;
        let map_y = |y: u32| rect.y + f64::from(y) * sy;
        let snap = |v: f64| (v * scale).round() / scale;
        let own = self.grid.tile_rect(index);
        let (clip_x, clip_y) = (snap(map_x(own.x)), snap(map_y(own.y)));
        let clip = graphene::Rect::new(
            clip_x as f32,
            clip_y as f32,
            (snap(map_x(own.x + own.width)) - clip_x) as f32,
            (snap(map_y(own.y + own.height)) - clip_y) as f32,
        );
        let held = self.grid.texture_rect(index);
        let (tex_x, tex_y) = (map_x(held.x), map_y(held.y));
        let filter = match key.drawing {
            TileDrawing::Texture => {
                let bounds = graphene::Rect::new(
                    tex_x as f32,
                    tex_y as f32,
                    (map_x(held.x + held.width) - tex_x) as f32,
                    (map_y(held.y + held.height) - tex_y) as f32,
                );
                let texture = gsk::TextureNode::new(&tile.texture, &bounds);
                return Some(gsk::ClipNode::new(texture, &clip).upcast());
            }
            TileDrawing::CairoSmooth => gtk::cairo::Filter::Good,
            TileDrawing::CairoSharp => gtk::cairo::Filter::Nearest,
        };
        let surface = gtk::cairo::ImageSurface::create_for_data(
            tile.bytes.to_vec(),
            gtk::cairo::Format::Rgb24,
            i32::try_from(held.width).ok()?,
            i32::try_from(held.height).ok()?,
            i32::try_from(held.width as usize * 4).ok()?,
        )
        .ok()?;
        // The node's bounds are the tile's snapped place, which clips the apron away.
        let node = gsk::CairoNode::new(&clip);
        let cr = node.draw_context();
        cr.translate(tex_x, tex_y);
        cr.scale(sx, sy);
        let pattern = gtk::cairo::SurfacePattern::create(&surface);
        pattern.set_filter(filter);
        // Frame edges repeat their pixels instead of fading into transparency.
        pattern.set_extend(gtk::cairo::Extend::Pad);
        if cr.set_source(&pattern).is_ok() {
            let _ = cr.paint();
        }
        drop(cr);
        Some(node.upcast())
    }

    /// The whole frame as one texture.
    fn texture(&self) -> gdk::Texture {
        let bytes = glib::Bytes::from(&self.pixels[..]);
        gdk::MemoryTexture::new(
            self.width as i32,
            self.height as i32,
            gdk::MemoryFormat::B8g8r8a8Premultiplied,
            &bytes,
            self.width as usize * 4,
        )
        .upcast()
    }
}

/// Copies the rectangles `damage` (None: the whole frame) of `source` (rows of `stride`
/// bytes, B,G,R,X) into `frame` (the grid's frame as opaque BGRA, packed rows). Returns,
/// per tile of `grid`, whether its texture's pixels changed. Rectangles are cut to the
/// frame; rows missing from `source` are skipped.
fn copy_damage(
    grid: &TileGrid,
    frame: &mut [u8],
    stride: usize,
    source: &[u8],
    damage: Option<&[DamageRect]>,
) -> Vec<bool> {
    let whole = [DamageRect::new(0, 0, grid.width, grid.height)];
    let rects = damage.unwrap_or(&whole);
    let mut dirty = vec![false; grid.len()];
    let frame_row = grid.width as usize * 4;
    for rect in rects {
        let Some(r) = grid.clamp(rect) else {
            continue;
        };
        let len = r.width as usize * 4;
        for y in r.y..r.y + r.height {
            let from = (y as usize)
                .checked_mul(stride)
                .and_then(|v| v.checked_add(r.x as usize * 4));
            let to = y as usize * frame_row + r.x as usize * 4;
            let (Some(src), Some(dst)) = (
                from.and_then(|from| source.get(from..from.checked_add(len)?)),
                frame.get_mut(to..to + len),
            ) else {
                continue;
            };
            if let Some((first, last)) = copy_opaque_row(src, dst) {
                let changed = DamageRect::new(r.x + first, y, last - first + 1, 1);
                for index in grid.tiles_touched(&changed) {
                    if let Some(d) = dirty.get_mut(index) {
                        *d = true;
                    }
                }
            }
        }
    }
    dirty
}

/// Copies one row of B,G,R,X pixels into opaque B,G,R,0xff; returns the first and last
/// pixel of `dst` that changed, if any. Both slices have the same length (a multiple of 4).
fn copy_opaque_row(src: &[u8], dst: &mut [u8]) -> Option<(u32, u32)> {
    let mut changed: Option<(u32, u32)> = None;
    for (i, (s, d)) in src.chunks_exact(4).zip(dst.chunks_exact_mut(4)).enumerate() {
        if s[..3] != d[..3] || d[3] != 0xff {
            d.copy_from_slice(&[s[0], s[1], s[2], 0xff]);
            let i = i as u32;
            changed = Some(changed.map_or((i, i), |(first, _)| (first, i)));
        }
    }
    changed
}

type KeyCallback = Box<dyn Fn(u16, bool)>;
type AbsoluteCallback = Box<dyn Fn(u16, u16, u8)>;
type RelativeCallback = Box<dyn Fn(i32, i32, i32, u8)>;
type GrabCallback = Box<dyn Fn(bool)>;

mod imp {
    use super::*;

    #[derive(Default)]
    pub struct ConsoleView {
        pub(super) frame: RefCell<Option<Frame>>,
        pub(super) mode: Cell<ScaleMode>,
        pub(super) filter: Cell<ScaleFilter>,
        pub(super) pointer_mode: Cell<PointerMode>,
        pub(super) grabbed: Cell<bool>,
        pub(super) release_combo: Cell<Modifiers>,
        pub(super) detector: RefCell<GrabReleaseDetector>,
        pub(super) relative: RefCell<RelativeMotion>,
        pub(super) buttons: Cell<u8>,
        pub(super) pressed_keys: RefCell<BTreeSet<u16>>,
        pub(super) hint: RefCell<Option<gtk::Label>>,
        pub(super) hint_template: RefCell<String>,
        pub(super) on_key: RefCell<Option<KeyCallback>>,
        pub(super) on_absolute: RefCell<Option<AbsoluteCallback>>,
        pub(super) on_relative: RefCell<Option<RelativeCallback>>,
        pub(super) on_grab: RefCell<Option<GrabCallback>>,
    }

    #[glib::object_subclass]
    impl ObjectSubclass for ConsoleView {
        const NAME: &'static str = "DeskVmConsoleView";
        type Type = super::ConsoleView;
        type ParentType = gtk::Widget;

        fn class_init(klass: &mut Self::Class) {
            klass.set_css_name("consoleview");
            klass.set_accessible_role(gtk::AccessibleRole::Img);
        }
    }

    impl ObjectImpl for ConsoleView {
        fn constructed(&self) {
            self.parent_constructed();
            self.obj().setup();
        }

        fn dispose(&self) {
            if let Some(hint) = self.hint.take() {
                hint.unparent();
            }
        }
    }

    impl WidgetImpl for ConsoleView {
        fn measure(&self, orientation: gtk::Orientation, for_size: i32) -> (i32, i32, i32, i32) {
            let (hint_min, _, _, _) = self
                .hint
                .borrow()
                .as_ref()
                .map(|h| h.measure(orientation, for_size))
                .unwrap_or((0, 0, -1, -1));
            let natural = match (&*self.frame.borrow(), self.mode.get()) {
                (Some(f), ScaleMode::OneToOne) => {
                    let scale = self.obj().scale_factor().max(1) as u32;
                    let v = if orientation == gtk::Orientation::Horizontal {
                        f.width
                    } else {
                        f.height
                    };
                    i32::try_from(v / scale).unwrap_or(i32::MAX)
                }
                (Some(f), ScaleMode::Fit) => {
                    let v = if orientation == gtk::Orientation::Horizontal {
                        f.width
                    } else {
                        f.height
                    };
                    i32::try_from(v.min(640)).unwrap_or(640)
                }
                (None, _) => 320,
            };
            (hint_min, natural.max(hint_min), -1, -1)
        }

        fn size_allocate(&self, width: i32, height: i32, baseline: i32) {
            self.parent_size_allocate(width, height, baseline);
            if let Some(hint) = self.hint.borrow().as_ref() {
                let (_, nat_h, _, _) = hint.measure(gtk::Orientation::Vertical, width);
                hint.allocate(width, nat_h.min(height), -1, None);
            }
        }

        fn snapshot(&self, snapshot: &gtk::Snapshot) {
            let obj = self.obj();
            let (w, h) = (obj.width() as f32, obj.height() as f32);
            snapshot.append_color(&gdk::RGBA::BLACK, &graphene::Rect::new(0.0, 0.0, w, h));
            if let Some(rect) = obj.frame_rect() {
                if let Some(frame) = self.frame.borrow().as_ref() {
                    let scale_factor = obj.scale_factor().max(1);
                    let scaled =
                        (rect.width * f64::from(scale_factor) - f64::from(frame.width)).abs() > 0.5;
                    let cairo_renderer = obj
                        .native()
                        .and_then(|n| n.renderer())
                        .is_some_and(|r| r.is::<gsk::CairoRenderer>());
                    let drawing = if self.filter.get() == ScaleFilter::Sharp && scaled {
                        TileDrawing::CairoSharp
                    } else if cairo_renderer {
                        TileDrawing::CairoSmooth
                    } else {
                        TileDrawing::Texture
                    };
                    let key = NodeKey {
                        rect,
                        scale_factor,
                        drawing,
                    };
                    // The same node objects as last time for unchanged tiles: GTK's
                    // renderer diffs the trees and redraws only the changed tiles.
                    for index in 0..frame.tiles.len() {
                        if let Some(node) = frame.tile_node(index, &key) {
                            snapshot.append_node(&node);
                        }
                    }
                }
            }
            if let Some(hint) = self.hint.borrow().as_ref() {
                obj.snapshot_child(hint, snapshot);
            }
        }
    }
}

glib::wrapper! {
    /// Shows a VM's screen and forwards keyboard and pointer input through callbacks.
    pub struct ConsoleView(ObjectSubclass<imp::ConsoleView>)
        @extends gtk::Widget,
        @implements gtk::Buildable, gtk::ConstraintTarget;
}

impl Default for ConsoleView {
    fn default() -> Self {
        Self::new()
    }
}

impl ConsoleView {
    pub fn new() -> Self {
        glib::Object::new()
    }

    fn setup(&self) {
        let imp = self.imp();
        self.set_focusable(true);
        self.set_can_focus(true);
        self.set_hexpand(true);
        self.set_vexpand(true);
        self.set_overflow(gtk::Overflow::Hidden);
        imp.release_combo.set(Modifiers {
            ctrl: true,
            alt: true,
            ..Modifiers::default()
        });
        *imp.detector.borrow_mut() = GrabReleaseDetector::new(imp.release_combo.get());
        *imp.hint_template.borrow_mut() = "Press {combo} to release the keyboard".into();

        let hint = gtk::Label::new(None);
        hint.add_css_class("osd");
        hint.add_css_class("console-grab-hint");
        hint.set_halign(gtk::Align::Center);
        hint.set_valign(gtk::Align::Start);
        hint.set_margin_top(12);
        hint.set_visible(false);
        hint.set_parent(self);
        *imp.hint.borrow_mut() = Some(hint);
        self.update_hint();

        let keys = gtk::EventControllerKey::new();
        keys.set_propagation_phase(gtk::PropagationPhase::Capture);
        let view = self.downgrade();
        keys.connect_key_pressed(move |_, keyval, keycode, _| {
            let Some(view) = view.upgrade() else {
                return glib::Propagation::Proceed;
            };
            if !view.is_grabbed() && keyval == gdk::Key::F11 {
                return glib::Propagation::Proceed;
            }
            view.on_hardware_key(keycode, true);
            glib::Propagation::Stop
        });
        let view = self.downgrade();
        keys.connect_key_released(move |_, _, keycode, _| {
            if let Some(view) = view.upgrade() {
                view.on_hardware_key(keycode, false);
            }
        });
        self.add_controller(keys);

        let focus = gtk::EventControllerFocus::new();
        let view = self.downgrade();
        focus.connect_leave(move |_| {
            if let Some(view) = view.upgrade() {
                view.set_grabbed(false);
                view.release_all_keys();
            }
        });
        self.add_controller(focus);

        let motion = gtk::EventControllerMotion::new();
        let view = self.downgrade();
        motion.connect_motion(move |_, x, y| {
            if let Some(view) = view.upgrade() {
                view.on_motion(x, y);
            }
        });
        let view = self.downgrade();
        motion.connect_leave(move |_| {
            if let Some(view) = view.upgrade() {
                view.imp().relative.borrow_mut().reset();
            }
        });
        self.add_controller(motion);

        let click = gtk::GestureClick::new();
        click.set_button(0);
        let view = self.downgrade();
        click.connect_pressed(move |gesture, _, x, y| {
            if let Some(view) = view.upgrade() {
                view.grab_focus();
                if view.pointer_mode() == PointerMode::Relative && !view.is_grabbed() {
                    view.set_grabbed(true);
                    return;
                }
                view.on_button(gesture.current_button(), true, x, y);
            }
        });
        let view = self.downgrade();
        click.connect_released(move |gesture, _, x, y| {
            if let Some(view) = view.upgrade() {
                view.on_button(gesture.current_button(), false, x, y);
            }
        });
        self.add_controller(click);

        let scroll = gtk::EventControllerScroll::new(gtk::EventControllerScrollFlags::VERTICAL);
        let view = self.downgrade();
        scroll.connect_scroll(move |_, _, dy| {
            if let Some(view) = view.upgrade() {
                let wheel = dy.round().clamp(-8.0, 8.0) as i32;
                if wheel != 0 {
                    view.emit_relative(0, 0, -wheel);
                }
            }
            glib::Propagation::Stop
        });
        self.add_controller(scroll);
    }

    /// Shows a new frame: `bytes` holds `height` rows of `stride` bytes, each pixel
    /// B,G,R,A with A = 0xff (GTK 4.8 has no BGRX format: copy guest frames with
    /// [`crate::geometry::xrgb_to_opaque`], or hand them to
    /// [`ConsoleView::update_frame_xrgb`] as they are). Only the tiles whose pixels differ
    /// from the frame shown are uploaded and redrawn.
    pub fn set_frame(
        &self,
        width: u32,
        height: u32,
        stride: usize,
        bytes: glib::Bytes,
    ) -> Result<(), FrameError> {
        self.update_frame_xrgb(width, height, stride, &bytes, None)
    }

    /// Shows a guest frame: `pixels` holds `height` rows of `stride` bytes, each pixel
    /// B,G,R,X (the X byte is ignored). `damage` says which rectangles changed since the
    /// frame last given (None: maybe all; a frame of another size is always taken whole);
    /// only those pixels are copied, and only the tiles whose pixels differ are uploaded
    /// and redrawn. Rectangles outside the frame are cut to it.
    pub fn update_frame_xrgb(
        &self,
        width: u32,
        height: u32,
        stride: usize,
        pixels: &[u8],
        damage: Option<&[DamageRect]>,
    ) -> Result<(), FrameError> {
        if !frame_fits(width, height, stride, pixels.len()) {
            return Err(FrameError::TooSmall {
                width,
                height,
                stride,
                len: pixels.len(),
            });
        }
        if i32::try_from(width).is_err() || i32::try_from(height).is_err() {
            return Err(FrameError::TooLarge { width, height });
        }
        let imp = self.imp();
        let mut current = imp.frame.borrow_mut();
        let same_size = current
            .as_ref()
            .is_some_and(|f| f.width == width && f.height == height);
        if same_size {
            let changed = current
                .as_mut()
                .is_some_and(|f| f.update(stride, pixels, damage));
            drop(current);
            if changed {
                self.queue_draw();
            }
            return Ok(());
        }
        let Some(frame) = Frame::new(width, height, stride, pixels) else {
            return Err(FrameError::TooSmall {
                width,
                height,
                stride,
                len: pixels.len(),
            });
        };
        *current = Some(frame);
        drop(current);
        self.queue_resize();
        self.queue_draw();
        Ok(())
    }

    /// Forgets the frame (the VM stopped): the view shows black.
    pub fn clear_frame(&self) {
        self.imp().frame.replace(None);
        self.queue_resize();
    }

    /// The size of the frame shown, if any.
    pub fn frame_size(&self) -> Option<(u32, u32)> {
        self.imp()
            .frame
            .borrow()
            .as_ref()
            .map(|f| (f.width, f.height))
    }

    /// The frame shown, as a texture (for screenshots: `texture.save_to_png`).
    pub fn texture(&self) -> Option<gdk::Texture> {
        self.imp().frame.borrow().as_ref().map(Frame::texture)
    }

    pub fn set_scale_mode(&self, mode: ScaleMode) {
        self.imp().mode.set(mode);
        self.queue_resize();
    }

    pub fn scale_mode(&self) -> ScaleMode {
        self.imp().mode.get()
    }

    pub fn set_scale_filter(&self, filter: ScaleFilter) {
        self.imp().filter.set(filter);
        self.queue_draw();
    }

    pub fn set_pointer_mode(&self, mode: PointerMode) {
        self.imp().pointer_mode.set(mode);
    }

    pub fn pointer_mode(&self) -> PointerMode {
        self.imp().pointer_mode.get()
    }

    /// The modifiers that release a grab (default Ctrl+Alt).
    pub fn set_release_combo(&self, combo: Modifiers) {
        let imp = self.imp();
        imp.release_combo.set(combo);
        *imp.detector.borrow_mut() = GrabReleaseDetector::new(combo);
        self.update_hint();
    }

    /// The grab hint text; `{combo}` is replaced by the release combination.
    pub fn set_grab_hint_template(&self, template: &str) {
        *self.imp().hint_template.borrow_mut() = template.to_string();
        self.update_hint();
    }

    fn update_hint(&self) {
        let imp = self.imp();
        let text = imp
            .hint_template
            .borrow()
            .replace("{combo}", &combo_label(imp.release_combo.get()));
        if let Some(hint) = imp.hint.borrow().as_ref() {
            hint.set_label(&text);
        }
    }

    pub fn is_grabbed(&self) -> bool {
        self.imp().grabbed.get()
    }

    /// Grabs or releases keyboard and pointer.
    pub fn set_grabbed(&self, grabbed: bool) {
        let imp = self.imp();
        if imp.grabbed.replace(grabbed) == grabbed {
            return;
        }
        imp.detector.borrow_mut().clear();
        imp.relative.borrow_mut().reset();
        if let Some(toplevel) = self
            .native()
            .and_then(|n| n.surface())
            .and_then(|s| s.downcast::<gdk::Toplevel>().ok())
        {
            if grabbed {
                toplevel.inhibit_system_shortcuts(None::<&gdk::Event>);
            } else {
                toplevel.restore_system_shortcuts();
            }
        }
        self.set_cursor_from_name(if grabbed { Some("none") } else { None });
        if let Some(hint) = imp.hint.borrow().as_ref() {
            hint.set_visible(grabbed);
        }
        if grabbed {
            self.grab_focus();
        }
        if let Some(cb) = imp.on_grab.borrow().as_ref() {
            cb(grabbed);
        }
    }

    /// Key events for the guest: (evdev code, pressed).
    pub fn connect_key<F: Fn(u16, bool) + 'static>(&self, f: F) {
        *self.imp().on_key.borrow_mut() = Some(Box::new(f));
    }

    /// Absolute pointer events: (x, y in 0..=0x7fff, buttons).
    pub fn connect_pointer_absolute<F: Fn(u16, u16, u8) + 'static>(&self, f: F) {
        *self.imp().on_absolute.borrow_mut() = Some(Box::new(f));
    }

    /// Relative pointer events: (dx, dy, wheel, buttons).
    pub fn connect_pointer_relative<F: Fn(i32, i32, i32, u8) + 'static>(&self, f: F) {
        *self.imp().on_relative.borrow_mut() = Some(Box::new(f));
    }

    /// Called when the grab starts (true) or ends.
    pub fn connect_grab_changed<F: Fn(bool) + 'static>(&self, f: F) {
        *self.imp().on_grab.borrow_mut() = Some(Box::new(f));
    }

    /// Sends key events as if typed (send-keys menu, clipboard typing).
    pub fn send_keys(&self, events: &[(u16, bool)]) {
        for (code, down) in events {
            self.emit_key(*code, *down);
        }
    }

    fn emit_key(&self, code: u16, down: bool) {
        let imp = self.imp();
        if down {
            imp.pressed_keys.borrow_mut().insert(code);
        } else {
            imp.pressed_keys.borrow_mut().remove(&code);
        }
        if let Some(cb) = imp.on_key.borrow().as_ref() {
            cb(code, down);
        }
    }

    /// Releases every key the guest believes is held (on focus loss and grab release).
    pub fn release_all_keys(&self) {
        let held: Vec<u16> = self.imp().pressed_keys.borrow().iter().copied().collect();
        for code in held {
            self.emit_key(code, false);
        }
    }

    fn on_hardware_key(&self, keycode: u32, down: bool) {
        let Some(code) = evdev_from_hardware_keycode(keycode) else {
            return;
        };
        let imp = self.imp();
        if imp.grabbed.get() {
            let release = imp.detector.borrow_mut().on_key(code, down);
            if release {
                self.emit_key(code, down);
                self.release_all_keys();
                self.set_grabbed(false);
                return;
            }
        }
        self.emit_key(code, down);
    }

    fn frame_rect(&self) -> Option<FrameRect> {
        let imp = self.imp();
        let frame = imp.frame.borrow();
        let f = frame.as_ref()?;
        frame_rect(
            f64::from(self.width()),
            f64::from(self.height()),
            f.width,
            f.height,
            imp.mode.get(),
            f64::from(self.scale_factor()),
        )
    }

    fn on_motion(&self, x: f64, y: f64) {
        let Some(rect) = self.frame_rect() else {
            return;
        };
        let imp = self.imp();
        match imp.pointer_mode.get() {
            PointerMode::Absolute => {
                if is_on_frame(x, y, &rect) || imp.buttons.get() != 0 {
                    let (gx, gy) = to_guest_absolute(x, y, &rect);
                    if let Some(cb) = imp.on_absolute.borrow().as_ref() {
                        cb(gx, gy, imp.buttons.get());
                    }
                }
            }
            PointerMode::Relative => {
                if !imp.grabbed.get() {
                    return;
                }
                let width = self.frame_size().map(|s| s.0).unwrap_or(1);
                let scale = f64::from(width) / rect.width;
                let (dx, dy) = imp.relative.borrow_mut().motion(x, y, scale);
                if dx != 0 || dy != 0 {
                    self.emit_relative(dx, dy, 0);
                }
            }
        }
    }

    fn on_button(&self, gdk_button: u32, down: bool, x: f64, y: f64) {
        let imp = self.imp();
        let bit = button_bit(gdk_button);
        let buttons = if down {
            imp.buttons.get() | bit
        } else {
            imp.buttons.get() & !bit
        };
        imp.buttons.set(buttons);
        match imp.pointer_mode.get() {
            PointerMode::Absolute => {
                if let Some(rect) = self.frame_rect() {
                    let (gx, gy) = to_guest_absolute(x, y, &rect);
                    if let Some(cb) = imp.on_absolute.borrow().as_ref() {
                        cb(gx, gy, buttons);
                    }
                }
            }
            PointerMode::Relative => {
                if imp.grabbed.get() {
                    self.emit_relative(0, 0, 0);
                }
            }
        }
    }

    fn emit_relative(&self, dx: i32, dy: i32, wheel: i32) {
        let imp = self.imp();
        if imp.pointer_mode.get() == PointerMode::Relative && !imp.grabbed.get() && wheel == 0 {
            return;
        }
        if let Some(cb) = imp.on_relative.borrow().as_ref() {
            cb(dx, dy, wheel, imp.buttons.get());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(mut v: Vec<usize>) -> Vec<usize> {
        v.sort_unstable();
        v
    }

    #[test]
    fn grid_covers_the_frame_with_smaller_edge_tiles() {
        let grid = TileGrid::new(300, 130, 128);
        assert_eq!(grid.len(), 3 * 2);
        assert_eq!(grid.tile_rect(0), DamageRect::new(0, 0, 128, 128));
        assert_eq!(grid.tile_rect(2), DamageRect::new(256, 0, 44, 128));
        assert_eq!(grid.tile_rect(5), DamageRect::new(256, 128, 44, 2));
        let area: u64 = (0..grid.len())
            .map(|i| {
                let r = grid.tile_rect(i);
                u64::from(r.width) * u64::from(r.height)
            })
            .sum();
        assert_eq!(area, 300 * 130);
        // An index past the end gives an empty rectangle, not a panic.
        assert_eq!(grid.tile_rect(99).width * grid.tile_rect(99).height, 0);
    }

    #[test]
    fn textures_hold_a_one_pixel_apron_inside_the_frame() {
        let grid = TileGrid::new(300, 130, 128);
        assert_eq!(grid.texture_rect(0), DamageRect::new(0, 0, 129, 129));
        assert_eq!(grid.texture_rect(1), DamageRect::new(127, 0, 130, 129));
        assert_eq!(grid.texture_rect(5), DamageRect::new(255, 127, 45, 3));
        // A frame of one tile has no apron.
        let one = TileGrid::new(40, 20, 128);
        assert_eq!(one.len(), 1);
        assert_eq!(one.texture_rect(0), DamageRect::new(0, 0, 40, 20));
    }

    #[test]
    fn damage_touches_the_tiles_whose_textures_hold_it() {
        let grid = TileGrid::new(300, 130, 128);
        // Inside one tile, away from its edges.
        assert_eq!(grid.tiles_touched(&DamageRect::new(10, 10, 9, 16)), vec![0]);
        // The last column of tile 0 is in tile 1's apron, and the first of tile 1 in
        // tile 0's.
        assert_eq!(
            grid.tiles_touched(&DamageRect::new(127, 5, 1, 1)),
            vec![0, 1]
        );
        assert_eq!(
            grid.tiles_touched(&DamageRect::new(128, 5, 1, 1)),
            vec![0, 1]
        );
        assert_eq!(grid.tiles_touched(&DamageRect::new(129, 5, 1, 1)), vec![1]);
        // A corner pixel is in four textures.
        assert_eq!(
            sorted(grid.tiles_touched(&DamageRect::new(127, 127, 2, 2))),
            vec![0, 1, 3, 4]
        );
        // The right and bottom edge tiles.
        assert_eq!(
            grid.tiles_touched(&DamageRect::new(299, 129, 1, 1)),
            vec![5]
        );
        assert_eq!(
            sorted(grid.tiles_touched(&DamageRect::new(0, 0, 300, 130))),
            vec![0, 1, 2, 3, 4, 5]
        );
    }

    #[test]
    fn garbage_damage_is_clamped_or_ignored() {
        let grid = TileGrid::new(300, 130, 128);
        assert_eq!(
            sorted(grid.tiles_touched(&DamageRect::new(0, 0, u32::MAX, u32::MAX))),
            vec![0, 1, 2, 3, 4, 5]
        );
        assert_eq!(
            grid.tiles_touched(&DamageRect::new(290, 0, u32::MAX, 1)),
            vec![2]
        );
        assert!(grid
            .tiles_touched(&DamageRect::new(300, 0, 10, 10))
            .is_empty());
        assert!(grid
            .tiles_touched(&DamageRect::new(u32::MAX, u32::MAX, u32::MAX, u32::MAX))
            .is_empty());
        assert!(grid.tiles_touched(&DamageRect::new(5, 5, 0, 10)).is_empty());
        assert_eq!(
            grid.clamp(&DamageRect::new(250, 100, 1000, 1000)),
            Some(DamageRect::new(250, 100, 50, 30))
        );
        // An empty frame has no tiles and nothing touches them.
        let empty = TileGrid::new(0, 0, 128);
        assert_eq!(empty.len(), 0);
        assert!(empty.tiles_touched(&DamageRect::new(0, 0, 1, 1)).is_empty());
        // A zero tile size is treated as one pixel, not a division by zero.
        assert_eq!(TileGrid::new(3, 2, 0).len(), 6);
    }

    #[test]
    fn only_tiles_with_changed_pixels_are_dirty() {
        let grid = TileGrid::new(300, 130, 128);
        let stride = 300 * 4 + 8;
        let mut source = vec![0u8; stride * 130];
        let mut frame = vec![0u8; 300 * 4 * 130];
        // The first copy makes every pixel opaque, so every tile changes.
        assert!(copy_damage(&grid, &mut frame, stride, &source, None)
            .iter()
            .all(|d| *d));
        assert!(frame.chunks_exact(4).all(|p| p == [0, 0, 0, 0xff]));
        // The same pixels again: nothing is dirty, even when all is said to be damaged.
        assert!(!copy_damage(&grid, &mut frame, stride, &source, None)
            .iter()
            .any(|d| *d));
        // One pixel in tile 4 changes; the damage claims a larger area.
        let (x, y) = (200usize, 129usize);
        source[y * stride + x * 4..][..4].copy_from_slice(&[9, 8, 7, 0]);
        let damage = [DamageRect::new(130, 120, 100, 10)];
        let dirty = copy_damage(&grid, &mut frame, stride, &source, Some(&damage));
        assert_eq!(dirty, vec![false, false, false, false, true, false]);
        assert_eq!(&frame[(y * 300 + x) * 4..][..4], &[9, 8, 7, 0xff]);
        // A change outside the damage is not copied.
        source[0..4].copy_from_slice(&[1, 1, 1, 1]);
        let dirty = copy_damage(&grid, &mut frame, stride, &source, Some(&damage));
        assert!(!dirty.iter().any(|d| *d));
        assert_eq!(&frame[0..4], &[0, 0, 0, 0xff]);
        // Garbage rectangles and a source too short for its rows: no panic, rows skipped.
        let garbage = [
            DamageRect::new(u32::MAX, 0, 5, 5),
            DamageRect::new(0, 0, u32::MAX, u32::MAX),
        ];
        let short = &source[..stride * 2];
        let dirty = copy_damage(&grid, &mut frame, stride, short, Some(&garbage));
        assert_eq!(dirty, vec![true, false, false, false, false, false]);
        assert_eq!(&frame[0..4], &[1, 1, 1, 0xff]);
        copy_damage(&grid, &mut frame, usize::MAX, &source, None);
    }

    #[test]
    fn rows_are_copied_opaque_and_report_real_changes_only() {
        let mut dst = vec![1, 2, 3, 0xff, 4, 5, 6, 0xff];
        // Only the X byte differs: nothing changed.
        assert_eq!(copy_opaque_row(&[1, 2, 3, 0, 4, 5, 6, 9], &mut dst), None);
        assert_eq!(dst, [1, 2, 3, 0xff, 4, 5, 6, 0xff]);
        assert_eq!(
            copy_opaque_row(&[1, 2, 3, 0, 7, 8, 9, 0], &mut dst),
            Some((1, 1))
        );
        assert_eq!(dst, [1, 2, 3, 0xff, 7, 8, 9, 0xff]);
        let mut dst = vec![0u8; 4 * 5];
        let src = [[0, 0, 0, 0], [1, 0, 0, 0], [0; 4], [0, 0, 2, 0], [0; 4]].concat();
        assert_eq!(copy_opaque_row(&src, &mut dst), Some((0, 4)), "alpha fixed");
        let mut src = src;
        src[4] = 5;
        src[12..15].copy_from_slice(&[0, 0, 0]);
        assert_eq!(copy_opaque_row(&src, &mut dst), Some((1, 3)));
    }

    /// GTK needs a display (run under `xvfb-run -a`); without one this test passes early.
    #[test]
    fn view_replaces_only_the_tiles_that_changed() {
        if std::env::var_os("DISPLAY").is_none() || gtk::init().is_err() {
            println!("SKIPPED: no display");
            return;
        }
        let view = ConsoleView::new();
        let stride = 300 * 4;
        let mut guest = vec![0x20u8; stride * 130];
        view.update_frame_xrgb(300, 130, stride, &guest, None)
            .unwrap();
        assert_eq!(view.frame_size(), Some((300, 130)));
        let textures = |view: &ConsoleView| -> Vec<gdk::MemoryTexture> {
            let frame = view.imp().frame.borrow();
            frame
                .as_ref()
                .unwrap()
                .tiles
                .iter()
                .map(|t| t.texture.clone())
                .collect()
        };
        let before = textures(&view);
        assert_eq!(before.len(), 6);
        // One pixel of tile 4 changes.
        guest[129 * stride + 200 * 4..][..4].copy_from_slice(&[1, 2, 3, 0]);
        let damage = [DamageRect::new(200, 129, 1, 1)];
        view.update_frame_xrgb(300, 130, stride, &guest, Some(&damage))
            .unwrap();
        let after = textures(&view);
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            assert_eq!(b == a, i != 4, "tile {i}");
        }
        let mut pixels = vec![0u8; 300 * 4 * 130];
        view.texture().unwrap().download(&mut pixels, 300 * 4);
        assert_eq!(&pixels[(129 * 300 + 200) * 4..][..4], &[1, 2, 3, 0xff]);
        // Damage that says nothing changed where nothing did: no tile is replaced.
        view.update_frame_xrgb(300, 130, stride, &guest, None)
            .unwrap();
        assert!(textures(&view).iter().zip(&after).all(|(a, b)| a == b));
        // A new size is taken whole; garbage damage is cut, not a panic.
        let small = vec![0x40u8; 64 * 4 * 32];
        let garbage = [DamageRect::new(u32::MAX, 3, u32::MAX, 9)];
        view.update_frame_xrgb(64, 32, 64 * 4, &small, Some(&garbage))
            .unwrap();
        assert_eq!(view.frame_size(), Some((64, 32)));
        assert!(view
            .update_frame_xrgb(64, 32, 64 * 4, &small[..100], None)
            .is_err());
        assert_eq!(view.frame_size(), Some((64, 32)));
    }
}
