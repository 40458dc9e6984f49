"""Shamir t-out-of-n secret sharing over the prime field GF(p), p = 2^521 - 1.

Shamir, "How to share a secret", CACM 22(11), 1979. A secret s (bytes, read as one big-endian
integer < p) becomes the constant term of a random polynomial f of degree t - 1 over GF(p); share
i is the point (i, f(i)), i = 1..n. Any t points fix f, hence s = f(0), by Lagrange interpolation;
any t - 1 points leave f(0) uniform over GF(p), so they say nothing about s. Bonawitz et al.
(CCS 2017, Sec. 3.1) use it to share each client's mask seed and pairwise-mask private key.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

PRIME = 2**521 - 1  # a Mersenne prime > 2^512, so any 64-byte secret is a field element
MAX_SECRET_BYTES = 64
_Y_BYTES = (PRIME.bit_length() + 7) // 8  # 66
_X = struct.Struct(">I")
SHARE_BYTES = _X.size + _Y_BYTES  # one serialized share: x (4 bytes) then y (66 bytes)

Share = tuple[int, int]  # (x, f(x)), 0 < x < p and 0 <= f(x) < p


def _field_element(rng: np.random.Generator) -> int:
    """A uniform element of GF(p) by rejection (p = 2^521 - 1: a draw of 521 bits is rejected with
    probability 2^-521), so coefficients carry no modular bias."""
    while True:
        value = int.from_bytes(rng.bytes(_Y_BYTES), "big") & ((1 << PRIME.bit_length()) - 1)
        if value < PRIME:
            return value


def _poly_eval(coeffs: Sequence[int], x: int) -> int:
    """f(x) mod p by Horner's rule, coeffs[0] the constant term."""
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def split(secret: bytes, n: int, t: int, rng: np.random.Generator) -> list[Share]:
    """The n shares (i, f(i)), i = 1..n, of ``secret`` with threshold t (Shamir 1979): f(0) is the
    secret, f's other t - 1 coefficients are uniform over GF(p). ``rng`` stands for a CSPRNG (a
    deployment draws from ``os.urandom``; a seeded generator makes simulations reproducible)."""
    if not 1 <= t <= n:
        raise ValueError(f"shamir: need 1 <= t <= n (got t={t}, n={n})")
    if n >= PRIME:
        raise ValueError(f"shamir: n must be < p (got n={n})")
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"shamir: secret must be at most {MAX_SECRET_BYTES} bytes (got {len(secret)})")
    coeffs = [int.from_bytes(secret, "big")] + [_field_element(rng) for _ in range(t - 1)]
    return [(x, _poly_eval(coeffs, x)) for x in range(1, n + 1)]


def interpolate_at_zero(shares: Sequence[Share]) -> int:
    """f(0) = sum_i y_i prod_{j != i} x_j / (x_j - x_i) mod p (Lagrange), for the polynomial of degree
    < len(shares) through the points. With at least t shares of one secret this is the secret."""
    if not shares:
        raise ValueError("shamir: need at least one share")
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise ValueError(f"shamir: share indices must be distinct (got {sorted(xs)})")
    for x, y in shares:
        if not (0 < x < PRIME and 0 <= y < PRIME):
            raise ValueError(f"shamir: share ({x}, ...) is not a point of GF(p) with x != 0")
    secret = 0
    for i, (x_i, y_i) in enumerate(shares):
        num, den = 1, 1
        for j, x_j in enumerate(xs):
            if j != i:
                num = num * x_j % PRIME
                den = den * (x_j - x_i) % PRIME
        secret = (secret + y_i * num * pow(den, -1, PRIME)) % PRIME
    return secret


def combine(shares: Sequence[Share], size: int) -> bytes:
    """The ``size``-byte secret from at least t of its shares. Fewer than t (or corrupt) shares give
    a uniform field element instead, which is reported when it does not fit in ``size`` bytes (it
    does fit with probability 2^(8 size - 521): such an error is not detected)."""
    value = interpolate_at_zero(shares)
    if value.bit_length() > 8 * size:
        raise ValueError(f"shamir: reconstructed value does not fit in {size} bytes "
                         f"(too few or corrupt shares: got {len(shares)})")
    return value.to_bytes(size, "big")


def share_to_bytes(share: Share) -> bytes:
    """x as a 4-byte big-endian integer, then y as 66 bytes."""
    x, y = share
    if not 0 < x < 2**32:
        raise ValueError(f"shamir: share index must be in 1..2^32-1 to serialize (got {x})")
    return _X.pack(x) + y.to_bytes(_Y_BYTES, "big")


def share_from_bytes(data: bytes) -> Share:
    """The inverse of ``share_to_bytes``."""
    if len(data) != SHARE_BYTES:
        raise ValueError(f"shamir: a serialized share has {SHARE_BYTES} bytes (got {len(data)})")
    return _X.unpack_from(data)[0], int.from_bytes(data[_X.size:], "big")
