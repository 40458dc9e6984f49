"""Intel 5300 Wi-Fi CSI reader (edgelam.sensing.wifi) on the CSIKit labelled data set.

The format checks parse the bytes here from the documented layout (Linux 802.11n CSI Tool
read_bf_file.m / read_bfee.c / get_scaled_csi.m) and, where CSIKit is installed, compare with
CSIKit 2.5's own per-frame unpacking and scaling."""

from __future__ import annotations

import math
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import data_dir

from edgelam.data.sources import DataError
from edgelam.sensing.wifi import (
    activity_recordings,
    amplitude_features,
    parse_name,
    read_intel,
    windows,
)

DATA = data_dir() / "wifi_csi" / "labelled_2020"
INTEL = DATA / "intel"
needs_wifi = pytest.mark.skipif(not (INTEL / "activity").is_dir(),
                                reason="Wi-Fi CSI data (wifi_csi/labelled_2020/) not found; set EDGELAM_DATA")

WALK = "activity/walk_1590161182.dat"  # 2x2, complete, ends on a record boundary
CLASS_COUNTS = {"brushteeth": 10, "washingdishes": 6, "walk": 3, "cook": 2, "getintobed": 2, "sleeping": 1}


def raw_records(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, body) of each complete 0xBB record: 2-byte BE length L, code, L - 1 bytes."""
    out, cur = [], 0
    while cur + 3 <= len(data):
        (field_len,) = struct.unpack(">H", data[cur:cur + 2])
        if cur + 2 + field_len > len(data):
            break
        if data[cur + 2] == 0xBB:
            out.append((cur, data[cur + 3:cur + 2 + field_len]))
        cur += 2 + field_len
    return out


def header(body: bytes) -> dict[str, int]:
    """The 20-byte bfee header, field by field at its documented offsets."""
    u8 = lambda off: body[off]  # noqa: E731
    return {"timestamp_low": struct.unpack_from("<I", body, 0)[0], "bfee_count": struct.unpack_from("<H", body, 4)[0],
            "nrx": u8(8), "ntx": u8(9), "rssi_a": u8(10), "rssi_b": u8(11), "rssi_c": u8(12),
            "noise": struct.unpack_from("<b", body, 13)[0], "agc": u8(14), "antenna_sel": u8(15),
            "len": struct.unpack_from("<H", body, 16)[0], "rate": struct.unpack_from("<H", body, 18)[0]}


def decode_like_read_bfee_c(body: bytes) -> np.ndarray:
    """read_bfee.c, one entry at a time, then read_bf_file.m's permutation: (30, nrx, ntx)."""
    h = header(body)
    nrx, ntx, payload = h["nrx"], h["ntx"], body[20:]
    chains = np.zeros((30, nrx, ntx), dtype=complex)
    index = 0
    for sc in range(30):
        index += 3
        rem = index % 8
        for j in range(nrx * ntx):
            b = index // 8
            real = ((payload[b] >> rem) | (payload[b + 1] << (8 - rem))) & 0xFF
            imag = ((payload[b + 1] >> rem) | (payload[b + 2] << (8 - rem))) & 0xFF
            chains[sc, j // ntx, j % ntx] = (real - 256 * (real > 127)) + 1j * (imag - 256 * (imag > 127))
            index += 16
    perm = [(h["antenna_sel"] >> (2 * j)) & 3 for j in range(3)]
    if nrx < 3 or sorted(perm) != [0, 1, 2]:
        return chains
    out = np.zeros_like(chains)
    for j in range(3):
        out[:, perm[j], :] = chains[:, j, :]
    return out


def scaled_like_get_scaled_csi_m(raw: np.ndarray, h: dict[str, int]) -> np.ndarray:
    rssi_mag = sum(10 ** (r / 10) for r in (h["rssi_a"], h["rssi_b"], h["rssi_c"]) if r != 0)
    rss_mw = 10 ** ((10 * math.log10(rssi_mag) - 44 - h["agc"]) / 10)  # total RSS (dBm) in mW
    s = rss_mw / (np.sum(np.abs(raw) ** 2) / 30)
    assert np.sum(np.abs(raw * math.sqrt(s)) ** 2) / 30 == pytest.approx(rss_mw)  # power per subcarrier = RSS
    noise_mw = 10 ** ((-92 if h["noise"] == -127 else h["noise"]) / 10)
    out = raw * math.sqrt(s / (noise_mw + s * h["nrx"] * h["ntx"]))
    return out * {1: 1.0, 2: math.sqrt(2), 3: math.sqrt(10 ** 0.45)}[h["ntx"]]


@pytest.fixture(scope="module")
def recordings():
    return activity_recordings(DATA)


def csikit_reader():
    old = np.geterr()
    reader = pytest.importorskip("CSIKit.reader", reason="CSIKit not installed: pip install --no-deps csikit==2.5")
    np.seterr(**old)  # CSIKit sets np.seterr(divide='ignore') on import
    return reader.IWLBeamformReader


# --- (a) the header against the documented layout ---


@needs_wifi
def test_first_record_header_matches_the_documented_layout() -> None:
    data = (INTEL / WALK).read_bytes()
    (field_len,) = struct.unpack(">H", data[:2])
    assert data[2] == 0xBB
    h = header(data[3:2 + field_len])
    assert (h["nrx"], h["ntx"]) == (2, 2)
    assert h["len"] == (30 * (2 * 2 * 16 + 3) + 7) // 8 == 252 and field_len - 1 == 20 + h["len"]
    rec = read_intel(INTEL / WALK)
    assert (rec.n_rx, rec.n_tx) == (h["nrx"], h["ntx"])
    assert int(rec.timestamp_low[0]) == h["timestamp_low"] and int(rec.bfee_count[0]) == h["bfee_count"]
    assert rec.rssi[0].tolist() == [h["rssi_a"], h["rssi_b"], h["rssi_c"]]
    assert (int(rec.noise[0]), int(rec.agc[0]), int(rec.antenna_sel[0]), int(rec.rate[0])) == (
        h["noise"], h["agc"], h["antenna_sel"], h["rate"])
    assert rec.n_frames + rec.dropped_shape == len(raw_records(data))
    assert (rec.truncated_bytes, rec.skipped_records, rec.label) == (0, 0, "walk")


# --- (b) shapes, values, time ---


@needs_wifi
def test_activity_recordings_shapes_and_timestamps(recordings) -> None:
    assert [r.path for r in recordings] == sorted(r.path for r in recordings)
    for rec in recordings:
        assert rec.csi.dtype == np.complex64 and rec.csi.shape == (rec.n_frames, 30, 2, 2)
        assert rec.n_frames > 100 and np.all(np.isfinite(rec.csi)) and rec.zero_frames == 0
        assert rec.timestamps_s.dtype == np.float64 and rec.timestamps_s[0] == 0
        assert np.all(np.diff(rec.timestamps_s) > 0), rec.path
        # no wrap in these files: seconds since the first frame straight from timestamp_low
        ticks = rec.timestamp_low.astype(np.int64)
        np.testing.assert_allclose(rec.timestamps_s, (ticks - ticks[0]) / 1e6)
        assert 0.008 < rec.sample_interval_s < 0.011  # about 100 frames a second
        for arr in (rec.timestamp_low, rec.bfee_count, rec.noise, rec.agc, rec.antenna_sel, rec.rate):
            assert arr.shape == (rec.n_frames,)
        assert rec.rssi.shape == (rec.n_frames, 3)
    mixed = next(r for r in recordings if r.path.name == "brushteeth_post_1597163619.dat")
    assert mixed.dropped_shape == 2  # two 3x2 frames among 828 2x2 ones


@needs_wifi
def test_timestamp_low_wrap_is_undone(tmp_path: Path) -> None:
    data = (INTEL / WALK).read_bytes()
    parts = []
    for (off, body), ts in zip(raw_records(data)[:3], [2 ** 32 - 5000, 2 ** 32 - 1000, 3000], strict=True):
        parts.append(data[off:off + 3] + struct.pack("<I", ts) + body[4:])
    path = tmp_path / "wrap.dat"
    path.write_bytes(b"".join(parts))
    rec = read_intel(path)
    np.testing.assert_allclose(rec.timestamps_s, [0.0, 0.004, 0.008])
    assert rec.timestamp_low.tolist() == [2 ** 32 - 5000, 2 ** 32 - 1000, 3000]


# --- (c) unpacking and get_scaled_csi ---


@needs_wifi
@pytest.mark.parametrize("name", [WALK, "heartrate/84bpm.dat", "misc/log.all_csi.6.7.6.dat"])
def test_first_frame_unpacks_and_scales_like_the_csi_tool(name: str) -> None:
    """2x2; 3x2 with antenna permutation [2, 0, 1]; 3x1 with noise -127 (monitor mode)."""
    raw_rec, rec = read_intel(INTEL / name, scaled=False), read_intel(INTEL / name)
    body = next(b for _, b in raw_records((INTEL / name).read_bytes())
                if (b[8], b[9]) == (rec.n_rx, rec.n_tx))  # the first kept frame
    raw = decode_like_read_bfee_c(body)
    np.testing.assert_array_equal(raw_rec.csi[0], raw)
    np.testing.assert_allclose(rec.csi[0], scaled_like_get_scaled_csi_m(raw, header(body)), rtol=1e-5)


@needs_wifi
@pytest.mark.parametrize("name", [WALK, "heartrate/testfile.dat", "misc/log.all_csi.6.7.6.dat"])
def test_every_frame_agrees_with_csikit(name: str) -> None:
    iwl = csikit_reader()
    raw_rec, rec = read_intel(INTEL / name, scaled=False), read_intel(INTEL / name)
    kept = [b for _, b in raw_records((INTEL / name).read_bytes()) if (b[8], b[9]) == (rec.n_rx, rec.n_tx)]
    assert len(kept) == rec.n_frames
    for i, body in enumerate(kept):
        h = struct.unpack("<LHHBBBBBbBBHH", body[:20])  # CSIKit's HEADER_STRUCT
        perm = [(h[10] >> (2 * j)) & 3 for j in range(3)] if h[3] == 3 else [0, 1, 2]
        # a uint8 buffer: CSIKit 2.5 overflows on Python ints under NumPy 2
        csi = iwl.read_bfee(np.frombuffer(body[20:], np.uint8), h[3], h[4], h[11], perm)
        np.testing.assert_array_equal(raw_rec.csi[i], csi)
        np.testing.assert_allclose(rec.csi[i], iwl.scale_csi_entry(csi.astype(np.complex128), list(h)), rtol=1e-5)


# --- (d) labels ---


@needs_wifi
def test_labels_classes_and_counts(recordings) -> None:
    assert Counter(r.label for r in recordings) == CLASS_COUNTS
    for rec in recordings:
        assert rec.path.name.startswith(rec.label + "_") and rec.bpm is None
    assert sum(r.n_frames for r in recordings) == 11182


def test_parse_name() -> None:
    assert parse_name("a/walk_post_1597163546.dat") == ("walk", None)
    assert parse_name("washingdishes_1590160990.dat") == ("washingdishes", None)
    assert parse_name("66bpm.dat") == (None, 66)
    assert parse_name("hometest1.dat") == (None, None) and parse_name("3breaths.dat") == (None, None)


@needs_wifi
def test_heart_rate_label_and_default_root() -> None:
    assert read_intel(INTEL / "heartrate/66bpm.dat").bpm == 66
    assert len(activity_recordings()) == 24  # found through $EDGELAM_DATA


def test_missing_folder_says_to_set_edgelam_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELAM_DATA", str(tmp_path))
    with pytest.raises(DataError, match="set EDGELAM_DATA"):
        activity_recordings()
    with pytest.raises(DataError, match="set EDGELAM_DATA"):
        read_intel(tmp_path / "nothing.dat")


# --- (e) features, windows, normalisation, folds ---


@needs_wifi
def test_amplitude_features_and_zero_frames(tmp_path: Path) -> None:
    rec = read_intel(INTEL / WALK)
    x = amplitude_features(rec)
    assert x.dtype == np.float32 and x.shape == (rec.n_frames, 120)
    np.testing.assert_allclose(x[5, 4 * 7:4 * 8], np.abs(rec.csi[5, 7]).ravel())  # subcarrier-major
    # a frame whose payload is all zero: zero scaled CSI, not NaN
    data = (INTEL / WALK).read_bytes()
    (off, body), second = raw_records(data)[:2]
    zeroed = data[off:off + 3] + body[:20] + bytes(len(body) - 20)
    path = tmp_path / "zero.dat"
    path.write_bytes(zeroed + data[second[0]:second[0] + 3 + len(second[1])])
    zrec = read_intel(path)
    assert zrec.zero_frames == 1 and np.all(zrec.csi[0] == 0) and np.all(np.isfinite(zrec.csi))
    assert np.all(amplitude_features(zrec)[0] == 0) and np.all(amplitude_features(zrec)[1] > 0)


def test_windows_on_a_hand_made_array() -> None:
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    w = windows(x, length=4, stride=3)
    assert w.shape == (3, 4, 2)  # starts 0, 3, 6
    np.testing.assert_array_equal(w[1], x[3:7])
    np.testing.assert_array_equal(w[2], x[6:10])
    assert windows(x, 10, 5).shape == (1, 10, 2) and windows(x, 11, 1).shape == (0, 11, 2)
    with pytest.raises(ValueError, match="stride"):
        windows(x, 4, 0)
    with pytest.raises(ValueError, match="frames, features"):
        windows(x.ravel(), 4, 1)


@needs_wifi
def test_leave_one_recording_out(recordings) -> None:
    """sensing.folds = 24 deals each recording a fold of its own (sensing.data.stratified_folds)."""
    from edgelam.sensing.data import stratified_folds

    labels = [str(r.label) for r in recordings]
    fold = stratified_folds(labels, len(recordings), np.random.default_rng(0))
    assert sorted(fold) == list(range(24))
    four = stratified_folds(labels, 4, np.random.default_rng(0))
    for f in range(4):  # stratified: brushing teeth (10 recordings) is in every fold
        assert "brushteeth" in {lab for lab, g in zip(labels, four) if g == f}


# --- (f) truncated, damaged and foreign files ---


@needs_wifi
def test_truncated_file_reads_its_complete_records(tmp_path: Path) -> None:
    data = (INTEL / WALK).read_bytes()
    full = read_intel(INTEL / WALK)
    off, body = raw_records(data)[10]
    cut = off + 3 + len(body) // 2  # ten whole records and half of the eleventh
    path = tmp_path / "walk_1590161182.dat"
    path.write_bytes(data[:cut])
    rec = read_intel(path)
    assert rec.n_frames == 10 and rec.truncated_bytes == cut - off and rec.label == "walk"
    np.testing.assert_array_equal(rec.csi, full.csi[:10])
    np.testing.assert_array_equal(rec.timestamps_s, full.timestamps_s[:10])
    (tmp_path / "short.dat").write_bytes(data[:100])  # inside the first record
    with pytest.raises(DataError, match=r"short\.dat: no complete beamforming record"):
        read_intel(tmp_path / "short.dat")


@needs_wifi
def test_a_data_set_file_cut_at_4_kib_is_read_to_its_last_whole_record() -> None:
    path = INTEL / "activity/august/brushteeth_1597160013.dat"
    rec = read_intel(path)
    size = path.stat().st_size
    assert size == 110592 and rec.truncated_bytes == 42 and rec.n_frames == 402
    assert sum(3 + len(b) for _, b in raw_records(path.read_bytes())) == size - 42


@needs_wifi
def test_damaged_empty_and_foreign_files_are_clear_errors(tmp_path: Path) -> None:
    data = bytearray((INTEL / WALK).read_bytes())
    off, _ = raw_records(bytes(data))[2]
    data[off + 3 + 8] = 7  # Nrx = 7 in the third record
    (tmp_path / "bad.dat").write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"bad\.dat: bfee record 2 at byte {off} is corrupt \(Nrx=7"):
        read_intel(tmp_path / "bad.dat")
    with pytest.raises(DataError, match=r"92bpm\.dat: the file is empty"):
        read_intel(INTEL / "heartrate/92bpm.dat")
    with pytest.raises(DataError, match=r"csi2\.dat: no complete beamforming record .* code 0x70"):
        read_intel(INTEL / "heartrate/csi2.dat")

