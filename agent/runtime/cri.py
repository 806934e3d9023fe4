"""The CRI runtime adapter (containerd, CRI-O, k3s), with containerd's own API for what
CRI lacks when the socket turns out to be containerd: pin labels and byte progress."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import empty_pb2, field_mask_pb2

from common.reference import DOCKER_HUB, registry_of_server_address
from protos.containerd.services.content.v1 import content_pb2_grpc
from protos.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from protos.containerd.services.leases.v1 import leases_pb2_grpc
from protos.containerd.services.version.v1 import version_pb2_grpc
from protos.cri.runtime.v1 import api_pb2, api_pb2_grpc

from ..errors import AgentError, Category, classify_rpc_error, parse_reference
from .base import (
    Credentials,
    FsUsage,
    ImageRecord,
    PinState,
    Progress,
    ProgressCallback,
    RuntimeInfo,
    pull_with_each,
)
from .containerd_progress import PullProgressTracker, tracking
from .pull_lease import Metadata, PullLeases

log = logging.getLogger(__name__)

PINNED_LABEL = "io.cri-containerd.pinned"
PINNED_VALUE = "pinned"
# Marks pins kube-fledged set, so it lifts only its own (never the sandbox image's).
OWNER_LABEL = "kubefledged.io/pinned"
NAMESPACE_HEADER = "containerd-namespace"
CALL_TIMEOUT = 30.0
# At most how long a pin change or an untag waits for CRI to show it (it takes a few
# milliseconds: CRI catches up from containerd's events).
SETTLE_SECONDS = 2.0
IDENTITY_SECONDS = 60.0  # the runtime's identity (containerd's version) is read again after


def host_arch() -> str:
    machine = os.uname().machine.lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def auth_config(creds: Credentials) -> api_pb2.AuthConfig:
    """CRI AuthConfig for `creds`.

    containerd matches `url.Parse(server_address).Host` against the registry host it
    dials, so the address must carry a scheme; Docker Hub is dialled as
    registry-1.docker.io whatever alias the secret used.
    """
    server = ""
    if creds.server_address:
        host = registry_of_server_address(creds.server_address)
        server = "https://" + ("registry-1.docker.io" if host == DOCKER_HUB else host)
    return api_pb2.AuthConfig(
        username=creds.username,
        password=creds.password,
        auth=creds.auth,
        server_address=server,
        identity_token=creds.identity_token,
        registry_token=creds.registry_token,
    )


def _record(
    image: api_pb2.Image, pinning: bool, owned: bool = False, foreign: bool = False
) -> ImageRecord:
    if pinning:
        pin = PinState.PINNED if image.pinned else PinState.UNPINNED
    else:
        pin = PinState.PINNED if image.pinned else PinState.UNSUPPORTED
    return ImageRecord(
        id=image.id,
        repo_tags=tuple(image.repo_tags),
        repo_digests=tuple(image.repo_digests),
        size=int(image.size),
        pin=pin,
        pin_owned=owned and image.pinned,
        # a pinned image none of whose pins is known as ours is someone else's
        pin_foreign=image.pinned and (foreign or not owned),
    )


@dataclass(frozen=True)
class Pins:
    """containerd's image records carrying the pin label, by who set it."""

    ours: frozenset[str] = frozenset()  # with our owner label too
    theirs: frozenset[str] = frozenset()

    def of(self, names: set[str]) -> tuple[bool, bool]:
        return bool(names & self.ours), bool(names & self.theirs)


def _pins(records: Iterable[images_pb2.Image]) -> Pins:
    ours: set[str] = set()
    theirs: set[str] = set()
    for image in records:
        if image.labels.get(PINNED_LABEL) == PINNED_VALUE:
            (ours if OWNER_LABEL in image.labels else theirs).add(image.name)
    return Pins(frozenset(ours), frozenset(theirs))


def honours_pins(containerd_version: str) -> bool:
    """containerd's CRI reports `pinned` from the label since 1.7 (1.6 ignores it, as
    measured on Debian 12's 1.6.20); a version it cannot read is taken as new."""
    found = re.match(r"v?(\d+)\.(\d+)", containerd_version)
    return not found or (int(found[1]), int(found[2])) >= (1, 7)


def _names(image: api_pb2.Image | ImageRecord) -> set[str]:
    """Every containerd image record CRI keeps for one image."""
    return {*image.repo_tags, *image.repo_digests, image.id}


# How close to our deadline a runtime's failure counts as our deadline running out.
DEADLINE_SLACK = 0.25


