"""WireGuard sessions on a fake clock: the replay window at its edges, the timers through hours of simulated time,
the message limits, and cookies under load. Two sans-IO devices talk over tests.wg_link's in-memory link."""

from __future__ import annotations

import random

import pytest

from tunneld.encap.wireguard import Drop, Reason, Reply
from tunneld.encap.wireguard.constants import (
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    REJECT_AFTER_MESSAGES,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
)
from tunneld.encap.wireguard.replay import WINDOW_SIZE, ReplayWindow
from tests.wg_link import A_ADDR, Link, ping, types

# -- the replay window -------------------------------------------------------------------------------------------


def test_the_window_is_wireguard_gos_8128():
    assert WINDOW_SIZE == 8128


def test_replay_window_edges():
    w = ReplayWindow()
    assert w.accept(0) and not w.accept(0)  # the first counter, once
    assert w.accept(WINDOW_SIZE)  # slides: 0 is now exactly WINDOW_SIZE behind
    assert not w.accept(0)  # ... and was seen
    assert w.accept(1) and not w.accept(1)  # inside, never seen
    assert w.accept(WINDOW_SIZE + 2)  # 1 is now WINDOW_SIZE + 1 behind: outside
    assert not w.accept(1)
    assert w.accept(2)  # exactly at the edge
    assert not w.accept(WINDOW_SIZE + 2)
    assert w.accept(WINDOW_SIZE + 1)  # skipped over, accepted late, once
    assert not w.accept(WINDOW_SIZE + 1)
    assert w.accept(1 << 60)  # a jump far past the window forgets everything behind it
    assert not w.accept((1 << 60) - WINDOW_SIZE - 1)
    assert w.accept((1 << 60) - WINDOW_SIZE)
    assert not w.accept(REJECT_AFTER_MESSAGES) and not w.accept(2**64 - 1)  # the message limit
    assert w.accept(REJECT_AFTER_MESSAGES - 1) and not w.accept(REJECT_AFTER_MESSAGES - 1)


def test_replay_window_against_a_set_model():
    """wireguard-go's answer, written as sets: accepted iff below the limit, not seen, and not more than
    WINDOW_SIZE below the greatest accepted."""
    rng = random.Random(5)
    for trial in range(20):
        w, seen, last = ReplayWindow(), set(), 0
        base = 0
        for _ in range(3000):
            r = rng.random()
            if r < 0.5:
                counter = base + rng.randrange(0, 40)
                base += rng.randrange(0, 30)
            elif r < 0.8:
                counter = max(0, last - rng.randrange(0, WINDOW_SIZE + 50))
            elif r < 0.95:
                counter = max(0, last - WINDOW_SIZE + rng.randrange(-3, 4))
            else:
                counter = last + rng.randrange(WINDOW_SIZE - 3, 2 * WINDOW_SIZE)
                base = counter
            expected = counter not in seen and (counter > last or last - counter <= WINDOW_SIZE)
            assert w.accept(counter) == expected, (trial, counter, last)
            if expected:
                seen.add(counter)
                last = max(last, counter)


# -- handshakes and timers on the fake clock ----------------------------------------------------------------------


def test_a_handshake_and_traffic_both_ways():
    link = Link()
    link.send(link.a, ping(1))
    assert types(link.a.sent) == [1, 4] and types(link.b.sent) == [2]
    assert link.b.delivered == [ping(1)]
    link.send(link.b, ping(2))
    assert link.a.delivered == [ping(2)]
    assert link.pa.last_handshake_wall == link.pb.last_handshake_wall == link.a.device.wall(link.now)


def test_the_responder_sends_no_data_until_the_initiator_confirms():
    link = Link(b_knows_a=True)
    [initiation] = link.pa._send_handshake_initiation(link.now, retry=False)
    reply = link.b.device.open(initiation, A_ADDR, link.now)
    assert isinstance(reply, Reply)  # B has a session, as ``next`` only
    out = link.pb.seal(ping(9), link.now)
    assert 4 not in types(out)  # nothing sealed: staged (and B may try its own handshake)
    assert link.pb.staged and not link.pb.has_session
    link.a.device.open(reply.datagrams[0], link.b.address, link.now)  # A: session; its keepalive is not sent yet
    [keepalive] = link.pa.keepalive(link.now)
    link.carry(link.a, [keepalive])
    assert link.pb.has_session and ping(9) in link.a.delivered  # confirmed: the staged packet left


