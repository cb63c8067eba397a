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
/// packet; each transport adds its own framing when it writes. The text is shared by the
/// history and by every live packet made of it.
pub struct Encoded {
    text: Bytes,
    delivery: Arc<Delivery>,
}

/// One event's delivery: its slot in the window, given back (and the time it took
/// recorded) when the last live packet of it has been taken by its socket's transport.
struct Delivery {
    _slot: Slot,
    received: Instant,
}

impl Drop for Delivery {
    fn drop(&mut self) {
        metrics::histogram!(metric::DELIVERY_DURATION).record(self.received.elapsed().as_secs_f64());
    }
}

/// A live packet's bytes: the shared text, and the delivery it belongs to.
struct LiveBytes {
    text: Bytes,
    _delivery: Arc<Delivery>,
}

impl AsRef<[u8]> for LiveBytes {
    fn as_ref(&self) -> &[u8] {
        &self.text
    }
}

pub fn encode(namespace: &str, event: &BridgeEvent, slot: Slot, received: Instant) -> Encoded {
    Encoded {
        text: Bytes::from(packet_text(namespace, event)),
        delivery: Arc::new(Delivery {
            _slot: slot,
            received,
        }),
    }
}

/// The packet's text, for the history and replays: it holds no slot.
pub fn packet_text(namespace: &str, event: &BridgeEvent) -> Vec<u8> {
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
    // Held for as long as the history keeps the event: without its growth's spare room.
    text.shrink_to_fit();
    text
}

/// `text` (an event packet, `...]`) with `offset` appended as its last argument, as
/// socket.io 4.6+ sends events to clients with connection state recovery.
pub fn with_offset(text: &[u8], offset: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 24);
    out.extend_from_slice(&text[..text.len() - 1]);
    out.extend_from_slice(format!(",\"{offset}\"]").as_bytes());
    out
}

impl Encoded {
    /// The text, holding no slot (for the history).
    pub fn text(&self) -> Str {
        str_of(self.text.clone())
    }

    /// The packet for live sockets: the shared text, holding the event's slot.
    pub fn live(&self) -> Str {
        str_of(Bytes::from_owner(LiveBytes {
            text: self.text.clone(),
            _delivery: self.delivery.clone(),
        }))
    }

    /// The live packet with `offset` appended (connection state recovery).
    pub fn live_with_offset(&self, offset: u64) -> Str {
        str_of(Bytes::from_owner(LiveBytes {
            text: Bytes::from(with_offset(&self.text, offset)),
            _delivery: self.delivery.clone(),
        }))
    }
}

/// A `Str` of bytes known to be UTF-8 (ASCII around serde_json's output).
fn str_of(bytes: Bytes) -> Str {
    debug_assert!(std::str::from_utf8(&bytes).is_ok());
    // SAFETY: every packet is built from ASCII and serde_json's output, which is UTF-8.
    unsafe { Str::from_bytes_unchecked(bytes) }
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
            modified_ms: None,
        }
    }

    #[tokio::test]
    async fn an_event_is_encoded_once_as_the_socket_io_packet() {
        let window = DeliveryWindow::new(2);
        let encoded = encode("/storage", &event(), window.admit().await, Instant::now());
        let text = r#"2/storage,["create",{"colName":"entries","doc":{"identifier":"e1","sgv":120}}]"#;
        assert_eq!(encoded.text().as_str(), text);
        assert_eq!(encoded.live().as_str(), text);
        assert_eq!(
            encoded.live_with_offset(42).as_str(),
            r#"2/storage,["create",{"colName":"entries","doc":{"identifier":"e1","sgv":120}},"42"]"#
        );
        let root = encode("/", &event(), window.admit().await, Instant::now());
        assert!(root.text().as_str().starts_with(r#"2["create","#));
    }

    #[tokio::test]
    async fn the_slot_is_held_until_the_last_reference_goes() {
        let window = DeliveryWindow::new(1);
        let encoded = encode("/storage", &event(), window.admit().await, Instant::now());
        let history = encoded.text();
        let live = encoded.live();
        let socket_a = live.clone();
        let socket_b = encoded.live_with_offset(1);
        drop((encoded, live));
        assert_eq!(window.in_flight(), 1);
        // A full window makes the next event wait.
        let next = tokio::time::timeout(Duration::from_millis(50), window.admit()).await;
        assert!(next.is_err(), "admitted into a full window");
        drop(socket_a);
        assert_eq!(window.in_flight(), 1);
        drop(socket_b);
        assert_eq!(window.in_flight(), 0, "the history's copy holds no slot");
        assert_eq!(
            history.as_str(),
            r#"2/storage,["create",{"colName":"entries","doc":{"identifier":"e1","sgv":120}}]"#
        );
        let next = tokio::time::timeout(Duration::from_secs(1), window.admit()).await;
        assert!(next.is_ok());
    }
}
