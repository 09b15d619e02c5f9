// A training job's actions, shared by the Model Training list (a menu per row) and the Details header:
// Details, Terminate, Pause, Resume, Copy, Delete and Publish. Which apply follows the jobs service's state
// rules (services/jobs/tuneforge_jobs/lifecycle.py); one that doesn't is shown disabled, saying why.

import "./actions.css";

import {
  describeError,
  jobCheckpoints,
  request,
  sendJson,
  TERMINAL_STATES,
  type Checkpoint,
  type Job,
} from "./api";
import { clear, errorBox, h } from "./dom";
import * as fmt from "./format";

export type ActionName = "details" | "terminate" | "pause" | "resume" | "copy" | "delete" | "publish";

export const ACTIONS: [ActionName, string][] = [
  ["details", "Details"],
  ["pause", "Pause"],
  ["resume", "Resume"],
  ["terminate", "Terminate"],
  ["copy", "Copy"],
  ["publish", "Publish"],
  ["delete", "Delete"],
];

/** What the page knows besides the job: its kept checkpoints, once loaded (the Details page has them). */
export interface JobContext {
  checkpoints?: Checkpoint[];
}

const isTraining = (job: Job) => !job.kind || job.kind === "TRAIN";

/** Whether an action applies to the job now; when it doesn't, why (worded as the API would refuse it). */
export function availability(job: Job, action: ActionName, ctx: JobContext = {}): { ok: boolean; why: string } {
  const state = job.state;
  const no = (why: string) => ({ ok: false, why });
  const yes = { ok: true, why: "" };
  const done: Partial<Record<ActionName, string>> = { pause: "paused", copy: "copied", publish: "published" };
  const onlyTraining = `a ${(job.kind || "").toLowerCase()} job can't be ${done[action] ?? action}; only trainings can`;
  switch (action) {
    case "details":
      return yes;
    case "terminate":
      if (state === "CANCELLING") return no("the job is already being terminated");
      return ["QUEUED", "PAUSED", "STARTING", "RUNNING"].includes(state)
        ? yes
        : no(`job is ${state}; only queued, paused or running jobs can be terminated`);
    case "pause":
      if (!isTraining(job)) return no(onlyTraining);
      return ["QUEUED", "STARTING", "RUNNING"].includes(state)
        ? yes
        : no(`job is ${state}; only queued or running jobs can be paused`);
    case "resume":
      return state === "PAUSED" ? yes : no(`job is ${state}; only paused jobs can be resumed`);
    case "delete":
      return TERMINAL_STATES.has(state)
        ? yes
        : no(`job is ${state}; only finished jobs can be deleted (terminate it first)`);
    case "copy":
      return isTraining(job) ? yes : no(onlyTraining);
    case "publish": {
      if (!isTraining(job)) return no(onlyTraining);
      if (state === "SUCCEEDED") return yes; // its final output, at least
      const kept = ctx.checkpoints?.length;
      if (kept === undefined && !job.current_step) return no(`job is ${state} and has trained no step yet: nothing to publish`);
      if (kept === 0) return no(`job is ${state} and kept no checkpoint: there is nothing to publish yet`);
      return yes;
    }
  }
}

// -- dialogs ---------------------------------------------------------------------------------------------

/** A modal <dialog> on the body (outside any page re-render); closed and removed by `close`. */
function modal(testid: string, ...content: (Node | string | null)[]): { dialog: HTMLDialogElement; close: () => void } {
  const dialog = h("dialog", { class: "modal", "data-testid": testid }, ...content);
  document.body.append(dialog);
  const close = () => {
    dialog.close();
    dialog.remove();
  };
  dialog.addEventListener("cancel", () => dialog.remove()); // Escape
  dialog.showModal();
  return { dialog, close };
}

/** Asks before something that can't be undone; resolves true on confirm. */
export function confirmDialog(title: string, message: string, confirmLabel: string): Promise<boolean> {
  return new Promise((resolve) => {
    const { dialog, close } = modal(
      "confirm-dialog",
      h("h2", {}, title),
      h("p", {}, message),
      h(
        "div",
        { class: "modal-buttons" },
        h("button", { "data-testid": "confirm-cancel", onclick: () => (close(), resolve(false)) }, "Cancel"),
        h("button", { class: "danger", "data-testid": "confirm-ok", onclick: () => (close(), resolve(true)) }, confirmLabel),
      ),
    );
    dialog.addEventListener("cancel", () => resolve(false));
  });
}

