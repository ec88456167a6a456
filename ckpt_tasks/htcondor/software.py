"""How a job gets its software: the ``--software`` route of the HTCondor workflow.

``shared``
    The worker sees the submit side's checkout and ``.venv`` at the same paths (a shared
    file system); the job script runs them there.
``bundle``
    The job gets the code bundle and the environment bundle (:mod:`.bundle`,
    :mod:`.envbundle`) through HTCondor's file transfer or, with ``bundle_store``, from the
    XRootD store (:mod:`.bundlecache`), checks their size and sha256 and runs from there:
    nothing of the submit machine is used. The environment is unpacked once per worker into
    its cache (``worker_cache``), keyed by the bundle's sha256, and reused by later jobs;
    with a bundle store a job whose worker has it fetches nothing.
``container``
    HTCondor's container universe with ``container_image`` (``docker://``, a ``.sif``, a
    CVMFS path or URL): the image brings Python and the dependencies (``containers/``),
    the code bundle brings the code.

Without a shared file system a local output file written on the worker would stay there:
in the bundle and container routes the job writes ``$CKPT_TASKS_DATA`` into its sandbox
(``ckpt_data``) and every local output of its branches comes back to the submit side's
path by HTCondor's output transfer (the directory, remapped onto the submit side's
``$CKPT_TASKS_DATA``).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import law
from law.job.base import BaseJobFileFactory

from ckpt_tasks.htcondor.bundlecache import Retention, check_store_url
from ckpt_tasks.stop import EXIT_SOFTWARE_UNUSABLE

logger = logging.getLogger(__name__)

ROUTES = ("shared", "bundle", "container")
#: options of the workflow's law.cfg section that configure the software, not submit commands
SOFTWARE_OPTIONS = frozenset({"software", "container_image", "bundle_cache", "bundle_cache_keep",
                              "bundle_cache_days", "bundle_store", "worker_cache", "worker_cache_keep",
                              "worker_cache_days"})
#: what a worker_cache may hold: a path, with $VAR / ${VAR} expanded by the job on the worker
_WORKER_CACHE_RE = re.compile(r"^[A-Za-z0-9_./${}:~+-]*$")
#: the sandbox directory that stands for $CKPT_TASKS_DATA in a job of the bundle/container routes
JOB_DATA_DIR = "ckpt_data"
#: the job's exit code when its software is unusable (a bundle missing, truncated, corrupt; an
#: environment that cannot import torch); holds.py's on_exit_hold holds the job
SOFTWARE_EXIT_CODE = EXIT_SOFTWARE_UNUSABLE


def config_default(section: str, option: str, default: str) -> str:
    """``[section] option`` of law.cfg, expanded, or ``default``."""
    cfg = law.config.Config.instance()
    if cfg.has_section(section) and cfg.has_option(section, option):
        return cfg.get_expanded(section, option) or default
    return default


@dataclass(frozen=True)
class Settings:
    """The software options of law.cfg's workflow section (:func:`settings_from_config`).

    ``cache_dir``: the submit side's bundle cache (None: :func:`.bundle.default_cache_dir`);
    ``cache_retention``: what it keeps; ``bundle_store``: a root:// URL the bundles are
    uploaded to and fetched from by the jobs ('' : HTCondor's file transfer);
    ``worker_cache``: the worker's cache of unpacked environments, a path on the worker,
    ``$VAR`` expanded there ('': ``$CKPT_TASKS_WORKER_CACHE``, else
    ``${XDG_CACHE_HOME:-$HOME/.cache}/ckpt_tasks/envs``); ``worker_retention``: what it keeps.
    """

    cache_dir: str | None = None
    cache_retention: Retention = Retention()
    bundle_store: str = ""
    worker_cache: str = ""
    worker_retention: Retention = Retention()

    def __post_init__(self):
        if self.bundle_store:
            object.__setattr__(self, "bundle_store", check_store_url(self.bundle_store))
        if not _WORKER_CACHE_RE.match(self.worker_cache):
            raise ValueError(f"worker_cache {self.worker_cache!r}: only a path with $VAR or ${{VAR}} "
                             "(no quotes, spaces or other shell syntax)")
        if self.worker_cache and not self.worker_cache.startswith(("/", "$")):
            # the job expands $VARs only: ~ and a relative path would name a directory in the sandbox
            raise ValueError(f"worker_cache {self.worker_cache!r}: an absolute path or one that starts "
                             "with $VAR (like $HOME/...), not ~ nor a relative path")


def _raw_option(section: str, option: str) -> str:
    # Not expanded here: $VARs of worker_cache belong to the worker, not to the submit side.
    cfg = law.config.Config.instance()
    if cfg.has_section(section) and cfg.has_option(section, option):
        return cfg.get(section, option, raw=True) or ""
    return ""


def settings_from_config(section: str) -> Settings:
    """The :class:`Settings` of ``[section]`` in law.cfg (defaults where an option is absent)."""
    def retention(prefix: str) -> Retention:
        return Retention(keep=int(config_default(section, f"{prefix}_keep", "3")),
                         days=float(config_default(section, f"{prefix}_days", "14")))

    return Settings(cache_dir=config_default(section, "bundle_cache", "") or None,
                    cache_retention=retention("bundle_cache"),
                    bundle_store=config_default(section, "bundle_store", ""),
                    worker_cache=_raw_option(section, "worker_cache"),
                    worker_retention=retention("worker_cache"))


def submit_data_dir(root: str) -> str:
    """The submit side's ``$CKPT_TASKS_DATA`` (default ``<root>/data``), absolute."""
    return os.path.abspath(os.path.expandvars(os.environ.get("CKPT_TASKS_DATA", os.path.join(root, "data"))))


#: bundles this process put on a store already (a workflow submits one job per branch)
_published: dict[tuple[str, str], str] = {}
#: bundle caches this process pruned already
_pruned: set[Path] = set()


def _add_bundle(config, key: str, bundle, store: str) -> None:
    render = config.render_variables
    if store:
        # On the store: the job fetches it when its worker lacks it; HTCondor transfers nothing.
        from ckpt_tasks.htcondor.bundlecache import publish

        if (store, bundle.sha256) not in _published:
            _published[(store, bundle.sha256)] = publish(bundle, store)
        render[key] = _published[(store, bundle.sha256)]
    else:
        # Not copied into law's job directory (it may be GB): transferred from the cache as it is.
        config.input_files[key] = law.JobInputFile(str(bundle.path), copy=False)
    render[f"{key}_size"] = str(bundle.size)
    render[f"{key}_sha256"] = bundle.sha256


def ship_bundles(config, root: str, route: str, settings: Settings) -> None:
    """Build (or reuse) the bundles the route needs and add them as job input files (or put them
    on the bundle store); their names inside the sandbox, sizes and checksums become render
    variables of job.sh. Then the cache's retention drops bundles no longer used."""
    from ckpt_tasks.htcondor.bundle import build_code_bundle, default_cache_dir
    from ckpt_tasks.htcondor.bundlecache import prune

    cache = Path(os.path.expandvars(settings.cache_dir)).expanduser() if settings.cache_dir else None
    _add_bundle(config, "ckpt_code_bundle", build_code_bundle(Path(root), cache), settings.bundle_store)
    if route == "bundle":
        # imported here: packaging is needed to build, never in a job
        from ckpt_tasks.htcondor.envbundle import build_env_bundle

        _add_bundle(config, "ckpt_env_bundle", build_env_bundle(cache), settings.bundle_store)
    cache = cache or default_cache_dir()
    if cache not in _pruned:
        _pruned.add(cache)
        prune(cache, settings.cache_retention)


def bring_back_outputs(config, workflow, branches, data_dir: str) -> None:
    """The job's ``ckpt_data/`` (its ``$CKPT_TASKS_DATA``) comes back into the submit side's
    ``data_dir`` on exit, merged into it: every local output of ``branches`` lands at its path.

    The directory, not the output files, is listed: it always exists, so a job that fails
    before writing its outputs is not held for a missing output file (hold code 12)."""
    local = 0
    for branch in branches:
        for target in law.util.flatten(workflow.as_branch(branch).output()):
            if not isinstance(target, law.LocalFileTarget):
                continue
            if os.path.commonpath([os.path.abspath(target.path), data_dir]) != data_dir:
                logger.warning("output %s lies outside $CKPT_TASKS_DATA (%s): it will not come back "
                               "from the job", target.path, data_dir)
                continue
            local += 1
    if not local:
        return
    os.makedirs(data_dir, exist_ok=True)
    # One transfer_output_files line: a list added before (the spool directory) joins ours.
    for entry in list(config.custom_content):
        if isinstance(entry, tuple) and entry[0] == "transfer_output_files":
            config.custom_content.remove(entry)
            config.output_files.update({n.strip(): n.strip() for n in str(entry[1]).split(",")})
    config.output_files[JOB_DATA_DIR] = data_dir
    # law would rename output files by the job's postfix (ckpt_data_0To1) on both sides; the
    # directory keeps its name, the job's logs get the postfix here, as law would give it.
    config.postfix_output_files = False
    for attr in ("log", "stdout", "stderr", "custom_log_file"):
        if config[attr] and config.postfix:
            config[attr] = BaseJobFileFactory.postfix_output_file(config[attr], config.postfix)


def configure_job(config, workflow, branches, *, route: str, root: str, container_image: str = "",
                  cache_dir: str | None = None, settings: Settings | None = None) -> None:
    """Fill law's job config for ``route``: render variables of job.sh, input files, output
    transfer and, for the container route, the universe and image. ``settings`` (law.cfg's
    software options) wins over ``cache_dir``."""
    if route not in ROUTES:
        raise ValueError(f"--software must be one of {', '.join(ROUTES)}, not {route!r}")
    settings = settings or Settings(cache_dir=cache_dir)
    data_dir = submit_data_dir(root)
    render = config.render_variables
    render["ckpt_software"] = route
    render["ckpt_job_data_dir"] = JOB_DATA_DIR
    render["ckpt_software_exit_code"] = str(SOFTWARE_EXIT_CODE)
    render["ckpt_bundle_store"] = settings.bundle_store if route != "shared" else ""
    render["ckpt_worker_cache"] = settings.worker_cache
    render["ckpt_worker_cache_keep"] = str(settings.worker_retention.keep)
    # find -mtime +N would mean N+1 days (whole days, rounded down): whole minutes instead
    render["ckpt_worker_cache_minutes"] = str(round(settings.worker_retention.days * 1440))
    render["ckpt_worker_cache_days"] = f"{settings.worker_retention.days:g}"
    if route == "shared":
        render["ckpt_tasks_root"] = root
        render["ckpt_tasks_data"] = data_dir
        return
    # No path of the submit side goes into the job script in these routes.
    render["ckpt_tasks_root"] = render["ckpt_tasks_data"] = ""
    if route == "container":
        if not container_image:
            raise ValueError("--software container needs --container-image (or container_image in law.cfg)")
        config.universe = "container"
        config.custom_content.append(("container_image", container_image))
    ship_bundles(config, root, route, settings)
    bring_back_outputs(config, workflow, branches, data_dir)
