"""Two engines over fakes, each with a WireGuard codec, each the other's one peer: A at 192.0.2.1 and B at
192.0.2.2 on a fake clock, their fake links on WireGuard's port, and the helpers that carry what one sent to the
other. Shared by the unit tests of ``--mode wireguard`` behind the engine (test_wg_codec, test_wg_obs,
test_wg_mtu)."""

from __future__ import annotations

from tunneld.datapath.engine import Engine
from tunneld.datapath.peers import PeerSpec
from tunneld.encap.wireguard import StaticKey, key_to_base64
from tunneld.encap.wireguard.codec import PORT, WireGuard
from tunneld.testing import FakeClock, FakeDevice, FakeLink

A, B = "192.0.2.1", "192.0.2.2"
T0 = 1_800_000_000.0
PRIVATE_A, PRIVATE_B = bytes(range(1, 33)), bytes(range(33, 65))
KA, KB = StaticKey(PRIVATE_A), StaticKey(PRIVATE_B)
PA, PB = key_to_base64(KA.public), key_to_base64(KB.public)
ALL = ("0.0.0.0/0", "::/0")


def engines(clock: FakeClock, *, psk: bytes | None = None, keepalive: int = 0, routes_a=ALL,
            max_frame: int = 1420) -> tuple[Engine, Engine]:
    """A and B, each the other's peer (``psk`` on both; A keeps ``keepalive``; B accepts from A what comes from
    ``routes_a``), each engine giving its session ``max_frame``."""
    a = WireGuard.from_options({"private_key": PRIVATE_A, "wg_peers": {PB: (psk, keepalive)}})
    b = WireGuard.from_options({"private_key": PRIVATE_B, "wg_peers": {PA: (psk, 0)}})
    ea = Engine(FakeDevice(), FakeLink(B, PORT), a, max_frame=max_frame, clock=clock,
                peers=[PeerSpec(B, routes=ALL, key=PB)])
    eb = Engine(FakeDevice(), FakeLink(A, PORT), b, max_frame=max_frame, clock=clock,
                peers=[PeerSpec(A, routes=routes_a, key=PA)])
    return ea, eb


def carry(src: Engine, dst: Engine, source: str) -> int:
    """What ``src`` sent, delivered to ``dst`` as from ``source`` and read; how many datagrams."""
    n = len(src.link.sent)
    for packet, _ in src.link.sent:
        dst.link.deliver(packet, source=source)
    src.link.sent.clear()
    for _ in range(n + 1):
        dst.on_link_readable()
    return n


def exchange(ea: Engine, eb: Engine, rounds: int = 4) -> None:
    """Carry both ways until nothing moves, ``rounds`` times at the most."""
    for _ in range(rounds):
        if not (carry(ea, eb, A) + carry(eb, ea, B)):
            break
