"""The local Capture emulator: listeners, accounts and scopes, Capture's server side, clean-up, and the
pytest plugin used from a project outside this repository."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

import capture_mqtt as cm
from capture_mqtt.testing import CaptureEmulator, Company, Source, User, wait_for, wait_for_many, wait_until
from capture_mqtt.testing.mosquitto import MosquittoNotFoundError, connack_code, find_mosquitto
from capture_mqtt.testing.plant import SimulatedPlant


@contextlib.contextmanager
def _running(client: Any, emu: CaptureEmulator, port: int | None = None) -> Iterator[Any]:
    """A paho-mqtt client connected to the emulator (plain MQTT unless `port` says otherwise), its
    network loop running; stopped and disconnected afterwards."""
    client.connect(emu.host, port or emu.mqtt_port)
    client.loop_start()
    try:
        yield client
    finally:
        client.loop_stop()
        client.disconnect()


@pytest.mark.parametrize("transport", ["mqtts", "wss", "mqtt"])
def test_every_account_kind_connects_on_every_listener(
    capture_emulator: CaptureEmulator, capture_company: Company, transport: str
) -> None:
    emu = capture_emulator
    accounts = [
        emu.add_user(capture_company, f"user-{transport}"),
        emu.add_api_token(capture_company),
        emu.add_jwt_user(capture_company, f"jwt-{transport}"),
    ]
    for account in accounts:
        with emu.client(account, transport) as client:  # type: ignore[arg-type]
            assert client.is_connected
            assert client.address.startswith(f"{transport}://127.0.0.1:")
    with emu.source_client(emu.add_source(capture_company), transport) as source:  # type: ignore[arg-type]
        assert source.is_connected


def test_the_plain_constructor_and_from_env_connect_with_an_accounts_settings(
    capture_emulator: CaptureEmulator, capture_user: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = capture_user.client_options("wss")
    assert options["transport"] == "wss" and options["path"] == "/mqtt" and options["port"] == capture_emulator.wss_port
    with cm.Client(**options) as client:
        assert client.is_connected and client.company == capture_user.company.name
    for name, value in capture_user.env("mqtts").items():
        monkeypatch.setenv(name, value)
    with cm.Client.from_env() as client:
        assert client.is_connected
    assert capture_user.password not in repr(capture_user)


def test_tls_listeners_verify_against_the_emulators_ca(capture_emulator: CaptureEmulator, capture_user: User) -> None:
    options = capture_user.client_options("mqtts")
    del options["ca_pem"]
    with pytest.raises(cm.ConnectError, match="certificate"):
        cm.Client(**options, reconnect=False, connect_timeout=5)


def test_a_push_appears_on_the_raw_tree_as_capture_publishes_it(
    capture_emulator: CaptureEmulator, capture_client: cm.Client, capture_source_client: cm.SourceClient
) -> None:
    company = capture_client.company
    assert company is not None
    with capture_client.subscribe(cm.raw_filter(company), qos=1, decode="bytes") as raw:
        before = datetime.now(UTC)
        capture_source_client.push("PLC", "Monitoring", {"CPU_Temp": 55, "CPU_Load": 23.4}, tags={"Line": "A"})
        capture_source_client.push_field("PLC", "Line", "Speed", 1.5, timestamp=1731061326260)
        messages = wait_for_many(raw, 3)
    by_key = {m.topic.rsplit("/", 1)[1]: json.loads(m.payload) for m in messages}
    source_id = capture_source_client.source_id
    assert sorted(m.topic for m in messages) == sorted(
        cm.raw_topic(company, source_id, "PLC", measurement, key)
        for measurement, key in [("Monitoring", "CPU_Temp"), ("Monitoring", "CPU_Load"), ("Line", "Speed")]
    )
    assert by_key["CPU_Temp"]["Value"] == 55 and by_key["CPU_Load"]["Value"] == 23.4
    assert by_key["CPU_Temp"]["Tags"] == {"Connection_Tag": "PLC", "Line": "A"}
    stamped = datetime.fromisoformat(by_key["CPU_Temp"]["UtcTimestamp"])  # filled in by "Capture"
    assert before.replace(microsecond=0) <= stamped <= datetime.now(UTC)
    assert by_key["Speed"]["UtcTimestamp"] == "2024-11-08T10:22:06.260Z"  # epoch ms, as ISO 8601
    assert capture_emulator.stats["republished_pushes"] >= 2


def test_a_malformed_push_is_counted_and_the_stream_goes_on(
    capture_emulator: CaptureEmulator, capture_client: cm.Client, capture_source: Source
) -> None:
    rejected = capture_emulator.stats["rejected_pushes"]
    # A plain client logged in as the source, so that nothing checks the payload before it is sent.
    options = capture_source.client_options("mqtt")
    options["username"] = options.pop("source_id")
    topic = cm.data_topic(capture_source.source_id, "PLC", "Monitoring")
    with capture_client.subscribe_raw(qos=1) as sub, cm.Client(**options, account_kind="source") as device:
        device.publish(topic, b'{"CPU_Temp": [1, 2', qos=1)
        device.publish(topic, cm.measurement_payload({"CPU_Temp": 56}), qos=1)
        assert wait_for(sub).value == 56
    assert capture_emulator.stats["rejected_pushes"] == rejected + 1


def test_companies_are_isolated_and_scopes_hold(capture_emulator: CaptureEmulator) -> None:
    emu = capture_emulator
    acme, other = emu.add_company("ScopeAcme"), emu.add_company("ScopeOther")
    alice, acme_source = emu.add_user(acme, "scope-alice"), emu.add_source(acme)
    bob, other_source = emu.add_user(other, "scope-bob"), emu.add_source(other)
    with (
        emu.client(alice) as alice_client,
        emu.client(bob) as bob_client,
        emu.source_client(acme_source) as acme_device,
        emu.source_client(other_source) as other_device,
        other_device.commands() as other_commands,
    ):
        # The SDK refuses a wildcard company, another company's raw tree and another source's topics
        # before sending anything.
        with pytest.raises(cm.TopicError, match="company"):
            alice_client.subscribe("v1/raw/+/+/+/+/#")
        with pytest.raises(cm.TopicError, match='company "ScopeAcme"'):
            alice_client.subscribe(cm.raw_filter(other.name))
        with pytest.raises(cm.TopicError, match="own"):
            acme_device.publish(cm.data_topic(other_source.source_id, "PLC", "M"), b"{}")

        # The broker enforces them too, as Capture does: with the SDK's check turned off, alice is
        # disconnected for subscribing to the other company's data, which the SDK reports as the
        # AuthorizationError it is ...
        with (
            emu.client(alice, scope=False) as unchecked,
            pytest.raises(cm.AuthorizationError, match="ScopeOther"),
        ):
            unchecked.subscribe(cm.raw_filter(other.name), qos=1)

        # ... and for a command to its source (a source id the SDK cannot tell from her own
        # company's), while its own user's command arrives.
        with pytest.raises(cm.AuthorizationError, match=other_source.source_id):
            alice_client.send_command(other_source.source_id, "PLC/Process/Setpoint", "1")
        bob_client.send_command(other_source.source_id, "PLC/Process/Setpoint", "2")
        assert wait_for(other_commands).data == "2"
        assert other_commands.get(timeout=0.3) is None


def test_jwt_users_get_tokens_from_the_auth_api_and_the_broker_checks_them_as_capture_does(
    capture_emulator: CaptureEmulator, capture_company: Company
) -> None:
    emu = capture_emulator
    carol = emu.add_jwt_user(capture_company, "carol")
    first = cm.fetch_jwt("carol", carol.password, base_url=emu.portal_url)
    claims = json.loads(base64.urlsafe_b64decode(first.split(".")[1] + "=="))
    assert claims["sub"] == "carol" and 7100 < claims["exp"] - time.time() <= 7200
    assert connack_code(emu.host, emu.mqtt_port, "carol", first) == 0
    assert connack_code(emu.host, emu.mqtt_port, "carol", carol.password) == 4  # the login is not a token
    # A new token leaves the earlier ones valid until they expire, as on Capture.
    second = carol.token()
    assert connack_code(emu.host, emu.mqtt_port, "carol", first) == 0
    assert connack_code(emu.host, emu.mqtt_port, "carol", second) == 0
    with emu.client(carol, auth=cm.Auth.jwt("carol", first)) as client:
        assert client.is_connected
    # Expired, signed by someone else, or another user's: refused as bad credentials (3.1.1 code 4).
    dave = emu.add_jwt_user(capture_company, "jwt-dave")
    with CaptureEmulator() as elsewhere:
        foreign = elsewhere.add_jwt_user(elsewhere.add_company(capture_company.name), "carol").token()
    for token in (carol.token(valid_for=-1), foreign):
        assert connack_code(emu.host, emu.mqtt_port, "carol", token) == 4
    assert connack_code(emu.host, emu.mqtt_port, "jwt-dave", carol.token()) == 4
    assert connack_code(emu.host, emu.mqtt_port, "jwt-dave", dave.token()) == 0
    with pytest.raises(cm.AuthenticationError, match="refused"):
        cm.fetch_jwt("carol", "wrong password", base_url=emu.portal_url)
    # The SDK reports an expired token as the AuthenticationError it is.
    expired = cm.Auth.jwt("carol", carol.token(valid_for=-1))
    with pytest.raises(cm.AuthenticationError):
        emu.client(carol, auth=expired, reconnect=False, connect_timeout=5)
    with emu.client(carol) as client:  # auth=cm.Auth.jwt(name, carol.token): a fresh token per connect
        assert client.is_connected


@pytest.mark.parametrize("protocol", [3, 5])
def test_a_jwt_connection_is_closed_when_its_token_expires(
    capture_emulator: CaptureEmulator, capture_company: Company, protocol: int, caplog: pytest.LogCaptureFixture
) -> None:
    emu = capture_emulator
    fast = cm.Reconnect(min_delay=0.05, max_delay=0.2)
    erin = emu.add_jwt_user(capture_company, f"erin-{protocol}")
    # paho-mqtt: closed at exp, with DISCONNECT 0x87 under MQTT 5; an expired token is refused
    # (CONNACK 0x86 under MQTT 5).
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    reasons: list[Any] = []
    plain = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5 if protocol == 5 else paho.MQTTv311)
    plain.username_pw_set(erin.username, erin.token(valid_for=2))
    plain.on_disconnect = lambda _c, _u, _f, reason, _p: reasons.append(reason)
    with _running(plain, emu):
        wait_until(plain.is_connected, timeout=5)
        wait_until(lambda: reasons, timeout=6)
    if protocol == 5:
        assert int(getattr(reasons[0], "value", reasons[0])) == 0x87, reasons
        answers: list[Any] = []
        late = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        late.username_pw_set(erin.username, erin.token(valid_for=-1))
        late.on_connect = lambda _c, _u, _f, reason, _p: answers.append(reason)
        with _running(late, emu):
            wait_until(lambda: answers, timeout=5)
        assert int(getattr(answers[0], "value", answers[0])) == 0x86, answers
    assert emu._gateway is not None
    closed_at_exp = emu._gateway.stats()["expired_logins"]
    # The SDK with a token it cannot renew: closed at exp, then refused, and it says why.
    events: list[cm.ConnectionEvent] = []
    auth = cm.Auth.jwt(erin.username, erin.token(valid_for=2))
    caplog.set_level(logging.WARNING, logger="capture_mqtt")
    with emu.client(erin, transport="mqtt", protocol=protocol, auth=auth, reconnect=fast) as client:
        client.on_event(events.append)
        wait_until(lambda: "was refused" in caplog.text, timeout=8)
    disconnected = next(e for e in events if e.kind == "disconnected")
    if protocol == 5:
        assert disconnected.reason is not None and "NotAuthorized" in disconnected.reason
    assert "the token has expired" in caplog.text and "give cm.Auth.jwt a callable" in caplog.text
    assert emu._gateway.stats()["expired_logins"] == closed_at_exp + 1
    # With a callable, it logs in again with a fresh token before the old one expires: never closed.
    auth = cm.Auth.jwt(erin.username, lambda: erin.token(valid_for=4))
    events.clear()
    with emu.client(erin, transport="mqtt", protocol=protocol, auth=auth, reconnect=fast) as client:
        client.on_event(events.append)
        wait_until(lambda: [e.kind for e in events].count("connected") >= 2, timeout=10)
        assert client.is_connected
    assert emu._gateway.stats()["expired_logins"] == closed_at_exp + 1


def test_a_source_connects_from_its_auth_config_file(capture_emulator: CaptureEmulator, capture_source: Source) -> None:
    config = json.loads(capture_source.auth_config_path.read_text())
    assert config["SourceId"] == capture_source.source_id and config["Port"] == capture_emulator.mqtts_port
    assert oct(capture_source.auth_config_path.stat().st_mode & 0o777) == "0o600"
    with cm.SourceClient.from_auth_config(capture_source.auth_config_path, ca_file=capture_emulator.ca_file) as src:
        assert src.is_connected and src.source_id == capture_source.source_id


def test_a_revoked_account_can_no_longer_log_in(capture_emulator: CaptureEmulator, capture_company: Company) -> None:
    dave = capture_emulator.add_user(capture_company, "dave")
    capture_emulator.revoke(dave)
    with pytest.raises(cm.AuthenticationError):
        capture_emulator.client(dave, reconnect=False, connect_timeout=5)


def test_accounts_are_checked(capture_emulator: CaptureEmulator, capture_company: Company) -> None:
    with pytest.raises(ValueError, match=r"invalid company name 'Acme\+'"):
        capture_emulator.add_company("Acme+")
    capture_emulator.add_user(capture_company, "erin")
    with pytest.raises(ValueError, match="already exists"):
        capture_emulator.add_user(capture_company, "erin")
    with CaptureEmulator() as elsewhere, pytest.raises(ValueError, match="not a company of this emulator"):
        elsewhere.add_user(capture_company, "frank")


def test_the_simulated_plant_pushes_steadily_and_answers_commands(
    capture_emulator: CaptureEmulator, capture_company: Company, capture_client: cm.Client
) -> None:
    with (
        capture_client.subscribe_raw(qos=1) as sub,
        SimulatedPlant(capture_emulator, capture_company, sources=2, rate=20) as plant,
    ):
        points = wait_for_many(sub, 40)
        assert {p.tags["MachineName"] for p in points} == {"Press1", "Press2"}
        assert {p.key for p in points} >= {"Temperature", "Pressure", "Speed", "State"}
        capture_client.send_command(plant.machine("Press2").source.source_id, "PLC/Process/Setpoint", 88)
        answer = wait_for(sub, lambda p: p.key == "Setpoint")
        assert (answer.tags["MachineName"], answer.value) == ("Press2", 88.0)
        assert plant.machine("Press2").setpoint == 88.0


def _process_runs(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_stop_ends_the_broker_and_removes_its_files_also_after_an_error() -> None:
    emulator = CaptureEmulator()
    pid, workdir = None, emulator.broker.workdir

    def crash() -> None:
        nonlocal pid
        with emulator as emu:
            pid = emu.broker.pid
            assert pid is not None and workdir.exists()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        crash()
    assert not workdir.exists()
    assert pid is not None and not _process_runs(pid)


def test_a_process_that_exits_with_the_emulator_running_leaves_nothing_behind(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        from capture_mqtt.testing import CaptureEmulator
        emu = CaptureEmulator().start()
        acme = emu.add_company("AcmeCorp")
        client = emu.client(emu.add_user(acme, "alice"))
        print(emu.broker.pid, emu.broker.workdir, flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    pid, workdir = done.stdout.split()
    assert not Path(workdir).exists()
    deadline = time.monotonic() + 5
    while _process_runs(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _process_runs(int(pid)), "the broker outlived the process"


def test_a_missing_mosquitto_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPTURE_MQTT_MOSQUITTO", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr("os.access", lambda path, mode: False)
    with pytest.raises(MosquittoNotFoundError, match="apt-get install mosquitto"):
        find_mosquitto()


def test_mosquitto_is_found_where_notebooks_and_other_systems_have_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    binary = find_mosquitto()
    monkeypatch.setenv("CAPTURE_MQTT_MOSQUITTO", binary)
    assert find_mosquitto() == binary
    monkeypatch.setenv("CAPTURE_MQTT_MOSQUITTO", "mosquitto")  # a name: looked up on the PATH
    assert find_mosquitto() == shutil.which("mosquitto")
    for wrong in (tmp_path / "nowhere", tmp_path):  # no such file; a folder
        monkeypatch.setenv("CAPTURE_MQTT_MOSQUITTO", str(wrong))
        with pytest.raises(MosquittoNotFoundError, match="CAPTURE_MQTT_MOSQUITTO is"):
            find_mosquitto()
    monkeypatch.delenv("CAPTURE_MQTT_MOSQUITTO")
    # Homebrew on Apple silicon, whose sbin a notebook's PATH often lacks.
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr("os.access", lambda path, mode: path == "/opt/homebrew/sbin/mosquitto")
    assert find_mosquitto() == "/opt/homebrew/sbin/mosquitto"
    monkeypatch.setattr("sys.platform", "win32")
    with pytest.raises(MosquittoNotFoundError, match=r"needs Linux or macOS.*WSL"):
        find_mosquitto()


def test_a_port_taken_before_the_broker_binds_it_is_replaced() -> None:
    """free_port() finds a port free, and another process may take it before Mosquitto binds it (an
    outgoing connection's ephemeral port): the first start then picks new ports."""
    import socket

    from capture_mqtt.testing import Mosquitto

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: as an outgoing connection's port is
        broker = Mosquitto(anonymous=True, tls=False, websockets=False)
        broker.mqtt_port = taken.getsockname()[1]
        broker._write_files()
        with broker:
            assert broker.mqtt_port != taken.getsockname()[1]
            assert connack_code(broker.host, broker.mqtt_port, "any", "any") == 0
            # Once started, its ports are the clients' to keep: a restart does not change them.
            port = broker.mqtt_port
            broker.restart()
            assert broker.mqtt_port == port


def test_a_missing_dynamic_security_plugin_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from capture_mqtt.testing import mosquitto

    if sys.platform == "linux":  # Debian's package has it (make test installs it); Homebrew's has none
        assert mosquitto.find_dynsec_plugin().endswith("mosquitto_dynamic_security.so")
    monkeypatch.setattr(mosquitto, "DYNSEC_PLUGINS", ())
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: None)
    with pytest.raises(MosquittoNotFoundError, match=r"dynamic-security plugin .* \(dynsec=False\)"):
        mosquitto.Mosquitto(dynsec=True, tls=False, websockets=False)


