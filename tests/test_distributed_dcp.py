"""Sharded state through torch.distributed.checkpoint on a CheckpointStore.

The sharded state is a model sharded with FSDP2 (``fully_shard``, gloo on the CPU) and
its Adam state (DTensors), trained by tests/helpers/dcp_train.py on real rank processes
(no mocked collectives). In-process tests (one process, no process group) cover the
store's side: listing, verify, retention, restore as a directory DCP reads, a corrupt
newest checkpoint skipped, and the refusal to unpickle anything but DCP's metadata.
"""
from __future__ import annotations

import io
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import torch.distributed.checkpoint as dcp  # noqa: E402

from ckpt_tasks.cli import main as cli_main  # noqa: E402
from ckpt_tasks.distributed import free_port  # noqa: E402
from ckpt_tasks.distributed.dcp import (ShardedCheckpointError, _MetadataUnpickler, load_sharded,  # noqa: E402
                                        save_sharded)
from ckpt_tasks.distributed.launch import rank_environment  # noqa: E402
from ckpt_tasks.errors import VerificationError  # noqa: E402
from ckpt_tasks.storage import CheckpointStore  # noqa: E402
from ckpt_tasks.storage.sharded import is_sharded, shard_files  # noqa: E402
from store_helpers import FAST  # noqa: E402

TRAIN = str(Path(__file__).parent / "helpers" / "dcp_train.py")


