"""Offloads in namespaces: the kernel really hands TSO super-frames to tunneld, and every mix of offload /
no-offload / kernel VXLAN peers moves 8 MB intact both ways, over IPv4 and IPv6 overlays."""

from __future__ import annotations

import pytest

from tests.support import A4, A6, B4, B6, assert_transfers
from tunneld.testbed import OVERLAY_V4, OVERLAY_V6, Tunneld, features, kernel_vxlan

pytestmark = pytest.mark.netns


def test_offload_on_by_default_and_off_with_no_offload_interoperate(hosts):
    a, b = hosts
    ta = Tunneld(a, "--peer", b.underlay, "--address", A4, "--address", A6)
    tb = Tunneld(b, "--peer", a.underlay, "--address", B4, "--address", B6, "--no-offload")
    assert features(a)["tcp-segmentation-offload"] == "on"
    assert features(b)["tcp-segmentation-offload"] == "off"
    a.wait_ping(OVERLAY_V4[1])
    assert_transfers(a, b)
    a.wait_ping(OVERLAY_V6[1], timeout=15)
    assert_transfers(a, b, v6=True)
    assert ta.stop() == 0 and tb.stop() == 0


@pytest.mark.parametrize("tunneld_side", ["A", "B"])
def test_kernel_vxlan_peer_ipv6_overlay_with_offloads(hosts, tunneld_side):
    a, b = hosts
    t_host, k_host = (a, b) if tunneld_side == "A" else (b, a)
    t_addr, k_addr = (A6, B6) if tunneld_side == "A" else (B6, A6)
    kernel_vxlan(k_host, t_host.underlay, address=k_addr)
    t = Tunneld(t_host, "--peer", k_host.underlay, "--address", t_addr)
    assert features(t_host)["tcp-segmentation-offload"] == "on"
    t_host.wait_ping(k_addr.split("/")[0], timeout=15)
    assert_transfers(a, b, v6=True)
    assert t.stop() == 0
