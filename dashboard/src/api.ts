// The gateway's REST API as the dashboard calls it: the API key (sessionStorage) as a Bearer token, the
// chosen project in X-TuneForge-Project, and every failure as an ApiError carrying the API's own message.

const KEY = "tuneforge.apiKey";
const PROJECT = "tuneforge.project";

export const session = {
  get key(): string {
    return sessionStorage.getItem(KEY) ?? "";
  },
  get project(): string {
    return sessionStorage.getItem(PROJECT) ?? "";
  },
  signIn(key: string, project: string): void {
    sessionStorage.setItem(KEY, key);
    sessionStorage.setItem(PROJECT, project);
  },
  setProject(project: string): void {
    sessionStorage.setItem(PROJECT, project);
  },
  signOut(): void {
    sessionStorage.removeItem(KEY);
    sessionStorage.removeItem(PROJECT);
  },
};

/** One field the API refused, as the gateway's error body names it ("parameters.lora_rank", "dataset_id"). */
export interface FieldViolation {
  field: string;
  description: string;
}

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    /** The error body's field violations, so a form can show each under its field (empty when none). */
    readonly violations: FieldViolation[] = [],
  ) {
    super(message);
  }

  /** "CODE: message (HTTP n)", as shown to the user. */
  describe(): string {
    const http = this.status ? ` (HTTP ${this.status})` : "";
    return `${this.code}: ${this.message}${http}`;
  }
}

export function describeError(err: unknown): string {
  if (err instanceof ApiError) return err.describe();
  if (err instanceof Error) return err.message;
  return String(err);
}

function headers(key = session.key, project = session.project): Record<string, string> {
  const h: Record<string, string> = {};
  if (key) h["Authorization"] = `Bearer ${key}`;
  if (project) h["X-TuneForge-Project"] = project;
  return h;
}

async function failure(resp: Response): Promise<ApiError> {
  const text = await resp.text().catch(() => "");
  try {
    type ErrorBody = {
      error?: { code?: string; message?: string; field?: string | null; field_violations?: FieldViolation[] | null };
    };
    const { error } = JSON.parse(text) as ErrorBody;
    if (error) {
      const violations =
        error.field_violations ?? (error.field ? [{ field: error.field, description: error.message ?? "" }] : []);
      return new ApiError(resp.status, error.code ?? "ERROR", error.message ?? text, violations);
    }
  } catch {
    // not the API's JSON error body (a proxy's page, say): show its text
  }
  return new ApiError(resp.status, resp.statusText || "ERROR", text.slice(0, 300) || "no response body");
}

export async function request(path: string, init: RequestInit & { key?: string } = {}): Promise<Response> {
  const { key, ...rest } = init;
  let resp: Response;
  try {
    resp = await fetch(path, {
      ...rest,
      headers: { ...headers(key ?? session.key), ...(rest.headers as Record<string, string> | undefined) },
    });
  } catch (err) {
    throw new ApiError(0, "UNAVAILABLE", `the gateway could not be reached (${describeError(err)})`);
  }
  if (!resp.ok) throw await failure(resp);
  return resp;
}

export async function getJson<T>(path: string, key?: string): Promise<T> {
  return (await request(path, { key })).json() as Promise<T>;
}

// -- the API's shapes (the fields the dashboard reads) ---------------------------------------------------

export interface ProjectRole {
  project_id: string;
  role: string;
}

export interface Principal {
  key: { id: string; name: string; kind: string; superuser: boolean; roles: ProjectRole[] };
  project_id: string;
}

export interface Job {
  id: string;
  name: string;
  model_id: string;
  dataset_id: string;
  method_id: string;
  parameters: Record<string, unknown>;
  state: string;
  state_reason: string;
  attempt: number;
  max_attempts: number;
  priority: number;
  agent_id: string;
  output_uri: string;
  current_step: number;
  total_steps: number;
  progress_percent: number;
  create_time?: string;
  start_time?: string;
  end_time?: string;
  update_time?: string;
  submitted_by: string;
  labels: Record<string, string>;
  epoch: number;
  tokens_seen: number;
  elapsed_seconds: number;
  remaining_seconds: number;
  copied_from_job_id: string;
  resumed_from_step: number;
  validation_dataset_id: string;
  project_id: string;
  kind: string;
}

export interface JobEvent {
  seq: number;
  time: string;
  from_state: string | null;
  to_state: string;
  reason: string;
  attempt: number;
}

export interface MetricPoint {
  name: string;
  step: number;
  value: number;
  time: string;
  attempt: number;
}

export interface LogLine {
  seq: number;
  time: string;
  stream: string;
  text: string;
}

export interface Checkpoint {
  step: number;
  uri?: string;
  create_time?: string;
  metrics?: Record<string, number>;
  [field: string]: unknown;
}

