"""TuneForge catalog service."""
