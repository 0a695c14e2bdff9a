"""tunneld's benchmark: every system side by side with the kernel's VXLAN, in one run, on one machine.

    python -m bench.run                    # full: ~4 minutes, writes bench/results/latest.{json,md,png}
    python -m bench.run --quick            # fewer, shorter runs: ~1.5 minutes, writes bench/results/quick.*
    python -m bench.run --systems veth,tunneld-vxlan --out /tmp/b

Flow, per system (each in a fresh pair of namespaces, so no system inherits another's state):
  1. bring the system up between host A and host B, wait until A can ping B through it;
  2. ping idle; iperf3 TCP with 1 stream then 4 streams, repeated (CPU time of the userspace data-path
     processes is sampled around each 1-stream run); ping while one TCP stream runs; iperf3 UDP floods
     with 1400-byte then 64-byte payloads; read the processes' peak RSS;
  3. for a system with ``flood_peers`` (tunneld-vxlan, tunneld-vxlan-100peers): send broadcasts into A's
     device at a paced rate and charge the CPU time A's tunneld spent to each flooded frame (flood_cost);
  4. stop the system (tunneld gets SIGTERM and must exit 0), delete the namespaces.
Then the codecs are timed in-process, the closing notes compare the many-peer row with the one-peer row of the
same run (TCP ratio, flood cost), and the results are written.

What must stay true: every process started is stopped and every namespace deleted, also on Ctrl-C, SIGTERM
or a failure (tunneld.testbed's ``testbed()`` does it in ``finally``; the signal handler below turns SIGTERM
into the same unwinding and ignores further signals while it runs). Every wait is bounded. A measurement that
fails is recorded with its reason and the run goes on. Nothing here judges the figures: a benchmark reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import ipaddress
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bench import measure, report
from bench.codecs import bench_all
from bench.systems import PREFIX, REFERENCE, SYSTEMS, Running, device_mtu
from tunneld.testbed import OVERLAY_V4, Host, is_root, testbed
from tunneld.testbed.netns import IMPORT_ROOT
from tunneld.testbed.procfs import cpu_seconds
from tunneld.testbed.prom import exposition, total

REPO = Path(__file__).resolve().parent.parent  # the checkout: its git state goes into the results
TABLE_DOC = REPO / "docs" / "performance.md"  # the doc whose "Latest figures" --update-docs rewrites

RESULTS = Path(__file__).resolve().parent / "results"
# The broadcast address of the overlay every system shares (bench.systems).
OVERLAY_BROADCAST = str(ipaddress.ip_interface(f"{OVERLAY_V4[0]}/{PREFIX}").network.broadcast_address)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long and how often to measure."""

    name: str
    tcp_seconds: int
    tcp_reps: int
    udp_seconds: int
    ping_count: int  # idle pings, 10 ms apart
    load_seconds: int  # ping under TCP load
    codec_seconds: float  # per codec

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


FULL = Plan("full", tcp_seconds=3, tcp_reps=3, udp_seconds=2, ping_count=200, load_seconds=3, codec_seconds=1.5)
QUICK = Plan("quick", tcp_seconds=1, tcp_reps=2, udp_seconds=1, ping_count=100, load_seconds=2, codec_seconds=0.5)


class Interrupted(BaseException):
    """SIGINT or SIGTERM: unwind through every ``finally`` so that the testbed is torn down.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way can swallow it.
    """


def _on_signal(signum: int, frame: Any) -> None:
    # Cleanup must not itself be interrupted by an impatient second Ctrl-C: it is bounded, let it finish.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


class Progress:
    """One line per step on stderr, with the time since the run began."""

    def __init__(self, stream=sys.stderr) -> None:
        self.t0 = time.monotonic()
        self.stream = stream

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=self.stream, flush=True)


# -- one system -------------------------------------------------------------------------------------------


