// Compare (#/compare/<id>,<id>,...): the picked trainings side by side from GET /api/v1/jobs/compare — a table
// of the jobs, their parameters with the ones that differ highlighted, and one chart per metric with every
// run's curve overlaid (one colour per job). Refreshed every few seconds while any of them is still going.

import "./compare.css";

import { ApiError, describeError, getJson, TERMINAL_STATES, type Job } from "../api";
import { OverlayChart, RUN_COLORS } from "../charts";
import { checkbox, clear, errorBox, h } from "../dom";
import * as fmt from "../format";

const REFRESH_MS = 4000;
const MAX_POINTS = 1000;
// Charted first, in this order; any other metric the jobs share follows by name.
const FIRST_METRICS = ["loss", "eval_loss", "reward", "learning_rate", "grad_norm"];

interface SeriesPoint {
  step: number;
  value: number;
  min: number;
  max: number;
  count: number;
}

interface Comparison {
  jobs: Job[];
  differing_parameters: { name: string; values: unknown[] }[];
  metrics: { name: string; series: { job_id: string; name: string; points: SeriesPoint[] }[] }[];
}

function compareJobs(ids: string[]): Promise<Comparison> {
  const query = new URLSearchParams({ max_points: String(MAX_POINTS) });
  for (const id of ids) query.append("job_id", id);
  return getJson(`/api/v1/jobs/compare?${query}`);
}

