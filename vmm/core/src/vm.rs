//! The facade the app, the CLI and the tests use: `VmHandle`, its events and statistics,
//! and `InputHandle`.
//!
//! One engine thread per VM owns the machine: it serves commands, runs device timers and
//! turns guest requests (reset, power off) and vCPU failures into state changes. A failing
//! vCPU or device puts the VM into `VmState::Failed`; it never aborts the process.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm_devices::i8042::I8042;
use vmm_devices::ide::PiixIde;
use vmm_devices::usb_hid::HidInput;
use vmm_devices::{SystemControl, Timed};
use vmm_sys_util::signal::Killable;

use crate::config::VmConfig;
use crate::display::{DisplayHandle, DisplayShared, REFRESH_INTERVAL};
use crate::error::{Result, VmmError};
use crate::machine::{lock, EngineOptions, InterruptCounts, Machine};
use crate::memory::GuestRam;
use crate::vcpu::{
    install_kick_handler, kick_signal, ExitCounters, ExitStats, RunControl, VcpuCommand,
    VcpuObserver, VcpuRunner,
};

/// Where a VM is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum VmState {
    /// Built, not started (or stopped and ready to start again).
    Stopped,
    Running,
    Paused,
    /// Stopped by an error; the message says what happened.
    Failed(String),
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmState::Stopped => f.write_str("stopped"),
            VmState::Running => f.write_str("running"),
            VmState::Paused => f.write_str("paused"),
            VmState::Failed(m) => write!(f, "failed: {m}"),
        }
    }
}

/// What the engine tells its subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    StateChanged(VmState),
    /// The guest screen changed size.
    DisplayResized {
        width: u32,
        height: u32,
    },
    /// The guest reset the machine (or triple-faulted).
    GuestReset,
    Error(String),
}

/// CPU time and exits of one vCPU, cumulative since the VM started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VcpuStats {
    pub cpu_time_ns: u64,
    pub exits: ExitStats,
}

/// I/O of one drive, cumulative.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DiskStats {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    pub flushes: u64,
}

/// Traffic of one network card, cumulative.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NicStats {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    pub link_up: bool,
}

/// Cumulative counters; the UI computes rates from two snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VmStats {
    /// Time since the VM was last started, in nanoseconds.
    pub uptime_ns: u64,
    pub vcpus: Vec<VcpuStats>,
    /// Interrupt edges raised per GSI (ISA IRQs 0..16, PCI above).
    pub interrupts: Vec<u64>,
    pub resets: u64,
    /// Guest RAM size and how much of it the host has actually backed with memory.
    pub memory_bytes: u64,
    pub memory_resident_bytes: u64,
    /// Frames the display pipeline composed (refreshes that changed pixels).
    pub display_frames: u64,
    pub disks: Vec<DiskStats>,
    pub nics: Vec<NicStats>,
}

impl VmStats {
    pub fn total_exits(&self) -> u64 {
        self.vcpus.iter().map(|v| v.exits.total()).sum()
    }
}

enum Message {
    Start(Sender<Result<()>>),
    Pause(Sender<Result<()>>),
    Resume(Sender<Result<()>>),
    Reset(Sender<Result<()>>),
    PowerOff(Sender<Result<()>>),
    ChangeCdrom(Option<std::path::PathBuf>, bool, Sender<Result<()>>),
    SetUsbDevice(UsbDevice, bool, Sender<Result<()>>),
    GuestReset,
    GuestPowerOff,
    VcpuFailed(usize, String),
    TimersChanged,
    Shutdown,
}

struct Shared {
    state: Mutex<VmState>,
    subscribers: Mutex<Vec<Sender<Event>>>,
    devices: Mutex<Option<LiveDevices>>,
    counters: Mutex<Vec<Arc<ExitCounters>>>,
    vcpu_tids: Mutex<Vec<Arc<Mutex<Option<i32>>>>>,
    interrupts: Mutex<Arc<InterruptCounts>>,
    started_at: Mutex<Option<Instant>>,
    resets: Mutex<u64>,
    display: Arc<DisplayShared>,
    ram: Mutex<Option<GuestRam>>,
    memory_bytes: u64,
}

impl Shared {
    fn emit(&self, event: Event) {
        lock(&self.subscribers).retain(|s| s.send(event.clone()).is_ok());
    }

