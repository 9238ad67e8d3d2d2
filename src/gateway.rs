//! The Capture gateway: what the local emulator puts in front of Mosquitto so that a client meets
//! Capture's broker, not a lenient one. It accepts MQTT connections, forwards them to Mosquitto on a
//! private loopback port, and reads what clients send with the client engine's packet codec:
//!
//! - every SUBSCRIBE filter and PUBLISH topic is checked against the account's scope (the rules of
//!   `crate::scope`, by the CONNECT's username); a packet over the size limit is refused. A refusal
//!   closes the connection, as Capture's page says, with an MQTT 5 DISCONNECT first (0x87 "not
//!   authorized", 0x95 "packet too large");
//! - a JWT login is checked by signature, subject and time (refused as bad credentials, as EMQX
//!   does), the CONNECT forwarded with the password the broker knows for the account, and the
//!   connection closed when the token expires (DISCONNECT 0x87 under MQTT 5);
//! - a second connection with a client id takes the session over: the first gets DISCONNECT 0x8E
//!   under MQTT 5 before it is closed; an MQTT 3.1.1 persistent session expires after it has been
//!   left for `session_expiry` (EMQX's two hours);
//! - faults on demand for tests: latency, a stall (traffic held, connections open), dropping every
//!   connection, and a partition (connections dropped and refused until it ends).
//!
//! The broker's bytes go back to the client untouched. No Python here.

use crate::scope::{Action, Scope};
use crate::session::codec::{frame_length, Codec, Connect, Packet, Version};
use bytes::{Buf, BytesMut};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

mod deny;
pub mod login;

/// Capture's packet size limit (EMQX's default): 1 MB.
pub const CAPTURE_MAX_PACKET: usize = 1024 * 1024;

/// MQTT 5 reason codes the gateway sends before it closes a connection.
const NOT_AUTHORIZED: u8 = 0x87;
const PACKET_TOO_LARGE: u8 = 0x95;
const SESSION_TAKEN_OVER: u8 = 0x8E;

/// How long EMQX keeps an MQTT 3.1.1 persistent session after its client has gone: two hours.
pub const CAPTURE_SESSION_EXPIRY: Duration = Duration::from_secs(2 * 3600);

/// What a SUBSCRIBE or PUBLISH outside the account's scope gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Deny {
    /// The connection is closed, with DISCONNECT 0x87 first under MQTT 5: what Capture's page
    /// describes (EMQX's `deny_action = disconnect`).
    #[default]
    Disconnect,
    /// EMQX's other mode (`deny_action = ignore`): a denied filter gets SUBACK 0x80 (3.1.1) or
    /// 0x87 (MQTT 5), a denied QoS 1 publish PUBACK 0x87 (MQTT 5) or a plain PUBACK (3.1.1), a
    /// denied QoS 2 publish PUBREC likewise, a denied QoS 0 publish is dropped.
    ReasonCode,
}

/// What the gateway enforces.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where Mosquitto listens (a private loopback port).
    pub upstream: SocketAddr,
    /// The largest packet a client may send.
    pub max_packet: usize,
    /// How long an MQTT 3.1.1 persistent session outlives its connection.
    pub session_expiry: Duration,
    pub deny: Deny,
}

/// Counters, for tests and the emulator's `stats`.
#[derive(Debug, Default)]
pub struct GatewayStats {
    pub connections: AtomicU64,
    pub refused_scope: AtomicU64,
    pub refused_size: AtomicU64,
    /// Logins refused by the gateway (a JWT that is forged, expired or someone else's).
    pub refused_login: AtomicU64,
    /// Connections closed when their JWT expired.
    pub expired_logins: AtomicU64,
    /// Connections closed because another took their client id.
    pub taken_over: AtomicU64,
    /// MQTT 3.1.1 persistent sessions ended because their client stayed away too long.
    pub expired_sessions: AtomicU64,
    pub dropped: AtomicU64,
}

/// An account the gateway knows: its scope, and for a JWT user how its tokens are checked.
#[derive(Clone)]
struct Account {
    scope: Scope,
    jwt: Option<Arc<JwtLogin>>,
}

/// A JWT user's tokens are signed with `key`; the broker knows the account by `broker_password`.
struct JwtLogin {
    key: Vec<u8>,
    broker_password: String,
}

/// Who holds each client id, and the MQTT 3.1.1 persistent sessions left behind.
#[derive(Default)]
struct Sessions {
    next_connection: u64,
    live: HashMap<String, Holder>,
    left: HashMap<String, Instant>,
}

/// The connection holding a client id, and how to tell it that another one takes over: it answers
/// through the sender it is given once it has said goodbye.
struct Holder {
    connection: u64,
    kick: oneshot::Sender<oneshot::Sender<()>>,
}

/// The faults in force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Faults {
    latency: Duration,
    stalled: bool,
    partitioned: bool,
    /// Bumped by `drop_connections`: every connection of an older generation closes.
    generation: u64,
}

