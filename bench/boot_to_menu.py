#!/usr/bin/env python3
"""Boot-to-menu benchmark: DeskVM against QEMU on the same SeaBIOS payload.

Each round runs DeskVM, then QEMU (alternating, so drift on the host affects both alike),
with the same firmware image (DeskVM gets it with --firmware, QEMU with -bios) and the
same guest memory. For every run it measures, from starting the engine:

* the wall time until SeaBIOS's debug console shows "SeaBIOS (version" (firmware start)
  and "Press ESC for boot menu" (boot selection), polling the file every 5 ms;
* the VM exits up to the boot menu, counted with `perf stat` on KVM's tracepoints
  (kvm_userspace_exit, kvm_pio, kvm_mmio) in the process and all its threads; perf is
  attached while the process is still stopped before its exec, so nothing is missed;
* at the boot-menu moment, before stopping the process: the peak resident memory
  (VmHWM from /proc/<pid>/status).

Then it stops perf (SIGINT, it writes its counts) and the process (SIGTERM, SIGKILL
after 5 s). At the end it prints the median, minimum and maximum per engine and metric,
and the ratio DeskVM/QEMU of the medians.
It measures and reports; it never judges the numbers.

Needs /dev/kvm, and root and perf for the exit counts; without them the exits are
reported as unavailable. Standard library only. See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import select
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
PERF = "perf"

FIRMWARE_MARKER = b"SeaBIOS (version"
MENU_MARKER = b"Press ESC for boot menu"
POLL_INTERVAL_S = 0.005
STOP_GRACE_S = 5.0
PERF_ACK_TIMEOUT_S = 10.0

ENGINES = ("DeskVM", "QEMU")
# KVM tracepoints counted with perf, and their titles in the tables.
EXIT_EVENTS = {
    "kvm:kvm_userspace_exit": "VM exits to userspace (kvm_userspace_exit)",
    "kvm:kvm_pio": "VM exits: port I/O (kvm_pio)",
    "kvm:kvm_mmio": "VM exits: MMIO (kvm_mmio)",
}
# Runs the command as a process that first stops itself and, once continued, execs the
# command under the same pid: perf attaches in between, before the engine has run.
LAUNCHER = ["sh", "-c", 'kill -STOP $$ && exec "$@"', "sh"]


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
        # The same hardware as DeskVM's default machine: a Cirrus card (with its VGA BIOS),
        # the PIIX3 UHCI controller and COM1 (SeaBIOS probes both; without them QEMU's
        # firmware skips USB enumeration and the comparison is not like for like).
        QEMU, "-enable-kvm", "-machine", "pc", "-nodefaults", "-vga", "cirrus",
        "-device", "piix3-usb-uhci", "-serial", "null",
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


def perf_problem() -> str | None:
    """None if perf can count EXIT_EVENTS here, else why not."""
    if shutil.which(PERF) is None:
        return f"{PERF} not found in PATH"
    result = subprocess.run([PERF, "stat", "-e", ",".join(EXIT_EVENTS), "-x", ",",
                             "-o", os.devnull, "--", "true"], capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        return f"{PERF} stat fails: {lines[0]}"
    return None


class PerfError(Exception):
    """perf did not count as asked; the message says why."""


class ExitCounter:
    """`perf stat` attached to one process, counting EXIT_EVENTS in all its threads
    (including threads created later), controlled through a pair of pipes."""

    def __init__(self, pid: int, output: Path, log: Path):
        self.output = output
        self.log = log
        ctl_read, self.ctl = os.pipe()
        self.ack, ack_write = os.pipe()
        with log.open("wb") as log_file:
            self.proc = subprocess.Popen(
                [PERF, "stat", "-e", ",".join(EXIT_EVENTS), "-x", ",", "-o", str(output),
                 "-p", str(pid), "--control", f"fd:{ctl_read},{ack_write}"],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                pass_fds=(ctl_read, ack_write))
        os.close(ctl_read)
        os.close(ack_write)

    def command(self, name: str) -> None:
        """Send perf the control command NAME and wait for its acknowledgement. perf only
        reads commands once its counters are open, so after "enable" it is counting."""
        try:
            os.write(self.ctl, f"{name}\n".encode())
            ready, _, _ = select.select([self.ack], [], [], PERF_ACK_TIMEOUT_S)
            acked = bool(ready) and os.read(self.ack, 16).startswith(b"ack")
        except OSError as error:
            raise PerfError(f"perf control '{name}': {error.strerror}; {tail(self.log)}")
        if not acked:
            raise PerfError(f"perf did not acknowledge '{name}'; {tail(self.log)}")

    def counts(self) -> dict[str, int]:
        """Stop counting, let perf write its counts (SIGINT) and return them."""
        self.command("disable")
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            raise PerfError(f"perf still running {STOP_GRACE_S:g} s after SIGINT")
        counts = {}
        for line in self.output.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2] in EXIT_EVENTS:
                if not fields[0].isdigit():
                    raise PerfError(f"{fields[2]}: {fields[0]}")
                counts[fields[2]] = int(fields[0])
        missing = EXIT_EVENTS.keys() - counts.keys()
        if missing:
            raise PerfError(f"no count for {', '.join(sorted(missing))} in perf's output")
        return counts

    def close(self) -> None:
        """End perf if it still runs and release the pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.ctl)
        os.close(self.ack)


