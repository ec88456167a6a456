"""The storage layer imports nothing above it (read from the source, not by importing)."""
from __future__ import annotations

import ast
from pathlib import Path

import ckpt_tasks.storage

STORAGE = Path(ckpt_tasks.storage.__file__).parent
#: what storage/ may import from this project: itself and the leaves below every layer
ALLOWED = ("ckpt_tasks.storage", "ckpt_tasks.errors", "ckpt_tasks.progress")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_storage_imports_no_layer_above_it():
    for path in sorted(STORAGE.glob("*.py")):
        for name in imported_modules(path):
            if name.startswith("ckpt_tasks"):
                assert name.startswith(ALLOWED), f"{path.name} imports {name}"


def test_only_the_law_target_adapter_imports_law():
    importers = {path.name for path in STORAGE.glob("*.py")
                 if any(name == "law" or name.startswith("law.") for name in imported_modules(path))}
    assert importers == {"targets.py"}
