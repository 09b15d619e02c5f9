// The Datasets page (#/datasets: the list, a search, and an upload with byte progress) and a dataset's page
// (#/datasets/<id>: its validation report by line, a preview of the first rows, token stats, a train/validation
// split, download and delete), after the seeds' dataset screens.
//
// Uploads: a small file goes in one multipart POST /api/v1/datasets, a large one through the gateway's
// resumable protocol (POST /api/v1/uploads, PUT chunks with Content-Range, /complete), which survives a dropped
// connection by asking the gateway how much arrived and sending the rest. XMLHttpRequest, not fetch: only it
// reports upload progress.

import "./datasets.css";

import {
  ApiError,
  describeError,
  getJson,
  listDatasets,
  listModels,
  request,
  sendJson,
  session,
  type Dataset,
} from "../api";
import { clear, errorBox, h } from "../dom";
import * as fmt from "../format";

// -- uploads ----------------------------------------------------------------------------------------------

/** Above this a file goes through the resumable path; below it one request is simpler and as fast. */
const RESUMABLE_FROM_BYTES = 1024 * 1024;
const CHUNK_BYTES = 1024 * 1024;
const MAX_RETRIES = 4;

interface UploadOptions {
  name: string;
  description: string;
  format: string; // "" lets the catalog detect it
  prompt_input_column: string;
  prompt_output_column: string;
}

interface UploadHandlers {
  /** Bytes the gateway has taken so far, of the file's size. */
  progress(sent: number, total: number): void;
  /** What is happening now, in words (sending, retrying, validating). */
  phase(text: string): void;
}

interface UploadState {
  upload_id: string;
  offset: number;
  size: number | null;
  complete: boolean;
}

function errorFromXhr(xhr: XMLHttpRequest): ApiError {
  try {
    const body = JSON.parse(xhr.responseText) as { error?: { code?: string; message?: string } };
    if (body.error) return new ApiError(xhr.status, body.error.code ?? "ERROR", body.error.message ?? xhr.responseText);
  } catch {
    // not the API's JSON error body: show its text below
  }
  return new ApiError(xhr.status, xhr.statusText || "ERROR", xhr.responseText.slice(0, 300) || "no response body");
}

/** One request whose body's progress is reported; the answer's JSON, or an ApiError with the API's message. */
function send<T>(
  method: string,
  path: string,
  body: XMLHttpRequestBodyInit,
  headers: Record<string, string>,
  onProgress: (loaded: number) => void,
  signal: AbortSignal,
): Promise<T> {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, path);
    if (session.key) xhr.setRequestHeader("Authorization", `Bearer ${session.key}`);
    if (session.project) xhr.setRequestHeader("X-TuneForge-Project", session.project);
    for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => onProgress(e.loaded);
    xhr.onload = () => {
      if (xhr.status < 200 || xhr.status >= 300) return reject(errorFromXhr(xhr));
      try {
        resolve(JSON.parse(xhr.responseText) as T);
      } catch (err) {
        reject(new ApiError(xhr.status, "BAD_RESPONSE", `the gateway's answer is not JSON (${describeError(err)})`));
      }
    };
    xhr.onerror = () => reject(new ApiError(0, "UNAVAILABLE", "the connection to the gateway was lost"));
    xhr.onabort = () => reject(new ApiError(0, "CANCELLED", "the upload was cancelled"));
    const abort = () => xhr.abort();
    signal.addEventListener("abort", abort, { once: true });
    xhr.onloadend = () => signal.removeEventListener("abort", abort);
    if (signal.aborted) return xhr.abort();
    xhr.send(body);
  });
}

const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A failure worth retrying from the gateway's offset: the connection, a busy or moved offset, a 5xx. */
function retryable(err: unknown): boolean {
  return err instanceof ApiError && err.code !== "CANCELLED" && (err.status === 0 || err.status === 409 || err.status >= 500);
}

async function multipart(file: File, opts: UploadOptions, on: UploadHandlers, signal: AbortSignal): Promise<Dataset> {
  const form = new FormData();
  form.append("file", file);
  for (const [k, v] of Object.entries(opts)) if (v) form.append(k, v);
  on.phase("Sending");
  return send<Dataset>(
    "POST",
    "/api/v1/datasets",
    form,
    {},
    // The multipart body is a little longer than the file (its boundaries): never report past the file.
    (loaded) => {
      on.progress(Math.min(loaded, file.size), file.size);
      if (loaded >= file.size) on.phase("Validating");
    },
    signal,
  );
}

