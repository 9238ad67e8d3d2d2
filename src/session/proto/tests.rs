//! The protocol state machine, exchange by exchange, without a socket.
#![allow(clippy::many_single_char_names)] // short names keep the exchange tables readable

use super::*;
use crate::session::codec::Codec;
use proptest::prelude::*;

type E = Engine<u32, &'static str>;

fn settings(version: Version) -> Settings {
    Settings {
        version,
        client_id: "c".to_owned(),
        keepalive: Duration::from_secs(10),
        clean: false,
        inflight: 4,
        receive_maximum: 100,
        max_incoming: 1 << 20,
        max_outgoing: 1 << 20,
    }
}

/// What the engine wrote, as packets (the broker's view).
fn written(engine: &mut E) -> Vec<Packet> {
    let codec = Codec {
        version: engine.version(),
        max_incoming: usize::MAX,
    };
    let mut buf = engine.take_output();
    let mut packets = Vec::new();
    while let Some(p) = codec.decode(&mut buf).unwrap() {
        packets.push(p);
    }
    assert!(buf.is_empty());
    packets
}

fn outputs(engine: &mut E) -> Vec<Output<u32, &'static str>> {
    std::iter::from_fn(|| engine.poll_output()).collect()
}

fn connack(session_present: bool) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present,
        refused: None,
        receive_maximum: None,
        max_packet_size: None,
        server_keepalive: None,
    })
}

fn connected(version: Version, now: Instant) -> E {
    let mut e = E::new(settings(version), now);
    e.connect(Some(("u".into(), "p".into())), now);
    let sent = written(&mut e);
    assert!(matches!(&sent[..], [Packet::Connect(c)] if c.login == Some(("u".into(), "p".into()))));
    e.handle(connack(false), now).unwrap();
    assert_eq!(
        outputs(&mut e),
        vec![Output::Connected {
            session_present: false
        }]
    );
    e
}

fn msg(topic: &str, qos: u8) -> Outgoing {
    Outgoing {
        topic: topic.to_owned(),
        payload: Bytes::from_static(b"x"),
        qos,
        retain: false,
    }
}

fn incoming(pkid: u16, qos: u8) -> Packet {
    Packet::Publish(Publish {
        topic: "t".into(),
        payload: Bytes::from_static(b"1"),
        qos,
        retain: false,
        dup: false,
        pkid,
        sub_ids: vec![],
    })
}

#[test]
fn connect_advertises_our_limits_under_mqtt5() {
    let now = Instant::now();
    let mut e = E::new(settings(Version::V5), now);
    e.connect(None, now);
    let sent = written(&mut e);
    let [Packet::Connect(c)] = &sent[..] else {
        panic!("{sent:?}")
    };
    assert_eq!(c.receive_maximum, Some(100));
    assert_eq!(c.max_packet_size, Some(1 << 20));
    assert_eq!(
        c.session_expiry,
        Some(u32::MAX),
        "a persistent session outlives the connection"
    );
}

#[test]
fn qos1_window_follows_the_brokers_receive_maximum() {
    let now = Instant::now();
    let mut e = E::new(settings(Version::V5), now);
    e.connect(None, now);
    written(&mut e);
    e.handle(
        Packet::ConnAck(ConnAck {
            session_present: false,
            refused: None,
            receive_maximum: Some(2),
            max_packet_size: Some(100),
            server_keepalive: None,
        }),
        now,
    )
    .unwrap();
    outputs(&mut e);
    assert!(e.has_window());
    let a = e.publish(msg("a", 1), 1, now).unwrap();
    let b = e.publish(msg("a", 1), 2, now).unwrap();
    assert_ne!(a, b);
    assert!(!e.has_window(), "the broker takes two at a time");
    e.handle(
        Packet::PubAck {
            pkid: b,
            refused: None,
        },
        now,
    )
    .unwrap();
    assert_eq!(outputs(&mut e), vec![Output::Published(2, Ok(()))]);
    assert!(e.has_window());
    // The broker's Maximum Packet Size is obeyed.
    let big = Outgoing {
        payload: Bytes::from(vec![0u8; 200]),
        ..msg("a", 0)
    };
    let (err, tag) = e.publish(big, 9, now).unwrap_err();
    assert_eq!((err.limit, tag), (100, 9));
    assert!(err.size > 200);
}

