"""Issue 12's proof against real peers: many hosts on one tunnel, on a switched underlay (tunneld.testbed.segment).

Hosts are namespaces joined by a bridge in a switch namespace; every host has its own runtime directory for
the control socket. The overlay's peers are tunnelds and the Linux kernel's own VXLAN with all-zero FDB
entries (head-end replication, learning), the reference for what a VTEP on a segment does.

What each test assumes of tunneld (issue 12, /work/wt/SPEC12.md): ``--peer`` repeated, ``[[peer]]`` tables with
``address``/``name``/``routes``/``macs``, ``--fdb-max``, ``--runtime-dir``; the client commands ``tunneld show
DEV --json`` and ``tunneld peer add|remove DEV ADDR``; the JSON keys ``peers[].address|name|routes|dropped``,
``fdb[].mac|peer|static``, ``fdb_max``, ``fdb_refused_total``; the metrics ``tunneld_fdb_entries`` and
``tunneld_dropped_packets_total{reason="source_not_allowed"}``; the control socket ``RUNTIME_DIR/DEV.sock``, mode
0600, speaking JSON lines (``{"command": "show"}`` → ``{"ok": true, "result": {...}}``, an error as one line
with ``"error"``, ``"busy": true`` past its client cap). Throughput is never judged here: under a MAC storm and
live peer changes the tests hold that nothing is lost and no second of the stream goes without traffic; how
fast the stream runs meanwhile, against before and after, is bench/overlay.py's figure.

Only the first test runs without issue 12 (the kernel's VTEPs alone: the testbed and the measurements).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP

from bench import measure
from bench.overlay import (FDB_MAX, STORM_MACS, STREAM_S, iperf_stream, peer_changes, stalls, storm, stream_report,
                           vxlan_tunneld)
from tunneld.testbed import Host, Tunneld, kernel_fdb, kernel_vxlan, segment, sh, tcpdump, transfer
from tunneld.testbed.peers import TUNNELD
from tunneld.testbed.procfs import rss_bytes
from tunneld.testbed.prom import exposition, samples, total

pytestmark = pytest.mark.netns

VNI = 42
PORT = 4789
DEV = "tunneld0"
XFER = 1 << 20  # per ordered pair: enough for TCP to get going and for the MACs to be learnt
UNICAST = 2 << 20  # the unicast transfer a bystander watches
MAX_BYSTANDER_BYTES = UNICAST // 100  # ARP/ND floods during the transfer (~100 B each); a copied stream: ~UNICAST
NOBODYS_OVERLAY = "192.168.232.200"  # in the segment's overlay /24, no host's
INNER_ARP = "udp[28:2] = 0x0806"  # the inner EtherType: after UDP (8), VXLAN (8) and two MACs (12)
XFER_PORT = 5301  # transfers beside an iperf3 server, which holds 5201


# -- helpers --------------------------------------------------------------------------------------------------


def kernel_vtep(host: Host, peers: list[Host]) -> None:
    kernel_vxlan(host, [p.underlay for p in peers], dev="vx0", vni=VNI, port=PORT, address=f"{host.overlay}/24")


def others(hosts: list[Host], me: Host) -> list[Host]:
    return [h for h in hosts if h is not me]


def assert_every_pair_pings_and_transfers(hosts: list[Host], nbytes: int = XFER) -> None:
    for src in hosts:
        for dst in others(hosts, src):
            src.wait_ping(dst.overlay, timeout=15)
    for src in hosts:
        for dst in others(hosts, src):
            sent, received = transfer(src, dst, dst.overlay, nbytes)
            assert sent == received and sent.startswith(f"{nbytes} "), (src.name, dst.name, sent, received)


@contextmanager
def captures(hosts: list[Host], tmp: Path, tag: str, also: str = ""):
    """tcpdump on each host's underlay, measuring the VXLAN datagrams addressed *to that host* (a bridge port
    also shows what the switch floods past it; only what was sent to the host is a copy of the overlay's).
    Yields a dict that holds, once the block is left, ``{host name: (datagrams, bytes)}``; bytes are the
    packets' lengths on the wire, so that GSO super-packets handed to tcpdump whole count for what they carry."""
    procs = {}
    counts: dict[str, tuple[int, int]] = {}
    try:
        for h in hosts:
            path = tmp / f"{tag}-{h.name}.pcap"
            bpf = f"udp dst port {PORT} and dst host {h.underlay}" + (f" and {also}" if also else "")
            procs[h.name] = (tcpdump(h, path, bpf, "-s", "128"), path)
        yield counts
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    for name, (_, path) in procs.items():
        counts[name] = pcap_totals(path)


