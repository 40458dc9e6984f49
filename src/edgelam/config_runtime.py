"""Where a run's client work executes and where its metrics go: runtime.* and report.*.

Neither changes a result: a run resumed under another executor, batch size or tracker continues
the same run (``rundir.RESUMABLE_KEYS`` leaves both sections free)."""

from __future__ import annotations

from dataclasses import dataclass

from edgelam.config_checks import one_of as _one_of
from edgelam.config_checks import require as _require

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class RuntimeConfig:
    """executor: local (this process) or ray (actors, each holding the base model once; on a local
    Ray instance, or the cluster at ``ray_address``). batch_clients: clients trained together in
    one forward / backward of the shared base model, each sample routed to its own client's LoRA
    (1: one after another). ray_actors / ray_actor_cpus: the pool's size and each actor's CPUs
    (its torch threads)."""

    executor: str = "local"
    batch_clients: int = 1
    ray_address: str | None = None  # null: start Ray in this process; "auto" or "HOST:PORT": an existing cluster
    ray_actors: int = 2
    ray_actor_cpus: float = 1.0

    def __post_init__(self) -> None:
        _one_of(self.executor, "runtime.executor", EXECUTORS)
        _require(self.batch_clients >= 1, "runtime.batch_clients", "must be >= 1 (1 trains clients one after another)",
                 self.batch_clients)
        _require(self.ray_actors >= 1, "runtime.ray_actors", "must be >= 1", self.ray_actors)
        _require(self.ray_actor_cpus > 0, "runtime.ray_actor_cpus", "must be > 0", self.ray_actor_cpus)
        if self.executor != "ray":
            _require(self.ray_address is None, "runtime.ray_address", "applies to runtime.executor ray; set the "
                     "executor to ray or remove the address", self.ray_address)


@dataclass(frozen=True)
class ReportConfig:
    """Metrics also written where users look: TensorBoard event files under the run folder's
    ``tensorboard/`` and / or an MLflow run (``mlflow_uri``: a tracking server or a folder;
    null: ``mlruns/`` beside the run folder)."""

    tensorboard: bool = False
    mlflow: bool = False
    mlflow_uri: str | None = None
    mlflow_experiment: str | None = None  # null: the run's name

    def __post_init__(self) -> None:
        if not self.mlflow:
            _require(self.mlflow_uri is None and self.mlflow_experiment is None, "report.mlflow_uri",
                     "applies with report.mlflow: true; turn it on or remove the setting", self.mlflow_uri)


def check_runtime(runtime: RuntimeConfig, task: str, strategy: str, driver: str) -> None:
    """Executor settings a run cannot honour are refused with the reason."""
    if driver == "split":
        _require(runtime == RuntimeConfig(), "runtime", f"applies to the federated schemes' client trips; split learning "
                 f"({strategy}) trains device and server segments in the server's order. Remove the runtime section",
                 runtime)
    if runtime.batch_clients > 1:
        _require(task != "multitask_sensing", "runtime.batch_clients", "must be 1 for task multitask_sensing (each "
                 "client trains its own task's head only, so clients do not share one backward)", runtime.batch_clients)
