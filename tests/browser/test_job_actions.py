"""The dashboard's job actions, Compare and Publish in a real headless browser against the embedded stack: two
tiny trainings that differ in learning_rate are picked on the Model Training list and compared (the
learning_rate row is highlighted with both values, the loss chart has one curve per job); a finished job is
published from its Details page (the model exists in the catalog); a long job is paused, resumed, terminated
and then deleted from the list, each state reached as the API reports it; an action that doesn't apply is
disabled and says why. Screenshots in tests/output/screenshots/."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.browser.signin import sign_in
from tests.helpers import wait_for

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "datasets" / "sample-chat.jsonl"
# save_steps 2: each keeps a checkpoint at step 2, for a checkpoint's own Publish button.
TINY = {"max_steps": 3, "batch_size": 2, "logging_steps": 1, "save_steps": 2}
# Far longer than the test: it is running whenever the test looks, and is terminated (by the test, or at the
# end if a step failed) so it never holds the shared stack's one agent for later tests.
LONG = {"max_steps": 5000, "batch_size": 2, "logging_steps": 1}


@pytest.fixture(scope="module")
def dataset_id(stack) -> str:
    with SAMPLE.open("rb") as f:
        uploaded = stack.http.post("/api/v1/datasets", files={"file": f}, data={"name": "actions-sample"})
    assert uploaded.status_code == 201, uploaded.text
    return uploaded.json()["id"]


def submit(stack, dataset_id: str, name: str, parameters: dict) -> dict:
    body = {
        "name": name,
        "model_id": "tiny-chat",
        "dataset_id": dataset_id,
        "method_id": "sft-lora",
        "parameters": parameters,
    }
    job = stack.http.post("/api/v1/jobs", json=body)
    assert job.status_code == 201, job.text
    return job.json()


def job_state(stack, job_id: str) -> str:
    return stack.http.get(f"/api/v1/jobs/{job_id}").json()["state"]


@pytest.fixture(scope="module")
def finished_pair(stack, dataset_id) -> list[dict]:
    """Two tiny sft-lora trainings, learning_rate 1e-4 and 2e-4, both SUCCEEDED."""
    jobs = [submit(stack, dataset_id, f"compare-lr-{lr}", {**TINY, "learning_rate": lr}) for lr in (0.0001, 0.0002)]
    for job in jobs:
        state = wait_for(
            lambda job_id=job["id"]: job_state(stack, job_id),
            lambda s: s in {"SUCCEEDED", "FAILED", "CANCELLED"},
            f"{job['name']} to finish",
        )
        assert state == "SUCCEEDED"
    return jobs


@pytest.fixture
def long_job(stack, dataset_id) -> Iterator[dict]:
    job = submit(stack, dataset_id, "actions-long", LONG)
    yield job
    stack.http.post(f"/api/v1/jobs/{job['id']}/cancel")  # a 409 once it is over: nothing to do then


def row(page, job_id: str):
    return page.locator(f'tr[data-job-id="{job_id}"]')


def open_menu(page, job_id: str):
    """The row's action menu, open (the list re-renders every few seconds; the menu stays open across it)."""
    row(page, job_id).get_by_test_id("actions").click()
    menu = page.get_by_test_id("action-menu")
    menu.wait_for()
    return menu


