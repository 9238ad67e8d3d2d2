//! Capture's topic grammar: the raw tree, the sources tree, subscription filters.
//!
//! Topics this module knows:
//! - `v1/raw/<Company>/<SourceID>/<ConnectionTag>/<Measurement>/<Key>` (live data, one field a message)
//! - `v1/sources/<SourceID>/data/read/<ConnectionTag>/<Measurement>[/<Key>]` (a source pushing data)
//! - `v1/sources/<SourceID>/cmd/<verb>` (commands to a source, `writedata` today)
//!
//! Every check here runs before anything reaches the network, so a filter Capture would refuse (it
//! disconnects the client) is an error in the caller's hands instead.

use std::fmt;

/// MQTT's limit on a topic's length in bytes (a 16-bit length prefix).
pub const MAX_TOPIC_LEN: usize = 65_535;

/// A named level of a Capture topic, used to say which part of a topic was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    Company,
    SourceId,
    ConnectionTag,
    Measurement,
    Key,
    Verb,
    Variable,
    ShareGroup,
    Topic,
    Filter,
}

impl Segment {
    pub fn name(self) -> &'static str {
        match self {
            Segment::Company => "company",
            Segment::SourceId => "source_id",
            Segment::ConnectionTag => "connection_tag",
            Segment::Measurement => "measurement",
            Segment::Key => "key",
            Segment::Verb => "verb",
            Segment::Variable => "variable",
            Segment::ShareGroup => "shared subscription group",
            Segment::Topic => "topic",
            Segment::Filter => "filter",
        }
    }
}

/// A topic or filter that Capture's grammar (or MQTT's) does not allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicError {
    pub segment: Segment,
    pub value: String,
    pub reason: String,
}

impl TopicError {
    fn new(segment: Segment, value: &str, reason: impl Into<String>) -> Self {
        TopicError {
            segment,
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} {:?}: {}",
            self.segment.name(),
            self.value,
            self.reason
        )
    }
}

impl std::error::Error for TopicError {}

/// Checks a concrete name (a company, source id, connection tag, measurement, key, ...): it must be
/// one non-empty topic level without wildcards or NUL.
pub fn check_name(segment: Segment, value: &str) -> Result<(), TopicError> {
    if value.is_empty() {
        return Err(TopicError::new(
            segment,
            value,
            format!("the {} is empty; give the exact name", segment.name()),
        ));
    }
    if value == "+" || value == "#" {
        let why = if segment == Segment::Company {
            "Capture rejects a wildcard in the company segment; give your company's exact name (e.g. \"AcmeCorp\")"
        } else {
            "a wildcard is not allowed here; give the exact name (wildcards belong in subscription filters)"
        };
        return Err(TopicError::new(segment, value, why));
    }
    for (bad, what) in [
        (
            '/',
            "'/' (it would split the name into several topic levels)",
        ),
        ('+', "the wildcard '+'"),
        ('#', "the wildcard '#'"),
        ('\0', "a NUL character"),
    ] {
        if value.contains(bad) {
            return Err(TopicError::new(
                segment,
                value,
                format!(
                    "a topic level cannot contain {what}; remove it from the {}",
                    segment.name()
                ),
            ));
        }
    }
    Ok(())
}

/// Checks one level of a subscription filter: `+`, `#` or a concrete name.
fn check_filter_level(segment: Segment, value: &str) -> Result<(), TopicError> {
    if value == "+" || value == "#" {
        if segment == Segment::Company {
            return check_name(segment, value);
        }
        return Ok(());
    }
    check_name(segment, value)
}

fn check_length(segment: Segment, topic: &str) -> Result<(), TopicError> {
    if topic.len() > MAX_TOPIC_LEN {
        let shown: String = topic.chars().take(60).collect();
        return Err(TopicError::new(
            segment,
            &format!("{shown}..."),
            format!(
                "it is {} bytes long; MQTT allows at most {MAX_TOPIC_LEN}",
                topic.len()
            ),
        ));
    }
    Ok(())
}

