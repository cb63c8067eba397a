//! What the benchmarks share: the repository, free ports, processes that are killed with
//! their handle, the compatibility store, a process's resident memory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A child process, killed when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The compatibility store of the tests, on `port`, its data in `dir`.
pub fn start_store(port: u16, dir: &Path) -> Killed {
    let mut child = Command::new(repo().join("target/test-store/venv/bin/python"))
        .arg(repo().join("tests/support/store/nx_launcher.py"))
        .args(["--host", "127.0.0.1", "-p", &port.to_string(), "--data-dir"])
        .arg(dir)
        .arg("--pid-file")
        .arg(dir.join("pid"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the compatibility store (run scripts/bench)");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("ready"), "{line}");
    Killed(child)
}
