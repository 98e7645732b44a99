//! The performance page: rolling graphs of the open VM's CPU use (total and per vCPU),
//! VM exits per second by reason, interrupts per second, and the host's CPU and memory use
//! and the app's resident memory (from /proc). Disk, network and display counters join when
//! the engine's statistics have them.

use std::cell::Cell;
use std::rc::Rc;

use adw::prelude::*;
use deskvm_ui::rates::{format_bytes, percent_of};
use deskvm_ui::LineGraph;
use vmm::VmStats;

use super::host::{self, CpuTimes};
use super::i18n::tr;
use super::perf_model::{PerfSample, EXIT_REASONS};

pub struct PerfPage {
    pub root: gtk::ScrolledWindow,
    cpu: LineGraph,
    exits: LineGraph,
    interrupts: LineGraph,
    host_graph: LineGraph,
    memory: LineGraph,
    io: LineGraph,
    network: LineGraph,
    display: LineGraph,
    last_host: Cell<Option<CpuTimes>>,
}

fn percent() -> Rc<dyn Fn(f64) -> String> {
    Rc::new(|v| format!("{v:.0} %"))
}

fn per_second() -> Rc<dyn Fn(f64) -> String> {
    Rc::new(|v| {
        if v >= 1e6 {
            format!("{:.1} M/s", v / 1e6)
        } else if v >= 1e3 {
            format!("{:.1} k/s", v / 1e3)
        } else {
            format!("{v:.0}/s")
        }
    })
}

impl PerfPage {
    pub fn new(history: usize) -> Self {
        let cpu = LineGraph::new(&tr("CPU"), history, 100.0);
        cpu.add_series(&tr("Total"));
        cpu.set_formatter(percent());
        let exits = LineGraph::new(&tr("Exits per second"), history, 10.0);
        for r in EXIT_REASONS {
            exits.add_series(&tr(r));
        }
        exits.set_formatter(per_second());
        let interrupts = LineGraph::new(&tr("Interrupts per second"), history, 10.0);
        interrupts.add_series(&tr("All"));
        interrupts.set_formatter(per_second());
        let host_graph = LineGraph::new(&tr("This computer"), history, 100.0);
        host_graph.add_series(&tr("CPU"));
        host_graph.add_series(&tr("Memory"));
        host_graph.set_fixed_max(Some(100.0));
        host_graph.set_formatter(percent());
        let memory = LineGraph::new(&tr("Memory"), history, 64.0 * 1024.0 * 1024.0);
        memory.add_series(&tr("DeskVM (resident)"));
        memory.add_series(&tr("Guest RAM in use"));
        memory.set_formatter(Rc::new(format_bytes));
        let bytes_per_second: Rc<dyn Fn(f64) -> String> =
            Rc::new(|v| format!("{}/s", format_bytes(v)));
        let io = LineGraph::new(&tr("Disks"), history, 1024.0 * 1024.0);
        io.add_series(&tr("Read"));
        io.add_series(&tr("Written"));
        io.set_formatter(bytes_per_second.clone());
        let network = LineGraph::new(&tr("Network"), history, 1024.0 * 1024.0);
        network.add_series(&tr("Received"));
        network.add_series(&tr("Sent"));
        network.set_formatter(bytes_per_second);
        let display = LineGraph::new(&tr("Screen updates per second"), history, 10.0);
        display.add_series(&tr("Frames"));
        display.set_formatter(per_second());

        let column = gtk::Box::new(gtk::Orientation::Vertical, 18);
        column.set_margin_top(18);
        column.set_margin_bottom(18);
        column.set_margin_start(12);
        column.set_margin_end(12);
        for g in [
            &cpu,
            &exits,
            &interrupts,
            &io,
            &network,
            &display,
            &memory,
            &host_graph,
        ] {
            let frame = gtk::Frame::new(None);
            frame.add_css_class("view");
            g.widget().set_margin_top(8);
            g.widget().set_margin_bottom(8);
            g.widget().set_margin_start(8);
            g.widget().set_margin_end(8);
            frame.set_child(Some(g.widget()));
            column.append(&frame);
        }
        let clamp = adw::Clamp::builder()
            .maximum_size(1000)
            .child(&column)
            .build();
        let root = gtk::ScrolledWindow::builder()
            .hscrollbar_policy(gtk::PolicyType::Never)
            .child(&clamp)
            .build();
        Self {
            root,
            cpu,
            exits,
            interrupts,
            host_graph,
            memory,
            io,
            network,
            display,
            last_host: Cell::new(None),
        }
    }

    pub fn clear(&self) {
        for g in [
            &self.cpu,
            &self.exits,
            &self.interrupts,
            &self.host_graph,
            &self.memory,
        ] {
            g.clear();
        }
    }

    /// Adds one sample of the VM (none while it is off) and of the host.
    pub fn add(&self, sample: Option<&PerfSample>, _stats: &VmStats, host_now: Option<CpuTimes>) {
        let s = sample.cloned().unwrap_or_default();
        self.cpu.ensure_series(1 + s.cpu_per_vcpu.len(), |i| {
            format!("vCPU {}", i.saturating_sub(1))
        });
        self.cpu.push(0, s.cpu_total);
        for (i, v) in s.cpu_per_vcpu.iter().enumerate() {
            self.cpu.push(i + 1, *v);
        }
        for (i, v) in s.exits_per_second.iter().enumerate() {
            self.exits.push(i, *v);
        }
        self.interrupts.push(0, s.interrupts_per_second);
        self.io.push(0, s.disk_read_bps);
        self.io.push(1, s.disk_write_bps);
        self.network.push(0, s.net_rx_bps);
        self.network.push(1, s.net_tx_bps);
        self.display.push(0, s.display_fps);
        self.memory.push(1, s.memory_resident_bytes as f64);
        if let (Some(prev), Some(now)) = (self.last_host.get(), host_now) {
            self.host_graph.push(0, host::host_cpu_percent(prev, now));
        }
        self.last_host.set(host_now);
        if let Some(m) = host::meminfo() {
            let used = m.total_mib.saturating_sub(m.available_mib);
            self.host_graph.push(1, percent_of(used, m.total_mib));
        }
        if let Some(rss) = host::process_rss_bytes() {
            self.memory.push(0, rss as f64);
        }
    }
}