export const TERMINAL_STATES = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);

export const whoami = (key?: string) => getJson<Principal>("/api/v1/whoami", key);

export function listJobs(states: string[]): Promise<{ jobs: Job[] }> {
  const query = new URLSearchParams({ page_size: "200" });
  for (const s of states) query.append("state", s);
  return getJson(`/api/v1/jobs?${query}`);
}

export const getJob = (id: string) => getJson<Job>(`/api/v1/jobs/${encodeURIComponent(id)}`);

export function jobMetrics(
  id: string,
  opts: { names?: string[]; maxPoints?: number } = {},
): Promise<{ series: Record<string, [number, number][]> }> {
  const query = new URLSearchParams();
  for (const n of opts.names ?? []) query.append("name", n);
  if (opts.maxPoints) query.set("max_points", String(opts.maxPoints));
  return getJson(`/api/v1/jobs/${encodeURIComponent(id)}/metrics?${query}`);
}

export const jobCheckpoints = (id: string) =>
  getJson<{ checkpoints: Checkpoint[] }>(`/api/v1/jobs/${encodeURIComponent(id)}/checkpoints`);

export async function jobLogText(id: string): Promise<string> {
  return (await request(`/api/v1/jobs/${encodeURIComponent(id)}/logs?format=text`)).text();
}

/** POST (or another method) with a JSON body; the answer's JSON, or null for an empty answer (204). */
export async function sendJson<T>(path: string, body: unknown, method = "POST"): Promise<T> {
  const resp = await request(path, {
    method,
    headers: { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await resp.text();
  return (text ? JSON.parse(text) : null) as T;
}

// -- the catalog, as the pickers and the catalog pages read it (enum prefixes are stripped by the gateway) --

export interface ParameterSpec {
  name: string;
  type: string; // INT, FLOAT, BOOL, STRING
  help: string;
  default_value?: unknown;
  minimum?: number;
  maximum?: number;
  choices: string[];
  env_name: string;
  aliases: string[];
  group: string; // basic, advanced
  required: boolean;
  applies_to: string[];
}

export interface Method {
  id: string;
  display_name: string;
  description: string;
  training_type: string;
  lifecycle: string;
  parameters: ParameterSpec[];
  entrypoint: string;
  builtin: boolean;
  stages?: Record<string, unknown>;
  dataset_formats: string[];
  project_id: string;
  create_time?: string;
}

export interface ModelLineage {
  base_model_id?: string;
  job_id?: string;
  checkpoint_step?: number;
  method_id?: string;
  dataset_id?: string;
  source_model_id?: string;
  operation_job_id?: string;
}

export interface Model {
  id: string;
  name: string;
  description: string;
  uri: string;
  architecture: string;
  parameter_count: number;
  context_length: number;
  dtype: string;
  has_chat_template: boolean;
  builtin: boolean;
  create_time?: string;
  tags: string[];
  license: string;
  size_bytes: number;
  kind: string; // BASE, CUSTOMIZED
  lineage?: ModelLineage;
  source: string;
  project_id: string;
}

export interface Dataset {
  id: string;
  name: string;
  description: string;
  uri: string;
  sha256: string;
  size_bytes: number;
  row_count: number;
  format: string;
  columns: string[];
  create_time?: string;
  status: string;
  validation?: Record<string, unknown>;
  parent_dataset_id: string;
  project_id: string;
  [field: string]: unknown;
}

export const listMethods = () => getJson<{ methods: Method[] }>("/api/v1/methods?page_size=500");
export const listModels = () => getJson<{ models: Model[] }>("/api/v1/models?page_size=500");
export const listDatasets = () => getJson<{ datasets: Dataset[] }>("/api/v1/datasets?page_size=500");

// -- submitting a training (the Start a New Train page) ---------------------------------------------------

/** A dry run's (and a submitted job's) estimate: the resolved parameters and what the run will take. */
export interface JobEstimate {
  parameters: Record<string, unknown>;
  dataset_rows?: number | string;
  dataset_tokens?: number | string;
  epochs?: number;
  total_steps?: number | string;
  estimated_seconds?: number;
}

/** GET /datasets/{id}/stats: token counts by the model's tokenizer. */
export interface DatasetStats {
  row_count?: number | string;
  min_tokens?: number | string;
  mean_tokens?: number;
  p50_tokens?: number | string;
  p95_tokens?: number | string;
  max_tokens?: number | string;
  total_tokens?: number | string;
  rows_truncated?: number | string;
}

export function datasetStats(id: string, modelId: string, maxSeqLength: number): Promise<DatasetStats> {
  const query = new URLSearchParams({ model_id: modelId, max_seq_length: String(maxSeqLength) });
  return getJson(`/api/v1/datasets/${encodeURIComponent(id)}/stats?${query}`);
}
