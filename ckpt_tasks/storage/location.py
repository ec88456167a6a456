"""Parsing and validation of storage locations given by users.

A location is one of
- a local path (``/data/ckpt``, ``relative/dir``),
- a ``file://`` URL (``file:///data/ckpt``),
- an XRootD URL ``root://host[:port]//absolute/path`` (also ``roots://``).

``validate_location`` is the strict check for user input: anything that looks like a
URL but is not a valid one is refused, never taken for a local directory.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

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
    """Split and validate ``root://host[:port]//abs/path``.

    Lenient, as XRootD is: ``root://host/p`` is the path ``/p`` too (the seed's xrootd mode
    and law's targets build such URLs). Locations given by users go through the strict
    ``validate_location`` first.
    """
    match = re.match(r"^(roots?://[^/]+)(/.*)?$", url)
    if not match:
        raise ValueError(f"{url!r} is not an XRootD URL; expected 'root://host[:port]//absolute/path'")
    server = parse_xrootd_server(match.group(1))
    raw_path = match.group(2) or "/"
    # "root://host//abs" carries the path "/abs"; "root://host/rel" is the same path for XRootD.
    path = "/" + raw_path.lstrip("/")
    return XRootDURL(server, validate_remote_path(path, "path of " + url))


#: the forms a storage location may take, as error messages name them
ACCEPTED_FORMS = ("/abs/or/relative/path", "file:///abs/path", "root://host[:port]//abs/path",
                  "roots://host[:port]//abs/path")
# A scheme-like prefix: "name:" before the first "/" (a local path never has one).
_SCHEME_PREFIX_RE = re.compile(r"^(?P<scheme>[^/]*?):")
# "root//host//p" and the like: a known scheme whose ":" went missing.
_MISSING_COLON_RE = re.compile(r"^(?:roots?|file)//")
_XROOTD_LOCATION_RE = re.compile(r"^(?P<server>roots?://[^/]+)//(?P<path>.*)$")


def _refuse(parameter: str, text: str, reason: str) -> ValueError:
    forms = ", ".join(f"'{form}'" for form in ACCEPTED_FORMS)
    return ValueError(f"{parameter}={text!r} is not a valid storage location: {reason}; "
                      f"accepted forms are {forms}")


def _validate_xrootd(text: str, parameter: str) -> str:
    match = _XROOTD_LOCATION_RE.match(text)
    if not match:
        raise _refuse(parameter, text, "an XRootD URL needs a host and an absolute path after "
                                       "a double slash")
    try:
        parse_xrootd_server(match.group("server"))
        validate_remote_path("/" + match.group("path"), "path")
    except ValueError as error:
        raise _refuse(parameter, text, str(error)) from None
    return text


def validate_location(text: str | os.PathLike, parameter: str = "store") -> str:
    """Return the normalised storage location ``text``, or raise ``ValueError``.

    A local path (or ``file:///abs`` URL) comes back absolute, for the caller to log; a
    valid ``root://`` or ``roots://`` URL comes back as it is. Anything that looks like a
    URL but is not a valid one (``root:/host//p``, ``root://``, ``root//host//p``,
    ``root://host/relative``, ``s3://x``, ``foo:bar/x``) raises a ``ValueError`` whose
    message names ``parameter`` and the accepted forms: a value with a ``:`` before its
    first ``/`` is never a local path. A scheme registered in
    ``ckpt_tasks.storage.registry`` by another backend comes back as it is.
    """
    if not isinstance(text, (str, os.PathLike)):
        raise _refuse(parameter, repr(text), f"expected a string or a path, got {type(text).__name__}")
    text = os.fspath(text)
    if not isinstance(text, str) or not text.strip():
        raise _refuse(parameter, str(text), "it is empty" if isinstance(text, str) else "not text")
    if any(c in text for c in "\0\n\r"):
        raise _refuse(parameter, text, "it contains control characters")
    if _MISSING_COLON_RE.match(text):
        raise _refuse(parameter, text, "it looks like a URL with its ':' missing")
    prefix = _SCHEME_PREFIX_RE.match(text)
    if prefix is None:
        return os.path.abspath(os.path.expanduser(text))
    scheme = prefix.group("scheme")
    if scheme in ("root", "roots"):
        if "?" in text or "#" in text:
            # CGI such as ?authz=<token> would be logged, put into job arguments and paths.
            raise _refuse(parameter, text.split("?", 1)[0].split("#", 1)[0] + "?...",
                          "a query string is not accepted (credentials go in X509_USER_PROXY or "
                          "BEARER_TOKEN_FILE, never in the URL)")
        return _validate_xrootd(text, parameter)
    if scheme == "file":
        if not text.startswith("file:///"):
            raise _refuse(parameter, text, "a file URL carries an absolute path (file:///...)")
        return os.path.abspath(text[len("file://"):])
    from ckpt_tasks.storage.registry import is_registered  # here: the registry imports this module

    if scheme and is_registered(scheme):
        return text  # a backend added to the registry checks its own locations
    raise _refuse(parameter, text, f"unknown scheme {scheme!r}" if scheme else "it starts with ':'")
