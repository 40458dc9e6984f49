"""Secure aggregation with double masking: Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017, Fig. 4, semi-honest server (no signatures, no
ConsistencyCheck): four rounds, AdvertiseKeys, ShareKeys, MaskedInputCollection, Unmasking.

Client u sends y_u = x_u + PRG(b_u) + sum_{v in U2 \\ u} Delta_uv PRG(s_uv) mod R, s_uv = KA.agree(s_u, s_v),
Delta_uv = +1 if u < v else -1 (Sec. 4). Pairwise masks cancel over the survivors U3; the server
removes PRG(b_u), u in U3, and the masks shared with the dropped U2 \\ U3 from Shamir shares the
survivors reveal (of b for survivors, of s^SK for the dropped, never both for one client).
``secure_sum`` runs it in-process between objects exchanging serialized bytes (real traffic sizes).
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgelam.privacy import shamir

_T = TypeVar("_T")
ROUNDS = ("advertise", "share", "masked", "unmask")
Ring = npt.NDArray[np.uint64]  # elements of Z_R, R = 2^ring_bits, one per coordinate
_SERVER = 0xFFFFFFFF  # sender id of server messages; client ids are 0 .. 2^32 - 2
_KEY = 32  # bytes of an X25519 key, a mask seed b_u and a derived symmetric key
_PRG_NONCE = bytes(16)  # fixed: every PRG seed is used for one stream only
_MASK_INFO, _SHARE_INFO = b"edgelam-secagg/mask", b"edgelam-secagg/share"  # HKDF info of s_uv, c_uv
_HEAD = struct.Struct(">BII")  # (message kind, sender, record count)
_REC = struct.Struct(">II")  # (client id, payload length)
_PAIR = struct.Struct(">II")  # (sender, receiver) of an encrypted share
_ADVERTISE, _KEY_LIST, _SHARES, _FORWARD, _MASKED, _SURVIVORS, _UNMASK = range(7)  # message kinds


@dataclass(frozen=True)
class SecAggParams:
    """t-out-of-n secure aggregation of vectors in [-clip, clip], quantised to ``bits`` bits. The
    security analysis (Bonawitz et al. Sec. 6) assumes fewer than t clients collude with the server."""

    threshold: int  # t: shares needed to reconstruct a secret, 1 < t <= n
    bits: int = 16  # quantisation bits per coordinate
    clip: float = 1.0  # quantisation range [-clip, clip]

    def __post_init__(self) -> None:
        if self.threshold < 2:
            raise ValueError(f"secagg: threshold must be > 1 (got threshold={self.threshold})")
        if not 1 <= self.bits <= 48:  # float64 holds every level exactly; the ring keeps 16 bits of headroom
            raise ValueError(f"secagg: bits must be in 1..48 (got bits={self.bits})")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"secagg: clip must be finite and > 0 (got clip={self.clip})")


class SecAggError(RuntimeError):
    """The protocol aborted: too few clients reached a round, or a message was malformed."""


@dataclass(frozen=True)
class SecAggTraffic:
    """Bytes one client sent (``up``) and received (``down``) per round, from the real messages; down
    per round: the key list, the shares encrypted for it, nothing, the survivor list U3 (unmask request)."""

    up: dict[str, int]
    down: dict[str, int]

    @property
    def masked_bytes(self) -> int:  # the masked input message: dim words and a 17-byte header
        return self.up["masked"]

    @property
    def extra_up(self) -> int:  # all else sent: SecAgg's cost over sending x_u
        return sum(self.up.values()) - self.masked_bytes

    @property
    def extra_down(self) -> int:
        return sum(self.down.values())


@dataclass(frozen=True)
class SecAggResult:
    """One aggregation round's outcome, traffic and CPU cost (rounds named as in ``ROUNDS``)."""

    total: npt.NDArray[np.float64]  # (dim,) dequantised sum over the survivors' vectors
    survivors: list[int]  # U3: their masked inputs are in the sum
    dropped: list[int]  # U2 \ U3: shared keys, then went silent
    traffic: dict[int, SecAggTraffic]
    rounds: int
    cpu_s: dict[int, float]  # per client, process CPU seconds in its protocol steps
    server_cpu_s: float
    round_cpu_s: dict[int, dict[str, float]] = field(default_factory=dict)  # client -> round -> s
    server_round_cpu_s: dict[str, float] = field(default_factory=dict)


