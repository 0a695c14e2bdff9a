"""The measurements, each one bounded: iperf3 (TCP and UDP), ping RTT percentiles, and /proc accounting.

Every function here runs a real tool inside a namespace host and returns plain numbers; none of them judges
the numbers. A tool that fails or hangs raises ``MeasureError`` (with the tool's own words), which the caller
records against the system and moves on from.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import time
from dataclasses import dataclass

from tunneld.testbed import Host

IPERF_PORT = 5201
# Generous slack on top of a measurement's own duration: iperf3's control handshake, the end-of-test
# exchange and a busy 2-core machine all add seconds. A measurement that overruns this is stuck, not slow.
SLACK_S = 20


class MeasureError(Exception):
    """A measurement could not be taken; ``str()`` says why in one line."""


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- iperf3 -------------------------------------------------------------------------------------------------


class IperfServer:
    """``iperf3 -s`` in a host, restartable when a failed test leaves it wedged."""

    def __init__(self, host: Host, port: int = IPERF_PORT) -> None:
        self.host = host
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self, timeout: float = 10) -> None:
        self.proc = self.host.popen("iperf3", "-s", "-p", str(self.port), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MeasureError(f"iperf3 server exited with {self.proc.returncode}")
            r = self.host.run("ss", "-Hltn", f"sport = :{self.port}", check=False, timeout=5)
            if r.stdout.strip():
                return
            time.sleep(0.05)
        raise MeasureError(f"iperf3 server did not listen on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def iperf_argv(dst: str, seconds: int, *extra: str, port: int = IPERF_PORT) -> list[str]:
    # --connect-timeout bounds the control connection; -t is whole seconds (iperf3 truncates fractions).
    return ["iperf3", "-c", dst, "-p", str(port), "-t", str(seconds), "-J", "--connect-timeout", "5000", *extra]


def parse_iperf(stdout: str) -> dict:
    """The ``end`` section of iperf3's JSON report; raises MeasureError when the test did not complete."""
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        raise MeasureError(f"iperf3 printed no JSON: {_one_line(stdout)!r}") from None
    if report.get("error"):
        raise MeasureError(f"iperf3: {report['error']}")
    end = report.get("end") or {}
    if "sum_received" not in end:
        raise MeasureError("iperf3 report has no end.sum_received (test did not finish)")
    return end


# iperf3's server takes a moment to reset between tests; a client that comes back too fast is turned away
# before anything is measured. That is worth two more tries; anything else is a real failure.
_NOT_STARTED = ("unable to connect", "server is busy")
CONNECT_TRIES = 3


def run_iperf(host: Host, dst: str, seconds: int, *extra: str) -> dict:
    argv = iperf_argv(dst, seconds, *extra)
    for attempt in range(1, CONNECT_TRIES + 1):
        try:
            r = host.run(*argv, check=False, timeout=seconds + SLACK_S)
        except subprocess.TimeoutExpired:
            raise MeasureError(f"iperf3 {' '.join(extra) or 'tcp'} did not finish within {seconds + SLACK_S}s") from None
        try:
            return parse_iperf(r.stdout)
        except MeasureError as e:
            if attempt == CONNECT_TRIES or not any(s in str(e) for s in _NOT_STARTED):
                raise
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class TcpResult:
    gbps: float  # goodput the receiver saw
    bytes: int  # bytes the receiver got


def tcp(host: Host, dst: str, seconds: int, streams: int = 1) -> TcpResult:
    end = run_iperf(host, dst, seconds, "-P", str(streams))
    rx = end["sum_received"]
    return TcpResult(gbps=rx["bits_per_second"] / 1e9, bytes=int(rx["bytes"]))


@dataclass(frozen=True)
class UdpResult:
    pps: float  # datagrams per second that arrived, over the sender's sending window
    loss_pct: float  # datagrams the sender wrote that never arrived
    sent: int
    received: int


def udp(host: Host, dst: str, seconds: int, payload: int) -> UdpResult:
    """A UDP flood at full rate (``-b 0``: as fast as the sender can write) with ``payload``-byte datagrams."""
    end = run_iperf(host, dst, seconds, "-u", "-b", "0", "-l", str(payload))
    sent, rx = end["sum_sent"], end["sum_received"]
    received = int(rx["bytes"]) // payload
    window = float(sent["seconds"]) or float(seconds)
    written = int(sent["packets"]) or 1
    return UdpResult(
        pps=received / window,
        loss_pct=float(rx.get("lost_percent", 100.0 * (written - received) / written)),
        sent=written,
        received=received,
    )


# -- ping ---------------------------------------------------------------------------------------------------

_RTT = re.compile(r"time=([0-9.]+) ms")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    data = sorted(values)
    if not data:
        raise ValueError("no values")
    k = (len(data) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


@dataclass(frozen=True)
class RttResult:
    p50_ms: float
    p99_ms: float
    sent: int
    lost: int


def ping_args(dst: str, count: int, interval: float) -> list[str]:
    # -W 1: a reply later than a second counts as lost; -w bounds the whole run.
    deadline = int(count * interval + 3)
    return ["ping", "-n", "-c", str(count), "-i", f"{interval:g}", "-W", "1", "-w", str(deadline), dst]


def parse_ping(stdout: str, count: int) -> RttResult:
    rtts = [float(m) for m in _RTT.findall(stdout)]
    if not rtts:
        raise MeasureError(f"ping got no replies: {_one_line(stdout[-300:])!r}")
    p50, p99 = (round(percentile(rtts, q), 4) for q in (50, 99))
    return RttResult(p50, p99, count, max(0, count - len(rtts)))


def ping(host: Host, dst: str, count: int, interval: float = 0.01) -> RttResult:
    argv = ping_args(dst, count, interval)
    r = host.run(*argv, check=False, timeout=count * interval + SLACK_S)
    return parse_ping(r.stdout, count)


def ping_under_load(host: Host, dst: str, seconds: int, interval: float = 0.01) -> RttResult:
    """Ping while one TCP stream fills the path: what a user of an interactive session would feel."""
    load = host.popen(*iperf_argv(dst, seconds + 1), stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # let the stream fill its window before sampling
        count = max(10, int(seconds / interval))
        result = ping(host, dst, count, interval)
        try:
            out, _ = load.communicate(timeout=seconds + SLACK_S)
        except subprocess.TimeoutExpired:
            raise MeasureError("the load-generating iperf3 did not finish") from None
        parse_iperf(out)  # the load must have been real for the figure to mean "under load"
        return result
    finally:
        if load.poll() is None:
            load.kill()
            load.wait(timeout=5)


# -- /proc ---------------------------------------------------------------------------------------------------


def peak_rss_mb(pid: int) -> float:
    """The process's high-water resident set (``VmHWM``), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise MeasureError(f"no VmHWM for pid {pid}")


def summary(values: list[float]) -> tuple[float, float]:
    """(median, min) of repeated runs."""
    return statistics.median(values), min(values)
