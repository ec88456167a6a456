"""The backend contract (ckpt_tasks/storage/backend.py), the same cases on every backend:
a local directory, a real XRootD server, and ``mem://``, a test double registered here
only, which shows that a new backend is one module plus one registry line."""
from __future__ import annotations

import os
import uuid
import zlib
from dataclasses import dataclass

import pytest

import mem_backend
from ckpt_tasks.errors import StorageNotFound, StoragePermissionDenied, StorageUnavailable, VerificationError
from ckpt_tasks.storage import CheckpointStore, KeepLast, RetryPolicy, publish_file
from ckpt_tasks.storage.backend import StorageBackend
from ckpt_tasks.storage.commit import PARTIAL_MARKER
from ckpt_tasks.storage.location import validate_location
from ckpt_tasks.storage.registry import open_location, register_backend, unregister_backend

FAST = RetryPolicy(deadline=5, initial_delay=0.05, max_delay=0.2)


@pytest.fixture(autouse=True)
def mem_scheme():
    register_backend(mem_backend.SCHEME, mem_backend.open_memory)  # the one registry line
    yield
    unregister_backend(mem_backend.SCHEME)


@dataclass
class Place:
    """A fresh location on one backend: its URL or path, the backend, and its root."""

    location: str
    backend: StorageBackend
    root: str

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"


@pytest.fixture(params=["local", "xrootd", "mem"])
def place(request, tmp_path, mem_scheme) -> Place:
    name = f"contract-{uuid.uuid4().hex[:8]}"
    if request.param == "local":
        location = str(tmp_path / name)
    elif request.param == "xrootd":
        location = f"{request.getfixturevalue('xrootd_server').url}//{name}"
    else:
        location = f"mem://tests/{name}"
    opened = open_location(location, deadline=FAST.deadline)
    return Place(location, opened.backend, opened.root)


def local_file(tmp_path, data: bytes) -> str:
    path = tmp_path / f"src-{uuid.uuid4().hex[:6]}"
    path.write_bytes(data)
    return str(path)


def test_the_registry_gives_a_backend_of_the_contract(place):
    assert isinstance(place.backend, StorageBackend)
    assert validate_location(place.location) == place.location or place.location.startswith("/")


def test_absent_is_false_or_not_found(place):
    missing = place.path("missing")
    assert place.backend.exists(missing) is False
    for operation in (place.backend.stat, place.backend.read_bytes, place.backend.listdir,
                      place.backend.checksum, place.backend.compute_checksum):
        with pytest.raises(FileNotFoundError) as raised:
            operation(missing)
        assert isinstance(raised.value, StorageNotFound)
    assert place.backend.remove(missing, silent=True) is False
    with pytest.raises(StorageNotFound):
        place.backend.remove(missing, silent=False)


def test_directories_listing_and_removal(place, tmp_path):
    files = place.backend
    files.mkdir_rec(place.path("a/b"))
    files.mkdir_rec(place.path("a/b"))  # already there: fine
    assert files.exists(place.path("a/b"))
    files.upload(local_file(tmp_path, b"12345"), place.path("a/f.txt"))
    assert files.listdir(place.path("a")) == ["b", "f.txt"]
    assert files.stat(place.path("a/f.txt")).st_size == 5
    assert files.remove(place.path("a")) is True  # a tree
    assert files.exists(place.path("a")) is False


def test_upload_returns_the_verified_adler32_and_honours_spans(place, tmp_path):
    files, data = place.backend, os.urandom(3000)
    source = local_file(tmp_path, data)
    called = []
    assert files.upload(source, place.path("d/whole"), on_sent=lambda: called.append(1)) == zlib.adler32(data)
    assert called == [1]
    assert files.upload(source, place.path("d/span"), span=(1000, 500)) == zlib.adler32(data[1000:1500])
    assert files.read_bytes(place.path("d/span")) == data[1000:1500]
    assert files.checksum(place.path("d/whole")) == files.compute_checksum(place.path("d/whole")) == zlib.adler32(data)
    with pytest.raises(VerificationError):
        files.upload(source, place.path("d/wrong"), adler32=zlib.adler32(data) ^ 1)


