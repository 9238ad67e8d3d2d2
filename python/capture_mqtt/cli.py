"""The ``capture-mqtt`` command: tail, collect, push and command against Capture (or the local
emulator), run the emulator, and the demo.

Connection settings come from flags or the same environment variables as ``cm.Client.from_env()``
(``CAPTURE_MQTT_URL``, or ``CAPTURE_MQTT_HOST`` with ``_PORT``, ``_TRANSPORT``, ``_USERNAME``,
``_PASSWORD``, ``_COMPANY``, ``_CA_FILE`` ...); flags win.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import capture_mqtt as cm

from . import _core
from .options import ENV_VARIABLES, _env_options, _url_options

__all__ = ["main"]

EXAMPLES = """
examples:
  capture-mqtt emulator                      # a local Capture; prints how to connect
  capture-mqtt tail                          # the company's whole raw tree, as a live table
  capture-mqtt tail 'v1/raw/AcmeCorp/+/+/Monitoring/#' --json --count 10
  capture-mqtt collect --seconds 60 -o data.parquet
  capture-mqtt push PLC Monitoring CPU_Temp=55 CPU_Load=23.4 --tag MachineName=M1
  capture-mqtt command <source id> PLC/Process/Setpoint 80
  capture-mqtt demo                          # emulator + simulated plant + live view
