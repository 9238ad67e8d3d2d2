"""Testing kit: a local Capture (:class:`CaptureEmulator`), a plain Mosquitto launcher, and helpers
for tests that wait for messages instead of sleeping. The pytest fixtures (``capture_emulator``,
``capture_company``, ``capture_user``, ``capture_source``, ...) are registered by the package's pytest
plugin.

>>> from capture_mqtt.testing import CaptureEmulator, wait_for
>>> with CaptureEmulator() as emu:
...     acme = emu.add_company("AcmeCorp")
...     alice, press = emu.add_user(acme, "alice"), emu.add_source(acme)
...     with emu.client(alice) as client, client.subscribe_raw(qos=1) as sub, emu.source_client(press) as device:
...         _ = device.push_field("PLC", "Press", "Count", 7)
...         wait_for(sub, timeout=10).value
7
"""

from __future__ import annotations

from .emulator import ApiToken, CaptureEmulator, Company, JwtUser, Source, User
from .mosquitto import CAPTURE_LIMITS, UNLIMITED, Account, BrokerLimits, Mosquitto, MosquittoNotFoundError, free_port
from .waiting import wait_for, wait_for_many, wait_until

__all__ = [
    "CAPTURE_LIMITS",
    "UNLIMITED",
    "Account",
    "ApiToken",
    "BrokerLimits",
    "CaptureEmulator",
    "Company",
    "JwtUser",
    "Mosquitto",
    "MosquittoNotFoundError",
    "Source",
    "User",
    "free_port",
    "wait_for",
    "wait_for_many",
    "wait_until",
]
