"""``--mode wireguard`` behind the engine: two engines on a fake clock and fake ports, each with a WireGuard codec,
handshake, carry frames both ways, keep the drops counted by the core's reasons, and answer a cookie request
to a source that names no peer (the engine's ``Answer``)."""

from __future__ import annotations

from tests.wg_engines import A, ALL, B, KB, PA, PB, T0, carry, engines, exchange
from tunneld.datapath.peers import PeerSpec
from tunneld.encap.base import DeviceKind, Drop
from tunneld.encap.plugins import discover
from tunneld.encap.session import Answer
from tunneld.encap.wireguard.codec import HEADER_LEN, TAIL_LEN, WireGuard
from tunneld.testing import FakeClock, random_frames


def test_a_peer_is_answered_at_the_port_it_sent_from_and_a_forgery_from_another_port_moves_nothing():
    """WireGuard's endpoint is an address AND a port: a client whose listen port is not ours (wg-quick picks a
    random one) must get its handshake response, and every packet after, at the port it sent from."""
    clock = FakeClock(T0)
    ea, eb = engines(clock)
    eb.device.inject(random_frames(DeviceKind.TUN, 100, seed=3)[0])
    eb.on_device_readable()  # B initiates from its own port 40000
    for packet, _ in eb.link.sent:
        ea.link.deliver(packet, source=B, port=40000)
    eb.link.sent.clear()
    ea.on_link_readable()
    (peer,) = ea.peers.all
    assert ea.link.sent_to == [f"{B}:40000"] and peer.port == 40000  # the response went to B's port
    assert ea.stats.endpoint_changes == 1
    forged = bytearray(ea.link.sent[0][0])
    forged[-1] ^= 1  # a bit-flipped response, replayed at A from another port: no move, counted
    ea.link.deliver(bytes(forged), source=B, port=40001)
    ea.on_link_readable()
    assert peer.port == 40000 and ea.stats.endpoint_changes == 1 and sum(ea.stats.drops.values()) == 1


def test_registered_with_the_declared_shape():
    assert discover()[0]["wireguard"] is WireGuard
    codec = WireGuard.from_options({})
    assert codec.keyed and codec.stateful and not codec.spreads and codec.device is DeviceKind.TUN
    assert codec.transport.number == 51820 and HEADER_LEN == 16 and TAIL_LEN == 31
    assert codec.describe() == "no private key yet"


def test_a_handshake_then_frames_both_ways_whoever_starts():
    for first in (0, 1):
        clock = FakeClock(T0)
        ends = engines(clock, psk=bytes(32))
        src, dst = ends[first], ends[1 - first]
        frames = random_frames(DeviceKind.TUN, 1200, seed=5)[:6]
        src.device.inject(frames[0])
        src.on_device_readable()  # no session yet: the frame is held and an initiation leaves
        assert len(src.link.sent) == 1 and src.link.sent[0][0][0] == 1
        exchange(*ends)
        assert dst.device.written == [frames[0]]
        for f in frames[1:]:
            src.device.inject(f)
            src.on_device_readable()
            dst.device.inject(f)
            dst.on_device_readable()
        exchange(*ends)
        assert dst.device.written == frames and src.device.written == frames[1:]
        for e in ends:
            assert not e.stats.drops, dict(e.stats.drops)
            assert e.peers.all[0].session.peer.has_session


def test_forged_replayed_and_unknown_datagrams_are_counted_by_the_cores_reason():
    clock = FakeClock(T0)
    ea, eb = engines(clock)
    frame = random_frames(DeviceKind.TUN, 200, seed=1)[0]
    ea.device.inject(frame)
    ea.on_device_readable()
    exchange(ea, eb)
    ea.device.inject(frame)
    ea.on_device_readable()
    datagram = ea.link.sent[0][0]
    carry(ea, eb, A)
    eb.link.deliver(datagram, source=A)  # the same again
    forged = bytearray(datagram)
    forged[-1] ^= 1
    eb.link.deliver(bytes(forged), source=A)
    eb.link.deliver(b"\x09\0\0\0" + bytes(40), source=A)
    eb.link.deliver(b"\x01\0\0\0" + bytes(144), source="198.51.100.9")  # an initiation with no valid mac1
    for _ in range(5):
        eb.on_link_readable()
    drops = {k: v for k, v in eb.stats.drops.items() if v}
    assert drops == {Drop.REPLAYED: 1, Drop.DECRYPTION_FAILED: 1, Drop.BAD_TYPE: 1, Drop.BAD_MAC: 1}
    assert eb.device.written == [frame, frame]
    assert eb.peers.all[0].endpoint == A  # nothing unauthenticated moved it


