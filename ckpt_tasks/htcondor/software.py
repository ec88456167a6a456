"""How a job gets its software: the ``--software`` route of the HTCondor workflow.

``shared``
    The worker sees the submit side's checkout and ``.venv`` at the same paths (a shared
    file system); the job script runs them there.
``bundle``
    The job gets the code bundle and the environment bundle (:mod:`.bundle`,
    :mod:`.envbundle`) through HTCondor's file transfer, checks their size and sha256,
    unpacks them in its sandbox and runs from there: nothing of the submit machine is used.
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
from pathlib import Path

import law
from law.job.base import BaseJobFileFactory

from ckpt_tasks.stop import EXIT_SOFTWARE_UNUSABLE

logger = logging.getLogger(__name__)

ROUTES = ("shared", "bundle", "container")
#: options of the workflow's law.cfg section that configure the software, not submit commands
SOFTWARE_OPTIONS = frozenset({"software", "container_image", "bundle_cache"})
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


def submit_data_dir(root: str) -> str:
    """The submit side's ``$CKPT_TASKS_DATA`` (default ``<root>/data``), absolute."""
    return os.path.abspath(os.path.expandvars(os.environ.get("CKPT_TASKS_DATA", os.path.join(root, "data"))))


def _add_bundle(config, key: str, bundle) -> None:
    # Not copied into law's job directory (it may be GB): transferred from the cache as it is.
    config.input_files[key] = law.JobInputFile(str(bundle.path), copy=False)
    config.render_variables[f"{key}_size"] = str(bundle.size)
    config.render_variables[f"{key}_sha256"] = bundle.sha256


def ship_bundles(config, root: str, route: str, cache_dir: str | None) -> None:
    """Build (or reuse) the bundles the route needs and add them as job input files; their
    names inside the sandbox, sizes and checksums become render variables of job.sh."""
    from ckpt_tasks.htcondor.bundle import build_code_bundle

    cache = Path(os.path.expandvars(cache_dir)).expanduser() if cache_dir else None
    _add_bundle(config, "ckpt_code_bundle", build_code_bundle(Path(root), cache))
    if route == "bundle":
        # imported here: packaging is needed to build, never in a job
        from ckpt_tasks.htcondor.envbundle import build_env_bundle

        _add_bundle(config, "ckpt_env_bundle", build_env_bundle(cache))


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
                  cache_dir: str | None = None) -> None:
    """Fill law's job config for ``route``: render variables of job.sh, input files, output
    transfer and, for the container route, the universe and image."""
    if route not in ROUTES:
        raise ValueError(f"--software must be one of {', '.join(ROUTES)}, not {route!r}")
    data_dir = submit_data_dir(root)
    render = config.render_variables
    render["ckpt_software"] = route
    render["ckpt_job_data_dir"] = JOB_DATA_DIR
    render["ckpt_software_exit_code"] = str(SOFTWARE_EXIT_CODE)
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
    ship_bundles(config, root, route, cache_dir)
    bring_back_outputs(config, workflow, branches, data_dir)
