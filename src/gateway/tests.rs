//! The gateway in front of a real Mosquitto, driven by raw MQTT clients written with the engine's
//! codec, so that every byte a client sees is checked.

use super::*;
use crate::scope::AccountKind;
use crate::session::codec::{ConnAck, Connect};
use crate::session::runtime;
use crate::session::tests::Broker;
use std::time::Instant;

const WAIT: Duration = Duration::from_secs(5);

struct Raw {
    stream: TcpStream,
    codec: Codec,
    buf: BytesMut,
}

impl Raw {
    async fn connect(gateway: &Gateway, version: Version, username: &str) -> Raw {
        let client_id = format!("raw-{username}-{}", std::process::id());
        let (raw, ack) = Raw::login(gateway, version, &client_id, username, "secret", true).await;
        match ack {
            Some(Packet::ConnAck(ack)) => assert!(ack.refused.is_none(), "{ack:?}"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        raw
    }

    /// Sends a CONNECT and returns what came back.
    async fn login(
        gateway: &Gateway,
        version: Version,
        client_id: &str,
        username: &str,
        password: &str,
        clean: bool,
    ) -> (Raw, Option<Packet>) {
        let stream = TcpStream::connect(gateway.addr()).await.unwrap();
        let mut raw = Raw {
            stream,
            codec: Codec {
                version,
                max_incoming: usize::MAX,
            },
            buf: BytesMut::new(),
        };
        raw.send(&Packet::Connect(Connect {
            client_id: client_id.to_owned(),
            keepalive: 30,
            clean,
            login: Some((username.to_owned(), password.to_owned())),
            session_expiry: None,
            receive_maximum: None,
            max_packet_size: None,
        }))
        .await;
        let ack = raw.next().await;
        (raw, ack)
    }

    async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        self.codec.encode(packet, &mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    /// The next packet within `WAIT`; None when the connection closed.
    async fn next(&mut self) -> Option<Packet> {
        self.next_within(WAIT)
            .await
            .expect("nothing arrived in time")
    }

    /// Err on timeout, Ok(None) when the connection closed.
    async fn next_within(&mut self, limit: Duration) -> Result<Option<Packet>, ()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(packet) = self.codec.decode(&mut self.buf).unwrap() {
                return Ok(Some(packet));
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(()),
                Ok(Ok(0) | Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) -> Option<Packet> {
        self.send_subscribe(1, &[(filter, 0)]).await;
        self.next().await
    }

    async fn send_subscribe(&mut self, pkid: u16, filters: &[(&str, u8)]) {
        self.send(&Packet::Subscribe {
            pkid,
            filters: filters.iter().map(|(f, q)| ((*f).to_owned(), *q)).collect(),
            sub_id: None,
        })
        .await;
    }

    async fn publish(&mut self, topic: &str, payload: &[u8]) {
        self.publish_qos(topic, payload, 0).await;
    }

    async fn publish_qos(&mut self, topic: &str, payload: &[u8], qos: u8) {
        self.send(&Packet::Publish(crate::session::codec::Publish {
            topic: topic.to_owned(),
            payload: bytes::Bytes::copy_from_slice(payload),
            qos,
            retain: false,
            dup: false,
            pkid: u16::from(qos > 0),
            sub_ids: Vec::new(),
        }))
        .await;
    }
}

async fn gateway(broker: &Broker, max_packet: usize) -> Gateway {
    gateway_with(broker, max_packet, CAPTURE_SESSION_EXPIRY).await
}

async fn gateway_with(broker: &Broker, max_packet: usize, session_expiry: Duration) -> Gateway {
    gateway_config(broker, max_packet, session_expiry, Deny::Disconnect).await
}

async fn gateway_config(
    broker: &Broker,
    max_packet: usize,
    session_expiry: Duration,
    deny: Deny,
) -> Gateway {
    let gateway = Gateway::start(
        "127.0.0.1:0".parse().unwrap(),
        GatewayConfig {
            upstream: SocketAddr::from(([127, 0, 0, 1], broker.port)),
            max_packet,
            session_expiry,
            deny,
        },
    )
    .await
    .unwrap();
    gateway.set_account("alice", Scope::new(AccountKind::User, Some("Acme"), None));
    gateway.set_account(
        "src-1",
        Scope::new(AccountKind::Source, None, Some("src-1")),
    );
    gateway
}

fn granted(packet: Option<Packet>) -> bool {
    matches!(packet, Some(Packet::SubAck { codes, .. }) if codes.iter().all(Result::is_ok))
}

/// The refusal a client sees: DISCONNECT with `reason` first under MQTT 5, then the close.
async fn assert_refused(raw: &mut Raw, reason: u8) {
    if raw.codec.version == Version::V5 {
        match raw.next().await {
            Some(Packet::Disconnect { reason: got, .. }) => assert_eq!(got, reason),
            other => panic!("expected DISCONNECT {reason:#x}, got {other:?}"),
        }
    }
    assert_eq!(raw.next().await, None, "the connection stays open");
}

#[test]
fn traffic_in_scope_passes_and_a_subscribe_outside_it_disconnects() {
    let broker = Broker::start();
    runtime().block_on(async {
        let gateway = gateway(&broker, CAPTURE_MAX_PACKET).await;
        for version in [Version::V311, Version::V5] {
            let mut alice = Raw::connect(&gateway, version, "alice").await;
            assert!(granted(alice.subscribe("v1/raw/Acme/#").await));
            let mut device = Raw::connect(&gateway, version, "src-1").await;
            device
                .publish("v1/sources/src-1/data/read/C/M", b"{}")
                .await;
            // The broker's bytes come back untouched; a publish in scope passes.
            let mut pipeline = Raw::connect(&gateway, version, "pipeline").await; // no scope known
            pipeline.publish("v1/raw/Acme/s/C/M/K", b"55").await;
            match alice.next().await {
                Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"55"),
                other => panic!("expected the message, got {other:?}"),
            }
            // Another company's raw tree, and `+` in the company segment: disconnected.
            alice.send_subscribe(2, &[("v1/raw/+/#", 0)]).await;
            assert_refused(&mut alice, NOT_AUTHORIZED).await;
            let mut alice = Raw::connect(&gateway, version, "alice").await;
            alice.send_subscribe(3, &[("v1/raw/Other/#", 0)]).await;
            assert_refused(&mut alice, NOT_AUTHORIZED).await;
        }
        assert_eq!(gateway.stats().refused_scope.load(Ordering::Relaxed), 4);
    });
}

#[test]
fn a_publish_outside_the_scope_disconnects() {
    let broker = Broker::start();
    runtime().block_on(async {
        let gateway = gateway(&broker, CAPTURE_MAX_PACKET).await;
        for version in [Version::V311, Version::V5] {
            let mut device = Raw::connect(&gateway, version, "src-1").await;
            device
                .publish("v1/sources/src-2/data/read/C/M", b"{}")
                .await;
            assert_refused(&mut device, NOT_AUTHORIZED).await;
            let mut alice = Raw::connect(&gateway, version, "alice").await;
            alice.publish("v1/raw/Acme/s/C/M/K", b"55").await; // users only write commands
            assert_refused(&mut alice, NOT_AUTHORIZED).await;
        }
    });
}

#[test]
fn a_packet_over_the_limit_disconnects() {
    let broker = Broker::start();
    runtime().block_on(async {
        let gateway = gateway(&broker, 1024).await;
        for version in [Version::V311, Version::V5] {
            let mut device = Raw::connect(&gateway, version, "src-1").await;
            device
                .publish("v1/sources/src-1/data/read/C/M", &[b'x'; 900])
                .await; // under
            device
                .publish("v1/sources/src-1/data/read/C/M", &[b'x'; 2000])
                .await;
            assert_refused(&mut device, PACKET_TOO_LARGE).await;
        }
        assert_eq!(gateway.stats().refused_size.load(Ordering::Relaxed), 2);
    });
}

#[test]
fn a_tls_listener_needs_a_certificate_and_key_it_can_read() {
    let broker = Broker::start();
    runtime().block_on(async {
        let gateway = gateway(&broker, CAPTURE_MAX_PACKET).await;
        let err = gateway
            .listen_tls(
                "127.0.0.1:0".parse().unwrap(),
                b"not a certificate",
                b"not a key",
                false,
            )
            .await
            .unwrap_err();
        assert!(err.contains("cannot be read"), "{err}");
    });
}

#[test]
fn faults_stall_delay_drop_and_partition() {
    let broker = Broker::start();
    runtime().block_on(async {
        let gateway = gateway(&broker, CAPTURE_MAX_PACKET).await;
        let mut alice = Raw::connect(&gateway, Version::V5, "alice").await;
        assert!(granted(alice.subscribe("v1/raw/Acme/#").await));
        let mut pipeline = Raw::connect(&gateway, Version::V5, "pipeline").await;

        // A stall holds the traffic and keeps the connections; the end of it releases the traffic.
        gateway.set_stalled(true);
        pipeline.publish("v1/raw/Acme/s/C/M/K", b"held").await;
        assert!(alice.next_within(Duration::from_millis(300)).await.is_err());
        gateway.set_stalled(false);
        assert!(
            matches!(alice.next().await, Some(Packet::Publish(p)) if &p.payload[..] == b"held")
        );

        // Latency delays every forwarded chunk, both ways.
        gateway.set_latency(Duration::from_millis(100));
        let started = Instant::now();
        pipeline.publish("v1/raw/Acme/s/C/M/K", b"late").await;
        assert!(
            matches!(alice.next().await, Some(Packet::Publish(p)) if &p.payload[..] == b"late")
        );
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
        gateway.set_latency(Duration::ZERO);

        // Dropping the connections closes them; new ones work.
        gateway.drop_connections();
        assert_eq!(alice.next().await, None);
        assert_eq!(pipeline.next().await, None);
        let mut alice = Raw::connect(&gateway, Version::V311, "alice").await;

        // A partition drops them and refuses new ones until it ends.
        gateway.set_partitioned(true);
        assert_eq!(alice.next().await, None);
        let mut refused = TcpStream::connect(gateway.addr()).await.unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(
            tokio::time::timeout(WAIT, refused.read(&mut byte))
                .await
                .unwrap()
                .unwrap_or(0),
            0
        );
        gateway.set_partitioned(false);
        let mut alice = Raw::connect(&gateway, Version::V311, "alice").await;
        assert!(granted(alice.subscribe("v1/raw/Acme/#").await));
        assert!(gateway.stats().dropped.load(Ordering::Relaxed) >= 3);
    });
}

#[test]
fn what_came_before_a_refused_packet_still_goes_through() {
    let broker = Broker::start();
    runtime().block_on(async {
        let gateway = gateway(&broker, CAPTURE_MAX_PACKET).await;
        let mut alice = Raw::connect(&gateway, Version::V5, "alice").await;
        assert!(granted(alice.subscribe("v1/raw/Acme/#").await));
        let mut device = Raw::connect(&gateway, Version::V5, "src-1").await;
        // One write: a push in scope, then a publish outside it.
        let mut out = BytesMut::new();
        for topic in ["v1/sources/src-1/data/read/C/M", "v1/raw/Acme/s/C/M/K"] {
            device
                .codec
                .encode(
                    &Packet::Publish(crate::session::codec::Publish {
                        topic: topic.to_owned(),
                        payload: bytes::Bytes::from_static(b"1"),
                        qos: 0,
                        retain: false,
                        dup: false,
                        pkid: 0,
                        sub_ids: Vec::new(),
                    }),
                    &mut out,
                )
                .unwrap();
        }
        let mut watcher = Raw::connect(&gateway, Version::V5, "watcher").await; // no scope known
        assert!(granted(watcher.subscribe("v1/sources/src-1/#").await));
        device.stream.write_all(&out).await.unwrap();
        assert_refused(&mut device, NOT_AUTHORIZED).await;
        assert!(
            matches!(watcher.next().await, Some(Packet::Publish(p)) if p.topic.ends_with("C/M"))
        );
    });
}

fn jwt(key: &[u8], username: &str, exp: u64) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"{username}","exp":{exp}}}"#));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&key, format!("{header}.{body}").as_bytes());
    format!("{header}.{body}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_jwt_login_is_checked_and_closed_when_the_token_expires() {
    let broker = Broker::start();
    runtime().block_on(async {
        let gateway = gateway(&broker, CAPTURE_MAX_PACKET).await;
        let key = b"the emulator's signing key";
        gateway.set_jwt_login("carol", key, "what-the-broker-knows");
        let now = unix_now();
        for (version, refused) in [(Version::V311, 4u8), (Version::V5, 0x86)] {
            // Forged, expired, or someone else's: refused as bad credentials, nothing forwarded.
            for token in [
                jwt(b"another key", "carol", now + 3600),
                jwt(key, "carol", now - 1),
                jwt(key, "dave", now + 3600),
                "not a token".to_owned(),
            ] {
                let (mut raw, ack) =
                    Raw::login(&gateway, version, "jwt-client", "carol", &token, true).await;
                // The engine's codec reads code 4 (3.1.1) and 0x86 (v5) as refused credentials.
                assert!(
                    matches!(&ack, Some(Packet::ConnAck(ConnAck { refused: Some(r), .. })) if r.credentials),
                    "expected a refusal with {refused:#x}, got {ack:?}"
                );
                assert_eq!(raw.next().await, None);
            }
            // A valid one logs in, and the connection is closed when it expires (two seconds
            // from now, give or take the second the claim is rounded to).
            let token = jwt(key, "carol", unix_now() + 2);
            let (mut raw, ack) =
                Raw::login(&gateway, version, "jwt-client", "carol", &token, true).await;
            assert!(
                matches!(ack, Some(Packet::ConnAck(ConnAck { refused: None, .. }))),
                "{ack:?}"
            );
            let started = Instant::now();
            match raw.next_within(Duration::from_secs(5)).await {
                Ok(Some(Packet::Disconnect { reason, .. })) => {
                    assert_eq!((version, reason), (Version::V5, NOT_AUTHORIZED));
                    assert_eq!(raw.next().await, None);
                }
                Ok(None) => assert_eq!(version, Version::V311),
                other => panic!("expected the close at exp, got {other:?}"),
            }
            assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
        }
        assert_eq!(gateway.stats().refused_login.load(Ordering::Relaxed), 8);
        assert_eq!(gateway.stats().expired_logins.load(Ordering::Relaxed), 2);
    });
}

#[test]
fn a_second_connection_with_a_client_id_takes_it_over() {
    let broker = Broker::start();
    runtime().block_on(async {
        let gateway = gateway(&broker, CAPTURE_MAX_PACKET).await;
        for (version, twin) in [(Version::V311, "twin-3"), (Version::V5, "twin-5")] {
            let (mut first, _) = Raw::login(&gateway, version, twin, "alice", "secret", true).await;
            let (mut second, ack) =
                Raw::login(&gateway, version, twin, "alice", "secret", true).await;
            assert!(matches!(
                ack,
                Some(Packet::ConnAck(ConnAck { refused: None, .. }))
            ));
            assert_refused(&mut first, SESSION_TAKEN_OVER).await;
            // The newcomer keeps the connection.
            assert!(granted(second.subscribe("v1/raw/Acme/#").await));
        }
        assert_eq!(gateway.stats().taken_over.load(Ordering::Relaxed), 2);
    });
}

#[test]
fn a_persistent_311_session_expires_when_left_too_long() {
    let broker = Broker::start();
    runtime().block_on(async {
        for (expiry, kept) in [
            (Duration::from_secs(3600), true),
            (Duration::from_millis(200), false),
        ] {
            let gateway = gateway_with(&broker, CAPTURE_MAX_PACKET, expiry).await;
            let client_id = format!("keeper-{kept}");
            let (mut keeper, _) = Raw::login(
                &gateway,
                Version::V311,
                &client_id,
                "alice",
                "secret",
                false,
            )
            .await;
            keeper
                .send_subscribe(1, &[(&format!("v1/raw/Acme/{kept}"), 1)])
                .await;
            assert!(granted(keeper.next().await));
            drop(keeper);
            // Its session holds what is published while it is away ...
            let mut pipeline = Raw::connect(&gateway, Version::V311, "pipeline").await;
            pipeline
                .publish_qos(&format!("v1/raw/Acme/{kept}"), b"kept", 1)
                .await;
            assert!(matches!(pipeline.next().await, Some(Packet::PubAck { .. })));
            tokio::time::sleep(Duration::from_millis(400)).await; // away longer than the short expiry
                                                                  // ... unless it stayed away longer than the expiry.
            let (mut keeper, ack) = Raw::login(
                &gateway,
                Version::V311,
                &client_id,
                "alice",
                "secret",
                false,
            )
            .await;
            match ack {
                Some(Packet::ConnAck(ack)) => assert_eq!(ack.session_present, kept),
                other => panic!("{other:?}"),
            }
            let next = keeper.next_within(Duration::from_millis(500)).await;
            assert_eq!(
                matches!(next, Ok(Some(Packet::Publish(_)))),
                kept,
                "{next:?}"
            );
            assert_eq!(
                gateway.stats().expired_sessions.load(Ordering::Relaxed),
                u64::from(!kept)
            );
        }
    });
}

#[test]
fn a_user_sends_commands_to_its_own_companys_sources_only() {
    let broker = Broker::start();
    runtime().block_on(async {
        let gateway = gateway(&broker, CAPTURE_MAX_PACKET).await;
        gateway.set_source_owner("src-1", "Acme");
        gateway.set_source_owner("src-9", "Other");
        for version in [Version::V311, Version::V5] {
            let mut device = Raw::connect(&gateway, version, "src-1").await;
            assert!(granted(device.subscribe("v1/sources/src-1/cmd/+").await));
            let mut alice = Raw::connect(&gateway, version, "alice").await;
            alice.publish("v1/sources/src-1/cmd/writedata", b"{}").await;
            assert!(matches!(device.next().await, Some(Packet::Publish(_))));
            for foreign in [
                "v1/sources/src-9/cmd/writedata",
                "v1/sources/unknown/cmd/writedata",
            ] {
                let mut alice = Raw::connect(&gateway, version, "alice").await;
                alice.publish(foreign, b"{}").await;
                assert_refused(&mut alice, NOT_AUTHORIZED).await;
            }
        }
    });
}

#[test]
fn in_reason_code_mode_refusals_are_answers_and_the_connection_stays() {
    let broker = Broker::start();
    runtime().block_on(async {
        let gateway = gateway_config(
            &broker,
            CAPTURE_MAX_PACKET,
            CAPTURE_SESSION_EXPIRY,
            Deny::ReasonCode,
        )
        .await;
        for version in [Version::V311, Version::V5] {
            let v5 = version == Version::V5;
            let mut alice = Raw::connect(&gateway, version, "alice").await;
            // Every filter denied: the gateway answers; one of several: the broker's SUBACK gets
            // the denied code in its place.
            alice.send_subscribe(4, &[("v1/raw/Other/#", 1)]).await;
            match alice.next().await {
                Some(Packet::SubAck { pkid: 4, codes }) => {
                    assert!(matches!(&codes[..], [Err(_)]), "{codes:?}");
                }
                other => panic!("expected SUBACK 4, got {other:?}"),
            }
            alice
                .send_subscribe(
                    5,
                    &[
                        ("v1/raw/Other/#", 1),
                        ("v1/raw/Acme/#", 1),
                        ("v1/raw/+/#", 0),
                    ],
                )
                .await;
            match alice.next().await {
                Some(Packet::SubAck { pkid: 5, codes }) => {
                    assert!(matches!(&codes[..], [Err(_), Ok(1), Err(_)]), "{codes:?}");
                }
                other => panic!("expected SUBACK 5, got {other:?}"),
            }
            // Denied publishes: QoS 0 dropped, QoS 1 a PUBACK (0x87 under MQTT 5), QoS 2 a
            // PUBREC, and under 3.1.1 its PUBREL a PUBCOMP.
            alice.publish("v1/raw/Acme/s/C/M/K", b"dropped").await;
            alice.publish_qos("v1/raw/Acme/s/C/M/K", b"acked", 1).await;
            match alice.next().await {
                Some(Packet::PubAck { pkid: 1, refused }) => assert_eq!(refused.is_some(), v5),
                other => panic!("expected PUBACK, got {other:?}"),
            }
            alice
                .publish_qos("v1/raw/Acme/s/C/M/K", b"received", 2)
                .await;
            match alice.next().await {
                Some(Packet::PubRec { pkid: 1, refused }) => assert_eq!(refused.is_some(), v5),
                other => panic!("expected PUBREC, got {other:?}"),
            }
            if !v5 {
                alice.send(&Packet::PubRel { pkid: 1 }).await;
                assert_eq!(alice.next().await, Some(Packet::PubComp { pkid: 1 }));
            }
            // Still connected, and the allowed filter works.
            let mut pipeline = Raw::connect(&gateway, version, "pipeline").await;
            pipeline.publish("v1/raw/Acme/s/C/M/K", b"55").await;
            match alice.next().await {
                Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"55"),
                other => panic!("expected the message, got {other:?}"),
            }
        }
        assert_eq!(gateway.stats().refused_scope.load(Ordering::Relaxed), 10);
    });
}

