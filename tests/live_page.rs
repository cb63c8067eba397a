//! The live page at `GET /`, in headless Chromium (Debian's, driven by playwright-core
//! through `tests/browser/live_page.js`): it subscribes with a token, and writes to the
//! store appear in its table, its glucose chart and its event rates. The screenshot is kept
//! in `target/test-artifacts/`.

mod support;

use std::process::Stdio;
use std::time::Duration;

use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use support::bridge::{Setup, http_get};
use support::data::now_ms;
use support::store::repo_path;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_subscribes_and_shows_writes_as_they_happen() {
    let Setup {
        store: _store,
        db,
        bridge,
        reader: viewer,
        ..
    } = Setup::start("live_page", &[]).await;

    // Served by the bridge itself, with nothing fetched from elsewhere.
    let (status, page) = http_get(bridge.port, "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        page.contains("<html") && page.contains("/storage"),
        "not the live page"
    );
    let lower = page.to_lowercase();
    for fetches in [
        "<script src",
        "@import",
        "url(http",
        "url(//",
        "src=\"http",
        "src=\"//",
    ] {
        assert!(!lower.contains(fetches), "the page loads something ({fetches})");
    }
    for (at, _) in lower.match_indices("<link") {
        let tag = &lower[at..at + lower[at..].find('>').unwrap()];
        assert!(tag.contains("href=\"data:"), "the page loads something: {tag}");
    }

    let browser_dir = repo_path("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir()
            && std::path::Path::new("/usr/bin/chromium").exists(),
        "Chromium or playwright-core missing: run scripts/test (it runs tests/browser/setup.sh)"
    );
    let artifacts = repo_path("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("live-page.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut driver = Command::new("node")
        .current_dir(&browser_dir)
        .arg("live_page.js")
        .args(["--url", &format!("{}/", bridge.url()), "--token", &viewer.token])
        .args([
            "--collections",
            "entries,treatments",
            "--until",
            "sentinel",
            "--screenshot",
        ])
        .arg(&screenshot)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting node");
    let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .expect("the page driver went quiet")
                .unwrap()
                .expect("the page driver ended early");
            let value: Value = serde_json::from_str(&line).unwrap();
            if value["type"] != "console" {
                return value;
            }
            eprintln!("page console: {value}");
        }
    };
    let subscribed = next().await;
    assert_eq!(
        subscribed,
        json!({"type": "subscribed", "ack": {"success": true, "collections": ["entries", "treatments"]}})
    );

    let now = now_ms();
    let treatments = db.collection::<Document>("treatments");
    treatments
        .insert_one(doc! { "identifier": "t1", "eventType": "Note", "notes": "from the test", "srvModified": now, "srvCreated": now })
        .await
        .unwrap();
    db.collection::<Document>("food")
        .insert_one(doc! { "identifier": "f1", "name": "apple", "srvModified": now, "srvCreated": now })
        .await
        .unwrap();
    treatments
        .update_one(
            doc! { "identifier": "t1" },
            doc! { "$set": { "notes": "patched", "srvModified": now + 1 } },
        )
        .await
        .unwrap();
    let entries = db.collection::<Document>("entries");
    entries
        .insert_one(doc! { "identifier": "e1", "sgv": 123, "srvModified": now, "srvCreated": now })
        .await
        .unwrap();
    treatments
        .update_one(
            doc! { "identifier": "t1" },
            doc! { "$set": { "isValid": false, "srvModified": now + 2 } },
        )
        .await
        .unwrap();
    entries
        .insert_one(doc! { "identifier": "sentinel", "sgv": 99, "srvModified": now, "srvCreated": now })
        .await
        .unwrap();

    let mut rows = Vec::new();
    let mut overview = Value::Null;
    loop {
        let line = next().await;
        match line["type"].as_str() {
            Some("row") => rows.push((
                line["event"].as_str().unwrap().to_string(),
                line["colName"].as_str().unwrap().to_string(),
                line["identifier"].as_str().unwrap().to_string(),
            )),
            Some("overview") => overview = line,
            Some("done") => break,
            _ => panic!("page driver: {line}"),
        }
    }
    let expected = [
        ("create", "treatments", "t1"),
        ("update", "treatments", "t1"),
        ("create", "entries", "e1"),
        ("delete", "treatments", "t1"),
        ("create", "entries", "sentinel"),
    ];
    let expected: Vec<(String, String, String)> = expected
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(rows, expected);
    // The chart draws both entries' values; the rates count each subscribed collection.
    assert_eq!(
        overview,
        json!({"type": "overview", "chartPoints": 2, "polyline": true, "rates": {
            "entries": {"total": 2, "perMinute": 2},
            "treatments": {"total": 3, "perMinute": 3},
        }})
    );
    assert!(driver.wait().await.unwrap().success());

    let png = std::fs::read(&screenshot).expect("screenshot kept");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "a real screenshot"
    );
    assert!(
        !bridge.logs().contains(&viewer.token),
        "the token stays out of the logs"
    );
}
