//! Real Node Socket.IO clients (socket.io-client 2.2.0 and 4.x), driven through
//! `tests/compat/puppet.js` over JSON lines.

use std::collections::VecDeque;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use super::store::repo_path;

pub const WAIT: Duration = Duration::from_secs(20);

/// One client configuration of the compatibility matrix.
#[derive(Debug, Clone, Copy)]
pub struct ClientKind {
    /// "v2" (socket.io-client 2.2.0, Engine.IO 3) or "v4" (4.x, Engine.IO 4).
    pub client: &'static str,
    pub websocket_only: bool,
}

impl ClientKind {
    pub fn transports(&self) -> Value {
        if self.websocket_only {
            json!(["websocket"])
        } else {
            json!(["polling", "websocket"])
        }
    }
}

/// Both client versions, each over default transports (polling, then upgrade) and
/// websocket only.
pub const MATRIX: [ClientKind; 4] = [
    ClientKind {
        client: "v2",
        websocket_only: false,
    },
    ClientKind {
        client: "v2",
        websocket_only: true,
    },
    ClientKind {
        client: "v4",
        websocket_only: false,
    },
    ClientKind {
        client: "v4",
        websocket_only: true,
    },
];

pub struct Puppet {
    child: Child,
    stdin: ChildStdin,
    reports: mpsc::UnboundedReceiver<Value>,
    /// Reports read but not yet taken by an `expect`.
    backlog: VecDeque<Value>,
    next_tag: u64,
}

