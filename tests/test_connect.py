"""Connecting to a real Mosquitto: transports, TLS, the three ways to authenticate, clear errors,
authorization in its three shapes, reconnects and resubscribing, persistent sessions, events, logs."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import pytest

import capture_mqtt as cm
from capture_mqtt.testing import Account, CaptureEmulator, Mosquitto, User, free_port

from .conftest import API_TOKEN_ID, COMPANY, PASSWORDS, SOURCE_ID, USER_ACL, async_client, capture_accounts, connect
from .fakebroker import FakeCapture

Transport = Literal["mqtts", "wss", "mqtt", "ws"]

RAW_TOPIC = f"v1/raw/{COMPANY}/src-1/Conn/Monitoring/CPU_Temp"


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Events:
    """Collects a client's connection events."""

    def __init__(self) -> None:
        self.items: list[cm.ConnectionEvent] = []
        self._lock = threading.Lock()

    def __call__(self, event: cm.ConnectionEvent) -> None:
        with self._lock:
            self.items.append(event)

    def kinds(self) -> list[str]:
        with self._lock:
            return [e.kind for e in self.items]


# Transports and TLS


@pytest.mark.parametrize("transport", ["mqtt", "mqtts", "wss", "ws"])
def test_every_transport_connects_and_carries_data(broker: Mosquitto, transport: Transport) -> None:
    port = {"mqtt": broker.mqtt_port, "mqtts": broker.mqtts_port, "wss": broker.wss_port, "ws": broker.ws_port}
    with (
        cm.Client(
            broker.host,
            transport=transport,
            port=port[transport],
            username="alice",
            password=PASSWORDS["alice"],
            company=COMPANY,
            ca_file=broker.ca_file,
        ) as client,
        connect(broker, "pipeline") as pipeline,
    ):
        assert client.is_connected
        expected = f"{transport}://127.0.0.1:{port[transport]}" + ("/mqtt" if transport in ("ws", "wss") else "")
        assert client.address == expected
        with client.subscribe_raw() as sub:
            pipeline.publish(RAW_TOPIC, cm.field_payload(55, tags={"MachineName": "M1"}), qos=1)
            point = sub.get(timeout=5)
            assert point is not None
            assert (point.key, point.value, point.tags) == ("CPU_Temp", 55, {"MachineName": "M1"})


def test_tls_with_ca_given_as_pem_text(broker: Mosquitto) -> None:
    assert broker.tls is not None
    with cm.Client(
        broker.host,
        port=broker.mqtts_port,
        username="alice",
        password=PASSWORDS["alice"],
        ca_pem=broker.tls.ca_pem.decode(),
    ) as client:
        assert client.is_connected


@pytest.mark.parametrize("transport", ["mqtts", "wss"])
def test_tls_verifies_by_default(broker: Mosquitto, transport: Transport) -> None:
    port = broker.mqtts_port if transport == "mqtts" else broker.wss_port
    with pytest.raises(cm.ConnectError, match=r"(?i)certificate|UnknownIssuer") as info:
        cm.Client(
            broker.host,
            transport=transport,
            port=port,
            username="alice",
            password=PASSWORDS["alice"],
            reconnect=False,
        )
    assert PASSWORDS["alice"] not in str(info.value)


def test_tls_connects_by_a_host_name_the_certificate_names(broker: Mosquitto) -> None:
    # The certificate names 127.0.0.1 and localhost; the listener is on 127.0.0.1.
    with cm.Client(
        "localhost", port=broker.mqtts_port, username="alice", password=PASSWORDS["alice"], ca_file=broker.ca_file
    ) as client:
        assert client.is_connected


def test_tls_insecure_connects_and_warns(broker: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="capture_mqtt")
    with cm.Client(
        broker.host,
        port=broker.mqtts_port,
        username="alice",
        password=PASSWORDS["alice"],
        tls_insecure=True,
    ) as client:
        assert client.is_connected
    wait_until(lambda: any("verification is OFF" in r.getMessage() for r in caplog.records), what="the warning")


def _broker_with_certificate(**make_tls_options: Any) -> Mosquitto:
    from capture_mqtt.testing.certs import make_tls

    broker = Mosquitto(accounts=capture_accounts(), websockets=False)
    files = make_tls(**make_tls_options)
    (broker.workdir / "server.pem").write_bytes(files.cert_pem)
    (broker.workdir / "server.key").write_bytes(files.key_pem)
    broker.ca_file.write_bytes(files.ca_pem)
    return broker


