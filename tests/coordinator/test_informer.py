"""The informer against the real apiserver: its store changes only on the thread that
reads it, however fast the server's objects change."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from typing import Any

from kubernetes import client

from common.wire import COMPONENT_LABELS, ENDPOINT_ANNOTATION, NODE_LABEL
from coordinator.controller import agent_from_lease
from coordinator.kube import Informer, Obj, without_managed_fields
from tests.testenv import TestEnv

CHURN = 150  # ConfigMaps created, updated and deleted while the store is read


class WatchedStore(dict[str, Obj]):
    """A store that records which threads change it."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: set[int] = set()

    def __setitem__(self, key: str, value: Obj) -> None:
        self.writers.add(threading.get_ident())
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.writers.add(threading.get_ident())
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:
        self.writers.add(threading.get_ident())
        return super().pop(key, *default)


def _churn(core: client.CoreV1Api, namespace: str) -> None:
    for i in range(CHURN):
        body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"cm-{i}"), data={"n": "0"})
        core.create_namespaced_config_map(namespace, body)
        if i % 3 == 0:
            core.patch_namespaced_config_map(f"cm-{i}", namespace, {"data": {"n": "1"}})
        if i % 2 == 0:
            core.delete_namespaced_config_map(f"cm-{i}", namespace)


async def test_the_store_changes_only_on_its_readers_loop_while_objects_churn(
    testenv: TestEnv, namespace: str
) -> None:
    """The reported race: the event loop iterated a store (`_live_specs`, the pin sweep)
    while the informer thread changed it ("dictionary changed size during iteration")."""
    api = testenv.api_client()
    core = client.CoreV1Api(api)
    handled: set[int] = set()

    def handler(key: str, old: Obj | None, new: Obj | None) -> None:
        handled.add(threading.get_ident())

    informer = Informer(
        "configmaps", api, core.list_namespaced_config_map, handler, namespace=namespace
    )
    store = informer.store = WatchedStore()
    informer.start(post=asyncio.get_running_loop().call_soon_threadsafe)
    try:
        assert await asyncio.to_thread(informer.synced.wait, 30)
        writer = asyncio.create_task(asyncio.to_thread(_churn, core, namespace))
        passes = 0
        while not writer.done():
            for _key, obj in store.items():  # as the coordinator's readers iterate
                assert obj["metadata"]["name"]
            passes += 1
            await asyncio.sleep(0)
        await writer
        expected = {f"{namespace}/cm-{i}" for i in range(CHURN) if i % 2}
        for _ in range(300):  # the last events may still be on their way
            if {k for k in store if "/cm-" in k} == expected:
                break
            await asyncio.sleep(0.1)
    finally:
        informer.stop()
    loop_thread = threading.get_ident()
    assert passes > 0
    assert {k for k in store if "/cm-" in k} == expected
    assert store.writers == {loop_thread}
    assert handled == {loop_thread}
    updated = store[f"{namespace}/cm-3"]
    assert updated["data"] == {"n": "1"}


async def test_agent_leases_are_kept_without_their_managed_fields(
    testenv: TestEnv, namespace: str
) -> None:
    """5,000 agents' Leases: their field owners' bookkeeping is not kept, what the
    coordinator reads of them is, and a renewal comes through trimmed too."""
    api = testenv.api_client()
    leases = client.CoordinationV1Api(api)
    body = client.V1Lease(
        metadata=client.V1ObjectMeta(
            name="agent-n1",
            labels={**COMPONENT_LABELS, NODE_LABEL: "n1"},
            annotations={ENDPOINT_ANNOTATION: "10.0.0.1:50051"},
        ),
        spec=client.V1LeaseSpec(
            holder_identity="n1", lease_duration_seconds=40, renew_time=datetime.now(UTC)
        ),
    )
    created = leases.create_namespaced_lease(namespace, body).metadata
    assert created is not None
    assert created.managed_fields  # the server keeps them: there is work to do
    informer = Informer(
        "leases",
        api,
        leases.list_namespaced_lease,
        lambda *_: None,
        transform=without_managed_fields,
        namespace=namespace,
    )
    informer.start(post=asyncio.get_running_loop().call_soon_threadsafe)
    try:
        assert await asyncio.to_thread(informer.synced.wait, 30)
        key = f"{namespace}/agent-n1"
        listed = informer.store[key]
        leases.patch_namespaced_lease(
            "agent-n1", namespace, {"spec": {"renewTime": datetime.now(UTC).isoformat()}}
        )
        for _ in range(300):
            if informer.store[key]["metadata"]["resourceVersion"] != created.resource_version:
                break
            await asyncio.sleep(0.05)
        renewed = informer.store[key]
    finally:
        informer.stop()
    for obj in (listed, renewed):
        assert "managedFields" not in obj["metadata"]
        agent = agent_from_lease(obj)
        assert agent is not None
        assert (agent.node, agent.endpoint, agent.duration) == ("n1", "10.0.0.1:50051", 40.0)
    assert renewed["metadata"]["resourceVersion"] != created.resource_version


async def test_a_list_is_read_in_pages_each_trimmed_before_the_next(
    testenv: TestEnv, namespace: str
) -> None:
    """5,000 real Nodes are ~75 MB of JSON in one list: the informer asks for pages and
    trims each page's objects before it asks for the next, so it never holds more than
    a page of untrimmed objects; what it keeps is the whole list all the same."""
    api = testenv.api_client()
    core = client.CoreV1Api(api)
    for i in range(7):
        body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"p-{i}"), data={"n": "x"})
        core.create_namespaced_config_map(namespace, body)
    steps: list[str] = []

    def list_fn(**kwargs: Any) -> Any:
        if not kwargs.get("watch"):
            steps.append(f"page limit={kwargs.get('limit')} from={bool(kwargs.get('_continue'))}")
        return core.list_namespaced_config_map(**kwargs)

    def trim(obj: Obj) -> Obj:
        steps.append("trim")
        return {"metadata": obj["metadata"]}

    informer = Informer(
        "pages", api, list_fn, lambda *_: None, transform=trim, page=3, namespace=namespace
    )
    informer.start(post=asyncio.get_running_loop().call_soon_threadsafe)
    try:
        assert await asyncio.to_thread(informer.synced.wait, 30)
        store = dict(informer.store)
    finally:
        informer.stop()
    listed = {k for k in store if "/p-" in k}
    assert listed == {f"{namespace}/p-{i}" for i in range(7)}
    assert all("data" not in obj for obj in store.values())
    pages = [s for s in steps if s.startswith("page")]
    assert pages[0] == "page limit=3 from=False"
    assert len(pages) >= 3  # 7 objects, 3 a page
    assert all(p == "page limit=3 from=True" for p in pages[1:])
    # every page's objects are trimmed before the next page is requested
    first, second = steps.index(pages[0]), steps.index(pages[1])
    assert steps[first + 1 : second] == ["trim"] * 3
