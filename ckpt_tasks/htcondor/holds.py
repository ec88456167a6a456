"""Held jobs, duplicates and crash loops of a ckpt_tasks HTCondor workflow.

**Hold reasons.** HTCondor says why it held a job in ``HoldReasonCode`` and
``HoldReasonSubCode``. :func:`classify_hold` sorts them in two kinds:

- *temporary* (the same job, released as it is, may well run): file transfer
  failures (12 output, 13 input) whose subcode (an errno, or 0 when the plugin
  gave none) is not a missing or forbidden file; the machine's own hold (21
  ``StartdHeldJob``, e.g. a site's time limit enforced by the machine); the
  per-execution time limit (47 ``allowed_execute_duration``): released, the job
  resumes from its checkpoint. These are released by the submit file's
  ``periodic_release`` (:func:`periodic_release`), a bounded number of times,
  after a delay; meanwhile the workflow counts the job as pending.
- *permanent*, everything else: a hold by the user (1) or at submission (15), by a
  policy expression (3, the crash-loop hold below included), a missing or forbidden
  input or output (12/13 with ENOENT, EACCES, EPERM, ENOTDIR, EISDIR), the site's
  policy (26 ``SystemPolicy``, e.g. memory over the request), resource limits (32/33
  transfer sizes, 34 ``JobOutOfResources``: released as it is, the job meets them
  again), a failed checkpoint transfer (36), the job's total duration (46), a bad
  executable or image (6, 35), anything unknown.
  (The codes are those of the HTCondor manual's ``HoldReasonCode`` table; 3, 12 and
  13 were seen in the test pool.)
  The workflow reports these with the reason and does not resubmit the branch; the
  job stays held for a person to look at, release (``condor_release``) or remove.

**No duplicates.** law resubmits a job it reads as failed without removing the old
one. :class:`CheckpointingWorkflowProxy` removes the old job (``condor_rm``) before
every resubmission, and resubmits no permanently held job at all.

**Crash loops.** A job that HTCondor restarts again and again after it failed, without
committing a checkpoint, burns GPU hours for nothing. Not every restart is a failure:
an eviction (a vacate, graceful or not, also one during start-up), a hold that was
released, or a lost machine restart a job through no fault of its own, and must never
make it a crash loop. What the job ad tells apart (23.9, checked in the test pool): an
exit of the job itself that HTCondor requeued (a site's ``max_retries``/``on_exit_remove``
that retries failures, an exit 85 in store mode) raises ``NumJobCompletions``; a vacate
or a lost starter raises only ``NumJobStarts`` (and ``LastVacateTime``); a hold raises
``NumHolds``, and an exit that ``on_exit_hold`` held raises both counters. So the *crash
restarts* (:func:`crash_restarts`) are the exits less the holds (:func:`requeued_exits`)
since this job's last commit, not counting the committing run's own exit.
The choice here: the job decides, at its start, from its fresh job ad and the store:
with ``crash_loop_starts`` or more crash restarts, it exits with
:data:`CRASH_LOOP_EXIT_CODE`, which the submit file turns into a hold (``on_exit_hold``,
code 3, subcode 86) with a message. HTCondor alone could not say it: in store mode the
progress is only in the store.
"""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from ckpt_tasks.stop import EXIT_CRASH_LOOP, EXIT_CREDENTIAL_REFUSED, EXIT_SOFTWARE_UNUSABLE

logger = logging.getLogger(__name__)

#: the exit code of a job that found itself in a crash loop (held by ``on_exit_hold``)
CRASH_LOOP_EXIT_CODE = EXIT_CRASH_LOOP
CRASH_LOOP_HOLD_REASON = ("ckpt_tasks: the job started again and again without committing a checkpoint "
                          "(a crash loop; see the job's stdout)")
#: the exit codes that hold a job (``on_exit_hold``, code 3, the exit code as subcode), and why
EXIT_HOLD_REASONS = {
    EXIT_CRASH_LOOP: CRASH_LOOP_HOLD_REASON,
    EXIT_SOFTWARE_UNUSABLE: ("ckpt_tasks: the job's software is unusable (a bundle missing, truncated or "
                             "corrupt, or a Python that cannot import torch, law and luigi); the job's stderr "
                             "names the cause"),
    EXIT_CREDENTIAL_REFUSED: ("ckpt_tasks: the storage refused the job's credential (expired, revoked or "
                              "lacking a permission); renew the proxy or token on the access point, then "
                              "condor_release the job: it resumes from its last checkpoint"),
}

