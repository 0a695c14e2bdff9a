"""VXLAN between two namespace hosts: tunneld ↔ tunneld, and tunneld ↔ the Linux kernel's own driver."""

from __future__ import annotations

import signal
import sys
import time

import pytest

from tests.support import A4, B4, B6, assert_transfers
from tunneld.testbed import OVERLAY_V4, OVERLAY_V6, Tunneld, kernel_vxlan, start_pair, transfer

pytestmark = pytest.mark.netns


def test_tunneld_to_tunneld_ping_and_transfers(module_hosts):
    a, b = module_hosts
    ta, tb = start_pair(a, b, "vxlan")
    a.wait_ping(OVERLAY_V4[1])
    assert a.ping(OVERLAY_V4[1], count=5)
    assert_transfers(a, b)
    assert a.run("ip", "-o", "link", "show", "tunneld0").stdout.count("mtu 1450") == 1
    assert ta.stop() == 0 and tb.stop() == 0
    assert a.link_state("tunneld0") is None and b.link_state("tunneld0") is None  # removed on exit


def test_ipv6_underlay_and_ipv6_overlay(module_hosts):
    a, b = module_hosts
    ta, tb = start_pair(a, b, "vxlan", underlay6=True)
    # IPv6 underlay costs 20 more bytes: 1500 - 70
    assert "mtu 1430" in a.run("ip", "-o", "link", "show", "tunneld0").stdout
    a.wait_ping(OVERLAY_V6[1], timeout=15)  # the overlay addresses go through DAD first
    assert_transfers(a, b, v6=True)
    assert ta.stop() == 0 and tb.stop() == 0


@pytest.mark.parametrize("tunneld_side", ["A", "B"])
def test_interop_with_linux_kernel_vxlan(hosts, tunneld_side):
    a, b = hosts
    t_host, k_host = (a, b) if tunneld_side == "A" else (b, a)
    t_addr, k_addr = (A4, B4) if tunneld_side == "A" else (B4, A4)
    kernel_vxlan(k_host, t_host.underlay, vni=4242, address=k_addr)
    t = Tunneld(t_host, "--mode", "vxlan", "--peer", k_host.underlay, "--vni", "4242", "--address", t_addr)
    t_host.wait_ping(k_addr.split("/")[0])
    # the kernel learnt our stable MAC behind our underlay address
    fdb = k_host.run("bridge", "fdb", "show", "dev", "vx0").stdout
    assert f"dst {t_host.underlay}" in fdb
    assert_transfers(a, b)
    assert t.stop() == 0


def test_kernel_peer_with_other_vni_is_not_heard(hosts):
    a, b = hosts
    kernel_vxlan(b, a.underlay, vni=2, address=B4)
    t = Tunneld(a, "--peer", b.underlay, "--vni", "1", "--address", A4)
    assert not a.ping(OVERLAY_V4[1], count=2, timeout=3)
    assert t.stop() == 0
    assert "vni_mismatch" in t.output()


def test_malformed_burst_while_traffic_flows(module_hosts):
    a, b = module_hosts
    ta, tb = start_pair(a, b, "vxlan")
    a.wait_ping(OVERLAY_V4[1])
    # From B's underlay address (so past the peer check) and from a stranger address, aim garbage at A.
    b.run("ip", "addr", "add", "10.231.0.99/24", "dev", b.ifname)
    garbage = [
        b"", b"\x08", b"\x00" * 8, b"\x08\x00\x00\x00\x00\x00\x01\x00",  # header only → runt
        b"\x80" + b"\x00" * 40, b"\x08\x01" + b"\x00" * 40, bytes(range(256)) * 5,
        b"\x08\x00\x00\x00\x00\x00\x02\x00" + b"\xff" * 60,  # VNI 2
    ]
    code = (
        "import socket,sys,itertools\n"
        f"g={garbage!r}\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "s.bind((sys.argv[1],0))\n"
        "for i,p in zip(range(20000),itertools.cycle(g)): s.sendto(p,(sys.argv[2],4789))\n"
    )
    burst_peer = b.popen(sys.executable, "-c", code, b.underlay, a.underlay)
    burst_stranger = b.popen(sys.executable, "-c", code, "10.231.0.99", a.underlay)
    sent, received = transfer(a, b, OVERLAY_V4[1], 8 << 20)  # traffic flows during the burst
    assert sent == received
    assert burst_peer.wait(timeout=60) == 0 and burst_stranger.wait(timeout=60) == 0
    assert a.ping(OVERLAY_V4[1], count=3)
    assert ta.proc.poll() is None, "tunneld died under garbage"
    assert ta.stop() == 0
    log = ta.output()
    for reason in ("truncated", "runt_frame", "bad_flags", "reserved_bits", "vni_mismatch", "unknown_peer"):
        assert reason in log, f"{reason} not counted: {log}"
    assert tb.stop() == 0


