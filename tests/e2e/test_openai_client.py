"""The official `openai` client, unpatched and pointed at the embedded stack's gateway by base_url, fine-tunes
the built-in tiny model: upload, create with hyperparameters and a validation file, watch events and
checkpoints while it runs, cancel; a second job runs to succeeded; errors are the client's own exceptions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.embedded import Stack
from tests.helpers import wait_for

DATASETS = Path(__file__).resolve().parents[2] / "examples" / "datasets"
SAMPLE = DATASETS / "sample-chat.jsonl"


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.api_key, max_retries=0, timeout=60)


def upload(client: openai.OpenAI, path: Path, name: str | None = None) -> Any:
    uploaded = client.files.create(file=(name or path.name, path.read_bytes()), purpose="fine-tune")
    assert (uploaded.object, uploaded.purpose, uploaded.filename) == ("file", "fine-tune", name or path.name)
    return wait_for(lambda: client.files.retrieve(uploaded.id), lambda f: f.status != "uploaded", f"{path.name}")


def test_upload_create_watch_events_and_checkpoints_then_cancel(client, stack, tmp_path):
    training = upload(client, SAMPLE)
    assert training.status == "processed" and training.bytes == SAMPLE.stat().st_size
    held = tmp_path / "held-out-chat.jsonl"
    held.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:6]))
    validation = upload(client, held)
    assert validation.status == "processed"
    assert {training.id, validation.id} <= {f.id for f in client.files.list().data}

    job = client.fine_tuning.jobs.create(
        model="tiny-chat",
        training_file=training.id,
        validation_file=validation.id,
        suffix="e2e",
        seed=7,
        metadata={"suite": "e2e"},
        # 2000 steps (50 epochs of 40 unpacked rows), so it is still running when cancelled. save_steps and
        # packing are TuneForge parameters: checkpoints every 5 steps, each evaluated on the validation file.
        hyperparameters={
            "n_epochs": 50,
            "batch_size": 1,
            "learning_rate_multiplier": 2.0,
            "save_steps": 5,
            "packing": False,
        },
    )
    assert (job.object, job.model, job.training_file, job.validation_file) == (
        "fine_tuning.job",
        "tiny-chat",
        training.id,
        validation.id,
    )
    assert job.status in ("queued", "running") and job.seed == 7 and job.suffix == "e2e"
    assert job.metadata == {"suite": "e2e"} and job.method.type == "supervised"
    assert job.hyperparameters.n_epochs == 50 and job.hyperparameters.batch_size == 1
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(2.0)

    def metric_steps(events: Any) -> set[int]:
        return {e.data["step"] for e in events.data if e.type == "metrics"}

    events = wait_for(
        lambda: client.fine_tuning.jobs.list_events(job.id, limit=100),
        lambda found: len(metric_steps(found)) >= 3 and any("eval_loss" in e.data for e in found.data),
        "metrics events with eval_loss",
    )
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    metrics = [e for e in events.data if e.type == "metrics"]
    assert all(e.data["train_loss"] > 0 for e in metrics if "train_loss" in e.data)
    assert any(e.type == "message" and "running" in e.message for e in events.data)
    newest_first = [e.created_at for e in events.data]
    assert newest_first == sorted(newest_first, reverse=True)

    checkpoints = wait_for(
        lambda: client.fine_tuning.jobs.checkpoints.list(job.id), lambda found: found.data, "a checkpoint"
    )
    latest = checkpoints.data[0]
    assert latest.fine_tuning_job_id == job.id and latest.step_number % 5 == 0
    assert latest.metrics.step == latest.step_number and Path(latest.fine_tuned_model_checkpoint).is_dir()

    log = stack.http.get(f"/api/v1/jobs/{job.id}/logs", params={"format": "text"}).text
    assert "40 chat rows from" in log and "6 validation rows from" in log  # the file, not a held-out share

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    finished = wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id), lambda j: j.finished_at, "the stop")
    assert finished.status == "cancelled" and finished.fine_tuned_model is None
    assert stack.http.get(f"/api/v1/jobs/{job.id}").json()["state"] == "CANCELLED"


def test_a_job_runs_to_succeeded_with_its_fine_tuned_model_and_lists_newest_first(client):
    training = upload(client, SAMPLE, "sample-chat-second.jsonl")
    job = client.fine_tuning.jobs.create(
        model="tiny-chat",
        training_file=training.id,
        hyperparameters={"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": "auto"},
    )
    done = wait_for(
        lambda: client.fine_tuning.jobs.retrieve(job.id),
        lambda j: j.status in ("succeeded", "failed", "cancelled"),
        "the job to finish",
    )
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model and (Path(done.fine_tuned_model) / "adapter_config.json").is_file()
    assert done.finished_at and done.trained_tokens and done.validation_file is None
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].type == "message" and events[0].message.startswith("Job changed from running to succeeded")
    assert any(e.type == "metrics" and e.data["train_loss"] > 0 for e in events if "train_loss" in e.data)
    # Page by page after each last id (the client's auto-paging), small pages give the one big page's events.
    everything = client.fine_tuning.jobs.list_events(job.id, limit=10_000)
    assert not everything.has_more and len(everything.data) >= 4  # queued, running, a step or more, succeeded
    for limit in (1, 2):
        assert [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=limit)] == [
            e.id for e in everything.data
        ]

    listed = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in listed.data] == [job.id] and listed.has_more
    older = client.fine_tuning.jobs.list(limit=1, after=job.id)
    assert len(older.data) == 1 and older.data[0].id != job.id
    ids = [j.id for j in client.fine_tuning.jobs.list(limit=2)]  # the client's auto-paging, page by page
    assert ids[0] == job.id and older.data[0].id in ids and len(ids) == len(set(ids))


def test_errors_are_the_clients_exceptions_with_the_openai_param(client):
    training = upload(client, SAMPLE, "sample-chat-errors.jsonl")
    with pytest.raises(openai.NotFoundError) as missing:
        client.fine_tuning.jobs.create(model="no-such-model", training_file=training.id)
    assert missing.value.param == "model" and "no-such-model" in missing.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.fine_tuning.jobs.create(model="tiny-chat", training_file="no-such-file")
    assert missing.value.param == "training_file"
    with pytest.raises(openai.BadRequestError) as bad:
        client.files.create(file=("x.jsonl", SAMPLE.read_bytes()), purpose="assistants")
    assert bad.value.param == "purpose" and bad.value.type == "invalid_request_error"
    pairs = upload(client, DATASETS / "sample-preference.jsonl")
    with pytest.raises(openai.ConflictError) as conflict:  # sft-lora does not train on preference rows
        client.fine_tuning.jobs.create(model="tiny-chat", training_file=training.id, validation_file=pairs.id)
    assert conflict.value.param == "validation_file"
    with pytest.raises(openai.BadRequestError) as bad:
        client.fine_tuning.jobs.create(model="tiny-chat", training_file=training.id, hyperparameters={"n_epochs": 0})
    assert bad.value.param == "hyperparameters.n_epochs"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("no-such-job")
