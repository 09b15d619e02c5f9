"""Jobs tables (SQLAlchemy Core). Only the jobs service reads or writes them."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text

from tuneforge_common.db import UtcDateTime
from tuneforge_common.events import outbox_table

metadata = MetaData()
BigId = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements only INTEGER keys

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False, default=""),
    Column("model_id", String(64), nullable=False),
    Column("dataset_id", String(64), nullable=False),
    # A second dataset evaluated on instead of a held-out share of dataset_id; "" when none was given.
    Column("validation_dataset_id", String(64), nullable=False, default=""),
    Column("method_id", String(64), nullable=False),
    Column("model_uri", Text, nullable=False),
    Column("dataset_uri", Text, nullable=False),
    Column("validation_dataset_uri", Text, nullable=False, default=""),
    Column("entrypoint", Text, nullable=False),
    # The environment the entrypoint runs in: an added method's training env; "" for built-ins.
    Column("python_env", Text, nullable=False, default=""),
    # An added method's saving stage (complete and live lifecycles): its file and env; "" when it has none.
    Column("saving_entrypoint", Text, nullable=False, default=""),
    Column("saving_python_env", Text, nullable=False, default=""),
    Column("parameters", Text, nullable=False),  # resolved, JSON
    Column("state", String(16), nullable=False),
    Column("state_reason", Text, nullable=False, default=""),
    Column("attempt", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("priority", Integer, nullable=False, default=0),
    Column("agent_id", String(64), nullable=True),
    Column("output_uri", Text, nullable=False, default=""),
    Column("current_step", BigInteger, nullable=False, default=0),
    Column("total_steps", BigInteger, nullable=False, default=0),
    Column("progress", Float, nullable=False, default=0.0),
    # Bumped by every state transition: compare-and-set guard and watch cursor.
    Column("version", Integer, nullable=False, default=1),
    Column("created_at", UtcDateTime, nullable=False),
    Column("started_at", UtcDateTime, nullable=True),
    Column("ended_at", UtcDateTime, nullable=True),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("submitted_by", String(255), nullable=False, default=""),
    Column("labels", Text, nullable=False, default="{}"),  # JSON object
    Column("resources", Text, nullable=False, default="{}"),  # JSON ResourceRequest
    Column("method_version", String(64), nullable=False, default=""),
    Column("catalog_version", String(255), nullable=False, default=""),
    Column("epoch", Float, nullable=False, default=0.0),
    Column("tokens_seen", BigInteger, nullable=False, default=0),
    # Seconds run by attempts that ended; the current attempt's time is added from started_at.
    Column("run_seconds", Float, nullable=False, default=0.0),
    Column("attempt_started_at", UtcDateTime, nullable=True),
    Column("copied_from_job_id", String(64), nullable=True),
    Column("resumed_from_step", BigInteger, nullable=False, default=0),
    # A pause asked while an agent runs the job: it checkpoints, stops, and the job becomes PAUSED.
    Column("pause_requested", Boolean, nullable=False, default=False),
    # NULL: submitted by an internal caller acting across projects (in-process tests); users' jobs have theirs.
    Column("project_id", String(64), nullable=True, index=True),
    # train, or a lifecycle step on a published model: merge, evaluate, serve (a deployment).
    Column("kind", String(16), nullable=False, default="train"),
    # A customized model's adapter, applied over model_uri (its base), for merge, evaluate and serve.
    Column("adapter_uri", Text, nullable=False, default=""),
    # A lifecycle step's own facts, JSON: a merge's result name and lineage, an evaluation's training job.
    Column("operation", Text, nullable=False, default="{}"),
    Column("result_model_id", String(64), nullable=False, default=""),  # a merge's published complete model
    # A deployment's answered and failed chat completions.
    Column("request_count", BigInteger, nullable=False, default=0),
    Column("error_count", BigInteger, nullable=False, default=0),
    Index("ix_jobs_state_priority", "state", "priority", "created_at"),
    Index("ix_jobs_kind_model_state", "kind", "model_id", "state"),
    Index("ix_jobs_agent_state", "agent_id", "state"),
)

agents = Table(
    "agents",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("resources", Text, nullable=False),  # JSON
    Column("slots", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # ACTIVE, LOST
    Column("registered_at", UtcDateTime, nullable=False),
    Column("last_heartbeat_at", UtcDateTime, nullable=False),
    # The credential that registered the agent; only it may speak for this agent id.
    Column("credential_id", String(32), nullable=True),
)

# One per trainer node that joined with a join token; only the hash of its secret is kept.
agent_credentials = Table(
    "agent_credentials",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("revoked_at", UtcDateTime, nullable=True),
)

metric_points = Table(
    "metric_points",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("name", String(128), nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("value", Float, nullable=False),
    Column("recorded_at", UtcDateTime, nullable=False),
    Index("ix_metric_points_job_name_step", "job_id", "name", "step"),
    # A job's steps newest first (Jobs.steps_newest_first) walk its points by time.
    Index("ix_metric_points_job_recorded_at", "job_id", "recorded_at"),
)

# Rollups of metric_points by blocks of series.BLOCK_STEPS steps, kept up as points are stored (and rebuilt past
# the step a resumed attempt starts from), so that a chart of a million points reads blocks, not points.
metric_blocks = Table(
    "metric_blocks",
    metadata,
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("block", BigInteger, primary_key=True),  # step // BLOCK_STEPS
    Column("n", BigInteger, nullable=False),
    Column("low", Float, nullable=False),
    Column("high", Float, nullable=False),
    # The block's highest step and its value (of the point stored last, should several hold that step).
    Column("last_step", BigInteger, nullable=False),
    Column("last_value", Float, nullable=False),
)

log_lines = Table(
    "log_lines",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("attempt", Integer, nullable=False),
    Column("stream", String(16), nullable=False),
    Column("text", Text, nullable=False),
    Column("recorded_at", UtcDateTime, nullable=False),
)

# Every state transition, for the job's history and watchers that must not miss a short-lived state.
job_events = Table(
    "job_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("from_state", String(16), nullable=True),
    Column("to_state", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("recorded_at", UtcDateTime, nullable=False),
)

# Checkpoints the agents saved; retention deletes rows (and files) beyond the last K and the best.
checkpoints = Table(
    "checkpoints",
    metadata,
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("step", BigInteger, primary_key=True),
    Column("attempt", Integer, nullable=False),
    Column("uri", Text, nullable=False),
    Column("metrics", Text, nullable=False, default="{}"),  # JSON: metrics at that step
    Column("created_at", UtcDateTime, nullable=False),
)

# Highest report sequence number stored per (job, attempt): makes agent resends idempotent.
report_acks = Table(
    "report_acks",
    metadata,
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("last_seq", BigInteger, nullable=False),
)

outbox = outbox_table(metadata)
