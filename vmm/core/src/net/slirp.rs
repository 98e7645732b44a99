//! User-mode NAT through libslirp (the TCP/IP stack QEMU's `-netdev user` uses), bound by
//! hand to its C API (`libslirp.h`, SlirpConfig version 4, or 3 on libslirp before 4.7).
//!
//! Emulated (by libslirp): the 10.0.2.0/24 network with the host/gateway at 10.0.2.2, the
//! DNS forwarder at 10.0.2.3, a DHCP server handing out 10.0.2.15 onwards (with the
//! configured boot file name), ARP, ICMP echo to the outside through unprivileged sockets,
//! TCP and UDP connections proxied through host sockets (10.0.2.2 is the host's loopback),
//! host-to-guest port forwards, and IPv6 (fec0::/64, host fec0::2, DNS fec0::3) when enabled.
//!
//! Not here: TFTP (no directory is served), SMB, guest forwards, the state save/load of
//! live connections, outbound address selection.
//!
//! libslirp is not thread-safe: a [`SlirpWire`] is created, used and dropped on the
//! backend's own thread only (it is deliberately `!Send`).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::net::Ipv4Addr;
use std::time::Instant;

use super::{NatConfig, NetError, Wire};

/// The guest network, its mask and the addresses libslirp answers on.
pub const NETWORK: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 0);
pub const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The first (and, for a single guest, only) address the DHCP server gives out.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Longest boot file name: the BOOTP `file` field holds 128 bytes with the terminating NUL
/// (libslirp aborts the process on a longer one, so it is refused before).
pub const MAX_BOOT_FILE_LEN: usize = 127;

// ---- the C API (libslirp.h) ----

#[repr(C)]
struct Slirp {
    _private: [u8; 0],
}

const SLIRP_POLL_IN: c_int = 1 << 0;
const SLIRP_POLL_OUT: c_int = 1 << 1;
const SLIRP_POLL_PRI: c_int = 1 << 2;
const SLIRP_POLL_ERR: c_int = 1 << 3;
const SLIRP_POLL_HUP: c_int = 1 << 4;

