"""Issue 20's proof of the session contract end to end: two real tunnelds in namespaces speak the test-only keyed
codec (tests/keyed.py: per-peer counters in a header, a 16-byte BLAKE2s trailer, keepalives on a timer, the
peer named by a header field), with offloads asked for and not, and the peer's endpoint moves.

The codec is visible to this test's tunnelds only: its module (a copy of tests/keyed.py) and a .dist-info
naming the entry point, written to a temporary directory on their PYTHONPATH (as
tests/test_refusing_plugin_netns.py does). Stateful codecs move packets one by one whatever is asked: the
start-up line says "offload off" and the TUN device has no TSO either way.

The endpoint move: mid-run, host A gets a second underlay address and its datagrams leave from it (a /32 route
to B with that source); B's tunneld follows A there on the word of A's authenticated packets, with no change
of configuration, and keeps following after A's first address is removed. A datagram from a third address
naming A, with a bad tag or an old counter, is dropped by reason and never moves A's endpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP

from tests import keyed
from tunneld.testbed import OVERLAY_V4, TUNNELD, Tunneld, features, transfer
from tunneld.testbed.prom import exposition, total

pytestmark = pytest.mark.netns

SECRET = "netns-test-secret"
KEEPALIVE = 0.5
METRICS = "127.0.0.1:9477"
A2 = "10.231.0.11"  # A's second underlay address (in the testbed's /24, nobody else's)
STRANGER = "10.231.0.99"  # the spoofer's
TRANSFER = 1 << 20

DIST_INFO = {
    "tunneld_keyed-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: tunneld-keyed\nVersion: 0.1\n",
    "tunneld_keyed-0.1.dist-info/entry_points.txt": "[tunneld.encapsulators]\nkeyed = tunneld_keyed:Keyed\n",
}


@pytest.fixture
def keyed_on_path(tmp_path, monkeypatch):
    for name, text in DIST_INFO.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "tunneld_keyed.py").write_text(Path(keyed.__file__).read_text())
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, (str(tmp_path), os.environ.get("PYTHONPATH")))))
    return tmp_path


def start(host, peer, overlay: str, *opts: str) -> Tunneld:
    return Tunneld(host, "--mode", "keyed", "--peer", peer, "--self", host.underlay, "--secret", SECRET,
                   "--opt", f"keepalive={KEEPALIVE}", "--address", f"{overlay}/24", "--metrics-listen", METRICS,
                   *opts)


def metric(host, name: str, **labels: str) -> float:
    return total(exposition(host, METRICS), name, **labels)


def wait_for(what, predicate, timeout: float = 10, every: float = 0.2):
    """Ask ``what()`` until ``predicate`` holds for its answer (bounded); return the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(every)


def endpoint_of(t: Tunneld) -> str:
    (peer,) = t.show()["peers"]
    return peer["address"]


def assert_transfers(a, b) -> None:
    for src, dst, addr in ((a, b, OVERLAY_V4[1]), (b, a, OVERLAY_V4[0])):
        sent, received = transfer(src, dst, addr, TRANSFER, timeout=60)
        assert sent == received and sent.startswith(f"{TRANSFER} "), (sent, received)


SPOOF = """
import hashlib, socket, struct, sys
source, target, port, identity, secret, inner = sys.argv[1:7]
def datagram(counter, good):
    head = bytes([1, 0, 0, 0]) + bytes.fromhex(identity) + struct.pack("!Q", counter) + bytes.fromhex(inner)
    tag = hashlib.blake2s(head, key=secret.encode(), digest_size=16).digest()
    return head + (tag if good else bytes(b ^ 0x5A for b in tag))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((source, 0))
s.sendto(datagram(1 << 40, False), (target, int(port)))  # a forged tag (its counter far ahead of A's)
s.sendto(datagram(0, True), (target, int(port)))  # A's very first datagram again: a valid tag, an old counter
"""


