//! The host's resources for the wizard and the performance page, read from /proc:
//! CPU count and busy time (`/proc/stat`), total and available memory (`/proc/meminfo`),
//! and this process's resident memory (`/proc/self/statm`). Parsers are pure and tested;
//! a missing or malformed file gives `None`, never a panic.

use super::wizard_model::HostResources;

/// Cumulative CPU time of the whole host, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

/// Parses the aggregate "cpu" line of /proc/stat.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    if values.len() < 4 {
        return None;
    }
    let total = values
        .iter()
        .take(8)
        .fold(0u64, |a, v| a.saturating_add(*v));
    // idle and iowait are not busy.
    let idle = values[3].saturating_add(values.get(4).copied().unwrap_or(0));
    Some(CpuTimes {
        busy: total.saturating_sub(idle),
        total,
    })
}

/// Host CPU use in percent of all CPUs between two readings.
pub fn host_cpu_percent(previous: CpuTimes, current: CpuTimes) -> f64 {
    let total = current.total.saturating_sub(previous.total);
    let busy = current.busy.saturating_sub(previous.busy);
    deskvm_ui::rates::percent_of(busy, total)
}

/// Memory sizes from /proc/meminfo, in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemInfo {
    pub total_mib: u64,
    pub available_mib: u64,
}

/// Parses MemTotal and MemAvailable (kB) from /proc/meminfo.
pub fn parse_meminfo(text: &str) -> Option<MemInfo> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    };
    let total_kib = field("MemTotal:")?;
    let available_kib = field("MemAvailable:").or_else(|| field("MemFree:"))?;
    Some(MemInfo {
        total_mib: total_kib / 1024,
        available_mib: available_kib / 1024,
    })
}

pub fn cpu_times() -> Option<CpuTimes> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

pub fn meminfo() -> Option<MemInfo> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// This process's resident memory in bytes (page size assumed 4 KiB).
pub fn process_rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(4096))
}

/// The host's CPUs and memory, as the wizard shows them.
pub fn resources() -> HostResources {
    let mem = meminfo().unwrap_or_default();
    HostResources {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        total_memory_mib: mem.total_mib,
        available_memory_mib: mem.available_mib,
    }
}

/// The GTK renderer to ask for, when the user did not choose one (`GSK_RENDERER`): Cairo on
/// a machine without a GPU. There GTK 4's GL renderer runs on Mesa's software rasterizer,
/// whose GLX path reports a back-buffer age of 0, so every change (a blinking text cursor)
/// redraws the whole window: 35–40 % of a core for an idle console here, against 4 % with
/// Cairo, which redraws only the changed tiles (see bench/README.md). "No GPU" means no DRM
/// render node and no NVIDIA device, or `LIBGL_ALWAYS_SOFTWARE` set.
pub fn preferred_gsk_renderer(
    gsk_renderer: Option<&std::ffi::OsStr>,
    libgl_always_software: Option<&std::ffi::OsStr>,
    dri_dir: &std::path::Path,
    nvidia_device: &std::path::Path,
) -> Option<&'static str> {
    if gsk_renderer.is_some() {
        return None;
    }
    let forced_software = libgl_always_software.is_some_and(|v| !v.is_empty() && v != "0");
    let has_render_node = std::fs::read_dir(dri_dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("renderD"))
    });
    (forced_software || !(has_render_node || nvidia_device.exists())).then_some("cairo")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat() {
        let text = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\nintr 5\n";
        let t = parse_proc_stat(text).unwrap();
        assert_eq!(
            t,
            CpuTimes {
                busy: 150,
                total: 1000
            }
        );
        let later = CpuTimes {
            busy: 250,
            total: 1400,
        };
        assert_eq!(host_cpu_percent(t, later), 25.0);
        assert_eq!(host_cpu_percent(later, t), 0.0);
        assert_eq!(parse_proc_stat("cpu0 1 2 3 4\n"), None);
        assert_eq!(parse_proc_stat("cpu  1 2\n"), None);
        assert_eq!(parse_proc_stat("cpu  1 x 3 4\n"), None);
        assert_eq!(parse_proc_stat(""), None);
    }

    #[test]
    fn meminfo_parsing() {
        let text = "MemTotal:       16384000 kB\nMemFree:  100 kB\nMemAvailable:    8192000 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some(MemInfo {
                total_mib: 16000,
                available_mib: 8000
            })
        );
        let old = "MemTotal: 2048 kB\nMemFree: 1024 kB\n";
        assert_eq!(parse_meminfo(old).unwrap().available_mib, 1);
        assert_eq!(parse_meminfo("MemTotal: lots\n"), None);
        assert_eq!(parse_meminfo(""), None);
    }

    #[test]
    fn this_host_has_resources() {
        let r = resources();
        assert!(r.cpus >= 1);
        assert!(r.total_memory_mib > 0);
        assert!(process_rss_bytes().unwrap() > 0);
    }

    #[test]
    fn cairo_only_without_a_gpu_and_never_over_the_users_choice() {
        use std::ffi::OsStr;
        let dir = tempfile::tempdir().unwrap();
        let dri = dir.path().join("dri");
        let nvidia = dir.path().join("nvidia0");
        // No /dev/dri at all: software GL, so Cairo.
        assert_eq!(
            preferred_gsk_renderer(None, None, &dri, &nvidia),
            Some("cairo")
        );
        // A card node without a render node is still no GPU for GL.
        std::fs::create_dir(&dri).unwrap();
        std::fs::write(dri.join("card0"), b"").unwrap();
        assert_eq!(
            preferred_gsk_renderer(None, None, &dri, &nvidia),
            Some("cairo")
        );
        // A render node: GTK's own choice.
        std::fs::write(dri.join("renderD128"), b"").unwrap();
        assert_eq!(preferred_gsk_renderer(None, None, &dri, &nvidia), None);
        // ...unless software GL is forced.
        let one = Some(OsStr::new("1"));
        assert_eq!(
            preferred_gsk_renderer(None, one, &dri, &nvidia),
            Some("cairo")
        );
        assert_eq!(
            preferred_gsk_renderer(None, Some(OsStr::new("0")), &dri, &nvidia),
            None
        );
        // The user's GSK_RENDERER always wins.
        assert_eq!(
            preferred_gsk_renderer(Some(OsStr::new("gl")), one, &dri, &nvidia),
            None
        );
        // NVIDIA's proprietary driver has no render node in some set-ups.
        std::fs::remove_file(dri.join("renderD128")).unwrap();
        std::fs::write(&nvidia, b"").unwrap();
        assert_eq!(preferred_gsk_renderer(None, None, &dri, &nvidia), None);
    }
}
