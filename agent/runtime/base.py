"""The one small interface the agent needs from a container runtime.

The pull manager and the gRPC service see only this; CRI (with or without containerd's
extras) and Docker each implement it in their own module.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, TypeVar

from common.reference import InvalidReference, parse

from ..errors import AgentError, Category

Auth = TypeVar("Auth")


class PinState(StrEnum):
    PINNED = "pinned"
    UNPINNED = "unpinned"
    UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class Credentials:
    """Registry credentials for one pull. Secret fields never appear in repr or logs."""

    server_address: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    @classmethod
    def of(cls, src: object) -> Credentials:
        """From anything with these fields: an order's, a docker config entry's."""
        return cls(**{f: str(getattr(src, f, "")) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Progress:
    bytes_done: int
    bytes_total: int  # 0 while unknown


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class ImageRecord:
    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int
    pin: PinState
    pin_owned: bool = False  # pinned by kube-fledged (on some record of the image)
    # Some record carries a pin kube-fledged did not set (containerd's sandbox image,
    # an operator's `ctr images label`): the content is not ours to remove.
    pin_foreign: bool = False

    def digest_for(self, name: str) -> str:
        """The repo digest (sha256:...) under repository `name` (normalized, as `parse`
        gives it); "" if the image has none there. Docker lists Docker Hub's
        repositories short (`nginx@sha256:...`), so each entry is normalized before it
        is compared: content stored under several repositories has a manifest digest in
        each, and another repository's is not this one's."""
        for entry in self.repo_digests:
            repo, _, digest = entry.partition("@")
            if repo == name or _repository(repo) == name:
                return digest
        return ""


def _repository(repo: str) -> str:
    try:
        return parse(repo).name
    except InvalidReference:
        return repo


@dataclass(frozen=True)
class RuntimeInfo:
    name: str  # containerd, cri-o, docker
    version: str
    api: str  # cri, cri+containerd, docker
    pinning_supported: bool


@dataclass(frozen=True)
class FsUsage:
    used: int
    capacity: int  # 0 when unknown
    available: int  # 0 when unknown
    mountpoint: str = ""


class Runtime(Protocol):
    """A node's container runtime. Methods raise agent.errors.AgentError."""

    async def info(self) -> RuntimeInfo:
        """Identity of the runtime; also the health check (raises when it does not answer)."""
        ...

    async def status(self, ref: str) -> ImageRecord | None: ...

    async def list(self) -> list[ImageRecord]: ...

    async def pull(
        self,
        ref: str,
        credentials: Sequence[Credentials],
        deadline: float,
        on_progress: ProgressCallback,
    ) -> ImageRecord:
        """Pulls `ref` (trying each credential in turn), reporting bytes as it goes."""
        ...

    async def remove(self, ref: str) -> bool:
        """Removes the image; False when it was not there."""
        ...

    async def in_use(self, image_id: str) -> bool:
        """Whether a container (in any state) was made from the image."""
        ...

    async def set_pinned(self, ref: str, pinned: bool) -> PinState: ...

    async def image_fs(self) -> FsUsage: ...

    def stopping(self) -> None:
        """The agent is stopping: pulls cut from now on keep what they downloaded where
        the runtime can, for the next agent (a rolling update) to resume."""
        ...

    async def close(self) -> None: ...


async def pull_with_each(
    ref: str,
    candidates: Sequence[Auth],
    deadline: float,
    attempt: Callable[[Auth, float], Awaitable[None]],
) -> None:
    """Tries each credential in turn, as the kubelet does with several pull secrets:
    an Unauthorized answer moves on to the next, anything else ends the pull. All
    attempts share one deadline; `attempt` gets the seconds left."""
    ends = time.monotonic() + deadline
    for index, candidate in enumerate(candidates):
        left = ends - time.monotonic()
        if left <= 0:
            break
        try:
            await attempt(candidate, left)
            return
        except AgentError as err:
            if err.category == Category.UNAUTHORIZED and index < len(candidates) - 1:
                continue
            raise
    raise AgentError(
        Category.DEADLINE_EXCEEDED, f"pull of {ref} did not finish within {deadline:g}s"
    )
