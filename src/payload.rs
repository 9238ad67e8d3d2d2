//! Capture's JSON payloads: the raw-tree point, the two push forms and the `writedata` command.
//!
//! Reading is tolerant where Capture's page is loose (any JSON `Value`, tags of any JSON scalar,
//! timestamps as ISO 8601 or epoch milliseconds) and strict where a wrong shape means a wrong message.
//! Writing refuses what Capture could not store (NaN, infinities, nested values in fields) before
//! anything is sent.

use crate::timestamp::{self, TimestampError};
use crate::topic::{CaptureTopic, RawTopic};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use std::fmt;

/// A payload that cannot be read, or a value that cannot be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadError {
    /// The field the problem is in (`Value`, `Tags.MachineName`, `Fields.CPU_Temp`, ...), when known.
    pub field: Option<String>,
    pub message: String,
}

impl PayloadError {
    pub fn new(message: impl Into<String>) -> Self {
        PayloadError {
            field: None,
            message: message.into(),
        }
    }
    pub fn in_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        PayloadError {
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PayloadError {}

fn json_error(what: &str, err: &serde_json::Error) -> PayloadError {
    PayloadError::new(format!("invalid {what} payload: {err}"))
}

/// serde would read a JSON array positionally into a struct; Capture's payloads are objects only.
fn expect_object(payload: &[u8], what: &str) -> Result<(), PayloadError> {
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(()),
        None => Err(PayloadError::new(format!(
            "invalid {what} payload: it is empty, expected a JSON object"
        ))),
        Some(_) => Err(PayloadError::new(format!(
            "invalid {what} payload: expected a JSON object, got {:?}",
            String::from_utf8_lossy(&payload[..payload.len().min(40)])
        ))),
    }
}

/// Tags in the order they came, values as strings (a number or bool tag is kept as its JSON text).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags(pub Vec<(String, String)>);

impl<'de> Deserialize<'de> for Tags {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TagsVisitor;
        impl<'de> Visitor<'de> for TagsVisitor {
            type Value = Tags;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of tag names to strings")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Tags, E> {
                Ok(Tags::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tags, A::Error> {
                let mut tags = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(name) = map.next_key::<String>()? {
                    match map.next_value::<Value>()? {
                        Value::String(text) => tags.push((name, text)),
                        Value::Null => {}
                        other @ (Value::Bool(_) | Value::Number(_)) => {
                            tags.push((name, other.to_string()));
                        }
                        Value::Array(_) | Value::Object(_) => {
                            return Err(de::Error::custom(format!(
                                "tag {name:?} holds a list or object; tags are name-to-string pairs"
                            )))
                        }
                    }
                }
                Ok(Tags(tags))
            }
        }
        deserializer.deserialize_any(TagsVisitor)
    }
}

/// `UtcTimestamp` as it appears on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireTimestamp {
    /// An ISO 8601 string, as nanoseconds since the epoch.
    Iso(i64),
    /// Epoch milliseconds.
    EpochMs(i64),
}

impl WireTimestamp {
    pub fn nanos(self) -> Result<i64, TimestampError> {
        match self {
            WireTimestamp::Iso(nanos) => Ok(nanos),
            WireTimestamp::EpochMs(ms) => timestamp::epoch_ms_to_nanos(ms),
        }
    }
}

struct OptTimestamp(Option<WireTimestamp>);

