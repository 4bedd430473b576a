"""SinkGuard: a failing sink is reported once, retried, and never raises into training."""

from __future__ import annotations

import logging

import pytest

from spinal_callback.outputs.sink_guard import SinkGuard


def test_the_first_failure_of_a_streak_is_logged_once_and_recovery_counts_the_lost_writes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = SinkGuard("writing the log x")
    outcomes = []
    with caplog.at_level(logging.DEBUG, logger="spinal_callback"):
        for fails in (True, True, False):

            def write(fails: bool = fails) -> None:
                if fails:
                    raise OSError("disk full")

            outcomes.append(guard.run(write))
    assert outcomes == [False, False, True]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "writing the log x failed (OSError: disk full)" in errors[0].message
    assert "works again; 2 writes were lost" in caplog.text


def test_writes_are_dropped_until_the_retry_is_due() -> None:
    now = [0.0]
    guard = SinkGuard("x", retry_after_s=10.0, clock=lambda: now[0])
    calls = []

    def fail() -> None:
        calls.append(now[0])
        raise OSError("read-only")

    guard.run(fail)
    now[0] = 5.0
    assert guard.run(fail) is False and calls == [0.0]  # dropped, not tried
    now[0] = 10.0
    guard.run(fail)
    assert calls == [0.0, 10.0] and guard.lost == 3


def test_an_error_it_was_not_told_to_catch_propagates() -> None:
    def bug() -> None:
        raise TypeError("a bug")

    with pytest.raises(TypeError):
        SinkGuard("x").run(bug, OSError)


def test_a_negative_retry_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="retry_after_s=-1 is negative"):
        SinkGuard("x", retry_after_s=-1)
