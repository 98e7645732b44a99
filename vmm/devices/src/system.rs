//! Requests that devices make of the machine as a whole (reset, power off).

use std::sync::atomic::{AtomicU32, Ordering};

/// Implemented by the engine; devices hold an `Arc<dyn SystemControl>`.
pub trait SystemControl: Send + Sync {
    /// The guest asked for a system reset (0xcf9, port 0x92 bit 0, i8042 command 0xfe).
    fn request_reset(&self);
    /// The guest asked to power off (ACPI S5).
    fn request_poweroff(&self);
}

/// A recorder for tests.
#[derive(Default)]
pub struct RecordingControl {
    pub resets: AtomicU32,
    pub poweroffs: AtomicU32,
}

impl RecordingControl {
    pub fn resets(&self) -> u32 {
        self.resets.load(Ordering::SeqCst)
    }
    pub fn poweroffs(&self) -> u32 {
        self.poweroffs.load(Ordering::SeqCst)
    }
}

impl SystemControl for RecordingControl {
    fn request_reset(&self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
    }
    fn request_poweroff(&self) {
        self.poweroffs.fetch_add(1, Ordering::SeqCst);
    }
}
