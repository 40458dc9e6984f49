"""Tasks: one file each (``causal_lm.py``, ``classification.py``, ``channel.py``, ``beam.py``,
``sensing.py``, ``sensing_multi.py``, ``draft.py``), the Protocol in ``base.py``.

To add one: write ``tasks/<name>.py`` with a class that has ``setup(cfg) -> TaskSetup`` (a
classmethod: load the base model, build the clients' data) and the ``Task`` verbs (collate, wrap,
loss, eval_sums, metrics, work_flops, tokens); list it here and its name in ``config.TASK_NAMES``.
"""

from __future__ import annotations

from edgelam.config import RunConfig
from edgelam.tasks.base import Task, TaskFactory, TaskSetup
from edgelam.tasks.beam import BeamPrediction
from edgelam.tasks.causal_lm import CausalLM
from edgelam.tasks.channel import ChannelPrediction
from edgelam.tasks.classification import Classification
from edgelam.tasks.draft import DraftDistill
from edgelam.tasks.sensing import ActivityRecognition
from edgelam.tasks.sensing_multi import MultiTaskSensing

# config.TASK_NAMES lists the same names (config never imports task code); tests keep them equal.
TASKS: dict[str, TaskFactory] = {"causal_lm": CausalLM, "classification": Classification,
                                 "channel_prediction": ChannelPrediction, "beam_prediction": BeamPrediction,
                                 "activity_recognition": ActivityRecognition, "multitask_sensing": MultiTaskSensing,
                                 "draft_distill": DraftDistill}


def setup_task(cfg: RunConfig) -> TaskSetup:
    """The run's task (``cfg.task``, resolved from data.source when 'auto'), base model and data."""
    return TASKS[cfg.task].setup(cfg)


__all__ = ["TASKS", "Task", "TaskSetup", "setup_task"]
