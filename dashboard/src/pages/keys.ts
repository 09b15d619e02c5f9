// The API Keys page (#/keys): the keys with a role in the projects the caller administers (a superuser: all),
// a new key whose secret is shown exactly once, and revocation. Project admins and superusers only; the API
// refuses anyone else too, but they are told up front which role they lack.

import "./datasets.css";

import { describeError, getJson, request, sendJson, type Principal, type ProjectRole } from "../api";
import { clear, errorBox, h } from "../dom";
import * as fmt from "../format";

interface ApiKey {
  id: string;
  name: string;
  kind: string; // user, service
  superuser: boolean;
  roles: ProjectRole[];
  create_time?: string;
  revoke_time?: string;
  created_by: string;
}

const ROLES = ["viewer", "member", "admin"];
const KINDS: [kind: string, label: string][] = [
  ["user", "user (a person)"],
  ["service", "service (a program, CI)"],
];

function roleIn(who: Principal, project: string): string {
  return who.key.roles.find((r) => r.project_id === project)?.role ?? "";
}

export function canManageKeys(who: Principal): boolean {
  return who.key.superuser || roleIn(who, who.project_id) === "admin";
}

async function listKeys(includeRevoked: boolean): Promise<ApiKey[]> {
  const keys: ApiKey[] = [];
  let token = "";
  do {
    const query = new URLSearchParams({ page_size: "500", include_revoked: String(includeRevoked) });
    if (token) query.set("page_token", token);
    const page = await getJson<{ keys: ApiKey[]; next_page_token: string }>(`/api/v1/keys?${query}`);
    keys.push(...(page.keys ?? []));
    token = page.next_page_token ?? "";
  } while (token);
  return keys;
}

/** The clipboard API where the browser allows it, else the selected text and execCommand. */
async function copy(input: HTMLInputElement): Promise<void> {
  try {
    await navigator.clipboard.writeText(input.value);
    return;
  } catch (err) {
    input.focus();
    input.select();
    if (!document.execCommand("copy")) throw new Error(`the browser refused the clipboard (${describeError(err)})`);
  }
}

