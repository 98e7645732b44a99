//! The details editor: one group per device (overview, processors and memory, boot,
//! drives, network cards, display, input, serial) built from a `DetailsModel`, with add and
//! remove buttons for drives and network cards, validation errors shown in the row they
//! concern, a notice that edits of a running VM apply at its next start, and an atomic
//! save. CD/DVD changes and the network cable of a running VM change at once (the engine
//! swaps the first CD-ROM drive's disc; other drives' discs apply at the next start).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use adw::prelude::*;
use relm4::ComponentSender;
use vmm::config::{BootOrder, DriveKind, NicModel};
use vmm::VmConfig;

use super::details_model::{row_for_field, DetailsModel};
use super::i18n::tr;
use super::wizard_model::NIC_MODELS;
use super::{App, AppMsg};

pub struct DetailsPage {
    pub root: gtk::Box,
    page: RefCell<adw::PreferencesPage>,
    scroller_parent: gtk::Box,
    model: Rc<RefCell<Option<DetailsModel>>>,
    notice: gtk::Label,
    rows: Rc<RefCell<HashMap<&'static str, adw::ActionRow>>>,
    running: Rc<Cell<bool>>,
    sender: ComponentSender<App>,
    save: gtk::Button,
}

fn spin(min: f64, max: f64, step: f64, value: f64) -> gtk::SpinButton {
    let s = gtk::SpinButton::with_range(min, max, step);
    s.set_value(value);
    s.set_valign(gtk::Align::Center);
    s
}

fn switch(on: bool) -> gtk::Switch {
    let s = gtk::Switch::new();
    s.set_active(on);
    s.set_valign(gtk::Align::Center);
    s
}

fn row(title: &str, subtitle: &str, suffix: &impl IsA<gtk::Widget>) -> adw::ActionRow {
    let r = adw::ActionRow::builder()
        .title(title)
        .subtitle(subtitle)
        .build();
    r.add_suffix(suffix);
    r.set_activatable_widget(Some(suffix));
    r
}

impl DetailsPage {
    pub fn new(sender: &ComponentSender<App>) -> Self {
        let root = gtk::Box::new(gtk::Orientation::Vertical, 0);
        let bar = gtk::Box::new(gtk::Orientation::Horizontal, 8);
        bar.add_css_class("toolbar");
        let notice = gtk::Label::new(Some(&tr(
            "The VM is running: changes apply at its next start.",
        )));
        notice.add_css_class("dim-label");
        notice.set_hexpand(true);
        notice.set_xalign(0.0);
        notice.set_visible(false);
        let save = gtk::Button::with_label(&tr("Save"));
        save.add_css_class("suggested-action");
        let s = sender.clone();
        save.connect_clicked(move |_| s.input(AppMsg::SaveDetails));
        let spacer = gtk::Box::new(gtk::Orientation::Horizontal, 0);
        spacer.set_hexpand(true);
        let discard = gtk::Button::with_label(&tr("Discard Changes"));
        let s = sender.clone();
        discard.connect_clicked(move |_| s.input(AppMsg::DiscardDetails));
        bar.append(&notice);
        bar.append(&spacer);
        bar.append(&discard);
        bar.append(&save);
        root.append(&bar);
        let scroller_parent = gtk::Box::new(gtk::Orientation::Vertical, 0);
        scroller_parent.set_vexpand(true);
        let page = adw::PreferencesPage::new();
        scroller_parent.append(&page);
        root.append(&scroller_parent);
        Self {
            root,
            page: RefCell::new(page),
            scroller_parent,
            model: Rc::new(RefCell::new(None)),
            notice,
            rows: Rc::new(RefCell::new(HashMap::new())),
            running: Rc::new(Cell::new(false)),
            sender: sender.clone(),
            save,
        }
    }

    pub fn set_running(&self, running: bool) {
        self.running.set(running);
        self.notice.set_visible(running);
    }

    /// Shows a VM's settings (drops unsaved edits of the previous one).
    pub fn load(&self, config: VmConfig) {
        *self.model.borrow_mut() = Some(DetailsModel::new(config));
        self.rebuild();
    }

