//! `_Session`: the native half of `cm.Client` and `cm.AsyncClient` (the Python classes in
//! `capture_mqtt/` give it its public shape): the connection's options, connecting and closing,
//! subscribing and publishing, and the dispatcher's jobs (events, token requests).

use super::errors::session_error;
use super::operation::{OpError, OpResult, Outcome, PyOperation};
use crate::session::frame::{FrameError, FrameOptions};
use crate::session::{
    self, AccountKind, Completions, Credentials, CredentialsFuture, CredentialsProvider, Decode,
    Event, OfflinePolicy, Overflow, Pop, Protocol, Queue, Reconnect, Scope, Secret, Session,
    SessionConfig, SessionError, StaticCredentials, TlsOptions, Transport,
};
use crate::timestamp;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::oneshot;

/// How often a blocking call wakes to let Python handle Ctrl-C.
pub(super) const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// Runs `future` to completion on the calling thread (the network runtime drives its I/O) with the
/// interpreter lock released, waking every 100 ms so that Ctrl-C raises `KeyboardInterrupt` (the
/// work is then dropped). No task is spawned: a wait costs no thread hop.
pub fn block_on<T: Send>(py: Python<'_>, future: impl Future<Output = T> + Send) -> PyResult<T> {
    let mut future = Box::pin(future);
    loop {
        let step = super::detach(py, || {
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
    completions: Arc<Completions>,
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
        if let Some(company) = company {
            // The one check of the company option (Capture's rule for the company segment).
            crate::topic::check_name(crate::topic::Segment::Company, company)
                .map_err(|e| Python::attach(|py| super::errors::topic_error(py, &e)))?;
        }
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
        Ok(PySession {
            session,
            jobs,
            completions: Completions::new(),
        })
    }

    /// Connects: an operation that raises the connection's error.
    fn connect(&self) -> PyOperation {
        let session = self.session.clone();
        self.operation("the connection did not finish", async move {
            session.connect().await?;
            Ok(Outcome::Nothing)
        })
    }

    /// Starts connecting in the background (retried with backoff); returns at once.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        self.session.start().map_err(|e| session_error(py, &e))
    }

    /// Closes the session within about `grace` seconds; blocks, and Ctrl-C does not cut it short.
    fn close(&self, py: Python<'_>, grace: f64) {
        let closing = self.closing(grace);
        super::detach(py, || session::runtime().block_on(closing));
    }

    /// Closes the session within about `grace` seconds: an operation (to await).
    fn close_op(&self, grace: f64) -> PyOperation {
        let closing = self.closing(grace);
        self.operation("the client did not close", async move {
            closing.await;
            Ok(Outcome::Nothing)
        })
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
        let job = super::detach(py, || jobs.pop_wait(Some(wait)));
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

    /// Adds a subscription: an operation that gives the subscription once the broker granted it
    /// (raising its refusal). Bad options raise at once, before anything is sent.
    #[pyo3(signature = (filter, *, qos, decode, queue_size, overflow, timeout))]
    fn subscribe(
        &self,
        py: Python<'_>,
        filter: &str,
        qos: i64,
        decode: &str,
        queue_size: i64,
        overflow: &str,
        timeout: f64,
    ) -> PyResult<PyOperation> {
        let qos = qos_option(qos)?;
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
        let route = self
            .session
            .subscribe(filter, qos, decode, queue_size, overflow)
            .map_err(|e| session_error(py, &e))?;
        let session = self.session.clone();
        let timeout = super::convert::seconds(timeout);
        Ok(
            self.operation("the broker did not answer the subscription", async move {
                if route.was_requested() {
                    if let Err(err) = session.wait_granted(&route, timeout).await {
                        if !matches!(err, SessionError::Authorization { .. }) {
                            session.unsubscribe(&route).await;
                        }
                        return Err(err.into());
                    }
                }
                Ok(Outcome::Subscription(route))
            }),
        )
    }

    /// Publishes every row of an Arrow stream (a pandas or Polars DataFrame, a pyarrow Table, ...) as
    /// one measurement-level message to `topic`, in Rust: an operation that gives how many messages
    /// were sent (rows without any value are skipped); with `wait`, once the broker acknowledged
    /// them (QoS 1/2).
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
    ) -> PyResult<PyOperation> {
        let naive = super::convert::naive_option(naive)?;
        if !data.hasattr("__arrow_c_stream__")? {
            return Err(PyTypeError::new_err(format!(
                "push_frame takes a pandas or Polars DataFrame, a pyarrow Table, or anything with __arrow_c_stream__, not {}",
                data.get_type().name()?
            )));
        }
        let capsule = data.call_method1("__arrow_c_stream__", (py.None(),))?;
        let reader = super::arrow_ffi::import_stream(capsule.cast::<pyo3::types::PyCapsule>()?)?;
        // Read the stream here, holding the interpreter lock: a producer written in Python needs it.
        let batches: Vec<arrow_array::RecordBatch> = reader
            .collect::<Result<_, _>>()
            .map_err(|e| PyValueError::new_err(format!("reading the frame failed: {e}")))?;
        let options = FrameOptions {
            topic,
            timestamp_column,
            tag_columns,
            naive,
            qos,
            wait,
            limit: super::convert::seconds(timeout),
        };
        let session = self.session.clone();
        Ok(self.operation("the frame was not sent", async move {
            match session.publish_frame(&batches, &options).await {
                Ok(sent) => Ok(Outcome::Sent(sent)),
                Err(FrameError::Payload(err)) => Err(OpError::Payload(err)),
                Err(FrameError::Session(err)) => Err(OpError::Session(err)),
            }
        }))
    }

    /// Publishes: None when the call has nothing to wait for (QoS 0, or `wait` is false and no
    /// `handle` is wanted), else an operation that finishes when the broker acknowledged it (QoS
    /// 1/2), within `timeout` when `wait`. Room in a full queue is waited for inside the operation,
    /// or, when a `handle` is wanted (the sync call style), in the call; the handle is then waited
    /// on with its own timeout.
    #[pyo3(signature = (topic, payload, *, qos, retain, wait, timeout, handle = false))]
    fn publish(
        &self,
        py: Python<'_>,
        topic: String,
        payload: &Bound<'_, PyAny>,
        qos: i64,
        retain: bool,
        wait: bool,
        timeout: f64,
        handle: bool,
    ) -> PyResult<Option<PyOperation>> {
        const WHAT: &str = "the broker did not acknowledge the publish";
        // The one check of a publish's options, for every call style.
        let qos = qos_option(qos)?;
        crate::topic::validate_publish_topic(&topic)
            .map_err(|e| super::errors::topic_error(py, &e))?;
        let bytes = super::convert::payload_bytes(payload)?;
        let payload = bytes::Bytes::copy_from_slice(&bytes);
        let limit = super::convert::seconds(timeout);
        // The fast path: straight into the outbox without releasing the interpreter lock or
        // entering the runtime; only a full queue waits (in the operation).
        let fast = self
            .session
            .try_publish(&topic, &payload, qos, retain)
            .map_err(|e| session_error(py, &e))?;
        let acknowledged = wait && qos > 0;
        let session = self.session.clone();
        let fast = match fast {
            // A handle is for the sync call style: the call itself waits for room (the caller is
            // held back: flow control), and the handle for the acknowledgement.
            None if handle => {
                let (topic, payload) = (topic.clone(), payload.clone());
                let token = block_on(py, async move {
                    session.publish(topic, payload, qos, retain, limit).await
                })?
                .map_err(|e| session_error(py, &e))?;
                Some(token)
            }
            other => other,
        };
        let session = self.session.clone();
        let op = match fast {
            // QoS 0 has nothing to wait for (as in every MQTT client): it is in the outbox, and the
            // network thread writes it in the next batch.
            Some(_) if !acknowledged && !handle => return Ok(None),
            Some(token) if qos == 0 => {
                drop(token);
                PyOperation::finished(&self.session, &self.completions, WHAT, Ok(Outcome::Nothing))
            }
            Some(token) => self.operation(WHAT, async move {
                acknowledgement(token, acknowledged.then_some(limit)).await
            }),
            None => self.operation(WHAT, async move {
                // No room (a full queue under offline="block"): wait for it, within the timeout.
                let started = tokio::time::Instant::now();
                let token = session.publish(topic, payload, qos, retain, limit).await?;
                if !acknowledged && !handle {
                    return Ok(Outcome::Nothing);
                }
                let left = limit.saturating_sub(started.elapsed());
                acknowledgement(token, acknowledged.then_some(left)).await
            }),
        };
        Ok(Some(op))
    }
}

/// The one check of a `qos` option, for every call style.
fn qos_option(qos: i64) -> PyResult<u8> {
    u8::try_from(qos)
        .ok()
        .filter(|q| *q <= 2)
        .ok_or_else(|| PyValueError::new_err(format!("qos must be 0, 1 or 2, got {qos}")))
}

/// Waits for one publish's acknowledgement, within `limit` when given.
async fn acknowledgement(token: session::PublishToken, limit: Option<Duration>) -> OpResult {
    let Some(limit) = limit else {
        token.wait().await?;
        return Ok(Outcome::Nothing);
    };
    match tokio::time::timeout(limit, token.wait()).await {
        Ok(result) => {
            result?;
            Ok(Outcome::Nothing)
        }
        Err(_) => Err(OpError::Session(SessionError::Timeout(format!(
            "the broker did not acknowledge the publish within {:.1} s",
            limit.as_secs_f64()
        )))),
    }
}

impl PySession {
    fn operation(
        &self,
        what: &'static str,
        future: impl Future<Output = OpResult> + Send + 'static,
    ) -> PyOperation {
        PyOperation::new(&self.session, &self.completions, what, future)
    }

    /// Closing the session within about `grace` seconds, then the dispatcher's jobs.
    fn closing(&self, grace: f64) -> impl Future<Output = ()> + Send + 'static {
        let session = self.session.clone();
        let jobs = Arc::clone(&self.jobs);
        let grace = Duration::from_secs_f64(grace.max(0.0));
        async move {
            session.close(grace).await;
            jobs.close();
        }
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
