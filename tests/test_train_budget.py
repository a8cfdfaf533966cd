"""TimeBudget: with max_minutes, training leaves room for the final evaluation and test decoding."""

from __future__ import annotations

import pytest

from moeformer.train import budget as budget_module
from moeformer.train.budget import TimeBudget


@pytest.fixture
def clock(monkeypatch):
    now = {"t": 1000.0}
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: now["t"])
    return now


def test_stops_when_the_final_evaluation_and_the_reserve_would_not_fit(clock):
    b = TimeBudget(deadline=1000.0 + 600, seconds=600, reserve=lambda eval_s: 10 * eval_s)  # 10x: test split
    b.step_took(1.0)
    b.eval_seconds = 20.0  # final evaluation 20 s + test decoding 200 s + one step 1 s = 221 s
    clock["t"] = 1000.0 + 600 - 222
    assert not b.out_of_time()
    clock["t"] = 1000.0 + 600 - 220
    assert b.out_of_time()


def test_first_evaluation_comes_a_tenth_into_the_budget(clock):
    b = TimeBudget(deadline=1000.0 + 600, seconds=600, reserve=None)
    clock["t"] = 1000.0 + 59
    assert not b.first_eval_due()
    clock["t"] = 1000.0 + 61
    assert b.first_eval_due()
    b.eval_seconds = 5.0
    assert not b.first_eval_due()  # once timed, evaluations follow eval_every


def test_no_deadline_never_runs_out_and_estimates_the_rest(clock):
    b = TimeBudget(deadline=None, seconds=None, reserve=None)
    for _ in range(20):
        b.step_took(0.3)
    assert not b.out_of_time() and not b.first_eval_due() and b.left() is None
    assert b.estimate(580).startswith("about 3 min for the remaining 580 steps on this machine")
    assert b.estimate(100) is None  # under a minute: nothing to say


def test_time_left_for_the_progress_bar(clock):
    b = TimeBudget(deadline=1000.0 + 125, seconds=125, reserve=None)
    assert b.left() == "2:05"
    clock["t"] = 2000.0
    assert b.left() == "0:00"
