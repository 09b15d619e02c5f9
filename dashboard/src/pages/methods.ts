// The Methods page (DeepExtension's Training Method Management, seed 003): the built-in and added training
// methods, a method's parameter schema, and for admins "Add New Method" (the catalog's validation is the
// judge: each of its field violations is shown under the field it names) and deleting an added method.

import "./catalog.css";

import { ApiError, describeError, getJson, listMethods, sendJson, type Method, type Principal } from "../api";
import { clear, errorBox, h } from "../dom";
import * as fmt from "../format";

const TRAINING_TYPES = ["chat", "embedding", "vision-language", "image-generation"];
const LIFECYCLES: [string, string][] = [
  ["customized", "Customized model (an adapter / trained weights)"],
  ["complete", "Complete model (saved with its base)"],
  ["live", "Live model (deployed)"],
];
const PARAM_TYPES = ["int", "float", "bool", "string"];

interface StageRow {
  stage: string;
  label: string;
  /** Whether the lifecycle (and deployment environment) uses the stage, and whether it must be filled. */
  shown: (lifecycle: string, deployment: string) => boolean;
  note: (lifecycle: string, deployment: string) => string;
}

// As methods.validate_custom_method asks for them (seed 003's "Python File Configuration").
const STAGES: StageRow[] = [
  { stage: "training", label: "training", shown: () => true, note: () => "required" },
  {
    stage: "saving",
    label: "saving",
    shown: (l) => l === "complete" || l === "live",
    note: () => "file required; env defaults to training's",
  },
  {
    stage: "inference_customized",
    label: "inference-customized",
    shown: () => true,
    note: () => "optional: enables customized-model inference",
  },
  {
    stage: "inference_complete",
    label: "inference-complete",
    shown: (l) => l === "complete" || l === "live",
    note: () => "optional: enables complete-model inference",
  },
  {
    stage: "deployment",
    label: "deployment",
    shown: (l, d) => l === "live" && d === "custom",
    note: () => "required for a custom deployment environment",
  },
];

export function isAdmin(who: Principal): boolean {
  return who.key.superuser || who.key.roles.some((r) => r.project_id === who.project_id && r.role.toLowerCase() === "admin");
}

export function methodsPage(main: HTMLElement, args: string[], who: Principal): void {
  if (args[0]) methodDetailPage(main, args[0], who);
  else methodListPage(main, who);
}

async function deleteMethod(m: Method): Promise<boolean> {
  if (!window.confirm(`Delete the method ${m.id}? It will no longer be selectable for new trainings.`)) return false;
  await sendJson(`/api/v1/methods/${encodeURIComponent(m.id)}`, undefined, "DELETE");
  return true;
}

// -- the list ---------------------------------------------------------------------------------------------

