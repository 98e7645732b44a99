//! Interrupt lines as devices see them.
//!
//! The engine implements [`IrqLine`] with KVM's in-kernel interrupt controllers; tests use
//! [`CountingIrq`], which records levels and counts rising edges.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// One interrupt input of the interrupt controllers.
pub trait IrqLine: Send + Sync {
    /// Drives the line high (`true`) or low.
    fn set_level(&self, high: bool);
    /// An edge: high then low (ISA edge-triggered interrupts).
    fn pulse(&self) {
        self.set_level(true);
        self.set_level(false);
    }
}

/// A line that goes nowhere, for devices whose interrupt is not wired.
pub struct NoIrq;
impl IrqLine for NoIrq {
    fn set_level(&self, _high: bool) {}
}

/// A fake line for tests: the current level and the number of rising edges.
#[derive(Default)]
pub struct CountingIrq {
    level: AtomicBool,
    raised: AtomicU64,
}

impl CountingIrq {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub fn level(&self) -> bool {
        self.level.load(Ordering::SeqCst)
    }
    /// Rising edges seen so far.
    pub fn count(&self) -> u64 {
        self.raised.load(Ordering::SeqCst)
    }
}

impl IrqLine for CountingIrq {
    fn set_level(&self, high: bool) {
        let was = self.level.swap(high, Ordering::SeqCst);
        if high && !was {
            self.raised.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn counting_irq_counts_rising_edges_only() {
        let irq = CountingIrq::new();
        irq.set_level(true);
        irq.set_level(true);
        assert!(irq.level());
        irq.set_level(false);
        irq.pulse();
        assert_eq!(irq.count(), 2);
        assert!(!irq.level());
    }
}
