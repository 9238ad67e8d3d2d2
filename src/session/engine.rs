//! The connection task: opens the transport, runs the protocol state machine over it, routes
//! incoming messages into the subscriptions' bounded queues, sends what the user published, and
//! reconnects with backoff. One task per session, on the shared network runtime.
//!
//! Flow control is ours: an incoming QoS 1/2 message is acknowledged once it is in its
//! subscriptions' queues. When a `block` queue is full the task stops reading the socket (TCP then
//! holds the broker back) but goes on writing: pings, acknowledgements and publishes, so the broker
//! keeps the connection. While reading is paused no ping answer can be seen, so the ping deadline
//! waits; a dead link is then noticed by the kernel (`TCP_USER_TIMEOUT`, 1.5 keepalives after a
//! write went unacknowledged) or by a failing write, and a broker that stops answering but keeps
//! its TCP alive within 1.5 keepalives of reading resuming. Pausing one subscription pauses the
//! whole connection: its other subscriptions wait too.
//!
//! Writes are coalesced: every request that is ready is encoded into one buffer, written at once.

use super::codec::{DecodeError, Packet, Publish, Version};
use super::proto::{Broken, Engine, Outgoing, Output, Settings};
use super::refusal::{self, Refusals, Verdict};
use super::transport::{self, BoxStream};
use super::{
    Action, Control, Decode, Event, Item, Message, Offer, Pending, Route, RouteState, SessionError,
    Shared,
};
use crate::payload;
use crate::timestamp;
use crate::topic;
use bytes::{Buf, BytesMut};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::oneshot;

/// Bytes waiting to be written past which no more publishes are taken from the outbox.
const HIGH_WATER: usize = 256 * 1024;
/// How many messages of a resumed persistent session wait for a matching `subscribe()`.
pub const HOLD_LIMIT: usize = 10_000;
/// How long they wait.
pub const HOLD_GRACE: Duration = Duration::from_secs(30);
/// Acknowledged durable-outbox records are removed together: once this many wait ...
const REMOVE_BATCH: usize = 1024;
/// ... or the first of them waited this long (a removal is a transaction on disk; fewer, larger
/// ones leave the store to the pushes).
const REMOVE_DELAY: Duration = Duration::from_millis(20);
/// The shortest interval between two warnings of the same kind.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A publish on its way: who waits for its outcome.
pub(super) struct PubTag {
    id: u64,
    /// Its record in the durable outbox.
    stored: Option<i64>,
    qos: u8,
    topic: String,
    sent_at: Instant,
    tx: Option<oneshot::Sender<Result<(), SessionError>>>,
}

/// A SUBSCRIBE or UNSUBSCRIBE on the wire.
pub(super) enum SubTag {
    Subscribe {
        filters: Vec<String>,
        sent_at: Instant,
    },
    Unsubscribe {
        done: Vec<oneshot::Sender<()>>,
    },
}

/// A message that could not yet go into every queue it belongs to (a `block` queue was full).
struct Stalled {
    pkid: u16,
    qos: u8,
    rest: VecDeque<(Arc<Route>, Item)>,
}

/// A warning that says how often it happened since it was last said.
#[derive(Debug, Default)]
pub(super) struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    pub(super) fn warn(&mut self, now: Instant, text: impl FnOnce(u64) -> String) {
        if self.last.is_some_and(|last| now < last + WARN_EVERY) {
            self.suppressed += 1;
            return;
        }
        let count = self.suppressed + 1;
        self.suppressed = 0;
        self.last = Some(now);
        log::warn!("{}", text(count));
    }
}

/// A broker filter and whether the broker granted it.
#[derive(Debug, Clone)]
struct BrokerFilter {
    qos: u8,
    granted: bool,
}

/// What ended a connection.
struct Lost {
    error: SessionError,
    hung_up: bool,
}

impl Lost {
    fn new(error: SessionError, hung_up: bool) -> Lost {
        Lost { error, hung_up }
    }
}

pub(super) struct Task {
    shared: Arc<Shared>,
    proto: Engine<PubTag, SubTag>,
    first: Option<oneshot::Sender<Result<(), SessionError>>>,
    attempt: u32,
    refusals: Refusals,
    /// Filters the broker has granted in this session: sent again after a reconnect, they are no
    /// suspects when the broker hangs up (an oversize publish sent after them is).
    granted_before: HashSet<String>,
    /// The filters subscribed at the broker (under MQTT 3.1.1 never two that overlap).
    filters: HashMap<String, BrokerFilter>,
    /// Messages of a resumed session that no subscription wanted yet.
    held: VecDeque<(Instant, Publish)>,
    /// Routes that were offered the held messages already (each is, once, when it appears).
    handed: std::collections::HashSet<u64>,
    /// Durable-outbox records acknowledged, removed together (`REMOVE_BATCH`, `REMOVE_DELAY`), and
    /// when the first of them was.
    acked: Vec<i64>,
    acked_since: Option<Instant>,
    stalled: Option<Stalled>,
    renew_at: Option<Instant>,
    warn_unrouted: RateLimited,
    warn_dropped: HashMap<u64, RateLimited>,
    warn_oversize: RateLimited,
    warn_expired: RateLimited,
    /// Reconnections refused for their credentials (an expired token, a revoked account).
    warn_refused_login: RateLimited,
    /// The `exp` of the last password, when it was a JWT.
    token_expiry: Option<i64>,
    /// Bytes still to discard of a packet over our size limit.
    skip: usize,
}

