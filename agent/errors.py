"""Failure categories the coordinator can act on, classified once, here.

Runtimes report failures as free text inside gRPC or HTTP errors; `classify` turns that
text (and the transport status) into one category. Pure functions, tested as such.
"""

from __future__ import annotations

import re
from enum import StrEnum

import grpc

from common.reference import ImageRef, InvalidReference, parse


class Category(StrEnum):
    NOT_FOUND = "NotFound"
    UNAUTHORIZED = "Unauthorized"
    REGISTRY_UNAVAILABLE = "RegistryUnavailable"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    INVALID_REFERENCE = "InvalidReference"
    INSUFFICIENT_DISK = "InsufficientDisk"
    RUNTIME_UNAVAILABLE = "RuntimeUnavailable"
    INTERNAL = "Internal"


class AgentError(Exception):
    """A failure with its category; the message is the runtime's own words."""

    def __init__(self, category: Category, message: str) -> None:
        super().__init__(message)
        self.category = category
        self.message = message


# Checked in order: the first pattern found in the lower-cased message wins.
_PATTERNS: tuple[tuple[Category, tuple[str | re.Pattern[str], ...]], ...] = (
    (Category.INSUFFICIENT_DISK, ("no space left on device", "disk quota exceeded")),
    (
        Category.INVALID_REFERENCE,
        (
            "invalid reference format",
            "failed to parse image reference",
            "repository name must",
            "invalid reference",
        ),
    ),
    (
        Category.UNAUTHORIZED,
        (
            "401 unauthorized",
            "403 forbidden",
            "unauthorized",
            "authorization failed",
            "no basic auth credentials",
            "pull access denied",
            "authentication required",
            "denied:",
            "incorrect username or password",
        ),
    ),
    (
        Category.NOT_FOUND,
        (
            "manifest unknown",
            "name unknown",
            "no matching manifest",
            "404",
            # A bare "not found" only where the registry said it of the reference:
            # containerd also says it of its own content and snapshots ("content digest
            # sha256:...: not found" when a layer is collected during an unpack), a race
            # that must be retried, not taken for a missing image for good.
            re.compile(r"failed to resolve (?:reference|image)\b.*: not found"),
            re.compile(r"manifest for \S+ not found"),
        ),
    ),
    (Category.DEADLINE_EXCEEDED, ("context deadline exceeded", "deadline exceeded")),
    (
        Category.REGISTRY_UNAVAILABLE,
        (
            "connection refused",
            "no such host",
            "i/o timeout",
            "dial tcp",
            "server misbehaving",
            "connection reset",
            "network is unreachable",
            "tls handshake",
            "server gave http response",
            "503 service unavailable",
            "502 bad gateway",
            "504 gateway",
            "unexpected eof",
            ": eof",
            "toomanyrequests",
            "too many requests",
        ),
    ),
)


def _matcher(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    """A status code counts only as a word of its own: a port (`:44047`), an address or a
    digest that happens to hold "404" must not read as an HTTP answer."""
    if isinstance(pattern, re.Pattern):
        return pattern
    text = re.escape(pattern)
    if pattern[0].isdigit():
        text = r"(?<![\w.:/@-])" + text + r"(?!\d)"
    return re.compile(text)


_MATCHERS: tuple[tuple[Category, tuple[re.Pattern[str], ...]], ...] = tuple(
    (category, tuple(_matcher(p) for p in patterns)) for category, patterns in _PATTERNS
)
# URLs name the registry and the repository the user chose; their words are not the error's.
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+")


def _image_spellings(image: str) -> re.Pattern[str] | None:
    """The ways a runtime may write `image` in its message: fully qualified, and Docker
    Hub's short forms, with a tag or digest or without. A one-word name (Docker Hub's
    `nginx`) counts only with its tag or digest: bare, it may be the error's own word."""
    try:
        ref = parse(image)
    except InvalidReference:
        return None
    names = {ref.name}
    if ref.domain == "docker.io":
        short = ref.path.removeprefix("library/")
        names |= {ref.path, short, f"docker.io/{short}"}
    tag, digest = r":[\w][\w.-]*", r"@[\w+.-]+:[0-9a-f]+"
    alternatives = [
        re.escape(n.lower()) + (rf"(?:{tag})?(?:{digest})?" if "/" in n else rf"(?:{tag}|{digest})")
        for n in sorted(names, key=len, reverse=True)
    ]
    return re.compile(rf"(?<![\w./-])(?:{'|'.join(alternatives)})")


def classify_message(message: str, image: str = "") -> Category:
    """`image`: the reference the message is about; its words (a repository named
    `denied` or `unauthorized`) are the user's, not the error's."""
    text = _URL.sub(" ", message.lower())
    spellings = _image_spellings(image) if image else None
    if spellings is not None:
        text = spellings.sub("<image>", text)
    for category, matchers in _MATCHERS:
        if any(m.search(text) for m in matchers):
            return category
    return Category.INTERNAL


def classify_rpc_error(err: grpc.RpcError, image: str = "") -> AgentError:
    """An error from the runtime's gRPC socket (CRI or containerd), about `image` if
    given."""
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        return AgentError(Category.RUNTIME_UNAVAILABLE, f"container runtime unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return AgentError(Category.DEADLINE_EXCEEDED, details)
    return AgentError(classify_message(details, image), details)


def parse_reference(ref: str) -> ImageRef:
    """The parsed reference, or an INVALID_REFERENCE failure."""
    try:
        return parse(ref)
    except InvalidReference as err:
        raise AgentError(Category.INVALID_REFERENCE, str(err)) from err