def ring_bits(bits: int, n: int) -> int:
    """log2 R with R = 2^(bits + ceil(log2 n)): n values < 2^bits sum to < R, so the sum never wraps."""
    k = bits + (n - 1).bit_length()
    if k > 64:
        raise ValueError(f"secagg: bits + ceil(log2 n) must be <= 64 (got bits={bits}, n={n})")
    return k


def word_bytes(ring_bits: int) -> int:
    return 4 if ring_bits <= 32 else 8  # bytes per coordinate on the wire: uint32 or uint64


def quantize(x: npt.NDArray[np.floating], clip: float, bits: int,
             rng: np.random.Generator) -> npt.NDArray[np.uint64]:
    """Maps [-clip, clip] affinely onto [0, 2^bits - 1] with unbiased stochastic rounding (E[q] is the
    scaled x, as in QSGD, Alistarh et al. NeurIPS 2017); x is clipped to [-clip, clip] first."""
    if np.isnan(x).any():
        raise ValueError(f"secagg: x has {int(np.isnan(x).sum())} NaN values")
    levels = 2**bits - 1
    scaled = (np.clip(np.asarray(x, dtype=np.float64), -clip, clip) + clip) * (levels / (2 * clip))
    low = np.floor(scaled)
    return np.minimum(low + (rng.random(scaled.shape) < scaled - low), levels).astype(np.uint64)


def dequantize_sum(total: npt.NDArray[np.unsignedinteger], n: int, clip: float, bits: int) -> npt.NDArray[np.float64]:
    """sum_u x_u from sum_u q_u: undo the scale and the n offsets of +clip."""
    return total.astype(np.float64) * (2 * clip / (2**bits - 1)) - n * clip


def prg(seed: bytes, dim: int, ring_bits: int) -> Ring:
    """dim uniform elements of Z_R: a ChaCha20 keystream under ``seed`` (fixed nonce), read as
    little-endian uint32/uint64 words and reduced mod R (R a power of two: no bias)."""
    word = word_bytes(ring_bits)
    stream = Cipher(algorithms.ChaCha20(seed, _PRG_NONCE), mode=None).encryptor().update(bytes(dim * word))
    words = np.frombuffer(stream, dtype=np.dtype(f"<u{word}")).astype(np.uint64)
    return words & np.uint64((1 << ring_bits) - 1)


def agree(private: X25519PrivateKey, public: X25519PublicKey, info: bytes) -> bytes:
    """KA.agree (Bonawitz Sec. 3.2): X25519, then HKDF-SHA256 to a 32-byte key bound to ``info``."""
    return HKDF(algorithm=hashes.SHA256(), length=_KEY, salt=None, info=info).derive(private.exchange(public))


def pack(kind: int, sender: int, records: Iterable[tuple[int, bytes]]) -> bytes:
    """A message: header (kind, sender, count), then count records (id, payload length, payload)."""
    recs = list(records)
    return _HEAD.pack(kind, sender, len(recs)) + b"".join(_REC.pack(i, len(p)) + p for i, p in recs)


