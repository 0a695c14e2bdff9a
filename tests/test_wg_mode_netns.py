"""``tunneld --mode wireguard`` against Debian's wireguard-go: tunneld in namespace A (configured by a TOML file
with a 0600 key file and a [[peer]] table), wireguard-go in namespace B (configured with the stock `wg set`).
Each side starts the handshake in turn; ping both ways, a 1 MiB sha256-checked TCP transfer both ways, and `wg
show` on both sides (tunneld's through its UAPI socket, get only) reports the handshake and the bytes.

Interface names are unique per run (wireguard-go's UAPI socket /var/run/wireguard/NAME.sock is shared by every
namespace); wireguard-go is stopped with SIGTERM and the namespaces deleted, also when the test fails."""

from __future__ import annotations

import uuid

import pytest

from tests.wg_go import PORT, genkey, needs, their_peer, wireguard_go, write_config
from tunneld.testbed import OVERLAY_V4, Tunneld, transfer

pytestmark = pytest.mark.netns

TRANSFER = 1 << 20


@pytest.mark.parametrize("first, psk, their_port, told", [
    ("tunneld", False, PORT, PORT), ("wireguard-go", False, PORT, PORT), ("tunneld", True, PORT, PORT),
    # wireguard-go on a port of its own: tunneld told so, and not told (a stale port in the file: tunneld must
    # answer where the initiation came from, as it must for a wg-quick client without ListenPort)
    ("tunneld", False, 51999, 51999), ("wireguard-go", False, 51999, PORT)],
    ids=["tunneld-initiates", "wireguard-go-initiates", "tunneld-initiates-psk", "to-their-own-port",
         "from-their-own-port"])
def test_tunneld_and_wireguard_go_carry_ping_and_tcp_both_ways(hosts, tmp_path, first, psk, their_port, told):
    needs()
    a, b = hosts
    run = uuid.uuid4().hex[:8]
    ours, theirs = f"twa{run}", f"twb{run}"
    our_public = genkey(a, tmp_path / "a.key")
    their_public = genkey(b, tmp_path / "b.key")
    config = write_config(tmp_path / "a.toml", their_public, f"{b.underlay}:{told}",
                          extra='preshared_key = "p.psk"\n' if psk else "")
    pskfile = None
    if psk:  # the same preshared key on both sides, a 0600 file each reads
        pskfile = tmp_path / "p.psk"
        pskfile.write_text(a.run("wg", "genpsk").stdout)
        pskfile.chmod(0o600)
    # wireguard-go knows where tunneld is only when it starts (else it learns it from tunneld's initiation)
    endpoint = f"{a.underlay}:{PORT}" if first == "wireguard-go" else None
    with wireguard_go(b, theirs, tmp_path / "b.key", our_public, endpoint, pskfile=pskfile, port=their_port):
        t = Tunneld(a, "--config", str(config), dev=ours)
        try:
            if first == "tunneld":
                a.wait_ping(OVERLAY_V4[1], timeout=20)
                b.wait_ping(OVERLAY_V4[0], timeout=10)
            else:
                b.wait_ping(OVERLAY_V4[0], timeout=20)
                a.wait_ping(OVERLAY_V4[1], timeout=10)
            for src, dst, addr in ((a, b, OVERLAY_V4[1]), (b, a, OVERLAY_V4[0])):
                sent, received = transfer(src, dst, addr, TRANSFER, timeout=60)
                assert sent == received and sent.startswith(f"{TRANSFER} "), (sent, received)
            peer = their_peer(b, theirs)
            assert peer["latest_handshake"] > 0, peer
            assert peer["rx"] > TRANSFER and peer["tx"] > TRANSFER, peer
            assert peer["endpoint"] == f"{a.underlay}:{PORT}", peer
            # and the stock `wg show` reaches tunneld itself (its UAPI socket, get only)
            mine = their_peer(a, ours)
            assert mine["latest_handshake"] > 0 and mine["endpoint"] == f"{b.underlay}:{their_port}", mine
            assert mine["rx"] > TRANSFER and mine["tx"] > TRANSFER, mine
            shown = a.run("wg", "show", ours).stdout
            assert their_public in shown and f"allowed ips: {OVERLAY_V4[1]}/32" in shown, shown
            assert (tmp_path / "a.key").read_text().strip() not in shown
            if psk:
                assert "preshared key: (hidden)" in shown, shown
            before = a.run("wg", "show", ours, "endpoints").stdout
            refused = a.run("wg", "set", ours, "peer", their_public, "endpoint", "127.0.0.1:51820", check=False)
            assert refused.returncode != 0  # a loopback endpoint: refused, nothing changed
            assert a.run("wg", "show", ours, "endpoints").stdout == before
        finally:
            status = t.stop()
        log = t.output()
        assert status == 0, log
        assert "wireguard on" in log, log
        assert "offload tun 0x" in log and "udp gso/gro" in log, log  # the rows path: TSO cut, GRO opened
        for key in ("a.key", "b.key", *(("p.psk",) if psk else ())):  # no key ever reaches a log line
            assert (tmp_path / key).read_text().strip() not in log
