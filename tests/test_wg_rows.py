"""WireGuard on the offload path, on fakes: TSO super-frames cut into rows and sealed by the peer's session (one
UDP_SEGMENT send, equal rows, counters in send order), UDP_GRO reads opened row by row and a flow's rows written
as one super-frame, and every refusal a row's own (tampered, replayed, forged from elsewhere: no roaming).
The frames are built by scapy; the receiving end's opened rows are compared with them."""

from __future__ import annotations

import struct

from scapy.layers.inet import IP, TCP

from tests.frames import payload
from tunneld.datapath.engine import WAKEUP_BYTES, make_engine, offload_supported
from tunneld.datapath.peers import PeerSpec
from tunneld.encap.base import Drop
from tunneld.encap.session import Answer
from tunneld.encap.wireguard import StaticKey, key_to_base64
from tunneld.encap.wireguard.codec import HANDSHAKE_COST, HEADER_LEN, WireGuard
from tunneld.offload.vnet import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, HDR, NO_OFFLOAD, VNET_HDR_LEN
from tunneld.testing import FakeClock, FakeGsoLink, FakeVnetDevice

A, B, ELSEWHERE = "192.0.2.1", "192.0.2.2", "198.51.100.7"
T0 = 1_800_000_000.0
KA, KB = StaticKey(bytes(range(1, 33))), StaticKey(bytes(range(33, 65)))
PA, PB = key_to_base64(KA.public), key_to_base64(KB.public)
ALL = ("0.0.0.0/0", "::/0")
MSS = 1368  # 20 + 32 bytes of headers (timestamps): 1420-byte segments, the tunnel's MTU
TRANSPORT = struct.Struct("<IIQ")


def engines(clock: FakeClock):
    a = WireGuard.from_options({"private_key": bytes(range(1, 33)), "wg_peers": {PB: (None, 0)}})
    b = WireGuard.from_options({"private_key": bytes(range(33, 65)), "wg_peers": {PA: (None, 0)}})
    ea = make_engine(FakeVnetDevice(), FakeGsoLink(B), a, max_frame=1420, offload=True,
                     peers=[PeerSpec(B, routes=ALL, key=PB)])
    eb = make_engine(FakeVnetDevice(), FakeGsoLink(A), b, max_frame=1420, offload=True,
                     peers=[PeerSpec(A, routes=ALL, key=PA)])
    for e in (ea, eb):
        e._clock = clock
    return ea, eb


def tcp_super(data: bytes, seq: int = 1000) -> bytes:
    return bytes(IP(src="10.1.0.1", dst="10.1.0.2", flags="DF", id=77)
                 / TCP(sport=40000, dport=5201, seq=seq, ack=555, flags="PA", window=500,
                       options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]) / data)


def ping(n: int) -> bytes:
    return bytes(IP(src="10.1.0.1", dst="10.1.0.2", id=n) / (b"p" * (40 + n)))


def inject_super(e, data: bytes, seq: int = 1000) -> None:
    frame = tcp_super(data, seq)
    e.device.inject(HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, 52, MSS, 20, 16) + frame)


def gro_reads(datagrams: list[bytes]) -> list[list[bytes]]:
    """Group datagrams as UDP_GRO would: a run of one size, the last of a run may be shorter."""
    reads: list[list[bytes]] = []
    for d in datagrams:
        if reads and len(reads[-1][0]) >= len(d) and len(reads[-1][-1]) == len(reads[-1][0]):
            reads[-1].append(d)
        else:
            reads.append([d])
    return reads


def carry(src, dst, source: str, gro: bool = True) -> int:
    sent = [p for p, _ in src.link.sent]
    src.link.sent.clear()
    for read in gro_reads(sent) if gro else [[p] for p in sent]:
        dst.link.deliver_gro(read, source=source)
    for _ in range(len(sent) + 1):
        dst.on_link_readable()
    return len(sent)


