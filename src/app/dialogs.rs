//! The app's dialogs: messages, delete (with "delete disks too"), force off, close while
//! VMs run (stop them or keep running in the background), preferences, about, and the
//! keyboard shortcuts window. All libadwaita 1.2 / GTK 4.8 widgets.

use adw::prelude::*;
use relm4::ComponentSender;

use super::i18n::tr;
use super::settings::AppSettings;
use super::{App, AppMsg, APP_ID};

/// Asks for an image file (ISO, disk image) with the desktop's file chooser and calls
/// `on_chosen` with the path. The chooser lives until it answers: its own handler holds the
/// last reference and lets go of it then.
pub fn choose_image(
    parent: Option<&gtk::Window>,
    on_chosen: impl Fn(std::path::PathBuf) + 'static,
) {
    let chooser = gtk::FileChooserNative::new(
        Some(&tr("Choose an Image")),
        parent,
        gtk::FileChooserAction::Open,
        Some(&tr("Choose")),
        Some(&tr("Cancel")),
    );
    let keep = std::rc::Rc::new(std::cell::RefCell::new(Some(chooser.clone())));
    chooser.connect_response(move |c, resp| {
        if resp == gtk::ResponseType::Accept {
            if let Some(p) = c.file().and_then(|f| f.path()) {
                on_chosen(p);
            }
        }
        keep.borrow_mut().take();
    });
    chooser.show();
}

pub fn message(parent: &impl IsA<gtk::Window>, title: &str, body: &str) {
    let d = adw::MessageDialog::new(Some(parent), Some(title), Some(body));
    d.add_response("close", &tr("Close"));
    d.present();
}

pub fn confirm_delete(parent: &impl IsA<gtk::Window>, name: &str, sender: &ComponentSender<App>) {
    let d = adw::MessageDialog::new(
        Some(parent),
        Some(&format!("{} “{name}”?", tr("Delete"))),
        Some(&tr("The VM is removed from the library. Its disk images can be deleted too or kept where they are. CD/DVD images are never deleted.")),
    );
    d.add_response("cancel", &tr("Cancel"));
    d.add_response("keep", &tr("Delete, Keep Disks"));
    d.add_response("all", &tr("Delete with Disks"));
    d.set_response_appearance("all", adw::ResponseAppearance::Destructive);
    d.set_default_response(Some("cancel"));
    d.set_close_response("cancel");
    let s = sender.clone();
    let name = name.to_string();
    d.connect_response(None, move |_, response| match response {
        "keep" => s.input(AppMsg::DeleteConfirmed {
            name: name.clone(),
            disks: false,
        }),
        "all" => s.input(AppMsg::DeleteConfirmed {
            name: name.clone(),
            disks: true,
        }),
        _ => {}
    });
    d.present();
}

pub fn confirm_force_off(
    parent: &impl IsA<gtk::Window>,
    name: &str,
    sender: &ComponentSender<App>,
) {
    force_off_dialog(
        parent,
        &format!("{} “{name}”?", tr("Force Off")),
        &tr("This is like pulling the plug: unsaved work in the VM is lost."),
        name,
        sender,
    );
}

/// The guest did not hear the power button: explain, and offer to pull the plug.
pub fn offer_force_off(parent: &impl IsA<gtk::Window>, name: &str, sender: &ComponentSender<App>) {
    force_off_dialog(
        parent,
        &format!("“{name}” {}", tr("does not respond to the power button")),
        &tr("No operating system with ACPI support is listening yet (the VM may still be in its firmware or boot loader). Force it off instead? Unsaved work in the VM is lost."),
        name,
        sender,
    );
}

/// Cancel / Force Off (destructive) with `heading` and `body`.
fn force_off_dialog(
    parent: &impl IsA<gtk::Window>,
    heading: &str,
    body: &str,
    name: &str,
    sender: &ComponentSender<App>,
) {
    let d = adw::MessageDialog::new(Some(parent), Some(heading), Some(body));
    d.add_response("cancel", &tr("Cancel"));
    d.add_response("off", &tr("Force Off"));
    d.set_response_appearance("off", adw::ResponseAppearance::Destructive);
    d.set_close_response("cancel");
    let s = sender.clone();
    let name = name.to_string();
    d.connect_response(Some("off"), move |_, _| {
        s.input(AppMsg::ForceOffConfirmed(name.clone()))
    });
    d.present();
}

pub fn confirm_close(
    parent: &impl IsA<gtk::Window>,
    running: &[String],
    sender: &ComponentSender<App>,
) {
    let d = adw::MessageDialog::new(
        Some(parent),
        Some(&tr("Virtual Machines Are Running")),
        Some(&format!(
            "{}\n\n{}",
            running.join(", "),
            tr("Stop them now, or keep them running in the background? Start DeskVM again to get the window back.")
        )),
    );
    d.add_response("cancel", &tr("Cancel"));
    d.add_response("stop", &tr("Stop and Quit"));
    d.add_response("keep", &tr("Keep Running"));
    d.set_response_appearance("stop", adw::ResponseAppearance::Destructive);
    d.set_response_appearance("keep", adw::ResponseAppearance::Suggested);
    d.set_close_response("cancel");
    let s = sender.clone();
    d.connect_response(None, move |_, response| match response {
        "stop" => s.input(AppMsg::StopAllAndQuit),
        "keep" => s.input(AppMsg::KeepRunning),
        _ => {}
    });
    d.present();
}