async function resumable(file: File, opts: UploadOptions, on: UploadHandlers, signal: AbortSignal): Promise<Dataset> {
  on.phase("Starting a resumable upload");
  const created = await sendJson<UploadState>("/api/v1/uploads", { ...opts, size: file.size });
  const id = encodeURIComponent(created.upload_id);
  try {
    let offset = created.offset;
    let retries = 0;
    while (offset < file.size) {
      const end = Math.min(file.size, offset + CHUNK_BYTES);
      on.phase(retries ? `Resuming at byte ${offset} (retry ${retries})` : "Sending");
      try {
        const from = offset;
        const state = await send<UploadState>(
          "PUT",
          `/api/v1/uploads/${id}`,
          file.slice(from, end),
          { "Content-Range": `bytes ${from}-${end - 1}/${file.size}`, "Content-Type": "application/octet-stream" },
          (loaded) => on.progress(from + Math.min(loaded, end - from), file.size),
          signal,
        );
        offset = state.offset;
        retries = 0;
        on.progress(offset, file.size);
      } catch (err) {
        if (!retryable(err) || retries >= MAX_RETRIES || signal.aborted) throw err;
        retries += 1;
        on.phase(`${describeError(err)}; retrying in ${retries}s`);
        await pause(1000 * retries);
        // The gateway keeps what arrived of a cut chunk: carry on from its offset, not ours. If it can't be
        // asked yet, the next chunk is sent from ours and a wrong offset answers 409, another retry.
        try {
          offset = (await getJson<UploadState>(`/api/v1/uploads/${id}`)).offset;
          on.progress(offset, file.size);
        } catch (asking) {
          if (!retryable(asking)) throw asking;
        }
      }
    }
    on.phase("Validating");
    return await sendJson<Dataset>(`/api/v1/uploads/${id}/complete`, undefined);
  } catch (err) {
    // A failed or cancelled upload is dropped from the gateway's spool rather than left to expire.
    try {
      await request(`/api/v1/uploads/${id}`, { method: "DELETE" });
    } catch (cleanup) {
      throw new Error(`${describeError(err)}; and the unfinished upload could not be removed: ${describeError(cleanup)}`);
    }
    throw err;
  }
}

type UploadPath = "multipart" | "resumable";

function uploadPath(file: File): UploadPath {
  return file.size > RESUMABLE_FROM_BYTES ? "resumable" : "multipart";
}

/** Uploads the file by the path its size calls for; the new dataset as the API answers (often still VALIDATING). */
function uploadDataset(file: File, opts: UploadOptions, on: UploadHandlers, signal: AbortSignal): Promise<Dataset> {
  return uploadPath(file) === "resumable" ? resumable(file, opts, on, signal) : multipart(file, opts, on, signal);
}

// -- shared pieces ----------------------------------------------------------------------------------------

// The formats the catalog validates (DatasetFormat), with the row shape each expects.
const FORMATS: [format: string, shape: string][] = [
  ["chat", '{"messages": [{"role": …, "content": …}, …]}'],
  ["prompt_completion", '{"prompt": …, "completion": …}'],
  ["instruction", '{"instruction": …, "input": …, "output": …} (Alpaca)'],
  ["preference", '{"prompt": …, "chosen": …, "rejected": …} (DPO)'],
  ["prompt_answer", '{"prompt": …, "answer": …} (GRPO rewards)'],
  ["text", '{"text": …}'],
  ["columns", "any two keys, named below as the prompt input and output columns"],
];

interface Problem {
  line: number;
  field: string;
  message: string;
}

interface Validation {
  problems?: Problem[];
  problem_count?: number;
}

interface TokenStats {
  row_count: number;
  min_tokens: number;
  mean_tokens: number;
  p50_tokens: number;
  p95_tokens: number;
  max_tokens: number;
  total_tokens: number;
  rows_truncated: number;
}

const validationOf = (d: Dataset) => (d.validation ?? {}) as Validation;
const datasetPath = (id: string) => `/api/v1/datasets/${encodeURIComponent(id)}`;