def pcap_totals(path: Path) -> tuple[int, int]:
    """(packets, bytes on the wire) of a classic pcap file: each record header's orig_len (not the snapped
    length), read with the byte order the file's magic says."""
    data = path.read_bytes()
    order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    packets = total_len = 0
    offset = 24
    while offset + 16 <= len(data):
        _, _, incl, orig = struct.unpack_from(f"{order}IIII", data, offset)
        packets += 1
        total_len += orig
        offset += 16 + incl
    return packets, total_len


def assert_broadcast_reaches_all(src: Host, others_: list[Host], tmp: Path) -> None:
    """Head-end replication: src's ARP requests for an overlay address nobody has (broadcasts) arrive at
    every other host's underlay as datagrams addressed to it."""
    with captures(others_, tmp, f"flood-{src.name[-2:]}", also=INNER_ARP) as counts:
        src.run("ping", "-c", "1", "-W", "1", NOBODYS_OVERLAY, check=False)
        time.sleep(0.3)
    assert all(packets >= 1 for packets, _ in counts.values()), counts


def assert_unicast_not_copied(src: Host, dst: Host, bystanders: list[Host], tmp: Path) -> None:
    """A unicast transfer from src to dst, with MACs learnt: dst's underlay carries it, no bystander's does."""
    with captures([dst, *bystanders], tmp, f"{src.name[-2:]}-{dst.name[-2:]}") as counts:
        sent, received = transfer(src, dst, dst.overlay, UNICAST)
        time.sleep(0.3)  # the last datagrams reach the captures
    assert sent == received
    # Positive control: the capture does see the stream where it goes.
    assert counts[dst.name][1] >= UNICAST // 2, counts
    for b in bystanders:
        assert counts[b.name][1] <= MAX_BYSTANDER_BYTES, (f"{b.name} got copies of {src.name}→{dst.name}", counts)


def metrics_total(host: Host, name: str, **labels: str) -> float:
    return total(exposition(host), name, **labels)


def rss(pids: list[int]) -> int:
    return sum(rss_bytes(pid) for pid in pids)


@pytest.fixture
def hosts4():
    with segment(4) as hosts:
        yield hosts


@pytest.fixture
def hosts3():
    with segment(3) as hosts:
        yield hosts


# -- 1. one VXLAN segment: tunneld and the kernel as peers ---------------------------------------------------


def test_kernel_vteps_on_the_segment_flood_broadcast_and_not_unicast(hosts4, tmp_path):
    """The testbed and the measurement, with the reference alone (runs without issue 12): four kernel VTEPs
    with all-zero FDB entries. A broadcast is copied to every other host; learnt unicast is not."""
    for h in hosts4:
        kernel_vtep(h, others(hosts4, h))
    a, b, c, d = hosts4
    for h in hosts4:
        zeros = [e for e in kernel_fdb(h) if e["mac"] == "00:00:00:00:00:00"]
        assert sorted(e["dst"] for e in zeros) == sorted(o.underlay for o in others(hosts4, h))
    assert_broadcast_reaches_all(a, [b, c, d], tmp_path)
    assert_every_pair_pings_and_transfers(hosts4)
    learnt = {e["dst"] for e in kernel_fdb(a) if e["mac"] != "00:00:00:00:00:00" and "dst" in e}
    assert learnt == {b.underlay, c.underlay, d.underlay}
    assert_unicast_not_copied(a, c, [b, d], tmp_path)


def test_four_hosts_two_tunneld_two_kernel_on_one_segment(hosts4, tmp_path):
    """Issue 12's first proof: two tunnelds (one with two workers) and two kernel VTEPs, one VNI."""
    a, b, c, d = hosts4
    ta = vxlan_tunneld(a, others(hosts4, a), "--workers", "2")
    tb = vxlan_tunneld(b, others(hosts4, b))
    kernel_vtep(c, others(hosts4, c))
    kernel_vtep(d, others(hosts4, d))
    assert_broadcast_reaches_all(a, [b, c, d], tmp_path)  # head-end replication by tunneld
    assert_every_pair_pings_and_transfers(hosts4)
    time.sleep(1.2)  # workers agree on the FDB within 1 s (issue 12)

    # tunneld's own view: every peer heard from, the kernel VTEPs' MACs learnt behind their addresses.
    for t, h in ((ta, a), (tb, b)):
        shown = t.show()
        assert {p["address"] for p in shown["peers"]} == {o.underlay for o in others(hosts4, h)}
        assert all(p["rx_packets"] > 0 and p["tx_packets"] > 0 for p in shown["peers"]), shown["peers"]
        learnt_behind = {e["peer"] for e in shown["fdb"] if not e["static"]}
        assert learnt_behind == {o.underlay for o in others(hosts4, h)}, shown["fdb"]

    # Unicast between two hosts is nobody else's business: tunneld→kernel, kernel→tunneld, tunneld→tunneld.
    assert_unicast_not_copied(a, c, [b, d], tmp_path)
    assert_unicast_not_copied(d, b, [a, c], tmp_path)
    assert_unicast_not_copied(b, a, [c, d], tmp_path)
    assert ta.stop() == 0 and tb.stop() == 0


