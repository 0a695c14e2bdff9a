"""Attacks on a WireGuard device, as a table: each row is a way to make datagrams (random, truncated, bit-flipped
real ones, replays, an unknown key, a spoofed source) and the drop reasons it may end in. For every datagram:
no exception, a Drop (the only answer ever is a cookie reply under load), nothing delivered, the peer's endpoint
unmoved, and the session still working afterwards."""

from __future__ import annotations

import random
import struct
from collections import Counter

import pytest

from tunneld.encap.wireguard import Deliver, Device, Drop, Reason, Reply, StaticKey
from tunneld.encap.wireguard.constants import COOKIE_SECRET_MAX_AGE
from tunneld.encap.wireguard.messages import MESSAGE_INITIATION_SIZE, MESSAGE_INITIATION_TYPE, MESSAGE_RESPONSE_SIZE
from tests.wg_link import A_ADDR, WALL, Link, ping

SPOOFED = ("10.66.6.6", 6666)


def captured() -> tuple[Link, dict[str, list[bytes]]]:
    """A live pair, and real datagrams of every kind A and B exchanged (already consumed)."""
    link = Link(b_knows_a=True)
    link.b.device.force_under_load = True  # so that B sends a cookie reply too
    link.send(link.a, ping(1))
    link.b.device.force_under_load = False
    link.advance(6)  # A's retry, with mac2, completes the handshake
    for i in range(5):
        link.send(link.a, ping(10 + i, size=40 + 37 * i))
        link.send(link.b, ping(20 + i))
    link.advance(11)  # a passive keepalive
    sent = link.a.sent + link.b.sent
    kinds = {
        "initiation": [d for d in sent if d[0] == 1],
        "response": [d for d in sent if d[0] == 2],
        "cookie": [d for d in sent if d[0] == 3],
        "transport": [d for d in sent if d[0] == 4 and len(d) > 32],
        "keepalive": [d for d in sent if d[0] == 4 and len(d) == 32],
    }
    assert all(kinds.values()), {k: len(v) for k, v in kinds.items()}
    return link, kinds


def random_datagrams(rng: random.Random, n: int):
    for i in range(n):
        length = rng.choice([0, 1, 3, 4, 16, 31, 32, 33, 64, 92, 148, rng.randrange(0, 1500)])
        data = bytearray(rng.randbytes(length))
        if length >= 4 and i % 2:  # half of them with a valid type word, to get past the first check
            data[:4] = struct.pack("<I", rng.randrange(1, 5))
        yield bytes(data)


def truncations(kinds):
    for datagrams in kinds.values():
        for d in datagrams[:2]:
            for cut in range(len(d)):
                yield d[:cut]


