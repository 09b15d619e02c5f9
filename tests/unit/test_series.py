"""Downsampling and parameter differences (series.py): pure functions, no I/O."""

from __future__ import annotations

import math
import random

import pytest

from tuneforge_common.errors import InvalidArgument
from tuneforge_jobs.series import (
    BLOCK_STEPS,
    SeriesPoint,
    bucket_of,
    bucket_width,
    check_step_range,
    common_range,
    downsample,
    parameter_differences,
    roll_up,
)


def test_a_spike_survives_downsampling_as_its_buckets_max():
    points = [(s, 1.0) for s in range(1, 10_001)]
    points[4_321] = (4_322, 99.0)
    out = downsample(points, 100)
    spiked = [b for b in out if b.max == 99.0]
    assert len(spiked) == 1
    assert spiked[0].value == 1.0  # the bucket's last value is not the spike...
    assert max(b.max for b in out) == 99.0  # ...but its extreme is kept
    assert min(b.min for b in out) == 1.0


def test_a_dip_survives_as_its_buckets_min():
    points = [(s, 5.0 if s != 777 else -3.0) for s in range(1, 2_001)]
    assert min(b.min for b in downsample(points, 50)) == -3.0


@pytest.mark.parametrize("n, max_points", [(1_001, 1), (1_001, 7), (1_001, 500), (10_000, 333), (999, 998)])
def test_bucket_count_never_exceeds_max_points_and_counts_add_up(n, max_points):
    points = [(s, float(s)) for s in range(n)]
    out = downsample(points, max_points)
    assert 1 <= len(out) <= max_points
    assert sum(b.count for b in out) == n
    assert [b.step for b in out] == sorted({b.step for b in out})  # one point per bucket, in step order


def test_each_bucket_keeps_its_last_point_and_its_step():
    points = [(s, float(s % 7)) for s in range(100)]
    out = downsample(points, 10)  # steps 0..99 in buckets of 10
    assert [b.step for b in out] == list(range(9, 100, 10))
    assert [b.value for b in out] == [float(s % 7) for s in range(9, 100, 10)]
    assert all(b.count == 10 for b in out)
    assert out[0] == SeriesPoint(step=9, value=2.0, min=0.0, max=6.0, count=10)


def test_equal_width_buckets_follow_steps_not_point_counts():
    # Dense early, sparse late: buckets split the step range evenly, so the dense part is not over-represented.
    points = [(s, 1.0) for s in range(1_000)] + [(s, 2.0) for s in range(1_000, 100_000, 1_000)]
    out = downsample(points, 10)
    assert len(out) == 10
    assert out[0].count == 1_000 + 9  # steps 0..9_903 (buckets of 9_904 steps: 10 for 99_001, made a block multiple)
    assert all(9 <= b.count <= 10 for b in out[1:])


def test_a_short_series_comes_back_unchanged():
    points = [(1, 3.0), (5, 2.0), (6, 2.5)]
    assert downsample(points, 3) == [
        SeriesPoint(1, 3.0, 3.0, 3.0, 1),
        SeriesPoint(5, 2.0, 2.0, 2.0, 1),
        SeriesPoint(6, 2.5, 2.5, 2.5, 1),
    ]
    assert downsample(points, 500) == downsample(points, 3)


def test_an_empty_series_stays_empty():
    assert downsample([], 10) == []
    assert downsample([(1, 1.0)], 10, lo=5, hi=9) == []


def test_explicit_bounds_drop_points_outside_and_fix_the_buckets():
    points = [(s, float(s)) for s in range(100)]
    out = downsample(points, 5, lo=20, hi=69)  # 50 steps in buckets of 10
    assert [(b.step, b.min, b.max, b.count) for b in out] == [(s + 9, s, s + 9, 10) for s in range(20, 70, 10)]
    # A shared range: a series that covers only part of it has only the buckets it reaches, at the same edges.
    part = downsample([(s, 0.0) for s in range(40, 100)], 5, lo=0, hi=99)
    assert bucket_width(0, 99, 5) == 32  # 20 steps a bucket, rounded up to whole blocks
    assert [bucket_of(b.step, 32) for b in part] == [1, 2, 3]