    /// Saves the edits; shows the error in its row and returns false when invalid.
    pub fn has_changes(&self) -> bool {
        self.model.borrow().as_ref().is_some_and(|m| m.is_dirty())
    }

    pub fn applies_at_next_start(&self, running: bool) -> bool {
        self.model
            .borrow()
            .as_ref()
            .is_some_and(|m| m.applies_at_next_start(running))
    }

    /// Drops the unsaved edits.
    pub fn discard(&self) {
        if let Some(m) = self.model.borrow_mut().as_mut() {
            m.revert();
        }
        self.rebuild();
    }

    pub fn save(&self, path: &Path) -> bool {
        let mut model = self.model.borrow_mut();
        let Some(m) = model.as_mut() else {
            return false;
        };
        for r in self.rows.borrow().values() {
            r.remove_css_class("error");
        }
        if let Err((field, reason)) = m.validate() {
            if let Some(r) = self.rows.borrow().get(row_for_field(field)) {
                r.set_subtitle(&reason);
                r.add_css_class("error");
            }
            return false;
        }
        match m.save(path) {
            Ok(()) => true,
            Err(e) => {
                self.sender.input(AppMsg::Error {
                    title: tr("Cannot save the settings"),
                    body: e,
                });
                false
            }
        }
    }

    /// Changes the disc in CD-ROM `index` and writes it to `vm.toml` at once (other edits
    /// stay unsaved).
    pub fn change_cd(
        &self,
        index: usize,
        disc: Option<PathBuf>,
        file: &Path,
    ) -> Result<(), String> {
        let mut model = self.model.borrow_mut();
        let m = model.as_mut().ok_or_else(|| tr("No VM is open"))?;
        m.change_cdrom(index, disc).map_err(|e| e.to_string())?;
        m.saved.save(file).map_err(|e| e.to_string())
    }