def test_the_package_imports_without_the_posix_only_modules() -> None:
    """Windows has no pwd, grp, fcntl, resource or termios: importing the SDK, its command and its
    testing kit (which the pytest plugin and conftest files load) must not need them."""
    script = (
        "import sys\n"
        "for name in ('pwd', 'grp', 'fcntl', 'resource', 'termios'):\n"
        "    sys.modules[name] = None\n"
        "import capture_mqtt, capture_mqtt.cli, capture_mqtt.testing, capture_mqtt.testing.emulator\n"
        "import capture_mqtt.testing.mosquitto, capture_mqtt.testing.plant, capture_mqtt.testing.pytest_plugin\n"
        "print('imported')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.strip() == "imported", done.stderr


def test_the_pytest_plugin_works_in_a_project_outside_this_repository(tmp_path: Path) -> None:
    (tmp_path / "test_my_plant.py").write_text(
        textwrap.dedent(
            """
            import capture_mqtt as cm
            from capture_mqtt.testing import wait_for


            def test_a_pushed_value_reaches_a_user(capture_client, capture_source_client):
                with capture_client.subscribe_raw(qos=1) as sub:
                    capture_source_client.push("PLC", "Monitoring", {"CPU_Temp": 55})
                    point = wait_for(sub, lambda p: p.key == "CPU_Temp", timeout=10)
                assert point.value == 55


            def test_a_command_reaches_the_source(capture_client, capture_source_client, capture_source):
                with capture_source_client.commands() as commands:
                    capture_client.send_command(capture_source.source_id, "PLC/Process/Setpoint", 80)
                    assert wait_for(commands, timeout=10).data == "80"


            def test_companies_do_not_share_data(capture_company, capture_emulator):
                assert capture_company.name in repr(capture_company)
                assert capture_emulator.mqtts_port
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    done = subprocess.run(
        # As a project with `filterwarnings = error` runs it: a leaked file or socket fails the run.
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


# Capture's gateway: refusals as Capture's broker makes them, faults on demand.


def _paho(emu: CaptureEmulator, account: User | Source, protocol: int) -> Any:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    version = paho.MQTTv5 if protocol == 5 else paho.MQTTv311
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=version)
    client.username_pw_set(account.username, account.password)
    client.connect(emu.host, emu.mqtt_port)
    client.loop_start()
    wait_until(client.is_connected, timeout=5)
    return client


@pytest.mark.parametrize("protocol", [3, 5])
def test_the_gateway_disconnects_a_subscribe_or_publish_outside_the_scope(
    capture_emulator: CaptureEmulator, capture_user: User, protocol: int
) -> None:
    emu = capture_emulator
    # A plain paho-mqtt client: disconnected right away, as Capture's page says (0x87 under MQTT 5).
    requests = [
        ("subscribe", "v1/raw/SomeoneElse/#"),  # another company's raw tree
        ("subscribe", "v1/raw/+/#"),  # every company's: refused whatever it would deliver
        ("publish", "v1/raw/SomeoneElse/s/C/M/K"),  # users write commands only
    ]
    reasons: list[Any] = []
    for count, (request, topic) in enumerate(requests, start=1):
        client = _paho(emu, capture_user, protocol)
        client.on_disconnect = lambda _c, _u, _f, reason, _p: reasons.append(reason)
        if request == "subscribe":
            client.subscribe(topic)
        else:
            client.publish(topic, b"55", qos=1)
        wait_until(lambda: len(reasons) >= count, timeout=5)  # noqa: B023 - awaited within the iteration
        client.loop_stop()
        client.disconnect()
    if protocol == 5:
        assert [int(getattr(r, "value", r)) for r in reasons[:3]] == [0x87, 0x87, 0x87], reasons
    # The SDK, its own scope checks turned off so that the request goes out: the disconnect is
    # reported as the AuthorizationError it is, on the plain and the TLS listener. (`v1/raw/+/#`
    # it refuses before sending, whatever the scope setting: no Capture broker takes it.)
    for transport in ("mqtt", "mqtts"):
        for request, topic in requests:
            with emu.client(capture_user, transport=transport, protocol=protocol, scope=False) as client:
                if "+" in topic:
                    with pytest.raises(cm.TopicError, match="wildcards the company level"):
                        client.subscribe(topic)
                    continue
                send = (
                    (lambda: client.subscribe(topic, timeout=10))  # noqa: B023 - called right here
                    if request == "subscribe"
                    else (lambda: client.publish(topic, b"55", qos=1, timeout=10))  # noqa: B023
                )
                with pytest.raises(cm.AuthorizationError, match=topic):
                    send()
    assert emu._gateway is not None and emu._gateway.stats()["refused_scope"] >= 7


def test_the_gateway_refuses_a_packet_over_one_megabyte(capture_emulator: CaptureEmulator) -> None:
    emu = capture_emulator
    source = emu.add_source(emu.add_company("BigCorp"))
    events: list[str] = []
    with emu.source_client(source, transport="mqtt", max_packet_size=4 << 20, reconnect=False) as device:
        device.on_event(lambda event: events.append(event.kind))
        device.publish(f"v1/sources/{source.source_id}/data/read/C/M", b"x" * (2 << 20), qos=0)
        wait_until(lambda: not device.is_connected, timeout=5)
    assert emu._gateway is not None and emu._gateway.stats()["refused_size"] == 1
    # paho-mqtt under MQTT 5: DISCONNECT 0x95, "packet too large".
    reasons: list[Any] = []
    plain = _paho(emu, source, 5)
    plain.on_disconnect = lambda _c, _u, _f, reason, _p: reasons.append(reason)
    plain.publish(f"v1/sources/{source.source_id}/data/read/C/M", b"x" * (2 << 20), qos=0)
    try:
        wait_until(lambda: reasons, timeout=5)
    finally:
        plain.loop_stop()
        plain.disconnect()
    assert int(getattr(reasons[0], "value", reasons[0])) == 0x95, reasons
    assert emu._gateway.stats()["refused_size"] == 2


def test_faults_stall_delay_and_drop_connections(capture_emulator: CaptureEmulator, capture_company: Company) -> None:
    emu = capture_emulator
    alice = emu.add_user(capture_company, "faulty-alice")
    reconnect = cm.Reconnect(min_delay=0.05, max_delay=0.2)
    with (
        emu.client(alice, transport="mqtt", reconnect=reconnect) as client,
        client.subscribe_raw(qos=1) as sub,
        emu.source_client(emu.add_source(capture_company), transport="mqtt", reconnect=reconnect) as device,
    ):
        # A stall holds the traffic while the connections stay open.
        emu.faults.stall(0.5)
        started = time.monotonic()
        device.push_field("C", "Stall", "V", 1, wait=False)
        point = wait_for(sub, lambda p: p.measurement == "Stall", timeout=10)
        assert point.value == 1 and time.monotonic() - started >= 0.4
        assert client.is_connected and device.is_connected
        # Latency delays each way.
        emu.faults.latency(150)
        started = time.monotonic()
        device.push_field("C", "Late", "V", 2)  # waits for the acknowledgement: there and back
        assert time.monotonic() - started >= 0.3
        emu.faults.latency(0)
        # Dropped connections come back by themselves, subscriptions included.
        emu.faults.drop_connections()
        wait_until(lambda: client.stats["reconnects"] >= 1 and client.is_connected, timeout=10)
        device.push_field("C", "After", "V", 3)
        assert wait_for(sub, lambda p: p.measurement == "After", timeout=10).value == 3


def _websocket_status(emu: CaptureEmulator, path: str, subprotocol: str | None) -> str:
    """The status line the WebSocket-over-TLS listener answers a handshake with."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(emu.ca_file))
    assert emu.wss_port is not None
    with (
        socket.create_connection((emu.host, emu.wss_port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=emu.host) as tls,
    ):
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {emu.host}:{emu.wss_port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
            *([f"Sec-WebSocket-Protocol: {subprotocol}"] if subprotocol else []),
        ]
        tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return tls.recv(4096).decode(errors="replace").split("\r\n")[0]


def test_the_websocket_listener_takes_only_mqtt_on_its_path(
    capture_emulator: CaptureEmulator, capture_user: User
) -> None:
    emu = capture_emulator
    assert " 101 " in _websocket_status(emu, "/mqtt", "mqtt")
    assert " 101 " in _websocket_status(emu, "/mqtt", "mqtt-v5")
    assert " 400 " in _websocket_status(emu, "/mqtt", None)
    assert " 400 " in _websocket_status(emu, "/mqtt", "chat")
    assert " 404 " in _websocket_status(emu, "/", "mqtt")
    # The SDK and paho-mqtt connect on /mqtt; a request outside the scope disconnects there too.
    with emu.client(capture_user, transport="wss") as client, client.subscribe_raw() as sub:
        assert sub.get(timeout=0.2) is None
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    plain = paho.Client(CallbackAPIVersion.VERSION2, transport="websockets")
    plain.ws_set_options(path="/mqtt")
    plain.tls_set(ca_certs=str(emu.ca_file))
    plain.username_pw_set(capture_user.username, capture_user.password)
    with _running(plain, emu, emu.wss_port or 0):
        wait_until(plain.is_connected, timeout=5)
    with (
        emu.client(capture_user, transport="wss", scope=False) as client,
        pytest.raises(cm.AuthorizationError, match="SomeoneElse"),
    ):
        client.subscribe("v1/raw/SomeoneElse/#", timeout=10)


def test_a_later_stall_is_not_ended_by_an_earlier_one(capture_emulator: CaptureEmulator, capture_user: User) -> None:
    emu = capture_emulator
    with emu.client(capture_user, transport="mqtt") as client:
        emu.faults.stall(0.1)
        emu.faults.stall(1.5)
        started = time.monotonic()
        client.publish(f"v1/sources/{emu.add_source(capture_user.company).source_id}/cmd/writedata", b"{}")
        assert time.monotonic() - started >= 1.2  # held by the second stall, not released by the first


def _paho_login(emu: CaptureEmulator, account: User, protocol: int = 3, **options: Any) -> Any:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    version = paho.MQTTv5 if protocol == 5 else paho.MQTTv311
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=version, **options)
    client.username_pw_set(account.username, account.password)
    return client


def test_the_broker_advertises_capture_limits_and_keeps_1000_messages_per_client(
    capture_emulator: CaptureEmulator, capture_company: Company
) -> None:
    emu = capture_emulator
    user = emu.add_user(capture_company, "queue-user")
    raw = cm.raw_filter(capture_company.name)
    topic = f"v1/raw/{capture_company.name}/s/C/M/K"
    assert emu._pipeline is not None

    def publish_while_away(count: int) -> None:
        assert emu._pipeline is not None
        for i in range(count):
            emu._pipeline.publish(topic, str(i).encode(), qos=1)

    # MQTT 5's CONNACK says 32 in flight and 1 MB packets, as Capture's broker does.
    properties: list[Any] = []
    probe = _paho_login(emu, user, protocol=5)
    probe.on_connect = lambda _c, _u, _f, _r, props: properties.append(props.json())
    with _running(probe, emu):
        wait_until(lambda: properties, timeout=5)
    assert properties[0]["ReceiveMaximum"] == 32 and properties[0]["MaximumPacketSize"] == 1 << 20

    # A persistent session away while 1,500 messages come keeps 1,000. Mosquitto keeps the oldest
    # (0-999), where Capture's broker keeps the newest: the documented difference.
    got: list[bytes] = []
    subscribed: list[Any] = []
    plain = _paho_login(emu, user, client_id="queue-paho", clean_session=False)
    plain.on_subscribe = lambda *args: subscribed.append(args)
    with _running(plain, emu):
        wait_until(plain.is_connected, timeout=5)
        plain.subscribe(raw, qos=1)
        wait_until(lambda: subscribed, timeout=5)
    publish_while_away(1500)
    plain = _paho_login(emu, user, client_id="queue-paho", clean_session=False)
    plain.on_message = lambda _c, _u, message: got.append(message.payload)
    with _running(plain, emu):
        wait_until(plain.is_connected, timeout=5)
        emu._pipeline.publish(topic, b"end", qos=1)
        wait_until(lambda: b"end" in got, timeout=10)
    assert got == [str(i).encode() for i in range(1000)] + [b"end"]

    # The SDK sees the same.
    options: dict[str, Any] = {"client_id": "queue-sdk", "clean_session": False, "transport": "mqtt"}
    with emu.client(user, **options) as client:
        client.subscribe(raw, qos=1)  # kept by the session (closing it would unsubscribe)
    publish_while_away(1500)
    client = emu.client(user, connect=False, **options)
    with client, client.subscribe(raw, qos=1, decode="bytes") as sub:
        client.connect()
        emu._pipeline.publish(topic, b"end", qos=1)
        payloads = [m.payload for m in wait_for_many(sub, 1001, timeout=20)]
    assert payloads == [str(i).encode() for i in range(1000)] + [b"end"]


def test_a_second_connection_with_a_client_id_takes_the_session_over(
    capture_emulator: CaptureEmulator, capture_user: User
) -> None:
    emu = capture_emulator
    # paho-mqtt under MQTT 5: DISCONNECT 0x8E when the SDK connects with its client id.
    reasons: list[Any] = []
    plain = _paho_login(emu, capture_user, protocol=5, client_id="twin-paho")
    plain.on_disconnect = lambda _c, _u, _f, reason, _p: reasons.append(reason)
    with _running(plain, emu):
        wait_until(plain.is_connected, timeout=5)
        with emu.client(capture_user, transport="mqtt", protocol=5, client_id="twin-paho") as newcomer:
            wait_until(lambda: reasons, timeout=5)
            assert newcomer.is_connected
    assert int(getattr(reasons[0], "value", reasons[0])) == 0x8E, reasons
    # A login the broker refuses takes nothing over.
    refused = _paho_login(emu, capture_user, protocol=5, client_id="twin-paho")
    refused.username_pw_set(capture_user.username, "not the password")
    answers: list[Any] = []
    refused.on_connect = lambda _c, _u, _f, reason, _p: answers.append(reason)
    with emu.client(capture_user, transport="mqtt", protocol=5, client_id="twin-paho") as holder:
        with _running(refused, emu):
            wait_until(lambda: answers, timeout=5)
        # Refused as EMQX does: "bad username or password" (0x86; 4 under 3.1.1), not Mosquitto's
        # "not authorized".
        assert int(getattr(answers[0], "value", answers[0])) == 0x86 and holder.is_connected
        assert connack_code(emu.host, emu.mqtt_port, capture_user.username, "not the password") == 4
        assert holder.stats["reconnects"] == 0
    # The SDK, taken over: its disconnect says so.
    events: list[cm.ConnectionEvent] = []
    options: dict[str, Any] = {"transport": "mqtt", "protocol": 5, "client_id": "twin-sdk"}
    with emu.client(capture_user, reconnect=False, **options) as first:
        first.on_event(events.append)
        with emu.client(capture_user, **options):
            wait_until(lambda: any(e.kind == "disconnected" for e in events), timeout=5)
    reason = next(e.reason for e in events if e.kind == "disconnected")
    assert reason is not None and "SessionTakenOver" in reason, reason


def test_a_persistent_311_session_expires_when_its_client_stays_away() -> None:
    # Capture keeps a 3.1.1 persistent session two hours; this emulator keeps it one second.
    with CaptureEmulator(websockets=False, session_expiry=1.0) as emu:
        user = emu.add_user(emu.add_company("ExpiryCorp"), "expiry-user")
        options: dict[str, Any] = {"client_id": "expiring", "clean_session": False, "transport": "mqtt"}
        present: list[bool | None] = []

        def visit() -> None:
            events: list[cm.ConnectionEvent] = []
            with emu.client(user, connect=False, **options) as client:
                client.on_event(events.append)
                client.connect()
                client.subscribe(cm.raw_filter("ExpiryCorp"), qos=1).close()
            present.append(next(e.session_present for e in events if e.kind == "connected"))

        visit()
        visit()  # back at once: the session is there
        time.sleep(1.5)  # the time an away client's session lives is what is tested
        visit()  # back too late: a new session
        assert present == [False, True, False]
        # paho-mqtt sees the same.
        flags: list[Any] = []
        for visits, pause in enumerate((0.0, 0.0, 1.5), start=1):
            time.sleep(pause)  # as above: the absence itself is the condition
            plain = _paho_login(emu, user, client_id="expiring-paho", clean_session=False)
            plain.on_connect = lambda _c, _u, connect_flags, _r, _p: flags.append(connect_flags.session_present)
            with _running(plain, emu):
                wait_until(lambda: len(flags) == visits, timeout=5)  # noqa: B023 - awaited here
        assert flags == [False, True, False]
        assert emu._gateway is not None and emu._gateway.stats()["expired_sessions"] >= 2


@pytest.mark.parametrize("protocol", [3, 5])
def test_in_reason_code_mode_a_refusal_is_a_failure_code(protocol: int) -> None:
    # EMQX's other deny mode: the connection stays, the refusal is in SUBACK (and PUBACK under 5).
    with CaptureEmulator(websockets=False, deny="reason_code") as emu:
        acme = emu.add_company("CodeAcme")
        user = emu.add_user(acme, "code-user")
        granted: list[list[int]] = []
        acked: list[Any] = []
        plain = _paho_login(emu, user, protocol=protocol)
        plain.on_subscribe = lambda _c, _u, _m, codes, _p: granted.append([int(getattr(c, "value", c)) for c in codes])
        plain.on_publish = lambda _c, _u, _m, reason, _p: acked.append(reason)
        with _running(plain, emu):
            wait_until(plain.is_connected, timeout=5)
            plain.subscribe([("v1/raw/Elsewhere/#", 1), (cm.raw_filter("CodeAcme"), 1)])
            wait_until(lambda: granted, timeout=5)
            plain.publish("v1/raw/CodeAcme/s/C/M/K", b"55", qos=1)
            wait_until(lambda: acked, timeout=5)
            assert plain.is_connected()
        assert granted == [[0x87 if protocol == 5 else 0x80, 1]]
        if protocol == 5:
            assert int(getattr(acked[0], "value", acked[0])) == 0x87
        # The SDK reports both as the AuthorizationError they are, and stays connected.
        with emu.client(user, transport="mqtt", protocol=protocol, scope=False) as client:
            with pytest.raises(cm.AuthorizationError, match="Elsewhere"):
                client.subscribe("v1/raw/Elsewhere/#", qos=1, timeout=10)
            if protocol == 5:
                with pytest.raises(cm.AuthorizationError, match="v1/raw/CodeAcme"):
                    client.publish("v1/raw/CodeAcme/s/C/M/K", b"55", qos=1, timeout=10)
            assert client.is_connected
            with client.subscribe(cm.raw_filter("CodeAcme"), qos=1):
                pass
        assert emu._gateway is not None and emu._gateway.stats()["refused_scope"] == 3 + (protocol == 5)
