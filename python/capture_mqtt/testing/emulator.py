"""``CaptureEmulator``: a local broker that behaves like Capture's, for trying the SDK and for tests.

A real Mosquitto on free 127.0.0.1 ports with Capture's listeners (MQTT over TLS, WebSocket over TLS
on ``/mqtt``, and plain MQTT), a CA made for it, accounts the way Capture has them (users, API tokens,
JWT users, sources) with Capture's scopes, and Capture's server side: every push a source makes to
``data/read`` is republished on the company's raw tree by the SDK's own Rust codec.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import capture_mqtt as cm
from capture_mqtt import _core

from .mosquitto import CAPTURE_LIMITS, UNLIMITED, Access, Account, BrokerLimits, Mosquitto

__all__ = ["ApiToken", "CaptureEmulator", "Company", "JwtUser", "Source", "User"]

log = logging.getLogger("capture_mqtt.testing")

Transport = Literal["mqtts", "wss", "mqtt", "ws"]
_LIVE: weakref.WeakSet[CaptureEmulator] = weakref.WeakSet()
# Every password, token value and JWT any emulator in this process made, so that a test suite can
# check that none of them shows in its logs (capture-mqtt's own suite does).
ISSUED_SECRETS: list[str] = []


@atexit.register
def _stop_all_at_exit() -> None:
    for emulator in list(_LIVE):
        with contextlib.suppress(Exception):
            emulator.stop()


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in "/+#\0"):
        raise ValueError(f"invalid {what} {value!r}: give a non-empty name without '/', '+', '#' or NUL")
    return value


def _secret() -> str:
    secret = base64.urlsafe_b64encode(os.urandom(18)).decode()
    ISSUED_SECRETS.append(secret)
    return secret


@dataclass(frozen=True)
class Company:
    """A tenant on the emulator. Its name is the third segment of its raw topics."""

    name: str
    emulator: CaptureEmulator = field(repr=False, compare=False)

    @property
    def raw_filter(self) -> str:
        """The filter for the company's whole raw tree (``v1/raw/<name>/+/+/+/#``)."""
        return cm.raw_filter(self.name)


@dataclass(frozen=True)
class _Account:
    company: Company
    username: str
    password: str = field(repr=False)

    @property
    def emulator(self) -> CaptureEmulator:
        return self.company.emulator

    def client_options(self, transport: Transport = "mqtts") -> dict[str, Any]:
        """Keyword arguments for ``cm.Client(**options)`` (host included) on the given transport:
        host, port, transport, the emulator's CA, the credentials and the company.

        >>> import capture_mqtt as cm
        >>> from capture_mqtt.testing import CaptureEmulator
        >>> with CaptureEmulator() as emu:
        ...     alice = emu.add_user(emu.add_company("AcmeCorp"), "alice")
        ...     with cm.Client(**alice.client_options("mqtt")) as client:
        ...         client.company, client.is_connected
        ('AcmeCorp', True)
        """
        options = self.emulator.connection_options(transport)
        options.update(username=self.username, password=self.password, company=self.company.name)
        return options

    def env(self, transport: Transport = "mqtts") -> dict[str, str]:
        """The environment variables ``cm.Client.from_env()`` and the ``capture-mqtt`` CLI read."""
        options = self.emulator.connection_options(transport)
        env = {
            "CAPTURE_MQTT_HOST": options["host"],
            "CAPTURE_MQTT_PORT": str(options["port"]),
            "CAPTURE_MQTT_TRANSPORT": transport,
            "CAPTURE_MQTT_USERNAME": self.username,
            "CAPTURE_MQTT_PASSWORD": self.password,
            "CAPTURE_MQTT_COMPANY": self.company.name,
        }
        if transport in ("mqtts", "wss"):
            env["CAPTURE_MQTT_CA_FILE"] = str(self.emulator.ca_file)
        if transport in ("ws", "wss"):
            env["CAPTURE_MQTT_PATH"] = "/mqtt"
        return env


