"""capture-mqtt: the Python SDK for the MQTT broker of Capture, with a Rust core.

>>> import capture_mqtt as cm
>>> cm.raw_filter("AcmeCorp")
'v1/raw/AcmeCorp/+/+/+/#'
"""

from __future__ import annotations

from ._core import (
    Command,
    DataPoint,
    TopicInfo,
    __version__,
    command_payload,
    command_topic,
    data_topic,
    field_payload,
    measurement_payload,
    parse_command,
    parse_raw,
    parse_topic,
    raw_filter,
    raw_topic,
    topic_matches,
    validate_filter,
)
from .errors import (
    AuthenticationError,
    AuthorizationError,
    CaptureError,
    ClosedError,
    ConnectError,
    PayloadError,
    TimeoutError,  # noqa: A004 - the documented public name, also a builtins.TimeoutError
    TopicError,
)

__all__ = [
    "AuthenticationError",
    "AuthorizationError",
    "CaptureError",
    "ClosedError",
    "Command",
    "ConnectError",
    "DataPoint",
    "PayloadError",
    "TimeoutError",
    "TopicError",
    "TopicInfo",
    "__version__",
    "command_payload",
    "command_topic",
    "data_topic",
    "field_payload",
    "measurement_payload",
    "parse_command",
    "parse_raw",
    "parse_topic",
    "raw_filter",
    "raw_topic",
    "topic_matches",
    "validate_filter",
]
