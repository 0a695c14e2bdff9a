"""The Internet checksum (RFC 1071), shared by the codecs, the offload path and the test fakes.

``int.from_bytes(...) % 0xFFFF`` is the one's complement 16-bit sum with its end-around carries done by the
modulus (2**16 ≡ 1 mod 0xFFFF), in C rather than a Python loop over words; an odd length is padded with a
zero byte by shifting. A nonzero sum that folds to 0 is 0xFFFF ("negative zero").
"""

from __future__ import annotations


def ones_complement_sum(data: memoryview | bytes | bytearray) -> int:
    """The folded one's complement sum of ``data`` as 16-bit big-endian words: 0 only for all-zero data."""
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    folded = value % 0xFFFF
    return 0xFFFF if folded == 0 and value else folded


def internet_checksum(data: memoryview | bytes | bytearray) -> int:
    """RFC 1071: the one's complement of the sum. Over data that includes a correct checksum it is 0."""
    return 0xFFFF ^ ones_complement_sum(data)
