//! vCPUs: CPUID and topology, the reset state, and the thread that runs `KVM_RUN`.
//!
//! Each vCPU runs on its own thread and dispatches port and MMIO exits synchronously to
//! the buses. The engine pauses, resumes, resets and stops vCPUs through [`RunControl`];
//! a vCPU blocked in `KVM_RUN` is kicked out with a real-time signal.

use crate::config::CpuTopology;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::Duration;

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events,
    CpuId,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

/// KVM limits the data of one string port exit to a page.
const PORT_DATA_MAX: usize = 4096;
use serde::Serialize;
use vmm_devices::Bus;

use crate::error::{Result, VmmError};
use crate::linux_boot::LinuxEntry;

/// Exit counters of one vCPU.
#[derive(Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub hlt: AtomicU64,
    pub shutdown: AtomicU64,
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
}

/// Cumulative exits of one vCPU by reason (a snapshot).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExitStats {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    pub hlt: u64,
    pub shutdown: u64,
    pub interrupted: u64,
    pub other: u64,
}

impl ExitStats {
    pub fn total(&self) -> u64 {
        self.io_in
            + self.io_out
            + self.mmio_read
            + self.mmio_write
            + self.hlt
            + self.shutdown
            + self.interrupted
            + self.other
    }
}

impl ExitCounters {
    pub fn snapshot(&self) -> ExitStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExitStats {
            io_in: l(&self.io_in),
            io_out: l(&self.io_out),
            mmio_read: l(&self.mmio_read),
            mmio_write: l(&self.mmio_write),
            hlt: l(&self.hlt),
            shutdown: l(&self.shutdown),
            interrupted: l(&self.interrupted),
            other: l(&self.other),
        }
    }
}

/// What the engine wants the vCPUs to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    Run,
    Pause,
    Exit,
}

struct ControlState {
    command: VcpuCommand,
    /// Bumped on every system reset; a vCPU that sees a new epoch reloads its reset state.
    reset_epoch: u64,
    parked: usize,
    running_threads: usize,
}

/// Shared between the engine and all vCPU threads.
pub struct RunControl {
    state: Mutex<ControlState>,
    cond: Condvar,
}

/// Why a vCPU stopped on its own.
pub trait VcpuObserver: Send + Sync {
    fn reset_requested(&self);
    fn poweroff_requested(&self);
    fn vcpu_failed(&self, index: usize, message: String);
}

impl RunControl {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ControlState {
                command: VcpuCommand::Pause,
                // Every vCPU loads its reset state when it first runs.
                reset_epoch: 1,
                parked: 0,
                running_threads: 0,
            }),
            cond: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_command(&self, command: VcpuCommand) {
        self.lock().command = command;
        self.cond.notify_all();
    }

    pub fn command(&self) -> VcpuCommand {
        self.lock().command
    }

    pub fn bump_reset_epoch(&self) {
        self.lock().reset_epoch += 1;
    }

    /// Waits until every running vCPU thread is parked (or gone); `kick` is called
    /// repeatedly meanwhile to get vCPUs out of `KVM_RUN`.
    pub fn wait_all_parked(&self, kick: impl Fn()) {
        self.wait_while(|s| s.parked < s.running_threads, kick);
    }

    /// Waits until all vCPU threads have ended.
    pub fn wait_all_exited(&self, kick: impl Fn()) {
        self.wait_while(|s| s.running_threads > 0, kick);
    }

    fn wait_while(&self, busy: impl Fn(&ControlState) -> bool, kick: impl Fn()) {
        let mut s = self.lock();
        while busy(&s) {
            drop(s);
            kick();
            s = self.lock();
            let (guard, _) = self
                .cond
                .wait_timeout(s, Duration::from_millis(2))
                .unwrap_or_else(|e| e.into_inner());
            s = guard;
        }
    }
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process, so the signal interrupts
/// `KVM_RUN` with EINTR instead of killing the process.
pub fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick) {
            result = Err(VmmError::Device(format!(
                "cannot install the vCPU kick signal handler: {e}"
            )));
        }
    });
    result
}

