"""HTCondor's side of the job environment: the ClassAd of the job this process runs in.

HTCondor writes the ad to the file named by ``$_CONDOR_JOB_AD`` once per sandbox and
names the job's scratch directory (its sandbox) in ``$_CONDOR_SCRATCH_DIR``. The ad is
parsed with ``classad2``, so string values come back without quotes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ckpt_tasks.errors import JobAdError

JOB_AD_VARIABLE = "_CONDOR_JOB_AD"
SCRATCH_VARIABLE = "_CONDOR_SCRATCH_DIR"


@dataclass(frozen=True)
class JobAd:
    """The job attributes the checkpointing layers use."""

    path: Path
    attributes: dict  # keys lower-cased: ClassAd attribute names are case-insensitive

    def get(self, name: str, default=None):
        value = self.attributes.get(name.lower())
        return default if value is None else value

    @property
    def transfer_checkpoint_files(self) -> list[str]:
        """``transfer_checkpoint_files`` of the submit file (``TransferCheckpoint``)."""
        value = self.get("TransferCheckpoint")
        if not value:
            raise JobAdError(
                f"the job ad {self.path} has no TransferCheckpoint: add "
                "'transfer_checkpoint_files = <your checkpoint file>' to the submit file")
        return [item.strip() for item in str(value).split(",") if item.strip()]

    @property
    def checkpoint_exit_code(self) -> int:
        """The exit code that makes HTCondor transfer the checkpoint and restart the job.

        ``checkpoint_exit_code = N`` in a submit file becomes ``SuccessCheckpointExitCode``;
        ``CheckpointExitCode`` is read as a fallback for older or hand-made ads.
        """
        for name in ("SuccessCheckpointExitCode", "CheckpointExitCode"):
            value = self.get(name)
            if value is not None:
                try:
                    return int(value)
                except (TypeError, ValueError) as error:
                    raise JobAdError(f"{name} = {value!r} in {self.path} is not an integer") from error
        raise JobAdError(
            f"the job ad {self.path} has no SuccessCheckpointExitCode: add "
            "'checkpoint_exit_code = 85' to the submit file")


def read_job_ad(path: str | os.PathLike | None = None) -> JobAd:
    """Parse the job ClassAd (default: the file ``$_CONDOR_JOB_AD`` names)."""
    import classad2

    if path is None:
        path = os.environ.get(JOB_AD_VARIABLE)
        if not path:
            raise JobAdError(
                f"${JOB_AD_VARIABLE} is not set: this process is not running inside an HTCondor job "
                "(htcondor mode needs the job's ClassAd)")
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise JobAdError(f"cannot read the job ClassAd {path}: {error.strerror}") from error
    try:
        ad = classad2.parseOne(text)
    except Exception as error:  # classad2 raises its own types and ValueError
        raise JobAdError(f"cannot parse the job ClassAd {path}: {error}") from error
    attributes = {}
    for key in ad.keys():
        try:
            value = ad.eval(key)
        except Exception:  # an expression that cannot be evaluated outside the schedd
            value = None
        # Undefined and Error evaluate to classad2.Value members; they mean "not set".
        attributes[key.lower()] = None if isinstance(value, classad2.Value) else value
    return JobAd(path, attributes)


def _int_or_none(value) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def job_identity(ad: JobAd) -> dict:
    """Who the job is and how often it started, as the lineage of a checkpoint records it."""
    cluster, proc = _int_or_none(ad.get("ClusterId")), _int_or_none(ad.get("ProcId"))
    return {
        "job_id": f"{cluster}.{proc}" if cluster is not None and proc is not None else None,
        "cluster_id": cluster,
        "proc_id": proc,
        # HTCondor counts real starts only: an eviction raises it, an exit-85 restart does not.
        "num_job_starts": _int_or_none(ad.get("NumJobStarts")),
        "global_job_id": ad.get("GlobalJobId"),
        "job_current_start_date": _int_or_none(ad.get("JobCurrentStartDate")),
        "last_vacate_time": _int_or_none(ad.get("LastVacateTime")),
        # What ended the earlier starts, for the crash-loop check (ckpt_tasks/htcondor/holds.py):
        # exits HTCondor requeued, and holds. Only when the ad has them (hand-made ads do not).
        **{key: _int_or_none(ad.get(name)) for key, name in (("num_job_completions", "NumJobCompletions"),
                                                              ("num_holds", "NumHolds"))
           if ad.get(name) is not None},
    }
