"""Estimates count steps as the Hugging Face Trainer does and time from comparable finished jobs."""

from tuneforge_jobs.estimates import remaining_seconds, seconds_per_step, steps_and_epochs, training_rows


def test_steps_follow_the_trainers_count_per_epoch():
    # 103 rows, batch 4 -> 26 batches; accumulation 3 -> 8 updates an epoch; 2.5 epochs -> 20 steps.
    assert steps_and_epochs(103, {"batch_size": 4, "grad_accum_steps": 3, "epochs": 2.5}) == (20, 2.5)


def test_max_steps_wins_over_epochs_and_says_how_many_epochs_that_is():
    assert steps_and_epochs(100, {"batch_size": 10, "max_steps": 25, "epochs": 9}) == (25, 2.5)


def test_max_samples_and_the_validation_share_shrink_the_training_rows():
    assert training_rows(1000, {"max_samples": 200, "validation_ratio": 0.1}) == 180
    assert training_rows(1000, {"max_samples": -1}) == 1000


def test_a_tiny_dataset_still_makes_one_step_an_epoch():
    assert steps_and_epochs(3, {"batch_size": 8, "grad_accum_steps": 4, "epochs": 2}) == (2, 2.0)
    assert steps_and_epochs(0, {"epochs": 2}) == (0, 2.0)


def test_time_per_step_is_the_median_of_comparable_jobs():
    assert seconds_per_step([(100.0, 50), (10.0, 10), (60.0, 20), (0.0, 5)]) == 2.0
    assert seconds_per_step([]) == 0.0


def test_remaining_time_applies_the_current_pace_to_the_steps_left():
    assert remaining_seconds(30.0, 10, 40) == 120.0
    assert remaining_seconds(30.0, 0, 40) == 0.0
