// The Model Training page: every training job of the project, filtered by state and a search, refreshed
// every few seconds, each with its progress, a loss sparkline and its actions (src/actions.ts); jobs picked
// with the row checkboxes open side by side on the Compare page.

import { actionMenu, type ActionHooks } from "../actions";
import { describeError, getJson, jobMetrics, TERMINAL_STATES, type Job } from "../api";
import { sparkline } from "../charts";
import { clear, errorBox, h } from "../dom";
import * as fmt from "../format";

const REFRESH_MS = 3000;
const SPARK_POINTS = 60;
const PAGE_SIZE = 200;
const MAX_COMPARED = 20; // the compare API's limit

/** One page of the list; the API's next_page_token (empty on the last page) asks for the next. */
function listJobsPage(states: string[], pageToken: string): Promise<{ jobs?: Job[]; next_page_token?: string }> {
  const query = new URLSearchParams({ page_size: String(PAGE_SIZE) });
  for (const s of states) query.append("state", s);
  if (pageToken) query.set("page_token", pageToken);
  return getJson(`/api/v1/jobs?${query}`);
}

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
  let pages = 1; // pages shown: "Load more" adds one, and each refresh reads that many again
  let nextToken = "";
  let openMenu = ""; // the job whose action menu is open
  const selected = new Set<string>(); // ids ticked for Compare, in the order ticked
  // Loss series per job; a finished job's is fetched once, a running job's on every refresh.
  const losses = new Map<string, { points: [number, number][]; final: boolean }>();

  const status = h("div", { class: "status", "data-testid": "list-status" });
  const errors = h("div", {});
  // An action's failure stays until the next action (a refresh clears only its own errors).
  const actionErrors = h("div", { "data-testid": "action-errors" });
  const more = h("button", {
    "data-testid": "load-more",
    hidden: true,
    onclick: () => {
      pages += 1;
      void refresh();
    },
  });
  const compare = h("button", {
    class: "primary",
    "data-testid": "compare",
    onclick: () => {
      location.hash = `#/compare/${[...selected].map(encodeURIComponent).join(",")}`;
    },
  });
  const hooks: ActionHooks = {
    done: () => {
      clear(actionErrors);
      void refresh();
    },
    failed: (message) => {
      clear(actionErrors, errorBox(message));
      void refresh();
    },
  };
  const closeMenu = () => {
    if (!openMenu) return;
    openMenu = "";
    render();
  };
  document.addEventListener("click", closeMenu);
  // An open menu follows its button when a scroll (the table's, the page's) or the window's size moves it.
  let placing = false;
  const onResize = () => {
    if (!openMenu || placing) return;
    placing = true;
    requestAnimationFrame(() => {
      placing = false;
      render();
    });
  };
  window.addEventListener("resize", onResize);
  document.addEventListener("scroll", onResize, true);
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
      compare,
    ),
    errors,
    actionErrors,
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
            h("th", { class: "compare-pick", title: "Pick jobs to compare" }, ""),
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
    h("div", { class: "list-foot" }, status, more),
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
    const ticked = selected.has(job.id);
    return h(
      "tr",
      { "data-job-id": job.id, class: ticked ? "picked" : undefined },
      h(
        "td",
        { class: "compare-pick" },
        h("input", {
          type: "checkbox",
          checked: ticked,
          "data-testid": "pick",
          "aria-label": `Compare ${job.name || job.id}`,
          disabled: !ticked && selected.size >= MAX_COMPARED,
          title: !ticked && selected.size >= MAX_COMPARED ? `at most ${MAX_COMPARED} jobs can be compared` : undefined,
          onchange: (e: Event) => {
            if ((e.target as HTMLInputElement).checked) selected.add(job.id);
            else selected.delete(job.id);
            render();
          },
        }),
      ),
      h(
        "td",
        {},
        h("a", { href: link, class: "job-name" }, job.name || job.id),
        h("div", { class: "muted mono nowrap" }, job.id),
      ),
      h(
        "td",
        {},
        h("span", { class: fmt.stateClass(job.state), title: job.state_reason }, job.state),
        job.attempt > 1 ? h("div", { class: "muted" }, `attempt ${job.attempt}/${job.max_attempts}`) : null,
      ),
      h("td", {}, job.method_id || job.kind),
      h("td", { class: "nowrap" }, job.model_id),
      h("td", { class: "mono clip", title: job.dataset_id }, job.dataset_id),
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
        sparkline(loss.map((p) => p[1]), 80),
        h("span", { class: "muted" }, last === undefined ? "" : fmt.value(last)),
      ),
      h(
        "td",
        { class: "row-actions" },
        h("a", { href: link, class: "button" }, "View Details"),
        " ",
        actionMenu(job, hooks, openMenu === job.id, (open) => {
          openMenu = open ? job.id : "";
          render();
        }),
      ),
    );
  }

  function renderCompare(): void {
    compare.textContent = `Compare (${selected.size})`;
    compare.disabled = selected.size < 2;
    compare.title = selected.size < 2 ? "Tick two or more jobs to compare them" : "";
    compare.dataset.count = String(selected.size);
  }

  function render(): void {
    const shown = jobs.filter(matches);
    clear(
      body,
      ...(shown.length
        ? shown.map(row)
        : [h("tr", {}, h("td", { colspan: 12, class: "empty" }, jobs.length ? "No job matches the search." : "No jobs."))]),
    );
    clear(
      status,
      `${shown.length} of ${jobs.length}${nextToken ? "+" : ""} jobs · refreshed ${new Date().toLocaleTimeString()}`,
    );
    renderCompare();
    more.hidden = !nextToken;
    more.textContent = `Load ${PAGE_SIZE} more`;
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
      const found: Job[] = [];
      let token = "";
      for (let page = 0; page < pages; page++) {
        const next = await listJobsPage(FILTERS[filter] ?? [], token);
        found.push(...(next.jobs ?? []));
        token = next.next_page_token ?? "";
        if (!token) break;
      }
      jobs = found;
      nextToken = token;
      render();
      await refreshLosses();
      render();
      clear(errors);
    } catch (err) {
      clear(errors, errorBox(`Could not refresh the jobs: ${describeError(err)}`));
    }
    if (!stopped) timer = window.setTimeout(() => void refresh(), REFRESH_MS);
  }

  renderCompare();
  void refresh();
  return () => {
    stopped = true;
    window.clearTimeout(timer);
    document.removeEventListener("click", closeMenu);
    window.removeEventListener("resize", onResize);
    document.removeEventListener("scroll", onResize, true);
  };
}
