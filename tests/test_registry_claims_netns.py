"""Claims in etcd against a real cluster (issue 22, "Registry: one record can cut a host out for good").

A segment of six namespace hosts; hosts 0-2 run a 3-member etcd cluster (made once for the module), hosts 3-5
run daemons (made per test, each test under its own prefix, so that the tests do not see each other's keys).
Host 5 is the one the probe cut out: it is partitioned from etcd by blackhole routes to the members (its
tunnel to hosts 3 and 4 stays up), for longer than its lease's TTL.

What the probe found, one test each:
  - a record claiming a host's overlay address became a peer on the others, uncounted; one claiming a host's
    MAC was taken as a peer by that host itself;
  - after a partition longer than the TTL, the host never came back (a silent duplicate, forever);
  - a host whose claim is taken says nothing but "registry down: Deadline Exceeded";
  - junk records can fill MAX_PEERS ahead of genuine hosts, without a line an operator would see.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import threading
import time

import pytest

from tunneld.testbed import UNOWNED_V4, Tunneld, segment
from tunneld.testbed.etcd import etcd_cluster

pytestmark = pytest.mark.netns

TTL = 3
VNI = 77
SCOPE = f"vxlan-{VNI}"  # the claims of one tunnel: PREFIX/claims/vxlan-77/overlay/..., .../mac/...
HEAL_BOUND = 20.0  # seconds from the partition's end to the host reachable again: the backoff (8 s at most) twice


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with segment(6) as hosts, etcd_cluster(hosts[:3], tmp_path_factory.mktemp("etcd")) as etcd:
        yield hosts, etcd


def start(host, url: str, wait: bool = True) -> Tunneld:
    return Tunneld(host, "--mode", "vxlan", "--vni", str(VNI), "--registry", url, "--registry-ttl", str(TTL),
                   "--address", f"{host.overlay}/24", "--metrics-listen", "", wait=wait)


class LogTail:
    """A daemon's log lines as they come (its stdout read on a thread), to wait on a line while it runs."""

    def __init__(self, daemon: Tunneld) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=lambda: self.lines.extend(daemon.proc.stdout), daemon=True)
        self._thread.start()

    def having(self, text: str) -> list[str]:
        return [line for line in list(self.lines) if text in line]


@contextlib.contextmanager
def daemons(hosts, url: str):
    """A daemon on each host, with its log followed; all stopped (killed if need be) on exit."""
    started = []
    try:
        for h in hosts:
            d = start(h, url)
            started.append((d, LogTail(d)))
        yield started
    finally:
        for d, _ in started:
            with contextlib.suppress(Exception):
                d.stop()


def wait_for(predicate, timeout: float, step: float = 0.2, what: str = "") -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not true within {timeout} s: {what}")
        time.sleep(step)
    return time.monotonic() - t0


def reachable(src, dst: str) -> bool:
    return src.run("ping", "-c", "1", "-W", "1", dst, check=False, timeout=5).returncode == 0


def wait_reachable(pairs, bound: float) -> float:
    return wait_for(lambda: all(reachable(s, d) for s, d in pairs), bound, step=0.1,
                    what=f"pings {[(s.name, d) for s, d in pairs]}")


def peers(daemon: Tunneld) -> set[str]:
    return {p["address"] for p in daemon.show()["peers"]}


def junk(address: str, overlay: str | None, mac: str) -> str:
    return json.dumps({"address": address, "mode": "vxlan", "vni": VNI, "mac": mac,
                       "overlay": [f"{overlay}/24"] if overlay else [], "version": "x", "started": 1})


def record_of(etcd, prefix: str, host) -> dict | None:
    kvs = json.loads(etcd.etcdctl("get", f"{prefix}/hosts/{host.underlay}", "-w", "json").stdout).get("kvs", [])
    return kvs[0] if kvs else None


@contextlib.contextmanager
def partitioned(host, etcd):
    """``host`` cannot reach any etcd member (blackhole routes to them); its tunnel peers stay reachable."""
    members = [f"{m.underlay}/32" for m in etcd.hosts]
    for m in members:
        host.run("ip", "route", "add", "blackhole", m)
    try:
        yield
    finally:
        for m in members:
            host.run("ip", "route", "del", "blackhole", m, check=False)


def wait_expired(etcd, prefix: str, host) -> None:
    """Until the host's record is gone from etcd: its lease expired while it was cut off."""
    wait_for(lambda: record_of(etcd, prefix, host) is None, TTL + 10, what=f"{host.underlay}'s record expired")


