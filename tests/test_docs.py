"""The documentation runs: every code block in the README, and the example in every public docstring."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

import capture_mqtt as cm

ROOT = Path(__file__).resolve().parent.parent
README_BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_python_examples() -> None:
    assert len(README_BLOCKS) >= 2


@pytest.mark.parametrize("block", README_BLOCKS, ids=[f"block{i}" for i in range(len(README_BLOCKS))])
def test_readme_block_runs(block: str) -> None:
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