    fn set_state(&self, state: VmState) {
        let changed = {
            let mut s = lock(&self.state);
            let changed = *s != state;
            *s = state.clone();
            changed
        };
        if changed {
            self.emit(Event::StateChanged(state));
        }
    }
}

/// The devices the facade talks to directly while a machine exists.
#[derive(Clone)]
struct LiveDevices {
    i8042: Arc<Mutex<I8042>>,
    tablet: Option<HidInput>,
    usb_keyboard: Option<HidInput>,
    ide: Arc<Mutex<PiixIde>>,
    serial: Arc<Mutex<vmm_devices::serial::Serial>>,
    nics: Vec<Arc<Mutex<dyn vmm_devices::net::NetworkCard>>>,
    pm: Arc<Mutex<vmm_devices::piix4_pm::Piix4Pm>>,
}

impl LiveDevices {
    fn of(machine: &Machine) -> Self {
        Self {
            i8042: machine.i8042.clone(),
            tablet: machine.tablet.clone(),
            usb_keyboard: machine.usb_keyboard.clone(),
            ide: machine.ide.clone(),
            serial: machine.serial.clone(),
            nics: machine.nics.iter().map(|n| n.card.clone()).collect(),
            pm: machine.pm.clone(),
        }
    }
}

/// Devices' requests, delivered to the engine thread.
struct EngineSignals {
    tx: Mutex<Sender<Message>>,
}

impl EngineSignals {
    fn send(&self, m: Message) {
        let _ = lock(&self.tx).send(m);
    }
}

impl SystemControl for EngineSignals {
    fn request_reset(&self) {
        self.send(Message::GuestReset);
    }
    fn request_poweroff(&self) {
        self.send(Message::GuestPowerOff);
    }
}

impl VcpuObserver for EngineSignals {
    fn reset_requested(&self) {
        self.send(Message::GuestReset);
    }
    fn poweroff_requested(&self) {
        self.send(Message::GuestPowerOff);
    }
    fn vcpu_failed(&self, index: usize, message: String) {
        self.send(Message::VcpuFailed(index, message));
    }
}

/// A handle on one VM. Dropping it powers the VM off.
pub struct VmHandle {
    shared: Arc<Shared>,
    tx: Sender<Message>,
    engine: Option<JoinHandle<()>>,
    vnc: Option<crate::vnc::VncServer>,
}

/// Keyboard and pointer input for a VM. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct InputHandle {
    shared: Arc<Shared>,
}

/// What became of a press of the ACPI power button.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerButton {
    /// The guest listens for the button (its OS enabled ACPI's power button event).
    Delivered,
    /// Nothing in the guest listens now (firmware, a boot loader, no ACPI support).
    NotListening,
}

/// The USB input devices a VM can have plugged into its UHCI controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsbDevice {
    /// The absolute-pointer tablet (no pointer grab needed).
    Tablet,
    /// A boot-protocol keyboard; keys go to it instead of PS/2.
    Keyboard,
}

/// Where an input event went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputRoute {
    Ps2Keyboard,
    Ps2Mouse,
    UsbKeyboard,
    UsbTablet,
    /// The VM is not running or has no device for this kind of event.
    Dropped,
}

impl InputHandle {
    fn devices(&self) -> Option<LiveDevices> {
        lock(&self.shared.devices).clone()
    }

    /// A key, by Linux evdev code (KEY_ESC = 1, KEY_A = 30, ...), pressed or released. Goes
    /// to the USB keyboard when the VM has one, else to the PS/2 keyboard.
    pub fn key(&self, evdev_code: u16, down: bool) -> InputRoute {
        match self.devices() {
            Some(LiveDevices {
                usb_keyboard: Some(kbd),
                ..
            }) => {
                kbd.key(evdev_code, down);
                InputRoute::UsbKeyboard
            }
            Some(dev) => {
                lock(&dev.i8042).key_event(evdev_code, down);
                InputRoute::Ps2Keyboard
            }
            None => InputRoute::Dropped,
        }
    }

