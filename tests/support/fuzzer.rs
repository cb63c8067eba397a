//! A small fuzzing engine on stable Rust, so that `cargo test` runs the fuzz targets
//! anywhere. Each target replays its corpus and its regression cases, then, for a time
//! budget, checks inputs that are generated from the target's grammar or mutated from the
//! corpus.
//!
//! A check runs on a thread of its own under a watchdog: an input that panics, or that
//! takes longer than a time proportional to its length, is a finding. The finding is
//! saved under `target/fuzz-findings/<target>/` and the test fails naming the file; once
//! the defect is fixed, the file moves to `tests/fuzz/regressions/<target>/` and is
//! replayed on every run from then on.
//!
//! `FUZZ_SECONDS` sets the budget per target (default 4), `FUZZ_SEED` replays a run.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use fastrand::Rng;

use super::store::repo_path;

/// Allowed time for one input: a floor for start-up costs, then linear in its length.
/// Generous for a debug build on a loaded machine; a hang or a quadratic blow-up on the
/// largest inputs (64 KiB) still exceeds it by far.
fn allowed(len: usize) -> Duration {
    Duration::from_secs(2) + Duration::from_micros(50) * len as u32
}

/// Interesting bytes and strings for text protocols: separators, digits, the bounds of
/// UTF-8 sequences, and characters of one, two, three and four bytes (the last two
/// UTF-16 units).
const TOKENS: &[&str] = &[
    ":",
    ",",
    "\u{1e}",
    "[",
    "]",
    "{",
    "}",
    "\"",
    "/",
    "?",
    "0",
    "1",
    "2",
    "4",
    "9",
    "-",
    "e",
    "é",
    "中",
    "\u{1F600}",
    "\u{1D54A}",
    "\u{FFFD}",
    "\\u0000",
    "\\ud83d",
    "null",
    "true",
    "42",
    "40/storage,",
];

/// The input being checked and when its check began, for the watchdog.
type InProgress = Arc<Mutex<Option<(Vec<u8>, Instant)>>>;

pub struct Finding {
    pub input: Vec<u8>,
    pub what: String,
}

/// Runs `check` on the corpus, the regressions and generated or mutated inputs of target
/// `name` for its budget; panics with a saved finding on the first failure.
pub fn fuzz(name: &str, generate: fn(&mut Rng) -> Vec<u8>, check: fn(&[u8])) {
    let budget = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(Duration::from_secs(4), Duration::from_secs_f64);
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let corpus = read_inputs(&repo_path(&format!("tests/fuzz/corpus/{name}")));
    let regressions = read_inputs(&repo_path(&format!("tests/fuzz/regressions/{name}")));
    assert!(
        !corpus.is_empty(),
        "fuzz target {name} has no corpus in tests/fuzz/corpus/{name}/"
    );
    eprintln!(
        "fuzz {name}: seed {seed}, {} corpus and {} regression inputs, {budget:?}",
        corpus.len(),
        regressions.len()
    );

    let current: InProgress = Arc::new(Mutex::new(None));
    let (done_tx, done) = mpsc::channel::<Result<u64, Finding>>();
    let worker_current = current.clone();
    std::thread::spawn(move || {
        let mut rng = Rng::with_seed(seed);
        let deadline = Instant::now() + budget;
        let mut runs = 0u64;
        let mut one = |input: Vec<u8>| -> Result<(), Finding> {
            *worker_current.lock().unwrap() = Some((input.clone(), Instant::now()));
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| check(&input)));
            *worker_current.lock().unwrap() = None;
            runs += 1;
            outcome.map_err(|panic| Finding {
                what: format!("panicked: {}", panic_message(&panic)),
                input,
            })
        };
        let outcome = (|| {
            for input in regressions.iter().chain(&corpus) {
                one(input.clone())?;
            }
            while Instant::now() < deadline {
                let input = if rng.bool() {
                    generate(&mut rng)
                } else {
                    mutate(&mut rng, &corpus)
                };
                one(input)?;
            }
            Ok(())
        })();
        let _ = done_tx.send(outcome.map(|()| runs));
    });

    let finding = loop {
        match done.recv_timeout(Duration::from_millis(50)) {
            Ok(Ok(runs)) => {
                eprintln!("fuzz {name}: {runs} inputs, no finding");
                return;
            }
            Ok(Err(finding)) => break finding,
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("fuzz {name}: the worker vanished"),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let current = current.lock().unwrap();
                if let Some((input, started)) = &*current
                    && started.elapsed() > allowed(input.len())
                {
                    // The worker is stuck in it; the test process ends it when it exits.
                    break Finding {
                        input: input.clone(),
                        what: format!("took longer than {:?}", allowed(input.len())),
                    };
                }
            }
        }
    };
    let saved = save_finding(name, &finding.input);
    panic!(
        "fuzz target {name} (seed {seed}) {} on the input saved as {} ({} bytes: {:?}); \
         once fixed, move it to tests/fuzz/regressions/{name}/",
        finding.what,
        saved.display(),
        finding.input.len(),
        String::from_utf8_lossy(&finding.input[..finding.input.len().min(200)]),
    );
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a non-text panic".into())
}

