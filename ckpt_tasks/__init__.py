"""ckpt_tasks: long trainings on HTCondor pools that survive eviction with nothing lost."""
from ckpt_tasks.checkpointer import Checkpointer
from ckpt_tasks.errors import (CkptTasksError, FingerprintMismatch, InvalidStoragePath, JobAdError,
                               PermanentStorageError, StorageAuthenticationFailed, StorageError, StorageFull,
                               StorageNotFound, StoragePermissionDenied, StorageReadOnly, StorageUnavailable,
                               VerificationError)
from ckpt_tasks.policy import SaveEvery, SaveInterval, SavePolicy, SaveReason
from ckpt_tasks.state import TrainingState
from ckpt_tasks.stop import CHECKPOINT_EXIT_CODE, StopGuard
from ckpt_tasks.storage.retention import KeepEvery, KeepLast
from ckpt_tasks.storage.store import Checkpoint, CheckpointStore, RetryPolicy

__version__ = "0.1.0"

__all__ = [
    "CHECKPOINT_EXIT_CODE",
    "SaveEvery",
    "SaveInterval",
    "SavePolicy",
    "SaveReason",
    "StopGuard",
    "Checkpoint",
    "CheckpointStore",
    "CheckpointedTask",
    "Checkpointer",
    "CkptTasksError",
    "FingerprintMismatch",
    "InvalidStoragePath",
    "KeepEvery",
    "KeepLast",
    "PermanentStorageError",
    "StorageAuthenticationFailed",
    "StorageFull",
    "StorageNotFound",
    "StoragePermissionDenied",
    "StorageReadOnly",
    "JobAdError",
    "RetryPolicy",
    "StorageError",
    "StorageUnavailable",
    "TrainingState",
    "VerificationError",
    "__version__",
]


def __getattr__(name: str):
    # The law layer is imported on first use: a plain training loop with the
    # Checkpointer does not pay for law and luigi.
    if name in ("CheckpointedTask", "TrainingSession"):
        from ckpt_tasks import tasks

        return getattr(tasks, name)
    raise AttributeError(f"module 'ckpt_tasks' has no attribute {name!r}")
