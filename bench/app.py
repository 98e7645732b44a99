#!/usr/bin/env python3
"""App benchmark: the DeskVM GNOME app against QEMU's own GTK window, on the same guests,
under a private Xvfb (1280x1024x24) and session bus.

Figures, each for DeskVM (the app, engine in-process) and for QEMU 7.2 + KVM with
`-display gtk -vga cirrus`:
  start    process start until its window is mapped and viewable (polled with xdotool
           every 10 ms): `deskvm` with no arguments until the "DeskVM" window, QEMU until
           its "QEMU" window;
  frame    guest framebuffer write to pixels in the window: the VBE boot sector of
           vmm/core/tests/display.rs (assembled here with nasm) sets mode 0x117, paints red
           over blue and then writes VBE-DONE to the debug console (port 0x402); the time
           from the marker appearing in the debugcon file to the first capture of the
           window (`xwd -id`) showing red or blue pixels in the middle of the screen. The
           capture loop's period (printed) bounds the resolution;
  idle     process CPU time (all threads, /proc/PID/stat utime+stime) over 10 s while an
           idle VM's screen is shown: SeaBIOS's boot menu ("Select boot device", reached
           with Esc) in VGA text mode, whose only change is the blinking cursor (DeskVM's
           VGA toggles it every 8 frames of 60 Hz, QEMU every 266 ms, so DeskVM's screen
           changes about twice as often). In DeskVM the console page of that VM is open;
  static   the same for a screen that never changes: the VBE guest of `frame` after its
           marker (1024x768 graphics, the guest halted with interrupts off). This is the
           floor: the engine and the GUI with nothing to draw.
The busiest threads of each idle run are listed (/proc/PID/task/*/comm): `llvmpipe-N` are
Mesa's software GL threads (GTK 4's default GL renderer on a machine without a GPU), `vcpu0`
and `vmm-engine` DeskVM's engine, the process name its main (GTK) thread. GSK_RENDERER in
the environment reaches the app (e.g. GSK_RENDERER=cairo); QEMU's GTK 3 window ignores it.

DeskVM's app is driven without AT-SPI: the library row is clicked at its place in the
1024x720 window (no window manager, so the window sits at 0,0), the VM is started through
the app's exported GAction `app.run` (gdbus), Esc is typed with xdotool into the console.
QEMU's Esc goes through its monitor (`sendkey esc`).

Python 3 standard library only. Needs Xvfb, xdotool, xwd (x11-apps), gdbus (libglib2.0-bin),
dbus-run-session, nasm, qemu-system-x86_64, SeaBIOS, and a built deskvm.
Usage: bench/app.py [--deskvm target/debug/deskvm] [--rounds 3] [--idle 10] [--json FILE]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
VBE_ASM_SOURCE = os.path.join(ROOT, "vmm", "core", "tests", "display.rs")
MODE_OFFSET = 0x1FA
APP_ID = "io.github.deskvm.DeskVM"


# --- helpers ------------------------------------------------------------------------------

def vbe_image(workdir, mode=0x117):
    """Assembles the VBE boot sector of the engine test and writes a 1 MiB raw disk."""
    text = open(VBE_ASM_SOURCE).read()
    key = 'const VBE_BOOT_SECTOR: &str = r#"'
    start = text.index(key) + len(key)
    source = text[start:text.index('"#;', start)]
    asm = os.path.join(workdir, "vbe.asm")
    binary = os.path.join(workdir, "vbe.bin")
    with open(asm, "w") as f:
        f.write(source)
    subprocess.run(["nasm", "-f", "bin", "-o", binary, asm], check=True)
    sector = bytearray(open(binary, "rb").read())
    sector[MODE_OFFSET:MODE_OFFSET + 2] = struct.pack("<H", mode)
    sector += bytes((1 << 20) - len(sector))
    image = os.path.join(workdir, "vbe.img")
    with open(image, "wb") as f:
        f.write(sector)
    return image


def cpu_seconds(pid):
    """User + system CPU time of a process (all threads) in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def start_xvfb(log):
    read_fd, write_fd = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0",
                             "1280x1024x24", "-nolisten", "tcp"], pass_fds=(write_fd,),
                            stdout=log, stderr=log)
    os.close(write_fd)
    number = b""
    with os.fdopen(read_fd, "rb") as f:
        while not number.endswith(b"\n"):
            chunk = f.read(1)
            if not chunk:
                break
            number += chunk
    os.environ["DISPLAY"] = ":%s" % number.decode().strip()
    os.environ.pop("XAUTHORITY", None)
    return xvfb


