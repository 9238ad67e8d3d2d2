//! The MQTT session: a tokio task that owns rumqttc's event loop, connects (TCP, TLS, WebSocket),
//! reconnects with backoff, re-subscribes, routes incoming messages to bounded subscription queues,
//! tracks publish acknowledgements, and reports what happens as events. No Python here.
//!
//! Requests reach rumqttc through its channel; every request we send is recorded in `Book::fifo`, and
//! the `Outgoing` events rumqttc emits (in request order) are matched against that record to learn
//! which packet id carries which subscribe or publish. Before each reconnect the task takes rumqttc's
//! `pending` requests itself, so that nothing is silently dropped when the broker has no session.

pub mod codec;
pub mod config;
mod driver;
pub mod error;
pub mod jwt;
mod link;
pub mod proto;
pub mod queue;
pub mod tls;

#[cfg(test)]
mod tests;

pub use config::{
    AccountKind, Credentials, CredentialsFuture, CredentialsProvider, OfflinePolicy, Protocol,
    Reconnect, Secret, SessionConfig, StaticCredentials, TlsOptions, Transport,
};
pub use error::{Action, SessionError};
pub use queue::{Overflow, Pop, Queue};

use crate::payload::{Command, RawPoint};
use bytes::Bytes;
use link::{Link, LinkClient};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

/// The one tokio runtime every session runs on (two network threads).
///
/// # Panics
/// When the operating system refuses to start its threads.
pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("capture-mqtt-net")
            .enable_all()
            .build()
            .expect("the tokio runtime could not start")
    })
}

/// Something that happened to the connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Connected { session_present: bool },
    Disconnected { reason: String },
    Reconnecting { attempt: u32, delay: Duration },
    Closed,
}

/// How a subscription turns messages into items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decode {
    /// Capture raw-tree points (`DataPoint`).
    Raw,
    /// Commands to a source (`Command`).
    Command,
    /// Plain MQTT messages, payload untouched.
    Bytes,
}

/// The acknowledgement of an incoming QoS 1/2 message, sent when the last holder lets go of it: at
/// once for messages nobody waits for, when the consumer takes it for `overflow = block` (so that
/// the broker, not this process, holds what the consumer has not taken yet).
#[derive(Debug)]
pub struct Ack {
    client: LinkClient,
    pkid: u16,
    qos: u8,
    /// The connection it came on; an acknowledgement is only valid on that connection.
    generation: u64,
    current: Arc<AtomicU64>,
}

impl Drop for Ack {
    fn drop(&mut self) {
        if self.current.load(Ordering::Acquire) != self.generation {
            return; // the broker sends it again on the new connection (or, without a session, not at all)
        }
        if !self.client.try_ack(self.pkid, self.qos) {
            let (client, pkid, qos) = (self.client.clone(), self.pkid, self.qos);
            runtime().spawn(async move { client.ack(pkid, qos).await });
        }
    }
}

/// A plain MQTT message.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub received_at: i64,
    pub ack: Option<Arc<Ack>>,
}

/// What a subscription's consumer receives.
#[derive(Debug)]
pub enum Item {
    Point {
        point: RawPoint,
        qos: u8,
        retain: bool,
        ack: Option<Arc<Ack>>,
    },
    Command {
        command: Command,
        raw: Bytes,
        ack: Option<Arc<Ack>>,
    },
    Message(Message),
    /// A message that could not be decoded: counted, and handed over with the reason.
    Malformed {
        message: Message,
        reason: String,
    },
    /// The subscription failed (authorization); the queue ends after it.
    Error(SessionError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RouteState {
    Pending,
    Active,
    Failed(SessionError),
    Closed,
}

/// One subscription: its filter, its queue, and whether the broker granted it.
#[derive(Debug)]
pub struct Route {
    pub id: u64,
    pub filter: String,
    pub qos: u8,
    pub decode: Decode,
    pub queue: Arc<Queue<Item>>,
    state: Mutex<RouteState>,
    settled: Notify,
    /// The SUBSCRIBE went out when the subscription was made (the client was connected).
    requested: AtomicBool,
}

impl Route {
    /// Whether the SUBSCRIBE was sent when the subscription was made; the broker's answer is then
    /// worth waiting for, even if the connection drops meanwhile (Capture drops it to refuse).
    pub fn was_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }
    fn state(&self) -> MutexGuard<'_, RouteState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn settle(&self, state: RouteState) {
        *self.state() = state;
        self.settled.notify_waiters();
    }
    /// Whether the broker has granted the subscription.
    pub fn is_active(&self) -> bool {
        *self.state() == RouteState::Active
    }
}

