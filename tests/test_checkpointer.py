"""The seed's Checkpointer, sentence by sentence, in-process and in real subprocesses."""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest

from ckpt_tasks import Checkpointer, JobAdError, StorageError, StorageUnavailable
from checkpointer_child import Child


def write_text(path, value):
    Path(path).write_text(str(value))


def read_int(path):
    return int(Path(path).read_text())


def make(tmp_path, **kwargs) -> Checkpointer:
    kwargs.setdefault("local_checkpoint_file", tmp_path / "local.txt")
    kwargs.setdefault("checkpoint_function", write_text)
    kwargs.setdefault("restore_function", read_int)
    ckpt = Checkpointer(**kwargs)
    return ckpt


# -- construction: bad arguments raise at once, naming the parameter ------------------------

@pytest.mark.parametrize("kwargs, parameter", [
    (dict(checkpoint_transfer_mode="ftp"), "checkpoint_transfer_mode"),
    (dict(checkpoint_transfer_mode="shared"), "checkpoint_transfer_target"),
    (dict(checkpoint_transfer_mode="xrootd", checkpoint_transfer_target="/a"), "xrootd_server_name"),
    (dict(checkpoint_transfer_mode="xrootd", xrootd_server_name="root://h:1094"), "checkpoint_transfer_target"),
    (dict(checkpoint_transfer_mode="xrootd", xrootd_server_name="http://h", checkpoint_transfer_target="/a"),
     "xrootd_server_name"),
    (dict(checkpoint_transfer_mode="xrootd", xrootd_server_name="root://h:1094",
          checkpoint_transfer_target="relative/a"), "checkpoint_transfer_target"),
    (dict(checkpoint_transfer_mode="xrootd", xrootd_server_name="root://h:1094",
          checkpoint_transfer_target="/a/../../etc/passwd"), "checkpoint_transfer_target"),
    (dict(checkpoint_transfer_mode="manual"), "checkpoint_transfer_callback"),
    (dict(checkpoint_transfer_mode="manual", checkpoint_transfer_callback="cp"), "checkpoint_transfer_callback"),
    (dict(checkpoint_function=None), "checkpoint_function"),
    (dict(restore_function=42), "restore_function"),
    (dict(checkpoint_every=0), "checkpoint_every"),
    (dict(checkpoint_every=2.5), "checkpoint_every"),
    (dict(checkpoint_exit_code=300), "checkpoint_exit_code"),
    (dict(on_SIGTERM_prehook="not callable"), "on_SIGTERM_prehook"),
    (dict(on_SIGTERM_prehook_kwargs=[1]), "on_SIGTERM_prehook_kwargs"),
    (dict(local_checkpoint_file=""), "local_checkpoint_file"),
])
def test_bad_arguments_raise_naming_the_parameter(tmp_path, kwargs, parameter):
    with pytest.raises((TypeError, ValueError), match=parameter):
        make(tmp_path, **kwargs)


def test_htcondor_mode_outside_a_job_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("_CONDOR_JOB_AD", raising=False)
    with pytest.raises(JobAdError, match="not running inside an HTCondor job"):
        make(tmp_path, checkpoint_transfer_mode="htcondor")


@pytest.mark.parametrize("mode", [None, "None"])
def test_mode_none_accepts_python_none_and_the_string(tmp_path, mode):
    ckpt = make(tmp_path, local_checkpoint_file=str(tmp_path / "c.txt"), checkpoint_transfer_mode=mode)
    ckpt.step(5)
    assert read_int(tmp_path / "c.txt") == 5
    assert isinstance(ckpt.local_checkpoint_file, Path)


# -- step(): store the value, checkpoint on calls 1, N+1, 2N+1, ... and transfer ---------------

def test_step_stores_the_value_internally(tmp_path):
    ckpt = make(tmp_path, checkpoint_every=10)
    ckpt.step(1)
    ckpt.step(2)
    assert ckpt.checkpoint_value == 2
    assert ckpt.step_counter == 2


@pytest.mark.parametrize("every", [1, 3, 10])
def test_checkpoint_every_writes_on_calls_1_then_every_nth(tmp_path, every):
    written = []

    def record(path, value):
        written.append(value)
        write_text(path, value)

    ckpt = make(tmp_path, checkpoint_function=record, checkpoint_every=every)
    for call in range(1, 26):
        ckpt.step(call)
    assert written == list(range(1, 26, every))


