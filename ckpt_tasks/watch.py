"""``ckpt-tasks watch``: checkpoint any program's state file, whatever language it is written in.

    ckpt-tasks watch --file state.dat --target root://host:1094//store/me/run1 -- ./simulate --steps 1000

1. Restores the newest checkpoint of ``--target`` to ``--file`` before starting
   (when there is one; a storage that does not answer is an error, never "no
   checkpoint").
2. Runs the command in its own process group and watches the file every
   ``--interval`` seconds. Each new *complete* version is committed through
   ``CheckpointStore.save`` (the one commit path, with its retention):

   - a version that was **renamed into place** (the inode at the path changed,
     as with write-temp-then-``mv``) is complete when its size, mtime and ctime
     stay the same over a short settle time and while it is copied;
   - a version **written in place** (same inode) is complete when it stopped
     changing for ``--stable-polls`` polls, and again did not change while it
     was copied.

   The watcher copies the version to a private snapshot first (holding the
   file open, so a rename that replaces it cannot swap the bytes under the
   copy) and uploads the snapshot from a background thread. A slow upload
   never delays a signal, and a newer version only replaces the one waiting
   for upload, never the one being uploaded.
3. Relays SIGTERM and SIGINT to the command (a signal before the command
   started is relayed as soon as it has). The watcher's handler only records
   the signal and forwards it; commits run on, untorn.
4. After the command ended, commits the last version (unless the command was
   killed by a signal and the file was rewritten in place, not renamed: that
   version may be half-written and is not committed),
   waits for the upload, and exits with the command's exit code (128+N when a
   signal N killed it), or ``--exit-code`` (85) when the watcher got SIGTERM
   or SIGINT. When the last version cannot be committed it exits with 1.

Checkpoint steps are version numbers: each commit gets the highest committed
step plus one, so they keep counting across restarts.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ckpt_tasks.lineage import lineage, trail
from ckpt_tasks.policy import SaveReason
from ckpt_tasks.stop import CHECKPOINT_EXIT_CODE
from ckpt_tasks.storage.store import Checkpoint, CheckpointStore, RetryPolicy

logger = logging.getLogger(__name__)

RELAYED = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Signature:
    """What identifies one version of a file: a changed byte changes size, mtime or ctime."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Signature":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @property
    def content(self) -> tuple[int, int, int, int]:
        # What a write changes. Not ctime: a rename over the path changes the replaced
        # file's link count, and so its ctime, but not its bytes.
        return self.dev, self.ino, self.size, self.mtime_ns

    def same_file(self, other: "Signature | None") -> bool:
        return other is not None and (self.dev, self.ino) == (other.dev, other.ino)


def _stat(path: Path) -> Signature | None:
    try:
        return Signature.of(os.stat(path))
    except FileNotFoundError:
        return None


class _Committer(threading.Thread):
    """Uploads snapshots one at a time; a newer snapshot replaces the one still waiting."""

    def __init__(self, watcher: "Watcher"):
        super().__init__(name="ckpt-watch-commit", daemon=True)
        self.watcher = watcher
        self.cond = threading.Condition()
        self.pending: tuple[Path, Signature, str] | None = None
        self.busy = False
        self.stopping = False
        self.last_error: BaseException | None = None
        self.last_ok = True  # did the most recent commit succeed

    def submit(self, snapshot: Path, sig: Signature, reason: SaveReason) -> None:
        with self.cond:
            if self.pending is not None:
                self.pending[0].unlink(missing_ok=True)  # superseded before it was uploaded
            self.pending = (snapshot, sig, reason)
            self.cond.notify_all()

    def run(self) -> None:
        while True:
            with self.cond:
                while self.pending is None and not self.stopping:
                    self.cond.wait()
                if self.pending is None:
                    return
                job, self.pending, self.busy = self.pending, None, True
            snapshot, sig, reason = job
            try:
                self.watcher._commit(snapshot, sig, reason)
                self.last_ok, self.last_error = True, None
            except BaseException as error:  # noqa: BLE001 (logged; the watcher decides the exit code)
                self.last_ok, self.last_error = False, error
                logger.error("could not commit %s: %s", self.watcher.file, error)
                if self.watcher.committed == sig:  # not stored: let the next poll try this version again
                    self.watcher.committed = self.watcher.stored
            finally:
                snapshot.unlink(missing_ok=True)
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def drain(self) -> None:
        """Wait until nothing is waiting or uploading."""
        with self.cond:
            while self.pending is not None or self.busy:
                self.cond.wait()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.join()


