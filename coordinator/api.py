"""The ImageCache API (kubefledged.io/v1alpha2), compatible with kube-fledged's: names,
annotations, reasons and messages, and the parsing of a spec into plain data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.reference import InvalidReference, parse

GROUP = "kubefledged.io"
VERSION = "v1alpha2"
PLURAL = "imagecaches"
KIND = "ImageCache"
API_VERSION = f"{GROUP}/{VERSION}"
FINALIZER = "kubefledged.io/unpin-images"
REFRESH_ANNOTATION = "kubefledged.io/refresh-imagecache"
PURGE_ANNOTATION = "kubefledged.io/purge-imagecache"
# On a Node whose startup taint node readiness gating removed: why and when.
GATE_RELEASED_ANNOTATION = "kubefledged.io/gate-released"


class Status:
    PROCESSING = "Processing"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    ABORTED = "Aborted"
    UNKNOWN = "Unknown"


class Reason:
    """kube-fledged's reasons, plus ours (marked)."""

    CREATE = "ImageCacheCreate"
    UPDATE = "ImageCacheUpdate"
    REFRESH = "ImageCacheRefresh"
    PURGE = "ImageCachePurge"
    DELETE = "ImageCacheDelete"
    PULLED = "ImagesPulledSuccessfully"
    DELETED = "ImagesDeletedSuccessfully"
    FAILED_FOR_SOME_IMAGES = "ImagePullFailedForSomeImages"
    FAILED_ON_SOME_NODES = "ImagePullFailedOnSomeNodes"
    DELETE_FAILED_FOR_SOME_IMAGES = "ImageDeleteFailedForSomeImages"
    SPEC_INVALID = "CacheSpecValidationFailed"
    PULL_SECRET_INVALID = "ImagePullSecretInvalid"  # ours
    NO_MATCHING_NODES = "NoMatchingNodes"  # ours
    AGENT_UNAVAILABLE = "AgentUnavailable"  # ours, per node


class Message:
    PULLING = "Images are being pulled on to the nodes. Please view the status after some time"
    UPDATING = "Image cache is being updated. Please view the status after some time"
    REFRESHING = "Image cache is being refreshed. Please view the status after some time"
    PURGING = "Image cache is being purged. Please view the status after some time"
    DELETING = "Images in the cache are being deleted. Please view the status after some time"
    PULLED = "All requested images pulled succesfully to respective nodes"
    DELETED = "All cached images succesfully deleted from respective nodes"
    FAILED_FOR_SOME_IMAGES = 'Image pull failed for some images. Please see "failures" section'
    FAILED_ON_SOME_NODES = 'Image pull failed on some nodes. Please see "failures" section'
    DELETE_FAILED = 'Image deletion failed for some images. Please see "failures" section'


class SpecError(ValueError):
    """The spec cannot be acted on; the message tells the user what to fix."""


@dataclass(frozen=True)
class CacheList:
    images: tuple[str, ...]
    node_selector: tuple[tuple[str, str], ...]  # sorted pairs: hashable, comparable
    pin: bool = True

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.node_selector)

    def selector_text(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.node_selector) or "<all nodes>"


@dataclass(frozen=True)
class CacheSpec:
    lists: tuple[CacheList, ...]
    pull_secrets: tuple[str, ...]
    max_concurrent_nodes_per_image: int | None = None


def parse_list(raw: Mapping[str, Any], index: int) -> CacheList:
    images = raw.get("images")
    if not isinstance(images, list) or not images:
        raise SpecError(f"cacheSpec[{index}].images must be a non-empty list")
    seen: set[str] = set()
    for image in images:
        if not isinstance(image, str):
            raise SpecError(f"cacheSpec[{index}].images holds a non-string: {image!r}")
        try:
            canonical = parse(image).canonical
        except InvalidReference as err:
            raise SpecError(f"cacheSpec[{index}]: {err}") from err
        if canonical in seen:
            raise SpecError(f"cacheSpec[{index}].images lists {image!r} twice")
        seen.add(canonical)
    selector = raw.get("nodeSelector") or {}
    if not isinstance(selector, dict):
        raise SpecError(f"cacheSpec[{index}].nodeSelector must be a map of labels")
    for key, value in selector.items():
        if not isinstance(value, str):  # null would otherwise read as "None"
            raise SpecError(f"cacheSpec[{index}].nodeSelector[{key!r}] must be a label value")
    pin = raw.get("pin", True)
    return CacheList(
        images=tuple(images),
        node_selector=tuple(sorted((str(k), str(v)) for k, v in selector.items())),
        pin=bool(pin),
    )


def parse_spec(obj: Mapping[str, Any]) -> CacheSpec:
    spec = obj.get("spec") or {}
    raw_lists = spec.get("cacheSpec")
    if not isinstance(raw_lists, list) or not raw_lists:
        raise SpecError("spec.cacheSpec must be a non-empty list")
    lists = tuple(parse_list(raw, i) for i, raw in enumerate(raw_lists))
    secrets = tuple(
        str(s.get("name")) for s in spec.get("imagePullSecrets") or () if isinstance(s, dict)
    )
    wave = spec.get("maxConcurrentNodesPerImage")
    return CacheSpec(
        lists=lists,
        pull_secrets=secrets,
        max_concurrent_nodes_per_image=int(wave) if wave else None,
    )


def applied_lists(status: Mapping[str, Any]) -> tuple[CacheList, ...]:
    """The lists the last reconcile acted on (for removals after an edit)."""
    out = []
    for raw in status.get("appliedLists") or ():
        try:
            out.append(parse_list(raw, 0))
        except SpecError:
            continue
    return tuple(out)


def list_to_json(cache_list: CacheList) -> dict[str, Any]:
    out: dict[str, Any] = {"images": list(cache_list.images)}
    if cache_list.node_selector:
        out["nodeSelector"] = dict(cache_list.node_selector)
    if not cache_list.pin:
        out["pin"] = False
    return out
