"""`wg set` on a running WireGuard data path, without root: the UAPI adapter (runtime/wgdevice.py) over engines on
fake ports and a fake clock, and the UDP link's endpoints with ports and its live rebind on loopback.

What must hold: a set goes through the peer table (routes = allowed IPs, endpoints with their own ports); a peer
without an endpoint is sent nothing; a refused set is one line with no key in it and changes nothing; a new
private key ends every session; a removed peer's keys are zeroed; the link moves to a new port or refuses."""

from __future__ import annotations

import errno
import logging
import socket

import pytest

from tunneld.control.wgapi import PrivateKey, UapiSession
from tunneld.datapath.engine import Engine
from tunneld.encap.wireguard import StaticKey, key_to_base64
from tunneld.encap.wireguard.codec import WireGuard
from tunneld.io import LinkError
from tunneld.io.udp import SOL_UDP, UDP_GRO, UdpLink
from tunneld.runtime.wgdevice import EngineWgDevice
from tunneld.testing import FakeClock, FakeDevice, FakeLink

A, B = "192.0.2.1", "192.0.2.2"
KA, KB, KC = (StaticKey(bytes(range(n, n + 32))) for n in (1, 33, 65))
T0 = 1_800_000_000.0
PING = bytes.fromhex("450000540000400040010000") + bytes([10, 9, 0, 1, 10, 0, 0, 7]) + bytes(64)  # 10.9.0.1 -> 10.0.0.7


def keyless(clock: FakeClock, us: str) -> tuple[Engine, EngineWgDevice]:
    """What `tunneld --mode wireguard` starts as: no key, no peers."""
    engine = Engine(FakeDevice(), FakeLink(us, 51820), WireGuard(), max_frame=1420, clock=clock, peers=())
    return engine, EngineWgDevice(engine.codec, engine, 51820, clock=clock)


def wg_set(device: EngineWgDevice, *lines: str) -> str:
    return UapiSession(device).receive(("set=1\n" + "".join(f"{line}\n" for line in lines) + "\n").encode()).decode()


def wg_get(device: EngineWgDevice) -> str:
    return UapiSession(device).receive(b"get=1\n\n").decode()


def carry(src: Engine, dst: Engine, source: str, port: int = 51820) -> None:
    for packet, _ in src.link.sent:
        dst.link.deliver(packet, source=source, port=port)
    n = len(src.link.sent)
    src.link.sent.clear()
    src.link.sent_to.clear()
    for _ in range(n + 1):
        dst.on_link_readable()


def test_a_keyless_start_takes_a_key_and_peers_through_the_peer_table():
    clock = FakeClock(T0)
    engine, device = keyless(clock, A)
    assert wg_get(device) == "listen_port=51820\nerrno=0\n\n" and engine.codec.describe() == "no private key yet"
    reply = wg_set(device, f"private_key={KA.private_bytes().hex()}",
                   f"public_key={KB.public.hex()}", "endpoint=192.0.2.2:4000", "allowed_ip=10.0.0.0/24",
                   f"public_key={KC.public.hex()}", "persistent_keepalive_interval=25", "allowed_ip=10.1.0.0/24")
    assert reply == "errno=0\n\n"
    b, c = engine.peers.get(key_to_base64(KB.public)), engine.peers.get(key_to_base64(KC.public))
    assert (b.endpoint, b.port) == (B, 4000) and engine.peers.routes_of(b) == ["10.0.0.0/24"]
    assert c.session.peer.endpoint is None and engine.peers.routes_of(c) == ["10.1.0.0/24"]
    got = wg_get(device)
    assert "endpoint=192.0.2.2:4000" in got and got.count("endpoint=") == 1  # the waiting peer has none yet
    clamped = PrivateKey(KA.private_bytes()).hex()  # as the kernel and wireguard-go store it
    assert f"private_key={clamped}" in got and "persistent_keepalive_interval=25" in got
    engine.run_timers()
    clock.now += 30
    engine.run_timers()
    assert engine.link.sent == []  # nowhere to send the waiting peer's keepalive: nothing leaves
    engine.device.inject(PING)
    engine.on_device_readable()
    assert [d[0] for d, _ in engine.link.sent] == [1] and engine.link.sent_to == ["192.0.2.2:4000"]  # an initiation
    assert engine.peers.routes_of(c) == ["10.1.0.0/24"]


