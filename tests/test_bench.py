"""bench/ must not rot: a reduced real run end to end, clean-up on Ctrl-C, and the pure helpers.

These check that the benchmark runs, produces well-formed results with positive figures, and leaves nothing
behind. They never check how fast anything is: speed is what bench/ reports, not what a test asserts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import pytest

from bench import measure, report, run
from bench.codecs import bench_codec, sample_frame
from bench.systems import SYSTEMS
from tests.support import REPO
from tunneld.encap.base import DeviceKind
from tunneld.encap.vxlan import Vxlan
from tunneld.testbed import sh

NAMESPACES = re.compile(r"starting in (\S+) / (\S+)")


def _bench(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.run", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _namespaces_exist(names: list[str]) -> list[str]:
    listed = sh("ip", "netns", "list").stdout
    present = {line.split()[0] for line in listed.splitlines() if line.strip()}
    return [n for n in names if n in present]


@pytest.mark.netns
def test_quick_run_writes_well_formed_results(tmp_path):
    proc = _bench("--quick", "--systems", "veth,tunneld-vxlan,tunneld-gretap", "--seconds", "1", "--reps", "1",
                  "--out", str(tmp_path), "--name", "smoke")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert re.search(r"^\[\s*\d+\.\ds\] veth: TCP 1 stream, run 1/1: [0-9.]+ Gbit/s$", out, re.M), out

    results = json.loads((tmp_path / "smoke.json").read_text())
    for key in ("date", "git_commit", "machine", "plan", "systems", "codecs", "units"):
        assert key in results
    for key in ("cpu_model", "cores", "kernel"):
        assert results["machine"][key]
    rows = {r["system"]: r for r in results["systems"]}
    assert list(rows) == ["veth", "tunneld-vxlan", "tunneld-gretap"]
    # gretap is skipped with a reason until tunneld offers it, and measured like the others once it does.
    assert rows["tunneld-gretap"]["status"] in ("ok", "skipped"), rows["tunneld-gretap"]
    if rows["tunneld-gretap"]["status"] == "skipped":
        assert "gretap" in rows["tunneld-gretap"]["reason"]
    measured = [name for name, row in rows.items() if row["status"] == "ok"]
    assert {"veth", "tunneld-vxlan"} <= set(measured)
    for name in measured:
        row = rows[name]
        assert row["status"] == "ok" and "errors" not in row, row
        for key in ("tcp_gbps", "tcp4_gbps", "udp64_pps", "udp1400_pps", "rtt_idle_p50_ms", "rtt_idle_p99_ms",
                    "rtt_load_p50_ms", "rtt_load_p99_ms"):
            assert row[key] > 0, (name, key, row[key])
        assert 0 <= row["loss"] <= 100
        assert row["rtt_idle_p50_ms"] <= row["rtt_idle_p99_ms"]
    assert rows["veth"]["mtu"] == 1500 and "cpu_s_per_gb" not in rows["veth"]  # nothing in userspace to charge
    assert rows["tunneld-vxlan"]["cpu_s_per_gb"] > 0 and rows["tunneld-vxlan"]["rss_mb"] > 0
    assert rows["tunneld-vxlan"]["mtu"] == 1450

    codecs = {c["mode"]: c for c in results["codecs"]}
    assert codecs["vxlan"]["encap_ns"] > 0 and codecs["vxlan"]["decap_ns"] > 0

    md = (tmp_path / "smoke.md").read_text()
    assert "| tunneld-vxlan |" in md and "×kernel-vxlan" in md
    assert (tmp_path / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    names = [n for pair in NAMESPACES.findall(out) for n in pair]
    assert len(names) == 2 * len(measured), out  # two namespaces per measured system
    assert _namespaces_exist(names) == []


@pytest.mark.netns
def test_ctrl_c_stops_everything_and_removes_the_namespaces(tmp_path):
    proc = _bench("--systems", "tunneld-vxlan", "--seconds", "5", "--out", str(tmp_path), "--no-codecs")
    lines: list[str] = []
    names: list[str] = []
    deadline = time.monotonic() + 60
    try:
        for line in proc.stdout:  # bounded: the run itself ends within a minute, and so does the deadline
            lines.append(line)
            if m := NAMESPACES.search(line):
                names = list(m.groups())
            if "ping idle p50" in line or time.monotonic() > deadline:
                break  # tunneld is up and iperf3 is about to run: the worst moment to be interrupted
        assert names, "".join(lines)
        inside = sh("ip", "netns", "pids", names[0]).stdout.split() + sh("ip", "netns", "pids", names[1]).stdout.split()
        assert inside, "expected tunneld and iperf3 running in the namespaces"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted by SIGINT" in rest
    assert _namespaces_exist(names) == []
    survivors = [pid for pid in inside if os.path.exists(f"/proc/{pid}")]
    assert survivors == [], survivors
    assert not list(tmp_path.iterdir()), "an interrupted run must not write partial results"


# -- without root -------------------------------------------------------------------------------------------


def test_percentile_matches_the_standard_library():
    data = [0.9, 0.1, 5.0, 0.3, 0.3, 2.2, 0.7, 9.1, 0.05, 1.0, 0.4]
    cuts = statistics.quantiles(data, n=100, method="inclusive")  # cut k is the k-th percentile
    for q in (1, 25, 50, 90, 99):
        assert measure.percentile(data, q) == pytest.approx(cuts[q - 1])
    assert measure.percentile([3.0], 99) == 3.0


def test_ping_output_is_parsed_and_losses_counted():
    out = ("PING 192.168.231.2 (192.168.231.2) 56(84) bytes of data.\n"
           "64 bytes from 192.168.231.2: icmp_seq=1 ttl=64 time=0.143 ms\n"
           "64 bytes from 192.168.231.2: icmp_seq=3 ttl=64 time=0.110 ms\n"
           "64 bytes from 192.168.231.2: icmp_seq=4 ttl=64 time=1.5 ms\n")
    r = measure.parse_ping(out, count=4)
    assert (r.p50_ms, r.lost) == (0.143, 1)
    with pytest.raises(measure.MeasureError, match="no replies"):
        measure.parse_ping("PING x\n--- x ping statistics ---\n4 packets transmitted, 0 received\n", count=4)


def test_iperf_failures_are_measure_errors():
    with pytest.raises(measure.MeasureError, match="unable to connect"):
        measure.parse_iperf(json.dumps({"start": {}, "end": {}, "error": "unable to connect to server"}))
    with pytest.raises(measure.MeasureError, match="no JSON"):
        measure.parse_iperf("iperf3: error - the server is busy")


def test_markdown_table_rows_line_up_with_the_header():
    results = {
        "date": "2026-11-25T00:00:00+00:00", "git_commit": "abc", "reference": "kernel-vxlan",
        "machine": {"cpu_model": "cpu", "cores": 2, "kernel": "6.18", "python": "3.11", "loadavg_start": [1, 1, 1]},
        "plan": {"name": "quick", "tcp_reps": 1, "tcp_seconds": 1, "udp_seconds": 1},
        "testbed": "two namespaces", "codecs": [],
        "systems": [
            {"system": "kernel-vxlan", "kind": "kernel", "status": "ok", "tcp_gbps": 10.0, "udp1400_pps": 1000},
            {"system": "tunneld-vxlan", "kind": "tunneld", "status": "ok", "tcp_gbps": 1.0, "udp1400_pps": 500},
            {"system": "tunneld-gre", "kind": "tunneld", "status": "skipped", "reason": "not offered"},
        ],
    }
    table = [line for line in report.markdown(results).splitlines() if line.startswith("|")]
    widths = {line.count("|") for line in table}
    assert len(widths) == 1, table
    assert "| 0.10× |" in table[3] and "| 0.50× |" in table[3]  # tunneld-vxlan against kernel-vxlan


def test_the_docs_table_is_replaced_between_its_markers(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text(f"intro\n{report.DOC_BEGIN}\nold table\n{report.DOC_END}\noutro\n")
    results = {
        "date": "2026-11-25T00:00:00+00:00", "git_commit": "abc", "reference": "kernel-vxlan", "codecs": [],
        "machine": {"cpu_model": "cpu", "cores": 2, "kernel": "6.18", "python": "3.11", "loadavg_start": [1, 1, 1]},
        "plan": {"name": "full", "tcp_reps": 3, "tcp_seconds": 3, "udp_seconds": 2}, "testbed": "two namespaces",
        "systems": [{"system": "veth", "kind": "kernel", "status": "ok", "tcp_gbps": 10.0}],
    }
    assert report.update_doc(doc, results, "../bench/results/latest.png")
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert "| veth | 10.00" in text and "![benchmark chart](../bench/results/latest.png)" in text
    assert not report.update_doc(_no_markers(tmp_path), results, "x.png")


def test_the_docs_table_lives_where_the_bench_writes_it():
    """--update-docs rewrites docs/performance.md, which holds the markers once each, in that order."""
    text = run.TABLE_DOC.read_text()
    assert text.count(report.DOC_BEGIN) == 1 and text.count(report.DOC_END) == 1
    assert text.index(report.DOC_BEGIN) < text.index(report.DOC_END)
    assert "![benchmark chart](../bench/results/latest.png)" in text  # the chart, relative to docs/
    assert run.parse_args(["--update-readme"]).update_docs and run.parse_args(["--update-docs"]).update_docs


def _no_markers(tmp_path):
    path = tmp_path / "OTHER.md"
    path.write_text("no markers here\n")
    return path


def test_codec_micro_benchmark_times_a_real_round_trip():
    row = bench_codec(Vxlan, seconds=0.05)
    assert row["mode"] == "vxlan" and row["header_bytes"] == 8
    assert row["encap_ns"] > 0 and row["decap_ns"] > 0 and row["flow_hash_ns"] > 0
    assert len(sample_frame(DeviceKind.TAP)) == len(sample_frame(DeviceKind.TUN)) == 1400


def test_every_system_the_issue_names_is_known():
    # tunneld-vxlan-100peers: issue 12's bench row (100 configured peers, a nearly full FDB)
    assert list(SYSTEMS) == ["veth", "kernel-vxlan", "tunneld-vxlan", "tunneld-vxlan-100peers",
                             "tunneld-vxlan-nooffload",
                             "tunneld-vxlan-workers2", "tunneld-vxlan-kernelgso", "tunneld-gre",
                             "tunneld-gretap", "openvpn", "socat", "tunneld-wireguard", "wireguard-go"]