type SlirpTimerCb = unsafe extern "C" fn(opaque: *mut c_void);
type SlirpAddPollCb = unsafe extern "C" fn(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int;
type SlirpGetREventsCb = unsafe extern "C" fn(idx: c_int, opaque: *mut c_void) -> c_int;

#[repr(C)]
struct SlirpCb {
    send_packet:
        Option<unsafe extern "C" fn(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize>,
    guest_error: Option<unsafe extern "C" fn(msg: *const c_char, opaque: *mut c_void)>,
    clock_get_ns: Option<unsafe extern "C" fn(opaque: *mut c_void) -> i64>,
    timer_new: Option<
        unsafe extern "C" fn(
            cb: Option<SlirpTimerCb>,
            cb_opaque: *mut c_void,
            opaque: *mut c_void,
        ) -> *mut c_void,
    >,
    timer_free: Option<unsafe extern "C" fn(timer: *mut c_void, opaque: *mut c_void)>,
    timer_mod:
        Option<unsafe extern "C" fn(timer: *mut c_void, expire_time: i64, opaque: *mut c_void)>,
    register_poll_fd: Option<unsafe extern "C" fn(fd: c_int, opaque: *mut c_void)>,
    unregister_poll_fd: Option<unsafe extern "C" fn(fd: c_int, opaque: *mut c_void)>,
    notify: Option<unsafe extern "C" fn(opaque: *mut c_void)>,
    // Version 4.
    init_completed: Option<unsafe extern "C" fn(slirp: *mut Slirp, opaque: *mut c_void)>,
    timer_new_opaque: Option<
        unsafe extern "C" fn(id: c_int, cb_opaque: *mut c_void, opaque: *mut c_void) -> *mut c_void,
    >,
}

#[repr(C)]
struct SlirpConfig {
    version: u32,
    restricted: c_int,
    in_enabled: bool,
    vnetwork: libc::in_addr,
    vnetmask: libc::in_addr,
    vhost: libc::in_addr,
    in6_enabled: bool,
    vprefix_addr6: libc::in6_addr,
    vprefix_len: u8,
    vhost6: libc::in6_addr,
    vhostname: *const c_char,
    tftp_server_name: *const c_char,
    tftp_path: *const c_char,
    bootfile: *const c_char,
    vdhcp_start: libc::in_addr,
    vnameserver: libc::in_addr,
    vnameserver6: libc::in6_addr,
    vdnssearch: *mut *const c_char,
    vdomainname: *const c_char,
    if_mtu: usize,
    if_mru: usize,
    disable_host_loopback: bool,
    enable_emu: bool,
    // Version 2.
    outbound_addr: *mut libc::sockaddr_in,
    outbound_addr6: *mut libc::sockaddr_in6,
    // Version 3.
    disable_dns: bool,
    // Version 4.
    disable_dhcp: bool,
}

#[link(name = "slirp")]
extern "C" {
    fn slirp_new(
        cfg: *const SlirpConfig,
        callbacks: *const SlirpCb,
        opaque: *mut c_void,
    ) -> *mut Slirp;
    fn slirp_cleanup(slirp: *mut Slirp);
    fn slirp_pollfds_fill(
        slirp: *mut Slirp,
        timeout: *mut u32,
        add_poll: SlirpAddPollCb,
        opaque: *mut c_void,
    );
    fn slirp_pollfds_poll(
        slirp: *mut Slirp,
        select_error: c_int,
        get_revents: SlirpGetREventsCb,
        opaque: *mut c_void,
    );
    fn slirp_input(slirp: *mut Slirp, pkt: *const u8, pkt_len: c_int);
    fn slirp_handle_timer(slirp: *mut Slirp, id: c_int, cb_opaque: *mut c_void);
    fn slirp_add_hostfwd(
        slirp: *mut Slirp,
        is_udp: c_int,
        host_addr: libc::in_addr,
        host_port: c_int,
        guest_addr: libc::in_addr,
        guest_port: c_int,
    ) -> c_int;
    fn slirp_version_string() -> *const c_char;
}

/// The version of the libslirp this process runs with ("4.7.0").
pub fn libslirp_version() -> String {
    // SAFETY: slirp_version_string returns a pointer to a static NUL-terminated string.
    let raw = unsafe { slirp_version_string() };
    if raw.is_null() {
        return String::new();
    }
    // SAFETY: non-null, static, NUL-terminated (see above).
    unsafe { CStr::from_ptr(raw) }
        .to_string_lossy()
        .into_owned()
}

/// The SlirpConfig version this libslirp accepts: 4 from 4.7 on, else 3.
fn config_version(version: &str) -> u32 {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    if (major, minor) >= (4, 7) {
        4
    } else {
        3
    }
}

fn in_addr(ip: Ipv4Addr) -> libc::in_addr {
    libc::in_addr {
        s_addr: u32::from_ne_bytes(ip.octets()),
    }
}

fn in6_addr(ip: std::net::Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: ip.octets(),
    }
}

// ---- the callback side ----

enum TimerKind {
    /// Created through `timer_new` (config version 3): call `cb(cb_opaque)`.
    Callback {
        cb: Option<SlirpTimerCb>,
        cb_opaque: *mut c_void,
    },
    /// Created through `timer_new_opaque` (version 4): `slirp_handle_timer(id, cb_opaque)`.
    Opaque { id: c_int, cb_opaque: *mut c_void },
}

struct Timer {
    kind: TimerKind,
    /// Expiry in milliseconds of the `clock_get_ns` clock; `None` while disarmed.
    expire_ms: Option<i64>,
}

/// What libslirp's callbacks reach through their `opaque` pointer.
struct CallbackState {
    start: Instant,
    /// Frames libslirp sent toward the guest since the last drain.
    to_guest: Vec<Vec<u8>>,
    /// Live timers (owned: boxed and leaked into raw pointers; freed by `timer_free` or at drop).
    timers: Vec<*mut Timer>,
}

impl CallbackState {
    fn now_ns(&self) -> i64 {
        i64::try_from(self.start.elapsed().as_nanos()).unwrap_or(i64::MAX)
    }
}

unsafe extern "C" fn cb_send_packet(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize {
    if buf.is_null() || opaque.is_null() {
        return -1;
    }
    // SAFETY: opaque is the CallbackState given to slirp_new, alive until after
    // slirp_cleanup; libslirp calls back only from inside our calls on this thread, while
    // no Rust reference to the state is held.
    let state = unsafe { &mut *(opaque as *mut CallbackState) };
    // SAFETY: libslirp passes a buffer of `len` readable bytes.
    let frame = unsafe { std::slice::from_raw_parts(buf as *const u8, len) };
    state.to_guest.push(frame.to_vec());
    isize::try_from(len).unwrap_or(isize::MAX)
}

unsafe extern "C" fn cb_guest_error(msg: *const c_char, _opaque: *mut c_void) {
    if msg.is_null() {
        return;
    }
    // SAFETY: libslirp passes a NUL-terminated message valid for the call.
    let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
    log::warn!("NAT: the guest sent something invalid: {text}");
}

unsafe extern "C" fn cb_clock_get_ns(opaque: *mut c_void) -> i64 {
    if opaque.is_null() {
        return 0;
    }
    // SAFETY: see cb_send_packet; only read.
    let state = unsafe { &*(opaque as *const CallbackState) };
    state.now_ns()
}

fn add_timer(opaque: *mut c_void, kind: TimerKind) -> *mut c_void {
    if opaque.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: see cb_send_packet.
    let state = unsafe { &mut *(opaque as *mut CallbackState) };
    let timer = Box::into_raw(Box::new(Timer {
        kind,
        expire_ms: None,
    }));
    state.timers.push(timer);
    timer as *mut c_void
}

unsafe extern "C" fn cb_timer_new(
    cb: Option<SlirpTimerCb>,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    add_timer(opaque, TimerKind::Callback { cb, cb_opaque })
}

unsafe extern "C" fn cb_timer_new_opaque(
    id: c_int,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    add_timer(opaque, TimerKind::Opaque { id, cb_opaque })
}

unsafe extern "C" fn cb_timer_free(timer: *mut c_void, opaque: *mut c_void) {
    if opaque.is_null() || timer.is_null() {
        return;
    }
    // SAFETY: see cb_send_packet.
    let state = unsafe { &mut *(opaque as *mut CallbackState) };
    let timer = timer as *mut Timer;
    if let Some(position) = state.timers.iter().position(|t| *t == timer) {
        state.timers.swap_remove(position);
        // SAFETY: the pointer came from Box::into_raw in add_timer and was still listed,
        // so it has not been freed yet; it is unlisted now so it is freed exactly once.
        drop(unsafe { Box::from_raw(timer) });
    }
}

unsafe extern "C" fn cb_timer_mod(timer: *mut c_void, expire_time: i64, opaque: *mut c_void) {
    if opaque.is_null() || timer.is_null() {
        return;
    }
    // SAFETY: see cb_send_packet.
    let state = unsafe { &mut *(opaque as *mut CallbackState) };
    let timer = timer as *mut Timer;
    if state.timers.contains(&timer) {
        // SAFETY: listed timers are live boxes owned by the state.
        unsafe { (*timer).expire_ms = Some(expire_time) };
    }
}

unsafe extern "C" fn cb_register_poll_fd(_fd: c_int, _opaque: *mut c_void) {}
unsafe extern "C" fn cb_unregister_poll_fd(_fd: c_int, _opaque: *mut c_void) {}
unsafe extern "C" fn cb_notify(_opaque: *mut c_void) {}

/// `opaque` of the poll callbacks: the poll set of the backend loop.
unsafe extern "C" fn cb_add_poll(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int {
    if opaque.is_null() {
        return -1;
    }
    // SAFETY: opaque is the `&mut Vec<pollfd>` passed to slirp_pollfds_fill for this call.
    let fds = unsafe { &mut *(opaque as *mut Vec<libc::pollfd>) };
    let mut poll_events = 0;
    if events & SLIRP_POLL_IN != 0 {
        poll_events |= libc::POLLIN;
    }
    if events & SLIRP_POLL_OUT != 0 {
        poll_events |= libc::POLLOUT;
    }
    if events & SLIRP_POLL_PRI != 0 {
        poll_events |= libc::POLLPRI;
    }
    if events & SLIRP_POLL_ERR != 0 {
        poll_events |= libc::POLLERR;
    }
    if events & SLIRP_POLL_HUP != 0 {
        poll_events |= libc::POLLHUP;
    }
    fds.push(libc::pollfd {
        fd,
        events: poll_events,
        revents: 0,
    });
    c_int::try_from(fds.len() - 1).unwrap_or(-1)
}

unsafe extern "C" fn cb_get_revents(idx: c_int, opaque: *mut c_void) -> c_int {
    if opaque.is_null() {
        return 0;
    }
    // SAFETY: opaque is the `&Vec<pollfd>` passed to slirp_pollfds_poll for this call.
    let fds = unsafe { &*(opaque as *const Vec<libc::pollfd>) };
    let Some(entry) = usize::try_from(idx).ok().and_then(|i| fds.get(i)) else {
        return 0;
    };
    let mut events = 0;
    if entry.revents & libc::POLLIN != 0 {
        events |= SLIRP_POLL_IN;
    }
    if entry.revents & libc::POLLOUT != 0 {
        events |= SLIRP_POLL_OUT;
    }
    if entry.revents & libc::POLLPRI != 0 {
        events |= SLIRP_POLL_PRI;
    }
    if entry.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
        events |= SLIRP_POLL_ERR;
    }
    if entry.revents & libc::POLLHUP != 0 {
        events |= SLIRP_POLL_HUP;
    }
    events
}

static CALLBACKS: SlirpCb = SlirpCb {
    send_packet: Some(cb_send_packet),
    guest_error: Some(cb_guest_error),
    clock_get_ns: Some(cb_clock_get_ns),
    timer_new: Some(cb_timer_new),
    timer_free: Some(cb_timer_free),
    timer_mod: Some(cb_timer_mod),
    register_poll_fd: Some(cb_register_poll_fd),
    unregister_poll_fd: Some(cb_unregister_poll_fd),
    notify: Some(cb_notify),
    init_completed: None,
    timer_new_opaque: Some(cb_timer_new_opaque),
};

// SAFETY: SlirpCb holds only function pointers (no interior mutability, nothing
// thread-bound); libslirp only reads it.
unsafe impl Sync for SlirpCb {}

/// One libslirp instance and its callback state. `!Send`: it stays on the thread that made it.
pub(super) struct SlirpWire {
    slirp: *mut Slirp,
    state: *mut CallbackState,
}

impl SlirpWire {
    /// Creates the stack and installs the host forwards. Call on the backend thread.
    pub(super) fn new(config: &NatConfig) -> Result<Self, NetError> {
        let boot_file = match &config.boot_file {
            Some(name) => {
                if name.len() > MAX_BOOT_FILE_LEN {
                    return Err(NetError::BootFile {
                        name: name.clone(),
                        reason: format!("longer than {MAX_BOOT_FILE_LEN} bytes"),
                    });
                }
                Some(CString::new(name.as_str()).map_err(|_| NetError::BootFile {
                    name: name.clone(),
                    reason: "contains a NUL character".into(),
                })?)
            }
            None => None,
        };
        let version = libslirp_version();
        let cfg = SlirpConfig {
            version: config_version(&version),
            restricted: 0,
            in_enabled: true,
            vnetwork: in_addr(NETWORK),
            vnetmask: in_addr(NETMASK),
            vhost: in_addr(GATEWAY),
            in6_enabled: config.ipv6,
            vprefix_addr6: in6_addr(std::net::Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0)),
            vprefix_len: 64,
            vhost6: in6_addr(std::net::Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 2)),
            vhostname: std::ptr::null(),
            tftp_server_name: std::ptr::null(),
            tftp_path: std::ptr::null(),
            bootfile: boot_file.as_ref().map_or(std::ptr::null(), |b| b.as_ptr()),
            vdhcp_start: in_addr(GUEST),
            vnameserver: in_addr(DNS),
            vnameserver6: in6_addr(std::net::Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 3)),
            vdnssearch: std::ptr::null_mut(),
            vdomainname: std::ptr::null(),
            if_mtu: 0,
            if_mru: 0,
            disable_host_loopback: false,
            enable_emu: false,
            outbound_addr: std::ptr::null_mut(),
            outbound_addr6: std::ptr::null_mut(),
            disable_dns: false,
            disable_dhcp: false,
        };
        let state = Box::into_raw(Box::new(CallbackState {
            start: Instant::now(),
            to_guest: Vec::new(),
            timers: Vec::new(),
        }));
        // SAFETY: cfg and CALLBACKS are valid for the call (libslirp copies the strings it
        // keeps); `state` is a live heap object that outlives the instance (freed in Drop
        // after slirp_cleanup).
        let slirp = unsafe { slirp_new(&cfg, &CALLBACKS, state as *mut c_void) };
        if slirp.is_null() {
            // SAFETY: slirp_new failed, so nothing else holds `state`; it came from
            // Box::into_raw above.
            let state = unsafe { Box::from_raw(state) };
            free_timers(&state.timers);
            return Err(NetError::Nat(format!(
                "libslirp {version} refused the network configuration"
            )));
        }
        let mut wire = SlirpWire { slirp, state };
        for forward in &config.forwards {
            wire.add_forward(forward)?;
        }
        Ok(wire)
    }

    fn add_forward(&mut self, forward: &crate::config::PortForward) -> Result<(), NetError> {
        let error = |reason: String| NetError::Forward {
            protocol: forward.protocol.clone(),
            address: forward.host_address.clone(),
            port: forward.host_port,
            reason,
        };
        let is_udp = match forward.protocol.as_str() {
            "tcp" => 0,
            "udp" => 1,
            other => return Err(error(format!("\"{other}\" is not tcp or udp"))),
        };
        let host: Ipv4Addr = match forward.host_address.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => v4,
            Ok(std::net::IpAddr::V6(_)) => {
                return Err(error(
                    "only IPv4 host addresses can be forwarded (use 127.0.0.1 or 0.0.0.0)".into(),
                ))
            }
            Err(_) => return Err(error("not an IP address".into())),
        };
        if forward.guest_port == 0 {
            return Err(error("the guest port must not be 0".into()));
        }
        // SAFETY: self.slirp is a live instance used on this thread only; the call does not
        // keep pointers to its arguments.
        let result = unsafe {
            slirp_add_hostfwd(
                self.slirp,
                is_udp,
                in_addr(host),
                c_int::from(forward.host_port),
                in_addr(GUEST),
                c_int::from(forward.guest_port),
            )
        };
        if result < 0 {
            let os = std::io::Error::last_os_error();
            let reason = match os.raw_os_error() {
                Some(libc::EADDRINUSE) => format!("the port is already in use ({os})"),
                Some(libc::EACCES) => {
                    format!("not allowed to listen there (ports below 1024 need privileges: {os})")
                }
                Some(libc::EADDRNOTAVAIL) => {
                    format!("the address is not one of this host's ({os})")
                }
                Some(0) | None => "libslirp could not listen on it".into(),
                Some(_) => os.to_string(),
            };
            return Err(error(reason));
        }
        Ok(())
    }

    fn state(&mut self) -> &mut CallbackState {
        // SAFETY: `state` is live for self's lifetime; no libslirp call is in progress while
        // this reference exists (it is only taken between calls, on this thread).
        unsafe { &mut *self.state }
    }

    fn drain_to_guest(&mut self, to_guest: &mut Vec<Vec<u8>>) {
        to_guest.append(&mut self.state().to_guest);
    }

    /// Runs the timers whose time has come.
    fn fire_timers(&mut self) {
        let now_ms = self.state().now_ns() / 1_000_000;
        let due: Vec<*mut Timer> = self
            .state()
            .timers
            .iter()
            .copied()
            // SAFETY: listed timers are live boxes owned by the state.
            .filter(|t| unsafe { (**t).expire_ms }.is_some_and(|e| e <= now_ms))
            .collect();
        for timer in due {
            // A timer may have been freed by an earlier one's handler.
            if !self.state().timers.contains(&timer) {
                continue;
            }
            // SAFETY: still listed, so live; the reference ends before the call below.
            let kind = unsafe {
                (*timer).expire_ms = None;
                match &(*timer).kind {
                    TimerKind::Callback { cb, cb_opaque } => TimerKind::Callback {
                        cb: *cb,
                        cb_opaque: *cb_opaque,
                    },
                    TimerKind::Opaque { id, cb_opaque } => TimerKind::Opaque {
                        id: *id,
                        cb_opaque: *cb_opaque,
                    },
                }
            };
            match kind {
                TimerKind::Callback {
                    cb: Some(cb),
                    cb_opaque,
                } => {
                    // SAFETY: libslirp's own timer callback with the opaque it registered.
                    unsafe { cb(cb_opaque) }
                }
                TimerKind::Callback { cb: None, .. } => {}
                TimerKind::Opaque { id, cb_opaque } => {
                    // SAFETY: live instance, this thread; id and opaque are what libslirp gave.
                    unsafe { slirp_handle_timer(self.slirp, id, cb_opaque) }
                }
            }
        }
    }

    /// Milliseconds until the earliest armed timer (0 if overdue).
    fn next_timer_ms(&mut self) -> Option<u64> {
        let now_ms = self.state().now_ns() / 1_000_000;
        self.state()
            .timers
            .iter()
            // SAFETY: listed timers are live boxes owned by the state.
            .filter_map(|t| unsafe { (**t).expire_ms })
            .min()
            .map(|e| u64::try_from(e.saturating_sub(now_ms)).unwrap_or(0))
    }
}

