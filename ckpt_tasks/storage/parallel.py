"""Independent storage requests sent together: their round trips overlap instead of adding up.

Over a wide-area link each request costs a round trip; the XRootD client releases the
GIL while it waits, so requests issued from several threads are on the wire at once
(benchmarks/bench_wan.py counts the sequential round trips).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

#: the most requests in flight at once from one call (retention deletes, manifest reads)
MAX_IN_FLIGHT = 16


def together(*operations: Callable[[], Any]) -> list[Any]:
    """Run ``operations`` at once; their results in order. Every one runs to its end before
    the first error (in the order given) is raised, so none is left running behind."""
    return each(lambda operation: operation(), operations)


def settled(*operations: Callable[[], Any]) -> list[tuple[Any, BaseException | None]]:
    """Run ``operations`` at once; for each, in order, ``(result, None)`` or ``(None, error)``
    (for a caller that must undo what succeeded when another failed)."""
    if len(operations) <= 1:
        outcomes = []
        for operation in operations:
            try:
                outcomes.append((operation(), None))
            except BaseException as error:  # handed to the caller, which raises it
                outcomes.append((None, error))
        return outcomes
    with ThreadPoolExecutor(min(MAX_IN_FLIGHT, len(operations)), thread_name_prefix="ckpt-request") as pool:
        futures = [pool.submit(operation) for operation in operations]
        errors = [future.exception() for future in futures]  # waits for every one
    return [(None, error) if error is not None else (future.result(), None)
            for future, error in zip(futures, errors)]


def each(function: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """``function(item)`` for every item, at most ``MAX_IN_FLIGHT`` at once; the results in
    order, or the first error (in order) once all have ended."""
    outcomes = settled(*(lambda item=item: function(item) for item in items))
    error = next((e for _, e in outcomes if e is not None), None)
    if error is not None:
        raise error
    return [result for result, _ in outcomes]
