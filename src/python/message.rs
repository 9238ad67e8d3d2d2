//! The messages a subscription delivers to Python: `Message`, `MalformedMessage`, and the conversion
//! of a queued item into its Python object.

use super::errors::session_error;
use super::model::{PyCommand, PyDataPoint};
use crate::session::Item;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// A plain MQTT message (from a subscription with a filter outside Capture's raw tree).
///
/// >>> import capture_mqtt as cm
/// >>> with cm.Client.from_env() as client, client.subscribe("v1/raw/AcmeCorp/#", decode="bytes") as sub:
/// ...     message = sub.get(timeout=10)
/// >>> message.topic, message.payload[:10], message.qos
/// ('v1/raw/AcmeCorp/src-1/Conn/Monitoring/CPU_Temp', b'{"Value":5', 0)
#[pyclass(module = "capture_mqtt", name = "Message", frozen, get_all)]
pub struct PyMessage {
    /// The topic it was published to.
    topic: String,
    /// The payload, untouched.
    payload: Py<PyBytes>,
    /// The QoS it was delivered with.
    qos: u8,
    /// Whether it was a retained message.
    retain: bool,
}

#[pymethods]
impl PyMessage {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Message(topic={:?}, payload={} bytes, qos={}, retain={})",
            self.topic,
            self.payload.bind(py).as_bytes().len(),
            self.qos,
            if self.retain { "True" } else { "False" }
        )
    }
}

/// A message a subscription could not decode: its topic, its raw bytes and the reason.
///
/// Counted in the subscription's `stats["malformed"]`; the stream goes on after it.
///
/// >>> import os
/// >>> import capture_mqtt as cm
/// >>> seen = []
/// >>> with cm.SourceClient.from_url(os.environ.get("SOURCE_URL")) as src:
/// ...     # Not the raw tree, so decoding as raw data points fails: each message is handed over.
/// ...     sub = src.subscribe("v1/sources/src-1/data/read/#", decode="raw", on_malformed=seen.append)
/// ...     src.push_field("Line1", "Press", "Pressure_bar", 4.2)
/// ...     sub.get(timeout=1)
/// ...     sub.stats["malformed"]
/// 1
/// >>> seen[0].topic, seen[0].reason[:20]
/// ('v1/sources/src-1/data/read/Line1/Press/Pressure_bar', '...')
#[pyclass(module = "capture_mqtt", name = "MalformedMessage", frozen, get_all)]
pub struct PyMalformed {
    /// The topic it arrived on.
    topic: String,
    /// The payload exactly as received.
    payload: Py<PyBytes>,
    /// Why it could not be decoded.
    reason: String,
    /// When it was received (nanoseconds since the epoch).
    received_at_ns: i64,
}

#[pymethods]
impl PyMalformed {
    fn __repr__(&self) -> String {
        format!(
            "MalformedMessage(topic={:?}, reason={:?})",
            self.topic, self.reason
        )
    }
}

pub fn item_to_py(py: Python<'_>, item: Item) -> PyResult<Bound<'_, PyAny>> {
    Ok(match item {
        Item::Point {
            point, qos, retain, ..
        } => Bound::new(py, PyDataPoint { point, qos, retain })?.into_any(),
        Item::Command { command, raw, .. } => {
            Bound::new(py, PyCommand::new(py, command, &raw))?.into_any()
        }
        Item::Message(message) => Bound::new(
            py,
            PyMessage {
                topic: message.topic,
                payload: PyBytes::new(py, &message.payload).unbind(),
                qos: message.qos,
                retain: message.retain,
            },
        )?
        .into_any(),
        Item::Malformed { message, reason } => Bound::new(
            py,
            PyMalformed {
                topic: message.topic,
                payload: PyBytes::new(py, &message.payload).unbind(),
                reason,
                received_at_ns: message.received_at,
            },
        )?
        .into_any(),
        Item::Error(err) => return Err(session_error(py, &err)),
    })
}
