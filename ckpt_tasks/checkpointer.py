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
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from ckpt_tasks.committer import Committer, WriteAndTransfer
from ckpt_tasks.jobenv.htcondor import read_job_ad
from ckpt_tasks.local_checkpoint import LocalCheckpointPath
from ckpt_tasks.policy import SavePolicy, save_policy as policy_from_parameters
from ckpt_tasks.stop import (CHECKPOINT_EXIT_CODE, EXIT_CHECKPOINT_FAILED, STOP_SIGNALS, StopGuard,
                             check_exit_code, exit_process)
from ckpt_tasks.storage.location import parse_xrootd_server, validate_remote_path, XRootDURL
from ckpt_tasks import transfer as transfers

logger = logging.getLogger(__name__)

TRANSFER_MODES = ("None", "shared", "xrootd", "htcondor", "manual")
__all__ = ["Checkpointer", "Committer", "TRANSFER_MODES", "STOP_SIGNALS", "EXIT_CHECKPOINT_FAILED",
           "exit_process"]


def _require_callable(name: str, value: Any) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")


def _require_dict(name: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict of keyword arguments, got {type(value).__name__}")
    return value


def _check_callables(checkpoint_function: Any, restore_function: Any) -> None:
    _require_callable("checkpoint_function", checkpoint_function)
    if restore_function is not None:  # the seed accepts None: restore only fetches
        _require_callable("restore_function", restore_function)


def _check_mode(mode: Any) -> str:
    normalised = "None" if mode is None else mode
    if normalised not in TRANSFER_MODES:
        raise ValueError(f"checkpoint_transfer_mode must be one of None, "
                         f"{', '.join(repr(m) for m in TRANSFER_MODES)}; got {mode!r}")
    return normalised


class Checkpointer:
    """Checkpoints one value of a long-running loop and keeps it on persistent storage.

    The first eleven parameters are the seed's, in the seed's order; the rest are
    keyword-only.

    Args:
        local_checkpoint_file: where ``checkpoint_function`` writes the checkpoint: a
            file, or a directory that the function creates.
        checkpoint_function: ``f(path, value)`` writes ``value`` to ``path`` (a temporary
            path beside ``local_checkpoint_file``; one that writes ``local_checkpoint_file``
            itself works too).
        restore_function: ``f(path) -> value`` reads a checkpoint; None: :meth:`restore`
            only fetches the file and returns its default.
        checkpoint_transfer_mode: ``None``/``"None"`` (the local file is persistent),
            ``"shared"`` (a mounted file system), ``"xrootd"``, ``"htcondor"``
            (HTCondor's own checkpoint transfer) or ``"manual"`` (a callback).
        checkpoint_transfer_target: the persistent copy: a path for ``shared``, the
            absolute path on the server for ``xrootd``, anything the callback
            understands for ``manual``; read from the job ad in ``htcondor`` mode.
            Read at each transfer: reassigning it takes effect.
        xrootd_server_name: ``"root://host[:port]"`` for ``xrootd`` mode.
        checkpoint_transfer_callback: ``callback(src, dst, **kwargs)`` for ``manual`` mode;
            called ``(local, target)`` to store and ``(target, local)`` to restore.
        checkpoint_transfer_callback_kwargs: keyword arguments for the callback.
        checkpoint_every: write and transfer on calls 1, N+1, 2N+1, ... of ``step``.
        on_SIGTERM_prehook: called as ``prehook(**on_SIGTERM_prehook_kwargs)`` before
            the last checkpoint on SIGTERM or SIGINT.
        on_SIGTERM_prehook_kwargs: keyword arguments for the prehook.
        checkpoint_exit_code: exit code after a signal-triggered checkpoint; in
            ``htcondor`` mode the job's own ``checkpoint_exit_code`` is used.
        checkpoint_interval: also write and transfer in ``step`` when this many seconds
            passed since the last checkpoint (None: only ``checkpoint_every``).
        save_policy: a :class:`~ckpt_tasks.policy.SavePolicy` instead of the two above.
        handle_signals: install the SIGTERM/SIGINT handlers now (True, as the seed does), or
            later with :meth:`install_signal_handlers` (for frameworks that install their own).
        defer_signals: honour a signal only at the end of the next ``step`` (for values
            that change between steps, like a live model), not at once.
        hard_exit: leave with ``os._exit`` after flushing (for luigi/law, which catch
            ``SystemExit``) instead of ``sys.exit``.
        transfer: a transfer object (``store(local)``, ``retrieve(local) -> bool``) used
            instead of the one the mode describes.
        committer: a :class:`Committer` used instead of write-then-transfer.
    """

    def __init__(
        self,
        local_checkpoint_file: str | os.PathLike,
        checkpoint_function: Callable[[Path, Any], None],
        restore_function: Callable[[Path], Any] | None,
        checkpoint_transfer_mode: str | None = "None",
        checkpoint_transfer_target: str | os.PathLike | None = None,
        xrootd_server_name: str | None = None,
        checkpoint_transfer_callback: Callable[..., Any] | None = None,
        checkpoint_transfer_callback_kwargs: dict | None = None,
        checkpoint_every: int = 1,
        on_SIGTERM_prehook: Callable[..., Any] | None = None,
        on_SIGTERM_prehook_kwargs: dict | None = None,
        *,
        checkpoint_exit_code: int = CHECKPOINT_EXIT_CODE,
        checkpoint_interval: float | None = None,
        save_policy: SavePolicy | None = None,
        handle_signals: bool = True,
        defer_signals: bool = False,
        hard_exit: bool = False,
        transfer: "transfers.TransferMode | None" = None,
        committer: Committer | None = None,
    ):
        _check_callables(checkpoint_function, restore_function)
        if not isinstance(local_checkpoint_file, (str, os.PathLike)) or not os.fspath(local_checkpoint_file):
            raise TypeError(f"local_checkpoint_file must be a non-empty str or Path, got {local_checkpoint_file!r}")
        self.local_checkpoint_file = Path(local_checkpoint_file)
        self.checkpoint_function = checkpoint_function
        self.restore_function = restore_function
        self.checkpoint_transfer_mode = _check_mode(checkpoint_transfer_mode)
        self.checkpoint_transfer_target = checkpoint_transfer_target
        self.xrootd_server_name = xrootd_server_name
        self.checkpoint_transfer_callback = checkpoint_transfer_callback
        self.checkpoint_transfer_callback_kwargs = _require_dict(
            "checkpoint_transfer_callback_kwargs", checkpoint_transfer_callback_kwargs)

        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self.save_policy = save_policy if save_policy is not None else \
            policy_from_parameters(
            checkpoint_every, checkpoint_interval)
        self.checkpoint_exit_code = check_exit_code(checkpoint_exit_code)

        if on_SIGTERM_prehook is not None:
            _require_callable("on_SIGTERM_prehook", on_SIGTERM_prehook)
        self.on_SIGTERM_prehook = on_SIGTERM_prehook or (lambda **kwargs: None)
        self.on_SIGTERM_prehook_kwargs = _require_dict("on_SIGTERM_prehook_kwargs", on_SIGTERM_prehook_kwargs)

        self.hard_exit = hard_exit
        self._fixed_transfer = transfer
        self._transfer: transfers.TransferMode | None = None
        self._transfer_settings: tuple | None = None
        _ = self.transfer  # bad settings raise now, as the seed's assertions do
        self.committer: Committer = committer if committer is not None else WriteAndTransfer(self)

        #: the last value given to ``step`` or ``checkpoint``; None: nothing to save on a signal
        self.checkpoint_value: Any = None
        #: number of ``step`` calls so far
        self.step_counter = 0
        self._saved_this_step = False  # True from a step's save to that step's end

        #: records SIGTERM/SIGINT and hands them to :meth:`on_SIGTERM` at a consistent point
        self.stop_guard = StopGuard(self.on_SIGTERM, defer=defer_signals)
        if handle_signals:
            self.install_signal_handlers()

    # -- the transfer, rebuilt when a setting that the seed reads at transfer time changes ------

    def _settings(self) -> tuple:
        return (self.checkpoint_transfer_mode, os.fspath(self.checkpoint_transfer_target)
                if isinstance(self.checkpoint_transfer_target, (str, os.PathLike))
                else self.checkpoint_transfer_target, self.xrootd_server_name,
                self.checkpoint_transfer_callback, id(self.checkpoint_transfer_callback_kwargs),
                self.local_checkpoint_file)

    @property
    def transfer(self) -> transfers.TransferMode:
        """The transfer mode in use, for the current settings."""
        if self._fixed_transfer is not None:
            return self._fixed_transfer
        if self._transfer is None or self._settings() != self._transfer_settings:
            self._transfer = self._make_transfer()
            self._transfer_settings = self._settings()
        return self._transfer

    def _make_transfer(self) -> transfers.TransferMode:
        mode, target = self.checkpoint_transfer_mode, self.checkpoint_transfer_target
        if mode == "None":
            return transfers.LocalOnly()
        if mode == "shared":
            return self._shared_transfer(target)
        if mode == "xrootd":
            return self._xrootd_transfer(target)
        if mode == "manual":
            if self.checkpoint_transfer_callback is None:
                raise ValueError("checkpoint_transfer_callback is required in 'manual' mode")
            _require_callable("checkpoint_transfer_callback", self.checkpoint_transfer_callback)
            return transfers.ManualCallback(self.checkpoint_transfer_callback, target,
                                           self.checkpoint_transfer_callback_kwargs)
        # htcondor: the job ad says what HTCondor transfers and which exit code asks for it.
        spool = transfers.HTCondorSpool(read_job_ad(), self.local_checkpoint_file)
        self.checkpoint_transfer_target = ", ".join(spool.files)
        if self.checkpoint_exit_code not in (CHECKPOINT_EXIT_CODE, spool.exit_code):
            logger.warning("checkpoint_exit_code=%d ignored: the job's checkpoint_exit_code is %d",
                           self.checkpoint_exit_code, spool.exit_code)
        self.checkpoint_exit_code = spool.exit_code
        return spool

    def _shared_transfer(self, target: Any) -> transfers.StorageCopy:
        if target is None:
            raise ValueError("checkpoint_transfer_target is required in 'shared' mode (a path)")
        target_path = Path(target)
        if target_path.absolute() == self.local_checkpoint_file.absolute():
            raise ValueError("checkpoint_transfer_target must differ from local_checkpoint_file in 'shared' mode")
        if target_path.is_dir():
            raise ValueError(f"checkpoint_transfer_target {target_path} is a directory; in 'shared' mode "
                             f"it must name the file to write (e.g. {target_path}/checkpoint.pt)")
        return transfers.shared_copy(target_path)

    def _xrootd_transfer(self, target: Any) -> transfers.StorageCopy:
        if not self.xrootd_server_name:
            raise ValueError("xrootd_server_name ('root://host:port') is required in 'xrootd' mode")
        server = parse_xrootd_server(self.xrootd_server_name)
        if target is None:
            raise ValueError("checkpoint_transfer_target (an absolute path on the server) "
                             "is required in 'xrootd' mode")
        path = validate_remote_path(os.fspath(target), "checkpoint_transfer_target")
        self.local_checkpoint_file = self.local_checkpoint_file.absolute()
        # The seed's xrootd mode exposes its XRootD client objects; scripts may use them.
        from XRootD import client
        from XRootD.client.flags import DirListFlags

        self.DirListFlags = DirListFlags
        self.xrootd_client = client.FileSystem(server)
        return transfers.xrootd_copy(XRootDURL(server, path))

    # -- signals --------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Take over SIGTERM and SIGINT, remembering the handlers in place, until :meth:`close`."""
        self.stop_guard.install()

    @property
    def stop_requested(self) -> bool:
        """Whether a SIGTERM/SIGINT was recorded and not honoured yet."""
        return self.stop_guard.requested is not None

    @property
    def step_saved(self) -> bool:
        """Whether the step in progress has saved its value already (from that save to the
        step's end, where a stop recorded during the save is honoured)."""
        return self._saved_this_step

    def stop_if_requested(self) -> None:
        """At a consistent point: after a recorded signal, save the last checkpoint and exit."""
        self.stop_guard.honour()

    def close(self) -> None:
        """Give SIGTERM and SIGINT back to the handlers that were installed before."""
        self.stop_guard.uninstall()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- the seed's API -----------------------------------------------------------------------

    def step(self, value: Any) -> None:
        """Store ``value``; on calls 1, N+1, 2N+1, ... (and every ``checkpoint_interval``
        seconds) also write and transfer the checkpoint."""
        try:
            with self.stop_guard.critical():
                self.checkpoint_value = value
                now = time.monotonic()
                if self.save_policy.due(self.step_counter, now):
                    self._save(value)
                    self.save_policy.saved(self.step_counter, time.monotonic())
                    # A stop that came during this save needs no second one of the same value.
                    self._saved_this_step = True
                self.step_counter += 1
            self.stop_guard.honour()  # the end of a step is consistent, deferring or not
        finally:
            self._saved_this_step = False

    def checkpoint(self, value: Any = None) -> None:
        """Write the local checkpoint for ``value`` (default: the stored value); no transfer."""
        with self.stop_guard.critical():
            if value is None:
                value = self.checkpoint_value
            self._write_local(value)
            self.checkpoint_value = value

    def transfer_checkpoint_files(self) -> None:
        """Make the local checkpoint persistent (a no-op in modes None and htcondor)."""
        if not self.local_checkpoint_file.exists():
            return
        with self.stop_guard.critical():
            self.transfer.store(self.local_checkpoint_file)

    def get_checkpoint(self) -> bool:
        """Bring the persistent checkpoint to ``local_checkpoint_file``; False when there is none.

        Raises when the storage does not answer: an outage is never taken for "no checkpoint".
        """
        with self.stop_guard.critical():
            return self.transfer.retrieve(self.local_checkpoint_file)

    def restore(self, default: Any = None) -> Any:
        """Return the newest checkpoint's value, or ``default`` when the storage has none.

        As in the seed, the returned value is not taken as the stored value: a signal
        before the first ``step`` or ``checkpoint`` saves nothing and leaves the stored
        checkpoint as it is.
        """
        with self.stop_guard.critical():
            if self.get_checkpoint():
                logger.info("restored checkpoint %s", self.local_checkpoint_file)
                if self.restore_function is not None:
                    return self.restore_function(self.local_checkpoint_file)
            else:
                logger.info("no checkpoint found; starting from the default value")
            return default

    @property
    def checkpoint_exists(self) -> bool:
        """Whether a checkpoint exists on the persistent storage (in ``manual`` mode: locally)."""
        current = self.transfer
        if isinstance(current, transfers.StorageCopy):
            return current.files.exists(current.target)
        return LocalCheckpointPath(self.local_checkpoint_file).exists()

    def clean_up_local_checkpoint_files(self) -> None:
        """Remove the local checkpoint where a persistent copy exists elsewhere."""
        if getattr(self.transfer, "removes_local_copy", False):
            transfers.remove_local(self.local_checkpoint_file)

    def on_SIGTERM(self, signalNumber: int, frame: Any = None) -> None:
        """Prehook, last checkpoint, transfer, clean-up, exit with the checkpoint exit code."""
        self.on_SIGTERM_prehook(**self.on_SIGTERM_prehook_kwargs)
        name = signal.Signals(signalNumber).name
        if self.checkpoint_value is None:
            self._exit_without_value(name, signalNumber)
            return
        try:
            self._save_final(self.checkpoint_value)
        except Exception as error:
            logger.error("the last checkpoint after %s could not be saved: %s", name, error)
            self._exit(self.exit_code_for(error))
            return
        self.clean_up_local_checkpoint_files()
        logger.info("checkpoint saved after %s; exiting with code %d", name, self.checkpoint_exit_code)
        self._exit(self.checkpoint_exit_code)

    def exit_code_for(self, error: Exception) -> int:
        """The exit code when the last checkpoint on a stop failed with ``error`` (not the
        checkpoint exit code: nothing new was saved)."""
        return EXIT_CHECKPOINT_FAILED

    # -- internals -----------------------------------------------------------------------------

    def _save(self, value: Any) -> None:
        self.committer.save(value)

    def _save_final(self, value: Any) -> None:
        self.committer.save_final(value)

    def _exit(self, code: int) -> None:
        self.close()
        exit_process(code, hard=self.hard_exit)

    def _exit_without_value(self, name: str, signum: int) -> None:
        if isinstance(self.transfer, transfers.HTCondorSpool) \
                and not LocalCheckpointPath(self.local_checkpoint_file).exists():
            # Exit 85 without the listed file would put the job on hold.
            logger.warning("%s before any value was stored and no checkpoint file exists; "
                           "exiting with %d so HTCondor does not look for a checkpoint", name, 128 + signum)
            self._exit(128 + signum)
            return
        logger.warning("%s before any value was stored: nothing to checkpoint, the storage keeps "
                       "what it has", name)
        self._exit(self.checkpoint_exit_code)

    def _write_local(self, value: Any) -> None:
        """Run the checkpoint function on a temporary path, then swap in: complete or absent."""
        LocalCheckpointPath(self.local_checkpoint_file).write(lambda path: self.checkpoint_function(path, value))

