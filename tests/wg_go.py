"""wireguard-go in a test namespace, configured with the stock `wg`, and what a WireGuard netns test needs around
it (a key pair written by `wg genkey`, the tools present, tunneld's TOML file for the other end, `wg show dump`
and tunneld's metrics read back). Shared by the netns tests that run it as the far end."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tunneld.testbed import OVERLAY_V4
from tunneld.testbed.netns import is_root
from tunneld.testbed.prom import exposition, samples

PORT = 51820
METRICS = "127.0.0.1:9477"  # the default --metrics-listen; each namespace has its own loopback


def needs() -> None:
    if not is_root():
        pytest.skip("needs root: network namespaces and TUN devices")
    for tool in ("wireguard-go", "wg"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: wireguard-go, wireguard-tools; make apt installs them)")


def genkey(host, path: Path) -> str:
    """A private key written to ``path`` (mode 0600) by `wg genkey`; its public key, by `wg pubkey`."""
    private = host.run("wg", "genkey").stdout.strip()
    path.write_text(private + "\n")
    path.chmod(0o600)
    return host.run("wg", "pubkey", input=private + "\n").stdout.strip()


def write_config(path: Path, peer_public: str, endpoint: str, address: str = OVERLAY_V4[0],
                 allowed: str = OVERLAY_V4[1], extra: str = "") -> Path:
    """tunneld's TOML file at ``path``: wireguard mode, the key file a.key beside it, overlay ``address``/24, and
    one [[peer]] at ``endpoint`` allowed ``allowed``/32; ``extra`` lines go at the end of the peer's table."""
    path.write_text(f"""
[tunnel]
mode = "wireguard"
private_key = "a.key"
address = "{address}/24"

[[peer]]
public_key = "{peer_public}"
endpoint = "{endpoint}"
allowed_ips = ["{allowed}/32"]
""" + extra)
    return path


@contextlib.contextmanager
def wireguard_go(host, name: str, keyfile: Path, peer_public: str, peer_endpoint: str | None = None, *,
                 pskfile: Path | None = None, port: int = PORT, allowed: str = OVERLAY_V4[0],
                 address: str = OVERLAY_V4[1], mtu: int | None = None):
    """wireguard-go as ``name`` in ``host`` on ``port`` with one peer (allowed: ``allowed``/32; at
    ``peer_endpoint`` if given, else learnt from its initiation; ``pskfile`` its preshared key), ``address``/24
    and up (at ``mtu`` if given: its own default is 1420, room for IPv6); stopped with SIGTERM (it removes its
    UAPI socket on the way out), killed if it does not go."""
    proc = host.popen("wireguard-go", "-f", name)
    try:
        deadline = time.monotonic() + 10
        while host.link_state(name) is None or not Path(f"/var/run/wireguard/{name}.sock").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("wireguard-go did not start")
            time.sleep(0.05)
        args = ["set", name, "private-key", str(keyfile), "listen-port", str(port),
                "peer", peer_public, "allowed-ips", f"{allowed}/32"]
        if peer_endpoint:
            args += ["endpoint", peer_endpoint]
        if pskfile:
            args += ["preshared-key", str(pskfile)]
        host.run("wg", *args)
        host.run("ip", "addr", "add", f"{address}/24", "dev", name)
        host.run("ip", "link", "set", name, *(("mtu", str(mtu)) if mtu else ()), "up")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            Path(f"/var/run/wireguard/{name}.sock").unlink()


def their_peer(host, name: str) -> dict:
    """`wg show NAME dump`'s one peer line (the stock tool; for tunneld it goes through tunneld's UAPI socket)."""
    fields = host.run("wg", "show", name, "dump").stdout.strip().splitlines()[1].split("\t")
    return {"public_key": fields[0], "endpoint": fields[2], "latest_handshake": int(fields[4]),
            "rx": int(fields[5]), "tx": int(fields[6]), "keepalive": fields[7]}


def scrape(host, listen: str = METRICS) -> str:
    """tunneld's exposition in ``host``, fetched from inside it."""
    return exposition(host, listen, timeout=30)


def value(text: str, name: str, **labels) -> float:
    """The one sample of ``name`` whose labels include ``labels`` (more or none: the assertion fails)."""
    found = [s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def drops(host, listen: str = METRICS) -> dict[str, float]:
    """tunneld's drops by reason, from its metrics (summed over the other labels)."""
    out: dict[str, float] = {}
    for labels, count in samples(exposition(host, listen), "tunneld_dropped_packets_total"):
        out[labels["reason"]] = out.get(labels["reason"], 0) + count
    return out