# -- 2. GRE: a hub with three spokes and routes -------------------------------------------------------------


FORGED = 50


def hub_config(tmp: Path, hub: Host, spokes: list[Host]) -> Path:
    lines = ["[tunnel]", 'mode = "gre"', f'address = ["{hub.overlay}/24"]', ""]
    for i, s in enumerate(spokes):
        lines += ["[[peer]]", f'address = "{s.underlay}"', f'name = "spoke{i + 1}"', f'routes = ["{s.overlay}/32"]',
                  ""]
    path = tmp / "hub.toml"
    path.write_text("\n".join(lines))
    return path


def send_forged(host: Host, packet: bytes, count: int) -> None:
    """Write ``count`` copies of a complete IPv4 packet (its source forged) into the host's tunnel device."""
    script = ("import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_RAW);"
              "s.setsockopt(socket.SOL_SOCKET,socket.SO_BINDTODEVICE,sys.argv[1].encode());"
              "p=bytes.fromhex(sys.argv[2]);[s.sendto(p,(sys.argv[3],0)) for _ in range(int(sys.argv[4]))]")
    dst = IP(packet).dst
    host.run(sys.executable, "-c", script, DEV, packet.hex(), dst, str(count))


def test_gre_hub_three_spokes_routes_and_forged_sources(tmp_path):
    with segment(4) as hosts:
        hub, *spokes = hosts
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.default.send_redirects=0"):
            hub.run("sysctl", "-qw", key)
        th = Tunneld(hub, "--config", str(hub_config(tmp_path, hub, spokes)), runtime_dir=hub.runtime_dir)
        # A spoke has one peer and no routes: everything goes to the hub, anything from it is accepted.
        ts = [Tunneld(s, "--mode", "gre", "--peer", hub.underlay, "--address", f"{s.overlay}/24",
                      runtime_dir=s.runtime_dir) for s in spokes]
        shown = th.show()
        assert {p["address"]: p["routes"] for p in shown["peers"]} == {s.underlay: [f"{s.overlay}/32"] for s in spokes}
        assert {p["name"] for p in shown["peers"]} == {"spoke1", "spoke2", "spoke3"}
        assert "fdb" not in shown  # an L3 mode has routes, not an FDB
        for s in spokes:
            s.wait_ping(hub.overlay, timeout=15)
            hub.wait_ping(s.overlay, timeout=15)
        # Spoke to spoke through the hub: its route for the destination, its kernel forwarding.
        s1, s2, s3 = spokes
        s1.wait_ping(s2.overlay, timeout=15)
        s3.wait_ping(s1.overlay, timeout=15)
        sent, received = transfer(s1, s2, s2.overlay, XFER)
        assert sent == received

        # Spoke 3 forges spoke 2's inner source: the hub drops every one and counts it.
        before = metrics_total(hub, "tunneld_dropped_packets_total", reason="source_not_allowed")
        # Spoke 2 may have drops of its own already (its TUN's IPv6 link-local chatter lies outside its routes,
        # as it would with WireGuard's AllowedIPs): the forgeries must not add to them.
        s2_dropped = {p["address"]: p for p in th.show()["peers"]}[s2.underlay]["dropped"]
        forged = bytes(IP(src=s2.overlay, dst=hub.overlay) / ICMP(id=0x4343, seq=1) / b"forged")
        with captures_on(hub, DEV, f"icmp and src host {s2.overlay}", tmp_path / "forged.pcap") as seen:
            send_forged(s3, forged, FORGED)
            # Until the hub has counted them (bounded): then every forgery has met the hub while the capture ran.
            deadline = time.monotonic() + 10
            while (metrics_total(hub, "tunneld_dropped_packets_total", reason="source_not_allowed") - before < FORGED
                   and time.monotonic() < deadline):
                time.sleep(0.1)
        assert seen["count"] == 0, "a forged packet reached the hub's device"
        after = metrics_total(hub, "tunneld_dropped_packets_total", reason="source_not_allowed")
        assert after - before >= FORGED
        by_address = {p["address"]: p for p in th.show()["peers"]}
        assert by_address[s3.underlay]["dropped"] >= FORGED
        # (its own chatter may still add a packet or two meanwhile; the forgeries would add FORGED)
        assert by_address[s2.underlay]["dropped"] - s2_dropped < FORGED
        # ...and the real spoke 2 is still heard with that source.
        s2.wait_ping(hub.overlay, timeout=5)
        assert th.stop() == 0 and all(t.stop() == 0 for t in ts)