/// The guest locked the CD tray: ask whether to change the disc anyway.
pub fn confirm_force_cd(
    parent: &impl IsA<gtk::Window>,
    index: usize,
    disc: Option<std::path::PathBuf>,
    reason: &str,
    sender: &ComponentSender<App>,
) {
    let d = adw::MessageDialog::new(
        Some(parent),
        Some(&tr("The VM Holds the Disc")),
        Some(&format!(
            "{reason}\n\n{}",
            tr("Change it anyway? A program in the VM may be reading it.")
        )),
    );
    d.add_response("cancel", &tr("Cancel"));
    d.add_response("force", &tr("Change Anyway"));
    d.set_response_appearance("force", adw::ResponseAppearance::Destructive);
    d.set_close_response("cancel");
    let s = sender.clone();
    d.connect_response(Some("force"), move |_, _| {
        s.input(AppMsg::ForceChangeCd(index, disc.clone()))
    });
    d.present();
}

pub fn about(parent: &impl IsA<gtk::Window>) {
    let about = adw::AboutWindow::builder()
        .transient_for(parent)
        .application_name("DeskVM")
        .application_icon(APP_ID)
        .version(env!("CARGO_PKG_VERSION"))
        .developer_name(tr("The DeskVM developers"))
        .comments(tr(
            "Virtual machines on your desktop, with their own KVM engine",
        ))
        .license_type(gtk::License::Gpl30)
        .website("https://github.com/deskvm/deskvm")
        .issue_url("https://github.com/deskvm/deskvm/issues")
        .translator_credits(tr("translator-credits"))
        .build();
    about.present();
}

const SHORTCUTS_UI: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<interface>
  <object class="GtkShortcutsWindow" id="shortcuts">
    <property name="modal">1</property>
    <child>
      <object class="GtkShortcutsSection">
        <property name="section-name">main</property>
        <child>
          <object class="GtkShortcutsGroup">
            <property name="title">@GENERAL@</property>
            <child><object class="GtkShortcutsShortcut"><property name="title">@NEW@</property><property name="accelerator">&lt;Control&gt;n</property></object></child>
            <child><object class="GtkShortcutsShortcut"><property name="title">@PREFS@</property><property name="accelerator">&lt;Control&gt;comma</property></object></child>
            <child><object class="GtkShortcutsShortcut"><property name="title">@SHORTCUTS@</property><property name="accelerator">&lt;Control&gt;question</property></object></child>
            <child><object class="GtkShortcutsShortcut"><property name="title">@REFRESH@</property><property name="accelerator">F5</property></object></child>
            <child><object class="GtkShortcutsShortcut"><property name="title">@QUIT@</property><property name="accelerator">&lt;Control&gt;q</property></object></child>
          </object>
        </child>
        <child>
          <object class="GtkShortcutsGroup">
            <property name="title">@CONSOLE@</property>
            <child><object class="GtkShortcutsShortcut"><property name="title">@FULLSCREEN@</property><property name="accelerator">F11</property></object></child>
            <child><object class="GtkShortcutsShortcut"><property name="title">@BACK@</property><property name="accelerator">&lt;Alt&gt;Left</property></object></child>
            <child><object class="GtkShortcutsShortcut"><property name="title">@RELEASE@</property><property name="accelerator">&lt;Control&gt;&lt;Alt&gt;</property></object></child>
          </object>
        </child>
      </object>
    </child>
  </object>
</interface>
"#;

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn shortcuts(parent: &impl IsA<gtk::Window>) {
    let mut ui = SHORTCUTS_UI.to_string();
    for (key, text) in [
        ("@GENERAL@", "General"),
        ("@NEW@", "Create a Virtual Machine"),
        ("@PREFS@", "Preferences"),
        ("@SHORTCUTS@", "Keyboard Shortcuts"),
        ("@REFRESH@", "Reload the Library"),
        ("@QUIT@", "Quit"),
        ("@CONSOLE@", "Console"),
        ("@FULLSCREEN@", "Fullscreen"),
        ("@BACK@", "Back to the Library"),
        ("@RELEASE@", "Release the Keyboard"),
    ] {
        ui = ui.replace(key, &xml_escape(&tr(text)));
    }
    let builder = gtk::Builder::from_string(&ui);
    if let Some(w) = builder.object::<gtk::ShortcutsWindow>("shortcuts") {
        w.set_transient_for(Some(parent));
        w.present();
    }
}

