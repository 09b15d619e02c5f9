// A job's Details page with the seed's three tabs: Train Overview (parameters, attempts, agent, artifacts,
// checkpoints, evaluations, "Copy the Train"), Evaluation Data (live uPlot charts of every metric the job
// reports, smoothed on demand) and Train Log (live tail). One SSE stream (/api/v1/jobs/{id}/events) feeds all
// three while the page is open. The header carries the job's actions (src/actions.ts).

import "./details.css";

import { actionBar, publishDialog, type ActionHooks } from "../actions";
import {
  describeError,
  getJob,
  getJson,
  jobCheckpoints,
  jobLogText,
  jobMetrics,
  TERMINAL_STATES,
  type Checkpoint,
  type Job,
  type JobEvent,
  type LogLine,
  type MetricPoint,
} from "../api";
import { MetricChart } from "../charts";
import { checkbox, clear, errorBox, h } from "../dom";
import * as fmt from "../format";
import { streamEvents, type SseMessage } from "../sse";

const TABS = [
  ["overview", "Train Overview"],
  ["metrics", "Evaluation Data"],
  ["logs", "Train Log"],
] as const;
type Tab = (typeof TABS)[number][0];

// The metrics shown first, in this order; any other the job reports follows by name.
const FIRST_METRICS = ["loss", "eval_loss", "learning_rate", "grad_norm", "reward", "reward_std", "kl"];
const MAX_LOG_LINES = 5000;
const INITIAL_POINTS = 5000;
// The stream carries the job's snapshot on state changes; elapsed, remaining and tokens are re-read this often.
const JOB_REFRESH_MS = 5000;

// GET /api/v1/jobs/{id}/evaluations: the evaluation jobs run on models published from this training.
interface Evaluation {
  job: Job;
  metrics: Record<string, number>;
  generations: { prompt: string; reference: string; generated: string }[];
}
const jobEvaluations = (id: string) =>
  getJson<{ evaluations?: Evaluation[] }>(`/api/v1/jobs/${encodeURIComponent(id)}/evaluations?page_size=100`);