class _NotFound(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # as a web server in front of a broker answers

    def do_GET(self) -> None:
        self.send_error(404)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("case", "fix"),
    [
        ("unknown issuer", "pass its CA with ca_file="),
        ("wrong host", "does not name this host: connect with the host name the certificate was issued for"),
        ("expired", "certificate has expired"),
        ("not TLS", 'is this a TLS port? For plain MQTT use transport="mqtt"'),
        ("WebSocket path 404", "answered with HTTP 404 Not Found: is the path"),
    ],
)
def test_every_tls_and_websocket_failure_names_its_fix(case: str, fix: str) -> None:
    options: dict[str, Any] = {"username": "alice", "password": PASSWORDS["alice"], "reconnect": False}
    with contextlib.ExitStack() as stack:
        if case == "WebSocket path 404":
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
            options.update(transport="ws", port=server.server_address[1], path="/mqtt-typo")
        else:
            broker = stack.enter_context(
                _broker_with_certificate(
                    expired=case == "expired",
                    hosts=("example.com",) if case == "wrong host" else ("127.0.0.1", "localhost"),
                )
            )
            options.update(port=broker.mqtts_port, ca_file=broker.ca_file)
            if case == "unknown issuer":
                del options["ca_file"]
            if case == "not TLS":
                options["port"] = broker.mqtt_port
        with pytest.raises(cm.ConnectError) as info:
            cm.Client("127.0.0.1", **options)
    assert fix in str(info.value)
    assert PASSWORDS["alice"] not in str(info.value)


# Clear connection errors


def test_refused_port_is_a_connect_error() -> None:
    from capture_mqtt.testing import free_port

    port = free_port()
    with pytest.raises(cm.ConnectError, match=rf"connection refused by mqtt://127.0.0.1:{port}"):
        cm.Client("127.0.0.1", transport="mqtt", port=port)


def test_unknown_host_is_a_connect_error() -> None:
    with pytest.raises((cm.ConnectError, cm.TimeoutError)) as info:
        cm.Client("no-such-host.invalid", transport="mqtt", port=1883, connect_timeout=5)
    assert "no-such-host.invalid" in str(info.value)


def test_timeout_is_a_timeout_error() -> None:
    import socket

    # A listener that never answers the TLS handshake / CONNECT.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(cm.TimeoutError, match="connect timeout"):
            cm.Client("127.0.0.1", transport="mqtt", port=port, connect_timeout=1)
        assert time.monotonic() - started < 5


def test_bad_password_is_an_authentication_error_without_the_secret(broker: Mosquitto) -> None:
    secret = "definitely-Wr0ng-secret"
    with pytest.raises(cm.AuthenticationError) as info:
        cm.Client(broker.host, transport="mqtt", port=broker.mqtt_port, username="alice", password=secret)
    assert info.value.username == "alice"
    assert "alice" in str(info.value)
    assert secret not in str(info.value)
    assert secret not in repr(info.value)
    assert isinstance(info.value, cm.ConnectError)


# The three ways to authenticate


def test_api_token_authenticates_as_a_user(broker: Mosquitto) -> None:
    auth = cm.Auth.api_token(API_TOKEN_ID, PASSWORDS[API_TOKEN_ID])
    with (
        cm.Client(broker.host, transport="mqtt", port=broker.mqtt_port, auth=auth, company=COMPANY) as client,
        client.subscribe_raw() as sub,
        connect(broker, "pipeline") as pipeline,
    ):
        pipeline.publish(RAW_TOPIC, cm.field_payload(1), qos=1)
        assert sub.get(timeout=5) is not None
    assert PASSWORDS[API_TOKEN_ID] not in repr(auth)


def test_jwt_string_and_callable(fresh_broker: Mosquitto) -> None:
    # Mosquitto stands in for Capture: the "JWT" is the password it knows for the user.
    tokens = ["jwt-one"]
    fresh_broker.accounts.append(Account("bob", tokens[0], USER_ACL))
    fresh_broker.write_accounts()
    fresh_broker.reload()
    with cm.Client(
        fresh_broker.host, transport="mqtt", port=fresh_broker.mqtt_port, auth=cm.Auth.jwt("bob", "jwt-one")
    ) as client:
        assert client.is_connected

    calls: list[str] = []

    def provider() -> str:
        calls.append(tokens[0])
        return tokens[0]

    events = Events()
    client = cm.Client(
        fresh_broker.host,
        transport="mqtt",
        port=fresh_broker.mqtt_port,
        auth=cm.Auth.jwt("bob", provider),
        reconnect=cm.Reconnect(min_delay=0.05, max_delay=0.2),
        on_event=events,
    )
    with client:
        assert calls == ["jwt-one"]
        # The token "expires": the broker now only knows a new one, and the provider returns it.
        tokens[0] = "jwt-two"
        fresh_broker.accounts[-1] = Account("bob", "jwt-two", USER_ACL)
        fresh_broker.write_accounts()
        fresh_broker.restart()
        wait_until(lambda: events.kinds().count("connected") >= 2, what="a reconnect with the new token")
        assert calls[-1] == "jwt-two"
        assert client.is_connected


