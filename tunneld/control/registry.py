"""Membership through etcd: what a host's record says, what it claims, how the watched records become peers.
Pure: no I/O.

The client that talks to etcd (leases, the transaction, the watch) is control/etcd.py; this module is what
it carries, so that every rule below is tested without a cluster.

Layout (flannel's: one key per host, and one key per claimed value, as flannel has one per subnet):
  PREFIX/hosts/<underlay address>   one key per running daemon, bound to its lease (TTL ``ttl`` seconds, kept
                                    alive every ttl/3); its value is a JSON object, ``Record``:
  {"address": "10.0.0.1", "mode": "vxlan", "vni": 42, "mac": "02:..", "overlay": ["192.168.100.1/24"],
   "version": "1.2.0", "started": 1764400000.0, "owner": "9f..."}
  and, optional (tunneld writes neither yet; another writer may): "name" (the peer's name) and "routes" (L3
  modes: prefixes behind the host). A wireguard host's record adds what a WireGuard peer is made of (its
  private key never: only the key file holds it): "public_key" (base64, as `wg pubkey` prints it),
  "endpoint" ("ADDRESS:PORT": its underlay address and listen port) and "allowed_ips" (its overlay addresses
  as host prefixes, then its routes: exactly what the record's "overlay" and "routes" imply, written out for
  whoever reads etcd with WireGuard's words).
  PREFIX/claims/underlay/<address>            one key per value no two hosts may share (``CLAIM_KINDS``), its
  PREFIX/claims/<mode>-<vni>/overlay/<ip>     value the holder's underlay address, under the holder's lease;
  PREFIX/claims/<mode>-<vni>/mac/<mac>        created with the record in one transaction, only where absent
  PREFIX/claims/wireguard/key/<public key>    (``Version(key) == 0``) or already the same host's.

What must stay true:
  - A record becomes a peer only if it is valid for *this* tunnel: a JSON object whose key names its address,
    of our underlay's IP version, not our own, of our mode and VNI, with a unicast MAC (L2 modes) and overlay
    CIDRs. Its address, MAC, name and routes meet the rules a configuration file's peer meets (config/checks.py),
    in the same words. Anything else is ignored and counted by reason (``RegistryStats.invalid``), never raised.
  - A valid record becomes a peer only if etcd says it holds every one of its claims (its underlay address,
    each overlay address, its MAC). Every host reads the same keys at the same revision, so every host —
    including the one whose value was claimed — settles a conflict the same way: the holder in etcd wins; a
    record whose claim another holds is "taken", one whose claim no one holds (written around the
    transaction) is "unclaimed"; neither is a peer anywhere, both are counted.
  - A record's verdict is counted once per change of verdict, not once per listing: a resync after a
    reconnection does not count the same junk again.
  - A changed record replaces everything it implied (its static MAC, its routes); a vanished one, or one whose
    claim went, removes it all: ``Membership`` keeps the records it turned into peers and answers each batch of
    changes with the peers to set and the peers (ids) to remove.
  - ``owner`` says which daemon wrote the record: a hash of the machine, the network namespace and the
    device. A record left by our own previous run (killed, its lease not yet expired) has our owner and may be
    taken over; one with another owner is another live daemon: a duplicate, refused.
  - A wireguard record is a peer known by its public key (``PeerSpec.key``), sent to at its endpoint, its
    allowed IPs its routes. Its key is a claim like the others, so two records never hold one key and a
    forged record naming a host's key is "taken" on every host; a record whose key is ours is "own"; one with
    a malformed key, an endpoint that is not its address and a port, or allowed IPs that are not what its
    overlay and routes imply, is "fields". Allowed IPs overlapping another peer's are refused by the bridge
    (control/membership.py, "refused").
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from tunneld.config.checks import check_name, check_peer, check_public_key, check_route, check_static_mac
from tunneld.config.schema import MAX_ROUTES_PER_PEER, ConfigError
from tunneld.datapath.peers import REGISTRY, PeerSpec

SCHEME = "etcd://"
DEFAULT_PREFIX = "/tunneld"
DEFAULT_TTL = 15  # seconds: a SIGKILLed host is forgotten by all within this (plus etcd's expiry check, 0.5 s)
MIN_TTL, MAX_TTL = 2, 3600  # etcd grants at least 1.5 × its election timeout's worth anyway (2 s by default)
DEFAULT_PORT = 2379
MAX_ENDPOINTS = 16
MAX_PREFIX = 256
MAX_RECORD_BYTES = 16384  # a record is ~300 bytes; a larger value is not one of ours
MAX_OVERLAY = 64  # overlay addresses per record
HOSTS = "/hosts/"
CLAIMS = "/claims/"
REFUSALS_INTERVAL = 60.0  # seconds between two warnings that sum up the records not made peers

_PREFIX = re.compile(r"^(/[A-Za-z0-9._-]+)+$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")

# Why a record was not turned into a peer: the label of tunneld_registry_invalid_records_total, declared once.
INVALID_REASONS = {
    "json": "the value is not a JSON object of at most 16 KB",
    "fields": "a field is missing or of the wrong type, or the key does not name the record's address",
    "family": "the address is of the other IP version than our underlay",
    "own": "the address or public key is our own (a record of another daemon claiming it, or ours seen as a peer)",
    "foreign": "another mode or VNI: a host of another overlay sharing the prefix",
    "refused": "the tunnel refused the peer (an overlay route, allowed IP or MAC another peer already has)",
    "taken": "another host holds one of its claims (underlay, overlay address, MAC, public key) in etcd: the holder wins",
    "unclaimed": "no one holds one of its claims in etcd: written around the registration transaction",
}


class RegistryError(ValueError):
    """A registry setting that cannot work; str() is one line naming the setting."""


@dataclass(frozen=True)
class RegistryConfig:
    """Where the registry is and how to log in. ``endpoints``: "HOST:PORT" ("[v6]:PORT") of the etcd members,
    tried in turn; ``prefix``: the key prefix, "/name[/name...]"; ``ttl``: the lease's seconds."""

    endpoints: tuple[str, ...]
    prefix: str = DEFAULT_PREFIX
    ttl: int = DEFAULT_TTL
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def hosts_prefix(self) -> bytes:
        return (self.prefix + HOSTS).encode()

    def key_of(self, address: str) -> bytes:
        return self.hosts_prefix() + address.encode()

    def root(self) -> bytes:
        """Every key of this registry (hosts and claims): what is listed and watched, at one revision."""
        return (self.prefix + "/").encode()

    def claim_key(self, claim: "Claim") -> bytes:
        return (self.prefix + CLAIMS).encode() + claim.path

    def describe(self) -> str:
        tls = ", tls" if self.ca or self.cert else ""
        return f"etcd {','.join(self.endpoints)} prefix {self.prefix} ttl {self.ttl}s{tls}"


