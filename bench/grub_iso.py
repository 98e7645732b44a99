#!/usr/bin/env python3
"""GRUB ISO benchmark: process start until a GRUB rescue ISO's menu shows on the serial
port, DeskVM against QEMU, same ISO, same memory, in one run.

The ISO is built here with grub-mkrescue (or given with --iso). Its grub.cfg sends GRUB's
terminal to COM1 and has two entries, "entry-alpha" and "entry-beta"; a run ends when the
serial file contains both names (GRUB has drawn its menu). Rounds alternate DeskVM, QEMU,
DeskVM, QEMU, ... so drift on the host affects both alike. The serial file is polled every
20 ms. The script measures and reports; it never judges the numbers.

Needs /dev/kvm, qemu-system-x86_64, SeaBIOS (QEMU's own copy), grub-mkrescue with
grub-pc-bin, xorriso and mtools. Standard library only. See bench/README.md.
"""

from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DESKVM = REPO / "target" / "release" / "deskvm"
QEMU = "qemu-system-x86_64"
MENU_MARKERS = (b"entry-alpha", b"entry-beta")
POLL_INTERVAL_S = 0.02
STOP_GRACE_S = 5.0

GRUB_CFG = """serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=30
set default=0
menuentry "entry-alpha" {
    echo MARKER-ALPHA
    sleep 600
}
menuentry "entry-beta" {
    echo MARKER-BETA
    sleep 600
}
"""


def build_iso(workdir: Path) -> Path:
    """Builds the GRUB rescue ISO in WORKDIR with grub-mkrescue and returns its path."""
    root = workdir / "iso-root"
    (root / "boot" / "grub").mkdir(parents=True)
    (root / "boot" / "grub" / "grub.cfg").write_text(GRUB_CFG)
    iso = workdir / "grub-rescue.iso"
    result = subprocess.run(["grub-mkrescue", "-o", str(iso), str(root)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"grub-mkrescue failed:\n{result.stderr}")
    return iso


def command_for(engine: str, deskvm: Path, iso: Path, memory_mib: int,
                serial: Path) -> list[str]:
    """The command line that boots ISO from the CD-ROM with the serial port to SERIAL."""
    if engine == "DeskVM":
        return [str(deskvm), "run", "--cdrom", str(iso), "--boot", "cd",
                "--serial", str(serial), "--memory", str(memory_mib)]
    # Same hardware as DeskVM where it matters here: i440FX/PIIX3, IDE CD-ROM on the
    # secondary master, Cirrus VGA (DeskVM always has one), no NIC, no display window.
    return [QEMU, "-enable-kvm", "-machine", "pc", "-nodefaults",
            "-m", str(memory_mib), "-vga", "cirrus", "-display", "none",
            "-cdrom", str(iso), "-boot", "d",
            "-chardev", f"file,id=s,path={serial}", "-serial", "chardev:s"]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after STOP_GRACE_S."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_once(engine: str, command: list[str], serial: Path, timeout_s: float) -> dict:
    """Starts COMMAND and waits until SERIAL shows the menu; returns the outcome."""
    log = serial.with_suffix(".log")
    with log.open("wb") as log_file:
        start = time.monotonic()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT)
        outcome, menu_s = "timeout", None
        while time.monotonic() - start < timeout_s:
            try:
                data = serial.read_bytes()
            except FileNotFoundError:
                data = b""
            if all(m in data for m in MENU_MARKERS):
                menu_s = time.monotonic() - start
                outcome = "ok"
                break
            if proc.poll() is not None:
                outcome = "exited"
                break
            time.sleep(POLL_INTERVAL_S)
        stop(proc)
    detail = None
    if outcome != "ok":
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        serial_tail = serial.read_bytes()[-200:] if serial.exists() else b""
        detail = " | ".join(tail) or f"serial ends with {serial_tail!r}"
    return {"engine": engine, "command": command, "outcome": outcome,
            "menu_s": menu_s, "returncode": proc.returncode, "detail": detail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory", type=int, default=256, help="MiB for both engines")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds before a run without a menu counts as timed out")
    parser.add_argument("--iso", type=Path, help="use this ISO instead of building one")
    parser.add_argument("--deskvm", type=Path, default=DEFAULT_DESKVM,
                        help="the deskvm binary (default target/release/deskvm)")
    parser.add_argument("--json", type=Path, help="also write the runs and summary here")
    args = parser.parse_args()

    if not args.deskvm.is_file():
        sys.exit(f"{args.deskvm} not found: build it with `cargo build --release -p deskvm`")
    for tool in (QEMU,) + (() if args.iso else ("grub-mkrescue", "xorriso", "mformat")):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found in PATH")

    with tempfile.TemporaryDirectory(prefix="grub-iso-bench-") as tmp:
        workdir = Path(tmp)
        iso = args.iso or build_iso(workdir)
        print(f"ISO: {iso} ({iso.stat().st_size} bytes), memory {args.memory} MiB, "
              f"{args.rounds} rounds", flush=True)
        runs = []
        for round_index in range(1, args.rounds + 1):
            for engine in ("DeskVM", "QEMU"):
                serial = workdir / f"{engine}-{round_index}.serial"
                command = command_for(engine, args.deskvm, iso, args.memory, serial)
                run = run_once(engine, command, serial, args.timeout)
                run["round"] = round_index
                runs.append(run)
                shown = f"{run['menu_s']:.2f} s" if run["menu_s"] is not None \
                    else f"{run['outcome']} ({run['detail']})"
                print(f"round {round_index} {engine:6}: menu after {shown}", flush=True)

    summary = {}
    for engine in ("DeskVM", "QEMU"):
        times = [r["menu_s"] for r in runs if r["engine"] == engine and r["menu_s"] is not None]
        summary[engine] = {
            "median": statistics.median(times) if times else None,
            "min": min(times) if times else None,
            "max": max(times) if times else None,
            "runs": f"{len(times)}/{args.rounds}",
        }
    d, q = summary["DeskVM"]["median"], summary["QEMU"]["median"]
    ratio = d / q if d is not None and q else None
    print()
    print("time to GRUB menu (s):  median     min     max   runs")
    for engine, s in summary.items():
        cells = [f"{s[k]:7.2f}" if s[k] is not None else "      -" for k in ("median", "min", "max")]
        print(f"  {engine:6}              {' '.join(cells)}   {s['runs']}")
    print(f"ratio DeskVM/QEMU of the medians: {ratio:.2f}" if ratio is not None
          else "ratio DeskVM/QEMU: unavailable (an engine never reached the menu)")
    print(f"QEMU: {subprocess.run([QEMU, '--version'], capture_output=True, text=True).stdout.splitlines()[0]}")
    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary, "ratio": ratio},
                                        indent=2))


if __name__ == "__main__":
    main()
