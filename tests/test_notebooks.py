"""The notebooks run, top to bottom, so they can never rot."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs), (
        "the plot was drawn"
    )


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS


def _requirements(extra: str, extras: dict[str, list[str]], seen: set[str]) -> set[str]:
    names: set[str] = set()
    for requirement in extras[extra]:
        name = re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()
        if name == "capture-mqtt":
            for inner in re.findall(r"\[(.*)\]", requirement)[0].split(","):
                if inner not in seen:
                    seen.add(inner)
                    names |= _requirements(inner.strip(), extras, seen)
        else:
            names.add(name)
    return names


def test_the_notebooks_extra_installs_what_the_notebooks_use() -> None:
    """`pip install 'capture-mqtt[notebooks]'` is all a reader needs: every module a notebook
    imports, and matplotlib for its plots, come with that extra."""
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    installed = _requirements("notebooks", pyproject["project"]["optional-dependencies"], set())
    distributions = importlib.metadata.packages_distributions()
    missing = set()
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
        code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
        modules = set(re.findall(r"^\s*(?:import|from)\s+(\w+)", code, re.MULTILINE))
        if ".plot(" in code:
            modules.add("matplotlib")
        for module in modules - set(sys.stdlib_module_names) - {"capture_mqtt"}:
            if not {d.lower() for d in distributions.get(module, [module])} & installed:
                missing.add(f"{path.name}: {module}")
    assert not missing, f"not in the notebooks extra: {sorted(missing)}"
