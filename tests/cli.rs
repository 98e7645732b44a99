//! `deskvm run` as a user runs it: from the library by name, from a file, with errors
//! that name the file, line and field, and a clean stop on SIGTERM.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn deskvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deskvm"))
}

fn prerequisites() -> bool {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let bios = Path::new("/usr/share/seabios/bios.bin").is_file();
    if kvm && bios {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("KVM or SeaBIOS missing; CI must not skip");
    }
    eprintln!("SKIPPED: needs /dev/kvm and SeaBIOS");
    false
}

fn wait_for(file: &Path, needle: &str) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if std::fs::read_to_string(file).is_ok_and(|t| t.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn malformed_config_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.toml");
    std::fs::write(&path, "name = \"x\"\ncpus = \"four\"\n").unwrap();
    let out = deskvm()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&*path.to_string_lossy()), "{err}");
    assert!(err.contains("line 2") && err.contains("cpus"), "{err}");
}

#[test]
fn unknown_library_vm_is_reported() {
    let data = tempfile::tempdir().unwrap();
    let out = deskvm()
        .args(["run", "nosuchvm"])
        .env("XDG_DATA_HOME", data.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM named 'nosuchvm'"));
}

#[test]
fn library_vm_runs_and_stops_cleanly_on_sigterm() {
    if !prerequisites() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let vm_dir = data.path().join("deskvm/vms/testvm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    std::fs::write(
        vm_dir.join("vm.toml"),
        "name = \"testvm\"\nmemory_mib = 128\ndebugcon = \"debugcon.log\"\n",
    )
    .unwrap();
    let list = deskvm()
        .arg("list")
        .env("XDG_DATA_HOME", data.path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains("testvm\t128 MiB\t1 vCPU"));

    let mut child = deskvm()
        .args(["run", "testvm", "--cpus", "1"])
        .env("XDG_DATA_HOME", data.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let log = vm_dir.join("debugcon.log");
    assert!(wait_for(&log, "Running on KVM"), "firmware did not start");
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "deskvm exited with {status}");
    assert!(
        vm_dir.join("nvram.toml").is_file(),
        "NVRAM was not saved in the VM folder"
    );
}
