#!/usr/bin/env python3
"""Boot-to-menu benchmark: DeskVM against QEMU on the same SeaBIOS payload.

Each round runs DeskVM, then QEMU (alternating, so drift on the host affects both alike),
with the same firmware image (DeskVM gets it with --firmware, QEMU with -bios) and the
same guest memory. For every run it measures, from spawning the process:

* the wall time until SeaBIOS's debug console shows "SeaBIOS (version" (firmware start)
  and "Press ESC for boot menu" (boot selection), polling the file every 5 ms;
* at the boot-menu moment, before stopping the process: the VM exit counters from the
  kernel's per-VM KVM statistics in debugfs (/sys/kernel/debug/kvm/<pid>-<fd>/) and
  the peak resident memory (VmHWM from /proc/<pid>/status).

Then it stops the process (SIGTERM, SIGKILL after 5 s). At the end it prints the median,
minimum and maximum per engine and metric, and the ratio DeskVM/QEMU of the medians.
It measures and reports; it never judges the numbers.

Needs /dev/kvm, and root for the exit counters (debugfs); without them the exits are
reported as unavailable. Standard library only. See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
DESKVM = REPO / "target" / "release" / "deskvm"
QEMU = "qemu-system-x86_64"
BIOS = Path("/usr/share/seabios/bios.bin")
DEBUGFS = Path("/sys/kernel/debug")
KVM_DEBUGFS = DEBUGFS / "kvm"

FIRMWARE_MARKER = b"SeaBIOS (version"
MENU_MARKER = b"Press ESC for boot menu"
POLL_INTERVAL_S = 0.005
STOP_GRACE_S = 5.0

ENGINES = ("DeskVM", "QEMU")
# Exit counters shown in the tables (the JSON holds every "*exits" counter found).
SHOWN_EXIT_COUNTERS = (
    "exits",
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "irq_exits",
    "irq_window_exits",
    "request_irq_exits",
    "signal_exits",
)


@dataclasses.dataclass
class Run:
    """The result of one engine run."""

    engine: str
    round: int
    command: list[str]
    outcome: str = "ok"  # ok, timeout or exited (the process ended before the menu)
    detail: str | None = None
    firmware_start_s: float | None = None
    boot_menu_s: float | None = None
    peak_rss_kib: int | None = None
    vm_exits: dict[str, int] | None = None
    vm_exits_unavailable: str | None = None
    stopped_by: str | None = None
    returncode: int | None = None


def command_for(engine: str, memory_mib: int, debugcon: Path) -> list[str]:
    """The command line that boots BIOS with MEMORY_MIB of RAM, debug console to DEBUGCON."""
    if engine == "DeskVM":
        return [
            str(DESKVM), "run",
            "--memory", str(memory_mib),
            "--firmware", str(BIOS),
            "--debugcon", str(debugcon),
            "--boot-menu",
        ]
    return [
        QEMU, "-enable-kvm", "-machine", "pc", "-nodefaults",
        "-m", str(memory_mib),
        "-bios", str(BIOS),
        "-chardev", f"file,id=dbg,path={debugcon}",
        "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
        "-display", "none",
        "-boot", "menu=on",
        "-no-reboot",
    ]


def command_output(argv: list[str]) -> str:
    """The first line of ARGV's standard output, or a note why there is none."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        return f"unknown ({error})"
    return result.stdout.strip().splitlines()[0]


