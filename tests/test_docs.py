"""The documentation runs: every code block in the README, and the example in every public docstring."""

from __future__ import annotations

import doctest
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import capture_mqtt as cm

ROOT = Path(__file__).resolve().parent.parent
README_BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_python_examples() -> None:
    assert len(README_BLOCKS) >= 2


@pytest.fixture(scope="module")
def readme_broker() -> Iterator[str]:
    """A local broker with the README's account, streaming Monitoring data; yields CAPTURE_MQTT_URL."""
    from capture_mqtt.testing import Account, Mosquitto

    accounts = [
        Account("alice", "alice-pw", [("read", "v1/raw/AcmeCorp/#"), ("write", "v1/sources/+/cmd/writedata")]),
        Account("pipeline", "pipeline-pw", [("readwrite", "#")]),
        Account("src-1", "src-pw", [("readwrite", "v1/sources/src-1/#")]),
    ]
    with Mosquitto(accounts=accounts, tls=False, websockets=False) as broker:
        stop = threading.Event()

        def stream() -> None:
            with cm.Client(
                broker.host,
                transport="mqtt",
                port=broker.mqtt_port,
                username="pipeline",
                password="pipeline-pw",
                account_kind="unknown",
            ) as pipeline:
                while not stop.wait(0.05):
                    pipeline.publish("v1/raw/AcmeCorp/src-1/Conn/Monitoring/CPU_Temp", cm.field_payload(55), qos=0)

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        os.environ["README_SOURCE_URL"] = f"mqtt://src-1:src-pw@127.0.0.1:{broker.mqtt_port}"
        yield f"mqtt://alice:alice-pw@127.0.0.1:{broker.mqtt_port}?company=AcmeCorp"
        del os.environ["README_SOURCE_URL"]
        stop.set()
        thread.join(timeout=5)


@pytest.mark.parametrize("block", README_BLOCKS, ids=[f"block{i}" for i in range(len(README_BLOCKS))])
def test_readme_block_runs(block: str, readme_broker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTURE_MQTT_URL", readme_broker)
    exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102 - our own README


PUBLIC = [name for name in cm.__all__ if name != "__version__"]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_runnable_example(name: str) -> None:
    obj = getattr(cm, name)
    doc = obj.__doc__ or ""
    examples = doctest.DocTestParser().get_examples(doc)
    assert examples, f"cm.{name} has no >>> example in its docstring"
    test = doctest.DocTestParser().get_doctest(doc, {"cm": cm}, f"cm.{name}", None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.tries == len(examples)
    assert runner.failures == 0, f"the example of cm.{name} fails"


def test_version() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", cm.__version__)


KIT_MODULES = [
    "capture_mqtt.testing",
    "capture_mqtt.testing.emulator",
    "capture_mqtt.testing.waiting",
    "capture_mqtt.testing.plant",
    "capture_mqtt.cli",
    "capture_mqtt.demo",
]


@pytest.mark.parametrize("module_name", KIT_MODULES)
def test_the_examples_of_the_testing_kit_and_the_cli_run(module_name: str) -> None:
    import importlib

    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module_name} has no examples"
    assert result.failed == 0