class CriRuntime:
    def __init__(self, endpoint: str, containerd_namespace: str = "k8s.io") -> None:
        self.endpoint = endpoint
        self._channel = grpc.aio.insecure_channel(
            endpoint, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        self._images = api_pb2_grpc.ImageServiceStub(self._channel)
        self._runtime = api_pb2_grpc.RuntimeServiceStub(self._channel)
        self._ctr_version = version_pb2_grpc.VersionStub(self._channel)
        self._ctr_images = images_pb2_grpc.ImagesStub(self._channel)
        self._ctr_content = content_pb2_grpc.ContentStub(self._channel)
        self._metadata: tuple[tuple[str, str | bytes], ...] = (
            (NAMESPACE_HEADER, containerd_namespace),
        )
        self._leases = PullLeases(leases_pb2_grpc.LeasesStub(self._channel), self._metadata)
        self._is_containerd: bool | None = None
        self._pins_honoured = False
        self._identity_at = 0.0  # monotonic: when the runtime's identity was read

    def stopping(self) -> None:
        self._leases.stopping()

    async def close(self) -> None:
        await self._channel.close()

    async def _containerd(self) -> bool:
        """Whether containerd's own services answer on this socket, and whether its CRI
        honours pins. Asked again after IDENTITY_SECONDS: a runtime upgraded in place
        (containerd 1.6 to 1.7 under a running agent) pins from then on."""
        now = time.monotonic()
        if self._is_containerd is not None and now - self._identity_at < IDENTITY_SECONDS:
            return self._is_containerd
        try:
            version = await self._ctr_version.Version(empty_pb2.Empty(), timeout=5)
        except grpc.RpcError as err:
            # Only "no such service" says it is another runtime (CRI-O, cri-dockerd).
            # Anything else (a busy node's timeout at boot) is asked again next time:
            # taken for an answer, it would turn pins and safe untags off for good.
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._is_containerd, self._identity_at = False, now
            elif self._is_containerd is None:
                raise classify_rpc_error(err) from err
            return self._is_containerd  # what we knew stands meanwhile
        honoured = honours_pins(version.version)
        if not honoured and (self._pins_honoured or self._is_containerd is None):
            log.warning(
                "containerd %s: its CRI ignores pin labels (1.7 or newer pins); "
                "images are pulled but not pinned",
                version.version,
            )
        self._is_containerd, self._pins_honoured, self._identity_at = True, honoured, now
        return True

    async def _containerd_or_not(self) -> bool:
        """For what only byte progress needs: not knowing yet must not fail a pull."""
        try:
            return await self._containerd()
        except AgentError as err:
            log.warning("containerd's version not read (%s): no byte progress", err.message)
            return False

    async def _pinning(self) -> bool:
        """Whether pins can be set here: containerd whose CRI honours the pin label."""
        return await self._containerd() and self._pins_honoured

    async def info(self) -> RuntimeInfo:
        try:
            version = await self._runtime.Version(api_pb2.VersionRequest(version="v1"), timeout=5)
        except grpc.RpcError as err:
            raise classify_rpc_error(err) from err
        containerd = await self._containerd()
        return RuntimeInfo(
            name=version.runtime_name,
            version=version.runtime_version,
            api="cri+containerd" if containerd else "cri",
            pinning_supported=await self._pinning(),
        )

    async def status(self, ref: str) -> ImageRecord | None:
        try:
            resp = await self._images.ImageStatus(
                api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref)),
                timeout=CALL_TIMEOUT,
            )
        except grpc.RpcError as err:
            raise classify_rpc_error(err) from err
        if not resp.HasField("image"):
            return None
        if not await self._pinning():
            return _record(resp.image, False)
        if not resp.image.pinned:  # only a pinned image can have our pin: skip the lookup
            return _record(resp.image, True)
        names = _names(resp.image)
        records = await asyncio.gather(*(self._ctr_record(name) for name in names))
        return _record(resp.image, True, *_pins(r for r in records if r is not None).of(names))

    async def list(self) -> list[ImageRecord]:
        try:
            resp = await self._images.ListImages(api_pb2.ListImagesRequest(), timeout=CALL_TIMEOUT)
        except grpc.RpcError as err:
            raise classify_rpc_error(err) from err
        if not await self._pinning():
            return [_record(image, False) for image in resp.images]
        pins = await self._pinned_records()
        return [_record(image, True, *pins.of(_names(image))) for image in resp.images]

    async def _pinned_records(self) -> Pins:
        """Every containerd image record that carries the pin label, ours or not."""
        try:
            resp = await self._ctr_images.List(
                images_pb2.ListImagesRequest(filters=[f'labels."{PINNED_LABEL}"']),
                metadata=self._metadata,
                timeout=CALL_TIMEOUT,
            )
        except grpc.RpcError as err:
            raise classify_rpc_error(err) from err
        return _pins(resp.images)

    async def _ctr_record(self, name: str) -> images_pb2.Image | None:
        """One containerd image record (a tag, a digest reference or an id), if any.
        An image's own records are looked up by name: listing every pinned record for
        each image asked about grew with the node's pins (a refresh asks of each)."""
        try:
            resp = await self._ctr_images.Get(
                images_pb2.GetImageRequest(name=name), metadata=self._metadata, timeout=10
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise classify_rpc_error(err) from err
        return resp.image

    async def pull(
        self,
        ref: str,
        credentials: Sequence[Credentials],
        deadline: float,
        on_progress: ProgressCallback,
    ) -> ImageRecord:
        parsed = parse_reference(ref)
        if not await self._containerd_or_not():
            return await self._pull(ref, credentials, deadline, on_progress, None, ())
        tracker = PullProgressTracker(
            self._ctr_content,
            self._metadata,
            parsed,
            host_arch(),
            on_progress,
            held=functools.partial(self._leases.contents, ref),
        )
        async with self._leases.held(ref) as lease:
            return await self._pull(ref, credentials, deadline, on_progress, tracker, lease)

    async def _pull(
        self,
        ref: str,
        credentials: Sequence[Credentials],
        deadline: float,
        on_progress: ProgressCallback,
        tracker: PullProgressTracker | None,
        lease: Metadata,
    ) -> ImageRecord:
        auths: list[api_pb2.AuthConfig | None] = [auth_config(c) for c in credentials] or [None]

        async def attempt(auth: api_pb2.AuthConfig | None, left: float) -> None:
            request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref), auth=auth)
            ends = time.monotonic() + left
            try:
                await self._images.PullImage(request, timeout=left, metadata=lease or None)
            except grpc.RpcError as err:
                failure = classify_rpc_error(err, ref)
                # Ours only if our deadline is what ran out: a runtime that gave up on
                # the registry early (CRI-O's "pinging container registry ...: context
                # deadline exceeded") said which registry and why; that stays. At our
                # deadline, the runtime's side of it may come first, as a reset stream
                # ("Stream removed", CANCELLED): that is our deadline too.
                ran_out = time.monotonic() >= ends - DEADLINE_SLACK
                if ran_out and failure.category in (Category.DEADLINE_EXCEEDED, Category.INTERNAL):
                    raise AgentError(
                        Category.DEADLINE_EXCEEDED,
                        f"pull of {ref} did not finish within {deadline:g}s",
                    ) from err
                raise failure from err

        async with tracking(tracker):
            await pull_with_each(ref, auths, deadline, attempt)
        record = await self.status(ref)
        if record is None:
            raise AgentError(
                Category.INTERNAL, f"{ref} was pulled but the runtime does not list it"
            )
        total = tracker.total if tracker and tracker.total else record.size
        on_progress(Progress(total, total))
        return record

    async def remove(self, ref: str) -> bool:
        record = await self.status(ref)
        if record is None:
            return False
        if record.pin_foreign:
            # containerd pins its sandbox image: removed (or untagged), every new pod on
            # an air-gapped node would fail. The kubelet's GC spares pins; so do we,
            # though we pinned the same content under another name too.
            raise AgentError(
                Category.INTERNAL,
                f"{ref} not removed: it is pinned by someone else (containerd pins its "
                "sandbox image); lift that pin to remove it",
            )
        if await self._untag(ref, record):
            return True
        if record.pin_owned:
            await self.set_pinned(ref, False)
        try:
            await self._images.RemoveImage(
                api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref)),
                timeout=CALL_TIMEOUT,
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise classify_rpc_error(err) from err
        return True

    async def _untag(self, ref: str, record: ImageRecord) -> bool:
        """Takes only `ref`'s own record when the image keeps another tag, as `docker
        rmi` and CRI-O do: containerd's CRI RemoveImage deletes every name of the image,
        so removing one cache's tag would take the same content from a cache that names
        it otherwise (another tag, pinned), to be pulled again. False: not the case."""
        if not record.repo_tags or not await self._containerd():
            return False
        if ref.startswith("sha256:"):
            return False  # an image id names the content itself
        name = parse_reference(ref).lookup_key
        others = sorted(set(record.repo_tags) - {name})
        if not others:
            return False  # its last tag: the content goes, as CRI does it
        try:
            await self._ctr_images.Delete(
                images_pb2.DeleteImageRequest(name=name), metadata=self._metadata, timeout=10
            )
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise classify_rpc_error(err) from err
        await self._settled(
            ref, lambda now: now is None or name not in now.repo_tags, f"{name} untagged"
        )
        log.info("untagged %s; its content stays for %s", name, ", ".join(others))
        return True

    async def in_use(self, image_id: str) -> bool:
        try:
            resp = await self._runtime.ListContainers(
                api_pb2.ListContainersRequest(), timeout=CALL_TIMEOUT
            )
        except grpc.RpcError as err:
            raise classify_rpc_error(err) from err
        return any(image_id in (c.image_ref, c.image_id, c.image.image) for c in resp.containers)

    async def set_pinned(self, ref: str, pinned: bool) -> PinState:
        """Labels every containerd record of the image (tags, digests, id).

        A pin someone else set stays theirs: pinning leaves it alone and unpinning
        does not lift it.
        """
        if not await self._pinning():
            return PinState.UNSUPPORTED
        record = await self.status(ref)
        if record is None:
            raise AgentError(Category.NOT_FOUND, f"{ref} is not on this node")
        if record.pin == PinState.PINNED and not record.pin_owned:
            return PinState.PINNED
        labelled = any([await self._label(name, pinned) for name in _names(record)])
        after = await self._settled(
            ref,
            lambda now: now is None or (now.pin == PinState.PINNED) == labelled,
            f"{ref} {'pinned' if labelled else 'unpinned'}",
        )
        return after.pin if after else PinState.UNPINNED

    async def _settled(
        self, ref: str, shown: Callable[[ImageRecord | None], bool], what: str
    ) -> ImageRecord | None:
        """The image's record once CRI shows a change made through containerd's API.

        CRI's image cache learns of a label change or a deleted record from containerd's
        event stream, a moment after the call returns: read at once, an unpin could
        still answer PINNED (and a pull right after it skip re-pinning what is no longer
        pinned), an untagged tag still be present. Bounded: a CRI that never shows the
        change is answered as it stands."""
        delay, ends = 0.002, time.monotonic() + SETTLE_SECONDS
        while True:
            record = await self.status(ref)
            if shown(record):
                return record
            if time.monotonic() >= ends:
                log.warning("CRI does not show %s %.1fs after it was made", what, SETTLE_SECONDS)
                return record
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _label(self, name: str, pinned: bool) -> bool:
        """Sets or lifts our pin on one record: whether it carries the pin label after
        (someone else's included; a record gone carries none)."""
        image = await self._ctr_record(name)
        if image is None:
            return False
        owned = OWNER_LABEL in image.labels
        carries = image.labels.get(PINNED_LABEL) == PINNED_VALUE
        if pinned and carries:
            return True  # ours, or someone else's that stays theirs (never taken over)
        if not pinned and not owned:
            return carries  # someone else's pin, or none: not ours to lift
        # Pinning where the pin label is missing, our owner label or not: that is also
        # a pin lifted by hand (`ctr images label X io.cri-containerd.pinned=`), to be
        # put back or the kubelet may collect the image.
        if pinned:
            image.labels[PINNED_LABEL] = PINNED_VALUE
            image.labels[OWNER_LABEL] = "true"
        else:
            image.labels.pop(PINNED_LABEL, None)
            image.labels.pop(OWNER_LABEL, None)
        # The whole record goes back: containerd 2.2 crashes on an Update without target.
        request = images_pb2.UpdateImageRequest(
            image=image,
            update_mask=field_mask_pb2.FieldMask(
                paths=[f"labels.{PINNED_LABEL}", f"labels.{OWNER_LABEL}"]
            ),
        )
        try:
            await self._ctr_images.Update(request, metadata=self._metadata, timeout=10)
        except grpc.RpcError as err:
            raise classify_rpc_error(err) from err
        return pinned

    async def image_fs(self) -> FsUsage:
        try:
            resp = await self._images.ImageFsInfo(
                api_pb2.ImageFsInfoRequest(), timeout=CALL_TIMEOUT
            )
        except grpc.RpcError as err:
            raise classify_rpc_error(err) from err
        if not resp.image_filesystems:
            return FsUsage(used=0, capacity=0, available=0)
        fs = resp.image_filesystems[0]
        mountpoint = fs.fs_id.mountpoint
        capacity = available = 0
        try:
            st = await asyncio.to_thread(os.statvfs, mountpoint)
            capacity, available = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        except OSError:
            log.debug("image filesystem %s is not visible to the agent", mountpoint)
        return FsUsage(
            used=int(fs.used_bytes.value),
            capacity=capacity,
            available=available,
            mountpoint=mountpoint,
        )