def handshake(clock: FakeClock):
    ea, eb = engines(clock)
    ea.device.inject(NO_OFFLOAD + ping(1))
    ea.on_device_readable()
    for _ in range(4):
        if not (carry(ea, eb, A) + carry(eb, ea, B)):
            break
    assert eb.device.written == [NO_OFFLOAD + ping(1)]
    eb.device.written.clear()
    assert ea.peers.all[0].session.peer.has_session
    return ea, eb


def payload_of_writes(written: list[bytes]) -> tuple[bytes, int]:
    """The TCP payload the device got, super-frames and single frames alike, and how many writes."""
    out = b""
    for w in written:
        ip = IP(w[VNET_HDR_LEN:])
        out += bytes(ip[TCP].payload)
    return out, len(written)


def test_wireguard_takes_the_offload_path():
    assert offload_supported(WireGuard.from_options({}))


def test_a_superframe_leaves_as_equal_sealed_rows_in_one_send_counters_in_order():
    clock = FakeClock(T0)
    ea, eb = handshake(clock)
    data = payload(MSS * 30 + 11)
    ea.device.inject(NO_OFFLOAD + ping(2))
    inject_super(ea, data)
    ea.device.inject(NO_OFFLOAD + ping(3))
    sends = ea.link.sends
    ea.on_device_readable()
    rows = [p for p, _ in ea.link.sent]
    assert ea.link.sends - sends == 3  # the ping, ONE send for the 31 rows, the ping
    assert len(rows) == 33
    sealed = rows[1:32]
    assert len({len(r) for r in sealed[:-1]}) == 1 and len(sealed[-1]) < len(sealed[0])
    assert len(sealed[0]) == HEADER_LEN + 1420 + 16  # 1420 bytes: padding stops at the frame limit; the tag
    counters = [TRANSPORT.unpack_from(r)[2] for r in rows]
    assert counters == list(range(counters[0], counters[0] + 33))  # strictly increasing in send order
    assert ea.stats.tx_packets == 33 and ea.peers.all[0].stats.tx_packets == 33
    received = eb.stats.rx_packets
    carry(ea, eb, A)
    assert not eb.stats.drops, dict(eb.stats.drops)
    # the pings alone, the 31 rows as one TCP super-frame behind a GSO vnet header
    assert eb.device.written[0] == NO_OFFLOAD + ping(2) and eb.device.written[-1] == NO_OFFLOAD + ping(3)
    flags, gso_type, _, gso_size, _, _ = HDR.unpack_from(eb.device.written[1])
    assert (flags, gso_type, gso_size) == (F_NEEDS_CSUM, GSO_TCPV4, MSS)
    assert payload_of_writes(eb.device.written[1:-1]) == (data, 1)
    assert eb.stats.rx_packets - received == 33


def test_rows_wait_behind_the_handshake_when_there_are_no_keys_yet():
    clock = FakeClock(T0)
    ea, eb = engines(clock)
    data = payload(MSS * 5)
    inject_super(ea, data)
    ea.on_device_readable()
    assert [p[0] for p, _ in ea.link.sent] == [1]  # only an initiation: the rows are staged (HELD)
    for _ in range(4):
        if not (carry(ea, eb, A) + carry(eb, ea, B)):
            break
    assert payload_of_writes(eb.device.written)[0] == data
    assert not eb.stats.drops and not ea.stats.drops


def sealed_rows(clock, ea, count: int):
    inject_super(ea, payload(MSS * count))
    ea.on_device_readable()
    rows = [p for p, _ in ea.link.sent]
    ea.link.sent.clear()
    assert len(rows) == count
    return rows


def test_a_tampered_row_in_a_gro_read_is_dropped_alone():
    clock = FakeClock(T0)
    ea, eb = handshake(clock)
    rows = sealed_rows(clock, ea, 12)
    bad = bytearray(rows[5])
    bad[40] ^= 1
    rows[5] = bytes(bad)
    eb.link.deliver_gro(rows, source=A)
    eb.on_link_readable()
    assert {k: v for k, v in eb.stats.drops.items() if v} == {Drop.DECRYPTION_FAILED: 1}
    got, writes = payload_of_writes(eb.device.written)
    data = payload(MSS * 12)
    assert got == data[: 5 * MSS] + data[6 * MSS :] and writes == 2  # the rows either side, each coalesced
    assert eb.peers.all[0].stats.rx_packets == 1 + 11  # the handshake's ping, then the rows


