"""HTCondorWorkflow: law's HTCondor workflow, made safe for self-checkpointing trainings.

What it changes in law's stock workflow:

- the job script (``job.sh``) relays SIGTERM/SIGINT to ``law run`` and passes its
  exit code to HTCondor unchanged, 85 included;
- the job manager (``CheckpointingJobManager``) reads a job that is idle or
  running again, transferring output (JobStatus 6) or suspended (7) as alive,
  whatever exit code an earlier run of it left, so no branch is resubmitted
  while it still runs; a held job is pending while its hold is temporary and
  failed, with its reason, when permanent (``holds.py``);
- the workflow proxy removes the old job before any resubmission and resubmits
  no permanently held one; the submit file releases temporary holds
  (``periodic_release``) and holds crash loops (exit 86, ``on_exit_hold``);
- job completeness is checked on the branch outputs, not trusted from exit 0;
- two checkpoint modes (``--checkpoint-mode``):
  ``store``: checkpoints go to the task's store (XRootD or a shared path); an
  evicted job goes back to idle, restarts and resumes from the store;
  ``spool``: checkpoints stay in the job's sandbox and HTCondor itself moves them
  (``checkpoint_exit_code``, ``transfer_checkpoint_files``); the training exits
  with 85 every ``--checkpoint-exit-interval`` seconds so HTCondor spools them;
  the checkpoint committed at SIGTERM comes back at eviction (``ON_EXIT_OR_EVICT``
  with the spool directory as output) into the next sandbox;
- credentials (``credentials.py``): the submitter's proxy goes with the jobs, or the token
  route (``--credentials token``: ``use_oauth_services``, ``BEARER_TOKEN_FILE`` in the job);
  before submitting, a preflight checks the credential's lifetime and probes the store.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import law
import luigi

law.contrib.load("htcondor")

from law.contrib.htcondor import HTCondorJobManager  # noqa: E402  (needs the contrib loaded)

from ckpt_tasks.parameters import (CheckedChoiceParameter, NonNegativeFloatParameter,  # noqa: E402
                                   NonNegativeIntParameter, PositiveIntParameter)
from ckpt_tasks.htcondor import software as routes  # noqa: E402
from ckpt_tasks.htcondor import credentials as creds  # noqa: E402
from ckpt_tasks.htcondor import holds  # noqa: E402
from ckpt_tasks.stop import CHECKPOINT_EXIT_CODE  # noqa: E402

logger = logging.getLogger(__name__)

#: the sandbox directory that holds a spool-mode branch's checkpoints (rendered into job.sh)
SPOOL_DIR = "ckpt_spool"
CONFIG_SECTION = "ckpt_tasks_htcondor"


class CheckpointingJobManager(holds.HoldAwareJobManagerMixin, HTCondorJobManager):
    """law's HTCondor job manager with a status mapping that knows self-checkpointing jobs
    and held jobs (temporary holds pending, permanent ones failed: ckpt_tasks/htcondor/holds.py)."""

    # One submit file per job, which runs job.sh directly (law's grouped submission
    # goes through a wrapper of its own that would stand between HTCondor and job.sh).
    job_grouping_submit = False

    @classmethod
    def map_status(cls, status_flag):
        # 1 idle, 2 running, 6 transferring output, 7 suspended: alive. 5 held and 3 removed:
        # failed (law removes and resubmits them). 4 completed: by exit code, below.
        if status_flag in ("0", "1", "U", "I"):
            return cls.PENDING
        if status_flag in ("2", "R", "6", ">", "<", "7", "S"):
            return cls.RUNNING
        if status_flag in ("4", "C"):
            return cls.FINISHED
        return cls.FAILED

    @classmethod
    def parse_long_output(cls, out):
        query_data = super().parse_long_output(out)
        # law marks every job with a non-zero ExitCode as failed. For a job that is idle or
        # running again, that code belongs to an earlier run (an eviction, a checkpoint exit).
        for block in out.strip().split("\n\n"):
            data = dict(cls.long_block_cre.findall(block + "\n"))
            if "ClusterId" not in data or "ProcId" not in data:
                continue
            job = query_data.get(f"{data['ClusterId']}.{data['ProcId']}")
            status = cls.map_status(data.get("JobStatus"))
            if job is not None and status in (cls.PENDING, cls.RUNNING):
                job.update(status=status, code=0, error=None)
        return query_data


class HTCondorWorkflow(law.contrib.htcondor.HTCondorWorkflow):
    """law's HTCondorWorkflow for CheckpointedTasks; see the module docstring."""

    checkpoint_mode = CheckedChoiceParameter(
        default="store", choices=["store", "spool"], significant=False,
        description="where checkpoints survive an eviction: 'store' (XRootD or a shared path) or "
                    "'spool' (HTCondor's own checkpoint transfer); default: store")
    request_gpus = NonNegativeIntParameter(default=0, significant=False,
                                      description="GPUs per job; default: 0")
    request_memory = luigi.Parameter(default="2GB", significant=False,
                                     description="memory per job (HTCondor units); default: 2GB")
    request_disk = luigi.Parameter(default="2GB", significant=False,
                                   description="disk per job (HTCondor units); default: 2GB")
    request_cpus = PositiveIntParameter(default=1, significant=False, description="CPUs per job; default: 1")
    crash_loop_starts = NonNegativeIntParameter(
        default=3, significant=False,
        description="a job that HTCondor restarted this many times after a failing exit, with no checkpoint "
                    "since, is held as a crash loop (exit 86, on_exit_hold; evictions and releases do not "
                    "count); 0 never; default: 3")
    hold_release_delay = NonNegativeIntParameter(
        default=300, significant=False,
        description="seconds before a temporary hold (transfer failure, ...) is released; default: 300")

    workflow_proxy_cls = holds.CheckpointingWorkflowProxy
    software = CheckedChoiceParameter(
        default=routes.config_default(CONFIG_SECTION, "software", "shared"), choices=list(routes.ROUTES),
        significant=False, description="how jobs get the code and environment: 'shared' (same paths on the "
                                       "workers), 'bundle' (shipped tarballs), 'container' (--container-image); "
                                       "default: [ckpt_tasks_htcondor] software in law.cfg, else shared")
    container_image = luigi.Parameter(
        default=routes.config_default(CONFIG_SECTION, "container_image", ""), significant=False,
        description="the image of --software container (docker://, .sif, CVMFS path, URL); "
                    "default: [ckpt_tasks_htcondor] container_image in law.cfg")

    credentials = CheckedChoiceParameter(
        default=routes.config_default(CONFIG_SECTION, "credentials", "proxy"), choices=list(creds.ROUTES),
        significant=False, description="how jobs get their storage credential: 'proxy' (x509userproxy), "
                                       "'token' (use_oauth_services, needs a credmon) or 'shared' (the "
                                       "submitter's files, on a shared file system); default: "
                                       "[ckpt_tasks_htcondor] credentials in law.cfg, else proxy")
    oauth_service = luigi.Parameter(
        default=routes.config_default(CONFIG_SECTION, "oauth_service", "scitokens"), significant=False,
        description="the OAuth service of --credentials token (the job's token is "
                    "$_CONDOR_CREDS/<service>.use); default: [ckpt_tasks_htcondor] oauth_service, else scitokens")
    credential_min_lifetime = NonNegativeFloatParameter(
        default=float(routes.config_default(CONFIG_SECTION, "credential_min_lifetime", "0")), significant=False,
        description="seconds a credential must have left, before submitting and when a job starts; "
                    "0: 1 hour for a proxy, 5 minutes for a token; default: [ckpt_tasks_htcondor] "
                    "credential_min_lifetime, else 0")
    expected_runtime = NonNegativeFloatParameter(
        default=float(routes.config_default(CONFIG_SECTION, "expected_runtime", "0")), significant=False,
        description="seconds the jobs are expected to run: a credential that ends earlier gives a warning "
                    "before submitting; 0: the site's limit among the submit commands (+MaxRuntime, "
                    "+RequestWalltime, ...), if any; default: [ckpt_tasks_htcondor] expected_runtime, else 0")

    exclude_params_branch = {"request_gpus", "request_memory", "request_disk", "request_cpus", "software",
                             "container_image", "credentials", "oauth_service", "credential_min_lifetime",
                             "expected_runtime"}

    def htcondor_output_directory(self):
        data = os.path.expandvars(os.environ.get("CKPT_TASKS_DATA", "$CKPT_TASKS_ROOT/data"))
        return law.LocalDirectoryTarget(os.path.join(data, "htcondor", self.task_family, self.live_task_id))

    def htcondor_job_file(self):
        return law.JobInputFile(Path(__file__).with_name("job.sh"), copy=True, render_local=True)

    def htcondor_job_manager_cls(self):
        return CheckpointingJobManager

    def htcondor_check_job_completeness(self):
        return True

    def htcondor_cmdline_args(self):
        args = super().htcondor_cmdline_args()
        if self.checkpoint_mode == "spool":
            # Inside the job, the branch keeps its checkpoints in the sandbox.
            args["--store"] = f"$_CONDOR_SCRATCH_DIR/{SPOOL_DIR}"
        return args

    def _check_store_reaches_the_workers(self) -> None:
        """Without a shared file system (bundle, container) a local store is each worker's own
        disk: every eviction would restart from scratch. Refuse it before submitting."""
        store = str(getattr(self, "store", "") or "")
        remote = "://" in store and not store.startswith("file://")
        if self.software != "shared" and self.checkpoint_mode == "store" and store and not remote:
            raise ValueError(
                f"--store={store} is a local path, but --software={self.software} runs jobs on workers "
                "that do not share this file system: use a root:// or roots:// store, or "
                "--checkpoint-mode spool")

    @contextlib.contextmanager
    def htcondor_workflow_run_context(self):
        # Before anything is submitted: the credential's lifetime and a probe of the store
        # (credentials.py). A refusal fails the workflow with its reason; no job is submitted.
        creds.preflight_before_submit(self, CONFIG_SECTION)
        yield

    def htcondor_job_config(self, config, job_num, branches):
        self._check_store_reaches_the_workers()
        root = os.environ.get("CKPT_TASKS_ROOT") or str(Path(__file__).resolve().parents[2])
        config.render_variables["ckpt_spool_dir"] = SPOOL_DIR
        # One log, stdout and stderr file per job in the output directory, to watch the jobs.
        config.log, config.stdout, config.stderr = "log.txt", "stdout.txt", "stderr.txt"
        content = config.custom_content
        # A training on N ranks (--ranks) runs N processes in the job: one CPU (or GPU) each.
        ranks = getattr(self, "ranks", 1)
        content.append(("request_cpus", max(self.request_cpus, ranks)))
        content.append(("request_memory", self.request_memory))
        content.append(("request_disk", self.request_disk))
        if self.request_gpus:
            content.append(("request_gpus", max(self.request_gpus, ranks)))
        # The submitter's X.509 proxy goes with the job (HTCondor refreshes the job's copy when
        # the one on the access point is renewed), or the token route's use_oauth_services.
        content.extend(creds.submit_commands(self.credentials, self.oauth_service))
        min_lifetime = self.credential_min_lifetime if self.credential_min_lifetime > 0 else None
        config.render_variables.update(creds.render_variables(self.credentials, self.oauth_service, min_lifetime))
        # HTCondor sends SIGTERM on eviction; the job script relays it.
        content.append(("kill_sig", "SIGTERM"))
        # Temporary holds are released, crash loops (exit 86) held: ckpt_tasks/htcondor/holds.py.
        content.extend(holds.submit_commands(delay=self.hold_release_delay))
        if self.checkpoint_mode == "spool":
            content.append(("checkpoint_exit_code", CHECKPOINT_EXIT_CODE))
            content.append(("transfer_checkpoint_files", SPOOL_DIR))
            content.append(("preserve_relative_paths", "true"))
            # At an eviction HTCondor sends the *output* list back (not the checkpoint list)
            # and copies it into the next sandbox: the checkpoint committed at SIGTERM
            # survives. (With ON_EXIT only the last exit-85 spool would.) At the job's end
            # the directory also lands in the initialdir (the workflow's output directory).
            content.append(("when_to_transfer_output", "ON_EXIT_OR_EVICT"))
            content.append(("transfer_output_files", SPOOL_DIR))
        else:
            # Store mode: an exit with 85 (the site's time limit, --checkpoint-exit-interval)
            # puts the job back to idle, to resume from the store in a new sandbox, instead of
            # ending it as a failure that law would count against its retries.
            content.append(("on_exit_remove",
                            f"(ExitBySignal =?= true) || (ExitCode =!= {CHECKPOINT_EXIT_CODE})"))
        # Site additions: every option of [ckpt_tasks_htcondor] in law.cfg is a submit command.
        cfg = law.config.Config.instance()
        if cfg.has_section(CONFIG_SECTION):
            for option in [o for o in cfg.options(CONFIG_SECTION) if o not in routes.SOFTWARE_OPTIONS
                           and o not in creds.CREDENTIAL_OPTIONS]:
                content.append((option, cfg.get_expanded(CONFIG_SECTION, option)))
        routes.configure_job(config, self, branches, route=self.software, root=root,
                               container_image=self.container_image,
                               settings=routes.settings_from_config(CONFIG_SECTION))
        return config


# In the job, before a branch trains: a crash loop exits 86 (held by on_exit_hold).
HTCondorWorkflow.event_handler(luigi.Event.START)(holds.crash_loop_guard)
