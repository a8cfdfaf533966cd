"""The multi-process test harness: a hung rank fails the test with its Python stack shown."""

from __future__ import annotations

import time

import pytest
from spawn import spawn


def _hung_rank_waits_forever(rank: int) -> None:
    while True:
        time.sleep(1)


@pytest.mark.slow  # the deadline must outlast the rank's start-up (torch import) on a loaded machine
def test_a_hung_rank_fails_with_its_stack_dumped(capfd):
    with pytest.raises(pytest.fail.Exception, match="did not finish within 30 s"):
        spawn(_hung_rank_waits_forever, (), nprocs=1, timeout_s=30)
    assert "_hung_rank_waits_forever" in capfd.readouterr().err  # where it hung, from faulthandler