TRANSFER_CODES = (12, 13)
#: transfer subcodes (errno) that say the file itself is the problem: releasing will not help
TRANSFER_PERMANENT_ERRNOS = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR)
OTHER_TEMPORARY_CODES = (21, 47)
#: the names of the hold codes this module mentions, for messages
HOLD_CODE_NAMES = {
    1: "held by the user", 3: "held by a policy expression", 6: "failed to start the executable",
    12: "output transfer failed", 13: "input transfer failed", 15: "submitted on hold",
    21: "held by the machine", 26: "held by the site's policy", 32: "input larger than allowed",
    33: "output larger than allowed", 34: "job out of resources", 35: "invalid container image",
    36: "checkpoint transfer failed", 46: "allowed_job_duration reached",
    47: "allowed_execute_duration reached",
}


@dataclass(frozen=True)
class Hold:
    """Why a job is held, and whether that may pass by itself."""

    code: int | None
    subcode: int | None
    reason: str
    temporary: bool

    def describe(self) -> str:
        kind = "temporary, released by periodic_release" if self.temporary else "permanent, not resubmitted"
        name = HOLD_CODE_NAMES.get(self.code or -1, "hold")
        return f"held ({name}, code {self.code}/{self.subcode}, {kind}): {self.reason}"


def _int(value) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def classify_hold(code, subcode=None, reason: str = "") -> Hold:
    """The :class:`Hold` of a job held with ``HoldReasonCode``/``HoldReasonSubCode`` (see the
    module docstring for which are temporary)."""
    code, subcode = _int(code), _int(subcode)
    if code in TRANSFER_CODES:
        temporary = subcode not in TRANSFER_PERMANENT_ERRNOS
    else:
        temporary = code in OTHER_TEMPORARY_CODES
    return Hold(code, subcode, (reason or "").strip(), temporary)


def temporary_hold_expression() -> str:
    """A ClassAd expression, true for the holds :func:`classify_hold` calls temporary."""
    errnos = " && ".join(f"HoldReasonSubCode =!= {n}" for n in TRANSFER_PERMANENT_ERRNOS)
    codes = " || ".join(f"HoldReasonCode == {c}" for c in OTHER_TEMPORARY_CODES)
    transfer = " || ".join(f"HoldReasonCode == {c}" for c in TRANSFER_CODES)
    return f"((({transfer}) && {errnos}) || {codes})"


def periodic_release(delay: float = 300.0, max_holds: int = 5) -> str:
    """``periodic_release``: a temporary hold is released ``delay`` seconds after it began,
    as long as the job was held fewer than ``max_holds`` times (so a transfer that always
    fails ends as a hold that stays)."""
    return (f"{temporary_hold_expression()} && (time() - EnteredCurrentStatus) > {int(delay)} "
            f"&& NumHolds < {int(max_holds)}")


def submit_commands(delay: float = 300.0, max_holds: int = 5) -> list[tuple[str, str]]:
    """The submit commands of the hold policy: release temporary holds; hold the jobs that
    exit with a code of :data:`EXIT_HOLD_REASONS` (crash loop, unusable software, refused credential)."""
    return [
        ("periodic_release", periodic_release(delay, max_holds)),
        ("on_exit_hold", " || ".join(f"ExitCode =?= {code}" for code in EXIT_HOLD_REASONS)),
        ("on_exit_hold_reason", exit_hold_reason_expression()),
        ("on_exit_hold_subcode", "ExitCode"),
    ]


def exit_hold_reason_expression() -> str:
    """A ClassAd expression: the reason of :data:`EXIT_HOLD_REASONS` for the job's exit code."""
    expression = '"ckpt_tasks: held on exit"'
    for code, reason in reversed(EXIT_HOLD_REASONS.items()):
        expression = f'ifThenElse(ExitCode =?= {code}, "{reason}", {expression})'
    return expression


# -- crash loops ---------------------------------------------------------------------------------

