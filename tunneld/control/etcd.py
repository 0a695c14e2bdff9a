"""The etcd side of the registry: one lease, our record and claims, one watch, on a thread of its own.

Theory of operation:
  1. ``Registry.start`` (called by daemon.serve, in the parent, after every worker is forked: gRPC's threads
     and fork() do not mix) starts a thread with its own asyncio loop. Nothing of etcd or gRPC ever runs on the
     data path's loop: a slow etcd, a reconnection or gRPC's CPU cannot stall a packet. aetcd is imported there.
  2. A session, against one endpoint at a time (the next on failure): keep our lease (re-granted if it
     expired), write our record and our claims (registry.CLAIM_KINDS) in one transaction that creates a claim
     only where no one holds it, never overwriting another live daemon's (``_register``), list PREFIX/ and hand
     the difference to the data path's loop (``call_soon_threadsafe``), watch from the listing's revision + 1
     (the events of one response judged together: a host's record and claims come in one revision), and keep
     the lease alive every ttl/3. Any error ends the session: the peers stay as they are (the data path keeps
     forwarding to the last known hosts), the next session resyncs in full. A compacted watch revision, or our
     record or a claim of ours deleted or replaced, is one more reason to resync.
     A partition longer than the TTL costs our lease, and our record and claims with it; the next session
     grants a new lease and claims again: it heals by itself unless another host took a claim meanwhile, and
     then every retry's warning names that host.
  3. Backoff: the endpoints are tried in turn without waiting; after a whole round failed, wait 0.5 s doubling
     to 8 s. The log says "registry up"/"registry down: why" once per change of state, not per attempt;
     a claim another host holds is said at every retry (only the operator, or the holder leaving, mends it).
     Records not made peers are summed up in one warning a minute at most (registry.Refusals).
  4. ``Registry.stop`` revokes the lease at once (the others forget us now rather than after the TTL) and ends
     the thread, within a bounded time.

What the tunnel receives: ``deliver(upserts, removals)`` on the data path's loop, which applies them through
the control handlers (control/membership.py); a peer the tunnel refuses is counted (``refused``) and forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Callable

from tunneld.control.registry import (
    Claim,
    InvalidRecord,
    Membership,
    Record,
    RegistryConfig,
    RegistryStats,
    claim_holder,
    decode,
)

log = logging.getLogger("tunneld")

RPC_TIMEOUT = 2.0  # seconds for each unary call: a dead member is given up on this fast, the next one is tried
BACKOFF_MIN, BACKOFF_MAX = 0.5, 8.0
STOP_TIMEOUT = 3.0  # seconds stop() waits for the revocation and the thread
REFUSALS_TICK = 5.0  # seconds between looks at whether a summary of refused records is due


class Duplicate(Exception):
    """Another live daemon has our underlay address, or another host holds one of our claims. str() names the
    value and the other record; ``what``: the kind of value, for "refusing a duplicate ..."."""

    def __init__(self, text: str, what: str) -> None:
        super().__init__(text)
        self.what = what


class _Resync(Exception):
    """Start a new session now: our record vanished, our lease expired, or the watch was compacted."""


def _client(cfg: RegistryConfig, endpoint: str, timeout: float):
    """An aetcd client for ``endpoint``; with TLS, over a channel we open (aetcd's own connect is plain-text
    only; everything else, the stubs and the watcher, is still aetcd's)."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's C core logs to stderr on its own; we say it once
    import aetcd
    import grpc
    from aetcd import rpc, watcher

    host, _, port = endpoint.rpartition(":")
    options = {"grpc.keepalive_time_ms": 10_000, "grpc.keepalive_timeout_ms": 5_000,
               "grpc.initial_reconnect_backoff_ms": 200, "grpc.max_reconnect_backoff_ms": 1_000}
    if not (cfg.ca or cfg.cert):
        return aetcd.Client(host, int(port), username=cfg.user, password=cfg.password, timeout=timeout,
                            options=options)

    def read(path):
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(read(cfg.ca), read(cfg.key), read(cfg.cert))

    class TlsClient(aetcd.Client):
        async def connect(self) -> None:
            if self._connected.is_set():
                return
            self.channel = rpc.secure_channel(f"{host}:{port}", credentials, options=list(options.items()))
            if self._username is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                resp = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
            self._connected.set()

    return TlsClient(host, int(port), username=cfg.user, password=cfg.password, timeout=timeout, options=options)


def describe_error(e: BaseException) -> str:
    """One line for the log: what went wrong with etcd, in its words where it has some."""
    cause = e.__cause__
    details = cause.details() if cause is not None and hasattr(cause, "details") else str(e)
    details = " ".join((details or type(e).__name__).split())
    low = details.lower()
    if any(word in low for word in ("handshake", "ssl", "certificate", "tsi_", "unwrap failed")):
        return f"TLS refused (does the member trust our certificate? registry.cert/key/ca): {details}"
    return details


def _refusal(e: BaseException) -> bool:
    """Whether etcd refused us for who we are (TLS, user and password, permissions) rather than being away."""
    import aetcd.exceptions

    if isinstance(e, aetcd.exceptions.UnauthenticatedError):
        return True
    line = describe_error(e).lower()
    return line.startswith("tls refused") or "permission denied" in line or "authentication failed" in line


class Registry:
    """The daemon's membership in the registry. ``record``: what we write; ``membership``: turns the listing
    and the watch into peer changes; ``deliver(upserts, removals)`` is called on ``loop`` (the data path's)."""

    def __init__(self, cfg: RegistryConfig, record: Record, membership: Membership, *,
                 loop: asyncio.AbstractEventLoop, deliver: Callable, stats: RegistryStats,
                 rpc_timeout: float = RPC_TIMEOUT) -> None:
        self.cfg = cfg
        self.record = record
        self.membership = membership
        self.loop = loop
        self.deliver = deliver
        self.stats = stats
        self.rpc_timeout = min(rpc_timeout, cfg.ttl / 3)
        self.key = cfg.key_of(record.address)
        self.claims: tuple[Claim, ...] = record.claims()
        self.claim_keys = tuple(cfg.claim_key(c) for c in self.claims)
        self.underlay_key = next(k for k, c in zip(self.claim_keys, self.claims) if c.kind.name == "underlay")
        self.lease_id: int | None = None
        self.registered = threading.Event()  # set at the first registration
        self.refused: str | None = None  # why the first registration was refused (a duplicate), if it was
        self.last_error: str | None = None
        self._thread: threading.Thread | None = None
        self._own_loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = threading.Event()
        self._down_logged = False

    # -- the data path's side ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tunneld-registry", daemon=True)
        self._thread.start()

    async def first(self, within: float, give_up: Callable[[], bool] = lambda: False) -> bool:
        """Wait (without blocking the loop) up to ``within`` seconds for the first registration; False if it was
        refused (``self.refused`` says why). Unreachable meanwhile is not a refusal: we run on, retrying.
        ``give_up``: stop waiting at once when it says so (a stop asked for meanwhile)."""
        deadline = time.monotonic() + within
        while (time.monotonic() < deadline and not self.registered.is_set() and self.refused is None
               and not give_up()):
            await asyncio.sleep(0.05)
        return self.refused is None

    def stop(self) -> None:
        """Revoke the lease and end the thread (blocking, at most STOP_TIMEOUT: call it off the data path)."""
        self._stopping.set()  # seen by _main even if its loop and event do not exist yet
        if self._own_loop is not None and self._stop is not None:
            try:
                self._own_loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # its loop already ended
                pass
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)

    # -- the registry's thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()  # plain asyncio: grpc.aio's own integration; uvloop is the data path's
        self._own_loop = loop
        try:
            loop.run_until_complete(self._main())
        except Exception as e:  # a bug here must not take the tunnel down: its peers stay, it logs
            log.error("registry: stopped by an internal error: %r", e)
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        if self._stopping.is_set():  # stop() came before this loop had its event
            self._stop.set()
        teller = asyncio.ensure_future(self._tell_refusals_every(REFUSALS_TICK))
        try:
            await self._sessions()
        finally:
            teller.cancel()

    async def _sessions(self) -> None:
        backoff, failures, n = BACKOFF_MIN, 0, len(self.cfg.endpoints)
        index = 0
        while not self._stop.is_set():
            endpoint = self.cfg.endpoints[index % n]
            index += 1
            client = _client(self.cfg, endpoint, self.rpc_timeout)
            ok = taken = False
            try:
                ok = await self._session(client, endpoint)
            except _Resync as e:
                log.info("registry: %s; resyncing", e)
                ok = True
            except Duplicate as e:
                if not self.registered.is_set():
                    self._down(f"{e}; refusing a duplicate {e.what}")
                    self.refused = f"{e}; refusing a duplicate {e.what}"
                    return
                # We were registered: the claim was taken while we were away (our lease expired). Not an endpoint's
                # fault, and not mended by trying the next one: said at every retry, naming the holder.
                taken = True
                self.last_error = str(e)
                self.stats.up = False
                self._down_logged = True
                log.warning("%s; not registered, retrying in %g s (the holder must leave first)", e, backoff)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # aetcd's ClientError family, gRPC's, OSError: etcd is not there for us
                why = f"{endpoint}: {describe_error(e)}"
                self._down(why)
                if not self.registered.is_set() and _refusal(e):  # credentials do not mend by retrying
                    self.refused = f"registry: {why}"
                    return
            finally:
                await self._close(client)
            if self._stop.is_set():
                break
            if ok:
                backoff, failures = BACKOFF_MIN, 0
                continue
            failures += 1
            if taken or failures % n == 0:  # every endpoint tried (or a claim taken): wait before the next round
                try:
                    await asyncio.wait_for(self._stop.wait(), backoff)
                except asyncio.TimeoutError:
                    pass
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _close(self, client) -> None:
        if self._stop.is_set() and self.lease_id is not None and self.stats.up:
            try:  # a clean stop: the others forget us now
                await asyncio.wait_for(client.revoke_lease(self.lease_id), 1.0)
                log.info("registry: lease revoked, %s deregistered", self.record.address)
            except Exception as e:
                log.warning("registry: could not revoke the lease (%s); the record expires in %d s",
                            describe_error(e), self.cfg.ttl)
            self.lease_id = None
        self.stats.up = False
        try:
            await asyncio.wait_for(client.close(), 1.0)
        except Exception:
            pass

    def _down(self, why: str) -> None:
        self.last_error = why
        self.stats.up = False
        if not self._down_logged:
            log.warning("registry down: %s; keeping the %d registry peers, retrying", why, len(self.membership.specs))
            self._down_logged = True

    def _up(self, endpoint: str) -> None:
        self.stats.up = True
        if self._down_logged or not self.registered.is_set():
            log.info("registry up: %s registered at %s (%d peers)", self.record.address, endpoint,
                     len(self.membership.specs))
        self._down_logged = False

    def _hand(self, change: tuple) -> None:
        upserts, removals = change
        if upserts or removals:
            self.loop.call_soon_threadsafe(self.deliver, upserts, removals)

    async def _session(self, client, endpoint: str) -> bool:
        """One connection's life; returns True when stopped, raises when it ends otherwise."""
        import aetcd.exceptions

        await client.connect()
        await self._lease(client)
        await self._register(client)
        prefix = self.cfg.root()  # the hosts and the claims, at one revision
        listing = await client.get_prefix(prefix)  # our own write's revision, and anyone's meanwhile
        self._hand(self.membership.resync((kv.key, kv.value) for kv in listing))
        self._tell_refusals()
        self.stats.reconnects += self.registered.is_set()
        self._up(endpoint)
        self.registered.set()
        try:
            watch = await client.watch_prefix(prefix, start_revision=listing.header.revision + 1)
        except aetcd.exceptions.RevisionCompactedError:
            raise _Resync("the listing's revision was compacted") from None
        tasks = [asyncio.ensure_future(self._events(watch)), asyncio.ensure_future(self._keepalive(client)),
                 asyncio.ensure_future(self._stop.wait())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            try:
                await asyncio.wait_for(watch.cancel(), 0.5)
            except Exception:
                pass
        for task in done:
            if task.exception() is not None:
                e = task.exception()
                if isinstance(e, aetcd.exceptions.RevisionCompactedError):
                    raise _Resync("the watch's revision was compacted") from None
                raise e
        if not self._stop.is_set():
            raise ConnectionError("the watch ended")
        return True

    async def _events(self, watch) -> None:
        """The watch's events, judged a response at a time: aetcd queues a whole response's events before this
        task runs again, so a flush scheduled with call_soon at a batch's first event runs after its last. A
        host's record and claims, written in one transaction, are thus never judged apart (a record seen before
        its claims would be counted "unclaimed" for nothing)."""
        from aetcd.rtypes import EventKind

        ours = {self.key, *self.claim_keys}
        batch: list[tuple[bytes, bytes | None]] = []

        def flush() -> None:
            changes = batch[:]
            batch.clear()
            self._hand(self.membership.apply(changes))
            self._tell_refusals()

        async for event in watch:
            key = event.kv.key
            if key in ours and (event.kind == EventKind.DELETE or event.kv.lease != self.lease_id):
                what = "record" if key == self.key else f"claim {key.decode(errors='replace')}"
                raise _Resync(f"our {what} was deleted or replaced")
            if not batch:
                asyncio.get_running_loop().call_soon(flush)
            batch.append((key, event.kv.value if event.kind == EventKind.PUT else None))

    def _tell_refusals(self) -> None:
        line = self.membership.refusals.line(time.monotonic())
        if line is not None:
            log.warning("%s", line)

    async def _tell_refusals_every(self, seconds: float) -> None:
        """A summary held back by the rate limit is told when its minute is over, events or not."""
        while True:
            await asyncio.sleep(seconds)
            self._tell_refusals()

    async def _keepalive(self, client) -> None:
        while True:
            await asyncio.sleep(self.cfg.ttl / 3)
            reply = await asyncio.wait_for(client.refresh_lease(self.lease_id), self.rpc_timeout)
            if reply is None or reply.TTL <= 0:
                self.lease_id = None
                raise _Resync("our lease expired")

    async def _lease(self, client) -> None:
        """Ours again if it is still alive (a reconnection within the TTL), else a new one."""
        if self.lease_id is not None:
            info = await client.get_lease_info(self.lease_id, keys=False)
            if info.TTL > 0:
                return
            log.info("registry: lease expired while away; registering anew")
        lease = await client.lease(self.cfg.ttl)
        self.lease_id = lease.id

    async def _register(self, client) -> None:
        """Our claims and record under our lease, in one transaction that holds only if every key is as we
        read it: absent (``Version == 0``, flannel's rule for its subnet keys) or already ours (our lease, our
        address as a claim's holder, our owner in the record: a previous run killed before its lease expired).
        Any key another live host holds is a ``Duplicate`` naming it. The claims come first in the transaction,
        so a watcher that judges one event at a time still sees them before the record."""
        t = client.transactions
        writes = [(key, self.record.address.encode(), claim) for key, claim in zip(self.claim_keys, self.claims)]
        writes.append((self.key, self.record.encode(), None))
        for _ in range(3):  # a race with another writer is settled by the compare: look again
            _, found = await client.transaction(compare=[], success=[t.get(key) for key, _, _ in writes], failure=[])
            seen = dict(zip((key for key, _, _ in writes), found))
            self._check_record(seen[self.key], seen[self.underlay_key])  # first: the plainest message
            compare = []
            for key, _, claim in writes:
                kvs = seen[key]
                if not kvs:
                    compare.append(t.version(key) == 0)
                    continue
                value, meta = kvs[0]
                if claim is not None and meta.lease != self.lease_id and claim_holder(value) != self.record.address:
                    raise Duplicate(f"registry: {claim.describe()} is already registered by host {claim_holder(value)} "
                                    f"(key {key.decode()})", claim.kind.what)
                compare.append(t.mod(key) == meta.mod_revision)
            ok, _ = await client.transaction(
                compare=compare, success=[t.put(key, value, lease=self.lease_id) for key, value, _ in writes],
                failure=[])
            if ok:
                return
        raise ConnectionError("could not write our record and claims (they kept changing)")

    def _check_record(self, kvs: list, underlay: list) -> None:
        """Duplicate if the record under our key is another live daemon's: another owner's (not ours, not our
        previous run's), and the underlay address's claim held under another lease. A record whose underlay
        claim no one holds, or we hold, is no one's peer (registry.Membership): written over ours, or around
        the transaction. It is taken over, not obeyed: else one such write would keep us out for good."""
        if not kvs:
            return
        value, meta = kvs[0]
        if meta.lease == self.lease_id:
            return
        try:
            owner = decode(self.key, value, self.cfg.hosts_prefix()).owner
        except InvalidRecord:
            owner = ""
        if owner == self.record.owner:
            return  # our previous run's
        if underlay and underlay[0][1].lease != self.lease_id:
            raise Duplicate(f"registry: {self.record.address} is already registered by another live daemon "
                            f"(key {self.key.decode()})", "underlay address")
        log.warning("registry: the record under %s is not ours and holds no claim (written over ours, or around "
                    "the registration); taking it over", self.key.decode())