impl<'de> Deserialize<'de> for OptTimestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TsVisitor;
        impl Visitor<'_> for TsVisitor {
            type Value = OptTimestamp;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("UtcTimestamp as an ISO 8601 string or epoch milliseconds")
            }
            fn visit_unit<E: de::Error>(self) -> Result<OptTimestamp, E> {
                Ok(OptTimestamp(None))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<OptTimestamp, E> {
                timestamp::parse_iso8601(text)
                    .map(|nanos| OptTimestamp(Some(WireTimestamp::Iso(nanos))))
                    .map_err(|e| E::custom(format!("UtcTimestamp {e}")))
            }
            fn visit_i64<E: de::Error>(self, ms: i64) -> Result<OptTimestamp, E> {
                Ok(OptTimestamp(Some(WireTimestamp::EpochMs(ms))))
            }
            fn visit_u64<E: de::Error>(self, ms: u64) -> Result<OptTimestamp, E> {
                i64::try_from(ms)
                    .map(|ms| OptTimestamp(Some(WireTimestamp::EpochMs(ms))))
                    .map_err(|_| E::custom(format!("UtcTimestamp {ms} is out of range")))
            }
            fn visit_f64<E: de::Error>(self, ms: f64) -> Result<OptTimestamp, E> {
                // A float of milliseconds: keep the whole milliseconds.
                if ms.is_finite() && ms.abs() < 9.2e15 {
                    #[allow(clippy::cast_possible_truncation)]
                    Ok(OptTimestamp(Some(
                        WireTimestamp::EpochMs(ms.trunc() as i64),
                    )))
                } else {
                    Err(E::custom(format!("UtcTimestamp {ms} is out of range")))
                }
            }
        }
        deserializer.deserialize_any(TsVisitor)
    }
}

/// Deserializes a present field (even `null`) as `Some`, so that a missing one stays `None`.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
struct FieldWire {
    #[serde(rename = "Value", default, deserialize_with = "present")]
    value: Option<Value>,
    #[serde(rename = "Tags", default)]
    tags: Tags,
    #[serde(rename = "UtcTimestamp", default)]
    timestamp: Option<OptTimestamp>,
}

#[derive(Deserialize)]
struct MeasurementWire {
    #[serde(rename = "Fields", default)]
    fields: Option<FieldsWire>,
    #[serde(rename = "Tags", default)]
    tags: Tags,
    #[serde(rename = "UtcTimestamp", default)]
    timestamp: Option<OptTimestamp>,
}

struct FieldsWire(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for FieldsWire {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = FieldsWire;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of field names to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FieldsWire, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    fields.push(entry);
                }
                Ok(FieldsWire(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// One field's value with its tags and time: the raw tree's message, and a field-level push.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldMessage {
    pub value: Value,
    pub tags: Tags,
    pub timestamp: Option<WireTimestamp>,
}

/// Several fields of one measurement in one message: a measurement-level push.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasurementMessage {
    pub fields: Vec<(String, Value)>,
    pub tags: Tags,
    pub timestamp: Option<WireTimestamp>,
}

/// Parses `{"Value": ..., "Tags": {...}, "UtcTimestamp": ...}`. `Value` must be present (it may be
/// `null`); `Tags` and `UtcTimestamp` may be missing.
pub fn parse_field(payload: &[u8]) -> Result<FieldMessage, PayloadError> {
    expect_object(payload, "field")?;
    let wire: FieldWire = serde_json::from_slice(payload).map_err(|e| json_error("field", &e))?;
    let value = wire
        .value
        .ok_or_else(|| PayloadError::in_field("Value", "the payload has no \"Value\" key"))?;
    Ok(FieldMessage {
        value,
        tags: wire.tags,
        timestamp: wire.timestamp.and_then(|t| t.0),
    })
}

/// Parses `{"Fields": {...}, "Tags": {...}, "UtcTimestamp": ...}`; `Fields` must be present.
pub fn parse_measurement(payload: &[u8]) -> Result<MeasurementMessage, PayloadError> {
    expect_object(payload, "measurement")?;
    let wire: MeasurementWire =
        serde_json::from_slice(payload).map_err(|e| json_error("measurement", &e))?;
    let fields = wire
        .fields
        .ok_or_else(|| PayloadError::in_field("Fields", "the payload has no \"Fields\" object"))?;
    Ok(MeasurementMessage {
        fields: fields.0,
        tags: wire.tags,
        timestamp: wire.timestamp.and_then(|t| t.0),
    })
}

/// One message of Capture's raw tree, parsed: where it came from, its value, tags and time.
#[derive(Debug, Clone, PartialEq)]
pub struct RawPoint {
    pub topic: RawTopic,
    pub value: Value,
    pub tags: Tags,
    /// Nanoseconds since the epoch: `UtcTimestamp`, or `received_at` when the message has none.
    pub timestamp: i64,
    /// Nanoseconds since the epoch when the client received the message.
    pub received_at: i64,
}

/// Parses a raw-tree message. A topic outside the raw grammar is a payload error too: the message
/// cannot become a data point.
pub fn parse_raw(topic: &str, payload: &[u8], received_at: i64) -> Result<RawPoint, PayloadError> {
    let topic = RawTopic::parse(topic).map_err(|e| PayloadError::new(e.to_string()))?;
    let message = parse_field(payload)?;
    let timestamp = match message.timestamp {
        Some(ts) => ts
            .nanos()
            .map_err(|e| PayloadError::in_field("UtcTimestamp", e.to_string()))?,
        None => received_at,
    };
    Ok(RawPoint {
        topic,
        value: message.value,
        tags: message.tags,
        timestamp,
        received_at,
    })
}

/// A command to a source, as the source receives it on `v1/sources/<id>/cmd/<verb>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub source_id: String,
    pub verb: String,
    /// `Topic`: `"<connection>/<measurement>/<variable>"` for `writedata`.
    pub topic: Option<String>,
    pub mapping: Option<String>,
    pub data: Option<Value>,
    /// Keys other than `Topic`, `Mapping` and `Data`, kept as they came.
    pub extra: Vec<(String, Value)>,
}