def test_under_load_an_initiation_without_mac2_gets_only_a_cookie_reply_to_its_source():
    clock = FakeClock(T0)
    ea, eb = engines(clock)
    eb.codec.wg.force_under_load = True
    ea.device.inject(random_frames(DeviceKind.TUN, 100, seed=2)[0])
    ea.on_device_readable()
    initiation = ea.link.sent[0][0]
    answer = eb.codec.identify(memoryview(initiation), "198.51.100.7", T0)
    assert isinstance(answer, Answer) and answer.drop is Drop.COOKIE_REQUIRED
    assert len(answer.packets) == 1 and answer.packets[0][0] == 3  # a cookie reply
    carry(ea, eb, "198.51.100.7")  # through the engine: the reply goes back to where the datagram came from
    assert eb.stats.drops[Drop.COOKIE_REQUIRED] == 1 and eb.link.sent_to == ["198.51.100.7"]
    assert eb.link.sent[0][0][0] == 3 and eb.peers.all[0].endpoint == A


def test_keys_are_given_as_files_never_as_text_and_never_shown():
    import pytest
    for options in ({"private_key": "/etc/key"}, {"private_key": PA}, {"wg_peers": "x"},
                    {"wg_peers": {"not base64": (None, 0)}}, {"wg_peers": {PB: (None, -1)}}):
        with pytest.raises(ValueError) as e:
            WireGuard.from_options(options)
        assert PA not in str(e.value) and "\n" not in str(e.value)
    codec = WireGuard.from_options({"private_key": bytes(range(1, 33))})
    assert codec.describe() == f"public key {PA}"


def test_wg_show_reads_the_codec_and_the_engine_through_the_uapi_adapter():
    import errno

    from tunneld.control.wgapi import Key, UapiSession
    from tunneld.runtime.wgdevice import EngineWgDevice

    clock = FakeClock(T0)
    ea, eb = engines(clock, psk=bytes(range(100, 132)), keepalive=25)
    ea.device.inject(random_frames(DeviceKind.TUN, 300, seed=4)[0])
    ea.on_device_readable()
    exchange(ea, eb)
    device = EngineWgDevice(ea.codec, ea, 51820)
    (peer,) = device.config.peers.values()
    assert peer.public_key == Key(KB.public) and peer.persistent_keepalive == 25 and peer.preshared_key is not None
    assert [str(n) for n in peer.allowed_ips] == list(ALL)
    stats = device.peer_stats(Key(KB.public))
    assert stats.last_handshake_ns == int(T0 * 1e9) and stats.tx_bytes > 300 and stats.rx_bytes > 0
    assert str(stats.endpoint) == f"{B}:51820"
    reply = UapiSession(device).receive(b"get=1\n\n").decode()
    assert f"public_key={KB.public.hex()}" in reply and reply.endswith("errno=0\n\n")
    assert "last_handshake_time_sec=1800000000" in reply and "allowed_ip=0.0.0.0/0" in reply
    refused = UapiSession(device).receive(b"set=1\nlisten_port=4000\n\n").decode()  # a fake link cannot move
    assert refused == f"errno=-{errno.EOPNOTSUPP}\n\n" and device.config.listen_port == 51820


def test_a_link_for_a_keyed_codec_sends_from_its_listening_port():
    """A WireGuard peer answers the source address and port it saw: the link must send from the one it listens on."""
    import socket

    from tunneld.io.udp import UdpLink

    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.2", port))  # the peer, on the same port (loopback's other address)
    sink.settimeout(5)
    link = UdpLink("127.0.0.2", port, "127.0.0.1", send_sockets=0)
    try:
        for flow in range(4):
            link.send(memoryview(b"x"), flow, link.destination("127.0.0.2"))
            assert sink.recvfrom(16) == (b"x", ("127.0.0.1", port))
        assert not link.spreads_flows
    finally:
        link.close()
        sink.close()


