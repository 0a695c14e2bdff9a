"""The console script ``tunneld``: the client commands (``tunneld show``, ``tunneld peer``) go to the light
tunneld.control.client without loading the daemon's modules; everything else is the daemon's command line (tunneld.cli)."""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from tunneld.control import client as ctl  # light: the control client and the configuration's defaults

    if argv and argv[0] in ctl.CONTROL_COMMANDS:
        return ctl.main(argv)
    from tunneld import cli

    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