"""


# Connection options


def _connection_flags(parser: argparse.ArgumentParser, *, source: bool = False) -> None:
    group = parser.add_argument_group(
        "connection", "flags override the CAPTURE_MQTT_* environment variables (see cm.Client.from_env)"
    )
    group.add_argument("--url", help="mqtts://user@host:8883 (or wss://, mqtt://, ws://); env CAPTURE_MQTT_URL")
    group.add_argument("--host", help="broker host; env CAPTURE_MQTT_HOST")
    group.add_argument("--port", type=int, help="broker port (default by transport); env CAPTURE_MQTT_PORT")
    group.add_argument("--transport", choices=["mqtts", "wss", "mqtt", "ws"], help="default mqtts")
    group.add_argument("--path", help="WebSocket path (default /mqtt)")
    group.add_argument("--username", help="env CAPTURE_MQTT_USERNAME")
    group.add_argument(
        "--password-env",
        metavar="VAR",
        help="read the password from this environment variable (default CAPTURE_MQTT_PASSWORD); "
        "passwords are never taken as flags, which other users could see in the process list",
    )
    group.add_argument("--ca-file", help="an extra CA to trust (PEM); env CAPTURE_MQTT_CA_FILE")
    group.add_argument("--tls-insecure", action="store_true", help="do not verify the broker's certificate")
    group.add_argument("--client-id", help="MQTT client id (random by default)")
    group.add_argument("--protocol", type=int, choices=[3, 5], help="MQTT 3.1.1 (default) or 5")
    if source:
        group.add_argument("--source-id", help="the source's GUID (default: the username)")
        group.add_argument("--auth-config", help="the source's auth config file from the portal")
    else:
        group.add_argument("--company", help="your company's exact name; env CAPTURE_MQTT_COMPANY")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options = _env_options(require_host=False)
    if args.url:
        options.update(_url_options(args.url))
    if args.password_env:
        if args.password_env not in os.environ:
            raise SystemExit(f"capture-mqtt: the environment variable {args.password_env} is not set")
        options["password"] = os.environ[args.password_env]
    for name in ("host", "port", "transport", "path", "username", "ca_file", "client_id", "protocol", "company"):
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    if args.tls_insecure:
        options["tls_insecure"] = True
    return options


def _need_host(options: dict[str, Any]) -> None:
    if not options.get("host"):
        names = ", ".join(sorted(ENV_VARIABLES))
        raise SystemExit(
            "capture-mqtt: no broker given: pass --url or --host, or set CAPTURE_MQTT_URL "
            f"(or {names}); `capture-mqtt emulator` prints settings for a local one"
        )


def _client(args: argparse.Namespace) -> cm.Client:
    options = _options(args)
    _need_host(options)
    return cm.Client(options.pop("host"), **options)


def _source_client(args: argparse.Namespace) -> cm.SourceClient:
    options = _options(args)
    if getattr(args, "outbox", None):
        Path(args.outbox).mkdir(parents=True, exist_ok=True)
        options["outbox"] = args.outbox
    if args.auth_config:
        return cm.SourceClient.from_auth_config(args.auth_config, host=options.pop("host", None), **options)
    _need_host(options)
    if options.pop("company", None) is not None:
        # A company belongs to a user's settings: a user account cannot push (Capture refuses it).
        raise SystemExit(
            "capture-mqtt: pushing needs a source account, and these settings are a user's (they name a "
            "company, from CAPTURE_MQTT_COMPANY or ?company=): "
            f"{_core._scope_rule('user')}. Pass --auth-config with the source's auth config (downloaded from "
            "the source's page in the Capture portal), or set CAPTURE_MQTT_USERNAME and CAPTURE_MQTT_PASSWORD "
            "to the source's credentials, without CAPTURE_MQTT_COMPANY"
        )
    source_id = args.source_id or options.pop("username", None)
    if not source_id or "password" not in options:
        raise SystemExit(
            "capture-mqtt: a source needs --auth-config, or its source id (--source-id or CAPTURE_MQTT_USERNAME) "
            "and its password (CAPTURE_MQTT_PASSWORD)"
        )
    return cm.SourceClient(options.pop("host"), source_id=source_id, **options)


# Output


def _point_record(point: Any) -> dict[str, Any]:
    return {
        "topic": point.topic,
        # One form for every record: UTC, microseconds always written, "Z".
        "timestamp": point.timestamp.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "source_id": point.source_id,
        "connection_tag": point.connection_tag,
        "measurement": point.measurement,
        "key": point.key,
        "value": point.value,
        "tags": point.tags,
    }


def _short(value: object, width: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


COLUMNS = (("time(UTC)", 12), ("source", 10), ("connection", 12), ("measurement", 14), ("key", 16), ("value", 14))


def _table_header() -> str:
    return " ".join(name.ljust(width) for name, width in COLUMNS) + " tags"


def _table_row(point: Any) -> str:
    cells = (
        point.timestamp.strftime("%H:%M:%S.%f")[:12],
        point.source_id,
        point.connection_tag,
        point.measurement,
        point.key,
        point.value,
    )
    tags = ",".join(f"{k}={v}" for k, v in point.tags.items() if k != "Connection_Tag")
    return " ".join(_short(cell, width).ljust(width) for cell, (_, width) in zip(cells, COLUMNS, strict=True)) + (
        f" {tags}" if tags else ""
    )


def _message_line(message: Any, as_json: bool) -> str:
    text = message.payload.decode("utf-8", "replace")
    if as_json:
        return json.dumps({"topic": message.topic, "payload": text})
    return f"{message.topic} {text}"


# Commands


def cmd_tail(args: argparse.Namespace, out: TextIO) -> int:
    deadline = None if args.seconds is None else time.monotonic() + args.seconds
    shown = 0
    with _client(args) as client:
        sub = client.subscribe(args.filter, qos=args.qos) if args.filter else client.subscribe_raw(qos=args.qos)
        with sub:
            if not args.json:
                print(f"# {sub.filter} on {client.address} (Ctrl-C to stop)", file=sys.stderr)
            while args.count is None or shown < args.count:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                item = sub.get(timeout=0.5 if left is None else min(0.5, left))
                if item is None:
                    continue
                is_point = isinstance(item, cm.DataPoint)
                if args.json:
                    line = json.dumps(_point_record(item)) if is_point else _message_line(item, True)
                else:
                    if shown % 40 == 0 and is_point:
                        print(_table_header(), file=out)
                    line = _table_row(item) if is_point else _message_line(item, False)
                print(line, file=out, flush=True)
                shown += 1
            malformed = sub.stats.get("malformed", 0)
            if malformed:
                print(f"# {malformed} malformed message(s) skipped", file=sys.stderr)
    return 0


def cmd_collect(args: argparse.Namespace, out: TextIO) -> int:
    output = Path(args.output)
    if output.suffix.lower() not in (".parquet", ".csv"):
        raise SystemExit(f"capture-mqtt: -o must end in .parquet or .csv, got {args.output!r}")
    if args.seconds is None and args.max_rows is None:
        raise SystemExit("capture-mqtt: give --seconds or --max-rows (or both), so that collect ends")
    with _client(args) as client:
        batch = cm.collect(
            client,
            args.filter,
            seconds=args.seconds,
            max_rows=args.max_rows,
            progress=not args.quiet,
            tag_columns=args.tag_column,
            qos=args.qos,
        )
    frame = batch.to_pandas(tags="dict")
    if output.suffix.lower() == ".parquet":
        frame.to_parquet(output, index=False)
    else:
        frame.to_csv(output, index=False)
    print(f"wrote {len(frame)} rows to {output}", file=out)
    return 0


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"capture-mqtt: {what} must look like NAME=VALUE, got {item!r}")
        pairs[name] = value
    return pairs


def _timestamp(text: str | None) -> Any:
    if text is None:
        return None
    return int(text) if text.isdigit() else text


def cmd_push(args: argparse.Namespace, out: TextIO) -> int:
    tags = _pairs(args.tag, "--tag") or None
    if not args.frame and not args.fields:
        raise SystemExit('capture-mqtt: give fields as KEY=VALUE (values are JSON: 55, 23.4, true, "text")')
    with _source_client(args) as source:
        if args.frame:
            import pandas as pd

            path = Path(args.frame)
            frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
            sent = source.push_frame(
                frame,
                connection=args.connection,
                measurement=args.measurement,
                timestamp_column=args.timestamp_column,
                tag_columns=args.tag_column,
                qos=args.qos,
            )
            done = f"pushed {sent} rows from {path} to {args.connection}/{args.measurement}"
        else:
            fields = {name: _json_or_text(value) for name, value in _pairs(args.fields, "a field").items()}
            for _ in range(args.repeat):
                source.push(
                    args.connection,
                    args.measurement,
                    fields,
                    tags=tags,
                    timestamp=_timestamp(args.timestamp),
                    qos=args.qos,
                )
                if args.repeat > 1:
                    time.sleep(args.interval)
            done = f"pushed {args.repeat} message(s) to {args.connection}/{args.measurement}: {sorted(fields)}"
    print(done, file=out)
    # After the close, which let what was pushed go out and be acknowledged.
    _report_outbox(source, out)
    return 0


def _report_outbox(source: cm.SourceClient, out: TextIO) -> None:
    # With --outbox a push returns once on disk; what the broker did not acknowledge before the
    # client closed stays there for the next run.
    stats = source.outbox_stats
    if stats is not None and stats["records"]:
        print(
            f"{stats['records']} message(s) wait in the outbox {stats['path']} for the broker: "
            "the next run with this --outbox sends them first",
            file=out,
        )


def cmd_command(args: argparse.Namespace, out: TextIO) -> int:
    data = _json_or_text(args.data) if args.data_as == "json" else args.data
    with _client(args) as client:
        client.send_command(args.source_id, args.topic, data, mapping=args.mapping, qos=args.qos, data_as=args.data_as)
    print(f"sent writedata {args.topic} = {args.data} to source {args.source_id}", file=out)
    return 0


def _write_env(path: Path, env: dict[str, str]) -> None:
    # LF line ends on every system: a POSIX shell sources the file (a CR would end up in the password).
    path.write_text("".join(f"{name}={value}\n" for name, value in env.items()), encoding="utf-8", newline="\n")
    path.chmod(0o600)


def _wait(seconds: float | None) -> None:
    deadline = None if seconds is None else time.monotonic() + seconds
    while deadline is None or time.monotonic() < deadline:
        time.sleep(0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic())))


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    # `timeout`, systemd and CI stop programs with SIGTERM: clean up as for Ctrl-C.
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        # Only the main thread may set a signal handler (main() called from a thread, a notebook's).
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_emulator(args: argparse.Namespace, out: TextIO) -> int:
    from .testing import CaptureEmulator
    from .testing.plant import SimulatedPlant

    env_dir = Path(args.env_dir or tempfile.mkdtemp(prefix="capture-emulator-env-"))
    env_dir.mkdir(parents=True, exist_ok=True)
    with _sigterm_as_interrupt(), CaptureEmulator() as emu:
        company = emu.add_company(args.company)
        user = emu.add_user(company, args.user)
        source = emu.add_source(company)
        plant = SimulatedPlant(emu, company, sources=args.plant).start() if args.plant else None
        _write_env(env_dir / "user.env", user.env())
        _write_env(env_dir / "source.env", source.env())
        print(
            f"A local Capture is running on 127.0.0.1:\n"
            f"  MQTT over TLS   mqtts://127.0.0.1:{emu.mqtts_port}\n"
            f"  WebSocket (TLS) wss://127.0.0.1:{emu.wss_port}/mqtt\n"
            f"  plain MQTT      mqtt://127.0.0.1:{emu.mqtt_port}\n"
            f"  CA certificate  {emu.ca_file}\n"
            f"  Auth API        {emu.portal_url}/Auth\n"
            f"Company {company.name!r}; user {user.username!r}; source {source.source_id}\n"
            f"  source auth config: {source.auth_config_path}\n"
            f"Connection settings, passwords included, are in files only you can read:\n"
            f"  set -a; . {env_dir / 'user.env'}; set +a     # then: capture-mqtt tail\n"
            f"  set -a; . {env_dir / 'source.env'}; set +a   # then: capture-mqtt push PLC Monitoring CPU_Temp=55\n"
            + (f"A simulated plant of {args.plant} sources is pushing.\n" if plant else "")
            + "Ctrl-C stops it.",
            file=out,
            flush=True,
        )
        try:
            _wait(args.seconds)
        except KeyboardInterrupt:
            pass
        finally:
            if plant is not None:
                plant.stop()
    print("emulator stopped", file=out)
    return 0


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from .demo import run_demo

    with _sigterm_as_interrupt():
        return run_demo(seconds=args.seconds, sources=args.sources, rate=args.rate, out=out)


# The parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capture-mqtt",
        description="Capture's MQTT broker from the command line: tail, collect, push, command; a local emulator.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"capture-mqtt {cm.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, run: Callable[[argparse.Namespace, TextIO], int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    tail = add("tail", "print live messages as a table (or JSON lines) until Ctrl-C", cmd_tail)
    tail.add_argument("filter", nargs="?", help="a topic filter (default: your company's whole raw tree)")
    tail.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    tail.add_argument("--count", type=int, help="stop after this many messages")
    tail.add_argument("--seconds", type=float, help="stop after this many seconds")
    tail.add_argument("--qos", type=int, choices=[0, 1], default=0)
    _connection_flags(tail)

    collect = add("collect", "gather live data for a while into a Parquet or CSV file", cmd_collect)
    collect.add_argument("filter", nargs="?", help="a topic filter (default: your company's whole raw tree)")
    collect.add_argument("-o", "--output", required=True, help="out.parquet or out.csv")
    collect.add_argument("--seconds", type=float, help="how long to collect")
    collect.add_argument("--max-rows", type=int, help="stop after this many rows")
    collect.add_argument("--tag-column", action="append", default=[], help="a tag to give its own column")
    collect.add_argument("--qos", type=int, choices=[0, 1], default=0)
    collect.add_argument("--quiet", action="store_true", help="no progress bar")
    _connection_flags(collect)

    push = add("push", "push data as a source (measurement level, or the rows of a CSV/Parquet file)", cmd_push)
    push.add_argument("connection", help="the connection tag, e.g. PLC")
    push.add_argument("measurement", help="the measurement, e.g. Monitoring")
    push.add_argument("fields", nargs="*", help='KEY=VALUE pairs; values are JSON (55, 23.4, true, "x") or text')
    push.add_argument("--tag", action="append", default=[], help="a tag NAME=VALUE (repeatable)")
    push.add_argument("--timestamp", help="ISO 8601 or epoch milliseconds (default: Capture stamps it)")
    push.add_argument("--qos", type=int, choices=[0, 1], default=1)
    push.add_argument("--repeat", type=int, default=1, help="push the same fields this many times")
    push.add_argument("--interval", type=float, default=1.0, help="seconds between repeats")
    push.add_argument("--frame", help="push every row of this CSV or Parquet file instead of KEY=VALUE pairs")
    push.add_argument("--timestamp-column", help="with --frame: the column holding each row's time")
    push.add_argument("--tag-column", action="append", default=[], help="with --frame: a column to send as a tag")
    push.add_argument(
        "--outbox",
        metavar="DIR",
        help="keep QoS 1 pushes in a durable outbox in DIR until the broker acknowledged them; what an "
        "earlier run left there is sent first",
    )
    _connection_flags(push, source=True)

    command = add("command", "send a writedata command to a source", cmd_command)
    command.add_argument("source_id", help="the target source's GUID")
    command.add_argument("topic", help="Connection/Measurement/Variable")
    command.add_argument("data", help="the value to write")
    command.add_argument("--mapping", help="the device-side address, if the source needs it")
    command.add_argument("--data-as", choices=["string", "json"], default="string", help="send Data as text or JSON")
    command.add_argument("--qos", type=int, choices=[0, 1], default=1)
    _connection_flags(command)

    _local_commands(add)
    return parser


def _local_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    emulator = add("emulator", "run a local Capture in the foreground and print how to connect", cmd_emulator)
    emulator.add_argument("--company", default="AcmeCorp")
    emulator.add_argument("--user", default="alice")
    emulator.add_argument("--plant", type=int, default=0, metavar="N", help="also simulate N pushing sources")
    emulator.add_argument("--seconds", type=float, help="stop after this many seconds (default: on Ctrl-C)")
    emulator.add_argument("--env-dir", help="where to write user.env and source.env (default: a new temp folder)")

    demo = add("demo", "emulator + simulated plant + live view + a pandas summary", cmd_demo)
    demo.add_argument("--seconds", type=float, default=12.0, help="how long to watch (default 12)")
    demo.add_argument("--sources", type=int, default=3, help="simulated sources (default 3)")
    demo.add_argument("--rate", type=float, default=5.0, help="pushes per second per source (default 5)")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """The ``capture-mqtt`` command. Errors are printed as one line, without a traceback.

    >>> from capture_mqtt.cli import main
    >>> try:
    ...     main(["tail", "--seconds", "-1"])
    ... except SystemExit as stop:
    ...     print(stop)
    capture-mqtt: --seconds must be positive, got -1.0
    """
    args = _parser().parse_args(argv)
    for name in ("seconds", "count", "max_rows", "repeat"):
        value = getattr(args, name, None)
        if value is not None and (value <= 0 or (isinstance(value, float) and not math.isfinite(value))):
            raise SystemExit(f"capture-mqtt: --{name.replace('_', '-')} must be positive, got {value}")
    try:
        return int(args.run(args, out or sys.stdout))
    except KeyboardInterrupt:
        return 130
    except (cm.CaptureError, ValueError, OSError) as err:
        print(f"capture-mqtt {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