def test_passive_keepalive_after_ten_seconds_of_one_way_data():
    link = Link()
    link.send(link.a, ping(1))
    start = link.now
    link.b.sent.clear()
    link.advance(KEEPALIVE_TIMEOUT - 0.5)
    assert link.b.sent == []
    link.advance(1.0)
    assert [len(d) for d in link.b.sent] == [32]  # one keepalive: type 4, header, empty payload, tag
    assert link.now - start >= KEEPALIVE_TIMEOUT


def test_no_keepalive_when_data_flows_back():
    link = Link()
    link.send(link.a, ping(1))
    link.advance(3)
    link.send(link.b, ping(2))
    link.b.sent.clear()
    link.advance(30)
    assert all(len(d) != 32 for d in link.b.sent)


def test_an_unanswered_initiation_is_retried_with_jitter_then_abandoned_and_keys_zeroed():
    link = Link()
    link.lose["a"] = True  # nothing of A's arrives
    link.send(link.a, ping(1))
    times = []
    start = link.now
    for _ in range(4000):
        before = len(link.a.sent)
        link.advance(0.05, step=0.05)
        if len(link.a.sent) > before:
            times.append(link.now)
        if link.now - start > 200:
            break
    gaps = [b - a for a, b in zip([start] + times, times)]
    # the first initiation (at start) plus MAX_TIMER_HANDSHAKES + 1 retries, each REKEY_TIMEOUT + jitter apart
    assert len(times) == MAX_TIMER_HANDSHAKES + 1
    assert all(REKEY_TIMEOUT - 0.06 <= g <= REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX + 0.06 for g in gaps), gaps
    assert len({round(g, 2) for g in gaps}) > 3  # jitter: not one fixed period
    assert not link.pa.staged  # given up: what waited is dropped
    link.advance(600, step=10)
    assert len(link.a.sent) == MAX_TIMER_HANDSHAKES + 2 and link.pa.handshake.local_index == 0
    assert link.a.device._indices == {}


def test_keys_are_zeroed_after_540_s_of_silence():
    link = Link()
    link.send(link.a, ping(1))
    link.send(link.b, ping(2))
    assert link.pa.has_session and link.pb.has_session
    link.advance(539, step=10)
    assert link.pa.current is not None and link.pa.current.send is not None
    link.advance(2, step=0.5)
    assert link.pa.current is None and link.pb.current is None and link.pa.previous is None
    assert link.a.device._indices == {} and link.b.device._indices == {}
    link.send(link.a, ping(3))  # and traffic starts a new handshake
    assert link.b.delivered[-1] == ping(3)


def test_persistent_keepalive_keeps_the_session_alive_for_an_hour():
    link = Link(keepalive_a=25)
    link.send(link.a, ping(1))
    link.a.sent.clear()
    link.advance(3600, step=5)
    keepalives = [d for d in link.a.sent if d[0] == 4 and len(d) == 32]
    handshakes = types(link.a.sent).count(1)
    assert link.pa.has_session and link.pb.has_session  # rekeyed as it went (REKEY_AFTER_TIME on sending)
    assert 3600 / REKEY_AFTER_TIME - 3 <= handshakes <= 3600 / REKEY_AFTER_TIME + 3
    # one every 25 s, plus the keepalive that confirms each new session
    assert 3600 / 25 - 5 <= len(keepalives) - handshakes <= 3600 / 25 + 5
    assert Reason.EXPIRED_KEYS not in link.b.drops


