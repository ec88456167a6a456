"""validate_location: the strict check of a storage location given by a user."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckpt_tasks.storage.location import validate_location

BAD = [
    "root:/host//p",  # one slash missing
    "root://",
    "root:///p",  # no host
    "root//host//p",  # colon missing
    "roots//host//p",
    "root://host/relative",  # the path must be absolute: "//" after the host
    "root://host",
    "root://host:99999//p",  # port out of range
    "root://ho st//p",
    "root://host//a/../b",
    "s3://bucket/x",
    "foo:bar/baz",
    "a:b",
    "file://relative/x",
    ":x/y",
    "",
    "   ",
]


@pytest.mark.parametrize("text", BAD)
def test_invalid_locations_are_refused_with_parameter_and_forms(text):
    with pytest.raises(ValueError) as raised:
        validate_location(text, "store")
    message = str(raised.value)
    assert "store=" in message
    for form in ("/abs/or/relative/path", "root://host[:port]//abs/path", "roots://"):
        assert form in message


def test_the_parameter_is_named():
    with pytest.raises(ValueError, match="checkpoint_transfer_target="):
        validate_location("root:/host//p", parameter="checkpoint_transfer_target")


@pytest.mark.parametrize("url", ["root://localhost//data/ckpt", "root://localhost:1094//data/ckpt",
                                 "roots://eos.example.org:1094//eos/user/x", "root://u@host//p/",
                                 "root://[::1]:1094//p", "root://127.0.0.1:1094//"])
def test_valid_xrootd_urls_come_back_as_they_are(url):
    assert validate_location(url) == url


def test_relative_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert validate_location("ckpt/run1") == str(tmp_path / "ckpt" / "run1")
    # A colon after the first slash is part of a file name, not a scheme.
    assert validate_location("./a:b") == str(tmp_path / "a:b")


def test_absolute_paths_pathlike_and_file_urls(tmp_path):
    assert validate_location(str(tmp_path)) == str(tmp_path)
    assert validate_location(tmp_path / "x") == str(tmp_path / "x")
    assert validate_location(f"file://{tmp_path}/y") == str(tmp_path / "y")
    assert validate_location("~/ckpt") == os.path.join(str(Path.home()), "ckpt")


def test_non_text_is_refused():
    with pytest.raises(ValueError, match="store="):
        validate_location(42)  # type: ignore[arg-type]


def test_a_query_string_is_refused_and_not_repeated():
    with pytest.raises(ValueError, match="query string is not accepted") as refused:
        validate_location("root://host:1094//store/me?authz=SECRETTOKEN", parameter="--store")
    assert "SECRETTOKEN" not in str(refused.value)
