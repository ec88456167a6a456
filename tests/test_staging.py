"""StagingFile: bytes a writer appends while readers take the parts already there."""
from __future__ import annotations

import errno
import os
import threading

import pytest

from ckpt_tasks.storage import staging as staging_module
from ckpt_tasks.storage.staging import StagingAbandoned, StagingFile


@pytest.fixture(params=["memory", "directory"])
def staging(request, tmp_path):
    made = StagingFile.in_memory() if request.param == "memory" else StagingFile.in_directory(tmp_path)
    yield made
    made.close()


def test_readers_get_the_bytes_as_they_are_written(staging):
    staging.write(b"a" * 100)
    assert staging.wait_for(50) == 100  # already there: no wait
    later = threading.Timer(0.2, lambda: (staging.write(b"b" * 100), staging.finish()))
    later.start()
    assert staging.wait_for(150) == 200  # waited for the writer
    assert staging.wait_for(10_000) == 200 and staging.finished  # finished with fewer
    with open(staging.path, "rb") as stream:
        assert stream.read() == b"a" * 100 + b"b" * 100


def test_the_writers_error_reaches_the_reader(staging):
    staging.write(b"x")
    staging.fail(RuntimeError("serialiser broke"))
    with pytest.raises(RuntimeError, match="serialiser broke"):
        staging.wait_for(None)


def test_a_full_staging_holds_the_writer_until_bytes_are_released():
    staging = StagingFile.in_memory(capacity=1 << 20)
    try:
        done = threading.Event()
        writer = threading.Thread(target=lambda: (staging.write(os.urandom(3 << 20)), done.set()))
        writer.start()
        assert staging.wait_for(1 << 20) == 1 << 20
        assert not done.wait(0.3), "the writer went past its capacity"
        assert staging.size == 1 << 20
        staging.release(0, 1 << 20)
        staging.wait_for(2 << 20)
        staging.release(1 << 20, 1 << 20)
        assert done.wait(10) and staging.size == 3 << 20
        writer.join()
    finally:
        staging.close()


def test_released_memory_is_given_back():
    staging = StagingFile.in_memory()
    try:
        staging.write(os.urandom(4 << 20))
        before = os.stat(staging.path).st_blocks
        staging.release(0, 3 << 20)
        after = os.stat(staging.path).st_blocks
        assert after * 512 <= (1 << 20) + 4096 < before * 512, (before, after)
        assert os.stat(staging.path).st_size == 4 << 20  # the offsets of what is left stay
    finally:
        staging.close()


def test_an_abandoned_staging_stops_a_waiting_writer():
    staging = StagingFile.in_memory(capacity=1000)
    errors = []

    def write():
        try:
            staging.write(b"z" * 5000)
        except StagingAbandoned as error:
            errors.append(error)

    writer = threading.Thread(target=write)
    try:
        writer.start()
        staging.wait_for(1000)
        staging.abandon()
        writer.join(10)
        assert not writer.is_alive() and errors, "the writer was not stopped"
        with pytest.raises(StagingAbandoned):
            staging.wait_for(2000)  # and a reader waiting for more is told
    finally:
        staging.close()


def test_a_complete_file_is_left_in_place(tmp_path):
    path = tmp_path / "done.bin"
    path.write_bytes(b"12345")
    staging = StagingFile.of_complete(path)
    assert staging.finished and staging.wait_for(None) == 5
    staging.close()
    assert path.read_bytes() == b"12345"


def test_close_frees_the_bytes_a_forked_process_still_holds():
    staging = StagingFile.in_memory()
    staging.write(os.urandom(2 << 20))
    held = os.open(staging.path, os.O_RDONLY)  # as a DataLoader worker forked meanwhile would
    try:
        assert os.fstat(held).st_blocks * 512 >= 2 << 20
        staging.close()
        assert os.fstat(held).st_blocks == 0
    finally:
        os.close(held)


def test_without_memfd_or_fallocate_it_stages_on_disk(tmp_path, monkeypatch):
    # Test doubles (named as such) for systems this machine is not: a kernel or sandbox that
    # refuses memfd_create, and a C library without fallocate.
    def refused(name):
        raise OSError(errno.ENOSYS, "memfd_create refused")

    monkeypatch.setattr(os, "memfd_create", refused)
    monkeypatch.setattr(staging_module, "_fallocate", None)
    staging = StagingFile.in_memory(capacity=100, directory=tmp_path)
    try:
        assert staging.path.parent == tmp_path
        staging.write(b"q" * 100)
        staging.release(0, 100)  # nothing to free with, and no error either
        staging.write(b"r" * 50)
        staging.finish()
        assert staging.path.read_bytes() == b"q" * 100 + b"r" * 50
    finally:
        staging.close()
    assert os.listdir(tmp_path) == []
