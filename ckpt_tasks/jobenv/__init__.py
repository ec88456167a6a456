"""The job environment: where this process runs, read in one place.

Everything the batch system tells a job about itself is read here and nowhere else:

- ``environment.py``: :class:`JobEnvironment` (:func:`current`), the scratch directory,
  the sandbox HTCondor transfers, a work directory on the scratch disk, and the job's
  identity for the lineage of a checkpoint;
- ``htcondor.py``: the HTCondor job ClassAd (``$_CONDOR_JOB_AD``), parsed with ``classad2``.

This layer sits below the checkpointers and the law layer and above nothing but the
standard library and ``classad2``; it imports neither law nor the storage. The site's
limits (walltime, vacate time) and credentials are the next things to read here.
"""
from ckpt_tasks.jobenv.environment import JobEnvironment, current, sandbox_dir, scratch_dir
from ckpt_tasks.jobenv.htcondor import JOB_AD_VARIABLE, SCRATCH_VARIABLE, JobAd, job_identity, read_job_ad

__all__ = ["JOB_AD_VARIABLE", "SCRATCH_VARIABLE", "JobAd", "JobEnvironment", "current", "job_identity",
           "read_job_ad", "sandbox_dir", "scratch_dir"]
