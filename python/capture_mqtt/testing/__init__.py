"""Testing kit: a local Capture (:class:`CaptureEmulator`), a plain Mosquitto launcher, and helpers
for tests that wait for messages instead of sleeping. The pytest fixtures (``capture_emulator``,
``capture_company``, ``capture_user``, ``capture_source``, ...) are registered by the package's pytest
plugin.

>>> from capture_mqtt.testing import CaptureEmulator, wait_for
>>> CaptureEmulator.__name__, wait_for.__name__
('CaptureEmulator', 'wait_for')
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
