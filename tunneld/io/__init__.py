"""The kernel's doors: the TUN/TAP device, the underlay sockets, and netlink configuration."""


class SetupError(Exception):
    """A door could not be opened; ``str()`` is one line for the operator.

    ``missing_privilege`` is set when the kernel said EPERM/EACCES, i.e. a capability is missing (the
    daemon then exits 77, EX_NOPERM, which tells systemd and scripts it is not worth retrying as is).
    """

    def __init__(self, message: str, *, missing_privilege: bool = False) -> None:
        super().__init__(message)
        self.missing_privilege = missing_privilege
