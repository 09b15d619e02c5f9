"""The Models and Methods pages in a real browser against the embedded stack: the catalog and tiny-chat's
details; a model published from a tiny finished training, its lineage to the job and the base model; a merge
from the page ending in the complete model with its lineage to the source; a deployment from the page, live,
a chat answer (request_count rises in the API) and the undeploy; the sft-lora schema table against
/api/v1/methods; Add New Method with a bad field (the server's message under the field), then a good one,
listed, then deleted; a member sees neither Add nor Delete. Screenshots at 1280x800 and 1920x1080."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.signin import sign_in
from tests.helpers import wait_for

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "datasets" / "sample-chat.jsonl"
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def sign_in_to(page, key: str, route: str) -> None:
    # the shared 2-core machine may be busy with a training or another suite: more room than the default 20 s
    page.set_default_timeout(45_000)
    sign_in(page, key)
    page.goto(f"/#/{route}")


def text_of(page, testid: str) -> str:
    return page.get_by_test_id(testid).inner_text().strip()


@pytest.fixture(scope="module")
def published(stack) -> Iterator[dict]:
    """A CUSTOMIZED model published from a 3-step sft-lora run of tiny-chat; its deployments are stopped after."""
    with SAMPLE.open("rb") as f:
        uploaded = stack.http.post("/api/v1/datasets", files={"file": f}, data={"name": "models-page-sample"})
    assert uploaded.status_code == 201, uploaded.text
    dataset_id = uploaded.json()["id"]
    body = {
        "name": "models-page",
        "model_id": "tiny-chat",
        "dataset_id": dataset_id,
        "method_id": "sft-lora",
        "parameters": {"max_steps": 3, "batch_size": 2},
    }
    submitted = stack.http.post("/api/v1/jobs", json=body)
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["id"]
    job = wait_for(
        lambda: stack.http.get(f"/api/v1/jobs/{job_id}").json(), lambda j: j["state"] in TERMINAL, "the training"
    )
    assert job["state"] == "SUCCEEDED", job
    made = stack.http.post(f"/api/v1/jobs/{job_id}/publish", json={"name": "browser-published"})
    assert made.status_code == 201, made.text
    yield {"model_id": made.json()["model_id"], "job_id": job_id, "dataset_id": dataset_id}
    for d in stack.http.get("/api/v1/deployments").json().get("deployments", []):
        stack.http.delete(f"/api/v1/deployments/{d['id']}")  # never leave the shared agent serving


def test_the_models_list_shows_tiny_chat_and_its_details(page, stack, screenshot) -> None:
    sign_in_to(page, stack.key, "models")
    row = page.get_by_test_id("model-row-tiny-chat")
    row.wait_for()
    api = stack.http.get("/api/v1/models/tiny-chat").json()
    assert row.get_by_test_id("model-kind").inner_text() == "BASE"
    assert api["architecture"] in row.inner_text()
    page.get_by_test_id("deployments").wait_for()

    page.get_by_test_id("kind-filter").select_option("CUSTOMIZED")
    row.wait_for(state="detached")
    page.get_by_test_id("kind-filter").select_option("all")
    page.get_by_test_id("model-search").fill("no-such-model-anywhere")
    row.wait_for(state="detached")
    page.get_by_test_id("model-search").fill("tiny")
    row.wait_for()
    screenshot("models")

    page.get_by_test_id("model-link-tiny-chat").click()
    page.get_by_test_id("model-fields").wait_for()
    assert text_of(page, "model-name") == "tiny-chat"
    fields = page.get_by_test_id("model-fields").inner_text()
    for value in (
        api["id"],
        api["architecture"],
        api["dtype"],
        str(api["context_length"]),
        f"{api['parameter_count']:,}",
    ):
        assert value in fields
    # a base model has no adapter to merge, and a built-in one can't be deleted
    assert page.get_by_test_id("model-merge").count() == 0
    assert page.get_by_test_id("model-delete").count() == 0


def test_a_published_model_shows_its_lineage_and_merges_from_the_page(page, stack, published, screenshot) -> None:
    model_id, job_id = published["model_id"], published["job_id"]
    sign_in_to(page, stack.key, f"models/{model_id}")
    job_link = page.get_by_test_id("lineage-job")
    job_link.wait_for()
    assert job_link.get_attribute("href") == f"#/jobs/{job_id}"
    assert page.get_by_test_id("lineage-base").get_attribute("href") == "#/models/tiny-chat"
    details = text_of(page, "lineage-job-details")
    assert "checkpoint step 3" in details and "sft-lora" in details and published["dataset_id"] in details
    assert text_of(page, "model-kind") == "CUSTOMIZED"
    screenshot("model-lineage")

    page.get_by_test_id("model-merge").click()
    page.get_by_test_id("merge-name").fill("browser-merged")
    page.get_by_test_id("merge-submit").click()
    result = page.get_by_test_id("merge-result")
    result.wait_for(timeout=120_000)
    merge_job = page.get_by_test_id("op-job-link").inner_text()
    merged_id = result.get_attribute("href").removeprefix("#/models/")
    merged = stack.http.get(f"/api/v1/models/{merged_id}").json()
    assert merged["name"] == "browser-merged" and merged["kind"] == "COMPLETE"
    assert merged["lineage"]["source_model_id"] == model_id
    assert merged["lineage"]["operation_job_id"] == merge_job

    result.click()
    source = page.get_by_test_id("lineage-source")
    source.wait_for()
    assert text_of(page, "model-name") == "browser-merged"
    assert source.get_attribute("href") == f"#/models/{model_id}"
    assert page.get_by_test_id("lineage-operation").get_attribute("href") == f"#/jobs/{merge_job}"
    assert page.get_by_test_id("lineage-job").get_attribute("href") == f"#/jobs/{job_id}"
    assert page.get_by_test_id("lineage-base").get_attribute("href") == "#/models/tiny-chat"

    # listed as COMPLETE; then deleted from its page (a customized model's page offers Delete)
    page.goto("/#/models")
    row = page.get_by_test_id(f"model-row-{merged_id}")
    row.wait_for()
    assert row.get_by_test_id("model-kind").inner_text() == "COMPLETE"
    row.get_by_test_id(f"model-link-{merged_id}").click()
    page.get_by_test_id("lineage-source").wait_for()
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_test_id("model-delete").click()
    page.get_by_test_id(f"model-row-{model_id}").wait_for()
    assert page.get_by_test_id(f"model-row-{merged_id}").count() == 0
    assert stack.http.get(f"/api/v1/models/{merged_id}").status_code == 404


def test_deploy_chat_and_undeploy_from_the_page(page, stack, published, screenshot) -> None:
    model_id = published["model_id"]
    sign_in_to(page, stack.key, f"models/{model_id}")
    reason = page.get_by_test_id("chat-disabled-reason")
    page.wait_for_function(
        "document.querySelector('[data-testid=chat-disabled-reason]')?.textContent.startsWith('Not deployed')"
    )
    assert page.get_by_test_id("chat-send").is_disabled()

    page.get_by_test_id("model-deploy").click()
    page.wait_for_function(
        "document.querySelector('[data-testid=deployment-state]')?.textContent === 'LIVE'", timeout=120_000
    )
    assert reason.is_hidden()
    deployments = stack.http.get("/api/v1/deployments", params={"model_id": model_id}).json()["deployments"]
    assert [d["state"] for d in deployments] == ["LIVE"]
    deployment_id = deployments[0]["id"]
    before = int(deployments[0].get("request_count", 0))

    page.get_by_test_id("chat-max-tokens").fill("12")
    page.get_by_test_id("chat-input").fill("Hello, who are you?")
    page.get_by_test_id("chat-send").click()
    answer = page.get_by_test_id("chat-answer")
    page.wait_for_function(
        "document.querySelector('[data-testid=chat-answer]')?.dataset.chars !== undefined"
        " || document.querySelector('[data-testid=error]') !== null",
        timeout=60_000,
    )
    errors = page.get_by_test_id("error").all_inner_texts()
    assert not errors, errors
    assert int(answer.get_attribute("data-chars")) > 0 and answer.inner_text() != ""
    wait_for(
        lambda: int(stack.http.get(f"/api/v1/deployments/{deployment_id}").json().get("request_count", 0)),
        lambda n: n > before,
        "the deployment's request_count to count the chat",
        timeout_s=30,
    )
    screenshot("chat")

    # the Deployments section lists it; undeploy from the model's page
    page.goto("/#/models")
    page.get_by_test_id(f"deployment-row-{deployment_id}").wait_for()
    page.goto(f"/#/models/{model_id}")
    page.wait_for_function("document.querySelector('[data-testid=deployment-state]')?.textContent === 'LIVE'")
    page.get_by_test_id("model-undeploy").click()
    wait_for(
        lambda: stack.http.get(f"/api/v1/deployments/{deployment_id}").json()["state"],
        lambda s: s == "STOPPED",
        "the deployment to stop",
        timeout_s=60,
    )
    page.wait_for_function(
        "document.querySelector('[data-testid=deployment-state]')?.textContent === 'STOPPED'", timeout=10_000
    )
    assert page.get_by_test_id("chat-send").is_disabled()
    assert not page.get_by_test_id("model-deploy").is_disabled()


def test_the_sft_lora_schema_table_matches_the_api(page, stack, screenshot) -> None:
    sign_in_to(page, stack.key, "methods")
    page.get_by_test_id("method-row-sft-lora").wait_for()
    listed = stack.http.get("/api/v1/methods").json()["methods"]
    for m in listed:
        assert page.get_by_test_id(f"method-row-{m['id']}").count() == 1
    screenshot("methods")

    page.get_by_test_id("method-link-sft-lora").click()
    table = page.get_by_test_id("param-table")
    table.wait_for()
    spec = next(m for m in listed if m["id"] == "sft-lora")["parameters"]
    assert table.locator("tbody tr").count() == len(spec)
    for p in spec:
        cells = [c.strip() for c in page.get_by_test_id(f"param-{p['name']}").locator("td").all_inner_texts()]
        name, kind, default, bounds, choices, group, required, env, aliases, help_text = cells
        assert (name, kind, group, env) == (p["name"], p["type"], p["group"], p["env_name"])
        assert required == ("yes" if p["required"] else "no")
        assert choices == (", ".join(p.get("choices", [])) or "–")
        assert aliases == (", ".join(p.get("aliases", [])) or "–")
        assert help_text == p["help"].strip()
        low, high = p.get("minimum"), p.get("maximum")
        if low is not None and high is not None:
            shown = [float(v) for v in bounds.split(" – ")]
            assert shown == [pytest.approx(low), pytest.approx(high)]
        elif low is not None:
            assert bounds.startswith("≥ ") and float(bounds[2:]) == pytest.approx(low)
        elif high is not None:
            assert bounds.startswith("≤ ") and float(bounds[2:]) == pytest.approx(high)
        else:
            assert bounds == "–"
        d = p.get("default_value")
        if d is None or d == "":
            assert default == "–"
        elif isinstance(d, bool):
            assert default == str(d).lower()
        elif isinstance(d, (int, float)):
            assert float(default) == pytest.approx(d)
        else:
            assert default == str(d)


def test_add_a_method_through_the_form_then_delete_it(page, stack, screenshot) -> None:
    name = f"browser-{uuid.uuid4().hex[:8]}"
    try:
        sign_in_to(page, stack.key, "methods")
        page.get_by_test_id("method-add").click()
        page.get_by_test_id("method-name").fill("Bad Name")
        page.get_by_test_id("stage-training-file").fill("mine/train.py")
        page.get_by_test_id("stage-training-env").fill("base")
        page.get_by_test_id("method-submit").click()
        under_name = page.get_by_test_id("field-error-name")
        page.wait_for_function("!!document.querySelector('[data-testid=\"field-error-name\"]')?.textContent")
        refused = stack.http.post(
            "/api/v1/methods",
            json={
                "name": "Bad Name",
                "training_type": "chat",
                "lifecycle": "customized",
                "stages": {"training": {"file": "mine/train.py", "env": "base"}},
            },
        )
        assert refused.status_code == 400
        expected = next(v for v in refused.json()["error"]["field_violations"] if v["field"] == "definition.name")
        assert under_name.inner_text().strip() == expected["description"]
        assert page.get_by_test_id("field-error-stages.training.file").inner_text() == ""
        screenshot("method-add")

        page.get_by_test_id("method-name").fill(name)
        page.get_by_test_id("method-add-param").click()
        page.get_by_test_id("param-0-name").fill("alpha")
        page.get_by_test_id("param-0-type").select_option("float")
        page.get_by_test_id("param-0-default").fill("0.5")
        page.get_by_test_id("param-0-max").fill("1")
        page.get_by_test_id("method-submit").click()
        page.get_by_test_id(f"method-row-{name}").wait_for()
        assert page.get_by_test_id("method-form").count() == 0
        created = stack.http.get(f"/api/v1/methods/{name}").json()
        assert created["stages"]["training"] == {"file": "mine/train.py", "env": "base"}
        assert [(p["name"], p["default_value"], p["maximum"]) for p in created["parameters"]] == [("alpha", 0.5, 1.0)]

        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_test_id(f"method-delete-{name}").click()
        page.get_by_test_id(f"method-row-{name}").wait_for(state="detached")
        assert stack.http.get(f"/api/v1/methods/{name}").status_code == 404
        assert page.get_by_test_id("method-delete-sft-lora").count() == 0  # built-ins are never deletable
    finally:
        stack.http.delete(f"/api/v1/methods/{name}")


def test_a_member_sees_no_add_or_delete(page, stack) -> None:
    added = stack.http.post(
        "/api/v1/methods",
        json={
            "name": f"member-view-{uuid.uuid4().hex[:6]}",
            "training_type": "chat",
            "lifecycle": "customized",
            "stages": {"training": {"file": "t.py", "env": "base"}},
        },
    )
    assert added.status_code == 201, added.text
    method = added.json()["id"]
    key = stack.http.post("/api/v1/keys", json={"name": "methods-member", "roles": {"default": "member"}})
    assert key.status_code == 201, key.text
    try:
        sign_in_to(page, key.json()["secret"], "methods")
        page.get_by_test_id(f"method-row-{method}").wait_for()
        assert page.get_by_test_id("method-add").count() == 0
        assert page.get_by_test_id(f"method-delete-{method}").count() == 0
    finally:
        stack.http.delete(f"/api/v1/methods/{method}")
        stack.http.delete(f"/api/v1/keys/{key.json()['id']}")
