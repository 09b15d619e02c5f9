"""Transactional outbox: events are rows written with the state change, then published to JetStream.

The event id travels as `Nats-Msg-Id`, so a publish retried after a crash is
dropped by JetStream's duplicate window instead of being delivered twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any

import nats
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, Text, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .db import UtcDateTime, utcnow

log = logging.getLogger(__name__)


def outbox_table(metadata: MetaData) -> Table:
    return Table(
        "outbox",
        metadata,
        Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("event_id", String(64), nullable=False, unique=True),
        Column("subject", String(255), nullable=False),
        Column("payload", Text, nullable=False),
        Column("created_at", UtcDateTime, nullable=False),
        Column("published_at", UtcDateTime, nullable=True, index=True),
    )


async def write_event(conn: AsyncConnection, outbox: Table, subject: str, payload: dict[str, Any]) -> str:
    """Add an event in the caller's transaction; it is published only if that transaction commits."""
    event_id = uuid.uuid4().hex
    body = {"id": event_id, "subject": subject, "time": utcnow().isoformat(), **payload}
    await conn.execute(
        outbox.insert().values(event_id=event_id, subject=subject, payload=json.dumps(body), created_at=utcnow())
    )
    return event_id


async def ensure_stream(js: Any, name: str, subject_root: str) -> None:
    config = StreamConfig(name=name, subjects=[f"{subject_root}.>"], duplicate_window=120.0)
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)


class OutboxPublisher:
    """Publishes unpublished outbox rows in order; keeps retrying while NATS is down."""

    def __init__(
        self,
        engine: AsyncEngine,
        outbox: Table,
        nats_url: str,
        stream: str,
        subject_root: str,
        poll_interval: float = 0.25,
    ) -> None:
        self._engine = engine
        self._outbox = outbox
        self._nats_url = nats_url
        self._stream = stream
        self._subject_root = subject_root
        self._poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._reconnected = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._nc: Any = None

    def notify(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-publisher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()

    async def _connect(self) -> Any:
        if self._nc is None or self._nc.is_closed:
            self._nc = await nats.connect(
                self._nats_url,
                connect_timeout=2,
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                reconnect_time_wait=1,
                reconnected_cb=self._on_reconnected,
            )
        js = self._nc.jetstream(timeout=5)
        await ensure_stream(js, self._stream, self._subject_root)
        return js

    async def _on_reconnected(self) -> None:
        self._reconnected.set()

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            try:
                js = await self._connect()
                backoff = 0.5
                while True:
                    published = await self.publish_pending(js)
                    if not published:
                        try:
                            await asyncio.wait_for(self._wake.wait(), self._poll_interval)
                        except TimeoutError:
                            pass
                        self._wake.clear()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS or DB unavailable: retry with backoff, rows stay in the outbox
                log.warning("outbox publisher: %s; retrying in %.1fs", exc, backoff)
                # Back to NATS as soon as the client is reconnected, so the outbox drains right after an outage
                # rather than at the end of a backoff grown during it.
                # (A reconnect during the failed call counts: one retry at once per reconnect, never a spin.)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._reconnected.wait(), backoff)
                self._reconnected.clear()
                backoff = min(backoff * 2, 10.0)

    async def publish_pending(self, js: Any, batch: int = 200) -> int:
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(self._outbox.c.seq, self._outbox.c.event_id, self._outbox.c.subject, self._outbox.c.payload)
                    .where(self._outbox.c.published_at.is_(None))
                    .order_by(self._outbox.c.seq)
                    .limit(batch)
                )
            ).all()
        for row in rows:
            await js.publish(row.subject, row.payload.encode(), headers={"Nats-Msg-Id": row.event_id})
            async with self._engine.begin() as conn:
                await conn.execute(
                    update(self._outbox).where(self._outbox.c.seq == row.seq).values(published_at=utcnow())
                )
        return len(rows)
