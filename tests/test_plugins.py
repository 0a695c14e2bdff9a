"""Encapsulators as plugins: the registry, broken plugins, and a third-party package used end to end.

The third-party package (tests/plugins/tunneld-ipudp, "IP in UDP" for TUN) is installed into this test
environment with pip exactly as a user would install it (from a copy, offline: no build isolation, no index),
its author's own conformance tests are run, then two tunnelds carry traffic with it between namespaces.
It is uninstalled afterwards, whatever happens.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from tests.support import REPO
from tunneld.testbed import OVERLAY_V4, OVERLAY_V6, TUNNELD, Tunneld, transfer
from tunneld.testing import CHECKS
from tunneld.cli import main
from tunneld.config.schema import TunnelConfig
from tunneld.runtime.daemon import EX_CONFIG, StartupError, Tunnel
from tunneld.encap.base import DeviceKind, Encapsulator, Transport
from tunneld.encap.plugins import discover

PLUGIN_SRC = REPO / "tests" / "plugins" / "tunneld-ipudp"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


def test_builtin_modes_are_entry_points():
    modes, broken = discover()
    assert {"vxlan", "gre", "gretap"} <= set(modes)
    assert modes["gre"].device is DeviceKind.TUN and modes["gretap"].device is DeviceKind.TAP
    assert str(modes["gre"].transport) == "ip proto 47"
    assert not [b for b in broken if b.name in ("vxlan", "gre", "gretap")]


def test_list_modes_shows_each_mode_with_description_and_options(capsys):
    assert main(["--list-modes"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if not line.startswith(" ")}
    assert "GRE" in lines["gre"] and "TUN" in lines["gre"] and "ip proto 47" in lines["gre"]
    assert "0x6558" in lines["gretap"] and "TAP" in lines["gretap"]
    assert "option key:" in out and "option seq:" in out and "option csum:" in out


def _fake_dist(site: Path, name: str, entry: str) -> None:
    """A minimal installed distribution: what importlib.metadata reads for entry points."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[tunneld.encapsulators]\n{entry}\n")


