"""The command line against the real kernel, in a namespace: the refusals an operator meets (privileges, a
port or a device already taken) in one line with the right exit status, and a clean stop."""

from __future__ import annotations

import signal
import sys

import pytest

from tunneld.testbed import OVERLAY_V4, TUNNELD, Tunneld

pytestmark = pytest.mark.netns


def test_without_privileges_says_what_is_needed(module_hosts):
    a, b = module_hosts
    r = a.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
              TUNNELD, "--peer", b.underlay, check=False)
    assert r.returncode == 77
    assert "CAP_NET_ADMIN" in r.stderr and "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if "error" in line]) == 1
    assert a.link_state("tunneld0") is None


def test_port_in_use(module_hosts):
    a, b = module_hosts
    holder = a.popen(sys.executable, "-c",
                     "import socket,time; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
                     "s.bind(('0.0.0.0',4789)); print('bound',flush=True); time.sleep(30)")
    assert holder.stdout.readline().strip() == "bound"
    r = a.run(TUNNELD, "--peer", b.underlay, check=False)
    assert r.returncode == 1
    assert "UDP port 4789 on 0.0.0.0 is already in use" in r.stderr and "Traceback" not in r.stderr
    assert a.link_state("tunneld0") is None  # nothing left behind


def test_device_exists(module_hosts):
    a, b = module_hosts
    a.run("ip", "link", "add", "tunneld0", "type", "bridge")
    r = a.run(TUNNELD, "--peer", b.underlay, check=False)
    assert r.returncode == 1
    assert "interface tunneld0 already exists" in r.stderr and "Traceback" not in r.stderr
    assert "bridge" in a.run("ip", "-d", "link", "show", "tunneld0").stdout  # and it was not touched


def test_sigint_stops_cleanly(module_hosts):
    a, b = module_hosts
    t = Tunneld(a, "--peer", b.underlay, "--address", f"{OVERLAY_V4[0]}/24")
    assert t.stop(signal.SIGINT) == 0
    assert a.link_state("tunneld0") is None
    out = t.output()
    assert "shutting down" in out and "removed interface tunneld0" in out and "Traceback" not in out


def test_the_peer_with_the_smallest_path_mtu_sets_the_device_mtu(module_hosts):
    """Two peers, one behind a route with a smaller MTU: the interface gets that one's, and the log says so."""
    a, b = module_hosts
    a.run("ip", "route", "add", "10.231.0.9/32", "dev", a.ifname, "mtu", "1400")
    t = Tunneld(a, "--peer", b.underlay, "--peer", "10.231.0.9", "--address", f"{OVERLAY_V4[0]}/24")
    try:
        assert "mtu 1350" in a.run("ip", "-o", "link", "show", "tunneld0").stdout
    finally:
        assert t.stop() == 0
    assert "underlay MTU 1400: the smallest path MTU, towards peer 10.231.0.9" in t.output()