def test_a_replayed_row_in_a_batch_is_dropped():
    clock = FakeClock(T0)
    ea, eb = handshake(clock)
    rows = sealed_rows(clock, ea, 8)
    eb.link.deliver_gro(rows[:4] + [rows[2]] + rows[4:], source=A)
    eb.on_link_readable()
    assert {k: v for k, v in eb.stats.drops.items() if v} == {Drop.REPLAYED: 1}
    assert payload_of_writes(eb.device.written)[0] == payload(MSS * 8)


def test_only_authenticated_rows_move_the_peer():
    clock = FakeClock(T0)
    ea, eb = handshake(clock)
    rows = sealed_rows(clock, ea, 6)
    forged = [r[:20] + bytes(len(r) - 20) for r in rows]
    eb.link.deliver_gro(forged, source=ELSEWHERE)
    eb.on_link_readable()
    peer = eb.peers.all[0]
    assert peer.endpoint == A and eb.stats.drops[Drop.DECRYPTION_FAILED] == 6
    assert eb.device.written == []
    eb.link.deliver_gro(rows, source=ELSEWHERE)
    eb.on_link_readable()
    assert peer.endpoint == ELSEWHERE and eb.stats.endpoint_changes == 1
    assert payload_of_writes(eb.device.written)[0] == payload(MSS * 6)


def test_single_datagrams_of_a_wake_up_are_coalesced_too():
    """Without UDP_GRO (wireguard-go sends one datagram per call, the kernel may not merge them) the opened
    frames of one wake-up still lie packed and go out as one super-frame."""
    clock = FakeClock(T0)
    ea, eb = handshake(clock)
    rows = sealed_rows(clock, ea, 10)
    for r in rows:
        eb.link.deliver_gro([r], source=A)
    eb.on_link_readable()
    got, writes = payload_of_writes(eb.device.written)
    assert got == payload(MSS * 10) and writes == 1


def test_a_handshake_weighs_more_than_its_bytes_against_the_wake_up_budget():
    clock = FakeClock(T0)
    ea, eb = engines(clock)
    ea.device.inject(NO_OFFLOAD + ping(1))
    ea.on_device_readable()
    initiation = ea.link.sent[0][0]
    codec = eb.codec
    assert codec.cost(memoryview(initiation), Drop.BAD_MAC) == len(initiation)
    assert codec.cost(memoryview(initiation), PA) == HANDSHAKE_COST
    assert codec.cost(memoryview(initiation), Drop.REPLAYED) == HANDSHAKE_COST  # X25519 was done for it
    assert codec.cost(memoryview(initiation), Answer(())) == len(initiation)  # a cookie reply under load: cheap
    # The same valid initiation 12 times: each is worked on (a response, then replays of its timestamp); one
    # wake-up takes WAKEUP_BYTES // HANDSHAKE_COST of them, and the rest wait for the next.
    for _ in range(12):
        eb.link.deliver_gro([initiation], source=A)
    eb.on_link_readable()
    per_wakeup = WAKEUP_BYTES // HANDSHAKE_COST
    assert 1 < per_wakeup < 12
    assert len(eb.link.pending) == 12 - per_wakeup
    eb.on_link_readable()
    assert len(eb.link.pending) == 12 - 2 * per_wakeup
    assert eb.stats.drops[Drop.REPLAYED] == 2 * per_wakeup - 1


