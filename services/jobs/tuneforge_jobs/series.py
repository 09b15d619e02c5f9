"""Metric series for charts and comparisons: bucketed downsampling and parameter differences. Pure, no I/O.

Downsampling splits a step range [lo, hi] into buckets of `width` steps aligned to multiples of the width,

    bucket(step) = step // width          (integer division)

with the width the narrowest of the rule `bucket_width` gives that makes at most `max_points` buckets of [lo, hi];
a width above BLOCK_STEPS is a multiple of it, so that a bucket is whole blocks of the jobs service's rollups
(`metric_blocks`: count, min, max and last point per BLOCK_STEPS steps) and a chart of a million points reads
blocks, not points. Per non-empty bucket it keeps the last point (its step and value) with the bucket's min, max
and count, so a spike between two kept points still shows as the bucket's extreme (as W&B draws its charts).
Aligned buckets also stay put while a running job's range grows. The jobs service runs the same rule in SQL
(`Jobs.metric_series`); `downsample` is its reference, and the tests hold one to the other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuneforge_common.errors import InvalidArgument

# Buckets per series when a comparison does not say; the most a caller may ask for (larger asks are clamped).
DEFAULT_MAX_POINTS = 500
MAX_POINTS_LIMIT = 10_000
MAX_COMPARED_JOBS = 20


@dataclass(frozen=True)
class SeriesPoint:
    """One bucket: the last point in it (step and value) and the extremes and number of its raw points."""

    step: int
    value: float
    min: float
    max: float
    count: int

    @classmethod
    def single(cls, step: int, value: float) -> SeriesPoint:
        return cls(step, value, value, value, 1)

    def merged(self, later: SeriesPoint) -> SeriesPoint:
        """One bucket of this one's points and `later`'s, stored after them: for equal last steps, later's wins."""
        last = (later.step, later.value) if later.step >= self.step else (self.step, self.value)
        return SeriesPoint(*last, lower(self.min, later.min), higher(self.max, later.max), self.count + later.count)


# The order of values in a bucket's min and max: NaN above every number, as in PostgreSQL, which computes them for
# the points and the rollup blocks these merge with (Python's min and max keep whichever NaN or number came first).
def lower(a: float, b: float) -> float:
    return b if a != a or b < a else a


def higher(a: float, b: float) -> float:
    return b if b != b or b > a else a


@dataclass(frozen=True)
class Series:
    job_id: str
    name: str
    points: list[SeriesPoint]


@dataclass(frozen=True)
class ComparedMetric:
    """One metric of compared jobs: one series per job, in the jobs' order, over one step range."""

    name: str
    series: list[Series]


@dataclass(frozen=True)
class Comparison:
    jobs: list[Any]  # the jobs' rows, in the order asked
    differences: list[tuple[str, list[Any]]]  # parameter_differences
    metrics: list[ComparedMetric]


def check_step_range(min_step: int, max_step: int) -> None:
    """A step range as requests give it: both bounds inclusive, max_step 0 meaning no upper bound."""
    if min_step < 0:
        raise InvalidArgument.for_field("min_step", "must not be negative")
    if max_step < 0:
        raise InvalidArgument.for_field("max_step", "must not be negative")
    if max_step and max_step < min_step:
        raise InvalidArgument.for_field("max_step", "must not be below min_step")


# Steps per rollup block (the jobs service's metric_blocks): bucket widths above it are multiples of it.
BLOCK_STEPS = 16


