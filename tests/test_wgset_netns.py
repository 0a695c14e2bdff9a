"""A tunneld started with no key and no peers (`tunneld --mode wireguard --dev NAME`), then driven ONLY by the stock
`wg` (`wg setconf`, `wg addconf`, `wg set`, `wg showconf`, `wg show dump`) against Debian's wireguard-go configured
by `wg` too; and `wg-quick up`/`down` with tunneld as its userspace implementation (`tunneld-wg-quick`).

What each step shows: the keyless start answers `wg show`; setconf/addconf give it a key, a port and peers (one
waiting to be contacted, with no endpoint); showconf fed back to setconf changes nothing; ping and a 1 MiB
sha256-checked transfer both ways; the listen port moved live (to a port, then to 0: the kernel's pick) and the
far end follows (its `wg show` endpoint), and tunneld follows the far end's move; refusals are wg's error line and change nothing; a removed peer's
traffic stops and is counted by reason (the daemon's shutdown line).

Interface names are unique per run (/var/run/wireguard is shared by every namespace); daemons, wireguard-go and
namespaces go away whatever the outcome (fixtures, try/finally).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.wg_go import genkey, needs, wireguard_go
from tunneld.testbed import OVERLAY_V4, Tunneld, transfer
from tunneld.testbed.peers import VENV_BIN, drops

pytestmark = pytest.mark.netns

PORT = 51820
TRANSFER = 1 << 20


def dump(host, name: str) -> tuple[list[str], dict[str, list[str]]]:
    """`wg show NAME dump`: the interface's fields and each peer's, by public key."""
    lines = [line.split("\t") for line in host.run("wg", "show", name, "dump").stdout.strip().splitlines()]
    return lines[0], {fields[0]: fields for fields in lines[1:]}


def configured(host, name: str) -> tuple[list[str], dict[str, list[str]]]:
    """The configuration part of `wg show dump` (no handshake times or byte counts, which move on their own)."""
    interface, peers = dump(host, name)
    return interface, {key: [f[1], f[2], f[3], f[7]] for key, f in peers.items()}


def wait_for(what, timeout: float = 15, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def write_conf(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_the_stock_wg_alone_configures_a_keyless_tunneld_against_wireguard_go(hosts, tmp_path):
    needs()
    a, b = hosts
    run = uuid.uuid4().hex[:8]
    ours, theirs = f"wsa{run}", f"wsb{run}"
    our_public = genkey(a, tmp_path / "a.key")
    our_private = (tmp_path / "a.key").read_text().strip()
    their_public = genkey(b, tmp_path / "b.key")
    waiting_public = genkey(a, tmp_path / "w.key")  # a peer that would have to contact us first
    t = Tunneld(a, "--mode", "wireguard", "--address", f"{OVERLAY_V4[0]}/24", dev=ours)
    try:
        # no key, no peers: what wireguard-go answers before `wg set` (the default port: 51820)
        assert dump(a, ours) == (["(none)", "(none)", str(PORT), "off"], {})
        with wireguard_go(b, theirs, tmp_path / "b.key", our_public, None):  # it waits to be contacted
            a.run("wg", "setconf", ours, str(write_conf(tmp_path / "set.conf", f"""
[Interface]
PrivateKey = {our_private}
ListenPort = {PORT}

[Peer]
PublicKey = {their_public}
Endpoint = {b.underlay}:{PORT}
AllowedIPs = {OVERLAY_V4[1]}/32
""")))
            a.run("wg", "addconf", ours, str(write_conf(tmp_path / "add.conf", f"""
