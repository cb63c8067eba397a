//! The buffer of packets waiting to be sent to a session's client.
//!
//! A bounded queue with one receiver (the transport that writes to the client), in
//! the shape of [`tokio::sync::mpsc`]'s bounded channel, with two differences that matter
//! when a server holds many mostly idle sessions:
//!
//! * it allocates nothing until its first packet, and gives its memory back once drained
//!   (tokio's channel allocates a block of 32 slots at creation, about 5 KiB for a
//!   `PacketBuf`, and keeps it for the session's life);
//! * it tells how many packets are waiting ([`Sender::len`]), so that a server can see
//!   which clients fall behind.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;
pub use tokio::sync::mpsc::error::{SendError, TryRecvError, TrySendError};

/// A drained buffer keeps up to this many slots of capacity; a larger one is freed. An
/// idle session is the common case: it keeps none.
const KEPT_CAPACITY: usize = 0;

/// A queue of at most `capacity` items.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    assert!(capacity > 0, "queue capacity must be at least 1");
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            buf: VecDeque::new(),
            reserved: 0,
            closed: false,
            sender_dropped: false,
            rx_waker: None,
        }),
        capacity,
        room: Notify::new(),
        closed: Notify::new(),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

struct Shared<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    /// Signalled when a slot frees up in a full queue, and on close.
    room: Notify,
    /// Signalled on close.
    closed: Notify,
}

struct State<T> {
    buf: VecDeque<T>,
    /// Slots promised to permits that have not sent yet.
    reserved: usize,
    /// The receiver closed or went away: nothing more is accepted.
    closed: bool,
    sender_dropped: bool,
    rx_waker: Option<Waker>,
}

impl<T> State<T> {
    fn is_full(&self, capacity: usize) -> bool {
        self.buf.len() + self.reserved >= capacity
    }
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // The state stays consistent whatever panicked while it was held.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pushes into a slot already accounted for, and wakes the receiver.
    fn push(&self, mut state: MutexGuard<'_, State<T>>, value: T) {
        state.buf.push_back(value);
        let waker = state.rx_waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn close(&self) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        state.closed = true;
        drop(state);
        self.room.notify_waiters();
        self.closed.notify_waiters();
    }
}

enum Intent {
    Read,
    Write,
}

/// Hints the CPU to fetch the cache line of `value`; nothing on other architectures.
#[inline]
fn prefetch<V>(value: &V, intent: Intent) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it reads nothing and cannot fault, whatever the address.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_ET0, _MM_HINT_T0, _mm_prefetch};
        let line = (value as *const V).cast();
        match intent {
            Intent::Read => _mm_prefetch::<_MM_HINT_T0>(line),
            Intent::Write => _mm_prefetch::<_MM_HINT_ET0>(line),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (value, intent);
}