def test_records_claiming_a_hosts_overlay_address_or_mac_are_no_ones_peer_and_are_counted(cluster):
    hosts, etcd = cluster
    prefix = "/c22a"
    a, b, c = hosts[3:6]
    with daemons((a, b, c), etcd.url(prefix)) as ds:
        wait_reachable([(s, d.overlay) for s in (a, b, c) for d in (a, b, c) if s is not d], 10)
        # Each join (record and claims in one transaction) was judged whole: nothing counted for nothing.
        assert all(sum(d.show()["registry"]["invalid_records"].values()) == 0 for d, _ in ds)
        mac_a = next(p for p in ds[1][0].show()["peers"] if p["address"] == a.underlay)["macs"][0]
        # J1: a bare record (no claims) whose overlay address is host c's. J2: a record holding its own underlay
        # claim, whose MAC is host a's.
        j1, j2 = UNOWNED_V4[0], UNOWNED_V4[1]
        etcd.etcdctl("put", f"{prefix}/hosts/{j1}", junk(j1, c.overlay, "02:00:00:00:22:01"))
        etcd.etcdctl("put", f"{prefix}/claims/underlay/{j2}", j2)
        etcd.etcdctl("put", f"{prefix}/hosts/{j2}", junk(j2, None, mac_a))

        def counted(d) -> bool:
            invalid = d.show()["registry"]["invalid_records"]
            return invalid.get("unclaimed", 0) >= 1 and invalid.get("taken", 0) >= 1

        for d, _ in ds:  # every host the same way, the MAC's and the overlay address's owners included
            wait_for(lambda d=d: counted(d), 5, what=f"{d.host.name} counts J1 unclaimed and J2 taken: "
                                                    f"{d.show()['registry']['invalid_records']}")
        for d, h in zip((d for d, _ in ds), (a, b, c)):
            assert peers(d) == {x.underlay for x in (a, b, c)} - {h.underlay}, (h.name, peers(d))
            invalid = d.show()["registry"]["invalid_records"]
            assert invalid["unclaimed"] == 1 and invalid["taken"] == 1 and sum(invalid.values()) == 2, invalid
        wait_reachable([(s, d.overlay) for s in (a, b, c) for d in (a, b, c) if s is not d], 5)
        # The first refusal is told at once, naming the record and why.
        for _, tail in ds:
            wait_for(lambda tail=tail: tail.having(f"not made peers: 1 unclaimed (e.g. {j1}: its underlay "
                                                   f"address {j1} is held by no one)"), 5,
                     what=f"a warning about {j1}: {tail.lines[-5:]}")


def test_a_partition_longer_than_the_ttl_heals_by_itself(cluster):
    """The probe's sequence: a bare record claiming host c's overlay address sits in etcd; c is cut off from
    etcd for longer than its TTL; when the partition ends, c registers again and every host reaches it, and a
    restart of c is not refused as a duplicate."""
    hosts, etcd = cluster
    prefix = "/c22b"
    a, b, c = hosts[3:6]
    url = etcd.url(prefix)
    with daemons((a, b, c), url) as ds:
        pairs = [(s, d.overlay) for s in (a, b, c) for d in (a, b, c) if s is not d]
        wait_reachable(pairs, 10)
        j1 = UNOWNED_V4[2]
        etcd.etcdctl("put", f"{prefix}/hosts/{j1}", junk(j1, c.overlay, "02:00:00:00:22:02"))
        old_lease = record_of(etcd, prefix, c)["lease"]
        with partitioned(c, etcd):
            wait_expired(etcd, prefix, c)
            wait_for(lambda: all(c.underlay not in peers(d) for d, _ in ds[:2]), 5, what="c left a and b")
        healed = wait_reachable([(a, c.overlay), (b, c.overlay), (c, a.overlay), (c, b.overlay)], HEAL_BOUND)
        print(f"healed {healed:.1f} s after the partition ended")
        assert record_of(etcd, prefix, c)["lease"] != old_lease
        assert all(c.underlay in peers(d) for d, _ in ds[:2])
        # A restart is not refused as a duplicate either.
        assert ds[2][0].stop() == 0
        again = start(c, url)
        ds[2] = (again, LogTail(again))
        wait_for(lambda: again.show()["registry"]["up"], 10, what="c registered after a restart")
        wait_reachable([(a, c.overlay), (b, c.overlay)], 10)


