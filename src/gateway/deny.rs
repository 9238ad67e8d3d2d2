//! EMQX's other way of refusing (`deny_action = ignore`): answers instead of a disconnect. The
//! frames the gateway writes for it, and its edits of SUBSCRIBE and SUBACK, done on the bytes so
//! that everything else a client or the broker sent (v5 subscription options, properties) is kept.

use super::login::{body_start, push_length};

/// The SUBACK code of a denied filter: 0x80 under 3.1.1, 0x87 "not authorized" under MQTT 5.
pub fn denied_code(v5: bool) -> u8 {
    if v5 {
        0x87
    } else {
        0x80
    }
}

/// An MQTT variable byte integer at the start of `bytes`: its value and its length.
fn varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, byte) in bytes.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn packet_of(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    push_length(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// The packet id and the filters of a SUBSCRIBE frame, with where each entry (length, filter,
/// options) starts and ends; the header part (packet id and v5 properties) ends at `.2`.
type Entries<'a> = (u16, Vec<(&'a str, std::ops::Range<usize>)>, usize);

fn subscribe_entries(frame: &[u8], v5: bool) -> Option<Entries<'_>> {
    let start = body_start(frame)?;
    let pid = u16::from_be_bytes([*frame.get(start)?, *frame.get(start + 1)?]);
    let mut at = start + 2;
    if v5 {
        let (len, size) = varint(frame.get(at..)?)?;
        at += size + len;
    }
    let header_end = at;
    let mut entries = Vec::new();
    while at < frame.len() {
        let len = usize::from(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]));
        let filter = std::str::from_utf8(frame.get(at + 2..at + 2 + len)?).ok()?;
        let end = at + 2 + len + 1; // the options byte
        if end > frame.len() {
            return None;
        }
        entries.push((filter, at..end));
        at = end;
    }
    Some((pid, entries, header_end))
}

/// What becomes of a SUBSCRIBE some of whose filters are denied.
#[derive(Debug, PartialEq, Eq)]
pub struct SplitSubscribe {
    pub pid: u16,
    /// The SUBSCRIBE of the allowed filters, for the broker; None when every filter is denied.
    pub allowed: Option<Vec<u8>>,
    /// One entry per filter of the client's SUBSCRIBE: the code of a denied one, or None where
    /// the broker's answer goes.
    pub template: Vec<Option<u8>>,
}

/// Splits a SUBSCRIBE `frame` by `denied`; None when it cannot be read (the broker then has it).
pub fn split_subscribe(
    frame: &[u8],
    v5: bool,
    denied: impl Fn(&str) -> bool,
) -> Option<SplitSubscribe> {
    let (pid, entries, header_end) = subscribe_entries(frame, v5)?;
    let start = body_start(frame)?;
    let mut body = frame.get(start..header_end)?.to_vec();
    let mut template = Vec::with_capacity(entries.len());
    let mut kept = 0;
    for (filter, range) in entries {
        if denied(filter) {
            template.push(Some(denied_code(v5)));
        } else {
            template.push(None);
            body.extend_from_slice(&frame[range]);
            kept += 1;
        }
    }
    Some(SplitSubscribe {
        pid,
        allowed: (kept > 0).then(|| packet_of(frame[0], &body)),
        template,
    })
}

/// A SUBACK of `pid` with `codes` (and no properties under v5).
pub fn suback(pid: u16, codes: &[u8], v5: bool) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(codes);
    packet_of(0x90, &body)
}

/// The packet id of a SUBACK frame.
pub fn suback_pid(frame: &[u8]) -> Option<u16> {
    let start = body_start(frame)?;
    Some(u16::from_be_bytes([
        *frame.get(start)?,
        *frame.get(start + 1)?,
    ]))
}

/// The broker's SUBACK `frame` (for the allowed filters) with the denied filters' codes put back
/// in their places, so that the client gets one code per filter it asked for.
pub fn merge_suback(frame: &[u8], v5: bool, template: &[Option<u8>]) -> Option<Vec<u8>> {
    let start = body_start(frame)?;
    let mut at = start + 2;
    if v5 {
        let (len, size) = varint(frame.get(at..)?)?;
        at += size + len;
    }
    let broker = frame.get(at..)?;
    let mut body = frame.get(start..at)?.to_vec();
    // A broker that answers for another number of filters than it was asked about: its codes
    // cannot be placed, so the client's allowed filters are reported failed (0x80) too.
    let placed = broker.len() == template.iter().filter(|slot| slot.is_none()).count();
    let mut codes = broker.iter();
    for slot in template {
        body.push(match (slot, placed) {
            (Some(code), _) => *code,
            (None, true) => *codes.next()?,
            (None, false) => 0x80,
        });
    }
    Some(packet_of(0x90, &body))
}

