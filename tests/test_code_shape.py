"""The shape a newcomer can read: short modules, short functions, checked by a test.

A module over ``MAX_MODULE_LINES`` or a function over ``MAX_FUNCTION_LINES`` needs a
stated reason here; generated code (protobuf) is exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "molink"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
GENERATED = {"transport/molink_pb2.py", "transport/molink_pb2_grpc.py"}
# path relative to molink/ -> why it may be longer
LONG_MODULES: dict[str, str] = {}
# "path:function" -> why it may be longer
LONG_FUNCTIONS: dict[str, str] = {}


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name not in GENERATED:
            yield name, path.read_text()


def test_no_module_is_too_long_without_a_reason():
    long = {name: text.count("\n") for name, text in _sources()
            if text.count("\n") > MAX_MODULE_LINES and name not in LONG_MODULES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split by noun): {long}"


def test_no_function_is_too_long_without_a_reason():
    long = {}
    for name, text in _sources():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                key = f"{name}:{node.name}"
                if lines > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                    long[key] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (name the steps): {long}"


def test_every_stated_exception_is_still_needed():
    """An exception whose module or function got short again is removed from the list."""
    texts = dict(_sources())
    for name in LONG_MODULES:
        assert texts[name].count("\n") > MAX_MODULE_LINES, name
    for key in LONG_FUNCTIONS:
        name, function = key.split(":")
        nodes = [n for n in ast.walk(ast.parse(texts[name]))
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == function]
        assert any(n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES for n in nodes), key
