"""The XRootD Python client, set up once; its statuses classified by the backend contract;
``pipelined``, which keeps several chunk transfers on the wire.

``classify_status`` turns a failed ``XRootDStatus`` into the contract's error
(``ckpt_tasks.storage.backend``). The server's refusals carry an XRootD error code
in ``status.errno`` (``status.code`` is then 400, errErrorResponse); the client's
own failures carry a client error code in ``status.code``. Codes measured against
Debian's xrootd 5.5.3 with the pip client 6.2.1 (tests/test_store_errors.py):

- a directory the server's user cannot write: 3010 kXR_NotAuthorized, "permission denied";
- an export marked ``r/o``: 3005 kXR_FSError, "file path marked read/only";
- a path below a file: 3005, "not a directory"; a path too long: 3002 kXR_ArgTooLong;
- a server that wants sss credentials the client lacks: code 204 errAuthFailed, at once;
- a ``roots://`` server whose certificate the client does not trust, or that does not name
  the host: code 110 errTlsError, fatal (tests/test_auth_tls.py);
- nothing listening: code 206 errOperationExpired after the call's timeout.
"""
from __future__ import annotations

import functools
import itertools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from ckpt_tasks.errors import (InvalidStoragePath, PermanentStorageError, StorageAuthenticationFailed,
                               StorageError, StorageFull, StorageNotFound, StoragePermissionDenied,
                               StorageReadOnly, StorageUnavailable)
from ckpt_tasks.storage.xrootd_fork import FORK_GATE

#: kXR_NotFound: the only answer that means "this path does not exist"
XRD_NOT_FOUND = 3011

# Server error codes (XProtocol.hh) that no retry can change. kXR_FSError is what the
# server answers when its file system refuses for a reason it has no code for.
_SERVER_ERRORS: dict[int, type[StorageError]] = {
    XRD_NOT_FOUND: StorageNotFound,
    3010: StoragePermissionDenied,  # kXR_NotAuthorized
    3030: StorageAuthenticationFailed,  # kXR_AuthFailed
    3009: StorageFull, 3021: StorageFull,  # kXR_NoSpace, kXR_overQuota
    3025: StorageReadOnly,  # kXR_fsReadOnly
    3000: InvalidStoragePath, 3001: InvalidStoragePath, 3002: InvalidStoragePath,  # kXR_Arg*
    3015: InvalidStoragePath, 3016: InvalidStoragePath,  # kXR_NotFile, kXR_isDirectory
    3005: PermanentStorageError,  # kXR_FSError
    3028: PermanentStorageError,  # kXR_TLSRequired: the URL must be roots://
}
# kXR_FSError says more in its message only.
_FS_ERROR_MESSAGES = (("read/only", StorageReadOnly), ("read-only", StorageReadOnly),
                      ("not a directory", InvalidStoragePath), ("permission denied", StoragePermissionDenied),
                      ("no space", StorageFull))
# Client error codes (XrdClStatus.hh) that no retry can change.
_CLIENT_ERRORS: dict[int, type[StorageError]] = {
    203: StorageAuthenticationFailed,  # errLoginFailed
    204: StorageAuthenticationFailed,  # errAuthFailed
    9: InvalidStoragePath,  # errInvalidArgs
}
# errTlsError: the client does not trust the server's certificate, or its host name is not in
# it. Permanent when the client calls it fatal; a TLS connection cut short is not.
_TLS_ERROR = 110
_ERROR_RESPONSE = 400  # errErrorResponse: the server answered with an error code

#: uploads and checked downloads move chunks of this size, this many at a time (as xrdcp does)
CHUNK = 8 << 20
IN_FLIGHT = 4

# The client's defaults wait minutes before giving up on a dead server
# (ConnectionWindow 120 s x ConnectionRetry 5). A training that cannot reach its
# storage should learn it in seconds; users may still override with XRD_* variables.
_CLIENT_DEFAULTS = {
    "ConnectionWindow": ("XRD_CONNECTIONWINDOW", 10),
    "ConnectionRetry": ("XRD_CONNECTIONRETRY", 2),
    "RequestTimeout": ("XRD_REQUESTTIMEOUT", 60),
    # After a failure the client refuses a server for this long; short, so a
    # restarted server is usable again within seconds.
    "StreamErrorWindow": ("XRD_STREAMERRORWINDOW", 3),
    "TimeoutResolution": ("XRD_TIMEOUTRESOLUTION", 1),
}


_IMPORTING = threading.Lock()


def client():
    """Import the XRootD client lazily and apply bounded-time defaults once."""
    if getattr(client, "configured", False):
        from XRootD import client as xrootd_client

        return xrootd_client
    # One thread imports: the store sends requests from several threads at once, and two
    # threads importing XRootD.client.flags for the first time together deadlocked the
    # import system (_DeadlockError, seen in the SIGKILL stress).
    with _IMPORTING:
        from XRootD import client as xrootd_client
        import XRootD.client.flags  # noqa: F401 (imported here, once, for the methods that use it)

        if not getattr(client, "configured", False):
            for key, (env_var, value) in _CLIENT_DEFAULTS.items():
                if env_var not in os.environ:
                    xrootd_client.EnvPutInt(key, value)
            client.configured = True
    return xrootd_client


def gated(method):
    """Run ``method`` as one XRootD operation that a ``fork()`` waits for (see xrootd_fork)."""
    @functools.wraps(method)
    def run_gated(*args, **kwargs):
        with FORK_GATE.operation():
            return method(*args, **kwargs)
    return run_gated


def error_class(code: int, errno: int, message: str, fatal: bool = False) -> type[StorageError]:
    """The contract's error class of a failed status (``code``, ``errno``, ``message``, ``fatal``)."""
    if code == _TLS_ERROR and fatal:
        return StorageAuthenticationFailed
    if code == _ERROR_RESPONSE:
        cls = _SERVER_ERRORS.get(errno, StorageUnavailable)
        if cls is PermanentStorageError:
            lowered = message.lower()
            cls = next((c for text, c in _FS_ERROR_MESSAGES if text in lowered), cls)
        return cls
    return _CLIENT_ERRORS.get(code, StorageUnavailable)


def classify_status(status, what: str, url) -> StorageError:
    """The contract's error for the failed XRootD ``status`` of ``what`` on ``url``."""
    message = status.message.strip()
    cls = error_class(status.code, status.errno, message, bool(getattr(status, "fatal", False)))
    return cls(f"XRootD {what} failed for {url}: {message}", str(url))


def pipelined(transfer: Callable[[int], bytes], size: int, name: str) -> Iterator[bytes]:
    """``transfer(offset)`` for each ``CHUNK`` of ``size`` bytes, ``IN_FLIGHT`` at a
    time on worker threads (the client releases the GIL); the chunks come back in order."""
    offsets = iter(range(0, size, CHUNK))
    with ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix=name) as pool:
        pending = deque(pool.submit(transfer, offset) for offset in itertools.islice(offsets, IN_FLIGHT))
        try:
            while pending:
                data = pending.popleft().result()
                following = next(offsets, None)
                if following is not None:
                    pending.append(pool.submit(transfer, following))
                yield data
        finally:
            for future in pending:
                future.cancel()
