"""Progress (advantage) rewards: how much each step changed the chance of reaching the answer.

"Rewarding Progress" (Setlur et al., 2024) rewards a step by the change in the value of the
solution prefix it ends, not by the value itself:

    progress_i = V(s_1..s_i) - V(s_1..s_{i-1})

with V the probability, under the policy, that the prefix reaches the right answer. Here

- V before the first step is the *root value*: the problem's solve rate under the policy
  (``solve_rate``: the mean outcome of its policy rollouts, an unchecked outcome counting as
  wrong, as Monte Carlo labelling counts it);
- V after an internal step is that step's soft label value (``Label.value``);
- V after the last step is the rollout's own outcome, 1.0 or 0.0, so the rewards telescope:
  they sum exactly to ``outcome - root_value``.

A step whose value or whose predecessor's value is unknown gets None (it and the next step,
for an unknown internal value; only the last step for an unchecked outcome). Pure functions,
no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def solve_rate(outcomes: Iterable[bool | None]) -> float | None:
    """The fraction of outcomes that are True (None counts as wrong); None when there are none."""
    checked = [outcome is True for outcome in outcomes]
    return sum(checked) / len(checked) if checked else None


def progress_rewards(
    root_value: float | None, step_values: Sequence[float | None], outcome: bool | None
) -> list[float | None]:
    """One progress reward per step: V(prefix through step i) - V(prefix before it).

    ``root_value`` is V before step 1, ``step_values[i]`` the value of the prefix ending with
    step i, and the last step's value is replaced by the rollout's ``outcome`` (1.0/0.0; None
    if it was not checked). With every value known, ``sum(result) == outcome - root_value``
    up to float rounding.
    """
    values: list[float | None] = list(step_values)
    if not values:
        return []
    values[-1] = None if outcome is None else float(outcome)
    rewards: list[float | None] = []
    previous = root_value
    for value in values:
        rewards.append(None if value is None or previous is None else value - previous)
        previous = value
    return rewards
