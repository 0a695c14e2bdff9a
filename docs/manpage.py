"""Write the tunneld(8) manual page from the argument parser: ``python docs/manpage.py OUT`` (``make man``).

Every flag, its metavar and its help come from ``tunneld.cli.manpage_parser()`` (the daemon's parser with the
built-in modes' options, and the client commands ``show`` and ``peer``), rendered by argparse-manpage; the
``--help`` epilogs (examples, defaults, workers, exit status; the control socket's) become sections of their
own. What is written here is only what no parser knows: the page's header, FILES, ENVIRONMENT and SEE ALSO.
So the page cannot drift from ``tunneld --help``: ``tests/test_manpage.py`` holds that every flag is in it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from argparse_manpage.manpage import Manpage

from tunneld import __version__
from tunneld.cli import manpage_parser
from tunneld.config.schema import DEFAULT_RUNTIME_DIR
from tunneld.control.client import CONTROL_EPILOG

REPO = Path(__file__).resolve().parent.parent

FILES = r"""
.TP
.I {runtime_dir}/DEV.sock
the control socket of the daemon serving DEV (\fB\-\-runtime\-dir\fR moves it): \fBtunneld show\fR and
\fBtunneld peer\fR talk to it
.TP
.I /etc/tunneld/NAME.toml
the tunnel that the systemd unit \fBtunneld@NAME\fR runs (\fB\-\-config\fR); examples in the source tree's
\fIconfig/\fR
.TP
.I /etc/systemd/system/tunneld@.service
the unit, installed from the source tree's \fIsystemd/\fR
"""

ENVIRONMENT = r"""
.TP
.B RUNTIME_DIRECTORY
set by systemd (\fBRuntimeDirectory=\fR): the control socket's directory when neither
\fB\-\-runtime\-dir\fR nor the file names one
.TP
.B NOTIFY_SOCKET
set by systemd for \fBType=notify\fR: readiness, status, watchdog pings and reloads are reported there
.TP
.B JOURNAL_STREAM
set by systemd: log lines then carry their syslog priority for the journal
"""

SEE_ALSO = r"""
\fBip\-link\fR(8), \fBbridge\fR(8), \fBsystemd.service\fR(5), \fBsystemctl\fR(1).
The source tree's \fIREADME.md\fR and \fIdocs/\fR: configuration.md (every flag and file key),
modes.md (VXLAN, GRE, plugins), control\-socket.md, metrics.md, registry.md, systemd.md, security.md
(what each mode trusts), performance.md, design.md, testing.md.
"""


def roff(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line starting with a control character."""
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in text.split("\n"))


def sections(text: str, first: str) -> list[tuple[str, str]]:
    """A --help epilog as man page sections: each ``heading:`` line at column 0 starts one (``first`` names
    the text before any). Lines at the body's indent are prose, refilled by the pager; deeper ones, and
    aligned columns (two spaces inside a line), are kept as they are."""
    out: list[tuple[str, list[str]]] = [(first, [])]
    for line in text.rstrip().split("\n"):
        if line and not line[0].isspace() and line.endswith(":"):
            out.append((line[:-1], []))
        else:
            out[-1][1].append(line)
    result = []
    for heading, lines in out:
        body: list[str] = []
        literal = False
        for line in lines:
            stripped = line.strip()
            if not stripped:
                body.append(".fi\n.RE" if literal else "")
                body.append(".PP")
                literal = False
                continue
            keep = line.startswith("    ") or re.search(r"\S  +\S", stripped) is not None
            if keep and not literal:
                body.append(".RS 4\n.nf")
            elif literal and not keep:
                body.append(".fi\n.RE")
            literal = keep
            body.append(roff(stripped))
        if literal:
            body.append(".fi\n.RE")
        content = "\n".join(body).strip()
        if content:
            result.append((heading, re.sub(r"(\.PP\n)+", ".PP\n", content).removesuffix(".PP").strip()))
    return result


def source_date() -> str:
    """The page's date: SOURCE_DATE_EPOCH, else the checkout's last commit, else today (so a page built twice
    from one commit is the same file, and `make setup` need not install it again)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        try:
            epoch = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%ct"], capture_output=True,
                                   text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            epoch = None
    return time.strftime("%Y-%m-%d", time.gmtime(int(epoch) if epoch else None))


def page() -> str:
    parser = manpage_parser()
    groups = {group.title: group for group in parser._action_groups}
    extra = sections(parser.epilog or "", "notes")
    parser.epilog = None  # its parts become sections below, not one unfilled COMMENTS block
    man = Manpage(parser)
    man.section = 8
    man.manual = "System Manager's Manual"
    man.source = f"tunneld {__version__}"
    man.date = source_date()
    for heading, content in extra:
        if heading in groups:  # "mode options": the prose joins that group's own section
            groups[heading].description = f"{groups[heading].description}\n{content}"
            continue
        man.add_section(heading, ">", content)
    for heading, content in sections(CONTROL_EPILOG, "control socket"):
        man.add_section("client " + heading if heading == "exit status" else heading, ">", content)
    man.add_section("files", ">", FILES.strip().replace("{runtime_dir}", roff(DEFAULT_RUNTIME_DIR)))
    man.add_section("environment", ">", ENVIRONMENT.strip())
    man.add_section("see also", ">", SEE_ALSO.strip())
    return str(man)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python docs/manpage.py OUT (- for stdout)", file=sys.stderr)
        return 2
    text = page()
    if argv[0] == "-":
        sys.stdout.write(text)
    else:
        Path(argv[0]).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
