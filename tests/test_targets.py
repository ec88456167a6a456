"""The XRootD backend behind law's RemoteFileInterface and law's remote targets on it."""
from __future__ import annotations


import json
import stat as stat_module
import time
import uuid
import zlib

import pytest

from ckpt_tasks.errors import StorageError, StorageUnavailable
from ckpt_tasks.storage import XRootDFileInterface
from ckpt_tasks.storage.targets import XRootDRemoteFileInterface
from helpers.store_writer import content_for
from xrootd_server import free_port


# -- XRootDFileInterface: law's RemoteFileInterface ----------------------------------------------

@pytest.fixture
def xrd(xrootd_server):
    name = f"law-{uuid.uuid4().hex[:8]}"
    return XRootDRemoteFileInterface(f"{xrootd_server.url}//{name}"), xrootd_server.data_dir / name


def test_interface_exists_stat_listdir_mkdir_remove(xrd, tmp_path):
    files, on_disk = xrd
    assert files.exists("/") is False  # "no such file" from the server
    assert files.exists("/a/b", stat=True) is None
    assert files.mkdir_rec("/a/b", 0o755) is True
    files.mkdir_rec("/a/b", 0o755)  # already there: no error
    assert (on_disk / "a" / "b").is_dir()
    assert files.exists("/a/b") and files.isdir("/a/b") and not files.isfile("/a/b")
    (on_disk / "a" / "f.txt").write_bytes(b"12345")
    info = files.stat("/a/f.txt")
    assert info.st_size == 5 and stat_module.S_ISREG(info.st_mode)
    assert abs(info.st_mtime - (on_disk / "a" / "f.txt").stat().st_mtime) < 1.5
    assert files.isfile("/a/f.txt")
    assert files.listdir("/a") == ["b", "f.txt"]
    with pytest.raises(StorageError, match="no such file"):
        files.stat("/a/missing")
    with pytest.raises(StorageError):
        files.listdir("/a/missing")

    assert files.remove("/a/f.txt") is True
    assert files.remove("/a/f.txt") is False  # silent by default
    with pytest.raises(StorageError):
        files.remove("/a/f.txt", silent=False)
    (on_disk / "a" / "b" / "g.txt").write_bytes(b"x")
    assert files.remove("/a")  # recursive
    assert not (on_disk / "a").exists()
    assert files.exists("/a") is False


def test_interface_filecopy_to_and_from_local(xrd, tmp_path):
    files, on_disk = xrd
    local = tmp_path / "src.bin"
    local.write_bytes(content_for(3))
    src_uri, dst_uri = files.filecopy(f"file://{local}", "/dir/copy.bin")
    assert dst_uri == f"{files.base[0]}/dir/copy.bin"
    assert (on_disk / "dir" / "copy.bin").read_bytes() == content_for(3)
    back = tmp_path / "back.bin"
    files.filecopy("/dir/copy.bin", f"file://{back}")
    assert back.read_bytes() == content_for(3)
    assert files.checksum("/dir/copy.bin") == zlib.adler32(content_for(3))


def test_interface_is_loud_when_the_server_is_down():
    files = XRootDFileInterface(f"root://127.0.0.1:{free_port()}", timeout=2)
    start = time.monotonic()
    with pytest.raises(StorageUnavailable):
        files.exists("/anything")  # never "False" for an outage
    with pytest.raises(StorageUnavailable):
        files.listdir("/")  # never "[]" for an outage
    assert time.monotonic() - start < 30


def test_law_remote_targets_on_xrootd(xrd, tmp_path):
    from law.target.remote import RemoteDirectoryTarget, RemoteFileSystem, RemoteFileTarget

    files, on_disk = xrd
    fs = RemoteFileSystem(files)
    target = RemoteFileTarget("/out/result.json", fs)
    assert not target.exists()
    target.parent.touch()
    target.dump({"loss": 0.5}, formatter="json")
    assert target.exists()
    assert json.loads((on_disk / "out" / "result.json").read_text()) == {"loss": 0.5}
    assert target.load(formatter="json") == {"loss": 0.5}

    local = tmp_path / "local.bin"
    local.write_bytes(b"payload")
    other = RemoteFileTarget("/out/data.bin", fs)
    other.copy_from_local(str(local))
    other.copy_to_local(str(tmp_path / "copy.bin"))
    assert (tmp_path / "copy.bin").read_bytes() == b"payload"
    directory = RemoteDirectoryTarget("/out", fs)
    assert sorted(directory.listdir()) == ["data.bin", "result.json"]
    other.remove()
    assert not other.exists() and not (on_disk / "out" / "data.bin").exists()
    directory.remove()
    assert not directory.exists()
