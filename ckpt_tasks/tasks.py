"""CheckpointedTask: a law task whose training resumes from its newest remote checkpoint.

A subclass says how to build its training state, how to train and what to write
at the end; the base class does the rest::

    class MyTraining(CheckpointedTask):
        def create_state(self):
            model = Net(); optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            return TrainingState(model=model, optimizer=optimizer)

        def train(self, state, session):
            while state.epoch < 10:
                for batch in batches(state.epoch, start=state.batch):
                    ...                         # forward, backward, optimizer.step()
                    state.batch += 1; state.step += 1
                    session.step(loss=loss.item())   # may checkpoint, or stop here on SIGTERM
                state.epoch += 1; state.batch = 0

        def finish(self, state):
            torch.save(state.objects["model"].state_dict(), self.output()["model"].path)

``run()`` opens the branch's CheckpointStore, restores the newest verified
checkpoint (refusing one made with other parameters), trains, checkpoints every
``--checkpoint-every`` steps and ``--checkpoint-interval`` seconds, commits a last
checkpoint and exits with code 85 on SIGTERM or SIGINT, and calls ``finish`` only
when training is over, so the task is complete only then.

Parameters are checked whenever the task is instantiated, before ``complete()`` is asked
(``modify_param_values``, :mod:`ckpt_tasks.parameters`): under ``law run`` a bad value ends
the command with exit code 2, naming the parameter and what it accepts.
"""
from __future__ import annotations

import logging
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import law
import luigi

from ckpt_tasks import jobenv
from ckpt_tasks.async_checkpoint import TrainingStateCommitter, checkpoint_metadata
from ckpt_tasks.checkpointer import Checkpointer
from ckpt_tasks.errors import StorageAuthenticationFailed, StoragePermissionDenied
from ckpt_tasks.jobenv.limits import DEFAULT_MARGIN, SiteLimits, parse_attribute_list
from ckpt_tasks.fingerprint import parameter_fingerprint
from ckpt_tasks.parameters import (CheckedBoolParameter, LocationParameter, NonNegativeFloatParameter,
                                   PositiveFloatParameter, PositiveIntParameter, check_parameters)
from ckpt_tasks.policy import SaveReason
from ckpt_tasks.progress import SchedulerProgress, past_evictions, step_bar
from ckpt_tasks.state import TrainingState
from ckpt_tasks.stop import CHECKPOINT_EXIT_CODE, EXIT_CREDENTIAL_REFUSED, exit_process
from ckpt_tasks.storage.store import CheckpointStore, RetryPolicy
from ckpt_tasks.storage.targets import checkpoints_target
from ckpt_tasks.transfer import StoreTransfer

logger = logging.getLogger(__name__)


