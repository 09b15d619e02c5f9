"""The Datasets and API Keys pages in a real headless browser against the embedded stack: uploads through the page's
file input (a small file in one request, a few-MB one through the resumable chunked protocol) with the progress
bar followed to 100 %, the dataset's validation state, report by line, preview and token stats checked against the
API's own answers; a key created in the page whose secret is shown once, works, and stops working once revoked in
the page; a key without the admin role is told it needs it. Screenshots at 1280x800 and 1920x1080."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.browser.signin import sign_in
from tests.helpers import wait_for

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "datasets" / "sample-chat.jsonl"

# Records every value the upload bar's data-percent takes, from before the upload starts (the bar may be replaced
# or hidden meanwhile: the observer watches the whole page).
RECORD_PERCENTS = """() => {
  window.__percents = [];
  window.__phases = [];
  new MutationObserver((records) => {
    for (const r of records) {
      const value = r.target.getAttribute(r.attributeName);
      if (r.attributeName === 'data-percent') window.__percents.push(Number(value));
      else if (value) window.__phases.push(value);
    }
  }).observe(document.body, { subtree: true, attributes: true, attributeFilter: ['data-percent', 'data-phase'] });
}"""


def upload(page, path: Path, name: str, options: Callable[[], None] | None = None) -> str:
    """Uploads `path` through the Datasets page (after `options` fills more of the form); waits for its validation
    to end and returns the dataset's id."""
    page.goto("/#/datasets")
    page.get_by_test_id("datasets").wait_for()
    page.get_by_test_id("upload-toggle").click()
    page.get_by_test_id("upload-file").set_input_files(str(path))
    page.get_by_test_id("upload-name").fill(name)
    if options:
        options()
    page.evaluate(RECORD_PERCENTS)
    page.get_by_test_id("upload-submit").click()
    status = page.get_by_test_id("upload-dataset-status")
    page.wait_for_function(
        "() => ['READY', 'INVALID']"
        ".includes(document.querySelector('[data-testid=upload-dataset-status]')?.textContent)",
        timeout=60_000,
    )
    assert status.inner_text() in ("READY", "INVALID")
    href = page.get_by_test_id("upload-open-dataset").get_attribute("href")
    assert href and href.startswith("#/datasets/")
    return href.removeprefix("#/datasets/")


def percents(page) -> list[int]:
    return page.evaluate("window.__percents")


