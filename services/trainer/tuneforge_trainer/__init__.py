"""TuneForge trainer: the runner SDK, the built-in training methods and a tiny test model."""
