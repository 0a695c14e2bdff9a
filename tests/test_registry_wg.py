"""The registry for wireguard hosts without a cluster (issue 21, "Registry"): a record carries a public key, an
endpoint and allowed IPs, never a private key; the key is a claim; records become peers keyed by their public
key through the bridge, the same checks as a file's [[peer]] tables, and leave with their session closed.
The real cluster and three real tunnelds: tests/test_registry_wg_netns.py."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tunneld.config.schema import TunnelConfig
from tunneld.control.registry import (
    CLAIM_KINDS,
    INVALID_REASONS,
    InvalidRecord,
    Membership,
    Record,
    RegistryStats,
    decode,
)
from tunneld.datapath.peers import REGISTRY, PeerSpec

PREFIX = b"/t/hosts/"
CLAIMS_PREFIX = b"/t/claims/"
PORT = 51820


def keypair() -> tuple[bytes, str]:
    """A private key's bytes and its public key in base64, from `cryptography` (not the code under test)."""
    private = X25519PrivateKey.generate()
    raw = private.private_bytes_raw()
    return raw, base64.b64encode(private.public_key().public_bytes_raw()).decode()


OUR_PRIVATE, OUR_KEY = keypair()
_, KEY_B = keypair()
_, KEY_C = keypair()


def record(address="10.0.0.2", key=KEY_B, **kw) -> Record:
    values = dict(mode="wireguard", vni=None, mac=None, overlay=("10.78.0.2/24",), version="1", started=1.0,
                  owner="o", public_key=key, port=PORT)
    values.update(kw)
    return Record(address, **values)


def kvs(rec: Record, holder: str | None = None) -> list[tuple[bytes, bytes]]:
    return [*((CLAIMS_PREFIX + c.path, (holder or rec.address).encode()) for c in rec.claims()),
            (PREFIX + rec.address.encode(), rec.encode())]


def membership() -> Membership:
    return Membership(PREFIX, "10.0.0.1", l2=False, mode="wireguard", vni=None, stats=RegistryStats(),
                      public_key=OUR_KEY, port=PORT)


def test_a_wireguard_record_says_key_endpoint_and_allowed_ips_and_becomes_a_keyed_peer():
    rec = record(overlay=("10.78.0.2/24", "fd78::2/64"))
    data = json.loads(rec.encode())
    assert data["public_key"] == KEY_B and data["endpoint"] == "10.0.0.2:51820"
    assert data["allowed_ips"] == ["10.78.0.2/32", "fd78::2/128"]
    assert "private_key" not in data and "port" not in data
    assert decode(PREFIX + b"10.0.0.2", rec.encode(), PREFIX) == rec
    assert rec.spec(l2=False) == PeerSpec("10.0.0.2", routes=("10.78.0.2/32", "fd78::2/128"), source=REGISTRY,
                                          key=KEY_B, port=51820)
    assert rec.spec(l2=False).id == KEY_B
    # a host listening on a port of its own is sent there
    assert replace(rec, port=4000).spec(l2=False).port == 4000
    v6 = record("fd00::2")
    assert json.loads(v6.encode())["endpoint"] == "[fd00::2]:51820"
    assert decode(PREFIX + b"fd00::2", v6.encode(), PREFIX) == v6
    # a record without a key (vxlan, gre) is written as before
    assert "public_key" not in json.loads(record(key=None, port=None).encode())


def test_the_public_key_is_a_claim_scoped_to_the_tunnel():
    assert [k.name for k in CLAIM_KINDS] == ["underlay", "overlay", "mac", "key"]
    paths = [c.path for c in record().claims()]
    assert paths == [b"underlay/10.0.0.2", b"wireguard/overlay/10.78.0.2", b"wireguard/key/" + KEY_B.encode()]


def _with(rec: Record, **fields) -> bytes:
    data = json.loads(rec.encode())
    data.update(fields)
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