/// CPUID for vCPU `index` of `count`: KVM's supported set with a consistent topology of
/// one socket with `count` cores, one thread each, APIC ID = index.
pub fn cpuid_for(supported: &CpuId, index: u32, topology: &CpuTopology) -> CpuId {
    let mut cpuid = supported.clone();
    let apic_id = topology.apic_id(index);
    let thread_bits = topology.thread_bits();
    let package_bits = thread_bits + topology.core_bits();
    let per_package = topology.cores.max(1) * topology.threads.max(1);
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (per_package.min(255) << 16);
                if per_package > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
                e.ecx |= 1 << 31; // running under a hypervisor
            }
            4 => {
                let level = (e.eax >> 5) & 0x7;
                if e.eax & 0x1f != 0 {
                    // L1/L2 shared by a core's threads, L3 by the package.
                    let sharing = if level >= 3 {
                        (1 << package_bits) - 1
                    } else {
                        (1 << thread_bits) - 1
                    };
                    let cores_field = (1u32 << topology.core_bits()) - 1;
                    e.eax = (e.eax & 0x3fff) | (sharing << 14) | (cores_field << 26);
                }
            }
            0xb | 0x1f => {
                match e.index {
                    0 => {
                        e.eax = thread_bits;
                        e.ebx = topology.threads.max(1);
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = package_bits;
                        e.ebx = per_package;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
                e.edx = apic_id;
            }
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (package_bits << 12) | (per_package - 1).min(255);
            }
            _ => {}
        }
    }
    cpuid
}

/// Architectural state of a vCPU right after creation, restored on every reset.
pub struct ResetState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: Option<kvm_vcpu_events>,
}

