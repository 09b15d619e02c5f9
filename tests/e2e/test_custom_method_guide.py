"""docs/custom-methods.md's worked example, step by step against the real embedded stack: the example script
examples/methods/deepextension_style/ copied into the agent's methods directory, registered over HTTP as the
guide shows, and a job of it trained to SUCCEEDED with its [log_data] lines as metric points and its output
stored. If this fails, the guide is wrong."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "methods" / "deepextension_style"
GUIDE = REPO / "docs" / "custom-methods.md"
SAMPLE = REPO / "examples" / "datasets" / "sample-chat.jsonl"


def guide_block(marker: str) -> str:
    """The fenced block after `<!-- marker -->` in the guide, so the test sends what the guide says."""
    text = GUIDE.read_text()
    after = text.split(f"<!-- {marker} -->", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]


@pytest.mark.timeout(240)
def test_the_guides_worked_example_trains_an_unchanged_deepextension_script_on_the_stack(stack):
    shutil.copytree(EXAMPLE, stack.data_dir / "methods" / "deepextension_style", dirs_exist_ok=True)
    definition = json.loads(guide_block("method-definition"))
    definition["name"] = f"{definition['name']}-{uuid.uuid4().hex[:6]}"  # the session stack is shared
    created = stack.http.post("/api/v1/methods", json=definition)
    assert created.status_code == 201, created.text
    method_id = created.json()["id"]
    try:
        dataset = stack.http.post(
            "/api/v1/datasets", files={"file": ("sample-chat.jsonl", SAMPLE.read_bytes())}, data={"name": "guide"}
        )
        assert dataset.json()["status"] == "READY", dataset.text
        job_request = json.loads(guide_block("job-request"))
        job_request.update(dataset_id=dataset.json()["id"], method_id=method_id)
        submitted = stack.http.post("/api/v1/jobs", json=job_request)
        assert submitted.status_code in (200, 201), submitted.text
        job_id = submitted.json()["id"]
        done = wait_for(
            lambda: stack.http.get(f"/api/v1/jobs/{job_id}").json(),
            lambda j: j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"),
            "the custom method's job to finish",
            timeout_s=180,
        )
        logs = stack.http.get(f"/api/v1/jobs/{job_id}/logs", params={"format": "text"}).text
        assert done["state"] == "SUCCEEDED", f"{done['state_reason']}\n{logs[-3000:]}"
        steps = job_request["parameters"]["max_steps"]
        loss = stack.http.get(f"/api/v1/jobs/{job_id}/metrics").json()["series"]["loss"]
        assert [step for step, _ in loss] == list(range(1, steps + 1)) and all(v > 0 for _, v in loss)
        assert done["progress_percent"] == 100.0
        assert "ignoring flags this script does not use" in logs  # parse_known_args: the platform passes more
        output = Path(done["output_uri"])
        assert (output / "model.safetensors").is_file()
        saved = json.loads((output / "training_args.json").read_text())  # the flags as the script got them
        assert (saved["max_steps"], saved["batch_size"], saved["lora_rank"]) == (steps, 2, 8)
    finally:
        stack.http.delete(f"/api/v1/methods/{method_id}")