fn read_inputs(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md"))
        .collect();
    paths.sort();
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn save_finding(name: &str, input: &[u8]) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    input.hash(&mut hasher);
    let dir = repo_path(&format!("target/fuzz-findings/{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{:016x}", hasher.finish()));
    std::fs::write(&path, input).unwrap();
    path
}

/// One to four random edits of a random corpus input.
pub fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut input = corpus[rng.usize(..corpus.len())].clone();
    for _ in 0..rng.usize(1..=4) {
        let at = rng.usize(..=input.len());
        match rng.u8(..9) {
            0 if !input.is_empty() => {
                let i = rng.usize(..input.len());
                input[i] ^= 1 << rng.u8(..8);
            }
            1 if !input.is_empty() => {
                let i = rng.usize(..input.len());
                input[i] = rng.u8(..);
            }
            2 => {
                let token = TOKENS[rng.usize(..TOKENS.len())];
                input.splice(at..at, token.bytes());
            }
            3 if !input.is_empty() => {
                let end = (at + rng.usize(1..=8)).min(input.len());
                input.drain(at.min(end)..end);
            }
            4 if !input.is_empty() => {
                // Repeat a slice: long runs of the same construct.
                let start = rng.usize(..input.len());
                let end = (start + rng.usize(1..=16)).min(input.len());
                let slice = input[start..end].repeat(rng.usize(1..=64));
                input.splice(at..at, slice);
            }
            5 => {
                // Replace a number by another: lengths and counts out of step.
                let number = match rng.u8(..4) {
                    0 => rng.u64(..4).to_string(),
                    1 => rng.u64(..100_000).to_string(),
                    2 => u64::MAX.to_string(),
                    _ => format!("{}", rng.i64(..)),
                };
                match input.iter().position(u8::is_ascii_digit) {
                    Some(start) => {
                        let end = input[start..]
                            .iter()
                            .position(|b| !b.is_ascii_digit())
                            .map_or(input.len(), |n| start + n);
                        input.splice(start..end, number.bytes());
                    }
                    None => {
                        input.splice(at..at, number.bytes());
                    }
                }
            }
            6 => {
                let other = &corpus[rng.usize(..corpus.len())];
                let from = rng.usize(..=other.len());
                input.splice(at..at, other[from..].iter().copied());
            }
            7 => input.truncate(at),
            _ => {
                let n = rng.usize(1..=8);
                input.splice(at..at, std::iter::repeat_with(|| rng.u8(..)).take(n));
            }
        }
    }
    input.truncate(64 * 1024);
    input
}

/// Random text from [`TOKENS`] and ASCII, of a number of tokens in `len`.
pub fn text(rng: &mut Rng, len: std::ops::Range<usize>) -> String {
    let mut out = String::new();
    for _ in 0..rng.usize(len) {
        if rng.u8(..3) == 0 {
            out.push_str(TOKENS[rng.usize(..TOKENS.len())]);
        } else {
            out.push(rng.alphanumeric());
        }
    }
    out
}

/// Splits `input` into the chunks a body arrives in: whole, or in pieces of a size
/// derived from the input itself (so that a saved finding replays the same way).
pub fn chunkings(input: &[u8]) -> [Vec<Vec<u8>>; 2] {
    let step = 1 + input
        .iter()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(*b as usize))
        % 7;
    [
        vec![input.to_vec()],
        input.chunks(step).map(<[u8]>::to_vec).collect(),
    ]
}
