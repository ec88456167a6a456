"""A manifest names files of its own checkpoint only: never a path outside the location."""
from __future__ import annotations

import json

import pytest

from ckpt_tasks.storage.store import CheckpointStore


def _rewrite_manifest(location, step: int, change) -> None:
    """Change the manifest of ``step`` and its copy in LATEST's index, as a writer that lies would."""
    (manifest,) = location.glob(f"step-{step:012d}-*.json")
    fields = json.loads(manifest.read_text())
    change(fields)
    manifest.write_text(json.dumps(fields))
    latest = json.loads((location / "LATEST").read_text())
    for entry in latest["index"]:
        if entry["step"] == step:
            change(entry)
    (location / "LATEST").write_text(json.dumps(latest))


@pytest.mark.parametrize("field", ["part", "name"])
def test_a_manifest_naming_a_path_outside_the_location_is_never_read_or_deleted(tmp_path, field):
    location = tmp_path / "loc"
    victim = tmp_path / "victim"
    victim.write_bytes(b"x" * 100)
    store = CheckpointStore(location, keep_last=2, part_size=100)
    for step in (1, 2):
        payload = tmp_path / f"state-{step}.bin"
        payload.write_bytes(bytes([step]) * 250)
        store.save(payload, step)

    def outward(fields):
        if field == "part":
            fields["parts"][1]["name"] = "../victim"
        else:
            fields["name"] = "../victim"
    _rewrite_manifest(location, 2, outward)

    fresh = CheckpointStore(location, keep_last=1, part_size=100)
    assert [c.step for c in fresh.list()] == [1]  # the lying manifest is skipped, as unreadable
    payload = tmp_path / "state-3.bin"
    payload.write_bytes(b"\x03" * 250)
    fresh.save(payload, 3)  # retention keeps 1: it deletes step 1, never the victim
    assert victim.read_bytes() == b"x" * 100
    assert fresh.restore(tmp_path / "restored.bin").step == 3
