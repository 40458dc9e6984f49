"""Generated Wi-Fi activity CSI: a geometric room channel with a moving person in it.

A second, larger sensing source beside the real Intel 5300 recordings. A window is ``frames``
CSI snapshots taken at ``packet_rate_hz`` on the 30 Intel-grouped subcarriers of a 20 MHz
(or 40 MHz) 802.11n channel, between ``n_tx`` transmit and ``n_rx`` receive antennas, each a
ULA along the room's y axis with half-wavelength spacing (so angles of arrival and departure
show as phase differences across antennas). For packet t, subcarrier k (frequency
f_k = f_c + s_k * 312.5 kHz, s_k Intel's tone index), receive antenna m and transmit antenna n::

    H_t[k,m,n] = e^{j(phi_t - 2 pi (f_k - f_c) delta_t)} g ( S[k,m,n] + B_t[k,m,n] ) + w_t[k,m,n]

* Static room S: a sum of ``static_paths`` paths, S = sum_p a_p e^{-j 2 pi f_k L_p / c}, with the
  exact length L_p[m,n] per antenna pair. First the line of sight, a = lambda / (4 pi L); then
  the first-order reflections off the 6 surfaces of the box room (image method: L = |rx_m -
  image of tx_n|), nearest first, a = Gamma lambda / (4 pi L) with Gamma = rho e^{j theta},
  rho ~ U(0.2, 0.7), theta ~ U(0, 2 pi) per window (the wall material); beyond 7, furniture:
  point scatterers at uniform random positions, bistatic as below with RCS ~ U(0.05, 0.5) m^2.
* Person B: a few point reflectors b on the body (chest; two knees; a hand when waving) at
  p_b(t): B_t = sum_b a_b e^{-j 2 pi f_k (|p_b - tx_n| + |p_b - rx_m|) / c}, with the bistatic
  radar amplitude a_b = sqrt(sigma_b) lambda / ((4 pi)^{3/2} d_tx d_rx) (distances floored at
  0.5 m), RCS sigma_b ~ U(0.4, 1.0) m^2 (chest), U(0.08, 0.2) (knee), U(0.1, 0.25) (hand).
  The phase follows the path length, so the motion's Doppler is f_D = -(1/lambda) dL/dt, which is
  ``doppler_hz`` = 2 v f_c / c for a reflector approaching co-located antennas at speed v.
  Every body point also sways (3 sinusoids per axis, 0.05-0.7 Hz, ~5 mm) and the chest breathes
  (3 mm along the facing direction, 0.2-0.4 Hz), so even a still person is not perfectly static.
* g = 1 / sqrt(mean |S|^2): the static room has unit power per resource element; the noise w is
  CN(0, 10^(-snr_db/10)) per element (none for snr_db = inf).
* Intel-like impairments (``phase_noise``): per packet a phase offset phi_t ~ U(-pi, pi) common to
  all subcarriers and antennas (carrier frequency offset) and a timing offset delta_t ~
  N(0, timing_jitter_ns) (packet detection delay, a phase slope across subcarriers). Both are
  pure phase, so |H| and amplitude features carry the motion unchanged.

Activities (person height ~ U(1.55, 1.90) m, standing at a uniform position 0.5 m or more from the
walls, facing a uniform direction; the motion's start time is uniform with the motion inside
the window where it fits, the window inside the motion where it does not):

* ``empty``: the static room only, so |H| is constant over time apart from noise.
* ``walking``: a straight path at 0.5-1.5 m/s in a uniform direction from a uniform start, folded
  back at the walls; the chest bobs 1.5 cm at the step rate, the knees swing +-15 cm.
* ``falling``: standing, then over 0.5-1.0 s the body falls forward (accelerating, s(u) = u^2):
  chest to 0.2 m height and 0.45 x height ahead, knees to the floor; then still on the floor.
* ``sitting``: standing, then over 1.5-2.5 s (smooth, s(u) = (1 - cos pi u) / 2) the chest goes
  down to 0.85 m and 15 cm back, the knees 25 cm forward.
* ``waving``: standing, one hand 35 cm in front of the chest oscillating 10-20 cm at 1-2 Hz.
* ``breathing`` (the respiration task, ``generate_breathing_set``; not an activity class): standing
  still, swaying 1 mm instead of 5, the chest moving 3-8 mm along the facing direction at the
  given rate (breaths per minute / 60 Hz). Capture it at a lower packet rate (10 packets/s: 100
  frames are 10 s, several breaths).

Not modelled: shadowing of the line of sight by the body, reflections off the person via walls,
automatic gain control. At the default 100 Hz packet rate Doppler above 50 Hz (a radial speed
over ~1.4 m/s at 5.32 GHz, fast falls) aliases, as it does in real 100 Hz captures.

Why not Sionna's TR 38.901 models (as ``edgelam.channels.csi`` uses): a CDL is a stochastic
cluster profile with no room geometry, and a scatterer cannot move within it; the person's
path must share a geometry with the static paths for their relative phase, delays and angles
to be consistent, so the whole channel is this geometric model, in vectorised numpy.

Deterministic by the ``numpy.random.Generator`` passed in (the caller derives it with
``edgelam.store.rng_for``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

C = 299_792_458.0  # m/s
SPACING_HZ = 312_500.0  # 802.11n subcarrier spacing
CLASSES = ("empty", "walking", "falling", "sitting", "waving")
BREATHING = "breathing"  # a still person breathing at a given rate (the respiration task's windows)

# Intel 5300's reported tones (grouping Ng = 2 at 20 MHz, Ng = 4 at 40 MHz).
INTEL_TONES_20 = np.r_[np.arange(-28, -1, 2), -1, np.arange(1, 28, 2), 28]
INTEL_TONES_40 = np.r_[np.arange(-58, -1, 4), np.arange(2, 59, 4)]

MARGIN_M = 0.5  # a person keeps this far from the walls
MIN_RANGE_M = 0.5  # distances in the path amplitude are floored here (near-field guard)


def _vec3(value: Sequence[float], name: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 3 numbers (x, y, z) in metres, got {value!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be 3 finite numbers (x, y, z) in metres, got {value!r}")
    return out[0], out[1], out[2]


@dataclass(frozen=True)
class RoomConfig:
    """The room, the radio and the capture: all a generated window depends on besides the draw."""

    room_m: tuple[float, float, float] = (6.0, 5.0, 3.0)  # box [0, x] x [0, y] x [0, z]
    tx_m: tuple[float, float, float] = (0.5, 2.5, 1.2)  # centre of the transmit ULA
    rx_m: tuple[float, float, float] = (5.5, 2.5, 1.2)  # centre of the receive ULA
    carrier_ghz: float = 5.32
    bandwidth_mhz: float = 20.0  # 20 or 40
    subcarriers: int = 30  # 30: Intel 5300's tones; otherwise evenly spread over the band
    n_rx: int = 2
    n_tx: int = 2
    packet_rate_hz: float = 100.0
    frames: int = 200  # CSI snapshots per window
    snr_db: float = 25.0  # per element against the static room's power; inf: no noise
    static_paths: int = 7  # LOS, then wall reflections (6), then furniture scatterers
    phase_noise: bool = True  # Intel-like per-packet phase and timing offsets
    timing_jitter_ns: float = 25.0  # std of the per-packet timing offset when phase_noise

    def __post_init__(self) -> None:
        for name in ("room_m", "tx_m", "rx_m"):
            object.__setattr__(self, name, _vec3(getattr(self, name), name))
        room = np.asarray(self.room_m)
        if room[0] < 2 * MARGIN_M + 0.5 or room[1] < 2 * MARGIN_M + 0.5 or room[2] < 2.0:
            raise ValueError(f"room {list(self.room_m)} m must be at least 1.5 x 1.5 x 2.0 m")
        if not self.carrier_ghz > 0:
            raise ValueError(f"carrier_ghz must be > 0, got {self.carrier_ghz}")
        if self.bandwidth_mhz not in (20.0, 40.0):
            raise ValueError(f"bandwidth_mhz must be 20 or 40, got {self.bandwidth_mhz}")
        least_of = {"subcarriers": 1, "n_rx": 1, "n_tx": 1, "static_paths": 1, "frames": 2}
        for name, least in least_of.items():
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value}")
            object.__setattr__(self, name, int(value))
        if not (self.packet_rate_hz > 0 and math.isfinite(self.packet_rate_hz)):
            raise ValueError(f"packet_rate_hz must be finite and > 0, got {self.packet_rate_hz}")
        if math.isnan(self.snr_db) or self.snr_db == -math.inf:
            raise ValueError(f"snr_db must be a number or inf, got {self.snr_db}")
        if not (self.timing_jitter_ns >= 0 and math.isfinite(self.timing_jitter_ns)):
            raise ValueError(f"timing_jitter_ns must be finite and >= 0, got {self.timing_jitter_ns}")
        for name in ("tx_m", "rx_m"):
            count = self.n_tx if name == "tx_m" else self.n_rx
            ends = _ula(getattr(self, name), count, self.wavelength_m)
            if np.any(ends <= 0) or np.any(ends >= room):
                raise ValueError(f"{name} {list(getattr(self, name))} (with its {count} antennas) must lie "
                                 f"inside the room {list(self.room_m)}")

    @property
    def wavelength_m(self) -> float:
        return C / (self.carrier_ghz * 1e9)

    @property
    def duration_s(self) -> float:
        return self.frames / self.packet_rate_hz

    @property
    def subcarrier_offsets_hz(self) -> np.ndarray:
        """f_k - f_c per subcarrier: Intel 5300's tones for 30, else evenly over the occupied band."""
        if self.subcarriers == 30:
            tones = INTEL_TONES_20 if self.bandwidth_mhz == 20.0 else INTEL_TONES_40
        else:
            edge = 28 if self.bandwidth_mhz == 20.0 else 58
            tones = np.linspace(-edge, edge, self.subcarriers) if self.subcarriers > 1 else np.zeros(1)
        return tones.astype(np.float64) * SPACING_HZ


