//! A MongoDB for the tests, in the order `test-store.md` gives: `MONGODB_URI`, else a
//! throw-away single-node replica set of the `mongod` on PATH, else the compatibility
//! store (nx-27017 through `tests/support/store/nx_launcher.py`, installed by
//! `scripts/test`). Never skips: without any of the three it fails and says why.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mongodb::Client;
use mongodb::bson::doc;

const NO_STORE: &str = "no MongoDB for the integration tests: set MONGODB_URI to a replica set \
    (e.g. the `mongo` service of docker-compose.yml), put `mongod` (4.4+) on PATH, or run \
    `scripts/test`, which installs the compatibility store into target/test-store";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// `MONGODB_URI`: a server the tests do not own.
    External,
    Mongod,
    Compat,
}

pub struct TestStore {
    pub kind: StoreKind,
    /// Extra launcher arguments (compatibility store only).
    compat_args: Vec<String>,
    host_port: String,
    query: String,
    port: u16,
    process: Option<Child>,
    dir: tempfile::TempDir,
    databases: std::sync::Mutex<Vec<String>>,
}

impl TestStore {
    pub async fn start() -> TestStore {
        TestStore::start_with(true).await
    }

    /// A store this process owns, for tests that kill and restart it: `mongod` or the
    /// compatibility store, whatever `MONGODB_URI` says.
    pub async fn start_owned() -> TestStore {
        TestStore::start_with(false).await
    }

    /// The compatibility store, whatever else is available, with launcher arguments:
    /// for behaviour only it can be made to show (a short change history).
    pub async fn start_compat(args: &[&str]) -> TestStore {
        assert!(compat_python().is_file(), "{NO_STORE}");
        let dir = tempfile::Builder::new()
            .prefix("nsbridge-store-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let mut store = TestStore {
            kind: StoreKind::Compat,
            compat_args: args.iter().map(|a| a.to_string()).collect(),
            host_port: format!("127.0.0.1:{port}"),
            query: "directConnection=true".into(),
            port,
            process: None,
            dir,
            databases: Default::default(),
        };
        store.spawn().await;
        store
    }

    async fn start_with(allow_external: bool) -> TestStore {
        let dir = tempfile::Builder::new()
            .prefix("nsbridge-store-")
            .tempdir()
            .unwrap();
        let external = std::env::var("MONGODB_URI")
            .ok()
            .filter(|u| !u.is_empty() && allow_external);
        if let Some(uri) = external {
            let (host_port, query) = split_uri(&uri);
            return TestStore {
                kind: StoreKind::External,
                compat_args: Vec::new(),
                host_port,
                query,
                port: 0,
                process: None,
                dir,
                databases: Default::default(),
            };
        }
        let kind = if on_path("mongod") {
            StoreKind::Mongod
        } else if compat_python().is_file() {
            StoreKind::Compat
        } else if allow_external {
            panic!("{NO_STORE}");
        } else {
            panic!(
                "this test kills and restarts its MongoDB, which it cannot do to MONGODB_URI: \
                 put `mongod` on PATH or run `scripts/test` (the compatibility store)"
            );
        };
        let mut store = TestStore {
            kind,
            compat_args: Vec::new(),
            host_port: String::new(),
            query: "directConnection=true".into(),
            port: free_port(),
            process: None,
            dir,
            databases: Default::default(),
        };
        store.host_port = format!("127.0.0.1:{}", store.port);
        store.spawn().await;
        store
    }

    /// A new database name for one test; dropped when the store goes away.
    pub fn database(&self, prefix: &str) -> String {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "nsb_{prefix}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        self.databases.lock().unwrap().push(name.clone());
        name
    }

    pub fn uri(&self, database: &str) -> String {
        let query = if self.query.is_empty() {
            String::new()
        } else {
            format!("?{}", self.query)
        };
        format!("mongodb://{}/{database}{query}", self.host_port)
    }