def unpack(msg: bytes, kind: int) -> tuple[int, dict[int, bytes]]:
    """(sender, {id: payload}) of a message of this kind; SecAggError when it is malformed."""
    records: dict[int, bytes] = {}
    try:
        got, sender, count = _HEAD.unpack_from(msg)
        at = _HEAD.size
        for _ in range(count):
            rid, size = _REC.unpack_from(msg, at)
            records[rid], at = msg[at + _REC.size:at + _REC.size + size], at + _REC.size + size
    except struct.error as err:
        raise SecAggError(f"secagg: truncated message ({len(msg)} bytes): {err}") from err
    if got != kind or at != len(msg) or len(records) != count:
        raise SecAggError(f"secagg: malformed message from {sender}: kind {got} (expected {kind}), "
                          f"{count} records ({len(records)} distinct), {len(msg)} bytes ({at} parsed)")
    return sender, records


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _need(round_name: str, got: int, t: int, of: int | None = None) -> None:
    """Bonawitz et al. Fig. 4: every round aborts when fewer than t clients took part."""
    if got < t:
        who = f"{got} of {of} survivors" if of is not None else f"{got} clients"
        raise SecAggError(f"secagg: {round_name}: only {who} responded, below the threshold t={t}; "
                          "the round is aborted and nothing is returned")


def _collect(msgs: list[bytes], kind: int, ok: Callable[[int, dict[int, bytes]], bool],
             round_name: str) -> dict[int, dict[int, bytes]]:
    """sender -> records of one round's messages; SecAggError on repeated senders or rejected messages."""
    sent = dict(unpack(m, kind) for m in msgs)
    bad = sorted(u for u, rec in sent.items() if not ok(u, rec))
    if bad or len(sent) != len(msgs):
        raise SecAggError(f"secagg: {round_name}: malformed messages from clients {bad} or a repeated sender")
    return sent


def _reconstruct(v: int, what: str, shares: list[shamir.Share]) -> bytes:
    try:
        return shamir.combine(shares, _KEY)
    except ValueError as err:
        raise SecAggError(f"secagg: cannot reconstruct {what} of client {v}: {err}") from err


