"""How the agent reads its runtime's answers. Which runtime answers on the socket is
read from containerd's Version service (again every minute: an upgrade in place).
Only "no such service" means another runtime; a failed call (a busy node's timeout at
boot) must be asked again, not cached as "not containerd" for the agent's life (that
turned pins and safe untags off until a restart). A pull the runtime gave up early
with DeadlineExceeded keeps the runtime's words. The runtime here is a stand-in serving
only those calls: what is tested is the agent's reading of them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agent.errors import AgentError, Category
from agent.runtime import cri
from agent.runtime.cri import CriRuntime
from protos.containerd.services.version.v1 import version_pb2, version_pb2_grpc
from protos.cri.runtime.v1 import api_pb2, api_pb2_grpc


class _Version(version_pb2_grpc.VersionServicer):
    def __init__(self, failures: list[grpc.StatusCode]) -> None:
        self.failures = failures
        self.calls = 0

    async def Version(
        self, request: object, context: grpc.aio.ServicerContext[object, object]
    ) -> version_pb2.VersionResponse:
        self.calls += 1
        if self.failures:
            await context.abort(self.failures.pop(0), "busy")
        return version_pb2.VersionResponse(version="v1.7.24")


class _Images(api_pb2_grpc.ImageServiceServicer):
    """PullImage only: gives up at once as CRI-O does on an unreachable registry, or
    takes longer than any deadline."""

    def __init__(self, hang: bool, reset_at: float = 0.0) -> None:
        self.hang = hang
        self.reset_at = reset_at

    async def PullImage(
        self, request: api_pb2.PullImageRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> api_pb2.PullImageResponse:
        if self.hang:
            await asyncio.sleep(30)
        if self.reset_at:  # the runtime's end of the deadline, a moment before ours
            await asyncio.sleep(self.reset_at)
            await context.abort(grpc.StatusCode.CANCELLED, "Stream removed")
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, CRIO_GAVE_UP)
        raise AssertionError("abort returns never")


CRIO_GAVE_UP = (
    "initializing source docker://reg.example/app:v1: pinging container registry "
    'reg.example: Get "https://reg.example/v2/": context deadline exceeded'
)


@contextlib.asynccontextmanager
async def _runtime(
    tmp_path: Path, servicer: _Version | None, images: _Images | None = None
) -> AsyncIterator[CriRuntime]:
    """The agent's CriRuntime against a stand-in serving only the given calls."""
    server = grpc.aio.server()
    if servicer is not None:
        version_pb2_grpc.add_VersionServicer_to_server(servicer, server)
    if images is not None:
        api_pb2_grpc.add_ImageServiceServicer_to_server(images, server)
    endpoint = f"unix://{tmp_path}/runtime.sock"
    server.add_insecure_port(endpoint)
    await server.start()
    runtime = CriRuntime(endpoint)
    try:
        yield runtime
    finally:
        await runtime.close()
        await server.stop(None)


@pytest.mark.parametrize("failure", [grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN])
async def test_a_failed_version_call_is_asked_again(
    tmp_path: Path, failure: grpc.StatusCode
) -> None:
    servicer = _Version([failure])
    async with _runtime(tmp_path, servicer) as runtime:
        with pytest.raises(AgentError):
            await runtime._pinning()
        assert await runtime._pinning() is True
        assert await runtime._pinning() is True
        assert servicer.calls == 2  # asked again once, then known


async def test_no_version_service_means_another_runtime(tmp_path: Path) -> None:
    async with _runtime(tmp_path, None) as runtime:
        assert await runtime._pinning() is False
        assert await runtime._containerd_or_not() is False


async def test_a_pull_is_not_failed_by_a_version_call_that_failed(tmp_path: Path) -> None:
    """Byte progress is the only thing a pull wants of it."""
    async with _runtime(tmp_path, _Version([grpc.StatusCode.DEADLINE_EXCEEDED])) as runtime:
        assert await runtime._containerd_or_not() is False
        assert await runtime._containerd_or_not() is True


@pytest.mark.parametrize("hang", [False, True])
async def test_a_deadline_is_ours_only_when_ours_ran_out(tmp_path: Path, hang: bool) -> None:
    images = _Images(hang)  # type: ignore[abstract]  # its other calls are never made
    async with _runtime(tmp_path, None, images) as runtime:
        with pytest.raises(AgentError) as failed:
            await runtime.pull("reg.example/app:v1", [], 0.5, lambda progress: None)
        assert failed.value.category == Category.DEADLINE_EXCEEDED
        if hang:
            assert failed.value.message == "pull of reg.example/app:v1 did not finish within 0.5s"
        else:
            assert failed.value.message == CRIO_GAVE_UP


async def test_a_stream_reset_at_our_deadline_is_our_deadline(tmp_path: Path) -> None:
    """Seen in CI: containerd reset the stream at the deadline just before the client's
    own timer fired ("Stream removed", CANCELLED), which read as an Internal failure."""
    images = _Images(hang=False, reset_at=0.4)  # type: ignore[abstract]  # its other calls are never made
    async with _runtime(tmp_path, None, images) as runtime:
        with pytest.raises(AgentError) as failed:
            await runtime.pull("reg.example/app:v1", [], 0.5, lambda progress: None)
        assert failed.value.category == Category.DEADLINE_EXCEEDED
        assert failed.value.message == "pull of reg.example/app:v1 did not finish within 0.5s"


class _Upgraded(_Version):
    """containerd 1.6, then down for its upgrade, then 1.7."""

    def __init__(self) -> None:
        super().__init__([])
        self.answers: list[str | grpc.StatusCode] = [
            "v1.6.20",
            grpc.StatusCode.UNAVAILABLE,
            "v1.7.24",
        ]

    async def Version(
        self, request: object, context: grpc.aio.ServicerContext[object, object]
    ) -> version_pb2.VersionResponse:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, grpc.StatusCode):
            await context.abort(answer, "restarting")
        return version_pb2.VersionResponse(version=str(answer))


async def test_a_runtime_upgraded_in_place_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The identity was read once for the agent's life: after containerd went from 1.6
    to 1.7 under a running agent, nothing was pinned until the agent restarted."""
    monkeypatch.setattr(cri, "IDENTITY_SECONDS", 0.0)
    async with _runtime(tmp_path, _Upgraded()) as runtime:
        assert await runtime._pinning() is False  # 1.6
        assert await runtime._pinning() is False  # down: what was known stands
        assert await runtime._pinning() is True  # 1.7
