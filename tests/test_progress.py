"""Progress (advantage) rewards: hand examples, the telescoping sum, unknown values."""

from __future__ import annotations

import random

import pytest

from stepforge.stages.label.progress_rewards import progress_rewards, solve_rate


def test_hand_example():
    # Root 0.25; the first step lifts the prefix to 0.5, the second to 0.75, the last reaches the answer.
    assert progress_rewards(0.25, [0.5, 0.75, 0.6], True) == [0.25, 0.25, 0.25]
    # A step that throws a good prefix away gets a negative reward; the last V is the outcome, not 0.6.
    assert progress_rewards(0.5, [0.75, 0.25, 0.6], False) == [0.25, -0.5, -0.25]


def test_single_step_is_outcome_minus_root():
    assert progress_rewards(0.25, [0.9], True) == [0.75]
    assert progress_rewards(0.25, [None], False) == [-0.25], "the last step's own value is never used"


def test_rewards_telescope_to_outcome_minus_root():
    rng = random.Random(7)
    for _ in range(200):
        steps = [rng.random() for _ in range(rng.randint(1, 12))]
        root, outcome = rng.random(), rng.random() < 0.5
        rewards = progress_rewards(root, steps, outcome)
        assert len(rewards) == len(steps)
        assert sum(rewards) == pytest.approx(float(outcome) - root, abs=1e-12)


def test_unknown_values_give_none_for_the_step_and_the_next():
    assert progress_rewards(0.5, [0.75, None, 0.5, 0.9], True) == [0.25, None, None, 0.5]
    assert progress_rewards(None, [0.75, 0.5], True) == [None, 0.25], "no root value: the first step is unknown"
    assert progress_rewards(0.5, [0.75, 0.5], None) == [0.25, None], "unchecked outcome: the last step is unknown"
    assert progress_rewards(0.5, [None], None) == [None]
    assert progress_rewards(0.5, [], True) == []


def test_solve_rate_counts_unchecked_as_wrong():
    assert solve_rate([True, False, None, True]) == 0.5
    assert solve_rate([None]) == 0.0
    assert solve_rate([]) is None
