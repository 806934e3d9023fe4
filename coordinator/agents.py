"""gRPC I/O to the node agents: one asyncio channel per agent endpoint, mTLS when
configured. Thin: requests in, responses and event streams out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message

from common.wire import NODE_HEADER
from protos.fledged.agent.v1 import agent_pb2

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Message)
SERVICE = "/" + agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name


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


def moved_away(endpoint: str) -> grpc.aio.AioRpcError:
    """The error of a call on a channel we closed: its agent moved, or the pool was reset."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        f"the channel to {endpoint} was closed (its agent moved, or our certificate was renewed)",
    )


class AgentClient:
    def __init__(self, endpoint: str, tls: TlsConfig | None) -> None:
        self.endpoint = endpoint
        # One channel per node, so per-channel costs count 5,000 times. Channelz off:
        # its trace nodes cost ~3 KiB per channel. gRPC's retries off: their buffers
        # cost ~6 KiB per open pull stream, and every call already has a retry of ours
        # (a broken pull stream is ordered again, a failed listing taken again).
        options: list[tuple[str, Any]] = [
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.enable_channelz", 0),
            ("grpc.enable_retries", 0),
            # gRPC's minimal stack: its optional filters cost ~1.8 KiB per channel and
            # ~1.5 KiB per call (16 MiB at 5,000 nodes). What goes: the 4 MiB cap on a
            # received message (an agent's answers are small; a listing of 2,000 images
            # is under 1 MiB) and the 30-minute idle disconnect (the resync listing
            # keeps every channel busy anyway). Deadlines are still the call's own
            # (tests/unit/test_agent_deadline.py).
            ("grpc.minimal_stack", 1),
        ]
        if tls is not None:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
            # TLS frames of 4 KiB, not 16: the frame protector's buffers are per
            # connection (12 KiB less each, of ~120; orders and answers are small).
            options.append(("grpc.tsi.max_frame_size", 4096))
            self._channel = grpc.aio.secure_channel(endpoint, tls.credentials(), options=options)
        else:
            self._channel = grpc.aio.insecure_channel(endpoint, options=options)
        self._closed = False
        # PullImages with the request already serialized: a fleet-wide order keeps one
        # small bytes object per node for the stream's life, not a message tree.
        self._pull_bytes: Any = self._channel.unary_stream(
            f"{SERVICE}/PullImages",
            request_serializer=None,
            response_deserializer=agent_pb2.PullEvent.FromString,
        )

    async def close(self, grace: float | None = None) -> None:
        """Calls still running get `grace` seconds to end (None: cancelled now)."""
        self._closed = True
        await self._channel.close(grace)

    def _open(self) -> None:
        """A call on a closed channel fails as an agent out of reach, as callers
        expect; grpc.aio's own refusal is a UsageError, no RpcError. A call that
        waited its turn while its agent moved (a rollout) meets it."""
        if self._closed:
            raise moved_away(self.endpoint)

    def pull(self, node: str, request: bytes, limit: float) -> AsyncIterable[agent_pb2.PullEvent]:
        """`request`: a serialized PullImagesRequest. The call itself is iterated (no
        generator of ours around it: one layer less for each of a fleet's answers)."""
        self._open()
        call = self._pull_bytes(request, timeout=limit, metadata=_for(node))
        return cast(AsyncIterable[agent_pb2.PullEvent], call)

    async def _unary(
        self, method: str, request: Message, response: type[R], node: str, limit: float
    ) -> R:
        """A multicallable made for the call, not kept: a stub's five would cost a few
        KiB per channel for calls made once a resync period."""
        self._open()
        call = self._channel.unary_unary(
            f"{SERVICE}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )
        return await call(request, timeout=limit, metadata=_for(node))

    async def list_images(self, node: str) -> agent_pb2.ListImagesResponse:
        request = agent_pb2.ListImagesRequest()
        return await self._unary("ListImages", request, agent_pb2.ListImagesResponse, node, 30)

    async def node_info(self, node: str) -> agent_pb2.NodeInfo:
        request = agent_pb2.GetNodeInfoRequest()
        return await self._unary("GetNodeInfo", request, agent_pb2.NodeInfo, node, 30)

    async def set_pinned(
        self, node: str, images: Sequence[str], pinned: bool
    ) -> agent_pb2.SetPinnedResponse:
        request = agent_pb2.SetPinnedRequest(images=images, pinned=pinned)
        return await self._unary("SetPinned", request, agent_pb2.SetPinnedResponse, node, 60)

    async def cancel_pulls(self, node: str, images: Sequence[str]) -> agent_pb2.CancelPullsResponse:
        request = agent_pb2.CancelPullsRequest(images=images)
        return await self._unary("CancelPulls", request, agent_pb2.CancelPullsResponse, node, 30)

    async def remove(self, node: str, images: Sequence[str]) -> agent_pb2.RemoveImagesResponse:
        request = agent_pb2.RemoveImagesRequest(images=images)
        return await self._unary("RemoveImages", request, agent_pb2.RemoveImagesResponse, node, 300)


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

    async def reset(self, grace: float = 30.0) -> None:
        """Every channel goes (calls under way get `grace` seconds); the next `get` of
        an endpoint dials anew, with the credentials' files as they are then."""
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(agent.close(grace) for agent in clients))

    async def close(self) -> None:
        for agent in list(self._clients.values()):
            await agent.close()
        self._clients.clear()
