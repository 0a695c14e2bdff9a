"""Live peer changes (Apply), the control handlers over a tunnel (control/handlers.py: show, add_peer,
remove_peer) and the workers' FDB agreement (Learnt), over fakes: no root."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import GRE, Ether
from scapy.layers.vxlan import VXLAN

from tunneld.runtime.channel import Apply, Channel, Learnt
from tunneld.config.schema import ConfigError, TunnelConfig
from tunneld.control.handlers import PeerControl
from tunneld.runtime.daemon import Tunnel
from tunneld.encap.base import Drop
from tunneld.encap.gre import Gre
from tunneld.encap.vxlan import Vxlan
from tunneld.datapath.fdb import mac_bytes
from tunneld.datapath.peers import PeerSpec
from tunneld.testing import FakeDevice, FakeLink
from tunneld.runtime.worker import LEARNT_PER_TICK, Worker
from tunneld.runtime.workers import Supervisor

A, B, C = "192.0.2.2", "192.0.2.3", "192.0.2.4"
VNI = 7
HOST = "02:00:00:00:00:0b"


def worker(codec=None, peers=(A, B), index=0):
    dev, link = FakeDevice(), FakeLink(A)
    w = Worker(index, dev, link, codec or Vxlan(VNI), dev="td0", max_frame=1450, offload=False,
               peers=[PeerSpec(p) if isinstance(p, str) else p for p in peers], clock=lambda: 1000.0)
    return w, dev, link


def from_peer(link, source, src_mac=HOST):
    frame = Ether(src=src_mac, dst="02:00:00:00:00:01") / IP() / UDP() / (b"x" * 40)
    link.deliver(bytes(VXLAN(flags=8, vni=VNI) / frame), source)


def tunnel_over(w: Worker, mode="vxlan") -> PeerControl:
    """The control handlers over a tunnel whose worker 0 is ``w`` (fakes underneath)."""
    t = Tunnel.__new__(Tunnel)
    t.cfg = TunnelConfig(peers=tuple(p.spec for p in w.engine.peers.all), dev="td0", mode=mode)
    t.plan = SimpleNamespace(vni=VNI if mode == "vxlan" else None, mtu=1450, codec=w.codec)
    t.workers = 1
    t.worker = w
    t.supervisor = Supervisor()
    return PeerControl(t)


def test_upsert_keeps_counters_and_learnt_macs_removal_flushes_them():
    w, dev, link = worker()
    from_peer(link, B)
    w.engine.on_link_readable()
    table = w.engine.peers
    assert table.fdb.lookup(mac_bytes(HOST)).address == B
    w.apply(Apply(peers_set=(PeerSpec(B, name="bee"), PeerSpec(C))))
    assert table.get(B).spec.name == "bee" and w.stats.peers[B].rx_packets == 1
    assert table.fdb.lookup(mac_bytes(HOST)).address == B and len(table) == 3
    w.apply(Apply(peers_removed=(B,)))
    assert table.get(B) is None and table.fdb.lookup(mac_bytes(HOST)) is None and B not in w.stats.peers
    dev.inject(bytes(Ether(src="02:00:00:00:00:01", dst=HOST) / IP() / UDP()))
    w.engine.on_device_readable()
    assert link.sent_to == [A, C]  # flooded to the peers left


def test_a_route_another_peer_owns_is_refused_and_nothing_changes():
    w, _, _ = worker(Gre(), peers=(PeerSpec(A, routes=("10.2.0.0/16",)), PeerSpec(B, routes=("10.3.0.0/16",))))
    with pytest.raises(ValueError, match="10.3.0.0/16 already belongs"):
        w.apply(Apply(peers_set=(PeerSpec(C, routes=("10.4.0.0/16",)), PeerSpec(A, routes=("10.3.0.0/16",)))))
    assert w.engine.peers.get(C) is None and w.engine.peers.routes_of(w.engine.peers.get(A)) == ["10.2.0.0/16"]


def test_peers_swapping_routes_is_one_change_not_a_conflict():
    """A reload that moves a route from one peer to another (or swaps two) is judged on the final table; applied
    one upsert at a time it met the old owner's route half-way and was refused with worker 0 half changed."""
    w, _, _ = worker(Gre(), peers=(PeerSpec(A, routes=("10.2.0.0/16", "10.9.0.0/24")),
                                   PeerSpec(B, routes=("10.3.0.0/16",))))
    stats_a = w.engine.peers.get(A).stats
    w.apply(Apply(peers_set=(PeerSpec(B, routes=("10.2.0.0/16",)), PeerSpec(A, routes=("10.3.0.0/16",)))))
    peers = w.engine.peers
    assert peers.routes_of(peers.get(A)) == ["10.3.0.0/16"] and peers.routes_of(peers.get(B)) == ["10.2.0.0/16"]
    assert peers.get(A).stats is stats_a  # a changed peer keeps its counters
    assert peers.routes.lookup(bytes([10, 9, 0, 1]), 4) is None  # the route nobody claims any more is gone


