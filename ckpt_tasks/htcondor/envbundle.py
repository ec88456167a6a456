"""The environment bundle: a relocatable Python with the project's run-time dependencies.

Built from what runs here: the base CPython installation of the running interpreter
(``sys.base_prefix``) and, from the venv, the installed files of the dependency closure
of :data:`RUNTIME_REQUIREMENTS` (each distribution's ``RECORD``). A venv itself cannot
move (``pyvenv.cfg`` and script shebangs name absolute paths); this tree can: CPython
finds its standard library relative to its executable, and ``env/bin/python`` is a
wrapper that puts ``env/lib`` (``libpython``) on the library path. ``__pycache__`` files
are kept (with their sources' mtimes) so that a job does not recompile torch on start.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import sysconfig
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Iterator

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ckpt_tasks.htcondor.bundle import (RECIPE, BundleFile, _bundle_file, _write_tar,
                                        default_cache_dir)

logger = logging.getLogger(__name__)

#: what a job needs at run time: the project's dependencies with its training extra, and torch
RUNTIME_REQUIREMENTS = ("ckpt_tasks[train]", "torch")
#: names in the base installation that a job never uses
BASE_EXCLUDE = {"site-packages", "test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip",
                "lib2to3", "pkgconfig", "__phello__"}
#: installed files a job never needs: C++ headers, test suites (torch's test binaries, packages' tests)
SITE_EXCLUDE_PREFIXES = ("torch/include/", "torch/test/", "torch/share/")
SITE_EXCLUDE_PARTS = {"tests"}
PYTHON_WRAPPER = """#!/bin/sh
# The bundle's Python: finds its shared library next to itself, wherever it was unpacked.
here="$(cd "$(dirname "$0")/.." && pwd)"
LD_LIBRARY_PATH="${here}/lib${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}" exec "${here}/bin/%s" "$@"
"""


def _installed() -> dict[str, metadata.Distribution]:
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    found = {}
    for dist in metadata.distributions(path=[str(site)]):
        found.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
    return found


def dependency_closure(requirements=RUNTIME_REQUIREMENTS) -> list[metadata.Distribution]:
    """The installed distributions that ``requirements`` need, transitively, markers evaluated
    with their extras; the project itself is left out (it travels in the code bundle)."""
    installed = _installed()
    todo = [(Requirement(r), "") for r in requirements]
    seen: dict[str, set[str]] = {}
    while todo:
        req, extra = todo.pop()
        env = {**default_environment(), "extra": extra}
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        extras = set(req.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen.setdefault(name, set()).update(extras)
        dist = installed.get(name)
        if dist is None:
            raise RuntimeError(f"the environment bundle needs {req}, which is not installed in {sys.prefix}")
        for line in dist.requires or ():
            for wanted in sorted(extras) or [""]:
                todo.append((Requirement(line), wanted))
    return [installed[n] for n in sorted(seen) if n != "ckpt-tasks"]


def environment_key(dists: list[metadata.Distribution]) -> str:
    """A hash of the dependency set: names and versions, the Python build and the platform (not
    the C library that runs this process: the same venv gives the same bundle on any host)."""
    lines = [f"recipe {RECIPE}", f"python {platform.python_version()} {sys.implementation.name}",
             f"build {sys.base_prefix} {sysconfig.get_config_var('SOABI')}",
             f"platform {sysconfig.get_platform()}"]
    lines += sorted(f"{canonicalize_name(d.metadata['Name'])}=={d.version}" for d in dists)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _base_members(base: Path, version: str) -> Iterator[tuple[Path, str]]:
    """The base installation's interpreter, shared library and standard library."""
    exe = f"python{version}"
    yield base / "bin" / exe, f"env/bin/{exe}"
    for path in sorted((base / "lib").glob("libpython*.so*")):
        yield path, f"env/lib/{path.name}"
    stdlib = base / "lib" / exe
    for directory, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in BASE_EXCLUDE and not d.startswith("config-"))
        rel = os.path.relpath(directory, base)
        for name in sorted(files):
            yield Path(directory) / name, f"env/{rel}/{name}"


def _dist_members(dists: list[metadata.Distribution], version: str) -> Iterator[tuple[Path, str]]:
    """Every installed file of ``dists`` inside site-packages (scripts outside it are skipped:
    their shebangs name this machine's paths), plus the byte code next to them."""
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    target = f"env/lib/python{version}/site-packages"
    seen = set()
    for dist in dists:
        for file in dist.files or ():
            path = Path(dist.locate_file(file)).resolve()
            try:
                rel = path.relative_to(site).as_posix()
            except ValueError:
                continue
            if rel.startswith(SITE_EXCLUDE_PREFIXES) or SITE_EXCLUDE_PARTS & set(rel.split("/")):
                continue
            if rel not in seen and path.is_file():
                seen.add(rel)
                yield path, f"{target}/{rel}"


def build_env_bundle(cache_dir: Path | None = None, requirements=RUNTIME_REQUIREMENTS,
                     level: int = 6) -> BundleFile:
    """The environment bundle ``env-<key>.tar.gz`` in ``cache_dir``, built when missing."""
    cache_dir = Path(cache_dir or default_cache_dir())
    dists = dependency_closure(requirements)
    target = cache_dir / f"env-{environment_key(dists)}.tar.gz"
    if target.is_file():
        from ckpt_tasks.htcondor.bundlecache import touch

        touch(target)  # its last use, for the cache's retention (bundlecache.prune)
        logger.info("environment bundle %s reused", target.name)
        return _bundle_file(target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = Path(sys.base_prefix).resolve()
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        wrapper = Path(scratch) / "python"
        wrapper.write_text(PYTHON_WRAPPER % f"python{version}")
        wrapper.chmod(0o755)
        members = [*_base_members(base, version), (wrapper, "env/bin/python"), (wrapper, "env/bin/python3"),
                   *_dist_members(dists, version)]
        _write_tar(target, members, keep_mtime=True, level=level)
    bundle = _bundle_file(target)
    logger.info("environment bundle %s built: %d distributions, %d files, %.0f MB, %.0f s", target.name,
                len(dists), len(members), bundle.size / 1e6, time.monotonic() - started)
    return bundle


def pinned_requirements(requirements=RUNTIME_REQUIREMENTS) -> list[str]:
    """``name==version`` of every distribution the environment bundle ships, sorted: the pins
    of the container definition (containers/requirements.txt), so both routes run the same set."""
    return sorted(f"{canonicalize_name(d.metadata['Name'])}=={d.version}" for d in dependency_closure(requirements))


if __name__ == "__main__":
    # containers/requirements.txt: the header lines, then the pins of this environment
    print("# The run-time dependencies of ckpt_tasks' jobs, pinned to what the environment bundle ships")
    print("# (regenerate: python -m ckpt_tasks.htcondor.envbundle > containers/requirements.txt).")
    print("--extra-index-url https://download.pytorch.org/whl/cpu")
    print("\n".join(pinned_requirements()))