def bucket_width(lo: int, hi: int, max_points: int) -> int:
    """Steps per bucket for [lo, hi] in at most `max_points` buckets aligned to multiples of the width.

    ceil(n / max_points) for n = hi - lo + 1 steps, rounded up to a multiple of BLOCK_STEPS when above it; should
    the aligned buckets then number one too many, ceil(n / (max_points - 1)) rounded alike, which never does
    (with one bucket: hi + 1, so that every step from 0 falls in bucket 0).
    """
    n = hi - lo + 1
    candidates = (-(-n // max_points), -(-n // (max_points - 1)) if max_points > 1 else hi + 1)
    for width in candidates:
        if width > BLOCK_STEPS:
            width = -(-width // BLOCK_STEPS) * BLOCK_STEPS
        if hi // width - lo // width < max_points:
            return width
    raise AssertionError("unreachable: the second width always fits")


def bucket_of(step: int, width: int) -> int:
    """The bucket of `step` for buckets of `width` steps aligned to multiples of the width."""
    return step // width


def downsample(
    points: Iterable[tuple[int, float]], max_points: int, lo: int | None = None, hi: int | None = None
) -> list[SeriesPoint]:
    """At most `max_points` buckets over [lo, hi] (default: the first and last step) of points sorted by step.

    Points outside [lo, hi] are left out. A series of at most `max_points` points comes back as it is, one
    point per bucket. Within a bucket the last point wins; for equal steps, the one later in the input.
    """
    if max_points < 1:
        raise ValueError("max_points must be at least 1")
    kept = [(int(s), float(v)) for s, v in points if (lo is None or s >= lo) and (hi is None or s <= hi)]
    if len(kept) <= max_points:
        return [SeriesPoint.single(s, v) for s, v in kept]
    width = bucket_width(kept[0][0] if lo is None else lo, kept[-1][0] if hi is None else hi, max_points)
    out: list[SeriesPoint] = []
    current = -1
    for step, value in kept:
        bucket = bucket_of(step, width)
        if bucket != current:
            out.append(SeriesPoint.single(step, value))
            current = bucket
        else:
            out[-1] = out[-1].merged(SeriesPoint.single(step, value))
    return out


def roll_up(points: Iterable[tuple[str, str, int, float]]) -> dict[tuple[str, str, int], SeriesPoint]:
    """(job_id, name, step, value) points, in the order stored, as rollup blocks: per (job_id, name, block of
    BLOCK_STEPS steps) the count, min, max and the last point (for equal steps the one stored later)."""
    # Mutable [count, min, max, last step, last value] per block while folding: this runs on every stored point,
    # and a SeriesPoint made and merged per point cost the jobs service a fifth of its ingest CPU (py-spy).
    acc: dict[tuple[str, str, int], list[Any]] = {}
    for job_id, name, step, value in points:
        key = (job_id, name, step // BLOCK_STEPS)
        block = acc.get(key)
        if block is None:
            acc[key] = [1, value, value, step, value]
            continue
        block[0] += 1
        block[1], block[2] = lower(block[1], value), higher(block[2], value)
        if step >= block[3]:
            block[3], block[4] = step, value
    return {key: SeriesPoint(last_step, last, low, high, n) for key, (n, low, high, last_step, last) in acc.items()}


def common_range(spans: Iterable[tuple[int, int] | None]) -> tuple[int, int] | None:
    """The step range covering every given (first, last) span; None when none has any points."""
    present = [s for s in spans if s is not None]
    if not present:
        return None
    return min(lo for lo, _ in present), max(hi for _, hi in present)


def _canonical(value: Any) -> Any:
    """A comparable form of a JSON value in which 1 == 1.0 but neither equals true, and dicts ignore key order."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return (type(value).__name__, value)
    if isinstance(value, int | float):
        return ("number", float(value))
    if isinstance(value, Mapping):
        return ("object", tuple(sorted((str(k), _canonical(v)) for k, v in value.items())))
    if isinstance(value, Sequence):
        return ("array", tuple(_canonical(v) for v in value))
    return ("other", repr(value))


def parameter_differences(parameters: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[Any]]]:
    """The parameters whose values are not the same in every job, by name.

    Over the union of the jobs' keys; each entry holds one value per job in the given order, None where a job
    lacks the key (a key missing in one job and set in another differs).
    """
    names = sorted({name for params in parameters for name in params})
    out: list[tuple[str, list[Any]]] = []
    for name in names:
        values = [params.get(name) for params in parameters]
        if len({_canonical(v) for v in values}) > 1:
            out.append((name, values))
    return out