def _jwt(exp: float) -> str:
    import base64

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256'})}.{part({'sub': 'bob', 'exp': int(exp)})}.c2lnbmF0dXJl"


def test_jwt_is_renewed_before_it_expires(fake_capture: FakeCapture) -> None:
    soon, later = _jwt(time.time() + 3), _jwt(time.time() + 3600)
    tokens = iter([soon, later])
    events = Events()
    with cm.Client(
        "127.0.0.1",
        transport="mqtt",
        port=fake_capture.port,
        auth=cm.Auth.jwt("bob", lambda: next(tokens)),
        on_event=events,
    ) as client:
        assert fake_capture.logins == [("bob", soon)]
        wait_until(lambda: len(fake_capture.logins) == 2 and client.is_connected, timeout=6, what="the renewal")
        assert fake_capture.logins[1] == ("bob", later)
        assert any(e.reason == "renewing the token before it expires" for e in events.items if e.kind == "disconnected")
        time.sleep(1.5)
        assert len(fake_capture.logins) == 2, "a token valid for an hour is not renewed yet"


def test_jwt_callable_failure_is_reported_without_secret(broker: Mosquitto) -> None:
    def broken() -> str:
        raise RuntimeError("portal down")

    with pytest.raises(cm.AuthenticationError, match="token callable raised RuntimeError"):
        cm.Client(broker.host, transport="mqtt", port=broker.mqtt_port, auth=cm.Auth.jwt("bob", broken))


