"""Bundles for the ``bundle`` software route: the code and a relocatable Python environment.

Two gzipped tarballs that a job unpacks (the code in its sandbox, the environment once per
worker into its cache: job.sh), so that it needs nothing of the submit machine:

- the **code bundle**: the checkout as it is, uncommitted and untracked (not ignored)
  files included, without ``.git``, ``__pycache__`` and test data; named by the sha256
  of its bytes, which are deterministic (sorted names, zero mtimes and owners), so the
  same tree gives the same file and a rebuild is dropped for the cached one;
- the **environment bundle**: the base CPython installation the venv was made from
  (interpreter, shared library, standard library) plus the installed files of exactly
  the distributions the project needs at run time (their ``RECORD``), under ``env/``;
  ``env/bin/python`` is a small wrapper that finds ``libpython`` next to itself. It is
  cached under a key of the dependency set (names and versions, Python, platform), so
  it is built once and reused by every later submission.

Each bundle comes with its size and sha256, which the job checks before unpacking.
"""
from __future__ import annotations

import fnmatch
import gzip
import hashlib
import logging
import os
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

#: bump when the layout of a bundle changes: cached bundles of an older recipe are not reused
RECIPE = "2"
#: path parts never shipped in the code bundle
CODE_EXCLUDE_PARTS = {".git", "__pycache__", ".venv", ".law", ".pool-tmp", ".pytest_cache", "data"}
CODE_EXCLUDE_PREFIXES = ("tests/fixtures/",)
#: files that look like credentials never go into a bundle (it is cached and sent to workers)
CREDENTIAL_PATTERNS = ("x509up_*", "bt_u*", "*.token", "*.pem", "*.key", ".env", "*.keytab")


@dataclass(frozen=True)
class BundleFile:
    """A built bundle: where it is, its size in bytes and the sha256 of its bytes."""

    path: Path
    size: int
    sha256: str


def default_cache_dir() -> Path:
    """``$CKPT_TASKS_BUNDLE_CACHE``, else ``$XDG_CACHE_HOME/ckpt_tasks/bundles`` (``~/.cache``)."""
    explicit = os.environ.get("CKPT_TASKS_BUNDLE_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ckpt_tasks" / "bundles"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _bundle_file(path: Path) -> BundleFile:
    checksum = path.with_name(path.name + ".sha256")
    if checksum.is_file():
        sha = checksum.read_text().split()[0]
    else:
        sha = sha256_of(path)
        checksum.write_text(f"{sha}  {path.name}\n")
    return BundleFile(path, path.stat().st_size, sha)


# -- writing deterministic tarballs -------------------------------------------------------------

def _normalised(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Same tree, same bytes: no owners, no times (the env keeps mtimes: .pyc files check them).
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_tar(target: Path, members: Iterable[tuple[Path, str]], *, keep_mtime: bool,
               level: int) -> None:
    """Write ``(source, arcname)`` pairs as a gzipped tar to a temporary name, then rename."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                      compresslevel=level) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for source, arcname in members:
                info = _normalised(tar.gettarinfo(str(source), arcname))
                if not keep_mtime:
                    info.mtime = 0
                if info.isreg():
                    with open(source, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


# -- the code bundle ----------------------------------------------------------------------------

def _git_files(root: Path) -> list[str] | None:
    try:
        out = subprocess.run(
            ["git", "-c", "safe.directory=*", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [name for name in out.decode().split("\0") if name]


def _ignore_patterns(root: Path) -> list[str]:
    path = root / ".gitignore"
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith(("#", "!"))]


def _ignored(relative: str, patterns: list[str]) -> bool:
    parts = relative.split("/")
    for pattern in patterns:
        anchored = pattern.startswith("/")
        body = pattern.strip("/")
        if anchored or "/" in body:
            if fnmatch.fnmatch(relative, body) or relative.startswith(body + "/"):
                return True
        elif any(fnmatch.fnmatch(part, body) for part in parts):
            return True
    return False


def _walked_files(root: Path) -> list[str]:
    """Without git (a submit node may lack it): every file, less the top ``.gitignore``'s patterns."""
    patterns = _ignore_patterns(root)
    found = []
    for directory, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirs[:] = [d for d in dirs if d not in CODE_EXCLUDE_PARTS and not _ignored(rel_dir + d, patterns)]
        found.extend(rel_dir + f for f in files if not _ignored(rel_dir + f, patterns))
    return found


def code_files(root: Path) -> list[str]:
    """The checkout's files to ship, relative to ``root``, sorted: git's tracked and untracked
    non-ignored files (a walk with the top ``.gitignore`` without git), less the excludes."""
    names = _git_files(root)
    if names is None:
        logger.info("git is not available in %s: walking the tree with its .gitignore", root)
        names = _walked_files(root)
    kept = []
    for name in names:
        parts = set(name.split("/"))
        if parts & CODE_EXCLUDE_PARTS or name.endswith(".pyc") or name.startswith(CODE_EXCLUDE_PREFIXES):
            continue
        if any(fnmatch.fnmatch(name.rsplit("/", 1)[-1], pattern) for pattern in CREDENTIAL_PATTERNS):
            logger.warning("%s looks like a credential: left out of the code bundle", name)
            continue
        if (root / name).is_file():  # deleted but still tracked files are left out
            kept.append(name)
    return sorted(kept)


def build_code_bundle(root: Path, cache_dir: Path | None = None) -> BundleFile:
    """The checkout ``root`` as ``code-<sha256 prefix>.tar.gz`` in ``cache_dir``; reused when an
    identical one is there."""
    cache_dir = Path(cache_dir or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    names = code_files(root)
    scratch = cache_dir / f".code-{os.getpid()}.tar.gz"
    _write_tar(scratch, ((root / name, name) for name in names), keep_mtime=False, level=6)
    sha = sha256_of(scratch)
    target = cache_dir / f"code-{sha[:16]}.tar.gz"
    if target.is_file() and sha256_of(target) == sha:
        scratch.unlink()
        os.utime(target)  # its last use, for the cache's retention (bundlecache.prune)
        logger.info("code bundle %s reused (%d files)", target.name, len(names))
    else:
        os.replace(scratch, target)
        target.with_name(target.name + ".sha256").write_text(f"{sha}  {target.name}\n")
        logger.info("code bundle %s built: %d files, %d bytes, %.1f s", target.name, len(names),
                    target.stat().st_size, time.monotonic() - started)
    return BundleFile(target, target.stat().st_size, sha)
