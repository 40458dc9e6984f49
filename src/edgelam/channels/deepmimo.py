"""DeepMIMO v3 ray-traced scenarios as beam-prediction data (Alkhateeb, ITA 2019).

Files (MATLAB v5, one folder per scenario, e.g. ``$EDGELAM_DATA/deepmimo_new_york``):
``params.mat`` (carrier_freq Hz, transmit_power dBm, user_grids rows [first row, last row,
users per row], num_BS), ``BS{b}_UE_{start}-{end}.mat`` (users of base station b) and
``BS{b}_BS.mat`` (BS-to-BS links, unused here). In a UE file, ``channels`` is a 1 x N cell
array of structs whose field ``p`` is an 8 x n_paths float32 matrix, one column per path
(strongest first), rows:

  0 phase (deg)   1 time of arrival (s)   2 received power (dBm, for ``transmit_power`` dBm)
  3 DoA azimuth phi (deg)   4 DoA zenith theta (deg)
  5 DoD azimuth phi (deg)   6 DoD zenith theta (deg)   7 line-of-sight flag (1 = LoS path)

``rx_locs`` is N x 5: x, y, z (m), BS-user distance (m), path loss (dB; 250 = no path);
``tx_loc`` is the BS's x, y, z. Users lie on a row-major grid: a row holds ``users per row``
users 2.5 m apart along x at one y.

How this was verified (new_york, all three BSs): the order is the one DeepMIMO v3's reader
uses (DeepMIMO/DeepMIMO-python ``src/DeepMIMOv3/raytracing_v3.py``, ``load_variables``); on
every LoS path the DoD (phi, theta) equals the BS-to-user direction, the DoA the reverse, and
the time of arrival distance / c, within 0.011 deg and 2e-10 s; powers are sorted descending
in every user, and the LoS path, where there is one, is always the first; column 4 of ``rx_locs`` is the *coherent* path loss
-10 log10 |sum_l sqrt(P_l [mW]) e^{j phase_l}|^2 within 1e-3 dB (not the incoherent sum:
up to 30 dB apart), which pins down phase in degrees and power in dBm; column 3 is the 3-D
distance to ``tx_loc`` within 1e-3 m.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from edgelam.data.sources import DataError, data_root

SCENARIO = "deepmimo_new_york"  # the default folder under $EDGELAM_DATA
ROWS = {"phase_deg": 0, "toa_s": 1, "power_dbm": 2, "aoa_phi_deg": 3, "aoa_theta_deg": 4,
        "aod_phi_deg": 5, "aod_theta_deg": 6, "los": 7}
AXES = ("x", "y", "z")


@dataclass(frozen=True, eq=False)
class Scenario:
    """One BS and its users that have at least one path; per-path arrays are (N, L), zero past
    ``n_paths[i]`` (so a zero-power path adds nothing to a sum)."""

    name: str  # e.g. 'deepmimo_new_york BS1'
    grid_index: np.ndarray  # (N,) int64: each user's place on the row-major user grid
    grid_shape: tuple[int, int]  # (rows, users per row)
    position_m: np.ndarray  # (N, 3) x, y, z
    bs_position_m: np.ndarray  # (3,)
    n_paths: np.ndarray  # (N,) int64, >= 1
    power_w: np.ndarray  # (N, L) received power, linear (W)
    phase_deg: np.ndarray  # (N, L)
    toa_s: np.ndarray  # (N, L)
    aod_phi_deg: np.ndarray  # (N, L) azimuth from +x towards +y
    aod_theta_deg: np.ndarray  # (N, L) zenith angle: 90 = horizon, > 90 = downwards
    aoa_phi_deg: np.ndarray  # (N, L)
    aoa_theta_deg: np.ndarray  # (N, L)
    los: np.ndarray  # (N,) bool: one of the paths is line of sight
    pathloss_db: np.ndarray  # (N,) the file's coherent path loss
    carrier_hz: float
    tx_power_dbm: float

    def __len__(self) -> int:
        return len(self.grid_index)


# --- reading the files ---


def _missing(name: str, folder: Path) -> DataError:
    return DataError(f"DeepMIMO file '{name}' not found in '{folder}'; set EDGELAM_DATA to the folder holding "
                     f"'{SCENARIO}/' or pass the scenario folder (params.mat, BS<n>_UE_<a>-<b>.mat)")


def _read_mat(path: Path, folder: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """A .mat file's variables; a DataError if it or one of ``keys`` is missing."""
    if not path.is_file():
        raise _missing(path.name, folder)
    mat = dict(scipy.io.loadmat(path))
    lacking = [k for k in keys if k not in mat]
    if lacking:
        hint = " (dual-polarised scenarios, 'channels_VV' etc., are not supported)" if "channels" in lacking else ""
        raise DataError(f"{path}: no {lacking} among its variables {sorted(k for k in mat if not k.startswith('__'))}"
                        f"{hint}; is this a DeepMIMO v3 scenario?")
    return mat


