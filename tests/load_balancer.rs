//! The nginx example of docs/scale-out.md and docker-compose.yml (`deploy/nginx/replicas.conf`),
//! run for real in front of two bridge replicas: long-polling clients (kept on one
//! replica), upgrading clients and WebSocket clients all get every event once, in order.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mongodb::bson::{Document, doc};
use serde_json::json;
use support::bridge::{TestBridge, add_subject};
use support::data::{identifiers, is_sentinel, now_ms};
use support::puppet::{ClientKind, Puppet};
use support::store::{TestStore, free_port, repo_path};
use support::ws::{WsSubscriber, identifier_of};

struct Nginx {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx with the repository's configuration, its upstream servers pointed at `replicas`
/// and its listener at a free loopback port.
async fn nginx_in_front_of(replicas: [u16; 2]) -> Nginx {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = std::fs::read_to_string(repo_path("deploy/nginx/replicas.conf"))
        .unwrap()
        .replace(
            "server nsbridge:8080",
            &format!("server 127.0.0.1:{}", replicas[0]),
        )
        .replace(
            "server nsbridge-2:8080",
            &format!("server 127.0.0.1:{}", replicas[1]),
        )
        .replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
    assert!(
        conf.contains(&format!("127.0.0.1:{}", replicas[1])),
        "upstream servers renamed?"
    );
    std::fs::write(dir.path().join("replicas.conf"), conf).unwrap();
    let d = dir.path().display();
    for temp in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir(dir.path().join(temp)).unwrap();
    }
    // One process (no master and workers), so that killing it leaves nothing behind.
    let main = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log stderr warn;\nevents {{}}\nhttp {{\n  access_log off;\n  \
         client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  include {d}/replicas.conf;\n}}\n"
    );
    std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
    let nginx = which_nginx();
    let child = Command::new(nginx)
        .args(["-e", "stderr", "-p"])
        .arg(dir.path())
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting nginx");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Nginx {
        child,
        port,
        _dir: dir,
    }
}

fn which_nginx() -> String {
    for candidate in ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.to_string();
        }
    }
    panic!("nginx is needed (scripts/test installs Debian's nginx-light)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_client_gets_every_event_once_through_nginx() {
    let store = TestStore::start().await;
    let client = store.client().await;
    let database = store.database("nginx");
    let db = client.database(&database);
    let reader = add_subject(&db, "Follower", &["readable"]).await;
    let replicas = [
        TestBridge::start(&store, &database, &[]).await,
        TestBridge::start(&store, &database, &[]).await,
    ];
    for replica in &replicas {
        replica.ready().await;
    }
    let nginx = nginx_in_front_of([replicas[0].port, replicas[1].port]).await;
    let url = format!("http://127.0.0.1:{}", nginx.port);

    let mut puppet = Puppet::start().await;
    let clients = [
        ("v2-polling", "v2", json!(["polling"])),
        ("v4-polling", "v4", json!(["polling"])),
        ("v2-upgrading", "v2", json!(["polling", "websocket"])),
        ("v4-upgrading", "v4", json!(["polling", "websocket"])),
        ("v4-websocket", "v4", json!(["websocket"])),
    ];
    for (id, client, transports) in &clients {
        let kind = ClientKind {
            client,
            websocket_only: false,
        };
        puppet
            .open(id, kind, &url, &["/storage"], json!({ "transports": transports }))
            .await;
        puppet.expect_connected(id, "/storage").await;
        puppet.subscribe_ok(id, &reader.token, &["entries"]).await;
    }
    let mut raw = WsSubscriber::connect(nginx.port, &reader.token, &["entries"])
        .await
        .unwrap();

    let mut written: Vec<String> = (0..20).map(|i| format!("lb-{i}")).collect();
    written.push("sentinel".into());
    for identifier in &written {
        let now = now_ms();
        db.collection::<Document>("entries")
            .insert_one(doc! { "identifier": identifier, "sgv": 100, "srvModified": now, "srvCreated": now })
            .await
            .unwrap();
    }
    for (id, _, _) in &clients {
        let got = puppet.events_until(id, is_sentinel).await;
        assert_eq!(identifiers(&got), written, "{id}");
    }
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("sentinel") {
        let packet = tokio::time::timeout(Duration::from_secs(20), raw.next_event())
            .await
            .unwrap()
            .unwrap();
        got.push(identifier_of(&packet).unwrap().to_string());
    }
    assert_eq!(got, written);
    let rest = puppet.drain(Duration::from_millis(500)).await;
    assert!(
        rest.iter()
            .all(|r| r["type"] != "event" && r["type"] != "disconnect"),
        "{rest:#?}"
    );
}
