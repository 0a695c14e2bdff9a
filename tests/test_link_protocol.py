"""The engine's ``LinkPort`` is the whole contract: the real links and the fakes implement every member, so the
engine probes for none (no getattr/hasattr) and a missing member fails here, not in a callback at run time."""

from __future__ import annotations

import os
import socket

import pytest

from tunneld.datapath.engine import LinkPort
from tunneld.encap.gre import IPPROTO_GRE
from tunneld.testing import FakeGsoLink, FakeLink

MEMBERS = sorted({*LinkPort.__annotations__, *(n for n in vars(LinkPort) if not n.startswith("_"))})


def missing(link: object) -> list[str]:
    return [name for name in MEMBERS if not hasattr(link, name)]


def test_the_protocol_names_what_the_engine_uses():
    assert {"family", "df", "buffered", "kernel_drops", "path_mtu", "size_receive_buffer", "spreads_flows",
            "destination", "send", "send_segments", "recv_one", "recv_gro_into", "enable_gro"} <= set(MEMBERS)


@pytest.mark.parametrize("fake", [FakeLink, FakeGsoLink])
def test_the_fakes_implement_all_of_it(fake):
    assert missing(fake()) == []


def test_the_udp_link_implements_all_of_it():
    from tunneld.io.udp import UdpLink

    link = UdpLink("127.0.0.1", 0, local="127.0.0.1", send_sockets=1)
    try:
        assert missing(link) == []
        assert link.family == socket.AF_INET and link.buffered is False and isinstance(link.kernel_drops, int)
    finally:
        link.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="a raw IP socket needs root (CAP_NET_RAW)")
def test_the_raw_link_implements_all_of_it():
    from tunneld.io.raw import RawLink

    link = RawLink("127.0.0.1", IPPROTO_GRE, local="127.0.0.1")
    try:
        assert missing(link) == []
    finally:
        link.close()
