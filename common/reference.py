"""Container image references, parsed and normalized as the Docker/OCI tooling does.

Shared by the coordinator (validating specs, matching pull secrets to registries) and
the agent (naming images in the runtime, attributing pull progress). Pure functions.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
# The one other name distribution folds into docker.io in a reference: containerd and
# Docker keep `registry-1.docker.io/...` as written, so it is a registry of its own here.
LEGACY_DOCKER_HUB = "index.docker.io"
# Names under which Docker Hub's credentials are written in docker configs and CRI
# auth: any of them serves an image of any of them.
DOCKER_HUB_ALIASES = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN_RE = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*"
    r"(?::[0-9]+)?$|^\[[0-9a-fA-F:]+\](?::[0-9]+)?$"
)
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_SHA256_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
MAX_NAME_LENGTH = 255


class InvalidReference(ValueError):
    """The string is not an image reference; the message says why."""


@dataclass(frozen=True)
class ImageRef:
    domain: str  # registry host[:port], Docker Hub as docker.io (index.docker.io too)
    path: str  # repository path; Docker Hub's official images under library/
    tag: str | None
    digest: str | None

    # Cached: the planner asks each of these for every node x image pair.
    @functools.cached_property
    def name(self) -> str:
        return f"{self.domain}/{self.path}"

    @property
    def hostname(self) -> str:
        """The registry host without its port (how containerd keys distribution labels)."""
        if self.domain.startswith("["):
            return self.domain[: self.domain.index("]") + 1]
        return self.domain.rsplit(":", 1)[0] if ":" in self.domain else self.domain

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @functools.cached_property
    def canonical(self) -> str:
        """The fully qualified form a runtime stores; a bare name gets the `latest` tag."""
        if self.tag is None and self.digest is None:
            return f"{self.name}:latest"
        return str(self)

    @functools.cached_property
    def lookup_key(self) -> str:
        """How a runtime lists this image: `name@digest` when pinned by digest, else
        `name:tag` (`latest` when none)."""
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag or 'latest'}"

    @property
    def is_mutable(self) -> bool:
        """A tag can move to new content; a digest cannot."""
        return self.digest is None


@functools.lru_cache(maxsize=65536)
def parse(reference: str) -> ImageRef:
    """Parses `reference` ([domain/]path[:tag][@digest]) or raises InvalidReference.

    Cached: the planner asks about the same few references for every node."""
    if not reference or reference != reference.strip():
        raise InvalidReference(f"invalid image reference {reference!r}: empty or padded")
    rest = reference
    digest = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise InvalidReference(f"invalid image reference {reference!r}: bad digest {digest!r}")
        if digest.startswith("sha256:") and not _SHA256_RE.match(digest):
            raise InvalidReference(
                f"invalid image reference {reference!r}: sha256 digest must be 64 hex digits"
            )
    tag = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise InvalidReference(f"invalid image reference {reference!r}: bad tag {tag!r}")
    if not rest:
        raise InvalidReference(f"invalid image reference {reference!r}: no repository name")
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        domain, path = first, remainder
        if not _DOMAIN_RE.match(domain):
            raise InvalidReference(
                f"invalid image reference {reference!r}: bad registry {domain!r}"
            )
    else:
        domain, path = DOCKER_HUB, rest
    if domain == LEGACY_DOCKER_HUB:
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not _PATH_RE.match(path):
        hint = " (repository names must be lowercase)" if path.lower() != path else ""
        raise InvalidReference(
            f"invalid image reference {reference!r}: bad repository name {path!r}{hint}"
        )
    if len(f"{domain}/{path}") > MAX_NAME_LENGTH:
        raise InvalidReference(
            f"invalid image reference {reference!r}: name longer than {MAX_NAME_LENGTH}"
        )
    return ImageRef(domain=domain, path=path, tag=tag, digest=digest)


def normalize(reference: str) -> str:
    """The canonical string for `reference` (raises InvalidReference)."""
    return parse(reference).canonical


def same_registry(a: str, b: str) -> bool:
    """Whether credentials for registry `a` serve images of registry `b` (Docker Hub
    under any of its names)."""
    return a == b or (a in DOCKER_HUB_ALIASES and b in DOCKER_HUB_ALIASES)


def registry_matches(pattern: str, domain: str) -> bool:
    """Whether a docker-config entry for registry `pattern` serves images of `domain`, as
    the kubelet matches them: Docker Hub under any of its names, otherwise the same port
    and as many dot-separated labels, each a glob (`*.example.com` serves
    `a.example.com`, not `a.b.example.com` nor `example.com`)."""
    if same_registry(pattern, domain):
        return True
    host, port = _host_port(pattern)
    if not any(c in host for c in "*?["):
        return False
    target, target_port = _host_port(domain)
    labels, target_labels = host.split("."), target.split(".")
    return (
        port == target_port
        and len(labels) == len(target_labels)
        and all(
            fnmatch.fnmatchcase(t, p.replace("[^", "[!"))  # Go's negation, fnmatch's spelling
            for p, t in zip(labels, target_labels, strict=True)
        )
    )


def _host_port(registry: str) -> tuple[str, str]:
    """`host[:port]` or `[v6]:port` split; the port is empty when absent."""
    if registry.startswith("["):
        host, _, rest = registry[1:].partition("]")
        return host, rest.removeprefix(":")
    host, _, port = registry.partition(":")
    return host, port


def registry_of_server_address(server: str) -> str:
    """The registry host[:port] a docker-config key or CRI server address names.

    Accepts `https://index.docker.io/v1/`, `registry:5000`, `http://host/path`...
    """
    text = server.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    host = text.split("/", 1)[0].lower()
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host
