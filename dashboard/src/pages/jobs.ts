// The Model Training page: every training job of the project, filtered by state and a search, refreshed
// every few seconds, each with its progress and a loss sparkline.

import { describeError, jobMetrics, listJobs, TERMINAL_STATES, type Job } from "../api";
import { sparkline } from "../charts";
import { clear, errorBox, h } from "../dom";
import * as fmt from "../format";

const REFRESH_MS = 3000;
const SPARK_POINTS = 60;

const FILTERS: Record<string, string[]> = {
  all: [],
  active: ["QUEUED", "STARTING", "RUNNING", "CANCELLING", "PAUSED"],
  running: ["STARTING", "RUNNING"],
  queued: ["QUEUED"],
  paused: ["PAUSED"],
  succeeded: ["SUCCEEDED"],
  failed: ["FAILED"],
  cancelled: ["CANCELLING", "CANCELLED"],
};

export function jobsPage(main: HTMLElement): () => void {
  let filter = sessionStorage.getItem("tuneforge.jobsFilter") ?? "all";
  let search = "";
  let jobs: Job[] = [];
  let timer = 0;
  let stopped = false;
  // Loss series per job; a finished job's is fetched once, a running job's on every refresh.
  const losses = new Map<string, { points: [number, number][]; final: boolean }>();

  const status = h("div", { class: "status", "data-testid": "list-status" });
  const errors = h("div", {});
  const body = h("tbody", {});
  const select = h(
    "select",
    {
      "data-testid": "state-filter",
      onchange: () => {
        filter = select.value;
        sessionStorage.setItem("tuneforge.jobsFilter", filter);
        void refresh();
      },
    },
    ...Object.keys(FILTERS).map((f) =>
      h("option", { value: f, selected: f === filter }, f[0].toUpperCase() + f.slice(1)),
    ),
  );
  const searchBox = h("input", {
    type: "search",
    placeholder: "Search name, id, model, dataset, method",
    "data-testid": "search",
    oninput: () => {
      search = searchBox.value.trim().toLowerCase();
      render();
    },
  });

  clear(
    main,
    h(
      "div",
      { class: "page-head" },
      h("h1", {}, "Model Training"),
      h("span", { class: "spacer" }),
      h("label", {}, "State ", select),
      searchBox,
    ),
    errors,
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "jobs", "data-testid": "jobs" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ...[
              "Name / ID",
              "Status",
              "Method",
              "Model",
              "Dataset",
              "Progress",
              "Tokens",
              "Duration",
              "Remaining",
              "Loss",
              "",
            ].map((c) => h("th", {}, c)),
          ),
        ),
        body,
      ),
    ),
    status,
  );

  function matches(job: Job): boolean {
    if (!search) return true;
    return [job.name, job.id, job.model_id, job.dataset_id, job.method_id].some((f) =>
      (f ?? "").toLowerCase().includes(search),
    );
  }

  function row(job: Job): HTMLElement {
    const link = `#/jobs/${encodeURIComponent(job.id)}`;
    const loss = losses.get(job.id)?.points ?? [];
    const last = loss.length ? loss[loss.length - 1][1] : undefined;
    return h(
      "tr",
      { "data-job-id": job.id },
      h(
        "td",
        {},
        h("a", { href: link, class: "job-name" }, job.name || job.id),
        h("div", { class: "muted mono" }, job.id),
      ),
      h(
        "td",
        {},
        h("span", { class: fmt.stateClass(job.state), title: job.state_reason }, job.state),
        job.attempt > 1 ? h("div", { class: "muted" }, `attempt ${job.attempt}/${job.max_attempts}`) : null,
      ),
      h("td", {}, job.method_id || job.kind),
      h("td", {}, job.model_id),
      h("td", { class: "mono" }, job.dataset_id),
      h(
        "td",
        { class: "progress-cell" },
        h("div", { class: "bar" }, h("div", { style: `width:${Math.min(100, job.progress_percent ?? 0)}%` })),
        h("span", {}, `${fmt.percent(job.progress_percent)}`),
        h("div", { class: "muted" }, job.total_steps ? `${job.current_step ?? 0}/${job.total_steps} steps` : ""),
      ),
      h("td", { class: "num" }, fmt.count(job.tokens_seen)),
      h("td", { class: "num" }, fmt.duration(job.elapsed_seconds)),
      h("td", { class: "num" }, TERMINAL_STATES.has(job.state) ? "–" : fmt.duration(job.remaining_seconds)),
      h(
        "td",
        { class: "spark-cell", title: last === undefined ? "no loss yet" : `loss ${fmt.value(last)}` },
        sparkline(loss.map((p) => p[1])),
        h("span", { class: "muted" }, last === undefined ? "" : fmt.value(last)),
      ),
      h("td", {}, h("a", { href: link, class: "button" }, "View Details")),
    );
  }

  function render(): void {
    const shown = jobs.filter(matches);
    clear(
      body,
      ...(shown.length
        ? shown.map(row)
        : [h("tr", {}, h("td", { colspan: 11, class: "empty" }, jobs.length ? "No job matches the search." : "No jobs."))]),
    );
    clear(status, `${shown.length} of ${jobs.length} jobs · refreshed ${new Date().toLocaleTimeString()}`);
  }

  async function refreshLosses(): Promise<void> {
    const wanted = jobs.filter(matches).slice(0, 50);
    await Promise.all(
      wanted.map(async (job) => {
        const known = losses.get(job.id);
        if (known?.final) return;
        const found = await jobMetrics(job.id, { names: ["loss"], maxPoints: SPARK_POINTS });
        losses.set(job.id, { points: found.series.loss ?? [], final: TERMINAL_STATES.has(job.state) });
      }),
    );
  }

  async function refresh(): Promise<void> {
    window.clearTimeout(timer);
    try {
      jobs = (await listJobs(FILTERS[filter] ?? [])).jobs ?? [];
      render();
      await refreshLosses();
      render();
      clear(errors);
    } catch (err) {
      clear(errors, errorBox(`Could not refresh the jobs: ${describeError(err)}`));
    }
    if (!stopped) timer = window.setTimeout(() => void refresh(), REFRESH_MS);
  }

  void refresh();
  return () => {
    stopped = true;
    window.clearTimeout(timer);
  };
}
