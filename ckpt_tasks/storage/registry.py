"""One registry from a location's URL scheme to the backend that serves it.

``open_location("root://host//data/ckpt")`` validates the location and returns the
backend and the location's root as that backend spells paths. A plain path is the
``file`` scheme. Adding a backend is one module with a factory and one
``register_backend`` line (at the end of this module for the built-in ones).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

from ckpt_tasks.storage.backend import StorageBackend
from ckpt_tasks.storage.location import validate_location

#: the store's default for how long transient errors are retried, in seconds
DEFAULT_DEADLINE = 120.0

_SCHEME_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):")


@dataclass(frozen=True)
class OpenedLocation:
    """A validated location: its backend and its root (a path or URL without a trailing slash)."""

    backend: StorageBackend
    root: str

    def path(self, name: str) -> str:
        """The full path or URL of ``name`` inside the location."""
        return f"{self.root.rstrip('/')}/{name}"


#: ``factory(location, deadline)``: open the backend of ``location`` (checked by
#: ``validate_location``; a factory raises ValueError for what else it refuses), whose
#: single calls must not outlast ``deadline`` seconds
BackendFactory = Callable[[str, float], OpenedLocation]

_FACTORIES: dict[str, BackendFactory] = {}


def register_backend(scheme: str, factory: BackendFactory) -> None:
    """Serve locations ``scheme://...`` with ``factory`` (replacing an earlier one)."""
    if not _SCHEME_RE.match(f"{scheme}:"):
        raise ValueError(f"{scheme!r} is not a URL scheme")
    _FACTORIES[scheme.lower()] = factory


def unregister_backend(scheme: str) -> None:
    """Forget the backend of ``scheme`` (tests register doubles for a while)."""
    _FACTORIES.pop(scheme.lower(), None)


def is_registered(scheme: str) -> bool:
    """Whether a backend serves ``scheme``."""
    return scheme.lower() in _FACTORIES


def scheme_of(location: str | os.PathLike) -> str:
    """The URL scheme of ``location``; ``"file"`` for a plain path.

    A ``:`` before the first ``/`` makes the text before it a scheme, whatever follows:
    such a value is never a local path.
    """
    text = os.fspath(location)
    head = text.split("/", 1)[0]
    if ":" not in head:
        return "file"
    return head.split(":", 1)[0].lower()


def open_location(location: str | os.PathLike, deadline: float = DEFAULT_DEADLINE,
                  parameter: str = "location") -> OpenedLocation:
    """The backend of ``location`` and its root; ValueError naming ``parameter`` when the
    location is not valid or no backend serves its scheme."""
    text = validate_location(location, parameter)
    factory = _FACTORIES.get(scheme_of(text))
    if factory is None:
        raise ValueError(f"{parameter}={text!r}: no storage backend is registered for its scheme")
    try:
        return factory(text, deadline)
    except ValueError as error:
        raise ValueError(f"{parameter}={text!r}: {error}") from None


def _open_local(location: str, deadline: float) -> OpenedLocation:
    from ckpt_tasks.storage.local import open_local

    return open_local(location, deadline)


def _open_xrootd(location: str, deadline: float) -> OpenedLocation:
    from ckpt_tasks.storage.xrootd import open_xrootd

    return open_xrootd(location, deadline)


register_backend("file", _open_local)
register_backend("root", _open_xrootd)
register_backend("roots", _open_xrootd)
