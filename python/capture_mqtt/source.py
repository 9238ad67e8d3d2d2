"""``SourceClient``: a source (device) account pushing data into Capture and receiving commands."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self, TypeAlias, Unpack

from . import _core
from ._core import Command, DataPoint
from .async_client import AsyncClient
from .client import Client, _BaseClient
from .errors import TopicError
from .options import (
    AsyncSubscribeOptions,
    ConnectionOptions,
    SourceOptions,
    SubscribeOptions,
    UrlOptions,
    _env_options,
    _url_options,
)
from .subscription import AsyncSubscription, Subscription

__all__ = ["AsyncSourceClient", "SourceClient", "load_auth_config"]

SCOPE_RULE = _core._scope_rule("source")
Timestamp = Any  # an aware datetime, epoch milliseconds (int), ISO 8601 str, or None
Naive: TypeAlias = Literal["refuse", "utc", "local"]

_ALIASES = {
    "source_id": ("sourceid", "source", "id", "clientid"),
    "username": ("username", "user", "login"),
    "password": ("password", "secret", "pass", "pwd", "token"),
    "host": ("host", "hostname", "broker", "server", "address"),
    "port": ("port",),
}


def _flatten(data: Mapping[str, Any], into: dict[str, Any]) -> dict[str, Any]:
    for key, value in data.items():
        if isinstance(value, Mapping):
            _flatten(value, into)
        else:
            into.setdefault(re.sub(r"[^a-z0-9]", "", str(key).lower()), value)
    return into


def load_auth_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a source's auth config as downloaded from the Capture portal.

    Its format is not documented, so keys are matched without regard to case or separators, nested
    objects are searched, and common names are understood: ``SourceId``/``Id``, ``Username``/``UserName``,
    ``Password``/``Secret``, ``Host``/``Broker``, ``Port``. Returns ``source_id``, ``username``,
    ``password`` and, when present, ``host`` and ``port``. A clear error names what is missing.

    >>> import capture_mqtt as cm, json, tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    ...     json.dump({"SourceId": "6d1a", "Secret": "s3cret"}, f)
    >>> config = cm.load_auth_config(f.name)
    >>> config["source_id"], config["username"]
    ('6d1a', '6d1a')
    """
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except OSError as err:
        raise ValueError(f"the auth config {str(file)!r} cannot be read: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"the auth config {str(file)!r} is not JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(data, Mapping):
        # The file's content is wrong, not an argument's type.
        raise ValueError(f"the auth config {str(file)!r} must be a JSON object")  # noqa: TRY004
    flat = _flatten(data, {})
    found: dict[str, Any] = {}
    for name, aliases in _ALIASES.items():
        for alias in aliases:
            if flat.get(alias) not in (None, ""):
                found[name] = flat[alias]
                break
    found.setdefault("source_id", found.get("username"))
    found.setdefault("username", found.get("source_id"))
    for required in ("source_id", "password"):
        if found.get(required) in (None, ""):
            tried = ", ".join(_ALIASES[required] + (("username",) if required == "source_id" else ()))
            raise ValueError(
                f"the auth config {str(file)!r} has no {required} (looked for keys like {tried}; "
                f"the file has: {', '.join(sorted(flat)) or 'nothing'})"
            )
    return {key: str(value) if key != "port" else int(value) for key, value in found.items()}


# A large DataFrame goes out in slices: its conversion to Arrow (pandas copies) then needs memory
# for one slice at a time, not for the whole frame.
FRAME_SLICE_ROWS = 100_000


def _slices(frame: Any, rows: int) -> Any:
    total = len(frame) if hasattr(frame, "__len__") else None
    if total is None or total <= rows:
        yield frame
        return
    for start in range(0, total, rows):
        if hasattr(frame, "iloc"):  # pandas
            yield frame.iloc[start : start + rows]
        elif hasattr(frame, "slice"):  # Polars, pyarrow
            yield frame.slice(start, rows)
        else:
            yield frame
            return


class _SourceMixin(_BaseClient):
    source_id: str

    def _setup_source(self, source_id: str) -> None:
        if not isinstance(source_id, str) or not source_id or any(c in source_id for c in "/+#\0"):
            raise TopicError(
                f"invalid source_id {source_id!r}: give the source's GUID (no '/', '+', '#')",
                segment="source_id",
                value=str(source_id),
            )
        self.source_id = source_id
        # Topics built for (connection, measurement[, key]): checked once, reused by every push.
        self._topics: dict[tuple[str, str, str | None], str] = {}

    def _frame_operations(
        self,
        frame: Any,
        *,
        connection: str,
        measurement: str,
        timestamp_column: str | None,
        tag_columns: Sequence[str],
        naive: Naive,
        qos: int,
        wait: bool | None,
        timeout: float,
    ) -> Iterator[_core._Operation[int]]:
        # One implementation for both call styles: each slice's rows are converted and sent in Rust,
        # an operation that the sync client waits on and the async one awaits.
        topic = _core.data_topic(self.source_id, connection, measurement)
        for part in _slices(frame, FRAME_SLICE_ROWS):
            yield self._native.push_frame(
                part,
                topic,
                timestamp_column=timestamp_column,
                tag_columns=list(tag_columns),
                qos=qos,
                wait=self._wait_default(wait),
                timeout=timeout,
                naive=naive,
            )

    @classmethod
    def from_auth_config(
        cls, path: str | os.PathLike[str], host: str | None = None, /, **options: Unpack[UrlOptions]
    ) -> Self:
        """A source client from the auth config file downloaded from the source's page in the portal;
        ``host`` (and any option, such as ``port``) override what the file says. See
        :func:`load_auth_config`.

        >>> import json, os, tempfile, urllib.parse
        >>> import capture_mqtt as cm
        >>> url = urllib.parse.urlsplit(os.environ["SOURCE_URL"])  # stands in for the portal's download
        >>> path = os.path.join(tempfile.mkdtemp(), "auth.json")
        >>> with open(path, "w") as f:
        ...     json.dump({"SourceID": url.username, "Password": url.password, "Broker": url.hostname}, f)
        >>> with cm.SourceClient.from_auth_config(path, transport="mqtt", port=url.port) as src:
        ...     src.source_id, src.is_connected
        ('src-1', True)
        """
        config = load_auth_config(path)
        merged: dict[str, Any] = {
            key: config[key] for key in ("host", "port", "source_id", "username", "password") if key in config
        }
        host = host or options.pop("host", None)  # positional or keyword; None leaves the file's
        if host:
            merged["host"] = host
        merged |= options
        if not merged.get("host"):
            raise ValueError(f"the auth config {str(path)!r} names no host: pass host=... (ask the Capture team)")
        return cls._from_options(merged)

    @classmethod
    def from_url(cls, url: str, **options: Unpack[UrlOptions]) -> Self:
        """A source client from ``mqtts://<source id>:<password>@host:8883``.

        >>> import capture_mqtt as cm
        >>> cm.SourceClient.from_url("mqtt://src-1:s3cret@127.0.0.1:1883", connect=False).source_id
        'src-1'
        >>> cm.AsyncSourceClient.from_url("mqtt://src-1:s3cret@127.0.0.1:1883").source_id
        'src-1'
        """
        return cls._from_options({**_url_options(url), **options})

    @classmethod
    def from_env(cls, **options: Unpack[UrlOptions]) -> Self:
        """A source client from the same environment variables as :meth:`Client.from_env`; the username
        is the source id.

        >>> import os
        >>> import capture_mqtt as cm
        >>> os.environ["CAPTURE_MQTT_URL"] = "mqtts://6d1a:s3cret@broker.example:8883"
        >>> cm.SourceClient.from_env(connect=False).source_id
        '6d1a'
        >>> del os.environ["CAPTURE_MQTT_URL"]
        """
        return cls._from_options({**_env_options(), **options})

    @classmethod
    def _from_options(cls, options: dict[str, Any]) -> Self:
        options.setdefault("source_id", options.get("username"))
        options.pop("company", None)
        if not options.get("source_id") or options.get("password") is None:
            raise ValueError("a source needs its source id (the URL's user) and its password")
        return cls(options.pop("host"), **options)

    def _topic(self, connection: str, measurement: str, key: str | None = None) -> str:
        cache_key = (connection, measurement, key)
        topic = self._topics.get(cache_key)
        if topic is None:
            topic = _core.data_topic(self.source_id, connection, measurement, key)
            if len(self._topics) >= 4096:
                self._topics.clear()
            self._topics[cache_key] = topic
        return topic

    def _push_message(
        self,
        connection: str,
        measurement: str,
        fields: Mapping[str, Any],
        tags: Mapping[str, str] | None,
        timestamp: Timestamp,
        *,
        naive: Naive = "refuse",
    ) -> tuple[str, bytes]:
        topic = self._topic(connection, measurement)
        if type(fields) is not dict:
            fields = dict(fields)
        tag_dict = tags if type(tags) is dict else (dict(tags) if tags else None)
        return topic, _core.measurement_payload(fields, tags=tag_dict or None, timestamp=timestamp, naive=naive)

    def _field_message(
        self,
        connection: str,
        measurement: str,
        key: str,
        value: Any,
        *,
        tags: Mapping[str, str] | None,
        timestamp: Timestamp,
        naive: Naive = "refuse",
    ) -> tuple[str, bytes]:
        topic = self._topic(connection, measurement, key)
        tag_dict = tags if type(tags) is dict else (dict(tags) if tags else None)
        return topic, _core.field_payload(value, tags=tag_dict or None, timestamp=timestamp, naive=naive)

    def _command_filter(self, verb: str) -> str:
        if verb != "+":
            _core.command_topic(self.source_id, verb)
        return f"v1/sources/{self.source_id}/cmd/{verb}"

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("connected" if self.is_connected else "not connected")
        return f"{type(self).__name__}(address={self.address!r}, source_id={self.source_id!r}, {state})"


class SourceClient(_SourceMixin, Client):
    """A source (device) account: pushes data to Capture and receives commands.

    Same connection options as :class:`Client`; the username is the source id. It only ever builds
    topics under ``v1/sources/<source_id>/``, and refuses others with :class:`TopicError`.

    >>> import capture_mqtt as cm
    >>> src = cm.SourceClient("broker.example", source_id="6d1a", password="s3cret", connect=False)
    >>> src
    SourceClient(address='mqtts://broker.example:8883', source_id='6d1a', not connected)
    >>> src.close()
    """

    def __init__(
        self,
        host: str,
        *,
        source_id: str,
        password: str,
        username: str | None = None,
        **options: Unpack[SourceOptions],
    ) -> None:
        self._setup_source(source_id)
        options.setdefault("account_kind", "source")
        super().__init__(host, username=username or source_id, password=password, source_id=source_id, **options)

    def push(
        self,
        connection: str,
        measurement: str,
        fields: Mapping[str, Any],
        *,
        tags: Mapping[str, str] | None = None,
        timestamp: Timestamp = None,
        naive: Naive = "refuse",
        qos: int = 1,
        wait: bool | None = None,
        timeout: float = 30.0,
    ) -> Any:
        """Pushes one measurement-level message (several fields). ``timestamp``: an aware datetime,
        epoch milliseconds, an ISO 8601 string, or None to let Capture stamp it. A naive datetime (no
        tzinfo) is refused with :class:`PayloadError`, since Python reads it as local time and Capture
        as UTC; ``naive="utc"`` or ``naive="local"`` says which it is. With QoS 1 or 2 returns once the
        broker acknowledged it, or, with a durable outbox (``outbox=``), once it is on disk (``wait``
        as in :meth:`Client.publish`); bad values raise :class:`PayloadError` before anything is sent.

        >>> import os
        >>> import capture_mqtt as cm
        >>> with cm.SourceClient.from_url(os.environ["SOURCE_URL"]) as src:
        ...     src.push("Line1", "Press", {"Pressure_bar": 4.2, "Running": True}, tags={"Shift": "A"})
        ...     src.stats["acknowledged"]
        1
        """
        topic, payload = self._push_message(connection, measurement, fields, tags, timestamp, naive=naive)
        return self._publish(topic, payload, qos=qos, retain=False, wait=wait, timeout=timeout)

    def push_field(
        self,
        connection: str,
        measurement: str,
        key: str,
        value: Any,
        *,
        tags: Mapping[str, str] | None = None,
        timestamp: Timestamp = None,
        naive: Naive = "refuse",
        qos: int = 1,
        wait: bool | None = None,
        timeout: float = 30.0,
    ) -> Any:
        """Pushes one field-level message (one value).

        >>> import os
        >>> import capture_mqtt as cm
        >>> with cm.SourceClient.from_url(os.environ["SOURCE_URL"]) as src:
        ...     src.push_field("Line1", "Press", "Pressure_bar", 4.2)
        ...     src.stats["acknowledged"]
        1
        """
        topic, payload = self._field_message(
            connection, measurement, key, value, tags=tags, timestamp=timestamp, naive=naive
        )
        return self._publish(topic, payload, qos=qos, retain=False, wait=wait, timeout=timeout)

    def push_frame(
        self,
        frame: Any,
        *,
        connection: str,
        measurement: str,
        timestamp_column: str | None = None,
        tag_columns: Sequence[str] = (),
        naive: Naive = "refuse",
        qos: int = 1,
        wait: bool | None = None,
        timeout: float = 60.0,
    ) -> int:
        """Pushes every row of a DataFrame (pandas or Polars, a pyarrow Table, anything with
        ``__arrow_c_stream__``) as one measurement-level message, converted in Rust. Columns become
        fields, except ``timestamp_column`` (a time index is used when there is one) and ``tag_columns``;
        a missing value (None, NaN) leaves that field out of the row. A tz-naive time column is refused
        (:class:`PayloadError`) unless ``naive="utc"`` or ``naive="local"`` says what it holds. Returns
        the messages sent, once all were acknowledged, or, with a durable outbox (``outbox=``), once all
        are on disk (``wait`` as in :meth:`Client.publish`).

        >>> import os
        >>> import pandas as pd
        >>> import capture_mqtt as cm
        >>> frame = pd.DataFrame(
        ...     {"UtcTimestamp": pd.to_datetime(["2024-11-08 10:00:00", "2024-11-08 10:00:01"], utc=True),
        ...      "Pressure_bar": [4.2, 4.3], "Machine": ["P1", "P1"]}
        ... )
        >>> with cm.SourceClient.from_url(os.environ["SOURCE_URL"]) as src:
        ...     src.push_frame(
        ...         frame, connection="Line1", measurement="Press",
        ...         timestamp_column="UtcTimestamp", tag_columns=["Machine"],
        ...     )
        2
        """
        operations = self._frame_operations(
            frame,
            connection=connection,
            measurement=measurement,
            timestamp_column=timestamp_column,
            tag_columns=tag_columns,
            naive=naive,
            qos=qos,
            wait=wait,
            timeout=timeout,
        )
        return sum(op.wait() for op in operations)

    def subscribe_raw(self, *args: Any, **kwargs: Any) -> Subscription[DataPoint]:
        """Not for sources: the raw tree is outside a source's scope (:class:`TopicError`); a source
        reads its own subtree (:meth:`commands`).

        >>> import capture_mqtt as cm
        >>> src = cm.SourceClient("broker.example", source_id="6d1a", password="s3cret", connect=False)
        >>> src.subscribe_raw()
        Traceback (most recent call last):
        ...
        capture_mqtt.errors.TopicError: a source cannot subscribe to the raw tree: ...
        >>> src.close()
        """
        raise TopicError(f"a source cannot subscribe to the raw tree: {SCOPE_RULE}", segment="topic", value="v1/raw")

    def commands(
        self,
        verb: str = "+",
        *,
        callback: Callable[[Command], object] | None = None,
        **options: Unpack[SubscribeOptions],
    ) -> Subscription[Command]:
        """The commands sent to this source (``v1/sources/<id>/cmd/+``), as :class:`Command` objects:
        ``for cmd in src.commands(): ...``.

        >>> import os
        >>> import capture_mqtt as cm
        >>> with cm.SourceClient.from_url(os.environ["SOURCE_URL"]) as src, src.commands() as commands:
        ...     with cm.Client.from_env() as operator:
        ...         operator.send_command("src-1", "Line1/Valve/Open", True)
        ...     command = commands.get(timeout=10)
        >>> command.connection, command.measurement, command.variable, command.data
        ('Line1', 'Valve', 'Open', 'true')
        """
        options.setdefault("qos", 1)
        return self.subscribe(self._command_filter(verb), decode="command", callback=callback, **options)

    def on_command(
        self, callback: Callable[[Command], object], verb: str = "+", **options: Unpack[SubscribeOptions]
    ) -> Subscription[Command]:
        """Calls ``callback(command)`` for every command, on a dispatcher thread.

        >>> import os, threading
        >>> import capture_mqtt as cm
        >>> done = threading.Event()
        >>> with cm.SourceClient.from_url(os.environ["SOURCE_URL"]) as src:
        ...     handler = src.on_command(lambda command: done.set())
        ...     with cm.Client.from_env() as operator:
        ...         operator.send_command("src-1", "Line1/Valve/Open", True)
        ...     done.wait(10)
        True
        """
        return self.commands(verb, callback=callback, **options)


class AsyncSourceClient(_SourceMixin, AsyncClient):
    """The asyncio source client: ``await src.push(...)``, ``async for cmd in await src.commands()``.

    >>> import capture_mqtt as cm
    >>> cm.AsyncSourceClient("broker.example", source_id="6d1a", password="s3cret")
    AsyncSourceClient(address='mqtts://broker.example:8883', source_id='6d1a', not connected)
    """

    def __init__(
        self,
        host: str,
        *,
        source_id: str,
        password: str,
        username: str | None = None,
        connect: Literal[False] = False,
        **options: Unpack[ConnectionOptions],
    ) -> None:
        self._setup_source(source_id)
        options.setdefault("account_kind", "source")
        super().__init__(
            host,
            username=username or source_id,
            password=password,
            source_id=source_id,
            connect=connect,
            **options,
        )

    async def push(
        self,
        connection: str,
        measurement: str,
        fields: Mapping[str, Any],
        *,
        tags: Mapping[str, str] | None = None,
        timestamp: Timestamp = None,
        naive: Naive = "refuse",
        qos: int = 1,
        wait: bool | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Like :meth:`SourceClient.push`, awaitable.

        >>> import asyncio, os
        >>> import capture_mqtt as cm
        >>> async def main():
        ...     async with cm.AsyncSourceClient.from_url(os.environ["SOURCE_URL"]) as src:
        ...         await src.push("Line1", "Press", {"Pressure_bar": 4.2})
        ...         return src.stats["acknowledged"]
        >>> asyncio.run(main())
        1
        """
        topic, payload = self._push_message(connection, measurement, fields, tags, timestamp, naive=naive)
        await self.publish(topic, payload, qos=qos, wait=wait, timeout=timeout)

    async def push_field(
        self,
        connection: str,
        measurement: str,
        key: str,
        value: Any,
        *,
        tags: Mapping[str, str] | None = None,
        timestamp: Timestamp = None,
        naive: Naive = "refuse",
        qos: int = 1,
        wait: bool | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Like :meth:`SourceClient.push_field`, awaitable.

        >>> import asyncio, os
        >>> import capture_mqtt as cm
        >>> async def main():
        ...     async with cm.AsyncSourceClient.from_url(os.environ["SOURCE_URL"]) as src:
        ...         await src.push_field("Line1", "Press", "Pressure_bar", 4.2)
        ...         return src.stats["acknowledged"]
        >>> asyncio.run(main())
        1
        """
        topic, payload = self._field_message(
            connection, measurement, key, value, tags=tags, timestamp=timestamp, naive=naive
        )
        await self.publish(topic, payload, qos=qos, wait=wait, timeout=timeout)

    async def push_frame(
        self,
        frame: Any,
        *,
        connection: str,
        measurement: str,
        timestamp_column: str | None = None,
        tag_columns: Sequence[str] = (),
        naive: Naive = "refuse",
        qos: int = 1,
        wait: bool | None = None,
        timeout: float = 60.0,
    ) -> int:
        """Like :meth:`SourceClient.push_frame`, awaitable (the rows are converted and sent in Rust,
        off the event loop).

        >>> import asyncio, os
        >>> import pandas as pd
        >>> import capture_mqtt as cm
        >>> frame = pd.DataFrame({"Pressure_bar": [4.2, 4.3, 4.4]})  # no time column: stamped when sent
        >>> async def main():
        ...     async with cm.AsyncSourceClient.from_url(os.environ["SOURCE_URL"]) as src:
        ...         return await src.push_frame(frame, connection="Line1", measurement="Press")
        >>> asyncio.run(main())
        3
        """
        operations = self._frame_operations(
            frame,
            connection=connection,
            measurement=measurement,
            timestamp_column=timestamp_column,
            tag_columns=tag_columns,
            naive=naive,
            qos=qos,
            wait=wait,
            timeout=timeout,
        )
        return sum([await op for op in operations])

    async def subscribe_raw(self, *args: Any, **kwargs: Any) -> AsyncSubscription[DataPoint]:
        """Not for sources: the raw tree is outside a source's scope (:class:`TopicError`).

        >>> import asyncio
        >>> import capture_mqtt as cm
        >>> src = cm.AsyncSourceClient("broker.example", source_id="6d1a", password="s3cret")
        >>> asyncio.run(src.subscribe_raw())
        Traceback (most recent call last):
        ...
        capture_mqtt.errors.TopicError: a source cannot subscribe to the raw tree: ...
        >>> asyncio.run(src.close())
        """
        raise TopicError(f"a source cannot subscribe to the raw tree: {SCOPE_RULE}", segment="topic", value="v1/raw")

    async def commands(self, verb: str = "+", **options: Unpack[AsyncSubscribeOptions]) -> AsyncSubscription[Command]:
        """The commands sent to this source: ``async for cmd in await src.commands(): ...``.

        >>> import asyncio, os
        >>> import capture_mqtt as cm
        >>> async def main():
        ...     async with cm.AsyncSourceClient.from_url(os.environ["SOURCE_URL"]) as src:
        ...         commands = await src.commands()
        ...         async with cm.AsyncClient.from_env() as operator:
        ...             await operator.send_command("src-1", "Line1/Valve/Open", True)
        ...         async for command in commands:
        ...             return command.variable
        >>> asyncio.run(main())
        'Open'
        """
        options.setdefault("qos", 1)
        return await self.subscribe(self._command_filter(verb), decode="command", **options)
