"""Driving ImageCaches as a user does: kubectl for writes, the API for reads."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from tests.testenv import TestEnv
from tests.testenv.agents import AgentProcess, CoordinatorProcess
from tests.testenv.containerd import Containerd
from tests.testenv.nodes import node_labels, register_node
from tests.testenv.paths import binary
from tests.testenv.runtime import NodeRuntime

GROUP, VERSION, PLURAL = "kubefledged.io", "v1alpha2", "imagecaches"


def kubectl(
    env: TestEnv, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(binary("kubectl")), f"--kubeconfig={env.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result


def cache_manifest(
    name: str, namespace: str, lists: list[dict[str, Any]], secrets: list[str] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"cacheSpec": lists}
    if secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in secrets]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ImageCache",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def apply(env: TestEnv, manifest: Mapping[str, Any]) -> None:
    kubectl(env, "apply", "-f", "-", stdin=json.dumps(manifest))


def get_cache(env: TestEnv, namespace: str, name: str) -> dict[str, Any] | None:
    api = client.CustomObjectsApi(env.api_client())
    try:
        obj: dict[str, Any] = api.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )  # type: ignore[assignment]
        return obj
    except client.ApiException as err:
        if err.status == 404:
            return None
        raise


def wait_for(
    what: str, check: Callable[[], Any], timeout: float = 60, interval: float = 0.3
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def wait_status(
    env: TestEnv,
    namespace: str,
    name: str,
    status: str,
    reason: str | None = None,
    timeout: float = 60,
    interval: float = 0.3,
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = get_cache(env, namespace, name) or {}
        st = obj.get("status") or {}
        current = st.get("observedGeneration") == obj.get("metadata", {}).get("generation")
        if (
            current
            and st.get("status") == status
            and (reason is None or st.get("reason") == reason)
        ):
            return obj
        return None

    try:
        result: dict[str, Any] = wait_for(
            f"{namespace}/{name} to be {status}/{reason}", check, timeout, interval
        )
    except AssertionError:
        obj = get_cache(env, namespace, name) or {}
        raise AssertionError(
            f"{name} never reached {status}/{reason}: {json.dumps(obj.get('status'), indent=1)}"
        ) from None
    return result


def node_images(env: TestEnv, node: str) -> dict[str, bool]:
    """repo tag -> pinned, as the node's containerd reports through CRI."""
    return runtime_images(env.node(node).runtime_endpoint)


def runtime_images(endpoint: str) -> dict[str, bool]:
    """repo tag -> pinned, as the containerd at `endpoint` reports through CRI."""
    with NodeRuntime(endpoint) as cri:
        return {tag: img.pinned for img in cri.list() for tag in img.repo_tags}


def agents_logged(env: TestEnv, text: str, nodes: Iterable[str]) -> bool:
    """Whether the agent of every one of `nodes` has logged `text`."""
    return all(text in (env.logs / f"agent-{node}.log").read_text() for node in nodes)


def events(env: TestEnv, namespace: str, name: str) -> list[tuple[str, str, str]]:
    """Each time something was said: an Event said again is counted on the first."""
    core = client.CoreV1Api(env.api_client())
    items = core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    ).items
    return [
        (e.type or "", e.reason or "", e.message or "") for e in items for _ in range(e.count or 1)
    ]


@contextlib.contextmanager
def stand_in(
    env: TestEnv,
    coordinator: CoordinatorProcess,
    args: tuple[str, ...],
    name: str,
    kill: bool = False,
) -> Iterator[CoordinatorProcess]:
    """Another coordinator, with other flags, in place of the suite's (stopped, or
    SIGKILLed with `kill`), which comes back afterwards."""
    if kill:
        coordinator.kill()
    else:
        coordinator.stop()
    other = env.start_coordinator(args, name=name)
    try:
        yield other
    finally:
        other.stop()
        coordinator.restart()


@dataclass
class ExtraNode:
    """A simulated node a test adds: its own containerd, its Node object, an agent."""

    name: str
    containerd: Containerd
    agent: AgentProcess


@contextlib.contextmanager
def extra_node(
    env: TestEnv,
    name: str,
    labels: dict[str, str],
    taints: list[dict[str, str]] | None = None,
    registry_hosts: tuple[str, ...] = (),
    lease: bool = True,
) -> Iterator[ExtraNode]:
    """`lease`: the agent registers its own Lease (False: the test writes it)."""
    containerd = Containerd(env.workdir, name, [env.registry.host, *registry_hosts])
    containerd.start()
    core = client.CoreV1Api(env.api_client())
    register_node(core, name, node_labels(name, labels), taints)
    node = ExtraNode(
        name,
        containerd,
        env.start_agent(
            node_name=name, runtime_endpoint=containerd.endpoint, lease=lease, name=f"agent-{name}"
        ),
    )
    try:
        yield node
    finally:
        node.agent.stop()
        containerd.stop()
        core.delete_node(name)