impl Command {
    /// The `Topic` split into connection, measurement and variable. The variable keeps any further
    /// `/`; parts that are missing are `None`.
    pub fn target(&self) -> (Option<&str>, Option<&str>, Option<&str>) {
        let Some(topic) = self.topic.as_deref() else {
            return (None, None, None);
        };
        let mut parts = topic.splitn(3, '/');
        (parts.next(), parts.next(), parts.next())
    }
}

/// Parses a command message; `topic` must be a `v1/sources/<id>/cmd/<verb>` topic.
pub fn parse_command(topic: &str, payload: &[u8]) -> Result<Command, PayloadError> {
    let Ok(CaptureTopic::Command { source_id, verb }) = crate::topic::parse_topic(topic) else {
        return Err(PayloadError::new(format!(
            "{topic:?} is not a command topic; expected v1/sources/<SourceID>/cmd/<verb>"
        )));
    };
    let object: serde_json::Map<String, Value> =
        serde_json::from_slice(payload).map_err(|e| json_error("command", &e))?;
    let mut command = Command {
        source_id: source_id.to_owned(),
        verb: verb.to_owned(),
        topic: None,
        mapping: None,
        data: None,
        extra: Vec::new(),
    };
    for (name, value) in object {
        match (name.as_str(), value) {
            ("Topic", Value::String(text)) => command.topic = Some(text),
            ("Mapping", Value::String(text)) => command.mapping = Some(text),
            ("Topic" | "Mapping", Value::Null) => {}
            ("Topic" | "Mapping", other) => {
                return Err(PayloadError::in_field(
                    name.clone(),
                    format!("command {name} must be a string, got {other}"),
                ))
            }
            ("Data", value) => command.data = Some(value),
            (_, value) => command.extra.push((name, value)),
        }
    }
    Ok(command)
}

/// When a pushed message says it was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushTime {
    /// No `UtcTimestamp`: Capture stamps the message when it arrives.
    Omit,
    /// Written as ISO 8601 UTC with millisecond precision.
    Iso(i64),
    /// Written as an integer of epoch milliseconds.
    EpochMs(i64),
}

/// Checks that a pushed value is one Capture stores: a finite number, a bool or a string.
pub fn check_push_value(field: &str, value: &Value) -> Result<(), PayloadError> {
    match value {
        Value::Bool(_) | Value::String(_) | Value::Number(_) => Ok(()),
        Value::Null => Err(PayloadError::in_field(
            field,
            format!("{field} is None; Capture stores numbers, strings and booleans: leave the field out instead"),
        )),
        Value::Array(_) | Value::Object(_) => Err(PayloadError::in_field(
            field,
            format!(
                "{field} is a list or dict; Capture stores numbers, strings and booleans: push each part as its own field, or send it as a JSON string"
            ),
        )),
    }
}

