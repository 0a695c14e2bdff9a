"""The registry without a cluster: its settings, its records, and how records become peer changes (issue 13).
The real cluster is tests/test_registry_netns.py."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tunneld.config.schema import TunnelConfig
from tunneld.config.loading import ConfigFileError, load_file, validate
from tunneld.observe.metrics import RegistryCollector
from tunneld.datapath.peers import REGISTRY, PeerSpec
from tunneld.control import registry as registry_module
from tunneld.control.registry import (
    CLAIM_KINDS,
    DEFAULT_PREFIX,
    DEFAULT_TTL,
    INVALID_REASONS,
    InvalidRecord,
    Membership,
    Record,
    RegistryConfig,
    RegistryError,
    RegistryStats,
    Refusals,
    check_registry,
    decode,
    owner_id,
    parse_url,
)
from tunneld.testbed import TUNNELD

PREFIX = b"/t/hosts/"
CLAIMS_PREFIX = b"/t/claims/"


def record(address="10.0.0.2", **kw) -> Record:
    values = dict(mode="vxlan", vni=7, mac="02:00:00:00:00:02", overlay=("192.168.1.2/24",), version="1",
                  started=1.0, owner="o")
    values.update(kw)
    return Record(address, **values)


def kvs(rec: Record, holder: str | None = None) -> list[tuple[bytes, bytes]]:
    """A record as a daemon writes it: its claims (held by ``holder``, itself by default), then the record."""
    return [*((CLAIMS_PREFIX + c.path, (holder or rec.address).encode()) for c in rec.claims()),
            (PREFIX + rec.address.encode(), rec.encode())]


def put(m: Membership, rec: Record):
    return m.apply(kvs(rec))


def membership(l2=True, **kw) -> Membership:
    return Membership(PREFIX, "10.0.0.1", l2=l2, mode=kw.get("mode", "vxlan"), vni=kw.get("vni", 7),
                      stats=RegistryStats())


@pytest.mark.parametrize("url, endpoints, prefix", [
    ("etcd://10.0.0.1:2379/tunneld", ("10.0.0.1:2379",), "/tunneld"),
    ("etcd://10.0.0.1:2379,10.0.0.2:2380/site/a/", ("10.0.0.1:2379", "10.0.0.2:2380"), "/site/a"),
    ("etcd://etcd.example:2379", ("etcd.example:2379",), DEFAULT_PREFIX),
    ("etcd://[fd00::1]:2379,10.0.0.3/x", ("[fd00::1]:2379", "10.0.0.3:2379"), "/x"),
])
def test_registry_url(url, endpoints, prefix):
    assert parse_url(url) == (endpoints, prefix)


@pytest.mark.parametrize("url, says", [
    ("http://10.0.0.1:2379/x", "is not etcd://"),
    ("etcd:///x", "is not HOST:PORT"),
    ("etcd://10.0.0.1:99999/x", "port '99999'"),
    ("etcd://fd00::1:2379/x", "IPv6 address in brackets"),
    ("etcd://10.0.0.1:2379,10.0.0.1:2379/x", "given twice"),
    ("etcd://10.0.0.1:2379/a b", "is not a key prefix"),
])
def test_bad_registry_url_is_one_line(url, says):
    with pytest.raises(RegistryError, match=says) as e:
        parse_url(url)
    assert "\n" not in str(e.value) and str(e.value).startswith("registry: ")


def test_registry_settings_checked_together(tmp_path):
    assert check_registry(RegistryConfig(("10.0.0.1:2379",))).ttl == DEFAULT_TTL
    with pytest.raises(RegistryError, match="cert and key go together"):
        check_registry(RegistryConfig(("10.0.0.1:2379",), cert=str(tmp_path)))
    with pytest.raises(RegistryError, match="registry.ca: cannot read"):
        check_registry(RegistryConfig(("10.0.0.1:2379",), ca=str(tmp_path / "missing.pem")))
    with pytest.raises(RegistryError, match="registry-ttl: 1 is not"):
        check_registry(RegistryConfig(("10.0.0.1:2379",), ttl=1))


def test_validate_takes_a_registry_instead_of_peers():
    cfg = validate(TunnelConfig(registry=RegistryConfig(("10.0.0.1:2379",)), local="10.0.0.5"))
    assert cfg.peers == () and cfg.registry.prefix == DEFAULT_PREFIX
    with pytest.raises(Exception, match="peer: missing"):
        validate(TunnelConfig())


def test_registry_table_in_a_file(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[tunnel]\nmode = "vxlan"\n[registry]\nendpoints = ["10.0.0.1:2379", "10.0.0.2"]\n'
                    'prefix = "/site"\nttl = 5\n')
    reg = load_file(str(path))["registry"]
    assert reg == RegistryConfig(("10.0.0.1:2379", "10.0.0.2:2379"), "/site", 5)
    path.write_text('[registry]\nendpoints = "etcd://10.0.0.1:2379/from-url"\n')
    assert load_file(str(path))["registry"].prefix == "/from-url"
    path.write_text('[registry]\nendpoint = "x"\nttl = "5"\n')
    with pytest.raises(ConfigFileError) as e:
        load_file(str(path))
    assert e.value.problems == [
        f"{path}: registry.endpoint: unknown key; allowed in [registry]: endpoints, prefix, ttl, ca, cert, key, "
        "user, password",
        f"{path}: registry.ttl: expected an integer number of seconds, got string '5'",
    ]


def tunneld(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TUNNELD, *args], capture_output=True, text=True, timeout=30)


def test_cli_registry_makes_peer_optional_and_bad_values_are_one_line(tmp_path):
    r = tunneld("--registry", "etcd://10.0.0.1:2379/x", "--registry-ttl", "5", "--check")
    assert r.returncode == 0, r.stderr
    assert "ok: vxlan to the hosts in etcd 10.0.0.1:2379 prefix /x ttl 5s on tunneld0" in r.stdout
    for args, code, says in (
        (("--registry", "etcd:/10.0.0.1"), 2, "registry: 'etcd:/10.0.0.1' is not etcd://"),
        (("--peer", "10.0.0.2", "--registry-ttl", "5"), 2, "registry-ttl: without a registry"),
        (("--registry", "etcd://10.0.0.1/x", "--registry-ttl", "1"), 2, "registry-ttl must be between 2 and 3600"),
    ):
        r = tunneld(*args, "--check")
        assert r.returncode == code, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and says in r.stderr and "Traceback" not in r.stderr
    conf = tmp_path / "t.toml"
    conf.write_text('[registry]\nendpoints = ["10.0.0.1:2379"]\nca = "/nonexistent.pem"\n')
    r = tunneld("--config", str(conf), "--check")
    assert r.returncode == 78 and r.stderr.strip() == f"tunneld: {conf}: registry.ca: cannot read '/nonexistent.pem'"


def test_a_record_round_trips_and_becomes_a_peer():
    rec = record()
    assert decode(PREFIX + b"10.0.0.2", rec.encode(), PREFIX) == rec
    assert rec.spec(l2=True) == PeerSpec("10.0.0.2", macs=("02:00:00:00:00:02",), source=REGISTRY)
    l3 = record(mac=None, overlay=("192.168.1.2/24", "fd00::2/64")).spec(l2=False)
    assert l3.routes == ("192.168.1.2/32", "fd00::2/128") and l3.source == REGISTRY


@pytest.mark.parametrize("key, value, reason", [
    (b"10.0.0.2", b"{not json", "json"),
    (b"10.0.0.2", b"[1, 2]", "json"),
    (b"10.0.0.2", b"x" * 20000, "json"),
    (b"10.0.0.2", json.dumps({"address": 5}).encode(), "fields"),
    (b"10.0.0.3", record().encode(), "fields"),  # the key names another address
    (b"10.0.0.2", record(mac="01:00:5e:00:00:01").encode(), "fields"),
    (b"10.0.0.2", record(overlay=("nonsense",)).encode(), "fields"),
    (b"10.0.0.2", json.dumps({**json.loads(record().encode()), "vni": True}).encode(), "fields"),
    (b"fd00::2", record("fd00::2").encode(), "family"),
    (b"10.0.0.2", record(vni=8).encode(), "foreign"),
    (b"10.0.0.2", record(mode="gretap").encode(), "foreign"),
    (b"10.0.0.2", record(mac=None).encode(), "fields"),  # L2 needs the MAC
])
def test_invalid_records_are_counted_by_reason_never_raised(key, value, reason):
    m = membership()
    assert m.put(PREFIX + key, value) == ((), ())
    assert m.stats.invalid[reason] == 1 and sum(m.stats.invalid.values()) == 1
    assert set(m.stats.invalid) == set(INVALID_REASONS)


def test_own_address_under_another_key_is_counted_and_own_key_is_not_a_peer():
    m = membership()
    assert put(m, record("10.0.0.1")) == ((), ())  # our own key: ours, not a peer, not invalid
    assert sum(m.stats.invalid.values()) == 0
    with pytest.raises(InvalidRecord) as e:
        m.judge(PREFIX + b"10.0.0.1", record("10.0.0.1").encode())
    assert e.value.reason == "own"


def test_changes_replace_and_leaves_remove_everything():
    m = membership()
    first = record()
    assert put(m, first) == ((first.spec(True),), ())
    assert put(m, first) == ((), ())  # the same again: nothing to do
    moved = record(mac="02:00:00:00:00:22")
    assert put(m, moved) == ((moved.spec(True),), ())  # the old MAC goes with the old spec
    assert m.put(PREFIX + b"10.0.0.2", b"garbage") == ((), ("10.0.0.2",))  # invalid now: removed
    assert put(m, first)[0] and m.delete(PREFIX + b"10.0.0.2") == ((), ("10.0.0.2",))
    assert m.delete(PREFIX + b"10.0.0.2") == ((), ())


def test_resync_answers_with_the_difference():
    m = membership()
    a, b = record("10.0.0.2"), record("10.0.0.3", mac="02:00:00:00:00:03", overlay=("192.168.1.3/24",))
    c = record("10.0.0.4", mac="02:00:00:00:00:04", overlay=("192.168.1.4/24",))
    assert m.resync([*kvs(a), *kvs(b)]) == ((a.spec(True), b.spec(True)), ())
    b2 = record("10.0.0.3", mac="02:00:00:00:00:33", overlay=("192.168.1.3/24",))
    assert m.resync([*kvs(b2), *kvs(c)]) == ((b2.spec(True), c.spec(True)), ("10.0.0.2",))


def test_owner_is_stable_per_machine_namespace_and_device():
    assert owner_id("t0", machine_id=b"m", netns="net:[1]") == owner_id("t0", machine_id=b"m", netns="net:[1]")
    assert owner_id("t0", machine_id=b"m", netns="net:[1]") != owner_id("t0", machine_id=b"m", netns="net:[2]")
    assert owner_id("t0", machine_id=b"m", netns="net:[1]") != owner_id("t1", machine_id=b"m", netns="net:[1]")


def test_registry_metrics():
    stats = RegistryStats(up=True, peers=3)
    stats.invalid["json"] = 2
    stats.invalid["taken"] = 5  # the losers of a claim, counted by the same family
    reg = CollectorRegistry()
    reg.register(RegistryCollector(stats))
    text = generate_latest(reg).decode()
    assert "tunneld_registry_up 1.0" in text and "tunneld_registry_peers 3.0" in text
    assert 'tunneld_registry_invalid_records_total{reason="json"} 2.0' in text
    assert 'tunneld_registry_invalid_records_total{reason="taken"} 5.0' in text
    assert 'tunneld_registry_invalid_records_total{reason="unclaimed"} 0.0' in text
    assert 'tunneld_registry_invalid_records_total{reason="refused"} 0.0' in text


def test_registry_peers_stay_out_of_the_reload_diff_and_static_peers_win():
    """RegistryBridge.changes on a fake worker: registry peers are added live but never enter cfg.peers, so a
    SIGHUP (service.Service.apply) that keeps the file's peers leaves them alone; a static peer's address in
    a record is not taken over, and the record leaving does not remove the static peer."""
    import dataclasses

    from tunneld.control.handlers import PeerControl
    from tunneld.control.membership import RegistryBridge
    from tunneld.runtime.daemon import Tunnel
    from tunneld.encap.vxlan import Vxlan
    from tunneld.runtime.service import Service
    from tunneld.testing import FakeDevice, FakeLink
    from tunneld.runtime.worker import Worker
    from tunneld.runtime.workers import Supervisor

    A, B, C = "192.0.2.2", "192.0.2.3", "192.0.2.4"
    w = Worker(0, FakeDevice(), FakeLink(A), Vxlan(7), dev="td0", max_frame=1450, offload=False,
               peers=[PeerSpec(A)], clock=lambda: 1000.0)
    t = Tunnel.__new__(Tunnel)  # a tunnel over a fake worker, as the control tests build one
    t.cfg, t.plan, t.workers, t.worker, t.supervisor = (
        TunnelConfig(peers=(PeerSpec(A),), dev="td0"), SimpleNamespace(vni=7, mtu=1450, codec=w.codec), 1, w, Supervisor())
    t.registry_stats = RegistryStats()
    bridge = RegistryBridge(t, PeerControl(t))
    bridge.changes((PeerSpec(B, macs=("02:00:00:00:00:0b",), source=REGISTRY),
                    PeerSpec(A, macs=("02:00:00:00:00:0a",), source=REGISTRY)), ())
    table = w.engine.peers
    assert table.get(B).spec.source == REGISTRY and table.get(A).spec.source == "static"
    assert [p.address for p in t.cfg.peers] == [A] and t.registry_stats.peers == 1
    service = Service(t)
    service.apply(dataclasses.replace(t.cfg, peers=(PeerSpec(A), PeerSpec(C))))  # a reload adding C
    assert {p.address for p in table.all} == {A, B, C}
    service.apply(dataclasses.replace(t.cfg, peers=(PeerSpec(A),)))  # and removing it again
    assert {p.address for p in table.all} == {A, B}
    bridge.changes((), (A, B))  # both records leave: the static A stays
    assert {p.address for p in table.all} == {A} and t.registry_stats.peers == 0


class FakeEtcd:
    """Just enough of an aetcd client for etcd.Registry's session, scripted by the test: the first ``fail``
    connections are refused; the first watch raises a compaction (``compact``); transactions compare and
    write as etcd does (Version and Mod compares, Get and Put ops); ``expire_lease()`` makes the next
    keepalive find our lease gone, and its keys with it, as etcd would after a partition longer than the TTL.
    One instance stands for the cluster (every endpoint's client is it)."""

    def __init__(self, fail: int = 0, others: list[tuple[bytes, bytes]] = (), compact: bool = True) -> None:
        from aetcd.client import Transactions

        self.transactions = Transactions()
        self.fail = fail
        self.connects = 0
        self.revision = 1
        self.kvs: dict[bytes, tuple[bytes, int, int]] = {}  # key → (value, lease, mod revision)
        for key, value in others:
            self.put(key, value)
        self.compact = compact
        self.watches = 0
        self.leases = 0
        self.expired: set[int] = set()
        self.revoked: list[int] = []
        self.events: asyncio.Queue | None = None

    def put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        self.revision += 1
        self.kvs[key] = (value, lease, self.revision)

    def expire_lease(self, lease_id: int) -> None:
        self.expired.add(lease_id)
        for key in [k for k, (_, lease, _) in self.kvs.items() if lease == lease_id]:
            del self.kvs[key]

    async def connect(self):
        self.connects += 1
        if self.connects <= self.fail:
            import aetcd.exceptions

            raise aetcd.exceptions.ConnectionFailedError("connection refused")

    async def lease(self, ttl):
        self.leases += 1
        return SimpleNamespace(id=41 + self.leases)

    async def get_lease_info(self, lease_id, keys=False):
        return SimpleNamespace(TTL=-1 if lease_id in self.expired else 3)

    async def refresh_lease(self, lease_id):
        return SimpleNamespace(TTL=0 if lease_id in self.expired else 3)

    async def revoke_lease(self, lease_id):
        self.revoked.append(lease_id)

    def _holds(self, compare) -> bool:
        from aetcd import rpc
        from aetcd.transactions import Mod, Version

        assert compare.op == rpc.Compare.EQUAL
        kv = self.kvs.get(compare.key)
        if isinstance(compare, Version):
            return (1 if kv else 0) == compare.value
        assert isinstance(compare, Mod)
        return (kv[2] if kv else 0) == compare.value

    async def transaction(self, compare, success=None, failure=None):
        from aetcd.transactions import Get, Put

        ok = all(self._holds(c) for c in compare)
        responses = []
        for op in (success if ok else failure) or ():
            if isinstance(op, Get):
                kv = self.kvs.get(op.key)
                responses.append([(kv[0], SimpleNamespace(lease=kv[1], mod_revision=kv[2]))] if kv else [])
            else:
                assert isinstance(op, Put)
                self.put(op.key, op.value, op.lease or 0)
                responses.append(None)
        return ok, responses

    async def get_prefix(self, prefix):
        return _Listing(SimpleNamespace(key=k, value=v[0]) for k, v in sorted(self.kvs.items()) if k.startswith(prefix))

    async def watch_prefix(self, prefix, start_revision=None):
        import aetcd.exceptions

        self.watches += 1
        if self.watches == 1 and self.compact:
            raise aetcd.exceptions.RevisionCompactedError(start_revision + 5)
        self.events = asyncio.Queue()
        events = self.events

        async def iterate():
            while True:
                yield await events.get()

        async def cancel():
            pass
        return _Watch(iterate, cancel)

    async def close(self):
        pass


class _Listing(list):
    header = SimpleNamespace(revision=10)


class _Watch:
    def __init__(self, iterate, cancel):
        self._iterate, self.cancel = iterate, cancel

    def __aiter__(self):
        return self._iterate()


def run_registry(fake: FakeEtcd, monkeypatch, caplog, until, timeout: float = 10.0):
    """A Registry on its thread against ``fake``, the test's loop as the data path's; ``until(registry,
    changes)`` is polled; then the registry is stopped. Returns (registry, changes delivered)."""
    from tunneld.control import etcd as registry_client

    monkeypatch.setattr(registry_client, "_client", lambda cfg, endpoint, timeout: fake)
    monkeypatch.setattr(registry_client, "BACKOFF_MIN", 0.05)
    cfg = RegistryConfig(("10.0.0.9:2379", "10.0.0.8:2379"), "/t", 3)
    rec = record("10.0.0.1", mac="02:00:00:00:00:01", overlay=("192.168.1.1/24",))
    changes = []

    async def main():
        stats = RegistryStats()
        reg = registry_client.Registry(cfg, rec, Membership(cfg.hosts_prefix(), rec.address, l2=True, mode="vxlan",
                                                            vni=7, stats=stats),
                                       loop=asyncio.get_running_loop(), deliver=lambda u, r: changes.append((u, r)),
                                       stats=stats)
        reg.start()
        deadline = time.monotonic() + timeout
        while not until(reg, changes) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.get_running_loop().run_in_executor(None, reg.stop)
        return reg

    with caplog.at_level(logging.INFO, logger="tunneld"):
        reg = asyncio.run(main())
    return reg, changes


def test_client_retries_quietly_resyncs_after_compaction_and_revokes_on_stop(monkeypatch, caplog):
    other = record("10.0.0.2")
    fake = FakeEtcd(fail=5, others=kvs(other))
    reg, changes = run_registry(fake, monkeypatch, caplog, lambda reg, ch: fake.events is not None and ch)
    assert fake.connects == 5 + 2  # five refusals, a session ended by the compaction, the session that watched
    downs = [r for r in caplog.records if r.getMessage().startswith("registry down")]
    assert len(downs) == 1, [r.getMessage() for r in caplog.records]  # once per change of state, not per attempt
    assert any("compacted; resyncing" in r.getMessage() for r in caplog.records)
    assert changes[0] == ((other.spec(True),), ())  # the listing, handed over once: the resync found no change
    assert b"/t/hosts/10.0.0.1" in fake.kvs and fake.revoked == [42]
    assert reg.registered.is_set() and reg.refused is None


def test_client_refuses_a_duplicate_overlay_address_before_writing(monkeypatch, caplog):
    clash = record("10.0.0.2", overlay=("192.168.1.1/24",))
    fake = FakeEtcd(others=kvs(clash))
    reg, changes = run_registry(fake, monkeypatch, caplog, lambda reg, ch: reg.refused is not None)
    assert reg.refused == ("registry: overlay address 192.168.1.1 is already registered by host 10.0.0.2 "
                           "(key /t/claims/vxlan-7/overlay/192.168.1.1); refusing a duplicate overlay address")
    assert b"/t/hosts/10.0.0.1" not in fake.kvs and changes == [] and not reg.registered.is_set()


def test_a_peer_change_that_fails_unexpectedly_costs_that_host_only():
    """A bug in one live change (anything add_peer raises) is logged and counted as refused; the hosts after it
    still become peers."""
    from tunneld.control.handlers import PeerControl
    from tunneld.control.membership import RegistryBridge
    from tunneld.runtime.daemon import Tunnel
    from tunneld.encap.vxlan import Vxlan
    from tunneld.testing import FakeDevice, FakeLink
    from tunneld.runtime.worker import Worker
    from tunneld.runtime.workers import Supervisor

    A, B, C = "192.0.2.2", "192.0.2.3", "192.0.2.4"
    w = Worker(0, FakeDevice(), FakeLink(A), Vxlan(7), dev="td0", max_frame=1450, offload=False,
               peers=[PeerSpec(A)], clock=lambda: 1000.0)
    t = Tunnel.__new__(Tunnel)
    t.cfg, t.plan, t.workers, t.worker, t.supervisor = (
        TunnelConfig(peers=(PeerSpec(A),), dev="td0"), SimpleNamespace(vni=7, mtu=1450, codec=w.codec), 1, w, Supervisor())
    t.registry_stats = RegistryStats()
    control = PeerControl(t)
    real = control.add_peer

    def add_peer(spec):
        if spec.address == B:
            raise RuntimeError("a bug")
        return real(spec)

    control.add_peer = add_peer
    RegistryBridge(t, control).changes((PeerSpec(B, source=REGISTRY), PeerSpec(C, source=REGISTRY)), ())
    assert {p.address for p in w.engine.peers.all} == {A, C}
    assert t.registry_stats.invalid["refused"] == 1 and t.registry_stats.peers == 1


def test_a_stop_before_the_registry_thread_has_its_loop_is_not_lost(monkeypatch):
    """stop() may come before the thread has made its loop and event (a SIGTERM at start-up): the thread must
    still end at once rather than go on to register."""
    from tunneld.control import etcd as registry_client

    fake = FakeEtcd()
    monkeypatch.setattr(registry_client, "_client", lambda cfg, endpoint, timeout: fake)
    cfg = RegistryConfig(("10.0.0.9:2379",), "/t", 3)
    rec = record("10.0.0.1", mac="02:00:00:00:00:01")
    stats = RegistryStats()
    reg = registry_client.Registry(cfg, rec, Membership(cfg.hosts_prefix(), rec.address, l2=True, mode="vxlan",
                                                        vni=7, stats=stats),
                                   loop=None, deliver=lambda u, r: None, stats=stats)
    reg.stop()  # before start(): nothing runs yet
    reg.start()
    reg._thread.join(5)
    assert not reg._thread.is_alive() and fake.connects == 0 and not reg.registered.is_set()


# -- claims (issue 22): the holder in etcd wins, on every host alike -------------------------------------------


def test_a_record_claiming_another_hosts_overlay_address_is_no_peer_and_is_counted():
    """The probe's record: a bare record (written around the transaction) whose overlay address is host
    10.0.0.2's. On main it became a peer, uncounted."""
    m = membership()
    genuine = record("10.0.0.2")
    assert put(m, genuine) == ((genuine.spec(True),), ())
    squatter = record("10.0.0.9", mac="02:00:00:00:00:09", overlay=genuine.overlay)
    assert m.put(PREFIX + b"10.0.0.9", squatter.encode()) == ((), ())
    assert m.stats.invalid["unclaimed"] == 1 and set(m.specs) == {"10.0.0.2"}
    # Holding its own claims but not the overlay address (another holds it): "taken", still no peer.
    assert m.apply([(CLAIMS_PREFIX + b"underlay/10.0.0.9", b"10.0.0.9"),
                    (CLAIMS_PREFIX + b"vxlan-7/mac/02:00:00:00:00:09", b"10.0.0.9")]) == ((), ())
    assert m.stats.invalid["taken"] == 1 and set(m.specs) == {"10.0.0.2"}
    assert m.refused[PREFIX + b"10.0.0.9"] == ("taken", "its overlay address 192.168.1.2 is held by host 10.0.0.2")


def test_a_record_claiming_our_own_mac_is_not_our_peer_either():
    """The probe's other record: our MAC, refused by the others but taken as a peer by us on main. Our own
    claims are in etcd like anyone's: the record does not hold our MAC, so it is no peer here either."""
    m = membership()
    us = record("10.0.0.1", mac="02:00:00:00:00:01", overlay=("192.168.1.1/24",))
    assert m.apply(kvs(us)) == ((), ())  # our own record: not a peer, not counted
    thief = record("10.0.0.9", mac=us.mac, overlay=("192.168.1.9/24",))
    thief_claims = [kv for kv in kvs(thief) if b"/mac/" not in kv[0]]  # all but the MAC, which is ours
    assert m.apply(thief_claims) == ((), ())
    assert m.stats.invalid["taken"] == 1 and m.specs == {} and sum(m.stats.invalid.values()) == 1


def test_every_host_settles_a_conflict_the_same_way_whatever_the_order_it_saw():
    """Two records want one overlay address; the claim names 10.0.0.3. Hosts that saw the keys in different
    orders (or in one listing) agree: 10.0.0.3 is the peer, 10.0.0.2 is "taken"; when the holder leaves (its
    lease takes record and claims), 10.0.0.2 stays refused until it claims the address itself."""
    a = record("10.0.0.2", overlay=("192.168.1.5/24",))
    b = record("10.0.0.3", mac="02:00:00:00:00:03", overlay=("192.168.1.5/24",))
    claims_b = [kv for kv in kvs(b) if kv[0].startswith(CLAIMS_PREFIX)]
    claims_a = [kv for kv in kvs(a) if kv[0].startswith(CLAIMS_PREFIX) and b"/overlay/" not in kv[0]]
    everything = [*claims_a, *claims_b, (PREFIX + b"10.0.0.2", a.encode()), (PREFIX + b"10.0.0.3", b.encode())]
    results = []
    for order in (everything, everything[::-1], sorted(everything)):
        m = membership()
        for kv in order:
            m.apply([kv])
        results.append((set(m.specs), dict(m.refused)))
    listed = membership()
    listed.resync(everything)
    results.append((set(listed.specs), dict(listed.refused)))
    assert all(r == results[0] for r in results)
    assert results[0][0] == {"10.0.0.3"} and results[0][1][PREFIX + b"10.0.0.2"][0] == "taken"
    # The holder leaves: its keys go in one revision.
    gone = [(k, None) for k, _ in claims_b] + [(PREFIX + b"10.0.0.3", None)]
    assert listed.apply(gone) == ((), ("10.0.0.3",))
    assert listed.refused[PREFIX + b"10.0.0.2"][0] == "unclaimed" and listed.specs == {}
    assert listed.apply([(CLAIMS_PREFIX + b"vxlan-7/overlay/192.168.1.5", b"10.0.0.2")]) == ((a.spec(True),), ())


def test_a_verdict_is_counted_once_not_once_per_listing():
    m = membership()
    junk = [(PREFIX + b"10.0.0.7", b"not json"), (PREFIX + b"10.0.0.8", record("10.0.0.8").encode())]
    for _ in range(3):  # three reconnections, three listings of the same junk
        m.resync(junk)
    assert m.stats.invalid["json"] == 1 and m.stats.invalid["unclaimed"] == 1
    m.resync([])  # gone, and back: counted again
    m.resync(junk)
    assert m.stats.invalid["json"] == 2


def test_a_claim_that_goes_removes_the_peer_and_a_record_judged_with_its_claims_is_not_counted():
    m = membership()
    rec = record("10.0.0.2")
    assert m.apply(kvs(rec)) == ((rec.spec(True),), ())  # record and claims in one revision
    assert sum(m.stats.invalid.values()) == 0
    assert m.apply([(CLAIMS_PREFIX + b"vxlan-7/mac/02:00:00:00:00:02", None)]) == ((), ("10.0.0.2",))
    assert m.refused[PREFIX + b"10.0.0.2"] == ("unclaimed", "its MAC 02:00:00:00:00:02 is held by no one")


def test_junk_cannot_fill_max_peers_ahead_of_a_genuine_host_and_is_told_in_one_line():
    """More bare records than MAX_PEERS, then a genuine host: only the genuine host is handed to the tunnel,
    the junk is counted, and the warning says how many and why, once per interval however many there are."""
    from tunneld.config.schema import MAX_PEERS

    m = membership()
    n = MAX_PEERS + 100
    junk = [(PREFIX + f"10.1.{i >> 8}.{i & 255}".encode(),
             record(f"10.1.{i >> 8}.{i & 255}", mac=f"02:00:00:01:{i >> 8:02x}:{i & 255:02x}",
                    overlay=()).encode()) for i in range(n)]
    assert m.resync(junk) == ((), ())
    genuine = record("10.0.0.2")
    assert m.apply(kvs(genuine)) == ((genuine.spec(True),), ())
    assert m.stats.invalid["unclaimed"] == n
    line = m.refusals.line(now=1000.0)
    assert line.startswith(f"registry: {n} records not made peers: {n} unclaimed (e.g. 10.1.0.0: its underlay "
                           "address 10.1.0.0 is held by no one)")
    assert m.refusals.line(now=1001.0) is None  # nothing new


def test_refusals_are_told_at_once_then_at_most_once_per_interval():
    r = Refusals(interval=60)
    assert r.line(0.0) is None
    r.note("unclaimed", "10.0.0.7", "its underlay address 10.0.0.7 is held by no one")
    assert r.line(5.0) == ("registry: 1 record not made peers: 1 unclaimed (e.g. 10.0.0.7: its underlay address "
                           "10.0.0.7 is held by no one) (tunneld_registry_invalid_records_total; at most one such "
                           "line per 60 s)")
    for i in range(1000):
        r.note("taken", f"10.0.1.{i % 250}", "its MAC 02:00:00:00:00:01 is held by host 10.0.0.1")
    r.note("foreign", "10.0.0.9", "gretap vni None")  # another overlay sharing the prefix: no one's mistake
    assert r.line(30.0) is None  # within the minute: held back
    line = r.line(65.0)
    assert line.startswith("registry: 1000 records not made peers: 1000 taken (e.g. 10.0.1.0: its MAC")
    assert r.line(200.0) is None


def test_claim_kinds_are_a_declared_list_and_a_new_kind_is_one_more_entry(monkeypatch):
    """The claims follow CLAIM_KINDS: a record claims one key per value of each kind (the tunnel's kinds
    scoped to mode and VNI), and a kind added to the list is claimed, and required, with no other change."""
    assert [k.name for k in CLAIM_KINDS] == ["underlay", "overlay", "mac", "key"]  # key: wireguard records only
    rec = record("10.0.0.2", overlay=("192.168.1.2/24", "fd00::2/64"))
    assert [c.path for c in rec.claims()] == [b"underlay/10.0.0.2", b"vxlan-7/overlay/192.168.1.2",
                                              b"vxlan-7/overlay/fd00::2", b"vxlan-7/mac/02:00:00:00:00:02"]
    name_kind = registry_module.ClaimKind("name", "peer name", True, lambda r: (f"n-{r.address}",))
    monkeypatch.setattr(registry_module, "CLAIM_KINDS", (*CLAIM_KINDS, name_kind))
    assert rec.claims()[-1].path == b"vxlan-7/name/n-10.0.0.2"
    m = membership()
    without_name = [kv for kv in kvs(rec) if b"/name/" not in kv[0]]
    assert m.apply(without_name) == ((), ())
    assert m.refused[PREFIX + b"10.0.0.2"] == ("unclaimed", "its peer name n-10.0.0.2 is held by no one")


def test_a_claim_taken_while_away_is_named_at_every_retry_and_the_host_returns_when_it_is_free(monkeypatch, caplog):
    """After registering, our lease expires (a partition longer than the TTL: etcd drops our record and
    claims) and another host claims our overlay address meanwhile. Every retry says so, naming it; when it
    leaves, we claim again by ourselves."""
    fake = FakeEtcd(compact=False)
    holder = record("10.0.0.7", mac="02:00:00:00:00:07", overlay=("192.168.1.1/24",))
    state = {"phase": 0}

    def until(reg, changes):
        said = [r for r in caplog.records if "is already registered by host 10.0.0.7" in r.getMessage()]
        if state["phase"] == 0 and reg.registered.is_set() and fake.events is not None:
            state["phase"] = 1
            fake.expire_lease(reg.lease_id)
            for key, value in kvs(holder):
                fake.put(key, value, lease=99)
        elif state["phase"] == 1 and len(said) >= 3:
            state["phase"] = 2
            fake.expire_lease(99)
        state["back"] = state["phase"] == 2 and reg.stats.up
        return state["back"]
    reg, _ = run_registry(fake, monkeypatch, caplog, until, timeout=15)
    said = [r for r in caplog.records if "is already registered by host 10.0.0.7" in r.getMessage()]
    assert len(said) >= 3 and all(r.levelno == logging.WARNING and "retrying in" in r.getMessage() for r in said)
    assert said[0].getMessage().startswith("registry: overlay address 192.168.1.1 is already registered by host "
                                           "10.0.0.7 (key /t/claims/vxlan-7/overlay/192.168.1.1); not registered")
    assert reg.refused is None and state["back"]
    assert fake.kvs[b"/t/claims/vxlan-7/overlay/192.168.1.1"][0] == b"10.0.0.1"
    assert any(r.getMessage().startswith("registry up") for r in caplog.records if r.created > said[-1].created)


def test_a_hosts_record_and_claims_in_one_watch_response_are_judged_together(monkeypatch, caplog):
    """A join is one transaction: its claims and record arrive in one watch response and must be judged
    together, never the record alone ("unclaimed", counted and told for nothing)."""
    from aetcd.rtypes import EventKind

    fake = FakeEtcd(compact=False)
    joiner = record("10.0.0.5", mac="02:00:00:00:00:05", overlay=("192.168.1.5/24",))
    sent = {"done": False}

    def until(reg, changes):
        if not sent["done"] and fake.events is not None:
            sent["done"] = True
            events = [SimpleNamespace(kind=EventKind.PUT, kv=SimpleNamespace(key=k, value=v, lease=77))
                      for k, v in reversed(kvs(joiner))]  # the record first: the worst order
            reg._own_loop.call_soon_threadsafe(lambda: [fake.events.put_nowait(e) for e in events])
        return bool(changes)
    reg, changes = run_registry(fake, monkeypatch, caplog, until)
    assert changes == [((joiner.spec(True),), ())]
    assert sum(reg.stats.invalid.values()) == 0


def test_a_record_over_our_key_holding_no_claim_is_taken_over_but_a_live_daemons_is_refused(monkeypatch, caplog):
    """A record under our key with another owner: refused as a duplicate when its underlay claim is held
    (another live daemon has our address), taken over when no one holds it (junk: no one's peer anyway)."""
    squatter = record("10.0.0.1", mac="02:00:00:00:00:0f", overlay=(), owner="someone-else")
    fake = FakeEtcd(others=[(b"/t/hosts/10.0.0.1", squatter.encode())], compact=False)
    reg, _ = run_registry(fake, monkeypatch, caplog, lambda reg, ch: reg.registered.is_set() or reg.refused)
    assert reg.refused is None and reg.registered.is_set()
    assert json.loads(fake.kvs[b"/t/hosts/10.0.0.1"][0])["owner"] == "o"
    assert any("holds no claim" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

    fake = FakeEtcd(others=kvs(squatter), compact=False)
    reg, _ = run_registry(fake, monkeypatch, caplog, lambda reg, ch: reg.registered.is_set() or reg.refused)
    assert reg.refused == ("registry: 10.0.0.1 is already registered by another live daemon (key /t/hosts/10.0.0.1); "
                           "refusing a duplicate underlay address")


def test_a_junk_key_cannot_forge_a_log_line():
    m = membership()
    m.put(PREFIX + b"10.0.0.7\n2026-01-01 ERROR forged", b"not json")
    line = m.refusals.line(now=0.0)
    assert "\n" not in line and "'10.0.0.7\\n2026-01-01 ERROR forged'" in line
