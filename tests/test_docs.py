"""The documentation says what the program does: README.md and docs/*.md, read as an operator would use them.

Every example is run through the code it describes, without root and without starting anything:
  - TOML blocks parse; a block with a [tunnel] table passes `tunneld --config FILE --check`;
  - every `tunneld ...` command line in a code block parses, and the daemon's pass `--check`; the client
    commands (show, peer) parse with their own parser; `python -m bench.run ...` lines with the bench's;
    every `make TARGET` names a target of the Makefile;
  - Python blocks run (the plugin example's declarations, the conformance class);
  - control-socket requests are accepted by the server's parser; the registry record decodes; the `show --json`
    example uses only the fields its schema table lists.
The reference tables list exactly what the code has: every flag of the parser, every file key, every metric
the exporter exports, every drop reason. Every file, link and anchor the docs name exists, and the design map
follows the folders of tunneld/.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import base64
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from bench import run as bench_run
from tunneld import cli
from tunneld.config.loading import SECTIONS
from tunneld.control import server
from tunneld.control.client import build_control_parser
from tunneld.control.registry import RegistryStats, decode
from tunneld.datapath.engine import Engine
from tunneld.datapath.peers import PeerSpec
from tunneld.encap.base import Drop, declared
from tunneld.encap.plugins import discover
from tunneld.encap.vxlan import Vxlan
from tunneld.encap.wireguard import StaticKey, key_to_base64
from tunneld.encap.wireguard.codec import WireGuard
from tunneld.observe.metrics import RegistryCollector, TunnelCollector
from tunneld.testing import FakeDevice, FakeLink

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
PLUGIN_DIR = REPO / "tests" / "plugins" / "tunneld-ipudp"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence
    lang: str
    text: str

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file (also those indented inside a list item)."""
    found, lines, i = [], path.read_text().split("\n"), 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        indent, start, body = len(fence.group(1)), i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        found.append(Block(path, start, fence.group(2), "\n".join(body)))
        i += 1
    return found


ALL_BLOCKS = [b for path in DOCS for b in blocks(path)]
PROMPT = re.compile(r"^(?:[A-Z]#\s+|#\s+|host [A-Z]:\s+)")


def shell_lines(block: Block) -> list[str]:
    """Each command of a code block: continuation lines joined, the prompt ("A# ", "host A:  ") and a
    trailing comment removed."""
    out, pending = [], ""
    for raw in block.text.split("\n"):
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = PROMPT.sub("", line.strip())
        line = re.split(r"\s#\s", line, maxsplit=1)[0].strip()
        if line:
            out.append(line)
    return out


def commands(program: str) -> list[tuple[str, list[str]]]:
    """(where, argv) of every `program ...` line in the docs' code blocks that is an example, not a synopsis
    (a synopsis has [optional] parts, alternatives or "...")."""
    found = []
    for block in ALL_BLOCKS:
        if block.lang not in ("", "sh", "console"):
            continue
        for line in shell_lines(block):
            for part in line.split("&&"):
                if part.split()[: len(program.split())] != program.split() or re.search(r"\[|\||\.\.\.", part):
                    continue
                found.append((block.where(), shlex.split(part)[len(program.split()):]))
    return found