def doppler_hz(speed_mps: float, carrier_ghz: float) -> float:
    """Doppler shift 2 v f_c / c of a reflector approaching co-located tx and rx at ``speed_mps``."""
    if not carrier_ghz > 0:
        raise ValueError(f"carrier_ghz must be > 0, got {carrier_ghz}")
    return 2.0 * speed_mps * carrier_ghz * 1e9 / C


def _ula(centre: Sequence[float], count: int, wavelength: float) -> np.ndarray:
    """(count, 3) element positions: a half-wavelength ULA along y centred on ``centre``."""
    offsets = (np.arange(count) - (count - 1) / 2) * wavelength / 2
    return np.asarray(centre, dtype=np.float64) + offsets[:, None] * np.array([0.0, 1.0, 0.0])


def _bistatic(points: np.ndarray, sqrt_rcs: np.ndarray, tx: np.ndarray, rx: np.ndarray,
              wavelength: float) -> tuple[np.ndarray, np.ndarray]:
    """(path lengths, amplitudes), both (..., rx, tx), of point reflectors at ``points`` (..., 3)."""
    d_tx = np.linalg.norm(points[..., None, :] - tx, axis=-1)  # (..., n_tx)
    d_rx = np.linalg.norm(points[..., None, :] - rx, axis=-1)  # (..., n_rx)
    length = d_rx[..., :, None] + d_tx[..., None, :]
    spread = np.maximum(d_rx, MIN_RANGE_M)[..., :, None] * np.maximum(d_tx, MIN_RANGE_M)[..., None, :]
    amp = sqrt_rcs[..., None, None] * wavelength / ((4 * np.pi) ** 1.5 * spread)
    return length, amp