fn login_error(shared: &Shared, refusal: &super::codec::LoginRefusal) -> SessionError {
    if refusal.credentials && shared.config.credentials.is_some() {
        SessionError::Authentication {
            username: shared.config.account_name.clone(),
            reason: refusal.words.clone(),
        }
    } else {
        SessionError::Connect(format!(
            "the broker at {} refused the connection: {}",
            shared.config.address(),
            refusal.words
        ))
    }
}

fn authorization(shared: &Shared, action: Action, topic: &str, how: &str) -> SessionError {
    SessionError::Authorization {
        action,
        topic: topic.to_owned(),
        account: shared.config.account_name.clone(),
        kind: shared.config.account_kind,
        how: how.to_owned(),
    }
}

fn broken_error(shared: &Shared, broken: Broken) -> Lost {
    let address = shared.config.address();
    match broken {
        Broken::Refused(refusal) => Lost::new(login_error(shared, &refusal), false),
        Broken::ServerDisconnect(words) => Lost::new(
            SessionError::Connect(format!(
                "the broker at {address} disconnected the client: {words}"
            )),
            true,
        ),
        Broken::PingTimeout(after) => Lost::new(
            SessionError::Connect(format!(
                "the broker at {address} stopped answering (no reply to a keepalive ping within {:.1} s)",
                after.as_secs_f64()
            )),
            false,
        ),
        Broken::Protocol(what) => Lost::new(
            SessionError::Connect(format!("the broker at {address} broke the protocol: {what}")),
            false,
        ),
    }
}

fn decode_item(route: &Route, publish: &Publish, received_at: i64) -> Item {
    let message = || Message {
        topic: publish.topic.clone(),
        payload: publish.payload.clone(),
        qos: publish.qos,
        retain: publish.retain,
        received_at,
    };
    let malformed = |reason: String| {
        route
            .queue
            .counters
            .malformed
            .fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "a message on {:?} could not be read ({reason}); it is handed to the subscription as malformed",
            publish.topic
        );
        Item::Malformed {
            message: message(),
            reason,
        }
    };
    match route.decode {
        Decode::Bytes => Item::Message(message()),
        Decode::Raw => match payload::parse_raw(&publish.topic, &publish.payload, received_at) {
            Ok(point) => Item::Point {
                point,
                qos: publish.qos,
                retain: publish.retain,
            },
            Err(err) => malformed(err.message),
        },
        Decode::Command => match payload::parse_command(&publish.topic, &publish.payload) {
            Ok(command) => Item::Command {
                command,
                raw: publish.payload.clone(),
            },
            Err(err) => malformed(err.message),
        },
    }
}

