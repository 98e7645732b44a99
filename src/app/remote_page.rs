//! "Connect to Remote VM…": a dialog asking for host, port (default 5900) and password, and
//! a window with a `ConsoleView` showing the remote VM through a [`RemoteSession`] (frames
//! copied on the frame clock when the session's generation changed, keys and the absolute
//! pointer sent back). The window has the local console's toolbar where it makes sense for
//! VNC: send keys, type the clipboard (paced, US layout, Shift where needed), a PNG
//! screenshot of the remote frame (a toast says where it went), scaling fit/1:1, grab with
//! the configured release combination, fullscreen (F11 too) and disconnect. Its title shows
//! host:port and the desktop name the server sent. When the connection fails or drops, the
//! window stays and says why, with a button to connect again.
//!
//! Not here: a list of recent connections, changing the password without the dialog, CD
//! change and power buttons (the remote VM is not ours to control).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use adw::prelude::*;
use deskvm_ui::keymap::parse_release_combo;
use deskvm_ui::keysym::{text_to_keysym_events, KeysymEvent};
use deskvm_ui::{ConsoleView, PointerMode, ScaleFilter, ScaleMode};
use gtk::glib;

use super::console_page::{
    icon_button, screenshot_path, send_keys_button, skipped_characters_text,
    suspend_app_shortcuts_while_grabbed, type_clipboard_button,
};
use super::dialogs;
use super::i18n::tr;
use super::remote::{RemoteError, RemoteSession, RemoteStatus, RemoteTarget, ScreenshotError};
use super::settings::AppSettings;

/// How often the window looks at the session (status, new frame).
const REFRESH_PERIOD: std::time::Duration = std::time::Duration::from_millis(30);

/// The port VNC servers use for display :0.
pub const DEFAULT_PORT: u16 = 5900;

/// Asks for host, port and password, then opens the remote console window.
pub fn ask_and_connect(parent: &adw::ApplicationWindow) {
    let host = gtk::Entry::builder()
        .placeholder_text("192.168.1.10")
        .activates_default(true)
        .build();
    // An entry rather than a spin button: GTK 4.8's cannot activate the default response.
    let port = gtk::Entry::builder()
        .text(DEFAULT_PORT.to_string())
        .input_purpose(gtk::InputPurpose::Digits)
        .activates_default(true)
        .build();
    let password = gtk::PasswordEntry::builder()
        .show_peek_icon(true)
        .activates_default(true)
        .build();
    let grid = gtk::Grid::builder()
        .row_spacing(6)
        .column_spacing(12)
        .build();
    for (row, (label, widget)) in [
        (tr("Host"), host.clone().upcast::<gtk::Widget>()),
        (tr("Port"), port.clone().upcast()),
        (tr("Password"), password.clone().upcast()),
    ]
    .into_iter()
    .enumerate()
    {
        let label = gtk::Label::builder().label(label).xalign(0.0).build();
        widget.set_hexpand(true);
        grid.attach(&label, 0, row as i32, 1, 1);
        grid.attach(&widget, 1, row as i32, 1, 1);
    }
    let dialog = adw::MessageDialog::new(
        Some(parent),
        Some(&tr("Connect to Remote VM")),
        Some(&tr(
            "Show the screen of a VM on another computer through VNC.",
        )),
    );
    dialog.set_extra_child(Some(&grid));
    dialog.add_response("cancel", &tr("Cancel"));
    dialog.add_response("connect", &tr("Connect"));
    dialog.set_response_appearance("connect", adw::ResponseAppearance::Suggested);
    dialog.set_default_response(Some("connect"));
    dialog.set_close_response("cancel");
    let parent = parent.clone();
    dialog.connect_response(None, move |_, response| {
        if response != "connect" {
            return;
        }
        let Some(port) = parse_port(&port.text()) else {
            dialogs::message(
                &parent,
                &tr("Cannot connect to the remote VM"),
                &tr("The port must be a number from 1 to 65535."),
            );
            return;
        };
        let target = RemoteTarget {
            host: host.text().trim().to_string(),
            port,
            password: password.text().to_string(),
        };
        open_console(&parent, target);
    });
    dialog.present();
}

/// The port field: empty means the default port; None when it is not a port number.
fn parse_port(text: &str) -> Option<u16> {
    let text = text.trim();
    if text.is_empty() {
        return Some(DEFAULT_PORT);
    }
    text.parse::<u16>().ok().filter(|p| *p != 0)
}

