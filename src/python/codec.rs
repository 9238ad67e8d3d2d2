//! Topic builders and payload writers, exposed as module functions.

use super::convert::{naive_option, push_time, tags_from_py, to_json};
use super::errors::{payload_error, topic_error};
use crate::payload;
use crate::topic::{self, Segment};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple};

/// Builds a subscription filter for a company's raw tree; each level is a name, `"+"` or `"#"`.
///
/// The company must be exact: Capture rejects a wildcard there. Raises `TopicError` naming the
/// level that is wrong.
///
/// >>> import capture_mqtt as cm
/// >>> cm.raw_filter("AcmeCorp", measurement="Monitoring")
/// 'v1/raw/AcmeCorp/+/+/Monitoring/#'
/// >>> cm.raw_filter("AcmeCorp", source="#")
/// 'v1/raw/AcmeCorp/#'
#[pyfunction]
#[pyo3(signature = (company, source = "+", connection = "+", measurement = "+", key = "#"))]
pub fn raw_filter(
    py: Python<'_>,
    company: &str,
    source: &str,
    connection: &str,
    measurement: &str,
    key: &str,
) -> PyResult<String> {
    topic::raw_filter(company, source, connection, measurement, key)
        .map_err(|e| topic_error(py, &e))
}

/// Builds the raw-tree topic of one field.
///
/// >>> import capture_mqtt as cm
/// >>> cm.raw_topic("AcmeCorp", "src-1", "Conn", "Monitoring", "CPU_Temp")
/// 'v1/raw/AcmeCorp/src-1/Conn/Monitoring/CPU_Temp'
#[pyfunction]
pub fn raw_topic(
    py: Python<'_>,
    company: &str,
    source_id: &str,
    connection_tag: &str,
    measurement: &str,
    key: &str,
) -> PyResult<String> {
    topic::raw_topic(company, source_id, connection_tag, measurement, key)
        .map_err(|e| topic_error(py, &e))
}

/// Builds the topic a source pushes to: measurement level, or field level when `key` is given.
///
/// >>> import capture_mqtt as cm
/// >>> cm.data_topic("src-1", "Conn", "Monitoring")
/// 'v1/sources/src-1/data/read/Conn/Monitoring'
/// >>> cm.data_topic("src-1", "Conn", "Monitoring", "CPU_Temp")
/// 'v1/sources/src-1/data/read/Conn/Monitoring/CPU_Temp'
#[pyfunction]
#[pyo3(signature = (source_id, connection_tag, measurement, key = None))]
pub fn data_topic(
    py: Python<'_>,
    source_id: &str,
    connection_tag: &str,
    measurement: &str,
    key: Option<&str>,
) -> PyResult<String> {
    topic::data_topic(source_id, connection_tag, measurement, key).map_err(|e| topic_error(py, &e))
}

/// Builds the topic of a command to a source.
///
/// >>> import capture_mqtt as cm
/// >>> cm.command_topic("src-1")
/// 'v1/sources/src-1/cmd/writedata'
#[pyfunction]
#[pyo3(signature = (source_id, verb = "writedata"))]
pub fn command_topic(py: Python<'_>, source_id: &str, verb: &str) -> PyResult<String> {
    topic::command_topic(source_id, verb).map_err(|e| topic_error(py, &e))
}

/// Checks a subscription filter against MQTT's rules and Capture's, and returns it unchanged.
///
/// Refused: wildcards over the company level of the raw tree (Capture disconnects for those),
/// misplaced wildcards, empty filters. `$share/<group>/<filter>` is accepted.
///
/// >>> import capture_mqtt as cm
/// >>> cm.validate_filter("v1/raw/AcmeCorp/#")
/// 'v1/raw/AcmeCorp/#'
/// >>> cm.validate_filter("v1/raw/+/#")
/// Traceback (most recent call last):
/// ...
/// capture_mqtt.errors.TopicError: invalid filter "v1/raw/+/#": it wildcards the company level ...
#[pyfunction]
pub fn validate_filter(py: Python<'_>, filter: &str) -> PyResult<String> {
    topic::validate_filter(filter).map_err(|e| topic_error(py, &e))?;
    Ok(filter.to_owned())
}

/// Whether `topic` matches the subscription `filter` (MQTT rules; a `$share/<group>/` prefix is ignored).
///
/// >>> import capture_mqtt as cm
/// >>> cm.topic_matches("v1/raw/AcmeCorp/+/+/Monitoring/#", "v1/raw/AcmeCorp/s/c/Monitoring/CPU")
/// True
#[pyfunction]
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    topic::matches(filter, topic)
}

/// Writes a field-level push payload: `{"Value", "Tags", "UtcTimestamp"}`.
///
/// `value` is an int, float, bool or str; `tags` a dict of str to str; `timestamp` an aware datetime
/// (a naive one is refused unless `naive="utc"` or `naive="local"` says what it means), epoch
/// milliseconds as an int, an ISO 8601 string, or None to let Capture stamp it.
/// Datetimes and strings are written as ISO 8601 UTC with milliseconds. Raises `PayloadError` naming
/// the field for NaN, infinity or an unsupported type.
///
/// >>> import capture_mqtt as cm
/// >>> cm.field_payload(55, tags={"MachineName": "M1"}, timestamp=1731061326260)
/// b'{"Value":55,"Tags":{"MachineName":"M1"},"UtcTimestamp":1731061326260}'
#[pyfunction]
#[pyo3(signature = (value, *, tags = None, timestamp = None, naive = "refuse"))]
pub fn field_payload<'py>(
    py: Python<'py>,
    value: &Bound<'py, PyAny>,
    tags: Option<&Bound<'py, PyAny>>,
    timestamp: Option<&Bound<'py, PyAny>>,
    naive: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let value = to_json(value, "Value", false)?;
    let tags = tags_from_py(tags)?;
    let time = push_time(timestamp, "UtcTimestamp", naive_option(naive)?)?;
    let mut out = Vec::with_capacity(128);
    payload::write_field(&mut out, &value, &tags, time).map_err(|e| payload_error(py, &e))?;
    Ok(PyBytes::new(py, &out))
}

