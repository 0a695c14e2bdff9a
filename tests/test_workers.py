"""--workers without root: the rule behind "auto", the raw-IP clamp, validation of the flag and the file key,
adding up the workers' counters, and the exporter's sum. tests/test_workers_netns.py runs the processes."""

from __future__ import annotations

import os
import pickle

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tunneld.runtime.channel import Apply, Channel, StatsReport, StatsRequest
from tunneld.cli import main
from tunneld.config.schema import EX_CONFIG, MAX_WORKERS, TunnelConfig
from tunneld.encap.base import Drop
from tunneld.encap.vxlan import Vxlan
from tunneld.datapath.engine import Engine
from tunneld.observe.metrics import TunnelCollector
from tunneld.datapath.stats import PeerStats, MAX_BATCH, Stats, total
from tunneld.testing import FakeDevice, FakeLink
from tunneld.runtime.workers import AUTO_CAP, auto_workers, resolve


@pytest.mark.parametrize("cpus,expected", [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (16, 8), (64, AUTO_CAP)])
def test_auto_is_one_worker_up_to_two_cpus_then_half_capped(cpus, expected):
    assert auto_workers(cpus) == expected


def test_resolve_says_what_auto_chose_and_clamps_raw_ip_to_one():
    assert resolve(3, "udp") == (3, None)
    n, note = resolve("auto", "udp", cpus=8)
    assert n == 4 and note == "workers auto: 4 for 8 CPUs"
    n, note = resolve(2, "ip")
    assert n == 1 and "using 1" in note and "every packet" in note
    assert resolve("auto", "ip", cpus=2)[0] == 1
    assert resolve(1, "ip") == (1, None)


