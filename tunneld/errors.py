"""Why the daemon could not start, as the operator reads it: one line and a sysexits(3) status.

Its own module because three layers raise it (the mode's codec, modes.py; the plan, plan.py; the descriptors,
resources.py) and the command line (cli.py) prints it; none of them should import another for it.
"""

from __future__ import annotations

from tunneld.config.schema import EX_CONFIG

EX_SOFTWARE = 1
EX_NOPERM = 77

__all__ = ["EX_CONFIG", "EX_NOPERM", "EX_SOFTWARE", "StartupError"]


class StartupError(Exception):
    """The tunnel cannot start; ``str()`` is one line for the operator, ``code`` the exit status."""

    def __init__(self, message: str, code: int = EX_SOFTWARE) -> None:
        super().__init__(message)
        self.code = code
