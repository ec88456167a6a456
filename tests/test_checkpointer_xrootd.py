"""The Checkpointer's xrootd mode against a real XRootD server."""
from __future__ import annotations

import hashlib
import random
import signal
import stat
import time
import uuid
import zlib
from pathlib import Path

import pytest

from ckpt_tasks import Checkpointer, StorageUnavailable
from ckpt_tasks.errors import StoragePermissionDenied
from ckpt_tasks.storage.xrootd import XRootDFileInterface
from checkpointer_child import Child
from xrootd_server import free_port


def write_text(path, value):
    Path(path).write_text(str(value))


def read_int(path):
    return int(Path(path).read_text())


@pytest.fixture
def remote_dir(xrootd_server):
    """A fresh directory on the session's server: (absolute server path, local view of it)."""
    name = f"/t-{uuid.uuid4().hex[:8]}"
    return name, xrootd_server.data_dir / name.lstrip("/")


def xrootd_checkpointer(tmp_path, server, target, **kwargs):
    return Checkpointer(tmp_path / "local.txt", write_text, read_int, checkpoint_transfer_mode="xrootd",
                        checkpoint_transfer_target=target, xrootd_server_name=server, **kwargs)


def test_step_uploads_and_restore_downloads(tmp_path, xrootd_server, remote_dir):
    path, on_disk = remote_dir
    ckpt = xrootd_checkpointer(tmp_path, xrootd_server.url, f"{path}/ckpt.txt", checkpoint_every=2)
    assert ckpt.restore(0) == 0  # server answered "no such file"
    for value in (1, 2, 3):
        ckpt.step(value)
    assert (on_disk / "ckpt.txt").read_text() == "3"
    assert sorted(p.name for p in on_disk.iterdir()) == ["ckpt.txt"]  # no temporary left

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    other = xrootd_checkpointer(fresh, xrootd_server.url, f"{path}/ckpt.txt")
    assert other.restore(0) == 3
    assert other.checkpoint_exists


def test_upload_is_verified_by_the_servers_adler32(tmp_path, xrootd_server, remote_dir):
    path, _ = remote_dir
    files = XRootDFileInterface(xrootd_server.url)
    local = tmp_path / "blob"
    local.write_bytes(b"x" * 1000)
    expected = zlib.adler32(b"x" * 1000)
    files.upload(local, f"{path}/good", adler32=expected)
    assert files.checksum(f"{path}/good") == expected
    with pytest.raises(Exception, match="(?i)checksum"):
        files.upload(local, f"{path}/bad", adler32=0x12345678)


def test_unreachable_server_raises_naming_it_within_bounded_time(tmp_path):
    port = free_port()  # nothing listens there
    ckpt = xrootd_checkpointer(tmp_path, f"root://127.0.0.1:{port}", "/ckpt.txt")
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=str(port)):
        ckpt.restore(0)
    assert time.monotonic() - started < 60  # the client's defaults would wait 10 minutes


def test_upload_to_a_stopped_server_raises_and_nothing_is_read_as_absent(tmp_path, make_xrootd_server):
    server = make_xrootd_server()
    ckpt = xrootd_checkpointer(tmp_path, server.url, "/c/ckpt.txt")
    ckpt.step(1)
    server.stop()
    with pytest.raises(StorageUnavailable, match=server.url.split("//")[1]):
        ckpt.step(2)
    with pytest.raises(StorageUnavailable):
        ckpt.restore(0)  # not "no checkpoint": the server did not answer
    server.start()
    # The client refuses a failed server for a few seconds (StreamErrorWindow); then it answers.
    deadline = time.monotonic() + 30
    while True:
        try:
            assert ckpt.restore(0) == 1
            break
        except StorageUnavailable:
            assert time.monotonic() < deadline, "server not usable 30 s after its restart"
            time.sleep(1)


def test_permission_denied_is_a_clear_error(tmp_path, make_xrootd_server):
    server = make_xrootd_server()
    (server.data_dir / "ro").mkdir(mode=0o555)  # owned by root, the server runs as xrootd
    ckpt = xrootd_checkpointer(tmp_path, server.url, "/ro/ckpt.txt")
    start = time.monotonic()
    with pytest.raises(StoragePermissionDenied, match="ro/ckpt.txt.*permission denied") as raised:
        ckpt.step(1)
    assert not isinstance(raised.value, StorageUnavailable)  # permanent: never retried
    assert time.monotonic() - start < 10


def test_sigterm_commits_to_the_server_and_exits_85(tmp_path, xrootd_server, remote_dir):
    path, on_disk = remote_dir
    body = f"""
    ckpt = Checkpointer(Path("local.txt").absolute(), write_text, read_int, checkpoint_transfer_mode="xrootd",
                        checkpoint_transfer_target="{path}/ckpt.txt", xrootd_server_name="{xrootd_server.url}",
                        checkpoint_every=50)
    start = ckpt.restore(0)
    say("restored", start)
    for i in range(start, 100_000):
        ckpt.step(i)
        say("step", i)
        time.sleep(0.01)
    """
    child = Child(body, tmp_path)
    child.wait_for("step 10")
    child.signal(signal.SIGTERM)
    assert child.finish() == 85, child.output
    last = max(int(line.split()[1]) for line in child.lines if line.startswith("step"))
    assert (on_disk / "ckpt.txt").read_text() == str(last)
    assert not (tmp_path / "local.txt").exists()

    child = Child(body, tmp_path)
    assert child.wait_for("restored") == f"restored {last}"
    child.signal(signal.SIGKILL)
    child.finish()


def test_xrootd_transfer_is_complete_or_absent_under_sigkill(tmp_path, xrootd_server, remote_dir):
    path, on_disk = remote_dir
    body = f"""
    import hashlib
    def write_blob(path, value):
        payload = bytes([value % 256]) * (4 << 20)
        Path(path).write_bytes(hashlib.sha256(payload).digest() + payload)
    ckpt = Checkpointer(Path("local.bin").absolute(), write_blob, lambda p: None, checkpoint_transfer_mode="xrootd",
                        checkpoint_transfer_target="{path}/ckpt.bin", xrootd_server_name="{xrootd_server.url}")
    for i in range(10_000):
        ckpt.step(i)
        say("step", i)
    """
    rng = random.Random(11)
    for attempt in range(6):
        child = Child(body, tmp_path)
        child.wait_for("step 1")
        time.sleep(rng.uniform(0, 0.3))
        child.signal(signal.SIGKILL)
        child.finish()
        blob = (on_disk / "ckpt.bin").read_bytes()
        assert hashlib.sha256(blob[32:]).digest() == blob[:32], f"torn file after kill {attempt}"


def test_uploads_are_readable_by_others_and_honour_a_base_with_a_path(tmp_path, xrootd_server, remote_dir):
    """Files as xrdcp makes them (rw-r--r--), and the checksum asked of the file just written."""
    path, on_disk = remote_dir
    local = tmp_path / "blob"
    local.write_bytes(b"y" * 5000)
    files = XRootDFileInterface(f"{xrootd_server.url}/{path}")  # a base inside the server
    assert files.upload(local, "sub/blob") == zlib.adler32(b"y" * 5000)
    assert stat.S_IMODE((on_disk / "sub" / "blob").stat().st_mode) == 0o644
