//! The DeskVM desktop app (relm4 on GTK 4.8 / libadwaita 1.2): the library of VMs, the
//! create-VM wizard, and per-VM console, details and performance pages.
//!
//! One `adw::Application` (`io.github.deskvm.DeskVM`): GApplication's uniqueness makes a
//! second start activate the first. Running VMs are `Session`s polled on a timer for state,
//! events and statistics. Closing the window with VMs running asks whether to stop them or
//! keep them running in the background (the application is held, the window hidden; the
//! next start shows it again). "Shut Down" presses the VM's ACPI power button: a guest OS
//! that listens shuts down cleanly; when nothing listens (firmware, boot loader) the user is
//! offered Force Off, which pulls the plug.

pub mod console_page;
pub mod details;
pub mod details_model;
pub mod dialogs;
pub mod host;
pub mod i18n;
pub mod library_ops;
pub mod library_page;
pub mod perf_model;
pub mod perf_page;
pub mod remote;
pub mod remote_page;
pub mod session;
pub mod settings;
pub mod wizard;
pub mod wizard_model;

use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use adw::prelude::*;
use relm4::{Component, ComponentParts, ComponentSender, RelmApp};
use vmm::{Event, VmConfig, VmState};

use i18n::tr;
use session::Session;
use settings::AppSettings;

pub const APP_ID: &str = "io.github.deskvm.DeskVM";

/// When DeskVM already runs in this session, asks it to show its window and returns true.
/// (GApplication would do the same, but relm4 then waits forever for a main-loop event in
/// the second process.)
fn activate_running_instance() -> bool {
    use gtk::gio;
    let Ok(bus) = gio::bus_get_sync(gio::BusType::Session, None::<&gio::Cancellable>) else {
        return false;
    };
    let owned = bus
        .call_sync(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            Some(&(APP_ID,).to_variant()),
            Some(glib::VariantTy::new("(b)").unwrap_or(glib::VariantTy::TUPLE)),
            gio::DBusCallFlags::NONE,
            2000,
            None::<&gio::Cancellable>,
        )
        .ok()
        .and_then(|reply| reply.get::<(bool,)>())
        .is_some_and(|(owned,)| owned);
    if !owned {
        return false;
    }
    let platform_data = glib::VariantDict::new(None).end();
    let object_path = format!("/{}", APP_ID.replace('.', "/"));
    bus.call_sync(
        Some(APP_ID),
        &object_path,
        "org.freedesktop.Application",
        "Activate",
        Some(&glib::Variant::tuple_from_iter([platform_data])),
        None,
        gio::DBusCallFlags::NONE,
        5000,
        None::<&gio::Cancellable>,
    )
    .is_ok()
}

/// Starts the app and returns when it quits (at once when another DeskVM runs: that one
/// shows its window instead).
pub fn run() {
    i18n::init();
    if activate_running_instance() {
        return;
    }
    let app = adw::Application::builder().application_id(APP_ID).build();
    let relm = RelmApp::from_app(app).with_args(vec![std::env::args()
        .next()
        .unwrap_or_else(|| "deskvm".into())]);
    relm.run::<App>(());
}

/// The page the window shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmTab {
    Console,
    Details,
    Performance,
}

#[derive(Debug)]
pub enum AppMsg {
    Refresh,
    Tick,
    Run(String),
    PauseResume(String),
    PowerButton(String),
    ForceOff(String),
    ForceOffConfirmed(String),
    Reset(String),
    Clone(String),
    Delete(String),
    DeleteConfirmed {
        name: String,
        disks: bool,
    },
    Open(String),
    OpenTab(String, VmTab),
    Back,
    NewVm,
    /// Ask for a VNC server and show its screen in a console window.
    ConnectRemote,
    Created {
        name: String,
        customize: bool,
    },
    /// A VM started on a worker thread finished starting (or failed to).
    Started {
        name: String,
        outcome: Result<Session, vmm::VmmError>,
    },
    SaveDetails,
    /// Change (Some) or eject (None) the disc of CD-ROM drive n of the open VM.
    ChangeCd(usize, Option<PathBuf>),
    /// The same for the open VM's first CD-ROM drive.
    ChangeFirstCd(Option<PathBuf>),
    /// Change the disc even if the guest locked the tray.
    ForceChangeCd(usize, Option<PathBuf>),
    /// Plug (true) or unplug network card n of the open, running VM.
    SetLink(usize, bool),
    RebuildDetails,
    DiscardDetails,
    CloseRequested,
    StopAllAndQuit,
    KeepRunning,
    Quit,
    Preferences,
    About,
    Shortcuts,
    ToggleFullscreen,
    Toast(String),
    Error {
        title: String,
        body: String,
    },
}