[Peer]
PublicKey = {waiting_public}
AllowedIPs = 10.99.0.0/24
PersistentKeepalive = 25
""")))
            interface, peers = configured(a, ours)
            assert interface == [our_private, our_public, str(PORT), "off"], "the interface as wg set it"
            assert peers == {their_public: ["(none)", f"{b.underlay}:{PORT}", f"{OVERLAY_V4[1]}/32", "off"],
                             waiting_public: ["(none)", "(none)", "10.99.0.0/24", "25"]}, peers
            # showconf is a configuration setconf takes back unchanged
            shown = a.run("wg", "showconf", ours).stdout
            assert f"PrivateKey = {our_private}" in shown and f"ListenPort = {PORT}" in shown, shown
            a.run("wg", "setconf", ours, str(write_conf(tmp_path / "shown.conf", shown)))
            assert configured(a, ours) == (interface, peers)

            a.wait_ping(OVERLAY_V4[1], timeout=20)
            b.wait_ping(OVERLAY_V4[0], timeout=10)
            for src, dst, addr in ((a, b, OVERLAY_V4[1]), (b, a, OVERLAY_V4[0])):
                sent, received = transfer(src, dst, addr, TRANSFER, timeout=60)
                assert sent == received and sent.startswith(f"{TRANSFER} "), (sent, received)
            mine = dump(a, ours)[1][their_public]
            assert int(mine[4]) > 0 and int(mine[5]) > TRANSFER and int(mine[6]) > TRANSFER, mine

            # the listen port, live: wireguard-go follows us there (its endpoint for us is where we send from)
            for asked in ("51999", "0"):
                a.run("wg", "set", ours, "listen-port", asked)
                port = int(a.run("wg", "show", ours, "listen-port").stdout)
                assert port == int(asked) if asked != "0" else port not in (0, 51999, PORT), port
                a.wait_ping(OVERLAY_V4[1], timeout=10)
                followed = wait_for(lambda: dump(b, theirs)[1][our_public][2] == f"{a.underlay}:{port}")
                assert followed, dump(b, theirs)
                b.wait_ping(OVERLAY_V4[0], timeout=10)

            # and the other way: wireguard-go moves, tunneld follows on its first authenticated packet from there
            b.run("wg", "set", theirs, "listen-port", "51830")
            b.wait_ping(OVERLAY_V4[0], timeout=10)
            assert wait_for(lambda: dump(a, ours)[1][their_public][2] == f"{b.underlay}:51830"), dump(a, ours)
            a.wait_ping(OVERLAY_V4[1], timeout=10)

            # refusals are wg's error line and change nothing
            before = configured(a, ours)
            for words in (("endpoint", "127.0.0.1:51820"),  # loopback: the rule every door applies
                          ("allowed-ips", "10.0.0.0/33")):  # wg itself refuses this one
                refused = a.run("wg", "set", ours, "peer", their_public, *words, check=False)
                assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1, refused
            assert "Unable to modify interface" in a.run("wg", "set", ours, "peer", their_public, "endpoint",
                                                         "127.0.0.1:51820", check=False).stderr
            # our own key as a peer is ignored, as wireguard-go does (a peer that could never shake hands)
            a.run("wg", "set", ours, "peer", our_public, "allowed-ips", "10.98.0.0/24")
            assert configured(a, ours) == before
            a.wait_ping(OVERLAY_V4[1], timeout=10)

            # a removed peer: its session closes, its traffic stops and is counted
            a.run("wg", "set", ours, "peer", their_public, "remove")
            assert their_public not in dump(a, ours)[1]
            assert not b.ping(OVERLAY_V4[0], count=3, timeout=6)
            assert not a.ping(OVERLAY_V4[1], count=2, timeout=4)
    finally:
        status = t.stop()
    log = t.output()
    assert status == 0, log
    assert "no private key yet" in log, log  # the "up" line, before `wg set`
    counted = drops(log.strip().splitlines()[-2])  # "shutting down: ... dropped N (reason n, ...)"
    assert counted.get("no_session", 0) + counted.get("unknown_peer", 0) >= 3, log  # wireguard-go's, after removal
    assert counted.get("no_route", 0) >= 2, log  # ours to the removed peer's allowed IPs
    for key in ("a.key", "b.key", "w.key"):
        assert (tmp_path / key).read_text().strip() not in log


def test_wg_quick_up_and_down_with_tunneld_as_its_userspace_implementation(hosts, tmp_path):
    needs()
    if not (VENV_BIN / "tunneld-wg-quick").exists() or not os.path.exists("/usr/bin/wg-quick"):
        pytest.skip("tunneld-wg-quick (pip install -e .) and wg-quick (wireguard-tools) are needed")
    a, b = hosts
    run = uuid.uuid4().hex[:8]
    ours, theirs = f"wqa{run}", f"wqb{run}"
    our_public = genkey(a, tmp_path / "a.key")
    their_public = genkey(b, tmp_path / "b.key")
    conf = write_conf(tmp_path / f"{ours}.conf", f"""
[Interface]
PrivateKey = {(tmp_path / "a.key").read_text().strip()}
Address = {OVERLAY_V4[0]}/32
ListenPort = 51821

[Peer]
PublicKey = {their_public}
Endpoint = {b.underlay}:{PORT}
AllowedIPs = {OVERLAY_V4[1]}/32
PersistentKeepalive = 5
""")
    env = {**os.environ, "WG_QUICK_USERSPACE_IMPLEMENTATION": str(VENV_BIN / "tunneld-wg-quick"),
           "TUNNELD_WG_LOG": str(tmp_path / "daemon.log")}

    def wg_quick(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", a.name, "wg-quick", *args], capture_output=True, text=True,
                              timeout=60, env=env)

    with wireguard_go(b, theirs, tmp_path / "b.key", our_public, None):
        up = wg_quick("up", str(conf))
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            assert a.link_state(ours) is not None
            assert int(a.run("wg", "show", ours, "listen-port").stdout) == 51821
            a.wait_ping(OVERLAY_V4[1], timeout=20)  # wg-quick added the route to the peer's allowed IPs
            b.wait_ping(OVERLAY_V4[0], timeout=10)
            assert dump(a, ours)[1][their_public][7] == "5"
            mtu = int(re.search(r"mtu (\d+)", a.run("ip", "link", "show", ours).stdout).group(1))
            assert mtu == 1420, mtu  # wg-quick's own choice (underlay 1500 - 80), set by `ip link set mtu`
        finally:
            down = wg_quick("down", str(conf))
        assert down.returncode == 0, down.stdout + down.stderr
    assert wait_for(lambda: a.link_state(ours) is None, timeout=10)
    assert wait_for(lambda: not Path(f"/var/run/wireguard/{ours}.sock").exists(), timeout=10)
    log = (tmp_path / "daemon.log").read_text()
    assert "removed interface" in log, log  # the daemon stopped on its own once its interface was deleted
    assert (tmp_path / "a.key").read_text().strip() not in log + up.stderr
    with contextlib.suppress(FileNotFoundError):
        Path(f"/var/run/wireguard/{ours}.sock").unlink()
