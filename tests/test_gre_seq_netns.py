"""Issue 20: ``tunneld --mode gre --seq --csum`` with three peers. Each peer's RFC 2890 sequence numbers are
judged in its own session, so peers whose counters stand far apart all get through, and an out-of-order packet
from one peer does not disturb another's.

A hub with three spokes on a switched underlay (tunneld.testbed.segment), every tunneld with sequence numbers
and checksums. Spoke 1 sends a 2 MiB transfer first, so its counter runs thousands ahead of spokes 2 and 3,
whose packets must still be in order in their own windows. Then scapy, from spoke 1's namespace, sends the hub
copies of a packet carrying spoke 1's long-gone sequence number 0 (its checksum right, its inner packet
valid): each is dropped as ``sequence``, and spoke 1, 2 and 3 carry on as before.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import GRE

from tunneld.testbed import Host, Tunneld, segment, transfer
from tunneld.testbed.prom import exposition, total

pytestmark = pytest.mark.netns

METRICS = "127.0.0.1:9477"
XFER = 2 << 20
LATE = 5  # copies of the late packet (fewer than the 16 consecutive late ones that would mean a restart)

SEND_RAW_GRE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
packet = bytes.fromhex(sys.argv[2])
for _ in range(int(sys.argv[3])):
    s.sendto(packet, (sys.argv[1], 0))
"""


def hub_config(tmp: Path, hub: Host, spokes: list[Host]) -> Path:
    lines = ["[tunnel]", 'mode = "gre"', "seq = true", "csum = true", f'address = ["{hub.overlay}/24"]', ""]
    for i, s in enumerate(spokes):
        lines += ["[[peer]]", f'address = "{s.underlay}"', f'name = "spoke{i + 1}"', f'routes = ["{s.overlay}/32"]',
                  ""]
    path = tmp / "hub.toml"
    path.write_text("\n".join(lines))
    return path


def sequence_drops(hub: Host) -> float:
    return total(exposition(hub, METRICS), "tunneld_dropped_packets_total", reason="sequence")


def test_gre_seq_csum_hub_with_three_peers_judges_each_peers_sequence_on_its_own(tmp_path):
    with segment(4) as hosts:
        hub, *spokes = hosts
        th = Tunneld(hub, "--config", str(hub_config(tmp_path, hub, spokes)), "--metrics-listen", METRICS,
                     runtime_dir=hub.runtime_dir)
        ts = [Tunneld(s, "--mode", "gre", "--seq", "--csum", "--peer", hub.underlay, "--address", f"{s.overlay}/24",
                      runtime_dir=s.runtime_dir) for s in spokes]
        s1, s2, s3 = spokes
        s1.wait_ping(hub.overlay, timeout=15)
        sent, received = transfer(s1, hub, hub.overlay, XFER)
        assert sent == received and sent.startswith(f"{XFER} "), (sent, received)
        # Spoke 1's counter is now thousands ahead; spokes 2 and 3 start from 0, each in its own window.
        for s in (s2, s3):
            s.wait_ping(hub.overlay, timeout=15)
            hub.wait_ping(s.overlay, timeout=15)
            assert s.ping(hub.overlay, count=5, interval=0.1)
        by_name = {p["name"]: p for p in th.show()["peers"]}
        assert by_name["spoke1"]["rx_packets"] > 1000 > by_name["spoke2"]["rx_packets"] > 0, by_name
        assert sequence_drops(hub) == 0  # none of them was judged against another peer's numbers

        # From spoke 1's address, spoke 1's first sequence number again: late, dropped, spoke 1's alone.
        late = GRE(chksum_present=1, seqnum_present=1, sequence_number=0) / IP(src=s1.overlay, dst=hub.overlay) \
            / ICMP(id=0x5353, seq=1) / b"late"
        before = {name: p["dropped"] for name, p in by_name.items()}
        s1.run(sys.executable, "-c", SEND_RAW_GRE, hub.underlay, bytes(late).hex(), str(LATE))
        for _ in range(50):  # bounded: up to ~10 s
            if sequence_drops(hub) >= LATE:
                break
            s1.run("sleep", "0.2")
        assert sequence_drops(hub) == LATE
        after = {p["name"]: p["dropped"] for p in th.show()["peers"]}
        assert after["spoke1"] - before["spoke1"] >= LATE, (before, after)
        # (a spoke's own IPv6 link-local chatter, outside its routes, may add a drop or two meanwhile)
        assert all(after[n] - before[n] < LATE for n in ("spoke2", "spoke3")), (before, after)
        # Every spoke's real packets are still in order in its own window: none dropped as sequence.
        for s in spokes:
            assert s.ping(hub.overlay, count=5, interval=0.1)
        sent, received = transfer(s2, hub, hub.overlay, XFER)
        assert sent == received
        assert sequence_drops(hub) == LATE
        assert th.stop() == 0 and all(t.stop() == 0 for t in ts)