export function keysPage(main: HTMLElement, who: Principal): () => void {
  main.classList.add("ds-page");
  if (!canManageKeys(who)) {
    const role = roleIn(who, who.project_id);
    clear(
      main,
      h("div", { class: "page-head" }, h("h1", {}, "API Keys")),
      h(
        "div",
        { class: "ds-notice", "data-testid": "keys-forbidden" },
        h("p", {}, `Managing API keys needs the admin role in project ${who.project_id} (or a superuser key).`),
        h(
          "p",
          { class: "muted" },
          `You are signed in as ${who.key.name}, ${role ? `with the ${role} role` : "with no role"} in ${who.project_id}. ` +
            "Ask a project admin for a key with the admin role, or switch to a project you administer.",
        ),
      ),
    );
    return () => {};
  }

  let keys: ApiKey[] = [];
  let showRevoked = true;
  let stopped = false;
  const project = who.project_id;

  const errors = h("div", {});
  const secretBox = h("div", { "data-testid": "key-secret-box" });
  const body = h("tbody", {});
  const status = h("div", { class: "status", "data-testid": "keys-status" }, "Loading the keys…");

  // -- create -------------------------------------------------------------------------------------------
  const nameInput = h("input", { type: "text", id: "key-name", required: true, maxlength: 255, placeholder: "e.g. ci-pipeline or alice", "data-testid": "key-name" });
  const kindSelect = h("select", { id: "key-kind", "data-testid": "key-kind" }, ...KINDS.map(([k, label]) => h("option", { value: k }, label)));
  const roleSelect = h(
    "select",
    { id: "key-role", "data-testid": "key-role" },
    ...ROLES.map((r) => h("option", { value: r, selected: r === "member" }, r)),
  );
  const superuser = h("input", { type: "checkbox", id: "key-superuser", "data-testid": "key-superuser" });
  const create = h("button", { type: "submit", class: "primary", "data-testid": "key-create" }, "Create key");
  const createErrors = h("div", {});
  const form = h(
    "form",
    {
      class: "key-form",
      onsubmit: async (e: Event) => {
        e.preventDefault();
        create.disabled = true;
        clear(createErrors);
        try {
          const made = await sendJson<ApiKey & { secret: string }>("/api/v1/keys", {
            name: nameInput.value.trim(),
            kind: kindSelect.value,
            roles: { [project]: roleSelect.value },
            superuser: superuser.checked,
          });
          showSecret(made);
          nameInput.value = "";
          superuser.checked = false;
          await refresh();
        } catch (err) {
          clear(createErrors, errorBox(`Could not create the key: ${describeError(err)}`));
        } finally {
          create.disabled = false;
        }
      },
    },
    h("label", { for: "key-name" }, "Name", nameInput),
    h("label", { for: "key-kind" }, "Kind", kindSelect),
    h("label", { for: "key-role" }, `Role in ${project}`, roleSelect),
    // Only a superuser may grant superuser (the API says so too).
    who.key.superuser ? h("label", { for: "key-superuser", class: "check" }, superuser, "Superuser (admin of every project)") : null,
    create,
  );

  function showSecret(made: ApiKey & { secret: string }): void {
    const secret = h("input", { type: "text", readonly: true, value: made.secret, "data-testid": "key-secret", "aria-label": "The new key's secret" });
    const copied = h("span", { class: "muted", "data-testid": "key-copy-state" });
    clear(
      secretBox,
      h(
        "div",
        { class: "key-secret", role: "status" },
        h("strong", {}, `Key ${made.name} (${made.id}) was created. Copy its secret now: it won't be shown again.`),
        h(
          "div",
          { class: "secret-row" },
          secret,
          h(
            "button",
            {
              type: "button",
              "data-testid": "key-copy",
              onclick: async () => {
                try {
                  await copy(secret);
                  copied.textContent = "Copied to the clipboard.";
                } catch (err) {
                  copied.textContent = "";
                  secretBox.append(errorBox(`Could not copy: ${describeError(err)}. Select the secret and copy it by hand.`));
                }
              },
            },
            "Copy",
          ),
          copied,
        ),
        h(
          "div",
          { class: "muted" },
          "TuneForge keeps only a hash of it. Send it as `Authorization: Bearer <secret>` (or as an OpenAI client's api_key). ",
          h(
            "button",
            { type: "button", "data-testid": "key-secret-done", onclick: () => clear(secretBox) },
            "I have stored it",
          ),
        ),
      ),
    );
    secret.select();
  }

  // -- list and revoke ------------------------------------------------------------------------------------
  const revokedToggle = h("input", {
    type: "checkbox",
    checked: showRevoked,
    "data-testid": "keys-show-revoked",
    onchange: () => {
      showRevoked = revokedToggle.checked;
      void refresh();
    },
  });

  function roles(k: ApiKey): HTMLElement {
    return h(
      "div",
      {},
      k.superuser ? h("span", { class: "role-chip current" }, "superuser") : null,
      ...(k.roles ?? []).map((r) =>
        h("span", { class: r.project_id === project ? "role-chip current" : "role-chip" }, `${r.project_id}: ${r.role}`),
      ),
      !k.superuser && !(k.roles ?? []).length ? h("span", { class: "muted" }, "no roles") : null,
    );
  }

  function revokeCell(k: ApiKey): HTMLElement {
    const cell = h("td", { class: "actions" });
    if (k.revoke_time) return cell;
    const ask = () =>
      clear(
        cell,
        h(
          "span",
          { class: "ds-confirm" },
          k.id === who.key.id ? "This is the key you are signed in with. Revoke it? " : `Revoke ${k.name}? `,
          h(
            "button",
            {
              class: "ds-danger",
              "data-testid": "key-revoke-confirm",
              onclick: async (e: Event) => {
                (e.target as HTMLButtonElement).disabled = true;
                try {
                  await request(`/api/v1/keys/${encodeURIComponent(k.id)}`, { method: "DELETE" });
                  await refresh();
                } catch (err) {
                  clear(errors, errorBox(`Could not revoke ${k.name}: ${describeError(err)}`));
                  idle();
                }
              },
            },
            "Yes, revoke",
          ),
          h("button", { "data-testid": "key-revoke-cancel", onclick: () => idle() }, "Cancel"),
        ),
      );
    const idle = () => clear(cell, h("button", { class: "ds-danger", "data-testid": "key-revoke", onclick: ask }, "Revoke"));
    idle();
    return cell;
  }

  function row(k: ApiKey): HTMLElement {
    return h(
      "tr",
      { "data-key-id": k.id, class: k.revoke_time ? "revoked" : undefined },
      h(
        "td",
        {},
        h("span", { class: "job-name" }, k.name),
        k.id === who.key.id ? h("span", { class: "muted" }, " (this key)") : null,
        h("div", { class: "muted mono" }, k.id),
      ),
      h("td", {}, k.kind || "–"),
      h("td", {}, roles(k)),
      h("td", {}, fmt.time(k.create_time)),
      h("td", { class: "mono" }, k.created_by || "–"),
      h(
        "td",
        { "data-testid": "key-state" },
        k.revoke_time
          ? h("span", {}, h("span", { class: "state state-revoked" }, "REVOKED"), h("div", { class: "muted" }, fmt.time(k.revoke_time)))
          : h("span", { class: "state state-active" }, "ACTIVE"),
      ),
      revokeCell(k),
    );
  }

  function render(): void {
    clear(
      body,
      ...(keys.length ? keys.map(row) : [h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No keys."))]),
    );
    const active = keys.filter((k) => !k.revoke_time).length;
    clear(status, `${active} active, ${keys.length - active} revoked shown · refreshed ${new Date().toLocaleTimeString()}`);
  }

  async function refresh(): Promise<void> {
    try {
      const found = await listKeys(showRevoked);
      if (stopped) return;
      // Active first, then newest first.
      keys = found.sort(
        (a, b) => Number(!!a.revoke_time) - Number(!!b.revoke_time) || (b.create_time ?? "").localeCompare(a.create_time ?? ""),
      );
      render();
      clear(errors);
    } catch (err) {
      clear(errors, errorBox(`Could not list the keys: ${describeError(err)}`));
    }
  }

  clear(
    main,
    h("div", { class: "page-head" }, h("h1", {}, "API Keys"), h("span", { class: "spacer" }), h("label", {}, revokedToggle, " Show revoked keys")),
    secretBox,
    h(
      "section",
      { class: "card upload-panel" },
      h("h2", {}, "Create a key"),
      h("p", { class: "muted" }, `The new key gets the chosen role in ${project}. Its secret is shown once, right after it is made.`),
      form,
      createErrors,
    ),
    errors,
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "jobs keys", "data-testid": "keys" },
        h("thead", {}, h("tr", {}, ...["Name / ID", "Kind", "Roles", "Created", "Created by", "Status", ""].map((c) => h("th", {}, c)))),
        body,
      ),
    ),
    status,
  );
  void refresh();
  return () => {
    stopped = true;
  };
}
