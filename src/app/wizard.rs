//! The create-VM wizard: a modal window with one page per step (source, OS, CPUs and
//! memory, storage, network, summary) and Back/Next/Create buttons. Each Next checks the
//! step with `WizardModel::check_step` and shows the problems under the page; Create makes
//! the VM folder atomically and starts the VM (or opens its details when "customize before
//! start" is on).

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;

use adw::prelude::*;
use relm4::ComponentSender;

use super::i18n::tr;
use super::library_ops;
use super::wizard_model::{
    new_uuid, nic_model_label, unique_name, HostResources, Network, OsFamily, Source, Step,
    Storage, WizardModel, NIC_MODELS,
};
use super::{App, AppMsg};

struct Wizard {
    model: RefCell<WizardModel>,
    host: HostResources,
    taken: Vec<String>,
    library_dir: PathBuf,
    step: RefCell<usize>,
    stack: gtk::Stack,
    problems: gtk::Label,
    warnings: gtk::Label,
    back: gtk::Button,
    next: gtk::Button,
    summary: gtk::Label,
    name: adw::EntryRow,
    cpus: gtk::SpinButton,
    memory: gtk::SpinButton,
    disk_size: gtk::SpinButton,
    nic: adw::ComboRow,
    window: adw::Window,
}

/// A path entry with a "Choose…" button; `on_path` gets every typed or chosen path.
fn file_row(title: &str, on_path: impl Fn(PathBuf) + 'static) -> adw::EntryRow {
    let row = adw::EntryRow::builder().title(title).build();
    let button = gtk::Button::from_icon_name("document-open-symbolic");
    button.set_tooltip_text(Some(&tr("Choose…")));
    button.set_valign(gtk::Align::Center);
    button.add_css_class("flat");
    row.add_suffix(&button);
    row.connect_changed(move |r| on_path(PathBuf::from(r.text().as_str())));
    let r = row.clone();
    button.connect_clicked(move |b| {
        let r = r.clone();
        super::dialogs::choose_image(b.root().and_downcast_ref::<gtk::Window>(), move |p| {
            r.set_text(&p.display().to_string())
        });
    });
    row
}

fn radio(group: Option<&gtk::CheckButton>) -> gtk::CheckButton {
    let b = gtk::CheckButton::new();
    if let Some(g) = group {
        b.set_group(Some(g));
    }
    b
}

fn page(title: &str, description: &str) -> (gtk::Box, adw::PreferencesGroup) {
    let group = adw::PreferencesGroup::builder()
        .title(title)
        .description(description)
        .build();
    let b = gtk::Box::new(gtk::Orientation::Vertical, 12);
    b.set_margin_top(18);
    b.set_margin_start(18);
    b.set_margin_end(18);
    b.append(&group);
    (b, group)
}

fn action_row(title: &str, suffix: &impl IsA<gtk::Widget>) -> adw::ActionRow {
    let r = adw::ActionRow::builder().title(title).build();
    r.add_prefix(suffix);
    r.set_activatable_widget(Some(suffix));
    r
}