/// The title of an error message for a failed session.
fn error_title(error: &RemoteError) -> String {
    match error {
        RemoteError::BadHost { .. } => tr("Unknown host"),
        RemoteError::ConnectionRefused { .. }
        | RemoteError::Connect { .. }
        | RemoteError::Timeout { .. } => tr("Cannot connect to the remote VM"),
        RemoteError::PasswordRequired | RemoteError::AuthFailed { .. } => {
            tr("Authentication failed")
        }
        RemoteError::Protocol(_) | RemoteError::Thread(_) => tr("The remote connection failed"),
    }
}

/// The window title: the desktop name (when the server sent one) and the address.
fn window_title(address: &str, desktop_name: Option<&str>) -> String {
    match desktop_name {
        Some(name) => format!("{name} ({address}) — DeskVM"),
        None => format!("{address} — DeskVM"),
    }
}

/// The file name stem of a screenshot of `target`: host and port, with characters other
/// than letters, digits, '.', '-' and '_' replaced.
fn screenshot_stem(target: &RemoteTarget) -> String {
    let host: String = target
        .host
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("remote-{host}-{}", target.port)
}

/// The session shown by a console window; None after Disconnect.
type SessionSlot = Rc<RefCell<Option<Rc<RemoteSession>>>>;

fn current(slot: &SessionSlot) -> Option<Rc<RemoteSession>> {
    slot.borrow().clone()
}

/// Sends keysym events a few at a time so the remote guest's keyboard buffer keeps up;
/// stops when the session is replaced or gone.
fn send_keysyms_paced(slot: &SessionSlot, events: Vec<KeysymEvent>) {
    let Some(session) = current(slot) else {
        return;
    };
    let weak_session = Rc::downgrade(&session);
    let slot = slot.clone();
    let queue = RefCell::new(VecDeque::from(events));
    glib::timeout_add_local(Duration::from_millis(8), move || {
        let Some(session) = weak_session.upgrade() else {
            return glib::ControlFlow::Break;
        };
        if !current(&slot).is_some_and(|s| Rc::ptr_eq(&s, &session)) {
            return glib::ControlFlow::Break;
        }
        for _ in 0..2 {
            match queue.borrow_mut().pop_front() {
                Some((keysym, down)) => session.keysym(keysym, down),
                None => return glib::ControlFlow::Break,
            }
        }
        glib::ControlFlow::Continue
    });
}