function methodListPage(main: HTMLElement, who: Principal): void {
  const admin = isAdmin(who);
  const errors = h("div", {});
  const status = h("div", { class: "status", "data-testid": "methods-status" }, "Loading the methods…");
  const body = h("tbody", {});
  const formSlot = h("div", { class: "action-panel" });

  const addButton = admin
    ? h(
        "button",
        {
          class: "primary",
          "data-testid": "method-add",
          onclick: () => {
            if (formSlot.firstChild) return clear(formSlot);
            clear(
              formSlot,
              methodForm(
                (created) => {
                  clear(formSlot);
                  status.textContent = `Added ${created.id}.`;
                  void load(created.id);
                },
                () => clear(formSlot),
              ),
            );
          },
        },
        "Add New Method",
      )
    : null;

  clear(
    main,
    h(
      "div",
      { class: "page-head" },
      h("h1", {}, "Training Methods"),
      h("span", { class: "spacer" }),
      addButton,
    ),
    formSlot,
    errors,
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "jobs", "data-testid": "methods" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ...["Method", "Training type", "Lifecycle", "Origin", "Parameters", "Dataset formats", "Entrypoint", "Created", ""].map(
              (c) => h("th", {}, c),
            ),
          ),
        ),
        body,
      ),
    ),
    status,
  );

  async function load(added?: string): Promise<void> {
    try {
      const methods = (await listMethods()).methods ?? [];
      clear(errors);
      clear(
        body,
        ...methods.map((m) =>
          h(
            "tr",
            { "data-testid": `method-row-${m.id}`, class: m.id === added ? "just-added" : undefined },
            h(
              "td",
              {},
              h("a", { href: `#/methods/${encodeURIComponent(m.id)}`, class: "job-name", "data-testid": `method-link-${m.id}` }, m.display_name || m.id),
              h("div", { class: "muted mono" }, m.id),
            ),
            h("td", {}, m.training_type || "–"),
            h("td", {}, m.lifecycle || "–"),
            h("td", { class: "nowrap" }, m.builtin ? "built-in" : "added"),
            h("td", { class: "num" }, String(m.parameters?.length ?? 0)),
            h("td", {}, (m.dataset_formats ?? []).join(", ") || "–"),
            h("td", { class: "mono" }, m.entrypoint || "–"),
            h("td", { class: "nowrap" }, fmt.time(m.create_time)),
            h(
              "td",
              {},
              admin && !m.builtin
                ? h(
                    "button",
                    {
                      class: "danger",
                      "data-testid": `method-delete-${m.id}`,
                      onclick: async (e: Event) => {
                        const button = e.target as HTMLButtonElement;
                        button.disabled = true;
                        try {
                          if (await deleteMethod(m)) {
                            status.textContent = `Deleted ${m.id}.`;
                            await load();
                          }
                        } catch (err) {
                          errors.append(errorBox(`Could not delete ${m.id}: ${describeError(err)}`));
                        }
                        button.disabled = false;
                      },
                    },
                    "Delete",
                  )
                : null,
            ),
          ),
        ),
      );
      if (!methods.length) body.append(h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No methods.")));
      if (!added) status.textContent = `${methods.length} methods`;
    } catch (err) {
      clear(errors, errorBox(`Could not list the methods: ${describeError(err)}`));
      status.textContent = "";
    }
  }

  void load();
}

// -- a method's details -----------------------------------------------------------------------------------

function methodDetailPage(main: HTMLElement, id: string, who: Principal): void {
  const back = () => h("a", { href: "#/methods", class: "back" }, "← Methods");
  clear(main, back(), h("div", { class: "status" }, "Loading the method…"));
  void (async () => {
    let m: Method;
    try {
      m = await getJson<Method>(`/api/v1/methods/${encodeURIComponent(id)}`);
    } catch (err) {
      clear(main, back(), errorBox(describeError(err)));
      return;
    }
    const errors = h("div", {});
    const del =
      isAdmin(who) && !m.builtin
        ? h(
            "button",
            {
              class: "danger",
              "data-testid": `method-delete-${m.id}`,
              onclick: async () => {
                try {
                  if (await deleteMethod(m)) location.hash = "#/methods";
                } catch (err) {
                  errors.append(errorBox(`Could not delete ${m.id}: ${describeError(err)}`));
                }
              },
            },
            "Delete",
          )
        : null;
    const stages = Object.entries((m.stages ?? {}) as Record<string, { file?: string; env?: string }>);
    clear(
      main,
      back(),
      h(
        "div",
        { class: "page-head" },
        h("h1", { "data-testid": "method-name" }, m.display_name || m.id),
        h("span", { class: "mono muted" }, m.id),
        h("span", { class: "state" }, m.builtin ? "built-in" : "added"),
        h("span", { class: "spacer" }),
        del,
      ),
      errors,
      h(
        "div",
        { class: "overview" },
        h(
          "div",
          { class: "card" },
          h("h2", {}, "Method"),
          h(
            "table",
            { class: "kv catalog-kv", "data-testid": "method-fields" },
            ...(
              [
                ["ID", m.id],
                ["Display name", m.display_name],
                ["Description", m.description],
                ["Training type", m.training_type],
                ["Lifecycle", m.lifecycle],
                ["Entrypoint", m.entrypoint],
                ["Dataset formats", (m.dataset_formats ?? []).join(", ")],
                ["Origin", m.builtin ? "built-in" : "added"],
                ["Project", m.project_id || "(every project)"],
                ["Created", fmt.time(m.create_time)],
              ] as [string, unknown][]
            ).map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, fmt.value(v)))),
          ),
        ),
        h(
          "div",
          { class: "card" },
          h("h2", {}, "Stages"),
          stages.length
            ? h(
                "table",
                { class: "list", "data-testid": "method-stages" },
                h("tr", {}, h("th", {}, "Stage"), h("th", {}, "Python file"), h("th", {}, "Environment")),
                ...stages.map(([name, s]) =>
                  h("tr", {}, h("td", {}, name), h("td", { class: "mono" }, s?.file ?? "–"), h("td", { class: "mono" }, s?.env ?? "–")),
                ),
              )
            : h("p", { class: "muted" }, `Built into the trainer (${m.entrypoint || "no entrypoint"}).`),
        ),
      ),
      h("h2", { class: "section-head" }, `Parameter schema (${m.parameters?.length ?? 0})`),
      h("div", { class: "table-wrap" }, paramTable(m)),
    );
  })();
}