#[test]
fn a_second_connect_or_an_mqtt_31_connect_is_refused() {
    let broker = Broker::start();
    runtime().block_on(async {
        let gateway = gateway(&broker, CAPTURE_MAX_PACKET).await;
        // A second CONNECT on a connection is a protocol error: it cannot change the login.
        let mut alice = Raw::connect(&gateway, Version::V311, "alice").await;
        alice
            .send(&Packet::Connect(Connect {
                client_id: "someone-else".to_owned(),
                keepalive: 30,
                clean: true,
                login: Some(("pipeline".to_owned(), "secret".to_owned())),
                session_expiry: None,
                receive_maximum: None,
                max_packet_size: None,
            }))
            .await;
        assert_eq!(alice.next().await, None);
        // MQTT 3.1 ("MQIsdp") is not served: CONNACK 1, "unacceptable protocol version", then
        // the close.
        let mut old = TcpStream::connect(gateway.addr()).await.unwrap();
        let mut frame = vec![0x10, 15, 0, 6];
        frame.extend_from_slice(b"MQIsdp");
        frame.extend_from_slice(&[3, 0x02, 0, 60, 0, 1, b'c']);
        old.write_all(&frame).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, old.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, [0x20, 0x02, 0x00, 0x01]);
    });
}

#[test]
fn nothing_comes_before_the_connack_even_under_latency() {
    let broker = Broker::start();
    runtime().block_on(async {
        let gateway = gateway(&broker, CAPTURE_MAX_PACKET).await;
        gateway.set_latency(Duration::from_millis(300));
        // A denied SUBSCRIBE refused while the broker's CONNACK is held by the latency (the
        // CONNECT reaches the broker at 300 ms, its CONNACK the client at 600 ms; the SUBSCRIBE is
        // sent at 450 ms): the client hears a CONNACK first, or only the close.
        let stream = TcpStream::connect(gateway.addr()).await.unwrap();
        let mut raw = Raw {
            stream,
            codec: Codec {
                version: Version::V5,
                max_incoming: usize::MAX,
            },
            buf: BytesMut::new(),
        };
        raw.send(&Packet::Connect(Connect {
            client_id: "hasty".to_owned(),
            keepalive: 30,
            clean: true,
            login: Some(("alice".to_owned(), "secret".to_owned())),
            session_expiry: None,
            receive_maximum: None,
            max_packet_size: None,
        }))
        .await;
        tokio::time::sleep(Duration::from_millis(450)).await; // the scenario's timing
        raw.send_subscribe(1, &[("v1/raw/Other/#", 0)]).await;
        match raw.next().await {
            None | Some(Packet::ConnAck(_)) => {}
            other => panic!("expected a CONNACK or the close first, got {other:?}"),
        }
    });
}
