"""The house's layout, held: which module may import which, read from the source with ``ast`` (nothing is run).

A packet's trip is visible in the layout only as long as imports point one way. The rules are written by
package and role, not by today's file names, so a new module lands in a layer by where it lives:

  layer        modules                                              may also import (outside tunneld)
  root         tunneld (the package itself: the version)            the standard library only
  codec        tunneld.encap.*: sans-IO codecs, their sessions,      cryptography, nacl (WireGuard's X25519,
               the plugins' contract                                 ChaCha20-Poly1305, XChaCha20-Poly1305:
                                                                     crypto comes from libraries, never by hand)
  pure         tunneld.offload.*: row work on super-frames           NumPy
  io           tunneld.io.*: the kernel's doors                     any dependency
  datapath     tunneld.datapath.*: the engine, the peer table,      NumPy
               FDB, routes, path MTU, counters
  composition  every other tunneld module: tunneld.config,          any dependency
               tunneld.control, tunneld.runtime, tunneld.observe
  cli          tunneld.cli, tunneld.__main__                        any dependency

A module imports tunneld modules of its own layer or a lower one, never a higher one (codec ← pure ← io ←
datapath ← composition ← cli). Beside the layers:
  - tunneld.observe.metrics (or a metrics package) is the only module that imports prometheus_client;
  - nothing in tunneld imports scapy, pytest, tests or bench;
  - the tooling, tunneld.testing (fakes, the conformance kit) and tunneld.testbed (namespaces), may import
    any layer; no layer imports the tooling (the daemon runs without it); the testbed imports nothing but the
    standard library and tunneld, so that tests and bench can share it with nothing else installed;
  - bench never imports tests (both stand on tunneld.testbed; tests may import bench to test it);
  - nothing under tests/ imports a test module (tests.test_*): shared helpers live in tunneld.testbed or in a
    tests helper module (tests.support, tests.frames, ...).
Imports inside functions and under ``if TYPE_CHECKING:`` count like any other: a dependency is a dependency.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WALKED = ("tunneld", "bench", "tests")


ANY = None  # as a module's allowed dependencies: any at all


@dataclass(frozen=True)
class Layer:
    name: str
    rank: int  # imports go to the same rank or a lower one
    prefixes: tuple[str, ...]  # the modules and packages it holds
    third_party: frozenset[str] | None  # the dependencies it may import beyond the stdlib and tunneld, or ANY


LAYERS = (
    Layer("root", 0, (), frozenset()),  # matched by exact name below: the package, not everything in it
    # the codecs' sessions encrypt (tunneld.encap.wireguard): primitives come from well-kept libraries only
    Layer("codec", 0, ("tunneld.encap",), frozenset({"cryptography", "nacl"})),
    Layer("pure", 1, ("tunneld.offload",), frozenset({"numpy"})),
    Layer("io", 2, ("tunneld.io",), ANY),
    Layer("datapath", 3, ("tunneld.datapath",), frozenset({"numpy"})),
    Layer("composition", 4, (), ANY),  # the default for a tunneld module no other layer claims
    Layer("cli", 5, ("tunneld.cli", "tunneld.__main__"), ANY),
)
BY_NAME = {layer.name: layer for layer in LAYERS}
# The tooling, and the dependencies each may import beyond the stdlib and tunneld (never pytest nor scapy).
TOOLING = {"tunneld.testing": ANY, "tunneld.testbed": frozenset()}
PROMETHEUS_IMPORTERS = ("tunneld.observe.metrics",)
NEVER_IN_TUNNELD = frozenset({"scapy", "pytest", "tests", "bench"})


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def top(name: str) -> str:
    return name.split(".", 1)[0]


def is_tooling(name: str) -> bool:
    return any(under(name, t) for t in TOOLING)


def layer_of(name: str) -> Layer | None:
    """The layer of a tunneld module; None for the tooling and for anything outside tunneld."""
    if top(name) != "tunneld" or is_tooling(name):
        return None
    if name == "tunneld":
        return BY_NAME["root"]
    for layer in LAYERS:
        if any(under(name, p) for p in layer.prefixes):
            return layer
    return BY_NAME["composition"]


def is_stdlib(name: str) -> bool:
    return top(name) in sys.stdlib_module_names


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import in ``graph`` (module → the modules it imports, dotted names) that breaks a rule above."""
    found = []
    for importer in sorted(graph):
        mine = layer_of(importer)
        in_tunneld = top(importer) == "tunneld"
        for imported in sorted(graph[importer]):
            def bad(why: str) -> None:
                found.append(f"{importer} imports {imported}: {why}")

            theirs = layer_of(imported)
            if in_tunneld and top(imported) in NEVER_IN_TUNNELD:
                bad(f"nothing in tunneld imports {top(imported)}")
            elif in_tunneld and top(imported) == "prometheus_client" and not any(
                    under(importer, p) for p in PROMETHEUS_IMPORTERS):
                bad("only tunneld.observe.metrics imports prometheus_client (metrics are built at scrape time there)")
            elif mine is not None and is_tooling(imported):
                bad("the daemon never imports its test tooling (tunneld.testing, tunneld.testbed)")
            elif mine is not None and theirs is not None and theirs.rank > mine.rank:
                bad(f"the {mine.name} layer imports from the {theirs.name} layer above it "
                    "(codec ← pure ← io ← datapath ← composition ← cli)")
            elif in_tunneld and top(imported) != "tunneld" and not is_stdlib(imported):
                tool = next((t for t in TOOLING if under(importer, t)), None)
                allowed = TOOLING[tool] if tool else mine.third_party
                if allowed is not ANY and top(imported) not in allowed:
                    what = tool or f"the {mine.name} layer"
                    also = f" and {', '.join(sorted(allowed))}" if allowed else ""
                    bad(f"{what} imports only the standard library{also} from outside tunneld")
            elif top(importer) == "bench" and top(imported) == "tests":
                bad("bench never imports tests: both use tunneld.testbed")
            elif top(importer) == "tests" and imported.startswith("tests.test_"):
                bad("test modules do not import each other: shared helpers go to tunneld.testbed or a tests "
                    "helper module (tests.support, tests.frames)")
    return found


