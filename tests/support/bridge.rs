//! The bridge as its users run it: the real binary, on a free port, against the test
//! store; plus a minimal HTTP client for its endpoints.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mongodb::Database;
use mongodb::bson::{Document, doc, oid::ObjectId};
use nsbridge::auth::token::{access_token, api_secret_hash, subject_digest};

pub use super::http::http_get;
use super::store::TestStore;

pub const API_SECRET: &str = "this is my long pass phrase";

pub struct TestBridge {
    pub port: u16,
    /// Where the bridge's own endpoints are: `/nsbridge` in front-door mode.
    pub prefix: &'static str,
    child: Option<Child>,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestBridge {
    /// Starts `nsbridge` on `127.0.0.1:0` against `database`, with `env` on top of the
    /// test defaults, and waits until it listens.
    pub async fn start(store: &TestStore, database: &str, env: &[(&str, &str)]) -> TestBridge {
        TestBridge::launch(Command::new(env!("CARGO_BIN_EXE_nsbridge")), store, database, env).await
    }

    /// As [`TestBridge::start`], under `ulimit -n open_files` (soft and hard limits).
    pub async fn start_with_open_files(
        store: &TestStore,
        database: &str,
        env: &[(&str, &str)],
        open_files: u32,
    ) -> TestBridge {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            &format!("ulimit -n {open_files} && exec \"$0\""),
            env!("CARGO_BIN_EXE_nsbridge"),
        ]);
        TestBridge::launch(command, store, database, env).await
    }

    async fn launch(
        mut command: Command,
        store: &TestStore,
        database: &str,
        env: &[(&str, &str)],
    ) -> TestBridge {
        let dir = tempfile::Builder::new()
            .prefix("nsbridge-bridge-")
            .tempdir()
            .unwrap();
        let log_path = dir.path().join("bridge.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("MONGODB_URI", store.uri(database))
            .env("API_SECRET", API_SECRET)
            .env("NSBRIDGE_LISTEN", "127.0.0.1:0")
            .env("NSBRIDGE_LOG__FORMAT", "json")
            .env(
                "NSBRIDGE_LOG__LEVEL",
                "debug,mongodb=info,socketioxide=info,engineioxide=info",
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting nsbridge");
        let front_door = env
            .iter()
            .any(|(k, v)| *k == "NSBRIDGE_UPSTREAM" && !v.is_empty());
        let mut bridge = TestBridge {
            port: 0,
            prefix: if front_door { "/nsbridge" } else { "" },
            child: Some(child),
            log_path,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while bridge.port == 0 {
            if let Some(port) = bridge.listening_port() {
                bridge.port = port;
                break;
            }
            if let Some(status) = bridge.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "nsbridge exited with {status} before listening:\n{}",
                    bridge.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nsbridge did not listen:\n{}",
                bridge.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bridge
    }

    fn listening_port(&self) -> Option<u16> {
        self.log_lines()
            .into_iter()
            .find(|l| l["message"] == "nsbridge listening")
            .and_then(|l| l["listen"].as_str()?.rsplit(':').next()?.parse().ok())
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The JSON log lines so far.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for `/readyz` to answer 200.
    pub async fn ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = http_get(self.port, &format!("{}/readyz", self.prefix)).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nsbridge never ready:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal by name (`STOP`, `CONT`, ...).
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// Sends SIGTERM and waits up to `limit` for the exit.
    pub async fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A store, a database of the test's own with three subjects (a `readable` follower, an
/// admin, a careportal uploader), and the bridge on it, ready.
pub struct Setup {
    pub store: TestStore,
    pub db: Database,
    pub bridge: TestBridge,
    pub reader: TestSubject,
    pub admin: TestSubject,
    pub uploader: TestSubject,
}

impl Setup {
    pub async fn start(name: &str, env: &[(&str, &str)]) -> Setup {
        let store = TestStore::start().await;
        let client = store.client().await;
        let database = store.database(name);
        let db = client.database(&database);
        let reader = add_subject(&db, "Follower", &["readable"]).await;
        let admin = add_subject(&db, "Admin Tool", &["admin"]).await;
        let uploader = add_subject(&db, "Uploader", &["careportal"]).await;
        let bridge = TestBridge::start(&store, &database, env).await;
        bridge.ready().await;
        Setup {
            store,
            db,
            bridge,
            reader,
            admin,
            uploader,
        }
    }
}

/// A subject in `auth_subjects` and its access token.
pub struct TestSubject {
    pub id: ObjectId,
    pub name: String,
    pub token: String,
}

pub async fn add_subject(db: &Database, name: &str, roles: &[&str]) -> TestSubject {
    let id = ObjectId::new();
    db.collection::<Document>("auth_subjects")
        .insert_one(doc! { "_id": id, "name": name, "roles": roles })
        .await
        .unwrap();
    TestSubject {
        id,
        name: name.to_string(),
        token: token_of(id, name),
    }
}

pub fn token_of(id: ObjectId, name: &str) -> String {
    access_token(name, &subject_digest(&api_secret_hash(API_SECRET), &id.to_hex()))
}
