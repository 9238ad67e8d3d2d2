//! MQTT packets as the engine sees them, one type for MQTT 3.1.1 and 5, read and written with
//! rumqttc's `mqttbytes` codec (the only part of rumqttc we use; its version is pinned exactly).

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS as QoS4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as QoS5;

/// The MQTT protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

/// An application message, both ways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
    /// MQTT 5 subscription identifiers (incoming only).
    pub sub_ids: Vec<usize>,
}

/// What CONNECT carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub client_id: String,
    pub keepalive: u16,
    pub clean: bool,
    pub login: Option<(String, String)>,
    /// MQTT 5: keep the session this long after a disconnect (seconds).
    pub session_expiry: Option<u32>,
    /// MQTT 5: the most unacknowledged QoS 1/2 messages the broker may send us.
    pub receive_maximum: Option<u16>,
    /// MQTT 5: the largest packet we accept.
    pub max_packet_size: Option<u32>,
}

/// A refused CONNECT, in words, and whether the credentials were the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRefusal {
    pub words: String,
    pub credentials: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub refused: Option<LoginRefusal>,
    /// MQTT 5: the most unacknowledged QoS 1/2 publishes the broker takes from us.
    pub receive_maximum: Option<u16>,
    /// MQTT 5: the largest packet the broker accepts.
    pub max_packet_size: Option<u32>,
    /// MQTT 5: a keepalive the broker imposes.
    pub server_keepalive: Option<u16>,
}

/// One MQTT control packet. Reason codes of MQTT 5 are kept as numbers with their words where a
/// user may see them; MQTT 3.1.1 packets have success codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Connect),
    ConnAck(ConnAck),
    Publish(Publish),
    /// `refused`: an MQTT 5 failure reason in words.
    PubAck {
        pkid: u16,
        refused: Option<String>,
    },
    PubRec {
        pkid: u16,
        refused: Option<String>,
    },
    PubRel {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
        sub_id: Option<usize>,
    },
    /// Per filter: the granted QoS, or the refusal in words.
    SubAck {
        pkid: u16,
        codes: Vec<Result<u8, String>>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    UnsubAck {
        pkid: u16,
    },
    PingReq,
    PingResp,
    /// `reason`: MQTT 5's reason code (0 under 3.1.1) and its words.
    Disconnect {
        reason: u8,
        words: Option<String>,
    },
}

/// Why bytes from the broker could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A packet larger than our limit: `frame` bytes in all, to be skipped.
    TooLarge { frame: usize, limit: usize },
    /// Bytes that are not MQTT: the connection cannot go on.
    Malformed(String),
}

fn qos4(level: u8) -> QoS4 {
    match level {
        0 => QoS4::AtMostOnce,
        1 => QoS4::AtLeastOnce,
        _ => QoS4::ExactlyOnce,
    }
}

fn qos5(level: u8) -> QoS5 {
    match level {
        0 => QoS5::AtMostOnce,
        1 => QoS5::AtLeastOnce,
        _ => QoS5::ExactlyOnce,
    }
}

/// The length of the packet at the start of `buf` (fixed header included), when its header is there.
pub fn frame_length(buf: &[u8]) -> Option<usize> {
    let mut len: usize = 0;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(1 + (i + 1) + len);
        }
    }
    None
}

/// Reads and writes packets of one protocol version.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    pub version: Version,
    /// The largest packet accepted from the broker.
    pub max_incoming: usize,
}