def _check_daemon(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([*argv, "--check"] if "--check" not in argv else argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue() + err.getvalue()


# -- the README ------------------------------------------------------------------------------------------------


def test_the_readme_starts_with_make_demo_and_make_test_and_stays_short():
    first = next(b for b in blocks(README))
    assert [line.split("#")[0].strip() for line in first.text.strip().split("\n")] == ["make demo", "make test"]
    assert len(README.read_text().split("\n")) <= 300


def test_the_readme_security_section_names_only_flags_the_parser_has():
    """The security section (the encrypted mode) must not name a flag the parser lacks."""
    text = README.read_text()
    section = text.split("## Security: the encrypted mode", 1)[1].split("\n## ", 1)[0]
    flags = set(re.findall(r"--[a-z][a-z-]+", section))
    known = set(cli.manpage_parser()._option_string_actions)
    assert flags <= known, flags - known


# -- examples, run through the code they describe ----------------------------------------------------------------


DAEMON_LINES = [(w, argv) for w, argv in commands("tunneld") if not argv or argv[0] not in ("show", "peer")]
CLIENT_LINES = [(w, argv) for w, argv in commands("tunneld") if argv and argv[0] in ("show", "peer")]


def test_the_docs_have_command_examples_to_check():
    assert len(DAEMON_LINES) >= 10 and len(CLIENT_LINES) >= 3


@pytest.mark.parametrize("where,argv", DAEMON_LINES, ids=[f"{w} {' '.join(a)}"[:90] for w, a in DAEMON_LINES])
def test_every_daemon_command_line_passes_check(where, argv, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # the examples name config/... from the source tree
    if "--config" in argv and not Path(argv[argv.index("--config") + 1]).exists():
        installed = {"/etc/tunneld/demo.toml": "config/vxlan-host-a.toml"}  # docs/systemd.md installs it so
        # ... and the wireguard one with its key beside it (`wg genkey`, 0600): in a copy, no key ships
        wg0 = tmp_path / "wg0.toml"
        wg0.write_text((REPO / "config" / "wireguard-host-a.toml").read_text())
        (tmp_path / "wg0.key").write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        (tmp_path / "wg0.key").chmod(0o600)
        installed["/etc/tunneld/wg0.toml"] = str(wg0)
        argv = [installed.get(a, a) for a in argv]
    code, output = _check_daemon(argv)
    assert code == 0, f"{where}: tunneld {' '.join(argv)} --check: {output}"
    assert "ok:" in output


@pytest.mark.parametrize("where,argv", CLIENT_LINES, ids=[f"{w} {' '.join(a)}"[:90] for w, a in CLIENT_LINES])
def test_every_client_command_line_parses(where, argv):
    args = build_control_parser().parse_args(argv)
    assert args.command == argv[0]


def test_every_bench_command_line_parses():
    lines = commands("python -m bench.run") + commands(".venv/bin/python -m bench.run")
    assert lines, "the docs show how to run the bench"
    for where, argv in lines:
        args = bench_run.parse_args(argv)
        assert args.names, where


def test_every_make_target_in_the_docs_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    named = [(w, argv[0]) for w, argv in commands("make") if argv]
    assert {"demo", "test", "bench"} <= {t for _, t in named}
    for where, target in named:
        assert target in targets, f"{where}: make {target}: no such target"


TOML_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "toml"]


@pytest.mark.parametrize("block", TOML_BLOCKS, ids=[b.where() for b in TOML_BLOCKS])
def test_every_toml_example_parses_and_a_tunnel_passes_check(block, tmp_path):
    data = tomllib.loads(block.text)
    if "tunnel" not in data:
        return  # a fragment of another file (a plugin's pyproject.toml): parsing it is the check
    path = tmp_path / "example.toml"
    path.write_text(block.text)
    for key_file in (data["tunnel"].get("private_key"),) if data["tunnel"].get("mode") == "wireguard" else ():
        # the key file the example names, made as `wg genkey` would, beside the file when the path is relative
        made = tmp_path / key_file if not key_file.startswith("/") else None
        if made is not None:
            made.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
            made.chmod(0o600)
    code, output = _check_daemon(["--config", str(path)])
    assert code == 0, f"{block.where()}: {output}"


PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "python"]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.where() for b in PYTHON_BLOCKS])
def test_every_python_example_runs(block, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))  # the plugin the examples are taken from
    namespace: dict = {}
    exec(compile(block.text, block.where(), "exec"), namespace)
    assert any(not name.startswith("__") for name in namespace), block.where()


def test_the_control_socket_examples_are_requests_the_server_takes():
    lines = [line for b in ALL_BLOCKS for line in b.text.split("\n") if line.startswith('{"command"')]
    assert {server.parse_request(line.encode()).command for line in lines} == {"show", "peer-add", "peer-remove"}


def test_the_registry_record_examples_decode():
    text = (REPO / "docs" / "registry.md").read_text()
    found = [b for b in blocks(REPO / "docs" / "registry.md") if b.text.lstrip().startswith('{"address"')]
    for block in found:
        record = json.loads(block.text)
        assert decode(f"/overlay1/hosts/{record['address']}".encode(), block.text.encode(), b"/overlay1/hosts/")
    assert {json.loads(b.text)["mode"] for b in found} == {"vxlan", "wireguard"}  # a wireguard record's too
    assert "PREFIX/hosts/<underlay address>" in text and "whoever can write the etcd prefix" in text


def test_the_show_json_example_uses_only_documented_fields():
    doc = REPO / "docs" / "control-socket.md"
    cells = _rows(doc, "## `show --json`")
    top = {n for cell in cells for n in re.findall(r"`(\w+)`", cell)}
    per_peer = {name for cell in cells if cell.startswith("`peers[]")
                for name in re.findall(r"`(?:peers\[\]\.)?(\w+)`", cell)}
    block = next(b for b in blocks(doc) if "tunneld show tunneld0 --json" in b.text)
    example = json.loads(block.text.split("\n", 1)[1])
    assert set(example) <= top, set(example) - top
    for peer in example["peers"]:
        assert set(peer) <= per_peer, set(peer) - per_peer


# -- the reference tables list exactly what the code has ------------------------------------------------------


def _rows(path: Path, heading: str) -> list[str]:
    """The first cells of the first table under a heading."""
    text = path.read_text().split(f"\n{heading}\n", 1)[1]
    rows = []
    for line in text.split("\n"):
        if line.startswith("|"):
            rows.append(line.split("|")[1].strip())
        elif rows:
            break
    return rows[2:]  # the header and its rule


