"""tunneld as a systemd service, the real daemon in a namespace: the sd_notify protocol (READY, WATCHDOG,
RELOADING, STOPPING) as a service manager sees it, and SIGHUP reloads that move the traffic, the metrics
endpoint and the peers without recreating the interface. test_service.py drives Service with fakes."""

from __future__ import annotations

import os
import re
import signal
import sys
import textwrap
import time

import pytest

from tunneld.testbed import OVERLAY_V4, TUNNELD, Host
from tunneld.testbed.notify import NotifyReceiver

pytestmark = pytest.mark.netns


def config_text(peer: str, *, vni: int = 1, level: str = "info", address: str = OVERLAY_V4[0] + "/24",
                local: str | None = None, metrics: str = "127.0.0.1:9477") -> str:
    return textwrap.dedent(f"""\
        [tunnel]
        peer = "{peer}"
        {f'local = "{local}"' if local else ''}
        dev = "tdsvc0"
        address = ["{address}"]
        vni = {vni}
        [metrics]
        listen = "{metrics}"
        [log]
        level = "{level}"
        """)


def stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=10)


def clean_up(proc, rx: NotifyReceiver, *hosts: Host) -> str:
    """Kill what is left in the namespaces and close the receiver; the daemon's output."""
    for host in hosts:
        host.kill_all()
    rx.close()
    return proc.stdout.read()


def scrape(host: Host, listen: str) -> str | None:
    r = host.run("curl", "-sf", "--max-time", "5", f"http://{listen}/metrics", check=False, timeout=10)
    return r.stdout if r.returncode == 0 else None


def ifindex(host: Host, dev: str) -> int:
    return int(host.run("cat", f"/sys/class/net/{dev}/ifindex").stdout)


@pytest.mark.serial  # counts the watchdog pings of two seconds
def test_sd_notify_protocol(hosts, tmp_path):
    a, b = hosts
    conf = tmp_path / "demo.toml"
    conf.write_text(config_text(b.underlay))
    rx = NotifyReceiver(str(tmp_path / "notify"))
    env = {**os.environ, "NOTIFY_SOCKET": rx.path, "WATCHDOG_USEC": "400000"}
    proc = a.popen(TUNNELD, "--config", str(conf), env=env)
    try:
        first = rx.until("READY=1")
        assert a.link_state("tdsvc0") == "UP"  # READY only once the interface is up
        assert first[-1].startswith("READY=1\nSTATUS=peer 10.231.0.2: sent ")
        # WATCHDOG=1 every WATCHDOG_USEC/2 = 0.2 s: about 10 in 2 s; loose bounds for a busy 2-core machine.
        start = time.monotonic()
        pings = 0
        while time.monotonic() - start < 2.0:
            if rx.next(timeout=2) == "WATCHDOG=1":
                pings += 1
        assert 5 <= pings <= 15
        index = ifindex(a, "tdsvc0")
        proc.send_signal(signal.SIGHUP)
        rx.until("RELOADING=1")
        rx.until("READY=1")
        assert ifindex(a, "tdsvc0") == index
        proc.send_signal(signal.SIGTERM)
        rx.until("STOPPING=1")
        assert proc.wait(timeout=10) == 0
        a.wait_link("tdsvc0", present=False, timeout=5)
    finally:
        a.kill_all()
        rx.close()
    out = proc.stdout.read()
    assert "configuration unchanged" in out and "Traceback" not in out


