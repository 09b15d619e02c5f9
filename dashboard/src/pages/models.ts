// The Models page (DeepExtension's model management): the catalog's models with their deployments, and a
// model's details with its lineage (followed upward through the catalog) and its lifecycle: merge an adapter
// into its base, evaluate, deploy / undeploy, and chat with it once it is live.

import "./catalog.css";

import {
  describeError,
  getJson,
  listDatasets,
  listModels,
  sendJson,
  TERMINAL_STATES,
  type Job,
  type Model,
  type Principal,
} from "../api";
import { clear, errorBox, h } from "../dom";
import * as fmt from "../format";
import { chatPanel } from "./chat";

const DEPLOYMENT_REFRESH_MS = 2000;
const LIST_REFRESH_MS = 3000;
const JOB_REFRESH_MS = 1500;
const KINDS = ["BASE", "CUSTOMIZED", "COMPLETE"];
const ACTIVE_DEPLOYMENT = new Set(["PENDING", "LIVE", "STOPPING"]);

interface Deployment {
  id: string;
  model_id: string;
  state: string; // PENDING, LIVE, STOPPING, STOPPED, FAILED
  state_reason: string;
  agent_id: string;
  request_count: number | string; // int64: proto JSON may write it as a string
  error_count: number | string;
  create_time?: string;
  update_time?: string;
  entrypoint: string;
  attempt: number;
}

/** A lifecycle job (merge, evaluate): a Job with the model it published. */
type LifecycleJob = Job & { result_model_id?: string };

export function modelsPage(main: HTMLElement, args: string[], who: Principal): () => void {
  return args[0] ? modelDetailPage(main, args[0], who) : modelListPage(main);
}

// -- small helpers ----------------------------------------------------------------------------------------

export function bytes(n: number | string | undefined): string {
  const v = Number(n ?? 0);
  if (!v) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let x = v;
  while (x >= 1024 && i < units.length - 1) {
    x /= 1024;
    i++;
  }
  return `${x.toFixed(i && x < 10 ? 1 : 0)} ${units[i]}`;
}

const modelUrl = (id: string) => `#/models/${encodeURIComponent(id)}`;
const jobUrl = (id: string) => `#/jobs/${encodeURIComponent(id)}`;

function kindBadge(kind: string, testid: string | null = "model-kind"): HTMLElement {
  return h("span", { class: `state kind-${kind.toLowerCase()}`, "data-testid": testid }, kind || "–");
}

function kv(rows: [string, unknown][], testid?: string): HTMLElement {
  return h(
    "table",
    { class: "kv catalog-kv", "data-testid": testid },
    ...rows.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v instanceof Node ? v : fmt.value(v)))),
  );
}

/** Repeats `tick` every `ms` (and once now) until the returned stop is called; a tick never overlaps the last. */
function every(ms: number, tick: () => Promise<void>): () => void {
  let stopped = false;
  let timer = 0;
  const loop = async () => {
    await tick();
    if (!stopped) timer = window.setTimeout(loop, ms);
  };
  void loop();
  return () => {
    stopped = true;
    window.clearTimeout(timer);
  };
}

// -- the list ---------------------------------------------------------------------------------------------

