"""When the listener claims, sleeps and asks writers for wake-ups; backoff.

Pure logic and tuning constants: no I/O, so it is tested without a database.

A quiet listener publishes that it sleeps after each batch, so the next
writer NOTIFYs it at once (lowest latency). A busy one (more than
:data:`BUSY_EVENTS_PER_SECOND`) polls every few milliseconds instead, so
batches gather and writers send no NOTIFY at all: NOTIFY serializes every
notifying commit in the cluster.
"""
from __future__ import annotations

import dataclasses
import random
import time
from typing import Callable, Optional

#: Above this rate a listener polls every LINGER_SECONDS instead of asking
#: writers to wake it, and sleeps after LINGER_POLLS empty polls.
BUSY_EVENTS_PER_SECOND = 2000.0
LINGER_SECONDS = 0.005
LINGER_POLLS = 5
#: Busy listeners poll at most this far apart: enough for batches of about
#: LINGER_BATCH events, which cost one claim and one DELETE between them.
MAX_LINGER_SECONDS = 0.02
LINGER_BATCH = 100
#: First recheck while writers that may have missed the idle flag are in flight.
RECHECK_SECONDS = 0.001


class RateMeter:
    """Events per second over the last ~100 ms, cheap enough to update per batch."""

    WINDOW = 0.1

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._count = 0
        self._last_rate = 0.0

    def add(self, count: int) -> None:
        now = time.monotonic()
        elapsed = now - self._start
        self._count += count
        if elapsed >= self.WINDOW:
            self._last_rate = self._count / elapsed
            self._start, self._count = now, 0

    def rate(self) -> float:
        elapsed = time.monotonic() - self._start
        return max(self._last_rate, self._count / max(elapsed, self.WINDOW))

    def linger(self) -> float:
        """How long a busy listener waits between polls at the current rate."""
        return min(MAX_LINGER_SECONDS, max(LINGER_SECONDS, LINGER_BATCH / max(self.rate(), 1.0)))

    def busy(self) -> bool:
        return self.rate() >= BUSY_EVENTS_PER_SECOND


class Backoff:
    """Exponential backoff with jitter, bounded.

    :param initial: the first delay's upper bound, in seconds.
    :param maximum: the largest delay.
    :param jitter: the smallest fraction of the bound a delay may be.
    """

    def __init__(self, initial: float, maximum: float, jitter: float = 0.5) -> None:
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.failures = 0

    def delay(self, failures: int) -> float:
        """The delay after ``failures`` consecutive failures (1 for the first)."""
        # The exponent is capped: 2.0 ** 1024 overflows, and the ceiling is long reached.
        ceiling = min(self.maximum, self.initial * 2.0 ** min(max(failures - 1, 0), 64))
        return ceiling * random.uniform(self.jitter, 1.0)

    def next_delay(self) -> float:
        """Count one more failure and return the delay before trying again."""
        self.failures += 1
        return self.delay(self.failures)

    def reset(self) -> None:
        self.failures = 0


@dataclasses.dataclass(frozen=True)
class Step:
    """What the listener does after a claim.

    :param idle: publish this idle flag first (``None``: leave it).
    :param wait: then wait this long for a wake-up (``None``: claim again at once).
    :param sleeping: the wait is an idle sleep: a wake-up ends it, and the
        listener then clears its idle flag (see :meth:`Pacer.woken`).
    """

    idle: Optional[bool] = None
    wait: Optional[float] = None
    sleeping: bool = False


class Pacer:
    """Decides, after each claim, whether to claim again, linger or sleep.

    :param batch_size: a full batch means more is waiting: claim again.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.rate = RateMeter()
        self.idle = False
        self._empty_polls = 0
        self._recheck = RECHECK_SECONDS

    def after_claim(self, handled: int, in_flight: int, idle_timeout: Callable[[], float]) -> Step:
        """The next step after a claim that handled ``handled`` events.

        :param in_flight: transactions in progress at the claim, which may
            still commit events after a writer saw the listener busy.
        :param idle_timeout: gives the longest sleep (the safety poll, or less
            when a retry is due sooner); asked only when the listener sleeps.
        """
        self.rate.add(handled)
        busy = self.rate.busy()
        if handled:
            self._empty_polls = 0
            if handled >= self.batch_size or busy:
                return self._set_idle(False, wait=None if handled >= self.batch_size else self.rate.linger())
        elif not self.idle and busy and self._empty_polls < LINGER_POLLS:
            self._empty_polls += 1
            return Step(wait=self.rate.linger())
        if not self.idle:
            # Claim again at once: what committed before writers could see the flag.
            self._recheck = RECHECK_SECONDS
            return self._set_idle(True)
        if handled:
            return Step()
        timeout = idle_timeout()
        if in_flight:
            timeout = min(timeout, self._recheck)
            self._recheck *= 2
        else:
            self._recheck = RECHECK_SECONDS
        return Step(wait=timeout, sleeping=True)

    def woken(self) -> Step:
        """A wake-up ended an idle sleep: stop asking writers for NOTIFYs at once,
        or a burst of concurrent writers would all queue on NOTIFY's lock."""
        return self._set_idle(False)

    def _set_idle(self, idle: bool, wait: Optional[float] = None) -> Step:
        changed = idle != self.idle
        self.idle = idle
        return Step(idle=idle if changed else None, wait=wait)