/// The answer to a denied QoS 1 publish: PUBACK 0x87 under MQTT 5, a plain PUBACK under 3.1.1
/// (EMQX's choice: 3.1.1 has no way to say no).
pub fn puback(pid: u16, v5: bool) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    if v5 {
        body.push(0x87);
    }
    packet_of(0x40, &body)
}

/// The answer to a denied QoS 2 publish: PUBREC 0x87 under MQTT 5 (which ends the exchange), a
/// plain PUBREC under 3.1.1 (its PUBREL then gets [`pubcomp`]).
pub fn pubrec(pid: u16, v5: bool) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    if v5 {
        body.push(0x87);
    }
    packet_of(0x50, &body)
}

pub fn pubcomp(pid: u16) -> Vec<u8> {
    packet_of(0x70, &pid.to_be_bytes())
}

/// The packet id of a PUBREL frame.
pub fn pubrel_pid(frame: &[u8]) -> Option<u16> {
    suback_pid(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::codec::{Codec, Packet, Version};
    use bytes::BytesMut;

    fn codec(v5: bool) -> Codec {
        Codec {
            version: if v5 { Version::V5 } else { Version::V311 },
            max_incoming: usize::MAX,
        }
    }

    fn subscribe(v5: bool, filters: &[&str]) -> Vec<u8> {
        let mut out = BytesMut::new();
        codec(v5)
            .encode(
                &Packet::Subscribe {
                    pkid: 7,
                    filters: filters.iter().map(|f| ((*f).to_owned(), 1)).collect(),
                    sub_id: v5.then_some(3),
                },
                &mut out,
            )
            .unwrap();
        out.to_vec()
    }

    fn decode(v5: bool, frame: &[u8]) -> Packet {
        codec(v5)
            .decode(&mut BytesMut::from(frame))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn a_subscribe_is_split_and_its_suback_merged() {
        for v5 in [false, true] {
            let frame = subscribe(v5, &["v1/raw/Acme/#", "v1/raw/Other/#", "v1/raw/Acme/x"]);
            let split = split_subscribe(&frame, v5, |f| f.contains("Other")).unwrap();
            let code = denied_code(v5);
            assert_eq!(split.pid, 7);
            assert_eq!(split.template, vec![None, Some(code), None]);
            // The broker gets the allowed filters, with their options (and v5's properties).
            match decode(v5, split.allowed.as_ref().unwrap()) {
                Packet::Subscribe {
                    pkid,
                    filters,
                    sub_id,
                } => {
                    assert_eq!(pkid, 7);
                    assert_eq!(
                        filters,
                        vec![
                            ("v1/raw/Acme/#".to_owned(), 1),
                            ("v1/raw/Acme/x".to_owned(), 1)
                        ]
                    );
                    assert_eq!(sub_id, v5.then_some(3));
                }
                other => panic!("{other:?}"),
            }
            // The broker's SUBACK for two filters becomes one for three.
            let merged = merge_suback(&suback(7, &[1, 0], v5), v5, &split.template).unwrap();
            assert_eq!(merged, suback(7, &[1, code, 0], v5));
            match decode(v5, &merged) {
                Packet::SubAck { pkid, codes } => {
                    assert_eq!(pkid, 7);
                    assert_eq!(codes.len(), 3);
                    assert!(codes[0].is_ok() && codes[1].is_err() && codes[2].is_ok());
                }
                other => panic!("{other:?}"),
            }
            // Every filter denied: nothing for the broker.
            let all = split_subscribe(&frame, v5, |_| true).unwrap();
            assert_eq!(all.allowed, None);
            assert_eq!(all.template, vec![Some(code); 3]);
        }
    }

    #[test]
    fn the_answers_read_back_as_refusals() {
        match decode(true, &puback(9, true)) {
            Packet::PubAck { pkid, refused } => assert!(pkid == 9 && refused.is_some()),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decode(false, &puback(9, false)),
            Packet::PubAck {
                pkid: 9,
                refused: None
            }
        );
        assert_eq!(pubrel_pid(&[0x62, 0x02, 0x01, 0x02]), Some(0x0102));
        assert_eq!(pubcomp(0x0102), vec![0x70, 0x02, 0x01, 0x02]);
        assert_eq!(pubrec(5, true), vec![0x50, 0x03, 0x00, 0x05, 0x87]);
        // Unreadable input is left alone.
        assert!(split_subscribe(&[0x82, 0x03, 0x00, 0x01, 0x00], false, |_| true).is_none());
        assert!(merge_suback(&[0x90, 0x01, 0x00], false, &[None]).is_none());
        assert!(split_subscribe(&[0x82, 0x04, 0x00, 0x01, 0x09, 0x00], true, |_| true).is_none());
        // A SUBACK with the wrong number of codes: the client's filters are all reported failed.
        let merged = merge_suback(&suback(7, &[1, 1, 1], false), false, &[None, Some(0x80)]);
        assert_eq!(merged, Some(suback(7, &[0x80, 0x80], false)));
    }
}
