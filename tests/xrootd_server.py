"""A real XRootD server (Debian's ``xrootd-server``) on a free loopback port, for tests.

``xrootd`` refuses to run as root, so as root it runs as the ``xrootd`` user that
the Debian package creates, in a directory that user owns. It changes user through
``setpriv`` rather than ``subprocess``'s ``user=``: with ``user=`` Python forks
instead of vforking, which runs the XRootD client's fork handler in the test
process (see ``ckpt_tasks/storage/xrootd_fork.py``).
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class ServerUnavailable(RuntimeError):
    pass


class _CrashedAtStart(Exception):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class XRootDServer:
    """One xrootd process; ``url`` is ``root://127.0.0.1:PORT``, files live under ``data_dir``."""

    def __init__(self, port: int | None = None, directory: str | os.PathLike | None = None,
                 environment: dict[str, str] | None = None):
        """``directory``: where its files go (default: the system's temporary directory);
        ``environment``: variables added to the server process's environment."""
        self.environment = dict(environment or {})
        if shutil.which("xrootd") is None:
            raise ServerUnavailable("the xrootd binary is not installed (apt-get install xrootd-server)")
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ckpt-xrootd-", dir=directory))
        self.data_dir = self.root / "data"
        self.run_dir = self.root / "run"
        self.log = self.root / "xrootd.log"
        self.user = "xrootd" if os.geteuid() == 0 else None
        self.process: subprocess.Popen | None = None
        for directory in (self.data_dir, self.run_dir):
            directory.mkdir()
        self.root.chmod(0o755)
        if self.user:
            ids = pwd.getpwnam(self.user)
            for path in (self.root, self.data_dir, self.run_dir):
                os.chown(path, ids.pw_uid, ids.pw_gid)
        self.config = self.root / "xrootd.cfg"
        self.config.write_text(
            "all.export /\n"
            f"oss.localroot {self.data_dir}\n"
            f"xrd.port {self.port}\n"
            f"all.adminpath {self.run_dir}\n"
            f"all.pidpath {self.run_dir}\n"
            "xrootd.chksum adler32\n"
        )

    @property
    def url(self) -> str:
        return f"root://127.0.0.1:{self.port}"

    #: Debian's xrootd 5.5.3 dies of SIGSEGV before writing its log in about 2 % of its
    #: starts on this machine (3 of 150); the suite starts dozens, so a crash is retried.
    CRASHED_STARTS_RETRIED = 3

    def start(self, timeout: float = 20.0) -> "XRootDServer":
        for attempt in range(1, self.CRASHED_STARTS_RETRIED + 1):
            try:
                return self._start_once(timeout)
            except _CrashedAtStart as crash:
                if attempt == self.CRASHED_STARTS_RETRIED:
                    raise ServerUnavailable(f"{crash} in {attempt} starts in a row") from None
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> "XRootDServer":
        command = ["xrootd", "-c", str(self.config), "-l", str(self.log), "-n", f"ckpt{self.port}"]
        if self.user:
            command = ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups", *command]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        start_new_session=True, env={**os.environ, **self.environment})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                message = f"xrootd exited with {self.process.returncode}: {self.log_tail()}"
                if self.process.returncode < 0:  # killed by a signal: a crash, not a refusal
                    raise _CrashedAtStart(message)
                raise ServerUnavailable(message)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise ServerUnavailable(f"xrootd did not listen on port {self.port} within {timeout} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
