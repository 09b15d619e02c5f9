"""JobService and AgentService over a real in-process grpc.aio server (port 0)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import grpc
import pytest

from tests.integration.test_jobs_service import StaticCatalog
from tuneforge.agent.v1 import agent_pb2 as apb
from tuneforge.agent.v1 import agent_pb2_grpc
from tuneforge.jobs.v1 import jobs_pb2 as pb
from tuneforge.jobs.v1 import jobs_pb2_grpc
from tuneforge_common.db import make_engine, migrate
from tuneforge_common.grpcutil import decode_error, start_server
from tuneforge_jobs import api, store
from tuneforge_jobs.main import MIGRATIONS
from tuneforge_jobs.notify import Notifier
from tuneforge_jobs.service import Jobs
from tuneforge_trainer import agent
from tuneforge_trainer.agent import Reporter, _Pending


class Stubs:
    jobs: jobs_pb2_grpc.JobServiceStub
    agents: agent_pb2_grpc.AgentServiceStub
    service: Jobs


@pytest.fixture
async def stubs(tmp_path) -> AsyncIterator[Stubs]:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}")
    await migrate(engine, MIGRATIONS, "alembic_version_jobs")
    changes = Notifier()
    jobs = Jobs(
        engine=engine, catalog=StaticCatalog(), artifact_root="/a", subject_root="tuneforge", on_change=changes.notify
    )
    server, port = await start_server(api.bindings(jobs, changes), "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    s = Stubs()
    s.jobs, s.agents = jobs_pb2_grpc.JobServiceStub(channel), agent_pb2_grpc.AgentServiceStub(channel)
    s.service = jobs
    yield s
    await channel.close()
    await server.stop(None)
    await engine.dispose()


async def submit(s: Stubs) -> pb.Job:
    return (
        await s.jobs.SubmitJob(pb.SubmitJobRequest(model_id="m1", dataset_id="d1", method_id="sft-lora"), timeout=5)
    ).job


async def next_assignment(s: Stubs, agent_id: str) -> apb.JobAssignment:
    call = s.agents.StreamAssignments(apb.StreamAssignmentsRequest(agent_id=agent_id))
    msg = await asyncio.wait_for(call.read(), 5)
    call.cancel()
    return msg.assignment


async def assigned_job(s: Stubs) -> tuple[pb.Job, str]:
    """A submitted job assigned to a newly registered agent, and the agent's id."""
    job = await submit(s)
    agent_id = (await s.agents.RegisterAgent(apb.RegisterAgentRequest(name="n1"), timeout=5)).agent_id
    await next_assignment(s, agent_id)
    return job, agent_id


async def drain(reporter: Reporter, s: Stubs) -> None:
    task = asyncio.create_task(reporter.run_stream(s.agents))
    for _ in range(100):
        if not reporter.pending:
            break
        await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert not reporter.pending, "reports not acknowledged"