@pytest.mark.parametrize("value", ["0", "-1", str(MAX_WORKERS + 1), "two", "1.5", ""])
def test_a_bad_workers_flag_is_one_line_and_exit_2(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--peer", "192.0.2.1", "--workers", value, "--check"])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("tunneld: error:")] == [err[-1]]
    assert "--workers" in err[-1]


@pytest.mark.parametrize("value", ["auto", "1", str(MAX_WORKERS)])
def test_good_workers_flags_pass_the_check(value, capsys):
    assert main(["--peer", "192.0.2.1", "--workers", value, "--check"]) == 0


@pytest.mark.parametrize("line,problem", [
    ("workers = 0", "tunnel.workers: 0 is not 'auto' or a number of processes between 1 and 64"),
    ('workers = "many"', "tunnel.workers: 'many' is not 'auto' or a number of processes between 1 and 64"),
    ("workers = true", 'tunnel.workers: expected "auto" or an integer number of processes (1-64), got boolean True'),
    ("workers = 2.0", 'tunnel.workers: expected "auto" or an integer number of processes (1-64), got number 2.0'),
    ('offload = "yes"', "tunnel.offload: expected true or false, got string 'yes'"),
])
def test_bad_workers_or_offload_in_a_file_is_one_line_and_exit_78(tmp_path, capsys, line, problem):
    path = tmp_path / "t.toml"
    path.write_text(f'[tunnel]\npeer = "192.0.2.1"\n{line}\n')
    assert main(["--config", str(path), "--check"]) == EX_CONFIG
    assert capsys.readouterr().err.splitlines() == [f"tunneld: {path}: {problem}"]


def test_workers_and_offload_from_a_file_and_the_flag_overrides(tmp_path, capsys):
    from tunneld import cli

    path = tmp_path / "t.toml"
    path.write_text('[tunnel]\npeer = "192.0.2.1"\nworkers = 3\noffload = false\n')
    args = cli.build_parser(["vxlan"]).parse_args(["--config", str(path)])
    cfg = cli.merge(args, cli.load_file(str(path)))
    assert (cfg.workers, cfg.offload) == (3, False)
    args = cli.build_parser(["vxlan"]).parse_args(["--config", str(path), "--workers", "auto"])
    assert cli.merge(args, cli.load_file(str(path))).workers == "auto"


def _stats(tx: int, rx: int, last: float, drop: Drop | None = None) -> Stats:
    s = Stats()
    s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes, s.peer_last_rx = tx, tx * 100, rx, rx * 10, last
    s.tx_batches[1] += tx
    s.observe_loop_lag(0.003)
    if drop is not None:
        s.drops[drop] += 2
    return s


def test_total_adds_every_counter_and_keeps_the_latest_rx_time():
    parts = [_stats(3, 5, 10.0, Drop.TOO_BIG), _stats(4, 0, 12.5, Drop.TRUNCATED), _stats(0, 1, 0.0, Drop.TOO_BIG)]
    parts = [pickle.loads(pickle.dumps(p)) for p in parts]  # as they cross the control socket
    t = total(parts)
    assert (t.tx_packets, t.tx_bytes, t.rx_packets, t.rx_bytes) == (7, 700, 6, 60)
    assert t.peer_last_rx == 12.5
    assert t.drops == {Drop.TOO_BIG: 4, Drop.TRUNCATED: 2}
    assert t.tx_batches == [0, 7] + [0] * (MAX_BATCH - 1)  # one slot per count up to MAX_BATCH, whatever the batch
    assert sum(t.loop_lag) == 3 and t.loop_lag_sum == pytest.approx(0.009)


def test_total_covers_every_field_of_stats():
    """Every field, whatever its type: the scalars, the histograms (lists) and the drops by reason."""
    from collections import Counter

    def filled(base: int) -> Stats:
        s = Stats()
        for i, name in enumerate(Stats.__slots__, start=1):
            value = getattr(s, name)
            if isinstance(value, Counter):
                for j, reason in enumerate(Drop, start=1):
                    value[reason] = base * 1000 + j
            elif isinstance(value, list):
                setattr(s, name, [base * 1000 + i * 10 + k for k in range(len(value))])
            elif isinstance(value, (int, float)):
                setattr(s, name, base * 1000 + i)
            elif isinstance(value, dict):  # per peer: PeerStats by address, one shared and one of its own
                for address in ("192.0.2.2", f"192.0.2.{10 + base}"):
                    peer = value[address] = PeerStats()
                    for k, field in enumerate(PeerStats.__slots__, start=1):
                        setattr(peer, field, base * 100 + k)
            else:
                raise AssertionError(f"Stats.{name} is a {type(value)}: teach this test (and total) about it")
        return s

    one, two = filled(1), filled(2)
    t = total([one, two])
    for name in Stats.__slots__:
        a, b, got = getattr(one, name), getattr(two, name), getattr(t, name)
        if name == "peer_last_rx":
            assert got == max(a, b), name  # the latest, not a sum
        elif isinstance(a, Counter):
            assert got == Counter({reason: a[reason] + b[reason] for reason in Drop}), name
        elif isinstance(a, list):
            assert got == [x + y for x, y in zip(a, b)], name
        elif isinstance(a, dict):
            assert sorted(got) == sorted({*a, *b}), name
            for address, peer in got.items():
                parts = [p[address] for p in (a, b) if address in p]
                for field in PeerStats.__slots__:
                    values = [getattr(p, field) for p in parts]
                    assert getattr(peer, field) == (max(values) if field == "last_rx" else sum(values)), field
        else:
            assert got == a + b, name


def test_the_exporter_sums_the_workers_and_shows_each_ones_share():
    eng = Engine(FakeDevice(), FakeLink("192.0.2.2"), Vxlan(7), max_frame=1472, batch=4)
    eng.stats.tx_packets, eng.stats.rx_packets = 10, 1
    others = [_stats(5, 2, 0.0, Drop.TOO_BIG)]
    registry = CollectorRegistry()
    registry.register(TunnelCollector(eng, dev="td0", mtu=1450, vni=7, others=lambda: others,
                                      cpu=lambda: [1.5, 0.25]))
    got = {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k in ("worker", "direction", "reason")))): s.value
           for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    assert got[("tunneld_tx_packets_total", ())] == 15
    assert got[("tunneld_rx_packets_total", ())] == 3
    assert got[("tunneld_dropped_packets_total", (("reason", "too_big"),))] == 2
    assert got[("tunneld_worker_packets_total", (("direction", "tx"), ("worker", "0")))] == 10
    assert got[("tunneld_worker_packets_total", (("direction", "tx"), ("worker", "1")))] == 5
    assert got[("tunneld_worker_packets_total", (("direction", "rx"), ("worker", "1")))] == 2
    assert got[("tunneld_worker_cpu_seconds_total", (("worker", "0"),))] == 1.5
    assert got[("tunneld_worker_cpu_seconds_total", (("worker", "1"),))] == 0.25