def test_default_checkpoint_every_is_one(tmp_path):
    ckpt = make(tmp_path)
    assert ckpt.checkpoint_every == 1
    for value in range(3):
        ckpt.step(value)
        assert read_int(tmp_path / "local.txt") == value


def test_step_transfers_each_checkpoint_in_shared_mode(tmp_path):
    target = tmp_path / "persistent" / "ckpt.txt"
    ckpt = make(tmp_path, checkpoint_transfer_mode="shared", checkpoint_transfer_target=target, checkpoint_every=3)
    seen = []
    for value in range(1, 8):
        ckpt.step(value)
        seen.append(read_int(target))
    # transferred on calls 1, 4, 7 only
    assert seen == [1, 1, 1, 4, 4, 4, 7]


def test_seed_unit_test_counter(tmp_path, monkeypatch):
    """The seed's own test: 10 000 steps with checkpoint_every=100, restore gives 9900."""
    monkeypatch.chdir(tmp_path)
    ckpt = Checkpointer(Path("checkpoint.txt"), write_text, read_int, checkpoint_every=100)
    start = ckpt.restore(0)
    assert start == 0
    for i in range(start, 10_000):
        ckpt.step(i)
    assert ckpt.restore(0) == 9900


# -- restore(): default when none exists, else transfer back and load ---------------------------

def test_restore_returns_default_when_no_checkpoint_exists(tmp_path):
    assert make(tmp_path).restore(-1) == -1


def test_restore_in_mode_none_loads_the_local_file(tmp_path):
    write_text(tmp_path / "local.txt", 41)
    assert make(tmp_path).restore(0) == 41


def test_restore_in_shared_mode_fetches_from_the_target(tmp_path):
    target = tmp_path / "persistent.txt"
    write_text(target, 17)
    ckpt = make(tmp_path, checkpoint_transfer_mode="shared", checkpoint_transfer_target=target)
    assert ckpt.restore(0) == 17
    assert read_int(tmp_path / "local.txt") == 17  # transferred to local_checkpoint_file


def test_restore_in_shared_mode_ignores_a_stale_local_file_when_storage_is_empty(tmp_path):
    write_text(tmp_path / "local.txt", 99)
    ckpt = make(tmp_path, checkpoint_transfer_mode="shared", checkpoint_transfer_target=tmp_path / "none.txt")
    assert ckpt.restore(0) == 0


def test_restore_raises_when_shared_storage_cannot_be_read(tmp_path):
    (tmp_path / "a_file").write_text("x")
    ckpt = make(tmp_path, checkpoint_transfer_mode="shared",
                checkpoint_transfer_target=tmp_path / "a_file" / "ckpt.txt")
    with pytest.raises(StorageError, match="a_file.*Not a directory"):  # InvalidStoragePath: at once
        ckpt.restore(0)


def test_restore_does_not_take_its_value_as_the_stored_value(tmp_path):
    # The seed's PyTorch example restores a state dict but checkpoints a model: saving the
    # restored value again on a signal would hand the checkpoint function the wrong type.
    write_text(tmp_path / "local.txt", 8)
    ckpt = make(tmp_path)
    assert ckpt.restore(0) == 8
    assert ckpt.checkpoint_value is None


def test_checkpoint_method_writes_without_transfer(tmp_path):
    target = tmp_path / "persistent.txt"
    ckpt = make(tmp_path, checkpoint_transfer_mode="shared", checkpoint_transfer_target=target)
    ckpt.checkpoint(3)
    assert read_int(tmp_path / "local.txt") == 3
    assert not target.exists()
    ckpt.transfer_checkpoint_files()
    assert read_int(target) == 3


# -- complete or absent ----------------------------------------------------------------------------

def test_failing_checkpoint_function_leaves_previous_checkpoint_intact(tmp_path):
    def fragile(path, value):
        Path(path).write_text("half")
        if value == "boom":
            raise RuntimeError("disk on fire")
        Path(path).write_text(str(value))

    ckpt = make(tmp_path, checkpoint_function=fragile)
    ckpt.step(1)
    with pytest.raises(RuntimeError):
        ckpt.step("boom")
    assert (tmp_path / "local.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.txt"]  # no partial file left


def test_checkpoint_function_that_ignores_its_path_is_reported(tmp_path):
    ckpt = make(tmp_path, checkpoint_function=lambda path, value: None)
    with pytest.raises(Exception, match="wrote nothing"):
        ckpt.step(1)


