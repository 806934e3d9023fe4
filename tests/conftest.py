"""Fixtures over the real test environment (tests/testenv): one cluster for the whole
run, a fresh namespace per test, and every component's log attached to a failure."""

from __future__ import annotations

import contextlib
import re
import signal
import time
import uuid
from collections.abc import Generator, Iterator
from typing import Protocol

import pytest
from kubernetes import client

from tests.realnodes.gc_cluster import GC_CLUSTER
from tests.testenv import MissingBinary, TestEnv
from tests.testenv.agents import AgentProcess, CoordinatorProcess

# Fixtures of real components; the last two are clusters of their own (tests/realnodes).
ENV_FIXTURES = {"testenv", "namespace", "kube", "agents", "coordinator", "user", "gc_node"}
GC_FIXTURE = "gc_node"  # its test runs last: see tests/realnodes/gc_cluster.py
# node-1 and node-2 are "edge" nodes in zone a; node-3 is in zone b.
NODE_LABELS = {
    "node-1": {"fledged.test/zone": "a", "fledged.test/tier": "edge"},
    "node-2": {"fledged.test/zone": "a", "fledged.test/tier": "edge"},
    "node-3": {"fledged.test/zone": "b"},
}
_reported: list[tuple[str, LogSource]] = []  # whose logs a failing test shows


class LogSource(Protocol):
    def log_report(self) -> str: ...


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM (a CI timeout, `kill`) ends the run as Ctrl-C does, so fixture teardown
    still stops every process and puts the host back (kubelet nodes change it)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the real environment carry the `env` marker (`-m 'not env'` skips
    them); the image GC test goes last."""
    for item in items:
        if ENV_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.env)
    items.sort(key=lambda item: GC_FIXTURE in getattr(item, "fixturenames", ()))


def pytest_collection_finish(session: pytest.Session) -> None:
    """The GC node starts now, when its test is to run: its kubelet's first GC pass is
    five minutes away, and the other tests run meanwhile."""
    if session.config.option.collectonly:
        return
    if any(GC_FIXTURE in getattr(item, "fixturenames", ()) for item in session.items):
        GC_CLUSTER.begin()


def pytest_sessionfinish(session: pytest.Session) -> None:
    GC_CLUSTER.stop()  # done already unless the run was cut short


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed:
        for title, source in _reported:
            report.sections.append((f"{title}: logs (tails)", source.log_report()))


@contextlib.contextmanager
def reported(title: str, source: LogSource) -> Iterator[None]:
    """While in it, a failing test shows the tails of `source`'s logs too (kubelet
    nodes, an environment of a module's own)."""
    entry = (title, source)
    _reported.append(entry)
    try:
        yield
    finally:
        _reported.remove(entry)


@pytest.fixture(scope="session")
def testenv(request: pytest.FixtureRequest) -> Iterator[TestEnv]:
    """The real cluster. A missing component fails the test; it is never skipped."""
    try:
        env = TestEnv(nodes=3, node_label_sets=NODE_LABELS)
    except MissingBinary as err:
        pytest.fail(f"test environment incomplete: {err}", pytrace=False)
    with reported("test environment", env):
        env.start()
        yield env
        env.stop()
    if request.session.testsfailed == 0:
        env.cleanup()
    else:
        print(f"\ntest environment files kept in {env.workdir}")


@pytest.fixture(scope="session")
def agents(testenv: TestEnv) -> dict[str, AgentProcess]:
    """One real agent per simulated node, registered by Lease, for the whole run."""
    return {agent.node_name: agent for agent in testenv.start_agents()}


@pytest.fixture(scope="session")
def coordinator(testenv: TestEnv, agents: dict[str, AgentProcess]) -> CoordinatorProcess:
    """The CRD installed and one real coordinator serving every namespace."""
    testenv.install_crds()
    return testenv.start_coordinator()


@pytest.fixture
def kube(testenv: TestEnv) -> client.ApiClient:
    return testenv.api_client()


@pytest.fixture
def namespace(testenv: TestEnv, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test, deleted afterwards."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:5]}"
    core = client.CoreV1Api(testenv.api_client())
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    _delete_caches(testenv, name)
    core.delete_namespace(name)


def _delete_caches(env: TestEnv, namespace: str) -> None:
    """Deletes the namespace's ImageCaches and waits for the coordinator to release them:
    with no namespace controller here, deleting the namespace alone would leave them."""
    api = client.CustomObjectsApi(env.api_client())
    try:
        items = api.list_namespaced_custom_object(
            "kubefledged.io", "v1alpha2", namespace, "imagecaches"
        )["items"]  # type: ignore[index]
    except client.ApiException:
        return  # the CRD is not installed in this run
    for item in items:
        api.delete_namespaced_custom_object(
            "kubefledged.io", "v1alpha2", namespace, "imagecaches", item["metadata"]["name"]
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = api.list_namespaced_custom_object(
            "kubefledged.io", "v1alpha2", namespace, "imagecaches"
        )["items"]  # type: ignore[index]
        if not left:
            return
        time.sleep(0.2)


def unique(prefix: str) -> str:
    """A repository or object name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
