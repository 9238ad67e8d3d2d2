//! The task that polls rumqttc's event loop: connecting, routing, acknowledgements, reconnecting.

use super::link::{Link, LinkRequest, NetEvent};
use super::{
    Ack, Action, Book, Decode, Event, InFlight, Item, Message, Overflow, Route, RouteState, Sent,
    SessionError, Shared,
};
use crate::payload;
use crate::timestamp;
use crate::topic;
use bytes::Bytes;
use rumqttc::Outgoing;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How soon after a SUBSCRIBE or PUBLISH a dropped connection counts as Capture's way of refusing it.
const REFUSAL_WINDOW: Duration = Duration::from_secs(2);
/// Hang-ups right after the same request that make it a refusal. Two were not enough: a broker
/// restarted twice in quick succession hung up right after the same stalled publish.
const REFUSAL_STRIKES: u32 = 3;

/// Resolves and removes the acknowledgement waiter of publish `id`.
fn complete(book: &mut Book, id: u64, result: Result<(), SessionError>) {
    if let Some(tx) = book.acks.remove(&id) {
        let _ = tx.send(result);
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

/// Refuses the subscriptions to `filter`: each gets the error as its last item, and none is sent again.
fn refuse_filter(shared: &Shared, filter: &str, error: &SessionError) {
    let refused: Vec<Arc<Route>> = {
        let mut routes = shared.routes();
        let (refused, kept): (Vec<_>, Vec<_>) = routes.drain(..).partition(|r| r.filter == filter);
        *routes = kept;
        refused
    };
    for route in refused {
        log::warn!("{error}");
        route.queue.push_control(Item::Error(error.clone()));
        route.queue.close();
        route.settle(RouteState::Failed(error.clone()));
    }
}

/// A message as it came off the wire.
struct Incoming {
    topic: String,
    payload: Bytes,
    qos: u8,
    retain: bool,
    pkid: u16,
    sub_ids: Vec<usize>,
}

fn decode(route: &Route, publish: &Incoming, received_at: i64, ack: Option<&Arc<Ack>>) -> Item {
    let message = || Message {
        topic: publish.topic.clone(),
        payload: publish.payload.clone(),
        qos: publish.qos,
        retain: publish.retain,
        received_at,
        ack: ack.cloned(),
    };
    let malformed = |reason: String| {
        route
            .queue
            .counters
            .malformed
            .fetch_add(1, Ordering::Relaxed);
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
                ack: ack.cloned(),
            },
            Err(err) => malformed(err.message),
        },
        Decode::Command => match payload::parse_command(&publish.topic, &publish.payload) {
            Ok(command) => Item::Command {
                command,
                raw: publish.payload.clone(),
                ack: ack.cloned(),
            },
            Err(err) => malformed(err.message),
        },
    }
}

/// The routes a message goes to: by MQTT 5 subscription identifier when the broker sent them, else
/// by matching the topic against every filter.
fn targets(shared: &Shared, publish: &Incoming) -> Vec<Arc<Route>> {
    let routes = shared.routes();
    if publish.sub_ids.is_empty() {
        return routes
            .iter()
            .filter(|r| topic::matches(&r.filter, &publish.topic))
            .cloned()
            .collect();
    }
    let ids = shared
        .filter_ids
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    routes
        .iter()
        .filter(|r| {
            ids.get(&r.filter)
                .is_some_and(|id| publish.sub_ids.contains(id))
        })
        .cloned()
        .collect()
}

/// How many copies an MQTT 3.1.1 broker sends of a message on `topic`: one per distinct matching
/// filter (Mosquitto does so; shared subscriptions are left out, as the broker may not pick us).
fn expected_copies(routes: &[Arc<Route>]) -> usize {
    let mut filters: Vec<&str> = routes
        .iter()
        .map(|r| r.filter.as_str())
        .filter(|f| !f.starts_with("$share/"))
        .collect();
    filters.sort_unstable();
    filters.dedup();
    filters.len()
}

