"""tunneld(8) is generated from the argument parser (docs/manpage.py, `make man`), renders cleanly, and `make
man-install` puts it where man(1) looks. No root: the page is written into tmp_path."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunneld import cli

REPO = Path(__file__).resolve().parent.parent
GENERATOR = REPO / "docs" / "manpage.py"


def _generator():
    spec = importlib.util.spec_from_file_location("tunneld_manpage", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _long_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every --flag of a parser and of its sub-commands' parsers, -h/--help aside."""
    flags, seen, todo = set(), set(), [parser]
    while todo:
        p = todo.pop()
        if id(p) in seen:
            continue
        seen.add(id(p))
        for action in p._actions:
            flags.update(s for s in action.option_strings if s.startswith("--") and s != "--help")
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
        for group in p._action_groups:  # the client commands hang in a group of their own
            for action in group._group_actions:
                if isinstance(action, argparse._SubParsersAction):
                    todo.extend(action.choices.values())
    return flags


def _roff(flag: str) -> str:
    return flag.replace("-", "\\-")


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("man") / "tunneld.8"
    done = subprocess.run([sys.executable, str(GENERATOR), str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return out


def test_every_flag_of_the_parser_is_in_the_page(page):
    text = page.read_text()
    flags = _long_flags(cli.manpage_parser())
    # the daemon's own flags, the built-in modes' option flags and the client commands' flags are all there
    assert {"--peer", "--registry", "--kernel-gso", "--vni", "--key", "--seq", "--csum", "--json", "--route"} <= flags
    missing = sorted(flag for flag in flags if _roff(flag) not in text)
    assert not missing, f"flags of the parser missing from tunneld(8): {missing}"
    for command in ("tunneld show", "tunneld peer add", "tunneld peer remove"):
        assert command in text
    assert text.startswith('.TH TUNNELD "8"')


def test_the_page_follows_the_parser(monkeypatch):
    """A flag added to the parser appears in the page, with its help: the page is not written by hand."""
    build = cli.build_parser

    def with_probe(modes):
        p = build(modes)
        p.add_argument("--zz-probe-flag", metavar="WHAT", help="a flag only this test adds")
        return p

    monkeypatch.setattr(cli, "build_parser", with_probe)
    text = _generator().page()
    assert "\\-\\-zz\\-probe\\-flag" in text and "a flag only this test adds" in text


def test_the_page_does_not_depend_on_installed_plugins():
    """Only the built-in modes: the installed page is the same on every machine."""
    modes = cli.manpage_parser()._option_string_actions["--mode"].choices
    assert sorted(modes) == ["gre", "gretap", "vxlan", "wireguard"]


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed (Debian: groff-base, man-db's)")
def test_groff_renders_the_page_without_warnings(page):
    done = subprocess.run(["groff", "-man", "-t", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed (Debian: man-db)")
def test_man_renders_the_page_without_warnings(page):
    done = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, MANWIDTH="80"))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    text = " ".join(re.sub(".\x08", "", done.stdout).split())  # no overstrike (bold: X backspace X), one space
    assert "tunneld - userspace tunnelling daemon" in text
    assert "EXIT STATUS" in text and "SEE ALSO" in text


@pytest.mark.skipif(shutil.which("man") is None or shutil.which("make") is None, reason="needs man (man-db) and make")
def test_make_man_install_puts_the_page_where_man_finds_it(tmp_path):
    mandir = tmp_path / "share" / "man" / "man8"
    built = tmp_path / "build" / "tunneld.8"
    # -o venv: use this interpreter as it is (no pip); MANDB=true: leave the machine's man-db index alone
    make = ["make", "-s", "-C", str(REPO), "-o", "venv", "man-install", f"PY={sys.executable}",
            f"MAN_PAGE={built}", f"MANDIR={mandir}", "MANDB=true"]
    done = subprocess.run(make, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    installed = mandir / "tunneld.8"
    assert installed.read_bytes() == built.read_bytes()
    found = subprocess.run(["man", "-M", str(tmp_path / "share" / "man"), "-w", "tunneld"], capture_output=True,
                           text=True, timeout=60)
    assert found.stdout.strip() == str(installed), found.stderr
    before = installed.stat().st_mtime_ns
    again = subprocess.run(make, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "installed" not in again.stdout  # an unchanged page is not installed again
    assert installed.stat().st_mtime_ns == before
