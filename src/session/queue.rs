//! A bounded queue between the network task and a consumer, with an overflow policy and counters.
//!
//! The network task pushes (awaiting space under `Block`); consumers pop from any thread, blocking
//! with a timeout, or await readiness from async code.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// What to do when a queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Wait for the consumer: the network task stops reading, which pushes back on the broker.
    Block,
    /// Drop the oldest queued item to make room (counted).
    DropOldest,
    /// Drop the arriving item (counted).
    DropNewest,
}

impl Overflow {
    /// The policy's name as the Python API spells it.
    pub fn name(self) -> &'static str {
        match self {
            Overflow::Block => "block",
            Overflow::DropOldest => "drop_oldest",
            Overflow::DropNewest => "drop_newest",
        }
    }

    pub fn parse(name: &str) -> Option<Overflow> {
        match name {
            "block" => Some(Overflow::Block),
            "drop_oldest" => Some(Overflow::DropOldest),
            "drop_newest" => Some(Overflow::DropNewest),
            _ => None,
        }
    }
}

/// Counters a consumer can read at any time.
#[derive(Debug, Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub delivered: AtomicU64,
    pub dropped: AtomicU64,
    pub malformed: AtomicU64,
}

#[derive(Debug)]
struct Inner<T> {
    items: VecDeque<T>,
    closed: bool,
}

/// What `offer` did with an item.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer<T> {
    Queued,
    /// Dropped under a drop policy (the arriving item, or the oldest to make room), counted.
    Dropped,
    /// A `Block` queue is full: the item is handed back, to be offered again when `space` wakes.
    Full(T),
    Closed,
}

/// The result of waiting for an item.
#[derive(Debug, PartialEq, Eq)]
pub enum Pop<T> {
    Item(T),
    Timeout,
    Closed,
}

/// A file descriptor that becomes readable when an armed queue gets an item (or ends): an event
/// loop in another runtime (Python's asyncio) waits on it without any thread of ours entering that
/// runtime. Armed once per wait, so a busy stream costs one write per chunk, not per message.
#[cfg(unix)]
#[derive(Debug)]
pub struct Doorbell {
    armed: std::sync::atomic::AtomicBool,
    ringer: std::os::unix::net::UnixStream,
    listener: std::os::unix::net::UnixStream,
}

#[cfg(unix)]
impl Doorbell {
    pub(crate) fn new() -> std::io::Result<Doorbell> {
        let (ringer, listener) = std::os::unix::net::UnixStream::pair()?;
        ringer.set_nonblocking(true)?;
        listener.set_nonblocking(true)?;
        Ok(Doorbell {
            armed: std::sync::atomic::AtomicBool::new(false),
            ringer,
            listener,
        })
    }

    /// The descriptor to watch for readability.
    pub fn fd(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(&self.listener)
    }

    fn ring(&self) {
        if self.armed.swap(false, Ordering::AcqRel) {
            // A full socket buffer already means "readable": nothing is lost by WouldBlock.
            let _ = std::io::Write::write(&mut &self.ringer, &[1]);
        }
    }

    /// Rings whether armed or not (for a list that rings when it turns non-empty).
    pub(crate) fn ring_now(&self) {
        let _ = std::io::Write::write(&mut &self.ringer, &[1]);
    }

    /// Empties the descriptor after a wake-up.
    pub fn clear(&self) {
        let mut sink = [0u8; 256];
        while matches!(std::io::Read::read(&mut &self.listener, &mut sink), Ok(n) if n > 0) {}
    }
}

#[derive(Debug)]
pub struct Queue<T> {
    inner: Mutex<Inner<T>>,
    readable: Condvar,
    async_readable: Notify,
    #[cfg(unix)]
    doorbell: std::sync::OnceLock<std::io::Result<Doorbell>>,
    space: Notify,
    capacity: usize,
    overflow: Overflow,
    pub counters: Counters,
}

