"""pacing.py: when the listener claims again, lingers or sleeps, and backoff.

The clock is replaced by a fake one, so that rates are exact and no test sleeps.
"""
from __future__ import annotations

import random
from typing import Callable

import pytest

from flask_pgevents import pacing
from flask_pgevents.pacing import (
    BUSY_EVENTS_PER_SECOND,
    LINGER_POLLS,
    LINGER_SECONDS,
    MAX_LINGER_SECONDS,
    RECHECK_SECONDS,
    Backoff,
    Pacer,
    RateMeter,
    Step,
)


class Clock:
    """Stands in for the time module in pacing: time passes only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(pacing, "time", fake)
    return fake


class Timeout:
    """An idle_timeout that counts how often the pacer asked for it."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds
        self.asked = 0

    def __call__(self) -> float:
        self.asked += 1
        return self.seconds


CLAIM_AGAIN = Step()
GO_IDLE = Step(idle=True)


def draws(delay: Callable[[], float], count: int = 400) -> list[float]:
    return [delay() for _ in range(count)]


# Backoff ------------------------------------------------------------------------------


@pytest.mark.parametrize("failures, low, high", [
    (0, 0.5, 1.0), (1, 0.5, 1.0), (2, 1.0, 2.0), (3, 2.0, 4.0), (4, 4.0, 8.0),
    (5, 5.0, 10.0), (6, 5.0, 10.0), (60, 5.0, 10.0),
])
def test_backoff_doubles_up_to_its_maximum_with_jitter_down_to_half(failures, low, high):
    backoff = Backoff(1.0, 10.0)
    delays = draws(lambda: backoff.delay(failures))
    assert low <= min(delays) and max(delays) <= high
    # Jittered over the whole range, not a fixed value.
    assert max(delays) - min(delays) > (high - low) / 2


def test_backoff_jitter_sets_the_smallest_fraction_of_the_bound():
    delays = draws(lambda: Backoff(2.0, 100.0, jitter=0.75).delay(1))
    assert 1.5 <= min(delays) < 1.6 and 1.9 < max(delays) <= 2.0


