#!/usr/bin/python3
"""Window test of the DeskVM app through the accessibility tree (dogtail / AT-SPI).

Run under a virtual display and a private session bus:
    xvfb-run -a dbus-run-session /usr/bin/python3 ui/tests/app_window.py target/debug/deskvm

Needs python3-dogtail, gir1.2-atspi-2.0, at-spi2-core, xvfb, dbus. It starts the app with a
fresh library, creates a VM with the wizard (from a tiny ISO 9660 file it makes), checks the
VM folder and that the VM runs, then closes the window and stops the VM from the dialog.
Prints "N passed, N failed".
"""
import os
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


def check(what, ok):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok: {what}")
    else:
        failed += 1
        print(f"FAILED: {what}")


def wait_for(what, predicate, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if predicate():
                return True
        except Exception:
            pass
        time.sleep(0.3)
    return False


def visible(node):
    """GTK 4.8 marks widgets that are mapped as VISIBLE and SHOWING."""
    from gi.repository import Atspi
    states = node.getState()
    return states.contains(Atspi.StateType.SHOWING) or states.contains(Atspi.StateType.VISIBLE)


def find(parent, **kw):
    return parent.findChild(lambda n: all(getattr(n, k) == v for k, v in kw.items()),
                            retry=True, requireResult=False)


def button(parent, label):
    """A push button by its label or, for icon buttons, its tooltip (description)."""
    return parent.findChild(
        lambda n: n.roleName in ("push button", "toggle button")
        # GTK 4.8 names some buttons twice ("Quit Quit").
        and (n.description == label or n.name in (label, f"{label} {label}"))
        and visible(n),
        retry=True, requireResult=False)


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/debug/deskvm"
    home = tempfile.mkdtemp(prefix="deskvm-window-test-")
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
    iso = f"{home}/tiny.iso"
    with open(iso, "wb") as f:
        data = bytearray(0x9000)
        data[0x8001:0x8006] = b"CD001"
        f.write(data)
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

        wizard = None
        if wait_for("wizard", lambda: find(app, roleName="frame", name="New Virtual Machine")):
            wizard = find(app, roleName="frame", name="New Virtual Machine")
        check("Create opens the wizard", wizard is not None)
        next_button = button(wizard, "Next")
        check("Next is disabled without an ISO", not next_button.sensitive)
        iso_entry = wizard.findChild(lambda n: n.roleName == "text" and visible(n),
                                     retry=True, requireResult=False)
        iso_entry.text = "/nonexistent.iso"
        time.sleep(0.5)
        check("a missing ISO is named", find(wizard, roleName="label",
                                            name="/nonexistent.iso does not exist: choose another ISO image") is not None)
        iso_entry.text = iso
        check("a real ISO enables Next", wait_for("next", lambda: next_button.sensitive))
        for step in range(5):
            button(wizard, "Next").doActionNamed("click")
            time.sleep(0.5)
        create_button = button(wizard, "Create")
        check("the last step offers Create", create_button is not None)
        create_button.doActionNamed("click")

        vm_toml = f"{home}/data/deskvm/vms/Debian 12/vm.toml"
        check("Create writes the VM folder", wait_for("vm.toml", lambda: os.path.isfile(vm_toml)))
        check("the new VM's console shows it running",
              wait_for("pause", lambda: button(window, "Pause") is not None))
        button(window, "Back").doActionNamed("click")
        check("the library lists the VM as running",
              wait_for("row", lambda: find(window, roleName="label", name="Running") is not None))

        button(window, "Close").doActionNamed("click")
        dialog_button = None
        if wait_for("dialog", lambda: button(app, "Stop and Quit") is not None):
            dialog_button = button(app, "Stop and Quit")
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
        if failed:
            print(f"app log kept in {home}/app.log")
        else:
            shutil.rmtree(home, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