impl Puppet {
    pub async fn start() -> Puppet {
        let dir = repo_path("tests/compat");
        assert!(
            dir.join("node_modules/socket.io-client-v2").is_dir(),
            "the Node clients are not installed: run scripts/test (it runs tests/compat/setup.sh)"
        );
        let mut child = Command::new("node")
            .arg("puppet.js")
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("starting node (needs Node.js on PATH)");
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, reports) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("puppet printed a non-JSON line {line:?}: {e}"));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let mut puppet = Puppet {
            child,
            stdin,
            reports,
            backlog: VecDeque::new(),
            next_tag: 0,
        };
        puppet.expect(|r| r["type"] == "ready").await;
        puppet
    }

    pub async fn send(&mut self, command: Value) {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Takes the first report (already read or still to come) that matches.
    pub async fn expect(&mut self, matches: impl Fn(&Value) -> bool) -> Value {
        self.expect_within(WAIT, matches)
            .await
            .unwrap_or_else(|| panic!("no matching report within {WAIT:?}; unread: {:#?}", self.backlog))
    }

    pub async fn expect_within(
        &mut self,
        limit: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        if let Some(i) = self.backlog.iter().position(&matches) {
            return self.backlog.remove(i);
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let report = tokio::time::timeout_at(deadline, self.reports.recv())
                .await
                .ok()??;
            if report["type"] == "error" && report.get("tag").is_none() {
                panic!("puppet error: {report}");
            }
            if matches(&report) {
                return Some(report);
            }
            self.backlog.push_back(report);
        }
    }

    /// Everything reported so far and not taken, after waiting `quiet` for stragglers.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        tokio::time::sleep(quiet).await;
        while let Ok(report) = self.reports.try_recv() {
            self.backlog.push_back(report);
        }
        self.backlog.drain(..).collect()
    }

    fn tag(&mut self) -> String {
        self.next_tag += 1;
        format!("t{}", self.next_tag)
    }

    /// Opens one connection for `id` multiplexing `namespaces`, without waiting.
    pub async fn open(&mut self, id: &str, kind: ClientKind, url: &str, namespaces: &[&str], extra: Value) {
        let mut command = json!({
            "op": "connect", "id": id, "client": kind.client, "url": url,
            "namespaces": namespaces, "transports": kind.transports(),
        });
        if let (Some(command), Some(extra)) = (command.as_object_mut(), extra.as_object()) {
            command.extend(extra.clone());
        }
        self.send(command).await;
    }

    /// Opens `/storage` for `id` and waits for its `connect`.
    pub async fn connect(&mut self, id: &str, kind: ClientKind, url: &str) {
        self.open(id, kind, url, &["/storage"], json!({})).await;
        self.expect_connected(id, "/storage").await;
    }

    pub async fn expect_connected(&mut self, id: &str, ns: &str) {
        let report = self
            .expect(|r| {
                r["id"] == id && r["ns"] == ns && (r["type"] == "connect" || r["type"] == "connect_error")
            })
            .await;
        assert_eq!(report["type"], "connect", "{id} {ns}: {report}");
    }

    /// Emits `subscribe` with `payload` and returns the ack's arguments.
    pub async fn subscribe(&mut self, id: &str, payload: Value) -> Vec<Value> {
        self.emit_with_ack(id, "subscribe", json!([payload])).await
    }

    /// Subscribes `id` to `collections` with `token`; the ack must be exactly a success
    /// that names them, in that order.
    pub async fn subscribe_ok(&mut self, id: &str, token: &str, collections: &[&str]) {
        let ack = self
            .subscribe(id, json!({"accessToken": token, "collections": collections}))
            .await;
        assert_eq!(
            ack,
            vec![json!({"success": true, "collections": collections})],
            "{id}"
        );
    }

    pub async fn emit_with_ack(&mut self, id: &str, event: &str, args: Value) -> Vec<Value> {
        self.emit_with_ack_in(id, "/storage", event, args).await
    }

    /// Emits on namespace `ns` and returns the ack's arguments.
    pub async fn emit_with_ack_in(&mut self, id: &str, ns: &str, event: &str, args: Value) -> Vec<Value> {
        let tag = self.emit_acked(id, ns, event, args).await;
        let ack = self.expect(|r| r["type"] == "ack" && r["tag"] == tag).await;
        ack["args"].as_array().unwrap().clone()
    }

    /// Emits on namespace `ns` asking for an ack, without waiting for it; returns the tag
    /// its `ack` report will carry.
    pub async fn emit_acked(&mut self, id: &str, ns: &str, event: &str, args: Value) -> String {
        let tag = self.tag();
        self.send(
            json!({"op": "emit", "id": id, "ns": ns, "event": event, "args": args, "ack": true, "tag": tag}),
        )
        .await;
        tag
    }

    /// Emits without asking for an ack.
    pub async fn emit(&mut self, id: &str, event: &str, args: Value) {
        let tag = self.tag();
        self.send(json!({"op": "emit", "id": id, "ns": "/storage", "event": event, "args": args, "ack": false, "tag": tag}))
            .await;
    }

    /// Sends a command that answers with a report carrying its tag, and returns it.
    pub async fn request(&mut self, op: &str, id: &str) -> Value {
        let tag = self.tag();
        self.send(json!({"op": op, "id": id, "tag": tag})).await;
        self.expect(|r| r["tag"] == tag).await
    }

    /// Waits until `id` runs on a WebSocket (the upgrade from polling is asynchronous).
    pub async fn wait_for_websocket(&mut self, id: &str) {
        for _ in 0..200 {
            if self.request("transport", id).await["name"] == "websocket" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{id} never upgraded to websocket");
    }

    /// `[name, payload]` of each event `id` receives on `/storage`, up to and including
    /// the first whose payload satisfies `last`.
    pub async fn events_until(&mut self, id: &str, last: impl Fn(&Value) -> bool) -> Vec<(String, Value)> {
        self.event_args_until(id, last)
            .await
            .into_iter()
            .map(|(name, args)| {
                assert_eq!(args.len(), 1, "one payload per event: {name} {args:?}");
                (name, args[0].clone())
            })
            .collect()
    }

    /// As [`Puppet::events_until`], for a client with connection state recovery: each
    /// event's offset (its last argument, a string) comes with it.
    pub async fn events_with_offsets_until(
        &mut self,
        id: &str,
        last: impl Fn(&Value) -> bool,
    ) -> Vec<(String, Value, String)> {
        self.event_args_until(id, last)
            .await
            .into_iter()
            .map(|(name, args)| {
                assert_eq!(
                    args.len(),
                    2,
                    "a payload and an offset per event: {name} {args:?}"
                );
                let offset = args[1]
                    .as_str()
                    .unwrap_or_else(|| panic!("offset {:?} is not a string", args[1]));
                (name, args[0].clone(), offset.to_string())
            })
            .collect()
    }

    async fn event_args_until(
        &mut self,
        id: &str,
        last: impl Fn(&Value) -> bool,
    ) -> Vec<(String, Vec<Value>)> {
        let mut events = Vec::new();
        loop {
            let report = self
                .expect(|r| {
                    r["id"] == id
                        && r["ns"] == "/storage"
                        && (r["type"] == "event" || r["type"] == "disconnect")
                })
                .await;
            assert_eq!(
                report["type"], "event",
                "{id} disconnected while waiting for events: {events:#?}"
            );
            let args = report["args"].as_array().unwrap().clone();
            let done = args.first().is_some_and(&last);
            events.push((report["name"].as_str().unwrap().to_string(), args));
            if done {
                return events;
            }
        }
    }

    /// Cuts `id`'s connection under it, as a network loss would.
    pub async fn drop_connection(&mut self, id: &str) {
        let report = self.request("drop", id).await;
        assert_eq!(report["type"], "dropped", "{report}");
    }
}

impl Drop for Puppet {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
