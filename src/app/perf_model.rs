//! Performance numbers from two `VmStats` snapshots: total and per-vCPU CPU use, exits per
//! second by reason, interrupts per second, disk and network bytes per second, screen
//! updates per second and the guest RAM the host backs. The interval is the difference of the
//! snapshots' uptimes, so no wall clock is needed. Pure; fed to the graphs by the app.

use deskvm_ui::rates::{cpu_percent, rate_per_second};
use vmm::{ExitStats, VmStats};

/// Exit reasons in graph order.
pub const EXIT_REASONS: [&str; 6] = [
    "port I/O",
    "MMIO",
    "HLT",
    "interrupted",
    "shutdown",
    "other",
];

fn exit_counts(e: &ExitStats) -> [u64; 6] {
    [
        e.io_in + e.io_out,
        e.mmio_read + e.mmio_write,
        e.hlt,
        e.interrupted,
        e.shutdown,
        e.other,
    ]
}

/// One sample for the graphs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PerfSample {
    /// Sum over vCPUs, in percent of one CPU.
    pub cpu_total: f64,
    /// Mean over vCPUs (0..=100): what the library's sparkline shows.
    pub cpu_mean: f64,
    pub cpu_per_vcpu: Vec<f64>,
    pub exits_per_second: [f64; 6],
    pub interrupts_per_second: f64,
    /// Summed over all disks, bytes per second.
    pub disk_read_bps: f64,
    pub disk_write_bps: f64,
    /// Summed over all network cards, bytes per second.
    pub net_rx_bps: f64,
    pub net_tx_bps: f64,
    /// Screen updates per second.
    pub display_fps: f64,
    /// Guest RAM the host has backed, in bytes.
    pub memory_resident_bytes: u64,
}

/// The sample between two snapshots; `None` when no time passed or the VM restarted
/// (uptime went backwards).
pub fn sample(previous: &VmStats, current: &VmStats) -> Option<PerfSample> {
    let elapsed = current.uptime_ns.checked_sub(previous.uptime_ns)?;
    if elapsed == 0 {
        return None;
    }
    let cpu_per_vcpu: Vec<f64> = current
        .vcpus
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let before = previous.vcpus.get(i).map(|p| p.cpu_time_ns).unwrap_or(0);
            cpu_percent(before, v.cpu_time_ns, elapsed).unwrap_or(0.0)
        })
        .collect();
    let cpu_total: f64 = cpu_per_vcpu.iter().sum();
    let cpu_mean = if cpu_per_vcpu.is_empty() {
        0.0
    } else {
        (cpu_total / cpu_per_vcpu.len() as f64).min(100.0)
    };
    let sum_exits = |s: &VmStats| {
        s.vcpus.iter().fold([0u64; 6], |mut acc, v| {
            for (a, c) in acc.iter_mut().zip(exit_counts(&v.exits)) {
                *a = a.saturating_add(c);
            }
            acc
        })
    };
    let (before, after) = (sum_exits(previous), sum_exits(current));
    let mut exits_per_second = [0.0; 6];
    for (i, rate) in exits_per_second.iter_mut().enumerate() {
        *rate = rate_per_second(before[i], after[i], elapsed).unwrap_or(0.0);
    }
    let sum = |v: &mut dyn Iterator<Item = u64>| v.fold(0u64, |a, b| a.saturating_add(b));
    let rate = |before: u64, after: u64| rate_per_second(before, after, elapsed).unwrap_or(0.0);
    let disk_read_bps = rate(
        sum(&mut previous.disks.iter().map(|d| d.read_bytes)),
        sum(&mut current.disks.iter().map(|d| d.read_bytes)),
    );
    let disk_write_bps = rate(
        sum(&mut previous.disks.iter().map(|d| d.write_bytes)),
        sum(&mut current.disks.iter().map(|d| d.write_bytes)),
    );
    let net_rx_bps = rate(
        sum(&mut previous.nics.iter().map(|n| n.rx_bytes)),
        sum(&mut current.nics.iter().map(|n| n.rx_bytes)),
    );
    let net_tx_bps = rate(
        sum(&mut previous.nics.iter().map(|n| n.tx_bytes)),
        sum(&mut current.nics.iter().map(|n| n.tx_bytes)),
    );
    let display_fps = rate(previous.display_frames, current.display_frames);
    let irq = |s: &VmStats| s.interrupts.iter().fold(0u64, |a, v| a.saturating_add(*v));
    Some(PerfSample {
        cpu_total,
        cpu_mean,
        cpu_per_vcpu,
        exits_per_second,
        interrupts_per_second: rate_per_second(irq(previous), irq(current), elapsed).unwrap_or(0.0),
        disk_read_bps,
        disk_write_bps,
        net_rx_bps,
        net_tx_bps,
        display_fps,
        memory_resident_bytes: current.memory_resident_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::{DiskStats, NicStats, VcpuStats};

    fn stats(uptime_ns: u64, cpu: &[u64], hlt: u64, irq: u64) -> VmStats {
        VmStats {
            uptime_ns,
            vcpus: cpu
                .iter()
                .map(|c| VcpuStats {
                    cpu_time_ns: *c,
                    exits: ExitStats {
                        hlt,
                        io_in: 1,
                        ..ExitStats::default()
                    },
                })
                .collect(),
            interrupts: vec![irq, 1],
            display_frames: uptime_ns / 100_000_000,
            disks: vec![DiskStats {
                read_bytes: irq * 512,
                ..DiskStats::default()
            }],
            nics: vec![NicStats {
                tx_bytes: irq,
                ..NicStats::default()
            }],
            memory_resident_bytes: 1 << 20,
            ..VmStats::default()
        }
    }

    #[test]
    fn cpu_exits_and_interrupts() {
        let a = stats(1_000_000_000, &[0, 0], 10, 100);
        let b = stats(2_000_000_000, &[500_000_000, 1_000_000_000], 60, 1100);
        let s = sample(&a, &b).unwrap();
        assert_eq!(s.cpu_per_vcpu, vec![50.0, 100.0]);
        assert_eq!(s.cpu_total, 150.0);
        assert_eq!(s.cpu_mean, 75.0);
        assert_eq!(
            s.exits_per_second[2], 100.0,
            "50 HLT exits on each of 2 vCPUs"
        );
        assert_eq!(s.exits_per_second[0], 0.0);
        assert_eq!(s.interrupts_per_second, 1000.0);
        assert_eq!(s.disk_read_bps, 512_000.0);
        assert_eq!(s.disk_write_bps, 0.0);
        assert_eq!(s.net_tx_bps, 1000.0);
        assert_eq!(s.display_fps, 10.0);
        assert_eq!(s.memory_resident_bytes, 1 << 20);
    }

    #[test]
    fn restarts_and_empty_intervals_give_no_sample() {
        let a = stats(2_000_000_000, &[5], 0, 0);
        let b = stats(1_000_000_000, &[1], 0, 0);
        assert_eq!(sample(&a, &b), None);
        assert_eq!(sample(&a, &a), None);
        // A vCPU that appeared counts from zero; none at all is zero.
        let c = stats(3_000_000_000, &[5, 1_000_000_000], 0, 0);
        assert_eq!(sample(&a, &c).unwrap().cpu_per_vcpu[1], 100.0);
        let empty = VmStats {
            uptime_ns: 5,
            ..VmStats::default()
        };
        assert_eq!(sample(&VmStats::default(), &empty).unwrap().cpu_mean, 0.0);
    }
}