fn push_json_str(out: &mut Vec<u8>, text: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

fn push_json_value(out: &mut Vec<u8>, value: &Value) {
    let _ = serde_json::to_writer(&mut *out, value);
}

fn write_tags_and_time<K: AsRef<str>, V: AsRef<str>>(
    out: &mut Vec<u8>,
    tags: &[(K, V)],
    time: PushTime,
) {
    out.extend_from_slice(b",\"Tags\":{");
    for (i, (name, value)) in tags.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_json_str(out, name.as_ref());
        out.push(b':');
        push_json_str(out, value.as_ref());
    }
    out.push(b'}');
    match time {
        PushTime::Omit => {}
        PushTime::Iso(nanos) => {
            out.extend_from_slice(b",\"UtcTimestamp\":\"");
            timestamp::write_iso_millis(out, nanos);
            out.push(b'"');
        }
        PushTime::EpochMs(ms) => {
            out.extend_from_slice(b",\"UtcTimestamp\":");
            out.extend_from_slice(ms.to_string().as_bytes());
        }
    }
    out.push(b'}');
}

/// Writes a field-level payload `{"Value": ..., "Tags": {...}, "UtcTimestamp": ...}` into `out`.
pub fn write_field<K: AsRef<str>, V: AsRef<str>>(
    out: &mut Vec<u8>,
    value: &Value,
    tags: &[(K, V)],
    time: PushTime,
) -> Result<(), PayloadError> {
    check_push_value("Value", value)?;
    out.extend_from_slice(b"{\"Value\":");
    push_json_value(out, value);
    write_tags_and_time(out, tags, time);
    Ok(())
}

/// Writes a measurement-level payload `{"Fields": {...}, "Tags": {...}, "UtcTimestamp": ...}`.
pub fn write_measurement<F: AsRef<str>, K: AsRef<str>, V: AsRef<str>>(
    out: &mut Vec<u8>,
    fields: &[(F, Value)],
    tags: &[(K, V)],
    time: PushTime,
) -> Result<(), PayloadError> {
    if fields.is_empty() {
        return Err(PayloadError::in_field(
            "Fields",
            "a measurement-level push needs at least one field",
        ));
    }
    out.extend_from_slice(b"{\"Fields\":{");
    for (i, (name, value)) in fields.iter().enumerate() {
        let name = name.as_ref();
        if name.is_empty() {
            return Err(PayloadError::in_field("Fields", "a field name is empty"));
        }
        check_push_value(name, value)?;
        if i > 0 {
            out.push(b',');
        }
        push_json_str(out, name);
        out.push(b':');
        push_json_value(out, value);
    }
    out.push(b'}');
    write_tags_and_time(out, tags, time);
    Ok(())
}

