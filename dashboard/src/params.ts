// A method's parameter schema (ParameterSpec) as form fields, and the pure check of a value against its spec.
// The page that shows the form knows nothing about any method: every field, default, bound and help text comes
// from the spec the catalog serves, so an added method's parameters get the same form as a built-in's.

import type { ParameterSpec } from "./api";
import { clear, h } from "./dom";

export type ParamKind = "int" | "float" | "bool" | "string";

/** The spec's type; the gateway writes it in lower case ("int"), older callers in upper ("INT"). */
export function kindOf(spec: ParameterSpec): ParamKind {
  const t = String(spec.type ?? "").toLowerCase();
  return t === "int" || t === "float" || t === "bool" ? t : "string";
}

/** The spec's default as the form holds it (a missing default is the type's empty value). */
export function defaultOf(spec: ParameterSpec): unknown {
  const d = spec.default_value;
  if (d !== undefined && d !== null) return d;
  return { int: undefined, float: undefined, bool: false, string: "" }[kindOf(spec)];
}

const bound = (n: number): string => String(n);

/** Why `value` is not acceptable for `spec` (type, integer-ness, choices, range, required), or null if it is.
 * Worded as the server words the same refusals, so a message reads the same wherever it was caught. */
export function validateValue(spec: ParameterSpec, value: unknown): string | null {
  const kind = kindOf(spec);
  const empty = value === undefined || value === null || (kind === "string" && value === "");
  if (empty) {
    if (spec.required) return "is required";
    if (kind === "int") return "expected an integer";
    if (kind === "float") return "expected a number";
    return null;
  }
  if (kind === "bool") return typeof value === "boolean" ? null : "expected true or false";
  if (kind === "string") {
    if (typeof value !== "string") return "expected a string";
  } else {
    if (typeof value !== "number" || !Number.isFinite(value)) {
      return kind === "int" ? "expected an integer" : "expected a finite number";
    }
    if (kind === "int" && !Number.isInteger(value)) return `expected an integer, got ${value}`;
  }
  const choices = spec.choices ?? [];
  if (choices.length && !choices.includes(value as string)) return `must be one of ${choices.join(", ")}`;
  if (typeof value === "number") {
    if (spec.minimum !== undefined && spec.minimum !== null && value < spec.minimum)
      return `must be >= ${bound(spec.minimum)}, got ${value}`;
    if (spec.maximum !== undefined && spec.maximum !== null && value > spec.maximum)
      return `must be <= ${bound(spec.maximum)}, got ${value}`;
  }
  return null;
}

/** What the user typed (or ticked) as the spec's type; `value` is undefined when it is not one at all. */
export function parseInput(spec: ParameterSpec, raw: string | boolean): { value: unknown; error: string | null } {
  const kind = kindOf(spec);
  if (kind === "bool") {
    const value = typeof raw === "boolean" ? raw : raw === "true";
    return { value, error: validateValue(spec, value) };
  }
  const text = String(raw);
  if (kind === "string") return { value: text, error: validateValue(spec, text) };
  const trimmed = text.trim();
  // Number("") is 0 and Number("0x10") is 16: accept only what reads as a decimal number.
  const number = /^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i.test(trimmed) ? Number(trimmed) : NaN;
  if (trimmed === "") return { value: undefined, error: validateValue(spec, undefined) };
  if (!Number.isFinite(number)) {
    return { value: undefined, error: `${kind === "int" ? "expected an integer" : "expected a number"}, got "${trimmed}"` };
  }
  return { value: number, error: validateValue(spec, number) };
}

/** The text an input shows for a value. */
export function showValue(value: unknown): string {
  if (value === undefined || value === null) return "";
  return String(value);
}

/** Whether two parameter values are the same setting (1 and 1.0 are; the API writes every number as a double). */
export function sameValue(a: unknown, b: unknown): boolean {
  if (typeof a === "number" && typeof b === "number") return a === b;
  return a === b;
}

/** "integer · 1 – 256 · default 8": what the field takes, under it. */
export function rangeHint(spec: ParameterSpec): string {
  const kind = kindOf(spec);
  const parts: string[] = [{ int: "integer", float: "number", bool: "true / false", string: "text" }[kind]];
  const lo = spec.minimum ?? null;
  const hi = spec.maximum ?? null;
  if (lo !== null && hi !== null) parts.push(`${bound(lo)} – ${bound(hi)}`);
  else if (lo !== null) parts.push(`≥ ${bound(lo)}`);
  else if (hi !== null) parts.push(`≤ ${bound(hi)}`);
  if (spec.choices?.length) parts.push(`one of ${spec.choices.length}`);
  const d = defaultOf(spec);
  if (kind !== "bool") parts.push(d === "" || d === undefined ? "no default" : `default ${showValue(d)}`);
  else parts.push(`default ${d ? "on" : "off"}`);
  if (spec.required) parts.push("required");
  return parts.join(" · ");
}

interface Field {
  spec: ParameterSpec;
  value: unknown;
  clientError: string | null;
  serverError: string | null;
  row: HTMLElement;
  input: HTMLInputElement | HTMLSelectElement;
  message: HTMLElement;
}

/**
 * The form for a method's parameters: basic ones shown, advanced ones in a collapsible group, each field
 * pre-filled (with `initial` where it has the name, else the default) and checked on every keystroke.
 * `base` is what "changed" is measured against: the defaults for a new train, the old job's values for a copy.
 */
export class ParameterForm {
  readonly element: HTMLElement;
  private readonly fields = new Map<string, Field>();
  private readonly advanced: HTMLDetailsElement | null;

