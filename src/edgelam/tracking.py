"""Metrics where users look (``report.*``): every committed row as TensorBoard scalars and / or an
MLflow run, beside metrics.jsonl (which stays the record a resume reads).

    <out>/tensorboard/           event files: a row's numbers against the round (step = round)
    <out>/tensorboard/sim_time/  the same numbers under ``sim_time_ms/`` against the simulated
                                 clock (step = milliseconds): schemes compared at equal time
    <out>/tracking.json          the MLflow store and run this folder logs to: a resume continues it

What is logged: every number of a row, nested dicts flattened with ``/`` (``eval_tasks/arithmetic/loss``,
``diagnostics/...``); lists (``clients``, ``client_stats``), strings, booleans and missing values
are skipped. MLflow also gets the flattened config as params (when the run is created: MLflow
params are immutable, so a resume's new ``fl.rounds`` shows in ``summary/rounds``), the summary's
numbers under ``summary/`` and the adapters, plots and summary.json as artifacts.

A resume logs no round twice: MLflow's latest ``round`` metric says how far it got (rows the tracker
missed are caught up); TensorBoard's last kept round is written again under ``purge_step``, which
hides whatever the earlier files hold from that round on (rows of rounds the resume recomputes).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from edgelam.config import ConfigError, RunConfig
from edgelam.config_load import config_to_dict
from edgelam.store import atomic_write_json

log = logging.getLogger("edgelam.tracking")

TENSORBOARD = "tensorboard"
SIM_TIME = "sim_time"  # the sub-folder (its own TensorBoard run, so each view is purged on its own axis)
STATE = "tracking.json"
# Run-folder entries sent to MLflow as artifacts at the end, each if present and under the cap.
ARTIFACTS = ("summary.json", "samples.jsonl", "plots", "adapter", "adapters")
ARTIFACT_CAP_BYTES = 256 * 2**20
# MLflow's limits (mlflow.utils.validation): key length, param value length, entries per log_batch.
MAX_KEY, MAX_PARAM_VALUE, PARAMS_PER_BATCH, METRICS_PER_BATCH = 250, 6000, 100, 1000
_BAD_KEY_CHARS = re.compile(r"[^\w.\- :/]")  # MLflow accepts word characters, . - space : /


# --- plain data: what a row, a config and a summary give each sink ---


def scalars(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of ``row`` (nested dicts flattened as ``a/b``), names MLflow accepts."""
    out: dict[str, float] = {}
    for k, v in row.items():
        key = _BAD_KEY_CHARS.sub("_", f"{prefix}{k}")[:MAX_KEY]
        if isinstance(v, dict):
            out |= scalars(v, key + "/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The config flattened to dotted keys, each value as text cut to MLflow's length limit."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= params(v, key + ".")
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key[:MAX_KEY]] = text[:MAX_PARAM_VALUE]
    return out


def sim_ms(row: dict[str, Any]) -> int:
    """The row's simulated time in whole milliseconds (TensorBoard steps are integers)."""
    return int(round(row["sim_time_s"] * 1000))


def default_uri(folder: Path) -> str:
    """``mlruns/`` beside the run folder, as a file: URI (runs of one parent folder share a store)."""
    return (folder.resolve().parent / "mlruns").as_uri()


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


# --- sinks ---


class Sink(Protocol):
    def start(self, rows: list[dict[str, Any]]) -> None: ...

    def log(self, row: dict[str, Any]) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...

    def close(self, status: str) -> None: ...


