#!/usr/bin/env python3
"""VNC display benchmark: DeskVM against QEMU on the same screens, one minimal RFB client.

Scenarios (each run under DeskVM, then under QEMU 7.2 + KVM with -vga cirrus):
  menu  SeaBIOS to its "Press ESC for boot menu" prompt (boot menu on, no drives)
  vbe   a boot sector that sets VBE mode 0x117 (1024x768x16, linear framebuffer), paints
        red over blue and writes VBE-DONE to the debug console (the image
        vmm/core/tests/display.rs builds, assembled here with nasm)

Measured per run: bytes the client received until the target screen (menu: the screen
stopped changing for 1 s after the firmware started; vbe: the client holds the red/blue
frame), the update latency (vbe: debugcon marker -> client holds the final frame), and the
VMM process's CPU time from /proc/PID/stat while the static menu is shown for 10 s (idle
cost) and from start until the VBE frame arrived. Figures are printed with DeskVM/QEMU
ratios. Python 3 standard library only; needs nasm, qemu-system-x86_64, SeaBIOS.

Usage: bench/vnc_display.py [--deskvm target/release/deskvm] [--idle 10]
"""

import argparse
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")

VBE_ASM_SOURCE = os.path.join(ROOT, "vmm", "core", "tests", "display.rs")
MODE_OFFSET = 0x1FA


def vbe_image(workdir, mode=0x117):
    """Assembles the VBE boot sector of the engine test and writes a 1 MiB raw disk."""
    text = open(VBE_ASM_SOURCE).read()
    start = text.index('const VBE_BOOT_SECTOR: &str = r#"') + len('const VBE_BOOT_SECTOR: &str = r#"')
    source = text[start:text.index('"#;', start)]
    asm = os.path.join(workdir, "vbe.asm")
    binary = os.path.join(workdir, "vbe.bin")
    open(asm, "w").write(source)
    subprocess.run(["nasm", "-f", "bin", "-o", binary, asm], check=True)
    sector = bytearray(open(binary, "rb").read())
    sector[MODE_OFFSET:MODE_OFFSET + 2] = struct.pack("<H", mode)
    sector += bytes((1 << 20) - len(sector))
    image = os.path.join(workdir, "vbe-%x.img" % mode)
    open(image, "wb").write(sector)
    return image


