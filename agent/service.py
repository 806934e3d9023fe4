"""The gRPC servicer: converts protobuf to domain objects and back, nothing more.

Decisions live in puller.py and the runtime adapters; error categories map to proto
enums and gRPC status codes here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from common.wire import NODE_HEADER
from protos.fledged.agent.v1 import agent_pb2, agent_pb2_grpc

from . import __version__
from .errors import AgentError, Category
from .metrics import AgentMetrics
from .puller import Phase, Policy, PullEvent, PullManager, PullOrder
from .runtime import Credentials, ImageRecord, PinState, Runtime

log = logging.getLogger(__name__)

PHASES = {
    Phase.WAITING: agent_pb2.PHASE_WAITING,
    Phase.PULLING: agent_pb2.PHASE_PULLING,
    Phase.SUCCEEDED: agent_pb2.PHASE_SUCCEEDED,
    Phase.ALREADY_PRESENT: agent_pb2.PHASE_ALREADY_PRESENT,
    Phase.FAILED: agent_pb2.PHASE_FAILED,
    Phase.CANCELLED: agent_pb2.PHASE_CANCELLED,
}
CATEGORIES = {
    Category.NOT_FOUND: agent_pb2.ERROR_CATEGORY_NOT_FOUND,
    Category.UNAUTHORIZED: agent_pb2.ERROR_CATEGORY_UNAUTHORIZED,
    Category.REGISTRY_UNAVAILABLE: agent_pb2.ERROR_CATEGORY_REGISTRY_UNAVAILABLE,
    Category.DEADLINE_EXCEEDED: agent_pb2.ERROR_CATEGORY_DEADLINE_EXCEEDED,
    Category.INVALID_REFERENCE: agent_pb2.ERROR_CATEGORY_INVALID_REFERENCE,
    Category.INSUFFICIENT_DISK: agent_pb2.ERROR_CATEGORY_INSUFFICIENT_DISK,
    Category.RUNTIME_UNAVAILABLE: agent_pb2.ERROR_CATEGORY_RUNTIME_UNAVAILABLE,
    Category.INTERNAL: agent_pb2.ERROR_CATEGORY_INTERNAL,
}
STATUS_CODES = {
    Category.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Category.INVALID_REFERENCE: grpc.StatusCode.INVALID_ARGUMENT,
    Category.RUNTIME_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Category.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
}
OUTCOMES = frozenset({Phase.SUCCEEDED, Phase.ALREADY_PRESENT, Phase.FAILED, Phase.CANCELLED})


def reported(progress: int, phase: Phase) -> bool:
    """Whether a stream that asked for `progress` carries an event of `phase`."""
    return progress != agent_pb2.PROGRESS_OUTCOMES or phase in OUTCOMES


PINS = {
    PinState.PINNED: agent_pb2.PIN_STATE_PINNED,
    PinState.UNPINNED: agent_pb2.PIN_STATE_UNPINNED,
    PinState.UNSUPPORTED: agent_pb2.PIN_STATE_UNSUPPORTED,
}


def order_from_proto(pull: agent_pb2.ImagePull) -> PullOrder:
    return PullOrder(
        image=pull.image,
        policy=Policy.ALWAYS
        if pull.policy == agent_pb2.PULL_POLICY_ALWAYS
        else Policy.IF_NOT_PRESENT,
        credentials=tuple(Credentials.of(c) for c in pull.credentials),
        deadline=pull.deadline.ToTimedelta().total_seconds() if pull.HasField("deadline") else None,
        pin=pull.pin,
        replace=pull.replace,
    )


def event_to_proto(event: PullEvent) -> agent_pb2.PullEvent:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(event.time * 1e9))
    msg = agent_pb2.PullEvent(
        image=event.image,
        phase=PHASES[event.phase],
        bytes_done=event.bytes_done,
        bytes_total=event.bytes_total,
        repo_digest=event.repo_digest,
        error_message=event.message,
        time=stamp,
    )
    if event.record is not None:
        msg.image_id = event.record.id
        msg.size = event.record.size
    if event.pin is not None:
        msg.pin = PINS[event.pin]
    if event.category is not None:
        msg.error_category = CATEGORIES[event.category]
    return msg


def image_to_proto(record: ImageRecord) -> agent_pb2.ImageInfo:
    return agent_pb2.ImageInfo(
        id=record.id,
        repo_tags=record.repo_tags,
        repo_digests=record.repo_digests,
        size=record.size,
        pin=PINS[record.pin],
        pinned_by_fledged=record.pin_owned,
    )


async def _abort(context: grpc.aio.ServicerContext, err: AgentError) -> None:  # type: ignore[type-arg]
    await context.abort(STATUS_CODES.get(err.category, grpc.StatusCode.INTERNAL), err.message)


class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(
        self, manager: PullManager, runtime: Runtime, node_name: str, metrics: AgentMetrics
    ) -> None:
        self._manager = manager
        self._runtime = runtime
        self._node_name = node_name
        self._metrics = metrics

    async def PullImages(
        self,
        request: agent_pb2.PullImagesRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[agent_pb2.PullEvent]:
        log.info(
            "pull batch %s: %d image(s)%s: %s",
            request.request_id or "-",
            len(request.images),
            " (outcomes only)" if request.progress == agent_pb2.PROGRESS_OUTCOMES else "",
            ", ".join(p.image for p in request.images),
        )
        queue: asyncio.Queue[PullEvent | None] = asyncio.Queue()

        async def follow(order: PullOrder) -> None:
            try:
                async for event in self._manager.pull(order):
                    queue.put_nowait(event)
            finally:
                queue.put_nowait(None)

        tasks = [asyncio.create_task(follow(order_from_proto(p))) for p in request.images]
        open_orders = len(tasks)
        try:
            while open_orders:
                event = await queue.get()
                if event is None:
                    open_orders -= 1
                    continue
                if event.phase == Phase.FAILED:
                    log.warning(
                        "pull of %s failed (%s): %s", event.image, event.category, event.message
                    )
                if reported(request.progress, event.phase):
                    yield event_to_proto(event)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def CancelPulls(
        self,
        request: agent_pb2.CancelPullsRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> agent_pb2.CancelPullsResponse:
        log.info(
            "cancel the pulls of %d image(s): %s", len(request.images), ", ".join(request.images)
        )
        return agent_pb2.CancelPullsResponse(
            results=[
                agent_pb2.CancelResult(image=image, was_running=self._manager.cancel(image))
                for image in request.images
            ]
        )

    async def RemoveImages(
        self,
        request: agent_pb2.RemoveImagesRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> agent_pb2.RemoveImagesResponse:
        results = []
        for image in request.images:
            try:
                was_present = await self._runtime.remove(image)
                results.append(agent_pb2.RemoveResult(image=image, was_present=was_present))
                log.info("removed %s (was present: %s)", image, was_present)
            except AgentError as err:
                results.append(
                    agent_pb2.RemoveResult(
                        image=image,
                        error_category=CATEGORIES[err.category],
                        error_message=err.message,
                    )
                )
        return agent_pb2.RemoveImagesResponse(results=results)

    async def SetPinned(
        self,
        request: agent_pb2.SetPinnedRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> agent_pb2.SetPinnedResponse:
        log.info(
            "%s %d image(s): %s",
            "pin" if request.pinned else "unpin",
            len(request.images),
            ", ".join(request.images),
        )
        results = []
        for image in request.images:
            try:
                state = await self._runtime.set_pinned(image, request.pinned)
                results.append(agent_pb2.PinResult(image=image, pin=PINS[state]))
            except AgentError as err:
                results.append(
                    agent_pb2.PinResult(
                        image=image,
                        error_category=CATEGORIES[err.category],
                        error_message=err.message,
                    )
                )
        return agent_pb2.SetPinnedResponse(results=results)

    async def ListImages(
        self,
        request: agent_pb2.ListImagesRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> agent_pb2.ListImagesResponse:
        try:
            records = await self._runtime.list()
        except AgentError as err:
            await _abort(context, err)
            raise
        self._metrics.pinned_images.set(sum(r.pin == PinState.PINNED for r in records))
        return agent_pb2.ListImagesResponse(
            images=[image_to_proto(r) for r in records], pulling=self._manager.running()
        )

    async def GetNodeInfo(
        self,
        request: agent_pb2.GetNodeInfoRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> agent_pb2.NodeInfo:
        try:
            info = await self._runtime.info()
            fs = await self._runtime.image_fs()
        except AgentError as err:
            await _abort(context, err)
            raise
        return agent_pb2.NodeInfo(
            node_name=self._node_name,
            runtime_name=info.name,
            runtime_version=info.version,
            runtime_api=info.api,
            image_fs_used_bytes=fs.used,
            image_fs_capacity_bytes=fs.capacity,
            agent_version=__version__,
            pinning_supported=info.pinning_supported,
        )


class NodeGuard(grpc.aio.ServerInterceptor):
    """Refuses calls whose `x-fledged-node` names another node: an order sent to the
    wrong agent (a stale Lease, a reused pod IP) must not act on this node."""

    def __init__(self, node_name: str) -> None:
        self._node = node_name

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        wanted = dict(details.invocation_metadata or ()).get(NODE_HEADER)
        if handler is None or wanted is None or wanted == self._node:
            return handler
        message = f"this agent serves node {self._node!r}, not {wanted!r}"

        async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)

        async def refuse_stream(
            request: object,
            context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
        ) -> AsyncIterator[None]:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)
            yield  # pragma: no cover - abort raises

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                refuse_stream, handler.request_deserializer, handler.response_serializer
            )
        return grpc.unary_unary_rpc_method_handler(
            refuse, handler.request_deserializer, handler.response_serializer
        )
