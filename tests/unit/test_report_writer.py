"""api.ReportWriter's scheduling of report transactions, against a stand-in for Jobs.apply_reports that records
what ran at once (the storing itself is tested on real databases in tests/reliability/test_load.py)."""

from __future__ import annotations

import asyncio
import datetime as dt

from tuneforge_jobs import api
from tuneforge_jobs.service import Report, ReportAcks


class RecordingJobs:
    """apply_reports that takes a while, and records the jobs of every transaction and which overlapped."""

    def __init__(self) -> None:
        self.running: list[set[str]] = []
        self.transactions: list[list[tuple[str, int]]] = []
        self.most_at_once = 0

    async def apply_reports(self, reports: list[Report]) -> ReportAcks:
        jobs = {r.job_id for r in reports}
        assert all(not (jobs & other) for other in self.running), "two transactions of one job at once"
        self.running.append(jobs)
        self.most_at_once = max(self.most_at_once, len(self.running))
        self.transactions.append([(r.job_id, r.seq) for r in reports])
        await asyncio.sleep(0.02)
        self.running.remove(jobs)
        acks = ReportAcks()
        for r in reports:
            acks[(r.job_id, r.attempt)] = max(r.seq, acks.get((r.job_id, r.attempt), 0))
        return acks


def reports(job_id: str, seqs: range) -> list[Report]:
    return [Report(job_id, 1, s, "log", dt.datetime.now(dt.UTC), text=str(s)) for s in seqs]


async def test_two_transactions_run_at_once_on_different_jobs_and_a_jobs_batches_keep_their_order():
    jobs = RecordingJobs()
    writer = api.ReportWriter(jobs)  # type: ignore[arg-type]
    # Job a's stream, then b's, then a's again (an agent's old and new streams) while the first is stored.
    first = asyncio.create_task(writer.apply(reports("a", range(1, 4))))
    await asyncio.sleep(0)
    second = asyncio.create_task(writer.apply(reports("b", range(1, 3))))
    again = asyncio.create_task(writer.apply(reports("a", range(4, 6))))
    acks = await asyncio.gather(first, second, again)
    assert [dict(a) for a in acks] == [{("a", 1): 3}, {("b", 1): 2}, {("a", 1): 5}]
    assert jobs.most_at_once == 2
    seqs_of_a = [seq for t in jobs.transactions for job, seq in t if job == "a"]
    assert seqs_of_a == [1, 2, 3, 4, 5]
    assert not writer.tasks and not writer.waiting and not writer.storing


async def test_batches_waiting_together_go_in_one_transaction_up_to_the_batch_size():
    jobs = RecordingJobs()
    writer = api.ReportWriter(jobs)  # type: ignore[arg-type]
    busy = [asyncio.create_task(writer.apply(reports(f"busy{i}", range(1, 2)))) for i in range(api.REPORT_WRITERS)]
    await asyncio.sleep(0)  # both writers are storing: what comes now waits
    waiting = [asyncio.create_task(writer.apply(reports(f"job{i}", range(1, 401)))) for i in range(3)]
    await asyncio.gather(*busy, *waiting)
    sizes = [len(t) for t in jobs.transactions[api.REPORT_WRITERS :]]
    assert sorted(sizes) == [400, 800] and all(size <= api.REPORT_BATCH for size in sizes)
