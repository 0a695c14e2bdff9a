"""The kernel segments VXLAN super-frames (--kernel-gso, tunneld/io/egress.py): it is really used, the data
arrives intact (sha256) to another tunneld and to the kernel's own VXLAN, and the old path runs where it is off.

The underlay veths are made to behave like a real wire: a veth otherwise hands UDP-tunnel super-packets and
partial checksums to the other namespace as they are (io/egress.py ``underlay_hazard``), which is why ``auto``
refuses to run over one that does.
"""

from __future__ import annotations

import re
import sys

import pytest

from tests.support import A4, B4, TRANSFER_BYTES, assert_transfers
from tunneld.testbed import OVERLAY_V4, Tunneld, kernel_vxlan, start_pair, transfer
from tunneld.testbed.netns import like_a_wire
from tunneld.testbed.prom import exposition, samples, total

pytestmark = pytest.mark.netns

EGRESS = "tunneld0-gso"


def egress_rx_bytes(host) -> int:
    """Bytes tunneld wrote into its egress device (the kernel counts a write into a TAP as received)."""
    out = host.run("ip", "-s", "-o", "link", "show", EGRESS).stdout
    return int(re.search(r"RX:.*?\\\s+(\d+)", out).group(1))


def forwarded(host) -> int:
    out = host.run("nstat", "-az", "IpForwDatagrams").stdout
    return int(re.search(r"IpForwDatagrams\s+(\d+)", out).group(1))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_kernel_segments_between_two_tunnelds(hosts, workers):
    a, b = hosts
    like_a_wire(a, b)
    ta, tb = start_pair(a, b, "vxlan", "--kernel-gso", "on", "--workers", workers)
    a.wait_ping(OVERLAY_V4[1])
    a.wait_link(EGRESS)  # brought up after the tunnel's device: waited for, not read once
    b.wait_link(EGRESS)
    # one queue per worker (IFF_MULTI_QUEUE), as on the tunnel's own device
    assert f"numqueues {workers}" in a.run("ip", "-d", "link", "show", EGRESS).stdout or workers == "1"
    # The host forwards from that one device only: the global switch stays off.
    assert a.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"
    assert a.run("sysctl", "-n", f"net.ipv4.conf.{EGRESS}.forwarding").stdout.strip() == "1"
    assert a.run("sysctl", "-n", "net.ipv4.conf.veth-a.forwarding").stdout.strip() == "0"
    before, fwd_before = egress_rx_bytes(a), forwarded(a)
    nbytes = TRANSFER_BYTES
    sent, received = transfer(a, b, OVERLAY_V4[1], nbytes)
    assert sent == received and sent.startswith(f"{nbytes} ")
    # The stream's bytes went through the egress device, as super-frames the kernel forwarded.
    assert egress_rx_bytes(a) - before > nbytes // 2
    assert forwarded(a) - fwd_before > 0
    assert_transfers(a, b)
    text = exposition(a)
    assert samples(text, "tunneld_segmentation_info") == [({"by": "kernel"}, 1.0)]
    assert total(text, "tunneld_kernel_gso_frames_total") > nbytes // 65536
    assert ta.stop() == 0 and tb.stop() == 0
    assert "kernel segmentation on" in ta.output()
    assert a.link_state(EGRESS) is None  # removed with the tunnel


@pytest.mark.parametrize("tunneld_side", ["A", "B"])
def test_interop_with_linux_kernel_vxlan_kernel_path(hosts, tunneld_side):
    a, b = hosts
    like_a_wire(a, b)
    t_host, k_host = (a, b) if tunneld_side == "A" else (b, a)
    t_addr, k_addr = (A4, B4) if tunneld_side == "A" else (B4, A4)
    kernel_vxlan(k_host, t_host.underlay, vni=4242, address=k_addr)
    t = Tunneld(t_host, "--mode", "vxlan", "--peer", k_host.underlay, "--vni", "4242", "--address", t_addr,
                "--kernel-gso", "on")
    t_host.wait_ping(k_addr.split("/")[0])
    before = egress_rx_bytes(t_host)
    assert_transfers(a, b)
    assert egress_rx_bytes(t_host) - before > TRANSFER_BYTES // 2  # its direction's stream, as super-frames
    assert t.stop() == 0


