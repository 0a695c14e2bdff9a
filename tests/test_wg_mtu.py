"""WireGuard's padding and the MTU: padding to 16 never passes the frame limit the engine gives the session (as
wireguard-go never pads past its device MTU), so the overhead counts the tag and not the padding, and a frame of
exactly the limit leaves as limit + 32 bytes of WireGuard message: 1440 over a 1500-byte IPv4 underlay."""

from __future__ import annotations

from tests.wg_engines import A, ALL, B, PA, PB, T0, engines, exchange
from tunneld.datapath.engine import Engine
from tunneld.datapath.peers import PeerSpec
from tunneld.encap.base import DeviceKind
from tunneld.encap.wireguard.codec import PORT, WireGuard
from tunneld.testing import FakeClock, FakeDevice, FakeLink, random_frames

UNDERLAY = 1500


def frame_of(length: int, seed: int = 3) -> bytes:
    """An IPv4 packet of exactly ``length`` bytes (total length set to match)."""
    base = bytearray(random_frames(DeviceKind.TUN, 50, seed=seed)[0])
    while base[0] >> 4 != 4:
        seed += 1
        base = bytearray(random_frames(DeviceKind.TUN, 50, seed=seed)[0])
    header = bytes(base[:20])
    packet = bytearray(header) + bytes(length - 20)
    packet[2:4] = length.to_bytes(2, "big")
    return bytes(packet)


def test_the_overhead_counts_the_tag_not_the_padding():
    codec = WireGuard.from_options({})
    assert codec.outer_overhead(False) == 20 + 8 + 16 + 16 == 60
    assert codec.outer_overhead(True) == 80
    assert UNDERLAY - codec.overhead(False) == 1440  # wireguard-go's MTU for this underlay
    assert codec.tail_room == 31  # the room behind a frame still holds the padding the limit allows


def test_a_frame_of_exactly_the_limit_is_sealed_without_padding_and_smaller_ones_to_16():
    clock = FakeClock(T0)
    limit = UNDERLAY - WireGuard.from_options({}).outer_overhead(False)
    ea, eb = engines(clock, max_frame=limit)
    assert ea.peers.all[0].session.peer.mtu == limit  # told by the engine when the session was made
    ea.device.inject(frame_of(100))
    ea.on_device_readable()
    exchange(ea, eb)  # handshake, then the held frame
    sizes = {}
    for length in (limit, limit - 1, limit - 15, limit - 16, 1, 100, 1401):
        frame = frame_of(max(length, 20))
        ea.device.inject(frame)
        ea.on_device_readable()
        datagram = ea.link.sent[-1][0]
        sizes[len(frame)] = len(datagram)
        exchange(ea, eb)
        assert eb.device.written[-1] == frame
    assert sizes[limit] == limit + 32 and limit + 32 + 28 == UNDERLAY  # fits the underlay exactly
    assert sizes[limit - 1] == limit + 32  # padded up to the limit, not to the next 16 (1440 is a multiple)
    assert sizes[20] == 32 + 32 and sizes[100] == 112 + 32 and sizes[1401] == 1408 + 32
    assert not eb.stats.drops and not ea.stats.drops


def test_a_limit_that_is_no_multiple_of_16_caps_the_padding_and_follows_a_learnt_path_mtu():
    clock = FakeClock(T0)
    ea, eb = engines(clock, max_frame=1440)
    ea.device.inject(frame_of(100))
    ea.on_device_readable()
    exchange(ea, eb)
    peer = ea.peers.all[0]
    ea.link.path_mtu_answer = 1400  # the kernel learnt a smaller path MTU towards the peer
    ea._learn_path(peer, clock())
    assert ea.segment_limit(peer) == 1340 and peer.session.peer.mtu == 1340
    frame = frame_of(1340)  # 1340 is not a multiple of 16: padding to 1344 would not fit the path
    ea.device.inject(frame)
    ea.on_device_readable()
    assert len(ea.link.sent[-1][0]) == 1340 + 32
    exchange(ea, eb)
    assert eb.device.written[-1] == frame


class MtuDevice(FakeDevice):
    """A fake interface whose MTU an operator changes (``ip link set DEV mtu N``)."""

    def __init__(self, mtu: int) -> None:
        super().__init__()
        self.value = mtu

    def mtu(self) -> int:
        return self.value


def test_the_interface_mtu_caps_the_padding_too_and_a_change_of_it_is_followed():
    clock = FakeClock(T0)
    ea, eb = engines(clock, max_frame=1440)
    ea = Engine(MtuDevice(1440), FakeLink(B, PORT), ea.codec, max_frame=1440, clock=clock,
                peers=[PeerSpec(B, routes=ALL, key=PB)])
    session = ea.peers.all[0].session
    ea.device.inject(frame_of(100))
    ea.on_device_readable()
    exchange(ea, eb)
    ea.check_device_mtu()
    assert ea.device_mtu == 1440 and session.peer.mtu == 1440
    ea.device.value = 1420  # wg-quick sets 1420 (room for an IPv6 underlay): wireguard-go then pads within it
    ea.check_device_mtu()
    assert session.peer.mtu == 1420
    for length, sealed in ((1420, 1420 + 32), (1415, 1420 + 32), (1400, 1408 + 32)):
        ea.device.inject(frame_of(length))
        ea.on_device_readable()
        assert len(ea.link.sent[-1][0]) == sealed, length
        exchange(ea, eb)
        assert len(eb.device.written[-1]) == length
    ea.device.value = 9000  # above what the underlay carries: the path's limit holds
    ea.check_device_mtu()
    assert session.peer.mtu == 1440
    ends_b = Engine(MtuDevice(1420), FakeLink(A, PORT), WireGuard.from_options({}), max_frame=1440, clock=clock,
                    peers=[PeerSpec(A, routes=ALL, key=PA)])
    ends_b.check_device_mtu()  # a peer added later starts within the interface's MTU too
    ends_b.peers.upsert(PeerSpec("192.0.2.9", routes=("10.9.0.0/24",), key=PB))
    assert [p.session.peer.mtu for p in ends_b.peers.all] == [1420, 1420]