function modelListPage(main: HTMLElement): () => void {
  let models: Model[] = [];
  let kind = sessionStorage.getItem("tuneforge.modelsKind") ?? "all";
  let search = "";
  const stops: (() => void)[] = [];

  const status = h("div", { class: "status", "data-testid": "models-status" }, "Loading the models…");
  const errors = h("div", {});
  const body = h("tbody", {});
  const kindSelect = h(
    "select",
    {
      "data-testid": "kind-filter",
      onchange: () => {
        kind = kindSelect.value;
        sessionStorage.setItem("tuneforge.modelsKind", kind);
        render();
      },
    },
    h("option", { value: "all" }, "All kinds"),
    ...KINDS.map((k) => h("option", { value: k, selected: k === kind }, k[0] + k.slice(1).toLowerCase())),
  );
  const searchBox = h("input", {
    type: "search",
    placeholder: "Search name, id, architecture, source",
    "data-testid": "model-search",
    oninput: () => {
      search = searchBox.value.trim().toLowerCase();
      render();
    },
  });

  const deployments = deploymentsSection();
  stops.push(deployments.stop);

  clear(
    main,
    h(
      "div",
      { class: "page-head" },
      h("h1", {}, "Models"),
      h("span", { class: "spacer" }),
      h("label", {}, "Kind ", kindSelect),
      searchBox,
      h("button", { "data-testid": "models-refresh", onclick: () => void load() }, "Refresh"),
    ),
    errors,
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "jobs", "data-testid": "models" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ...["Name", "Kind", "Architecture", "Parameters", "Context", "Dtype", "Size", "Source", "Created"].map((c) =>
              h("th", {}, c),
            ),
          ),
        ),
        body,
      ),
    ),
    status,
    deployments.el,
  );

  function matches(m: Model): boolean {
    if (kind !== "all" && m.kind !== kind) return false;
    if (!search) return true;
    return [m.id, m.name, m.architecture, m.source, m.description, ...(m.tags ?? [])]
      .some((s) => (s ?? "").toLowerCase().includes(search));
  }

  function render(): void {
    const shown = models.filter(matches);
    clear(
      body,
      ...shown.map((m) =>
        h(
          "tr",
          { "data-testid": `model-row-${m.id}` },
          h(
            "td",
            {},
            h("a", { href: modelUrl(m.id), class: "job-name", "data-testid": `model-link-${m.id}` }, m.name || m.id),
            h("div", { class: "muted mono" }, m.id),
          ),
          h("td", {}, kindBadge(m.kind)),
          h("td", {}, m.architecture || "–"),
          h("td", { class: "num", title: String(m.parameter_count ?? "") }, fmt.count(Number(m.parameter_count))),
          h("td", { class: "num" }, fmt.value(m.context_length)),
          h("td", {}, m.dtype || "–"),
          h("td", { class: "num" }, bytes(m.size_bytes)),
          h("td", { class: "source-cell", title: m.source }, m.source || "–"),
          h("td", {}, fmt.time(m.create_time)),
        ),
      ),
    );
    if (!shown.length) {
      body.append(
        h("tr", {}, h("td", { colspan: 9, class: "empty" }, models.length ? "No model matches." : "No models yet.")),
      );
    }
    status.textContent = `${shown.length} of ${models.length} models`;
  }

  async function load(): Promise<void> {
    status.textContent = "Loading the models…";
    try {
      models = (await listModels()).models ?? [];
      clear(errors);
      render();
    } catch (err) {
      clear(errors, errorBox(`Could not list the models: ${describeError(err)}`));
      status.textContent = "";
    }
  }

  void load();
  return () => stops.forEach((s) => s());
}

