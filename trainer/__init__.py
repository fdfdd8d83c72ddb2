"""Beagle training: the data pipeline, BeagleTrainer (both training stages) and the `beagle` command."""

from .beagle_trainer import BeagleDataCollator, BeagleTrainer, BeagleTrainingArguments
from .callbacks import SpeculativeEvalCallback
from .offline_cache import BeagleCacheError, OfflineCache, OfflineCollator, build_offline_cache

__all__ = ["BeagleCacheError", "BeagleDataCollator", "BeagleTrainer", "BeagleTrainingArguments", "OfflineCache",
           "OfflineCollator", "SpeculativeEvalCallback", "build_offline_cache"]
