"""WireGuard's cryptographic primitives, named as the whitepaper (section 5.4) names them, built only from libraries.

What flows through: bytes in, bytes out. Nothing here keeps state, reads a clock or touches a socket.

  HASH(x)            BLAKE2s(x), 32 bytes                                   hashlib.blake2s
  MAC(key, x)        keyed BLAKE2s(key, x), 16 bytes                        hashlib.blake2s(key=, digest_size=16)
  HMAC(key, x)       HMAC-BLAKE2s(key, x), 32 bytes                         hmac + hashlib.blake2s
  KDF1/2/3(key, x)   HKDF over HMAC as the paper writes it (tau0 = HMAC(key, x), tau_i = HMAC(tau0, tau_{i-1} || i))
  DH(priv, pub)      X25519                                                 cryptography
  DH_GENERATE()      a fresh X25519 key pair                                cryptography (randomness: os.urandom)
  AEAD(k, n, p, a)   ChaCha20-Poly1305, nonce = 32 zero bits || n as 64-bit little-endian
  XAEAD(k, n, p, a)  XChaCha20-Poly1305 with a 24-byte nonce (cookie replies only)   PyNaCl (libsodium)
  TAI64N(wall)       12 bytes: big-endian (2^62 + 10 + seconds) || big-endian nanoseconds, the nanoseconds rounded
                     down to 2^24 ns as wireguard-go does (the timestamp must not leak a precise clock)

What must stay true:
- No primitive is written by hand; the ones above are thin wrappers with the paper's names.
- A failed AEAD open or an all-zero X25519 result raises ``CryptoError`` with a fixed message: never a key, never
  the library's text (which could one day include one).
- Key-holding objects hide their bytes from ``repr`` (``StaticKey`` shows its public half only).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt, crypto_aead_xchacha20poly1305_ietf_encrypt
from nacl.exceptions import CryptoError as NaclCryptoError

# The whitepaper's strings (section 5.4): the Noise protocol name, the prologue, and the labels of the two MAC keys.
CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

KEY_LEN = 32  # every key, hash and chaining key
HASH_LEN = 32
MAC_LEN = 16
AEAD_TAG_LEN = 16  # Poly1305
XAEAD_NONCE_LEN = 24
TIMESTAMP_LEN = 12
ZERO_KEY = bytes(KEY_LEN)  # the PSK "Q" when none is configured

# TAI64N: seconds since 1970 as a TAI64 label (2^62 + 10 leap seconds at the epoch, as wireguard-go's tai64n.go)
TAI64_BASE = (1 << 62) + 10
TIMESTAMP_WHITENER = (1 << 24) - 1  # nanosecond bits cleared, so a timestamp is only as precise as ~16.8 ms


class CryptoError(Exception):
    """An AEAD open failed or an X25519 result was all zeros. The text is fixed: it never carries key material."""


def HASH(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def MAC(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=MAC_LEN).digest()


def HMAC(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def KDF1(key: bytes, data: bytes) -> bytes:
    tau0 = HMAC(key, data)
    return HMAC(tau0, b"\x01")


def KDF2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    tau0 = HMAC(key, data)
    tau1 = HMAC(tau0, b"\x01")
    tau2 = HMAC(tau0, tau1 + b"\x02")
    return tau1, tau2


def KDF3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    tau0 = HMAC(key, data)
    tau1 = HMAC(tau0, b"\x01")
    tau2 = HMAC(tau0, tau1 + b"\x02")
    tau3 = HMAC(tau0, tau2 + b"\x03")
    return tau1, tau2, tau3


class StaticKey:
    """An X25519 private key with its public half. ``repr`` shows the public key only."""

    __slots__ = ("_private", "public")

    def __init__(self, private: bytes | X25519PrivateKey) -> None:
        if isinstance(private, (bytes, bytearray, memoryview)):
            if len(private) != KEY_LEN:
                raise ValueError(f"a private key is {KEY_LEN} bytes")
            private = X25519PrivateKey.from_private_bytes(bytes(private))
        self._private = private
        self.public = private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> "StaticKey":
        return cls(X25519PrivateKey.generate())

    def private_bytes(self) -> bytes:
        """The raw private key: for the userspace API's ``get`` and for tests; never for a log line."""
        return self._private.private_bytes_raw()

    def dh(self, public: bytes) -> bytes:
        return DH(self._private, public)

    def __repr__(self) -> str:
        return f"<StaticKey public={key_to_base64(self.public)}>"

    __str__ = __repr__


def DH(private: X25519PrivateKey, public: bytes) -> bytes:
    """X25519; an all-zero result (a low-order public key) is refused, as wireguard-go refuses it."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(bytes(public)))
    except ValueError:
        raise CryptoError("X25519 produced no shared secret") from None


def DH_GENERATE() -> tuple[X25519PrivateKey, bytes]:
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes_raw()


_NONCE = struct.Struct("<4xQ")  # 32 zero bits, then the counter as 64-bit little-endian


def aead_nonce(counter: int) -> bytes:
    return _NONCE.pack(counter)


def AEAD(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(aead_nonce(counter), plaintext, ad)


def AEAD_OPEN(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(aead_nonce(counter), bytes(ciphertext), ad)
    except InvalidTag:
        raise CryptoError("authentication failed") from None


def XAEAD(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


def XAEAD_OPEN(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(bytes(ciphertext), ad, bytes(nonce), key)
    except NaclCryptoError:
        raise CryptoError("authentication failed") from None


def TAI64N(wall: float) -> bytes:
    """The whitepaper's timestamp for wall-clock time ``wall`` (seconds since 1970), whitened as wireguard-go does."""
    seconds = int(wall // 1)
    nanos = int(round((wall - seconds) * 1e9))
    if nanos >= 1_000_000_000:
        seconds, nanos = seconds + 1, nanos - 1_000_000_000
    nanos &= ~TIMESTAMP_WHITENER
    return struct.pack(">QI", TAI64_BASE + seconds, nanos)


def key_to_base64(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def key_from_base64(text: str) -> bytes:
    """A key as ``wg`` prints it (44 characters of base64). ValueError, without the text, when it is not one."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (ValueError, TypeError):
        raise ValueError("a key is 44 characters of base64") from None
    if len(raw) != KEY_LEN:
        raise ValueError("a key is 44 characters of base64")
    return raw
