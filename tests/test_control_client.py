"""The client commands stay cheap to run from a monitoring loop (issue 22: `tunneld show` cost 0.15-0.19 CPU-s a
call, its start-up importing the daemon's configuration, asyncio, the plugins' entry points and more): the
console script's path to `tunneld show` imports the standard library and tunneld.control.client, nothing else;
and the control socket's path rules (client.py: tagged outside PID 1's network namespace) without root."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tunneld.control import client

HEAVY = ("numpy", "uvloop", "pyroute2", "prometheus_client", "aetcd", "grpc", "asyncio", "tomllib",
         "importlib.metadata")

PROBE = """
import json, sys
from tunneld.__main__ import main
try:
    main(["show", "tap7", "--runtime-dir", sys.argv[1]])
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)))
"""


def test_tunneld_show_imports_the_client_alone(tmp_path):
    r = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "no tunneld answers" in r.stderr  # it ran the command: no daemon there
    loaded = json.loads(r.stdout.splitlines()[-1])
    heavy = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert heavy == [], heavy
    ours = [m for m in loaded if m.startswith("tunneld")]
    assert ours == ["tunneld", "tunneld.__main__", "tunneld.control", "tunneld.control.client"], ours


def test_the_default_runtime_dir_is_declared_once():
    from tunneld.config import schema as config

    assert config.DEFAULT_RUNTIME_DIR is client.DEFAULT_RUNTIME_DIR == "/run/tunneld"


def fake_proc(tmp_path, monkeypatch, **namespaces: str) -> None:
    """client.NETNS pointed at files standing for /proc/PID/ns/net: same name, same namespace (a hard link)."""
    made: dict[str, str] = {}
    for pid, ns in namespaces.items():
        path = tmp_path / pid
        if ns in made:
            os.link(made[ns], path)
        else:
            path.write_text(ns)
            made[ns] = str(path)
    monkeypatch.setattr(client, "NETNS", str(tmp_path / "{}"))


def test_in_pid_1s_network_namespace_the_socket_is_the_plain_one(tmp_path, monkeypatch):
    fake_proc(tmp_path, monkeypatch, self="host", **{"1": "host"})
    assert client.socket_path("/run/tunneld", "tap7") == "/run/tunneld/tap7.sock"


def test_the_kernels_fixed_inode_names_the_host_namespace_with_pid_1_hidden(tmp_path, monkeypatch):
    """The systemd unit on a recent kernel: ProtectProc=invisible hides /proc/1; the socket stays DIR/DEV.sock."""
    fake_proc(tmp_path, monkeypatch, self="host")
    monkeypatch.setattr(client, "NET_NS_INIT_INO", os.stat(tmp_path / "self").st_ino)
    assert client.socket_path("/run/tunneld/demo", "tap7") == "/run/tunneld/demo/tap7.sock"


def test_in_another_network_namespace_the_socket_carries_its_inode(tmp_path, monkeypatch):
    fake_proc(tmp_path, monkeypatch, self="test-a", **{"1": "host"})
    inode = os.stat(tmp_path / "self").st_ino
    assert client.socket_path("/run/tunneld", "tap7") == f"/run/tunneld/tap7:net{inode}.sock"
    assert client.find_socket("/run/tunneld-none", "tap7") == f"/run/tunneld-none/tap7:net{inode}.sock"


def test_when_it_cannot_be_told_the_daemon_tags_and_the_client_tries_both(tmp_path, monkeypatch):
    """PID 1 hidden, no fixed inode: the tagged name is never wrong; the client takes a plain one if that is all."""
    (tmp_path / "proc").mkdir()
    fake_proc(tmp_path / "proc", monkeypatch, self="unknown")
    inode = os.stat(tmp_path / "proc" / "self").st_ino
    run = tmp_path / "run"
    assert client.socket_path(str(run), "tap7") == f"{run}/tap7:net{inode}.sock"
    (run / "unit").mkdir(parents=True)
    (run / "unit" / "tap7.sock").write_text("")
    assert client.find_socket(str(run), "tap7") == f"{run}/unit/tap7.sock"
    (run / f"tap7:net{inode}.sock").write_text("")
    assert client.find_socket(str(run), "tap7") == f"{run}/tap7:net{inode}.sock"


def test_in_systemds_directory_for_the_instance_the_daemons_socket_is_plain(tmp_path, monkeypatch):
    """A unit in a container: its PID 1 hidden (ProtectProc=invisible), no fixed inode to tell; the directory is
    the instance's own, so the name needs no tag: /run/tunneld/NAME/DEV.sock, as the unit has always had it."""
    from tunneld.control import server

    (tmp_path / "proc").mkdir()
    fake_proc(tmp_path / "proc", monkeypatch, self="container")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/tunneld/demo")
    assert server.socket_path("/run/tunneld/demo", "tap7") == "/run/tunneld/demo/tap7.sock"
    assert server.socket_path("/run/tunneld-other", "tap7").startswith("/run/tunneld-other/tap7:net")