/// A request sent into rumqttc's channel, waiting for its `Outgoing` event.
#[derive(Debug)]
enum Sent {
    Publish {
        id: u64,
        qos: u8,
        topic: String,
        permit: Option<OwnedSemaphorePermit>,
    },
    Subscribe {
        filters: Vec<String>,
    },
    Unsubscribe {
        done: oneshot::Sender<()>,
    },
    Disconnect,
}

/// A QoS 1/2 publish on the wire, waiting for its acknowledgement.
#[derive(Debug)]
struct InFlight {
    id: u64,
    topic: String,
    on_wire: bool,
    _permit: Option<OwnedSemaphorePermit>,
}

/// A publish made while offline, waiting for the connection.
#[derive(Debug)]
struct Queued {
    id: u64,
    topic: String,
    payload: Bytes,
    qos: u8,
    retain: bool,
}

#[derive(Debug, Default)]
struct Book {
    /// Connected and done sending what was queued offline: publishes go straight out.
    online: bool,
    outbox: VecDeque<Queued>,
    fifo: VecDeque<Sent>,
    /// Subscribes on the wire by packet id, with when they were sent.
    subscribes: HashMap<u16, (Vec<String>, Instant)>,
    /// Unsubscribes on the wire by packet id, with who waits for the UNSUBACK.
    unsubscribes: HashMap<u16, oneshot::Sender<()>>,
    inflight: HashMap<u16, VecDeque<InFlight>>,
    acks: HashMap<u64, oneshot::Sender<Result<(), SessionError>>>,
    /// The latest publish written, to attribute a disconnect right after it.
    last_publish: Option<(Instant, u64, String)>,
    /// Requests the broker hung up right after once: a second time makes it a refusal.
    /// Hang-ups seen right after each of these requests (a refusal repeats; a restart seldom does).
    suspect_filters: std::collections::HashMap<String, u32>,
    suspect_publish: Option<(u64, u32)>,
}

/// Counters of a session, readable at any time.
#[derive(Debug, Default)]
pub struct Stats {
    pub published: AtomicU64,
    pub acknowledged: AtomicU64,
    pub received: AtomicU64,
    pub unrouted: AtomicU64,
    /// Extra copies of one message that an MQTT 3.1.1 broker sent for overlapping subscriptions.
    pub duplicates: AtomicU64,
    pub reconnects: AtomicU64,
    pub events_dropped: AtomicU64,
    /// Publishes dropped from the offline queue (`drop_oldest`).
    pub dropped: AtomicU64,
}

/// Receives every event as it happens (it must not block: it runs on the network task).
pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

pub(crate) struct Shared {
    config: SessionConfig,
    sink: Option<EventSink>,
    client: LinkClient,
    /// Makes "record in the book, then send into the channel" one step for concurrent callers.
    send_lock: tokio::sync::Mutex<()>,
    book: Mutex<Book>,
    routes: Mutex<Vec<Arc<Route>>>,
    pub events: Queue<Event>,
    connected: AtomicBool,
    closed: AtomicBool,
    close_signal: Notify,
    /// Wakes the flusher when the connection is up.
    flush_signal: Notify,
    /// Wakes publishers waiting for room in the offline queue.
    outbox_space: Notify,
    window: Arc<Semaphore>,
    next_id: AtomicU64,
    /// MQTT 5 subscription identifiers, one per distinct filter.
    filter_ids: Mutex<HashMap<String, usize>>,
    /// Counts connections, so that acknowledgements never cross into a later one.
    generation: Arc<AtomicU64>,
    pub stats: Stats,
}