const PARAM_COLUMNS = ["Name", "Type", "Default", "Min – max", "Choices", "Group", "Required", "Env name", "Aliases", "Help"];
const PARAM_WIDTHS = [13, 5, 8, 8, 11, 7, 6, 12, 11, 19];

/** A parameter's bounds in one cell, so the table fits 1280 pixels: "1 – 256", "≥ 0", "≤ 1" or "–". */
export function range(min: number | undefined, max: number | undefined): string {
  const has = (v: number | undefined) => v !== undefined && v !== null;
  if (has(min) && has(max)) return `${fmt.value(min)} – ${fmt.value(max)}`;
  if (has(min)) return `≥ ${fmt.value(min)}`;
  if (has(max)) return `≤ ${fmt.value(max)}`;
  return "–";
}

function paramTable(m: Method): HTMLElement {
  return h(
    "table",
    { class: "param-schema", "data-testid": "param-table" },
    // fixed widths (in %): the ten columns fit 1280 pixels, long names and lists wrap within theirs
    h("colgroup", {}, ...PARAM_WIDTHS.map((w) => h("col", { style: `width: ${w}%` }))),
    h("thead", {}, h("tr", {}, ...PARAM_COLUMNS.map((c) => h("th", {}, c)))),
    h(
      "tbody",
      {},
      ...(m.parameters ?? []).map((p) =>
        h(
          "tr",
          { "data-testid": `param-${p.name}` },
          h("td", { class: "mono" }, h("strong", {}, p.name)),
          h("td", {}, p.type),
          h("td", { class: "mono" }, fmt.value(p.default_value)),
          h("td", { class: "nowrap" }, range(p.minimum, p.maximum)),
          h("td", { class: "wrap-list" }, (p.choices ?? []).join(", ") || "–"),
          h("td", {}, p.group || "–"),
          h("td", {}, p.required ? "yes" : "no"),
          h("td", { class: "mono" }, p.env_name || "–"),
          h("td", { class: "mono wrap-list" }, (p.aliases ?? []).join(", ") || "–"),
          h("td", { class: "help" }, p.help || ""),
        ),
      ),
      (m.parameters ?? []).length ? null : h("tr", {}, h("td", { colspan: PARAM_COLUMNS.length, class: "empty" }, "No parameters.")),
    ),
  );
}

// -- Add New Method ---------------------------------------------------------------------------------------

/** POST /api/v1/methods; a refusal is an ApiError whose violations name the definition's fields. */
const createMethod = (definition: Record<string, unknown>) => sendJson<Method>("/api/v1/methods", definition);

