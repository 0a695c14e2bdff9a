"""One rule per peer field (config/checks.py), the same on every path a peer arrives by.

A bad name, route, MAC or address is refused by the configuration file's [[peer]] tables, by the control
socket's peer-add and by the registry's record decoding, in the same words: each path names the field in
its own way (``FILE: peer[1].name``, ``peer ADDR: name``, ``name``), and what follows the field is the
rule's own text, which the table below states once.
"""

from __future__ import annotations

import base64
import json
import re

import pytest

from tunneld.config.checks import check_public_key
from tunneld.config.loading import ConfigFileError, load_file
from tunneld.config.schema import ConfigError
from tunneld.control.registry import InvalidRecord, decode
from tunneld.control.server import RequestError, parse_request

GOOD_ADDRESS = "192.0.2.7"
PREFIX = b"/t/hosts/"

# (field, bad value, the words the rule says of it). The words are written here by hand, not taken from the
# code under test: a change of wording on one path only fails this table.
BAD = [
    ("name", "two words", "'two words' is not a peer name (1-64 letters, digits and ._:@-, starting with a letter "
                          "or digit)"),
    ("name", "-lead", "'-lead' is not a peer name"),
    ("name", "x" * 65, f"'{'x' * 65}' is not a peer name"),
    ("name", "caf\u00e9", "'caf\u00e9' is not a peer name"),
    ("name", "a\nb", "'a\\nb' is not a peer name"),
    ("name", "ab\n", "'ab\\n' is not a peer name"),  # a regex's "$" would let a trailing newline by
    ("routes", "10.9.0.1/24", "10.9.0.1/24 has host bits set; the prefix is 10.9.0.0/24"),
    ("routes", "10.9.0.0/33", "'10.9.0.0/33' is not a prefix like 192.168.2.0/24 or fd00:2::/64"),
    ("routes", "10.9.0.0", "'10.9.0.0' is not a prefix like"),
    ("routes", "fd00::1/64", "fd00::1/64 has host bits set; the prefix is fd00::/64"),
    ("macs", "ff:ff:ff:ff:ff:ff", "ff:ff:ff:ff:ff:ff is not a unicast address; broadcast, multicast and unknown "
                                  "MACs go to every peer anyway"),
    ("macs", "01:00:5e:00:00:01", "01:00:5e:00:00:01 is not a unicast address"),
    ("macs", "00:00:00:00:00:00", "00:00:00:00:00:00 is not a unicast address"),
    ("macs", "02:00:00:00:00", "'02:00:00:00:00' is not a MAC address like 02:00:00:00:00:01"),
    ("macs", "02-00-00-00-00-01", "'02-00-00-00-00-01' is not a MAC address"),
    ("macs", "02:00:00:00:00:01\n", "'02:00:00:00:00:01\\n' is not a MAC address"),
    ("routes", "10.9.0.0/24\n", "'10.9.0.0/24\\n' is not a prefix like"),
    ("address", "10.0.0.300", "'10.0.0.300' is not an IPv4 or IPv6 address"),
    ("address", "127.0.0.1", "127.0.0.1 is a loopback address: the tunnel would lead back to this host"),
    ("address", "0.0.0.0", "0.0.0.0 is the unspecified address"),
    ("address", "224.0.0.5", "224.0.0.5 is a multicast address"),
    ("address", "255.255.255.255", "255.255.255.255 is the broadcast address"),
    ("address", "fe80::1", "fe80::1 is link-local (fe80::/10)"),
    ("address", "::ffff:192.0.2.1", "::ffff:c000:201 is an IPv4-mapped address: write it as IPv4, 192.0.2.1"),
]


