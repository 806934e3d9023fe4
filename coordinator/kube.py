"""Kubernetes I/O: informers (list + watch into a local store) and the few writes the
coordinator makes. Blocking client calls run in threads; nothing here decides."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, cast

import urllib3
from kubernetes import client, watch

# Loaded now rather than by the first Event's or Secret's thread: building these model
# classes takes about 50 ms holding the GIL, which would stall the event loop then.
from kubernetes.client import (
    CoreV1Event,
    V1EventSource,
    V1ObjectMeta,
    V1ObjectReference,
    V1Secret,
)

from .api import GATE_RELEASED_ANNOTATION, GROUP, PLURAL, VERSION
from .coreapi import CoreV1
from .eventseries import EventSeries, SeriesKey
from .gate import without_taint

log = logging.getLogger(__name__)

Obj = dict[str, Any]
SECRET_TTL = 10.0  # seconds a pull Secret read is reused
SECRET_KEEP = 600.0  # seconds a read is kept in memory at most (the last read, for 5xx)
LIST_PAGE = 500  # objects per list request (client-go's informers list 500 at a time)
WATCH_SECONDS = 240  # the apiserver ends a watch after this long (a new one follows)
Handler = Callable[[str, Obj | None, Obj | None], None]  # key, old, new


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _interned(strings: Mapping[str, Any]) -> dict[str, Any]:
    """Labels and annotations with their keys and text values interned: the fleet's
    Nodes and Leases repeat the same ones (kubernetes.io/os: linux, ...), and each
    parsed object holds copies of its own (~1 KiB per Node and per Lease kept)."""
    return {sys.intern(k): sys.intern(v) if type(v) is str else v for k, v in strings.items()}


def metadata_only(obj: Obj) -> Obj:
    """What the coordinator reads of a Node: a real one carries kilobytes of status
    (its image list among them) that 5,000 of would keep in memory for nothing. Its
    taints, creation time and our gate's annotation serve node readiness gating."""
    meta = obj.get("metadata") or {}
    keep = (
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "labels",
        "deletionTimestamp",
        "creationTimestamp",
    )
    out: Obj = {"metadata": {k: meta[k] for k in keep if k in meta}}
    if meta.get("labels"):
        out["metadata"]["labels"] = _interned(meta["labels"])
    released = (meta.get("annotations") or {}).get(GATE_RELEASED_ANNOTATION)
    if released is not None:
        out["metadata"]["annotations"] = {GATE_RELEASED_ANNOTATION: released}
    taints = (obj.get("spec") or {}).get("taints")
    if taints:
        out["spec"] = {"taints": taints}
    return out


def without_managed_fields(obj: Obj) -> Obj:
    """An agent Lease as the coordinator reads it: its managedFields (the field
    owners' bookkeeping, larger than the rest of the Lease) kept in memory for
    5,000 agents would be megabytes read by no one; labels and annotations interned."""
    meta = obj.get("metadata")
    if meta:
        meta = {k: v for k, v in meta.items() if k != "managedFields"}
        for part in ("labels", "annotations"):
            if meta.get(part):
                meta[part] = _interned(meta[part])
        obj = {**obj, "metadata": meta}
    return obj


Post = Callable[..., Any]  # post(fn, *args): run fn(*args) on the thread that owns `store`