def test_backoff_without_jitter_is_exact():
    backoff = Backoff(0.1, 1.0, jitter=1.0)
    assert [backoff.next_delay() for _ in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_next_delay_counts_failures_and_reset_starts_again():
    backoff = Backoff(1.0, 1000.0, jitter=1.0)
    assert [backoff.next_delay(), backoff.next_delay(), backoff.next_delay()] == [1.0, 2.0, 4.0]
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_backoff_draws_from_random():
    state = random.getstate()
    try:
        random.seed(7)
        first = draws(lambda: Backoff(1.0, 10.0).delay(3), count=5)
        random.seed(7)
        assert draws(lambda: Backoff(1.0, 10.0).delay(3), count=5) == first
    finally:
        random.setstate(state)


def test_zero_backoff_retries_at_once():
    assert draws(lambda: Backoff(0.0, 0.0).next_delay(), count=10) == [0.0] * 10


# RateMeter ------------------------------------------------------------------------------


def test_a_new_meter_is_not_busy_and_lingers_longest(clock):
    meter = RateMeter()
    assert meter.rate() == 0.0
    assert not meter.busy()
    assert meter.linger() == MAX_LINGER_SECONDS


def test_events_within_the_window_count_as_at_least_a_window_long(clock):
    meter = RateMeter()
    meter.add(150)
    assert meter.rate() == pytest.approx(1500.0)  # 150 events / 0.1 s
    assert not meter.busy()
    meter.add(50)
    assert meter.rate() == pytest.approx(BUSY_EVENTS_PER_SECOND)
    assert meter.busy()


def test_the_rate_of_the_last_window_holds_until_the_next_one_closes(clock):
    meter = RateMeter()
    meter.add(300)
    clock.advance(0.125)
    meter.add(0)  # closes the window: 300 events in 0.125 s
    clock.advance(0.0625)
    assert meter.rate() == pytest.approx(2400.0) and meter.busy()
    clock.advance(0.0625)
    meter.add(10)  # closes the next window: 10 events in 0.125 s
    assert meter.rate() == pytest.approx(80.0) and not meter.busy()


def test_a_quiet_stretch_ends_busy(clock):
    meter = RateMeter()
    meter.add(1000)
    assert meter.busy()
    clock.advance(5.0)
    meter.add(0)
    assert meter.rate() == pytest.approx(200.0)  # 1000 events over 5 s
    assert not meter.busy()


@pytest.mark.parametrize("events, linger", [
    (0, MAX_LINGER_SECONDS),
    (300, MAX_LINGER_SECONDS),  # 3000/s: 33 ms for 100 events, capped
    (1000, 0.01),  # 10000/s: 100 events in 10 ms
    (5000, LINGER_SECONDS),  # 50000/s: 2 ms, floored
])
def test_linger_waits_for_about_a_hundred_events(clock, events, linger):
    meter = RateMeter()
    meter.add(events)
    assert meter.linger() == pytest.approx(linger)


# Pacer -------------------------------------------------------------------------------


def test_a_quiet_listener_goes_idle_after_a_batch_then_sleeps_for_the_idle_timeout(clock):
    pacer = Pacer(batch_size=100)
    timeout = Timeout(0.5)
    # Publish the idle flag, then claim once more: what committed before writers saw it.
    assert pacer.after_claim(3, 0, timeout) == GO_IDLE
    assert pacer.idle
    assert timeout.asked == 0
    assert pacer.after_claim(0, 0, timeout) == Step(wait=0.5, sleeping=True)
    assert timeout.asked == 1
    assert pacer.after_claim(0, 0, timeout) == Step(wait=0.5, sleeping=True)


def test_a_new_listener_with_nothing_to_do_goes_idle_then_sleeps(clock):
    pacer = Pacer(batch_size=100)
    assert pacer.after_claim(0, 0, Timeout()) == GO_IDLE
    assert pacer.after_claim(0, 0, Timeout(2.0)) == Step(wait=2.0, sleeping=True)


def test_a_wake_up_clears_the_idle_flag_and_the_next_batch_sets_it_again(clock):
    pacer = Pacer(batch_size=100)
    pacer.after_claim(0, 0, Timeout())
    assert pacer.woken() == Step(idle=False)
    assert not pacer.idle
    assert pacer.woken() == Step()  # already clear: nothing to publish
    assert pacer.after_claim(1, 0, Timeout()) == GO_IDLE


def test_an_idle_listener_that_finds_a_few_events_claims_again_and_stays_idle(clock):
    pacer = Pacer(batch_size=100)
    pacer.after_claim(0, 0, Timeout())
    timeout = Timeout()
    assert pacer.after_claim(5, 0, timeout) == CLAIM_AGAIN
    assert pacer.idle and timeout.asked == 0


def test_a_full_batch_means_more_is_waiting_claim_again_at_once(clock):
    pacer = Pacer(batch_size=10)
    timeout = Timeout()
    assert pacer.after_claim(10, 0, timeout) == CLAIM_AGAIN
    assert pacer.after_claim(10, 0, timeout) == CLAIM_AGAIN
    assert not pacer.idle
    # Full batches also end an idle spell.
    pacer = Pacer(batch_size=10)
    pacer.after_claim(0, 0, timeout)
    assert pacer.after_claim(10, 0, timeout) == Step(idle=False)
    assert timeout.asked == 0


def test_while_transactions_are_in_flight_an_idle_listener_rechecks_soon_doubling(clock):
    pacer = Pacer(batch_size=100)
    timeout = Timeout(0.5)
    pacer.after_claim(0, 2, timeout)  # goes idle
    waits = [pacer.after_claim(0, 2, timeout) for _ in range(11)]
    assert [step.wait for step in waits] == pytest.approx([
        RECHECK_SECONDS * 2 ** n for n in range(9)
    ] + [0.5, 0.5])
    assert all(step.sleeping and step.idle is None for step in waits)
    # Once nothing is in flight, the full timeout; the next in-flight spell starts at 1 ms again.
    assert pacer.after_claim(0, 0, timeout) == Step(wait=0.5, sleeping=True)
    assert pacer.after_claim(0, 1, timeout) == Step(wait=RECHECK_SECONDS, sleeping=True)


def test_going_idle_again_restarts_the_rechecks_at_one_millisecond(clock):
    pacer = Pacer(batch_size=100)
    timeout = Timeout(0.5)
    pacer.after_claim(0, 1, timeout)
    for _ in range(4):
        pacer.after_claim(0, 1, timeout)
    pacer.woken()
    assert pacer.after_claim(1, 1, timeout) == GO_IDLE
    assert pacer.after_claim(0, 1, timeout) == Step(wait=RECHECK_SECONDS, sleeping=True)


def test_a_retry_due_sooner_shortens_the_sleep(clock):
    pacer = Pacer(batch_size=100)
    pacer.after_claim(0, 0, Timeout())
    assert pacer.after_claim(0, 0, Timeout(0.0)) == Step(wait=0.0, sleeping=True)
    assert pacer.after_claim(0, 3, Timeout(0.0)) == Step(wait=0.0, sleeping=True)


def test_a_busy_listener_lingers_between_polls_and_never_asks_for_wake_ups(clock):
    pacer = Pacer(batch_size=500)
    timeout = Timeout()
    steps = [pacer.after_claim(300, 5, timeout) for _ in range(3)]  # 3000/s and more
    assert steps[0] == Step(wait=MAX_LINGER_SECONDS)
    assert all(step.idle is None and step.wait is not None and not step.sleeping for step in steps)
    assert not pacer.idle and timeout.asked == 0


def test_a_busy_listener_that_was_idle_clears_its_flag(clock):
    pacer = Pacer(batch_size=500)
    pacer.after_claim(0, 0, Timeout())
    assert pacer.idle
    assert pacer.after_claim(300, 0, Timeout()) == Step(idle=False, wait=MAX_LINGER_SECONDS)


def test_a_busy_listener_polls_a_few_empty_times_before_going_idle(clock):
    pacer = Pacer(batch_size=500)
    timeout = Timeout(0.5)
    pacer.after_claim(300, 0, timeout)
    empty = [pacer.after_claim(0, 0, timeout) for _ in range(LINGER_POLLS)]
    assert empty == [Step(wait=MAX_LINGER_SECONDS)] * LINGER_POLLS
    assert pacer.after_claim(0, 0, timeout) == GO_IDLE
    assert pacer.after_claim(0, 0, timeout) == Step(wait=0.5, sleeping=True)
    assert timeout.asked == 1


def test_events_found_while_lingering_restart_the_count_of_empty_polls(clock):
    pacer = Pacer(batch_size=500)
    pacer.after_claim(300, 0, Timeout())
    for _ in range(LINGER_POLLS - 1):
        pacer.after_claim(0, 0, Timeout())
    pacer.after_claim(1, 0, Timeout())
    assert [pacer.after_claim(0, 0, Timeout()) for _ in range(LINGER_POLLS)] == [
        Step(wait=MAX_LINGER_SECONDS)
    ] * LINGER_POLLS


def test_a_listener_that_is_no_longer_busy_goes_idle(clock):
    pacer = Pacer(batch_size=500)
    assert pacer.after_claim(300, 0, Timeout()) == Step(wait=MAX_LINGER_SECONDS)
    clock.advance(1.0)
    # The claim closes the busy window (300 events in 1 s): no more lingering.
    assert pacer.after_claim(0, 0, Timeout()) == GO_IDLE


def test_backoff_survives_any_number_of_failures():
    # 2.0 ** 1024 overflows: a database down for hours must not end the listener.
    backoff = Backoff(0.1, 10.0)
    assert 5.0 <= backoff.delay(5000) <= 10.0
    backoff.failures = 10_000
    assert 5.0 <= backoff.next_delay() <= 10.0
