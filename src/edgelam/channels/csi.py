"""CSI data sets generated offline with Sionna's TR 38.901 CDL models, cached on disk.

One *environment* is a CDL profile (A-E) with a delay spread and a UE speed range. The
generator draws ``n`` user realisations of it, uplink, a single-antenna UE and a dual-polarised
BS panel (2 x rows x cols antennas) at ``carrier_ghz``, over ``past + future`` slots of
``slot_ms`` and ``2 * subcarriers`` OFDM subcarriers of ``spacing_khz`` (the first half the
uplink band, the second the adjacent downlink band, as LLM4CP's FDD setting). Each BS antenna
link is one sample (as LLM4CP splits its 32 links), so a realisation gives 2 x rows x cols
samples of shape (slots, 2 * subcarriers), complex, at unit average power per resource element
(Sionna's ``cir_to_ofdm_channel(normalize=True)``) before noise.

Sets are deterministic by (parameters, seed): Sionna draws from ``sionna.phy.config.seed``, set
from the run's seed and the environment's stream, and UE speeds and directions are drawn here
and passed as velocities, so each sample's speed is known. A generated set is written as .npz
under ``$EDGELAM_CACHE/channels`` (default ``~/.cache/edgelam``), named by a hash of its
parameters; a later call with the same parameters reads it back.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgelam.store import Purpose, atomic_write_bytes, rng_for

PROFILES = ("A", "B", "C", "D", "E")
CACHE_VERSION = 1


@dataclass(frozen=True)
class Environment:
    """One propagation environment and the radio around it (the generator's parameters)."""

    profile: str = "C"  # CDL-A..E (A-C NLOS, D-E LOS)
    delay_spread_ns: float = 300.0
    speed_kmh: tuple[float, float] = (10.0, 100.0)
    carrier_ghz: float = 2.4
    subcarriers: int = 48  # per band: uplink, then the adjacent downlink band
    spacing_khz: float = 180.0
    bs_rows: int = 2
    bs_cols: int = 2
    slot_ms: float = 0.5
    slots: int = 20  # past + future

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"CDL profile '{self.profile}' must be one of {list(PROFILES)}")
        lo, hi = self.speed_kmh
        if not 0 <= lo <= hi:
            raise ValueError(f"speed range {list(self.speed_kmh)} km/h must satisfy 0 <= min <= max")
        if min(self.subcarriers, self.bs_rows, self.bs_cols, self.slots) < 1:
            raise ValueError("subcarriers, bs_rows, bs_cols and slots must be >= 1")
        if min(self.delay_spread_ns, self.carrier_ghz, self.spacing_khz, self.slot_ms) <= 0:
            raise ValueError("delay spread, carrier, subcarrier spacing and slot length must be > 0")

    @property
    def antennas(self) -> int:
        return 2 * self.bs_rows * self.bs_cols

    @property
    def name(self) -> str:
        return f"CDL-{self.profile}"


@dataclass(frozen=True)
class CsiSet:
    """``h`` (samples, slots, 2 * subcarriers) complex64; per sample the UE speed (km/h)."""

    env: Environment
    h: np.ndarray
    speed_kmh: np.ndarray

    def __len__(self) -> int:
        return int(self.h.shape[0])


def cache_dir() -> Path:
    return Path(os.environ.get("EDGELAM_CACHE", Path.home() / ".cache" / "edgelam")) / "channels"