struct Shared {
    config: GatewayConfig,
    accounts: RwLock<HashMap<String, Account>>,
    /// Source id to company: a user may send commands to its own company's sources only.
    owners: RwLock<HashMap<String, String>>,
    sessions: Mutex<Sessions>,
    faults: watch::Sender<Faults>,
    stats: GatewayStats,
    stopping: AtomicBool,
}

/// A running gateway. Dropping it (or `stop`) closes its listener and every connection.
pub struct Gateway {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.config.upstream)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Listens on `listen` (a loopback address; port 0 picks a free one) and starts accepting.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start(listen: SocketAddr, config: GatewayConfig) -> std::io::Result<Gateway> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (faults, _) = watch::channel(Faults::default());
        let shared = Arc::new(Shared {
            config,
            accounts: RwLock::new(HashMap::new()),
            owners: RwLock::new(HashMap::new()),
            sessions: Mutex::new(Sessions::default()),
            faults,
            stats: GatewayStats::default(),
            stopping: AtomicBool::new(false),
        });
        let task = tokio::spawn(accept(listener, Arc::clone(&shared), Front::Plain));
        Ok(Gateway {
            addr,
            shared,
            tasks: Mutex::new(vec![task]),
        })
    }

    /// Adds a listener on `listen` that ends TLS with the server's certificate chain and key
    /// (PEM) and forwards plain MQTT to Mosquitto, sharing the accounts and faults; returns its
    /// address. With `websocket`, it serves MQTT over WebSocket as Capture does: only on the path
    /// `/mqtt` (HTTP 404 elsewhere) and only with a `Sec-WebSocket-Protocol` of `mqtt`, `mqtt-v3`,
    /// `mqtt-v3.1.1` or `mqtt-v5` (HTTP 400 without one).
    ///
    /// # Errors
    /// A certificate or key that cannot be read, or an address that cannot be bound.
    pub async fn listen_tls(
        &self,
        listen: SocketAddr,
        cert_pem: &[u8],
        key_pem: &[u8],
        websocket: bool,
    ) -> Result<SocketAddr, String> {
        let acceptor = tls_acceptor(cert_pem, key_pem)?;
        let front = if websocket {
            Front::Wss(acceptor)
        } else {
            Front::Tls(acceptor)
        };
        self.listen(listen, front).await
    }

    /// Adds a listener on `listen` for MQTT over plain WebSocket, with the rules of
    /// [`Gateway::listen_tls`]'s WebSocket; returns its address.
    ///
    /// # Errors
    /// An address that cannot be bound.
    pub async fn listen_websocket(&self, listen: SocketAddr) -> Result<SocketAddr, String> {
        self.listen(listen, Front::Ws).await
    }

    async fn listen(&self, listen: SocketAddr, front: Front) -> Result<SocketAddr, String> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("the gateway could not listen on {listen}: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("the gateway's listener has no address: {e}"))?;
        let task = tokio::spawn(accept(listener, Arc::clone(&self.shared), front));
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(task);
        Ok(addr)
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &GatewayStats {
        &self.shared.stats
    }

    /// The scope of the account that logs in as `username` (an account without one is not
    /// checked: the broker still decides who may log in).
    pub fn set_account(&self, username: &str, scope: Scope) {
        self.shared
            .accounts
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(username.to_owned())
            .and_modify(|account| account.scope = scope.clone())
            .or_insert(Account { scope, jwt: None });
    }

    /// `username` logs in with JWTs signed (HS256) with `key`, checked here; the CONNECT goes on
    /// to the broker with `broker_password` instead of the token.
    pub fn set_jwt_login(&self, username: &str, key: &[u8], broker_password: &str) {
        let jwt = Some(Arc::new(JwtLogin {
            key: key.to_vec(),
            broker_password: broker_password.to_owned(),
        }));
        self.shared
            .accounts
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(username.to_owned())
            .and_modify(|account| account.jwt.clone_from(&jwt))
            .or_insert(Account {
                scope: Scope::Open,
                jwt,
            });
    }

    /// The source `source_id` belongs to `company`: that company's users may send it commands.
    pub fn set_source_owner(&self, source_id: &str, company: &str) {
        self.shared
            .owners
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(source_id.to_owned(), company.to_owned());
    }

    pub fn remove_account(&self, username: &str) {
        self.shared
            .accounts
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(username);
    }

    /// Delays every forwarded chunk, both ways, by `latency` (zero ends it).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.faults.send_modify(|f| f.latency = latency);
    }

    /// Holds all traffic, both ways, while `stalled`; the connections stay open.
    pub fn set_stalled(&self, stalled: bool) {
        self.shared.faults.send_modify(|f| f.stalled = stalled);
    }

    /// Closes every connection now (clients see the connection drop, and may reconnect).
    pub fn drop_connections(&self) {
        self.shared.faults.send_modify(|f| f.generation += 1);
    }

    /// While `partitioned`, every connection is dropped and new ones are refused.
    pub fn set_partitioned(&self, partitioned: bool) {
        self.shared.faults.send_modify(|f| {
            f.partitioned = partitioned;
            if partitioned {
                f.generation += 1;
            }
        });
    }

    /// Stops accepting and closes every connection.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.drop_connections();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for task in tasks {
            task.abort();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// What a listener speaks before MQTT.
