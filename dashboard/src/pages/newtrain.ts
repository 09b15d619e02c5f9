// Start a New Train (DeepExtension's screen of that name), and Copy the Train pre-filling it (#/new/copy/<id>).
// Pick a method, a model and a dataset; the parameter form is generated from the method's schema; every valid
// change asks the API for a dry-run estimate; "Run the Train" submits and opens the new job's Details.

import "./newtrain.css";

import {
  ApiError,
  datasetStats,
  describeError,
  getJob,
  listDatasets,
  listMethods,
  listModels,
  sendJson,
  type Dataset,
  type DatasetStats,
  type Job,
  type JobEstimate,
  type Method,
  type Model,
} from "../api";
import { clear, errorBox, h } from "../dom";
import * as fmt from "../format";
import { defaultOf, ParameterForm, sameValue } from "../params";

// A dry run counts the dataset's tokens: wait for the typing to pause.
const ESTIMATE_DELAY_MS = 400;
const STATS_DELAY_MS = 400;
// The request's own fields a refusal may name, shown under their pickers.
const TOP_FIELDS = ["name", "model_id", "dataset_id", "validation_dataset_id", "method_id"] as const;
type TopField = (typeof TOP_FIELDS)[number];

const NO_VALIDATION = "None: hold out validation_ratio of the training rows";

const num = (v: number | string | undefined): number => Number(v ?? 0) || 0;
const exact = (v: number | string | undefined): string => num(v).toLocaleString("en-US");

/** Why a dataset can't train with this method, or null if it can. */
function unusable(ds: Dataset, method: Method | null): string | null {
  if (ds.status !== "READY") {
    const problems = Number((ds.validation as { problem_count?: number } | undefined)?.problem_count ?? 0);
    return `${ds.status || "not validated"}${problems ? ` (${problems} problems)` : ""}: only READY datasets train`;
  }
  if (method && method.dataset_formats?.length && !method.dataset_formats.includes(ds.format)) {
    return `${method.display_name || method.id} takes ${method.dataset_formats.join(", ")} datasets`;
  }
  return null;
}

/** The field a refusal is about: its violations' fields, else a "dataset_id: …" message's prefix (the jobs
 * service's FAILED_PRECONDITION names the field only that way). */
function refusedFields(err: unknown): { field: string; description: string }[] {
  if (err instanceof ApiError && err.violations.length) return err.violations;
  if (err instanceof Error) {
    const m = /^([a-z_]+): (.*)$/s.exec(err.message);
    if (m && (TOP_FIELDS as readonly string[]).includes(m[1])) return [{ field: m[1], description: m[2] }];
  }
  return [];
}