class TaskCheckpointer(Checkpointer):
    """The Checkpointer of a CheckpointedTask: commits a TrainingState into a CheckpointStore.

    It is the seed's Checkpointer composed with a :class:`TrainingStateCommitter`
    (asynchronous commits, a bounded final commit) and a StoreTransfer:

    - it stops only at the end of a training step (``defer_signals``): the state is a
      live model, inconsistent in the middle of one;
    - it leaves the process with ``os._exit`` (``hard_exit``): luigi catches SystemExit
      and would report a failure instead of exit code 85;
    - with ``exit_interval`` it stops by itself after that many seconds, at the end of
      a step, as after a signal: HTCondor spools the checkpoint (spool mode) and
      restarts the job at once;
    - with ``site_limits`` it stops the same way ``walltime_margin`` seconds before the
      site's time limit (the job is restarted instead of killed or held), and its stop
      deadline is cut to fit into the job's vacate time.
    """

    def __init__(self, workdir: Path, state: TrainingState, store_transfer: StoreTransfer,
                 exit_interval: float | None = None, asynchronous: bool = True,
                 stop_deadline: float = 300.0, site_limits: SiteLimits | None = None,
                 walltime_margin: float = DEFAULT_MARGIN, **kwargs):
        self.exit_interval = exit_interval
        self.site_limits = site_limits or SiteLimits()
        self._started = time.monotonic()
        self._stop_at = self.site_limits.stop_at(walltime_margin)
        if self.site_limits.deadline is not None or self.site_limits.vacate_time is not None:
            logger.info("site limits: %s", self.site_limits.describe())
        if self._stop_at is not None and self._stop_at <= time.time():
            logger.warning("%s leaves less than the margin of %.0f s: the job stops after its first step",
                           self.site_limits.source, walltime_margin)
        super().__init__(workdir / "state.pt", lambda path, value: value.save(path),
                         lambda path: state.load(path) or state, defer_signals=True, hard_exit=True,
                         transfer=store_transfer,
                         committer=TrainingStateCommitter(state, store_transfer, asynchronous,
                                                          self.site_limits.stop_deadline(stop_deadline)),
                         **kwargs)

    def step(self, value: Any) -> None:
        """The Checkpointer's step; past ``exit_interval`` or the site's limit it then commits
        and exits with the checkpoint exit code."""
        if not self.stop_requested:
            elapsed = time.monotonic() - self._started
            if self.exit_interval and elapsed >= self.exit_interval:
                logger.info("checkpoint exit after %.0f s", elapsed)
                self.committer.stop_reason = SaveReason.EXIT
                self.stop_guard.request(signal.SIGTERM)
            elif self._stop_at is not None and time.time() >= self._stop_at:
                logger.info("checkpoint exit before the site's limit: %s", self.site_limits.describe())
                self.committer.stop_reason = SaveReason.SITE_LIMIT
                self.stop_guard.request(signal.SIGTERM)
        with credential_refusals_exit():
            super().step(value)

    def _save(self, value: Any) -> None:
        if self.stop_requested:
            # A save due at the step where the stop is honoured is the stop's own: committed now,
            # with the stop's reason, so the history never takes it for an interval save.
            self._save_final(value)
        else:
            super()._save(value)

    def flush(self) -> None:
        """Wait for the commit in flight; raise its error, if it failed."""
        self.committer.wait()

    def exit_code_for(self, error: Exception) -> int:
        """A credential the storage refused in the last commit: :data:`EXIT_CREDENTIAL_REFUSED`."""
        if isinstance(error, (StorageAuthenticationFailed, StoragePermissionDenied)):
            logger.error("the storage refused this job's credential; renew the proxy or token where the "
                         "job was submitted, then condor_release it")
            return EXIT_CREDENTIAL_REFUSED
        return super().exit_code_for(error)


def exit_credential_refused(message: str) -> None:
    """Leave with :data:`EXIT_CREDENTIAL_REFUSED`: no restart fixes a refused credential."""
    logger.error("%s. Renew the proxy or token where the job was submitted (for HTCondor: on the "
                 "access point, then condor_release the job); the committed checkpoints are kept", message)
    exit_process(EXIT_CREDENTIAL_REFUSED, hard=True)


@contextmanager
def credential_refusals_exit() -> Iterator[None]:
    """Turn the storage refusing this job's credential into :func:`exit_credential_refused`:
    training on without checkpoints, or restarting in a loop, would burn GPU hours."""
    try:
        yield
    except (StorageAuthenticationFailed, StoragePermissionDenied) as error:
        exit_credential_refused(f"the storage refused this job's credential: {type(error).__name__}: {error}")


