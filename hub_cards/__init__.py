"""Model cards and publishing of Beagle checkpoints."""
