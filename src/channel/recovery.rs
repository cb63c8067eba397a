//! Socket.IO connection state recovery (socket.io 4.6+), for `/storage`: what a client
//! asks for in its CONNECT's auth payload, and the subscriptions of disconnected sockets
//! kept for the recovery window under their private session id; pure.
//!
//! A client opts in with `{"recovery": true}` in its auth payload (so that clients that
//! do not, the Java client of AndroidAPS and socket.io-client 2.x among them, get exactly
//! the frames they always got); it then gets a `pid` in the CONNECT packet and every
//! event with its offset as a last argument. After a transport drop, socket.io-client
//! 4.6+ reconnects presenting `{"pid", "offset"}`: within the window, the bridge answers
//! with the same pid (the client's `socket.recovered` is then true), restores its
//! subscriptions as its subject may still read them, and replays what it missed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::collections::Collection;

/// What a `/storage` CONNECT asks of recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// Nothing: the frames of a client that does not know recovery.
    Nothing,
    /// A first connect that opts in.
    OptIn,
    /// A reconnect: the pid it had and the offset of the last event it received (none
    /// when it received none).
    Recover { pid: String, offset: Option<u64> },
}

/// Reads the CONNECT auth payload; anything malformed asks for nothing, or for a fresh
/// start when it opted in.
pub fn asked(auth: Option<&Value>) -> Asked {
    let Some(auth) = auth.and_then(Value::as_object) else {
        return Asked::Nothing;
    };
    let pid = auth
        .get("pid")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty() && p.len() <= 64);
    let offset = match auth.get("offset") {
        None => Ok(None),
        Some(offset) => offset
            .as_str()
            .and_then(|o| o.parse::<u64>().ok())
            .map(Some)
            .ok_or(()),
    };
    match (pid, offset) {
        (Some(pid), Ok(offset)) => Asked::Recover {
            pid: pid.to_string(),
            offset,
        },
        _ if pid.is_some() || auth.get("recovery") == Some(&Value::Bool(true)) => Asked::OptIn,
        _ => Asked::Nothing,
    }
}

/// Per collection, the subject whose grant kept a socket in that room.
pub type Grants = Vec<(Collection, Arc<str>)>;

struct Kept {
    grants: Grants,
    /// The position after which it joined: where a client that received no event
    /// recovers from.
    joined_after: u64,
    until: Instant,
}

/// The subscriptions of disconnected sockets, by pid, for the recovery window.
pub struct Recoverable {
    window: Duration,
    capacity: usize,
    kept: HashMap<String, Kept>,
}

impl Recoverable {
    pub fn new(window: Duration, capacity: usize) -> Recoverable {
        Recoverable {
            window,
            capacity,
            kept: HashMap::new(),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Keeps the subscriptions of a socket that disconnected at `now`, having joined its
    /// rooms after position `joined_after`.
    pub fn keep(&mut self, pid: String, grants: Grants, joined_after: u64, now: Instant) {
        if self.window.is_zero() || grants.is_empty() {
            return;
        }
        if self.kept.len() >= self.capacity {
            self.forget_expired(now);
            if self.kept.len() >= self.capacity {
                // Still full: the one closest to expiring makes room.
                if let Some(oldest) = self
                    .kept
                    .iter()
                    .min_by_key(|(_, k)| k.until)
                    .map(|(p, _)| p.clone())
                {
                    self.kept.remove(&oldest);
                }
            }
        }
        self.kept.insert(
            pid,
            Kept {
                grants,
                joined_after,
                until: now + self.window,
            },
        );
    }

    /// The subscriptions kept for `pid` and where it joined, if the window has not
    /// passed; taken once.
    pub fn take(&mut self, pid: &str, now: Instant) -> Option<(Grants, u64)> {
        let kept = self.kept.remove(pid)?;
        (now <= kept.until).then_some((kept.grants, kept.joined_after))
    }

    pub fn forget_expired(&mut self, now: Instant) {
        self.kept.retain(|_, kept| now <= kept.until);
    }

    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_a_connect_asks() {
        assert_eq!(asked(None), Asked::Nothing);
        assert_eq!(asked(Some(&json!({}))), Asked::Nothing);
        assert_eq!(asked(Some(&json!("x"))), Asked::Nothing);
        assert_eq!(asked(Some(&json!({"token": "t"}))), Asked::Nothing);
        assert_eq!(asked(Some(&json!({"recovery": true}))), Asked::OptIn);
        assert_eq!(asked(Some(&json!({"recovery": "yes"}))), Asked::Nothing);
        assert_eq!(
            asked(Some(&json!({"recovery": true, "pid": "p1", "offset": "42"}))),
            Asked::Recover {
                pid: "p1".into(),
                offset: Some(42)
            }
        );
        // socket.io-client sends no offset when it received no event yet.
        assert_eq!(
            asked(Some(&json!({"pid": "p1"}))),
            Asked::Recover {
                pid: "p1".into(),
                offset: None
            }
        );
        assert_eq!(
            asked(Some(&json!({"pid": "p1", "offset": "not a number"}))),
            Asked::OptIn
        );
        assert_eq!(asked(Some(&json!({"pid": "p1", "offset": 42}))), Asked::OptIn);
        assert_eq!(
            asked(Some(&json!({"pid": "x".repeat(65), "offset": "1"}))),
            Asked::Nothing
        );
    }

    fn grants() -> Grants {
        vec![(Collection::Entries, Arc::from("subject"))]
    }

    #[test]
    fn subscriptions_are_kept_for_the_window_and_taken_once() {
        let t0 = Instant::now();
        let mut kept = Recoverable::new(Duration::from_secs(120), 10);
        kept.keep("a".into(), grants(), 7, t0);
        kept.keep("b".into(), grants(), 7, t0);
        assert_eq!(kept.take("a", t0 + Duration::from_secs(120)), Some((grants(), 7)));
        assert_eq!(kept.take("a", t0), None, "taken once");
        assert_eq!(
            kept.take("b", t0 + Duration::from_secs(121)),
            None,
            "past the window"
        );
        assert!(kept.is_empty());
        // Nothing subscribed, or recovery off: nothing kept.
        kept.keep("c".into(), Vec::new(), 0, t0);
        assert!(kept.is_empty());
        let mut off = Recoverable::new(Duration::ZERO, 10);
        off.keep("d".into(), grants(), 0, t0);
        assert!(off.is_empty());
    }

    #[test]
    fn a_full_store_makes_room() {
        let t0 = Instant::now();
        let mut kept = Recoverable::new(Duration::from_secs(120), 2);
        kept.keep("a".into(), grants(), 0, t0);
        kept.keep("b".into(), grants(), 0, t0 + Duration::from_secs(1));
        kept.keep("c".into(), grants(), 0, t0 + Duration::from_secs(2));
        assert_eq!(kept.len(), 2);
        assert_eq!(
            kept.take("a", t0 + Duration::from_secs(3)),
            None,
            "the oldest made room"
        );
        assert!(kept.take("c", t0 + Duration::from_secs(3)).is_some());
    }
}
