"""Start a New Train (#/new) and Copy the Train (#/new/copy/<id>) in a real browser against the embedded stack.

The form is generated from the method's parameter schema as /api/v1/methods serves it, so these tests read the
specs (defaults, bounds) from the API rather than repeating them. Jobs are tiny (max_steps 3) and cancelled at
the end if still running, so the stack's one agent is free for the tests after these.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser.signin import sign_in

DATASETS = Path(__file__).resolve().parents[2] / "examples" / "datasets"
# Two rows that fail validation (no assistant turn; a row of another shape): an INVALID dataset no job may use.
INVALID_ROWS = b'{"messages": [{"role": "user", "content": "hi"}]}\n{"oops": 1}\n'


def upload(stack, name: str, content: bytes) -> dict:
    resp = stack.http.post("/api/v1/datasets", files={"file": (f"{name}.jsonl", content)}, data={"name": name})
    assert resp.status_code == 201, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def datasets(stack) -> dict[str, dict]:
    return {
        "chat": upload(stack, "nt-chat", (DATASETS / "sample-chat.jsonl").read_bytes()),
        "qa": upload(stack, "nt-qa", (DATASETS / "sample-qa.jsonl").read_bytes()),
        "preference": upload(stack, "nt-preference", (DATASETS / "sample-preference.jsonl").read_bytes()),
        "invalid": upload(stack, "nt-invalid", INVALID_ROWS),
    }


@pytest.fixture(scope="module")
def methods(stack) -> dict[str, dict]:
    resp = stack.http.get("/api/v1/methods", params={"page_size": 500})
    assert resp.status_code == 200, resp.text
    return {m["id"]: m for m in resp.json()["methods"]}


def spec(methods: dict, method_id: str, name: str) -> dict:
    return next(p for p in methods[method_id]["parameters"] if p["name"] == name)


def assert_shows(page, parameter: dict) -> None:
    """The field of a parameter is visible and holds the spec's default."""
    field = page.get_by_test_id(f"param-{parameter['name']}")
    assert field.is_visible(), parameter["name"]
    default = parameter.get("default_value")
    kind = parameter["type"].lower()
    if kind == "bool":
        assert field.is_checked() == bool(default), parameter["name"]
    elif kind in ("int", "float"):
        assert float(field.input_value()) == float(default), parameter["name"]
    else:
        assert field.input_value() == (default or ""), parameter["name"]


def choose(page, method: str, dataset: str, model: str = "tiny-chat") -> None:
    page.get_by_test_id(f"method-{method}").click()
    page.get_by_test_id("model").select_option(model)
    page.get_by_test_id("dataset").select_option(dataset)


def wait_estimate(page) -> None:
    page.wait_for_function("document.querySelector('[data-testid=estimate]').dataset.state === 'ready'")


def error_of(page, name: str) -> str:
    return page.get_by_test_id(f"param-error-{name}").inner_text()