struct Header {
    bar: adw::HeaderBar,
    back: gtk::Button,
    create: gtk::Button,
    title: adw::WindowTitle,
    switcher: adw::ViewSwitcher,
}

pub struct App {
    window: adw::ApplicationWindow,
    settings: Rc<AppSettings>,
    library_dir: PathBuf,
    entries: Vec<(String, Result<VmConfig, String>)>,
    sessions: HashMap<String, Session>,
    /// VMs being built and started on a worker thread.
    starting: std::collections::HashSet<String>,
    library: library_page::LibraryPage,
    stack: gtk::Stack,
    view_stack: adw::ViewStack,
    console: console_page::ConsolePage,
    details: details::DetailsPage,
    perf: perf_page::PerfPage,
    header: Header,
    toasts: adw::ToastOverlay,
    current: Option<String>,
    background_hold: Option<gtk::gio::ApplicationHoldGuard>,
}

fn add_actions(app: &adw::Application, sender: &ComponentSender<App>) {
    let simple = |name: &str, accels: &[&str], msg: fn() -> AppMsg| {
        let action = gtk::gio::SimpleAction::new(name, None);
        let s = sender.clone();
        action.connect_activate(move |_, _| s.input(msg()));
        app.add_action(&action);
        if !accels.is_empty() {
            app.set_accels_for_action(&format!("app.{name}"), accels);
        }
    };
    simple("new-vm", &["<Control>n"], || AppMsg::NewVm);
    simple("connect-remote", &[], || AppMsg::ConnectRemote);
    simple("quit", &["<Control>q"], || AppMsg::Quit);
    simple("preferences", &["<Control>comma"], || AppMsg::Preferences);
    simple("shortcuts", &["<Control>question"], || AppMsg::Shortcuts);
    simple("about", &[], || AppMsg::About);
    simple("fullscreen", &["F11"], || AppMsg::ToggleFullscreen);
    simple("back", &["<Alt>Left"], || AppMsg::Back);
    simple("refresh", &["F5"], || AppMsg::Refresh);
    let with_name = |name: &str, msg: fn(String) -> AppMsg| {
        let action = gtk::gio::SimpleAction::new(name, Some(glib::VariantTy::STRING));
        let s = sender.clone();
        action.connect_activate(move |_, target| {
            if let Some(vm) = target.and_then(|t| t.get::<String>()) {
                s.input(msg(vm));
            }
        });
        app.add_action(&action);
    };
    with_name("force-off", AppMsg::ForceOff);
    with_name("open-details", |n| AppMsg::OpenTab(n, VmTab::Details));
    with_name("open-performance", |n| {
        AppMsg::OpenTab(n, VmTab::Performance)
    });
    with_name("reset", AppMsg::Reset);
    with_name("clone", AppMsg::Clone);
    with_name("delete", AppMsg::Delete);
    with_name("run", AppMsg::Run);
    with_name("pause-resume", AppMsg::PauseResume);
    with_name("power-button", AppMsg::PowerButton);
}

use gtk::glib;

fn main_menu() -> gtk::gio::Menu {
    let menu = gtk::gio::Menu::new();
    let remote = gtk::gio::Menu::new();
    remote.append(
        Some(&tr("Connect to Remote VM…")),
        Some("app.connect-remote"),
    );
    menu.append_section(None, &remote);
    let section = gtk::gio::Menu::new();
    section.append(Some(&tr("Preferences")), Some("app.preferences"));
    section.append(Some(&tr("Keyboard Shortcuts")), Some("app.shortcuts"));
    section.append(Some(&tr("About DeskVM")), Some("app.about"));
    menu.append_section(None, &section);
    let quit = gtk::gio::Menu::new();
    quit.append(Some(&tr("Quit")), Some("app.quit"));
    menu.append_section(None, &quit);
    menu
}