def test_the_old_single_peer_reload_still_works():
    w, dev, link = worker(peers=(A,))
    w.apply(Apply(peer="192.0.2.9"))
    assert list(w.engine.peers.by_id) == ["192.0.2.9"] and w.engine.peers.only is not None
    from_peer(link, A)
    w.engine.on_link_readable()
    assert w.stats.drops[Drop.UNKNOWN_PEER] == 1


def test_show_has_the_schema_of_tunneld_show_json():
    w, dev, link = worker(peers=(A, PeerSpec(B, name="bee", macs=("02:00:00:00:00:bb",)), C))
    from_peer(link, B)
    w.engine.on_link_readable()
    got = tunnel_over(w).show()
    assert set(got) == {"device", "mode", "vni", "mtu", "listen_port", "workers", "peers", "fdb", "fdb_max",
                        "fdb_learnt_total", "fdb_moved_total", "fdb_refused_total", "flooded_packets_total"}
    assert (got["device"], got["mode"], got["vni"], got["mtu"], got["workers"]) == ("td0", "vxlan", VNI, 1450, 1)
    assert [p["address"] for p in got["peers"]] == [A, B, C]
    bee = got["peers"][1]
    assert set(bee) == {"address", "name", "source", "state", "last_rx_age_s", "tx_packets", "rx_packets",
                        "tx_bytes", "rx_bytes", "dropped", "macs"}
    assert (bee["name"], bee["source"], bee["rx_packets"], bee["macs"]) == ("bee", "static", 1, ["02:00:00:00:00:bb"])
    assert bee["state"] in ("up", "silent") and isinstance(bee["last_rx_age_s"], float)
    assert got["peers"][0]["state"] == "never" and got["peers"][0]["last_rx_age_s"] is None
    fdb = {e["mac"]: e for e in got["fdb"]}
    assert fdb[HOST]["peer"] == B and fdb[HOST]["static"] is False
    assert fdb["02:00:00:00:00:bb"]["static"] is True and got["fdb_learnt_total"] == 1


def test_show_in_an_l3_mode_has_routes_and_no_fdb():
    w, _, _ = worker(Gre(), peers=(PeerSpec(A, routes=("10.2.0.0/16",)),))
    got = tunnel_over(w, mode="gre").show()
    assert "fdb" not in got and got["peers"][0]["routes"] == ["10.2.0.0/16"] and got["vni"] is None


def test_add_and_remove_peer_through_the_handler():
    w, _, _ = worker()
    t = tunnel_over(w)
    t.add_peer(PeerSpec(C, name="sea"))
    assert w.engine.peers.get(C).spec.name == "sea"
    assert [p.address for p in t.tunnel.cfg.peers] == [A, B, C]  # a SIGHUP's diff is taken against what runs
    with pytest.raises(ConfigError, match="routes are for L3 modes"):
        t.add_peer(PeerSpec("192.0.2.5", routes=("10.0.0.0/8",)))
    with pytest.raises(ConfigError, match="IP version"):
        t.add_peer(PeerSpec("2001:db8::1"))
    t.remove_peer(C)
    assert w.engine.peers.get(C) is None and [p.address for p in t.tunnel.cfg.peers] == [A, B]
    with pytest.raises(ConfigError, match="no peer 192.0.2.9"):
        t.remove_peer("192.0.2.9")
    with pytest.raises(ConfigError, match="not an IP address"):
        t.remove_peer("nonsense")