def test_the_form_follows_the_method_schema_and_refuses_invalid_values_before_submit(
    page, stack, datasets, methods
) -> None:
    sign_in(page, stack.key)
    page.get_by_test_id("jobs").wait_for()
    page.get_by_test_id("nav-new").click()
    page.get_by_test_id("methods").wait_for()
    assert page.get_by_test_id("page-title").inner_text() == "Start a New Train"
    # Every method of the catalog, built-in and added, with its name, type and the dataset formats it takes.
    for method in methods.values():
        card = page.get_by_test_id(f"method-{method['id']}")
        assert method["display_name"] in card.inner_text()
        assert method["training_type"] in card.inner_text()
        for fmt in method["dataset_formats"]:
            assert fmt in card.inner_text()

    choose(page, "sft-lora", datasets["chat"]["id"])
    basic = [p for p in methods["sft-lora"]["parameters"] if p["group"] != "advanced"]
    advanced = [p for p in methods["sft-lora"]["parameters"] if p["group"] == "advanced"]
    assert basic and advanced
    for parameter in basic:
        assert_shows(page, parameter)
    # The advanced group starts collapsed; opened, its fields hold their defaults too.
    assert not page.get_by_test_id("advanced-params").evaluate("d => d.open")
    assert not page.get_by_test_id(f"param-{advanced[0]['name']}").is_visible()
    page.get_by_test_id("advanced-toggle").click()
    for parameter in advanced:
        assert_shows(page, parameter)

    # Datasets the method can't take are offered disabled, saying why.
    invalid = page.locator(f'[data-testid=dataset] option[value="{datasets["invalid"]["id"]}"]')
    assert invalid.is_disabled() and "only READY datasets train" in invalid.inner_text()
    preference = page.locator(f'[data-testid=dataset] option[value="{datasets["preference"]["id"]}"]')
    assert preference.is_disabled() and "takes" in preference.inner_text()
    # The chosen dataset's token stats, as the API counts them.
    stats = stack.http.get(f"/api/v1/datasets/{datasets['chat']['id']}/stats", params={"model_id": "tiny-chat"}).json()
    page.wait_for_function("document.querySelector('[data-testid=dataset-stats]').dataset.state === 'ready'")
    assert page.get_by_test_id("stats-rows").inner_text() == f"{int(stats['row_count']):,}"
    assert page.get_by_test_id("stats-tokens").inner_text() == f"{int(stats['total_tokens']):,}"

    run = page.get_by_test_id("run")
    assert run.is_enabled()
    # Out of the spec's own range, a message under the field at once, and Run waits for it to be fixed.
    rank = spec(methods, "sft-lora", "lora_rank")
    too_big = int(rank["maximum"]) + 1
    page.get_by_test_id("param-lora_rank").fill(str(too_big))
    assert error_of(page, "lora_rank") == f"must be <= {int(rank['maximum'])}, got {too_big}"
    assert run.is_disabled()
    assert "lora_rank" in page.get_by_test_id("run-note").inner_text()
    page.get_by_test_id("param-lora_rank").fill("2.5")
    assert error_of(page, "lora_rank").startswith("expected an integer")
    page.get_by_test_id("param-lora_rank").fill(str(int(rank["maximum"])))
    assert not page.get_by_test_id("param-error-lora_rank").is_visible()
    assert run.is_enabled()
    page.get_by_test_id("param-learning_rate").fill("-0.001")
    assert error_of(page, "learning_rate").startswith("must be >= ")
    assert run.is_disabled()
    page.get_by_test_id("param-learning_rate").fill("abc")
    assert error_of(page, "learning_rate") == 'expected a number, got "abc"'
    page.get_by_test_id("param-learning_rate").fill("0.0001")
    assert run.is_enabled()

    # Another method, other fields: DPO's beta appears with DPO's default; it takes the preference dataset.
    assert page.get_by_test_id("param-beta").count() == 0
    page.get_by_test_id("method-dpo").click()
    assert_shows(page, spec(methods, "dpo", "beta"))
    assert page.get_by_test_id("param-lora_alpha").count() == 1
    assert page.get_by_test_id("param-packing").count() == 0  # an SFT parameter DPO has not
    assert preference.is_enabled()
    chat = page.locator(f'[data-testid=dataset] option[value="{datasets["chat"]["id"]}"]')
    assert chat.is_disabled()
    # The chat dataset chosen for SFT can't train DPO: it is dropped and the page says so.
    assert page.get_by_test_id("dataset").input_value() == ""
    assert "can't be used" in page.get_by_test_id("dataset-note").inner_text()
    assert run.is_disabled()
    assert page.get_by_test_id("error").count() == 0


def test_the_estimate_shows_the_dry_run_of_these_settings(page, stack, datasets, screenshot) -> None:
    sign_in(page, stack.key)
    page.get_by_test_id("jobs").wait_for()
    page.goto("/#/new")
    choose(page, "sft-lora", datasets["chat"]["id"])
    page.get_by_test_id("param-max_steps").fill("3")
    page.get_by_test_id("param-batch_size").fill("2")
    wait_estimate(page)
    dry = stack.http.post(
        "/api/v1/jobs",
        json={
            "model_id": "tiny-chat",
            "dataset_id": datasets["chat"]["id"],
            "method_id": "sft-lora",
            "parameters": {"max_steps": 3, "batch_size": 2},
            "dry_run": True,
        },
    )
    assert dry.status_code == 200, dry.text
    estimate = dry.json()["estimate"]
    assert page.get_by_test_id("estimate-rows").inner_text() == str(int(estimate["dataset_rows"]))
    assert page.get_by_test_id("estimate-steps").inner_text() == str(int(estimate["total_steps"])) == "3"
    assert page.get_by_test_id("estimate-tokens").inner_text() == f"{int(estimate['dataset_tokens']):,}"
    if not estimate["estimated_seconds"]:
        assert page.get_by_test_id("estimate-time").inner_text() == "no estimate yet"
    # The resolved parameters: the two changed, every other at the server's default.
    resolved = page.get_by_test_id("estimate-params")
    resolved.locator("summary").click()
    assert resolved.locator('tr[data-param="max_steps"] td').inner_text() == "3"
    assert resolved.locator('tr[data-param="batch_size"] td').inner_text() == "2"
    assert resolved.locator("tr").count() == len(estimate["parameters"])
    page.evaluate("window.scrollTo(0, 0)")
    screenshot("new-train")


