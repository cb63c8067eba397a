//! Backpressure from the sockets to the change stream, and events encoded once.
//!
//! The change stream holds every event durably, so the bridge reads it no faster than its
//! subscribers drain: at most [`DeliveryWindow::size`] events are in flight (read from the
//! stream but not yet written by every socket of their room), and the feed waits for a
//! slot before it reads on. Each event is serialised once; every socket's buffer holds a
//! reference to the same bytes, and the event's slot is given back when the last socket
//! has taken it from its buffer.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use socketioxide_core::Str;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::mapping::BridgeEvent;
use crate::telemetry::metric;

/// Events allowed in flight at once.
#[derive(Clone)]
pub struct DeliveryWindow {
    slots: Arc<Semaphore>,
    size: usize,
}

/// One event's place in the window, held until every socket has taken the event.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl DeliveryWindow {
    pub fn new(size: usize) -> DeliveryWindow {
        DeliveryWindow {
            slots: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Events in flight now.
    pub fn in_flight(&self) -> usize {
        self.size - self.slots.available_permits()
    }

    /// A slot for the next event, waiting while the window is full.
    pub async fn admit(&self) -> Slot {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Slot { _permit: permit };
        }
        let waited = Instant::now();
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the window's semaphore is never closed");
        metrics::histogram!(metric::DELIVERY_WAIT).record(waited.elapsed().as_secs_f64());
        Slot { _permit: permit }
    }
}

/// An event in its wire form, as every socket of its room is sent it: the Socket.IO
/// packet `2<namespace>,["<event>",<payload>]`. Engine.IO 3 and 4 clients get the same
/// packet; each transport adds its own framing when it writes.
pub fn encode(namespace: &str, event: &BridgeEvent, slot: Slot, received: Instant) -> Str {
    let mut text = Vec::with_capacity(256);
    text.push(b'2');
    if namespace != "/" {
        text.extend_from_slice(namespace.as_bytes());
        text.push(b',');
    }
    text.extend_from_slice(b"[\"");
    text.extend_from_slice(event.kind.name().as_bytes());
    text.extend_from_slice(b"\",");
    serde_json::to_writer(&mut text, &event.payload()).expect("JSON form of BSON always serialises");
    text.push(b']');
    let bytes = Bytes::from_owner(Encoded {
        text,
        _slot: slot,
        received,
    });
    // SAFETY: the bytes are ASCII around serde_json's output, which is UTF-8.
    unsafe { Str::from_bytes_unchecked(bytes) }
}

/// The owner of an encoded event's bytes: dropped when the last socket has taken it.
struct Encoded {
    text: Vec<u8>,
    _slot: Slot,
    received: Instant,
}

impl AsRef<[u8]> for Encoded {
    fn as_ref(&self) -> &[u8] {
        &self.text
    }
}

impl Drop for Encoded {
    fn drop(&mut self) {
        metrics::histogram!(metric::DELIVERY_DURATION).record(self.received.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collections::Collection;
    use crate::mapping::{EventBody, EventKind};
    use bson::doc;
    use std::time::Duration;

    fn event() -> BridgeEvent {
        BridgeEvent {
            kind: EventKind::Create,
            collection: Collection::Entries,
            body: EventBody::Doc(doc! { "_id": 1, "identifier": "e1", "sgv": 120 }),
            wall_time_ms: None,
        }
    }

    #[tokio::test]
    async fn an_event_is_encoded_once_as_the_socket_io_packet() {
        let window = DeliveryWindow::new(2);
        let encoded = encode("/storage", &event(), window.admit().await, Instant::now());
        assert_eq!(
            encoded.as_str(),
            r#"2/storage,["create",{"colName":"entries","doc":{"identifier":"e1","sgv":120}}]"#
        );
        let root = encode("/", &event(), window.admit().await, Instant::now());
        assert!(root.as_str().starts_with(r#"2["create","#), "{root}");
    }

    #[tokio::test]
    async fn the_slot_is_held_until_the_last_reference_goes() {
        let window = DeliveryWindow::new(1);
        let encoded = encode("/storage", &event(), window.admit().await, Instant::now());
        let socket_a = encoded.clone();
        let socket_b = encoded.clone();
        drop(encoded);
        assert_eq!(window.in_flight(), 1);
        // A full window makes the next event wait.
        let next = tokio::time::timeout(Duration::from_millis(50), window.admit()).await;
        assert!(next.is_err(), "admitted into a full window");
        drop(socket_a);
        assert_eq!(window.in_flight(), 1);
        drop(socket_b);
        assert_eq!(window.in_flight(), 0);
        let next = tokio::time::timeout(Duration::from_secs(1), window.admit()).await;
        assert!(next.is_ok());
    }
}
