//! `_Subscription`: the native half of `cm.Subscription` and `cm.AsyncSubscription`: its queue,
//! its counters, and the waits on it.

use super::batch::PyBatch;
use super::errors::session_error;
use super::message::item_to_py;
use super::operation::{OpError, Outcome, PyOperation};
use super::session::SIGNAL_CHECK;
use crate::session::batch::{self, CollectError, Collected};
use crate::session::{Completions, Item, Pop, Route, Session, SessionError};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The native half of a subscription: its queue and its counters.
#[pyclass(module = "capture_mqtt._core", name = "_Subscription", frozen)]
pub struct PySubscription {
    pub(super) session: Session,
    pub(super) route: Arc<Route>,
    pub(super) completions: Arc<Completions>,
}

impl PySubscription {
    /// The error of a subscription with nothing more to give: the client's closing, or its own end.
    fn ended(&self, py: Python<'_>) -> PyErr {
        let error = if self.session.is_closed() {
            SessionError::Closed
        } else {
            SessionError::Ended(self.route.filter.clone())
        };
        session_error(py, &error)
    }

    /// Converts up to `max_items` queued items, stopping before an error item (left for the next call).
    fn take_ready<'py>(
        &self,
        py: Python<'py>,
        max_items: usize,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let mut items = self.route.queue.drain(max_items).into_iter();
        let mut out = Vec::with_capacity(items.len());
        while let Some(item) = items.next() {
            if let Item::Error(_) = item {
                // Put it back, with what followed it, in order.
                let rest: Vec<Item> = std::iter::once(item).chain(items).collect();
                for item in rest.into_iter().rev() {
                    self.route.queue.push_front(item);
                }
                break;
            }
            out.push(item_to_py(py, item)?);
        }
        Ok(out)
    }
}

#[pymethods]
impl PySubscription {
    #[getter]
    fn filter(&self) -> &str {
        &self.route.filter
    }
    #[getter]
    fn qos(&self) -> u8 {
        self.route.qos
    }
    #[getter]
    fn is_active(&self) -> bool {
        self.route.is_active()
    }
    #[getter]
    fn is_closed(&self) -> bool {
        self.route.queue.is_closed() && self.route.queue.is_empty()
    }

    /// The next item, waiting up to `timeout` seconds (forever with None); None on timeout.
    /// Raises `ClosedError` after the last item, and the subscription's error if it failed.
    #[pyo3(signature = (timeout = None))]
    fn get<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        if let Some(t) = timeout {
            if t.is_nan() || t < 0.0 {
                return Err(PyValueError::new_err(format!(
                    "timeout must be None or >= 0, not {t}"
                )));
            }
        }
        let deadline = timeout.map(|t| std::time::Instant::now() + super::convert::seconds(t));
        let queue = Arc::clone(&self.route.queue);
        loop {
            let wait = match deadline {
                None => SIGNAL_CHECK,
                Some(d) => d
                    .saturating_duration_since(std::time::Instant::now())
                    .min(SIGNAL_CHECK),
            };
            match super::detach(py, || queue.pop_wait(Some(wait))) {
                Pop::Item(item) => return item_to_py(py, item).map(Some),
                Pop::Closed => {
                    return Err(self.ended(py));
                }
                Pop::Timeout => {
                    py.check_signals()?;
                    if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Waits up to `timeout` seconds (forever with None) for at least one item, then takes up to
    /// `max_items` that are queued: consumers pay one wait per chunk, not per message. An empty list
    /// on timeout; raises `ClosedError` after the last item, and the subscription's error if it failed.
    #[pyo3(signature = (max_items, timeout = None))]
    fn get_many<'py>(
        &self,
        py: Python<'py>,
        max_items: usize,
        timeout: Option<f64>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let Some(first) = self.get(py, timeout)? else {
            return Ok(Vec::new());
        };
        let mut items = vec![first];
        items.extend(self.take_ready(py, max_items.saturating_sub(1))?);
        Ok(items)
    }

    /// Up to `max_items` items that are queued now (never waits). Raises the subscription's error,
    /// or `ClosedError` once it has ended and everything was read.
    fn drain<'py>(&self, py: Python<'py>, max_items: usize) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let out = self.take_ready(py, max_items)?;
        if out.is_empty() {
            match self.route.queue.try_pop() {
                Pop::Item(Item::Error(err)) => return Err(session_error(py, &err)),
                Pop::Item(other) => return Ok(vec![item_to_py(py, other)?]),
                Pop::Closed => return Err(self.ended(py)),
                Pop::Timeout => {}
            }
        }
        Ok(out)
    }

