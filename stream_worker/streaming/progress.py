"""How long work has waited without a batch being committed: what readiness, liveness and the
``StreamWorkerNoProgress`` alert all judge by, so that the three agree.

Work waits when messages are consumed and not committed, the partitions have lag, or a failed
batch is to be redone (its messages were given back, and the lag that would show them may be
unreadable from the broker that failed it). The clock restarts at every committed batch and
whenever nothing waits, so a worker that is idle, or that commits a batch now and then however
slowly, is never stalled; one whose every publish or commit fails (a wedged producer, a broker
that accepts connections but no longer answers) is, from its last success on.
Written by the worker's main thread, read by the health server's thread and at scrapes: a
main thread blocked in a flush keeps the clock running, which is the point.
"""

from __future__ import annotations

import time
from typing import Callable


class Progress:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since = clock()
        self.waiting = 0  # messages in flight or behind the partitions' ends, as last noted
        self.redoing = False  # a batch failed and none has been committed since

    def note(self, waiting: int) -> None:
        """The worker's count of waiting messages (in flight plus lag), after each turn of its loop."""
        self.waiting = waiting
        if not self._work_waits():
            self._since = self._clock()

    def failed(self) -> None:
        self.redoing = True

    def committed(self) -> None:
        self.redoing = False
        self._since = self._clock()

    def reassigned(self) -> None:
        """A rebalance: failed work of partitions now elsewhere is their new owner's; what stays
        here shows as lag again."""
        self.redoing = False

    def stalled_seconds(self) -> float:
        """Seconds since the last committed batch while work waits; 0 when nothing waits."""
        return self._clock() - self._since if self._work_waits() else 0.0

    def _work_waits(self) -> bool:
        return self.waiting > 0 or self.redoing

    def stalled(self, bound_s: float, setting: str) -> str | None:
        """Why the worker counts as stalled beyond ``bound_s`` (named by its ``setting``), or None."""
        stalled = self.stalled_seconds()
        if stalled <= bound_s:
            return None
        what = f"{self.waiting} messages wait" if self.waiting else "a failed batch waits to be redone"
        return f"no batch committed for {stalled:.0f} s while {what} ({setting} = {bound_s:g} s)"


def join_overdue(joining_since: float | None, bound_s: float, setting: str) -> str | None:
    """Why a group join begun at ``joining_since`` (``time.monotonic()``; None: no join under way)
    counts as lost once it has lasted ``bound_s`` (named by its ``setting``), or None.
    kafka-python 3.0.12 can lose a join: the member then waits for partitions for good, with no
    lag of its own to show it stalled."""
    if joining_since is None:
        return None
    joining_for = time.monotonic() - joining_since
    return f"group join incomplete for {joining_for:.0f} s ({setting} = {bound_s:g} s)" if joining_for > bound_s else None