impl Codec {
    /// Takes the next whole packet off `buf`; `Ok(None)` when more bytes are needed.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let Some(frame) = frame_length(buf) else {
            if buf.len() >= 5 {
                return Err(DecodeError::Malformed(
                    "malformed remaining length".to_owned(),
                ));
            }
            return Ok(None);
        };
        if frame > self.max_incoming {
            return Err(DecodeError::TooLarge {
                frame,
                limit: self.max_incoming,
            });
        }
        if buf.len() < frame {
            return Ok(None);
        }
        if self.version == Version::V5 && buf[0] == 0xE0 && frame <= 3 {
            // A DISCONNECT with at most a reason code (MQTT 5 section 3.14.2.2.1: the property
            // length may be left out), which mqttbytes 0.25 cannot read.
            let reason = if frame == 3 { buf[2] } else { 0 };
            buf.advance(frame);
            let mut whole = BytesMut::from(&[0xE0, 0x02, reason, 0x00][..]);
            return v5::Packet::read(&mut whole, None)
                .map_err(|e| DecodeError::Malformed(e.to_string()))
                .and_then(from_v5)
                .map(Some);
        }
        let packet = match self.version {
            Version::V311 => v4::Packet::read(buf, usize::MAX)
                .map_err(|e| DecodeError::Malformed(e.to_string()))
                .map(from_v4),
            Version::V5 => v5::Packet::read(buf, None)
                .map_err(|e| DecodeError::Malformed(e.to_string()))
                .and_then(from_v5),
        };
        packet.map(Some)
    }

    /// Appends `packet` to `buf`.
    pub fn encode(&self, packet: &Packet, buf: &mut BytesMut) -> Result<(), String> {
        if let (Version::V5, Packet::Disconnect { reason, .. }) = (self.version, packet) {
            // Written here: mqttbytes 0.25 writes a reason code with a remaining length one short.
            match reason {
                0 => buf.extend_from_slice(&[0xE0, 0x00]),
                code => buf.extend_from_slice(&[0xE0, 0x02, *code, 0x00]),
            }
            return Ok(());
        }
        match self.version {
            Version::V311 => to_v4(packet)
                .write(buf, usize::MAX)
                .map(drop)
                .map_err(|e| e.to_string()),
            Version::V5 => to_v5(packet)
                .write(buf, None)
                .map(drop)
                .map_err(|e| e.to_string()),
        }
    }
}

/// The encoded size of a PUBLISH with this topic and payload length (QoS 1/2 carry a packet id).
pub fn publish_size(version: Version, topic: &str, payload: usize, qos: u8) -> usize {
    let mut remaining = 2 + topic.len() + payload + if qos > 0 { 2 } else { 0 };
    if version == Version::V5 {
        remaining += 1; // empty property length
    }
    let header = match remaining {
        0..=127 => 2,
        128..=16_383 => 3,
        16_384..=2_097_151 => 4,
        _ => 5,
    };
    header + remaining
}

#[allow(clippy::too_many_lines)] // one arm per packet type
fn from_v4(packet: v4::Packet) -> Packet {
    use v4::{ConnectReturnCode as C, SubscribeReasonCode as S};
    match packet {
        v4::Packet::ConnAck(ack) => {
            let refused = match ack.code {
                C::Success => None,
                C::BadUserNamePassword => Some(LoginRefusal {
                    words: "bad username or password".to_owned(),
                    credentials: true,
                }),
                C::NotAuthorized => Some(LoginRefusal {
                    words: "not authorized".to_owned(),
                    credentials: true,
                }),
                other => Some(LoginRefusal {
                    words: format!("{other:?}"),
                    credentials: false,
                }),
            };
            Packet::ConnAck(ConnAck {
                session_present: ack.session_present,
                refused,
                receive_maximum: None,
                max_packet_size: None,
                server_keepalive: None,
            })
        }
        v4::Packet::Publish(p) => Packet::Publish(Publish {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos as u8,
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
            sub_ids: Vec::new(),
        }),
        v4::Packet::PubAck(a) => Packet::PubAck {
            pkid: a.pkid,
            refused: None,
        },
        v4::Packet::PubRec(a) => Packet::PubRec {
            pkid: a.pkid,
            refused: None,
        },
        v4::Packet::PubRel(a) => Packet::PubRel { pkid: a.pkid },
        v4::Packet::PubComp(a) => Packet::PubComp { pkid: a.pkid },
        v4::Packet::SubAck(a) => Packet::SubAck {
            pkid: a.pkid,
            codes: a
                .return_codes
                .iter()
                .map(|c| match c {
                    S::Success(q) => Ok(*q as u8),
                    S::Failure => Err("the broker answered SUBACK 0x80".to_owned()),
                })
                .collect(),
        },
        v4::Packet::UnsubAck(a) => Packet::UnsubAck { pkid: a.pkid },
        v4::Packet::PingReq => Packet::PingReq,
        v4::Packet::PingResp => Packet::PingResp,
        v4::Packet::Disconnect => Packet::Disconnect {
            reason: 0,
            words: None,
        },
        v4::Packet::Connect(c) => Packet::Connect(Connect {
            client_id: c.client_id,
            keepalive: c.keep_alive,
            clean: c.clean_session,
            login: c.login.map(|l| (l.username, l.password)),
            session_expiry: None,
            receive_maximum: None,
            max_packet_size: None,
        }),
        v4::Packet::Subscribe(s) => Packet::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
            sub_id: None,
        },
        v4::Packet::Unsubscribe(u) => Packet::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
    }
}

