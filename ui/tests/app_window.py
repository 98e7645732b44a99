#!/usr/bin/python3
"""Window test of the DeskVM app through the accessibility tree (dogtail / AT-SPI), with
screenshots of the window read by OCR (tesseract) and keys typed with xdotool.

Run under a virtual display and a private session bus:
    xvfb-run -a dbus-run-session /usr/bin/python3 ui/tests/app_window.py target/debug/deskvm

Needs python3-dogtail, gir1.2-atspi-2.0, at-spi2-core, xvfb, xauth, dbus, imagemagick,
xdotool, tesseract-ocr, x11-utils and GRUB's mkrescue (grub-common, grub-pc-bin, xorriso,
mtools). When the display it gets is smaller than 1024x768 or not 24-bit (xvfb-run's default
is 640x480x8) it starts its own Xvfb, so screenshots hold the whole window.

What it checks, with a fresh library:
- the empty state, the wizard's messages for bad input (a missing file, a file that is not an
  ISO, more memory than the host has, a name that exists), and that none of them writes a
  VM folder;
- the wizard creates a VM from a GRUB rescue ISO it builds with grub-mkrescue; the console
  shows SeaBIOS and then GRUB's menu entries (OCR);
- the performance page shows a non-zero CPU use for that VM (the graphs are drawn, not
  exposed to AT-SPI, so their legend is read by OCR);
- the details editor changes a second VM's memory and the new value is in its vm.toml;
- keys reach the guest: in the second VM (SeaBIOS boot menu on), Esc typed with xdotool into
  the focused console opens "Select boot device";
- Shut Down on a guest that does not listen to the ACPI power button (GRUB) explains it
  and offers Force Off;
- a VM whose engine fails while running (its firmware jumps where KVM cannot execute) shows
  a dialog naming the failure, the library row says Failed, its files are untouched;
- closing the window with a running VM asks, and Stop and Quit ends the app.
Prints "N passed, N failed".
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("GTK_MODULES", "gail:atk-bridge")  # tells dogtail a11y is on
from dogtail import tree  # noqa: E402
from dogtail.config import config  # noqa: E402

config.searchShowingOnly = False
config.searchCutoffCount = 10
config.logDebugToStdOut = False
config.defaultDelay = 0.3

passed = failed = 0
T0 = time.time()

# Menu entries of the GRUB ISO: distinctive words for OCR.
GRUB_CFG = """set timeout=-1
set default=0
menuentry "DeskVM-Entry-One" {
    sleep 600
}
menuentry "DeskVM-Entry-Two" {
    sleep 600
}
"""
GRUB_VM = "GRUB VM"
MENU_VM = "Menu VM"


def check(what, ok):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok: {what}  [{time.time() - T0:.0f} s]", flush=True)
    else:
        failed += 1
        print(f"FAILED: {what}  [{time.time() - T0:.0f} s]", flush=True)
    return ok


def wait_for(what, predicate, timeout=15, interval=0.3):
    end = time.time() + timeout
    while time.time() < end:
        try:
            result = predicate()
            if result:
                return result
        except Exception:
            pass
        time.sleep(interval)
    return None


def visible(node):
    """GTK 4.8 marks widgets that are mapped as VISIBLE and SHOWING."""
    from gi.repository import Atspi
    states = node.getState()
    return states.contains(Atspi.StateType.SHOWING) or states.contains(Atspi.StateType.VISIBLE)


def find(parent, **kw):
    return parent.findChild(lambda n: all(getattr(n, k) == v for k, v in kw.items()),
                            retry=True, requireResult=False)


def find_quick(parent, predicate):
    """One search without dogtail's retries (for polling loops)."""
    return parent.findChild(predicate, retry=False, requireResult=False)


def label_containing(parent, text):
    return find_quick(parent, lambda n: n.roleName == "label" and text in (n.name or ""))