#[derive(Clone)]
enum Front {
    Plain,
    Ws,
    Tls(tokio_rustls::TlsAcceptor),
    Wss(tokio_rustls::TlsAcceptor),
}

fn tls_acceptor(cert_pem: &[u8], key_pem: &[u8]) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the gateway's certificate cannot be read: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("the gateway's key cannot be read: {e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS set-up failed: {e}"))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("the gateway's certificate and key do not make a TLS server: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The WebSocket subprotocols Capture's broker (EMQX) takes.
const SUBPROTOCOLS: [&str; 4] = ["mqtt", "mqtt-v3", "mqtt-v3.1.1", "mqtt-v5"];

type WsRequest = async_tungstenite::tungstenite::handshake::server::Request;
type WsResponse = async_tungstenite::tungstenite::handshake::server::Response;
type WsRefusal = async_tungstenite::tungstenite::handshake::server::ErrorResponse;

/// Capture's WebSocket handshake rules: the path `/mqtt`, and an MQTT subprotocol.
#[allow(clippy::result_large_err)] // the type tungstenite's callback returns
fn websocket_handshake(
    request: &WsRequest,
    mut response: WsResponse,
) -> Result<WsResponse, WsRefusal> {
    use async_tungstenite::tungstenite::http;
    let refuse = |status: http::StatusCode, why: &str| {
        let mut refusal = http::Response::new(Some(why.to_owned()));
        *refusal.status_mut() = status;
        refusal
    };
    if request.uri().path() != "/mqtt" {
        return Err(refuse(
            http::StatusCode::NOT_FOUND,
            "MQTT over WebSocket is served on /mqtt only",
        ));
    }
    let chosen = request
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .find(|offered| SUBPROTOCOLS.contains(offered));
    let Some(chosen) = chosen else {
        return Err(refuse(
            http::StatusCode::BAD_REQUEST,
            "a Sec-WebSocket-Protocol of mqtt (or mqtt-v3, mqtt-v3.1.1, mqtt-v5) is required",
        ));
    };
    if let Ok(value) = http::HeaderValue::from_str(chosen) {
        response
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", value);
    }
    Ok(response)
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, front: Front) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors, say: wait a little instead of spinning.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let faults = *shared.faults.borrow();
        if faults.partitioned {
            drop(client); // refused: as if the network were down
            continue;
        }
        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(&shared);
        let front = front.clone();
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let Ok(upstream) = TcpStream::connect(shared.config.upstream).await else {
                return;
            };
            let _ = upstream.set_nodelay(true);
            // A failed handshake (an untrusted certificate, a refused WebSocket) ends only this
            // connection.
            match front {
                Front::Plain => serve(client, upstream, shared, faults.generation).await,
                Front::Ws => {
                    let handshake =
                        async_tungstenite::tokio::accept_hdr_async(client, websocket_handshake);
                    if let Ok(Ok(socket)) = tokio::time::timeout(HANDSHAKE, handshake).await {
                        let stream = ws_stream_tungstenite::WsStream::new(socket);
                        serve(stream, upstream, shared, faults.generation).await;
                    }
                }
                Front::Tls(acceptor) => {
                    if let Ok(Ok(stream)) =
                        tokio::time::timeout(HANDSHAKE, acceptor.accept(client)).await
                    {
                        serve(stream, upstream, shared, faults.generation).await;
                    }
                }
                Front::Wss(acceptor) => {
                    let handshake = async {
                        let stream = acceptor.accept(client).await.ok()?;
                        async_tungstenite::tokio::accept_hdr_async(stream, websocket_handshake)
                            .await
                            .ok()
                    };
                    if let Ok(Some(socket)) = tokio::time::timeout(HANDSHAKE, handshake).await {
                        let stream = ws_stream_tungstenite::WsStream::new(socket);
                        serve(stream, upstream, shared, faults.generation).await;
                    }
                }
            }
        });
    }
}

/// Why a connection ends early.
enum Refusal {
    /// A reason code to send under MQTT 5 before closing.
    Close(u8),
    /// A login refused as bad credentials: a CONNACK saying so, then the close.
    Login,
    /// A CONNECT of a protocol version the gateway does not serve: CONNACK 1, then the close.
    Version,
    /// The connection is gone, or dropped by a fault.
    Gone,
}