export function jobDetailsPage(main: HTMLElement, jobId: string, initialTab: string): () => void {
  let tab: Tab = (TABS.find(([t]) => t === initialTab)?.[0] ?? "overview") as Tab;
  let job: Job | null = null;
  const history: JobEvent[] = [];
  let checkpoints: Checkpoint[] | undefined; // undefined until loaded (the actions then judge by the job alone)
  let evaluations: Evaluation[] | undefined;
  let smoothing = 0;
  const charts = new Map<string, MetricChart>();
  const logs: LogLine[] = [];
  let logFilter = "";
  let follow = true;
  let logScale = false;
  let drawPending = false;
  const disposers: (() => void)[] = [];

  const head = h("div", { class: "page-head" });
  const actions = h("div", { class: "details-actions" });
  const streamState = h("span", { class: "stream", "data-testid": "stream-state" }, "connecting…");
  const errors = h("div", {});
  const tabBar = h("nav", { class: "tabs", role: "tablist" });
  const panes: Record<Tab, HTMLElement> = {
    overview: h("div", { class: "pane", "data-testid": "pane-overview" }),
    metrics: h("div", { class: "pane", "data-testid": "pane-metrics" }),
    logs: h("div", { class: "pane", "data-testid": "pane-logs" }),
  };
  clear(
    main,
    h("a", { href: "#/jobs", class: "back" }, "← Model Training"),
    head,
    actions,
    errors,
    tabBar,
    ...Object.values(panes),
  );

  // Each distinct failure once (a poll that keeps failing doesn't stack boxes); newest last.
  const showError = (message: string) => {
    if (![...errors.children].some((e) => e.textContent === message)) errors.append(errorBox(message));
  };

  // -- tabs ------------------------------------------------------------------------------------------
  function showTab(next: Tab): void {
    tab = next;
    clear(
      tabBar,
      ...TABS.map(([t, label]) =>
        h(
          "button",
          {
            role: "tab",
            class: t === tab ? "tab active" : "tab",
            "aria-selected": String(t === tab),
            "data-testid": `tab-${t}`,
            onclick: () => showTab(t),
          },
          label,
        ),
      ),
    );
    for (const [t, pane] of Object.entries(panes)) pane.hidden = t !== tab;
    // Change the address without a hashchange, so the page (and its stream) stays.
    window.history.replaceState(null, "", `#/jobs/${encodeURIComponent(jobId)}/${tab}`);
    if (tab === "metrics") scheduleDraw();
    if (tab === "logs" && follow) logBox.scrollTop = logBox.scrollHeight;
  }

  // -- header and overview ---------------------------------------------------------------------------
  const hooks: ActionHooks = {
    ctx: () => ({ checkpoints }),
    done: (action, changed) => {
      if (!changed) {
        location.hash = "#/jobs"; // deleted
        return;
      }
      if (action === "publish") return;
      job = changed;
      renderHead();
      renderOverview();
    },
    failed: (message) => {
      showError(message);
      void getJob(jobId).then(
        (fresh) => {
          job = fresh; // it may have moved on, which is likely why the action was refused
          renderHead();
          renderOverview();
        },
        () => undefined, // the action's own error box says enough
      );
    },
  };

  function renderHead(): void {
    if (!job) return;
    // Rebuilt when what the actions depend on changes, not on every point (a button mid-click would go).
    const actionsKey = `${job.state}/${job.current_step > 0}/${checkpoints?.length}`;
    if (actions.dataset.key !== actionsKey) {
      actions.dataset.key = actionsKey;
      clear(actions, actionBar(job, hooks));
    }
    clear(
      head,
      h("h1", {}, job.name || job.id),
      h("span", { class: fmt.stateClass(job.state), "data-testid": "job-state", title: job.state_reason }, job.state),
      h(
        "div",
        { class: "head-progress" },
        h("div", { class: "bar" }, h("div", { style: `width:${Math.min(100, job.progress_percent)}%` })),
        h(
          "span",
          {},
          `${fmt.percent(job.progress_percent)} · step ${job.current_step}/${job.total_steps || "?"} · ` +
            `${fmt.duration(job.elapsed_seconds)} elapsed` +
            (TERMINAL_STATES.has(job.state) || !job.remaining_seconds
              ? ""
              : ` · ${fmt.duration(job.remaining_seconds)} left`),
        ),
      ),
      h("span", { class: "spacer" }),
      streamState,
    );
  }

  function kv(rows: [string, unknown][]): HTMLElement {
    return h(
      "table",
      { class: "kv" },
      h("tbody", {}, ...rows.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", { class: "mono" }, fmt.value(v))))),
    );
  }

  function renderOverview(): void {
    if (!job) return;
    const params = Object.entries(job.parameters ?? {}).sort(([a], [b]) => a.localeCompare(b));
    const kept = checkpoints ?? [];
    clear(
      panes.overview,
      h(
        "div",
        { class: "overview" },
        h(
          "section",
          { class: "card" },
          h("h2", {}, "Job"),
          kv([
            ["ID", job.id],
            ["Name", job.name],
            ["State", job.state],
            ["Reason", job.state_reason],
            ["Method", job.method_id],
            ["Base model", job.model_id],
            ["Dataset", job.dataset_id],
            ["Validation dataset", job.validation_dataset_id],
            ["Attempt", `${job.attempt} of ${job.max_attempts}`],
            ["Resumed from step", job.resumed_from_step || ""],
            ["Agent", job.agent_id],
            ["Priority", job.priority],
            ["Epoch", job.epoch],
            ["Tokens seen", job.tokens_seen],
            ["Submitted by", job.submitted_by],
            ["Created", fmt.time(job.create_time)],
            ["Started", fmt.time(job.start_time)],
            ["Ended", fmt.time(job.end_time)],
            ["Copied from", job.copied_from_job_id],
            ["Labels", Object.keys(job.labels ?? {}).length ? job.labels : ""],
          ]),
        ),
        h(
          "section",
          { class: "card" },
          h("h2", {}, `Parameters (${params.length})`),
          h(
            "table",
            { class: "kv", "data-testid": "parameters" },
            h("tbody", {}, ...params.map(([k, v]) => h("tr", {}, h("th", { class: "mono" }, k), h("td", { class: "mono" }, fmt.value(v))))),
          ),
        ),
        attemptsCard(),
        h(
          "section",
          { class: "card", "data-testid": "artifacts" },
          h("h2", {}, "Artifacts"),
          kv([["Output", job.output_uri || (TERMINAL_STATES.has(job.state) ? "none" : "when the job succeeds")]]),
          h("h2", {}, `Checkpoints (${checkpoints ? kept.length : "…"})`),
          kept.length
            ? h(
                "table",
                { class: "list", "data-testid": "checkpoints" },
                h("thead", {}, h("tr", {}, h("th", {}, "Step"), h("th", {}, "Metrics"), h("th", {}, "Created"), h("th", {}, ""))),
                h(
                  "tbody",
                  {},
                  ...kept.map((c) =>
                    h(
                      "tr",
                      { "data-step": c.step },
                      h("td", { class: "num" }, c.step),
                      h("td", { class: "ckpt-metrics", title: c.uri ?? "" }, checkpointMetrics(c)),
                      h("td", {}, fmt.time(c.create_time as string | undefined)),
                      h(
                        "td",
                        {},
                        h(
                          "button",
                          {
                            "data-testid": `publish-step-${c.step}`,
                            onclick: () => job && publishDialog(job, () => undefined, c.step),
                          },
                          "Publish",
                        ),
                      ),
                    ),
                  ),
                ),
              )
            : h("p", { class: "muted" }, checkpoints ? "No checkpoint kept yet." : "Loading the checkpoints…"),
        ),
        evaluationsCard(),
      ),
      h(
        "div",
        { class: "copy-train" },
        h("a", { href: `#/new/copy/${encodeURIComponent(job.id)}`, class: "button primary", "data-testid": "copy-train" }, "Copy the Train"),
        h("span", { class: "muted" }, "A new job with this one's configuration, to change a little (a dataset, a learning rate) and run."),
      ),
    );
  }

  /** A checkpoint's metrics, the losses first, as short "name value" pairs that wrap inside the card. */
  function checkpointMetrics(c: Checkpoint): string {
    const entries = Object.entries(c.metrics ?? {});
    if (!entries.length) return "–";
    const first = (k: string) => (k === "eval_loss" ? 0 : k === "loss" ? 1 : 2);
    entries.sort(([a], [b]) => first(a) - first(b) || a.localeCompare(b));
    return entries.map(([k, v]) => `${k} ${fmt.value(v)}`).join(" · ");
  }

  /** Each attempt with its transitions and their reasons (a retry after a lost agent starts a new attempt). */
  function attemptsCard(): HTMLElement {
    const byAttempt = new Map<number, JobEvent[]>();
    for (const e of history) byAttempt.set(e.attempt, [...(byAttempt.get(e.attempt) ?? []), e]);
    return h(
      "section",
      { class: "card" },
      h("h2", {}, `Attempts (${job?.attempt ?? 0} of ${job?.max_attempts ?? 0})`),
      kv([["Agent", job?.agent_id || "none yet"]]),
      h(
        "table",
        { class: "list", "data-testid": "history" },
        h("thead", {}, h("tr", {}, h("th", {}, "Attempt"), h("th", {}, "Time"), h("th", {}, "State"), h("th", {}, "Reason"))),
        h(
          "tbody",
          {},
          ...[...byAttempt.entries()].flatMap(([attempt, events]) =>
            events.map((e, i) =>
              h(
                "tr",
                { class: i === 0 ? "attempt-start" : undefined },
                h("td", { class: "num" }, i === 0 ? String(attempt || "–") : ""),
                h("td", { class: "nowrap", title: fmt.time(e.time) }, e.time ? new Date(e.time).toLocaleTimeString() : "–"),
                h("td", {}, `${e.from_state ?? "–"} → `, h("span", { class: fmt.stateClass(e.to_state) }, e.to_state)),
                h("td", { class: "muted" }, e.reason),
              ),
            ),
          ),
        ),
      ),
    );
  }

  function evaluationsCard(): HTMLElement {
    const list = evaluations ?? [];
    return h(
      "section",
      { class: "card", "data-testid": "evaluations" },
      h(
        "h2",
        {},
        `Evaluations (${evaluations ? list.length : "…"}) `,
        h("button", { class: "small", onclick: () => void loadEvaluations(), "data-testid": "evaluations-refresh" }, "Refresh"),
      ),
      list.length
        ? h(
            "table",
            { class: "list" },
            h("thead", {}, h("tr", {}, h("th", {}, "Evaluation"), h("th", {}, "Model"), h("th", {}, "Dataset"), h("th", {}, "State"), h("th", {}, "Metrics"))),
            h(
              "tbody",
              {},
              ...list.map((e) =>
                h(
                  "tr",
                  {},
                  h("td", { class: "mono" }, h("a", { href: `#/jobs/${encodeURIComponent(e.job.id)}` }, e.job.name || e.job.id)),
                  h("td", { class: "mono" }, h("a", { href: `#/models/${encodeURIComponent(e.job.model_id)}` }, e.job.model_id)),
                  h("td", { class: "mono" }, e.job.dataset_id),
                  h("td", {}, h("span", { class: fmt.stateClass(e.job.state), title: e.job.state_reason }, e.job.state)),
                  h(
                    "td",
                    { class: "mono" },
                    Object.keys(e.metrics ?? {}).length ? fmt.value(e.metrics) : "–",
                    e.generations?.length
                      ? h(
                          "details",
                          {},
                          h("summary", {}, `${e.generations.length} sample generations`),
                          ...e.generations.map((g) =>
                            h("div", { class: "generation" }, h("div", {}, h("b", {}, "Prompt "), g.prompt), h("div", {}, h("b", {}, "Generated "), g.generated), g.reference ? h("div", { class: "muted" }, h("b", {}, "Reference "), g.reference) : null),
                          ),
                        )
                      : null,
                  ),
                ),
              ),
            ),
          )
        : h("p", { class: "muted" }, evaluations ? "No evaluation of a model published from this job." : "Loading…"),
    );
  }

  async function loadEvaluations(): Promise<void> {
    try {
      evaluations = (await jobEvaluations(jobId)).evaluations ?? [];
      renderOverview();
    } catch (err) {
      showError(`Could not load the evaluations: ${describeError(err)}`);
    }
  }

  async function loadCheckpoints(): Promise<void> {
    try {
      checkpoints = (await jobCheckpoints(jobId)).checkpoints ?? [];
      renderHead(); // Publish depends on what is kept
      renderOverview();
    } catch (err) {
      showError(`Could not load the checkpoints: ${describeError(err)}`);
    }
  }

  // -- evaluation data -------------------------------------------------------------------------------
  const chartGrid = h("div", { class: "charts", "data-testid": "charts" });
  const smoothingLabel = h("span", { class: "mono", "data-testid": "smoothing-value" }, "0.00");
  const smoothingInput = h("input", {
    type: "range",
    min: "0",
    max: "0.99",
    step: "0.01",
    value: "0",
    "data-testid": "smoothing",
    oninput: () => {
      smoothing = Number(smoothingInput.value);
      smoothingLabel.textContent = smoothing.toFixed(2);
      for (const c of charts.values()) c.setSmoothing(smoothing);
    },
  });
  const noMetrics = h("p", { class: "muted" }, "No metric reported yet; the charts appear with the first point.");
  clear(
    panes.metrics,
    h(
      "div",
      { class: "toolbar" },
      checkbox("Log scale", "log-scale", (checked) => {
        logScale = checked;
        for (const c of charts.values()) c.setLogScale(logScale);
      }),
      h(
        "label",
        { title: "Exponential moving average of the plotted line; the raw points stay as a faint line" },
        "Smoothing ",
        smoothingInput,
        " ",
        smoothingLabel,
      ),
      h("span", { class: "muted" }, "Drag across a chart to zoom in on steps; double-click to zoom out."),
    ),
    noMetrics,
    chartGrid,
  );

  function chartFor(name: string): MetricChart {
    let chart = charts.get(name);
    if (!chart) {
      chart = new MetricChart(name, `job-${jobId}`);
      chart.setLogScale(logScale);
      chart.setSmoothing(smoothing);
      charts.set(name, chart);
      const rank = (n: string) => {
        const i = FIRST_METRICS.indexOf(n);
        return i < 0 ? FIRST_METRICS.length : i;
      };
      const ordered = [...charts.values()].sort((a, b) => rank(a.name) - rank(b.name) || a.name.localeCompare(b.name));
      clear(chartGrid, ...ordered.map((c) => c.el));
      noMetrics.hidden = true;
    }
    return chart;
  }

  function scheduleDraw(): void {
    if (drawPending || tab !== "metrics") return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      for (const c of charts.values()) c.draw();
    });
  }

  const onResize = () => {
    for (const c of charts.values()) c.resize();
  };
  window.addEventListener("resize", onResize);
  disposers.push(() => window.removeEventListener("resize", onResize));

  // -- train log -------------------------------------------------------------------------------------
  const logBox = h("pre", { class: "log", "data-testid": "log" });
  const logCount = h("span", { class: "muted", "data-testid": "log-count" });
  const logSearch = h("input", {
    type: "search",
    placeholder: "Search the log",
    "data-testid": "log-search",
    oninput: () => {
      logFilter = logSearch.value.toLowerCase();
      renderLogs();
    },
  });
  clear(
    panes.logs,
    h(
      "div",
      { class: "toolbar" },
      logSearch,
      h(
        "label",
        {},
        h("input", {
          type: "checkbox",
          checked: true,
          onchange: (e: Event) => {
            follow = (e.target as HTMLInputElement).checked;
          },
        }),
        " Follow",
      ),
      h("button", { "data-testid": "log-download", onclick: () => void downloadLog() }, "Download as text"),
      logCount,
    ),
    logBox,
  );

  function logLine(l: LogLine): HTMLElement {
    return h("div", { class: `line line-${l.stream}` }, h("span", { class: "ts" }, l.time?.slice(11, 19) ?? ""), " ", l.text);
  }

  function renderLogs(): void {
    const shown = logFilter ? logs.filter((l) => l.text.toLowerCase().includes(logFilter)) : logs;
    clear(logBox, ...shown.slice(-MAX_LOG_LINES).map(logLine));
    logCount.textContent = logFilter ? `${shown.length} of ${logs.length} lines` : `${logs.length} lines`;
    if (follow) logBox.scrollTop = logBox.scrollHeight;
  }

  function addLog(l: LogLine): void {
    logs.push(l);
    if (logs.length > MAX_LOG_LINES * 2) logs.splice(0, logs.length - MAX_LOG_LINES);
    logCount.textContent = logFilter ? logCount.textContent : `${logs.length} lines`;
    if (logFilter && !l.text.toLowerCase().includes(logFilter)) return;
    logBox.append(logLine(l));
    while (logBox.childElementCount > MAX_LOG_LINES) logBox.firstElementChild?.remove();
    if (follow && tab === "logs") logBox.scrollTop = logBox.scrollHeight;
  }

  async function downloadLog(): Promise<void> {
    try {
      const text = await jobLogText(jobId); // the whole log, not only the lines this page holds
      const url = URL.createObjectURL(new Blob([text], { type: "text/plain" }));
      const a = h("a", { href: url, download: `${jobId}.log` });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 1000);
    } catch (err) {
      showError(`Could not download the log: ${describeError(err)}`);
    }
  }

  // -- the live stream -------------------------------------------------------------------------------
  function onMessage(m: SseMessage): void {
    let data: unknown;
    try {
      data = JSON.parse(m.data);
    } catch {
      showError(`The event stream sent an unreadable ${m.event} event`);
      return;
    }
    switch (m.event) {
      case "metric": {
        const p = data as MetricPoint;
        const step = Number(p.step);
        chartFor(p.name).add(step, p.value);
        scheduleDraw();
        if (job && step > job.current_step && !TERMINAL_STATES.has(job.state)) {
          job.current_step = step; // progress moves with the points, between snapshots
          if (job.total_steps) job.progress_percent = Math.min(100, (100 * step) / job.total_steps);
          renderHead();
        }
        break;
      }
      case "log":
        addLog(data as LogLine);
        break;
      case "event":
        history.push(data as JobEvent);
        if (tab === "overview") renderOverview();
        break;
      case "job": {
        const before = job?.state;
        job = data as Job;
        renderHead();
        renderOverview();
        if (before && before !== job.state) {
          void loadCheckpoints();
          void loadEvaluations();
        }
        break;
      }
      case "checkpoint":
        void loadCheckpoints();
        break;
      case "error":
        showError(`The event stream failed: ${(data as { code?: string }).code ?? m.data}`);
        break;
    }
  }

  async function start(): Promise<void> {
    try {
      job = await getJob(jobId);
    } catch (err) {
      clear(head, h("h1", {}, jobId));
      showError(`Could not load the job: ${describeError(err)}`);
      return;
    }
    renderHead();
    renderOverview();
    showTab(tab);
    void loadCheckpoints();
    void loadEvaluations();
    try {
      // The stored points first (downsampled when there are many) so the charts draw at once; the stream's
      // replay then fills and extends them, a step at a time.
      const found = await jobMetrics(jobId, { maxPoints: INITIAL_POINTS });
      for (const [name, points] of Object.entries(found.series)) {
        const chart = chartFor(name);
        for (const [step, v] of points) chart.add(step, v);
      }
      scheduleDraw();
    } catch (err) {
      showError(`Could not load the metrics: ${describeError(err)}`);
    }
    const stop = streamEvents(`/api/v1/jobs/${encodeURIComponent(jobId)}/events`, {
      message: onMessage,
      status: (text, kind) => {
        streamState.textContent = kind === "live" ? "● live" : text;
        streamState.className = `stream stream-${kind}`;
        if (kind === "error") showError(`The live updates stopped: ${text}`);
      },
      shouldReconnect: () => !job || !TERMINAL_STATES.has(job.state),
    });
    disposers.push(stop);
    const poll = window.setInterval(async () => {
      if (!job || TERMINAL_STATES.has(job.state)) return;
      try {
        job = await getJob(jobId);
        renderHead();
        if (tab === "overview") renderOverview();
      } catch (err) {
        showError(`Could not refresh the job: ${describeError(err)}`);
      }
    }, JOB_REFRESH_MS);
    disposers.push(() => window.clearInterval(poll));
  }

  showTab(tab);
  void start();
  return () => {
    for (const d of disposers) d();
    for (const c of charts.values()) c.destroy();
  };
}