def check_endpoint(text: str, what: str = "registry") -> str:
    """One member "HOST:PORT" (a port of 2379 may be left out), canonical."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]")
        port = port[1:] if port.startswith(":") else port
        try:
            if ipaddress.ip_address(host).version != 6 or (sep and port and not port.isdigit()):
                raise ValueError
        except ValueError:
            raise RegistryError(f"{what}: {text!r} is not [IPv6]:PORT") from None
        host = f"[{ipaddress.ip_address(host).compressed}]"
    else:
        host, sep, port = text.rpartition(":") if ":" in text else (text, "", "")
        if ":" in host:
            raise RegistryError(f"{what}: write an IPv6 address in brackets, e.g. [{host}]:{port or DEFAULT_PORT}")
        if not _HOST.match(host):
            raise RegistryError(f"{what}: {text!r} is not HOST:PORT (an etcd member's client address)")
    port = port or str(DEFAULT_PORT)
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise RegistryError(f"{what}: port {port!r} of {text!r} is not a number between 1 and 65535")
    return f"{host}:{int(port)}"


def check_prefix(text: str, what: str = "registry") -> str:
    prefix = "/" + text.strip("/")
    if len(prefix) > MAX_PREFIX or not _PREFIX.match(prefix):
        raise RegistryError(f"{what}: prefix {text!r} is not a key prefix like /tunneld or /site/overlay1 "
                            f"(letters, digits and ._- between slashes, at most {MAX_PREFIX} characters)")
    return prefix


def check_ttl(value: Any, what: str = "registry-ttl") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_TTL <= value <= MAX_TTL:
        raise RegistryError(f"{what}: {value!r} is not a whole number of seconds from {MIN_TTL} to {MAX_TTL}")
    return value


def check_endpoints(items: Iterable[str], what: str = "registry") -> tuple[str, ...]:
    endpoints = tuple(check_endpoint(item.strip(), what) for item in items)
    if not endpoints:
        raise RegistryError(f"{what}: no etcd endpoint given")
    if len(endpoints) > MAX_ENDPOINTS:
        raise RegistryError(f"{what}: {len(endpoints)} endpoints, at most {MAX_ENDPOINTS}")
    if len(set(endpoints)) != len(endpoints):
        raise RegistryError(f"{what}: an endpoint is given twice")
    return endpoints


def parse_url(text: str, what: str = "registry") -> tuple[tuple[str, ...], str]:
    """``etcd://HOST:PORT[,HOST:PORT...]/PREFIX`` → (endpoints, prefix); the prefix defaults to /tunneld."""
    if not text.startswith(SCHEME):
        raise RegistryError(f"{what}: {text!r} is not etcd://HOST:PORT[,HOST:PORT...]/PREFIX")
    rest = text[len(SCHEME):]
    hosts, slash, prefix = rest.partition("/")
    return check_endpoints(hosts.split(","), what), check_prefix(prefix, what) if slash and prefix else DEFAULT_PREFIX