async fn serve<S>(client: S, upstream: TcpStream, shared: Arc<Shared>, generation: u64)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = upstream.into_split();
    let client_write = Arc::new(tokio::sync::Mutex::new(client_write));
    let faults = shared.faults.subscribe();
    let dropped = {
        let mut faults = faults.clone();
        async move {
            let _ = faults
                .wait_for(|f| f.generation != generation || f.partitioned)
                .await;
        }
    };
    let (kick, kicked) = oneshot::channel::<oneshot::Sender<()>>();
    // Resolves only when another connection takes this one's client id.
    let kicked = async move {
        match kicked.await {
            Ok(done) => done,
            Err(_) => std::future::pending().await,
        }
    };
    // Answers the gateway gives in the broker's place (`Deny::ReasonCode`), and the SUBACKs it
    // completes; bounded, so that a client that sends and never reads is held back.
    let (answers, answered) = mpsc::channel(ANSWERS);
    let edits: Edits = Arc::default();
    let mut inspector = Inspector::new(&shared, kick, answers, Arc::clone(&edits));
    let upward = inspect_and_forward(
        &mut client_read,
        upstream_write,
        &mut inspector,
        faults.clone(),
        &shared,
    );
    let mid_write = Arc::new(AtomicBool::new(false));
    // Set once the broker's CONNACK took the login.
    let accepted = Arc::new(AtomicBool::new(false));
    let reason_codes = shared.config.deny == Deny::ReasonCode;
    let downward = async {
        if reason_codes {
            forward_framed(
                upstream_read,
                Arc::clone(&client_write),
                faults.clone(),
                (Arc::clone(&mid_write), Acceptance::new(&accepted)),
                answered,
                edits,
            )
            .await;
        } else {
            forward(
                upstream_read,
                Arc::clone(&client_write),
                faults.clone(),
                (Arc::clone(&mid_write), Acceptance::new(&accepted)),
            )
            .await;
        }
    };
    let mut taken_over = None;
    let outcome = tokio::select! {
        refusal = upward => refusal,
        () = downward => Refusal::Gone,
        () = dropped => {
            shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            Refusal::Gone
        }
        done = kicked => {
            shared.stats.taken_over.fetch_add(1, Ordering::Relaxed);
            taken_over = Some(done);
            Refusal::Close(SESSION_TAKEN_OVER)
        }
    };
    // A DISCONNECT after half a packet of the broker's would read as garbage: then only the close.
    let whole = !mid_write.load(Ordering::SeqCst);
    let v5 = inspector.version == Some(Version::V5);
    let accepted = accepted.load(Ordering::SeqCst);
    let goodbye = goodbye(&outcome, v5, whole && accepted);
    {
        let mut writer = client_write.lock().await;
        // Bounded: a client that reads nothing must not keep this task (and its socket).
        let _ = tokio::time::timeout(GOODBYE, async {
            if let Some(goodbye) = goodbye {
                let _ = writer.write_all(&goodbye).await;
                let _ = writer.flush().await;
            }
            let _ = writer.shutdown().await;
        })
        .await;
    }
    inspector.leave(&shared, accepted);
    if let Some(done) = taken_over {
        let _ = done.send(());
    }
    if matches!(
        outcome,
        Refusal::Close(_) | Refusal::Login | Refusal::Version
    ) {
        linger(&mut client_read, &shared, generation).await;
    }
}

