//! The task that polls rumqttc's event loop: connecting, routing, acknowledgements, reconnecting.

use super::{
    qos_of, tls, Action, Book, Decode, Event, InFlight, Item, Message, Route, RouteState, Sent,
    SessionConfig, SessionError, Shared, Transport,
};
use crate::payload;
use crate::timestamp;
use crate::topic;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, EventLoop, Incoming, MqttOptions, Outgoing,
    Publish, Request, StateError, SubscribeFilter, SubscribeReasonCode, TlsConfiguration,
};
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How soon after a SUBSCRIBE or PUBLISH a dropped connection counts as Capture's way of refusing it.
const REFUSAL_WINDOW: Duration = Duration::from_secs(2);

/// Capacity of rumqttc's request channel: callers wait (backpressure) when it is full.
const REQUEST_CHANNEL: usize = 1024;

/// Builds rumqttc's options, transport and event loop for `config`.
pub(super) fn build(config: &SessionConfig) -> Result<(AsyncClient, EventLoop), SessionError> {
    // rumqttc reads the WebSocket path from the host when it is a full URL; it drops it otherwise.
    let host = if config.transport.is_websocket() {
        config.address()
    } else {
        config.host.clone()
    };
    let mut options = MqttOptions::new(config.client_id.clone(), host, config.port);
    options.set_keep_alive(config.keepalive.max(Duration::from_secs(1)));
    options.set_clean_session(config.clean_session);
    options.set_max_packet_size(config.max_packet_size, config.max_packet_size);
    options.set_inflight(config.inflight.max(1));
    options.set_request_channel_capacity(REQUEST_CHANNEL);
    let transport = match config.transport {
        Transport::Mqtt => rumqttc::Transport::Tcp,
        Transport::Ws => rumqttc::Transport::Ws,
        Transport::Mqtts | Transport::Wss => {
            let tls = tls::client_config(&config.tls).map_err(SessionError::Connect)?;
            let tls = TlsConfiguration::Rustls(Arc::new(tls));
            if config.transport == Transport::Mqtts {
                rumqttc::Transport::tls_with_config(tls)
            } else {
                rumqttc::Transport::wss_with_config(tls)
            }
        }
    };
    options.set_transport(transport);
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL);
    let mut network = eventloop.network_options();
    network.set_connection_timeout(config.connect_timeout.as_secs().max(1));
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    Ok((client, eventloop))
}

/// What a connection error means for the user, and whether the broker hung up on us.
fn describe(config: &SessionConfig, err: &ConnectionError, username: &str) -> (SessionError, bool) {
    let address = config.address();
    let io = |e: &std::io::Error| -> (SessionError, bool) {
        match e.kind() {
            ErrorKind::ConnectionRefused => (
                SessionError::Connect(format!(
                    "connection refused by {address}: is the broker running, and are the host, port and transport right?"
                )),
                false,
            ),
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                (SessionError::Connect(format!("the broker at {address} closed the connection ({e})")), true)
            }
            _ if e.to_string().contains("lookup") || e.to_string().contains("resolve") => (
                SessionError::Connect(format!("the host name {:?} could not be resolved (DNS): {e}", config.host)),
                false,
            ),
            _ => {
                let text = e.to_string();
                if text.contains("certificate") || text.contains("Certificate") || text.contains("TLS") {
                    (SessionError::Connect(format!("TLS with {address} failed: {text}")), false)
                } else {
                    (SessionError::Connect(format!("connection to {address} failed: {text}")), false)
                }
            }
        }
    };
    match err {
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => (
                SessionError::Authentication {
                    username: username.to_owned(),
                    reason: if *code == ConnectReturnCode::NotAuthorized {
                        "not authorized".to_owned()
                    } else {
                        "bad username or password".to_owned()
                    },
                },
                false,
            ),
            other => (
                SessionError::Connect(format!(
                    "the broker at {address} refused the connection: {other:?}"
                )),
                false,
            ),
        },
        ConnectionError::Io(e) | ConnectionError::MqttState(StateError::Io(e)) => io(e),
        ConnectionError::MqttState(StateError::ConnectionAborted) => (
            SessionError::Connect(format!("the broker at {address} closed the connection")),
            true,
        ),
        ConnectionError::MqttState(StateError::AwaitPingResp) => (
            SessionError::Connect(format!(
                "the broker at {address} stopped answering (no reply to a keepalive ping)"
            )),
            false,
        ),
        ConnectionError::NetworkTimeout => (
            SessionError::Timeout(format!(
                "no answer from {address} within the connect timeout of {:.0} s",
                config.connect_timeout.as_secs_f64()
            )),
            false,
        ),
        ConnectionError::Tls(e) => (
            SessionError::Connect(format!("TLS with {address} failed: {e}")),
            false,
        ),
        ConnectionError::Websocket(e) => (
            SessionError::Connect(format!("WebSocket to {address} failed: {e}")),
            false,
        ),
        other => (
            SessionError::Connect(format!("connection to {address} failed: {other}")),
            false,
        ),
    }
}

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

