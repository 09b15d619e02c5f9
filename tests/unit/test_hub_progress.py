"""A Hub download's progress goes to the catalog log in 10% steps, not to a terminal bar."""

import logging

from tuneforge_catalog.service import _progress_logger


def test_download_progress_is_logged_once_per_tenth(caplog):
    caplog.set_level(logging.INFO, logger="tuneforge_catalog.service")
    bar = _progress_logger("org/model")(total=1000, desc="model.safetensors")
    for _ in range(40):
        bar.update(25)
    bar.close()
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fetching org/model")]
    assert steps == [f"fetching org/model: model.safetensors {p}%" for p in range(0, 101, 10)]
