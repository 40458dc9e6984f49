"""Wi-Fi CSI from Broadcom chips patched with nexmon_csi (Raspberry Pi 3B+/4: bcm43455c0).

Data: the CSIKit data repository (MIT; ``$EDGELAM_DATA/wifi_csi/labelled_2020/pi/*.pcap``,
default ``../shared/data``), captured on a Raspberry Pi 4. ``<label>_<unix time>.pcap`` carries
its label in the name (as ``wifi.parse_name``); ``40mhz_...`` is labelled by its channel width.

File format: a classic libpcap file (magic a1b2c3d4 microsecond or a1b23c4d nanosecond
timestamps, either byte order; link type Ethernet, Linux cooked capture v1/v2 or raw IPv4) of
IPv4 UDP datagrams that the firmware sends to port 5500 (from 10.10.10.10 to 255.255.255.255;
the address is not checked, so forwarded captures read too). Each UDP payload is one CSI
report, little-endian (csi_extractor.c, struct csi_udp_frame):

  magic 0x1111 u16   rssi i8 (dBm)   frame_control u8   source MAC 6 bytes
  seq u16 (802.11 sequence control: sequence number << 4 | fragment)
  core/stream u16 (core = bits 0-2, spatial stream = bits 3-5)   chanspec u16   chip u16
  then nsub x 4 bytes of CSI, nsub = 64 / 128 / 256 for 20 / 40 / 80 MHz (3.2 per MHz)

The original firmware writes a 4-byte magic 0x11111111 in place of magic, rssi and frame
control; such captures read with ``rssi`` and ``frame_control`` None. ``chip`` is nexmon's
CHIP_VER code (firmware_version.h): 1 bcm4339, 3 bcm4358, 101 bcm43455c0, 106 bcm4366c0. On
bcm4339 and bcm43455c0 each subcarrier is int16 I then int16 Q (the firmware's int14 values
sign-extended; csireader.m); bcm4358 and bcm4366c0 send a packed floating-point format that is
not read here (DataError naming the chip). Chanspec (Broadcom d11ac): channel = bits 0-7,
bandwidth code bits 11-13 (2: 20, 3: 40, 4: 80, 5: 160 MHz), band bits 14-15 (0: 2.4, 3: 5 GHz).

CSI is kept raw, in FFT order as the chip reports it: column i is subcarrier k = i for
i < nsub / 2, else i - nsub (``NexmonRecording.subcarrier_indices``; ``np.fft.fftshift`` puts
k = -nsub/2 first). The DC and guard-band bins carry no channel estimate, and in these Pi files
bins 0-2 hold header-like values rather than CSI (bin 0 e.g. 6181+0j, bin 1 about
-14000-32640j, bin 2 128+0j or 1152+0j), so mask them before normalising features. Frames sent
on a 20 MHz primary channel (beacons, control frames) fill only that part of a 40 / 80 MHz report.

Cores and spatial streams: for every received frame the firmware sends one packet per enabled
(core, spatial stream) pair (makecsiparams -C core mask, -N stream mask), one after another,
sharing MAC and seq. Each packet is one row here, in file order, so with C cores and N streams
the rows cycle through the C * N pairs (a lost packet breaks the cycle: group rows by seq, core
and stream, not by position; ``NexmonRecording.stream`` picks one pair). The Pi has one core
and one stream, so every row of these files is core 0, stream 0.

Timestamps are the pcap capture times (the host's clock when tcpdump saw the packet); the
report itself carries no chip timestamp. A truncated file (the last record cut short) is read up
to its last complete record and ``truncated_bytes`` says how much was left.

tests/test_sensing_nexmon.py checks every frame against CSIKit 2.5's NEXBeamformReader
(scaled=False): the same raw I/Q in the same FFT order. CSIKit differs in that it drops packets
whose captured length is not 60 + 4 * nsub (e.g. with 4 bytes of Ethernet padding, kept here,
see ``padded_packets``) and appends as many all-zero frames with timestamp 0 at the end, merges
consecutive packets with one seq into (nsub, streams, cores) frames, and returns complex128.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgelam.data.sources import DataError
from edgelam.sensing.wifi import DATASET, data_root

PI_DIR = "pi"  # the Raspberry Pi captures under DATASET
CSI_PORT = 5500
HEADER = struct.Struct("<HbB6sHHHH")  # the 18-byte report header above
MAGIC = 0x1111
MAGIC_V1 = b"\x11\x11\x11\x11"  # original firmware: 4-byte magic, no rssi / frame control
BYTES_PER_SUBCARRIER = 4
SUBCARRIERS_BY_BANDWIDTH = {20: 64, 40: 128, 80: 256}
CHIPS = {1: "bcm4339", 3: "bcm4358", 101: "bcm43455c0", 106: "bcm4366c0"}  # nexmon CHIP_VER codes
INT16_CHIPS = {1, 101}  # chips whose CSI is int16 I, int16 Q
CHANSPEC_BANDWIDTH_MHZ = {2: 20, 3: 40, 4: 80, 5: 160}
CHANSPEC_BAND_GHZ = {0: 2.4, 3: 5.0}

# pcap magic (as read little-endian) -> (byte order, ticks per second)
_PCAP_MAGIC = {0xA1B2C3D4: ("<", 10**6), 0xD4C3B2A1: (">", 10**6),
               0xA1B23C4D: ("<", 10**9), 0x4D3CB2A1: (">", 10**9)}
_PCAPNG_MAGIC = 0x0A0D0D0A
_LINK_ETHERNET, _LINK_RAW, _LINK_IPV4, _LINK_SLL, _LINK_SLL2 = 1, 101, 228, 113, 276
_LINK_NAMES = {_LINK_ETHERNET: "Ethernet", _LINK_RAW: "raw IP", _LINK_IPV4: "IPv4",
               _LINK_SLL: "Linux cooked capture", _LINK_SLL2: "Linux cooked capture v2"}
_ETHERTYPE_IPV4, _ETHERTYPE_VLAN = 0x0800, 0x8100
_BANDWIDTH_MHZ = {n: bw for bw, n in SUBCARRIERS_BY_BANDWIDTH.items()}
_NAME = re.compile(r"^(?P<label>.+?)(?:_post)?_(?P<time>\d+)\.pcap$")


@dataclass(frozen=True, eq=False)
class NexmonRecording:
    """One nexmon_csi capture: per-frame arrays share their first axis (one row per CSI packet)."""

    path: Path
    label: str | None  # from '<label>_<unix time>.pcap', else None
    chip: str  # e.g. 'bcm43455c0'
    chip_version: int  # nexmon's CHIP_VER code (101 for bcm43455c0)
    bandwidth_mhz: int  # 20 / 40 / 80, from the subcarrier count (nsub / 3.2)
    csi: np.ndarray  # (frames, nsub) complex64: int16 I + 1j * int16 Q, FFT order (see module docs)
    unix_time_s: np.ndarray  # (frames,) float64 pcap capture time, seconds since 1970
    timestamps_s: np.ndarray  # (frames,) float64 seconds since the first frame (exact tick differences)
    rssi: np.ndarray | None  # (frames,) int8 dBm; None for the original 4-byte-magic firmware
    frame_control: np.ndarray | None  # (frames,) uint8 first 802.11 frame-control byte; None as rssi
    mac: np.ndarray  # (frames,) str 'aa:bb:cc:dd:ee:ff', the transmitter of the measured frame
    seq: np.ndarray  # (frames,) uint16 802.11 sequence control (seq << 4 | fragment); 0 for control frames
    core: np.ndarray  # (frames,) uint8 receive core (0-7)
    spatial_stream: np.ndarray  # (frames,) uint8 spatial stream (0-7)
    chanspec: np.ndarray  # (frames,) uint16 Broadcom chanspec (decode_chanspec)
    skipped_packets: int  # packets that are not nexmon CSI reports (other traffic)
    dropped_size: int  # CSI packets left out: their subcarrier count differs from the file's most common
    short_packets: int  # CSI packets captured shorter than their UDP length (snaplen), left out
    padded_packets: int  # CSI packets with bytes after the UDP datagram (Ethernet padding; ignored)
    truncated_bytes: int  # bytes after the last complete pcap record (an incomplete record cut off)

    @property
    def n_frames(self) -> int:
        return int(self.csi.shape[0])

    @property
    def n_subcarriers(self) -> int:
        return int(self.csi.shape[1])

    @property
    def subcarrier_indices(self) -> np.ndarray:
        """(nsub,) int subcarrier k of each CSI column: 0, 1, ..., nsub/2 - 1, -nsub/2, ..., -1."""
        n = self.n_subcarriers
        return np.fft.fftfreq(n, 1 / n).round().astype(np.int64)

    @property
    def streams(self) -> list[tuple[int, int]]:
        """The (core, spatial stream) pairs present, sorted."""
        return sorted({(int(c), int(s)) for c, s in zip(self.core, self.spatial_stream)})

    @property
    def sample_interval_s(self) -> float:
        """Median time between frames (NaN with fewer than two frames)."""
        if self.n_frames < 2:
            return float("nan")
        return float(np.median(np.diff(self.timestamps_s)))

    def stream(self, core: int, spatial_stream: int) -> NexmonRecording:
        """The rows of one (core, spatial stream) pair, in file order."""
        rows = (self.core == core) & (self.spatial_stream == spatial_stream)
        if not rows.any():
            raise DataError(f"{self.path}: no CSI of core {core}, spatial stream {spatial_stream}; "
                            f"it has (core, stream) {self.streams}")

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[rows]

        first = float(self.timestamps_s[rows][0])
        return replace(self, csi=self.csi[rows], unix_time_s=self.unix_time_s[rows],
                       timestamps_s=self.timestamps_s[rows] - first, rssi=pick(self.rssi),
                       frame_control=pick(self.frame_control), mac=self.mac[rows], seq=self.seq[rows],
                       core=self.core[rows], spatial_stream=self.spatial_stream[rows],
                       chanspec=self.chanspec[rows])


def parse_name(path: str | Path) -> str | None:
    """The label of '<label>_<unix time>.pcap' ('walk_1597159475.pcap' -> 'walk', '_post'
    stripped as in wifi.parse_name); None for other names."""
    m = _NAME.match(Path(path).name)
    return m["label"] if m else None


def decode_chanspec(chanspec: int) -> tuple[int, int | None, float | None]:
    """(channel, bandwidth MHz, band GHz) of a Broadcom d11ac chanspec; None where the code is
    not one of 20/40/80/160 MHz or 2.4/5 GHz."""
    return (chanspec & 0xFF, CHANSPEC_BANDWIDTH_MHZ.get((chanspec >> 11) & 7),
            CHANSPEC_BAND_GHZ.get((chanspec >> 14) & 3))


def _ip_offset(link: int, pkt: bytes) -> int | None:
    """Where the IPv4 header starts in a packet of this link type, None if not IPv4."""
    if link == _LINK_ETHERNET:
        off, ethertype = 12, None
        while len(pkt) >= off + 2:
            ethertype = int.from_bytes(pkt[off:off + 2], "big")
            if ethertype != _ETHERTYPE_VLAN:
                break
            off += 4  # skip an 802.1Q tag
        return off + 2 if ethertype == _ETHERTYPE_IPV4 else None
    if link == _LINK_SLL:
        return 16 if pkt[14:16] == b"\x08\x00" else None
    if link == _LINK_SLL2:
        return 20 if pkt[0:2] == b"\x08\x00" else None
    return 0  # raw IP / IPv4


def _udp_payload(link: int, pkt: bytes) -> tuple[bytes | None, bool, bool]:
    """(payload of a UDP datagram to port 5500 or None, cut short by the snaplen, trailing bytes)."""
    ip = _ip_offset(link, pkt)
    if ip is None or len(pkt) < ip + 20 or pkt[ip] >> 4 != 4 or pkt[ip + 9] != 17:
        return None, False, False
    if int.from_bytes(pkt[ip + 6:ip + 8], "big") & 0x3FFF:
        return None, False, False  # an IP fragment
    udp = ip + (pkt[ip] & 0x0F) * 4
    if len(pkt) < udp + 8 or int.from_bytes(pkt[udp + 2:udp + 4], "big") != CSI_PORT:
        return None, False, False
    end = udp + int.from_bytes(pkt[udp + 4:udp + 6], "big")
    if end > len(pkt):
        return None, True, False
    return pkt[udp + 8:end], False, end < len(pkt)


def _pcap(data: bytes, path: Path) -> tuple[str, int, int, list[tuple[int, int, bytes]], int]:
    """(byte order, ticks per second, link type, [(seconds, ticks, packet)], truncated bytes)."""
    if len(data) < 24:
        raise DataError(f"{path}: {len(data)} bytes, shorter than the 24-byte pcap header; it is not a "
                        f"complete pcap capture (write one with tcpdump -w on the nexmon_csi interface)")
    magic = int.from_bytes(data[:4], "little")
    if magic not in _PCAP_MAGIC:
        what = ("a pcapng file; convert it with 'editcap -F pcap in.pcapng out.pcap' or capture with "
                "'tcpdump -w'" if magic == _PCAPNG_MAGIC else
                f"not a pcap file (first bytes {data[:4].hex()}; a classic pcap starts with a1b2c3d4 or "
                f"a1b23c4d in either byte order)")
        raise DataError(f"{path}: {what}; nexmon_csi captures are read from classic libpcap files")
    order, ticks = _PCAP_MAGIC[magic]
    major, minor, _, _, _, network = struct.unpack_from(order + "HHiIII", data, 4)
    link = network & 0xFFFF
    if major != 2 or link not in _LINK_NAMES:
        raise DataError(f"{path}: pcap version {major}.{minor}, link type {link}; expected version 2.x with "
                        f"link type {', '.join(f'{k} ({v})' for k, v in _LINK_NAMES.items())}; re-capture "
                        f"with 'tcpdump -i <nexmon interface> dst port {CSI_PORT} -w file.pcap'")
    record = struct.Struct(order + "IIII")
    packets: list[tuple[int, int, bytes]] = []
    cursor = 24
    while len(data) - cursor >= record.size:
        sec, frac, incl, _ = record.unpack_from(data, cursor)
        end = cursor + record.size + incl
        if end > len(data):
            break  # the last record was cut short
        packets.append((sec, frac, data[cursor + record.size:end]))
        cursor = end
    return order, ticks, link, packets, len(data) - cursor


def read_nexmon(path: str | Path) -> NexmonRecording:
    """Read a nexmon_csi pcap capture (see the module docs for the format and conventions).

    Packets that are not CSI reports are skipped (``skipped_packets``); CSI packets whose
    subcarrier count differs from the file's most common one are dropped (``dropped_size``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSI file '{path}' not found; set EDGELAM_DATA to the folder holding '{DATASET}/' "
                        f"(default ../shared/data) or give an existing path")
    data = path.read_bytes()
    _, ticks, link, packets, truncated = _pcap(data, path)

    rows: list[tuple[int, int, bool, tuple[Any, ...], bytes]] = []  # (sec, ticks, v1, header, csi)
    skipped = short = padded = 0
    for sec, frac, pkt in packets:
        payload, cut, trailer = _udp_payload(link, pkt)
        if cut:
            short += 1
            continue
        v1 = payload is not None and payload[:4] == MAGIC_V1
        if payload is None or len(payload) < HEADER.size or (not v1 and payload[:2] != b"\x11\x11"):
            skipped += 1
            continue
        padded += trailer
        rows.append((sec, frac, v1, HEADER.unpack_from(payload), payload[HEADER.size:]))
    if not rows:
        cut_note = f", {short} of them cut short by the capture's snaplen" if short else ""
        raise DataError(f"{path}: no nexmon_csi report in its {len(packets)} packets{cut_note} (link type "
                        f"{_LINK_NAMES[link]}; {truncated} bytes of an incomplete last record); expected UDP "
                        f"datagrams to port {CSI_PORT} whose payload starts with the magic 0x1111, as nexmon_csi "
                        f"sends them (capture with 'tcpdump -i <interface> dst port {CSI_PORT} -s 0 -w file.pcap')")

    sizes = Counter(len(csi) for *_, csi in rows)
    size, _ = sizes.most_common(1)[0]
    nsub, rem = divmod(size, BYTES_PER_SUBCARRIER)
    if rem or nsub not in SUBCARRIERS_BY_BANDWIDTH.values():
        raise DataError(f"{path}: CSI of {size} bytes per packet (most common of {dict(sizes)}); expected "
                        f"{', '.join(f'{4 * n} ({bw} MHz)' for bw, n in SUBCARRIERS_BY_BANDWIDTH.items())} "
                        f"after the 18-byte report header")
    kept = [r for r in rows if len(r[4]) == size]

    chips = sorted({int(r[3][7]) for r in kept})
    if len(chips) > 1 or chips[0] not in INT16_CHIPS:
        names = ", ".join(f"{CHIPS.get(c, 'an unknown chip')} (chip version {c})" for c in chips)
        if len(chips) > 1:
            fix = "a capture should hold one chip's reports; split it by the chip field"
        elif chips[0] in CHIPS:
            fix = (f"{CHIPS[chips[0]]} sends packed floating-point CSI, which is not read here (CSIKit's "
                   f"NEXBeamformReader or nexmon_csi's unpack_float.c read it)")
        else:
            fix = "nexmon's firmware_version.h lists the chip codes; this is not a known nexmon_csi chip"
        readable = ", ".join(CHIPS[c] for c in sorted(INT16_CHIPS))
        raise DataError(f"{path}: CSI from {names}; {fix}. Readable chips: {readable} (int16 I/Q CSI)")
    chip_version = chips[0]
    versions = {v1 for _, _, v1, _, _ in kept}
    if len(versions) > 1:
        raise DataError(f"{path}: mixes reports of the original (4-byte magic) and current (magic, RSSI, frame "
                        f"control) nexmon_csi firmware; split the capture by firmware")
    v1 = versions.pop()

    head = [h for *_, h, _ in kept]
    iq = np.frombuffer(b"".join(r[4] for r in kept), dtype="<i2").reshape(len(kept), nsub, 2).astype(np.float32)
    csi = (iq[..., 0] + 1j * iq[..., 1]).astype(np.complex64)
    secs = np.array([r[0] for r in kept], dtype=np.int64)
    fracs = np.array([r[1] for r in kept], dtype=np.int64)
    total = secs * ticks + fracs  # integer ticks: exact differences
    core_ss = np.array([h[5] for h in head], dtype=np.uint16)
    rssi = None if v1 else np.array([h[1] for h in head], dtype=np.int8)
    fc = None if v1 else np.array([h[2] for h in head], dtype=np.uint8)
    mac = np.array([h[3].hex(":") for h in head])
    return NexmonRecording(
        path=path, label=parse_name(path), chip=CHIPS[chip_version], chip_version=chip_version,
        bandwidth_mhz=_BANDWIDTH_MHZ[nsub], csi=csi, unix_time_s=secs + fracs / ticks,
        timestamps_s=(total - total[0]).astype(np.float64) / ticks, rssi=rssi, frame_control=fc, mac=mac,
        seq=np.array([h[4] for h in head], dtype=np.uint16), core=(core_ss & 7).astype(np.uint8),
        spatial_stream=((core_ss >> 3) & 7).astype(np.uint8),
        chanspec=np.array([h[6] for h in head], dtype=np.uint16), skipped_packets=skipped,
        dropped_size=len(rows) - len(kept), short_packets=short, padded_packets=padded, truncated_bytes=truncated)