    /// Bytes typed into the first serial port (COM1), as from a terminal. Returns how many
    /// fit into the receive FIFO (the rest is dropped, as a UART without flow control does).
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        match self.devices() {
            Some(dev) => lock(&dev.serial).enqueue_input(bytes),
            None => 0,
        }
    }

    /// Presses and releases a key.
    pub fn tap(&self, evdev_code: u16) -> InputRoute {
        self.key(evdev_code, true);
        self.key(evdev_code, false)
    }

    /// Relative pointer motion (dy positive = down) with wheel and buttons (bit 0 left,
    /// 1 right, 2 middle, 3 side, 4 extra), to the PS/2 mouse.
    pub fn pointer_relative(&self, dx: i32, dy: i32, wheel: i32, buttons: u8) -> InputRoute {
        match self.devices() {
            Some(dev) => {
                lock(&dev.i8042).mouse_motion(dx, dy, wheel, buttons);
                InputRoute::Ps2Mouse
            }
            None => InputRoute::Dropped,
        }
    }

    /// Whether absolute pointer events reach the guest (the VM has a USB tablet): then
    /// a console needs no pointer grab.
    pub fn has_absolute_pointer(&self) -> bool {
        self.devices().is_some_and(|d| d.tablet.is_some())
    }

    /// Absolute pointer position in 0..=0x7fff on both axes, buttons as for
    /// `pointer_relative` and a wheel step. Needs the USB tablet; the PS/2 mouse cannot
    /// take absolute positions.
    pub fn pointer_absolute(&self, x: u16, y: u16, buttons: u8) -> InputRoute {
        self.pointer_absolute_wheel(x, y, buttons, 0)
    }

    /// `pointer_absolute` with a wheel step (positive = away from the user).
    pub fn pointer_absolute_wheel(&self, x: u16, y: u16, buttons: u8, wheel: i8) -> InputRoute {
        match self.devices().and_then(|d| d.tablet) {
            Some(tablet) => {
                tablet.pointer_absolute(x.min(0x7fff), y.min(0x7fff), buttons, wheel);
                InputRoute::UsbTablet
            }
            None => InputRoute::Dropped,
        }
    }
}

impl VmHandle {
    /// Builds the VM (checking KVM, host resources, firmware and outputs); it is not
    /// started.
    pub fn create(config: VmConfig) -> Result<VmHandle> {
        Self::create_with(config, EngineOptions::default())
    }

    pub fn create_with(config: VmConfig, options: EngineOptions) -> Result<VmHandle> {
        install_kick_handler()?;
        let (tx, rx) = mpsc::channel();
        let signals = Arc::new(EngineSignals {
            tx: Mutex::new(tx.clone()),
        });
        let shared = Arc::new(Shared {
            state: Mutex::new(VmState::Stopped),
            subscribers: Mutex::new(Vec::new()),
            devices: Mutex::new(None),
            counters: Mutex::new(Vec::new()),
            vcpu_tids: Mutex::new(Vec::new()),
            interrupts: Mutex::new(Arc::new(Vec::new())),
            started_at: Mutex::new(None),
            resets: Mutex::new(0),
            display: DisplayShared::new(),
            ram: Mutex::new(None),
            memory_bytes: config.memory_mib << 20,
        });
        // Build once now so that configuration and host problems surface here.
        let machine = build_machine(&config, &options, &signals)?;
        *lock(&shared.devices) = Some(LiveDevices::of(&machine));
        let mut engine = Engine {
            config,
            options,
            shared: shared.clone(),
            signals,
            machine: Some(machine),
            control: RunControl::new(),
            threads: Vec::new(),
            next_refresh_ns: 0,
        };
        let vnc_config = engine.config.display.vnc.clone();
        let thread = std::thread::Builder::new()
            .name("vmm-engine".into())
            .spawn(move || engine.run(rx))
            .map_err(VmmError::Thread)?;
        let mut handle = VmHandle {
            shared,
            tx,
            engine: Some(thread),
            vnc: None,
        };
        if let Some(vnc) = vnc_config {
            handle.vnc = Some(crate::vnc::start(&vnc, handle.display(), handle.input())?);
        }
        Ok(handle)
    }

    fn call(&self, make: impl FnOnce(Sender<Result<()>>) -> Message) -> Result<()> {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.tx
            .send(make(reply_tx))
            .map_err(|_| VmmError::EngineGone)?;
        reply_rx.recv().map_err(|_| VmmError::EngineGone)?
    }

