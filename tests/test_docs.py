"""The guides: built in strict mode, and every snippet they present as runnable is run.

A fenced ``python``, ``bash`` or ``sh`` block runs as it stands, in a fresh directory
with this checkout on ``PYTHONPATH``, unless the line before it says why not:

- ``<!-- needs: WHAT -->``: a pool, a remote server, a GPU or credentials the
  tests do not have (WHAT is one of :data:`NEEDS`);
- ``<!-- tested-by: tests/FILE.py -->``: what it shows is run by that test module;
- ``<!-- fragment -->``: part of a larger program (a method, a loop body), not a program.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
RUNNABLE = {"python", "bash", "sh", "console"}
NEEDS = {"htcondor-pool", "remote-xrootd", "gpu", "credentials", "network"}
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```\s*$",
                   re.MULTILINE | re.DOTALL)
MARK = re.compile(r"<!--\s*(?P<kind>needs|tested-by|fragment)\s*:?\s*(?P<value>[^>]*?)\s*-->\s*$")


def snippets():
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            lang = match.group("lang").lower()
            if lang not in RUNNABLE:
                continue
            before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            line = text.count("\n", 0, match.start()) + 1
            body = "\n".join(row[len(match.group("indent")):] for row in match.group("body").splitlines())
            yield pytest.param(page, line, lang, body, MARK.search(before),
                               id=f"{page.relative_to(ROOT)}:{line}")


ALL = list(snippets())


def test_there_are_snippets_to_check():
    assert len(ALL) > 10, "no snippets found: the pattern or the pages are broken"


@pytest.mark.parametrize("page, line, lang, body, mark", ALL)
def test_snippet(page, line, lang, body, mark, tmp_path):
    where = f"{page.relative_to(ROOT)}:{line}"
    if mark is not None:
        kind, value = mark.group("kind"), mark.group("value")
        if kind == "needs":
            assert value in NEEDS, f"{where}: 'needs: {value}' is not one of {sorted(NEEDS)}"
        elif kind == "tested-by":
            assert (ROOT / value).is_file(), f"{where}: tested-by names {value}, which does not exist"
        return  # said why it is not run here, and the reason checks out
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               CKPT_TASKS_DATA=str(tmp_path / "data"), CKPT_TASKS_PROGRESS="0")
    if lang == "python":
        command = [sys.executable, "-c", body]
    else:
        command = ["bash", "-euo", "pipefail", "-c", body]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{where} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def test_guides_build_in_strict_mode(tmp_path):
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).with_name("mkdocs"))
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert (tmp_path / "site" / "index.html").is_file()