export function bytes(n: number | undefined): string {
  if (n === undefined || n === null || !Number.isFinite(n)) return "–";
  if (n < 1024) return `${n} B`;
  const units = ["KB", "MB", "GB", "TB"];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

const integer = (n: number | undefined) => (n === undefined || n === null ? "–" : Number(n).toLocaleString("en-US"));

function statusBadge(status: string, testid?: string): HTMLElement {
  return h("span", { class: fmt.stateClass(status || "unknown"), "data-testid": testid }, status || "–");
}

/** Saves the dataset's JSONL (the API wants the key in a header, so a plain link can't fetch it). */
async function download(dataset: Dataset): Promise<void> {
  const blob = await (await request(`${datasetPath(dataset.id)}/content`)).blob();
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: `${dataset.name || dataset.id}.jsonl` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

function downloadButton(dataset: Dataset, report: (message: string) => void): HTMLButtonElement {
  const button = h("button", { "data-testid": "dataset-download", title: "Download the stored JSONL" }, "Download");
  button.addEventListener("click", async () => {
    button.disabled = true;
    button.textContent = "Downloading…";
    try {
      await download(dataset);
    } catch (err) {
      report(`Could not download ${dataset.name || dataset.id}: ${describeError(err)}`);
    } finally {
      button.disabled = false;
      button.textContent = "Download";
    }
  });
  return button;
}

/** Polls a dataset until its validation is over (READY or INVALID); resolves with it, or null when stopped. */
async function untilValidated(id: string, isStopped: () => boolean, everyMs = 1000): Promise<Dataset | null> {
  for (;;) {
    const d = await getJson<Dataset>(datasetPath(id));
    if (d.status !== "VALIDATING") return d;
    await pause(everyMs);
    if (isStopped()) return null;
  }
}

// -- the upload panel -------------------------------------------------------------------------------------

function uploadPanel(onUploaded: () => void): { el: HTMLElement; dispose: () => void } {
  let controller: AbortController | null = null;
  let disposed = false;

  const fileInput = h("input", {
    type: "file",
    accept: ".jsonl,.json,.ndjson,application/x-ndjson,application/json",
    "data-testid": "upload-file",
    id: "upload-file",
  });
  const nameInput = h("input", { type: "text", id: "upload-name", maxlength: 255, placeholder: "from the file name", "data-testid": "upload-name" });
  const descInput = h("textarea", { id: "upload-description", rows: 2, placeholder: "optional", "data-testid": "upload-description" });
  const formatHint = h("div", { class: "muted" });
  const formatSelect = h(
    "select",
    { id: "upload-format", "data-testid": "upload-format" },
    h("option", { value: "" }, "Detect from the first row"),
    ...FORMATS.map(([f]) => h("option", { value: f }, f)),
  );
  const columnsList = h("datalist", { id: "upload-columns" });
  const inputColumn = h("input", { type: "text", id: "upload-input-column", list: "upload-columns", placeholder: "e.g. question", "data-testid": "upload-input-column" });
  const outputColumn = h("input", { type: "text", id: "upload-output-column", list: "upload-columns", placeholder: "e.g. answer", "data-testid": "upload-output-column" });
  const columnsRow = h(
    "div",
    { class: "upload-columns" },
    h("label", { for: "upload-input-column" }, "Prompt input column", inputColumn),
    h("label", { for: "upload-output-column" }, "Prompt output column", outputColumn),
  );
  const fileInfo = h("div", { class: "muted", "data-testid": "upload-file-info" });
  const submit = h("button", { type: "submit", class: "primary", "data-testid": "upload-submit" }, "Upload");
  const cancel = h("button", { type: "button", hidden: true, "data-testid": "upload-cancel" }, "Cancel upload");
  const fill = h("div", { class: "fill" });
  const progressText = h("span", { class: "muted", "data-testid": "upload-progress-text" });
  const progress = h(
    "div",
    { class: "upload-progress", hidden: true, "data-testid": "upload-progress", "data-percent": "0", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" },
    h("div", { class: "track" }, fill),
    progressText,
  );
  const result = h("div", { class: "upload-result", "data-testid": "upload-status" });

  function showFormatHint(): void {
    const f = formatSelect.value;
    formatHint.textContent = f ? `Each line: ${FORMATS.find(([x]) => x === f)?.[1] ?? ""}` : "The catalog tells the format from the first row's keys.";
    // The column mapping matters for the columns format, and helps detection find two unusual keys.
    columnsRow.hidden = !(f === "columns" || f === "");
  }
  formatSelect.addEventListener("change", showFormatHint);
  showFormatHint();

  fileInput.addEventListener("change", async () => {
    const file = fileInput.files?.[0];
    clear(result);
    clear(columnsList);
    if (!file) return clear(fileInfo);
    if (!nameInput.value) nameInput.value = file.name.replace(/\.(jsonl|ndjson|json)$/i, "");
    const path = uploadPath(file) === "resumable" ? "resumable upload in chunks" : "one request";
    clear(fileInfo, `${file.name} · ${bytes(file.size)} · ${path}`);
    // Offer the first row's keys for the column mapping.
    try {
      const head = await file.slice(0, 64 * 1024).text();
      const row = JSON.parse(head.split(/\r?\n/, 1)[0] ?? "") as unknown;
      if (row && typeof row === "object" && !Array.isArray(row)) {
        const keys = Object.keys(row);
        clear(columnsList, ...keys.map((k) => h("option", { value: k })));
        fileInfo.append(h("div", {}, `First row's keys: ${keys.join(", ") || "(none)"}`));
      }
    } catch {
      fileInfo.append(h("div", {}, "The first line is not a JSON object: the validation report will say what is wrong."));
    }
  });

  function setProgress(sent: number, total: number): void {
    const percent = total ? Math.floor((sent * 100) / total) : 100;
    if (progress.dataset.percent !== String(percent)) {
      progress.dataset.percent = String(percent);
      progress.setAttribute("aria-valuenow", String(percent));
      fill.style.width = `${percent}%`;
    }
    progressText.dataset.bytes = `${bytes(sent)} of ${bytes(total)}`;
    progressText.textContent = `${percent}% · ${bytes(sent)} of ${bytes(total)}${progressText.dataset.phase ? ` · ${progressText.dataset.phase}` : ""}`;
  }

  function setPhase(text: string): void {
    progressText.dataset.phase = text;
    progressText.textContent = `${progress.dataset.percent}% · ${progressText.dataset.bytes ?? ""} · ${text}`;
  }

  function showResult(d: Dataset): void {
    const v = validationOf(d);
    clear(
      result,
      h("span", {}, "Validation: "),
      statusBadge(d.status, "upload-dataset-status"),
      " ",
      d.status === "VALIDATING"
        ? h("span", { class: "muted" }, "checking every line…")
        : h(
            "span",
            { class: "muted" },
            d.status === "INVALID"
              ? `${integer(v.problem_count)} problem(s) in ${d.name}: open it for the report by line`
              : `${integer(d.row_count)} rows, format ${d.format}`,
          ),
      " ",
      h("a", { href: `#/datasets/${encodeURIComponent(d.id)}`, "data-testid": "upload-open-dataset" }, "Open dataset →"),
    );
  }

  async function follow(uploaded: Dataset): Promise<void> {
    try {
      const done = await untilValidated(uploaded.id, () => disposed);
      if (!done) return;
      showResult(done);
      onUploaded();
    } catch (err) {
      result.append(errorBox(`Uploaded, but its validation could not be followed: ${describeError(err)}`));
    }
  }

  const form = h(
    "form",
    {
      class: "upload-form",
      onsubmit: async (e: Event) => {
        e.preventDefault();
        const file = fileInput.files?.[0];
        if (!file) return clear(result, errorBox("Choose a JSONL file first."));
        controller = new AbortController();
        submit.disabled = true;
        cancel.hidden = false;
        progress.hidden = false;
        progress.dataset.path = uploadPath(file);
        delete progressText.dataset.phase;
        setProgress(0, file.size);
        clear(result);
        try {
          const uploaded = await uploadDataset(
            file,
            {
              name: nameInput.value.trim(),
              description: descInput.value.trim(),
              format: formatSelect.value,
              prompt_input_column: columnsRow.hidden ? "" : inputColumn.value.trim(),
              prompt_output_column: columnsRow.hidden ? "" : outputColumn.value.trim(),
            },
            { progress: setProgress, phase: setPhase },
            controller.signal,
          );
          setProgress(file.size, file.size);
          setPhase("Uploaded");
          cancel.hidden = true;
          showResult(uploaded);
          onUploaded();
          // The catalog answers before a long validation ends: follow it to READY or INVALID here.
          if (uploaded.status === "VALIDATING") void follow(uploaded);
        } catch (err) {
          setPhase("Failed");
          clear(result, errorBox(`Upload of ${file.name} failed: ${describeError(err)}`));
        } finally {
          controller = null;
          submit.disabled = false;
          cancel.hidden = true;
        }
      },
    },
    h("label", { for: "upload-file" }, "JSONL file", fileInput, fileInfo),
    h("label", { for: "upload-name" }, "Name", nameInput),
    h("label", { for: "upload-description", class: "wide" }, "Description", descInput),
    h("label", { for: "upload-format" }, "Format", formatSelect, formatHint),
    columnsRow,
    h("div", { class: "upload-actions" }, submit, cancel),
  );
  cancel.addEventListener("click", () => controller?.abort());

  const el = h(
    "section",
    { class: "card upload-panel", "data-testid": "upload-panel" },
    h("h2", {}, "Upload a dataset"),
    h(
      "p",
      { class: "muted" },
      "One JSON object per line (JSONL). Every line is validated; a file with problems is kept as INVALID with a report by line number, so you can fix it and upload again. ",
      `Files over ${bytes(RESUMABLE_FROM_BYTES)} go in ${bytes(CHUNK_BYTES)} chunks and resume after a dropped connection.`,
    ),
    form,
    columnsList,
    progress,
    result,
  );
  return {
    el,
    dispose: () => {
      disposed = true;
      controller?.abort();
    },
  };
}

// -- the list ---------------------------------------------------------------------------------------------

export function datasetsPage(main: HTMLElement): () => void {
  main.classList.add("ds-page");
  let datasets: Dataset[] = [];
  let search = "";
  let statusFilter = "";
  let timer = 0;
  let stopped = false;

  const errors = h("div", {});
  // Failures of a row's action, kept apart from the list's own (which a good refresh clears).
  const actionErrors = h("div", {});
  const body = h("tbody", {});
  const status = h("div", { class: "status", "data-testid": "list-status" }, "Loading the datasets…");
  const uploader = uploadPanel(() => void refresh());
  uploader.el.hidden = true;
  const toggle = h("button", { class: "primary", "data-testid": "upload-toggle" }, "Upload dataset");
  toggle.addEventListener("click", () => {
    uploader.el.hidden = !uploader.el.hidden;
    toggle.textContent = uploader.el.hidden ? "Upload dataset" : "Hide upload";
  });
  const searchBox = h("input", {
    type: "search",
    placeholder: "Search name, id, format, description",
    "data-testid": "dataset-search",
    oninput: () => {
      search = searchBox.value.trim().toLowerCase();
      render();
    },
  });
  const statusSelect = h(
    "select",
    {
      "data-testid": "dataset-status-filter",
      onchange: () => {
        statusFilter = statusSelect.value;
        render();
      },
    },
    ...["", "READY", "VALIDATING", "INVALID"].map((s) => h("option", { value: s }, s ? s[0] + s.slice(1).toLowerCase() : "All")),
  );

  clear(
    main,
    h("div", { class: "page-head" }, h("h1", {}, "Datasets"), h("span", { class: "spacer" }), h("label", {}, "Status ", statusSelect), searchBox, toggle),
    uploader.el,
    errors,
    actionErrors,
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "jobs datasets", "data-testid": "datasets" },
        h("thead", {}, h("tr", {}, ...["Name / ID", "Format", "Rows", "Size", "Status", "Created", ""].map((c) => h("th", {}, c)))),
        body,
      ),
    ),
    status,
  );

  const matches = (d: Dataset) =>
    (!statusFilter || d.status === statusFilter) &&
    (!search || [d.name, d.id, d.format, d.description].some((f) => (f ?? "").toLowerCase().includes(search)));

  function row(d: Dataset): HTMLElement {
    const link = `#/datasets/${encodeURIComponent(d.id)}`;
    const v = validationOf(d);
    return h(
      "tr",
      { "data-dataset-id": d.id },
      h(
        "td",
        {},
        h("a", { href: link, class: "job-name" }, d.name || d.id),
        h("div", { class: "muted mono" }, d.id),
        d.parent_dataset_id ? h("div", { class: "muted" }, `split of ${d.parent_dataset_id}`) : null,
      ),
      h("td", {}, d.format || "–"),
      h("td", { class: "num" }, d.status === "VALIDATING" ? "…" : integer(d.row_count)),
      h("td", { class: "num" }, bytes(d.size_bytes)),
      h(
        "td",
        {},
        statusBadge(d.status),
        d.status === "INVALID" ? h("div", { class: "muted" }, `${integer(v.problem_count)} problem(s)`) : null,
      ),
      h("td", {}, fmt.time(d.create_time)),
      h(
        "td",
        { class: "actions" },
        h("a", { href: link, class: "button" }, "View Details"),
        " ",
        downloadButton(d, (m) => clear(actionErrors, errorBox(m))),
      ),
    );
  }

  function render(): void {
    const shown = datasets.filter(matches);
    clear(
      body,
      ...(shown.length
        ? shown.map(row)
        : [h("tr", {}, h("td", { colspan: 7, class: "empty" }, datasets.length ? "No dataset matches the search." : "No datasets yet: upload one."))]),
    );
    clear(status, `${shown.length} of ${datasets.length} datasets · refreshed ${new Date().toLocaleTimeString()}`);
  }

  async function refresh(): Promise<void> {
    window.clearTimeout(timer);
    try {
      datasets = (await listDatasets()).datasets ?? [];
      // Newest first, as a user looks for the one just uploaded.
      datasets.sort((a, b) => (b.create_time ?? "").localeCompare(a.create_time ?? ""));
      render();
      clear(errors);
    } catch (err) {
      clear(errors, errorBox(`Could not list the datasets: ${describeError(err)}`));
    }
    // While a dataset validates its row follows it; otherwise a slow refresh picks up others' uploads.
    const validating = datasets.some((d) => d.status === "VALIDATING");
    if (!stopped) timer = window.setTimeout(() => void refresh(), validating ? 1500 : 10_000);
  }

  void refresh();
  return () => {
    stopped = true;
    window.clearTimeout(timer);
    uploader.dispose();
  };
}