def cache_key(env: Environment, users: int, seed: int, stream: int) -> str:
    spec = {"v": CACHE_VERSION, "env": asdict(env), "users": users, "seed": seed, "stream": stream}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def velocities(env: Environment, users: int, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """(speeds in km/h (users,), velocity vectors in m/s (users, 3)): uniform speed in the range,
    a uniform direction in the horizontal plane."""
    rng = rng_for(seed, Purpose.CSI_SPEED, stream)
    speed = rng.uniform(*env.speed_kmh, size=users)
    angle = rng.uniform(-np.pi, np.pi, size=users)
    v = speed[:, None] / 3.6 * np.stack([np.cos(angle), np.sin(angle), np.zeros(users)], axis=1)
    return speed, v


def simulate(env: Environment, users: int, seed: int, stream: int) -> CsiSet:
    """Draw ``users`` realisations of ``env`` with Sionna (no cache)."""
    import torch
    from sionna.phy import config
    from sionna.phy.channel.tr38901 import CDL, PanelArray
    from sionna.phy.channel.utils import cir_to_ofdm_channel, subcarrier_frequencies

    fc = env.carrier_ghz * 1e9
    config.seed = int(rng_for(seed, Purpose.CSI_SIONNA, stream).integers(0, 2**31))
    bs = PanelArray(num_rows_per_panel=env.bs_rows, num_cols_per_panel=env.bs_cols, polarization="dual",
                    polarization_type="cross", antenna_pattern="38.901", carrier_frequency=fc, device="cpu")
    ut = PanelArray(num_rows_per_panel=1, num_cols_per_panel=1, polarization="single", polarization_type="V",
                    antenna_pattern="omni", carrier_frequency=fc, device="cpu")
    speed, v = velocities(env, users, seed, stream)
    cdl = CDL(env.profile, env.delay_spread_ns * 1e-9, fc, ut, bs, direction="uplink",
              ut_velocity=torch.tensor(v, dtype=torch.float32), device="cpu")
    a, tau = cdl(batch_size=users, num_time_steps=env.slots, sampling_frequency=1e3 / env.slot_ms)
    freqs = subcarrier_frequencies(2 * env.subcarriers, env.spacing_khz * 1e3, device="cpu")
    h = cir_to_ofdm_channel(freqs, a, tau, normalize=True)  # (users, 1, ant, 1, 1, slots, subcarriers)
    h = h[:, 0, :, 0, 0].reshape(users * env.antennas, env.slots, 2 * env.subcarriers)
    return CsiSet(env, h.numpy().astype(np.complex64), np.repeat(speed, env.antennas).astype(np.float32))


def generate(env: Environment, users: int, seed: int, stream: int = 0, cache: bool = True) -> CsiSet:
    """``users`` realisations of ``env`` (``users`` x antennas samples), from the cache when there."""
    if users < 1:
        raise ValueError(f"users must be >= 1, got {users}")
    path = cache_dir() / f"{env.name}-{cache_key(env, users, seed, stream)}.npz"
    if cache and path.is_file():
        try:
            with np.load(path) as z:
                return CsiSet(env, z["h"], z["speed_kmh"])
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is regenerated and replaced
    out = simulate(env, users, seed, stream)
    if cache:
        buf = io.BytesIO()
        np.savez(buf, h=out.h, speed_kmh=out.speed_kmh)
        atomic_write_bytes(path, buf.getvalue())
    return out


def add_noise(h: np.ndarray, snr_db: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``h`` plus complex Gaussian noise at ``snr_db`` per sample (against the sample's own mean power)."""
    power = np.mean(np.abs(h) ** 2, axis=tuple(range(1, h.ndim)), keepdims=True)
    sigma2 = power / 10 ** (np.asarray(snr_db, dtype=np.float64).reshape(-1, *[1] * (h.ndim - 1)) / 10)
    noise = rng.standard_normal(h.shape) + 1j * rng.standard_normal(h.shape)
    return (h + np.sqrt(sigma2 / 2) * noise).astype(np.complex64)


def coherence_time_s(speed_kmh: float, carrier_ghz: float) -> float:
    """Coherence time 0.423 c / (v f_c) (Rappaport's 50 % correlation rule); inf at standstill."""
    v = speed_kmh / 3.6
    return float("inf") if v == 0 else 0.423 * 299_792_458.0 / (v * carrier_ghz * 1e9)
