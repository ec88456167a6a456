"""Where bundles live besides the submit side's cache: the store, and what is kept of them.

- :func:`publish` uploads a bundle once to an XRootD bundle store (law.cfg
  ``bundle_store``), under a content-addressed name, so that a job fetches it only
  when its worker's cache lacks it and HTCondor transfers nothing;
- :func:`prune` applies the retention of the submit side's bundle cache: of each kind
  (``code-``, ``env-``), a bundle stays while it is among the ``keep`` last used or was
  used within ``days`` days (a reuse counts as a use: :func:`touch`).

The worker's cache of unpacked environments has the same rule, applied by the job
script itself (``prune_worker_cache`` in job.sh).
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ckpt_tasks.htcondor.bundle import BundleFile
from ckpt_tasks.storage.checksum import adler32_of_file

logger = logging.getLogger(__name__)

KINDS = ("code-", "env-")
#: leftovers of a build killed halfway (``.code-<pid>.tar.gz``, ``.<name>.<pid>.partial``, tmp dirs)
STALE_AFTER = 24 * 3600


@dataclass(frozen=True)
class Retention:
    """Keep a bundle while it is among the ``keep`` last used of its kind or used within ``days``."""

    keep: int = 3
    days: float = 14.0

    def __post_init__(self):
        if self.keep < 1 or self.days < 0:
            raise ValueError(f"a bundle retention keeps at least one bundle for 0 days or more, "
                             f"not keep={self.keep} days={self.days}")


def touch(path: Path) -> None:
    """Record a use of a cached bundle (its mtime is its last use, for :func:`prune`)."""
    try:
        os.utime(path)
    except OSError as error:  # a read-only cache still serves; it just cannot age
        logger.debug("cannot mark %s as used: %s", path, error)


def prune(cache_dir: Path, retention: Retention, now: float | None = None) -> list[Path]:
    """Delete the bundles (and their ``.sha256``) of ``cache_dir`` that ``retention`` lets go,
    and leftovers of killed builds; returns the bundles deleted."""
    now = time.time() if now is None else now
    removed = []
    if not cache_dir.is_dir():
        return removed
    for kind in KINDS:
        bundles = sorted(cache_dir.glob(f"{kind}*.tar.gz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for path in bundles[retention.keep:]:
            if now - path.stat().st_mtime <= retention.days * 86400:
                continue
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".sha256").unlink(missing_ok=True)
            removed.append(path)
    for leftover in cache_dir.glob(".*"):
        if leftover.is_file() and now - leftover.stat().st_mtime > STALE_AFTER:
            leftover.unlink(missing_ok=True)
    if removed:
        logger.info("bundle cache %s: removed %d bundle(s) past the retention (keep %d, %g days): %s",
                    cache_dir, len(removed), retention.keep, retention.days, ", ".join(p.name for p in removed))
    return removed


def store_name(bundle: BundleFile) -> str:
    """The bundle's name on the store: named by its content, so a name never changes its bytes
    (an environment bundle is named by its dependency set, which a rebuild keeps)."""
    tag = bundle.sha256[:16]
    if tag in bundle.path.name:
        return bundle.path.name
    stem = bundle.path.name[:-len(".tar.gz")] if bundle.path.name.endswith(".tar.gz") else bundle.path.name
    return f"{stem}-{tag}.tar.gz"


#: what a bundle store URL may hold: it is rendered into the job script, so no quote, ``$``,
#: backtick, space or other character the shell would act on
_STORE_URL_RE = re.compile(r"roots?://[A-Za-z0-9._~:/@%+=,-]+")


def check_store_url(url: str) -> str:
    """``url`` as a bundle store: ``root://`` or ``roots://``, no query (credentials never go into
    a job script), no character the job script's shell would act on, no trailing slash."""
    if not url.startswith(("root://", "roots://")):
        raise ValueError(f"bundle_store must be a root:// or roots:// URL, not {url.split('?')[0]!r}")
    if "?" in url:
        raise ValueError("bundle_store must not carry a query string (credentials go through "
                         "x509userproxy or a token, never into the job script)")
    if not _STORE_URL_RE.fullmatch(url):
        raise ValueError(f"bundle_store {url!r}: only letters, digits and ._~:/@%+=,- may appear in it "
                         "(it goes into the job script)")
    return url.rstrip("/")


def publish(bundle: BundleFile, store_url: str) -> str:
    """Upload ``bundle`` to ``store_url`` unless a file of its name and size is there; the upload
    goes to a temporary name first and is renamed when the server's checksum matched, so a job
    never fetches half a bundle. Returns the name on the store."""
    from ckpt_tasks.storage.xrootd import XRootDFileInterface

    store = XRootDFileInterface(check_store_url(store_url))
    name = store_name(bundle)
    found = store.exists(name, stat=True)
    if found and found.st_size == bundle.size:
        # the server's checksum of its copy (cheap; XRootD reuses it while the file's mtime is
        # unchanged): a copy changed there is uploaded again, not fetched and refused by every job
        if store.checksum(name) == adler32_of_file(bundle.path)[1]:
            logger.info("bundle %s is on the store already", name)
            return name
        logger.warning("bundle %s on the store differs from this one (its adler32); uploading it again", name)
    started = time.monotonic()
    partial = f".{name}.{os.getpid()}.partial"
    store.upload(bundle.path, partial)
    store.rename(partial, name)
    logger.info("bundle %s uploaded to %s: %.0f MB, %.1f s", name, store_url, bundle.size / 1e6,
                time.monotonic() - started)
    return name