/** The Deployments section: every deployment of the project, refreshed, each undeployable. */
function deploymentsSection(): { el: HTMLElement; stop: () => void } {
  const body = h("tbody", {});
  const errors = h("div", {}); // the listing's failure, cleared by the next good refresh
  const actionErrors = h("div", {}); // an undeploy's, kept until the next undeploy
  const status = h("span", { class: "muted" }, "Loading…");
  const ended = h("input", { type: "checkbox", "data-testid": "deployments-ended", onchange: () => void refresh() });

  async function refresh(): Promise<void> {
    try {
      const query = new URLSearchParams({ page_size: "200" });
      if (ended.checked) query.set("include_ended", "true");
      const found = await getJson<{ deployments?: Deployment[] }>(`/api/v1/deployments?${query}`);
      const list = found.deployments ?? [];
      clear(errors);
      clear(
        body,
        ...list.map((d) =>
          h(
            "tr",
            { "data-testid": `deployment-row-${d.id}` },
            h("td", {}, h("a", { href: jobUrl(d.id), class: "mono" }, d.id)),
            h("td", {}, h("a", { href: modelUrl(d.model_id) }, d.model_id)),
            h(
              "td",
              {},
              h("span", { class: fmt.stateClass(d.state), title: d.state_reason }, d.state),
              d.state_reason ? h("div", { class: "muted" }, d.state_reason) : null,
            ),
            h("td", { class: "mono" }, d.agent_id || "–"),
            h("td", { class: "num" }, String(d.request_count ?? 0)),
            h("td", { class: "num" }, String(d.error_count ?? 0)),
            h("td", {}, fmt.time(d.create_time)),
            h(
              "td",
              {},
              d.state === "PENDING" || d.state === "LIVE"
                ? h(
                    "button",
                    {
                      "data-testid": `undeploy-${d.id}`,
                      onclick: async (e: Event) => {
                        (e.target as HTMLButtonElement).disabled = true;
                        clear(actionErrors);
                        try {
                          await sendJson(`/api/v1/deployments/${encodeURIComponent(d.id)}`, undefined, "DELETE");
                        } catch (err) {
                          actionErrors.append(errorBox(`Could not undeploy ${d.id}: ${describeError(err)}`));
                        }
                        await refresh();
                      },
                    },
                    "Undeploy",
                  )
                : null,
            ),
          ),
        ),
      );
      if (!list.length) body.append(h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No deployments.")));
      status.textContent = `${list.length} deployment${list.length === 1 ? "" : "s"}, updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      clear(errors, errorBox(`Could not list the deployments: ${describeError(err)}`));
    }
  }

  const stop = every(LIST_REFRESH_MS, refresh);
  const el = h(
    "section",
    { class: "section" },
    h(
      "div",
      { class: "page-head" },
      h("h2", {}, "Deployments"),
      h("span", { class: "spacer" }),
      h("label", {}, ended, " Show stopped and failed"),
      status,
    ),
    errors,
    actionErrors,
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "jobs", "data-testid": "deployments" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ...["Deployment", "Model", "State", "Agent", "Requests", "Errors", "Started", ""].map((c) => h("th", {}, c)),
          ),
        ),
        body,
      ),
    ),
  );
  return { el, stop };
}

// -- a model's details ------------------------------------------------------------------------------------

function modelDetailPage(main: HTMLElement, modelId: string, _who: Principal): () => void {
  const stops: (() => void)[] = [];
  let left = false;
  const errors = h("div", {});
  clear(
    main,
    h("a", { href: "#/models", class: "back" }, "← Models"),
    h("div", { class: "status", "data-testid": "model-loading" }, "Loading the model…"),
    errors,
  );

  async function start(): Promise<void> {
    let model: Model;
    try {
      model = await getJson<Model>(`/api/v1/models/${encodeURIComponent(modelId)}`);
    } catch (err) {
      clear(main, h("a", { href: "#/models", class: "back" }, "← Models"), errorBox(describeError(err)));
      return;
    }
    if (left) return;
    render(model);
  }

  function render(model: Model): void {
    const panel = h("div", { class: "action-panel", "data-testid": "action-panel" });
    const chat = chatPanel(model.id, () => void deployment.refresh());
    stops.push(() => chat.stop());
    const deployment = deploymentCard(model, chat.setBlocked);
    stops.push(deployment.stop);

    const actions: HTMLElement[] = [];
    if (model.kind === "CUSTOMIZED") {
      actions.push(
        h(
          "button",
          { "data-testid": "model-merge", onclick: () => openPanel(mergeForm(model, stops)) },
          "Merge into base",
        ),
      );
    }
    actions.push(
      h("button", { "data-testid": "model-evaluate", onclick: () => openPanel(evaluateForm(model, stops)) }, "Evaluate"),
      deployment.deployButton,
      deployment.undeployButton,
    );
    if (!model.builtin) {
      actions.push(
        h(
          "button",
          {
            class: "danger",
            "data-testid": "model-delete",
            onclick: async (e: Event) => {
              if (!window.confirm(`Delete the model ${model.name} (${model.id})? Its files stay in the artifact store.`)) {
                return;
              }
              const button = e.target as HTMLButtonElement;
              button.disabled = true;
              try {
                await sendJson(`/api/v1/models/${encodeURIComponent(model.id)}`, undefined, "DELETE");
                location.hash = "#/models";
              } catch (err) {
                errors.append(errorBox(`Could not delete the model: ${describeError(err)}`));
                button.disabled = false;
              }
            },
          },
          "Delete",
        ),
      );
    }

    function openPanel(content: HTMLElement): void {
      clear(panel, content);
      panel.scrollIntoView({ block: "nearest" });
    }

    const p = Number(model.parameter_count);
    const lineage = h("div", { "data-testid": "lineage" }, h("span", { class: "muted" }, "Following the lineage…"));
    clear(
      main,
      h("a", { href: "#/models", class: "back" }, "← Models"),
      h(
        "div",
        { class: "page-head" },
        h("h1", { "data-testid": "model-name" }, model.name || model.id),
        kindBadge(model.kind),
        model.builtin ? h("span", { class: "muted" }, "built-in") : null,
        h("span", { class: "spacer" }),
        ...actions,
      ),
      errors,
      panel,
      h(
        "div",
        { class: "model-grid" },
        h(
          "div",
          { class: "model-col" },
          h("div", { class: "card" }, h("h2", {}, "Lineage"), lineage),
          h(
            "div",
            { class: "card" },
            h("h2", {}, "Model"),
            kv(
              [
                ["ID", h("span", { class: "mono" }, model.id)],
                ["Name", model.name],
                ["Kind", model.kind],
                ["Description", model.description],
                ["Architecture", model.architecture],
                ["Parameters", p ? `${p.toLocaleString()} (${fmt.count(p)})` : "–"],
                ["Context length", model.context_length],
                ["Dtype", model.dtype],
                ["Chat template", model.has_chat_template ? "yes" : "no"],
                ["Size", model.size_bytes ? `${bytes(model.size_bytes)} (${Number(model.size_bytes).toLocaleString()} bytes)` : "–"],
                ["Source", model.source],
                ["URI", h("span", { class: "mono" }, model.uri || "–")],
                ["License", model.license],
                ["Tags", (model.tags ?? []).join(", ")],
                ["Built-in", model.builtin ? "yes" : "no"],
                ["Project", model.project_id || "(global)"],
                ["Created", fmt.time(model.create_time)],
                ["Updated", fmt.time((model as Model & { update_time?: string }).update_time)],
              ],
              "model-fields",
            ),
          ),
        ),
        h(
          "div",
          { class: "model-col" },
          deployment.el,
          h("div", { class: "card" }, h("h2", {}, "Chat"), chat.el),
        ),
      ),
    );
    void renderLineage(model, lineage);
  }

  void start();
  return () => {
    left = true;
    stops.forEach((s) => s());
  };
}

// -- lineage ----------------------------------------------------------------------------------------------

/** The chain from the first base model down to this one, read upward through the catalog: each model's source
 * (merged from) and the job that made it, then its training job and base model, whose own lineage (a model
 * trained from a customized or merged one) goes on above it. */
async function renderLineage(model: Model, into: HTMLElement): Promise<void> {
  const nodes: HTMLElement[] = []; // bottom-up, reversed at the end
  // the nearest link of each kind has the plain test id, those further up -2, -3...
  const seenKinds = new Map<string, number>();
  const testid = (kind: string) => {
    const n = (seenKinds.get(kind) ?? 0) + 1;
    seenKinds.set(kind, n);
    return n === 1 ? kind : `${kind}-${n}`;
  };
  const node = (label: string, ...content: (Node | string | null)[]) =>
    h("li", { class: "lineage-node" }, h("div", { class: "lineage-label" }, label), h("div", {}, ...content));
  /** The model's node; the model itself, or null when it could not be read (the chain ends there). */
  const modelNode = async (label: string, id: string, kind: string): Promise<Model | null> => {
    const link = (text: string) => h("a", { href: modelUrl(id), "data-testid": testid(kind), "data-model-id": id }, text);
    try {
      const found = await getJson<Model>(`/api/v1/models/${encodeURIComponent(id)}`);
      nodes.push(node(label, link(found.name || id), " ", kindBadge(found.kind, null), h("span", { class: "muted mono" }, ` ${id}`)));
      return found;
    } catch (err) {
      nodes.push(node(label, link(id), errorBox(`Could not read the model: ${describeError(err)}`)));
      return null;
    }
  };

  nodes.push(node("This model", h("strong", {}, model.name || model.id), " ", kindBadge(model.kind, null)));
  const seen = new Set([model.id]);
  let current: Model | null = model;
  while (current) {
    const lin = current.lineage ?? {};
    if (lin.operation_job_id) {
      const id = lin.operation_job_id;
      nodes.push(node("Made by job", h("a", { href: jobUrl(id), class: "mono", "data-testid": testid("lineage-operation") }, id)));
    }
    if (lin.source_model_id && !seen.has(lin.source_model_id)) {
      seen.add(lin.source_model_id);
      current = await modelNode("Source model", lin.source_model_id, "lineage-source");
      continue;
    }
    if (lin.job_id) {
      const details: (Node | string)[] = [];
      if (lin.checkpoint_step) details.push(`checkpoint step ${lin.checkpoint_step}`);
      if (lin.method_id) {
        details.push(" · method ", h("a", { href: `#/methods/${encodeURIComponent(lin.method_id)}` }, lin.method_id));
      }
      if (lin.dataset_id) details.push(" · dataset ", h("span", { class: "mono" }, lin.dataset_id));
      const detailsId = testid("lineage-job-details");
      nodes.push(
        node(
          "Training job",
          h("a", { href: jobUrl(lin.job_id), class: "mono", "data-testid": testid("lineage-job") }, lin.job_id),
          h("div", { class: "muted", "data-testid": detailsId }, ...details),
        ),
      );
    }
    if (lin.base_model_id && !seen.has(lin.base_model_id)) {
      seen.add(lin.base_model_id);
      current = await modelNode("Base model", lin.base_model_id, "lineage-base");
      continue;
    }
    break;
  }
  if (nodes.length === 1) {
    nodes.push(node("Origin", model.source ? `registered from ${model.source}` : "registered directly (no lineage)"));
  }
  clear(into, h("ol", { class: "lineage" }, ...nodes.reverse()));
}