async def test_agent_pulls_a_job_reports_it_and_a_watcher_sees_everything_once(stubs):
    job = await submit(stubs)
    agent_id = (
        await stubs.agents.RegisterAgent(
            apb.RegisterAgentRequest(name="n1", resources=apb.AgentResources(slots=1)), timeout=5
        )
    ).agent_id
    assignment = await next_assignment(stubs, agent_id)
    assert (assignment.job_id, assignment.attempt, assignment.parameters["max_steps"]) == (job.id, 1, 5)
    assert assignment.output_uri == f"/a/jobs/{job.id}/output"

    reporter = Reporter(agent_id=agent_id)
    reporter.add(job.id, 1, state=apb.StateReport(state=apb.REPORTED_STATE_RUNNING))
    for step in (1, 2):
        reporter.add(job.id, 1, metric=apb.MetricReport(step=step, values={"loss": 3.0 - step}, total_steps=2))
        reporter.add(job.id, 1, log=apb.LogReport(stream="stdout", text=f"step {step}"))
    await drain(reporter, stubs)

    seen = []
    cursor = ""
    async for update in stubs.jobs.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=5):
        seen.append(update)
        cursor = update.cursor
        if update.WhichOneof("update") == "log" and update.log.text == "step 2":
            break
    assert [u.metric.value for u in seen if u.WhichOneof("update") == "metric"] == [2.0, 1.0]
    assert [(u.event.from_state, u.event.to_state) for u in seen if u.WhichOneof("update") == "event"] == [
        (pb.JOB_STATE_UNSPECIFIED, pb.JOB_STATE_QUEUED),
        (pb.JOB_STATE_QUEUED, pb.JOB_STATE_STARTING),
        (pb.JOB_STATE_STARTING, pb.JOB_STATE_RUNNING),
    ]
    assert [u.job.state for u in seen if u.WhichOneof("update") == "job"] == [pb.JOB_STATE_RUNNING]

    reporter.add(job.id, 1, state=apb.StateReport(state=apb.REPORTED_STATE_SUCCEEDED, output_uri="/a/out"))
    await drain(reporter, stubs)
    # Resuming from the cursor gives only what came after it, and the stream ends at a terminal state.
    rest = [u async for u in stubs.jobs.WatchJob(pb.WatchJobRequest(job_id=job.id, after_cursor=cursor), timeout=5)]
    assert [u.WhichOneof("update") for u in rest] == ["event", "job"]
    assert rest[0].event.to_state == pb.JOB_STATE_SUCCEEDED
    assert rest[1].job.state == pb.JOB_STATE_SUCCEEDED and rest[1].job.progress_percent == 100.0
    history = (await stubs.jobs.ListJobEvents(pb.ListJobEventsRequest(job_id=job.id), timeout=5)).events
    assert [e.to_state for e in history] == [
        pb.JOB_STATE_QUEUED,
        pb.JOB_STATE_STARTING,
        pb.JOB_STATE_RUNNING,
        pb.JOB_STATE_SUCCEEDED,
    ]


async def test_reporter_resends_unacknowledged_reports_after_reconnect_without_duplicates(stubs):
    job, agent_id = await assigned_job(stubs)
    reporter = Reporter(agent_id=agent_id)
    for i in range(5):
        reporter.add(job.id, 1, log=apb.LogReport(text=f"line {i}"))
    await drain(reporter, stubs)
    # Pretend the acks for the last two were lost in a dropped connection: they go out again.
    for i in (3, 4):
        reporter.pending.append(
            _Pending(apb.JobReport(job_id=job.id, attempt=1, seq=i + 1, log=apb.LogReport(text=f"line {i}")))
        )
    reporter.add(job.id, 1, log=apb.LogReport(text="line 5"))
    await drain(reporter, stubs)
    lines = (await stubs.jobs.ListJobLogs(pb.ListJobLogsRequest(job_id=job.id), timeout=5)).lines
    assert [line.text for line in lines] == [f"line {i}" for i in range(6)]


async def test_a_backlog_goes_in_few_messages_and_is_stored_in_order(stubs):
    job, agent_id = await assigned_job(stubs)
    reporter = Reporter(agent_id=agent_id)
    for i in range(1200):
        reporter.add(job.id, 1, log=apb.LogReport(text=f"line {i}"))
    messages = list(agent._report_messages(agent_id, [p.request for p in reporter.pending]))
    assert [len(m.reports) for m in messages] == [500, 500, 200]
    assert all(m.agent_id == agent_id and not m.WhichOneof("report") for m in messages)
    await drain(reporter, stubs)
    first = await stubs.jobs.ListJobLogs(pb.ListJobLogsRequest(job_id=job.id, page_size=1000), timeout=5)
    rest = await stubs.jobs.ListJobLogs(
        pb.ListJobLogsRequest(job_id=job.id, page_size=1000, page_token=first.next_page_token), timeout=5
    )
    assert [line.text for line in [*first.lines, *rest.lines]] == [f"line {i}" for i in range(1200)]


def test_a_report_message_stays_under_its_byte_limit_and_a_report_over_it_goes_alone():
    long = apb.JobReport(job_id="j", attempt=1, seq=1, log=apb.LogReport(text="x" * agent.REPORT_MESSAGE_BYTES))
    short = [apb.JobReport(job_id="j", attempt=1, seq=i, log=apb.LogReport(text="y" * 300_000)) for i in (2, 3, 4, 5)]
    messages = list(agent._report_messages("a", [short[0], long, *short[1:]]))
    assert [[r.seq for r in m.reports] for m in messages] == [[2], [1], [3, 4, 5]]
    assert all(m.ByteSize() <= agent.REPORT_MESSAGE_BYTES + 100 for m in messages if len(m.reports) > 1)