def _cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def measure_system(name: str, plan: Plan, say: Progress) -> dict[str, Any]:
    system = SYSTEMS[name]
    # The load average as this system starts (it includes the bench's own last runs): on a shared machine it
    # says how much others were competing for the CPUs while these figures were taken.
    row: dict[str, Any] = {"system": name, "kind": system.kind, "status": "ok", "errors": [],
                           "loadavg_1m": round(os.getloadavg()[0], 2)}
    reason = system.available()
    if reason:
        say(f"{name}: skipped — {reason}")
        row.update(status="skipped", reason=reason)
        return row
    errors: list[str] = row["errors"]

    def attempt(what: str, fn, *args):
        """Run one measurement; on failure record why and carry on (returns None)."""
        try:
            return fn(*args)
        except (measure.MeasureError, subprocess.SubprocessError, OSError, ValueError) as e:
            errors.append(f"{what}: {e}")
            say(f"{name}: {what} failed: {e}")
            return None

    with testbed() as (a, b):
        say(f"{name}: starting in {a.name} / {b.name}")
        try:
            running: Running = system.start(a, b)
        except Exception as e:  # any failure to start is a result for this row, not the end of the run
            row.update(status="failed", reason=f"did not start: {e}")
            say(f"{name}: did not start: {e}")
            return row
        try:
            a.wait_ping(running.dst, timeout=15)
            row["mtu"] = device_mtu(a, running)
            server = measure.IperfServer(b)
            try:
                _measure(name, plan, a, running, server, row, attempt, say)
            finally:
                server.stop()
            if system.flood_peers and running.pids:
                flood = attempt("flood", flood_cost, a, running, system.flood_peers)
                if flood:
                    row.update(flood)
                    say(f"{name}: flooding one broadcast to {system.flood_peers} peer{'s' * (system.flood_peers > 1)}"
                        f": {flood['flood_us_per_frame']:.1f} µs CPU per frame "
                        f"({flood['flood_us_per_copy']:.2f} µs per copy; {flood['flood_frames']} frames, "
                        f"counted by {flood['flood_counted_by']}; FDB entries: {flood.get('fdb_entries', 'none')})")
            if running.pids:
                row["rss_mb"] = round(max(measure.peak_rss_mb(pid) for pid in running.pids), 1)
        except (TimeoutError, measure.MeasureError, subprocess.SubprocessError, OSError) as e:
            row.update(status="failed", reason=str(e))
            say(f"{name}: failed: {e}")
        finally:
            problems = running.stop()
            errors.extend(problems)
            for problem in problems:
                say(f"{name}: {problem}")
    if not errors:
        del row["errors"]
    return row


def _measure(name, plan: Plan, a, running: Running, server, row, attempt, say) -> None:
    dst = running.dst
    rtt = attempt("ping idle", measure.ping, a, dst, plan.ping_count)
    if rtt:
        row.update(rtt_idle_p50_ms=rtt.p50_ms, rtt_idle_p99_ms=rtt.p99_ms, rtt_idle_lost=rtt.lost)
        say(f"{name}: ping idle p50 {rtt.p50_ms:.3f} ms, p99 {rtt.p99_ms:.3f} ms ({rtt.lost} lost)")

    for streams, key in ((1, "tcp"), (4, "tcp4")):
        runs: list[float] = []
        cpu = moved = 0.0
        for rep in range(plan.tcp_reps):
            before = _cpu(running.pids) if streams == 1 else 0.0
            result = attempt(f"tcp x{streams} run {rep + 1}", measure.tcp, a, dst, plan.tcp_seconds, streams)
            if result is None:
                server.restart()  # a failed test can leave iperf3's server waiting for a peer that left
                continue
            if streams == 1 and running.pids:
                cpu += _cpu(running.pids) - before
                moved += result.bytes
            runs.append(result.gbps)
            say(f"{name}: TCP {streams} stream{'s' * (streams > 1)}, run {rep + 1}/{plan.tcp_reps}: "
                f"{result.gbps:.3f} Gbit/s")
        if runs:
            median, low = measure.summary(runs)
            row.update({f"{key}_gbps": round(median, 4), f"{key}_gbps_min": round(low, 4),
                        f"{key}_runs": [round(r, 4) for r in runs]})
        if streams == 1 and moved:
            row["cpu_s_per_gb"] = round(cpu / (moved / 1e9), 3)
            say(f"{name}: userspace data path used {row['cpu_s_per_gb']:.2f} CPU s per GB moved")

    say(f"{name}: ping under one TCP stream for {plan.load_seconds}s")
    rtt = attempt("ping under load", measure.ping_under_load, a, dst, plan.load_seconds)
    if rtt:
        row.update(rtt_load_p50_ms=rtt.p50_ms, rtt_load_p99_ms=rtt.p99_ms, rtt_load_lost=rtt.lost)
        say(f"{name}: ping under load p50 {rtt.p50_ms:.3f} ms, p99 {rtt.p99_ms:.3f} ms ({rtt.lost} lost)")
    else:
        server.restart()

    for payload in (1400, 64):
        result = attempt(f"udp {payload} B", measure.udp, a, dst, plan.udp_seconds, payload)
        if result is None:
            server.restart()
            continue
        row.update({f"udp{payload}_pps": round(result.pps), f"udp{payload}_loss": round(result.loss_pct, 2)})
        say(f"{name}: UDP {payload} B at full rate: {result.pps / 1e3:.1f} kpps received, "
            f"{result.loss_pct:.1f}% lost")
    if "udp1400_loss" in row:
        row["loss"] = row["udp1400_loss"]


