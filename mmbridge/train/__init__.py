"""Staged training: stages as data, apply_stage, the accelerate loop, safetensors checkpoints."""

from mmbridge.train.recipe import StageConfig, TuneSpec, apply_stage, format_table
from mmbridge.train.trainer import TrainResult, train

__all__ = ["StageConfig", "TuneSpec", "apply_stage", "format_table", "TrainResult", "train"]
