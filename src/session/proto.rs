//! The MQTT protocol state machine, without sockets or clocks: packets from the broker and requests
//! from the user go in, bytes to write and events come out; time is an argument.
//!
//! It allocates packet ids over 1..=65535 and never reuses one while it is in flight, runs QoS 1 and
//! 2 both ways, resends what is unacknowledged when a session resumes (PUBLISH with DUP, PUBREL),
//! honours the broker's Receive Maximum and Maximum Packet Size (and advertises ours), sends the
//! acknowledgements of incoming messages in the order they arrived (MQTT-4.6.0-2) whatever order
//! the application releases them in, and keeps the connection alive. `P` tags a publish, `S` a
//! subscribe or unsubscribe, so that answers reach whoever asked.

use super::codec::{Codec, ConnAck, Connect, DecodeError, Packet, Publish, Version};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

/// What happened, for the layer above.
#[derive(Debug, PartialEq)]
pub enum Output<P, S> {
    Connected {
        session_present: bool,
    },
    /// A QoS 0 publish was written, or a QoS 1/2 one acknowledged (`Err`: the broker's refusal).
    Published(P, Result<(), String>),
    /// SUBACK: per filter, the granted QoS or the refusal.
    SubAck(S, Vec<Result<u8, String>>),
    UnsubAck(S),
    /// A message for the application; `Engine::release` once it is safely queued.
    Message(Publish),
}

/// Why the connection cannot go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broken {
    /// The broker refused the CONNECT.
    Refused(super::codec::LoginRefusal),
    /// The broker sent DISCONNECT (MQTT 5 reason in words).
    ServerDisconnect(String),
    /// No answer to a keepalive ping in time.
    PingTimeout(Duration),
    /// The broker broke the protocol.
    Protocol(String),
}

/// Why a publish cannot be sent at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge {
    pub size: usize,
    pub limit: usize,
}

#[derive(Debug)]
enum Flight<P> {
    /// PUBLISH sent (QoS 1 waits for PUBACK, QoS 2 for PUBREC).
    Sent { message: Outgoing, tag: P },
    /// PUBREL sent, waiting for PUBCOMP.
    Released { tag: P },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    AwaitConnAck,
    Connected,
}

/// An incoming QoS 1/2 message whose acknowledgement waits for the application.
#[derive(Debug)]
struct Unacked {
    pkid: u16,
    qos: u8,
    released: bool,
}

/// Settings of the protocol that stay across connections.
#[derive(Debug, Clone)]
pub struct Settings {
    pub version: Version,
    pub client_id: String,
    pub keepalive: Duration,
    pub clean: bool,
    /// Most unacknowledged publishes we send (the broker's Receive Maximum may lower it).
    pub inflight: u16,
    /// Most unacknowledged messages we let the broker send (advertised under MQTT 5).
    pub receive_maximum: u16,
    /// The largest packet we accept (advertised under MQTT 5).
    pub max_incoming: usize,
    /// The largest packet we send, unless the broker advertises a smaller one.
    pub max_outgoing: usize,
}

pub struct Engine<P, S> {
    settings: Settings,
    codec: Codec,
    state: State,
    out: BytesMut,
    outputs: VecDeque<Output<P, S>>,
    next_pkid: u16,
    /// Our publishes in flight, by packet id, and the order they were sent in.
    flights: BTreeMap<u16, Flight<P>>,
    sent_order: VecDeque<u16>,
    subscribes: HashMap<u16, S>,
    unsubscribes: HashMap<u16, S>,
    /// Incoming QoS 2 ids we answered with PUBREC, until PUBREL.
    incoming_qos2: HashSet<u16>,
    /// Incoming messages in arrival order, until acknowledged.
    unacked: VecDeque<Unacked>,
    window: usize,
    max_outgoing: usize,
    keepalive: Duration,
    last_write: Instant,
    last_read: Instant,
    ping_sent: Option<Instant>,
    reading: bool,
}

impl<P, S> std::fmt::Debug for Engine<P, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("state", &self.state)
            .field("in_flight", &self.flights.len())
            .finish_non_exhaustive()
    }
}