def test_a_host_whose_claim_was_taken_names_the_holder_at_every_retry_and_returns_when_it_leaves(cluster):
    hosts, etcd = cluster
    prefix = "/c22c"
    a, b, c = hosts[3:6]
    with daemons((a, b, c), etcd.url(prefix)) as ds:
        wait_reachable([(s, d.overlay) for s in (a, b, c) for d in (a, b, c) if s is not d], 10)
        holder = UNOWNED_V4[3]
        with partitioned(c, etcd):
            wait_expired(etcd, prefix, c)
            # While c is away, another record takes c's overlay address, the way a daemon would: its claims
            # under a lease of its own.
            lease = etcd.etcdctl("lease", "grant", "120").stdout.split()[1]
            for key, value in ((f"claims/underlay/{holder}", holder),
                               (f"claims/{SCOPE}/overlay/{c.overlay}", holder),
                               (f"claims/{SCOPE}/mac/02:00:00:00:22:03", holder),
                               (f"hosts/{holder}", junk(holder, c.overlay, "02:00:00:00:22:03"))):
                etcd.etcdctl("put", "--lease", lease, f"{prefix}/{key}", value)
        said = f"overlay address {c.overlay} is already registered by host {holder}"
        tail = ds[2][1]
        wait_for(lambda: len(tail.having(said)) >= 2, 30, what=f"two retries naming {holder}: {tail.lines[-5:]}")
        assert all("retrying" in line for line in tail.having(said))
        # The holder wins on every host: it is a peer, c is not.
        for d, _ in ds[:2]:
            assert holder in peers(d) and c.underlay not in peers(d)
        etcd.etcdctl("lease", "revoke", lease)
        wait_reachable([(a, c.overlay), (b, c.overlay), (c, a.overlay)], HEAL_BOUND)
        assert tail.having("registry up")


JUNK_RECORDS = 4200  # more than MAX_PEERS (4096)

WRITE_JUNK = """
import asyncio, json, sys
import aetcd

async def main(endpoint, prefix, n, vni):
    host, port = endpoint.rsplit(":", 1)
    async with aetcd.Client(host, int(port), timeout=30) as client:
        for i in range(n):
            address = f"10.232.{i // 250}.{i % 250 + 1}"
            record = {"address": address, "mode": "vxlan", "vni": vni, "mac": f"02:00:00:01:{i >> 8:02x}:{i & 255:02x}",
                      "overlay": [], "version": "x", "started": 1}
            await client.put(f"{prefix}/hosts/{address}".encode(), json.dumps(record).encode())

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


def test_junk_records_cannot_fill_max_peers_ahead_of_a_genuine_host_unseen(cluster):
    hosts, etcd = cluster
    prefix = "/c22d"
    a, b = hosts[3:5]
    with daemons((a,), etcd.url(prefix)) as ds:
        d, tail = ds[0]
        etcd.hosts[0].run(sys.executable, "-c", WRITE_JUNK, f"{etcd.hosts[0].underlay}:2379", prefix,
                          str(JUNK_RECORDS), str(VNI), timeout=120)
        with daemons((b,), etcd.url(prefix)):
            wait_reachable([(a, b.overlay), (b, a.overlay)], 15)
        wait_for(lambda: d.show()["registry"]["invalid_records"].get("unclaimed", 0) >= JUNK_RECORDS, 20,
                 what=f"{JUNK_RECORDS} unclaimed records counted: {d.show()['registry']['invalid_records']}")
        assert d.show()["registry"]["peers"] <= 1
        # An operator sees it: one warning at once, the rest summed up later (at most one a minute).
        wait_for(lambda: tail.having("not made peers: 1 unclaimed (e.g. 10.232.0.1: its underlay address "
                                     "10.232.0.1 is held by no one)"), 5, what=f"the warning: {tail.lines[-5:]}")


def test_a_record_written_over_a_hosts_own_key_is_taken_back(cluster):
    """A plain put over host c's own record (another owner, no lease, no claims): c holds the underlay claim,
    so c takes its key back, and the others keep c with its own MAC. On main c resynced into a silent
    duplicate for good, and the others took the squatter's MAC for c's."""
    hosts, etcd = cluster
    prefix = "/c22e"
    a, b, c = hosts[3:6]
    with daemons((a, b, c), etcd.url(prefix)) as ds:
        wait_reachable([(s, d.overlay) for s in (a, b, c) for d in (a, b, c) if s is not d], 10)
        mac_c = next(p for p in ds[0][0].show()["peers"] if p["address"] == c.underlay)["macs"]
        etcd.etcdctl("put", f"{prefix}/hosts/{c.underlay}", junk(c.underlay, c.overlay, "02:00:00:00:22:05"))

        def restored() -> bool:
            kv = record_of(etcd, prefix, c)
            return kv is not None and kv.get("lease", 0) != 0 and json.loads(base64.b64decode(kv["value"])).get("owner")

        wait_for(restored, 10, what=f"c's record back: {record_of(etcd, prefix, c)}")
        for d, _ in ds[:2]:
            wait_for(lambda d=d: next(p for p in d.show()["peers"] if p["address"] == c.underlay)["macs"] == mac_c,
                     5, what=f"{d.host.name} keeps c's own MAC")
        assert ds[2][1].having("holds no claim")
        wait_reachable([(a, c.overlay), (b, c.overlay)], 5)
