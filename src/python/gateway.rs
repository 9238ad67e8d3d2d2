//! `_Gateway`: the Capture gateway of the local emulator (`capture_mqtt.testing`), over
//! `crate::gateway`.

use crate::gateway::{Deny, Gateway, GatewayConfig, CAPTURE_SESSION_EXPIRY};
use crate::scope::{AccountKind, Scope};
use crate::session;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[pyclass(module = "capture_mqtt._core", name = "_Gateway", frozen)]
pub struct PyGateway {
    gateway: Gateway,
}

#[pymethods]
impl PyGateway {
    /// Listens on 127.0.0.1 (a free port unless `port` is given) and forwards to Mosquitto on
    /// 127.0.0.1:`upstream_port`; packets over `max_packet` bytes (0: no limit) are refused; an
    /// MQTT 3.1.1 persistent session expires `session_expiry` seconds after its client left (None:
    /// Capture's two hours); a subscribe or publish outside an account's scope closes the
    /// connection (`deny="disconnect"`) or gets a failure code (`deny="reason_code"`).
    #[new]
    #[pyo3(signature = (upstream_port, *, max_packet, port = 0, session_expiry = None, deny = "disconnect"))]
    fn new(
        py: Python<'_>,
        upstream_port: u16,
        max_packet: usize,
        port: u16,
        session_expiry: Option<f64>,
        deny: &str,
    ) -> PyResult<Self> {
        let deny = match deny {
            "disconnect" => Deny::Disconnect,
            "reason_code" => Deny::ReasonCode,
            other => {
                return Err(PyValueError::new_err(format!(
                    "deny must be \"disconnect\" or \"reason_code\", not {other:?}"
                )))
            }
        };
        let session_expiry = match session_expiry {
            None => CAPTURE_SESSION_EXPIRY,
            Some(seconds) => Duration::try_from_secs_f64(seconds).map_err(|_| {
                PyValueError::new_err(format!(
                    "session_expiry must be a number of seconds >= 0, not {seconds}"
                ))
            })?,
        };
        let config = GatewayConfig {
            session_expiry,
            deny,
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream_port)),
            max_packet: if max_packet == 0 {
                usize::MAX
            } else {
                max_packet
            },
        };
        let listen = SocketAddr::from(([127, 0, 0, 1], port));
        let gateway = super::detach(py, || {
            session::runtime().block_on(async move { Gateway::start(listen, config).await })
        })
        .map_err(|e| PyOSError::new_err(format!("the gateway could not listen: {e}")))?;
        Ok(PyGateway { gateway })
    }

    #[getter]
    fn port(&self) -> u16 {
        self.gateway.addr().port()
    }

    /// Adds a listener on 127.0.0.1 (a free port unless `port` is given) that ends TLS with the
    /// server's certificate chain and key (PEM): MQTT over TLS, or with `websocket` MQTT over
    /// WebSocket over TLS (the path `/mqtt`, an MQTT subprotocol). Returns its port.
    #[pyo3(signature = (cert_pem, key_pem, *, websocket = false, port = 0))]
    fn listen_tls(
        &self,
        py: Python<'_>,
        cert_pem: &[u8],
        key_pem: &[u8],
        websocket: bool,
        port: u16,
    ) -> PyResult<u16> {
        let listen = SocketAddr::from(([127, 0, 0, 1], port));
        let gateway = &self.gateway;
        super::detach(py, || {
            session::runtime().block_on(async {
                gateway
                    .listen_tls(listen, cert_pem, key_pem, websocket)
                    .await
            })
        })
        .map(|addr| addr.port())
        .map_err(PyOSError::new_err)
    }

    /// Adds a listener on 127.0.0.1 for MQTT over plain WebSocket (the path `/mqtt`, an MQTT
    /// subprotocol); returns its port.
    #[pyo3(signature = (*, port = 0))]
    fn listen_websocket(&self, py: Python<'_>, port: u16) -> PyResult<u16> {
        let listen = SocketAddr::from(([127, 0, 0, 1], port));
        let gateway = &self.gateway;
        super::detach(py, || {
            session::runtime().block_on(async { gateway.listen_websocket(listen).await })
        })
        .map(|addr| addr.port())
        .map_err(PyOSError::new_err)
    }

    /// `username` logs in with JWTs signed (HS256) with `key`, checked by the gateway (signature,
    /// `sub`, `exp`, `nbf`); the broker is given `broker_password` instead of the token.
    fn set_jwt_login(&self, username: &str, key: &[u8], broker_password: &str) {
        self.gateway.set_jwt_login(username, key, broker_password);
    }

    /// The scope of the account that logs in as `username`: kind "user" (with its company) or
    /// "source" (with its source id, and its company: that company's users may command it).
    #[pyo3(signature = (username, kind, *, company = None, source_id = None))]
    fn set_account(
        &self,
        username: &str,
        kind: &str,
        company: Option<&str>,
        source_id: Option<&str>,
    ) -> PyResult<()> {
        let kind = match kind {
            "user" => AccountKind::User,
            "source" => AccountKind::Source,
            other => {
                return Err(PyValueError::new_err(format!(
                    "kind must be \"user\" or \"source\", not {other:?}"
                )))
            }
        };
        if let (AccountKind::Source, Some(source_id), Some(company)) = (kind, source_id, company) {
            self.gateway.set_source_owner(source_id, company);
        }
        let company = if kind == AccountKind::Source {
            None
        } else {
            company
        };
        self.gateway
            .set_account(username, Scope::new(kind, company, source_id));
        Ok(())
    }

    fn remove_account(&self, username: &str) {
        self.gateway.remove_account(username);
    }

    fn set_latency(&self, seconds: f64) {
        self.gateway
            .set_latency(Duration::from_secs_f64(seconds.max(0.0)));
    }

    fn set_stalled(&self, stalled: bool) {
        self.gateway.set_stalled(stalled);
    }

    fn drop_connections(&self) {
        self.gateway.drop_connections();
    }

    fn set_partitioned(&self, partitioned: bool) {
        self.gateway.set_partitioned(partitioned);
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = self.gateway.stats();
        let dict = PyDict::new(py);
        dict.set_item("connections", stats.connections.load(Ordering::Relaxed))?;
        dict.set_item("refused_scope", stats.refused_scope.load(Ordering::Relaxed))?;
        dict.set_item("refused_size", stats.refused_size.load(Ordering::Relaxed))?;
        dict.set_item("refused_login", stats.refused_login.load(Ordering::Relaxed))?;
        dict.set_item(
            "expired_logins",
            stats.expired_logins.load(Ordering::Relaxed),
        )?;
        dict.set_item("taken_over", stats.taken_over.load(Ordering::Relaxed))?;
        dict.set_item(
            "expired_sessions",
            stats.expired_sessions.load(Ordering::Relaxed),
        )?;
        dict.set_item("dropped", stats.dropped.load(Ordering::Relaxed))?;
        Ok(dict)
    }

    fn stop(&self) {
        self.gateway.stop();
    }
}