    fn rebuild(&self) {
        let old = self.page.replace(adw::PreferencesPage::new());
        self.scroller_parent.remove(&old);
        let page = self.page.borrow().clone();
        self.scroller_parent.append(&page);
        self.rows.borrow_mut().clear();
        let Some(config) = self.model.borrow().as_ref().map(|m| m.config.clone()) else {
            return;
        };
        self.save.set_sensitive(true);
        let model = self.model.clone();
        let edit = move |f: &dyn Fn(&mut DetailsModel)| {
            if let Some(m) = model.borrow_mut().as_mut() {
                f(m);
            }
        };
        let edit = Rc::new(edit);

        // Overview.
        let overview = adw::PreferencesGroup::builder()
            .title(tr("Overview"))
            .build();
        let name = adw::ActionRow::builder()
            .title(tr("Name"))
            .subtitle(&config.name)
            .build();
        overview.add(&name);
        let description = adw::EntryRow::builder()
            .title(tr("Description"))
            .text(&config.description)
            .build();
        let e = edit.clone();
        description.connect_changed(move |r| e(&|m| m.set_description(r.text().as_str())));
        overview.add(&description);
        let uuid = adw::ActionRow::builder()
            .title("UUID")
            .subtitle(if config.uuid.is_empty() {
                "—"
            } else {
                &config.uuid
            })
            .build();
        overview.add(&uuid);
        self.rows.borrow_mut().insert("overview", name);
        page.add(&overview);

        // Processors and memory.
        let hw = adw::PreferencesGroup::builder()
            .title(tr("Processors and Memory"))
            .build();
        let cpus = spin(1.0, 255.0, 1.0, f64::from(config.cpus));
        let e = edit.clone();
        cpus.connect_value_changed(move |s| e(&|m| m.set_cpus(s.value() as u32)));
        let host = super::host::resources();
        let cpu_row = row(
            &tr("CPUs"),
            &format!("{} {}", tr("This computer has"), host.cpus),
            &cpus,
        );
        hw.add(&cpu_row);
        // Topology: sockets × cores × threads, or the default (one socket).
        let topology = config.cpu_topology();
        let manual = switch(config.topology.is_some());
        let topo_spins: Vec<gtk::SpinButton> = [topology.sockets, topology.cores, topology.threads]
            .iter()
            .map(|&v| {
                let s = spin(1.0, 255.0, 1.0, f64::from(v));
                s.set_sensitive(config.topology.is_some());
                s
            })
            .collect();
        let topo_box = gtk::Box::new(gtk::Orientation::Horizontal, 6);
        for (i, (spin_button, label)) in topo_spins
            .iter()
            .zip([tr("sockets"), tr("cores"), tr("threads")])
            .enumerate()
        {
            if i > 0 {
                topo_box.append(&gtk::Label::new(Some("×")));
            }
            spin_button.set_tooltip_text(Some(&label));
            topo_box.append(spin_button);
        }
        topo_box.append(&manual);
        let topo_row = adw::ActionRow::builder()
            .title(tr("Topology"))
            .subtitle(tr("Sockets × cores × threads; off: one socket"))
            .build();
        topo_row.add_suffix(&topo_box);
        let apply_topology = {
            let e = edit.clone();
            let spins = topo_spins.clone();
            let manual = manual.clone();
            move || {
                let topology = manual.is_active().then(|| vmm::CpuTopology {
                    sockets: spins[0].value() as u32,
                    cores: spins[1].value() as u32,
                    threads: spins[2].value() as u32,
                });
                for s in &spins {
                    s.set_sensitive(topology.is_some());
                }
                e(&|m| m.set_topology(topology));
            }
        };
        for s in &topo_spins {
            let apply = apply_topology.clone();
            s.connect_value_changed(move |_| apply());
        }
        let apply = apply_topology.clone();
        manual.connect_active_notify(move |_| apply());
        hw.add(&topo_row);
        let memory = spin(16.0, 4_194_304.0, 64.0, config.memory_mib as f64);
        let e = edit.clone();
        memory.connect_value_changed(move |s| e(&|m| m.set_memory_mib(s.value() as u64)));
        let mem_row = row(
            &tr("Memory (MiB)"),
            &format!("{} {} MiB", tr("This computer has"), host.total_memory_mib),
            &memory,
        );
        hw.add(&mem_row);
        self.rows.borrow_mut().insert("cpus", cpu_row);
        self.rows.borrow_mut().insert("topology", topo_row);
        self.rows.borrow_mut().insert("memory", mem_row);
        page.add(&hw);

        // Boot.
        let boot = adw::PreferencesGroup::builder().title(tr("Boot")).build();
        let order = adw::ComboRow::builder()
            .title(tr("Boot order"))
            .model(&gtk::StringList::new(&[
                &tr("Hard disk first"),
                &tr("CD/DVD first"),
                &tr("CD/DVD once, then hard disk"),
            ]))
            .selected(match config.boot_order {
                BootOrder::Disk => 0,
                BootOrder::Cd => 1,
                BootOrder::CdOnce => 2,
            })
            .build();
        let e = edit.clone();
        order.connect_selected_notify(move |r| {
            let o = match r.selected() {
                1 => BootOrder::Cd,
                2 => BootOrder::CdOnce,
                _ => BootOrder::Disk,
            };
            e(&|m| m.set_boot_order(o))
        });
        boot.add(&order);
        let menu = switch(config.firmware.boot_menu);
        let e = edit.clone();
        menu.connect_active_notify(move |s| e(&|m| m.set_boot_menu(s.is_active())));
        boot.add(&row(
            &tr("Boot menu"),
            &tr("Press Esc at start to choose a device"),
            &menu,
        ));
        page.add(&boot);

        // Drives.
        let drives = adw::PreferencesGroup::builder().title(tr("Drives")).build();
        let add_drive = gtk::MenuButton::builder()
            .icon_name("list-add-symbolic")
            .tooltip_text(tr("Add a Drive"))
            .build();
        add_drive.add_css_class("flat");
        let pop = gtk::Box::new(gtk::Orientation::Vertical, 4);
        for (label, kind) in [
            (tr("Hard Disk"), DriveKind::Disk),
            (tr("CD/DVD Drive"), DriveKind::Cdrom),
        ] {
            let b = gtk::Button::with_label(&label);
            b.add_css_class("flat");
            let m = self.model.clone();
            let this = self.weak_rebuilder();
            b.connect_clicked(move |_| {
                let r = m.borrow_mut().as_mut().map(|m| m.add_drive(kind));
                this(r.and_then(|r| r.err()).map(|e| e.to_string()));
            });
            pop.append(&b);
        }
        add_drive.set_popover(Some(&gtk::Popover::builder().child(&pop).build()));
        drives.set_header_suffix(Some(&add_drive));
        for (i, d) in config.drives.iter().enumerate() {
            let title = match d.kind {
                DriveKind::Disk => tr("Hard Disk"),
                DriveKind::Cdrom => tr("CD/DVD Drive"),
            };
            let path = d
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| tr("Empty"));
            let r = adw::ActionRow::builder()
                .title(format!(
                    "{title} {} · {}",
                    i + 1,
                    super::details_model::drive_bus_label(i)
                ))
                .subtitle(&path)
                .build();
            let choose = gtk::Button::from_icon_name("document-open-symbolic");
            choose.set_tooltip_text(Some(&tr("Choose an Image")));
            choose.set_valign(gtk::Align::Center);
            choose.add_css_class("flat");
            let m = self.model.clone();
            let rr = r.clone();
            let kind = d.kind;
            let sender = self.sender.clone();
            choose.connect_clicked(move |b| {
                let m = m.clone();
                let rr = rr.clone();
                let sender = sender.clone();
                super::dialogs::choose_image(
                    b.root().and_downcast_ref::<gtk::Window>(),
                    move |p| {
                        rr.set_subtitle(&p.display().to_string());
                        if kind == DriveKind::Cdrom {
                            sender.input(AppMsg::ChangeCd(i, Some(p)));
                        } else if let Some(m) = m.borrow_mut().as_mut() {
                            let _ = m.set_drive_path(i, Some(p));
                        }
                    },
                );
            });
            r.add_suffix(&choose);
            if d.kind == DriveKind::Cdrom {
                let eject = gtk::Button::from_icon_name("media-eject-symbolic");
                eject.set_tooltip_text(Some(&tr("Eject")));
                eject.set_valign(gtk::Align::Center);
                eject.add_css_class("flat");
                let rr = r.clone();
                let sender = self.sender.clone();
                eject.connect_clicked(move |_| {
                    rr.set_subtitle(&tr("Empty"));
                    sender.input(AppMsg::ChangeCd(i, None));
                });
                r.add_suffix(&eject);
            } else {
                let ro = gtk::CheckButton::with_label(&tr("Read-only"));
                ro.set_active(d.read_only);
                ro.set_valign(gtk::Align::Center);
                let e = edit.clone();
                ro.connect_toggled(move |c| {
                    e(&|m| {
                        let _ = m.set_drive_read_only(i, c.is_active());
                    })
                });
                r.add_suffix(&ro);
            }
            let remove = gtk::Button::from_icon_name("user-trash-symbolic");
            remove.set_tooltip_text(Some(&tr("Remove")));
            remove.set_valign(gtk::Align::Center);
            remove.add_css_class("flat");
            let m = self.model.clone();
            let this = self.weak_rebuilder();
            remove.connect_clicked(move |_| {
                if let Some(m) = m.borrow_mut().as_mut() {
                    let _ = m.remove_drive(i);
                }
                this(None);
            });
            r.add_suffix(&remove);
            drives.add(&r);
            if i == 0 {
                self.rows.borrow_mut().insert("drives", r);
            }
        }
        page.add(&drives);

