// A few lines of DOM building, so pages read as the markup they make.

type Child = Node | string | number | null | undefined | false;
type Attrs = Record<string, string | number | boolean | EventListener | undefined | null>;

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (typeof value === "function") el.addEventListener(name.replace(/^on/, "").toLowerCase(), value);
    else if (name === "class") el.className = String(value);
    else if (name in el && typeof value !== "string") (el as unknown as Record<string, unknown>)[name] = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, ...children);
  return el;
}

export function append(el: Element, ...children: Child[]): void {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
}

export function clear(el: Element, ...children: Child[]): void {
  el.replaceChildren();
  append(el, ...children);
}

/** An error box: every failure the user should know of goes through one of these. */
export function errorBox(message: string): HTMLElement {
  return h("div", { class: "error", role: "alert", "data-testid": "error" }, message);
}

/** A labelled checkbox that tells onChange its new state. */
export function checkbox(label: string, testid: string, onChange: (checked: boolean) => void): HTMLLabelElement {
  return h(
    "label",
    {},
    h("input", {
      type: "checkbox",
      "data-testid": testid,
      onchange: (e: Event) => onChange((e.target as HTMLInputElement).checked),
    }),
    ` ${label}`,
  );
}