// -- a dataset's page -------------------------------------------------------------------------------------

const PREVIEW_LIMITS = [5, 10, 20, 50, 100];

interface ChatMessage {
  role: string;
  content: unknown;
}

function isChat(value: unknown): value is ChatMessage[] {
  return Array.isArray(value) && value.length > 0 && value.every((m) => m && typeof m === "object" && "role" in m);
}

function text(value: unknown): string {
  if (typeof value === "string") return value;
  // Multimodal content parts: their text, the rest as JSON.
  if (Array.isArray(value))
    return value.map((p) => (p && typeof p === "object" && "text" in p ? String((p as { text: unknown }).text) : JSON.stringify(p))).join("\n");
  return JSON.stringify(value, null, 2);
}

function chat(messages: ChatMessage[]): HTMLElement {
  return h(
    "div",
    { class: "ds-chat" },
    ...messages.map((m) =>
      h(
        "div",
        { class: `ds-msg ds-msg-${String(m.role).replace(/[^a-z_-]/gi, "")}`, "data-role": String(m.role) },
        h("div", { class: "role" }, String(m.role)),
        h("div", { class: "content" }, text(m.content)),
      ),
    ),
  );
}

/** One preview row, readable: chat messages as a conversation, other fields by name. */
function previewRow(row: Record<string, unknown>, index: number): HTMLElement {
  return h(
    "div",
    { class: "preview-row", "data-testid": "preview-row", "data-index": index },
    h("div", { class: "preview-index muted" }, `Row ${index + 1}`),
    h(
      "div",
      { class: "preview-fields" },
      ...Object.entries(row).map(([key, value]) =>
        h(
          "div",
          { class: "preview-field", "data-field": key },
          h("div", { class: "field-name mono" }, key),
          isChat(value) ? chat(value) : h("div", { class: typeof value === "string" ? "field-text" : "field-text mono" }, text(value)),
        ),
      ),
    ),
  );
}

