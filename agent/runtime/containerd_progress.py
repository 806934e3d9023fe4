"""Byte progress of one CRI pull, read from containerd's content store.

CRI's PullImage is a single blocking call with no progress. containerd does expose
every download in flight (content ListStatuses: ref, offset, total), but not which
pull it belongs to, and a node may pull several images at once. So the tracker learns
the image's own blobs: once the manifest (or index) of this pull is in the content
store (containerd labels it `containerd.io/distribution.source.<host>=<repo>`; it is
new since the pull started), it reads the manifest and from then on counts only that
manifest's config and layers. Blobs already present (shared layers) count as done.
A re-pull whose manifest was already stored has nothing left to download; it reports
its size when done. A pull that resumes one cut short finds its manifest among the
blobs its lease holds (pull_lease.py), and counts from what was kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc

from common.reference import ImageRef
from protos.containerd.services.content.v1 import content_pb2, content_pb2_grpc

from .base import Progress, ProgressCallback

log = logging.getLogger(__name__)

SOURCE_LABEL = "containerd.io/distribution.source."
CHILDREN_LABEL = "containerd.io/gc.ref.content."  # on manifests and indexes only
_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MAX_MANIFEST_SIZE = 4 << 20  # the OCI distribution spec's limit for manifests
Metadata = tuple[tuple[str, str | bytes], ...]


def _names_children(label: str) -> bool:
    return label.startswith(CHILDREN_LABEL)


def _ingest_kind(ref: str) -> str:
    """`manifest`, `index`, `layer`, `config`... from an ingest ref like `layer-sha256:...`."""
    return ref.split("-", 1)[0] if "-" in ref else ""


def pick_platform_manifest(index: Mapping[str, Any], os: str, arch: str) -> str | None:
    """The digest of the index entry for os/arch (the first entry when none says)."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        return None
    for entry in manifests:
        platform = entry.get("platform") or {}
        if platform.get("os") == os and platform.get("architecture") == arch:
            return str(entry["digest"])
    return None


def manifest_blobs(manifest: Mapping[str, Any]) -> dict[str, int]:
    """Config and layer digests with their sizes."""
    blobs: dict[str, int] = {}
    config = manifest.get("config")
    if isinstance(config, dict):
        blobs[str(config["digest"])] = int(config.get("size", 0))
    layers = manifest.get("layers")
    if isinstance(layers, list):
        for layer in layers:
            blobs[str(layer["digest"])] = int(layer.get("size", 0))
    return blobs