# -- the parent's control channel (workers.Supervisor), with a socketpair standing in for a worker ------------------


def _pool_with_silent_child():
    """A Supervisor whose one child is this process's own channel end: nothing answers unless the test does."""
    from tunneld.runtime.workers import Child, Supervisor

    ours, theirs = Channel.pair()
    pool = Supervisor()
    pool.children.append(Child(1, os.getpid(), ours))  # pidfd of ourselves: never readable while we run
    ours.setblocking(False)
    theirs.setblocking(False)
    return pool, theirs


def _drain(channel: Channel) -> list:
    got, closed = channel.receive()
    assert not closed
    return got


def test_a_silent_worker_has_at_most_one_stats_request_queued():
    pool, theirs = _pool_with_silent_child()
    try:
        for _ in range(500):  # the heartbeat and the scrapes keep asking while the worker is stalled
            pool.request()
        assert [type(m) for m in _drain(theirs)] == [StatsRequest]
        pool.broadcast(Apply(peer="192.0.2.9"))  # so a reload still fits
        assert _drain(theirs) == [Apply(peer="192.0.2.9")]
        theirs.send(StatsReport(1, Stats(), 0.0))  # it answers: the next request goes out
        pool._on_message(pool.children[0])
        seq = pool.request()
        assert _drain(theirs) == [StatsRequest(seq)]
    finally:
        theirs.close()
        pool.children[0].close()


def test_a_control_message_that_cannot_be_delivered_stops_the_daemon_naming_the_worker(caplog):
    pool, theirs = _pool_with_silent_child()
    died = []
    pool._on_death = lambda: died.append(True)
    from tunneld.runtime.channel import Learnt

    try:  # fill the socket and the channel's queue, as a worker that never reads would
        for _ in range(100):
            pool.children[0].channel.send(Learnt(((b"x" * (1 << 20), "192.0.2.9"),)))
    except BlockingIOError:
        pass
    try:
        pool.broadcast(Apply(peer="192.0.2.9"))
        assert died == [True]
        assert f"worker 1 (pid {os.getpid()}) does not read its control socket" in caplog.text
        assert "exit status 1" in caplog.text
    finally:
        theirs.close()
        pool.children[0].close()