/// `Data` as the documented template writes it: a string. A string stays as it is; any other value
/// becomes its JSON text (`55`, `23.4`, `true`).
pub fn data_as_string(data: &Value) -> String {
    match data {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Writes a `writedata` command payload `{"Topic": ..., "Mapping": ..., "Data": ...}`. `Mapping` is
/// left out when `None`.
pub fn write_command(out: &mut Vec<u8>, topic: &str, mapping: Option<&str>, data: &Value) {
    out.extend_from_slice(b"{\"Topic\":");
    push_json_str(out, topic);
    if let Some(mapping) = mapping {
        out.extend_from_slice(b",\"Mapping\":");
        push_json_str(out, mapping);
    }
    out.extend_from_slice(b",\"Data\":");
    push_json_value(out, data);
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TOPIC: &str =
        "v1/raw/AcmeCorp/fe453df1-b4a0-492d-a12c-505988eea849/System_Monitoring_Requester/Monitoring/CPU_Temp";
    const EXAMPLE: &str = r#"{
"Value": 55,
"Tags": {
"Connection_Tag": "System_Monitoring_Requester",
"MachineName": "MyMachine",
"SerialNumber": "77777"
},
"UtcTimestamp": "2024-11-08T10:22:06.26Z"
}"#;
    const EXAMPLE_NANOS: i64 = 1_731_061_326_260_000_000;

    fn tags(pairs: &[(&str, &str)]) -> Tags {
        Tags(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn the_capture_page_example() {
        let point = parse_raw(TOPIC, EXAMPLE.as_bytes(), 7).unwrap();
        assert_eq!(point.topic.company(), "AcmeCorp");
        assert_eq!(point.topic.key(), "CPU_Temp");
        assert_eq!(point.value, json!(55));
        assert!(point.value.is_i64(), "an int stays an int");
        assert_eq!(
            point.tags,
            tags(&[
                ("Connection_Tag", "System_Monitoring_Requester"),
                ("MachineName", "MyMachine"),
                ("SerialNumber", "77777")
            ])
        );
        assert_eq!(point.timestamp, EXAMPLE_NANOS);
        assert_eq!(point.received_at, 7);
    }

    #[test]
    fn every_value_type_is_kept() {
        for value in [
            json!(55),
            json!(-3),
            json!(18_446_744_073_709_551_615u64),
            json!(23.4),
            json!(1e300),
            json!("text"),
            json!("data:image/png;base64,iVBORw0KGgo="),
            json!(true),
            json!(null),
            json!([1, "a", null]),
            json!({"a": {"b": [1.5]}}),
        ] {
            let payload = format!(r#"{{"Value": {value}}}"#);
            let point = parse_raw(TOPIC, payload.as_bytes(), 1).unwrap();
            assert_eq!(point.value, value);
        }
    }

    #[test]
    fn timestamps_every_form() {
        let at = |ts: &str| {
            parse_raw(
                TOPIC,
                format!(r#"{{"Value":1,"UtcTimestamp":{ts}}}"#).as_bytes(),
                42,
            )
            .unwrap()
            .timestamp
        };
        assert_eq!(at(r#""2024-11-08T10:22:06.26Z""#), EXAMPLE_NANOS);
        assert_eq!(at(r#""2024-11-08T11:22:06.260+01:00""#), EXAMPLE_NANOS);
        assert_eq!(at("1731061326260"), EXAMPLE_NANOS);
        assert_eq!(at("1731061326260.0"), EXAMPLE_NANOS);
        assert_eq!(at("null"), 42);
        let missing = parse_raw(TOPIC, br#"{"Value":1}"#, 42).unwrap();
        assert_eq!(
            missing.timestamp, 42,
            "a missing timestamp is the time of receipt"
        );
    }

    #[test]
    fn tags_tolerate_scalars_and_absence() {
        let point = parse_raw(
            TOPIC,
            br#"{"Value":1,"Tags":{"n":5,"b":true,"z":null,"s":"x"}}"#,
            0,
        )
        .unwrap();
        assert_eq!(point.tags, tags(&[("n", "5"), ("b", "true"), ("s", "x")]));
        let point = parse_raw(TOPIC, br#"{"Value":1,"Tags":null}"#, 0).unwrap();
        assert!(point.tags.0.is_empty());
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        let deep = format!("{{\"Value\":{}1{}}}", "[".repeat(500), "]".repeat(500));
        let cases: Vec<(&[u8], &str)> = vec![
            (b"", "empty"),
            (b"   ", "empty"),
            (b"{", "EOF"),
            (b"not json", "expected a JSON object"),
            (b"{\"Value\":1", "EOF"),
            (b"55", "expected"),
            (b"[]", "expected"),
            (br#"{"Tags":{}}"#, "no \"Value\""),
            (br#"{"Value":1,"UtcTimestamp":"yesterday"}"#, "ISO 8601"),
            (br#"{"Value":1,"UtcTimestamp":true}"#, "UtcTimestamp"),
            (br#"{"Value":1,"Tags":["a"]}"#, "tag"),
            (br#"{"Value":1,"Tags":{"a":[1]}}"#, "list or object"),
            (b"{\"Value\":\"\xff\xfe\"}", "invalid unicode"),
            (deep.as_bytes(), "recursion"),
        ];
        for (payload, expected) in cases {
            let err = parse_raw(TOPIC, payload, 0).unwrap_err();
            assert!(
                err.message.contains(expected),
                "{:?}: {err} should mention {expected:?}",
                String::from_utf8_lossy(payload)
            );
        }
        let err = parse_raw("v1/raw/A/B", b"{\"Value\":1}", 0).unwrap_err();
        assert!(err.message.contains("not a raw-tree topic"), "{err}");
        let err =
            parse_raw(TOPIC, br#"{"Value":1,"UtcTimestamp":99999999999999999}"#, 0).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("UtcTimestamp"));
    }

    #[test]
    fn field_push_writes_and_reads_back() {
        let mut out = Vec::new();
        write_field(
            &mut out,
            &json!(55),
            &[("MachineName", "MyMachine")],
            PushTime::Iso(EXAMPLE_NANOS),
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"Value":55,"Tags":{"MachineName":"MyMachine"},"UtcTimestamp":"2024-11-08T10:22:06.260Z"}"#
        );
        let back = parse_field(&out).unwrap();
        assert_eq!(back.value, json!(55));
        assert_eq!(back.tags, tags(&[("MachineName", "MyMachine")]));
        assert_eq!(back.timestamp, Some(WireTimestamp::Iso(EXAMPLE_NANOS)));

        out.clear();
        write_field::<&str, &str>(
            &mut out,
            &json!("a\"b"),
            &[],
            PushTime::EpochMs(1_731_061_326_260),
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"Value":"a\"b","Tags":{},"UtcTimestamp":1731061326260}"#
        );
        out.clear();
        write_field::<&str, &str>(&mut out, &json!(false), &[], PushTime::Omit).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"Value":false,"Tags":{}}"#
        );
        assert_eq!(parse_field(&out).unwrap().timestamp, None);
    }

    #[test]
    fn measurement_push_writes_and_reads_back() {
        let fields = vec![("CPU_Temp", json!(55)), ("CPU_Load", json!(23.4))];
        let mut out = Vec::new();
        write_measurement(
            &mut out,
            &fields,
            &[("MachineName", "MyMachine")],
            PushTime::Iso(EXAMPLE_NANOS),
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"Fields":{"CPU_Temp":55,"CPU_Load":23.4},"Tags":{"MachineName":"MyMachine"},"UtcTimestamp":"2024-11-08T10:22:06.260Z"}"#
        );
        let back = parse_measurement(&out).unwrap();
        assert_eq!(
            back.fields,
            vec![
                ("CPU_Temp".to_owned(), json!(55)),
                ("CPU_Load".to_owned(), json!(23.4))
            ]
        );
        assert_eq!(back.tags, tags(&[("MachineName", "MyMachine")]));
        assert!(parse_measurement(br#"{"Tags":{}}"#)
            .unwrap_err()
            .message
            .contains("Fields"));
    }

    #[test]
    fn unpushable_values_name_the_field() {
        let mut out = Vec::new();
        let err = write_measurement::<_, &str, &str>(
            &mut out,
            &[("Good", json!(1)), ("Bad", json!([1]))],
            &[],
            PushTime::Omit,
        )
        .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("Bad"));
        let err =
            write_field::<&str, &str>(&mut out, &Value::Null, &[], PushTime::Omit).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("Value"));
        let err =
            write_measurement::<&str, &str, &str>(&mut out, &[], &[], PushTime::Omit).unwrap_err();
        assert!(err.message.contains("at least one field"));
    }

    #[test]
    fn command_payload_round_trip() {
        let mut out = Vec::new();
        write_command(
            &mut out,
            "Conn/Meas/Var",
            Some("ns=2;s=Tag1"),
            &json!(data_as_string(&json!(55))),
        );
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"Topic":"Conn/Meas/Var","Mapping":"ns=2;s=Tag1","Data":"55"}"#
        );
        let cmd = parse_command("v1/sources/S1/cmd/writedata", &out).unwrap();
        assert_eq!(cmd.source_id, "S1");
        assert_eq!(cmd.verb, "writedata");
        assert_eq!(cmd.target(), (Some("Conn"), Some("Meas"), Some("Var")));
        assert_eq!(cmd.mapping.as_deref(), Some("ns=2;s=Tag1"));
        assert_eq!(cmd.data, Some(json!("55")));

        let cmd = parse_command(
            "v1/sources/S1/cmd/writedata",
            br#"{"Topic":"C/M/a/b","Data":1.5,"Extra":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(cmd.target(), (Some("C"), Some("M"), Some("a/b")));
        assert_eq!(cmd.mapping, None);
        assert_eq!(cmd.extra, vec![("Extra".to_owned(), json!({"x": 1}))]);
        assert!(parse_command("v1/raw/A/B/C/D/E", b"{}").is_err());
        assert!(parse_command("v1/sources/S/cmd/writedata", br#"{"Topic":5}"#).is_err());
    }

    #[test]
    fn data_as_string_uses_json_text() {
        assert_eq!(data_as_string(&json!("on")), "on");
        assert_eq!(data_as_string(&json!(55)), "55");
        assert_eq!(data_as_string(&json!(23.4)), "23.4");
        assert_eq!(data_as_string(&json!(true)), "true");
    }
}

/// What Capture does with a source's push: the raw-tree messages it publishes for it, one per
/// field, with `Connection_Tag` added to the tags, a missing timestamp filled in with `now` (ns), and
/// epoch milliseconds turned into ISO 8601. `topic` is the push's `v1/sources/<id>/data/read/...` topic.
pub fn to_raw(
    company: &str,
    topic: &str,
    payload: &[u8],
    now: i64,
) -> Result<Vec<(String, Vec<u8>)>, PayloadError> {
    let Ok(CaptureTopic::Data {
        source_id,
        connection_tag,
        measurement,
        key,
    }) = crate::topic::parse_topic(topic)
    else {
        return Err(PayloadError::new(format!(
            "{topic:?} is not a data push topic; expected v1/sources/<SourceID>/data/read/<ConnectionTag>/<Measurement>[/<Key>]"
        )));
    };
    let (fields, mut tags, timestamp) = if let Some(key) = key {
        let message = parse_field(payload)?;
        (
            vec![(key.to_owned(), message.value)],
            message.tags,
            message.timestamp,
        )
    } else {
        let message = parse_measurement(payload)?;
        (message.fields, message.tags, message.timestamp)
    };
    tags.0.retain(|(name, _)| name != "Connection_Tag");
    tags.0
        .insert(0, ("Connection_Tag".to_owned(), connection_tag.to_owned()));
    let at = match timestamp {
        Some(ts) => ts
            .nanos()
            .map_err(|e| PayloadError::in_field("UtcTimestamp", e.to_string()))?,
        None => now,
    };
    let mut out = Vec::with_capacity(fields.len());
    for (field, value) in fields {
        let raw_topic =
            crate::topic::raw_topic(company, source_id, connection_tag, measurement, &field)
                .map_err(|e| PayloadError::in_field(field.clone(), e.to_string()))?;
        let mut body = Vec::with_capacity(96);
        body.extend_from_slice(b"{\"Value\":");
        push_json_value(&mut body, &value);
        write_tags_and_time(&mut body, &tags.0, PushTime::Iso(at));
        out.push((raw_topic, body));
    }
    Ok(out)
}

#[cfg(test)]
mod to_raw_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn measurement_push_becomes_one_raw_message_per_field() {
        let payload = br#"{"Fields":{"CPU_Temp":55,"CPU_Load":23.4},"Tags":{"MachineName":"M1"},"UtcTimestamp":1731061326260}"#;
        let out = to_raw(
            "AcmeCorp",
            "v1/sources/S1/data/read/Conn/Monitoring",
            payload,
            7,
        )
        .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0, "v1/raw/AcmeCorp/S1/Conn/Monitoring/CPU_Temp");
        let point = parse_raw(&out[0].0, &out[0].1, 0).unwrap();
        assert_eq!(point.value, json!(55));
        assert_eq!(
            point.tags.0,
            vec![
                ("Connection_Tag".to_owned(), "Conn".to_owned()),
                ("MachineName".to_owned(), "M1".to_owned())
            ]
        );
        assert_eq!(point.timestamp, 1_731_061_326_260_000_000);
        assert!(std::str::from_utf8(&out[0].1)
            .unwrap()
            .contains("\"2024-11-08T10:22:06.260Z\""));
    }

    #[test]
    fn field_push_without_timestamp_is_stamped() {
        let out = to_raw(
            "AcmeCorp",
            "v1/sources/S1/data/read/Conn/M/Key",
            br#"{"Value":"on"}"#,
            42_000_000,
        )
        .unwrap();
        assert_eq!(out.len(), 1);
        let point = parse_raw(&out[0].0, &out[0].1, 0).unwrap();
        assert_eq!(point.timestamp, 42_000_000);
        assert_eq!(point.value, json!("on"));
        assert!(to_raw("AcmeCorp", "v1/sources/S1/cmd/writedata", b"{}", 0).is_err());
        assert!(to_raw(
            "AcmeCorp",
            "v1/sources/S1/data/read/C/M",
            b"{\"Value\":1}",
            0
        )
        .is_err());
    }
}
