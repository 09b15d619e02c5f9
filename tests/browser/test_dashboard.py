"""The web dashboard in a real headless browser against the embedded stack: sign-in (a wrong key shows the API's
error), the Model Training list showing a job submitted through the API, and its Details page whose loss chart
and log gain points and lines live, from the SSE stream, without a reload. Each page is screenshotted at
1280x800 and 1920x1080 under tests/output/screenshots/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.browser.signin import sign_in

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "datasets" / "sample-chat.jsonl"
# A run far longer than the test (a step takes about a second on a CPU, more on a busy machine): the page sees
# the loss grow step by step, then the test terminates it and watches its last log lines arrive. However fast
# or slow the machine, the job is running while it is watched. Cancelled at the end if still running, so it
# never holds the shared stack's agent for later tests.
PARAMETERS = {"max_steps": 5000, "batch_size": 2, "logging_steps": 1}


@pytest.fixture
def submit(stack) -> Iterator:
    submitted: list[str] = []

    def run(name: str) -> dict:
        with SAMPLE.open("rb") as f:
            uploaded = stack.http.post("/api/v1/datasets", files={"file": f}, data={"name": "browser-sample"})
        assert uploaded.status_code == 201, uploaded.text
        body = {
            "name": name,
            "model_id": "tiny-chat",
            "dataset_id": uploaded.json()["id"],
            "method_id": "sft-lora",
            "parameters": PARAMETERS,
        }
        job = stack.http.post("/api/v1/jobs", json=body)
        assert job.status_code == 201, job.text
        submitted.append(job.json()["id"])
        return job.json()

    yield run
    for job_id in submitted:
        stack.http.post(f"/api/v1/jobs/{job_id}/cancel")  # a 409 once it is over: nothing to do then


def loss_points(page) -> int:
    return int(page.get_by_test_id("chart-loss").get_attribute("data-points") or 0)


def test_a_wrong_key_shows_the_api_error_and_the_admin_key_signs_in_and_out(page, stack, screenshot) -> None:
    page.goto("/")
    screenshot("sign-in")

    sign_in(page, "tf_wrong_key", then=None)
    error = page.get_by_test_id("error")
    error.wait_for()
    refused = httpx.get(f"{stack.url}/api/v1/whoami", headers={"Authorization": "Bearer tf_wrong_key"})
    assert refused.status_code == 401
    assert error.inner_text() == f"UNAUTHENTICATED: {refused.json()['error']['message']} (HTTP 401)"
    screenshot("sign-in-error")

    created = stack.http.post("/api/v1/projects", json={"name": "browser-empty"})
    assert created.status_code == 201, created.text
    project = created.json()["id"]

    sign_in(page, stack.key)
    page.get_by_test_id("jobs").wait_for()
    assert page.get_by_test_id("who").inner_text().startswith("admin")
    assert page.evaluate("sessionStorage.getItem('tuneforge.apiKey')") == stack.key
    switcher = page.get_by_test_id("project")
    assert switcher.input_value() == "default"  # whoami's project, with the key's role there
    assert "default (admin)" in switcher.inner_text()
    # A superuser is offered every project; switching lists that project's jobs (none in a new one).
    switcher.select_option(project)
    page.get_by_text("No jobs.").wait_for()
    assert page.evaluate("sessionStorage.getItem('tuneforge.project')") == project
    assert page.get_by_test_id("project").input_value() == project
    page.get_by_test_id("project").select_option("default")
    page.wait_for_function("sessionStorage.getItem('tuneforge.project') === 'default'")

    page.get_by_test_id("sign-out").click()
    page.get_by_test_id("api-key").wait_for()
    assert page.evaluate("sessionStorage.getItem('tuneforge.apiKey')") is None


def log_lines(page) -> int:
    return page.locator("[data-testid=log] .line").count()


def test_job_list_and_details_follow_a_running_job_live(page, stack, submit, screenshot) -> None:
    sign_in(page, stack.key)
    page.get_by_test_id("jobs").wait_for()
    job_id = submit("browser-live-lora")["id"]
    # The open list refreshes itself: the job submitted through the API shows up without a reload.
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    row.wait_for()
    assert "browser-live-lora" in row.inner_text()
    assert "sft-lora" in row.inner_text() and "tiny-chat" in row.inner_text()

    # The search box narrows the list; the state filter asks the API for those states only.
    page.get_by_test_id("search").fill("no-job-is-called-this")
    page.get_by_text("No job matches the search.").wait_for()
    page.get_by_test_id("search").fill("browser-live")
    row.wait_for()
    page.get_by_test_id("state-filter").select_option("succeeded")
    row.wait_for(state="detached")
    page.get_by_test_id("state-filter").select_option("all")
    row.wait_for()

    row.get_by_role("link", name="View Details").click()
    page.get_by_test_id("job-state").wait_for()
    assert page.url.endswith(f"#/jobs/{job_id}/overview")
    assert page.get_by_test_id("parameters").get_by_text("max_steps").count() == 1

    # From here on no reload: new points and lines can only come from the event stream.
    page.get_by_test_id("tab-metrics").click()
    assert page.url.endswith(f"#/jobs/{job_id}/metrics")
    page.get_by_test_id("chart-loss").wait_for(timeout=90_000)
    before = loss_points(page)
    page.wait_for_function(
        f"document.querySelector('[data-testid=chart-loss]').dataset.points > {max(before, 1)}", timeout=90_000
    )
    assert loss_points(page) > before
    for metric in ("learning_rate", "grad_norm"):
        assert page.get_by_test_id(f"chart-{metric}").count() == 1
    assert page.locator("[data-testid=chart-loss] canvas").count() == 1
    page.get_by_test_id("log-scale").check()
    page.get_by_test_id("chart-loss").locator("canvas").wait_for()
    # Dragging across the chart zooms in on those steps; a double-click shows every step again.
    area = page.get_by_test_id("chart-loss").locator(".u-over")
    box = area.bounding_box()
    assert box is not None
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.3, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, y, steps=5)
    page.mouse.up()
    page.wait_for_function("document.querySelector('[data-testid=chart-loss]').dataset.zoomed === 'true'")
    area.dblclick()
    page.wait_for_function("document.querySelector('[data-testid=chart-loss]').dataset.zoomed === 'false'")
    page.mouse.move(0, 0)  # no cursor crosshair in the screenshot
    screenshot("details-evaluation-data")

    page.get_by_test_id("tab-logs").click()
    assert page.url.endswith(f"#/jobs/{job_id}/logs")
    page.wait_for_function("document.querySelectorAll('[data-testid=log] .line').length > 0")
    assert page.get_by_test_id("job-state").inner_text() == "RUNNING"
    lines_before = log_lines(page)
    # Terminated through the API: the agent's last lines arrive live, and the header turns CANCELLED.
    assert stack.http.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200
    page.get_by_test_id("log").get_by_text("terminating the training process").wait_for(timeout=90_000)
    assert log_lines(page) > lines_before
    page.get_by_test_id("job-state").get_by_text("CANCELLED").wait_for(timeout=90_000)
    page.get_by_test_id("log-search").fill("terminating the training")
    assert re.fullmatch(r"1 of \d+ lines", page.get_by_test_id("log-count").inner_text())
    page.get_by_test_id("log-search").fill("")
    with page.expect_download() as download:
        page.get_by_test_id("log-download").click()
    assert download.value.suggested_filename == f"{job_id}.log"
    assert "terminating the training process" in Path(download.value.path()).read_text()
    screenshot("details-train-log")

    page.get_by_test_id("tab-overview").click()
    page.get_by_test_id("history").get_by_text("CANCELLED").wait_for()
    screenshot("details-overview")

    page.get_by_role("link", name="← Model Training").click()
    row.wait_for()
    page.wait_for_function(f"""document.querySelector('tr[data-job-id="{job_id}"] .sparkline')?.dataset.points >= 2""")
    assert "CANCELLED" in row.inner_text()
    screenshot("model-training")
    assert page.get_by_test_id("error").count() == 0
