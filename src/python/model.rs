//! `DataPoint`, `Command` and `TopicInfo`: frozen value classes over the core's parsed messages.
//! Fields are converted to Python objects when read, so parsing costs no Python allocations.

use super::convert::{from_json, nanos_or_now, nanos_to_datetime, payload_bytes, tags_to_py};
use super::errors::{payload_error, topic_error};
use crate::payload::{self, RawPoint};
use crate::timestamp::format_iso_millis;
use crate::topic::{self, CaptureTopic};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::fmt::Write as _;

/// A str as Python's `repr` writes it (single quotes, escapes), for `__repr__` of value classes.
fn repr_str(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

fn repr_opt(text: Option<&str>) -> String {
    text.map_or_else(|| "None".to_owned(), repr_str)
}

/// One field value from Capture's raw tree: where it came from, the value, its tags and its time.
///
/// Made by a subscription, or by `parse_raw` from a recorded message. Immutable.
///
/// >>> import capture_mqtt as cm
/// >>> p = cm.parse_raw("v1/raw/AcmeCorp/src-1/Conn/Monitoring/CPU_Temp", b'{"Value": 55}')
/// >>> (p.company, p.source_id, p.connection_tag, p.measurement, p.key, p.value)
/// ('AcmeCorp', 'src-1', 'Conn', 'Monitoring', 'CPU_Temp', 55)
#[pyclass(frozen, module = "capture_mqtt", name = "DataPoint")]
pub struct PyDataPoint {
    pub point: RawPoint,
    pub qos: u8,
    pub retain: bool,
}

#[pymethods]
impl PyDataPoint {
    /// The full MQTT topic, `v1/raw/<Company>/<SourceID>/<ConnectionTag>/<Measurement>/<Key>`.
    #[getter]
    fn topic(&self) -> &str {
        self.point.topic.as_str()
    }
    /// The company (tenant) the data belongs to.
    #[getter]
    fn company(&self) -> &str {
        self.point.topic.company()
    }
    /// The source (device or gateway) GUID.
    #[getter]
    fn source_id(&self) -> &str {
        self.point.topic.source_id()
    }
    /// The tag of the connection inside the source's collector.
    #[getter]
    fn connection_tag(&self) -> &str {
        self.point.topic.connection_tag()
    }
    /// The measurement (a table in Capture's storage).
    #[getter]
    fn measurement(&self) -> &str {
        self.point.topic.measurement()
    }
    /// The key (field, column) within the measurement.
    #[getter]
    fn key(&self) -> &str {
        self.point.topic.key()
    }
    /// The value as sent: int, float, str, bool, None, list or dict.
    #[getter]
    fn value<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        from_json(py, &self.point.value)
    }
    /// The tags, a new dict of str to str each time it is read.
    #[getter]
    fn tags<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        tags_to_py(py, &self.point.tags.0)
    }
    /// When the value was measured (`UtcTimestamp`), an aware UTC datetime; the time of receipt when
    /// the message carried none.
    #[getter]
    fn timestamp<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        nanos_to_datetime(py, self.point.timestamp)
    }
    /// `timestamp` as integer nanoseconds since the Unix epoch (no precision lost).
    #[getter]
    fn timestamp_ns(&self) -> i64 {
        self.point.timestamp
    }
    /// When this client received the message, an aware UTC datetime.
    #[getter]
    fn received_at<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        nanos_to_datetime(py, self.point.received_at)
    }
    /// The MQTT quality of service the message was delivered with.
    #[getter]
    fn qos(&self) -> u8 {
        self.qos
    }
    /// Whether the broker delivered it as a retained message.
    #[getter]
    fn retain(&self) -> bool {
        self.retain
    }
    /// All fields as a plain dict (for `pandas.DataFrame(points)` style code).
    ///
    /// >>> import capture_mqtt as cm
    /// >>> point = cm.parse_raw("v1/raw/AcmeCorp/src-1/Conn/Monitoring/CPU_Temp", b'{"Value": 55, "UtcTimestamp": 1731061326260}')
    /// >>> key, value, timestamp = map(point.to_dict().get, ("key", "value", "timestamp"))
    /// >>> key, value, timestamp.isoformat()
    /// ('CPU_Temp', 55, '2024-11-08T10:22:06.260000+00:00')
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        dict.set_item("topic", self.topic())?;
        dict.set_item("company", self.company())?;
        dict.set_item("source_id", self.source_id())?;
        dict.set_item("connection_tag", self.connection_tag())?;
        dict.set_item("measurement", self.measurement())?;
        dict.set_item("key", self.key())?;
        dict.set_item("value", self.value(py)?)?;
        dict.set_item("tags", self.tags(py)?)?;
        dict.set_item("timestamp", self.timestamp(py)?)?;
        dict.set_item("received_at", self.received_at(py)?)?;
        dict.set_item("qos", self.qos)?;
        dict.set_item("retain", self.retain)?;
        Ok(dict)
    }
    fn __eq__(&self, other: &Self) -> bool {
        self.point == other.point && self.qos == other.qos && self.retain == other.retain
    }
    fn __repr__(&self) -> String {
        format!(
            "DataPoint(company={}, source_id={}, connection_tag={}, measurement={}, key={}, value={}, timestamp='{}')",
            repr_str(self.company()),
            repr_str(self.source_id()),
            repr_str(self.connection_tag()),
            repr_str(self.measurement()),
            repr_str(self.key()),
            self.point.value,
            format_iso_millis(self.point.timestamp),
        )
    }
}