class Watcher:
    """Run ``command`` and commit every complete version of ``file`` to ``store``."""

    def __init__(self, file: str | os.PathLike, store: CheckpointStore, command: list[str],
                 interval: float = 5.0, exit_code: int = CHECKPOINT_EXIT_CODE, stable_polls: int = 3,
                 settle: float | None = None, restore: bool = True):
        if not command:
            raise ValueError("no command to run (give it after --)")
        if interval <= 0:
            raise ValueError(f"--interval must be > 0, got {interval}")
        if stable_polls < 2:
            raise ValueError(f"--stable-polls must be >= 2, got {stable_polls}")
        self.file = Path(file).absolute()
        self.store = store
        self.command = list(command)
        self.interval = interval
        self.exit_code = exit_code
        self.stable_polls = stable_polls
        self.settle = min(1.0, interval / 2) if settle is None else settle
        self.restore_first = restore
        self.child: subprocess.Popen | None = None
        self.signals: list[int] = []
        self._pending_signal: int | None = None
        self.next_step = 0
        self.previous: Checkpoint | None = None  # the newest committed checkpoint we know of
        self.committed: Signature | None = None  # the version committed or waiting for upload
        self.stored: Signature | None = None  # the version last stored (or restored)
        self.commits = 0
        self._candidate: Signature | None = None
        self._candidate_polls = 0
        self._tmp = Path(tempfile.mkdtemp(prefix="ckpt-watch-"))
        self._committer = _Committer(self)

    # -- signals -------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        # Only record and forward: never raise here (a commit may be running).
        self.signals.append(signum)
        child = self.child
        if child is None:
            self._pending_signal = signum
            return
        try:
            child.send_signal(signum)  # a no-op once the child has been reaped
        except OSError:
            pass

    # -- restore -------------------------------------------------------------------------

    def restore(self) -> Checkpoint | None:
        checkpoints = self.store.list()
        if not checkpoints:
            logger.info("no checkpoint at %s yet; starting fresh", self.store.location)
            return None
        self.next_step = checkpoints[-1].step + 1
        restored = self.store.restore(self.file)
        self.previous = checkpoints[-1]
        if restored is not None:
            logger.info("restored version %d (%s) to %s", restored.step, restored.name, self.file)
            self.committed = self.stored = _stat(self.file)
        return restored

    # -- snapshots -----------------------------------------------------------------------

    def _snapshot(self, expected: Signature, settle: float) -> Path | None:
        """Copy the version ``expected`` to a private file if it does not change meanwhile."""
        try:
            fd = os.open(self.file, os.O_RDONLY)
        except FileNotFoundError:
            return None
        snapshot = None
        try:
            before = Signature.of(os.fstat(fd))
            if before != expected:
                return None
            if settle > 0:
                time.sleep(settle)
                if Signature.of(os.fstat(fd)).content != before.content:
                    return None
            handle, name = tempfile.mkstemp(dir=self._tmp, prefix="version-")
            snapshot = Path(name)
            with os.fdopen(handle, "wb") as out:
                os.lseek(fd, 0, os.SEEK_SET)
                while chunk := os.read(fd, 8 << 20):
                    out.write(chunk)
            after = Signature.of(os.fstat(fd))
            if after.content != before.content or snapshot.stat().st_size != before.size:
                snapshot.unlink(missing_ok=True)
                return None
            return snapshot
        except BaseException:
            if snapshot is not None:
                snapshot.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    def poll(self) -> bool:
        """Look at the file once; queue a complete new version for upload. True when queued."""
        sig = _stat(self.file)
        if sig is None or sig == self.committed:
            self._candidate, self._candidate_polls = None, 0
            return False
        if sig == self._candidate:
            self._candidate_polls += 1
        else:
            self._candidate, self._candidate_polls = sig, 1
        renamed = not sig.same_file(self.committed)
        if not renamed and self._candidate_polls < self.stable_polls:
            return False  # written in place: wait until it stopped changing
        snapshot = self._snapshot(sig, self.settle if renamed else 0.0)
        if snapshot is None:
            return False  # still changing; look again at the next poll
        self._queue(snapshot, sig, SaveReason.NEW_VERSION)
        return True

    def _queue(self, snapshot: Path, sig: Signature, reason: SaveReason) -> None:
        self.committed = sig
        self._candidate, self._candidate_polls = None, 0
        self._committer.submit(snapshot, sig, reason)

    def _commit(self, snapshot: Path, sig: Signature, reason: SaveReason) -> None:
        # Runs in the committer thread, one commit at a time.
        step = self.next_step
        metadata = {
            "watch": {"file": self.file.name, "command": self.command, "reason": str(reason),
                      "size": sig.size, "mtime_ns": sig.mtime_ns},
            "reason": str(reason),
            "lineage": lineage(step=step),
            "lineage_trail": trail(self.previous),
        }
        checkpoint = self.store.save(snapshot, step, metadata)
        self.previous = checkpoint
        self.stored = sig
        self.next_step = step + 1
        self.commits += 1
        logger.info("committed version %d of %s (%d bytes, %s)", step, self.file.name, checkpoint.size, reason)

    def _final_version(self) -> None:
        """After the command ended: queue the last version if it is new and trustworthy."""
        sig = _stat(self.file)
        if sig is None or sig == self.committed:
            return
        returncode = self.child.returncode if self.child else None
        # Killed by a signal (ours relayed included, when it has no handler): a file it rewrote
        # in place may be half-written. One renamed into place is complete.
        killed = returncode is not None and returncode < 0
        if killed and sig.same_file(self.committed):
            logger.warning("not committing the last version of %s: it changed in place and the command "
                           "was killed by signal %d, so it may be half-written", self.file, -returncode)
            return
        snapshot = self._snapshot(sig, 0.0)
        if snapshot is None:
            logger.warning("the last version of %s kept changing after the command ended; "
                           "not committing it", self.file)
            return
        self._queue(snapshot, sig, SaveReason.SIGNAL if self.signals else SaveReason.FINAL)

    # -- running -------------------------------------------------------------------------

    def _spawn(self) -> subprocess.Popen:
        kwargs = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        # Own process group: a Ctrl-C in a terminal reaches the command once, relayed by us.
        return subprocess.Popen(self.command, **kwargs)

    def run(self) -> int:
        previous_handlers = {s: signal.signal(s, self._on_signal) for s in RELAYED}
        try:
            if self.restore_first:
                self.restore()
            try:
                self.child = self._spawn()
            except OSError as error:
                logger.error("cannot start %s: %s", self.command[0], error.strerror or error)
                return 127 if isinstance(error, FileNotFoundError) else 126
            logger.info("started PID %d: %s", self.child.pid, " ".join(self.command))
            if self._pending_signal is not None:
                self._on_signal(self._pending_signal, None)
            self._committer.start()
            while True:
                try:
                    self.child.wait(timeout=self.interval)
                    break
                except subprocess.TimeoutExpired:
                    pass
                try:
                    self.poll()
                except OSError as error:  # e.g. the snapshot directory filled up: try again later
                    logger.warning("cannot snapshot %s: %s", self.file, error)
            self._final_version()
            self._committer.drain()
            returncode = self.child.returncode
            logger.info("command exited with %s", returncode)
            if not self._committer.last_ok:
                logger.error("the last version of %s was not committed", self.file)
                return 1
            if self.signals:
                return self.exit_code
            return 128 - returncode if returncode < 0 else returncode
        finally:
            if self._committer.is_alive():
                self._committer.stop()
            shutil.rmtree(self._tmp, ignore_errors=True)
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)