/// Opens the wizard over `parent`.
pub fn open(
    parent: &impl IsA<gtk::Window>,
    library_dir: PathBuf,
    taken: Vec<String>,
    sender: &ComponentSender<App>,
) {
    let host = super::host::resources();
    let mut model = WizardModel::default();
    model.name = unique_name(&model.os_version, &taken);
    let window = adw::Window::builder()
        .transient_for(parent)
        .modal(true)
        .title(tr("New Virtual Machine"))
        .default_width(560)
        .default_height(560)
        .build();
    let stack = gtk::Stack::new();
    stack.set_transition_type(gtk::StackTransitionType::SlideLeftRight);
    stack.set_vexpand(true);

    let wiz_cell: Rc<RefCell<Option<Rc<Wizard>>>> = Rc::new(RefCell::new(None));
    let with = {
        let cell = wiz_cell.clone();
        move |f: Box<dyn Fn(&Wizard)>| {
            let cell = cell.clone();
            move || {
                if let Some(w) = cell.borrow().as_ref() {
                    f(w);
                }
            }
        }
    };

    // 1. Source.
    let (source_page, g) = page(
        &tr("Installation Source"),
        &tr("Where does the operating system come from?"),
    );
    let iso = radio(None);
    iso.set_active(true);
    let image = radio(Some(&iso));
    let empty = radio(Some(&iso));
    g.add(&action_row(&tr("Install from an ISO image"), &iso));
    let c = wiz_cell.clone();
    let iso_radio = iso.clone();
    let iso_row = file_row(&tr("ISO file"), move |p| {
        if let Some(w) = c.borrow().as_ref() {
            iso_radio.set_active(true);
            w.model.borrow_mut().source = Source::Iso(p);
            w.refresh();
        }
    });
    g.add(&iso_row);
    g.add(&action_row(&tr("Boot an existing disk image"), &image));
    let c = wiz_cell.clone();
    let image_radio = image.clone();
    let image_row = file_row(&tr("Image file"), move |p| {
        if let Some(w) = c.borrow().as_ref() {
            image_radio.set_active(true);
            w.model.borrow_mut().source = Source::ExistingImage(p);
            w.refresh();
        }
    });
    g.add(&image_row);
    g.add(&action_row(
        &tr("Empty machine (network boot or add media later)"),
        &empty,
    ));
    let (ir, imr) = (iso_row.clone(), image_row.clone());
    let c = wiz_cell.clone();
    let set_source = move |kind: u8| {
        if let Some(w) = c.borrow().as_ref() {
            let path = |r: &adw::EntryRow| PathBuf::from(r.text().as_str());
            w.model.borrow_mut().source = match kind {
                0 => Source::Iso(path(&ir)),
                1 => Source::ExistingImage(path(&imr)),
                _ => Source::Empty,
            };
            w.refresh();
        }
    };
    let set_source = Rc::new(set_source);
    for (b, k) in [(&iso, 0u8), (&image, 1), (&empty, 2)] {
        let f = set_source.clone();
        b.connect_toggled(move |b| {
            if b.is_active() {
                f(k)
            }
        });
    }
    stack.add_named(&source_page, Some("0"));

    // 2. OS.
    let (os_page, g) = page(
        &tr("Operating System"),
        &tr("Picks sensible defaults for memory, disk and network card."),
    );
    let family_names = [tr("Linux"), tr("Windows"), tr("BSD"), tr("Other")];
    let family = adw::ComboRow::builder()
        .title(tr("Family"))
        .model(&gtk::StringList::new(
            &family_names.iter().map(String::as_str).collect::<Vec<_>>(),
        ))
        .build();
    let version = adw::ComboRow::builder()
        .title(tr("Version"))
        .model(&gtk::StringList::new(OsFamily::Linux.versions()))
        .build();
    let c = wiz_cell.clone();
    let v = version.clone();
    family.connect_selected_notify(move |r| {
        let f = OsFamily::ALL
            .get(r.selected() as usize)
            .copied()
            .unwrap_or(OsFamily::Other);
        v.set_model(Some(&gtk::StringList::new(f.versions())));
        v.set_selected(0);
        if let Some(w) = c.borrow().as_ref() {
            let mut m = w.model.borrow_mut();
            m.os_family = f;
            m.os_version = f
                .versions()
                .first()
                .map(|s| s.to_string())
                .unwrap_or_default();
            m.apply_os_defaults();
            drop(m);
            w.load_numbers();
            w.refresh();
        }
    });
    let c = wiz_cell.clone();
    version.connect_selected_notify(move |r| {
        if let Some(w) = c.borrow().as_ref() {
            let mut m = w.model.borrow_mut();
            let f = m.os_family;
            if let Some(v) = f.versions().get(r.selected() as usize) {
                m.os_version = v.to_string();
                m.apply_os_defaults();
            }
            drop(m);
            w.load_numbers();
            w.refresh();
        }
    });
    g.add(&family);
    g.add(&version);
    stack.add_named(&os_page, Some("1"));

    // 3. CPUs and memory.
    let (res_page, g) = page(
        &tr("Processors and Memory"),
        &format!(
            "{} {} CPUs, {} MiB {} ({} MiB {})",
            tr("This computer has"),
            host.cpus,
            host.total_memory_mib,
            tr("memory"),
            host.available_memory_mib,
            tr("free")
        ),
    );
    let cpus = gtk::SpinButton::with_range(0.0, 255.0, 1.0);
    cpus.set_valign(gtk::Align::Center);
    let memory = gtk::SpinButton::with_range(0.0, 4_194_304.0, 128.0);
    memory.set_valign(gtk::Align::Center);
    let r = adw::ActionRow::builder().title(tr("CPUs")).build();
    r.add_suffix(&cpus);
    g.add(&r);
    let r = adw::ActionRow::builder().title(tr("Memory (MiB)")).build();
    r.add_suffix(&memory);
    g.add(&r);
    let c = wiz_cell.clone();
    cpus.connect_value_changed(move |s| {
        if let Some(w) = c.borrow().as_ref() {
            w.model.borrow_mut().cpus = s.value() as u32;
            w.refresh();
        }
    });
    let c = wiz_cell.clone();
    memory.connect_value_changed(move |s| {
        if let Some(w) = c.borrow().as_ref() {
            w.model.borrow_mut().memory_mib = s.value() as u64;
            w.refresh();
        }
    });
    stack.add_named(&res_page, Some("2"));

    // 4. Storage.
    let (storage_page, g) = page(&tr("Storage"), &tr("The VM's hard disk."));
    let new_disk = radio(None);
    new_disk.set_active(true);
    let existing = radio(Some(&new_disk));
    let no_disk = radio(Some(&new_disk));
    let disk_size = gtk::SpinButton::with_range(0.0, 100_000.0, 1.0);
    disk_size.set_valign(gtk::Align::Center);
    g.add(&action_row(&tr("Create a new disk image"), &new_disk));
    let r = adw::ActionRow::builder().title(tr("Size (GiB)")).build();
    r.add_suffix(&disk_size);
    g.add(&r);
    g.add(&action_row(&tr("Use an existing disk image"), &existing));
    let c = wiz_cell.clone();
    let existing_radio = existing.clone();
    let existing_row = file_row(&tr("Image file"), move |p| {
        if let Some(w) = c.borrow().as_ref() {
            existing_radio.set_active(true);
            w.model.borrow_mut().storage = Storage::Existing(p);
            w.refresh();
        }
    });
    g.add(&existing_row);
    g.add(&action_row(&tr("No hard disk"), &no_disk));
    let c = wiz_cell.clone();
    disk_size.connect_value_changed(move |s| {
        if let Some(w) = c.borrow().as_ref() {
            if matches!(w.model.borrow().storage, Storage::New { .. }) {
                w.model.borrow_mut().storage = Storage::New {
                    size_gib: s.value() as u64,
                };
            }
            w.refresh();
        }
    });
    for (b, k) in [(&new_disk, 0u8), (&existing, 1), (&no_disk, 2)] {
        let c = wiz_cell.clone();
        let er = existing_row.clone();
        b.connect_toggled(move |b| {
            if !b.is_active() {
                return;
            }
            if let Some(w) = c.borrow().as_ref() {
                let path = PathBuf::from(er.text().as_str());
                w.model.borrow_mut().storage = match k {
                    0 => Storage::New {
                        size_gib: w.disk_size.value() as u64,
                    },
                    1 => Storage::Existing(path),
                    _ => Storage::None,
                };
                w.refresh();
            }
        });
    }
    stack.add_named(&storage_page, Some("3"));

    // 5. Network.
    let (net_page, g) = page(
        &tr("Network"),
        &tr("NAT gives the guest the network of this computer; no setup needed."),
    );
    let nat = radio(None);
    nat.set_active(true);
    let none = radio(Some(&nat));
    g.add(&action_row(&tr("NAT"), &nat));
    g.add(&action_row(&tr("No network"), &none));
    let nic = adw::ComboRow::builder()
        .title(tr("Network card"))
        .model(&gtk::StringList::new(&NIC_MODELS.map(|(_, l)| l)))
        .selected(2)
        .build();
    g.add(&nic);
    let update_net = {
        let c = wiz_cell.clone();
        let nat = nat.clone();
        let nic = nic.clone();
        Rc::new(move || {
            if let Some(w) = c.borrow().as_ref() {
                let model = NIC_MODELS
                    .get(nic.selected() as usize)
                    .map(|m| m.0)
                    .unwrap_or_default();
                w.model.borrow_mut().network = if nat.is_active() {
                    Network::Nat(model)
                } else {
                    Network::None
                };
                w.refresh();
            }
        })
    };
    let u = update_net.clone();
    nat.connect_toggled(move |_| u());
    let u = update_net.clone();
    nic.connect_selected_notify(move |_| u());
    stack.add_named(&net_page, Some("4"));

    // 6. Summary.
    let (summary_page, g) = page(&tr("Summary"), "");
    let name = adw::EntryRow::builder().title(tr("Name")).build();
    g.add(&name);
    let summary = gtk::Label::new(None);
    summary.set_xalign(0.0);
    summary.set_wrap(true);
    summary.set_selectable(true);
    summary_page.append(&summary);
    let customize = gtk::CheckButton::with_label(&tr("Customize before start"));
    summary_page.append(&customize);
    let c = wiz_cell.clone();
    name.connect_changed(move |r| {
        if let Some(w) = c.borrow().as_ref() {
            w.model.borrow_mut().name = r.text().to_string();
            w.refresh();
        }
    });
    let c = wiz_cell.clone();
    customize.connect_toggled(move |b| {
        if let Some(w) = c.borrow().as_ref() {
            w.model.borrow_mut().customize_before_start = b.is_active();
        }
    });
    stack.add_named(&summary_page, Some("5"));

    let problems = gtk::Label::new(None);
    problems.add_css_class("error");
    problems.set_wrap(true);
    problems.set_xalign(0.0);
    problems.set_margin_start(18);
    problems.set_margin_end(18);
    let warnings = gtk::Label::new(None);
    warnings.add_css_class("warning");
    warnings.set_wrap(true);
    warnings.set_xalign(0.0);
    warnings.set_margin_start(18);
    warnings.set_margin_end(18);
    warnings.set_margin_bottom(12);

    let back = gtk::Button::with_label(&tr("Back"));
    let next = gtk::Button::with_label(&tr("Next"));
    next.add_css_class("suggested-action");
    let cancel = gtk::Button::with_label(&tr("Cancel"));
    let header = adw::HeaderBar::new();
    header.set_show_end_title_buttons(false);
    header.pack_start(&cancel);
    header.pack_end(&next);
    header.pack_end(&back);
    let w = window.clone();
    cancel.connect_clicked(move |_| w.close());

    let content = gtk::Box::new(gtk::Orientation::Vertical, 6);
    content.append(&header);
    content.append(&stack);
    content.append(&problems);
    content.append(&warnings);
    window.set_content(Some(&content));

    let wiz = Rc::new(Wizard {
        model: RefCell::new(model),
        host,
        taken,
        library_dir,
        step: RefCell::new(0),
        stack,
        problems,
        warnings,
        back: back.clone(),
        next: next.clone(),
        summary,
        name: name.clone(),
        cpus,
        memory,
        disk_size,
        nic: nic.clone(),
        window: window.clone(),
    });
    *wiz_cell.borrow_mut() = Some(wiz.clone());
    wiz.load_numbers();
    let initial_name = wiz.model.borrow().name.clone();
    name.set_text(&initial_name);
    let b = with(Box::new(|w: &Wizard| w.go(-1)));
    back.connect_clicked(move |_| b());
    let s = sender.clone();
    let c = wiz_cell.clone();
    next.connect_clicked(move |_| {
        let Some(w) = c.borrow().as_ref().cloned() else {
            return;
        };
        if *w.step.borrow() + 1 < Step::ALL.len() {
            w.go(1);
        } else if let Some((name, customize)) = w.create() {
            w.window.close();
            s.input(AppMsg::Created { name, customize });
        }
    });
    // Break the cycle when the window goes.
    let c = wiz_cell.clone();
    window.connect_close_request(move |_| {
        c.borrow_mut().take();
        gtk::glib::Propagation::Proceed
    });
    wiz.show_step();
    window.present();
}