class SecAggClient:
    """User u of Fig. 4. Each step takes the server's last message and returns u's next one."""

    def __init__(self, uid: int, params: SecAggParams, rng: np.random.Generator) -> None:
        if not 0 <= uid < _SERVER:
            raise ValueError(f"secagg: client id must be in 0..2^32-2 (got {uid})")
        self.uid, self.params, self._rng = uid, params, rng
        # A deployment draws these secrets from os.urandom; a seeded generator makes runs reproducible.
        self._c_sk = X25519PrivateKey.from_private_bytes(rng.bytes(_KEY))
        self._s_sk = X25519PrivateKey.from_private_bytes(rng.bytes(_KEY))
        self._b = rng.bytes(_KEY)
        self._keys: dict[int, tuple[X25519PublicKey, X25519PublicKey]] = {}
        self._own = b""  # u's own share of (s_u, b_u), kept in the clear
        self._cts: dict[int, bytes] = {}  # v in U2 \ u -> ciphertext of v's shares for u

    def advertise(self) -> bytes:
        """Round 0: (c_u^PK, s_u^PK)."""
        return pack(_ADVERTISE, self.uid, [(self.uid, _public(self._c_sk) + _public(self._s_sk))])

    def share_keys(self, key_list: bytes) -> bytes:
        """Round 1: Shamir shares of s_u^SK and b_u for every v in U1, each encrypted for v."""
        _, keys = unpack(key_list, _KEY_LIST)
        _need("AdvertiseKeys", len(keys), self.params.threshold)
        if self.uid not in keys or len(set(keys.values())) != len(keys):
            raise SecAggError(f"secagg: client {self.uid}: key list lacks it or repeats a key")
        if any(len(k) != 2 * _KEY for k in keys.values()):
            raise SecAggError(f"secagg: client {self.uid}: key list holds entries that are not two {_KEY}-byte keys")
        self._keys = {v: (X25519PublicKey.from_public_bytes(k[:_KEY]), X25519PublicKey.from_public_bytes(k[_KEY:]))
                      for v, k in keys.items()}
        u1, t = sorted(keys), self.params.threshold
        s_shares = shamir.split(self._s_sk.private_bytes_raw(), len(u1), t, self._rng)
        records = []
        for v, s_share, b_share in zip(u1, s_shares, shamir.split(self._b, len(u1), t, self._rng)):
            plain = shamir.share_to_bytes(s_share) + shamir.share_to_bytes(b_share)
            if v == self.uid:
                self._own = plain  # Fig. 4 shares over all of U1, u included
            else:
                pair = _PAIR.pack(self.uid, v)  # associated data, and the nonce: u->v and v->u differ
                records.append((v, self._aead(v).encrypt(pair + bytes(4), plain, pair)))
        return pack(_SHARES, self.uid, records)

    def _aead(self, v: int) -> ChaCha20Poly1305:  # one key per unordered pair {u, v}
        return ChaCha20Poly1305(agree(self._c_sk, self._keys[v][0], _SHARE_INFO))

    def masked_input(self, ciphertexts: bytes, x: npt.NDArray[np.floating]) -> bytes:
        """Round 2: y_u = q(x_u) + PRG(b_u) + sum_{v in U2 \\ u} Delta_uv PRG(s_uv) mod R."""
        _, cts = unpack(ciphertexts, _FORWARD)
        _need("ShareKeys", len(cts) + 1, self.params.threshold)
        if self.uid in cts or not set(cts) <= set(self._keys):
            raise SecAggError(f"secagg: client {self.uid} got shares from {sorted(cts)}: not all from others in U1")
        self._cts = cts
        k = ring_bits(self.params.bits, len(self._keys))
        y = quantize(x, self.params.clip, self.params.bits, self._rng) + prg(self._b, x.size, k)
        for v in cts:  # U2 \ {u}: those whose shares arrived
            mask = prg(agree(self._s_sk, self._keys[v][1], _MASK_INFO), x.size, k)
            y = y + mask if self.uid < v else y - mask  # Delta_uv
        y &= np.uint64((1 << k) - 1)
        return pack(_MASKED, self.uid, [(self.uid, y.astype(f"<u{word_bytes(k)}").tobytes())])

    def unmask(self, survivor_list: bytes) -> bytes:
        """Round 3 (Fig. 4's Unmasking): decrypts its shares; a b share per v in U3, an s share per v in U2 \\ U3."""
        _, u3 = unpack(survivor_list, _SURVIVORS)
        _need("MaskedInputCollection", len(u3), self.params.threshold)
        if self.uid not in u3 or not set(u3) <= set(self._cts) | {self.uid}:
            raise SecAggError(f"secagg: client {self.uid}: U3 must hold it and lie within U2")
        shares = {self.uid: self._own}
        for v, ct in self._cts.items():
            pair = _PAIR.pack(v, self.uid)  # the associated data checks Fig. 4's u' = u, v' = v
            try:
                shares[v] = self._aead(v).decrypt(pair + bytes(4), ct, pair)
            except InvalidTag as err:
                raise SecAggError(f"secagg: client {self.uid}: the share from {v} fails authentication") from err
        n = shamir.SHARE_BYTES
        return pack(_UNMASK, self.uid, [(v, b"b" + p[n:]) if v in u3 else (v, b"s" + p[:n]) for v, p in shares.items()])


