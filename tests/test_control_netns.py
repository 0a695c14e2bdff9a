"""The control socket of a real daemon: `tunneld show` between two tunnelds in namespaces, counters that grow
after a ping, the socket's mode, the socket removed on exit; two daemons for one device name in two namespaces
sharing a runtime directory, each reached from its own namespace; a path truly taken named accurately."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import time

import pytest

from tunneld.control.client import netns_of
from tunneld.testbed import OVERLAY_V4, TUNNELD, Tunneld, start_pair

pytestmark = pytest.mark.netns


def show(tunneld: Tunneld, *flags: str) -> str:
    r = tunneld.host.run(TUNNELD, "show", tunneld.dev, "--runtime-dir", tunneld.runtime_dir, *flags, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_show_json_counts_a_ping_and_the_socket_is_removed_on_exit(module_hosts):
    a, b = module_hosts
    ta, tb = start_pair(a, b, "vxlan", "--metrics-listen", "")
    path = ta.socket_path()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        before = json.loads(show(ta, "--json"))
        assert (before["device"], before["mode"], before["vni"], before["listen_port"]) == (ta.dev, "vxlan", 1, 4789)
        [peer] = before["peers"]
        assert peer["address"] == b.underlay
        a.wait_ping(OVERLAY_V4[1])
        assert a.ping(OVERLAY_V4[1], count=5)
        after = json.loads(show(ta, "--json"))
        [peer2] = after["peers"]
        assert peer2["tx_packets"] >= peer["tx_packets"] + 5 and peer2["rx_packets"] >= peer["rx_packets"] + 5
        assert peer2["tx_bytes"] > peer["tx_bytes"] and peer2["rx_bytes"] > peer["rx_bytes"]
        assert peer2["state"] == "up" and 0 <= peer2["last_rx_age_s"] < 5
        text = show(ta)
        assert text.startswith(f"device: {ta.dev}\n") and f"peer: {b.underlay}\n" in text
    finally:
        tb.kill()
        assert ta.stop() == 0
    assert not os.path.exists(path)  # removed on exit


def test_peer_add_refuses_this_hosts_own_address_and_warns_of_a_smaller_path_mtu(module_hosts):
    """The kernel's word on the new peer, asked from the daemon's running loop: one of A's own addresses is
    refused (one line, nothing changed); a peer behind a route with a smaller MTU is added with a warning on
    the client's stderr and in the log, and the device MTU stays."""
    a, b = module_hosts
    ta, tb = start_pair(a, b, "vxlan", "--metrics-listen", "")
    try:
        r = ta.client("peer", "add", a.underlay)
        assert r.returncode == 1 and r.stderr.strip() == (
            f"tunneld: peer: {a.underlay} is an address of this host: the tunnel would lead back to itself"), r.stderr
        a.run("ip", "route", "add", "10.240.0.0/24", "via", b.underlay, "mtu", "1400")
        r = ta.client("peer", "add", "10.240.0.7")
        assert r.returncode == 0, r.stderr
        assert r.stderr.startswith("tunneld: warning: peer 10.240.0.7: its path MTU 1400 carries inner packets of "
                                   "at most 1350 bytes, less than tunneld0's MTU 1450"), r.stderr
        shown = json.loads(show(ta, "--json"))
        assert [p["address"] for p in shown["peers"]] == [b.underlay, "10.240.0.7"] and shown["mtu"] == 1450
        assert a.run("cat", "/sys/class/net/tunneld0/mtu").stdout.strip() == "1450"
    finally:
        tb.kill()
        assert ta.stop() == 0
    assert "its path MTU 1400" in ta.output()


def test_one_device_name_in_two_namespaces_two_daemons_each_reached_from_its_own(hosts):
    """Issue 22: namespaces share /run. Two tunnelds serving `tunneld0` in A and B with one --runtime-dir collided
    on DIR/tunneld0.sock (B stopped: "another tunneld serves this device", untrue), and `tunneld show` or `peer
    add` typed in B reached A's daemon. Each now has its socket, and each command its own namespace's daemon."""
    a, b = hosts
    shared = f"/run/tunneld-testbed/shared-{os.getpid()}"
    ta = tb = None
    try:
        ta = Tunneld(a, "--mode", "vxlan", "--peer", b.underlay, "--address", f"{OVERLAY_V4[0]}/24",
                     "--metrics-listen", "", runtime_dir=shared)
        tb = Tunneld(b, "--mode", "vxlan", "--peer", a.underlay, "--address", f"{OVERLAY_V4[1]}/24",
                     "--metrics-listen", "", runtime_dir=shared)
        assert (ta.runtime_dir, ta.dev) == (tb.runtime_dir, tb.dev) == (shared, "tunneld0")
        inodes = {netns_of(t.proc.pid)[1] for t in (ta, tb)}
        expected = sorted(f"tunneld0:net{i}.sock" for i in inodes)
        deadline = time.monotonic() + 10  # each binds its socket just after its interface is up
        while sorted(os.listdir(shared)) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(os.listdir(shared)) == expected
        assert json.loads(show(ta, "--json"))["peers"][0]["address"] == b.underlay  # run in A: A's daemon
        assert json.loads(show(tb, "--json"))["peers"][0]["address"] == a.underlay  # run in B: B's daemon
        r = tb.client("peer", "add", "10.231.0.7")
        assert r.returncode == 0, r.stderr
        assert [p["address"] for p in json.loads(show(tb, "--json"))["peers"]] == [a.underlay, "10.231.0.7"]
        assert [p["address"] for p in json.loads(show(ta, "--json"))["peers"]] == [b.underlay]  # A untouched
        a.wait_ping(OVERLAY_V4[1])  # and the two tunnels carry packets
    finally:
        for t in (tb, ta):
            if t is not None:
                assert t.stop() == 0
        shutil.rmtree(shared, ignore_errors=True)


SHOW_AT = """
import sys
from tunneld.control.client import ControlError, call
try:
    call(sys.argv[1], {"command": "show"})
except ControlError as e:
    print(e.code, e)
"""

BIND_AT = """
import sys
from tunneld.control.server import ControlError, bind_socket
try:
    bind_socket(sys.argv[1])
except ControlError as e:
    print(e)
"""


def test_a_socket_of_another_namespace_is_neither_used_nor_taken_and_the_line_says_whose(hosts):
    """Where the tag cannot help (PID 1 hidden: the plain path in every namespace), the kernel still names the
    listener: a client in B refuses A's daemon rather than act on it, and a daemon in B does not start over it,
    each saying where that daemon is."""
    a, b = hosts
    ta, tb = start_pair(a, b, "vxlan", "--metrics-listen", "")
    try:
        path, pid = ta.socket_path(), ta.proc.pid
        theirs, ours = netns_of(pid)[1], netns_of(tb.proc.pid)[1]
        where = f"tunneld pid {pid} in another network namespace (net:[{theirs}]; this is net:[{ours}])"
        r = b.run(sys.executable, "-c", SHOW_AT, path)
        assert r.stdout == f"69 {path} is served by {where}: not this namespace's tunnel; run the command in that " \
                           "namespace, or give its daemon and this command a --runtime-dir of their own\n", r.stdout
        r = b.run(sys.executable, "-c", BIND_AT, path)
        assert r.stdout == f"control socket {path} is in use: {where}; stop that daemon first, or give this one " \
                           "another --runtime-dir\n", r.stdout + r.stderr
        assert json.loads(show(ta, "--json"))["peers"][0]["address"] == b.underlay  # A still answers
    finally:
        tb.kill()
        assert ta.stop() == 0
