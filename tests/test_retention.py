"""Retention policies: pure functions of the committed steps, and the LATEST rule."""
from __future__ import annotations

import pytest

from ckpt_tasks.storage import CheckpointStore, KeepAny, KeepEvery, KeepLast
from ckpt_tasks.storage.records import Checkpoint
from ckpt_tasks.storage.retention import checkpoints_to_delete, policy_from


def checkpoints(*steps: int) -> list[Checkpoint]:
    return [Checkpoint(step=s, name=f"step-{s:012d}-0000000{i}.ckpt", size=1, adler32="00000001",
                       created=f"2026-01-01T00:00:{i:02d}.000+00:00", path=f"/x/{s}") for i, s in enumerate(steps)]


def test_keep_last():
    assert KeepLast(2).keep([10, 20, 30, 40]) == {2, 3}
    assert KeepLast(5).keep([10, 20]) == {0, 1}
    assert KeepLast(1).keep([]) == set()


def test_keep_every():
    assert KeepEvery(1000).keep([500, 1000, 1500, 2000, 2001]) == {1, 3}
    assert KeepEvery(1).keep([3, 4]) == {0, 1}


def test_combinations_keep_what_either_keeps():
    policy = KeepLast(1) | KeepEvery(100)
    assert isinstance(policy, KeepAny)
    assert policy.keep([100, 150, 200, 250]) == {0, 2, 3}
    assert KeepAny(KeepLast(1), KeepEvery(100), KeepEvery(150)).keep([100, 150, 200, 250]) == {0, 1, 2, 3}
    assert repr(KeepLast(3) | KeepEvery(1000)) == "KeepLast(3) | KeepEvery(1000)"


@pytest.mark.parametrize("make", [lambda: KeepLast(0), lambda: KeepLast("3"), lambda: KeepLast(True),
                                  lambda: KeepEvery(0), lambda: KeepAny(), lambda: policy_from(3, 0)])
def test_bad_policies_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_shorthands_are_the_policies():
    assert policy_from(3).keep(list(range(10))) == KeepLast(3).keep(list(range(10)))
    assert policy_from(2, 4).keep([0, 1, 2, 3, 4, 5]) == {0, 4, 5}


def test_the_checkpoint_latest_names_is_never_deleted():
    history = checkpoints(10, 20, 30, 40)
    # LATEST names step 20 (a writer raced): the policy would delete it, the rule keeps it.
    deleted = checkpoints_to_delete(KeepLast(1), history, history[1].manifest_name)
    assert [c.step for c in deleted] == [10, 30]
    assert [c.step for c in checkpoints_to_delete(KeepLast(1), history, None)] == [10, 20, 30]


def test_a_store_applies_its_policy(tmp_path):
    store = CheckpointStore(tmp_path / "run", retention=KeepLast(1) | KeepEvery(2))
    source = tmp_path / "state"
    for step in range(1, 6):
        source.write_bytes(bytes([step]))
        store.save(source, step)
    assert [c.step for c in store.list()] == [2, 4, 5]