def test_fetch_jwt_posts_to_capture_auth_api(monkeypatch: pytest.MonkeyPatch) -> None:
    import http.server

    # A corporate proxy in the environment (on Windows and macOS, in the system settings too): a
    # portal on this machine is reached directly, not through it. This one would refuse.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)

    seen: dict[str, Any] = {}

    class Portal(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen["path"] = self.path
            seen["headers"] = {k.lower(): v for k, v in self.headers.items()}
            seen["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ok = seen["body"]["Password"] == "right"
            self.send_response(200 if ok else 401)
            self.end_headers()
            if ok:
                self.wfile.write(b"eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjE3MzE2NzAwMDB9.c2ln")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Portal)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        token = cm.fetch_jwt("alice", "right", base_url=base)
        assert token.startswith("eyJ")
        assert seen["path"] == "/Auth"
        assert seen["headers"]["authversion"] == "V0.0.1"  # HTTP header names ignore case
        assert seen["headers"]["content-type"] == "application/json"
        assert seen["body"] == {"Username": "alice", "Password": "right"}
        with pytest.raises(cm.AuthenticationError) as info:
            cm.fetch_jwt("alice", "wrong-Secr3t", base_url=base)
        assert "wrong-Secr3t" not in str(info.value)
    finally:
        server.shutdown()
    with pytest.raises(cm.ConnectError):
        cm.fetch_jwt("alice", "x", base_url=base, timeout=2)


def test_fetch_jwt_to_another_host_goes_through_the_programs_opener() -> None:
    """A proxy with authentication, a company's HTTPS handler: what a program installed with
    urllib.request.install_opener is used for the portal (nothing leaves this machine here)."""
    import io
    import urllib.request
    import urllib.response
    from email.message import Message

    seen: list[str] = []

    class Company(urllib.request.BaseHandler):
        handler_order = 100  # before urllib's own HTTPS handler

        def https_open(self, request: urllib.request.Request) -> urllib.response.addinfourl:
            seen.append(request.full_url)
            response = urllib.response.addinfourl(io.BytesIO(b"eyJ.company.token"), Message(), request.full_url, 200)
            response.msg = "OK"  # type: ignore[attr-defined]  # what urllib's error check reads
            return response

    urllib.request.install_opener(urllib.request.build_opener(Company))
    try:
        assert cm.fetch_jwt("alice", "right", base_url="https://portal.example.invalid") == "eyJ.company.token"
    finally:
        urllib.request.install_opener(None)
    assert seen == ["https://portal.example.invalid/Auth"]


# Authorization: the three shapes


def test_acl_file_shape_grants_and_delivers_nothing(broker: Mosquitto) -> None:
    """Mosquitto's ACL file grants a denied subscription and delivers nothing: no false alarm."""
    with (
        connect(broker, scope=False) as client,
        connect(broker, "pipeline") as pipeline,
        client.subscribe("v1/raw/OtherCorp/#") as denied,
        client.subscribe_raw() as allowed,
    ):
        pipeline.publish("v1/raw/OtherCorp/s/c/m/k", cm.field_payload(1), qos=1)
        pipeline.publish(RAW_TOPIC, cm.field_payload(2), qos=1)
        assert allowed.get(timeout=5) is not None
        assert denied.get(timeout=0.5) is None
        assert client.is_connected


def test_suback_failure_raises_authorization_error(dynsec_broker: Mosquitto) -> None:
    with connect(dynsec_broker, scope=False) as client:
        with pytest.raises(cm.AuthorizationError) as info:
            client.subscribe("v1/raw/OtherCorp/#")
        err = info.value
        assert err.topic == "v1/raw/OtherCorp/#"
        assert err.action == "subscribe"
        assert err.account_kind == "user"
        assert "SUBACK 0x80" in str(err)
        assert "user account" in str(err) and "raw tree" in str(err)
        # The connection stays up and allowed subscriptions still work.
        with client.subscribe_raw() as sub, connect(dynsec_broker, "pipeline") as pipeline:
            pipeline.publish(RAW_TOPIC, cm.field_payload(3), qos=1)
            assert sub.get(timeout=5) is not None


def test_disconnect_after_subscribe_is_an_authorization_error(fake_capture: FakeCapture) -> None:
    events = Events()
    with cm.Client(
        "127.0.0.1",
        transport="mqtt",
        port=fake_capture.port,
        username="alice",
        password="pw",
        company=COMPANY,
        scope=False,  # the request must reach the broker: its refusal is the subject
        reconnect=cm.Reconnect(min_delay=0.05, max_delay=0.2),
        on_event=events,
    ) as client:
        kept = client.subscribe_raw()
        with pytest.raises(cm.AuthorizationError) as info:
            client.subscribe("v1/raw/OtherCorp/#")
        assert "closed the connection right after the SUBSCRIBE, three times" in str(info.value)
        assert info.value.topic == "v1/raw/OtherCorp/#"
        # It reconnects, re-subscribes what was allowed, and does not repeat the refused filter.
        # A refusal is told from a restart by repeating: the broker hung up right after the same
        # SUBSCRIBE three times. Then the client reconnects with what was allowed, and stops asking.
        wait_until(lambda: fake_capture.connections >= 4 and client.is_connected, what="the reconnect")
        wait_until(lambda: fake_capture.subscriptions.count(kept.filter) >= 4, what="the resubscribe")
        time.sleep(0.5)
        assert fake_capture.refused == ["v1/raw/OtherCorp/#"] * 3
        assert fake_capture.connections == 4
        assert "disconnected" in events.kinds()


def test_disconnect_after_publish_is_an_authorization_error(fake_capture: FakeCapture) -> None:
    with cm.Client(
        "127.0.0.1",
        transport="mqtt",
        port=fake_capture.port,
        username=SOURCE_ID,
        password="pw",
        account_kind="source",
        reconnect=cm.Reconnect(min_delay=0.05, max_delay=0.2),
    ) as client:
        client.publish(f"v1/raw/{COMPANY}/ok/c/m/k", b"{}", qos=1)
        with pytest.raises(cm.AuthorizationError) as info:
            client.publish("v1/sources/other-source/data/read/c/m", b"{}", qos=1)
        assert "source account" in str(info.value)
        assert "v1/sources/<SourceID>" in str(info.value)
        wait_until(lambda: client.is_connected, what="the reconnect")
        time.sleep(0.5)
        refused = "v1/sources/other-source/data/read/c/m"
        assert fake_capture.refused == [refused] * 3, "sent three times to tell a refusal from a restart, then no more"


# Staying connected


def test_reconnects_and_resubscribes_after_the_broker_restarts(fresh_broker: Mosquitto) -> None:
    events = Events()
    client = connect(fresh_broker, reconnect=cm.Reconnect(min_delay=0.05, max_delay=0.3), on_event=events)
    with client, client.subscribe_raw(qos=1) as sub:
        for _ in range(3):
            events.items.clear()
            fresh_broker.restart()
            wait_until(lambda: client.is_connected and "connected" in events.kinds(), what="the reconnect")
            assert "disconnected" in events.kinds()
            with connect(fresh_broker, "pipeline") as pipeline:
                wait_until(lambda: sub._native.is_active, what="the resubscribe")
                pipeline.publish(RAW_TOPIC, cm.field_payload(7), qos=1)
                point = sub.get(timeout=5)
                assert point is not None and point.value == 7
    wait_until(lambda: "closed" in events.kinds(), what="the closed event")


def test_backoff_between_attempts_is_bounded(fresh_broker: Mosquitto) -> None:
    events = Events()
    client = connect(fresh_broker, reconnect=cm.Reconnect(min_delay=0.1, max_delay=0.4, jitter=0.0), on_event=events)
    with client:
        fresh_broker.stop()
        wait_until(lambda: events.kinds().count("reconnecting") >= 5, timeout=15, what="five attempts")
        delays = [e.delay for e in events.items if e.kind == "reconnecting"]
        attempts = [e.attempt for e in events.items if e.kind == "reconnecting"]
        assert attempts[:5] == [1, 2, 3, 4, 5]
        assert delays[:5] == pytest.approx([0.1, 0.2, 0.4, 0.4, 0.4])
        assert any(e.kind == "disconnected" and e.reason for e in events.items)
        fresh_broker.start()
        wait_until(lambda: client.is_connected, what="the reconnect")


def test_reconnect_false_fails_fast(fresh_broker: Mosquitto) -> None:
    events = Events()
    client = connect(fresh_broker, reconnect=False, on_event=events)
    sub = client.subscribe_raw()
    fresh_broker.kill()
    wait_until(lambda: "closed" in events.kinds(), what="the client to give up")
    assert not client.is_connected
    with pytest.raises(cm.ClosedError):
        sub.get(timeout=1)
    assert "reconnecting" not in events.kinds()
    client.close()


def test_persistent_session_delivers_what_arrived_while_away(fresh_broker: Mosquitto) -> None:
    options: dict[str, Any] = {"client_id": "persistent-1", "clean_session": False}
    first = connect(fresh_broker, connect=False, **options)
    first.subscribe_raw(qos=1)
    first.connect()
    first.close()
    with connect(fresh_broker, "pipeline") as pipeline:
        for i in range(20):
            pipeline.publish(RAW_TOPIC, cm.field_payload(i), qos=1)
    # Declared before connecting, so that messages held by the broker are not missed.
    second = connect(fresh_broker, connect=False, **options)
    with second, second.subscribe_raw(qos=1) as sub:
        second.connect()
        values: list[Any] = []
        while len(values) < 20:
            point = sub.get(timeout=5)
            assert point is not None, f"only {values} arrived"
            values.append(point.value)
        assert values == list(range(20))
        assert second.stats["unrouted"] == 0


def test_large_payloads_pass(broker: Mosquitto) -> None:
    big = "x" * 1_000_000
    with connect(broker) as client, client.subscribe_raw() as sub, connect(broker, "pipeline") as pipeline:
        pipeline.publish(RAW_TOPIC, cm.field_payload(big), qos=1)
        point = sub.get(timeout=10)
        assert point is not None and point.value == big


def test_keepalive_notices_a_stalled_network(capture_emulator: CaptureEmulator, capture_user: User) -> None:
    # The emulator's gateway holds all traffic while the connection stays open: only the
    # keepalive can tell.
    events = Events()
    reconnect = cm.Reconnect(min_delay=0.1, max_delay=0.5)
    with capture_emulator.client(capture_user, transport="mqtt", keepalive=1, reconnect=reconnect) as client:
        client.on_event(events)
        capture_emulator.faults.stall(5.0)
        started = time.monotonic()
        wait_until(lambda: "disconnected" in events.kinds(), timeout=10, what="the stall to be noticed")
        noticed = time.monotonic() - started
        wait_until(lambda: client.is_connected, timeout=15, what="the reconnect once the stall is over")
        assert noticed < 4, f"took {noticed:.1f} s with keepalive 1 s"


# Lifecycle, events, logs, secrets


def test_context_manager_and_close_are_deterministic(broker: Mosquitto) -> None:
    before = threading.active_count()
    for _ in range(5):
        with connect(broker) as client:
            assert client.is_connected
        assert not client.is_connected
        client.close()  # idempotent
        with pytest.raises(cm.ClosedError):
            client.connect()
    wait_until(lambda: threading.active_count() <= before, what="the dispatcher threads to end")


def test_events_and_is_connected(broker: Mosquitto) -> None:
    events = Events()
    client = connect(broker, on_event=events)
    wait_until(lambda: "connected" in events.kinds(), what="the connected event")
    assert events.items[0].session_present is False
    client.close()
    wait_until(lambda: events.kinds()[-1:] == ["closed"], what="the closed event")


def test_rust_logs_reach_python_logging(broker: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="capture_mqtt")
    with connect(broker):
        wait_until(
            lambda: any(
                r.name == "capture_mqtt.session.engine" and "connected to" in r.getMessage() for r in caplog.records
            ),
            what="the connect log record",
        )


def test_secrets_never_show(broker: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="capture_mqtt")
    secret = PASSWORDS["alice"]
    client = connect(broker)
    texts = [repr(client), str(client), repr(cm.Auth.password("alice", secret)), str(cm.Auth.jwt("a", secret))]
    client.close()
    with pytest.raises(cm.AuthenticationError) as info:
        cm.Client(broker.host, transport="mqtt", port=broker.mqtt_port, username="alice", password=secret + "x")
    texts += [str(info.value), repr(info.value)]
    time.sleep(0.3)
    texts += [r.getMessage() for r in caplog.records]
    assert all(secret not in text for text in texts)


def test_exit_with_open_clients_is_clean(broker: Mosquitto, tmp_path: Any) -> None:
    import subprocess
    import sys

    script = tmp_path / "leave_open.py"
    script.write_text(
        "import asyncio, sys, capture_mqtt as cm\n"
        f"c = cm.Client('127.0.0.1', transport='mqtt', port={broker.mqtt_port}, username='alice',"
        f" password={PASSWORDS['alice']!r}, company={COMPANY!r})\n"
        "subs = [c.subscribe_raw(callback=print) for _ in range(4)]\n"
        # Daemon threads of the program's own, waiting in the core when the interpreter exits: before
        # the core parked such threads at exit, about 1 exit in 5 crashed here.
        "import threading\n"
        "g = c.subscribe_raw()\n"
        "def poll():\n"
        "    try:\n"
        "        while True:\n"
        "            g.get(timeout=0.003)\n"
        "    except cm.ClosedError:\n"
        "        pass\n"
        "for _ in range(3):\n"
        "    threading.Thread(target=poll, daemon=True).start()\n"
        f"a = cm.AsyncClient('127.0.0.1', transport='mqtt', port={broker.mqtt_port}, username='alice',"
        f" password={PASSWORDS['alice']!r})\n"
        "asyncio.run(a.connect())\n"
        "print('open', c.is_connected, a.is_connected)\n"
    )
    for _ in range(20):
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=30, env=dict(os.environ), check=False
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "open True True"
        assert "Traceback" not in done.stderr and "panicked" not in done.stderr
        assert time.monotonic() - started < 10


def test_exit_handlers_of_the_program_can_still_wait_for_its_threads(broker: Mosquitto, tmp_path: Any) -> None:
    """An exit handler registered before the import runs after the package's own ones: a thread it
    waits for must not be parked then (the interpreter does not finalize yet)."""
    import subprocess
    import sys

    script = tmp_path / "join_at_exit.py"
    script.write_text(
        "import atexit, threading, time\n"
        "stop = threading.Event()\n"
        "def finish():\n"
        "    stop.set()\n"
        "    worker.join()\n"
        "    print('joined', flush=True)\n"
        "atexit.register(finish)\n"
        "import capture_mqtt as cm\n"
        f"c = cm.Client('127.0.0.1', transport='mqtt', port={broker.mqtt_port}, username='alice',"
        f" password={PASSWORDS['alice']!r}, company={COMPANY!r})\n"
        "sub = c.subscribe_raw()\n"
        "def poll():\n"
        "    while not stop.is_set():\n"
        "        try:\n"
        "            sub.get(timeout=0.05)\n"
        "        except cm.ClosedError:\n"
        "            time.sleep(0.01)\n"
        "worker = threading.Thread(target=poll, daemon=True)\n"
        "worker.start()\n"
        "print('open', flush=True)\n"
    )
    for _ in range(5):
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=30, env=dict(os.environ), check=False
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["open", "joined"], done.stderr


def test_asyncio_client(broker: Mosquitto) -> None:
    import asyncio

    async def main() -> list[Any]:
        async with async_client(broker, "alice") as client:
            assert client.is_connected
            sub = await client.subscribe_raw()
            async with async_client(broker, "pipeline") as pipeline:
                for i in range(50):
                    await pipeline.publish(RAW_TOPIC, cm.field_payload(i), qos=1)
            got = []
            async for point in sub:
                got.append(point.value)
                if len(got) == 50:
                    break
            await sub.close()
            return got

    assert asyncio.run(main()) == list(range(50))


def test_from_url_and_from_env(broker: Mosquitto, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"mqtt://alice:{PASSWORDS['alice']}@127.0.0.1:{broker.mqtt_port}?company={COMPANY}"
    with cm.Client.from_url(url) as client:
        assert client.is_connected and client.company == COMPANY
        assert PASSWORDS["alice"] not in repr(client)
    monkeypatch.setenv("CAPTURE_MQTT_HOST", "127.0.0.1")
    monkeypatch.setenv("CAPTURE_MQTT_PORT", str(broker.mqtt_port))
    monkeypatch.setenv("CAPTURE_MQTT_TRANSPORT", "mqtt")
    monkeypatch.setenv("CAPTURE_MQTT_USERNAME", "alice")
    monkeypatch.setenv("CAPTURE_MQTT_PASSWORD", PASSWORDS["alice"])
    monkeypatch.setenv("CAPTURE_MQTT_COMPANY", COMPANY)
    with cm.Client.from_env() as client:
        assert client.is_connected and client.company == COMPANY
    monkeypatch.delenv("CAPTURE_MQTT_HOST")
    with pytest.raises(ValueError, match="CAPTURE_MQTT_URL"):
        cm.Client.from_env()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"transport": "http"}, "transport"),
        ({"port": 70000}, "port"),
        ({"protocol": 4}, "protocol"),
        ({"keepalive": 0}, "keepalive"),
        ({"clean_session": False}, "client_id"),
        ({"username": "alice"}, "password"),
        ({"company": "Acme/Corp"}, "company"),
        ({"ca_file": "/nonexistent/ca.pem"}, "ca_file"),
    ],
)
def test_bad_options_are_refused_before_connecting(options: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, cm.TopicError), match=message):
        cm.Client("127.0.0.1", connect=False, **options)