class SecAggServer:
    """The server of Fig. 4: relays keys and shares, sums masked inputs, removes the masks."""

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self._keys: dict[int, bytes] = {}  # U1: id -> c_pk || s_pk
        self._u2: list[int] = []
        self._y: dict[int, Ring] = {}  # U3: id -> masked input

    def advertise(self, msgs: list[bytes]) -> bytes:
        """End of round 0: U1 and its public keys, broadcast to every client."""
        sent = _collect(msgs, _ADVERTISE, lambda u, r: set(r) == {u} and len(r[u]) == 2 * _KEY, "AdvertiseKeys")
        self._keys = {u: r[u] for u, r in sent.items()}
        _need("AdvertiseKeys", len(self._keys), self.params.threshold)
        return pack(_KEY_LIST, _SERVER, sorted(self._keys.items()))

    def share_keys(self, msgs: list[bytes]) -> dict[int, bytes]:
        """End of round 1: to each v in U2, the shares encrypted for v (their senders name U2)."""
        sent = _collect(msgs, _SHARES, lambda u, r: u in self._keys and set(r) == set(self._keys) - {u}, "ShareKeys")
        self._u2 = sorted(sent)
        _need("ShareKeys", len(self._u2), self.params.threshold)
        return {v: pack(_FORWARD, _SERVER, [(u, sent[u][v]) for u in self._u2 if u != v]) for v in self._u2}

    def masked_input(self, msgs: list[bytes]) -> bytes:
        """End of round 2: keeps the masked inputs y_u and names the survivors U3."""
        k = ring_bits(self.params.bits, len(self._keys))
        word = word_bytes(k)
        sent = _collect(msgs, _MASKED, lambda u, r: u in self._u2 and set(r) == {u} and len(r[u]) % word == 0,
                        "MaskedInputCollection")
        self._y = {u: np.frombuffer(r[u], dtype=f"<u{word}").astype(np.uint64) for u, r in sent.items()}
        if len({y.size for y in self._y.values()}) > 1:
            raise SecAggError(f"secagg: masked inputs differ in length: {sorted({y.size for y in self._y.values()})}")
        _need("MaskedInputCollection", len(self._y), self.params.threshold)
        return pack(_SURVIVORS, _SERVER, [(u, b"") for u in sorted(self._y)])

    def unmask(self, msgs: list[bytes]) -> Ring:
        """End of round 3: sum_{u in U3} x_u mod R. Reconstructs b_u (u in U3) and s_v^SK
        (v in U2 \\ U3) from >= t responders' shares and subtracts PRG(b_u) and the pairwise masks
        sum_{u in U3} Delta_uv PRG(s_uv) left by each dropped v."""
        u3, dropped = sorted(self._y), [v for v in self._u2 if v not in self._y]
        want = {v: (b"b" if v in self._y else b"s") for v in self._u2}  # never both shares of one client

        def ok(u: int, rec: dict[int, bytes]) -> bool:
            kinds = {v: p[:1] for v, p in rec.items()}
            return u in self._y and kinds == want and all(len(p) == 1 + shamir.SHARE_BYTES for p in rec.values())
        sent = _collect(msgs, _UNMASK, ok, "Unmasking")
        _need("Unmasking", len(sent), self.params.threshold, of=len(u3))
        shares = {v: [shamir.share_from_bytes(r[v][1:]) for r in sent.values()] for v in self._u2}
        k = ring_bits(self.params.bits, len(self._keys))
        dim = next(iter(self._y.values())).size
        total = np.zeros(dim, dtype=np.uint64)
        for u in u3:
            total += self._y[u] - prg(_reconstruct(u, "the self-mask seed b", shares[u]), dim, k)
        for v in dropped:
            total -= self._pairwise_masks(v, shares[v], u3, dim, k)
        return total & np.uint64((1 << k) - 1)

    def _pairwise_masks(self, v: int, shares: list[shamir.Share], u3: list[int], dim: int, k: int) -> Ring:
        s_sk = X25519PrivateKey.from_private_bytes(_reconstruct(v, "the mask key s", shares))
        if _public(s_sk) != self._keys[v][_KEY:]:
            raise SecAggError(f"secagg: reconstructed key of dropped client {v} does not match its public key")
        masks = np.zeros(dim, dtype=np.uint64)
        for u in u3:  # survivor u added Delta_uv PRG(s_uv)
            mask = prg(agree(s_sk, X25519PublicKey.from_public_bytes(self._keys[u][_KEY:]), _MASK_INFO), dim, k)
            masks = masks + mask if u < v else masks - mask  # Delta_uv
        return masks


