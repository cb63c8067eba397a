//! `scripts/demo` (the `nsbridge-demo` program it builds and runs): its own store, a token,
//! the bridge and data written on a timer; the live page in headless Chromium shows events
//! and draws the chart within 15 s; Ctrl-C leaves no process behind. With `MONGODB_URI`
//! it only reads unless told to write, and never writes into a database that is not its own.

mod support;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use support::store::{TestStore, free_port, repo_path};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const DEMO: &str = env!("CARGO_BIN_EXE_nsbridge-demo");

/// What the demo printed before its first write.
struct Printed {
    url: String,
    token: String,
    processes: Vec<u32>,
    all: String,
}

/// The next line `who` prints, within `seconds`.
async fn next_line<R: AsyncBufRead + Unpin>(lines: &mut Lines<R>, who: &str, seconds: u64) -> String {
    tokio::time::timeout(Duration::from_secs(seconds), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("{who} went quiet"))
        .unwrap()
        .unwrap_or_else(|| panic!("{who} ended early"))
}

/// Runs the demo with `args` and `env` (`None`: the variable removed) until its banner.
async fn start_demo(
    args: &[&str],
    env: &[(&str, Option<&str>)],
) -> (Child, Lines<BufReader<ChildStdout>>, Printed) {
    let mut command = Command::new(DEMO);
    command.args(args).stdout(Stdio::piped()).kill_on_drop(true);
    for (name, value) in env {
        match value {
            Some(value) => command.env(name, value),
            None => command.env_remove(name),
        };
    }
    let mut demo = command.spawn().unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let printed = read_banner(&mut lines).await;
    (demo, lines, printed)
}

async fn read_banner(lines: &mut Lines<BufReader<ChildStdout>>) -> Printed {
    let mut printed = Printed {
        url: String::new(),
        token: String::new(),
        processes: Vec::new(),
        all: String::new(),
    };
    loop {
        let line = next_line(lines, "the demo", 60).await;
        printed.all.push_str(&line);
        printed.all.push('\n');
        let line = line.trim();
        if let Some(url) = line.strip_prefix("live page: ") {
            printed.url = url.to_string();
        } else if let Some(token) = line.strip_prefix("token: ") {
            printed.token = token.to_string();
        } else if let Some(list) = line.strip_prefix("processes: ") {
            printed.processes = list
                .split(", ")
                .filter_map(|p| p.split(' ').nth(1)?.parse().ok())
                .collect();
        } else if line.starts_with("Paste the token") {
            return printed;
        }
    }
}