class PullProgressTracker:
    """Polls containerd while one pull runs; calls `on_progress` with monotonic bytes."""

    def __init__(
        self,
        content: content_pb2_grpc.ContentAsyncStub,
        metadata: Metadata,
        ref: ImageRef,
        arch: str,
        on_progress: ProgressCallback,
        interval: float = 0.2,
        held: Callable[[], Awaitable[list[str]]] | None = None,
    ) -> None:
        """`held`: the blobs the pull's lease holds already (a resumed pull's manifest,
        stored by the attempt that was cut), asked once."""
        self._content = content
        self._metadata = metadata
        self._ref = ref
        self._arch = arch
        self._on_progress = on_progress
        self._interval = interval
        self._started = time.time() - 2  # clock skew slack; only blobs stored since count
        self._candidates: list[str] = [ref.digest] if ref.digest else []
        self._held = held
        self._leased: set[str] = set()
        self._rejected: set[str] = set()
        self._blobs: dict[str, int] | None = None  # manifest + config + layers
        self._done: set[str] = set()
        self._seen_active: set[str] = set()
        self._best = 0

    @property
    def total(self) -> int | None:
        return sum(self._blobs.values()) if self._blobs else None

    async def run(self) -> None:
        while True:
            # Sleep first: a pull that ends within one interval costs containerd nothing.
            await asyncio.sleep(self._interval)
            try:
                await self.poll_once()
            except grpc.RpcError as err:  # progress is best effort; the pull decides
                log.debug("progress poll failed: %s", err)
            except Exception:  # a manifest we cannot read: no byte progress for this pull
                log.warning("byte progress of %s given up", self._ref, exc_info=True)
                return

    async def poll_once(self) -> None:
        resp = await self._content.ListStatuses(
            content_pb2.ListStatusesRequest(), metadata=self._metadata, timeout=5
        )
        active: dict[str, content_pb2.Status] = {}
        for status in resp.statuses:
            digest = status.expected or status.ref.split("-", 1)[-1]
            active[digest] = status
            if _ingest_kind(status.ref) in ("manifest", "index") and digest not in self._candidates:
                self._candidates.append(digest)
        self._seen_active.update(active)
        if self._blobs is None:
            await self._resolve(active)
        if self._blobs is None:
            return
        done = 0
        for digest, size in self._blobs.items():
            if digest in active:
                done += min(int(active[digest].offset), size)
            elif digest in self._done or digest in self._seen_active:
                self._done.add(digest)  # was downloading, now gone: committed
                done += size
        self._best = max(self._best, done)
        self._on_progress(Progress(self._best, sum(self._blobs.values())))

    async def _new_labelled_blobs(self) -> list[str]:
        """Small blobs of this repository stored since the pull started: manifest candidates."""
        key = SOURCE_LABEL + self._ref.hostname
        found: list[str] = []
        call = self._content.List(
            content_pb2.ListContentRequest(filters=[f'labels."{key}"']),
            metadata=self._metadata,
            timeout=5,
        )
        async for resp in call:
            for info in resp.info:
                if (
                    info.size <= MAX_MANIFEST_SIZE
                    and info.created_at.seconds >= self._started
                    and self._ref.path in info.labels.get(key, "").split(",")
                ):
                    found.append(info.digest)
        return found

    async def _resolve(self, active: dict[str, content_pb2.Status]) -> None:
        found = await self._new_labelled_blobs()
        if self._held is not None:
            held, self._held = self._held, None
            self._leased = set(await held())
            found += self._leased
        for digest in found:
            if digest not in self._candidates:
                self._candidates.append(digest)
        for digest in list(self._candidates):
            if digest in self._rejected or digest in active:
                continue
            info = await self._info(digest)
            if info is None:
                continue
            if digest in self._leased and not any(map(_names_children, info.labels)):
                self._rejected.add(digest)  # a layer or config the lease holds: not read
                continue
            sources = info.labels.get(SOURCE_LABEL + self._ref.hostname, "").split(",")
            if self._ref.path not in sources and digest != self._ref.digest:
                self._rejected.add(digest)
                continue
            try:
                document = json.loads(await self._read(digest))
            except ValueError:  # a layer or other binary blob
                self._rejected.add(digest)
                continue
            if not isinstance(document, dict) or not (
                "layers" in document or "manifests" in document
            ):
                self._rejected.add(digest)  # a config blob
                continue
            if document.get("mediaType") in _INDEX_TYPES or "manifests" in document:
                self._rejected.add(digest)  # the index itself is not counted in the size
                child = pick_platform_manifest(document, "linux", self._arch)
                if child and child not in self._candidates:
                    self._candidates.append(child)
                continue
            blobs = {digest: int(info.size), **manifest_blobs(document)}
            for blob in blobs:  # shared layers already on the node count as done
                if blob not in active and await self._info(blob) is not None:
                    self._done.add(blob)
            self._blobs = blobs
            return

    async def _info(self, digest: str) -> content_pb2.Info | None:
        try:
            resp = await self._content.Info(
                content_pb2.InfoRequest(digest=digest), metadata=self._metadata, timeout=5
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return resp.info

    async def _read(self, digest: str) -> bytes:
        chunks: list[bytes] = []
        call = self._content.Read(
            content_pb2.ReadContentRequest(digest=digest), metadata=self._metadata, timeout=10
        )
        async for chunk in call:
            chunks.append(chunk.data)
        return b"".join(chunks)


@contextlib.asynccontextmanager
async def tracking(tracker: PullProgressTracker | None) -> AsyncIterator[None]:
    """Runs the tracker for the duration of the block."""
    if tracker is None:
        yield
        return
    task = asyncio.create_task(tracker.run(), name="pull-progress")
    try:
        yield
    finally:
        task.cancel()
        # Whatever became of the tracker, the block's own outcome (the pull's) stands.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
