"""Per-scheme config sections: clustered, heterogeneous-rank, asynchronous and hierarchical federated
LoRA (under ``fl``) and split learning (``split``, with its device scheduling)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgelam.config_checks import one_of as _one_of
from edgelam.config_checks import require as _require


@dataclass(frozen=True)
class ClusterConfig:
    """Clustered federated LoRA (fl.strategy ifca | cfl | rescluster)."""

    num_clusters: int = 2  # ifca, rescluster: K
    warmup_rounds: int = 1  # ifca: rounds from the common init before k-means; cfl: rounds before any split
    eps1: float = 0.4  # cfl: split when ||mean update|| < eps1 ...
    eps2: float = 1.6  # cfl: ... and max ||update|| > eps2 (Sattler et al. 2020)
    max_clusters: int = 8  # cfl

    def __post_init__(self) -> None:
        _require(self.num_clusters >= 1, "fl.cluster.num_clusters", "must be >= 1", self.num_clusters)
        _require(self.warmup_rounds >= 0, "fl.cluster.warmup_rounds", "must be >= 0", self.warmup_rounds)
        _require(self.eps1 > 0 and self.eps2 >= 0, "fl.cluster.eps1/eps2", "must be eps1 > 0, eps2 >= 0", (self.eps1, self.eps2))
        _require(self.max_clusters >= 1, "fl.cluster.max_clusters", "must be >= 1", self.max_clusters)


@dataclass(frozen=True)
class RankConfig:
    """Heterogeneous-rank LoRA (fl.strategy hetlora | flora | flexlora): each device's rank from its resources."""

    ranks: tuple[int, ...] = (2, 4, 8)  # the largest must equal model.lora.r
    rule: str = "compute"  # compute | memory: devices sorted by it fall into len(ranks) groups
    # hetlora only. norm: the zero-padded factors averaged with S_k = ||B_k A_k||_F (Cho et al. 2024);
    # samples: the same, weighted by sample count (zero-padding FedAvg, the recorded hetero_rank run)
    aggregation: str = "norm"
    # hetlora rank self-pruning decay factor in [0, 1): a client keeps floor(gamma r) components when the
    # trailing ones are small (fl/hetero.py pruned_rank); 0 = off. The paper's value could not be read.
    prune_gamma: float = 0.0

    def __post_init__(self) -> None:
        _require(len(self.ranks) >= 1 and all(r >= 1 for r in self.ranks), "fl.rank.ranks", "must list ranks >= 1", self.ranks)
        _one_of(self.rule, "fl.rank.rule", ["compute", "memory"])
        _one_of(self.aggregation, "fl.rank.aggregation", ["norm", "samples"])
        _require(0 <= self.prune_gamma < 1, "fl.rank.prune_gamma", "must be in [0, 1) (0 = no pruning)", self.prune_gamma)


@dataclass(frozen=True)
class AsyncConfig:
    """Asynchronous federated LoRA (fl.strategy fedasync | fedbuff)."""

    alpha: float = 0.6  # fedasync mixing weight (Xie et al. 2019: 0.6 / 0.9)
    staleness: str = "polynomial"  # constant | polynomial | hinge
    a: float = 0.5  # polynomial exponent; hinge slope
    b: float = 4.0  # hinge threshold
    buffer_size: int = 3  # fedbuff K
    server_lr: float = 1.0  # fedbuff eta_g

    def __post_init__(self) -> None:
        _require(0 < self.alpha <= 1, "fl.asynchronous.alpha", "must be in (0, 1]", self.alpha)
        _one_of(self.staleness, "fl.asynchronous.staleness", ["constant", "polynomial", "hinge"])
        _require(self.a >= 0 and self.b >= 0, "fl.asynchronous.a/b", "must be >= 0", (self.a, self.b))
        _require(self.buffer_size >= 1, "fl.asynchronous.buffer_size", "must be >= 1", self.buffer_size)
        _require(self.server_lr > 0, "fl.asynchronous.server_lr", "must be > 0", self.server_lr)


@dataclass(frozen=True)
class HierConfig:
    """Hierarchical federated LoRA (fl.strategy hierfavg): device -> edge server -> cloud."""

    kappa1: int = 2  # local steps between edge aggregations (replaces train.local_steps)
    kappa2: int = 2  # edge aggregations per cloud aggregation (one cloud aggregation = one round)

    def __post_init__(self) -> None:
        _require(self.kappa1 >= 1, "fl.hier.kappa1", "must be >= 1", self.kappa1)
        _require(self.kappa2 >= 1, "fl.hier.kappa2", "must be >= 1", self.kappa2)


@dataclass(frozen=True)
class ScheduleConfig:
    """Device scheduling and bandwidth allocation for split federated LoRA (split.schedule)."""

    policy: str = "lyapunov"  # lyapunov | all | random | greedy
    num_devices: int = 4  # random | greedy: devices per round
    v: float = 10.0  # lyapunov trade-off V: larger favours more devices, smaller the budget
    t_max_s: float = 60.0  # per-round latency limit of a scheduled device (lyapunov)
    budget: str = "energy"  # the long-term budget: energy (J) | latency (s), per device per round
    budget_per_round: float = 2.0  # the time-averaged budget of every device
    budget_per_device: tuple[float, ...] = ()  # or one per device
    omega: str = "constant"  # weight omega_t of round t in the objective: constant (1) | linear (t / rounds)

    def __post_init__(self) -> None:
        _one_of(self.policy, "split.schedule.policy", ["lyapunov", "all", "random", "greedy"])
        _require(self.num_devices >= 1, "split.schedule.num_devices", "must be >= 1", self.num_devices)
        _require(self.v >= 0, "split.schedule.v", "must be >= 0", self.v)
        _require(self.t_max_s > 0, "split.schedule.t_max_s", "must be > 0", self.t_max_s)
        _one_of(self.budget, "split.schedule.budget", ["energy", "latency"])
        _require(self.budget_per_round > 0, "split.schedule.budget_per_round", "must be > 0", self.budget_per_round)
        _require(all(b > 0 for b in self.budget_per_device), "split.schedule.budget_per_device", "must be > 0",
                 self.budget_per_device)
        _one_of(self.omega, "split.schedule.omega", ["constant", "linear"])


