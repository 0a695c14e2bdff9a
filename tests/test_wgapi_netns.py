"""The stock wireguard-tools drive tunneld's WireGuard userspace API, and it answers as Debian's wireguard-go does.

`wg` finds a userspace interface by its socket file alone (wireguard-tools' ipc-uapi-unix.h: stat the file,
connect; no netlink device, no `ip link` entry), so the server runs here in this process, for a unique name,
over an in-memory device; the `wg` commands run as root (the socket is 0700 under /var/run/wireguard, which
every namespace shares). wireguard-go itself runs inside a test namespace (it makes a TUN device there) and the
two sockets get the same requests. Nothing sends a packet: the endpoints used route nowhere from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tests.wg_golden import GOLDEN_SET, PRIV_HEX
from tunneld.control.wgapi import (
    SOCKET_DIR,
    InterfaceConfig,
    Key,
    MemoryDevice,
    PeerStats,
    PrivateKey,
    UapiError,
    UapiServer,
    UapiSocketError,
    socket_path,
)
from tunneld.testbed import sh

pytestmark = pytest.mark.netns

PEER = Key(bytes.fromhex("22" * 32))
PEER2 = Key(bytes.fromhex("44" * 32))
PSK = Key(bytes.fromhex("33" * 32))


def wg(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(["wg", *args], capture_output=True, text=True, timeout=20, input=stdin)
    if check:
        assert r.returncode == 0, f"wg {' '.join(args)}: {r.stdout}{r.stderr}"
    return r


def pubkey(private_b64: str) -> str:
    """The public key as wireguard-tools computes it (independent of the code under test)."""
    return wg("pubkey", stdin=private_b64 + "\n").stdout.strip()


@contextlib.contextmanager
def served(name: str, device) -> Iterator[UapiServer]:
    """The UAPI server for ``name`` on its own event loop in a thread, for the blocking `wg` calls."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = UapiServer(name, device)
    started = False
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        started = True
        yield server
    finally:
        if started:
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Interface names unique to this test process (the socket directory is shared by every namespace)."""
    made = [f"wgt{os.getpid() % 100000}{tag}" for tag in "abc"]
    yield made
    for name in made:
        assert not os.path.exists(socket_path(name)), f"{name}: socket left behind"


@pytest.fixture
def keys(tmp_path) -> dict[str, str]:
    priv = PrivateKey(bytes.fromhex(PRIV_HEX))
    files = {"private": tmp_path / "wg.key", "psk": tmp_path / "b.psk"}
    files["private"].write_text(priv.base64() + "\n")
    files["psk"].write_text(PSK.base64() + "\n")
    for f in files.values():
        os.chmod(f, 0o600)
    return {"private": str(files["private"]), "psk": str(files["psk"]), "private_b64": priv.base64()}


def test_wg_set_show_dump_showconf_setconf_addconf_and_interfaces(names, keys, tmp_path, caplog):
    name, name2, _ = names
    handshake_ns = time.time_ns() - 65 * 1_000_000_000
    device = MemoryDevice(stats=lambda key: PeerStats(handshake_ns, rx_bytes=2048, tx_bytes=3072)
                          if key == PEER else PeerStats())
    with served(name, device) as server:
        assert sh("ip", "link", "show", name, check=False).returncode != 0  # no netlink device: the socket is all
        wg("set", name, "private-key", keys["private"], "listen-port", "51820", "fwmark", "7",
           "peer", PEER.base64(), "preshared-key", keys["psk"], "endpoint", "[fd00::1]:123",
           "persistent-keepalive", "25", "allowed-ips", "10.0.0.1/24,fd00::/64")
        config = device.config
        assert (config.listen_port, config.fwmark, config.private_key.hex()) == (51820, 7, "a0" * 31 + "60")
        peer = config.peers[PEER]
        assert peer.preshared_key == PSK and str(peer.endpoint) == "[fd00::1]:123"
        assert peer.persistent_keepalive == 25 and [str(n) for n in peer.allowed_ips] == ["10.0.0.0/24", "fd00::/64"]

        own = pubkey(keys["private_b64"])
        show = wg("show", name).stdout
        for line in (f"interface: {name}", f"public key: {own}", "private key: (hidden)", "listening port: 51820",
                     "fwmark: 0x7", f"peer: {PEER.base64()}", "preshared key: (hidden)", "endpoint: [fd00::1]:123",
                     "allowed ips: 10.0.0.0/24, fd00::/64", "latest handshake: 1 minute, ",
                     "transfer: 2.00 KiB received, 3.00 KiB sent", "persistent keepalive: every 25 seconds"):
            assert line in show, show
        dump = wg("show", name, "dump").stdout.splitlines()
        assert dump[0].split("\t") == [config.private_key.base64(), own, "51820", "0x7"]  # the key as stored: clamped
        assert dump[1].split("\t") == [PEER.base64(), PSK.base64(), "[fd00::1]:123", "10.0.0.0/24,fd00::/64",
                                       str(handshake_ns // 1_000_000_000), "2048", "3072", "25"]
        assert wg("show", name, "listen-port").stdout == "51820\n"

        conf = wg("showconf", name).stdout
        assert f"PrivateKey = {config.private_key.base64()}" in conf and "AllowedIPs = 10.0.0.0/24, fd00::/64" in conf
        assert name in wg("show", "interfaces").stdout.split()

        # showconf's text into another interface with setconf: the same model.
        conf_file = tmp_path / "wg.conf"
        conf_file.write_text(conf)
        device2 = MemoryDevice()
        with served(name2, device2):
            wg("setconf", name2, str(conf_file))
            assert device2.config == config
            assert set(wg("show", "interfaces").stdout.split()) >= {name, name2}
        # addconf adds a peer; setconf replaces them all; `peer ... remove` removes one.
        more = tmp_path / "more.conf"
        more.write_text(f"[Peer]\nPublicKey = {PEER2.base64()}\nAllowedIPs = 10.0.0.7/32, 10.4.0.0/16\n")
        wg("addconf", name, str(more))
        assert list(device.config.peers) == [PEER, PEER2] and device.config.listen_port == 51820
        wg("setconf", name, str(more))
        assert list(device.config.peers) == [PEER2] and device.config.listen_port == 0
        assert device.config.private_key is None  # setconf without a PrivateKey clears it, as for the kernel
        # syncconf: wg reads the state (get), then sends only the difference.
        conf_file.write_text(conf)
        wg("syncconf", name, str(conf_file))
        assert device.config == config
        wg("set", name, "private-key", "/dev/null", "listen-port", "0", "fwmark", "0", "peer", PEER.base64(),
           "remove")  # an empty key file: wg sends a zero key, which clears it
        assert device.config == InterfaceConfig()
        deadline = time.monotonic() + 5  # the server thread sees the last `wg`'s hang-up a moment later
        while server.clients and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.clients == 0  # every connection released
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")]


def test_a_refused_change_is_wgs_error_line_and_changes_nothing(names):
    name = names[0]

    class PortTaken(MemoryDevice):
        def commit(self, config):
            if config.listen_port == 1:
                raise UapiError(98, "listen_port 1 is in use")
            super().commit(config)

    device = PortTaken()
    with served(name, device):
        wg("set", name, "listen-port", "2")
        r = wg("set", name, "listen-port", "1", "peer", PEER.base64(), "allowed-ips", "10.0.0.0/8", check=False)
        assert r.returncode == 1 and "Unable to modify interface: Address already in use" in r.stderr, r.stderr
        assert device.config.listen_port == 2 and not device.config.peers


# -- against Debian's wireguard-go ----------------------------------------------------------------------------------

def query(path: str, request: bytes) -> bytes:
    """One request on a fresh connection; everything until the server closes or the reply's blank line."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(request)
        out = b""
        while not (out.startswith(b"errno=") or b"\nerrno=" in out) or not out.endswith(b"\n\n"):
            data = s.recv(65536)
            if not data:
                break
            out += data
        return out