def test_a_mac_learnt_by_one_worker_reaches_the_others():
    async def run():
        one, _, link1 = worker(index=1)
        two, dev2, link2 = worker(index=2)
        parent, child = Channel.pair()
        parent.setblocking(False)
        one.share = child.offer
        from_peer(link1, B)
        one.engine.on_link_readable()
        one._fdb_tick(asyncio.get_running_loop())  # what the worker's timer runs every FDB_SYNC_INTERVAL
        one.close()
        messages, _ = parent.receive()
        learnt = [m for m in messages if isinstance(m, Learnt)]
        assert learnt == [Learnt(((mac_bytes(HOST), B),))]
        two.learn(learnt[0])
        dev2.inject(bytes(Ether(src="02:00:00:00:00:01", dst=HOST) / IP() / UDP()))
        two.engine.on_device_readable()
        assert link2.sent_to == [B]
        assert two.engine.peers.fdb.take_fresh() == {}  # told, not learnt: not passed on again
        parent.close(), child.close()

    asyncio.run(run())


def test_the_parent_passes_a_childs_learnt_macs_to_worker_0_and_the_other_children():
    import os

    from tunneld.runtime.workers import Child

    supervisor = Supervisor()
    ends = []
    for index in (1, 2):
        parent, child = Channel.pair()
        parent.setblocking(False), child.setblocking(False)
        supervisor.children.append(Child(index, os.getpid(), parent))
        ends.append(child)
    heard = []
    supervisor.on_learnt = heard.append
    message = Learnt(((mac_bytes(HOST), B),))
    ends[0].send(message)  # worker 1 learnt it
    supervisor._on_message(supervisor.children[0])
    assert heard == [message]
    assert ends[1].receive()[0] == [message] and ends[0].receive()[0] == []  # not echoed to who learnt it
    for c in supervisor.children:
        c.close()
    for end in ends:
        end.close()


def test_gre_sequence_numbers_serve_many_peers():
    """Each peer's RFC 2890 window is its own session's: GRE with seq takes several peers, from the file and live."""
    from tunneld.encap.gre import Gre
    from tunneld.runtime.modes import build_codec

    two = TunnelConfig(peers=(PeerSpec(A, routes=("10.1.0.0/16",)), PeerSpec(B, routes=("10.2.0.0/16",))),
                       mode="gre", extra={"seq": True})
    assert build_codec(two, {"gre": Gre}).stateful
    w, _, _ = worker(codec=Gre(seq=True), peers=(A,))
    t = tunnel_over(w, mode="gre")
    t.add_peer(PeerSpec(B, routes=("10.2.0.0/16",)))
    a, b = w.engine.peers.get(A), w.engine.peers.get(B)
    assert a is not None and b is not None and a.session is not b.session


def test_the_peer_left_alone_names_the_tunnel():
    """With one peer the metrics and logs name it (link.peer): after the first is removed, the one left."""
    w, _, link = worker(peers=(A, B))
    assert link.peer == A
    w.apply(Apply(peers_removed=(A,)))
    assert link.peer == B and [p.address for p in w.engine.peers.all] == [B]


# -- `tunneld peer add` makes the checks a configuration file gets (config/checks.py) -------------------------------


def _unchanged(t: PeerControl, w: Worker, before: list) -> bool:
    return [p.spec for p in w.engine.peers.all] == before and [p for p in t.tunnel.cfg.peers] == before


