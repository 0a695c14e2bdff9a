"""--workers N on the real kernel: a multi-queue TAP, SO_REUSEPORT sockets, forked worker processes.

The witnesses are the kernel (the TAP's own counters, /sys/class/net/DEV/queues, /proc), the kernel's own
VXLAN as a peer, sha256 of what TCP carried, and the far end's counters: what A's workers say they sent, B's
workers must say they received. Inner traffic for exact counts is many small UDP flows (no GSO, so the
kernel's frame count and tunneld's agree), with IPv6 off on the tunnel and static neighbours (nothing else
crosses).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import REPO
from tunneld.runtime import workers as workers_module
from tunneld.testbed import OVERLAY_V4, TUNNELD, Host, Tunneld, kernel_vxlan, transfer
from tunneld.testbed.notify import NotifyReceiver
from tunneld.testbed.procfs import children_of, cpu_seconds

pytestmark = pytest.mark.netns

MAC_A, MAC_B = "02:00:00:00:e7:01", "02:00:00:00:e7:02"
FLOWS = 16  # inner UDP flows: the kernel spreads them over queues and sockets by hash; 16 make a miss unlikely
PER_FLOW = 40
METRICS = "http://127.0.0.1:9477/metrics"  # each end's default, on its own namespace's loopback
# tunneld/runtime/workers.py's LATE_AFTER (5 s), shortened for the watchdog test, which waits for a worker to count
# as late: 3 s is still three times the parent's once-a-second question to its children.
LATE_AFTER = 3.0
SHORT_LATE = {"TUNNELD_LATE_AFTER": str(LATE_AFTER)}

SENDER = """
import socket, sys, time
dst, base, flows, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
socks = []
for i in range(flows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", base + 1000 + i))  # a distinct source port per flow too
    socks.append(s)
for _ in range(n):
    for i, s in enumerate(socks):
        s.sendto(b"w" * 100, (dst, base + i))
    time.sleep(0.002)  # gentle: the TAP queues must not overflow, or the kernel, not tunneld, drops
"""

RECEIVER = """
import selectors, socket, sys, time
base, flows, total, timeout = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sel = selectors.DefaultSelector()
for i in range(flows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", base + i))
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
got, deadline = 0, time.monotonic() + timeout
while got < total and time.monotonic() < deadline:
    for key, _ in sel.select(max(0.01, deadline - time.monotonic())):
        while True:
            try:
                key.fileobj.recv(2048)
            except BlockingIOError:
                break
            got += 1
print(got, flush=True)
"""


def quiet(*hosts: Host) -> None:
    """New interfaces (the TAP) get no IPv6: no RS, MLD or DAD frames to muddle the counts."""
    for h in hosts:
        h.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")


def scrape(host: Host) -> dict[tuple[str, frozenset], float]:
    text = host.run(sys.executable, "-m", "tunneld.testbed.prom", "get", METRICS, cwd=REPO).stdout
    return {(s.name, frozenset((k, v) for k, v in s.labels.items() if k not in ("peer", "mode"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(sample: dict, name: str, **labels: str) -> float:
    return sample[(name, frozenset(labels.items()))]


IFF_MULTI_QUEUE = 0x0100  # include/uapi/linux/if_tun.h


def tun_flags(host: Host, dev: str = "tunneld0") -> int:
    """The flags the kernel holds for a TUN/TAP device (drivers/net/tun.c exports them in sysfs)."""
    return int(host.run("cat", f"/sys/class/net/{dev}/tun_flags").stdout, 16)


def tap_tx_packets(host: Host, dev: str = "tunneld0") -> int:
    return json.loads(host.run("ip", "-j", "-s", "link", "show", "dev", dev).stdout)[0]["stats64"]["tx"]["packets"]


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, from /proc."""
    return children_of([pid])


def wait_children(pid: int, count: int, timeout: float = 10) -> list[int]:
    """The children of ``pid`` once there are ``count`` of them: the interface comes up before the fork."""
    return children_of([pid], count, timeout)


def first_child(pid: int, timeout: float = 10) -> int:
    """The first child of ``pid``, found by a tight look at /proc as soon as it is forked."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if kids := Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                return int(kids[0])
    raise TimeoutError(f"no child of {pid} within {timeout}s")


def wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" != _state(p)]
        if not left:
            return []
        time.sleep(0.05)
    return left


def _state(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return text[text.rindex(")") + 2]


def start_pair(a: Host, b: Host, *extra: str) -> tuple[Tunneld, Tunneld]:
    ta = Tunneld(a, "--peer", b.underlay, "--address", f"{OVERLAY_V4[0]}/24", "--mac", MAC_A, *extra)
    try:
        tb = Tunneld(b, "--peer", a.underlay, "--address", f"{OVERLAY_V4[1]}/24", "--mac", MAC_B, *extra)
    except BaseException:
        ta.kill()
        raise
    a.run("ip", "neigh", "replace", OVERLAY_V4[1], "lladdr", MAC_B, "dev", "tunneld0", "nud", "permanent")
    b.run("ip", "neigh", "replace", OVERLAY_V4[0], "lladdr", MAC_A, "dev", "tunneld0", "nud", "permanent")
    return ta, tb


def udp_flows(a: Host, b: Host, base: int = 7000) -> int:
    """FLOWS inner UDP flows from A to B, PER_FLOW datagrams each; returns how many B's receiver got."""
    total = FLOWS * PER_FLOW
    receiver = b.popen(sys.executable, "-c", RECEIVER, str(base), str(FLOWS), str(total), "20")
    assert receiver.stdout.readline().strip() == "ready"
    a.run(sys.executable, "-c", SENDER, OVERLAY_V4[1], str(base), str(FLOWS), str(PER_FLOW), timeout=30)
    out, _ = receiver.communicate(timeout=30)
    return int(out.strip())


def parallel_transfers(a: Host, b: Host, count: int = 4, nbytes: int = 1 << 20) -> None:
    """``count`` TCP transfers at once from A to B, each checked end to end by sha256."""
    results: dict[int, tuple[str, str] | BaseException] = {}

    def one(i: int) -> None:
        try:
            results[i] = transfer(a, b, OVERLAY_V4[1], nbytes=nbytes, port=5301 + i, timeout=60)
        except BaseException as e:  # reported below, in the test's thread
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    for i in range(count):
        result = results.get(i)
        assert not isinstance(result, BaseException) and result is not None, (i, result)
        sent, received = result
        assert sent == received and sent.startswith(f"{nbytes} "), (i, sent, received)


def test_two_workers_each_end_share_the_flows_and_count_exactly(hosts):
    a, b = hosts
    quiet(a, b)
    ta, tb = start_pair(a, b, "--workers", "2")
    assert len(wait_children(ta.proc.pid, 1)) == 1 and len(wait_children(tb.proc.pid, 1)) == 1
    assert sorted(a.run("ls", "/sys/class/net/tunneld0/queues").stdout.split()) == ["rx-0", "rx-1", "tx-0", "tx-1"]
    assert tun_flags(a) & IFF_MULTI_QUEUE
    a.wait_ping(OVERLAY_V4[1])

    parallel_transfers(a, b)  # four TCP flows at once, each intact

    before_a, before_b, tap_before = scrape(a), scrape(b), tap_tx_packets(a)
    assert udp_flows(a, b) == FLOWS * PER_FLOW

    def delta(after, before, name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # The counters of a child are scraped live: wait (bounded) until both ends have counted the last datagrams.
    deadline = time.monotonic() + 10
    while True:
        after_a, after_b, tap_after = scrape(a), scrape(b), tap_tx_packets(a)
        settled = (delta(after_a, before_a, "tunneld_tx_packets_total") >= FLOWS * PER_FLOW
                   and delta(after_b, before_b, "tunneld_rx_packets_total") >= FLOWS * PER_FLOW)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    sent = delta(after_a, before_a, "tunneld_tx_packets_total")
    assert tap_after - tap_before == FLOWS * PER_FLOW  # the kernel handed A's tunneld exactly these frames
    assert sent == FLOWS * PER_FLOW  # and the sum over A's workers says they all left
    assert delta(after_b, before_b, "tunneld_rx_packets_total") == sent  # B's workers say they all arrived
    assert delta(after_b, before_b, "tunneld_rx_bytes_total") == delta(after_a, before_a, "tunneld_tx_bytes_total")
    for sample, direction in ((after_a, "tx"), (after_b, "rx")):
        per_worker = [value(sample, "tunneld_worker_packets_total", worker=w, direction=direction) for w in "01"]
        assert all(n > 0 for n in per_worker), (direction, per_worker)  # both queues / both sockets carried
        assert sum(per_worker) == value(sample, f"tunneld_{direction}_packets_total")
    for sample in (after_a, after_b):
        # Each worker's CPU time, read by the worker itself: both moved packets, so both used some.
        assert all(value(sample, "tunneld_worker_cpu_seconds_total", worker=w) > 0 for w in "01")
        drops = {k: v for k, v in sample.items() if k[0] == "tunneld_dropped_packets_total" and v}
        assert drops == {}, drops

    # The CPU seconds a worker reports are the kernel's (/proc/PID/stat), as of the scrape.
    [kid] = children(ta.proc.pid)
    before_cpu = cpu_seconds(kid)
    reported = value(scrape(a), "tunneld_worker_cpu_seconds_total", worker="1")
    assert before_cpu - 0.011 <= reported <= cpu_seconds(kid) + 0.011

    for t in (ta, tb):
        assert t.stop() == 0, t.output()
    assert "workers 2" in ta.output()


def test_one_worker_is_one_process_on_a_single_queue_device(module_hosts):
    a, b = module_hosts
    t = Tunneld(a, "--peer", b.underlay, "--address", f"{OVERLAY_V4[0]}/24", "--workers", "1")
    tb = Tunneld(b, "--peer", a.underlay, "--address", f"{OVERLAY_V4[1]}/24", "--workers", "1")
    a.wait_ping(OVERLAY_V4[1])
    assert children(t.proc.pid) == []
    assert not tun_flags(a) & IFF_MULTI_QUEUE
    assert sorted(a.run("ls", "/sys/class/net/tunneld0/queues").stdout.split()) == ["rx-0", "tx-0"]
    assert t.stop() == 0 and tb.stop() == 0
    assert "workers" not in t.output()


@pytest.mark.parametrize("offload", [(), ("--no-offload",)], ids=["offload", "no-offload"])
def test_two_workers_against_the_kernels_vxlan(hosts, offload):
    a, b = hosts
    t = Tunneld(a, "--peer", b.underlay, "--address", f"{OVERLAY_V4[0]}/24", "--vni", "77", "--workers", "2",
                *offload)
    kernel_vxlan(b, a.underlay, vni=77, address=f"{OVERLAY_V4[1]}/24")
    a.wait_ping(OVERLAY_V4[1])
    parallel_transfers(a, b, count=2)
    sent, received = transfer(b, a, OVERLAY_V4[0], 1 << 20, port=5401)
    assert sent == received
    assert t.stop() == 0, t.output()


def test_sigterm_stops_every_worker_and_removes_the_interface(module_hosts):
    a, b = module_hosts
    t = Tunneld(a, "--peer", b.underlay, "--workers", "3")
    kids = wait_children(t.proc.pid, 2)
    assert len(kids) == 2
    assert t.stop(signal.SIGTERM) == 0, t.output()
    assert wait_gone(kids) == []
    assert a.link_state("tunneld0") is None


def test_sigterm_to_the_whole_unit_while_the_workers_are_forked_is_a_clean_stop(module_hosts):
    """systemd's stop signals every process of the unit at once; here right as the first worker appears,
    before the parent has its handlers: the signal waits (blocked) until it can be handled."""

    a, b = module_hosts
    for _ in range(5):
        proc = a.popen(TUNNELD, "--peer", b.underlay, "--workers", "3", "--metrics-listen", "")
        try:
            first_child(proc.pid)  # the first fork, not a second later
            os.killpg(proc.pid, signal.SIGTERM)
            code = proc.wait(timeout=20)
        finally:
            a.kill_all()
        out = proc.stdout.read()
        assert code == 0, out
        assert "removed interface tunneld0" in out, out
        assert a.link_state("tunneld0") is None


@pytest.mark.serial  # how long the stop took
def test_sigterm_while_waiting_for_a_stalled_worker_to_start_stops_without_waiting_for_it(module_hosts):

    a, b = module_hosts
    proc = a.popen(TUNNELD, "--peer", b.underlay, "--workers", "2", "--metrics-listen", "")
    try:
        [kid] = wait_children(proc.pid, 1, timeout=10)
        os.kill(kid, signal.SIGSTOP)  # not ready, and never will be while stopped
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = proc.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        a.kill_all()
    out = proc.stdout.read()
    assert code == 0, out
    assert "removed interface tunneld0" in out, out
    # Not the 15 s start-up timeout: the stop is immediate, then at most STOP_TIMEOUT (5 s) for the worker.
    assert took < 12, (took, out)


def test_a_worker_killed_stops_the_daemon_with_status_1(module_hosts):
    a, b = module_hosts
    t = Tunneld(a, "--peer", b.underlay, "--workers", "2")
    [kid] = wait_children(t.proc.pid, 1)
    os.kill(kid, signal.SIGKILL)
    code = t.proc.wait(timeout=10)
    out = t.output()
    assert code == 1, out
    assert f"worker 1 (pid {kid}) was killed by SIGKILL" in out
    a.wait_link("tunneld0", present=False, timeout=5)


def test_the_main_process_killed_takes_its_workers_and_the_interface_with_it(module_hosts):
    a, b = module_hosts
    t = Tunneld(a, "--peer", b.underlay, "--workers", "2")
    kids = wait_children(t.proc.pid, 1)
    assert len(kids) == 1
    t.proc.kill()  # SIGKILL: no clean-up code runs; PR_SET_PDEATHSIG does the rest
    t.proc.wait(timeout=5)
    assert wait_gone(kids) == []
    a.wait_link("tunneld0", present=False, timeout=5)


def test_interface_deleted_underneath_stops_every_worker(module_hosts):
    a, b = module_hosts
    t = Tunneld(a, "--peer", b.underlay, "--workers", "2")
    kids = wait_children(t.proc.pid, 1)
    assert len(kids) == 1
    a.run("ip", "link", "del", "tunneld0")
    assert t.proc.wait(timeout=10) == 1, t.output()
    assert wait_gone(kids) == []


def test_reload_reaches_every_worker(hosts, tmp_path):
    a, b = hosts
    quiet(a, b)
    conf = tmp_path / "a.toml"
    text = '[tunnel]\npeer = "{peer}"\naddress = "{addr}/24"\nmac = "{mac}"\nworkers = 2\n'
    conf.write_text(text.format(peer="10.231.0.99", addr=OVERLAY_V4[0], mac=MAC_A))  # nobody there yet
    ta = Tunneld(a, "--config", str(conf))
    tb = Tunneld(b, "--peer", a.underlay, "--address", f"{OVERLAY_V4[1]}/24", "--mac", MAC_B, "--workers", "2")
    a.run("ip", "neigh", "replace", OVERLAY_V4[1], "lladdr", MAC_B, "dev", "tunneld0", "nud", "permanent")
    b.run("ip", "neigh", "replace", OVERLAY_V4[0], "lladdr", MAC_A, "dev", "tunneld0", "nud", "permanent")
    assert not a.ping(OVERLAY_V4[1], count=1, timeout=1)
    conf.write_text(text.format(peer=b.underlay, addr=OVERLAY_V4[0], mac=MAC_A))
    ta.proc.send_signal(signal.SIGHUP)
    a.wait_ping(OVERLAY_V4[1])
    # Every flow arrives, whichever worker it hashes to: a worker still sending to the old peer would lose its share.
    assert udp_flows(a, b) == FLOWS * PER_FLOW
    per_worker = [value(scrape(a), "tunneld_worker_packets_total", worker=w, direction="tx") for w in "01"]
    assert all(n > 0 for n in per_worker), per_worker
    for t in (ta, tb):
        assert t.stop() == 0, t.output()


SCRAPES = """
import sys, threading, urllib.request
def one():
    try:
        urllib.request.urlopen(sys.argv[1], timeout=30).read()
    except OSError:
        pass
threads = [threading.Thread(target=one) for _ in range(int(sys.argv[2]))]
for t in threads:
    t.start()
for t in threads:
    t.join(60)
"""


def test_a_reload_reaches_a_worker_that_was_stalled_through_hundreds_of_scrapes(hosts, tmp_path):
    a, b = hosts
    quiet(a, b)
    conf = tmp_path / "a.toml"
    text = '[tunnel]\npeer = "{peer}"\naddress = "{addr}/24"\nmac = "{mac}"\nworkers = 2\n'
    conf.write_text(text.format(peer="10.231.0.99", addr=OVERLAY_V4[0], mac=MAC_A))  # nobody there
    # Each scrape waits SNAPSHOT_TIMEOUT (1 s) for the stalled worker, one after the other: 400 took ~250 s.
    # The scrapes are what the test is about (each one asks the worker), not how long each waits: 0.1 s here.
    ta = Tunneld(a, "--config", str(conf), env={"TUNNELD_SNAPSHOT_TIMEOUT": "0.1"})
    tb = Tunneld(b, "--peer", a.underlay, "--address", f"{OVERLAY_V4[1]}/24", "--mac", MAC_B, "--workers", "1")
    a.run("ip", "neigh", "replace", OVERLAY_V4[1], "lladdr", MAC_B, "dev", "tunneld0", "nud", "permanent")
    b.run("ip", "neigh", "replace", OVERLAY_V4[0], "lladdr", MAC_A, "dev", "tunneld0", "nud", "permanent")
    [kid] = wait_children(ta.proc.pid, 1)
    os.kill(kid, signal.SIGSTOP)  # stalled (swap, a debugger), not dead
    try:
        for _ in range(8):  # 400 scrapes: each one asks the stalled worker for its counters
            a.run(sys.executable, "-c", SCRAPES, METRICS, "50", timeout=120)
        conf.write_text(text.format(peer=b.underlay, addr=OVERLAY_V4[0], mac=MAC_A))
        ta.proc.send_signal(signal.SIGHUP)
        time.sleep(1)
    finally:
        os.kill(kid, signal.SIGCONT)
    time.sleep(2)  # it reads what was queued for it, the reload among it
    assert ta.proc.poll() is None, ta.output()  # the reload fitted: nothing to stop for
    # Every flow arrives, whichever worker it hashes to: a worker still sending to the old peer loses its share.
    assert udp_flows(a, b) == FLOWS * PER_FLOW
    # A scrape waits only 0.1 s for fresh counters here: a busy worker's may be a report old. Ask until both
    # workers' show (bounded; a worker that carried nothing never will).
    deadline = time.monotonic() + 10
    while True:
        per_worker = [value(scrape(a), "tunneld_worker_packets_total", worker=w, direction="tx") for w in "01"]
        if all(n > 0 for n in per_worker) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(n > 0 for n in per_worker), per_worker
    for t in (ta, tb):
        assert t.stop() == 0, t.output()


def test_gre_runs_one_worker_and_delivers_each_packet_once(hosts):
    a, b = hosts
    quiet(a, b)
    ta = Tunneld(a, "--mode", "gre", "--peer", b.underlay, "--address", f"{OVERLAY_V4[0]}/24", "--workers", "2")
    tb = Tunneld(b, "--mode", "gre", "--peer", a.underlay, "--address", f"{OVERLAY_V4[1]}/24", "--workers", "2")
    a.wait_ping(OVERLAY_V4[1])
    assert children(ta.proc.pid) == [] and children(tb.proc.pid) == []  # both are up and never forked
    before = value(scrape(b), "tunneld_rx_packets_total")
    r = a.run("ping", "-c", "20", "-i", "0.05", "-W", "1", OVERLAY_V4[1], check=False, timeout=20)
    assert " 20 received" in r.stdout and "DUP!" not in r.stdout, r.stdout
    assert value(scrape(b), "tunneld_rx_packets_total") - before == 20  # each echo request arrived once
    for t in (ta, tb):
        assert t.stop() == 0, t.output()
    assert "workers 2: using 1" in ta.output()


@pytest.mark.serial  # when the watchdog's pings stop
def test_ready_waits_for_every_worker_and_a_wedged_one_stops_the_watchdog(module_hosts, tmp_path):

    a, b = module_hosts
    rx = NotifyReceiver(str(tmp_path / "notify"))
    env = {**os.environ, "NOTIFY_SOCKET": rx.path, "WATCHDOG_USEC": "400000", **SHORT_LATE}  # a ping every 0.2 s
    proc = a.popen(TUNNELD, "--peer", b.underlay, "--workers", "2", "--log-level", "debug", env=env)
    try:
        kid = first_child(proc.pid)
        os.kill(kid, signal.SIGSTOP)  # before it can have attached its engine (it has uvloop to import first)
        with pytest.raises(TimeoutError):
            rx.until("READY=1", timeout=3)  # the parent waits for it
        assert proc.poll() is None
        os.kill(kid, signal.SIGCONT)
        seen = rx.until("READY=1", timeout=10)
        assert children(proc.pid) == [kid]
        assert not any("STOPPING=1" in m for m in seen)
        rx.until("WATCHDOG=1", timeout=2)
        os.kill(kid, signal.SIGSTOP)  # wedged: alive, but its event loop answers nothing
        stopped = time.monotonic()
        # The pings stop once the worker has been silent for LATE_AFTER (shortened to 3 s) — bounded, whatever
        # the load: not before LATE_AFTER less the parent's 1-s question period (and a tick), within LATE_AFTER + 4.
        last_ping = stopped
        while time.monotonic() - stopped < LATE_AFTER + 7:
            try:
                message = rx.next(timeout=1.5)
            except TimeoutError:
                break
            if message == "WATCHDOG=1":
                last_ping = time.monotonic()
        assert LATE_AFTER - 1.5 < last_ping - stopped < LATE_AFTER + 4, last_ping - stopped
        with pytest.raises(TimeoutError):
            rx.until("WATCHDOG=1", timeout=1.5)
        os.kill(kid, signal.SIGCONT)  # it catches up: the pings resume
        rx.until("WATCHDOG=1", timeout=5)
        proc.send_signal(signal.SIGTERM)
        rx.until("STOPPING=1")
        assert proc.wait(timeout=10) == 0
    finally:
        a.kill_all()
        rx.close()
    out = proc.stdout.read()
    assert f"worker 1 (pid {kid}) has not answered for" in out, out


def test_a_second_daemon_on_the_port_fails_instead_of_joining_the_reuseport_group(module_hosts):

    a, b = module_hosts
    first = Tunneld(a, "--peer", b.underlay, "--workers", "2", "--metrics-listen", "")
    r = a.run(TUNNELD, "--dev", "tunneld9", "--peer", b.underlay, "--workers", "2", "--metrics-listen", "",
              check=False, timeout=20)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["tunneld: error: UDP port 4789 on 0.0.0.0 is already in use (another "
                                             "tunneld, or a kernel vxlan device with that dstport?); pick another with "
                                             "--port"]
    assert a.link_state("tunneld9") is None
    assert first.stop() == 0


def test_a_thousand_peers_with_two_workers_keep_their_counters_flowing(hosts, tmp_path):
    """Issue 12's gap: a worker's StatsReport of ~900+ peers exceeded the channel's one 64 KiB record; the parent
    could not read it, the worker's request stayed outstanding for ever, and it counted as wedged (logged; with a
    watchdog, the unit restarted). Now every report arrives, whatever the number of peers."""
    a, b = hosts
    quiet(a, b)
    a.run("ip", "route", "add", "10.240.0.0/16", "via", b.underlay)  # the far ends: routed, nobody answers
    peers = [b.underlay] + [f"10.240.{i >> 8}.{i & 255}" for i in range(1, 1001)]
    conf = tmp_path / "a.toml"
    conf.write_text(f'[tunnel]\naddress = "{OVERLAY_V4[0]}/24"\nmac = "{MAC_A}"\nworkers = 2\n'
                    + "".join(f'[[peer]]\naddress = "{p}"\n' for p in peers))
    ta = Tunneld(a, "--config", str(conf), timeout=90)
    tb = Tunneld(b, "--peer", a.underlay, "--address", f"{OVERLAY_V4[1]}/24", "--mac", MAC_B, "--workers", "1")
    try:
        a.run("ip", "neigh", "replace", OVERLAY_V4[1], "lladdr", MAC_B, "dev", "tunneld0", "nud", "permanent")
        b.run("ip", "neigh", "replace", OVERLAY_V4[0], "lladdr", MAC_A, "dev", "tunneld0", "nud", "permanent")
        assert udp_flows(a, b) == FLOWS * PER_FLOW  # both workers carry flows: both count
        # Long enough for a worker whose reports are lost to count as late. The flows flood to 1001 peers (B's MAC is
        # not learnt: B sends nothing), seconds of sends on a loaded machine; a flood spends the wake-up's budget per
        # copy, so the worker still answers between wake-ups (it was once logged stalled here). Not shortened
        # (SHORT_LATE): a loaded machine may still hold one wake-up past a second.
        time.sleep(workers_module.LATE_AFTER + 2)
        shown = ta.show()
        assert len(shown["peers"]) == 1001 and shown["workers"] == 2
        per_worker = [value(scrape(a), "tunneld_worker_packets_total", worker=w, direction="tx") for w in "01"]
        assert all(n > 0 for n in per_worker) and sum(per_worker) >= FLOWS * PER_FLOW, per_worker
        assert next(p for p in shown["peers"] if p["address"] == b.underlay)["tx_packets"] >= FLOWS * PER_FLOW
        assert ta.stop() == 0
        out = ta.output()
        assert "has not answered" not in out and "Traceback" not in out and "refused" not in out, out[-3000:]
    finally:
        for t in (ta, tb):
            if t.proc.poll() is None:
                t.stop()
