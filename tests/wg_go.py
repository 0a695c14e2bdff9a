"""wireguard-go in a test namespace, configured with the stock `wg`, and what a WireGuard netns test needs around
it (a key pair written by `wg genkey`, the tools present). Shared by the netns tests that run it as the far end."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tunneld.testbed import OVERLAY_V4
from tunneld.testbed.netns import is_root

PORT = 51820


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


@contextlib.contextmanager
def wireguard_go(host, name: str, keyfile: Path, peer_public: str, peer_endpoint: str | None, port: int = PORT):
    """wireguard-go as ``name`` in ``host`` with one peer (allowed: OVERLAY_V4[0]/32), OVERLAY_V4[1]/24 and up;
    stopped with SIGTERM (it removes its socket), killed if it does not go."""
    proc = host.popen("wireguard-go", "-f", name)
    try:
        deadline = time.monotonic() + 10
        while host.link_state(name) is None or not Path(f"/var/run/wireguard/{name}.sock").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("wireguard-go did not start")
            time.sleep(0.05)
        args = ["set", name, "private-key", str(keyfile), "listen-port", str(port),
                "peer", peer_public, "allowed-ips", f"{OVERLAY_V4[0]}/32"]
        if peer_endpoint:
            args += ["endpoint", peer_endpoint]
        host.run("wg", *args)
        host.run("ip", "addr", "add", f"{OVERLAY_V4[1]}/24", "dev", name)
        host.run("ip", "link", "set", name, "up")
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