@pytest.mark.parametrize("lines, words", [
    (("endpoint=127.0.0.1:4000",), "loopback"),
    (("endpoint=[2001:db8::2]:4000",), "IP version"),
    (("endpoint=192.0.2.2:0",), "port 0"),
])
def test_a_refused_set_is_one_line_without_keys_and_changes_nothing(caplog, lines, words):
    clock = FakeClock(T0)
    engine, device = keyless(clock, A)
    assert wg_set(device, f"private_key={KA.private_bytes().hex()}", f"public_key={KC.public.hex()}",
                  "endpoint=192.0.2.3:51820") == "errno=0\n\n"
    before = wg_get(device)
    with caplog.at_level(logging.WARNING, logger="tunneld"):
        reply = wg_set(device, "listen_port=4000", f"public_key={KB.public.hex()}", *lines, "allowed_ip=10.0.0.0/24")
    assert reply == f"errno=-{errno.EINVAL}\n\n"
    assert wg_get(device) == before and len(engine.peers) == 1
    (record,) = [r for r in caplog.records if "refused" in r.getMessage()]
    text = record.getMessage()
    assert words in text and "\n" not in text
    for key in (KA, KB, KC):
        assert key.public.hex() not in text and key_to_base64(key.public) not in text
        assert key_to_base64(key.private_bytes()) not in text


