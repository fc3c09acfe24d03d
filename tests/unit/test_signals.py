"""flask_pgevents.signals: the public names, and a receiver that raises."""
from __future__ import annotations

import logging

import pytest
from blinker import Signal

import flask_pgevents
from flask_pgevents import signals

NAMES = [
    "event_handled", "event_failed", "event_gave_up", "listener_started", "listener_stopped",
    "listener_connection_lost", "listener_reconnected",
]


@pytest.mark.parametrize("name", NAMES)
def test_each_signal_is_importable_from_the_package_and_the_module(name):
    signal = getattr(signals, name)
    assert isinstance(signal, Signal)
    assert getattr(flask_pgevents, name) is signal
    assert name in flask_pgevents.__all__
    assert not signal.receivers  # nothing connected by the package itself


def test_send_passes_sender_and_arguments_and_logs_a_receiver_that_raises(caplog):
    calls = []

    def receiver(sender, **kwargs):
        calls.append((sender, kwargs))

    def broken(sender, **kwargs):
        raise RuntimeError("receiver bug")

    sender = object()
    caplog.set_level(logging.ERROR, logger="flask_pgevents")
    with signals.event_handled.connected_to(receiver), signals.event_handled.connected_to(broken):
        signals.send(signals.event_handled, sender, event="e")
    assert calls == [(sender, {"event": "e"})]
    assert "A receiver of the pgevents signal 'event-handled' raised." in caplog.text
    assert not signals.event_handled.receivers