def test_shared_transfer_is_complete_or_absent_under_sigkill(tmp_path):
    """A writer killed at random moments never leaves a torn file at the target."""
    target = tmp_path / "shared" / "ckpt.bin"
    body = f"""
    import hashlib
    def write_blob(path, value):
        payload = bytes([value % 256]) * (8 << 20)
        Path(path).write_bytes(hashlib.sha256(payload).digest() + payload)
    ckpt = Checkpointer(Path("local.bin"), write_blob, lambda p: None,
                        checkpoint_transfer_mode="shared", checkpoint_transfer_target={str(target)!r})
    for i in range(10_000):
        ckpt.step(i)
        say("step", i)
    """
    import hashlib
    import random
    rng = random.Random(7)
    for attempt in range(8):
        child = Child(body, tmp_path)
        child.wait_for("step 1")
        time.sleep(rng.uniform(0, 0.3))
        child.signal(signal.SIGKILL)
        child.finish()
        blob = target.read_bytes()
        assert hashlib.sha256(blob[32:]).digest() == blob[:32], f"torn file after kill {attempt}"
    leftovers = [p.name for p in target.parent.iterdir() if p.name != target.name]
    assert all(".partial-" in name for name in leftovers)


# -- manual mode --------------------------------------------------------------------------------

def test_manual_mode_calls_callback_both_ways_with_kwargs(tmp_path):
    calls = []

    def copy(src, dst, **kwargs):
        calls.append((Path(src).name, Path(dst).name, kwargs))
        shutil.copy(src, dst)

    remote = tmp_path / "remote.txt"
    ckpt = make(tmp_path, checkpoint_transfer_mode="manual", checkpoint_transfer_target=remote,
                checkpoint_transfer_callback=copy, checkpoint_transfer_callback_kwargs={"token": "t"})
    assert ckpt.restore(0) == 0  # FileNotFoundError from the callback: no checkpoint yet
    ckpt.step(12)
    (tmp_path / "local.txt").unlink()
    assert ckpt.restore(0) == 12
    assert calls == [("remote.txt", "local.txt", {"token": "t"}),
                     ("local.txt", "remote.txt", {"token": "t"}),
                     ("remote.txt", "local.txt", {"token": "t"})]


def test_manual_mode_callback_errors_are_raised(tmp_path):
    def broken(src, dst, **kwargs):
        raise ConnectionError("storage down")

    ckpt = make(tmp_path, checkpoint_transfer_mode="manual", checkpoint_transfer_target="x",
                checkpoint_transfer_callback=broken)
    with pytest.raises(ConnectionError):
        ckpt.restore(0)


# -- htcondor mode, with a job ad file as HTCondor writes it ---------------------------------------

def job_ad(tmp_path, text: str) -> Path:
    path = tmp_path / ".job.ad"
    path.write_text(text)
    return path


HTCONDOR_AD = """ClusterId = 12
ProcId = 0
TransferCheckpoint = "local.txt"
SuccessCheckpointExitCode = 77
WantFTOnCheckpoint = true
"""


def test_htcondor_mode_reads_target_and_exit_code_from_the_job_ad(tmp_path, monkeypatch):
    monkeypatch.setenv("_CONDOR_JOB_AD", str(job_ad(tmp_path, HTCONDOR_AD)))
    monkeypatch.setenv("_CONDOR_SCRATCH_DIR", str(tmp_path))
    ckpt = make(tmp_path, checkpoint_transfer_mode="htcondor")
    assert ckpt.checkpoint_transfer_target == "local.txt"  # unquoted, unlike a line parser
    assert ckpt.checkpoint_exit_code == 77


def test_htcondor_mode_falls_back_to_checkpoint_exit_code(tmp_path, monkeypatch):
    ad = 'TransferCheckpoint = "local.txt, other"\nCheckpointExitCode = 86\n'
    monkeypatch.setenv("_CONDOR_JOB_AD", str(job_ad(tmp_path, ad)))
    monkeypatch.setenv("_CONDOR_SCRATCH_DIR", str(tmp_path))
    assert make(tmp_path, checkpoint_transfer_mode="htcondor").checkpoint_exit_code == 86


