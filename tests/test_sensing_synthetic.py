"""Generated activity CSI: shapes and determinism, a static empty room, Doppler of a radial walk
at 2 v f / c, a fall's burst, and classes told apart by a nearest-centroid on amplitude features."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgelam.sensing.synthetic import (
    CLASSES,
    RoomConfig,
    doppler_hz,
    generate_set,
    generate_window,
)

CLEAN = RoomConfig(snr_db=40.0, phase_noise=False)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("activity", CLASSES)
def test_window_shape_dtype_and_determinism(activity: str) -> None:
    cfg = RoomConfig(frames=50)
    a = generate_window(cfg, activity, rng(1))
    assert a.shape == (50, 30, 2, 2) and a.dtype == np.complex64 and np.all(np.isfinite(a))
    assert np.array_equal(a, generate_window(cfg, activity, rng(1)))
    assert not np.allclose(a, generate_window(cfg, activity, rng(2)))
    other = RoomConfig(carrier_ghz=2.4, bandwidth_mhz=40.0, subcarriers=16, n_rx=3, n_tx=1, frames=20)
    assert generate_window(other, activity, rng(1)).shape == (20, 16, 3, 1)


def test_set_in_class_order_and_reproducible() -> None:
    cfg = RoomConfig(frames=20)
    x, y = generate_set(cfg, 3, rng(5), classes=("walking", "empty"))
    assert x.shape == (6, 20, 30, 2, 2) and x.dtype == np.complex64
    assert y.dtype == np.int64 and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(x, generate_set(cfg, 3, rng(5), classes=("walking", "empty"))[0])
    assert not np.array_equal(x, generate_set(cfg, 3, rng(6), classes=("walking", "empty"))[0])
    assert generate_set(cfg, 1, rng(0))[1].tolist() == list(range(len(CLASSES)))


def test_subcarriers_are_intels_tones() -> None:
    off = RoomConfig().subcarrier_offsets_hz
    assert len(off) == 30 and off[0] == -8.75e6 and off[-1] == 8.75e6 and 0.0 not in off
    off40 = RoomConfig(bandwidth_mhz=40.0).subcarrier_offsets_hz
    assert len(off40) == 30 and off40[0] == -58 * 312.5e3 and np.all(np.diff(off40) > 0)


def test_doppler_helper() -> None:
    assert doppler_hz(1.0, 5.32) == pytest.approx(35.49, abs=0.01)
    assert doppler_hz(1.0, 2.4) == pytest.approx(16.01, abs=0.01)
    with pytest.raises(ValueError, match="carrier_ghz"):
        doppler_hz(1.0, 0.0)


def test_empty_room_is_static_and_walking_is_not() -> None:
    def variation(w: np.ndarray) -> float:
        a = np.abs(w)
        return float(a.std(axis=0).mean() / a.mean())

    noisy_phase = RoomConfig(snr_db=40.0)  # per-packet phase offsets leave |H| alone
    for seed in range(3):
        assert variation(generate_window(noisy_phase, "empty", rng(seed))) < 0.02
        assert variation(generate_window(noisy_phase, "walking", rng(seed))) > 0.03
    silent = RoomConfig(snr_db=math.inf, phase_noise=False)
    h = generate_window(silent, "empty", rng(0))
    assert np.allclose(h, h[0], atol=1e-6)  # no noise: exactly constant
    assert float(np.mean(np.abs(h) ** 2)) == pytest.approx(1.0, rel=1e-4)  # unit static power


def test_phase_noise_keeps_amplitudes() -> None:
    for activity in ("walking", "falling"):
        plain = generate_window(RoomConfig(snr_db=math.inf, phase_noise=False), activity, rng(3))
        impaired = generate_window(RoomConfig(snr_db=math.inf, phase_noise=True), activity, rng(3))
        assert np.allclose(np.abs(plain), np.abs(impaired), atol=1e-5)
        assert not np.allclose(plain, impaired)


@pytest.mark.parametrize(("start_x", "vx"), [(5.2, -1.0), (5.0, -0.6), (2.0, 0.8)])
def test_walking_doppler_matches_radial_speed(start_x: float, vx: float) -> None:
    # tx and rx side by side at chest height; the chest walks straight at them (or away) along x
    cfg = RoomConfig(tx_m=(0.5, 2.45, 1.25), rx_m=(0.5, 2.55, 1.25), snr_db=40.0, phase_noise=False)
    for seed in range(2):
        w = generate_window(cfg, "walking", rng(seed), walk=((start_x, 2.5, 1.25), (vx, 0.0, 0.0)))
        moving = (w - w.mean(axis=0)) * np.hanning(cfg.frames)[:, None, None, None]  # static part removed
        power = (np.abs(np.fft.fft(moving, axis=0)) ** 2).sum(axis=(1, 2, 3))
        peak = np.fft.fftfreq(cfg.frames, 1 / cfg.packet_rate_hz)[np.argmax(power)]
        expected = -math.copysign(doppler_hz(abs(vx), cfg.carrier_ghz), vx)  # approaching: positive
        assert peak == pytest.approx(expected, abs=1.0)


def _burst(w: np.ndarray, span: int) -> float:
    """Largest share of the amplitude-change energy inside any ``span`` consecutive frames."""
    e = (np.abs(np.diff(np.abs(w), axis=0)) ** 2).sum(axis=(1, 2, 3))
    return float(np.convolve(e, np.ones(span), "valid").max() / e.sum())


def test_fall_is_a_short_burst() -> None:
    falls = [_burst(generate_window(CLEAN, "falling", rng(s)), 100) for s in range(6)]
    walks = [_burst(generate_window(CLEAN, "walking", rng(s)), 100) for s in range(6)]
    assert min(falls) > 0.8  # a 1 s stretch of the 2 s window holds nearly all the change
    assert np.median(falls) > np.median(walks) + 0.15


def _features(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    a = a / a.mean(axis=1, keepdims=True)
    quarters = np.sort(a.reshape(len(a), 4, -1, *a.shape[2:]).std(axis=2).mean(axis=(2, 3, 4)), axis=1)
    change = (np.diff(a, axis=1) ** 2).mean(axis=(2, 3, 4))
    peak = np.array([np.convolve(c, np.ones(50), "valid").max() / c.sum() for c in change])
    return np.column_stack([np.log(quarters), np.log(change.mean(axis=1)), peak])


def test_classes_are_separable_by_amplitude_features() -> None:
    cfg = RoomConfig()  # default SNR and Intel-like phase noise
    x_train, y_train = generate_set(cfg, 24, rng(10))
    x_test, y_test = generate_set(cfg, 16, rng(11))
    f_train, f_test = _features(x_train), _features(x_test)
    mu, sd = f_train.mean(axis=0), f_train.std(axis=0)
    f_train, f_test = (f_train - mu) / sd, (f_test - mu) / sd
    centroids = np.stack([f_train[y_train == k].mean(axis=0) for k in range(len(CLASSES))])
    pred = np.argmin(((f_test[:, None] - centroids[None]) ** 2).sum(axis=-1), axis=1)
    assert float(np.mean(pred == y_test)) > 2.0 / len(CLASSES)  # chance is 1 / classes
    walking = y_test == CLASSES.index("walking")
    assert float(np.mean(pred[walking] != CLASSES.index("empty"))) > 0.8  # a walk is rarely an empty room


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"room_m": (1.0, 5.0, 3.0)}, "room"),
        ({"room_m": (6.0, 5.0)}, "room_m"),
        ({"tx_m": (7.0, 2.5, 1.0)}, "tx_m"),
        ({"rx_m": (5.5, 0.0, 1.0)}, "rx_m"),
        ({"carrier_ghz": 0.0}, "carrier_ghz"),
        ({"bandwidth_mhz": 80.0}, "bandwidth_mhz"),
        ({"subcarriers": 0}, "subcarriers"),
        ({"n_rx": 0}, "n_rx"),
        ({"frames": 1}, "frames"),
        ({"packet_rate_hz": -1.0}, "packet_rate_hz"),
        ({"snr_db": math.nan}, "snr_db"),
        ({"static_paths": 0}, "static_paths"),
        ({"timing_jitter_ns": -1.0}, "timing_jitter_ns"),
    ],
)
def test_bad_config_is_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RoomConfig(**kwargs)


def test_bad_calls_are_refused() -> None:
    cfg = RoomConfig(frames=10)
    with pytest.raises(ValueError, match="activity 'running'"):
        generate_window(cfg, "running", rng(0))
    with pytest.raises(ValueError, match="walking path"):
        generate_window(cfg, "falling", rng(0), walk=((1, 1, 1), (1, 0, 0)))
    with pytest.raises(ValueError, match="walk velocity"):
        generate_window(cfg, "walking", rng(0), walk=((1, 1, 1), (1, 0)))
    with pytest.raises(TypeError, match="Generator"):
        generate_window(cfg, "empty", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_class"):
        generate_set(cfg, 0, rng(0))
    with pytest.raises(ValueError, match="classes"):
        generate_set(cfg, 1, rng(0), classes=("empty", "empty"))
    with pytest.raises(ValueError, match="classes"):
        generate_set(cfg, 1, rng(0), classes=("jumping",))


def test_more_static_paths_add_furniture() -> None:
    cfg = RoomConfig(static_paths=10, snr_db=math.inf, phase_noise=False, frames=10)
    h = generate_window(cfg, "empty", rng(0))
    assert np.allclose(h, h[0], atol=1e-6) and float(np.mean(np.abs(h) ** 2)) == pytest.approx(1.0, rel=1e-4)
    assert not np.allclose(h, generate_window(RoomConfig(static_paths=7, snr_db=math.inf, phase_noise=False,
                                                         frames=10), "empty", rng(0)))
