//! `_Session` and `_Subscription`: the native halves of `cm.Client`, `cm.AsyncClient` and their
//! subscriptions. The Python classes in `capture_mqtt/client.py` give them their public shape.

use super::batch::PyBatch;
use super::errors::session_error;
use super::model::{PyCommand, PyDataPoint};
use crate::columnar;
use crate::session::{
    self, AccountKind, Credentials, CredentialsFuture, CredentialsProvider, Decode, Event, Item,
    OfflinePolicy, Overflow, Pop, Protocol, Queue, Reconnect, Route, Scope, Secret, Session,
    SessionConfig, SessionError, StaticCredentials, TlsOptions, Transport,
};
use crate::timestamp;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::oneshot;

/// How often a blocking call wakes to let Python handle Ctrl-C.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// How long a batch waits for more rows after the first one arrives, to take them in chunks.
const BATCH_LINGER: Duration = Duration::from_millis(2);

/// Runs `future` to completion on the calling thread (the network runtime drives its I/O) with the
/// interpreter lock released, waking every 100 ms so that Ctrl-C raises `KeyboardInterrupt` (the
/// work is then dropped). No task is spawned: a wait costs no thread hop.
pub fn block_on<T: Send>(py: Python<'_>, future: impl Future<Output = T> + Send) -> PyResult<T> {
    let mut future = Box::pin(future);
    loop {
        let step = py.detach(|| {
            session::runtime()
                .block_on(async { tokio::time::timeout(SIGNAL_CHECK, &mut future).await })
        });
        match step {
            Ok(value) => return Ok(value),
            Err(_elapsed) => py.check_signals()?,
        }
    }
}

/// Work for the client's dispatcher thread (a Python thread): events to report, tokens to fetch.
enum Job {
    Event(Event),
    Token(oneshot::Sender<Result<String, String>>),
}

/// Asks the dispatcher thread for a token from the user's callable before each connect.
struct CallableToken {
    username: String,
    jobs: Arc<Queue<Job>>,
    expires_at: Arc<Mutex<Option<i64>>>,
}

impl CredentialsProvider for CallableToken {
    fn credentials(&self) -> CredentialsFuture {
        let (tx, rx) = oneshot::channel();
        self.jobs.push_control(Job::Token(tx));
        let username = self.username.clone();
        let expires_at = Arc::clone(&self.expires_at);
        Box::pin(async move {
            match tokio::time::timeout(Duration::from_secs(30), rx).await {
                Ok(Ok(Ok(token))) => {
                    *expires_at.lock().unwrap_or_else(PoisonError::into_inner) =
                        session::jwt::expiry(&token);
                    Ok(Credentials {
                        username,
                        password: Secret::new(token),
                    })
                }
                Ok(Ok(Err(reason))) => Err(reason),
                Ok(Err(_)) => Err("the client is closing".to_owned()),
                Err(_) => Err("the token callable did not return within 30 s".to_owned()),
            }
        })
    }
    fn expires_at(&self) -> Option<i64> {
        *self
            .expires_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A pending request for a token, handed to the dispatcher thread.
#[pyclass(module = "capture_mqtt._core", name = "_TokenRequest")]
pub struct PyTokenRequest {
    reply: Option<oneshot::Sender<Result<String, String>>>,
}

#[pymethods]
impl PyTokenRequest {
    /// Answers with a fresh token.
    fn reply(&mut self, token: String) {
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(Ok(token));
        }
    }
    /// Answers that no token could be had, and why (never the secret).
    fn fail(&mut self, reason: String) {
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(Err(reason));
        }
    }
}

fn event_tuple(
    event: &Event,
) -> (
    &'static str,
    Option<bool>,
    Option<String>,
    Option<u32>,
    Option<f64>,
) {
    match event {
        Event::Connected { session_present } => {
            ("connected", Some(*session_present), None, None, None)
        }
        Event::Disconnected { reason } => ("disconnected", None, Some(reason.clone()), None, None),
        Event::Reconnecting { attempt, delay } => (
            "reconnecting",
            None,
            None,
            Some(*attempt),
            Some(delay.as_secs_f64()),
        ),
        Event::Closed => ("closed", None, None, None, None),
    }
}

/// The native session behind `cm.Client` and `cm.AsyncClient`.
#[pyclass(module = "capture_mqtt._core", name = "_Session", frozen)]
pub struct PySession {
    session: Session,
    jobs: Arc<Queue<Job>>,
}