/// Parses one message of Capture's raw tree into a `DataPoint`.
///
/// `payload` is bytes or str. A missing `UtcTimestamp` becomes `received_at` (default: now).
/// Raises `PayloadError` with the reason for invalid JSON, a wrong shape or a topic outside the raw tree.
///
/// >>> import capture_mqtt as cm
/// >>> p = cm.parse_raw(
/// ...     "v1/raw/AcmeCorp/src-1/Conn/Monitoring/CPU_Temp",
/// ...     '{"Value": 55, "Tags": {"MachineName": "M1"}, "UtcTimestamp": "2024-11-08T10:22:06.26Z"}',
/// ... )
/// >>> p.value, p.tags, p.timestamp.isoformat()
/// (55, {'MachineName': 'M1'}, '2024-11-08T10:22:06.260000+00:00')
#[pyfunction]
#[pyo3(signature = (topic, payload, *, qos = 0, retain = false, received_at = None))]
pub fn parse_raw(
    py: Python<'_>,
    topic: &str,
    payload: &Bound<'_, PyAny>,
    qos: u8,
    retain: bool,
    received_at: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyDataPoint> {
    let received_at = nanos_or_now(received_at, "received_at")?;
    let bytes = payload_bytes(payload)?;
    let point =
        payload::parse_raw(topic, &bytes, received_at).map_err(|e| payload_error(py, &e))?;
    Ok(PyDataPoint { point, qos, retain })
}

/// A command received by a source on `v1/sources/<id>/cmd/<verb>`.
///
/// For `writedata`, `topic` is `"<connection>/<measurement>/<variable>"`, split into `connection`,
/// `measurement` and `variable` (None when missing); `data` is the value to write (a str by Capture's
/// template), `mapping` the device-side address when given, `raw` the payload bytes and `extra` any
/// other keys. Immutable.
///
/// >>> import capture_mqtt as cm
/// >>> c = cm.parse_command("v1/sources/src-1/cmd/writedata", b'{"Topic": "Conn/Meas/Setpoint", "Data": "42"}')
/// >>> (c.verb, c.connection, c.measurement, c.variable, c.data)
/// ('writedata', 'Conn', 'Meas', 'Setpoint', '42')
#[pyclass(frozen, module = "capture_mqtt", name = "Command")]
pub struct PyCommand {
    command: payload::Command,
    raw: Py<PyBytes>,
}

impl PyCommand {
    pub fn new(py: Python<'_>, command: payload::Command, raw: &[u8]) -> Self {
        PyCommand {
            command,
            raw: PyBytes::new(py, raw).unbind(),
        }
    }
}

#[pymethods]
impl PyCommand {
    /// The source the command is for.
    #[getter]
    fn source_id(&self) -> &str {
        &self.command.source_id
    }
    /// The command's verb, the topic's last level (`writedata`).
    #[getter]
    fn verb(&self) -> &str {
        &self.command.verb
    }
    /// The payload's `Topic`: `"<connection>/<measurement>/<variable>"`.
    #[getter]
    fn topic(&self) -> Option<&str> {
        self.command.topic.as_deref()
    }
    /// The connection part of `topic`.
    #[getter]
    fn connection(&self) -> Option<&str> {
        self.command.target().0
    }
    /// The measurement part of `topic`.
    #[getter]
    fn measurement(&self) -> Option<&str> {
        self.command.target().1
    }
    /// The variable part of `topic` (keeps any further `/`).
    #[getter]
    fn variable(&self) -> Option<&str> {
        self.command.target().2
    }
    /// The payload's `Mapping`, the device-side address, if given.
    #[getter]
    fn mapping(&self) -> Option<&str> {
        self.command.mapping.as_deref()
    }
    /// The payload's `Data`: the value to write, as sent (None when missing).
    #[getter]
    fn data<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match &self.command.data {
            Some(value) => from_json(py, value),
            None => Ok(py.None().into_bound(py)),
        }
    }
    /// Payload keys other than `Topic`, `Mapping` and `Data`.
    #[getter]
    fn extra<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (name, value) in &self.command.extra {
            dict.set_item(name, from_json(py, value)?)?;
        }
        Ok(dict)
    }
    /// The payload exactly as received.
    #[getter]
    fn raw<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        self.raw.bind(py).clone()
    }
    fn __eq__(&self, other: &Self) -> bool {
        self.command == other.command
    }
    fn __repr__(&self) -> String {
        let data = self
            .command
            .data
            .as_ref()
            .map_or_else(|| "None".to_owned(), ToString::to_string);
        format!(
            "Command(source_id={}, verb={}, topic={}, mapping={}, data={data})",
            repr_str(&self.command.source_id),
            repr_str(&self.command.verb),
            repr_opt(self.command.topic.as_deref()),
            repr_opt(self.command.mapping.as_deref()),
        )
    }
}