/// Writes a measurement-level push payload: `{"Fields", "Tags", "UtcTimestamp"}`.
///
/// `fields` maps field names to int, float, bool or str; the rest is as in `field_payload`.
///
/// >>> import capture_mqtt as cm
/// >>> cm.measurement_payload({"CPU_Temp": 55, "CPU_Load": 23.4})
/// b'{"Fields":{"CPU_Temp":55,"CPU_Load":23.4},"Tags":{}}'
#[pyfunction]
#[pyo3(signature = (fields, *, tags = None, timestamp = None, naive = "refuse"))]
pub fn measurement_payload<'py>(
    py: Python<'py>,
    fields: &Bound<'py, PyAny>,
    tags: Option<&Bound<'py, PyAny>>,
    timestamp: Option<&Bound<'py, PyAny>>,
    naive: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let dict = fields.cast::<PyDict>().map_err(|_| {
        super::errors::payload_error_in(
            py,
            "Fields",
            "fields must be a dict of field names to values",
        )
    })?;
    let mut pairs = Vec::with_capacity(dict.len());
    for (name, value) in dict.iter() {
        let Ok(name) = name.cast::<PyString>() else {
            return Err(super::errors::payload_error_in(
                py,
                "Fields",
                &format!("field name {name} is not a str"),
            ));
        };
        let name = name.to_str()?.to_owned();
        let value = to_json(&value, &name, false)?;
        pairs.push((name, value));
    }
    let tags = tags_from_py(tags)?;
    let time = push_time(timestamp, "UtcTimestamp", naive_option(naive)?)?;
    let mut out = Vec::with_capacity(64 + 32 * pairs.len());
    payload::write_measurement(&mut out, &pairs, &tags, time).map_err(|e| payload_error(py, &e))?;
    Ok(PyBytes::new(py, &out))
}

/// The `"<connection>/<measurement>/<variable>"` of a command, from a str or a 3-tuple, checked.
pub fn command_target(py: Python<'_>, topic: &Bound<'_, PyAny>) -> PyResult<String> {
    let parts: Vec<String> = if let Ok(text) = topic.cast::<PyString>() {
        text.to_str()?.splitn(3, '/').map(str::to_owned).collect()
    } else if let Ok(tuple) = topic.cast::<PyTuple>() {
        tuple.extract()?
    } else {
        return Err(pyo3::exceptions::PyTypeError::new_err(
            "topic must be \"connection/measurement/variable\" or a (connection, measurement, variable) tuple",
        ));
    };
    let [connection, measurement, variable] = parts.as_slice() else {
        return Err(topic_error(
            py,
            &topic::TopicError {
                segment: Segment::Topic,
                value: topic.str()?.to_string(),
                reason: "a command target needs three parts: connection/measurement/variable"
                    .to_owned(),
            },
        ));
    };
    for (segment, value) in [
        (Segment::ConnectionTag, connection),
        (Segment::Measurement, measurement),
        (Segment::Variable, variable),
    ] {
        topic::check_name(segment, value).map_err(|e| topic_error(py, &e))?;
    }
    Ok(format!("{connection}/{measurement}/{variable}"))
}

/// Writes a `writedata` command payload: `{"Topic", "Mapping", "Data"}`.
///
/// `topic` is `"connection/measurement/variable"` or a 3-tuple. `Data` is written as a JSON string
/// (Capture's template) unless `data_as="json"`: then the value goes as native JSON. A non-string
/// value becomes its JSON text (`55` -> `"55"`, `True` -> `"true"`).
///
/// >>> import capture_mqtt as cm
/// >>> cm.command_payload(("Conn", "Meas", "Setpoint"), 42)
/// b'{"Topic":"Conn/Meas/Setpoint","Data":"42"}'
/// >>> cm.command_payload("Conn/Meas/Setpoint", 42, mapping="ns=2;s=SP", data_as="json")
/// b'{"Topic":"Conn/Meas/Setpoint","Mapping":"ns=2;s=SP","Data":42}'
#[pyfunction]
#[pyo3(signature = (topic, data, *, mapping = None, data_as = "string"))]
pub fn command_payload<'py>(
    py: Python<'py>,
    topic: &Bound<'py, PyAny>,
    data: &Bound<'py, PyAny>,
    mapping: Option<&str>,
    data_as: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let target = command_target(py, topic)?;
    let value = to_json(data, "Data", true)?;
    let value = match data_as {
        "string" => serde_json::Value::String(payload::data_as_string(&value)),
        "json" => value,
        other => {
            return Err(PyValueError::new_err(format!(
                "data_as must be \"string\" or \"json\", not {other:?}"
            )))
        }
    };
    let mut out = Vec::with_capacity(96);
    payload::write_command(&mut out, &target, mapping, &value);
    Ok(PyBytes::new(py, &out))
}

/// The scope rule of an account kind (`"user"`, `"source"`), in the words the scope checks use.
#[pyfunction]
pub fn _scope_rule(kind: &str) -> &'static str {
    crate::scope::rule(match kind {
        "user" => crate::scope::AccountKind::User,
        "source" => crate::scope::AccountKind::Source,
        _ => crate::scope::AccountKind::Unknown,
    })
}
