"""The wall-clock side of a training run: when to stop so that ``max_minutes`` bounds everything.

A run with a time budget has a deadline for the whole command. Training must stop early enough
for what follows the last update: one more evaluation, and whatever the caller does after
training (decoding the test split), which it estimates from how long an evaluation took. So the
first evaluation comes early (a tenth into the budget) to be timed, and after each update the
budget asks: would one more update, a final evaluation and the caller's reserve still fit?
"""

from __future__ import annotations

import time
from collections.abc import Callable

ESTIMATE_AFTER = 20  # updates timed before the time of the rest is estimated


class TimeBudget:
    """deadline: ``time.monotonic()`` by which the command must be done, or None (no budget);
    seconds: the budget's length; reserve: seconds the caller needs after training, given the
    duration of one evaluation."""

    def __init__(self, deadline: float | None, seconds: float | None, reserve: Callable[[float], float] | None) -> None:
        self.deadline, self.seconds = deadline, seconds
        self.reserve = reserve or (lambda _: 0.0)
        self.step_seconds = 0.0  # running mean over the last ~20 updates
        self.eval_seconds: float | None = None  # the last evaluation's duration
        self._steps_timed = 0

    def step_took(self, seconds: float) -> None:
        self._steps_timed += 1
        self.step_seconds += (seconds - self.step_seconds) / min(self._steps_timed, ESTIMATE_AFTER)

    def out_of_time(self) -> bool:
        """Whether another update would leave too little time for the final evaluation and the reserve."""
        if self.deadline is None:
            return False
        eval_seconds = self.eval_seconds or 0.0
        return time.monotonic() + self.step_seconds + eval_seconds + self.reserve(eval_seconds) >= self.deadline

    def first_eval_due(self) -> bool:
        """With a deadline and no evaluation timed yet: whether a tenth of the budget is spent."""
        if self.deadline is None or self.eval_seconds is not None or not self.seconds:
            return False
        return self.deadline - time.monotonic() < 0.9 * self.seconds

    def left(self) -> str | None:
        """Time to the deadline as M:SS (for the progress bar); None without a deadline."""
        if self.deadline is None:
            return None
        left = max(self.deadline - time.monotonic(), 0.0)
        return f"{int(left // 60)}:{int(left % 60):02d}"

    def estimate(self, steps_left: int) -> str | None:
        """'about 3 min for the remaining 580 steps ...' once ESTIMATE_AFTER updates are timed; None
        when there is a deadline (the bar shows the time left) or the rest takes under a minute."""
        seconds = steps_left * self.step_seconds
        if self.deadline is not None or seconds < 60:
            return None
        amount = f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
        return (f"about {amount} for the remaining {steps_left} steps on this machine (from the first "
                f"{ESTIMATE_AFTER}; evaluations come on top)")  # fmt: skip
