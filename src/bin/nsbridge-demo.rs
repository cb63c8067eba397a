//! `scripts/demo`: the bridge working, on a laptop, in one command.
//!
//! Starts the compatibility store of the tests (or uses `MONGODB_URI`), seeds an access
//! token's subject, runs the bridge (the `nsbridge` built beside this program) and writes
//! Nightscout data in APIv3's shape on a timer: a CGM entry every few seconds on a
//! plausible glucose curve, now and then a treatment, a device status, a patch and a soft
//! delete. Prints the live page's address and the token; Ctrl-C stops everything it
//! started. This is a separate program: the bridge itself never writes to MongoDB.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use bson::{Document, doc, oid::ObjectId};
use clap::Parser;
use nsbridge::auth::token;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Parser)]
#[command(
    name = "nsbridge-demo",
    about = "The bridge on a demo store, with Nightscout-shaped data written on a timer"
)]
struct Args {
    /// Port of the bridge (and its live page), on 127.0.0.1.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Seconds between two CGM entries.
    #[arg(long, default_value_t = 3)]
    interval_secs: u64,
    /// With MONGODB_URI: write demo data (into --database, never into an existing
    /// database that is not the demo's). Without it the demo only reads.
    #[arg(long)]
    write: bool,
    /// The database the demo writes to and the bridge watches.
    #[arg(long, default_value = "nsbridge_demo")]
    database: String,
}

/// Marks a database as the demo's own: the only kind it writes to.
const MARKER: &str = "nsbridge_demo_marker";
const SUBJECT: &str = "demo-viewer";

// One thread: the children's parent-death signal follows the thread that spawned them.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("nsbridge-demo: {e:#}");
        std::process::exit(1);
    }
}

/// Ends `command`'s process when the demo's ends, however it ends (even by SIGKILL): the
/// demo must leave nothing behind.
fn dies_with_the_demo(command: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe, and nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A child process, killed and reaped when the demo ends.
struct Started {
    name: &'static str,
    child: Child,
}

impl Started {
    async fn stop(mut self) {
        let _ = self.child.start_kill();
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            eprintln!("nsbridge-demo: the {} did not stop", self.name);
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.interval_secs == 0 {
        bail!("--interval-secs must be at least 1");
    }
    let own_store = std::env::var("MONGODB_URI")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .is_none();
    let scratch = std::env::temp_dir().join(format!("nsbridge-demo-{}", std::process::id()));
    let mut started = Vec::new();
    let outcome = demo(&args, own_store, &scratch, &mut started).await;
    for process in started.into_iter().rev() {
        process.stop().await;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    outcome
}

async fn demo(
    args: &Args,
    own_store: bool,
    scratch: &Path,
    started: &mut Vec<Started>,
) -> anyhow::Result<()> {
    let (base_uri, writes) = if own_store {
        std::fs::create_dir_all(scratch).with_context(|| format!("creating {}", scratch.display()))?;
        let (store, port) = start_store(scratch).await?;
        started.push(store);
        (format!("mongodb://127.0.0.1:{port}/?directConnection=true"), true)
    } else {
        (std::env::var("MONGODB_URI").unwrap_or_default(), args.write)
    };
    let client = mongodb::Client::with_uri_str(&base_uri)
        .await
        .context("MONGODB_URI")?;

    // What the bridge watches: the demo's database when the demo writes, else the site's.
    let (api_secret, token, watched) = if writes {
        let db = client.database(&args.database);
        claim(&db, own_store).await?;
        let api_secret = format!("nsbridge demo secret {:016x}", Random::seeded().next());
        let id = ObjectId::new();
        db.collection::<Document>("auth_subjects")
            .insert_one(doc! { "_id": id, "name": SUBJECT, "roles": ["readable"] })
            .await
            .context("seeding the access token's subject")?;
        let digest = token::subject_digest(&token::api_secret_hash(&api_secret), &id.to_hex());
        (
            Some(api_secret),
            Some(token::access_token(SUBJECT, &digest)),
            Some(db),
        )
    } else {
        (None, None, None)
    };

    let bridge_uri = match &watched {
        Some(db) => with_database(&base_uri, db.name())?,
        None => base_uri.clone(),
    };
    let bridge = start_bridge(&bridge_uri, api_secret.as_deref(), args.port).await?;
    let bridge_pid = bridge.child.id().unwrap_or(0);
    started.push(bridge);
    wait_ready(args.port).await?;

    let store_pid = started
        .iter()
        .find(|p| p.name == "store")
        .and_then(|p| p.child.id())
        .map_or("none".to_string(), |pid| pid.to_string());
    println!("nsbridge demo");
    println!("  live page: http://127.0.0.1:{}/", args.port);
    match &token {
        Some(token) => println!("  token: {token}"),
        None => println!("  token: an access token of your site (Nightscout's Admin Tools)"),
    }
    match &watched {
        Some(db) => println!(
            "  writing: database {} every {} s (entries; treatments, device statuses, patches and soft deletes now and then)",
            db.name(),
            args.interval_secs
        ),
        None => println!("  writing: nothing (MONGODB_URI without --write: the demo only reads)"),
    }
    println!("  processes: store {store_pid}, bridge {bridge_pid}");
    println!("Paste the token into the page and press Subscribe. Ctrl-C stops everything.");

    let mut writer = watched.map(|db| Writer::new(db, args.interval_secs));
    let mut tick = tokio::time::interval(Duration::from_secs(args.interval_secs));
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM")?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = tick.tick() => {
                for process in started.iter_mut() {
                    if let Ok(Some(status)) = process.child.try_wait() {
                        bail!("the {} stopped ({status})", process.name);
                    }
                }
                if let Some(writer) = writer.as_mut() {
                    match writer.step().await {
                        Ok(line) => println!("{line}"),
                        Err(e) => eprintln!("nsbridge-demo: a write failed: {e}"),
                    }
                }
            }
        }
    }
    println!("stopping");
    Ok(())
}

