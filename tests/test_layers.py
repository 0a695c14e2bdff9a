"""The import graph of the data path holds the house's layering: encap ← offload ← io ← engine.

Codecs see bytes only; offload/ is pure NumPy over bytes and codec declarations; io/ (the kernel's doors and
the device ports) may use both; only the engine wires them together. A module that reaches up the stack
would make the lower layer untestable alone, or let a codec touch a socket."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "tunneld"
# what each layer may import from tunneld (its own layer included)
ALLOWED = {
    "encap": {"encap"},
    "offload": {"encap", "offload"},
    "io": {"encap", "offload", "io"},
}


def tunneld_imports(path: Path) -> set[str]:
    """The tunneld sub-packages or modules ``path`` imports, e.g. {"encap", "offload", "stats"}."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "tunneld" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_what_lies_below_it(layer):
    for path in sorted((ROOT / layer).glob("*.py")):
        assert tunneld_imports(path) <= ALLOWED[layer], f"{path.name} imports {tunneld_imports(path)}"


def test_the_engine_wires_the_layers_and_nothing_above_them():
    assert tunneld_imports(ROOT / "engine.py") <= {"encap", "offload", "io", "stats"}