def button(parent, label):
    """A push button by its label or, for icon buttons, its tooltip (description)."""
    return parent.findChild(
        lambda n: n.roleName in ("push button", "toggle button")
        # GTK 4.8 names some buttons twice ("Quit Quit").
        and (n.description == label or n.name in (label, f"{label} {label}"))
        and visible(n),
        retry=True, requireResult=False)


def ancestor(node, roles):
    while node is not None and node.roleName not in roles:
        node = node.parent
    return node


def activate(node):
    """Clicks a widget through AT-SPI when it has an action, else with the pointer."""
    for action in ("click", "activate", "press"):
        if action in node.actions:
            node.doActionNamed(action)
            return
    click_at_node(node)


def tab(window, name):
    """A tab of the VM page's view switcher (Console, Details, Performance)."""
    return window.findChild(lambda n: n.roleName == "page tab" and n.name == name,
                            retry=True, requireResult=False)


def console_button(window, tooltip):
    """A button of the console's toolbar. GTK 4.8 reports every widget VISIBLE and none
    SHOWING, so the library rows' Run/Pause/Shut Down buttons are told apart by place."""
    shot = window.findChild(lambda n: n.roleName == "push button"
                            and n.description == "Screenshot", retry=True,
                            requireResult=False)
    if shot is None:
        return None
    return find_quick(shot.parent, lambda n: n.roleName == "push button"
                      and n.description == tooltip)


def row_button(window, vm, tooltip):
    """A button of a VM's row in the library."""
    label = find_quick(window, lambda n: n.roleName == "label" and n.name == vm)
    row = ancestor(label, ("list item",))
    return row and find_quick(row, lambda n: n.roleName == "push button"
                              and n.description == tooltip)


def vm_folders(library):
    """Every entry of the library folder, hidden ones (half-made VMs) included."""
    return sorted(os.listdir(library)) if os.path.isdir(library) else []


# --- display, screenshots and OCR -------------------------------------------------------

def root_geometry():
    out = subprocess.run(["xwininfo", "-root"], capture_output=True, text=True).stdout
    size = lambda key: int(re.search(rf"{key}:\s+(\d+)", out).group(1))  # noqa: E731
    return size("Width"), size("Height"), size("Depth")


def ensure_big_display():
    """Starts a private 1280x1024x24 Xvfb when the current display is too small for the
    window (xvfb-run's default screen is 640x480x8). Returns the Xvfb process or None."""
    try:
        width, height, depth = root_geometry()
        if width >= 1024 and height >= 768 and depth >= 24:
            return None
    except Exception:
        pass
    read_fd, write_fd = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0",
                             "1280x1024x24", "-nolisten", "tcp"], pass_fds=(write_fd,),
                            stderr=subprocess.DEVNULL)
    os.close(write_fd)
    number = b""
    with os.fdopen(read_fd, "rb") as f:
        while not number.endswith(b"\n"):
            chunk = f.read(1)
            if not chunk:
                break
            number += chunk
    os.environ["DISPLAY"] = f":{number.decode().strip()}"
    os.environ.pop("XAUTHORITY", None)
    return xvfb