def test_subscribe_refuses_filters_capture_would_refuse(broker: Mosquitto) -> None:
    with connect(broker) as client:
        for bad in ("v1/raw/+/#", "#", "v1/raw/AcmeCorp/#/x"):
            with pytest.raises(cm.TopicError):
                client.subscribe(bad)
        assert client.is_connected
        with pytest.raises(cm.TopicError):
            client.publish("v1/raw/AcmeCorp/+/c/m/k", b"{}")


def test_a_user_account_stays_in_its_scope(broker: Mosquitto) -> None:
    """A user reads its company's raw tree and writes commands; anything else is refused before it is
    sent, quoting the rule, where the broker would disconnect (Capture) or stay silent (Mosquitto)."""
    with connect(broker) as client:
        with pytest.raises(cm.TopicError, match='company "AcmeCorp"') as info:
            client.subscribe("v1/raw/SomeoneElse/#")
        assert info.value.value == "v1/raw/SomeoneElse/#"
        assert "scope=False" in str(info.value)
        for bad in ("v1/sources/x/cmd/writedata", "sensors/#", "$share/g/v1/raw/SomeoneElse/#"):
            with pytest.raises(cm.TopicError, match="user account"):
                client.subscribe(bad)
        for bad in (RAW_TOPIC, "v1/sources/x/data/read/C/M", "v1/sources/x/cmd/other"):
            with pytest.raises(cm.TopicError, match="publish commands to v1/sources/<SourceID>/cmd/writedata"):
                client.publish(bad, cm.field_payload(1), qos=1)
        with pytest.raises(cm.TopicError, match=r"cm\.SourceClient"):
            client.publish("v1/sources/x/data/read/C/M", b"{}", qos=0)
        assert client.stats["published"] == 0
        assert client.is_connected
        # Inside the scope: the company's raw tree and commands.
        with client.subscribe("v1/raw/AcmeCorp/+/+/Monitoring/#"):
            pass
        client.send_command("some-source", ("C", "M", "V"), 1)
        assert client.stats["published"] == 1