async fn route_publish(
    shared: &Shared,
    publish: Incoming,
    copies: &mut Option<(String, Bytes, usize)>,
) {
    shared.stats.received.fetch_add(1, Ordering::Relaxed);
    let ack = (publish.qos > 0).then(|| {
        Arc::new(Ack {
            client: shared.client.clone(),
            pkid: publish.pkid,
            qos: publish.qos,
            generation: shared.generation.load(Ordering::Acquire),
            current: Arc::clone(&shared.generation),
        })
    });
    // Under MQTT 3.1.1 overlapping subscriptions bring one copy per filter: the first goes to every
    // matching route, the next identical ones are dropped (counted).
    if let Some((topic, payload, left)) = copies.as_mut() {
        if *left > 0 && *topic == publish.topic && *payload == publish.payload {
            *left -= 1;
            shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    *copies = None;
    let targets = targets(shared, &publish);
    if targets.is_empty() {
        shared.stats.unrouted.fetch_add(1, Ordering::Relaxed);
        log::debug!("message on {:?} matches no subscription", publish.topic);
        return;
    }
    if publish.sub_ids.is_empty() {
        let expected = expected_copies(&targets);
        if expected > 1 {
            *copies = Some((publish.topic.clone(), publish.payload.clone(), expected - 1));
        }
    }
    let received_at = timestamp::now_nanos();
    for route in targets {
        let item = decode(&route, &publish, received_at, ack.as_ref());
        if route.queue.overflow() == Overflow::Block && ack.is_some() {
            // Acknowledged when the consumer takes it, so the broker holds back the rest (its
            // in-flight window: MQTT 5's receive maximum, or the broker's setting under 3.1.1). The
            // item is queued without waiting, so that the connection keeps being served (pings).
            route.queue.push_unbounded(item);
        } else {
            route.queue.push(item).await;
        }
    }
}

fn on_outgoing(shared: &Shared, outgoing: &Outgoing) {
    let mut book = shared.book();
    match outgoing {
        Outgoing::Publish(pkid) | Outgoing::AwaitAck(pkid) => {
            let pkid = *pkid;
            let awaiting = matches!(outgoing, Outgoing::AwaitAck(_));
            if pkid != 0 {
                if let Some(front) = book.inflight.get_mut(&pkid).and_then(|q| q.front_mut()) {
                    let sent = (Instant::now(), front.id, front.topic.clone());
                    if !front.on_wire {
                        front.on_wire = !awaiting;
                        book.last_publish = Some(sent);
                        return;
                    }
                    if !awaiting {
                        // A retransmission of a publish already on the wire (after a reconnect).
                        book.last_publish = Some(sent);
                        return;
                    }
                }
            }
            match book.fifo.pop_front() {
                Some(Sent::Publish {
                    id,
                    qos,
                    topic,
                    permit,
                }) => {
                    shared.stats.published.fetch_add(1, Ordering::Relaxed);
                    book.last_publish = Some((Instant::now(), id, topic.clone()));
                    if qos == 0 {
                        complete(&mut book, id, Ok(()));
                    } else {
                        book.inflight.entry(pkid).or_default().push_back(InFlight {
                            id,
                            topic,
                            on_wire: !awaiting,
                            _permit: permit,
                        });
                    }
                }
                other => log::error!(
                    "request bookkeeping is out of step: publish {pkid} matched {other:?}"
                ),
            }
        }
        Outgoing::Subscribe(pkid) => match book.fifo.pop_front() {
            Some(Sent::Subscribe { filters }) => {
                book.subscribes.insert(*pkid, (filters, Instant::now()));
            }
            other => log::error!(
                "request bookkeeping is out of step: subscribe {pkid} matched {other:?}"
            ),
        },
        Outgoing::Unsubscribe(pkid) => {
            if let Some(Sent::Unsubscribe { done }) = book.fifo.pop_front() {
                book.unsubscribes.insert(*pkid, done);
            }
        }
        Outgoing::Disconnect => {
            book.fifo.pop_front();
        }
        _ => {}
    }
}

/// A publish's acknowledgement: PUBACK, PUBCOMP, or an MQTT 5 refusal (`refused`).
fn on_acked(shared: &Shared, pkid: u16, refused: Option<String>) {
    let mut book = shared.book();
    let done = book.inflight.get_mut(&pkid).and_then(VecDeque::pop_front);
    if book.inflight.get(&pkid).is_some_and(VecDeque::is_empty) {
        book.inflight.remove(&pkid);
    }
    let Some(done) = done else {
        return;
    };
    if book.suspect_publish.is_some_and(|(id, _)| id == done.id) {
        book.suspect_publish = None;
    }
    match refused {
        None => {
            shared.stats.acknowledged.fetch_add(1, Ordering::Relaxed);
            complete(&mut book, done.id, Ok(()));
        }
        Some(how) => {
            let error = authorization(shared, Action::Publish, &done.topic, &how);
            log::warn!("{error}");
            complete(&mut book, done.id, Err(error));
        }
    }
}

fn on_suback(shared: &Shared, pkid: u16, codes: &[Option<String>]) {
    let Some((filters, _)) = shared.book().subscribes.remove(&pkid) else {
        return;
    };
    for (filter, code) in filters.iter().zip(codes) {
        match code {
            None => {
                shared.book().suspect_filters.remove(filter);
                for route in shared.routes().iter().filter(|r| &r.filter == filter) {
                    if *route.state() == RouteState::Pending {
                        route.settle(RouteState::Active);
                    }
                }
            }
            Some(how) => {
                let error = authorization(shared, Action::Subscribe, filter, how);
                refuse_filter(shared, filter, &error);
            }
        }
    }
}

/// After the broker hung up: was it refusing a subscribe or publish sent just before?
fn attribute_refusal(shared: &Shared, carried: &mut VecDeque<LinkRequest>) {
    // Capture refuses by hanging up, but so does a broker that restarts. A refusal repeats: the
    // first hang-ups right after an unanswered request only make it a suspect, and it is sent again;
    // the third hang-up right after the same request is the refusal.
    let now = Instant::now();
    let recent_subscribes: Vec<String> = {
        let book = shared.book();
        book.subscribes
            .values()
            .filter(|(_, at)| now.duration_since(*at) < REFUSAL_WINDOW)
            .flat_map(|(filters, _)| filters.clone())
            .collect()
    };
    if !recent_subscribes.is_empty() {
        let refused: Vec<String> = {
            let mut book = shared.book();
            let mut refused = Vec::new();
            let mut suspects = std::collections::HashMap::new();
            for filter in &recent_subscribes {
                let strikes = book.suspect_filters.get(filter).copied().unwrap_or(0) + 1;
                if strikes >= REFUSAL_STRIKES {
                    refused.push(filter.clone());
                } else {
                    suspects.insert(filter.clone(), strikes);
                }
            }
            book.suspect_filters = suspects;
            refused
        };
        if refused.is_empty() {
            log::info!("the broker hung up right after subscribing to {recent_subscribes:?}: sending it again to tell a refusal from a restart");
        }
        for filter in refused {
            let error = authorization(
                shared,
                Action::Subscribe,
                &filter,
                "the broker closed the connection right after the SUBSCRIBE, three times, as Capture does",
            );
            refuse_filter(shared, &filter, &error);
        }
        return;
    }
    let mut book = shared.book();
    let Some((at, id, topic)) = book.last_publish.take() else {
        return;
    };
    let unanswered = book.inflight.values().any(|q| q.iter().any(|f| f.id == id));
    if now.duration_since(at) >= REFUSAL_WINDOW || !unanswered {
        return;
    }
    let strikes = match book.suspect_publish {
        Some((suspect, strikes)) if suspect == id => strikes + 1,
        _ => 1,
    };
    if strikes < REFUSAL_STRIKES {
        log::info!("the broker hung up right after a publish to {topic:?}: sending it again to tell a refusal from a restart");
        book.suspect_publish = Some((id, strikes));
        return;
    }
    book.suspect_publish = None;
    let error = authorization(
        shared,
        Action::Publish,
        &topic,
        "the broker closed the connection right after the PUBLISH, three times, as Capture does",
    );
    log::warn!("{error}");
    // Do not send it again: the same refusal would follow.
    let mut pkid_of = None;
    for (pkid, queue) in &mut book.inflight {
        if let Some(pos) = queue.iter().position(|f| f.id == id) {
            queue.remove(pos);
            pkid_of = Some(*pkid);
        }
    }
    if let Some(pkid) = pkid_of {
        carried.retain(|r| r.publish_pkid() != Some(pkid));
    }
    complete(&mut book, id, Err(error));
}

/// After a CONNACK: which requests go out again, and re-subscribing what the broker does not have.
fn requeue(
    shared: &Shared,
    link: &mut Link,
    mut carried: VecDeque<LinkRequest>,
    session_present: bool,
) {
    if !session_present {
        // PUBREL of a QoS 2 publish the broker already has (it sent PUBREC): the new session knows
        // nothing of it, so it is done.
        carried.retain(|r| {
            let Some(pkid) = r.pubrel_pkid() else {
                return true;
            };
            let mut book = shared.book();
            if let Some(done) = book.inflight.get_mut(&pkid).and_then(VecDeque::pop_front) {
                complete(&mut book, done.id, Ok(()));
            }
            false
        });
    }
    // A kept session still has the granted subscriptions; the others (all of them on a new session)
    // are sent again, first thing on the connection.
    let mut filters: Vec<(String, u8, usize)> = Vec::new();
    for route in shared.routes().iter() {
        let wanted = !session_present || *route.state() == RouteState::Pending;
        if wanted && !filters.iter().any(|(f, _, _)| *f == route.filter) {
            filters.push((
                route.filter.clone(),
                route.qos,
                shared.filter_id(&route.filter),
            ));
        }
    }
    if !filters.is_empty() {
        log::debug!(
            "subscribing to {} filter(s) after connecting",
            filters.len()
        );
        let requests = link.subscribe_requests(&filters);
        let mut book = shared.book();
        for (request, names) in requests.into_iter().rev() {
            book.fifo.push_front(Sent::Subscribe { filters: names });
            carried.push_front(request);
        }
    }
    link.set_pending(carried);
}

fn refresh_credentials_error(shared: &Shared, reason: &str) -> SessionError {
    SessionError::Authentication {
        username: shared.config.account_name.clone(),
        reason: format!("no credentials: {reason}"),
    }
}

fn on_connack(
    shared: &Shared,
    link: &mut Link,
    carried: VecDeque<LinkRequest>,
    session_present: bool,
    first: Option<oneshot::Sender<Result<(), SessionError>>>,
) {
    requeue(shared, link, carried, session_present);
    shared.connected.store(true, Ordering::Release);
    // What was published offline goes out first (by the flusher), then publishes go straight out.
    {
        let mut book = shared.book();
        if book.outbox.is_empty() {
            book.online = true;
        }
    }
    shared.flush_signal.notify_one();
    log::info!(
        "connected to {} as {:?} (session present: {session_present})",
        shared.config.address(),
        shared.config.client_id,
    );
    shared.emit(Event::Connected { session_present });
    if let Some(first) = first {
        let _ = first.send(Ok(()));
    }
}

/// What to do after a step of the session's loop.
enum Step {
    Go,
    Retry,
    Stop,
}

/// The state of the session's task between polls.
struct Driver {
    shared: Arc<Shared>,
    link: Link,
    first: Option<oneshot::Sender<Result<(), SessionError>>>,
    attempt: u32,
    /// Requests kept from the last connection, sent again on the next one.
    carried: VecDeque<LinkRequest>,
    /// The next poll opens a connection: on the first one, and after every error.
    connecting: bool,
    /// When the credentials in use run out (a JWT's `exp`): reconnect with fresh ones before that.
    renew_at: Option<tokio::time::Instant>,
    /// The last message and how many more identical copies of it to drop (MQTT 3.1.1 overlaps).
    copies: Option<(String, Bytes, usize)>,
    /// A keepalive ping went out: the broker must answer by then. rumqttc alone notices a silent
    /// broker only at the next ping, up to two keepalives later; this makes it half of one.
    ping_deadline: Option<tokio::time::Instant>,
}

impl Driver {
    /// Books what rumqttc still held from the connection that ended, so that its request order
    /// stays in step with ours. Its QoS 1/2 messages are left out: unacknowledged, the broker sends
    /// them again (an acknowledgement now would go out on the next connection).
    async fn book_leftovers(&mut self) {
        for event in self.link.take_buffered() {
            match event {
                NetEvent::Publish { qos, .. } if qos > 0 => {}
                NetEvent::ConnAck { .. } => {}
                other => {
                    self.on_event(other).await;
                }
            }
        }
    }

    /// Before a connection attempt: keep what is pending, and fetch credentials.
    async fn prepare(&mut self) -> Step {
        if self.shared.closed.load(Ordering::Acquire) {
            return Step::Stop;
        }
        self.book_leftovers().await;
        self.carried.extend(self.link.take_pending());
        let Some(provider) = &self.shared.config.credentials else {
            return Step::Go;
        };
        match provider.credentials().await {
            Ok(credentials) => {
                self.link
                    .set_credentials(credentials.username, credentials.password.expose());
                self.renew_at = provider.expires_at().map(renewal_time);
                Step::Go
            }
            Err(reason) => {
                let error = refresh_credentials_error(&self.shared, &reason);
                if let Some(first) = self.first.take() {
                    let _ = first.send(Err(error));
                    return Step::Stop;
                }
                log::warn!("{error}");
                if backoff(&self.shared, &mut self.attempt).await {
                    Step::Retry
                } else {
                    Step::Stop
                }
            }
        }
    }

    /// Drops the connection to log in again with fresh credentials.
    fn renew(&mut self) {
        log::info!(
            "the token of {:?} expires soon: reconnecting with a fresh one",
            self.shared.config.account_name
        );
        self.renew_at = None;
        self.link.drop_connection();
        self.shared.connected.store(false, Ordering::Release);
        self.shared.book().online = false;
        self.shared.emit(Event::Disconnected {
            reason: "renewing the token before it expires".to_owned(),
        });
        self.carried.extend(self.link.take_pending());
        self.connecting = true;
    }

    /// Handles one event; false when the session ends.
    async fn on_event(&mut self, event: NetEvent) -> bool {
        let shared = &self.shared;
        match &event {
            NetEvent::Outgoing(Outgoing::PingReq) => {
                self.ping_deadline =
                    Some(tokio::time::Instant::now() + shared.config.keepalive / 2);
            }
            NetEvent::Outgoing(_) => {}
            // Anything from the broker shows it is alive.
            _ => self.ping_deadline = None,
        }
        match event {
            NetEvent::ConnAck { session_present } => {
                self.connecting = false;
                self.attempt = 0;
                self.copies = None;
                shared.generation.fetch_add(1, Ordering::AcqRel);
                let carried = std::mem::take(&mut self.carried);
                on_connack(
                    shared,
                    &mut self.link,
                    carried,
                    session_present,
                    self.first.take(),
                );
            }
            NetEvent::Publish {
                topic,
                payload,
                qos,
                retain,
                pkid,
                sub_ids,
            } => {
                let incoming = Incoming {
                    topic,
                    payload,
                    qos,
                    retain,
                    pkid,
                    sub_ids,
                };
                route_publish(shared, incoming, &mut self.copies).await;
            }
            NetEvent::Acked { pkid, refused } => on_acked(shared, pkid, refused),
            NetEvent::Refused { pkid, reason } => on_acked(shared, pkid, Some(reason)),
            NetEvent::SubAck { pkid, codes } => on_suback(shared, pkid, &codes),
            NetEvent::UnsubAck { pkid } => {
                if let Some(done) = shared.book().unsubscribes.remove(&pkid) {
                    let _ = done.send(());
                }
            }
            NetEvent::Outgoing(outgoing) => {
                on_outgoing(shared, &outgoing);
                if outgoing == Outgoing::Disconnect && shared.closed.load(Ordering::Acquire) {
                    return false;
                }
            }
            NetEvent::Other => {}
        }
        true
    }

    /// Handles a broken or refused connection; false when the session ends.
    async fn on_error(&mut self, error: SessionError, hung_up: bool) -> bool {
        self.connecting = true;
        self.ping_deadline = None;
        let shared = &self.shared;
        let was_connected = shared.connected.swap(false, Ordering::AcqRel);
        shared.book().online = false;
        if shared.closed.load(Ordering::Acquire) {
            return false;
        }
        self.carried.extend(self.link.take_pending());
        if let Some(first) = self.first.take() {
            log::debug!("first connection failed: {error}");
            let _ = first.send(Err(error));
            return false;
        }
        if was_connected {
            log::warn!("disconnected from {}: {error}", shared.config.address());
            shared.emit(Event::Disconnected {
                reason: error.to_string(),
            });
            if hung_up {
                attribute_refusal(shared, &mut self.carried);
            }
        }
        shared.config.reconnect.enabled && backoff(shared, &mut self.attempt).await
    }
}

/// Why the session's task woke up.
enum Wake<T> {
    Polled(T),
    Renew,
    PingUnanswered,
}

/// The session's task. Reports the first connection's outcome through `first`, then keeps the
/// connection up until closed.
pub(super) async fn run(
    shared: Arc<Shared>,
    link: Link,
    first: oneshot::Sender<Result<(), SessionError>>,
) {
    let mut driver = Driver {
        shared: Arc::clone(&shared),
        link,
        first: Some(first),
        attempt: 0,
        carried: VecDeque::new(),
        connecting: true,
        renew_at: None,
        copies: None,
        ping_deadline: None,
    };
    loop {
        if driver.connecting {
            match driver.prepare().await {
                Step::Go => {}
                Step::Retry => continue,
                Step::Stop => break,
            }
        }
        let renew = driver.renew_at.filter(|_| !driver.connecting);
        let ping = driver.ping_deadline.filter(|_| !driver.connecting);
        // In this order: what the broker already sent is read before a ping deadline can fire.
        let wake = tokio::select! {
            biased;
            () = shared.close_signal.notified() => break,
            polled = driver.link.poll(&shared.config, &shared.config.account_name) => Wake::Polled(polled),
            () = sleep_until_some(renew) => Wake::Renew,
            () = sleep_until_some(ping) => Wake::PingUnanswered,
        };
        let keep_going = match wake {
            Wake::Renew => {
                driver.renew();
                true
            }
            Wake::PingUnanswered => {
                driver.ping_deadline = None;
                driver.link.drop_connection();
                let error = SessionError::Connect(format!(
                    "the broker at {} stopped answering (no reply to a keepalive ping within {:.1} s)",
                    shared.config.address(),
                    (shared.config.keepalive / 2).as_secs_f64()
                ));
                driver.on_error(error, false).await
            }
            Wake::Polled(Ok(event)) => driver.on_event(event).await,
            Wake::Polled(Err((error, hung_up))) => driver.on_error(error, hung_up).await,
        };
        if !keep_going {
            break;
        }
    }
    finish(&shared);
}

/// When to renew credentials that expire at `exp` (seconds since the epoch): a minute before, or
/// halfway through what is left when that is shorter.
fn renewal_time(exp: i64) -> tokio::time::Instant {
    let left = exp
        .saturating_sub(timestamp::now_nanos() / timestamp::NANOS_PER_SEC)
        .max(0);
    let lead = 60.min(left / 2);
    let wait = u64::try_from(left - lead).unwrap_or(0);
    tokio::time::Instant::now() + Duration::from_secs(wait.max(1))
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Waits before the next attempt; false when the session was closed meanwhile.
async fn backoff(shared: &Shared, attempt: &mut u32) -> bool {
    *attempt += 1;
    let delay = shared
        .config
        .reconnect
        .delay(*attempt, rand::random::<f64>());
    shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
    log::info!(
        "reconnecting to {} in {:.2} s (attempt {attempt})",
        shared.config.address(),
        delay.as_secs_f64()
    );
    shared.emit(Event::Reconnecting {
        attempt: *attempt,
        delay,
    });
    tokio::select! {
        () = tokio::time::sleep(delay) => !shared.closed.load(Ordering::Acquire),
        () = shared.close_signal.notified() => false,
    }
}

/// Marks the session closed: queues end, waiting publishes fail, a `Closed` event is the last.
pub(super) fn finish(shared: &Shared) {
    shared.closed.store(true, Ordering::Release);
    shared.connected.store(false, Ordering::Release);
    let routes: Vec<Arc<Route>> = shared.routes().drain(..).collect();
    for route in routes {
        route.queue.close();
        route.settle(RouteState::Closed);
    }
    let mut book = shared.book();
    for (_, tx) in book.acks.drain() {
        let _ = tx.send(Err(SessionError::Closed));
    }
    book.inflight.clear();
    book.fifo.clear();
    book.outbox.clear();
    book.online = false;
    drop(book);
    shared.outbox_space.notify_waiters();
    shared.flush_signal.notify_one();
    shared.window.close();
    if !shared.events.is_closed() {
        log::debug!("session with {} closed", shared.config.address());
        shared.emit(Event::Closed);
        shared.events.close();
    }
}