def bit_flips(kinds):
    for datagrams in kinds.values():
        d = datagrams[-1]
        for bit in range(len(d) * 8):
            flipped = bytearray(d)
            flipped[bit // 8] ^= 1 << (bit % 8)
            yield bytes(flipped)


def replays(kinds):
    for datagrams in kinds.values():
        yield from datagrams


ROWS = {
    "random": (lambda link, kinds: random_datagrams(random.Random(7), 20000),
               {Reason.TRUNCATED, Reason.BAD_TYPE, Reason.BAD_MAC, Reason.NO_SESSION, Reason.LENGTH_MISMATCH}),
    "truncated": (lambda link, kinds: truncations(kinds),
                  {Reason.TRUNCATED, Reason.BAD_TYPE, Reason.DECRYPTION_FAILED, Reason.NO_SESSION}),
    "bit-flipped": (lambda link, kinds: bit_flips(kinds),
                    {Reason.BAD_TYPE, Reason.BAD_MAC, Reason.NO_SESSION, Reason.DECRYPTION_FAILED,
                     Reason.REPLAYED, Reason.COOKIE_REQUIRED, Reason.RATE_LIMITED,
                     Reason.TRUNCATED, Reason.LENGTH_MISMATCH}),  # a flipped type bit names another message
    "replayed": (lambda link, kinds: replays(kinds),
                 {Reason.REPLAYED, Reason.NO_SESSION, Reason.DECRYPTION_FAILED, Reason.BAD_MAC}),
}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_attack_row_ends_in_named_drops(row):
    make, allowed = ROWS[row]
    link, kinds = captured()
    before_a, before_b = len(link.a.delivered), len(link.b.delivered)
    counts: Counter = Counter()
    for datagram in make(link, kinds):
        for side in (link.a, link.b):
            peer = link.pa if side is link.a else link.pb
            endpoint = peer.endpoint
            result = side.device.open(datagram, SPOOFED, link.now)
            assert not isinstance(result, Deliver) and peer.endpoint == endpoint
            if isinstance(result, Reply):
                # A flood of handshake messages whose mac1 is right (replays, mac2 flips) puts the device under
                # load: then its only answer is a cookie reply, smaller than what asked for it (no amplification)
                assert result.dropped is Reason.COOKIE_REQUIRED and result.peer is None, (row, result)
                [cookie] = result.datagrams
                assert cookie[0] == 3 and len(cookie) < len(datagram)
                counts[result.dropped] += 1
                continue
            assert isinstance(result, Drop), (row, datagram.hex(), result)
            counts[result.reason] += 1
    assert set(counts) <= allowed, counts
    assert sum(counts.values()) > 0
    assert len(link.a.delivered) == before_a and len(link.b.delivered) == before_b
    # and the real session still works both ways
    link.send(link.a, ping(99))
    link.send(link.b, ping(98))
    assert link.b.delivered[-1] == ping(99) and link.a.delivered[-1] == ping(98)


def test_each_byte_of_a_transport_message_has_its_reason():
    link, kinds = captured()
    d = kinds["transport"][-1]
    receiver = link.a.device if any(d == x for x in link.b.sent) else link.b.device
    for offset in range(len(d)):
        flipped = bytearray(d)
        flipped[offset] ^= 0x80
        reason = receiver.open(bytes(flipped), SPOOFED, link.now).reason
        expected = (Reason.BAD_TYPE if offset < 4 else Reason.NO_SESSION if offset < 8
                    else Reason.DECRYPTION_FAILED)
        assert reason is expected, (offset, reason)


def test_each_byte_of_an_initiation_has_its_reason():
    link, kinds = captured()
    d = kinds["initiation"][-1]
    for offset in range(len(d)):
        flipped = bytearray(d)
        flipped[offset] ^= 0x01
        reason = link.b.device.open(bytes(flipped), SPOOFED, link.now).reason
        # mac1 covers everything before it; mac2 is not checked when not under load, so what is left is a
        # replay of a consumed initiation
        expected = (Reason.BAD_TYPE if offset < 4 else Reason.BAD_MAC if offset < 132 else Reason.REPLAYED)
        assert reason is expected, (offset, reason)


def test_exact_lengths_are_required_for_handshake_messages():
    link, kinds = captured()
    for name, size in (("initiation", MESSAGE_INITIATION_SIZE), ("response", MESSAGE_RESPONSE_SIZE)):
        d = kinds[name][-1]
        assert link.b.device.open(d + b"\x00", SPOOFED, link.now) == Drop(Reason.LENGTH_MISMATCH)
        assert link.b.device.open(d[:size - 1], SPOOFED, link.now) == Drop(Reason.TRUNCATED)


def test_an_unknown_key_gets_no_answer_at_all():
    link, kinds = captured()
    stranger = Device(StaticKey.generate(), wall_offset=WALL)
    for side in (link.a, link.b):
        peer = stranger.add_peer(side.device.public_key, endpoint=side.address)
        for i in range(50):
            peer.last_sent_handshake = None
            [initiation] = peer._send_handshake_initiation(link.now + i, retry=False)
            assert side.device.open(initiation, SPOOFED, link.now + i) == Drop(Reason.UNKNOWN_PEER)
        # its transport messages name no index of ours
        assert side.device.open(struct.pack("<IIQ", 4, 12345, 0) + bytes(32), SPOOFED, link.now).reason in (
            Reason.NO_SESSION, Reason.DECRYPTION_FAILED)


def test_a_device_without_a_key_answers_nothing():
    link, kinds = captured()
    keyless = Device(None, wall_offset=WALL)
    for datagrams in kinds.values():
        for d in datagrams:
            result = keyless.open(d, SPOOFED, link.now)
            assert isinstance(result, Drop) and result.reason in (Reason.BAD_MAC, Reason.NO_SESSION)


def test_a_peer_whose_inner_packet_is_not_ip_is_dropped_after_authentication():
    link = Link()
    link.send(link.a, ping(1))
    link.send(link.a, b"\x00" * 40)  # version 0
    link.send(link.a, ping(2)[:30])  # IPv4 total length 84, but only 30 bytes (padded to 32) carried
    assert link.b.drops == [Reason.BAD_PROTOCOL, Reason.LENGTH_MISMATCH]
    assert link.b.delivered == [ping(1)]


def test_any_source_shape_is_taken_without_a_raise():
    link, kinds = captured()
    b = link.b.device
    b.force_under_load = True  # the cookie is bound to the source: the path that reads it
    for source in (("fd00::1", 5), ("fe80::1%veth0", 5, 0, 2), ("not-an-address", 70000), ("10.1.2.3", 0)):
        result = b.open(kinds["initiation"][-1], source, link.now)
        assert isinstance(result, Reply) and result.dropped is Reason.COOKIE_REQUIRED


def test_a_cookie_is_good_from_its_own_source_only_and_until_the_secret_rotates():
    """mac2 binds an initiation to the address its cookie was made for. The checker keeps the cookie it made last
    (a flood from one source asks for the same one twice per datagram): that must never serve another source, nor
    outlive the secret it was made with."""
    link = Link()
    b = link.b.device
    checker = b.cookie_checker
    b.force_under_load = True
    link.send(link.a, ping(1))  # A learns a cookie for its address
    now = link.now + 1
    link.pa.last_sent_handshake = None
    [retry] = link.pa._send_handshake_initiation(now, retry=False)
    other = ("10.9.0.99", A_ADDR[1])
    for source, good in ((A_ADDR, True), (other, False), (A_ADDR, True), (other, False)):
        assert checker.check_mac2(retry, MESSAGE_INITIATION_TYPE, source, now) is good, source
    result = b.open(retry, other, now)
    assert isinstance(result, Reply) and result.dropped is Reason.COOKIE_REQUIRED  # a new cookie, for `other`
    assert checker.check_mac2(retry, MESSAGE_INITIATION_TYPE, A_ADDR, now)  # A's cookie is the one kept now
    # past COOKIE_SECRET_MAX_AGE the next cookie reply makes a new secret: the cookie A holds is worth nothing
    later = now + COOKIE_SECRET_MAX_AGE + 1
    assert not checker.check_mac2(retry, MESSAGE_INITIATION_TYPE, A_ADDR, later)
    assert checker.create_reply(retry, MESSAGE_INITIATION_TYPE, 1, A_ADDR, later)[0] == 3
    assert not checker.check_mac2(retry, MESSAGE_INITIATION_TYPE, A_ADDR, later)
