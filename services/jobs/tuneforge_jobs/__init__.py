"""TuneForge jobs service."""