def screenshot(path):
    subprocess.run(["import", "-silent", "-window", "root", path], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ocr(path):
    """The text tesseract reads off a screenshot (greyscale, doubled, so the guest's 9x16
    VGA font is large enough)."""
    big = path.replace(".png", "-ocr.png")
    # The window is at 0,0 (no window manager) and 1024x720.
    subprocess.run(["convert", path, "-crop", "1024x720+0+0", "+repage", "-colorspace",
                    "Gray", "-resize", "200%", big], check=True)
    out = subprocess.run(["tesseract", big, "-", "--psm", "11"], capture_output=True,
                         text=True)
    return out.stdout


class Screen:
    """Screenshots of the display, numbered, kept in the test's folder."""

    def __init__(self, folder):
        self.folder = folder
        self.count = 0
        self.last_text = ""

    def text(self):
        self.count += 1
        path = f"{self.folder}/screen-{self.count:03}.png"
        screenshot(path)
        self.last_text = ocr(path)
        return self.last_text

    def wait_text(self, pattern, timeout, interval=0.5):
        """Screenshots until the OCR text matches `pattern` (a regex, any case); waits
        `interval` s between tries (OCR takes a core the guest could use)."""
        end = time.time() + timeout
        while time.time() < end:
            if re.search(pattern, self.text(), re.IGNORECASE):
                return True
            time.sleep(interval)
        return False


def xdotool(*args):
    return subprocess.run(["xdotool", *args], capture_output=True, text=True)


def click_at_node(node):
    """A real pointer click in the middle of a widget (AT-SPI gives window coordinates;
    without a window manager the window sits at 0,0)."""
    x, y = node.position
    w, h = node.size
    xdotool("mousemove", "--sync", str(x + w // 2), str(y + h // 2))
    xdotool("click", "1")


def press_keys_in_window(title_regex, *keys):
    ids = xdotool("search", "--onlyvisible", "--name", title_regex).stdout.split()
    if ids:
        xdotool("windowfocus", "--sync", ids[0])
    for key in keys:
        xdotool("key", key)


def build_grub_iso(folder):
    root = f"{folder}/isoroot"
    os.makedirs(f"{root}/boot/grub")
    with open(f"{root}/boot/grub/grub.cfg", "w") as f:
        f.write(GRUB_CFG)
    iso = f"{folder}/grub.iso"
    subprocess.run(["grub-mkrescue", "-o", iso, root], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return iso


def menu_vm_toml(grub_toml, name):
    """The second VM: the first one's settings, another name and UUID, no disk, SeaBIOS's
    boot menu on with a long prompt so the test sees it before typing Esc."""
    text = re.sub(r'(?m)^name = ".*"$', f'name = "{name}"', grub_toml, count=1)
    text = re.sub(r'(?m)^uuid = ".*"$', 'uuid = "6c0d7b7e-5b0e-4c4e-9d7a-0d1e2f3a4b5c"',
                  text, count=1)
    text = re.sub(r'(?m)^nvram = ".*"$', "", text)
    # Drop the hard disk (the new image belongs to the first VM).
    text = re.sub(r'\[\[drives\]\]\nkind = "disk"\n(?:[a-z_]+ = .*\n)*', "", text)
    text = re.sub(r"(?ms)^\[firmware\]\n.*?(?=^\[|\Z)", "", text)
    return text + "\n[firmware]\nboot_menu = true\nboot_menu_timeout_ms = 60000\n"


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/debug/deskvm"
    home = tempfile.mkdtemp(prefix="deskvm-window-test-")
    xvfb = ensure_big_display()
    env = dict(os.environ)
    env.update({
        "XDG_DATA_HOME": f"{home}/data",
        "XDG_CACHE_HOME": f"{home}/cache",
        "XDG_CONFIG_HOME": f"{home}/config",
        "GSETTINGS_BACKEND": "memory",
        "GDK_BACKEND": "x11",
        "LANGUAGE": "en",
    })
    env.pop("NO_AT_BRIDGE", None)
    library = f"{home}/data/deskvm/vms"
    not_iso = f"{home}/not-an.iso"
    with open(not_iso, "wb") as f:
        f.write(b"this is text, not a CD image\n" * 2000)
    grub_iso = build_grub_iso(home)
    screen = Screen(home)
    log = open(f"{home}/app.log", "w")
    proc = subprocess.Popen([binary], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        check("the app appears on the accessibility bus",
              wait_for("app", lambda: "deskvm" in [a.name for a in tree.root.applications()]))
        app = tree.root.application("deskvm")
        window = find(app, roleName="frame", name="DeskVM")
        check("the main window is there", window is not None)
        check("an empty library shows the empty state",
              find(window, name="No Virtual Machines") is not None)

        create = window.findChild(lambda n: n.roleName == "push button"
                                  and n.name == "Create a Virtual Machine" and visible(n),
                                  retry=True, requireResult=False)
        check("the empty state offers to create a VM", create is not None)
        create.doActionNamed("click")

        wizard = wait_for("wizard", lambda: find_quick(
            app, lambda n: n.roleName == "frame" and n.name == "New Virtual Machine"))
        check("Create opens the wizard", wizard is not None)
        next_button = button(wizard, "Next")
        check("Next is disabled without an ISO", not next_button.sensitive)
        iso_entry = wizard.findChild(lambda n: n.roleName == "text" and n.name == "ISO file",
                                     retry=True, requireResult=False)

        # Bad input 1: an ISO that does not exist.
        iso_entry.text = "/nonexistent.iso"
        check("a missing ISO is named", wait_for("label", lambda: label_containing(
            wizard, "/nonexistent.iso does not exist: choose another ISO image"), 5))
        check("a missing ISO keeps Next disabled", not next_button.sensitive)
        # Bad input 2: a file that is not an ISO.
        iso_entry.text = not_iso
        check("a file that is not an ISO is named", wait_for("label", lambda: label_containing(
            wizard, f"{not_iso} is not an ISO 9660 image"), 5))
        check("a file that is not an ISO keeps Next disabled", not next_button.sensitive)

        iso_entry.text = grub_iso
        check("a real ISO enables Next", wait_for("next", lambda: next_button.sensitive))
        button(wizard, "Next").doActionNamed("click")  # -> operating system
        time.sleep(0.5)
        button(wizard, "Next").doActionNamed("click")  # -> processors and memory
        time.sleep(0.5)
        spins = wizard.findChildren(lambda n: n.roleName == "spin button" and visible(n))
        cpus, memory = spins[0], spins[1]
        # Bad input 3: more memory than the host has.
        memory.value = 4_194_304
        check("more memory than the host has is refused with a message",
              wait_for("label", lambda: label_containing(
                  wizard, "4194304 MiB is more than this computer's"), 5))
        check("too much memory disables Next", not next_button.sensitive)
        memory.value = 128
        cpus.value = 1
        check("a memory size that fits enables Next",
              wait_for("next", lambda: next_button.sensitive, 5))
        for _ in range(3):  # -> storage, network, summary
            button(wizard, "Next").doActionNamed("click")
            time.sleep(0.5)
        name_entry = wizard.findChild(lambda n: n.roleName == "text" and n.name == "Name",
                                      retry=True, requireResult=False)
        name_entry.text = GRUB_VM
        time.sleep(0.3)
        check("no VM folder is written by the bad inputs", vm_folders(library) == [])
        create_button = button(wizard, "Create")
        check("the last step offers Create", create_button is not None)
        create_button.doActionNamed("click")

        vm_toml = f"{library}/{GRUB_VM}/vm.toml"
        check("Create writes the VM folder", wait_for("vm.toml", lambda: os.path.isfile(vm_toml)))
        grub_toml = open(vm_toml).read() if os.path.isfile(vm_toml) else ""
        check("the VM boots from the ISO with the chosen memory",
              grub_iso in grub_toml and re.search(r"(?m)^memory_mib = 128$", grub_toml))
        check("the new VM's console shows it running",
              wait_for("pause", lambda: console_button(window, "Pause") is not None))

        # The console shows the firmware, then GRUB's menu (read off the window).
        check("the console shows SeaBIOS", screen.wait_text(r"SeaBIOS", 120))
        seabios_shot = screen.count
        check("then the console shows GRUB's menu entries",
              screen.wait_text(r"Entry.?(One|Two)", 300, interval=5))
        check("SeaBIOS came before GRUB's menu", screen.count > seabios_shot)
        if not re.search(r"Entry.?(One|Two)", screen.last_text, re.IGNORECASE):
            print("last OCR text:", screen.last_text[-400:])

        # The performance page: the CPU graph's legend reads "Total N %".
        perf = tab(window, "Performance")
        check("the VM page offers a Performance tab", perf is not None)
        activate(perf)

        def cpu_percent():
            m = re.search(r"Total\s+(\d+)\s*%", screen.text())
            return m and int(m.group(1)) > 0 and int(m.group(1))
        busy = wait_for("cpu", cpu_percent, 20, 1)
        check(f"the performance page shows the VM's CPU use ({busy} %)", busy)
        if not busy:
            print("last OCR text:", screen.last_text[-400:])

        # Power the first VM off (GRUB's menu keeps a vCPU busy) and go back.
        activate(tab(window, "Console"))
        time.sleep(0.5)
        check("the console is back", screen.wait_text(r"Entry.?(One|Two)", 10))
        # GRUB does not listen to the ACPI power button: Shut Down says so and offers
        # Force Off.
        console_button(window, "Shut Down").doActionNamed("click")
        check("Shut Down on a guest without ACPI explains it does not respond", wait_for(
            "dialog", lambda: label_containing(app, "does not respond to the power button"),
            10))
        force = wait_for("force", lambda: button(app, "Force Off"), 10)
        check("and offers Force Off", force is not None)
        force.doActionNamed("click")
        check("Force Off stops the VM", wait_for(
            "stopped", lambda: console_button(window, "Pause") is None
            and console_button(window, "Run") is not None, 15))
        button(window, "Back").doActionNamed("click")
        check("the library lists the VM as stopped", wait_for(
            "row", lambda: row_button(window, GRUB_VM, "Run") is not None, 5))

        # Bad input 4: a name that exists.
        button(window, "Create a Virtual Machine").doActionNamed("click")
        wizard = wait_for("wizard", lambda: find_quick(
            app, lambda n: n.roleName == "frame" and n.name == "New Virtual Machine"))
        check("the header's Create button opens the wizard", wizard is not None)
        iso_entry = wizard.findChild(lambda n: n.roleName == "text" and n.name == "ISO file",
                                     retry=True, requireResult=False)
        iso_entry.text = grub_iso
        next_button = button(wizard, "Next")
        wait_for("next", lambda: next_button.sensitive, 5)
        for _ in range(5):
            button(wizard, "Next").doActionNamed("click")
            time.sleep(0.5)
        name_entry = wizard.findChild(lambda n: n.roleName == "text" and n.name == "Name",
                                      retry=True, requireResult=False)
        name_entry.text = GRUB_VM
        check("a name that exists is refused with a message",
              wait_for("label", lambda: label_containing(
                  wizard, f"A VM named '{GRUB_VM}' already exists: choose another name"), 5))
        check("a name that exists disables Create", not button(wizard, "Create").sensitive)
        button(wizard, "Cancel").doActionNamed("click")
        check("Cancel closes the wizard", wait_for("closed", lambda: not find_quick(
            app, lambda n: n.roleName == "frame" and n.name == "New Virtual Machine"), 5))
        check("the refused name wrote no VM folder", vm_folders(library) == [GRUB_VM])

        # A second VM with SeaBIOS's boot menu on, written next to the first.
        os.makedirs(f"{library}/{MENU_VM}")
        menu_toml = f"{library}/{MENU_VM}/vm.toml"
        with open(menu_toml, "w") as f:
            f.write(menu_vm_toml(grub_toml, MENU_VM))
        press_keys_in_window("^DeskVM$", "F5")
        row_label = wait_for("row", lambda: find_quick(
            window, lambda n: n.roleName == "label" and n.name == MENU_VM and visible(n)), 10)
        check("the library shows the second VM after F5", row_label is not None)
        click_at_node(row_label)
        check("clicking its row opens it", wait_for("title", lambda: find_quick(
            app, lambda n: n.roleName == "frame" and n.name == f"{MENU_VM} — DeskVM"), 10))

        # The details editor changes the memory size and saves it to vm.toml.
        activate(tab(window, "Details"))
        time.sleep(0.5)
        memory_row = wait_for("row", lambda: find_quick(
            window, lambda n: n.roleName == "list item" and n.name == "Memory (MiB)"
            and visible(n)), 5)
        memory_spin = memory_row and find_quick(memory_row,
                                                lambda n: n.roleName == "spin button")
        check("the details editor shows the memory size",
              memory_spin is not None and memory_spin.value == 128)
        memory_spin.value = 192
        time.sleep(0.3)
        button(window, "Save").doActionNamed("click")
        check("Save writes the new memory size to vm.toml", wait_for(
            "saved", lambda: re.search(r"(?m)^memory_mib = 192$", open(menu_toml).read()), 5))
        check("the saved file keeps the boot menu on",
              re.search(r"(?m)^boot_menu = true$", open(menu_toml).read()))

        # Keys reach the guest: Esc at SeaBIOS's prompt opens its boot menu.
        activate(tab(window, "Console"))
        time.sleep(0.5)
        console_button(window, "Run").doActionNamed("click")
        check("Run starts the second VM",
              wait_for("pause", lambda: console_button(window, "Pause") is not None, 15))
        console = find_quick(window, lambda n: n.roleName == "image"
                             and n.name == "DeskVmConsoleView" and n.size[0] > 300)
        check("the console is in the window", console is not None)
        click_at_node(console)  # focuses the console (pointer at its middle keeps X focus)
        # OCR reads "Press" as "P ress" at times.
        check("the console shows SeaBIOS's boot-menu prompt",
              screen.wait_text(r"ESC\s+for\s+boot\s+menu", 60, interval=0))
        xdotool("key", "Escape")
        check("Esc typed into the console opens the boot menu",
              screen.wait_text(r"Select\s+boot\s+device", 30))

        # Bad input 5: the engine fails while a VM runs. The third VM's firmware jumps into
        # the VGA window, where there is no memory: KVM cannot run that, the VM fails.
        broken = "Broken VM"
        os.makedirs(f"{library}/{broken}")
        bios = f"{home}/jump-to-vga.bin"
        image = bytearray(b"\xf4" * 65536)  # hlt
        image[0xfff0:0xfff5] = b"\xea\x00\x00\x00\xa0"  # jmp 0xa000:0000
        with open(bios, "wb") as f:
            f.write(image)
        broken_toml = f"{library}/{broken}/vm.toml"
        broken_text = f'name = "{broken}"\nmemory_mib = 64\n\n[firmware]\nbios = "{bios}"\n'
        with open(broken_toml, "w") as f:
            f.write(broken_text)
        button(window, "Back").doActionNamed("click")
        press_keys_in_window("^DeskVM$", "F5")
        run_broken = wait_for("row", lambda: row_button(window, broken, "Run"), 10)
        check("the library shows the third VM", run_broken is not None)
        run_broken.doActionNamed("click")
        failed_heading = wait_for("dialog", lambda: label_containing(
            app, f"The VM failed “{broken}”"), 30)
        check("an engine failure while the VM runs is shown in a dialog",
              failed_heading is not None)
        check("the dialog says what failed", wait_for(
            "body", lambda: label_containing(app, "vCPU 0"), 5))
        close_buttons = app.findChildren(
            lambda n: n.roleName == "push button" and n.name in ("Close", "Close Close"))
        if close_buttons:
            close_buttons[-1].doActionNamed("click")  # the dialog's, created last
        check("the library row shows the failure", wait_for(
            "failed", lambda: label_containing(window, "Failed"), 10))
        check("the failed VM's files are untouched",
              open(broken_toml).read() == broken_text
              and sorted(os.listdir(f"{library}/{broken}")) in (["vm.toml"],
                                                                ["nvram.toml", "vm.toml"]))

        button(window, "Close").doActionNamed("click")
        dialog_button = wait_for("dialog", lambda: button(app, "Stop and Quit"), 10)
        check("closing with a running VM asks what to do", dialog_button is not None)
        dialog_button.doActionNamed("click")
        try:
            proc.wait(timeout=15)
            check("Stop and Quit ends the app", proc.returncode == 0)
        except subprocess.TimeoutExpired:
            check("Stop and Quit ends the app", False)
    except Exception as e:  # a missing widget fails the run, with what was reached
        check(f"no exception ({e!r})", False)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        if xvfb is not None:
            xvfb.terminate()
            xvfb.wait()
        if failed:
            print(f"app log and screenshots kept in {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    print(f"{passed} passed, {failed} failed ({time.time() - T0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