fn spin_row(
    title: &str,
    subtitle: &str,
    min: f64,
    max: f64,
    step: f64,
    value: f64,
) -> (adw::ActionRow, gtk::SpinButton) {
    let row = adw::ActionRow::builder()
        .title(title)
        .subtitle(subtitle)
        .build();
    let spin = gtk::SpinButton::with_range(min, max, step);
    spin.set_value(value);
    spin.set_valign(gtk::Align::Center);
    row.add_suffix(&spin);
    row.set_activatable_widget(Some(&spin));
    (row, spin)
}

fn switch_row(title: &str, subtitle: &str, on: bool) -> (adw::ActionRow, gtk::Switch) {
    let row = adw::ActionRow::builder()
        .title(title)
        .subtitle(subtitle)
        .build();
    let sw = gtk::Switch::new();
    sw.set_active(on);
    sw.set_valign(gtk::Align::Center);
    row.add_suffix(&sw);
    row.set_activatable_widget(Some(&sw));
    (row, sw)
}

pub fn preferences(parent: &impl IsA<gtk::Window>, settings: &std::rc::Rc<AppSettings>) {
    let window = adw::PreferencesWindow::builder()
        .transient_for(parent)
        .modal(true)
        .search_enabled(false)
        .build();
    let page = adw::PreferencesPage::new();

    let library = adw::PreferencesGroup::builder()
        .title(tr("Library"))
        .build();
    let folder = adw::EntryRow::builder()
        .title(tr("VM folder (empty: the default)"))
        .text(settings.string("vm-folder"))
        .show_apply_button(true)
        .build();
    let s = settings.clone();
    folder.connect_apply(move |row| s.set_string("vm-folder", row.text().as_str()));
    library.add(&folder);
    page.add(&library);

    let console = adw::PreferencesGroup::builder()
        .title(tr("Console"))
        .build();
    let scaling = adw::ComboRow::builder()
        .title(tr("Scaling"))
        .model(&gtk::StringList::new(&[
            &tr("Fit to Window"),
            &tr("One to One"),
        ]))
        .selected(u32::from(
            settings.string("console-scaling") == "one-to-one",
        ))
        .build();
    let s = settings.clone();
    scaling.connect_selected_notify(move |row| {
        s.set_string(
            "console-scaling",
            if row.selected() == 1 {
                "one-to-one"
            } else {
                "fit"
            },
        )
    });
    console.add(&scaling);
    let (smooth_row, smooth) = switch_row(
        &tr("Smooth Scaling"),
        &tr("Off: sharp pixels"),
        settings.boolean("console-smooth"),
    );
    let s = settings.clone();
    smooth.connect_active_notify(move |sw| s.set_boolean("console-smooth", sw.is_active()));
    console.add(&smooth_row);
    let combo = adw::EntryRow::builder()
        .title(tr("Release keyboard with"))
        .text(settings.string("grab-combo"))
        .show_apply_button(true)
        .build();
    let s = settings.clone();
    combo.connect_apply(move |row| {
        match deskvm_ui::keymap::parse_release_combo(row.text().as_str()) {
            Ok(m) => {
                row.remove_css_class("error");
                s.set_string("grab-combo", &deskvm_ui::keymap::combo_label(m));
            }
            Err(_) => row.add_css_class("error"),
        }
    });
    console.add(&combo);
    page.add(&console);

    let graphs = adw::PreferencesGroup::builder()
        .title(tr("Graphs"))
        .description(tr("Changes apply at the next start of DeskVM."))
        .build();
    let (interval_row, interval) = spin_row(
        &tr("Update interval"),
        &tr("Milliseconds"),
        250.0,
        10000.0,
        250.0,
        f64::from(settings.uint("graph-interval-ms")),
    );
    let s = settings.clone();
    interval.connect_value_changed(move |sp| s.set_uint("graph-interval-ms", sp.value() as u32));
    graphs.add(&interval_row);
    let (history_row, history) = spin_row(
        &tr("History length"),
        &tr("Samples kept"),
        10.0,
        3600.0,
        10.0,
        f64::from(settings.uint("history-length")),
    );
    let s = settings.clone();
    history.connect_value_changed(move |sp| s.set_uint("history-length", sp.value() as u32));
    graphs.add(&history_row);
    page.add(&graphs);

    let confirm = adw::PreferencesGroup::builder()
        .title(tr("Confirmations"))
        .build();
    let (r1, force) = switch_row(
        &tr("Confirm Force Off"),
        "",
        settings.boolean("confirm-force-off"),
    );
    let s = settings.clone();
    force.connect_active_notify(move |sw| s.set_boolean("confirm-force-off", sw.is_active()));
    confirm.add(&r1);
    let (r2, quit) = switch_row(
        &tr("Ask when closing with running VMs"),
        "",
        settings.boolean("confirm-quit-running"),
    );
    let s = settings.clone();
    quit.connect_active_notify(move |sw| s.set_boolean("confirm-quit-running", sw.is_active()));
    confirm.add(&r2);
    page.add(&confirm);
    if !settings.is_persistent() {
        let note = adw::PreferencesGroup::builder()
            .description(tr(
                "The settings schema is not available: changes last until DeskVM quits.",
            ))
            .build();
        page.add(&note);
    }
    window.add(&page);
    window.present();
}
