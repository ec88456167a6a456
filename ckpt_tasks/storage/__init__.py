"""Storage layer: a backend contract (``backend.py``) with local directories and XRootD
behind it, one registry by URL scheme (``registry.py``), the single commit path
(``publish_file``) every writer goes through, and the versioned ``CheckpointStore``."""
from ckpt_tasks.storage.backend import StorageBackend
from ckpt_tasks.storage.commit import publish_file
from ckpt_tasks.storage.local import LocalFileInterface
from ckpt_tasks.storage.records import StoredFile
from ckpt_tasks.storage.registry import OpenedLocation, open_location, register_backend
from ckpt_tasks.storage.retention import KeepAny, KeepEvery, KeepLast, RetentionPolicy
from ckpt_tasks.storage.store import Checkpoint, CheckpointStore, RetryPolicy
from ckpt_tasks.storage.xrootd import XRootDFileInterface

__all__ = ["Checkpoint", "CheckpointStore", "KeepAny", "KeepEvery", "KeepLast", "LocalFileInterface",
           "OpenedLocation", "RetentionPolicy", "RetryPolicy", "StorageBackend", "StoredFile",
           "XRootDFileInterface", "open_location", "publish_file", "register_backend"]