@contextmanager
def captures_on(host: Host, dev: str, bpf: str, path: Path):
    proc = host.popen("tcpdump", "-i", dev, "--immediate-mode", "-U", "-n", "-w", str(path), bpf,
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "listening on" in line or not line:
            break
    seen: dict[str, int] = {}
    try:
        yield seen
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    seen["count"] = len(sh("tcpdump", "-r", str(path), "-n", check=False).stdout.splitlines())


# -- 3. live peer changes while a stream runs ---------------------------------------------------------------


@pytest.mark.serial  # a stream's seconds: a busy neighbour could starve one
def test_peer_add_and_remove_while_a_stream_runs_to_another_peer(hosts3):
    a, b, c = hosts3
    ta = vxlan_tunneld(a, [b])
    vxlan_tunneld(b, [a])
    vxlan_tunneld(c, [a])
    a.wait_ping(b.overlay, timeout=15)

    def check(added: bool) -> None:
        shown = show_over_socket(ta.socket_path())["result"]
        assert (c.underlay in {p["address"] for p in shown["peers"]}) == added, shown["peers"]
        if not added:
            assert all(e["peer"] != c.underlay for e in shown["fdb"]), shown["fdb"]

    server = measure.IperfServer(b)
    try:
        changed = peer_changes(a, ta, b, c, check)  # stream_report raises if the connection broke
    finally:
        server.stop()
    assert changed["changes"] >= 2 and changed["last_change_s"] < STREAM_S, \
        "the changes did not fall inside the stream"
    # No stall: every second of the stream carried data while the peers changed (how much is bench/overlay.py's).
    assert not stalls(changed["report"]), f"seconds without traffic at {stalls(changed['report'])}"
    assert not a.ping(c.overlay, count=2, timeout=3)  # removed means removed


# -- 4. a MAC storm from one peer ---------------------------------------------------------------------------


@pytest.mark.serial  # a stream's seconds, as above
def test_mac_storm_from_one_peer_is_bounded_and_spares_the_others(hosts3):
    a, b, c = hosts3  # b storms a; c moves data to a
    ta = vxlan_tunneld(a, [b, c], "--fdb-max", str(FDB_MAX))
    vxlan_tunneld(b, [a])
    vxlan_tunneld(c, [a])
    c.wait_ping(a.overlay, timeout=15)
    b.wait_ping(a.overlay, timeout=15)
    mac_a = a.run("cat", f"/sys/class/net/{DEV}/address").stdout.strip()
    server = measure.IperfServer(a)
    try:
        # warm-up: allocations the storm should not be blamed for (iperf3's server holds the usual port)
        sent, received = transfer(c, a, a.overlay, XFER, port=XFER_PORT)
        assert sent == received
        pids = ta.pids()
        rss_before = rss(pids)
        stormer = storm(b, mac_a)
        time.sleep(1)
        during = stream_report(iperf_stream(c, a.overlay, 5), 5)  # raises if the stream broke
        sent, received = transfer(c, a, a.overlay, XFER, port=XFER_PORT)
        assert sent == received
        out, _ = stormer.communicate(timeout=60)
        assert stormer.returncode == 0 and int(out.split()[-1]) == STORM_MACS, out
        rss_after = rss(pids)
    finally:
        server.stop()
    shown = ta.show()
    assert shown["fdb_max"] == FDB_MAX
    assert len(shown["fdb"]) <= FDB_MAX
    assert shown["fdb_refused_total"] > 0  # the storm did go past the limit
    assert any(e["peer"] == c.underlay for e in shown["fdb"])  # the other peer's MAC was not pushed out
    entries = samples(exposition(a), "tunneld_fdb_entries")
    assert entries and max(v for _, v in entries) <= FDB_MAX, entries
    assert rss_after - rss_before < 20 << 20, f"RSS grew {(rss_after - rss_before) / 2**20:.1f} MiB"
    # No starvation: every second of the other peer's stream carried data during the storm (its rate against
    # before and after is bench/overlay.py's figure).
    assert not stalls(during), f"seconds without traffic at {stalls(during)}"


# -- 5. the control socket under load, and what it refuses -------------------------------------------------


CONCURRENT_SHOWS = 100  # protocol-level clients, threads of this process
CLI_SHOWS = 10  # `tunneld show` processes at the same time (each a Python start-up: ~1 CPU s here)
BUSY_PAUSES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0)

