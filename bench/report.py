"""Writing a run down: JSON for machines, a Markdown table for people, a PNG chart for a glance.

Throughput and packet rates are also given as a ratio to the reference (the kernel's VXLAN, measured in the
same run), because absolute figures drift between runs and machines while ratios travel.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

UNITS = {
    "tcp_gbps": "Gbit/s, median of the 1-stream TCP runs (receiver goodput); _min is the slowest run",
    "tcp4_gbps": "Gbit/s, median of the 4-stream TCP runs; _min is the slowest run",
    "udp64_pps": "datagrams/s received, 64-byte UDP payload sent at full rate (iperf3 -b 0)",
    "udp1400_pps": "datagrams/s received, 1400-byte UDP payload sent at full rate",
    "udp64_loss": "percent of the 64-byte datagrams sent that never arrived",
    "udp1400_loss": "percent of the 1400-byte datagrams sent that never arrived",
    "loss": "the same as udp1400_loss: loss of full-size datagrams at full rate",
    "rtt_idle_p50_ms": "ms, ping round trip on an idle path, median; p99 likewise",
    "rtt_load_p50_ms": "ms, ping round trip while one TCP stream fills the path, median; p99 likewise",
    "cpu_s_per_gb": "CPU seconds (user+system, both ends' userspace data-path processes) per GB of TCP goodput",
    "rss_mb": "MiB, the largest peak resident set (VmHWM) among the processes of both ends (workers included)",
    "mtu": "the inner MTU of host A's interface for this system",
    "encap_ns": "ns per encap() of a 1400-byte frame, best of several repeats",
    "decap_ns": "ns per decap() of the same frame",
    "flow_hash_ns": "ns per flow hash of the same frame (the engine computes one per outbound packet)",
}


def write_all(results: dict[str, Any], out: Path, stem: str, chart: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / f"{stem}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    written.append(path)
    path = out / f"{stem}.md"
    path.write_text(markdown(results))
    written.append(path)
    if chart:
        path = out / f"{stem}.png"
        try:
            draw_chart(results, path)
        except ImportError as e:
            print(f"bench: no chart ({e}); install the bench extra: pip install -e '.[bench]'")
        else:
            written.append(path)
    return written


# -- Markdown -------------------------------------------------------------------------------------------------


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _ratio(row: dict, ref: dict | None, key: str) -> str:
    if not ref or row.get(key) is None or not ref.get(key):
        return "–"
    return f"{row[key] / ref[key]:.2f}×"


def _kpps(value: Any) -> str:
    return "–" if value is None else f"{value / 1e3:.0f}"


def _pair(row: dict, a: str, b: str, digits: int = 3) -> str:
    if row.get(a) is None:
        return "–"
    return f"{_num(row[a], digits)} / {_num(row.get(b), digits)}"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    ref_name = results["reference"]
    rows = results["systems"]
    ref = next((r for r in rows if r["system"] == ref_name and r.get("status") == "ok"), None)
    plan = results["plan"]
    lines = [
        f"# tunneld benchmark ({plan['name']})",
        "",
        f"{results['date']} · commit {results['git_commit']} · {m['cpu_model']}, {m['cores']} cores · "
        f"kernel {m['kernel']} · Python {m['python']} · load average {m['loadavg_start'][0]} at start, "
        f"{m.get('loadavg_end', ['?'])[0]} at end",
        "",
        f"Testbed: {results['testbed']}. TCP: {plan['tcp_reps']} runs of {plan['tcp_seconds']} s each "
        f"(median, slowest in brackets). UDP: {plan['udp_seconds']} s at full rate. Ratios are to {ref_name} "
        "in the same run; throughput and packet rates: higher is better, RTT/CPU/RSS: lower is better.",
        "",
        f"| system | TCP 1 stream Gbit/s | ×{ref_name} | TCP 4 streams Gbit/s | ×{ref_name} "
        "| UDP 64 B kpps (loss %) | UDP 1400 B kpps (loss %) | ×{0} | RTT idle p50 / p99 ms "
        "| RTT loaded p50 / p99 ms | CPU s/GB | peak RSS MiB | MTU |".replace("{0}", ref_name),
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['system']} | {r.get('status')}: {r.get('reason', '')} |" + " |" * 11)
            continue
        lines.append(
            f"| {r['system']} "
            f"| {_num(r.get('tcp_gbps'))} ({_num(r.get('tcp_gbps_min'))}) | {_ratio(r, ref, 'tcp_gbps')} "
            f"| {_num(r.get('tcp4_gbps'))} ({_num(r.get('tcp4_gbps_min'))}) | {_ratio(r, ref, 'tcp4_gbps')} "
            f"| {_kpps(r.get('udp64_pps'))} ({_num(r.get('udp64_loss'), 0)}) "
            f"| {_kpps(r.get('udp1400_pps'))} ({_num(r.get('udp1400_loss'), 0)}) | {_ratio(r, ref, 'udp1400_pps')} "
            f"| {_pair(r, 'rtt_idle_p50_ms', 'rtt_idle_p99_ms')} "
            f"| {_pair(r, 'rtt_load_p50_ms', 'rtt_load_p99_ms')} "
            f"| {_num(r.get('cpu_s_per_gb'))} | {_num(r.get('rss_mb'), 1)} | {r.get('mtu', '–')} |"
        )
    problems = [(r["system"], e) for r in rows for e in r.get("errors", [])]
    if problems:
        lines += ["", "Measurements that failed (recorded, not retried):", ""]
        lines += [f"- {s}: {e}" for s, e in problems]
    codecs = results.get("codecs") or []
    if codecs:
        lines += ["", "Codecs, one 1400-byte frame (best of several repeats, includes the Python call):", "",
                  "| mode | device | header B | encap ns | decap ns | flow hash ns |", "|---|---|--:|--:|--:|--:|"]
        for c in codecs:
            if "error" in c:
                lines.append(f"| {c['mode']} | error: {c['error']} | | | | |")
            else:
                lines.append(f"| {c['mode']} | {c['device']} | {c['header_bytes']} | {c['encap_ns']:.0f} "
                             f"| {c['decap_ns']:.0f} | {c['flow_hash_ns']:.0f} |")
    lines += ["", "CPU s/GB and RSS are for the userspace processes that carry the data (both ends); the kernel "
              "systems have none to charge. Kernel figures on a shared 2-core machine are noisy: compare "
              "within one run, not across runs.", ""]
    return "\n".join(lines)


# -- the chart ------------------------------------------------------------------------------------------------

COLORS = {"kernel": "#4c72b0", "tunneld": "#dd8452", "userspace-c": "#55a868", "userspace-go": "#8172b3"}
KIND_LABEL = {"kernel": "Linux kernel", "tunneld": "tunneld (Python)", "userspace-c": "userspace C peers",
              "userspace-go": "userspace Go peers"}


def draw_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = list(results["systems"])
    ref_name = results["reference"]
    ref = next((r for r in rows if r["system"] == ref_name and r.get("status") == "ok"), None)
    names = [r["system"] for r in rows]
    y = list(range(len(rows)))[::-1]  # first system on top
    colors = [COLORS.get(r.get("kind"), "#999999") for r in rows]

    fig, axes = plt.subplots(2, 2, figsize=(14, 2.2 + 0.75 * len(rows) * 2), constrained_layout=True)
    m = results["machine"]
    fig.suptitle(
        f"tunneld vs the Linux kernel's VXLAN — two namespaces over veth, underlay MTU 1500\n"
        f"{m['cpu_model']}, {m['cores']} cores, kernel {m['kernel']} · {results['date'][:10]} · "
        f"commit {results['git_commit']} · {results['plan']['name']} run",
        fontsize=12,
    )

    # Series within a panel differ by shade and hatch; the colour always says which kind of system it is.
    styles = [(1.0, None), (0.55, "//"), (0.35, "xx")]

    def bars(ax, keys, labels, title, unit, better, scale=1.0, ratio_key=None, fmt="{:.2f}", note=None):
        height = 0.8 / len(keys)
        values_seen = []
        for i, (key, label) in enumerate(zip(keys, labels)):
            alpha, hatch = styles[i]
            offset = (len(keys) - 1) / 2 * height - i * height
            vals = [(r.get(key) or 0) * scale if r.get("status") == "ok" else 0 for r in rows]
            values_seen += [v for v in vals if v > 0]
            ax.barh([yy + offset for yy in y], vals, height=height * 0.92, color=colors, alpha=alpha, hatch=hatch,
                    edgecolor="white")
            for yy, v, r in zip(y, vals, rows):
                if v <= 0:
                    continue
                text = fmt.format(v)
                if note:
                    text += note(r, key)
                if ratio_key == key and ref and r.get(key) and ref.get(key) and r["system"] != ref_name:
                    text += f"  = {r[key] / ref[key]:.2f}× kernel VXLAN"
                ax.text(v * 1.05, yy + offset, text, va="center", fontsize=8)
        if ratio_key and ref and ref.get(ratio_key):
            ax.axvline(ref[ratio_key] * scale, color=COLORS["kernel"], linestyle="--", linewidth=0.9, alpha=0.7)
            ax.text(ref[ratio_key] * scale, 0.01, " kernel VXLAN (reference)", color=COLORS["kernel"], fontsize=7.5,
                    va="bottom", ha="left", transform=ax.get_xaxis_transform())
        ax.set_xscale("log")
        if values_seen:
            ax.set_xlim(min(values_seen) / 2, max(values_seen) * 15)
        ax.set_yticks(y, names)
        ax.set_title(f"{title}\n{unit}, log scale — {better} is better", fontsize=10)
        for yy, r in zip(y, rows):
            if r.get("status") != "ok":
                ax.text(0.01, yy, f"{r.get('status')}: {_short(r.get('reason', ''))}", va="center", fontsize=7.5,
                        color="#666666", transform=ax.get_yaxis_transform())
        ax.grid(axis="x", which="both", alpha=0.25)
        handles = [Patch(facecolor="#777777", alpha=alpha, hatch=hatch, edgecolor="white", label=label)
                   for (alpha, hatch), label in zip(styles, labels)]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=len(labels), fontsize=8,
                  frameon=False)

    def udp_loss(r: dict, key: str) -> str:
        loss = r.get(key.replace("_pps", "_loss"))
        return "" if loss is None else f" ({loss:.0f}% lost)"

    bars(axes[0][0], ["tcp_gbps", "tcp4_gbps"], ["1 TCP stream (median)", "4 TCP streams (median)"],
         "TCP throughput (iperf3)", "Gbit/s", "higher", ratio_key="tcp_gbps")
    bars(axes[0][1], ["udp1400_pps", "udp64_pps"], ["1400-byte datagrams", "64-byte datagrams"],
         "UDP packets delivered, sender at full rate", "thousand packets/s", "higher", scale=1e-3,
         ratio_key="udp1400_pps", fmt="{:.0f}", note=udp_loss)
    bars(axes[1][0], ["rtt_idle_p50_ms", "rtt_load_p50_ms", "rtt_load_p99_ms"],
         ["idle, median", "under 1 TCP stream, median", "under 1 TCP stream, p99"],
         "Ping round trip", "ms", "lower", fmt="{:.3f}")
    ax = axes[1][1]
    bars(ax, ["cpu_s_per_gb"], ["CPU s per GB (both ends)"], "Cost of the userspace data path",
         "CPU seconds per GB of TCP moved", "lower")
    for yy, r in zip(y, rows):
        if r.get("status") == "ok" and r.get("rss_mb") is not None:
            ax.text(0.99, yy, f"peak RSS {r['rss_mb']:.0f} MiB", va="center", ha="right", fontsize=8,
                    color="#333333", transform=ax.get_yaxis_transform())
        elif r.get("status") == "ok" and r.get("kind") == "kernel":
            ax.text(0.01, yy, "in the kernel: not charged to a process", va="center", fontsize=7.5,
                    color="#666666", transform=ax.get_yaxis_transform())
    fig.legend(handles=[Patch(color=c, label=KIND_LABEL[k]) for k, c in COLORS.items()], loc="outside lower center",
               ncol=3, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(text: str, limit: int = 70) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- the docs' table --------------------------------------------------------------------------------------

DOC_BEGIN = "<!-- bench-results -->"
DOC_END = "<!-- /bench-results -->"


def update_doc(doc: Path, results: dict[str, Any], chart: str) -> bool:
    """Replace the text between a doc's bench markers (docs/performance.md, "Latest figures") with this run's
    table; ``chart`` is the chart's path relative to the doc. False if the doc has no markers."""
    text = doc.read_text()
    if DOC_BEGIN not in text or DOC_END not in text:
        return False
    body = markdown(results).split("\n", 2)[2]  # without the "# tunneld benchmark" title
    section = f"{DOC_BEGIN}\n![benchmark chart]({chart})\n\n{body.strip()}\n{DOC_END}"
    head, rest = text.split(DOC_BEGIN, 1)
    tail = rest.split(DOC_END, 1)[1]
    doc.write_text(head + section + tail)
    return True