/// Builds a raw-tree subscription filter for one company.
///
/// Each of `source`, `connection`, `measurement` and `key` is a name, `+` (any one level) or `#`
/// (everything below). After a `#` the remaining levels must be left at their defaults.
pub fn raw_filter(
    company: &str,
    source: &str,
    connection: &str,
    measurement: &str,
    key: &str,
) -> Result<String, TopicError> {
    check_name(Segment::Company, company)?;
    let mut filter = format!("v1/raw/{company}");
    let levels = [
        (Segment::SourceId, source, "+"),
        (Segment::ConnectionTag, connection, "+"),
        (Segment::Measurement, measurement, "+"),
        (Segment::Key, key, "#"),
    ];
    let mut after_hash: Option<Segment> = None;
    for (segment, value, default) in levels {
        if let Some(hash_at) = after_hash {
            // Anything but the default after '#' would be silently ignored by the broker.
            if value != default && value != "#" {
                return Err(TopicError::new(
                    segment,
                    value,
                    format!(
                        "{} is '#', which already matches every level below it; leave {} at its default or replace '#' with '+'",
                        hash_at.name(),
                        segment.name()
                    ),
                ));
            }
            continue;
        }
        check_filter_level(segment, value)?;
        filter.push('/');
        filter.push_str(value);
        if value == "#" {
            after_hash = Some(segment);
        }
    }
    check_length(Segment::Filter, &filter)?;
    Ok(filter)
}

/// Builds the raw-tree topic of one field.
pub fn raw_topic(
    company: &str,
    source_id: &str,
    connection_tag: &str,
    measurement: &str,
    key: &str,
) -> Result<String, TopicError> {
    check_name(Segment::Company, company)?;
    check_name(Segment::SourceId, source_id)?;
    check_name(Segment::ConnectionTag, connection_tag)?;
    check_name(Segment::Measurement, measurement)?;
    check_name(Segment::Key, key)?;
    let topic = format!("v1/raw/{company}/{source_id}/{connection_tag}/{measurement}/{key}");
    check_length(Segment::Topic, &topic)?;
    Ok(topic)
}

/// Builds the topic a source pushes data to: measurement level without `key`, field level with it.
pub fn data_topic(
    source_id: &str,
    connection_tag: &str,
    measurement: &str,
    key: Option<&str>,
) -> Result<String, TopicError> {
    check_name(Segment::SourceId, source_id)?;
    check_name(Segment::ConnectionTag, connection_tag)?;
    check_name(Segment::Measurement, measurement)?;
    let mut topic = format!("v1/sources/{source_id}/data/read/{connection_tag}/{measurement}");
    if let Some(key) = key {
        check_name(Segment::Key, key)?;
        topic.push('/');
        topic.push_str(key);
    }
    check_length(Segment::Topic, &topic)?;
    Ok(topic)
}

/// Builds the topic of a command to a source (`verb` is `writedata` for Capture's write command).
pub fn command_topic(source_id: &str, verb: &str) -> Result<String, TopicError> {
    check_name(Segment::SourceId, source_id)?;
    check_name(Segment::Verb, verb)?;
    let topic = format!("v1/sources/{source_id}/cmd/{verb}");
    check_length(Segment::Topic, &topic)?;
    Ok(topic)
}

/// A raw-tree topic, owned, with the positions of its levels so that reading them copies nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawTopic {
    topic: String,
    // Byte offsets: level i spans starts[i]..starts[i+1]-1 (the last one ends at topic.len()).
    starts: [u32; 5],
}

