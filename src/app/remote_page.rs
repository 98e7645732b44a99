//! "Connect to Remote VM…": a dialog asking for host, port (default 5900) and password, and
//! a window with a `ConsoleView` showing the remote VM through a [`RemoteSession`] (frames
//! copied on the frame clock when the session's generation changed, keys and the absolute
//! pointer sent back). Connection errors (bad host, refused, wrong password, lost
//! connection) are shown in a message over the main window and close the console window.
//!
//! Not here: the toolbar of the local console (send keys, screenshot, scaling), a list of
//! recent connections, and keyboard grab (the view's own grab works as in the local console).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use adw::prelude::*;
use deskvm_ui::{ConsoleView, PointerMode};
use gtk::glib;

use super::console_page::copy_frame;
use super::dialogs;
use super::i18n::tr;
use super::remote::{RemoteError, RemoteSession, RemoteStatus, RemoteTarget};

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

/// Opens a window showing the remote VM; it closes itself when the connection fails or ends.
fn open_console(parent: &adw::ApplicationWindow, target: RemoteTarget) {
    let shown_address = format!("{}:{}", target.host, target.port);
    let session = Rc::new(RemoteSession::start(target));

    let view = ConsoleView::new();
    view.set_grab_hint_template(&tr("Press {combo} to release the keyboard"));
    view.set_pointer_mode(PointerMode::Absolute);
    view.set_vexpand(true);
    let s = session.clone();
    view.connect_key(move |code, down| s.key(code, down));
    let last_position = Rc::new(Cell::new((0u16, 0u16)));
    let s = session.clone();
    let last = last_position.clone();
    view.connect_pointer_absolute(move |x, y, buttons| {
        s.pointer_absolute(x, y, buttons);
        last.set((x, y));
    });
    let s = session.clone();
    let last = last_position.clone();
    view.connect_pointer_relative(move |_, _, wheel, buttons| {
        if wheel != 0 {
            // The wheel comes without a position: use the last one.
            let (x, y) = last.get();
            s.wheel(x, y, wheel, buttons);
        }
    });

    let status = adw::StatusPage::builder()
        .icon_name("network-server-symbolic")
        .title(tr("Connecting…"))
        .description(&shown_address)
        .build();
    let stack = gtk::Stack::new();
    stack.add_named(&status, Some("status"));
    stack.add_named(&view, Some("view"));
    stack.set_vexpand(true);

    let title = adw::WindowTitle::new(&shown_address, &tr("Remote VM"));
    let bar = adw::HeaderBar::new();
    bar.set_title_widget(Some(&title));
    let content = gtk::Box::new(gtk::Orientation::Vertical, 0);
    content.append(&bar);
    content.append(&stack);
    let window = adw::Window::builder()
        .title(format!("{shown_address} — DeskVM"))
        .default_width(1024)
        .default_height(768)
        .content(&content)
        .build();
    window.set_application(parent.application().as_ref());

    // The session lives as long as the window shows it.
    let session_slot = Rc::new(RefCell::new(Some(session)));
    let slot = session_slot.clone();
    let v = view.clone();
    window.connect_close_request(move |_| {
        v.set_grabbed(false);
        v.release_all_keys();
        slot.borrow_mut().take();
        glib::Propagation::Proceed
    });

    let shown = Cell::new(0u64);
    let parent = parent.clone();
    let weak_window = window.downgrade();
    // On the box, which is mapped while the status page hides the view.
    let v = view.clone();
    content.add_tick_callback(move |_, _| {
        let view = &v;
        let Some(session) = session_slot.borrow().clone() else {
            return glib::ControlFlow::Break;
        };
        match session.status() {
            RemoteStatus::Connecting => {}
            RemoteStatus::Connected => {
                if session.generation() != shown.get() {
                    if let Some((generation, frame)) = session.frame_since(shown.get()) {
                        shown.set(generation);
                        let copied = copy_frame(
                            frame.width,
                            frame.height,
                            frame.width as usize * 4,
                            &frame.pixels,
                        );
                        if let Some(copied) = copied {
                            let stride = copied.width as usize * 4;
                            let bytes = glib::Bytes::from_owned(copied.pixels);
                            match view.set_frame(copied.width, copied.height, stride, bytes) {
                                Ok(()) => stack.set_visible_child_name("view"),
                                Err(e) => log::warn!("remote console: {e}"),
                            }
                        }
                    }
                }
            }
            ended => {
                if let RemoteStatus::Failed(error) = &ended {
                    dialogs::message(&parent, &error_title(error), &error.to_string());
                } else {
                    dialogs::message(&parent, &tr("The remote VM disconnected"), &shown_address);
                }
                if let Some(w) = weak_window.upgrade() {
                    w.close();
                }
                return glib::ControlFlow::Break;
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
}
