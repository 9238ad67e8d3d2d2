//! What the gateway does to a CONNECT: checks a JWT (HS256 signature, `sub`, `exp`, `nbf`) as
//! Capture's broker does, and rewrites the CONNECT frame (the password the broker knows, the
//! clean-session flag) without decoding and re-encoding the rest of it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Why a JWT is refused (the gateway refuses all of them alike, as bad credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtRefusal {
    Malformed,
    Algorithm,
    Signature,
    Subject,
    Expired,
    NotYetValid,
}

/// Checks `token` as the password of `username`: an HS256 JWT signed with `key`, whose `sub` is
/// `username`, whose `exp` (required) is after `now` and whose `nbf`, if any, is not. Returns `exp`
/// (Unix seconds).
///
/// # Errors
/// The first rule the token breaks.
pub fn check_jwt(token: &str, key: &[u8], username: &str, now: i64) -> Result<i64, JwtRefusal> {
    let mut parts = token.split('.');
    let (Some(header), Some(body), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtRefusal::Malformed);
    };
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part.trim_end_matches('='));
    let json = |part: &str| -> Result<serde_json::Value, JwtRefusal> {
        let bytes = decode(part).map_err(|_| JwtRefusal::Malformed)?;
        serde_json::from_slice(&bytes).map_err(|_| JwtRefusal::Malformed)
    };
    if json(header)?.get("alg").and_then(serde_json::Value::as_str) != Some("HS256") {
        return Err(JwtRefusal::Algorithm);
    }
    let signature = decode(signature).map_err(|_| JwtRefusal::Malformed)?;
    let signed = &token[..header.len() + 1 + body.len()];
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::verify(&key, signed.as_bytes(), &signature).map_err(|_| JwtRefusal::Signature)?;
    let claims = json(body)?;
    if claims.get("sub").and_then(serde_json::Value::as_str) != Some(username) {
        return Err(JwtRefusal::Subject);
    }
    let Some(exp) = claims.get("exp").and_then(serde_json::Value::as_i64) else {
        return Err(JwtRefusal::Malformed);
    };
    if exp <= now {
        return Err(JwtRefusal::Expired);
    }
    if claims
        .get("nbf")
        .and_then(serde_json::Value::as_i64)
        .is_some_and(|nbf| nbf > now)
    {
        return Err(JwtRefusal::NotYetValid);
    }
    Ok(exp)
}

/// Where the body of an MQTT frame starts (after the fixed header).
pub(super) fn body_start(frame: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for (i, byte) in frame.iter().skip(1).take(4).enumerate() {
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return (frame.len() == 2 + i + len).then_some(2 + i);
        }
    }
    None
}

pub(super) fn push_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        // The low seven bits of what is left, by construction below 0x80.
        let byte = u8::try_from(len & 0x7f).unwrap_or(0);
        len >>= 7;
        if len == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// The CONNECT `frame` with its password (`old`, the last field of every CONNECT that has one)
/// replaced by `new`; None when the frame does not end with `old`.
pub fn replace_password(frame: &[u8], old: &str, new: &str) -> Option<Vec<u8>> {
    let start = body_start(frame)?;
    let cut = frame.len().checked_sub(2 + old.len())?;
    if cut < start
        || frame[cut..cut + 2] != u16::try_from(old.len()).ok()?.to_be_bytes()
        || &frame[cut + 2..] != old.as_bytes()
    {
        return None;
    }
    let new_len = u16::try_from(new.len()).ok()?;
    let body_len = cut - start + 2 + new.len();
    let mut out = Vec::with_capacity(5 + body_len);
    out.push(frame[0]);
    push_length(&mut out, body_len);
    out.extend_from_slice(&frame[start..cut]);
    out.extend_from_slice(&new_len.to_be_bytes());
    out.extend_from_slice(new.as_bytes());
    Some(out)
}