def xdotool(*args):
    return subprocess.run(["xdotool", *args], capture_output=True, text=True)


def find_window(name_regex):
    out = xdotool("search", "--onlyvisible", "--name", name_regex).stdout.split()
    return out[0] if out else None


def wait_window(name_regex, timeout=60):
    """Polls every 10 ms for a viewable window; returns (id, time found)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        wid = find_window(name_regex)
        if wid:
            return wid, time.monotonic()
        time.sleep(0.01)
    return None, None


def wait_file_text(path, text, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(path, "rb") as f:
                if text in f.read():
                    return time.monotonic()
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    return None


def capture(window_id):
    """The window's pixels as (width, height, pixel(x, y) -> (r, g, b)) from `xwd`."""
    data = subprocess.run(["xwd", "-silent", "-id", window_id], capture_output=True,
                          check=True).stdout
    header = struct.unpack(">25I", data[:100])
    header_size, width, height = header[0], header[4], header[5]
    byte_order, bits_per_pixel, bytes_per_line = header[7], header[11], header[12]
    red_mask, green_mask, blue_mask, ncolors = header[14], header[15], header[16], header[19]
    base = header_size + 12 * ncolors
    step = bits_per_pixel // 8
    order = "little" if byte_order == 0 else "big"

    def channel(value, mask):
        shift = (mask & -mask).bit_length() - 1
        full = mask >> shift
        return ((value & mask) >> shift) * 255 // max(full, 1)

    def pixel(x, y):
        offset = base + y * bytes_per_line + x * step
        value = int.from_bytes(data[offset:offset + step], order)
        return channel(value, red_mask), channel(value, green_mask), channel(value, blue_mask)
    return width, height, pixel