def test_a_removed_peer_takes_its_keys_and_a_re_added_one_starts_afresh():
    clock = FakeClock(T0)
    ea, eb = engines(clock)
    ea.device.inject(random_frames(DeviceKind.TUN, 300, seed=6)[0])
    ea.on_device_readable()
    exchange(ea, eb)
    old = ea.peers.all[0].session.peer
    assert old.has_session and KB.public in ea.codec.wg.peers
    ea.peers.remove(PB)
    assert KB.public not in ea.codec.wg.peers and not old.has_session
    ea.peers.upsert(PeerSpec(B, routes=ALL, key=PB))
    new = ea.peers.all[0].session.peer
    assert new is not old and not new.has_session and ea.codec.wg.peers[KB.public] is new


def test_mangled_datagrams_never_raise_and_are_each_counted():
    import random

    clock = FakeClock(T0)
    ea, eb = engines(clock)
    frames = random_frames(DeviceKind.TUN, 400, seed=8)[:4]
    valid = []
    for f in frames:  # an initiation, then transport datagrams once the session is up
        ea.device.inject(f)
        ea.on_device_readable()
        valid += [p for p, _ in ea.link.sent]
        exchange(ea, eb)
    rng = random.Random(21)
    before = sum(eb.stats.drops.values())
    for _ in range(300):
        d = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(len(d))] = rng.randrange(256)
        if rng.random() < 0.3:
            d = d[: rng.randrange(len(d))]
        eb.link.deliver(bytes(d), source=rng.choice([A, "198.51.100.3"]))
        eb.on_link_readable()
    dropped = sum(eb.stats.drops.values()) - before
    assert 250 <= dropped <= 300 and eb.peers.all[0].endpoint == A
    assert len(eb.device.written) == len(frames)  # a mangled datagram never reaches the device


def test_one_at_a_time_too_a_handshake_weighs_more_than_its_bytes_against_the_wake_up_budget():
    """Without offloads (the one-datagram path) a handshake the core worked on weighs HANDSHAKE_COST, as on the
    rows path: a wake-up of valid-looking initiations yields to the loop after a few X25519s, not 32."""
    from tunneld.datapath.engine import WAKEUP_BYTES
    from tunneld.encap.wireguard.codec import HANDSHAKE_COST

    clock = FakeClock(T0)
    ea, eb = engines(clock)
    ea.device.inject(random_frames(DeviceKind.TUN, 100, seed=5)[0])
    ea.on_device_readable()
    (initiation, _), = ea.link.sent
    for _ in range(12):
        eb.link.deliver(initiation, source=A)
    eb.on_link_readable()
    per_wakeup = WAKEUP_BYTES // HANDSHAKE_COST
    assert 1 < per_wakeup < eb.batch and len(eb.link.pending) == 12 - per_wakeup  # the rest wait, not lost
    eb.on_link_readable()
    assert len(eb.link.pending) == 12 - 2 * per_wakeup and eb.stats.drops[Drop.REPLAYED] == 2 * per_wakeup - 1


def test_a_cookie_is_bound_to_the_address_and_port_it_was_given_to():
    """Under load, mac2 proves the initiator received our cookie at its address AND port (the whitepaper's
    binding): the engine hands the codec the datagram's port, so a retry from another port earns only a new
    cookie reply, and the retry from the port the cookie went to is taken."""
    from tunneld.encap.wireguard.constants import REKEY_TIMEOUT

    clock = FakeClock(T0)
    ea, eb = engines(clock)
    eb.codec.wg.force_under_load = True
    ea.device.inject(random_frames(DeviceKind.TUN, 100, seed=2)[0])
    ea.on_device_readable()
    for packet, _ in ea.link.sent:
        eb.link.deliver(packet, source=A, port=40000)
    ea.link.sent.clear()
    eb.on_link_readable()  # a cookie reply, to A:40000
    assert eb.link.sent_to == [f"{A}:40000"] and eb.stats.drops[Drop.COOKIE_REQUIRED] == 1
    carry(eb, ea, B)  # A takes the cookie
    clock.advance(REKEY_TIMEOUT + 1)
    ea.run_timers()  # A retries, now with mac2
    (retry, _), = ea.link.sent
    elsewhere = eb.codec.identify(memoryview(retry), A, clock.now, 40001)
    assert isinstance(elsewhere, Answer) and elsewhere.drop is Drop.COOKIE_REQUIRED
    assert eb.codec.identify(memoryview(retry), A, clock.now, 40000) == PA  # the port the cookie went to