def test_three_hours_of_traffic_rekey_without_loss_or_expiry():
    """One packet each way every 0.7 s (A) and 1.3 s (B), with a silent hour in the middle: every packet
    arrives, sessions are replaced before REJECT_AFTER_TIME, no key is used past it."""
    link = Link()
    sent_a = sent_b = 0
    for i in range(int(3600 / 0.7)):
        link.send(link.a, ping(i))
        sent_a += 1
        if i % 2 == 0:
            link.send(link.b, ping(100000 + i))
            sent_b += 1
        link.advance(0.7, step=0.7)
        assert link.pa.current is None or link.now - link.pa.current.created < 180
    link.advance(3600, step=30)  # silence: keys go at 540 s
    assert link.pa.current is None
    for i in range(int(3600 / 1.3)):
        link.send(link.b, ping(200000 + i))
        sent_b += 1
        link.advance(1.3, step=1.3)
    assert len(link.b.delivered) == sent_a
    # B's first packet after the silence waits for the handshake B starts (staged, then released)
    assert len(link.a.delivered) == sent_b
    assert not any(r in link.a.drops + link.b.drops for r in (Reason.EXPIRED_KEYS, Reason.REPLAYED,
                                                              Reason.DECRYPTION_FAILED))
    assert types(link.a.sent).count(1) >= 3600 / REKEY_AFTER_TIME - 2


def test_a_session_past_reject_after_time_is_refused():
    link = Link()
    link.send(link.a, ping(1))
    [late] = link.pa.seal(ping(2), link.now)
    link.advance(181, step=10)
    assert link.b.device.open(late, A_ADDR, link.now) == Drop(Reason.EXPIRED_KEYS)
    assert link.b.delivered == [ping(1)]


def test_rekey_after_messages_starts_a_handshake_and_reject_after_messages_stops_sending():
    link = Link()
    link.send(link.a, ping(1))
    link.advance(REKEY_TIMEOUT + 1)
    link.pa.current.send_counter = REKEY_AFTER_MESSAGES + 1
    out = link.pa.seal(ping(2), link.now)
    assert types(out) == [4, 1]  # sent, and a new handshake begun
    link.carry(link.a, out)
    assert link.b.delivered[-1] == ping(2)
    link.advance(REKEY_TIMEOUT + 1)
    old = link.pa.current
    old.send_counter = REJECT_AFTER_MESSAGES - 1
    out = link.pa.seal(ping(3), link.now)
    assert types(out) == [4, 1]  # past REKEY_AFTER_MESSAGES too: a handshake (lost here, so the limit is reached)
    last = out[0]
    assert int.from_bytes(last[8:16], "little") == REJECT_AFTER_MESSAGES - 1
    link.carry(link.a, [last])
    assert link.b.delivered[-1] == ping(3)  # the last counter allowed is still accepted
    assert link.pa.seal(ping(4), link.now) == [] and link.pa.staged  # no counter past the limit: staged
    link.advance(REKEY_TIMEOUT + 1)  # the handshake's retry gets through and releases it
    assert link.b.delivered[-1] == ping(4) and link.pa.current is not old


def test_roaming_follows_authenticated_packets_only():
    link = Link()
    link.send(link.a, ping(1))
    [datagram] = link.pa.seal(ping(2), link.now)
    forged = bytearray(datagram)
    forged[-1] ^= 1
    assert link.b.device.open(bytes(forged), ("10.66.0.1", 9), link.now) == Drop(Reason.DECRYPTION_FAILED)
    assert link.pb.endpoint == A_ADDR
    link.carry(link.a, [datagram], source=("10.9.0.77", 40002))
    assert link.pb.endpoint == ("10.9.0.77", 40002)
    assert link.b.device.open(datagram, ("10.66.0.1", 9), link.now) == Drop(Reason.REPLAYED)
    assert link.pb.endpoint == ("10.9.0.77", 40002)


def test_staged_packets_are_bounded():
    link = Link()
    link.lose["a"] = True
    for i in range(300):
        link.pa.seal(ping(i), link.now)
    assert len(link.pa.staged) == 128 and link.pa.staged_dropped == 300 - 128
    link.lose["a"] = False
    link.advance(REKEY_TIMEOUT + 1)
    assert link.b.delivered == [ping(i) for i in range(300 - 128, 300)]  # the newest 128, in order


# -- cookies and load -------------------------------------------------------------------------------------------


def test_under_load_an_initiation_without_mac2_gets_a_cookie_and_the_retry_gets_through():
    link = Link()
    link.b.device.force_under_load = True
    link.send(link.a, ping(1))
    assert link.b.drops == [Reason.COOKIE_REQUIRED] and types(link.b.sent) == [3]
    assert link.pa.cookie.has_cookie and not link.pa.has_session
    link.advance(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX + 0.1)  # the retry carries mac2
    assert link.pa.has_session and link.b.delivered == [ping(1)]


