"""The test-only keyed codec (tests/keyed.py): its wire format against bytes built here, its per-peer rules, and
two engines on a fake clock (keepalives, roaming on authenticated packets only, many peers)."""

from __future__ import annotations

import asyncio
import hashlib
import math
import socket
import struct

import pytest

from tests.keyed import HEADER_LEN, TAG_LEN, Keyed, KeyedSession
from tunneld.encap.base import DeviceKind, Drop
from tunneld.encap.session import HELD
from tunneld.datapath.engine import HEADROOM, Engine
from tunneld.datapath.peers import PeerSpec
from tunneld.testing import FakeClock, FakeDevice, FakeLink, random_frames

A, B, C = "192.0.2.1", "192.0.2.2", "192.0.2.3"
SECRET = "shared secret"
T0 = 5000.0


def mapped(address: str) -> bytes:
    return bytes(10) + b"\xff\xff" + bytes(int(x) for x in address.split("."))


def wire(kind: int, sender: str, counter: int, payload: bytes, secret: str = SECRET) -> bytes:
    """The packet as the module docstring lays it out, built without the codec."""
    head = bytes([kind, 0, 0, 0]) + mapped(sender) + struct.pack("!Q", counter) + payload
    return head + hashlib.blake2s(head, key=secret.encode(), digest_size=16).digest()


def seal(session: KeyedSession, frame: bytes, now: float = T0) -> bytes:
    buf = bytearray(HEADROOM) + bytearray(frame) + bytearray(TAG_LEN)
    start, end = session.seal(buf, HEADROOM, HEADROOM + len(frame), now)
    return bytes(buf[start:end])


def ends(keepalive: float = 1.0) -> tuple[Keyed, Keyed]:
    return Keyed(A, SECRET, keepalive), Keyed(B, SECRET, keepalive)


PACKET = bytes.fromhex("450000200001000040110000c0a80001c0a80002") + b"payload!!!!!"


def test_sealed_packets_are_the_documented_bytes_and_counters_go_up_per_peer():
    a, _ = ends()
    to_b, to_c = a.session(B), a.session(C)
    assert seal(to_b, PACKET) == wire(1, A, 0, PACKET)
    assert seal(to_b, PACKET) == wire(1, A, 1, PACKET)
    assert seal(to_c, PACKET) == wire(1, A, 0, PACKET)  # C's counter is C's own
    (keepalive,) = to_b.poll(T0 + 1)
    assert keepalive == wire(2, A, 2, b"")


def test_open_names_the_peer_from_the_packet_and_checks_tag_then_counter():
    _, b = ends()
    from_a = b.session(A)
    assert b.peer_key(memoryview(wire(1, A, 5, PACKET))) == A
    assert b.peer_key(memoryview(wire(1, C, 5, PACKET))) is Drop.UNKNOWN_PEER  # no session was made for C
    assert from_a.open(memoryview(wire(1, A, 5, PACKET)), T0) == (HEADER_LEN, len(PACKET))
    assert from_a.open(memoryview(wire(1, A, 5, PACKET)), T0) is Drop.SEQUENCE  # a replay
    assert from_a.open(memoryview(wire(1, A, 4, PACKET)), T0) is Drop.SEQUENCE  # an older one
    forged = bytearray(wire(1, A, 9, PACKET))
    forged[-1] ^= 1
    assert from_a.open(memoryview(bytes(forged)), T0) is Drop.BAD_CHECKSUM
    assert from_a.open(memoryview(wire(1, A, 9, PACKET, secret="other")), T0) is Drop.BAD_CHECKSUM
    # neither forgery moved the counter: 6 is still ahead
    assert from_a.open(memoryview(wire(1, A, 6, PACKET)), T0) == (HEADER_LEN, len(PACKET))
    assert from_a.open(memoryview(wire(2, A, 7, b"")), T0) is HELD  # a keepalive: no frame, no drop
    assert from_a.open(memoryview(wire(2, A, 8, b"x")), T0) is Drop.LENGTH_MISMATCH
    assert from_a.open(memoryview(wire(1, A, 8, b"")), T0) is Drop.RUNT_FRAME
    assert from_a.open(memoryview(wire(1, B, 8, PACKET)), T0) is Drop.UNKNOWN_PEER  # another peer's packet
    assert from_a.open(memoryview(wire(3, A, 8, PACKET)), T0) is Drop.BAD_FLAGS
    reserved = bytearray(wire(1, A, 8, PACKET))
    reserved[2] = 1
    assert from_a.open(memoryview(bytes(reserved)), T0) is Drop.RESERVED_BITS
    assert from_a.open(memoryview(wire(1, A, 8, PACKET)[:40]), T0) is Drop.TRUNCATED