@pytest.mark.parametrize("offload", [(), ("--no-offload",)], ids=["offload-default", "no-offload"])
def test_keyed_codec_between_two_tunnelds_with_keepalives_and_a_moving_endpoint(keyed_on_path, hosts, offload):
    listed = subprocess.run([TUNNELD, "--list-modes"], capture_output=True, text=True, timeout=30).stdout
    assert "keyed" in listed, listed
    a, b = hosts
    ta = start(a, b.underlay, OVERLAY_V4[0], *offload)
    try:
        tb = start(b, a.underlay, OVERLAY_V4[1], *offload)
    except BaseException:
        ta.kill()
        raise
    try:
        a.wait_ping(OVERLAY_V4[1], timeout=15)
        b.wait_ping(OVERLAY_V4[0], timeout=15)
        for h in (a, b):  # one packet at a time whatever was asked: the TUN device takes no super-frames
            assert features(h)["tcp-segmentation-offload"] == "off"
        assert_transfers(a, b)

        # Keepalives while idle: every KEEPALIVE seconds without sending, each end sends one of its own.
        before = metric(b, "tunneld_codec_packets_total")
        after = wait_for(lambda: metric(b, "tunneld_codec_packets_total"), lambda n: n >= before + 3, timeout=10)
        assert after >= before + 3, (before, after)
        assert metric(a, "tunneld_codec_packets_total") > 0

        # A's datagrams now leave from A2: B follows them, on the word of A's authenticated packets.
        assert endpoint_of(tb) == a.underlay
        a.run("ip", "addr", "add", f"{A2}/32", "dev", a.ifname)
        a.run("ip", "route", "replace", f"{b.underlay}/32", "dev", a.ifname, "src", A2)
        moved = wait_for(lambda: metric(b, "tunneld_endpoint_changes_total"), lambda n: n >= 1, timeout=10)
        # (once, unless a datagram that left from A's first address overtook one from A2: then B went back and
        # came again, as WireGuard would; where it ends is what matters)
        assert moved >= 1, moved
        assert wait_for(lambda: endpoint_of(tb), lambda e: e == A2, timeout=5) == A2
        a.run("ip", "addr", "del", f"{a.underlay}/24", "dev", a.ifname)  # A's first address is gone
        a.wait_ping(OVERLAY_V4[1], timeout=10)
        b.wait_ping(OVERLAY_V4[0], timeout=10)
        assert_transfers(a, b)
        shown = tb.show()["peers"][0]
        assert shown["address"] == A2 and shown["rx_packets"] > 0, shown  # its counters follow it too

        # A third address names A: a forged tag, then an old counter. Dropped by reason; A stays where it is.
        moves = metric(b, "tunneld_endpoint_changes_total")
        drops = {r: metric(b, "tunneld_dropped_packets_total", reason=r) for r in ("bad_checksum", "sequence")}
        a.run("ip", "addr", "add", f"{STRANGER}/32", "dev", a.ifname)
        inner = bytes(IP(src=OVERLAY_V4[0], dst=OVERLAY_V4[1]) / ICMP(id=0x5151) / b"spoofed")
        a.run(sys.executable, "-c", textwrap.dedent(SPOOF), STRANGER, b.underlay, str(keyed.PORT),
              keyed.identity_bytes(a.underlay).hex(), SECRET, inner.hex())
        got = wait_for(lambda: {r: metric(b, "tunneld_dropped_packets_total", reason=r) for r in drops},
                       lambda d: all(d[r] >= drops[r] + 1 for r in d), timeout=10)
        assert all(got[r] == drops[r] + 1 for r in drops), (drops, got)
        assert endpoint_of(tb) == A2 and metric(b, "tunneld_endpoint_changes_total") == moves
        b.wait_ping(OVERLAY_V4[0], timeout=10)  # still A2's
    finally:
        ta.stop()
        status = tb.stop()
    assert status == 0
    for t in (ta, tb):  # asked for or not, a stateful codec's packets move one by one
        log = t.output()
        assert "keyed on tunneld0" in log and "offload off" in log, log
