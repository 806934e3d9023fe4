"""A TCP proxy in front of a registry that can throttle or stall, to make pulls slow
(progress, overlap, concurrency) or hang (deadlines) on demand. Loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable

from .procs import free_port


class RegistryProxy:
    """Forwards <listen_host>:<port> to `upstream` (host:port) in a background thread.
    Also serves as a plain TCP relay (the apiserver for pods of kubelet nodes)."""

    def __init__(
        self,
        upstream: str,
        rate: float | None = None,
        stall: bool = False,
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.upstream_host, upstream_port = upstream.rsplit(":", 1)
        self.upstream_port = int(upstream_port)
        self.rate = rate  # bytes per second towards the client, None for unlimited
        self.stall = stall  # accept connections and never answer
        self.port = free_port()
        self.listen_host = listen_host
        self.host = f"{listen_host}:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"proxy-{self.port}", daemon=True)
        self._server: asyncio.Server | None = None
        self._next_slot = 0.0  # the rate is shared by all connections, as one link would be
        self.open_connections = 0  # clients connected now (a cancelled pull closes its own)
        self.bytes_sent = 0  # towards the clients, all connections together
        # Drop what the connections open now carry, both ways, keeping them open: what a
        # half-open connection does (new connections are not affected).
        self._dropping: set[int] = set()
        self._live: set[int] = set()
        self._next_id = 0

    def start(self) -> RegistryProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("registry proxy did not start")
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return  # stopped already
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> RegistryProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, self.listen_host, self.port)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        try:
            await self._forward(reader, writer)
        finally:
            self.open_connections -= 1

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.stall:
            with contextlib.suppress(Exception):
                await reader.read()  # hold the connection open until the client gives up
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            writer.close()
            return
        self._next_id += 1
        conn = self._next_id
        self._live.add(conn)
        try:
            await asyncio.gather(
                self._pipe(conn, reader, up_writer, None),
                self._pipe(conn, up_reader, writer, self._throttle if self.rate else None, True),
                return_exceptions=True,
            )
        finally:
            self._live.discard(conn)
            self._dropping.discard(conn)

    def sent_during(self, seconds: float) -> int:
        """Bytes sent towards the clients over the next `seconds` (0: the transfers
        have stopped)."""
        before = self.bytes_sent
        time.sleep(seconds)
        return self.bytes_sent - before

    def black_hole(self) -> None:
        """The connections open now go silent (their bytes dropped), as after a link
        failure no FIN crossed; connections made later work."""
        self._loop.call_soon_threadsafe(lambda: self._dropping.update(self._live))

    async def _throttle(self, size: int) -> None:
        assert self.rate
        now = time.monotonic()
        self._next_slot = max(self._next_slot, now) + size / self.rate
        await asyncio.sleep(self._next_slot - now)

    async def _pipe(
        self,
        conn: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        throttle: Callable[[int], Awaitable[None]] | None,
        to_client: bool = False,
    ) -> None:
        chunk = 16 * 1024
        try:
            while data := await reader.read(chunk):
                if conn in self._dropping:
                    continue
                if throttle:
                    await throttle(len(data))
                writer.write(data)
                await writer.drain()
                if to_client:
                    self.bytes_sent += len(data)
        finally:
            with contextlib.suppress(Exception):
                writer.close()