impl<T> Queue<T> {
    pub fn new(capacity: usize, overflow: Overflow) -> Self {
        Queue {
            inner: Mutex::new(Inner {
                items: VecDeque::with_capacity(capacity.min(4096)),
                closed: false,
            }),
            readable: Condvar::new(),
            async_readable: Notify::new(),
            #[cfg(unix)]
            doorbell: std::sync::OnceLock::new(),
            space: Notify::new(),
            capacity: capacity.max(1),
            overflow,
            counters: Counters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // A panic while holding this lock cannot leave the deque inconsistent; keep going.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn overflow(&self) -> Overflow {
        self.overflow
    }
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    fn wake_consumers(&self) {
        self.readable.notify_all();
        self.async_readable.notify_waiters();
        self.async_readable.notify_one();
        #[cfg(unix)]
        if let Some(Ok(bell)) = self.doorbell.get() {
            bell.ring();
        }
    }

    /// The queue's doorbell, made on first use.
    #[cfg(unix)]
    pub fn doorbell(&self) -> Result<&Doorbell, String> {
        self.doorbell
            .get_or_init(Doorbell::new)
            .as_ref()
            .map_err(|e| format!("could not make the subscription's wake-up socket: {e}"))
    }

    /// Arms the doorbell for one ring; true when there is no need to wait (items are queued, or
    /// the queue ended), in which case it stays unarmed.
    #[cfg(unix)]
    pub fn arm(&self) -> Result<bool, String> {
        let bell = self.doorbell()?;
        bell.armed.store(true, Ordering::SeqCst);
        let inner = self.lock();
        if !inner.items.is_empty() || inner.closed {
            bell.armed.store(false, Ordering::SeqCst);
            return Ok(true);
        }
        Ok(false)
    }

    /// Adds an item under the queue's overflow policy; under `Block` it waits for room.
    /// Returns false when the item was not queued (dropped, or the queue is closed).
    pub async fn push(&self, item: T) -> bool {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let mut item = Some(item);
        loop {
            let waiter = self.space.notified();
            {
                let mut inner = self.lock();
                if inner.closed {
                    return false;
                }
                if inner.items.len() < self.capacity {
                    inner.items.extend(item.take());
                    drop(inner);
                    self.wake_consumers();
                    return true;
                }
                match self.overflow {
                    Overflow::DropNewest => {
                        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                    Overflow::DropOldest => {
                        inner.items.pop_front();
                        inner.items.extend(item.take());
                        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                        drop(inner);
                        self.wake_consumers();
                        return true;
                    }
                    Overflow::Block => {}
                }
            }
            waiter.await;
        }
    }

    /// Adds an item without waiting, under the queue's overflow policy.
    pub fn offer(&self, item: T) -> Offer<T> {
        let mut inner = self.lock();
        if inner.closed {
            return Offer::Closed;
        }
        if inner.items.len() < self.capacity {
            inner.items.push_back(item);
            drop(inner);
            self.counters.received.fetch_add(1, Ordering::Relaxed);
            self.wake_consumers();
            return Offer::Queued;
        }
        match self.overflow {
            Overflow::Block => Offer::Full(item),
            Overflow::DropNewest => {
                drop(inner);
                self.counters.received.fetch_add(1, Ordering::Relaxed);
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                Offer::Dropped
            }
            Overflow::DropOldest => {
                inner.items.pop_front();
                inner.items.push_back(item);
                drop(inner);
                self.counters.received.fetch_add(1, Ordering::Relaxed);
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                self.wake_consumers();
                Offer::Dropped
            }
        }
    }

    /// Waits until the queue has room (or is closed).
    pub async fn space(&self) {
        loop {
            let waiter = self.space.notified();
            {
                let inner = self.lock();
                if inner.closed || inner.items.len() < self.capacity {
                    return;
                }
            }
            waiter.await;
        }
    }

    /// Adds an item now, beyond the capacity if need be, counted as received: for messages whose
    /// flow the broker bounds (unacknowledged QoS 1/2 under `Block`).
    pub fn push_unbounded(&self, item: T) {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        self.push_control(item);
    }

    /// Adds an item now, beyond the capacity if need be: for rare control items (errors, the end).
    pub fn push_control(&self, item: T) {
        let mut inner = self.lock();
        if !inner.closed {
            inner.items.push_back(item);
        }
        drop(inner);
        self.wake_consumers();
    }

    fn took(&self, count: usize) {
        if count > 0 {
            self.counters
                .delivered
                .fetch_add(count as u64, Ordering::Relaxed);
            self.space.notify_waiters();
            self.space.notify_one();
        }
    }

    /// Adds an item now without waiting, dropping the oldest when full (for logs and events).
    pub fn push_control_bounded(&self, item: T) {
        let mut inner = self.lock();
        if inner.closed {
            return;
        }
        if inner.items.len() >= self.capacity {
            inner.items.pop_front();
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
        inner.items.push_back(item);
        drop(inner);
        self.wake_consumers();
    }

    /// Puts an item back at the front (a consumer took more than it could use).
    pub fn push_front(&self, item: T) {
        let mut inner = self.lock();
        inner.items.push_front(item);
        drop(inner);
        self.counters.delivered.fetch_sub(1, Ordering::Relaxed);
        self.wake_consumers();
    }

    /// Takes the next item without waiting.
    pub fn try_pop(&self) -> Pop<T> {
        let mut inner = self.lock();
        if let Some(item) = inner.items.pop_front() {
            drop(inner);
            self.took(1);
            return Pop::Item(item);
        }
        if inner.closed {
            Pop::Closed
        } else {
            Pop::Timeout
        }
    }

    /// Waits up to `timeout` (forever with `None`) for the next item. Items queued before `close`
    /// are still delivered; `Closed` comes after them.
    pub fn pop_wait(&self, timeout: Option<Duration>) -> Pop<T> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut inner = self.lock();
        loop {
            if let Some(item) = inner.items.pop_front() {
                drop(inner);
                self.took(1);
                return Pop::Item(item);
            }
            if inner.closed {
                return Pop::Closed;
            }
            match deadline {
                None => {
                    inner = self
                        .readable
                        .wait(inner)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Pop::Timeout;
                    }
                    inner = self
                        .readable
                        .wait_timeout(inner, deadline - now)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
            }
        }
    }

    /// Waits until `min_items` are queued, or `linger` has passed since the first one arrived, or
    /// `timeout` has passed, or the queue is closed. Batch consumers use it to take whole chunks
    /// instead of waking for every message. True when there is something to take.
    pub fn wait_for(&self, min_items: usize, linger: Duration, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut first_seen: Option<Instant> = None;
        let mut inner = self.lock();
        loop {
            let now = Instant::now();
            if !inner.items.is_empty() {
                let since = *first_seen.get_or_insert(now);
                if inner.items.len() >= min_items || now >= since + linger || now >= deadline {
                    return true;
                }
            }
            if inner.closed {
                return !inner.items.is_empty();
            }
            if now >= deadline {
                return false;
            }
            let until = first_seen.map_or(deadline, |since| (since + linger).min(deadline));
            inner = self
                .readable
                .wait_timeout(inner, until.saturating_duration_since(now))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// `wait_for` for async consumers: waits until `min_items` are queued, or `linger` has passed
    /// since the first one arrived, or `deadline` has passed, or the queue is closed. True when
    /// there is something to take.
    pub async fn chunk(
        &self,
        min_items: usize,
        linger: Duration,
        deadline: Option<tokio::time::Instant>,
    ) -> bool {
        let mut first_seen: Option<tokio::time::Instant> = None;
        loop {
            let waiter = self.async_readable.notified();
            let now = tokio::time::Instant::now();
            {
                let inner = self.lock();
                if !inner.items.is_empty() {
                    let since = *first_seen.get_or_insert(now);
                    if inner.items.len() >= min_items
                        || now >= since + linger
                        || deadline.is_some_and(|d| now >= d)
                    {
                        return true;
                    }
                }
                if inner.closed {
                    return !inner.items.is_empty();
                }
            }
            if deadline.is_some_and(|d| now >= d) {
                return false;
            }
            let until = match (first_seen.map(|since| since + linger), deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match until {
                Some(until) => {
                    let _ = tokio::time::timeout_at(until, waiter).await;
                }
                None => waiter.await,
            }
        }
    }

    /// Takes up to `max` items that are queued now, without waiting.
    pub fn drain(&self, max: usize) -> Vec<T> {
        let mut inner = self.lock();
        let count = max.min(inner.items.len());
        let items: Vec<T> = inner.items.drain(..count).collect();
        drop(inner);
        self.took(items.len());
        items
    }

    /// Waits until an item is queued or the queue is closed (for async consumers).
    pub async fn readable(&self) {
        loop {
            let waiter = self.async_readable.notified();
            {
                let inner = self.lock();
                if !inner.items.is_empty() || inner.closed {
                    return;
                }
            }
            waiter.await;
        }
    }

    /// Ends the queue: producers stop, consumers get what is left and then `Closed`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake_consumers();
        self.space.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[cfg(unix)]
    #[test]
    fn the_doorbell_rings_once_per_arming() {
        use std::io::Read;
        let queue: Queue<u32> = Queue::new(8, Overflow::Block);
        let bell = queue.doorbell().unwrap();
        let mut byte = [0u8; 8];
        let mut listener = &bell.listener;
        assert!(!queue.arm().unwrap(), "empty: wait");
        queue.push_unbounded(1);
        queue.push_unbounded(2);
        assert_eq!(
            listener.read(&mut byte).unwrap(),
            1,
            "one ring for two items"
        );
        assert!(listener.read(&mut byte).is_err(), "nothing more to read");
        assert!(queue.arm().unwrap(), "items queued: no need to wait");
        bell.clear();
        let _ = queue.try_pop();
        let _ = queue.try_pop();
        assert!(!queue.arm().unwrap());
        queue.close();
        assert_eq!(listener.read(&mut byte).unwrap(), 1, "the end rings too");
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn drop_policies_count_exactly() {
        rt().block_on(async {
            let newest = Queue::new(3, Overflow::DropNewest);
            let oldest = Queue::new(3, Overflow::DropOldest);
            for i in 0..10 {
                newest.push(i).await;
                oldest.push(i).await;
            }
            assert_eq!(newest.drain(10), vec![0, 1, 2]);
            assert_eq!(oldest.drain(10), vec![7, 8, 9]);
            assert_eq!(newest.counters.dropped.load(Ordering::Relaxed), 7);
            assert_eq!(oldest.counters.dropped.load(Ordering::Relaxed), 7);
            assert_eq!(oldest.counters.received.load(Ordering::Relaxed), 10);
            assert_eq!(oldest.counters.delivered.load(Ordering::Relaxed), 3);
        });
    }

    #[test]
    fn block_waits_for_the_consumer_and_loses_nothing() {
        let queue = Arc::new(Queue::new(2, Overflow::Block));
        let consumer = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                let mut got = Vec::new();
                loop {
                    match queue.pop_wait(Some(Duration::from_secs(5))) {
                        Pop::Item(i) => got.push(i),
                        Pop::Closed => return got,
                        Pop::Timeout => panic!("timed out"),
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        rt().block_on(async {
            for i in 0..200 {
                assert!(queue.push(i).await);
                assert!(queue.len() <= 2);
            }
        });
        queue.close();
        assert_eq!(consumer.join().unwrap(), (0..200).collect::<Vec<_>>());
        assert_eq!(queue.counters.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn offer_hands_back_what_a_full_block_queue_cannot_take() {
        let queue = Queue::new(2, Overflow::Block);
        assert_eq!(queue.offer(1), Offer::Queued);
        assert_eq!(queue.offer(2), Offer::Queued);
        assert_eq!(queue.offer(3), Offer::Full(3));
        assert_eq!(queue.counters.received.load(Ordering::Relaxed), 2);
        let oldest = Queue::new(1, Overflow::DropOldest);
        assert_eq!(oldest.offer(1), Offer::Queued);
        assert_eq!(oldest.offer(2), Offer::Dropped);
        assert_eq!(oldest.drain(5), vec![2]);
        rt().block_on(async {
            let _ = queue.try_pop();
            tokio::time::timeout(Duration::from_secs(1), queue.space())
                .await
                .expect("room after a pop");
        });
        queue.close();
        assert_eq!(queue.offer(4), Offer::Closed);
    }

    #[test]
    fn close_delivers_what_is_left_then_closed() {
        let queue = Queue::new(4, Overflow::Block);
        rt().block_on(async {
            queue.push(1).await;
        });
        queue.close();
        assert_eq!(queue.pop_wait(None), Pop::Item(1));
        assert_eq!(queue.pop_wait(None), Pop::Closed);
        assert_eq!(queue.try_pop(), Pop::Closed);
        assert_eq!(
            Queue::<u8>::new(1, Overflow::Block).pop_wait(Some(Duration::from_millis(10))),
            Pop::Timeout
        );
    }
}