def test_broken_plugins_are_named_and_never_take_down_the_builtins(tmp_path):
    _fake_dist(tmp_path, "brokenimport", "brokenimport = no_such_module_for_tunneld:Codec")
    _fake_dist(tmp_path, "wrongshape", "wrongshape = json:dumps")
    _fake_dist(tmp_path, "misnamed", "othername = tunneld.encap.gre:Gre")
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('plugin bug at import time')\n")
    _fake_dist(tmp_path, "raisesonimport", "raisesonimport = raises_on_import:Codec")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([TUNNELD, "--list-modes"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    listed = {line.split()[0] for line in r.stdout.splitlines() if not line.startswith(" ")}
    assert listed == {"gre", "gretap", "vxlan", "wireguard"}
    assert "Traceback" not in r.stderr
    for expected in (
        "'brokenimport' (no_such_module_for_tunneld:Codec) skipped: failed to import: ModuleNotFoundError",
        "'wrongshape' (json:dumps) skipped: is not a subclass of tunneld.encap.Encapsulator",
        "'othername' (tunneld.encap.gre:Gre) skipped: declares name 'gre' but is registered as 'othername'",
        "'raisesonimport' (raises_on_import:Codec) skipped: failed to import: RuntimeError: plugin bug at import",
    ):
        assert expected in r.stderr, r.stderr
    # Asking for a broken mode is a usage error that names the modes that do work.
    r = subprocess.run([TUNNELD, "--mode", "brokenimport", "--peer", "192.0.2.1"], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "invalid choice: 'brokenimport'" in r.stderr and "Traceback" not in r.stderr


LEGACY = """
from tunneld.encap.base import DeviceKind, Drop, Encapsulator, Transport

class Old(Encapsulator):
    name = "old"
    description = "options declared the old way"
    device = DeviceKind.TUN
    transport = Transport("udp", 7001)
    header_room = 0
    header_len = 0
    options = {"ttl": "outer TTL"}

    @classmethod
    def from_options(cls, options):
        if options.get("ttl") not in (None, "9", 9):
            raise ValueError(f"ttl: {options['ttl']!r} is not 9")
        return cls()

    def encap(self, buf, start, end):
        return start

    def decap(self, packet):
        return Drop.TRUNCATED
"""


def test_an_old_style_plugin_loads_with_a_deprecation_warning(tmp_path):
    """Options declared as name -> help still work, untyped (values as given), and tunneld says how to move on."""
    (tmp_path / "old_plugin.py").write_text(LEGACY)
    _fake_dist(tmp_path, "oldplugin", "old = old_plugin:Old")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def run(*args):
        return subprocess.run([TUNNELD, *args], env=env, capture_output=True, text=True, timeout=30)

    r = run("--list-modes")
    assert r.returncode == 0 and "option ttl: outer TTL (as given, default unset; --opt ttl=...)" in r.stdout
    assert "'old' declares its options as name -> help text, which is deprecated" in r.stderr
    assert run("--mode", "old", "--peer", "192.0.2.1", "--opt", "ttl=9", "--check").returncode == 0
    conf = tmp_path / "old.toml"
    conf.write_text('[tunnel]\nmode = "old"\npeer = "192.0.2.1"\nttl = 8\n')
    r = run("--config", str(conf), "--check")
    assert r.returncode == EX_CONFIG and f"tunneld: {conf}: old: ttl: 8 is not 9" in r.stderr


class Explodes(Encapsulator):
    name: ClassVar[str] = "explodes"
    description: ClassVar[str] = "from_options has a bug"
    device: ClassVar[DeviceKind] = DeviceKind.TUN
    transport: ClassVar[Transport] = Transport("udp", 9)
    header_room: ClassVar[int] = 0

    @classmethod
    def from_options(cls, options):
        return options["missing"]

    header_len = 0
    encap = decap = None  # never reached


def test_a_plugin_bug_at_start_up_is_one_line_not_a_traceback():
    with pytest.raises(StartupError, match="explodes: the encapsulator failed to start: KeyError: 'missing'"):
        Tunnel(TunnelConfig(peer="192.0.2.1", mode="explodes"), {"explodes": Explodes})


def test_an_option_the_mode_does_not_take_is_refused(capsys):
    # Refused while building the codec, before any socket or device exists.
    assert main(["--mode", "vxlan", "--peer", "192.0.2.1", "--key", "5"]) == EX_CONFIG
    # (was "vxlan: does not take option key (it takes: none)": vxlan now takes vni; --key is gre/gretap's flag)
    assert "--key: only for mode gre/gretap, not 'vxlan'" in capsys.readouterr().err
    assert main(["--mode", "gre", "--peer", "192.0.2.1", "--opt", "colour=blue"]) == EX_CONFIG
    assert "gre: does not take option colour (it takes: key, seq, csum)" in capsys.readouterr().err


# -- a third-party plugin, installed and used ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ipudp_installed(tmp_path_factory):
    src = tmp_path_factory.mktemp("plugin") / "tunneld-ipudp"
    shutil.copytree(PLUGIN_SRC, src)  # building writes build/ and *.egg-info next to the sources
    r = subprocess.run([*PIP, "install", "--no-build-isolation", "--no-deps", "--no-index", str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"pip install of the plugin failed:\n{r.stdout}\n{r.stderr}"
    try:
        yield src
    finally:
        subprocess.run([*PIP, "uninstall", "-y", "tunneld-ipudp"], capture_output=True, timeout=120)


@pytest.mark.netns
def test_third_party_plugin_end_to_end(ipudp_installed, hosts):
    # The author's own tests: tunneld's conformance suite run against the installed plugin.
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ipudp_installed)],
                       capture_output=True, text=True, timeout=120, cwd=ipudp_installed)
    assert r.returncode == 0 and f"{len(CHECKS)} passed" in r.stdout, r.stdout + r.stderr  # one test per check
    out = subprocess.run([TUNNELD, "--list-modes"], capture_output=True, text=True, timeout=30).stdout
    assert "ipudp      TUN  udp/4790" in out and "option session:" in out
    a, b = hosts
    ta = Tunneld(a, "--mode", "ipudp", "--opt", "session=7", "--peer", b.underlay,
                 "--address", f"{OVERLAY_V4[0]}/24", "--address", f"{OVERLAY_V6[0]}/64")
    tb = Tunneld(b, "--mode", "ipudp", "--opt", "session=7", "--peer", a.underlay,
                 "--address", f"{OVERLAY_V4[1]}/24", "--address", f"{OVERLAY_V6[1]}/64")
    a.wait_ping(OVERLAY_V4[1])
    a.wait_ping(OVERLAY_V6[1])
    sent, received = transfer(a, b, OVERLAY_V4[1], 1 << 20)
    assert sent == received and sent.startswith(f"{1 << 20} "), (sent, received)
    assert ta.stop() == 0 and tb.stop() == 0
    # MTU: 1500 - 20 (IPv4) - 8 (UDP) - 4 (its header), from the overhead the plugin declared
    assert "ipudp on tunneld0, mtu 1468, session 7, peer 10.231.0.2 udp/4790" in ta.output()
    # A session mismatch is the plugin's own drop reason, counted like any other.
    ta = Tunneld(a, "--mode", "ipudp", "--opt", "session=1", "--peer", b.underlay, "--address", f"{OVERLAY_V4[0]}/24")
    tb = Tunneld(b, "--mode", "ipudp", "--opt", "session=2", "--peer", a.underlay, "--address", f"{OVERLAY_V4[1]}/24")
    assert not a.ping(OVERLAY_V4[1], count=2, timeout=2)
    assert tb.stop() == 0
    dropped = re.search(r"dropped \d+ \(key_mismatch (\d+)\)", tb.output())
    assert dropped and int(dropped.group(1)) >= 2, tb.output()  # the pings, and any IPv6 chatter
    ta.stop()
