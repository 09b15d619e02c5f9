"""Scheduler on PostgreSQL: time per scheduling decision and fairness by priority, 1,000 queued jobs and 100
agents, side by side with the same decision for 10 queued jobs and 1 agent.

An in-process jobs service (the real gRPC servicer, Jobs service and store; `api.bindings` on port 0) on a fresh
PostgreSQL database holds `--jobs` queued jobs in three priority classes (10, 0, -10), a share of them needing an
agent label that only some agents have (backfilling). Then `--agents` agents, in a second process as they are on
their own nodes, speak the agent protocol over gRPC as trainer agents do: RegisterAgent with `--slots` slots (and
labels), Heartbeat every interval the service asks for, StreamAssignments for their work, and ReportJob (the
trainer's own Reporter) RUNNING at once and SUCCEEDED `--run-ms` later, which frees the slot for the next
assignment. It runs until every job was assigned.

- A scheduling decision is one `Jobs.claim_next` that handed a job out, as StreamAssignments calls it (timed
  around that method, every agent's calls concurrently, pool waits and row locks included). The agent's view
  (its SUCCEEDED report sent -> its next assignment read) is printed beside it.
- A priority inversion is an assignment of job X while a job ranked before it (higher priority, or the same
  priority and submitted earlier) that fits X's agent was queued and not being claimed: its own claim began
  only after X's claim ended. Claims that overlap in time are not counted (either order is right then).
- Queue wait per priority class: from the moment the agents start to the job's claim.

The baseline runs the same harness with `--baseline-jobs` jobs and `--baseline-agents` agent(s): the decision
with (almost) nothing to contend with, so the ratio shows how it scales.

    python bench/bench_scheduler.py [--jobs 1000] [--agents 100] [--slots 2] [--run-ms 200] [--figures out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import multiprocessing
import random
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from _support import Figure, FixedCatalog, add_figures_argument, jobs_database, percentile, write_figures

from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge_common.grpcutil import start_server
from tuneforge_jobs import api
from tuneforge_jobs.notify import Notifier
from tuneforge_jobs.service import Jobs
from tuneforge_trainer.agent import Reporter

GOAL_P95_MS = 500.0
PRIORITIES = {"high": 10, "normal": 0, "low": -10}
PRIORITY_SHARES = {"high": 0.2, "normal": 0.6, "low": 0.2}
LABEL = {"pool": "big"}


@dataclass(frozen=True)
class Claim:
    """One claim_next that handed out a job, on the monotonic clock."""

    agent_id: str
    job_id: str
    began: float
    ended: float


@dataclass
class Run:
    """What one scheduling run saw."""

    jobs: int
    agents: int
    claims: list[Claim] = field(default_factory=list)
    empty_claims: int = 0  # claim_next calls that found nothing for the agent (no free slot, nothing fitting)
    agent_waits: list[float] = field(default_factory=list)  # SUCCEEDED sent -> next assignment read, seconds
    inversions: int = 0
    waits_by_class: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def decision_ms(self) -> list[float]:
        return [(c.ended - c.began) * 1000 for c in self.claims]


def timed_claims(jobs: Jobs, run: Run) -> None:
    """Time each claim_next the servicer makes: the real method, wrapped on this one Jobs instance."""
    real: Callable[[str], Awaitable[Any]] = jobs.claim_next

    async def claim_next(agent_id: str) -> Any:
        began = time.perf_counter()
        claimed = await real(agent_id)
        ended = time.perf_counter()
        if claimed is None:
            run.empty_claims += 1
        else:
            run.claims.append(Claim(agent_id, claimed.id, began, ended))
        return claimed

    jobs.claim_next = claim_next  # type: ignore[method-assign]


@dataclass(frozen=True)
class QueuedJob:
    id: str
    rank: int  # position in scheduling order: priority, then submission
    klass: str
    labelled: bool


async def submit_jobs(jobs: Jobs, n: int, labelled_share: float, rng: random.Random) -> list[QueuedJob]:
    """n jobs, one after another (so submission order is creation order), classes and labels drawn by rng."""
    drawn = []
    for _ in range(n):
        klass = rng.choices(list(PRIORITY_SHARES), weights=list(PRIORITY_SHARES.values()))[0]
        labelled = rng.random() < labelled_share
        resources = {"agent_labels": LABEL} if labelled else {}
        job = await jobs.submit("m", "d", "sft-lora", {}, priority=PRIORITIES[klass], resources=resources)
        drawn.append((klass, labelled, job.id))
    # Submission order is creation order; the stable sort on priority alone gives the scheduling order.
    order = sorted(range(n), key=lambda i: -PRIORITIES[drawn[i][0]])
    return [QueuedJob(drawn[i][2], rank, drawn[i][0], drawn[i][1]) for rank, i in enumerate(order)]


@dataclass
class Agent:
    """A trainer agent as far as the protocol goes: it runs each job for run_s and reports it succeeded."""

    stub: agent_pb2_grpc.AgentServiceStub
    name: str
    slots: int
    labelled: bool
    run_s: float
    heartbeat_s: float
    assigned: Callable[[apb.JobAssignment], None]
    id: str = ""
    freed_at: list[float] = field(default_factory=list)  # when each SUCCEEDED was sent, not yet followed up
    waits: list[float] = field(default_factory=list)

    async def register(self) -> None:
        resources = apb.AgentResources(slots=self.slots, labels=LABEL if self.labelled else {})
        registered = await self.stub.RegisterAgent(apb.RegisterAgentRequest(name=self.name, resources=resources))
        self.id = registered.agent_id

    async def serve(self) -> None:
        reporter = Reporter(agent_id=self.id)
        running: set[asyncio.Task] = set()

        async def run(job: apb.JobAssignment) -> None:
            reporter.add(job.job_id, job.attempt, state=apb.StateReport(state=apb.REPORTED_STATE_RUNNING))
            await asyncio.sleep(self.run_s)
            self.freed_at.append(time.perf_counter())
            done = apb.StateReport(state=apb.REPORTED_STATE_SUCCEEDED, output_uri=job.output_uri)
            reporter.add(job.job_id, job.attempt, state=done)

        async def beat() -> None:
            while True:
                await asyncio.sleep(self.heartbeat_s)
                await self.stub.Heartbeat(apb.HeartbeatRequest(agent_id=self.id))

        side = [asyncio.create_task(reporter.run_stream(self.stub)), asyncio.create_task(beat())]
        call = self.stub.StreamAssignments(apb.StreamAssignmentsRequest(agent_id=self.id))
        try:
            async for msg in call:
                if msg.WhichOneof("work") != "assignment":
                    continue
                if self.freed_at:
                    self.waits.append(time.perf_counter() - self.freed_at.pop(0))
                self.assigned(msg.assignment)
                task = asyncio.create_task(run(msg.assignment))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            call.cancel()
            for task in [*side, *running]:
                task.cancel()
            await asyncio.gather(*side, *running, return_exceptions=True)


def count_inversions(claims: list[Claim], queued: list[QueuedJob], labelled_agents: set[str]) -> int:
    """Assignments made while a better-ranked job that fit the same agent was queued and not being claimed."""
    by_id = {q.id: q for q in queued}
    claim_of = {c.job_id: c for c in claims}
    ranked = sorted(queued, key=lambda q: q.rank)
    inversions = 0
    for claim in claims:
        job = by_id[claim.job_id]
        fits_agent = claim.agent_id in labelled_agents
        for better in ranked[: job.rank]:
            if better.labelled and not fits_agent:
                continue
            if claim_of[better.id].began > claim.ended:
                inversions += 1
                break
    return inversions


async def schedule(admin_url: str, n_jobs: int, n_agents: int, args: argparse.Namespace) -> Run:
    """One scheduling run on its own fresh database: submit, start the agents, wait until every job succeeded."""
    run = Run(jobs=n_jobs, agents=n_agents)
    rng = random.Random(args.seed)
    async with jobs_database(admin_url) as (_, engine):
        changes = Notifier()
        jobs = Jobs(
            engine=engine, catalog=FixedCatalog(), artifact_root="/a", subject_root="bench", on_change=changes.notify
        )
        timed_claims(jobs, run)
        queued = await submit_jobs(jobs, n_jobs, args.labelled_share, rng)
        server, port = await start_server(api.bindings(jobs, changes), "127.0.0.1", 0)
        n_labelled = max(1, round(n_agents * args.labelled_agent_share)) if args.labelled_share else 0
        spawn = multiprocessing.get_context("spawn")
        results, sender = spawn.Pipe(duplex=False)
        agents = spawn.Process(
            target=agents_process,
            args=(port, n_agents, n_labelled, args.slots, args.run_ms / 1000, jobs.heartbeat_interval_seconds),
            kwargs={"n_jobs": n_jobs, "timeout": args.timeout, "out": sender},
            daemon=True,
        )
        agents.start()
        sender.close()  # the agents' end only: their exit ends our reads
        try:
            labelled_agents = await asyncio.to_thread(results.recv)
            started = time.perf_counter()
            run.agent_waits = await asyncio.to_thread(results.recv)
            run.seconds = max(c.ended for c in run.claims) - started
        finally:
            if agents.is_alive():
                agents.terminate()
            await asyncio.to_thread(agents.join, 10)
            await server.stop(None)

    assert sorted(c.job_id for c in run.claims) == sorted(q.id for q in queued), "every job assigned exactly once"
    run.inversions = count_inversions(run.claims, queued, set(labelled_agents))
    assigned_at = {c.job_id: c.ended for c in run.claims}
    for q in queued:
        run.waits_by_class.setdefault(q.klass, []).append(assigned_at[q.id] - started)
    return run


def agents_process(
    port: int,
    n_agents: int,
    n_labelled: int,
    slots: int,
    run_s: float,
    heartbeat_s: float,
    *,
    n_jobs: int,
    timeout: float,
    out: Any,
) -> None:
    """The agents, in a process of their own as on their nodes, so the service's event loop is not theirs too.
    Sends the labelled agents' ids once all registered, then, once n_jobs were assigned, their waits."""

    async def run_agents() -> None:
        assigned = 0
        all_assigned = asyncio.Event()

        def count(_: apb.JobAssignment) -> None:
            nonlocal assigned
            assigned += 1
            if assigned == n_jobs:
                all_assigned.set()

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            agents = [
                Agent(stub, f"bench-agent-{i}", slots, i < n_labelled, run_s, heartbeat_s, count)
                for i in range(n_agents)
            ]
            await asyncio.gather(*(a.register() for a in agents))
            out.send([a.id for a in agents if a.labelled])
            serving = [asyncio.create_task(a.serve()) for a in agents]
            try:
                await asyncio.wait_for(all_assigned.wait(), timeout)
            finally:
                for task in serving:
                    task.cancel()
                await asyncio.gather(*serving, return_exceptions=True)
        out.send([w for a in agents for w in a.waits])

    asyncio.run(run_agents())