export function comparePage(main: HTMLElement, arg: string): () => void {
  const ids = [...new Set((arg ?? "").split(",").map((s) => s.trim()).filter(Boolean))];
  let found: Comparison | null = null;
  let showAll = false;
  let logScale = false;
  let timer = 0;
  let stopped = false;
  const charts = new Map<string, OverlayChart>();

  const status = h("span", { class: "muted", "data-testid": "compare-status" }, "Loading…");
  const errors = h("div", {});
  const jobsBox = h("div", {});
  const paramsBox = h("div", {});
  const chartGrid = h("div", { class: "charts", "data-testid": "compare-charts" });
  const noMetrics = h("p", { class: "muted" }, "");

  clear(
    main,
    h("a", { href: "#/jobs", class: "back" }, "← Model Training"),
    h("div", { class: "page-head" }, h("h1", {}, `Compare ${ids.length} trainings`), h("span", { class: "spacer" }), status),
    errors,
    jobsBox,
    h(
      "section",
      { class: "card compare-params" },
      h(
        "div",
        { class: "toolbar" },
        h("h2", {}, "Parameters"),
        checkbox("Show all parameters", "show-all-params", (checked) => {
          showAll = checked;
          renderParams();
        }),
      ),
      paramsBox,
    ),
    h(
      "div",
      { class: "toolbar" },
      h("h2", { class: "section-title" }, "Metrics"),
      checkbox("Log scale", "compare-log-scale", (checked) => {
        logScale = checked;
        for (const c of charts.values()) c.setLogScale(logScale);
      }),
      h("span", { class: "muted" }, "Drag across a chart to zoom in on steps; double-click to zoom out."),
    ),
    noMetrics,
    chartGrid,
  );

  if (ids.length < 2) {
    clear(errors, errorBox("Pick two or more jobs on the Model Training list to compare them."));
    clear(status);
    return () => undefined;
  }

  // A legend tells runs apart by name; two jobs of one name also get their id.
  function labels(jobs: Job[]): string[] {
    const names = jobs.map((j) => j.name || j.id);
    return names.map((n, i) => (names.indexOf(n) !== names.lastIndexOf(n) ? `${n} (${jobs[i].id})` : n));
  }

  function finalLoss(jobId: string): number | undefined {
    const loss = found?.metrics.find((m) => m.name === "loss")?.series.find((s) => s.job_id === jobId);
    return loss?.points.length ? loss.points[loss.points.length - 1].value : undefined;
  }

  function renderJobs(): void {
    if (!found) return;
    const names = labels(found.jobs);
    clear(
      jobsBox,
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "jobs", "data-testid": "compare-jobs" },
          h(
            "thead",
            {},
            h("tr", {}, ...["", "Name / ID", "Method", "Model", "Dataset", "State", "Progress", "Duration", "Final loss"].map((c) => h("th", {}, c))),
          ),
          h(
            "tbody",
            {},
            ...found.jobs.map((job, i) =>
              h(
                "tr",
                { "data-job-id": job.id },
                h("td", {}, h("span", { class: "swatch", style: `background:${RUN_COLORS[i % RUN_COLORS.length]}` })),
                h(
                  "td",
                  {},
                  h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "job-name" }, names[i]),
                  h("div", { class: "muted mono" }, job.id),
                ),
                h("td", {}, job.method_id),
                h("td", {}, job.model_id),
                h("td", { class: "mono" }, job.dataset_id),
                h("td", {}, h("span", { class: fmt.stateClass(job.state), title: job.state_reason }, job.state)),
                h("td", { class: "num" }, `${fmt.percent(job.progress_percent)} · ${job.current_step}/${job.total_steps || "?"}`),
                h("td", { class: "num" }, fmt.duration(job.elapsed_seconds)),
                h("td", { class: "num", "data-testid": "final-loss" }, fmt.value(finalLoss(job.id))),
              ),
            ),
          ),
        ),
      ),
    );
  }

  function renderParams(): void {
    if (!found) return;
    const jobs = found.jobs;
    const differing = new Map(found.differing_parameters.map((d) => [d.name, d.values]));
    const every = [...new Set([...jobs.flatMap((j) => Object.keys(j.parameters ?? {})), ...differing.keys()])].sort();
    const shown = showAll ? every : every.filter((n) => differing.has(n));
    const names = labels(jobs);
    clear(
      paramsBox,
      h(
        "p",
        { class: "muted" },
        `${differing.size} of ${every.length} parameters differ` + (showAll ? "; those are highlighted." : "."),
      ),
      shown.length
        ? h(
            "div",
            { class: "table-scroll" },
            h(
              "table",
              { class: "compare-table", "data-testid": "compare-params" },
              h(
                "thead",
                {},
                h(
                  "tr",
                  {},
                  h("th", {}, "Parameter"),
                  ...names.map((n, i) => h("th", {}, h("span", { class: "swatch", style: `background:${RUN_COLORS[i % RUN_COLORS.length]}` }), n)),
                ),
              ),
              h(
                "tbody",
                {},
                ...shown.map((name) => {
                  const values = differing.get(name) ?? jobs.map((j) => j.parameters?.[name]);
                  return h(
                    "tr",
                    {
                      class: differing.has(name) ? "differs" : undefined,
                      "data-testid": `param-${name}`,
                      "data-differs": String(differing.has(name)),
                    },
                    h("th", { class: "mono" }, name),
                    ...values.map((v) => h("td", { class: "mono" }, fmt.value(v))),
                  );
                }),
              ),
            ),
          )
        : null,
    );
  }

  function renderCharts(): void {
    if (!found) return;
    const names = labels(found.jobs);
    const order = (n: string) => {
      const i = FIRST_METRICS.indexOf(n);
      return i < 0 ? FIRST_METRICS.length : i;
    };
    const metrics = [...found.metrics].sort((a, b) => order(a.name) - order(b.name) || a.name.localeCompare(b.name));
    const wanted = new Set(metrics.map((m) => m.name));
    for (const [name, chart] of charts) {
      if (!wanted.has(name)) {
        chart.destroy();
        charts.delete(name);
      }
    }
    const fresh = metrics.some((m) => !charts.has(m.name));
    for (const m of metrics) {
      if (!charts.has(m.name)) charts.set(m.name, new OverlayChart(m.name, `compare-${ids.join(",")}`));
    }
    if (fresh) clear(chartGrid, ...metrics.map((m) => charts.get(m.name)!.el));
    for (const m of metrics) {
      const chart = charts.get(m.name)!;
      chart.setLogScale(logScale);
      // The series come in the request's order, the jobs' too: match them by id all the same.
      chart.set(
        found.jobs.map((job, i) => ({
          label: names[i],
          points: (m.series.find((s) => s.job_id === job.id)?.points ?? []).map((p): [number, number] => [p.step, p.value]),
        })),
      );
    }
    noMetrics.textContent = metrics.length ? "" : "No metric that every compared job reports yet.";
  }

  async function refresh(): Promise<void> {
    window.clearTimeout(timer);
    try {
      found = await compareJobs(ids);
      clear(errors);
      renderJobs();
      renderParams();
      renderCharts();
      const live = found.jobs.some((j) => !TERMINAL_STATES.has(j.state));
      status.textContent = `${live ? "refreshing every few seconds · " : ""}updated ${new Date().toLocaleTimeString()}`;
      status.dataset.live = String(live);
      if (live && !stopped) timer = window.setTimeout(() => void refresh(), REFRESH_MS);
    } catch (err) {
      clear(errors, errorBox(`Could not compare the jobs: ${describeError(err)}`));
      status.textContent = "";
      // A passing failure (the gateway unreachable or restarting) shouldn't end a live view: try again, slower.
      // A refusal (a job deleted or not in this project) stands.
      const passing = !(err instanceof ApiError) || err.status === 0 || err.status >= 500;
      if (!stopped && passing && (!found || found.jobs.some((j) => !TERMINAL_STATES.has(j.state))))
        timer = window.setTimeout(() => void refresh(), REFRESH_MS * 3);
    }
  }

  const onResize = () => {
    for (const c of charts.values()) c.resize();
  };
  window.addEventListener("resize", onResize);
  void refresh();
  return () => {
    stopped = true;
    window.clearTimeout(timer);
    window.removeEventListener("resize", onResize);
    for (const c of charts.values()) c.destroy();
  };
}