def test_download_whole_and_at_an_offset_checked(place, tmp_path):
    files, data = place.backend, os.urandom(2000)
    files.upload(local_file(tmp_path, data), place.path("blob"))
    files.download(place.path("blob"), tmp_path / "whole", adler32=zlib.adler32(data))
    assert (tmp_path / "whole").read_bytes() == data
    (tmp_path / "big").write_bytes(b"\0" * 3000)
    files.download(place.path("blob"), tmp_path / "big", adler32=zlib.adler32(data), at=500)
    assert (tmp_path / "big").read_bytes() == b"\0" * 500 + data + b"\0" * 500
    with pytest.raises(VerificationError):
        files.download(place.path("blob"), tmp_path / "bad", adler32=zlib.adler32(data) ^ 1)


def test_rename_replaces_the_destination(place, tmp_path):
    files = place.backend
    files.upload(local_file(tmp_path, b"old"), place.path("dst"))
    files.upload(local_file(tmp_path, b"new"), place.path("src"))
    files.rename(place.path("src"), place.path("dst"))
    assert files.read_bytes(place.path("dst")) == b"new"
    assert files.exists(place.path("src")) is False


def test_publish_file_leaves_the_file_and_nothing_else(place, tmp_path):
    files = place.backend
    files.mkdir_rec(place.root)
    published = publish_file(files, local_file(tmp_path, b"payload"), place.path("ckpt"))
    assert (published.size, published.adler32) == (7, zlib.adler32(b"payload"))
    assert files.listdir(place.root) == ["ckpt"]
    assert not any(PARTIAL_MARKER in name for name in files.listdir(place.root))


def test_checkpoint_store_saves_lists_verifies_restores(place, tmp_path):
    store = CheckpointStore(place.location, retry=FAST, part_size=1000, retention=KeepLast(2))
    small, large = os.urandom(700), os.urandom(2500)
    first = store.save(local_file(tmp_path, small), 1, {"loss": 1.0})
    second = store.save_streaming(lambda stream: stream.write(large), 2)
    assert not first.parts and len(second.parts) == 3
    again = CheckpointStore(place.location, retry=FAST)  # another process's view
    assert again.list() == [first, second] and again.latest() == second
    assert again.verify() == second and again.verify(first) == first
    assert again.restore(tmp_path / "restored") == second
    assert (tmp_path / "restored").read_bytes() == large
    assert again.fetch(first, tmp_path / "first").read_bytes() == small
    store.save(local_file(tmp_path, b"third"), 3)
    assert [c.step for c in store.list()] == [2, 3]  # KeepLast(2)


def test_the_store_retries_an_outage_and_not_a_refusal(tmp_path):
    """On the test double, whose faults come when asked: an outage that ends, a refusal."""
    storage = mem_backend.STORAGE
    store = CheckpointStore(f"mem://tests/faults-{uuid.uuid4().hex[:6]}", retry=FAST)
    storage.fail_next(StorageUnavailable("the server did not answer"), count=2)
    assert store.save(local_file(tmp_path, b"x"), 1).step == 1  # retried, then committed
    storage.fail_next(StoragePermissionDenied("permission denied"), count=1)
    before = storage.calls
    with pytest.raises(StoragePermissionDenied):
        store.list()
    assert storage.calls == before + 2  # the listing and LATEST, each once: raised at once, no second attempt
    assert [c.step for c in store.list()] == [1]


def test_an_unregistered_scheme_is_refused(tmp_path):
    unregister_backend(mem_backend.SCHEME)
    with pytest.raises(ValueError, match="unknown scheme 'mem'"):
        CheckpointStore("mem://tests/x")
