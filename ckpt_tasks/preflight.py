"""Preflight: before a training starts or a workflow submits, check that checkpoints can be
committed for as long as the training runs.

Two checks, each refusing with a named reason (:class:`PreflightRefused`):

- the credentials (:mod:`ckpt_tasks.jobenv.credentials`): a required one that is
  ``missing``; one that is ``expired``, or ``too short`` (less than ``min_lifetime`` left);
  a warning when one ends before the training's expected end;
- the store: a small file is written under a temporary name, renamed to a new name,
  replaced by a second one through a rename (as ``LATEST`` moves), and deleted: exactly what
  a commit and retention do. A refusal names the step (``storage``), so a token that may
  create files but not rename or delete them is caught here, not hours later.

What is logged names credentials by kind, file and expiry only, never their content.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_tasks.errors import CkptTasksError, StorageAuthenticationFailed, StorageError
from ckpt_tasks.jobenv.credentials import (BEARER_TOKEN, X509_PROXY, Credential, CredentialError,
                                           condor_token_files, find_proxy, find_token)

logger = logging.getLogger(__name__)

#: the reasons a preflight refuses, as :attr:`PreflightRefused.reason` names them
MISSING, EXPIRED, TOO_SHORT, STORAGE = "missing", "expired", "too short", "storage"
#: what ``require`` may name
KINDS = {"x509": X509_PROXY, "proxy": X509_PROXY, X509_PROXY: X509_PROXY,
         "token": BEARER_TOKEN, BEARER_TOKEN: BEARER_TOKEN}
#: the least lifetime left by default: a proxy lives hours to days, a WLCG token only
#: minutes to an hour by design and is renewed by its agent (HTCondor's credmon, oidc-agent)
DEFAULT_MIN_LIFETIME = {X509_PROXY: dt.timedelta(hours=1), BEARER_TOKEN: dt.timedelta(minutes=5)}
#: the environment variable that sets the least lifetime (seconds) where no caller names one:
#: the HTCondor workflow sets it in its jobs from ``--credential-min-lifetime``
MIN_LIFETIME_VARIABLE = "CKPT_TASKS_CREDENTIAL_MIN_LIFETIME"
_WHERE = {X509_PROXY: "X509_USER_PROXY, /tmp/x509up_u<uid>",
          BEARER_TOKEN: "BEARER_TOKEN, BEARER_TOKEN_FILE, $XDG_RUNTIME_DIR/bt_u<uid>, /tmp/bt_u<uid>"}


class PreflightRefused(CkptTasksError):
    """The training would not be able to commit checkpoints; ``reason`` is one of
    ``missing``, ``expired``, ``too short`` or ``storage``."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"preflight refused ({reason}): {message}")


