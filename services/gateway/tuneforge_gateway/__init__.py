"""TuneForge HTTP gateway."""
