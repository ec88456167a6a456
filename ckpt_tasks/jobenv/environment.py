"""JobEnvironment: what the batch system tells this process, read from the environment at once.

Outside a batch job every field is empty and the process is a plain one: the scratch
directory is the system's temporary directory, the sandbox the working directory, and
there is no job identity.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ckpt_tasks.errors import JobAdError
from ckpt_tasks.jobenv.limits import DEFAULT_WALLTIME_ATTRIBUTES, SiteLimits, read_site_limits
from ckpt_tasks.jobenv.htcondor import JOB_AD_VARIABLE, SCRATCH_VARIABLE, JobAd, job_identity, read_job_ad

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobEnvironment:
    """The job this process runs in, as its environment variables say (see :func:`current`)."""

    #: "htcondor" inside an HTCondor job, None for a plain process
    batch_system: str | None
    #: the job's own scratch directory ($_CONDOR_SCRATCH_DIR), None outside a job
    scratch: Path | None
    #: the file holding the job's ClassAd ($_CONDOR_JOB_AD), None outside a job
    job_ad_path: Path | None

    @property
    def sandbox(self) -> Path:
        """Where the batch system transfers files to and from: the scratch directory, else the cwd."""
        return (self.scratch or Path.cwd()).absolute()

    def make_workdir(self, prefix: str) -> Path:
        """A new private directory for temporary files, on the job's scratch disk when in a job
        (the worker's /tmp may be small or shared), else in the system's temporary directory."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.scratch))

    def job_ad(self) -> JobAd:
        """The job's ClassAd; raises ``JobAdError`` outside an HTCondor job or when unreadable."""
        return read_job_ad(self.job_ad_path)

    def identity(self) -> dict | None:
        """The job's identity for the lineage (:func:`ckpt_tasks.jobenv.htcondor.job_identity`);
        None outside a job or when the ad cannot be read (with a warning): it never raises."""
        if self.job_ad_path is None:
            return None
        return _cached_identity(self.job_ad_path)

    def site_limits(self, attributes: Sequence[str] = DEFAULT_WALLTIME_ATTRIBUTES) -> SiteLimits:
        """The site's time limits (:mod:`ckpt_tasks.jobenv.limits`); none outside a job, and
        none, with a warning, when the ad cannot be read."""
        if self.job_ad_path is None:
            return SiteLimits()
        try:
            ad = self.job_ad()
        except JobAdError as error:
            logger.warning("no site time limits: %s", error)
            return SiteLimits()
        return read_site_limits(ad, attributes)

    # The next reader of the job environment belongs here too: credentials (token or proxy
    # files with their remaining lifetime).


def current() -> JobEnvironment:
    """The environment of this process now (cheap: it reads variables, the job ad only on demand)."""
    scratch = os.environ.get(SCRATCH_VARIABLE) or None
    job_ad = os.environ.get(JOB_AD_VARIABLE) or None
    return JobEnvironment(batch_system="htcondor" if scratch or job_ad else None,
                          scratch=Path(scratch) if scratch else None,
                          job_ad_path=Path(job_ad) if job_ad else None)


# The ad is read once per sandbox; HTCondor rewrites it on a restart, hence the mtime.
_identity_cache: tuple[Path, float, dict | None] | None = None


def _cached_identity(path: Path) -> dict | None:
    global _identity_cache
    try:
        mtime = os.stat(path).st_mtime
    except OSError as error:
        logger.warning("cannot read the job ad %s for the lineage: %s", path, error.strerror)
        return None
    if _identity_cache is not None and _identity_cache[:2] == (path, mtime):
        return _identity_cache[2]
    info = None
    try:
        info = job_identity(read_job_ad(path))
    except Exception as error:  # the identity is informative: never fail a checkpoint over it
        logger.warning("cannot read the job ad %s for the lineage: %s", path, error)
    _identity_cache = (path, mtime, info)
    return info


def scratch_dir() -> Path | None:
    """The job's scratch directory ($_CONDOR_SCRATCH_DIR); None outside a job."""
    return current().scratch


def sandbox_dir() -> Path:
    """Where the batch system transfers files: the job's scratch directory, else the cwd."""
    return current().sandbox
