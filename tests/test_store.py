"""CheckpointStore: versioned, verified checkpoints, on a local directory and on a real XRootD server.

Every behaviour test runs on both backends (``location`` fixture, tests/store_helpers.py):
a local directory and a sub-directory of the session's XRootD server. What the store
wrote is also checked on the disk behind it (``on_disk``). Retention, locations and the
law interface on XRootD have their own modules (test_store_retention.py,
test_store_locations.py, test_targets.py).
"""
from __future__ import annotations


import dataclasses
import json
import logging
import os
import random
import subprocess
import sys
import time
import zlib
from datetime import datetime, timezone

import pytest

from ckpt_tasks.errors import StorageError, VerificationError
from ckpt_tasks.storage import CheckpointStore
from ckpt_tasks.storage.checksum import adler32_combine
from ckpt_tasks.storage.store import LATEST
from helpers.store_writer import content_for
from store_helpers import FAST, WRITER, make_file, read_latest


# -- round trips ---------------------------------------------------------------------------------

def test_save_list_latest_fetch_verify_restore(location, tmp_path):
    store = location.store()
    assert store.list() == [] and store.latest() is None  # the storage answered "nothing here"
    assert store.restore(tmp_path / "none.bin") is None
    assert not (tmp_path / "none.bin").exists()

    saved = [store.save(make_file(tmp_path, step), step) for step in (0, 5, 10)]
    listed = store.list()
    assert [c.step for c in listed] == [0, 5, 10]
    assert listed == saved  # what save returned is what a reader sees
    assert store.latest() == saved[-1]
    pointer = read_latest(location)
    # What earlier versions read, and the index of the kept manifests that this one reads.
    assert (pointer["step"], pointer["manifest"]) == (10, saved[-1].manifest_name)
    assert [entry["name"] for entry in pointer["index"]] == [c.name for c in saved]

    for checkpoint in listed:
        assert store.verify(checkpoint) == checkpoint
        dest = store.fetch(checkpoint, tmp_path / "fetched" / f"{checkpoint.step}.bin")
        assert dest.read_bytes() == content_for(checkpoint.step)
    assert store.verify() == saved[-1]  # default: the latest

    restored = store.restore(tmp_path / "restored.bin")
    assert restored == saved[-1]
    assert (tmp_path / "restored.bin").read_bytes() == content_for(10)
    # nothing but committed files (data + manifest) and LATEST: no temporary left behind
    assert location.names() == sorted([LATEST] + [n for c in saved for n in (c.name, c.manifest_name)])

    # a second store object (another process's view) sees the same checkpoints
    assert CheckpointStore(location.url, retry=FAST).list() == listed


def test_large_checkpoints_go_up_in_parts(location, tmp_path):
    store = location.store(part_size=1000, keep_last=1)
    data = content_for(3)[:3500]
    (tmp_path / "big.bin").write_bytes(data)
    checkpoint = store.save(tmp_path / "big.bin", 3)
    stem = checkpoint.name[:-len(".ckpt")]
    assert [(p.name, p.size) for p in checkpoint.parts] == [
        (f"{stem}.ckpt.{k:04d}", size) for k, size in enumerate((1000, 1000, 1000, 500))]
    # each part as the storage verified it, and the whole checkpoint's adler32 combined from them
    assert [p.adler32 for p in checkpoint.parts] == [
        zlib.adler32(data[k * 1000:(k + 1) * 1000]) for k in range(4)]  # an int; hex in the manifest
    assert [p["adler32"] for p in json.loads((location.on_disk / checkpoint.manifest_name).read_text())["parts"]] \
        == [f"{zlib.adler32(data[k * 1000:(k + 1) * 1000]):08x}" for k in range(4)]
    assert checkpoint.adler32 == f"{zlib.adler32(data):08x}" and checkpoint.size == 3500
    manifest = json.loads((location.on_disk / checkpoint.manifest_name).read_text())
    assert [p["name"] for p in manifest["parts"]] == [p.name for p in checkpoint.parts]
    assert location.names() == sorted([LATEST, checkpoint.manifest_name] + [p.name for p in checkpoint.parts])
    assert store.list() == [checkpoint] and store.verify() == checkpoint
    assert store.fetch(checkpoint, tmp_path / "fetched.bin").read_bytes() == data
    assert store.restore(tmp_path / "restored.bin") == checkpoint
    assert (tmp_path / "restored.bin").read_bytes() == data

    # exactly one part's worth is one file; retention removes every part of the older one
    (tmp_path / "small.bin").write_bytes(data[:1000])
    small = store.save(tmp_path / "small.bin", 4)
    assert small.parts == () and small.data_files[0].path == small.path
    assert location.names() == sorted([LATEST, small.name, small.manifest_name])


