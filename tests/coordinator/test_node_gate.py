"""Node readiness gating on simulated nodes (the kubelet case is in tests/realnodes): a
node that joins with the startup taint loses it once its cached images are there, when
only images that failed for good are missing, or at its deadline; only our key is
ever touched, and a node without the taint is never tainted."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from tests.conftest import unique
from tests.coordinator.helpers import (
    apply,
    cache_manifest,
    events,
    extra_node,
    get_cache,
    runtime_images,
    stand_in,
    wait_for,
)
from tests.testenv import TestEnv
from tests.testenv.agents import CoordinatorProcess
from tests.testenv.procs import free_port

TAINT = "kubefledged.io/caching"
OURS = {"key": TAINT, "effect": "NoSchedule"}
OTHER = {"key": "example.com/other", "effect": "NoSchedule"}
DEADLINE = 20  # seconds


@pytest.fixture
def gating(testenv: TestEnv, coordinator: CoordinatorProcess) -> Iterator[CoordinatorProcess]:
    """A coordinator with the gate on, in place of the suite's."""
    args = (f"--node-gate-taint={TAINT}", f"--node-gate-deadline={DEADLINE}s")
    with stand_in(testenv, coordinator, args, "coordinator-gate") as gate:
        yield gate


def taints(env: TestEnv, node: str) -> list[dict[str, Any]]:
    spec = client.CoreV1Api(env.api_client()).read_node(node).spec
    return [{"key": t.key, "effect": t.effect} for t in (spec.taints if spec else None) or []]


def cache_status(env: TestEnv, namespace: str, name: str) -> dict[str, Any]:
    return dict((get_cache(env, namespace, name) or {}).get("status") or {})


def node_events(env: TestEnv, node: str) -> list[tuple[str, str, str]]:
    return events(env, "default", node)


def test_a_node_joining_with_the_taint_loses_it_once_its_images_are_pinned(
    testenv: TestEnv, gating: CoordinatorProcess, namespace: str
) -> None:
    registry = testenv.registry_client()
    image = registry.push_image(unique("gate/app"), "v1", size=2 << 20, layers=2)
    pool = {"fledged.test/pool": unique("gated")}
    apply(
        testenv, cache_manifest("gated", namespace, [{"images": [image.ref], "nodeSelector": pool}])
    )
    name = unique("gated-node")
    with extra_node(testenv, name, pool, taints=[OURS, OTHER]) as node:
        wait_for("our taint to go", lambda: OURS not in taints(testenv, name), timeout=60)
        held = runtime_images(node.containerd.endpoint)
        assert held.get(image.ref) is True  # pinned before release
        # Only our key is touched (the apiserver's own not-ready taint aside: nothing here
        # plays the node lifecycle controller that would lift it from a simulated node).
        kept = [t for t in taints(testenv, name) if t["key"] != "node.kubernetes.io/not-ready"]
        assert kept == [OTHER]
        released = wait_for(
            "the release Event",
            lambda: [e for e in node_events(testenv, name) if e[1] == "CacheGateReleased"],
            timeout=10,
        )
        assert released[0][0] == "Normal"
        status = wait_for(
            "the cache to count the release",
            lambda: (
                (st := cache_status(testenv, namespace, "gated")).get("nodesReleased") == 1 and st
            ),
            timeout=10,
        )
        assert status["status"] == "Succeeded"
        assert status["nodesGated"] == 0
    for other in ("node-1", "node-2", "node-3"):  # never tainted by us
        assert TAINT not in {t["key"] for t in taints(testenv, other)}


def test_a_node_whose_images_cannot_arrive_is_released_at_its_deadline(
    testenv: TestEnv, gating: CoordinatorProcess, namespace: str
) -> None:
    """A registry that refuses connections: the pull fails and is retried with backoff,
    so the node waits, until its deadline; then the Warning names what is missing, on
    the Node and on the cache."""
    unreachable = f"127.0.0.1:{free_port()}"
    ref = f"{unreachable}/gate/never:v1"
    pool = {"fledged.test/pool": unique("deadline")}
    apply(testenv, cache_manifest("late", namespace, [{"images": [ref], "nodeSelector": pool}]))
    name = unique("late-node")
    with extra_node(testenv, name, pool, taints=[OURS], registry_hosts=(unreachable,)):
        # (AgentUnavailable first, for the moment between the Node and its agent.)
        status = wait_for(
            "the pull to fail as RegistryUnavailable",
            lambda: (
                (st := cache_status(testenv, namespace, "late"))
                .get("failures", {})
                .get(ref, [{}])[0]
                .get("reason")
                == "RegistryUnavailable"
                and st
            ),
            timeout=60,
        )
        assert status["status"] == "Failed"
        assert status["nodesGated"] == 1
        assert OURS in taints(testenv, name)  # held: the failure may pass
        wait_for("the deadline release", lambda: OURS not in taints(testenv, name), timeout=60)
        warning = wait_for(
            "the Node's Warning",
            lambda: [e for e in node_events(testenv, name) if e[1] == "CacheGateDeadline"],
            timeout=10,
        )
        assert warning[0][0] == "Warning"
        assert ref in warning[0][2]
        on_cache = wait_for(
            "the cache's Warning",
            lambda: [e for e in events(testenv, namespace, "late") if e[1] == "CacheGateDeadline"],
            timeout=10,
        )
        assert name in on_cache[0][2]
        assert ref in on_cache[0][2]


def test_a_node_missing_only_images_that_failed_for_good_is_released_at_once(
    testenv: TestEnv, gating: CoordinatorProcess, namespace: str
) -> None:
    registry = testenv.registry_client()
    present = registry.push_image(unique("gate/present"), "v1")
    missing = f"{testenv.registry.host}/{unique('gate/missing')}:v1"  # NotFound
    pool = {"fledged.test/pool": unique("notfound")}
    apply(
        testenv,
        cache_manifest(
            "partly", namespace, [{"images": [present.ref, missing], "nodeSelector": pool}]
        ),
    )
    name = unique("partly-node")
    with extra_node(testenv, name, pool, taints=[OURS]) as node:
        wait_for("the release", lambda: OURS not in taints(testenv, name), timeout=DEADLINE - 5)
        warning = wait_for(
            "the Warning",
            lambda: [e for e in node_events(testenv, name) if e[1] == "CacheGateFailed"],
            timeout=10,
        )
        assert missing in warning[0][2]
        assert runtime_images(node.containerd.endpoint).get(present.ref) is True