impl RawTopic {
    /// Parses `v1/raw/<Company>/<SourceID>/<ConnectionTag>/<Measurement>/<Key>`.
    pub fn parse(topic: &str) -> Result<RawTopic, TopicError> {
        let not_raw = |why: &str| {
            TopicError::new(
                Segment::Topic,
                topic,
                format!(
                    "not a raw-tree topic ({why}); raw topics look like v1/raw/<Company>/<SourceID>/<ConnectionTag>/<Measurement>/<Key>"
                ),
            )
        };
        let Some(rest) = topic.strip_prefix("v1/raw/") else {
            return Err(not_raw("it does not start with v1/raw/"));
        };
        check_length(Segment::Topic, topic)?;
        let base = 7u32; // "v1/raw/".len()
        let mut starts = [0u32; 5];
        let mut level = 0usize;
        let mut level_start = 0usize;
        for (i, byte) in rest.bytes().enumerate() {
            if byte == b'/' {
                if i == level_start {
                    return Err(not_raw("a level is empty"));
                }
                level += 1;
                if level >= 5 {
                    return Err(not_raw("it has more than 7 levels"));
                }
                level_start = i + 1;
                // Topics are at most 65,535 bytes (checked above), so offsets fit in u32.
                #[allow(clippy::cast_possible_truncation)]
                {
                    starts[level] = base + level_start as u32;
                }
            }
        }
        if level != 4 {
            return Err(not_raw("it has fewer than 7 levels"));
        }
        if level_start == rest.len() {
            return Err(not_raw("a level is empty"));
        }
        starts[0] = base;
        Ok(RawTopic {
            topic: topic.to_owned(),
            starts,
        })
    }

    fn level(&self, i: usize) -> &str {
        let start = self.starts[i] as usize;
        let end = if i + 1 < 5 {
            self.starts[i + 1] as usize - 1
        } else {
            self.topic.len()
        };
        &self.topic[start..end]
    }

    pub fn as_str(&self) -> &str {
        &self.topic
    }
    pub fn company(&self) -> &str {
        self.level(0)
    }
    pub fn source_id(&self) -> &str {
        self.level(1)
    }
    pub fn connection_tag(&self) -> &str {
        self.level(2)
    }
    pub fn measurement(&self) -> &str {
        self.level(3)
    }
    pub fn key(&self) -> &str {
        self.level(4)
    }
}

/// Any topic of Capture's grammar, parsed into its named levels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptureTopic<'a> {
    /// `v1/raw/<Company>/<SourceID>/<ConnectionTag>/<Measurement>/<Key>`
    Raw {
        company: &'a str,
        source_id: &'a str,
        connection_tag: &'a str,
        measurement: &'a str,
        key: &'a str,
    },
    /// `v1/sources/<SourceID>/data/read/<ConnectionTag>/<Measurement>[/<Key>]`
    Data {
        source_id: &'a str,
        connection_tag: &'a str,
        measurement: &'a str,
        key: Option<&'a str>,
    },
    /// `v1/sources/<SourceID>/cmd/<verb>`
    Command { source_id: &'a str, verb: &'a str },
}

/// Parses a topic of Capture's grammar (raw, data/read or cmd); anything else is an error.
pub fn parse_topic(topic: &str) -> Result<CaptureTopic<'_>, TopicError> {
    check_length(Segment::Topic, topic)?;
    let levels: Vec<&str> = topic.split('/').collect();
    let unknown = || {
        TopicError::new(
            Segment::Topic,
            topic,
            "not a Capture topic; expected v1/raw/<Company>/<SourceID>/<ConnectionTag>/<Measurement>/<Key>, \
             v1/sources/<SourceID>/data/read/<ConnectionTag>/<Measurement>[/<Key>] or v1/sources/<SourceID>/cmd/<verb>",
        )
    };
    let checked =
        |segment: Segment, value: &'_ str| check_name(segment, value).map_err(|_| unknown());
    match levels.as_slice() {
        ["v1", "raw", company, source_id, connection_tag, measurement, key] => {
            checked(Segment::Company, company)?;
            checked(Segment::SourceId, source_id)?;
            checked(Segment::ConnectionTag, connection_tag)?;
            checked(Segment::Measurement, measurement)?;
            checked(Segment::Key, key)?;
            Ok(CaptureTopic::Raw {
                company,
                source_id,
                connection_tag,
                measurement,
                key,
            })
        }
        ["v1", "sources", source_id, "data", "read", connection_tag, measurement, rest @ ..]
            if rest.len() <= 1 =>
        {
            checked(Segment::SourceId, source_id)?;
            checked(Segment::ConnectionTag, connection_tag)?;
            checked(Segment::Measurement, measurement)?;
            let key = rest.first().copied();
            if let Some(key) = key {
                checked(Segment::Key, key)?;
            }
            Ok(CaptureTopic::Data {
                source_id,
                connection_tag,
                measurement,
                key,
            })
        }
        ["v1", "sources", source_id, "cmd", verb] => {
            checked(Segment::SourceId, source_id)?;
            checked(Segment::Verb, verb)?;
            Ok(CaptureTopic::Command { source_id, verb })
        }
        _ => Err(unknown()),
    }
}

