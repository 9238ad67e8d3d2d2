//! One face over rumqttc's MQTT 3.1.1 and MQTT 5 event loops, so that the driver is written once.
//! Events become `NetEvent`; MQTT 5 reason codes become refusals in words.

use super::{tls, Protocol, SessionConfig, SessionError, Transport};
use bytes::Bytes;
use rumqttc::v5;
use rumqttc::{Outgoing, QoS, TlsConfiguration};
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;

/// Capacity of rumqttc's request channel: callers wait (backpressure) when it is full.
pub(super) const REQUEST_CHANNEL: usize = 1024;

pub(super) fn qos_of(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn qos5_of(level: u8) -> v5::mqttbytes::QoS {
    match level {
        0 => v5::mqttbytes::QoS::AtMostOnce,
        1 => v5::mqttbytes::QoS::AtLeastOnce,
        _ => v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// What the driver needs to know of one event.
#[derive(Debug)]
pub(super) enum NetEvent {
    ConnAck {
        session_present: bool,
    },
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        retain: bool,
        pkid: u16,
        /// MQTT 5 subscription identifiers: which of our subscriptions this copy is for.
        sub_ids: Vec<usize>,
    },
    /// PUBACK (QoS 1) or PUBCOMP (QoS 2); `refused` holds an MQTT 5 failure reason.
    Acked {
        pkid: u16,
        refused: Option<String>,
    },
    /// An MQTT 5 PUBREC with a failure reason: the QoS 2 flow ends there.
    Refused {
        pkid: u16,
        reason: String,
    },
    /// SUBACK: per filter, None when granted or the refusal's reason.
    SubAck {
        pkid: u16,
        codes: Vec<Option<String>>,
    },
    /// UNSUBACK: the broker stopped sending for that filter.
    UnsubAck {
        pkid: u16,
    },
    Outgoing(Outgoing),
    Other,
}

/// A request carried over a reconnect.
#[derive(Debug)]
pub(super) enum LinkRequest {
    V4(rumqttc::Request),
    V5(v5::Request),
}

impl LinkRequest {
    pub(super) fn pubrel_pkid(&self) -> Option<u16> {
        match self {
            LinkRequest::V4(rumqttc::Request::PubRel(rel)) => Some(rel.pkid),
            LinkRequest::V5(v5::Request::PubRel(rel)) => Some(rel.pkid),
            _ => None,
        }
    }
    pub(super) fn publish_pkid(&self) -> Option<u16> {
        match self {
            LinkRequest::V4(rumqttc::Request::Publish(p)) => Some(p.pkid),
            LinkRequest::V5(v5::Request::Publish(p)) => Some(p.pkid),
            _ => None,
        }
    }
}

/// The sending half: rumqttc's client for the protocol in use.
#[derive(Clone, Debug)]
pub(super) enum LinkClient {
    V4(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

impl LinkClient {
    /// Subscribes to one filter; MQTT 5 tags it with the subscription identifier `id`.
    pub(super) async fn subscribe(&self, filter: String, qos: u8, id: usize) -> Result<(), ()> {
        match self {
            LinkClient::V4(c) => c.subscribe(filter, qos_of(qos)).await.map_err(drop),
            LinkClient::V5(c) => c
                .subscribe_with_properties(filter, qos5_of(qos), subscription_id(id))
                .await
                .map_err(drop),
        }
    }

    /// Acknowledges an incoming QoS 1/2 publish (acknowledgements are manual: see `Ack`).
    /// False when the request channel is full.
    pub(super) fn try_ack(&self, pkid: u16, qos: u8) -> bool {
        match self {
            LinkClient::V4(c) => {
                let mut publish = rumqttc::Publish::new("", qos_of(qos), Vec::new());
                publish.pkid = pkid;
                c.try_ack(&publish).is_ok()
            }
            LinkClient::V5(c) => {
                let mut publish =
                    v5::mqttbytes::v5::Publish::new("", qos5_of(qos), Vec::new(), None);
                publish.pkid = pkid;
                c.try_ack(&publish).is_ok()
            }
        }
    }

    /// Like `try_ack`, waiting for room in the request channel.
    pub(super) async fn ack(&self, pkid: u16, qos: u8) {
        match self {
            LinkClient::V4(c) => {
                let mut publish = rumqttc::Publish::new("", qos_of(qos), Vec::new());
                publish.pkid = pkid;
                let _ = c.ack(&publish).await;
            }
            LinkClient::V5(c) => {
                let mut publish =
                    v5::mqttbytes::v5::Publish::new("", qos5_of(qos), Vec::new(), None);
                publish.pkid = pkid;
                let _ = c.ack(&publish).await;
            }
        }
    }
    pub(super) async fn unsubscribe(&self, filter: String) -> Result<(), ()> {
        match self {
            LinkClient::V4(c) => c.unsubscribe(filter).await.map_err(drop),
            LinkClient::V5(c) => c.unsubscribe(filter).await.map_err(drop),
        }
    }
    pub(super) async fn publish(
        &self,
        topic: String,
        qos: u8,
        retain: bool,
        payload: Bytes,
    ) -> Result<(), ()> {
        match self {
            LinkClient::V4(c) => c
                .publish_bytes(topic, qos_of(qos), retain, payload)
                .await
                .map_err(drop),
            LinkClient::V5(c) => c
                .publish_bytes(topic, qos5_of(qos), retain, payload)
                .await
                .map_err(drop),
        }
    }
    /// Publishes without waiting; false when the request channel is full.
    pub(super) fn try_publish(&self, topic: &str, qos: u8, retain: bool, payload: &Bytes) -> bool {
        match self {
            LinkClient::V4(c) => c
                .try_publish(topic, qos_of(qos), retain, payload.to_vec())
                .is_ok(),
            LinkClient::V5(c) => c
                .try_publish(topic, qos5_of(qos), retain, payload.clone())
                .is_ok(),
        }
    }

    pub(super) fn try_disconnect(&self) -> Result<(), ()> {
        match self {
            LinkClient::V4(c) => c.try_disconnect().map_err(drop),
            LinkClient::V5(c) => c.try_disconnect().map_err(drop),
        }
    }
}

fn subscription_id(id: usize) -> v5::mqttbytes::v5::SubscribeProperties {
    v5::mqttbytes::v5::SubscribeProperties {
        id: Some(id),
        user_properties: Vec::new(),
    }
}

/// The receiving half: rumqttc's event loop for the protocol in use.
pub(super) enum Link {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

fn transport(config: &SessionConfig) -> Result<rumqttc::Transport, SessionError> {
    Ok(match config.transport {
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
    })
}

/// Builds rumqttc's options, transport and event loop for `config`.
pub(super) fn build(config: &SessionConfig) -> Result<(LinkClient, Link), SessionError> {
    // rumqttc reads the WebSocket path from the host when it is a full URL; it drops it otherwise.
    let host = if config.transport.is_websocket() {
        config.address()
    } else {
        config.host.clone()
    };
    let keepalive = config.keepalive.max(Duration::from_secs(1));
    let timeout = config.connect_timeout.as_secs().max(1);
    match config.protocol {
        Protocol::V311 => {
            let mut options =
                rumqttc::MqttOptions::new(config.client_id.clone(), host, config.port);
            options.set_keep_alive(keepalive);
            options.set_clean_session(config.clean_session);
            options.set_max_packet_size(config.max_packet_size, config.max_packet_size);
            options.set_inflight(config.inflight.max(1));
            options.set_request_channel_capacity(REQUEST_CHANNEL);
            options.set_manual_acks(true);
            options.set_transport(transport(config)?);
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, REQUEST_CHANNEL);
            let mut network = eventloop.network_options();
            network.set_connection_timeout(timeout);
            network.set_tcp_nodelay(true);
            eventloop.set_network_options(network);
            Ok((LinkClient::V4(client), Link::V4(Box::new(eventloop))))
        }
        Protocol::V5 => {
            let mut options = v5::MqttOptions::new(config.client_id.clone(), host, config.port);
            options.set_keep_alive(keepalive);
            options.set_clean_start(config.clean_session);
            if !config.clean_session {
                // MQTT 5 ends a session at disconnect unless it has an expiry interval.
                options.set_session_expiry_interval(Some(u32::MAX));
            }
            let max = u32::try_from(config.max_packet_size).unwrap_or(u32::MAX);
            options.set_max_packet_size(Some(max));
            options.set_outgoing_inflight_upper_limit(config.inflight.max(1));
            // The broker sends no more unacknowledged QoS 1/2 messages than this: with `block`
            // (acknowledged when the consumer takes them) it bounds what waits in this process.
            options.set_receive_maximum(Some(config.inflight.max(1)));
            options.set_manual_acks(true);
            options.set_request_channel_capacity(REQUEST_CHANNEL);
            options.set_connection_timeout(timeout);
            options.set_transport(transport(config)?);
            let mut network = rumqttc::NetworkOptions::new();
            network.set_tcp_nodelay(true);
            network.set_connection_timeout(timeout);
            options.set_network_options(network);
            let (client, eventloop) = v5::AsyncClient::new(options, REQUEST_CHANNEL);
            Ok((LinkClient::V5(client), Link::V5(Box::new(eventloop))))
        }
    }
}

/// What an I/O error means for the user, and whether the broker hung up on us.
fn describe_io(config: &SessionConfig, e: &std::io::Error) -> (SessionError, bool) {
    let address = config.address();
    let text = e.to_string();
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
        _ if text.contains("lookup") || text.contains("resolve") => (
            SessionError::Connect(format!("the host name {:?} could not be resolved (DNS): {e}", config.host)),
            false,
        ),
        _ if text.to_ascii_lowercase().contains("certificate") || text.contains("TLS") => {
            (SessionError::Connect(format!("TLS with {address} failed: {text}")), false)
        }
        _ => (SessionError::Connect(format!("connection to {address} failed: {text}")), false),
    }
}

fn refused_login(
    config: &SessionConfig,
    username: &str,
    code: &str,
    credentials: bool,
) -> SessionError {
    if credentials {
        SessionError::Authentication {
            username: username.to_owned(),
            reason: code.to_owned(),
        }
    } else {
        SessionError::Connect(format!(
            "the broker at {} refused the connection: {code}",
            config.address()
        ))
    }
}

fn describe_v4(
    config: &SessionConfig,
    err: &rumqttc::ConnectionError,
    username: &str,
) -> (SessionError, bool) {
    use rumqttc::{ConnectReturnCode, ConnectionError, StateError};
    let address = config.address();
    match err {
        ConnectionError::ConnectionRefused(code) => {
            let credentials = matches!(
                code,
                ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized
            );
            let words = match code {
                ConnectReturnCode::BadUserNamePassword => "bad username or password".to_owned(),
                ConnectReturnCode::NotAuthorized => "not authorized".to_owned(),
                other => format!("{other:?}"),
            };
            (refused_login(config, username, &words, credentials), false)
        }
        // A write to a closed socket comes back wrapped as a (de)serialization error.
        ConnectionError::Io(e)
        | ConnectionError::MqttState(
            StateError::Io(e) | StateError::Deserialization(rumqttc::Error::Io(e)),
        ) => describe_io(config, e),
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
        ConnectionError::NetworkTimeout => (timeout_error(config), false),
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

fn describe_v5(
    config: &SessionConfig,
    err: &v5::ConnectionError,
    username: &str,
) -> (SessionError, bool) {
    use v5::mqttbytes::v5::ConnectReturnCode;
    use v5::{ConnectionError, StateError};
    let address = config.address();
    match err {
        ConnectionError::ConnectionRefused(code)
        | ConnectionError::MqttState(StateError::ConnFail { reason: code }) => {
            let credentials = matches!(
                code,
                ConnectReturnCode::BadUserNamePassword
                    | ConnectReturnCode::NotAuthorized
                    | ConnectReturnCode::Banned
                    | ConnectReturnCode::BadAuthenticationMethod
            );
            (
                refused_login(config, username, &format!("{code:?}"), credentials),
                false,
            )
        }
        ConnectionError::Io(e)
        | ConnectionError::MqttState(
            StateError::Io(e) | StateError::Deserialization(v5::mqttbytes::Error::Io(e)),
        ) => describe_io(config, e),
        ConnectionError::MqttState(StateError::ConnectionAborted) => (
            SessionError::Connect(format!("the broker at {address} closed the connection")),
            true,
        ),
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code,
            reason_string,
        }) => (
            SessionError::Connect(format!(
                "the broker at {address} disconnected the client: {reason_code:?}{}",
                reason_string
                    .as_ref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            )),
            true,
        ),
        ConnectionError::MqttState(StateError::AwaitPingResp) => (
            SessionError::Connect(format!(
                "the broker at {address} stopped answering (no reply to a keepalive ping)"
            )),
            false,
        ),
        ConnectionError::Timeout(_) => (timeout_error(config), false),
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

fn timeout_error(config: &SessionConfig) -> SessionError {
    SessionError::Timeout(format!(
        "no answer from {} within the connect timeout of {:.0} s",
        config.address(),
        config.connect_timeout.as_secs_f64()
    ))
}

fn v4_event(event: rumqttc::Event) -> NetEvent {
    use rumqttc::{Incoming, SubscribeReasonCode};
    match event {
        rumqttc::Event::Incoming(incoming) => match incoming {
            Incoming::ConnAck(ack) => NetEvent::ConnAck {
                session_present: ack.session_present,
            },
            Incoming::Publish(p) => NetEvent::Publish {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos as u8,
                retain: p.retain,
                pkid: p.pkid,
                sub_ids: Vec::new(),
            },
            Incoming::PubAck(ack) => NetEvent::Acked {
                pkid: ack.pkid,
                refused: None,
            },
            Incoming::PubComp(comp) => NetEvent::Acked {
                pkid: comp.pkid,
                refused: None,
            },
            Incoming::UnsubAck(ack) => NetEvent::UnsubAck { pkid: ack.pkid },
            Incoming::SubAck(ack) => NetEvent::SubAck {
                pkid: ack.pkid,
                codes: ack
                    .return_codes
                    .iter()
                    .map(|code| match code {
                        SubscribeReasonCode::Success(_) => None,
                        SubscribeReasonCode::Failure => {
                            Some("the broker answered SUBACK 0x80".to_owned())
                        }
                    })
                    .collect(),
            },
            _ => NetEvent::Other,
        },
        rumqttc::Event::Outgoing(outgoing) => NetEvent::Outgoing(outgoing),
    }
}

fn v5_event(event: v5::Event) -> NetEvent {
    use v5::mqttbytes::v5::Packet;
    use v5::mqttbytes::v5::{PubAckReason, PubRecReason, SubscribeReasonCode};
    match event {
        v5::Event::Incoming(incoming) => match incoming {
            Packet::ConnAck(ack) => NetEvent::ConnAck {
                session_present: ack.session_present,
            },
            Packet::Publish(p) => NetEvent::Publish {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload,
                qos: p.qos as u8,
                retain: p.retain,
                pkid: p.pkid,
                sub_ids: p
                    .properties
                    .map(|props| props.subscription_identifiers)
                    .unwrap_or_default(),
            },
            Packet::PubAck(ack) => NetEvent::Acked {
                pkid: ack.pkid,
                refused: match ack.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                    other => Some(format!("the broker answered PUBACK {other:?}")),
                },
            },
            Packet::PubRec(rec) => match rec.reason {
                PubRecReason::Success | PubRecReason::NoMatchingSubscribers => NetEvent::Other,
                other => NetEvent::Refused {
                    pkid: rec.pkid,
                    reason: format!("the broker answered PUBREC {other:?}"),
                },
            },
            Packet::PubComp(comp) => NetEvent::Acked {
                pkid: comp.pkid,
                refused: None,
            },
            Packet::UnsubAck(ack) => NetEvent::UnsubAck { pkid: ack.pkid },
            Packet::SubAck(ack) => NetEvent::SubAck {
                pkid: ack.pkid,
                codes: ack
                    .return_codes
                    .iter()
                    .map(|code| match code {
                        SubscribeReasonCode::Success(_) => None,
                        other => Some(format!("the broker answered SUBACK {other:?}")),
                    })
                    .collect(),
            },
            _ => NetEvent::Other,
        },
        v5::Event::Outgoing(outgoing) => NetEvent::Outgoing(outgoing),
    }
}

impl Link {
    /// The next event; an error says what broke and whether the broker hung up on us.
    pub(super) async fn poll(
        &mut self,
        config: &SessionConfig,
        username: &str,
    ) -> Result<NetEvent, (SessionError, bool)> {
        match self {
            Link::V4(eventloop) => eventloop
                .poll()
                .await
                .map(v4_event)
                .map_err(|e| describe_v4(config, &e, username)),
            Link::V5(eventloop) => eventloop
                .poll()
                .await
                .map(v5_event)
                .map_err(|e| describe_v5(config, &e, username)),
        }
    }

    /// Takes the requests rumqttc kept for the next connection (unacknowledged publishes and the
    /// requests it had not sent): the driver decides what goes out again.
    pub(super) fn take_pending(&mut self) -> VecDeque<LinkRequest> {
        match self {
            Link::V4(eventloop) => std::mem::take(&mut eventloop.pending)
                .into_iter()
                .map(LinkRequest::V4)
                .collect(),
            Link::V5(eventloop) => std::mem::take(&mut eventloop.pending)
                .into_iter()
                .map(LinkRequest::V5)
                .collect(),
        }
    }

    /// Sets what is sent first on the connection.
    pub(super) fn set_pending(&mut self, requests: VecDeque<LinkRequest>) {
        match self {
            Link::V4(eventloop) => {
                eventloop.pending = requests
                    .into_iter()
                    .filter_map(|r| {
                        if let LinkRequest::V4(r) = r {
                            Some(r)
                        } else {
                            None
                        }
                    })
                    .collect();
            }
            Link::V5(eventloop) => {
                eventloop.pending = requests
                    .into_iter()
                    .filter_map(|r| {
                        if let LinkRequest::V5(r) = r {
                            Some(r)
                        } else {
                            None
                        }
                    })
                    .collect();
            }
        }
    }

    /// SUBSCRIBE requests for `(filter, qos, id)`: one packet under MQTT 3.1.1; one packet per filter
    /// under MQTT 5, each with its subscription identifier. Each request with the filters it carries.
    pub(super) fn subscribe_requests(
        &self,
        filters: &[(String, u8, usize)],
    ) -> Vec<(LinkRequest, Vec<String>)> {
        match self {
            Link::V4(_) => {
                let request = rumqttc::Request::Subscribe(rumqttc::Subscribe::new_many(
                    filters
                        .iter()
                        .map(|(f, q, _)| rumqttc::SubscribeFilter::new(f.clone(), qos_of(*q))),
                ));
                vec![(
                    LinkRequest::V4(request),
                    filters.iter().map(|(f, _, _)| f.clone()).collect(),
                )]
            }
            Link::V5(_) => filters
                .iter()
                .map(|(f, q, id)| {
                    let filter = v5::mqttbytes::v5::Filter::new(f.clone(), qos5_of(*q));
                    let subscribe =
                        v5::mqttbytes::v5::Subscribe::new(filter, Some(subscription_id(*id)));
                    (
                        LinkRequest::V5(v5::Request::Subscribe(subscribe)),
                        vec![f.clone()],
                    )
                })
                .collect(),
        }
    }

    /// Drops the connection now; what was in flight is kept for the next one.
    /// The events rumqttc read or made on the connection that just ended but did not hand out yet
    /// (it keeps them across a reconnect): they must be booked before the new connection's.
    pub(super) fn take_buffered(&mut self) -> Vec<NetEvent> {
        match self {
            Link::V4(eventloop) => eventloop.state.events.drain(..).map(v4_event).collect(),
            Link::V5(eventloop) => eventloop.state.events.drain(..).map(v5_event).collect(),
        }
    }

    pub(super) fn drop_connection(&mut self) {
        match self {
            Link::V4(eventloop) => eventloop.clean(),
            Link::V5(eventloop) => eventloop.clean(),
        }
    }

    pub(super) fn set_credentials(&mut self, username: String, password: &str) {
        match self {
            Link::V4(eventloop) => {
                eventloop.mqtt_options.set_credentials(username, password);
            }
            Link::V5(eventloop) => {
                eventloop.options.set_credentials(username, password);
            }
        }
    }
}