const CSS: &str = "
consoleview { background: black; }
.console-grab-hint { padding: 6px 12px; border-radius: 6px; }
.field-error { color: @error_color; }
";

impl Component for App {
    type CommandOutput = ();
    type Input = AppMsg;
    type Output = ();
    type Init = ();
    type Root = adw::ApplicationWindow;
    type Widgets = ();

    fn init_root() -> Self::Root {
        adw::ApplicationWindow::builder()
            .title("DeskVM")
            .default_width(1024)
            .default_height(720)
            .build()
    }

    fn init(_: (), window: Self::Root, sender: ComponentSender<Self>) -> ComponentParts<Self> {
        let settings = Rc::new(AppSettings::load());
        relm4::set_global_css(CSS);
        let icons = concat!(env!("CARGO_MANIFEST_DIR"), "/icons");
        if let Some(display) = gtk::gdk::Display::default() {
            gtk::IconTheme::for_display(&display).add_search_path(icons);
        }
        window.set_icon_name(Some(APP_ID));
        let app = relm4::main_adw_application();
        add_actions(&app, &sender);

        let back = gtk::Button::from_icon_name("go-previous-symbolic");
        back.set_tooltip_text(Some(&tr("Back")));
        back.set_action_name(Some("app.back"));
        let create = gtk::Button::from_icon_name("list-add-symbolic");
        create.set_tooltip_text(Some(&tr("Create a Virtual Machine")));
        create.set_action_name(Some("app.new-vm"));
        let menu_button = gtk::MenuButton::builder()
            .icon_name("open-menu-symbolic")
            .menu_model(&main_menu())
            .tooltip_text(tr("Main Menu"))
            .primary(true)
            .build();
        let title = adw::WindowTitle::new("DeskVM", "");
        let switcher = adw::ViewSwitcher::new();
        switcher.set_policy(adw::ViewSwitcherPolicy::Wide);
        let bar = adw::HeaderBar::new();
        bar.pack_start(&back);
        bar.pack_start(&create);
        bar.pack_end(&menu_button);
        bar.set_title_widget(Some(&title));

        let history = settings.uint("history-length") as usize;
        let library = library_page::LibraryPage::new(&sender, history);
        let console = console_page::ConsolePage::new(&sender, &settings);
        let details = details::DetailsPage::new(&sender);
        let perf = perf_page::PerfPage::new(history);

        let view_stack = adw::ViewStack::new();
        view_stack
            .add_titled(&console.root, Some("console"), &tr("Console"))
            .set_icon_name(Some("video-display-symbolic"));
        view_stack
            .add_titled(&details.root, Some("details"), &tr("Details"))
            .set_icon_name(Some("document-properties-symbolic"));
        view_stack
            .add_titled(&perf.root, Some("performance"), &tr("Performance"))
            .set_icon_name(Some("utilities-system-monitor-symbolic"));
        switcher.set_stack(Some(&view_stack));

        let stack = gtk::Stack::new();
        stack.set_transition_type(gtk::StackTransitionType::SlideLeftRight);
        stack.add_named(&library.root, Some("library"));
        stack.add_named(&view_stack, Some("vm"));

        let toasts = adw::ToastOverlay::new();
        toasts.set_child(Some(&stack));
        let content = gtk::Box::new(gtk::Orientation::Vertical, 0);
        content.append(&bar);
        content.append(&toasts);
        window.set_content(Some(&content));

        let s = sender.clone();
        window.connect_close_request(move |_| {
            s.input(AppMsg::CloseRequested);
            glib::Propagation::Stop
        });

        let interval = settings.uint("graph-interval-ms").clamp(250, 10_000);
        let s = sender.clone();
        glib::timeout_add_local(Duration::from_millis(u64::from(interval)), move || {
            s.input(AppMsg::Tick);
            glib::ControlFlow::Continue
        });

        let library_dir = settings
            .library_dir()
            .unwrap_or_else(|_| PathBuf::from("deskvm-vms"));
        let mut model = App {
            window: window.clone(),
            settings,
            library_dir,
            entries: Vec::new(),
            sessions: HashMap::new(),
            starting: Default::default(),
            library,
            stack,
            view_stack,
            console,
            details,
            perf,
            header: Header {
                bar,
                back,
                create,
                title,
                switcher,
            },
            toasts,
            current: None,
            background_hold: None,
        };
        model.reload(&sender);
        model.show_library();
        ComponentParts { model, widgets: () }
    }