def amplitude_features(rec: NexmonRecording) -> np.ndarray:
    """(frames, nsub) float32 |csi| in FFT order (columns as ``rec.subcarrier_indices``), for a
    recording of one (core, spatial stream) pair; pick one with ``rec.stream(core, stream)``
    first when the capture interleaves several."""
    if len(rec.streams) > 1:
        raise DataError(f"{rec.path}: rows interleave (core, stream) pairs {rec.streams}; take one with "
                        f"rec.stream(core, spatial_stream) before computing per-frame features")
    amp = np.abs(rec.csi).astype(np.float32)
    if not np.all(np.isfinite(amp)):
        raise DataError(f"{rec.path}: CSI amplitudes are not all finite")
    return amp


def pi_recordings(root: str | Path | None = None) -> list[NexmonRecording]:
    """Every ``pi/*.pcap`` under ``root`` (default ``$EDGELAM_DATA/wifi_csi/labelled_2020``), sorted by path."""
    root = Path(root) if root is not None else data_root() / DATASET
    folder = root / PI_DIR
    if not folder.is_dir():
        raise DataError(f"nexmon CSI folder '{folder}' not found; set EDGELAM_DATA to the folder holding "
                        f"'{DATASET}/' (default ../shared/data) or pass root=<the labelled_2020 folder>")
    paths = sorted(folder.glob("*.pcap"))
    if not paths:
        raise DataError(f"'{folder}' holds no .pcap files")
    return [read_nexmon(p) for p in paths]