/// A lingering close: what the client still sends (the rest of an oversize packet, say) is read
/// and dropped until it hangs up, for a while. Closed with unread bytes, the socket would answer
/// with a reset, and the client's system could discard the goodbye unread. Dropping the
/// connections (or stopping the gateway) ends it at once.
async fn linger(client: &mut (impl AsyncRead + Unpin), shared: &Shared, generation: u64) {
    let mut faults = shared.faults.subscribe();
    let drain = tokio::time::timeout(GOODBYE, async {
        let mut sink = vec![0u8; 16 * 1024];
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    tokio::select! {
        _ = drain => {}
        _ = faults.wait_for(|f| f.generation != generation || f.partitioned) => {}
    }
}

/// What the client is told before the close: a DISCONNECT with the reason under MQTT 5 (only
/// `after_connack`, and not after half a packet of the broker's), or the CONNACK refusing a login.
fn goodbye(outcome: &Refusal, v5: bool, after_connack: bool) -> Option<Vec<u8>> {
    match *outcome {
        Refusal::Close(reason) if v5 && after_connack => {
            let mut buf = BytesMut::new();
            let codec = Codec {
                version: Version::V5,
                max_incoming: usize::MAX,
            };
            let disconnect = Packet::Disconnect {
                reason,
                words: None,
            };
            codec
                .encode(&disconnect, &mut buf)
                .ok()
                .map(|()| buf.to_vec())
        }
        // Nothing went to the broker, so nothing of its can be half written.
        Refusal::Login => Some(login::bad_credentials(v5).to_vec()),
        Refusal::Version => Some(vec![0x20, 0x02, 0x00, 0x01]),
        Refusal::Close(_) | Refusal::Gone => None,
    }
}

/// How long a closing connection may take to say goodbye (a DISCONNECT, a TLS `close_notify`).
const GOODBYE: Duration = Duration::from_secs(2);

/// The gateway's own answers that may wait for the client to read.
const ANSWERS: usize = 256;

/// The SUBACKs to complete, by packet id: whether the connection is MQTT 5, and per filter the
/// code of a denied one or None where the broker's code goes.
type Edits = Arc<Mutex<HashMap<u16, (bool, Vec<Option<u8>>)>>>;

/// What the gateway knows of a connection: its protocol version, its account's scope, its login.
struct Inspector {
    version: Option<Version>,
    scope: Scope,
    max_packet: usize,
    /// This connection's number, and its client id once it holds one.
    connection: u64,
    client_id: Option<String>,
    /// An MQTT 3.1.1 persistent session: its expiry starts when the connection ends.
    persistent_v3: bool,
    /// Handed to the session table at CONNECT, for a later connection to take this one over.
    kick: Option<oneshot::Sender<oneshot::Sender<()>>>,
    /// When the connection's JWT expires.
    expires: Option<tokio::time::Instant>,
    /// Under `Deny::ReasonCode`: where the gateway's answers go, the SUBACKs to complete, and the
    /// denied 3.1.1 QoS 2 publishes whose PUBREL the gateway answers.
    answers: mpsc::Sender<Vec<u8>>,
    edits: Edits,
    denied_qos2: HashSet<u16>,
}

impl Inspector {
    fn new(
        shared: &Shared,
        kick: oneshot::Sender<oneshot::Sender<()>>,
        answers: mpsc::Sender<Vec<u8>>,
        edits: Edits,
    ) -> Inspector {
        let connection = {
            let mut sessions = shared
                .sessions
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            sessions.next_connection += 1;
            sessions.next_connection
        };
        Inspector {
            version: None,
            scope: Scope::Open,
            max_packet: shared.config.max_packet,
            connection,
            client_id: None,
            persistent_v3: false,
            kick: Some(kick),
            expires: None,
            answers,
            edits,
            denied_qos2: HashSet::new(),
        }
    }

    /// Checks one whole packet from the client (`frame`): Ok to forward it (with the frame to send
    /// instead, if it was rewritten), or the refusal.
    async fn check(&mut self, frame: &[u8], shared: &Shared) -> Result<Option<Vec<u8>>, Refusal> {
        if frame.len() > self.max_packet {
            shared.stats.refused_size.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Close(PACKET_TOO_LARGE));
        }
        let kind = frame[0] >> 4;
        match (self.version, kind) {
            (None, 1) => {
                // Another level (MQTT 3.1's "MQIsdp" among them): "unacceptable protocol
                // version", as 3.1.1 says, then the close.
                self.version = Some(connect_version(frame).ok_or(Refusal::Version)?);
            }
            // Not MQTT (the first packet must be CONNECT), or a second CONNECT: a protocol error.
            (None, _) | (Some(_), 1) => return Err(Refusal::Gone),
            _ => {}
        }
        if kind == 6 && !self.denied_qos2.is_empty() {
            // The PUBREL of a denied 3.1.1 QoS 2 publish: the broker never had it.
            if let Some(pid) = deny::pubrel_pid(frame).filter(|pid| self.denied_qos2.remove(pid)) {
                return self.answer(deny::pubcomp(pid)).await;
            }
        }
        // Only the packets the gateway's rules apply to are decoded: CONNECT, PUBLISH, SUBSCRIBE.
        if !matches!(kind, 1 | 3 | 8) {
            return Ok(None);
        }
        let codec = Codec {
            version: self.version.unwrap_or(Version::V311),
            max_incoming: usize::MAX,
        };
        let mut buf = BytesMut::from(frame);
        // A CONNECT, PUBLISH or SUBSCRIBE the gateway cannot read is not let through unchecked.
        let Ok(Some(packet)) = codec.decode(&mut buf) else {
            return Err(Refusal::Gone);
        };
        let v5 = self.version == Some(Version::V5);
        let reason_codes = shared.config.deny == Deny::ReasonCode;
        match packet {
            Packet::Connect(connect) => self.connect(frame, &connect, shared).await,
            Packet::Publish(publish) => {
                if self.may_publish(&publish.topic, shared) {
                    return Ok(None);
                }
                shared.stats.refused_scope.fetch_add(1, Ordering::Relaxed);
                if !reason_codes {
                    return Err(Refusal::Close(NOT_AUTHORIZED));
                }
                match publish.qos {
                    0 => Ok(Some(Vec::new())), // dropped
                    1 => self.answer(deny::puback(publish.pkid, v5)).await,
                    _ => {
                        if !v5 {
                            self.denied_qos2.insert(publish.pkid);
                        }
                        self.answer(deny::pubrec(publish.pkid, v5)).await
                    }
                }
            }
            Packet::Subscribe { filters, .. } => {
                let denied = |filter: &str| self.scope.check(Action::Subscribe, filter).is_err();
                if !filters.iter().any(|(filter, _)| denied(filter)) {
                    return Ok(None);
                }
                shared.stats.refused_scope.fetch_add(1, Ordering::Relaxed);
                if !reason_codes {
                    return Err(Refusal::Close(NOT_AUTHORIZED));
                }
                let Some(split) = deny::split_subscribe(frame, v5, denied) else {
                    return Err(Refusal::Gone); // unreadable: never let through unchecked
                };
                if let Some(allowed) = split.allowed {
                    self.edits
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(split.pid, (v5, split.template));
                    Ok(Some(allowed))
                } else {
                    let failures: Vec<u8> = split.template.iter().flatten().copied().collect();
                    self.answer(deny::suback(split.pid, &failures, v5)).await
                }
            }
            _ => Ok(None),
        }
    }

    /// Answers the client in the broker's place; the client's packet goes no further.
    async fn answer(&self, packet: Vec<u8>) -> Result<Option<Vec<u8>>, Refusal> {
        self.answers.send(packet).await.map_err(|_| Refusal::Gone)?;
        Ok(Some(Vec::new()))
    }

    fn may_publish(&self, topic: &str, shared: &Shared) -> bool {
        if self.scope.check(Action::Publish, topic).is_err() {
            return false;
        }
        // A user's command goes to a source of the user's own company only.
        if let Scope::User {
            company: Some(company),
        } = &self.scope
        {
            let source = topic
                .strip_prefix("v1/sources/")
                .and_then(|rest| rest.split('/').next());
            if let Some(source) = source {
                let owners = shared.owners.read().unwrap_or_else(PoisonError::into_inner);
                return owners.get(source) == Some(company);
            }
        }
        true
    }

    /// The login: the account's scope, its JWT checked, its client id taken from any connection
    /// that holds it, and an expired 3.1.1 session ended before the CONNECT goes on.
    async fn connect(
        &mut self,
        frame: &[u8],
        connect: &Connect,
        shared: &Shared,
    ) -> Result<Option<Vec<u8>>, Refusal> {
        let mut rewritten = None;
        if let Some((username, password)) = &connect.login {
            let account = shared
                .accounts
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(username)
                .cloned();
            if let Some(account) = account {
                self.scope = account.scope;
                if let Some(jwt) = account.jwt {
                    let now = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default();
                    let seconds = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
                    let Ok(exp) = login::check_jwt(password, &jwt.key, username, seconds) else {
                        shared.stats.refused_login.fetch_add(1, Ordering::Relaxed);
                        return Err(Refusal::Login);
                    };
                    // Closed at `exp` itself (not at the next whole second); a date too far to
                    // count to is never reached.
                    let at = Duration::from_secs(u64::try_from(exp).unwrap_or(0));
                    self.expires = tokio::time::Instant::now().checked_add(at.saturating_sub(now));
                    rewritten = Some(
                        login::replace_password(frame, password, &jwt.broker_password)
                            .ok_or(Refusal::Gone)?,
                    );
                }
            }
        }
        let frame = rewritten.as_deref().unwrap_or(frame);
        let v5 = self.version == Some(Version::V5);
        self.take_over(frame, &connect.client_id, v5, shared).await;
        self.persistent_v3 = self.version == Some(Version::V311) && !connect.clean;
        if !connect.clean && !connect.client_id.is_empty() {
            // A session left by a 3.1.1 client longer than Capture keeps one is ended first,
            // whichever version comes back for it.
            let left = shared
                .sessions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .left
                .get(&connect.client_id)
                .copied();
            if left.is_some_and(|at| at.elapsed() >= shared.config.session_expiry) {
                let clean = login::with_clean_session(frame).ok_or(Refusal::Gone)?;
                if login_upstream(&clean, v5, shared).await == Some(true) {
                    shared
                        .sessions
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .left
                        .remove(&connect.client_id);
                    shared
                        .stats
                        .expired_sessions
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(rewritten)
    }

    /// Takes `client_id` from the connection that holds it, which says goodbye first (DISCONNECT
    /// 0x8E under MQTT 5) so that the broker's own takeover finds it gone. Only a login the broker
    /// takes does that: with a holder, the credentials are tried first under another client id.
    async fn take_over(&mut self, frame: &[u8], client_id: &str, v5: bool, shared: &Shared) {
        let Some(kick) = self.kick.take() else {
            return;
        };
        if client_id.is_empty() {
            return; // the broker assigns one: nothing to take over
        }
        let held = shared
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .live
            .contains_key(client_id);
        if held {
            let probe_id = format!("capture-gateway-probe-{}", self.connection);
            let verdict = match login::as_probe(frame, &probe_id) {
                Some(probe) => login_upstream(&probe, v5, shared).await,
                None => None,
            };
            if verdict == Some(false) {
                return; // the broker refuses this login: the holder keeps its connection
            }
        }
        let holder = shared
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .live
            .insert(
                client_id.to_owned(),
                Holder {
                    connection: self.connection,
                    kick,
                },
            );
        self.client_id = Some(client_id.to_owned());
        if let Some(holder) = holder {
            let (done, said_goodbye) = oneshot::channel();
            if holder.kick.send(done).is_ok() {
                let _ = tokio::time::timeout(GOODBYE + GOODBYE, said_goodbye).await;
            }
        }
    }

    /// The connection ended: its client id is free, and, if the broker took the login, a 3.1.1
    /// persistent session starts to age.
    fn leave(&self, shared: &Shared, accepted: bool) {
        let Some(client_id) = &self.client_id else {
            return;
        };
        let mut sessions = shared
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if sessions
            .live
            .get(client_id)
            .is_some_and(|holder| holder.connection == self.connection)
        {
            sessions.live.remove(client_id);
            if accepted {
                sessions.left.remove(client_id);
                if self.persistent_v3 {
                    sessions.left.insert(client_id.clone(), Instant::now());
                }
            }
        }
    }
}

/// Logs in to the broker with the CONNECT `frame` and leaves at once (under MQTT 5 with a session
/// expiry of zero): whether the broker took the login, None when it did not answer. The gateway's
/// own logins: to try credentials before a takeover, and to end a session that expired.
async fn login_upstream(frame: &[u8], v5: bool, shared: &Shared) -> Option<bool> {
    let outcome = tokio::time::timeout(GOODBYE, async {
        let mut upstream = TcpStream::connect(shared.config.upstream).await.ok()?;
        upstream.write_all(frame).await.ok()?;
        let mut connack = [0u8; 4];
        upstream.read_exact(&mut connack).await.ok()?;
        let accepted = connack[0] == 0x20 && connack[3] == 0;
        if accepted {
            upstream.write_all(login::upstream_goodbye(v5)).await.ok()?;
        }
        let _ = upstream.shutdown().await;
        Some(accepted)
    })
    .await;
    outcome.ok().flatten()
}

/// The protocol version of a CONNECT frame: 3.1.1 or 5 (MQTT 3.1, `MQIsdp`, is not served).
fn connect_version(frame: &[u8]) -> Option<Version> {
    match login::connect_layout(frame)?.level {
        5 => Some(Version::V5),
        4 => Some(Version::V311),
        _ => None,
    }
}

/// Waits out the faults in force before forwarding: a stall holds the traffic, latency delays it.
async fn obey(faults: &mut watch::Receiver<Faults>) {
    let Ok(current) = faults.wait_for(|f| !f.stalled).await.map(|f| *f) else {
        return;
    };
    if !current.latency.is_zero() {
        tokio::time::sleep(current.latency).await;
    }
}

/// Client to broker: each whole packet is checked, then forwarded as it came (or as rewritten).
async fn inspect_and_forward(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    inspector: &mut Inspector,
    mut faults: watch::Receiver<Faults>,
    shared: &Shared,
) -> Refusal {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        // Forward every whole packet in the buffer; those before a refused one still go, in order,
        // as the broker would have taken them before it closed the connection.
        let mut ready = 0;
        let mut refused = None;
        loop {
            let Some(frame) = frame_length(&buf[ready..]) else {
                if buf.len() - ready >= 5 {
                    refused = Some(Refusal::Gone); // a malformed length: not MQTT
                }
                break;
            };
            if frame > inspector.max_packet {
                // Refused from its header: the rest of an oversize packet is never read.
                shared.stats.refused_size.fetch_add(1, Ordering::Relaxed);
                refused = Some(Refusal::Close(PACKET_TOO_LARGE));
                break;
            }
            if buf.len() - ready < frame {
                break;
            }
            match inspector.check(&buf[ready..ready + frame], shared).await {
                Err(refusal) => {
                    refused = Some(refusal);
                    break;
                }
                Ok(None) => ready += frame,
                Ok(Some(rewritten)) => {
                    // What came before goes first, then the rewritten packet in place of the
                    // client's.
                    obey(&mut faults).await;
                    if to.write_all(&buf[..ready]).await.is_err()
                        || to.write_all(&rewritten).await.is_err()
                    {
                        return Refusal::Gone;
                    }
                    buf.advance(ready + frame);
                    ready = 0;
                }
            }
        }
        if ready > 0 {
            obey(&mut faults).await;
            if to.write_all(&buf[..ready]).await.is_err() {
                return Refusal::Gone;
            }
            buf.advance(ready);
        }
        if let Some(refusal) = refused {
            let _ = to.flush().await;
            return refusal;
        }
        let deadline = inspector.expires;
        let expired = async move {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = from.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return Refusal::Gone;
                }
                Ok(_) => {}
            },
            () = expired => {
                // Capture closes a JWT connection when its token expires.
                shared.stats.expired_logins.fetch_add(1, Ordering::Relaxed);
                return Refusal::Close(NOT_AUTHORIZED);
            }
        }
    }
}

/// Reads the broker's first bytes, its CONNACK, to learn whether it took the login.
struct Acceptance {
    head: Vec<u8>,
    /// What the CONNACK said, once all of its first four bytes were seen.
    verdict: Option<bool>,
    /// Set once the CONNACK that took the login has been written to the client.
    accepted: Arc<AtomicBool>,
}

impl Acceptance {
    fn new(accepted: &Arc<AtomicBool>) -> Acceptance {
        Acceptance {
            head: Vec::with_capacity(4),
            verdict: None,
            accepted: Arc::clone(accepted),
        }
    }

    /// Watches the broker's next `bytes` on their way to the client. Mosquitto refuses a wrong
    /// password as "not authorized" (3.1.1 code 5, MQTT 5 0x87); Capture's broker (EMQX) says
    /// "bad username or password" (4, 0x86), and so the client is told.
    fn watch(&mut self, bytes: &mut [u8]) {
        let seen = self.head.len();
        if seen >= 4 {
            return;
        }
        let wanted = (4 - seen).min(bytes.len());
        if seen + wanted == 4 && self.head.first().or(bytes.first()) == Some(&0x20) {
            let code = &mut bytes[3 - seen];
            *code = match *code {
                5 => 4,
                0x87 => 0x86,
                other => other,
            };
        }
        self.head.extend_from_slice(&bytes[..wanted]);
        if self.head.len() == 4 {
            self.verdict = Some(self.head[0] == 0x20 && self.head[3] == 0);
        }
    }

    /// The bytes watched last have reached the client: a CONNACK among them now counts.
    fn written(&self) {
        if self.verdict == Some(true) {
            self.accepted.store(true, Ordering::SeqCst);
        }
    }
}

/// Broker to client under `Deny::ReasonCode`: whole packets, the SUBACKs of split SUBSCRIBEs
/// completed, and the gateway's own answers put between packets.
async fn forward_framed(
    mut from: impl AsyncRead + Unpin,
    to: Arc<tokio::sync::Mutex<impl AsyncWrite + Unpin>>,
    mut faults: watch::Receiver<Faults>,
    (mid_write, mut acceptance): (Arc<AtomicBool>, Acceptance),
    mut answers: mpsc::Receiver<Vec<u8>>,
    edits: Edits,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = Vec::with_capacity(64 * 1024);
    // Answers wait for the broker's CONNACK: a client hears nothing before it.
    let mut held = Vec::new();
    loop {
        tokio::select! {
            read = from.read_buf(&mut buf) => {
                if matches!(read, Ok(0) | Err(_)) {
                    return;
                }
            }
            Some(answer) = answers.recv() => held.extend_from_slice(&answer),
        }
        let mut whole = 0;
        while let Some(len) = frame_length(&buf[whole..]) {
            if buf.len() - whole < len {
                break;
            }
            let packet = &buf[whole..whole + len];
            let edit = if packet[0] >> 4 == 9 {
                deny::suback_pid(packet).and_then(|pid| {
                    edits
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&pid)
                })
            } else {
                None
            };
            match edit.and_then(|(v5, template)| deny::merge_suback(packet, v5, &template)) {
                Some(merged) => out.extend_from_slice(&merged),
                None => out.extend_from_slice(packet),
            }
            whole += len;
        }
        buf.advance(whole);
        acceptance.watch(&mut out);
        while let Ok(answer) = answers.try_recv() {
            held.extend_from_slice(&answer);
        }
        match acceptance.verdict {
            Some(true) => out.append(&mut held),
            Some(false) => held.clear(), // nothing follows a refusing CONNACK
            None => {}
        }
        if out.is_empty() {
            continue;
        }
        obey(&mut faults).await;
        let mut writer = to.lock().await;
        mid_write.store(true, Ordering::SeqCst);
        if writer.write_all(&out).await.is_err() || writer.flush().await.is_err() {
            return;
        }
        mid_write.store(false, Ordering::SeqCst);
        acceptance.written();
        out.clear();
    }
}

/// Broker to client: bytes as they come, under the faults.
async fn forward(
    mut from: impl AsyncRead + Unpin,
    to: Arc<tokio::sync::Mutex<impl AsyncWrite + Unpin>>,
    mut faults: watch::Receiver<Faults>,
    (mid_write, mut acceptance): (Arc<AtomicBool>, Acceptance),
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        acceptance.watch(&mut buf[..n]);
        obey(&mut faults).await;
        let mut writer = to.lock().await;
        // Flushed each time: TLS and WebSocket streams may hold written bytes until then.
        mid_write.store(true, Ordering::SeqCst);
        if writer.write_all(&buf[..n]).await.is_err() || writer.flush().await.is_err() {
            return;
        }
        mid_write.store(false, Ordering::SeqCst);
        acceptance.written();
    }
}

#[cfg(test)]
mod tests;