# -- reading the source --------------------------------------------------------------------------------------


def modules_under(root: Path, packages: tuple[str, ...] = WALKED) -> dict[str, Path]:
    """Dotted name → file, for every module of the given packages (only directories that are packages)."""
    found = {}

    def walk(directory: Path, dotted: str) -> None:
        found[dotted] = directory / "__init__.py"
        for path in sorted(directory.iterdir()):
            if path.is_dir() and (path / "__init__.py").exists():
                walk(path, f"{dotted}.{path.name}")
            elif path.suffix == ".py" and path.name != "__init__.py":
                found[f"{dotted}.{path.stem}"] = path

    for package in packages:
        if (root / package / "__init__.py").exists():
            walk(root / package, package)
    return found


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The dotted names ``module`` imports, anywhere in its source. ``from P import N`` names P.N when that is
    one of the ``known`` modules, else P; relative imports are resolved against ``module``'s package."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                package = f"{base}.{node.module}" if node.module else base
            else:
                package = node.module or ""
            if package == "__future__":
                continue
            for alias in node.names:
                candidate = f"{package}.{alias.name}"
                out.add(candidate if candidate in known else package)
    return out


def module_graph(root: Path, packages: tuple[str, ...] = WALKED) -> dict[str, set[str]]:
    files = modules_under(root, packages)
    known = set(files)
    return {name: imports_of(path.read_text(), name, path.name == "__init__.py", known) for name, path in files.items()}


# -- the tree itself -----------------------------------------------------------------------------------------


def test_the_tree_keeps_the_house_rules():
    graph = module_graph(REPO)
    # The walk found the house, not an empty directory: every layer and both tooling packages are there,
    # and the top of it reaches into the layers below.
    populated = {layer_of(m).name for m in graph if layer_of(m) is not None}
    assert populated == {layer.name for layer in LAYERS}, populated
    assert all(any(under(m, t) for m in graph) for t in TOOLING)
    assert {layer_of(i).name for i in graph["tunneld.cli"] if layer_of(i)} - {"cli"}
    assert violations(graph) == []


# -- the checker, on synthetic graphs ------------------------------------------------------------------------

# A small house that keeps every rule: one module per layer, the tooling, bench and tests.
HOUSE = {
    "tunneld": set(),
    "tunneld.encap.base": {"enum", "dataclasses"},
    "tunneld.encap.vxlan": {"struct", "tunneld.encap.base", "tunneld"},
    "tunneld.encap.wireguard.primitives": {"hashlib", "cryptography.hazmat.primitives.ciphers.aead", "nacl.bindings"},
    "tunneld.offload.segment": {"numpy", "tunneld.encap.checksum"},
    "tunneld.datapath.stats": {"collections", "tunneld.encap.base"},
    "tunneld.io.udp": {"socket", "tunneld.offload.segment", "pyroute2"},
    "tunneld.datapath.engine": {"asyncio", "tunneld.io.udp", "tunneld.datapath.stats"},
    "tunneld.runtime.modes": {"tunneld.encap.vxlan", "importlib.metadata"},
    "tunneld.runtime.plan": {"tunneld.runtime.modes", "tunneld.datapath.engine"},
    "tunneld.observe.metrics": {"prometheus_client.core", "tunneld.datapath.engine"},
    "tunneld.supervisor": {"tunneld.observe.metrics", "tunneld.runtime.plan", "uvloop"},
    "tunneld.cli": {"argparse", "tunneld.supervisor", "tunneld.runtime.modes"},
    "tunneld.__main__": {"tunneld.cli"},
    "tunneld.testing": {"tunneld.datapath.engine", "tunneld.encap.base", "random", "numpy"},
    "tunneld.testbed.netns": {"subprocess", "tunneld.testbed.peers"},
    "tunneld.testbed.peers": {"tunneld.testbed.netns", "tunneld.cli"},
    "bench.run": {"tunneld.testbed", "bench.measure"},
    "tests.support": {"tunneld.testbed"},
    "tests.test_bench": {"bench.run", "tests.support", "scapy.layers.inet", "pytest", "prometheus_client.parser"},
}


