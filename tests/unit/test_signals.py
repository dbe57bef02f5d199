"""SIGTERM with a grace period: the step under way may finish; past the grace, or at a second signal, it stops."""

import os
import signal
import time

import pytest

from launch import signals


@pytest.fixture
def handler():
    previous = signals.stop_on_sigterm(grace_s=0.3)
    signals.reset()
    yield
    signals.reset()
    signals.stop_on_sigterm(grace_s=0.0)  # back to the module's default grace for later tests
    signals.restore_sigterm(previous)


def test_the_first_sigterm_waits_for_the_step_end(handler):
    os.kill(os.getpid(), signal.SIGTERM)  # no exception yet: the step goes on
    assert signals.terminated()
    with pytest.raises(signals.Terminated, match="end of the step"):
        signals.stop_at_step_end()


def test_a_step_longer_than_the_grace_is_interrupted(handler):
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(signals.Terminated, match="did not end within"):
        time.sleep(5)


def test_a_second_sigterm_stops_at_once(handler):
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(signals.Terminated, match="received signal SIGTERM$"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)


def test_without_a_sigterm_the_step_end_is_no_stop(handler):
    signals.stop_at_step_end()
    assert not signals.terminated()