@pytest.mark.parametrize("garbage", [b"", b"\x01", b"\x01" + bytes(26), b"\x07" + bytes(60), bytes(range(256))])
def test_peer_key_on_garbage_is_a_drop(garbage):
    _, b = ends()
    b.session(A)
    assert isinstance(b.peer_key(memoryview(garbage)), Drop)


def test_keepalive_deadline_follows_the_last_packet_sent():
    a, _ = ends(keepalive=2.5)
    s = a.session(B)
    assert s.deadline() == -math.inf  # the first is due at once
    assert len(s.poll(T0)) == 1 and s.deadline() == T0 + 2.5
    assert s.poll(T0 + 2.4) == []
    seal(s, PACKET, now=T0 + 2)
    assert s.deadline() == T0 + 4.5 and s.poll(T0 + 4.4) == []
    assert len(s.poll(T0 + 4.5)) == 1


@pytest.mark.parametrize("options,words", [
    ({"secret": SECRET}, "self: required"),
    ({"self": A}, "secret: required"),
    ({"self": "nowhere", "secret": SECRET}, "not an IPv4 or IPv6"),
    ({"self": A, "secret": "x" * 33}, "1-32 bytes"),
    ({"self": A, "secret": SECRET, "keepalive": "0"}, "above 0"),
    ({"self": A, "secret": SECRET, "keepalive": "soon"}, "expected seconds"),
    ({"self": A, "secret": SECRET, "keepalive": True}, "expected seconds"),
])
def test_bad_options_are_one_line_that_never_shows_the_secret(options, words):
    with pytest.raises(ValueError, match=words) as e:
        Keyed.from_options(options)
    assert "\n" not in str(e.value) and "x" * 33 not in str(e.value) and SECRET not in str(e.value)


def test_options_from_a_command_line_or_a_file():
    assert Keyed.from_options({"self": A, "secret": SECRET, "keepalive": "0.25"}).keepalive == 0.25
    assert Keyed.from_options({"self": "::ffff:192.0.2.1", "secret": SECRET}).keepalive == 1.0
    codec = Keyed.from_options({"self": A, "secret": SECRET, "keepalive": 3})
    assert codec.describe() == "self 192.0.2.1, keepalive 3s" and SECRET not in codec.describe()
    assert codec.overhead(False) == 20 + 8 + HEADER_LEN + TAG_LEN and codec.stateful and not codec.spreads


# -- two engines on a fake clock ------------------------------------------------------------------------------


def engines(clock: FakeClock, keepalive: float = 1.0):
    a, b = ends(keepalive)
    ea = Engine(FakeDevice(), FakeLink(B), a, max_frame=9000, clock=clock)
    eb = Engine(FakeDevice(), FakeLink(A), b, max_frame=9000, clock=clock)
    return ea, eb


def carry(src: Engine, dst: Engine, source: str) -> int:
    n = len(src.link.sent)
    for packet, _ in src.link.sent:
        dst.link.deliver(packet, source=source)
    src.link.sent.clear()
    for _ in range(n + 1):
        dst.on_link_readable()
    return n


def test_keepalives_leave_when_due_over_ten_minutes_and_traffic_holds_them_back():
    clock = FakeClock(T0)
    ea, eb = engines(clock, keepalive=1.0)
    for e in (ea, eb):
        e.run_timers()
    frames = random_frames(DeviceKind.TUN, 1200, seed=3)
    sent_at: list[float] = []
    while clock.now < T0 + 600:
        step = min(ea.next_deadline(), eb.next_deadline(), math.floor(clock.now * 4 + 1) / 4)
        clock.now = step
        for e in (ea, eb):
            if e.next_deadline() <= clock.now:
                e.run_timers()
        if clock.now < T0 + 300 and (clock.now * 4) % 2 == 0:  # A sends a frame every 0.5 s for 5 minutes
            ea.device.inject(frames[len(eb.device.written) % len(frames)])
            ea.on_device_readable()
        own_before = eb.stats.codec_packets
        carry(ea, eb, A)
        carry(eb, ea, B)
        if eb.stats.codec_packets > own_before:
            sent_at.append(clock.now)
    # A was never idle for a second while it sent: its keepalives are those of the silent 5 minutes (and the
    # first, at once); B sent nothing but keepalives, one a second for ten minutes.
    assert 299 <= ea.stats.codec_packets <= 302, ea.stats.codec_packets
    assert 599 <= eb.stats.codec_packets <= 602, eb.stats.codec_packets
    assert all(later - earlier == pytest.approx(1.0) for earlier, later in zip(sent_at[1:], sent_at[2:]))
    assert eb.stats.rx_packets == ea.stats.tx_packets == 599 and not ea.stats.drops and not eb.stats.drops
    assert ea.next_deadline() == ea.peers.all[0].session.deadline() <= clock.now + 1


