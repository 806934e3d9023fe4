"""One identity for an image, parsed once where a reference enters the coordinator (a
spec, an agent's answer or listing) and used as the key of every map after that."""

from __future__ import annotations

import functools
from typing import NewType

from common.reference import ImageRef, InvalidReference, parse

# The canonical reference (`reg.io/app:v1`, `docker.io/library/nginx:latest`,
# `reg.io/app@sha256:...`): what a runtime stores, and how every map is keyed.
ImageKey = NewType("ImageKey", str)


@functools.lru_cache(maxsize=65536)
def image_key(reference: str) -> ImageKey:
    """Raises InvalidReference (a spec is validated before it gets here)."""
    return ImageKey(parse(reference).canonical)


def key_or_none(reference: str) -> ImageKey | None:
    """For names a runtime reports (an image id is no reference)."""
    try:
        return image_key(reference)
    except InvalidReference:
        return None


def ref_of(key: ImageKey) -> ImageRef:
    """The parsed form of a key (cached by `parse`)."""
    return parse(key)


@functools.lru_cache(maxsize=65536)
def lookup_name(key: ImageKey) -> ImageKey:
    """The name a runtime lists the image under: `name@digest` when the key has a
    digest (a tag beside it is not checked by runtimes), else the key itself."""
    return ImageKey(parse(key).lookup_key)
