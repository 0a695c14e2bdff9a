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
from tunneld.control.registry import (
    DEFAULT_PREFIX,
    DEFAULT_TTL,
    INVALID_REASONS,
    InvalidRecord,
    Membership,
    Record,
    RegistryConfig,
    RegistryError,
    RegistryStats,
    check_registry,
    decode,
    owner_id,
    parse_url,
)
from tunneld.testbed import TUNNELD

PREFIX = b"/t/hosts/"


def record(address="10.0.0.2", **kw) -> Record:
    values = dict(mode="vxlan", vni=7, mac="02:00:00:00:00:02", overlay=("192.168.1.2/24",), version="1",
                  started=1.0, owner="o")
    values.update(kw)
    return Record(address, **values)


def put(m: Membership, rec: Record):
    return m.put(PREFIX + rec.address.encode(), rec.encode())


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
    a, b = record("10.0.0.2"), record("10.0.0.3", mac="02:00:00:00:00:03")
    c = record("10.0.0.4", mac="02:00:00:00:00:04")
    kv = lambda r: (PREFIX + r.address.encode(), r.encode())  # noqa: E731
    assert m.resync([kv(a), kv(b)]) == ((a.spec(True), b.spec(True)), ())
    b2 = record("10.0.0.3", mac="02:00:00:00:00:33")
    assert m.resync([kv(b2), kv(c)]) == ((b2.spec(True), c.spec(True)), ("10.0.0.2",))


def test_owner_is_stable_per_machine_namespace_and_device():
    assert owner_id("t0", machine_id=b"m", netns="net:[1]") == owner_id("t0", machine_id=b"m", netns="net:[1]")
    assert owner_id("t0", machine_id=b"m", netns="net:[1]") != owner_id("t0", machine_id=b"m", netns="net:[2]")
    assert owner_id("t0", machine_id=b"m", netns="net:[1]") != owner_id("t1", machine_id=b"m", netns="net:[1]")


def test_registry_metrics():
    stats = RegistryStats(up=True, peers=3)
    stats.invalid["json"] = 2
    reg = CollectorRegistry()
    reg.register(RegistryCollector(stats))
    text = generate_latest(reg).decode()
    assert "tunneld_registry_up 1.0" in text and "tunneld_registry_peers 3.0" in text
    assert 'tunneld_registry_invalid_records_total{reason="json"} 2.0' in text
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
    """Just enough of an aetcd client for registry_client.Registry's session, scripted by the test: the first
    ``fail`` connections are refused; the first watch raises a compaction; puts and revocations are recorded.
    One instance stands for the cluster (every endpoint's client is it)."""

    def __init__(self, fail: int = 0, others: list[tuple[bytes, bytes]] = ()) -> None:
        from aetcd.client import Transactions

        self.transactions = Transactions()
        self.fail = fail
        self.connects = 0
        self.kvs = dict(others)
        self.watches = 0
        self.revoked: list[int] = []
        self.events: asyncio.Queue | None = None

    async def connect(self):
        self.connects += 1
        if self.connects <= self.fail:
            import aetcd.exceptions

            raise aetcd.exceptions.ConnectionFailedError("connection refused")

    async def lease(self, ttl):
        return SimpleNamespace(id=42)

    async def get_lease_info(self, lease_id, keys=False):
        return SimpleNamespace(TTL=3)

    async def refresh_lease(self, lease_id):
        return SimpleNamespace(TTL=3)

    async def revoke_lease(self, lease_id):
        self.revoked.append(lease_id)

    async def transaction(self, compare, success=None, failure=None):
        for op in success or ():
            self.kvs[op.key] = op.value
        return True, []

    async def get_prefix(self, prefix):
        return _Listing(SimpleNamespace(key=k, value=v) for k, v in sorted(self.kvs.items()))

    async def watch_prefix(self, prefix, start_revision=None):
        import aetcd.exceptions

        self.watches += 1
        if self.watches == 1:
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
    fake = FakeEtcd(fail=5, others=[(b"/t/hosts/10.0.0.2", other.encode())])
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
    fake = FakeEtcd(others=[(b"/t/hosts/10.0.0.2", clash.encode())])
    reg, changes = run_registry(fake, monkeypatch, caplog, lambda reg, ch: reg.refused is not None)
    assert reg.refused == ("registry: overlay address 192.168.1.1 is already registered by host 10.0.0.2; "
                           "refusing a duplicate overlay address")
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