@pytest.mark.parametrize("spec,problem", [
    (PeerSpec(C, macs=("02:00:00:00:00:bb",)), f"peer {C}: macs: 02:00:00:00:00:bb is already given to peer {B}"),
    (PeerSpec(C, name="bee"), f"peer {C}: name: bee is already given to peer {B}"),
    (PeerSpec(C, name="two words"), "is not a peer name"),
])
def test_peer_add_refuses_what_another_peer_has_in_one_line_and_changes_nothing(spec, problem):
    """Before: a static MAC of another peer was silently taken over, a name given twice accepted."""
    w, _, _ = worker(peers=(A, PeerSpec(B, name="bee", macs=("02:00:00:00:00:bb",))))
    t = tunnel_over(w)
    before = [p.spec for p in w.engine.peers.all]
    with pytest.raises(ConfigError) as refused:
        t.add_peer(spec)
    assert problem in str(refused.value) and "\n" not in str(refused.value)
    assert _unchanged(t, w, before)
    assert w.engine.peers.fdb.lookup(mac_bytes("02:00:00:00:00:bb")).address == B


def test_peer_add_refuses_more_than_max_peers(monkeypatch):
    from tunneld.config import checks as config

    monkeypatch.setattr(config, "MAX_PEERS", 3)
    w, _, _ = worker()
    t = tunnel_over(w)
    t.add_peer(PeerSpec(C))
    before = [p.spec for p in w.engine.peers.all]
    with pytest.raises(ConfigError, match="4 peers, more than 3"):
        t.add_peer(PeerSpec("192.0.2.5"))
    assert _unchanged(t, w, before)
    t.add_peer(PeerSpec(C, name="sea"))  # a known peer changed: still 3
    assert w.engine.peers.get(C).spec.name == "sea"


@pytest.mark.parametrize("kind,problem", [("local", "is an address of this host"), ("broadcast", "is a broadcast address")])
def test_peer_add_refuses_an_address_of_this_host(monkeypatch, kind, problem):
    from tunneld.io import netlink

    monkeypatch.setattr(netlink, "address_kind", lambda addr: kind if addr == C else "unicast")
    w, _, _ = worker()
    t = tunnel_over(w)
    before = [p.spec for p in w.engine.peers.all]
    with pytest.raises(ConfigError, match=problem):
        t.add_peer(PeerSpec(C))
    assert _unchanged(t, w, before)


def test_peer_add_warns_when_the_new_peers_path_mtu_is_below_what_the_device_mtu_assumes(monkeypatch, caplog):
    from tunneld.control import server as control
    from tunneld.io import netlink

    monkeypatch.setattr(netlink, "path_mtu", lambda addr: 1400 if addr == C else 1500)
    w, _, _ = worker()
    t = tunnel_over(w)  # device MTU 1450: 1500 - 50 of VXLAN over IPv4
    reply = control.dispatch(t, control.Request("peer-add", spec=PeerSpec(C)))
    want = (f"peer {C}: its path MTU 1400 carries inner packets of at most 1350 bytes, less than td0's "
            "MTU 1450")
    assert reply["ok"] and reply["warning"].startswith(want) and want in caplog.text
    assert w.engine.peers.get(C) is not None and t.tunnel.plan.mtu == 1450  # added; the device MTU stays
    assert control.dispatch(t, control.Request("peer-add", spec=PeerSpec("192.0.2.5"))) == {"ok": True}


def test_the_path_mtu_is_asked_of_the_kernel_without_netlink_and_runs_on_a_running_loop():
    """pyroute2's IPRoute refuses to run inside a running event loop, where the control socket calls add_peer."""
    from tunneld.io import netlink

    async def ask() -> tuple:
        return netlink.path_mtu("127.0.0.1"), netlink.path_mtu("::1")

    lo = int(open("/sys/class/net/lo/mtu").read())
    assert asyncio.run(ask()) == (min(lo, 65535), lo)  # IPv4 caps it at the largest IPv4 packet


# -- `tunneld show` of a full FDB does not hold the loop ----------------------------------------------------------


def _full_fdb_tunnel(entries: int = 16384) -> PeerControl:
    w, _, _ = worker(peers=[A] + [f"10.1.0.{i}" for i in range(1, 100)])
    fdb, peers = w.engine.peers.fdb, w.engine.peers.all
    for i in range(entries):
        fdb.learn((0x020000000000 + i).to_bytes(6, "big"), peers[i % len(peers)], 1000.0)
    return tunnel_over(w)


