//! How to reach the broker and how to behave there: everything a `Session` is started with.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// How bytes reach the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// MQTT over TLS (Capture's recommended port 8883).
    Mqtts,
    /// MQTT over secure WebSocket (Capture: ports 443 and 8084, path `/mqtt`).
    Wss,
    /// Plain MQTT over TCP, for local brokers.
    Mqtt,
    /// Plain WebSocket, for local brokers.
    Ws,
}

impl Transport {
    pub fn parse(name: &str) -> Option<Transport> {
        match name.to_ascii_lowercase().as_str() {
            "mqtts" | "ssl" | "tls" => Some(Transport::Mqtts),
            "wss" => Some(Transport::Wss),
            "mqtt" | "tcp" => Some(Transport::Mqtt),
            "ws" => Some(Transport::Ws),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Transport::Mqtts => "mqtts",
            Transport::Wss => "wss",
            Transport::Mqtt => "mqtt",
            Transport::Ws => "ws",
        }
    }
    /// The port used when none is given: 8883, 443, 1883, 80.
    pub fn default_port(self) -> u16 {
        match self {
            Transport::Mqtts => 8883,
            Transport::Wss => 443,
            Transport::Mqtt => 1883,
            Transport::Ws => 80,
        }
    }
    pub fn is_tls(self) -> bool {
        matches!(self, Transport::Mqtts | Transport::Wss)
    }
    pub fn is_websocket(self) -> bool {
        matches!(self, Transport::Wss | Transport::Ws)
    }
}

/// A secret (password, token) that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// What the client logs in with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

pub use crate::scope::{AccountKind, Scope};

pub type CredentialsFuture = Pin<Box<dyn Future<Output = Result<Credentials, String>> + Send>>;

/// Supplies credentials before every connect and reconnect (a JWT provider returns a fresh token).
pub trait CredentialsProvider: Send + Sync {
    fn credentials(&self) -> CredentialsFuture;
    /// When the current credentials stop being valid (a JWT's `exp`), as seconds since the epoch.
    fn expires_at(&self) -> Option<i64> {
        None
    }
}

/// Fixed credentials.
pub struct StaticCredentials(pub Credentials);

impl CredentialsProvider for StaticCredentials {
    fn credentials(&self) -> CredentialsFuture {
        let credentials = self.0.clone();
        Box::pin(async move { Ok(credentials) })
    }
}

/// Waiting between reconnect attempts: exponential from `min_delay` to `max_delay`, each delay
/// multiplied by a random factor in `[1 - jitter, 1 + jitter]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reconnect {
    pub enabled: bool,
    pub min_delay: Duration,
    pub max_delay: Duration,
    pub jitter: f64,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            enabled: true,
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            jitter: 0.2,
        }
    }
}

impl Reconnect {
    /// The delay before attempt `attempt` (1-based), with jitter from `unit` in `[0, 1)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        let base = self.min_delay.as_secs_f64() * f64::from(1u32 << exponent.min(20));
        let capped = base.min(self.max_delay.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 - jitter + 2.0 * jitter * unit.clamp(0.0, 1.0);
        Duration::from_secs_f64(
            (capped * factor).min(self.max_delay.as_secs_f64() * (1.0 + jitter)),
        )
    }
}

/// What a publish does when the client is offline and its offline queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflinePolicy {
    /// Wait for room (the queue empties once the connection is back).
    Block,
    /// Fail at once with `QueueFull`.
    Raise,
    /// Drop the oldest queued message (its waiter fails with `QueueFull`), counted.
    DropOldest,
}

impl OfflinePolicy {
    pub fn parse(name: &str) -> Option<OfflinePolicy> {
        match name {
            "block" => Some(OfflinePolicy::Block),
            "raise" => Some(OfflinePolicy::Raise),
            "drop_oldest" => Some(OfflinePolicy::DropOldest),
            _ => None,
        }
    }
}

/// The MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V311,
    V5,
}

/// TLS trust: the system's roots, plus extra CAs, or no verification at all when asked.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Extra trusted CA certificates, PEM text (one or more certificates each).
    pub extra_ca_pem: Vec<Vec<u8>>,
    /// Skip verifying the broker's certificate and host name. Logged as a warning.
    pub insecure: bool,
}