impl Shared {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn routes(&self) -> MutexGuard<'_, Vec<Arc<Route>>> {
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }
    /// The subscription identifier of `filter` (stable for the session's life).
    fn filter_id(&self, filter: &str) -> usize {
        let mut ids = self
            .filter_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let next = ids.len() + 1;
        *ids.entry(filter.to_owned()).or_insert(next)
    }
    fn emit(&self, event: Event) {
        if let Some(sink) = &self.sink {
            sink(&event);
        }
        if self.events.len() >= self.events.capacity() {
            self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
        // Events never wait: the oldest is dropped when nobody reads them.
        self.events.push_control_bounded(event);
    }
}

/// The acknowledgement of one publish: resolves when the broker acknowledged it (QoS 1/2) or when it
/// was written to the connection (QoS 0).
#[derive(Debug)]
pub struct PublishToken {
    rx: oneshot::Receiver<Result<(), SessionError>>,
}

impl PublishToken {
    pub async fn wait(self) -> Result<(), SessionError> {
        self.rx.await.unwrap_or(Err(SessionError::Closed))
    }
}

/// Sends one publish into rumqttc's channel, recorded in the book. Waits for room in the in-flight
/// window (QoS 1/2) first.
async fn send_now(
    shared: &Shared,
    id: u64,
    tx: oneshot::Sender<Result<(), SessionError>>,
    topic: String,
    payload: Bytes,
    qos: u8,
    retain: bool,
) -> Result<(), SessionError> {
    let permit = if qos > 0 {
        Some(
            Arc::clone(&shared.window)
                .acquire_owned()
                .await
                .map_err(|_| SessionError::Closed)?,
        )
    } else {
        None
    };
    let _guard = shared.send_lock.lock().await;
    send_locked(shared, id, tx, topic, payload, qos, retain, permit).await
}

/// `send_now` for a caller that holds `send_lock` already.
#[allow(clippy::too_many_arguments)]
async fn send_locked(
    shared: &Shared,
    id: u64,
    tx: oneshot::Sender<Result<(), SessionError>>,
    topic: String,
    payload: Bytes,
    qos: u8,
    retain: bool,
    permit: Option<OwnedSemaphorePermit>,
) -> Result<(), SessionError> {
    record(shared, id, tx, topic.clone(), qos, permit);
    if shared
        .client
        .publish(topic, qos, retain, payload)
        .await
        .is_err()
    {
        unrecord(shared, id);
        return Err(SessionError::Closed);
    }
    Ok(())
}

/// Books a publish about to enter rumqttc's channel: its waiter, and its place in the FIFO.
fn record(
    shared: &Shared,
    id: u64,
    tx: oneshot::Sender<Result<(), SessionError>>,
    topic: String,
    qos: u8,
    permit: Option<OwnedSemaphorePermit>,
) {
    let mut book = shared.book();
    book.acks.insert(id, tx);
    book.fifo.push_back(Sent::Publish {
        id,
        qos,
        topic,
        permit,
    });
}

/// Takes back the booking of a publish that did not enter the channel.
fn unrecord(shared: &Shared, id: u64) {
    let mut book = shared.book();
    book.fifo.pop_back();
    book.acks.remove(&id);
}