@dataclass(frozen=True)
class PreflightReport:
    """What a passed preflight found."""

    location: str
    credentials: tuple[Credential, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    #: how long the store probe took (None: not probed)
    probe_seconds: float | None = None


def _seconds(value: dt.timedelta | float | int) -> float:
    return value.total_seconds() if isinstance(value, dt.timedelta) else float(value)


def check_credentials(credentials: Iterable[Credential], min_lifetime: dt.timedelta | float | None = None,
                      expected_duration: dt.timedelta | float | None = None, require: Iterable[str] = (),
                      now: dt.datetime | None = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """Refuse when a ``require``-d kind is missing, or when any credential is expired or has
    less than ``min_lifetime`` left (None: :data:`DEFAULT_MIN_LIFETIME` of its kind); return
    warnings (ends before ``expected_duration``, expiry unknown). Every credential found is
    checked: a stale proxy next to a good token is refused too, naming the file, since the
    client may well pick it. ``environ`` is where HTCondor's token files are looked for."""
    now = now or dt.datetime.now(dt.timezone.utc)
    credentials = list(credentials)
    for name in require:
        kind = KINDS.get(name)
        if kind is None:
            raise ValueError(f"require={name!r}: expected one of {sorted(KINDS)}")
        if not any(credential.kind == kind for credential in credentials):
            raise PreflightRefused(MISSING, f"no {kind} found (looked at {_WHERE[kind]})"
                                            f"{_condor_hint(kind, environ)}")
    warnings = []
    for credential in credentials:
        minimum = _seconds(DEFAULT_MIN_LIFETIME[credential.kind] if min_lifetime is None else min_lifetime)
        remaining = credential.remaining(now)
        if remaining is None:
            warnings.append(f"{credential.describe(now)}: its lifetime cannot be checked")
        elif remaining.total_seconds() <= 0:
            raise PreflightRefused(EXPIRED, f"{credential.describe(now)}; renew it")
        elif remaining.total_seconds() < minimum:
            raise PreflightRefused(TOO_SHORT, f"{credential.describe(now)}, less than the minimum of "
                                              f"{dt.timedelta(seconds=round(minimum))}; renew it")
        elif expected_duration is not None and remaining.total_seconds() < _seconds(expected_duration):
            warnings.append(f"{credential.describe(now)}: it ends before the training's expected end "
                            f"(in {dt.timedelta(seconds=round(_seconds(expected_duration)))}); renew it during "
                            "the run, or checkpoints will be refused once it has expired")
    for warning in warnings:
        logger.warning("preflight: %s", warning)
    return warnings


def probe_store(location: str | os.PathLike, deadline: float = 30.0) -> float:
    """Write, rename, replace by rename, and delete a small file at ``location``; return the
    seconds it took. Raises :class:`PreflightRefused` (``storage``) naming the step that failed,
    with the storage error as its cause."""
    from ckpt_tasks.storage import open_location
    from ckpt_tasks.storage.retry import RetryPolicy

    opened = open_location(location, deadline=deadline)
    backend, retry = opened.backend, RetryPolicy(deadline=deadline, initial_delay=0.5)
    stem = f".preflight-{uuid.uuid4().hex[:12]}"
    final, first, second = (opened.path(stem + suffix) for suffix in ("", ".tmp1", ".tmp2"))
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ckpt-preflight-") as work:
        probe = Path(work) / "probe"
        probe.write_bytes(b"ckpt_tasks preflight probe\n")
        steps = [("create the directory", lambda: backend.mkdir_rec(opened.root)),
                 ("write a file", lambda: backend.upload(probe, first)),
                 ("rename it to a new name", lambda: backend.rename(first, final)),
                 ("write a second file", lambda: backend.upload(probe, second)),
                 ("rename it over the first (as LATEST moves)", lambda: backend.rename(second, final)),
                 ("delete it", lambda: backend.remove(final, silent=False))]
        try:
            for what, step in steps:
                try:
                    retry.run(step, f"preflight: {what} at {opened.root}")
                except StorageError as error:
                    raise PreflightRefused(STORAGE, f"cannot {what} at {opened.root}: {error}"
                                                    f"{_hint(error)}") from error
        finally:
            for leftover in (first, second, final):
                try:
                    backend.remove(leftover, silent=True)
                except StorageError:  # the refusal above says more than a failed clean-up
                    pass
    return time.monotonic() - start


def _hint(error: StorageError) -> str:
    # The client's words for an untrusted CA are "TLS error: resource temporarily unavailable".
    if "TLS" in str(error):
        return (" (a TLS failure: X509_CERT_DIR must hold the CA of the server's certificate, "
                "and the host name must be one the certificate names)")
    if isinstance(error, StorageAuthenticationFailed):
        return " (the storage did not accept the credentials: check the proxy or token found)"
    return ""


def _probe_naming_missing(location: str | os.PathLike, deadline: float, credentials: list[Credential],
                          environ: Mapping[str, str] | None) -> float:
    """:func:`probe_store`; a storage that refuses to authenticate a process holding no
    credential at all is a ``missing`` credential, and said so."""
    try:
        return probe_store(location, deadline)
    except PreflightRefused as refused:
        cause = refused.__cause__
        if credentials or not isinstance(cause, StorageAuthenticationFailed) or "TLS" in str(cause):
            raise
        looked = f"{_WHERE[X509_PROXY]}; {_WHERE[BEARER_TOKEN]}"
        raise PreflightRefused(MISSING, f"{location} wants credentials and none was found (looked at {looked})"
                                        f"{_condor_hint(BEARER_TOKEN, environ)}: {cause}") from cause


def _condor_hint(kind: str, environ: Mapping[str, str] | None) -> str:
    """HTCondor's tokens are where the XRootD client does not look: say which to name."""
    files = condor_token_files(environ) if kind == BEARER_TOKEN else []
    if not files:
        return ""
    return f"; HTCondor gave this job {', '.join(map(str, files))}: set BEARER_TOKEN_FILE to one of them"


def configured_min_lifetime(environ: Mapping[str, str] | None = None) -> float | None:
    """The seconds in :data:`MIN_LIFETIME_VARIABLE`; None when it is unset or empty."""
    value = (os.environ if environ is None else environ).get(MIN_LIFETIME_VARIABLE, "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{MIN_LIFETIME_VARIABLE}={value!r}: expected seconds") from None
    if seconds < 0:
        raise ValueError(f"{MIN_LIFETIME_VARIABLE}={value!r}: expected seconds >= 0")
    return seconds


def preflight(location: str | os.PathLike, min_lifetime: dt.timedelta | float | None = None,
              expected_duration: dt.timedelta | float | None = None, require: Iterable[str] = (),
              probe: bool = True, deadline: float = 30.0,
              environ: Mapping[str, str] | None = None) -> PreflightReport:
    """Check the credentials and probe the store at ``location``; refuse with
    :class:`PreflightRefused` or return a :class:`PreflightReport`.

    Args:
        location: the store location (a path, ``root://`` or ``roots://``).
        min_lifetime: the least lifetime a credential must have left (timedelta or seconds;
            None: :data:`MIN_LIFETIME_VARIABLE` when set, else :data:`DEFAULT_MIN_LIFETIME`,
            one hour for a proxy, five minutes for a token).
        expected_duration: how long the training is expected to run; a credential ending
            earlier gives a warning.
        require: credential kinds that must be found (``"x509"``, ``"token"``); credentials are
            checked for remote locations, or for any location when ``require`` names one.
        probe: also write, rename and delete a small file at ``location``.
        deadline: how long the probe retries an outage, in seconds.
        environ: the environment to find credentials in (default ``os.environ``).
    """
    require = tuple(require)
    if min_lifetime is None:
        min_lifetime = configured_min_lifetime(environ)
    remote = "://" in os.fspath(location) and not os.fspath(location).startswith("file://")
    credentials: list[Credential] = []
    if remote or require:
        for find in (find_proxy, find_token):
            try:
                found = find(environ)
            except CredentialError as error:
                raise PreflightRefused(MISSING, str(error)) from None
            if found is not None:
                credentials.append(found)
                logger.info("preflight: found %s", found.describe())
        if not credentials and not require:
            logger.info("preflight: no proxy or token found for %s; fine if the storage is anonymous", location)
    warnings = check_credentials(credentials, min_lifetime, expected_duration, require, environ=environ)
    seconds = None
    if probe:
        seconds = _probe_naming_missing(location, deadline, credentials, environ)
        logger.info("preflight: %s takes commits (write, rename, replace, delete in %.2f s)", location, seconds)
    return PreflightReport(os.fspath(location), tuple(credentials), tuple(warnings), seconds)