def test_the_cookie_secret_rotates_every_two_minutes():
    link = Link()
    link.b.device.force_under_load = True
    link.send(link.a, ping(1))
    link.advance(REKEY_TIMEOUT + 1)
    assert link.pa.has_session
    link.b.drops.clear()
    link.advance(200, step=10)
    link.pa.last_sent_handshake = None
    link.carry(link.a, link.pa._send_handshake_initiation(link.now, retry=False))
    # A's cookie is older than COOKIE_REFRESH_TIME: no mac2 at all; and B's secret has rotated anyway
    assert link.b.drops == [Reason.COOKIE_REQUIRED]


def test_a_handshake_flood_puts_the_device_under_load_and_a_real_peer_still_connects():
    link = Link()
    b = link.b.device
    attacker = Link(seed=50)  # a stranger that knows B's public key, so its mac1 is right
    stranger = attacker.a.device.add_peer(b.public_key, endpoint=link.b.address)
    replies = {"cookie": 0, "other": 0}
    for i in range(2000):
        stranger.last_sent_handshake = None
        [initiation] = stranger._send_handshake_initiation(link.now + i * 0.0005, retry=False)
        result = b.open(initiation, (f"10.{i % 200}.{i // 200}.9", 4000 + i), link.now + i * 0.0005)
        if isinstance(result, Reply) and result.dropped is Reason.COOKIE_REQUIRED:
            replies["cookie"] += 1
        else:
            assert result == Drop(Reason.UNKNOWN_PEER)
            replies["other"] += 1
    assert b.under_load(link.now + 1.0)
    assert replies["other"] == b.handshake_load_limit  # the first ones were worked on; then cookies only
    link.now += 1.0
    link.send(link.a, ping(1))
    assert Reason.COOKIE_REQUIRED in link.b.drops and not link.pa.has_session
    link.advance(REKEY_TIMEOUT + 1)
    assert link.pa.has_session and link.b.delivered == [ping(1)]


def test_under_load_each_source_is_rate_limited_even_with_a_valid_cookie():
    link = Link()
    b = link.b.device
    b.force_under_load = True
    link.send(link.a, ping(1))  # A learns a cookie
    results = []
    for i in range(30):  # 40 a second (each > 20 ms apart, so not a per-peer flood): twice the limit
        link.pa.last_sent_handshake = None
        [initiation] = link.pa._send_handshake_initiation(link.now + i * 0.025, retry=False)
        results.append(b.open(initiation, A_ADDR, link.now + i * 0.025))
    refused = [r for r in results if r == Drop(Reason.RATE_LIMITED)]
    assert all(isinstance(r, Reply) and r.dropped is None for r in results[:5])  # the burst
    assert 8 <= len(refused) <= 15 and len(refused) + sum(isinstance(r, Reply) for r in results) == 30


def test_an_ipv6_64_is_one_source_to_the_rate_limiter_however_many_addresses_it_sends_from():
    """The kernel's WireGuard rate-limits IPv6 per /64: a host is given a whole /64, and per address a flood
    from it would find a fresh bucket at every datagram."""
    from tunneld.encap.wireguard.constants import RATE_LIMIT_BURST

    b = Link().b.device
    now = 1000.0
    one_64 = sum(b._allow((f"2001:db8:0:1::{i + 1:x}", 51820), now + i * 0.001) for i in range(30))
    assert 1 <= one_64 <= RATE_LIMIT_BURST + 1  # the burst, and what 30 ms refill
    assert b._allow(("2001:db8:0:2::1", 51820), now + 0.05)  # another /64 has its own bucket
    ipv4 = sum(b._allow((f"10.9.0.{i + 1}", 51820), now + i * 0.001) for i in range(30))
    assert ipv4 == 30  # IPv4 addresses each have their own