impl ResetState {
    pub fn capture(vcpu: &VcpuFd) -> Result<Self> {
        Ok(Self {
            regs: vcpu.get_regs().map_err(VmmError::kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(VmmError::kvm("KVM_GET_SREGS"))?,
            fpu: vcpu.get_fpu().map_err(VmmError::kvm("KVM_GET_FPU"))?,
            lapic: vcpu.get_lapic().map_err(VmmError::kvm("KVM_GET_LAPIC"))?,
            mp_state: vcpu
                .get_mp_state()
                .map_err(VmmError::kvm("KVM_GET_MP_STATE"))?,
            events: vcpu.get_vcpu_events().ok(),
        })
    }

    pub fn restore(&self, vcpu: &VcpuFd) -> Result<()> {
        vcpu.set_sregs(&self.sregs)
            .map_err(VmmError::kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs)
            .map_err(VmmError::kvm("KVM_SET_REGS"))?;
        vcpu.set_fpu(&self.fpu)
            .map_err(VmmError::kvm("KVM_SET_FPU"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(VmmError::kvm("KVM_SET_LAPIC"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(VmmError::kvm("KVM_SET_MP_STATE"))?;
        if let Some(ev) = &self.events {
            vcpu.set_vcpu_events(ev)
                .map_err(VmmError::kvm("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }
}

/// Puts the boot CPU at a Linux 32-bit entry point in flat protected mode.
pub fn enter_linux(vcpu: &VcpuFd, entry: LinuxEntry) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(VmmError::kvm("KVM_GET_SREGS"))?;
    let segment = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = segment(0x10, 0xb);
    let data = segment(0x18, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = crate::layout::BOOT_GDT_START;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.cr0 = (sregs.cr0 | 1) & !(1 << 31);
    vcpu.set_sregs(&sregs)
        .map_err(VmmError::kvm("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: entry.entry_point,
        rsi: entry.zero_page,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(VmmError::kvm("KVM_SET_REGS"))
}

/// Everything one vCPU thread needs.
pub struct VcpuRunner {
    pub index: usize,
    pub vcpu: VcpuFd,
    pub reset_state: ResetState,
    pub linux_entry: Option<LinuxEntry>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<RunControl>,
    pub counters: Arc<ExitCounters>,
    pub observer: Arc<dyn VcpuObserver>,
    /// Delayed MMIO writes to apply before handling each exit.
    pub coalesced: Option<Arc<crate::coalesced::CoalescedRing>>,
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

enum Step {
    Continue,
    /// Park until the engine says what next (after a reset or power-off request).
    Park,
    Fail(String),
}

impl VcpuRunner {
    /// The thread body. Returns when told to exit.
    pub fn run(mut self) {
        let mut epoch = 0u64;
        {
            let mut s = self.control.lock();
            s.running_threads += 1;
        }
        loop {
            {
                let mut s = self.control.lock();
                if s.command != VcpuCommand::Run {
                    s.parked += 1;
                    self.control.cond.notify_all();
                    while s.command == VcpuCommand::Pause {
                        s = self.control.cond.wait(s).unwrap_or_else(|e| e.into_inner());
                    }
                    s.parked -= 1;
                    if s.command == VcpuCommand::Exit {
                        s.running_threads -= 1;
                        self.control.cond.notify_all();
                        return;
                    }
                }
                if s.reset_epoch != epoch {
                    epoch = s.reset_epoch;
                    drop(s);
                    if let Err(e) = self.load_reset_state() {
                        self.fail(format!("cannot reset vCPU {}: {e}", self.index));
                    }
                    continue;
                }
            }
            match self.step() {
                Step::Continue => {}
                // The engine acts on the request by pausing (reset) or stopping us.
                Step::Park => self
                    .wait_for_engine(|s| s.command == VcpuCommand::Run && s.reset_epoch == epoch),
                Step::Fail(message) => self.fail(message),
            }
        }
    }

    fn fail(&self, message: String) {
        self.observer.vcpu_failed(self.index, message);
        // Wait until the engine pauses or stops us.
        self.wait_for_engine(|s| s.command == VcpuCommand::Run);
    }

    /// Blocks this vCPU while `unchanged` holds for the control state.
    fn wait_for_engine(&self, unchanged: impl Fn(&ControlState) -> bool) {
        let mut s = self.control.lock();
        while unchanged(&s) {
            let (g, _) = self
                .control
                .cond
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner());
            s = g;
        }
    }

    /// Reloads the post-creation state (and the Linux entry on the boot CPU).
    pub fn load_reset_state(&mut self) -> Result<()> {
        self.complete_pending_io();
        self.reset_state.restore(&self.vcpu)?;
        if self.index == 0 {
            if let Some(entry) = self.linux_entry {
                enter_linux(&self.vcpu, entry)?;
            }
        }
        Ok(())
    }

    /// KVM finishes a port or MMIO instruction (storing the result, advancing RIP) on the
    /// next `KVM_RUN`. Before registers are replaced, re-enter with `immediate_exit` so
    /// that this happens now and not on top of the new state.
    fn complete_pending_io(&mut self) {
        self.vcpu.set_kvm_immediate_exit(1);
        let _ = self.vcpu.run();
        self.vcpu.set_kvm_immediate_exit(0);
    }

    /// Serves a port exit. String instructions (`rep insw` of an IDE sector, say) arrive as
    /// one exit with `count` items of `size` bytes; each item is a separate device access.
    fn port_io(&mut self, port: u16, is_in: bool) {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_IO, so `io` is the union's active member.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size);
        if !matches!(size, 1 | 2 | 4) {
            return;
        }
        let len = size.saturating_mul(io.count as usize).min(PORT_DATA_MAX);
        let base = run as *mut kvm_bindings::kvm_run as *mut u8;
        // SAFETY: KVM put the `size * count` data bytes at `data_offset` inside this vCPU's
        // kvm_run mapping (KVM bounds string I/O to one page, below the mapping's size);
        // the slice is dropped before the next KVM_RUN and nothing else accesses it.
        let data =
            unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), len) };
        for item in data.chunks_mut(size) {
            if is_in {
                self.pio.read(u64::from(port), item);
            } else {
                self.pio.write(u64::from(port), item);
            }
        }
    }

    fn step(&mut self) -> Step {
        let c = &self.counters;
        let mut port_exit = None;
        let exit = self.vcpu.run();
        if let Some(ring) = &self.coalesced {
            ring.drain(&self.mmio);
        }
        match exit {
            Ok(VcpuExit::IoIn(port, _)) => {
                c.io_in.fetch_add(1, Ordering::Relaxed);
                port_exit = Some((port, true));
            }
            Ok(VcpuExit::IoOut(port, _)) => {
                c.io_out.fetch_add(1, Ordering::Relaxed);
                port_exit = Some((port, false));
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                c.mmio_read.fetch_add(1, Ordering::Relaxed);
                self.mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                c.mmio_write.fetch_add(1, Ordering::Relaxed);
                self.mmio.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {
                c.hlt.fetch_add(1, Ordering::Relaxed);
            }
            Ok(VcpuExit::Shutdown) => {
                // A triple fault: a PC resets.
                c.shutdown.fetch_add(1, Ordering::Relaxed);
                log::info!("vCPU {} triple-faulted; resetting the VM", self.index);
                self.observer.reset_requested();
                return Step::Park;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                c.other.fetch_add(1, Ordering::Relaxed);
                match kind {
                    KVM_SYSTEM_EVENT_RESET => self.observer.reset_requested(),
                    KVM_SYSTEM_EVENT_SHUTDOWN => self.observer.poweroff_requested(),
                    other => return Step::Fail(format!("unexpected KVM system event {other}")),
                }
                return Step::Park;
            }
            Ok(VcpuExit::Intr) => {
                c.interrupted.fetch_add(1, Ordering::Relaxed);
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                c.other.fetch_add(1, Ordering::Relaxed);
                return Step::Fail(format!(
                    "vCPU {} could not enter the guest (hardware reason {reason:#x} on host CPU {cpu})",
                    self.index
                ));
            }
            Ok(VcpuExit::InternalError) => {
                c.other.fetch_add(1, Ordering::Relaxed);
                let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return Step::Fail(format!(
                    "KVM internal error on vCPU {} (the guest ran an instruction KVM cannot emulate, rip {rip:#x})",
                    self.index
                ));
            }
            Ok(VcpuExit::Debug(_)) | Ok(VcpuExit::IrqWindowOpen) => {
                c.other.fetch_add(1, Ordering::Relaxed);
            }
            Ok(other) => {
                c.other.fetch_add(1, Ordering::Relaxed);
                return Step::Fail(format!(
                    "vCPU {} stopped on an unhandled exit: {other:?}",
                    self.index
                ));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                c.interrupted.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => return Step::Fail(format!("KVM_RUN failed on vCPU {}: {e}", self.index)),
        }
        if let Some((port, is_in)) = port_exit {
            self.port_io(port, is_in);
        }
        Step::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0x0000_0121,
            ebx: 0xff00_1234,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    #[test]
    fn topology_is_consistent_across_leaves() {
        let supported = CpuId::from_entries(&[
            entry(1, 0),
            entry(4, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
        ])
        .unwrap();
        let c = cpuid_for(&supported, 2, &CpuTopology::flat(4));
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 2, "APIC ID");
        assert_eq!((s[0].ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!(s[0].ebx & 0xffff, 0x1234);
        assert_ne!(s[0].edx & (1 << 28), 0, "HTT with more than one CPU");
        assert_eq!(s[1].eax >> 26, 3, "cores per package - 1");
        assert_eq!((s[2].ebx, s[2].ecx >> 8), (1, 1));
        assert_eq!((s[3].eax, s[3].ebx, s[3].ecx >> 8), (2, 4, 2));
        assert!(s[2..].iter().all(|e| e.edx == 2), "x2APIC ID");
        assert_eq!(s[4].ebx, 0);
        let single = cpuid_for(&supported, 0, &CpuTopology::flat(1));
        assert_eq!(single.as_slice()[0].edx & (1 << 28), 0);
        assert_eq!(single.as_slice()[1].eax >> 26, 0);
    }

    #[test]
    fn sockets_cores_and_threads_pack_into_sparse_apic_ids() {
        let supported = CpuId::from_entries(&[
            entry(1, 0),
            entry(4, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x8000_0008, 0),
        ])
        .unwrap();
        let t = CpuTopology {
            sockets: 2,
            cores: 3,
            threads: 2,
        };
        // vCPU 7: socket 1, core 0, thread 1; core IDs take 2 bits, thread IDs 1 bit.
        assert_eq!(t.apic_id(7), 0b1001); // socket 1, core 00, thread 1
        assert_eq!(t.apic_id(5), 0b0101); // socket 0, core 10, thread 1
        assert_eq!(t.apic_id(11), 0b1101); // socket 1, core 10, thread 1
        let c = cpuid_for(&supported, 7, &t);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 9, "APIC ID");
        assert_eq!((s[0].ebx >> 16) & 0xff, 6, "logical processors per package");
        assert_eq!(s[1].eax >> 26, 3, "core ID space per package - 1");
        assert_eq!(
            (s[1].eax >> 14) & 0xfff,
            1,
            "L1 shared by the core's 2 threads"
        );
        assert_eq!((s[2].eax, s[2].ebx, s[2].ecx >> 8), (1, 2, 1), "SMT level");
        assert_eq!((s[3].eax, s[3].ebx, s[3].ecx >> 8), (3, 6, 2), "core level");
        assert!(s[2..4].iter().all(|e| e.edx == 9), "x2APIC ID");
        assert_eq!(s[4].ecx & 0xff, 5, "threads per package - 1");
        assert_eq!((s[4].ecx >> 12) & 0xf, 3, "APIC ID bits of the package");
    }
}