@pytest.mark.parametrize("value, reason, says", [
    (_with(record(), public_key="not a key"), "fields", "not a WireGuard public key"),
    (_with(record(), public_key="A" * 43 + "="), "fields", "all zeros"),
    (_with(record(), public_key=KEY_B[:-2] + "B="), "fields", "not a WireGuard public key"),  # spare bits set
    (_with(record(), public_key=5), "fields", "public_key"),
    (_with(record(), public_key=...), "fields", "public_key: missing"),
    (_with(record(), endpoint=...), "fields", "endpoint"),
    (_with(record(), endpoint="10.0.0.9:51820"), "fields", "endpoint"),  # not its own address
    (_with(record(), endpoint="10.0.0.2"), "fields", "endpoint"),
    (_with(record(), endpoint="10.0.0.2:051820"), "fields", "endpoint"),
    (_with(record(), endpoint="10.0.0.2:0"), "fields", "endpoint"),
    (_with(record(), allowed_ips=["0.0.0.0/0"]), "fields", "allowed_ips"),  # more than its overlay implies
    (_with(record(), allowed_ips=...), "fields", "allowed_ips"),
    (record(key=OUR_KEY).encode(), "own", "its public key is ours"),
])
def test_a_record_with_a_bad_key_endpoint_or_allowed_ips_or_our_key_is_refused_and_counted(value, reason, says):
    m = membership()
    rec = record()
    assert m.apply([*kvs(rec)[:-1], (PREFIX + b"10.0.0.2", value)]) == ((), ())
    assert m.stats.invalid[reason] == 1 and sum(m.stats.invalid.values()) == 1
    assert set(m.stats.invalid) == set(INVALID_REASONS)
    assert says in m.refused[PREFIX + b"10.0.0.2"][1]
    assert "not a key" not in m.refused[PREFIX + b"10.0.0.2"][1]  # a malformed key is never quoted


def test_a_forged_record_naming_a_hosts_key_is_taken_on_every_host_whatever_the_order():
    """Host B holds its key's claim; a fourth record (its own underlay and overlay claims, another endpoint)
    names B's key. Every host, whichever it saw first, makes B a peer and counts the forger "taken"; one
    written around the transaction (no claims at all) is "unclaimed"."""
    genuine = record()
    forged = record("10.0.0.9", overlay=("10.78.0.9/24",))
    forged_kvs = kvs(forged)
    forged_kvs[-2] = (forged_kvs[-2][0], b"10.0.0.2")  # the key's claim is B's, as etcd keeps it
    for order in ((kvs(genuine), forged_kvs), (forged_kvs, kvs(genuine))):
        m = membership()
        m.apply(order[0]), m.apply(order[1])
        assert set(m.specs) == {"10.0.0.2"} and m.specs["10.0.0.2"].key == KEY_B
        assert m.refused == {PREFIX + b"10.0.0.9": ("taken", f"its public key {KEY_B} is held by host 10.0.0.2")}
        assert m.stats.invalid["taken"] == 1
    m = membership()
    m.apply(kvs(genuine))
    assert m.put(PREFIX + b"10.0.0.8", record("10.0.0.8", overlay=("10.78.0.8/24",)).encode()) == ((), ())
    assert m.refused[PREFIX + b"10.0.0.8"][0] == "unclaimed" and set(m.specs) == {"10.0.0.2"}


def test_a_host_back_with_a_new_key_replaces_its_old_peer_and_a_leaving_host_is_removed_by_key():
    m = membership()
    first = record()
    assert m.apply(kvs(first)) == ((first.spec(False),), ())
    again = record(key=KEY_C)
    assert m.apply(kvs(again)) == ((again.spec(False),), (KEY_B,))  # the old key's peer goes
    assert m.delete(PREFIX + b"10.0.0.2") == ((), (KEY_C,))


# -- the bridge over a real engine: keyed peers through the same Apply as the file's [[peer]] tables ----------


def tunnel_over_fakes(static: tuple[PeerSpec, ...] = ()):
    from tunneld.control.handlers import PeerControl
    from tunneld.control.membership import RegistryBridge
    from tunneld.encap.wireguard.codec import WireGuard
    from tunneld.runtime.daemon import Tunnel
    from tunneld.runtime.worker import Worker
    from tunneld.runtime.workers import Supervisor
    from tunneld.testing import FakeDevice, FakeLink

    codec = WireGuard(OUR_PRIVATE)
    w = Worker(0, FakeDevice(), FakeLink("192.0.2.1"), codec, dev="wg9", max_frame=1420, offload=False,
               peers=list(static), clock=lambda: 1000.0)
    t = Tunnel.__new__(Tunnel)
    t.cfg = TunnelConfig(mode="wireguard", peers=static, dev="wg9")
    t.plan = SimpleNamespace(vni=None, mtu=1420, codec=codec, port=PORT)
    t.workers, t.worker, t.supervisor = 1, w, Supervisor()
    t.registry_stats = RegistryStats()
    return t, RegistryBridge(t, PeerControl(t)), codec