impl<P, S> Engine<P, S> {
    pub fn new(settings: Settings, now: Instant) -> Self {
        let codec = Codec {
            version: settings.version,
            max_incoming: settings.max_incoming,
        };
        Engine {
            window: usize::from(settings.inflight.max(1)),
            max_outgoing: settings.max_outgoing,
            keepalive: settings.keepalive,
            settings,
            codec,
            state: State::Idle,
            out: BytesMut::new(),
            outputs: VecDeque::new(),
            next_pkid: 1,
            flights: BTreeMap::new(),
            sent_order: VecDeque::new(),
            subscribes: HashMap::new(),
            unsubscribes: HashMap::new(),
            incoming_qos2: HashSet::new(),
            unacked: VecDeque::new(),
            last_write: now,
            last_read: now,
            ping_sent: None,
            reading: true,
        }
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }
    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }
    /// Bytes waiting to be written.
    pub fn pending_output(&self) -> usize {
        self.out.len()
    }
    /// Takes the bytes to write.
    pub fn take_output(&mut self) -> BytesMut {
        self.out.split()
    }
    pub fn poll_output(&mut self) -> Option<Output<P, S>> {
        self.outputs.pop_front()
    }
    /// Publishes in flight (unacknowledged QoS 1/2).
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }
    /// The largest PUBLISH this connection may send.
    pub fn max_outgoing(&self) -> usize {
        self.max_outgoing
    }
    pub fn version(&self) -> Version {
        self.settings.version
    }

    fn write(&mut self, packet: &Packet, now: Instant) {
        if let Err(e) = self.codec.encode(packet, &mut self.out) {
            // Only a packet we built wrong can fail: say so loudly, never silently.
            log::error!("could not encode {packet:?}: {e}");
        }
        self.last_write = now;
    }

    /// Starts a connection: CONNECT is the first thing written.
    pub fn connect(&mut self, login: Option<(String, String)>, now: Instant) {
        self.state = State::AwaitConnAck;
        self.out.clear();
        self.ping_sent = None;
        self.last_read = now;
        self.reading = true;
        self.unacked.clear();
        self.window = usize::from(self.settings.inflight.max(1));
        self.max_outgoing = self.settings.max_outgoing;
        self.keepalive = self.settings.keepalive;
        let v5 = self.settings.version == Version::V5;
        let connect = Connect {
            client_id: self.settings.client_id.clone(),
            keepalive: u16::try_from(self.settings.keepalive.as_secs()).unwrap_or(u16::MAX),
            clean: self.settings.clean,
            login,
            session_expiry: (v5 && !self.settings.clean).then_some(u32::MAX),
            receive_maximum: v5.then_some(self.settings.receive_maximum.max(1)),
            max_packet_size: v5
                .then(|| u32::try_from(self.settings.max_incoming).unwrap_or(u32::MAX)),
        };
        self.write(&Packet::Connect(connect), now);
    }

    /// The connection ended. What was in flight is kept for the next one; subscribe and
    /// unsubscribe requests that were unanswered are handed back.
    pub fn disconnected(&mut self) -> (Vec<S>, Vec<S>) {
        self.state = State::Idle;
        self.out.clear();
        self.ping_sent = None;
        self.unacked.clear();
        (
            self.subscribes.drain().map(|(_, s)| s).collect(),
            self.unsubscribes.drain().map(|(_, s)| s).collect(),
        )
    }

    /// Ends every publish in flight (the session is closing): their tags, oldest first.
    pub fn abandon(&mut self) -> Vec<P> {
        self.sent_order.clear();
        std::mem::take(&mut self.flights)
            .into_values()
            .map(|f| match f {
                Flight::Sent { tag, .. } | Flight::Released { tag } => tag,
            })
            .collect()
    }

    /// Removes one publish from flight (a refusal recognised by the layer above).
    pub fn forget(&mut self, pkid: u16) -> Option<P> {
        self.sent_order.retain(|p| *p != pkid);
        self.flights.remove(&pkid).map(|f| match f {
            Flight::Sent { tag, .. } | Flight::Released { tag } => tag,
        })
    }

    /// The tag of the publish in flight as `pkid`.
    pub fn tag(&self, pkid: u16) -> Option<&P> {
        self.flights.get(&pkid).map(|f| match f {
            Flight::Sent { tag, .. } | Flight::Released { tag } => tag,
        })
    }

    /// Every publish in flight's tag.
    pub fn tags_mut(&mut self) -> impl Iterator<Item = &mut P> {
        self.flights.values_mut().map(|f| match f {
            Flight::Sent { tag, .. } | Flight::Released { tag } => tag,
        })
    }

    /// The id of the publish in flight sent last, if any.
    pub fn last_sent(&self) -> Option<u16> {
        self.sent_order.back().copied()
    }

    /// How many more QoS 1/2 publishes may go out now.
    pub fn window_left(&self) -> usize {
        if self.state == State::Connected {
            self.window.saturating_sub(self.flights.len())
        } else {
            0
        }
    }

    /// Whether a QoS 1/2 publish could go out now.
    pub fn has_window(&self) -> bool {
        self.state == State::Connected && self.flights.len() < self.window
    }

    fn allocate(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            let pkid = self.next_pkid;
            self.next_pkid = if self.next_pkid == u16::MAX {
                1
            } else {
                self.next_pkid + 1
            };
            if !self.flights.contains_key(&pkid)
                && !self.subscribes.contains_key(&pkid)
                && !self.unsubscribes.contains_key(&pkid)
            {
                return Some(pkid);
            }
        }
        None
    }

    /// Checks a publish against the packet size limit in force.
    pub fn check_size(&self, topic: &str, payload: usize, qos: u8) -> Result<(), TooLarge> {
        let size = super::codec::publish_size(self.settings.version, topic, payload, qos);
        if size > self.max_outgoing {
            return Err(TooLarge {
                size,
                limit: self.max_outgoing,
            });
        }
        Ok(())
    }

    /// Sends a publish. QoS 0 is reported `Published` at once; QoS 1/2 need `has_window()`.
    /// Returns the packet id (0 for QoS 0).
    ///
    /// # Panics
    /// When called for QoS 1/2 without a window (the caller checks `has_window`).
    pub fn publish(
        &mut self,
        message: Outgoing,
        tag: P,
        now: Instant,
    ) -> Result<u16, (TooLarge, P)> {
        if let Err(e) = self.check_size(&message.topic, message.payload.len(), message.qos) {
            return Err((e, tag));
        }
        if message.qos == 0 {
            self.write(
                &Packet::Publish(Publish {
                    topic: message.topic,
                    payload: message.payload,
                    qos: 0,
                    retain: message.retain,
                    dup: false,
                    pkid: 0,
                    sub_ids: Vec::new(),
                }),
                now,
            );
            self.outputs.push_back(Output::Published(tag, Ok(())));
            return Ok(0);
        }
        assert!(self.has_window(), "publish without a window");
        let pkid = self
            .allocate()
            .expect("a free packet id while the window has room");
        self.write(
            &Packet::Publish(Publish {
                topic: message.topic.clone(),
                payload: message.payload.clone(),
                qos: message.qos.min(2),
                retain: message.retain,
                dup: false,
                pkid,
                sub_ids: Vec::new(),
            }),
            now,
        );
        self.flights.insert(pkid, Flight::Sent { message, tag });
        self.sent_order.push_back(pkid);
        Ok(pkid)
    }

    /// Sends a SUBSCRIBE; its SUBACK comes back as `SubAck(tag, ..)`.
    pub fn subscribe(
        &mut self,
        filters: Vec<(String, u8)>,
        sub_id: Option<usize>,
        tag: S,
        now: Instant,
    ) -> u16 {
        let pkid = self.allocate().unwrap_or(1);
        let sub_id = sub_id.filter(|_| self.settings.version == Version::V5);
        self.write(
            &Packet::Subscribe {
                pkid,
                filters,
                sub_id,
            },
            now,
        );
        self.subscribes.insert(pkid, tag);
        pkid
    }

    pub fn unsubscribe(&mut self, filters: Vec<String>, tag: S, now: Instant) -> u16 {
        let pkid = self.allocate().unwrap_or(1);
        self.write(&Packet::Unsubscribe { pkid, filters }, now);
        self.unsubscribes.insert(pkid, tag);
        pkid
    }

    /// A clean goodbye.
    pub fn disconnect(&mut self, now: Instant) {
        self.write(
            &Packet::Disconnect {
                reason: 0,
                words: None,
            },
            now,
        );
    }

    /// The application has safely queued the incoming message `pkid`: its acknowledgement goes
    /// out once every message that arrived before it has been released too.
    pub fn release(&mut self, pkid: u16, now: Instant) {
        if let Some(entry) = self
            .unacked
            .iter_mut()
            .find(|u| u.pkid == pkid && !u.released)
        {
            entry.released = true;
        }
        while self.unacked.front().is_some_and(|u| u.released) {
            let Some(done) = self.unacked.pop_front() else {
                break;
            };
            if done.qos == 1 {
                self.write(
                    &Packet::PubAck {
                        pkid: done.pkid,
                        refused: None,
                    },
                    now,
                );
            } else {
                self.incoming_qos2.insert(done.pkid);
                self.write(
                    &Packet::PubRec {
                        pkid: done.pkid,
                        refused: None,
                    },
                    now,
                );
            }
        }
    }

    /// Pauses or resumes reading: while the application holds the socket unread, no answer to a
    /// ping can be seen, so the ping deadline waits until reading resumes.
    pub fn set_reading(&mut self, reading: bool, now: Instant) {
        if reading && !self.reading {
            self.ping_sent = self.ping_sent.map(|_| now);
            self.last_read = now;
        }
        self.reading = reading;
    }

    /// When `tick` next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.state != State::Connected || self.keepalive.is_zero() {
            return None;
        }
        if !self.reading {
            // Paused: the broker still hears from us every keepalive.
            return Some(self.last_write + self.keepalive);
        }
        match self.ping_sent {
            Some(sent) => Some(sent + self.keepalive / 2),
            None => Some(self.last_write.min(self.last_read) + self.keepalive),
        }
    }

    /// Keeps the connection alive: a PINGREQ when nothing was written or read for a keepalive,
    /// and an error when a ping went unanswered for half a keepalive while reading. While reading
    /// is paused a PINGREQ still goes out whenever nothing was written for a keepalive.
    pub fn tick(&mut self, now: Instant) -> Result<(), Broken> {
        if self.state != State::Connected || self.keepalive.is_zero() {
            return Ok(());
        }
        if !self.reading {
            if now >= self.last_write + self.keepalive {
                self.write(&Packet::PingReq, now);
                self.ping_sent.get_or_insert(now);
            }
            return Ok(());
        }
        if let Some(sent) = self.ping_sent {
            if now >= sent + self.keepalive / 2 {
                return Err(Broken::PingTimeout(self.keepalive / 2));
            }
            return Ok(());
        }
        if now >= self.last_write.min(self.last_read) + self.keepalive {
            self.write(&Packet::PingReq, now);
            self.ping_sent = Some(now);
        }
        Ok(())
    }

    /// Decodes what the broker sent; stops early when `stop` says so after a message (the layer
    /// above could not take more). Bytes not yet decoded stay in `buf`.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        self.codec.decode(buf)
    }

    /// Handles one packet from the broker.
    pub fn handle(&mut self, packet: Packet, now: Instant) -> Result<(), Broken> {
        self.last_read = now;
        self.ping_sent = None;
        match packet {
            Packet::ConnAck(ack) => self.on_connack(ack, now)?,
            Packet::Publish(publish) => self.on_publish(publish, now),
            Packet::PubAck { pkid, refused } => {
                if matches!(self.flights.get(&pkid), Some(Flight::Sent { message, .. }) if message.qos == 1)
                {
                    if let Some(tag) = self.forget(pkid) {
                        self.outputs
                            .push_back(Output::Published(tag, refused.map_or(Ok(()), Err)));
                    }
                }
            }
            Packet::PubRec { pkid, refused } => {
                if matches!(self.flights.get(&pkid), Some(Flight::Sent { message, .. }) if message.qos == 2)
                {
                    if let Some(reason) = refused {
                        if let Some(tag) = self.forget(pkid) {
                            self.outputs.push_back(Output::Published(tag, Err(reason)));
                        }
                    } else if let Some(Flight::Sent { tag, .. }) = self.flights.remove(&pkid) {
                        self.flights.insert(pkid, Flight::Released { tag });
                        self.write(&Packet::PubRel { pkid }, now);
                    }
                } else if matches!(self.flights.get(&pkid), Some(Flight::Released { .. })) {
                    self.write(&Packet::PubRel { pkid }, now);
                }
            }
            Packet::PubComp { pkid } => {
                if matches!(self.flights.get(&pkid), Some(Flight::Released { .. })) {
                    if let Some(tag) = self.forget(pkid) {
                        self.outputs.push_back(Output::Published(tag, Ok(())));
                    }
                }
            }
            Packet::PubRel { pkid } => {
                self.incoming_qos2.remove(&pkid);
                self.write(&Packet::PubComp { pkid }, now);
            }
            Packet::SubAck { pkid, codes } => {
                if let Some(tag) = self.subscribes.remove(&pkid) {
                    self.outputs.push_back(Output::SubAck(tag, codes));
                }
            }
            Packet::UnsubAck { pkid } => {
                if let Some(tag) = self.unsubscribes.remove(&pkid) {
                    self.outputs.push_back(Output::UnsubAck(tag));
                }
            }
            Packet::PingResp => {}
            Packet::PingReq => self.write(&Packet::PingResp, now),
            Packet::Disconnect { words, .. } => {
                return Err(Broken::ServerDisconnect(
                    words.unwrap_or_else(|| "DISCONNECT".to_owned()),
                ))
            }
            Packet::Connect(_) | Packet::Subscribe { .. } | Packet::Unsubscribe { .. } => {
                return Err(Broken::Protocol(format!(
                    "the broker sent a packet only clients send: {packet:?}"
                )))
            }
        }
        Ok(())
    }

    fn on_connack(&mut self, ack: ConnAck, now: Instant) -> Result<(), Broken> {
        if self.state != State::AwaitConnAck {
            return Err(Broken::Protocol("a second CONNACK".to_owned()));
        }
        if let Some(refusal) = ack.refused {
            return Err(Broken::Refused(refusal));
        }
        self.state = State::Connected;
        if let Some(max) = ack.receive_maximum {
            self.window = self.window.min(usize::from(max.max(1)));
        }
        if let Some(max) = ack.max_packet_size {
            self.max_outgoing = self.max_outgoing.min(max as usize);
        }
        if let Some(keepalive) = ack.server_keepalive {
            self.keepalive = Duration::from_secs(u64::from(keepalive));
        }
        if !ack.session_present {
            // A new session knows nothing of our QoS 2 exchanges: the broker already has a
            // released message (it sent PUBREC), so that one is done; incoming ids start afresh.
            self.incoming_qos2.clear();
            let released: Vec<u16> = self
                .flights
                .iter()
                .filter(|(_, f)| matches!(f, Flight::Released { .. }))
                .map(|(p, _)| *p)
                .collect();
            for pkid in released {
                if let Some(tag) = self.forget(pkid) {
                    self.outputs.push_back(Output::Published(tag, Ok(())));
                }
            }
        }
        // What is unacknowledged goes out again, in the order it was first sent: with DUP on a
        // resumed session; on a new one it is simply sent again (at least once).
        let order: Vec<u16> = self.sent_order.iter().copied().collect();
        for pkid in order {
            let packet = match self.flights.get(&pkid) {
                Some(Flight::Sent { message, .. }) => Packet::Publish(Publish {
                    topic: message.topic.clone(),
                    payload: message.payload.clone(),
                    qos: message.qos,
                    retain: message.retain,
                    dup: ack.session_present,
                    pkid,
                    sub_ids: Vec::new(),
                }),
                Some(Flight::Released { .. }) => Packet::PubRel { pkid },
                None => continue,
            };
            self.write(&packet, now);
        }
        self.outputs.push_back(Output::Connected {
            session_present: ack.session_present,
        });
        Ok(())
    }

    fn on_publish(&mut self, publish: Publish, now: Instant) {
        match publish.qos {
            0 => self.outputs.push_back(Output::Message(publish)),
            1 => {
                self.unacked.push_back(Unacked {
                    pkid: publish.pkid,
                    qos: 1,
                    released: false,
                });
                self.outputs.push_back(Output::Message(publish));
            }
            _ => {
                let pending = self
                    .unacked
                    .iter()
                    .any(|u| u.pkid == publish.pkid && u.qos == 2);
                if pending {
                    return; // a resend of a message the application has not released yet
                }
                if self.incoming_qos2.contains(&publish.pkid) {
                    // Delivered once already; the broker missed our PUBREC.
                    self.write(
                        &Packet::PubRec {
                            pkid: publish.pkid,
                            refused: None,
                        },
                        now,
                    );
                    return;
                }
                self.unacked.push_back(Unacked {
                    pkid: publish.pkid,
                    qos: 2,
                    released: false,
                });
                self.outputs.push_back(Output::Message(publish));
            }
        }
    }
}

#[cfg(test)]
mod tests;