# -- streaming saves: parts go up while the writer writes ------------------------------------------

def writer_of(data: bytes, chunk: int = 700):
    """A serialiser stand-in: writes ``data`` in chunks, as torch.save writes records."""
    def write(stream):
        for offset in range(0, len(data), chunk):
            stream.write(data[offset:offset + chunk])
    return write


@pytest.mark.parametrize("staged_in", ["memory", "directory"])
@pytest.mark.parametrize("size, parts", [(800, 0), (1000, 0), (1001, 2), (3500, 4), (10_000, 10)])
def test_a_streaming_save_commits_what_the_writer_wrote(location, tmp_path, size, parts, staged_in):
    store = location.store(part_size=1000)
    staging = tmp_path / "staging"
    staging.mkdir()
    data = content_for(7)[:size]
    held = []

    def write(stream):
        for offset in range(0, len(data), 700):
            stream.write(data[offset:offset + 700])
            held.append(stream.unreleased)

    checkpoint = store.save_streaming(write, 7, {"loss": 0.5},
                                      staging_dir=staging if staged_in == "directory" else None)
    # one part's worth or less stays one file, as with save()
    assert len(checkpoint.parts) == parts
    assert checkpoint.size == size and checkpoint.adler32 == f"{zlib.adler32(data):08x}"
    assert checkpoint.metadata["loss"] == 0.5
    assert store.list() == [checkpoint] and store.verify() == checkpoint
    assert store.fetch(checkpoint, tmp_path / "back.bin").read_bytes() == data
    stored = [d.path.rsplit("/", 1)[-1] for d in checkpoint.data_files]
    assert location.names() == sorted([LATEST, checkpoint.manifest_name] + stored)  # no temporaries
    assert os.listdir(staging) == []  # the staged bytes are gone with the commit
    assert not staging_descriptors()  # and so are their descriptors
    if staged_in == "memory" and parts:
        # the parts being published and the one being written, never more
        assert max(held) <= 3 * 1000, held


