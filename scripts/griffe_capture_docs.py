"""Griffe extension for the API reference site (mkdocs + mkdocstrings-python), no docstring changed.

1. The classes of the compiled `capture_mqtt._core` declared `#[pyclass(module = "capture_mqtt")]`
   (DataPoint, Command, Message, MalformedMessage, TopicInfo) come out of griffe as a cycle of aliases
   (`_core.X` -> `capture_mqtt.X` -> `_core.X`) ending on the bare `.pyi` stub class, which has no
   docstring, so mkdocstrings leaves them out. This puts the stub class (annotations) into `_core` and
   gives it, and each of its members, the docstring of the compiled class.
2. The submodule `capture_mqtt.collect` shadows the function `capture_mqtt.collect` it defines, so
   griffe documents the module and leaves the function out. This renames the module `_collect`
   inside griffe only, and puts the function back under its public name.
3. `>>>` examples are not Markdown (they read as nested block quotes): each run of them, up to the
   next blank line, is fenced as a `pycon` code block.
4. Sphinx roles (:class:`X`, :meth:`Client.connect`, :func:`load_auth_config`, ...) become
   mkdocs-autorefs links to the public path (`capture_mqtt.X`, `capture_mqtt.Client.connect`); a role
   naming a builtin (`ValueError`) becomes plain code, and one naming nothing public is a warning
   (an error under `mkdocs build --strict`).

Each step does nothing once the project no longer needs it.
"""

from __future__ import annotations

import builtins
import inspect
import re
from pathlib import Path
from typing import Any

import griffe

logger = griffe.get_logger("griffe_capture_docs")

_ROLE = re.compile(r":(?:py:)?(?:class|exc|meth|func|attr|obj|data|mod|const):`(~?)([\w.]+)(?:\(\))?`")


def _runtime_doc(obj: object) -> str | None:
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def _target(obj: griffe.Object | griffe.Alias) -> griffe.Object | None:
    if isinstance(obj, griffe.Alias):
        try:
            return obj.final_target
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
    return obj


class _Doc:
    def __init__(self, doc: str) -> None:
        self.__doc__ = doc


class CaptureDocs(griffe.Extension):
    """See the module's docstring."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "capture_mqtt":
            return
        self.pkg = pkg
        self.loader = loader
        self.public = {str(name) for name in pkg.exports or ()}
        self._fix_compiled_classes()
        self._fix_shadowed_function("collect")
        self._seen: set[int] = set()
        self._walk(pkg)
        for name in sorted(self.public):
            self._walk(pkg.members[name])

    # 1. compiled classes re-homed to the package
    def _fix_compiled_classes(self) -> None:
        core = self.pkg.members.get("_core")
        if not isinstance(core, griffe.Module):
            return
        if not isinstance(core.filepath, Path) or core.filepath.suffix == ".pyi":
            # Only the stub was read: the compiled module is not built, or did not import.
            logger.warning("capture_mqtt._core could not be imported: build it first (make build)")
            return
        runtime = griffe.dynamic_import(core.path, self.loader.finder.search_paths)
        for name, member in list(core.members.items()):
            if isinstance(member, griffe.Attribute):
                self._fix_constant(member, getattr(runtime, name, None))
            if not (isinstance(member, griffe.Alias) and member.target_path == f"{self.pkg.path}.{name}"):
                continue
            stub = _target(self.pkg.members[name])
            if not isinstance(stub, griffe.Class):
                logger.warning("capture_mqtt._core.%s: no stub class to document", name)
                continue
            core.set_member(name, stub)
            compiled = getattr(runtime, name)
            self._fill_doc(stub, compiled)
            for member_name, stub_member in stub.members.items():
                if isinstance(stub_member, griffe.Object) and not member_name.startswith("_"):
                    self._fill_doc(stub_member, getattr(compiled, member_name, None))

    def _fix_constant(self, attribute: griffe.Attribute, value: object) -> None:
        """Inspection gives a constant the docstring of its type: `__version__` gets `str`'s."""
        if attribute.docstring is not None and attribute.docstring.value == _runtime_doc(type(value)):
            attribute.docstring = None
        if attribute.name == "__version__":
            self._fill_doc(attribute, _Doc("The version of capture-mqtt, as `major.minor.patch`."))

    def _fill_doc(self, obj: griffe.Object, compiled: object) -> None:
        doc = _runtime_doc(compiled)
        if obj.docstring is None and doc:
            obj.docstring = griffe.Docstring(
                doc,
                parent=obj,
                parser=self.loader.docstring_parser,
                parser_options=self.loader.docstring_options,
            )

    # 2. a submodule shadowing the function of the same name
    def _fix_shadowed_function(self, name: str) -> None:
        module = self.pkg.members.get(name)
        if not isinstance(module, griffe.Module) or name not in module.members:
            return
        function = module.members[name]
        del self.pkg.members[name]
        module.name = f"_{name}"
        self.pkg.set_member(module.name, module)
        self.pkg.set_member(name, griffe.Alias(name, function, parent=self.pkg))

    # 3 and 4. the text of the docstrings of the public objects and their members, inherited ones too
    def _walk(self, member: griffe.Object | griffe.Alias) -> None:
        obj = _target(member)
        if obj is None or id(obj) in self._seen:
            return
        if obj is not self.pkg and not obj.path.startswith(f"{self.pkg.path}."):
            return
        self._seen.add(id(obj))
        if obj.docstring is not None:
            text = self._fence_doctests(obj.docstring.value)
            obj.docstring.value = _ROLE.sub(lambda match: self._role(obj, match), text)
        if isinstance(obj, griffe.Class):
            for inner in obj.all_members.values():
                self._walk(inner)

    @staticmethod
    def _fence_doctests(text: str) -> str:
        out: list[str] = []
        in_fence = in_example = False
        fence_indent = ""
        for line in text.splitlines():
            stripped = line.lstrip()
            indent = line[: len(line) - len(stripped)]
            if in_example and not stripped:
                out.append(f"{fence_indent}```")
                in_example = False
            elif not in_example and stripped.startswith("```"):
                in_fence = not in_fence
            elif not in_fence and not in_example and stripped.startswith(">>>"):
                fence_indent = indent
                out.append(f"{indent}```pycon")
                in_example = True
            out.append(line)
        if in_example:
            out.append(f"{fence_indent}```")
        return "\n".join(out)

    def _role(self, owner: griffe.Object, match: re.Match[str]) -> str:
        tilde, target = match.groups()
        title = target.rsplit(".", 1)[-1] if tilde else target
        first, _, rest = target.partition(".")
        parent = owner.parent
        cls = owner if owner.is_class else parent if parent is not None and parent.is_class else None
        identifier: str | None = None
        if first in self.public:
            identifier = f"{self.pkg.path}.{first}"
        elif cls is not None and cls.name in self.public and first in cls.all_members:
            identifier = f"{self.pkg.path}.{cls.name}.{first}"
        elif hasattr(builtins, first):
            return f"`{title}`"
        if identifier is not None and rest:
            identifier = f"{identifier}.{rest}"
        if identifier is not None:
            try:
                self.loader.modules_collection.get_member(identifier)
            except Exception:  # any failure means the name is not documented
                identifier = None
        if identifier is None:
            logger.warning("%s: %s names nothing in the public API", owner.path, match.group(0))
            return f"`{title}`"
        return f"[`{title}`][{identifier}]"