def peer_blocks(reply: bytes) -> tuple[bytes, list[bytes], bytes]:
    """A get reply as its interface lines and its peers' blocks, sorted (wireguard-go walks a Go map)."""
    body, sep, status = reply.rpartition(b"errno=")
    head, *peers = body.split(b"public_key=")
    return head, sorted(peers), sep + status


@contextlib.contextmanager
def wireguard_go(host, name: str) -> Iterator[str]:
    path = socket_path(name)
    proc = host.popen("wireguard-go", "-f", name, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert proc.poll() is None and time.monotonic() < deadline, "wireguard-go did not make its socket"
            time.sleep(0.05)
        yield path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # it removes its socket on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def test_replies_are_byte_for_byte_wireguard_gos(hosts, names):
    a, _ = hosts
    ours_name, theirs_name, _ = names
    with wireguard_go(a, theirs_name) as theirs, served(ours_name, MemoryDevice()) as server:
        ours = server.path
        with pytest.raises(UapiSocketError, match=f"socket {theirs} is in use: another WireGuard serves this name"):
            with served(theirs_name, MemoryDevice()):
                pass
        assert os.path.exists(theirs)  # and its socket stays
        assert query(ours, GOLDEN_SET.encode()) == query(theirs, GOLDEN_SET.encode()) == b"errno=0\n\n"
        assert query(ours, b"get=1\n\n") == query(theirs, b"get=1\n\n")
        for bad in (b"set=1\nfoo=1\n\n", b"set=1\nnoequals\n\n", b"set=1\nlisten_port=70000\n\n",
                    b"set=1\nreplace_peers=false\n\n", b"set=1\npublic_key=zz\n\n", b"get=1\nx\n", b"bogus=1\n\n"):
            assert query(ours, bad) == query(theirs, bad), bad
        assert query(ours, b"get=1\n\n") == query(theirs, b"get=1\n\n")

        # The same `wg set` on both: a second peer that takes one of the first's prefixes.
        for name in (ours_name, theirs_name):
            wg("set", name, "peer", PEER2.base64(), "allowed-ips", "10.9.0.0/16,10.10.0.0/16", "endpoint",
               "192.0.2.9:7")
        assert peer_blocks(query(ours, b"get=1\n\n")) == peer_blocks(query(theirs, b"get=1\n\n"))
        for name in (ours_name, theirs_name):
            wg("set", name, "peer", PEER.base64(), "remove", "peer", PEER2.base64(), "persistent-keepalive", "0")
        assert query(ours, b"get=1\n\n") == query(theirs, b"get=1\n\n")
        show = [wg("showconf", n).stdout for n in (ours_name, theirs_name)]
        assert show[0] == show[1] and "[Peer]" in show[0]
        assert wg("show", ours_name).stdout.replace(ours_name, "X") == \
            wg("show", theirs_name).stdout.replace(theirs_name, "X")


def test_a_thousand_peers_through_setconf_and_back(names, tmp_path):
    """A request and a reply of many reads and writes (~100 KB each way) with the real tool."""
    name = names[2]
    peers = [Key((i + 1).to_bytes(32, "big")) for i in range(1000)]
    conf = "[Interface]\nListenPort = 51821\n" + "".join(
        f"\n[Peer]\nPublicKey = {k.base64()}\nAllowedIPs = 10.{i >> 8}.{i & 255}.0/24, fd00:{i:x}::/64\n"
        f"Endpoint = 192.0.2.{i % 250 + 1}:{1000 + i}\n" for i, k in enumerate(peers))
    path = tmp_path / "many.conf"
    path.write_text(conf)
    device = MemoryDevice()
    with served(name, device):
        wg("setconf", name, str(path))
        assert list(device.config.peers) == peers
        dump = wg("show", name, "dump").stdout.splitlines()
        assert len(dump) == 1001 and dump[1000].split("\t")[:4] == [
            peers[999].base64(), "(none)", "192.0.2.250:1999", "10.3.231.0/24,fd00:3e7::/64"]
        first = device.config
        again = tmp_path / "again.conf"
        again.write_text(wg("showconf", name).stdout)
        wg("setconf", name, str(again))
        assert device.config == first and device.config is not first and device.commits == 2
