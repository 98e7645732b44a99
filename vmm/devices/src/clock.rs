//! Time as devices see it, and the timer contract between devices and the engine.
//!
//! Devices never sleep or spawn threads. A device with timed behaviour reports its next
//! deadline on the monotonic clock and the engine's I/O thread calls it back then.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A source of monotonic and wall-clock time.
pub trait Clock: Send + Sync {
    /// Nanoseconds on a monotonic clock (origin arbitrary but fixed).
    fn monotonic_ns(&self) -> u64;
    /// Wall-clock time as nanoseconds since the Unix epoch (UTC).
    fn unix_time_ns(&self) -> i128;
}

/// The host's clocks.
pub struct HostClock {
    origin: Instant,
}

impl HostClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
        })
    }
}

impl Clock for HostClock {
    fn monotonic_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
    fn unix_time_ns(&self) -> i128 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        }
    }
}

/// A clock that moves only when told to, for tests.
pub struct ManualClock {
    mono: AtomicU64,
    unix_base_ns: i128,
}

impl ManualClock {
    /// Starts at monotonic 0 and at `unix_seconds` wall time.
    pub fn new(unix_seconds: i64) -> Arc<Self> {
        Arc::new(Self {
            mono: AtomicU64::new(0),
            unix_base_ns: unix_seconds as i128 * 1_000_000_000,
        })
    }
    pub fn advance_ns(&self, ns: u64) {
        self.mono.fetch_add(ns, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn monotonic_ns(&self) -> u64 {
        self.mono.load(Ordering::SeqCst)
    }
    fn unix_time_ns(&self) -> i128 {
        self.unix_base_ns + self.mono.load(Ordering::SeqCst) as i128
    }
}

/// A device with timed behaviour (RTC periodic interrupt, UHCI frames, display refresh).
pub trait Timed: Send {
    /// The next monotonic time (`Clock::monotonic_ns`) at which `on_timer` must run.
    fn next_deadline_ns(&self) -> Option<u64>;
    /// Called by the engine at or after the deadline.
    fn on_timer(&mut self, now_ns: u64);
}
