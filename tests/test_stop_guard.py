"""StopGuard: signals recorded, deferred to a consistent point, handed on once."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from ckpt_tasks.stop import StopGuard, check_exit_code
from checkpointer_child import Child


def test_signal_outside_critical_work_stops_at_once():
    stops = []
    guard = StopGuard(stops.append)
    assert guard.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops == [signal.SIGTERM]
    finally:
        guard.uninstall()


def test_signal_inside_critical_work_waits_for_its_end():
    stops = []
    guard = StopGuard(stops.append)
    with guard.critical():
        guard.request(signal.SIGINT)
        with guard.critical():
            pass
        assert stops == [] and guard.requested == signal.SIGINT
    assert stops == [signal.SIGINT] and guard.requested is None


def test_deferring_guard_waits_for_honour():
    stops = []
    guard = StopGuard(stops.append, defer=True)
    guard.request(signal.SIGTERM)
    assert stops == []
    with guard.critical():  # e.g. a transfer inside a framework's own save: not a step's end
        pass
    assert stops == []
    guard.honour()
    assert stops == [signal.SIGTERM]


def test_a_second_signal_while_stopping_is_ignored():
    stops = []

    def on_stop(signum):
        stops.append(signum)
        guard.request(signal.SIGINT)  # arrives while the stop runs

    guard = StopGuard(on_stop)
    guard.request(signal.SIGTERM)
    guard.honour()
    assert stops == [signal.SIGTERM]


def test_uninstall_gives_the_handlers_back():
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        guard = StopGuard(lambda signum: None)
        guard.install()
        assert signal.getsignal(signal.SIGTERM) != mine
        guard.uninstall()
        assert signal.getsignal(signal.SIGTERM) == mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_outside_the_main_thread_it_does_not_install():
    results = []
    guard = StopGuard(lambda signum: None)
    thread = threading.Thread(target=lambda: results.append(guard.install()))
    thread.start()
    thread.join()
    assert results == [False] and not guard.installed


@pytest.mark.parametrize("bad", [0, 256, -1, True, "85"])
def test_exit_codes_outside_1_to_255_are_refused(bad):
    with pytest.raises(ValueError, match="checkpoint_exit_code"):
        check_exit_code(bad)


def test_a_process_stopped_through_the_guard_exits_with_the_checkpoint_code(tmp_path):
    body = """
    from ckpt_tasks.stop import StopGuard, exit_process, CHECKPOINT_EXIT_CODE
    guard = StopGuard(lambda signum: exit_process(CHECKPOINT_EXIT_CODE, hard=True), defer=True)
    guard.install()
    say("ready")
    for i in range(10**6):
        with guard.critical():
            time.sleep(0.01)
        guard.honour()
    """
    child = Child(body, tmp_path)
    child.wait_for("ready")
    child.signal(signal.SIGTERM)
    assert child.finish() == 85
