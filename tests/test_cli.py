"""The ``ckpt-tasks`` console script (ls, verify, restore), run as a subprocess
against a local directory and a real XRootD server."""
from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from ckpt_tasks.storage import CheckpointStore, RetryPolicy
from helpers.store_writer import content_for
from waiting import run_cli as cli


@pytest.fixture
def filled(location, tmp_path):
    """A location holding checkpoints of steps 10, 20, 30."""
    url, on_disk = location
    store = CheckpointStore(url, keep_last=5, retry=RetryPolicy(deadline=10, initial_delay=0.2))
    saved = []
    for step in (10, 20, 30):
        (tmp_path / "state.bin").write_bytes(content_for(step))
        saved.append(store.save(tmp_path / "state.bin", step, metadata={"epoch": step // 10}))
    return url, on_disk, saved


def flip_a_byte(path: Path) -> None:
    with open(path, "r+b") as stream:
        stream.seek(1000)
        byte = stream.read(1)[0]
        stream.seek(1000)
        stream.write(bytes([byte ^ 0xFF]))


def test_ls_json(filled):
    url, _, saved = filled
    result = cli("ls", url, "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [entry["step"] for entry in listed] == [10, 20, 30]
    for entry, checkpoint in zip(listed, saved):
        assert {"step", "size", "adler32", "created", "path"} <= set(entry)
        assert entry["size"] == len(content_for(checkpoint.step))
        assert entry["adler32"] == f"{zlib.adler32(content_for(checkpoint.step)):08x}"
        assert entry["path"] == f"{url}/{checkpoint.name}"
        assert entry["files"] == [entry["path"]]  # small enough for one file
        assert entry["created"] == checkpoint.created
        assert entry["metadata"]["epoch"] == checkpoint.step // 10
        assert entry["metadata"] == checkpoint.metadata


def test_ls_json_names_every_part(location, tmp_path):
    url, on_disk = location
    (tmp_path / "state.bin").write_bytes(content_for(4)[:2500])
    CheckpointStore(url, part_size=1000, retry=RetryPolicy(deadline=10)).save(tmp_path / "state.bin", 4)
    [entry] = json.loads(cli("ls", url, "--json").stdout)
    assert [name.rsplit("/", 1)[-1] for name in entry["files"]] == [part["name"] for part in entry["parts"]]
    assert [(on_disk / part["name"]).stat().st_size for part in entry["parts"]] == [1000, 1000, 500]
    assert b"".join((on_disk / part["name"]).read_bytes() for part in entry["parts"]) == content_for(4)[:2500]


def test_ls_human(filled):
    url, _, saved = filled
    result = cli("ls", url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["step", "size", "adler32", "created", "name"]
    assert len(lines) == 4
    for line, checkpoint in zip(lines[1:], saved):
        assert line.split() == [str(checkpoint.step), str(checkpoint.size), checkpoint.adler32,
                                checkpoint.created, checkpoint.name]


def test_ls_empty_location(location):
    url, _ = location
    result = cli("ls", url)
    assert result.returncode == 0 and "no checkpoints" in result.stdout
    result = cli("ls", url, "--json")
    assert result.returncode == 0 and json.loads(result.stdout) == []


def test_verify_exit_codes(filled):
    url, on_disk, saved = filled
    result = cli("verify", url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split()[:4] == ["ok", "step", "30", saved[-1].name]

    result = cli("verify", "--all", url)
    assert result.returncode == 0
    assert [line.split()[2] for line in result.stdout.splitlines()] == ["10", "20", "30"]

    flip_a_byte(on_disk / saved[0].name)  # an old one: verify looks at the latest only
    assert cli("verify", url).returncode == 0
    result = cli("verify", "--all", url)
    assert result.returncode == 1
    assert f"CORRUPT  step 10  {saved[0].name}" in result.stdout
    assert result.stdout.count("ok ") == 2

    flip_a_byte(on_disk / saved[-1].name)
    result = cli("verify", url)
    assert result.returncode == 1 and f"CORRUPT  step 30  {saved[-1].name}" in result.stdout


def test_verify_empty_location_fails(location):
    url, _ = location
    result = cli("verify", url)
    assert result.returncode == 1 and "no checkpoints" in result.stderr


def test_restore(filled, tmp_path):
    url, on_disk, saved = filled
    dest = tmp_path / "out" / "restored.bin"
    result = cli("restore", url, str(dest))
    assert result.returncode == 0, result.stderr
    assert dest.read_bytes() == content_for(30)
    assert "step 30" in result.stdout

    flip_a_byte(on_disk / saved[-1].name)
    result = cli("restore", url, str(dest))
    assert result.returncode == 0, result.stderr
    assert dest.read_bytes() == content_for(20)  # the newest intact one
    assert "step 20" in result.stdout and "skipping checkpoint of step 30" in result.stderr


def test_restore_empty_location(location, tmp_path):
    url, _ = location
    result = cli("restore", url, str(tmp_path / "x.bin"))
    assert result.returncode == 1 and "no checkpoints" in result.stderr
    assert not (tmp_path / "x.bin").exists()


@pytest.mark.parametrize("bad", ["http://x/y", "root://host/../x"])
def test_bad_location_exits_2(bad):
    result = cli("ls", bad)
    assert result.returncode == 2 and bad in result.stderr


def test_module_entry_point(filled):
    url, _, _ = filled
    result = subprocess.run([sys.executable, "-m", "ckpt_tasks.cli", "ls", "--json", url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and len(json.loads(result.stdout)) == 3
