"""Parsing and validation of storage locations given by users.

A location is one of
- a local path (``/data/ckpt``, ``relative/dir``),
- a ``file://`` URL (``file:///data/ckpt``),
- an XRootD URL ``root://host[:port]//absolute/path`` (also ``roots://``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# host: a DNS name, an IPv4 address or a bracketed IPv6 address; port optional.
_SERVER_RE = re.compile(
    r"^(?P<scheme>roots?)://(?:(?P<user>[A-Za-z0-9._-]+)@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>\d{1,5}))?$"
)


@dataclass(frozen=True)
class XRootDURL:
    """A validated XRootD URL, split into the server and the absolute path on it."""

    server: str  # "root://host:port"
    path: str  # "/absolute/path", normalised, never empty

    @property
    def url(self) -> str:
        return f"{self.server}/{self.path}"

    def child(self, name: str) -> "XRootDURL":
        return XRootDURL(self.server, str(PurePosixPath(self.path) / name))

    def __str__(self) -> str:
        return self.url


def parse_xrootd_server(server: str) -> str:
    """Validate ``root://host[:port]`` (no path) and return it without a trailing slash."""
    if not isinstance(server, str):
        raise ValueError(f"xrootd_server_name must be a string like 'root://host:port', got {server!r}")
    candidate = server.rstrip("/")
    match = _SERVER_RE.match(candidate)
    if not match:
        raise ValueError(
            f"xrootd_server_name {server!r} is not a valid XRootD server; expected 'root://host[:port]'"
        )
    port = match.group("port")
    if port is not None and not 0 < int(port) < 65536:
        raise ValueError(f"xrootd_server_name {server!r} has an invalid port {port}")
    return candidate


def validate_remote_path(path: str, what: str = "path") -> str:
    """Return a normalised absolute POSIX path; refuse relative paths and '..'."""
    path = str(path)
    if not path.startswith("/"):
        raise ValueError(f"{what} {path!r} must be an absolute path on the server (start with '/')")
    if any(c in path for c in "\0\n\r"):
        raise ValueError(f"{what} {path!r} contains control characters")
    parts = PurePosixPath(path).parts
    if ".." in parts:
        raise ValueError(f"{what} {path!r} must not contain '..'")
    normalised = str(PurePosixPath(*parts))
    return normalised


def parse_xrootd_url(url: str) -> XRootDURL:
    """Split and validate ``root://host[:port]//abs/path``."""
    match = re.match(r"^(roots?://[^/]+)(/.*)?$", url)
    if not match:
        raise ValueError(f"{url!r} is not an XRootD URL; expected 'root://host[:port]//absolute/path'")
    server = parse_xrootd_server(match.group(1))
    raw_path = match.group(2) or "/"
    # "root://host//abs" carries the path "/abs"; "root://host/rel" is the same path for XRootD.
    path = "/" + raw_path.lstrip("/")
    return XRootDURL(server, validate_remote_path(path, "path of " + url))


def is_xrootd_url(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and location.startswith(("root://", "roots://"))


def local_path_from(location: str | os.PathLike) -> Path:
    """A local path from a path or a ``file://`` URL; other schemes are refused."""
    text = os.fspath(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
        if not text.startswith("/"):
            raise ValueError(f"file URL {location!r} must carry an absolute path (file:///...)")
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        raise ValueError(f"unsupported storage scheme in {location!r}; use a path, file:// or root://")
    return Path(text).expanduser()