def test_off_keeps_the_old_path(hosts):
    a, b = hosts
    like_a_wire(a, b)
    ta, tb = start_pair(a, b, "vxlan", "--kernel-gso", "off")
    a.wait_ping(OVERLAY_V4[1])
    assert a.link_state(EGRESS) is None
    assert_transfers(a, b)
    text = exposition(a)
    assert samples(text, "tunneld_segmentation_info") == [({"by": "tunneld"}, 1.0)]
    assert total(text, "tunneld_kernel_gso_frames_total") == 0
    assert ta.stop() == 0 and tb.stop() == 0
    assert "kernel segmentation off (--kernel-gso off)" in ta.output()


def test_auto_refuses_a_veth_that_passes_super_packets(hosts):
    a, b = hosts  # veths as created: tunnel segmentation and checksums left to the far end
    ta, tb = start_pair(a, b, "vxlan")
    a.wait_ping(OVERLAY_V4[1])
    assert a.link_state(EGRESS) is None
    sent, received = transfer(a, b, OVERLAY_V4[1], TRANSFER_BYTES)
    assert sent == received
    assert ta.stop() == 0 and tb.stop() == 0
    out = ta.output()
    assert "kernel segmentation off (underlay device veth-a is a veth" in out
    # --kernel-gso on is the operator's word against the guess: it runs, and says so
    t = Tunneld(a, "--peer", b.underlay, "--kernel-gso", "on")
    a.wait_link(EGRESS)  # (the tunnel's device comes up first; the egress device is brought up after it)
    assert t.stop() == 0
    out = t.output()
    assert "kernel segmentation on: " in out and "--kernel-gso on although the underlay device veth-a" in out
    # where it cannot run at all, --kernel-gso on refuses to start, with one error line and status 1
    t = Tunneld(a, "--peer", b.underlay, "--kernel-gso", "on", "--no-offload", wait=False)
    assert t.proc.wait(timeout=15) == 1
    errors = [line for line in t.output().splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == ["tunneld: error: --kernel-gso on: offloads are off"], errors
    assert a.link_state(EGRESS) is None and a.link_state("tunneld0") is None


UDP_RECV = """
import hashlib, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
s.settimeout(3)
print("ready", flush=True)
n, h = 0, hashlib.sha256()
try:
    while True:
        h.update(s.recv(65535))
        n += 1
except socket.timeout:
    pass
print(n, h.hexdigest())
"""
# 40 UDP_SEGMENT sends of 20480 bytes in 1400-byte datagrams: the overlay device hands each over as one USO
# super-frame. Paced, so that a loaded machine's socket buffers are not what is measured.
UDP_SEND = """
import hashlib, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
data = bytes(range(256)) * 80
h = hashlib.sha256()
for _ in range(40):
    s.sendmsg([data], [(17, 103, (1400).to_bytes(2, "little"))], 0, (sys.argv[1], 9999))
    h.update(b"".join(data[i : i + 1400] for i in range(0, len(data), 1400)))
    time.sleep(0.01)
print(40 * 15, h.hexdigest())
"""


def test_udp_super_frames_are_segmented_by_the_kernel_too(hosts):
    a, b = hosts
    like_a_wire(a, b)
    ta, tb = start_pair(a, b, "vxlan", "--kernel-gso", "on")
    a.wait_ping(OVERLAY_V4[1])
    receiver = b.popen(sys.executable, "-c", UDP_RECV)
    assert receiver.stdout.readline().strip() == "ready"
    before = egress_rx_bytes(a)
    sent = a.run(sys.executable, "-c", UDP_SEND, OVERLAY_V4[1]).stdout.strip()
    received = receiver.communicate(timeout=15)[0].strip()
    assert sent == received  # every datagram, in order, byte for byte
    assert egress_rx_bytes(a) - before > 40 * 20480
    assert ta.stop() == 0 and tb.stop() == 0
