"""`make demo`: two namespace hosts linked by tunneld over VXLAN; a ping and a TCP transfer cross the tunnel.

Everything it creates (namespaces, veth, tunneld processes, TAP devices) is removed at the end, also on
Ctrl-C or failure.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tunneld.testbed import OVERLAY_V4, Tunneld, is_root, testbed, transfer


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def main() -> int:
    if not is_root():
        print("demo: needs root (it creates network namespaces and TAP devices); try: sudo make demo")
        return 1
    with testbed() as (a, b):
        say(f"host A {a.name} (underlay {a.underlay}) and host B {b.name} (underlay {b.underlay}), joined by veth")
        ta = Tunneld(a, "--mode", "vxlan", "--peer", b.underlay, "--address", f"{OVERLAY_V4[0]}/24")
        tb = Tunneld(b, "--mode", "vxlan", "--peer", a.underlay, "--address", f"{OVERLAY_V4[1]}/24")
        link = a.run("ip", "-o", "link", "show", "tunneld0").stdout
        mtu, mac = re.search(r"mtu (\d+)", link).group(1), re.search(r"link/ether (\S+)", link).group(1)
        say(f"A: tunneld --mode vxlan --peer {b.underlay} --address {OVERLAY_V4[0]}/24  (tunneld0 mtu {mtu}, mac {mac})")
        say(f"B: tunneld --mode vxlan --peer {a.underlay} --address {OVERLAY_V4[1]}/24")
        a.wait_ping(OVERLAY_V4[1])
        ping = a.run("ping", "-c", "3", "-i", "0.2", OVERLAY_V4[1]).stdout
        rtt = re.search(r"= [\d.]+/([\d.]+)/", ping)
        say(f"ping A -> B over the tunnel: 3/3 replies, avg rtt {rtt.group(1) if rtt else '?'} ms")
        sent, received = transfer(a, b, OVERLAY_V4[1], 16 << 20)
        ok = "match" if sent == received else "DIFFER"
        say(f"TCP transfer A -> B: 16 MiB, sha256 at both ends {ok} ({received.split()[1][:16]}...)")
        b.popen("iperf3", "-s", "-1")
        a.run("sleep", "0.3")
        r = a.run("iperf3", "-c", OVERLAY_V4[1], "-t", "3", "-J", check=False, timeout=30)
        if r.returncode == 0:
            gbps = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
            say(f"iperf3 A -> B, one TCP stream, 3 s: {gbps:.2f} Gbit/s")
        capture = b.popen("timeout", "5", "tcpdump", "-l", "-c", "1", "-nn", "-i", b.ifname, "udp", "port", "4789",
                          stderr=subprocess.DEVNULL)
        a.run("sleep", "0.5")
        a.run("ping", "-c", "1", OVERLAY_V4[1], check=False)
        first = capture.communicate(timeout=10)[0].strip()
        if first:
            say("seen on B's underlay: " + " | ".join(line.strip() for line in first.splitlines()))
        for name, t in (("A", ta), ("B", tb)):
            code = t.stop()
            summary = next((line for line in t.output().splitlines() if "shutting down" in line), "")
            say(f"{name}: tunneld exited {code}; {summary.split('shutting down: ')[-1]}")
        say(f"interface removed on exit: {a.link_state('tunneld0') is None and b.link_state('tunneld0') is None}")
    say("namespaces removed; done")
    return 0 if sent == received else 1


if __name__ == "__main__":
    sys.exit(main())
