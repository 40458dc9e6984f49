"""Beam prediction on DeepMIMO: metrics by hand, codebook and channel identities, baselines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import data_dir

from edgelam.channels.beams import (
    MLPBeam,
    NearestNeighbour,
    RepeatLast,
    gain_loss_db,
    gain_loss_db_of_means,
    split_users,
    topk_accuracy,
    user_gain_loss_db,
)
from edgelam.channels.deepmimo import (
    Scenario,
    beam_dataset,
    beam_directions,
    beam_gains,
    channel_vector,
    dft_codebook,
    direction_cosine,
    grid_tracks,
    load_scenario,
    oracle_beams,
)
from edgelam.data.sources import DataError

needs_deepmimo = pytest.mark.skipif(not (data_dir() / "deepmimo_new_york" / "params.mat").is_file(),
                                    reason="DeepMIMO new_york (deepmimo_new_york/) not found; set EDGELAM_DATA")


def one_path_scenario(theta_deg: list[float], phi_deg: list[float], power_w: float = 1.0,
                      phase_deg: float = 0.0, grid_index: list[int] | None = None,
                      grid_shape: tuple[int, int] = (1, 1)) -> Scenario:
    """Users with a single path each, departing at (theta, phi)."""
    n = len(theta_deg)
    col = np.ones((n, 1))
    return Scenario(
        name="synthetic", grid_index=np.array(grid_index if grid_index is not None else range(n)),
        grid_shape=grid_shape, position_m=np.zeros((n, 3)), bs_position_m=np.zeros(3),
        n_paths=np.ones(n, dtype=np.int64), power_w=power_w * col, phase_deg=phase_deg * col, toa_s=0 * col,
        aod_phi_deg=np.array(phi_deg)[:, None], aod_theta_deg=np.array(theta_deg)[:, None],
        aoa_phi_deg=0 * col, aoa_theta_deg=0 * col, los=np.ones(n, dtype=bool), pathloss_db=np.zeros(n),
        carrier_hz=3.5e9, tx_power_dbm=0.0,
    )


@pytest.fixture(scope="module")
def new_york() -> Scenario:
    return load_scenario(data_dir() / "deepmimo_new_york", bs=1)


# --- metrics, by hand ---


def test_topk_accuracy_by_hand() -> None:
    scores = np.array([[0.1, 0.7, 0.2],   # ranking 1, 2, 0
                       [0.5, 0.3, 0.2],   # ranking 0, 1, 2
                       [0.3, 0.3, 0.4]])  # ranking 2, then the tie 0 before 1
    y = np.array([1, 1, 1])
    assert topk_accuracy(scores, y, 1) == pytest.approx(1 / 3)  # only user 0
    assert topk_accuracy(scores, y, 2) == pytest.approx(2 / 3)  # user 1 too; user 2's 2nd is beam 0
    assert topk_accuracy(scores, y, 3) == 1.0
    with pytest.raises(ValueError, match="k=4"):
        topk_accuracy(scores, y, 4)
    with pytest.raises(ValueError, match="labels"):
        topk_accuracy(scores, y[:2], 1)


def test_gain_loss_by_hand() -> None:
    gains = np.array([[1.0, 10.0], [4.0, 4.0], [100.0, 1.0]])
    pred = np.array([0, 1, 1])
    np.testing.assert_allclose(user_gain_loss_db(pred, gains), [10.0, 0.0, 20.0])
    assert gain_loss_db(pred, gains) == pytest.approx(10.0)  # mean of (10, 0, 20) dB
    # dB of means: oracle mean (10 + 4 + 100) / 3 = 38, predicted mean (1 + 4 + 1) / 3 = 2
    assert gain_loss_db_of_means(pred, gains) == pytest.approx(10 * np.log10(19))
    assert gain_loss_db(gains.argmax(1), gains) == 0.0
    with pytest.raises(ValueError, match="0..1"):
        gain_loss_db(np.array([0, 2, 1]), gains)


def test_split_users_is_a_seeded_partition() -> None:
    train, test = split_users(10, 0.3, seed=4)
    assert len(test) == 3 and len(train) == 7
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(10))
    again = split_users(10, 0.3, seed=4)
    assert np.array_equal(again[1], test) and not np.array_equal(split_users(10, 0.3, seed=5)[1], test)
    with pytest.raises(ValueError, match="test_fraction"):
        split_users(10, 1.0)


# --- codebook and channels, exact identities ---


def test_codebook_is_unit_norm_and_unitary_when_not_oversampled() -> None:
    assert np.allclose(np.linalg.norm(dft_codebook(8, 32), axis=1), 1.0)
    w = dft_codebook(8)
    assert np.allclose(w @ w.conj().T, np.eye(8))
    np.testing.assert_allclose(beam_directions(4), [-0.75, -0.25, 0.25, 0.75])


def test_two_antenna_beams_by_hand() -> None:
    # beams at u = -1/2, +1/2: w = [1, e^{j pi u}] / sqrt 2 = [1, -j] / sqrt 2 and [1, j] / sqrt 2
    w = dft_codebook(2)
    np.testing.assert_allclose(w * np.sqrt(2), [[1, -1j], [1, 1j]], atol=1e-12)
    h = np.array([[1, 1j]])  # a path at u = 1/2: w_0^H h = (1 + j j) / sqrt 2 = 0, w_1^H h = 2 / sqrt 2
    np.testing.assert_allclose(beam_gains(h, w), [[0.0, 2.0]], atol=1e-12)
    assert oracle_beams(h, w).tolist() == [1]


def test_single_path_oracle_is_the_beam_nearest_its_departure() -> None:
    rng = np.random.default_rng(0)
    theta, phi = rng.uniform(30, 150, 200), rng.uniform(-180, 180, 200)
    s = one_path_scenario(theta.tolist(), phi.tolist(), power_w=2.0, phase_deg=40.0)
    h = channel_vector(s, 16)
    np.testing.assert_allclose(np.linalg.norm(h, axis=1) ** 2, 16 * 2.0)  # |a_m| = 1 on each antenna
    u = direction_cosine(theta, phi, "y")  # sin(theta) sin(phi)
    gains = beam_gains(h, dft_codebook(16, 64))
    assert np.array_equal(gains.argmax(1), np.argmin(np.abs(u[:, None] - beam_directions(64)), axis=1))


def test_broadside_path_on_a_y_array_is_the_beam_at_u_0() -> None:
    # phi = 0 points along +x, normal to an array along y: u = 0, all antennas in phase
    h = channel_vector(one_path_scenario([90.0], [0.0]), 4)
    np.testing.assert_allclose(h, np.ones((1, 4)), atol=1e-12)
    np.testing.assert_allclose(channel_vector(one_path_scenario([90.0], [0.0]), 2, axis="x"),
                               [[1, -1]], atol=1e-12)  # endfire on an x array: u = 1, e^{j pi} = -1
    with pytest.raises(ValueError, match="axis 'w'"):
        channel_vector(one_path_scenario([90.0], [0.0]), 2, axis="w")


def test_grid_tracks_walk_rows_of_neighbours_with_paths() -> None:
    # a 2 x 5 grid, grid place 3 has no path: row 0 runs (0 1 2) and (4); row 1 runs (5..9).
    # Scenario users are the grid places in order, so place p > 3 is user p - 1.
    places = [0, 1, 2, 4, 5, 6, 7, 8, 9]
    s = one_path_scenario([90.0] * 9, [0.0] * 9, grid_index=places, grid_shape=(2, 5))
    tracks = [t.tolist() for t in grid_tracks(s, 3)]
    assert tracks == [[0, 1, 2], [4, 5, 6], [5, 6, 7], [6, 7, 8]]
    assert grid_tracks(s, 6) == []
    with pytest.raises(ValueError, match="length 1"):
        grid_tracks(s, 1)


def test_repeat_last_by_hand() -> None:
    past = np.array([[3, 4], [1, 1], [0, 5]])
    scores = RepeatLast(6).scores(past)
    np.testing.assert_allclose(scores[0], [-4, -3, -2, -1, 0, -1])
    nxt = np.array([4, 0, 3])
    assert topk_accuracy(scores, nxt, 1) == pytest.approx(1 / 3)
    # user 1: beams 0 and 2 tie next to 1 and the tie goes to the lower index; user 2's 2nd is beam 4
    assert topk_accuracy(scores, nxt, 2) == pytest.approx(2 / 3)


def test_missing_folder_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="EDGELAM_DATA"):
        load_scenario(tmp_path / "nowhere")


# --- the real scenario ---


@needs_deepmimo
def test_new_york_users_and_grid(new_york: Scenario) -> None:
    assert len(new_york) == 1014 and new_york.grid_shape == (44, 117)
    assert new_york.n_paths.min() >= 1 and new_york.n_paths.max() <= 6
    # 2.5 m grid: a row's neighbours differ by 2.5 m in x, a row is one y
    rows = new_york.grid_index // 117
    track = grid_tracks(new_york, 4)[0]
    assert np.all(rows[track] == rows[track[0]])
    np.testing.assert_allclose(np.diff(new_york.position_m[track, 0]), 2.5, atol=1e-3)


@needs_deepmimo
def test_new_york_los_paths_leave_towards_the_user(new_york: Scenario) -> None:
    """Row order check: the LoS path (first in every LoS user here) leaves in the BS-to-user
    direction, arrives from the opposite one, after distance / c."""
    i = np.flatnonzero(new_york.los)
    assert len(i) == 930
    vec = (new_york.position_m - new_york.bs_position_m)[i]
    dist = np.linalg.norm(vec, axis=1)
    np.testing.assert_allclose(new_york.aod_phi_deg[i, 0], np.degrees(np.arctan2(vec[:, 1], vec[:, 0])), atol=0.02)
    np.testing.assert_allclose(new_york.aod_theta_deg[i, 0], np.degrees(np.arccos(vec[:, 2] / dist)), atol=0.02)
    np.testing.assert_allclose(new_york.aoa_theta_deg[i, 0], np.degrees(np.arccos(-vec[:, 2] / dist)), atol=0.02)
    np.testing.assert_allclose(new_york.toa_s[i, 0], dist / 299_792_458, atol=1e-9)


@needs_deepmimo
def test_new_york_paths_rebuild_the_files_path_loss(new_york: Scenario) -> None:
    """With one antenna, |h|^2 = |sum_l sqrt(P_l) e^{j phase_l}|^2 is the coherent received power:
    the file's own path loss column, to its float32 rounding."""
    h = channel_vector(new_york, 1)[:, 0]
    received_dbm = 10 * np.log10(np.abs(h) ** 2) + 30
    np.testing.assert_allclose(received_dbm, new_york.tx_power_dbm - new_york.pathloss_db, atol=2e-3)