def wait_until_stopped(pid: int, timeout_s: float) -> None:
    """Wait until PID is in the stopped state (the launcher stopped itself)."""
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
        if time.monotonic() >= deadline:
            raise RuntimeError(f"launcher {pid} did not stop within {timeout_s:g} s")
        time.sleep(0.001)


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
    stem = f"{engine}-{round_no}"
    debugcon = workdir / f"{stem}.debugcon"
    log = workdir / f"{stem}.log"
    run = Run(engine, round_no, command_for(engine, args.memory, debugcon))
    run.vm_exits_unavailable = exits_problem
    counter = None
    with log.open("wb") as log_file:
        proc = subprocess.Popen(LAUNCHER + run.command, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_until_stopped(proc.pid, STOP_GRACE_S)
            if exits_problem is None:
                counter = ExitCounter(proc.pid, workdir / f"{stem}.perf.csv",
                                      workdir / f"{stem}.perf.log")
                try:
                    counter.command("enable")
                except PerfError as error:
                    run.vm_exits_unavailable = str(error)
            started = time.monotonic()
            proc.send_signal(signal.SIGCONT)
            wait_for_menu(proc, debugcon, started, args.timeout, run)
            if run.outcome == "ok":
                if run.vm_exits_unavailable is None:
                    try:
                        run.vm_exits = counter.counts()
                    except PerfError as error:
                        run.vm_exits_unavailable = str(error)
                run.peak_rss_kib = peak_rss_kib(proc.pid)
        finally:
            if counter:
                counter.close()
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
    exits = run.vm_exits["kvm:kvm_userspace_exit"] if run.vm_exits else "unavailable"
    return (
        f"firmware {run.firmware_start_s:.3f} s, menu {run.boot_menu_s:.3f} s, "
        f"userspace exits {exits}, VmHWM {run.peak_rss_kib / 1024:.1f} MiB, stopped by {run.stopped_by}"
    )


@dataclasses.dataclass(frozen=True)
class Metric:
    """A reported quantity: its title, unit, decimals shown and how to get it from a run."""

    title: str
    unit: str
    places: int
    value: Callable[[Run], float | None]


def exit_count(event: str) -> Callable[[Run], float | None]:
    """Reads the count of the tracepoint EVENT from a run."""
    return lambda run: run.vm_exits[event] if run.vm_exits else None


METRICS = [
    Metric("time to firmware start", "s", 3, lambda run: run.firmware_start_s),
    Metric("time to boot menu", "s", 3, lambda run: run.boot_menu_s),
    Metric("peak RSS (VmHWM)", "MiB", 1,
           lambda run: run.peak_rss_kib / 1024 if run.peak_rss_kib else None),
] + [
    Metric(title, "", 0, exit_count(event)) for event, title in EXIT_EVENTS.items()
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
    exits_problem = perf_problem()
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
