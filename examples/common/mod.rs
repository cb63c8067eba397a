//! What the benchmarks share: the repository, free ports, processes that are killed with
//! their handle, the compatibility store, a process's resident memory and CPU time.
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

/// CPU time a process has used, all its threads together, in nanoseconds.
pub fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A child process, killed when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The release bridge, to listen on 127.0.0.1:`port`, with the default settings, as users
/// get them: besides where it listens and how much it logs, a benchmark sets only what it
/// is about (and the environment every deployment has: `MONGODB_URI`, `API_SECRET`).
pub fn bridge_command(port: u16) -> Command {
    let mut command = Command::new(repo().join("target/release/nsbridge"));
    command
        .env_clear()
        .env("NSBRIDGE_LISTEN", format!("127.0.0.1:{port}"))
        .env("NSBRIDGE_LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// Starts `command` with its standard output piped, and waits for its first line, which
/// must contain `ready_word`.
pub fn spawn_until_ready(mut command: Command, ready_word: &str) -> Killed {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {:?}: {e}", command.get_program()));
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(
        line.contains(ready_word),
        "{:?} did not start: {line}",
        command.get_program()
    );
    Killed(child)
}

/// The compatibility store of the tests, on `port`, its data in `dir`.
pub fn start_store(port: u16, dir: &Path) -> Killed {
    let python = repo().join("target/test-store/venv/bin/python");
    assert!(
        python.is_file(),
        "no store: run scripts/bench (it installs the compatibility store)"
    );
    let mut command = Command::new(python);
    command
        .arg(repo().join("tests/support/store/nx_launcher.py"))
        .args(["--host", "127.0.0.1", "-p", &port.to_string(), "--data-dir"])
        .arg(dir)
        .arg("--pid-file")
        .arg(dir.join("pid"));
    spawn_until_ready(command, "ready")
}

/// The cumulative buckets `(le, count)` of histogram `name` in a Prometheus text page.
pub fn histogram_buckets(metrics: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The observations between two readings of a histogram's buckets.
pub fn histogram_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|(le, count)| {
            let earlier = before.iter().find(|(l, _)| l == le).map_or(0.0, |(_, c)| *c);
            (*le, count - earlier)
        })
        .collect()
}

/// Prometheus' `histogram_quantile`: linear within the bucket.
pub fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |(_, c)| *c);
    if total == 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let width = count - lower.1;
            return lower.0
                + (le - lower.0)
                    * if width > 0.0 {
                        (rank - lower.1) / width
                    } else {
                        1.0
                    };
        }
        lower = (le, count);
    }
    lower.0
}