#[allow(clippy::too_many_arguments, clippy::fn_params_excessive_bools)]
#[pymethods]
impl PySession {
    #[new]
    #[pyo3(signature = (host, *, transport, port, path, ca_pem, tls_insecure, client_id, clean_session, keepalive,
                        reconnect, min_delay, max_delay, jitter, connect_timeout, protocol, username, password,
                        token_callable, account_kind, company, source_id, scope, max_packet_size, inflight, offline, max_queued,
                        outbox = None, outbox_sync = "batch", outbox_max_bytes = 256 * 1024 * 1024))]
    fn new(
        host: String,
        transport: &str,
        port: u16,
        path: String,
        ca_pem: Vec<Vec<u8>>,
        tls_insecure: bool,
        client_id: String,
        clean_session: bool,
        keepalive: f64,
        reconnect: bool,
        min_delay: f64,
        max_delay: f64,
        jitter: f64,
        connect_timeout: f64,
        protocol: u8,
        username: Option<String>,
        password: Option<String>,
        token_callable: bool,
        account_kind: &str,
        company: Option<&str>,
        source_id: Option<&str>,
        scope: bool,
        max_packet_size: usize,
        inflight: u16,
        offline: &str,
        max_queued: usize,
        outbox: Option<std::path::PathBuf>,
        outbox_sync: &str,
        outbox_max_bytes: u64,
    ) -> PyResult<Self> {
        let transport = Transport::parse(transport)
            .ok_or_else(|| PyValueError::new_err(format!("unknown transport {transport:?}")))?;
        let mut config = SessionConfig::new(host, transport);
        config.port = port;
        config.path = path;
        config.tls = TlsOptions {
            extra_ca_pem: ca_pem,
            insecure: tls_insecure,
        };
        config.client_id = client_id;
        config.clean_session = clean_session;
        config.keepalive = Duration::from_secs_f64(keepalive);
        config.reconnect = Reconnect {
            enabled: reconnect,
            min_delay: Duration::from_secs_f64(min_delay),
            max_delay: Duration::from_secs_f64(max_delay),
            jitter,
        };
        config.connect_timeout = Duration::from_secs_f64(connect_timeout);
        config.protocol = if protocol == 5 {
            Protocol::V5
        } else {
            Protocol::V311
        };
        config.account_kind = match account_kind {
            "user" => AccountKind::User,
            "source" => AccountKind::Source,
            _ => AccountKind::Unknown,
        };
        if scope {
            config.scope = Scope::new(config.account_kind, company, source_id);
        }
        config.max_packet_size = max_packet_size;
        config.inflight = inflight;
        config.offline_policy = OfflinePolicy::parse(offline).ok_or_else(|| {
            PyValueError::new_err(format!(
                "offline must be \"block\", \"raise\" or \"drop_oldest\", not {offline:?}"
            ))
        })?;
        config.offline_capacity = max_queued.max(1);
        if let Some(path) = outbox {
            config.durable = Some(open_outbox(&path, outbox_sync, outbox_max_bytes)?);
        }
        let jobs: Arc<Queue<Job>> = Arc::new(Queue::new(4096, Overflow::DropOldest));
        if let Some(username) = username {
            config.account_name.clone_from(&username);
            config.credentials = if token_callable {
                Some(Arc::new(CallableToken {
                    username,
                    jobs: Arc::clone(&jobs),
                    expires_at: Arc::new(Mutex::new(None)),
                }))
            } else {
                Some(Arc::new(StaticCredentials(Credentials {
                    username,
                    password: Secret::new(password.unwrap_or_default()),
                })))
            };
        }
        let sink_jobs = Arc::clone(&jobs);
        let sink: session::EventSink = Arc::new(move |event: &Event| {
            sink_jobs.push_control_bounded(Job::Event(event.clone()));
        });
        let session = Session::new(config, Some(sink))
            .map_err(|e| Python::attach(|py| session_error(py, &e)))?;
        Ok(PySession { session, jobs })
    }

    /// Connects; raises the connection's error.
    fn connect(&self, py: Python<'_>) -> PyResult<()> {
        let session = self.session.clone();
        block_on(py, async move { session.connect().await })?.map_err(|e| session_error(py, &e))
    }

    /// Starts connecting in the background (retried with backoff); returns at once.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        self.session.start().map_err(|e| session_error(py, &e))
    }

    /// Connects from asyncio: an awaitable.
    fn connect_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let session = self.session.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            session
                .connect()
                .await
                .map_err(|e| Python::attach(|py| session_error(py, &e)))
        })
    }

    /// Closes the session within about `grace` seconds.
    fn close(&self, py: Python<'_>, grace: f64) {
        let session = self.session.clone();
        let jobs = Arc::clone(&self.jobs);
        let grace = Duration::from_secs_f64(grace.max(0.0));
        py.detach(|| session::runtime().block_on(session.close(grace)));
        jobs.close();
    }

    #[getter]
    fn is_connected(&self) -> bool {
        self.session.is_connected()
    }
    #[getter]
    fn is_closed(&self) -> bool {
        self.session.is_closed()
    }
    #[getter]
    fn address(&self) -> String {
        self.session.config().address()
    }
    #[getter]
    fn client_id(&self) -> String {
        self.session.config().client_id.clone()
    }

    /// Counters: published, acknowledged, received, unrouted, reconnects.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = self.session.stats();
        let dict = PyDict::new(py);
        dict.set_item("published", stats.published.load(Ordering::Relaxed))?;
        dict.set_item("acknowledged", stats.acknowledged.load(Ordering::Relaxed))?;
        dict.set_item("received", stats.received.load(Ordering::Relaxed))?;
        dict.set_item("unrouted", stats.unrouted.load(Ordering::Relaxed))?;
        dict.set_item("held", stats.held.load(Ordering::Relaxed))?;
        dict.set_item("oversize", stats.oversize.load(Ordering::Relaxed))?;
        dict.set_item("reconnects", stats.reconnects.load(Ordering::Relaxed))?;
        dict.set_item("queued", self.session.queued())?;
        dict.set_item("dropped", stats.dropped.load(Ordering::Relaxed))?;
        Ok(dict)
    }

    /// The durable outbox's counters (records, bytes, replayed, dropped, unsaved), or None without one.
    fn outbox_stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(durable) = &self.session.config().durable else {
            return Ok(None);
        };
        let stats = durable.stats();
        let dict = PyDict::new(py);
        dict.set_item("records", stats.records)?;
        dict.set_item("bytes", stats.bytes)?;
        dict.set_item("replayed", stats.replayed)?;
        dict.set_item("dropped", stats.dropped)?;
        dict.set_item("unsaved", stats.unsaved)?;
        // Seconds since the oldest record held was appended (None when the outbox is empty).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let age = stats.oldest_at.map(|at| {
            let at = std::time::Duration::from_millis(u64::try_from(at).unwrap_or(0));
            now.saturating_sub(at).as_secs_f64()
        });
        dict.set_item("oldest_age", age)?;
        dict.set_item("path", durable.path().display().to_string())?;
        Ok(Some(dict))
    }

    /// The dispatcher's next job, waiting up to `timeout` seconds: `("event", (kind, session_present,
    /// reason, attempt, delay))`, `("token", request)`, None on timeout, `("closed", None)` at the end.
    fn next_job<'py>(
        &self,
        py: Python<'py>,
        timeout: f64,
    ) -> PyResult<Option<(&'static str, Bound<'py, PyAny>)>> {
        let jobs = Arc::clone(&self.jobs);
        let wait = super::convert::seconds(timeout);
        let job = py.detach(|| jobs.pop_wait(Some(wait)));
        Ok(match job {
            Pop::Timeout => None,
            Pop::Closed => Some(("closed", py.None().into_bound(py))),
            Pop::Item(Job::Event(event)) => {
                Some(("event", event_tuple(&event).into_pyobject(py)?.into_any()))
            }
            Pop::Item(Job::Token(tx)) => Some((
                "token",
                Bound::new(py, PyTokenRequest { reply: Some(tx) })?.into_any(),
            )),
        })
    }

    /// Adds a subscription; with `wait`, blocks until the broker granted it (raising its refusal).
    #[pyo3(signature = (filter, *, qos, decode, queue_size, overflow, wait, timeout))]
    fn subscribe(
        &self,
        py: Python<'_>,
        filter: String,
        qos: u8,
        decode: &str,
        queue_size: i64,
        overflow: &str,
        wait: bool,
        timeout: f64,
    ) -> PyResult<PySubscription> {
        let decode = match decode {
            "raw" => Decode::Raw,
            "command" => Decode::Command,
            "bytes" => Decode::Bytes,
            other => return Err(PyValueError::new_err(format!("unknown decode {other:?}"))),
        };
        let overflow = Overflow::parse(overflow).ok_or_else(|| {
            PyValueError::new_err(format!(
                "overflow must be \"block\", \"drop_oldest\" or \"drop_newest\", not {overflow:?}"
            ))
        })?;
        // The one check of these options (the Python layer passes them through).
        let queue_size = usize::try_from(queue_size)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "queue_size must be a positive int, got {queue_size}"
                ))
            })?;
        let session = self.session.clone();
        let timeout = super::convert::seconds(timeout);
        let route = block_on(py, async move {
            let route = session.subscribe(&filter, qos, decode, queue_size, overflow)?;
            if wait && route.was_requested() {
                if let Err(err) = session.wait_granted(&route, timeout).await {
                    if !matches!(err, SessionError::Authorization { .. }) {
                        session.unsubscribe(&route).await;
                    }
                    return Err(err);
                }
            }
            Ok(route)
        })?
        .map_err(|e| session_error(py, &e))?;
        Ok(PySubscription {
            session: self.session.clone(),
            route,
        })
    }

    /// Publishes every row of an Arrow stream (a pandas or Polars DataFrame, a pyarrow Table, ...) as
    /// one measurement-level message to `topic`, in Rust; with `wait`, waits for the acknowledgements
    /// of QoS 1/2.
    /// Returns how many messages were sent (rows without any value are skipped).
    #[pyo3(signature = (data, topic, *, timestamp_column, tag_columns, qos, wait, timeout, naive = "refuse"))]
    fn push_frame(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        topic: String,
        timestamp_column: Option<String>,
        tag_columns: Vec<String>,
        qos: u8,
        wait: bool,
        timeout: f64,
        naive: &str,
    ) -> PyResult<usize> {
        let naive = super::convert::naive_option(naive)?;
        if !data.hasattr("__arrow_c_stream__")? {
            return Err(PyTypeError::new_err(format!(
                "push_frame takes a pandas or Polars DataFrame, a pyarrow Table, or anything with __arrow_c_stream__, not {}",
                data.get_type().name()?
            )));
        }
        let capsule = data.call_method1("__arrow_c_stream__", (py.None(),))?;
        let reader = pyo3_arrow::PyRecordBatchReader::from_arrow_pycapsule(
            capsule.cast::<pyo3::types::PyCapsule>()?,
        )?
        .into_reader()?;
        // Read the stream here, holding the interpreter lock: a producer written in Python needs it.
        let batches: Vec<arrow_array::RecordBatch> = reader
            .collect::<Result<_, _>>()
            .map_err(|e| PyValueError::new_err(format!("reading the frame failed: {e}")))?;
        let session = self.session.clone();
        let limit = super::convert::seconds(timeout);
        let outcome = block_on(py, async move {
            let mut sent = 0usize;
            let mut waiting = std::collections::VecDeque::new();
            for batch in batches {
                let rows = columnar::FrameRows::new(
                    &batch,
                    timestamp_column.as_deref(),
                    &tag_columns,
                    naive,
                )
                .map_err(FrameError::Payload)?;
                for row in 0..rows.len() {
                    let Some(payload) = rows.payload(row).map_err(FrameError::Payload)? else {
                        continue;
                    };
                    let payload = bytes::Bytes::from(payload);
                    let fast = session
                        .try_publish(&topic, &payload, qos, false)
                        .map_err(FrameError::Session)?;
                    let token = match fast {
                        Some(token) => token,
                        None => session
                            .publish(topic.clone(), payload, qos, false, limit)
                            .await
                            .map_err(FrameError::Session)?,
                    };
                    sent += 1;
                    // Without `wait` (a durable outbox holds them) the tokens go: nobody waits.
                    if qos > 0 && wait {
                        waiting.push_back(token);
                        // Keep memory flat: wait for the oldest acknowledgements as we go.
                        while waiting.len() > 8192 {
                            if let Some(token) = waiting.pop_front() {
                                wait_token(token, limit).await?;
                            }
                        }
                    }
                }
            }
            for token in waiting {
                wait_token(token, limit).await?;
            }
            Ok::<usize, FrameError>(sent)
        })?;
        outcome.map_err(|e| match e {
            FrameError::Payload(err) => super::errors::payload_error(py, &err),
            FrameError::Session(err) => session_error(py, &err),
        })
    }

    /// Publishes; with `wait`, blocks until acknowledged (QoS 1/2); QoS 0 never waits.
    #[pyo3(signature = (topic, payload, *, qos, retain, wait, timeout))]
    fn publish(
        &self,
        py: Python<'_>,
        topic: String,
        payload: &Bound<'_, PyAny>,
        qos: u8,
        retain: bool,
        wait: bool,
        timeout: f64,
    ) -> PyResult<Option<PyPublishHandle>> {
        let bytes = super::convert::payload_bytes(payload)?;
        let payload = bytes::Bytes::copy_from_slice(&bytes);
        // The fast path: straight into the request channel (or the offline queue) without releasing
        // the interpreter lock or entering the runtime; only a full window or channel waits.
        let started = std::time::Instant::now();
        let limit = super::convert::seconds(timeout);
        let fast = self
            .session
            .try_publish(&topic, &payload, qos, retain)
            .map_err(|e| session_error(py, &e))?;
        let token = if let Some(token) = fast {
            token
        } else {
            // No room (a full queue under offline="block"): wait for it, within the timeout.
            let session = self.session.clone();
            block_on(py, async move {
                session.publish(topic, payload, qos, retain, limit).await
            })?
            .map_err(|e| session_error(py, &e))?
        };
        let handle = PyPublishHandle {
            token: Mutex::new(Some(token)),
        };
        if wait {
            // QoS 0 has nothing to wait for (as in every MQTT client): it is in the outbox, and
            // the network thread writes it in the next batch.
            if qos > 0 {
                let left = limit.saturating_sub(started.elapsed());
                handle.wait(py, left.as_secs_f64())?;
            }
            return Ok(None);
        }
        Ok(Some(handle))
    }
}