impl Wizard {
    fn load_numbers(&self) {
        let m = self.model.borrow().clone();
        self.cpus.set_value(f64::from(m.cpus));
        self.memory.set_value(m.memory_mib as f64);
        if let Storage::New { size_gib } = m.storage {
            self.disk_size.set_value(size_gib as f64);
        }
        if let Network::Nat(model) = m.network {
            if let Some(i) = NIC_MODELS.iter().position(|(n, _)| *n == model) {
                self.nic.set_selected(i as u32);
            }
        }
    }

    fn current(&self) -> Step {
        Step::ALL[(*self.step.borrow()).min(Step::ALL.len() - 1)]
    }

    fn refresh(&self) {
        let m = self.model.borrow();
        let step = self.current();
        let errors = m.check_step(step, &self.host, &self.taken);
        self.problems.set_label(
            &errors
                .iter()
                .map(|e| capitalize(&e.to_string()))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        let warnings = if step == Step::Resources || step == Step::Summary {
            m.warnings(&self.host)
                .iter()
                .map(|w| w.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            String::new()
        };
        self.warnings.set_label(&warnings);
        if step == Step::Summary {
            if errors.is_empty() {
                self.name.remove_css_class("error");
            } else {
                self.name.add_css_class("error");
            }
            self.summary.set_label(&summary_text(&m));
        }
        self.next.set_sensitive(errors.is_empty());
    }

    fn show_step(&self) {
        let i = *self.step.borrow();
        self.stack.set_visible_child_name(&i.to_string());
        self.back.set_sensitive(i > 0);
        self.next.set_label(&if i + 1 == Step::ALL.len() {
            tr("Create")
        } else {
            tr("Next")
        });
        self.refresh();
    }

    fn go(&self, delta: i32) {
        let i = *self.step.borrow() as i32 + delta;
        if i < 0 || i as usize >= Step::ALL.len() {
            return;
        }
        if delta > 0
            && !self
                .model
                .borrow()
                .check_step(self.current(), &self.host, &self.taken)
                .is_empty()
        {
            self.refresh();
            return;
        }
        *self.step.borrow_mut() = i as usize;
        self.show_step();
    }

    fn create(&self) -> Option<(String, bool)> {
        let m = self.model.borrow().clone();
        let errors = m.check_all(&self.host, &self.taken);
        if let Some(e) = errors.first() {
            self.problems.set_label(&e.to_string());
            return None;
        }
        let dir = crate::library::vm_dir(&self.library_dir, &m.name).ok()?;
        let config = m.to_config(&dir, &new_uuid());
        let disk = match m.storage {
            Storage::New { size_gib } => {
                Some((dir.join(WizardModel::NEW_DISK_FILE), size_gib << 30))
            }
            _ => None,
        };
        match library_ops::create_vm(
            &self.library_dir,
            &config,
            disk.as_ref().map(|(p, s)| (p.as_path(), *s)),
        ) {
            Ok(_) => Some((m.name.clone(), m.customize_before_start)),
            Err(e) => {
                self.problems.set_label(&e.to_string());
                None
            }
        }
    }
}

/// "choose an image" → "Choose an image".
fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn summary_text(m: &WizardModel) -> String {
    let source = match &m.source {
        Source::Iso(p) => format!("{}: {}", tr("ISO image"), p.display()),
        Source::ExistingImage(p) => format!("{}: {}", tr("Disk image"), p.display()),
        Source::Empty => tr("Empty machine"),
    };
    let storage = match &m.storage {
        Storage::New { size_gib } => format!("{} {size_gib} GiB", tr("New disk of")),
        Storage::Existing(p) => p.display().to_string(),
        Storage::None => tr("No hard disk"),
    };
    let network = match m.network {
        Network::Nat(model) => format!("NAT ({})", nic_model_label(model)),
        Network::None => tr("No network"),
    };
    format!(
        "{source}\n{}: {}\n{} CPUs, {} MiB\n{storage}\n{network}",
        tr("Operating system"),
        m.os_version,
        m.cpus,
        m.memory_mib
    )
}