function kv(rows: [string, Node | string][]): HTMLElement {
  return h("table", { class: "kv" }, h("tbody", {}, ...rows.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v)))));
}

/** The spread of row lengths on one axis: min to max, the p50–p95 band, the median and the limit if set. */
function distribution(s: TokenStats, limit: number): HTMLElement {
  const values = [s.min_tokens, s.max_tokens, ...(limit ? [limit] : [])];
  // The axis spans the rows (and the limit), with a margin: from 0 every short-row dataset would crowd at the right.
  const span = Math.max(1, Math.max(...values) - Math.min(...values));
  const lo = Math.max(0, Math.floor(Math.min(...values) - span * 0.05));
  const hi = Math.ceil(Math.max(...values) + span * 0.05);
  const at = (n: number) => `${(((n - lo) / Math.max(1, hi - lo)) * 100).toFixed(2)}%`;
  const band = (from: number, to: number, cls: string, title: string) =>
    h("div", { class: cls, style: `left:${at(from)};width:calc(${at(to)} - ${at(from)})`, title });
  return h(
    "div",
    { class: "dist", "data-testid": "token-distribution" },
    h(
      "div",
      { class: "dist-track" },
      band(s.min_tokens, s.max_tokens, "dist-range", `min ${integer(s.min_tokens)} – max ${integer(s.max_tokens)} tokens`),
      band(s.p50_tokens, s.p95_tokens, "dist-core", `p50 ${integer(s.p50_tokens)} – p95 ${integer(s.p95_tokens)} tokens`),
      h("div", { class: "mark mid", style: `left:${at(s.p50_tokens)}`, title: `median ${integer(s.p50_tokens)} tokens` }),
      limit ? h("div", { class: "mark limit", style: `left:${at(limit)}`, title: `limit ${integer(limit)} tokens` }) : null,
    ),
    h("div", { class: "dist-axis muted" }, h("span", {}, `${integer(lo)} tokens`), h("span", {}, `${integer(hi)} tokens`)),
    h(
      "div",
      { class: "dist-legend muted" },
      h("span", { class: "key range" }), "min – max ",
      h("span", { class: "key core" }), "p50 – p95 ",
      h("span", { class: "key median" }), "median ",
      limit ? h("span", { class: "key limit" }) : null, limit ? `max sequence length ${integer(limit)}` : null,
    ),
  );
}

