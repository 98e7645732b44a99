//! The engine's network backends: where a network card's frames go and come from.
//!
//! Each card gets one backend running on its own thread (`deskvm-net-N`):
//! - [`NetBackend::start_nat`]: user-mode NAT through libslirp (see [`slirp`]); no
//!   privileges, 10.0.2.0/24 behind the host, DHCP, DNS forwarding, host port forwards.
//! - [`NetBackend::start_tap`]: an existing TAP device (see [`tap`]).
//!
//! Data flow. Guest → wire: the card calls [`FrameSink::send`] (with its lock held); the
//! sink only queues the frame (bounded, [`MAX_QUEUED_FROM_GUEST`]) and wakes the thread
//! through an eventfd. Wire → guest: the thread locks the card and calls
//! [`NetworkCard::receive`] only while [`NetworkCard::can_receive`] says a frame fits;
//! otherwise it holds frames in a bounded queue ([`MAX_HELD_FOR_GUEST`], the oldest is
//! dropped beyond) and retries when the card calls [`FrameSink::rx_ready`] and every
//! millisecond while it holds any (RTL8139 C+ frees buffers without a register write).
//! While the card's link is down, frames for it are dropped and counted.
//!
//! Construction order: the card needs its sink when it is built and the backend needs the
//! card, so the sink comes first: [`NetBackend::channel`] gives the sink for the card and a
//! [`NetPort`] that `start_*` turns into the running backend. Dropping the [`NetBackend`]
//! stops and joins the thread (and closes the NAT's listening sockets / the TAP fd).
//!
//! Not here: virtio-net vhost/multiqueue, bridging helpers (creating TAP devices needs
//! root: `ip tuntap add mode tap user $USER name tap0`), packet capture.

pub mod slirp;
pub mod tap;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_devices::net::{FrameSink, NetworkCard, ReceiveOutcome};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::config::{NetBackendConfig, NicConfig, PortForward};

/// Frames the guest transmitted that wait for the backend thread; more are dropped.
pub const MAX_QUEUED_FROM_GUEST: usize = 1024;
/// Frames for the guest held while its receive buffers are full; beyond, the oldest go.
pub const MAX_HELD_FOR_GUEST: usize = 256;
/// Retry period while frames are held and the card gives no `rx_ready`.
const HELD_RETRY_MS: u64 = 1;
/// Longest sleep of the backend thread when nothing asks for an earlier wakeup.
const IDLE_POLL_MS: u64 = 1000;

/// Why a backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "cannot forward {protocol} {address}:{port} to the guest: {reason}; \
         pick another host port or address in the VM's network settings"
    )]
    Forward {
        protocol: String,
        address: String,
        port: u16,
        reason: String,
    },
    #[error("the network boot file name \"{name}\" cannot be used: {reason}")]
    BootFile { name: String, reason: String },
    #[error("the user-mode NAT could not start: {0}")]
    Nat(String),
    #[error("\"{name}\" is not a usable TAP device name: {reason}")]
    TapName { name: String, reason: String },
    #[error(
        "there is no network device \"{name}\"; create a TAP device owned by you first: \
         sudo ip tuntap add mode tap user $USER name {name} && sudo ip link set {name} up"
    )]
    NoSuchTap { name: String },
    #[error("/dev/net/tun is not available ({source}); load the tun module: sudo modprobe tun")]
    TunUnavailable { source: std::io::Error },
    #[error(
        "permission denied opening TAP device \"{name}\": it must be owned by your user; \
         recreate it with: sudo ip tuntap del mode tap name {name} && \
         sudo ip tuntap add mode tap user $USER name {name}"
    )]
    TapPermission { name: String },
    #[error("\"{name}\" is not a TAP device (a TUN device, or another kind of interface)")]
    NotATap { name: String },
    #[error("TAP device \"{name}\" is already in use by another program (or VM)")]
    TapBusy { name: String },
    #[error("TAP device \"{name}\": {source}")]
    Tap {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot create the network backend's wakeup eventfd: {0}")]
    Wakeup(std::io::Error),
    #[error("cannot start the network backend thread: {0}")]
    Thread(std::io::Error),
}

/// Settings of the user-mode NAT (from a [`NicConfig`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatConfig {
    /// Host-to-guest port forwards (to 10.0.2.15).
    pub forwards: Vec<PortForward>,
    /// DHCP boot file name (BOOTP `file`), at most 127 bytes.
    pub boot_file: Option<String>,
    /// Also offer IPv6 (fec0::/64, router advertisements, DNS at fec0::3).
    pub ipv6: bool,
}