def test_run_the_train_sends_only_the_changed_values_and_shows_a_server_refusal_under_its_field(
    page, stack, datasets, methods, started
) -> None:
    sign_in(page, stack.key)
    page.get_by_test_id("jobs").wait_for()
    page.goto("/#/new")
    choose(page, "sft-lora", datasets["chat"]["id"])
    page.get_by_test_id("train-name").fill("nt-run")
    page.get_by_test_id("validation-dataset").select_option(datasets["qa"]["id"])
    page.get_by_test_id("param-max_steps").fill("3")
    page.get_by_test_id("param-learning_rate").fill("0.001")

    # A value only the server refuses (its cross-field rules): the dry run's refusal shows under the field and
    # in the estimate's error box.
    page.get_by_test_id("advanced-toggle").click()
    page.get_by_test_id("param-target_modules").fill("q proj")
    refused = stack.http.post(
        "/api/v1/jobs",
        json={
            "model_id": "tiny-chat",
            "dataset_id": datasets["chat"]["id"],
            "method_id": "sft-lora",
            "parameters": {"target_modules": "q proj"},
            "dry_run": True,
        },
    )
    assert refused.status_code == 400 and refused.json()["error"]["field"] == "parameters.target_modules"
    message = refused.json()["error"]["field_violations"][0]["description"]
    page.get_by_test_id("param-error-target_modules").get_by_text(message).wait_for()
    assert page.get_by_test_id("field-target_modules").get_attribute("data-state") == "refused"
    assert "INVALID_ARGUMENT" in page.get_by_test_id("estimate-error").inner_text()
    # Run submits anyway (the server is the judge); the refusal shows there too and nothing is created.
    page.get_by_test_id("run").click()
    page.get_by_test_id("submit-errors").get_by_test_id("error").wait_for()
    assert "parameters.target_modules" in page.get_by_test_id("submit-errors").inner_text()
    assert page.url.endswith("#/new")

    page.get_by_test_id("param-reset-target_modules").click()  # back to the default
    page.get_by_test_id("param-error-target_modules").wait_for(state="hidden")
    wait_estimate(page)
    with page.expect_request(
        lambda r: r.method == "POST" and r.url.endswith("/api/v1/jobs") and not r.post_data_json["dry_run"]
    ) as sent:
        page.get_by_test_id("run").click()
    page.wait_for_url("**/#/jobs/*/overview")
    body = sent.value.post_data_json
    assert body["dry_run"] is False
    assert body["parameters"] == {"max_steps": 3, "learning_rate": 0.001}  # only what was changed
    job_id = page.url.split("#/jobs/")[1].split("/")[0]
    started.append(job_id)
    page.get_by_test_id("job-state").wait_for()

    job = stack.http.get(f"/api/v1/jobs/{job_id}").json()
    assert job["name"] == "nt-run" and job["method_id"] == "sft-lora" and job["model_id"] == "tiny-chat"
    assert job["dataset_id"] == datasets["chat"]["id"]
    assert job["validation_dataset_id"] == datasets["qa"]["id"]
    for parameter in methods["sft-lora"]["parameters"]:
        expected = {"max_steps": 3, "learning_rate": 0.001}.get(parameter["name"], parameter.get("default_value"))
        assert job["parameters"][parameter["name"]] == expected, parameter["name"]