def test_peer_starting_late_and_restarting(module_hosts):
    a, b = module_hosts
    ta = Tunneld(a, "--peer", b.underlay, "--address", A4)
    assert not a.ping(OVERLAY_V4[1], count=1, timeout=1)  # nobody there yet: not fatal
    time.sleep(1)
    tb = Tunneld(b, "--peer", a.underlay, "--address", B4)
    assert a.wait_ping(OVERLAY_V4[1], timeout=5) < 3
    for _ in range(2):
        assert tb.stop() == 0
        assert not a.ping(OVERLAY_V4[1], count=1, timeout=1)  # peer down: ICMP errors come back to A
        tb = Tunneld(b, "--peer", a.underlay, "--address", B4)
        # A's neighbour cache still holds B's MAC from before: it must still be right.
        assert a.wait_ping(OVERLAY_V4[1], timeout=5) < 3
    assert ta.proc.poll() is None
    assert ta.stop() == 0 and tb.stop() == 0
    assert f"peer {b.underlay} heard: first valid packet received" in ta.output()  # the log says what happened


def test_sigkilled_peer_comes_back_with_the_same_identity(module_hosts):
    a, b = module_hosts
    ta, tb = start_pair(a, b, "vxlan")
    a.wait_ping(OVERLAY_V4[1])
    mac_before = b.run("cat", "/sys/class/net/tunneld0/address").stdout
    tb.stop(sig=signal.SIGKILL)
    b.wait_link("tunneld0", present=False)  # the kernel removes the device with its last fd
    tb = Tunneld(b, "--peer", a.underlay, "--address", B4, "--address", B6)
    assert b.run("cat", "/sys/class/net/tunneld0/address").stdout == mac_before
    assert a.wait_ping(OVERLAY_V4[1], timeout=5) < 3
    assert ta.stop() == 0 and tb.stop() == 0


def test_oversized_frames_are_dropped_not_fragmented(module_hosts):
    a, b = module_hosts
    ta = Tunneld(a, "--peer", b.underlay, "--address", A4, "--mtu", "1500")  # above what the underlay carries
    tb = Tunneld(b, "--peer", a.underlay, "--address", B4, "--mtu", "1500")
    a.wait_ping(OVERLAY_V4[1])
    assert a.ping(OVERLAY_V4[1], count=1)  # small packets fit
    r = a.run("ping", "-c", "2", "-W", "1", "-M", "do", "-s", "1472", OVERLAY_V4[1], check=False)
    assert r.returncode != 0  # a 1514-byte frame needs 1550 bytes of underlay
    assert ta.stop() == 0 and tb.stop() == 0
    assert "too_big" in ta.output()


@pytest.mark.parametrize("offload", [[], ["--no-offload"]], ids=["offload", "plain"])
def test_interface_deleted_underneath_stops_with_status_1(module_hosts, offload):
    a, b = module_hosts
    t = Tunneld(a, "--peer", b.underlay, "--address", A4, *offload)
    a.run("ip", "link", "del", "tunneld0")
    assert t.proc.wait(timeout=10) == 1  # not a silent daemon with nothing to carry: systemd restarts it
    assert "interface tunneld0 was deleted while running" in t.output()