async def test_a_message_with_its_own_report_and_more_stores_its_own_first_and_names_a_bad_one_by_index(stubs):
    job, agent_id = await assigned_job(stubs)
    both = apb.ReportJobRequest(
        agent_id=agent_id,
        job_id=job.id,
        attempt=1,
        seq=1,
        log=apb.LogReport(text="own"),
        reports=[apb.JobReport(job_id=job.id, attempt=1, seq=2, log=apb.LogReport(text="more"))],
    )
    call = stubs.agents.ReportJob()
    await call.write(both)
    ack = await asyncio.wait_for(call.read(), 5)
    assert (ack.job_id, ack.acked_seq, ack.stop) == (job.id, 2, False)
    lines = (await stubs.jobs.ListJobLogs(pb.ListJobLogsRequest(job_id=job.id), timeout=5)).lines
    assert [line.text for line in lines] == ["own", "more"]
    bad = apb.ReportJobRequest(
        agent_id=agent_id,
        reports=[
            apb.JobReport(job_id=job.id, attempt=1, seq=3, log=apb.LogReport(text="fine")),
            apb.JobReport(job_id=job.id, attempt=1, seq=4, checkpoint=apb.CheckpointReport(step=1)),
        ],
    )
    await call.write(bad)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await asyncio.wait_for(call.read(), 5)
    err = decode_error(exc.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in err.field_violations] == ["reports[1].checkpoint.uri"]
    lines = (await stubs.jobs.ListJobLogs(pb.ListJobLogsRequest(job_id=job.id), timeout=5)).lines
    assert [line.text for line in lines] == ["own", "more"], "nothing of a refused message is stored"


async def test_errors_carry_the_right_codes_and_fields(stubs):
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stubs.jobs.GetJob(pb.GetJobRequest(job_id="nope"), timeout=5)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stubs.jobs.SubmitJob(pb.SubmitJobRequest(model_id="", dataset_id="", method_id="x"), timeout=5)
    err = decode_error(exc.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in err.field_violations] == ["model_id", "dataset_id"]
    job = await submit(stubs)
    await stubs.jobs.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stubs.jobs.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=5)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stubs.agents.Heartbeat(apb.HeartbeatRequest(agent_id="ghost"), timeout=5)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


async def test_watch_honours_the_callers_deadline(stubs):
    job = await submit(stubs)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stubs.jobs.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=0.5):
            pass
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_list_jobs_pages_with_tokens(stubs):
    ids = [(await submit(stubs)).id for _ in range(3)]
    page1 = await stubs.jobs.ListJobs(pb.ListJobsRequest(page_size=2), timeout=5)
    page2 = await stubs.jobs.ListJobs(pb.ListJobsRequest(page_size=2, page_token=page1.next_page_token), timeout=5)
    assert sorted(j.id for j in [*page1.jobs, *page2.jobs]) == sorted(ids) and not page2.next_page_token


async def register(s: Stubs, name: str) -> str:
    return (await s.agents.RegisterAgent(apb.RegisterAgentRequest(name=name), timeout=5)).agent_id