export function datasetDetailsPage(main: HTMLElement, datasetId: string): () => void {
  main.classList.add("ds-page");
  let dataset: Dataset | null = null;
  let stopped = false;
  let previewLimit = 10;

  const head = h("div", { class: "page-head" });
  const errors = h("div", {});
  const overview = h("section", { class: "card", "data-testid": "dataset-overview" });
  const report = h("section", { class: "card", "data-testid": "validation-report" });
  const stats = h("section", { class: "card", "data-testid": "token-stats" });
  const split = h("section", { class: "card", "data-testid": "dataset-split" });
  const preview = h("section", { class: "card preview", "data-testid": "preview" });
  clear(
    main,
    h("a", { href: "#/datasets", class: "back" }, "← Datasets"),
    head,
    errors,
    // Three columns at 1280 px and up: the dataset and its split, the validation report, the token stats.
    h("div", { class: "ds-detail-grid" }, h("div", { class: "ds-col" }, overview, split), report, stats),
    preview,
  );
  clear(head, h("h1", {}, datasetId), h("span", { class: "muted" }, "Loading…"));

  const showError = (message: string) => {
    if (![...errors.children].some((e) => e.textContent === message)) errors.append(errorBox(message));
  };

  // -- header: name, status, download, delete -------------------------------------------------------------
  function renderHead(d: Dataset): void {
    const del = h("button", { class: "ds-danger", "data-testid": "dataset-delete" }, "Delete");
    const confirmBox = h("span", { class: "ds-confirm", hidden: true });
    del.addEventListener("click", () => {
      del.hidden = true;
      confirmBox.hidden = false;
      clear(
        confirmBox,
        `Delete ${d.name || d.id} and its stored file? `,
        h(
          "button",
          {
            class: "ds-danger",
            "data-testid": "dataset-delete-confirm",
            onclick: async (e: Event) => {
              (e.target as HTMLButtonElement).disabled = true;
              try {
                await request(datasetPath(d.id), { method: "DELETE" });
                location.hash = "#/datasets";
              } catch (err) {
                showError(`Could not delete ${d.name || d.id}: ${describeError(err)}`);
                del.hidden = false;
                confirmBox.hidden = true;
              }
            },
          },
          "Yes, delete",
        ),
        " ",
        h(
          "button",
          {
            "data-testid": "dataset-delete-cancel",
            onclick: () => {
              del.hidden = false;
              confirmBox.hidden = true;
            },
          },
          "Cancel",
        ),
      );
    });
    clear(
      head,
      h("h1", { "data-testid": "dataset-name" }, d.name || d.id),
      statusBadge(d.status, "dataset-status"),
      h("span", { class: "muted mono" }, d.id),
      h("span", { class: "spacer" }),
      downloadButton(d, showError),
      del,
      confirmBox,
    );
  }

  function renderOverview(d: Dataset): void {
    const parent = d.parent_dataset_id
      ? h("a", { href: `#/datasets/${encodeURIComponent(d.parent_dataset_id)}`, class: "mono" }, d.parent_dataset_id)
      : "–";
    clear(
      overview,
      h("h2", {}, "Dataset"),
      kv([
        ["Name", d.name || "–"],
        ["Description", d.description || "–"],
        ["Format", d.format || "–"],
        ["Rows", d.status === "VALIDATING" ? "counting…" : integer(d.row_count)],
        ["Size", `${bytes(d.size_bytes)} (${integer(d.size_bytes)} bytes)`],
        ["Columns", (d.columns ?? []).join(", ") || "–"],
        ["Prompt input column", String(d.prompt_input_column || "–")],
        ["Prompt output column", String(d.prompt_output_column || "–")],
        ["Split from", parent],
        ["Project", d.project_id || "built-in"],
        ["Created", fmt.time(d.create_time)],
        ["SHA-256", h("span", { class: "mono" }, d.sha256 || "–")],
      ]),
    );
  }

  function renderReport(d: Dataset): void {
    const v = validationOf(d);
    const problems = v.problems ?? [];
    const total = v.problem_count ?? problems.length;
    let body: Node;
    if (d.status === "VALIDATING") {
      body = h("p", { class: "ds-loading", "data-testid": "validation-state" }, "Validating every line…");
    } else if (!total) {
      body = h("p", { class: "ds-ok", "data-testid": "validation-state" }, `No problems: all ${integer(d.row_count)} rows are valid ${d.format} rows.`);
    } else {
      body = h(
        "div",
        {},
        h(
          "p",
          { "data-testid": "validation-state" },
          `${integer(total)} problem(s)` + (total > problems.length ? `; the first ${problems.length} are listed.` : ".") + " Jobs can't use this dataset until a corrected file is uploaded.",
        ),
        h(
          "div",
          { class: "problems-wrap" },
          h(
            "table",
            { class: "list problems", "data-testid": "validation-problems" },
            h("thead", {}, h("tr", {}, h("th", {}, "Line"), h("th", {}, "Field"), h("th", {}, "Problem"))),
            h(
              "tbody",
              {},
              ...problems.map((p) =>
                h(
                  "tr",
                  { "data-line": p.line },
                  h("td", { class: "num line" }, p.line ? `line ${p.line}` : "file"),
                  h("td", { class: "mono" }, p.field || "–"),
                  h("td", {}, p.message),
                ),
              ),
            ),
          ),
        ),
      );
    }
    clear(report, h("h2", {}, "Validation report ", statusBadge(d.status)), body);
  }

  // -- preview --------------------------------------------------------------------------------------------
  async function loadPreview(): Promise<void> {
    const select = h(
      "select",
      {
        "data-testid": "preview-limit",
        onchange: () => {
          previewLimit = Number(select.value);
          void loadPreview();
        },
      },
      ...PREVIEW_LIMITS.map((n) => h("option", { value: n, selected: n === previewLimit }, `first ${n} rows`)),
    );
    const rows = h("div", { class: "preview-rows", "data-testid": "preview-rows" }, h("p", { class: "ds-loading" }, "Loading the first rows…"));
    clear(preview, h("div", { class: "toolbar" }, h("h2", {}, "Preview"), select), rows);
    try {
      const found = await getJson<{ rows: Record<string, unknown>[] }>(`${datasetPath(datasetId)}/preview?limit=${previewLimit}`);
      const list = found.rows ?? [];
      clear(rows, ...(list.length ? list.map(previewRow) : [h("p", { class: "muted" }, "The file has no rows to show.")]));
    } catch (err) {
      clear(rows, errorBox(`Could not load the preview: ${describeError(err)}`));
    }
  }

  // -- token stats ----------------------------------------------------------------------------------------
  let models: string[] | null = null;
  let statsModel = "";
  let statsLimit = 0;

  async function renderStats(d: Dataset, compute: boolean): Promise<void> {
    if (d.status !== "READY") {
      clear(
        stats,
        h("h2", {}, "Token stats"),
        h("p", { class: "muted", "data-testid": "stats-state" }, d.status === "VALIDATING" ? "Counted once the validation ends…" : "Token stats need a valid (READY) dataset."),
      );
      return;
    }
    if (models === null) {
      try {
        models = ((await listModels()).models ?? []).map((m) => m.id);
      } catch (err) {
        models = [];
        showError(`Could not list the models for the tokenizer: ${describeError(err)}`);
      }
      statsModel = models.includes("tiny-chat") ? "tiny-chat" : (models[0] ?? "");
    }
    const modelSelect = h(
      "select",
      { "data-testid": "stats-model", title: "Whose tokenizer counts the tokens" },
      ...models.map((m) => h("option", { value: m, selected: m === statsModel }, m)),
    );
    const limitInput = h("input", {
      type: "number",
      min: 0,
      step: 1,
      value: String(statsLimit),
      "data-testid": "stats-max-seq",
      title: "Count the rows longer than this many tokens; 0 skips the count",
      class: "narrow",
    });
    const go = h("button", { "data-testid": "stats-compute" }, "Count tokens");
    const out = h("div", { "data-testid": "stats-result" });
    go.addEventListener("click", () => {
      statsModel = modelSelect.value;
      statsLimit = Math.max(0, Math.floor(Number(limitInput.value) || 0));
      void renderStats(d, true);
    });
    clear(
      stats,
      h("h2", {}, "Token stats"),
      h("div", { class: "toolbar" }, h("label", {}, "Tokenizer ", modelSelect), h("label", {}, "Max sequence length ", limitInput), go),
      out,
    );
    if (!compute) return;
    if (!statsModel) return clear(out, errorBox("There is no model whose tokenizer could count the tokens."));
    go.disabled = true;
    clear(out, h("p", { class: "ds-loading", "data-testid": "stats-loading" }, `Counting the tokens of every row with ${statsModel}'s tokenizer…`));
    try {
      const query = new URLSearchParams({ model_id: statsModel, max_seq_length: String(statsLimit) });
      const s = await getJson<TokenStats>(`${datasetPath(d.id)}/stats?${query}`);
      const cell = (key: keyof TokenStats, label: string, value: string) =>
        h("div", { class: "stat" }, h("div", { class: "stat-value", "data-stat": key }, value), h("div", { class: "muted" }, label));
      clear(
        out,
        h(
          "div",
          { class: "stat-grid" },
          cell("row_count", "rows", integer(s.row_count)),
          cell("total_tokens", "tokens in all", integer(s.total_tokens)),
          cell("mean_tokens", "mean per row", Number(s.mean_tokens).toFixed(1)),
          cell("min_tokens", "min", integer(s.min_tokens)),
          cell("p50_tokens", "median (p50)", integer(s.p50_tokens)),
          cell("p95_tokens", "p95", integer(s.p95_tokens)),
          cell("max_tokens", "max", integer(s.max_tokens)),
          statsLimit ? cell("rows_truncated", `rows over ${integer(statsLimit)} tokens (cut in training)`, integer(s.rows_truncated)) : null,
        ),
        distribution(s, statsLimit),
        h("div", { class: "muted" }, `Per row, with ${statsModel}'s tokenizer (and its chat template, when it has one).`),
      );
    } catch (err) {
      clear(out, errorBox(`Could not count the tokens: ${describeError(err)}`));
    } finally {
      go.disabled = false;
    }
  }

  // -- split ----------------------------------------------------------------------------------------------
  function renderSplit(d: Dataset): void {
    const ratio = h("input", { type: "number", min: 0.01, max: 0.5, step: 0.01, value: "0.1", class: "narrow", "data-testid": "split-ratio" });
    const seed = h("input", { type: "number", step: 1, value: "0", class: "narrow", "data-testid": "split-seed" });
    const go = h("button", { "data-testid": "split-submit", disabled: d.status !== "READY" }, "Split");
    const out = h("div", { "data-testid": "split-result" });
    go.addEventListener("click", async () => {
      go.disabled = true;
      clear(out, h("p", { class: "ds-loading" }, "Splitting…"));
      try {
        const made = await sendJson<{ train: Dataset; validation: Dataset }>(`${datasetPath(d.id)}/split`, {
          validation_ratio: Number(ratio.value),
          seed: Math.floor(Number(seed.value) || 0),
        });
        const link = (x: Dataset, testid: string) =>
          h("li", {}, h("a", { href: `#/datasets/${encodeURIComponent(x.id)}`, "data-testid": testid }, x.name), ` · ${integer(x.row_count)} rows · `, h("span", { class: "mono" }, x.id));
        clear(out, h("ul", {}, link(made.train, "split-train"), link(made.validation, "split-validation")));
      } catch (err) {
        clear(out, errorBox(`Could not split ${d.name || d.id}: ${describeError(err)}`));
      } finally {
        go.disabled = false;
      }
    });
    clear(
      split,
      h("h2", {}, "Train / validation split"),
      h("p", { class: "muted" }, "Makes two new datasets from this one's rows, shuffled with the seed (the same seed gives the same split). Use the validation one for eval loss during training."),
      h("div", { class: "toolbar" }, h("label", {}, "Validation share ", ratio), h("label", {}, "Seed ", seed), go),
      d.status === "READY" ? null : h("p", { class: "muted" }, "Only a valid (READY) dataset can be split."),
      out,
    );
  }

  function renderAll(d: Dataset): void {
    renderHead(d);
    renderOverview(d);
    renderReport(d);
    renderSplit(d);
  }

  async function load(): Promise<void> {
    try {
      dataset = await getJson<Dataset>(datasetPath(datasetId));
    } catch (err) {
      clear(head, h("h1", {}, datasetId));
      showError(`Could not load dataset ${datasetId}: ${describeError(err)}`);
      return;
    }
    renderAll(dataset);
    void loadPreview();
    if (dataset.status === "VALIDATING") {
      void renderStats(dataset, false);
      try {
        const done = await untilValidated(datasetId, () => stopped, 1500);
        if (!done) return;
        dataset = done;
        renderAll(dataset);
        void loadPreview();
      } catch (err) {
        showError(`Could not follow the validation: ${describeError(err)}`);
        return;
      }
    }
    void renderStats(dataset, true);
  }

  void load();
  return () => {
    stopped = true;
  };
}
