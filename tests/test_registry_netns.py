"""The registry against a real etcd cluster (issue 13): hosts that know each other only through etcd.

A segment of six namespace hosts; hosts 0-2 also run a 3-member etcd cluster. Daemons run with a 3 s lease
(``TTL``) so that a leave is seen quickly. One test walks the whole story (the cluster and five daemons are
the expensive part, so they are made once): join, all pairs, one member killed, leave, duplicates refused,
garbage counted, every member killed while data moves, etcd back and a new host joins. The TLS test has a
one-member cluster of its own.

Durations: the "all members killed" phase moves sha256-checked data for ``OUTAGE_SECONDS`` (30 s, as issue 13
asks: long enough for every daemon's lease to have expired and its client to have retried several times; the
whole file takes about 80 s).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time

import pytest

from tunneld.testbed import TUNNELD, Tunneld, segment, transfer
from tunneld.testbed.etcd import etcd_cluster

pytestmark = pytest.mark.netns

TTL = 3
VNI = 77
PREFIX = "/t13"
OUTAGE_SECONDS = 30
JOIN_BOUND = 2.0
LEAVE_BOUND = TTL + 2.0
REJOIN_BOUND = 5.0


def start(host, url: str, *extra: str, wait: bool = True) -> Tunneld:
    return Tunneld(host, "--mode", "vxlan", "--vni", str(VNI), "--registry", url, "--registry-ttl", str(TTL),
                   "--address", f"{host.overlay}/24", "--metrics-listen", "", *extra, wait=wait)


def pings(pairs, timeout: float = 1) -> list[tuple]:
    """One ping per (source host, destination address), all at once; the pairs that got no reply."""
    procs = [(src, dst, src.popen("ping", "-c", "1", "-W", str(timeout), dst)) for src, dst in pairs]
    failed = []
    for src, dst, proc in procs:
        if proc.wait(timeout=timeout + 5) != 0:
            failed.append((src.name, dst))
    return failed


def wait_reachable(pairs, bound: float) -> float:
    """Seconds until every pair pings (repeating the ones that did not), or raise after ``bound`` + 5 s."""
    t0 = time.monotonic()
    left = list(pairs)
    while left:
        failed = set(pings(left, timeout=0.5))
        left = [(s, d) for s, d in left if (s.name, d) in failed]
        if left and time.monotonic() - t0 > bound + 5:
            raise AssertionError(f"not reachable after {time.monotonic() - t0:.1f} s: {failed}")
    return time.monotonic() - t0


def peer_addresses(daemon: Tunneld) -> set[str]:
    return {p["address"] for p in daemon.show()["peers"]}


def peer_lists(daemons) -> list[set[str]]:
    """Every daemon's peer addresses, the ``tunneld show --json`` clients run at once (each is a Python start)."""
    procs = [d.host.popen(TUNNELD, "show", d.dev, "--json", "--runtime-dir", d.runtime_dir, stderr=subprocess.DEVNULL)
             for d in daemons]
    return [{p["address"] for p in json.loads(proc.communicate(timeout=20)[0])["peers"]} for proc in procs]


def wait_for(predicate, timeout: float, step: float = 0.1) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(step)
    return time.monotonic() - t0


def join_time(etcd, host, url: str, bound: float, others) -> tuple[Tunneld, float]:
    """Start a daemon on ``host``; seconds from its record appearing in etcd (an ``etcdctl watch`` started
    before sees the put) to every one of ``others`` reaching it."""
    watch = etcd.hosts[0].popen(*etcd.etcdctl_argv("watch", f"{PREFIX}/hosts/{host.underlay}"))
    try:
        daemon = start(host, url, wait=False)
        line = watch.stdout.readline()  # "PUT": the registration
        t0 = time.monotonic()
        assert line.strip() == "PUT", (line, daemon.output())
    finally:
        watch.kill()
        watch.wait(timeout=5)
    return daemon, time.monotonic() - t0 + wait_reachable([(a, host.overlay) for a in others], bound)


@contextlib.contextmanager
def deletions(etcd, host):
    """The times (monotonic) at which ``host``'s key is deleted, seen by an ``etcdctl watch`` started first."""
    watch = etcd.hosts[0].popen(*etcd.etcdctl_argv("watch", f"{PREFIX}/hosts/{host.underlay}"))
    deleted: list[float] = []
    reader = threading.Thread(target=lambda: deleted.extend(
        time.monotonic() for line in watch.stdout if line.strip() == "DELETE"), daemon=True)
    reader.start()
    time.sleep(0.3)  # etcdctl has connected and created its watch
    try:
        yield deleted
        wait_for(lambda: deleted, 5)
    finally:
        watch.kill()
        reader.join(5)


def refused(host, url: str, *extra: str) -> str:
    """Start a daemon that must be refused: its exit status is non-zero and its last error line is returned."""
    proc = start(host, url, *extra, wait=False).proc
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode != 0, out
    errors = [line for line in out.splitlines() if " ERROR " in line or line.startswith("tunneld:")]
    assert errors, out
    assert not any("Traceback" in line for line in out.splitlines()), out
    return errors[-1]