// -- deployment -------------------------------------------------------------------------------------------

/** The model's latest deployment (state, counts) with Deploy / Undeploy buttons, refreshed every 2 s; tells
 * the chat whether it may send. */
function deploymentCard(
  model: Model,
  setChatBlocked: (reason: string | null) => void,
): { el: HTMLElement; deployButton: HTMLButtonElement; undeployButton: HTMLButtonElement; stop: () => void; refresh: () => Promise<void> } {
  let latest: Deployment | null = null;
  let loaded = false;
  let acting = false;
  const body = h("div", { "data-testid": "deployment" }, h("span", { class: "muted" }, "Loading the deployment…"));
  const errors = h("div", {}); // a deploy's or undeploy's failure, kept until the next one
  const readErrors = h("div", {}); // the refresh's, cleared by the next good one

  const deployButton = h(
    "button",
    {
      class: "primary",
      "data-testid": "model-deploy",
      disabled: true,
      onclick: async () => {
        acting = true;
        sync();
        try {
          latest = await sendJson<Deployment>(`/api/v1/models/${encodeURIComponent(model.id)}/deploy`, {});
          clear(errors);
        } catch (err) {
          clear(errors, errorBox(`Could not deploy: ${describeError(err)}`));
        }
        acting = false;
        draw();
      },
    },
    "Deploy",
  );
  const undeployButton = h(
    "button",
    {
      "data-testid": "model-undeploy",
      disabled: true,
      onclick: async () => {
        if (!latest) return;
        acting = true;
        sync();
        try {
          latest = await sendJson<Deployment>(`/api/v1/deployments/${encodeURIComponent(latest.id)}`, undefined, "DELETE");
          clear(errors);
        } catch (err) {
          clear(errors, errorBox(`Could not undeploy: ${describeError(err)}`));
        }
        acting = false;
        draw();
      },
    },
    "Undeploy",
  );

  function sync(): void {
    const active = latest !== null && ACTIVE_DEPLOYMENT.has(latest.state);
    deployButton.disabled = !loaded || acting || active;
    undeployButton.disabled = acting || latest === null || !(latest.state === "PENDING" || latest.state === "LIVE");
    if (!loaded) setChatBlocked("Loading the deployment…");
    else if (!latest) setChatBlocked("Not deployed: deploy the model to chat with it.");
    else if (latest.state === "LIVE") setChatBlocked(null);
    else if (latest.state === "PENDING") {
      setChatBlocked(`The deployment is starting (${latest.state_reason || "waiting for an agent"}); chat opens once it is live.`);
    } else if (latest.state === "STOPPING") setChatBlocked("The deployment is stopping.");
    else setChatBlocked(`The last deployment is ${latest.state}${latest.state_reason ? ` (${latest.state_reason})` : ""}: deploy the model again to chat.`);
  }

  function draw(): void {
    sync();
    if (!latest) {
      clear(body, h("span", { class: "muted", "data-testid": "deployment-state" }, "Not deployed"));
      return;
    }
    const d = latest;
    clear(
      body,
      kv([
        ["State", h("span", { class: fmt.stateClass(d.state), "data-testid": "deployment-state" }, d.state)],
        ["Reason", d.state_reason],
        ["Deployment", h("a", { href: jobUrl(d.id), class: "mono" }, d.id)],
        ["Agent", d.agent_id],
        ["Requests", h("span", { "data-testid": "deployment-requests" }, String(d.request_count ?? 0))],
        ["Errors", h("span", { "data-testid": "deployment-errors" }, String(d.error_count ?? 0))],
        ["Worker", d.entrypoint],
        ["Attempt", d.attempt],
        ["Started", fmt.time(d.create_time)],
        ["Updated", fmt.time(d.update_time)],
      ]),
    );
  }

  async function refresh(): Promise<void> {
    try {
      const query = new URLSearchParams({ model_id: model.id, include_ended: "true", page_size: "50" });
      const found = await getJson<{ deployments?: Deployment[] }>(`/api/v1/deployments?${query}`);
      const list = (found.deployments ?? []).slice();
      // the newest; an active one first, should an older one still be stopping
      list.sort((a, b) => (b.create_time ?? "").localeCompare(a.create_time ?? ""));
      latest = list.find((d) => ACTIVE_DEPLOYMENT.has(d.state)) ?? list[0] ?? null;
      loaded = true;
      clear(readErrors);
      draw();
    } catch (err) {
      clear(readErrors, errorBox(`Could not read the deployment: ${describeError(err)}`));
    }
  }

  const stop = every(DEPLOYMENT_REFRESH_MS, refresh);
  const el = h("div", { class: "card" }, h("h2", {}, "Deployment"), errors, readErrors, body);
  return { el, deployButton, undeployButton, stop, refresh };
}