impl Default for NatConfig {
    fn default() -> Self {
        Self {
            forwards: Vec::new(),
            boot_file: None,
            ipv6: true,
        }
    }
}

impl NatConfig {
    pub fn from_nic(nic: &NicConfig) -> Self {
        Self {
            forwards: nic.forwards.clone(),
            boot_file: nic.boot_file.clone(),
            ipv6: true,
        }
    }
}

/// Counters of one backend (frames, not bytes; the card counts bytes in the guest's view).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Frames from the guest handed to the NAT / TAP.
    pub from_guest: u64,
    /// Frames from the guest dropped because the backend thread fell behind.
    pub from_guest_dropped: u64,
    /// Frames given to the card (whatever it then did with them).
    pub to_guest: u64,
    /// Frames held now, waiting for receive buffers.
    pub held: u64,
    /// Frames for the guest dropped: held queue overflow or the card's link down.
    pub to_guest_dropped: u64,
    /// Frames the TAP device refused (write errors); 0 for NAT.
    pub wire_errors: u64,
}

#[derive(Default)]
struct Counters {
    from_guest: AtomicU64,
    from_guest_dropped: AtomicU64,
    to_guest: AtomicU64,
    held: AtomicU64,
    to_guest_dropped: AtomicU64,
    wire_errors: AtomicU64,
}

/// The card's end: queues transmitted frames and wakes the backend thread.
struct BackendSink {
    queue: Mutex<VecDeque<Vec<u8>>>,
    wake: EventFd,
    /// The backend holds frames for the guest: `rx_ready` is worth a wakeup.
    holding: AtomicBool,
    stop: AtomicBool,
    counters: Counters,
}

impl BackendSink {
    fn wake(&self) {
        // An eventfd write only fails when the counter would overflow, i.e. when a wakeup
        // is pending anyway.
        let _ = self.wake.write(1);
    }

    fn take_queued(&self) -> VecDeque<Vec<u8>> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl FrameSink for BackendSink {
    fn send(&self, frame: &[u8]) {
        let was_empty = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.len() >= MAX_QUEUED_FROM_GUEST {
                self.counters
                    .from_guest_dropped
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            queue.push_back(frame.to_vec());
            queue.len() == 1
        };
        if was_empty {
            self.wake();
        }
    }

    fn rx_ready(&self) {
        if self.holding.load(Ordering::Acquire) {
            self.wake();
        }
    }
}

/// The backend's end of a [`NetBackend::channel`], waiting for `start_*`.
pub struct NetPort {
    sink: Arc<BackendSink>,
}

/// One side of the network: NAT or TAP, as the backend loop drives it.
trait Wire {
    /// Hands one frame from the guest to the outside; frames the outside answers at once
    /// are appended to `to_guest`.
    fn transmit(&mut self, frame: &[u8], to_guest: &mut Vec<Vec<u8>>);
    /// Appends the descriptors to wait on and shortens `timeout_ms` if needed.
    fn prepare(&mut self, fds: &mut Vec<libc::pollfd>, timeout_ms: &mut u64);
    /// Handles what poll reported (the whole poll set, as filled); frames for the guest
    /// are appended to `to_guest`.
    fn dispatch(&mut self, fds: &[libc::pollfd], poll_failed: bool, to_guest: &mut Vec<Vec<u8>>);
    /// Frames the outside refused since the last call.
    fn take_errors(&mut self) -> u64 {
        0
    }
}

/// A running backend; dropping it stops its thread.
pub struct NetBackend {
    sink: Arc<BackendSink>,
    thread: Option<JoinHandle<()>>,
}

type Card = Arc<Mutex<dyn NetworkCard>>;

impl NetBackend {
    /// The sink to build the card with, and the port to start the backend on once the
    /// card exists.
    pub fn channel() -> Result<(Arc<dyn FrameSink>, NetPort), NetError> {
        let wake = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(NetError::Wakeup)?;
        let sink = Arc::new(BackendSink {
            queue: Mutex::new(VecDeque::new()),
            wake,
            holding: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
        });
        Ok((sink.clone(), NetPort { sink }))
    }

