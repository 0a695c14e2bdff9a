"""A real etcd cluster in a testbed's namespace hosts: one member per host, for the registry's tests.

    with segment(6) as hosts, etcd_cluster(hosts[:3], tmp_path) as etcd:
        Tunneld(hosts[3], "--registry", etcd.url("/t1"), ...)
        etcd.kill(0); ...; etcd.start(0); etcd.wait_healthy()

Each member is Debian's ``etcd`` (3.4) listening on its host's underlay address (clients on 2379, peers on
2380), its data directory under ``workdir``. With ``tls`` (a dict of PEM file paths: ca, cert, key) the
members serve clients over TLS and require a client certificate signed by that CA (--client-cert-auth).

What must stay true (as for the other testbed modules): every member is killed on exit, also on failure;
every wait is bounded; nothing listens outside the hosts' namespaces.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator, Sequence

from tunneld.testbed.netns import Host

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"
CLIENT_PORT, PEER_PORT = 2379, 2380


class EtcdCluster:
    """Members ``hosts[i]``, named m0, m1, ...; ``start``/``kill`` one, ``wait_healthy`` for the quorum."""

    def __init__(self, hosts: Sequence[Host], workdir: Path, tls: dict[str, str] | None = None) -> None:
        self.hosts = list(hosts)
        self.workdir = Path(workdir)
        self.tls = tls
        self.procs: list[subprocess.Popen | None] = [None] * len(self.hosts)
        self.scheme = "https" if tls else "http"

    @property
    def endpoints(self) -> str:
        return ",".join(f"{h.underlay}:{CLIENT_PORT}" for h in self.hosts)

    def url(self, prefix: str = "/tunneld") -> str:
        """What ``tunneld --registry`` takes for this cluster."""
        return f"etcd://{self.endpoints}{prefix}"

    def _cluster(self) -> str:
        return ",".join(f"m{i}=http://{h.underlay}:{PEER_PORT}" for i, h in enumerate(self.hosts))

    def start(self, i: int) -> None:
        """Start member ``i`` (again: its data directory is kept, so it rejoins as itself)."""
        h = self.hosts[i]
        data = self.workdir / f"m{i}"
        state = "existing" if data.exists() else "new"
        client = f"{self.scheme}://{h.underlay}:{CLIENT_PORT}"
        args = [ETCD, "--name", f"m{i}", "--data-dir", str(data), "--listen-client-urls", client,
                "--advertise-client-urls", client, "--listen-peer-urls", f"http://{h.underlay}:{PEER_PORT}",
                "--initial-advertise-peer-urls", f"http://{h.underlay}:{PEER_PORT}",
                "--initial-cluster", self._cluster(), "--initial-cluster-state", state,
                "--initial-cluster-token", "tunneld-test", "--log-level", "warn", "--logger", "zap"]
        if self.tls:
            args += ["--cert-file", self.tls["cert"], "--key-file", self.tls["key"], "--client-cert-auth",
                     "--trusted-ca-file", self.tls["ca"]]
        log = open(self.workdir / f"m{i}.log", "a")
        self.procs[i] = h.popen(*args, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill(self, i: int) -> None:
        """SIGKILL member ``i``: as a crash, or a machine gone."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        self.procs[i] = None

    def etcdctl_argv(self, *args: str) -> list[str]:
        """``etcdctl`` (API v3, every member) for a long-running command (``watch``): run it in a member's host."""
        cmd = ["env", "ETCDCTL_API=3", ETCDCTL, "--endpoints",
               ",".join(f"{self.scheme}://{h.underlay}:{CLIENT_PORT}" for h in self.hosts)]
        if self.tls:
            cmd += ["--cacert", self.tls["ca"], "--cert", self.tls["cert"], "--key", self.tls["key"]]
        return [*cmd, *args]

    def etcdctl(self, *args: str, via: int | None = None, timeout: float = 10,
                check: bool = True, client: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``etcdctl`` (API v3) run in a member's host, against every member (or ``via`` alone); with TLS, as
        ``client`` (PEM paths: ca, cert, key; default the cluster's own)."""
        i = via if via is not None else next((j for j, p in enumerate(self.procs) if p is not None), 0)
        hosts = [self.hosts[via]] if via is not None else self.hosts
        cmd = [ETCDCTL, "--endpoints", ",".join(f"{self.scheme}://{h.underlay}:{CLIENT_PORT}" for h in hosts),
               "--dial-timeout", "2s", "--command-timeout", f"{max(2, int(timeout) - 1)}s"]
        if self.tls:
            creds = client or self.tls
            cmd += ["--cacert", creds["ca"], "--cert", creds["cert"], "--key", creds["key"]]
        return self.hosts[i].run(*cmd, *args, check=check, timeout=timeout,
                                 env={**os.environ, "ETCDCTL_API": "3"})

    def healthy(self) -> bool:
        running = [i for i, p in enumerate(self.procs) if p is not None]
        if not running:
            return False
        return all(self.etcdctl("endpoint", "health", via=i, check=False, timeout=5).returncode == 0
                   for i in running)

    def wait_healthy(self, timeout: float = 20) -> float:
        """Wait until every running member answers with the quorum's agreement; seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.healthy():
                return time.monotonic() - start
            time.sleep(0.2)
        logs = {p.name: p.read_text()[-800:] for p in self.workdir.glob("m*.log")}
        raise TimeoutError(f"etcd cluster not healthy within {timeout}s: {logs}")

    def close(self) -> None:
        for i in range(len(self.hosts)):
            with contextlib.suppress(Exception):
                self.kill(i)


@contextlib.contextmanager
def etcd_cluster(hosts: Sequence[Host], workdir: Path, tls: dict[str, str] | None = None) -> Iterator[EtcdCluster]:
    """A healthy cluster of one member per host; every member killed on exit."""
    cluster = EtcdCluster(hosts, workdir, tls)
    try:
        for i in range(len(hosts)):
            cluster.start(i)
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.close()