    fn update(&mut self, msg: AppMsg, sender: ComponentSender<Self>, _root: &Self::Root) {
        match msg {
            AppMsg::Refresh => self.reload(&sender),
            AppMsg::Tick => self.tick(),
            AppMsg::Run(name) => self.run_vm(&name, &sender),
            AppMsg::Started { name, outcome } => self.started(name, outcome),
            AppMsg::PauseResume(name) => {
                if let Some(s) = self.sessions.get(&name) {
                    let r = if s.state() == VmState::Paused {
                        s.handle.resume()
                    } else {
                        s.handle.pause()
                    };
                    self.report(r, &tr("Cannot pause or resume the VM"));
                }
                self.tick();
            }
            AppMsg::PowerButton(name) => {
                if let Some(s) = self.sessions.get(&name) {
                    match s.handle.press_power_button() {
                        Ok(vmm::PowerButton::Delivered) => self.shutdown_toast(&name),
                        Ok(vmm::PowerButton::NotListening) => {
                            dialogs::offer_force_off(&self.window, &name, &sender)
                        }
                        Err(e) => self.error(&tr("Cannot shut down the VM"), &e.to_string()),
                    }
                }
                self.tick();
            }
            AppMsg::ForceOff(name) => {
                if self.settings.boolean("confirm-force-off") && self.sessions.contains_key(&name) {
                    dialogs::confirm_force_off(&self.window, &name, &sender);
                } else {
                    sender.input(AppMsg::ForceOffConfirmed(name));
                }
            }
            AppMsg::ForceOffConfirmed(name) => {
                if let Some(s) = self.sessions.get(&name) {
                    let r = s.handle.power_off();
                    self.report(r, &tr("Cannot power off the VM"));
                }
                self.tick();
            }
            AppMsg::Reset(name) => {
                if let Some(s) = self.sessions.get(&name) {
                    let r = s.handle.reset();
                    self.report(r, &tr("Cannot reset the VM"));
                }
            }
            AppMsg::Clone(name) => match library_ops::clone_vm(&self.library_dir, &name) {
                Ok(new) => {
                    self.toast(&format!("{} “{new}”", tr("Created")));
                    self.reload(&sender);
                }
                Err(e) => self.error(&tr("Cannot clone the VM"), &e.to_string()),
            },
            AppMsg::Delete(name) => {
                if self.sessions.contains_key(&name) {
                    self.error(
                        &tr("The VM is running"),
                        &tr("Shut the VM down before deleting it."),
                    );
                } else {
                    dialogs::confirm_delete(&self.window, &name, &sender);
                }
            }
            AppMsg::DeleteConfirmed { name, disks } => {
                match library_ops::delete_vm(&self.library_dir, &name, disks) {
                    Ok(_) => {
                        if self.current.as_deref() == Some(name.as_str()) {
                            self.show_library();
                        }
                        self.toast(&format!("{} “{name}”", tr("Deleted")));
                    }
                    Err(e) => self.error(&tr("Cannot delete the VM"), &e.to_string()),
                }
                self.reload(&sender);
            }
            AppMsg::Open(name) => self.open_vm(&name, None),
            AppMsg::OpenTab(name, tab) => self.open_vm(&name, Some(tab)),
            AppMsg::Back => {
                if self.window.is_fullscreen() {
                    self.window.unfullscreen();
                }
                self.show_library();
            }
            AppMsg::NewVm => {
                let taken: Vec<String> = self.entries.iter().map(|e| e.0.clone()).collect();
                wizard::open(&self.window, self.library_dir.clone(), taken, &sender);
            }
            AppMsg::ConnectRemote => remote_page::ask_and_connect(&self.window),
            AppMsg::Created { name, customize } => {
                self.reload(&sender);
                if customize {
                    self.open_vm(&name, Some(VmTab::Details));
                } else {
                    self.run_vm(&name, &sender);
                    self.open_vm(&name, Some(VmTab::Console));
                }
            }
            AppMsg::SaveDetails => {
                let running = self
                    .current
                    .as_ref()
                    .is_some_and(|n| self.sessions.contains_key(n));
                if let Some(name) = self.current.clone() {
                    let path = self.library_dir.join(&name).join("vm.toml");
                    let later = self.details.applies_at_next_start(running);
                    if !self.details.has_changes() {
                        self.toast(&tr("Nothing to save"));
                    } else if self.details.save(&path) {
                        self.toast(&if later {
                            tr("Saved: the changes apply at the next start")
                        } else {
                            tr("Saved")
                        });
                        self.reload(&sender);
                    }
                }
            }
            AppMsg::RebuildDetails => self.details.refresh(),
            AppMsg::DiscardDetails => self.details.discard(),
            AppMsg::ChangeFirstCd(disc) => {
                let index = self
                    .current
                    .as_deref()
                    .and_then(|n| self.config_of(n))
                    .and_then(|c| {
                        c.drives
                            .iter()
                            .position(|d| d.kind == vmm::config::DriveKind::Cdrom)
                    });
                match index {
                    Some(i) => sender.input(AppMsg::ChangeCd(i, disc)),
                    None => self.error(
                        &tr("The VM has no CD/DVD drive"),
                        &tr("Add one in Details, under Drives."),
                    ),
                }
            }
            AppMsg::ChangeCd(index, disc) => self.change_cd(index, disc, false, &sender),
            AppMsg::ForceChangeCd(index, disc) => self.change_cd(index, disc, true, &sender),
            AppMsg::SetLink(index, up) => {
                if let Some(s) = self.current.as_ref().and_then(|n| self.sessions.get(n)) {
                    let r = s.handle.set_nic_link(index, up);
                    self.report(r, &tr("Cannot change the cable"));
                }
            }
            AppMsg::CloseRequested => {
                let running = self.running_names();
                if running.is_empty() {
                    self.quit();
                } else if self.settings.boolean("confirm-quit-running") {
                    dialogs::confirm_close(&self.window, &running, &sender);
                } else {
                    sender.input(AppMsg::KeepRunning);
                }
            }
            AppMsg::StopAllAndQuit => self.quit(),
            AppMsg::KeepRunning => {
                if self.background_hold.is_none() {
                    self.background_hold = Some(relm4::main_adw_application().hold());
                }
                self.window.set_visible(false);
            }
            AppMsg::Quit => sender.input(AppMsg::CloseRequested),
            AppMsg::Preferences => dialogs::preferences(&self.window, &self.settings),
            AppMsg::About => dialogs::about(&self.window),
            AppMsg::Shortcuts => dialogs::shortcuts(&self.window),
            AppMsg::ToggleFullscreen => {
                if self.window.is_fullscreen() {
                    self.window.unfullscreen();
                    self.header.bar.set_visible(true);
                } else if self.current.is_some() {
                    self.view_stack.set_visible_child_name("console");
                    self.window.fullscreen();
                    self.header.bar.set_visible(false);
                }
            }
            AppMsg::Toast(text) => self.toast(&text),
            AppMsg::Error { title, body } => self.error(&title, &body),
        }
    }
}