/// Opens a window showing the remote VM; when the connection fails or ends it says so and
/// offers to connect again.
fn open_console(parent: &adw::ApplicationWindow, target: RemoteTarget) {
    let shown_address = format!("{}:{}", target.host, target.port);
    let settings = AppSettings::load();
    let slot: SessionSlot = Rc::new(RefCell::new(Some(Rc::new(RemoteSession::start(
        target.clone(),
    )))));

    let view = ConsoleView::new();
    view.set_grab_hint_template(&tr("Press {combo} to release the keyboard"));
    if let Ok(combo) = parse_release_combo(&settings.string("grab-combo")) {
        view.set_release_combo(combo);
    }
    let one_to_one = settings.string("console-scaling") == "one-to-one";
    view.set_scale_mode(if one_to_one {
        ScaleMode::OneToOne
    } else {
        ScaleMode::Fit
    });
    view.set_scale_filter(if settings.boolean("console-smooth") {
        ScaleFilter::Smooth
    } else {
        ScaleFilter::Sharp
    });
    view.set_pointer_mode(PointerMode::Absolute);
    view.set_vexpand(true);
    let s = slot.clone();
    view.connect_key(move |code, down| {
        if let Some(session) = current(&s) {
            session.key(code, down);
        }
    });
    let last_position = Rc::new(Cell::new((0u16, 0u16)));
    let s = slot.clone();
    let last = last_position.clone();
    view.connect_pointer_absolute(move |x, y, buttons| {
        if let Some(session) = current(&s) {
            session.pointer_absolute(x, y, buttons);
        }
        last.set((x, y));
    });
    let s = slot.clone();
    let last = last_position.clone();
    view.connect_pointer_relative(move |_, _, wheel, buttons| {
        if wheel != 0 {
            if let Some(session) = current(&s) {
                // The wheel comes without a position: use the last one.
                let (x, y) = last.get();
                session.wheel(x, y, wheel, buttons);
            }
        }
    });
    if let Some(app) = parent.application() {
        suspend_app_shortcuts_while_grabbed(&view, app);
    }

    let reconnect = gtk::Button::with_label(&tr("Reconnect"));
    reconnect.add_css_class("pill");
    reconnect.add_css_class("suggested-action");
    reconnect.set_halign(gtk::Align::Center);
    reconnect.set_visible(false);
    let status = adw::StatusPage::builder()
        .icon_name("network-server-symbolic")
        .title(tr("Connecting…"))
        .description(&shown_address)
        .child(&reconnect)
        .build();
    let stack = gtk::Stack::new();
    stack.add_named(&status, Some("status"));
    stack.add_named(&view, Some("view"));
    stack.set_vexpand(true);

    // The toolbar.
    let toolbar = gtk::Box::new(gtk::Orientation::Horizontal, 4);
    toolbar.add_css_class("toolbar");
    let group = gtk::gio::SimpleActionGroup::new();
    let v = view.clone();
    let keys = send_keys_button(&group, "remote", move |events| v.send_keys(&events));
    toolbar.append(&keys);

    let toasts = adw::ToastOverlay::new();
    let s = slot.clone();
    let t = toasts.clone();
    let paste = type_clipboard_button(move |text| {
        let (events, skipped) = text_to_keysym_events(text);
        if skipped > 0 {
            t.add_toast(adw::Toast::new(&skipped_characters_text(skipped)));
        }
        send_keysyms_paced(&s, events);
    });
    toolbar.append(&paste);

    let shot = icon_button("camera-photo-symbolic", &tr("Screenshot"));
    let s = slot.clone();
    let t = toasts.clone();
    let stem = screenshot_stem(&target);
    let weak_parent = parent.downgrade();
    shot.connect_clicked(move |_| {
        let Some(session) = current(&s) else {
            return;
        };
        let path = screenshot_path(&stem);
        if let Some(folder) = path.parent() {
            let _ = std::fs::create_dir_all(folder);
        }
        match session.screenshot_png(&path) {
            Ok(()) => t.add_toast(adw::Toast::new(&format!(
                "{} {}",
                tr("Screenshot saved to"),
                path.display()
            ))),
            Err(error) => {
                let body = match error {
                    ScreenshotError::NoFrame => tr("There is no screen to save yet."),
                    other => other.to_string(),
                };
                if let Some(parent) = weak_parent.upgrade() {
                    dialogs::message(&parent, &tr("Cannot save the screenshot"), &body);
                }
            }
        }
    });
    toolbar.append(&shot);

    let spacer = gtk::Box::new(gtk::Orientation::Horizontal, 0);
    spacer.set_hexpand(true);
    toolbar.append(&spacer);

    let scale = gtk::ToggleButton::new();
    scale.set_icon_name("zoom-original-symbolic");
    scale.set_tooltip_text(Some(&tr("One guest pixel per screen pixel")));
    scale.add_css_class("flat");
    scale.set_active(one_to_one);
    let v = view.clone();
    scale.connect_toggled(move |b| {
        v.set_scale_mode(if b.is_active() {
            ScaleMode::OneToOne
        } else {
            ScaleMode::Fit
        });
    });
    toolbar.append(&scale);

    let grab = icon_button("input-mouse-symbolic", &tr("Grab Keyboard and Mouse"));
    let v = view.clone();
    grab.connect_clicked(move |_| v.set_grabbed(true));
    toolbar.append(&grab);

    let full = icon_button("view-fullscreen-symbolic", &tr("Fullscreen"));
    toolbar.append(&full);

    let disconnect = icon_button("network-offline-symbolic", &tr("Disconnect"));
    toolbar.append(&disconnect);

    // Over the screen in fullscreen, where header bar and toolbar are hidden.
    let leave_full = icon_button("view-restore-symbolic", &tr("Leave Fullscreen"));
    leave_full.remove_css_class("flat");
    leave_full.add_css_class("osd");
    leave_full.set_halign(gtk::Align::End);
    leave_full.set_valign(gtk::Align::Start);
    leave_full.set_margin_top(12);
    leave_full.set_margin_end(12);
    leave_full.set_visible(false);
    let overlay = gtk::Overlay::new();
    overlay.set_child(Some(&stack));
    overlay.add_overlay(&leave_full);
    toasts.set_child(Some(&overlay));
    toasts.set_vexpand(true);

    let title = adw::WindowTitle::new(&shown_address, &tr("Remote VM"));
    let bar = adw::HeaderBar::new();
    bar.set_title_widget(Some(&title));
    let content = gtk::Box::new(gtk::Orientation::Vertical, 0);
    content.insert_action_group("remote", Some(&group));
    content.append(&bar);
    content.append(&toolbar);
    content.append(&toasts);
    let window = adw::Window::builder()
        .title(window_title(&shown_address, None))
        .default_width(1024)
        .default_height(768)
        .content(&content)
        .build();
    window.set_application(parent.application().as_ref());

    let session_items: Vec<gtk::Widget> = vec![
        keys.clone().upcast(),
        paste.upcast(),
        shot.upcast(),
        grab.upcast(),
        disconnect.clone().upcast(),
    ];
    let set_session_items = move |on: bool| {
        for item in &session_items {
            item.set_sensitive(on);
        }
    };
    set_session_items(false);

    // Fullscreen: the button, F11 (the view lets it through when not grabbed), the overlay.
    let toggle_fullscreen = {
        let weak_window = window.downgrade();
        move || {
            if let Some(w) = weak_window.upgrade() {
                if w.is_fullscreen() {
                    w.unfullscreen();
                } else {
                    w.fullscreen();
                }
            }
        }
    };
    let toggle = toggle_fullscreen.clone();
    full.connect_clicked(move |_| toggle());
    let toggle = toggle_fullscreen.clone();
    leave_full.connect_clicked(move |_| toggle());
    let shortcuts = gtk::ShortcutController::new();
    shortcuts.set_scope(gtk::ShortcutScope::Local);
    shortcuts.add_shortcut(gtk::Shortcut::new(
        gtk::ShortcutTrigger::parse_string("F11"),
        Some(gtk::CallbackAction::new(move |_, _| {
            toggle_fullscreen();
            glib::Propagation::Stop
        })),
    ));
    window.add_controller(shortcuts);
    let (b, tb, lf) = (bar.clone(), toolbar.clone(), leave_full.clone());
    window.connect_fullscreened_notify(move |w| {
        let full = w.is_fullscreen();
        b.set_visible(!full);
        tb.set_visible(!full);
        lf.set_visible(full);
    });

    // Ends the session: keys released first, so the remote VM sees none stuck.
    let end_session = {
        let slot = slot.clone();
        let view = view.clone();
        move || {
            view.set_grabbed(false);
            view.release_all_keys();
            if let Some(session) = slot.borrow_mut().take() {
                session.release_all_keys();
            }
        }
    };
    let end = end_session.clone();
    window.connect_close_request(move |_| {
        end();
        glib::Propagation::Proceed
    });

    // What the status page shows for a session that ended (None: still connecting/open).
    let show_ended = {
        let (status, stack, reconnect) = (status.clone(), stack.clone(), reconnect.clone());
        let view = view.clone();
        let address = shown_address.clone();
        let set_items = set_session_items.clone();
        move |ended: &RemoteStatus| {
            let (title, body) = match ended {
                RemoteStatus::Failed(error) => (error_title(error), error.to_string()),
                _ => (tr("The remote VM disconnected"), address.clone()),
            };
            view.set_grabbed(false);
            status.set_icon_name(Some("network-offline-symbolic"));
            status.set_title(&title);
            status.set_description(Some(&body));
            reconnect.set_visible(true);
            stack.set_visible_child_name("status");
            set_items(false);
        }
    };

    let show_ended_now = show_ended.clone();
    let end = end_session.clone();
    disconnect.connect_clicked(move |_| {
        end();
        show_ended_now(&RemoteStatus::Closed);
    });

    // Per session: the generation shown and whether its end or its name were shown.
    let shown = Rc::new(Cell::new(0u64));
    let ended_shown = Rc::new(Cell::new(false));
    let titled = Rc::new(Cell::new(false));
    {
        let (slot, status, reconnect) = (slot.clone(), status.clone(), reconnect.clone());
        let (shown, ended_shown, titled) = (shown.clone(), ended_shown.clone(), titled.clone());
        let view = view.clone();
        reconnect.connect_clicked(move |button| {
            view.clear_frame();
            *slot.borrow_mut() = Some(Rc::new(RemoteSession::start(target.clone())));
            shown.set(0);
            ended_shown.set(false);
            titled.set(false);
            button.set_visible(false);
            status.set_icon_name(Some("network-server-symbolic"));
            status.set_title(&tr("Connecting…"));
        });
    }

    let weak_window = window.downgrade();
    // A 30 ms timer (the session's own update period) rather than the frame clock, which
    // would run at 60 Hz for as long as the window is open; it ends with the window.
    glib::timeout_add_local(REFRESH_PERIOD, move || {
        let Some(window) = weak_window.upgrade() else {
            return glib::ControlFlow::Break;
        };
        let Some(session) = current(&slot) else {
            return glib::ControlFlow::Continue;
        };
        match session.status() {
            RemoteStatus::Connecting => {}
            RemoteStatus::Connected => {
                if !titled.replace(true) {
                    let name = session.desktop_name();
                    match &name {
                        Some(name) => {
                            title.set_title(name);
                            title.set_subtitle(&shown_address);
                        }
                        None => {
                            title.set_title(&shown_address);
                            title.set_subtitle(&tr("Remote VM"));
                        }
                    }
                    window.set_title(Some(&window_title(&shown_address, name.as_deref())));
                }
                if session.generation() != shown.get() {
                    if let Some((generation, frame)) = session.frame_since(shown.get()) {
                        shown.set(generation);
                        // The view takes the XRGB frame as it is (no opaque copy).
                        let stride = frame.width as usize * 4;
                        match view.update_frame_xrgb(
                            frame.width,
                            frame.height,
                            stride,
                            &frame.pixels,
                            None,
                        ) {
                            Ok(()) => {
                                if stack.visible_child_name().as_deref() != Some("view") {
                                    stack.set_visible_child_name("view");
                                    set_session_items(true);
                                }
                            }
                            Err(e) => log::warn!("remote console: {e}"),
                        }
                    }
                }
            }
            ended => {
                if !ended_shown.replace(true) {
                    view.release_all_keys();
                    show_ended(&ended);
                }
            }
        }
        glib::ControlFlow::Continue
    });
    window.present();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `tr("…")` text of this file has a German translation.
    #[test]
    fn every_translatable_text_is_in_the_catalog() {
        let catalog = super::super::i18n::parse_po(include_str!("../../po/de.po"));
        let src = include_str!("remote_page.rs");
        let code = src.split("#[cfg(test)]").next().unwrap_or(src);
        let missing: Vec<String> = code
            .split("tr(\"")
            .skip(1)
            .filter_map(|piece| piece.find("\")").map(|end| piece[..end].to_string()))
            .filter(|text| !catalog.contains_key(text))
            .collect();
        assert!(missing.is_empty(), "not in po/de.po: {missing:?}");
    }

    #[test]
    fn port_field_parsing() {
        assert_eq!(parse_port(""), Some(5900));
        assert_eq!(parse_port(" 5901 "), Some(5901));
        assert_eq!(parse_port("0"), None);
        assert_eq!(parse_port("65536"), None);
        assert_eq!(parse_port("59a"), None);
    }

    #[test]
    fn errors_get_titles_by_kind() {
        let refused = RemoteError::ConnectionRefused {
            addr: "127.0.0.1:1".into(),
        };
        assert_ne!(
            error_title(&refused),
            error_title(&RemoteError::PasswordRequired)
        );
        assert_eq!(
            error_title(&RemoteError::PasswordRequired),
            error_title(&RemoteError::AuthFailed { reason: "x".into() })
        );
    }

    #[test]
    fn titles_show_the_desktop_name_and_the_address() {
        assert_eq!(
            window_title("10.0.0.2:5901", Some("QEMU (win11)")),
            "QEMU (win11) (10.0.0.2:5901) — DeskVM"
        );
        assert_eq!(window_title("host:5900", None), "host:5900 — DeskVM");
    }

    #[test]
    fn screenshot_names_keep_only_safe_characters() {
        let target = |host: &str| RemoteTarget {
            host: host.into(),
            port: 5901,
            password: String::new(),
        };
        assert_eq!(screenshot_stem(&target("vm.lan")), "remote-vm.lan-5901");
        assert_eq!(screenshot_stem(&target("[::1]")), "remote-___1_-5901");
        assert_eq!(screenshot_stem(&target("a/../b")), "remote-a_.._b-5901");
    }
}
