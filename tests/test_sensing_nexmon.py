"""nexmon_csi pcap reader (edgelam.sensing.nexmon) on the CSIKit data set's Raspberry Pi captures.

The real files are checked against the documented layout (parsed here with struct) and, where
CSIKit is installed, against CSIKit 2.5's NEXBeamformReader; hand-built pcaps check every field,
the pcap variants (byte order, nanoseconds, link types) and the errors."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import data_dir

from edgelam.data.sources import DataError
from edgelam.sensing.nexmon import (
    amplitude_features,
    decode_chanspec,
    parse_name,
    pi_recordings,
    read_nexmon,
)

DATA = data_dir() / "wifi_csi" / "labelled_2020"
PI = DATA / "pi"
needs_pi = pytest.mark.skipif(not PI.is_dir(),
                              reason="nexmon CSI data (wifi_csi/labelled_2020/pi/) not found; set EDGELAM_DATA")

# name -> (label, bandwidth MHz, subcarriers, frames, packets with Ethernet padding)
FILES = {"40mhz_1600085286.pcap": ("40mhz", 40, 128, 81, 0),
         "test.pcap": (None, 80, 256, 566, 18),
         "walk_1597159475.pcap": ("walk", 80, 256, 343, 0)}
MAC = bytes.fromhex("24a7dc06df5d")


# --- building captures by hand ---


def report(iq: np.ndarray, *, rssi: int = -52, fc: int = 0x80, mac: bytes = MAC, seq: int = 0x25F0,
           core: int = 0, stream: int = 0, chanspec: int = 0xD826, chip: int = 101, v1: bool = False) -> bytes:
    """A nexmon_csi UDP payload: 18-byte header, then int16 (I, Q) per subcarrier."""
    start = b"\x11\x11\x11\x11" if v1 else struct.pack("<HbB", 0x1111, rssi, fc)
    return (start + mac + struct.pack("<HHHH", seq, core | stream << 3, chanspec, chip)
            + np.asarray(iq, dtype="<i2").tobytes())


def udp_ip(payload: bytes, port: int = 5500) -> bytes:
    """IPv4 (10.10.10.10 -> 255.255.255.255) + UDP, as the firmware prepends them."""
    udp = struct.pack(">HHHH", port, port, 8 + len(payload), 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 1, 17, 0, bytes([10] * 4), b"\xff" * 4)
    return ip + udp


def frame(payload: bytes, link: int = 1, *, port: int = 5500, trailer: bytes = b"") -> bytes:
    """A packet of the given pcap link type carrying the payload to ``port``."""
    ip = udp_ip(payload, port) + trailer
    if link == 1:  # Ethernet, from the firmware's 'NEXMON' address
        return b"\xff" * 6 + b"NEXMON" + b"\x08\x00" + ip
    if link == 113:  # Linux cooked capture: type, ARPHRD, address length, address (8), protocol
        return struct.pack(">HHH8sH", 0, 1, 6, b"NEXMON\0\0", 0x0800) + ip
    if link == 276:  # Linux cooked capture v2: protocol, reserved, ifindex, ARPHRD, type, length, address
        return struct.pack(">HHIHBB8s", 0x0800, 0, 3, 1, 0, 6, b"NEXMON\0\0") + ip
    return ip  # raw IPv4 (101, 228)


def pcap(packets: list[tuple[int, int, bytes]], *, order: str = "<", nano: bool = False, link: int = 1) -> bytes:
    """A classic pcap: global header, then (seconds, micro/nanoseconds, packet) records."""
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 262144, link)
    for sec, frac, pkt in packets:
        out += struct.pack(order + "IIII", sec, frac, len(pkt), len(pkt)) + pkt
    return out


def iq_values(nsub: int, seed: int = 0) -> np.ndarray:
    """(nsub, 2) int16 I, Q covering the int16 extremes."""
    iq = np.random.default_rng(seed).integers(-32768, 32768, size=(nsub, 2)).astype(np.int16)
    iq[:2] = [[-32768, 32767], [32767, -32768]]
    return iq


def as_complex(iq: np.ndarray) -> np.ndarray:
    return iq[:, 0].astype(np.float32) + 1j * iq[:, 1].astype(np.float32)


# --- the layout, parsed here ---


def raw_reports(path: Path) -> list[tuple[int, int, int, bytes]]:
    """(seconds, microseconds, orig_len, UDP payload) of each record of a little-endian
    microsecond Ethernet pcap: Ethernet 14 + IPv4 20 + UDP 8 bytes, UDP length at byte 38."""
    data = path.read_bytes()
    assert struct.unpack_from("<IHHiIII", data)[0::6] == (0xA1B2C3D4, 1)
    out, cur = [], 24
    while cur + 16 <= len(data):
        sec, usec, incl, orig = struct.unpack_from("<IIII", data, cur)
        pkt = data[cur + 16:cur + 16 + incl]
        (udp_len,) = struct.unpack_from(">H", pkt, 38)
        out.append((sec, usec, orig, pkt[42:34 + udp_len]))
        cur += 16 + incl
    return out


def csikit_nexmon():
    old = np.geterr()
    reader = pytest.importorskip("CSIKit.reader", reason="CSIKit not installed: pip install --no-deps csikit==2.5")
    np.seterr(**old)  # CSIKit sets np.seterr(divide='ignore') on import
    return reader


# --- (1) the real captures ---


@needs_pi
@pytest.mark.parametrize("name", sorted(FILES))
def test_real_capture_shape_and_header_fields(name: str) -> None:
    label, bandwidth, nsub, frames, padded = FILES[name]
    rec = read_nexmon(PI / name)
    assert (rec.label, rec.chip, rec.chip_version) == (label, "bcm43455c0", 101)
    assert rec.bandwidth_mhz == bandwidth and rec.csi.shape == (frames, nsub) and rec.csi.dtype == np.complex64
    assert rec.n_subcarriers == nsub == {20: 64, 40: 128, 80: 256}[bandwidth]
    # the chanspec agrees with the width the payload length implies: 40mhz_... really is 40 MHz
    assert {decode_chanspec(int(c))[1:] for c in rec.chanspec} == {(bandwidth, 5.0)}
    assert rec.streams == [(0, 0)]  # the Pi 4: one core, one spatial stream
    assert (rec.skipped_packets, rec.dropped_size, rec.short_packets, rec.truncated_bytes) == (0, 0, 0, 0)
    assert rec.padded_packets == padded

    raw = raw_reports(PI / name)
    assert len(raw) == frames
    for i, (sec, usec, _, payload) in enumerate(raw):
        magic, rssi, fc = struct.unpack_from("<HbB", payload, 0)
        seq, core_ss, chanspec, chip = struct.unpack_from("<HHHH", payload, 10)
        assert (magic, chip, core_ss) == (0x1111, 101, 0)
        assert (rec.rssi[i], rec.frame_control[i], rec.seq[i], rec.chanspec[i]) == (rssi, fc, seq, chanspec)
        assert rec.mac[i] == payload[4:10].hex(":")
        assert rec.unix_time_s[i] == sec + usec / 1e6
        iq = np.frombuffer(payload[18:], "<i2").reshape(-1, 2)
        np.testing.assert_array_equal(rec.csi[i], as_complex(iq))
    assert rec.timestamps_s[0] == 0 and np.all(np.diff(rec.timestamps_s) >= 0)
    np.testing.assert_allclose(rec.timestamps_s, rec.unix_time_s - rec.unix_time_s[0], atol=1e-6)


@needs_pi
@pytest.mark.parametrize("name", sorted(FILES))
def test_real_capture_agrees_with_csikit(name: str) -> None:
    """CSIKit 2.5 (scaled=False) gives the same raw int16 I/Q, in the same FFT order (neither
    applies fftshift), with these convention differences: it skips packets whose captured length
    is not 60 + 4 * nsub bytes (test.pcap's 18 with 4 bytes of Ethernet padding) and appends as
    many all-zero frames with timestamp 0 at the end; its frames are (nsub, 1) or (nsub, 1, 1)
    complex128; MACs are upper case and the chanspec is the hex of its two bytes as stored."""
    ck = csikit_nexmon()
    rec = read_nexmon(PI / name)
    data = ck.NEXBeamformReader().read_file(str(PI / name), scaled=False)
    assert isinstance(ck.get_reader(str(PI / name)), ck.NEXBeamformReader)
    assert data.bandwidth == rec.bandwidth_mhz and data.chipset == "Broadcom BCM43455c0"
    assert len(data.frames) == rec.n_frames

    # the packets CSIKit keeps, by its own size rule, in file order
    csikit_keeps = np.array([orig - 60 == 4 * rec.n_subcarriers for _, _, orig, _ in raw_reports(PI / name)])
    assert data.skipped_frames == int(np.sum(~csikit_keeps)) == rec.padded_packets
    kept = np.flatnonzero(csikit_keeps)
    for j, i in enumerate(kept):
        f = data.frames[j]
        np.testing.assert_array_equal(f.csi_matrix.reshape(-1), rec.csi[i])
        assert (f.rssi, f.frame_control, f.sequence_no, f.core, f.spatial_stream) == (
            rec.rssi[i], rec.frame_control[i], rec.seq[i], rec.core[i], rec.spatial_stream[i])
        assert f.source_mac == rec.mac[i].upper() and f.chip == "43455c0"
        assert f.channel_spec == struct.pack("<H", rec.chanspec[i]).hex()
        assert data.timestamps[j] == pytest.approx(rec.unix_time_s[i], abs=1e-6)
    for f, t in zip(data.frames[len(kept):], data.timestamps[len(kept):]):  # CSIKit's zero fill
        assert t == 0 and not np.any(f.csi_matrix)


@needs_pi
def test_pi_recordings_default_root_and_amplitude_features() -> None:
    recs = pi_recordings()
    assert [r.path.name for r in recs] == sorted(FILES)
    walk = recs[2]
    amp = amplitude_features(walk)
    assert amp.shape == (343, 256) and amp.dtype == np.float32
    np.testing.assert_array_equal(amp, np.abs(walk.csi))
    assert walk.subcarrier_indices[[0, 127, 128, 255]].tolist() == [0, 127, -128, -1]
    assert 0.009 < walk.sample_interval_s < 0.011  # ~100 frames a second


# --- (2) hand-built captures ---


@pytest.mark.parametrize(("order", "nano", "link"), [("<", False, 1), (">", True, 1), ("<", False, 113),
                                                     (">", False, 276), ("<", True, 101), ("<", False, 228)])
def test_hand_built_capture_reads_back_exactly(tmp_path: Path, order: str, nano: bool, link: int) -> None:
    iq = iq_values(64)
    payload = report(iq, rssi=-71, fc=0x88, mac=bytes(range(1, 7)), seq=0x1234, core=5, stream=2,
                     chanspec=0x100B, chip=101)
    frac = 123456789 if nano else 123456
    path = tmp_path / "sit_1600000000.pcap"
    path.write_bytes(pcap([(1600000000, frac, frame(payload, link))], order=order, nano=nano, link=link))
    rec = read_nexmon(path)
    assert (rec.path, rec.label, rec.chip, rec.chip_version, rec.bandwidth_mhz) == (path, "sit", "bcm43455c0", 101, 20)
    np.testing.assert_array_equal(rec.csi, as_complex(iq)[None])
    assert rec.rssi.tolist() == [-71] and rec.frame_control.tolist() == [0x88] and rec.rssi.dtype == np.int8
    assert rec.mac.tolist() == ["01:02:03:04:05:06"] and rec.seq.tolist() == [0x1234]
    assert (rec.core.tolist(), rec.spatial_stream.tolist(), rec.chanspec.tolist()) == ([5], [2], [0x100B])
    assert decode_chanspec(0x100B) == (11, 20, 2.4)
    assert rec.unix_time_s.tolist() == [1600000000 + frac / (1e9 if nano else 1e6)]
    assert rec.timestamps_s.tolist() == [0.0] and np.isnan(rec.sample_interval_s)
    counts = (rec.skipped_packets, rec.dropped_size, rec.short_packets, rec.padded_packets, rec.truncated_bytes)
    assert counts == (0, 0, 0, 0, 0)


def test_interleaved_streams_other_traffic_and_padding(tmp_path: Path) -> None:
    """Two frames x (2 cores x 1 stream), one DNS packet, one padded CSI packet, one other size."""
    iqs = [iq_values(128, seed) for seed in range(4)]
    pkts = [(10, 0, frame(report(iqs[0], seq=16, core=0))), (10, 5, frame(report(iqs[1], seq=16, core=1))),
            (10, 7, frame(b"dns", port=53)),
            (10, 1000, frame(report(iqs[2], seq=32, core=0), trailer=b"\0\0\0\0")),
            (10, 1004, frame(report(iqs[3], seq=32, core=1))),
            (10, 2000, frame(report(iq_values(64), seq=48)))]
    path = tmp_path / "capture.pcap"
    path.write_bytes(pcap(pkts))
    rec = read_nexmon(path)
    assert rec.label is None and rec.bandwidth_mhz == 40 and rec.n_frames == 4
    assert (rec.skipped_packets, rec.dropped_size, rec.padded_packets) == (1, 1, 1)
    assert rec.streams == [(0, 0), (1, 0)] and rec.core.tolist() == [0, 1, 0, 1] and rec.seq.tolist() == [16, 16, 32, 32]
    np.testing.assert_array_equal(rec.timestamps_s, [0, 5e-6, 1e-3, 1.004e-3])
    with pytest.raises(DataError, match=r"interleave \(core, stream\) pairs \[\(0, 0\), \(1, 0\)\].*rec.stream"):
        amplitude_features(rec)
    core1 = rec.stream(1, 0)
    np.testing.assert_array_equal(core1.csi, np.stack([as_complex(iqs[1]), as_complex(iqs[3])]))
    np.testing.assert_allclose(core1.timestamps_s, [0, 999e-6], rtol=0, atol=1e-12)
    assert amplitude_features(core1).shape == (2, 128)
    with pytest.raises(DataError, match="no CSI of core 2, spatial stream 0"):
        rec.stream(2, 0)


def test_original_firmware_has_no_rssi(tmp_path: Path) -> None:
    iq = iq_values(256)
    path = tmp_path / "old.pcap"
    path.write_bytes(pcap([(1, 0, frame(report(iq, v1=True, chip=1, chanspec=0xE02A)))]))
    rec = read_nexmon(path)
    assert rec.rssi is None and rec.frame_control is None and rec.stream(0, 0).rssi is None
    assert (rec.chip, rec.bandwidth_mhz) == ("bcm4339", 80)
    np.testing.assert_array_equal(rec.csi[0], as_complex(iq))


def test_parse_name() -> None:
    assert parse_name("walk_1597159475.pcap") == "walk"
    assert parse_name("/x/40mhz_1600085286.pcap") == "40mhz"
    assert parse_name("walk_post_1597163546.pcap") == "walk"
    assert parse_name("test.pcap") is None and parse_name("walk_1597159475.dat") is None


# --- (3) truncated and foreign files ---


def test_truncated_capture_reads_its_complete_records(tmp_path: Path) -> None:
    pkts = [(1, i, frame(report(iq_values(64, i)))) for i in range(3)]
    whole = pcap(pkts)
    path = tmp_path / "cut.pcap"
    path.write_bytes(whole[:-100])
    rec = read_nexmon(path)
    last = 16 + len(pkts[2][2])
    assert rec.n_frames == 2 and rec.truncated_bytes == last - 100
    np.testing.assert_array_equal(rec.csi[1], as_complex(iq_values(64, 1)))
    path.write_bytes(whole[:24 + 16 + len(pkts[0][2]) + 10])  # 10 bytes of the second record header
    assert read_nexmon(path).truncated_bytes == 10


@needs_pi
def test_a_real_capture_cut_at_4_kib_keeps_its_whole_records(tmp_path: Path) -> None:
    data = (PI / "walk_1597159475.pcap").read_bytes()
    path = tmp_path / "walk_1597159475.pcap"
    path.write_bytes(data[:4096 * 20])
    full, cut = read_nexmon(PI / "walk_1597159475.pcap"), read_nexmon(path)
    n = (4096 * 20 - 24) // (16 + 1084)  # every record is 16 + 1084 bytes
    assert cut.n_frames == n and cut.truncated_bytes == 4096 * 20 - 24 - n * 1100
    np.testing.assert_array_equal(cut.csi, full.csi[:n])


def test_foreign_empty_and_unsupported_files_are_clear_errors(tmp_path: Path) -> None:
    def error(data: bytes, name: str = "x.pcap") -> str:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DataError) as e:
            read_nexmon(path)
        return str(e.value)

    assert "not a pcap file (first bytes 48656c6c" in error(b"Hello, this is a text file" * 3)
    intel = DATA / "intel" / "misc" / "csi.dat"  # an Intel 5300 CSI Tool log, where the data is present
    assert "not a pcap file" in error(intel.read_bytes() if intel.is_file() else b"\0" * 64, "csi.dat")
    assert "pcapng file; convert it with 'editcap -F pcap" in error(struct.pack("<I", 0x0A0D0D0A) + b"\0" * 60)
    assert "shorter than the 24-byte pcap header" in error(b"")
    assert "link type 127" in error(pcap([], link=127))
    msg = error(pcap([(1, 0, frame(b"query", port=53))]))
    assert "no nexmon_csi report in its 1 packets" in msg and "port 5500" in msg and "0x1111" in msg
    assert "in its 0 packets" in error(pcap([]))
    cut = frame(report(iq_values(64)))
    header = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 100, 1)
    msg = error(header + struct.pack("<IIII", 1, 0, 100, len(cut)) + cut[:100])
    assert "1 of them cut short by the capture's snaplen" in msg
    msg = error(pcap([(1, 0, frame(report(iq_values(64), chip=3)))]))
    assert "bcm4358 (chip version 3)" in msg and "packed floating-point" in msg
    assert "an unknown chip (chip version 77)" in error(pcap([(1, 0, frame(report(iq_values(64), chip=77)))]))
    assert "CSI of 40 bytes per packet" in error(pcap([(1, 0, frame(report(iq_values(10))))]))
    missing = tmp_path / "none.pcap"
    with pytest.raises(DataError, match="not found; set EDGELAM_DATA"):
        read_nexmon(missing)


def test_missing_folder_says_to_set_edgelam_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELAM_DATA", str(tmp_path))
    with pytest.raises(DataError, match="set EDGELAM_DATA"):
        pi_recordings()
