"""The /metrics HTTP server's bounds (tunneld/observe/httpd.py): one thread whatever the connections, a cap on them,
read and idle timeouts, memory back to its level after a flood; and prometheus_client's exposition kept."""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter, make_wsgi_app

from tunneld.observe.httpd import MAX_CONNECTIONS, HttpServer

# A MetricsServer in a process of its own, so that its threads, descriptors and memory can be read from /proc.
SERVER = r"""
import asyncio, socket, time
from tunneld.observe.metrics import MetricsServer
probe = socket.socket(); probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]; probe.close()
server = MetricsServer(f"127.0.0.1:{port}")
loop = asyncio.new_event_loop()  # held: a collected loop closes its selector and self-pipe mid-test
server.start(loop)
print(port, flush=True)
time.sleep(120)
"""


def proc_status(pid: int) -> tuple[int, int, int]:
    """(threads, RSS in KiB, open descriptors) of a process."""
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(status["Threads"]), int(status["VmRSS"].split()[0]), len(os.listdir(f"/proc/{pid}/fd"))


def scrape(port: int, headers: dict | None = None) -> tuple[dict, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return dict(r.headers), r.read()


def test_500_idle_connections_cost_no_thread_and_leave_no_memory_behind():
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    conns: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline())
        for _ in range(5):
            scrape(port)  # warm up: the first scrapes allocate what every later one reuses
        threads0, rss0, fds0 = proc_status(proc.pid)
        for _ in range(500):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(0.5)
        threads, rss, fds = proc_status(proc.pid)
        assert threads == threads0  # no thread per connection (before: one each, ~500)
        assert fds <= fds0 + MAX_CONNECTIONS  # at most MAX_CONNECTIONS held open; the oldest idle ones closed
        assert b"process_cpu_seconds_total" in scrape(port)[1]  # a scraper still gets in
        for c in conns:
            c.close()
        conns.clear()
        deadline = time.monotonic() + 5
        while True:  # the server sees the closes on its next wake-ups
            for _ in range(5):
                scrape(port)
            threads1, rss1, fds1 = proc_status(proc.pid)
            if fds1 == fds0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert threads1 == threads0 and fds1 == fds0
        # Generous: measured +16..32 KiB here (the thread-per-connection server kept ~5 MB after such a flood).
        assert rss1 - rss0 < 2048, (rss0, rss, rss1)
    finally:
        for c in conns:
            c.close()
        proc.kill()
        proc.wait()


@pytest.fixture
def server():
    registry = CollectorRegistry()
    Counter("hardening_test", "A counter for the server tests.", registry=registry).inc(3)
    httpd = HttpServer("127.0.0.1", 0, make_wsgi_app(registry), max_connections=4, read_timeout=0.5,
                       idle_timeout=1.0)
    httpd.start()
    yield httpd
    httpd.close()


def closed_by_server(conn: socket.socket, within: float) -> bool:
    """True if the server closes ``conn`` (EOF or reset) within ``within`` seconds."""
    conn.settimeout(within)
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_connection_that_sends_nothing_is_closed_after_the_read_timeout(server):
    with socket.create_connection(("127.0.0.1", server.server_address[1])) as c:
        start = time.monotonic()
        assert closed_by_server(c, within=5)
        assert 0.4 <= time.monotonic() - start  # not before the timeout


def test_a_slowloris_request_is_closed_after_the_read_timeout_however_it_trickles(server):
    with socket.create_connection(("127.0.0.1", server.server_address[1])) as c:
        start = time.monotonic()
        for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n":
            try:
                c.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)  # each byte resets no timer: the deadline is counted from the accept
            if time.monotonic() - start > 3:
                break
        assert closed_by_server(c, within=3)
        assert time.monotonic() - start < 4


def test_at_the_cap_the_oldest_idle_connection_makes_room_for_a_scrape(server):
    port = server.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        time.sleep(0.1)
        assert server.connections == 4
        assert b"hardening_test_total 3.0" in scrape(port)[1]
        assert closed_by_server(idle[0], within=0.3)  # the oldest was closed for it
        assert server.connections <= 4
    finally:
        for c in idle:
            c.close()


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(request)
        out = b""
        while chunk := c.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("request_bytes,status", [
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET /metrics SPDY/3\r\n\r\n", b"505"),
    (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
    (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),  # prometheus_client's own answer
])
def test_bad_requests_get_a_status_and_a_close(server, request_bytes, status):
    answer = raw_request(server.server_address[1], request_bytes)
    assert answer.split(b" ", 2)[1] == status
    assert b"Connection: close" in answer


def test_exposition_is_prometheus_clients_own_text_openmetrics_and_gzip(server):
    port = server.server_address[1]
    headers, body = scrape(port)
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4") and b"hardening_test_total 3.0" in body
    headers, body = scrape(port, {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    headers, body = scrape(port, {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip" and b"hardening_test_total 3.0" in gzip.decompress(body)
    body = raw_request(port, b"GET /metrics?name[]=nothing HTTP/1.0\r\n\r\n")
    assert b"hardening_test" not in body and body.startswith(b"HTTP/1.1 200")


def test_close_stops_the_serving_thread_and_frees_the_port():
    httpd = HttpServer("127.0.0.1", 0, make_wsgi_app(CollectorRegistry()))
    port = httpd.server_address[1]
    httpd.start()
    assert any(t.name == "metrics-http" for t in threading.enumerate())
    httpd.close()
    assert not any(t.name == "metrics-http" for t in threading.enumerate())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