def test_compare_highlights_the_differing_learning_rate_and_overlays_one_loss_curve_per_job(
    page, stack, finished_pair, screenshot
) -> None:
    first, second = finished_pair
    sign_in(page, stack.key, then="jobs")
    compare = page.get_by_test_id("compare")
    assert compare.is_disabled() and compare.inner_text() == "Compare (0)"
    row(page, first["id"]).get_by_test_id("pick").check()
    assert compare.is_disabled() and compare.get_attribute("title") == "Tick two or more jobs to compare them"
    row(page, second["id"]).get_by_test_id("pick").check()
    assert compare.is_enabled() and compare.inner_text() == "Compare (2)"
    compare.click()
    assert page.url.endswith(f"#/compare/{first['id']},{second['id']}")

    found = stack.http.get("/api/v1/jobs/compare", params={"job_id": [first["id"], second["id"]]}).json()
    learning_rate = page.get_by_test_id("param-learning_rate")
    learning_rate.wait_for()
    assert learning_rate.get_attribute("data-differs") == "true"
    assert "differs" in (learning_rate.get_attribute("class") or "")
    assert learning_rate.locator("td").all_inner_texts() == ["0.0001", "0.0002"]
    # Only the differing parameters by default, every one with the toggle (the equal ones not highlighted).
    assert page.locator("[data-testid=compare-params] tbody tr").count() == len(found["differing_parameters"])
    page.get_by_test_id("show-all-params").check()
    max_steps = page.get_by_test_id("param-max_steps")
    max_steps.wait_for()
    assert max_steps.get_attribute("data-differs") == "false"
    assert max_steps.locator("td").all_inner_texts() == ["3", "3"]

    loss = page.get_by_test_id("compare-chart-loss")
    loss.wait_for()
    assert loss.get_attribute("data-series") == "2"
    expected = [len(s["points"]) for m in found["metrics"] if m["name"] == "loss" for s in m["series"]]
    assert loss.get_attribute("data-points") == ",".join(map(str, expected)) and min(expected) >= 2
    legend = loss.locator(".u-legend").inner_text()
    assert "compare-lr-0.0001" in legend and "compare-lr-0.0002" in legend
    # One chart per metric the jobs share, each with both runs.
    assert page.locator("[data-testid^=compare-chart-]").count() == len(found["metrics"])
    for final in page.get_by_test_id("final-loss").all_inner_texts():
        float(final)
    assert page.get_by_test_id("compare-status").get_attribute("data-live") == "false"
    page.get_by_test_id("show-all-params").uncheck()  # the differing ones only: the charts in view
    page.get_by_test_id("param-max_steps").wait_for(state="detached")
    page.mouse.move(0, 0)
    screenshot("compare")
    assert page.get_by_test_id("error").count() == 0


def test_a_finished_job_is_published_from_its_details_page_a_taken_name_shows_the_api_error_and_every_metric_is_charted(
    page, stack, finished_pair, screenshot
) -> None:
    job = finished_pair[0]
    sign_in(page, stack.key, then="jobs")
    page.goto(f"/#/jobs/{job['id']}/overview")
    page.get_by_test_id("copy-train").wait_for()
    assert page.get_by_test_id("copy-train").get_attribute("href") == f"#/new/copy/{job['id']}"
    # The evaluations of models published from it (none yet), read from the API without an error.
    page.get_by_test_id("evaluations").get_by_text("No evaluation of a model published from this job.").wait_for()
    header = page.get_by_test_id("job-actions")
    assert header.get_by_test_id("action-terminate").get_attribute("title") == (
        "job is SUCCEEDED; only queued, paused or running jobs can be terminated"
    )
    page.get_by_test_id("job-actions").get_by_test_id("action-publish").click()
    dialog = page.get_by_test_id("publish-dialog")
    dialog.wait_for()
    page.get_by_test_id("publish-submit").wait_for(state="attached")
    page.wait_for_function("!document.querySelector('[data-testid=publish-submit]').disabled")
    name = f"published-{uuid.uuid4().hex[:8]}"
    page.get_by_test_id("publish-name").fill(name)
    screenshot("publish-dialog")
    page.get_by_test_id("publish-submit").click()
    link = page.get_by_test_id("published-model")
    link.wait_for()
    model_id = link.inner_text()
    assert link.get_attribute("href") == f"#/models/{model_id}"
    model = stack.http.get(f"/api/v1/models/{model_id}")
    assert model.status_code == 200, model.text
    assert model.json()["name"] == name
    assert model.json()["lineage"]["job_id"] == job["id"]
    page.get_by_test_id("publish-close").click()

    # The same name again: the API refuses it, and the dialog shows the API's own message.
    page.get_by_test_id("job-actions").get_by_test_id("action-publish").click()
    page.wait_for_function("!document.querySelector('[data-testid=publish-submit]').disabled")
    page.get_by_test_id("publish-name").fill(name)
    page.get_by_test_id("publish-submit").click()
    error = page.get_by_test_id("publish-dialog").get_by_test_id("error")
    error.wait_for()
    refused = stack.http.post(f"/api/v1/jobs/{job['id']}/publish", json={"name": name})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "ALREADY_EXISTS"  # not a 503
    body = refused.json()["error"]
    assert error.inner_text() == f"{body['code']}: {body['message']} (HTTP {refused.status_code})"
    page.get_by_test_id("publish-close").click()

    # A kept checkpoint's own Publish button: the dialog has its step chosen, the model's lineage says it.
    kept = stack.http.get(f"/api/v1/jobs/{job['id']}/checkpoints").json()["checkpoints"]
    assert 2 in [c["step"] for c in kept]
    page.get_by_test_id("publish-step-2").click()
    page.wait_for_function("!document.querySelector('[data-testid=publish-submit]').disabled")
    assert page.get_by_test_id("publish-step").input_value() == "2"
    page.get_by_test_id("publish-name").fill(f"{name}-step-2")
    page.get_by_test_id("publish-submit").click()
    page.get_by_test_id("published-model").wait_for()
    from_step = stack.http.get(f"/api/v1/models/{page.get_by_test_id('published-model').inner_text()}").json()
    assert from_step["name"] == f"{name}-step-2" and from_step["lineage"]["checkpoint_step"] == 2
    page.get_by_test_id("publish-close").click()

    # Evaluation Data charts every metric the job reports (not a fixed list); the smoothing applies to each.
    names = stack.http.get(f"/api/v1/jobs/{job['id']}/metrics").json()["series"].keys()
    page.get_by_test_id("tab-metrics").click()
    for metric in names:
        page.get_by_test_id(f"chart-{metric}").wait_for()
    assert page.locator("[data-testid=charts] > .chart").count() == len(names)
    page.get_by_test_id("smoothing").fill("0.9")
    assert page.get_by_test_id("smoothing-value").inner_text() == "0.90"
    for metric in names:
        assert page.get_by_test_id(f"chart-{metric}").get_attribute("data-smoothing") == "0.9"


