"""Fixtures over the real test environment (tests/testenv): one cluster for the whole
run, a fresh namespace per test, and every component's log attached to a failure."""

from __future__ import annotations

import re
import uuid
from collections.abc import Generator, Iterator

import pytest
from kubernetes import client

from tests.testenv import MissingBinary, TestEnv
from tests.testenv.agents import AgentProcess

ENV_FIXTURES = {"testenv", "namespace", "kube", "agents"}
_env: TestEnv | None = None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use the real environment carry the `env` marker (`-m 'not env'` skips them)."""
    for item in items:
        if ENV_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.env)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed and _env is not None:
        report.sections.append(("test environment logs (tails)", _env.log_report()))


@pytest.fixture(scope="session")
def testenv(request: pytest.FixtureRequest) -> Iterator[TestEnv]:
    """The real cluster. A missing component fails the test; it is never skipped."""
    global _env
    try:
        env = TestEnv(nodes=3)
    except MissingBinary as err:
        pytest.fail(f"test environment incomplete: {err}", pytrace=False)
    _env = env
    env.start()
    yield env
    env.stop()
    _env = None
    if request.session.testsfailed == 0:
        env.cleanup()
    else:
        print(f"\ntest environment files kept in {env.workdir}")


@pytest.fixture(scope="session")
def agents(testenv: TestEnv) -> dict[str, AgentProcess]:
    """One real agent per simulated node, registered by Lease, for the whole run."""
    return {agent.node_name: agent for agent in testenv.start_agents()}


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
    core.delete_namespace(name)


def unique(prefix: str) -> str:
    """A repository or object name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
