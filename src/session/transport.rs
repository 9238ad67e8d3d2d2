//! The four transports: MQTT over TCP, over TLS (tokio-rustls), and over WebSocket, plain or with
//! TLS (async-tungstenite, the `mqtt` subprotocol offered and checked). Each gives one byte stream;
//! the engine splits it into a read and a write half.

use super::{tls, SessionConfig, SessionError, Transport};
use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A connected byte stream to the broker.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub type BoxStream = Box<dyn Stream>;

/// How long written bytes may stay unacknowledged by the peer's TCP before the kernel ends the
/// connection (`TCP_USER_TIMEOUT`): what detects a dead link while reading is paused.
pub fn user_timeout(keepalive: Duration) -> Duration {
    (keepalive + keepalive / 2).max(Duration::from_secs(2))
}

/// Opens the transport `config` asks for; MQTT's CONNECT is the caller's.
pub async fn connect(config: &SessionConfig) -> Result<BoxStream, SessionError> {
    let tcp = TcpStream::connect((config.host.as_str(), config.port))
        .await
        .map_err(|e| describe_io(config, &e).0)?;
    let _ = tcp.set_nodelay(true);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let socket = socket2::SockRef::from(&tcp);
        if let Err(e) = socket.set_tcp_user_timeout(Some(user_timeout(config.keepalive))) {
            log::debug!("TCP_USER_TIMEOUT not set: {e}");
        }
    }
    match config.transport {
        Transport::Mqtt => Ok(Box::new(tcp)),
        Transport::Mqtts => Ok(Box::new(tls_stream(config, tcp).await?)),
        Transport::Ws => websocket(config, tcp).await,
        Transport::Wss => {
            let tls = tls_stream(config, tcp).await?;
            websocket(config, tls).await
        }
    }
}

async fn tls_stream(
    config: &SessionConfig,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, SessionError> {
    let client = tls::client_config(&config.tls).map_err(SessionError::Connect)?;
    let name = rustls::pki_types::ServerName::try_from(config.host.clone()).map_err(|e| {
        SessionError::Connect(format!(
            "{:?} is not a valid TLS server name: {e}",
            config.host
        ))
    })?;
    tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .map_err(|e| tls_error(config, &e))
}

fn tls_error(config: &SessionConfig, e: &std::io::Error) -> SessionError {
    let address = config.address();
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let hint = match rustls_error {
        Some(rustls::Error::InvalidCertificate(certificate)) => certificate_hint(certificate),
        Some(rustls::Error::InvalidMessage(_)) => {
            "; the server did not answer in TLS: is this a TLS port? For plain MQTT use transport=\"mqtt\" \
             (port 1883)"
        }
        None if matches!(
            e.kind(),
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
        ) =>
        {
            "; the server hung up during the TLS handshake: is this a TLS port? For plain MQTT use \
             transport=\"mqtt\" (port 1883)"
        }
        _ => "",
    };
    SessionError::Connect(format!("TLS with {address} failed: {e}{hint}"))
}

/// What to do about a certificate the client refused.
fn certificate_hint(error: &rustls::CertificateError) -> &'static str {
    use rustls::CertificateError as C;
    match error {
        C::UnknownIssuer => {
            "; the broker's certificate is signed by a CA this machine does not trust: pass its CA with \
             ca_file= (or ca_pem=)"
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "; the certificate does not name this host: connect with the host name the certificate was \
             issued for (an IP address works only when the certificate lists it)"
        }
        C::Expired | C::ExpiredContext { .. } => {
            "; the broker's certificate has expired (or this machine's clock is wrong): the broker needs a \
             new certificate"
        }
        C::NotValidYet | C::NotValidYetContext { .. } => {
            "; the broker's certificate is not valid yet: check this machine's clock"
        }
        _ => "; the broker's certificate was refused: check ca_file= and the host name",
    }
}

async fn websocket<S>(config: &SessionConfig, stream: S) -> Result<BoxStream, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use async_tungstenite::tungstenite::client::IntoClientRequest;
    let scheme = if config.transport == Transport::Wss {
        "wss"
    } else {
        "ws"
    };
    let host = if config.host.contains(':') {
        format!("[{}]", config.host)
    } else {
        config.host.clone()
    };
    let path = if config.path.starts_with('/') {
        config.path.clone()
    } else {
        format!("/{}", config.path)
    };
    let url = format!("{scheme}://{host}:{}{path}", config.port);
    let mut request = url.as_str().into_client_request().map_err(|e| {
        SessionError::Connect(format!("{url:?} is not a valid WebSocket address: {e}"))
    })?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        async_tungstenite::tungstenite::http::HeaderValue::from_static("mqtt"),
    );
    let (socket, response) = async_tungstenite::tokio::client_async(request, stream)
        .await
        .map_err(|e| websocket_error(config, &e))?;
    let protocol = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok());
    if protocol != Some("mqtt") {
        return Err(SessionError::Connect(format!(
            "the WebSocket server at {} did not accept the \"mqtt\" subprotocol (it answered {protocol:?}): is this an MQTT WebSocket endpoint?",
            config.address()
        )));
    }
    Ok(Box::new(ws_stream_tungstenite::WsStream::new(socket)))
}

fn websocket_error(
    config: &SessionConfig,
    e: &async_tungstenite::tungstenite::Error,
) -> SessionError {
    use async_tungstenite::tungstenite::Error;
    let address = config.address();
    match e {
        Error::Http(response) => SessionError::Connect(format!(
            "the WebSocket upgrade at {address} was answered with HTTP {}: is the path {:?} right? (Capture's is /mqtt)",
            response.status(),
            config.path
        )),
        Error::Io(io) => describe_io(config, io).0,
        other => SessionError::Connect(format!("WebSocket to {address} failed: {other}")),
    }
}

/// What an I/O error means for the user, and whether the broker hung up on us.
pub fn describe_io(config: &SessionConfig, e: &std::io::Error) -> (SessionError, bool) {
    let address = config.address();
    let text = e.to_string();
    match e.kind() {
        ErrorKind::ConnectionRefused => (
            SessionError::Connect(format!(
                "connection refused by {address}: is the broker running, and are the host, port and transport right?"
            )),
            false,
        ),
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => (
            SessionError::Connect(format!("the broker at {address} closed the connection ({e})")),
            true,
        ),
        ErrorKind::TimedOut => (
            SessionError::Connect(format!(
                "the connection to {address} timed out: the network or the broker stopped answering ({e})"
            )),
            false,
        ),
        _ if text.contains("lookup") || text.contains("resolve") || text.contains("Name or service") => (
            SessionError::Connect(format!(
                "the host name {:?} could not be resolved (DNS): {e}",
                config.host
            )),
            false,
        ),
        _ => (
            SessionError::Connect(format!("connection to {address} failed: {text}")),
            false,
        ),
    }
}
