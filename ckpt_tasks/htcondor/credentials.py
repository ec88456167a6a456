"""The credentials of an HTCondor workflow's jobs: how they travel, and the check before submitting.

Three routes (``--credentials``, default ``[ckpt_tasks_htcondor] credentials`` in law.cfg):

``proxy`` (the default)
    The submitter's X.509 proxy, found where the XRootD client finds it, goes with every job
    (``x509userproxy``); HTCondor refreshes the job's copy when the file on the access point
    is renewed (within ``SHADOW_CHECKPROXY_INTERVAL``), and a job released from a hold
    starts with the renewed file. Where HTCondor's delegation of the proxy fails (its 23.x
    starters on OpenSSL 3.5), the access point needs ``DELEGATE_JOB_GSI_CREDENTIALS = False``
    (a copy instead).
``token``
    ``use_oauth_services = <service>`` (``--oauth-service``, default ``scitokens``): HTCondor's
    credmon keeps ``$_CONDOR_CREDS/<service>.use`` fresh in the job, and the job script points
    ``BEARER_TOKEN_FILE`` at it, since the XRootD client does not look there by itself. This
    needs a credmon on the access point; no ``x509userproxy`` is sent.
``shared``
    The workers see the submitter's credential files at the same paths (a shared file
    system, as on a cluster whose home directories every node mounts): the jobs get
    ``X509_USER_PROXY`` and ``BEARER_TOKEN_FILE`` naming the files found on the submit side,
    and read a renewed file at their next connection. A token given in ``$BEARER_TOKEN``
    itself is never written into a submit file.

Before a workflow submits anything, :func:`preflight_before_submit` runs the preflight of
:mod:`ckpt_tasks.preflight` on the submit side against the store of the first branch: a
missing, expired or too short credential, or a store that refuses a write, rename or delete,
refuses the submission with the named reason, so no job starts only to be held. A
credential that ends before the expected end of the jobs (``--expected-runtime``, else the
site's run-time limit among the workflow's submit commands) gives a warning.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import law

from ckpt_tasks.jobenv.credentials import CredentialError, find_proxy, find_token
from ckpt_tasks.preflight import MIN_LIFETIME_VARIABLE, PreflightReport, PreflightRefused, preflight

logger = logging.getLogger(__name__)

ROUTES = ("proxy", "token", "shared")
#: options of the workflow's law.cfg section that configure credentials, not submit commands
CREDENTIAL_OPTIONS = frozenset({"credentials", "oauth_service", "credential_min_lifetime", "expected_runtime"})
#: submit commands whose value is a run-time limit in seconds; the earliest is the jobs' expected end
RUNTIME_COMMANDS = ("+maxruntime", "+requestruntime", "+requestwalltime", "allowed_job_duration",
                    "allowed_execute_duration")


def submitter_proxy(environ: Mapping[str, str] | None = None) -> str | None:
    """The X.509 proxy file on the submit side, where the XRootD client would find it; None without."""
    try:
        proxy = find_proxy(environ)
    except CredentialError as error:
        logger.warning("no x509userproxy for the jobs: %s", error)
        return None
    # absolute: HTCondor reads a relative path from the job's initialdir, not from here; no
    # symlink resolved: a renewal that re-points the link must still reach the jobs
    return os.path.abspath(proxy.path) if proxy is not None else None


def submit_commands(route: str, service: str, environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """The submit commands of ``route``: ``x509userproxy`` (when a proxy is found), ``use_oauth_services``,
    or an ``environment`` naming the submitter's files (``shared``)."""
    if route == "token":
        return [("use_oauth_services", service)]
    if route == "shared":
        return _shared_files(environ)
    proxy = submitter_proxy(environ)
    return [("x509userproxy", proxy)] if proxy is not None else []


def _shared_files(environ: Mapping[str, str] | None) -> list[tuple[str, str]]:
    """``environment`` naming the submit side's credential files (law merges it with its own)."""
    variables = []
    for name, find in (("X509_USER_PROXY", find_proxy), ("BEARER_TOKEN_FILE", find_token)):
        try:
            found = find(environ)
        except CredentialError as error:
            logger.warning("no %s for the jobs: %s", name, error)
            continue
        if found is not None and found.path is None:
            found = _token_file_besides_variable(environ)
        if found is None:
            continue
        path = os.path.abspath(found.path)  # a link that renewals re-point stays the link
        if any(c.isspace() or c in "\"'" for c in path):
            raise ValueError(f"--credentials shared: the path {path!r} cannot go into a submit file's environment")
        variables.append(f"{name}={path}")
    return [("environment", f'"{" ".join(variables)}"')] if variables else []