class TensorBoardSink:
    """Event files under ``<out>/tensorboard/`` (and ``sim_time/`` below it), flushed every row."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / TENSORBOARD
        self.writers: list[Any] = []  # (by round, by simulated time)

    def start(self, rows: list[dict[str, Any]]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(f"report.tensorboard: true needs tensorboard ({exc}); pip install 'edgelam[tracking]'") from None
        # A resumed folder: its last kept row may have been committed but not logged when the run
        # stopped, so it is written again, and purge_step hides the earlier files' events from there on.
        # A new folder starts at 0: TensorBoard takes a run's first session start as the start, not a restart.
        resumed = bool(rows) and any(self.path.glob("events.out.tfevents.*"))
        todo = rows[-1:] if resumed else rows
        purge = (todo[0]["round"], sim_ms(todo[0])) if resumed else (0, 0)
        self.writers = [SummaryWriter(str(self.path), purge_step=purge[0]),
                        SummaryWriter(str(self.path / SIM_TIME), purge_step=purge[1])]
        for row in todo:
            self.log(row)

    def log(self, row: dict[str, Any]) -> None:
        by_round, by_time = self.writers
        for k, v in scalars(row).items():
            if k == "round":
                continue
            # float64 on disk: byte totals of real runs are past float32's exact integers (2^24)
            by_round.add_scalar(k, v, row["round"], new_style=True, double_precision=True)
            by_time.add_scalar(f"sim_time_ms/{k}", v, sim_ms(row), new_style=True, double_precision=True)
        for w in self.writers:
            w.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        pass  # the curves are the rows; the summary's numbers are their last points

    def close(self, status: str) -> None:
        for w in self.writers:
            w.close()


class MlflowSink:
    """One MLflow run per run folder (its id in tracking.json), through ``MlflowClient`` (no global
    active run, so several runs in one process do not meet)."""

    def __init__(self, cfg: RunConfig, folder: Path) -> None:
        self.folder, self.config = folder, config_to_dict(cfg)
        self.uri = cfg.report.mlflow_uri or default_uri(folder)
        self.run_id: str | None = None
        self.logged = -1  # the last round the run holds
        self.summarised: float | None = None  # the rounds of the summary it holds
        self.client, self.experiment_id = self._connect(cfg.report.mlflow_experiment or cfg.name)

    def _fail(self, why: str) -> ConfigError:
        return ConfigError(f"report.mlflow_uri {self.uri}: {why}; give a writable folder (file:/path), a database "
                           f"(sqlite:///path.db) or a reachable tracking server (http://host:5000)")

    def _connect(self, experiment: str) -> tuple[Any, str]:
        """The client and the experiment's id (made if new): a bad URI stops the run here, before the model loads."""
        try:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException
        except ImportError as exc:
            raise ConfigError(f"report.mlflow: true needs mlflow-skinny ({exc}); pip install 'edgelam[tracking]'") from None
        if self.uri.startswith("file:") or "://" not in self.uri:
            # MLflow 3.7+ refuses its file store unless opted in; a file: URI here is that choice
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if self.uri.startswith(("http://", "https://")):
            self._reachable()
        try:
            client = MlflowClient(tracking_uri=self.uri)
            found = client.get_experiment_by_name(experiment)
            if found is not None and found.lifecycle_stage != "active":
                raise self._fail(f"experiment {experiment!r} is deleted there; restore it or set report.mlflow_experiment")
            return client, found.experiment_id if found is not None else client.create_experiment(experiment)
        except (MlflowException, OSError) as exc:
            raise self._fail(f"cannot open the MLflow store ({type(exc).__name__}: {str(exc)[:300]})") from None

    def _reachable(self) -> None:
        """MLflow's client retries a dead server for minutes; one short request fails fast instead."""
        import httpx

        try:
            httpx.get(self.uri.rstrip("/") + "/health", timeout=10)
        except httpx.TransportError as exc:
            raise self._fail(f"no tracking server answers there ({type(exc).__name__}: {exc})") from None

    def start(self, rows: list[dict[str, Any]]) -> None:
        """Continue the folder's run in this store if there is one, else make it; then log the rows it lacks."""
        run = self._saved_run()
        if run is None:
            self._create()
        else:
            self.run_id = run.info.run_id
            metrics = run.data.metrics
            self.logged, self.summarised = int(metrics.get("round", -1)), metrics.get("summary/rounds")
            self.client.update_run(self.run_id, status="RUNNING")
        for row in rows:
            self.log(row)

    def _saved_run(self) -> Any:
        from mlflow.exceptions import MlflowException

        path = self.folder / STATE
        try:
            saved = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            log.warning("%s is damaged; a new MLflow run is made", path)
            saved = {}
        if not isinstance(saved, dict) or saved.get("mlflow_uri") != self.uri or "mlflow_run_id" not in saved:
            return None  # never logged, or to another store (report.* may change on resume): a new run there
        try:
            run = self.client.get_run(saved["mlflow_run_id"])
        except MlflowException:
            return None
        return run if run.info.lifecycle_stage == "active" else None

    def _create(self) -> None:
        run = self.client.create_run(self.experiment_id, run_name=self.folder.name,
                                     tags={"edgelam.run_folder": str(self.folder.resolve())})
        self.run_id = run.info.run_id
        atomic_write_json(self.folder / STATE, {"mlflow_uri": self.uri, "mlflow_run_id": self.run_id})
        from mlflow.entities import Param

        for chunk in _chunks([Param(k, v) for k, v in params(self.config).items()], PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        for chunk in _chunks([Metric(k, v, now_ms, step) for k, v in values.items()], METRICS_PER_BATCH):
            self.client.log_batch(self._id(), metrics=chunk)

    def _id(self) -> str:
        assert self.run_id is not None, "start() makes or finds the run"
        return self.run_id

    def log(self, row: dict[str, Any]) -> None:
        if row["round"] <= self.logged:
            return  # a round the run already holds (recomputed after a resume: the same numbers)
        self._metrics(scalars(row), row["round"])  # includes ``round``: a resume reads how far the run got
        self.logged = row["round"]

    def finish(self, summary: dict[str, Any]) -> None:
        if summary["rounds"] != self.summarised:  # a finished run resumed for no new round holds it already
            self._metrics(scalars(summary, "summary/"), summary["rounds"])
        for name in ARTIFACTS:
            path = self.folder / name
            size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
            if size > ARTIFACT_CAP_BYTES:
                log.warning("%s is %.0f MB; not copied to MLflow (over %d MB)", path, size / 2**20, ARTIFACT_CAP_BYTES >> 20)
            elif path.is_dir():
                self.client.log_artifacts(self._id(), str(path), name)
            elif path.is_file():
                self.client.log_artifact(self._id(), str(path))

    def close(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)


# --- the tracker the lifecycle holds ---


class Tracker:
    """The sinks ``report.*`` turns on: ``start`` with the folder's rows, ``log`` each committed row,
    ``finish`` with the summary, ``close`` however the run ends. Nothing on: every call is a no-op."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks
        self.finished = False

    @classmethod
    def open(cls, cfg: RunConfig, folder: Path) -> "Tracker":
        """Checks what can fail early (the MLflow store, the experiment) and writes nothing in ``folder``
        until ``start``, so a run that never starts leaves its folder as it was."""
        sinks: list[Sink] = []
        if cfg.report.tensorboard:
            sinks.append(TensorBoardSink(folder))
        if cfg.report.mlflow:
            sinks.append(MlflowSink(cfg, folder))
        return cls(sinks)

    def start(self, rows: list[dict[str, Any]]) -> None:
        for s in self.sinks:
            s.start(rows)

    def log(self, row: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log(row)

    def finish(self, summary: dict[str, Any]) -> None:
        for s in self.sinks:
            s.finish(summary)
        self.finished = True

    def close(self) -> None:
        """Called from the lifecycle's ``finally``: the exception on its way out (if any) names the
        MLflow status. Never raises: the run's own files are written and its own error comes first."""
        exc = sys.exc_info()[1]
        status = "FINISHED" if self.finished else "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        for s in self.sinks:
            try:
                s.close(status)
            except Exception as err:  # noqa: BLE001 - a tracking store that went away must not hide the run's outcome
                log.warning("closing %s failed: %s", type(s).__name__, err)
