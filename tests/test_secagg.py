"""Shamir sharing, quantisation and the SecAgg protocol (Bonawitz et al. CCS 2017, Fig. 4)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import chisquare

from edgelam.privacy import shamir
from edgelam.privacy.secagg import (SecAggClient, SecAggError, SecAggParams, SecAggServer, dequantize_sum, quantize,
                                    ring_bits, secure_sum)

HEADER = 9 + 8  # message header (kind, sender, count) + one record header (id, length)


def _vectors(n: int, dim: int, seed: int = 0, scale: float = 0.9) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.uniform(-scale, scale, dim) for u in range(n)}


def _step(params: SecAggParams, n: int) -> float:
    return n * 2 * params.clip / (2**params.bits - 1)  # n stochastic roundings, each off by < one level


# --- Shamir ---


def test_shamir_any_t_of_n_reconstructs() -> None:
    rng = np.random.default_rng(1)
    secret = rng.bytes(32)
    shares = shamir.split(secret, 5, 3, rng)
    for k in (3, 4, 5):
        for subset in itertools.combinations(shares, k):
            assert shamir.combine(subset, 32) == secret


def test_shamir_t_minus_one_shares_give_another_value() -> None:
    rng = np.random.default_rng(2)
    secret = rng.bytes(32)
    shares = shamir.split(secret, 5, 3, rng)
    for pair in itertools.combinations(shares, 2):
        assert shamir.interpolate_at_zero(pair) != int.from_bytes(secret, "big")
        with pytest.raises(ValueError, match="does not fit in 32 bytes"):
            shamir.combine(pair, 32)


def test_shamir_lagrange_by_hand() -> None:
    # f(x) = 7 + 3x: points (1, 10), (2, 13), (4, 19); any two give f(0) = 7
    assert shamir.interpolate_at_zero([(1, 10), (2, 13)]) == 7
    assert shamir.interpolate_at_zero([(4, 19), (1, 10)]) == 7
    # t = 1: every share is the secret itself
    assert shamir.split(b"\x05", 3, 1, np.random.default_rng(0)) == [(1, 5), (2, 5), (3, 5)]


def test_shamir_share_bytes_round_trip() -> None:
    share = shamir.split(b"k" * 32, 4, 2, np.random.default_rng(3))[3]
    data = shamir.share_to_bytes(share)
    assert len(data) == shamir.SHARE_BYTES == 70
    assert shamir.share_from_bytes(data) == share


@pytest.mark.parametrize("call, match", [
    (lambda: shamir.split(b"s", 3, 4, np.random.default_rng(0)), "1 <= t <= n"),
    (lambda: shamir.split(b"s", 3, 0, np.random.default_rng(0)), "1 <= t <= n"),
    (lambda: shamir.split(bytes(65), 3, 2, np.random.default_rng(0)), "at most 64 bytes"),
    (lambda: shamir.interpolate_at_zero([(1, 2), (1, 3)]), "distinct"),
    (lambda: shamir.interpolate_at_zero([]), "at least one share"),
    (lambda: shamir.interpolate_at_zero([(0, 2)]), "x != 0"),
    (lambda: shamir.share_from_bytes(b"short"), "70 bytes"),
])
def test_shamir_bad_parameters_raise(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# --- quantisation ---


def test_quantize_clips_and_hits_the_end_levels() -> None:
    q = quantize(np.array([-1.0, 1.0, -5.0, 5.0, 0.0]), clip=1.0, bits=2, rng=np.random.default_rng(0))
    assert q[:4].tolist() == [0, 3, 0, 3] and q[4] in (1, 2)  # 0 maps to level 1.5: rounds to 1 or 2
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([0.0, np.nan]), 1.0, 8, np.random.default_rng(0))


def test_quantize_round_trip_error_bound() -> None:
    params, n = SecAggParams(threshold=2, bits=8, clip=0.5), 5
    xs = _vectors(n, 2000, seed=4, scale=0.7)  # some values beyond clip: compared to the clipped sum
    rng = np.random.default_rng(5)
    total = sum(quantize(x, params.clip, params.bits, rng) for x in xs.values())
    got = dequantize_sum(total, n, params.clip, params.bits)
    want = sum(np.clip(x, -params.clip, params.clip) for x in xs.values())
    assert np.abs(got - want).max() <= _step(params, n)
    assert np.abs(got - want).max() > _step(params, n) / 10  # 8 bits: the error is visible, the bound is tight


def test_stochastic_rounding_is_unbiased() -> None:
    bits, clip, x, draws = 3, 1.0, 0.123, 200_000
    q = quantize(np.full(draws, x), clip, bits, np.random.default_rng(6))
    level = 2 * clip / (2**bits - 1)
    mean = dequantize_sum(q, 1, clip, bits).mean()
    assert abs(mean - x) < 4 * (level / 2) / np.sqrt(draws)
    nearest = np.round((x + clip) / level) * level - clip  # deterministic rounding is off by ~0.04
    assert abs(nearest - x) > 100 * abs(mean - x)


# --- the protocol ---


def test_secure_sum_equals_plain_sum() -> None:
    params, xs = SecAggParams(threshold=3), _vectors(5, 1000)
    result = secure_sum(xs, params, seed=7)
    assert np.abs(result.total - sum(xs.values())).max() <= _step(params, 5)
    assert result.survivors == [0, 1, 2, 3, 4] and result.dropped == [] and result.rounds == 4
    assert result.total.dtype == np.float64 and result.total.shape == (1000,)
    assert set(result.cpu_s) == set(xs) and all(c >= 0 for c in result.cpu_s.values()) and result.server_cpu_s >= 0
    again = secure_sum(xs, params, seed=7)
    assert np.array_equal(again.total, result.total)  # all secrets derive from the seed


def _masked_inputs(xs: dict[int, np.ndarray], params: SecAggParams, seed: int) -> dict[int, bytes]:
    clients = {u: SecAggClient(u, params, np.random.default_rng([seed, u])) for u in xs}
    server = SecAggServer(params)
    keys = server.advertise([c.advertise() for c in clients.values()])
    forwarded = server.share_keys([c.share_keys(keys) for c in clients.values()])
    return {u: c.masked_input(forwarded[u], xs[u]) for u, c in clients.items()}


def test_single_masked_input_looks_uniform() -> None:
    params, dim = SecAggParams(threshold=3), 4096
    xs = {u: np.random.default_rng(u).normal(0, 0.2, dim) for u in range(5)}
    k = ring_bits(params.bits, 5)  # 19: R = 2^19, sent as uint32
    msg = _masked_inputs(xs, params, seed=8)[0]
    y = np.frombuffer(msg[HEADER:], dtype="<u4").astype(np.int64)
    q = quantize(xs[0], params.clip, params.bits, np.random.default_rng(0)).astype(np.int64)

    def top_bits_p(v: np.ndarray) -> float:  # chi-square of the top 4 bits of Z_R against uniform
        return float(chisquare(np.bincount(v >> (k - 4), minlength=16)).pvalue)

    assert y.max() < 2**k
    assert top_bits_p(y) > 1e-3 and float(chisquare(np.bincount(y & 0xFF, minlength=256)).pvalue) > 1e-3
    assert top_bits_p(q) < 1e-10  # the unmasked quantised vector fails the same test
    assert abs(np.corrcoef(y, xs[0])[0, 1]) < 4 / np.sqrt(dim)


def test_tampered_share_is_rejected() -> None:
    params, xs = SecAggParams(threshold=2), _vectors(3, 10)
    clients = {u: SecAggClient(u, params, np.random.default_rng([9, u])) for u in xs}
    server = SecAggServer(params)
    keys = server.advertise([c.advertise() for c in clients.values()])
    forwarded = server.share_keys([c.share_keys(keys) for c in clients.values()])
    with pytest.raises(SecAggError, match="malformed message"):
        clients[1].masked_input(forwarded[1][:-3], xs[1])
    bad = bytearray(forwarded[0])
    bad[-1] ^= 1  # flip a bit of the last ciphertext's tag: caught when u decrypts, in Unmasking
    survivors = server.masked_input([clients[0].masked_input(bytes(bad), xs[0])] +
                                    [clients[u].masked_input(forwarded[u], xs[u]) for u in (1, 2)])
    assert clients[1].unmask(survivors)
    with pytest.raises(SecAggError, match="share from 2 fails authentication"):
        clients[0].unmask(survivors)


def test_dropout_after_share_keys_sums_the_survivors() -> None:
    params, xs = SecAggParams(threshold=3), _vectors(5, 1000, seed=10)
    result = secure_sum(xs, params, seed=11, drop_after_share=[1, 3])
    assert result.survivors == [0, 2, 4] and result.dropped == [1, 3]
    assert np.abs(result.total - (xs[0] + xs[2] + xs[4])).max() <= _step(params, 3)


def test_dropout_after_masking_keeps_the_input() -> None:
    params, xs = SecAggParams(threshold=3), _vectors(5, 500, seed=12)
    result = secure_sum(xs, params, seed=13, drop_after_masked=[1, 3])
    assert np.abs(result.total - sum(xs.values())).max() <= _step(params, 5)
    both = secure_sum(xs, params, seed=13, drop_after_share=[1], drop_after_masked=[3])
    assert np.abs(both.total - (xs[0] + xs[2] + xs[3] + xs[4])).max() <= _step(params, 4)


def test_too_few_responders_or_survivors_abort() -> None:
    params, xs = SecAggParams(threshold=3), _vectors(5, 50)
    with pytest.raises(SecAggError, match=r"Unmasking: only 2 of 5 survivors responded, below the threshold t=3"):
        secure_sum(xs, params, seed=14, drop_after_masked=[0, 1, 2])
    with pytest.raises(SecAggError, match=r"MaskedInputCollection: only 2 clients responded, below the threshold t=3"):
        secure_sum(xs, params, seed=14, drop_after_share=[0, 1, 2])


def test_traffic_masked_bytes_and_extra_bytes() -> None:
    params = SecAggParams(threshold=3)
    small, large = (secure_sum(_vectors(5, d), params, seed=15) for d in (100, 3000))
    assert large.traffic[0].masked_bytes == HEADER + 3000 * 4  # R = 2^19: uint32 words
    for u in range(5):
        assert small.traffic[u].extra_up == large.traffic[u].extra_up
        assert small.traffic[u].extra_down == large.traffic[u].extra_down
    # by hand, n = 5: keys 9 + 8 + 64; shares 9 + 4 * (8 + 2 * 70 + 16-byte tag); unmask 9 + 5 * (8 + 1 + 70)
    assert small.traffic[0].up == {"advertise": 81, "share": 9 + 4 * 164, "masked": HEADER + 400, "unmask": 9 + 5 * 79}
    assert small.traffic[0].extra_up == 81 + 665 + 404
    more = secure_sum(_vectors(8, 100), params, seed=15)
    assert more.traffic[0].extra_up > small.traffic[0].extra_up
    assert more.traffic[0].extra_down > small.traffic[0].extra_down
    wide = secure_sum(_vectors(5, 100), SecAggParams(threshold=3, bits=30), seed=15)  # R = 2^33: uint64
    assert wide.traffic[0].masked_bytes == HEADER + 100 * 8
    dropped = secure_sum(_vectors(5, 100), params, seed=15, drop_after_share=[2]).traffic[2]
    assert dropped.up["masked"] == dropped.up["unmask"] == dropped.down["unmask"] == 0


@pytest.mark.parametrize("xs, params, kwargs, match", [
    ({0: np.zeros(4), 1: np.zeros(5), 2: np.zeros(4)}, SecAggParams(threshold=2), {}, "one length"),
    ({0: np.zeros(4), 1: np.array([0, np.nan, 0, 0]), 2: np.zeros(4)}, SecAggParams(threshold=2), {}, "NaN"),
    ({0: np.zeros(4), 1: np.zeros(4)}, SecAggParams(threshold=3), {}, "threshold t=3 exceeds .* n=2"),
    ({0: np.zeros(4), 1: np.zeros(4)}, SecAggParams(threshold=2), {"drop_after_share": [7]}, "unknown clients"),
])
def test_bad_input_raises(xs, params, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        secure_sum(xs, params, seed=0, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"threshold": 1}, "threshold must be > 1"),
    ({"threshold": 2, "bits": 0}, "bits must be in 1..48"),
    ({"threshold": 2, "bits": 49}, "bits must be in 1..48"),
    ({"threshold": 2, "clip": float("nan")}, "clip"),
])
def test_bad_params_raise(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SecAggParams(**kwargs)


def test_ring_fits_the_sum() -> None:
    assert ring_bits(16, 1) == 16 and ring_bits(16, 5) == 19 and ring_bits(16, 8) == 19 and ring_bits(16, 9) == 20
    with pytest.raises(ValueError, match="<= 64"):
        ring_bits(48, 2**16 + 1)