#[allow(clippy::too_many_lines)] // one arm per packet type
fn from_v5(packet: v5::Packet) -> Result<Packet, DecodeError> {
    use v5::{
        ConnectReturnCode as C, PubAckReason as A, PubRecReason as R, SubscribeReasonCode as S,
    };
    Ok(match packet {
        v5::Packet::ConnAck(ack) => {
            let refused = match ack.code {
                C::Success => None,
                code => Some(LoginRefusal {
                    words: format!("{code:?}"),
                    credentials: matches!(
                        code,
                        C::BadUserNamePassword
                            | C::NotAuthorized
                            | C::Banned
                            | C::BadAuthenticationMethod
                    ),
                }),
            };
            let props = ack.properties.as_ref();
            Packet::ConnAck(ConnAck {
                session_present: ack.session_present,
                refused,
                receive_maximum: props.and_then(|p| p.receive_max),
                max_packet_size: props.and_then(|p| p.max_packet_size),
                server_keepalive: props.and_then(|p| p.server_keep_alive),
            })
        }
        v5::Packet::Publish(p) => Packet::Publish(Publish {
            topic: String::from_utf8(p.topic.to_vec())
                .map_err(|_| DecodeError::Malformed("a PUBLISH topic is not UTF-8".to_owned()))?,
            payload: p.payload,
            qos: p.qos as u8,
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
            sub_ids: p
                .properties
                .map(|props| props.subscription_identifiers)
                .unwrap_or_default(),
        }),
        v5::Packet::PubAck(a) => Packet::PubAck {
            pkid: a.pkid,
            refused: match a.reason {
                A::Success | A::NoMatchingSubscribers => None,
                other => Some(format!("the broker answered PUBACK {other:?}")),
            },
        },
        v5::Packet::PubRec(a) => Packet::PubRec {
            pkid: a.pkid,
            refused: match a.reason {
                R::Success | R::NoMatchingSubscribers => None,
                other => Some(format!("the broker answered PUBREC {other:?}")),
            },
        },
        v5::Packet::PubRel(a) => Packet::PubRel { pkid: a.pkid },
        v5::Packet::PubComp(a) => Packet::PubComp { pkid: a.pkid },
        v5::Packet::SubAck(a) => Packet::SubAck {
            pkid: a.pkid,
            codes: a
                .return_codes
                .iter()
                .map(|c| match c {
                    S::Success(q) => Ok(*q as u8),
                    other => Err(format!("the broker answered SUBACK {other:?}")),
                })
                .collect(),
        },
        v5::Packet::UnsubAck(a) => Packet::UnsubAck { pkid: a.pkid },
        v5::Packet::PingReq(_) => Packet::PingReq,
        v5::Packet::PingResp(_) => Packet::PingResp,
        v5::Packet::Disconnect(d) => Packet::Disconnect {
            reason: d.reason_code as u8,
            words: Some(format!(
                "{:?}{}",
                d.reason_code,
                d.properties
                    .and_then(|p| p.reason_string)
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            )),
        },
        v5::Packet::Connect(c, _, login) => {
            let props = c.properties.unwrap_or_else(v5::ConnectProperties::new);
            Packet::Connect(Connect {
                client_id: c.client_id,
                keepalive: c.keep_alive,
                clean: c.clean_start,
                login: login.map(|l| (l.username, l.password)),
                session_expiry: props.session_expiry_interval,
                receive_maximum: props.receive_maximum,
                max_packet_size: props.max_packet_size,
            })
        }
        v5::Packet::Subscribe(s) => Packet::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, f.qos as u8))
                .collect(),
            sub_id: s.properties.and_then(|p| p.id),
        },
        v5::Packet::Unsubscribe(u) => Packet::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::Auth(_) => {
            return Err(DecodeError::Malformed(
                "AUTH (enhanced authentication) is not supported".to_owned(),
            ))
        }
    })
}

