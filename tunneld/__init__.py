"""tunneld — a userspace tunnelling daemon: TUN/TAP on one side, an encapsulation over the underlay on the other."""

__version__ = "0.1.0"