        // Network.
        let nets = adw::PreferencesGroup::builder()
            .title(tr("Network Cards"))
            .build();
        let add_nic = gtk::Button::from_icon_name("list-add-symbolic");
        add_nic.set_tooltip_text(Some(&tr("Add a Network Card")));
        add_nic.add_css_class("flat");
        let m = self.model.clone();
        let this = self.weak_rebuilder();
        add_nic.connect_clicked(move |_| {
            let r = m.borrow_mut().as_mut().map(|m| m.add_nic(NicModel::E1000));
            this(r.and_then(|r| r.err()).map(|e| e.to_string()));
        });
        nets.set_header_suffix(Some(&add_nic));
        for (i, nic) in config.nics.iter().enumerate() {
            let exp = adw::ExpanderRow::builder()
                .title(format!("{} {}", tr("Network Card"), i + 1))
                .subtitle(
                    NIC_MODELS
                        .iter()
                        .find(|(m, _)| *m == nic.model)
                        .map(|(_, l)| *l)
                        .unwrap_or(""),
                )
                .build();
            let model_row = adw::ComboRow::builder()
                .title(tr("Model"))
                .model(&gtk::StringList::new(&NIC_MODELS.map(|(_, l)| l)))
                .selected(
                    NIC_MODELS
                        .iter()
                        .position(|(m, _)| *m == nic.model)
                        .unwrap_or(0) as u32,
                )
                .build();
            let e = edit.clone();
            model_row.connect_selected_notify(move |r| {
                let model = NIC_MODELS
                    .get(r.selected() as usize)
                    .map(|m| m.0)
                    .unwrap_or_default();
                e(&|m| {
                    let _ = m.set_nic_model(i, model);
                })
            });
            exp.add_row(&model_row);
            let mac = adw::EntryRow::builder()
                .title(tr("MAC address (empty: automatic)"))
                .text(nic.mac.clone().unwrap_or_default())
                .build();
            let m = self.model.clone();
            mac.connect_changed(move |r| {
                let result = m
                    .borrow_mut()
                    .as_mut()
                    .map(|m| m.set_nic_mac(i, r.text().as_str()));
                if matches!(result, Some(Err(_))) {
                    r.add_css_class("error");
                } else {
                    r.remove_css_class("error");
                }
            });
            exp.add_row(&mac);
            let link = switch(nic.link_up);
            let e = edit.clone();
            let sender = self.sender.clone();
            let running = self.running.clone();
            link.connect_active_notify(move |s| {
                e(&|m| {
                    let _ = m.set_nic_link(i, s.is_active());
                });
                // A running VM's cable is plugged or unplugged at once.
                if running.get() {
                    sender.input(AppMsg::SetLink(i, s.is_active()));
                }
            });
            exp.add_row(&row(&tr("Cable connected"), "", &link));
            let remove = gtk::Button::with_label(&tr("Remove"));
            remove.add_css_class("destructive-action");
            remove.set_valign(gtk::Align::Center);
            let m = self.model.clone();
            let this = self.weak_rebuilder();
            remove.connect_clicked(move |_| {
                if let Some(m) = m.borrow_mut().as_mut() {
                    let _ = m.remove_nic(i);
                }
                this(None);
            });
            exp.add_action(&remove);
            nets.add(&exp);
        }
        let nic_err = adw::ActionRow::builder()
            .title(tr(
                "NAT networking: the guest reaches the network through this computer",
            ))
            .build();
        nic_err.add_css_class("dim-label");
        nets.add(&nic_err);
        self.rows.borrow_mut().insert("nics", nic_err);
        page.add(&nets);

