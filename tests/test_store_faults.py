"""CheckpointStore under faults: SIGKILLed writers, a server restarted mid-upload,
bit rot on the server's disk, and storage that cannot be used (unreachable, bad
URL, permission denied, read-only, full disk).

The SIGKILL stress runs ``CKPT_TASKS_STRESS_KILLS`` kills per backend: 30 by
default (CI, about a minute per backend); the full run uses 200::

    CKPT_TASKS_STRESS_KILLS=200 .venv/bin/python -m pytest tests/test_store_faults.py -k sigkill
"""
from __future__ import annotations

import hashlib
import logging
import os
import pwd
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from ckpt_tasks.errors import StorageError, StorageUnavailable, VerificationError
from ckpt_tasks.storage import Checkpoint, CheckpointStore, RetryPolicy
from ckpt_tasks.storage.commit import PARTIAL_MARKER
from conftest import IN_CI, unavailable
from helpers.store_writer import content_for
from xrootd_server import ServerUnavailable, XRootDServer, free_port
from waiting import run_cli as cli

WRITER = Path(__file__).parent / "helpers" / "store_writer.py"
KILLS = int(os.environ.get("CKPT_TASKS_STRESS_KILLS", "30"))
#: the RetryPolicy deadline of the "storage cannot be used" tests
DEADLINE = 3.0
#: one attempt that began just before the deadline may still run: at most two calls
#: (e.g. mkdir, then the stat that tells "exists" from "failed") of ceil(DEADLINE) s each
ATTEMPT_SLACK = 2 * DEADLINE + 2.0


def assert_committed_only(store: CheckpointStore, on_disk: Path) -> list[Checkpoint]:
    """Every listed checkpoint verifies; a data file without a manifest is never listed."""
    listed = store.list()
    for checkpoint in listed:
        store.verify(checkpoint)
    names = set(os.listdir(on_disk)) if on_disk.exists() else set()
    for checkpoint in listed:
        stored = [data.path.rsplit("/", 1)[-1] for data in checkpoint.data_files]
        assert checkpoint.manifest_name in names and set(stored) <= names, f"{checkpoint.name} is incomplete"
    return listed