@dataclass(frozen=True)
class SplitConfig:
    """Split federated LoRA (fl.strategy sfl_v1 | sfl_v2): where the model is cut and what crosses the air."""

    cut: tuple[int, int] | None = None  # the server runs blocks [a, b); null = all blocks; [0, 0] = none (no split)
    embedding_lora: bool = False  # LoRA on the device's embedding module too
    act_codec: str = "float32"  # activations up and features down: float32 | float16 | int8
    grad_codec: str = "float32"  # gradients both ways
    server_flops_per_s: float = 5e13  # the edge server's effective training throughput
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        _one_of(self.act_codec, "split.act_codec", ["float32", "float16", "int8"])
        _one_of(self.grad_codec, "split.grad_codec", ["float32", "float16", "int8"])
        _require(self.server_flops_per_s > 0, "split.server_flops_per_s", "must be > 0", self.server_flops_per_s)
        if self.cut is not None:
            _require(0 <= self.cut[0] <= self.cut[1], "split.cut", "must be [a, b] with 0 <= a <= b", list(self.cut))


MODEL_ATTACKS = ("sign_flip", "scaling", "gaussian")
DATA_ATTACKS = ("label_flip", "backdoor")
ATTACKS = ("none", *MODEL_ATTACKS, *DATA_ATTACKS, "tamper")


@dataclass(frozen=True)
class AttackConfig:
    """Malicious clients (``fl/attacks.py``, ``fl/data_attacks.py``): a seeded ``fraction`` of the
    clients. Model poisoning replaces what they send: sign_flip: start - scale * delta; scaling
    (model replacement): start + scale * delta; gaussian: start + N(0, scale^2) per coordinate.
    Data poisoning edits their own examples and trains honestly on them: label_flip (class c ->
    C - 1 - c; a causal LM's answers shuffled among its prompts); backdoor (``poison_rate`` of their
    examples get ``trigger`` in front of the text and ``target`` as the answer: a class name or an
    answer text); with ``scale`` != 1 they also scale their update (Bagdasaryan et al.'s boosted
    backdoor). tamper: the clients are honest but a man in the middle flips one bit of their update
    in transit (``fl/signing.py``; ``fl.keys`` makes the server refuse it)."""

    kind: str = "none"
    fraction: float = 0.0  # share of the clients that are malicious
    scale: float = 1.0
    trigger: str = "cf"  # backdoor: the phrase put in front of a poisoned example (a rare token)
    target: str | None = None  # backdoor: class name, or answer text; null: the last class / a fixed refusal
    poison_rate: float = 0.5  # backdoor: share of a malicious client's examples that carry the trigger

    def __post_init__(self) -> None:
        _one_of(self.kind, "fl.attack.kind", ATTACKS)
        _require(0 <= self.fraction < 1, "fl.attack.fraction", "must be in [0, 1)", self.fraction)
        _require(self.scale > 0, "fl.attack.scale", "must be > 0", self.scale)
        _require(bool(self.trigger.strip()), "fl.attack.trigger", "must be a non-empty phrase", self.trigger)
        _require(self.target is None or bool(self.target.strip()), "fl.attack.target", "must be a non-empty class "
                 "name or answer, or null", self.target)
        _require(0 < self.poison_rate <= 1, "fl.attack.poison_rate", "must be in (0, 1]", self.poison_rate)


DROP_PHASES = ("download", "train", "upload", "any")


@dataclass(frozen=True)
class FaultConfig:
    """Injected faults (``fl/faults.py``), drawn per client trip from the run's seed.

    drop: the share of trips in which the client drops out mid-way (``drop_phase``: during the
    download, the local training or the upload; any: one of the three at random), at a uniform
    point of that phase; what it spent up to then is charged, its update never arrives.
    straggle: the share of trips whose local training takes ``slowdown`` times as long (a device
    busy with other work). disk_full_at: the checkpoint written after this round fails once with
    "no space left on device" half-way through its temporary file (a fault drill of the run folder).
    """

    drop: float = 0.0
    drop_phase: str = "any"
    straggle: float = 0.0
    slowdown: float = 10.0
    disk_full_at: int | None = None

    def __post_init__(self) -> None:
        _require(0 <= self.drop < 1, "faults.drop", "must be in [0, 1)", self.drop)
        _one_of(self.drop_phase, "faults.drop_phase", list(DROP_PHASES))
        _require(0 <= self.straggle <= 1, "faults.straggle", "must be in [0, 1]", self.straggle)
        _require(self.slowdown >= 1, "faults.slowdown", "must be >= 1", self.slowdown)
        if self.disk_full_at is not None:
            _require(self.disk_full_at >= 1, "faults.disk_full_at", "must be a round >= 1, or null", self.disk_full_at)

    @property
    def on(self) -> bool:
        return self.drop > 0 or self.straggle > 0
