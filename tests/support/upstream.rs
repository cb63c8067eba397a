//! A stand-in for Nightscout behind the bridge's front door (`tests/compat/upstream.js`):
//! started on a port of its own, stopped and started again on the same port.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::http::{http_get, http_request};
use super::store::{free_port, repo_path};

pub struct TestUpstream {
    pub port: u16,
    child: Option<Child>,
}

impl TestUpstream {
    pub async fn start() -> TestUpstream {
        let mut upstream = TestUpstream {
            port: free_port(),
            child: None,
        };
        upstream.restart().await;
        upstream
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts it again, on the same port, after [`TestUpstream::stop`].
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        let dir = repo_path("tests/compat");
        assert!(
            dir.join("node_modules/socket.io").is_dir(),
            "the Node packages are not installed: run scripts/test (it runs tests/compat/setup.sh)"
        );
        let mut child = Command::new("node")
            .arg("upstream.js")
            .current_dir(&dir)
            .env("PORT", self.port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("starting node (needs Node.js on PATH)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the upstream stand-in did not start")
            .unwrap()
            .unwrap_or_default();
        let ready: Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("upstream printed {line:?}"));
        assert_eq!(ready["type"], "listening", "{line}");
        self.child = Some(child);
    }

    /// Stops it, as Nightscout going away.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// The Socket.IO handshakes it has seen.
    pub async fn handshakes(&self) -> Vec<Value> {
        let (status, body) = http_get(self.port, "/__test/handshakes").await.unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// Emits `event` to every socket of its namespace `ns`; returns how many there are.
    pub async fn emit(&self, ns: &str, event: &str, args: Value) -> u64 {
        let body = serde_json::json!({"ns": ns, "event": event, "args": args}).to_string();
        let (status, reply) = http_request(self.port, "POST", "/__test/emit", &body)
            .await
            .unwrap();
        assert_eq!(status, 200, "{reply}");
        serde_json::from_str::<Value>(&reply).unwrap()["sockets"]
            .as_u64()
            .unwrap()
    }
}