def test_the_flag_table_lists_every_flag_of_the_parser_and_no_other():
    parser = cli.manpage_parser()
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    listed = {f for cell in _rows(REPO / "docs" / "configuration.md", "## Flags")
              for f in re.findall(r"`(--[a-z][a-z-]*)", cell) + re.findall(r"`, `(--[a-z-]+)`", cell)}
    assert listed == flags, f"not documented: {sorted(flags - listed)}; not flags: {sorted(listed - flags)}"


def test_the_file_key_table_lists_every_key_the_loader_takes():
    text = (REPO / "docs" / "configuration.md").read_text()
    rows = {}
    for line in text.split("\n"):
        m = re.match(r"^\| `\[+(\w+)\]+` \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = set(re.findall(r"`(\w+)`", m.group(2)))
    assert set(rows) == set(SECTIONS)
    for table, keys in SECTIONS.items():
        assert set(keys) <= rows[table], f"[{table}]: not documented: {sorted(set(keys) - rows[table])}"
    modes, _ = discover()
    options = {name for m in ("vxlan", "gre", "gretap") for name in declared(modes[m])}
    assert options <= rows["tunnel"]


def test_every_shipped_config_file_is_in_the_table():
    text = (REPO / "docs" / "configuration.md").read_text()
    for path in sorted((REPO / "config").glob("*.toml")):
        assert f"`config/{path.name}`" in text, path.name


def _exported_metrics() -> set[str]:
    dev, link = FakeDevice(), FakeLink("192.0.2.2")
    engine = Engine(dev, link, Vxlan(7), max_frame=1472, clock=lambda: 1700000000.0)
    registry = CollectorRegistry()
    registry.register(TunnelCollector(engine, dev="td0", mtu=1450, vni=7))
    registry.register(RegistryCollector(RegistryStats()))
    # wireguard's per-peer series (tunneld_wireguard_*) come with a wireguard tunnel
    key = key_to_base64(StaticKey(bytes(range(1, 33))).public)
    wireguard = Engine(FakeDevice(), FakeLink("192.0.2.3"), WireGuard.from_options({}), max_frame=1440,
                       clock=lambda: 1700000000.0, peers=[PeerSpec("192.0.2.3", key=key)])
    registry.register(TunnelCollector(wireguard, dev="wg0", mtu=1440))
    text = generate_latest(registry).decode()
    return set(re.findall(r"^# TYPE (tunneld_\w+) ", text, re.M))


def test_the_metrics_table_lists_every_metric_the_exporter_exports():
    cells = _rows(REPO / "docs" / "metrics.md", "## The series")
    listed = {re.match(r"`(tunneld_\w+)", cell).group(1) for cell in cells if cell.startswith("`tunneld_")}
    exported = _exported_metrics()
    assert exported <= listed, f"not documented: {sorted(exported - listed)}"
    # the per-worker series appear only with --workers > 1; everything else listed is exported here
    assert listed - exported <= {"tunneld_worker_packets_total", "tunneld_worker_cpu_seconds_total"}, \
        sorted(listed - exported)


def test_the_drop_reason_table_lists_every_reason():
    listed = {cell.strip("`") for cell in _rows(REPO / "docs" / "metrics.md", "## Drop reasons")}
    assert listed == {d.value for d in Drop}


# -- files, links and the design map ---------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", path.read_text(), re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_link_and_anchor_exists(doc):
    text = doc.read_text()
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc.name}: link to {link}: no such file"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{doc.name}: link to {link}: no such heading"


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_repository_path_named_exists(doc):
    for name in re.findall(r"`((?:config|tests|tunneld|bench|systemd|docs)/[\w./*@-]*)`", doc.read_text()):
        assert list(REPO.glob(name.rstrip("/"))) or (REPO / name).exists(), f"{doc.name}: {name}: no such path"


def test_the_design_map_follows_the_folders_of_tunneld():
    tree = next(b for b in blocks(REPO / "docs" / "design.md") if b.text.startswith("tunneld/"))
    folder, named = None, {}
    for line in tree.text.split("\n")[1:]:
        m = re.match(r"^  (\S+)", line)
        if m:
            folder = m.group(1)
            named[folder] = set()
        if folder and folder.endswith("/"):
            named[folder] |= set(re.findall(r"\b(\w+\.py)\b", line))
    package = REPO / "tunneld"
    parts = {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").exists()}
    parts |= {p.name for p in package.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert set(named) == parts, f"missing from the map: {sorted(parts - set(named))}; not in tunneld/: " \
                                f"{sorted(set(named) - parts)}"
    for folder, files in named.items():
        for name in files:
            assert (package / folder / name).exists(), f"the design map names tunneld/{folder}{name}"
