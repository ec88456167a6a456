"""HTCondor integration: the job ClassAd of a running job (and, later, the workflow)."""
from ckpt_tasks.htcondor.jobad import JobAd, read_job_ad

__all__ = ["JobAd", "read_job_ad"]