class Informer:
    """Keeps `store` equal to the server's objects and calls `handler` on each change.

    Relists when the watch expires (410) or fails; handlers must only enqueue work.
    Objects stay plain JSON dicts (`transform` may trim them): the client's model
    classes cost more CPU than everything else an informer does.

    The list and watch run in a thread, but `store` is changed, and `handler` called,
    only through `post` (the coordinator passes its event loop's call_soon_threadsafe):
    readers on that loop never see the store change under them. The thread keeps its
    own record of resourceVersions to tell what a relist changed.
    """

    def __init__(
        self,
        name: str,
        api: client.ApiClient,
        list_fn: Callable[..., Any],
        handler: Handler,
        transform: Callable[[Obj], Obj] | None = None,
        page: int = LIST_PAGE,
        **list_kwargs: Any,
    ) -> None:
        self.name = name
        self._page = page
        self._transform = transform
        self._api = api
        self._list = list_fn
        self._kwargs = list_kwargs
        self._handler = handler
        self.store: dict[str, Obj] = {}  # changed only by _apply, through _post
        self._versions: dict[str, str] = {}  # the informer thread's own view
        self._post: Post = _call
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"informer-{name}", daemon=True)

    @staticmethod
    def key(obj: Mapping[str, Any]) -> str:
        meta = obj["metadata"]
        ns = meta.get("namespace")
        return f"{ns}/{meta['name']}" if ns else str(meta["name"])

    def start(self, post: Post | None = None) -> None:
        """`post` runs store changes and handlers where the store's readers are."""
        if post is not None:
            self._post = post
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _as_dict(self, obj: Any) -> Obj:
        if not isinstance(obj, dict):
            obj = self._api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
        return self._transform(obj) if self._transform else cast(Obj, obj)

    def _relist(self) -> str:
        """Lists in pages, each trimmed before the next is read: a real Node is ~15 KB
        of JSON, and 5,000 of them parsed at once took the coordinator at rest to
        592 MiB against 289 paged (bench/idle_fleet.py); the store keeps trimmed
        copies. The pages are one snapshot: an expired continue token (410) relists
        from the start."""
        seen: set[str] = set()

        def listed(key: str, obj: Obj) -> None:
            seen.add(key)
            if self._versions.get(key) != obj["metadata"].get("resourceVersion"):
                self._emit(key, obj)

        version = self._pages(listed)
        for key in set(self._versions) - seen:
            self._emit(key, None)
        self._post(self.synced.set)  # after the changes above have been applied
        return version

    def _pages(self, each: Callable[[str, Obj], None]) -> str:
        """Lists every object, page by page; returns the list's resourceVersion."""
        token: str | None = None
        while True:
            page = {"_continue": token} if token else {}
            raw = self._list(_preload_content=False, limit=self._page, **page, **self._kwargs)
            resp = json.loads(raw.data)
            del raw
            for item in resp.get("items") or ():
                obj = self._as_dict(item)
                each(self.key(obj), obj)
            meta = resp.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return str(meta.get("resourceVersion", ""))
            del resp

    def read(self) -> dict[str, Obj]:
        """The objects as the API server has them now, read past the watch (blocking;
        the store is left to the watch): to confirm what the watch has not told."""
        objects: dict[str, Obj] = {}
        self._pages(objects.__setitem__)
        return objects

    def _emit(self, key: str, obj: Obj | None) -> None:
        """Informer thread: records the change, hands it to the store's owner."""
        if self._stop.is_set():
            return  # the owner may be gone (its loop closed)
        if obj is None:
            self._versions.pop(key, None)
        else:
            self._versions[key] = str(obj["metadata"].get("resourceVersion"))
        self._post(self._apply, key, obj)

    def _apply(self, key: str, obj: Obj | None) -> None:
        """The store's owner: the one place the store changes."""
        old = self.store.get(key)
        if obj is None:
            if old is None:
                return
            del self.store[key]
        else:
            self.store[key] = obj
        self._handler(key, old, obj)

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                version = self._relist()
                delay = 1.0
                while not self._stop.is_set():
                    # "object": events stay dicts instead of becoming model classes.
                    stream = watch.Watch(return_type="object").stream(  # type: ignore[no-untyped-call]
                        self._list,
                        resource_version=version,
                        timeout_seconds=WATCH_SECONDS,
                        # The apiserver ends each watch by then: silence past it is a
                        # dead connection, to be relisted, not waited on for good.
                        _request_timeout=(10, WATCH_SECONDS + 30),
                        allow_watch_bookmarks=True,
                        **self._kwargs,
                    )
                    for event in stream:
                        kind = event["type"]
                        obj = event["object"]
                        if kind == "ERROR":
                            raise client.ApiException(
                                status=obj.get("code", 500), reason=obj.get("message")
                            )
                        version = obj["metadata"].get("resourceVersion", version)
                        if kind == "BOOKMARK":
                            continue
                        obj = self._as_dict(obj)
                        self._emit(self.key(obj), None if kind == "DELETED" else obj)
                        if self._stop.is_set():
                            return
            except client.ApiException as err:
                if err.status != 410:
                    log.warning(
                        "%s watch failed (%s); relisting in %.0fs", self.name, err.reason, delay
                    )
                    time.sleep(delay)
                    delay = min(delay * 2, 30)
            except Exception as err:  # connection trouble: relist after a pause
                log.warning("%s watch broke (%s); relisting in %.0fs", self.name, err, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30)