/// Where the parts of a CONNECT frame are: the protocol level, the flags byte and the client id
/// (its 2-byte length), read from the protocol name's length so that any name (`MQTT`, 3.1's
/// `MQIsdp`) is read right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectLayout {
    pub level: u8,
    flags: usize,
    client_id: usize,
}

pub fn connect_layout(frame: &[u8]) -> Option<ConnectLayout> {
    let start = body_start(frame)?;
    let name = usize::from(u16::from_be_bytes([
        *frame.get(start)?,
        *frame.get(start + 1)?,
    ]));
    let level_at = start + 2 + name;
    let level = *frame.get(level_at)?;
    let flags = level_at + 1;
    let mut client_id = flags + 3; // the flags, then the keepalive
    if level == 5 {
        let mut len = 0usize;
        let mut size = 0;
        loop {
            let byte = *frame.get(client_id + size)?;
            len |= usize::from(byte & 0x7f) << (7 * size);
            size += 1;
            if byte & 0x80 == 0 {
                break;
            }
            if size == 4 {
                return None;
            }
        }
        client_id += size + len;
    }
    frame.get(client_id + 1)?;
    Some(ConnectLayout {
        level,
        flags,
        client_id,
    })
}

/// The CONNECT `frame` asking for a clean session.
pub fn with_clean_session(frame: &[u8]) -> Option<Vec<u8>> {
    let layout = connect_layout(frame)?;
    let mut out = frame.to_vec();
    *out.get_mut(layout.flags)? |= 0x02;
    Some(out)
}

/// The CONNECT `frame` for a clean session of another client id: the same login, to ask the
/// broker whether it takes these credentials without touching the client's session.
pub fn as_probe(frame: &[u8], client_id: &str) -> Option<Vec<u8>> {
    let layout = connect_layout(frame)?;
    let start = body_start(frame)?;
    let old = usize::from(u16::from_be_bytes([
        frame[layout.client_id],
        frame[layout.client_id + 1],
    ]));
    let rest = frame.get(layout.client_id + 2 + old..)?;
    let mut body = frame[start..layout.client_id].to_vec();
    body[layout.flags - start] |= 0x02;
    body.extend_from_slice(&u16::try_from(client_id.len()).ok()?.to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    body.extend_from_slice(rest);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(frame[0]);
    push_length(&mut out, body.len());
    out.extend_from_slice(&body);
    Some(out)
}

/// The DISCONNECT that ends a login the gateway made itself; under MQTT 5 with a session expiry
/// of zero, so that the broker keeps nothing of it.
pub fn upstream_goodbye(v5: bool) -> &'static [u8] {
    if v5 {
        &[0xE0, 0x07, 0x00, 0x05, 0x11, 0x00, 0x00, 0x00, 0x00]
    } else {
        &[0xE0, 0x00]
    }
}