@dataclass(frozen=True)
class User(_Account):
    """A Capture user with a username and a password: reads its company's raw tree and sends
    commands to its company's sources."""

    kind: Literal["user"] = "user"


@dataclass(frozen=True)
class ApiToken(_Account):
    """An API token: its id (a GUID) is the username and its value the password; it acts as a user."""

    kind: Literal["api_token"] = "api_token"

    @property
    def token_id(self) -> str:
        """The token's id (a GUID)."""
        return self.username

    @property
    def token_value(self) -> str:
        """The token's secret value."""
        return self.password


@dataclass(frozen=True)
class JwtUser(_Account):
    """A user who logs in to the broker with a JWT, as issued by Capture's Auth API: ``password`` is
    the portal login, given to ``cm.fetch_jwt(username, password, base_url=emu.portal_url)`` or traded
    by :meth:`token`. Only the most recently issued token is accepted (a new one retires the old)."""

    kind: Literal["jwt_user"] = "jwt_user"

    def token(self, valid_for: float = 7200.0) -> str:
        """Issues a fresh token (two hours by default, like Capture's) and makes it the valid one."""
        return self.emulator.issue_jwt(self, valid_for=valid_for)

    def client_options(self, transport: Transport = "mqtts") -> dict[str, Any]:
        """Options for ``cm.Client(**options)`` with ``auth=cm.Auth.jwt(username, self.token)``: every
        (re)connect asks the emulator for a fresh token."""
        options = super().client_options(transport)
        del options["username"], options["password"]
        options["auth"] = cm.Auth.jwt(self.username, self.token)
        return options

    def env(self, transport: Transport = "mqtts") -> dict[str, str]:
        """Environment variables with a freshly issued token as the password."""
        env = super().env(transport)
        env["CAPTURE_MQTT_PASSWORD"] = self.token()
        return env


@dataclass(frozen=True)
class Source(_Account):
    """A source (device): its id is a GUID, it pushes to and listens under ``v1/sources/<id>/`` only.
    ``auth_config_path`` is its auth config file, as downloaded from the portal."""

    kind: Literal["source"] = "source"
    auth_config_path: Path = field(default=Path(), repr=False)

    @property
    def source_id(self) -> str:
        """The source's GUID (also its username)."""
        return self.username

    def client_options(self, transport: Transport = "mqtts") -> dict[str, Any]:
        """Keyword arguments for ``cm.SourceClient(**options)``."""
        options = self.emulator.connection_options(transport)
        options.update(source_id=self.source_id, password=self.password)
        return options

    def env(self, transport: Transport = "mqtts") -> dict[str, str]:
        """Environment variables for ``cm.SourceClient.from_env()`` and the CLI's ``push``."""
        env = super().env(transport)
        env.pop("CAPTURE_MQTT_COMPANY", None)
        return env


class _PortalServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, emulator: CaptureEmulator) -> None:
        self.emulator = emulator
        super().__init__((emulator.host, 0), _Portal)