def test_the_scope_check_is_async_too(broker: Mosquitto) -> None:
    async def main() -> None:
        async with async_client(broker) as client:
            with pytest.raises(cm.TopicError, match="SomeoneElse"):
                await client.subscribe("v1/raw/SomeoneElse/#")
            with pytest.raises(cm.TopicError, match="user account"):
                await client.publish(RAW_TOPIC, b"{}")
            assert client.stats["published"] == 0

    asyncio.run(main())


def test_scope_false_is_the_escape_hatch_for_other_brokers(broker: Mosquitto) -> None:
    # Without the check the requests reach the broker (here: Mosquitto grants and filters).
    with connect(broker, scope=False) as client, client.subscribe("v1/raw/SomeoneElse/#", qos=1):
        client.publish("v1/sources/x/data/read/C/M", b"{}", qos=1)
        assert client.stats["published"] == 1
    # A client without credentials is not a Capture account: nothing to check.
    with cm.Client(broker.host, transport="mqtt", port=broker.mqtt_port, connect=False) as anonymous:
        anonymous.publish("sensors/temperature", b"21", qos=0)
        assert anonymous.stats["queued"] == 1, "taken for sending once connected"
    # subscribe_raw still takes decode= from a caller that passes it (untyped code).
    untyped: Any = {"decode": "bytes"}
    with connect(broker) as client, client.subscribe_raw(**untyped) as raw_bytes:
        assert raw_bytes.filter.startswith("v1/raw/AcmeCorp/")