def test_for_equal_steps_the_later_point_is_the_buckets_value():
    out = downsample([(1, 1.0), (2, 2.0), (2, 7.0), (3, 0.5)], 1)
    assert out == [SeriesPoint(3, 0.5, 0.5, 7.0, 4)]
    out = downsample([(1, 1.0), (2, 2.0), (2, 7.0)], 1)
    assert out == [SeriesPoint(2, 7.0, 1.0, 7.0, 3)]


@pytest.mark.parametrize(
    "lo, hi, n, width",
    [
        (1, 200_000, 1_500, 144),  # 134 steps a bucket rounded up to a multiple of 16: 1,389 buckets
        (0, 99, 10, 10),
        (0, 299, 30, 10),
        (1, 300, 30, 11),  # 10 would make 31 aligned buckets (0..9 up to 300): 300 / 29, rounded up
        (3, 17, 4, 5),  # 4 would make 5 (0..3 up to 16..19): 15 / 3
        (7, 7, 1, 1),
        (5, 1_000, 1, 1_008),
        (0, 10**12, 10_000, 100_000_016),
    ],
)
def test_bucket_width_makes_at_most_max_points_aligned_buckets(lo, hi, n, width):
    assert bucket_width(lo, hi, n) == width
    assert bucket_of(hi, width) - bucket_of(lo, width) < n