def test_a_peers_initiations_closer_than_20_ms_are_a_flood():
    link = Link()
    first = link.pa._send_handshake_initiation(link.now, retry=False)
    link.pa.last_sent_handshake = None
    second = link.pa._send_handshake_initiation(link.now + 0.01, retry=False)
    assert isinstance(link.b.device.open(first[0], A_ADDR, link.now), Reply)
    assert link.b.device.open(second[0], A_ADDR, link.now + 0.01) == Drop(Reason.RATE_LIMITED)


def test_a_new_private_key_ends_every_session():
    link = Link()
    link.send(link.a, ping(1))
    [datagram] = link.pb.seal(ping(2), link.now)
    link.a.device.set_private_key(link.a.device.static)  # same key, set again: sessions end all the same
    assert not link.pa.has_session
    assert link.a.device.open(datagram, link.b.address, link.now) == Drop(Reason.NO_SESSION)


@pytest.mark.parametrize("psk", [None, bytes(range(32))])
def test_mismatched_psk_fails_the_handshake(psk):
    link = Link(psk=psk)
    link.pb.set_preshared_key(bytes(range(1, 33)))
    link.send(link.a, ping(1))
    assert link.a.drops == [Reason.DECRYPTION_FAILED] and not link.pa.has_session


def test_a_restarted_initiator_is_not_taken_for_a_replay():
    """A new process with the same key: its monotonic clock starts again, its wall clock went on (even by only
    50 ms: more than TAI64N's whitened resolution and the 20 ms flood limit); the responder takes its initiation."""
    from tunneld.encap.wireguard import Device
    from tests.wg_link import WALL, seeded_random

    link = Link()
    link.send(link.a, ping(1))
    key = link.a.device.static
    wall_now = link.a.device.wall(link.now)
    restarted = Device(key, wall_offset=wall_now + 0.05 - 3.0, random=seeded_random(9))  # its clock reads 3.0
    peer = restarted.add_peer(link.b.device.public_key, endpoint=link.b.address)
    [initiation] = peer.seal(ping(2), 3.0)
    result = link.b.device.open(initiation, ("10.9.0.1", 40777), link.now + 0.05)
    assert isinstance(result, Reply) and link.pb.endpoint == ("10.9.0.1", 40777)
    # while one whose wall clock went back is refused, as wireguard-go refuses it
    behind = Device(key, wall_offset=WALL - 3600, random=seeded_random(10))
    old = behind.add_peer(link.b.device.public_key, endpoint=link.b.address)
    [stale] = old.seal(ping(3), 3.0)
    assert link.b.device.open(stale, ("10.9.0.1", 40778), link.now + 1) == Drop(Reason.REPLAYED)


def test_a_removed_peer_leaves_no_index_behind():
    link = Link()
    link.send(link.a, ping(1))
    link.send(link.b, ping(2))
    [datagram] = link.pa.seal(ping(3), link.now)
    link.b.device.remove_peer(link.a.device.public_key)
    assert link.b.device._indices == {} and not link.b.device.peers
    assert link.b.device.open(datagram, link.a.address, link.now) == Drop(Reason.NO_SESSION)


def test_data_sent_without_an_answer_starts_a_new_handshake_after_15_s():
    """KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (+ jitter) after sending data with nothing authenticated heard back."""
    link = Link()
    link.send(link.a, ping(1))
    link.send(link.b, ping(2))
    link.lose["b"] = True  # B goes silent: not even its passive keepalive arrives
    start = link.now
    link.send(link.a, ping(3))
    link.a.sent.clear()
    link.advance(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT - 0.1, step=0.1)
    assert 1 not in types(link.a.sent)
    link.advance(REKEY_TIMEOUT_JITTER_MAX + 0.2, step=0.05)
    assert types(link.a.sent).count(1) == 1
    assert KEEPALIVE_TIMEOUT + REKEY_TIMEOUT <= link.now - start


def test_an_initiator_receiving_on_an_old_session_rekeys_before_it_expires():
    link = Link()
    link.send(link.a, ping(1))
    link.advance(166, step=10)  # past REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT; A never sent again
    assert link.now - link.pa.current.created >= 166
    link.a.sent.clear()
    link.send(link.b, ping(2))
    assert link.a.delivered == [ping(2)]
    assert 1 in types(link.a.sent) and link.now - link.pa.current.created < 1  # a new session already
    assert link.pa.sent_last_minute_handshake is False  # reset by the completed handshake
