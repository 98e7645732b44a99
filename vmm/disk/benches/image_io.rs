//! Throughput of the image layer (raw and qcow2) against `qemu-img bench` on the same files
//! with the same access pattern. Plain `main` (harness = false): `cargo bench -p vmm-disk`.
//!
//! Patterns over a 64 MiB image, queue depth 1: sequential (step = block size) and strided
//! "random" (step = 7919 blocks, wrapping: the pattern `qemu-img bench -S` can express).

use std::path::Path;
use std::process::Command;
use std::time::Instant;
use vmm_disk::{create, open, ImageFormat, OpenOptions};

const IMAGE_SIZE: u64 = 64 << 20;

fn offsets(block: u64, random: bool) -> Vec<u64> {
    let count = IMAGE_SIZE / block;
    let step = if random { 7919 } else { 1 };
    (0..count).map(|i| (i * step % count) * block).collect()
}

fn ours(path: &Path, block: u64, random: bool, write: bool) -> f64 {
    let mut disk = open(path, OpenOptions { read_only: false }).unwrap();
    let mut buf = vec![0x5au8; block as usize];
    let list = offsets(block, random);
    let start = Instant::now();
    for off in &list {
        if write {
            disk.write_at(*off, &buf).unwrap();
        } else {
            disk.read_at(*off, &mut buf).unwrap();
        }
    }
    disk.flush().unwrap();
    let secs = start.elapsed().as_secs_f64();
    (list.len() as u64 * block) as f64 / secs / 1e6
}

fn qemu(path: &Path, format: ImageFormat, block: u64, random: bool, write: bool) -> Option<f64> {
    let count = IMAGE_SIZE / block;
    let step = if random { 7919 * block } else { block };
    let mut cmd = Command::new("qemu-img");
    cmd.args(["bench", "-f", format.as_str(), "-d", "1", "-t", "writeback"])
        .args([
            "-c",
            &count.to_string(),
            "-s",
            &block.to_string(),
            "-S",
            &step.to_string(),
        ]);
    if write {
        cmd.arg("-w");
    }
    let out = cmd.arg(path).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let secs: f64 = text
        .split("Run completed in ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((count * block) as f64 / secs / 1e6)
}

fn main() {
    let dir = std::env::temp_dir().join(format!("deskvm-disk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    println!(
        "{:<6} {:<5} {:<6} {:<5} {:>12} {:>12} {:>7}",
        "format", "block", "order", "op", "deskvm MB/s", "qemu MB/s", "ratio"
    );
    for format in [ImageFormat::Raw, ImageFormat::Qcow2] {
        for block in [4096u64, 65536] {
            for random in [false, true] {
                let ours_path = dir.join(format!("ours.{format}"));
                let qemu_path = dir.join(format!("qemu.{format}"));
                for path in [&ours_path, &qemu_path] {
                    let _ = std::fs::remove_file(path);
                    create(path, format, IMAGE_SIZE, None).unwrap();
                }
                // Writes first (allocating, for qcow2), then reads of the allocated data.
                for write in [true, false] {
                    let mine = ours(&ours_path, block, random, write);
                    let theirs = qemu(&qemu_path, format, block, random, write);
                    let (theirs_text, ratio) = match theirs {
                        Some(q) => (format!("{q:.1}"), format!("{:.2}", mine / q)),
                        None => ("n/a".into(), "n/a".into()),
                    };
                    println!(
                        "{:<6} {:<5} {:<6} {:<5} {:>12.1} {:>12} {:>7}",
                        format.as_str(),
                        format!("{}k", block / 1024),
                        if random { "stride" } else { "seq" },
                        if write { "write" } else { "read" },
                        mine,
                        theirs_text,
                        ratio
                    );
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