fn free_timers(timers: &[*mut Timer]) {
    for timer in timers {
        // SAFETY: every listed pointer came from Box::into_raw and is freed only here or
        // in cb_timer_free (which unlists it first).
        drop(unsafe { Box::from_raw(*timer) });
    }
}

impl Wire for SlirpWire {
    fn transmit(&mut self, frame: &[u8], to_guest: &mut Vec<Vec<u8>>) {
        let Ok(len) = c_int::try_from(frame.len()) else {
            return;
        };
        // SAFETY: live instance on this thread; the frame is readable for `len` bytes for
        // the duration of the call (libslirp copies it).
        unsafe { slirp_input(self.slirp, frame.as_ptr(), len) };
        self.drain_to_guest(to_guest);
    }

    fn prepare(&mut self, fds: &mut Vec<libc::pollfd>, timeout_ms: &mut u64) {
        let mut timeout = u32::try_from(*timeout_ms).unwrap_or(u32::MAX);
        // SAFETY: live instance on this thread; `fds` is the poll set the add_poll
        // callback appends to, valid for the duration of the call.
        unsafe {
            slirp_pollfds_fill(
                self.slirp,
                &mut timeout,
                cb_add_poll,
                fds as *mut Vec<libc::pollfd> as *mut c_void,
            )
        };
        *timeout_ms = (*timeout_ms).min(u64::from(timeout));
        if let Some(timer) = self.next_timer_ms() {
            *timeout_ms = (*timeout_ms).min(timer);
        }
    }