def check_registry(cfg: RegistryConfig) -> RegistryConfig:
    """The whole registry setting, canonical; RegistryError (one line) for the first problem. The files named
    for TLS must be readable now, not at the first reconnection."""
    endpoints = check_endpoints(cfg.endpoints)
    prefix = check_prefix(cfg.prefix)
    ttl = check_ttl(cfg.ttl)
    if (cfg.cert is None) != (cfg.key is None):
        raise RegistryError("registry: cert and key go together (the client certificate and its private key)")
    for name in ("ca", "cert", "key"):
        path = getattr(cfg, name)
        if path is not None and not os.access(path, os.R_OK):
            raise RegistryError(f"registry.{name}: cannot read {path!r}")
    if (cfg.user is None) != (cfg.password is None):
        raise RegistryError("registry: user and password go together")
    return RegistryConfig(endpoints, prefix, ttl, cfg.ca, cfg.cert, cfg.key, cfg.user, cfg.password)


def owner_id(dev: str, *, machine_id: bytes | None = None, netns: str | None = None) -> str:
    """Who writes a record: this machine, network namespace and device, hashed. The same after a restart (so a
    killed daemon's record can be taken over by its successor), different for any other daemon."""
    if machine_id is None:
        try:
            machine_id = Path("/etc/machine-id").read_bytes().strip()
        except OSError:
            machine_id = b""
    if netns is None:
        try:
            netns = os.readlink("/proc/self/ns/net")
        except OSError:
            netns = ""
    return hashlib.sha256(b"tunneld-registry\0" + machine_id + f"\0{netns}\0{dev}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Record:
    """One host as its record says. ``mac``: its device's MAC (L2 modes; None for L3); ``overlay``: the
    device's addresses as CIDRs."""

    address: str
    mode: str
    vni: int | None
    mac: str | None
    overlay: tuple[str, ...]
    version: str
    started: float
    owner: str = ""
    name: str | None = None  # the peer's name in `tunneld show`
    routes: tuple[str, ...] = ()  # L3 modes: prefixes behind the host, beside its overlay addresses
    # wireguard: who the host is and where it listens; never its private key
    public_key: str | None = None  # base64, as `wg pubkey` prints it
    port: int | None = None  # its listen port; with ``address``, the peer's endpoint

    def allowed_ips(self) -> tuple[str, ...]:
        """What is routed to this host, and accepted from it: each overlay address as a host prefix (each host
        owns its own addresses; the shared subnet is no one's), then the routes it names."""
        hosts = tuple(str(ipaddress.ip_interface(cidr).ip) + ("/32" if ":" not in cidr else "/128")
                      for cidr in self.overlay)
        return hosts + self.routes

    def endpoint(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"

    def encode(self) -> bytes:
        optional: dict[str, Any] = {"name": self.name} if self.name is not None else {}
        if self.routes:
            optional["routes"] = list(self.routes)
        if self.public_key is not None:
            optional.update(public_key=self.public_key, endpoint=self.endpoint(),
                            allowed_ips=list(self.allowed_ips()))
        return json.dumps({"address": self.address, "mode": self.mode, "vni": self.vni, "mac": self.mac,
                           "overlay": list(self.overlay), "version": self.version, "started": self.started,
                           "owner": self.owner, **optional}, sort_keys=True).encode()

    def spec(self, l2: bool) -> PeerSpec:
        """The peer this host is: its MAC as a static FDB entry (L2), its overlay addresses as host routes (L3:
        each host owns its own addresses; the shared subnet is no one's) and the routes it names; a keyed host
        (wireguard) is sent to at its own listen port, as a file's [[peer]] is."""
        if l2:
            return PeerSpec(self.address, self.name, self.routes, (self.mac,) if self.mac else (), source=REGISTRY)
        return PeerSpec(self.address, self.name, self.allowed_ips(), source=REGISTRY, key=self.public_key,
                        port=self.port)

    def claims(self) -> tuple[Claim, ...]:
        """What this record claims, the underlay address first (``CLAIM_KINDS`` order)."""
        scope = self.mode if self.vni is None else f"{self.mode}-{self.vni}"
        return tuple(Claim(kind, value, (f"{scope}/" if kind.tunnel else "").encode()
                           + f"{kind.name}/{value}".encode())
                     for kind in CLAIM_KINDS for value in kind.values(self))


@dataclass(frozen=True)
class ClaimKind:
    """A value no two hosts may share. ``what``: its name in a log line; ``tunnel``: scoped to one tunnel (mode
    and VNI: two overlays sharing a prefix may reuse each other's addresses and MACs), else to the prefix;
    ``values``: what a record claims of it, canonical."""

    name: str
    what: str
    tunnel: bool
    values: Callable[["Record"], Iterable[str]]


# The claims, declared once: the registration transaction, the peers' rule and the log lines all derive from
# this list (a public key is one more entry).
CLAIM_KINDS = (
    ClaimKind("underlay", "underlay address", False, lambda r: (r.address,)),
    ClaimKind("overlay", "overlay address", True,
              lambda r: sorted({str(ipaddress.ip_interface(c).ip) for c in r.overlay})),
    ClaimKind("mac", "MAC", True, lambda r: (r.mac,) if r.mac else ()),
    ClaimKind("key", "public key", True, lambda r: (r.public_key,) if r.public_key else ()),
)


@dataclass(frozen=True)
class Claim:
    """One claimed value; ``path``: its key under PREFIX/claims/."""

    kind: ClaimKind
    value: str
    path: bytes

    def describe(self) -> str:
        return f"{self.kind.what} {self.value}"


def claim_holder(value: bytes) -> str:
    """A claim's value as a log line may show it: an address, or its first bytes quoted (never a raw newline)."""
    text = value[:64].decode(errors="replace")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return repr(text)


class InvalidRecord(ValueError):
    """A record that is not made a peer; ``reason`` is one of INVALID_REASONS."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


def decode(key: bytes, value: bytes, prefix: bytes) -> Record:
    """The record under ``key``; InvalidRecord("json" or "fields") if it is not one."""
    if len(value) > MAX_RECORD_BYTES:
        raise InvalidRecord("json", f"{len(value)} bytes")
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):
        raise InvalidRecord("json", "not JSON") from None
    if not isinstance(data, dict):
        raise InvalidRecord("json", "not a JSON object")

    def get(name: str, kinds: tuple[type, ...], optional: bool = False) -> Any:
        v = data.get(name)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, kinds):
            raise InvalidRecord("fields", f"{name}: {type(v).__name__}")
        return v

    address = get("address", (str,))
    mode, vni, mac = get("mode", (str,)), get("vni", (int,), True), get("mac", (str,), True)
    name = get("name", (str,), True)
    routes = get("routes", (list,), True) or []
    if not all(isinstance(r, str) for r in routes):
        raise InvalidRecord("fields", "routes: not strings")
    try:  # a peer's own rules (config/checks.py), in the words a file or the control socket gets
        if check_peer(address, "address") != address:
            raise InvalidRecord("fields", f"address: {address} is not written canonically")
        mac = check_static_mac(mac, "mac") if mac is not None else None
        if name is not None:
            check_name(name)
        if len(routes) > MAX_ROUTES_PER_PEER:
            raise InvalidRecord("fields", f"routes: {len(routes)} given, at most {MAX_ROUTES_PER_PEER} per peer")
        routes = tuple(check_route(r) for r in routes)
    except ConfigError as e:
        raise InvalidRecord("fields", str(e)) from None
    if key != prefix + address.encode():
        raise InvalidRecord("fields", f"key {key!r} does not name address {address}")
    overlay = get("overlay", (list,))
    if len(overlay) > MAX_OVERLAY:
        raise InvalidRecord("fields", f"overlay: {len(overlay)} addresses")
    try:
        overlay = tuple(str(ipaddress.ip_interface(c)) for c in overlay if isinstance(c, str) and "/" in c)
    except ValueError:
        raise InvalidRecord("fields", "overlay: not CIDRs") from None
    if len(overlay) != len(data["overlay"]):
        raise InvalidRecord("fields", "overlay: not CIDRs")
    record = Record(address, mode, vni, mac, overlay, get("version", (str,)), float(get("started", (int, float))),
                    get("owner", (str,), True) or "", name, routes)
    public_key = get("public_key", (str,), True)
    if public_key is None:
        return record
    # A WireGuard peer: its key, where it listens, what it may send from. The key's own error never quotes it.
    try:
        check_public_key(public_key)
    except ConfigError as e:
        raise InvalidRecord("fields", str(e)) from None
    endpoint = get("endpoint", (str,))
    host, sep, port = endpoint.rpartition(":")
    if not sep or host.strip("[]") != address or ("[" in host) != (":" in address) or not port.isdigit() \
            or not 1 <= int(port) <= 65535 or str(int(port)) != port:
        raise InvalidRecord("fields", f"endpoint: {endpoint[:64]!r} is not this record's address and a port")
    record = replace(record, public_key=public_key, port=int(port))
    allowed = get("allowed_ips", (list,))
    if allowed != list(record.allowed_ips()):
        raise InvalidRecord("fields", "allowed_ips: not its overlay addresses as host prefixes, then its routes")
    return record


@dataclass
class RegistryStats:
    """What the registry client reports, read at scrape time (metrics.py) and by ``tunneld show``: plain values,
    written by the registry's thread only."""

    up: bool = False  # registered and watching
    peers: int = 0  # peers that came from the registry, as applied
    invalid: dict[str, int] = field(default_factory=lambda: dict.fromkeys(INVALID_REASONS, 0))
    reconnects: int = 0


# Reasons that are no one's mistake: a host of another overlay sharing the prefix is counted, never warned of.
QUIET_REASONS = frozenset({"foreign"})


class Refusals:
    """The records not made peers since the last warning, summed up in one line at most every ``interval``
    seconds (the first at once): junk under the prefix, however much, costs an operator one line a minute
    that says how many and why. Pure: the caller passes ``now``."""

    def __init__(self, interval: float = REFUSALS_INTERVAL) -> None:
        self.interval = interval
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}
        self.due = 0.0

    def note(self, reason: str, address: str, why: str) -> None:
        if reason in QUIET_REASONS:
            return
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.examples.setdefault(reason, f"{address}: {why}")

    def line(self, now: float) -> str | None:
        """The warning to log now, or None (nothing new, or the last one was less than ``interval`` ago)."""
        if not self.counts or now < self.due:
            return None
        self.due = now + self.interval
        total = sum(self.counts.values())
        parts = "; ".join(f"{n} {reason} (e.g. {self.examples[reason]})" for reason, n in sorted(self.counts.items()))
        self.counts, self.examples = {}, {}
        return (f"registry: {total} record{'s' if total != 1 else ''} not made peers: {parts} "
                f"(tunneld_registry_invalid_records_total; at most one such line per {self.interval:g} s)")


Changes = tuple[tuple[PeerSpec, ...], tuple[str, ...]]


class Membership:
    """The records turned into peers, and what each change means for the tunnel. ``prefix``: PREFIX/hosts/
    (the claims are its sibling PREFIX/claims/); ``us``: our underlay address; ``l2``; ``mode``/``vni``: ours
    (a record of another overlay is "foreign"); ``public_key``/``port``: ours, for a keyed tunnel (wireguard):
    every record must then name its own key (and is sent to at its own listen port).

    ``resync(kvs)`` (a full listing) and ``apply(changes)`` (a batch of watch events, (key, value or None))
    return (specs to set, peer ids to remove: an address, or a keyed peer's key). A batch should be one revision or more, never part of one: a
    host's record and claims are written in one transaction, and judged together. An invalid record, or one
    that does not hold its claims, is counted in ``stats.invalid`` (once per change of verdict), noted in
    ``refusals``, and, if its address was a peer, removes it."""

    def __init__(self, prefix: bytes, us: str, *, l2: bool, mode: str, vni: int | None, stats: RegistryStats,
                 public_key: str | None = None, port: int | None = None) -> None:
        self.prefix = prefix
        self.claims_prefix = prefix[:-len(HOSTS)] + CLAIMS.encode()
        self.us = us
        self.own_key = prefix + us.encode()
        self.version = ipaddress.ip_address(us).version
        self.l2 = l2
        self.mode = mode
        self.vni = vni
        self.public_key = public_key
        self.port = port
        self.stats = stats
        self.refusals = Refusals()
        self.specs: dict[str, PeerSpec] = {}  # address → the spec its valid, claimed record implies
        self.verdicts: dict[bytes, Record | InvalidRecord] = {}  # host key → its record, or why it is none
        self.holders: dict[bytes, str] = {}  # claim path → the holder's address, as etcd says
        self.claimants: dict[bytes, set[bytes]] = {}  # claim path → the host keys whose records claim it
        self.refused: dict[bytes, tuple[str, str]] = {}  # host key → (reason, why): the verdict last counted

    def judge(self, key: bytes, value: bytes) -> Record:
        record = decode(key, value, self.prefix)
        if ipaddress.ip_address(record.address).version != self.version:
            raise InvalidRecord("family", record.address)
        if record.address == self.us:
            raise InvalidRecord("own", record.address)
        if record.mode != self.mode or record.vni != self.vni:
            raise InvalidRecord("foreign", f"{record.mode} vni {record.vni}")
        if self.l2 and record.mac is None:
            raise InvalidRecord("fields", "mac: missing for an L2 mode")
        if self.public_key is not None:
            if record.public_key is None:
                raise InvalidRecord("fields", f"public_key: missing for mode {self.mode}")
            if record.public_key == self.public_key:
                raise InvalidRecord("own", "its public key is ours")
        return record

    def unheld(self, record: Record) -> tuple[str, str] | None:
        """("taken" or "unclaimed", why) for the first claim of ``record`` that etcd does not give it."""
        for claim in record.claims():
            holder = self.holders.get(claim.path)
            if holder == record.address:
                continue
            if holder is None:
                return "unclaimed", f"its {claim.describe()} is held by no one"
            return "taken", f"its {claim.describe()} is held by host {holder}"
        return None

    # -- the state, as etcd says it ------------------------------------------------------------------------------

    def _forget(self, key: bytes) -> None:
        old = self.verdicts.pop(key, None)
        if isinstance(old, Record):
            for claim in old.claims():
                keys = self.claimants.get(claim.path)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self.claimants[claim.path]

    def _change(self, key: bytes, value: bytes | None, touched: set[bytes]) -> None:
        if key.startswith(self.claims_prefix):
            path = key[len(self.claims_prefix):]
            if value is None:
                self.holders.pop(path, None)
            else:
                self.holders[path] = claim_holder(value)
            touched.update(self.claimants.get(path, ()))
        elif key.startswith(self.prefix):
            self._forget(key)
            touched.add(key)
            if value is None or key == self.own_key:
                return  # our own record: not a peer, not invalid
            try:
                record = self.judge(key, value)
            except InvalidRecord as e:
                self.verdicts[key] = e
                return
            self.verdicts[key] = record
            for claim in record.claims():
                self.claimants.setdefault(claim.path, set()).add(key)
        # anything else under the prefix is no one's record: not ours to judge

    def _settle(self, touched: Iterable[bytes]) -> Changes:
        upserts, removals = [], []
        for key in sorted(touched):
            address = key[len(self.prefix):].decode(errors="replace")
            verdict = self.verdicts.get(key)
            spec = refusal = None
            if isinstance(verdict, InvalidRecord):
                refusal = verdict.reason, str(verdict)
            elif verdict is not None:
                refusal = self.unheld(verdict)
                if refusal is None:
                    spec = verdict.spec(self.l2)
            if refusal is None:
                self.refused.pop(key, None)
            elif self.refused.get(key) != refusal:  # a new verdict: counted once, however often it is listed
                self.refused[key] = refusal
                reason, why = refusal
                self.stats.invalid[reason] = self.stats.invalid.get(reason, 0) + 1
                self.refusals.note(reason, claim_holder(key[len(self.prefix):]), why)  # a key may be any bytes
            old = self.specs.get(address)
            if spec is None:
                if self.specs.pop(address, None) is not None:
                    removals.append(old.id)
            elif old != spec:
                if old is not None and old.id != spec.id:  # a new key at the same address: another peer
                    removals.append(old.id)
                self.specs[address] = spec
                upserts.append(spec)
        return tuple(upserts), tuple(removals)

    # -- what the client calls -----------------------------------------------------------------------------------

    def apply(self, changes: Iterable[tuple[bytes, bytes | None]]) -> Changes:
        """A batch of watch events, (key, value) for a put and (key, None) for a delete, judged together."""
        touched: set[bytes] = set()
        for key, value in changes:
            self._change(key, value, touched)
        return self._settle(touched)

    def resync(self, kvs: Iterable[tuple[bytes, bytes]]) -> Changes:
        """A full listing of PREFIX/ replaces all that was known."""
        touched = set(self.verdicts) | set(self.refused) | {self.prefix + a.encode() for a in self.specs}
        self.verdicts, self.holders, self.claimants = {}, {}, {}
        for key, value in kvs:
            self._change(key, value, touched)
        return self._settle(touched)

    def put(self, key: bytes, value: bytes) -> Changes:
        return self.apply(((key, value),))

    def delete(self, key: bytes) -> Changes:
        return self.apply(((key, None),))