def from_file(tmp_path, field: str, value: str) -> str:
    """The config file's words for a [[peer]] table with ``field`` bad: "FILE: peer[1].FIELD: TEXT"."""
    table = {"address": GOOD_ADDRESS, "routes" if field == "routes" else "macs": []}
    table[field] = [value] if field in ("routes", "macs") else value
    mode = "vxlan" if field == "macs" else "gre"
    lines = [f'[tunnel]\nmode = "{mode}"\n[[peer]]'] + [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path = tmp_path / "t.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigFileError) as e:
        load_file(str(path))
    assert len(e.value.problems) == 1, e.value.problems
    return e.value.problems[0]


def from_control_socket(field: str, value: str) -> str:
    """The control socket's reply to a peer-add with ``field`` bad."""
    request = {"command": "peer-add", "address": GOOD_ADDRESS}
    request[field] = [value] if field in ("routes", "macs") else value
    with pytest.raises(RequestError) as e:
        parse_request(json.dumps(request).encode())
    return str(e.value)


def from_registry(field: str, value: str) -> str:
    """Why the registry refuses a host's record with ``field`` bad (a record's MAC is its one static MAC)."""
    record = {"address": GOOD_ADDRESS, "mode": "vxlan", "vni": 7, "mac": None, "overlay": ["192.168.1.7/24"],
              "version": "1", "started": 1.0, "owner": "o"}
    if field == "macs":
        record["mac"] = value
    elif field == "routes":
        record["routes"] = [value]
    else:
        record[field] = value
    with pytest.raises(InvalidRecord) as e:
        decode(PREFIX + record["address"].encode(), json.dumps(record).encode(), PREFIX)
    assert e.value.reason == "fields"
    return str(e.value)


def rule_text(message: str, field: str) -> str:
    """What a message says after naming the field: "FILE: peer[1].FIELD: ", "peer ADDR: FIELD: " or "FIELD: "
    (a record's one MAC is its "mac")."""
    named = re.match(rf"(?:.*?: peer\[1\]\.|peer {re.escape(GOOD_ADDRESS)}: )?(?:{field}|mac): (.*)", message, re.S)
    assert named, f"{message!r} does not name {field}"
    return named[1]


@pytest.mark.parametrize("field,value,words", BAD, ids=[f"{f}={v[:20]!r}" for f, v, _ in BAD])
def test_a_bad_value_is_refused_by_every_path_in_the_same_words(tmp_path, field, value, words):
    said = {
        "config file": from_file(tmp_path, field, value),
        "control socket": from_control_socket(field, value),
        "registry": from_registry(field, value),
    }
    texts = {path: rule_text(message, field) for path, message in said.items()}
    assert len(set(texts.values())) == 1, said
    assert all(text.startswith(words) for text in texts.values()), said
    assert all("\n" not in message for message in said.values()), said


# -- the key of a keyed mode (WireGuard's): base64 of 32 bytes ------------------------------------------------------

KEY = base64.b64encode(bytes(range(1, 33))).decode()  # 44 characters, one '='


def test_a_public_key_is_the_base64_of_32_bytes_kept_as_given():
    assert check_public_key(KEY) == KEY and len(KEY) == 44


@pytest.mark.parametrize("value", [
    KEY[:-1],  # no padding
    KEY[:-2] + "==",  # 31 bytes' worth
    base64.b64encode(bytes(33)).decode(),  # 33 bytes
    base64.b64encode(bytes(31)).decode(),
    KEY.replace("A", "*", 1) if "A" in KEY else "*" + KEY[1:],  # not base64
    KEY[:-2] + "B=",  # the last character carries bits past the 32nd byte: not how any key is written
    base64.urlsafe_b64encode(b"\xff" * 32).decode(),  # the URL-safe alphabet is not WireGuard's
    base64.b64encode(bytes(32)).decode(),  # all zeros: no private key gives it
    "",
    " " + KEY,
])
def test_a_bad_public_key_is_refused_in_one_line_that_does_not_repeat_it(value):
    with pytest.raises(ConfigError) as e:
        check_public_key(value, "peer 192.0.2.7: public_key")
    message = str(e.value)
    assert message.startswith("peer 192.0.2.7: public_key: ") and "\n" not in message
    assert (value.strip() == "" or value.strip() not in message), "a key (perhaps a private one) reached a message"


def test_a_public_key_must_be_text():
    with pytest.raises(ConfigError, match="public_key: "):
        check_public_key(b"x" * 44)  # type: ignore[arg-type]


def test_a_records_name_and_routes_become_the_peers_and_a_record_without_them_is_written_as_before():
    from tunneld.control.registry import Record

    plain = Record("192.0.2.7", "gre", None, None, ("192.168.1.7/24",), "1", 1.0, "o")
    assert set(json.loads(plain.encode())) == {"address", "mode", "vni", "mac", "overlay", "version", "started",
                                               "owner"}
    named = Record("192.0.2.7", "gre", None, None, ("192.168.1.7/24",), "1", 1.0, "o", "sea", ("10.9.0.0/24",))
    got = decode(PREFIX + b"192.0.2.7", named.encode(), PREFIX)
    assert got == named
    spec = got.spec(l2=False)
    assert spec.name == "sea" and spec.routes == ("192.168.1.7/32", "10.9.0.0/24")
    upper = json.loads(named.encode()) | {"mac": "02:AA:00:00:00:07"}
    assert decode(PREFIX + b"192.0.2.7", json.dumps(upper).encode(), PREFIX).mac == "02:aa:00:00:00:07"
