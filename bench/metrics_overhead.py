"""What the Prometheus exporter costs the data path: one TCP stream through tunneld, metrics on vs off.

    python -m bench.metrics_overhead [--repeats 3] [--seconds 5]

Each repeat runs every variant back to back in fresh namespaces (the order rotates, so that a slow moment
of a shared machine does not always land on the same variant):
  off      tunneld --metrics-listen ''         no HTTP thread, no lag probe
  idle     tunneld --metrics-listen HOST:PORT  exporter and lag probe running, nobody scraping
  scraped  as idle, and a scraper GETs /metrics of both ends every second
           (15-60 s is usual in production; 1 s makes the scrape cost 15-60 times easier to see)
iperf3 carries one TCP stream from A to B over the overlay. Prints one line per run and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from tunneld.testbed import OVERLAY_V4, Tunneld, testbed
from tunneld.testbed.netns import IMPORT_ROOT


def run_once(variant: str, seconds: float) -> dict:
    metrics = variant != "off"
    with testbed() as (a, b):
        listen_a = "127.0.0.1:9477" if metrics else ""
        listen_b = f"{b.underlay}:9477" if metrics else ""
        ta = Tunneld(a, "--peer", b.underlay, "--address", f"{OVERLAY_V4[0]}/24", "--metrics-listen", listen_a)
        tb = Tunneld(b, "--peer", a.underlay, "--address", f"{OVERLAY_V4[1]}/24", "--metrics-listen", listen_b)
        a.wait_ping(OVERLAY_V4[1], timeout=15)
        server = b.popen("iperf3", "-s", "-1", "-B", OVERLAY_V4[1])
        scraper = None
        if variant == "scraped":
            scraper = a.popen(sys.executable, "-m", "tunneld.testbed.prom", "scrape", f"http://{listen_a}/metrics",
                              f"http://{listen_b}/metrics", "--for", str(seconds + 2), cwd=IMPORT_ROOT)
        try:
            for _ in range(100):  # bounded: iperf3 -s needs a moment before it listens
                if ":5201 " in b.run("ss", "-Hltn", "sport = :5201").stdout:
                    break
                b.run("sleep", "0.05")
            r = a.run("iperf3", "-c", OVERLAY_V4[1], "-t", str(seconds), "-J", check=False, timeout=seconds + 30)
            result = json.loads(r.stdout)
            if r.returncode != 0 or "error" in result or "sum_received" not in result.get("end", {}):
                raise RuntimeError(f"iperf3: {result.get('error') or r.stdout[-800:]} {r.stderr[-300:]}")
            scrapes = None
            if scraper is not None:
                out, _ = scraper.communicate(timeout=seconds + 30)
                if scraper.returncode != 0:
                    raise RuntimeError(f"scraper failed: {out}")
                scrapes = int(out.strip().splitlines()[-1])
        finally:
            server.kill()
        for t in (ta, tb):
            t.stop()
    end = result["end"]
    return {
        "gbps": end["sum_received"]["bits_per_second"] / 1e9,
        "retransmits": end["sum_sent"].get("retransmits"),
        "scrapes": scrapes,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5)
    args = p.parse_args()
    variants = ["off", "idle", "scraped"]
    results: dict[str, list[float]] = {v: [] for v in variants}
    print(f"load average at start: {os.getloadavg()[0]:.2f} (2 cores, shared with other work)", flush=True)
    for i in range(args.repeats):
        for variant in variants[i % 3:] + variants[:i % 3]:
            r = run_once(variant, args.seconds)
            results[variant].append(r["gbps"])
            extra = f", {r['scrapes']} scrapes" if r["scrapes"] is not None else ""
            print(f"repeat {i + 1} metrics {variant:<7}: {r['gbps']:.3f} Gbit/s, {r['retransmits']} retransmits{extra}",
                  flush=True)
    for variant, xs in results.items():
        spread = f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else ""
        print(f"metrics {variant:<7}: median {statistics.median(xs):.3f} Gbit/s, mean {statistics.mean(xs):.3f}{spread}"
              f" over {len(xs)} runs: {', '.join(f'{x:.3f}' for x in xs)}")
    off = statistics.median(results["off"])
    for variant in variants[1:]:
        print(f"{variant}/off median ratio: {statistics.median(results[variant]) / off:.3f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
