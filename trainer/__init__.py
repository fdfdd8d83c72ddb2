"""Beagle training: the data pipeline, BeagleTrainer (both training stages) and the `beagle` command."""

from .beagle_trainer import BeagleDataCollator, BeagleTrainer, BeagleTrainingArguments

__all__ = ["BeagleDataCollator", "BeagleTrainer", "BeagleTrainingArguments"]
