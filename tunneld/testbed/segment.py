"""N namespace hosts on one switched underlay: the testbed for overlays of more than two hosts.

    with segment(4) as hosts:                      # hosts[i].underlay = 10.231.1.(i+1), .overlay = 192.168.232.(i+1)
        kernel_vxlan(hosts[2], [h.underlay for h in hosts if h is not hosts[2]], address=...)   # peers.py

The switch is a Linux bridge in a namespace of its own (``td-PID-TAG-sw``), so nothing of the root
namespace is touched: each host gets one veth (``ul0``) whose other end is a port of that bridge. The bridge
learns the hosts' outer MACs like a real switch, so a capture on one host's ``ul0`` sees what is sent to that
host plus the underlay's own floods (ARP, unknown unicast until learnt) — which is why a test counting the
overlay's copies filters on the destination address, not on what merely passes by.

The address plan is the testbed's own and lives only inside the namespaces: the underlay 10.231.1.0/24
(fd00:231:1::/64), host i at .i+1; the overlay 192.168.232.0/24 (fd00:233::/64), host i at .i+1. Addresses
above ``max(HOSTS)`` in the underlay /24 are owned by nobody: the bench's unreachable peers use them, and the
kernel's ARP for them stays on the bridge.

What must stay true (as for netns.testbed()): everything is removed on exit, also on failure; every wait is
bounded; every host has its own runtime directory (``Host.runtime_dir``) so that daemons in different hosts,
which share the root namespace's filesystem, never meet on one control socket.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from tunneld.testbed.netns import NETNS_PREFIX, Host, remove_stale_namespaces, sh

SEGMENT_UNDERLAY_V4 = "10.231.1.{}"
SEGMENT_UNDERLAY_V6 = "fd00:231:1::{}"
SEGMENT_OVERLAY_V4 = "192.168.232.{}"
SEGMENT_OVERLAY_V6 = "fd00:233::{}"
UNDERLAY_PREFIX, OVERLAY_PREFIX = 24, 24
MAX_HOSTS = 32  # the plan's host numbers; .100-.254 of the underlay are left to addresses nobody owns
UNOWNED_V4 = [SEGMENT_UNDERLAY_V4.format(i) for i in range(100, 255)]
BRIDGE = "br0"
UPLINK = "ul0"  # each host's underlay interface


def host_underlay(i: int) -> str:
    return SEGMENT_UNDERLAY_V4.format(i + 1)


def host_overlay(i: int) -> str:
    return SEGMENT_OVERLAY_V4.format(i + 1)


@contextlib.contextmanager
def segment(n: int, mtu: int = 1500) -> Iterator[list[Host]]:
    """``n`` fresh namespace hosts, each with one veth to a bridge in a switch namespace; removed on exit.

    ``Host.underlay``/``underlay6`` are the hosts' underlay addresses, ``Host.overlay`` the overlay address the
    plan gives it (without prefix; callers put it on whatever tunnel device they make), ``Host.ifname`` ``ul0``.
    """
    if not 2 <= n <= MAX_HOSTS:
        raise ValueError(f"segment of {n} hosts: between 2 and {MAX_HOSTS}")
    remove_stale_namespaces()
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    switch = f"{NETNS_PREFIX}{tag}-sw"
    rundir = Path(tempfile.mkdtemp(prefix="tunneld-segment-"))
    hosts = [Host(f"{NETNS_PREFIX}{tag}-h{i + 1}", host_underlay(i), SEGMENT_UNDERLAY_V6.format(i + 1), UPLINK,
                  overlay=host_overlay(i), runtime_dir=str(rundir / f"h{i + 1}"))
             for i in range(n)]
    created: list[str] = []
    try:
        sh("ip", "netns", "add", switch)
        created.append(switch)
        sw = ["ip", "netns", "exec", switch]
        sh(*sw, "ip", "link", "set", "lo", "up")
        # No STP (a single bridge has no loop to break, and STP's listening delay would hold the ports down).
        sh(*sw, "ip", "link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        sh(*sw, "ip", "link", "set", BRIDGE, "mtu", str(mtu), "up")
        for i, h in enumerate(hosts):
            sh("ip", "netns", "add", h.name)
            created.append(h.name)
            port = f"p{i + 1}"
            sh("ip", "link", "add", UPLINK, "netns", h.name, "type", "veth", "peer", "name", port, "netns", switch)
            sh(*sw, "ip", "link", "set", port, "mtu", str(mtu), "master", BRIDGE, "up")
            os.makedirs(h.runtime_dir, mode=0o700)
            h.run("ip", "link", "set", "lo", "up")
            h.run("ip", "link", "set", UPLINK, "mtu", str(mtu), "up")
            h.run("ip", "addr", "add", f"{h.underlay}/{UNDERLAY_PREFIX}", "dev", UPLINK)
            h.run("ip", "addr", "add", f"{h.underlay6}/64", "dev", UPLINK, "nodad")
        yield hosts
    finally:
        for h in hosts:
            h.kill_all()
        for name in reversed(created):
            sh("ip", "netns", "del", name, check=False)
        shutil.rmtree(rundir, ignore_errors=True)


segment.__test__ = False  # type: ignore[attr-defined]