/// The sending half.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Queues `value` if there is room.
    pub fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        let state = self.shared.lock();
        if state.closed {
            return Err(TrySendError::Closed(value));
        }
        if state.is_full(self.shared.capacity) {
            return Err(TrySendError::Full(value));
        }
        self.shared.push(state, value);
        Ok(())
    }

    /// Queues `value` if there is room, like [`Sender::try_send`], but leaves waking the
    /// receiver to the caller: its waker, if it waits, is added to `wakers`.
    ///
    /// For a caller that sends to many queues in a row: woken at once, their receivers
    /// would start running (and take the CPU, and wake their own peers) while it is
    /// still sending to the others.
    pub fn try_send_waking_later(&self, value: T, wakers: &mut Vec<Waker>) -> Result<(), TrySendError<T>> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(TrySendError::Closed(value));
        }
        if state.is_full(self.shared.capacity) {
            return Err(TrySendError::Full(value));
        }
        state.buf.push_back(value);
        wakers.extend(state.rx_waker.take());
        Ok(())
    }

    /// Asks the CPU to bring this sender (a pointer to the queue) into its cache.
    ///
    /// Sending to many queues in a row waits on memory once per queue, for each pointer
    /// followed; these hints, given a few queues ahead, let the loads overlap: first
    /// [`Sender::prefetch_sender`], then (once it has arrived) [`Sender::prefetch_queue`].
    #[inline]
    pub fn prefetch_sender(&self) {
        prefetch(self, Intent::Read);
    }

    /// Asks the CPU to bring the queue's state into its cache, for writing (see
    /// [`Sender::prefetch_sender`]).
    #[inline]
    pub fn prefetch_queue(&self) {
        prefetch(&self.shared.state, Intent::Write);
    }

    /// Queues `value`, waiting for room.
    pub async fn send(&self, mut value: T) -> Result<(), SendError<T>> {
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_send(value) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(v)) => return Err(SendError(v)),
                Err(TrySendError::Full(v)) => value = v,
            }
            room.await;
        }
    }

    /// Holds a slot for one item, if there is room.
    pub fn try_reserve(&self) -> Result<Permit<'_, T>, TrySendError<()>> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(TrySendError::Closed(()));
        }
        if state.is_full(self.shared.capacity) {
            return Err(TrySendError::Full(()));
        }
        state.reserved += 1;
        Ok(Permit { shared: &self.shared })
    }

    /// Items waiting to be received.
    pub fn len(&self) -> usize {
        self.shared.lock().buf.len()
    }

    /// Whether the receiver is closed or gone.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// Resolves once the receiver is closed or gone.
    pub async fn closed(&self) {
        loop {
            let closed = self.shared.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.is_closed() {
                return;
            }
            closed.await;
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.sender_dropped = true;
        let waker = state.rx_waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("Sender")
            .field("len", &state.buf.len())
            .field("capacity", &self.shared.capacity)
            .field("closed", &state.closed)
            .finish()
    }
}

/// A slot held for one item: [`Permit::send`] fills it, dropping the permit frees it.
pub struct Permit<'a, T> {
    shared: &'a Shared<T>,
}

impl<T> Permit<'_, T> {
    /// Queues `value` in the held slot.
    pub fn send(self, value: T) {
        let shared = self.shared;
        std::mem::forget(self);
        let mut state = shared.lock();
        state.reserved -= 1;
        if state.closed {
            // As tokio's permit: a value sent after the close is dropped.
            return;
        }
        shared.push(state, value);
    }
}

impl<T> Drop for Permit<'_, T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        let was_full = state.is_full(self.shared.capacity);
        state.reserved -= 1;
        drop(state);
        if was_full {
            self.shared.room.notify_waiters();
        }
    }
}

