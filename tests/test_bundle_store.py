"""The bundle store (bundle_store: root://...): what may name it, and a copy that rotted there."""
from __future__ import annotations

import hashlib
import os

import pytest

from ckpt_tasks.htcondor.bundle import BundleFile
from ckpt_tasks.htcondor.bundlecache import check_store_url, publish


@pytest.mark.parametrize("url", ['root://host//b/$(touch /tmp/owned)', 'root://host//b/"x', "root://host//a b",
                                 "root://host//b/`id`", "root://host//b;rm"])
def test_a_store_url_the_job_script_s_shell_would_act_on_is_refused(url):
    with pytest.raises(ValueError, match="job script"):
        check_store_url(url)


def test_plain_store_urls_pass():
    assert check_store_url("roots://eos.example.org:1094//eos/user/m/me/bundles/") == \
        "roots://eos.example.org:1094//eos/user/m/me/bundles"


@pytest.mark.xrootd
def test_a_bundle_that_rotted_on_the_store_is_uploaded_again(tmp_path, make_xrootd_server):
    server = make_xrootd_server()
    local = tmp_path / "code-0123456789abcdef.tar.gz"
    local.write_bytes(b"bundle bytes " * 1000)
    bundle = BundleFile(local, local.stat().st_size, hashlib.sha256(local.read_bytes()).hexdigest())
    url = f"{server.url}//bundles"
    name = publish(bundle, url)
    stored = server.data_dir / "bundles" / name
    assert stored.read_bytes() == local.read_bytes()
    rotted = bytearray(stored.read_bytes())
    rotted[100] ^= 0xFF  # the same size, other bytes
    stored.write_bytes(bytes(rotted))
    # a later mtime, as any rewrite has: XRootD reuses its checksum while the mtime is unchanged
    later = stored.stat().st_mtime + 5
    os.utime(stored, (later, later))
    assert publish(bundle, url) == name
    assert stored.read_bytes() == local.read_bytes()