#[test]
fn qos2_both_ways() {
    let now = Instant::now();
    let mut e = connected(Version::V311, now);
    let pkid = e.publish(msg("a", 2), 7, now).unwrap();
    written(&mut e);
    e.handle(
        Packet::PubRec {
            pkid,
            refused: None,
        },
        now,
    )
    .unwrap();
    assert_eq!(written(&mut e), vec![Packet::PubRel { pkid }]);
    assert!(outputs(&mut e).is_empty(), "done only at PUBCOMP");
    e.handle(Packet::PubComp { pkid }, now).unwrap();
    assert_eq!(outputs(&mut e), vec![Output::Published(7, Ok(()))]);
    // Incoming: PUBREC when released, a resend is not delivered twice, PUBCOMP on PUBREL.
    e.handle(incoming(30, 2), now).unwrap();
    assert!(matches!(&outputs(&mut e)[..], [Output::Message(p)] if p.pkid == 30));
    e.handle(incoming(30, 2), now).unwrap();
    assert!(outputs(&mut e).is_empty());
    assert!(
        written(&mut e).is_empty(),
        "nothing acknowledged before release"
    );
    e.release(30, now);
    assert_eq!(
        written(&mut e),
        vec![Packet::PubRec {
            pkid: 30,
            refused: None
        }]
    );
    e.handle(incoming(30, 2), now).unwrap();
    assert!(
        outputs(&mut e).is_empty(),
        "a resend after PUBREC is not a new message"
    );
    assert_eq!(
        written(&mut e),
        vec![Packet::PubRec {
            pkid: 30,
            refused: None
        }]
    );
    e.handle(Packet::PubRel { pkid: 30 }, now).unwrap();
    assert_eq!(written(&mut e), vec![Packet::PubComp { pkid: 30 }]);
}

