"""ckpt_tasks: long trainings on HTCondor pools that survive eviction with nothing lost."""
from ckpt_tasks.checkpointer import Checkpointer
from ckpt_tasks.storage.store import Checkpoint, CheckpointStore, RetryPolicy
from ckpt_tasks.errors import (CkptTasksError, JobAdError, StorageError, StorageUnavailable,
                               VerificationError)

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointStore",
    "Checkpointer",
    "RetryPolicy",
    "CkptTasksError",
    "JobAdError",
    "StorageError",
    "StorageUnavailable",
    "VerificationError",
    "__version__",
]
