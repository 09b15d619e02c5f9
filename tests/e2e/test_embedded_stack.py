"""The embedded default end to end: `tuneforge up` as a process (tests/e2e/conftest.py's shared stack), a real
tiny training job through the gateway."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.embedded import start_stack, stop_stack_process

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "datasets" / "sample-chat.jsonl"


def error_of(resp: httpx.Response) -> dict:
    return resp.json()["error"]


def test_gateway_reports_healthy_services(stack):
    resp = stack.http.get("/healthz")
    assert resp.status_code == 200
    assert resp.json()["services"] == {"catalog": "SERVING", "jobs": "SERVING"}


def test_the_first_start_prints_an_admin_key_once_and_every_call_but_health_needs_a_key(stack):
    assert stack.key.startswith("tf_") and sum("TUNEFORGE_ADMIN_KEY=" in line for line in stack.output) == 1
    assert httpx.get(f"{stack.url}/healthz", timeout=10).status_code == 200
    anonymous = httpx.get(f"{stack.url}/api/v1/models", timeout=10)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "UNAUTHENTICATED"
    me = stack.http.get("/api/v1/whoami").json()
    assert me["key"]["superuser"] and me["project_id"] == "default"
    secrets_file = stack.data_dir / "secrets.json"
    assert oct(secrets_file.stat().st_mode & 0o777) == "0o600" and stack.key not in secrets_file.read_text()


def test_builtin_tiny_chat_model_and_sft_lora_method_are_listed(stack):
    models = stack.http.get("/api/v1/models").json()["models"]
    tiny = next(m for m in models if m["id"] == "tiny-chat")
    assert tiny["architecture"] == "LlamaForCausalLM" and tiny["has_chat_template"] and tiny["parameter_count"] > 0
    methods = stack.http.get("/api/v1/methods").json()["methods"]
    assert "sft-lora" in [m["id"] for m in methods]


def test_bad_uploads_are_kept_invalid_with_each_line_named_and_cannot_train(stack):
    bad_json = b'{"text": "fine"}\n{"text": broken}\n' + '{"text": "caf\xe9"}\n'.encode("latin-1")
    resp = stack.http.post("/api/v1/datasets", files={"file": ("bad.jsonl", bad_json)}, data={"name": "bad"})
    assert resp.status_code == 201
    dataset = resp.json()
    assert dataset["status"] == "INVALID"
    assert [(p["line"], p["message"].split(":")[0]) for p in dataset["validation"]["problems"]] == [
        (2, "not valid JSON"),
        (3, "not valid UTF-8 (byte 14 of the line)"),
    ]
    job = stack.http.post("/api/v1/jobs", json={"model_id": "tiny-chat", "dataset_id": dataset["id"]})
    assert job.status_code == 409 and dataset["id"] in error_of(job)["message"]
    resp = stack.http.post(
        "/api/v1/datasets", files={"file": ("x.jsonl", b"{}\n")}, data={"name": "x", "format": "parquet"}
    )
    assert resp.status_code == 400 and error_of(resp)["field"] == "format"


def test_bad_job_requests_get_404_and_400_naming_the_field(stack):
    jobs_before = stack.http.get("/api/v1/jobs").json()["jobs"]
    ds = stack.http.post("/api/v1/datasets", files={"file": ("s.jsonl", SAMPLE.read_bytes())}).json()
    cases = [
        ({"model_id": "no-such-model", "dataset_id": ds["id"]}, 404, None),
        ({"model_id": "tiny-chat", "dataset_id": "no-such-ds"}, 404, None),
        ({"model_id": "tiny-chat", "dataset_id": ds["id"], "method_id": "nope"}, 404, None),
        (
            {"model_id": "tiny-chat", "dataset_id": ds["id"], "parameters": {"warp_factor": 9}},
            400,
            "parameters.warp_factor",
        ),
        (
            {"model_id": "tiny-chat", "dataset_id": ds["id"], "parameters": {"lora_rank": 0}},
            400,
            "parameters.lora_rank",
        ),
        ({"dataset_id": ds["id"]}, 400, "model_id"),
    ]
    for body, status, field in cases:
        resp = stack.http.post("/api/v1/jobs", json=body)
        assert resp.status_code == status, (body, resp.text)
        if field:
            assert error_of(resp)["field"] == field
    assert stack.http.get("/api/v1/jobs").json()["jobs"] == jobs_before  # none was made
    assert stack.http.get("/api/v1/jobs/no-such-job").status_code == 404


def read_sse(resp: httpx.Response, until_state: str) -> list[tuple[str, str, dict]]:
    events, event_id, kind = [], "", ""
    for line in resp.iter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            events.append((event_id, kind, data))
            if kind == "job" and data["state"] == until_state:
                return events
    return events


def test_a_real_tiny_job_trains_to_succeeded_with_metrics_logs_and_a_peft_adapter(stack):
    ds = stack.http.post(
        "/api/v1/datasets", files={"file": ("sample-chat.jsonl", SAMPLE.read_bytes())}, data={"name": "sample-chat"}
    )
    assert ds.status_code == 201 and ds.json()["row_count"] == 40 and ds.json()["format"] == "chat"
    started = time.monotonic()
    resp = stack.http.post(
        "/api/v1/jobs",
        json={
            "model_id": "tiny-chat",
            "dataset_id": ds.json()["id"],
            "method_id": "sft-lora",
            "parameters": {"training_steps": 6, "batch_size": 2, "learning_rate": 1e-3, "lora_rank": 4},
        },
    )
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert job["state"] == "QUEUED" and job["parameters"]["max_steps"] == 6 and job["parameters"]["lora_rank"] == 4

    with stack.http.stream("GET", f"/api/v1/jobs/{job['id']}/events", timeout=180) as sse:
        assert sse.headers["content-type"].startswith("text/event-stream")
        events = read_sse(sse, "SUCCEEDED")
    elapsed = time.monotonic() - started
    transitions = [d["to_state"] for _, kind, d in events if kind == "event"]
    assert transitions == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"], events[-3:]
    assert elapsed < 60, f"tiny job took {elapsed:.1f}s"

    # Reconnecting with Last-Event-ID resumes after that event: no gap, no duplicate.
    second_id = [eid for eid, kind, _ in events if kind == "event"][1]
    with stack.http.stream("GET", f"/api/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": second_id}) as sse:
        resumed = read_sse(sse, "SUCCEEDED")
    assert [d["to_state"] for _, kind, d in resumed if kind == "event"] == ["RUNNING", "SUCCEEDED"]

    final = stack.http.get(f"/api/v1/jobs/{job['id']}").json()
    assert (final["state"], final["current_step"], final["progress_percent"], final["attempt"]) == (
        "SUCCEEDED",
        6,
        100.0,
        1,
    )
    loss = stack.http.get(f"/api/v1/jobs/{job['id']}/metrics", params={"name": "loss"}).json()["series"]["loss"]
    assert [step for step, _ in loss] == [1, 2, 3, 4, 5, 6] and all(v > 0 for _, v in loss)
    log_text = stack.http.get(f"/api/v1/jobs/{job['id']}/logs", params={"format": "text"}).text
    assert "attempt 1 starting" in log_text and "output stored at" in log_text

    adapter_dir = Path(final["output_uri"])
    assert (adapter_dir / "adapter_config.json").is_file()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(stack.data_dir / "models" / "tiny-chat")
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum().item() > 0 for p in lora_b)  # trained, not the zero init


EXAMPLES = REPO / "examples" / "datasets"


@pytest.mark.parametrize(
    ("method_id", "dataset", "parameters", "metric", "output_file"),
    [
        ("sft", "sample-chat.jsonl", {"learning_rate": 1e-3}, "loss", "model.safetensors"),
        ("dpo", "sample-preference.jsonl", {"beta": 0.2, "lora_rank": 4}, "rewards/accuracies", "adapter_config.json"),
        (
            "grpo",
            "sample-qa.jsonl",
            {
                "num_generations": 2,
                "max_completion_length": 8,
                "max_prompt_length": 64,
                "reward_functions": "accuracy,length",
            },
            "reward",
            "adapter_config.json",
        ),
        ("custom01", "sample-qa.jsonl", {"lora_rank": 4, "num_generations": 2}, "loss", "adapter_config.json"),
    ],
)
def test_each_builtin_method_trains_through_the_platform(stack, method_id, dataset, parameters, metric, output_file):
    path = EXAMPLES / dataset
    ds = stack.http.post(
        "/api/v1/datasets", files={"file": (dataset, path.read_bytes())}, data={"name": f"{method_id}-{dataset}"}
    )
    assert ds.status_code == 201, ds.text
    resp = stack.http.post(
        "/api/v1/jobs",
        json={
            "model_id": "tiny-chat",
            "dataset_id": ds.json()["id"],
            "method_id": method_id,
            "parameters": {"max_steps": 2, "batch_size": 2, **parameters},
        },
    )
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["id"]
    with stack.http.stream("GET", f"/api/v1/jobs/{job_id}/events", timeout=240) as sse:
        read_sse(sse, "SUCCEEDED")
    final = stack.http.get(f"/api/v1/jobs/{job_id}").json()
    if final["state"] != "SUCCEEDED":
        logs = stack.http.get(f"/api/v1/jobs/{job_id}/logs", params={"format": "text"}).text
        pytest.fail(f"{method_id}: {final['state']} {final.get('state_reason')}\n{logs[-3000:]}")
    series = stack.http.get(f"/api/v1/jobs/{job_id}/metrics", params={"name": metric}).json()["series"][metric]
    assert [step for step, _ in series] == [1, 2]
    assert (Path(final["output_uri"]) / output_file).is_file()


def test_terminating_a_running_job_stops_its_process(stack):
    ds = stack.http.get("/api/v1/datasets", params={"status": "READY"}).json()["datasets"][0]
    job = stack.http.post(
        "/api/v1/jobs", json={"model_id": "tiny-chat", "dataset_id": ds["id"], "parameters": {"max_steps": 100000}}
    ).json()
    for _ in range(300):
        state = stack.http.get(f"/api/v1/jobs/{job['id']}").json()["state"]
        if state == "RUNNING":
            break
        time.sleep(0.1)
    assert stack.http.post(f"/api/v1/jobs/{job['id']}/cancel").json()["state"] == "CANCELLING"
    for _ in range(300):
        final = stack.http.get(f"/api/v1/jobs/{job['id']}").json()
        if final["state"] == "CANCELLED":
            break
        time.sleep(0.1)
    assert final["state"] == "CANCELLED"


def test_ctrl_c_stops_every_process_cleanly(tmp_path):
    own = start_stack(tmp_path / "data")  # its own: the shared stack serves the other tests to the end
    try:
        children = psutil.Process(own.proc.pid).children(recursive=True)
        assert len(children) >= 5  # nats, catalog, jobs, trainer, gateway
        own.proc.send_signal(signal.SIGINT)
        assert own.proc.wait(60) == 0
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
    finally:
        own.http.close()
        stop_stack_process(own.proc)