def test_copy_prefills_from_the_job_and_sends_only_the_changes(page, stack, datasets, started, screenshot) -> None:
    source = stack.http.post(
        "/api/v1/jobs",
        json={
            "name": "nt-source",
            "model_id": "tiny-chat",
            "dataset_id": datasets["chat"]["id"],
            "validation_dataset_id": datasets["qa"]["id"],
            "method_id": "sft-lora",
            "parameters": {"max_steps": 3, "lora_rank": 4, "lr_scheduler_type": "cosine"},
        },
    )
    assert source.status_code == 201, source.text
    source_job = source.json()
    started.append(source_job["id"])

    sign_in(page, stack.key)
    page.get_by_test_id("jobs").wait_for()
    page.goto(f"/#/new/copy/{source_job['id']}")
    page.get_by_test_id("params").wait_for()
    assert page.get_by_test_id("page-title").inner_text() == "Copy of nt-source"
    # The copy keeps its method: the only card, chosen.
    assert page.locator(".method-card").count() == 1
    assert page.get_by_test_id("method-sft-lora").locator("input").is_checked()
    assert page.get_by_test_id("train-name").input_value() == "nt-source-copy"
    assert page.get_by_test_id("model").input_value() == "tiny-chat"
    assert page.get_by_test_id("dataset").input_value() == datasets["chat"]["id"]
    assert page.get_by_test_id("validation-dataset").input_value() == datasets["qa"]["id"]
    assert page.get_by_test_id("param-lora_rank").input_value() == "4"
    assert page.get_by_test_id("param-max_steps").input_value() == "3"
    assert page.get_by_test_id("param-lr_scheduler_type").input_value() == "cosine"
    # The copy's estimate is the copy endpoint's dry run.
    with page.expect_request(lambda r: r.url.endswith(f"/api/v1/jobs/{source_job['id']}/copy")) as dry:
        page.get_by_test_id("param-learning_rate").fill("0.0005")
    assert dry.value.post_data_json["dry_run"] is True
    wait_estimate(page)
    assert page.get_by_test_id("estimate-steps").inner_text() == "3"
    page.get_by_test_id("validation-dataset").select_option("")  # evaluate without the old validation set
    wait_estimate(page)
    page.evaluate("window.scrollTo(0, 0)")
    screenshot("copy-train")

    with page.expect_request(
        lambda r: r.url.endswith(f"/api/v1/jobs/{source_job['id']}/copy") and not r.post_data_json["dry_run"]
    ) as sent:
        page.get_by_test_id("run").click()
    page.wait_for_url("**/#/jobs/*/overview")
    body = sent.value.post_data_json
    assert body == {
        "name": "nt-source-copy",
        "parameter_overrides": {"learning_rate": 0.0005},
        "clear_validation_dataset": True,
        "dry_run": False,
    }
    copy_id = page.url.split("#/jobs/")[1].split("/")[0]
    started.append(copy_id)
    copy = stack.http.get(f"/api/v1/jobs/{copy_id}").json()
    assert copy["copied_from_job_id"] == source_job["id"]
    assert copy["name"] == "nt-source-copy"
    assert copy["validation_dataset_id"] == ""
    assert copy["parameters"] == {**source_job["parameters"], "learning_rate": 0.0005}


def test_a_dataset_deleted_since_the_page_loaded_is_refused_under_its_picker(page, stack) -> None:
    doomed = upload(stack, "nt-doomed", (DATASETS / "sample-chat.jsonl").read_bytes())
    sign_in(page, stack.key)
    page.get_by_test_id("jobs").wait_for()
    page.goto("/#/new")
    choose(page, "sft-lora", doomed["id"])
    wait_estimate(page)
    assert stack.http.delete(f"/api/v1/datasets/{doomed['id']}").status_code == 204
    # The next dry run is refused: the jobs service names the field only in its message ("dataset_id: ...").
    page.get_by_test_id("param-max_steps").fill("4")
    page.get_by_test_id("field-error-dataset_id").get_by_text(f"dataset '{doomed['id']}' not found").wait_for()
    assert "NOT_FOUND" in page.get_by_test_id("estimate-error").inner_text()
    assert page.get_by_test_id("estimate-rows").count() == 0  # no numbers of settings the server refused


def test_a_copy_of_an_unknown_job_says_so(page, stack) -> None:
    sign_in(page, stack.key)
    page.get_by_test_id("jobs").wait_for()
    page.goto("/#/new/copy/job-does-not-exist")
    page.get_by_test_id("error").wait_for()
    assert "NOT_FOUND" in page.get_by_test_id("error").inner_text()
    assert page.get_by_test_id("retry").is_visible()