/// Everything a session is started with.
#[derive(Clone)]
pub struct SessionConfig {
    pub host: String,
    pub port: u16,
    pub transport: Transport,
    /// The WebSocket path (`/mqtt` for Capture).
    pub path: String,
    pub tls: TlsOptions,
    pub client_id: String,
    pub clean_session: bool,
    pub keepalive: Duration,
    pub reconnect: Reconnect,
    pub connect_timeout: Duration,
    pub protocol: Protocol,
    pub credentials: Option<Arc<dyn CredentialsProvider>>,
    /// Who the credentials belong to (for error messages), e.g. the username.
    pub account_name: String,
    pub account_kind: AccountKind,
    /// What the account may subscribe to and publish to, checked before anything is sent.
    pub scope: Scope,
    /// A durable outbox: QoS 1/2 publishes are kept on disk until acknowledged, and what an earlier
    /// process left there is sent first. It then bounds the publishes waiting (by bytes) instead of
    /// `offline_capacity`.
    pub durable: Option<std::sync::Arc<crate::outbox::DurableOutbox>>,
    /// Largest packet sent or received: Capture's 1 MB by default (the broker's own limit under MQTT 5 when smaller).
    pub max_packet_size: usize,
    /// Most unacknowledged QoS 1/2 publishes at once.
    pub inflight: u16,
    /// How many publishes wait while offline, and what happens beyond that.
    pub offline_capacity: usize,
    pub offline_policy: OfflinePolicy,
}

impl fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("transport", &self.transport)
            .field("client_id", &self.client_id)
            .field("account_name", &self.account_name)
            .finish_non_exhaustive()
    }
}

impl SessionConfig {
    /// A configuration with the SDK's defaults for `host` over `transport`.
    pub fn new(host: impl Into<String>, transport: Transport) -> Self {
        SessionConfig {
            host: host.into(),
            port: transport.default_port(),
            transport,
            path: "/mqtt".to_owned(),
            tls: TlsOptions::default(),
            client_id: random_client_id(),
            clean_session: true,
            keepalive: Duration::from_secs(30),
            reconnect: Reconnect::default(),
            connect_timeout: Duration::from_secs(10),
            protocol: Protocol::V311,
            credentials: None,
            account_name: String::new(),
            account_kind: AccountKind::Unknown,
            scope: Scope::Open,
            durable: None,
            max_packet_size: 1024 * 1024,
            inflight: 512,
            offline_capacity: 10_000,
            offline_policy: OfflinePolicy::Block,
        }
    }

    /// Where the client connects, without credentials: `mqtts://host:8883`, `wss://host:443/mqtt`.
    pub fn address(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.transport.is_websocket() {
            let path = if self.path.starts_with('/') {
                self.path.clone()
            } else {
                format!("/{}", self.path)
            };
            format!("{}://{host}:{}{path}", self.transport.name(), self.port)
        } else {
            format!("{}://{host}:{}", self.transport.name(), self.port)
        }
    }
}

/// A client id with a recognisable prefix: `capture-mqtt-` and 12 random hex digits.
pub fn random_client_id() -> String {
    format!(
        "capture-mqtt-{:012x}",
        rand::random::<u64>() & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_show() {
        let credentials = Credentials {
            username: "alice".into(),
            password: Secret::new("hunter2"),
        };
        let shown = format!("{credentials:?}");
        assert!(shown.contains("alice"));
        assert!(!shown.contains("hunter2"));
    }

    #[test]
    fn backoff_grows_is_bounded_and_jittered() {
        let policy = Reconnect {
            enabled: true,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            jitter: 0.5,
        };
        assert_eq!(policy.delay(1, 0.5), Duration::from_millis(100));
        assert_eq!(policy.delay(2, 0.5), Duration::from_millis(200));
        assert_eq!(policy.delay(4, 0.5), Duration::from_millis(800));
        assert_eq!(policy.delay(50, 0.5), Duration::from_secs(2));
        assert_eq!(policy.delay(1, 0.0), Duration::from_millis(50));
        assert_eq!(policy.delay(1, 1.0), Duration::from_millis(150));
        assert!(policy.delay(50, 1.0) <= Duration::from_secs(3));
    }

    #[test]
    fn addresses_and_defaults() {
        let mut config = SessionConfig::new("broker.example", Transport::Wss);
        assert_eq!(config.address(), "wss://broker.example:443/mqtt");
        config.port = 8084;
        assert_eq!(config.address(), "wss://broker.example:8084/mqtt");
        assert_eq!(
            SessionConfig::new("h", Transport::Mqtts).address(),
            "mqtts://h:8883"
        );
        assert_eq!(
            SessionConfig::new("::1", Transport::Mqtt).address(),
            "mqtt://[::1]:1883"
        );
        assert!(config.client_id.starts_with("capture-mqtt-"));
        assert_ne!(random_client_id(), random_client_id());
        assert_eq!(Transport::parse("WSS"), Some(Transport::Wss));
        assert_eq!(Transport::parse("http"), None);
    }
}