/// The CONNACK that refuses a login as bad credentials: return code 4 under 3.1.1, reason code
/// 0x86 (no properties) under MQTT 5.
pub fn bad_credentials(v5: bool) -> &'static [u8] {
    if v5 {
        &[0x20, 0x03, 0x00, 0x86, 0x00]
    } else {
        &[0x20, 0x02, 0x00, 0x04]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::codec::{Codec, Connect, Packet, Version};
    use bytes::BytesMut;

    fn sign(key: &[u8], claims: &str) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(claims);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        let tag = ring::hmac::sign(&key, format!("{header}.{body}").as_bytes());
        format!("{header}.{body}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    #[test]
    fn a_jwt_is_checked_for_signature_subject_and_time() {
        let key = b"the emulator's key";
        let good = sign(key, r#"{"sub":"carol","exp":2000}"#);
        assert_eq!(check_jwt(&good, key, "carol", 1000), Ok(2000));
        assert_eq!(
            check_jwt(&good, b"another key", "carol", 1000),
            Err(JwtRefusal::Signature)
        );
        assert_eq!(
            check_jwt(&good, key, "dave", 1000),
            Err(JwtRefusal::Subject)
        );
        assert_eq!(
            check_jwt(&good, key, "carol", 2000),
            Err(JwtRefusal::Expired)
        );
        let later = sign(key, r#"{"sub":"carol","exp":3000,"nbf":1500}"#);
        assert_eq!(
            check_jwt(&later, key, "carol", 1000),
            Err(JwtRefusal::NotYetValid)
        );
        let endless = sign(key, r#"{"sub":"carol"}"#);
        assert_eq!(
            check_jwt(&endless, key, "carol", 1000),
            Err(JwtRefusal::Malformed)
        );
        // A changed claim breaks the signature.
        let (head, rest) = good.split_once('.').unwrap();
        let (_, signature) = rest.split_once('.').unwrap();
        let forged = format!(
            "{head}.{}.{signature}",
            URL_SAFE_NO_PAD.encode(r#"{"sub":"carol","exp":9999}"#)
        );
        assert_eq!(
            check_jwt(&forged, key, "carol", 1000),
            Err(JwtRefusal::Signature)
        );
        for junk in ["", "a.b", "a.b.c.d", "%%.%%.%%"] {
            assert!(check_jwt(junk, key, "carol", 1000).is_err(), "{junk}");
        }
    }

    fn connect_frame(version: Version, password: &str, clean: bool) -> Vec<u8> {
        let codec = Codec {
            version,
            max_incoming: usize::MAX,
        };
        let mut out = BytesMut::new();
        codec
            .encode(
                &Packet::Connect(Connect {
                    client_id: "c1".to_owned(),
                    keepalive: 30,
                    clean,
                    login: Some(("carol".to_owned(), password.to_owned())),
                    session_expiry: Some(60),
                    receive_maximum: Some(10),
                    max_packet_size: None,
                }),
                &mut out,
            )
            .unwrap();
        out.to_vec()
    }

    fn decode(version: Version, frame: &[u8]) -> Connect {
        let codec = Codec {
            version,
            max_incoming: usize::MAX,
        };
        match codec.decode(&mut BytesMut::from(frame)).unwrap() {
            Some(Packet::Connect(connect)) => connect,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_mqtt_31_connect_is_read_by_its_protocol_name() {
        // "MQIsdp", level 3, flags 0 (a persistent session), keepalive 60, client id "c".
        let mut frame = vec![0x10, 15, 0, 6];
        frame.extend_from_slice(b"MQIsdp");
        frame.extend_from_slice(&[3, 0x00, 0, 60, 0, 1, b'c']);
        let layout = connect_layout(&frame).unwrap();
        assert_eq!(layout.level, 3);
        assert_eq!(with_clean_session(&frame).unwrap()[11], 0x02); // the flags byte, after "MQIsdp" and 3
        assert!(connect_layout(&frame[..12]).is_none());
    }

    #[test]
    fn the_password_and_the_clean_flag_are_rewritten_and_nothing_else() {
        for version in [Version::V311, Version::V5] {
            // A long password moves the remaining length into two bytes, a short one back.
            let long = "t".repeat(300);
            let frame = connect_frame(version, &long, false);
            let short = replace_password(&frame, &long, "broker-secret").unwrap();
            let connect = decode(version, &short);
            assert_eq!(
                connect.login,
                Some(("carol".to_owned(), "broker-secret".to_owned()))
            );
            assert_eq!((connect.client_id.as_str(), connect.clean), ("c1", false));
            let back = replace_password(&short, "broker-secret", &long).unwrap();
            assert_eq!(back, frame);
            assert!(replace_password(&frame, "not it", "x").is_none());
            let clean = with_clean_session(&frame).unwrap();
            assert!(decode(version, &clean).clean);
            assert_eq!(decode(version, &clean).login, decode(version, &frame).login);
            let probe = decode(version, &as_probe(&frame, "probe-123").unwrap());
            assert_eq!((probe.client_id.as_str(), probe.clean), ("probe-123", true));
            assert_eq!(probe.login, decode(version, &frame).login);
            assert_eq!(
                probe.receive_maximum,
                decode(version, &frame).receive_maximum
            );
        }
    }
}