def test_htcondor_mode_refuses_a_file_htcondor_would_not_transfer(tmp_path, monkeypatch):
    ad = 'TransferCheckpoint = "other.txt"\nSuccessCheckpointExitCode = 85\n'
    monkeypatch.setenv("_CONDOR_JOB_AD", str(job_ad(tmp_path, ad)))
    monkeypatch.setenv("_CONDOR_SCRATCH_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="transfer_checkpoint_files"):
        make(tmp_path, checkpoint_transfer_mode="htcondor")


def test_htcondor_mode_without_transfer_checkpoint_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("_CONDOR_JOB_AD", str(job_ad(tmp_path, "SuccessCheckpointExitCode = 85\n")))
    with pytest.raises(JobAdError, match="TransferCheckpoint"):
        make(tmp_path, checkpoint_transfer_mode="htcondor")


# -- signals, in real subprocesses ------------------------------------------------------------------

LOOP = """
ckpt = Checkpointer(Path("local.txt"), write_text, read_int, {options}
                    on_SIGTERM_prehook=lambda **kw: Path("prehook.txt").write_text(repr(sorted(kw.items()))),
                    on_SIGTERM_prehook_kwargs={{"reason": "evicted"}})
start = ckpt.restore(0)
say("restored", start)
for i in range(start, 100_000):
    ckpt.step(i)
    say("step", i)
    time.sleep(0.02)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_runs_prehook_checkpoints_transfers_cleans_up_and_exits_85(tmp_path, signum):
    target = tmp_path / "persistent.txt"
    options = f'checkpoint_transfer_mode="shared", checkpoint_transfer_target={str(target)!r}, checkpoint_every=1000,'
    child = Child(LOOP.format(options=options), tmp_path)
    child.wait_for("step 20")
    child.signal(signum)
    assert child.finish() == 85, child.output
    last = max(int(line.split()[1]) for line in child.lines if line.startswith("step"))
    # checkpoint_every=1000 wrote only step 0; the signal wrote the current value
    assert read_int(target) == last
    assert (tmp_path / "prehook.txt").read_text() == "[('reason', 'evicted')]"
    assert not (tmp_path / "local.txt").exists()  # removed: a persistent copy exists


def test_signal_in_mode_none_keeps_the_local_file(tmp_path):
    child = Child(LOOP.format(options="checkpoint_every=1000,"), tmp_path)
    child.wait_for("step 5")
    child.signal(signal.SIGTERM)
    assert child.finish() == 85
    assert read_int(tmp_path / "local.txt") >= 5


def test_checkpoint_exit_code_is_configurable(tmp_path):
    child = Child(LOOP.format(options="checkpoint_exit_code=42,"), tmp_path)
    child.wait_for("step 2")
    child.signal(signal.SIGTERM)
    assert child.finish() == 42


def test_resume_after_signal_continues_from_the_checkpoint(tmp_path):
    target = tmp_path / "persistent.txt"
    options = f'checkpoint_transfer_mode="shared", checkpoint_transfer_target={str(target)!r}, checkpoint_every=7,'
    child = Child(LOOP.format(options=options), tmp_path)
    child.wait_for("step 12")
    child.signal(signal.SIGTERM)
    assert child.finish() == 85
    saved = read_int(target)
    child = Child(LOOP.format(options=options), tmp_path)
    assert child.wait_for("restored") == f"restored {saved}"
    child.signal(signal.SIGKILL)
    child.finish()


def test_signal_during_a_slow_write_completes_that_checkpoint_first(tmp_path):
    """The handler only records the request; the write in progress is never torn."""
    target = tmp_path / "persistent.txt"
    body = f"""
    def slow_write(path, value):
        with open(path, "w") as f:
            f.write(str(value)[:1]); f.flush()
            say("writing", value)
            time.sleep(1.0)
            f.write(str(value)[1:])
    ckpt = Checkpointer(Path("local.txt"), slow_write, read_int,
                        checkpoint_transfer_mode="shared", checkpoint_transfer_target={str(target)!r})
    ckpt.step(12345)
    say("stepped")
    ckpt.step(67890)
    say("never reached")
    """
    child = Child(body, tmp_path)
    child.wait_for("writing 67890")
    child.signal(signal.SIGTERM)
    assert child.finish() == 85, child.output
    assert "never reached" not in child.output
    assert read_int(target) == 67890
    # The step's own save is the last checkpoint: it is not written a second time.
    assert child.output.count("writing 67890") == 1, child.output


def test_second_signal_during_the_last_checkpoint_does_not_tear_it(tmp_path):
    target = tmp_path / "persistent.txt"
    body = f"""
    def slow_write(path, value):
        say("writing", value)
        time.sleep(1.0)
        write_text(path, value)
    ckpt = Checkpointer(Path("local.txt"), slow_write, read_int, checkpoint_every=1000,
                        checkpoint_transfer_mode="shared", checkpoint_transfer_target={str(target)!r})
    ckpt.step(1)
    ckpt.step(2)
    say("idle")
    time.sleep(60)
    """
    child = Child(body, tmp_path)
    child.wait_for("idle")
    child.signal(signal.SIGTERM)   # starts the last checkpoint (of value 2)
    child.wait_for("writing 2")
    child.signal(signal.SIGTERM)   # arrives in the middle of it
    child.signal(signal.SIGINT)
    assert child.finish() == 85, child.output
    assert read_int(target) == 2


def test_signal_before_any_value_leaves_storage_untouched(tmp_path):
    target = tmp_path / "persistent.txt"
    write_text(target, 7)
    body = f"""
    ckpt = Checkpointer(Path("local.txt"), write_text, read_int,
                        checkpoint_transfer_mode="shared", checkpoint_transfer_target={str(target)!r})
    say("ready")
    time.sleep(60)
    """
    child = Child(body, tmp_path)
    child.wait_for("ready")
    child.signal(signal.SIGTERM)
    assert child.finish() == 85, child.output
    assert read_int(target) == 7


def test_signal_after_restore_before_step_leaves_the_stored_checkpoint(tmp_path):
    # The seed's PyTorch example: restore returns a state dict, the function saves a model's
    # state_dict(); a signal before the model is stepped must exit 85 and save nothing.
    target = tmp_path / "persistent.txt"
    write_text(target, 7)
    body = f"""
    ckpt = Checkpointer(Path("local.txt"), lambda path, model: write_text(path, model.state_dict()), read_int,
                        checkpoint_transfer_mode="shared", checkpoint_transfer_target={str(target)!r})
    say("restored", ckpt.restore(0))
    time.sleep(60)
    """
    child = Child(body, tmp_path)
    assert child.wait_for("restored") == "restored 7"
    before = target.stat().st_mtime_ns
    child.signal(signal.SIGTERM)
    assert child.finish() == 85, child.output
    assert read_int(target) == 7
    assert target.stat().st_mtime_ns == before


def test_htcondor_signal_before_any_value_and_no_file_avoids_a_hold(tmp_path):
    ad = job_ad(tmp_path, HTCONDOR_AD)
    body = """
    ckpt = Checkpointer(Path("local.txt"), write_text, read_int, checkpoint_transfer_mode="htcondor")
    say("ready")
    time.sleep(60)
    """
    child = Child(body, tmp_path, env={"_CONDOR_JOB_AD": str(ad), "_CONDOR_SCRATCH_DIR": str(tmp_path)})
    child.wait_for("ready")
    child.signal(signal.SIGTERM)
    # not 77: exiting with the checkpoint code without the listed file would hold the job
    assert child.finish() == 128 + signal.SIGTERM


def test_htcondor_signal_exits_with_the_jobs_code_and_keeps_the_file(tmp_path):
    ad = job_ad(tmp_path, HTCONDOR_AD)
    child = Child(LOOP.format(options='checkpoint_transfer_mode="htcondor", checkpoint_every=1000,'), tmp_path,
                  env={"_CONDOR_JOB_AD": str(ad), "_CONDOR_SCRATCH_DIR": str(tmp_path)})
    child.wait_for("step 3")
    child.signal(signal.SIGTERM)
    assert child.finish() == 77, child.output
    assert read_int(tmp_path / "local.txt") >= 3  # HTCondor transfers it; it must stay


def test_failed_transfer_on_signal_does_not_claim_success(tmp_path):
    (tmp_path / "a_file").write_text("x")
    target = tmp_path / "a_file" / "ckpt.txt"  # cannot be created
    body = f"""
    ckpt = Checkpointer(Path("local.txt"), write_text, read_int,
                        checkpoint_transfer_mode="shared", checkpoint_transfer_target={str(target)!r})
    ckpt.checkpoint_value = 3
    say("ready")
    time.sleep(60)
    """
    child = Child(body, tmp_path)
    child.wait_for("ready")
    child.signal(signal.SIGTERM)
    code = child.finish()
    assert code not in (0, 85)
    assert "a_file" in child.output


def test_storage_error_names_the_destination(tmp_path):
    (tmp_path / "a_file").write_text("x")
    ckpt = make(tmp_path, checkpoint_transfer_mode="shared",
                checkpoint_transfer_target=tmp_path / "a_file" / "ckpt.txt")
    with pytest.raises(StorageError, match="a_file"):
        ckpt.step(1)
