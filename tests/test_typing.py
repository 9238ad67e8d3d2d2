"""What a user's type checker sees: mypy --strict over a script written as a user writes one."""

from __future__ import annotations

import re
from pathlib import Path

import mypy.api

USER_SCRIPT = """
from typing import assert_type

import capture_mqtt as cm
from capture_mqtt.testing import wait_for


def read(client: cm.Client, source: cm.SourceClient) -> None:
    with client.subscribe_raw(measurement="Monitoring") as sub:
        assert_type(sub, cm.Subscription[cm.DataPoint])
        assert_type(sub.get(timeout=10), cm.DataPoint | None)
        for each in sub:
            assert_type(each, cm.DataPoint)
        assert_type(wait_for(sub), cm.DataPoint)
        point = sub.get(timeout=10)
        print(point.source_id)  # expect: union-attr
        if point is not None:
            print(point.source_id, point.value)
    assert_type(source.commands().get(), cm.Command | None)
    assert_type(client.subscribe("plant/line1", decode="bytes").get(), cm.Message | None)
    assert_type(client.subscribe("v1/raw/AcmeCorp/#", decode="raw"), cm.Subscription[cm.DataPoint])
    client.subscribe_raw(queue_sise=10)  # expect: call-arg
    client.subscribe_raw(overflow="drop")  # expect: arg-type
    cm.field_payload(1, naive="UTC")  # expect: arg-type
    cm.Client("broker.example", keep_alive=30)  # expect: call-arg
    cm.Client("broker.example", transport="tcp")  # expect: arg-type
    cm.Client.from_url("mqtts://broker.example", outbox_sinc="always")  # expect: call-arg
    cm.SourceClient("broker.example", source_id="s1", password="p", ofline="raise")  # expect: call-arg
    cm.SourceClient.from_auth_config("auth.json", offline="queue")  # expect: arg-type


async def read_async(client: cm.AsyncClient) -> None:
    cm.AsyncClient("broker.example", max_packet_sise=1)  # expect: call-arg
    cm.AsyncSourceClient.from_env(keepalive="30")  # expect: arg-type
    sub = await client.subscribe_raw()
    assert_type(await sub.get(timeout=1), cm.DataPoint | None)
    async for each in sub:
        assert_type(each, cm.DataPoint)
"""


def test_mypy_checks_a_users_script(tmp_path: Path) -> None:
    """Items are typed (``get()`` may be None, so reading it unchecked is an error), and a misspelt
    or mistyped option is found before the script runs."""
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n")
    stdout, stderr, _ = mypy.api.run(
        ["--strict", "--config-file", str(config), "--cache-dir", str(tmp_path / "cache"), str(script)]
    )
    found = {
        (int(line), code)
        for line, code in re.findall(r"^[^:]*user_script\.py:(\d+): error: .*\[([a-z-]+)\]$", stdout, re.MULTILINE)
    }
    expected = {
        (number, match.group(1))
        for number, text in enumerate(USER_SCRIPT.splitlines(), start=1)
        if (match := re.search(r"# expect: ([a-z-]+)", text))
    }
    assert found == expected, stdout + stderr
