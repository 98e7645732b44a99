//! The console page: the VM's screen in a `ConsoleView`, fed from the engine's display
//! only when it changed: a watcher thread blocks on the display's generation
//! (`DisplayHandle::wait_for_change`) and wakes the main loop, which copies just the damaged
//! rectangles into the view (which uploads and redraws just the tiles they touch). No frame
//! clock runs while the screen is still. The watcher ends (within [`WATCH_TIMEOUT`]) when
//! the page detaches. With a toolbar: run/pause, power, send keys (Ctrl+Alt+Del,
//! Ctrl+Alt+Backspace, Ctrl+Alt+F1…F12, PrintScreen), type the clipboard (US layout),
//! screenshot, scaling, CD change, grab, fullscreen. Keyboard and pointer go to the VM
//! through its `InputHandle`.
//!
//! The engine's display (`VmHandle::display()`) is reached through [`DisplaySource`], so the
//! page can be tested with a fake display. The CD button changes the disc of the first
//! CD-ROM drive of the running VM (and in its settings).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use adw::prelude::*;
use deskvm_ui::console_view::DamageRect;
use deskvm_ui::geometry::xrgb_to_opaque;
use deskvm_ui::keymap::{combo_events, parse_release_combo, send_keys_menu, text_to_key_events};
use deskvm_ui::{ConsoleView, PointerMode, ScaleFilter, ScaleMode};
use gtk::glib;
use relm4::ComponentSender;
use vmm::{InputHandle, VmHandle, VmState};

use super::i18n::tr;
use super::library_page::state_text;
use super::settings::AppSettings;
use super::{App, AppMsg};

/// A frame copied out of the engine, ready for `ConsoleView::set_frame` (opaque BGRA).
pub struct CopiedFrame {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// A blocking wait, run on a thread of its own: returns the display's generation as soon
/// as it differs from the one given, or when the timeout passes.
pub type ChangeWaiter = Box<dyn FnMut(u64, Duration) -> u64 + Send>;

/// How long the watcher thread blocks at most before it looks whether it should stop.
pub const WATCH_TIMEOUT: Duration = Duration::from_millis(200);
/// How often a display without a [`ChangeWaiter`] is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(30);

/// What the console needs from a VM's display.
pub trait DisplaySource {
    /// Changes whenever the screen changes.
    fn generation(&self) -> u64;
    /// The frame if it changed since generation `since`, with its generation.
    fn copy_frame_since(&self, since: u64) -> Option<(u64, CopiedFrame)>;
    fn screenshot_png(&self, path: &Path) -> Result<(), String>;

    /// Puts what changed since generation `since` into `view`; returns the generation
    /// shown, or None when nothing changed. The default copies the whole frame.
    fn show_since(&self, since: u64, view: &ConsoleView) -> Option<u64> {
        let (generation, frame) = self.copy_frame_since(since)?;
        let stride = frame.width as usize * 4;
        let bytes = glib::Bytes::from_owned(frame.pixels);
        if let Err(e) = view.set_frame(frame.width, frame.height, stride, bytes) {
            log::warn!("console: {e}");
        }
        Some(generation)
    }

    /// A wait for changes that another thread can block in; None: the page polls.
    fn change_waiter(&self) -> Option<ChangeWaiter> {
        None
    }
}

/// The engine's display of a VM.
struct EngineDisplay(vmm::DisplayHandle);

impl DisplaySource for EngineDisplay {
    fn generation(&self) -> u64 {
        self.0.generation()
    }

    fn copy_frame_since(&self, since: u64) -> Option<(u64, CopiedFrame)> {
        let mut copied = None;
        let generation = self.0.frame_since(since, |f, _damage| {
            copied = copy_frame(f.width, f.height, f.stride, f.pixels);
        })?;
        copied.map(|c| (generation, c))
    }

    fn screenshot_png(&self, path: &Path) -> Result<(), String> {
        self.0.screenshot_png(path).map_err(|e| e.to_string())
    }