/// When to renew credentials that expire at `exp` (seconds since the epoch): a minute before, or
/// halfway through what is left when that is shorter.
fn renewal_time(exp: i64) -> Instant {
    let left = exp
        .saturating_sub(timestamp::now_nanos() / timestamp::NANOS_PER_SEC)
        .max(0);
    let lead = 60.min(left / 2);
    let wait = u64::try_from(left - lead).unwrap_or(0);
    Instant::now() + Duration::from_secs(wait.max(1))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// The connection's two halves and its buffers.
struct Conn {
    rd: ReadHalf<BoxStream>,
    wr: WriteHalf<BoxStream>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    need_flush: bool,
}

enum Flow {
    Continue,
    Stop,
}

/// Why the serving loop woke up.
enum Wake {
    Close,
    Work,
    Wrote(std::io::Result<usize>),
    Flushed(std::io::Result<()>),
    Read(std::io::Result<usize>),
    Timer,
}

impl Task {
    pub(super) fn new(
        shared: Arc<Shared>,
        first: Option<oneshot::Sender<Result<(), SessionError>>>,
    ) -> Task {
        let config = &shared.config;
        let settings = Settings {
            version: match config.protocol {
                super::Protocol::V311 => Version::V311,
                super::Protocol::V5 => Version::V5,
            },
            client_id: config.client_id.clone(),
            keepalive: config.keepalive.max(Duration::from_secs(1)),
            clean: config.clean_session,
            inflight: config.inflight.max(1),
            receive_maximum: config.inflight.max(1),
            max_incoming: config.max_packet_size,
            max_outgoing: config.max_packet_size,
        };
        Task {
            proto: Engine::new(settings, Instant::now()),
            shared,
            first,
            attempt: 0,
            refusals: Refusals::default(),
            granted_before: HashSet::new(),
            filters: HashMap::new(),
            held: VecDeque::new(),
            handed: std::collections::HashSet::new(),
            acked: Vec::new(),
            acked_since: None,
            stalled: None,
            renew_at: None,
            warn_unrouted: RateLimited::default(),
            warn_dropped: HashMap::new(),
            warn_oversize: RateLimited::default(),
            warn_expired: RateLimited::default(),
            warn_refused_login: RateLimited::default(),
            token_expiry: None,
            skip: 0,
        }
    }

    fn v5(&self) -> bool {
        self.proto.version() == Version::V5
    }

    /// The session's life: connect, serve, reconnect, until closed.
    pub(super) async fn run(mut self) {
        loop {
            if self.shared.closed.load(Ordering::Acquire) {
                break;
            }
            let lost = match self.open().await {
                Ok(conn) => match self.serve(conn).await {
                    Ok(Flow::Stop) => break,
                    Ok(Flow::Continue) => None,
                    Err(lost) => Some(lost),
                },
                Err(lost) => Some(lost),
            };
            if !self.connection_ended(lost).await {
                break;
            }
        }
        self.finish();
    }

    /// The credentials for the next CONNECT (fresh ones from a provider that makes them).
    async fn login(&mut self) -> Result<Option<(String, String)>, Lost> {
        let shared = Arc::clone(&self.shared);
        let Some(provider) = &shared.config.credentials else {
            return Ok(None);
        };
        match provider.credentials().await {
            Ok(c) => {
                self.renew_at = provider.expires_at().map(renewal_time);
                self.token_expiry = super::jwt::expiry(c.password.expose());
                Ok(Some((c.username, c.password.expose().to_owned())))
            }
            Err(reason) => Err(Lost::new(
                SessionError::Authentication {
                    username: shared.config.account_name.clone(),
                    reason: format!("no credentials: {reason}"),
                },
                false,
            )),
        }
    }

    /// Fetches credentials and opens a connection, up to its CONNACK.
    async fn open(&mut self) -> Result<Conn, Lost> {
        let shared = Arc::clone(&self.shared);
        let config = &shared.config;
        let login = self.login().await?;
        let timeout = config.connect_timeout.max(Duration::from_millis(100));
        let timed_out = || {
            Lost::new(
                SessionError::Timeout(format!(
                    "no answer from {} within the connect timeout of {:.0} s",
                    config.address(),
                    config.connect_timeout.as_secs_f64()
                )),
                false,
            )
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = tokio::time::timeout_at(deadline, transport::connect(config))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| Lost::new(e, false))?;
        let (rd, wr) = tokio::io::split(stream);
        let mut conn = Conn {
            rd,
            wr,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::new(),
            need_flush: false,
        };
        self.skip = 0;
        self.proto.connect(login, Instant::now());
        let hello = self.proto.take_output();
        let io = |e: std::io::Error| {
            let (error, hung_up) = transport::describe_io(config, &e);
            Lost::new(error, hung_up)
        };
        tokio::time::timeout_at(deadline, async {
            conn.wr.write_all(&hello).await?;
            conn.wr.flush().await
        })
        .await
        .map_err(|_| timed_out())?
        .map_err(io)?;
        loop {
            match self.proto.decode(&mut conn.rbuf) {
                Ok(Some(packet)) => {
                    let is_connack = matches!(packet, Packet::ConnAck(_));
                    self.proto
                        .handle(packet, Instant::now())
                        .map_err(|b| broken_error(&shared, b))?;
                    if is_connack {
                        break;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(Lost::new(
                        SessionError::Connect(format!(
                            "the broker at {} answered with something that is not MQTT: {e:?}",
                            config.address()
                        )),
                        false,
                    ))
                }
            }
            conn.rbuf.reserve(4096);
            let read = tokio::time::timeout_at(deadline, conn.rd.read_buf(&mut conn.rbuf))
                .await
                .map_err(|_| timed_out())?
                .map_err(io)?;
            if read == 0 {
                return Err(Lost::new(
                    SessionError::Connect(format!(
                        "the broker at {} closed the connection before answering CONNECT",
                        config.address()
                    )),
                    true,
                ));
            }
        }
        let now = Instant::now();
        let mut session_present = false;
        while let Some(output) = self.proto.poll_output() {
            match output {
                Output::Connected {
                    session_present: present,
                } => session_present = present,
                other => self.on_output(other, now),
            }
        }
        self.on_connected(session_present, now);
        Ok(conn)
    }

    fn on_connected(&mut self, session_present: bool, now: Instant) {
        let shared = Arc::clone(&self.shared);
        self.attempt = 0;
        self.shared
            .max_outgoing
            .store(self.proto.max_outgoing(), Ordering::Release);
        // Resent publishes count as sent now, for telling a refusal from a restart.
        for tag in self.proto.tags_mut() {
            tag.sent_at = now;
        }
        if !session_present {
            for filter in self.filters.values_mut() {
                filter.granted = false;
            }
        }
        // Whatever the broker does not hold is subscribed again, first thing on the connection.
        self.filters.retain(|_, f| f.granted);
        self.sync_filters(now, Vec::new());
        shared.connected.store(true, Ordering::Release);
        shared.outbox().online = true;
        log::info!(
            "connected to {} as {:?} (session present: {session_present})",
            shared.config.address(),
            shared.config.client_id,
        );
        shared.emit(Event::Connected { session_present });
        if let Some(first) = self.first.take() {
            let _ = first.send(Ok(()));
        }
    }

    /// After a connection ended (or failed to open): report it, and wait before the next attempt.
    /// False when the session ends.
    async fn connection_ended(&mut self, lost: Option<Lost>) -> bool {
        let shared = Arc::clone(&self.shared);
        let was_connected = shared.connected.swap(false, Ordering::AcqRel);
        shared.outbox().online = false;
        self.remove_acked(None);
        let (subscribes, unsubscribes) = self.proto.disconnected();
        for tag in unsubscribes {
            if let SubTag::Unsubscribe { done } = tag {
                drop(done); // the broker forgets it with the session, or gets it again
            }
        }
        let now = Instant::now();
        let recent_filters: Vec<String> = subscribes
            .iter()
            .filter_map(|t| match t {
                SubTag::Subscribe { filters, sent_at }
                    if now.duration_since(*sent_at) < refusal::WINDOW =>
                {
                    Some(filters.clone())
                }
                _ => None,
            })
            .flatten()
            .filter(|filter| !self.granted_before.contains(filter))
            .collect();
        // Unanswered subscriptions are sent again on the next connection.
        for tag in &subscribes {
            if let SubTag::Subscribe { filters, .. } = tag {
                for filter in filters {
                    self.filters.remove(filter);
                }
            }
        }
        if let Some(stalled) = self.stalled.take() {
            // Not acknowledged: the broker sends it again on a resumed session. What did go into
            // queues stays there.
            drop(stalled);
        }
        if shared.closed.load(Ordering::Acquire) {
            return false;
        }
        let Some(lost) = lost else {
            return true; // renewing credentials: straight back
        };
        if let Some(first) = self.first.take() {
            log::debug!("first connection failed: {}", lost.error);
            let _ = first.send(Err(lost.error));
            return false;
        }
        if was_connected {
            log::warn!(
                "disconnected from {}: {}",
                shared.config.address(),
                lost.error
            );
            shared.emit(Event::Disconnected {
                reason: lost.error.to_string(),
            });
            if lost.hung_up {
                self.attribute_refusal(&recent_filters, now);
            }
        } else if matches!(lost.error, SessionError::Authentication { .. }) {
            // Refused again and again while nothing else says why: one warning a while.
            let expired = self.token_expiry.is_some_and(|exp| {
                std::time::SystemTime::now()
                    .duration_since(std::time::SystemTime::UNIX_EPOCH)
                    .is_ok_and(|now| i64::try_from(now.as_secs()).unwrap_or(i64::MAX) >= exp)
            });
            let hint = if expired {
                "; the token has expired, and a token given as a string cannot be renewed: give \
                 cm.Auth.jwt a callable that returns a fresh one"
            } else {
                ""
            };
            self.warn_refused_login.warn(now, |n| {
                format!(
                    "reconnecting to {} was refused ({n} time(s)): {}{hint}",
                    shared.config.address(),
                    lost.error
                )
            });
        } else {
            log::debug!("connection attempt failed: {}", lost.error);
        }
        shared.config.reconnect.enabled && self.backoff().await
    }

    fn attribute_refusal(&mut self, recent_filters: &[String], now: Instant) {
        let recent_publish = self.proto.last_sent().and_then(|pkid| {
            self.proto
                .tag(pkid)
                .filter(|t| now.duration_since(t.sent_at) < refusal::WINDOW)
                .map(|t| (pkid, t.id, t.topic.clone()))
        });
        match self
            .refusals
            .hung_up(recent_filters, recent_publish.as_ref().map(|p| p.1))
        {
            Verdict::Nothing => {}
            Verdict::Suspect => log::info!(
                "the broker hung up right after a request it had not answered: sending it again to tell a refusal from a restart"
            ),
            Verdict::Filters(refused) => {
                for filter in refused {
                    let error = authorization(
                        &self.shared,
                        Action::Subscribe,
                        &filter,
                        "the broker closed the connection right after the SUBSCRIBE, three times, as Capture does",
                    );
                    self.refuse_filter(&filter, &error);
                }
            }
            Verdict::Publish(_) => {
                if let Some((pkid, _, topic)) = recent_publish {
                    let error = authorization(
                        &self.shared,
                        Action::Publish,
                        &topic,
                        "the broker closed the connection right after the PUBLISH, three times, as Capture \
                         does for a topic outside the account's scope (a broker also does it for a \
                         message over its packet size limit)",
                    );
                    if let Some(mut tag) = self.proto.forget(pkid) {
                        report_failure(tag.tx.take(), error);
                    }
                }
            }
        }
    }

    /// Fails the subscriptions that `filter` stands for: each gets the error as its last item.
    fn refuse_filter(&mut self, filter: &str, error: &SessionError) {
        self.filters.remove(filter);
        let refused: Vec<Arc<Route>> = {
            let mut routes = self.shared.routes();
            let (refused, kept): (Vec<_>, Vec<_>) = routes
                .drain(..)
                .partition(|r| r.filter == filter || self.stands_for(filter, &r.filter));
            *routes = kept;
            refused
        };
        // Reported once: by the exception of subscribe(), or as the subscription's last item.
        log::debug!("{error}");
        for route in refused {
            route.queue.push_control(Item::Error(error.clone()));
            route.queue.close();
            route.settle(RouteState::Failed(error.clone()));
        }
    }

    /// Whether the broker filter `broker` is what carries the subscription `filter`.
    fn stands_for(&self, broker: &str, filter: &str) -> bool {
        if self.v5() || broker.starts_with("$share/") || filter.starts_with("$share/") {
            return broker == filter;
        }
        topic::covers(broker, filter)
    }

    async fn backoff(&mut self) -> bool {
        let shared = Arc::clone(&self.shared);
        self.attempt += 1;
        let delay = shared
            .config
            .reconnect
            .delay(self.attempt, rand::random::<f64>());
        shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        log::info!(
            "reconnecting to {} in {:.2} s (attempt {})",
            shared.config.address(),
            delay.as_secs_f64(),
            self.attempt
        );
        shared.emit(Event::Reconnecting {
            attempt: self.attempt,
            delay,
        });
        tokio::select! {
            () = tokio::time::sleep(delay) => !shared.closed.load(Ordering::Acquire),
            () = shared.close_signal.notified() => false,
        }
    }

    /// The filters the routes need at the broker.
    fn desired_filters(&self) -> Vec<(String, u8)> {
        let routes = self.shared.routes();
        let mut wanted: Vec<(String, u8)> = Vec::new();
        for route in routes.iter() {
            match wanted.iter_mut().find(|(f, _)| *f == route.filter) {
                Some(existing) => existing.1 = existing.1.max(route.qos),
                None => wanted.push((route.filter.clone(), route.qos)),
            }
        }
        drop(routes);
        if self.v5() {
            wanted
        } else {
            topic::broker_filters(&wanted)
        }
    }

    /// Subscribes and unsubscribes at the broker so that it holds exactly the filters the routes
    /// need; routes that a granted filter already carries become active at once.
    fn sync_filters(&mut self, now: Instant, mut waiters: Vec<oneshot::Sender<()>>) {
        let desired = self.desired_filters();
        let connected = self.proto.is_connected();
        let added: Vec<(String, u8)> = desired
            .iter()
            .filter(|(f, q)| self.filters.get(f).is_none_or(|b| b.qos < *q))
            .cloned()
            .collect();
        let removed: Vec<String> = self
            .filters
            .keys()
            .filter(|f| !desired.iter().any(|(d, _)| d == *f))
            .cloned()
            .collect();
        if connected && !added.is_empty() {
            if self.v5() {
                for (filter, qos) in &added {
                    let id = self.shared.filter_id(filter);
                    self.proto.subscribe(
                        vec![(filter.clone(), *qos)],
                        Some(id),
                        SubTag::Subscribe {
                            filters: vec![filter.clone()],
                            sent_at: now,
                        },
                        now,
                    );
                }
            } else {
                self.proto.subscribe(
                    added.clone(),
                    None,
                    SubTag::Subscribe {
                        filters: added.iter().map(|(f, _)| f.clone()).collect(),
                        sent_at: now,
                    },
                    now,
                );
            }
            for (filter, qos) in &added {
                self.filters.insert(
                    filter.clone(),
                    BrokerFilter {
                        qos: *qos,
                        granted: false,
                    },
                );
            }
        }
        if !removed.is_empty() {
            for filter in &removed {
                self.filters.remove(filter);
            }
            if connected {
                // Whoever waits for the unsubscribe hears at its UNSUBACK: nothing more arrives.
                let done = std::mem::take(&mut waiters);
                self.proto
                    .unsubscribe(removed, SubTag::Unsubscribe { done }, now);
            }
        }
        for tx in waiters {
            let _ = tx.send(());
        }
        self.activate_covered();
    }

    /// Routes whose broker filter is granted become active.
    fn activate_covered(&self) {
        let granted: Vec<String> = self
            .filters
            .iter()
            .filter(|(_, b)| b.granted)
            .map(|(f, _)| f.clone())
            .collect();
        for route in self.shared.routes().iter() {
            if *route.state() == RouteState::Pending
                && granted.iter().any(|g| self.stands_for(g, &route.filter))
            {
                route.settle(RouteState::Active);
            }
        }
    }

    fn on_output(&mut self, output: Output<PubTag, SubTag>, now: Instant) {
        match output {
            Output::Connected { .. } => {}
            Output::Published(mut tag, result) => {
                let shared = &self.shared;
                let outcome = match result {
                    Ok(()) => {
                        if tag.qos > 0 {
                            shared.stats.acknowledged.fetch_add(1, Ordering::Relaxed);
                            self.refusals.answered_publish(tag.id);
                        }
                        Ok(())
                    }
                    Err(how) => Err(authorization(shared, Action::Publish, &tag.topic, &how)),
                };
                match outcome {
                    Ok(()) => {
                        if let Some(id) = tag.stored {
                            self.acked.push(id);
                            self.acked_since.get_or_insert(now);
                        }
                        if let Some(tx) = tag.tx.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Err(error) => report_failure(tag.tx.take(), error),
                }
            }
            Output::SubAck(tag, codes) => {
                let SubTag::Subscribe { filters, .. } = tag else {
                    return;
                };
                for (filter, code) in filters.iter().zip(codes) {
                    self.refusals.answered_filter(filter);
                    match code {
                        Ok(_) => {
                            if let Some(b) = self.filters.get_mut(filter) {
                                b.granted = true;
                            }
                            self.granted_before.insert(filter.clone());
                        }
                        Err(how) => {
                            let error =
                                authorization(&self.shared, Action::Subscribe, filter, &how);
                            self.refuse_filter(filter, &error);
                        }
                    }
                }
                self.activate_covered();
            }
            Output::UnsubAck(tag) => {
                if let SubTag::Unsubscribe { done } = tag {
                    for tx in done {
                        let _ = tx.send(());
                    }
                }
            }
            Output::Message(publish) => self.on_message(publish, now),
        }
    }

    /// The routes a message goes to: by MQTT 5 subscription identifier when the broker sent them,
    /// else every route whose filter matches the topic (under 3.1.1 the broker filters never
    /// overlap, so each message comes once and goes to each subscription once).
    fn targets(&self, publish: &Publish) -> Vec<Arc<Route>> {
        let routes = self.shared.routes();
        if publish.sub_ids.is_empty() {
            return routes
                .iter()
                .filter(|r| topic::matches(&r.filter, &publish.topic))
                .cloned()
                .collect();
        }
        let ids = self.shared.filter_ids();
        routes
            .iter()
            .filter(|r| {
                ids.get(&r.filter)
                    .is_some_and(|id| publish.sub_ids.contains(id))
            })
            .cloned()
            .collect()
    }

    fn on_message(&mut self, publish: Publish, now: Instant) {
        let shared = Arc::clone(&self.shared);
        shared.stats.received.fetch_add(1, Ordering::Relaxed);
        let targets = self.targets(&publish);
        if targets.is_empty() {
            let ours = self
                .filters
                .keys()
                .any(|f| topic::matches(f, &publish.topic));
            if !shared.config.clean_session && !ours {
                // A persistent session's message from before this process subscribed: it waits
                // for the first matching subscribe() (acknowledged: it is in a bounded buffer).
                if self.held.len() >= HOLD_LIMIT {
                    if let Some((_, old)) = self.held.pop_front() {
                        self.expire(&old, now, "the hold buffer is full");
                    }
                }
                shared.stats.held.fetch_add(1, Ordering::Relaxed);
                let (pkid, qos) = (publish.pkid, publish.qos);
                self.held.push_back((now, publish));
                if qos > 0 {
                    self.proto.release(pkid, now);
                }
                return;
            }
            shared.stats.unrouted.fetch_add(1, Ordering::Relaxed);
            let topic = publish.topic.clone();
            self.warn_unrouted.warn(now, |n| {
                format!("{n} message(s) matched no subscription and were dropped (the latest on {topic:?}); keep a subscription open for every filter the broker may still send")
            });
            if publish.qos > 0 {
                self.proto.release(publish.pkid, now);
            }
            return;
        }
        for route in &targets {
            // A subscription made just now: what was held for it comes before this message.
            self.hand_held(route);
        }
        let received_at = timestamp::now_nanos();
        let rest: VecDeque<(Arc<Route>, Item)> = targets
            .into_iter()
            .map(|route| {
                let item = decode_item(&route, &publish, received_at);
                (route, item)
            })
            .collect();
        let stalled = Stalled {
            pkid: publish.pkid,
            qos: publish.qos,
            rest,
        };
        self.deliver(stalled, now);
    }

    /// Puts a message into its queues; what a full `block` queue cannot take yet stays stalled
    /// (and reading stops) until the consumer makes room.
    fn deliver(&mut self, mut stalled: Stalled, now: Instant) {
        while let Some((route, item)) = stalled.rest.pop_front() {
            match route.queue.offer(item) {
                Offer::Queued | Offer::Closed => {}
                Offer::Dropped => {
                    let filter = route.filter.clone();
                    let policy = route.queue.overflow().name();
                    let capacity = route.queue.capacity();
                    self.warn_dropped.entry(route.id).or_default().warn(now, |n| {
                        format!(
                            "the subscription to {filter:?} dropped {n} message(s): its queue of {capacity} was full (overflow=\"{policy}\"); read faster, raise queue_size, or use overflow=\"block\""
                        )
                    });
                }
                Offer::Full(item) => {
                    stalled.rest.push_front((route, item));
                    self.stalled = Some(stalled);
                    self.proto.set_reading(false, now);
                    return;
                }
            }
        }
        if stalled.qos > 0 {
            self.proto.release(stalled.pkid, now);
        }
        if self.stalled.is_none() {
            self.proto.set_reading(true, now);
        }
    }

    fn expire(&mut self, publish: &Publish, now: Instant, why: &str) {
        self.shared.stats.unrouted.fetch_add(1, Ordering::Relaxed);
        let topic = publish.topic.clone();
        self.warn_expired.warn(now, |n| {
            format!("{n} message(s) of the persistent session matched no subscription ({why}; the latest on {topic:?}) and were dropped; declare subscriptions before connecting (connect=False, then connect()) to receive them")
        });
    }

    /// Messages held for a subscription that now exists go to it, in order.
    fn hand_held(&mut self, route: &Arc<Route>) {
        // Checked empty first: on the hot path (every routed message) nothing is held.
        if self.held.is_empty() || !self.handed.insert(route.id) {
            return;
        }
        let received_at = timestamp::now_nanos();
        let mut kept = VecDeque::with_capacity(self.held.len());
        for (at, publish) in self.held.drain(..) {
            if topic::matches(&route.filter, &publish.topic) {
                route
                    .queue
                    .push_unbounded(decode_item(route, &publish, received_at));
            } else {
                kept.push_back((at, publish));
            }
        }
        self.held = kept;
    }

    /// Takes in what the user asked for: subscriptions, unsubscriptions, publishes.
    fn pump(&mut self, conn: &mut Conn, now: Instant) {
        let controls: Vec<Control> = self.shared.control().drain(..).collect();
        let mut changed = false;
        let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
        for control in controls {
            match control {
                Control::Subscribe(route) => {
                    self.hand_held(&route);
                    changed = true;
                }
                Control::Unsubscribe(done) => {
                    waiting.push(done);
                    changed = true;
                }
            }
        }
        if changed {
            self.sync_filters(now, waiting);
        }
        if let Some(stalled) = self.stalled.take() {
            self.deliver(stalled, now);
        }
        if self.proto.is_connected() {
            self.take_publishes(conn, now);
        }
        while let Some(output) = self.proto.poll_output() {
            self.on_output(output, now);
        }
        // Closing: removed each turn, since the close may end the task before `finish` runs.
        let closing = self.shared.closed.load(Ordering::Acquire);
        self.remove_acked(if closing { None } else { Some(now) });
        while self
            .held
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= HOLD_GRACE)
        {
            if let Some((_, publish)) = self.held.pop_front() {
                self.expire(&publish, now, "none was made within 30 s");
            }
        }
    }

    fn take_publishes(&mut self, conn: &Conn, now: Instant) {
        let shared = Arc::clone(&self.shared);
        let mut took = 0usize;
        loop {
            // Taken in batches under the lock, encoded outside it, so that publishers are not
            // held up while the task encodes.
            let mut room = HIGH_WATER.saturating_sub(conn.wbuf.len() + self.proto.pending_output());
            let mut slots = self.proto.window_left();
            let batch: Vec<Pending> = {
                let mut outbox = shared.outbox();
                let mut batch = Vec::new();
                while room > 0 && batch.len() < 1024 {
                    let Some(front) = outbox.items.front() else {
                        break;
                    };
                    if front.qos > 0 {
                        if slots == 0 {
                            break;
                        }
                        slots -= 1;
                    }
                    room = room.saturating_sub(front.topic.len() + front.payload.len() + 8);
                    batch.extend(outbox.pop_front());
                }
                batch
            };
            if batch.is_empty() {
                break;
            }
            took += batch.len();
            for Pending {
                id,
                stored,
                topic,
                payload,
                qos,
                retain,
                tx,
            } in batch
            {
                let tag = PubTag {
                    id,
                    stored,
                    qos,
                    topic: topic.clone(),
                    sent_at: now,
                    tx,
                };
                let message = Outgoing {
                    topic,
                    payload,
                    qos,
                    retain,
                };
                match self.proto.publish(message, tag, now) {
                    Ok(_) => {
                        shared.stats.published.fetch_add(1, Ordering::Relaxed);
                    }
                    Err((too_large, mut tag)) => {
                        let error = super::too_large(&tag.topic, too_large.size, too_large.limit);
                        report_failure(tag.tx.take(), error);
                    }
                }
            }
        }
        if took > 0 {
            shared.space.notify_waiters();
        }
    }

    /// Handles what was read; stops at a message that cannot be queued yet.
    fn on_bytes(&mut self, conn: &mut Conn, now: Instant) -> Result<(), Lost> {
        if self.skip > 0 {
            let n = self.skip.min(conn.rbuf.len());
            conn.rbuf.advance(n);
            self.skip -= n;
        }
        while self.stalled.is_none() && self.skip == 0 {
            match self.proto.decode(&mut conn.rbuf) {
                Ok(Some(packet)) => {
                    self.proto
                        .handle(packet, now)
                        .map_err(|b| broken_error(&self.shared, b))?;
                    while let Some(output) = self.proto.poll_output() {
                        self.on_output(output, now);
                    }
                }
                Ok(None) => break,
                Err(DecodeError::TooLarge { frame, limit }) => {
                    self.shared.stats.oversize.fetch_add(1, Ordering::Relaxed);
                    self.warn_oversize.warn(now, |n| {
                        format!("{n} packet(s) from the broker were larger than max_packet_size ({limit} bytes; the latest {frame} bytes) and were dropped; raise max_packet_size to receive them")
                    });
                    let n = frame.min(conn.rbuf.len());
                    conn.rbuf.advance(n);
                    self.skip = frame - n;
                }
                Err(DecodeError::Malformed(what)) => {
                    return Err(Lost::new(
                        SessionError::Connect(format!(
                            "the broker at {} sent bytes that are not MQTT ({what})",
                            self.shared.config.address()
                        )),
                        false,
                    ))
                }
            }
        }
        Ok(())
    }

    /// Serves a connection until it breaks (`Err`), the session closes (`Stop`) or credentials
    /// are renewed (`Continue`).
    #[allow(clippy::too_many_lines)] // one select over every source of work
    async fn serve(&mut self, mut conn: Conn) -> Result<Flow, Lost> {
        let shared = Arc::clone(&self.shared);
        let mut closing: Option<Instant> = None;
        let mut said_goodbye = false;
        // Bytes read with the CONNACK.
        self.on_bytes(&mut conn, Instant::now())?;
        loop {
            let now = Instant::now();
            if closing.is_none() && shared.closed.load(Ordering::Acquire) {
                closing = Some(now + shared.close_grace() / 2);
            }
            self.pump(&mut conn, now);
            if self.stalled.is_none() && !conn.rbuf.is_empty() {
                // Reading resumed: packets read while it was paused come first.
                self.on_bytes(&mut conn, now)?;
            }
            if let Err(broken) = self.proto.tick(now) {
                return Err(broken_error(&shared, broken));
            }
            if let Some(deadline) = closing {
                let settled = shared.outbox().items.is_empty() && self.proto.in_flight() == 0;
                if !said_goodbye && (settled || now >= deadline) {
                    self.proto.disconnect(now);
                    said_goodbye = true;
                }
            }
            let out = self.proto.take_output();
            if conn.wbuf.is_empty() {
                conn.wbuf = out;
            } else if !out.is_empty() {
                conn.wbuf.extend_from_slice(&out);
            }
            if said_goodbye && conn.wbuf.is_empty() && !conn.need_flush {
                let _ = conn.wr.shutdown().await;
                return Ok(Flow::Stop);
            }
            let paused = self.stalled.is_some();
            let stall_space = self
                .stalled
                .as_ref()
                .and_then(|s| s.rest.front().map(|(r, _)| Arc::clone(r)));
            let deadline = [
                self.proto.next_deadline(),
                self.renew_at,
                self.held.front().map(|(at, _)| *at + HOLD_GRACE),
                self.acked_since.map(|at| at + REMOVE_DELAY),
                closing,
            ]
            .into_iter()
            .flatten()
            .min();
            if conn.rbuf.capacity() - conn.rbuf.len() < 16 * 1024 {
                conn.rbuf.reserve(64 * 1024);
            }
            let Conn {
                rd,
                wr,
                rbuf,
                wbuf,
                need_flush,
            } = &mut conn;
            let wake = tokio::select! {
                biased;
                () = shared.close_signal.notified(), if closing.is_none() => Wake::Close,
                io = async {
                    if wbuf.is_empty() {
                        Wake::Flushed(wr.flush().await)
                    } else {
                        Wake::Wrote(wr.write(wbuf).await)
                    }
                }, if !wbuf.is_empty() || *need_flush => io,
                read = rd.read_buf(rbuf), if !paused => Wake::Read(read),
                () = shared.wake.notified() => Wake::Work,
                () = async { match &stall_space { Some(route) => route.queue.space().await, None => std::future::pending().await } }, if paused => Wake::Work,
                () = sleep_until(deadline) => Wake::Timer,
            };
            let io_lost = |e: &std::io::Error| {
                let (error, hung_up) = transport::describe_io(&shared.config, e);
                Lost::new(error, hung_up)
            };
            match wake {
                Wake::Close => closing = Some(Instant::now() + shared.close_grace() / 2),
                Wake::Work => {}
                Wake::Wrote(Ok(0)) => {
                    return Err(Lost::new(
                        SessionError::Connect(format!(
                            "the connection to {} closed while writing",
                            shared.config.address()
                        )),
                        true,
                    ))
                }
                Wake::Wrote(Ok(n)) => {
                    conn.wbuf.advance(n);
                    if conn.wbuf.is_empty() {
                        conn.need_flush = true;
                    }
                }
                Wake::Flushed(Ok(())) => conn.need_flush = false,
                Wake::Wrote(Err(e)) | Wake::Flushed(Err(e)) | Wake::Read(Err(e)) => {
                    return Err(io_lost(&e))
                }
                Wake::Read(Ok(0)) => {
                    if said_goodbye {
                        return Ok(Flow::Stop);
                    }
                    return Err(Lost::new(
                        SessionError::Connect(format!(
                            "the broker at {} closed the connection",
                            shared.config.address()
                        )),
                        true,
                    ));
                }
                Wake::Read(Ok(_)) => self.on_bytes(&mut conn, Instant::now())?,
                Wake::Timer => {
                    let now = Instant::now();
                    if self.renew_at.is_some_and(|at| now >= at) && closing.is_none() {
                        self.renew_at = None;
                        log::info!(
                            "the token of {:?} expires soon: reconnecting with a fresh one",
                            shared.config.account_name
                        );
                        self.proto.disconnect(now);
                        let bye = self.proto.take_output();
                        let _ = tokio::time::timeout(Duration::from_secs(1), async {
                            conn.wr.write_all(&conn.wbuf).await?;
                            conn.wr.write_all(&bye).await?;
                            conn.wr.flush().await
                        })
                        .await;
                        shared.emit(Event::Disconnected {
                            reason: "renewing the token before it expires".to_owned(),
                        });
                        return Ok(Flow::Continue);
                    }
                    if closing.is_some_and(|at| now >= at) && said_goodbye {
                        return Ok(Flow::Stop);
                    }
                }
            }
        }
    }

    /// Removes the durable-outbox records acknowledged so far, in one transaction, when enough wait
    /// or waited long enough (`None`: now, whatever waits).
    fn remove_acked(&mut self, now: Option<Instant>) {
        let Some(since) = self.acked_since else {
            return;
        };
        if let Some(now) = now {
            if self.acked.len() < REMOVE_BATCH && now.duration_since(since) < REMOVE_DELAY {
                return;
            }
        }
        if let Some(durable) = &self.shared.config.durable {
            // A failure is the outbox's to report (once) and to retry.
            let _ = durable.remove(&self.acked);
            self.shared.space.notify_waiters();
        }
        self.acked.clear();
        self.acked_since = None;
    }

    /// The session ends: queues end, waiting publishes fail, `Closed` is the last event.
    fn finish(&mut self) {
        self.remove_acked(None);
        for mut tag in self.proto.abandon() {
            if let Some(tx) = tag.tx.take() {
                let _ = tx.send(Err(SessionError::Closed));
            }
        }
        super::finish(&self.shared);
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        // Aborted (close() ran out of time): what is still in flight fails as closed.
        if !self.shared.events.is_closed() {
            self.finish();
        }
    }
}

/// Hands a failed publish's error to whoever waits for it: a failure is reported once, by that
/// exception (with the detail at DEBUG); only when nobody waits for it any more is it a WARNING.
fn report_failure(tx: Option<oneshot::Sender<Result<(), SessionError>>>, error: SessionError) {
    log::debug!("{error}");
    let unheard = match tx {
        Some(tx) => tx.send(Err(error)).err().and_then(Result::err),
        None => Some(error),
    };
    if let Some(error) = unheard {
        log::warn!("{error} (nobody waited for this publish's outcome)");
    }
}