def _user_files(folder: Path, bs: int) -> list[Path]:
    """The BS's UE files, in user order (DeepMIMO may split users over several files)."""
    files = [(int(m.group(1)), p) for p in folder.glob(f"BS{bs}_UE_*.mat")
             if (m := re.fullmatch(rf"BS{bs}_UE_(\d+)-\d+\.mat", p.name))]
    if not files:
        raise _missing(f"BS{bs}_UE_<first>-<last>.mat", folder)
    return [p for _, p in sorted(files)]


def _grid_shape(params: dict[str, Any], n_users: int, folder: Path) -> tuple[int, int]:
    grids = np.atleast_2d(params["user_grids"]).astype(int)  # rows: [first row, last row, users per row]
    rows = int(np.sum(grids[:, 1] - grids[:, 0] + 1))
    cols = int(grids[0, 2])
    if np.any(grids[:, 2] != cols) or rows * cols != n_users:
        raise DataError(f"{folder}/params.mat: user_grids {grids.tolist()} does not describe one grid of "
                        f"{n_users} users with the same number of users per row")
    return rows, cols


def _read_users(folder: Path, bs: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Every user's 8 x n_paths matrix, rx_locs (N, 5) and tx_loc (3,) of one BS."""
    paths: list[np.ndarray] = []
    locs, tx = [], np.zeros(3)
    for f in _user_files(folder, bs):
        mat = _read_mat(f, folder, ("channels", "rx_locs", "tx_loc"))
        paths += [np.asarray(cell["p"][0, 0], dtype=np.float64).reshape(8, -1) for cell in mat["channels"][0]]
        locs.append(np.asarray(mat["rx_locs"], dtype=np.float64))
        tx = np.asarray(mat["tx_loc"], dtype=np.float64).reshape(3)
    return paths, np.concatenate(locs), tx


def _pad(paths: list[np.ndarray], row: int) -> np.ndarray:
    """(N, L) float64 of one path parameter, zero past each user's paths."""
    out = np.zeros((len(paths), max(p.shape[1] for p in paths)))
    for i, p in enumerate(paths):
        out[i, : p.shape[1]] = p[row]
    return out


def _path_arrays(paths: list[np.ndarray], tx_power_dbm: float) -> dict[str, np.ndarray]:
    """Scenario's per-path fields from users' 8 x n_paths matrices (each with >= 1 path)."""
    n_paths = np.array([p.shape[1] for p in paths], dtype=np.int64)
    present = np.arange(int(n_paths.max()))[None, :] < n_paths[:, None]  # (N, L)
    # DeepMIMO v3 dbm2pow: 10^(P/10 - 3) W, P the path's dBm plus the scenario's transmit power
    power_w = np.where(present, 10 ** ((_pad(paths, ROWS["power_dbm"]) + tx_power_dbm) / 10 - 3), 0.0)
    out = {k: _pad(paths, r) for k, r in ROWS.items() if k not in ("power_dbm", "los")}
    los = np.array([bool(np.any(p[ROWS["los"]] == 1)) for p in paths])
    return out | {"n_paths": n_paths, "power_w": power_w, "los": los}


def load_scenario(folder: Path | None = None, bs: int = 1) -> Scenario:
    """Base station ``bs`` (1-based) of a DeepMIMO v3 scenario and its users with >= 1 path
    (the others have no channel). ``folder`` defaults to ``$EDGELAM_DATA/deepmimo_new_york``."""
    folder = Path(folder) if folder is not None else data_root() / SCENARIO
    params = _read_mat(folder / "params.mat", folder, ("num_BS", "user_grids", "transmit_power", "carrier_freq"))
    n_bs = int(np.asarray(params["num_BS"]).item())
    if not 1 <= bs <= n_bs:
        raise ValueError(f"bs={bs}: the scenario in '{folder}' has base stations 1..{n_bs}")
    paths, locs, tx = _read_users(folder, bs)
    grid_shape = _grid_shape(params, len(paths), folder)
    keep = np.flatnonzero([p.shape[1] > 0 for p in paths])
    if len(keep) == 0:
        raise DataError(f"'{folder}': no user of BS{bs} has a path, so there is no channel to learn from")
    tx_power_dbm = float(np.asarray(params["transmit_power"]).item())
    return Scenario(
        name=f"{folder.name} BS{bs}", grid_index=keep.astype(np.int64), grid_shape=grid_shape,
        position_m=locs[keep, :3], bs_position_m=tx, pathloss_db=locs[keep, 4], tx_power_dbm=tx_power_dbm,
        carrier_hz=float(np.asarray(params["carrier_freq"]).item()),
        **_path_arrays([paths[i] for i in keep], tx_power_dbm),
    )


# --- channels and beams ---


def direction_cosine(theta_deg: np.ndarray, phi_deg: np.ndarray, axis: str = "y") -> np.ndarray:
    """The cosine between a direction (zenith theta, azimuth phi) and the array ``axis``."""
    theta, phi = np.deg2rad(theta_deg), np.deg2rad(phi_deg)
    unit = {"x": np.sin(theta) * np.cos(phi), "y": np.sin(theta) * np.sin(phi), "z": np.cos(theta)}
    if axis not in unit:
        raise ValueError(f"array axis '{axis}' must be one of {list(AXES)}")
    return np.asarray(unit[axis])


def ula_response(u: np.ndarray, n_tx: int, spacing: float = 0.5) -> np.ndarray:
    """Steering vectors (..., n_tx) of a uniform linear array: a_m(u) = exp(j 2 pi d m u), element
    m = 0..n_tx-1 at m * ``spacing`` wavelengths along the axis, u the direction cosine to the
    axis (DeepMIMO v3 ``array_response``, same sign, not normalised)."""
    m = np.arange(n_tx)
    return np.exp(2j * np.pi * spacing * np.asarray(u)[..., None] * m)


def channel_vector(scenario: Scenario, n_tx: int, spacing: float = 0.5, axis: str = "y") -> np.ndarray:
    """(N, n_tx) complex narrowband MISO channel of a ULA at the BS, single-antenna users:
    h = sum_l sqrt(P_l) e^{j phase_l} a(u_l), u_l the direction cosine of path l's departure
    (DoD) to the array axis, as DeepMIMO v3's time-domain channel summed over paths (omni
    elements, no rotation). DeepMIMO v3's BS panel lies in the y-z plane with its rows along y
    (``ant_indices``: the x index is always 0), hence ``axis='y'``. With n_tx = 1,
    10 log10 |h|^2 + 30 = transmit power - the file's path loss (dBm)."""
    if n_tx < 1:
        raise ValueError(f"n_tx={n_tx}: the array needs at least one antenna")
    u = direction_cosine(scenario.aod_theta_deg, scenario.aod_phi_deg, axis)  # (N, L)
    gain = np.sqrt(scenario.power_w) * np.exp(1j * np.deg2rad(scenario.phase_deg))  # (N, L)
    return np.einsum("nl,nlm->nm", gain, ula_response(u, n_tx, spacing))


def beam_directions(n_beams: int) -> np.ndarray:
    """(n_beams,) direction cosines u_i = -1 + (2i + 1) / n_beams: evenly spaced, symmetric."""
    return -1 + (2 * np.arange(n_beams) + 1) / n_beams


def dft_codebook(n_tx: int, n_beams: int | None = None) -> np.ndarray:
    """(n_beams, n_tx) unit-norm beams w_i = a(u_i) / sqrt(n_tx), evenly spaced in u = sin-space
    (half-wavelength ULA). n_beams = n_tx (default) is a unitary DFT basis; more oversamples it."""
    n_beams = n_tx if n_beams is None else n_beams
    if n_tx < 1 or n_beams < 1:
        raise ValueError(f"n_tx={n_tx}, n_beams={n_beams}: both must be >= 1")
    return ula_response(beam_directions(n_beams), n_tx) / np.sqrt(n_tx)


def beam_gains(h: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """(N, B) beamforming gains |w_i^H h|^2 of channels h (N, n_tx) and beams (B, n_tx)."""
    if h.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"channels have {h.shape[-1]} antennas but the codebook's beams {codebook.shape[-1]}")
    return np.abs(h @ codebook.conj().T) ** 2


def oracle_beams(h: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """(N,) int64 best beam of each user: the argmax of its gains."""
    return np.argmax(beam_gains(h, codebook), axis=1).astype(np.int64)


# --- learning data ---


def position_features(scenario: Scenario) -> np.ndarray:
    """(N, 3) user position relative to the BS, divided by the farthest user's distance."""
    rel = scenario.position_m - scenario.bs_position_m
    return rel / np.max(np.linalg.norm(rel, axis=1))


def path_features(scenario: Scenario) -> np.ndarray:
    """(N, 10) position, then the strongest path's DoD (cos phi, sin phi, cos theta), time of
    arrival (us), power (dB above -100 dBm, / 20), LoS flag and path count / 10. The DoD almost
    gives the best beam away: an upper reference, not a fair predictor."""
    phi, theta = np.deg2rad(scenario.aod_phi_deg[:, 0]), np.deg2rad(scenario.aod_theta_deg[:, 0])
    power_dbm = 10 * np.log10(scenario.power_w[:, 0]) + 30
    strongest = np.stack([np.cos(phi), np.sin(phi), np.cos(theta), scenario.toa_s[:, 0] * 1e6,
                          (power_dbm + 100) / 20, scenario.los.astype(float), scenario.n_paths / 10], axis=1)
    return np.concatenate([position_features(scenario), strongest], axis=1)


FEATURES: dict[str, Callable[[Scenario], np.ndarray]] = {"position": position_features, "paths": path_features}


def beam_dataset(scenario: Scenario, n_tx: int, n_beams: int, features: str = "position",
                 axis: str = "y") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Beam prediction samples: features X (N, F) float32, oracle beam y (N,) int64 and every
    beam's gain (N, n_beams) float64 (for the gain loss), on a ``dft_codebook(n_tx, n_beams)``."""
    if features not in FEATURES:
        raise ValueError(f"unknown beam features '{features}'; allowed: {list(FEATURES)}")
    gains = beam_gains(channel_vector(scenario, n_tx, axis=axis), dft_codebook(n_tx, n_beams))
    x = FEATURES[features](scenario).astype(np.float32)
    return x, np.argmax(gains, axis=1).astype(np.int64), gains


def grid_tracks(scenario: Scenario, length: int) -> list[np.ndarray]:
    """User tracks for "next beam from past beams": every window of ``length`` users that are
    neighbours along a grid row (2.5 m apart in x), all with paths; indices into the scenario's
    users. A user without paths ends a run; windows overlap (stride 1)."""
    if length < 2:
        raise ValueError(f"track length {length} must be >= 2 (past beams, then the next one)")
    rows, cols = scenario.grid_shape
    user_at = np.full(rows * cols, -1, dtype=np.int64)
    user_at[scenario.grid_index] = np.arange(len(scenario))
    tracks = []
    for row in user_at.reshape(rows, cols):
        for run in np.split(row, np.flatnonzero(row < 0)):  # each piece: [-1,] users...
            run = run[run >= 0]
            tracks += [run[i : i + length] for i in range(len(run) - length + 1)]
    return tracks