# -- SIGKILL at random moments -------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_stress(location, tmp_path):
    """A writer saving steps 0, 1, 2, ... is SIGKILLed at random moments and resumed
    from latest(), like an evicted training. After every kill the newest checkpoint
    verifies, restores to exactly the bytes of its step, and the step never goes back."""
    url, on_disk = location
    seed = int(os.environ.get("CKPT_TASKS_STRESS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    store = CheckpointStore(url, retry=RetryPolicy(deadline=30, initial_delay=0.2))
    previous, kills_mid_upload = -1, 0
    log = tmp_path / "writer.log"
    for kill in range(KILLS):
        partials = {n for n in os.listdir(on_disk) if PARTIAL_MARKER in n} if on_disk.exists() else set()
        with open(log, "ab") as stderr:
            writer = subprocess.Popen(
                [sys.executable, str(WRITER), url, "--start", "auto", "--keep-last", "3",
                 "--workdir", str(tmp_path / "work")],
                stdout=subprocess.PIPE, stderr=stderr)
        try:
            assert writer.stdout.readline().strip() == b"ready", log.read_text(errors="replace")
            time.sleep(rng.uniform(0.0, 0.5))
            os.kill(writer.pid, signal.SIGKILL)
        finally:
            writer.kill()
            output = writer.communicate()[0].decode()
        assert writer.returncode == -signal.SIGKILL, (seed, kill, output, log.read_text(errors="replace"))
        if on_disk.exists() and {n for n in os.listdir(on_disk) if PARTIAL_MARKER in n} - partials:
            kills_mid_upload += 1  # the kill left a temporary file: it hit an upload

        latest = store.latest()
        if latest is None:
            assert previous == -1, (seed, kill)
            continue
        assert latest.step >= previous, f"seed {seed}, kill {kill}: step went back {previous} -> {latest.step}"
        committed = [int(line.split()[1]) for line in output.splitlines() if line.startswith("committed")]
        if committed:  # what the writer reported as committed is never lost
            assert latest.step >= max(committed), (seed, kill, committed, latest)
        assert store.verify(latest) == latest
        restored = store.restore(tmp_path / "restored.bin")
        assert restored == latest, (seed, kill)
        assert (tmp_path / "restored.bin").read_bytes() == content_for(latest.step), (seed, kill)
        assert_committed_only(store, on_disk)
        previous = latest.step
    # the kills did not stop progress, and some of them did hit the middle of an upload
    assert previous >= KILLS // 2, f"seed {seed}: only reached step {previous} in {KILLS} runs"
    assert kills_mid_upload >= 1 or KILLS < 10, f"seed {seed}: no kill hit an upload"
    print(f"{KILLS} kills (seed {seed}), {kills_mid_upload} in the middle of an upload, last step {previous}")


# -- the server goes away in the middle of an upload ---------------------------------------------

def _write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as stream:
        for _ in range(size // (16 << 20)):
            chunk = os.urandom(16 << 20)
            digest.update(chunk)
            stream.write(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("deadline", [60.0, 1.0], ids=["retried", "short-deadline"])
def test_server_restart_during_upload(make_xrootd_server, tmp_path, caplog, deadline):
    server = make_xrootd_server()
    url, on_disk = f"{server.url}//restart", server.data_dir / "restart"
    store = CheckpointStore(url, keep_last=5, retry=RetryPolicy(deadline=deadline, initial_delay=0.5, max_delay=2))
    small = tmp_path / "small.bin"
    small.write_bytes(content_for(1))
    before = store.save(small, 1)
    big = tmp_path / "big.bin"
    big_sha = _write_random(big, 320 << 20)

    events: dict[str, float] = {}

    def saboteur():
        limit = time.monotonic() + 60
        while time.monotonic() < limit and "stopped" not in events:
            for entry in os.scandir(on_disk):
                if PARTIAL_MARKER in entry.name and entry.name.startswith(".step-000000000002"):
                    if entry.stat().st_size > 32 << 20:  # the upload is under way
                        server.stop()
                        events["stopped"] = time.monotonic()
                        events["partial_size"] = entry.stat().st_size
                        break
            time.sleep(0.005)
        if "stopped" in events:
            time.sleep(1.5)
            server.start()
            events["started"] = time.monotonic()

    thread = threading.Thread(target=saboteur)
    result, error = None, None
    caplog.set_level(logging.WARNING, logger="ckpt_tasks")
    thread.start()
    start = time.monotonic()
    try:
        result = store.save(big, 2)
    except StorageUnavailable as raised:
        error = raised
    finished = time.monotonic()
    elapsed = finished - start
    thread.join()
    if server.process is None:
        server.start()

    assert "stopped" in events, "the server was never stopped during the upload"
    assert events["stopped"] < finished and events["partial_size"] < big.stat().st_size
    if deadline > 10:
        # The retries (ours, or the XRootD client's own write recovery, which reopens the
        # file on the restarted server) outlast the outage: the checkpoint is committed.
        assert error is None, error
        assert isinstance(result, Checkpoint) and result.step == 2
        assert events["started"] < finished
    else:
        # either the retries happened to get through, or a loud error in bounded time
        assert (result is None) != (error is None)
        if error is not None:
            assert url in str(error) or server.url in str(error)
            assert elapsed < deadline + 70  # one copy attempt, bounded by the client's timeouts

    reader = CheckpointStore(url, keep_last=5, retry=RetryPolicy(deadline=30, initial_delay=0.5))
    listed = assert_committed_only(reader, on_disk)
    assert before in listed
    assert [c.step for c in listed] == ([1, 2] if result else [1])
    if result:
        fetched = reader.fetch(result, tmp_path / "fetched.bin")
        assert hashlib.sha256(fetched.read_bytes()).hexdigest() == big_sha
        reader.restore(tmp_path / "restored.bin")
        assert hashlib.sha256((tmp_path / "restored.bin").read_bytes()).hexdigest() == big_sha


# -- a byte flipped on the server's disk ---------------------------------------------------------

@pytest.mark.parametrize("mtime", ["changed", "kept"], ids=["overwritten", "bit-rot"])
def test_flipped_byte_is_found(location, tmp_path, caplog, mtime):
    """``kept``: silent corruption (the file's mtime does not change), which a checksum
    cached by the server (XRootD keeps it in an extended attribute) would not see."""
    url, on_disk = location
    store = CheckpointStore(url, keep_last=5, retry=RetryPolicy(deadline=5, initial_delay=0.1))
    saved = []
    for step in (1, 2, 3):
        (tmp_path / "state.bin").write_bytes(content_for(step))
        saved.append(store.save(tmp_path / "state.bin", step))
    for checkpoint in saved:
        store.verify(checkpoint)  # every checkpoint verified once (and its checksum cached, on XRootD)

    bad = saved[-1]
    data_file = on_disk / bad.name
    info = data_file.stat()
    with open(data_file, "r+b") as stream:
        stream.seek(bad.size // 2)
        byte = stream.read(1)
        stream.seek(bad.size // 2)
        stream.write(bytes([byte[0] ^ 0x01]))
    if mtime == "kept":
        os.utime(data_file, ns=(info.st_atime_ns, info.st_mtime_ns))
    else:
        os.utime(data_file, (info.st_atime + 5, info.st_mtime + 5))

    with pytest.raises(VerificationError) as raised:
        store.verify()
    assert bad.name in str(raised.value) and "step 3" in str(raised.value)
    store.verify(saved[1])  # the others are fine

    caplog.set_level(logging.WARNING, logger="ckpt_tasks")
    restored = store.restore(tmp_path / "restored.bin")
    assert restored == saved[1]
    assert (tmp_path / "restored.bin").read_bytes() == content_for(2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3" in m and bad.name in m for m in warnings), warnings

    result = cli("verify", url)
    assert result.returncode == 1, result
    assert bad.name in result.stdout and "CORRUPT" in result.stdout
    result = cli("verify", "--all", url)
    assert result.returncode == 1, result
    assert result.stdout.count("ok ") == 2 and result.stdout.count("CORRUPT") == 1
    assert saved[0].name in result.stdout and saved[1].name in result.stdout


# -- storage that cannot be used -----------------------------------------------------------------

def fails_fast(operation, location: str, expected=StorageError) -> StorageError:
    """Run ``operation``; it must raise ``expected`` naming ``location`` within the deadline."""
    start = time.monotonic()
    with pytest.raises(expected) as raised:
        operation()
    elapsed = time.monotonic() - start
    assert location in str(raised.value), raised.value
    assert elapsed < DEADLINE + ATTEMPT_SLACK, f"{elapsed:.1f} s for: {raised.value}"
    return raised.value


def short_retry() -> RetryPolicy:
    return RetryPolicy(deadline=DEADLINE, initial_delay=0.2, max_delay=1.0)


@pytest.mark.parametrize("server", ["127.0.0.1:{port}", "no-such-host.invalid:1094"],
                         ids=["unreachable", "unresolvable"])
def test_unusable_server_is_loud_and_bounded(tmp_path, server):
    url = f"root://{server.format(port=free_port())}//ckpt"
    store = CheckpointStore(url, retry=short_retry())
    state = tmp_path / "state.bin"
    state.write_bytes(content_for(1))
    fails_fast(lambda: store.save(state, 1), url, StorageUnavailable)
    fails_fast(store.list, url, StorageUnavailable)  # never "no checkpoints"
    fails_fast(store.latest, url, StorageUnavailable)
    fails_fast(lambda: store.restore(tmp_path / "out.bin"), url, StorageUnavailable)  # never None
    assert not (tmp_path / "out.bin").exists()
    result = cli("ls", "--deadline", str(DEADLINE), url, timeout=60)
    assert result.returncode == 2 and "ckpt" in result.stderr and "no checkpoints" not in result.stdout


@pytest.mark.parametrize("where", ["missing-subdir", "existing-dir"])
def test_permission_denied_on_the_server(xrootd_server, tmp_path, where):
    locked = xrootd_server.data_dir / f"locked-{uuid.uuid4().hex[:8]}"
    locked.mkdir()  # owned by root, 0755: the server (user xrootd) cannot write in it
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory the server's user cannot write")
    path = f"/{locked.name}/run" if where == "missing-subdir" else f"/{locked.name}"
    url = f"{xrootd_server.url}/{path}"
    store = CheckpointStore(url, retry=short_retry())
    state = tmp_path / "state.bin"
    state.write_bytes(content_for(1))
    error = fails_fast(lambda: store.save(state, 1), url)
    assert "permission denied" in str(error).lower()
    assert os.listdir(locked) == []


@pytest.fixture
def tmpfs():
    """Mount small tmpfs file systems (we are root in CI); unmounted afterwards."""
    mounted = []

    def mount(directory: Path, options: str) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            if IN_CI:
                pytest.fail(f"CI=true and mount -t tmpfs failed: {done.stderr}")
            pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
        mounted.append(directory)
        return directory

    yield mount
    for directory in reversed(mounted):
        subprocess.run(["umount", "-l", str(directory)], check=False)


def test_full_local_disk(tmp_path, tmpfs):
    disk = tmpfs(tmp_path / "disk", "size=1m")
    store = CheckpointStore(disk / "ckpt", retry=short_retry())
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(100_000))
    first = store.save(small, 1)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 << 20))
    error = fails_fast(lambda: store.save(big, 2), str(disk / "ckpt"))
    assert "full" in str(error) or "space" in str(error)
    assert store.list() == [first]  # the committed checkpoint is untouched
    assert not [n for n in os.listdir(disk / "ckpt") if PARTIAL_MARKER in n]  # no temporary left
    store.restore(tmp_path / "restored.bin")
    assert (tmp_path / "restored.bin").read_bytes() == small.read_bytes()


def test_read_only_local_disk(tmp_path, tmpfs):
    disk = tmpfs(tmp_path / "ro", "size=1m,ro")
    store = CheckpointStore(disk, retry=short_retry())
    state = tmp_path / "state.bin"
    state.write_bytes(content_for(1))
    error = fails_fast(lambda: store.save(state, 1), str(disk))
    assert "read-only" in str(error).lower()
    assert store.list() == []


def endless_writer(stream) -> None:
    """Writes until the commit gives up on it (StagingAbandoned); 10 s means it never did."""
    for _ in range(1000):
        stream.write(os.urandom(64 << 10))
        time.sleep(0.01)
    raise AssertionError("the writer was never stopped")


@pytest.mark.parametrize("part_size", [None, 256 << 10], ids=["one-file", "in-parts"])
def test_full_disk_on_the_server(tmp_path, tmpfs, part_size):
    """In parts, the first parts fit and are published before one fails: all of them go
    (also when they are streamed, and then the writer is stopped)."""
    try:
        server = XRootDServer()
    except ServerUnavailable as error:
        unavailable(str(error))
    try:
        tmpfs(server.data_dir, "size=1m")
        if server.user:
            ids = pwd.getpwnam(server.user)
            os.chown(server.data_dir, ids.pw_uid, ids.pw_gid)
        try:
            server.start()
        except ServerUnavailable as error:
            unavailable(str(error))
        url = f"{server.url}//ckpt"
        store = CheckpointStore(url, retry=short_retry(), part_size=part_size)
        small = tmp_path / "small.bin"
        small.write_bytes(os.urandom(100_000))
        first = store.save(small, 1)
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(2 << 20))
        error = fails_fast(lambda: store.save(big, 2), url)
        assert "no space left" in str(error).lower()
        if part_size:
            # Streamed: the failed part stops a writer that would otherwise never end, whether
            # it is writing (staged on disk) or waiting for room (in memory, three parts at most).
            staging = tmp_path / "staging"
            staging.mkdir()
            for staging_dir in (staging, None):
                error = fails_fast(lambda: store.save_streaming(endless_writer, 3, staging_dir=staging_dir), url)
                assert "no space left" in str(error).lower()
            assert os.listdir(staging) == []
        assert store.list() == [first]
        left = os.listdir(server.data_dir / "ckpt")
        assert not [n for n in left if PARTIAL_MARKER in n or n.startswith("step-000000000002")], left
        store.restore(tmp_path / "restored.bin")
        assert (tmp_path / "restored.bin").read_bytes() == small.read_bytes()
    finally:
        server.stop()
        subprocess.run(["umount", "-l", str(server.data_dir)], check=False)
        server.cleanup()
