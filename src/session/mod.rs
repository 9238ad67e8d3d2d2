//! The MQTT session: a tokio task (`engine`) that owns the connection: it connects (TCP, TLS,
//! WebSocket), reconnects with backoff, re-subscribes, routes incoming messages to bounded
//! subscription queues, sends publishes and tracks their acknowledgements, and reports what happens
//! as events. The protocol itself is a state machine without I/O (`proto`) over rumqttc's packet
//! codec (`codec`). No Python here.
//!
//! Publishers put messages in the outbox (bounded; while offline under the offline policy) and
//! wake the task, which takes them in order as the in-flight window allows and writes them in
//! batches. Subscriptions and unsubscriptions reach it the same way, as controls.

pub mod batch;
pub mod codec;
pub mod config;
mod engine;
pub mod error;
pub mod frame;
pub mod jwt;
pub mod operation;
pub mod proto;
pub mod queue;
pub mod refusal;
pub mod tls;
pub mod transport;

#[cfg(test)]
pub(crate) mod tests;

pub use config::{
    AccountKind, Credentials, CredentialsFuture, CredentialsProvider, OfflinePolicy, Protocol,
    Reconnect, Scope, Secret, SessionConfig, StaticCredentials, TlsOptions, Transport,
};
pub use error::{Action, SessionError};
pub use operation::{Completions, Operation};
pub use queue::{Offer, Overflow, Pop, Queue};

use crate::payload::{Command, RawPoint};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;
use tokio::runtime::Runtime;
use tokio::sync::{oneshot, Notify};

/// The one tokio runtime every session runs on (one network thread).
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

/// A plain MQTT message.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub received_at: i64,
}

/// What a subscription's consumer receives.
#[derive(Debug)]
pub enum Item {
    Point {
        point: RawPoint,
        qos: u8,
        retain: bool,
    },
    Command {
        command: Command,
        raw: Bytes,
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

/// Where a publish went in the durable outbox.
enum Stored {
    /// Written: its record id.
    Record(i64),
    /// Not written (a full disk, a damaged store): kept in memory only, counted and logged.
    MemoryOnly,
    /// The outbox is full and the policy is to wait for room.
    Wait,
}

/// A publish in the outbox.
#[derive(Debug)]
pub(crate) struct Pending {
    id: u64,
    /// Its record in the durable outbox, removed once the broker acknowledged it.
    stored: Option<i64>,
    topic: String,
    payload: Bytes,
    qos: u8,
    retain: bool,
    tx: Option<oneshot::Sender<Result<(), SessionError>>>,
}

/// Publishes waiting for the connection task: while online only until it takes them (bounded all
/// the same), while offline under the offline policy.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    items: VecDeque<Pending>,
    /// How many of `items` are in memory only (not in the durable outbox): what `max_queued` bounds.
    memory_only: usize,
    online: bool,
    /// Drops under `offline="drop_oldest"`: said once, then at most every few seconds with a count.
    warn_dropped: engine::RateLimited,
}

impl Outbox {
    fn push_back(&mut self, pending: Pending) {
        self.memory_only += usize::from(pending.stored.is_none());
        self.items.push_back(pending);
    }

    pub(super) fn pop_front(&mut self) -> Option<Pending> {
        let pending = self.items.pop_front()?;
        self.memory_only -= usize::from(pending.stored.is_none());
        Some(pending)
    }