def _static_paths(cfg: RoomConfig, rng: np.random.Generator, tx: np.ndarray,
                  rx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, complex amplitudes), both (static_paths, n_rx, n_tx)."""
    lam = cfg.wavelength_m
    room = np.asarray(cfg.room_m)
    los = np.linalg.norm(rx[:, None] - tx[None], axis=-1)
    images = []
    for axis in range(3):
        for wall in (0.0, room[axis]):
            image = tx.copy()
            image[:, axis] = 2 * wall - tx[:, axis]
            images.append(image)
    walls = np.linalg.norm(rx[None, :, None] - np.stack(images)[:, None], axis=-1)  # (6, rx, tx)
    walls = walls[np.argsort(walls.mean(axis=(1, 2)), kind="stable")][: cfg.static_paths - 1]
    gamma = rng.uniform(0.2, 0.7, len(walls)) * np.exp(1j * rng.uniform(0, 2 * np.pi, len(walls)))
    lengths = [los[None], walls]
    amps = [lam / (4 * np.pi * los[None]), gamma[:, None, None] * lam / (4 * np.pi * walls)]
    extra = cfg.static_paths - 1 - len(walls)
    if extra > 0:
        where = rng.uniform(0.3, room - 0.3, (extra, 3))
        length, amp = _bistatic(where, np.sqrt(rng.uniform(0.05, 0.5, extra)), tx, rx, lam)
        lengths.append(length)
        amps.append(amp * np.exp(1j * rng.uniform(0, 2 * np.pi, extra))[:, None, None])
    return np.concatenate(lengths), np.concatenate(amps)


def _fold(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``u`` reflected back into [lo, hi] (a straight walk bouncing off the walls)."""
    width = hi - lo
    return lo + width - np.abs(width - np.mod(u - lo, 2 * width))


