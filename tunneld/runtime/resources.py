"""The tunnel's open descriptors: device queues, underlay links and the metrics listener, and who owns each.

Opening order, chosen so that a failure leaves nothing behind (each step fails before the next creates more):
  1. refuse an interface name that exists (it would be someone else's, and closing ours would not remove it);
  2. bind the underlay socket(s) and the metrics endpoint: a busy port fails before any device exists;
  3. create the device, one queue per worker (IFF_MULTI_QUEUE), each with the same flags;
  4. set its MAC, MTU and addresses, bring it up; with offloads, cap its super-frames (plan.superframe_cap).
Any failure closes what was opened, in reverse, and raises a one-line StartupError. ``close`` is the same
reverse walk; closing the last queue's fd removes the interface.

Unit i (device queue i, link i) is worker i's. Before the fork the parent holds every unit; after it, a child
keeps only its own (``keep_only``) and the parent lets go of the children's (``release_others``), so that
each queue and socket is attached in exactly one process.
"""

from __future__ import annotations

import logging

from tunneld.errors import EX_NOPERM, EX_SOFTWARE, StartupError
from tunneld.io import SetupError, netlink
from tunneld.io.device import Device
from tunneld.io.raw import RawLink
from tunneld.io.udp import UdpLink, open_group
from tunneld.observe.metrics import MetricsError, MetricsServer
from tunneld.runtime.plan import Plan

log = logging.getLogger("tunneld")

Link = UdpLink | RawLink


class Resources:
    """Owns every descriptor the tunnel opens; ``units[i]`` is worker i's (device queue, link)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.links: list[Link] = []
        self.devices: list[Device] = []
        self.metrics: MetricsServer | None = None

    def open(self) -> None:
        plan, cfg = self.plan, self.plan.cfg
        if netlink.link_exists(cfg.dev):
            raise StartupError(
                f"interface {cfg.dev} already exists: pick another --dev, or remove it (ip link del {cfg.dev})"
            )
        # The link's default destination; with only a registry's peers (none yet) our own underlay address, which
        # gives the socket its family and is never sent to (an empty peer table sends nothing).
        # A wireguard tunnel may start with neither (`wg set` gives it peers later): IPv4 then, as its one socket.
        first = cfg.peer or cfg.local or "0.0.0.0"
        df = cfg.df == "set"
        try:
            if plan.codec.transport.kind == "ip":
                self.links = [RawLink(first, plan.port, cfg.local, df=df)]
            elif plan.workers > 1:
                self.links = open_group(first, plan.port, cfg.local, plan.workers, df=df)
            else:
                # A keyed codec's peer (WireGuard) answers the source port: send from the listening one.
                self.links = [UdpLink(first, plan.port, cfg.local, df=df,
                                      **({"send_sockets": 0} if plan.codec.keyed else {}))]
            if cfg.metrics_listen:
                self.metrics = MetricsServer(cfg.metrics_listen)
            for _ in range(plan.workers):
                self.devices.append(
                    Device(cfg.dev, plan.codec.device, offload=plan.offload, multi_queue=plan.workers > 1)
                )
        except (SetupError, MetricsError) as e:
            self.close()
            code = EX_NOPERM if isinstance(e, SetupError) and e.missing_privilege else EX_SOFTWARE
            raise StartupError(str(e), code) from None
        try:
            netlink.configure(cfg.dev, mac=plan.mac, mtu=plan.mtu, addresses=cfg.addresses)
        except netlink.NetlinkConfigError as e:
            self.close()
            raise StartupError(str(e)) from None
        if plan.offload:
            size = plan.superframe_cap()
            if size > 0 and not netlink.set_gso_max_size(cfg.dev, size):
                log.debug("could not set gso_max_size %d on %s; super-frames may take two sends", size, cfg.dev)

    def unit(self, index: int) -> tuple[Device, Link]:
        return self.devices[index], self.links[index]

    def keep_only(self, index: int) -> tuple[Device, Link]:
        """In forked worker ``index``: close every other worker's queue and link, and the parent's metrics
        listener (nothing serves from it before the fork, so no connection or thread comes along); returns
        the unit kept, now ``unit(0)`` of this process."""
        for i in reversed(range(len(self.devices))):
            if i != index:
                self.devices[i].close()
                self.links[i].close()
        self.devices, self.links = [self.devices[index]], [self.links[index]]
        if self.metrics is not None:
            self.metrics.close_in_child()
        self.metrics = None
        return self.devices[0], self.links[0]

    def release_others(self) -> None:
        """In the parent once the workers are forked (or failed to be): their queues and links are theirs now;
        the parent must not keep their queues attached."""
        for device, link in zip(self.devices[1:], self.links[1:]):
            device.close()
            link.close()
        del self.devices[1:], self.links[1:]

    def replace_metrics(self, new: MetricsServer | None) -> MetricsServer | None:
        """Serve from ``new`` from now on (a reload moved the endpoint); returns the old one, for the caller
        to stop and close."""
        old, self.metrics = self.metrics, new
        return old

    def close(self) -> None:
        """Close everything still open, in the reverse of the opening order; safe to call twice."""
        while self.devices:
            self.devices.pop().close()  # the kernel removes the interface with its last queue's fd
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        while self.links:
            self.links.pop().close()