// -- merge and evaluate -----------------------------------------------------------------------------------

/** Watches a lifecycle job: state, progress and a link, until it ends; then onEnd with its last state. */
function jobWatcher(jobId: string, stops: (() => void)[], onEnd: (job: LifecycleJob, box: HTMLElement) => void): HTMLElement {
  const state = h("span", { class: "state", "data-testid": "op-job-state" }, "QUEUED");
  const bar = h("div", { style: "width: 0%" });
  const detail = h("span", { class: "muted" });
  const after = h("div", {});
  const errors = h("div", {});
  const box = h(
    "div",
    { class: "op-job", "data-testid": "op-job" },
    h(
      "div",
      { class: "op-job-head" },
      "Job ",
      h("a", { href: jobUrl(jobId), class: "mono", "data-testid": "op-job-link" }, jobId),
      " ",
      state,
      h("span", { class: "bar" }, bar),
      detail,
    ),
    errors,
    after,
  );
  let ended = false;
  const stop = every(JOB_REFRESH_MS, async () => {
    if (ended) return;
    try {
      const job = await getJson<LifecycleJob>(`/api/v1/jobs/${encodeURIComponent(jobId)}`);
      clear(errors);
      state.className = fmt.stateClass(job.state);
      state.textContent = job.state;
      bar.style.width = `${Math.min(100, job.progress_percent ?? 0)}%`;
      detail.textContent = [
        fmt.percent(job.progress_percent),
        job.state_reason,
        job.elapsed_seconds ? `elapsed ${fmt.duration(job.elapsed_seconds)}` : "",
      ]
        .filter(Boolean)
        .join(" · ");
      if (TERMINAL_STATES.has(job.state)) {
        ended = true;
        stop();
        onEnd(job, after);
      }
    } catch (err) {
      clear(errors, errorBox(`Could not read the job: ${describeError(err)}`));
    }
  });
  stops.push(stop);
  return box;
}