async def stopped_by_sigterm(run: Awaitable[Run]) -> Run:
    """A time limit's SIGTERM cancels the run, so its database is dropped on the way out."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run


def summary(run: Run) -> dict[str, float]:
    decisions = run.decision_ms()
    return {
        "p50": percentile(decisions, 50),
        "p95": percentile(decisions, 95),
        "max": max(decisions),
        "agent_p95": percentile([w * 1000 for w in run.agent_waits], 95),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000, help="queued jobs")
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--slots", type=int, default=2, help="jobs each agent runs at once")
    parser.add_argument("--run-ms", type=float, default=200, help="how long an agent 'runs' each job")
    parser.add_argument("--labelled-share", type=float, default=0.1, help="share of jobs needing the pool=big label")
    parser.add_argument("--labelled-agent-share", type=float, default=0.2, help="share of agents with that label")
    parser.add_argument("--baseline-jobs", type=int, default=10)
    parser.add_argument("--baseline-agents", type=int, default=1)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--timeout", type=float, default=600, help="seconds a run may take before it fails")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin URL")
    add_figures_argument(parser)
    args = parser.parse_args()

    baseline = asyncio.run(stopped_by_sigterm(schedule(args.pg_url, args.baseline_jobs, args.baseline_agents, args)))
    loaded = asyncio.run(stopped_by_sigterm(schedule(args.pg_url, args.jobs, args.agents, args)))
    base, load = summary(baseline), summary(loaded)

    print(f"\nscheduling on PostgreSQL, {args.slots} slot(s) per agent, each job held {args.run_ms:g} ms\n")
    print("| run | decisions | empty claims | decision p50 ms | p95 ms | max ms | agent view p95 ms | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, run, s in (
        (f"{loaded.jobs:,} jobs, {loaded.agents} agents", loaded, load),
        (f"baseline: {baseline.jobs} jobs, {baseline.agents} agent(s)", baseline, base),
    ):
        print(
            f"| {label} | {len(run.claims)} | {run.empty_claims} | {s['p50']:.1f} | {s['p95']:.1f} | {s['max']:.1f} "
            f"| {s['agent_p95']:.1f} | {run.seconds:.1f} |"
        )
    ratio = load["p95"] / base["p95"]
    print(f"\nratio decision p95 loaded/baseline: {ratio:.1f}x")
    met = load["p95"] <= GOAL_P95_MS
    print(f"goal decision p95 <= {GOAL_P95_MS:g} ms: {'met' if met else 'MISSED'}")

    print(f"\nfairness ({loaded.jobs:,} jobs): priority inversions {loaded.inversions} (goal 0)\n")
    print("| class (priority) | jobs | mean wait s | p95 wait s |\n| --- | --- | --- | --- |")
    for klass, priority in PRIORITIES.items():
        waits = loaded.waits_by_class.get(klass, [])
        if waits:
            print(
                f"| {klass} ({priority}) | {len(waits)} | {statistics.mean(waits):.2f} | {percentile(waits, 95):.2f} |"
            )
    means = [statistics.mean(loaded.waits_by_class[k]) for k in PRIORITIES if loaded.waits_by_class.get(k)]
    ordered = all(a <= b for a, b in itertools.pairwise(means))

    settings = (
        f"{args.jobs} jobs, {args.agents} agents x {args.slots} slots, jobs held {args.run_ms:g} ms, "
        f"{args.labelled_share:.0%} need a label {args.labelled_agent_share:.0%} of agents have; in-process servicer"
    )
    write_figures(
        args.figures,
        [
            Figure(
                "bench_scheduler",
                f"scheduling decision p95 ({args.jobs:,} queued, {args.agents} agents)",
                load["p95"],
                "ms",
                baseline=f"{args.baseline_jobs} queued, {args.baseline_agents} agent(s): p95 {base['p95']:.1f} ms "
                f"({ratio:.1f}x)",
                goal=f"<= {GOAL_P95_MS:g} ms",
                met=met,
                note=f"p50 {load['p50']:.1f} ms, max {load['max']:.1f} ms; {settings}",
            ),
            Figure(
                "bench_scheduler",
                "priority inversions",
                loaded.inversions,
                "assignments",
                goal="0",
                met=loaded.inversions == 0,
                note="mean queue wait "
                + ", ".join(f"{k} {statistics.mean(v):.2f} s" for k, v in loaded.waits_by_class.items() if v)
                + ("" if ordered else " (NOT in priority order)"),
            ),
        ],
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