/// Sends what was queued offline, in order, each time the connection comes up; then publishes go
/// straight out again. It runs beside the polling task, which must never wait on the channel.
async fn flusher(shared: Arc<Shared>) {
    loop {
        let signal = shared.flush_signal.notified();
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        loop {
            // Holding send_lock while taking the next message keeps the order: a direct publish
            // can only go out after everything queued before it.
            let permit_needed = shared.book().outbox.front().map(|q| q.qos > 0);
            let Some(needs_permit) = permit_needed else {
                let mut book = shared.book();
                if book.outbox.is_empty() && shared.connected.load(Ordering::Acquire) {
                    book.online = true;
                }
                break;
            };
            let permit = if needs_permit {
                match Arc::clone(&shared.window).acquire_owned().await {
                    Ok(permit) => Some(permit),
                    Err(_) => return,
                }
            } else {
                None
            };
            let _guard = shared.send_lock.lock().await;
            let next = {
                let mut book = shared.book();
                if shared.connected.load(Ordering::Acquire) {
                    book.outbox.pop_front()
                } else {
                    None
                }
            };
            let Some(queued) = next else {
                break;
            };
            shared.outbox_space.notify_waiters();
            let tx = shared.book().acks.remove(&queued.id);
            let Some(tx) = tx else {
                continue; // dropped meanwhile
            };
            let Queued {
                id,
                topic,
                payload,
                qos,
                retain,
            } = queued;
            let permit = match (qos > 0, permit) {
                (false, _) => None,
                (true, Some(permit)) => Some(permit),
                // The front changed under us (drop_oldest): take the window's room now.
                (true, None) => match Arc::clone(&shared.window).acquire_owned().await {
                    Ok(permit) => Some(permit),
                    Err(_) => return,
                },
            };
            if send_locked(&shared, id, tx, topic, payload, qos, retain, permit)
                .await
                .is_err()
            {
                return;
            }
        }
        signal.await;
    }
}

