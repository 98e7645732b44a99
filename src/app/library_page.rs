//! The library page: every VM of the library folder as a row (thumbnail, name, OS, state,
//! CPU sparkline, run/pause/resume, power button, and a menu with force off, reset, clone,
//! delete), or an empty state with a "Create a Virtual Machine" button.

use std::collections::HashMap;

use adw::prelude::*;
use deskvm_ui::Sparkline;
use relm4::ComponentSender;
use vmm::VmState;

use super::i18n::tr;
use super::{App, AppMsg};

/// The widgets of one VM's row that change while it runs.
struct RowWidgets {
    state: gtk::Label,
    run: gtk::Button,
    pause: gtk::Button,
    power: gtk::Button,
    menu: gtk::MenuButton,
    sparkline: Sparkline,
    thumbnail: gtk::Picture,
    thumb_icon: gtk::Image,
}

pub struct LibraryPage {
    pub root: gtk::Stack,
    list: gtk::ListBox,
    rows: HashMap<String, RowWidgets>,
    history: usize,
}

fn os_text(family: &str, version: &str) -> String {
    match (family, version) {
        (_, v) if !v.is_empty() => v.to_string(),
        ("", _) => tr("Unknown OS"),
        (f, _) => f.to_string(),
    }
}

pub fn state_text(state: &VmState) -> String {
    match state {
        VmState::Stopped => tr("Stopped"),
        VmState::Running => tr("Running"),
        VmState::Paused => tr("Paused"),
        VmState::Failed(m) => format!("{}: {m}", tr("Failed")),
    }
}

impl LibraryPage {
    pub fn new(sender: &ComponentSender<App>, history: usize) -> Self {
        let root = gtk::Stack::new();
        root.set_transition_type(gtk::StackTransitionType::Crossfade);

        let empty = adw::StatusPage::builder()
            .icon_name("io.github.deskvm.DeskVM-symbolic")
            .title(tr("No Virtual Machines"))
            .description(tr("Create a virtual machine to install an operating system from an ISO image or to boot a disk image."))
            .build();
        let create = gtk::Button::with_label(&tr("Create a Virtual Machine"));
        create.add_css_class("pill");
        create.add_css_class("suggested-action");
        create.set_halign(gtk::Align::Center);
        let s = sender.clone();
        create.connect_clicked(move |_| s.input(AppMsg::NewVm));
        empty.set_child(Some(&create));
        root.add_named(&empty, Some("empty"));

        let list = gtk::ListBox::new();
        list.add_css_class("boxed-list");
        list.set_selection_mode(gtk::SelectionMode::None);
        list.set_valign(gtk::Align::Start);
        let s = sender.clone();
        list.connect_row_activated(move |_, row| {
            s.input(AppMsg::Open(row.widget_name().to_string()));
        });
        let clamp = adw::Clamp::builder()
            .maximum_size(900)
            .child(&list)
            .margin_top(24)
            .margin_bottom(24)
            .margin_start(12)
            .margin_end(12)
            .build();
        let scroller = gtk::ScrolledWindow::builder()
            .hscrollbar_policy(gtk::PolicyType::Never)
            .child(&clamp)
            .vexpand(true)
            .build();
        root.add_named(&scroller, Some("list"));
        Self {
            root,
            list,
            rows: HashMap::new(),
            history,
        }
    }