        // Display.
        let display = adw::PreferencesGroup::builder()
            .title(tr("Display"))
            .build();
        let vram_choices = [4u32, 8, 16];
        let vram = adw::ComboRow::builder()
            .title(tr("Video memory"))
            .model(&gtk::StringList::new(&["4 MiB", "8 MiB", "16 MiB"]))
            .selected(
                vram_choices
                    .iter()
                    .position(|v| *v == config.display.vram_mib)
                    .unwrap_or(0) as u32,
            )
            .build();
        let e = edit.clone();
        vram.connect_selected_notify(move |r| {
            let v = vram_choices
                .get(r.selected() as usize)
                .copied()
                .unwrap_or(4);
            e(&|m| m.set_vram_mib(v))
        });
        display.add(&vram);
        let vnc = config.display.vnc.clone();
        let vnc_exp = adw::ExpanderRow::builder()
            .title(tr("VNC server"))
            .subtitle(tr("Reach the screen from other VNC viewers"))
            .show_enable_switch(true)
            .enable_expansion(vnc.is_some())
            .build();
        let e = edit.clone();
        vnc_exp.connect_enable_expansion_notify(move |r| {
            e(&|m| m.set_vnc_enabled(r.enables_expansion()))
        });
        let addr = adw::EntryRow::builder()
            .title(tr("Address"))
            .text(
                vnc.as_ref()
                    .map(|v| v.address.clone())
                    .unwrap_or_else(|| "127.0.0.1".into()),
            )
            .build();
        let e = edit.clone();
        addr.connect_changed(move |r| e(&|m| m.set_vnc_address(r.text().as_str())));
        vnc_exp.add_row(&addr);
        let number = spin(
            0.0,
            100.0,
            1.0,
            f64::from(vnc.as_ref().map(|v| v.display).unwrap_or(0)),
        );
        let e = edit.clone();
        number.connect_value_changed(move |s| e(&|m| m.set_vnc_display(s.value() as u16)));
        vnc_exp.add_row(&row(
            &tr("Display number"),
            &tr("Port 5900 + number"),
            &number,
        ));
        let pw = adw::PasswordEntryRow::builder()
            .title(tr("Password (empty: none)"))
            .text(
                vnc.as_ref()
                    .and_then(|v| v.password.clone())
                    .unwrap_or_default(),
            )
            .build();
        let e = edit.clone();
        pw.connect_changed(move |r| e(&|m| m.set_vnc_password(r.text().as_str())));
        vnc_exp.add_row(&pw);
        display.add(&vnc_exp);
        let display_row = adw::ActionRow::builder()
            .title(tr("Cirrus CL-GD5446"))
            .build();
        display_row.add_css_class("dim-label");
        display.add(&display_row);
        self.rows.borrow_mut().insert("display", display_row);
        page.add(&display);

