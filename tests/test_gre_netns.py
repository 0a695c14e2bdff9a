"""GRE and GRE-TEB between namespaces: tunneld against itself, against a scapy peer, under tshark's eye.

The CI kernel has no GRE driver, so there is no kernel peer to prove interoperability against; scapy (crafting
and parsing the packets) and tshark (dissecting a capture of the underlay) stand in as implementations nobody
here wrote.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.support import REPO
from tunneld.testbed import OVERLAY_V4, OVERLAY_V6, TUNNELD, Tunneld, drops, start_pair, tcpdump, transfer

pytestmark = pytest.mark.netns

ALL_OPTIONS = ("--key", "3735928559", "--seq", "--csum")  # key 0xDEADBEEF
TRANSFER_BYTES = 1 << 20


def summary(t: Tunneld) -> str:
    assert t.stop() == 0
    out = t.output()
    line = [ln for ln in out.splitlines() if "shutting down" in ln]
    assert line, out
    return line[-1]


def device_mtu(host, dev: str = "tunneld0") -> int:
    return int(re.search(r"mtu (\d+)", host.run("ip", "link", "show", "dev", dev).stdout).group(1))


def assert_transfer(src, dst, dst_addr: str) -> None:
    sent, received = transfer(src, dst, dst_addr, TRANSFER_BYTES)
    assert sent == received and sent.startswith(f"{TRANSFER_BYTES} "), (sent, received)


@pytest.mark.parametrize(
    "mode,opts,mtu",
    [
        ("gre", (), 1500 - 20 - 4),  # Linux 'ip link add type gre' picks 1476 too
        ("gre", ALL_OPTIONS, 1500 - 20 - 16),
        ("gretap", (), 1500 - 20 - 4 - 14),  # and 1462 for gretap
        ("gretap", ALL_OPTIONS, 1500 - 20 - 16 - 14),
    ],
    ids=["gre", "gre-key-seq-csum", "gretap", "gretap-key-seq-csum"],
)
def test_tunneld_pair_ping_and_transfer(module_hosts, mode, opts, mtu):
    a, b = module_hosts
    ta, tb = start_pair(a, b, mode, *opts)
    assert device_mtu(a) == mtu
    a.wait_ping(OVERLAY_V4[1])
    a.wait_ping(OVERLAY_V6[1])  # also waits out IPv6 duplicate address detection on the TAP
    assert_transfer(a, b, OVERLAY_V4[1])
    assert_transfer(b, a, OVERLAY_V6[0])
    for t in (ta, tb):
        line = summary(t)
        bad = {r: n for r, n in drops(line).items() if r not in ("socket_error",)}  # start-up ICMP errors only
        assert not bad, line


@pytest.mark.parametrize("mode", ["gre", "gretap"])
def test_ipv6_underlay(module_hosts, mode):
    a, b = module_hosts
    ta, tb = start_pair(a, b, mode, "--key", "7", "--csum", underlay6=True)
    assert device_mtu(a) == 1500 - 40 - 12 - (14 if mode == "gretap" else 0)
    a.wait_ping(OVERLAY_V4[1])
    a.wait_ping(OVERLAY_V6[1])
    assert ta.stop() == 0 and tb.stop() == 0
    assert "peer fd00:231::2 ip proto 47" in ta.output()


def test_key_mismatch_is_dropped_and_counted(module_hosts):
    a, b = module_hosts
    ta = Tunneld(a, "--mode", "gre", "--peer", b.underlay, "--key", "1", "--address", f"{OVERLAY_V4[0]}/24")
    tb = Tunneld(b, "--mode", "gre", "--peer", a.underlay, "--key", "2", "--address", f"{OVERLAY_V4[1]}/24")
    assert not a.ping(OVERLAY_V4[1], count=3, timeout=3)
    line = summary(tb)
    assert drops(line).get("key_mismatch", 0) >= 3, line
    assert "rx 0 packets" in line
    ta.stop()


def test_scapy_peer_exchanges_gre_with_key_seq_csum(module_hosts):
    """tunneld in A; in B no tunneld, only scapy behind a raw socket, speaking GRE with C, K and S."""
    a, b = module_hosts
    key = 0xDEADBEEF
    ta = Tunneld(a, "--mode", "gre", "--peer", b.underlay, "--key", str(key), "--seq", "--csum",
                 "--address", f"{OVERLAY_V4[0]}/24", "--address", f"{OVERLAY_V6[0]}/64")
    r = b.run(sys.executable, "-m", "tests.gre_peer", a.underlay, str(key), OVERLAY_V4[1], OVERLAY_V4[0],
              OVERLAY_V6[1], OVERLAY_V6[0], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    # tunneld answered every echo request scapy wrapped, in both families
    # (ipv4 3 came in an outer header with IP options, which the raw link must strip too)
    assert report["replies"] == {"ipv4": [0, 1, 2, 3], "ipv6": [0, 1, 2]}
    # and none of the packets it had to drop got through
    assert report["all_replies"] == report["replies"]
    seen = report["seen"]
    assert len(seen) >= 6
    for g in seen:  # every packet tunneld sent parses in scapy with the configured options
        assert (g["c"], g["k"], g["s"], g["r"], g["version"]) == (1, 1, 1, 0, 0), g
        assert g["key"] == key and g["csum_ok"], g
        assert g["proto"] in (0x0800, 0x86DD)
    numbers = [g["seq"] for g in seen]
    assert all(later - earlier == 1 for earlier, later in zip(numbers, numbers[1:])), numbers
    line = summary(ta)
    assert drops(line) == {"key_mismatch": 1, "bad_checksum": 1, "sequence": 1}, line


TSHARK_FIELDS = ["ip.src", "gre.flags.checksum", "gre.flags.key", "gre.flags.sequence_number",
                 "gre.flags.routing", "gre.flags.version", "gre.key", "gre.proto", "gre.sequence_number",
                 "gre.checksum.status", "eth.type", "icmp.type", "icmpv6.type"]


def tshark_rows(capture) -> list[dict[str, str]]:
    out = subprocess.run(
        ["tshark", "-r", str(capture), "-T", "fields", "-E", "separator=|",
         "-E", "occurrence=a", "-E", "aggregator=;", *sum((["-e", f] for f in TSHARK_FIELDS), [])],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    # A field can occur in the outer and the inner packet: the outer IP source is the first ip.src, the inner
    # frame's EtherType (gretap) the last eth.type.
    return [
        {field: values.split(";")[-1 if field == "eth.type" else 0] for field, values in zip(TSHARK_FIELDS, line.split("|"))}
        for line in out.splitlines() if line
    ]


def echo_counts(rows) -> dict[str, dict[str, int]]:
    echo = {"v4": {"req": 0, "rep": 0}, "v6": {"req": 0, "rep": 0}}
    for row in rows:
        for family, field, req, rep in (("v4", "icmp.type", "8", "0"), ("v6", "icmpv6.type", "128", "129")):
            echo[family]["req"] += row[field] == req
            echo[family]["rep"] += row[field] == rep
    return echo


def _complete(echo) -> bool:
    return all(n >= 3 for counts in echo.values() for n in counts.values())


@pytest.mark.parametrize("mode", ["gre", "gretap"])
def test_tshark_decodes_tunneld_gre(module_hosts, tmp_path, mode):
    a, b = module_hosts
    os.chmod(tmp_path, 0o755)  # tshark drops privileges before reading
    capture = tmp_path / "underlay.pcap"
    ta, tb = start_pair(a, b, mode, *ALL_OPTIONS)
    a.wait_ping(OVERLAY_V4[1])
    a.wait_ping(OVERLAY_V6[1])
    dump = tcpdump(b, capture, "ip proto 47 or ip6 proto 47")
    try:
        assert a.ping(OVERLAY_V4[1], count=3)
        assert a.ping(OVERLAY_V6[1], count=3)
        deadline = time.monotonic() + 5  # on a loaded machine the last packets can take a moment to be written
        while time.monotonic() < deadline and not _complete(echo_counts(tshark_rows(capture))):
            time.sleep(0.2)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)
    rows = tshark_rows(capture)
    assert rows, "tshark decoded nothing"
    for row in rows:
        assert row["gre.flags.checksum"] in ("1", "True") and row["gre.flags.key"] in ("1", "True"), row
        assert row["gre.flags.sequence_number"] in ("1", "True"), row
        assert row["gre.flags.routing"] in ("0", "False") and row["gre.flags.version"] == "0", row
        assert int(row["gre.key"], 0) == 0xDEADBEEF, row
        # Wireshark verifies GRE checksums itself: status 1 is PROTO_CHECKSUM_E_GOOD (0 bad, 2 unverified)
        assert row["gre.checksum.status"] == "1", row
        proto = int(row["gre.proto"], 0)
        if mode == "gre":
            assert proto in (0x0800, 0x86DD), row
        else:
            assert proto == 0x6558 and row["eth.type"], row
    echo = echo_counts(rows)
    assert _complete(echo), echo
    # Sequence numbers from each sender count up by one, as RFC 2890 asks.
    assert {row["ip.src"] for row in rows} == {a.underlay, b.underlay}
    for sender in (a.underlay, b.underlay):
        numbers = [int(row["gre.sequence_number"]) for row in rows if row["ip.src"] == sender]
        assert all(y - x == 1 for x, y in zip(numbers, numbers[1:])), numbers
    for t in (ta, tb):
        t.stop()


def test_without_cap_net_raw_says_what_is_needed(module_hosts):
    a, b = module_hosts
    # Root, but with CAP_NET_RAW gone from the bounding set: CAP_NET_ADMIN stays, the raw socket is refused.
    r = a.run("setpriv", "--bounding-set=-net_raw", TUNNELD, "--mode", "gre", "--peer", b.underlay, check=False)
    assert r.returncode == 77, r.stderr
    assert "CAP_NET_RAW" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert a.link_state("tunneld0") is None