def test_sighup_moves_traffic_to_the_new_peer_without_recreating_the_interface(hosts, tmp_path):
    """B listens only on a second underlay address; A first points at the wrong one, then is reloaded."""
    a, b = hosts
    b.run("ip", "addr", "add", "10.231.0.3/24", "dev", b.ifname)
    conf_a, conf_b = tmp_path / "a.toml", tmp_path / "b.toml"
    conf_a.write_text(config_text(b.underlay))  # wrong: B's tunneld is bound to .3 only
    conf_b.write_text(config_text(a.underlay, local="10.231.0.3", address=OVERLAY_V4[1] + "/24"))
    rx = NotifyReceiver(str(tmp_path / "notify"))
    env = {**os.environ, "NOTIFY_SOCKET": rx.path}
    pa = a.popen(TUNNELD, "--config", str(conf_a), env=env)
    b.popen(TUNNELD, "--config", str(conf_b), "--runtime-dir", str(tmp_path / "b"))  # not A's control socket
    try:
        rx.until("READY=1")
        b.wait_link("tdsvc0")
        assert not a.ping(OVERLAY_V4[1], count=2, timeout=3)
        index = ifindex(a, "tdsvc0")
        conf_a.write_text(config_text("10.231.0.3"))
        pa.send_signal(signal.SIGHUP)
        rx.until("RELOADING=1")
        assert "STATUS=peer 10.231.0.3" in rx.until("READY=1")[-1]
        a.wait_ping(OVERLAY_V4[1], timeout=10)
        assert ifindex(a, "tdsvc0") == index
        # A reload that changes only the log level, under a steady ping: nothing is lost.
        ping = a.popen("ping", "-c", "30", "-i", "0.05", "-W", "2", OVERLAY_V4[1])
        time.sleep(0.5)
        conf_a.write_text(config_text("10.231.0.3", level="debug"))
        pa.send_signal(signal.SIGHUP)
        rx.until("READY=1")
        # An invalid file is refused; the tunnel keeps working with the old settings.
        conf_a.write_text(config_text("10.231.0.300"))
        pa.send_signal(signal.SIGHUP)
        rx.until("READY=1")
        ping_out, _ = ping.communicate(timeout=20)
        assert ping.returncode == 0 and " 0% packet loss" in ping_out, ping_out
        assert a.ping(OVERLAY_V4[1], count=2, timeout=5)
        assert ifindex(a, "tdsvc0") == index
        # The metrics endpoint moves live: the new address serves the same counters, the old one is closed.
        assert 'peer="10.231.0.3"' in scrape(a, "127.0.0.1:9477")
        conf_a.write_text(config_text("10.231.0.3", level="debug", metrics="127.0.0.1:9479"))
        pa.send_signal(signal.SIGHUP)
        rx.until("READY=1")
        moved = scrape(a, "127.0.0.1:9479")
        assert moved and re.search(r'^tunneld_rx_packets_total\{[^}]*peer="10.231.0.3"[^}]*\} [1-9]', moved, re.M)
        deadline = time.monotonic() + 5
        while scrape(a, "127.0.0.1:9477") is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert scrape(a, "127.0.0.1:9477") is None
        # A busy new address refuses the move; the endpoint stays where it was.
        squatter = a.popen(sys.executable, "-c", "import socket, time; s = socket.socket(); "
                           "s.bind(('127.0.0.1', 9480)); s.listen(); print('bound', flush=True); time.sleep(60)")
        assert squatter.stdout.readline().strip() == "bound"
        conf_a.write_text(config_text("10.231.0.3", level="debug", metrics="127.0.0.1:9480"))
        pa.send_signal(signal.SIGHUP)
        rx.until("READY=1")
        assert scrape(a, "127.0.0.1:9479") is not None
        assert stop(pa) == 0
    finally:
        out = clean_up(pa, rx, a, b)
    assert "reload: peer 10.231.0.2 -> 10.231.0.3" in out
    assert "reload: log level info -> debug" in out
    assert f"reload refused, keeping the running configuration: {conf_a}: tunnel.peer: '10.231.0.300' is not" in out
    assert "reload: metrics 127.0.0.1:9477 -> 127.0.0.1:9479" in out
    assert "reload: metrics-listen 127.0.0.1:9480: cannot listen: Address already in use" in out
    assert "still serving metrics at 127.0.0.1:9479" in out


def peers_text(*peers: str, address: str = OVERLAY_V4[0] + "/24") -> str:
    tables = "".join(f'[[peer]]\naddress = "{p}"\nname = "p{n}"\n' for n, p in enumerate(peers))
    return f'[tunnel]\ndev = "tdsvc0"\naddress = ["{address}"]\nworkers = 2\n{tables}[metrics]\nlisten = ""\n'


def test_sighup_hands_the_peer_diff_to_every_worker_and_keeps_the_link(hosts, tmp_path):
    """A names B first and a bystander address; a reload swaps the bystander for another: the diff goes to both
    workers, B's traffic carries on, the interface stays."""
    a, b = hosts
    conf_a, conf_b = tmp_path / "a.toml", tmp_path / "b.toml"
    conf_a.write_text(peers_text(b.underlay, "10.231.0.8"))
    conf_b.write_text(config_text(a.underlay, address=OVERLAY_V4[1] + "/24", metrics=""))
    assert a.run(TUNNELD, "--config", str(conf_a), "--check").stdout.strip() == \
        f"{conf_a}: ok: vxlan to 2 peers ({b.underlay}, ...) on tdsvc0"
    rx = NotifyReceiver(str(tmp_path / "notify"))
    pa = a.popen(TUNNELD, "--config", str(conf_a), env={**os.environ, "NOTIFY_SOCKET": rx.path})
    b.popen(TUNNELD, "--config", str(conf_b), "--runtime-dir", str(tmp_path / "b"))  # not A's control socket
    try:
        assert rx.until("READY=1")[-1].startswith("READY=1\nSTATUS=2 peers: sent ")
        b.wait_link("tdsvc0")
        a.wait_ping(OVERLAY_V4[1], timeout=10)
        index = ifindex(a, "tdsvc0")
        conf_a.write_text(peers_text(b.underlay, "10.231.0.9"))
        pa.send_signal(signal.SIGHUP)
        rx.until("RELOADING=1")
        rx.until("READY=1")
        assert a.ping(OVERLAY_V4[1], count=2, timeout=5)
        assert ifindex(a, "tdsvc0") == index
        assert stop(pa) == 0
    finally:
        out = clean_up(pa, rx, a, b)
    assert "reload: peers: added p1 (10.231.0.9); removed 10.231.0.8" in out
    assert "worker 1: reload" not in out  # the other worker took the diff (pickled PeerSpecs) without a complaint
