"""The seed's Checkpointer API, exactly: parameters, names, attributes, and what its scripts do."""
from __future__ import annotations

import inspect
import os
import signal
from pathlib import Path

import pytest

from ckpt_tasks import Checkpointer
from ckpt_tasks.local_checkpoint import LocalCheckpointPath
from checkpointer_child import Child

SEED_PARAMETERS = ["local_checkpoint_file", "checkpoint_function", "restore_function",
                   "checkpoint_transfer_mode", "checkpoint_transfer_target", "xrootd_server_name",
                   "checkpoint_transfer_callback", "checkpoint_transfer_callback_kwargs",
                   "checkpoint_every", "on_SIGTERM_prehook", "on_SIGTERM_prehook_kwargs"]


def write_text(path, value):
    Path(path).write_text(str(value))


def read_int(path):
    return int(Path(path).read_text())


# -- signature ---------------------------------------------------------------------------------

def test_constructor_takes_the_seeds_eleven_parameters_in_order_and_extras_by_keyword_only():
    parameters = list(inspect.signature(Checkpointer.__init__).parameters.values())[1:]
    positional = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == SEED_PARAMETERS
    assert all(p.kind is p.KEYWORD_ONLY for p in parameters[len(SEED_PARAMETERS):])
    assert "checkpoint_exit_code" in [p.name for p in parameters if p.kind is p.KEYWORD_ONLY]


def test_all_eleven_positionally(tmp_path):
    called = []
    ckpt = Checkpointer(tmp_path / "c.txt", write_text, read_int, "shared", tmp_path / "target.txt", None,
                        None, None, 3, lambda **kw: called.append(kw), {"why": "test"})
    assert ckpt.checkpoint_every == 3 and ckpt.on_SIGTERM_prehook_kwargs == {"why": "test"}
    with pytest.raises(TypeError):
        Checkpointer(tmp_path / "c.txt", write_text, read_int, "None", None, None, None, None, 1, None, None, 85)


def test_seed_parameter_names_of_restore_and_on_SIGTERM():
    assert list(inspect.signature(Checkpointer.restore).parameters)[1:] == ["default"]
    assert list(inspect.signature(Checkpointer.on_SIGTERM).parameters)[1:] == ["signalNumber", "frame"]


def test_restore_by_keyword_default(tmp_path):
    ckpt = Checkpointer(tmp_path / "c.txt", write_text, read_int)
    assert ckpt.restore(default=5) == 5


# -- restore_function=None and get_checkpoint -------------------------------------------------------

def test_restore_function_none_fetches_the_file_and_returns_the_default(tmp_path):
    target = tmp_path / "target.txt"
    write_text(target, 9)
    ckpt = Checkpointer(tmp_path / "c.txt", write_text, None, checkpoint_transfer_mode="shared",
                        checkpoint_transfer_target=target)
    assert ckpt.restore("default") == "default"
    assert read_int(tmp_path / "c.txt") == 9  # fetched, as the seed's get_checkpoint does


def test_get_checkpoint_fetches_without_restoring(tmp_path):
    target = tmp_path / "target.txt"
    loads = []
    ckpt = Checkpointer(tmp_path / "c.txt", write_text, lambda p: loads.append(p),
                        checkpoint_transfer_mode="shared", checkpoint_transfer_target=target)
    assert ckpt.get_checkpoint() is False
    write_text(target, 4)
    assert ckpt.get_checkpoint() is True
    assert read_int(tmp_path / "c.txt") == 4 and loads == []


# -- attributes the seed reads at transfer time ---------------------------------------------------