enum FrameError {
    Payload(crate::payload::PayloadError),
    Session(SessionError),
}

async fn wait_token(token: session::PublishToken, limit: Duration) -> Result<(), FrameError> {
    match tokio::time::timeout(limit, token.wait()).await {
        Ok(result) => result.map_err(FrameError::Session),
        Err(_) => Err(FrameError::Session(SessionError::Timeout(format!(
            "the broker did not acknowledge a row within {:.1} s",
            limit.as_secs_f64()
        )))),
    }
}

/// Waits for one publish's acknowledgement.
#[pyclass(module = "capture_mqtt._core", name = "_PublishHandle", frozen)]
pub struct PyPublishHandle {
    token: Mutex<Option<session::PublishToken>>,
}

#[pymethods]
impl PyPublishHandle {
    /// Blocks until acknowledged; raises on refusal, closing or timeout.
    fn wait(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let Some(token) = self
            .token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return Ok(());
        };
        let limit = super::convert::seconds(timeout);
        let outcome = block_on(py, async move {
            tokio::time::timeout(limit, token.wait()).await
        })?;
        match outcome {
            Ok(result) => result.map_err(|e| session_error(py, &e)),
            Err(_) => Err(session_error(
                py,
                &SessionError::Timeout(format!(
                    "the broker did not acknowledge the publish within {:.1} s",
                    limit.as_secs_f64()
                )),
            )),
        }
    }
}