def staging_descriptors() -> list[str]:
    """What this process's open descriptors of staged checkpoints point to."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile
    return [t for t in targets if "ckpt-staging" in t]


def test_a_streaming_save_sends_parts_before_the_writer_is_done(location, tmp_path):
    store = location.store(part_size=1000)
    data = content_for(8)[:3500]

    def write(stream):
        stream.write(data[:2500])
        # Parts 0 and 1 are written: both must reach the storage while the writer waits here.
        deadline = time.monotonic() + 30
        while not {".ckpt.0000", ".ckpt.0001"} <= {n[-10:] for n in location.names() if ".partial-" not in n}:
            assert time.monotonic() < deadline, f"no part was published while writing: {location.names()}"
            time.sleep(0.01)
        stream.write(data[2500:])

    checkpoint = store.save_streaming(write, 8, staging_dir=tmp_path)
    assert [p.size for p in checkpoint.parts] == [1000, 1000, 1000, 500]
    assert store.fetch(checkpoint, tmp_path / "back.bin").read_bytes() == data


def test_a_failing_writer_commits_nothing(location, tmp_path):
    store = location.store(part_size=1000)
    first = store.save(make_file(tmp_path, 1, 800), 1)
    staging = tmp_path / "staging"
    staging.mkdir()

    def write(stream):
        stream.write(content_for(2)[:2500])  # two parts are complete and go up
        raise RuntimeError("the serialiser broke")

    with pytest.raises(RuntimeError, match="the serialiser broke"):
        store.save_streaming(write, 2, staging_dir=staging)
    assert store.list() == [first]
    assert location.names() == sorted([LATEST, first.name, first.manifest_name])  # its parts were removed
    assert os.listdir(staging) == []


def test_manifest_versions(location, tmp_path):
    store = location.store(part_size=1000)
    single = store.save(make_file(tmp_path, 1, 800), 1)
    parted = store.save(make_file(tmp_path, 2, 2500), 2)
    first = json.loads((location.on_disk / single.manifest_name).read_text())
    assert first["version"] == 1 and "parts" not in first  # what releases before parts read
    assert json.loads((location.on_disk / parted.manifest_name).read_text())["version"] == 2
    # a manifest from a newer release is an error, never "no checkpoint" or an older one
    newer = json.loads((location.on_disk / parted.manifest_name).read_text())
    newer["version"] = 3
    (location.on_disk / "step-000000000003-0000000c.json").write_text(json.dumps({**newer, "step": 3}))
    with pytest.raises(StorageError, match="version 3"):
        store.list()


def test_fetch_refuses_parts_that_do_not_make_up_the_checkpoint(location, tmp_path):
    store = location.store(part_size=1000)
    parted = store.save(make_file(tmp_path, 2, 2500), 2)
    short = dataclasses.replace(parted, parts=parted.parts[:2])  # a manifest that lost a part
    with pytest.raises(VerificationError, match="do not make up"):
        store.fetch(short, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    with pytest.raises(VerificationError, match="do not make up"):
        store.verify(short)


def test_parts_of_a_live_upload_are_not_taken_for_orphans(location, tmp_path):
    store = location.store()
    store.save(make_file(tmp_path, 1, 1000), 1)  # the location exists, made by its server
    old = time.time() - 2 * 3600
    # a long upload in parts: part 0 finished two hours ago, part 1 is still being written
    done = location.on_disk / "step-000000000009-0000000d.ckpt.0000"
    live = location.on_disk / ".step-000000000009-0000000d.ckpt.0001.partial-host-1-abc"
    # a dead writer's: every file old
    dead = [location.on_disk / "step-000000000008-0000000e.ckpt.0000",
            location.on_disk / ".step-000000000008-0000000e.ckpt.0001.partial-host-2-def"]
    for path in (done, live, *dead):
        path.write_bytes(b"x")
    for path in (done, *dead):
        os.utime(path, (old, old))
    store.save(make_file(tmp_path, 2, 1000), 2)  # retention runs
    names = location.names()
    assert done.name in names and live.name in names
    assert not [path for path in dead if path.name in names]


def test_a_corrupt_part_is_found_and_the_previous_checkpoint_used(location, tmp_path, caplog):
    store = location.store(part_size=1000, keep_last=3)
    first = store.save(make_file(tmp_path, 1, 2500), 1)
    second = store.save(make_file(tmp_path, 2, 2500), 2)
    middle = location.on_disk / second.parts[1].name
    flipped = bytearray(middle.read_bytes())
    flipped[10] ^= 0x01
    middle.write_bytes(bytes(flipped))
    with pytest.raises(VerificationError, match=f"step 2 .*{second.parts[1].name}"):
        store.verify()
    store.verify(first)
    caplog.set_level(logging.WARNING, logger="ckpt_tasks")
    assert store.restore(tmp_path / "restored.bin") == first
    assert (tmp_path / "restored.bin").read_bytes() == content_for(1)[:2500]
    assert "skipping checkpoint of step 2" in caplog.text


def test_adler32_combine_matches_zlib():
    rng = random.Random(5)
    for _ in range(300):
        first, second = rng.randbytes(rng.randint(0, 5000)), rng.randbytes(rng.choice([0, 1, 65521, 70000, 333]))
        assert adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second)) == zlib.adler32(first + second)
    ones = b"\xff" * 300_000  # sums that wrap the modulus many times
    assert adler32_combine(zlib.adler32(ones), zlib.adler32(ones), len(ones)) == zlib.adler32(ones + ones)


def test_manifest_fields(location, tmp_path):
    store = location.store()
    local = make_file(tmp_path, 7)
    before = datetime.now(timezone.utc)
    given = {"epoch": 3, "loss": 0.25, "fingerprint": "abc"}
    checkpoint = store.save(local, 7, metadata=given)
    after = datetime.now(timezone.utc)

    manifest = json.loads((location.on_disk / checkpoint.manifest_name).read_text())
    data = local.read_bytes()
    assert manifest["step"] == 7
    assert manifest["size"] == len(data) == (location.on_disk / checkpoint.name).stat().st_size
    assert manifest["adler32"] == f"{zlib.adler32(data):08x}"
    # the caller's metadata, as given (the store may add its own keys beside them)
    assert {key: manifest["metadata"][key] for key in given} == given
    assert manifest["name"] == checkpoint.name and checkpoint.name.startswith("step-000000000007-")
    assert manifest["path"] == f"{location.url}/{checkpoint.name}"
    created = datetime.fromisoformat(manifest["created"])
    assert created.tzinfo is not None
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= created <= after
    assert (location.on_disk / checkpoint.name).read_bytes() == data
    assert store.latest().metadata == manifest["metadata"]


def test_save_refuses_bad_arguments(location, tmp_path):
    store = location.store()
    local = make_file(tmp_path, 1)
    for step in (-1, 1.5, "3", True):
        with pytest.raises(ValueError):
            store.save(local, step)
    with pytest.raises(FileNotFoundError):
        store.save(tmp_path / "missing.bin", 1)
    assert store.list() == []


def test_unreadable_manifest_is_not_a_checkpoint(location, tmp_path):
    store = location.store()
    good = store.save(make_file(tmp_path, 1), 1)
    bad = store.save(make_file(tmp_path, 2), 2)
    (location.on_disk / bad.manifest_name).write_text("{not json")
    # LATEST's index still holds a checked copy of that manifest: readers go on, verify says it.
    assert store.list() == [good, bad]
    with pytest.raises(VerificationError, match=bad.manifest_name):
        store.verify(bad)
    (location.on_disk / LATEST).unlink()  # without the index the manifest alone decides
    assert store.list() == [good]


# -- two writers on one location -----------------------------------------------------------------

def test_a_lower_step_never_moves_latest_back(location, tmp_path):
    ahead, behind = location.store(keep_last=10), location.store(keep_last=10)
    ahead.save(make_file(tmp_path, 10, 1000), 10)
    late = behind.save(make_file(tmp_path, 4, 1000), 4)  # a duplicate job that lags behind
    assert read_latest(location)["step"] == 10
    assert ahead.latest().step == behind.latest().step == 10
    assert late in ahead.list()  # committed all the same, just not the newest


def test_two_writer_processes(location, tmp_path):
    """Two processes save interleaved steps (even / odd) into one location.

    While they run, the newest checkpoint a reader sees never goes backwards and
    always verifies; when both are done, latest() and LATEST name the highest step.
    """
    count = 12
    commands = [[sys.executable, str(WRITER), location.url, "--start", str(first), "--stride", "2",
                 "--count", str(count), "--keep-last", "4", "--min-size", "2000", "--max-size", "60000",
                 "--workdir", str(tmp_path / f"w{first}")] for first in (0, 1)]
    writers = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    reader = location.store()
    seen, pointers = [], []
    try:
        while any(w.poll() is None for w in writers):
            latest = reader.latest()
            if latest is not None:
                seen.append(latest.step)
            if (location.on_disk / LATEST).exists():
                pointers.append(read_latest(location)["step"])
            time.sleep(0.02)
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
    outputs = [w.communicate() for w in writers]
    assert [w.returncode for w in writers] == [0, 0], outputs
    assert seen == sorted(seen), seen  # latest() never went backwards
    final = reader.latest()
    highest = 2 * count - 1
    assert final.step == highest
    assert read_latest(location)["step"] == highest  # the pointer ends on the newest commit
    assert [c.step for c in reader.list()] == list(range(highest - 3, highest + 1))
    for checkpoint in reader.list():
        reader.verify(checkpoint)
    reader.restore(tmp_path / "restored.bin")
    assert (tmp_path / "restored.bin").read_bytes() == content_for(highest, 2000, 60000)
    assert pointers, "the reader never saw LATEST"