def _check_inputs(vectors: dict[int, np.ndarray], params: SecAggParams,
                  drop_share: set[int], drop_masked: set[int]) -> None:
    if not vectors:
        raise ValueError("secagg: no client vectors")
    if params.threshold > len(vectors):
        raise ValueError(f"secagg: threshold t={params.threshold} exceeds the number of clients n={len(vectors)}")
    ring_bits(params.bits, len(vectors))  # raises when the sum of n values would not fit in 64 bits
    shapes = {u: np.shape(x) for u, x in vectors.items()}
    if len(set(shapes.values())) > 1 or any(len(s) != 1 for s in shapes.values()):
        raise ValueError(f"secagg: vectors must be 1-D and of one length (got shapes {shapes})")
    if nans := {u: int(np.isnan(x).sum()) for u, x in vectors.items() if np.isnan(x).any()}:
        raise ValueError(f"secagg: vectors hold NaN values (client: count {nans})")
    if not (drop_share | drop_masked) <= set(vectors):
        raise ValueError(f"secagg: drop lists name unknown clients {sorted((drop_share | drop_masked) - set(vectors))}")
    if drop_share & drop_masked:
        raise ValueError(f"secagg: clients {sorted(drop_share & drop_masked)} are in both drop lists")


def _timed(cpu_s: dict[str, float], rnd: str, step: Callable[..., _T], *args: object) -> _T:
    start = time.process_time()  # CPU of this process: the parties run one after another
    out = step(*args)
    cpu_s[rnd] += time.process_time() - start
    return out


def secure_sum(vectors: dict[int, np.ndarray], params: SecAggParams, seed: int,
               drop_after_share: Iterable[int] = (), drop_after_masked: Iterable[int] = ()) -> SecAggResult:
    """Run the whole protocol in-process with real client and server objects exchanging serialized byte messages.

    ``drop_after_share``: clients silent after ShareKeys (excluded from the sum; their pairwise masks
    are removed via their reconstructed keys). ``drop_after_masked``: clients whose masked input
    arrived but who do not answer Unmasking (still in the sum). Raises SecAggError when fewer than t
    clients reach a round, ValueError on bad input."""
    drop_share, drop_masked = set(drop_after_share), set(drop_after_masked)
    _check_inputs(vectors, params, drop_share, drop_masked)
    ids = sorted(vectors)
    senders = [u for u in ids if u not in drop_share]  # U3
    clients = {u: SecAggClient(u, params, np.random.default_rng([seed, u])) for u in ids}
    server = SecAggServer(params)
    up = {u: dict.fromkeys(ROUNDS, 0) for u in ids}
    cpu, server_cpu = {u: dict.fromkeys(ROUNDS, 0.0) for u in ids}, dict.fromkeys(ROUNDS, 0.0)

    def send(rnd: str, who: list[int], step: Callable[[SecAggClient], bytes]) -> list[bytes]:
        msgs = [_timed(cpu[u], rnd, step, clients[u]) for u in who]
        for u, msg in zip(who, msgs):
            up[u][rnd] += len(msg)
        return msgs

    keys = _timed(server_cpu, "advertise", server.advertise, send("advertise", ids, SecAggClient.advertise))
    shared = _timed(server_cpu, "share", server.share_keys, send("share", ids, lambda c: c.share_keys(keys)))
    masked = send("masked", senders, lambda c: c.masked_input(shared[c.uid], vectors[c.uid]))
    u3_msg = _timed(server_cpu, "masked", server.masked_input, masked)
    answers = send("unmask", [u for u in senders if u not in drop_masked], lambda c: c.unmask(u3_msg))
    ring_total = _timed(server_cpu, "unmask", server.unmask, answers)
    down = {u: {"advertise": len(keys), "share": len(shared[u]), "masked": 0,
                "unmask": len(u3_msg) if u in senders else 0} for u in ids}
    return SecAggResult(
        total=dequantize_sum(ring_total, len(senders), params.clip, params.bits),
        survivors=senders, dropped=sorted(drop_share),
        traffic={u: SecAggTraffic(up=up[u], down=down[u]) for u in ids}, rounds=len(ROUNDS),
        cpu_s={u: sum(c.values()) for u, c in cpu.items()}, server_cpu_s=sum(server_cpu.values()),
        round_cpu_s=cpu, server_round_cpu_s=server_cpu)