def test_a_worker_that_cannot_be_tracked_is_killed_and_reaped_and_its_socket_closed(monkeypatch):
    """pidfd_open failing after the fork (EMFILE, ENOSYS, EPERM): the child must not live on untracked."""
    import errno
    import time

    from tunneld.runtime import workers

    def entry(index: int, channel: Channel) -> int:
        time.sleep(30)  # the child waits here; only a kill ends it early (os._exit follows in any case)
        return 0

    def no_pidfd(pid: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    fds_before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(workers.os, "pidfd_open", no_pidfd)
    t0 = time.monotonic()
    with pytest.raises(OSError) as caught:
        workers.Supervisor().fork(1, entry)
    assert caught.value.errno == errno.EMFILE
    assert time.monotonic() - t0 < 10  # not the child's 30 s: it was killed
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # and reaped: no child of ours is left, running or zombie
    assert set(os.listdir("/proc/self/fd")) == fds_before  # the control socket's parent end is closed


def test_a_stalled_worker_is_logged_once_and_again_when_it_answers(caplog):
    import logging
    import time

    pool, theirs = _pool_with_silent_child()
    child = pool.children[0]
    caplog.set_level(logging.INFO, logger="tunneld")
    try:
        assert pool.alive()
        child.answered = time.monotonic() - 6  # silent for longer than LATE_AFTER
        assert not pool.alive() and not pool.alive()
        stalled = [r for r in caplog.records if "has not answered for" in r.getMessage()]
        assert len(stalled) == 1 and f"worker 1 (pid {os.getpid()})" in stalled[0].getMessage()
        pool.request()
        theirs.send(StatsReport(1, Stats(), 0.0))
        pool._on_message(child)
        assert pool.alive()
        assert sum("worker 1 (pid %d) answers again" % os.getpid() in r.getMessage() for r in caplog.records) == 1
    finally:
        theirs.close()
        child.close()


def test_worker_liveness_is_checked_on_every_tick_without_a_watchdog(monkeypatch):
    import asyncio

    from tunneld.runtime import service
    from tunneld.runtime.service import Notifier, Service

    class Tunnel:  # service.Tunnel
        workers = 2
        cfg = TunnelConfig(peer="192.0.2.2")
        looks = 0

        def totals(self) -> Stats:
            return Stats()

        def workers_alive(self) -> bool:
            Tunnel.looks += 1
            return False

    monkeypatch.setattr(service, "STATUS_INTERVAL", 0.01)

    async def run() -> None:
        s = Service(Tunnel(), notifier=Notifier({}))  # no NOTIFY_SOCKET, no WATCHDOG_USEC
        s.ready()
        await asyncio.sleep(0.2)
        s.stopping()

    asyncio.run(run())
    assert Tunnel.looks >= 3


def _cgroup_tree(tmp_path, cpu_max: dict[str, str], own: str = "/system.slice/tunneld.runtime.service"):
    """A stand-in for /sys/fs/cgroup (cpu.max per cgroup) and /proc/self/cgroup naming the process's cgroup."""
    root = tmp_path / "cgroup"
    for path, text in cpu_max.items():
        d = root / path.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(text + "\n")
    (root / own.lstrip("/")).mkdir(parents=True, exist_ok=True)
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text(f"0::{own}\n")
    return str(root), str(self_cgroup)


@pytest.mark.parametrize("cpu_max,expected", [
    ({"/system.slice/tunneld.runtime.service": "max 100000"}, None),  # "max": no quota
    ({"/system.slice/tunneld.runtime.service": "200000 100000"}, 2),  # 2 CPUs' worth of time
    ({"/system.slice/tunneld.runtime.service": "150000 100000"}, 2),  # 1.5 rounds up
    ({"/system.slice/tunneld.runtime.service": "50000 100000"}, 1),
    ({"/system.slice": "300000 100000", "/system.slice/tunneld.runtime.service": "max 100000"}, 3),  # a parent's quota
    ({"/system.slice": "800000 100000", "/system.slice/tunneld.runtime.service": "400000 100000"}, 4),  # the tightest
    ({}, None),  # no cpu controller anywhere
])
def test_the_cgroup_cpu_quota_is_read_from_the_process_cgroup_and_its_ancestors(tmp_path, cpu_max, expected):
    from tunneld.runtime.workers import cgroup_cpu_quota

    root, self_cgroup = _cgroup_tree(tmp_path, cpu_max)
    assert cgroup_cpu_quota(root, self_cgroup) == expected


def test_no_cgroup_v2_line_means_no_quota(tmp_path):
    from tunneld.runtime.workers import cgroup_cpu_quota

    (tmp_path / "self-cgroup").write_text("4:memory:/x\n1:cpu:/\n")  # cgroup v1 only
    assert cgroup_cpu_quota(str(tmp_path), str(tmp_path / "self-cgroup")) is None
    assert cgroup_cpu_quota(str(tmp_path), str(tmp_path / "missing")) is None


def test_auto_on_32_cpus_with_a_2_cpu_quota_picks_one_worker(monkeypatch):
    from tunneld.runtime import workers

    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.setattr(workers, "cgroup_cpu_quota", lambda: 2)
    assert workers.resolve("auto", "udp") == (1, "workers auto: 1 for 2 CPUs")
    monkeypatch.setattr(workers, "cgroup_cpu_quota", lambda: None)
    assert workers.resolve("auto", "udp") == (8, "workers auto: 8 for 32 CPUs")


# -- the typed messages, the channel, and one Worker driven as the parent drives a child --------------------------


def test_every_message_crosses_the_channel_as_itself_and_a_closed_end_is_seen():
    from tunneld.runtime.channel import Ready, Stop

    stats = _stats(3, 5, 10.0, Drop.TOO_BIG)
    parent, child = Channel.pair()
    try:
        child.setblocking(False)
        sent = [Ready(), StatsRequest(7), StatsReport(7, stats, 1.25), Apply(peer="192.0.2.9"), Apply(log_level="debug"),
                Stop()]
        for message in sent:
            parent.send(message)
        got, closed = child.receive()
        assert got[:2] + got[3:] == sent[:2] + sent[3:] and not closed
        assert (got[2].seq, got[2].cpu, got[2].stats.tx_packets, got[2].stats.drops) == (7, 1.25, 3, {Drop.TOO_BIG: 2})
        assert child.receive() == ([], False)
        parent.close()
        assert child.receive() == ([], True)
    finally:
        child.close()


def test_a_channel_reads_a_bounded_number_of_messages_per_wake_up():
    from tunneld.runtime.channel import DRAIN_MAX

    parent, child = Channel.pair()
    try:
        child.setblocking(False)
        for seq in range(DRAIN_MAX + 3):
            parent.send(StatsRequest(seq))
        first, _ = child.receive()
        rest, _ = child.receive()
        assert [m.seq for m in first + rest] == list(range(DRAIN_MAX + 3)) and len(first) == DRAIN_MAX
    finally:
        parent.close()
        child.close()


class _Pipe:
    """A fileno that an event loop can watch and that never becomes readable."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class _Link(FakeLink):
    def __init__(self, peer: str, fd: int) -> None:
        super().__init__(peer)
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def set_peer(self, peer: str) -> None:
        if ":" in peer:
            from tunneld.io import SetupError

            raise SetupError("another IP version needs a new socket")
        self.peer = peer


class _Device(FakeDevice):
    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def _worker(index: int = 1):
    from tunneld.encap.gre import Gre
    from tunneld.runtime.worker import Worker

    pipes = [_Pipe(), _Pipe()]
    codec = Gre(seq=True)
    worker = Worker(index, _Device(pipes[0].r), _Link("192.0.2.2", pipes[1].r), codec, dev="tunneld0",
                    max_frame=1472, offload=False)
    worker.engine.peers.get("192.0.2.2").session.rx_seq = 5000  # learnt from the old peer
    return worker, pipes


def test_a_child_worker_answers_applies_and_stops_on_its_channel(caplog):
    """What the parent sees of a child: Ready, one StatsReport per StatsRequest, Apply in place, Stop → status 0."""
    import asyncio
    import logging

    from tunneld.runtime.channel import Ready, Stop

    worker, pipes = _worker()
    parent, child = Channel.pair()
    caplog.set_level(logging.INFO, logger="tunneld")
    old_level = logging.getLogger().level

    async def drive() -> tuple[int, list]:
        loop = asyncio.get_running_loop()
        serving = loop.create_task(worker.serve_channel(child))
        parent.setblocking(False)
        heard: list = []

        async def until(kind) -> None:
            for _ in range(200):
                got, _ = parent.receive()
                heard.extend(got)
                if any(isinstance(m, kind) for m in heard):
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"no {kind.__name__} in {heard}")

        await until(Ready)
        worker.stats.tx_packets = 42
        parent.send(StatsRequest(3))
        await until(StatsReport)
        parent.send(Apply(peer="192.0.2.9", log_level="warning"))
        parent.send(Apply(peer="fd00::9"))  # refused by the link: logged, the worker carries on
        parent.send(StatsRequest(4))
        await asyncio.sleep(0.05)
        parent.send(Stop())
        return await asyncio.wait_for(serving, 5), heard

    try:
        status, heard = asyncio.run(drive())
        assert status == 0
        assert isinstance(heard[0], Ready)
        report = next(m for m in heard if isinstance(m, StatsReport))
        assert (report.seq, report.stats.tx_packets) == (3, 42) and report.cpu > 0
        # as worker 0 applies a reload: the new peer has a session of its own, its numbers start afresh
        assert worker.link.peer == "192.0.2.9" and worker.engine.peers.get("192.0.2.9").session.rx_seq is None
        assert logging.getLogger().level == logging.WARNING
        assert "worker 1: reload: another IP version needs a new socket" in caplog.text
    finally:
        logging.getLogger().setLevel(old_level)
        parent.close()
        child.close()
        for p in pipes:
            p.close()


def test_a_child_worker_stops_when_the_parent_closes_its_end():
    import asyncio

    worker, pipes = _worker()
    parent, child = Channel.pair()

    async def drive() -> int:
        serving = asyncio.get_running_loop().create_task(worker.serve_channel(child))
        await asyncio.sleep(0.05)
        parent.close()
        return await asyncio.wait_for(serving, 5)

    try:
        assert asyncio.run(drive()) == 0
    finally:
        child.close()
        for p in pipes:
            p.close()


@pytest.mark.parametrize("index,line", [
    (0, "interface tunneld0 was deleted while running; stopping (exit status 1)"),
    (2, "worker 2: interface tunneld0 was deleted while running; stopping"),
])
def test_a_deleted_interface_stops_any_worker_with_status_1_and_a_later_clean_stop_keeps_it(index, line, caplog):
    import asyncio
    import errno

    worker, pipes = _worker(index)

    def gone(buf) -> int:
        raise OSError(errno.EBADFD, "File descriptor in bad state")

    async def drive() -> int:
        worker.start(asyncio.get_running_loop())
        worker.engine.device.read_into = gone
        worker.engine.on_device_readable()
        worker.stop()  # the SIGTERM that follows does not turn the failure into a clean exit
        return await worker.wait()

    try:
        assert asyncio.run(drive()) == 1
        assert line in caplog.text
    finally:
        for p in pipes:
            p.close()


def test_the_parent_serves_worker_0_logs_the_up_line_and_stops_cleanly_on_sigterm(caplog):
    """daemon.serve over a Tunnel whose descriptors are fakes: the plan, worker 0 and the service together."""
    import asyncio
    import logging
    import signal

    from tunneld.config.schema import TunnelConfig
    from tunneld.runtime.daemon import Tunnel, serve

    caplog.set_level(logging.INFO, logger="tunneld")
    tunnel = Tunnel(TunnelConfig(peer="192.0.2.2", extra={"vni": 7}, metrics_listen="", offload=False), {"vxlan": Vxlan},
                    underlay_mtu=lambda peer: (1500, "eth0"), cpus=1)
    pipes = [_Pipe(), _Pipe()]
    tunnel.resources.devices, tunnel.resources.links = [_Device(pipes[0].r)], [_Link("192.0.2.2", pipes[1].r)]
    tunnel.worker = tunnel._worker(0, *tunnel.resources.unit(0))

    async def drive() -> int:
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(serve(tunnel), 5)

    try:
        assert asyncio.run(drive()) == 0
        up = [r.getMessage() for r in caplog.records if " up: " in r.getMessage()]
        assert len(up) == 1 and "vxlan on tunneld0, mtu 1450, mac " in up[0] and "vni 7" in up[0], up
        assert "offload off" in up[0] and "metrics off" in up[0]
        assert any(r.getMessage().startswith("shutting down: tx 0 packets") for r in caplog.records)
    finally:
        tunnel.supervisor.stop()
        tunnel.worker.close()
        for p in pipes:
            p.close()