def test_the_synthetic_house_is_clean():
    assert violations(HOUSE) == []


@pytest.mark.parametrize("importer,imported,why", [
    ("tunneld.encap.vxlan", "tunneld.io.udp", "codec layer imports from the io layer"),
    ("tunneld.encap.gre", "numpy", "codec layer imports only the standard library and cryptography, nacl"),
    ("tunneld.encap.wireguard.device", "scapy.contrib.wireguard", "nothing in tunneld imports scapy"),
    ("tunneld", "tunneld.config", "root layer imports from the composition layer"),
    ("tunneld.offload.segment", "tunneld.io.device", "pure layer imports from the io layer"),
    ("tunneld.offload.gather", "pyroute2", "pure layer imports only the standard library and numpy"),
    ("tunneld.offload.segment", "tunneld.datapath.stats", "pure layer imports from the datapath layer"),
    ("tunneld.io.udp", "tunneld.datapath.engine", "io layer imports from the datapath layer"),
    ("tunneld.datapath.engine", "pyroute2", "datapath layer imports only the standard library and numpy"),
    ("tunneld.io.tun", "tunneld.config", "io layer imports from the composition layer"),
    ("tunneld.datapath.engine", "tunneld.runtime.daemon", "datapath layer imports from the composition layer"),
    ("tunneld.datapath.ports", "tunneld.control.server", "datapath layer imports from the composition layer"),
    ("tunneld.supervisor", "tunneld.cli", "composition layer imports from the cli layer"),
    ("tunneld.runtime.service", "prometheus_client", "only tunneld.observe.metrics imports prometheus_client"),
    ("tunneld.testing", "prometheus_client.core", "only tunneld.observe.metrics imports prometheus_client"),
    ("tunneld.io.raw", "scapy.layers.l2", "nothing in tunneld imports scapy"),
    ("tunneld.observe.metrics", "pytest", "nothing in tunneld imports pytest"),
    ("tunneld.runtime.daemon", "tests.support", "nothing in tunneld imports tests"),
    ("tunneld.testbed.netns", "bench.measure", "nothing in tunneld imports bench"),
    ("tunneld.runtime.workers", "tunneld.testbed", "the daemon never imports its test tooling"),
    ("tunneld.datapath.engine", "tunneld.testing", "the daemon never imports its test tooling"),
    ("tunneld.testbed.prom", "numpy", "tunneld.testbed imports only the standard library from"),
    ("bench.systems", "tests.netns", "bench never imports tests"),
    ("tests.test_offload_gre_netns", "tests.test_gre_netns", "test modules do not import each other"),
    ("tests.support", "tests.test_vxlan_netns", "test modules do not import each other"),
])
def test_each_rule_catches_its_violation(importer, imported, why):
    graph = {m: set(i) for m, i in HOUSE.items()}
    graph.setdefault(importer, set()).add(imported)
    [found] = violations(graph)
    assert found.startswith(f"{importer} imports {imported}: ") and why in found, found


def test_imports_are_read_from_every_form(tmp_path):
    pkg = tmp_path / "tunneld"
    (pkg / "io").mkdir(parents=True)
    for name in ("__init__.py", "stats.py", "io/__init__.py", "io/udp.py", "io/raw.py"):
        (pkg / name).write_text("")
    (pkg / "io" / "raw.py").write_text(
        "from __future__ import annotations\n"
        "import os.path, numpy as np\n"
        "from typing import TYPE_CHECKING\n"
        "from . import udp\n"                      # a sibling module, relatively
        "from .. import stats\n"                   # a module of the parent package
        "from ..io.udp import Sender\n"            # a name from a module
        "if TYPE_CHECKING:\n"
        "    from tunneld.config import Peer\n"    # typing-only: still a dependency
        "def late():\n"
        "    import prometheus_client.core\n"     # inside a function: still a dependency
        "    from tunneld import testbed\n"       # not a module of this tree: counted as the package
    )
    (pkg / "io" / "__init__.py").write_text("from .udp import Sender\n")
    graph = module_graph(tmp_path, ("tunneld",))
    assert set(graph) == {"tunneld", "tunneld.stats", "tunneld.io", "tunneld.io.udp", "tunneld.io.raw"}
    assert graph["tunneld.io.raw"] == {"os.path", "numpy", "typing", "tunneld.io.udp", "tunneld.stats",
                                      "tunneld.config", "prometheus_client.core", "tunneld"}
    assert graph["tunneld.io"] == {"tunneld.io.udp"}
    found = violations(graph)
    assert "tunneld.io.raw imports tunneld.config: the io layer imports from the composition layer above it " \
           "(codec ← pure ← io ← datapath ← composition ← cli)" in found
    assert any(v.startswith("tunneld.io.raw imports prometheus_client.core: ") for v in found)