@needs_deepmimo
def test_new_york_gains_add_up_and_single_paths_peak_at_their_departure(new_york: Scenario) -> None:
    h = channel_vector(new_york, 32)
    gains = beam_gains(h, dft_codebook(32))  # a unitary codebook keeps all the energy (Parseval)
    np.testing.assert_allclose(gains.sum(1), np.linalg.norm(h, axis=1) ** 2, rtol=1e-9)
    one = np.flatnonzero(new_york.n_paths == 1)
    np.testing.assert_allclose(np.linalg.norm(h[one], axis=1) ** 2, 32 * new_york.power_w[one, 0], rtol=1e-9)
    u = direction_cosine(new_york.aod_theta_deg[one, 0], new_york.aod_phi_deg[one, 0])
    nearest = np.argmin(np.abs(u[:, None] - beam_directions(64)), axis=1)
    assert np.array_equal(oracle_beams(h[one], dft_codebook(32, 64)), nearest)


@needs_deepmimo
@pytest.mark.parametrize("model", ["knn", "mlp"])
def test_new_york_baselines_beat_guessing(new_york: Scenario, model: str) -> None:
    x, y, gains = beam_dataset(new_york, 32, 64)
    train, test = split_users(len(y), 0.2, seed=0)
    if model == "knn":
        scores = NearestNeighbour(64, k=5).fit(x[train], y[train]).scores(x[test])
    else:
        scores = MLPBeam(64).fit(x[train], y[train], seed=0).scores(x[test])
    majority = np.mean(y[test] == np.bincount(y[train]).argmax())  # always the commonest beam: ~0.08
    assert topk_accuracy(scores, y[test], 1) > max(3 / 64, 2 * majority)
    assert topk_accuracy(scores, y[test], 3) > 0.6
    assert gain_loss_db(scores.argmax(1), gains[test]) < 8.0
    if model == "mlp":  # deterministic by seed
        again = MLPBeam(64).fit(x[train], y[train], seed=0).scores(x[test])
        np.testing.assert_array_equal(again, scores)


@needs_deepmimo
def test_new_york_dataset_shapes_and_feature_names(new_york: Scenario) -> None:
    x, y, gains = beam_dataset(new_york, 8, 16, features="paths")
    assert x.shape == (1014, 10) and x.dtype == np.float32 and y.dtype == np.int64
    assert gains.shape == (1014, 16) and np.array_equal(y, gains.argmax(1))
    assert np.abs(beam_dataset(new_york, 8, 16)[0]).max() <= 1.0  # positions / farthest distance
    with pytest.raises(ValueError, match="allowed: \\['position', 'paths'\\]"):
        beam_dataset(new_york, 8, 16, features="pixels")


@needs_deepmimo
def test_new_york_missing_user_file_and_bad_bs(tmp_path: Path) -> None:
    (tmp_path / "params.mat").write_bytes((data_dir() / "deepmimo_new_york" / "params.mat").read_bytes())
    with pytest.raises(DataError, match="BS1_UE_<first>-<last>.mat.*EDGELAM_DATA"):
        load_scenario(tmp_path)
    with pytest.raises(ValueError, match="base stations 1..3"):
        load_scenario(tmp_path, bs=4)
