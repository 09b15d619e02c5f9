"""The whole path a user takes through the dashboard, in one headless browser against the embedded stack, with no
API call but the checks: upload a dataset on the Datasets page → start a train from the Start a New Train form →
watch its loss chart grow live on the Details page → copy it with another learning rate → compare the two runs →
terminate the first → publish the copy once it has finished. Each page is screenshotted as walk-<n>-<page> at
1280x800 and 1920x1080 under tests/output/screenshots/."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.browser.signin import sign_in
from tests.helpers import wait_for

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "datasets" / "sample-chat.jsonl"
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def job(stack, job_id: str) -> dict:
    return stack.http.get(f"/api/v1/jobs/{job_id}").json()


def job_id_from_url(page) -> str:
    page.wait_for_url("**/#/jobs/*/overview")
    return page.url.split("#/jobs/")[1].split("/")[0]


def points(page, testid: str) -> int:
    return int(page.get_by_test_id(testid).get_attribute("data-points") or 0)


def test_upload_train_watch_copy_compare_terminate_publish(page, stack, started, screenshot) -> None:
    suffix = uuid.uuid4().hex[:6]
    sign_in(page, stack.key, then="jobs")

    # 1. Upload: the dataset's progress reaches 100 % and its validation ends READY.
    page.get_by_test_id("nav-datasets").click()
    page.get_by_test_id("datasets").wait_for()
    page.get_by_test_id("upload-toggle").click()
    page.get_by_test_id("upload-file").set_input_files(str(SAMPLE))
    page.get_by_test_id("upload-name").fill(f"walk-{suffix}")
    page.get_by_test_id("upload-submit").click()
    page.get_by_test_id("upload-dataset-status").get_by_text("READY", exact=True).wait_for(timeout=60_000)
    assert page.get_by_test_id("upload-progress").get_attribute("data-percent") == "100"
    screenshot("walk-1-upload")
    dataset_id = page.get_by_test_id("upload-open-dataset").get_attribute("href").removeprefix("#/datasets/")
    assert stack.http.get(f"/api/v1/datasets/{dataset_id}").json()["status"] == "READY"

    # 2. Start a train from the form: a LoRA run far longer than the walk (logging every step, the default).
    page.get_by_test_id("nav-new").click()
    page.get_by_test_id("method-sft-lora").click()
    page.get_by_test_id("model").select_option("tiny-chat")
    page.get_by_test_id("dataset").select_option(dataset_id)
    page.get_by_test_id("train-name").fill(f"walk-long-{suffix}")
    page.get_by_test_id("param-max_steps").fill("5000")
    page.get_by_test_id("param-batch_size").fill("2")
    page.wait_for_function("document.querySelector('[data-testid=estimate]').dataset.state === 'ready'")
    assert page.get_by_test_id("estimate-steps").inner_text() == "5000"
    screenshot("walk-2-new-train")
    page.get_by_test_id("run").click()
    first = job_id_from_url(page)
    started.append(first)
    assert job(stack, first)["parameters"]["max_steps"] == 5000

    # 3. Watch it: the loss chart gains points from the event stream, without a reload.
    page.get_by_test_id("tab-metrics").click()
    page.get_by_test_id("chart-loss").wait_for(timeout=120_000)
    before = points(page, "chart-loss")
    page.wait_for_function(
        f"document.querySelector('[data-testid=chart-loss]').dataset.points > {max(before, 2)}", timeout=120_000
    )
    page.mouse.move(0, 0)
    screenshot("walk-3-live-chart")

    # 4. Copy it: the form comes pre-filled; a short run with twice the learning rate.
    page.get_by_test_id("tab-overview").click()
    page.get_by_test_id("copy-train").click()
    page.get_by_test_id("params").wait_for()
    assert page.get_by_test_id("param-max_steps").input_value() == "5000"
    learning_rate = float(page.get_by_test_id("param-learning_rate").input_value())
    page.get_by_test_id("train-name").fill(f"walk-copy-{suffix}")
    page.get_by_test_id("param-learning_rate").fill(repr(learning_rate * 2))
    page.get_by_test_id("param-max_steps").fill("4")
    page.wait_for_function("document.querySelector('[data-testid=estimate]').dataset.state === 'ready'")
    screenshot("walk-4-copy")
    page.get_by_test_id("run").click()
    second = job_id_from_url(page)
    started.append(second)
    copied = job(stack, second)
    assert copied["copied_from_job_id"] == first
    assert copied["parameters"]["max_steps"] == 4
    assert copied["parameters"]["learning_rate"] == pytest.approx(learning_rate * 2)

    # 5. Compare the two from the list: max_steps and learning_rate differ; the page follows the running one.
    page.get_by_test_id("nav-jobs").click()
    for job_id in (first, second):
        page.locator(f'tr[data-job-id="{job_id}"]').get_by_test_id("pick").check()
    page.get_by_test_id("compare").click()
    page.wait_for_url(f"**/#/compare/{first},{second}")
    for name in ("learning_rate", "max_steps"):
        assert page.get_by_test_id(f"param-{name}").get_attribute("data-differs") == "true"
    page.wait_for_function("document.querySelector('[data-testid=compare-status]')?.dataset.live === 'true'")

    # 6. Terminate the long one from its Details page (the copy waits for the one agent until then).
    page.goto(f"/#/jobs/{first}/overview")
    page.get_by_test_id("job-actions").get_by_test_id("action-terminate").click()
    page.get_by_test_id("confirm-ok").click()
    page.get_by_test_id("job-state").get_by_text("CANCELLED").wait_for(timeout=90_000)
    assert job(stack, first)["state"] == "CANCELLED"

    # The copy then runs to its end; back on Compare both runs' loss curves are overlaid.
    wait_for(lambda: job(stack, second)["state"], lambda s: s in TERMINAL, "the copy to finish")
    assert job(stack, second)["state"] == "SUCCEEDED"
    page.goto(f"/#/compare/{first},{second}")
    loss = page.get_by_test_id("compare-chart-loss")
    loss.wait_for()
    assert loss.get_attribute("data-series") == "2"
    assert all(int(n) >= 2 for n in loss.get_attribute("data-points").split(","))
    page.wait_for_function("document.querySelector('[data-testid=compare-status]')?.dataset.live === 'false'")
    page.mouse.move(0, 0)
    screenshot("walk-5-compare")

    # 7. Publish the copy from its Details page: the new model is in the catalog, its lineage names the job.
    page.goto(f"/#/jobs/{second}/overview")
    page.get_by_test_id("job-actions").get_by_test_id("action-publish").click()
    page.wait_for_function("!document.querySelector('[data-testid=publish-submit]')?.disabled")
    page.get_by_test_id("publish-name").fill(f"walk-model-{suffix}")
    page.get_by_test_id("publish-submit").click()
    published = page.get_by_test_id("published-model")
    published.wait_for()
    model_id = published.inner_text()
    screenshot("walk-6-published")
    published.click()
    page.wait_for_url(f"**/#/models/{model_id}")
    page.get_by_text(f"walk-model-{suffix}").first.wait_for()
    screenshot("walk-7-model")
    model = stack.http.get(f"/api/v1/models/{model_id}").json()
    assert model["name"] == f"walk-model-{suffix}"
    assert model["lineage"]["job_id"] == second and model["lineage"]["base_model_id"] == "tiny-chat"
    assert page.get_by_test_id("error").count() == 0
