"""tunneld's testbed: network namespaces to run the real daemon in, for tests/ and bench/ alike.

What wireguard-go's ``tun/tuntest`` or Go's ``net/http/httptest`` are to their projects: tooling, shipped with
the package so that the tests, the benchmark and a plugin author's own tests stand on the same ground, and
nothing in the daemon imports it. It needs root (namespaces, veth, TAP) and the Debian tools ``make setup``
installs (iproute2, ethtool, tcpdump, prometheus); the pure fakes for tests without root are in
``tunneld.testing``.

    with testbed() as (a, b):                      # two hosts joined by veth: netns.py
        Tunneld(a, "--peer", b.underlay, "--address", f"{OVERLAY_V4[0]}/24")      # peers.py
        kernel_vxlan(b, a.underlay, address=f"{OVERLAY_V4[1]}/24")
        sent, received = transfer(a, b, OVERLAY_V4[1])                           # netns.py + xfer.py

  netns.py    Host, testbed(), the address plan, transfer(), tcpdump()
  segment.py  segment(n): N hosts on a bridge underlay (its own plan: 10.231.1.0/24, overlay 192.168.232.0/24)
  peers.py    Tunneld (the installed daemon as a process in a host; its client commands and ``show()``),
              kernel_vxlan() (one remote, or several with all-zero FDB entries), kernel_fdb(), start_pair(),
              features() (ethtool's view of a device's offloads), drops() (from tunneld's summary line)
  xfer.py     the two ends of transfer(), run in the hosts as ``python -m tunneld.testbed.xfer``
  prom.py     a real Prometheus server in a host, and its API client (``python -m tunneld.testbed.prom``);
              exposition()/samples()/total(): one scrape of a tunneld's exporter, read
  procfs.py   CPU seconds, resident memory and children of a process, from /proc
  notify.py   the service manager's end of sd_notify

What must stay true: everything a testbed creates is removed on exit, also on failure or Ctrl-C; every wait is
bounded; packets go nowhere but loopback and the testbed's own namespaces. It imports only the standard
library and tunneld (no pytest, no scapy: assertions and packet crafting stay in tests/). The names below are
the everyday ones; xfer and prom are programs as well as modules, so they are imported by their own name only
(importing them here would put them in ``sys.modules`` before ``python -m`` runs them).
"""

from tunneld.testbed.netns import (
    OVERLAY_V4,
    OVERLAY_V6,
    UNDERLAY_V4,
    UNDERLAY_V6,
    Host,
    is_root,
    sh,
    tcpdump,
    testbed,
    transfer,
)
from tunneld.testbed.peers import TUNNELD, Tunneld, drops, features, kernel_fdb, kernel_vxlan, start_pair
from tunneld.testbed.segment import UNOWNED_V4, segment

__all__ = [
    "OVERLAY_V4", "OVERLAY_V6", "UNDERLAY_V4", "UNDERLAY_V6", "TUNNELD",
    "UNOWNED_V4", "Host", "Tunneld", "drops", "features", "is_root", "kernel_fdb", "kernel_vxlan", "segment", "sh",
    "start_pair", "tcpdump", "testbed", "transfer",
]