    pub async fn client(&self) -> Client {
        let mut options = mongodb::options::ClientOptions::parse(self.uri("admin"))
            .await
            .unwrap();
        options.server_selection_timeout = Some(Duration::from_secs(10));
        Client::with_options(options).unwrap()
    }

    /// SIGKILL, as an outage; the data stays for [`TestStore::restart`].
    pub fn kill(&mut self) {
        let mut child = self
            .process
            .take()
            .expect("only a store the tests started can be killed");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends a signal by name (`STOP`, `CONT`, ...) to a store the tests started.
    pub fn signal(&self, name: &str) {
        let pid = self
            .process
            .as_ref()
            .expect("only a store the tests started can be signalled")
            .id()
            .to_string();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {pid}");
    }

    pub async fn restart(&mut self) {
        assert!(self.process.is_none(), "kill the store first");
        self.spawn().await;
    }

    async fn spawn(&mut self) {
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("store.log"))
            .unwrap();
        let port = self.port.to_string();
        let mut child = match self.kind {
            StoreKind::Compat => Command::new(compat_python())
                .arg(repo_path("tests/support/store/nx_launcher.py"))
                .args(["--host", "127.0.0.1", "-p", &port, "--data-dir"])
                .arg(&data)
                .arg("--pid-file")
                .arg(self.dir.path().join("nx.pid"))
                .args(&self.compat_args)
                .stdout(Stdio::piped())
                .stderr(log.try_clone().unwrap())
                .spawn()
                .expect("starting the compatibility store"),
            StoreKind::Mongod => Command::new("mongod")
                .args([
                    "--replSet",
                    "rs0",
                    "--bind_ip",
                    "127.0.0.1",
                    "--port",
                    &port,
                    "--quiet",
                    "--dbpath",
                ])
                .arg(&data)
                .stdout(log.try_clone().unwrap())
                .stderr(log.try_clone().unwrap())
                .spawn()
                .expect("starting mongod"),
            StoreKind::External => unreachable!(),
        };
        if self.kind == StoreKind::Compat {
            let mut stdout = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            if !line.contains("ready on") {
                let _ = child.kill();
                panic!("compatibility store did not start: {line:?}\n{}", self.log());
            }
            // Keep draining, so that later output never blocks the store on a full pipe.
            let mut sink = log;
            std::thread::spawn(move || std::io::copy(&mut stdout, &mut sink));
        }
        self.process = Some(child);
        self.wait_until_writable().await;
    }

    async fn wait_until_writable(&self) {
        let client = self.client().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut initiated = false;
        loop {
            let hello = client.database("admin").run_command(doc! { "hello": 1 }).await;
            match hello {
                Ok(reply) if reply.get_bool("isWritablePrimary").unwrap_or(false) => return,
                Ok(_) if self.kind == StoreKind::Mongod && !initiated => {
                    let config = doc! { "_id": "rs0", "members": [{ "_id": 0, "host": &self.host_port }] };
                    initiated = client
                        .database("admin")
                        .run_command(doc! { "replSetInitiate": config })
                        .await
                        .is_ok();
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "store not writable after 30 s\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("store.log")).unwrap_or_default()
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.kind == StoreKind::External {
            let databases = std::mem::take(&mut *self.databases.lock().unwrap());
            let uri = self.uri("admin");
            // Drop runs inside the test's runtime; clean up from a thread of our own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(client) = Client::with_uri_str(&uri).await {
                        for db in databases {
                            let _ = client.database(&db).drop().await;
                        }
                    }
                });
            })
            .join();
        }
    }
}

/// `mongodb://[userinfo@]hosts[/db][?query]` → (`[userinfo@]hosts`, `query`).
fn split_uri(uri: &str) -> (String, String) {
    let rest = uri
        .strip_prefix("mongodb://")
        .expect("MONGODB_URI for the tests must start with mongodb://");
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let query = tail
        .split_once('?')
        .map(|(_, q)| q.to_string())
        .unwrap_or_default();
    (authority.to_string(), query)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn compat_python() -> PathBuf {
    repo_path("target/test-store/venv/bin/python")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}