    fn show_since(&self, since: u64, view: &ConsoleView) -> Option<u64> {
        self.0.frame_since(since, |f, damage| {
            let damage: Option<Vec<DamageRect>> = damage.map(|rects| {
                rects
                    .iter()
                    .map(|r| DamageRect::new(r.x, r.y, r.width, r.height))
                    .collect()
            });
            if let Err(e) =
                view.update_frame_xrgb(f.width, f.height, f.stride, f.pixels, damage.as_deref())
            {
                log::warn!("console: {e}");
            }
        })
    }

    fn change_waiter(&self) -> Option<ChangeWaiter> {
        let display = self.0.clone();
        Some(Box::new(move |since, timeout| {
            display.wait_for_change(since, timeout)
        }))
    }
}

thread_local! {
    /// The main thread's wake-up calls of the running watchers, by watcher id.
    static WAKERS: RefCell<HashMap<u64, Rc<dyn Fn()>>> = RefCell::new(HashMap::new());
}

static NEXT_WATCHER: AtomicU64 = AtomicU64::new(1);

/// Calls `wake` on the main loop whenever the display changes, until dropped.
struct Watcher {
    id: u64,
    stop: Arc<AtomicBool>,
    poll: Option<glib::SourceId>,
}

impl Watcher {
    /// Must be called on the thread that runs the default main context.
    fn start(display: &dyn DisplaySource, wake: Rc<dyn Fn()>) -> Self {
        let id = NEXT_WATCHER.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let polling = |id, stop, wake: Rc<dyn Fn()>| {
            let poll = glib::timeout_add_local(POLL_INTERVAL, move || {
                wake();
                glib::ControlFlow::Continue
            });
            Self {
                id,
                stop,
                poll: Some(poll),
            }
        };
        let Some(mut waiter) = display.change_waiter() else {
            return polling(id, stop, wake);
        };
        WAKERS.with(|w| w.borrow_mut().insert(id, wake));
        let thread_stop = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("console-watch".into())
            .spawn(move || {
                // Set while a wake-up is queued, so a busy main loop gets one, not many.
                let queued = Arc::new(AtomicBool::new(false));
                let mut seen = u64::MAX;
                while !thread_stop.load(Ordering::Acquire) {
                    let generation = waiter(seen, WATCH_TIMEOUT);
                    if generation == seen || thread_stop.load(Ordering::Acquire) {
                        continue;
                    }
                    seen = generation;
                    if !queued.swap(true, Ordering::AcqRel) {
                        let queued = queued.clone();
                        // An idle source of the default main context, which only the main
                        // thread runs (MainContext::invoke could run it right here).
                        glib::idle_add_once(move || {
                            queued.store(false, Ordering::Release);
                            let wake = WAKERS.with(|w| w.borrow().get(&id).cloned());
                            if let Some(wake) = wake {
                                wake();
                            }
                        });
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("console: cannot start the display watcher ({e}); polling instead");
            if let Some(wake) = WAKERS.with(|w| w.borrow_mut().remove(&id)) {
                return polling(id, stop, wake);
            }
        }
        Self {
            id,
            stop,
            poll: None,
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        WAKERS.with(|w| w.borrow_mut().remove(&self.id));
        if let Some(poll) = self.poll.take() {
            poll.remove();
        }
    }
}

/// The display of a VM.
pub fn display_of(vm: &Arc<VmHandle>) -> Option<Rc<dyn DisplaySource>> {
    Some(Rc::new(EngineDisplay(vm.display())))
}

/// A texture of the VM's screen when it changed since `*generation` (library thumbnails).
pub fn thumbnail(vm: &VmHandle, generation: &mut u64) -> Option<gtk::gdk::Texture> {
    let display = EngineDisplay(vm.display());
    let (g, frame) = display.copy_frame_since(*generation)?;
    *generation = g;
    Some(frame_texture(frame))
}

fn frame_texture(frame: CopiedFrame) -> gtk::gdk::Texture {
    let stride = frame.width as usize * 4;
    gtk::gdk::MemoryTexture::new(
        frame.width as i32,
        frame.height as i32,
        gtk::gdk::MemoryFormat::B8g8r8a8Premultiplied,
        &glib::Bytes::from_owned(frame.pixels),
        stride,
    )
    .upcast()
}

/// Copies a guest frame (XRGB8888) for the console; `None` when its sizes do not fit.
pub fn copy_frame(width: u32, height: u32, stride: usize, pixels: &[u8]) -> Option<CopiedFrame> {
    Some(CopiedFrame {
        width,
        height,
        pixels: xrgb_to_opaque(width, height, stride, pixels)?,
    })
}

/// Puts what changed on the attached VM's screen into `view`.
fn show_changes(attached: &RefCell<Option<Attached>>, view: &ConsoleView) {
    let attached = attached.borrow();
    let Some(a) = attached.as_ref() else {
        return;
    };
    if let Some(display) = a.display.as_ref() {
        if display.generation() != a.shown.get() {
            if let Some(generation) = display.show_since(a.shown.get(), view) {
                a.shown.set(generation);
            }
        }
    }
}

/// An action's accelerators, kept aside while the keyboard is grabbed.
type SavedAccels = (String, Vec<glib::GString>);

/// While the view is grabbed, the app's shortcuts (Ctrl+Q, Ctrl+N, F11...) go to the VM:
/// their accelerators are set aside on grab and put back on release.
pub(crate) fn suspend_app_shortcuts_while_grabbed(view: &ConsoleView, app: gtk::Application) {
    let saved: RefCell<Vec<SavedAccels>> = RefCell::default();
    view.connect_grab_changed(move |grabbed| {
        if grabbed {
            let mut saved = saved.borrow_mut();
            for action in app.list_action_descriptions() {
                let accels: Vec<glib::GString> =
                    app.accels_for_action(&action).into_iter().collect();
                if !accels.is_empty() {
                    app.set_accels_for_action(&action, &[]);
                    saved.push((action.to_string(), accels));
                }
            }
        } else {
            for (action, accels) in saved.borrow_mut().drain(..) {
                let accels: Vec<&str> = accels.iter().map(|a| a.as_str()).collect();
                app.set_accels_for_action(&action, &accels);
            }
        }
    });
}

struct Attached {
    name: String,
    vm: Arc<VmHandle>,
    display: Option<Rc<dyn DisplaySource>>,
    /// The display generation shown (u64::MAX: none yet).
    shown: Cell<u64>,
    /// Wakes the page when the display changes; stops when the page detaches.
    _watcher: Option<Watcher>,
}

pub struct ConsolePage {
    pub root: gtk::Box,
    view: ConsoleView,
    stack: gtk::Stack,
    status: adw::StatusPage,
    run: gtk::Button,
    pause: gtk::Button,
    attached: Rc<RefCell<Option<Attached>>>,
    input: Rc<RefCell<Option<InputHandle>>>,
    vm_name: Rc<RefCell<String>>,
    toolbar_items: Vec<gtk::Widget>,
    settings: Rc<AppSettings>,
    scale: gtk::ToggleButton,
}

pub(crate) fn icon_button(icon: &str, tip: &str) -> gtk::Button {
    let b = gtk::Button::from_icon_name(icon);
    b.set_tooltip_text(Some(tip));
    b.add_css_class("flat");
    b
}

/// Sends key events a few at a time so the guest's keyboard buffer keeps up.
fn send_paced(input: Rc<RefCell<Option<InputHandle>>>, events: Vec<(u16, bool)>) {
    let queue = Rc::new(RefCell::new(VecDeque::from(events)));
    glib::timeout_add_local(Duration::from_millis(8), move || {
        let Some(input) = input.borrow().clone() else {
            return glib::ControlFlow::Break;
        };
        for _ in 0..2 {
            match queue.borrow_mut().pop_front() {
                Some((code, down)) => {
                    input.key(code, down);
                }
                None => return glib::ControlFlow::Break,
            }
        }
        glib::ControlFlow::Continue
    });
}

/// The send-keys menu button (Ctrl+Alt+Del, ...): adds the `send-keys` action to `group`,
/// which the caller inserts as `group_name`; `send` gets the chosen combination's events.
pub(crate) fn send_keys_button(
    group: &gtk::gio::SimpleActionGroup,
    group_name: &str,
    send: impl Fn(Vec<(u16, bool)>) + 'static,
) -> gtk::MenuButton {
    let action = gtk::gio::SimpleAction::new("send-keys", Some(glib::VariantTy::UINT32));
    action.connect_activate(move |_, choice| {
        let entries = send_keys_menu();
        if let Some(entry) = choice
            .and_then(|c| c.get::<u32>())
            .and_then(|i| entries.get(i as usize))
        {
            send(combo_events(&entry.keys));
        }
    });
    group.add_action(&action);
    let menu = gtk::gio::Menu::new();
    let detailed = format!("{group_name}.send-keys");
    for (index, entry) in send_keys_menu().iter().enumerate() {
        let item = gtk::gio::MenuItem::new(Some(&entry.label), None);
        item.set_action_and_target_value(Some(&detailed), Some(&(index as u32).to_variant()));
        menu.append_item(&item);
    }
    let button = gtk::MenuButton::builder()
        .icon_name("input-keyboard-symbolic")
        .menu_model(&menu)
        .tooltip_text(tr("Send Keys"))
        .build();
    button.add_css_class("flat");
    button
}

/// The "Type the Clipboard" button: reads the clipboard's text and hands it to `type_text`.
pub(crate) fn type_clipboard_button(type_text: impl Fn(&str) + 'static) -> gtk::Button {
    let button = icon_button("edit-paste-symbolic", &tr("Type the Clipboard"));
    let type_text = Rc::new(type_text);
    button.connect_clicked(move |button| {
        let type_text = type_text.clone();
        button
            .clipboard()
            .read_text_async(None::<&gtk::gio::Cancellable>, move |read| {
                if let Ok(Some(text)) = read {
                    type_text(text.as_str());
                }
            });
    });
    button
}

/// What the toast says when clipboard characters had no key to type them with.
pub(crate) fn skipped_characters_text(skipped: usize) -> String {
    format!(
        "{} {skipped}",
        tr("Characters without a key on a US keyboard skipped:")
    )
}

pub(crate) fn screenshot_path(name: &str) -> PathBuf {
    let dir = dirs::picture_dir()
        .or_else(dirs::home_dir)
        .unwrap_or_else(std::env::temp_dir)
        .join("DeskVM");
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    dir.join(format!("{name}-{stamp}.png"))
}

impl ConsolePage {
    pub fn new(sender: &ComponentSender<App>, settings: &Rc<AppSettings>) -> Self {
        let view = ConsoleView::new();
        view.set_grab_hint_template(&tr("Press {combo} to release the keyboard"));
        if let Ok(combo) = parse_release_combo(&settings.string("grab-combo")) {
            view.set_release_combo(combo);
        }
        view.set_scale_mode(if settings.string("console-scaling") == "one-to-one" {
            ScaleMode::OneToOne
        } else {
            ScaleMode::Fit
        });
        view.set_scale_filter(if settings.boolean("console-smooth") {
            ScaleFilter::Smooth
        } else {
            ScaleFilter::Sharp
        });
        let input: Rc<RefCell<Option<InputHandle>>> = Rc::new(RefCell::new(None));
        let i = input.clone();
        view.connect_key(move |code, down| {
            if let Some(h) = i.borrow().as_ref() {
                h.key(code, down);
            }
        });
        let i = input.clone();
        let weak_view = view.downgrade();
        view.connect_pointer_absolute(move |x, y, buttons| {
            let route = i
                .borrow()
                .as_ref()
                .map(|h| h.pointer_absolute(x, y, buttons));
            // No tablet in the VM (or in the engine yet): use the mouse, with a grab.
            if route == Some(vmm::InputRoute::Dropped) {
                if let Some(v) = weak_view.upgrade() {
                    v.set_pointer_mode(PointerMode::Relative);
                }
            }
        });
        let i = input.clone();
        view.connect_pointer_relative(move |dx, dy, wheel, buttons| {
            if let Some(h) = i.borrow().as_ref() {
                h.pointer_relative(dx, dy, wheel, buttons);
            }
        });

        // While grabbed, the app's shortcuts (Ctrl+Q, Ctrl+N, F11...) go to the VM too.
        suspend_app_shortcuts_while_grabbed(&view, relm4::main_adw_application().upcast());

        let attached: Rc<RefCell<Option<Attached>>> = Rc::new(RefCell::new(None));

        let status = adw::StatusPage::builder()
            .icon_name("computer-symbolic")
            .title(tr("Stopped"))
            .build();
        let start = gtk::Button::with_label(&tr("Run"));
        start.add_css_class("pill");
        start.add_css_class("suggested-action");
        start.set_halign(gtk::Align::Center);
        status.set_child(Some(&start));

        let stack = gtk::Stack::new();
        stack.add_named(&status, Some("status"));
        stack.add_named(&view, Some("view"));
        stack.set_vexpand(true);

        let toolbar = gtk::Box::new(gtk::Orientation::Horizontal, 4);
        toolbar.add_css_class("toolbar");
        let vm_name = Rc::new(RefCell::new(String::new()));

        let run = icon_button("media-playback-start-symbolic", &tr("Run"));
        let pause = icon_button("media-playback-pause-symbolic", &tr("Pause"));
        let power = icon_button("system-shutdown-symbolic", &tr("Shut Down"));
        for (b, msg) in [
            (&run, AppMsg::Run as fn(String) -> AppMsg),
            (&start, AppMsg::Run),
            (&pause, AppMsg::PauseResume),
            (&power, AppMsg::PowerButton),
        ] {
            let s = sender.clone();
            let n = vm_name.clone();
            b.connect_clicked(move |_| s.input(msg(n.borrow().clone())));
        }
        toolbar.append(&run);
        toolbar.append(&pause);
        toolbar.append(&power);
        toolbar.append(&gtk::Separator::new(gtk::Orientation::Vertical));

        // Send keys.
        let group = gtk::gio::SimpleActionGroup::new();
        let i = input.clone();
        let keys = send_keys_button(&group, "console", move |events| {
            send_paced(i.clone(), events)
        });
        toolbar.append(&keys);

        let i = input.clone();
        let s = sender.clone();
        let paste = type_clipboard_button(move |text| {
            let (events, skipped) = text_to_key_events(text);
            if skipped > 0 {
                s.input(AppMsg::Toast(skipped_characters_text(skipped)));
            }
            send_paced(i.clone(), events);
        });
        toolbar.append(&paste);

        let shot = icon_button("camera-photo-symbolic", &tr("Screenshot"));
        let a = attached.clone();
        let v = view.clone();
        let s = sender.clone();
        let n = vm_name.clone();
        shot.connect_clicked(move |_| {
            let path = screenshot_path(&n.borrow());
            if let Some(parent) = path.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let from_engine = a
                .borrow()
                .as_ref()
                .and_then(|a| a.display.clone())
                .map(|d| d.screenshot_png(&path));
            let result = match from_engine {
                Some(r) => r,
                None => match v.texture() {
                    Some(t) => t.save_to_png(&path).map_err(|e| e.to_string()),
                    None => Err(tr("There is no screen to save yet.")),
                },
            };
            s.input(match result {
                Ok(()) => {
                    AppMsg::Toast(format!("{} {}", tr("Screenshot saved to"), path.display()))
                }
                Err(e) => AppMsg::Error {
                    title: tr("Cannot save the screenshot"),
                    body: e,
                },
            });
        });
        toolbar.append(&shot);

        let cd = icon_button("media-optical-symbolic", &tr("Change CD/DVD"));
        let s = sender.clone();
        cd.connect_clicked(move |b| {
            let s = s.clone();
            super::dialogs::choose_image(b.root().and_downcast_ref::<gtk::Window>(), move |p| {
                s.input(AppMsg::ChangeFirstCd(Some(p)))
            });
        });
        toolbar.append(&cd);

        let spacer = gtk::Box::new(gtk::Orientation::Horizontal, 0);
        spacer.set_hexpand(true);
        toolbar.append(&spacer);

        let scale = gtk::ToggleButton::new();
        scale.set_icon_name("zoom-original-symbolic");
        scale.set_tooltip_text(Some(&tr("One guest pixel per screen pixel")));
        scale.add_css_class("flat");
        scale.set_active(view.scale_mode() == ScaleMode::OneToOne);
        let v = view.clone();
        let st = settings.clone();
        scale.connect_toggled(move |b| {
            let mode = if b.is_active() {
                ScaleMode::OneToOne
            } else {
                ScaleMode::Fit
            };
            v.set_scale_mode(mode);
            st.set_string(
                "console-scaling",
                if b.is_active() { "one-to-one" } else { "fit" },
            );
        });
        toolbar.append(&scale);

        let grab = icon_button("input-mouse-symbolic", &tr("Grab Keyboard and Mouse"));
        let v = view.clone();
        grab.connect_clicked(move |_| v.set_grabbed(true));
        toolbar.append(&grab);

        let full = icon_button("view-fullscreen-symbolic", &tr("Fullscreen"));
        full.set_action_name(Some("app.fullscreen"));
        toolbar.append(&full);

        let root = gtk::Box::new(gtk::Orientation::Vertical, 0);
        root.insert_action_group("console", Some(&group));
        root.append(&toolbar);
        root.append(&stack);
        let toolbar_items: Vec<gtk::Widget> = vec![
            keys.upcast(),
            paste.upcast(),
            shot.upcast(),
            grab.upcast(),
            power.upcast(),
        ];
        Self {
            root,
            view,
            stack,
            status,
            run,
            pause,
            attached,
            input,
            vm_name,
            toolbar_items,
            settings: settings.clone(),
            scale,
        }
    }

    /// Applies the console preferences (scaling, filter, release combination).
    fn apply_settings(&self) {
        let s = &self.settings;
        let one_to_one = s.string("console-scaling") == "one-to-one";
        self.view.set_scale_mode(if one_to_one {
            ScaleMode::OneToOne
        } else {
            ScaleMode::Fit
        });
        self.scale.set_active(one_to_one);
        self.view.set_scale_filter(if s.boolean("console-smooth") {
            ScaleFilter::Smooth
        } else {
            ScaleFilter::Sharp
        });
        if let Ok(combo) = parse_release_combo(&s.string("grab-combo")) {
            self.view.set_release_combo(combo);
        }
    }

    pub fn set_vm_name(&self, name: &str) {
        *self.vm_name.borrow_mut() = name.to_string();
    }

    /// Connects the page to a running VM.
    pub fn attach(&self, name: &str, vm: Arc<VmHandle>) {
        if self
            .attached
            .borrow()
            .as_ref()
            .is_some_and(|a| a.name == name && Arc::ptr_eq(&a.vm, &vm))
        {
            return;
        }
        self.set_vm_name(name);
        let display = display_of(&vm);
        *self.input.borrow_mut() = Some(vm.input());
        let input = vm.input();
        self.view.set_pointer_mode(if input.has_absolute_pointer() {
            PointerMode::Absolute
        } else {
            PointerMode::Relative
        });
        self.apply_settings();
        // The old watcher stops before the new one starts.
        *self.attached.borrow_mut() = None;
        let watcher = display.as_ref().map(|d| {
            let attached = Rc::downgrade(&self.attached);
            let view = self.view.downgrade();
            let wake: Rc<dyn Fn()> = Rc::new(move || {
                if let (Some(attached), Some(view)) = (attached.upgrade(), view.upgrade()) {
                    show_changes(&attached, &view);
                }
            });
            Watcher::start(d.as_ref(), wake)
        });
        *self.attached.borrow_mut() = Some(Attached {
            name: name.to_string(),
            vm,
            display,
            shown: Cell::new(u64::MAX),
            _watcher: watcher,
        });
        show_changes(&self.attached, &self.view);
    }

    /// Disconnects from the VM (stopped, or another page shown).
    pub fn detach(&self) {
        self.view.set_grabbed(false);
        self.view.release_all_keys();
        *self.input.borrow_mut() = None;
        *self.attached.borrow_mut() = None;
        self.view.clear_frame();
    }

    pub fn show_state(&self, state: &VmState) {
        let on = matches!(state, VmState::Running | VmState::Paused);
        self.run.set_visible(!on);
        self.pause.set_visible(on);
        self.pause.set_icon_name(if *state == VmState::Paused {
            "media-playback-start-symbolic"
        } else {
            "media-playback-pause-symbolic"
        });
        for w in &self.toolbar_items {
            w.set_sensitive(on);
        }
        if on {
            self.stack.set_visible_child_name("view");
        } else {
            self.status.set_title(&state_text(state));
            self.stack.set_visible_child_name("status");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets its flag when dropped (the watcher thread dropped its waiter: it ended).
    struct DropFlag(Arc<AtomicBool>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }

    /// A display whose generation the test sets; with or without a blocking waiter.
    struct FakeDisplay {
        generation: Arc<AtomicU64>,
        waiter_dropped: Arc<AtomicBool>,
        can_wait: bool,
    }

    impl DisplaySource for FakeDisplay {
        fn generation(&self) -> u64 {
            self.generation.load(Ordering::Acquire)
        }
        fn copy_frame_since(&self, _since: u64) -> Option<(u64, CopiedFrame)> {
            None
        }
        fn screenshot_png(&self, _path: &Path) -> Result<(), String> {
            Err("no screen".into())
        }
        fn change_waiter(&self) -> Option<ChangeWaiter> {
            if !self.can_wait {
                return None;
            }
            let generation = self.generation.clone();
            let flag = DropFlag(self.waiter_dropped.clone());
            Some(Box::new(move |since, timeout| {
                let _alive = &flag;
                let end = std::time::Instant::now() + timeout;
                loop {
                    let g = generation.load(Ordering::Acquire);
                    if g != since || std::time::Instant::now() >= end {
                        return g;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }))
        }
    }

    fn fake(can_wait: bool) -> FakeDisplay {
        FakeDisplay {
            generation: Arc::new(AtomicU64::new(0)),
            waiter_dropped: Arc::new(AtomicBool::new(false)),
            can_wait,
        }
    }

    /// Runs the default main context until `done` or about 5 s of iterations.
    fn run_until(done: impl Fn() -> bool) -> bool {
        let context = glib::MainContext::default();
        for _ in 0..5000 {
            while context.iteration(false) {}
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        done()
    }

    /// Runs the default main context for about 100 ms.
    fn iterate_a_while() {
        let context = glib::MainContext::default();
        for _ in 0..100 {
            while context.iteration(false) {}
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn counting_wake() -> (Rc<Cell<u32>>, Rc<dyn Fn()>) {
        let wakes = Rc::new(Cell::new(0u32));
        let w = wakes.clone();
        (wakes, Rc::new(move || w.set(w.get() + 1)))
    }

    // One test for both paths: they share the process's default main context.
    #[test]
    fn watcher_wakes_on_changes_and_stops_when_dropped() {
        // The thread path.
        let display = fake(true);
        let (wakes, wake) = counting_wake();
        let watcher = Watcher::start(&display, wake);
        assert!(watcher.poll.is_none(), "a blocking waiter means no polling");
        assert!(
            run_until(|| wakes.get() >= 1),
            "the first frame wakes the page"
        );
        let first = wakes.get();
        display.generation.store(5, Ordering::Release);
        assert!(run_until(|| wakes.get() > first), "a change wakes the page");
        assert!(!display.waiter_dropped.load(Ordering::Acquire));
        drop(watcher);
        assert!(
            run_until(|| display.waiter_dropped.load(Ordering::Acquire)),
            "the thread ends after the watcher is dropped"
        );
        let after = wakes.get();
        display.generation.store(6, Ordering::Release);
        iterate_a_while();
        assert_eq!(wakes.get(), after, "no wake-up after the watcher is gone");
        assert!(WAKERS.with(|w| w.borrow().is_empty()));

        // The polling path.
        let display = fake(false);
        let (wakes, wake) = counting_wake();
        let watcher = Watcher::start(&display, wake);
        assert!(watcher.poll.is_some());
        assert!(run_until(|| wakes.get() >= 2), "polled");
        drop(watcher);
        let after = wakes.get();
        iterate_a_while();
        assert_eq!(wakes.get(), after, "polling ends with the watcher");
    }
}