def test_hosts_find_each_other_through_etcd(tmp_path):
    with segment(6) as hosts, etcd_cluster(hosts[:3], tmp_path) as etcd:
        url = etcd.url(PREFIX)
        daemons = [start(h, url) for h in hosts[:4]]
        wait_reachable([(a, b.overlay) for a in hosts[:4] for b in hosts[:4] if a is not b], 10)

        # Join: the fifth host, from its interface being up to every other host reaching it.
        daemon, join = join_time(etcd, hosts[4], url, JOIN_BOUND, hosts[:4])
        daemons.append(daemon)
        print(f"join: {join:.2f} s")
        assert join <= JOIN_BOUND

        # All pairs, and each peer came from the registry with its MAC as a static FDB entry.
        assert pings([(a, b.overlay) for a in hosts[:5] for b in hosts[:5] if a is not b], timeout=2) == []
        shown = daemons[0].show()
        assert {p["address"] for p in shown["peers"]} == {h.underlay for h in hosts[1:5]}
        assert all(p["source"] == "registry" and len(p["macs"]) == 1 for p in shown["peers"])
        assert shown["registry"]["up"] is True and shown["registry"]["peers"] == 4

        # Leave: SIGKILL, no revocation: gone from every peer list within the TTL (+ etcd's expiry check).
        with deletions(etcd, hosts[4]) as deleted:
            t0 = time.monotonic()
            daemons[4].kill()
            wait_for(lambda: all(hosts[4].underlay not in peers for peers in peer_lists(daemons[:4])),
                     LEAVE_BOUND + 5, step=0)
            leave = time.monotonic() - t0
        print(f"leave: {leave:.2f} s (ttl {TTL} s; the key expired after {deleted[0] - t0:.2f} s)")
        assert leave <= LEAVE_BOUND
        # A clean stop revokes at once: the key is gone before the daemon has exited, and so is the peer.
        daemons[4] = start(hosts[4], url)
        wait_for(lambda: all(hosts[4].underlay in peer_addresses(d) for d in daemons[:4]), 5)
        with deletions(etcd, hosts[4]) as deleted:
            t0 = time.monotonic()
            assert daemons[4].stop() == 0
            stopped = time.monotonic()
            wait_for(lambda: all(hosts[4].underlay not in peers for peers in peer_lists(daemons[:4])), 5, step=0)
        print(f"clean stop: the key deleted {deleted[0] - t0:.2f} s after SIGTERM, the daemon gone after "
              f"{stopped - t0:.2f} s")
        assert deleted[0] <= stopped

        # One member killed (the first endpoint, which every daemon was talking to): nothing noticed.
        etcd.kill(0)
        time.sleep(1.5)
        assert pings([(a, b.overlay) for a in hosts[:4] for b in hosts[:4] if a is not b], timeout=2) == []
        for d in daemons[:4]:
            wait_for(lambda d=d: d.show()["registry"]["up"], 5)
            assert len(peer_addresses(d)) == 3
        etcd.start(0)
        etcd.wait_healthy()

        # Duplicates: a live record of another daemon for host 5's address (its record and underlay claim under
        # its lease, as a daemon writes them); host 5 claiming host 0's overlay.
        lease = etcd.etcdctl("lease", "grant", "60").stdout.split()[1]
        etcd.etcdctl("put", "--lease", lease, f"{PREFIX}/claims/underlay/{hosts[5].underlay}", hosts[5].underlay)
        etcd.etcdctl("put", "--lease", lease, f"{PREFIX}/hosts/{hosts[5].underlay}",
                     f'{{"address": "{hosts[5].underlay}", "mode": "vxlan", "vni": {VNI}, "mac": "02:00:00:00:00:55",'
                     f' "overlay": [], "version": "x", "started": 1, "owner": "someone-else"}}')
        line = refused(hosts[5], url)
        assert "already registered by another live daemon" in line, line
        etcd.etcdctl("lease", "revoke", lease)
        line = refused(hosts[5], url.replace(PREFIX, PREFIX), "--address", f"{hosts[0].overlay}/24")
        assert f"overlay address {hosts[0].overlay} is already registered by host {hosts[0].underlay}" in line, line

        # Garbage under the prefix: ignored, counted, nothing else changes.
        garbage = {"10.231.1.200": "not json", "10.231.1.201": '{"address": 5}',
                   "fd00:231:1::99": '{"address": "fd00:231:1::99", "mode": "vxlan", "vni": 77, "mac": '
                                     '"02:00:00:00:00:99", "overlay": [], "version": "x", "started": 1}',
                   "10.231.1.202": '{"address": "10.231.1.202", "mode": "vxlan", "vni": 78, "mac": '
                                   '"02:00:00:00:00:98", "overlay": [], "version": "x", "started": 1}'}
        for address, value in garbage.items():
            etcd.etcdctl("put", f"{PREFIX}/hosts/{address}", value)
        wait_for(lambda: sum(daemons[0].show()["registry"]["invalid_records"].values()) >= 4, 5)
        invalid = daemons[0].show()["registry"]["invalid_records"]
        assert invalid["json"] >= 1 and invalid["fields"] >= 1 and invalid["family"] >= 1 and invalid["foreign"] >= 1
        assert all(peer_addresses(d) == {h.underlay for h in hosts[:4]} - {h.underlay} for d, h in
                   zip(daemons[:4], hosts))
        for address in garbage:
            etcd.etcdctl("del", f"{PREFIX}/hosts/{address}")

        # Our lease revoked behind our back (as if it had expired): the daemon grants a new one and registers
        # again; the others see it leave and come back.
        key = f"{PREFIX}/hosts/{hosts[0].underlay}"

        def lease_of() -> int:
            kvs = json.loads(etcd.etcdctl("get", key, "-w", "json").stdout).get("kvs", [])
            return kvs[0].get("lease", 0) if kvs else 0

        old_lease = lease_of()
        etcd.etcdctl("lease", "revoke", f"{old_lease:x}")
        wait_for(lambda: lease_of() not in (0, old_lease), 5)
        wait_for(lambda: all(hosts[0].underlay in peers for peers in peer_lists(daemons[1:4])), 5, step=0)

        # Every member killed: the pairs keep moving sha256-checked data; the daemons keep their peers.
        for i in range(3):
            etcd.kill(i)
        t0 = time.monotonic()
        moved = 0
        while time.monotonic() - t0 < OUTAGE_SECONDS:
            for src, dst in ((hosts[0], hosts[1]), (hosts[2], hosts[3])):
                sent, received = transfer(src, dst, dst.overlay, nbytes=2 << 20, timeout=20)
                assert sent == received
                moved += 2 << 20
        print(f"etcd down: moved {moved >> 20} MiB in {time.monotonic() - t0:.1f} s, checked")
        for d in daemons[:4]:
            shown = d.show()
            assert shown["registry"]["up"] is False and len(shown["peers"]) == 3

        # etcd back: the daemons re-register, and a new host joins within REJOIN_BOUND.
        for i in range(3):
            etcd.start(i)
        etcd.wait_healthy()
        for d in daemons[:4]:
            wait_for(lambda d=d: d.show()["registry"]["up"], 10)
        daemon, rejoin = join_time(etcd, hosts[5], url, REJOIN_BOUND, hosts[:4])
        daemons.append(daemon)
        print(f"join after etcd came back: {rejoin:.2f} s")
        assert rejoin <= REJOIN_BOUND
        for d in daemons:
            if d.proc.poll() is None:
                assert d.stop() == 0