/// Splits `$share/<group>/<filter>` into its group and filter; other filters have no group.
pub fn split_shared(filter: &str) -> (Option<&str>, &str) {
    if let Some(rest) = filter.strip_prefix("$share/") {
        if let Some((group, inner)) = rest.split_once('/') {
            return (Some(group), inner);
        }
    }
    (None, filter)
}

/// Checks a topic to publish to: non-empty, no wildcard, no NUL, within MQTT's length.
pub fn validate_publish_topic(topic: &str) -> Result<(), TopicError> {
    check_length(Segment::Topic, topic)?;
    if topic.is_empty() || topic.contains(['+', '#', '\0']) {
        return Err(TopicError::new(
            Segment::Topic,
            topic,
            "a publish topic must be non-empty and hold no wildcard",
        ));
    }
    Ok(())
}

/// Checks a subscription filter against MQTT's rules and Capture's: wildcards only as whole levels,
/// `#` only last, and, for any filter that could reach the raw tree, an exact company name.
/// A `$share/<group>/` prefix (MQTT 5 shared subscriptions) is allowed and checked too.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_length(Segment::Filter, filter)?;
    let (group, inner) = split_shared(filter);
    if filter.starts_with("$share/") {
        let Some(group) = group else {
            return Err(TopicError::new(
                Segment::Filter,
                filter,
                "a shared subscription needs a group and a filter: $share/<group>/<filter>",
            ));
        };
        if group.is_empty() || group.contains(['+', '#', '\0']) {
            return Err(TopicError::new(
                Segment::ShareGroup,
                group,
                "the group of $share/<group>/<filter> must be a non-empty name without wildcards",
            ));
        }
    }
    if inner.is_empty() {
        return Err(TopicError::new(
            Segment::Filter,
            filter,
            "a filter cannot be empty; to receive your company's data use v1/raw/<Company>/#",
        ));
    }
    if inner.contains('\0') {
        return Err(TopicError::new(
            Segment::Filter,
            filter,
            "a filter cannot contain a NUL character",
        ));
    }
    let levels: Vec<&str> = inner.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.len() > 1 && level.contains(['+', '#']) {
            return Err(TopicError::new(
                Segment::Filter,
                filter,
                format!("level {level:?} mixes a wildcard with other characters; '+' and '#' must stand alone between '/'"),
            ));
        }
        if *level == "#" && i + 1 != levels.len() {
            return Err(TopicError::new(
                Segment::Filter,
                filter,
                "'#' must be the last level of a filter",
            ));
        }
    }
    // Could this filter match a raw-tree topic with a wildcard over the company level?
    let may_be = |i: usize, name: &str| levels.get(i).is_some_and(|l| *l == name || *l == "+");
    let is_hash = |i: usize| levels.get(i).is_some_and(|l| *l == "#");
    let company_wild = is_hash(0)
        || (may_be(0, "v1")
            && (is_hash(1) || (may_be(1, "raw") && (is_hash(2) || levels.get(2) == Some(&"+")))));
    if company_wild {
        return Err(TopicError::new(
            Segment::Filter,
            filter,
            "it wildcards the company level of the raw tree, which Capture rejects (it disconnects the client); \
             name the company exactly, e.g. v1/raw/AcmeCorp/#",
        ));
    }
    if levels.len() > 7 && levels[0] == "v1" && levels[1] == "raw" {
        return Err(TopicError::new(
            Segment::Filter,
            filter,
            "raw topics have 7 levels (v1/raw/<Company>/<SourceID>/<ConnectionTag>/<Measurement>/<Key>), so this filter matches nothing",
        ));
    }
    Ok(())
}