def test_reassigned_transfer_target_takes_effect(tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    ckpt = Checkpointer(tmp_path / "c.txt", write_text, read_int, checkpoint_transfer_mode="shared",
                        checkpoint_transfer_target=first)
    ckpt.step(1)
    ckpt.checkpoint_transfer_target = second
    ckpt.step(2)
    assert read_int(first) == 1 and read_int(second) == 2


def test_reassigned_callback_kwargs_take_effect(tmp_path):
    seen = []
    ckpt = Checkpointer(tmp_path / "c.txt", write_text, read_int, checkpoint_transfer_mode="manual",
                        checkpoint_transfer_target="t", checkpoint_transfer_callback=lambda s, d, **kw: seen.append(kw),
                        checkpoint_transfer_callback_kwargs={"n": 1})
    ckpt.step(1)
    ckpt.checkpoint_transfer_callback_kwargs = {"n": 2}
    ckpt.step(2)
    assert seen == [{"n": 1}, {"n": 2}]


def test_xrootd_mode_exposes_the_seeds_client_objects(tmp_path):
    from XRootD import client
    from XRootD.client.flags import DirListFlags

    ckpt = Checkpointer(tmp_path / "c.txt", write_text, read_int, checkpoint_transfer_mode="xrootd",
                        checkpoint_transfer_target="/store/c.txt", xrootd_server_name="root://localhost:1")
    assert isinstance(ckpt.xrootd_client, client.FileSystem)
    assert ckpt.DirListFlags is DirListFlags
    assert ckpt.local_checkpoint_file.is_absolute()


def test_shared_mode_refuses_a_directory_as_target(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_transfer_target .* is a directory"):
        Checkpointer(tmp_path / "c.txt", write_text, read_int, checkpoint_transfer_mode="shared",
                     checkpoint_transfer_target=tmp_path)


# -- checkpoint functions that look at or ignore the path they get ---------------------------------

def test_writer_sees_a_temporary_name_with_the_full_suffix(tmp_path):
    seen = []

    def save_weights(path, value):
        assert str(path).endswith(".weights.h5"), path  # as Keras' save_weights insists
        seen.append(Path(path).name)
        write_text(path, value)

    ckpt = Checkpointer(tmp_path / "model.weights.h5", save_weights, read_int)
    ckpt.step(3)
    assert read_int(tmp_path / "model.weights.h5") == 3
    assert seen[0] != "model.weights.h5"


def test_writer_that_writes_local_checkpoint_file_itself_works(tmp_path):
    local = tmp_path / "c.txt"
    target = tmp_path / "target.txt"
    ckpt = Checkpointer(local, lambda path, value: write_text(local, value), read_int,
                        checkpoint_transfer_mode="shared", checkpoint_transfer_target=target)
    ckpt.step(1)
    ckpt.step(2)
    assert read_int(target) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "target.txt"]


def test_writer_of_local_checkpoint_file_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    body = """
    local = Path("c.txt")
    def slow(path, value):
        with open(local, "w") as f:
            f.write("to")           # torn: not a number
            f.flush()
            say("writing", value)
            time.sleep(60)
            f.write(str(value))
    write_text(local, 41)
    ckpt = Checkpointer(local, slow, read_int)
    ckpt.step(42)
    """
    child = Child(body, tmp_path)
    child.wait_for("writing 42")
    child.signal(signal.SIGKILL)
    child.finish()
    assert (tmp_path / "c.txt").read_text() == "to"  # torn in place, but marked as such
    ckpt = Checkpointer(tmp_path / "c.txt", write_text, read_int)
    assert ckpt.restore(0) == 41


def test_writer_that_writes_nothing_anywhere_is_reported(tmp_path):
    ckpt = Checkpointer(tmp_path / "c.txt", lambda path, value: None, read_int)
    with pytest.raises(Exception, match="wrote nothing"):
        ckpt.step(1)


# -- a checkpoint that is a directory -------------------------------------------------------------------

def write_directory(path, value):
    Path(path).mkdir()
    (Path(path) / "weights.txt").write_text(str(value))
    (Path(path) / "sub").mkdir()
    (Path(path) / "sub" / "config.txt").write_text(f"config {value}")


def read_directory(path):
    return int((Path(path) / "weights.txt").read_text()), (Path(path) / "sub" / "config.txt").read_text()


def directory_modes(tmp_path, request):
    mode = request.param
    if mode == "None":
        return {}
    if mode == "shared":
        return dict(checkpoint_transfer_mode="shared", checkpoint_transfer_target=tmp_path / "shared" / "ckpt")
    if mode == "manual":
        import shutil

        def copy(src, dst):
            if not Path(src).exists():
                raise FileNotFoundError(src)
            if Path(dst).exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)
        return dict(checkpoint_transfer_mode="manual", checkpoint_transfer_target=str(tmp_path / "manual"),
                    checkpoint_transfer_callback=copy)
    server = request.getfixturevalue("xrootd_server")
    return dict(checkpoint_transfer_mode="xrootd", xrootd_server_name=server.url,
                checkpoint_transfer_target=f"/dirs/{tmp_path.name}/ckpt")