    pub fn start(&self) -> Result<()> {
        self.call(Message::Start)
    }
    pub fn pause(&self) -> Result<()> {
        self.call(Message::Pause)
    }
    pub fn resume(&self) -> Result<()> {
        self.call(Message::Resume)
    }
    /// A hard reset, as the reset button of a PC.
    pub fn reset(&self) -> Result<()> {
        self.call(Message::Reset)
    }
    /// Pulls the plug: the vCPUs stop at once, NVRAM is saved.
    pub fn power_off(&self) -> Result<()> {
        self.call(Message::PowerOff)
    }

    pub fn state(&self) -> VmState {
        lock(&self.shared.state).clone()
    }

    /// A new stream of events from now on.
    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = mpsc::channel();
        lock(&self.shared.subscribers).push(tx);
        rx
    }

    /// Where the VM's VNC server listens, if it has one.
    pub fn vnc_address(&self) -> Option<std::net::SocketAddr> {
        self.vnc.as_ref().map(|v| v.local_addr())
    }

    /// Clients connected to the VNC server and bytes sent so far.
    pub fn vnc_stats(&self) -> Option<vmm_vnc::VncStats> {
        self.vnc.as_ref().map(|v| v.stats())
    }

    /// The guest's screen.
    pub fn display(&self) -> DisplayHandle {
        DisplayHandle {
            shared: self.shared.display.clone(),
        }
    }

    pub fn input(&self) -> InputHandle {
        InputHandle {
            shared: self.shared.clone(),
        }
    }

    pub fn stats(&self) -> VmStats {
        let counters = lock(&self.shared.counters).clone();
        let tids = lock(&self.shared.vcpu_tids).clone();
        let vcpus = counters
            .iter()
            .enumerate()
            .map(|(i, c)| VcpuStats {
                cpu_time_ns: tids
                    .get(i)
                    .and_then(|t| *lock(t))
                    .and_then(thread_cpu_time_ns)
                    .unwrap_or(0),
                exits: c.snapshot(),
            })
            .collect();
        let started = *lock(&self.shared.started_at);
        VmStats {
            uptime_ns: started.map(|s| s.elapsed().as_nanos() as u64).unwrap_or(0),
            vcpus,
            interrupts: lock(&self.shared.interrupts)
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            resets: *lock(&self.shared.resets),
            memory_bytes: self.shared.memory_bytes,
            memory_resident_bytes: lock(&self.shared.ram)
                .as_ref()
                .map(|r| r.resident_bytes())
                .unwrap_or(0),
            display_frames: self.display().frames(),
            disks: self.disk_stats(),
            nics: self.nic_stats(),
        }
    }

    fn disk_stats(&self) -> Vec<DiskStats> {
        let Some(dev) = lock(&self.shared.devices).clone() else {
            return Vec::new();
        };
        let stats = lock(&dev.ide).stats();
        stats
            .into_iter()
            .map(|s| DiskStats {
                read_bytes: s.counters.read_bytes,
                write_bytes: s.counters.write_bytes,
                read_ops: s.counters.read_ops,
                write_ops: s.counters.write_ops,
                flushes: s.counters.flushes,
            })
            .collect()
    }

    fn nic_stats(&self) -> Vec<NicStats> {
        let Some(dev) = lock(&self.shared.devices).clone() else {
            return Vec::new();
        };
        dev.nics
            .iter()
            .map(|card| {
                let card = lock(card);
                let c = card.counters();
                NicStats {
                    rx_bytes: c.rx_bytes,
                    tx_bytes: c.tx_bytes,
                    rx_packets: c.rx_packets,
                    tx_packets: c.tx_packets,
                    rx_dropped: c.rx_dropped,
                    tx_dropped: c.tx_dropped,
                    link_up: card.link_up(),
                }
            })
            .collect()
    }

    /// Presses the ACPI power button, as on a PC's case: a guest OS that listens shuts
    /// down cleanly and then powers the VM off itself (state `Stopped`). Says whether the
    /// guest listens; firmware, boot loaders and OSes without ACPI do not (then only
    /// [`VmHandle::power_off`] stops the VM). A press while paused is seen on resume.
    pub fn press_power_button(&self) -> Result<PowerButton> {
        let state = self.state();
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(VmmError::InvalidState {
                state: state.to_string(),
                action: "press the power button",
            });
        }
        let dev = lock(&self.shared.devices)
            .clone()
            .ok_or_else(|| VmmError::Device("the VM has no machine".into()))?;
        let heard = lock(&dev.pm).press_power_button();
        Ok(if heard {
            PowerButton::Delivered
        } else {
            PowerButton::NotListening
        })
    }

    /// Connects or disconnects the cable of network card `index` while the VM runs.
    pub fn set_nic_link(&self, index: usize, up: bool) -> Result<()> {
        let dev = lock(&self.shared.devices)
            .clone()
            .ok_or_else(|| VmmError::Device("the VM has no machine".into()))?;
        let card = dev
            .nics
            .get(index)
            .ok_or_else(|| VmmError::Device(format!("the VM has no network card {index}")))?;
        lock(card).set_link(up);
        Ok(())
    }

    /// Plugs a USB device in (or pulls it out) while the VM runs, as a user would; the
    /// choice is also kept for the next start of this handle.
    pub fn set_usb_device(&self, device: UsbDevice, plugged: bool) -> Result<()> {
        self.call(|reply| Message::SetUsbDevice(device, plugged, reply))
    }

    /// Puts a new medium into the first CD-ROM drive, or ejects it (None). A guest that
    /// locked the tray gets an eject request and the change is refused, unless `force`.
    pub fn change_cdrom(&self, iso: Option<&std::path::Path>, force: bool) -> Result<()> {
        self.call(|reply| Message::ChangeCdrom(iso.map(|p| p.to_path_buf()), force, reply))
    }

    /// Blocks until the VM is stopped or failed, or `timeout` passes; returns the state.
    pub fn wait_for_stop(&self, timeout: Option<Duration>) -> VmState {
        let events = self.subscribe();
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let state = self.state();
            if matches!(state, VmState::Stopped | VmState::Failed(_)) {
                return state;
            }
            let wait = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(w) => w.min(Duration::from_millis(200)),
                    None => return state,
                },
                None => Duration::from_millis(200),
            };
            let _ = events.recv_timeout(wait);
        }
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Message::Shutdown);
        if let Some(t) = self.engine.take() {
            let _ = t.join();
        }
    }
}