# MQTT 5


@pytest.mark.parametrize("transport", ["mqtt", "mqtts", "wss"])
def test_mqtt5_connects_and_carries_data(broker: Mosquitto, transport: Transport) -> None:
    port = {"mqtt": broker.mqtt_port, "mqtts": broker.mqtts_port, "wss": broker.wss_port}[transport]
    with (
        cm.Client(
            broker.host,
            transport=transport,
            port=port,
            username="alice",
            password=PASSWORDS["alice"],
            company=COMPANY,
            ca_file=broker.ca_file,
            protocol=5,
        ) as client,
        client.subscribe_raw(qos=1) as sub,
        connect(broker, "pipeline", protocol=5) as pipeline,
    ):
        pipeline.publish(RAW_TOPIC, cm.field_payload(23.5), qos=1)
        point = sub.get(timeout=5)
        assert point is not None and point.value == 23.5


def test_mqtt5_puback_reason_code_is_an_authorization_error(broker: Mosquitto) -> None:
    with connect(broker, protocol=5, scope=False) as client:
        with pytest.raises(cm.AuthorizationError, match="PUBACK NotAuthorized") as info:
            client.publish("v1/raw/OtherCorp/s/c/m/k", b"{}", qos=1)
        assert info.value.action == "publish"
        assert info.value.topic == "v1/raw/OtherCorp/s/c/m/k"
        assert client.is_connected
        client.publish("v1/sources/some-source/cmd/writedata", cm.command_payload(("C", "M", "V"), 1), qos=1)