fn decode(route: &Route, publish: &Publish, received_at: i64) -> Item {
    let message = || Message {
        topic: publish.topic.clone(),
        payload: publish.payload.clone(),
        qos: publish.qos as u8,
        retain: publish.retain,
        received_at,
    };
    match route.decode {
        Decode::Bytes => Item::Message(message()),
        Decode::Raw => match payload::parse_raw(&publish.topic, &publish.payload, received_at) {
            Ok(point) => Item::Point {
                point,
                qos: publish.qos as u8,
                retain: publish.retain,
            },
            Err(err) => {
                route
                    .queue
                    .counters
                    .malformed
                    .fetch_add(1, Ordering::Relaxed);
                Item::Malformed {
                    message: message(),
                    reason: err.message,
                }
            }
        },
        Decode::Command => match payload::parse_command(&publish.topic, &publish.payload) {
            Ok(command) => Item::Command {
                command,
                raw: publish.payload.clone(),
            },
            Err(err) => {
                route
                    .queue
                    .counters
                    .malformed
                    .fetch_add(1, Ordering::Relaxed);
                Item::Malformed {
                    message: message(),
                    reason: err.message,
                }
            }
        },
    }
}

async fn route_publish(shared: &Shared, publish: Publish) {
    shared.stats.received.fetch_add(1, Ordering::Relaxed);
    let received_at = timestamp::now_nanos();
    let targets: Vec<Arc<Route>> = shared
        .routes()
        .iter()
        .filter(|r| topic::matches(&r.filter, &publish.topic))
        .cloned()
        .collect();
    if targets.is_empty() {
        shared.stats.unrouted.fetch_add(1, Ordering::Relaxed);
        log::debug!("message on {:?} matches no subscription", publish.topic);
        return;
    }
    for route in targets {
        let item = decode(&route, &publish, received_at);
        route.queue.push(item).await;
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
                    if !front.on_wire {
                        front.on_wire = !awaiting;
                        return;
                    }
                    if !awaiting {
                        return; // a retransmission of a publish already on the wire
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
                    book.last_publish = Some((Instant::now(), id, topic));
                    if qos == 0 {
                        complete(&mut book, id, Ok(()));
                    } else {
                        book.inflight.entry(pkid).or_default().push_back(InFlight {
                            id,
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
        Outgoing::Unsubscribe(_) | Outgoing::Disconnect => {
            book.fifo.pop_front();
        }
        _ => {}
    }
}

fn on_acked(shared: &Shared, pkid: u16) {
    let mut book = shared.book();
    let done = book.inflight.get_mut(&pkid).and_then(VecDeque::pop_front);
    if book.inflight.get(&pkid).is_some_and(VecDeque::is_empty) {
        book.inflight.remove(&pkid);
    }
    if let Some(done) = done {
        shared.stats.acknowledged.fetch_add(1, Ordering::Relaxed);
        complete(&mut book, done.id, Ok(()));
    }
}

fn on_suback(shared: &Shared, pkid: u16, codes: &[SubscribeReasonCode]) {
    let Some((filters, _)) = shared.book().subscribes.remove(&pkid) else {
        return;
    };
    for (filter, code) in filters.iter().zip(codes) {
        match code {
            SubscribeReasonCode::Success(_) => {
                for route in shared.routes().iter().filter(|r| &r.filter == filter) {
                    if *route.state() == RouteState::Pending {
                        route.settle(RouteState::Active);
                    }
                }
            }
            SubscribeReasonCode::Failure => {
                let error = authorization(
                    shared,
                    Action::Subscribe,
                    filter,
                    "the broker answered SUBACK 0x80",
                );
                refuse_filter(shared, filter, &error);
            }
        }
    }
}

/// After the broker hung up: was it refusing a subscribe or publish sent just before?
fn attribute_refusal(shared: &Shared, carried: &mut VecDeque<Request>) {
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
        for filter in recent_subscribes {
            let error = authorization(
                shared,
                Action::Subscribe,
                &filter,
                "the broker closed the connection right after the SUBSCRIBE, as Capture does",
            );
            refuse_filter(shared, &filter, &error);
        }
        return;
    }
    let mut book = shared.book();
    let Some((at, id, topic)) = book.last_publish.take() else {
        return;
    };
    if now.duration_since(at) >= REFUSAL_WINDOW {
        return;
    }
    let error = authorization(
        shared,
        Action::Publish,
        &topic,
        "the broker closed the connection right after the PUBLISH, as Capture does",
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
        carried.retain(|r| !matches!(r, Request::Publish(p) if p.pkid == pkid));
    }
    complete(&mut book, id, Err(error));
}

/// After a CONNACK: which requests go out again, and re-subscribing when the broker kept no session.
fn requeue(
    shared: &Shared,
    eventloop: &mut EventLoop,
    mut carried: VecDeque<Request>,
    session_present: bool,
) {
    if !session_present {
        // PUBREL of a QoS 2 publish the broker already has (it sent PUBREC): the new session knows
        // nothing of it, so it is done.
        carried.retain(|r| {
            let Request::PubRel(rel) = r else {
                return true;
            };
            let mut book = shared.book();
            if let Some(done) = book
                .inflight
                .get_mut(&rel.pkid)
                .and_then(VecDeque::pop_front)
            {
                complete(&mut book, done.id, Ok(()));
            }
            false
        });
    }
    // A kept session still has the granted subscriptions; the others (all of them on a new session)
    // are sent again, first thing on the connection.
    let routes: Vec<(String, u8)> = shared
        .routes()
        .iter()
        .filter(|r| !session_present || *r.state() == RouteState::Pending)
        .map(|r| (r.filter.clone(), r.qos))
        .collect();
    let mut filters: Vec<SubscribeFilter> = Vec::new();
    for (filter, qos) in routes {
        if !filters.iter().any(|f| f.path == filter) {
            filters.push(SubscribeFilter::new(filter, qos_of(qos)));
        }
    }
    if !filters.is_empty() {
        log::debug!(
            "subscribing to {} filter(s) after connecting",
            filters.len()
        );
        let names = filters.iter().map(|f| f.path.clone()).collect();
        shared
            .book()
            .fifo
            .push_front(Sent::Subscribe { filters: names });
        carried.push_front(Request::Subscribe(rumqttc::Subscribe::new_many(filters)));
    }
    eventloop.pending = carried;
}

fn refresh_credentials_error(shared: &Shared, reason: &str) -> SessionError {
    SessionError::Authentication {
        username: shared.config.account_name.clone(),
        reason: format!("no credentials: {reason}"),
    }
}

fn on_connack(
    shared: &Shared,
    eventloop: &mut EventLoop,
    carried: VecDeque<Request>,
    session_present: bool,
    first: Option<oneshot::Sender<Result<(), SessionError>>>,
) {
    requeue(shared, eventloop, carried, session_present);
    shared.connected.store(true, Ordering::Release);
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

/// The session's task. Reports the first connection's outcome through `first`, then keeps the
/// connection up until closed.
pub(super) async fn run(
    shared: Arc<Shared>,
    mut eventloop: EventLoop,
    first: oneshot::Sender<Result<(), SessionError>>,
) {
    let mut first = Some(first);
    let mut attempt: u32 = 0;
    let mut carried: VecDeque<Request> = VecDeque::new();
    loop {
        if shared.closed.load(Ordering::Acquire) && first.is_none() && eventloop.network.is_none() {
            break;
        }
        if eventloop.network.is_none() {
            carried.extend(std::mem::take(&mut eventloop.pending));
            if let Some(provider) = &shared.config.credentials {
                match provider.credentials().await {
                    Ok(credentials) => {
                        eventloop
                            .mqtt_options
                            .set_credentials(credentials.username, credentials.password.expose());
                    }
                    Err(reason) => {
                        let error = refresh_credentials_error(&shared, &reason);
                        if let Some(first) = first.take() {
                            let _ = first.send(Err(error));
                            break;
                        }
                        log::warn!("{error}");
                        if !backoff(&shared, &mut attempt).await {
                            break;
                        }
                        continue;
                    }
                }
            }
        }
        let polled = tokio::select! {
            polled = eventloop.poll() => polled,
            () = shared.close_signal.notified() => break,
        };
        match polled {
            Ok(rumqttc::Event::Incoming(incoming)) => match incoming {
                Incoming::ConnAck(ack) => {
                    attempt = 0;
                    let carried = std::mem::take(&mut carried);
                    on_connack(
                        &shared,
                        &mut eventloop,
                        carried,
                        ack.session_present,
                        first.take(),
                    );
                }
                Incoming::Publish(publish) => route_publish(&shared, publish).await,
                Incoming::PubAck(ack) => on_acked(&shared, ack.pkid),
                Incoming::PubComp(comp) => on_acked(&shared, comp.pkid),
                Incoming::SubAck(ack) => on_suback(&shared, ack.pkid, &ack.return_codes),
                _ => {}
            },
            Ok(rumqttc::Event::Outgoing(outgoing)) => {
                let disconnect = outgoing == Outgoing::Disconnect;
                on_outgoing(&shared, &outgoing);
                if disconnect && shared.closed.load(Ordering::Acquire) {
                    break;
                }
            }
            Err(err) => {
                let was_connected = shared.connected.swap(false, Ordering::AcqRel);
                if shared.closed.load(Ordering::Acquire) {
                    break;
                }
                let (error, hung_up) = describe(&shared.config, &err, &shared.config.account_name);
                carried.extend(std::mem::take(&mut eventloop.pending));
                if let Some(first) = first.take() {
                    log::debug!("first connection failed: {error}");
                    let _ = first.send(Err(error));
                    break;
                }
                if was_connected {
                    log::warn!("disconnected from {}: {error}", shared.config.address());
                    shared.emit(Event::Disconnected {
                        reason: error.to_string(),
                    });
                    if hung_up {
                        attribute_refusal(&shared, &mut carried);
                    }
                }
                if !shared.config.reconnect.enabled {
                    break;
                }
                if !backoff(&shared, &mut attempt).await {
                    break;
                }
            }
        }
    }
    finish(&shared);
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
    drop(book);
    if !shared.events.is_closed() {
        log::debug!("session with {} closed", shared.config.address());
        shared.emit(Event::Closed);
        shared.events.close();
    }
}