def test_the_bridge_publishes_our_public_key_and_port_never_the_private_key(monkeypatch):
    """The record the bridge hands the etcd client, as it would be written: our key and endpoint, no secret."""
    import asyncio
    import dataclasses

    from tunneld.control import etcd
    from tunneld.control.registry import RegistryConfig

    handed = {}

    class Client:  # stands for etcd.Registry: what start() gives it is what would be written
        def __init__(self, cfg, record, membership, **kw):
            handed.update(record=record, membership=membership)

        def start(self):
            handed["started"] = True

    monkeypatch.setattr(etcd, "Registry", Client)
    t, bridge, _ = tunnel_over_fakes()
    t.cfg = dataclasses.replace(t.cfg, local="192.0.2.1", addresses=("10.78.0.1/24",),
                                registry=RegistryConfig(("192.0.2.9:2379",), "/mesh"))
    loop = asyncio.new_event_loop()
    try:
        bridge.start(loop)
    finally:
        loop.close()
    written = handed["record"].encode().decode()
    assert handed["started"] and json.loads(written)["public_key"] == OUR_KEY
    assert json.loads(written)["endpoint"] == f"192.0.2.1:{PORT}"
    assert json.loads(written)["allowed_ips"] == ["10.78.0.1/32"]
    for secret in (base64.b64encode(OUR_PRIVATE).decode(), OUR_PRIVATE.hex(), OUR_PRIVATE.decode("latin-1")):
        assert secret not in written
    assert handed["membership"].public_key == OUR_KEY and handed["membership"].port == PORT
    assert [c.path for c in handed["record"].claims()][-1] == b"wireguard/key/" + OUR_KEY.encode()

    from tunneld.encap.wireguard.codec import WireGuard

    bridge.tunnel.plan = SimpleNamespace(vni=None, mtu=1420, codec=WireGuard(None), port=PORT)  # no key yet
    with pytest.raises(ValueError, match="registers its public key: give it a private key"):
        bridge.identity()


def test_registry_hosts_become_keyed_peers_and_leave_with_their_session_closed_and_keys_zeroed():
    t, bridge, codec = tunnel_over_fakes()
    b, c = record().spec(False), record("192.0.2.3", KEY_C, overlay=("10.78.0.3/24",)).spec(False)
    bridge.changes((b, c), ())
    table = t.worker.engine.peers
    assert table.get(KEY_B).endpoint == "10.0.0.2" and table.get(KEY_C).spec.source == REGISTRY
    assert sorted(table.routes_of(table.get(KEY_B))) == ["10.78.0.2/32"]
    assert t.registry_stats.peers == 2 and t.cfg.peers == ()  # registry peers stay out of the reload's diff
    wg_b = codec.wg.peers[base64.b64decode(KEY_B)]
    zeroed = []
    wg_b.zero_keys = lambda orig=wg_b.zero_keys: (zeroed.append(True), orig())
    bridge.changes((), (KEY_B,))
    assert table.get(KEY_B) is None and zeroed == [True]  # its session closed: keys zeroed, gone from the core
    assert base64.b64decode(KEY_B) not in codec.wg.peers and t.registry_stats.peers == 1


def test_allowed_ips_overlapping_another_peers_are_refused_and_counted():
    static = (PeerSpec("192.0.2.7", routes=("10.78.5.0/24",), key=KEY_C),)
    t, bridge, _ = tunnel_over_fakes(static)
    inside = record(overlay=("10.78.5.9/24",)).spec(False)  # inside the static peer's prefix
    bridge.changes((inside,), ())
    assert t.worker.engine.peers.get(KEY_B) is None and t.registry_stats.invalid["refused"] == 1
    # a record naming a static peer's key is not applied over it (the static peer wins), nor removed by leaving
    bridge.changes((record("10.0.0.5", KEY_C, overlay=("10.78.0.5/24",)).spec(False),), (KEY_C,))
    assert t.worker.engine.peers.get(KEY_C).spec.source == "static"
    fine = record(overlay=("10.78.6.9/24",)).spec(False)
    bridge.changes((fine,), ())
    assert t.worker.engine.peers.get(KEY_B) is not None and t.registry_stats.invalid["refused"] == 1


def test_check_disjoint_names_the_other_peer():
    from tunneld.config.checks import check_disjoint
    from tunneld.config.schema import ConfigError

    a = PeerSpec("10.0.0.2", routes=("10.1.0.0/16",), key=KEY_B)
    b = PeerSpec("10.0.0.3", routes=("10.1.2.3/32", "fd00::/64"), key=KEY_C)
    with pytest.raises(ConfigError, match=r"allowed IP 10.1.2.3/32 overlaps 10.1.0.0/16 of peer 10.0.0.2"):
        check_disjoint((a,), b)
    assert check_disjoint((a,), PeerSpec("10.0.0.3", routes=("10.2.0.0/16", "fd00::/64"), key=KEY_C))


def test_judge_alone_says_why():
    m = membership()
    with pytest.raises(InvalidRecord) as e:
        m.judge(PREFIX + b"10.0.0.2", record(key=OUR_KEY).encode())
    assert e.value.reason == "own"