@pytest.fixture(params=["None", "shared", "manual", "xrootd"])
def directory_mode(tmp_path, request):
    return directory_modes(tmp_path, request)


def test_directory_checkpoint_in_every_mode(tmp_path, directory_mode):
    work = tmp_path / "work"
    work.mkdir()
    local = work / "ckpt_dir"
    ckpt = Checkpointer(local, write_directory, read_directory, **directory_mode)
    assert ckpt.restore(None) is None
    ckpt.step(1)
    ckpt.step(2)  # replaces the directory as a whole
    if directory_mode:  # a fresh worker: nothing local
        import shutil
        shutil.rmtree(local, ignore_errors=True)
    again = Checkpointer(local, write_directory, read_directory, **directory_mode)
    assert again.restore(None) == (2, "config 2")
    assert sorted(p.name for p in work.iterdir()) == ["ckpt_dir"]  # no partial or previous copies


def test_directory_checkpoint_with_links_is_stored_as_files_and_restores(tmp_path):
    outside = tmp_path / "blobs" / "weights.bin"
    outside.parent.mkdir()
    outside.write_text("blob")

    def write_with_links(path, value):
        write_directory(path, value)
        os.link(Path(path) / "weights.txt", Path(path) / "hard.txt")          # a hard link
        os.symlink(outside, Path(path) / "snapshot.bin")                       # a link out of it

    target = tmp_path / "shared" / "ckpt"
    local = tmp_path / "work" / "ckpt_dir"
    local.parent.mkdir()
    ckpt = Checkpointer(local, write_with_links, read_directory, checkpoint_transfer_mode="shared",
                        checkpoint_transfer_target=target)
    ckpt.step(3)
    import shutil
    shutil.rmtree(local)
    assert ckpt.restore(None) == (3, "config 3")
    assert (local / "hard.txt").read_text() == "3" and (local / "snapshot.bin").read_text() == "blob"
    assert not (local / "snapshot.bin").is_symlink()


def test_directory_swap_interrupted_between_renames_is_recovered(tmp_path):
    local = tmp_path / "ckpt_dir"
    write_directory(local, 1)
    checkpoint = LocalCheckpointPath(local)
    os.replace(local, tmp_path / ".ckpt_dir.previous")  # a crash right after the first rename
    assert checkpoint.exists()
    assert read_directory(local) == (1, "config 1")


def test_a_tar_file_checkpoint_is_never_unpacked(tmp_path):
    import tarfile

    payload = tmp_path / "payload.txt"
    payload.write_text("x")
    target = tmp_path / "target.tar"

    def write_tar(path, value):
        with tarfile.open(path, "w") as tar:
            tar.add(payload, arcname="payload.txt")

    ckpt = Checkpointer(tmp_path / "c.tar", write_tar, lambda p: tarfile.is_tarfile(p) and Path(p).is_file(),
                        checkpoint_transfer_mode="shared", checkpoint_transfer_target=target)
    ckpt.step(1)
    (tmp_path / "c.tar").unlink()
    assert ckpt.restore(False) is True


# -- manual mode: a first run with nothing stored -------------------------------------------------------

def test_manual_callback_file_not_found_means_no_checkpoint(tmp_path):
    def copy(src, dst):
        raise FileNotFoundError(src)

    ckpt = Checkpointer(tmp_path / "c.txt", write_text, read_int, checkpoint_transfer_mode="manual",
                        checkpoint_transfer_target="remote", checkpoint_transfer_callback=copy)
    assert ckpt.restore(0) == 0


def test_manual_callback_other_errors_are_raised_with_a_note(tmp_path):
    def copy(src, dst):
        raise PermissionError("denied")

    ckpt = Checkpointer(tmp_path / "c.txt", write_text, read_int, checkpoint_transfer_mode="manual",
                        checkpoint_transfer_target="remote", checkpoint_transfer_callback=copy)
    with pytest.raises(PermissionError) as raised:
        ckpt.restore(0)
    assert "FileNotFoundError" in " ".join(raised.value.__notes__)
