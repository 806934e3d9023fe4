"""The Docker runtime adapter, through the `docker` SDK on the node's Docker socket.

The SDK is synchronous; calls run in worker threads. Docker has no pinning (its image
GC is not the kubelet's concern with dockershim gone), so pins report UNSUPPORTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import docker
import docker.auth
import docker.errors
import requests

from common.reference import DOCKER_HUB, InvalidReference, parse, registry_of_server_address

from ..errors import AgentError, Category, classify_message, parse_reference
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


def _docker_auth(creds: Credentials) -> dict[str, str]:
    auth: dict[str, str] = {}
    if creds.username:
        auth["username"], auth["password"] = creds.username, creds.password
    elif creds.auth:
        auth["auth"] = creds.auth
    if creds.identity_token:
        auth["identitytoken"] = creds.identity_token
    if creds.registry_token:
        auth["registrytoken"] = creds.registry_token
    if creds.server_address:
        host = registry_of_server_address(creds.server_address)
        auth["serveraddress"] = "https://index.docker.io/v1/" if host == DOCKER_HUB else host
    return auth


def docker_ref(ref: str) -> str:
    """Docker resolves `name@digest` but not `name:tag@digest`: drop the tag then."""
    try:
        parsed = parse(ref)
    except InvalidReference:
        return ref
    return f"{parsed.name}@{parsed.digest}" if parsed.digest else ref


# A pull's read timeout runs this long after its deadline, so that the deadline (and
# its clear DeadlineExceeded) always comes first.
READ_TIMEOUT_SLACK = 5.0
Responses = list[requests.Response]  # (`list` is also a method of DockerRuntime)


def _in_daemon_thread(fn: Callable[[], None], name: str) -> asyncio.Future[None]:
    """A pull holds a thread for its whole length, so a thread of its own: pulls never
    queue the Lease renewal, health checks and listings behind them (the default pool
    has cpus + 4 threads), and a daemon one: the agent stopping does not wait for a
    pull still waiting on the daemon's first answer (the interpreter's exit waits for
    every other thread, past the kubelet's grace)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            fn()
        except BaseException as err:  # handed to the awaiting task, as to_thread does
            error = err
        with contextlib.suppress(RuntimeError):  # the loop already closed: nobody waits
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return done


