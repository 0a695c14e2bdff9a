"""A real Prometheus server inside a namespace host, for tests and benchmarks; and a tiny client for its API.

The server listens on the host's loopback only, keeps its TSDB in a temporary directory that is removed on
exit, and scrapes the given targets every ``interval``. The test process lives in the root namespace, so it
cannot reach the namespace's loopback itself: queries run as ``python -m tunneld.testbed.prom`` inside the host.

    python -m tunneld.testbed.prom get URL                   print the body (exit 1 on an HTTP error or timeout)
    python -m tunneld.testbed.prom query URL EXPR            print the API's JSON answer to an instant query
    python -m tunneld.testbed.prom scrape URL... --for SECS  GET each URL once a second for SECS seconds (load)
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

from tunneld.testbed.netns import IMPORT_ROOT, Host

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
API = "127.0.0.1:9090"


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    """A Prometheus server running in ``host``; use through ``prometheus()``."""

    def __init__(self, host: Host, listen: str = API) -> None:
        self.host = host
        self.url = f"http://{listen}"

    def get(self, path: str, timeout: float = 10) -> str:
        r = self.host.run(sys.executable, "-m", "tunneld.testbed.prom", "get", self.url + path,
                          check=False, timeout=timeout + 5, cwd=IMPORT_ROOT)
        if r.returncode != 0:
            raise PrometheusError(f"GET {path}: {r.stdout.strip()} {r.stderr.strip()}")
        return r.stdout

    def query(self, expr: str) -> list[dict]:
        """The result vector of an instant query (each item has ``metric`` and ``value`` = [ts, "str"])."""
        answer = json.loads(self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        if answer.get("status") != "success":
            raise PrometheusError(f"query {expr!r}: {answer}")
        if answer["data"]["resultType"] != "vector":
            raise PrometheusError(f"query {expr!r}: expected a vector, got {answer['data']['resultType']}")
        return answer["data"]["result"]

    def value(self, expr: str) -> float:
        """The single value an instant query returns; raises unless there is exactly one series."""
        result = self.query(expr)
        if len(result) != 1:
            raise PrometheusError(f"query {expr!r}: expected one series, got {len(result)}: {result}")
        return float(result[0]["value"][1])

    def wait_scraped_after(self, t: float, instances: Sequence[str], timeout: float = 20) -> None:
        """Wait until every instance has been scraped (successfully) at a time later than ``t`` (Unix time)."""
        deadline = time.monotonic() + timeout
        pending = set(instances)
        while time.monotonic() < deadline:
            # timestamp() of a plain selector is the scrape's own time (of anything else: the query's time).
            for series in self.query("timestamp(up)"):
                inst = series["metric"].get("instance")
                if inst in pending and float(series["value"][1]) > t:
                    pending.discard(inst)
            if not pending:
                down = [s["metric"]["instance"] for s in self.query("up == 0") if s["metric"]["instance"] in instances]
                if down:
                    raise PrometheusError(f"prometheus: scrapes of {down} failed")
                return
            time.sleep(0.2)
        raise TimeoutError(f"prometheus: no scrape of {sorted(pending)} after t={t:.3f} within {timeout}s")


def config(targets: Sequence[str], interval: float) -> str:
    secs = f"{interval:g}s"
    lines = [
        "global:",
        f"  scrape_interval: {secs}",
        f"  scrape_timeout: {secs}",
        f"  evaluation_interval: {secs}",
        "scrape_configs:",
        "  - job_name: tunneld",
        "    static_configs:",
        "      - targets: [" + ", ".join(f"'{t}'" for t in targets) + "]",
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def prometheus(host: Host, targets: Sequence[str], interval: float = 1.0, timeout: float = 30) -> Iterator[Prometheus]:
    """Start Prometheus in ``host`` scraping ``targets``; wait until it is ready; stop it and delete its data."""
    workdir = Path(tempfile.mkdtemp(prefix="tunneld-prom-"))
    proc = None
    log = open(workdir / "log", "w")
    try:
        (workdir / "prometheus.yml").write_text(config(targets, interval))
        proc = host.popen(
            PROMETHEUS,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={API}",
            "--log.level=warn",
            stdout=log,
        )
        prom = Prometheus(host)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {proc.returncode}: {(workdir / 'log').read_text()}")
            with contextlib.suppress(PrometheusError):
                prom.get("/-/ready", timeout=2)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready within {timeout}s: {(workdir / 'log').read_text()}")
            time.sleep(0.2)
        yield prom
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except Exception:
                proc.kill()
                proc.wait(timeout=5)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def exposition(host: Host, listen: str = "127.0.0.1:9477", timeout: float = 10) -> str:
    """The text tunneld's exporter in ``host`` serves at ``http://LISTEN/metrics`` (fetched from inside the host,
    whose loopback the caller cannot reach)."""
    return host.run(sys.executable, "-m", "tunneld.testbed.prom", "get", f"http://{listen}/metrics",
                    cwd=IMPORT_ROOT, timeout=timeout).stdout


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric ``name`` (the full sample name, e.g. ``tunneld_fdb_entries`` or
    ``tunneld_dropped_packets_total``) in an exposition, as (labels, value). Label values are the exposition's
    plain ones (tunneld's carry no escaped quotes or commas)."""
    out = []
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, labels = head.partition("{")
        if metric != name:
            continue
        pairs = (item.split("=", 1) for item in labels.rstrip("}").split(",") if "=" in item)
        out.append(({k.strip(): v.strip().strip('"') for k, v in pairs}, float(value)))
    return out


def total(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (over workers, peers...)."""
    return sum(v for got, v in samples(text, name) if all(got.get(k) == want for k, want in labels.items()))


def _get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def main(argv: Sequence[str]) -> int:
    cmd, *args = argv
    try:
        if cmd == "get":
            sys.stdout.write(_get(args[0]).decode())
        elif cmd == "query":
            sys.stdout.write(_get(args[0] + "/api/v1/query?" + urllib.parse.urlencode({"query": args[1]})).decode())
        elif cmd == "scrape":
            *urls, flag, secs = args
            assert flag == "--for"
            end = time.monotonic() + float(secs)
            scrapes = 0
            while time.monotonic() < end:
                for url in urls:
                    _get(url)
                    scrapes += 1
                time.sleep(1)
            print(scrapes)
        else:
            print(f"unknown command {cmd}", file=sys.stderr)
            return 2
    except (urllib.error.URLError, OSError) as e:
        print(f"{cmd}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
