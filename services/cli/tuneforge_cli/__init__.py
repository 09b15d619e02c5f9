"""TuneForge command line."""