function field(label: string, control: HTMLElement, hint?: string): HTMLElement {
  return h("label", { class: "form-field" }, h("span", {}, label), control, hint ? h("span", { class: "muted" }, hint) : null);
}

function mergeForm(model: Model, stops: (() => void)[]): HTMLElement {
  const name = h("input", { type: "text", placeholder: `${model.name}-complete`, "data-testid": "merge-name" });
  const description = h("input", { type: "text", placeholder: "optional", "data-testid": "merge-description" });
  const quantization = h(
    "select",
    { "data-testid": "merge-quantization" },
    h("option", { value: "none" }, "None (full precision)"),
    h("option", { value: "8bit" }, "Also 8-bit (bitsandbytes, GPU)"),
    h("option", { value: "4bit" }, "Also 4-bit NF4 (bitsandbytes, GPU)"),
  );
  const gpus = h("input", { type: "number", min: "0", max: "64", value: "0", class: "small-num", "data-testid": "merge-gpus" });
  const errors = h("div", {});
  const progress = h("div", {});
  const submit = h("button", { type: "submit", class: "primary", "data-testid": "merge-submit" }, "Start the merge");
  return h(
    "form",
    {
      class: "card op-form",
      "data-testid": "merge-form",
      onsubmit: async (e: Event) => {
        e.preventDefault();
        submit.disabled = true;
        clear(errors);
        const body: Record<string, unknown> = {
          quantization: quantization.value,
          resources: { gpu_count: Number(gpus.value || 0) },
        };
        if (name.value.trim()) body.name = name.value.trim();
        if (description.value.trim()) body.description = description.value.trim();
        try {
          const job = await sendJson<LifecycleJob>(`/api/v1/models/${encodeURIComponent(model.id)}/merge`, body);
          clear(
            progress,
            jobWatcher(job.id, stops, (done, after) => {
              submit.disabled = false;
              if (done.state === "SUCCEEDED" && done.result_model_id) {
                clear(
                  after,
                  "Merged: ",
                  h("a", { href: modelUrl(done.result_model_id), "data-testid": "merge-result" }, `open the complete model ${done.result_model_id}`),
                );
              } else {
                clear(after, errorBox(`The merge ${done.state.toLowerCase()}: ${done.state_reason || "no reason given"}`));
              }
            }),
          );
        } catch (err) {
          clear(errors, errorBox(describeError(err)));
          submit.disabled = false;
        }
      },
    },
    h("h2", {}, "Merge the adapter into its base model"),
    h(
      "p",
      { class: "muted" },
      "A merge job writes a complete model (base weights with the adapter folded in); it is published to the catalog when the job succeeds.",
    ),
    h("div", { class: "form-row" }, field("Name", name), field("Description", description), field("Quantized copy", quantization), field("GPUs", gpus)),
    h("div", { class: "form-actions" }, submit),
    errors,
    progress,
  );
}

