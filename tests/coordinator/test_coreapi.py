"""The coordinator's core/v1 requests (`coordinator/coreapi.py`) against the real
apiserver: the same answers and errors as CoreV1Api, without loading it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import uuid
from typing import Any

import pytest
from kubernetes import client

from coordinator.coreapi import CoreV1, query_name
from coordinator.kube import Informer, KubeWriter, Obj, metadata_only
from tests.testenv import TestEnv


def _node(name: str, labels: dict[str, str]) -> client.V1Node:
    return client.V1Node(metadata=client.V1ObjectMeta(name=name, labels=labels))


def test_query_names_are_the_apiservers() -> None:
    assert query_name("resource_version") == "resourceVersion"
    assert query_name("allow_watch_bookmarks") == "allowWatchBookmarks"
    assert query_name("_continue") == "continue"
    assert query_name("limit") == "limit"


async def test_the_node_informer_lists_in_pages_and_watches(testenv: TestEnv) -> None:
    """Pages (continue tokens), then a watch: a label change and a deletion arrive."""
    api = testenv.api_client()
    core = client.CoreV1Api(api)
    mark = f"t-{uuid.uuid4().hex[:6]}"
    names = [f"{mark}-{i}" for i in range(5)]
    for name in names:
        core.create_node(_node(name, {"coreapi-test": mark}))
    seen: list[tuple[str, Obj | None]] = []
    informer = Informer(
        "nodes",
        api,
        CoreV1(api).list_node,
        lambda key, old, new: seen.append((key, new)),
        transform=metadata_only,
        page=2,
        label_selector=f"coreapi-test={mark}",
    )
    informer.start(post=asyncio.get_running_loop().call_soon_threadsafe)
    try:
        assert await asyncio.to_thread(informer.synced.wait, 30)
        assert set(informer.store) == set(names)
        core.patch_node(names[0], {"metadata": {"labels": {"extra": "yes"}}})
        core.delete_node(names[1])
        for _ in range(300):
            store = informer.store
            if names[1] not in store and store[names[0]]["metadata"]["labels"].get("extra"):
                break
            await asyncio.sleep(0.05)
        assert names[1] not in informer.store
        assert informer.store[names[0]]["metadata"]["labels"]["extra"] == "yes"
        assert (names[1], None) in seen
    finally:
        informer.stop()
        for name in names[:1] + names[2:]:
            core.delete_node(name)


def test_a_node_is_read_and_patched_on_its_version(testenv: TestEnv) -> None:
    api = testenv.api_client()
    core = CoreV1(api)
    name = f"t-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(api).create_node(_node(name, {"a": "1"}))
    try:
        node = core.read_node(name)
        assert isinstance(node, dict)
        assert node["metadata"]["labels"]["a"] == "1"
        version = node["metadata"]["resourceVersion"]
        patched = core.patch_node(
            name, {"metadata": {"resourceVersion": version, "labels": {"b": "2"}}}
        )
        assert patched["metadata"]["labels"] == {"a": "1", "b": "2"}  # merged, not replaced
        with pytest.raises(client.ApiException) as stale:
            core.patch_node(name, {"metadata": {"resourceVersion": version, "labels": {"c": "3"}}})
        assert stale.value.status == 409
        with pytest.raises(client.ApiException) as missing:
            core.read_node(name + "-gone")
        assert missing.value.status == 404
    finally:
        client.CoreV1Api(api).delete_node(name)


def test_secrets_are_models_as_corev1api_gives_them(testenv: TestEnv, namespace: str) -> None:
    core = CoreV1(testenv.api_client())
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name="s", namespace=namespace), data={"k": "djE="}
    )
    created = core.create_namespaced_secret(namespace, body)
    assert isinstance(created, client.V1Secret)
    with pytest.raises(client.ApiException) as exists:
        core.create_namespaced_secret(namespace, body)
    assert exists.value.status == 409
    read = core.read_namespaced_secret("s", namespace)
    assert read.data == {"k": "djE="}
    read.data = {"k": "djI="}
    replaced = core.replace_namespaced_secret("s", namespace, read)
    assert replaced.data == {"k": "djI="}
    assert replaced.metadata is not None
    assert read.metadata is not None
    assert replaced.metadata.resource_version != read.metadata.resource_version
    with pytest.raises(client.ApiException) as stale:  # replaced on the version read
        core.replace_namespaced_secret("s", namespace, read)
    assert stale.value.status == 409
    with pytest.raises(client.ApiException) as missing:
        core.read_namespaced_secret("nope", namespace)
    assert missing.value.status == 404


def a_cache(namespace: str) -> dict[str, Any]:
    """An ImageCache's identity, as Events name it."""
    return {
        "apiVersion": "kubefledged.io/v1alpha2",
        "kind": "ImageCache",
        "metadata": {"name": "c", "namespace": namespace, "uid": "u1"},
    }