fn to_v4(packet: &Packet) -> v4::Packet {
    match packet {
        Packet::Connect(c) => {
            let mut connect = v4::Connect::new(c.client_id.clone());
            connect.keep_alive = c.keepalive;
            connect.clean_session = c.clean;
            connect.login = c
                .login
                .as_ref()
                .map(|(u, p)| v4::Login::new(u.clone(), p.clone()));
            v4::Packet::Connect(connect)
        }
        Packet::ConnAck(a) => v4::Packet::ConnAck(v4::ConnAck::new(
            if a.refused.is_some() {
                v4::ConnectReturnCode::NotAuthorized
            } else {
                v4::ConnectReturnCode::Success
            },
            a.session_present,
        )),
        Packet::Publish(p) => v4::Packet::Publish(v4::Publish {
            dup: p.dup,
            qos: qos4(p.qos),
            retain: p.retain,
            topic: p.topic.clone(),
            pkid: p.pkid,
            payload: p.payload.clone(),
        }),
        Packet::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
        Packet::PubRec { pkid, .. } => v4::Packet::PubRec(v4::PubRec::new(*pkid)),
        Packet::PubRel { pkid } => v4::Packet::PubRel(v4::PubRel::new(*pkid)),
        Packet::PubComp { pkid } => v4::Packet::PubComp(v4::PubComp::new(*pkid)),
        Packet::Subscribe { pkid, filters, .. } => {
            let mut sub = v4::Subscribe::new_many(
                filters
                    .iter()
                    .map(|(f, q)| v4::SubscribeFilter::new(f.clone(), qos4(*q))),
            );
            sub.pkid = *pkid;
            v4::Packet::Subscribe(sub)
        }
        Packet::SubAck { pkid, codes } => v4::Packet::SubAck(v4::SubAck::new(
            *pkid,
            codes
                .iter()
                .map(|c| match c {
                    Ok(q) => v4::SubscribeReasonCode::Success(qos4(*q)),
                    Err(_) => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Packet::Unsubscribe { pkid, filters } => v4::Packet::Unsubscribe(v4::Unsubscribe {
            pkid: *pkid,
            topics: filters.clone(),
        }),
        Packet::UnsubAck { pkid } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
        Packet::PingReq => v4::Packet::PingReq,
        Packet::PingResp => v4::Packet::PingResp,
        Packet::Disconnect { .. } => v4::Packet::Disconnect,
    }
}

#[allow(clippy::too_many_lines)] // one arm per packet type
fn to_v5(packet: &Packet) -> v5::Packet {
    match packet {
        Packet::Connect(c) => {
            let properties = v5::ConnectProperties {
                session_expiry_interval: c.session_expiry,
                receive_maximum: c.receive_maximum,
                max_packet_size: c.max_packet_size,
                ..v5::ConnectProperties::new()
            };
            let connect = v5::Connect {
                keep_alive: c.keepalive,
                client_id: c.client_id.clone(),
                clean_start: c.clean,
                properties: Some(properties),
            };
            let login = c
                .login
                .as_ref()
                .map(|(u, p)| v5::Login::new(u.clone(), p.clone()));
            v5::Packet::Connect(connect, None, login)
        }
        Packet::ConnAck(a) => v5::Packet::ConnAck(v5::ConnAck {
            session_present: a.session_present,
            code: if a.refused.is_some() {
                v5::ConnectReturnCode::NotAuthorized
            } else {
                v5::ConnectReturnCode::Success
            },
            properties: None,
        }),
        Packet::Publish(p) => v5::Packet::Publish(v5::Publish {
            dup: p.dup,
            qos: qos5(p.qos),
            retain: p.retain,
            topic: Bytes::copy_from_slice(p.topic.as_bytes()),
            pkid: p.pkid,
            payload: p.payload.clone(),
            properties: if p.sub_ids.is_empty() {
                None
            } else {
                Some(v5::PublishProperties {
                    subscription_identifiers: p.sub_ids.clone(),
                    ..Default::default()
                })
            },
        }),
        Packet::PubAck { pkid, refused } => {
            let mut ack = v5::PubAck::new(*pkid, None);
            if refused.is_some() {
                ack.reason = v5::PubAckReason::NotAuthorized;
            }
            v5::Packet::PubAck(ack)
        }
        Packet::PubRec { pkid, refused } => {
            let mut rec = v5::PubRec::new(*pkid, None);
            if refused.is_some() {
                rec.reason = v5::PubRecReason::NotAuthorized;
            }
            v5::Packet::PubRec(rec)
        }
        Packet::PubRel { pkid } => v5::Packet::PubRel(v5::PubRel::new(*pkid, None)),
        Packet::PubComp { pkid } => v5::Packet::PubComp(v5::PubComp::new(*pkid, None)),
        Packet::Subscribe {
            pkid,
            filters,
            sub_id,
        } => {
            let mut sub = v5::Subscribe::new_many(
                filters
                    .iter()
                    .map(|(f, q)| v5::Filter::new(f.clone(), qos5(*q))),
                sub_id.map(|id| v5::SubscribeProperties {
                    id: Some(id),
                    user_properties: Vec::new(),
                }),
            );
            sub.pkid = *pkid;
            v5::Packet::Subscribe(sub)
        }
        Packet::SubAck { pkid, codes } => v5::Packet::SubAck(v5::SubAck {
            pkid: *pkid,
            return_codes: codes
                .iter()
                .map(|c| match c {
                    Ok(q) => v5::SubscribeReasonCode::Success(qos5(*q)),
                    Err(_) => v5::SubscribeReasonCode::NotAuthorized,
                })
                .collect(),
            properties: None,
        }),
        Packet::Unsubscribe { pkid, filters } => {
            let mut unsub =
                v5::Unsubscribe::new(filters.first().cloned().unwrap_or_default(), None);
            unsub.filters.clone_from(filters);
            unsub.pkid = *pkid;
            v5::Packet::Unsubscribe(unsub)
        }
        Packet::UnsubAck { pkid } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid: *pkid,
            reasons: vec![v5::UnsubAckReason::Success],
            properties: None,
        }),
        Packet::PingReq => v5::Packet::PingReq(v5::PingReq),
        Packet::PingResp => v5::Packet::PingResp(v5::PingResp),
        Packet::Disconnect { reason, .. } => {
            let mut d = v5::Disconnect::new(v5::DisconnectReasonCode::NormalDisconnection);
            if *reason == 0x8E {
                d.reason_code = v5::DisconnectReasonCode::SessionTakenOver;
            } else if *reason == 0x95 {
                d.reason_code = v5::DisconnectReasonCode::PacketTooLarge;
            } else if *reason == 0x87 {
                d.reason_code = v5::DisconnectReasonCode::NotAuthorized;
            } else if *reason != 0 {
                d.reason_code = v5::DisconnectReasonCode::UnspecifiedError;
            }
            v5::Packet::Disconnect(d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mqtt5_disconnect_with_or_without_properties() {
        let codec = Codec {
            version: Version::V5,
            max_incoming: 1 << 20,
        };
        // What a broker may send: no reason, a reason without a property length, or both.
        for (bytes, reason) in [
            (&[0xE0, 0x00][..], 0),
            (&[0xE0, 0x01, 0x87][..], 0x87),
            (&[0xE0, 0x02, 0x87, 0x00][..], 0x87),
        ] {
            let mut buf = BytesMut::from(bytes);
            match codec.decode(&mut buf).unwrap() {
                Some(Packet::Disconnect { reason: got, .. }) => assert_eq!(got, reason),
                other => panic!("{bytes:?}: {other:?}"),
            }
            assert!(buf.is_empty());
        }
        // What we write is whole: remaining length 2 for a reason code.
        let mut out = BytesMut::new();
        codec
            .encode(
                &Packet::Disconnect {
                    reason: 0x95,
                    words: None,
                },
                &mut out,
            )
            .unwrap();
        assert_eq!(&out[..], &[0xE0, 0x02, 0x95, 0x00]);
    }

    fn roundtrip(version: Version, packet: &Packet) -> Packet {
        let codec = Codec {
            version,
            max_incoming: 1 << 20,
        };
        let mut buf = BytesMut::new();
        codec.encode(packet, &mut buf).unwrap();
        let whole = buf.clone();
        // Byte by byte: nothing until the last byte, then the packet.
        let mut partial = BytesMut::new();
        for (i, byte) in whole.iter().enumerate() {
            partial.extend_from_slice(&[*byte]);
            let got = codec.decode(&mut partial).unwrap();
            if i + 1 < whole.len() {
                assert!(got.is_none(), "a packet before its last byte");
            } else {
                return got.unwrap();
            }
        }
        unreachable!()
    }

    #[test]
    fn packets_the_broker_sends_round_trip_in_both_versions() {
        let publish = Packet::Publish(Publish {
            topic: "a/b".to_owned(),
            payload: Bytes::from_static(b"{\"v\":1}"),
            qos: 1,
            retain: true,
            dup: true,
            pkid: 7,
            sub_ids: Vec::new(),
        });
        for version in [Version::V311, Version::V5] {
            assert_eq!(roundtrip(version, &publish), publish);
            for packet in [
                Packet::PubAck {
                    pkid: 3,
                    refused: None,
                },
                Packet::PubRec {
                    pkid: 4,
                    refused: None,
                },
                Packet::PubRel { pkid: 5 },
                Packet::PubComp { pkid: 6 },
                Packet::UnsubAck { pkid: 9 },
                Packet::PingResp,
                Packet::SubAck {
                    pkid: 2,
                    codes: vec![Ok(1), Ok(0)],
                },
            ] {
                assert_eq!(roundtrip(version, &packet), packet, "{version:?}");
            }
        }
        let tagged = Packet::Publish(Publish {
            sub_ids: vec![3, 9],
            ..match publish {
                Packet::Publish(p) => p,
                _ => unreachable!(),
            }
        });
        assert_eq!(roundtrip(Version::V5, &tagged), tagged);
    }

    #[test]
    fn publish_size_is_exact() {
        for version in [Version::V311, Version::V5] {
            for (len, qos) in [(0, 0), (10, 1), (200, 0), (20_000, 1), (3_000_000, 2)] {
                let packet = Packet::Publish(Publish {
                    topic: "v1/raw/x".to_owned(),
                    payload: Bytes::from(vec![0u8; len]),
                    qos,
                    retain: false,
                    dup: false,
                    pkid: u16::from(qos > 0),
                    sub_ids: Vec::new(),
                });
                let codec = Codec {
                    version,
                    max_incoming: usize::MAX,
                };
                let mut buf = BytesMut::new();
                codec.encode(&packet, &mut buf).unwrap();
                assert_eq!(publish_size(version, "v1/raw/x", len, qos), buf.len());
            }
        }
    }

    #[test]
    fn oversize_and_garbage_are_told_apart() {
        let codec = Codec {
            version: Version::V311,
            max_incoming: 100,
        };
        let mut buf = BytesMut::new();
        Codec {
            version: Version::V311,
            max_incoming: usize::MAX,
        }
        .encode(
            &Packet::Publish(Publish {
                topic: "t".to_owned(),
                payload: Bytes::from(vec![1u8; 500]),
                qos: 0,
                retain: false,
                dup: false,
                pkid: 0,
                sub_ids: Vec::new(),
            }),
            &mut buf,
        )
        .unwrap();
        let frame = buf.len();
        assert_eq!(
            codec.decode(&mut buf),
            Err(DecodeError::TooLarge { frame, limit: 100 })
        );
        let mut garbage = BytesMut::from(&[0xF0u8, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(matches!(
            codec.decode(&mut garbage),
            Err(DecodeError::Malformed(_))
        ));
    }
}