#[test]
fn acknowledgements_leave_in_arrival_order() {
    let now = Instant::now();
    let mut e = connected(Version::V311, now);
    for pkid in [5, 6, 7] {
        e.handle(incoming(pkid, 1), now).unwrap();
    }
    e.release(7, now);
    e.release(6, now);
    assert!(
        written(&mut e).is_empty(),
        "5 still held: nothing may pass it"
    );
    e.release(5, now);
    let acks: Vec<u16> = written(&mut e)
        .into_iter()
        .map(|p| match p {
            Packet::PubAck { pkid, .. } => pkid,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(acks, vec![5, 6, 7]);
}

#[test]
fn a_resumed_session_resends_with_dup_in_order_and_a_new_one_settles_pubrel() {
    let now = Instant::now();
    let mut e = connected(Version::V311, now);
    let a = e.publish(msg("a", 1), 1, now).unwrap();
    let b = e.publish(msg("b", 2), 2, now).unwrap();
    let c = e.publish(msg("c", 1), 3, now).unwrap();
    e.handle(
        Packet::PubRec {
            pkid: b,
            refused: None,
        },
        now,
    )
    .unwrap();
    written(&mut e);
    e.disconnected();
    e.connect(None, now);
    written(&mut e);
    e.handle(connack(true), now).unwrap();
    let resent = written(&mut e);
    assert_eq!(resent.len(), 3);
    assert!(matches!(&resent[0], Packet::Publish(p) if p.pkid == a && p.dup));
    assert_eq!(resent[1], Packet::PubRel { pkid: b });
    assert!(matches!(&resent[2], Packet::Publish(p) if p.pkid == c && p.dup));
    outputs(&mut e);
    // The broker forgets the session: the released one is done, the others go again (no DUP).
    e.disconnected();
    e.connect(None, now);
    written(&mut e);
    e.handle(connack(false), now).unwrap();
    let resent = written(&mut e);
    assert_eq!(resent.len(), 2);
    assert!(resent
        .iter()
        .all(|p| matches!(p, Packet::Publish(p) if !p.dup)));
    assert_eq!(
        outputs(&mut e),
        vec![
            Output::Published(2, Ok(())),
            Output::Connected {
                session_present: false
            }
        ]
    );
}

#[test]
fn keepalive_pings_and_notices_silence_unless_paused() {
    let t0 = Instant::now();
    let mut e = connected(Version::V311, t0);
    let k = Duration::from_secs(10);
    assert_eq!(e.next_deadline(), Some(t0 + k));
    e.tick(t0 + k / 2).unwrap();
    assert!(written(&mut e).is_empty());
    e.tick(t0 + k).unwrap();
    assert_eq!(written(&mut e), vec![Packet::PingReq]);
    assert_eq!(e.next_deadline(), Some(t0 + k + k / 2));
    e.handle(Packet::PingResp, t0 + k + Duration::from_secs(1))
        .unwrap();
    e.tick(t0 + 2 * k + Duration::from_secs(1)).unwrap();
    assert_eq!(written(&mut e), vec![Packet::PingReq]);
    let sent = t0 + 2 * k + Duration::from_secs(1);
    // Paused: the answer cannot be read, so no deadline; pings still go out when due.
    e.set_reading(false, sent);
    for i in 1..=10 {
        assert_eq!(e.next_deadline(), Some(sent + (i - 1) * k + k));
        assert_eq!(e.tick(sent + i * k), Ok(()));
        assert_eq!(
            written(&mut e),
            vec![Packet::PingReq],
            "a ping every keepalive while paused"
        );
    }
    e.set_reading(true, sent + 10 * k);
    assert_eq!(e.next_deadline(), Some(sent + 10 * k + k / 2));
    assert_eq!(
        e.tick(sent + 10 * k + k / 2),
        Err(Broken::PingTimeout(k / 2))
    );
}

#[test]
fn packet_ids_wrap_and_skip_those_in_flight() {
    let now = Instant::now();
    let mut s = settings(Version::V311);
    s.inflight = u16::MAX;
    let mut e = E::new(s, now);
    e.connect(None, now);
    e.handle(connack(false), now).unwrap();
    let first = e.publish(msg("a", 1), 0, now).unwrap();
    assert_eq!(first, 1);
    let mut ids = HashSet::new();
    ids.insert(first);
    for tag in 1..70_000u32 {
        let pkid = e.publish(msg("a", 1), tag, now).unwrap();
        assert_ne!(pkid, 0);
        e.handle(
            Packet::PubAck {
                pkid,
                refused: None,
            },
            now,
        )
        .unwrap();
        if tag == 1 {
            assert_eq!(pkid, 2);
        }
        let _ = e.take_output();
        assert_ne!(pkid, first, "id 1 is still in flight");
    }
    assert_eq!(e.in_flight(), 1);
}

#[test]
fn a_refused_login_and_a_server_disconnect_are_errors() {
    let now = Instant::now();
    let mut e = E::new(settings(Version::V5), now);
    e.connect(None, now);
    let refused = Packet::ConnAck(ConnAck {
        session_present: false,
        refused: Some(crate::session::codec::LoginRefusal {
            words: "NotAuthorized".into(),
            credentials: true,
        }),
        receive_maximum: None,
        max_packet_size: None,
        server_keepalive: None,
    });
    assert!(matches!(e.handle(refused, now), Err(Broken::Refused(r)) if r.credentials));
    let mut e = connected(Version::V5, now);
    let err = e
        .handle(
            Packet::Disconnect {
                reason: 0x8E,
                words: Some("SessionTakenOver".into()),
            },
            now,
        )
        .unwrap_err();
    assert_eq!(err, Broken::ServerDisconnect("SessionTakenOver".into()));
}

/// A step of a random exchange.
#[derive(Debug, Clone)]
enum Step {
    Publish(u8, u8),
    AckSome(usize),
    Reconnect(bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..3, 1u8..3).prop_map(|(t, q)| Step::Publish(t, q)),
        (0usize..8).prop_map(Step::AckSome),
        any::<bool>().prop_map(Step::Reconnect),
    ]
}

proptest! {
    /// Whatever the interleaving of publishes, acknowledgements (in any order) and reconnects:
    /// ids are unique while in flight, every publish is settled exactly once, and each topic's
    /// publishes are settled in order when the broker acknowledges in order.
    #[test]
    fn every_publish_settles_exactly_once(steps in proptest::collection::vec(step(), 1..80)) {
        let now = Instant::now();
        let mut e = connected(Version::V311, now);
        let mut next = 0u32;
        let mut queued: VecDeque<(u32, Outgoing)> = VecDeque::new();
        let mut settled: Vec<u32> = Vec::new();
        // What the broker has seen and not acknowledged: pkid -> (qos, released?)
        let mut broker: BTreeMap<u16, (u8, bool)> = BTreeMap::new();
        let mut connected_now = true;
        for s in steps {
            match s {
                Step::Publish(t, q) => {
                    queued.push_back((next, msg(&format!("t{t}"), q)));
                    next += 1;
                }
                Step::AckSome(n) => {
                    if connected_now {
                        let ids: Vec<u16> = broker.keys().copied().take(n).collect();
                        for pkid in ids {
                            let (qos, released) = broker[&pkid];
                            if qos == 1 {
                                e.handle(Packet::PubAck { pkid, refused: None }, now).unwrap();
                                broker.remove(&pkid);
                            } else if released {
                                e.handle(Packet::PubComp { pkid }, now).unwrap();
                                broker.remove(&pkid);
                            } else {
                                e.handle(Packet::PubRec { pkid, refused: None }, now).unwrap();
                                broker.insert(pkid, (2, true));
                            }
                        }
                    }
                }
                Step::Reconnect(present) => {
                    e.disconnected();
                    e.connect(None, now);
                    e.handle(connack(present), now).unwrap();
                    if !present {
                        broker.retain(|_, (_, released)| !*released);
                    }
                    connected_now = true;
                }
            }
            while e.has_window() {
                let Some((tag, m)) = queued.pop_front() else { break };
                let pkid = e.publish(m, tag, now).unwrap();
                prop_assert!(!broker.contains_key(&pkid), "id {} reused while in flight", pkid);
                broker.insert(pkid, (e_qos(&e, pkid), false));
            }
            for p in written(&mut e) {
                if let Packet::Publish(p) = p {
                    broker.entry(p.pkid).or_insert((p.qos, false));
                }
            }
            for o in outputs(&mut e) {
                if let Output::Published(tag, r) = o {
                    prop_assert!(r.is_ok());
                    prop_assert!(!settled.contains(&tag), "settled twice: {}", tag);
                    settled.push(tag);
                }
            }
        }
        // Drain: the broker acknowledges everything.
        for _ in 0..400 {
            let ids: Vec<u16> = broker.keys().copied().collect();
            for pkid in ids {
                let (qos, released) = broker[&pkid];
                if qos == 1 || released {
                    let p = if qos == 1 { Packet::PubAck { pkid, refused: None } } else { Packet::PubComp { pkid } };
                    e.handle(p, now).unwrap();
                    broker.remove(&pkid);
                } else {
                    e.handle(Packet::PubRec { pkid, refused: None }, now).unwrap();
                    broker.insert(pkid, (2, true));
                }
            }
            while e.has_window() {
                let Some((tag, m)) = queued.pop_front() else { break };
                let pkid = e.publish(m, tag, now).unwrap();
                broker.insert(pkid, (e_qos(&e, pkid), false));
            }
            let _ = e.take_output();
            for o in outputs(&mut e) {
                if let Output::Published(tag, _) = o {
                    prop_assert!(!settled.contains(&tag), "settled twice: {}", tag);
                    settled.push(tag);
                }
            }
            if broker.is_empty() && queued.is_empty() {
                break;
            }
        }
        settled.sort_unstable();
        prop_assert_eq!(settled, (0..next).collect::<Vec<_>>());
        prop_assert_eq!(e.in_flight(), 0);
    }

    /// Acknowledgements of incoming messages leave in arrival order, however they are released.
    #[test]
    fn incoming_acks_keep_arrival_order(order in Just((1u16..40).collect::<Vec<_>>()).prop_shuffle()) {
        let now = Instant::now();
        let mut e = connected(Version::V5, now);
        for pkid in 1u16..40 {
            e.handle(incoming(pkid, 1), now).unwrap();
        }
        for pkid in order {
            e.release(pkid, now);
        }
        let acks: Vec<u16> = written(&mut e)
            .into_iter()
            .filter_map(|p| match p { Packet::PubAck { pkid, .. } => Some(pkid), _ => None })
            .collect();
        prop_assert_eq!(acks, (1u16..40).collect::<Vec<_>>());
    }
}

fn e_qos(e: &E, pkid: u16) -> u8 {
    match e.flights.get(&pkid) {
        Some(Flight::Sent { message, .. }) => message.qos,
        _ => 1,
    }
}
