"""The FDB (tunneld/datapath/fdb.py) and the routes table (tunneld/datapath/routes.py): pure, bounded, exact."""

from __future__ import annotations

import os
import tracemalloc

import pytest

from tunneld.datapath.fdb import Fdb, mac_bytes, mac_text
from tunneld.datapath.routes import Routes

A, B = "10.0.0.2", "10.0.0.3"
M1, M2 = mac_bytes("02:00:00:00:00:01"), mac_bytes("02:00:00:00:00:02")


def test_learns_unicast_sources_and_looks_them_up():
    fdb = Fdb()
    fdb.learn(M1, A, 1.0)
    assert fdb.lookup(M1) == A and fdb.lookup(M2) is None
    assert (fdb.learnt, fdb.moved, fdb.refused, len(fdb)) == (1, 0, 0, 1)
    fdb.learn(M1, A, 2.0)  # seen again: refreshed, not learnt twice
    assert fdb.learnt == 1


@pytest.mark.parametrize("mac", ["ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01", "33:33:00:00:00:01", "00:00:00:00:00:00"])
def test_group_and_null_sources_are_never_learnt(mac):
    fdb = Fdb()
    fdb.learn(mac_bytes(mac), A, 1.0)
    assert len(fdb) == 0 and fdb.learnt == 0


def test_a_mac_seen_behind_another_peer_moves_and_is_counted():
    fdb = Fdb()
    fdb.learn(M1, A, 1.0)
    fdb.learn(M1, B, 2.0)
    assert fdb.lookup(M1) == B and fdb.moved == 1 and len(fdb) == 1


def test_static_entries_never_age_and_are_never_overwritten():
    fdb = Fdb(ageing=10)
    fdb.add_static(M1, A)
    fdb.learn(M1, B, 5.0)
    assert fdb.lookup(M1) == A and fdb.moved == 0
    fdb.learn(M2, B, 0.0)
    assert fdb.expire(100.0) == 1
    assert fdb.lookup(M1) == A and fdb.lookup(M2) is None


def test_ageing_keeps_what_was_seen_recently_and_zero_means_never():
    fdb = Fdb(ageing=300)
    fdb.learn(M1, A, 0.0)
    fdb.learn(M2, A, 0.0)
    fdb.learn(M2, A, 250.0)
    assert fdb.expire(301.0) == 1 and fdb.lookup(M2) == A and fdb.lookup(M1) is None
    forever = Fdb(ageing=0)
    forever.learn(M1, A, 0.0)
    assert forever.expire(1e9) == 0 and forever.lookup(M1) == A


def test_past_the_bound_new_macs_are_refused_and_old_ones_kept():
    fdb = Fdb(max_entries=2)
    fdb.learn(M1, A, 0.0)
    fdb.learn(M2, A, 0.0)
    fdb.learn(mac_bytes("02:00:00:00:00:03"), B, 0.0)
    assert len(fdb) == 2 and fdb.refused == 1 and fdb.lookup(M1) == A


def test_flush_removes_one_peers_entries_only():
    fdb = Fdb()
    fdb.add_static(M1, A)
    fdb.learn(M2, A, 0.0)
    fdb.learn(mac_bytes("02:00:00:00:00:03"), B, 0.0)
    assert fdb.flush(A, learnt=False) == 1 and fdb.lookup(M2) == A
    assert fdb.flush(A) == 1 and len(fdb) == 1
    assert fdb.lookup(mac_bytes("02:00:00:00:00:03")) == B


def test_fresh_holds_what_this_fdb_learnt_not_what_it_was_told():
    fdb = Fdb()
    fdb.learn(M1, A, 0.0)
    fdb.learn(M2, B, 0.0, remote=True)
    assert fdb.take_fresh() == {M1: A} and fdb.take_fresh() == {}
    assert fdb.learnt == 1 and fdb.lookup(M2) == B


def test_a_storm_of_random_macs_stays_within_the_bound():
    fdb = Fdb(max_entries=1000)
    fdb.learn(M1, B, 0.0)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(100_000):
        mac = bytearray(os.urandom(6))
        mac[0] &= 0xFE
        fdb.learn(bytes(mac), A, 1.0)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(fdb) == 1000 and fdb.refused >= 98_000
    assert len(fdb.fresh) <= 1000
    assert grown < 1_000_000  # ~1000 entries' worth, not 100k
    assert fdb.lookup(M1) == B  # the other peer's MAC was not pushed out


def test_mac_text_round_trips_and_bad_text_is_one_line():
    assert mac_text(mac_bytes("0a:bb:cc:dd:ee:ff")) == "0a:bb:cc:dd:ee:ff"
    with pytest.raises(ValueError, match="not a MAC"):
        mac_bytes("0a:bb:cc")


def test_routes_longest_prefix_wins():
    r = Routes()
    r.add("10.0.0.0/8", A)
    r.add("10.1.0.0/16", B)
    r.add("::/0", A)
    assert r.lookup(bytes([10, 1, 2, 3]), 4) == B
    assert r.lookup(bytes([10, 2, 2, 3]), 4) == A
    assert r.lookup(bytes([11, 0, 0, 1]), 4) is None
    assert r.lookup(1, 6) == A
    assert r.prefixes(A) == ["10.0.0.0/8", "::/0"]


def test_routes_one_owner_per_prefix_and_removal():
    r = Routes()
    r.add("10.1.0.0/16", A)
    r.add("10.1.0.0/16", A)  # the same owner again is no conflict
    with pytest.raises(ValueError, match="already belongs"):
        r.add("10.1.0.0/16", B)
    with pytest.raises(ValueError, match="not a prefix"):
        r.add("10.1.0.0/33", B)
    assert r.remove_peer(A) == 1 and r.lookup(bytes([10, 1, 0, 1]), 4) is None


def test_a_refreshed_entry_is_passed_on_again_before_the_other_workers_age_it_out():
    """Workers share what they learn (take_fresh); one that only sends to a MAC hears of it from the worker that
    receives its frames. Those refreshes are passed on again every ageing/3, or the sender would expire the MAC
    while it is in use and flood its traffic. What another worker told us is never echoed back."""
    fdb = Fdb(max_entries=8, ageing=300.0)
    mine, told = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"
    fdb.learn(mine, "A", 0.0)
    fdb.learn(told, "A", 0.0, remote=True)
    assert fdb.take_fresh() == {mine: "A"}
    fdb.learn(mine, "A", 50.0)  # refreshed by frames arriving here
    fdb.learn(told, "A", 50.0, remote=True)  # refreshed by another worker's message
    fdb.expire(60.0)
    assert fdb.take_fresh() == {}  # not yet: at most every ageing/3
    fdb.expire(101.0)
    assert fdb.take_fresh() == {mine: "A"}
    fdb.expire(150.0)
    assert fdb.take_fresh() == {}  # nothing new since it was passed on
    fdb.learn(mine, "A", 390.0)
    fdb.expire(399.0)  # still here: seen at 390
    assert fdb.lookup(mine) == "A" and fdb.take_fresh() == {mine: "A"}
    assert fdb.lookup(told) is None  # told at 50, never refreshed since: aged out at 350
