"""Quick same-run comparison until bench/ lands: `python -m tests.measure_offload [rounds]` (root).

For each round, in fresh namespaces: kernel VXLAN ↔ kernel VXLAN, tunneld ↔ tunneld with offloads, and
tunneld ↔ tunneld with --no-offload; one TCP stream (Gbit/s) and 64-byte UDP (received packets/s), plus the
tunneld RSS after the run. Prints medians. Every iperf3 run is bounded by -t and a timeout.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from tests.netns import OVERLAY_V4, Tunneld, kernel_vxlan, testbed

SECONDS = 3


def iperf(a, b, *args) -> dict:
    srv = b.popen("iperf3", "-s", "-1", "-B", OVERLAY_V4[1])
    time.sleep(0.3)
    try:
        r = a.run("iperf3", "-c", OVERLAY_V4[1], "-t", str(SECONDS), "-J", *args, check=False, timeout=SECONDS + 20)
        return json.loads(r.stdout)
    finally:
        srv.kill()
        srv.wait(timeout=5)


def tcp_gbps(a, b) -> float:
    return iperf(a, b)["end"]["sum_received"]["bits_per_second"] / 1e9


def udp_pps(a, b) -> float:
    end = iperf(a, b, "-u", "-l", "64", "-b", "0")["end"]["sum"]
    return (end["packets"] - end["lost_packets"]) / end["seconds"]


def rss_mb(host, proc) -> float:
    # the tunneld process is the child of `ip netns exec` (which execs), so proc.pid is tunneld itself
    with open(f"/proc/{proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def one_round() -> dict[str, float]:
    out: dict[str, float] = {}
    with testbed() as (a, b):
        kernel_vxlan(a, b.underlay, address=f"{OVERLAY_V4[0]}/24")
        kernel_vxlan(b, a.underlay, address=f"{OVERLAY_V4[1]}/24")
        a.wait_ping(OVERLAY_V4[1])
        out["kernel tcp"] = tcp_gbps(a, b)
        out["kernel udp64"] = udp_pps(a, b)
    for name, extra in (("tunneld", ()), ("tunneld --no-offload", ("--no-offload",))):
        with testbed() as (a, b):
            ta = Tunneld(a, "--peer", b.underlay, "--address", f"{OVERLAY_V4[0]}/24", *extra)
            tb = Tunneld(b, "--peer", a.underlay, "--address", f"{OVERLAY_V4[1]}/24", *extra)
            a.wait_ping(OVERLAY_V4[1])
            out[f"{name} tcp"] = tcp_gbps(a, b)
            out[f"{name} udp64"] = udp_pps(a, b)
            out[f"{name} rss MB"] = max(rss_mb(a, ta.proc), rss_mb(b, tb.proc))
            ta.stop()
            tb.stop()
    return out


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    results = [one_round() for _ in range(rounds)]
    for r in results:
        print({k: round(v, 3) for k, v in r.items()}, flush=True)
    print("median of", rounds)
    for key in results[0]:
        print(f"  {key:<28} {statistics.median(r[key] for r in results):>12.3f}")


if __name__ == "__main__":
    main()