def test_show_of_a_full_fdb_is_written_in_slices_yielding_to_the_loop_between_them():
    """Before: the 16k-entry reply was built and encoded in one go, ~0.2-0.6 s with the loop (and the data path)
    held (measured: a 1 ms ticker saw gaps of 508-620 ms on the loaded CI machine; after: 32 ms, as without
    any show). Now each slice of ROWS_PER_SLICE entries is encoded between two yields."""
    import json

    from tunneld.control import server as control

    t = _full_fdb_tunnel()
    reply = control.dispatch(t, control.Request("show"))
    pieces = list(control.reply_chunks(reply))
    assert max(p.count('"mac"') for p in pieces) <= control.ROWS_PER_SLICE
    assert "".join(pieces) + "\n" == control.encode(reply).decode()  # the same one line as encoded at once
    got = json.loads("".join(pieces))["result"]
    assert len(got["fdb"]) == 16384 and len(got["peers"]) == 100
    assert got["fdb"][5] == {"mac": "02:00:00:00:00:05", "peer": "10.1.0.5", "static": False, "age_s": got["fdb"][5]["age_s"]}

    class Writer:
        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, data: bytes) -> None:
            self.data += data

        async def drain(self) -> None:
            pass

    async def serve() -> tuple[int, bytes]:
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                await asyncio.sleep(0)
                ticks += 1

        task = asyncio.get_running_loop().create_task(ticker())
        await asyncio.sleep(0)
        writer = Writer()
        await control.ControlServer._write(writer, reply)
        done = True
        await task
        return ticks, bytes(writer.data)

    ticks, data = asyncio.run(serve())
    assert data == control.encode(reply) and ticks >= 16384 // control.ROWS_PER_SLICE // 2


def test_a_mac_flood_is_passed_on_a_bounded_batch_per_tick_and_the_rest_on_the_next():
    """Carried, not dropped: each MAC reaches the other workers, LEARNT_PER_TICK entries per tick at most."""
    w, _, _ = worker()
    sent: list[Learnt] = []
    w.share = sent.append
    peer = w.engine.peers.get(B)
    macs = [(0x020000000000 + i).to_bytes(6, "big") for i in range(2 * LEARNT_PER_TICK + 500)]
    for mac in macs:
        w.engine.peers.fdb.learn(mac, peer, 1000.0)

    async def ticks() -> list[int]:
        per_tick = []
        for _ in range(4):
            before = sum(len(m.entries) for m in sent)
            w._fdb_tick(asyncio.get_running_loop())
            per_tick.append(sum(len(m.entries) for m in sent) - before)
        w.close()
        return per_tick

    assert asyncio.run(ticks()) == [LEARNT_PER_TICK, LEARNT_PER_TICK, 500, 0]
    assert [mac for m in sent for mac, _ in m.entries] == macs and all(a == B for m in sent for _, a in m.entries)


def test_a_wireguard_peer_is_removed_by_its_address_as_show_lists_it():
    """A keyed peer's id is its public key; `tunneld peer remove ADDR` names it by its address all the same."""
    from tunneld.encap.wireguard import StaticKey, key_to_base64
    from tunneld.encap.wireguard.codec import WireGuard

    keys = [key_to_base64(StaticKey(bytes([n]) * 32).public) for n in (1, 2)]
    codec = WireGuard(bytes([9]) * 32)
    w, _, _ = worker(codec, peers=(PeerSpec(A, routes=("10.1.0.0/24",), key=keys[0], port=51820),
                                   PeerSpec(B, routes=("10.2.0.0/24",), key=keys[1], port=51820)))
    t = tunnel_over(w, mode="wireguard")
    session = w.engine.peers.get(keys[0]).session
    t.remove_peer(A)
    assert [p.id for p in w.engine.peers.all] == [keys[1]] and [p.id for p in t.tunnel.cfg.peers] == [keys[1]]
    assert bytes(StaticKey(bytes([1]) * 32).public) not in codec.wg.peers and session.peer.current is None
    with pytest.raises(ConfigError, match=f"no peer {A}"):
        t.remove_peer(A)