    /// Starts the backend a NIC's configuration asks for. `index` names the thread.
    pub fn start(
        index: usize,
        nic: &NicConfig,
        card: Card,
        port: NetPort,
    ) -> Result<NetBackend, NetError> {
        match &nic.backend {
            NetBackendConfig::Nat => Self::start_nat(index, &NatConfig::from_nic(nic), card, port),
            NetBackendConfig::Tap { name } => Self::start_tap(index, name, card, port),
        }
    }

    /// Starts user-mode NAT. Fails (with nothing left running) when a forward cannot bind.
    pub fn start_nat(
        index: usize,
        config: &NatConfig,
        card: Card,
        port: NetPort,
    ) -> Result<NetBackend, NetError> {
        let config = config.clone();
        // libslirp is created, used and dropped on the backend thread only.
        Self::spawn(index, card, port, move || slirp::SlirpWire::new(&config))
    }

    /// Attaches to the existing TAP device `name`.
    pub fn start_tap(
        index: usize,
        name: &str,
        card: Card,
        port: NetPort,
    ) -> Result<NetBackend, NetError> {
        let wire = tap::TapWire::open(name)?;
        Self::spawn(index, card, port, move || Ok(wire))
    }

    fn spawn<W, F>(index: usize, card: Card, port: NetPort, make: F) -> Result<NetBackend, NetError>
    where
        W: Wire,
        F: FnOnce() -> Result<W, NetError> + Send + 'static,
    {
        let sink = port.sink;
        let thread_sink = sink.clone();
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("deskvm-net-{index}"))
            .spawn(move || {
                let wire = match make() {
                    Ok(wire) => {
                        let _ = started_tx.send(Ok(()));
                        wire
                    }
                    Err(error) => {
                        let _ = started_tx.send(Err(error));
                        return;
                    }
                };
                run(wire, &card, &thread_sink);
            })
            .map_err(NetError::Thread)?;
        let started = started_rx.recv().unwrap_or_else(|_| {
            Err(NetError::Nat(
                "the network backend thread ended while starting".into(),
            ))
        });
        match started {
            Ok(()) => Ok(NetBackend {
                sink,
                thread: Some(thread),
            }),
            Err(error) => {
                let _ = thread.join();
                Err(error)
            }
        }
    }

    pub fn stats(&self) -> BackendStats {
        let c = &self.sink.counters;
        BackendStats {
            from_guest: c.from_guest.load(Ordering::Relaxed),
            from_guest_dropped: c.from_guest_dropped.load(Ordering::Relaxed),
            to_guest: c.to_guest.load(Ordering::Relaxed),
            held: c.held.load(Ordering::Relaxed),
            to_guest_dropped: c.to_guest_dropped.load(Ordering::Relaxed),
            wire_errors: c.wire_errors.load(Ordering::Relaxed),
        }
    }
}

impl Drop for NetBackend {
    fn drop(&mut self) {
        self.sink.stop.store(true, Ordering::Release);
        self.sink.wake();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the network backend thread panicked");
            }
        }
    }
}

/// Frames for the guest waiting for receive buffers.
struct Held {
    frames: VecDeque<Vec<u8>>,
}

impl Held {
    fn push(&mut self, frames: &mut Vec<Vec<u8>>, counters: &Counters) {
        for frame in frames.drain(..) {
            if self.frames.len() >= MAX_HELD_FOR_GUEST {
                self.frames.pop_front();
                counters.to_guest_dropped.fetch_add(1, Ordering::Relaxed);
            }
            self.frames.push_back(frame);
        }
    }

    /// Gives the card as many held frames as it has room for.
    fn deliver(&mut self, card: &Card, counters: &Counters) {
        if self.frames.is_empty() {
            return;
        }
        let mut card = card.lock().unwrap_or_else(|e| e.into_inner());
        if !card.link_up() {
            counters
                .to_guest_dropped
                .fetch_add(self.frames.len() as u64, Ordering::Relaxed);
            self.frames.clear();
            return;
        }
        while card.can_receive() {
            let Some(frame) = self.frames.pop_front() else {
                break;
            };
            let outcome = card.receive(&frame);
            counters.to_guest.fetch_add(1, Ordering::Relaxed);
            if let ReceiveOutcome::NoBuffers | ReceiveOutcome::Dropped(_) = outcome {
                log::trace!("network card dropped a frame: {outcome:?}");
            }
        }
    }
}