    /// The oldest message kept in memory only (`drop_oldest`: a stored one stays for its store).
    fn pop_oldest_in_memory(&mut self) -> Option<Pending> {
        let at = self.items.iter().position(|p| p.stored.is_none())?;
        self.memory_only -= 1;
        self.items.remove(at)
    }
}

/// A subscription change for the connection task.
#[derive(Debug)]
pub(crate) enum Control {
    Subscribe(Arc<Route>),
    /// A route was removed; the sender hears once the broker stopped sending for it.
    Unsubscribe(oneshot::Sender<()>),
}

/// Counters of a session, readable at any time.
#[derive(Debug, Default)]
pub struct Stats {
    pub published: AtomicU64,
    pub acknowledged: AtomicU64,
    pub received: AtomicU64,
    /// Messages no subscription wanted (dropped, and logged).
    pub unrouted: AtomicU64,
    /// Messages of a resumed session held for a subscription not made yet.
    pub held: AtomicU64,
    /// Packets from the broker over `max_packet_size` (dropped, and logged).
    pub oversize: AtomicU64,
    pub reconnects: AtomicU64,
    pub events_dropped: AtomicU64,
    /// Publishes dropped from the offline queue (`drop_oldest`).
    pub dropped: AtomicU64,
}

pub(crate) struct Shared {
    config: SessionConfig,
    sink: Option<EventSink>,
    outbox: Mutex<Outbox>,
    control: Mutex<VecDeque<Control>>,
    /// Wakes the connection task: there is work.
    wake: Notify,
    /// Wakes publishers waiting for room in the outbox.
    space: Notify,
    routes: Mutex<Vec<Arc<Route>>>,
    pub events: Queue<Event>,
    connected: AtomicBool,
    closed: AtomicBool,
    close_signal: Notify,
    close_grace: Mutex<Duration>,
    next_id: AtomicU64,
    /// The largest PUBLISH the connection takes (the broker's limit under MQTT 5).
    max_outgoing: AtomicUsize,
    /// MQTT 5 subscription identifiers, one per distinct filter.
    filter_ids: Mutex<HashMap<String, usize>>,
    pub stats: Stats,
}

impl Shared {
    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn control(&self) -> MutexGuard<'_, VecDeque<Control>> {
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn routes(&self) -> MutexGuard<'_, Vec<Arc<Route>>> {
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn filter_ids(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        self.filter_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
    fn close_grace(&self) -> Duration {
        *self
            .close_grace
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
    /// The subscription identifier of `filter` (stable for the session's life).
    fn filter_id(&self, filter: &str) -> usize {
        let mut ids = self.filter_ids();
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
    fn push_control(&self, control: Control) {
        self.control().push_back(control);
        self.wake.notify_one();
    }
}

/// The error of a publish over the packet size limit.
pub(crate) fn too_large(topic: &str, size: usize, limit: usize) -> SessionError {
    SessionError::TooLarge(format!(
        "the message to {topic:?} is {size} bytes as an MQTT packet, over the limit of {limit} bytes \
         (the broker's Maximum Packet Size, or Capture's 1 MB); split the payload, or raise \
         max_packet_size if this broker takes larger packets"
    ))
}

/// The acknowledgement of one publish: resolves when the broker acknowledged it (QoS 1/2) or when it
/// was handed to the connection (QoS 0).
#[derive(Debug)]
pub struct PublishToken {
    rx: oneshot::Receiver<Result<(), SessionError>>,
}

impl PublishToken {
    pub async fn wait(self) -> Result<(), SessionError> {
        self.rx.await.unwrap_or(Err(SessionError::Closed))
    }
}

/// Receives every event as it happens (it must not block: it runs on the network task).
pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

/// A session with one broker. Cheap to share between threads (`Arc` inside).
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
    started: Arc<AtomicBool>,
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
        if config.transport.is_tls() {
            // Fail early on a bad CA, before any connection attempt.
            tls::client_config(&config.tls).map_err(SessionError::Connect)?;
        }
        let mut outbox = Outbox::default();
        let mut next_id = 1;
        if let Some(durable) = &config.durable {
            // What an earlier process left: sent first, in order; nobody waits for it.
            let records = durable
                .records()
                .map_err(|e| SessionError::Connect(e.to_string()))?;
            durable.note_replayed(records.len() as u64);
            if !records.is_empty() {
                log::info!(
                    "the outbox {} holds {} message(s) from before: they go out first",
                    durable.path().display(),
                    records.len()
                );
            }
            for record in records {
                outbox.push_back(Pending {
                    id: next_id,
                    stored: Some(record.id),
                    topic: record.topic,
                    payload: Bytes::from(record.payload),
                    qos: record.qos,
                    retain: false,
                    tx: None,
                });
                next_id += 1;
            }
        }
        let shared = Arc::new(Shared {
            sink,
            max_outgoing: AtomicUsize::new(config.max_packet_size),
            config,
            outbox: Mutex::new(outbox),
            control: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            space: Notify::new(),
            routes: Mutex::new(Vec::new()),
            events: Queue::new(1024, Overflow::DropOldest),
            connected: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            close_signal: Notify::new(),
            close_grace: Mutex::new(Duration::from_secs(2)),
            next_id: AtomicU64::new(next_id),
            filter_ids: Mutex::new(HashMap::new()),
            stats: Stats::default(),
        });
        Ok(Session {
            shared,
            started: Arc::new(AtomicBool::new(false)),
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
        if self.started.swap(true, Ordering::AcqRel) {
            return Err(SessionError::Connect(
                "connect() was already called on this client".to_owned(),
            ));
        }
        let (first_tx, first_rx) = oneshot::channel();
        let task = engine::Task::new(Arc::clone(&self.shared), Some(first_tx));
        let handle = runtime().spawn(task.run());
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

    /// Starts connecting without waiting for the broker: a failed attempt is retried with backoff like
    /// a lost connection, so a device that starts during an outage goes on (its publishes wait in the
    /// outbox) and connects when the broker is back.
    pub fn start(&self) -> Result<(), SessionError> {
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        if self.started.swap(true, Ordering::AcqRel) {
            return Err(SessionError::Connect(
                "connect() was already called on this client".to_owned(),
            ));
        }
        let task = engine::Task::new(Arc::clone(&self.shared), None);
        let handle = runtime().spawn(task.run());
        *self.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
        Ok(())
    }

    /// Adds a subscription. When connected, the SUBSCRIBE is sent now and `wait_granted` tells the
    /// broker's answer; before `connect` it is sent with the connection.
    pub fn subscribe(
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
        self.shared
            .config
            .scope
            .check(Action::Subscribe, filter)
            .map_err(SessionError::OutOfScope)?;
        let route = Arc::new(Route {
            id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            filter: filter.to_owned(),
            qos: qos.min(2),
            decode,
            queue: Arc::new(Queue::new(capacity, overflow)),
            state: Mutex::new(RouteState::Pending),
            settled: Notify::new(),
            requested: AtomicBool::new(self.is_connected()),
        });
        self.shared.routes().push(Arc::clone(&route));
        self.shared
            .push_control(Control::Subscribe(Arc::clone(&route)));
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
    /// needs the same filter. Returns once the broker confirmed (or within 5 s).
    pub async fn unsubscribe(&self, route: &Route) {
        route.settle(RouteState::Closed);
        route.queue.close();
        self.shared.routes().retain(|r| r.id != route.id);
        if self.is_closed() {
            return;
        }
        let (done, acked) = oneshot::channel();
        self.shared.push_control(Control::Unsubscribe(done));
        if self.is_connected() {
            // Offline, the broker hears of it after the reconnect; nothing to wait for now.
            let _ = tokio::time::timeout(Duration::from_secs(5), acked).await;
        }
    }

    /// Fails at once for a message over the packet size limit in force.
    fn check_size(&self, topic: &str, payload: &Bytes, qos: u8) -> Result<(), SessionError> {
        let version = match self.shared.config.protocol {
            Protocol::V311 => codec::Version::V311,
            Protocol::V5 => codec::Version::V5,
        };
        let size = codec::publish_size(version, topic, payload.len(), qos);
        let limit = self.shared.max_outgoing.load(Ordering::Acquire);
        if size > limit {
            return Err(too_large(topic, size, limit));
        }
        Ok(())
    }

    /// Publishes without waiting: into the outbox when it has room, or makes room under the
    /// offline policy (no task, no thread hop). `Ok(None)`: the outbox is full and the caller must
    /// wait with `publish`.
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
        let config = &self.shared.config;
        config
            .scope
            .check(Action::Publish, topic)
            .map_err(SessionError::OutOfScope)?;
        self.check_size(topic, payload, qos)?;
        let stored = match &config.durable {
            Some(durable) if qos > 0 => match self.store(durable, topic, payload, qos)? {
                Stored::Record(id) => Some(id),
                Stored::MemoryOnly => None,
                // Full under offline="block": wait for acknowledgements to free room.
                Stored::Wait => return Ok(None),
            },
            _ => None,
        };
        {
            let mut outbox = self.shared.outbox();
            // A stored message is bounded by the durable outbox's bytes; one kept in memory only
            // (no outbox, QoS 0, or the store failed) by max_queued, counting only those.
            if stored.is_none() && outbox.memory_only >= config.offline_capacity.max(1) {
                if outbox.online || config.offline_policy == OfflinePolicy::Block {
                    return Ok(None);
                }
                self.make_room(&mut outbox)?;
            }
            let (tx, rx) = oneshot::channel();
            // Only the first message into an empty outbox wakes the connection task: while it holds
            // any, the task is bound to come back for them (after its write, an acknowledgement,
            // or the connection), and the messages gather into one write meanwhile.
            let wake = outbox.items.is_empty();
            outbox.push_back(Pending {
                id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
                stored,
                topic: topic.to_owned(),
                payload: payload.clone(),
                qos,
                retain,
                tx: Some(tx),
            });
            drop(outbox);
            if wake {
                self.shared.wake.notify_one();
            }
            Ok(Some(PublishToken { rx }))
        }
    }

    /// Publishes a message and returns a token that resolves on the broker's acknowledgement
    /// (QoS 1/2) or once handed to the connection (QoS 0). Waits only for room in the outbox, up to
    /// `within` (`SessionError::Timeout`, saying which queue is full and what to change).
    pub async fn publish(
        &self,
        topic: String,
        payload: Bytes,
        qos: u8,
        retain: bool,
        within: Duration,
    ) -> Result<PublishToken, SessionError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let space = self.shared.space.notified();
            if let Some(token) = self.try_publish(&topic, &payload, qos, retain)? {
                return Ok(token);
            }
            if tokio::time::timeout_at(deadline, space).await.is_err() {
                let size = (topic.len() + payload.len()) as u64;
                return Err(SessionError::Timeout(self.no_room(within, qos, size)));
            }
        }
    }

    /// Why a publish (of `size` topic and payload bytes) found no room within `within`, and what
    /// to change.
    fn no_room(&self, within: Duration, qos: u8, size: u64) -> String {
        let config = &self.shared.config;
        let waited = format!(
            "no room for the message within {:.1} s",
            within.as_secs_f64()
        );
        if let Some(durable) = &config.durable {
            if qos > 0 && durable.stats().bytes + size > durable.max_bytes() {
                return format!(
                    "{waited}: the durable outbox holds outbox_max_bytes={} and offline=\"block\" waits \
                     for the broker's acknowledgements; raise outbox_max_bytes, or choose \
                     offline=\"raise\" or \"drop_oldest\"",
                    durable.max_bytes()
                );
            }
        }
        if self.shared.outbox().online {
            format!(
                "{waited}: the broker takes messages slower than they come (the in-flight window \
                 and the queue of max_queued={} are full); wait longer, or raise max_queued",
                config.offline_capacity
            )
        } else {
            format!(
                "{waited}: the client is offline and its queue of max_queued={} is full \
                 (offline=\"block\"); wait for the connection, raise max_queued, or choose \
                 offline=\"raise\" or \"drop_oldest\"",
                config.offline_capacity
            )
        }
    }

    /// Writes a publish to the durable outbox, under the offline policy when it is full.
    fn store(
        &self,
        durable: &crate::outbox::DurableOutbox,
        topic: &str,
        payload: &Bytes,
        qos: u8,
    ) -> Result<Stored, SessionError> {
        use crate::outbox::OutboxError;
        loop {
            match durable.append(topic, payload, qos) {
                Ok(id) => return Ok(Stored::Record(id)),
                Err(OutboxError::Full(why)) => {
                    match self.shared.config.offline_policy {
                        OfflinePolicy::Block => return Ok(Stored::Wait),
                        OfflinePolicy::Raise => {
                            return Err(SessionError::QueueFull(format!(
                                "{why} (offline=\"raise\"); wait for the connection, or choose \
                                 offline=\"block\" or a larger outbox_max_bytes"
                            )))
                        }
                        OfflinePolicy::DropOldest => {
                            let dropped = durable
                                .drop_oldest()
                                .map_err(|e| SessionError::QueueFull(e.to_string()))?;
                            let Some(id) = dropped else {
                                return Err(SessionError::QueueFull(why));
                            };
                            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                            let mut outbox = self.shared.outbox();
                            outbox.warn_dropped.warn(std::time::Instant::now(), |count| {
                                format!(
                                    "the durable outbox is full: its oldest message was dropped \
                                     ({count} since the last warning; offline=\"drop_oldest\"); raise \
                                     outbox_max_bytes, or choose offline=\"block\""
                                )
                            });
                            // Its copy in memory, if still waiting, goes too.
                            outbox.items.retain(|p| p.stored != Some(id));
                        }
                    }
                }
                // The outbox reported it (once, until it stores again) and counted it as unsaved.
                Err(_) => return Ok(Stored::MemoryOnly),
            }
        }
    }

    /// The offline queue is full: fail (`raise`) or drop its oldest message (`drop_oldest`).
    fn make_room(&self, outbox: &mut Outbox) -> Result<(), SessionError> {
        let config = &self.shared.config;
        if config.offline_policy == OfflinePolicy::Raise {
            return Err(SessionError::QueueFull(format!(
                "the client is offline and its queue of {} messages is full (offline=\"raise\"); wait for \
                 the connection, or choose offline=\"block\" or a larger max_queued",
                config.offline_capacity
            )));
        }
        if let Some(mut old) = outbox.pop_oldest_in_memory() {
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            let error = SessionError::QueueFull(format!(
                "the message to {:?} was dropped from the full offline queue (offline=\"drop_oldest\")",
                old.topic
            ));
            outbox
                .warn_dropped
                .warn(std::time::Instant::now(), |count| {
                    format!(
                        "{error} ({count} since the last warning); raise max_queued, or choose \
                     offline=\"block\" to wait instead"
                    )
                });
            if let Some(waiter) = old.tx.take() {
                let _ = waiter.send(Err(error));
            }
        }
        Ok(())
    }

    /// Messages waiting in the outbox (while offline: the offline queue).
    pub fn queued(&self) -> usize {
        self.shared.outbox().items.len()
    }

    /// Closes the session: what was published goes out and in-flight publishes get their
    /// acknowledgements (for up to half of `grace`), then a clean DISCONNECT; every queue ends and
    /// publishes still waiting fail with `Closed`. Returns within about `grace`.
    pub async fn close(&self, grace: Duration) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        *self
            .shared
            .close_grace
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = grace;
        self.shared.close_signal.notify_one();
        self.shared.wake.notify_one();
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut task) = task {
            if tokio::time::timeout(grace, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
        finish(&self.shared);
    }
}

/// Marks the session closed: queues end, waiting publishes fail, a `Closed` event is the last.
pub(crate) fn finish(shared: &Shared) {
    shared.closed.store(true, Ordering::Release);
    shared.connected.store(false, Ordering::Release);
    let routes: Vec<Arc<Route>> = shared.routes().drain(..).collect();
    for route in routes {
        route.queue.close();
        route.settle(RouteState::Closed);
    }
    let pending: Vec<Pending> = {
        let mut outbox = shared.outbox();
        outbox.online = false;
        outbox.memory_only = 0;
        outbox.items.drain(..).collect()
    };
    for mut p in pending {
        if let Some(tx) = p.tx.take() {
            let _ = tx.send(Err(SessionError::Closed));
        }
    }
    shared.space.notify_waiters();
    if let Some(durable) = &shared.config.durable {
        durable.release(); // what is not acknowledged stays on disk for the next process
    }
    if !shared.events.is_closed() {
        log::debug!("session with {} closed", shared.config.address());
        shared.emit(Event::Closed);
        shared.events.close();
    }
}
