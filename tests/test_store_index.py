"""The index in LATEST: readers open no manifest while it is whole, whatever the number of
checkpoints; a stale or damaged one is detected, read around and rebuilt."""
from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest

from ckpt_tasks.errors import VerificationError
from ckpt_tasks.storage.index import manifest_fields, pointer_text
from ckpt_tasks.storage.records import manifest_text
from ckpt_tasks.storage.store import LATEST
from store_helpers import make_file, read_latest


def _reads(store) -> list[str]:
    """Record the names of the files ``store`` reads whole (manifests, LATEST) from now on."""
    names: list[str] = []
    read_bytes = store.files.read_bytes

    def recording(path, *args, **kwargs):
        names.append(str(path).rsplit("/", 1)[-1])
        return read_bytes(path, *args, **kwargs)

    store.files.read_bytes = recording
    return names


def _write_latest(location, pointer: dict) -> None:
    (location.on_disk / LATEST).write_text(json.dumps(pointer))


@pytest.mark.parametrize("kept", [2, 12])
def test_a_reader_opens_only_latest(location, tmp_path, kept):
    writer = location.store(keep_last=kept)
    saved = [writer.save(make_file(tmp_path, step, 3000), step) for step in range(kept + 2)]
    reader = location.store(keep_last=kept)
    reads = _reads(reader)
    assert reader.list() == saved[-kept:]
    assert reader.restore(tmp_path / "restored") == saved[-1]
    assert (tmp_path / "restored").read_bytes() == make_file(tmp_path, kept + 1, 3000).read_bytes()
    assert reads == [LATEST, LATEST]  # one per call, for 2 kept as for 12
    reads.clear()
    writer_reads = _reads(writer)
    writer.save(make_file(tmp_path, 99, 3000), 99)
    assert writer_reads == [LATEST]


def test_a_damaged_index_is_not_trusted_and_is_rebuilt(location, tmp_path):
    store = location.store(keep_last=5)
    saved = [store.save(make_file(tmp_path, step, 3000), step) for step in range(3)]
    pointer = read_latest(location)
    pointer["index"][1]["adler32"] = "00000000"  # bit rot in LATEST: its own adler32 no longer matches
    _write_latest(location, pointer)
    reader = location.store(keep_last=5)
    reads = _reads(reader)
    assert reader.list() == saved  # from the manifests, every one read
    assert sorted(reads) == sorted([LATEST, *(c.manifest_name for c in saved)])
    reader.apply_retention()  # rewrites LATEST with an index rebuilt from them
    rebuilt = read_latest(location)
    assert [entry["adler32"] for entry in rebuilt["index"]] == [c.adler32 for c in saved]
    reads.clear()
    assert location.store().list() == saved


def test_an_index_that_lies_consistently_is_caught_by_verify(location, tmp_path):
    """An entry rewritten with a valid index adler32 (a bug, not rot): the data check of a
    restore and ``verify`` against the manifest both catch it."""
    store = location.store(keep_last=5)
    saved = [store.save(make_file(tmp_path, step, 3000), step) for step in range(2)]
    forged = replace(saved[1], metadata={"loss": 0.0})  # the data still matches: the manifest does not
    (location.on_disk / LATEST).write_text(pointer_text(forged, [saved[0], forged]))
    with pytest.raises(VerificationError, match="different"):
        location.store().verify()
    forged = replace(saved[1], adler32="00000001")
    (location.on_disk / LATEST).write_text(pointer_text(forged, [saved[0], forged]))
    reader = location.store()
    with pytest.raises(VerificationError, match="adler32"):
        reader.verify()
    assert reader.restore(tmp_path / "out") == saved[0]  # the newest fails its data check: the one before


def test_a_stale_index_is_read_around(location, tmp_path):
    """Manifests the index lacks (an earlier version's LATEST, a writer that lost the race for
    LATEST) are read; entries whose manifest is gone are dropped."""
    store = location.store(keep_last=10)
    saved = [store.save(make_file(tmp_path, step, 3000), step) for step in range(4)]
    old_style = {"step": 3, "manifest": saved[3].manifest_name}
    full_index = read_latest(location)
    _write_latest(location, old_style)
    reader = location.store(keep_last=10)
    reads = _reads(reader)
    assert reader.list() == saved and len(reads) == 5
    (location.on_disk / saved[0].manifest_name).unlink()  # gone: its index entry must not bring it back
    _write_latest(location, full_index)
    assert reader.list() == saved[1:]
    # A higher step LATEST does not name (its writer died before moving LATEST) is still the newest.
    later = store.save(make_file(tmp_path, 9, 3000), 9, retention=False)
    _write_latest(location, full_index)
    assert reader.latest() == later
    reader.apply_retention()
    assert read_latest(location)["step"] == 9 and len(read_latest(location)["index"]) == 4


def test_the_index_copies_each_manifest_exactly(location, tmp_path):
    """The index entries are built without parsing each manifest's text, and are still what it says."""
    store = location.store(keep_last=5, part_size=1000)
    one_file = store.save(make_file(tmp_path, 1, 900), 1, metadata={"loss": 0.5, "tags": ["a", "b"]})
    in_parts = store.save(make_file(tmp_path, 2, 3000), 2)
    assert in_parts.parts and not one_file.parts
    for checkpoint in (one_file, in_parts):
        assert manifest_fields(checkpoint) == json.loads(manifest_text(checkpoint))
        on_disk = json.loads((location.on_disk / checkpoint.manifest_name).read_text())
        assert {**on_disk, "path": None} == {**manifest_fields(checkpoint), "path": None}
    assert read_latest(location)["index"] == [manifest_fields(one_file), manifest_fields(in_parts)]


def _first_save_waits_for_the_listing(location, tmp_path, step: int, restore_first: bool) -> bool:
    """Whether a new store's first save staged LATEST only after its listing came back."""
    store = location.store(keep_last=3)
    if restore_first:
        assert store.restore(tmp_path / "restored") is not None
    latest_staged = threading.Event()
    waited: list[bool] = []
    upload, listdir = store.files.upload, store.files.listdir

    def recording_upload(local, dest, *args, **kwargs):
        if f".{LATEST}.partial-" in str(dest):
            latest_staged.set()
        return upload(local, dest, *args, **kwargs)

    def holding_listdir(*args, **kwargs):
        # The listing is held back until LATEST is staged (or 2 s have passed, when it is not).
        waited.append(not latest_staged.wait(2))
        return listdir(*args, **kwargs)

    store.files.upload, store.files.listdir = recording_upload, holding_listdir
    saved = store.save(make_file(tmp_path, step, 3000), step)
    assert location.store().latest() == saved
    return waited[0]


def test_a_save_after_a_restore_stages_latest_beside_the_data(location, tmp_path):
    """A resumed training's first save guesses LATEST from what its restore saw, so the new LATEST
    goes up beside the data, not after the listing (3 round trips fewer, benchmarks/bench_wan.py)."""
    writer = location.store(keep_last=3)
    for step in range(3):
        writer.save(make_file(tmp_path, step, 3000), step)
    assert _first_save_waits_for_the_listing(location, tmp_path, 3, restore_first=False)
    assert not _first_save_waits_for_the_listing(location, tmp_path, 4, restore_first=True)