/// The backend thread's loop: until the backend is dropped.
fn run<W: Wire>(mut wire: W, card: &Card, sink: &BackendSink) {
    let counters = &sink.counters;
    let mut held = Held {
        frames: VecDeque::new(),
    };
    let mut to_guest = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    while !sink.stop.load(Ordering::Acquire) {
        for frame in sink.take_queued() {
            counters.from_guest.fetch_add(1, Ordering::Relaxed);
            wire.transmit(&frame, &mut to_guest);
        }
        held.push(&mut to_guest, counters);
        held.deliver(card, counters);
        counters
            .held
            .store(held.frames.len() as u64, Ordering::Relaxed);
        sink.holding
            .store(!held.frames.is_empty(), Ordering::Release);

        fds.clear();
        fds.push(libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&sink.wake),
            events: libc::POLLIN,
            revents: 0,
        });
        let mut timeout_ms = IDLE_POLL_MS;
        wire.prepare(&mut fds, &mut timeout_ms);
        if !held.frames.is_empty() {
            timeout_ms = timeout_ms.min(HELD_RETRY_MS);
        }
        // Frames queued after take_queued above have written the eventfd, so poll returns.
        let timeout = libc::c_int::try_from(timeout_ms).unwrap_or(libc::c_int::MAX);
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
        // SAFETY: `fds` is a live, exclusively borrowed array of `nfds` pollfd structs.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout) };
        let poll_failed = ready < 0;
        if poll_failed {
            for entry in fds.iter_mut() {
                entry.revents = 0;
            }
        }
        if fds.first().is_some_and(|f| f.revents & libc::POLLIN != 0) {
            let _ = sink.wake.read();
        }
        wire.dispatch(&fds, poll_failed, &mut to_guest);
        counters
            .wire_errors
            .fetch_add(wire.take_errors(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_devices::net::{NicCounters, ReceiveOutcome};

    /// A card with a settable number of free receive buffers.
    pub(crate) struct FakeCard {
        pub(crate) free: usize,
        pub(crate) link: bool,
        pub(crate) received: Vec<Vec<u8>>,
    }

    impl FakeCard {
        pub(crate) fn new(free: usize) -> Self {
            Self {
                free,
                link: true,
                received: Vec::new(),
            }
        }
    }

    impl NetworkCard for FakeCard {
        fn receive(&mut self, frame: &[u8]) -> ReceiveOutcome {
            if self.free == 0 {
                return ReceiveOutcome::NoBuffers;
            }
            self.free -= 1;
            self.received.push(frame.to_vec());
            ReceiveOutcome::Delivered
        }
        fn can_receive(&self) -> bool {
            self.link && self.free > 0
        }
        fn set_link(&mut self, up: bool) {
            self.link = up;
        }
        fn link_up(&self) -> bool {
            self.link
        }
        fn counters(&self) -> NicCounters {
            NicCounters::default()
        }
        fn mac(&self) -> [u8; 6] {
            [2, 0, 0, 0, 0, 1]
        }
    }

    /// A wire that echoes every frame back to the guest, `copies` times.
    struct EchoWire {
        copies: usize,
    }

    impl Wire for EchoWire {
        fn transmit(&mut self, frame: &[u8], to_guest: &mut Vec<Vec<u8>>) {
            for _ in 0..self.copies {
                to_guest.push(frame.to_vec());
            }
        }
        fn prepare(&mut self, _fds: &mut Vec<libc::pollfd>, _timeout_ms: &mut u64) {}
        fn dispatch(&mut self, _: &[libc::pollfd], _: bool, _: &mut Vec<Vec<u8>>) {}
    }

    fn wait_until(mut condition: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !condition() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn echo_backend(
        copies: usize,
        free: usize,
    ) -> (NetBackend, Arc<dyn FrameSink>, Arc<Mutex<FakeCard>>) {
        let (sink, port) = NetBackend::channel().unwrap();
        let card = Arc::new(Mutex::new(FakeCard {
            free,
            link: true,
            received: Vec::new(),
        }));
        let backend =
            NetBackend::spawn(7, card.clone(), port, move || Ok(EchoWire { copies })).unwrap();
        (backend, sink, card)
    }

    #[test]
    fn frames_are_held_until_buffers_free_and_overflow_drops_the_oldest() {
        let (backend, sink, card) = echo_backend(MAX_HELD_FOR_GUEST + 10, 0);
        sink.send(&[0xab; 60]);
        wait_until(|| backend.stats().held == MAX_HELD_FOR_GUEST as u64);
        assert_eq!(backend.stats().to_guest_dropped, 10);
        assert_eq!(backend.stats().from_guest, 1);
        // Buffers come back without an rx_ready (as in RTL8139 C+): the 1 ms retry finds them.
        card.lock().unwrap().free = 5;
        wait_until(|| card.lock().unwrap().received.len() == 5);
        assert_eq!(backend.stats().held, MAX_HELD_FOR_GUEST as u64 - 5);
        card.lock().unwrap().free = 1000;
        sink.rx_ready();
        wait_until(|| backend.stats().held == 0);
        assert_eq!(card.lock().unwrap().received.len(), MAX_HELD_FOR_GUEST);
        assert_eq!(backend.stats().to_guest, MAX_HELD_FOR_GUEST as u64);
    }

    #[test]
    fn link_down_drops_frames_for_the_guest() {
        let (backend, sink, card) = echo_backend(3, 100);
        card.lock().unwrap().link = false;
        sink.send(&[1; 60]);
        wait_until(|| backend.stats().to_guest_dropped == 3);
        assert!(card.lock().unwrap().received.is_empty());
        card.lock().unwrap().link = true;
        sink.send(&[2; 60]);
        wait_until(|| card.lock().unwrap().received.len() == 3);
    }

    #[test]
    fn a_flood_from_the_guest_is_bounded_and_drop_stops_the_thread() {
        let (sink, port) = NetBackend::channel().unwrap();
        let card: Arc<Mutex<FakeCard>> = Arc::new(Mutex::new(FakeCard {
            free: 0,
            link: true,
            received: Vec::new(),
        }));
        // Nothing consumes the queue before the backend starts.
        for _ in 0..MAX_QUEUED_FROM_GUEST + 5 {
            sink.send(&[0; 60]);
        }
        let backend = NetBackend::spawn(0, card, port, || Ok(EchoWire { copies: 0 })).unwrap();
        wait_until(|| backend.stats().from_guest == MAX_QUEUED_FROM_GUEST as u64);
        assert_eq!(backend.stats().from_guest_dropped, 5);
        drop(backend);
        // The sink outlives the backend harmlessly.
        sink.send(&[0; 60]);
        sink.rx_ready();
    }

    #[test]
    fn a_failing_start_reports_its_error_and_leaves_no_thread() {
        let (_sink, port) = NetBackend::channel().unwrap();
        let card: Arc<Mutex<FakeCard>> = Arc::new(Mutex::new(FakeCard {
            free: 0,
            link: true,
            received: Vec::new(),
        }));
        let result = NetBackend::spawn::<EchoWire, _>(0, card, port, || {
            Err(NetError::Nat("refused".into()))
        });
        assert!(matches!(result, Err(NetError::Nat(m)) if m == "refused"));
    }

    #[test]
    fn backends_and_sinks_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        fn assert_sync<T: Sync>() {}
        assert_send::<NetBackend>();
        assert_send::<NetPort>();
        assert_sync::<BackendSink>();
    }

    #[test]
    fn start_follows_the_nic_configuration() {
        let nic = |backend| NicConfig {
            model: crate::config::NicModel::E1000,
            mac: None,
            link_up: true,
            backend,
            forwards: vec![],
            boot_file: Some("x".repeat(500)),
        };
        let card = || -> Card { Arc::new(Mutex::new(FakeCard::new(0))) };
        let (_, port) = NetBackend::channel().unwrap();
        let tap = NetBackendConfig::Tap {
            name: "deskvmnone8".into(),
        };
        assert!(matches!(
            NetBackend::start(0, &nic(tap), card(), port),
            Err(NetError::NoSuchTap { .. })
        ));
        // NAT: the boot file name (too long here) is checked on the backend thread.
        let (_, port) = NetBackend::channel().unwrap();
        assert!(matches!(
            NetBackend::start(0, &nic(NetBackendConfig::Nat), card(), port),
            Err(NetError::BootFile { .. })
        ));
        let mut ok = nic(NetBackendConfig::Nat);
        ok.boot_file = None;
        let (_, port) = NetBackend::channel().unwrap();
        let backend = NetBackend::start(0, &ok, card(), port).unwrap();
        assert_eq!(backend.stats(), BackendStats::default());
    }
}