/**
 * Publish: the new model's name and, optionally, which kept checkpoint (none: the service picks the best of
 * the kept checkpoints and a succeeded job's final output). On success the dialog links to the new model.
 */
export function publishDialog(job: Job, onPublished: (modelId: string) => void, step = 0): void {
  const name = h("input", {
    type: "text",
    required: true,
    value: `${job.name || job.id}-model`,
    "data-testid": "publish-name",
    maxlength: 128,
  });
  const description = h("input", { type: "text", placeholder: "optional", "data-testid": "publish-description" });
  const stepSelect = h(
    "select",
    { "data-testid": "publish-step" },
    h("option", { value: "0" }, job.state === "SUCCEEDED" ? "Best (kept checkpoints and final output)" : "Best kept checkpoint"),
  );
  const status = h("div", { "data-testid": "publish-status" }, "Loading the kept checkpoints…");
  const submit = h("button", { type: "submit", class: "primary", "data-testid": "publish-submit", disabled: true }, "Publish");
  const { close } = modal(
    "publish-dialog",
    h(
      "form",
      {
        method: "dialog",
        onsubmit: async (e: Event) => {
          e.preventDefault();
          submit.disabled = true;
          clear(status, "Publishing…");
          try {
            const body = { name: name.value.trim(), description: description.value, step: Number(stepSelect.value) };
            const made = await sendJson<{ model_id: string }>(`/api/v1/jobs/${encodeURIComponent(job.id)}/publish`, body);
            clear(
              status,
              h(
                "div",
                { class: "ok" },
                "Published as ",
                h("a", { href: `#/models/${encodeURIComponent(made.model_id)}`, "data-testid": "published-model", onclick: () => close() }, made.model_id),
              ),
            );
            onPublished(made.model_id);
          } catch (err) {
            clear(status, errorBox(describeError(err)));
            submit.disabled = false;
          }
        },
      },
      h("h2", {}, `Publish ${job.name || job.id}`),
      h("p", { class: "muted" }, "Registers the trained adapter as a new model in the catalog, with its lineage."),
      h("label", {}, "Model name", name),
      h("label", {}, "Checkpoint", stepSelect),
      h("label", {}, "Description", description),
      status,
      h(
        "div",
        { class: "modal-buttons" },
        h("button", { type: "button", "data-testid": "publish-close", onclick: () => close() }, "Close"),
        submit,
      ),
    ),
  );
  name.select();
  void (async () => {
    try {
      const kept = (await jobCheckpoints(job.id)).checkpoints ?? [];
      for (const c of kept) {
        const loss = c.metrics?.eval_loss ?? c.metrics?.loss;
        stepSelect.append(
          h("option", { value: String(c.step), selected: c.step === step }, `step ${c.step}${loss === undefined ? "" : ` · ${loss === c.metrics?.eval_loss ? "eval_loss" : "loss"} ${fmt.value(loss)}`}`),
        );
      }
      if (!kept.length && job.state !== "SUCCEEDED") {
        clear(status, errorBox(`job is ${job.state} and kept no checkpoint: there is nothing to publish yet`));
        return;
      }
      clear(status, kept.length ? `${kept.length} kept checkpoint${kept.length > 1 ? "s" : ""}` : "No kept checkpoint: the final output is published.");
      submit.disabled = false;
    } catch (err) {
      clear(status, errorBox(`Could not list the checkpoints: ${describeError(err)}`));
    }
  })();
}

// -- running an action -----------------------------------------------------------------------------------

export interface ActionHooks {
  /** After the API accepted it: the job as it is now (null once deleted). */
  done: (action: ActionName, job: Job | null) => void;
  /** The API refused it, or could not be reached: shown in the page's error box. */
  failed: (message: string) => void;
  ctx?: () => JobContext;
}

const path = (job: Job, verb = "") => `/api/v1/jobs/${encodeURIComponent(job.id)}${verb ? `/${verb}` : ""}`;