class TrainingSession:
    """What ``CheckpointedTask.train`` talks to: ``step()`` after every optimizer step."""

    def __init__(self, task: "CheckpointedTask", state: TrainingState, checkpointer: TaskCheckpointer,
                 total_steps: int | None, scheduler: SchedulerProgress | None = None):
        self.task = task
        self.state = state
        self.checkpointer = checkpointer
        self.total_steps = total_steps
        self.scheduler = scheduler  # progress for luigid's web page (ckpt_tasks.progress)
        self._bar = None

    def step(self, **metrics: float) -> None:
        """Record metrics, checkpoint when due, and stop here (exit 85) when a signal asked for it.

        Call it after updating ``state.step``/``epoch``/``batch`` to where training continues.
        """
        if metrics:
            self.state.record(**metrics)
        self.checkpointer.step(self.state)
        self._show_progress(metrics)

    def _show_progress(self, metrics: dict[str, float]) -> None:
        if self._bar is None:
            self._bar = step_bar(self.total_steps, initial=self.state.step - 1, desc=self.task.task_family)
        self._bar.update(1)
        if metrics:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        if self.total_steps:
            self.task.publish_progress(100.0 * self.state.step / self.total_steps)
        if self.scheduler is not None:
            self.scheduler.update(self.state.step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class CheckpointedTask(law.Task):
    """Base class of a training that survives eviction; see the module docstring."""

    store = LocationParameter(default="", significant=False,
                              description="where checkpoints go: a path, file:// or root://host:port//path; "
                                          "default: [ckpt_tasks] store in law.cfg")
    checkpoint_every = PositiveIntParameter(default=100, significant=False,
                                            description="checkpoint every N training steps; default: 100")
    checkpoint_interval = NonNegativeFloatParameter(default=600.0, significant=False,
                                                    description="also checkpoint after this many seconds; "
                                                                "0 disables; default: 600")
    keep_last = PositiveIntParameter(default=3, significant=False,
                                     description="checkpoints to keep; default: 3")
    checkpoint_exit_interval = NonNegativeFloatParameter(
        default=0.0, significant=False,
        description="exit with 85 after the first checkpoint once this many seconds passed, so "
                    "HTCondor spools the checkpoint (spool mode); 0 never; default: 0")
    async_checkpoint = CheckedBoolParameter(
        default=True, significant=False, parsing=CheckedBoolParameter.EXPLICIT_PARSING,
        description="commit checkpoints in the background, pausing training only for an in-memory "
                    "snapshot; default: True")
    stop_deadline = PositiveFloatParameter(
        default=300.0, significant=False,
        description="seconds a SIGTERM may take to commit the last checkpoint (HTCondor hard-kills "
                    "after its vacate time, 600 s by default); default: 300")
    walltime_margin = NonNegativeFloatParameter(
        default=300.0, significant=False,
        description="seconds before the site's time limit (read from the job ad: MaxRuntime, "
                    "RequestRuntime, RequestWalltime, allowed_execute_duration, ...; [ckpt_tasks] "
                    "walltime_attributes in law.cfg) at which to commit and exit with 85; default: 300")
    storage_timeout = NonNegativeFloatParameter(default=120.0, significant=False,
                                                description="seconds to retry an unanswering storage before "
                                                            "failing; 0 no retry; default: 120")

    #: parameters a resumed training may change (e.g. the number of epochs, to train longer)
    fingerprint_exclude: tuple[str, ...] = ()
    #: environment variables the task's outputs need; unset ones are refused before any work
    required_environment: tuple[str, ...] = ()

    exclude_index = True  # a base class: law index lists only runnable tasks
    exclude_params_index = {"store", "checkpoint_every", "checkpoint_interval", "checkpoint_exit_interval",
                            "keep_last", "storage_timeout", "async_checkpoint", "stop_deadline"}

    @classmethod
    def modify_param_values(cls, params):
        """law's hook on every instantiation, before ``complete()``: refuse bad values here.

        Every :class:`~ckpt_tasks.parameters.CheckedParameter` of the task (its own and a
        subclass's) is checked in :func:`~ckpt_tasks.parameters.check_parameters`; under
        ``law run`` a refused value ends the command with exit code 2 and nothing is done.
        """
        return type(params)(check_parameters(cls, super().modify_param_values(params)))

    # -- what a subclass implements ------------------------------------------------------------

    def create_state(self) -> TrainingState:
        """A fresh TrainingState (model, optimizer, ...) as at the start of training."""
        raise NotImplementedError

    def train(self, state: TrainingState, session: TrainingSession) -> None:
        """Train from ``state``'s position to the end, calling ``session.step()`` after each step."""
        raise NotImplementedError

    def finish(self, state: TrainingState) -> None:
        """Write the final outputs; called once, after ``train`` returned."""
        raise NotImplementedError

    def total_steps(self) -> int | None:
        """Number of training steps in all, for progress; None when unknown."""
        return None

    # -- where checkpoints live ------------------------------------------------------------------

    def checkpoint_params(self) -> dict[str, Any]:
        """The parameters that define this training (recorded in every manifest)."""
        # law's own workflow parameters (branch, workflow type, ...) say how a task runs,
        # not what it trains; the branch's own data is added below.
        law_params = {name for cls in type(self).__mro__
                      if cls.__module__.startswith("law.") and issubclass(cls, luigi.Task)
                      for name, _ in cls.get_params()}
        params = {name: self._param_value(name) for name, param in self.get_params()
                  if param.significant and name not in law_params and name not in self.fingerprint_exclude}
        if isinstance(self, law.BaseWorkflow) and self.is_branch():
            params["branch_data"] = self.branch_data
        return params

    def _param_value(self, name: str) -> Any:
        value = getattr(self, name)
        return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)

    def checkpoint_root(self) -> str:
        """The checked store (``--store`` or law.cfg's), an absolute path or a root(s):// URL."""
        return self.store

    def checkpoint_location(self) -> str:
        """``<store>/<task family>/<parameter fingerprint>/branch-<N>``."""
        location_params = self.checkpoint_params()
        location_params.pop("branch_data", None)  # the branch number stands for it in the path
        fingerprint = parameter_fingerprint(location_params)
        branch = getattr(self, "branch", -1)
        leaf = f"branch-{branch}" if branch is not None and branch >= 0 else "main"
        return f"{self.checkpoint_root()}/{self.task_family}/{fingerprint}/{leaf}"

    def checkpoint_store(self) -> CheckpointStore:
        return CheckpointStore(self.checkpoint_location(), keep_last=self.keep_last,
                               retry=RetryPolicy(deadline=self.storage_timeout))

    def checkpoint_target(self):
        """The checkpoint location as an optional law target: it never makes the task complete."""
        return checkpoints_target(self.checkpoint_location(), total_steps=self.total_steps())

    # -- the run -------------------------------------------------------------------------------------

    def site_limits(self) -> SiteLimits:
        """The time limits of the job this task runs in (none outside a job)."""
        names = parse_attribute_list(law.config.get_expanded("ckpt_tasks", "walltime_attributes", default=None))
        return jobenv.current().site_limits(names)

    def preflight(self, store: CheckpointStore, limits: SiteLimits) -> None:
        """Before any work: the credential's lifetime and a probe of the store (write, rename,
        delete). A refusal leaves with :data:`EXIT_CREDENTIAL_REFUSED`, which the HTCondor
        workflow turns into a hold that says what to renew."""
        from ckpt_tasks.preflight import PreflightRefused, preflight

        expected = None if limits.deadline is None else max(0.0, limits.deadline - time.time())
        try:
            preflight(store.location, expected_duration=expected, deadline=self.storage_timeout)
        except PreflightRefused as error:
            exit_credential_refused(f"refused before training ({error.reason}): {error}")

    def run(self):
        limits = self.site_limits()
        store = self.checkpoint_store()
        self.preflight(store, limits)
        state = self.create_state()
        transfer = StoreTransfer(store, step_of=lambda: state.step, params=self.checkpoint_params(),
                                 metadata_of=lambda: checkpoint_metadata(state, SaveReason.INTERVAL))
        workdir = jobenv.current().make_workdir(prefix="ckpt-")
        checkpointer = TaskCheckpointer(
            workdir, state, transfer,
            asynchronous=self.async_checkpoint,
            stop_deadline=self.stop_deadline,
            checkpoint_every=self.checkpoint_every,
            checkpoint_interval=self.checkpoint_interval or None,
            checkpoint_exit_code=CHECKPOINT_EXIT_CODE,
            exit_interval=self.checkpoint_exit_interval or None,
            site_limits=limits,
            walltime_margin=self.walltime_margin,
        )
        scheduler = SchedulerProgress(self, self.total_steps(), newest=lambda: transfer.last_committed,
                                      evictions=lambda: past_evictions(store))
        session = TrainingSession(self, state, checkpointer, self.total_steps(), scheduler)
        try:
            with credential_refusals_exit():
                checkpointer.restore(state)
            if transfer.restored is not None:
                self.publish_message(f"resuming from step {state.step} "
                                     f"(epoch {state.epoch}, batch {state.batch}) of {store.location}")
            else:
                self.publish_message(f"no checkpoint at {store.location}; starting from scratch")
            self.train(state, session)
            session.close()
            # A commit still in flight must not be cut off when the process ends.
            with credential_refusals_exit():
                checkpointer.flush()
            self.finish(state)
            self.publish_message(f"training complete after {state.step} steps")
            scheduler.update(state.step, force=True)  # the last progress line stays on luigid's page
        finally:
            try:
                checkpointer.flush()
            except Exception as error:  # the task fails anyway; say what happened to the commit
                logger.warning("the last background commit failed: %s", error)
            checkpointer.close()
            shutil.rmtree(workdir, ignore_errors=True)