def _call(fn: Callable[..., Any], *args: Any) -> None:
    fn(*args)


def _unavailable(err: Exception) -> bool:
    """The apiserver could not answer (5xx, throttled by priority and fairness, a
    timeout or a broken connection): no news about what was asked. Refusals (403) and
    other answers are news."""
    if isinstance(err, client.ApiException):
        return err.status is not None and (err.status >= 500 or err.status == 429)
    return True


def _finalizers_of(cache: Obj) -> tuple[str, list[str]]:
    meta = cache.get("metadata") or {}
    return meta.get("uid", ""), list(meta.get("finalizers") or [])


class KubeWriter:
    """The coordinator's writes: status, metadata patches, Events; and Secret reads."""

    def __init__(self, api: client.ApiClient, component: str = "kube-fledged-coordinator") -> None:
        self._custom = client.CustomObjectsApi(api)
        self._core = CoreV1(api)
        self._component = component
        self._host = f"{component}-{uuid.uuid4().hex[:6]}"
        self._secrets: dict[tuple[str, str], tuple[float, V1Secret | None]] = {}
        self._series = EventSeries()

    def get_cache(self, namespace: str, name: str) -> Obj | None:
        try:
            obj = self._custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            return cast(Obj, obj)
        except client.ApiException as err:
            if err.status == 404:
                return None
            raise

    def replace_status(self, obj: Obj) -> Obj:
        meta = obj["metadata"]
        result = self._custom.replace_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], obj
        )
        return cast(Obj, result)

    def patch_metadata(self, namespace: str, name: str, metadata: Obj) -> bool:
        """A merge patch of metadata; carrying resourceVersion makes it conditional.
        False: the cache is gone (deleted while it was reconciled; its watch event
        follows), nothing to patch."""
        try:
            self._custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, {"metadata": metadata}
            )
        except client.ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def set_finalizers(self, cache: Obj, finalizers: list[str]) -> bool:
        """Sets the cache's finalizers, provided the object (by uid) still has those our
        copy shows: a JSON patch testing them, not a resourceVersion, so our own status
        write or a spec edit since our read does not fail it (that 409 was logged as a
        failed reconcile at nearly every cache's creation), while a finalizer another
        controller added meanwhile is never erased. False: the cache is gone or its
        finalizers changed; either way its watch event brings the newer copy."""
        meta = cache["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        patch = [
            {"op": "test", "path": "/metadata/uid", "value": meta["uid"]},
            {"op": "test", "path": "/metadata/finalizers", "value": meta.get("finalizers")},
            {"op": "add", "path": "/metadata/finalizers", "value": finalizers},
        ]
        try:
            self._custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                patch,
                _content_type="application/json-patch+json",
            )
        except client.ApiException as err:
            if err.status == 404:
                return False
            if err.status == 422:  # a test failed, or the patch is invalid: which one?
                now = self.get_cache(namespace, name)
                if now is None or _finalizers_of(now) != _finalizers_of(cache):
                    return False
            raise
        return True

    def get_secret(self, namespace: str, name: str) -> V1Secret | None:
        """A pull Secret, read at most once per SECRET_TTL (None: it does not exist).

        A cache over a busy fleet is reconciled about once a second, every cache on any
        node's answer: without this, each of those reconciles read its Secrets anew."""
        key = (namespace, name)
        now = time.monotonic()
        cached = self._secrets.get(key)
        if cached is not None and now - cached[0] < SECRET_TTL:
            return cached[1]
        try:
            secret = self._core.read_namespaced_secret(name, namespace)
        except (client.ApiException, urllib3.exceptions.HTTPError) as err:
            if isinstance(err, client.ApiException) and err.status == 404:
                secret = None
            elif cached is not None and _unavailable(err):
                log.warning("reading Secret %s/%s: %s; using the last read", *key, err)
                return cached[1]  # the apiserver failing is no news about the Secret
            else:
                raise
        self._secrets[key] = (now, secret)
        if len(self._secrets) > 1:  # Secrets no cache asked for in a while go (credentials)
            for old in [k for k, (at, _) in self._secrets.items() if now - at > SECRET_KEEP]:
                del self._secrets[old]
        return secret

    def release_node(
        self, name: str, uid: str, taint: str, annotation: tuple[str, str]
    ) -> Obj | None:
        """Removes every taint with key `taint` from the Node (no other), annotating it
        in the same write. Conditional on the version read, so a taint another client
        adds meanwhile is never dropped: on a conflict, read again. Only the Node the
        decision was about (`uid`): one made anew under its name starts gated. Returns
        the Node as it was (for its Events), None if it is gone or the taint was gone
        already."""
        for _ in range(5):
            try:
                raw = self._core.read_node(name)
            except client.ApiException as err:
                if err.status == 404:
                    return None
                raise
            if uid and raw["metadata"].get("uid") != uid:
                return None
            taints = (raw.get("spec") or {}).get("taints") or []
            kept = without_taint(taints, taint)
            if len(kept) == len(taints):
                return None
            body = {
                "metadata": {
                    "resourceVersion": raw["metadata"]["resourceVersion"],
                    "annotations": dict([annotation]),
                },
                "spec": {"taints": kept},
            }
            try:
                self._core.patch_node(name, body)
                return {"apiVersion": "v1", "kind": "Node", **raw}
            except client.ApiException as err:
                if err.status != 409:
                    raise
        raise RuntimeError(f"node {name} kept changing")

    def event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """`obj`'s own namespace, or default for cluster-scoped objects (a Node's). Said
        again, it is counted on the Event recorded first (eventseries.py)."""
        meta = obj["metadata"]
        namespace = meta.get("namespace") or "default"
        involved = meta.get("uid") or meta["name"]
        series_key = (namespace, involved, obj.get("kind") or "", type_, reason, message)
        try:
            if self._said_again(series_key, namespace):
                return
            body = self._new_event(obj, namespace, type_, reason, message)
            created = self._core.create_namespaced_event(namespace, body)
        except client.ApiException as err:  # Events are best effort
            log.warning("could not record event %s on %s: %s", reason, meta["name"], err.reason)
            return
        self._series.said(series_key, created["metadata"]["name"], 1)

    def _new_event(
        self, obj: Mapping[str, Any], namespace: str, type_: str, reason: str, message: str
    ) -> CoreV1Event:
        meta = obj["metadata"]
        stamp = datetime.now(UTC)
        return CoreV1Event(
            metadata=V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=namespace),
            involved_object=V1ObjectReference(
                api_version=obj.get("apiVersion"),
                kind=obj.get("kind"),
                name=meta["name"],
                namespace=meta.get("namespace"),
                uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion"),
            ),
            type=type_,
            reason=reason,
            message=message,
            first_timestamp=stamp,
            last_timestamp=stamp,
            count=1,
            source=V1EventSource(component=self._component),
            reporting_component=self._component,
            reporting_instance=self._host,
        )

    def _said_again(self, key: SeriesKey, namespace: str) -> bool:
        """Counted on the Event this process recorded for it; False if there is none
        (any more: Events expire)."""
        series = self._series.get(key)
        if series is None:
            return False
        repeat = {"count": series.count + 1, "lastTimestamp": now_iso()}
        try:
            self._core.patch_namespaced_event(series.name, namespace, repeat)
        except client.ApiException as err:
            if err.status != 404:
                raise
            self._series.forget(key)
            return False
        self._series.said(key, series.name, series.count + 1)
        return True