/// Whether `topic` matches the subscription `filter` under MQTT's rules (a `$share/<group>/`
/// prefix is ignored; wildcards at the first level do not match topics starting with `$`).
pub fn matches(filter: &str, topic: &str) -> bool {
    let (_, filter) = split_shared(filter);
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match level {
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            name => match topic_levels.next() {
                Some(t) if t == name => {}
                _ => return false,
            },
        }
    }
    topic_levels.next().is_none()
}

/// Whether a first filter level is a wildcard that MQTT keeps away from `$` topics.
fn wild_first(levels: &[&str]) -> bool {
    levels.first().is_some_and(|l| *l == "+" || *l == "#")
}

fn dollar_first(levels: &[&str]) -> bool {
    levels.first().is_some_and(|l| l.starts_with('$'))
}

/// Whether every topic that `inner` matches is matched by `outer` (plain filters, no `$share/`).
pub fn covers(outer: &str, inner: &str) -> bool {
    let a: Vec<&str> = outer.split('/').collect();
    let b: Vec<&str> = inner.split('/').collect();
    if wild_first(&a) && dollar_first(&b) {
        return false;
    }
    for (i, level) in a.iter().enumerate() {
        match (*level, b.get(i).copied()) {
            ("#", _) => return true,
            (_, None | Some("#")) => return false,
            ("+", Some(_)) => {}
            (name, Some(other)) if name == other => {}
            _ => return false,
        }
    }
    a.len() == b.len()
}

/// Whether some topic matches both filters (plain filters, no `$share/`).
pub fn overlaps(first: &str, second: &str) -> bool {
    let left: Vec<&str> = first.split('/').collect();
    let right: Vec<&str> = second.split('/').collect();
    if (wild_first(&left) && dollar_first(&right)) || (wild_first(&right) && dollar_first(&left)) {
        return false;
    }
    let mut level = 0;
    loop {
        match (left.get(level).copied(), right.get(level).copied()) {
            (Some("#"), _) | (_, Some("#")) | (None, None) => return true,
            // One ended: the other matches the same topic only with left trailing `#` (the parent level).
            (None, Some(_)) => return right.get(level..) == Some(&["#"][..]),
            (Some(_), None) => return left.get(level..) == Some(&["#"][..]),
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(l), Some(r)) if l == r => {}
            _ => return false,
        }
        level += 1;
    }
}

/// The narrowest filter of this simple form that covers both: equal levels kept, differing levels
/// become `+`, and `#` from where one of them ends or has `#`.
pub fn merge(first: &str, second: &str) -> String {
    let left: Vec<&str> = first.split('/').collect();
    let right: Vec<&str> = second.split('/').collect();
    let mut out: Vec<&str> = Vec::new();
    let mut level = 0;
    loop {
        match (left.get(level).copied(), right.get(level).copied()) {
            (None, None) => break,
            (Some("#"), _) | (_, Some("#")) | (None, Some(_)) | (Some(_), None) => {
                out.push("#");
                break;
            }
            (Some(l), Some(r)) if l == r => out.push(l),
            _ => out.push("+"),
        }
        level += 1;
    }
    out.join("/")
}