    /// Up to `max_rows` data points as one Arrow batch, waiting up to `timeout` seconds in all
    /// (forever with None), and the malformed messages met on the way: an operation. It raises
    /// `ClosedError` when the subscription has ended and nothing was left, and the subscription's
    /// error if it failed.
    #[pyo3(signature = (max_rows, timeout, tag_columns = Vec::new()))]
    fn batch(
        &self,
        max_rows: usize,
        timeout: Option<f64>,
        tag_columns: Vec<String>,
    ) -> PyResult<PyOperation> {
        if max_rows == 0 {
            return Err(PyValueError::new_err("max_rows must be at least 1"));
        }
        if let Some(t) = timeout {
            if t.is_nan() || t < 0.0 {
                return Err(PyValueError::new_err(format!(
                    "timeout must be None or >= 0, not {t}"
                )));
            }
        }
        let within = timeout.map(super::convert::seconds);
        let queue = Arc::clone(&self.route.queue);
        let filter = self.route.filter.clone();
        let options = PyBatch::options(tag_columns);
        Ok(PyOperation::new(
            &self.session,
            &self.completions,
            "the batch was not complete",
            async move {
                match batch::collect(&queue, max_rows, within, options).await {
                    Ok(Collected { batch, malformed }) => Ok(Outcome::Batch(batch, malformed)),
                    Err(CollectError::Failed(err)) => Err(OpError::Session(err)),
                    Err(CollectError::Ended) => Err(OpError::Ended(filter)),
                    Err(CollectError::NotPoints) => Err(OpError::Type(
                        "batches hold Capture data points: subscribe to the raw tree (v1/raw/...) for them"
                            .to_owned(),
                    )),
                    Err(CollectError::Arrow(message)) => Err(OpError::Value(message)),
                }
            },
        ))
    }

    /// An awaitable that resolves when items are queued (or the subscription ended): asyncio
    /// consumers wait on it once per chunk, not once per message.
    fn readable<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let queue = Arc::clone(&self.route.queue);
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            queue.readable().await;
            Ok(())
        })
    }

    /// A descriptor that turns readable when the subscription has items after `arm()` (None where
    /// there is none): asyncio waits on it with `add_reader`, so no network thread takes the
    /// interpreter lock to wake the event loop.
    fn bell_fd(&self) -> PyResult<Option<i32>> {
        #[cfg(unix)]
        {
            let bell = self
                .route
                .queue
                .doorbell()
                .map_err(PyRuntimeError::new_err)?;
            Ok(Some(bell.fd()))
        }
        #[cfg(not(unix))]
        Ok(None)
    }

    /// Arms the descriptor for one wake-up; True when there is no need to wait.
    fn arm(&self) -> PyResult<bool> {
        #[cfg(unix)]
        {
            self.route.queue.arm().map_err(PyRuntimeError::new_err)
        }
        #[cfg(not(unix))]
        Ok(true)
    }

    /// Empties the descriptor after a wake-up.
    fn clear_bell(&self) -> PyResult<()> {
        #[cfg(unix)]
        self.route
            .queue
            .doorbell()
            .map_err(PyRuntimeError::new_err)?
            .clear();
        Ok(())
    }

    /// Counters: received, delivered, malformed, dropped, queued.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let counters = &self.route.queue.counters;
        let dict = PyDict::new(py);
        dict.set_item("received", counters.received.load(Ordering::Relaxed))?;
        dict.set_item("delivered", counters.delivered.load(Ordering::Relaxed))?;
        dict.set_item("malformed", counters.malformed.load(Ordering::Relaxed))?;
        dict.set_item("dropped", counters.dropped.load(Ordering::Relaxed))?;
        dict.set_item("queued", self.route.queue.len())?;
        Ok(dict)
    }

    /// Stops delivery and unsubscribes at the broker: an operation.
    fn close(&self) -> PyOperation {
        let session = self.session.clone();
        let route = Arc::clone(&self.route);
        PyOperation::new(
            &self.session,
            &self.completions,
            "the broker did not confirm the unsubscribe",
            async move {
                session.unsubscribe(&route).await;
                Ok(Outcome::Nothing)
            },
        )
    }
}
