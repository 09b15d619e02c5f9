"""Code shared by the TuneForge services: config, storage, events, errors, parameter schemas."""