/// A session with one broker. Cheap to share between threads (`Arc` inside).
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
    eventloop: Arc<Mutex<Option<Link>>>,
    task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("address", &self.shared.config.address())
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Prepares a session; nothing touches the network until `connect`.
    pub fn new(config: SessionConfig, sink: Option<EventSink>) -> Result<Session, SessionError> {
        let (client, eventloop) = link::build(&config)?;
        let shared = Arc::new(Shared {
            sink,
            window: Arc::new(Semaphore::new(usize::from(config.inflight.max(1)))),
            config,
            client,
            send_lock: tokio::sync::Mutex::new(()),
            book: Mutex::new(Book::default()),
            routes: Mutex::new(Vec::new()),
            events: Queue::new(1024, Overflow::DropOldest),
            connected: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            close_signal: Notify::new(),
            flush_signal: Notify::new(),
            outbox_space: Notify::new(),
            next_id: AtomicU64::new(1),
            filter_ids: Mutex::new(HashMap::new()),
            generation: Arc::new(AtomicU64::new(0)),
            stats: Stats::default(),
        });
        Ok(Session {
            shared,
            eventloop: Arc::new(Mutex::new(Some(eventloop))),
            task: Arc::new(Mutex::new(None)),
        })
    }

    pub fn config(&self) -> &SessionConfig {
        &self.shared.config
    }
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }
    /// Connection events, oldest first (the oldest are dropped past 1024 unread).
    pub fn events(&self) -> &Queue<Event> {
        &self.shared.events
    }

    /// Connects and waits for the broker's answer. Afterwards the session stays connected on its own
    /// (reconnecting with backoff) until `close`.
    pub async fn connect(&self) -> Result<(), SessionError> {
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        let eventloop = self
            .eventloop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| {
                SessionError::Connect("connect() was already called on this client".to_owned())
            })?;
        runtime().spawn(flusher(Arc::clone(&self.shared)));
        let (first_tx, first_rx) = oneshot::channel();
        let handle = runtime().spawn(driver::run(Arc::clone(&self.shared), eventloop, first_tx));
        *self.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
        let outcome = first_rx.await.unwrap_or(Err(SessionError::Closed));
        if outcome.is_err() {
            // The task ends after a failed first connection: wait for it, so that the session is
            // closed when the error reaches the caller.
            let task = self
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(task) = task {
                let _ = task.await;
            }
        }
        outcome
    }

    /// Adds a subscription. When connected, the SUBSCRIBE is sent now and `wait_granted` tells the
    /// broker's answer; before `connect` it is sent with the connection.
    pub async fn subscribe(
        &self,
        filter: &str,
        qos: u8,
        decode: Decode,
        capacity: usize,
        overflow: Overflow,
    ) -> Result<Arc<Route>, SessionError> {
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        let route = Arc::new(Route {
            id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            filter: filter.to_owned(),
            qos: qos.min(2),
            decode,
            queue: Arc::new(Queue::new(capacity, overflow)),
            state: Mutex::new(RouteState::Pending),
            settled: Notify::new(),
            requested: AtomicBool::new(false),
        });
        self.shared.routes().push(Arc::clone(&route));
        if self.is_connected() {
            let _guard = self.shared.send_lock.lock().await;
            self.shared.book().fifo.push_back(Sent::Subscribe {
                filters: vec![route.filter.clone()],
            });
            if self
                .shared
                .client
                .subscribe(
                    route.filter.clone(),
                    route.qos,
                    self.shared.filter_id(&route.filter),
                )
                .await
                .is_err()
            {
                self.shared.book().fifo.pop_back();
                return Err(SessionError::Closed);
            }
            route.requested.store(true, Ordering::Release);
        }
        Ok(route)
    }

    /// Waits until the broker granted `route` (Ok) or refused it (Err), up to `timeout`.
    pub async fn wait_granted(&self, route: &Route, timeout: Duration) -> Result<(), SessionError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let settled = route.settled.notified();
            match route.state().clone() {
                RouteState::Active => return Ok(()),
                RouteState::Failed(err) => return Err(err),
                RouteState::Closed => return Err(SessionError::Closed),
                RouteState::Pending => {}
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                return Err(SessionError::Timeout(format!(
                    "the broker did not answer the subscription to {:?} within {:.1} s",
                    route.filter,
                    timeout.as_secs_f64()
                )));
            }
        }
    }

    /// Ends a subscription: its queue closes, and the broker is told unless another subscription
    /// uses the same filter.
    pub async fn unsubscribe(&self, route: &Route) {
        route.settle(RouteState::Closed);
        route.queue.close();
        let still_used = {
            let mut routes = self.shared.routes();
            routes.retain(|r| r.id != route.id);
            routes.iter().any(|r| r.filter == route.filter)
        };
        if !still_used && self.is_connected() {
            let (done, acked) = oneshot::channel();
            {
                let _guard = self.shared.send_lock.lock().await;
                self.shared
                    .book()
                    .fifo
                    .push_back(Sent::Unsubscribe { done });
                if self
                    .shared
                    .client
                    .unsubscribe(route.filter.clone())
                    .await
                    .is_err()
                {
                    self.shared.book().fifo.pop_back();
                    return;
                }
            }
            // Once the broker confirms, nothing more arrives for this filter.
            let _ = tokio::time::timeout(Duration::from_secs(5), acked).await;
        }
    }

    /// Publishes a message and returns a token that resolves on the broker's acknowledgement.
    ///
    /// While the client is offline (and until what was queued then has gone out) the message waits
    /// in the offline queue, whose policy decides what happens when it is full. Online, it waits for
    /// room in the in-flight window (QoS 1/2) and in the request channel.
    pub async fn publish(
        &self,
        topic: String,
        payload: Bytes,
        qos: u8,
        retain: bool,
    ) -> Result<PublishToken, SessionError> {
        let qos = qos.min(2);
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut tx = Some(tx);
        loop {
            if self.is_closed() {
                return Err(SessionError::Closed);
            }
            let space = self.shared.outbox_space.notified();
            // Decided under the lock, acted on after it: a std lock guard must not live across an await.
            let wait_for_room = {
                let mut book = self.shared.book();
                if book.online && book.outbox.is_empty() {
                    break;
                }
                let config = &self.shared.config;
                let full = book.outbox.len() >= config.offline_capacity.max(1);
                if full && config.offline_policy == OfflinePolicy::Block {
                    true
                } else {
                    if full {
                        self.make_room(&mut book)?;
                    }
                    if let Some(tx) = tx.take() {
                        book.acks.insert(id, tx);
                    }
                    book.outbox.push_back(Queued {
                        id,
                        topic,
                        payload,
                        qos,
                        retain,
                    });
                    return Ok(PublishToken { rx });
                }
            };
            if wait_for_room {
                space.await;
            }
        }
        let Some(tx) = tx else {
            return Err(SessionError::Closed);
        };
        send_now(&self.shared, id, tx, topic, payload, qos, retain).await?;
        Ok(PublishToken { rx })
    }

    /// Publishes without waiting when nothing stands in the way: straight out when online with room
    /// in the in-flight window and the request channel, or into the offline queue when offline (under
    /// its policy). No task and no thread hop. `Ok(None)` when the caller must wait with `publish`.
    pub fn try_publish(
        &self,
        topic: &str,
        payload: &Bytes,
        qos: u8,
        retain: bool,
    ) -> Result<Option<PublishToken>, SessionError> {
        let qos = qos.min(2);
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        {
            let mut book = self.shared.book();
            if !(book.online && book.outbox.is_empty()) {
                let config = &self.shared.config;
                if book.outbox.len() >= config.offline_capacity.max(1) {
                    if config.offline_policy == OfflinePolicy::Block {
                        return Ok(None);
                    }
                    self.make_room(&mut book)?;
                }
                let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                book.acks.insert(id, tx);
                book.outbox.push_back(Queued {
                    id,
                    topic: topic.to_owned(),
                    payload: payload.clone(),
                    qos,
                    retain,
                });
                return Ok(Some(PublishToken { rx }));
            }
        }
        let permit = if qos > 0 {
            match Arc::clone(&self.shared.window).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => return Ok(None),
            }
        } else {
            None
        };
        let Ok(_guard) = self.shared.send_lock.try_lock() else {
            return Ok(None);
        };
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        record(&self.shared, id, tx, topic.to_owned(), qos, permit);
        if self.shared.client.try_publish(topic, qos, retain, payload) {
            Ok(Some(PublishToken { rx }))
        } else {
            unrecord(&self.shared, id);
            Ok(None)
        }
    }

    /// The offline queue is full: fail (`raise`) or drop its oldest message (`drop_oldest`).
    fn make_room(&self, book: &mut Book) -> Result<(), SessionError> {
        let config = &self.shared.config;
        if config.offline_policy == OfflinePolicy::Raise {
            return Err(SessionError::QueueFull(format!(
                "the client is offline and its queue of {} messages is full (offline=\"raise\"); wait for \
                 the connection, or choose offline=\"block\" or a larger max_queued",
                config.offline_capacity
            )));
        }
        if let Some(old) = book.outbox.pop_front() {
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            let error = SessionError::QueueFull(format!(
                "the message to {:?} was dropped from the full offline queue (offline=\"drop_oldest\")",
                old.topic
            ));
            if let Some(waiter) = book.acks.remove(&old.id) {
                let _ = waiter.send(Err(error));
            }
        }
        Ok(())
    }

    /// Messages waiting in the offline queue.
    pub fn queued(&self) -> usize {
        self.shared.book().outbox.len()
    }

    /// Closes the session: a clean DISCONNECT when connected, then the task ends, every queue ends
    /// and waiting publishes fail with `Closed`. Returns within about `grace`.
    pub async fn close(&self, grace: Duration) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut task) = task {
            if self.is_connected() {
                if let Ok(_guard) =
                    tokio::time::timeout(grace / 2, self.shared.send_lock.lock()).await
                {
                    self.shared.book().fifo.push_back(Sent::Disconnect);
                    if self.shared.client.try_disconnect().is_err() {
                        self.shared.book().fifo.pop_back();
                    }
                }
            }
            if tokio::time::timeout(grace, &mut task).await.is_err() {
                self.shared.close_signal.notify_one();
                if tokio::time::timeout(Duration::from_millis(200), &mut task)
                    .await
                    .is_err()
                {
                    task.abort();
                }
            }
        }
        driver::finish(&self.shared);
    }
}