def equal(a, b) -> bool:
    """Nested state dicts with the same keys and bit-identical tensors."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(equal, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


# -- one process: the store's side ----------------------------------------------------------


def small_state(seed: int, step: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    model = {"weight": torch.randn(3, 6, generator=generator), "bias": torch.randn(3, generator=generator)}
    return {"model": model, "step": step, "note": {"words": ["a", "b"], "seed": seed}}


def test_a_sharded_checkpoint_is_listed_verified_kept_and_loaded(location):
    store = location.store(keep_last=2)
    for step in (10, 20, 30):
        committed = save_sharded(small_state(step, step), store, step, metadata={"world_size": 1})
        assert committed.step == step and is_sharded(committed)
    listed = location.store().list()
    assert [c.step for c in listed] == [20, 30]  # retention: two kept, the parts of step 10 gone too
    assert not any(name.startswith("step-000000000010") for name in location.names())
    newest = listed[-1]
    assert newest.metadata["world_size"] == 1
    assert sorted(shard_files(newest)) == [".metadata", "__0_0.distcp"]
    assert location.store().verify(newest) == newest
    assert cli_main(["verify", "--all", location.url]) == 0

    state = small_state(0, 0)
    loaded = load_sharded(state, location.store())
    assert loaded == newest
    assert equal(state, small_state(30, 30))
    earlier = small_state(0, 0)
    assert load_sharded(earlier, location.store(), step=20).step == 20 and equal(earlier, small_state(20, 20))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_restore_gives_the_directory_of_dcp_files(tmp_path):
    store = CheckpointStore(tmp_path / "store", retry=FAST)
    save_sharded(small_state(5, 5), store, 5)
    restored = store.restore(tmp_path / "restored")
    assert restored.step == 5
    assert sorted(os.listdir(tmp_path / "restored")) == [".metadata", "__0_0.distcp"]
    # DCP's own reader takes the directory as it is (a plain DCP checkpoint).
    state = small_state(0, 0)
    dcp.load(state, checkpoint_id=str(tmp_path / "restored"), no_dist=True)
    assert equal(state, small_state(5, 5))
    assert cli_main(["restore", str(tmp_path / "store"), str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "__0_0.distcp").stat().st_size > 0
    # where a one-file restore left its file, the directory takes its place
    (tmp_path / "was-a-file").write_bytes(b"an older one-file checkpoint")
    assert store.restore(tmp_path / "was-a-file").step == 5
    assert sorted(os.listdir(tmp_path / "was-a-file")) == [".metadata", "__0_0.distcp"]


def test_a_corrupt_newest_sharded_checkpoint_is_skipped(tmp_path, caplog):
    store = CheckpointStore(tmp_path / "store", retry=FAST)
    save_sharded(small_state(1, 1), store, 1)
    newest = save_sharded(small_state(2, 2), store, 2)
    shard = Path(shard_files(newest)["__0_0.distcp"].path)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # rotted on the storage's disk: same size, other bytes
    shard.write_bytes(bytes(data))
    state = small_state(0, 0)
    assert load_sharded(state, store).step == 1
    assert equal(state, small_state(1, 1))
    assert "skipping sharded checkpoint of step 2" in caplog.text
    with pytest.raises(VerificationError):
        store.verify(newest)


def test_the_sharded_key_is_the_store_s_own_and_parts_are_distinct(tmp_path):
    from ckpt_tasks.storage.sharded import ShardedCommit

    store = CheckpointStore(tmp_path / "loc", part_size=100)
    payload = tmp_path / "state.bin"
    payload.write_bytes(b"x" * 250)
    # a user's own "sharded" key would make restore read a plain checkpoint as a sharded one
    with pytest.raises(ValueError, match="'sharded' is the store's own"):
        store.save(payload, 1, metadata={"sharded": {"strategy": "fsdp"}})
    commit = ShardedCommit(store, 2)
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(b"a" * 100)
    second.write_bytes(b"b" * 300)
    shards = [commit.publish(1, first, "__0_0.distcp"), commit.publish(1, second, "__1_0.distcp")]
    with pytest.raises(ValueError, match="distinct parts"):  # one part, overwritten: never committed
        commit.commit(shards)
    assert store.latest() is None


def test_the_metadata_unpickler_calls_nothing_but_dcp_metadata(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    with pytest.raises(pickle.UnpicklingError, match="refused"):
        _MetadataUnpickler(io.BytesIO(pickle.dumps(Payload()))).load()
    assert not (tmp_path / "ran").exists()


def test_a_non_tensor_value_that_is_not_plain_data_is_refused_on_load(tmp_path):
    store = CheckpointStore(tmp_path / "store", retry=FAST)
    save_sharded({"w": torch.ones(3), "obj": Path("/x")}, store, 1)  # a Path: not loadable by weights_only
    with pytest.raises(ShardedCheckpointError, match="rank 0: VerificationError: obj in .* is not plain data"):
        load_sharded({"w": torch.zeros(3), "obj": None}, store)


# -- real ranks ----------------------------------------------------------------------------


def start(store: str, world: int, tmp: Path, name: str, *options: str) -> list[subprocess.Popen]:
    port = free_port()
    scratch = tmp / "scratch"  # staging directories of killed ranks stay in the test's directory
    scratch.mkdir(exist_ok=True)
    args = [sys.executable, TRAIN, "--store", store, "--log-dir", str(tmp / f"logs-{name}"),
            "--out-dir", str(tmp / name), *options]
    return [subprocess.Popen(args, env={**rank_environment(rank, world, port), "TMPDIR": str(scratch)},
                             stderr=(tmp / f"{name}-{rank}.err").open("w")) for rank in range(world)]


def finish(ranks: list[subprocess.Popen], tmp: Path, name: str, timeout: float = 240) -> None:
    for rank, process in enumerate(ranks):
        assert process.wait(timeout=timeout) == 0, (tmp / f"{name}-{rank}.err").read_text()[-3000:]


def log(tmp: Path, name: str, rank: int) -> str:
    path = tmp / f"logs-{name}" / f"rank-{rank}.log"
    return path.read_text() if path.exists() else ""


def test_fsdp2_state_saved_on_2_ranks_resumes_on_1_and_back_on_2(tmp_path):
    store = str(tmp_path / "store")
    finish(start(store, 2, tmp_path, "two", "--steps", "4"), tmp_path, "two")
    finish(start(store, 1, tmp_path, "one", "--steps", "7"), tmp_path, "one")
    assert "loaded 4" in log(tmp_path, "one", 0)
    # The 1-rank load holds every tensor the 2 ranks saved: model and Adam state, unsharded.
    saved_by_two, loaded_by_one = (torch.load(tmp_path / name, weights_only=True)
                                   for name in ("two/final.pt", "one/loaded.pt"))
    assert equal(loaded_by_one, saved_by_two)
    assert not equal(torch.load(tmp_path / "one/final.pt", weights_only=True), saved_by_two)  # it trained on

    finish(start(store, 2, tmp_path, "again", "--steps", "9"), tmp_path, "again")
    assert "loaded 7" in log(tmp_path, "again", 0) and "loaded 7" in log(tmp_path, "again", 1)
    assert equal(torch.load(tmp_path / "again/loaded.pt", weights_only=True),
                 torch.load(tmp_path / "one/final.pt", weights_only=True))
    assert "step 9 loss" in log(tmp_path, "again", 1)
    checkpoints = CheckpointStore(store).list()
    assert [(c.step, c.metadata["world_size"], len(c.parts)) for c in checkpoints] == [(4, 2, 3), (7, 1, 2), (9, 2, 3)]


def wait_for_line(tmp: Path, name: str, rank: int, pattern: str, ranks: list[subprocess.Popen],
                  timeout: float = 180) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log(tmp, name, rank), re.MULTILINE)
        if match:
            return match
        if any(process.poll() is not None for process in ranks):
            pytest.fail(f"a rank ended before {pattern!r}: "
                        + " | ".join((tmp / f"{name}-{r}.err").read_text()[-1500:] for r in range(len(ranks))))
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {pattern!r} in rank {rank}'s log")


def assert_complete_or_absent(location, world: int) -> list:
    """Every checkpoint a reader finds has all its shards, as its manifest says."""
    store = location.store()
    checkpoints = store.list()
    for checkpoint in checkpoints:
        assert is_sharded(checkpoint) and len(checkpoint.parts) == world + 1
        store.verify(checkpoint)
    return checkpoints


def test_a_sigkilled_rank_leaves_the_newest_sharded_checkpoint_complete_or_absent(location, tmp_path):
    """Rounds of 2 ranks saving every step, each ended by a SIGKILL of one rank: right
    after that rank published its shard, on rank 0 once every rank has published (before
    the manifest) and once it has committed (before the others hear of it), or at a random
    moment; each next round resumes from what the previous left."""
    rng = random.Random(19)
    kills = [(1, "published"), (0, "published"), (0, "finishing"), (0, "committed"), (rng.randrange(2), "random")]
    resumed_from = 0
    for round_, (victim, when) in enumerate(kills):
        name = f"round{round_}"
        pause = "0" if when == "random" else "0.8"
        ranks = start(location.url, 2, tmp_path, name, "--steps", "1000", "--save-every", "1", "--width", "256",
                      "--pause", pause)
        try:
            if resumed_from:
                wait_for_line(tmp_path, name, victim, rf"^loaded {resumed_from}$", ranks)
            first = int(wait_for_line(tmp_path, name, victim, r"^saved (\d+) ", ranks).group(1))
            target = first + 1
            if when == "random":
                time.sleep(rng.uniform(0.0, 2.0))
            else:
                wait_for_line(tmp_path, name, victim, rf"^{when} {target}$", ranks)
            ranks[victim].kill()
            # The other rank fails by itself: its collective with the dead one breaks.
            survivor = ranks[1 - victim]
            survivor.wait(timeout=60)
            assert survivor.returncode not in (0, None)
        finally:
            for process in ranks:
                process.kill()
                process.wait()
        checkpoints = assert_complete_or_absent(location, 2)
        assert checkpoints and checkpoints[-1].step >= first
        if when in ("published", "finishing"):
            # Shards on the storage, but no manifest: the checkpoint of that step does not exist.
            assert checkpoints[-1].step == target - 1
            assert any(re.match(rf"step-{target:012d}-[0-9a-f]{{8}}\.ckpt\.000[12]$", n) for n in location.names())
            assert not any(n.startswith(f"step-{target:012d}") and n.endswith(".json") for n in location.names())
        elif when == "committed":
            assert checkpoints[-1].step == target  # complete, though no rank saw its save return
        resumed_from = checkpoints[-1].step

    # The newest complete checkpoint resumes on one rank, which trains on.
    ranks = start(location.url, 1, tmp_path, "last", "--steps", str(resumed_from + 2), "--width", "256")
    finish(ranks, tmp_path, "last")
    assert f"loaded {resumed_from}" in log(tmp_path, "last", 0)
    assert location.store().latest().step == resumed_from + 2


def test_a_failed_direct_dcp_save_leaves_no_staging_directory(tmp_path):
    from ckpt_tasks.distributed.dcp import StoreWriter

    store = CheckpointStore(tmp_path / "loc")
    staging = tmp_path / "staging"
    staging.mkdir()
    writer = StoreWriter(store, 3, staging_dir=str(staging))
    # the location turned into a file: every upload fails, inside DCP's own call
    (tmp_path / "loc").write_text("not a directory")
    with pytest.raises(BaseException):  # DCP's CheckpointException is a BaseException
        dcp.save({"weights": torch.ones(4)}, storage_writer=writer, no_dist=True)
    assert list(staging.iterdir()) == []  # the writer was never closed, yet its staging is gone
