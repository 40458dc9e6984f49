"""Wi-Fi CSI from the Intel 5300 (Linux 802.11n CSI Tool) as activity-recognition data.

Data: the CSIKit data repository (MIT; ``$EDGELAM_DATA/wifi_csi/labelled_2020``, default
``../shared/data``). Activity captures are ``intel/activity/**/<activity>_<unix time>.dat`` and
``<activity>_post_<unix time>.dat``; the class is the name before the time, ``_post`` stripped.
Heart-rate captures ``intel/heartrate/<N>bpm.dat`` carry N as ``Recording.bpm``.

File format (``log_to_file`` of the CSI Tool; read_bf_file.m / read_bfee.c): a sequence of
records, each a 2-byte big-endian field length L, a 1-byte code, then L - 1 bytes. Code 0xBB is
a beamforming ("bfee") record whose body is a 20-byte little-endian header

  timestamp_low u32 (NIC clock, microseconds, wraps at 2**32)   bfee_count u16   reserved u16
  Nrx u8   Ntx u8   rssi_a u8   rssi_b u8   rssi_c u8   noise i8   agc u8   antenna_sel u8
  len u16   fake_rate_n_flags u16

then ``len`` = (30 * (16 * Nrx * Ntx + 3) + 7) // 8 payload bytes: for each of the 30 reported
subcarriers, 3 skipped bits, then Nrx * Ntx (real, imag) pairs of signed 8-bit values (Tx index
fastest) packed at that bit offset. With Nrx == 3, receive chain j holds antenna perm[j], where
perm[j] = (antenna_sel >> 2j) & 3 (applied, as the CSI Tool does, only when perm is a
permutation of 0, 1, 2; with Nrx < 3 rows keep the order of the chains). Other codes are skipped,
as the CSI Tool does.

The payload is unpacked here with vectorised NumPy rather than through CSIKit: CSIKit 2.5's
``IWLBeamformReader.read_bfee`` raises ``OverflowError: Python integer 276 out of bounds for int8``
under NumPy 2 (Gi-z/CSIKit#59) and takes ~1.6 ms a frame. tests/test_sensing_wifi.py checks this
reader against CSIKit's per-frame unpacking and scaling (given a uint8 buffer, which works).

Scaling follows get_scaled_csi.m (CSIKit ``IWLBeamformReader.scale_csi_entry``); ``read_intel``
documents it. A truncated file (the last record cut short, as in several files of this data set,
cut at 4 KiB boundaries) is read up to its last complete record and ``truncated_bytes`` says how
much was left; a damaged record before the end is a ``DataError``.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelam.data.sources import DataError, data_root

DATASET = "wifi_csi/labelled_2020"  # the folder under $EDGELAM_DATA
ACTIVITY_DIR = "intel/activity"
SUBCARRIERS = 30  # the Intel 5300 reports 30 of the 56 (20 MHz) subcarriers
BFEE_CODE = 0xBB
HEADER = struct.Struct("<IHHBBBBBbBBHH")  # the 20-byte bfee header above
NOISE_UNKNOWN = -127  # noise field in monitor mode; get_scaled_csi.m then assumes -92 dBm
_ACTIVITY_NAME = re.compile(r"^(?P<activity>.+?)(?:_post)?_(?P<time>\d+)\.dat$")
_BPM_NAME = re.compile(r"^(?P<bpm>\d+)bpm\.dat$")


@dataclass(frozen=True, eq=False)
class Recording:
    """One CSI Tool file: per-frame arrays share their first axis (frames)."""

    path: Path
    label: str | None  # the activity from the file name, None for other files
    bpm: int | None  # N of a '<N>bpm.dat' heart-rate capture, else None
    csi: np.ndarray  # (frames, 30, n_rx, n_tx) complex64; scaled (sqrt SNR) unless read with scaled=False
    scaled: bool
    timestamps_s: np.ndarray  # (frames,) float64 seconds since the first frame, 32-bit wraps undone
    timestamp_low: np.ndarray  # (frames,) uint32, the raw NIC clock (microseconds)
    bfee_count: np.ndarray  # (frames,) uint16
    rssi: np.ndarray  # (frames, 3) uint8 rssi_a, rssi_b, rssi_c (dB; 0 = chain not reporting)
    noise: np.ndarray  # (frames,) int8 noise floor in dBm (-127 = unknown)
    agc: np.ndarray  # (frames,) uint8 automatic gain control (dB)
    antenna_sel: np.ndarray  # (frames,) uint8
    rate: np.ndarray  # (frames,) uint16 fake_rate_n_flags
    dropped_shape: int  # frames left out: their (Nrx, Ntx) differs from the file's most common one
    zero_frames: int  # kept frames whose CSI is all zero (scaled CSI set to 0 there)
    skipped_records: int  # records with a code other than 0xBB
    truncated_bytes: int  # bytes after the last complete record (an incomplete record cut off)

    @property
    def n_frames(self) -> int:
        return int(self.csi.shape[0])

    @property
    def n_rx(self) -> int:
        return int(self.csi.shape[2])

    @property
    def n_tx(self) -> int:
        return int(self.csi.shape[3])

    @property
    def sample_interval_s(self) -> float:
        """Median time between frames (NaN with fewer than two frames)."""
        if self.n_frames < 2:
            return float("nan")
        return float(np.median(np.diff(self.timestamps_s)))


def payload_length(n_rx: int, n_tx: int) -> int:
    """Bytes of a bfee payload for ``n_rx`` x ``n_tx`` antennas (read_bfee.c's calc_len)."""
    return (SUBCARRIERS * (16 * n_rx * n_tx + 3) + 7) // 8


def parse_name(path: str | Path) -> tuple[str | None, int | None]:
    """(activity, bpm) from a file name: 'walk_post_1597163546.dat' -> ('walk', None),
    '66bpm.dat' -> (None, 66), anything else -> (None, None)."""
    name = Path(path).name
    if m := _BPM_NAME.match(name):
        return None, int(m["bpm"])
    if m := _ACTIVITY_NAME.match(name):
        return m["activity"], None
    return None, None


def _records(data: bytes, path: Path) -> tuple[list[tuple[tuple[int, ...], bytes]], int, int]:
    """The bfee records (header, payload), the count of other records, and the bytes of an
    incomplete last record."""
    records: list[tuple[tuple[int, ...], bytes]] = []
    skipped = cursor = 0
    while len(data) - cursor >= 3:
        field_len = int.from_bytes(data[cursor:cursor + 2], "big")
        code = data[cursor + 2]
        end = cursor + 2 + field_len
        if field_len < 1:
            raise DataError(f"{path}: record {len(records) + skipped} at byte {cursor} has field length 0, so "
                            f"the file is damaged or not a CSI Tool log; re-copy it or cut it before byte {cursor}")
        if end > len(data):
            break  # the last record was cut short
        if code != BFEE_CODE:
            skipped += 1
            cursor = end
            continue
        body = data[cursor + 3:end]
        header = HEADER.unpack_from(body) if len(body) >= HEADER.size else None
        if header is None or not (1 <= header[3] <= 3 and 1 <= header[4] <= 3) \
                or header[11] != payload_length(header[3], header[4]) or len(body) != HEADER.size + header[11]:
            what = (f"Nrx={header[3]}, Ntx={header[4]}, len={header[11]}, body {len(body)} bytes"
                    if header is not None else f"body {len(body)} bytes, shorter than the 20-byte header")
            raise DataError(f"{path}: bfee record {len(records)} at byte {cursor} is corrupt ({what}; a record of "
                            f"Nrx x Ntx antennas (1..3 each) has len = (30*(16*Nrx*Ntx+3)+7)//8 and a body of 20 + len "
                            f"bytes); the file is damaged: re-copy it or cut it before byte {cursor}")
        records.append((header, body[HEADER.size:]))
        cursor = end
    return records, skipped, len(data) - cursor


def _unpack(payload: np.ndarray, n_rx: int, n_tx: int) -> np.ndarray:
    """(frames, len) uint8 payloads -> (frames, 30, n_rx, n_tx) complex64 raw CSI, chain order."""
    n = n_rx * n_tx
    k = np.arange(SUBCARRIERS)[:, None]
    start = 3 * (k + 1) + 16 * (k * n + np.arange(n)[None, :])  # (30, n) first bit of each real part

    def int8_at(bit: np.ndarray) -> np.ndarray:
        low = payload[:, bit // 8].astype(np.uint16)
        high = payload[:, bit // 8 + 1].astype(np.uint16)
        shift = (bit % 8).astype(np.uint16)
        return ((low >> shift) | (high << (8 - shift))).astype(np.uint8).view(np.int8)

    csi = int8_at(start).astype(np.float32) + 1j * int8_at(start + 8).astype(np.float32)
    return csi.astype(np.complex64).reshape(len(payload), SUBCARRIERS, n_rx, n_tx)


def _permute(csi: np.ndarray, antenna_sel: np.ndarray) -> np.ndarray:
    """Put receive chain j at antenna perm[j] (Nrx == 3 and a valid perm only, as read_bf_file.m)."""
    if csi.shape[2] != 3:
        return csi
    out = csi.copy()
    for sel in np.unique(antenna_sel):
        perm = [(int(sel) >> (2 * j)) & 3 for j in range(3)]
        if sorted(perm) == [0, 1, 2]:
            rows = antenna_sel == sel
            out[np.ix_(rows, np.arange(SUBCARRIERS), np.array(perm))] = csi[rows]
    return out


def _scale(csi: np.ndarray, rssi: np.ndarray, noise: np.ndarray, agc: np.ndarray) -> np.ndarray:
    """get_scaled_csi.m, per frame; all-zero frames stay zero."""
    n_rx, n_tx = csi.shape[2], csi.shape[3]
    c = csi.astype(np.complex128)
    csi_pwr = np.sum(np.abs(c) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        rssi_mag = np.sum(np.where(rssi != 0, 10.0 ** (rssi / 10.0), 0.0), axis=1)
        total_rss_dbm = 10 * np.log10(rssi_mag) - 44 - agc  # -inf when no chain reports
    rssi_pwr = 10.0 ** (total_rss_dbm / 10)
    zero = csi_pwr == 0
    scale = rssi_pwr / np.where(zero, 1.0, csi_pwr / SUBCARRIERS)
    noise_db = np.where(noise == NOISE_UNKNOWN, -92, noise).astype(np.float64)
    total_noise_pwr = 10.0 ** (noise_db / 10) + scale * (n_rx * n_tx)  # thermal + quantisation error
    factor = np.sqrt(scale / total_noise_pwr)
    if n_tx == 2:
        factor = factor * np.sqrt(2)
    elif n_tx == 3:
        factor = factor * np.sqrt(10 ** 0.45)  # Intel's 4.5 dB for a factor of 3
    factor[zero] = 0.0
    return (c * factor[:, None, None, None]).astype(np.complex64)


def read_intel(path: str | Path, *, scaled: bool = True) -> Recording:
    """Read an Intel 5300 CSI Tool ``.dat`` file.

    Frames whose (Nrx, Ntx) differs from the file's most common one are dropped (counted in
    ``dropped_shape``). With ``scaled`` the CSI is get_scaled_csi.m's, in units of sqrt(SNR): the
    raw values times sqrt(s / (N + s * Nrx * Ntx)), s = P / (sum |csi|^2 / 30), where P is the total
    RSS in mW, 10 log10 P = 10 log10(sum of 10^(rssi/10) over non-zero rssi_a/b/c) - 44 - agc, and
    N the thermal noise in mW (noise dBm; -92 when unknown); times sqrt(2) for Ntx = 2 and
    sqrt(10^0.45) for Ntx = 3. Otherwise the raw signed 8-bit values."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSI file '{path}' not found; set EDGELAM_DATA to the folder holding '{DATASET}/' "
                        f"(default ../shared/data) or give an existing path")
    data = path.read_bytes()
    if not data:
        raise DataError(f"{path}: the file is empty; it holds no CSI")
    records, skipped, truncated = _records(data, path)
    if not records:
        first = f"code 0x{data[2]:02X}, field length {int.from_bytes(data[:2], 'big')}" if len(data) >= 3 else "none"
        raise DataError(f"{path}: no complete beamforming record (code 0xBB) in its {len(data)} bytes (first record: "
                        f"{first}); it is not an Intel 5300 Linux 802.11n CSI Tool log (log_to_file) or is "
                        f"truncated before its first record")
    shapes = Counter((h[3], h[4]) for h, _ in records)
    (n_rx, n_tx), _ = shapes.most_common(1)[0]
    kept = [(h, p) for h, p in records if (h[3], h[4]) == (n_rx, n_tx)]
    head = np.array([h for h, _ in kept], dtype=np.int64)  # (frames, 13)
    payload = np.frombuffer(b"".join(p for _, p in kept), dtype=np.uint8).reshape(len(kept), -1)

    antenna_sel = head[:, 10].astype(np.uint8)
    csi = _permute(_unpack(payload, n_rx, n_tx), antenna_sel)
    rssi = head[:, 5:8].astype(np.uint8)
    noise = head[:, 8].astype(np.int8)
    agc = head[:, 9].astype(np.uint8)
    zero = int(np.sum(~np.any(csi != 0, axis=(1, 2, 3))))
    if scaled:
        csi = _scale(csi, rssi.astype(np.float64), noise.astype(np.int64), agc.astype(np.float64))

    steps = np.diff(head[:, 0])
    steps[steps < -(2 ** 31)] += 2 ** 32  # the u32 microsecond clock wrapped
    timestamps_s = np.concatenate([[0], np.cumsum(steps)]).astype(np.float64) / 1e6
    label, bpm = parse_name(path)
    return Recording(path=path, label=label, bpm=bpm, csi=csi, scaled=scaled, timestamps_s=timestamps_s,
                     timestamp_low=head[:, 0].astype(np.uint32), bfee_count=head[:, 1].astype(np.uint16),
                     rssi=rssi, noise=noise, agc=agc, antenna_sel=antenna_sel, rate=head[:, 12].astype(np.uint16),
                     dropped_shape=len(records) - len(kept), zero_frames=zero, skipped_records=skipped,
                     truncated_bytes=truncated)


def amplitude_features(rec: Recording) -> np.ndarray:
    """(frames, 30 * n_rx * n_tx) float32 |csi|, subcarrier-major (subcarrier, rx, tx); zero
    frames give zeros."""
    amp = np.abs(rec.csi).reshape(rec.n_frames, -1).astype(np.float32)
    if not np.all(np.isfinite(amp)):
        raise DataError(f"{rec.path}: CSI amplitudes are not all finite")
    return amp


def windows(x: np.ndarray, length: int, stride: int) -> np.ndarray:
    """(n_windows, length, features) windows of a (frames, features) array, starting at 0, stride,
    2 * stride, ...; only whole windows, so none when frames < length."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"windows: expected a (frames, features) array, got shape {x.shape}")
    if length < 1 or stride < 1:
        raise ValueError(f"windows: length ({length}) and stride ({stride}) must be at least 1")
    n = (len(x) - length) // stride + 1 if len(x) >= length else 0
    starts = np.arange(n)[:, None] * stride
    return x[starts + np.arange(length)[None, :]] if n else np.empty((0, length, x.shape[1]), x.dtype)


def activity_recordings(root: str | Path | None = None, *, scaled: bool = True) -> list[Recording]:
    """Every ``intel/activity/**/*.dat`` under ``root`` (default ``$EDGELAM_DATA/wifi_csi/labelled_2020``),
    read and labelled, sorted by path."""
    root = Path(root) if root is not None else data_root() / DATASET
    folder = root / ACTIVITY_DIR
    if not folder.is_dir():
        raise DataError(f"Wi-Fi CSI activity folder '{folder}' not found; set EDGELAM_DATA to the folder holding "
                        f"'{DATASET}/' (default ../shared/data) or pass root=<the labelled_2020 folder>")
    paths = sorted(folder.rglob("*.dat"))
    if not paths:
        raise DataError(f"'{folder}' holds no .dat files")
    unlabelled = [str(p) for p in paths if parse_name(p)[0] is None]
    if unlabelled:
        raise DataError(f"cannot tell the activity of {unlabelled}: name activity files "
                        f"'<activity>_<unix time>.dat' or '<activity>_post_<unix time>.dat'")
    return [read_intel(p, scaled=scaled) for p in paths]