# -- flooding ---------------------------------------------------------------------------------------------

FLOOD_FRAMES = 5000
FLOOD_SECONDS = 2.0  # paced, so that the TAP's queue does not overflow and the figure is the daemon's work

BROADCASTS = r"""
import socket, sys, time
dev, dst, n, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
start, sent = time.monotonic(), 0
while sent < n:
    for _ in range(min(50, n - sent)):
        s.sendto(bytes(64), (dst, 9))  # discard port: the far end's kernel drops it
        sent += 1
    ahead = start + seconds * sent / n - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
print(sent)
"""


def flood_cost(a: Host, running: Running, peers: int) -> dict[str, Any]:
    """CPU µs that A's tunneld spends per broadcast frame it floods to ``peers`` peers.

    The frames are UDP broadcasts to the overlay's broadcast address, written by a sender in A; the divisor is
    tunneld's own ``tunneld_flooded_packets_total`` when it moves, else, with one peer, the frames sent (a
    one-peer tunneld sends a broadcast to its one peer like any other frame); with many peers a counter that
    does not move is an error, not a figure. Only A's daemon (the first
    pid) is charged: the far end's work on its one copy is not the flood's.
    """
    if running.dev is None:
        raise ValueError("no device to flood from")
    broadcast = OVERLAY_BROADCAST

    def flooded() -> float:
        return total(exposition(a), "tunneld_flooded_packets_total")

    pid = running.pids[0]
    counted_before = flooded()
    cpu_before = cpu_seconds(pid)
    out = a.run(sys.executable, "-c", BROADCASTS, running.dev, broadcast, str(FLOOD_FRAMES), str(FLOOD_SECONDS),
                cwd=IMPORT_ROOT, timeout=FLOOD_SECONDS + 30).stdout
    time.sleep(0.3)  # the daemon finishes the last of them
    cpu = cpu_seconds(pid) - cpu_before
    counted = flooded() - counted_before
    if counted <= 0 and peers > 1:  # with many peers, a frame counted by the sender alone may have gone to one
        raise measure.MeasureError("tunneld_flooded_packets_total did not move: nothing was seen flooded")
    frames, by = (int(counted), "tunneld_flooded_packets_total") if counted > 0 else (int(out.split()[-1]), "sender")
    if frames <= 0:
        raise measure.MeasureError("no frame was flooded")
    per_frame = cpu / frames * 1e6
    row = {"flood_peers": peers, "flood_frames": frames, "flood_counted_by": by,
           "flood_us_per_frame": round(per_frame, 2), "flood_us_per_copy": round(per_frame / peers, 3)}
    fdb = total(exposition(a), "tunneld_fdb_entries")  # how full the FDB was (0 where tunneld has none)
    if fdb:
        row["fdb_entries"] = int(fdb)
    return row


def closing_notes(rows: list[dict[str, Any]]) -> list[str]:
    """What the many-peer row says next to the one-peer row of the same run (issue 12's bench)."""
    by_name = {r["system"]: r for r in rows if r.get("status") == "ok"}
    one, many = by_name.get("tunneld-vxlan"), by_name.get("tunneld-vxlan-100peers")
    if not (one and many):
        return []
    notes = []
    if one.get("tcp_gbps") and many.get("tcp_gbps"):
        notes.append(f"100 peers: TCP {many['tcp_gbps']:.3f} Gbit/s = {many['tcp_gbps'] / one['tcp_gbps']:.2f}× "
                     f"the one-peer tunneld-vxlan ({one['tcp_gbps']:.3f}) in this run")
    if one.get("flood_us_per_frame") and many.get("flood_us_per_frame"):
        notes.append(f"flooding one broadcast: {many['flood_us_per_frame']:.1f} µs CPU to 100 peers, "
                     f"{one['flood_us_per_frame']:.1f} µs to one")
    return notes


