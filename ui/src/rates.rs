//! Rate arithmetic for the performance graphs: per-second rates and CPU percentages from
//! two snapshots of cumulative counters, and a fixed-length rolling history of samples.
//!
//! Counters that go backwards (the VM restarted and its counters began again) give a rate
//! of zero for that interval rather than a huge number; a zero interval gives no rate.

use std::collections::VecDeque;

/// Events per second between two readings of a cumulative counter `elapsed_ns` apart.
/// `None` when no time passed; zero when the counter went backwards (a restart).
pub fn rate_per_second(previous: u64, current: u64, elapsed_ns: u64) -> Option<f64> {
    if elapsed_ns == 0 {
        return None;
    }
    let delta = current.saturating_sub(previous);
    Some(delta as f64 * 1e9 / elapsed_ns as f64)
}

/// CPU use in percent of one CPU (100 = one CPU fully busy) from cumulative CPU time.
pub fn cpu_percent(previous_cpu_ns: u64, current_cpu_ns: u64, elapsed_ns: u64) -> Option<f64> {
    rate_per_second(previous_cpu_ns, current_cpu_ns, elapsed_ns).map(|r| r / 1e9 * 100.0)
}

/// Per-second rates of each element of two counter vectors; counters that appeared since
/// the previous reading count from zero.
pub fn rates_per_second(previous: &[u64], current: &[u64], elapsed_ns: u64) -> Vec<f64> {
    current
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rate_per_second(previous.get(i).copied().unwrap_or(0), *c, elapsed_ns).unwrap_or(0.0)
        })
        .collect()
}

/// The share of `part` in `total` in percent, 0 when total is 0.
pub fn percent_of(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        part as f64 * 100.0 / total as f64
    }
}

/// A rolling history of the last `capacity` samples, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    samples: VecDeque<f64>,
    capacity: usize,
}

impl History {
    /// A history of at most `capacity` samples (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            samples: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Adds a sample, dropping the oldest when full; non-finite samples are stored as 0.
    pub fn push(&mut self, value: f64) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples
            .push_back(if value.is_finite() { value } else { 0.0 });
    }

    pub fn samples(&self) -> impl ExactSizeIterator<Item = f64> + '_ {
        self.samples.iter().copied()
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn latest(&self) -> Option<f64> {
        self.samples.back().copied()
    }

    pub fn max(&self) -> f64 {
        self.samples.iter().copied().fold(0.0, f64::max)
    }

    /// Changes the capacity, keeping the newest samples.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
        while self.samples.len() > self.capacity {
            self.samples.pop_front();
        }
    }

    pub fn clear(&mut self) {
        self.samples.clear();
    }
}

/// A "nice" axis maximum at or above `value`: 1, 2 or 5 times a power of ten, at least
/// `floor` (so an idle graph keeps a sensible scale).
pub fn nice_axis_max(value: f64, floor: f64) -> f64 {
    let v = if value.is_finite() {
        value.max(floor)
    } else {
        floor
    };
    if v <= 0.0 {
        return 1.0;
    }
    let exponent = v.log10().floor();
    let base = 10f64.powf(exponent);
    for step in [1.0, 2.0, 5.0, 10.0] {
        if v <= step * base * (1.0 + 1e-9) {
            return step * base;
        }
    }
    10.0 * base
}

/// Human text for a byte count: "512 B", "1.5 KiB", "3.0 GiB".
pub fn format_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = if bytes.is_finite() {
        bytes.max(0.0)
    } else {
        0.0
    };
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", UNITS[0])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_from_counters() {
        assert_eq!(rate_per_second(100, 600, 500_000_000), Some(1000.0));
        assert_eq!(rate_per_second(5, 5, 1_000_000_000), Some(0.0));
        assert_eq!(rate_per_second(0, 10, 0), None);
        // A restart (counter went backwards) is zero, not a wrap-around.
        assert_eq!(rate_per_second(1000, 3, 1_000_000_000), Some(0.0));
        assert_eq!(rate_per_second(0, u64::MAX, 1), Some(u64::MAX as f64 * 1e9));
    }

    #[test]
    fn cpu_percent_of_one_cpu() {
        assert_eq!(cpu_percent(0, 500_000_000, 1_000_000_000), Some(50.0));
        assert_eq!(cpu_percent(0, 2_000_000_000, 1_000_000_000), Some(200.0));
        assert_eq!(cpu_percent(7, 7, 0), None);
        assert_eq!(percent_of(1, 4), 25.0);
        assert_eq!(percent_of(1, 0), 0.0);
    }

    #[test]
    fn vector_rates_tolerate_new_and_missing_counters() {
        let r = rates_per_second(&[10, 20], &[20, 20, 5], 1_000_000_000);
        assert_eq!(r, vec![10.0, 0.0, 5.0]);
        assert!(rates_per_second(&[1, 2, 3], &[], 1).is_empty());
        assert_eq!(rates_per_second(&[1], &[2], 0), vec![0.0]);
    }

    #[test]
    fn history_rolls_and_keeps_newest() {
        let mut h = History::new(3);
        assert!(h.is_empty());
        assert_eq!(h.max(), 0.0);
        for v in [1.0, 5.0, 2.0, 3.0] {
            h.push(v);
        }
        assert_eq!(h.samples().collect::<Vec<_>>(), vec![5.0, 2.0, 3.0]);
        assert_eq!(h.latest(), Some(3.0));
        assert_eq!(h.max(), 5.0);
        h.push(f64::NAN);
        assert_eq!(h.latest(), Some(0.0));
        h.set_capacity(1);
        assert_eq!(h.samples().collect::<Vec<_>>(), vec![0.0]);
        assert_eq!(History::new(0).capacity(), 1);
        h.clear();
        assert_eq!(h.len(), 0);
    }

    #[test]
    fn axis_maximum_is_nice() {
        assert_eq!(nice_axis_max(0.0, 10.0), 10.0);
        assert_eq!(nice_axis_max(11.0, 1.0), 20.0);
        assert_eq!(nice_axis_max(20.0, 1.0), 20.0);
        assert_eq!(nice_axis_max(201.0, 1.0), 500.0);
        assert_eq!(nice_axis_max(501.0, 1.0), 1000.0);
        assert_eq!(nice_axis_max(0.3, 0.0), 0.5);
        assert_eq!(nice_axis_max(f64::INFINITY, 100.0), 100.0);
        assert_eq!(nice_axis_max(-5.0, 0.0), 1.0);
    }

    #[test]
    fn bytes_are_readable() {
        assert_eq!(format_bytes(512.0), "512 B");
        assert_eq!(format_bytes(1536.0), "1.5 KiB");
        assert_eq!(format_bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
        assert_eq!(format_bytes(-1.0), "0 B");
    }
}
