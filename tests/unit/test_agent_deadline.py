"""The coordinator's agent channels run gRPC's minimal stack (coordinator/agents.py),
which leaves out optional filters. A pull stream's limit must still hold against an
agent that takes the call and never answers (a hung process, a half-open link):
otherwise its orders would stay in flight for good."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from coordinator.agents import AgentClient

SETTINGS = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # an empty HTTP/2 SETTINGS frame
SETTINGS_ACK = bytes([0, 0, 0, 4, 1, 0, 0, 0, 0])


async def test_a_silent_agent_is_given_up_at_the_streams_limit() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Speaks HTTP/2 far enough for the call to be sent, then answers nothing."""
        writer.write(SETTINGS + SETTINGS_ACK)
        await writer.drain()
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = AgentClient(f"127.0.0.1:{port}", None)

    async def drain() -> None:
        async for _ in client.pull("node-a", b"", limit=1.0):
            pass

    try:
        with pytest.raises(grpc.RpcError) as raised:
            # Without the limit the call would wait for ever: fail instead of hanging.
            await asyncio.wait_for(drain(), 60)
    finally:
        await client.close()
        server.close()
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
