//! What the user sees when the host cannot run a VM: each error names the fix.

mod common;

use std::path::PathBuf;

use common::*;
use vmm::{EngineOptions, VmConfig, VmHandle, VmmError};

#[test]
fn missing_kvm_device_says_how_to_enable_it() {
    let options = EngineOptions {
        kvm_path: PathBuf::from("/nonexistent/kvm"),
    };
    let e = VmHandle::create_with(VmConfig::default(), options)
        .err()
        .unwrap();
    assert!(matches!(e, VmmError::KvmMissing { .. }), "{e}");
    assert!(e.to_string().contains("kvm_intel"), "{e}");
}

#[test]
fn more_than_the_host_has_is_refused() {
    if require_kvm().is_none() {
        return;
    }
    let too_much_memory = VmConfig {
        memory_mib: 4 << 20, // 4 TiB
        ..VmConfig::default()
    };
    let e = VmHandle::create(too_much_memory).err().unwrap();
    assert!(matches!(e, VmmError::NotEnoughHostMemory { .. }), "{e}");
    assert!(e.to_string().contains("this host has only"), "{e}");

    let too_many_cpus = VmConfig {
        cpus: 255,
        ..VmConfig::default()
    };
    let e = VmHandle::create(too_many_cpus).err().unwrap();
    assert!(
        matches!(e, VmmError::TooManyCpus { requested: 255, .. }),
        "{e}"
    );
}

#[test]
fn missing_firmware_names_the_package() {
    if require_kvm().is_none() {
        return;
    }
    let mut config = VmConfig::default();
    config.firmware.bios = Some(PathBuf::from("/nonexistent/bios.bin"));
    let e = VmHandle::create(config).err().unwrap();
    assert!(matches!(e, VmmError::FirmwareMissing { .. }), "{e}");
    assert!(e.to_string().contains("'seabios'"), "{e}");
}

#[test]
fn unwritable_output_file_is_reported() {
    if require_kvm().is_none() || require_seabios().is_none() {
        return;
    }
    let config = VmConfig {
        serial: vmm::CharOutput::File(PathBuf::from("/nonexistent/dir/serial.log")),
        ..VmConfig::default()
    };
    let e = VmHandle::create(config).err().unwrap();
    assert!(e.to_string().contains("/nonexistent/dir/serial.log"), "{e}");
}