def test_plain_frames_and_keepalives_keep_working_on_the_rows_path():
    clock = FakeClock(T0)
    ea, eb = handshake(clock)
    frames = [ping(i) for i in range(5, 9)]
    for f in frames:
        ea.device.inject(NO_OFFLOAD + f)
    ea.on_device_readable()
    carry(ea, eb, A, gro=False)
    assert eb.device.written == [NO_OFFLOAD + f for f in frames]
    assert HDR.unpack_from(eb.device.written[0])[1] == GSO_NONE
    # a keepalive is a transport message with nothing inside: authenticated, nothing written, not a drop
    clock.advance(11)
    eb.run_timers()
    eb.device.written.clear()
    ea.run_timers()
    carry(ea, eb, A)
    carry(eb, ea, B)
    assert not ea.stats.drops and not eb.stats.drops


def test_a_row_that_is_no_transport_message_takes_the_one_by_one_way_and_the_rest_stay_in_order():
    clock = FakeClock(T0)
    ea, eb = handshake(clock)
    rows = sealed_rows(clock, ea, 8)
    junk = b"\x01\0\0\0" + bytes(len(rows[0]) - 4)  # an initiation's type, the wrong length: judged alone
    eb.link.deliver_gro(rows[:3] + [junk] + rows[3:], source=A)
    eb.on_link_readable()
    assert {k: v for k, v in eb.stats.drops.items() if v} == {Drop.LENGTH_MISMATCH: 1}
    got, writes = payload_of_writes(eb.device.written)
    assert got == payload(MSS * 8) and writes == 2  # the rows before it written first, then the rest


def test_with_several_peers_each_row_s_inner_source_must_be_the_sending_peer_s():
    """L3 with routes narrower than everything: a row whose inner source lies outside its peer's allowed IPs is
    dropped (source_not_allowed), the others of the read written, as for single datagrams."""
    clock = FakeClock(T0)
    kc = StaticKey(bytes(range(65, 97)))
    pc = key_to_base64(kc.public)
    a = WireGuard.from_options({"private_key": bytes(range(1, 33)), "wg_peers": {PB: (None, 0)}})
    b = WireGuard.from_options({"private_key": bytes(range(33, 65)), "wg_peers": {PA: (None, 0), pc: (None, 0)}})
    ea = make_engine(FakeVnetDevice(), FakeGsoLink(B), a, max_frame=1420, offload=True,
                     peers=[PeerSpec(B, routes=ALL, key=PB)])
    eb = make_engine(FakeVnetDevice(), FakeGsoLink(A), b, max_frame=1420, offload=True,
                     peers=[PeerSpec(A, routes=("10.1.0.1/32",), key=PA),
                            PeerSpec("192.0.2.3", routes=("10.1.0.0/24",), key=pc)])
    ea._clock = eb._clock = clock
    ea.device.inject(NO_OFFLOAD + ping(1))
    ea.on_device_readable()
    for _ in range(4):
        if not (carry(ea, eb, A) + carry(eb, ea, B)):
            break
    assert eb.device.written == [NO_OFFLOAD + ping(1)]  # 10.1.0.1: A's
    eb.device.written.clear()
    good = sealed_rows(clock, ea, 4)
    inject_super(ea, payload(MSS * 4))
    ea.on_device_readable()
    rows = [p for p, _ in ea.link.sent]
    ea.link.sent.clear()
    # the same flow from a source of C's (10.1.0.5), sealed by A: authenticated as A's, yet not A's to send
    bad = bytes(IP(src="10.1.0.5", dst="10.1.0.2") / (b"q" * (MSS + 32)))
    ea.device.inject(NO_OFFLOAD + bad)
    ea.on_device_readable()
    stray = ea.link.sent.pop()[0]
    assert len(stray) == len(rows[0])
    eb.link.deliver_gro(good[:2] + [stray] + good[2:], source=A)
    eb.on_link_readable()
    assert {k: v for k, v in eb.stats.drops.items() if v} == {Drop.SOURCE_NOT_ALLOWED: 1}
    assert payload_of_writes(eb.device.written)[0] == payload(MSS * 4)
    assert eb.peers.by_id[PA].stats.dropped == 1
