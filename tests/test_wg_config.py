"""``--mode wireguard``'s configuration: a 0600 private key file (``tunnel.private_key`` or ``--private-key``) and
[[peer]] tables with public_key, endpoint, allowed_ips, preshared_key and persistent_keepalive, turned into the
engine's peers (id: the public key; routes: the allowed IPs) and the codec's options. Bad input is one line
that never shows a key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunneld.config.loading import ConfigFileError, load_file
from tunneld.config.wireguard import with_keys
from tunneld.config.schema import TunnelConfig
from tunneld.encap.wireguard import StaticKey, key_to_base64
from tunneld.encap.wireguard.codec import WireGuard

PRIVATE = bytes(range(1, 33))
PEER = key_to_base64(StaticKey(bytes(range(33, 65))).public)
PSK = bytes(range(65, 97))


def write(tmp_path, text: str, key_mode: int = 0o600):
    key = tmp_path / "a.key"
    key.write_text(key_to_base64(PRIVATE) + "\n")
    key.chmod(key_mode)
    psk = tmp_path / "p.psk"
    psk.write_text(key_to_base64(PSK) + "\n")
    psk.chmod(0o600)
    path = tmp_path / "t.toml"
    path.write_text(text)
    return path


GOOD = f"""
[tunnel]
mode = "wireguard"
private_key = "a.key"

[[peer]]
public_key = "{PEER}"
endpoint = "10.0.0.2:51820"
allowed_ips = ["10.78.0.2/32", "fd78::2/128"]
preshared_key = "p.psk"
persistent_keepalive = 25
"""


def test_peers_become_keyed_specs_with_their_allowed_ips_as_routes(tmp_path):
    values = load_file(str(write(tmp_path, GOOD)))
    (spec,) = values["peers"]
    assert spec.key == PEER and spec.address == "10.0.0.2" and spec.routes == ("10.78.0.2/32", "fd78::2/128")
    assert spec.port == 51820  # a peer is sent to its own port
    other = load_file(str(write(tmp_path, GOOD.replace("10.0.0.2:51820", "10.0.0.2:4000"))))["peers"][0]
    assert other.port == 4000  # which need not be ours
    cfg = with_keys(TunnelConfig(**values))
    assert cfg.extra["wg_peers"] == {PEER: (PSK, 25)}
    codec = WireGuard.from_options(cfg.options())
    assert codec.describe() == f"public key {key_to_base64(StaticKey(PRIVATE).public)}"
    session = codec.session(PEER)
    assert session.peer.persistent_keepalive == 25 and session.peer.has_preshared_key


@pytest.mark.parametrize("change, words", [
    (('endpoint = "10.0.0.2:51820"\n', ""), "endpoint is required"),
    (("10.0.0.2:51820", "10.0.0.2:0"), "endpoint port 0"),
    ((PEER, "AAAA"), "public_key"),
    (('"p.psk"', '"missing.psk"'), "missing.psk"),
    (("persistent_keepalive = 25", "persistent_keepalive = -1"), "persistent_keepalive"),
])
def test_bad_peer_tables_are_one_line(tmp_path, change, words):
    with pytest.raises(ConfigFileError) as e:
        load_file(str(write(tmp_path, GOOD.replace(*change))))
    (line,) = e.value.problems
    assert words in line and key_to_base64(PSK) not in line


def test_a_key_file_others_may_read_is_refused_without_showing_the_key(tmp_path):
    path = write(tmp_path, GOOD, key_mode=0o644)
    done = subprocess.run([sys.executable, "-m", "tunneld", "--config", str(path), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 78 and "mode 0644" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert key_to_base64(PRIVATE) not in done.stderr and "Traceback" not in done.stderr
    path.chmod(0o600)
    (tmp_path / "a.key").chmod(0o600)
    done = subprocess.run([sys.executable, "-m", "tunneld", "--config", str(path), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_keys_and_peer_options_cannot_be_given_as_text(tmp_path):
    bad = GOOD.replace('private_key = "a.key"', 'private_key = "a.key"\nwg_peers = { x = 1 }')
    with pytest.raises(ConfigFileError) as e:
        load_file(str(write(tmp_path, bad)))
    assert e.value.problems == [f"{tmp_path / 't.toml'}: tunnel.wg_peers: set by the [[peer]] tables, not here"]
    for options in ({"wg_peers": {"x": 1}}, {"private_key": "a.key"}):
        with pytest.raises(ValueError):
            WireGuard.from_options(options)


def test_a_peer_from_the_command_line_is_refused_in_one_line():
    done = subprocess.run([sys.executable, "-m", "tunneld", "--mode", "wireguard", "--peer", "10.0.0.2", "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "[[peer]] table" in done.stderr and len(done.stderr.strip().splitlines()) == 1


# -- under systemd/tunneld@.service: root's 0600 key files reach the transient user as credentials ----------------


@pytest.fixture
def unit_dirs(tmp_path, monkeypatch):
    """A stand-in /etc/tunneld holding root's key file, which this process may not open (as the unit's transient
    user may not), and a $CREDENTIALS_DIRECTORY with systemd's copy of it (mode 0400, as systemd makes it)."""
    import errno
    import os

    from tunneld.config import wireguard

    etc, creds = tmp_path / "etc-tunneld", tmp_path / "credentials"
    etc.mkdir()
    creds.mkdir()
    key = etc / "wg0.key"
    key.write_text(key_to_base64(bytes(range(100, 132))) + "\n")  # root's: never read in these tests
    key.chmod(0o600)
    (creds / "wg0.key").write_text(key_to_base64(PRIVATE) + "\n")
    (creds / "wg0.key").chmod(0o400)
    monkeypatch.setattr(wireguard, "UNIT_CONFIG_DIR", str(etc))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    real_open = os.open

    def open_as_the_transient_user(path, flags, *args):
        if os.path.dirname(os.fspath(path)) == str(etc):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_as_the_transient_user)
    return etc, creds