def test_the_loops_timer_sends_keepalives_on_real_time():
    """attach() arms the loop's timer at the sessions' earliest deadline; each firing re-arms it."""
    async def run(engine: Engine) -> list[int]:
        engine.attach(asyncio.get_running_loop())
        counts = []
        try:
            for _ in range(40):  # bounded: ~1 s at most
                await asyncio.sleep(0.025)
                counts.append(len(engine.link.sent))
                if counts[-1] >= 4:
                    break
        finally:
            engine.detach()
        return counts

    device, link = FakeDevice(), FakeLink(B)
    quiet = socket.socketpair()  # fds the loop can watch that never become readable
    try:
        device.fileno, link.fileno = quiet[0].fileno, quiet[1].fileno
        engine = Engine(device, link, Keyed(A, SECRET, 0.05), max_frame=1400)  # on the real clock
        counts = asyncio.run(run(engine))
    finally:
        for s in quiet:
            s.close()
    assert counts[-1] >= 4, counts  # the first at once, then one each 50 ms from the loop's timer
    assert engine.stats.codec_packets == len(link.sent) and engine.next_deadline() == math.inf  # detached


def test_an_authenticated_packet_moves_the_endpoint_and_a_forged_or_replayed_one_never_does():
    clock = FakeClock(T0)
    ea, eb = engines(clock)
    ea.device.inject(PACKET)
    ea.on_device_readable()
    (first, _), = ea.link.sent
    carry(ea, eb, A)
    peer = eb.peers.get(A)
    assert peer.endpoint == A and eb.stats.endpoint_changes == 0
    # A's datagrams now leave from another address: B follows them there, by the packet's word.
    ea.device.inject(PACKET)
    ea.on_device_readable()
    carry(ea, eb, "192.0.2.77")
    assert peer.endpoint == "192.0.2.77" and eb.stats.endpoint_changes == 1
    assert eb.peers.by_endpoint["192.0.2.77"] is peer and A not in eb.peers.by_endpoint
    eb.device.inject(PACKET)
    eb.on_device_readable()
    assert eb.link.sent_to[-1] == "192.0.2.77"
    # A third address: a forged tag, then a replay of A's first datagram (a valid tag, an old counter).
    forged = bytearray(first)
    forged[-3] ^= 0x40
    for packet in (bytes(forged), first):
        eb.link.deliver(packet, source="192.0.2.99")
        eb.on_link_readable()
    assert peer.endpoint == "192.0.2.77" and eb.stats.endpoint_changes == 1
    assert eb.stats.drops == {Drop.BAD_CHECKSUM: 1, Drop.SEQUENCE: 1}
    assert eb.stats.rx_packets == 2


def test_three_peers_each_have_their_own_counters():
    clock = FakeClock(T0)
    hub = Engine(FakeDevice(), FakeLink(A), Keyed(C, SECRET), max_frame=1400, clock=clock,
                 peers=[PeerSpec(A, routes=("10.0.1.0/24",)), PeerSpec(B, routes=("10.0.2.0/24",)),
                        PeerSpec("192.0.2.4", routes=("10.0.4.0/24",))])
    src = {A: "10.0.1.1", B: "10.0.2.1"}

    def packet(src_ip: str) -> bytes:
        ip = bytes.fromhex("4500001c000000004011") + bytes(2) + bytes(int(x) for x in src_ip.split("."))
        return ip + bytes([10, 0, 3, 1]) + bytes(8)

    def from_peer(sender: str, counter: int) -> None:
        hub.link.deliver(wire(1, sender, counter, packet(src[sender])), source=sender)
        hub.on_link_readable()

    for n in (0, 1, 2):
        from_peer(A, n)
    from_peer(B, 0)  # B's counter starts low, and that is fine: A's numbers are A's
    from_peer(A, 1)  # A's late one: dropped, and B is not disturbed
    from_peer(B, 1)
    assert hub.stats.drops == {Drop.SEQUENCE: 1}
    assert [hub.peers.get(p).stats.rx_packets for p in (A, B)] == [3, 2]
    assert hub.peers.get(A).stats.dropped == 1 and hub.peers.get(B).stats.dropped == 0
