"""Issue 11's report, as a plugin author tried it: a VXLAN plugin whose ``decap`` refuses inner frames over
1000 bytes, at the receiving end of two tunnelds with offloads on (the default), under bulk UDP and TCP.

Before the one engine, coalesced runs never reached ``decap``: 220 MB more arrived after the plugin began
refusing, and one refusal was counted. Here every refused datagram must stay out of the device and be counted
by the plugin's reason; small frames (ping) still pass. The plugin is visible to this test's tunnelds only:
its module and a .dist-info written to a temporary directory on their PYTHONPATH.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from tunneld.testbed import OVERLAY_V4, TUNNELD, Tunneld, transfer

LIMIT = 1000

# The plugin as an installed distribution would lay it out on sys.path: its module and a .dist-info naming the
# entry point, which is all tunneld's registry (importlib.metadata) looks for. Put on PYTHONPATH for the tunnelds
# started by this test only: nothing is installed into the environment.
PLUGIN = {
    "tunneld_small_vxlan-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: tunneld-small-vxlan\nVersion: 0.1\n",
    "tunneld_small_vxlan-0.1.dist-info/entry_points.txt":
        "[tunneld.encapsulators]\nvxlan-small = tunneld_small_vxlan:SmallVxlan\n",
    "tunneld_small_vxlan.py": f"""
        from tunneld.encap.base import Drop
        from tunneld.encap.vxlan import Vxlan


        class SmallVxlan(Vxlan):
            name = "vxlan-small"
            description = "VXLAN that refuses inner frames over {LIMIT} bytes (a test plugin)"

            def decap(self, packet):
                verdict = super().decap(packet)
                if verdict.__class__ is not Drop and len(packet) - verdict > {LIMIT}:
                    return Drop.LENGTH_MISMATCH
                return verdict
    """,
}


@pytest.fixture
def small_vxlan_on_path(tmp_path, monkeypatch):
    for name, text in PLUGIN.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text).lstrip())
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH")))))
    return tmp_path


def device_rx(host, dev: str = "tunneld0") -> tuple[int, int]:
    """(packets, bytes) the kernel received on the device: what tunneld wrote to it."""
    read = lambda what: int(host.run("cat", f"/sys/class/net/{dev}/statistics/rx_{what}").stdout)  # noqa: E731
    return read("packets"), read("bytes")


UDP_BURST = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[2])):
    try:
        s.sendto(b"u" * 1400, (sys.argv[1], 9))
    except OSError:
        pass
"""


@pytest.mark.netns
def test_a_plugin_that_refuses_big_frames_is_honoured_with_offloads_on(small_vxlan_on_path, hosts):
    out = subprocess.run([TUNNELD, "--list-modes"], capture_output=True, text=True, timeout=30).stdout
    assert "vxlan-small" in out
    a, b = hosts
    ta = Tunneld(a, "--mode", "vxlan", "--peer", b.underlay, "--address", f"{OVERLAY_V4[0]}/24")
    tb = Tunneld(b, "--mode", "vxlan-small", "--peer", a.underlay, "--address", f"{OVERLAY_V4[1]}/24")
    try:
        a.wait_ping(OVERLAY_V4[1])  # small frames pass both ways
        before = device_rx(b)
        # Bulk UDP: datagrams of one flow and size, 1442-byte inner frames (batched, GSO/GRO or gathered).
        a.run(sys.executable, "-c", UDP_BURST, OVERLAY_V4[1], "3000", timeout=60)
        # Bulk TCP: super-frames cut into ~1450-byte segments and coalesced again at B, if they got there.
        with pytest.raises(subprocess.TimeoutExpired):
            transfer(a, b, OVERLAY_V4[1], 4 << 20, timeout=6)
        after = device_rx(b)
    finally:
        ta.stop()
        assert tb.stop() == 0
    packets, nbytes = after[0] - before[0], after[1] - before[1]
    # Whatever B wrote in the meantime (ARP, the SYN and ACKs, retransmitted SYN-ACKs...) was small: no bulk.
    assert nbytes <= packets * LIMIT and nbytes < 200_000, (packets, nbytes)
    log = tb.output()  # (read once: it is the process's stdout)
    assert "offload tap 0x" in log and "udp gso/gro" in log, log  # the batched path, not the plain one
    refused = re.search(r"length_mismatch (\d+)", log)
    assert refused and int(refused.group(1)) >= 500, log