async def lapse(s: Stubs, agent_id: str) -> None:
    """The agent's heartbeats stopped long ago; the reaper takes its jobs."""
    async with s.service.engine.begin() as conn:
        await conn.execute(
            store.agents.update()
            .where(store.agents.c.id == agent_id)
            .values(last_heartbeat_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
        )
    assert await s.service.reap_lost_agents() == 1


async def test_a_stale_attempts_reports_are_answered_with_stop_and_the_next_attempt_resumes_from_a_checkpoint(stubs):
    job = await submit(stubs)
    a1 = await register(stubs, "n1")
    first = await next_assignment(stubs, a1)
    assert (first.attempt, first.resume_from_uri, first.resume_from_step) == (1, "", 0)
    assert first.checkpoint_uri == f"/a/jobs/{job.id}/checkpoints"
    async with stubs.service.engine.begin() as conn:
        await conn.execute(
            store.checkpoints.insert().values(
                job_id=job.id,
                step=3,
                attempt=1,
                uri=f"{first.checkpoint_uri}/checkpoint-3",
                metrics="{}",
                created_at=dt.datetime.now(dt.UTC),
            )
        )
    await lapse(stubs, a1)
    second = await next_assignment(stubs, await register(stubs, "n2"))
    assert (second.attempt, second.resume_from_uri, second.resume_from_step) == (
        2,
        f"{first.checkpoint_uri}/checkpoint-3",
        3,
    )

    stopped: list[tuple[str, int, str]] = []
    stale = Reporter(agent_id=a1, on_stop=lambda *stop: stopped.append(stop))
    stale.add(job.id, 1, log=apb.LogReport(text="still training"))
    stale.add(job.id, 1, state=apb.StateReport(state=apb.REPORTED_STATE_SUCCEEDED))
    await drain(stale, stubs)  # acknowledged, so nothing is resent, but refused
    assert stopped and stopped[0][:2] == (job.id, 1) and "superseded by attempt 2" in stopped[0][2]
    assert not (await stubs.jobs.ListJobLogs(pb.ListJobLogsRequest(job_id=job.id), timeout=5)).lines
    got = (await stubs.jobs.GetJob(pb.GetJobRequest(job_id=job.id), timeout=5)).job
    assert (got.state, got.attempt, got.resumed_from_step) == (pb.JOB_STATE_STARTING, 2, 3)


async def test_a_pause_reaches_the_agent_as_a_stop_that_checkpoints_first_and_a_cancel_as_a_plain_one(stubs):
    paused, cancelled = await submit(stubs), await submit(stubs)
    agent_id = (
        await stubs.agents.RegisterAgent(
            apb.RegisterAgentRequest(name="n1", resources=apb.AgentResources(slots=2)), timeout=5
        )
    ).agent_id
    call = stubs.agents.StreamAssignments(apb.StreamAssignmentsRequest(agent_id=agent_id))
    assigned = {(await asyncio.wait_for(call.read(), 5)).assignment.job_id for _ in range(2)}
    assert assigned == {paused.id, cancelled.id}
    await stubs.service.pause(paused.id)
    await stubs.jobs.CancelJob(pb.CancelJobRequest(job_id=cancelled.id), timeout=5)
    stops = {}
    for _ in range(2):
        msg = await asyncio.wait_for(call.read(), 5)
        stops[msg.cancellation.job_id] = msg.cancellation.checkpoint_first
    call.cancel()
    assert stops == {paused.id: True, cancelled.id: False}


async def test_heartbeat_names_the_jobs_an_agent_runs_that_are_no_longer_its_own(stubs):
    job = await submit(stubs)
    old = await register(stubs, "n1")
    await next_assignment(stubs, old)
    beat = await stubs.agents.Heartbeat(apb.HeartbeatRequest(agent_id=old, running_job_ids=[job.id]), timeout=5)
    assert list(beat.cancel_job_ids) == []
    await lapse(stubs, old)
    new = (
        await stubs.agents.RegisterAgent(apb.RegisterAgentRequest(name="n1", resume_agent_id=old), timeout=5)
    ).agent_id
    beat = await stubs.agents.Heartbeat(apb.HeartbeatRequest(agent_id=new, running_job_ids=[job.id]), timeout=5)
    assert list(beat.cancel_job_ids) == [job.id]


async def test_a_message_of_more_reports_than_one_batch_holds_is_refused_whole(stubs):
    job, agent_id = await assigned_job(stubs)
    too_many = [
        apb.JobReport(job_id=job.id, attempt=1, seq=i, log=apb.LogReport(text=f"line {i}"))
        for i in range(1, api.MAX_REPORTS_PER_MESSAGE + 2)
    ]
    call = stubs.agents.ReportJob()
    await call.write(apb.ReportJobRequest(agent_id=agent_id, reports=too_many))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await asyncio.wait_for(call.read(), 5)
    err = decode_error(exc.value)
    assert (err.code, [f for f, _ in err.field_violations]) == (grpc.StatusCode.INVALID_ARGUMENT, ["reports"])
    assert not (await stubs.jobs.ListJobLogs(pb.ListJobLogsRequest(job_id=job.id), timeout=5)).lines