def test_a_key_file_the_daemon_may_not_open_is_read_from_systemds_credential(unit_dirs):
    from tunneld.config.wireguard import read_key_file

    etc, _ = unit_dirs
    assert read_key_file(str(etc / "wg0.key")).raw == PRIVATE


def test_without_a_credential_the_error_is_the_files_own(unit_dirs, monkeypatch):
    """No credential, the unit's empty default (a lone newline: no file at start), or a file outside the unit's
    directory: the open's own error, one line, never the copy's content."""
    from tunneld.config.schema import ConfigError
    from tunneld.config.wireguard import read_key_file

    etc, creds = unit_dirs
    (etc / "wg1.key").write_text("x")
    (creds / "wg1.key").write_text("\n")
    for path in (etc / "other.key", etc / "wg1.key"):
        with pytest.raises(ConfigError) as e:
            read_key_file(str(path))
        assert str(e.value) == (f"private_key: {path}: Permission denied (the unit hands the daemon {etc}/NAME.key, "
                                "and a file named in a LoadCredential= of a drop-in, as credentials: docs/systemd.md)")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="wg0.key: Permission denied$"):
        read_key_file(str(etc / "wg0.key"))


def test_a_credential_for_a_file_elsewhere_is_not_taken(unit_dirs, monkeypatch, tmp_path):
    """Only a file of the unit's directory has a credential: one of the same name elsewhere is another key."""
    from tunneld.config import wireguard
    from tunneld.config.schema import ConfigError

    etc, _ = unit_dirs
    monkeypatch.setattr(wireguard, "UNIT_CONFIG_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="Permission denied .*docs/systemd.md[)]$"):
        wireguard.read_key_file(str(etc / "wg0.key"))


def test_a_credential_still_must_be_a_key_and_private(unit_dirs):
    from tunneld.config.schema import ConfigError
    from tunneld.config.wireguard import read_key_file

    etc, creds = unit_dirs
    (creds / "wg0.key").chmod(0o644)
    with pytest.raises(ConfigError, match="is mode 0644; a key file must be mode 0600"):
        read_key_file(str(etc / "wg0.key"))
    (creds / "wg0.key").chmod(0o600)
    (creds / "wg0.key").write_text("not a key at all, and secret\n")
    with pytest.raises(ConfigError) as e:
        read_key_file(str(etc / "wg0.key"))
    assert "not a key" in str(e.value) and "secret" not in str(e.value)
