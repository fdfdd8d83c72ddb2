"""Beagle training: the data pipeline, BeagleTrainer (both training stages) and the `beagle` command."""
