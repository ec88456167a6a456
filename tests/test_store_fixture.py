"""A checkpoint location written by the code before the storage split still reads."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ckpt_tasks.storage import CheckpointStore

FIXTURE = Path(__file__).parent / "fixtures" / "store_v1"


def _copy_fixture(location) -> CheckpointStore:
    url, directory = location
    shutil.copytree(FIXTURE, directory, ignore=shutil.ignore_patterns("README.md"))
    return CheckpointStore(url)


def test_old_location_lists_verifies_and_restores(location, tmp_path):
    store = _copy_fixture(location)
    checkpoints = store.list()
    assert [c.step for c in checkpoints] == [10, 20]
    single, parted = checkpoints
    assert not single.parts and single.size == 136 and single.adler32 == "0a132fcd"
    assert len(parted.parts) == 4 and parted.size == 4009 and parted.adler32 == "981f8c1b"
    assert parted.metadata == {"lineage": {"host": "fixture", "step": 20}, "loss": 0.25}
    for checkpoint in checkpoints:
        store.verify(checkpoint)
    restored = store.restore(tmp_path / "restored.pt")
    assert restored.step == 20
    state = torch.load(tmp_path / "restored.pt", weights_only=True)
    assert state["step"] == 20 and state["lr"] == 0.01
    assert torch.equal(state["weight"], torch.arange(600, dtype=torch.float32).reshape(20, 30))
    store.fetch(single, tmp_path / "single")
    assert (tmp_path / "single").read_bytes() == b"single-file checkpoint of step 10\n" * 4


def test_old_location_resumes_writing(location):
    """A new checkpoint goes on top of the old ones; retention keeps the old LATEST's rules."""
    store = _copy_fixture(location)
    url, directory = location
    if url.startswith("root://") and os.geteuid() == 0:
        shutil.chown(directory, "xrootd", "xrootd")  # the server writes as its own user
    committed = store.save_streaming(lambda s: s.write(b"new"), step=30, metadata={"lineage": {}})
    assert [c.step for c in store.list()] == [10, 20, 30]
    assert store.latest() == committed