REFUSED_PUBLISH_SCRIPT = """
import sys, capture_mqtt as cm
with cm.Client("127.0.0.1", transport="mqtt", port=int(sys.argv[1]), username="alice", password=sys.argv[2],
               protocol=5, scope=False) as client:
    try:
        client.publish("v1/raw/OtherCorp/s/c/m/k", b"{}", qos=1)
    except cm.AuthorizationError as err:
        print("caught:", err)
"""


def test_a_refused_publish_is_reported_once_by_its_exception(broker: Mosquitto) -> None:
    """With no logging configured (Python then prints WARNING and up to stderr), a refused publish
    shows up once: as the exception, not also as log lines."""
    done = subprocess.run(
        [sys.executable, "-c", REFUSED_PUBLISH_SCRIPT, str(broker.mqtt_port), PASSWORDS["alice"]],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("not authorized") == 1 and "PUBACK NotAuthorized" in done.stdout
    assert done.stderr == ""


def test_mqtt5_suback_reason_code_is_an_authorization_error(dynsec_broker: Mosquitto) -> None:
    with connect(dynsec_broker, protocol=5, scope=False) as client:
        with pytest.raises(cm.AuthorizationError, match="SUBACK NotAuthorized"):
            client.subscribe("v1/raw/OtherCorp/#")
        assert client.is_connected


def test_mqtt5_persistent_session(fresh_broker: Mosquitto) -> None:
    options: dict[str, Any] = {"client_id": "persistent-5", "clean_session": False, "protocol": 5}
    first = connect(fresh_broker, connect=False, **options)
    first.subscribe_raw(qos=1)
    first.connect()
    first.close()
    with connect(fresh_broker, "pipeline") as pipeline:
        for i in range(5):
            pipeline.publish(RAW_TOPIC, cm.field_payload(i), qos=1)
    second = connect(fresh_broker, connect=False, **options)
    with second, second.subscribe_raw(qos=1) as sub:
        second.connect()
        got = [sub.get(timeout=5) for _ in range(5)]
        assert [p.value for p in got if p is not None] == list(range(5))


def test_refusal_is_delivered_to_a_subscription_declared_before_connecting(dynsec_broker: Mosquitto) -> None:
    client = connect(dynsec_broker, connect=False, scope=False)
    with client:
        denied = client.subscribe("v1/raw/OtherCorp/#")
        allowed = client.subscribe_raw()
        client.connect()
        with pytest.raises(cm.AuthorizationError, match="SUBACK 0x80"):
            denied.get(timeout=5)
        with pytest.raises(cm.ClosedError):
            denied.get(timeout=1)
        with connect(dynsec_broker, "pipeline") as pipeline:
            wait_until(lambda: allowed._native.is_active, what="the allowed subscription")
            pipeline.publish(RAW_TOPIC, cm.field_payload(4), qos=1)
            assert allowed.get(timeout=5) is not None


@pytest.mark.parametrize("company", ["", "Acme/1", "+", "#", "Acme\0"])
def test_a_bad_company_is_refused_before_anything_is_sent(company: str) -> None:
    for make in (cm.Client, cm.AsyncClient):
        with pytest.raises(cm.TopicError, match="company") as info:
            make("127.0.0.1", transport="mqtt", port=1, company=company, connect=False)
        assert info.value.segment == "company"