# -- the machine ------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head}{'-dirty' if dirty else ''}" if head else "unknown"


# -- command line -------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer, shorter runs (~1.5 min); writes quick.* not latest.*")
    p.add_argument("--systems", metavar="LIST",
                   help=f"comma-separated subset of: {', '.join(SYSTEMS)} (default: all)")
    p.add_argument("--seconds", type=int, metavar="N", help="override every iperf3 duration (whole seconds)")
    p.add_argument("--reps", type=int, metavar="N", help="override the number of TCP repetitions")
    p.add_argument("--no-codecs", action="store_true", help="skip the codec micro-benchmarks")
    p.add_argument("--no-chart", action="store_true", help="write JSON and Markdown only")
    p.add_argument("--out", type=Path, default=RESULTS, metavar="DIR", help="results directory (default: %(default)s)")
    p.add_argument("--name", help="results file stem (default: latest, or quick with --quick)")
    p.add_argument("--update-docs", "--update-readme", dest="update_docs", action="store_true",
                   help=f"also put the table into {TABLE_DOC.relative_to(REPO)} between its <!-- bench-results --> "
                   "markers (--update-readme: the old name)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.systems.split(",")] if args.systems else list(SYSTEMS)
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        p.error(f"unknown system {', '.join(unknown)} (known: {', '.join(SYSTEMS)})")
    args.names = names
    for flag in ("seconds", "reps"):
        value = getattr(args, flag)
        if value is not None and not 1 <= value <= 60:
            p.error(f"--{flag} must be between 1 and 60")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not is_root():
        print("bench: needs root to create network namespaces (run it as root, e.g. sudo make bench)", file=sys.stderr)
        return 77
    plan = QUICK if args.quick else FULL
    if args.seconds:
        plan = dataclasses.replace(plan, tcp_seconds=args.seconds, udp_seconds=args.seconds,
                                   load_seconds=args.seconds)
    if args.reps:
        plan = dataclasses.replace(plan, tcp_reps=args.reps)
    stem = args.name or ("quick" if args.quick else "latest")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    say = Progress()
    started = datetime.datetime.now(datetime.timezone.utc)
    results: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "plan": plan.as_dict(),
        "reference": REFERENCE,
        "testbed": "two network namespaces joined by veth, underlay MTU 1500, IPv4 underlay and overlay",
        "units": report.UNITS,
        "systems": [],
        "codecs": [],
    }
    say(f"bench ({plan.name}): {len(args.names)} systems on {results['machine']['cpu_model']}, "
        f"{results['machine']['cores']} cores, load {results['machine']['loadavg_start']}")
    try:
        for name in args.names:
            results["systems"].append(measure_system(name, plan, say))
        for note in closing_notes(results["systems"]):
            say(note)
        if not args.no_codecs:
            results["codecs"] = bench_all(plan.codec_seconds, say)
            for c in results["codecs"]:
                if "error" not in c:
                    say(f"codec {c['mode']}: encap {c['encap_ns']:.0f} ns, decap {c['decap_ns']:.0f} ns")
    except Interrupted as e:
        say(f"interrupted by {e}: namespaces removed, processes stopped; nothing written")
        return 130
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["elapsed_s"] = round(time.monotonic() - say.t0, 1)
    written = report.write_all(results, args.out, stem, chart=not args.no_chart)
    for path in written:
        say(f"wrote {path}")
    if args.update_docs:
        chart = os.path.relpath(args.out / f"{stem}.png", TABLE_DOC.parent)  # a link from the doc's own folder
        doc = TABLE_DOC.relative_to(REPO)
        if report.update_doc(TABLE_DOC, results, chart):
            say(f"updated the latest figures in {doc}")
        else:
            say(f"{doc} has no <!-- bench-results --> markers; left alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
