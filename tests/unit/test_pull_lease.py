"""When a pull's lease goes and when it stays, against a stand-in of containerd's
leases service over real grpc.aio (the real containerd keeping a cut pull's layers is
proven in tests/agent: test_a_pull_cut_by_its_deadline_keeps_its_layers_for_the_retry)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from agent.errors import AgentError, Category
from agent.runtime.pull_lease import EXPIRE_LABEL, LEASE_HEADER, PullLeases, lease_id
from protos.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc

REF = "reg.io/app/a:v1"


class _Leases(leases_pb2_grpc.LeasesServicer):
    def __init__(self, refuse: grpc.StatusCode | None = None) -> None:
        self.held: dict[str, dict[str, str]] = {}
        self.resources: dict[str, list[tuple[str, str]]] = {}  # lease -> (id, type)
        self.refuse = refuse

    async def Create(self, request: Any, context: Any) -> Any:
        if self.refuse is not None:
            await context.abort(self.refuse, "no")
        if request.id in self.held:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "exists")
        self.held[request.id] = dict(request.labels)
        return leases_pb2.CreateResponse(lease=leases_pb2.Lease(id=request.id))

    async def ListResources(self, request: Any, context: Any) -> Any:
        if self.refuse is not None:
            await context.abort(self.refuse, "no")
        if request.id not in self.held:
            await context.abort(grpc.StatusCode.NOT_FOUND, "none")
        resources = [leases_pb2.Resource(id=i, type=t) for i, t in self.resources[request.id]]
        return leases_pb2.ListResourcesResponse(resources=resources)

    async def Delete(self, request: Any, context: Any) -> Any:
        if self.held.pop(request.id, None) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "none")
        return empty_pb2.Empty()


@contextlib.asynccontextmanager
async def _leases_of(servicer: _Leases) -> AsyncIterator[PullLeases]:
    server = grpc.aio.server()
    leases_pb2_grpc.add_LeasesServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield PullLeases(leases_pb2_grpc.LeasesStub(channel), (("containerd-namespace", "k8s.io"),))
    finally:
        await channel.close()
        await server.stop(None)


async def test_a_lease_stays_only_for_failures_a_retry_can_resume() -> None:
    servicer = _Leases()
    async with _leases_of(servicer) as leases:
        await _each_outcome(servicer, leases)


async def _each_outcome(servicer: _Leases, leases: PullLeases) -> None:
    lease = lease_id(REF)
    async with leases.held(REF) as metadata:
        assert metadata == ((LEASE_HEADER, lease),)
        assert EXPIRE_LABEL in servicer.held[lease]  # containerd collects it by itself
    assert not servicer.held  # a success: the image holds its content now
    for category, kept in [
        (Category.DEADLINE_EXCEEDED, True),
        (Category.REGISTRY_UNAVAILABLE, True),
        (Category.NOT_FOUND, False),
        (Category.INSUFFICIENT_DISK, False),
    ]:
        with pytest.raises(AgentError):
            async with leases.held(REF):
                raise AgentError(category, "x")
        assert (lease in servicer.held) is kept, category
    # A retry finds its lease made already and pulls under it; a cancel lets it go.
    async with leases.held(REF):
        pass
    with pytest.raises(AgentError):
        async with leases.held(REF):
            raise AgentError(Category.DEADLINE_EXCEEDED, "x")

    async def cancelled() -> None:
        async with leases.held(REF) as metadata:
            assert metadata == ((LEASE_HEADER, lease),)
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await cancelled()
    assert not servicer.held


async def test_a_pull_that_ends_first_leaves_the_lease_to_the_other_one() -> None:
    """Two pulls of one image with other credentials run at once (a Secret fixed while
    the old one's pull runs): the refused one must not take the lease from under the
    other, whose downloads it protects."""
    servicer = _Leases()
    async with _leases_of(servicer) as leases, leases.held(REF):
        with pytest.raises(AgentError):
            async with leases.held(REF):
                raise AgentError(Category.UNAUTHORIZED, "refused")
        assert lease_id(REF) in servicer.held
    assert not servicer.held  # the last one's success lets it go


async def test_a_pull_cut_by_the_agents_stop_keeps_its_lease_for_the_next_agent() -> None:
    """A rolling update of the agents mid-pull: the next agent's pull finds the lease
    (ALREADY_EXISTS) and resumes what the stopped one downloaded."""
    servicer = _Leases()
    async with _leases_of(servicer) as leases:
        leases.stopping()

        async def cut() -> None:
            async with leases.held(REF):
                raise asyncio.CancelledError

        with pytest.raises(asyncio.CancelledError):
            await cut()
        assert lease_id(REF) in servicer.held
        async with leases.held(REF) as metadata:  # what the next agent does
            assert metadata == ((LEASE_HEADER, lease_id(REF)),)
        assert not servicer.held


async def test_a_resumed_pull_learns_the_blobs_its_lease_holds() -> None:
    """For its byte progress: its manifest, stored by the attempt that was cut."""
    servicer = _Leases()
    async with _leases_of(servicer) as leases:
        assert await leases.contents(REF) == []  # no lease yet: a first attempt
        servicer.held[lease_id(REF)] = {}
        servicer.resources[lease_id(REF)] = [
            ("sha256:m", "content"),
            ("sha256:l", "content"),
            ("k8s.io/1/extract", "snapshots/overlayfs"),
        ]
        assert await leases.contents(REF) == ["sha256:m", "sha256:l"]


async def test_without_a_leases_service_the_pull_runs_as_containerds_own() -> None:
    async with (
        _leases_of(_Leases(refuse=grpc.StatusCode.UNIMPLEMENTED)) as leases,
        leases.held(REF) as metadata,
    ):
        assert metadata == ()
        assert await leases.contents(REF) == []


def test_lease_ids_are_one_per_image_and_valid_for_containerd() -> None:
    assert lease_id("reg.io/app/a:v1") == lease_id("reg.io/app/a:v1")
    assert lease_id("nginx") == lease_id("docker.io/library/nginx:latest")
    assert lease_id("reg.io/app/a:v1") != lease_id("reg.io/app/a:v2")
    assert all(c.isalnum() or c == "-" for c in lease_id("reg.io/app/a:v1"))