NOBODY = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
print("connected", flush=True)
try:
    s.sendall(b'{"command": "show"}\n')
    print(s.recv(65536).decode(errors="replace"), flush=True)
except OSError as e:
    print("closed", e, flush=True)
"""


def show_over_socket(path: str) -> dict:
    """One ``{"command": "show"}`` on the control socket (README "Control socket": JSON lines), asked again
    after a pause while the daemon answers "busy", as tunneld's own client does."""
    reply: dict = {}
    for pause in BUSY_PAUSES:
        reply = json.loads(ask(path, b'{"command": "show"}\n', timeout=10) or b"{}")
        if not reply.get("busy"):
            return reply
        time.sleep(pause)
    return reply


def ask(path: str, request: bytes, timeout: float = 5) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(request)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


@pytest.mark.serial  # "during the stream": a busy neighbour could end the clients' turn after it
def test_control_socket_serves_many_during_a_transfer_and_refuses_garbage_and_strangers(hosts3):
    a, b, _ = hosts3
    ta = vxlan_tunneld(a, [b])
    vxlan_tunneld(b, [a])
    a.wait_ping(b.overlay, timeout=15)
    path = ta.socket_path()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    # During a stream: 100 clients at once on the socket (past the server's own cap on concurrent clients, so
    # some are told "busy" and come back, as the tunneld client does), and real `tunneld show` processes.
    server = measure.IperfServer(b)
    try:
        stream = iperf_stream(a, b.overlay, STREAM_S + 5)
        time.sleep(1)
        barrier = threading.Barrier(CONCURRENT_SHOWS)
        replies: list[dict] = []

        def one() -> None:
            barrier.wait(timeout=30)
            replies.append(show_over_socket(path))

        threads = [threading.Thread(target=one) for _ in range(CONCURRENT_SHOWS)]
        argv = a.argv(TUNNELD, "show", DEV, "--json", "--runtime-dir", ta.runtime_dir)
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(CLI_SHOWS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        # The socket's clients were all answered while the stream ran (the processes, each a Python start-up
        # on a loaded 2-CPU machine, may well finish after it: their answers are judged below).
        assert stream.poll() is None, "the stream ended before every client was answered: not 'during'"
        answers = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            answers.append((p.returncode, out, err))
        stream_report(stream, STREAM_S + 5)  # the stream completed (it raises if the stream broke)
    finally:
        server.stop()
    assert len(replies) == CONCURRENT_SHOWS
    assert all(r.get("ok") and r["result"]["peers"][0]["address"] == b.underlay for r in replies), \
        [r for r in replies if not r.get("ok")][:3]
    failed = [(rc, err) for rc, _, err in answers if rc != 0]
    assert not failed, failed[:3]
    assert all(json.loads(out)["peers"][0]["address"] == b.underlay for _, out, _ in answers)

    # Garbage: one error line each, nothing changed, still serving.
    for request in (b"garbage\n", b"\xff\xfe\x00\x01\n", b'{"command": "no-such-command"}\n', b"{\n",
                    b'{"command": "peer-add", "address": "not-an-address"}\n'):
        reply = ask(path, request)
        assert reply.count(b"\n") == 1 and b"error" in reply.lower(), (request, reply)
    assert [p["address"] for p in ta.show()["peers"]] == [b.underlay]
    r = ta.client("peer", "remove", "10.231.1.200")  # not a peer: one line, non-zero, nothing changed
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert [p["address"] for p in ta.show()["peers"]] == [b.underlay]

    # Another uid: even when the file's mode would let it connect, the daemon (SO_PEERCRED) serves it nothing.
    os.chmod(Path(path).parent.parent, 0o755)
    os.chmod(Path(path).parent, 0o755)
    os.chmod(path, 0o666)
    r = a.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", NOBODY, path,
              check=False, timeout=20)
    assert r.stdout.startswith("connected"), (r.stdout, r.stderr)  # the refusal is the daemon's, not the mode's
    assert '"peers"' not in r.stdout and ("error" in r.stdout.lower() or "closed" in r.stdout), r.stdout
    assert ta.show()["peers"][0]["address"] == b.underlay  # and root still is