def test_upload_shows_progress_then_ready_and_the_details_match_the_api(page, stack, screenshot) -> None:
    sign_in(page, stack.key)
    name = f"browser-upload-{uuid.uuid4().hex[:6]}"
    dataset_id = upload(page, SAMPLE, name)

    progress = page.get_by_test_id("upload-progress")
    assert progress.get_attribute("data-path") == "multipart"  # a 9 KB file goes in one request
    assert progress.get_attribute("data-percent") == "100"
    assert percents(page)[-1] == 100
    assert page.get_by_test_id("upload-dataset-status").inner_text() == "READY"
    assert not page.get_by_test_id("upload-cancel").is_visible()  # only while bytes are on their way
    screenshot("dataset-upload")

    api = stack.http.get(f"/api/v1/datasets/{dataset_id}").json()
    assert (api["name"], api["status"], api["row_count"], api["format"]) == (name, "READY", 40, "chat")
    assert api["size_bytes"] == SAMPLE.stat().st_size

    # The list (refreshed after the upload) shows it; the search narrows the list to it and to nothing.
    row = page.locator(f'tr[data-dataset-id="{dataset_id}"]')
    row.wait_for()
    cells = row.inner_text()
    assert name in cells and "chat" in cells and "40" in cells and "READY" in cells
    page.get_by_test_id("dataset-search").fill("no-dataset-is-called-this")
    page.get_by_text("No dataset matches the search.").wait_for()
    page.get_by_test_id("dataset-search").fill(name)
    row.wait_for()
    assert page.locator("[data-testid=datasets] tbody tr").count() == 1
    screenshot("datasets")

    row.get_by_role("link", name="View Details").click()
    page.get_by_test_id("dataset-status").wait_for()
    assert page.url.endswith(f"#/datasets/{dataset_id}")
    assert page.get_by_test_id("dataset-status").inner_text() == "READY"
    assert page.get_by_test_id("validation-state").inner_text().startswith("No problems: all 40 rows")

    # The preview: the API's first rows, each message shown with its role.
    preview = stack.http.get(f"/api/v1/datasets/{dataset_id}/preview", params={"limit": 10}).json()["rows"]
    rows = page.get_by_test_id("preview-row")
    rows.first.wait_for()
    assert rows.count() == len(preview) == 10
    for i, expected in enumerate(preview):
        shown = rows.nth(i)
        messages = shown.locator(".ds-msg")
        assert messages.count() == len(expected["messages"])
        for j, message in enumerate(expected["messages"]):
            assert messages.nth(j).get_attribute("data-role") == message["role"]
            assert messages.nth(j).locator(".content").inner_text() == message["content"]

    # Token stats: computed with tiny-chat's tokenizer, as the API answers for the same question.
    stats = stack.http.get(f"/api/v1/datasets/{dataset_id}/stats", params={"model_id": "tiny-chat"}).json()
    page.locator("[data-stat=total_tokens]").wait_for()
    assert page.get_by_test_id("stats-model").input_value() == "tiny-chat"
    for key in ("row_count", "total_tokens", "min_tokens", "p50_tokens", "p95_tokens", "max_tokens"):
        assert page.locator(f"[data-stat={key}]").inner_text() == f"{int(stats[key]):,}", key
    assert page.locator("[data-stat=mean_tokens]").inner_text() == f"{stats['mean_tokens']:.1f}"
    assert stats["row_count"] == 40 and stats["total_tokens"] > 0

    # Download: the stored bytes, as uploaded.
    with page.expect_download() as downloaded:
        page.get_by_test_id("dataset-download").click()
    assert downloaded.value.suggested_filename == f"{name}.jsonl"
    assert Path(downloaded.value.path()).read_bytes() == SAMPLE.read_bytes()

    # A limit counts the rows over it; the page shows the loading state while the catalog counts.
    limit = int(stats["p50_tokens"])
    with_limit = stack.http.get(
        f"/api/v1/datasets/{dataset_id}/stats", params={"model_id": "tiny-chat", "max_seq_length": limit}
    ).json()
    page.get_by_test_id("stats-max-seq").fill(str(limit))
    page.evaluate(
        """() => { window.__statsLoading = false; new MutationObserver(() => {
             if (document.querySelector('[data-testid=stats-loading]')) window.__statsLoading = true;
           }).observe(document.querySelector('[data-testid=token-stats]'), { subtree: true, childList: true }); }"""
    )
    page.get_by_test_id("stats-compute").click()
    truncated = page.locator("[data-stat=rows_truncated]")
    truncated.wait_for()
    assert truncated.inner_text() == f"{int(with_limit['rows_truncated']):,}"
    assert 0 < int(with_limit["rows_truncated"]) < 40
    assert page.evaluate("window.__statsLoading") is True
    screenshot("dataset-details")

    # Split into train and validation: two new datasets whose rows add up to the original's.
    page.get_by_test_id("split-ratio").fill("0.25")
    page.get_by_test_id("split-submit").click()
    page.get_by_test_id("split-validation").wait_for()
    train_id = page.get_by_test_id("split-train").get_attribute("href").removeprefix("#/datasets/")
    validation_id = page.get_by_test_id("split-validation").get_attribute("href").removeprefix("#/datasets/")
    train = stack.http.get(f"/api/v1/datasets/{train_id}").json()
    validation = stack.http.get(f"/api/v1/datasets/{validation_id}").json()
    assert train["parent_dataset_id"] == validation["parent_dataset_id"] == dataset_id
    assert train["row_count"] + validation["row_count"] == 40 and validation["row_count"] == 10

    # Delete the validation split from its page: asked, then gone from the API, and the page goes to the list.
    page.get_by_test_id("split-validation").click()
    page.wait_for_url(f"**/#/datasets/{validation_id}")
    page.get_by_test_id("dataset-delete").click()
    page.get_by_test_id("dataset-delete-confirm").click()
    page.get_by_test_id("datasets").wait_for()
    assert stack.http.get(f"/api/v1/datasets/{validation_id}").status_code == 404


def test_a_broken_file_is_invalid_with_its_problems_by_line(page, stack, tmp_path, screenshot) -> None:
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    broken = tmp_path / "broken.jsonl"
    broken.write_text(
        "\n".join(
            [
                json.dumps(good),
                '{"messages": [{"role": "user", "content": "unterminated',  # line 2: not JSON
                json.dumps({"prompt": "no messages here"}),  # line 3: a row missing messages
                json.dumps(good),
            ]
        )
        + "\n"
    )
    sign_in(page, stack.key)
    dataset_id = upload(page, broken, "browser-broken")
    assert page.get_by_test_id("upload-dataset-status").inner_text() == "INVALID"

    api = stack.http.get(f"/api/v1/datasets/{dataset_id}").json()
    assert api["status"] == "INVALID"
    problems = api["validation"]["problems"]
    assert sorted({p["line"] for p in problems}) == [2, 3]

    page.get_by_test_id("upload-open-dataset").click()
    report = page.get_by_test_id("validation-problems")
    report.wait_for()
    assert page.get_by_test_id("dataset-status").inner_text() == "INVALID"
    assert report.locator("tbody tr").count() == len(problems)
    for p in problems:
        shown = report.locator(f'tbody tr[data-line="{p["line"]}"]')
        assert f"line {p['line']}" in shown.first.inner_text()
        assert any(p["message"] in shown.nth(i).inner_text() for i in range(shown.count()))
    assert "messages" in report.locator('tbody tr[data-line="3"]').inner_text()
    # No token stats or split for an invalid dataset: the page says why instead of calling the API.
    assert "READY" in page.get_by_test_id("stats-state").inner_text()
    assert page.get_by_test_id("split-submit").is_disabled()
    # Its rows can still be read, to find what to fix.
    page.get_by_test_id("preview-row").first.wait_for()
    screenshot("dataset-invalid")