export async function runAction(job: Job, action: ActionName, hooks: ActionHooks): Promise<void> {
  const label = job.name || job.id;
  try {
    switch (action) {
      case "details":
        location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
        return;
      case "copy":
        location.hash = `#/new/copy/${encodeURIComponent(job.id)}`;
        return;
      case "publish":
        publishDialog(job, () => hooks.done(action, job));
        return;
      case "terminate":
        if (!(await confirmDialog("Terminate the training?", `${label} stops now; what it kept so far stays.`, "Terminate"))) return;
        return hooks.done(action, await sendJson<Job>(path(job, "cancel"), undefined));
      case "pause":
        return hooks.done(action, await sendJson<Job>(path(job, "pause"), undefined));
      case "resume":
        return hooks.done(action, await sendJson<Job>(path(job, "resume"), undefined));
      case "delete":
        if (!(await confirmDialog("Delete the job?", `${label} is deleted with its metrics, logs, checkpoints and artifacts.`, "Delete"))) return;
        await request(path(job), { method: "DELETE" });
        return hooks.done(action, null);
    }
  } catch (err) {
    hooks.failed(`Could not ${action} ${label}: ${describeError(err)}`);
  }
}

/** One control per action: a button, disabled with its reason (title and data-why) when it doesn't apply. */
export function actionControl(
  job: Job,
  action: ActionName,
  label: string,
  hooks: ActionHooks,
  opts: { withReason?: boolean; onClick?: () => void } = {},
): HTMLElement {
  const { ok, why } = availability(job, action, hooks.ctx?.() ?? {});
  const button = h(
    "button",
    {
      type: "button",
      class: `action action-${action}${action === "terminate" || action === "delete" ? " danger-text" : ""}`,
      "data-testid": `action-${action}`,
      "data-why": why || undefined,
      title: why || undefined,
      disabled: !ok,
      onclick: () => {
        opts.onClick?.();
        void runAction(job, action, hooks);
      },
    },
    label,
  );
  // A disabled button gets no mouse events in some browsers: the wrapper carries the tooltip too.
  return h("span", { class: "action-wrap", title: why || undefined }, button, opts.withReason && why ? h("span", { class: "why" }, why) : null);
}

/** The Details header's row of actions. */
export function actionBar(job: Job, hooks: ActionHooks): HTMLElement {
  return h(
    "div",
    { class: "action-bar", "data-testid": "job-actions" },
    ...ACTIONS.filter(([a]) => a !== "details").map(([a, label]) => actionControl(job, a, label, hooks)),
  );
}

/** The list's compact menu: one "Actions" button; the menu floats above the table (not clipped by it). */
export function actionMenu(job: Job, hooks: ActionHooks, open: boolean, toggle: (open: boolean) => void): HTMLElement {
  const menu = open
    ? h(
        "div",
        // Clicks inside (on a reason, say) don't reach the page's close-on-click-outside.
        { class: "action-menu", role: "menu", "data-testid": "action-menu", onclick: (e: Event) => e.stopPropagation() },
        ...ACTIONS.map(([a, label]) => actionControl(job, a, label, hooks, { withReason: true, onClick: () => toggle(false) })),
      )
    : null;
  const button = h(
    "button",
    {
      type: "button",
      class: "menu-button",
      "aria-haspopup": "menu",
      "aria-expanded": String(open),
      "data-testid": "actions",
      onclick: (e: Event) => {
        e.stopPropagation();
        toggle(!open);
      },
    },
    "Actions ▾",
  );
  const wrap = h("div", { class: "menu-wrap" }, button, menu);
  if (menu) {
    // Fixed, next to its button: the table's scroll box would clip an absolutely placed menu.
    requestAnimationFrame(() => {
      const r = button.getBoundingClientRect();
      const below = r.bottom + 4 + menu.offsetHeight < window.innerHeight;
      menu.style.top = `${below ? r.bottom + 4 : Math.max(4, r.top - 4 - menu.offsetHeight)}px`;
      menu.style.left = `${Math.max(4, r.right - menu.offsetWidth)}px`;
      menu.style.visibility = "visible";
    });
  }
  return wrap;
}
