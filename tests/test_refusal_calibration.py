"""examples/refusal_calibration.py: the held-out split, the share-of-refusals mix and the bisection
that sets a refusal subject's operating point on validation prompts (issue 15)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import refusal_calibration as cal  # noqa: E402


def test_holdout_is_a_fixed_disjoint_split_in_pool_order():
    pool = [f"h{i}" for i in range(40)]
    kept, held = cal.split_holdout(pool, 10)
    assert len(held) == 10 and len(kept) == 30 and not set(kept) & set(held)
    assert sorted(kept + held, key=pool.index) == pool
    assert kept == sorted(kept, key=pool.index) and held == sorted(held, key=pool.index)
    assert cal.split_holdout(pool, 10) == (kept, held)  # the same instructions for every subject seed
    assert cal.split_holdout(pool, 0) == (pool, [])
    for bad in (-1, 40):
        with pytest.raises(ValueError, match=r"held-out count must be in \[0, 40\)"):
            cal.split_holdout(pool, bad)


@pytest.mark.parametrize("rho", [0.1, 0.25, 0.5, 0.6])
def test_mix_makes_refusals_the_asked_share_cycling_the_pool(rho):
    harmful, harmless = ["a", "b", "c"], [f"x{i}" for i in range(300)]
    refused = cal.refusal_share_mix(harmful, harmless, rho)
    assert abs(len(refused) / (len(refused) + len(harmless)) - rho) < 0.005
    assert refused[:4] == ["a", "b", "c", "a"]


def test_mix_rejects_shares_outside_the_open_interval_and_an_empty_pool():
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match="rho .* must be in \\(0, 1\\)"):
            cal.refusal_share_mix(["a"], ["x"], bad)
    with pytest.raises(ValueError, match="no harmful instructions"):
        cal.refusal_share_mix([], ["x"], 0.3)


def test_violation_is_zero_inside_and_scaled_by_room_outside():
    box = cal.Box(min_harmful=0.93, max_harmless=0.03)
    assert box.violation(0.95, 0.02) == 0.0 and box.violation(0.93, 0.03) == 0.0
    assert box.violation(0.86, 0.0) == pytest.approx(1.0)  # 0.07 short of 0.93, room 0.07
    assert box.violation(1.0, 0.06) == pytest.approx(1.0)  # 0.03 over 0.03
    assert box.violation(0.86, 0.045) == pytest.approx(1.0)  # the worse of the two


def _subject(threshold: float, base: float = 0.3):
    """A fake subject whose refusals rise with the share of refusals it was tuned on: harmful
    prompts refused 1.6 * rho + ``base``, harmless 0.25 * (rho - threshold) above ``threshold``."""

    def rates(rho: float) -> tuple[float, float]:
        return min(1.0, 1.6 * rho + base), max(0.0, 0.25 * (rho - threshold))

    calls: list[float] = []

    def attempt(rho: float) -> cal.Round:
        calls.append(rho)
        return cal.Round(rho, *rates(rho), run=f"rho{rho:.3f}")

    return attempt, calls


def test_a_subject_already_inside_is_kept_without_a_round():
    attempt, calls = _subject(0.4)
    first = cal.Round(None, 0.95, 0.01, "first")
    chosen, tried = cal.calibrate(first, attempt, cal.Box())
    assert chosen is first and tried == [first] and calls == []


def test_bisection_moves_the_share_towards_the_box_and_stops_inside_it():
    # inside the box for rho in [0.394, 0.52]: harmful >= 0.93 needs rho >= 0.394, harmless <= 0.03 rho <= 0.52
    attempt, calls = _subject(0.4)
    first = cal.Round(None, 0.80, 0.01, "first")  # refuses too few harmful prompts
    chosen, tried = cal.calibrate(first, attempt, cal.Box(), low=0.1, high=0.6, rounds=4)
    assert calls == [0.35, 0.475]  # 0.35: harmful 0.86, too few -> up to (0.35 + 0.6) / 2
    assert chosen.rho == 0.475 and cal.Box().violation(chosen.harmful, chosen.harmless) == 0.0
    assert tried[0] is first and len(tried) == 3


def test_too_many_harmless_refusals_lower_the_share():
    attempt, calls = _subject(0.3, base=0.6)  # inside for rho in [0.206, 0.42]
    first = cal.Round(None, 0.99, 0.2, "first")
    chosen, tried = cal.calibrate(first, attempt, cal.Box(), low=0.1, high=0.9, rounds=4)
    assert calls == [0.5, 0.3]  # 0.5: harmless 0.05, too many -> down to (0.1 + 0.5) / 2
    assert chosen.rho == 0.3 and chosen.harmless == 0.0 and chosen.harmful == 1.0


def test_a_round_failing_both_ways_moves_against_the_larger_violation():
    attempt, calls = _subject(0.1)  # harmful >= 0.93 needs rho >= 0.394, harmless <= 0.03 rho <= 0.22: no box
    first = cal.Round(None, 0.99, 0.2, "first")
    chosen, tried = cal.calibrate(first, attempt, cal.Box(), low=0.1, high=0.6, rounds=3)
    # 0.35: harmless 0.0625 (1.08 of the room over), harmful 0.86 (1.0 short): down; 0.225: harmful
    # 0.66 (3.9 short) against harmless 0.031 (0.04 over): up; 0.2875: harmful 0.76 (2.4), harmless 0.047
    assert calls == pytest.approx([0.35, 0.225, 0.2875])
    assert chosen.run == "rho0.350"  # nearest the box where the trade-off never enters it (violation 1.08)


def test_without_a_round_inside_the_nearest_is_chosen_within_the_round_budget():
    attempt, calls = _subject(0.9)  # harmless never refused; harmful needs rho >= 0.394
    first = cal.Round(None, 0.5, 0.0, "first")
    chosen, tried = cal.calibrate(first, attempt, cal.Box(), low=0.1, high=0.3, rounds=3)
    assert calls == [0.2, 0.25, 0.275] and chosen.rho == 0.275  # each short of harmful, the last nearest
    with pytest.raises(ValueError, match="0 < low < high < 1"):
        cal.calibrate(first, attempt, cal.Box(), low=0.5, high=0.4)
