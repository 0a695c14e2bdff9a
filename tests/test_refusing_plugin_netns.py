"""Issue 11's report, as a plugin author tried it: a VXLAN plugin whose ``decap`` refuses inner frames over
1000 bytes, at the receiving end of two tunnelds with offloads on (the default), under bulk UDP and TCP.

Before the one engine, coalesced runs never reached ``decap``: 220 MB more arrived after the plugin began
refusing, and one refusal was counted. Here every refused datagram must stay out of the device and be counted
by the plugin's reason; small frames (ping) still pass. The plugin is installed with pip into this test
environment (offline, from files written here) and uninstalled afterwards, whatever happens.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from tests.netns import OVERLAY_V4, TUNNELD, Tunneld, transfer

PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
LIMIT = 1000

PLUGIN = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "tunneld-small-vxlan"
        version = "0.1"

        [project.entry-points."tunneld.encapsulators"]
        vxlan-small = "tunneld_small_vxlan:SmallVxlan"
    """,
    "tunneld_small_vxlan/__init__.py": f"""
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


@pytest.fixture(scope="module")
def small_vxlan_installed(tmp_path_factory):
    src = tmp_path_factory.mktemp("plugin") / "tunneld-small-vxlan"
    for name, text in PLUGIN.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(textwrap.dedent(text).lstrip())
    r = subprocess.run([*PIP, "install", "--no-build-isolation", "--no-deps", "--no-index", str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"pip install of the plugin failed:\n{r.stdout}\n{r.stderr}"
    try:
        yield src
    finally:
        subprocess.run([*PIP, "uninstall", "-y", "tunneld-small-vxlan"], capture_output=True, timeout=120)


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
def test_a_plugin_that_refuses_big_frames_is_honoured_with_offloads_on(small_vxlan_installed, hosts):
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
