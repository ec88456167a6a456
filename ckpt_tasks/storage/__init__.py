"""Storage layer: local directories and XRootD behind one set of file operations,
and the single commit path (``publish_file``) every writer goes through."""
from ckpt_tasks.storage.commit import PublishedFile, publish_file
from ckpt_tasks.storage.local import LocalFileInterface
from ckpt_tasks.storage.store import Checkpoint, CheckpointStore, RetryPolicy
from ckpt_tasks.storage.xrootd import XRootDFileInterface

__all__ = ["Checkpoint", "CheckpointStore", "LocalFileInterface", "RetryPolicy", "PublishedFile", "XRootDFileInterface", "publish_file"]
