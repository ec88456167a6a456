"""The Checkpointer: store, checkpoint, transfer and restore one value of a training loop.

It keeps the API of the seed project so that its users' scripts run with only
the import line changed::

    ckpt = Checkpointer(Path("state.pt"), save, load, checkpoint_transfer_mode="xrootd",
                        checkpoint_transfer_target="/store/user/me/state.pt",
                        xrootd_server_name="root://eos.example.org:1094")
    value = ckpt.restore(default)
    for ...:
        value = work(value)
        ckpt.step(value)

Beyond the seed: every write is complete or absent (locally and on the storage),
storage errors are raised instead of printed, and a SIGTERM or SIGINT never
interrupts a checkpoint half-way: the handler only records the request when a
checkpoint is being written or restored, and the final checkpoint follows as
soon as that work is done.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ckpt_tasks.errors import CkptTasksError
from ckpt_tasks.htcondor.jobad import read_job_ad
from ckpt_tasks.storage.commit import temporary_name
from ckpt_tasks.storage.location import parse_xrootd_server, validate_remote_path, XRootDURL
from ckpt_tasks import transfer

logger = logging.getLogger(__name__)

TRANSFER_MODES = ("None", "shared", "xrootd", "htcondor", "manual")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: exit code when the last checkpoint could not be made persistent on a signal
EXIT_CHECKPOINT_FAILED = 1


def exit_process(code: int) -> None:
    """Leave at once with ``code``, after flushing logs and output.

    For code run by luigi (law tasks): luigi catches SystemExit and would report a
    failed task instead of passing the checkpoint exit code on.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _require_callable(name: str, value: Any) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")


