"""The local checkpoint path: temporary files of killed writers are cleaned up, others' are not."""
import os
import socket
import subprocess
import time

from ckpt_tasks.local_checkpoint import STALE_PARTIAL_SECONDS, LocalCheckpointPath


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _partial_of(checkpoint: LocalCheckpointPath, host: str, pid: int):
    """The name partial() gives, with another writer's host and process id."""
    own = checkpoint.partial().name
    mine = f"{socket.gethostname()}-{os.getpid()}-"
    prefix, rest = own.split(mine)
    return checkpoint.path.with_name(f"{prefix}{host}-{pid}-0123abcd{rest[8:]}")


def test_partials_of_a_killed_writer_are_removed_at_the_next_write(tmp_path):
    checkpoint = LocalCheckpointPath(tmp_path / "model.weights.h5")
    stale_file = _partial_of(checkpoint, socket.gethostname(), _dead_pid())
    stale_file.write_bytes(b"half a download")
    stale_dir = stale_file.with_name(stale_file.name + ".d")  # an unpacked directory checkpoint
    (stale_dir / "inner").mkdir(parents=True)
    young = _partial_of(checkpoint, socket.gethostname(), _dead_pid())
    young.write_bytes(b"maybe a writer in a container, at work")
    an_hour_ago = time.time() - STALE_PARTIAL_SECONDS - 1
    for path in (stale_file, stale_dir):
        os.utime(path, (an_hour_ago, an_hour_ago))

    checkpoint.write(lambda path: path.write_bytes(b"new"))

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.weights.h5", young.name])
    assert checkpoint.path.read_bytes() == b"new"


def test_partials_of_live_writers_and_other_hosts_are_kept(tmp_path):
    checkpoint = LocalCheckpointPath(tmp_path / "ckpt.pt")
    live = _partial_of(checkpoint, socket.gethostname(), os.getpid())
    elsewhere = _partial_of(checkpoint, "another-host.example", _dead_pid())
    for path in (live, elsewhere):
        path.write_bytes(b"in progress")

    assert checkpoint.remove_stale_partials() == []
    assert live.exists() and elsewhere.exists()
    assert live.suffix == ".pt"  # the layout the test builds is the one partial() uses
