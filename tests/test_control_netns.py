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


def test_show_json_counts_a_ping_and_a_second_daemon_for_the_device_is_refused(hosts):
    a, b = hosts
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