/// The filters to subscribe to at an MQTT 3.1.1 broker for a set of subscription filters, so that
/// no topic matches two of them: a filter covered by another is left out, and two that overlap
/// without one covering the other are merged into a common one. The broker then sends each message
/// once whatever its rule for overlapping subscriptions, and the client fans it out to every
/// subscription whose own filter matches. Shared subscriptions (`$share/`) stay as they are. Each
/// filter comes with the highest QoS asked of what it stands for.
pub fn broker_filters(filters: &[(String, u8)]) -> Vec<(String, u8)> {
    let mut out: Vec<(String, u8)> = Vec::new();
    for (filter, qos) in filters {
        if filter.starts_with("$share/") {
            match out.iter_mut().find(|(f, _)| f == filter) {
                Some(existing) => existing.1 = existing.1.max(*qos),
                None => out.push((filter.clone(), *qos)),
            }
            continue;
        }
        let (mut filter, mut qos) = (filter.clone(), *qos);
        loop {
            let plain = |f: &String| !f.starts_with("$share/");
            if let Some(existing) = out.iter_mut().find(|(f, _)| plain(f) && covers(f, &filter)) {
                existing.1 = existing.1.max(qos);
                break;
            }
            out.retain(|(f, q)| {
                let absorbed = plain(f) && covers(&filter, f);
                if absorbed {
                    qos = qos.max(*q);
                }
                !absorbed
            });
            if let Some(pos) = out
                .iter()
                .position(|(f, _)| plain(f) && overlaps(f, &filter))
            {
                let (other, q) = out.remove(pos);
                filter = merge(&other, &filter);
                qos = qos.max(q);
                continue;
            }
            out.push((filter, qos));
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_topic_has_no_wildcard() {
        assert!(validate_publish_topic("v1/sources/s/data/read/C/M").is_ok());
        for bad in ["", "a/+/b", "a/#", "a\0b"] {
            let err = validate_publish_topic(bad).unwrap_err();
            assert_eq!(err.segment, Segment::Topic);
            assert!(err.to_string().contains("no wildcard"), "{err}");
        }
    }

    const EXAMPLE: &str =
        "v1/raw/AcmeCorp/fe453df1-b4a0-492d-a12c-505988eea849/System_Monitoring_Requester/Monitoring/CPU_Temp";

    #[test]
    fn raw_filter_examples_from_capture_page() {
        assert_eq!(
            raw_filter("AcmeCorp", "#", "+", "+", "#").unwrap(),
            "v1/raw/AcmeCorp/#"
        );
        assert_eq!(
            raw_filter("AcmeCorp", "+", "+", "Monitoring", "#").unwrap(),
            "v1/raw/AcmeCorp/+/+/Monitoring/#"
        );
        assert_eq!(
            raw_filter("AcmeCorp", "+", "+", "+", "#").unwrap(),
            "v1/raw/AcmeCorp/+/+/+/#"
        );
    }

    #[test]
    fn raw_filter_refuses_company_wildcards_and_bad_names() {
        for bad in ["+", "#", "", "Acme/Corp", "Acme+", "Acme#", "A\0"] {
            let err = raw_filter(bad, "+", "+", "+", "#").unwrap_err();
            assert_eq!(err.segment, Segment::Company, "{bad:?}");
            assert_eq!(err.value, bad);
        }
        let err = raw_filter("+", "+", "+", "+", "#").unwrap_err();
        assert!(
            err.to_string().contains("Capture rejects a wildcard"),
            "{err}"
        );
        let err = raw_filter("Acme", "a/b", "+", "+", "#").unwrap_err();
        assert_eq!(err.segment, Segment::SourceId);
        assert!(err.to_string().contains("'/'"));
    }

    #[test]
    fn raw_filter_refuses_levels_after_hash() {
        let err = raw_filter("Acme", "#", "+", "Monitoring", "#").unwrap_err();
        assert_eq!(err.segment, Segment::Measurement);
        assert!(err.reason.contains("source_id is '#'"), "{err}");
    }

    #[test]
    fn raw_topic_round_trips_through_parse() {
        let topic = raw_topic(
            "AcmeCorp",
            "fe453df1-b4a0-492d-a12c-505988eea849",
            "System_Monitoring_Requester",
            "Monitoring",
            "CPU_Temp",
        )
        .unwrap();
        assert_eq!(topic, EXAMPLE);
        let parsed = RawTopic::parse(&topic).unwrap();
        assert_eq!(parsed.company(), "AcmeCorp");
        assert_eq!(parsed.source_id(), "fe453df1-b4a0-492d-a12c-505988eea849");
        assert_eq!(parsed.connection_tag(), "System_Monitoring_Requester");
        assert_eq!(parsed.measurement(), "Monitoring");
        assert_eq!(parsed.key(), "CPU_Temp");
        assert_eq!(parsed.as_str(), EXAMPLE);
    }

    #[test]
    fn raw_topic_parse_rejects_other_shapes() {
        for bad in [
            "",
            "v1/raw",
            "v1/raw/",
            "v1/raw/A/B/C/D",
            "v1/raw/A/B/C/D/E/F",
            "v1/raw/A//C/D/E",
            "v1/raw/A/B/C/D/",
            "/v1/raw/A/B/C/D/E",
            "v2/raw/A/B/C/D/E",
            "v1/sources/S/data/read/C/M/K",
        ] {
            let err = RawTopic::parse(bad).unwrap_err();
            assert_eq!(err.segment, Segment::Topic, "{bad:?}");
            assert!(
                err.reason.contains("not a raw-tree topic"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn unicode_names_are_kept() {
        let topic = raw_topic("Acmé", "src-ü", "Conn 1", "Température", "温度").unwrap();
        let parsed = RawTopic::parse(&topic).unwrap();
        assert_eq!(parsed.company(), "Acmé");
        assert_eq!(parsed.key(), "温度");
        assert_eq!(parsed.measurement(), "Température");
    }

    #[test]
    fn data_and_command_topics() {
        assert_eq!(
            data_topic("S1", "Conn", "Meas", Some("Key")).unwrap(),
            "v1/sources/S1/data/read/Conn/Meas/Key"
        );
        assert_eq!(
            data_topic("S1", "Conn", "Meas", None).unwrap(),
            "v1/sources/S1/data/read/Conn/Meas"
        );
        assert_eq!(
            command_topic("S1", "writedata").unwrap(),
            "v1/sources/S1/cmd/writedata"
        );
        assert_eq!(
            data_topic("S1", "C", "M", Some("+")).unwrap_err().segment,
            Segment::Key
        );
        assert_eq!(
            command_topic("", "writedata").unwrap_err().segment,
            Segment::SourceId
        );
        assert_eq!(
            command_topic("S", "a/b").unwrap_err().segment,
            Segment::Verb
        );
    }

    #[test]
    fn parse_topic_knows_all_three_trees() {
        assert_eq!(
            parse_topic(EXAMPLE).unwrap(),
            CaptureTopic::Raw {
                company: "AcmeCorp",
                source_id: "fe453df1-b4a0-492d-a12c-505988eea849",
                connection_tag: "System_Monitoring_Requester",
                measurement: "Monitoring",
                key: "CPU_Temp",
            }
        );
        assert_eq!(
            parse_topic("v1/sources/S/data/read/C/M/K").unwrap(),
            CaptureTopic::Data {
                source_id: "S",
                connection_tag: "C",
                measurement: "M",
                key: Some("K")
            }
        );
        assert_eq!(
            parse_topic("v1/sources/S/data/read/C/M").unwrap(),
            CaptureTopic::Data {
                source_id: "S",
                connection_tag: "C",
                measurement: "M",
                key: None
            }
        );
        assert_eq!(
            parse_topic("v1/sources/S/cmd/writedata").unwrap(),
            CaptureTopic::Command {
                source_id: "S",
                verb: "writedata"
            }
        );
        for bad in [
            "v1/sources/S/data/read/C",
            "v1/sources/S/cmd",
            "v1/raw/A/B/C/D/+",
            "foo",
            "v1/sources/S/data/read/C/M/K/X",
        ] {
            assert!(parse_topic(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validate_filter_applies_capture_rules() {
        for ok in [
            "v1/raw/AcmeCorp/#",
            "v1/raw/AcmeCorp/+/+/Monitoring/#",
            "v1/raw/AcmeCorp/+/+/+/+",
            "$share/ingest/v1/raw/AcmeCorp/#",
            "v1/sources/S1/cmd/+",
            "v1/raw",
            "other/tree/#",
        ] {
            validate_filter(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "#",
            "+/#",
            "v1/#",
            "v1/+/#",
            "+/raw/+/#",
            "v1/raw/+/#",
            "v1/raw/#",
            "$share/g/v1/raw/+/x",
            "v1/raw/Acme/a#",
            "v1/raw/Acme/#/x",
            "",
            "$share//v1/raw/A/#",
            "$share/g+/v1/raw/A/#",
            "$share/g",
            "$share/g/",
            "v1/raw/A/S/C/M/K/extra",
        ] {
            assert!(validate_filter(bad).is_err(), "{bad:?} should be refused");
        }
        let err = validate_filter("v1/raw/+/#").unwrap_err();
        assert!(err.reason.contains("company"), "{err}");
    }

    #[test]
    fn matching_follows_mqtt() {
        assert!(matches("v1/raw/AcmeCorp/#", EXAMPLE));
        assert!(matches("v1/raw/AcmeCorp/+/+/Monitoring/#", EXAMPLE));
        assert!(matches("v1/raw/AcmeCorp/+/+/Monitoring/CPU_Temp", EXAMPLE));
        assert!(matches("$share/g/v1/raw/AcmeCorp/#", EXAMPLE));
        assert!(!matches("v1/raw/AcmeCorp/+/+/Other/#", EXAMPLE));
        assert!(!matches("v1/raw/Other/#", EXAMPLE));
        assert!(!matches("v1/raw/AcmeCorp/+", EXAMPLE));
        assert!(matches("a/#", "a"));
        assert!(matches("a/+", "a/"));
        assert!(!matches("a/+", "a"));
        assert!(!matches("#", "$SYS/broker"));
        assert!(!matches("+/broker", "$SYS/broker"));
        assert!(matches("$SYS/#", "$SYS/broker"));
    }

    #[test]
    fn overlong_topics_are_refused() {
        let long = "x".repeat(MAX_TOPIC_LEN);
        assert!(raw_topic("A", "B", "C", "D", &long).is_err());
        assert!(validate_filter(&format!("v1/raw/A/{long}")).is_err());
    }

    #[test]
    fn cover_overlap_and_merge() {
        assert!(covers("a/#", "a"));
        assert!(covers("a/#", "a/b/c"));
        assert!(covers("a/+/c", "a/b/c"));
        assert!(!covers("a/+/c", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(covers("#", "a/+"));
        assert!(!covers("#", "$SYS/x"));
        assert!(overlaps("a/+/c", "a/b/+"));
        assert!(overlaps("a/#", "a"));
        assert!(!overlaps("a/b", "a/c"));
        assert!(!overlaps("a/b", "a/b/c"));
        assert!(!overlaps("+/x", "$SYS/x"));
        assert_eq!(merge("a/+/c", "a/b/+"), "a/+/+");
        assert_eq!(merge("a/b", "a/b/c"), "a/b/#");
        assert_eq!(merge("a/b/#", "a/c"), "a/+/#");
        let cases = [
            ("a/+/c", "a/b/+"),
            ("a/b", "a/b/c"),
            ("a/b/#", "a/c"),
            ("x/y", "x/y"),
        ];
        for (x, y) in cases {
            let m = merge(x, y);
            assert!(covers(&m, x) && covers(&m, y), "{m} covers {x} and {y}");
        }
    }

    #[test]
    fn broker_filters_never_overlap() {
        let f = |list: &[(&str, u8)]| {
            broker_filters(
                &list
                    .iter()
                    .map(|(f, q)| ((*f).to_owned(), *q))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            f(&[("v1/raw/A/#", 0), ("v1/raw/A/s/+/+/+", 1)]),
            vec![("v1/raw/A/#".to_owned(), 1)]
        );
        assert_eq!(
            f(&[("v1/raw/A/s/+/+/+", 1), ("v1/raw/A/#", 0)]),
            vec![("v1/raw/A/#".to_owned(), 1)]
        );
        assert_eq!(
            f(&[("v1/raw/A/s/c/+/k", 0), ("v1/raw/A/s/+/m/+", 1)]),
            vec![("v1/raw/A/s/+/+/+".to_owned(), 1)]
        );
        assert_eq!(
            f(&[("a/b", 0), ("a/c", 1), ("a/b", 1)]),
            vec![("a/b".to_owned(), 1), ("a/c".to_owned(), 1)]
        );
        assert_eq!(
            f(&[("$share/g/a/#", 1), ("a/#", 0)]),
            vec![("$share/g/a/#".to_owned(), 1), ("a/#".to_owned(), 0)]
        );
    }
}
