"""The documentation runs: every code block in the README, and the example in every public docstring."""

from __future__ import annotations

import doctest
import inspect
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
        os.environ["SOURCE_URL"] = f"mqtt://src-1:src-pw@127.0.0.1:{broker.mqtt_port}"
        yield f"mqtt://alice:alice-pw@127.0.0.1:{broker.mqtt_port}?company=AcmeCorp"
        del os.environ["SOURCE_URL"]
        stop.set()
        thread.join(timeout=5)


@pytest.mark.parametrize("block", README_BLOCKS, ids=[f"block{i}" for i in range(len(README_BLOCKS))])
def test_readme_block_runs(block: str, readme_broker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTURE_MQTT_URL", readme_broker)
    exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102 - our own README


PUBLIC = [name for name in cm.__all__ if name != "__version__"]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_runnable_example(name: str, readme_broker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTURE_MQTT_URL", readme_broker)
    obj = getattr(cm, name)
    doc = obj.__doc__ or ""
    examples = doctest.DocTestParser().get_examples(doc)
    assert examples, f"cm.{name} has no >>> example in its docstring"
    assert not any(".__name__" in example.source for example in examples), f"cm.{name}'s example only names it"
    test = doctest.DocTestParser().get_doctest(doc, {"cm": cm}, f"cm.{name}", None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.tries == len(examples)
    assert runner.failures == 0, f"the example of cm.{name} fails"


def _public_methods() -> dict[str, Any]:
    """Every public method of the public classes, once per function (a method a class inherits
    from another public class is the same function), by its qualified name."""
    found: dict[str, Any] = {}
    seen: set[int] = set()
    for name in PUBLIC:
        owner = getattr(cm, name)
        if not inspect.isclass(owner) or issubclass(owner, BaseException):
            continue
        for attr in dir(owner):
            if attr.startswith("_"):
                continue
            raw = inspect.getattr_static(owner, attr)
            function = raw.__func__ if isinstance(raw, classmethod | staticmethod) else raw
            if not callable(function) or isinstance(function, type) or id(function) in seen:
                continue
            module = getattr(function, "__module__", None) or ""
            if not (module.startswith("capture_mqtt") or type(function).__name__ == "method_descriptor"):
                continue
            seen.add(id(function))
            found[f"{owner.__name__}.{attr}"] = function
    return found


METHODS = _public_methods()


def test_every_public_method_is_found() -> None:
    assert {"Client.publish", "AsyncClient.publish", "SourceClient.push_frame", "DataPoint.to_dict"} <= set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_public_method_has_a_real_example(name: str, readme_broker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each example runs against a local broker with the README's accounts: ``CAPTURE_MQTT_URL`` is
    the user's, ``SOURCE_URL`` the source's. An example that only names the method shows nothing."""
    monkeypatch.setenv("CAPTURE_MQTT_URL", readme_broker)
    doc = METHODS[name].__doc__ or ""
    parser = doctest.DocTestParser()
    examples = parser.get_examples(doc)
    assert examples, f"{name} has no >>> example in its docstring"
    assert not any(".__name__" in example.source for example in examples), f"{name}'s example only names it"
    test = parser.get_doctest(doc, {"cm": cm}, name, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0, f"the example of {name} fails"


def test_version() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", cm.__version__)


KIT_MODULES = [
    "capture_mqtt.testing",
    "capture_mqtt.testing.emulator",
    "capture_mqtt.testing.mosquitto",
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
    for test in doctest.DocTestFinder().find(module):
        assert not any(".__name__" in example.source for example in test.examples), f"{test.name} only names it"