def _own_commit(identity: dict, latest) -> dict | None:
    """The job ad counters recorded by ``latest`` when this very job committed it, else None."""
    lineage = ((getattr(latest, "metadata", None) or {}).get("lineage") or {}) if latest is not None else {}
    job = lineage.get("htcondor") or {}
    if job.get("job_id") == identity.get("job_id") and job.get("num_job_starts") is not None:
        return job
    return None  # no checkpoint, or one written by another job (an earlier submission)


def starts_without_progress(identity: dict | None, latest) -> int | None:
    """How many starts of this job came after its newest commit (evictions and releases
    included); None outside a job. See :func:`crash_restarts` for what counts as a crash.

    ``identity`` is the job's (``jobenv.current().identity()``: its ``NumJobStarts`` is
    the number of earlier starts, the sandbox's ad being fresh at every real start);
    ``latest`` the store's newest checkpoint (or None).
    """
    if not identity or identity.get("num_job_starts") is None:
        return None
    starts = int(identity["num_job_starts"])
    job = _own_commit(identity, latest)
    # the run at start n committed it: the starts after n made nothing new
    return starts if job is None else max(0, starts - int(job["num_job_starts"]))


def crash_restarts(identity: dict | None, latest) -> int | None:
    """How often HTCondor restarted this job after an exit of its own since its newest commit:
    the restarts that neither committed progress nor followed an eviction or a release
    (module docstring). None outside a job.

    From the fresh job ad's ``NumJobCompletions`` and ``NumHolds`` (:func:`requeued_exits`);
    when this job committed ``latest``, the count it recorded then is taken off, and one
    more: the committing run's own exit (an exit 85 after its commit) made progress.
    That run may instead have been evicted; then one crash goes uncounted, never the reverse.
    """
    if not identity or identity.get("num_job_starts") is None:
        return None
    exits = requeued_exits(identity)
    job = _own_commit(identity, latest)
    if job is None:
        return exits
    return max(0, exits - requeued_exits(job) - 1)


def requeued_exits(counters: dict) -> int:
    """The exits of a job that HTCondor requeued, from its ``num_job_completions`` and
    ``num_holds``: an exit that ``on_exit_hold`` held (86, 87, 88) raises both, so
    releasing such a hold is no crash. A hold while running raises only ``NumHolds``, so
    this may count one requeued exit too few for each such hold, never one too many."""
    return max(0, int(counters.get("num_job_completions") or 0) - int(counters.get("num_holds") or 0))


def crash_loop_message(identity: dict, restarts: int, latest) -> str:
    """What the job prints before it exits with :data:`CRASH_LOOP_EXIT_CODE`."""
    newest = "no checkpoint" if latest is None else f"the newest checkpoint is step {latest.step}"
    return (f"crash loop: job {identity.get('job_id')} was restarted {restarts} times after failing "
            f"(exits that HTCondor requeued; evictions and releases not counted) without committing a "
            f"checkpoint ({newest}); exiting with {CRASH_LOOP_EXIT_CODE} so that HTCondor holds it. "
            f"Look at the earlier runs' logs, then condor_release or condor_rm the job.")


# -- the workflow's side: the job manager and the resubmissions ------------------------------------