def _token_file_besides_variable(environ: Mapping[str, str] | None):
    """The token file the jobs can read when ``$BEARER_TOKEN`` holds a token itself, which never
    goes into a submit file; None (with a warning) when there is none."""
    environ = dict(os.environ if environ is None else environ)
    environ.pop("BEARER_TOKEN", None)
    try:
        found = find_token(environ)
    except CredentialError:
        found = None
    if found is None or found.path is None:
        logger.warning("--credentials shared: the jobs get no token: $BEARER_TOKEN holds the token itself, "
                       "which never goes into a submit file; give them a file ($BEARER_TOKEN_FILE)")
        return None
    return found


def render_variables(route: str, service: str, min_lifetime: float | None) -> dict[str, str]:
    """What job.sh gets rendered in: the token file's service name (empty on the proxy route)
    and the least lifetime the job's own preflight asks of a credential (empty: its default)."""
    return {"ckpt_token_service": service if route == "token" else "",
            "ckpt_credential_min_lifetime": "" if min_lifetime is None else _exact_seconds(min_lifetime),
            "ckpt_min_lifetime_variable": MIN_LIFETIME_VARIABLE}


def _exact_seconds(value: float) -> str:
    """``value`` for the job's environment, without rounding (``:g`` would cut 1234565 to 1.23456e+06)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def expected_runtime(explicit: float, section: str) -> float | None:
    """``explicit`` seconds when above 0, else the earliest run-time limit among the submit
    commands in law.cfg's ``section`` (``+MaxRuntime``, ``+RequestWalltime``, ...); None: unknown."""
    if explicit > 0:
        return explicit
    cfg = law.config.Config.instance()
    if not cfg.has_section(section):
        return None
    limits = []
    for option in cfg.options(section):
        if option.lower() in RUNTIME_COMMANDS:
            try:
                limits.append(float(cfg.get_expanded(section, option)))
            except ValueError:  # an expression, not a number: the jobs' end cannot be told here
                continue
    return min(limits) if limits else None


def preflight_before_submit(task, section: str) -> PreflightReport | None:
    """Run the preflight for the workflow ``task`` (its law.cfg section ``section``) before it
    submits; None where there is
    nothing to check (cancelling or cleaning up, jobs submitted already and polled again,
    spool mode, no store). Raises :class:`PreflightRefused` (logged with what to do)."""
    if getattr(task, "cancel_jobs", False) or getattr(task, "cleanup_jobs", False):
        return None
    if getattr(task, "checkpoint_mode", "store") != "store" or not hasattr(task, "checkpoint_location"):
        return None
    outputs = task.output()
    jobs = outputs.get("jobs") if isinstance(outputs, dict) else None
    if jobs is not None and jobs.exists() and not getattr(task, "ignore_submission", False):
        return None  # polling jobs submitted before: they carry their credentials already
    branches = sorted(task.branch_map)
    if not branches or not str(getattr(task, "store", "") or ""):
        return None
    location = task.as_branch(branches[0]).checkpoint_location()
    min_lifetime = task.credential_min_lifetime if task.credential_min_lifetime > 0 else None
    expected = expected_runtime(task.expected_runtime, section)
    require = ("token",) if task.credentials == "token" else ()
    try:
        report = preflight(location, min_lifetime=min_lifetime, expected_duration=expected, require=require,
                           deadline=getattr(task, "storage_timeout", 30.0), environ=os.environ)
    except PreflightRefused as refused:
        logger.error("not submitting any job: %s. Renew the proxy (voms-proxy-init, xrdgsiproxy) or token "
                     "(htgettoken, oidc-token) here, or fix the store's permissions, then run the workflow "
                     "again", refused)
        raise
    logger.info("preflight before submitting: %s takes commits%s", location,
                f" ({len(report.warnings)} warning(s) above)" if report.warnings else "")
    return report
