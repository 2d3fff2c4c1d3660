"""Training: many SAEs in one pass over the data, schedules, target-L0 control, checkpoints."""

from lmscope.train.config import SAESpec, TrainConfig, expand_group, load_suite, suite_from_dict
from lmscope.train.schedules import L0Controller
from lmscope.train.trainer import (
    DataFactory,
    TrainingInterrupted,
    calibrate,
    store_data,
    train_suite,
)

__all__ = [
    "DataFactory",
    "L0Controller",
    "SAESpec",
    "TrainConfig",
    "TrainingInterrupted",
    "calibrate",
    "expand_group",
    "load_suite",
    "store_data",
    "suite_from_dict",
    "train_suite",
]
