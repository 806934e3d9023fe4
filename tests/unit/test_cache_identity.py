"""A cache deleted and made again under the same name is a new cache, even when the
coordinator never saw the deletion on its own (the DELETED and ADDED events of one key
met in the work queue): it kept the old one's record, so the old applied lists became
removals on the new one and the old purge made the new cache hold nothing."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from coordinator.controller import Controller, ControllerConfig
from coordinator.kube import KubeWriter
from coordinator.nodes import NodeRegistry
from coordinator.plan import Settings

KEY = "ns/c"


def cache(uid: str, images: list[str], status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "ns",
            "name": "c",
            "uid": uid,
            "generation": 1,
            "resourceVersion": uid + "-1",
        },
        "spec": {"cacheSpec": [{"images": images}]},
        "status": status or {},
    }


async def test_a_cache_made_again_under_its_name_starts_from_nothing() -> None:
    api = client.ApiClient()
    registry = NodeRegistry(None, lambda node, delay: None, 60.0)  # type: ignore[arg-type]
    config = ControllerConfig(agent_namespace="ns", settings=Settings(), refresh_every=0)
    ctrl = Controller(api, KubeWriter(api), registry, config)
    purged = {
        "purgedGeneration": 1,
        "appliedLists": [{"images": ["r.io/old:1", "r.io/kept:1"], "nodeSelector": {}}],
    }
    old, state, _, _ = await ctrl._share(KEY, cache("u1", ["r.io/kept:1"], purged))
    assert old.dormant  # the old one was purged at its generation
    assert [r[0] for r in old.removing] == ["r.io/old:1"]
    new, state, _, _ = await ctrl._share(KEY, cache("u2", ["r.io/kept:1"]))
    assert not new.dormant
    assert new.wants
    assert new.removing == ()
    assert state.uid == "u2"
    # The same object seen again keeps its record.
    _, same, _, _ = await ctrl._share(KEY, cache("u2", ["r.io/kept:1"]))
    assert same is state


async def test_the_refresh_timer_leaves_a_purged_cache_empty() -> None:
    """kube-fledged's refresh worker skips purged caches; ours refreshed them, so every
    purge was pulled and pinned back within a refresh period."""
    api = client.ApiClient()
    registry = NodeRegistry(None, lambda node, delay: None, 60.0)  # type: ignore[arg-type]
    config = ControllerConfig(agent_namespace="ns", settings=Settings(), refresh_every=0)
    ctrl = Controller(api, KubeWriter(api), registry, config)
    purged = {"purgedGeneration": 1, "appliedLists": [{"images": ["r.io/a:1"]}]}
    obj = cache("u1", ["r.io/a:1"], purged)
    live = {**cache("u2", ["r.io/b:1"]), "metadata": {**obj["metadata"], "name": "d"}}
    ctrl.caches.store.update({KEY: obj, "ns/d": live})
    view, _, _, _ = await ctrl._share(KEY, obj)
    assert view.dormant
    ctrl.refresh_all(1000.0)
    view, _, _, _ = await ctrl._share(KEY, obj)
    assert view.dormant
    assert not view.wants
    assert ctrl.refreshes.since("ns/d") == 1000.0  # the others do refresh
    # an edit makes it live again, and the timer refreshes it then
    edited = {**obj, "metadata": {**obj["metadata"], "generation": 2}}
    ctrl.caches.store[KEY] = edited
    view, _, _, _ = await ctrl._share(KEY, edited)
    assert view.wants
    ctrl.refresh_all(2000.0)
    assert ctrl.refreshes.since(KEY) == 2000.0


async def test_an_edit_or_a_cache_made_anew_dates_its_spec_so_old_failures_retry() -> None:
    api = client.ApiClient()
    registry = NodeRegistry(None, lambda node, delay: None, 60.0)  # type: ignore[arg-type]
    config = ControllerConfig(agent_namespace="ns", settings=Settings(), refresh_every=0)
    ctrl = Controller(api, KubeWriter(api), registry, config)
    first, _, _, _ = await ctrl._share(KEY, cache("u1", ["r.io/a:1"]))
    again, _, _, _ = await ctrl._share(KEY, cache("u1", ["r.io/a:1"]))
    assert first.edited is not None
    assert again.edited == first.edited  # the same generation: the same date
    edited = cache("u1", ["r.io/a:1", "r.io/b:1"])
    edited["metadata"]["generation"] = 2
    later, _, _, _ = await ctrl._share(KEY, edited)
    assert later.edited is not None
    assert later.edited > first.edited
    anew, _, _, _ = await ctrl._share(KEY, cache("u2", ["r.io/a:1"]))
    assert anew.edited is not None
    assert anew.edited > first.edited