/// Parses a command message received on `v1/sources/<id>/cmd/<verb>` into a `Command`.
///
/// >>> import capture_mqtt as cm
/// >>> c = cm.parse_command("v1/sources/src-1/cmd/writedata",
/// ...                      '{"Topic": "Conn/Meas/Var", "Mapping": "ns=2;s=V", "Data": "1"}')
/// >>> c.mapping, c.data
/// ('ns=2;s=V', '1')
#[pyfunction]
pub fn parse_command(
    py: Python<'_>,
    topic: &str,
    payload: &Bound<'_, PyAny>,
) -> PyResult<PyCommand> {
    let bytes = payload_bytes(payload)?;
    let command = payload::parse_command(topic, &bytes).map_err(|e| payload_error(py, &e))?;
    Ok(PyCommand {
        command,
        raw: PyBytes::new(py, &bytes).unbind(),
    })
}

/// A topic of Capture's grammar split into its named levels; levels a kind of topic lacks are None.
///
/// `kind` is `"raw"`, `"data"` (a source's `data/read` push) or `"command"`.
///
/// >>> import capture_mqtt as cm
/// >>> t = cm.parse_topic("v1/sources/src-1/data/read/Conn/Meas")
/// >>> t.kind, t.source_id, t.connection_tag, t.measurement, t.key
/// ('data', 'src-1', 'Conn', 'Meas', None)
#[pyclass(frozen, module = "capture_mqtt", name = "TopicInfo", get_all)]
pub struct PyTopicInfo {
    /// `"raw"`, `"data"` or `"command"`.
    kind: &'static str,
    /// The company (raw topics only).
    company: Option<String>,
    /// The source GUID.
    source_id: Option<String>,
    /// The connection tag (raw and data topics).
    connection_tag: Option<String>,
    /// The measurement (raw and data topics).
    measurement: Option<String>,
    /// The key (raw topics, and field-level data topics).
    key: Option<String>,
    /// The command verb (command topics).
    verb: Option<String>,
}

#[pymethods]
impl PyTopicInfo {
    fn __repr__(&self) -> String {
        format!(
            "TopicInfo(kind={}, company={}, source_id={}, connection_tag={}, measurement={}, key={}, verb={})",
            repr_str(self.kind),
            repr_opt(self.company.as_deref()),
            repr_opt(self.source_id.as_deref()),
            repr_opt(self.connection_tag.as_deref()),
            repr_opt(self.measurement.as_deref()),
            repr_opt(self.key.as_deref()),
            repr_opt(self.verb.as_deref()),
        )
    }
}

/// Parses a Capture topic (raw tree, `data/read` or `cmd`) into a `TopicInfo`; raises `TopicError`
/// for anything else.
///
/// >>> import capture_mqtt as cm
/// >>> cm.parse_topic("v1/raw/AcmeCorp/src-1/Conn/Meas/Key").company
/// 'AcmeCorp'
#[pyfunction]
pub fn parse_topic(py: Python<'_>, topic: &str) -> PyResult<PyTopicInfo> {
    let parsed = topic::parse_topic(topic).map_err(|e| topic_error(py, &e))?;
    let own = |s: &str| Some(s.to_owned());
    Ok(match parsed {
        CaptureTopic::Raw {
            company,
            source_id,
            connection_tag,
            measurement,
            key,
        } => PyTopicInfo {
            kind: "raw",
            company: own(company),
            source_id: own(source_id),
            connection_tag: own(connection_tag),
            measurement: own(measurement),
            key: own(key),
            verb: None,
        },
        CaptureTopic::Data {
            source_id,
            connection_tag,
            measurement,
            key,
        } => PyTopicInfo {
            kind: "data",
            company: None,
            source_id: own(source_id),
            connection_tag: own(connection_tag),
            measurement: own(measurement),
            key: key.map(str::to_owned),
            verb: None,
        },
        CaptureTopic::Command { source_id, verb } => PyTopicInfo {
            kind: "command",
            company: None,
            source_id: own(source_id),
            connection_tag: None,
            measurement: None,
            key: None,
            verb: own(verb),
        },
    })
}
