"""An encrypted mesh with no hand-kept list of keys (issue 21, "Registry"), against a real 3-member etcd cluster.

A segment of six namespace hosts: hosts 0-2 run the etcd cluster, hosts 3-5 each run ``tunneld --mode
wireguard`` with only their own key file and ``--registry`` (no [[peer]] table). What is checked:
  - they mesh: every pair pings, a 1 MiB sha256-checked TCP transfer crosses one pair, and the stock
    ``wg show`` on each (its UAPI socket; the names differ, /var/run/wireguard is every namespace's) lists the
    other two's public keys at their endpoints;
  - no private key is anywhere in etcd (its whole keyspace read), nor in any log;
  - a fourth record forging a host's public key with another endpoint is refused by every host (counted
    "taken", or "own" on the host whose key it is) and the traffic does not notice; a real daemon given a
    copy of that host's key file stops at start-up, naming the host that holds the key;
  - a host that stops without a word (SIGKILL: its lease is not revoked) leaves the others' `wg show` when its
    lease's TTL (3 s here, ``--registry-ttl``) lapses.
Every daemon is stopped (killed if need be) and its UAPI socket file removed, also when the test fails.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import signal
import time
import uuid
from pathlib import Path

import pytest

from tunneld.testbed import UNOWNED_V4, Tunneld, segment, transfer
from tunneld.testbed.etcd import etcd_cluster
from tunneld.testbed.netns import is_root

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

TTL = 3
PORT = 51820
TRANSFER = 1 << 20
SCOPE = "wireguard"  # the claims of the tunnel: PREFIX/claims/wireguard/overlay/..., .../key/...


def needs() -> None:
    if not is_root():
        pytest.skip("needs root: network namespaces, TUN devices and an etcd cluster")
    for tool in ("wg", "etcd", "etcdctl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make apt installs wireguard-tools and etcd)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    needs()
    with segment(6) as hosts, etcd_cluster(hosts[:3], tmp_path_factory.mktemp("etcd")) as etcd:
        yield hosts, etcd


def genkey(host, path: Path) -> tuple[str, str]:
    """A private key written to ``path`` (mode 0600) by the stock `wg`; (private, public) in base64."""
    private = host.run("wg", "genkey").stdout.strip()
    path.write_text(private + "\n")
    path.chmod(0o600)
    return private, host.run("wg", "pubkey", input=private + "\n").stdout.strip()


def wait_for(predicate, timeout: float, step: float = 0.2, what: str = "") -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not true within {timeout} s: {what}")
        time.sleep(step)
    return time.monotonic() - t0


def wg_peers(host, dev: str) -> dict[str, str]:
    """`wg show DEV endpoints`: public key -> endpoint, as the stock tool reads them from the UAPI socket."""
    out = host.run("wg", "show", dev, "endpoints", check=False, timeout=10)
    if out.returncode != 0:
        return {}
    return dict(line.split("\t") for line in out.stdout.strip().splitlines() if "\t" in line)


def keyspace(etcd) -> list[bytes]:
    """Every key and value in etcd, whatever prefix, decoded."""
    kvs = json.loads(etcd.etcdctl("get", "", "--prefix", "-w", "json").stdout).get("kvs", [])
    return [base64.b64decode(kv[field]) for kv in kvs for field in ("key", "value") if field in kv]


@contextlib.contextmanager
def mesh(hosts, etcd, prefix: str, tmp_path: Path):
    """A wireguard tunneld on each host with its own key file and --registry only; yields [(host, daemon, dev,
    private, public)]. Every daemon stopped (SIGKILL if need be) and its socket file removed on exit."""
    run = uuid.uuid4().hex[:6]
    started = []
    try:
        for i, h in enumerate(hosts):
            dev = f"wgr{i}{run}"  # unique across namespaces: the UAPI socket directory is shared
            keyfile = tmp_path / f"{dev}.key"
            private, public = genkey(h, keyfile)
            d = Tunneld(h, "--mode", "wireguard", "--private-key", str(keyfile), "--address", f"{h.overlay}/24",
                        "--registry", etcd.url(prefix), "--registry-ttl", str(TTL), "--metrics-listen", "",
                        dev=dev)
            started.append((h, d, dev, private, public))
        yield started
    finally:
        for _, d, dev, _, _ in started:
            with contextlib.suppress(Exception):
                d.stop()
            with contextlib.suppress(FileNotFoundError):
                Path(f"/var/run/wireguard/{dev}.sock").unlink()


def forged(address: str, overlay: str, public: str) -> str:
    """A record as a daemon would write it, with its own address and overlay, naming ``public``."""
    return json.dumps({"address": address, "mode": "wireguard", "vni": None, "mac": None,
                       "overlay": [f"{overlay}/24"], "version": "x", "started": 1, "owner": "forger",
                       "public_key": public, "endpoint": f"{address}:{PORT}", "allowed_ips": [f"{overlay}/32"]})


@pytest.mark.timeout(400)
def test_three_wireguard_hosts_mesh_through_etcd_refuse_a_forged_key_and_drop_a_host_after_its_ttl(
        cluster, tmp_path, record_property):
    hosts, etcd = cluster
    prefix = "/wg21"
    with mesh(hosts[3:6], etcd, prefix, tmp_path) as ds:
        pairs = [(s, d) for s in ds for d in ds if s is not d]

        # 1. They mesh: each `wg show` lists the other two at their endpoints; every pair pings; 1 MiB crosses.
        def meshed() -> bool:
            return all(wg_peers(h, dev) == {o[4]: f"{o[0].underlay}:{PORT}" for o in ds if o is not me}
                       for me in ds for h, dev in [(me[0], me[2])])

        listed = wait_for(meshed, 20, step=0.05, what="every wg show lists the other two hosts")
        t0 = time.monotonic()
        for (src, *_), (dst, *_) in pairs:
            src.wait_ping(dst.overlay, timeout=20)
        pinged = time.monotonic() - t0
        sent, received = transfer(ds[0][0], ds[1][0], ds[1][0].overlay, TRANSFER, timeout=60)
        assert sent == received and sent.startswith(f"{TRANSFER} "), (sent, received)
        for h, d, dev, _, _ in ds:
            shown = d.show()
            assert {p["source"] for p in shown["peers"]} == {"registry"} and shown["registry"]["peers"] == 2
            assert sum(shown["registry"]["invalid_records"].values()) == 0, shown["registry"]
            handshakes = h.run("wg", "show", dev, "latest-handshakes").stdout
            assert handshakes.count("\t") == 2, handshakes

        # 2. No private key in etcd, in any form; every host's public key is there.
        everything = b"\n".join(keyspace(etcd))
        for _, _, _, private, public in ds:
            raw = base64.b64decode(private)
            assert private.encode() not in everything and raw.hex().encode() not in everything and raw not in everything
            assert public.encode() in everything
            assert f"{prefix}/claims/{SCOPE}/key/{public}".encode() in everything

        # 3. A fourth record forging host b's key, with another endpoint and its own address's claims.
        b_host, _, _, _, b_public = ds[1]
        fake, fake_overlay = UNOWNED_V4[0], "10.254.0.99"
        etcd.etcdctl("put", f"{prefix}/claims/underlay/{fake}", fake)
        etcd.etcdctl("put", f"{prefix}/claims/{SCOPE}/overlay/{fake_overlay}", fake)
        etcd.etcdctl("put", f"{prefix}/hosts/{fake}", forged(fake, fake_overlay, b_public))

        def refused_everywhere() -> bool:
            return all(d.show()["registry"]["invalid_records"]["own" if d is ds[1][1] else "taken"] == 1
                       for _, d, _, _, _ in ds)

        wait_for(refused_everywhere, 10, what="the forged record counted by every host")
        for me in ds:
            want = {o[4]: f"{o[0].underlay}:{PORT}" for o in ds if o is not me}
            assert wg_peers(me[0], me[2]) == want  # b is still at its own endpoint everywhere
        for (src, *_), (dst, *_) in pairs:
            r = src.run("ping", "-c", "3", "-i", "0.2", "-W", "1", dst.overlay, check=False, timeout=10)
            assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout

        # 3b. A real daemon on another host given b's key file: refused at start, naming b; b stays b.
        copy = tmp_path / "copy-of-b.key"
        copy.write_text(ds[1][3] + "\n")
        copy.chmod(0o600)
        dev = f"wgx{uuid.uuid4().hex[:6]}"
        twin = Tunneld(hosts[0], "--mode", "wireguard", "--private-key", str(copy), "--address", "10.254.0.98/24",
                       "--registry", etcd.url(prefix), "--registry-ttl", str(TTL), "--metrics-listen", "",
                       dev=dev, wait=False)
        try:
            status = twin.proc.wait(timeout=30)
            log = twin.output()
        finally:
            twin.kill()
            with contextlib.suppress(FileNotFoundError):
                Path(f"/var/run/wireguard/{dev}.sock").unlink()
        assert status == 1, log
        assert f"public key {b_public} is already registered by host {b_host.underlay}" in log, log
        assert ds[1][3] not in log
        for me in ds:
            assert wg_peers(me[0], me[2]) == {o[4]: f"{o[0].underlay}:{PORT}" for o in ds if o is not me}

        # 4. Host c stops without a word: its lease lapses after the TTL and it leaves a's and b's peers.
        c_host, c_daemon, c_dev, _, c_public = ds[2]
        c_daemon.stop(signal.SIGKILL, timeout=10)
        t0 = time.monotonic()
        gone = wait_for(lambda: all(c_public not in wg_peers(h, dev) for h, _, dev, _, _ in ds[:2]), TTL + 10,
                        step=0.1, what="host c gone from the others' wg show after its TTL")
        elapsed = time.monotonic() - t0
        # the lease was refreshed at most TTL/3 before the kill: it lapses 2/3 TTL to TTL after it (a revoked
        # lease, SIGTERM's, would be gone within milliseconds)
        assert elapsed >= TTL / 2, f"c left after {elapsed:.1f} s, before its lease could lapse ({TTL} s)"
        assert all(len(wg_peers(h, dev)) == 1 for h, _, dev, _, _ in ds[:2])
        ds[0][0].wait_ping(ds[1][0].overlay, timeout=5)  # a and b keep talking
        assert gone <= TTL + 10
        record_property("report", f"wireguard registry mesh of 3: every wg show listed the others {listed:.2f} s "
                                  f"after the last daemon was up, all 6 pairs pinged {pinged:.2f} s later "
                                  f"(handshakes included); a SIGKILLed host left the others {elapsed:.2f} s after "
                                  f"the kill (TTL {TTL} s)")

    for h, d, dev, private, _ in ds:
        log = d.output()
        assert private not in log and base64.b64decode(private).hex() not in log
        if d is not c_daemon:
            assert "registry: host" in log and "Traceback" not in log, log


def test_a_wireguard_host_without_a_private_key_stops_with_one_line_and_registers_nothing(cluster):
    """Without a key there is no public key to register: one line, exit status 1, nothing written to etcd."""
    hosts, etcd = cluster
    prefix = "/wg21nokey"
    dev = f"wgn{uuid.uuid4().hex[:6]}"
    d = Tunneld(hosts[3], "--mode", "wireguard", "--address", f"{hosts[3].overlay}/24", "--registry",
                etcd.url(prefix), "--registry-ttl", str(TTL), "--metrics-listen", "", dev=dev, wait=False)
    try:
        status = d.proc.wait(timeout=30)
        log = d.output()
    finally:
        d.kill()
        with contextlib.suppress(FileNotFoundError):
            Path(f"/var/run/wireguard/{dev}.sock").unlink()
    assert status == 1, log
    refusals = [line for line in log.splitlines() if "registers its public key" in line]
    assert len(refusals) == 1 and "give it a private key" in refusals[0], log
    assert "Traceback" not in log, log
    assert etcd.etcdctl("get", f"{prefix}/", "--prefix", "--keys-only").stdout.strip() == ""
