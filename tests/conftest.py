"""Shared fixtures: real Mosquitto brokers with Capture-like accounts, and Capture's disconnect shape."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVarTuple, Unpack

import pytest

import capture_mqtt as cm
from capture_mqtt.testing import Account, Mosquitto, MosquittoNotFoundError
from capture_mqtt.testing.mosquitto import find_dynsec_plugin

from .fakebroker import FakeCapture

Ts = TypeVarTuple("Ts")


class NoReaderLoop(asyncio.SelectorEventLoop):
    """An event loop that cannot watch a descriptor, as Windows' default (Proactor) loop cannot."""

    def add_reader(self, fd: Any, callback: Callable[[Unpack[Ts]], object], *args: *Ts) -> None:
        raise NotImplementedError("this loop has no add_reader, like Windows' ProactorEventLoop")


class NoReaderPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return NoReaderLoop()


if os.environ.get("CAPTURE_MQTT_TEST_LOOP") == "no-add-reader":
    # `make test` runs the asyncio tests a second time so: every await takes the path Windows takes.
    asyncio.set_event_loop_policy(NoReaderPolicy())


COMPANY = "AcmeCorp"
SOURCE_ID = "5b0f2c1e-6d1a-4c55-9d64-2f3f4b6c7a10"
API_TOKEN_ID = str(uuid.UUID("6f1c7e0e-1234-4000-8000-0000000000aa"))
PASSWORDS = {
    "alice": "alice-Secr3t!",
    API_TOKEN_ID: "tok3n-Secr3t!",
    "pipeline": "pipe-Secr3t!",
    SOURCE_ID: "src-Secr3t!",
}
USER_ACL: list[Any] = [("read", f"v1/raw/{COMPANY}/#"), ("write", "v1/sources/+/cmd/writedata")]


def capture_accounts() -> list[Account]:
    """Accounts with Capture's scopes: users read their company's raw tree and write commands; a
    source reads and writes its own subtree; the pipeline plays Capture's server side."""
    return [
        Account("alice", PASSWORDS["alice"], USER_ACL),
        Account(API_TOKEN_ID, PASSWORDS[API_TOKEN_ID], USER_ACL),
        Account("pipeline", PASSWORDS["pipeline"], [("readwrite", "#")]),
        Account(SOURCE_ID, PASSWORDS[SOURCE_ID], [("readwrite", f"v1/sources/{SOURCE_ID}/#")]),
    ]


@pytest.fixture(scope="module")
def broker() -> Iterator[Mosquitto]:
    """A Mosquitto with a password file and an ACL file, shared by a test module."""
    with Mosquitto(accounts=capture_accounts()) as running:
        yield running


@pytest.fixture
def fresh_broker() -> Iterator[Mosquitto]:
    """A Mosquitto of its own, for tests that kill, pause or reconfigure it."""
    with Mosquitto(accounts=capture_accounts()) as running:
        yield running


@pytest.fixture(scope="module")
def dynsec_broker() -> Iterator[Mosquitto]:
    """A Mosquitto with the dynamic-security plugin: denied subscriptions get SUBACK 0x80."""
    if sys.platform != "linux":
        # Homebrew's Mosquitto is built without plugins. On Linux (make test) a missing plugin fails.
        try:
            find_dynsec_plugin()
        except MosquittoNotFoundError as missing:
            pytest.skip(f"not on this {sys.platform} machine: {missing}")
    with Mosquitto(accounts=capture_accounts(), dynsec=True, tls=False, websockets=False) as running:
        yield running


@pytest.fixture
def fake_capture() -> Iterator[FakeCapture]:
    """A scripted broker that drops the connection on an out-of-scope request, as Capture does."""
    fake = FakeCapture()
    yield fake
    fake.close()


def _defaults(username: str, options: dict[str, Any]) -> None:
    options.setdefault("company", COMPANY)
    if username == "pipeline":  # Capture's server side: no user account's scope applies
        options.setdefault("account_kind", "unknown")


def connect(broker: Mosquitto, username: str = "alice", **options: Any) -> cm.Client:
    """A connected plain-MQTT client for `username` on `broker`."""
    _defaults(username, options)
    options.setdefault("connect_timeout", 5.0)
    return cm.Client(
        broker.host,
        transport="mqtt",
        port=broker.mqtt_port,
        username=username,
        password=PASSWORDS[username],
        **options,
    )


def async_client(broker: Mosquitto, username: str = "alice", **options: Any) -> cm.AsyncClient:
    """A plain-MQTT asyncio client for `username` on `broker` (connects in `async with`)."""
    _defaults(username, options)
    return cm.AsyncClient(
        broker.host,
        transport="mqtt",
        port=broker.mqtt_port,
        username=username,
        password=PASSWORDS[username],
        **options,
    )


class _SecretScan(logging.Handler):
    """Keeps every log record that shows a known secret."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__(level=logging.DEBUG)
        self.secrets = secrets
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage() + (self.format(record) if record.exc_info else "")
        if any(secret in text for secret in self.secrets if secret):
            self.leaks.append(f"{record.name} {record.levelname}: {text[:300]}")


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log_record() -> Iterator[None]:
    """While the whole suite runs, every log record at every level (the Rust core's included) is
    scanned for the suite's passwords and for every secret the emulator handed out."""
    from capture_mqtt.testing import emulator

    emulator.ISSUED_SECRETS.extend(PASSWORDS.values())
    # The emulator's list grows as accounts are added: the scan reads it by reference.
    scan = _SecretScan(emulator.ISSUED_SECRETS)
    root, package = logging.getLogger(), logging.getLogger("capture_mqtt")
    previous = package.level
    package.setLevel(logging.DEBUG)
    root.addHandler(scan)
    yield
    root.removeHandler(scan)
    package.setLevel(previous)
    assert not scan.leaks, "secrets in log records:\n" + "\n".join(scan.leaks[:10])
