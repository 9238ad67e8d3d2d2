//! The Capture gateway: what the local emulator puts in front of Mosquitto so that a client meets
//! Capture's broker, not a lenient one. It accepts MQTT connections, forwards them to Mosquitto on a
//! private loopback port, and reads what clients send with the client engine's packet codec:
//!
//! - every SUBSCRIBE filter and PUBLISH topic is checked against the account's scope (the rules of
//!   `crate::scope`, by the CONNECT's username); a packet over the size limit is refused. A refusal
//!   closes the connection, as Capture's page says, with an MQTT 5 DISCONNECT first (0x87 "not
//!   authorized", 0x95 "packet too large");
//! - faults on demand for tests: latency, a stall (traffic held, connections open), dropping every
//!   connection, and a partition (connections dropped and refused until it ends).
//!
//! The broker's bytes go back to the client untouched. No Python here.

use crate::scope::{Action, Scope};
use crate::session::codec::{frame_length, Codec, Packet, Version};
use bytes::{Buf, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Capture's packet size limit (EMQX's default): 1 MB.
pub const CAPTURE_MAX_PACKET: usize = 1024 * 1024;

/// MQTT 5 reason codes the gateway sends before it closes a connection.
const NOT_AUTHORIZED: u8 = 0x87;
const PACKET_TOO_LARGE: u8 = 0x95;

/// What the gateway enforces.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where Mosquitto listens (a private loopback port).
    pub upstream: SocketAddr,
    /// The largest packet a client may send.
    pub max_packet: usize,
}

/// Counters, for tests and the emulator's `stats`.
#[derive(Debug, Default)]
pub struct GatewayStats {
    pub connections: AtomicU64,
    pub refused_scope: AtomicU64,
    pub refused_size: AtomicU64,
    pub dropped: AtomicU64,
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
    accounts: RwLock<HashMap<String, Scope>>,
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
            .insert(username.to_owned(), scope);
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
    let mut inspector = Inspector::new(&shared);
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
    let outcome = tokio::select! {
        refusal = upward => refusal,
        () = downward => Refusal::Gone,
        () = dropped => {
            shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            Refusal::Gone
        }
    };
    // A DISCONNECT after half a packet of the broker's would read as garbage: then only the close.
    let whole = !mid_write.load(Ordering::SeqCst);
    if let (Refusal::Close(reason), Some(Version::V5), true) = (outcome, inspector.version, whole) {
        let mut buf = BytesMut::new();
        let codec = Codec {
            version: Version::V5,
            max_incoming: usize::MAX,
        };
        if codec
            .encode(
                &Packet::Disconnect {
                    reason,
                    words: None,
                },
                &mut buf,
            )
            .is_ok()
        {
            let mut writer = client_write.lock().await;
            // Bounded: a client that reads nothing must not keep this task (and its socket).
            let _ = tokio::time::timeout(GOODBYE, async {
                let _ = writer.write_all(&buf).await;
                let _ = writer.flush().await;
            })
            .await;
        }
    }
    let mut writer = client_write.lock().await;
    let _ = tokio::time::timeout(GOODBYE, writer.shutdown()).await;
}

/// How long a closing connection may take to say goodbye (a DISCONNECT, a TLS `close_notify`).
const GOODBYE: Duration = Duration::from_secs(2);

/// What the gateway knows of a connection: its protocol version and its account's scope.
struct Inspector {
    version: Option<Version>,
    scope: Scope,
    max_packet: usize,
}

impl Inspector {
    fn new(shared: &Shared) -> Inspector {
        Inspector {
            version: None,
            scope: Scope::Open,
            max_packet: shared.config.max_packet,
        }
    }

    /// Checks one whole packet from the client (`frame`): Ok to forward it, or the refusal.
    fn check(&mut self, frame: &[u8], shared: &Shared) -> Result<(), Refusal> {
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
        // Only the packets the scope rules apply to are decoded: CONNECT, PUBLISH, SUBSCRIBE.
        if !matches!(kind, 1 | 3 | 8) {
            return Ok(());
        }
        let codec = Codec {
            version: self.version.unwrap_or(Version::V311),
            max_incoming: usize::MAX,
        };
        let mut buf = BytesMut::from(frame);
        // Malformed bytes go to the broker, which closes the connection as it does.
        let Ok(Some(packet)) = codec.decode(&mut buf) else {
            return Ok(());
        };
        let refused = match packet {
            Packet::Connect(connect) => {
                if let Some((username, _)) = &connect.login {
                    let accounts = shared
                        .accounts
                        .read()
                        .unwrap_or_else(PoisonError::into_inner);
                    self.scope = accounts.get(username).cloned().unwrap_or(Scope::Open);
                }
                false
            }
            Packet::Publish(publish) => self.scope.check(Action::Publish, &publish.topic).is_err(),
            Packet::Subscribe { filters, .. } => filters
                .iter()
                .any(|(filter, _)| self.scope.check(Action::Subscribe, filter).is_err()),
            _ => false,
        };
        if refused {
            shared.stats.refused_scope.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Close(NOT_AUTHORIZED));
        }
        Ok(())
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

/// Client to broker: each whole packet is checked, then forwarded as it came.
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
            if let Err(refusal) = inspector.check(&buf[ready..ready + frame], shared) {
                refused = Some(refusal);
                break;
            }
            ready += frame;
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
        match from.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return Refusal::Gone;
            }
            Ok(_) => {}
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