def _hang_up(response: requests.Response) -> None:
    """Shuts a streaming response's connection from another thread: the blocked read
    returns at once, and the daemon, its client gone, cancels the pull."""
    sock = getattr(getattr(response.raw, "_connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _classify(err: Exception, image: str = "") -> AgentError:
    if isinstance(err, requests.exceptions.ConnectionError):
        return AgentError(Category.RUNTIME_UNAVAILABLE, f"docker daemon unavailable: {err}")
    message = getattr(err, "explanation", None) or str(err)
    return AgentError(classify_message(str(message), image), str(message))


class LayerProgress:
    """Sums Docker's per-layer progress messages into one monotonic byte count."""

    def __init__(self) -> None:
        self._layers: dict[str, tuple[int, int]] = {}  # id -> (done, total)
        self._best = 0

    def update(self, event: dict[str, Any]) -> Progress | None:
        layer = event.get("id")
        status = str(event.get("status", ""))
        if not layer or (event.get("progressDetail") is None and not status):
            return None
        done, total = self._layers.get(layer, (0, 0))
        detail = event.get("progressDetail") or {}
        if status == "Downloading" and detail.get("total"):
            total = int(detail["total"])
            done = max(done, int(detail.get("current", 0)))
        elif status in ("Download complete", "Pull complete", "Verifying Checksum") and total:
            done = total
        else:
            return None
        self._layers[layer] = (done, total)
        current = sum(d for d, _ in self._layers.values())
        self._best = max(self._best, current)
        return Progress(self._best, self.total)

    @property
    def total(self) -> int:
        return sum(t for _, t in self._layers.values())


class DockerRuntime:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._api = docker.APIClient(base_url=endpoint, timeout=60)

    def stopping(self) -> None:
        """Nothing to do: Docker keeps the layers a cut pull finished by itself."""

    async def close(self) -> None:
        await asyncio.to_thread(self._api.close)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except docker.errors.ImageNotFound:
            raise
        except (docker.errors.APIError, requests.exceptions.RequestException) as err:
            raise _classify(err) from err

    async def info(self) -> RuntimeInfo:
        version = await self._call(self._api.version)
        return RuntimeInfo(
            name="docker",
            version=str(version.get("Version", "")),
            api="docker",
            pinning_supported=False,
        )

    @staticmethod
    def _record(attrs: dict[str, Any]) -> ImageRecord:
        return ImageRecord(
            id=str(attrs["Id"]),
            repo_tags=tuple(attrs.get("RepoTags") or ()),
            repo_digests=tuple(attrs.get("RepoDigests") or ()),
            size=int(attrs.get("Size", 0)),
            pin=PinState.UNSUPPORTED,
        )

    async def status(self, ref: str) -> ImageRecord | None:
        try:
            attrs = await self._call(self._api.inspect_image, docker_ref(ref))
        except docker.errors.ImageNotFound:
            return None
        return self._record(attrs)

    async def list(self) -> list[ImageRecord]:
        images = await self._call(self._api.images)
        return [
            ImageRecord(
                id=str(i["Id"]),
                repo_tags=tuple(t for t in i.get("RepoTags") or () if t != "<none>:<none>"),
                repo_digests=tuple(d for d in i.get("RepoDigests") or () if "<none>" not in d),
                size=int(i.get("Size", 0)),
                pin=PinState.UNSUPPORTED,
            )
            for i in images
        ]

    async def pull(
        self,
        ref: str,
        credentials: Sequence[Credentials],
        deadline: float,
        on_progress: ProgressCallback,
    ) -> ImageRecord:
        parsed = parse_reference(ref)
        repository = parsed.name
        tag = parsed.digest or parsed.tag or "latest"
        auths: list[dict[str, str] | None] = [_docker_auth(c) for c in credentials] or [None]
        loop = asyncio.get_running_loop()
        progress = LayerProgress()

        def report(p: Progress) -> None:
            loop.call_soon_threadsafe(on_progress, p)

        async def attempt(auth: dict[str, str] | None, left: float) -> None:
            stop = threading.Event()
            held: Responses = []
            work = _in_daemon_thread(
                functools.partial(
                    self._pull_blocking, repository, tag, auth, progress, report, stop, left, held
                ),
                f"docker-pull {ref}",
            )
            try:
                await asyncio.wait_for(work, timeout=left)
            except (TimeoutError, asyncio.CancelledError) as err:
                stop.set()
                for response in held:
                    _hang_up(response)  # the daemon cancels a pull whose client is gone
                if isinstance(err, asyncio.CancelledError):
                    # The agent stopping: its thread ends now, not when the pull would
                    # have (the interpreter's exit waits for every thread).
                    raise
                raise AgentError(
                    Category.DEADLINE_EXCEEDED, f"pull of {ref} did not finish within {deadline:g}s"
                ) from err

        await pull_with_each(ref, auths, deadline, attempt)
        record = await self.status(ref)
        if record is None:
            raise AgentError(Category.INTERNAL, f"{ref} was pulled but docker does not list it")
        total = progress.total or record.size  # bytes downloaded; Docker's size is unpacked
        on_progress(Progress(total, total))
        return record

    def _pull_blocking(
        self,
        repository: str,
        tag: str,
        auth: dict[str, str] | None,
        progress: LayerProgress,
        report: ProgressCallback,
        stop: threading.Event,
        deadline: float,
        held: Responses,
    ) -> None:
        """The SDK's `pull`, but with the response in `held`, so that the deadline can
        hang up on it; and with a read timeout for a daemon that never answers."""
        headers = {"X-Registry-Auth": docker.auth.encode_header(auth)} if auth else {}
        try:
            response = self._api._post(
                self._api._url("/images/create"),
                params={"fromImage": repository, "tag": tag},
                headers=headers,
                stream=True,
                timeout=deadline + READ_TIMEOUT_SLACK,
            )
            held.append(response)
            if stop.is_set():
                _hang_up(response)
                return
            self._api._raise_for_status(response)
            stream: Iterator[dict[str, Any]] = self._api._stream_helper(response, decode=True)
            for event in stream:
                if stop.is_set():
                    return
                if "error" in event:
                    message = str(event.get("error"))
                    raise AgentError(classify_message(message, repository), message)
                update = progress.update(event)
                if update is not None:
                    report(update)
        except (docker.errors.APIError, requests.exceptions.RequestException) as err:
            if stop.is_set():
                return  # hung up on purpose
            raise _classify(err, repository) from err
        finally:
            for response in held:
                response.close()

    async def remove(self, ref: str) -> bool:
        try:
            await self._call(self._api.remove_image, docker_ref(ref))
        except docker.errors.ImageNotFound:
            return False
        return True

    async def in_use(self, image_id: str) -> bool:
        containers = await self._call(
            self._api.containers, all=True, filters={"ancestor": image_id}
        )
        return bool(containers)

    async def set_pinned(self, ref: str, pinned: bool) -> PinState:
        if await self.status(ref) is None:
            raise AgentError(Category.NOT_FOUND, f"{ref} is not on this node")
        return PinState.UNSUPPORTED

    async def image_fs(self) -> FsUsage:
        info = await self._call(self._api.info)
        root = str(info.get("DockerRootDir", ""))
        images = await self.list()
        capacity = available = 0
        try:
            st = await asyncio.to_thread(os.statvfs, root)
            capacity, available = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        except OSError:
            pass
        return FsUsage(
            used=sum(i.size for i in images),
            capacity=capacity,
            available=available,
            mountpoint=root,
        )
