"""Lineage is stamped by the writers, not by the store (which knows nothing of jobs)."""
from __future__ import annotations

from ckpt_tasks.storage import CheckpointStore
from ckpt_tasks.transfer import StoreTransfer


def test_the_store_records_metadata_as_it_is(tmp_path):
    (tmp_path / "state").write_bytes(b"x")
    checkpoint = CheckpointStore(tmp_path / "run").save(tmp_path / "state", 1, {"loss": 0.5})
    assert checkpoint.metadata == {"loss": 0.5}


def test_store_transfer_stamps_lineage_and_keeps_a_writers_own(tmp_path):
    store = CheckpointStore(tmp_path / "run")
    transfer = StoreTransfer(store, step_of=lambda: 7, params={"lr": 0.1})
    (tmp_path / "state").write_bytes(b"x")
    transfer.commit(tmp_path / "state", 7, {"loss": 0.25})
    lineage = store.latest().metadata["lineage"]
    assert lineage["step"] == 7 and lineage["loss"] == 0.25 and lineage["host"] and lineage["run_id"]
    transfer.commit(tmp_path / "state", 8, {"lineage": {"host": "elsewhere"}})
    assert store.latest().metadata["lineage"] == {"host": "elsewhere"}
    assert store.latest().metadata["lineage_trail"][-1]["step"] == 7
