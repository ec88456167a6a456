"""Save policies and reasons: pure objects, no clock but the one they are given."""
from __future__ import annotations

import pytest

from ckpt_tasks.policy import (SaveAny, SaveEvery, SaveInterval, SaveNever, SaveReason, save_policy)


def due_steps(policy, count, times=None):
    times = times or [0.0] * count
    due = []
    for index, now in enumerate(times):
        if policy.due(index, now):
            due.append(index)
            policy.saved(index, now)
    return due


def test_save_every_is_due_on_calls_1_then_every_nth():
    assert due_steps(SaveEvery(3), 10) == [0, 3, 6, 9]
    assert due_steps(SaveEvery(1), 4) == [0, 1, 2, 3]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_save_every_refuses_what_is_not_a_positive_integer(bad):
    with pytest.raises(ValueError, match="checkpoint_every"):
        SaveEvery(bad)


def test_save_interval_counts_from_the_last_save():
    policy = SaveInterval(10.0, last=0.0)
    assert due_steps(policy, 6, [1.0, 9.9, 10.0, 15.0, 19.9, 20.0]) == [2, 5]


@pytest.mark.parametrize("bad", [0, -5, True, None, "10"])
def test_save_interval_refuses_what_is_not_positive_seconds(bad):
    with pytest.raises(ValueError, match="checkpoint_interval"):
        SaveInterval(bad)


def test_any_is_due_when_one_is_and_tells_all_of_a_save():
    policy = SaveEvery(100) | SaveInterval(5.0, last=0.0)
    assert isinstance(policy, SaveAny)
    # index 0 by count; 6.0 by time; then the clock restarts from 6.0, so 10.0 is not due
    assert due_steps(policy, 4, [0.0, 6.0, 10.0, 11.5]) == [0, 1, 3]


def test_never_is_never_due():
    assert due_steps(SaveNever(), 5) == []


def test_flat_parameters_are_shorthands():
    assert due_steps(save_policy(2), 5) == [0, 2, 4]
    assert isinstance(save_policy(None, None), SaveNever)
    assert isinstance(save_policy(3, 60.0), SaveAny)


def test_reasons_are_the_strings_manifests_record():
    assert SaveReason.SIGNAL == "signal" and str(SaveReason.INTERVAL) == "interval"
    assert SaveReason("final") is SaveReason.FINAL