    /// Rebuilds the rows from the library's entries.
    pub fn set_entries(
        &mut self,
        entries: &[(String, Result<vmm::VmConfig, String>)],
        sender: &ComponentSender<App>,
    ) {
        while let Some(child) = self.list.first_child() {
            self.list.remove(&child);
        }
        self.rows.clear();
        for (name, config) in entries {
            let row = gtk::ListBoxRow::new();
            row.set_widget_name(name);
            row.set_activatable(config.is_ok());
            let hbox = gtk::Box::new(gtk::Orientation::Horizontal, 12);
            hbox.set_margin_top(8);
            hbox.set_margin_bottom(8);
            hbox.set_margin_start(8);
            hbox.set_margin_end(8);

            let thumb_frame = gtk::Overlay::new();
            thumb_frame.add_css_class("card");
            thumb_frame.set_overflow(gtk::Overflow::Hidden);
            let thumbnail = gtk::Picture::new();
            thumbnail.set_can_shrink(true);
            let thumb_icon = gtk::Image::from_icon_name("computer-symbolic");
            thumb_icon.set_pixel_size(32);
            thumb_icon.add_css_class("dim-label");
            let clamp = adw::Clamp::builder()
                .maximum_size(96)
                .tightening_threshold(96)
                .child(&thumbnail)
                .build();
            clamp.set_size_request(96, 72);
            thumb_frame.set_child(Some(&clamp));
            thumb_frame.add_overlay(&thumb_icon);
            thumb_frame.set_valign(gtk::Align::Center);
            hbox.append(&thumb_frame);

            let text = gtk::Box::new(gtk::Orientation::Vertical, 2);
            text.set_hexpand(true);
            text.set_valign(gtk::Align::Center);
            let title = gtk::Label::new(Some(name));
            title.set_xalign(0.0);
            title.add_css_class("heading");
            title.set_ellipsize(gtk::pango::EllipsizeMode::End);
            text.append(&title);
            let subtitle = gtk::Label::new(None);
            subtitle.set_xalign(0.0);
            subtitle.add_css_class("dim-label");
            subtitle.set_ellipsize(gtk::pango::EllipsizeMode::End);
            match config {
                Ok(c) => subtitle.set_label(&format!(
                    "{} · {} · {} MiB",
                    os_text(&c.os.family, &c.os.version),
                    if c.cpus == 1 {
                        tr("1 CPU")
                    } else {
                        format!("{} {}", c.cpus, tr("CPUs"))
                    },
                    c.memory_mib
                )),
                Err(e) => {
                    subtitle.set_label(e);
                    subtitle.add_css_class("error");
                }
            }
            text.append(&subtitle);
            let state = gtk::Label::new(Some(&state_text(&VmState::Stopped)));
            state.set_xalign(0.0);
            state.add_css_class("caption");
            text.append(&state);
            hbox.append(&text);

            let sparkline = Sparkline::new(self.history, 100.0);
            sparkline.widget().set_valign(gtk::Align::Center);
            sparkline.widget().set_tooltip_text(Some(&tr("CPU use")));
            hbox.append(sparkline.widget());

            let button = |icon: &str, tip: &str, msg: fn(String) -> AppMsg| {
                let b = gtk::Button::from_icon_name(icon);
                b.set_tooltip_text(Some(tip));
                b.set_valign(gtk::Align::Center);
                b.add_css_class("flat");
                let s = sender.clone();
                let n = name.clone();
                b.connect_clicked(move |_| s.input(msg(n.clone())));
                b
            };
            let run = button("media-playback-start-symbolic", &tr("Run"), AppMsg::Run);
            let pause = button(
                "media-playback-pause-symbolic",
                &tr("Pause"),
                AppMsg::PauseResume,
            );
            let power = button(
                "system-shutdown-symbolic",
                &tr("Shut Down"),
                AppMsg::PowerButton,
            );
            for b in [&run, &pause, &power] {
                hbox.append(b);
            }

            let menu = gtk::gio::Menu::new();
            let target = name.to_variant();
            for (label, action) in [
                (tr("Details"), "app.open-details"),
                (tr("Performance"), "app.open-performance"),
                (tr("Force Off"), "app.force-off"),
                (tr("Reset"), "app.reset"),
                (tr("Clone"), "app.clone"),
                (tr("Delete…"), "app.delete"),
            ] {
                let item = gtk::gio::MenuItem::new(Some(&label), None);
                item.set_action_and_target_value(Some(action), Some(&target));
                menu.append_item(&item);
            }
            let menu_button = gtk::MenuButton::builder()
                .icon_name("view-more-symbolic")
                .menu_model(&menu)
                .valign(gtk::Align::Center)
                .tooltip_text(tr("More"))
                .build();
            menu_button.add_css_class("flat");
            hbox.append(&menu_button);

            row.set_child(Some(&hbox));
            self.list.append(&row);
            let widgets = RowWidgets {
                state,
                run,
                pause,
                power,
                menu: menu_button,
                sparkline,
                thumbnail,
                thumb_icon,
            };
            Self::show_state(&widgets, &VmState::Stopped, config.is_ok());
            self.rows.insert(name.clone(), widgets);
        }
        self.root
            .set_visible_child_name(if entries.is_empty() { "empty" } else { "list" });
    }

    fn show_state(w: &RowWidgets, state: &VmState, usable: bool) {
        w.state.set_label(&state_text(state));
        let on = matches!(state, VmState::Running | VmState::Paused);
        w.run.set_visible(!on);
        w.run.set_sensitive(usable);
        w.pause.set_visible(on);
        w.power.set_sensitive(on);
        w.menu.set_sensitive(usable);
        w.pause.set_icon_name(if *state == VmState::Paused {
            "media-playback-start-symbolic"
        } else {
            "media-playback-pause-symbolic"
        });
        w.pause
            .set_tooltip_text(Some(&if *state == VmState::Paused {
                tr("Resume")
            } else {
                tr("Pause")
            }));
        if matches!(state, VmState::Failed(_)) {
            w.state.add_css_class("error");
        } else {
            w.state.remove_css_class("error");
        }
        if !on {
            w.sparkline.clear();
            w.thumbnail.set_paintable(None::<&gtk::gdk::Paintable>);
            w.thumb_icon.set_visible(true);
        }
    }

    /// Updates a row's state and adds a CPU sample.
    pub fn update_vm(&self, name: &str, state: &VmState, cpu: Option<f64>) {
        if let Some(w) = self.rows.get(name) {
            Self::show_state(w, state, true);
            if let Some(c) = cpu {
                w.sparkline.push(c);
            }
        }
    }

    /// Shows the latest frame as the row's thumbnail.
    pub fn set_thumbnail(&self, name: &str, texture: Option<&gtk::gdk::Texture>) {
        if let Some(w) = self.rows.get(name) {
            w.thumbnail.set_paintable(texture);
            w.thumb_icon.set_visible(texture.is_none());
        }
    }
}
