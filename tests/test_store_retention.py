"""CheckpointStore's retention on both backends: what it deletes, when, and what it spares."""
from __future__ import annotations


import json
import os
import time

import pytest

from ckpt_tasks.storage import CheckpointStore
from ckpt_tasks.storage.store import LATEST
from store_helpers import FAST, make_file, read_latest


# -- retention -----------------------------------------------------------------------------------

def test_retention_keep_last(location, tmp_path):
    store = location.store(keep_last=2)
    saved = []
    for step in range(1, 7):
        saved.append(store.save(make_file(tmp_path, step, 1000), step))
        # after each commit: the two newest remain, older ones are gone from list and from disk
        assert [c.step for c in store.list()] == list(range(max(1, step - 1), step + 1))
    names = location.names()
    assert names == sorted([LATEST] + [n for c in saved[-2:] for n in (c.name, c.manifest_name)])


def test_retention_can_wait_for_the_next_save(location, tmp_path):
    store = location.store(keep_last=1)
    store.save(make_file(tmp_path, 1, 1000), 1)
    store.save(make_file(tmp_path, 2, 1000), 2, retention=False)  # e.g. the final commit before an eviction
    assert [c.step for c in store.list()] == [1, 2]
    store.save(make_file(tmp_path, 3, 1000), 3)
    assert [c.step for c in store.list()] == [3]


def test_retention_keep_every(location, tmp_path):
    store = location.store(keep_last=2, keep_every=3)
    for step in range(1, 11):
        store.save(make_file(tmp_path, step, 1000), step)
    assert [c.step for c in store.list()] == [3, 6, 9, 10]
    assert len([n for n in location.names() if n.endswith(".ckpt")]) == 4


def test_retention_deletes_only_after_a_newer_commit(location, tmp_path):
    store = location.store(keep_last=1)
    first = store.save(make_file(tmp_path, 1, 1000), 1)
    # a save that fails before its commit must not cost the only checkpoint
    with pytest.raises(FileNotFoundError):
        store.save(tmp_path / "missing.bin", 2)
    assert store.list() == [first]
    assert store.apply_retention() == []
    assert store.list() == [first]
    second = store.save(make_file(tmp_path, 2, 1000), 2)
    assert store.list() == [second]
    assert not (location.on_disk / first.name).exists()


def test_retention_never_deletes_what_latest_names(location, tmp_path):
    writer = location.store(keep_last=5)
    saved = [writer.save(make_file(tmp_path, step, 1000), step) for step in (1, 2, 3)]
    # A writer killed after committing step 3's manifest but before moving LATEST
    # leaves LATEST on an older checkpoint.
    (location.on_disk / LATEST).write_text(json.dumps({"step": 1, "manifest": saved[0].manifest_name}))
    deleted = location.store(keep_last=1).apply_retention()

    pointer = read_latest(location)
    named = [c for c in saved if c.manifest_name == pointer["manifest"]]
    assert named, pointer
    remaining = CheckpointStore(location.url, retry=FAST).list()
    assert named[0] in remaining  # whatever LATEST names now still exists ...
    assert (location.on_disk / named[0].name).exists()
    assert saved[-1] in remaining  # ... and so does the newest
    assert saved[1] in deleted and saved[1] not in remaining  # retention did run
    assert not (location.on_disk / saved[1].name).exists()


def test_a_stale_latest_is_moved_to_the_newest_commit(location, tmp_path):
    # What a lost race between two writers (or a writer killed between its manifest
    # and LATEST) leaves: LATEST on a lower step than the newest committed one.
    store = location.store(keep_last=5)
    saved = [store.save(make_file(tmp_path, step, 1000), step) for step in (1, 2, 3)]
    (location.on_disk / LATEST).write_text(json.dumps({"step": 1, "manifest": saved[0].manifest_name}))
    assert store.latest() == saved[-1]  # readers go by the manifests, not by LATEST
    store.apply_retention()  # runs after every save
    pointer = read_latest(location)
    assert (pointer["step"], pointer["manifest"]) == (3, saved[-1].manifest_name)


def test_retention_removes_only_stale_temporaries(location, tmp_path):
    store = location.store()
    store.save(make_file(tmp_path, 1, 1000), 1)
    location.on_disk.joinpath(".step-000000000002-00000000.ckpt.partial-old").write_bytes(b"x")
    location.on_disk.joinpath(".step-000000000003-00000000.ckpt.partial-new").write_bytes(b"x")
    old = time.time() - 2 * 3600
    os.utime(location.on_disk / ".step-000000000002-00000000.ckpt.partial-old", (old, old))
    # data files without a manifest: a writer killed between data and manifest
    location.on_disk.joinpath("step-000000000004-0000000a.ckpt").write_bytes(b"x")
    location.on_disk.joinpath("step-000000000005-0000000b.ckpt").write_bytes(b"x")
    os.utime(location.on_disk / "step-000000000004-0000000a.ckpt", (old, old))
    store.apply_retention()
    names = location.names()
    assert ".step-000000000002-00000000.ckpt.partial-old" not in names  # a dead writer's leftover
    assert ".step-000000000003-00000000.ckpt.partial-new" in names  # may be a live writer's upload
    assert "step-000000000004-0000000a.ckpt" not in names  # never committed, long dead
    assert "step-000000000005-0000000b.ckpt" in names  # its manifest may be on its way
    assert [c.step for c in store.list()] == [1]
    assert (location.on_disk / store.latest().name).exists()
