"""The lifecycle after training on the embedded stack, with real agent processes: a tiny LoRA training is
published (customized), merged (complete: its logits equal base + adapter's), deployed (live) and chatted with
through the official `openai` client, streaming and not, then undeployed; bad chat requests get OpenAI's errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from transformers import AutoTokenizer

from tests.e2e.embedded import Stack
from tests.helpers import wait_for

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "datasets" / "sample-chat.jsonl"
HELLO = [{"role": "user", "content": "Hello there"}]


def finished_job(stack: Stack, job_id: str) -> dict[str, Any]:
    job = wait_for(
        lambda: stack.http.get(f"/api/v1/jobs/{job_id}").json(),
        lambda j: j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"),
        f"job {job_id}",
    )
    if job["state"] != "SUCCEEDED":
        log = stack.http.get(f"/api/v1/jobs/{job_id}/logs", params={"format": "text"}).text
        pytest.fail(f"job {job_id} is {job['state']}: {job['state_reason']}\n{log[-3000:]}")
    return job


def logits(model_dir: str, adapter_dir: str | None = None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = AutoTokenizer.from_pretrained(model_dir)("the quick brown fox jumps", return_tensors="pt").input_ids
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.fixture(scope="module")
def customized(stack: Stack) -> dict[str, Any]:
    """A LoRA adapter trained on the built-in tiny model, published as a customized model."""
    dataset = stack.http.post(
        "/api/v1/datasets", files={"file": ("lifecycle.jsonl", SAMPLE.read_bytes())}, data={"name": "lifecycle"}
    ).json()
    parameters = {"max_steps": 4, "batch_size": 4, "lora_rank": 4, "learning_rate": 0.05}
    job = stack.http.post(
        "/api/v1/jobs",
        json={"model_id": "tiny-chat", "dataset_id": dataset["id"], "method_id": "sft-lora", "parameters": parameters},
    ).json()
    finished_job(stack, job["id"])
    published = stack.http.post(f"/api/v1/jobs/{job['id']}/publish", json={"name": "tiny-lifecycle"})
    assert published.status_code == 201, published.text
    model = stack.http.get(f"/api/v1/models/{published.json()['model_id']}").json()
    assert model["kind"] == "CUSTOMIZED" and model["lineage"]["job_id"] == job["id"]
    return model


def test_a_merge_publishes_a_complete_model_whose_logits_equal_base_plus_adapter(stack, customized):
    merge = stack.http.post(f"/api/v1/models/{customized['id']}/merge", json={"name": "tiny-lifecycle-complete"})
    assert merge.status_code == 201, merge.text
    assert merge.json()["kind"] == "MERGE" and merge.json()["state"] == "QUEUED"
    finished_job(stack, merge.json()["id"])
    done = wait_for(
        lambda: stack.http.get(f"/api/v1/jobs/{merge.json()['id']}").json(),
        lambda j: j["result_model_id"],
        "the complete model to be published",
    )
    complete = stack.http.get(f"/api/v1/models/{done['result_model_id']}").json()
    assert (complete["kind"], complete["name"]) == ("COMPLETE", "tiny-lifecycle-complete")
    assert complete["lineage"]["source_model_id"] == customized["id"]
    assert complete["lineage"]["base_model_id"] == "tiny-chat" and complete["has_chat_template"]
    files = {p.name for p in Path(complete["uri"]).iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    base_uri = stack.http.get("/api/v1/models/tiny-chat").json()["uri"]
    merged, expected = logits(complete["uri"]), logits(base_uri, customized["uri"])
    assert (merged - expected).abs().max().item() < 1e-4
    assert (merged - logits(base_uri)).abs().max().item() > 1e-3  # the adapter changed something
    log = stack.http.get(f"/api/v1/jobs/{merge.json()['id']}/logs", params={"format": "text"}).text
    assert "merge:" in log  # the merge has a log of its own
    # A merge is not a training: it is listed only on request, and can't be copied or paused.
    assert merge.json()["id"] not in {j["id"] for j in stack.http.get("/api/v1/jobs").json()["jobs"]}
    merges = stack.http.get("/api/v1/jobs", params={"kind": ["merge", "evaluate"]}).json()["jobs"]
    assert merge.json()["id"] in {j["id"] for j in merges} and {j["kind"] for j in merges} <= {"MERGE", "EVALUATE"}
    assert stack.http.post(f"/api/v1/jobs/{merge.json()['id']}/pause").status_code == 409
    again = stack.http.post(f"/api/v1/models/{complete['id']}/merge", json={})
    assert again.status_code == 409 and "CUSTOMIZED" in again.json()["error"]["message"]


def test_a_deployed_model_chats_through_the_openai_client_and_undeploy_frees_the_agent(stack, customized):
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.api_key, max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError) as not_live:
        client.chat.completions.create(model=customized["id"], messages=HELLO)
    assert not_live.value.code == "model_not_live"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert unknown.value.code == "model_not_found"

    deployed = stack.http.post(f"/api/v1/models/{customized['id']}/deploy", json={"parameters": {"max_model_len": 256}})
    assert deployed.status_code == 201, deployed.text
    deployment = deployed.json()
    try:
        assert deployment["state"] == "PENDING" and deployment["model_id"] == customized["id"]
        live = wait_for(
            lambda: stack.http.get(f"/api/v1/deployments/{deployment['id']}").json(),
            lambda d: d["state"] in ("LIVE", "FAILED", "STOPPED"),
            "the deployment to be live",
        )
        assert live["state"] == "LIVE", live
        assert live["agent_id"]

        # The tiny model may well end its answer at once (greedy, an end-of-turn token first): its special tokens
        # are banned through logit_bias, so the answer runs to max_tokens and its text can be compared.
        tokenizer = AutoTokenizer.from_pretrained(customized["uri"])
        talk = {
            "model": customized["id"],
            "messages": HELLO,
            "max_tokens": 12,
            "temperature": 0,
            "logit_bias": {str(t): -100 for t in tokenizer.all_special_ids},
        }
        answer = client.chat.completions.create(**talk)
        assert answer.object == "chat.completion" and answer.model == customized["id"]
        text = answer.choices[0].message.content
        assert answer.choices[0].message.role == "assistant" and text
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage.completion_tokens == 12 and answer.usage.prompt_tokens > 0

        chunks = list(client.chat.completions.create(**talk, stream=True))
        assert all(c.object == "chat.completion.chunk" for c in chunks) and len(chunks) > 2
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert chunks[-1].choices[0].finish_reason == "length"

        with pytest.raises(openai.BadRequestError) as too_long:
            client.chat.completions.create(model=customized["id"], messages=HELLO, max_tokens=100_000)
        assert too_long.value.code == "context_length_exceeded"

        listed = stack.http.get("/api/v1/deployments", params={"model_id": customized["id"]}).json()["deployments"]
        [mine] = [d for d in listed if d["id"] == deployment["id"]]
        assert mine["request_count"] == 2 and mine["error_count"] == 1
    finally:
        undeployed = stack.http.delete(f"/api/v1/deployments/{deployment['id']}")
    assert undeployed.status_code == 200 and undeployed.json()["state"] in ("STOPPING", "STOPPED")
    stopped = wait_for(
        lambda: stack.http.get(f"/api/v1/deployments/{deployment['id']}").json(),
        lambda d: d["state"] == "STOPPED",
        "the deployment to stop",
    )
    assert stopped["state"] == "STOPPED"
    with pytest.raises(openai.BadRequestError) as gone:
        client.chat.completions.create(model=customized["id"], messages=HELLO)
    assert gone.value.code == "model_not_live"
    # The agent is free again: a training runs.
    assert stack.http.get("/api/v1/deployments").json()["deployments"] == []


def test_an_evaluation_records_loss_perplexity_and_generations_next_to_its_training(stack, customized):
    training_job = customized["lineage"]["job_id"]
    dataset_id = stack.http.get(f"/api/v1/jobs/{training_job}").json()["dataset_id"]
    bad = stack.http.post(
        f"/api/v1/models/{customized['id']}/evaluate",
        json={"dataset_id": dataset_id, "parameters": {"num_generations": -1}},
    )
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "parameters.num_generations"
    started = stack.http.post(
        f"/api/v1/models/{customized['id']}/evaluate",
        json={"dataset_id": dataset_id, "parameters": {"max_samples": 8, "num_generations": 2, "max_new_tokens": 8}},
    )
    assert started.status_code == 201, started.text
    assert started.json()["kind"] == "EVALUATE"
    finished_job(stack, started.json()["id"])
    [evaluation] = stack.http.get(f"/api/v1/jobs/{training_job}/evaluations").json()["evaluations"]
    assert evaluation["job"]["id"] == started.json()["id"]
    metrics = evaluation["metrics"]
    assert metrics["eval_loss"] > 0 and metrics["perplexity"] > 1 and metrics["eval_samples"] == 8
    assert len(evaluation["generations"]) == 2 and all(g["prompt"] for g in evaluation["generations"])
    # Its progress reached the job's metrics too, as a training's does.
    points = stack.http.get(f"/api/v1/jobs/{started.json()['id']}/metrics").json()
    assert "eval_loss" in str(points)