def test_tls_cluster_refuses_a_daemon_without_a_client_certificate(tmp_path):
    trustme = pytest.importorskip("trustme")
    with segment(2) as hosts:
        ca = trustme.CA()
        server = ca.issue_cert(hosts[0].underlay)
        client = ca.issue_cert("tunneld-client")
        files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "server.pem", "key": tmp_path / "server.key",
                 "ccert": tmp_path / "client.pem", "ckey": tmp_path / "client.key"}
        ca.cert_pem.write_to_path(str(files["ca"]))
        server.cert_chain_pems[0].write_to_path(str(files["cert"]))
        server.private_key_pem.write_to_path(str(files["key"]))
        client.cert_chain_pems[0].write_to_path(str(files["ccert"]))
        client.private_key_pem.write_to_path(str(files["ckey"]))
        tls = {k: str(files[k]) for k in ("ca", "cert", "key")}
        with etcd_cluster(hosts[:1], tmp_path, tls=tls) as etcd:
            def config(with_cert: bool) -> str:
                path = tmp_path / f"t{int(with_cert)}.toml"
                cert = f'cert = "{files["ccert"]}"\nkey = "{files["ckey"]}"\n' if with_cert else ""
                path.write_text(f'[tunnel]\nmode = "vxlan"\nvni = {VNI}\naddress = "{hosts[1].overlay}/24"\n'
                                f'[metrics]\nlisten = ""\n[registry]\nendpoints = ["{etcd.endpoints}"]\n'
                                f'prefix = "{PREFIX}"\nttl = {TTL}\nca = "{files["ca"]}"\n{cert}')
                return str(path)

            proc = Tunneld(hosts[1], "--config", config(False), wait=False).proc
            out, _ = proc.communicate(timeout=20)
            assert proc.returncode == 1, out
            errors = [line for line in out.splitlines() if " ERROR " in line]
            assert len(errors) == 1 and "TLS refused" in errors[0], out
            assert "Traceback" not in out

            d = Tunneld(hosts[1], "--config", config(True))
            wait_for(lambda: d.show()["registry"]["up"], 10)
            keys = etcd.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/hosts/").stdout.split()
            assert keys == [f"{PREFIX}/hosts/{hosts[1].underlay}"]
            assert d.stop() == 0
            assert etcd.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/hosts/").stdout.split() == []
