"""The `tuneforge` console script end to end against the embedded stack, as a user runs it: upload a dataset,
train with per-parameter flags and watch it to SUCCEEDED, read its log, publish it, deploy the model, chat with it
and undeploy it; `--json` output parses, and bad flag values and a wrong key get their exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from tests.e2e.embedded import Stack
from tests.helpers import wait_for

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "datasets" / "sample-chat.jsonl"
CLI = str(Path(sys.executable).parent / "tuneforge")


def tuneforge(stack: Stack, *args: str, key: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "TUNEFORGE_URL": stack.url,
        "TUNEFORGE_API_KEY": stack.key if key is None else key,
        "COLUMNS": "200",
    }
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def as_json(result: subprocess.CompletedProcess) -> Any:
    return json.loads(ok(result).stdout)


def test_upload_train_watch_logs_publish_deploy_chat_undeploy(stack):
    # In chunks of 4000 bytes: three requests, resumable between them.
    uploaded = ok(tuneforge(stack, "datasets", "upload", str(SAMPLE), "--name", "cli-sample", "--chunk-size", "4000"))
    assert "uploading sample-chat.jsonl" in uploaded.stderr and "9.4/9.4 kB" in uploaded.stderr  # the bar, at 100%
    [dataset_id] = re.findall(r"dataset (ds-\w+) \(cli-sample\): READY", uploaded.stdout)
    assert "40 rows" in uploaded.stdout
    assert stack.http.get(f"/api/v1/datasets/{dataset_id}/content").content == SAMPLE.read_bytes()

    trained = ok(
        tuneforge(stack, "train", "--method", "sft-lora", "--model", "tiny-chat", "--dataset", dataset_id,
                  "--max-steps", "3", "--batch-size", "2", "--lora-rank", "4", "--name", "cli-e2e", "--watch")
    )  # fmt: skip
    [job_id] = re.findall(r"job (job-\w+) QUEUED: sft-lora, 3 steps", trained.stdout)
    assert re.search(rf"job {job_id} SUCCEEDED \(step 3/3, final loss \d", trained.stdout), trained.stdout
    assert "3/3 steps" in trained.stderr and "loss" in trained.stderr  # the live bar's last frame

    job = as_json(tuneforge(stack, "jobs", "show", job_id, "--json"))
    assert job["state"] == "SUCCEEDED" and job["name"] == "cli-e2e"
    assert [job["parameters"][name] for name in ("max_steps", "batch_size", "lora_rank")] == [3, 2, 4]
    assert "output stored at" in ok(tuneforge(stack, "logs", job_id)).stdout
    events = [json.loads(line) for line in ok(tuneforge(stack, "jobs", "watch", job_id, "--json")).stdout.splitlines()]
    assert {"event", "metric", "log"} <= {e["event"] for e in events}
    assert [e["data"]["to_state"] for e in events if e["event"] == "event"][-1] == "SUCCEEDED"

    model_id = as_json(tuneforge(stack, "publish", job_id, "--name", "cli-e2e-model", "--json"))["model_id"]
    deployment = as_json(tuneforge(stack, "deploy", model_id, "--wait", "--max-model-len", "256", "--json"))
    try:
        assert deployment["state"] == "LIVE" and deployment["model_id"] == model_id
        answer = as_json(
            tuneforge(stack, "chat", model_id, "-m", "Hello there", "--max-tokens", "6", "--temperature", "0", "--json")
        )
        assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["usage"]["completion_tokens"] >= 1 and answer["usage"]["prompt_tokens"] > 0
        # Streamed: the tiny model's gibberish (special tokens banned, so it can't end at once) then a newline.
        special_ids = AutoTokenizer.from_pretrained(stack.data_dir / "models" / "tiny-chat").all_special_ids
        streamed = ok(
            tuneforge(stack, "chat", model_id, "-m", "Hello there", "--max-tokens", "6", "--temperature", "1",
                      *(f"--logit-bias={token}=-100" for token in special_ids))
        )  # fmt: skip
        assert streamed.stdout.endswith("\n") and len(streamed.stdout) > 1
    finally:
        undeployed = ok(tuneforge(stack, "undeploy", deployment["id"]))
    assert re.search(rf"deployment {deployment['id']} (STOPPING|STOPPED)", undeployed.stdout)
    # The stack's one agent is free again for the tests after this one.
    wait_for(
        lambda: stack.http.get(f"/api/v1/deployments/{deployment['id']}").json(),
        lambda d: d["state"] == "STOPPED",
        "the deployment to stop",
    )


def test_json_outputs_parse_bad_flag_values_exit_2_and_a_wrong_key_exits_3(stack):
    models = as_json(tuneforge(stack, "models", "--json"))["models"]
    assert "tiny-chat" in [m["id"] for m in models]
    methods = as_json(tuneforge(stack, "methods", "list", "--json"))["methods"]
    assert "sft-lora" in [m["id"] for m in methods]
    schema = as_json(tuneforge(stack, "methods", "show", "sft-lora", "--json"))
    assert "lora_rank" in [p["name"] for p in schema["parameters"]]
    assert isinstance(as_json(tuneforge(stack, "jobs", "list", "--json"))["jobs"], list)
    dataset = as_json(tuneforge(stack, "datasets", "upload", str(SAMPLE), "--json"))
    assert dataset["status"] == "READY"
    estimate = as_json(
        tuneforge(stack, "train", "--model", "tiny-chat", "--dataset", dataset["id"], "--max-steps", "2", "--dry-run",
                  "--json")
    )  # fmt: skip
    assert estimate["dry_run"] is True and estimate["estimate"]["total_steps"] == 2

    bad = tuneforge(stack, "train", "--model", "tiny-chat", "--dataset", dataset["id"], "--lora-rank", "0")
    assert bad.returncode == 2 and "--lora-rank" in bad.stderr and "below the minimum 1" in bad.stderr
    unknown = tuneforge(stack, "train", "--model", "tiny-chat", "--dataset", dataset["id"], "--lora-rnak", "4")
    assert unknown.returncode == 2 and "did you mean --lora-rank" in unknown.stderr
    refused = tuneforge(stack, "train", "--model", "no-such-model", "--dataset", dataset["id"])
    assert refused.returncode == 3 and "no-such-model" in refused.stderr and "404 NOT_FOUND" in refused.stderr
    wrong_key = tuneforge(stack, "jobs", "list", "--json", key="tf_000000000000_0000")
    assert wrong_key.returncode == 3 and "UNAUTHENTICATED" in wrong_key.stderr and wrong_key.stdout == ""
    invalid = tuneforge(stack, "datasets", "upload", str(Path(__file__)), "--name", "not-jsonl")
    assert invalid.returncode == 1 and "INVALID" in invalid.stdout and re.search(r"│\s+1 │", invalid.stdout)


def test_an_interrupted_upload_resumes_from_the_gateways_offset(stack):
    data = SAMPLE.read_bytes()
    upload = stack.http.post("/api/v1/uploads", json={"name": "resumed", "size": len(data)}).json()
    first = stack.http.put(
        f"/api/v1/uploads/{upload['upload_id']}",
        content=data[:4000],
        headers={"Content-Range": f"bytes 0-3999/{len(data)}", "Content-Type": "application/octet-stream"},
    )
    assert first.status_code == 200, first.text
    resumed = ok(tuneforge(stack, "datasets", "upload", str(SAMPLE), "--resume", upload["upload_id"]))
    assert f"upload {upload['upload_id']} (resumed at byte 4000)" in resumed.stderr
    [dataset_id] = re.findall(r"dataset (ds-\w+) \(resumed\): READY", resumed.stdout)
    content = stack.http.get(f"/api/v1/datasets/{dataset_id}/content")
    assert content.content == data  # the first 4000 bytes once, then the rest