  constructor(
    specs: ParameterSpec[],
    initial: Record<string, unknown>,
    private readonly base: Record<string, unknown>,
    private readonly onChange: (name: string) => void,
  ) {
    const basic = specs.filter((s) => (s.group || "basic") !== "advanced");
    const advanced = specs.filter((s) => s.group === "advanced");
    const grid = (list: ParameterSpec[]) =>
      h("div", { class: "param-grid" }, ...list.map((s) => this.field(s, s.name in initial ? initial[s.name] : defaultOf(s))));
    const basicGrid = grid(basic);
    this.advanced = advanced.length
      ? h(
          "details",
          { class: "param-advanced", "data-testid": "advanced-params" },
          h("summary", { "data-testid": "advanced-toggle" }, `Advanced parameters (${advanced.length})`),
          grid(advanced),
        )
      : null;
    this.element = h(
      "div",
      { class: "param-form", "data-testid": "params" },
      specs.length ? basicGrid : h("p", { class: "muted" }, "This method takes no parameters."),
      this.advanced,
    );
    for (const f of this.fields.values()) this.paint(f);
  }

  private baseOf(spec: ParameterSpec): unknown {
    return spec.name in this.base ? this.base[spec.name] : defaultOf(spec);
  }

  private field(spec: ParameterSpec, value: unknown): HTMLElement {
    const kind = kindOf(spec);
    const id = `param-${spec.name}`;
    const testid = { "data-testid": `param-${spec.name}`, id, name: spec.name };
    let input: HTMLInputElement | HTMLSelectElement;
    if (kind === "bool") {
      input = h("input", { ...testid, type: "checkbox", checked: value === true });
    } else if (spec.choices?.length) {
      const options = [...spec.choices];
      // A copied job's value the spec no longer offers is still shown (and flagged), not silently replaced.
      if (typeof value === "string" && !options.includes(value)) options.unshift(value);
      input = h("select", testid, ...options.map((c) => h("option", { value: c, selected: c === value }, c)));
    } else {
      input = h("input", {
        ...testid,
        type: "text",
        inputmode: kind === "string" ? undefined : "decimal",
        autocomplete: "off",
        spellcheck: "false",
        value: showValue(value),
      });
    }
    const message = h("div", { class: "field-error", "data-testid": `param-error-${spec.name}`, role: "alert" });
    const reset = h(
      "button",
      {
        type: "button",
        class: "param-reset",
        title: "Back to the value this form started from",
        "data-testid": `param-reset-${spec.name}`,
        onclick: () => this.set(spec.name, this.baseOf(spec)),
      },
      "↺",
    );
    const row = h(
      "div",
      { class: "param", "data-param": spec.name, "data-testid": `field-${spec.name}` },
      h(
        "div",
        { class: "param-head" },
        h("label", { for: id, class: "mono" }, spec.name, spec.required ? h("span", { class: "req" }, " *") : null),
        reset,
      ),
      input,
      h("div", { class: "hint" }, rangeHint(spec)),
      spec.help ? h("div", { class: "help" }, spec.help) : null,
      message,
    );
    const f: Field = { spec, value, clientError: validateValue(spec, value), serverError: null, row, input, message };
    const read = () => {
      const raw = input instanceof HTMLInputElement && input.type === "checkbox" ? input.checked : input.value;
      const parsed = parseInput(spec, raw);
      // "change" follows "input" when the field loses focus: the same value again is no change
      if (sameValue(parsed.value, f.value) && parsed.error === f.clientError && !f.serverError) return;
      f.value = parsed.value;
      f.clientError = parsed.error;
      f.serverError = null; // the server's word was about the old value
      this.paint(f);
      this.onChange(spec.name);
    };
    input.addEventListener("input", read);
    input.addEventListener("change", read);
    this.fields.set(spec.name, f);
    return row;
  }

  private paint(f: Field): void {
    const error = f.clientError ?? f.serverError;
    clear(f.message, error ?? "");
    f.message.hidden = !error;
    f.row.classList.toggle("invalid", !!error);
    f.input.setAttribute("aria-invalid", String(!!error));
    f.row.classList.toggle("changed", !f.clientError && !sameValue(f.value, this.baseOf(f.spec)));
    f.row.dataset.state = f.clientError ? "invalid" : f.serverError ? "refused" : "valid";
  }

  /** Set a field's value as if the user had entered it. */
  set(name: string, value: unknown): void {
    const f = this.fields.get(name);
    if (!f) return;
    if (f.input instanceof HTMLInputElement && f.input.type === "checkbox") f.input.checked = value === true;
    else f.input.value = showValue(value);
    f.value = value;
    f.clientError = validateValue(f.spec, value);
    f.serverError = null;
    this.paint(f);
    this.onChange(name);
  }

  has(name: string): boolean {
    return this.fields.has(name);
  }

  value(name: string): unknown {
    return this.fields.get(name)?.value;
  }

  /** The names of the fields whose value is invalid now (the Run button waits for none). */
  invalid(): string[] {
    return [...this.fields.values()].filter((f) => f.clientError).map((f) => f.spec.name);
  }

  /** Every value that differs from `base` (the defaults, or the copied job's values): what the request sends. */
  changed(): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    for (const f of this.fields.values()) {
      if (!sameValue(f.value, this.baseOf(f.spec))) out[f.spec.name] = f.value;
    }
    return out;
  }

  /** Every value, changed or not. */
  values(): Record<string, unknown> {
    return Object.fromEntries([...this.fields.values()].map((f) => [f.spec.name, f.value]));
  }

  /** The server's refusals by parameter name (replacing the previous ones); an advanced one opens its group. */
  setServerErrors(errors: Map<string, string>): void {
    for (const f of this.fields.values()) {
      const next = errors.get(f.spec.name) ?? null;
      if (next === f.serverError) continue;
      f.serverError = next;
      this.paint(f);
      if (next && f.spec.group === "advanced" && this.advanced) this.advanced.open = true;
    }
  }
}
