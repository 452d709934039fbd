"""docs/ARCHITECTURE.md matches the code: what it names exists, and it names every module."""

from __future__ import annotations

import re
from pathlib import Path

from molink.model.registry import registered_models

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "molink"
DOC = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
GENERATED = {"transport/molink_pb2.py", "transport/molink_pb2_grpc.py"}


def _modules() -> set[str]:
    """Modules a newcomer must find on the map: all but package markers, generated code and
    the architecture files (the map explains them as a kind)."""
    architectures = {f"model/{entry.module}.py" for entry in registered_models().values()}
    return {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
            if path.name != "__init__.py"} - GENERATED - architectures


def _named() -> set[str]:
    return set(re.findall(r"`([\w/]+\.py)`", DOC))


def test_every_module_named_on_the_map_exists():
    modules = _modules() | {f"model/{e.module}.py" for e in registered_models().values()}
    basenames = {m.rsplit("/", 1)[-1] for m in modules}
    missing = {name for name in _named() if name not in modules and name not in basenames
               and not (ROOT / name).exists()}
    assert not missing, f"docs/ARCHITECTURE.md names modules that do not exist: {missing}"


def test_every_module_is_on_the_map():
    named = _named()
    absent = {m for m in _modules() if m not in named and m.rsplit("/", 1)[-1] not in named}
    assert not absent, f"modules missing from docs/ARCHITECTURE.md: {sorted(absent)}"


def test_every_package_is_on_the_map():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    absent = {p for p in packages if f"`{p}/`" not in DOC}
    assert not absent, f"packages missing from docs/ARCHITECTURE.md: {absent}"
