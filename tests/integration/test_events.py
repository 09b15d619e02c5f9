"""Outbox to NATS JetStream: every transition arrives once, and a republish is deduplicated."""

from __future__ import annotations

import asyncio
import json

import nats
from sqlalchemy import update

from tests.integration.test_jobs_service import StaticCatalog, report
from tuneforge_common.db import make_engine, migrate
from tuneforge_common.events import OutboxPublisher
from tuneforge_jobs import store
from tuneforge_jobs.lifecycle import JobState
from tuneforge_jobs.main import MIGRATIONS
from tuneforge_jobs.service import Jobs


async def stream_messages(nats_url: str, stream: str, subject_root: str) -> list[dict]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        sub = await js.pull_subscribe(f"{subject_root}.>", stream=stream)
        msgs = await sub.fetch(info.state.messages, timeout=5) if info.state.messages else []
        return [json.loads(m.data) for m in msgs]
    finally:
        await nc.close()


async def wait_until_published(engine, seconds: float = 10.0) -> None:
    from sqlalchemy import func, select

    for _ in range(int(seconds / 0.1)):
        async with engine.connect() as conn:
            left = (
                await conn.execute(
                    select(func.count()).select_from(store.outbox).where(store.outbox.c.published_at.is_(None))
                )
            ).scalar_one()
        if left == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("outbox not drained")


async def test_each_state_change_is_published_once_even_when_republished(
    postgres_url, nats_url, event_names, js_cleanup
):
    stream, root = event_names
    engine = make_engine(postgres_url)
    await migrate(engine, MIGRATIONS, "alembic_version_jobs")
    publisher = OutboxPublisher(engine, store.outbox, nats_url, stream, root, poll_interval=0.05)
    jobs = Jobs(
        engine=engine, catalog=StaticCatalog(), artifact_root="/a", subject_root=root, on_event=publisher.notify
    )
    publisher.start()
    try:
        job = await jobs.submit("m1", "d1", "sft-lora", {})
        agent, _ = await jobs.register_agent("a", {}, 1)
        job = await jobs.claim_next(agent)
        await jobs.apply_report(agent, report(job, 1, "state", state=JobState.RUNNING))
        await jobs.apply_report(agent, report(job, 2, "state", state=JobState.SUCCEEDED))
        await wait_until_published(engine)
        # A publisher that crashed after sending but before marking the rows sends them all again.
        async with engine.begin() as conn:
            await conn.execute(update(store.outbox).values(published_at=None))
        publisher.notify()
        await wait_until_published(engine)
    finally:
        await publisher.stop()
        await engine.dispose()
    messages = await stream_messages(nats_url, stream, root)
    assert [(m["from"], m["to"]) for m in messages] == [
        (None, "QUEUED"),
        ("QUEUED", "STARTING"),
        ("STARTING", "RUNNING"),
        ("RUNNING", "SUCCEEDED"),
    ]
    assert {m["subject"] for m in messages} == {f"{root}.jobs.job.state_changed"}
    assert len({m["id"] for m in messages}) == 4


async def test_events_wait_in_the_outbox_while_nats_is_unreachable(tmp_path, nats_url, event_names, js_cleanup):
    stream, root = event_names
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}")
    await migrate(engine, MIGRATIONS, "alembic_version_jobs")
    jobs = Jobs(engine=engine, catalog=StaticCatalog(), artifact_root="/a", subject_root=root)
    await jobs.submit("m1", "d1", "sft-lora", {})  # commits although no publisher runs
    down = OutboxPublisher(engine, store.outbox, "nats://127.0.0.1:1", stream, root, poll_interval=0.05)
    down.start()
    await asyncio.sleep(0.5)
    await down.stop()
    up = OutboxPublisher(engine, store.outbox, nats_url, stream, root, poll_interval=0.05)
    up.start()
    try:
        await wait_until_published(engine)
    finally:
        await up.stop()
        await engine.dispose()
    assert [m["to"] for m in await stream_messages(nats_url, stream, root)] == ["QUEUED"]
