"""Codec micro-benchmarks: what one encap and one decap of a 1400-byte frame cost, per registered encapsulator.

The calls are timed exactly as the engine makes them (``encap(buf, start, end)`` into headroom, ``decap`` on a
memoryview), through ``timeit`` with the codec's bound methods as globals, so the figure includes the Python
call overhead the engine pays per packet too. The best of several repeats is reported: the machine's noise
only ever adds time. The flow hash the engine computes per outbound packet is timed alongside.
"""

from __future__ import annotations

import struct
import timeit
from typing import Any

from tunneld.encap.base import DeviceKind, Encapsulator
from tunneld.encap.flow import ethernet_flow_hash, ip_flow_hash
from tunneld.datapath.engine import HEADROOM
from tunneld.encap.plugins import discover

FRAME_LEN = 1400


def _ipv4_udp(total: int) -> bytes:
    """An IPv4/UDP packet of ``total`` bytes between the overlay addresses (checksums zero: never verified)."""
    payload = bytes(range(256)) * (total // 256 + 1)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 17, 0,
                     bytes((192, 168, 231, 1)), bytes((192, 168, 231, 2)))
    udp = struct.pack("!HHHH", 40000, 5201, total - 20, 0)
    return (ip + udp + payload)[:total]


def sample_frame(device: DeviceKind, length: int = FRAME_LEN) -> bytes:
    """A ``length``-byte inner frame as the device would hand it over: Ethernet for TAP, bare IP for TUN."""
    if device is DeviceKind.TAP:
        eth = bytes.fromhex("020000000002" "020000000001" "0800")
        return eth + _ipv4_udp(length - len(eth))
    return _ipv4_udp(length)


def _best_ns(stmt: str, env: dict[str, Any], seconds: float, repeats: int = 5) -> float:
    """Best-of-``repeats`` ns per call of ``stmt``, spending about ``seconds`` after a warm-up."""
    timer = timeit.Timer(stmt, globals=env)
    number, took = timer.autorange()  # warm-up, and the cost of one call (autorange runs for >= 0.2 s)
    number = max(1000, int(seconds / repeats / (took / number)))
    return min(timer.repeat(repeat=repeats, number=number)) / number * 1e9


def bench_codec(cls: type[Encapsulator], seconds: float = 1.0) -> dict[str, Any]:
    codec = cls.from_options({})
    frame = sample_frame(cls.device)
    buf = bytearray(HEADROOM + len(frame))
    end = HEADROOM + len(frame)
    buf[HEADROOM:end] = frame
    start = codec.encap(buf, HEADROOM, end)
    packet = memoryview(bytes(buf[start:end]))  # a received datagram: header + frame
    verdict = codec.decap(packet)
    if not isinstance(verdict, int) or bytes(packet[verdict:]) != frame:
        raise RuntimeError(f"{cls.name}: decap of its own encap gave {verdict!r}, not the frame back")
    flow_hash = ethernet_flow_hash if cls.device is DeviceKind.TAP else ip_flow_hash
    env = {"encap": codec.encap, "decap": codec.decap, "flow_hash": flow_hash, "buf": buf, "start": HEADROOM,
           "end": end, "packet": packet, "frame": memoryview(buf)[HEADROOM:end]}
    share = seconds / 3
    return {
        "mode": cls.name,
        "device": cls.device.value,
        "frame_bytes": len(frame),
        "header_bytes": codec.header_len,
        "encap_ns": round(_best_ns("encap(buf, start, end)", env, share), 1),
        "decap_ns": round(_best_ns("decap(packet)", env, share), 1),
        "flow_hash_ns": round(_best_ns("flow_hash(frame)", env, share), 1),
    }


def bench_all(seconds_each: float = 1.0, progress=lambda msg: None) -> list[dict[str, Any]]:
    modes, broken = discover()
    rows = []
    for name, cls in modes.items():
        progress(f"codec {name}: timing encap/decap of a {FRAME_LEN}-byte frame")
        try:
            rows.append(bench_codec(cls, seconds_each))
        except Exception as e:  # a plugin's codec may fail in any way; report it and time the others
            rows.append({"mode": name, "error": f"{type(e).__name__}: {e}"})
    for plugin in broken:
        rows.append({"mode": plugin.name, "error": f"plugin not loaded: {plugin.problem}"})
    return rows
