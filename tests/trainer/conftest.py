from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = [REPO / "services" / "common", REPO / "services" / "trainer"]

# Until the services are pip-installed, import them from the source tree.
for _path in reversed(SOURCE_DIRS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tuneforge_trainer.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture
def child_env(tmp_path) -> dict[str, str]:
    """Environment for method child processes: offline, source tree importable, no stray param vars."""
    from tuneforge_common.methods import SftLoraParams, env_name, param_fields

    param_vars = {env_name(f.name) for f in param_fields(SftLoraParams)}
    env = {k: v for k, v in os.environ.items() if k not in param_vars}
    paths = [*map(str, SOURCE_DIRS), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
    for name in ("HF_DATASETS_CACHE", "MODEL_PATH", "DATASET_PATH", "OUTPUT_DIR", "RESUME_FROM_CHECKPOINT"):
        env.pop(name, None)  # HF_DATASETS_CACHE unset: exercise the method's own per-run cache
    return env
