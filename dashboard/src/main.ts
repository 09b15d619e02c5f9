// The dashboard's shell: sign-in, the top bar (project switcher, sign-out) and the hash router.
// Pages live in src/pages/; each renders into the main element and returns a cleanup (timers, streams).

import "uplot/dist/uPlot.min.css";
import "./style.css";

import { describeError, session, whoami, type Principal } from "./api";
import { clear, errorBox, h } from "./dom";
import { jobDetailsPage } from "./pages/details";
import { jobsPage } from "./pages/jobs";

export type Cleanup = () => void;

const root = document.getElementById("app")!;
let cleanup: Cleanup | null = null;
let principal: Principal | null = null;

function signInPage(message = ""): void {
  const input = h("input", {
    type: "password",
    id: "api-key",
    name: "api-key",
    placeholder: "tf_…",
    autocomplete: "off",
    required: true,
    "data-testid": "api-key",
  });
  const status = h("div", { class: "signin-status" }, message ? errorBox(message) : null);
  const button = h("button", { type: "submit", class: "primary", "data-testid": "sign-in" }, "Sign in");
  const form = h(
    "form",
    {
      class: "signin",
      onsubmit: async (e: Event) => {
        e.preventDefault();
        const key = input.value.trim();
        button.disabled = true;
        clear(status, "Checking the key…");
        try {
          const who = await whoami(key);
          session.signIn(key, who.project_id);
          principal = who;
          route();
        } catch (err) {
          clear(status, errorBox(describeError(err)));
        } finally {
          button.disabled = false;
        }
      },
    },
    h("h1", {}, "TuneForge"),
    h("p", { class: "muted" }, "Sign in with an API key. `tuneforge up` prints the admin key on its first start."),
    h("label", { for: "api-key" }, "API key"),
    input,
    button,
    status,
  );
  clear(root, h("main", { class: "signin-page" }, form));
  input.focus();
}

function projectChoices(who: Principal): string[] {
  const ids = new Set(who.key.roles.map((r) => r.project_id));
  ids.add(who.project_id);
  return [...ids].filter(Boolean).sort();
}

function topBar(who: Principal): HTMLElement {
  const roles = new Map(who.key.roles.map((r) => [r.project_id, r.role]));
  const select = h(
    "select",
    {
      "data-testid": "project",
      title: "Project",
      onchange: (e: Event) => {
        session.setProject((e.target as HTMLSelectElement).value);
        principal = null; // the role may differ per project: ask again
        route();
      },
    },
    ...projectChoices(who).map((p) =>
      h("option", { value: p, selected: p === who.project_id }, `${p}${roles.get(p) ? ` (${roles.get(p)})` : ""}`),
    ),
  );
  return h(
    "header",
    { class: "topbar" },
    h("a", { class: "brand", href: "#/jobs" }, "TuneForge"),
    h("nav", {}, h("a", { href: "#/jobs", class: "active" }, "Model Training")),
    h("span", { class: "spacer" }),
    h("label", { class: "project" }, "Project ", select),
    h(
      "span",
      { class: "who", "data-testid": "who" },
      `${who.key.name}${who.key.superuser ? " (superuser)" : ""}`,
    ),
    h(
      "button",
      {
        "data-testid": "sign-out",
        onclick: () => {
          session.signOut();
          principal = null;
          location.hash = "";
          route();
        },
      },
      "Sign out",
    ),
  );
}

async function route(): Promise<void> {
  cleanup?.();
  cleanup = null;
  if (!session.key) return signInPage();
  if (!principal) {
    try {
      principal = await whoami();
    } catch (err) {
      session.signOut();
      return signInPage(`Signed out: ${describeError(err)}`);
    }
  }
  const main = h("main", { class: "page" });
  clear(root, topBar(principal), main);
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  try {
    if (parts[0] === "jobs" && parts[1]) cleanup = jobDetailsPage(main, parts[1], parts[2] ?? "overview");
    else cleanup = jobsPage(main);
  } catch (err) {
    clear(main, errorBox(describeError(err)));
  }
}

window.addEventListener("hashchange", () => void route());
window.addEventListener("unhandledrejection", (e) => {
  root.prepend(errorBox(`Unexpected error: ${describeError(e.reason)}`));
});
void route();