/// Makes sure `db` is the demo's to write in: empty, or marked by an earlier demo.
async fn claim(db: &mongodb::Database, own_store: bool) -> anyhow::Result<()> {
    let names = db
        .list_collection_names()
        .await
        .context("listing the demo database")?;
    if !own_store && !names.is_empty() && !names.iter().any(|n| n == MARKER) {
        bail!(
            "database {:?} already holds data that is not the demo's; name an empty one with --database",
            db.name()
        );
    }
    for name in names.iter().filter(|n| *n != MARKER) {
        db.collection::<Document>(name).drop().await?;
    }
    if !names.iter().any(|n| n == MARKER) {
        db.collection::<Document>(MARKER)
            .insert_one(doc! { "createdBy": "nsbridge-demo" })
            .await?;
    }
    Ok(())
}

/// `uri` with its database replaced by `database`.
fn with_database(uri: &str, database: &str) -> anyhow::Result<String> {
    let (scheme, rest) = uri.split_once("://").context("MONGODB_URI has no scheme")?;
    let (authority, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let hosts = authority.split('/').next().unwrap_or(authority);
    Ok(match query {
        Some(query) => format!("{scheme}://{hosts}/{database}?{query}"),
        None => format!("{scheme}://{hosts}/{database}"),
    })
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The compatibility store of the tests, on a free port, its data in `scratch`.
async fn start_store(scratch: &Path) -> anyhow::Result<(Started, u16)> {
    let python = repo().join("target/test-store/venv/bin/python");
    if !python.exists() {
        bail!("the compatibility store is not installed: run scripts/demo (it installs it)");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = dies_with_the_demo(&mut Command::new(python))
        .arg(repo().join("tests/support/store/nx_launcher.py"))
        .args(["--host", "127.0.0.1", "-p", &port.to_string(), "--data-dir"])
        .arg(scratch)
        .arg("--pid-file")
        .arg(scratch.join("store.pid"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the compatibility store")?;
    let mut lines = BufReader::new(child.stdout.take().context("store output")?).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("the store did not start within 30 s")??
        .unwrap_or_default();
    if !line.contains("ready") {
        bail!("the store did not start: {line}");
    }
    Ok((Started { name: "store", child }, port))
}

async fn start_bridge(uri: &str, api_secret: Option<&str>, port: u16) -> anyhow::Result<Started> {
    let exe = std::env::current_exe()?;
    let bridge = exe.with_file_name("nsbridge");
    if !bridge.exists() {
        bail!("{} is missing: run scripts/demo (it builds it)", bridge.display());
    }
    let mut command = Command::new(bridge);
    dies_with_the_demo(&mut command)
        .env("MONGODB_URI", uri)
        .env("NSBRIDGE_LISTEN", format!("127.0.0.1:{port}"))
        .env("NSBRIDGE_LOG__LEVEL", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(secret) = api_secret {
        command.env("API_SECRET", secret);
    }
    let child = command.spawn().context("starting the bridge")?;
    Ok(Started {
        name: "bridge",
        child,
    })
}

/// `GET /readyz`'s status, or `None` when the bridge does not answer.
async fn nsbridge_status(port: u16) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .ok()?
    .ok()?;
    stream
        .write_all(b"GET /nsbridge/readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

async fn wait_ready(port: u16) -> anyhow::Result<()> {
    for _ in 0..300 {
        if nsbridge_status(port).await == Some(200) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the bridge was not ready within 30 s (is port {port} free?)")
}

/// A small deterministic generator (xorshift), enough for plausible noise.
struct Random(u64);

impl Random {
    fn seeded() -> Random {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Random(nanos | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-1, 1].
    fn signed(&mut self) -> f64 {
        (self.next() % 2001) as f64 / 1000.0 - 1.0
    }

    fn identifier(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 52,
            b & 0xffff_ffff_ffff
        )
    }
}

/// Writes the demo's data, one step per tick.
struct Writer {
    db: mongodb::Database,
    random: Random,
    step: u64,
    /// Glucose in mg/dl, and what a meal still adds.
    sgv: f64,
    meal: f64,
    interval_secs: u64,
    treatments: Vec<String>,
}

impl Writer {
    fn new(db: mongodb::Database, interval_secs: u64) -> Writer {
        Writer {
            db,
            random: Random::seeded(),
            step: 0,
            sgv: 120.0,
            meal: 0.0,
            interval_secs,
            treatments: Vec::new(),
        }
    }

    /// APIv3's fields of a new document.
    fn created(&mut self, now: i64, mut document: Document) -> (String, Document) {
        let identifier = self.random.identifier();
        document.insert("identifier", identifier.clone());
        document.insert("date", now);
        document.insert("utcOffset", 0);
        document.insert("app", "nsbridge-demo");
        document.insert("device", "nsbridge-demo");
        document.insert("srvCreated", now);
        document.insert("srvModified", now);
        document.insert("subject", SUBJECT);
        (identifier, document)
    }

    async fn step(&mut self) -> anyhow::Result<String> {
        self.step += 1;
        let now = nsbridge::feed::now_ms();
        let iso = bson::DateTime::from_millis(now).try_to_rfc3339_string()?;
        // A day's ups and downs in eight minutes, meals on top, a little sensor noise.
        let phase = (self.step * self.interval_secs) as f64 / 480.0 * std::f64::consts::TAU;
        let target = 130.0 + 55.0 * phase.sin() + self.meal;
        self.meal *= 0.9;
        let previous = self.sgv;
        self.sgv = (self.sgv + (target - self.sgv) * 0.35 + 3.0 * self.random.signed()).clamp(45.0, 350.0);
        let delta = self.sgv - previous;
        let direction = match delta {
            d if d > 8.0 => "SingleUp",
            d if d > 3.0 => "FortyFiveUp",
            d if d < -8.0 => "SingleDown",
            d if d < -3.0 => "FortyFiveDown",
            _ => "Flat",
        };
        let sgv = self.sgv.round() as i32;
        let (_, entry) = self.created(
            now,
            doc! { "type": "sgv", "sgv": sgv, "direction": direction, "dateString": &iso, "noise": 1 },
        );
        self.db
            .collection::<Document>("entries")
            .insert_one(entry)
            .await?;
        let mut line = format!("entries create {sgv} mg/dl {direction}");

        if self.step.is_multiple_of(4) {
            let iob = 1.2 + 0.5 * self.random.signed();
            let (_, status) = self.created(
                now,
                doc! { "created_at": &iso, "uploaderBattery": 80 - (self.step % 40) as i32,
                "pump": { "battery": { "percent": 75 }, "reservoir": 150.0 - self.step as f64 * 0.1 },
                "openaps": { "iob": { "iob": iob }, "suggested": { "bg": sgv, "eventualBG": sgv - 5 } } },
            );
            self.db
                .collection::<Document>("devicestatus")
                .insert_one(status)
                .await?;
            line.push_str(" · devicestatus create");
        }
        if self.step.is_multiple_of(7) {
            let treatment = if self.step.is_multiple_of(14) {
                self.meal = 70.0;
                doc! { "eventType": "Meal Bolus", "carbs": 40, "insulin": 4.0, "created_at": &iso }
            } else {
                doc! { "eventType": "Correction Bolus", "insulin": 0.8, "created_at": &iso }
            };
            let (identifier, treatment) = self.created(now, treatment);
            self.db
                .collection::<Document>("treatments")
                .insert_one(treatment)
                .await?;
            self.treatments.push(identifier);
            line.push_str(" · treatments create");
        }
        if self.step.is_multiple_of(9)
            && let Some(identifier) = self.treatments.last()
        {
            self.db
                .collection::<Document>("treatments")
                .update_one(
                    doc! { "identifier": identifier },
                    doc! { "$set": { "notes": format!("edited at {iso}"), "srvModified": now, "modifiedBy": SUBJECT } },
                )
                .await?;
            line.push_str(" · treatments update (patch)");
        }
        if self.step.is_multiple_of(13) && self.treatments.len() > 1 {
            let identifier = self.treatments.remove(0);
            self.db
                .collection::<Document>("treatments")
                .update_one(
                    doc! { "identifier": &identifier },
                    doc! { "$set": { "isValid": false, "srvModified": now, "modifiedBy": SUBJECT } },
                )
                .await?;
            line.push_str(" · treatments delete (soft)");
        }
        Ok(line)
    }
}