def _onset(rng: np.random.Generator, duration: float, window: float) -> float:
    """Start time of a ``duration`` motion: inside the window (10 % margins) where it fits."""
    lo, hi = 0.1 * window, window - duration - 0.1 * window
    if hi < lo:
        lo, hi = min(0.0, window - duration), max(0.0, window - duration)
    return float(rng.uniform(lo, hi))


def _body(cfg: RoomConfig, activity: str, rng: np.random.Generator,
          walk: tuple[np.ndarray, np.ndarray] | None, breath_bpm: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(positions (frames, points, 3), sqrt of each point's RCS (points,)) of the person."""
    t = np.arange(cfg.frames) / cfg.packet_rate_hz
    room = np.asarray(cfg.room_m)
    height = rng.uniform(1.55, 1.90)
    angle = rng.uniform(-np.pi, np.pi)
    face = np.array([np.cos(angle), np.sin(angle), 0.0])
    side = np.array([-face[1], face[0], 0.0])
    up = np.array([0.0, 0.0, 1.0])
    where = np.r_[rng.uniform(MARGIN_M, room[:2] - MARGIN_M), 0.0]
    chest = np.broadcast_to(where + 0.72 * height * up, (cfg.frames, 3)).copy()
    knee = np.broadcast_to(where + 0.28 * height * up, (cfg.frames, 3)).copy()
    knees = [knee + 0.1 * side, knee - 0.1 * side]
    rcs = [rng.uniform(0.4, 1.0), rng.uniform(0.08, 0.2), rng.uniform(0.08, 0.2)]

    if activity == "walking":
        if walk is None:
            speed = rng.uniform(0.5, 1.5)
            velocity = speed * face
            start = chest[0]
        else:
            start, velocity = walk
            speed = float(np.linalg.norm(velocity[:2]))
        path = start + t[:, None] * velocity
        for axis in (0, 1):
            path[:, axis] = _fold(path[:, axis], MARGIN_M, room[axis] - MARGIN_M)
        heading = np.gradient(path, axis=0)
        heading[:, 2] = 0.0
        norm = np.linalg.norm(heading, axis=1, keepdims=True)
        heading = np.where(norm > 1e-12, heading / np.maximum(norm, 1e-12), face)
        lateral = np.stack([-heading[:, 1], heading[:, 0], np.zeros(cfg.frames)], axis=1)
        steps = speed / (0.41 * height)  # steps per second
        phase = rng.uniform(0, 2 * np.pi)
        chest = path + 0.015 * np.sin(2 * np.pi * steps * t + phase)[:, None] * up
        ground = path.copy()
        ground[:, 2] *= 0.28 / 0.72  # knee height, in proportion to the chest's
        swing = 0.15 * np.sin(np.pi * steps * t + phase)[:, None] * heading
        knees = [ground + 0.1 * lateral + swing, ground - 0.1 * lateral - swing]
    elif activity in ("falling", "sitting"):
        fall = activity == "falling"
        duration = rng.uniform(0.5, 1.0) if fall else rng.uniform(1.5, 2.5)
        u = np.clip((t - _onset(rng, duration, cfg.duration_s)) / duration, 0.0, 1.0)
        s = (u**2 if fall else (1 - np.cos(np.pi * u)) / 2)[:, None]
        if fall:
            chest_to = 0.45 * height * face + (0.2 - 0.72 * height) * up
            knee_to = 0.25 * height * face + (0.1 - 0.28 * height) * up
        else:
            chest_to = -0.15 * face + (0.85 - 0.72 * height) * up
            knee_to = 0.25 * face + (0.5 - 0.28 * height) * up
        chest = chest + s * chest_to
        knees = [k + s * knee_to for k in knees]
    points = [chest, *knees]
    if activity == "waving":
        rate, reach = rng.uniform(1.0, 2.0), rng.uniform(0.1, 0.2)
        tilt = rng.uniform(0, np.pi / 2)
        direction = np.cos(tilt) * side + np.sin(tilt) * up
        swing = reach * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
        points.append(chest + 0.35 * face + 0.1 * side + swing[:, None] * direction)
        rcs.append(rng.uniform(0.1, 0.25))

    pos = np.stack(points, axis=1)  # (frames, points, 3)
    n = pos.shape[1]
    still = activity == BREATHING  # a person sitting still for a breathing measurement sways less
    freq = rng.uniform(0.05, 0.7, (n, 3, 3))  # (point, axis, component)
    amp = rng.normal(0.0, (0.001 if still else 0.005) / np.sqrt(3), (n, 3, 3))
    sway = amp * np.sin(2 * np.pi * freq * t[:, None, None, None] + rng.uniform(0, 2 * np.pi, (n, 3, 3)))
    pos = pos + sway.sum(axis=-1)
    depth = rng.uniform(0.003, 0.008) if still else 0.003
    rate = breath_bpm / 60.0 if breath_bpm is not None else rng.uniform(0.2, 0.4)
    breath = depth * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
    pos[:, 0] += breath[:, None] * face
    return pos, np.sqrt(np.asarray(rcs))


def _check_rng(rng: np.random.Generator) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (see edgelam.store.rng_for), "
                        f"got {type(rng).__name__}")


def generate_window(cfg: RoomConfig, activity: str, rng: np.random.Generator, *,
                    walk: tuple[Sequence[float], Sequence[float]] | None = None,
                    breath_bpm: float | None = None) -> np.ndarray:
    """One window of ``activity``: complex64 (frames, subcarriers, n_rx, n_tx).

    ``walk`` = (chest start (x, y, z) m, velocity (vx, vy, vz) m/s) fixes a ``walking`` path
    instead of drawing one (it is still folded back at 0.5 m from the walls). ``breathing``
    (a person standing still, breathing at ``breath_bpm`` breaths per minute) needs
    ``breath_bpm``; no other activity takes it.
    """
    if activity not in (*CLASSES, BREATHING):
        raise ValueError(f"activity '{activity}' must be one of {[*CLASSES, BREATHING]}")
    if (activity == BREATHING) != (breath_bpm is not None):
        raise ValueError(f"breath_bpm is given exactly for activity '{BREATHING}' (activity '{activity}', "
                         f"breath_bpm {breath_bpm})")
    if breath_bpm is not None and not (0 < breath_bpm < 30 * cfg.packet_rate_hz and math.isfinite(breath_bpm)):
        raise ValueError(f"breath_bpm must be in (0, {30 * cfg.packet_rate_hz:g}) (below the Nyquist rate of "
                         f"{cfg.packet_rate_hz:g} packets/s), got {breath_bpm}")
    _check_rng(rng)
    fixed: tuple[np.ndarray, np.ndarray] | None = None
    if walk is not None:
        if activity != "walking":
            raise ValueError(f"walk fixes a walking path; activity is '{activity}'")
        if len(walk) != 2:
            raise ValueError("walk must be (start (x, y, z), velocity (vx, vy, vz))")
        fixed = (np.asarray(_vec3(walk[0], "walk start")), np.asarray(_vec3(walk[1], "walk velocity")))
    lam = cfg.wavelength_m
    tx, rx = _ula(cfg.tx_m, cfg.n_tx, lam), _ula(cfg.rx_m, cfg.n_rx, lam)
    f = cfg.carrier_ghz * 1e9 + cfg.subcarrier_offsets_hz  # (subcarriers,)

    length, amp = _static_paths(cfg, rng, tx, rx)
    static = np.einsum("pmn,kpmn->kmn", amp, np.exp(-2j * np.pi * f[:, None, None, None] * length / C))
    gain = 1.0 / np.sqrt(np.mean(np.abs(static) ** 2))
    h = np.broadcast_to(static * gain, (cfg.frames, *static.shape))
    if activity != "empty":
        pos, sqrt_rcs = _body(cfg, activity, rng, fixed, breath_bpm)
        length, amp = _bistatic(pos, sqrt_rcs, tx, rx, lam)  # (frames, points, rx, tx)
        cycles = (cfg.carrier_ghz * 1e9 / C) * length  # hundreds of cycles: wrapped in float64
        offset = (2 * np.pi / C) * cfg.subcarrier_offsets_hz[:, None, None, None] * length[:, None]
        # (frames, subcarriers, points, rx, tx)
        angle = (2 * np.pi * (cycles - np.round(cycles)))[:, None] + offset
        angle = angle.astype(np.float32)
        weight = (gain * amp[:, None]).astype(np.float32)
        h = h + (np.sum(weight * np.cos(angle), axis=2) - 1j * np.sum(weight * np.sin(angle), axis=2))
    if cfg.phase_noise:
        phi = rng.uniform(-np.pi, np.pi, cfg.frames)
        delta = rng.normal(0.0, cfg.timing_jitter_ns * 1e-9, cfg.frames)
        rot = np.exp(1j * (phi[:, None] - 2 * np.pi * cfg.subcarrier_offsets_hz * delta[:, None]))
        h = h * rot[:, :, None, None]
    out = np.array(h, dtype=np.complex64)
    if math.isfinite(cfg.snr_db):
        sigma = math.sqrt(10 ** (-cfg.snr_db / 10) / 2)
        noise = rng.standard_normal((*out.shape, 2), dtype=np.float32)
        out += sigma * (noise[..., 0] + 1j * noise[..., 1])
    return out


def generate_set(cfg: RoomConfig, per_class: int, rng: np.random.Generator,
                 classes: Sequence[str] = CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` windows of each of ``classes``, in class order (not shuffled).

    Returns (windows complex64 (len(classes) * per_class, frames, subcarriers, n_rx, n_tx),
    labels int64: the index of each window's activity in ``classes``).
    """
    if int(per_class) != per_class or per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1, got {per_class}")
    classes = tuple(classes)
    unknown = [c for c in classes if c not in CLASSES]
    if not classes or unknown or len(set(classes)) != len(classes):
        raise ValueError(f"classes {list(classes)} must be distinct names from {list(CLASSES)}")
    _check_rng(rng)
    shape = (cfg.frames, cfg.subcarriers, cfg.n_rx, cfg.n_tx)
    windows = np.empty((len(classes) * per_class, *shape), dtype=np.complex64)
    for i in range(len(windows)):
        windows[i] = generate_window(cfg, classes[i // per_class], rng)
    return windows, np.repeat(np.arange(len(classes), dtype=np.int64), per_class)


def generate_breathing_set(cfg: RoomConfig, count: int, rng: np.random.Generator,
                           bpm: tuple[float, float] = (8.0, 24.0)) -> tuple[np.ndarray, np.ndarray]:
    """``count`` windows of a still person breathing at a rate uniform in ``bpm`` (breaths per minute).

    Returns (windows complex64 (count, frames, subcarriers, n_rx, n_tx), rates float64 (count,) bpm).
    """
    if int(count) != count or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count}")
    lo, hi = (float(b) for b in bpm)
    if not 0 < lo <= hi:
        raise ValueError(f"bpm must be (low, high) with 0 < low <= high, got {bpm}")
    _check_rng(rng)
    rates = rng.uniform(lo, hi, int(count))
    windows = np.empty((int(count), cfg.frames, cfg.subcarriers, cfg.n_rx, cfg.n_tx), dtype=np.complex64)
    for i, r in enumerate(rates):
        windows[i] = generate_window(cfg, BREATHING, rng, breath_bpm=float(r))
    return windows, rates