def test_an_event_is_recorded(testenv: TestEnv, namespace: str) -> None:
    api = testenv.api_client()
    writer = KubeWriter(api)
    obj = a_cache(namespace)
    writer.event(obj, "Normal", "Tested", "an event through CoreV1")
    items = client.CoreV1Api(api).list_namespaced_event(namespace).items
    assert [(e.reason, e.message, e.involved_object.name) for e in items] == [
        ("Tested", "an event through CoreV1", "c")
    ]


def test_an_event_said_again_is_counted_on_the_first_one(testenv: TestEnv, namespace: str) -> None:
    """A cache failing on every retry says the same Events every few minutes: one Event
    counts them (`kubectl describe`: "x3 over ..."), as client-go's recorder does; one
    that expired meanwhile is recorded anew."""
    api = testenv.api_client()
    core = client.CoreV1Api(api)
    writer = KubeWriter(api)
    obj = a_cache(namespace)
    for _ in range(3):
        writer.event(obj, "Warning", "ImagePullFailed", "a:1: failed on 2 of 2 nodes")
    writer.event(obj, "Warning", "ImagePullFailed", "b:1: failed on 1 of 2 nodes")
    writer.event(obj, "Normal", "ImageCacheRefresh", "refreshing")

    def said() -> list[tuple[str, str, int]]:
        items = core.list_namespaced_event(namespace).items
        return sorted((e.reason or "", e.message or "", e.count or 0) for e in items)

    assert said() == [
        ("ImageCacheRefresh", "refreshing", 1),
        ("ImagePullFailed", "a:1: failed on 2 of 2 nodes", 3),
        ("ImagePullFailed", "b:1: failed on 1 of 2 nodes", 1),
    ]
    counted = next(e for e in core.list_namespaced_event(namespace).items if e.count == 3)
    assert counted.first_timestamp is not None
    assert counted.last_timestamp is not None
    assert counted.last_timestamp >= counted.first_timestamp
    # Expired (the apiserver's event TTL) or deleted: said again, it is recorded anew.
    core.delete_namespaced_event(str(counted.metadata.name), namespace)
    writer.event(obj, "Warning", "ImagePullFailed", "a:1: failed on 2 of 2 nodes")
    writer.event(obj, "Warning", "ImagePullFailed", "a:1: failed on 2 of 2 nodes")
    assert said() == [
        ("ImageCacheRefresh", "refreshing", 1),
        ("ImagePullFailed", "a:1: failed on 2 of 2 nodes", 2),
        ("ImagePullFailed", "b:1: failed on 1 of 2 nodes", 1),
    ]


def test_the_coordinators_kubernetes_io_loads_neither_corev1api_nor_cryptography(
    testenv: TestEnv,
) -> None:
    """21 MiB (CoreV1Api's models and validators) and 8 MiB (cryptography, for mTLS
    only) of a coordinator's memory: its wiring and its requests load neither."""
    script = textwrap.dedent(
        f"""
        import sys
        from kubernetes import client, config
        import coordinator.main
        from coordinator.controller import Controller, ControllerConfig
        from coordinator.kube import KubeWriter
        from coordinator.leader import LeaderElector
        from coordinator.nodes import NodeRegistry
        from coordinator.plan import Settings

        api = config.new_client_from_config({str(testenv.kubeconfig)!r})
        writer = KubeWriter(api)
        registry = NodeRegistry(None, lambda node, delay: None, 60.0)
        Controller(api, writer, registry, ControllerConfig(agent_namespace="default",
                   settings=Settings(), refresh_every=0))
        LeaderElector(api, "default", "coreapi-test", "me")
        writer.get_secret("default", "nope")
        writer.release_node("nope", "", "t", ("a", "b"))
        loaded = [m for m in ("kubernetes.client.api.core_v1_api", "cryptography")
                  if m in sys.modules]
        print(",".join(loaded) or "none")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "none"