export function newTrainPage(main: HTMLElement, args: string[]): () => void {
  if (args.length && (args[0] !== "copy" || !args[1] || args.length > 2)) {
    clear(main, errorBox(`There is no page #/new/${args.join("/")}.`), h("a", { href: "#/new" }, "Start a New Train"));
    return () => {};
  }
  const sourceId = args[0] === "copy" ? args[1] : null;
  let disposed = false;
  const timers = new Set<number>();
  const later = (fn: () => void, ms: number): number => {
    const t = window.setTimeout(() => {
      timers.delete(t);
      if (!disposed) fn();
    }, ms);
    timers.add(t);
    return t;
  };

  const title = h("h1", { "data-testid": "page-title" }, sourceId ? `Copy of ${sourceId}` : "Start a New Train");
  const body = h("div", {}, h("div", { class: "status", "data-testid": "loading" }, "Loading methods, models and datasets…"));
  clear(main, h("a", { href: "#/jobs", class: "back" }, "← Model Training"), h("div", { class: "page-head" }, title), body);

  async function load(): Promise<void> {
    try {
      const [methods, models, datasets, source] = await Promise.all([
        listMethods(),
        listModels(),
        listDatasets(),
        sourceId ? getJob(sourceId) : Promise.resolve(null),
      ]);
      if (disposed) return;
      if (source) title.textContent = `Copy of ${source.name || source.id}`;
      build(methods.methods ?? [], models.models ?? [], datasets.datasets ?? [], source);
    } catch (err) {
      if (disposed) return;
      clear(
        body,
        errorBox(`Could not load ${sourceId ? `job ${sourceId} and ` : ""}the catalog: ${describeError(err)}`),
        h("button", { "data-testid": "retry", onclick: () => (clear(body, "Loading…"), void load()) }, "Retry"),
      );
    }
  }

  function build(methods: Method[], models: Model[], datasets: Dataset[], source: Job | null): void {
    let method: Method | null = null;
    let form: ParameterForm | null = null;
    let estimateSeq = 0;
    const statsSeq = new Map<HTMLElement, number>(); // per box: a newer request makes an answer in flight stale
    let firstFill = true;
    let estimateTimer = 0;
    let statsTimer = 0;
    let submitting = false;
    const serverTop = new Map<TopField, string>();

    // -- the pickers -------------------------------------------------------------------------------------
    const topError = {} as Record<TopField, HTMLElement>;
    for (const f of TOP_FIELDS) {
      topError[f] = h("div", { class: "field-error", "data-testid": `field-error-${f}`, role: "alert", hidden: true });
    }

    const methodGrid = h("div", { class: "method-grid", role: "radiogroup", "data-testid": "methods" });
    const methodNote = h("div", { class: "muted" });
    const nameInput = h("input", {
      type: "text",
      id: "train-name",
      "data-testid": "train-name",
      maxlength: 255,
      placeholder: "optional: the job is listed by its id without one",
      value: source ? `${source.name || source.id}-copy` : "",
      oninput: () => changed("name"),
    });
    const modelSelect = h("select", { id: "train-model", "data-testid": "model", onchange: () => changed("model_id") });
    const modelInfo = h("div", { class: "muted", "data-testid": "model-info" });
    const modelNote = h("div", { class: "muted", "data-testid": "model-note" });
    // A note about a dropped choice (fillDatasets) is old news once the user chooses.
    const datasetSelect = h("select", {
      id: "train-dataset",
      "data-testid": "dataset",
      onchange: () => (clear(datasetNote), changed("dataset_id")),
    });
    const validationSelect = h("select", {
      id: "train-validation",
      "data-testid": "validation-dataset",
      onchange: () => (clear(datasetNote), changed("validation_dataset_id")),
    });
    const datasetStatsBox = h("div", { class: "stats", "data-testid": "dataset-stats", hidden: true });
    const validationStatsBox = h("div", { class: "stats", "data-testid": "validation-stats", hidden: true });
    const datasetNote = h("div", { class: "muted", "data-testid": "dataset-note" });
    const paramsHost = h("div", {}, h("p", { class: "muted" }, "Choose a method: its parameters appear here."));

    // -- the estimate and the Run button -------------------------------------------------------------------
    const estimateStatus = h("div", { class: "muted", "data-testid": "estimate-status" });
    const estimateError = h("div", { "data-testid": "estimate-error" });
    const estimateTable = h("tbody", {});
    const resolvedBody = h("tbody", {});
    const resolved = h(
      "details",
      { class: "resolved", "data-testid": "estimate-params", hidden: true },
      h("summary", {}, "Resolved parameters"),
      h("div", { class: "resolved-body" }, h("table", { class: "kv" }, resolvedBody)),
    );
    const estimateCard = h(
      "section",
      { class: "card estimate", "data-testid": "estimate", "data-state": "idle" },
      h("h2", {}, "Estimate"),
      estimateStatus,
      h("table", { class: "kv" }, estimateTable),
      resolved,
      estimateError,
    );
    const runButton = h(
      "button",
      { class: "primary run", "data-testid": "run", disabled: true, onclick: () => void submit() },
      "Run the Train",
    );
    const runNote = h("div", { class: "muted", "data-testid": "run-note" });
    const submitErrors = h("div", { "data-testid": "submit-errors" });

    const labelled = (label: string, forId: string, ...rest: (Node | null)[]) =>
      h("div", { class: "pick" }, h("label", { for: forId }, label), ...rest);

    clear(
      body,
      h(
        "div",
        { class: "newtrain" },
        h(
          "div",
          { class: "newtrain-form" },
          h("section", { class: "card" }, h("h2", {}, "1. Training method"), methodNote, methodGrid, topError.method_id),
          h(
            "section",
            { class: "card" },
            h("h2", {}, "2. Name, model and data"),
            h(
              "div",
              { class: "pick-grid" },
              labelled("Name", "train-name", nameInput, topError.name),
              labelled("Model", "train-model", modelSelect, modelInfo, modelNote, topError.model_id),
              labelled("Dataset", "train-dataset", datasetSelect, datasetNote, topError.dataset_id, datasetStatsBox),
              labelled(
                "Validation dataset (optional)",
                "train-validation",
                validationSelect,
                topError.validation_dataset_id,
                validationStatsBox,
              ),
            ),
          ),
          h("section", { class: "card" }, h("h2", {}, "3. Parameters"), paramsHost),
        ),
        h(
          "aside",
          { class: "newtrain-side" },
          estimateCard,
          h("div", { class: "run-box" }, runButton, runNote, submitErrors),
        ),
      ),
    );

    // -- methods -------------------------------------------------------------------------------------------
    function methodCard(m: Method): HTMLElement {
      const fixed = !!source && m.id !== source.method_id;
      const radio = h("input", {
        type: "radio",
        name: "method",
        value: m.id,
        disabled: fixed,
        checked: source?.method_id === m.id,
        onchange: () => chooseMethod(m),
      });
      const formats = m.dataset_formats?.length ? m.dataset_formats.join(", ") : "any format";
      return h(
        "label",
        {
          class: `method-card${fixed ? " disabled" : ""}`,
          "data-testid": `method-${m.id}`,
          "data-method": m.id,
          title: fixed ? "A copy keeps its method" : m.description,
        },
        h(
          "div",
          { class: "method-title" },
          radio,
          h("strong", {}, m.display_name || m.id),
          h("span", { class: "badge" }, m.training_type || "–"),
          h("span", { class: "badge" }, m.builtin ? "built-in" : "added"),
        ),
        h("div", { class: "mono muted" }, m.id),
        h("div", { class: "method-desc" }, m.description || "No description."),
        h("div", { class: "muted" }, `Datasets: ${formats}`),
      );
    }

    function chooseMethod(m: Method): void {
      // Values the user set carry over to a method with the same parameter; the rest start at its defaults.
      const kept = form ? form.changed() : {};
      method = m;
      for (const card of methodGrid.querySelectorAll<HTMLElement>(".method-card")) {
        card.classList.toggle("selected", card.dataset.method === m.id);
      }
      const defaults = Object.fromEntries(m.parameters.map((s) => [s.name, defaultOf(s)]));
      const sourceValues = source ? { ...defaults, ...source.parameters } : defaults;
      const initial = source ? sourceValues : { ...defaults, ...kept };
      form = new ParameterForm(m.parameters ?? [], initial, sourceValues, (name) => paramChanged(name));
      clear(paramsHost, form.element);
      serverTop.delete("method_id");
      fillDatasets();
      changed("method_id");
    }

    // -- models and datasets ---------------------------------------------------------------------------------
    function fillModels(): void {
      const kinds = [...new Set(models.map((m) => m.kind || "OTHER"))];
      const chosen = source?.model_id ?? (models.length === 1 ? models[0].id : "");
      clear(
        modelSelect,
        h(
          "option",
          { value: "", disabled: true, selected: !chosen },
          models.length ? "Choose a model…" : "No models registered",
        ),
        ...kinds.map((kind) =>
          h(
            "optgroup",
            { label: kind },
            ...models
              .filter((m) => (m.kind || "OTHER") === kind)
              .map((m) =>
                h(
                  "option",
                  { value: m.id, selected: m.id === chosen, title: m.id },
                  `${m.name || m.id} · ${m.kind} · ${fmt.count(m.parameter_count)} params · ctx ${m.context_length || "?"}`,
                ),
              ),
          ),
        ),
      );
      if (source && !models.some((m) => m.id === source.model_id)) {
        clear(modelNote, `The copied job's model ${source.model_id} is not in the catalog: choose another.`);
      }
    }

    function datasetOptions(select: HTMLSelectElement, chosen: string, empty: string, exclude = ""): void {
      clear(
        select,
        h("option", { value: "", selected: !chosen }, empty),
        ...datasets.map((ds) => {
          const why = ds.id === exclude ? "it is the training dataset" : unusable(ds, method);
          return h(
            "option",
            { value: ds.id, disabled: !!why, selected: !why && ds.id === chosen, title: ds.id, "data-reason": why ?? "" },
            `${ds.name || ds.id} · ${ds.format} · ${exact(ds.row_count)} rows · ${ds.status}${why ? ` — ${why}` : ""}`,
          );
        }),
      );
    }

    function fillDatasets(): void {
      const wasTrain = datasetSelect.value || (source?.dataset_id ?? "");
      const wasValidation = validationSelect.value || (firstFill && source ? source.validation_dataset_id : "");
      firstFill = false;
      datasetOptions(datasetSelect, wasTrain, datasets.length ? "Choose a dataset…" : "No datasets: upload one first");
      (datasetSelect.options[0] as HTMLOptionElement).disabled = true;
      datasetOptions(validationSelect, wasValidation, NO_VALIDATION, datasetSelect.value);
      // A choice the method can't take is dropped (the option shows why); say so instead of doing it silently.
      const notes: string[] = [];
      for (const [id, select, what] of [
        [wasTrain, datasetSelect, "dataset"],
        [wasValidation, validationSelect, "validation dataset"],
      ] as const) {
        if (id && select.value !== id) {
          const ds = datasets.find((d) => d.id === id);
          const why = !ds
            ? "it is not in the catalog"
            : id === datasetSelect.value
              ? "it is the training dataset"
              : unusable(ds, method);
          notes.push(`The ${source ? "copied job's " : ""}${what} ${ds?.name || id} can't be used: ${why}.`);
        }
      }
      clear(datasetNote, notes.join(" "));
    }

    function showStats(box: HTMLElement, datasetId: string): void {
      const model = modelSelect.value;
      if (!datasetId) {
        statsSeq.set(box, (statsSeq.get(box) ?? 0) + 1);
        box.hidden = true;
        return;
      }
      const seq = (statsSeq.get(box) ?? 0) + 1;
      statsSeq.set(box, seq);
      box.hidden = false;
      box.dataset.state = "loading";
      clear(box, h("span", { class: "spinner" }), " Counting tokens…");
      const maxSeq = Number(form?.value("max_seq_length") ?? 0);
      const seqLimit = Number.isInteger(maxSeq) && maxSeq > 0 ? maxSeq : 0;
      datasetStats(datasetId, model, seqLimit).then(
        (s: DatasetStats) => {
          if (disposed || seq !== statsSeq.get(box)) return;
          box.dataset.state = "ready";
          clear(
            box,
            h(
              "table",
              { class: "kv" },
              h(
                "tbody",
                {},
                h("tr", {}, h("th", {}, "Rows"), h("td", { "data-testid": "stats-rows" }, exact(s.row_count))),
                h("tr", {}, h("th", {}, "Tokens"), h("td", { "data-testid": "stats-tokens" }, exact(s.total_tokens))),
                h(
                  "tr",
                  {},
                  h("th", {}, "Per row"),
                  h(
                    "td",
                    {},
                    `min ${exact(s.min_tokens)} · mean ${fmt.value(s.mean_tokens ?? 0)} · p50 ${exact(s.p50_tokens)} · ` +
                      `p95 ${exact(s.p95_tokens)} · max ${exact(s.max_tokens)}`,
                  ),
                ),
                seqLimit
                  ? h(
                      "tr",
                      {},
                      h("th", {}, `Longer than ${seqLimit}`),
                      h("td", { "data-testid": "stats-truncated" }, `${exact(s.rows_truncated)} rows (cut at max_seq_length)`),
                    )
                  : null,
              ),
            ),
            h(
              "div",
              { class: "muted" },
              model ? `tokens by ${model}'s tokenizer` : "choose a model to count with its tokenizer",
            ),
          );
        },
        (err) => {
          if (disposed || seq !== statsSeq.get(box)) return;
          box.dataset.state = "error";
          clear(box, errorBox(`Could not count the dataset's tokens: ${describeError(err)}`));
        },
      );
    }

    function scheduleStats(): void {
      window.clearTimeout(statsTimer);
      timers.delete(statsTimer);
      statsTimer = later(() => {
        showStats(datasetStatsBox, datasetSelect.value);
        showStats(validationStatsBox, validationSelect.value);
      }, STATS_DELAY_MS);
    }

    // -- changes, validity, the request ------------------------------------------------------------------------
    function changed(what: TopField): void {
      serverTop.delete(what);
      if (what === "dataset_id") {
        // the validation picker can't offer the training dataset
        datasetOptions(validationSelect, validationSelect.value, NO_VALIDATION, datasetSelect.value);
      }
      if (what === "model_id") {
        const m = models.find((x) => x.id === modelSelect.value);
        const template = m?.has_chat_template ? " · chat template" : "";
        clear(modelInfo, m ? `${m.id} · ${m.architecture || "?"} · ${m.dtype || "?"}${template}` : "");
      }
      if (what === "dataset_id" || what === "validation_dataset_id" || what === "model_id") scheduleStats();
      paintTop();
      refresh();
    }

    function paramChanged(name: string): void {
      if (name === "max_seq_length") scheduleStats();
      refresh();
    }

    function paintTop(): void {
      for (const f of TOP_FIELDS) {
        const message = serverTop.get(f) ?? "";
        clear(topError[f], message);
        topError[f].hidden = !message;
      }
    }

    /** What is missing or invalid before a request can be made ("" when nothing is). */
    function blocker(): string {
      if (!method) return "Choose a method.";
      if (!modelSelect.value) return "Choose a model.";
      if (!datasetSelect.value) return "Choose a dataset.";
      const bad = form?.invalid() ?? [];
      if (bad.length === 1) return `Fix the invalid field: ${bad[0]}.`;
      if (bad.length) return `Fix ${bad.length} invalid fields: ${bad.join(", ")}.`;
      return "";
    }

    function paintRun(): void {
      const missing = blocker();
      runButton.disabled = submitting || !!missing;
      clear(runNote, submitting ? "Submitting…" : missing);
    }

    function refresh(): void {
      paintRun();
      scheduleEstimate();
    }

    function request(dryRun: boolean): { path: string; body: Record<string, unknown> } {
      const name = nameInput.value.trim();
      const params = form?.changed() ?? {};
      if (source) {
        const body: Record<string, unknown> = { name, parameter_overrides: params, dry_run: dryRun };
        if (modelSelect.value !== source.model_id) body.model_id = modelSelect.value;
        if (datasetSelect.value !== source.dataset_id) body.dataset_id = datasetSelect.value;
        const validation = validationSelect.value;
        if (validation !== (source.validation_dataset_id ?? "")) {
          if (validation) body.validation_dataset_id = validation;
          else body.clear_validation_dataset = true;
        }
        return { path: `/api/v1/jobs/${encodeURIComponent(source.id)}/copy`, body };
      }
      const body: Record<string, unknown> = {
        name,
        model_id: modelSelect.value,
        dataset_id: datasetSelect.value,
        method_id: method?.id,
        parameters: params,
        dry_run: dryRun,
      };
      if (validationSelect.value) body.validation_dataset_id = validationSelect.value;
      return { path: "/api/v1/jobs", body };
    }

    /** The refusal's fields under their inputs (parameters under the form's), the whole message in `box`. */
    function showRefusal(err: unknown, box: HTMLElement): void {
      const byParam = new Map<string, string>();
      serverTop.clear();
      for (const v of refusedFields(err)) {
        const m = /^(?:parameters|parameter_overrides)\.(.+)$/.exec(v.field);
        if (m && form?.has(m[1])) byParam.set(m[1], v.description);
        else if ((TOP_FIELDS as readonly string[]).includes(v.field)) serverTop.set(v.field as TopField, v.description);
      }
      form?.setServerErrors(byParam);
      paintTop();
      clear(box, errorBox(describeError(err)));
    }

    function clearRefusal(): void {
      serverTop.clear();
      form?.setServerErrors(new Map());
      paintTop();
    }

    function scheduleEstimate(): void {
      window.clearTimeout(estimateTimer);
      timers.delete(estimateTimer);
      const seq = ++estimateSeq; // a newer change makes any answer in flight stale
      const missing = blocker();
      if (missing) {
        estimateCard.dataset.state = "idle";
        clearEstimate();
        clear(estimateStatus, `No estimate: ${missing[0].toLowerCase()}${missing.slice(1)}`);
        return;
      }
      estimateCard.dataset.state = "pending";
      clear(estimateStatus, h("span", { class: "spinner" }), " Estimating…");
      estimateTimer = later(() => void estimate(seq), ESTIMATE_DELAY_MS);
    }

    async function estimate(seq: number): Promise<void> {
      const { path, body } = request(true);
      estimateCard.dataset.state = "loading";
      try {
        const answer = await sendJson<{ dry_run: true; estimate: JobEstimate }>(path, body);
        if (disposed || seq !== estimateSeq) return;
        clearRefusal();
        clear(estimateError);
        renderEstimate(answer.estimate);
      } catch (err) {
        if (disposed || seq !== estimateSeq) return;
        estimateCard.dataset.state = "error";
        clearEstimate();
        const refused = err instanceof ApiError && err.status >= 400 && err.status < 500;
        clear(estimateStatus, refused ? "The server refused these settings:" : "Could not estimate:");
        showRefusal(err, estimateError);
      }
    }

    /** No numbers from settings that are no longer the form's (nor the refusal of them). */
    function clearEstimate(): void {
      clear(estimateTable);
      clear(estimateError);
      resolved.hidden = true;
    }

    function renderEstimate(e: JobEstimate): void {
      resolved.hidden = false;
      estimateCard.dataset.state = "ready";
      clear(estimateStatus, "What the server resolved from these settings (nothing is stored).");
      const seconds = e.estimated_seconds ?? 0;
      const row = (label: string, id: string, text: string, title = "") =>
        h("tr", {}, h("th", {}, label), h("td", { "data-testid": id, title }, text));
      clear(
        estimateTable,
        row("Dataset rows", "estimate-rows", String(num(e.dataset_rows))),
        row("Tokens", "estimate-tokens", exact(e.dataset_tokens)),
        row("Epochs", "estimate-epochs", fmt.value(e.epochs ?? 0)),
        row("Total steps", "estimate-steps", String(num(e.total_steps))),
        seconds > 0
          ? row("Estimated time", "estimate-time", fmt.duration(seconds))
          : row("Estimated time", "estimate-time", "no estimate yet", "No comparable finished job gives a rate yet"),
      );
      const defaults = Object.fromEntries((method?.parameters ?? []).map((s) => [s.name, defaultOf(s)]));
      const entries = Object.entries(e.parameters ?? {}).sort(([a], [b]) => a.localeCompare(b));
      (resolved.querySelector("summary") as HTMLElement).textContent = `Resolved parameters (${entries.length})`;
      clear(
        resolvedBody,
        ...entries.map(([k, v]) =>
          h(
            "tr",
            { class: k in defaults && !sameValue(v, defaults[k]) ? "changed" : undefined, "data-param": k },
            h("th", { class: "mono" }, k),
            h("td", { class: "mono" }, fmt.value(v)),
          ),
        ),
      );
    }

    async function submit(): Promise<void> {
      if (submitting || blocker()) return;
      submitting = true;
      paintRun();
      clear(submitErrors);
      const { path, body } = request(false);
      try {
        const job = await sendJson<Job>(path, body);
        if (disposed) return;
        location.hash = `#/jobs/${encodeURIComponent(job.id)}/overview`;
      } catch (err) {
        if (disposed) return;
        showRefusal(err, submitErrors);
      } finally {
        submitting = false;
        if (!disposed) paintRun();
      }
    }

    // -- first paint -----------------------------------------------------------------------------------------
    const shown = source ? methods.filter((m) => m.id === source.method_id) : methods;
    clear(methodGrid, ...shown.map(methodCard));
    clear(
      methodNote,
      source
        ? "A copy keeps its method; everything else below starts from the copied job and can be changed."
        : `${methods.length} methods: the built-in ones and those added to this project.`,
    );
    if (!methods.length) clear(methodGrid, errorBox("No training methods are registered."));
    fillModels();
    fillDatasets();
    if (source) {
      const m = methods.find((x) => x.id === source.method_id);
      if (source.kind && source.kind !== "TRAIN") {
        clear(methodGrid, errorBox(`Only a training can be copied: ${source.id} is a ${source.kind.toLowerCase()} job.`));
      } else if (m) chooseMethod(m);
      else clear(methodGrid, errorBox(`The copied job's method ${source.method_id} is no longer in the catalog.`));
    }
    changed("model_id");
    changed("dataset_id");
  }

  void load();
  return () => {
    disposed = true;
    for (const t of timers) window.clearTimeout(t);
    timers.clear();
  };
}