/// The receiving half.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// Takes the next item, waiting for one; `None` once closed (or the sender gone) and
    /// drained.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Takes the next item, waking `cx` when one arrives.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.shared.lock();
        if let Some(value) = self.pop(&mut state) {
            return Poll::Ready(Some(value));
        }
        if state.closed || state.sender_dropped {
            return Poll::Ready(None);
        }
        match &mut state.rx_waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Takes the next item if there is one.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut state = self.shared.lock();
        match self.pop(&mut state) {
            Some(value) => Ok(value),
            None if state.closed || state.sender_dropped => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// Refuses further items; those already queued can still be received.
    pub fn close(&mut self) {
        self.shared.close();
    }

    fn pop(&self, state: &mut MutexGuard<'_, State<T>>) -> Option<T> {
        let was_full = state.is_full(self.shared.capacity);
        let value = state.buf.pop_front()?;
        if state.buf.is_empty() && state.buf.capacity() > KEPT_CAPACITY {
            state.buf = VecDeque::new();
        }
        if was_full {
            self.shared.room.notify_waiters();
        }
        Some(value)
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.shared.close();
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("Receiver")
            .field("len", &state.buf.len())
            .field("capacity", &self.shared.capacity)
            .field("closed", &state.closed)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn items_arrive_in_order_up_to_the_capacity() {
        let (tx, mut rx) = channel(3);
        for i in 0..3 {
            tx.try_send(i).unwrap();
        }
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        assert!(matches!(tx.try_reserve(), Err(TrySendError::Full(()))));
        assert_eq!(tx.len(), 3);
        assert_eq!(rx.recv().await, Some(0));
        tx.try_send(3).unwrap();
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        assert_eq!(tx.len(), 0);
    }

    #[test]
    fn nothing_is_allocated_until_the_first_item_and_a_drained_buffer_is_freed() {
        let (tx, mut rx) = channel::<u64>(1024);
        assert_eq!(tx.shared.lock().buf.capacity(), 0);
        for i in 0..1000 {
            tx.try_send(i).unwrap();
        }
        assert!(tx.shared.lock().buf.capacity() >= 1000);
        while rx.try_recv().is_ok() {}
        assert_eq!(tx.shared.lock().buf.capacity(), 0);
        tx.try_send(1).unwrap();
        assert_eq!(rx.try_recv(), Ok(1));
        assert_eq!(tx.shared.lock().buf.capacity(), 0);
    }

    #[tokio::test]
    async fn permits_hold_slots() {
        let (tx, mut rx) = channel(2);
        let a = tx.try_reserve().unwrap();
        let b = tx.try_reserve().unwrap();
        assert!(matches!(tx.try_send(0), Err(TrySendError::Full(0))));
        b.send(2);
        drop(a);
        tx.try_send(3).unwrap();
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
    }

    #[tokio::test]
    async fn a_sender_waits_for_room() {
        let (tx, mut rx) = channel(1);
        tx.try_send(1).unwrap();
        let waiting = tokio::spawn(async move {
            tx.send(2).await.unwrap();
            tx
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        assert_eq!(rx.recv().await, Some(1));
        let tx = waiting.await.unwrap();
        assert_eq!(rx.recv().await, Some(2));
        drop(tx);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn closing_refuses_new_items_keeps_queued_ones_and_wakes_waiters() {
        let (tx, mut rx) = channel(1);
        tx.try_send(1).unwrap();
        let tx = Arc::new(tx);
        let sender = tx.clone();
        let blocked = tokio::spawn(async move { sender.send(2).await });
        let watcher = tx.clone();
        let closed = tokio::spawn(async move { watcher.closed().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        rx.close();
        assert!(matches!(blocked.await.unwrap(), Err(SendError(2))));
        closed.await.unwrap();
        assert!(tx.is_closed());
        assert!(matches!(tx.try_send(3), Err(TrySendError::Closed(3))));
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, None);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[tokio::test]
    async fn the_receiver_is_woken_by_a_send_and_by_the_sender_going_away() {
        let (tx, mut rx) = channel(4);
        let reader = tokio::spawn(async move {
            let first = rx.recv().await;
            let second = rx.recv().await;
            (first, second)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.try_reserve().unwrap().send(7);
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(tx);
        assert_eq!(reader.await.unwrap(), (Some(7), None));
    }

    /// Counts its wakes.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_send_waking_later_hands_the_receivers_waker_to_the_caller() {
        let (tx, mut rx) = channel(2);
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        assert_eq!(rx.poll_recv(&mut cx), Poll::Pending);

        // Hints only: they change nothing.
        tx.prefetch_sender();
        tx.prefetch_queue();
        let mut wakers = Vec::new();
        tx.try_send_waking_later(1, &mut wakers).unwrap();
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(wakers.len(), 1);
        // The receiver has not run again: there is no one else to wake.
        tx.try_send_waking_later(2, &mut wakers).unwrap();
        assert_eq!(wakers.len(), 1);
        assert!(matches!(
            tx.try_send_waking_later(3, &mut wakers),
            Err(TrySendError::Full(3))
        ));
        assert_eq!(tx.len(), 2);

        wakers.drain(..).for_each(Waker::wake);
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(1)));
        assert_eq!(rx.try_recv(), Ok(2));
        rx.close();
        assert!(matches!(
            tx.try_send_waking_later(4, &mut wakers),
            Err(TrySendError::Closed(4))
        ));
        assert!(wakers.is_empty());
    }

    #[tokio::test]
    async fn dropping_the_receiver_closes() {
        let (tx, rx) = channel::<u8>(1);
        drop(rx);
        assert!(tx.is_closed());
        tx.closed().await;
        assert!(matches!(tx.try_send(1), Err(TrySendError::Closed(1))));
    }
}
