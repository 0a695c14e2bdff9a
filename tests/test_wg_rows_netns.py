"""``tunneld --mode wireguard`` at both ends with offloads (the default): super-frames cut and sealed as rows,
sent with UDP_SEGMENT, received with UDP_GRO, opened row by row and coalesced. A 16 MiB sha256-checked TCP
transfer each way, nothing dropped, and both logs say the rows path ran (offloads on, udp gso/gro).

Interface names are unique per run (the UAPI socket /var/run/wireguard/NAME.sock is one file for every
namespace); the namespaces are removed, and the daemons stopped, also when the test fails."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from tunneld.testbed import OVERLAY_V4, Tunneld, transfer
from tunneld.testbed.netns import is_root

pytestmark = pytest.mark.netns

PORT = 51820
TRANSFER = 16 << 20


def keypair(host, path: Path) -> str:
    private = host.run("wg", "genkey").stdout.strip()
    path.write_text(private + "\n")
    path.chmod(0o600)
    return host.run("wg", "pubkey", input=private + "\n").stdout.strip()


def test_two_tunnelds_carry_tcp_both_ways_through_sealed_and_opened_rows(hosts, tmp_path):
    if not is_root():
        pytest.skip("needs root: network namespaces and TUN devices")
    if shutil.which("wg") is None:
        pytest.skip("wg is not installed (Debian: wireguard-tools; make apt installs it)")
    a, b = hosts
    run = uuid.uuid4().hex[:8]
    publics = [keypair(a, tmp_path / "a.key"), keypair(b, tmp_path / "b.key")]
    ends = []
    try:
        for i, (host, peer) in enumerate(((a, b), (b, a))):
            config = tmp_path / f"{host.name}.toml"
            config.write_text(f"""
[tunnel]
mode = "wireguard"
private_key = "{'ab'[i]}.key"
port = {PORT}
address = "{OVERLAY_V4[i]}/24"

[[peer]]
public_key = "{publics[1 - i]}"
endpoint = "{peer.underlay}:{PORT}"
allowed_ips = ["{OVERLAY_V4[1 - i]}/32"]
""")
            ends.append(Tunneld(host, "--config", str(config), dev=f"tr{'ab'[i]}{run}"))
        a.wait_ping(OVERLAY_V4[1], timeout=20)
        for src, dst, addr in ((a, b, OVERLAY_V4[1]), (b, a, OVERLAY_V4[0])):
            sent, received = transfer(src, dst, addr, TRANSFER, timeout=120)
            assert sent == received and sent.startswith(f"{TRANSFER} "), (sent, received)
        for end in ends:
            peer = end.show()["peers"][0]
            assert peer["dropped"] == 0 and peer["rx_bytes"] > TRANSFER and peer["tx_bytes"] > TRANSFER, peer
    finally:
        statuses = [end.stop() for end in ends]
    for end, status in zip(ends, statuses):
        log = end.output()
        assert status == 0, log
        assert "offload tun 0x" in log and "udp gso/gro" in log, log
