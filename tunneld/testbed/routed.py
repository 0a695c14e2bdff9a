"""Two hosts with a router between them, for path MTU: A – R – B, each link a veth pair.

    A (10.231.0.1, fd00:231::1)  veth-a ── veth-ra  R  veth-rb ── veth-b  B (10.231.3.2, fd00:233::2)

R forwards IPv4 and IPv6. The link A–R keeps MTU 1500, so A's own interface never tells it the path is smaller;
R's end of the link R–B gets ``mtu`` (``Router.set_mtu`` changes it while traffic runs). A learns the path MTU
only as the Internet would: from R's ICMP "fragmentation needed" / "packet too big". B's end keeps 1500: a B
behind the small link would give its own tunnel the small MTU and the inner TCP's MSS option would keep A's
segments small, and the path would never be put to the test. What crosses is meant to flow from A to B
(B's packets above ``mtu`` are dropped by R's end of the veth without a word).

Everything created here is removed on exit, as netns.testbed() does; the hosts are ``Host``s as there.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from typing import Iterator

from tunneld.testbed.netns import NETNS_PREFIX, Host, remove_stale_namespaces, sh

A_V4, R_A_V4, R_B_V4, B_V4 = "10.231.0.1", "10.231.0.254", "10.231.3.254", "10.231.3.2"
A_V6, R_A_V6, R_B_V6, B_V6 = "fd00:231::1", "fd00:231::fe", "fd00:233::fe", "fd00:233::2"


@dataclass
class Router:
    host: Host  # R, with veth-ra towards A and veth-rb towards B

    def set_mtu(self, mtu: int) -> None:
        """R's link towards B: what it forwards to B from now on (A learns it from R's next ICMP)."""
        self.host.run("ip", "link", "set", "veth-rb", "mtu", str(mtu))


@contextlib.contextmanager
def routed(mtu: int = 1400) -> Iterator[tuple[Host, Router, Host]]:
    """Hosts A and B with R between them, R's link to B at ``mtu``; (A, R, B)."""
    remove_stale_namespaces()
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    a = Host(f"{NETNS_PREFIX}{tag}-a", A_V4, A_V6, "veth-a")
    r = Host(f"{NETNS_PREFIX}{tag}-r", R_A_V4, R_A_V6, "veth-ra")
    b = Host(f"{NETNS_PREFIX}{tag}-b", B_V4, B_V6, "veth-b")
    created: list[str] = []
    try:
        for h in (a, r, b):
            sh("ip", "netns", "add", h.name)
            created.append(h.name)
            h.run("ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "veth-a", "netns", a.name, "type", "veth", "peer", "name", "veth-ra", "netns", r.name)
        sh("ip", "link", "add", "veth-rb", "netns", r.name, "type", "veth", "peer", "name", "veth-b", "netns", b.name)
        links = ((a, "veth-a", A_V4, A_V6, 1500), (r, "veth-ra", R_A_V4, R_A_V6, 1500),
                 (r, "veth-rb", R_B_V4, R_B_V6, mtu), (b, "veth-b", B_V4, B_V6, 1500))
        for h, dev, v4, v6, link_mtu in links:
            h.run("ip", "link", "set", dev, "mtu", str(link_mtu), "up")
            h.run("ip", "addr", "add", f"{v4}/24", "dev", dev)
            h.run("ip", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
        r.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        for h, v4, v6 in ((a, R_A_V4, R_A_V6), (b, R_B_V4, R_B_V6)):
            h.run("ip", "route", "add", "default", "via", v4)
            h.run("ip", "-6", "route", "add", "default", "via", v6)
        yield a, Router(r), b
    finally:
        for h in (a, r, b):
            h.kill_all()
        for name in created:
            sh("ip", "netns", "del", name, check=False)


routed.__test__ = False  # type: ignore[attr-defined]