    fn dispatch(&mut self, fds: &[libc::pollfd], poll_failed: bool, to_guest: &mut Vec<Vec<u8>>) {
        let fds: Vec<libc::pollfd> = fds.to_vec();
        // SAFETY: live instance on this thread; `fds` is the poll set filled by prepare
        // (indices returned by cb_add_poll refer to it), valid for the call.
        unsafe {
            slirp_pollfds_poll(
                self.slirp,
                c_int::from(poll_failed),
                cb_get_revents,
                &fds as *const Vec<libc::pollfd> as *mut c_void,
            )
        };
        self.fire_timers();
        self.drain_to_guest(to_guest);
    }
}

impl Drop for SlirpWire {
    fn drop(&mut self) {
        // SAFETY: the instance is live and used by nobody else; libslirp may call
        // timer_free on our state during cleanup, which is still live here.
        unsafe { slirp_cleanup(self.slirp) };
        // SAFETY: libslirp no longer refers to the state; it came from Box::into_raw.
        let state = unsafe { Box::from_raw(self.state) };
        free_timers(&state.timers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_version_follows_libslirp_version() {
        assert_eq!(config_version("4.7.0"), 4);
        assert_eq!(config_version("4.8.1"), 4);
        assert_eq!(config_version("5.0"), 4);
        assert_eq!(config_version("4.6.1"), 3);
        assert_eq!(config_version("garbage"), 3);
    }

    #[test]
    fn links_against_libslirp_4() {
        assert!(
            libslirp_version().starts_with('4'),
            "{}",
            libslirp_version()
        );
    }

    #[test]
    fn boot_file_too_long_or_with_nul_is_refused() {
        let config = NatConfig {
            boot_file: Some("x".repeat(MAX_BOOT_FILE_LEN + 1)),
            ..NatConfig::default()
        };
        assert!(matches!(
            SlirpWire::new(&config),
            Err(NetError::BootFile { .. })
        ));
        let config = NatConfig {
            boot_file: Some("a\0b".into()),
            ..NatConfig::default()
        };
        assert!(matches!(
            SlirpWire::new(&config),
            Err(NetError::BootFile { .. })
        ));
        let config = NatConfig {
            boot_file: Some("x".repeat(MAX_BOOT_FILE_LEN)),
            ..NatConfig::default()
        };
        assert!(SlirpWire::new(&config).is_ok());
    }

    #[test]
    fn bad_forwards_are_refused_with_the_address() {
        for (protocol, address, guest_port) in [
            ("sctp", "127.0.0.1", 22),
            ("tcp", "::1", 22),
            ("tcp", "not-an-ip", 22),
            ("tcp", "127.0.0.1", 0),
        ] {
            let config = NatConfig {
                forwards: vec![crate::config::PortForward {
                    protocol: protocol.into(),
                    host_address: address.into(),
                    host_port: 0,
                    guest_port,
                }],
                ..NatConfig::default()
            };
            match SlirpWire::new(&config) {
                Err(NetError::Forward { address: a, .. }) => assert_eq!(a, address),
                Err(other) => panic!("unexpected error {other}"),
                Ok(_) => panic!("{protocol} {address} accepted"),
            }
        }
    }

    #[test]
    fn garbage_input_does_not_break_the_stack() {
        let mut wire = SlirpWire::new(&NatConfig::default()).unwrap();
        let mut out = Vec::new();
        let mut rng = 0x1234_5678u32;
        for len in 0..200usize {
            let mut frame: Vec<u8> = (0..len)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 17;
                    rng ^= rng << 5;
                    rng as u8
                })
                .collect();
            if len > 14 {
                // IPv4, ARP, IPv6 alternately, so the parsers behind them see garbage.
                let ethertype: [u8; 2] = match len % 3 {
                    0 => [0x08, 0x00],
                    1 => [0x08, 0x06],
                    _ => [0x86, 0xdd],
                };
                frame[12..14].copy_from_slice(&ethertype);
                if len % 3 == 0 {
                    frame[14] = 0x45;
                }
            }
            wire.transmit(&frame, &mut out);
        }
        let mut fds = Vec::new();
        let mut timeout = 0;
        wire.prepare(&mut fds, &mut timeout);
        wire.dispatch(&fds, false, &mut out);
    }
}
