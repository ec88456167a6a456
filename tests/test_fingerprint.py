"""The parameter fingerprint: stable (it names checkpoint locations and outputs) and checked on restore."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from ckpt_tasks.errors import FingerprintMismatch
from ckpt_tasks.fingerprint import check_fingerprint, parameter_fingerprint

BRANCH_0 = {"version": "v1", "epochs": 20, "batch_size": 32, "hidden": 64, "seed": 1, "learning_rate": 0.05}


def test_the_fingerprint_is_stable_and_ignores_key_order():
    # Locations written by earlier versions are found again only if this value never changes.
    assert parameter_fingerprint(BRANCH_0) == "30a757d0225b5d7b"
    assert parameter_fingerprint({"b": 1, "a": 2}) == parameter_fingerprint({"a": 2, "b": 1})
    assert parameter_fingerprint({**BRANCH_0, "seed": 2}) != parameter_fingerprint(BRANCH_0)


def test_a_checkpoint_of_other_parameters_is_refused_naming_the_difference():
    params = dict(BRANCH_0)
    ours = SimpleNamespace(step=7, metadata={"fingerprint": parameter_fingerprint(params), "params": params})
    check_fingerprint(ours, params, parameter_fingerprint(params), "/loc")
    theirs = SimpleNamespace(step=7, metadata={"fingerprint": parameter_fingerprint({**params, "seed": 2}),
                                                "params": {**params, "seed": 2}})
    with pytest.raises(FingerprintMismatch, match=r"step 7 at /loc .*seed: checkpoint 2, task 1"):
        check_fingerprint(theirs, params, parameter_fingerprint(params), "/loc")
