"""Debian containers booted with systemd-nspawn inside the testbed's namespaces: a real systemd per "host".

Layers, so that each run starts clean and the slow part is done once per machine:
  base     debootstrap'ed bookworm (minbase + systemd, python3, iproute2, ping), cached under CACHE, keyed by
           BASE_VERSION; built in a scratch directory and renamed into place only when complete, under a lock,
           so an interrupted or concurrent build never leaves a half root behind. Never written to afterwards.
  deps     an overlay on the base holding /opt/tunneld, a venv with tunneld's dependencies (wheels built here by
           the host's pip, installed with --no-index: the container needs no registry), cached under CACHE
           keyed by the base, the dependency list in pyproject.toml and the week (so new releases come in);
           built and renamed into place as the base is. Installing numpy, grpcio and the rest was most of a run.
  run      an overlay on both holding this checkout: tunneld itself in that venv (--no-deps), the unit file, and
           the host's `wg` (wireguard-tools) when it has one.
  host     one overlay per container on top of all (lowerdir=run:deps:base): its config, journal, state.
Everything but the base and the deps layer is removed afterwards, also on failure.

The containers are driven through nsenter into their PID 1's namespaces: this machine runs no systemd on
the host (PID 1 is not systemd), so systemd-machined, `systemctl -M` and `machinectl shell` are not
available; nspawn runs with --register=no --keep-unit, which need neither machined nor a host D-Bus.
Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.support import REPO
from tunneld.testbed import Host, sh

CACHE = Path(os.environ.get("TUNNELD_TEST_CACHE", "/var/cache/tunneld-tests"))
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,iproute2,iputils-ping,procps"
BASE_VERSION = "bookworm-minbase-1"  # bump when PACKAGES or the recipe changes
DEBOOTSTRAP_TIMEOUT = 900
VENV = "/opt/tunneld"


def tools_missing() -> list[str]:
    return [t for t in ("debootstrap", "systemd-nspawn", "nsenter") if shutil.which(t) is None]


def base_root() -> Path:
    """The cached base root, built on first use (about a minute with a warm apt mirror)."""
    root = CACHE / BASE_VERSION
    if (root / "etc" / "os-release").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run builds it once; the others wait for it
        if (root / "etc" / "os-release").exists():
            return root
        for stale in CACHE.glob(f".{BASE_VERSION}-*"):  # a build killed half-way; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{BASE_VERSION}-", dir=CACHE))
        try:
            sh("debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(scratch),
               timeout=DEBOOTSTRAP_TIMEOUT)
            (scratch / "etc" / "machine-id").write_text("")  # each boot gets its own (nspawn makes one up)
            scratch.rename(root)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return root


def _cached(name: str, build) -> Path:
    """CACHE/NAME, made by ``build(scratch)`` on first use: in a scratch directory renamed into place once
    complete, under a lock, so an interrupted or concurrent build never leaves a half-made layer behind."""
    done = CACHE / name
    if done.is_dir():
        return done
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run builds it once; the others wait for it
        if done.is_dir():
            return done
        for stale in CACHE.glob(f".{name}-*"):  # a build killed half-way; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=CACHE))
        try:
            build(scratch)
            scratch.rename(done)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return done


def dependencies() -> list[str]:
    """tunneld's runtime requirements as pyproject.toml lists them."""
    with open(REPO / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def deps_layer(workdir: Path, base: Path) -> Path:
    """The cached overlay upper dir (on ``base``) whose VENV holds tunneld's dependencies, not tunneld."""
    requirements = dependencies()
    year, week, _ = datetime.date.today().isocalendar()
    key = hashlib.sha256("\n".join([BASE_VERSION, *requirements]).encode()).hexdigest()[:12]

    def build(upper: Path) -> None:
        wheels = workdir / "deps-wheels"
        sh(sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "-w", str(wheels),
           *requirements, timeout=600)
        merged = workdir / "deps-merged"
        mount_overlay([base], upper, workdir / "deps-work", merged)
        try:
            shutil.copytree(wheels, merged / "var" / "tmp" / "wheels")  # not /tmp: nspawn mounts a tmpfs there
            nspawn_run(merged, "sh", "-ec",
                       f"python3 -m venv {VENV}; {VENV}/bin/pip install --quiet --no-index --find-links /var/tmp/wheels"
                       f" {' '.join(shlex.quote(r) for r in requirements)}; rm -rf /var/tmp/wheels", timeout=600)
        finally:
            umount(merged)
        shutil.rmtree(workdir / "deps-work", ignore_errors=True)

    for old in CACHE.glob("deps-*"):  # layers of past weeks: no run that started this week uses them
        if time.time() - old.stat().st_mtime > 14 * 86400:
            shutil.rmtree(old, ignore_errors=True)
    return _cached(f"deps-{key}-{year}w{week:02d}", build)


def mount_overlay(lower: list[Path], upper: Path, work: Path, merged: Path) -> None:
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={':'.join(map(str, lower))},upperdir={upper},workdir={work}"
    sh("mount", "-t", "overlay", "overlay", "-o", opts, str(merged))


def umount(path: Path) -> None:
    if sh("umount", str(path), check=False).returncode != 0:
        sh("umount", "-l", str(path), check=False)


def nspawn_run(root: Path, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command in ``root`` without booting it (like chroot, with /proc, /dev and /tmp set up)."""
    r = sh("systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--pipe", "-D", str(root), *cmd,
           check=False, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"in {root}: {' '.join(cmd)} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


@contextlib.contextmanager
def run_layer(workdir: Path, lower: list[Path]) -> Iterator[Path]:
    """An overlay upper dir (on ``lower``: the deps layer and the base) holding tunneld from this checkout,
    installed in the deps layer's venv, and its unit file."""
    wheels = workdir / "wheels"
    sh(sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps", "-w", str(wheels),
       str(REPO), timeout=300)
    upper, merged = workdir / "run", workdir / "run-merged"
    mount_overlay(lower, upper, workdir / "run-work", merged)
    try:
        # Not under /tmp: nspawn mounts a fresh tmpfs there.
        shutil.copytree(wheels, merged / "var" / "tmp" / "wheels")
        nspawn_run(merged, "sh", "-ec",
                   f"{VENV}/bin/pip install --quiet --no-index --no-deps --find-links /var/tmp/wheels tunneld;"
                   f" {VENV}/bin/pip check >/dev/null;"  # the cached dependencies still satisfy this checkout
                   f" ln -sf {VENV}/bin/tunneld /usr/local/bin/tunneld; rm -rf /var/tmp/wheels; mkdir -p /etc/tunneld")
        shutil.copy(REPO / "systemd" / "tunneld@.service", merged / "etc" / "systemd" / "system" / "tunneld@.service")
        if (wg := shutil.which("wg")) is not None:
            # WireGuard's own tool, root's `wg show` in the container: the host's (Debian's wireguard-tools, of
            # the same release as the base; it needs only libc), rather than a base rebuilt with the package.
            shutil.copy(wg, merged / "usr" / "bin" / "wg")
    finally:
        umount(merged)
    yield upper


@dataclass
class Container:
    """A booted container whose network namespace is a testbed host's."""

    host: Host
    root: Path  # the merged overlay, as the host sees it
    proc: subprocess.Popen  # systemd-nspawn
    init: int  # the container's PID 1, as the host sees it
    console: Path

    def argv(self, *cmd: str) -> list[str]:
        return ["nsenter", "-t", str(self.init), "-a", "-r", "-w", *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return sh(*self.argv(*cmd), check=check, timeout=timeout, **kw)

    def write(self, path: str, text: str) -> None:
        """Write a file inside the container (through its own view of the file system)."""
        self.run("sh", "-c", f"cat > {path}", input=text)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout

    def wait_for(self, unit: str, timeout: float = 30, **want: str) -> dict[str, str]:
        """Poll `systemctl show` until every property has the wanted value. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.show(unit, *want)
            if all(got.get(k) == v for k, v in want.items()):
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.host.name}: {unit} wanted {want}, has {got}\n{self.journal(unit)}")
            time.sleep(0.2)


def _find_init(nspawn_pid: int, timeout: float) -> int:
    """The container's PID 1: the child of systemd-nspawn that is PID 1 in its own PID namespace."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split():
                status = Path(f"/proc/{child}/status").read_text()
                nspid = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()
                if nspid[-1] == "1" and len(nspid) > 2:
                    return int(child)
        time.sleep(0.1)
    raise TimeoutError(f"systemd-nspawn {nspawn_pid} started no container init within {timeout}s")


@contextlib.contextmanager
def boot(host: Host, lower: list[Path], workdir: Path, timeout: float = 60) -> Iterator[Container]:
    """Boot a container on an overlay of ``lower`` in ``host``'s network namespace; power it off afterwards."""
    d = workdir / host.name
    root = d / "root"
    mount_overlay(lower, d / "upper", d / "work", root)
    console = d / "console.log"
    proc = None
    try:
        with open(console, "w") as out:
            proc = subprocess.Popen(
                ["systemd-nspawn", "--boot", "--quiet", "--register=no", "--keep-unit", "--console=passive",
                 f"--machine={host.name}", f"--network-namespace-path=/run/netns/{host.name}",
                 # nspawn gives the container its own /dev/net/tun node (and allows it in the device cgroup);
                 # a --bind of the host's node would share the host's inode and mode.
                 "--capability=CAP_NET_ADMIN,CAP_NET_RAW", "-D", str(root)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        c = Container(host, root, proc, _find_init(proc.pid, timeout), console)
        while True:  # until the container's systemd listens, then until it finished booting
            r = c.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout)
            if r.stdout.strip() in ("running", "degraded"):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{host.name}: container did not boot: {r.stdout}{r.stderr}\n{console.read_text()}")
            time.sleep(0.2)
        # systemd's own udev rule (50-udev-default.rules) makes /dev/net/tun 0666 on a normal host, which is
        # what lets DynamicUser= open it; this machine has no udev and leaves 0600. Give the container's own
        # node (not the host's) the standard mode.
        c.run("chmod", "0666", "/dev/net/tun")
        yield c
    finally:
        if proc is not None:
            _stop(proc)
        umount(root)
        # /run here is not a tmpfs, so nspawn refuses to clean its propagation directory itself.
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{host.name}", ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM asks nspawn to power the container off cleanly; if that hangs, SIGKILL the container's init
    (which is in a session of its own, and outlives nspawn) and then nspawn's group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            os.kill(int(child), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


WORK_PREFIX = "tunneld-nspawn-"


def remove_leftovers() -> None:
    """Containers, mounts and directories of runs that were killed before they could clean up.

    Work directories are named after the pid that made them; one whose process is gone is a leftover.
    """
    for d in Path("/var/tmp").glob(f"{WORK_PREFIX}*-*"):
        try:
            pid = int(d.name[len(WORK_PREFIX):].split("-")[0])
            os.kill(pid, 0)
            continue  # still running
        except ValueError:
            continue
        except ProcessLookupError:
            pass
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"systemd-nspawn") and any(a.startswith(str(d).encode()) for a in argv):
                    # The container's init outlives a killed nspawn: kill it first (its PID namespace dies with it).
                    for child in (proc / "task" / proc.name / "children").read_text().split():
                        os.kill(int(child), signal.SIGKILL)
                    os.kill(int(proc.name), signal.SIGKILL)
        time.sleep(0.5)
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for mnt in sorted((m for m in mounts if m.startswith(str(d) + "/")), key=len, reverse=True):
            umount(Path(mnt))
        shutil.rmtree(d, ignore_errors=True)
    # nspawn's own directory per machine (named after the testbed host, td-PID-TAG-x), left by a killed run.
    for d in Path("/run/systemd/nspawn/propagate").glob("td-*-*"):
        pid = d.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def containers(a: Host, b: Host) -> Iterator[tuple[Container, Container]]:
    """Two booted containers with tunneld installed, one in each testbed host; all removed afterwards."""
    remove_leftovers()
    base = base_root()
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir="/var/tmp"))
    try:
        deps = deps_layer(workdir, base)
        with run_layer(workdir, [deps, base]) as run, boot(a, [run, deps, base], workdir) as ca, \
                boot(b, [run, deps, base], workdir) as cb:
            yield ca, cb
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
