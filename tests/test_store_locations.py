"""CheckpointStore's locations: which are accepted, which refused."""
from __future__ import annotations



import pytest

from ckpt_tasks.storage import CheckpointStore, XRootDFileInterface
from helpers.store_writer import content_for
from store_helpers import FAST, make_file


# -- locations -----------------------------------------------------------------------------------

def test_file_url_is_a_local_directory(tmp_path):
    store = CheckpointStore(f"file://{tmp_path}/ckpts", retry=FAST)
    checkpoint = store.save(make_file(tmp_path, 1, 1000), 1)
    assert (tmp_path / "ckpts" / checkpoint.name).read_bytes() == content_for(1)[:1000]
    assert CheckpointStore(tmp_path / "ckpts").list() == [checkpoint]  # a Path works too


@pytest.mark.parametrize("location", [
    "http://x", "https://host/ckpt", "s3://bucket/ckpt", "file://relative/dir",
    "root://host/../x", "root://host:1094//a/../../etc", "root://", "root:///abs/path",
    "root://host:99999//x", "root://ho st//x",
])
def test_bad_locations_raise_value_error(location):
    with pytest.raises(ValueError):
        CheckpointStore(location)


def test_relative_paths_on_the_server_are_refused():
    files = XRootDFileInterface("root://127.0.0.1:1094")
    for path in ("../x", "a/../../x"):
        with pytest.raises(ValueError):
            files.resolve(path)
    with pytest.raises(ValueError):
        files.resolve("root://127.0.0.1:1094/a/../../x")


def test_single_slash_url_is_refused(xrootd_server):
    # XRootD itself reads root://host/p as /p, but a location with one slash is most often a
    # typo; the accepted form is root://host//abs/path, and the error says so.
    with pytest.raises(ValueError, match=r"root://host\[:port\]//abs/path"):
        CheckpointStore(f"{xrootd_server.url}/runs/x", retry=FAST)


@pytest.mark.parametrize("part_size", [0, -1, 1.5, "1"])
def test_bad_part_size(tmp_path, part_size):
    with pytest.raises(ValueError, match="part_size"):
        CheckpointStore(tmp_path, part_size=part_size)


@pytest.mark.parametrize("keep", [{"keep_last": 0}, {"keep_last": "3"}, {"keep_every": 0}])
def test_bad_retention_settings(tmp_path, keep):
    with pytest.raises(ValueError):
        CheckpointStore(tmp_path, **keep)
