"""The control socket of a real daemon: `tunneld show` between two tunnelds in namespaces, counters that grow
after a ping, the socket's mode, a second daemon for the same device refused, the socket removed on exit."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tunneld.testbed import OVERLAY_V4, TUNNELD, Tunneld, start_pair

pytestmark = pytest.mark.netns


def show(tunneld: Tunneld, *flags: str) -> str:
    r = tunneld.host.run(TUNNELD, "show", tunneld.dev, "--runtime-dir", tunneld.runtime_dir, *flags, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_show_json_counts_a_ping_and_a_second_daemon_for_the_device_is_refused(module_hosts):
    a, b = module_hosts
    ta, tb = start_pair(a, b, "vxlan", "--metrics-listen", "")
    path = os.path.join(ta.runtime_dir, f"{ta.dev}.sock")
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

        # B's tunnel goes; a new daemon in B for a device of the same name, pointed at A's socket directory,
        # must stop in one line rather than take A's socket.
        assert tb.stop() == 0
        r = b.run(TUNNELD, "--dev", ta.dev, "--peer", a.underlay, "--runtime-dir", ta.runtime_dir,
                  "--metrics-listen", "", check=False, timeout=30)
        out = r.stdout + r.stderr
        assert r.returncode == 1, out
        refused = [line for line in out.splitlines() if "ERROR" in line]
        assert len(refused) == 1 and f"control socket {path} is in use: another tunneld" in refused[0], out
        assert "Traceback" not in out
        assert json.loads(show(ta, "--json"))["peers"][0]["address"] == b.underlay  # A still answers
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