impl App {
    fn reload(&mut self, sender: &ComponentSender<Self>) {
        self.entries = match crate::library::list_vms(&self.library_dir) {
            Ok(list) => list
                .into_iter()
                .map(|(n, c)| (n, c.map_err(|e| e.to_string())))
                .collect(),
            Err(e) => {
                self.error(&tr("Cannot read the library"), &e.to_string());
                Vec::new()
            }
        };
        self.library.set_entries(&self.entries, sender);
        for (name, s) in &self.sessions {
            self.library.update_vm(name, &s.state(), None);
        }
    }

    fn running_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| matches!(s.state(), VmState::Running | VmState::Paused))
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
    }

    fn config_of(&self, name: &str) -> Option<VmConfig> {
        self.entries
            .iter()
            .find(|e| e.0 == name)
            .and_then(|e| e.1.as_ref().ok().cloned())
    }

    fn run_vm(&mut self, name: &str, sender: &ComponentSender<Self>) {
        if self.starting.contains(name)
            || self
                .sessions
                .get(name)
                .is_some_and(|s| matches!(s.state(), VmState::Running | VmState::Paused))
        {
            return;
        }
        self.sessions.remove(name);
        let config = match crate::library::load_vm(&self.library_dir, name) {
            Ok(c) => c,
            Err(e) => return self.error(&tr("Cannot start the VM"), &e.to_string()),
        };
        let s = sender.clone();
        let vm = name.to_string();
        let spawned = Session::start_in_background(config, move |outcome| {
            s.input(AppMsg::Started { name: vm, outcome });
        });
        match spawned {
            Ok(()) => {
                self.starting.insert(name.to_string());
            }
            Err(e) => self.error(&tr("Cannot start the VM"), &e.to_string()),
        }
    }

    fn started(&mut self, name: String, outcome: Result<Session, vmm::VmmError>) {
        self.starting.remove(&name);
        match outcome {
            Ok(s) => {
                self.sessions.insert(name.clone(), s);
                self.library.update_vm(&name, &VmState::Running, None);
                if self.current.as_deref() == Some(name.as_str()) {
                    self.attach_current();
                }
            }
            Err(e) => self.error(&tr("Cannot start the VM"), &e.to_string()),
        }
    }

    fn tick(&mut self) {
        let mut ended = Vec::new();
        let host = host::cpu_times();
        for (name, s) in &mut self.sessions {
            let poll = s.poll();
            let cpu = poll.sample.as_ref().map(|p| p.cpu_mean);
            self.library.update_vm(name, &poll.state, cpu);
            for e in &poll.events {
                if let Event::Error(m) = e {
                    self.toasts
                        .add_toast(adw::Toast::new(&format!("{name}: {m}")));
                }
            }
            if self.current.as_deref() == Some(name.as_str()) {
                self.console.show_state(&poll.state);
                self.perf.add(poll.sample.as_ref(), &poll.stats, host);
                self.details
                    .set_running(matches!(poll.state, VmState::Running | VmState::Paused));
            }
            if let Some(texture) = console_page::thumbnail(&s.handle, &mut s.thumbnail_generation) {
                self.library.set_thumbnail(name, Some(&texture));
            }
            if matches!(poll.state, VmState::Stopped | VmState::Failed(_)) {
                ended.push((name.clone(), poll.state));
            }
        }
        for (name, state) in ended {
            self.sessions.remove(&name);
            self.library.update_vm(&name, &state, None);
            if let VmState::Failed(m) = &state {
                self.error(&format!("{} “{name}”", tr("The VM failed")), m);
            }
            if self.current.as_deref() == Some(name.as_str()) {
                self.console.detach();
                self.console.show_state(&state);
                self.details.set_running(false);
            }
        }
        if self.current.is_some()
            && !self
                .current
                .as_ref()
                .is_some_and(|n| self.sessions.contains_key(n))
        {
            self.perf.add(None, &vmm::VmStats::default(), host);
        }
        if self.background_hold.is_some() && self.sessions.is_empty() && !self.window.is_visible() {
            // Everything stopped while in the background: let the app end.
            self.background_hold = None;
            relm4::main_adw_application().quit();
        }
    }

    fn open_vm(&mut self, name: &str, tab: Option<VmTab>) {
        let Some(config) = self.config_of(name) else {
            return;
        };
        self.current = Some(name.to_string());
        self.details.load(config);
        self.perf.clear();
        self.attach_current();
        self.stack.set_visible_child_name("vm");
        self.header.back.set_visible(true);
        self.header.create.set_visible(false);
        self.header.title.set_title(name);
        self.header
            .bar
            .set_title_widget(Some(&self.header.switcher));
        self.window.set_title(Some(&format!("{name} — DeskVM")));
        if let Some(tab) = tab {
            self.view_stack.set_visible_child_name(match tab {
                VmTab::Console => "console",
                VmTab::Details => "details",
                VmTab::Performance => "performance",
            });
        }
    }

    fn attach_current(&mut self) {
        let Some(name) = self.current.clone() else {
            return;
        };
        match self.sessions.get(&name) {
            Some(s) => {
                self.console.attach(&name, s.handle.clone());
                self.console.show_state(&s.state());
                self.details.set_running(true);
            }
            None => {
                self.console.detach();
                self.console.set_vm_name(&name);
                self.console.show_state(&VmState::Stopped);
                self.details.set_running(false);
            }
        }
    }

    fn show_library(&mut self) {
        self.current = None;
        self.console.detach();
        self.stack.set_visible_child_name("library");
        self.header.back.set_visible(false);
        self.header.create.set_visible(true);
        self.header.bar.set_visible(true);
        self.header.bar.set_title_widget(Some(&self.header.title));
        self.header.title.set_title("DeskVM");
        self.window.set_title(Some("DeskVM"));
    }

    fn quit(&mut self) {
        // Dropping a session powers its VM off (NVRAM saved).
        self.sessions.clear();
        self.background_hold = None;
        relm4::main_adw_application().quit();
    }

    /// Changes the disc of CD-ROM `index`: live in a running VM (the engine swaps the first
    /// CD-ROM drive's disc), and in `vm.toml` for the next start.
    fn change_cd(
        &mut self,
        index: usize,
        disc: Option<PathBuf>,
        force: bool,
        sender: &ComponentSender<Self>,
    ) {
        let Some(name) = self.current.clone() else {
            return;
        };
        let first_cdrom = self.config_of(&name).and_then(|c| {
            c.drives
                .iter()
                .position(|d| d.kind == vmm::config::DriveKind::Cdrom)
        });
        let mut live = false;
        if let Some(s) = self.sessions.get(&name) {
            if first_cdrom == Some(index) {
                if let Err(e) = s.handle.change_cdrom(disc.as_deref(), force) {
                    if !force {
                        dialogs::confirm_force_cd(
                            &self.window,
                            index,
                            disc,
                            &e.to_string(),
                            sender,
                        );
                    } else {
                        self.error(&tr("Cannot change the disc"), &e.to_string());
                    }
                    return;
                }
                live = true;
            }
        }
        let file = self.library_dir.join(&name).join("vm.toml");
        match self.details.change_cd(index, disc, &file) {
            Ok(()) if live => self.toast(&tr("Disc changed")),
            Ok(()) if self.sessions.contains_key(&name) => {
                self.toast(&tr("Disc saved: the VM sees it from its next start"))
            }
            Ok(()) => self.toast(&tr("Disc saved")),
            Err(e) => self.error(&tr("Cannot change the disc"), &e),
        }
    }

    fn toast(&self, text: &str) {
        self.toasts.add_toast(adw::Toast::new(text));
    }

    /// "Shutting down “name”…" with a Force Off button for a guest that takes too long.
    fn shutdown_toast(&self, name: &str) {
        let toast = adw::Toast::new(&format!("{} “{name}”…", tr("Shutting down")));
        toast.set_button_label(Some(&tr("Force Off")));
        toast.set_action_name(Some("app.force-off"));
        toast.set_action_target_value(Some(&name.to_variant()));
        toast.set_timeout(10);
        self.toasts.add_toast(toast);
    }

    fn error(&self, title: &str, body: &str) {
        dialogs::message(&self.window, title, body);
    }

    fn report(&self, r: Result<(), vmm::VmmError>, title: &str) {
        if let Err(e) = r {
            self.error(title, &e.to_string());
        }
    }
}