def test_the_form_options_reach_the_api_and_a_refusal_shows_its_message(page, stack, tmp_path) -> None:
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(5)))

    def columns() -> None:
        page.get_by_test_id("upload-description").fill("questions and answers")
        page.get_by_test_id("upload-format").select_option("columns")
        page.get_by_test_id("upload-input-column").fill("question")
        page.get_by_test_id("upload-output-column").fill("answer")

    sign_in(page, stack.key)
    dataset_id = upload(page, qa, "browser-columns", columns)
    api = stack.http.get(f"/api/v1/datasets/{dataset_id}").json()
    assert (api["status"], api["format"], api["description"]) == ("READY", "columns", "questions and answers")
    assert (api["prompt_input_column"], api["prompt_output_column"]) == ("question", "answer")
    page.get_by_test_id("upload-open-dataset").click()
    first = page.get_by_test_id("preview-row").first
    first.wait_for()
    assert first.locator('[data-field="question"]').inner_text() == "question\nq0"
    assert first.locator('[data-field="answer"]').inner_text() == "answer\na0"

    # An empty file: the API refuses it, and the page says so in the API's words.
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    page.goto("/#/datasets")
    page.get_by_test_id("upload-toggle").click()
    page.get_by_test_id("upload-file").set_input_files(str(empty))
    page.get_by_test_id("upload-submit").click()
    error = page.get_by_test_id("upload-panel").get_by_test_id("error")
    error.wait_for()
    refused = stack.http.post("/api/v1/datasets", files={"file": ("empty.jsonl", b"")}, data={"name": "empty"})
    assert refused.status_code == 400
    body = refused.json()["error"]
    assert error.inner_text() == f"Upload of empty.jsonl failed: {body['code']}: {body['message']} (HTTP 400)"


def write_large(path: Path, rows: int) -> Path:
    """Chat rows of about 500 bytes each: 8000 make 4 MB, over the page's 1 MB threshold for the resumable path."""
    with path.open("w") as f:
        for i in range(rows):
            row = {
                "messages": [
                    {"role": "user", "content": f"Question {i}: " + "what about this? " * 12},
                    {"role": "assistant", "content": f"Answer {i}: " + "it is so. " * 20},
                ]
            }
            f.write(json.dumps(row) + "\n")
    return path


def test_a_large_file_goes_through_the_resumable_upload_with_intermediate_progress(page, stack, tmp_path) -> None:
    large = write_large(tmp_path / "large.jsonl", 8000)
    size = large.stat().st_size
    assert size > 3 * 1024 * 1024

    sign_in(page, stack.key)
    dataset_id = upload(page, large, "browser-large")
    progress = page.get_by_test_id("upload-progress")
    assert progress.get_attribute("data-path") == "resumable"
    seen = percents(page)
    assert seen[-1] == 100
    between = sorted({p for p in seen if 0 < p < 100})
    assert len(between) >= 2, seen  # per chunk at least: 1 MB of 4 is 25 %
    assert seen == sorted(seen), seen  # never backwards
    assert page.get_by_test_id("upload-dataset-status").inner_text() == "READY"

    api = stack.http.get(f"/api/v1/datasets/{dataset_id}").json()
    assert (api["status"], api["row_count"], api["size_bytes"]) == ("READY", 8000, size)
    assert api["sha256"] == hashlib.sha256(large.read_bytes()).hexdigest()


def test_a_chunk_cut_off_is_sent_again_from_the_gateways_offset(page, stack, tmp_path) -> None:
    large = write_large(tmp_path / "resumed.jsonl", 5000)
    cut: list[str] = []

    def drop_the_second_chunk_once(route) -> None:
        content_range = route.request.headers.get("content-range", "")
        if route.request.method == "PUT" and content_range.startswith("bytes 1048576-") and not cut:
            cut.append(content_range)
            route.abort("connectionreset")
        else:
            route.continue_()

    page.route("**/api/v1/uploads/**", drop_the_second_chunk_once)
    sign_in(page, stack.key)
    dataset_id = upload(page, large, "browser-resumed")
    assert cut, "the second chunk was never sent"
    assert any(p.startswith("Resuming at byte 1048576") for p in page.evaluate("window.__phases")), page.evaluate(
        "window.__phases"
    )
    assert page.get_by_test_id("upload-dataset-status").inner_text() == "READY"
    api = stack.http.get(f"/api/v1/datasets/{dataset_id}").json()
    assert (api["row_count"], api["size_bytes"]) == (5000, large.stat().st_size)
    assert api["sha256"] == hashlib.sha256(large.read_bytes()).hexdigest()