function methodForm(onCreated: (m: Method) => void, onCancel: () => void): HTMLElement {
  // field path (as the API names it, without "definition.") -> the slot its message goes in
  const slots = new Map<string, HTMLElement>();
  const slot = (path: string) => {
    const el = h("div", { class: "field-error", "data-testid": `field-error-${path}` });
    slots.set(path, el);
    return el;
  };
  const text = (testid: string, placeholder = "") => h("input", { type: "text", placeholder, "data-testid": testid });
  const labelled = (label: string, control: HTMLElement, path: string, hint = "", wide = false) =>
    h(
      "label",
      { class: wide ? "form-field wide-field" : "form-field" },
      h("span", {}, label),
      control,
      hint ? h("span", { class: "muted" }, hint) : null,
      slot(path),
    );

  const name = text("method-name", "e.g. my-sft");
  const displayName = text("method-display-name", "shown in pickers");
  const description = h("textarea", { rows: 2, "data-testid": "method-description", class: "wide" });
  const trainingType = h(
    "select",
    { "data-testid": "method-training-type" },
    ...TRAINING_TYPES.map((t) => h("option", { value: t }, t)),
  );
  const lifecycle = h(
    "select",
    { "data-testid": "method-lifecycle", onchange: () => syncStages() },
    ...LIFECYCLES.map(([v, label]) => h("option", { value: v }, label)),
  );
  const deployment = h(
    "select",
    { "data-testid": "method-deployment-environment", onchange: () => syncStages() },
    h("option", { value: "builtin" }, "builtin (the platform's inference server)"),
    h("option", { value: "custom" }, "custom (your deployment file)"),
  );
  const deploymentField = labelled("Deployment environment", deployment, "deployment_environment");

  const stageInputs = new Map<string, { file: HTMLInputElement; env: HTMLInputElement; row: HTMLElement[]; note: HTMLElement }>();
  const stageGrid = h(
    "div",
    { class: "stage-grid" },
    h("span", { class: "muted" }, "Stage"),
    h("span", { class: "muted" }, "Python file (relative to the methods directory)"),
    h("span", { class: "muted" }, "Conda environment"),
  );
  for (const s of STAGES) {
    const file = text(`stage-${s.stage}-file`, `${s.stage}.py`);
    const env = text(`stage-${s.stage}-env`, "env name");
    const note = h("span", { class: "muted" });
    const row = [
      h("div", {}, h("div", { class: "mono" }, s.label), note, slot(`stages.${s.stage}`)),
      h("div", {}, file, slot(`stages.${s.stage}.file`)),
      h("div", {}, env, slot(`stages.${s.stage}.env`)),
    ];
    stageGrid.append(...row);
    stageInputs.set(s.stage, { file, env, row, note });
  }

  function syncStages(): void {
    deploymentField.hidden = lifecycle.value !== "live";
    for (const s of STAGES) {
      const found = stageInputs.get(s.stage)!;
      const shown = s.shown(lifecycle.value, deployment.value);
      for (const el of found.row) el.hidden = !shown;
      found.note.textContent = s.note(lifecycle.value, deployment.value);
    }
  }

  // parameters: an editable list of parameter specs (params.parse_param_spec's keys)
  interface ParamRow {
    read: () => Record<string, unknown>; // the spec as sent
    raw: () => Record<string, string>; // the inputs as typed, to rebuild the rows after a removal
  }
  const paramRows: ParamRow[] = [];
  const paramList = h("div", { class: "param-editor", "data-testid": "method-params" });
  function removeParam(index: number): void {
    // slots and test ids are keyed by index (parameters[i], as the API names them): rebuild the rows
    const kept = paramRows.map((r) => r.raw()).filter((_, j) => j !== index);
    for (const path of [...slots.keys()]) if (path.startsWith("parameters[")) slots.delete(path);
    clear(paramList);
    paramRows.length = 0;
    for (const data of kept) addParamRow(data);
  }
  function addParamRow(initial: Record<string, string> = {}): void {
    const i = paramRows.length;
    const p = `parameters[${i}]`;
    const input = (key: string, placeholder = "", cls = "") =>
      h("input", { type: "text", placeholder, class: cls || undefined, value: initial[key] ?? "", "data-testid": `param-${i}-${key}` });
    const pname = input("name", "snake_case");
    const ptype = h(
      "select",
      { "data-testid": `param-${i}-type` },
      ...PARAM_TYPES.map((t) => h("option", { value: t, selected: t === (initial.type ?? "float") }, t)),
    );
    const pdefault = input("default", "none: required");
    const pmin = input("min");
    const pmax = input("max");
    const pchoices = input("choices", "a, b, c");
    const pgroup = h(
      "select",
      { "data-testid": `param-${i}-group` },
      ...["basic", "advanced"].map((g) => h("option", { value: g, selected: g === (initial.group ?? "basic") }, g)),
    );
    const paliases = input("aliases", "alias_one, alias_two");
    const phelp = input("help", "what it does", "wide");
    const f = (label: string, control: HTMLElement, key: string) =>
      h("label", { class: "form-field" }, h("span", {}, label), control, slot(`${p}.${key}`));
    const el = h(
      "div",
      { class: "param-editor-row", "data-testid": `param-row-${i}` },
      f("Name", pname, "name"),
      f("Type", ptype, "type"),
      f("Default", pdefault, "default"),
      f("Min", pmin, "min"),
      f("Max", pmax, "max"),
      f("Choices", pchoices, "choices"),
      f("Group", pgroup, "group"),
      f("Aliases", paliases, "aliases"),
      f("Help", phelp, "help"),
      h(
        "button",
        {
          type: "button",
          "data-testid": `param-${i}-remove`,
          onclick: () => removeParam(i),
        },
        "Remove",
      ),
      slot(p),
    );
    const list = (s: string) =>
      s
        .split(",")
        .map((x) => x.trim())
        .filter(Boolean);
    const typed = (s: string, type: string): unknown => {
      // the value as JSON would carry it; anything unparsable goes as written, for the server to name
      const t = s.trim();
      if (type === "int" || type === "float") return t !== "" && Number.isFinite(Number(t)) ? Number(t) : s;
      if (type === "bool") return t === "true" ? true : t === "false" ? false : s;
      return s;
    };
    const raw = () => ({
      name: pname.value,
      type: ptype.value,
      default: pdefault.value,
      min: pmin.value,
      max: pmax.value,
      choices: pchoices.value,
      group: pgroup.value,
      aliases: paliases.value,
      help: phelp.value,
    });
    const read = () => {
      const spec: Record<string, unknown> = { name: pname.value.trim(), type: ptype.value, group: pgroup.value };
      if (pdefault.value.trim() !== "") spec.default = typed(pdefault.value, ptype.value);
      if (pmin.value.trim() !== "") spec.min = typed(pmin.value, "float");
      if (pmax.value.trim() !== "") spec.max = typed(pmax.value, "float");
      if (list(pchoices.value).length) spec.choices = list(pchoices.value);
      if (list(paliases.value).length) spec.aliases = list(paliases.value);
      if (phelp.value.trim()) spec.help = phelp.value.trim();
      return spec;
    };
    paramRows.push({ read, raw });
    paramList.append(el);
  }

  const summary = h("div", {});
  const submit = h("button", { type: "submit", class: "primary", "data-testid": "method-submit" }, "Add method");

  function showViolations(err: unknown): void {
    for (const el of slots.values()) clear(el);
    for (const el of document.querySelectorAll(".has-error")) el.classList.remove("has-error");
    const unplaced: string[] = [];
    const violations = err instanceof ApiError ? err.violations : [];
    for (const v of violations) {
      // the nearest slot: definition.stages.training.file, else definition.stages.training, ...
      let path = v.field.replace(/^definition\.?/, "").replace(/^stages\.inference-(customized|complete)/, "stages.inference_$1");
      let target: HTMLElement | undefined;
      while (path && !(target = slots.get(path))) path = path.replace(/(\.[^.[]*|\[\d+\])$/, "");
      if (target) {
        target.append(h("div", {}, v.description));
        target.parentElement?.classList.add("has-error");
      } else {
        unplaced.push(`${v.field}: ${v.description}`);
      }
    }
    clear(
      summary,
      errorBox(
        violations.length && !unplaced.length
          ? `${describeError(err)}`
          : unplaced.length
            ? `${unplaced.join("; ")} (HTTP ${(err as ApiError).status})`
            : describeError(err),
      ),
    );
  }

  const form = h(
    "form",
    {
      class: "card op-form",
      novalidate: true,
      "data-testid": "method-form",
      onsubmit: async (e: Event) => {
        e.preventDefault();
        const definition: Record<string, unknown> = {
          name: name.value.trim(),
          training_type: trainingType.value,
          lifecycle: lifecycle.value,
        };
        if (displayName.value.trim()) definition.display_name = displayName.value.trim();
        if (description.value.trim()) definition.description = description.value.trim();
        if (lifecycle.value === "live") definition.deployment_environment = deployment.value;
        const stages: Record<string, Record<string, string>> = {};
        for (const s of STAGES) {
          if (!s.shown(lifecycle.value, deployment.value)) continue;
          const { file, env } = stageInputs.get(s.stage)!;
          const entry: Record<string, string> = {};
          if (file.value.trim()) entry.file = file.value.trim();
          if (env.value.trim()) entry.env = env.value.trim();
          // training is always sent (the server names what it lacks); the others only when filled in
          if (s.stage === "training" || Object.keys(entry).length) stages[s.stage] = entry;
        }
        definition.stages = stages;
        if (paramRows.length) definition.parameters = paramRows.map((r) => r.read());
        submit.disabled = true;
        submit.textContent = "Adding…";
        try {
          const created = await createMethod(definition);
          onCreated(created);
        } catch (err) {
          showViolations(err);
        } finally {
          submit.disabled = false;
          submit.textContent = "Add method";
        }
      },
    },
    h("h2", {}, "Add New Method"),
    h(
      "p",
      { class: "muted" },
      "Register your own training code (seed 003): the stages the lifecycle needs, and the parameters your code reads (as environment variables, e.g. learning_rate as LEARNING_RATE). Without parameters the method takes DeepExtension's generic table.",
    ),
    h("div", { class: "form-section" }, h("h3", {}, "Basic information"),
      h(
        "div",
        { class: "form-row" },
        labelled("Training name *", name, "name", "a-z, 0-9, - and _"),
        labelled("Display name", displayName, "display_name"),
        labelled("Training type *", trainingType, "training_type"),
        labelled("Description", description, "description", "", true),
      ),
    ),
    h(
      "div",
      { class: "form-section" },
      h("h3", {}, "Lifecycle"),
      h("div", { class: "form-row" }, labelled("Lifecycle *", lifecycle, "lifecycle"), deploymentField),
    ),
    h("div", { class: "form-section" }, h("h3", {}, "Python files"), slot("stages"), stageGrid),
    h(
      "div",
      { class: "form-section" },
      h("h3", {}, "Parameters"),
      slot("parameters"),
      paramList,
      h(
        "button",
        {
          type: "button",
          "data-testid": "method-add-param",
          onclick: () => addParamRow(),
        },
        "Add parameter",
      ),
    ),
    h(
      "div",
      { class: "form-actions" },
      submit,
      h("button", { type: "button", "data-testid": "method-cancel", onclick: onCancel }, "Cancel"),
    ),
    summary,
  );
  syncStages();
  return form;
}