fn interrupt(child: &Child) {
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_events_and_the_chart_and_ctrl_c_stops_everything() {
    let port = free_port();
    let (mut demo, _lines, printed) =
        start_demo(&["--port", &port.to_string()], &[("MONGODB_URI", None)]).await;
    let shown_at = Instant::now();
    assert_eq!(
        printed.url,
        format!("http://127.0.0.1:{port}/"),
        "{}",
        printed.all
    );
    assert!(printed.token.starts_with("demoviewer-"), "{}", printed.all);
    assert_eq!(printed.processes.len(), 2, "store and bridge: {}", printed.all);
    assert!(printed.processes.iter().all(|pid| alive(*pid)));
    let scratch = std::env::temp_dir().join(format!("nsbridge-demo-{}", demo.id().unwrap()));
    assert!(scratch.is_dir());

    // The page, as a newcomer uses it: the printed address, the printed token.
    let artifacts = repo_path("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("demo.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut driver = Command::new("node")
        .current_dir(repo_path("tests/browser"))
        .arg("live_page.js")
        .args(["--url", &printed.url, "--token", &printed.token])
        .args(["--collections", "devicestatus,entries,treatments"])
        .args(["--until", "", "--chart-points", "3", "--timeout-ms", "15000"])
        .arg("--screenshot")
        .arg(&screenshot)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting node");
    let mut page = BufReader::new(driver.stdout.take().unwrap()).lines();
    let mut subscribed = Value::Null;
    let mut rows = Vec::new();
    let mut overview = Value::Null;
    loop {
        let line = next_line(&mut page, "the page driver", 90).await;
        let line: Value = serde_json::from_str(&line).unwrap();
        match line["type"].as_str() {
            Some("subscribed") => subscribed = line,
            Some("row") => rows.push(line),
            Some("overview") => overview = line,
            Some("console") => eprintln!("page console: {line}"),
            Some("done") => break,
            _ => panic!("page driver: {line}"),
        }
    }
    assert!(driver.wait().await.unwrap().success());
    assert!(
        shown_at.elapsed() < Duration::from_secs(45),
        "Chromium's start plus the 15 s the driver allows"
    );
    assert_eq!(
        subscribed,
        json!({"type": "subscribed", "ack": {"success": true, "collections": ["devicestatus", "entries", "treatments"]}})
    );
    let collections: BTreeSet<&str> = rows.iter().map(|r| r["colName"].as_str().unwrap()).collect();
    assert!(collections.contains("entries"), "{rows:?}");
    assert!(collections.is_subset(&BTreeSet::from(["devicestatus", "entries", "treatments"])));
    assert!(overview["chartPoints"].as_u64().unwrap() >= 3, "{overview}");
    assert_eq!(overview["polyline"], true);
    assert!(
        overview["rates"]["entries"]["total"].as_u64().unwrap() >= 3,
        "{overview}"
    );
    let png = std::fs::read(&screenshot).expect("screenshot kept");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);

    // Ctrl-C: the demo, its store and its bridge end, and its scratch directory goes.
    interrupt(&demo);
    let status = tokio::time::timeout(Duration::from_secs(15), demo.wait())
        .await
        .expect("the demo did not stop on Ctrl-C")
        .unwrap();
    assert!(status.success(), "{status}");
    for pid in &printed.processes {
        assert!(!alive(*pid), "process {pid} left behind");
    }
    assert!(!scratch.exists(), "scratch directory left behind");
}

#[tokio::test]
async fn with_mongodb_uri_the_demo_reads_unless_told_to_write_and_only_into_its_own_database() {
    let store = TestStore::start().await;
    let client = store.client().await;
    let site = store.database("demo_site");
    client
        .database(&site)
        .collection::<Document>("entries")
        .insert_one(doc! { "sgv": 100 })
        .await
        .unwrap();

    // Without --write: the bridge on the site's database, nothing written.
    let port = free_port();
    let site_uri = store.uri(&site);
    let (mut demo, _lines, printed) = start_demo(
        &["--port", &port.to_string()],
        &[
            ("MONGODB_URI", Some(&site_uri)),
            ("API_SECRET", Some("the site's own secret")),
        ],
    )
    .await;
    assert!(printed.all.contains("writing: nothing"), "{}", printed.all);
    assert!(
        printed.token.starts_with("an access token of your site"),
        "{}",
        printed.all
    );
    assert_eq!(printed.processes.len(), 1, "a bridge only: {}", printed.all);
    tokio::time::sleep(Duration::from_secs(4)).await;
    interrupt(&demo);
    assert!(demo.wait().await.unwrap().success());
    let names = client.database(&site).list_collection_names().await.unwrap();
    assert_eq!(names, ["entries"]);
    assert_eq!(
        client
            .database(&site)
            .collection::<Document>("entries")
            .count_documents(doc! {})
            .await
            .unwrap(),
        1
    );

    // --write into a database that holds someone's data: refused.
    let output = Command::new(DEMO)
        .args(["--port", &free_port().to_string(), "--write", "--database", &site])
        .env("MONGODB_URI", &site_uri)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim(),
        format!(
            "nsbridge-demo: database {site:?} already holds data that is not the demo's; name an empty one with --database"
        )
    );
    assert_eq!(
        client.database(&site).list_collection_names().await.unwrap(),
        ["entries"]
    );

    // --write into an empty database: the demo's own, marked, and written to.
    let own = store.database("demo_own");
    let port = free_port();
    let (mut demo, mut lines, printed) = start_demo(
        &[
            "--port",
            &port.to_string(),
            "--write",
            "--database",
            &own,
            "--interval-secs",
            "1",
        ],
        &[("MONGODB_URI", Some(&site_uri))],
    )
    .await;
    assert!(
        printed.all.contains(&format!("writing: database {own} ")),
        "{}",
        printed.all
    );
    let written = next_line(&mut lines, "the demo", 10).await;
    assert!(written.starts_with("entries create "), "{written}");
    interrupt(&demo);
    assert!(demo.wait().await.unwrap().success());
    let mut names = client.database(&own).list_collection_names().await.unwrap();
    names.sort();
    assert_eq!(names, ["auth_subjects", "entries", "nsbridge_demo_marker"]);
}

/// `scripts/demo` is what the README runs: it builds this program and the bridge in release
/// mode and runs this program, which the tests above run from the test build.
#[test]
fn scripts_demo_builds_and_runs_this_program() {
    let script = std::fs::read_to_string(repo_path("scripts/demo")).unwrap();
    let commands: Vec<&str> = script
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(
        commands.contains(&"cargo build --release --locked --bin nsbridge --bin nsbridge-demo >&2"),
        "{commands:?}"
    );
    assert_eq!(commands.last(), Some(&"exec target/release/nsbridge-demo \"$@\""));
    assert!(
        commands.contains(&"tests/support/store/setup.sh >&2"),
        "the store is installed"
    );
}
