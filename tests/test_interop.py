"""The interoperability scenarios (interop/) in `make test`: against Mosquitto and amqtt, a broker of
another implementation that installs in seconds from PyPI. Every cell: the SDK at least as good as
paho-mqtt, the control. `make interop` runs the whole table, at full size, on every broker."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("INTEROP_MESSAGES", "2000")  # the table uses 10,000

from interop import brokers, scenarios
from interop.run import protocol_errors

KINDS = [brokers.MosquittoBroker, brokers.AmqttBroker]
#: paho's cells, by broker and scenario.
PAHO: dict[tuple[str, str], scenarios.Cell] = {}


@pytest.fixture(scope="module", params=KINDS, ids=[k.name for k in KINDS])
def broker(request: pytest.FixtureRequest) -> Iterator[brokers.Broker]:
    kind: type[brokers.Broker] = request.param
    reason = kind.unavailable()
    if reason is not None:
        pytest.fail(f"{kind.name} should be installed by `make test`: {reason}")
    with kind() as running:
        yield running
        errors = protocol_errors(running.log_text())
        assert not errors, f"protocol errors in {kind.name}'s log: {errors[:3]}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("name", "scenario"), scenarios.SCENARIOS, ids=[n for n, _ in scenarios.SCENARIOS])
def test_the_sdk_is_at_least_as_good_as_paho(broker: brokers.Broker, name: str, scenario: scenarios.Scenario) -> None:
    sdk = scenarios.run_cell(scenario, broker, "sdk")
    # paho has one way to consume: the stream rows differ for the SDK only, so paho runs once.
    control = (broker.name, name.split(",", maxsplit=1)[0] if name.startswith("stream QoS 1") else name)
    if control not in PAHO:
        PAHO[control] = scenarios.run_cell(scenario, broker, "paho")
    paho = PAHO[control]
    if name in scenarios.MEASURED:
        assert (sdk.count or 0) >= (paho.count or 0), f"{name}: SDK {sdk}, paho {paho}"
        return
    if (broker.name, name) not in scenarios.KNOWN:
        assert not (sdk.status == "fail" and paho.status == "pass"), f"{name}: SDK {sdk}, paho {paho}"
    if (broker.name, name) in scenarios.KNOWN:
        # A broker's departure from the specification, explained in the table: still there?
        assert sdk.status == "fail", f"{name}: the known limitation changed ({sdk}); update interop.scenarios.KNOWN"
    else:
        assert sdk.status != "fail", f"{name}: {sdk.detail} (paho: {paho})"
