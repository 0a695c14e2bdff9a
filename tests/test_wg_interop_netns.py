"""Interop with the real peer: Debian's wireguard-go in one namespace, our sans-IO device in the other, driven by
this test over a plain UDP socket (no TUN, no engine). Both handshake directions, an ICMP echo each way, a PSK,
our cookie reply under load, what `wg show` reports on their side, and tshark's WireGuard dissector over a
capture of it all.

Each wireguard-go interface gets a name of its own (its UAPI socket /var/run/wireguard/NAME.sock is shared by
every namespace); it is stopped with SIGTERM (which removes that socket) and the namespaces are deleted, also when
a test fails."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from tunneld.encap.wireguard import Deliver, Device, Reason, Reply, StaticKey, key_to_base64
from tunneld.testbed.netns import Host, is_root, tcpdump, testbed

pytestmark = pytest.mark.netns

scapy_all = pytest.importorskip("scapy.all")
IP, ICMP, Raw = scapy_all.IP, scapy_all.ICMP, scapy_all.Raw

OUR_PORT = 51999
THEIR_PORT = 51820
OUR_OVERLAY = "10.78.0.1"
THEIR_OVERLAY = "10.78.0.2"
CLONE_NEWNET = 0x40000000
PI_WARN = 0x00600000  # epan/proto.h: an expert info's severity, warning and up


def needs():
    if not is_root():
        pytest.skip("needs root: network namespaces and a TUN device for wireguard-go")
    for tool in ("wireguard-go", "wg", "tshark", "tcpdump"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make apt installs it)")


def udp_socket_in(namespace: str, address: tuple[str, int]) -> socket.socket:
    """A UDP socket bound inside ``namespace``: made by a short-lived thread that joined it (setns affects only
    the calling thread, and a socket stays in the namespace it was made in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    made: dict = {}

    def work() -> None:
        fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(address)
            made["socket"] = s
        except BaseException as e:  # handed to the caller's thread
            made["error"] = e
        finally:
            os.close(fd)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(10)
    if "error" in made:
        raise made["error"]
    return made["socket"]


class Ours:
    """Our device on a UDP socket in namespace A: a pump that feeds it datagrams and its timers on the real clock."""

    def __init__(self, sock: socket.socket, device: Device) -> None:
        self.sock, self.device = sock, device
        self.delivered: list[bytes] = []
        self.drops: list = []

    def send(self, datagrams, address) -> None:
        for d in datagrams:
            self.sock.sendto(d, address)

    def pump(self, until, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"gave up after {timeout} s; delivered {len(self.delivered)}, drops {self.drops}")
            out, due = self.device.tick(now)
            for datagram, address in out:
                if address is not None:
                    self.sock.sendto(datagram, address)
            wait = min(0.05, max(0.0, (due - now) if due is not None else 0.05))
            if select.select([self.sock], [], [], wait)[0]:
                datagram, source = self.sock.recvfrom(65535)
                result = self.device.open(datagram, source, time.monotonic())
                if isinstance(result, Deliver):
                    self.delivered.append(bytes(result.packet))
                    self.send(result.send, result.peer.endpoint)
                elif isinstance(result, Reply):
                    self.send(result.datagrams, result.address)
                elif hasattr(result, "reason"):
                    self.drops.append(result.reason)


class Theirs:
    def __init__(self, host: Host, name: str, proc: subprocess.Popen, workdir: Path) -> None:
        self.host, self.name, self.proc, self.workdir = host, name, proc, workdir

    def wg(self, *args: str) -> str:
        return self.host.run("wg", *args).stdout

    def dump(self) -> dict:
        """`wg show NAME dump`'s peer line: endpoint, latest handshake, rx and tx bytes, keepalive."""
        lines = self.wg("show", self.name, "dump").strip().splitlines()
        fields = lines[1].split("\t")
        return {"public_key": fields[0], "endpoint": fields[2], "latest_handshake": int(fields[4]),
                "rx": int(fields[5]), "tx": int(fields[6])}


@contextlib.contextmanager
def wireguard_go(host: Host, workdir: Path, private: StaticKey, our_public: bytes, *, psk: bytes | None,
                 endpoint: str | None, keepalive: int = 0):
    name = f"wgt{uuid.uuid4().hex[:8]}"
    proc = host.popen("wireguard-go", "-f", name)
    try:
        deadline = time.monotonic() + 10
        while host.link_state(name) is None or not Path(f"/var/run/wireguard/{name}.sock").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"wireguard-go did not start: {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.05)
        keyfile = workdir / f"{name}.key"
        keyfile.write_text(key_to_base64(private.private_bytes()) + "\n")
        keyfile.chmod(0o600)
        args = ["set", name, "private-key", str(keyfile), "listen-port", str(THEIR_PORT),
                "peer", key_to_base64(our_public), "allowed-ips", f"{OUR_OVERLAY}/32"]
        if psk:
            pskfile = workdir / f"{name}.psk"
            pskfile.write_text(key_to_base64(psk) + "\n")
            pskfile.chmod(0o600)
            args += ["preshared-key", str(pskfile)]
        if endpoint:
            args += ["endpoint", endpoint]
        if keepalive:
            args += ["persistent-keepalive", str(keepalive)]
        host.run("wg", *args)
        host.run("ip", "addr", "add", f"{THEIR_OVERLAY}/24", "dev", name)
        host.run("ip", "link", "set", name, "up")
        yield Theirs(host, name, proc, workdir)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # it removes its UAPI socket on the way out
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            Path(f"/var/run/wireguard/{name}.sock").unlink()


def echo_request(ident: int, seq: int, payload: bytes = b"tunneld-wg-interop") -> bytes:
    return bytes(IP(src=OUR_OVERLAY, dst=THEIR_OVERLAY, id=seq) / ICMP(type=8, id=ident, seq=seq) / Raw(payload))


def is_echo_reply(packet: bytes, ident: int, seq: int, payload: bytes = b"tunneld-wg-interop") -> bool:
    p = IP(packet)
    return (p.src == THEIR_OVERLAY and p.dst == OUR_OVERLAY and ICMP in p and p[ICMP].type == 0
            and p[ICMP].id == ident and p[ICMP].seq == seq and bytes(p[ICMP].payload) == payload)


def stop_capture(dump: subprocess.Popen, capture: Path, packets: int, timeout: float = 5.0) -> None:
    """Stop tcpdump once ``packets`` are in the file (or ``timeout`` passed): on SIGINT it drops what it has not
    read yet, and on a busy machine that can be the last few datagrams."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # a record may be half written
            if len(scapy_all.rdpcap(str(capture))) >= packets:
                break
        time.sleep(0.05)
    dump.send_signal(signal.SIGINT)
    dump.wait(timeout=10)


def dissect(capture: Path) -> list[dict]:
    """tshark's WireGuard dissector over the capture: per packet, the message type's fields and whether it is
    bad (not dissected as WireGuard, malformed, or an expert info of warning severity or worse)."""
    out = subprocess.run(
        ["tshark", "-r", str(capture), "-d", f"udp.port=={THEIR_PORT},wg", "-T", "fields", "-E", "separator=|",
         "-e", "wg.type", "-e", "wg.sender", "-e", "wg.receiver", "-e", "wg.counter", "-e", "_ws.malformed",
         "-e", "_ws.expert.severity"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    rows = []
    for line in out.strip().splitlines():
        kind, sender, receiver, counter, malformed, severity = (line.split("|") + [""] * 6)[:6]
        # expert infos at "chat" level only describe (e.g. "This is a Keepalive message"); warnings and errors
        # (and a malformed mark) mean the dissector disagreed with the bytes
        worst = max((int(x, 0) for x in severity.split(",") if x), default=0)
        # and a datagram it does not take for WireGuard at all (no type: a wrong length) is as bad
        rows.append({"type": kind, "sender": sender, "receiver": receiver, "counter": counter,
                     "bad": bool(malformed or worst >= PI_WARN or not kind)})
    return rows


@pytest.fixture
def workdir(tmp_path):
    needs()
    return tmp_path


@pytest.mark.parametrize("psk", [None, bytes(range(40, 72))], ids=["no-psk", "psk"])
def test_we_initiate_and_ping_wireguard_go(workdir, psk):
    ours_key, theirs_key = StaticKey.generate(), StaticKey.generate()
    with testbed() as (a, b):
        with wireguard_go(b, workdir, theirs_key, ours_key.public, psk=psk, endpoint=None) as theirs:
            device = Device(ours_key, wall_offset=time.time() - time.monotonic())
            peer = device.add_peer(theirs_key.public, preshared_key=psk, endpoint=(b.underlay, THEIR_PORT))
            sock = udp_socket_in(a.name, (a.underlay, OUR_PORT))
            capture = workdir / "wg.pcap"
            dump = tcpdump(a, capture, f"udp port {THEIR_PORT}")
            try:
                ours = Ours(sock, device)
                ident = 0x5A5A
                ours.send(peer.seal(echo_request(ident, 1), time.monotonic()), peer.endpoint)
                ours.pump(lambda: any(is_echo_reply(p, ident, 1) for p in ours.delivered))
                for seq in range(2, 6):  # more on the same session
                    ours.send(peer.seal(echo_request(ident, seq, b"x" * (seq * 100)), time.monotonic()), peer.endpoint)
                    ours.pump(lambda: any(is_echo_reply(p, ident, seq, b"x" * (seq * 100)) for p in ours.delivered))
                assert peer.has_session and peer.current.is_initiator
                state = theirs.dump()
                assert state["public_key"] == key_to_base64(ours_key.public)
                assert state["endpoint"] == f"{a.underlay}:{OUR_PORT}"  # it learnt us from our packets
                assert abs(state["latest_handshake"] - time.time()) < 30
                assert state["rx"] > 0 and state["tx"] > 0
                # both count every datagram of the peer's, handshake messages included: the byte counts agree
                assert (state["rx"], state["tx"]) == (peer.tx_bytes, peer.rx_bytes) and state["rx"] > 5 * 32
                assert not ours.drops
            finally:
                sock.close()
                stop_capture(dump, capture, 2 + 10)
            rows = dissect(capture)
            assert not [r for r in rows if r["bad"]], rows
            [initiation] = [r for r in rows if r["type"] == "1"]
            [response] = [r for r in rows if r["type"] == "2"]
            assert response["receiver"] == initiation["sender"]
            ours_sent = [r["counter"] for r in rows if r["type"] == "4" and r["receiver"] == response["sender"]]
            theirs_sent = [r["counter"] for r in rows if r["type"] == "4" and r["receiver"] == initiation["sender"]]
            assert ours_sent == theirs_sent == [str(i) for i in range(5)]  # five echoes, five replies


def test_wireguard_go_initiates_and_its_ping_is_answered(workdir):
    ours_key, theirs_key = StaticKey.generate(), StaticKey.generate()
    with testbed() as (a, b):
        with wireguard_go(b, workdir, theirs_key, ours_key.public, psk=None,
                          endpoint=f"{a.underlay}:{OUR_PORT}") as theirs:
            device = Device(ours_key, wall_offset=time.time() - time.monotonic())
            peer = device.add_peer(theirs_key.public)  # no endpoint: we learn it from their initiation
            sock = udp_socket_in(a.name, (a.underlay, OUR_PORT))
            try:
                ours = Ours(sock, device)
                pinger = b.popen("ping", "-c", "3", "-i", "0.3", "-W", "5", "-w", "20", OUR_OVERLAY)
                answered: set[int] = set()

                def answer() -> bool:
                    for packet in ours.delivered:
                        p = IP(packet)
                        if ICMP in p and p[ICMP].type == 8 and p[ICMP].seq not in answered:
                            assert p.src == THEIR_OVERLAY and p.dst == OUR_OVERLAY
                            reply = IP(src=OUR_OVERLAY, dst=THEIR_OVERLAY) / ICMP(type=0, id=p[ICMP].id,
                                                                                  seq=p[ICMP].seq) / p[ICMP].payload
                            ours.send(peer.seal(bytes(reply), time.monotonic()), peer.endpoint)
                            answered.add(p[ICMP].seq)
                    ours.delivered.clear()
                    return pinger.poll() is not None

                ours.pump(answer, timeout=25)
                output = pinger.stdout.read()
                assert pinger.returncode == 0, output
                assert "3 received" in output, output
                assert peer.endpoint == (b.underlay, THEIR_PORT)  # learnt from the authenticated initiation
                assert peer.has_session and not peer.current.is_initiator  # they initiated
                state = theirs.dump()
                assert state["latest_handshake"] > 0 and state["rx"] > 0 and state["tx"] > 0
            finally:
                sock.close()


def test_persistent_keepalive_from_wireguard_go_opens_the_session(workdir):
    ours_key, theirs_key = StaticKey.generate(), StaticKey.generate()
    psk = bytes(range(1, 33))
    with testbed() as (a, b):
        with wireguard_go(b, workdir, theirs_key, ours_key.public, psk=psk, endpoint=f"{a.underlay}:{OUR_PORT}",
                          keepalive=1):
            device = Device(ours_key, wall_offset=time.time() - time.monotonic())
            peer = device.add_peer(theirs_key.public, preshared_key=psk)
            sock = udp_socket_in(a.name, (a.underlay, OUR_PORT))
            try:
                ours = Ours(sock, device)
                ours.pump(lambda: peer.has_session, timeout=10)  # their keepalive confirmed our response
                ident = 0x1111
                ours.send(peer.seal(echo_request(ident, 7), time.monotonic()), peer.endpoint)
                ours.pump(lambda: any(is_echo_reply(p, ident, 7) for p in ours.delivered))
            finally:
                sock.close()


def test_under_load_wireguard_go_takes_our_cookie_and_retries_with_mac2(workdir):
    """Our device under load answers wireguard-go's initiation with a cookie reply only (XChaCha20-Poly1305 from
    PyNaCl); wireguard-go must open it and retry REKEY_TIMEOUT later with a mac2 we accept."""
    ours_key, theirs_key = StaticKey.generate(), StaticKey.generate()
    with testbed() as (a, b):
        with wireguard_go(b, workdir, theirs_key, ours_key.public, psk=None, endpoint=f"{a.underlay}:{OUR_PORT}",
                          keepalive=1):
            device = Device(ours_key, wall_offset=time.time() - time.monotonic())
            device.force_under_load = True
            peer = device.add_peer(theirs_key.public)
            sock = udp_socket_in(a.name, (a.underlay, OUR_PORT))
            replies: list = []
            capture = workdir / "cookie.pcap"
            dump = tcpdump(a, capture, f"udp port {THEIR_PORT}")
            try:
                ours = Ours(sock, device)
                original = device.open

                def watched(datagram, source, now, out=None):
                    result = original(datagram, source, now, out)
                    if isinstance(result, Reply):
                        replies.append(result.dropped)
                    return result

                device.open = watched
                ours.pump(lambda: peer.has_session, timeout=15)
            finally:
                sock.close()
                stop_capture(dump, capture, 5)  # initiation, cookie reply, initiation, response, keepalive
            rows = dissect(capture)
            assert not [r for r in rows if r["bad"]], rows
            kinds = [r["type"] for r in rows]
            assert kinds[:2] == ["1", "3"] and "2" in kinds  # initiation, our cookie reply, ..., our response
            assert replies[0] is Reason.COOKIE_REQUIRED  # the first initiation: a cookie, nothing else
            assert replies[-1] is None and peer.endpoint == (b.underlay, THEIR_PORT)  # the retry carried mac2


def test_we_follow_wireguard_go_to_its_new_port(workdir):
    """Roaming, on our side, against the real peer: once their listen port changes, their next authenticated
    packet moves our endpoint, and our answers reach them there."""
    ours_key, theirs_key = StaticKey.generate(), StaticKey.generate()
    with testbed() as (a, b):
        with wireguard_go(b, workdir, theirs_key, ours_key.public, psk=None, endpoint=f"{a.underlay}:{OUR_PORT}",
                          keepalive=1) as theirs:
            device = Device(ours_key, wall_offset=time.time() - time.monotonic())
            peer = device.add_peer(theirs_key.public)
            sock = udp_socket_in(a.name, (a.underlay, OUR_PORT))
            try:
                ours = Ours(sock, device)
                ours.pump(lambda: peer.has_session, timeout=10)
                assert peer.endpoint == (b.underlay, THEIR_PORT)
                theirs.wg("set", theirs.name, "listen-port", str(THEIR_PORT + 1))
                ours.pump(lambda: peer.endpoint == (b.underlay, THEIR_PORT + 1), timeout=10)  # their keepalive
                ident = 0x2222
                ours.send(peer.seal(echo_request(ident, 1), time.monotonic()), peer.endpoint)
                ours.pump(lambda: any(is_echo_reply(p, ident, 1) for p in ours.delivered))
                assert not ours.drops
            finally:
                sock.close()


def test_the_dissector_check_sees_a_malformed_message(tmp_path):
    """The tshark check above can fail: a truncated initiation is flagged."""
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed (make apt installs it)")
    capture = tmp_path / "bad.pcap"
    good = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / scapy_all.UDP(sport=40000, dport=THEIR_PORT)
                 / Raw(b"\x04\x00\x00\x00" + bytes(28)))
    bad = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / scapy_all.UDP(sport=40000, dport=THEIR_PORT)
                / Raw(b"\x01\x00\x00\x00" + bytes(60)))
    scapy_all.wrpcap(str(capture), [IP(good), IP(bad)])
    rows = dissect(capture)
    assert [r["bad"] for r in rows] == [False, True], rows
