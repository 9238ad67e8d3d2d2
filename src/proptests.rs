//! Property tests of the codec: whatever is written reads back the same, and no input panics.

use crate::payload::{self, PushTime, Tags, WireTimestamp};
use crate::timestamp;
use crate::topic;
use proptest::prelude::*;
use serde_json::{json, Value};

fn name() -> impl Strategy<Value = String> {
    // Any non-empty text without the characters a topic level may not hold.
    "[^/+#\u{0}]{1,12}"
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        any::<bool>().prop_map(Value::from),
        ".*".prop_map(Value::from),
    ]
}

fn nanos() -> impl Strategy<Value = i64> {
    // Whole milliseconds within what ISO 8601 writing and the i64 range both cover.
    (-9_000_000_000_000i64..9_000_000_000_000i64).prop_map(|ms| ms * timestamp::NANOS_PER_MILLI)
}

proptest! {
    #[test]
    fn raw_topics_round_trip(c in name(), s in name(), k in name(), m in name(), f in name()) {
        let built = topic::raw_topic(&c, &s, &k, &m, &f).unwrap();
        let parsed = topic::RawTopic::parse(&built).unwrap();
        prop_assert_eq!(parsed.company(), c.as_str());
        prop_assert_eq!(parsed.source_id(), s.as_str());
        prop_assert_eq!(parsed.connection_tag(), k.as_str());
        prop_assert_eq!(parsed.measurement(), m.as_str());
        prop_assert_eq!(parsed.key(), f.as_str());
        let filter = topic::raw_filter(&c, "+", "+", &m, "#").unwrap();
        prop_assert!(topic::validate_filter(&filter).is_ok());
        prop_assert!(topic::matches(&filter, &built));
    }

    #[test]
    fn field_payloads_round_trip(value in scalar(), tags in prop::collection::vec((".*", ".*"), 0..4), at in nanos()) {
        let mut out = Vec::new();
        payload::write_field(&mut out, &value, &tags, PushTime::Iso(at)).unwrap();
        let back = payload::parse_field(&out).unwrap();
        prop_assert_eq!(back.value, value);
        prop_assert_eq!(back.tags, Tags(tags));
        prop_assert_eq!(back.timestamp, Some(WireTimestamp::Iso(at)));
    }

    #[test]
    fn measurement_payloads_round_trip(fields in prop::collection::vec((name(), scalar()), 1..6), ms in 0i64..9_000_000_000_000) {
        let mut out = Vec::new();
        payload::write_measurement::<_, &str, &str>(&mut out, &fields, &[], PushTime::EpochMs(ms)).unwrap();
        let back = payload::parse_measurement(&out).unwrap();
        prop_assert_eq!(back.fields, fields);
        prop_assert_eq!(back.timestamp, Some(WireTimestamp::EpochMs(ms)));
    }

    #[test]
    fn commands_round_trip(c in name(), m in name(), v in name(), mapping in proptest::option::of(".*"), data in scalar()) {
        let mut out = Vec::new();
        let target = format!("{c}/{m}/{v}");
        payload::write_command(&mut out, &target, mapping.as_deref(), &data);
        let back = payload::parse_command("v1/sources/S/cmd/writedata", &out).unwrap();
        prop_assert_eq!(back.target(), (Some(c.as_str()), Some(m.as_str()), Some(v.as_str())));
        prop_assert_eq!(back.mapping, mapping);
        prop_assert_eq!(back.data, Some(data));
    }

    #[test]
    fn iso_timestamps_round_trip(at in nanos()) {
        let text = timestamp::format_iso_millis(at);
        prop_assert_eq!(timestamp::parse_iso8601(&text).unwrap(), at);
    }

    #[test]
    fn arbitrary_bytes_never_panic(topic in ".*", bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = payload::parse_raw(&topic, &bytes, 0);
        let _ = payload::parse_measurement(&bytes);
        let _ = payload::parse_command(&topic, &bytes);
        let _ = topic::parse_topic(&topic);
        let _ = topic::validate_filter(&topic);
        let _ = timestamp::parse_iso8601(&topic);
    }

    #[test]
    fn json_like_garbage_never_panics(text in r#"[{}\[\]":,0-9a-zA-Z.eE+\- ]{0,80}"#) {
        let _ = payload::parse_raw("v1/raw/A/B/C/D/E", text.as_bytes(), 0);
        let _ = payload::parse_measurement(text.as_bytes());
    }
}
