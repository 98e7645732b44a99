#!/usr/bin/env python3
"""Network-boot benchmark: iPXE over the NAT, DeskVM against QEMU (opt-in, not a test).

For each network card that has an iPXE option ROM and each engine, N rounds boot SeaBIOS
with no disk, so SeaBIOS starts the card's iPXE ROM; iPXE gets a DHCP lease from the
engine's user-mode NAT (libslirp in both) with the boot file
http://10.0.2.2:PORT/boot.ipxe, served by this script on 127.0.0.1:PORT. That iPXE script
fetches an 8 MiB random file (big.bin) and then reports the outcome by fetching
/done/ok or /done/failed, so the result is known without reading the screen. Each run
measures, from the moment the engine process is continued (it then execs the engine):

* time to the DHCP lease: the HTTP request for boot.ipxe (iPXE asks for it right after
  its lease; it is the best proxy that needs no packet capture);
* time to download: the server has written the last byte of big.bin into the socket
  (whose send buffer is kept small, 64 KiB) and the time the guest reported /done/ok;
* pass/fail: pass only if iPXE fetched the whole file (/done/ok arrived);
* VM exits up to the /done request (or the end of the run), counted with perf on KVM's
  tracepoints as bench/boot_to_menu.py does (its ExitCounter is reused);
* from the debug console: when SeaBIOS first booted the ROM ("Booting from ROM"), how many
  times it did (above 1 means the guest was reset while iPXE started) and the "reset"
  time from the first ROM boot to the second (one SeaBIOS + iPXE start-up cycle);
* at the end of the run the screen is grabbed over VNC (vncsnapshot) and read with
  tesseract; the text is kept with the logs (iPXE prints only to the screen).

iPXE under nested KVM is slow and unreliable, even in QEMU: on the host this was written on
(kvm-pvm) every card's iPXE triple-faults in both engines when its first interrupt arrives
(dmesg: "kvm-pvm: triple fault delivering vec=8 ... rip=<iPXE's sti;hlt>"), so the guest is
reset about every 20-35 s. This is a benchmark to run by hand, never part of the CI suite.
It measures and reports; it never judges the numbers.

Requirements (installs nothing): root, /dev/kvm, Python 3.11 (standard library only),
`apt-get install ipxe-qemu qemu-system-x86 seabios linux-perf vncsnapshot tesseract-ocr`
(ipxe-qemu and qemu-system-x86 are essential; without perf the exits are reported as
unavailable, without vncsnapshot/tesseract there is no screen text).
Both engines get the same ROM file from /usr/lib/ipxe/qemu (QEMU through romfile=).
DeskVM currently gives a ROM to e1000 only; for the other cards only QEMU runs unless
--deskvm-all-cards is given. See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from boot_to_menu import (  # noqa: E402  (the same perf approach, reused)
    EXIT_EVENTS,
    LAUNCHER,
    ExitCounter,
    PerfError,
    perf_problem,
    stop,
    wait_until_stopped,
)

REPO = Path(__file__).resolve().parent.parent
QEMU = "qemu-system-x86_64"
ROM_DIR = Path("/usr/lib/ipxe/qemu")
BIG_FILE_SIZE = 8 * 1024 * 1024
SEND_BUFFER = 64 * 1024
CHUNK = 16 * 1024
POLL_INTERVAL_S = 0.05
GUEST_HOST = "10.0.2.2"  # the host as the guest sees it through the NAT (both engines)

# card name -> (DeskVM --nic model, QEMU -device model, ROM file). SeaBIOS runs a PCI ROM
# only if the vendor:device in the ROM's PCIR header matches the card's; pxe-virtio.rom says
# 1af4:1041 (modern virtio-net), so the virtio card is the modern-only one in both engines
# (QEMU patches the IDs of its default ROMs only, not of a romfile= given explicitly).
CARDS = {
    "e1000": ("e1000", "e1000", "pxe-e1000.rom"),
    "rtl8139": ("rtl8139", "rtl8139", "pxe-rtl8139.rom"),
    "virtio-net-modern": ("virtio-net-modern", "virtio-net-pci,disable-legacy=on",
                          "pxe-virtio.rom"),
}
# Cards DeskVM gives an option ROM to (vmm/core/src/machine.rs); others cannot net-boot.
DESKVM_ROM_CARDS = {"e1000"}
ENGINES = ("DeskVM", "QEMU")
EXIT_EVENT = "kvm:kvm_userspace_exit"

ROM_MARKER = b"Booting from ROM"


def boot_script(port: int) -> str:
    """The iPXE script: marks its steps on the screen, fetches big.bin, then tells the
    server how it went (so the outcome needs no screen reading) and stays at a shell."""
    base = f"http://{GUEST_HOST}:{port}"
    return "\n".join([
        "#!ipxe",
        "echo MARKER-SCRIPT",
        f"imgfetch --name big {base}/big.bin && goto fetched || goto failed",
        ":fetched",
        "echo MARKER-DONE",
        "imgstat",
        f"imgfetch --name done {base}/done/ok ||",
        "goto end",
        ":failed",
        "echo MARKER-FAILED",
        f"imgfetch --name done {base}/done/failed ||",
        ":end",
        "shell",
        "",
    ])


@dataclasses.dataclass
class Request:
    """One request the HTTP server answered."""

    time: float  # time.monotonic()
    path: str
    status: int
    bytes_sent: int = 0
    finished: float | None = None  # last byte written (big.bin)


class BootServer(http.server.ThreadingHTTPServer):
    """Serves boot.ipxe, big.bin and /done/*, recording every request."""

    daemon_threads = True

    def __init__(self, big: bytes):
        super().__init__(("127.0.0.1", 0), BootHandler)
        self.big = big
        self.script = boot_script(self.server_address[1]).encode()
        self.lock = threading.Lock()
        self.requests: list[Request] = []

    @property
    def port(self) -> int:
        return self.server_address[1]

    def begin_run(self) -> None:
        with self.lock:
            self.requests = []

    def record(self, request: Request) -> Request:
        with self.lock:
            self.requests.append(request)
        return request

    def snapshot(self) -> list[Request]:
        with self.lock:
            return list(self.requests)


class BootHandler(http.server.BaseHTTPRequestHandler):
    server: BootServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass  # requests are recorded in BootServer.requests instead

    def do_GET(self) -> None:  # noqa: N802 (the base class's name)
        now = time.monotonic()
        path = self.path.split("?")[0]
        if path == "/boot.ipxe":
            self.reply(now, path, self.server.script, "text/plain")
        elif path == "/big.bin":
            self.send_big(now, path)
        elif path.startswith("/done/"):
            self.reply(now, path, b"done\n", "text/plain")
        else:
            self.server.record(Request(now, path, 404))
            self.send_error(404)

    def reply(self, now: float, path: str, body: bytes, kind: str) -> None:
        request = self.server.record(Request(now, path, 200))
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        request.bytes_sent = len(body)
        request.finished = time.monotonic()

    def send_big(self, now: float, path: str) -> None:
        request = self.server.record(Request(now, path, 200))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(self.server.big)))
        self.end_headers()
        view = memoryview(self.server.big)
        try:
            for start in range(0, len(view), CHUNK):
                self.wfile.write(view[start:start + CHUNK])
                request.bytes_sent = min(start + CHUNK, len(view))
            self.wfile.flush()
            request.finished = time.monotonic()
        except OSError:
            self.close_connection = True


@dataclasses.dataclass
class Run:
    """The result of one engine run."""

    card: str
    engine: str
    round: int
    command: list[str]
    outcome: str = "pass"  # pass, failed (iPXE reported it), timeout, exited, skipped
    detail: str | None = None
    rom_boot_s: float | None = None  # SeaBIOS "Booting from ROM"
    lease_s: float | None = None  # boot.ipxe requested
    download_s: float | None = None  # server wrote all of big.bin
    done_s: float | None = None  # guest reported /done/*
    counted_s: float | None = None  # how long the exits were counted
    big_bytes_sent: int = 0
    big_requests: int = 0
    rom_boots: int = 0
    rom_boot_times_s: list[float] = dataclasses.field(default_factory=list)  # each ROM boot
    vm_exits: dict[str, int] | None = None
    vm_exits_unavailable: str | None = None
    screen: str | None = None
    requests: list[dict] = dataclasses.field(default_factory=list)


def free_vnc_display(start: int = 60) -> int:
    """A VNC display number whose port 5900+N is free on all addresses."""
    for display in range(start, start + 100):
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", 5900 + display))
                return display
            except OSError:
                continue
    raise RuntimeError("no free VNC port in 5960..6059")


def command_for(engine: str, card: str, port: int, memory: int, display: int,
                debugcon: Path, serial: Path, qemu_accel: str = "kvm") -> list[str]:
    deskvm_model, qemu_model, rom = CARDS[card]
    url = f"http://{GUEST_HOST}:{port}/boot.ipxe"
    if engine == "DeskVM":
        return [str(DESKVM), "run", "--memory", str(memory),
                "--nic", f"{deskvm_model},bootfile={url}",
                "--vnc", f"127.0.0.1:{display}",
                "--serial", str(serial), "--debugcon", str(debugcon)]
    return [QEMU, "-accel", qemu_accel, "-machine", "pc", "-nodefaults", "-vga", "cirrus",
            "-m", str(memory),
            "-netdev", f"user,id=n,bootfile={url}",
            "-device", f"{qemu_model},netdev=n,romfile={ROM_DIR / rom}",
            "-vnc", f"127.0.0.1:{display}",
            "-chardev", f"file,id=dbg,path={debugcon}",
            "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
            "-serial", f"file:{serial}",
            "-boot", "n"]


def read_screen(display: int, stem: Path) -> str | None:
    """Grab the VNC screen and OCR it; None if the tools are missing or it failed."""
    if not (shutil.which("vncsnapshot") and shutil.which("tesseract")):
        return None
    image = stem.with_suffix(".jpg")
    try:
        subprocess.run(["vncsnapshot", "-quiet", f"127.0.0.1:{display}", str(image)],
                       capture_output=True, timeout=20, check=True)
        result = subprocess.run(["tesseract", str(image), "-"], capture_output=True,
                                text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return "\n".join(line for line in result.stdout.splitlines() if line.strip())


def update_from_server(run: Run, requests: list[Request], started: float) -> None:
    for request in requests:
        elapsed = request.time - started
        if request.path == "/boot.ipxe" and run.lease_s is None:
            run.lease_s = elapsed
        elif request.path == "/big.bin":
            run.big_bytes_sent = max(run.big_bytes_sent, request.bytes_sent)
            if request.finished is not None and run.download_s is None:
                run.download_s = request.finished - started
        elif request.path.startswith("/done/") and run.done_s is None:
            run.done_s = elapsed
            if request.path != "/done/ok":
                run.outcome = "failed"
                run.detail = "iPXE could not fetch big.bin"
    run.big_requests = sum(1 for r in requests if r.path == "/big.bin")


def measure(engine: str, card: str, round_no: int, args: argparse.Namespace,
            server: BootServer, workdir: Path, exits_problem: str | None) -> Run:
    stem = workdir / f"{card}-{engine}-{round_no}"
    debugcon, serial, log = (stem.with_suffix(s) for s in (".debugcon", ".serial", ".log"))
    display = free_vnc_display()
    run = Run(card, engine, round_no,
              command_for(engine, card, server.port, args.memory, display, debugcon, serial,
                          args.qemu_accel))
    if engine == "DeskVM" and card not in DESKVM_ROM_CARDS and not args.deskvm_all_cards:
        run.outcome = "skipped"
        run.detail = f"DeskVM gives no option ROM to {card}"
        return run
    run.vm_exits_unavailable = exits_problem
    server.begin_run()
    env = dict(os.environ, RUST_LOG=args.rust_log) if args.rust_log else None
    counter = None
    with log.open("wb") as log_file:
        proc = subprocess.Popen(LAUNCHER + run.command, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            wait_until_stopped(proc.pid, 5.0)
            if exits_problem is None:
                counter = ExitCounter(proc.pid, stem.with_suffix(".perf.csv"),
                                      stem.with_suffix(".perf.log"))
                try:
                    counter.command("enable")
                except PerfError as error:
                    run.vm_exits_unavailable = str(error)
            started = time.monotonic()
            proc.send_signal(signal.SIGCONT)
            while True:
                elapsed = time.monotonic() - started
                update_from_server(run, server.snapshot(), started)
                text = debugcon.read_bytes() if debugcon.exists() else b""
                run.rom_boots = text.count(ROM_MARKER)
                while len(run.rom_boot_times_s) < run.rom_boots:
                    run.rom_boot_times_s.append(round(elapsed, 3))
                if run.rom_boot_times_s:
                    run.rom_boot_s = run.rom_boot_times_s[0]
                if run.done_s is not None:
                    break
                if proc.poll() is not None:
                    lines = log.read_text(errors="replace").strip().splitlines()[-3:]
                    run.outcome = "exited"
                    run.detail = f"status {proc.returncode}: " + " / ".join(lines)
                    break
                if elapsed >= args.timeout:
                    run.outcome = "timeout"
                    run.detail = f"no /done request after {args.timeout:g} s"
                    break
                time.sleep(POLL_INTERVAL_S)
            run.counted_s = round(time.monotonic() - started, 3)
            if counter and run.vm_exits_unavailable is None:
                try:
                    run.vm_exits = counter.counts()
                except PerfError as error:
                    run.vm_exits_unavailable = str(error)
            if run.done_s is not None:
                time.sleep(1.0)  # let iPXE print its last lines
            if proc.poll() is None:
                run.screen = read_screen(display, stem)
                if run.screen is not None:
                    stem.with_suffix(".screen.txt").write_text(run.screen + "\n")
        finally:
            if counter:
                counter.close()
            stop(proc)
    run.requests = [{"t": round(r.time - started, 3), "path": r.path, "status": r.status,
                     "bytes": r.bytes_sent} for r in server.snapshot()]
    if run.outcome == "pass" and run.big_bytes_sent != BIG_FILE_SIZE:
        run.outcome = "failed"
        run.detail = f"server sent {run.big_bytes_sent} of {BIG_FILE_SIZE} bytes"
    return run


def fmt(value: float | None, places: int = 1) -> str:
    return "-" if value is None else f"{value:.{places}f}"


def describe(run: Run) -> str:
    exits = run.vm_exits[EXIT_EVENT] if run.vm_exits else "n/a"
    text = (f"{run.outcome}: ROM {fmt(run.rom_boot_s)} s, lease {fmt(run.lease_s)} s, "
            f"download {fmt(run.download_s)} s, done {fmt(run.done_s)} s, "
            f"big.bin {run.big_bytes_sent}/{BIG_FILE_SIZE} B in {run.big_requests} req, "
            f"ROM boots {run.rom_boots}, exits {exits}")
    if run.detail:
        text += f" ({run.detail})"
    return text


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: list[Run]) -> list[dict]:
    """Per card and engine: passes and the medians over the passing runs (the lease and
    ROM times over every run that got that far)."""
    rows = []
    for card in CARDS:
        for engine in ENGINES:
            mine = [r for r in runs if r.card == card and r.engine == engine
                    and r.outcome != "skipped"]
            if not mine:
                continue
            passed = [r for r in mine if r.outcome == "pass"]
            rows.append({
                "card": card, "engine": engine, "passes": len(passed), "rounds": len(mine),
                "rom_boot_s": median([r.rom_boot_s for r in mine]),
                "lease_s": median([r.lease_s for r in mine]),
                "rom_cycle_s": median([r.rom_boot_times_s[1] - r.rom_boot_times_s[0]
                                       for r in mine if len(r.rom_boot_times_s) > 1]),
                "download_s": median([r.download_s for r in passed]),
                "done_s": median([r.done_s for r in passed]),
                "exits": median([r.vm_exits[EXIT_EVENT] if r.vm_exits else None
                                 for r in passed]),
                "exits_per_s": median([r.vm_exits[EXIT_EVENT] / r.counted_s
                                       if r.vm_exits and r.counted_s else None for r in mine]),
            })
    return rows


def print_report(rows: list[dict], runs: list[Run], args: argparse.Namespace) -> None:
    print("\n== results (medians; ROM, reset and lease over all runs that got there, "
          "download, done and exits over passing runs) ==")
    head = (f"{'card':18}{'engine':8}{'passes':>8}{'ROM s':>8}{'reset s':>9}{'lease s':>9}"
            f"{'download s':>12}{'done s':>8}{'exits':>12}{'exits/s':>9}")
    print(head)
    for row in rows:
        exits = fmt(row["exits"], 0)
        print(f"{row['card']:18}{row['engine']:8}{row['passes']:>4}/{row['rounds']:<3}"
              f"{fmt(row['rom_boot_s']):>8}{fmt(row['rom_cycle_s']):>9}{fmt(row['lease_s']):>9}"
              f"{fmt(row['download_s']):>12}{fmt(row['done_s']):>8}{exits:>12}"
              f"{fmt(row['exits_per_s'], 0):>9}")
    print("\nratios DeskVM/QEMU (of the medians):")
    for card in CARDS:
        pair = {r["engine"]: r for r in rows if r["card"] == card}
        if len(pair) < 2:
            continue
        cells = []
        for key in ("rom_boot_s", "rom_cycle_s", "lease_s", "download_s", "done_s", "exits",
                    "exits_per_s"):
            d, q = pair["DeskVM"][key], pair["QEMU"][key]
            cells.append(f"{key} {d / q:.3g}" if d is not None and q else f"{key} n/a")
        print(f"  {card}: " + ", ".join(cells))
    skipped = sorted({f"{r.card} {r.engine}: {r.detail}" for r in runs if r.outcome == "skipped"})
    for line in skipped:
        print(f"  skipped {line}")
    for reason in sorted({r.vm_exits_unavailable for r in runs if r.vm_exits_unavailable}):
        print(f"\nVM exits: unavailable ({reason})")
    failed = [r for r in runs if r.outcome not in ("pass", "skipped")]
    if failed:
        print("\n== runs that did not pass (last screen lines) ==")
        for run in failed:
            print(f"  round {run.round} {run.card} {run.engine}: {run.outcome}: {run.detail}")
            for line in (run.screen or "(no screen text)").splitlines()[-4:]:
                print(f"      | {line}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="iPXE network boot over the NAT (DHCP lease, 8 MiB HTTP download), "
                    "DeskVM against QEMU.")
    parser.add_argument("--rounds", type=int, default=3, metavar="N",
                        help="rounds; each runs every card in DeskVM then QEMU (default 3)")
    parser.add_argument("--cards", default="e1000", metavar="LIST",
                        help=f"comma-separated cards from {', '.join(CARDS)} (default e1000)")
    parser.add_argument("--engines", default=",".join(ENGINES), metavar="LIST",
                        help="comma-separated engines (default DeskVM,QEMU)")
    parser.add_argument("--timeout", type=float, default=240.0, metavar="SECONDS",
                        help="give up on a run after this long (default 240)")
    parser.add_argument("--memory", type=int, default=256, metavar="MIB",
                        help="guest memory for both engines (default 256)")
    parser.add_argument("--deskvm", type=Path, metavar="PATH",
                        help="the deskvm binary (default: $CARGO_TARGET_DIR or "
                             "target/ release/deskvm)")
    parser.add_argument("--qemu-accel", choices=("kvm", "tcg"), default="kvm",
                        help="QEMU's accelerator; tcg (software, no exits) checks the "
                             "script and server where iPXE fails under KVM (default kvm)")
    parser.add_argument("--deskvm-all-cards", action="store_true",
                        help="run DeskVM for cards it gives no ROM to as well")
    parser.add_argument("--rust-log", metavar="FILTER",
                        help="RUST_LOG for DeskVM (e.g. debug); the log is kept with --keep")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep every run's logs, debug console, screen and perf output")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write every run and the summary as JSON")
    args = parser.parse_args()
    args.cards = [c for c in args.cards.split(",") if c]
    args.engines = [e for e in args.engines.split(",") if e]
    for card in args.cards:
        if card not in CARDS:
            parser.error(f"unknown card {card!r} (one of {', '.join(CARDS)})")
    for engine in args.engines:
        if engine not in ENGINES:
            parser.error(f"unknown engine {engine!r} (DeskVM or QEMU)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def default_deskvm() -> Path:
    target = os.environ.get("CARGO_TARGET_DIR")
    return Path(target) / "release" / "deskvm" if target else REPO / "target/release/deskvm"


DESKVM = default_deskvm()


def main() -> int:
    global DESKVM
    args = parse_args()
    if args.deskvm:
        DESKVM = args.deskvm
    problems = []
    if not Path("/dev/kvm").exists():
        problems.append("/dev/kvm not found")
    if "QEMU" in args.engines and shutil.which(QEMU) is None:
        problems.append(f"{QEMU} not found (apt-get install qemu-system-x86)")
    if "DeskVM" in args.engines and not DESKVM.exists():
        problems.append(f"{DESKVM} not found (cargo build --release -p deskvm)")
    for card in args.cards:
        if not (ROM_DIR / CARDS[card][2]).exists():
            problems.append(f"{ROM_DIR / CARDS[card][2]} not found (apt-get install ipxe-qemu)")
    if problems:
        sys.exit("cannot run: " + "; ".join(problems))

    exits_problem = perf_problem()
    server = BootServer(os.urandom(BIG_FILE_SIZE))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"HTTP server on 127.0.0.1:{server.port}; DeskVM {DESKVM}; "
          f"{args.rounds} rounds, timeout {args.timeout:g} s", flush=True)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="deskvm-ipxe-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for round_no in range(1, args.rounds + 1):
            for card in args.cards:
                for engine in args.engines:
                    run = measure(engine, card, round_no, args, server, workdir,
                                  exits_problem)
                    runs.append(run)
                    print(f"round {round_no}/{args.rounds} {card:17} {engine:6} "
                          f"{describe(run)}", flush=True)
    server.shutdown()
    rows = summarize(runs)
    print_report(rows, runs, args)
    if args.json:
        args.json.write_text(json.dumps({
            "settings": {"rounds": args.rounds, "timeout_s": args.timeout,
                         "memory_mib": args.memory, "big_file_bytes": BIG_FILE_SIZE,
                         "deskvm": str(DESKVM), "exit_events": list(EXIT_EVENTS)},
            "runs": [dataclasses.asdict(r) for r in runs],
            "summary": rows,
        }, indent=2) + "\n")
        print(f"\nraw results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