def test_bucket_widths_fit_and_are_whole_blocks_above_one():
    rng = random.Random(5)
    for _ in range(20_000):
        lo = rng.choice([0, 1, rng.randint(0, 100), rng.randint(0, 10**7)])
        hi = lo + rng.choice([0, rng.randint(0, 50), rng.randint(0, 10_000), rng.randint(0, 10**7)])
        n = rng.choice([1, 2, rng.randint(1, 50), rng.randint(1, 10_000)])
        width = bucket_width(lo, hi, n)
        assert hi // width - lo // width < n
        assert width >= -(-(hi - lo + 1) // n)
        assert width <= BLOCK_STEPS or width % BLOCK_STEPS == 0


def test_rollup_blocks_summed_by_bucket_are_the_downsampled_series():
    """What the jobs service does for wide buckets: sum blocks (roll_up) instead of points; the same answer."""
    rng = random.Random(11)
    for _ in range(300):
        lo = rng.randint(0, 500)
        steps = sorted(rng.choices(range(lo, lo + rng.randint(1, 20_000)), k=rng.randint(1, 3_000)))
        points = [(s, rng.choice([rng.uniform(-5, 5), 1.0])) for s in steps]  # equal steps, equal values
        max_points = rng.randint(1, 200)
        width = bucket_width(steps[0], steps[-1], max_points)
        if len(points) <= max_points or width % BLOCK_STEPS:
            continue
        by_bucket: dict[int, SeriesPoint] = {}
        for (_, _, block), b in sorted(roll_up(("j", "loss", s, v) for s, v in points).items()):
            k = block * BLOCK_STEPS // width
            by_bucket[k] = by_bucket[k].merged(b) if k in by_bucket else b
        assert list(by_bucket.values()) == downsample(points, max_points)


def test_roll_up_keeps_per_block_count_extremes_and_the_last_stored_point():
    blocks = roll_up([("j", "loss", 3, 1.0), ("j", "loss", 17, 4.0), ("j", "loss", 15, -2.0), ("j", "loss", 15, 5.0)])
    blocks |= roll_up([("j", "lr", 0, 0.1), ("k", "loss", 16, 9.0)])
    assert blocks == {
        ("j", "loss", 0): SeriesPoint(15, 5.0, -2.0, 5.0, 3),  # step 15 stored twice: the later value
        ("j", "loss", 1): SeriesPoint(17, 4.0, 4.0, 4.0, 1),
        ("j", "lr", 0): SeriesPoint(0, 0.1, 0.1, 0.1, 1),
        ("k", "loss", 1): SeriesPoint(16, 9.0, 9.0, 9.0, 1),
    }


def test_downsampling_random_series_keeps_every_invariant():
    rng = random.Random(3)
    for _ in range(200):
        population = range(rng.randint(0, 3_000), rng.randint(3_000, 15_000))
        steps = sorted(rng.sample(population, k=rng.randint(0, min(1_000, len(population)))))
        points = [(s, rng.uniform(-5, 5)) for s in steps]
        max_points = rng.randint(1, 300)
        out = downsample(points, max_points)
        assert len(out) <= max_points
        assert sum(b.count for b in out) == len(points)
        if points:
            assert max(b.max for b in out) == max(v for _, v in points)
            assert min(b.min for b in out) == min(v for _, v in points)
            assert out[-1].step == points[-1][0] and out[-1].value == points[-1][1]
        for b in out:
            assert b.min <= b.value <= b.max


def test_max_points_must_be_positive():
    with pytest.raises(ValueError):
        downsample([(1, 1.0)], 0)


def test_common_range_covers_every_span_and_skips_empty_ones():
    assert common_range([(5, 10), None, (1, 7), (3, 30)]) == (1, 30)
    assert common_range([None, None]) is None
    assert common_range([]) is None


@pytest.mark.parametrize(
    "min_step, max_step, field",
    [(-1, 0, "min_step"), (0, -2, "max_step"), (10, 9, "max_step")],
)
def test_bad_step_ranges_name_their_field(min_step, max_step, field):
    with pytest.raises(InvalidArgument) as exc:
        check_step_range(min_step, max_step)
    assert exc.value.violations[0].field == field


def test_good_step_ranges_pass():
    for bounds in [(0, 0), (10, 0), (10, 10), (0, 5)]:
        check_step_range(*bounds)


# -- parameter differences ---------------------------------------------------------------------------------------


def test_parameter_differences_list_only_keys_whose_values_differ():
    a = {"learning_rate": 2e-4, "lora_rank": 8, "max_steps": 100, "load_in_4bit": True}
    b = {"learning_rate": 1e-4, "lora_rank": 8, "max_steps": 100, "load_in_4bit": False}
    c = {"learning_rate": 2e-4, "lora_rank": 8.0, "max_steps": 100, "load_in_4bit": True}
    assert parameter_differences([a, b, c]) == [
        ("learning_rate", [2e-4, 1e-4, 2e-4]),
        ("load_in_4bit", [True, False, True]),
    ]


def test_a_key_missing_in_one_job_differs_and_shows_as_none():
    assert parameter_differences([{"lora_rank": 8, "seed": 1}, {"seed": 1}]) == [("lora_rank", [8, None])]
    assert parameter_differences([{"x": 1}, {"y": 2}]) == [("x", [1, None]), ("y", [None, 2])]


def test_numbers_compare_by_value_but_never_equal_booleans():
    assert parameter_differences([{"epochs": 3}, {"epochs": 3.0}]) == []
    assert parameter_differences([{"flag": 1}, {"flag": True}]) == [("flag", [1, True])]
    assert parameter_differences([{"flag": 0}, {"flag": False}]) == [("flag", [0, False])]
    assert parameter_differences([{"name": "1"}, {"name": 1}]) == [("name", ["1", 1])]


def test_nested_values_compare_structurally():
    same = [{"targets": ["q_proj", "v_proj"], "cfg": {"a": 1, "b": [1, 2]}}, {"cfg": {"b": [1, 2], "a": 1.0}}]
    same[1]["targets"] = ["q_proj", "v_proj"]
    assert parameter_differences(same) == []
    assert parameter_differences([{"targets": ["q_proj"]}, {"targets": ["q_proj", "v_proj"]}]) == [
        ("targets", [["q_proj"], ["q_proj", "v_proj"]])
    ]


def test_identical_jobs_differ_in_nothing():
    params = {"lora_rank": 8, "learning_rate": 2e-4}
    assert parameter_differences([params, dict(params), dict(params)]) == []
    assert parameter_differences([{}, {}]) == []


def test_roll_up_orders_nan_above_every_number_as_postgresql_does_whatever_comes_first():
    nan = float("nan")
    for values in ([nan, 1.0, 3.0], [1.0, nan, 3.0], [1.0, 3.0, nan]):
        (block,) = roll_up(("j", "loss", step, v) for step, v in enumerate(values)).values()
        assert (block.min, math.isnan(block.max), block.count) == (1.0, True, 3), values
    (block,) = roll_up([("j", "loss", 0, nan), ("j", "loss", 1, nan)]).values()
    assert math.isnan(block.min) and math.isnan(block.max)


def test_merged_buckets_order_nan_as_roll_up_does_whichever_side_holds_it():
    nan, number = SeriesPoint.single(1, float("nan")), SeriesPoint.single(2, 1.0)
    for merged in (nan.merged(number), number.merged(nan)):
        assert merged.min == 1.0 and math.isnan(merged.max) and merged.count == 2