def _condor_q_holds(manager, job_ids: list[str]) -> dict[str, Hold]:
    """The :class:`Hold` of each of ``job_ids`` (held jobs), from one ``condor_q`` call."""
    import shlex
    import subprocess

    from law.config import Config

    cmd = shlex.split(Config.instance().get_expanded("job", "htcondor_cmd_q", default="condor_q"))
    cmd += list(job_ids)
    if manager.pool:
        cmd += ["-pool", manager.pool]
    if manager.scheduler:
        cmd += ["-name", manager.scheduler]
    cmd += ["-af:lng", "ClusterId", "ProcId", "HoldReasonCode", "HoldReasonSubCode", "HoldReason"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("could not read the hold reasons of %s: %s", ", ".join(job_ids), error)
        return {}
    holds = {}
    for block in out.strip().split("\n\n"):
        data = dict(manager.long_block_cre.findall(block + "\n"))
        if "ClusterId" in data and "ProcId" in data:
            holds[f"{data['ClusterId']}.{data['ProcId']}"] = classify_hold(
                data.get("HoldReasonCode"), data.get("HoldReasonSubCode"), data.get("HoldReason", ""))
    return holds


class HoldAwareJobManagerMixin:
    """For law's HTCondor job manager: a held job is pending while its hold is temporary
    (``periodic_release`` will release it) and failed, with its reason, when permanent.
    The hold goes into the job's ``extra["hold"]`` for :class:`CheckpointingWorkflowProxy`."""

    @classmethod
    def parse_long_output(cls, out):
        query_data = super().parse_long_output(out)
        for block in out.strip().split("\n\n"):
            data = dict(cls.long_block_cre.findall(block + "\n"))
            job = query_data.get(f"{data.get('ClusterId')}.{data.get('ProcId')}")
            if job is not None and data.get("JobStatus") in ("5", "H"):
                job["extra"] = {**(job.get("extra") or {}), "held": True}
        return query_data

    def query(self, job_id, *args, **kwargs):
        result = super().query(job_id, *args, **kwargs)
        if result is None:
            return result
        jobs = result if isinstance(job_id, (list, tuple)) else {job_id: result}
        held = [i for i, job in jobs.items() if isinstance(job, dict) and (job.get("extra") or {}).get("held")]
        if held:
            for held_id, hold in _condor_q_holds(self, held).items():
                job = jobs.get(held_id)
                if job is None:
                    continue
                job["extra"]["hold"] = {"code": hold.code, "subcode": hold.subcode, "reason": hold.reason,
                                        "temporary": hold.temporary}
                if hold.temporary:
                    job.update(status=self.PENDING, code=0, error=None)
                else:
                    job.update(status=self.FAILED, error=hold.describe())
        return result


def _proxy_base():
    from law.contrib.htcondor.workflow import HTCondorWorkflowProxy
    return HTCondorWorkflowProxy


class CheckpointingWorkflowProxy(_proxy_base()):
    """law's HTCondor workflow proxy, resubmitting without duplicates (module docstring)."""

    def submit(self, retry_jobs=None):
        if retry_jobs:
            retry_jobs = dict(retry_jobs)
            old_ids = []
            for job_num in list(retry_jobs):
                data = self.job_data.jobs.get(job_num) or {}
                hold = (data.get("extra") or {}).get("hold")
                if hold and not hold.get("temporary"):
                    # a person decides: the job stays held, the branch is not submitted again
                    retry_jobs.pop(job_num)
                    logger.warning("job %s (branches %s) is %s", data.get("job_id"), data.get("branches"),
                                   classify_hold(hold["code"], hold["subcode"], hold["reason"]).describe())
                    continue
                if data.get("job_id") not in (None, self.job_data.dummy_job_id):
                    old_ids.append(data["job_id"])
            if old_ids:
                # law would leave the old job in the queue: a released hold would run it twice
                logger.info("removing jobs %s before resubmitting them", ", ".join(old_ids))
                self.job_manager.cancel(old_ids, silent=True)
        return super().submit(retry_jobs)


def crash_loop_guard(task) -> None:
    """luigi's START handler of HTCondorWorkflow tasks: in an HTCondor job, a branch that
    was restarted ``crash_loop_starts`` times after failing (:func:`crash_restarts`) exits with
    :data:`CRASH_LOOP_EXIT_CODE` before it trains (the submit file holds it)."""
    import os
    import sys

    from ckpt_tasks import jobenv

    limit = getattr(task, "crash_loop_starts", 0)
    if not limit or not task.is_branch() or not hasattr(task, "checkpoint_store"):
        return
    identity = jobenv.current().identity()
    if not identity:
        return
    try:
        latest = task.checkpoint_store().latest()
    except Exception as error:  # the task's own restore will report the storage; never block it here
        logger.warning("crash-loop check skipped: %s", error)
        return
    restarts, starts = crash_restarts(identity, latest), starts_without_progress(identity, latest)
    if restarts is None or restarts < limit:
        if starts:
            logger.info("job %s: %s starts since its last commit, %s of them after a failure (the limit is %s)",
                        identity.get("job_id"), starts, restarts, limit)
        return
    logger.error(crash_loop_message(identity, restarts, latest))
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    # luigi swallows exceptions, SystemExit included, raised in event handlers.
    os._exit(CRASH_LOOP_EXIT_CODE)
