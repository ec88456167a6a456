"""A delaying TCP proxy on loopback that stands in for a wide-area link (no ``netem`` here).

Every connection it accepts is forwarded to one upstream address; each chunk of bytes
is held for the one-way delay (and, with a bandwidth limit, for its time on the line)
before it is passed on, in order, per direction. It counts round trips as request and
response turnarounds over all connections together: a round trip begins with
client-to-server bytes that follow server-to-client bytes (or start the count), at least
half a round-trip time after the round trip before it began, and each new connection
costs one more (its TCP handshake, delayed too). A request that depends on an answer goes
out a whole round-trip time after the request before it at the earliest; requests sent
together (parallel threads, several connections) fall within the same half, even when one
thread starts a few milliseconds after another. So the count is the number of
*sequential* round trips, which is what a delay multiplies. (Counting every burst after
an answer instead counted two chains of requests a millisecond apart twice: their
answers came in between.)

It runs in a process of its own (``WanProxy.start``), so the delays do not compete
for the GIL with the process being measured.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import socket
import time

#: indices into the shared counters (ROUND_STARTED: when the current round trip began, in microseconds)
ROUND_TRIPS, CONNECTIONS, BYTES_UP, BYTES_DOWN, LAST_DIRECTION, ROUND_STARTED = range(6)
_UP, _DOWN = 1, 2


def _count(counters, direction: int, size: int, now: float, rtt: float) -> None:
    with counters.get_lock():
        if direction == _UP and counters[LAST_DIRECTION] != _UP and (
                counters[ROUND_TRIPS] == 0 or now * 1e6 - counters[ROUND_STARTED] >= rtt * 1e6 / 2):
            counters[ROUND_TRIPS] += 1
            counters[ROUND_STARTED] = int(now * 1e6)
        counters[LAST_DIRECTION] = direction
        counters[BYTES_UP if direction == _UP else BYTES_DOWN] += size


async def _forward(reader, writer, direction: int, delay: float, bandwidth: float | None, counters,
                   connect: float = 0.0) -> None:
    """Copy ``reader`` to ``writer``, each chunk due ``delay`` seconds after it arrived, the
    first one ``connect`` seconds later still (the TCP handshake the loopback skipped)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    line_free = 0.0  # when the (emulated) line has sent what it holds

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    sender = asyncio.ensure_future(deliver())
    try:
        while data := await reader.read(1 << 16):
            now = loop.time()
            _count(counters, direction, len(data), now, 2 * delay)
            if bandwidth:
                line_free = max(line_free, now) + len(data) / bandwidth
                now = line_free
            queue.put_nowait((now + delay + connect, data))
            connect = 0.0
    except ConnectionError:
        pass
    queue.put_nowait((loop.time() + delay, None))
    try:
        await sender
    except ConnectionError:
        pass


async def _serve(listener: socket.socket, upstream: tuple[str, int], delay: float, bandwidth: float | None,
                 counters) -> None:
    async def handle(client_reader, client_writer) -> None:
        # asyncio leaves Nagle on for sockets accepted from a listener made with proto 0: a
        # small answer right behind another then waited for the client's delayed ACK (40 ms).
        client_writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with counters.get_lock():
            # A real link spends one round trip on the TCP handshake before the first byte.
            counters[CONNECTIONS] += 1
            counters[ROUND_TRIPS] += 1
            # The client's first request leaves a round trip after the handshake began.
            counters[ROUND_STARTED] = int((asyncio.get_running_loop().time() - 2 * delay) * 1e6)
            counters[LAST_DIRECTION] = _DOWN
        try:
            server_reader, server_writer = await asyncio.open_connection(*upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_forward(client_reader, server_writer, _UP, delay, bandwidth, counters, 2 * delay),
                             _forward(server_reader, client_writer, _DOWN, delay, bandwidth, counters))
        for writer in (client_writer, server_writer):
            writer.close()

    server = await asyncio.start_server(handle, sock=listener)
    async with server:
        await server.serve_forever()


def _run(listener: socket.socket, upstream, delay, bandwidth, counters) -> None:
    asyncio.run(_serve(listener, upstream, delay, bandwidth, counters))


class WanProxy:
    """A proxy process on a free loopback port in front of ``upstream`` (host, port).

    ``rtt``: the added round-trip time in seconds (half of it each way); ``bandwidth``:
    bytes per second per direction and connection (None: no limit).
    """

    def __init__(self, upstream: tuple[str, int], rtt: float, bandwidth: float | None = None):
        self.upstream, self.rtt, self.bandwidth = upstream, rtt, bandwidth
        context = multiprocessing.get_context("spawn")  # no fork of a process holding an XRootD client
        self._counters = context.Array("q", 6)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._process = context.Process(target=_run, daemon=True,
                                         args=(self._listener, upstream, rtt / 2, bandwidth, self._counters))

    def start(self) -> "WanProxy":
        self._process.start()
        return self

    def stop(self) -> None:
        self._process.terminate()
        self._process.join(5)
        self._listener.close()

    def reset(self) -> None:
        """Zero the counters (the next request starts round trip 1)."""
        with self._counters.get_lock():
            for index in range(len(self._counters)):
                self._counters[index] = 0

    def settle(self, quiet: float = 0.0) -> None:
        """Wait until bytes still in flight have passed (at least one round trip)."""
        time.sleep(self.rtt + 0.02 + quiet)

    @property
    def round_trips(self) -> int:
        return self._counters[ROUND_TRIPS]

    @property
    def connections(self) -> int:
        return self._counters[CONNECTIONS]
