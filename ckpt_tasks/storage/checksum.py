"""adler32, the checksum XRootD servers compute, over local files."""
from __future__ import annotations

import os
import zlib

_CHUNK = 8 << 20


def adler32_of_file(path: str | os.PathLike) -> tuple[int, int]:
    """Return ``(size, adler32)`` of a local file, read in chunks."""
    value, size = 1, 0
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            value = zlib.adler32(chunk, value)
            size += len(chunk)
    return size, value