def _require_dict(name: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict of keyword arguments, got {type(value).__name__}")
    return value


class Checkpointer:
    """Checkpoints one value of a long-running loop and keeps it on persistent storage.

    Args:
        local_checkpoint_file: where ``checkpoint_function`` writes the checkpoint.
        checkpoint_function: ``f(path, value)`` writes ``value`` to ``path``.
        restore_function: ``f(path) -> value`` reads a checkpoint.
        checkpoint_transfer_mode: ``None``/``"None"`` (the local file is persistent),
            ``"shared"`` (a mounted file system), ``"xrootd"``, ``"htcondor"``
            (HTCondor's own checkpoint transfer) or ``"manual"`` (a callback).
        checkpoint_transfer_target: the persistent copy: a path for ``shared``, the
            absolute path on the server for ``xrootd``, anything the callback
            understands for ``manual``; read from the job ad in ``htcondor`` mode.
        xrootd_server_name: ``"root://host[:port]"`` for ``xrootd`` mode.
        checkpoint_transfer_callback: ``callback(src, dst, **kwargs)`` for ``manual`` mode;
            called ``(local, target)`` to store and ``(target, local)`` to restore.
        checkpoint_transfer_callback_kwargs: keyword arguments for the callback.
        checkpoint_every: write and transfer on calls 1, N+1, 2N+1, ... of ``step``.
        checkpoint_exit_code: exit code after a signal-triggered checkpoint; in
            ``htcondor`` mode the job's own ``checkpoint_exit_code`` is used.
        on_SIGTERM_prehook: called as ``prehook(**on_SIGTERM_prehook_kwargs)`` before
            the last checkpoint on SIGTERM or SIGINT.
        on_SIGTERM_prehook_kwargs: keyword arguments for the prehook.
        checkpoint_interval: also write and transfer in ``step`` when this many seconds
            passed since the last checkpoint (not in the seed; None: only ``checkpoint_every``).
        handle_signals: install the SIGTERM/SIGINT handlers now (True, as the seed does), or
            later with :meth:`install_signal_handlers` (for frameworks that install their own).
    """

    #: True: a signal is honoured only at the end of the next ``step`` (for values that
    #: change between steps, like a live model); False: at once when no checkpoint work runs.
    defer_signals = False

    def __init__(
        self,
        local_checkpoint_file: str | os.PathLike,
        checkpoint_function: Callable[[Path, Any], None],
        restore_function: Callable[[Path], Any],
        checkpoint_transfer_mode: str | None = None,
        checkpoint_transfer_target: str | os.PathLike | None = None,
        xrootd_server_name: str | None = None,
        checkpoint_transfer_callback: Callable[..., Any] | None = None,
        checkpoint_transfer_callback_kwargs: dict | None = None,
        checkpoint_every: int = 1,
        checkpoint_exit_code: int = 85,
        on_SIGTERM_prehook: Callable[..., Any] | None = None,
        on_SIGTERM_prehook_kwargs: dict | None = None,
        *,
        checkpoint_interval: float | None = None,
        handle_signals: bool = True,
    ):
        if not isinstance(local_checkpoint_file, (str, os.PathLike)) or not os.fspath(local_checkpoint_file):
            raise TypeError(f"local_checkpoint_file must be a non-empty str or Path, got {local_checkpoint_file!r}")
        self.local_checkpoint_file = Path(local_checkpoint_file)
        if self.local_checkpoint_file.is_dir():
            raise ValueError(f"local_checkpoint_file {self.local_checkpoint_file} is a directory, not a file")
        _require_callable("checkpoint_function", checkpoint_function)
        _require_callable("restore_function", restore_function)
        self.checkpoint_function = checkpoint_function
        self.restore_function = restore_function

        mode = "None" if checkpoint_transfer_mode is None else checkpoint_transfer_mode
        if mode not in TRANSFER_MODES:
            raise ValueError(f"checkpoint_transfer_mode must be one of None, "
                             f"{', '.join(repr(m) for m in TRANSFER_MODES)}; got {checkpoint_transfer_mode!r}")
        self.checkpoint_transfer_mode = mode
        self.checkpoint_transfer_target = checkpoint_transfer_target
        self.xrootd_server_name = xrootd_server_name
        self.checkpoint_transfer_callback = checkpoint_transfer_callback
        self.checkpoint_transfer_callback_kwargs = _require_dict(
            "checkpoint_transfer_callback_kwargs", checkpoint_transfer_callback_kwargs)

        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
        self.checkpoint_every = checkpoint_every
        if isinstance(checkpoint_exit_code, bool) or not isinstance(checkpoint_exit_code, int) \
                or not 0 < checkpoint_exit_code < 256:
            raise ValueError(f"checkpoint_exit_code must be an integer in 1..255, got {checkpoint_exit_code!r}")
        self.checkpoint_exit_code = checkpoint_exit_code
        if checkpoint_interval is not None and not (isinstance(checkpoint_interval, (int, float))
                                                    and checkpoint_interval > 0):
            raise ValueError(f"checkpoint_interval must be None or seconds > 0, got {checkpoint_interval!r}")
        self.checkpoint_interval = checkpoint_interval
        self._last_checkpoint_time = time.monotonic()

        if on_SIGTERM_prehook is not None:
            _require_callable("on_SIGTERM_prehook", on_SIGTERM_prehook)
        self.on_SIGTERM_prehook = on_SIGTERM_prehook or (lambda **kwargs: None)
        self.on_SIGTERM_prehook_kwargs = _require_dict("on_SIGTERM_prehook_kwargs", on_SIGTERM_prehook_kwargs)

        self.transfer = self._make_transfer()

        #: the last value given to ``step`` (or returned by ``restore``); None: nothing to save
        self.checkpoint_value: Any = None
        #: number of ``step`` calls so far
        self.step_counter = 0

        self._busy = 0  # >0 while a checkpoint is written, transferred or restored
        self._stop_signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        if handle_signals:
            self.install_signal_handlers()

    # -- construction helpers -------------------------------------------------------------

    def _make_transfer(self) -> transfer.TransferMode:
        mode, target = self.checkpoint_transfer_mode, self.checkpoint_transfer_target
        if mode == "None":
            return transfer.LocalOnly()
        if mode == "shared":
            if target is None:
                raise ValueError("checkpoint_transfer_target is required in 'shared' mode (a path)")
            target_path = Path(target)
            if target_path.absolute() == self.local_checkpoint_file.absolute():
                raise ValueError("checkpoint_transfer_target must differ from local_checkpoint_file in 'shared' mode")
            return transfer.shared_copy(target_path)
        if mode == "xrootd":
            if not self.xrootd_server_name:
                raise ValueError("xrootd_server_name ('root://host:port') is required in 'xrootd' mode")
            server = parse_xrootd_server(self.xrootd_server_name)
            if target is None:
                raise ValueError("checkpoint_transfer_target (an absolute path on the server) "
                                 "is required in 'xrootd' mode")
            path = validate_remote_path(os.fspath(target), "checkpoint_transfer_target")
            self.local_checkpoint_file = self.local_checkpoint_file.absolute()
            return transfer.xrootd_copy(XRootDURL(server, path))
        if mode == "manual":
            if self.checkpoint_transfer_callback is None:
                raise ValueError("checkpoint_transfer_callback is required in 'manual' mode")
            _require_callable("checkpoint_transfer_callback", self.checkpoint_transfer_callback)
            return transfer.ManualCallback(self.checkpoint_transfer_callback, target,
                                           self.checkpoint_transfer_callback_kwargs)
        # htcondor: the job ad says what HTCondor transfers and which exit code asks for it.
        spool = transfer.HTCondorSpool(read_job_ad(), self.local_checkpoint_file)
        self.checkpoint_transfer_target = ", ".join(spool.files)
        if self.checkpoint_exit_code not in (85, spool.exit_code):
            logger.warning("checkpoint_exit_code=%d ignored: the job's checkpoint_exit_code is %d",
                           self.checkpoint_exit_code, spool.exit_code)
        self.checkpoint_exit_code = spool.exit_code
        return spool

    def install_signal_handlers(self) -> None:
        """Take over SIGTERM and SIGINT, remembering the handlers in place, until :meth:`close`."""
        if self._previous_handlers:
            return
        # Python delivers signals to the main thread of the main process only.
        if multiprocessing.current_process().name != "MainProcess" \
                or threading.current_thread() is not threading.main_thread():
            logger.warning("Checkpointer used outside the main thread: SIGTERM/SIGINT are not handled")
            return
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    @property
    def stop_requested(self) -> bool:
        """Whether a SIGTERM/SIGINT was recorded and not honoured yet."""
        return self._stop_signal is not None

    def stop_if_requested(self) -> None:
        """At a consistent point: after a recorded signal, save the last checkpoint and exit."""
        if self._stop_signal is not None and not self._busy:
            self.on_SIGTERM(self._stop_signal)

    def close(self) -> None:
        """Give SIGTERM and SIGINT back to the handlers that were installed before."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- the seed's API -----------------------------------------------------------------------

    def step(self, value: Any) -> None:
        """Store ``value``; on calls 1, N+1, 2N+1, ... (and every ``checkpoint_interval``
        seconds) also write and transfer the checkpoint."""
        with self._critical():
            self.checkpoint_value = value
            if self._checkpoint_due():
                self._save(value)
                self._last_checkpoint_time = time.monotonic()
            self.step_counter += 1

    def _checkpoint_due(self) -> bool:
        if self.step_counter % self.checkpoint_every == 0:
            return True
        return (self.checkpoint_interval is not None
                and time.monotonic() - self._last_checkpoint_time >= self.checkpoint_interval)

    def checkpoint(self, value: Any = None) -> None:
        """Write the local checkpoint file for ``value`` (default: the stored value); no transfer."""
        with self._critical():
            if value is None:
                value = self.checkpoint_value
            self._write_local(value)
            self.checkpoint_value = value

    def transfer_checkpoint_files(self) -> None:
        """Make the local checkpoint file persistent (a no-op in modes None and htcondor)."""
        if not self.local_checkpoint_file.exists():
            return
        with self._critical():
            self.transfer.store(self.local_checkpoint_file)

    def restore(self, default_value: Any = None) -> Any:
        """Return the newest checkpoint's value, or ``default_value`` when the storage has none.

        Raises when the storage does not answer: an outage is never taken for "no
        checkpoint". The returned value becomes the stored value, so a signal before
        the first ``step`` saves it again instead of nothing.
        """
        with self._critical():
            if self.transfer.retrieve(self.local_checkpoint_file):
                value = self.restore_function(self.local_checkpoint_file)
                logger.info("restored checkpoint %s", self.local_checkpoint_file)
            else:
                value = default_value
                logger.info("no checkpoint found; starting from the default value")
            self.checkpoint_value = value
            return value

    @property
    def checkpoint_exists(self) -> bool:
        """Whether a checkpoint exists on the persistent storage (in ``manual`` mode: locally)."""
        if isinstance(self.transfer, transfer.StorageCopy):
            return self.transfer.files.exists(self.transfer.target)
        return self.local_checkpoint_file.exists()

    def clean_up_local_checkpoint_files(self) -> None:
        """Remove the local file where a persistent copy exists elsewhere."""
        if self.transfer.removes_local_copy:
            self.local_checkpoint_file.unlink(missing_ok=True)

    def on_SIGTERM(self, signum: int, frame: Any = None) -> None:
        """Prehook, last checkpoint, transfer, clean-up, exit with the checkpoint exit code."""
        self.on_SIGTERM_prehook(**self.on_SIGTERM_prehook_kwargs)
        if self.checkpoint_value is None:
            self._exit_without_value(signum)
        try:
            self._busy += 1  # a second signal now must not start another save
            self._save_final(self.checkpoint_value)
        except Exception as error:
            logger.error("the last checkpoint after %s could not be saved: %s",
                         signal.Signals(signum).name, error)
            self._exit(EXIT_CHECKPOINT_FAILED)
        self.clean_up_local_checkpoint_files()
        logger.info("checkpoint saved after %s; exiting with code %d",
                    signal.Signals(signum).name, self.checkpoint_exit_code)
        self._exit(self.checkpoint_exit_code)

    # -- internals -----------------------------------------------------------------------------

    def _save(self, value: Any) -> None:
        """Write the checkpoint of ``value`` and make it persistent (subclasses may do it in
        the background)."""
        self._write_local(value)
        self.transfer_checkpoint_files()

    def _save_final(self, value: Any) -> None:
        """The last save before exiting on a signal: complete when it returns."""
        self._write_local(value)
        self.transfer.store(self.local_checkpoint_file)

    def _exit(self, code: int) -> None:
        sys.exit(code)

    def _exit_without_value(self, signum: int) -> None:
        if isinstance(self.transfer, transfer.HTCondorSpool) and not self.local_checkpoint_file.exists():
            # Exit 85 without the listed file would put the job on hold.
            logger.warning("%s before any value was stored and no checkpoint file exists; "
                           "exiting with %d so HTCondor does not look for a checkpoint",
                           signal.Signals(signum).name, 128 + signum)
            self._exit(128 + signum)
        logger.warning("%s before any value was stored: nothing to checkpoint, the storage keeps "
                       "what it has", signal.Signals(signum).name)
        self._exit(self.checkpoint_exit_code)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._stop_signal is not None:
            logger.warning("%s received while the last checkpoint is being saved; finishing it first", name)
            return
        self._stop_signal = signum
        if self._busy or self.defer_signals:
            logger.info("%s received; stopping at the next consistent point", name)
            return
        self.on_SIGTERM(signum, frame)

    @contextmanager
    def _critical(self) -> Iterator[None]:
        """Defer a stop request until the checkpoint work inside has finished."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
        # Reached only without an exception: the state is consistent again.
        if not self._busy and self._stop_signal is not None:
            self.on_SIGTERM(self._stop_signal)

    def _write_local(self, value: Any) -> None:
        """Run the checkpoint function on a temporary path, then rename: complete or absent."""
        final = self.local_checkpoint_file
        final.parent.mkdir(parents=True, exist_ok=True)
        # Keep the suffix: some writers (numpy, keras) append their own when it is missing.
        partial = final.with_name(Path(temporary_name(final.with_suffix(""))).name + final.suffix)
        try:
            self.checkpoint_function(partial, value)
            if not partial.exists():
                raise CkptTasksError(
                    f"checkpoint_function wrote nothing to the path it was given ({partial}); "
                    "it must write the value to that path")
            os.replace(partial, final)
        finally:
            if partial.exists():
                partial.unlink()