def test_a_long_job_is_paused_resumed_terminated_and_deleted_from_the_list(
    page, stack, finished_pair, long_job, screenshot
) -> None:
    job_id = long_job["id"]
    sign_in(page, stack.key, then="jobs")
    wait_for(lambda: job_state(stack, job_id), lambda s: s == "RUNNING", "the long job to run", timeout_s=120)

    # Compared with a finished one while it runs, the Compare page keeps refreshing (it stops once all are over).
    page.goto(f"/#/compare/{job_id},{finished_pair[0]['id']}")
    page.wait_for_function("document.querySelector('[data-testid=compare-status]')?.dataset.live === 'true'")
    assert page.get_by_test_id("compare-status").inner_text().startswith("refreshing every few seconds")
    page.get_by_role("link", name="← Model Training").click()
    row(page, job_id).get_by_text("RUNNING").wait_for()

    # What doesn't apply while it runs is disabled and says why, in the service's words.
    menu = open_menu(page, job_id)
    resume = menu.get_by_test_id("action-resume")
    assert resume.is_disabled()
    assert resume.get_attribute("title") == "job is RUNNING; only paused jobs can be resumed"
    assert "only paused jobs can be resumed" in menu.inner_text()
    delete = menu.get_by_test_id("action-delete")
    assert delete.is_disabled()
    assert delete.get_attribute("data-why") == "job is RUNNING; only finished jobs can be deleted (terminate it first)"
    screenshot("model-training-actions")

    menu.get_by_test_id("action-pause").click()
    # The agent checkpoints and stops the run; then the job is PAUSED.
    wait_for(lambda: job_state(stack, job_id), lambda s: s == "PAUSED", "the job to pause", timeout_s=60)
    row(page, job_id).get_by_text("PAUSED").wait_for()
    menu = open_menu(page, job_id)
    assert (
        menu.get_by_test_id("action-pause").get_attribute("data-why")
        == "job is PAUSED; only queued or running jobs can be paused"
    )
    menu.get_by_test_id("action-resume").click()
    # Queued again (the agent then takes it up, from its pause checkpoint).
    wait_for(lambda: job_state(stack, job_id), lambda s: s != "PAUSED", "the job to resume")
    row(page, job_id).get_by_text("PAUSED").wait_for(state="detached")

    # Terminate asks first; Cancel leaves the job be.
    open_menu(page, job_id).get_by_test_id("action-terminate").click()
    page.get_by_test_id("confirm-dialog").wait_for()
    page.get_by_test_id("confirm-cancel").click()
    assert job_state(stack, job_id) in {"QUEUED", "STARTING", "RUNNING"}
    open_menu(page, job_id).get_by_test_id("action-terminate").click()
    page.get_by_test_id("confirm-ok").click()
    wait_for(lambda: job_state(stack, job_id), lambda s: s == "CANCELLED", "the job to be terminated", timeout_s=60)
    row(page, job_id).get_by_text("CANCELLED").wait_for()
    history = stack.http.get(f"/api/v1/jobs/{job_id}/history").json()["events"]
    reasons = [(e["to_state"], e["reason"]) for e in history]
    paused_at = [s for s, _ in reasons].index("PAUSED")
    assert ("QUEUED", "resumed by user") in reasons[paused_at:]
    assert any(r == "terminated by user" and s in {"CANCELLING", "CANCELLED"} for s, r in reasons[paused_at:])

    # Finished now: Delete applies, asks first, and the row goes.
    menu = open_menu(page, job_id)
    assert (
        menu.get_by_test_id("action-resume").get_attribute("data-why")
        == "job is CANCELLED; only paused jobs can be resumed"
    )
    menu.get_by_test_id("action-delete").click()
    page.get_by_test_id("confirm-dialog").wait_for()
    page.get_by_test_id("confirm-cancel").click()
    assert stack.http.get(f"/api/v1/jobs/{job_id}").status_code == 200
    open_menu(page, job_id).get_by_test_id("action-delete").click()
    page.get_by_test_id("confirm-ok").click()
    row(page, job_id).wait_for(state="detached")
    assert stack.http.get(f"/api/v1/jobs/{job_id}").status_code == 404
    assert page.get_by_test_id("error").count() == 0