def cpu_seconds(pid):
    """User + system CPU time of a process (all threads) in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Rfb:
    """RFB 3.8, None security, 32-bit true colour, Raw + DesktopSize, incremental loop."""

    def __init__(self, port, timeout=60):
        deadline = time.time() + timeout
        while True:
            try:
                self.s = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.received = 0
        version = self.read(12)
        assert version.startswith(b"RFB "), version
        self.s.sendall(b"RFB 003.008\n")
        count = self.read(1)[0]
        types = self.read(count)
        assert 1 in types, types
        self.s.sendall(b"\x01")
        assert struct.unpack(">I", self.read(4))[0] == 0
        self.s.sendall(b"\x01")
        self.width, self.height = struct.unpack(">HH", self.read(4))
        self.read(16)
        self.read(struct.unpack(">I", self.read(4))[0])
        self.fb = bytearray(self.width * self.height * 4)
        pf = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
        self.s.sendall(b"\x00\x00\x00\x00" + pf)
        self.s.sendall(struct.pack(">BBHii", 2, 0, 2, 0, -223))
        self.request(False)
        self.last_change = time.time()

    def read(self, n):
        out = bytearray()
        while len(out) < n:
            chunk = self.s.recv(n - len(out))
            if not chunk:
                raise EOFError("server closed the connection")
            out += chunk
        self.received += n
        return bytes(out)

    def request(self, incremental):
        self.s.sendall(struct.pack(">BBHHHH", 3, int(incremental), 0, 0, self.width, self.height))

    def pump(self, timeout):
        """Reads one server message (or returns False after `timeout`)."""
        self.s.settimeout(timeout)
        try:
            kind = self.s.recv(1)
        except socket.timeout:
            return False
        finally:
            self.s.settimeout(30)
        if not kind:
            raise EOFError("server closed the connection")
        self.received += 1
        if kind[0] == 0:
            _, count = struct.unpack(">BH", self.read(3))
            resized = False
            for _ in range(count):
                x, y, w, h, enc = struct.unpack(">HHHHi", self.read(12))
                if w * h > 9 * 16:  # more than the blinking cursor's cell
                    self.last_change = time.time()
                if enc == 0:
                    data = self.read(w * h * 4)
                    for row in range(h):
                        at = ((y + row) * self.width + x) * 4
                        self.fb[at:at + w * 4] = data[row * w * 4:(row + 1) * w * 4]
                elif enc == -223:
                    self.width, self.height = w, h
                    self.fb = bytearray(w * h * 4)
                    resized = True
                else:
                    raise RuntimeError("unexpected encoding %d" % enc)
            self.request(not resized)
        elif kind[0] == 2:
            pass
        elif kind[0] == 3:
            self.read(3)
            self.read(struct.unpack(">I", self.read(4))[0])
        else:
            raise RuntimeError("unexpected message %d" % kind[0])
        return True

    def pixel(self, x, y):
        at = (y * self.width + x) * 4
        b, g, r = self.fb[at], self.fb[at + 1], self.fb[at + 2]
        return r, g, b

    def red_over_blue(self, size):
        if (self.width, self.height) != size:
            return False
        w, h = size
        for y in (0, h // 4, h // 2 - 1):
            for x in (0, w // 2, w - 1):
                r, g, b = self.pixel(x, y)
                if not (r >= 0xF0 and g < 0x10 and b < 0x10):
                    return False
        for y in (h // 2, 3 * h // 4, h - 1):
            for x in (0, w // 2, w - 1):
                r, g, b = self.pixel(x, y)
                if not (b >= 0xF0 and g < 0x10 and r < 0x10):
                    return False
        return True

    def lit(self):
        return any(self.fb[i] for i in range(0, len(self.fb), 4))


def free_display(start):
    for d in range(start, start + 50):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 5900 + d))
                return d
            except OSError:
                continue
    raise RuntimeError("no free VNC display")


def launch(vmm, display, workdir, disk, debugcon, deskvm):
    if vmm == "deskvm":
        cmd = [deskvm, "run", "--vnc", "127.0.0.1:%d" % display, "--memory", "128",
               "--debugcon", debugcon]
        if disk:
            cmd += ["--disk", disk, "--boot", "disk"]
        else:
            cmd += ["--boot-menu"]
    else:
        cmd = ["qemu-system-x86_64", "-enable-kvm", "-machine", "pc", "-nodefaults",
               "-vga", "cirrus", "-vnc", "127.0.0.1:%d" % display, "-m", "128",
               "-display", "none", "-chardev", "file,id=dc,path=%s" % debugcon,
               "-device", "isa-debugcon,iobase=0x402,chardev=dc"]
        if disk:
            cmd += ["-drive", "file=%s,format=raw,if=ide" % disk]
        else:
            cmd += ["-boot", "menu=on"]
    log = open(os.path.join(workdir, "%s.log" % vmm), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def run_menu(vmm, workdir, deskvm, idle_seconds):
    display = free_display(40 + os.getpid() % 50)
    debugcon = os.path.join(workdir, "%s-menu.debugcon" % vmm)
    started = time.time()
    proc = launch(vmm, display, workdir, None, debugcon, deskvm)
    try:
        client = Rfb(5900 + display)
        # The target: "Press ESC" on the debug console, then 1 s more for the screen to
        # settle (a fixed wait: a blinking text cursor never lets the screen be "quiet").
        deadline = started + 120
        prompt_seen = None
        while time.time() < deadline:
            client.pump(0.2)
            text = open(debugcon, errors="replace").read() if os.path.exists(debugcon) else ""
            if prompt_seen is None and "Press ESC" in text and client.lit():
                prompt_seen = time.time()
            if prompt_seen is not None and time.time() - prompt_seen > 1.0:
                break
        else:
            raise RuntimeError("%s: boot menu not reached" % vmm)
        result = {"menu_bytes": client.received, "menu_seconds": time.time() - started}
        before = cpu_seconds(proc.pid)
        t0 = time.time()
        while time.time() - t0 < idle_seconds:
            client.pump(0.2)
        result["idle_cpu_percent"] = 100 * (cpu_seconds(proc.pid) - before) / (time.time() - t0)
        result["idle_bytes"] = client.received - result["menu_bytes"]
        return result
    finally:
        proc.terminate()
        proc.wait(10)


def run_vbe(vmm, workdir, deskvm, image):
    display = free_display(40 + os.getpid() % 50)
    debugcon = os.path.join(workdir, "%s-vbe.debugcon" % vmm)
    started = time.time()
    proc = launch(vmm, display, workdir, image, debugcon, deskvm)
    try:
        client = Rfb(5900 + display)
        marker_at = None
        deadline = started + 180
        while time.time() < deadline:
            client.pump(0.01)
            if marker_at is None and os.path.exists(debugcon):
                if "VBE-DONE" in open(debugcon, errors="replace").read():
                    marker_at = time.time()
            if marker_at is not None and client.red_over_blue((1024, 768)):
                break
        else:
            raise RuntimeError("%s: VBE frame not received" % vmm)
        done = time.time()
        return {
            "vbe_bytes": client.received,
            "vbe_latency_ms": 1000 * (done - marker_at),
            "vbe_seconds": done - started,
            "vbe_cpu_seconds": cpu_seconds(proc.pid),
        }
    finally:
        proc.terminate()
        proc.wait(10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deskvm", default=os.path.join(ROOT, "target", "release", "deskvm"))
    parser.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args()
    for tool in ("nasm", "qemu-system-x86_64"):
        if not shutil.which(tool):
            sys.exit("%s is missing (Debian packages nasm, qemu-system-x86)" % tool)
    if not os.path.exists(args.deskvm):
        sys.exit("%s is missing: cargo build --release -p deskvm" % args.deskvm)
    workdir = tempfile.mkdtemp(prefix="vnc-display-bench-")
    image = vbe_image(workdir)
    results = {}
    for vmm in ("deskvm", "qemu"):
        r = {}
        for name, run in (("menu", lambda: run_menu(vmm, workdir, args.deskvm, args.idle)),
                          ("vbe", lambda: run_vbe(vmm, workdir, args.deskvm, image))):
            try:
                r.update(run())
            except Exception as e:  # report and go on with the other runs
                print("%s %s: %s" % (vmm, name, e), file=sys.stderr)
        results[vmm] = r
    keys = ["menu_seconds", "menu_bytes", "idle_cpu_percent", "idle_bytes",
            "vbe_seconds", "vbe_bytes", "vbe_latency_ms", "vbe_cpu_seconds"]
    print("%-18s %14s %14s %8s" % ("metric", "deskvm", "qemu", "ratio"))
    for k in keys:
        d, q = results["deskvm"].get(k), results["qemu"].get(k)
        ratio = "%.2f" % (d / q) if d is not None and q else "-"
        fmt = lambda v: "-" if v is None else ("%.2f" % v if isinstance(v, float) else str(v))
        print("%-18s %14s %14s %8s" % (k, fmt(d), fmt(q), ratio))
    print("work files: %s" % workdir)


if __name__ == "__main__":
    main()
