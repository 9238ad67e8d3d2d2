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
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

pub mod login;

/// Capture's packet size limit (EMQX's default): 1 MB.
pub const CAPTURE_MAX_PACKET: usize = 1024 * 1024;

/// MQTT 5 reason codes the gateway sends before it closes a connection.
const NOT_AUTHORIZED: u8 = 0x87;
const PACKET_TOO_LARGE: u8 = 0x95;
const SESSION_TAKEN_OVER: u8 = 0x8E;

/// How long EMQX keeps an MQTT 3.1.1 persistent session after its client has gone: two hours.
pub const CAPTURE_SESSION_EXPIRY: Duration = Duration::from_secs(2 * 3600);

/// What the gateway enforces.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where Mosquitto listens (a private loopback port).
    pub upstream: SocketAddr,
    /// The largest packet a client may send.
    pub max_packet: usize,
    /// How long an MQTT 3.1.1 persistent session outlives its connection.
    pub session_expiry: Duration,
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
    /// The connection is gone, or dropped by a fault.
    Gone,
}

async fn serve<S>(client: S, upstream: TcpStream, shared: Arc<Shared>, generation: u64)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (client_read, client_write) = tokio::io::split(client);
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
    let mut inspector = Inspector::new(&shared, kick);
    let upward = inspect_and_forward(
        client_read,
        upstream_write,
        &mut inspector,
        faults.clone(),
        &shared,
    );
    let mid_write = Arc::new(AtomicBool::new(false));
    let downward = forward(
        upstream_read,
        Arc::clone(&client_write),
        faults.clone(),
        Arc::clone(&mid_write),
    );
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
    let goodbye: Option<Vec<u8>> = match outcome {
        Refusal::Close(reason) if v5 && whole => {
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
        Refusal::Close(_) | Refusal::Gone => None,
    };
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
    inspector.leave(&shared);
    if let Some(done) = taken_over {
        let _ = done.send(());
    }
}

/// How long a closing connection may take to say goodbye (a DISCONNECT, a TLS `close_notify`).
const GOODBYE: Duration = Duration::from_secs(2);

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
}

impl Inspector {
    fn new(shared: &Shared, kick: oneshot::Sender<oneshot::Sender<()>>) -> Inspector {
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
        if self.version.is_none() {
            if kind != 1 {
                return Err(Refusal::Gone); // not MQTT: the first packet must be CONNECT
            }
            self.version = Some(connect_version(frame).ok_or(Refusal::Gone)?);
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
        // Malformed bytes go to the broker, which closes the connection as it does.
        let Ok(Some(packet)) = codec.decode(&mut buf) else {
            return Ok(None);
        };
        let refused = match packet {
            Packet::Connect(connect) => return self.connect(frame, &connect, shared).await,
            Packet::Publish(publish) => !self.may_publish(&publish.topic, shared),
            Packet::Subscribe { filters, .. } => filters
                .iter()
                .any(|(filter, _)| self.scope.check(Action::Subscribe, filter).is_err()),
            _ => false,
        };
        if refused {
            shared.stats.refused_scope.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Close(NOT_AUTHORIZED));
        }
        Ok(None)
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
                        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                    let Ok(exp) = login::check_jwt(password, &jwt.key, username, now) else {
                        shared.stats.refused_login.fetch_add(1, Ordering::Relaxed);
                        return Err(Refusal::Login);
                    };
                    let left = Duration::from_secs(u64::try_from(exp - now).unwrap_or(0));
                    self.expires = Some(tokio::time::Instant::now() + left);
                    rewritten = Some(
                        login::replace_password(frame, password, &jwt.broker_password)
                            .ok_or(Refusal::Gone)?,
                    );
                }
            }
        }
        let frame = rewritten.as_deref().unwrap_or(frame);
        self.take_over(&connect.client_id, shared).await;
        let left = shared
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .left
            .remove(&connect.client_id);
        if self.version == Some(Version::V311) && !connect.clean {
            self.persistent_v3 = true;
            if left.is_some_and(|at| at.elapsed() >= shared.config.session_expiry) {
                end_session(frame, shared).await;
            }
        }
        Ok(rewritten)
    }

    /// Takes `client_id` from the connection that holds it, which says goodbye first (DISCONNECT
    /// 0x8E under MQTT 5) so that the broker's own takeover finds it gone.
    async fn take_over(&mut self, client_id: &str, shared: &Shared) {
        let Some(kick) = self.kick.take() else {
            return;
        };
        if client_id.is_empty() {
            return; // the broker assigns one: nothing to take over
        }
        let holder = {
            let mut sessions = shared
                .sessions
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            sessions.live.insert(
                client_id.to_owned(),
                Holder {
                    connection: self.connection,
                    kick,
                },
            )
        };
        self.client_id = Some(client_id.to_owned());
        if let Some(holder) = holder {
            let (done, said_goodbye) = oneshot::channel();
            if holder.kick.send(done).is_ok() {
                let _ = tokio::time::timeout(GOODBYE + GOODBYE, said_goodbye).await;
            }
        }
    }

    /// The connection ended: its client id is free, and a 3.1.1 persistent session starts to age.
    fn leave(&self, shared: &Shared) {
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
            if self.persistent_v3 {
                sessions.left.insert(client_id.clone(), Instant::now());
            }
        }
    }
}

/// Ends the broker's session of the client whose CONNECT is `frame` (an MQTT 3.1.1 session left
/// for longer than Capture keeps one): the same login once with a clean session, then DISCONNECT.
async fn end_session(frame: &[u8], shared: &Shared) {
    let Some(clean) = login::with_clean_session(frame) else {
        return;
    };
    let ended = tokio::time::timeout(GOODBYE, async {
        let mut upstream = TcpStream::connect(shared.config.upstream).await.ok()?;
        upstream.write_all(&clean).await.ok()?;
        let mut connack = [0u8; 4];
        upstream.read_exact(&mut connack).await.ok()?;
        upstream.write_all(&[0xE0, 0x00]).await.ok()?;
        let _ = upstream.shutdown().await;
        Some(())
    })
    .await;
    if matches!(ended, Ok(Some(()))) {
        shared
            .stats
            .expired_sessions
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// The protocol level of a CONNECT frame (4: 3.1.1, 5: MQTT 5).
fn connect_version(frame: &[u8]) -> Option<Version> {
    let header = frame_length(frame)? - remaining_length(frame)?;
    // Protocol name (2-byte length + "MQTT"), then the level.
    match frame.get(header + 6)? {
        5 => Some(Version::V5),
        3 | 4 => Some(Version::V311),
        _ => None,
    }
}

fn remaining_length(frame: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for (i, byte) in frame.iter().skip(1).take(4).enumerate() {
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(len);
        }
    }
    None
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

/// Broker to client: bytes as they come, under the faults.
async fn forward(
    mut from: impl AsyncRead + Unpin,
    to: Arc<tokio::sync::Mutex<impl AsyncWrite + Unpin>>,
    mut faults: watch::Receiver<Faults>,
    mid_write: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        obey(&mut faults).await;
        let mut writer = to.lock().await;
        // Flushed each time: TLS and WebSocket streams may hold written bytes until then.
        mid_write.store(true, Ordering::SeqCst);
        if writer.write_all(&buf[..n]).await.is_err() || writer.flush().await.is_err() {
            return;
        }
        mid_write.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests;