        // Input.
        let input = adw::PreferencesGroup::builder().title(tr("Input")).build();
        let tablet = switch(config.input.usb_tablet);
        let e = edit.clone();
        tablet.connect_active_notify(move |s| e(&|m| m.set_usb_tablet(s.is_active())));
        input.add(&row(
            &tr("USB tablet"),
            &tr("The guest pointer follows yours without a grab"),
            &tablet,
        ));
        let kbd = switch(config.input.usb_keyboard);
        let e = edit.clone();
        kbd.connect_active_notify(move |s| e(&|m| m.set_usb_keyboard(s.is_active())));
        input.add(&row(&tr("USB keyboard"), "", &kbd));
        page.add(&input);

        // Serial.
        let serial = adw::PreferencesGroup::builder()
            .title(tr("Serial Port"))
            .build();
        let out = adw::EntryRow::builder()
            .title(tr("COM1 output: none, stdio or a file"))
            .text(config.serial.to_string())
            .build();
        let e = edit.clone();
        out.connect_changed(move |r| e(&|m| m.set_serial(r.text().as_str())));
        serial.add(&out);
        page.add(&serial);
    }

    /// A callback that rebuilds the page later (after an add or remove) and shows an
    /// error if there is one.
    fn weak_rebuilder(&self) -> impl Fn(Option<String>) + 'static {
        let sender = self.sender.clone();
        move |error: Option<String>| {
            if let Some(e) = error {
                sender.input(AppMsg::Toast(e));
            }
            sender.input(AppMsg::Toast(tr("Hardware changed: save to keep it")));
            sender.input(AppMsg::RebuildDetails);
        }
    }

    /// Rebuilds the rows from the working copy.
    pub fn refresh(&self) {
        self.rebuild();
    }
}
