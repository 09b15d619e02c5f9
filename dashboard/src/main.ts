// The dashboard's shell: sign-in, the top bar (project switcher, sign-out) and the hash router.
// Pages live in src/pages/; each renders into the main element and returns a cleanup (timers, streams).

import "uplot/dist/uPlot.min.css";
import "./style.css";

import { describeError, getJson, session, whoami, type Principal } from "./api";
import { clear, errorBox, h } from "./dom";
import { comparePage } from "./pages/compare";
import { datasetDetailsPage, datasetsPage } from "./pages/datasets";
import { jobDetailsPage } from "./pages/details";
import { jobsPage } from "./pages/jobs";
import { methodsPage } from "./pages/methods";
import { modelsPage } from "./pages/models";
import { newTrainPage } from "./pages/newtrain";
import { keysPage } from "./pages/keys";

export type Cleanup = () => void;

/** A page renders into main from the route's arguments (#/<route>/<args…>) and returns its cleanup, if any. */
export type Page = (main: HTMLElement, args: string[], who: Principal) => Cleanup | void;

// Each page's module adds one line here; the nav below lists the top-level ones.
const ROUTES: Record<string, Page> = {
  jobs: (main, args) => (args[0] ? jobDetailsPage(main, args[0], args[1] ?? "overview") : jobsPage(main)),
  models: modelsPage,
  methods: methodsPage,
  new: (main, args) => newTrainPage(main, args),
  compare: (main, args) => comparePage(main, args[0] ?? ""),
  datasets: (main, args) => (args[0] ? datasetDetailsPage(main, args[0]) : datasetsPage(main)),
  keys: (main, _args, who) => keysPage(main, who),
};

const NAV: [route: string, label: string][] = [
  ["jobs", "Model Training"],
  ["new", "Start a New Train"],
  ["models", "Models"],
  ["datasets", "Datasets"],
  ["methods", "Methods"],
  ["keys", "API Keys"],
];

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
          principal = null; // route() asks again, with the key now stored, and lists the projects
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

// The projects the key has a role in (whoami); a superuser's also lists every project.
let projectNames = new Map<string, string>();

function projectChoices(who: Principal): string[] {
  const ids = new Set([...who.key.roles.map((r) => r.project_id), ...projectNames.keys()]);
  ids.add(who.project_id);
  return [...ids].filter(Boolean).sort();
}

async function loadAllProjects(who: Principal): Promise<string | null> {
  if (!who.key.superuser) return null;
  try {
    const found = await getJson<{ projects: { id: string; name: string }[] }>("/api/v1/projects?page_size=500");
    projectNames = new Map((found.projects ?? []).map((p) => [p.id, p.name || p.id]));
    return null;
  } catch (err) {
    return `Could not list every project (only those with a role are offered): ${describeError(err)}`;
  }
}

function topBar(who: Principal): HTMLElement {
  const roles = new Map(who.key.roles.map((r) => [r.project_id, r.role]));
  const select = h(
    "select",
    {
      "data-testid": "project",
      title: "Project",
      onchange: async (e: Event) => {
        const chosen = (e.target as HTMLSelectElement).value;
        const previous = session.project;
        session.setProject(chosen);
        try {
          principal = await whoami(); // the key's standing in the chosen project
          route();
        } catch (err) {
          session.setProject(previous);
          (e.target as HTMLSelectElement).value = previous;
          document.querySelector("main")?.prepend(errorBox(`Could not switch to ${chosen}: ${describeError(err)}`));
        }
      },
    },
    ...projectChoices(who).map((p) =>
      h(
        "option",
        { value: p, selected: p === who.project_id },
        `${projectNames.get(p) ?? p}${roles.get(p) ? ` (${roles.get(p)})` : ""}`,
      ),
    ),
  );
  return h(
    "header",
    { class: "topbar" },
    h("a", { class: "brand", href: "#/jobs" }, "TuneForge"),
    h(
      "nav",
      {},
      ...NAV.map(([route, label]) =>
        h("a", { href: `#/${route}`, class: route === currentRoute() ? "active" : undefined, "data-testid": `nav-${route}` }, label),
      ),
    ),
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

function routeParts(): string[] {
  return location.hash.replace(/^#\/?/, "").split("?")[0].split("/").map(decodeURIComponent);
}

function currentRoute(): string {
  const name = routeParts()[0];
  // a page reached from another (Compare from the list, say) keeps that one's tab lit
  return name === "compare" || !name ? "jobs" : name;
}

async function route(): Promise<void> {
  cleanup?.();
  cleanup = null;
  if (!session.key) return signInPage();
  let problem: string | null = null;
  if (!principal) {
    try {
      principal = await whoami();
    } catch (err) {
      session.signOut();
      return signInPage(`Signed out: ${describeError(err)}`);
    }
    problem = await loadAllProjects(principal);
  }
  const main = h("main", { class: "page" });
  clear(root, topBar(principal), main);
  if (problem) root.insertBefore(errorBox(problem), main);
  const [name, ...args] = routeParts();
  const page = ROUTES[name || "jobs"];
  try {
    if (page) cleanup = page(main, args.filter(Boolean), principal) ?? null;
    else clear(main, errorBox(`There is no page #/${name}.`), h("a", { href: "#/jobs" }, "Back to Model Training"));
  } catch (err) {
    clear(main, errorBox(describeError(err)));
  }
}

window.addEventListener("hashchange", () => void route());
window.addEventListener("unhandledrejection", (e) => {
  root.prepend(errorBox(`Unexpected error: ${describeError(e.reason)}`));
});
void route();
