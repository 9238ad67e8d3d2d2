"""The ``capture-mqtt`` command, run as a user runs it (the installed script, settings from the
environment) against the local emulator."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

import capture_mqtt as cm
from capture_mqtt.testing import CaptureEmulator, Company, Source, User, wait_for, wait_for_many
from capture_mqtt.testing.plant import SimulatedPlant

CLI = str(Path(sys.executable).parent / "capture-mqtt")


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CAPTURE_MQTT_")}
    return subprocess.run(
        [CLI, *args], env=base | (env or {}), capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def plant(capture_emulator: CaptureEmulator, capture_company: Company) -> Iterator[SimulatedPlant]:
    with SimulatedPlant(capture_emulator, capture_company, sources=2, rate=20) as running:
        yield running


def test_tail_prints_json_lines(capture_user: User, plant: SimulatedPlant) -> None:
    done = run("tail", "--json", "--count", "5", env=capture_user.env())
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == 5
    assert {r["tags"]["MachineName"] for r in records} <= {"Press1", "Press2"}
    assert all(r["topic"].startswith(f"v1/raw/{capture_user.company.name}/") for r in records)
    assert {"timestamp", "source_id", "connection_tag", "measurement", "key", "value"} <= set(records[0])
    # One timestamp form, whole seconds included: UTC with microseconds and "Z".
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", r["timestamp"]) for r in records)


def test_tail_json_writes_one_timestamp_form_whole_seconds_included() -> None:
    from capture_mqtt.cli import _point_record

    topic = "v1/raw/AcmeCorp/s1/PLC/Monitoring/CPU_Temp"
    whole = cm.parse_raw(topic, b'{"Value": 1, "UtcTimestamp": "2024-11-08T10:22:06Z"}')
    fraction = cm.parse_raw(topic, b'{"Value": 1, "UtcTimestamp": "2024-11-08T10:22:06.26Z"}')
    assert _point_record(whole)["timestamp"] == "2024-11-08T10:22:06.000000Z"
    assert _point_record(fraction)["timestamp"] == "2024-11-08T10:22:06.260000Z"


def test_tail_prints_a_live_table_over_websockets(capture_user: User, plant: SimulatedPlant) -> None:
    done = run(
        "tail", cm.raw_filter(capture_user.company.name, key="Temperature"), "--count", "3", env=capture_user.env("wss")
    )
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split()[:6] == ["time(UTC)", "source", "connection", "measurement", "key", "value"]
    assert len(rows) == 3 and all("Temperature" in row and "MachineName=Press" in row for row in rows)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_collect_writes_a_file(capture_user: User, plant: SimulatedPlant, tmp_path: Path, suffix: str) -> None:
    output = tmp_path / f"out{suffix}"
    done = run("collect", "--seconds", "1.5", "-o", str(output), "--tag-column", "MachineName", env=capture_user.env())
    assert done.returncode == 0, done.stderr
    frame = pd.read_parquet(output) if suffix == ".parquet" else pd.read_csv(output)
    assert len(frame) >= 20 and f"wrote {len(frame)} rows" in done.stdout
    assert set(frame["MachineName"]) == {"Press1", "Press2"}
    # The progress bar runs over the 1.5 seconds asked for, with the rows beside it.
    assert "1.5/1.5" in done.stderr and "rows=" in done.stderr


def test_push_sends_typed_fields_and_tags(capture_client: cm.Client, capture_source: Source) -> None:
    with capture_client.subscribe_raw(qos=1) as sub:
        done = run(
            "push", "PLC", "Monitoring", "CPU_Temp=55", "CPU_Load=23.4", "Running=true", "Mode=Auto",
            "--tag", "MachineName=M1", "--timestamp", "1731061326260",
            env=capture_source.env(),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        points = {p.key: p for p in wait_for_many(sub, 4)}
    assert {k: p.value for k, p in points.items()} == {
        "CPU_Temp": 55,
        "CPU_Load": 23.4,
        "Running": True,
        "Mode": "Auto",
    }
    assert points["CPU_Temp"].tags["MachineName"] == "M1"
    assert points["CPU_Temp"].timestamp.isoformat() == "2024-11-08T10:22:06.260000+00:00"


def test_push_with_a_users_settings_says_it_needs_a_source_account(capture_user: User) -> None:
    done = run("push", "PLC", "Monitoring", "CPU_Temp=55", env=capture_user.env())
    assert done.returncode != 0
    assert "pushed" not in done.stdout
    assert "needs a source account" in done.stderr and "--auth-config" in done.stderr
    assert "Traceback" not in done.stderr


def test_push_sends_the_rows_of_a_csv_file_using_the_auth_config(
    capture_emulator: CaptureEmulator, capture_client: cm.Client, capture_source: Source, tmp_path: Path
) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("time,Temperature,Machine\n2024-11-08T10:00:00Z,20.5,M1\n2024-11-08T10:00:01Z,21.0,M2\n")
    env = {"CAPTURE_MQTT_CA_FILE": str(capture_emulator.ca_file)}
    with capture_client.subscribe_raw(qos=1) as sub:
        done = run(
            "push", "PLC", "Climate", "--frame", str(rows), "--timestamp-column", "time", "--tag-column", "Machine",
            "--auth-config", str(capture_source.auth_config_path),
            env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        points = wait_for_many(sub, 2)
    assert "pushed 2 rows" in done.stdout
    assert [(p.value, p.tags["Machine"]) for p in points] == [(20.5, "M1"), (21.0, "M2")]


def test_push_with_an_outbox_keeps_what_the_broker_did_not_take_for_the_next_run(
    capture_client: cm.Client, capture_source: Source, tmp_path: Path
) -> None:
    import socket

    outbox = tmp_path / "outbox"
    with socket.socket() as probe:  # a port nothing listens on: the plant network is down
        probe.bind(("127.0.0.1", 0))
        down = str(probe.getsockname()[1])
    offline = run(
        "push", "PLC", "Monitoring", "CPU_Temp=55", "--outbox", str(outbox),
        env=capture_source.env() | {"CAPTURE_MQTT_PORT": down},
    )  # fmt: skip
    assert offline.returncode == 0, offline.stderr
    assert "1 message(s) wait in the outbox" in offline.stdout and "next run" in offline.stdout
    with capture_client.subscribe_raw(qos=1) as sub:
        online = run("push", "PLC", "Monitoring", "CPU_Temp=56", "--outbox", str(outbox), env=capture_source.env())
        assert online.returncode == 0, online.stderr
        points = wait_for_many(sub, 2)
    # The one kept from the run before goes out first.
    assert [p.value for p in points] == [55, 56]


def test_command_reaches_the_source(
    capture_user: User, capture_source_client: cm.SourceClient, capture_source: Source
) -> None:
    with capture_source_client.commands() as commands:
        done = run(
            "command", capture_source.source_id, "PLC/Process/Setpoint", "80", "--mapping", "DB1.W2",
            env=capture_user.env(),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        command = wait_for(commands)
    assert (command.variable, command.data, command.mapping) == ("Setpoint", "80", "DB1.W2")


def test_emulator_runs_in_the_foreground_and_its_settings_work(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [CLI, "emulator", "--plant", "1", "--env-dir", str(tmp_path), "--seconds", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        printed = "".join(lines)
        assert "mqtts://127.0.0.1:" in printed and "wss://127.0.0.1:" in printed and "/mqtt" in printed
        user_env = dict(line.split("=", 1) for line in (tmp_path / "user.env").read_text().splitlines())
        assert oct((tmp_path / "user.env").stat().st_mode & 0o777) == "0o600"
        assert user_env["CAPTURE_MQTT_PASSWORD"] not in printed  # secrets go to the file only
        done = run("tail", "--json", "--count", "2", env=user_env)
        assert done.returncode == 0, done.stderr
        assert len(done.stdout.splitlines()) == 2
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0 and "emulator stopped" in out
    assert run("tail", "--count", "1", "--seconds", "2", env=user_env | {"CAPTURE_MQTT_CLIENT_ID": "x"}).returncode == 1


def test_demo_shows_the_stream_and_a_summary_and_stops_by_itself() -> None:
    done = run("demo", "--seconds", "3", "--sources", "2", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Press1" in done.stdout and "Press2" in done.stdout
    assert "rows per machine and key" in done.stdout and "Temperature" in done.stdout
    assert "Everything is stopped" in done.stdout


@pytest.mark.parametrize("command", ["tail", "collect", "push", "command", "emulator", "demo"])
def test_every_command_has_useful_help(command: str) -> None:
    done = run(command, "--help")
    assert done.returncode == 0
    assert "usage: capture-mqtt" in done.stdout
    if command not in ("emulator", "demo"):
        assert "CAPTURE_MQTT" in done.stdout


def test_errors_are_one_clear_line_and_never_echo_the_password(capture_user: User) -> None:
    done = run("tail")
    assert done.returncode != 0 and "CAPTURE_MQTT_URL" in done.stderr
    env = capture_user.env() | {"CAPTURE_MQTT_PASSWORD": "Wr0ng-Secr3t!"}
    done = run("tail", "--count", "1", env=env)
    assert done.returncode == 1
    assert "AuthenticationError" in done.stderr and "Traceback" not in done.stderr
    assert "Wr0ng-Secr3t!" not in done.stderr + done.stdout
    done = run("collect", "-o", "out.txt", "--seconds", "1", env=capture_user.env())
    assert done.returncode != 0 and ".parquet or .csv" in done.stderr


def test_the_emulator_command_runs_from_a_thread_and_writes_plain_env_files(tmp_path: Path) -> None:
    """Only the main thread may set a signal handler: called from another thread (a notebook's, a
    test's), the command runs without its SIGTERM handler instead of failing."""
    import io
    import threading

    from capture_mqtt.cli import main

    out = io.StringIO()
    results: list[int] = []
    worker = threading.Thread(
        target=lambda: results.append(main(["emulator", "--seconds", "0.3", "--env-dir", str(tmp_path)], out=out))
    )
    worker.start()
    worker.join(60)
    assert results == [0], out.getvalue()
    # LF line ends and UTF-8 on every system: a POSIX shell sources these files.
    env = (tmp_path / "user.env").read_bytes()
    assert b"\r" not in env and env.endswith(b"\n") and b"CAPTURE_MQTT_PASSWORD=" in env
