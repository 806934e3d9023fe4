"""The ImageCache CRD in the cluster checked before anything is served.

Helm installs a chart's CRDs only when none exists: a cluster moving from kube-fledged
keeps kube-fledged's CRD (no status subresource, none of our status fields), and an
upgrade of ours keeps the old one. The coordinator then could write no status, or the
apiserver would prune the bookkeeping a restart needs. So it waits, not ready, saying
what to apply, until the CRD has what it uses; an edit of the CRD is picked up without
a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes.client import ApiClient, ApiextensionsV1Api
from kubernetes.client.exceptions import ApiException

from .api import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

CRD_NAME = f"{PLURAL}.{GROUP}"
RECHECK_SECONDS = 10.0
FIX = (
    "apply this release's CRD: kubectl apply --server-side --force-conflicts -f deploy/crds/ "
    "(helm installs CRDs only when absent and never upgrades them)"
)
# Fields of ours the coordinator reads back or users set, by schema path.
REQUIRED = (
    ("spec", "cacheSpec", "items", "pin"),
    ("spec", "maxConcurrentNodesPerImage"),
    ("status", "observedGeneration"),
    ("status", "appliedLists"),
    ("status", "removing"),
    ("status", "purgedGeneration"),
    ("status", "conditions"),
)


def _schema_has(schema: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    """Whether the schema keeps `path` (declared, or under a node that keeps unknown
    fields)."""
    node: Mapping[str, Any] = schema
    for part in path:
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return True
        child = node.get("items") if part == "items" else (node.get("properties") or {}).get(part)
        if child is None:
            return False
        node = child
    return True


def crd_problem(crd: Mapping[str, Any] | None) -> str | None:
    """What the CRD lacks for this coordinator, or None when it has everything."""
    if crd is None:
        return f"the ImageCache CRD ({CRD_NAME}) is not installed"
    version = next(
        (v for v in (crd.get("spec") or {}).get("versions") or () if v.get("name") == VERSION),
        None,
    )
    if version is None or not version.get("served"):
        return f"the ImageCache CRD does not serve {VERSION}"
    if "status" not in (version.get("subresources") or {}):
        return (
            "the ImageCache CRD has no status subresource (kube-fledged's own CRD?): "
            "no status could be written"
        )
    schema = (version.get("schema") or {}).get("openAPIV3Schema") or {}
    missing = [
        ".".join(p).replace(".items.", "[].") for p in REQUIRED if not _schema_has(schema, p)
    ]
    if missing:
        return (
            "the ImageCache CRD is older than this coordinator (kube-fledged's own, or an "
            f"earlier release's): it lacks {', '.join(missing)}, which the apiserver "
            "would drop"
        )
    return None


def read_crd(api: ApiClient) -> Mapping[str, Any] | None:
    """The CRD as its JSON; None when absent. Raises ApiException for other answers."""
    try:
        crd = ApiextensionsV1Api(api).read_custom_resource_definition(CRD_NAME)
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    return dict(api.sanitize_for_serialization(crd))  # type: ignore[no-untyped-call]


async def wait_for_crd(
    api: ApiClient,
    stop: asyncio.Event,
    read: Callable[[ApiClient], Mapping[str, Any] | None] = read_crd,
    recheck: float = RECHECK_SECONDS,
) -> bool:
    """Returns once the CRD is fit (True), or False if stopped first. A CRD this
    coordinator may not read (403: RBAC of one's own) is not waited for."""
    said = ""
    while not stop.is_set():
        try:
            problem = crd_problem(await asyncio.to_thread(read, api))
        except ApiException as err:
            if err.status == 403:
                log.warning("may not read the ImageCache CRD to check it; going on")
                return True
            problem = f"the ImageCache CRD cannot be read: {err.status} {err.reason}"
        except Exception as err:  # the apiserver unreachable: try again
            problem = f"the ImageCache CRD cannot be read: {err}"
        if problem is None:
            if said:
                log.info("the ImageCache CRD is fit now; starting")
            return True
        if problem != said:
            log.error("not starting: %s; %s", problem, FIX)
            said = problem
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), recheck)
    return False
