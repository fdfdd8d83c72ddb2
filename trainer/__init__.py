"""Beagle training: the data pipeline, BeagleTrainer (both training stages) and the `beagle` command."""

from .beagle_trainer import BeagleDataCollator, BeagleTrainer, BeagleTrainingArguments
from .callbacks import SpeculativeEvalCallback

__all__ = ["BeagleDataCollator", "BeagleTrainer", "BeagleTrainingArguments", "SpeculativeEvalCallback"]
