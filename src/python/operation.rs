//! `_Operation`: the one completion handle of every call that may wait. The sync facade calls
//! `wait(timeout)` (the caller's thread drives it, with the interpreter lock released); the async
//! facade awaits it: the operation runs on the network runtime and announces its end on the
//! session's completion list, whose doorbell descriptor the event loop watches (`_aio.py`), so
//! no thread hops and no network thread takes the interpreter lock.

use super::batch::PyBatch;
use super::errors::{payload_error, session_error};
use super::message::item_to_py;
use super::session::block_on;
use super::subscription::PySubscription;
use crate::payload::PayloadError;
use crate::session::{Completions, Item, Operation, Route, Session, SessionError};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyList;
use std::future::Future;
use std::sync::Arc;

/// What an operation gives back.
pub enum Outcome {
    Nothing,
    Subscription(Arc<Route>),
    Sent(usize),
    Batch(arrow_array::RecordBatch, Vec<Item>),
}

/// Why an operation failed.
pub enum OpError {
    Session(SessionError),
    Payload(PayloadError),
    /// A subscription with nothing more to give: its filter.
    Ended(String),
    Type(String),
    Value(String),
    /// A bug: the operation panicked (its message).
    Internal(String),
}

impl From<SessionError> for OpError {
    fn from(err: SessionError) -> Self {
        OpError::Session(err)
    }
}

impl From<PayloadError> for OpError {
    fn from(err: PayloadError) -> Self {
        OpError::Payload(err)
    }
}

pub type OpResult = Result<Outcome, OpError>;

/// A pending call: `wait(timeout)` blocks for it, `await` suspends for it.
#[pyclass(module = "capture_mqtt._core", name = "_Operation", frozen)]
pub struct PyOperation {
    op: Operation<OpResult>,
    completions: Arc<Completions>,
    session: Session,
    /// Says what did not finish when a `wait(timeout)` runs out.
    what: &'static str,
}

impl PyOperation {
    pub fn new(
        session: &Session,
        completions: &Arc<Completions>,
        what: &'static str,
        future: impl Future<Output = OpResult> + Send + 'static,
    ) -> Self {
        PyOperation {
            op: completions.operation_or(future, |message| Err(OpError::Internal(message))),
            completions: Arc::clone(completions),
            session: session.clone(),
            what,
        }
    }

    pub fn finished(
        session: &Session,
        completions: &Arc<Completions>,
        what: &'static str,
        value: OpResult,
    ) -> Self {
        PyOperation {
            op: completions.finished(value),
            completions: Arc::clone(completions),
            session: session.clone(),
            what,
        }
    }

    fn convert(&self, py: Python<'_>, value: Option<OpResult>) -> PyResult<Py<PyAny>> {
        match value {
            None | Some(Ok(Outcome::Nothing)) => Ok(py.None()),
            Some(Ok(Outcome::Subscription(route))) => Ok(Py::new(
                py,
                PySubscription {
                    session: self.session.clone(),
                    route,
                    completions: Arc::clone(&self.completions),
                },
            )?
            .into_any()),
            Some(Ok(Outcome::Sent(n))) => Ok(n.into_pyobject(py)?.into_any().unbind()),
            Some(Ok(Outcome::Batch(batch, malformed))) => {
                let malformed = malformed
                    .into_iter()
                    .map(|item| item_to_py(py, item))
                    .collect::<PyResult<Vec<_>>>()?;
                let pair = (Py::new(py, PyBatch { batch })?, PyList::new(py, malformed)?);
                Ok(pair.into_pyobject(py)?.into_any().unbind())
            }
            Some(Err(err)) => Err(op_error(py, &self.session, err)),
        }
    }
}

/// The Python exception of an operation's error.
pub fn op_error(py: Python<'_>, session: &Session, err: OpError) -> PyErr {
    match err {
        OpError::Session(err) => session_error(py, &err),
        OpError::Payload(err) => payload_error(py, &err),
        OpError::Ended(filter) => {
            let error = if session.is_closed() {
                SessionError::Closed
            } else {
                SessionError::Ended(filter)
            };
            session_error(py, &error)
        }
        OpError::Type(message) => PyTypeError::new_err(message),
        OpError::Value(message) => PyValueError::new_err(message),
        OpError::Internal(message) => PyRuntimeError::new_err(format!(
            "capture-mqtt failed on a bug of its own (please report it): {message}"
        )),
    }
}

static AWAIT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

#[pymethods]
impl PyOperation {
    /// Its number on the session's completion list.
    #[getter]
    fn id(&self) -> u64 {
        self.op.id()
    }

    /// Whether it finished.
    fn done(&self) -> bool {
        self.op.is_done()
    }

    /// Blocks until it finished, up to `timeout` seconds (forever with None), and returns its value
    /// (raising its error). Ctrl-C interrupts the wait, not the operation.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        let value = match timeout {
            None => block_on(py, self.op.wait())?,
            Some(seconds) => {
                let limit = super::convert::seconds(seconds);
                block_on(py, async {
                    tokio::time::timeout(limit, self.op.wait()).await
                })?
                .map_err(|_| {
                    session_error(
                        py,
                        &SessionError::Timeout(format!(
                            "{} within {:.1} s",
                            self.what,
                            limit.as_secs_f64()
                        )),
                    )
                })?
            }
        };
        self.convert(py, value)
    }

    /// Its value once finished (raising its error); None when it was taken already.
    fn result(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        if !self.op.is_done() {
            return Err(PyRuntimeError::new_err("the operation has not finished"));
        }
        let value = self.op.take();
        self.convert(py, value)
    }

    /// Runs it on the network runtime; its end is announced on the completion list.
    fn start(&self) {
        self.op.start(&self.completions);
    }

    /// The session's completion list.
    fn completions(&self) -> PyCompletions {
        PyCompletions {
            completions: Arc::clone(&self.completions),
        }
    }

    fn __await__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, PyAny>> {
        let py = slf.py();
        let wait = AWAIT.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
            Ok(py
                .import("capture_mqtt._aio")?
                .getattr("wait_operation")?
                .unbind())
        })?;
        wait.bind(py).call1((slf,))?.call_method0("__await__")
    }

    fn __repr__(&self) -> String {
        format!(
            "<operation {} {}>",
            self.op.id(),
            if self.op.is_done() { "done" } else { "pending" }
        )
    }
}

/// A session's list of finished operations and its doorbell descriptor.
#[pyclass(module = "capture_mqtt._core", name = "_Completions", frozen)]
pub struct PyCompletions {
    completions: Arc<Completions>,
}

#[pymethods]
impl PyCompletions {
    /// The descriptor that turns readable when operations finished (None where there is none).
    fn fd(&self) -> PyResult<Option<i32>> {
        #[cfg(unix)]
        {
            let bell = self.completions.bell().map_err(PyRuntimeError::new_err)?;
            Ok(Some(bell.fd()))
        }
        #[cfg(not(unix))]
        Ok(None)
    }

    /// Tells one session's list from another's while both live.
    fn key(&self) -> usize {
        Arc::as_ptr(&self.completions) as usize
    }

    /// Empties the descriptor, then takes the ids of the operations that finished since.
    fn take_ready(&self) -> PyResult<Vec<u64>> {
        #[cfg(unix)]
        self.completions
            .bell()
            .map_err(PyRuntimeError::new_err)?
            .clear();
        Ok(self.completions.take_ready())
    }
}
