//! Raising the exception classes of `capture_mqtt.errors` from Rust errors.

use crate::payload::PayloadError;
use crate::session::{AccountKind, Action, SessionError};
use crate::timestamp::TimestampError;
use crate::topic::TopicError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};

static TOPIC_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static PAYLOAD_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn raise(
    py: Python<'_>,
    cell: &PyOnceLock<Py<PyType>>,
    name: &str,
    message: &str,
    attrs: &[(&str, Option<&str>)],
) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let class = cell.import(py, "capture_mqtt.errors", name)?;
        let kwargs = PyDict::new(py);
        for (key, value) in attrs {
            kwargs.set_item(key, value)?;
        }
        let instance = class.call((message,), Some(&kwargs))?;
        Ok(PyErr::from_value(instance))
    };
    build().unwrap_or_else(|err| err)
}

pub fn topic_error(py: Python<'_>, err: &TopicError) -> PyErr {
    raise(
        py,
        &TOPIC_ERROR,
        "TopicError",
        &err.to_string(),
        &[
            ("segment", Some(err.segment.name())),
            ("value", Some(&err.value)),
        ],
    )
}

pub fn payload_error(py: Python<'_>, err: &PayloadError) -> PyErr {
    raise(
        py,
        &PAYLOAD_ERROR,
        "PayloadError",
        &err.message,
        &[("field", err.field.as_deref())],
    )
}

/// A `PayloadError` about `field` with `message`.
pub fn payload_error_in(py: Python<'_>, field: &str, message: &str) -> PyErr {
    payload_error(py, &PayloadError::in_field(field, message))
}

pub fn timestamp_error(py: Python<'_>, field: &str, err: &TimestampError) -> PyErr {
    payload_error_in(py, field, &format!("{field}: {err}"))
}

static OUTBOX_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

/// `cm.OutboxError` for a durable outbox that could not be opened.
pub fn outbox_error(py: Python<'_>, err: &crate::outbox::OutboxError) -> PyErr {
    raise(py, &OUTBOX_ERROR, "OutboxError", &err.to_string(), &[])
}

static SESSION_ERRORS: [PyOnceLock<Py<PyType>>; 6] = [
    PyOnceLock::new(),
    PyOnceLock::new(),
    PyOnceLock::new(),
    PyOnceLock::new(),
    PyOnceLock::new(),
    PyOnceLock::new(),
];

/// The `capture_mqtt` exception for a session error, with its attributes.
pub fn session_error(py: Python<'_>, err: &SessionError) -> PyErr {
    let message = err.to_string();
    match err {
        SessionError::Connect(_) => raise(py, &SESSION_ERRORS[0], "ConnectError", &message, &[]),
        SessionError::Authentication { username, .. } => raise(
            py,
            &SESSION_ERRORS[1],
            "AuthenticationError",
            &message,
            &[("username", Some(username))],
        ),
        SessionError::Authorization {
            action,
            topic,
            kind,
            ..
        } => {
            let action = match action {
                Action::Subscribe => "subscribe",
                Action::Publish => "publish",
            };
            let kind = match kind {
                AccountKind::User => "user",
                AccountKind::Source => "source",
                AccountKind::Unknown => "unknown",
            };
            raise(
                py,
                &SESSION_ERRORS[2],
                "AuthorizationError",
                &message,
                &[
                    ("topic", Some(topic)),
                    ("action", Some(action)),
                    ("account_kind", Some(kind)),
                ],
            )
        }
        SessionError::Timeout(_) => raise(py, &SESSION_ERRORS[3], "TimeoutError", &message, &[]),
        SessionError::Closed | SessionError::Ended(_) => {
            raise(py, &SESSION_ERRORS[4], "ClosedError", &message, &[])
        }
        SessionError::QueueFull(_) => {
            raise(py, &SESSION_ERRORS[5], "QueueFullError", &message, &[])
        }
        SessionError::TooLarge(_) => payload_error_in(py, "payload", &message),
        SessionError::OutOfScope(err) => topic_error(py, err),
    }
}