def test_past_200_jobs_the_list_offers_load_more_by_page_token(page, stack) -> None:
    # In a project of its own, so the 201 jobs don't crowd the others' lists; each is terminated at once
    # (queued: cancelled on the spot) so none holds the agent.
    created = stack.http.post("/api/v1/projects", json={"name": f"many-jobs-{uuid.uuid4().hex[:6]}"})
    assert created.status_code == 201, created.text
    project = created.json()["id"]
    scoped = {"X-TuneForge-Project": project}
    with SAMPLE.open("rb") as f:
        uploaded = stack.http.post("/api/v1/datasets", files={"file": f}, data={"name": "many"}, headers=scoped)
    assert uploaded.status_code == 201, uploaded.text
    body = {"model_id": "tiny-chat", "dataset_id": uploaded.json()["id"], "method_id": "sft-lora", "parameters": LONG}

    def submit_and_terminate(i: int) -> str:
        job = stack.http.post("/api/v1/jobs", json={**body, "name": f"many-{i:03d}"}, headers=scoped)
        assert job.status_code == 201, job.text
        job_id = job.json()["id"]
        wait_for(  # retried while the scheduler moves it at the same moment (a 409)
            lambda: stack.http.post(f"/api/v1/jobs/{job_id}/cancel", headers=scoped),
            lambda r: r.status_code == 200,
            "a terminate",
        )
        return job_id

    with ThreadPoolExecutor(8) as pool:  # a few at a time: 402 calls one by one take a while
        ids = list(pool.map(submit_and_terminate, range(201)))
    sign_in(page, stack.key, then="jobs")
    page.get_by_test_id("project").select_option(project)
    page.wait_for_function("document.querySelectorAll('[data-testid=jobs] tbody tr[data-job-id]').length === 200")
    more = page.get_by_test_id("load-more")
    more.wait_for()
    assert page.get_by_test_id("list-status").inner_text().startswith("200 of 200+ jobs")
    more.click()
    page.wait_for_function("document.querySelectorAll('[data-testid=jobs] tbody tr[data-job-id]').length === 201")
    assert more.is_hidden()
    shown = set(
        page.locator("[data-testid=jobs] tbody tr[data-job-id]").evaluate_all("rows => rows.map(r => r.dataset.jobId)")
    )
    assert shown == set(ids)
    assert page.get_by_test_id("error").count() == 0