def shows_vbe_colours(window_id):
    """True when the window shows the guest's finished frame: red in the upper half and
    blue near the bottom (the last rows the guest paints before its marker)."""
    width, height, pixel = capture(window_id)

    def red(p):
        return p[0] > 160 and p[1] < 90 and p[2] < 90

    def blue(p):
        return p[2] > 160 and p[0] < 90 and p[1] < 90
    return (red(pixel(width // 2, int(height * 0.35)))
            and blue(pixel(width // 2, int(height * 0.95)))
            and blue(pixel(width // 4, int(height * 0.95))))


def watch_marker(path, found, stop_event):
    """Timestamps the debugcon marker (polled every millisecond, in a thread)."""
    while not stop_event.is_set():
        try:
            with open(path, "rb") as f:
                if b"VBE-DONE" in f.read():
                    found.append(time.monotonic())
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.001)


def measure_frame(window_id, debugcon, timeout=120):
    """Captures the window until the finished VBE frame shows. Returns (lower, upper,
    period): the frame was in the window between `lower` and `upper` seconds after the
    debugcon marker (start and end of the first capture that held it; a negative lower
    bound means the capture began before the marker), and the mean capture period."""
    marker = []
    stop_event = threading.Event()
    watcher = threading.Thread(target=watch_marker, args=(debugcon, marker, stop_event))
    watcher.start()
    captures = 0
    first = time.monotonic()
    end = first + timeout
    hit = None
    try:
        while time.monotonic() < end:
            before = time.monotonic()
            ok = shows_vbe_colours(window_id)
            after = time.monotonic()
            captures += 1
            if ok:
                hit = (before, after)
                break
        watcher.join(timeout=5)
    finally:
        stop_event.set()
        watcher.join()
    period = (time.monotonic() - first) / max(captures, 1)
    if hit is None or not marker:
        return None, None, period
    return hit[0] - marker[0], hit[1] - marker[0], period


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def thread_cpu(pid):
    """CPU seconds per thread name (/proc/PID/task/*/comm and stat), threads of one name
    summed."""
    per_name = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                name = f.read().strip()
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        per_name[name] = per_name.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return per_name


def measure_idle(pid, seconds):
    """Percent of one core the process used over `seconds`, and the busiest threads."""
    time.sleep(2)  # let the menu settle
    c0, t0, th0 = cpu_seconds(pid), time.monotonic(), thread_cpu(pid)
    time.sleep(seconds)
    c1, t1, th1 = cpu_seconds(pid), time.monotonic(), thread_cpu(pid)
    span = t1 - t0
    threads = {n: 100.0 * (v - th0.get(n, 0.0)) / span for n, v in th1.items()}
    busiest = sorted(threads.items(), key=lambda kv: -kv[1])[:4]
    return 100.0 * (c1 - c0) / span, [(n, round(v, 1)) for n, v in busiest if v > 0]


# --- DeskVM's app -------------------------------------------------------------------------

def write_vm(library, name, body):
    folder = os.path.join(library, name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vm.toml"), "w") as f:
        f.write('name = "%s"\n' % name + body)


def app_env(home):
    env = dict(os.environ)
    env.update({"XDG_DATA_HOME": home + "/data", "XDG_CACHE_HOME": home + "/cache",
                "XDG_CONFIG_HOME": home + "/config", "GSETTINGS_BACKEND": "memory",
                "GDK_BACKEND": "x11", "LANGUAGE": "en", "NO_AT_BRIDGE": "1"})
    return env


def start_app(deskvm, home, log):
    """Starts the app; returns (process, window id, seconds to the mapped window)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([deskvm], env=app_env(home), stdout=log, stderr=subprocess.STDOUT)
    wid, found = wait_window("^DeskVM$")
    return proc, wid, (found - t0) if found else None


def open_and_run(name):
    """Opens the only VM of the library (its row is the first, at y≈100) and runs it."""
    wid = None
    for _ in range(10):  # the row may not be laid out yet when the window maps
        xdotool("mousemove", "--sync", "512", "100")
        xdotool("click", "1")
        wid, _ = wait_window("^%s — DeskVM$" % name, 1)
        if wid:
            break
    if wid is None:
        raise RuntimeError("clicking the library row did not open " + name)
    gdbus = subprocess.run(
        ["gdbus", "call", "--session", "--dest", APP_ID, "--object-path",
         "/" + APP_ID.replace(".", "/"), "--method", "org.gtk.Actions.Activate", "run",
         "[<'%s'>]" % name, "{}"], capture_output=True, text=True)
    if gdbus.returncode != 0:
        raise RuntimeError("gdbus: " + gdbus.stderr)
    return wid


def deskvm_rounds(deskvm, image, workdir, rounds):
    results = []
    for i in range(rounds):
        home = tempfile.mkdtemp(dir=workdir, prefix="app-")
        debugcon = home + "/debugcon.txt"
        write_vm(home + "/data/deskvm/vms", "VBE",
                 'memory_mib = 128\ncpus = 1\ndebugcon = "%s"\nboot_order = "disk"\n\n'
                 '[[drives]]\nkind = "disk"\npath = "%s"\nread_only = true\n'
                 % (debugcon, image))
        with open(home + "/app.log", "w") as log:
            proc, wid, start = start_app(deskvm, home, log)
            try:
                if wid is None:
                    raise RuntimeError("no DeskVM window; see " + home + "/app.log")
                vm_wid = open_and_run("VBE")
                low, high, period = measure_frame(vm_wid, debugcon)
            finally:
                stop(proc)
        results.append({"start": start, "frame": high, "frame_lower": low,
                        "capture_period": period})
        print("  DeskVM round %d: start %.3f s, frame %s..%s after the marker "
              "(captures every %.0f ms)" % (i + 1, start, fmt_ms(low), fmt_ms(high),
                                            period * 1000), flush=True)
    return results


def deskvm_idle(deskvm, workdir, seconds):
    home = tempfile.mkdtemp(dir=workdir, prefix="idle-")
    debugcon = home + "/debugcon.txt"
    write_vm(home + "/data/deskvm/vms", "Menu",
             'memory_mib = 128\ncpus = 1\ndebugcon = "%s"\n\n[firmware]\nboot_menu = true\n'
             'boot_menu_timeout_ms = 60000\n' % debugcon)
    with open(home + "/app.log", "w") as log:
        proc, wid, _ = start_app(deskvm, home, log)
        try:
            open_and_run("Menu")
            if wait_file_text(debugcon, b"Press ESC for boot menu", 120) is None:
                raise RuntimeError("DeskVM: no boot-menu prompt")
            xdotool("mousemove", "--sync", "512", "400")  # the console
            xdotool("click", "1")
            time.sleep(0.2)
            xdotool("key", "Escape")
            if wait_file_text(debugcon, b"Select boot device", 20) is None:
                raise RuntimeError("DeskVM: Esc did not open the boot menu")
            return measure_idle(proc.pid, seconds)
        finally:
            stop(proc)


def deskvm_idle_static(deskvm, image, workdir, seconds):
    """Idle CPU with the VBE guest's final frame shown (it halts after its marker)."""
    home = tempfile.mkdtemp(dir=workdir, prefix="static-")
    debugcon = home + "/debugcon.txt"
    write_vm(home + "/data/deskvm/vms", "VBE",
             'memory_mib = 128\ncpus = 1\ndebugcon = "%s"\nboot_order = "disk"\n\n'
             '[[drives]]\nkind = "disk"\npath = "%s"\nread_only = true\n'
             % (debugcon, image))
    with open(home + "/app.log", "w") as log:
        proc, wid, _ = start_app(deskvm, home, log)
        try:
            if wid is None:
                raise RuntimeError("no DeskVM window; see " + home + "/app.log")
            open_and_run("VBE")
            if wait_file_text(debugcon, b"VBE-DONE", 120) is None:
                raise RuntimeError("DeskVM: the VBE guest did not finish")
            return measure_idle(proc.pid, seconds)
        finally:
            stop(proc)


# --- QEMU ---------------------------------------------------------------------------------

def qemu_command(debugcon, extra):
    return ["qemu-system-x86_64", "-enable-kvm", "-machine", "pc", "-nodefaults",
            "-vga", "cirrus", "-m", "128", "-display", "gtk", "-chardev",
            "file,id=dc,path=%s" % debugcon, "-device", "isa-debugcon,iobase=0x402,chardev=dc",
            "-no-reboot"] + extra


def qemu_rounds(image, workdir, rounds):
    results = []
    for i in range(rounds):
        debugcon = tempfile.mktemp(dir=workdir, prefix="qemu-dc-")
        t0 = time.monotonic()
        proc = subprocess.Popen(qemu_command(debugcon, ["-drive", "file=%s,format=raw,if=ide,"
                                                        "snapshot=on" % image]),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, NO_AT_BRIDGE="1"))
        try:
            wid, found = wait_window("^QEMU")
            if wid is None:
                raise RuntimeError("no QEMU window")
            low, high, period = measure_frame(wid, debugcon)
        finally:
            stop(proc)
        start = found - t0
        results.append({"start": start, "frame": high, "frame_lower": low,
                        "capture_period": period})
        print("  QEMU   round %d: start %.3f s, frame %s..%s after the marker "
              "(captures every %.0f ms)" % (i + 1, start, fmt_ms(low), fmt_ms(high),
                                            period * 1000), flush=True)
    return results


def qemu_idle(workdir, seconds):
    debugcon = tempfile.mktemp(dir=workdir, prefix="qemu-idle-dc-")
    monitor = tempfile.mktemp(dir=workdir, prefix="qemu-mon-")
    proc = subprocess.Popen(qemu_command(debugcon, [
        "-boot", "menu=on,splash-time=60000", "-monitor", "unix:%s,server=on,wait=off"
        % monitor]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, NO_AT_BRIDGE="1"))
    try:
        if wait_file_text(debugcon, b"Press ESC for boot menu", 120) is None:
            raise RuntimeError("QEMU: no boot-menu prompt")
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(monitor)
            s.sendall(b"sendkey esc\n")
            time.sleep(0.3)
        if wait_file_text(debugcon, b"Select boot device", 20) is None:
            raise RuntimeError("QEMU: Esc did not open the boot menu")
        return measure_idle(proc.pid, seconds)
    finally:
        stop(proc)


def qemu_idle_static(image, workdir, seconds):
    debugcon = tempfile.mktemp(dir=workdir, prefix="qemu-static-dc-")
    proc = subprocess.Popen(qemu_command(debugcon, ["-drive", "file=%s,format=raw,if=ide,"
                                                    "snapshot=on" % image]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, NO_AT_BRIDGE="1"))
    try:
        if wait_file_text(debugcon, b"VBE-DONE", 120) is None:
            raise RuntimeError("QEMU: the VBE guest did not finish")
        return measure_idle(proc.pid, seconds)
    finally:
        stop(proc)


# --- report -------------------------------------------------------------------------------

def fmt_ms(seconds):
    return "—" if seconds is None else "%.0f ms" % (seconds * 1000)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    """a/b; none when b is not positive (a latency within the capture resolution)."""
    return "—" if a is None or b is None or b <= 0 else "%.2f" % (a / b)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deskvm", default=os.path.join(ROOT, "target", "debug", "deskvm"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    if "DESKVM_BENCH_IN_SESSION" not in os.environ:  # a private session bus for gdbus
        os.environ["DESKVM_BENCH_IN_SESSION"] = "1"
        os.execvp("dbus-run-session", ["dbus-run-session", "--", sys.executable,
                                      os.path.abspath(__file__), *sys.argv[1:]])
    deskvm = os.path.abspath(args.deskvm)
    for tool in ("Xvfb", "xdotool", "xwd", "gdbus", "nasm", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            sys.exit("missing: %s" % tool)
    workdir = tempfile.mkdtemp(prefix="deskvm-app-bench-")
    xvfb_log = open(os.path.join(workdir, "xvfb.log"), "w")
    xvfb = start_xvfb(xvfb_log)
    try:
        image = vbe_image(workdir)
        print("start and frame latency (%d rounds each, alternating engines)" % args.rounds)
        d_runs, q_runs = [], []
        for _ in range(args.rounds):
            d_runs += deskvm_rounds(deskvm, image, workdir, 1)
            q_runs += qemu_rounds(image, workdir, 1)
        print("renderer of the app: %s" % (("GSK_RENDERER=" + os.environ["GSK_RENDERER"])
                                             if os.environ.get("GSK_RENDERER")
                                             else "GTK's default"))
        print("idle CPU over %.0f s with SeaBIOS's boot menu shown" % args.idle)
        d_idle, d_threads = deskvm_idle(deskvm, workdir, args.idle)
        print("  DeskVM: %.1f %% of one core; busiest threads (%% of a core): %s"
              % (d_idle, d_threads), flush=True)
        q_idle, q_threads = qemu_idle(workdir, args.idle)
        print("  QEMU:   %.1f %% of one core; busiest threads (%% of a core): %s"
              % (q_idle, q_threads), flush=True)
        print("idle CPU over %.0f s with the VBE guest's static frame shown" % args.idle)
        d_static, d_static_threads = deskvm_idle_static(deskvm, image, workdir, args.idle)
        print("  DeskVM: %.1f %% of one core; busiest threads (%% of a core): %s"
              % (d_static, d_static_threads), flush=True)
        q_static, q_static_threads = qemu_idle_static(image, workdir, args.idle)
        print("  QEMU:   %.1f %% of one core; busiest threads (%% of a core): %s"
              % (q_static, q_static_threads), flush=True)
    except Exception:
        if xvfb.poll() is not None:
            print("Xvfb ended (%s); its log: %s" % (xvfb.returncode, xvfb_log.name))
        raise
    finally:
        xvfb.terminate()
        xvfb.wait()
    summary = {
        "start_s": {"deskvm": median([r["start"] for r in d_runs]),
                    "qemu": median([r["start"] for r in q_runs])},
        "frame_s": {"deskvm": median([r["frame"] for r in d_runs]),
                    "qemu": median([r["frame"] for r in q_runs])},
        "idle_cpu_percent": {"deskvm": d_idle, "qemu": q_idle},
        "idle_threads": {"deskvm": d_threads, "qemu": q_threads},
        "static_cpu_percent": {"deskvm": d_static, "qemu": q_static},
        "static_threads": {"deskvm": d_static_threads, "qemu": q_static_threads},
        "gsk_renderer": os.environ.get("GSK_RENDERER") or None,
    }
    print()
    print("| figure (median)                  | DeskVM app | QEMU GTK | DeskVM/QEMU |")
    print("|----------------------------------|-----------:|---------:|------------:|")
    s, f, c = summary["start_s"], summary["frame_s"], summary["idle_cpu_percent"]
    print("| start to mapped window           | %8.0f ms | %6.0f ms | %11s |"
          % (s["deskvm"] * 1000, s["qemu"] * 1000, ratio(s["deskvm"], s["qemu"])))
    print("| debugcon marker to pixels (max)  | %10s | %8s | %11s |"
          % (fmt_ms(f["deskvm"]), fmt_ms(f["qemu"]), ratio(f["deskvm"], f["qemu"])))
    print("| idle CPU, boot menu shown        | %8.1f %% | %6.1f %% | %11s |"
          % (c["deskvm"], c["qemu"], ratio(c["deskvm"], c["qemu"])))
    c = summary["static_cpu_percent"]
    print("| idle CPU, static VBE frame       | %8.1f %% | %6.1f %% | %11s |"
          % (c["deskvm"], c["qemu"], ratio(c["deskvm"], c["qemu"])))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"deskvm": d_runs, "qemu": q_runs, "summary": summary}, out, indent=2)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