# -- command line --------------------------------------------------------------------------

def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--file", required=True, metavar="PATH", help="the state file the command writes")
    parser.add_argument("--target", required=True, metavar="LOCATION",
                        help="where checkpoints go: a path, file:// or root://host:port//path")
    parser.add_argument("--interval", type=float, default=5.0, metavar="SECONDS",
                        help="how often to look at the file (default: %(default)s)")
    parser.add_argument("--exit-code", type=int, default=CHECKPOINT_EXIT_CODE,
                        help="exit code after SIGTERM/SIGINT (default: %(default)s)")
    parser.add_argument("--stable-polls", type=int, default=3, metavar="N",
                        help="a file rewritten in place is complete after N unchanged polls (default: %(default)s)")
    parser.add_argument("--keep-last", type=int, default=3, help="retention: newest versions kept (default: 3)")
    parser.add_argument("--keep-every", type=int, default=None, help="retention: also keep every N-th version")
    parser.add_argument("--deadline", type=float, default=RetryPolicy.deadline, metavar="SECONDS",
                        help="how long to retry a storage that does not answer (default: %(default)s)")
    parser.add_argument("--no-restore", action="store_true", help="do not restore before starting")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")


def run_watch(args: argparse.Namespace) -> int:
    """The handler of ``ckpt-tasks watch``."""
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print("ckpt-tasks watch: no command given (put it after --)", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("ckpt-tasks watch: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    store = CheckpointStore(args.target, keep_last=args.keep_last, keep_every=args.keep_every,
                            retry=RetryPolicy(deadline=args.deadline, initial_delay=min(1.0, args.deadline / 4)))
    watcher = Watcher(args.file, store, command, interval=args.interval, exit_code=args.exit_code,
                      stable_polls=args.stable_polls, restore=not args.no_restore)
    return watcher.run()


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``watch`` on the ``ckpt-tasks`` subcommands."""
    parser = subparsers.add_parser(
        "watch", help="run a program and checkpoint its state file to a location",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    parser.set_defaults(func=run_watch)
    return parser
