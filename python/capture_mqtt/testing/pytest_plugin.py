"""The pytest plugin, registered through the ``pytest11`` entry point: fixtures backed by one local
:class:`~capture_mqtt.testing.CaptureEmulator` per test session.

- ``capture_emulator`` (session): the running emulator.
- ``capture_company``: a company of its own for each test, so tests never see each other's data.
- ``capture_user``, ``capture_api_token``, ``capture_jwt_user``, ``capture_source``: accounts of
  that company.
- ``capture_client`` and ``capture_source_client``: connected clients for ``capture_user`` and
  ``capture_source``, closed after the test.

Waiting helpers are in :mod:`capture_mqtt.testing` (``wait_for``, ``wait_for_many``, ``wait_until``).
Everything is imported when a fixture is first used, so the plugin costs nothing in other projects.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import capture_mqtt as cm
    from capture_mqtt.testing import ApiToken, CaptureEmulator, Company, JwtUser, Source, User


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


@pytest.fixture(scope="session")
def capture_emulator() -> Iterator[CaptureEmulator]:
    """A local Capture (Mosquitto with Capture's listeners, scopes and server side) for the session."""
    from capture_mqtt.testing import CaptureEmulator

    with CaptureEmulator() as emulator:
        yield emulator


@pytest.fixture
def capture_company(capture_emulator: CaptureEmulator) -> Company:
    """A fresh company on the emulator, for this test alone."""
    return capture_emulator.add_company(_unique("Company"))


@pytest.fixture
def capture_user(capture_emulator: CaptureEmulator, capture_company: Company) -> User:
    """A password user of ``capture_company``."""
    return capture_emulator.add_user(capture_company, _unique("user"))


@pytest.fixture
def capture_api_token(capture_emulator: CaptureEmulator, capture_company: Company) -> ApiToken:
    """An API token of ``capture_company``."""
    return capture_emulator.add_api_token(capture_company)


@pytest.fixture
def capture_jwt_user(capture_emulator: CaptureEmulator, capture_company: Company) -> JwtUser:
    """A user of ``capture_company`` who logs in with emulator-issued JWTs."""
    return capture_emulator.add_jwt_user(capture_company, _unique("jwt-user"))


@pytest.fixture
def capture_source(capture_emulator: CaptureEmulator, capture_company: Company) -> Source:
    """A source of ``capture_company``, with its auth config file."""
    return capture_emulator.add_source(capture_company)


@pytest.fixture
def capture_client(capture_emulator: CaptureEmulator, capture_user: User) -> Iterator[cm.Client]:
    """A connected ``cm.Client`` for ``capture_user`` (MQTT over TLS, trusting the emulator's CA)."""
    with capture_emulator.client(capture_user) as client:
        yield client


@pytest.fixture
def capture_source_client(capture_emulator: CaptureEmulator, capture_source: Source) -> Iterator[cm.SourceClient]:
    """A connected ``cm.SourceClient`` for ``capture_source``."""
    with capture_emulator.source_client(capture_source) as client:
        yield client
