"""The ``privacy`` config section: differential privacy (client- and sample-level, also under
asynchrony), secure aggregation and federated unlearning (``privacy/``). Flower's names where
Flower has one (``noise_multiplier``, ``clipping_norm``, ``target_delta``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgelam.config_checks import one_of as _one_of
from edgelam.config_checks import require as _require

DP_MODES = ("none", "central", "local", "sample")


@dataclass(frozen=True)
class DPConfig:
    # none; central: DP-FedAvg (McMahan et al. 2018): each client clips its update (update - start) to
    # clipping_norm C and the aggregator adds N(0, (sigma C)^2) to the sum (on the async driver: at
    # every server step); local: each client adds that noise to its own clipped update before it is
    # sent (no trusted aggregator); sample: DP-SGD on each client (Abadi et al. 2016): every example's
    # gradient clipped to C, N(0, (sigma C)^2) added to each batch's sum of gradients
    mode: str = "none"
    noise_multiplier: float | None = None  # sigma; null: calibrated to target_epsilon for the planned steps
    clipping_norm: float = 1.0  # C
    target_epsilon: float | None = None  # instead of noise_multiplier
    # delta of (epsilon, delta)-DP; null: 1 / (10 n), n = clients (central, local) or a client's examples (sample)
    target_delta: float | None = None
    accountant: str = "rdp"  # dp-accounting's rdp | pld
    # hierfavg, central: edge (every edge aggregation noises the sum of its devices' clipped updates, so
    # the cloud never sees an un-noised model) | cloud (the edges forward their devices' clipped sums and
    # the cloud noises the total; needs fl.hier.kappa2 = 1: after several edge rounds one device's effect
    # on an edge model is no longer bounded by C)
    noise_at: str = "edge"

    def __post_init__(self) -> None:
        _one_of(self.mode, "privacy.dp.mode", DP_MODES)
        _one_of(self.accountant, "privacy.dp.accountant", ["rdp", "pld"])
        _one_of(self.noise_at, "privacy.dp.noise_at", ["edge", "cloud"])
        _require(self.clipping_norm > 0, "privacy.dp.clipping_norm", "must be > 0", self.clipping_norm)
        if self.noise_multiplier is not None:
            _require(self.noise_multiplier > 0, "privacy.dp.noise_multiplier", "must be > 0 (sigma = 0 is no privacy; "
                     "set privacy.dp.mode: none instead)", self.noise_multiplier)
        if self.target_epsilon is not None:
            _require(self.target_epsilon > 0, "privacy.dp.target_epsilon", "must be > 0", self.target_epsilon)
        if self.target_delta is not None:
            _require(0 < self.target_delta < 1, "privacy.dp.target_delta", "must be in (0, 1)", self.target_delta)
        if self.mode == "none":
            return
        _require((self.noise_multiplier is None) != (self.target_epsilon is None), "privacy.dp",
                 "needs exactly one of noise_multiplier (sigma) and target_epsilon (sigma is then found for the "
                 "planned rounds)", {"noise_multiplier": self.noise_multiplier, "target_epsilon": self.target_epsilon})

    @property
    def on(self) -> bool:
        return self.mode != "none"

    @property
    def client_level(self) -> bool:
        return self.mode in ("central", "local")


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (Bonawitz et al. 2017): the aggregator learns only the cohort's sum."""

    enabled: bool = False
    threshold: int | None = None  # t: Shamir shares needed to unmask; null: floor(2 m / 3) + 1 of a cohort of m
    bits: int = 16  # quantisation bits per coordinate
    clip: float = 1.0  # quantisation range [-clip, clip] of each sent coordinate (with privacy.dp: clipping_norm)
    # the chance that a client goes silent between sharing its keys and sending its masked update
    # (simulated; its pairwise masks are removed with the survivors' shares)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _require(2 <= self.bits <= 30, "privacy.secagg.bits", "must be in [2, 30]", self.bits)
        _require(self.clip > 0, "privacy.secagg.clip", "must be > 0", self.clip)
        _require(0 <= self.dropout < 1, "privacy.secagg.dropout", "must be in [0, 1)", self.dropout)
        if self.threshold is not None:
            _require(self.threshold >= 2, "privacy.secagg.threshold", "must be >= 2 (one share would reveal the "
                     "secret) or null", self.threshold)


@dataclass(frozen=True)
class UnlearnConfig:
    # last: one checkpoint, overwritten each round; every: also keep state/rounds/<r>.safetensors after
    # each round, so `edgelam unlearn --method rollback` restarts before the client first took part
    checkpoints: str = "last"
    store_updates: bool = False  # keep every client's received update per round (FedEraser calibration)
    exclude: tuple[int, ...] = ()  # clients never selected: a run that unlearns them by retraining

    def __post_init__(self) -> None:
        _one_of(self.checkpoints, "privacy.unlearn.checkpoints", ["last", "every"])
        _require(all(k >= 0 for k in self.exclude), "privacy.unlearn.exclude", "must list client ids >= 0", self.exclude)
        _require(len(set(self.exclude)) == len(self.exclude), "privacy.unlearn.exclude", "must not repeat a client",
                 self.exclude)


@dataclass(frozen=True)
class PrivacyConfig:
    dp: DPConfig = field(default_factory=DPConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