/// A plain MQTT message (from a subscription with a filter outside Capture's raw tree).
///
/// >>> import capture_mqtt as cm
/// >>> cm.Message.__name__
/// 'Message'
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
/// >>> import capture_mqtt as cm
/// >>> cm.MalformedMessage.__name__
/// 'MalformedMessage'
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

fn item_to_py(py: Python<'_>, item: Item) -> PyResult<Bound<'_, PyAny>> {
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

/// The native half of a subscription: its queue and its counters.
#[pyclass(module = "capture_mqtt._core", name = "_Subscription", frozen)]
pub struct PySubscription {
    session: Session,
    route: Arc<Route>,
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
            match py.detach(|| queue.pop_wait(Some(wait))) {
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

    /// Up to `max_rows` data points as one Arrow batch, waiting up to `timeout` seconds in all; also
    /// the malformed messages met on the way. Raises `ClosedError` when the subscription has ended and
    /// nothing was left, and the subscription's error if it failed.
    #[pyo3(signature = (max_rows, timeout, tag_columns = Vec::new()))]
    fn batch<'py>(
        &self,
        py: Python<'py>,
        max_rows: usize,
        timeout: Option<f64>,
        tag_columns: Vec<String>,
    ) -> PyResult<(PyBatch, Vec<Bound<'py, PyAny>>)> {
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
        let deadline = timeout.map(|t| std::time::Instant::now() + super::convert::seconds(t));
        let mut builder =
            columnar::BatchBuilder::new(PyBatch::options(tag_columns), max_rows.min(65_536));
        let mut malformed = Vec::new();
        let queue = Arc::clone(&self.route.queue);
        let mut closed = false;
        while builder.len() < max_rows {
            let items = queue.drain(max_rows - builder.len());
            if items.is_empty() {
                let now = std::time::Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    break;
                }
                let wait = deadline.map_or(SIGNAL_CHECK, |d| (d - now).min(SIGNAL_CHECK));
                let wanted = (max_rows - builder.len()).min(4096);
                let ready = py.detach(|| queue.wait_for(wanted, BATCH_LINGER, wait));
                if !ready {
                    if queue.is_closed() && queue.is_empty() {
                        closed = true;
                        break;
                    }
                    py.check_signals()?;
                }
                continue;
            }
            let mut failed = None;
            for item in items {
                if failed.is_some() {
                    queue.push_front(item);
                    continue;
                }
                match item {
                    Item::Point { point, .. } => builder.push(&point),
                    Item::Error(err) => failed = Some(err),
                    other @ Item::Malformed { .. } => malformed.push(item_to_py(py, other)?),
                    Item::Command { .. } | Item::Message(_) => {
                        return Err(PyTypeError::new_err(
                            "batches hold Capture data points: subscribe to the raw tree (v1/raw/...) for them",
                        ))
                    }
                }
            }
            if let Some(err) = failed {
                if builder.is_empty() {
                    return Err(session_error(py, &err));
                }
                queue.push_front(Item::Error(err));
                break;
            }
        }
        if closed && builder.is_empty() && malformed.is_empty() {
            return Err(self.ended(py));
        }
        let batch = builder
            .finish()
            .map_err(|e| PyValueError::new_err(format!("building the Arrow batch failed: {e}")))?;
        Ok((PyBatch { batch }, malformed))
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

    /// Stops delivery and unsubscribes at the broker.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let session = self.session.clone();
        let route = Arc::clone(&self.route);
        block_on(py, async move { session.unsubscribe(&route).await })
    }
}

/// The `exp` claim of a JWT (seconds since the epoch), or None.
#[pyfunction]
pub fn _jwt_expiry(token: &str) -> Option<i64> {
    session::jwt::expiry(token)
}

/// What Capture publishes on the raw tree for a source's push (`topic` under `data/read`):
/// a list of (raw topic, payload). Used by the local emulator and test pipelines.
#[pyfunction]
pub fn _to_raw(
    py: Python<'_>,
    company: &str,
    topic: &str,
    payload: &[u8],
) -> PyResult<Vec<(String, Py<pyo3::types::PyBytes>)>> {
    let out = crate::payload::to_raw(company, topic, payload, timestamp::now_nanos())
        .map_err(|e| super::errors::payload_error(py, &e))?;
    Ok(out
        .into_iter()
        .map(|(topic, body)| (topic, pyo3::types::PyBytes::new(py, &body).unbind()))
        .collect())
}

/// Nanoseconds since the epoch now (the clock the core stamps messages with).
#[pyfunction]
pub fn _now_ns() -> i64 {
    timestamp::now_nanos()
}

/// Starts the network runtime and hands it to pyo3-async-runtimes (once).
pub fn init_runtime() {
    let _ = pyo3_async_runtimes::tokio::init_with_runtime(session::runtime());
}

/// Opens a durable outbox for a session: one process per outbox (`cm.OutboxError` names the holder).
fn open_outbox(
    path: &std::path::Path,
    sync: &str,
    max_bytes: u64,
) -> PyResult<Arc<crate::outbox::DurableOutbox>> {
    use crate::outbox::{DurableOutbox, OutboxOptions, SyncMode};
    let sync = SyncMode::parse(sync).ok_or_else(|| {
        PyValueError::new_err(format!(
            "outbox_sync must be \"batch\", \"always\" or \"never\", not {sync:?}"
        ))
    })?;
    let options = OutboxOptions {
        sync,
        max_bytes,
        ..OutboxOptions::default()
    };
    match DurableOutbox::open(path, options) {
        Ok((outbox, report)) => {
            if report.moved_to.is_some() {
                log::warn!(
                    "the outbox {} was damaged: {} record(s) kept, {} lost{}",
                    path.display(),
                    report.records,
                    report.lost,
                    if report.uncounted {
                        " (and what else it held could not be counted)"
                    } else {
                        ""
                    }
                );
            }
            Ok(Arc::new(outbox))
        }
        Err(err) => Err(Python::attach(|py| super::errors::outbox_error(py, &err))),
    }
}
