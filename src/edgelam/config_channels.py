"""The ``channels`` config section: generated CSI for channel prediction (``data.source: cdl``,
``task: channel_prediction``; ``channels/csi.py``, ``channels/data.py``), and ``beams``: beam
prediction on DeepMIMO New York (``data.source: deepmimo``, ``task: beam_prediction``)."""

from __future__ import annotations

from dataclasses import dataclass

from edgelam.config_checks import one_of as _one_of
from edgelam.config_checks import require as _require

CDL_PROFILES = ("A", "B", "C", "D", "E")


@dataclass(frozen=True)
class ChannelConfig:
    # tdd: `past` uplink slots -> the next `future` slots of the same band; fdd: the same past -> the
    # adjacent downlink band over those slots (LLM4CP's two settings)
    mode: str = "tdd"
    # TR 38.901 CDL profiles the clients train on; data.partition by_task: client k gets profiles[k % len]
    profiles: tuple[str, ...] = CDL_PROFILES
    eval_profiles: tuple[str, ...] = ()  # evaluation environments (empty: the training ones); others are zero-shot
    delay_spread_ns: float = 300.0
    speed_kmh: tuple[float, float] = (10.0, 100.0)  # UE speed, uniform per user
    eval_speed_kmh: tuple[float, float] | None = None  # evaluation speeds (null: speed_kmh)
    carrier_ghz: float = 2.4
    subcarriers: int = 48  # per band
    spacing_khz: float = 180.0
    bs_rows: int = 2  # a dual-polarised BS panel: 2 x rows x cols antennas, each link a sample
    bs_cols: int = 2
    slot_ms: float = 0.5
    past: int = 16
    future: int = 4
    users_per_client: int = 32  # user realisations per client (samples = users x antennas)
    eval_users: int = 16  # per evaluation profile
    snr_db: tuple[float, float] = (5.0, 20.0)  # training noise on the past, uniform per sample
    eval_snr_db: float = 18.0
    few_shot: float = 1.0  # share of each client's samples kept (LLM4CP's few-shot: 0.1)
    tune_norms: bool = True  # train the backbone's norms in full, as LLM4CP trains GPT-2's LayerNorms
    backbone_layers: int | None = None  # the first K decoder blocks only (LLM4CP: GPT-2's first 6); null: all

    def __post_init__(self) -> None:
        _one_of(self.mode, "channels.mode", ["tdd", "fdd"])
        for key, profiles in (("channels.profiles", self.profiles), ("channels.eval_profiles", self.eval_profiles)):
            bad = [p for p in profiles if p not in CDL_PROFILES]
            _require(not bad, key, f"must list CDL profiles from {list(CDL_PROFILES)}", list(profiles))
        _require(len(self.profiles) >= 1, "channels.profiles", "must list at least one CDL profile", self.profiles)
        for key, (lo, hi) in (("channels.speed_kmh", self.speed_kmh), ("channels.eval_speed_kmh",
                                                                         self.eval_speed_kmh or self.speed_kmh)):
            _require(0 <= lo <= hi, key, "must be [min, max] km/h with 0 <= min <= max", [lo, hi])
        for key, value in (("channels.delay_spread_ns", self.delay_spread_ns), ("channels.carrier_ghz", self.carrier_ghz),
                           ("channels.spacing_khz", self.spacing_khz), ("channels.slot_ms", self.slot_ms)):
            _require(value > 0, key, "must be > 0", value)
        for key, n in (("channels.subcarriers", self.subcarriers), ("channels.bs_rows", self.bs_rows),
                       ("channels.bs_cols", self.bs_cols), ("channels.past", self.past), ("channels.future", self.future),
                       ("channels.users_per_client", self.users_per_client), ("channels.eval_users", self.eval_users)):
            _require(n >= 1, key, "must be >= 1", n)
        _require(self.past >= 2, "channels.past", "must be >= 2 slots", self.past)
        _require(self.snr_db[0] <= self.snr_db[1], "channels.snr_db", "must be [min, max] dB", list(self.snr_db))
        _require(0 < self.few_shot <= 1, "channels.few_shot", "must be in (0, 1]", self.few_shot)
        if self.backbone_layers is not None:
            _require(self.backbone_layers >= 1, "channels.backbone_layers", "must be >= 1 or null", self.backbone_layers)


@dataclass(frozen=True)
class BeamConfig:
    # DeepMIMO New York base stations whose users are data; data.partition by_task: client k holds
    # users of base_stations[k % len] (non-IID by cell), iid: a share of every cell's users
    base_stations: tuple[int, ...] = (1, 2, 3)
    n_tx: int = 32  # BS uniform linear array (half-wavelength), DeepMIMO's array axis
    n_beams: int = 64  # DFT codebook, evenly spaced in sin-space
    features: str = "position"  # position | paths (strongest paths' angles, delays, powers) | track (past beams)
    track_length: int = 4  # features track: past beams along a user's grid row that predict the next one
    test_fraction: float = 0.2  # users held out per base station (the same split for every client)
    users_per_client: int | None = None  # cap on a client's training users (null: its whole share)

    def __post_init__(self) -> None:
        _require(len(self.base_stations) >= 1 and all(b in (1, 2, 3) for b in self.base_stations),
                 "beams.base_stations", "must list DeepMIMO New York base stations from [1, 2, 3]", self.base_stations)
        _require(len(set(self.base_stations)) == len(self.base_stations), "beams.base_stations",
                 "names a base station twice; list each once", list(self.base_stations))
        _one_of(self.features, "beams.features", ["position", "paths", "track"])
        _require(self.n_tx >= 1 and self.n_beams >= 2, "beams.n_tx/n_beams", "must be n_tx >= 1, n_beams >= 2",
                 (self.n_tx, self.n_beams))
        _require(self.track_length >= 1, "beams.track_length", "must be >= 1", self.track_length)
        _require(0 < self.test_fraction < 1, "beams.test_fraction", "must be in (0, 1)", self.test_fraction)
        if self.users_per_client is not None:
            _require(self.users_per_client >= 1, "beams.users_per_client", "must be >= 1 or null", self.users_per_client)