def environment() -> dict[str, str]:
    """What is being compared: versions, firmware and host."""
    return {
        "deskvm": f"{command_output([str(DESKVM), '--version'])}, "
        f"commit {command_output(['git', '-C', str(REPO), 'rev-parse', '--short', 'HEAD'])}",
        "deskvm_binary": str(DESKVM),
        "qemu": command_output([QEMU, "--version"]),
        "bios": f"{BIOS} ({BIOS.stat().st_size} bytes)",
        "kernel": os.uname().release,
        "cpus": str(os.cpu_count()),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def build_deskvm() -> None:
    """Build the release binary with cargo (from PATH or ~/.cargo/bin)."""
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    print(f"building: {cargo} build --release", flush=True)
    subprocess.run([cargo, "build", "--release"], cwd=REPO, check=True)


def kvm_debugfs_problem() -> str | None:
    """None if the KVM debugfs directory exists (mounting debugfs if needed), else why not."""
    try:
        if not KVM_DEBUGFS.is_dir() and not os.path.ismount(DEBUGFS):
            subprocess.run(["mount", "-t", "debugfs", "none", str(DEBUGFS)], capture_output=True)
        if KVM_DEBUGFS.is_dir():
            return None
        return f"{KVM_DEBUGFS} does not exist (debugfs not mountable or KVM not loaded)"
    except OSError as error:
        return f"{KVM_DEBUGFS}: {error.strerror}"


def read_vm_exits(pid: int) -> tuple[dict[str, int] | None, str | None]:
    """The exit counters of PID's VM(s) from debugfs, or None and the reason.

    The directory is named "<tid>-<fd>" after the thread that created the VM, normally
    the main thread, so every thread id of PID is accepted; counters of several VMs add up.
    """
    tids = set(os.listdir(f"/proc/{pid}/task"))
    vm_dirs = [d for d in KVM_DEBUGFS.iterdir() if d.name.split("-")[0] in tids]
    if not vm_dirs:
        return None, f"no {KVM_DEBUGFS}/{pid}-* directory"
    counters: dict[str, int] = {}
    for vm_dir in vm_dirs:
        for stat in sorted(vm_dir.iterdir()):
            if not (stat.name == "exits" or stat.name.endswith("_exits")):
                continue
            try:
                value = int(stat.read_text())
            except OSError as error:
                reason = f"reading {stat.name}: {error.strerror}"
                if error.errno == errno.EPERM:
                    reason += " (kernel lockdown restricts debugfs, see dmesg)"
                return None, reason
            counters[stat.name] = counters.get(stat.name, 0) + value
    return counters, None


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM of PID in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def wait_for_menu(proc: subprocess.Popen, debugcon: Path, started: float,
                  timeout_s: float, run: Run) -> None:
    """Poll DEBUGCON until the boot-menu marker, recording both marker times in RUN."""
    while True:
        text = debugcon.read_bytes() if debugcon.exists() else b""
        elapsed = time.monotonic() - started
        if run.firmware_start_s is None and FIRMWARE_MARKER in text:
            run.firmware_start_s = elapsed
        if MENU_MARKER in text:
            run.boot_menu_s = elapsed
            return
        if proc.poll() is not None:
            run.outcome = "exited"
            return
        if elapsed >= timeout_s:
            run.outcome = "timeout"
            return
        time.sleep(POLL_INTERVAL_S)


def stop(proc: subprocess.Popen) -> str:
    """Stop PROC: SIGTERM, then SIGKILL after the grace period. Returns how it ended."""
    if proc.poll() is not None:
        return "exited by itself"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
        return "SIGTERM"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "SIGKILL"


def tail(path: Path, lines: int = 5) -> str:
    """The last LINES lines of the text file PATH."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def measure(engine: str, round_no: int, args: argparse.Namespace, workdir: Path,
            exits_problem: str | None) -> Run:
    """Run ENGINE once up to the boot menu and return what was measured."""
    debugcon = workdir / f"{engine}-{round_no}.debugcon"
    log = workdir / f"{engine}-{round_no}.log"
    run = Run(engine, round_no, command_for(engine, args.memory, debugcon))
    with log.open("wb") as log_file:
        started = time.monotonic()
        proc = subprocess.Popen(run.command, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_for_menu(proc, debugcon, started, args.timeout, run)
            if run.outcome == "ok":
                if exits_problem is None:
                    run.vm_exits, run.vm_exits_unavailable = read_vm_exits(proc.pid)
                else:
                    run.vm_exits_unavailable = exits_problem
                run.peak_rss_kib = peak_rss_kib(proc.pid)
        finally:
            run.stopped_by = stop(proc)
            run.returncode = proc.returncode
    if run.outcome == "timeout":
        run.detail = f"no boot menu after {args.timeout:g} s"
    elif run.outcome == "exited":
        run.detail = f"exited with status {run.returncode} before the menu: {tail(log)}"
    return run


def describe(run: Run) -> str:
    """One progress line for RUN."""
    if run.outcome != "ok":
        return f"{run.outcome.upper()}: {run.detail}"
    exits = run.vm_exits.get("exits", "n/a") if run.vm_exits else "unavailable"
    return (
        f"firmware {run.firmware_start_s:.3f} s, menu {run.boot_menu_s:.3f} s, "
        f"exits {exits}, VmHWM {run.peak_rss_kib / 1024:.1f} MiB, stopped by {run.stopped_by}"
    )


@dataclasses.dataclass(frozen=True)
class Metric:
    """A reported quantity: its title, unit, decimals shown and how to get it from a run."""

    title: str
    unit: str
    places: int
    value: Callable[[Run], float | None]


def exit_counter(name: str) -> Callable[[Run], float | None]:
    """Reads the exit counter NAME from a run."""
    return lambda run: run.vm_exits.get(name) if run.vm_exits else None


METRICS = [
    Metric("time to firmware start", "s", 3, lambda run: run.firmware_start_s),
    Metric("time to boot menu", "s", 3, lambda run: run.boot_menu_s),
    Metric("peak RSS (VmHWM)", "MiB", 1,
           lambda run: run.peak_rss_kib / 1024 if run.peak_rss_kib else None),
] + [
    Metric("VM exits (all)" if name == "exits" else f"VM exits: {name}", "", 0, exit_counter(name))
    for name in SHOWN_EXIT_COUNTERS
]


def summarize(runs: list[Run]) -> dict[str, dict]:
    """Per metric: median, min and max per engine over the successful runs, and the ratio
    DeskVM/QEMU of the medians (None where there is nothing to compare)."""
    summary = {}
    for metric in METRICS:
        entry: dict = {"unit": metric.unit}
        for engine in ENGINES:
            values = [v for run in runs if run.engine == engine and run.outcome == "ok"
                      if (v := metric.value(run)) is not None]
            entry[engine] = {"median": statistics.median(values), "min": min(values),
                             "max": max(values), "runs": len(values)} if values else None
        deskvm, qemu = entry["DeskVM"], entry["QEMU"]
        entry["ratio"] = (deskvm["median"] / qemu["median"]
                          if deskvm and qemu and qemu["median"] else None)
        summary[metric.title] = entry
    return summary


def print_report(env: dict[str, str], args: argparse.Namespace, summary: dict[str, dict],
                 runs: list[Run]) -> None:
    """Print what was compared, one table per metric, and the runs that failed."""
    print("\n== compared ==")
    for key, value in env.items():
        print(f"  {key:14} {value}")
    print(f"  {'settings':14} {args.rounds} rounds, {args.memory} MiB, timeout {args.timeout:g} s")

    print("\n== results (median, min, max over the runs that reached the menu) ==")
    for metric in METRICS:
        entry = summary[metric.title]
        if not (entry["DeskVM"] or entry["QEMU"]):
            continue
        medians = {engine: f"{entry[engine]['median']:.{metric.places}f} {metric.unit}".strip()
                   if entry[engine] else "n/a" for engine in ENGINES}
        ratio = f"{entry['ratio']:.3g}" if entry["ratio"] is not None else "n/a"
        print(f"\n{metric.title}: DeskVM {medians['DeskVM']}, QEMU {medians['QEMU']}, "
              f"ratio {ratio}")
        print(f"  {'':8}{'median':>12}{'min':>12}{'max':>12}   runs")
        for engine in ENGINES:
            stats = entry[engine]
            cells = "".join(f"{stats[k]:>12.{metric.places}f}" if stats else f"{'n/a':>12}"
                            for k in ("median", "min", "max"))
            print(f"  {engine:8}{cells}   {stats['runs'] if stats else 0}/{args.rounds}")
    for reason in sorted({run.vm_exits_unavailable for run in runs if run.vm_exits_unavailable}):
        print(f"\nVM exits: unavailable ({reason})")

    failed = [run for run in runs if run.outcome != "ok"]
    if failed:
        print("\n== runs without a boot menu ==")
        for run in failed:
            print(f"  round {run.round} {run.engine}: {run.outcome}: {run.detail}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time from process start to SeaBIOS's boot menu, DeskVM against QEMU.",
    )
    parser.add_argument("--rounds", type=int, default=5, metavar="N",
                        help="rounds of (DeskVM, QEMU) runs (default 5)")
    parser.add_argument("--memory", type=int, default=128, metavar="MIB",
                        help="guest memory in MiB for both engines (default 128)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="give up on a run after this long (default 120)")
    parser.add_argument("--build", action="store_true",
                        help="run cargo build --release first "
                             "(done anyway if the binary is missing)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the raw results and the summary as JSON to FILE")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    if args.build or not DESKVM.exists():
        build_deskvm()
    for path, what in ((BIOS, "firmware"), (Path("/dev/kvm"), "KVM device")):
        if not path.exists():
            sys.exit(f"{what} {path} not found")
    if shutil.which(QEMU) is None:
        sys.exit(f"{QEMU} not found in PATH")

    env = environment()
    exits_problem = kvm_debugfs_problem()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="deskvm-bench-") as workdir:
        for round_no in range(1, args.rounds + 1):
            for engine in ENGINES:
                run = measure(engine, round_no, args, Path(workdir), exits_problem)
                runs.append(run)
                print(f"round {round_no}/{args.rounds}  {engine:6}  {describe(run)}", flush=True)

    summary = summarize(runs)
    print_report(env, args, summary, runs)
    if args.json:
        report = {
            "environment": env,
            "settings": {"rounds": args.rounds, "memory_mib": args.memory,
                         "timeout_s": args.timeout},
            "runs": [dataclasses.asdict(run) for run in runs],
            "summary": summary,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nraw results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