interface Evaluation {
  job: Job;
  metrics?: Record<string, number>;
  generations?: { prompt: string; reference: string; generated: string }[];
}

function evaluateForm(model: Model, stops: (() => void)[]): HTMLElement {
  const dataset = h("select", { "data-testid": "evaluate-dataset", disabled: true }, h("option", { value: "" }, "Loading the datasets…"));
  const maxSamples = h("input", { type: "number", min: "1", placeholder: "all", class: "small-num", "data-testid": "evaluate-max-samples" });
  const maxNewTokens = h("input", { type: "number", min: "1", placeholder: "default", class: "small-num", "data-testid": "evaluate-max-new-tokens" });
  const errors = h("div", {});
  const progress = h("div", {});
  const submit = h("button", { type: "submit", class: "primary", "data-testid": "evaluate-submit", disabled: true }, "Start the evaluation");

  void (async () => {
    try {
      const ready = ((await listDatasets()).datasets ?? []).filter((d) => d.status === "READY");
      clear(
        dataset,
        ...(ready.length
          ? ready.map((d) => h("option", { value: d.id }, `${d.name} (${d.format}, ${d.row_count} rows) · ${d.id}`))
          : [h("option", { value: "" }, "No READY dataset: upload one first")]),
      );
      dataset.disabled = !ready.length;
      submit.disabled = !ready.length;
    } catch (err) {
      clear(dataset, h("option", { value: "" }, "(could not list the datasets)"));
      clear(errors, errorBox(`Could not list the datasets: ${describeError(err)}`));
    }
  })();

  async function showResults(job: Job, after: HTMLElement): Promise<void> {
    const trainingJob = model.lineage?.job_id;
    if (!trainingJob) {
      clear(after, "Evaluated: the metrics are on ", h("a", { href: jobUrl(job.id) }, "the evaluation job's page"), ".");
      return;
    }
    try {
      const found = await getJson<{ evaluations?: Evaluation[] }>(`/api/v1/jobs/${encodeURIComponent(trainingJob)}/evaluations`);
      const mine = (found.evaluations ?? []).find((e) => e.job?.id === job.id);
      const metrics = Object.entries(mine?.metrics ?? {});
      clear(
        after,
        metrics.length ? kv(metrics.map(([k, v]) => [k, v]), "evaluation-metrics") : h("span", { class: "muted" }, "No metrics recorded."),
        ...(mine?.generations ?? []).slice(0, 3).map((g) =>
          h("div", { class: "generation" }, h("div", { class: "muted" }, g.prompt), h("div", {}, g.generated || "(empty)")),
        ),
      );
    } catch (err) {
      clear(after, errorBox(`Could not read the evaluation: ${describeError(err)}`));
    }
  }

  return h(
    "form",
    {
      class: "card op-form",
      "data-testid": "evaluate-form",
      onsubmit: async (e: Event) => {
        e.preventDefault();
        submit.disabled = true;
        clear(errors);
        const parameters: Record<string, number> = {};
        if (maxSamples.value) parameters.max_samples = Number(maxSamples.value);
        if (maxNewTokens.value) parameters.max_new_tokens = Number(maxNewTokens.value);
        try {
          const job = await sendJson<Job>(`/api/v1/models/${encodeURIComponent(model.id)}/evaluate`, {
            dataset_id: dataset.value,
            parameters,
          });
          clear(
            progress,
            jobWatcher(job.id, stops, (done, after) => {
              submit.disabled = false;
              if (done.state === "SUCCEEDED") void showResults(done, after);
              else clear(after, errorBox(`The evaluation ${done.state.toLowerCase()}: ${done.state_reason || "no reason given"}`));
            }),
          );
        } catch (err) {
          clear(errors, errorBox(describeError(err)));
          submit.disabled = false;
        }
      },
    },
    h("h2", {}, "Evaluate the model"),
    h("p", { class: "muted" }, "An evaluation job: loss, perplexity and sample generations of the model over a dataset."),
    h("div", { class: "form-row" }, field("Dataset", dataset), field("Max samples", maxSamples), field("Max new tokens", maxNewTokens)),
    h("div", { class: "form-actions" }, submit),
    errors,
    progress,
  );
}