def test_a_new_private_key_ends_every_session_and_a_removed_peer_takes_its_keys():
    clock = FakeClock(T0)
    ea, da = keyless(clock, B)
    eb, db = keyless(clock, A)
    assert wg_set(da, f"private_key={KA.private_bytes().hex()}", f"public_key={KB.public.hex()}",
                  f"endpoint={B}:51820", "allowed_ip=0.0.0.0/0") == "errno=0\n\n"
    assert wg_set(db, f"private_key={KB.private_bytes().hex()}", f"public_key={KA.public.hex()}",
                  "allowed_ip=0.0.0.0/0") == "errno=0\n\n"  # B waits for A
    ea.device.inject(PING)
    ea.on_device_readable()
    for _ in range(3):
        carry(ea, eb, A)
        carry(eb, ea, B)
    a_peer = ea.peers.all[0].session.peer
    b_peer = eb.peers.all[0].session.peer
    assert a_peer.has_session and len(eb.device.written) == 1
    assert (eb.peers.all[0].endpoint, eb.peers.all[0].port) == (A, 51820)  # the waiting peer roamed to where A spoke from
    assert wg_set(da, f"private_key={KC.private_bytes().hex()}") == "errno=0\n\n"
    assert not a_peer.has_session and a_peer.current is None  # every session ended with the old key
    assert wg_set(db, f"public_key={KA.public.hex()}", "remove=true") == "errno=0\n\n"
    assert len(eb.peers) == 0 and KA.public not in eb.codec.wg.peers and not b_peer.has_session
    # our own public key as a peer: ignored, as wireguard-go does
    assert wg_set(da, f"public_key={KC.public.hex()}", "allowed_ip=10.5.0.0/24") == "errno=0\n\n"
    assert [p.id for p in ea.peers.all] == [key_to_base64(KB.public)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_wireguard_link_reports_sources_with_their_ports_and_moves_to_a_new_port():
    port = _free_port()
    link = UdpLink("127.0.0.2", port, "127.0.0.1", send_sockets=0)
    assert link.enable_gro()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        peer.bind(("127.0.0.3", 0))
        peer.settimeout(5)
        there = ("127.0.0.3", peer.getsockname()[1])
        buf = memoryview(bytearray(2048))

        def received() -> tuple[int, str, int]:
            import select

            assert select.select([link.fileno()], [], [], 5)[0]
            return link.recv_from(buf)

        peer.sendto(b"hello", ("127.0.0.1", port))
        assert received() == (5, *there)
        dest = link.destination(*there)
        assert dest == ("127.0.0.3", peer.getsockname()[1]) and link.destination("127.0.0.3") == ("127.0.0.3", port)
        moved = link.rebind(0)
        assert moved not in (0, port) and link.port == moved
        assert link._rx.getsockopt(SOL_UDP, UDP_GRO) == 1  # the engine's reads stay rows
        link.send(memoryview(b"x"), 0, dest)
        assert peer.recvfrom(16) == (b"x", ("127.0.0.1", moved))  # sent from the new port
        peer.sendto(b"again", ("127.0.0.1", moved))
        assert received() == (5, *there)
        blocker.bind(("127.0.0.1", 0))
        with pytest.raises(LinkError):
            link.rebind(blocker.getsockname()[1])
        assert link.port == moved  # refused: still where it was
    finally:
        link.close()
        peer.close()
        blocker.close()


def test_the_wg_quick_entry_point_refuses_bad_arguments_in_one_line(capsys):
    from tunneld.runtime.wgquick import main

    assert main([]) == 2 and main(["-f"]) == 2
    assert main(["bad/name"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "interface name" in err[-1] and "Traceback" not in "".join(err)


def test_without_a_key_a_bare_tunnel_answers_nothing_and_counts_it():
    from tunneld.encap.base import Drop
    from tunneld.encap.wireguard import Device

    clock = FakeClock(T0)
    engine, _ = keyless(clock, A)
    other = Device(KB)
    (initiation,) = other.add_peer(KA.public, endpoint=(A, 51820)).seal(PING, T0)
    assert initiation[0] == 1  # a handshake initiation, to us (by our future public key)
    engine.link.deliver(initiation, source=f"{B}:51820")
    engine.on_link_readable()
    assert engine.link.sent == [] and engine.stats.drops[Drop.BAD_MAC] == 1  # no key: no mac1 verifies


def test_a_roamed_peer_told_its_old_endpoint_again_goes_back_there():
    """`wg set PEER endpoint E` sends to E from then on, even when E is what the peer was configured with and it
    has roamed away since: the table judges the change against where the peer is now, not its old spec."""
    clock = FakeClock(T0)
    engine, device = keyless(clock, A)
    key = key_to_base64(KB.public)
    assert wg_set(device, f"private_key={KA.private_bytes().hex()}", f"public_key={KB.public.hex()}",
                  f"endpoint={B}:51820", "allowed_ip=10.0.0.0/24") == "errno=0\n\n"
    peer = engine.peers.get(key)
    assert engine.peers.move(peer, "198.51.100.7", 4000) and (peer.endpoint, peer.port) == ("198.51.100.7", 4000)
    assert wg_set(device, f"public_key={KB.public.hex()}", f"endpoint={B}:51820") == "errno=0\n\n"
    assert (peer.endpoint, peer.port) == (B, 51820) and peer.dest == engine.link.destination(B, 51820)


def test_with_a_registry_the_published_key_and_port_are_not_changed_under_it():
    """The registry's record names our public key and listen port: a `set` that would change either is refused
    whole (the other hosts would keep sending to the old ones); the same values, and peers, go through."""
    import errno

    clock = FakeClock(T0)
    engine = Engine(FakeDevice(), FakeLink(A, 51820), WireGuard(KA.private_bytes()), max_frame=1420, clock=clock,
                    peers=())
    device = EngineWgDevice(engine.codec, engine, 51820, clock=clock, published=True)
    refused = f"errno=-{errno.EPERM}\n\n"
    assert wg_set(device, f"private_key={KC.private_bytes().hex()}") == refused
    assert wg_set(device, "listen_port=4000") == refused
    assert engine.codec.wg.public_key == KA.public and device.port == 51820
    assert wg_set(device, f"private_key={KA.private_bytes().hex()}", "listen_port=51820",
                  f"public_key={KB.public.hex()}", f"endpoint={B}:51820", "allowed_ip=10.0.0.0/24") == "errno=0\n\n"
    assert engine.peers.get(key_to_base64(KB.public)) is not None
