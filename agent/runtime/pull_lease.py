"""A containerd lease for each image being pulled through CRI, named in the pull's
`containerd-lease` header: containerd then keeps what the pull downloaded under it
instead of dropping it with the call. A pull cut by its deadline or by a broken link
(an edge node's) keeps its finished layers, and the retry downloads only the rest.

The lease goes with the pull's success (the image holds its content then), with a
failure no retry can resume from (not found, refused, the disk guard), and with a
cancel; a resumable failure keeps it for the retries, and so does a pull cut by the
agent's stop, for the next agent (a rolling update) to resume. It expires by itself
(containerd's garbage collection) an hour after it was made, so a pull given up for
good holds no disk past that."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc

from common.reference import normalize
from protos.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc

from ..errors import AgentError, Category

log = logging.getLogger(__name__)

LEASE_HEADER = "containerd-lease"
EXPIRE_LABEL = "containerd.io/gc.expire"
KEEP_FOR = timedelta(hours=1)
RESUMABLE = frozenset({Category.DEADLINE_EXCEEDED, Category.REGISTRY_UNAVAILABLE})
Metadata = tuple[tuple[str, str | bytes], ...]


def lease_id(ref: str) -> str:
    """One per image (the same for every attempt), in containerd's identifier syntax."""
    return "kubefledged-pull-" + hashlib.sha256(normalize(ref).encode()).hexdigest()[:24]


class PullLeases:
    def __init__(self, stub: leases_pb2_grpc.LeasesAsyncStub, metadata: Metadata) -> None:
        self._stub = stub
        self._metadata = metadata
        # Pulls under each lease now: two pulls of one image with other credentials (a
        # Secret fixed while the old one's pull runs) share it, and the first to end
        # must not take it from under the other.
        self._holders: Counter[str] = Counter()
        self._deleting: dict[str, asyncio.Future[None]] = {}
        self._stopping = False

    def stopping(self) -> None:
        """Pulls cut from now on are cut by the agent's stop: they keep their lease."""
        self._stopping = True

    @contextlib.asynccontextmanager
    async def held(self, ref: str) -> AsyncIterator[Metadata]:
        """The metadata that puts a pull's downloads under the image's lease (none if
        the lease cannot be made: the pull then runs as containerd's own would)."""
        lease = lease_id(ref)
        self._holders[lease] += 1  # counted before any wait: the lease is not let go meanwhile
        held = keep = False
        try:
            deleting = self._deleting.get(lease)
            if deleting is not None:
                await asyncio.shield(deleting)  # a lease going away is not joined
            held = await self._create(ref, lease)
            try:
                yield ((LEASE_HEADER, lease),) if held else ()
            except AgentError as err:
                keep = err.category in RESUMABLE
                raise
            except asyncio.CancelledError:
                keep = self._stopping  # else a cancel: no cache wants the image
                raise
        finally:
            self._holders[lease] -= 1
            if self._holders[lease] <= 0:
                del self._holders[lease]
                if held and keep:
                    log.info("the pull of %s keeps what it downloaded, to resume", ref)
                elif held:
                    await self._let_go(lease)

    async def contents(self, ref: str) -> list[str]:
        """The blobs the image's lease holds already: a resumed pull's manifest is among
        them (stored by the cut attempt, so not new to this one), which its byte
        progress needs. Empty without the lease or a leases service."""
        request = leases_pb2.ListResourcesRequest(id=lease_id(ref))
        try:
            resp = await self._stub.ListResources(request, metadata=self._metadata, timeout=10)
        except grpc.RpcError:
            return []
        return [resource.id for resource in resp.resources if resource.type == "content"]

    async def _create(self, ref: str, lease: str) -> bool:
        expires = (datetime.now(UTC) + KEEP_FOR).strftime("%Y-%m-%dT%H:%M:%SZ")
        request = leases_pb2.CreateRequest(id=lease, labels={EXPIRE_LABEL: expires})
        try:
            await self._stub.Create(request, metadata=self._metadata, timeout=10)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.ALREADY_EXISTS:
                return True  # a retry: what it holds serves
            log.warning("no lease for the pull of %s (%s): a retry starts over", ref, err)
            return False
        return True

    async def _let_go(self, lease: str) -> None:
        """Deletes the lease; a pull of the image starting meanwhile waits for that, and
        makes the lease anew, instead of pulling under one about to go."""
        task = self._deleting[lease] = asyncio.ensure_future(self._delete(lease))

        def forget(done: asyncio.Future[None]) -> None:
            if self._deleting.get(lease) is done:
                del self._deleting[lease]

        task.add_done_callback(forget)
        await asyncio.shield(task)

    async def _delete(self, lease: str) -> None:
        """Best effort: a lease left behind expires by itself."""
        try:
            await self._stub.Delete(
                leases_pb2.DeleteRequest(id=lease), metadata=self._metadata, timeout=10
            )
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("lease %s not deleted (it expires by itself): %s", lease, err)
