"""Typed, frozen run configuration: YAML + ``key=value`` overrides, validated on construction.

Every section is a frozen dataclass validated in ``__post_init__``; ``config_load.load_config``
builds them from YAML and ``key=value`` overrides and reports unknown keys, wrong types and
impossible values with the dotted key and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgelam.config_channels import BeamConfig, ChannelConfig
from edgelam.config_draft import DraftConfig, check_draft
from edgelam.config_privacy import PrivacyConfig
from edgelam.config_runtime import ReportConfig, RuntimeConfig, check_runtime
from edgelam.config_sensing import SensingConfig
from edgelam.config_checks import ConfigError
from edgelam.config_checks import one_of as _one_of
from edgelam.config_checks import require as _require
from edgelam.config_schemes import (
    AttackConfig,
    AsyncConfig,
    ClusterConfig,
    FaultConfig,
    HierConfig,
    RankConfig,
    ScheduleConfig,
    SplitConfig,
)

__all__ = ["AsyncConfig", "BeamConfig", "ChannelConfig", "ClusterConfig", "ConfigError", "HierConfig", "RankConfig", "ScheduleConfig", "SplitConfig"]


# (the checks live in config_checks.py, the per-scheme sections in config_schemes.py; both are
# re-exported here, so ``from edgelam.config import RankConfig, ConfigError`` keeps working)


# --- sections ---


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        _require(self.r >= 1, "model.lora.r", "must be >= 1", self.r)
        _require(self.alpha > 0, "model.lora.alpha", "must be > 0", self.alpha)
        _require(0 <= self.dropout < 1, "model.lora.dropout", "must be in [0, 1)", self.dropout)
        _require(len(self.target_modules) > 0, "model.lora.target_modules", "must name at least one module", self.target_modules)


@dataclass(frozen=True)
class ModelConfig:
    # "tiny" (random 2-layer model for tests), "smollm2" (bundled SmolLM2-135M-Instruct GGUF),
    # a Hugging Face id, a local model folder, or a path to a .gguf file.
    name: str = "tiny"
    dtype: str = "float32"
    lora: LoraConfig = field(default_factory=LoraConfig)
    # what is trained: lora (model.lora's adapters) | full (decoder blocks' own weights, no LoRA;
    # models/full.py); full_blocks: null = every decoder block and the final norm, a list = those blocks.
    # Split learning (sfl_v1 | sfl_v2): null = the server's blocks; blocks not trained in full keep LoRA
    train: str = "lora"
    full_blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _one_of(self.dtype, "model.dtype", ["float32", "bfloat16", "float16"])
        _one_of(self.train, "model.train", ["lora", "full"])
        if self.full_blocks is None:
            return
        _require(self.train == "full", "model.full_blocks", "applies to model.train full only; remove it", self.full_blocks)
        _require(len(self.full_blocks) > 0, "model.full_blocks", "must list at least one block index, or be null "
                 "(every block and the final norm)", self.full_blocks)
        _require(min(self.full_blocks) >= 0, "model.full_blocks", "must list block indices >= 0", self.full_blocks)
        _require(len(set(self.full_blocks)) == len(self.full_blocks), "model.full_blocks", "must not repeat a block",
                 list(self.full_blocks))


# data.source values that are text classification sets (split learning with an encoder)
CLASSIFICATION_SOURCES = ("sst2", "agnews", "synthetic_sentiment", "synthetic_topics")


@dataclass(frozen=True)
class DataConfig:
    # auto (dolly if found, else synthetic) | synthetic | dolly | files | hf; classification (split
    # learning with an encoder): sst2 | agnews | synthetic_sentiment | synthetic_topics
    source: str = "synthetic"
    # dolly: folder or file (relative paths resolve against $EDGELAM_DATA); files: list of paths
    path: str | None = None
    files: tuple[str, ...] = ()
    format: str = "auto"
    hf_name: str | None = None
    hf_split: str = "train"
    tasks: tuple[str, ...] = ()  # synthetic task families (empty = all)
    examples_per_task: int = 200  # synthetic
    num_clients: int = 3
    # iid | dirichlet | by_task | presplit
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    client_tasks: tuple[tuple[str, ...], ...] = ()  # by_task: tasks of client i
    max_examples_per_client: int | None = None
    heldout_fraction: float = 0.1  # per-client held-out evaluation share
    global_eval_per_task: int = 10
    max_length: int = 128

    def __post_init__(self) -> None:
        _one_of(self.source, "data.source", ["auto", "synthetic", "dolly", "files", "hf", *CLASSIFICATION_SOURCES, "cdl", "deepmimo",
                                                 "wifi", "wifi_sim"])
        _one_of(self.partition, "data.partition", ["iid", "dirichlet", "by_task", "presplit"])
        _one_of(self.format, "data.format", ["auto", "dolly", "alpaca", "gsm8k", "fingpt", "messages", "prompt_completion", "text"])
        _require(self.num_clients >= 1, "data.num_clients", "must be >= 1", self.num_clients)
        _require(self.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0", self.dirichlet_alpha)
        _require(0 <= self.heldout_fraction < 1, "data.heldout_fraction", "must be in [0, 1)", self.heldout_fraction)
        _require(self.max_length >= 16, "data.max_length", "must be >= 16 tokens", self.max_length)
        _require(self.examples_per_task >= 1, "data.examples_per_task", "must be >= 1", self.examples_per_task)
        _require(self.global_eval_per_task >= 1, "data.global_eval_per_task", "must be >= 1", self.global_eval_per_task)
        if self.max_examples_per_client is not None:
            _require(self.max_examples_per_client >= 1, "data.max_examples_per_client", "must be >= 1 or null", self.max_examples_per_client)
        if self.source == "files":
            _require(len(self.files) > 0, "data.files", "must list at least one file when data.source is 'files'", self.files)
        if self.source == "hf":
            _require(bool(self.hf_name), "data.hf_name", "must name a Hugging Face dataset when data.source is 'hf'", self.hf_name)
        if self.partition == "presplit":
            _require(self.source in ("dolly", "auto"), "data.partition", "'presplit' needs data.source 'dolly' (its client files)", self.source)
        if self.client_tasks:
            _require(len(self.client_tasks) == self.num_clients, "data.client_tasks",
                     f"must have one task list per client ({self.num_clients})", len(self.client_tasks))


@dataclass(frozen=True)
class NetConfig:
    # Path loss: macro (128.1 + 37.6 log10 d_km), uma or umi (3GPP TR 38.901 Table 7.4.1-1).
    path_loss: str = "macro"
    carrier_ghz: float | None = None  # uma / umi (default 3.5); macro is a 2 GHz model and takes none
    cell_radius_m: float = 500.0
    min_distance_m: float = 10.0
    bs_height_m: float = 25.0
    ut_height_m: float = 1.5
    shadowing_db: float = 8.0
    fading: str = "rayleigh"  # rayleigh | none
    uplink_bandwidth_hz: float = 10e6
    downlink_bandwidth_hz: float = 20e6
    device_tx_power_dbm: tuple[float, float] = (23.0, 23.0)  # uniform range
    server_tx_power_dbm: float = 43.0
    noise_psd_dbm_hz: float = -174.0
    noise_figure_db: float = 7.0
    device_cpu_hz: tuple[float, float] = (0.5e9, 2.0e9)  # uniform range
    device_flops_per_cycle: float = 16.0
    device_memory_gb: tuple[float, float] = (4.0, 8.0)
    kappa: float = 1e-28  # effective switched capacitance (J/cycle/Hz^2)
    num_edge_servers: int = 1
    attach: tuple[int, ...] = ()  # edge server of each device (empty: the nearest one)
    server_tier: str = "edge"  # where the aggregator runs: edge | cloud
    backhaul_bps: float = 1e9
    backhaul_latency_s: float = 0.005

    def __post_init__(self) -> None:
        _one_of(self.path_loss, "net.path_loss", ["macro", "uma", "umi"])
        _one_of(self.fading, "net.fading", ["rayleigh", "none"])
        _one_of(self.server_tier, "net.server_tier", ["edge", "cloud"])
        if self.path_loss == "macro":
            _require(self.carrier_ghz in (None, 2.0), "net.carrier_ghz", "must be unset with net.path_loss 'macro' "
                     "(128.1 + 37.6 log10 d_km is a 2 GHz model); use path_loss uma or umi for another carrier", self.carrier_ghz)
        object.__setattr__(self, "carrier_ghz", self.carrier_ghz or (2.0 if self.path_loss == "macro" else 3.5))
        for key in ("carrier_ghz", "cell_radius_m", "min_distance_m", "uplink_bandwidth_hz", "downlink_bandwidth_hz",
                    "device_flops_per_cycle", "kappa", "backhaul_bps", "bs_height_m", "ut_height_m"):
            _require(getattr(self, key) > 0, f"net.{key}", "must be > 0", getattr(self, key))
        _require(self.min_distance_m < self.cell_radius_m, "net.min_distance_m", "must be < net.cell_radius_m", self.min_distance_m)
        _require(self.shadowing_db >= 0, "net.shadowing_db", "must be >= 0", self.shadowing_db)
        _require(self.backhaul_latency_s >= 0, "net.backhaul_latency_s", "must be >= 0", self.backhaul_latency_s)
        _require(self.num_edge_servers >= 1, "net.num_edge_servers", "must be >= 1", self.num_edge_servers)
        _require(all(0 <= e < self.num_edge_servers for e in self.attach), "net.attach",
                 f"must list edge server indices in [0, {self.num_edge_servers})", self.attach)
        for key in ("device_tx_power_dbm", "device_cpu_hz", "device_memory_gb"):
            lo, hi = getattr(self, key)
            _require(lo <= hi, f"net.{key}", "must be a [low, high] range with low <= high", [lo, hi])
        _require(self.device_cpu_hz[0] > 0, "net.device_cpu_hz", "must be > 0", self.device_cpu_hz)


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 4  # optimizer steps per round (ignored when local_epochs is set)
    local_epochs: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | linear | cosine (over one round's local steps)
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    prox_mu: float = 0.0  # FedProx proximal coefficient (used by strategy fedprox)

    def __post_init__(self) -> None:
        _require(self.local_steps >= 1, "train.local_steps", "must be >= 1", self.local_steps)
        if self.local_epochs is not None:
            _require(self.local_epochs >= 1, "train.local_epochs", "must be >= 1 or null", self.local_epochs)
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1", self.batch_size)
        _require(self.grad_accum >= 1, "train.grad_accum", "must be >= 1", self.grad_accum)
        _require(self.lr > 0, "train.lr", "must be > 0", self.lr)
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        _one_of(self.schedule, "train.schedule", ["constant", "linear", "cosine"])
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0", self.warmup_steps)
        if self.max_grad_norm is not None:
            _require(self.max_grad_norm > 0, "train.max_grad_norm", "must be > 0 or null", self.max_grad_norm)
        _require(self.prox_mu >= 0, "train.prox_mu", "must be >= 0", self.prox_mu)


@dataclass(frozen=True)
class FLConfig:
    strategy: str = "fedavg"
    rounds: int = 2
    fraction: float = 1.0  # share of clients sampled each round
    # fedavgm / fedadam server step size; null = the strategy's own default (fedavgm 1.0: a plain
    # FedAvg step when momentum is 0; fedadam 1e-2, Reddi et al. 2021: 1.0 moves LoRA ~90x a FedAvg step)
    server_lr: float | None = None
    server_momentum: float = 0.9  # fedavgm
    beta1: float = 0.9  # fedadam
    beta2: float = 0.99
    tau: float = 1e-3  # fedadam adaptivity
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    asynchronous: AsyncConfig = field(default_factory=AsyncConfig)
    hier: HierConfig = field(default_factory=HierConfig)
    # synchronous schemes: drop clients not back within this many simulated seconds (null = wait for all)
    deadline_s: float | None = None
    # how a set of client states becomes one, at every aggregation site (fl/aggregate.py REDUCERS):
    # mean (weighted by samples) | median | trimmed_mean (coordinate-wise, Yin et al. 2018; unweighted)
    # | krum | multi_krum (Blanchard et al. 2017: the update(s) closest to their n - f - 2 neighbours)
    aggregator: str = "mean"
    byzantine: int = 0  # f, the malicious updates an aggregation tolerates: krum / multi_krum; trimmed_mean cuts f per side
    # transforms on each client's update before it is sent, in order (fl/transforms.py): clip | float16
    uplink: tuple[str, ...] = ()
    clip_norm: float = 1.0  # clip: the largest L2 norm of a client's delta (update - start)
    # the server's gate on every received update (fl/validate.py): names, shapes, dtypes and finite
    # values are checked, an update failing is rejected with its reason; norm_bound: a received delta
    # longer than this is scaled down to it (server-side norm bounding, Sun et al. 2019); null: off
    norm_bound: float | None = None
    attack: AttackConfig = field(default_factory=AttackConfig)  # malicious clients (fl/attacks.py)
    # each client signs its update's bytes (fl/signing.py): auto (fresh keys in memory) or a keyring
    # file (`edgelam keys`) holding client0 .. client<N-1>; the server refuses an update whose MAC fails
    keys: str | None = None

    def __post_init__(self) -> None:
        _one_of(self.strategy, "fl.strategy", list(STRATEGY_DRIVERS))
        _one_of(self.aggregator, "fl.aggregator", ["mean", "median", "trimmed_mean", "krum", "multi_krum"])
        _require(self.byzantine >= 0, "fl.byzantine", "must be >= 0", self.byzantine)
        if self.norm_bound is not None:
            _require(self.norm_bound > 0, "fl.norm_bound", "must be > 0 or null", self.norm_bound)
        for i, name in enumerate(self.uplink):
            _one_of(name, f"fl.uplink[{i}]", ["clip", "float16"])
        _require(len(set(self.uplink)) == len(self.uplink), "fl.uplink", "must not repeat a transform", list(self.uplink))
        _require(self.clip_norm > 0, "fl.clip_norm", "must be > 0", self.clip_norm)
        _require(self.rounds >= 1, "fl.rounds", "must be >= 1", self.rounds)
        _require(0 < self.fraction <= 1, "fl.fraction", "must be in (0, 1]", self.fraction)
        _require(self.server_lr is None or self.server_lr > 0, "fl.server_lr", "must be > 0 or null", self.server_lr)
        _require(0 <= self.server_momentum < 1, "fl.server_momentum", "must be in [0, 1)", self.server_momentum)
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "fl.beta1/beta2", "must be in [0, 1)", (self.beta1, self.beta2))
        _require(self.tau > 0, "fl.tau", "must be > 0", self.tau)
        if self.deadline_s is not None:
            _require(self.deadline_s > 0, "fl.deadline_s", "must be > 0 or null", self.deadline_s)


# The strategy names and the driver each runs on (the classes in fl/strategies/ declare the same
# ``driver``; a test keeps them equal). Config validates against these names, never the code.
STRATEGY_DRIVERS: dict[str, str] = {
    "fedavg": "sync", "fedprox": "sync", "fedavgm": "sync", "fedadam": "sync", "ifca": "sync", "cfl": "sync",
    "rescluster": "sync", "hetlora": "sync", "flora": "sync", "flexlora": "sync",
    "fedasync": "async", "fedbuff": "async", "hierfavg": "hier", "sfl_v1": "split", "sfl_v2": "split",
}
SPLIT_STRATEGIES = tuple(k for k, v in STRATEGY_DRIVERS.items() if v == "split")
# schemes that work on LoRA's factors (ranks), refused with model.train full
FULL_REFUSED = ("hetlora", "flora", "flexlora")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1  # evaluate every N rounds (and always after the last)
    batch_size: int = 8
    max_per_task: int | None = None  # cap of global eval examples per task
    client_heldout: bool | None = None  # also report the mean loss on clients' held-out data (null: yes unless split)
    generate: int = 0  # number of sample answers generated at the end
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        _require(self.every >= 1, "eval.every", "must be >= 1", self.every)
        _require(self.batch_size >= 1, "eval.batch_size", "must be >= 1", self.batch_size)
        _require(self.generate >= 0, "eval.generate", "must be >= 0", self.generate)
        _require(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1", self.max_new_tokens)
        if self.max_per_task is not None:
            _require(self.max_per_task >= 1, "eval.max_per_task", "must be >= 1 or null", self.max_per_task)


# The task names (tasks/__init__.py TASKS holds the classes; a test keeps the two equal). Config
# validates against these names and never imports task code.
TASK_NAMES = ("causal_lm", "classification", "channel_prediction", "beam_prediction", "activity_recognition",
              "multitask_sensing", "draft_distill")
CHANNEL_SOURCES = ("cdl",)  # generated CSI (channels/): task channel_prediction
BEAM_SOURCES = ("deepmimo",)  # DeepMIMO New York (channels/deepmimo.py): task beam_prediction
SENSING_SOURCES = ("wifi", "wifi_sim")  # Wi-Fi CSI windows (sensing/): task activity_recognition


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    threads: int | None = None  # torch CPU threads (null = torch default)
    # what is learned (tasks/): causal_lm | classification; auto = classification for a classification
    # data.source (an encoder with a classifier head), else causal_lm. Resolved on construction.
    task: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    net: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    channels: ChannelConfig = field(default_factory=ChannelConfig)  # data.source cdl: generated CSI
    beams: BeamConfig = field(default_factory=BeamConfig)  # data.source deepmimo: beam prediction
    sensing: SensingConfig = field(default_factory=SensingConfig)  # data.source wifi | wifi_sim: activities
    draft: DraftConfig = field(default_factory=DraftConfig)  # task draft_distill: an early-exit speculative draft
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # differential privacy, secure aggregation, unlearning
    faults: FaultConfig = field(default_factory=FaultConfig)  # injected client drop-outs, stragglers, a full disk
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # where client work runs (local, batched, Ray)
    report: ReportConfig = field(default_factory=ReportConfig)  # TensorBoard / MLflow

    def __post_init__(self) -> None:
        split = self.fl.strategy in SPLIT_STRATEGIES
        if self.eval.client_heldout is None:
            object.__setattr__(self.eval, "client_heldout", not split)
        self._check_driver_settings(STRATEGY_DRIVERS[self.fl.strategy])
        self._check_task()
        check_draft(self.draft, self.task, self.fl.strategy, STRATEGY_DRIVERS[self.fl.strategy],
                    self.runtime.batch_clients, self.privacy.dp.mode)
        self._check_full_training()
        self._check_privacy(STRATEGY_DRIVERS[self.fl.strategy])
        check_runtime(self.runtime, self.task, self.fl.strategy, STRATEGY_DRIVERS[self.fl.strategy])
        if split:
            _require(self.train.grad_accum == 1, "train.grad_accum", "must be 1 for split learning", self.train.grad_accum)
            n = len(self.split.schedule.budget_per_device)
            _require(n in (0, self.data.num_clients), "split.schedule.budget_per_device",
                     f"must list one budget per device ({self.data.num_clients}) or none", n)
        _require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'", self.name)
        if self.threads is not None:
            _require(self.threads >= 1, "threads", "must be >= 1 or null", self.threads)
        _require(self.seed >= 0, "seed", "must be an integer >= 0", self.seed)

    def _check_task(self) -> None:
        _one_of(self.task, "task", ["auto", *TASK_NAMES])
        fits = "classification" if self.data.source in CLASSIFICATION_SOURCES else \
            "channel_prediction" if self.data.source in CHANNEL_SOURCES else \
            "beam_prediction" if self.data.source in BEAM_SOURCES else \
            "activity_recognition" if self.data.source in SENSING_SOURCES else "causal_lm"
        if self.task == "auto":
            object.__setattr__(self, "task", fits)
        if self.task != "multitask_sensing":
            plain = SensingConfig()
            for key in ("tasks", "respiration_bpm", "respiration_hz", "task_embeddings"):
                _require(getattr(self.sensing, key) == getattr(plain, key), f"sensing.{key}", "applies to task "
                         f"multitask_sensing only (this run's task is {self.task}); remove it", getattr(self.sensing, key))
        if self.task == "multitask_sensing":
            _require(self.data.num_clients >= len(self.sensing.tasks), "data.num_clients", f"must give each of "
                     f"sensing.tasks {list(self.sensing.tasks)} a client (client k holds tasks[k % {len(self.sensing.tasks)}])",
                     self.data.num_clients)
            _require(self.data.source == "wifi_sim", "data.source", "must be wifi_sim for task multitask_sensing "
                     "(generated windows of each of sensing.tasks)", self.data.source)
            _require(self.fl.strategy not in SPLIT_STRATEGIES, "fl.strategy", "must be a federated (not split) scheme "
                     "for task multitask_sensing: per-task heads are aggregated per task by the federated drivers",
                     self.fl.strategy)
            fits = "multitask_sensing"
        if self.task == "draft_distill" and fits == "causal_lm":  # a draft distils on text, asked for by name
            fits = "draft_distill"
        _require(self.task == fits, "task", f"does not fit data.source '{self.data.source}': classification trains on "
                 f"{list(CLASSIFICATION_SOURCES)}, channel_prediction on {list(CHANNEL_SOURCES)}, beam_prediction on "
                 f"{list(BEAM_SOURCES)}, activity_recognition on {list(SENSING_SOURCES)}, causal_lm and draft_distill on "
                 f"text data; leave task at 'auto' to follow data.source", self.task)
        if self.task != "causal_lm":
            _require(self.eval.generate == 0, "eval.generate", f"applies to task causal_lm only ({self.task} has no "
                     "answers to generate); set it to 0", self.eval.generate)
        if self.task == "classification":
            _require(self.model.dtype == "float32", "model.dtype", "must be float32 for task classification (an encoder)",
                     self.model.dtype)
        if self.task in ("activity_recognition", "multitask_sensing"):
            allowed = ["by_task", "iid", "dirichlet"] if self.data.source == "wifi" else ["iid"]
            _require(self.data.partition in allowed, "data.partition", f"must be one of {allowed} for data.source "
                     f"{self.data.source} (by_task: client k holds whole recordings)", self.data.partition)
        if self.task in ("channel_prediction", "beam_prediction", "activity_recognition", "multitask_sensing"):
            _require(not self.split.embedding_lora, "split.embedding_lora", f"applies to token embeddings; {self.task}'s "
                     "input module is trained in full on the device. Remove it", self.split.embedding_lora)
        if self.task in ("channel_prediction", "beam_prediction"):
            _require(self.data.partition in ("by_task", "iid"), "data.partition", "must be by_task (client k: one "
                     "environment: channels.profiles[k % len], beams.base_stations[k % len]) or iid for "
                     f"data.source {self.data.source}", self.data.partition)

    def _check_full_training(self) -> None:
        """model.train full sends the blocks' own weights: schemes that need LoRA factors are refused."""
        if self.model.train != "full":
            return
        s = self.fl.strategy
        _require(s not in FULL_REFUSED, "model.train", f"full cannot run with fl.strategy '{s}': hetlora, flora and "
                 "flexlora truncate, stack or factor LoRA's rank-r factors, and full training has none. Use "
                 "model.train lora, or fedavg, fedprox, fedavgm, fedadam, fedasync, fedbuff, hierfavg, cfl, ifca, "
                 "rescluster, sfl_v1 or sfl_v2", "full")
        _require(self.task == "causal_lm", "model.train", f"full applies to task causal_lm (a decoder's blocks); "
                 f"task {self.task} trains LoRA and its own modules. Use model.train lora", "full")
        cut = self.split.cut
        if s in SPLIT_STRATEGIES and self.model.full_blocks is None and cut is not None:  # null: the server's blocks
            _require(cut[0] < cut[1], "model.full_blocks", f"null trains the server's blocks in full, and split.cut "
                     f"{list(cut)} puts none on the server; list the blocks to train (model.full_blocks: [...]), give "
                     "the server blocks (split.cut: [a, b] with a < b) or use model.train lora", None)
        _require(self.runtime.batch_clients == 1, "model.train", "full cannot run with runtime.batch_clients > 1: the "
                 "batched executor runs each client's trained copy of a module on its own rows, which holds for heads "
                 "and norms but not for decoder blocks (their attention masks span the whole batch). Set "
                 "runtime.batch_clients to 1", "full")

    def _check_privacy(self, driver: str) -> None:
        """Privacy settings the chosen scheme cannot honour are refused with the reason."""
        p, s, n = self.privacy, self.fl.strategy, self.data.num_clients
        used = p.dp.on or p.secagg.enabled or p.unlearn != type(p.unlearn)()
        _require(not used or driver != "split", "privacy", f"applies to the federated schemes; split learning ({s}) "
                 "sends activations, not updates. Remove the privacy section", s)
        _require(all(k < n for k in p.unlearn.exclude), "privacy.unlearn.exclude", f"must name clients 0..{n - 1}",
                 p.unlearn.exclude)
        _require(len(p.unlearn.exclude) < n, "privacy.unlearn.exclude", "must leave at least one client", p.unlearn.exclude)
        if p.dp.client_level:
            _require(s not in ("cfl", "ifca", "hetlora", "flora", "flexlora"), "fl.strategy", f"'{s}' cannot run with "
                     "client-level DP: cfl and ifca form clusters from individual updates, and the rank-heterogeneous "
                     "schemes aggregate per-client shapes, none of which a noised sum releases. Use fedavg, fedprox, "
                     "fedavgm, fedadam, rescluster (clusters by device resources), hierfavg, fedasync or fedbuff", s)
            _require(self.fl.aggregator == "mean", "fl.aggregator", "must be mean with client-level DP (the noise is "
                     "calibrated to a sum of clipped updates)", self.fl.aggregator)
            _require("clip" not in self.fl.uplink, "fl.uplink", "must not list clip with privacy.dp: DP clips each "
                     "update to privacy.dp.clipping_norm itself", list(self.fl.uplink))
            delta = p.dp.target_delta
            _require(delta is None or delta < 1 / n, "privacy.dp.target_delta", f"must be < 1/n = 1/{n} (the number "
                     "of clients): delta >= 1/n allows publishing one client's data outright", delta)
            if driver == "hier" and p.dp.mode == "central" and p.dp.noise_at == "cloud":
                _require(self.fl.hier.kappa2 == 1, "privacy.dp.noise_at", "cloud needs fl.hier.kappa2 = 1 (after several "
                         "edge rounds a device's effect on its edge model is not bounded by clipping_norm); use "
                         f"noise_at: edge or set kappa2 to 1 (it is {self.fl.hier.kappa2})", p.dp.noise_at)
        if p.dp.mode == "sample":
            _require(self.train.grad_accum == 1, "train.grad_accum", "must be 1 with privacy.dp.mode sample (each "
                     "batch is one noised DP-SGD step)", self.train.grad_accum)
        if p.secagg.enabled:
            _require(driver in ("sync", "hier"), "privacy.secagg.enabled", f"needs a cohort to mask among; '{s}' runs "
                     f"on the {driver} driver. Use a synchronous or hierarchical scheme", True)
            _require(s not in ("cfl", "ifca", "hetlora", "flora", "flexlora"), "fl.strategy", f"'{s}' needs each "
                     "client's own update (cfl, ifca: to cluster; hetlora, flora, flexlora: per-rank shapes), which "
                     "secure aggregation hides. Use fedavg, fedprox, fedavgm, fedadam, rescluster or hierfavg", s)
            _require(self.fl.aggregator == "mean", "fl.aggregator", "must be mean with secure aggregation (the server "
                     "learns only the sum)", self.fl.aggregator)
            _require(not p.unlearn.store_updates, "privacy.unlearn.store_updates", "would keep every client's own "
                     "update, exactly what secure aggregation hides; turn one of them off", True)
            _require(self.fl.deadline_s is None, "fl.deadline_s", "cannot be combined with secure aggregation here "
                     "(use privacy.secagg.dropout to model clients that go silent)", self.fl.deadline_s)
            cohort = max(1, int(self.fl.fraction * n + 0.5))
            t = p.secagg.threshold
            _require(cohort >= 3, "privacy.secagg.enabled", f"needs a cohort of at least 3 clients per round (fl.fraction "
                     f"x data.num_clients = {cohort})", cohort)
            _require(t is None or t <= cohort, "privacy.secagg.threshold", f"must be <= the cohort size {cohort} "
                     f"(fl.fraction x data.num_clients); above it no round could ever unmask", t)

    def _check_driver_settings(self, driver: str) -> None:
        """Settings a driver would ignore are refused, not dropped silently."""
        s = self.fl.strategy
        if self.fl.deadline_s is not None:
            _require(driver == "sync", "fl.deadline_s", f"applies to synchronous rounds only; '{s}' runs on the {driver} "
                     "driver and has no round deadline. Remove it", self.fl.deadline_s)
        if driver == "hier":
            _require(self.train.local_epochs is None, "train.local_epochs", "is not used by hierfavg (its devices train "
                     "fl.hier.kappa1 steps between edge aggregations); remove it", self.train.local_epochs)
        if self.faults.on:
            _require(driver != "split", "faults", f"drop and straggle apply to the federated schemes' client trips; split "
                     f"learning ({s}) schedules its devices itself. Remove them", s)
            _require(not self.privacy.secagg.enabled, "faults.drop", "cannot be combined with secure aggregation here; "
                     "use privacy.secagg.dropout to model clients that go silent", self.faults.drop)
        if driver != "split":
            return
        for key, value, default in (("fl.fraction", self.fl.fraction, 1.0), ("train.prox_mu", self.train.prox_mu, 0.0),
                                    ("net.server_tier", self.net.server_tier, "edge"), ("eval.generate", self.eval.generate, 0),
                                    ("eval.client_heldout", self.eval.client_heldout, False), ("fl.uplink", self.fl.uplink, ()),
                                    ("fl.norm_bound", self.fl.norm_bound, None), ("fl.keys", self.fl.keys, None),
                                    ("fl.attack.kind", self.fl.attack.kind, "none")):
            _require(value == default, key, f"is not used by split learning ({s}: split.schedule picks the devices, one edge "
                     f"server trains the middle); leave it at {default!r}", value)
