"""The kernel's doors: the TUN/TAP device, the underlay sockets, and netlink configuration."""
