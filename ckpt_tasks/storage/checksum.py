"""adler32, the checksum XRootD servers compute, over bytes and local files.

zlib-ng's adler32 is vectorised (about 0.1 s/GiB here against 0.35 s/GiB for
the stdlib's zlib, benchmarks/README.md): every checked transfer pays for it in
full, so it is the one used everywhere. Both give the same values.
"""
from __future__ import annotations

import os

from zlib_ng.zlib_ng import adler32

__all__ = ["adler32", "adler32_of_file"]

_CHUNK = 8 << 20


def adler32_of_file(path: str | os.PathLike) -> tuple[int, int]:
    """Return ``(size, adler32)`` of a local file, read in chunks."""
    value, size = 1, 0
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            value = adler32(chunk, value)
            size += len(chunk)
    return size, value
