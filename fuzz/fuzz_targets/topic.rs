//! Topics and filters: any text, split at its first NUL into a filter and a topic. Parsing, validating
//! and matching must never panic, and what parses must be what it claims.
#![no_main]

use _core::topic;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (filter, topic_text) = text.split_once('\0').unwrap_or((text, text));
    let _ = topic::parse_topic(topic_text);
    if let Ok(raw) = topic::RawTopic::parse(topic_text) {
        // A parsed raw topic names six segments of the text it came from.
        assert!(topic_text.starts_with("v1/raw/"));
        assert_eq!(topic_text.split('/').count(), 7, "{raw:?}");
    }
    if topic::validate_filter(filter).is_ok() {
        let _ = topic::matches(filter, topic_text);
    }
    // A topic always matches itself as a filter when it holds no wildcard (`$` topics are the
    // broker's own, and `$share/<group>/...` is a shared subscription, not a plain filter).
    if !topic_text.is_empty() && !topic_text.contains(['+', '#']) && !topic_text.starts_with('$') {
        assert!(topic::matches(topic_text, topic_text), "{topic_text:?}");
    }
});
