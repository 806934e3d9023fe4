"""gRPC I/O to the node agents: one asyncio channel per agent endpoint, mTLS when
configured. Thin: requests in, responses and event streams out."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from common.wire import NODE_HEADER
from protos.fledged.agent.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsConfig:
    ca: Path
    cert: Path
    key: Path
    server_name: str = "fledged-agent"

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes()
        )


def _for(node: str) -> tuple[tuple[str, str | bytes], ...]:
    """Every call names its node, so an agent refuses orders meant for another one."""
    return ((NODE_HEADER, node),)


class AgentClient:
    def __init__(self, endpoint: str, tls: TlsConfig | None) -> None:
        self.endpoint = endpoint
        # Channelz off: its trace nodes cost ~3 KiB per channel, one channel per node.
        options: list[tuple[str, Any]] = [
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.enable_channelz", 0),
        ]
        if tls is not None:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.aio.secure_channel(endpoint, tls.credentials(), options=options)
        else:
            self._channel = grpc.aio.insecure_channel(endpoint, options=options)
        self._stub = agent_pb2_grpc.AgentStub(self._channel)
        # PullImages with the request already serialized: a fleet-wide order keeps one
        # small bytes object per node for the stream's life, not a message tree.
        self._pull_bytes: Any = self._channel.unary_stream(
            "/fledged.agent.v1.Agent/PullImages",
            request_serializer=None,
            response_deserializer=agent_pb2.PullEvent.FromString,
        )

    async def close(self, grace: float | None = None) -> None:
        """Calls still running get `grace` seconds to end (None: cancelled now)."""
        await self._channel.close(grace)

    async def pull(
        self, node: str, request: bytes, limit: float
    ) -> AsyncIterator[agent_pb2.PullEvent]:
        """`request`: a serialized PullImagesRequest."""
        call = self._pull_bytes(request, timeout=limit, metadata=_for(node))
        async for event in call:
            yield event

    async def list_images(self, node: str) -> agent_pb2.ListImagesResponse:
        return await self._stub.ListImages(
            agent_pb2.ListImagesRequest(), timeout=30, metadata=_for(node)
        )

    async def node_info(self, node: str) -> agent_pb2.NodeInfo:
        return await self._stub.GetNodeInfo(
            agent_pb2.GetNodeInfoRequest(), timeout=30, metadata=_for(node)
        )

    async def set_pinned(
        self, node: str, images: Sequence[str], pinned: bool
    ) -> agent_pb2.SetPinnedResponse:
        return await self._stub.SetPinned(
            agent_pb2.SetPinnedRequest(images=images, pinned=pinned),
            timeout=60,
            metadata=_for(node),
        )

    async def remove(self, node: str, images: Sequence[str]) -> agent_pb2.RemoveImagesResponse:
        return await self._stub.RemoveImages(
            agent_pb2.RemoveImagesRequest(images=images), timeout=300, metadata=_for(node)
        )


class AgentPool:
    """Channels by endpoint; a node whose agent moved gets a new one."""

    def __init__(self, tls: TlsConfig | None) -> None:
        self._tls = tls
        self._clients: dict[str, AgentClient] = {}

    def __len__(self) -> int:
        return len(self._clients)

    def discard(self, endpoint: str) -> AgentClient | None:
        """Forgets the endpoint's channel (the caller closes it); a later `get` dials anew."""
        return self._clients.pop(endpoint, None)

    def get(self, endpoint: str) -> AgentClient:
        agent = self._clients.get(endpoint)
        if agent is None:
            agent = self._clients[endpoint] = AgentClient(endpoint, self._tls)
        return agent

    async def close(self) -> None:
        for agent in list(self._clients.values()):
            await agent.close()
        self._clients.clear()