class _Portal(BaseHTTPRequestHandler):
    """Capture's Auth API: POST /Auth with AuthVersion V0.0.1 and a JSON login; the bare token."""

    server: _PortalServer

    def do_POST(self) -> None:
        if self.path.rstrip("/").lower() != "/auth" or self.headers.get("AuthVersion") != "V0.0.1":
            self._answer(404, "use POST /Auth with the header AuthVersion: V0.0.1")
            return
        try:
            login = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            token = self.server.emulator._login(str(login["Username"]), str(login["Password"]))
        except (ValueError, KeyError, TypeError):
            self._answer(400, "expected a JSON body with Username and Password")
            return
        if token is None:
            self._answer(401, "unknown user or wrong password")
        else:
            self._answer(200, token)

    def _answer(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Requests are not logged: their lines would carry nothing useful and might carry secrets.
        return


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Faults:
    """Network faults between clients and the emulator's broker, for tests of what a program does on
    a flaky network. They apply in Capture's gateway, so to every client connection (MQTT over TLS,
    WebSocket over TLS and plain MQTT); Capture's server side is not affected.

    >>> import capture_mqtt as cm
    >>> from capture_mqtt.testing import CaptureEmulator, wait_until
    >>> with CaptureEmulator() as emu:
    ...     alice = emu.add_user(emu.add_company("AcmeCorp"), "alice")
    ...     with emu.client(alice, transport="mqtt", reconnect=cm.Reconnect(0.05, 0.2)) as client:
    ...         with emu.faults.partition():
    ...             _ = wait_until(lambda: not client.is_connected, timeout=5)
    ...         _ = wait_until(lambda: client.is_connected, timeout=10)
    ...         client.stats["reconnects"] >= 1
    True
    """

    def __init__(self, emulator: CaptureEmulator) -> None:
        self._emulator = emulator
        self._timers: list[threading.Timer] = []
        self._stalls = 0

    def _gateway(self) -> _core._Gateway:
        gateway = self._emulator._gateway
        if gateway is None:
            raise RuntimeError("the emulator is not running: call start() or use it in a with block")
        return gateway

    def latency(self, ms: float) -> None:
        """Delays all traffic, both ways, by ``ms`` milliseconds per chunk; ``latency(0)`` ends it."""
        self._gateway().set_latency(max(0.0, ms) / 1000)

    def stall(self, seconds: float) -> None:
        """Holds all traffic, both ways, for ``seconds`` (the connections stay open, as behind a
        congested link: keepalives go unanswered); returns at once."""
        gateway = self._gateway()
        self._stalls += 1
        stall = self._stalls

        def end() -> None:
            if stall == self._stalls:  # a later stall() runs on
                gateway.set_stalled(False)

        gateway.set_stalled(True)
        timer = threading.Timer(seconds, end)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def drop_connections(self) -> None:
        """Closes every client connection now; clients reconnect as after any lost connection."""
        self._gateway().drop_connections()

    @contextlib.contextmanager
    def partition(self) -> Iterator[None]:
        """Inside the block, every connection is dropped and new ones are refused."""
        gateway = self._gateway()
        gateway.set_partitioned(True)
        try:
            yield
        finally:
            gateway.set_partitioned(False)

    def _end(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()


class CaptureEmulator:
    """A local Capture: Mosquitto with Capture's listeners, accounts and scopes, and Capture's
    republishing of pushes onto the raw tree. Stop it with :meth:`stop` or a ``with`` block (it is
    also stopped at interpreter exit).

    Clients meet Capture's gateway, not Mosquitto:

    - a subscribe or publish outside the account's scope, or a packet over 1 MB, closes the
      connection (DISCONNECT 0x87 or 0x95 first under MQTT 5), as Capture's page says.
      ``deny="reason_code"`` gives EMQX's other mode instead: a denied filter gets SUBACK 0x80
      (0x87 under MQTT 5), a denied QoS 1 publish PUBACK 0x87 under MQTT 5 and a plain PUBACK
      under 3.1.1, a denied QoS 0 publish is dropped;
    - a JWT is checked by signature and ``exp`` at login, and the connection is closed when it
      expires;
    - a second connection with a client id takes the session over (DISCONNECT 0x8E to the first
      under MQTT 5);
    - an MQTT 3.1.1 persistent session ends ``session_expiry`` seconds after its client left
      (Capture's two hours by default).

    ``limits="capture"`` (the default) gives the broker Capture's limits: 32 messages in flight
    and 1,000 queued per client. Where a client's queue is full, Mosquitto drops the newest
    message and Capture (EMQX) the oldest. ``limits="unbounded"`` lifts them, for benchmarks.

    >>> import capture_mqtt as cm
    >>> from capture_mqtt.testing import CaptureEmulator
    >>> with CaptureEmulator() as emu:
    ...     acme = emu.add_company("AcmeCorp")
    ...     alice, source = emu.add_user(acme, "alice"), emu.add_source(acme)
    ...     with emu.client(alice) as client, client.subscribe_raw(qos=1) as sub:
    ...         with emu.source_client(source) as device:
    ...             _ = device.push("PLC", "Monitoring", {"CPU_Temp": 55})
    ...         point = sub.get(timeout=10)
    >>> point.measurement, point.key, point.value, point.tags["Connection_Tag"]
    ('Monitoring', 'CPU_Temp', 55, 'PLC')
    """

    def __init__(
        self,
        *,
        websockets: bool = True,
        persistence: bool = False,
        limits: BrokerLimits | Literal["capture", "unbounded"] = "capture",
        session_expiry: float = 7200.0,
        deny: Literal["disconnect", "reason_code"] = "disconnect",
    ) -> None:
        if deny not in ("disconnect", "reason_code"):
            raise ValueError(f'deny must be "disconnect" or "reason_code", not {deny!r}')
        self._deny = deny
        if isinstance(limits, str):
            if limits not in ("capture", "unbounded"):
                raise ValueError(f'limits must be "capture", "unbounded" or a BrokerLimits, not {limits!r}')
            limits = CAPTURE_LIMITS if limits == "capture" else UNLIMITED
        if not isinstance(session_expiry, int | float) or session_expiry < 0:
            raise ValueError(f"session_expiry must be a number of seconds >= 0, not {session_expiry!r}")
        self._session_expiry = float(session_expiry)
        self._lock = threading.RLock()
        self._companies: dict[str, Company] = {}
        self._accounts: dict[str, _Account] = {}
        self._source_company: dict[str, str] = {}
        self._jwt_key = os.urandom(32)
        self._pipeline_account = Account(
            f"capture-pipeline-{os.urandom(4).hex()}",
            _secret(),
            [("read", "v1/sources/+/data/read/#"), ("write", "v1/raw/#")],
        )
        self.broker = Mosquitto(
            accounts=[self._pipeline_account],
            tls=True,
            websockets=websockets,
            persistence=persistence,
            limits=limits,
        )
        self._pipeline: cm.Client | None = None
        self._gateway: _core._Gateway | None = None
        self._gateway_tls_port = 0
        self._gateway_wss_port = 0
        self._gateway_ws_port = 0
        # What the broker knows as each JWT user's password: the gateway checks the tokens.
        self._jwt_broker_passwords: dict[str, str] = {}
        self.faults = Faults(self)
        self._clients: weakref.WeakSet[cm.Client] = weakref.WeakSet()
        self._counts = {"republished_pushes": 0, "raw_messages": 0, "rejected_pushes": 0}
        self._portal: _PortalServer | None = None

    # Lifecycle

    def start(self) -> Self:
        """Starts the broker and Capture's server side; returns once both are ready."""
        self.broker.start()
        if self._gateway is None:
            # Clients of the plain MQTT listener meet Capture's gateway: scopes and packet size
            # enforced by disconnecting, faults on demand. Capture's server side goes straight in.
            self._gateway = _core._Gateway(
                self.broker.mqtt_port,
                max_packet=self.broker.limits.max_packet_size,
                session_expiry=self._session_expiry,
                deny=self._deny,
            )
            tls = self.broker.tls
            assert tls is not None  # the emulator's broker always has TLS
            self._gateway_tls_port = self._gateway.listen_tls(tls.cert_pem, tls.key_pem)
            if self.broker.wss_port is not None:
                self._gateway_wss_port = self._gateway.listen_tls(tls.cert_pem, tls.key_pem, websocket=True)
                self._gateway_ws_port = self._gateway.listen_websocket()
            for account in self._accounts.values():
                self._gateway_account(account)
        if self._pipeline is None:
            # With persistence, Capture's server side keeps a persistent session too, so that pushes
            # survive a broker restart on their way to the raw tree.
            pipeline = cm.Client(
                self.broker.host,
                transport="mqtt",
                port=self.broker.mqtt_port,
                username=self._pipeline_account.username,
                password=self._pipeline_account.password,
                client_id=f"{self._pipeline_account.username}-server-side",
                clean_session=not self.broker.persistence,
                reconnect=cm.Reconnect(min_delay=0.05, max_delay=1.0),
                account_kind="unknown",
                max_queued=1_000_000,
                connect=False,
            )
            pipeline.subscribe(
                "v1/sources/+/data/read/#", qos=1, callback=self._republish, queue_size=100_000, overflow="block"
            )
            self._pipeline = pipeline
            pipeline.connect()
        if self._portal is None:
            self._portal = _PortalServer(self)
            threading.Thread(target=self._portal.serve_forever, name="capture-emulator-portal", daemon=True).start()
        _LIVE.add(self)
        return self

    @property
    def portal_url(self) -> str:
        """The base URL of the emulator's Auth API, for ``cm.fetch_jwt(..., base_url=emu.portal_url)``."""
        if self._portal is None:
            raise RuntimeError("the emulator is not running: call start() or use it in a with block")
        return f"http://{self.host}:{self._portal.server_address[1]}"

    def _login(self, username: str, password: str) -> str | None:
        account = self._accounts.get(username)
        if isinstance(account, JwtUser) and hmac.compare_digest(account.password, password):
            return self.issue_jwt(account)
        return None

    def stop(self) -> None:
        """Closes every client it made, its server side and the broker, and deletes its files."""
        for client in list(self._clients):
            with contextlib.suppress(Exception):
                client.close()
        portal, self._portal = self._portal, None
        if portal is not None:
            portal.shutdown()
            portal.server_close()
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            with contextlib.suppress(Exception):
                pipeline.close()
        self.faults._end()
        gateway, self._gateway = self._gateway, None
        if gateway is not None:
            gateway.stop()
        self.broker.close()
        _LIVE.discard(self)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.broker.pid else "stopped"
        return (
            f"CaptureEmulator(mqtts=127.0.0.1:{self.mqtts_port}, wss=127.0.0.1:{self.wss_port}/mqtt, "
            f"mqtt=127.0.0.1:{self.mqtt_port}, companies={len(self._companies)}, {state})"
        )

    # Where to connect

    @property
    def host(self) -> str:
        """The broker's address (always 127.0.0.1)."""
        return self.broker.host

    @property
    def mqtts_port(self) -> int:
        """MQTT over TLS (Capture's 8883), through Capture's gateway (see :attr:`mqtt_port`)."""
        if self._gateway is not None:
            return self._gateway_tls_port
        assert self.broker.mqtts_port is not None
        return self.broker.mqtts_port

    @property
    def wss_port(self) -> int | None:
        """WebSocket over TLS, path ``/mqtt`` (Capture's 443 and 8084), through Capture's gateway:
        another path gets HTTP 404, a handshake without an MQTT subprotocol HTTP 400; None without
        websockets."""
        if self._gateway is not None and self.broker.wss_port is not None:
            return self._gateway_wss_port
        return self.broker.wss_port

    @property
    def ws_port(self) -> int | None:
        """WebSocket without TLS, path ``/mqtt``, through Capture's gateway (Capture itself has
        none: for tools that cannot do TLS); None without websockets."""
        if self._gateway is not None and self.broker.ws_port is not None:
            return self._gateway_ws_port
        return self.broker.ws_port

    @property
    def mqtt_port(self) -> int:
        """Plain MQTT (no TLS), for tools that cannot do TLS: through Capture's gateway, which
        disconnects a client that subscribes or publishes outside its account's scope or sends a
        packet over 1 MB, and where :attr:`faults` apply."""
        return self.broker.mqtt_port if self._gateway is None else self._gateway.port

    @property
    def ca_file(self) -> Path:
        """The CA that signed the broker's certificate (PEM), to trust with ``ca_file=``."""
        return self.broker.ca_file

    @property
    def ca_pem(self) -> bytes:
        """The same CA, as PEM bytes."""
        return self.broker.ca_file.read_bytes()

    def connection_options(self, transport: Transport = "mqtts") -> dict[str, Any]:
        """Host, port, transport and trust for ``cm.Client``, without credentials."""
        ports = {"mqtts": self.mqtts_port, "wss": self.wss_port, "mqtt": self.mqtt_port, "ws": self.ws_port}
        port = ports.get(transport)
        if port is None:
            raise ValueError(f"the emulator has no {transport!r} listener (websockets=False?)")
        options: dict[str, Any] = {"host": self.host, "transport": transport, "port": port}
        if transport in ("mqtts", "wss"):
            options["ca_pem"] = self.ca_pem
        if transport in ("ws", "wss"):
            options["path"] = "/mqtt"
        return options

    # Accounts

    def add_company(self, name: str) -> Company:
        """Adds a company (tenant); adding an existing name returns it."""
        _check_name("company name", name)
        with self._lock:
            return self._companies.setdefault(name, Company(name, self))

    def add_user(self, company: Company, name: str, password: str | None = None) -> User:
        """Adds a password account for a user of ``company`` (a random password unless given)."""
        _check_name("user name", name)
        if password:
            ISSUED_SECRETS.append(password)
        user = User(self._own(company), name, password or _secret())
        self._register(user)
        return user

    def add_api_token(self, company: Company) -> ApiToken:
        """Adds an API token of ``company``: a GUID and a secret value."""
        token = ApiToken(self._own(company), str(uuid.uuid4()), _secret())
        self._register(token)
        return token

    def add_jwt_user(self, company: Company, name: str) -> JwtUser:
        """Adds a user who logs in with tokens the emulator issues (see :meth:`JwtUser.token`)."""
        _check_name("user name", name)
        user = JwtUser(self._own(company), name, _secret())
        # The gateway checks the tokens (signature, subject, expiry) and logs in to the broker with
        # a password only it knows.
        broker_password = _secret()
        self._jwt_broker_passwords[user.username] = broker_password
        self._register(user, broker_password=broker_password)
        return user

    def add_source(self, company: Company, source_id: str | None = None) -> Source:
        """Adds a source (a GUID unless given) with its own credentials, and writes its auth config
        file (host, port, source id and secret) where ``source.auth_config_path`` says."""
        source_id = _check_name("source id", source_id or str(uuid.uuid4()))
        path = self.broker.workdir / f"auth-config-{source_id}.json"
        source = Source(self._own(company), source_id, _secret(), auth_config_path=path)
        config = {
            "SourceId": source_id,
            "Username": source_id,
            "Password": source.password,
            "Host": self.host,
            "Port": self.mqtts_port,
        }
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        with self._lock:
            self._source_company[source_id] = company.name
        self._register(source)
        return source

    def issue_jwt(self, user: JwtUser, *, valid_for: float = 7200.0) -> str:
        """A signed JWT (HS256) for ``user`` with Capture's two-hour lifetime. As on Capture, the
        broker checks its signature and ``exp`` at every login, earlier tokens stay valid until they
        expire, and a connection is closed when its token expires."""
        now = int(time.time())
        header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = {
            "sub": user.username,
            "company": user.company.name,
            "iat": now,
            "exp": now + int(valid_for),
            "jti": os.urandom(8).hex(),
        }
        body = _b64url(json.dumps(claims).encode())
        signature = _b64url(hmac.new(self._jwt_key, f"{header}.{body}".encode(), hashlib.sha256).digest())
        token = f"{header}.{body}.{signature}"
        ISSUED_SECRETS.append(token)
        return token

    def revoke(self, account: _Account) -> None:
        """Removes an account: it can no longer log in, and its connected clients are disconnected
        (the broker drops them when it reloads its accounts)."""
        with self._lock:
            self._accounts.pop(account.username, None)
            self._jwt_broker_passwords.pop(account.username, None)
            if self._gateway is not None:
                self._gateway.remove_account(account.username)
            self.broker.accounts = [a for a in self.broker.accounts if a.username != account.username]
            self._write_acls()
            self.broker.write_accounts()
            self.broker.reload()

    def _gateway_account(self, account: _Account) -> None:
        if self._gateway is None:
            return
        if isinstance(account, Source):
            self._gateway.set_account(
                account.username, "source", company=account.company.name, source_id=account.source_id
            )
        else:
            self._gateway.set_account(account.username, "user", company=account.company.name)
        broker_password = self._jwt_broker_passwords.get(account.username)
        if broker_password is not None:
            self._gateway.set_jwt_login(account.username, self._jwt_key, broker_password)

    def _own(self, company: Company) -> Company:
        if not isinstance(company, Company) or self._companies.get(company.name) is not company:
            raise ValueError(f"{company!r} is not a company of this emulator: make it with emu.add_company(name)")
        return company

    def _register(self, account: _Account, broker_password: str | None = None) -> None:
        with self._lock:
            if account.username in self._accounts or account.username == self._pipeline_account.username:
                raise ValueError(f"an account named {account.username!r} already exists on this emulator")
            self._accounts[account.username] = account
            self._gateway_account(account)
            self.broker.accounts.append(Account(account.username, broker_password or account.password))
            self._write_acls()
            self.broker.write_accounts()
            if self.broker.pid:
                self.broker.reload(until_accepted=(account.username, broker_password or account.password))

    def _write_acls(self) -> None:
        # Capture's scopes: a user reads its company's raw tree and writes commands to its company's
        # sources; a source reads and writes its own subtree.
        sources_of: dict[str, list[str]] = {}
        for source_id, company in self._source_company.items():
            sources_of.setdefault(company, []).append(source_id)
        for broker_account in self.broker.accounts:
            account = self._accounts.get(broker_account.username)
            if account is None:
                continue
            if isinstance(account, Source):
                broker_account.acl = [("readwrite", f"v1/sources/{account.source_id}/#")]
            else:
                company = account.company.name
                acl: list[tuple[Access, str]] = [("read", f"v1/raw/{company}/#")]
                acl += [("write", f"v1/sources/{source_id}/cmd/#") for source_id in sources_of.get(company, [])]
                broker_account.acl = acl

    # Capture's server side

    def _republish(self, message: Any) -> None:
        source_id = message.topic.split("/")[2]
        company = self._source_company.get(source_id)
        pipeline = self._pipeline
        if company is None or pipeline is None:
            return
        try:
            raw = _core._to_raw(company, message.topic, message.payload)
        except cm.PayloadError as err:
            self._counts["rejected_pushes"] += 1
            log.warning("the emulator rejected a push from source %s on %s: %s", source_id, message.topic, err)
            return
        for topic, payload in raw:
            pipeline.publish(topic, payload, qos=1, wait=False)
        self._counts["republished_pushes"] += 1
        self._counts["raw_messages"] += len(raw)

    @property
    def stats(self) -> dict[str, int]:
        """Pushes republished on the raw tree, raw messages published, pushes rejected as malformed."""
        return dict(self._counts)

    # Clients

    def client(self, account: User | ApiToken | JwtUser, transport: Transport = "mqtts", **options: Any) -> cm.Client:
        """A connected ``cm.Client`` for a user account (closed when the emulator stops)."""
        if isinstance(account, Source):
            raise TypeError("a source connects with emu.source_client(source)")
        client = cm.Client(**(account.client_options(transport) | options))
        self._clients.add(client)
        return client

    def async_client(
        self, account: User | ApiToken | JwtUser, transport: Transport = "mqtts", **options: Any
    ) -> cm.AsyncClient:
        """A ``cm.AsyncClient`` for a user account; it connects in ``async with``."""
        opts = account.client_options(transport) | options
        return cm.AsyncClient(opts.pop("host"), **opts)

    def source_client(self, source: Source, transport: Transport = "mqtts", **options: Any) -> cm.SourceClient:
        """A connected ``cm.SourceClient`` for a source (closed when the emulator stops)."""
        if not isinstance(source, Source):
            raise TypeError(f"emu.source_client needs a Source from emu.add_source, got {source!r}")
        opts = source.client_options(transport) | options
        client = cm.SourceClient(opts.pop("host"), **opts)
        self._clients.add(client)
        return client