def test_a_key_created_in_the_page_works_until_revoked_there(page, stack, screenshot) -> None:
    sign_in(page, stack.key)
    page.goto("/#/keys")
    page.get_by_test_id("keys").wait_for()
    name = f"browser-key-{uuid.uuid4().hex[:6]}"
    page.get_by_test_id("key-name").fill(name)
    page.get_by_test_id("key-kind").select_option("service")
    page.get_by_test_id("key-role").select_option("viewer")
    page.get_by_test_id("key-create").click()

    secret_box = page.get_by_test_id("key-secret")
    secret_box.wait_for()
    secret = secret_box.input_value()
    assert secret.startswith("tf_")
    assert "won't be shown again" in page.get_by_test_id("key-secret-box").inner_text()
    page.get_by_test_id("key-copy").click()
    page.get_by_test_id("key-copy-state").get_by_text("Copied").wait_for()

    who = httpx.get(f"{stack.url}/api/v1/whoami", headers={"Authorization": f"Bearer {secret}"})
    assert who.status_code == 200, who.text
    key_id = who.json()["key"]["id"]
    assert who.json()["key"]["name"] == name
    assert who.json()["key"]["roles"] == [{"project_id": "default", "role": "viewer"}]

    row = page.locator(f'tr[data-key-id="{key_id}"]')
    row.wait_for()
    assert name in row.inner_text() and "service" in row.inner_text() and "default: viewer" in row.inner_text()
    assert row.get_by_test_id("key-state").inner_text() == "ACTIVE"
    screenshot("keys")

    # Shown once: dismissed, and not on the page after a reload either.
    page.get_by_test_id("key-secret-done").click()
    secret_box.wait_for(state="detached")
    page.reload()
    row.wait_for()
    assert secret not in page.content()

    row.get_by_test_id("key-revoke").click()
    row.get_by_test_id("key-revoke-confirm").click()
    page.wait_for_function(
        f"""() => document.querySelector('tr[data-key-id="{key_id}"] [data-testid=key-state]')
                   ?.textContent.startsWith('REVOKED')"""
    )
    listed = {k["id"]: k for k in stack.http.get("/api/v1/keys", params={"include_revoked": True}).json()["keys"]}
    assert listed[key_id].get("revoke_time")

    # Services may trust a key for their short authentication cache: refused within seconds.
    wait_for(
        lambda: httpx.get(f"{stack.url}/api/v1/whoami", headers={"Authorization": f"Bearer {secret}"}).status_code,
        lambda status: status == 401,
        "the revoked key to be refused",
        timeout_s=30,
    )


def test_a_key_without_the_admin_role_is_told_it_needs_it(page, stack) -> None:
    made = stack.http.post(
        "/api/v1/keys", json={"name": f"browser-member-{uuid.uuid4().hex[:6]}", "roles": {"default": "member"}}
    )
    assert made.status_code == 201, made.text
    sign_in(page, made.json()["secret"])
    page.goto("/#/keys")
    notice = page.get_by_test_id("keys-forbidden")
    notice.wait_for()
    assert "needs the admin role in project default" in notice.inner_text()
    assert "with the member role" in notice.inner_text()
    assert page.get_by_test_id("keys").count() == 0
    assert page.get_by_test_id("key-create").count() == 0
    # A member still uses the Datasets page.
    page.goto("/#/datasets")
    page.get_by_test_id("datasets").wait_for()
    stack.http.delete(f"/api/v1/keys/{made.json()['id']}")

    # A project admin who is no superuser manages the keys, but is not offered superuser for a new one.
    admin = stack.http.post(
        "/api/v1/keys", json={"name": f"browser-admin-{uuid.uuid4().hex[:6]}", "roles": {"default": "admin"}}
    )
    assert admin.status_code == 201, admin.text
    page.get_by_test_id("sign-out").click()
    sign_in(page, admin.json()["secret"])
    page.goto("/#/keys")
    page.locator(f'tr[data-key-id="{admin.json()["id"]}"]').wait_for()
    assert page.get_by_test_id("key-create").is_visible()
    assert page.get_by_test_id("key-superuser").count() == 0
    stack.http.delete(f"/api/v1/keys/{admin.json()['id']}")