/// CPU time of a thread of this process, from the scheduler's statistics.
fn thread_cpu_time_ns(tid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

fn build_machine(
    config: &VmConfig,
    options: &EngineOptions,
    signals: &Arc<EngineSignals>,
) -> Result<Machine> {
    let timer_signals = signals.clone();
    Machine::build(
        config,
        options,
        signals.clone(),
        Arc::new(move || timer_signals.send(Message::TimersChanged)),
    )
}

struct Engine {
    config: VmConfig,
    options: EngineOptions,
    shared: Arc<Shared>,
    signals: Arc<EngineSignals>,
    machine: Option<Machine>,
    control: Arc<RunControl>,
    threads: Vec<JoinHandle<()>>,
    /// When the screen is refreshed next (engine clock).
    next_refresh_ns: u64,
}

impl Engine {
    fn run(&mut self, rx: Receiver<Message>) {
        loop {
            let timeout = self.next_timer_in();
            let message = match rx.recv_timeout(timeout) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    self.run_timers();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => Message::Shutdown,
            };
            match message {
                Message::Start(reply) => {
                    let r = self.start();
                    let _ = reply.send(r);
                }
                Message::Pause(reply) => {
                    let r = self.pause();
                    let _ = reply.send(r);
                }
                Message::Resume(reply) => {
                    let r = self.resume();
                    let _ = reply.send(r);
                }
                Message::Reset(reply) => {
                    let r = self.reset();
                    let _ = reply.send(r);
                }
                Message::PowerOff(reply) => {
                    self.power_off();
                    let _ = reply.send(Ok(()));
                }
                Message::ChangeCdrom(path, force, reply) => {
                    let r = self.change_cdrom(path, force);
                    let _ = reply.send(r);
                }
                Message::SetUsbDevice(device, plugged, reply) => {
                    let r = self.set_usb_device(device, plugged);
                    let _ = reply.send(r);
                }
                Message::GuestReset => {
                    if lock(&self.shared.state).clone() == VmState::Running {
                        if let Err(e) = self.reset() {
                            self.fail(format!("reset failed: {e}"));
                        }
                    }
                }
                Message::GuestPowerOff => self.power_off(),
                Message::VcpuFailed(index, message) => {
                    log::error!("vCPU {index}: {message}");
                    self.fail(message);
                }
                Message::TimersChanged => self.run_timers(),
                Message::Shutdown => {
                    self.power_off();
                    return;
                }
            }
        }
    }

    fn state(&self) -> VmState {
        lock(&self.shared.state).clone()
    }

    fn invalid(&self, action: &'static str) -> VmmError {
        VmmError::InvalidState {
            state: self.state().to_string(),
            action,
        }
    }

    fn kick_all(&self) {
        for t in &self.threads {
            let _ = t.kill(kick_signal());
        }
    }

    fn start(&mut self) -> Result<()> {
        match self.state() {
            VmState::Stopped | VmState::Failed(_) => {}
            _ => return Err(self.invalid("start")),
        }
        let mut machine = match self.machine.take() {
            Some(m) => m,
            None => build_machine(&self.config, &self.options, &self.signals)?,
        };
        *lock(&self.shared.devices) = Some(LiveDevices::of(&machine));
        self.control = RunControl::new();
        let mut counters = Vec::new();
        let mut tids = Vec::new();
        for (index, (vcpu, reset_state)) in machine.vcpus.drain(..).enumerate() {
            let c = Arc::new(ExitCounters::default());
            let tid = Arc::new(Mutex::new(None));
            counters.push(c.clone());
            tids.push(tid.clone());
            let runner = VcpuRunner {
                index,
                vcpu,
                reset_state,
                linux_entry: machine.linux_entry,
                pio: machine.pio.clone(),
                mmio: machine.mmio.clone(),
                control: self.control.clone(),
                counters: c,
                observer: self.signals.clone(),
                coalesced: machine.coalesced.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    // SAFETY: gettid has no preconditions and only returns this thread's id.
                    *lock(&tid) = Some(unsafe { libc::gettid() });
                    runner.run()
                })
                .map_err(VmmError::Thread)?;
            self.threads.push(thread);
        }
        *lock(&self.shared.counters) = counters;
        *lock(&self.shared.interrupts) = machine.interrupt_counts.clone();
        *lock(&self.shared.vcpu_tids) = tids;
        *lock(&self.shared.started_at) = Some(Instant::now());
        *lock(&self.shared.resets) = 0;
        *lock(&self.shared.ram) = Some(machine.memory.ram().clone());
        self.next_refresh_ns = machine.clock.monotonic_ns();
        self.machine = Some(machine);
        self.control.set_command(VcpuCommand::Run);
        self.shared.set_state(VmState::Running);
        Ok(())
    }

    fn pause(&mut self) -> Result<()> {
        if self.state() != VmState::Running {
            return Err(self.invalid("pause"));
        }
        self.park_vcpus();
        self.shared.set_state(VmState::Paused);
        Ok(())
    }

    fn park_vcpus(&self) {
        self.control.set_command(VcpuCommand::Pause);
        self.control.wait_all_parked(|| self.kick_all());
    }

    fn resume(&mut self) -> Result<()> {
        if self.state() != VmState::Paused {
            return Err(self.invalid("resume"));
        }
        self.control.set_command(VcpuCommand::Run);
        self.shared.set_state(VmState::Running);
        Ok(())
    }

    fn reset(&mut self) -> Result<()> {
        let state = self.state();
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(self.invalid("reset"));
        }
        self.park_vcpus();
        if let Some(m) = &mut self.machine {
            m.reset_devices()?;
            m.apply_boot_order_after_reset();
        }
        if self.config.boot_order == crate::config::BootOrder::CdOnce {
            // The install CD was booted once; from now on the disk comes first.
            self.config.boot_order = crate::config::BootOrder::Disk;
        }
        self.control.bump_reset_epoch();
        *lock(&self.shared.resets) += 1;
        self.shared.emit(Event::GuestReset);
        if state == VmState::Running {
            self.control.set_command(VcpuCommand::Run);
        }
        Ok(())
    }

    fn change_cdrom(&mut self, path: Option<std::path::PathBuf>, force: bool) -> Result<()> {
        let Some(index) = self
            .config
            .drives
            .iter()
            .position(|d| d.kind == crate::config::DriveKind::Cdrom)
        else {
            return Err(VmmError::Device("the VM has no CD-ROM drive".into()));
        };
        let media = match &path {
            Some(p) => Some(crate::storage::ImageBackend::open(
                p,
                crate::config::DriveKind::Cdrom,
                true,
            )?),
            None => None,
        };
        if let Some(m) = &self.machine {
            let (channel, unit) = crate::storage::ide_position(index);
            lock(&m.ide)
                .change_media(
                    channel,
                    unit,
                    media.map(|b| Box::new(b) as Box<dyn vmm_devices::block::BlockBackend>),
                    force,
                )
                .map_err(|e| VmmError::Device(format!("CD-ROM: {e}")))?;
        }
        // The next start keeps the new medium.
        self.config.drives[index].path = path;
        Ok(())
    }

    fn set_usb_device(&mut self, device: UsbDevice, plugged: bool) -> Result<()> {
        match device {
            UsbDevice::Tablet => self.config.input.usb_tablet = plugged,
            UsbDevice::Keyboard => self.config.input.usb_keyboard = plugged,
        }
        let Some(m) = &mut self.machine else {
            return Ok(());
        };
        m.set_usb_device(device, plugged)?;
        if lock(&self.shared.devices).is_some() {
            *lock(&self.shared.devices) = Some(LiveDevices::of(m));
        }
        Ok(())
    }

    fn stop_threads(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.control.set_command(VcpuCommand::Exit);
        self.control.wait_all_exited(|| self.kick_all());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    fn power_off(&mut self) {
        let was_running = !matches!(self.state(), VmState::Stopped);
        self.stop_threads();
        if let Some(m) = self.machine.take() {
            if was_running {
                if let Err(e) = m.save_nvram() {
                    self.shared.emit(Event::Error(e.to_string()));
                }
            }
        }
        *lock(&self.shared.devices) = None;
        if !matches!(self.state(), VmState::Failed(_)) {
            self.shared.set_state(VmState::Stopped);
        }
    }

    fn fail(&mut self, message: String) {
        if matches!(self.state(), VmState::Failed(_) | VmState::Stopped) {
            return;
        }
        self.shared.emit(Event::Error(message.clone()));
        self.stop_threads();
        if let Some(m) = self.machine.take() {
            let _ = m.save_nvram();
        }
        *lock(&self.shared.devices) = None;
        self.shared.set_state(VmState::Failed(message));
    }

    fn next_timer_in(&self) -> Duration {
        const IDLE: Duration = Duration::from_millis(250);
        let Some(m) = &self.machine else {
            return IDLE;
        };
        let now = m.clock.monotonic_ns();
        let rtc = lock(&m.rtc).next_deadline_ns();
        let mut next = rtc.map_or(IDLE, |d| Duration::from_nanos(d.saturating_sub(now)));
        if self.state() == VmState::Running {
            // Device timers and the screen refresh run only while the guest runs.
            let running_deadlines = m
                .timed
                .iter()
                .filter_map(|t| lock(t).next_deadline_ns())
                .chain(std::iter::once(self.next_refresh_ns));
            for d in running_deadlines {
                next = next.min(Duration::from_nanos(d.saturating_sub(now)));
            }
        }
        next.min(IDLE)
    }

    fn run_timers(&mut self) {
        let Some(m) = &self.machine else {
            return;
        };
        let now = m.clock.monotonic_ns();
        {
            let mut rtc = lock(&m.rtc);
            if rtc.next_deadline_ns().is_some_and(|d| d <= now) {
                rtc.on_timer(now);
            }
        }
        let running = self.state() == VmState::Running;
        if running {
            for t in &m.timed {
                let mut t = lock(t);
                if t.next_deadline_ns().is_some_and(|d| d <= now) {
                    t.on_timer(now);
                }
            }
        }
        if self.next_refresh_ns <= now && running {
            let handle = DisplayHandle {
                shared: self.shared.display.clone(),
            };
            let before = handle.size();
            if m.refresh_display(&self.shared.display, now) {
                let after = handle.size();
                if after != before {
                    self.shared.emit(Event::DisplayResized {
                        width: after.0,
                        height: after.1,
                    });
                }
            }
            let interval = REFRESH_INTERVAL.as_nanos() as u64;
            // Skip missed ticks instead of refreshing several times in a row.
            self.next_refresh_ns = now - (now - self.next_refresh_ns) % interval + interval;
        }
    }
}
