//! `ConsoleView`: a widget that shows a VM's screen and turns the user's keyboard and
//! pointer into guest input through callbacks. It knows nothing of KVM: the app pushes
//! frames with [`ConsoleView::set_frame`] and forwards the callbacks to the engine.
//!
//! Drawn as a `gdk::MemoryTexture` (smooth filtering) or, for the sharp filter when the
//! frame is scaled, with Cairo's nearest-neighbour filter. Scaled to fit or one guest pixel
//! per device pixel. Keyboard grab: while grabbed the window's system shortcuts are
//! inhibited, the pointer is hidden and moves the guest mouse relatively, and a hint shows
//! the release combination (default Ctrl+Alt). Not done: pointer confinement/warping (GTK 4
//! has no API for it), touch input, clipboard sharing.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;

use gtk::prelude::*;
use gtk::subclass::prelude::*;
use gtk::{gdk, glib, graphene};

use crate::geometry::{
    button_bit, frame_fits, frame_rect, is_on_frame, to_guest_absolute, FrameRect, RelativeMotion,
    ScaleMode,
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

struct Frame {
    width: u32,
    height: u32,
    stride: usize,
    bytes: glib::Bytes,
    texture: gdk::MemoryTexture,
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
        pub(super) sharp_surface: RefCell<Option<gtk::cairo::ImageSurface>>,
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
                let bounds = graphene::Rect::new(
                    rect.x as f32,
                    rect.y as f32,
                    rect.width as f32,
                    rect.height as f32,
                );
                let frame = self.frame.borrow();
                if let Some(frame) = frame.as_ref() {
                    let scaled =
                        (rect.width * f64::from(obj.scale_factor()) - f64::from(frame.width)).abs()
                            > 0.5;
                    if self.filter.get() == ScaleFilter::Sharp && scaled {
                        self.draw_sharp(snapshot, frame, &rect, &bounds);
                    } else {
                        snapshot.append_texture(&frame.texture, &bounds);
                    }
                }
            }
            if let Some(hint) = self.hint.borrow().as_ref() {
                obj.snapshot_child(hint, snapshot);
            }
        }
    }

    impl ConsoleView {
        fn draw_sharp(
            &self,
            snapshot: &gtk::Snapshot,
            frame: &Frame,
            rect: &FrameRect,
            bounds: &graphene::Rect,
        ) {
            if self.sharp_surface.borrow().is_none() {
                *self.sharp_surface.borrow_mut() = sharp_surface(frame);
            }
            let surface = self.sharp_surface.borrow();
            let Some(surface) = surface.as_ref() else {
                snapshot.append_texture(&frame.texture, bounds);
                return;
            };
            let cr = snapshot.append_cairo(bounds);
            cr.translate(rect.x, rect.y);
            cr.scale(
                rect.width / f64::from(frame.width),
                rect.height / f64::from(frame.height),
            );
            let pattern = gtk::cairo::SurfacePattern::create(surface);
            pattern.set_filter(gtk::cairo::Filter::Nearest);
            if cr.set_source(&pattern).is_ok() {
                let _ = cr.paint();
            }
        }
    }

    /// A Cairo copy of the frame (RGB24 ignores the X byte), packed rows.
    fn sharp_surface(frame: &Frame) -> Option<gtk::cairo::ImageSurface> {
        let row = frame.width as usize * 4;
        let mut data = Vec::with_capacity(row * frame.height as usize);
        for y in 0..frame.height as usize {
            let start = y * frame.stride;
            data.extend_from_slice(frame.bytes.get(start..start + row)?);
        }
        gtk::cairo::ImageSurface::create_for_data(
            data,
            gtk::cairo::Format::Rgb24,
            i32::try_from(frame.width).ok()?,
            i32::try_from(frame.height).ok()?,
            i32::try_from(row).ok()?,
        )
        .ok()
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
    /// [`crate::geometry::xrgb_to_opaque`]).
    pub fn set_frame(
        &self,
        width: u32,
        height: u32,
        stride: usize,
        bytes: glib::Bytes,
    ) -> Result<(), FrameError> {
        if !frame_fits(width, height, stride, bytes.len()) {
            return Err(FrameError::TooSmall {
                width,
                height,
                stride,
                len: bytes.len(),
            });
        }
        let (Ok(w), Ok(h)) = (i32::try_from(width), i32::try_from(height)) else {
            return Err(FrameError::TooLarge { width, height });
        };
        let texture = gdk::MemoryTexture::new(
            w,
            h,
            gdk::MemoryFormat::B8g8r8a8Premultiplied,
            &bytes,
            stride,
        );
        let imp = self.imp();
        let resized = imp
            .frame
            .borrow()
            .as_ref()
            .is_none_or(|f| f.width != width || f.height != height);
        *imp.frame.borrow_mut() = Some(Frame {
            width,
            height,
            stride,
            bytes,
            texture,
        });
        imp.sharp_surface.replace(None);
        if resized {
            self.queue_resize();
        }
        self.queue_draw();
        Ok(())
    }

    /// Forgets the frame (the VM stopped): the view shows black.
    pub fn clear_frame(&self) {
        self.imp().frame.replace(None);
        self.imp().sharp_surface.replace(None);
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
        self.imp()
            .frame
            .borrow()
            .as_ref()
            .map(|f| f.texture.clone().upcast())
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
