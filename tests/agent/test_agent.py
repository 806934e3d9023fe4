"""The agent against real containerd (CRI + containerd API), a real Docker daemon, real
registries and the real apiserver: every behaviour the coordinator relies on.

Tests taking `backend` run once per runtime (containerd through CRI, Docker through
its SDK); the others exercise what only one runtime has (pinning, CRI health...).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2
from kubernetes import client

from agent.health import LIVENESS_SERVICE
from agent.puller import FS_CACHE_SECONDS
from agent.runtime.cri import OWNER_LABEL
from agent.server import SHUTDOWN_GRACE
from common.wire import lease_name
from coordinator.agents import AgentPool
from protos.fledged.agent.v1 import agent_pb2, agent_pb2_grpc
from tests.conftest import unique
from tests.coordinator.helpers import wait_for
from tests.testenv import AUTH_PASSWORD, AUTH_USER, PushedImage, TestEnv
from tests.testenv.agents import AGENT_NAMESPACE, AgentProcess
from tests.testenv.containerd import Containerd, DebianContainerd
from tests.testenv.credentials import write_provider_config
from tests.testenv.paths import binary
from tests.testenv.pki import CertFiles, CertificateAuthority
from tests.testenv.procs import free_port, port_open
from tests.testenv.proxy import RegistryProxy
from tests.testenv.runtime import PINNED_LABEL, NodeRuntime

A = agent_pb2
TERMINAL = {A.PHASE_SUCCEEDED, A.PHASE_ALREADY_PRESENT, A.PHASE_FAILED, A.PHASE_CANCELLED}


@dataclass(frozen=True)
class Backend:
    kind: str  # containerd | docker
    agent: AgentProcess

    @property
    def pinned(self) -> int:
        """The pin state a pin order ends in on this runtime."""
        return A.PIN_STATE_PINNED if self.kind == "containerd" else A.PIN_STATE_UNSUPPORTED

    def downloaded(self, image: PushedImage) -> int:
        """Bytes a fresh pull downloads, as each runtime counts them."""
        return image.content_size if self.kind == "containerd" else sum(image.layer_sizes)


@pytest.fixture(scope="session")
def docker_agent(testenv: TestEnv) -> AgentProcess:
    assert testenv.dockerd is not None
    return testenv.start_agent(
        node_name="docker-node",
        runtime_endpoint=testenv.dockerd.endpoint,
        runtime="docker",
        lease=False,
        name="agent-docker",
    )


@pytest.fixture(params=["containerd", "docker"])
def backend(
    request: pytest.FixtureRequest, agents: dict[str, AgentProcess], docker_agent: AgentProcess
) -> Backend:
    if request.param == "docker":
        return Backend("docker", docker_agent)
    return Backend("containerd", agents["node-1"])


def final(events: Iterable[agent_pb2.PullEvent], image: str) -> agent_pb2.PullEvent:
    ends = [e for e in events if e.image == image and e.phase in TERMINAL]
    assert len(ends) == 1, f"expected one terminal event for {image}, got {ends}"
    return ends[0]


@contextlib.contextmanager
def own_node(
    testenv: TestEnv,
    name: str,
    kind: type[Containerd] = Containerd,
    registries: Sequence[str] | None = None,
) -> Iterator[tuple[Containerd, AgentProcess]]:
    """A node of the test's own: its containerd (of `kind`, reaching `registries`, by
    default the suite's) and an agent without a Lease, both stopped afterwards."""
    hosts = list(registries) if registries is not None else [testenv.registry.host]
    containerd = kind(testenv.workdir, name, hosts)
    containerd.start()
    try:
        agent = testenv.start_agent(
            node_name=name, runtime_endpoint=containerd.endpoint, lease=False, name=f"agent-{name}"
        )
        try:
            yield containerd, agent
        finally:
            agent.stop()
    finally:
        containerd.stop()


def order(image: str, **kw: object) -> agent_pb2.ImagePull:
    return A.ImagePull(image=image, **kw)  # type: ignore[arg-type]


def test_pull_succeeds_with_monotonic_progress_ending_at_the_image_size(
    testenv: TestEnv, backend: Backend
) -> None:
    image = testenv.registry_client().push_image(
        unique("agent/progress"), "v1", size=12 << 20, layers=3
    )
    with RegistryProxy(testenv.registry.host, rate=6 << 20) as slow:
        testenv.add_registry_host(slow.host)
        ref = image.ref.replace(image.registry, slow.host)
        events = backend.agent.pull(order(ref))
    phases = [e.phase for e in events]
    assert phases[0] == A.PHASE_PULLING
    assert phases[-1] == A.PHASE_SUCCEEDED
    progress = [e for e in events if e.phase == A.PHASE_PULLING and e.bytes_total]
    assert len(progress) >= 3, f"expected live progress, got {events}"
    done = [e.bytes_done for e in progress]
    assert done == sorted(done), "progress went backwards"
    assert any(0 < e.bytes_done < e.bytes_total for e in progress)
    end = events[-1]
    assert end.image_id == image.config_digest
    assert end.repo_digest == image.digest
    assert end.bytes_done == end.bytes_total == backend.downloaded(image)
    assert all(e.bytes_total == backend.downloaded(image) for e in progress[1:])
    if backend.kind == "containerd":  # CRI's size is the stored content: what was downloaded
        assert end.size == image.content_size
    else:  # Docker's size is the unpacked size
        assert end.size >= 12 << 20


def test_if_not_present_skips_an_image_already_on_the_node(
    testenv: TestEnv, backend: Backend
) -> None:
    image = testenv.registry_client().push_image(unique("agent/present"), "v1")
    first = backend.agent.pull(order(image.ref))
    assert final(first, image.ref).phase == A.PHASE_SUCCEEDED
    second = backend.agent.pull(order(image.ref, policy=A.PULL_POLICY_IF_NOT_PRESENT))
    assert [e.phase for e in second] == [A.PHASE_ALREADY_PRESENT]
    assert second[0].image_id == image.config_digest
    assert second[0].repo_digest == image.digest


def test_always_repulls_and_reports_the_new_digest_of_a_moved_tag(
    testenv: TestEnv, backend: Backend
) -> None:
    registry = testenv.registry_client()
    repo = unique("agent/moving")
    old = registry.push_image(repo, "latest", seed="old")
    assert final(backend.agent.pull(order(old.ref)), old.ref).repo_digest == old.digest
    new = registry.push_image(repo, "latest", seed="new")
    again = backend.agent.pull(order(new.ref, policy=A.PULL_POLICY_ALWAYS))
    end = final(again, new.ref)
    assert end.phase == A.PHASE_SUCCEEDED
    assert end.repo_digest == new.digest != old.digest
    assert end.image_id == new.config_digest


def _held_ids(agent: AgentProcess) -> set[str]:
    listed = agent.call("ListImages", A.ListImagesRequest())
    return {i.id for i in listed.images}  # type: ignore[attr-defined]


def test_a_replacing_pull_retires_the_old_content_unless_still_named_or_used(
    testenv: TestEnv, backend: Backend
) -> None:
    """A refresh's pull (Always + replace) that moves a tag removes what the tag named
    before; content another tag still names, or (Docker) a container was made from, stays."""
    registry = testenv.registry_client()
    agent = backend.agent
    refresh = {"policy": A.PULL_POLICY_ALWAYS, "replace": True, "pin": True}
    repo = unique("agent/retire")
    old = registry.push_image(repo, "v1", seed=f"{repo}-0")  # content no other test has
    assert final(agent.pull(order(old.ref, pin=True)), old.ref).pin == backend.pinned
    new = registry.push_image(repo, "v1", seed=f"{repo}-1")
    end = final(agent.pull(order(new.ref, **refresh)), new.ref)
    assert end.phase == A.PHASE_SUCCEEDED
    assert end.pin == backend.pinned
    held = _held_ids(agent)
    assert new.config_digest in held
    assert old.config_digest not in held  # gone, its digest reference with it
    assert agent.metric("fledged_agent_replaced_images_total") >= 1

    kept = registry.push_image(repo, "keep", seed=f"{repo}-1")  # another tag for the same content
    assert final(agent.pull(order(kept.ref)), kept.ref).phase == A.PHASE_SUCCEEDED
    newer = registry.push_image(repo, "v1", seed=f"{repo}-2")
    assert final(agent.pull(order(newer.ref, **refresh)), newer.ref).phase == A.PHASE_SUCCEEDED
    assert {newer.config_digest, kept.config_digest} <= _held_ids(agent)

    if backend.kind == "docker":  # a container made from the content keeps it
        assert testenv.dockerd is not None
        docker_client = testenv.dockerd.client()
        try:
            container = docker_client.containers.create(newer.ref, command=["/none"])
            try:
                newest = registry.push_image(repo, "v1", seed=f"{repo}-3")
                again = final(agent.pull(order(newest.ref, **refresh)), newest.ref)
                assert again.phase == A.PHASE_SUCCEEDED
                assert {newest.config_digest, newer.config_digest} <= _held_ids(agent)
            finally:
                container.remove()
        finally:
            docker_client.close()


@pytest.mark.parametrize("name", ["missing", "denied", "unauthorized"])
def test_missing_image_fails_as_not_found(testenv: TestEnv, backend: Backend, name: str) -> None:
    """Whatever the image is called: the runtime's message names it, and words of its
    name ("denied:" in `.../denied:v1`) are not the registry's answer."""
    ref = f"{testenv.registry.host}/{unique('agent/missing')}/{name}:v1"
    end = final(backend.agent.pull(order(ref)), ref)
    assert end.phase == A.PHASE_FAILED
    assert end.error_category == A.ERROR_CATEGORY_NOT_FOUND, end.error_message
    assert "not found" in end.error_message


def test_invalid_reference_is_refused_before_the_runtime(backend: Backend) -> None:
    bad = "Registry.example/UPPER/case:v1"
    end = final(backend.agent.pull(order(bad)), bad)
    assert end.error_category == A.ERROR_CATEGORY_INVALID_REFERENCE
    assert "lowercase" in end.error_message


def test_authenticated_registry_needs_the_right_credentials(
    testenv: TestEnv, backend: Backend
) -> None:
    image = testenv.registry_client(authenticated=True).push_image(unique("agent/auth"), "v1")
    agent = backend.agent
    server = image.registry
    anonymous = final(agent.pull(order(image.ref)), image.ref)
    assert anonymous.error_category == A.ERROR_CATEGORY_UNAUTHORIZED
    bad_password = unique("not-the-password")  # distinct from anything else in the log
    wrong = A.RegistryCredentials(server_address=server, username=AUTH_USER, password=bad_password)
    refused = final(agent.pull(order(image.ref, credentials=[wrong])), image.ref)
    assert refused.error_category == A.ERROR_CATEGORY_UNAUTHORIZED
    right = A.RegistryCredentials(server_address=server, username=AUTH_USER, password=AUTH_PASSWORD)
    # As the kubelet does with several pull secrets: the wrong one first, then the right one.
    ok = final(agent.pull(order(image.ref, credentials=[wrong, right])), image.ref)
    assert ok.phase == A.PHASE_SUCCEEDED, ok.error_message
    assert ok.image_id == image.config_digest
    log = agent.process.log_path.read_text()
    assert AUTH_PASSWORD not in log
    assert bad_password not in log


CREDENTIAL_PLUGIN = """#!{python}
import json, os, sys
request = json.load(sys.stdin)
with open(os.environ["CALLS"], "a") as calls:
    calls.write(request["image"] + "\\n")
print(json.dumps({{
    "apiVersion": request["apiVersion"],
    "kind": "CredentialProviderResponse",
    "cacheKeyType": "Registry",
    "auth": {{"{host}": {{"username": "{user}", "password": "{password}"}}}},
}}))
"""


@pytest.mark.parametrize("source", ["plugin", "config.json"])
@pytest.mark.parametrize("kind", ["containerd", "docker"])
def test_the_nodes_own_credentials_serve_a_cache_without_secrets(
    testenv: TestEnv, kind: str, source: str
) -> None:
    """An agent given what the kubelet reads for credentials, its credential provider
    config or its config.json, uses it for an image no credentials were sent with. The
    plugin's answer is kept for the registry as long as the config says (12h here)."""
    image = testenv.registry_client(authenticated=True).push_image(unique("agent/iam"), "v1")
    work = testenv.workdir / unique("node-credentials")
    bin_dir = work / "bin"
    bin_dir.mkdir(parents=True)
    calls = work / "calls"
    if source == "plugin":
        flags = credential_plugin(work, bin_dir, calls, image)
    else:
        config_json = work / "config.json"
        auth = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
        config_json.write_text(json.dumps({"auths": {image.registry: {"auth": auth}}}))
        flags = (f"--node-docker-config={config_json}",)
    with contextlib.ExitStack() as stack:
        if kind == "containerd":
            containerd = Containerd(
                testenv.workdir, unique("iam-node"), [testenv.registry.host, image.registry]
            )
            containerd.start()
            stack.callback(containerd.stop)
            endpoint, runtime = containerd.endpoint, "cri"
        else:
            assert testenv.dockerd is not None
            endpoint, runtime = testenv.dockerd.endpoint, "docker"
        agent = testenv.start_agent(
            node_name=unique("iam-node"),
            runtime_endpoint=endpoint,
            runtime=runtime,
            lease=False,
            extra_args=flags,
            name=unique("agent-iam"),
        )
        stack.callback(agent.stop)
        ok = final(agent.pull(order(image.ref)), image.ref)
        assert ok.phase == A.PHASE_SUCCEEDED, ok.error_message
        assert ok.image_id == image.config_digest
        again = final(agent.pull(order(image.ref, policy=A.PULL_POLICY_ALWAYS)), image.ref)
        assert again.phase == A.PHASE_SUCCEEDED, again.error_message
        if source == "plugin":
            # asked for the repository, as the kubelet asks; the answer kept for the registry
            assert calls.read_text().splitlines() == [image.ref.rpartition(":")[0]]
        assert AUTH_PASSWORD not in agent.process.log_path.read_text()


def credential_plugin(
    work: Path, bin_dir: Path, calls: Path, image: PushedImage
) -> tuple[str, ...]:
    """A kubelet credential provider config and plugin serving `image`'s registry;
    the agent's flags for them."""
    port = image.registry.rpartition(":")[2]
    plugin = bin_dir / "test-credential-provider"
    plugin.write_text(
        CREDENTIAL_PLUGIN.format(
            python=sys.executable, host=image.registry, user=AUTH_USER, password=AUTH_PASSWORD
        )
    )
    plugin.chmod(0o755)
    config = write_provider_config(
        work / "credential-providers.yaml",
        plugin.name,
        [f"127.0.0.*:{port}"],
        "12h",
        {"CALLS": str(calls)},
    )
    return (
        f"--image-credential-provider-config={config}",
        f"--image-credential-provider-bin-dir={bin_dir}",
    )


def _free_port_holding_404() -> int:
    """A port such as 40417: CI once saw one read as an HTTP 404 in the runtime's message."""
    for port in range(40400, 40500):
        if not port_open(port):
            return port
    return free_port()


def test_unreachable_registry_fails_as_registry_unavailable(backend: Backend) -> None:
    ref = f"127.0.0.1:{_free_port_holding_404()}/agent/down:v1"
    end = final(backend.agent.pull(order(ref, deadline=duration_pb2.Duration(seconds=30))), ref)
    assert end.error_category == A.ERROR_CATEGORY_REGISTRY_UNAVAILABLE, end.error_message
    assert "connection refused" in end.error_message


def test_a_stalling_registry_hits_the_pull_deadline(testenv: TestEnv, backend: Backend) -> None:
    with RegistryProxy(testenv.registry.host, stall=True) as stall:
        testenv.add_registry_host(stall.host)
        ref = f"{stall.host}/agent/stalled:v1"
        started = time.monotonic()
        events = backend.agent.pull(order(ref, deadline=duration_pb2.Duration(seconds=2)))
        elapsed = time.monotonic() - started
        end = final(events, ref)
        assert end.error_category == A.ERROR_CATEGORY_DEADLINE_EXCEEDED, end.error_message
        assert "within 2s" in end.error_message
        assert elapsed < 15
        # The runtime's own pull is cancelled too: it lets go of the registry.
        backend.agent.process.wait_until(
            lambda: stall.open_connections == 0, timeout=20, what="the runtime to hang up"
        )


def test_a_pull_cut_by_its_deadline_keeps_its_layers_for_the_retry(testenv: TestEnv) -> None:
    """An edge node's slow link: a pull cut by its deadline kept nothing (containerd
    drops what a pull downloaded with its call), so every retry downloaded the image
    from the start and a large image never arrived. Under the image's lease, the retry
    downloads only what is missing, and reports its progress from what was kept (its
    manifest, stored by the cut attempt, was not taken for this pull's: no progress at
    all); the lease goes with the success."""
    image = testenv.registry_client().push_image(unique("agent/resume"), "v1", 32 << 20, 4)
    with (
        RegistryProxy(testenv.registry.host, rate=8 << 20) as slow,  # 4 s for the image
        own_node(testenv, unique("resume-node"), registries=[slow.host]) as (containerd, agent),
    ):
        ref = f"{slow.host}/{image.ref.split('/', 1)[1]}"
        cut = final(agent.pull(order(ref, deadline=duration_pb2.Duration(seconds=3))), ref)
        assert cut.error_category == A.ERROR_CATEGORY_DEADLINE_EXCEEDED, cut
        first = slow.bytes_sent
        assert image.content_size // 4 < first < image.content_size, first
        assert len(pull_leases(containerd)) == 1
        assert_resumes(agent, ref, slow, first, image.content_size, containerd)


def test_an_agent_restarted_mid_pull_leaves_its_successor_only_the_rest(
    testenv: TestEnv,
) -> None:
    """A rolling update of the agents during a rollout of large images (or any restart
    of a node's agent): the stopping agent let its pulls' leases go, so containerd
    dropped what they had downloaded and the successor pulled each image from the
    start, over an edge node's slow link as well. The leases now stay with the stop.
    The image takes 16 s, longer than the agent's grace for the pulls under way."""
    assert SHUTDOWN_GRACE < 12
    image = testenv.registry_client().push_image(unique("agent/restart"), "v1", 32 << 20, 4)
    with (
        RegistryProxy(testenv.registry.host, rate=2 << 20) as slow,
        own_node(testenv, unique("restart-node"), registries=[slow.host]) as (containerd, agent),
    ):
        ref = f"{slow.host}/{image.ref.split('/', 1)[1]}"

        def pull() -> None:
            with contextlib.suppress(grpc.RpcError):  # the agent going ends the call
                agent.pull(order(ref))

        threading.Thread(target=pull, daemon=True).start()
        agent.process.wait_until(
            lambda: slow.bytes_sent > image.content_size // 8,
            timeout=30,
            what="the pull under way",
        )
        agent.stop()
        first = slow.bytes_sent
        assert first < image.content_size, first
        assert len(pull_leases(containerd)) == 1
        agent.start()
        assert_resumes(agent, ref, slow, first, image.content_size, containerd)


def assert_resumes(
    agent: AgentProcess,
    ref: str,
    proxy: RegistryProxy,
    kept: int,
    size: int,
    containerd: Containerd,
) -> None:
    """`ref` ordered again after a pull of it was cut, `kept` bytes into its `size`:
    it succeeds downloading only about the rest, reports its byte progress while it
    runs, from about what was kept, and leaves no lease."""
    before = proxy.bytes_sent
    events = agent.pull(order(ref))
    done = final(events, ref)
    assert done.phase == A.PHASE_SUCCEEDED, done
    again = proxy.bytes_sent - before
    assert again < size - kept // 2, (kept, again, size)
    assert not pull_leases(containerd)
    progress = [e for e in events if e.phase == A.PHASE_PULLING and e.bytes_total]
    assert any(e.bytes_done < e.bytes_total for e in progress), "no progress while it ran"
    assert progress[0].bytes_total == done.bytes_total
    assert progress[0].bytes_done >= kept // 2, (progress[0], kept)


def pull_leases(containerd: Containerd) -> list[str]:
    """The leases our agents made on `containerd`."""
    ctr = [str(binary("ctr")), "-a", str(containerd.socket), "-n", "k8s.io", "leases", "ls", "-q"]
    listing = subprocess.run(ctr, capture_output=True, text=True, check=True)
    return [line for line in listing.stdout.split() if line.startswith("kubefledged-")]


def test_a_docker_agent_stops_at_once_with_a_pull_under_way(testenv: TestEnv) -> None:
    """Docker pulls run in threads; stopping must hang up on them, not wait for the pull
    (the interpreter's exit waits for every thread): the kubelet would SIGKILL it."""
    assert testenv.dockerd is not None
    with RegistryProxy(testenv.registry.host, stall=True) as stall:
        agent = testenv.start_agent(
            node_name="docker-stopping",
            runtime_endpoint=testenv.dockerd.endpoint,
            runtime="docker",
            lease=False,
            name="agent-docker-stopping",
        )
        code = _stopped_mid_pull(agent, stall, f"{stall.host}/agent/stopping:v1")
        assert code == 0, agent.process.log_tail()


def _stopped_mid_pull(agent: AgentProcess, stall: RegistryProxy, ref: str) -> int:
    """SIGTERM to the agent while a pull of `ref` waits on the stalling registry, as
    the kubelet sends it; the agent's exit code (it is killed past its grace)."""
    deadline = duration_pb2.Duration(seconds=120)

    def pull() -> None:
        with contextlib.suppress(grpc.RpcError):  # the agent going ends the call
            agent.pull(order(ref, deadline=deadline))

    threading.Thread(target=pull, daemon=True).start()
    agent.process.wait_until(
        lambda: stall.open_connections > 0, timeout=30, what="the pull to reach the registry"
    )
    proc = agent.process.proc
    assert proc is not None
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=SHUTDOWN_GRACE + 10)
    finally:
        agent.process.kill()


def test_a_cancelled_pull_stops_its_download_and_leaves_no_image(
    testenv: TestEnv, backend: Backend
) -> None:
    """A pull no cache wants any more (the cache deleted, the image edited out) stops
    on CancelPulls, whichever stream ordered it: the runtime hangs up on the registry,
    the stream ends CANCELLED, and the image is not on the node. Before, it ran to its
    end: a mistaken fleet-wide cache, deleted at once, was still downloaded everywhere."""
    image = testenv.registry_client().push_image(unique("agent/cancel"), "v1", 48 << 20, 3)
    with RegistryProxy(testenv.registry.host, rate=8 << 20) as slow:  # about 6 s of pull
        testenv.add_registry_host(slow.host)
        ref = image.ref.replace(image.registry, slow.host)
        events: list[agent_pb2.PullEvent] = []
        stream = threading.Thread(target=lambda: events.extend(backend.agent.pull(order(ref))))
        stream.start()
        try:
            wait_for("the download to begin", lambda: slow.bytes_sent > 2 << 20, timeout=30)
            during = backend.agent.call("ListImages", A.ListImagesRequest())
            answer = backend.agent.call("CancelPulls", A.CancelPullsRequest(images=[ref]))
        finally:
            stream.join(60)
        assert list(during.pulling) == [ref]  # type: ignore[attr-defined]  # what a successor learns
        assert [(r.image, r.was_running) for r in answer.results] == [(ref, True)]  # type: ignore[attr-defined]
        assert final(events, ref).phase == A.PHASE_CANCELLED
        # The download stops (the runtime may keep idle connections to the registry).
        assert slow.sent_during(2) < 1 << 20  # 16 MiB, had the pull gone on
        assert slow.bytes_sent < backend.downloaded(image) // 2, slow.bytes_sent
    listing = backend.agent.call("ListImages", A.ListImagesRequest())
    assert not [i for i in listing.images if ref in i.repo_tags]  # type: ignore[attr-defined]
    assert not listing.pulling  # type: ignore[attr-defined]
    # Nothing of it runs any more: a second cancel finds nothing to stop.
    again = backend.agent.call("CancelPulls", A.CancelPullsRequest(images=[ref]))
    assert [r.was_running for r in again.results] == [False]  # type: ignore[attr-defined]


def test_concurrent_orders_for_one_image_share_one_runtime_pull(
    testenv: TestEnv, agents: dict[str, AgentProcess]
) -> None:
    image = testenv.registry_client().push_image(
        unique("agent/dedup"), "v1", size=6 << 20, layers=2
    )
    agent = agents["node-3"]
    before = agent.metric("fledged_agent_runtime_pulls_total")
    with RegistryProxy(testenv.registry.host, rate=4 << 20) as slow:
        testenv.add_registry_host(slow.host)
        ref = image.ref.replace(image.registry, slow.host)
        results: list[list[agent_pb2.PullEvent]] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(agent.pull(order(ref, policy=A.PULL_POLICY_ALWAYS)))
            )
            for _ in range(3)
        ]
        for t in threads:
            t.start()
            time.sleep(0.2)
        for t in threads:
            t.join(60)
    assert len(results) == 3
    for events in results:
        assert final(events, ref).phase == A.PHASE_SUCCEEDED
    assert agent.metric("fledged_agent_runtime_pulls_total") - before == 1
    # The registry served each layer once: one runtime pull, not three.
    access = testenv.registry.process.log_path.read_text()
    for size, digest in zip(image.layer_sizes, image.layer_digests, strict=True):
        assert access.count(f"GET /v2/{image.repository}/blobs/{digest}") == 1, size


def test_concurrency_cap_queues_the_rest_as_waiting(testenv: TestEnv) -> None:
    registry = testenv.registry_client()
    images = [registry.push_image(unique("agent/cap"), "v1", size=2 << 20) for _ in range(3)]
    agent = testenv.start_agent(
        testenv.nodes[1], lease=False, extra_args=("--max-concurrent-pulls=1",), name="agent-cap"
    )
    try:
        with RegistryProxy(testenv.registry.host, rate=4 << 20) as slow:
            testenv.add_registry_host(slow.host)
            refs = [i.ref.replace(i.registry, slow.host) for i in images]
            events = agent.pull(*(order(r) for r in refs))
    finally:
        agent.stop()
    active: set[str] = set()
    most = 0
    for e in events:
        if e.phase == A.PHASE_PULLING:
            active.add(e.image)
        elif e.phase in TERMINAL:
            active.discard(e.image)
        most = max(most, len(active))
    assert most == 1
    assert sum(e.phase == A.PHASE_WAITING for e in events) == 2
    assert all(final(events, r).phase == A.PHASE_SUCCEEDED for r in refs)


def test_a_stream_asking_for_outcomes_only_gets_one_event_per_image(
    testenv: TestEnv, backend: Backend
) -> None:
    """What a coordinator of a large fleet asks for: no WAITING, no byte progress."""
    registry = testenv.registry_client()
    images = [registry.push_image(unique("agent/quiet"), "v1", size=4 << 20) for _ in range(3)]
    with RegistryProxy(testenv.registry.host, rate=8 << 20) as slow:
        testenv.add_registry_host(slow.host)
        refs = [i.ref.replace(i.registry, slow.host) for i in images]
        missing = images[0].ref.rsplit(":", 1)[0] + ":missing"
        events = backend.agent.pull(
            *(order(r) for r in refs), order(missing), progress=A.PROGRESS_OUTCOMES
        )
    assert all(e.phase in TERMINAL for e in events), [e.phase for e in events]
    assert len(events) == 4
    assert [final(events, r).phase for r in refs] == [A.PHASE_SUCCEEDED] * 3
    assert final(events, missing).error_category == A.ERROR_CATEGORY_NOT_FOUND
    end = final(events, refs[1])
    assert (end.image_id, end.repo_digest) == (images[1].config_digest, images[1].digest)


def test_pin_and_unpin_are_visible_through_cri(
    testenv: TestEnv, agents: dict[str, AgentProcess]
) -> None:
    image = testenv.registry_client().push_image(unique("agent/pin"), "v1")
    agent = agents["node-1"]
    end = final(agent.pull(order(image.ref, pin=True)), image.ref)
    assert end.pin == A.PIN_STATE_PINNED
    with NodeRuntime(testenv.nodes[0].runtime_endpoint) as cri:
        status = cri.status(image.ref)
        assert status is not None
        assert status.pinned
        resp = agent.call("SetPinned", A.SetPinnedRequest(images=[image.ref], pinned=False))
        assert [r.pin for r in resp.results] == [A.PIN_STATE_UNPINNED]  # type: ignore[attr-defined]
        status = cri.status(image.ref)
        assert status is not None
        assert not status.pinned
        # IfNotPresent with pin re-pins an image that lost its pin.
        again = final(agent.pull(order(image.ref, pin=True)), image.ref)
        assert again.phase == A.PHASE_ALREADY_PRESENT
        assert again.pin == A.PIN_STATE_PINNED
        status = cri.status(image.ref)
        assert status is not None
        assert status.pinned
        listed = agent.call("ListImages", A.ListImagesRequest())
        mine = [i for i in listed.images if i.id == image.config_digest]  # type: ignore[attr-defined]
        assert mine
        assert mine[0].pin == A.PIN_STATE_PINNED
        assert mine[0].pinned_by_fledged


def test_each_pin_change_answers_what_cri_shows_next(
    testenv: TestEnv, agents: dict[str, AgentProcess]
) -> None:
    """CRI learns of a pin label change from containerd's events, a moment after the
    label is written: an answer read at once could be the old state (an unpin once
    answered PINNED in CI), and a pull right after an unpin took the stale pin for
    someone else's and did not re-pin. Round after round, each answer holds."""
    image = testenv.registry_client().push_image(unique("agent/pin-flip"), "v1")
    agent = agents["node-1"]
    assert final(agent.pull(order(image.ref, pin=True)), image.ref).pin == A.PIN_STATE_PINNED
    with NodeRuntime(testenv.nodes[0].runtime_endpoint) as cri:
        for _ in range(15):
            resp = agent.call("SetPinned", A.SetPinnedRequest(images=[image.ref], pinned=False))
            assert [r.pin for r in resp.results] == [A.PIN_STATE_UNPINNED]  # type: ignore[attr-defined]
            status = cri.status(image.ref)
            assert status is not None
            assert not status.pinned
            again = final(agent.pull(order(image.ref, pin=True)), image.ref)
            assert (again.phase, again.pin) == (A.PHASE_ALREADY_PRESENT, A.PIN_STATE_PINNED)
            status = cri.status(image.ref)
            assert status is not None
            assert status.pinned


def test_a_pin_label_stripped_by_hand_is_put_back(
    testenv: TestEnv, agents: dict[str, AgentProcess]
) -> None:
    """`ctr images label X io.cri-containerd.pinned=` lifts the pin but leaves our owner
    label: the agent took the owner label for the pin in place, answered UNPINNED to
    every pin order, and the kubelet's image GC could take the image."""
    image = testenv.registry_client().push_image(unique("agent/pin-stripped"), "v1")
    agent = agents["node-1"]
    assert final(agent.pull(order(image.ref, pin=True)), image.ref).pin == A.PIN_STATE_PINNED
    with NodeRuntime(testenv.nodes[0].runtime_endpoint) as cri:

        def strip() -> None:
            records = cri.records()
            assert records[image.ref].get(PINNED_LABEL) == "pinned"
            for name in (image.ref, image.digest_ref, image.config_digest):
                if PINNED_LABEL in records.get(name, {}):
                    cri.set_label(name, PINNED_LABEL, None)
            _until_cri_shows(cri, image.ref, pinned=False)

        strip()
        resp = agent.call("SetPinned", A.SetPinnedRequest(images=[image.ref], pinned=True))
        assert [r.pin for r in resp.results] == [A.PIN_STATE_PINNED]  # type: ignore[attr-defined]
        status = cri.status(image.ref)
        assert status is not None
        assert status.pinned
        # ... and so does a pull's pin order for an image already present
        strip()
        again = final(agent.pull(order(image.ref, pin=True)), image.ref)
        assert (again.phase, again.pin) == (A.PHASE_ALREADY_PRESENT, A.PIN_STATE_PINNED)
        status = cri.status(image.ref)
        assert status is not None
        assert status.pinned
        assert cri.records()[image.ref].get(PINNED_LABEL) == "pinned"


def test_containerd_1_6_pulls_but_does_not_claim_pins(testenv: TestEnv) -> None:
    """Debian 12's containerd 1.6: its CRI ignores the pin label, so the agent says
    pinning is unsupported there rather than pinning in vain (answered UNPINNED, while
    the node info claimed support)."""
    image = testenv.registry_client().push_image(unique("agent/legacy"), "v1")
    with own_node(testenv, "legacy-node", DebianContainerd) as (_, agent):
        info = agent.call("GetNodeInfo", A.GetNodeInfoRequest())
        assert info.runtime_version.startswith("1.6.")  # type: ignore[attr-defined]
        assert info.runtime_api == "cri+containerd"  # type: ignore[attr-defined]
        assert not info.pinning_supported  # type: ignore[attr-defined]
        end = final(agent.pull(order(image.ref, pin=True)), image.ref)
        assert (end.phase, end.pin) == (A.PHASE_SUCCEEDED, A.PIN_STATE_UNSUPPORTED)
        resp = agent.call("SetPinned", A.SetPinnedRequest(images=[image.ref], pinned=True))
        assert [r.pin for r in resp.results] == [A.PIN_STATE_UNSUPPORTED]  # type: ignore[attr-defined]
        listed = agent.call("ListImages", A.ListImagesRequest())
        mine = [i for i in listed.images if i.id == image.config_digest]  # type: ignore[attr-defined]
        assert [i.pin for i in mine] == [A.PIN_STATE_UNSUPPORTED]


def test_a_pin_set_by_someone_else_is_never_lifted(
    testenv: TestEnv, agents: dict[str, AgentProcess]
) -> None:
    image = testenv.registry_client().push_image(unique("agent/foreign-pin"), "v1")
    agent = agents["node-2"]
    assert final(agent.pull(order(image.ref)), image.ref).phase == A.PHASE_SUCCEEDED
    with NodeRuntime(testenv.nodes[1].runtime_endpoint) as cri:
        cri.set_label(image.ref, PINNED_LABEL, "pinned")  # as the runtime does for its sandbox
        resp = agent.call("SetPinned", A.SetPinnedRequest(images=[image.ref], pinned=False))
        assert [r.pin for r in resp.results] == [A.PIN_STATE_PINNED]  # type: ignore[attr-defined]
        status = cri.status(image.ref)
        assert status is not None
        assert status.pinned
        listed = agent.call("ListImages", A.ListImagesRequest())
        mine = [i for i in listed.images if i.id == image.config_digest]  # type: ignore[attr-defined]
        assert mine[0].pin == A.PIN_STATE_PINNED
        assert not mine[0].pinned_by_fledged


def test_someone_elses_pin_on_content_we_pinned_too_stays_theirs(
    testenv: TestEnv, agents: dict[str, AgentProcess]
) -> None:
    """The same content under our name and under a name someone else pinned (containerd
    pulling its sandbox image from a mirror): a pin order took their record over (our
    owner label added), so dropping the image later lifted their pin, and a removal
    deleted their record with ours (RemoveImage takes every name of the content)."""
    registry = testenv.registry_client()
    repository = unique("agent/shared-pin")
    ours = registry.push_image(repository, "ours", seed=repository)
    theirs = registry.push_image(repository + "-mirror", "theirs", seed=repository)
    assert ours.config_digest == theirs.config_digest
    agent = agents["node-2"]
    assert final(agent.pull(order(ours.ref, pin=True)), ours.ref).pin == A.PIN_STATE_PINNED
    with NodeRuntime(testenv.nodes[1].runtime_endpoint) as cri:
        cri.pull(theirs.ref)
        cri.set_label(theirs.ref, PINNED_LABEL, "pinned")
        resp = agent.call("SetPinned", A.SetPinnedRequest(images=[ours.ref], pinned=True))
        assert [r.pin for r in resp.results] == [A.PIN_STATE_PINNED]  # type: ignore[attr-defined]
        assert OWNER_LABEL not in cri.records()[theirs.ref]
        resp = agent.call("SetPinned", A.SetPinnedRequest(images=[ours.ref], pinned=False))
        assert [r.pin for r in resp.results] == [A.PIN_STATE_PINNED]  # type: ignore[attr-defined]
        assert cri.records()[theirs.ref].get(PINNED_LABEL) == "pinned"
        assert cri.records()[ours.ref].get(PINNED_LABEL) is None  # ours is lifted
        resp = agent.call("RemoveImages", A.RemoveImagesRequest(images=[ours.ref]))
        assert "pinned by someone else" in resp.results[0].error_message  # type: ignore[attr-defined]
        assert cri.status(theirs.ref) is not None
        assert cri.records()[theirs.ref].get(PINNED_LABEL) == "pinned"


def _until_cri_shows(cri: NodeRuntime, ref: str, pinned: bool) -> None:
    """CRI learns of a label change from containerd's events, a moment after it."""
    deadline = time.monotonic() + 5
    while (status := cri.status(ref)) is None or status.pinned != pinned:
        assert time.monotonic() < deadline, f"CRI never showed {ref} pinned={pinned}"
        time.sleep(0.02)


def test_an_image_someone_else_pinned_is_not_removed(
    testenv: TestEnv, agents: dict[str, AgentProcess]
) -> None:
    """containerd pins its sandbox image; a cache that listed it and was purged or edited
    must not take it from the node (new pods there would need a registry)."""
    image = testenv.registry_client().push_image(unique("agent/foreign-keep"), "v1")
    agent = agents["node-2"]
    assert final(agent.pull(order(image.ref)), image.ref).phase == A.PHASE_SUCCEEDED
    with NodeRuntime(testenv.nodes[1].runtime_endpoint) as cri:
        cri.set_label(image.ref, PINNED_LABEL, "pinned")  # as the runtime does for its sandbox
        _until_cri_shows(cri, image.ref, pinned=True)
        resp = agent.call("RemoveImages", A.RemoveImagesRequest(images=[image.ref]))
        result = resp.results[0]  # type: ignore[attr-defined]
        assert result.error_category == A.ERROR_CATEGORY_INTERNAL
        assert "pinned by someone else" in result.error_message
        status = cri.status(image.ref)
        assert status is not None
        assert status.pinned
        cri.set_label(image.ref, PINNED_LABEL, None)  # the pin lifted: it can go
        _until_cri_shows(cri, image.ref, pinned=False)
        resp = agent.call("RemoveImages", A.RemoveImagesRequest(images=[image.ref]))
        assert [(r.was_present, r.error_category) for r in resp.results] == [(True, 0)]  # type: ignore[attr-defined]
        assert cri.status(image.ref) is None


def test_remove_unpins_removes_and_is_idempotent(testenv: TestEnv, backend: Backend) -> None:
    image = testenv.registry_client().push_image(unique("agent/remove"), "v1")
    agent = backend.agent
    assert final(agent.pull(order(image.ref, pin=True)), image.ref).pin == backend.pinned
    first = agent.call("RemoveImages", A.RemoveImagesRequest(images=[image.ref]))
    assert [(r.was_present, r.error_category) for r in first.results] == [(True, 0)]  # type: ignore[attr-defined]
    listed = agent.call("ListImages", A.ListImagesRequest())
    assert image.config_digest not in {i.id for i in listed.images}  # type: ignore[attr-defined]
    second = agent.call("RemoveImages", A.RemoveImagesRequest(images=[image.ref]))
    assert [(r.was_present, r.error_category) for r in second.results] == [(False, 0)]  # type: ignore[attr-defined]


def test_removing_one_tag_keeps_the_content_its_other_tags_name(
    testenv: TestEnv, backend: Backend
) -> None:
    """Two caches may name one content by two tags: removing one takes that tag only;
    the content, the other tag and its pin stay (containerd's CRI RemoveImage alone
    would delete every name of the image). The last tag takes the content with it."""
    registry = testenv.registry_client()
    repo = unique("agent/twotags")
    one = registry.push_image(repo, "one", seed=repo)
    two = registry.push_image(repo, "two", seed=repo)
    assert one.config_digest == two.config_digest
    agent = backend.agent
    for image in (one, two):
        assert final(agent.pull(order(image.ref, pin=True)), image.ref).pin == backend.pinned
    first = agent.call("RemoveImages", A.RemoveImagesRequest(images=[one.ref]))
    assert [(r.was_present, r.error_category) for r in first.results] == [(True, 0)]  # type: ignore[attr-defined]
    listed = agent.call("ListImages", A.ListImagesRequest())
    kept = {i.id: i for i in listed.images}.get(two.config_digest)  # type: ignore[attr-defined]
    assert kept is not None, "the content another tag names was removed"
    assert two.ref in kept.repo_tags
    assert one.ref not in kept.repo_tags
    assert kept.pin == backend.pinned
    last = agent.call("RemoveImages", A.RemoveImagesRequest(images=[two.ref]))
    assert [(r.was_present, r.error_category) for r in last.results] == [(True, 0)]  # type: ignore[attr-defined]
    assert two.config_digest not in _held_ids(agent)


def test_an_image_named_by_a_docker_hub_host_alias_is_removed_by_that_name(
    testenv: TestEnv,
) -> None:
    """containerd keeps `registry-1.docker.io/...` as written (distribution folds only
    index.docker.io into docker.io): the agent must look the image up by that name. It
    looked for docker.io/..., so a removal untagged nothing and said it had."""
    registry = testenv.registry_client()
    repo = "library/" + unique("hub-alias")
    one = registry.push_image(repo, "one", seed=repo)
    two = registry.push_image(repo, "two", seed=repo)
    with own_node(testenv, "node-hub-alias") as (containerd, agent):
        # Docker Hub's API host, served here by the local registry as its mirror.
        folder = containerd.certs_d / "registry-1.docker.io"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts.toml").write_text(
            'server = "https://registry-1.docker.io"\n\n'
            f'[host."http://{testenv.registry.host}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )
        refs = [f"registry-1.docker.io/{repo}:{tag}" for tag in ("one", "two")]
        for ref in refs:
            end = final(agent.pull(order(ref, pin=True)), ref)
            assert end.phase == A.PHASE_SUCCEEDED, end.error_message
            assert end.pin == A.PIN_STATE_PINNED
        first = agent.call("RemoveImages", A.RemoveImagesRequest(images=[refs[0]]))
        assert [(r.was_present, r.error_category) for r in first.results] == [(True, 0)]  # type: ignore[attr-defined]
        listed = agent.call("ListImages", A.ListImagesRequest())
        kept = {i.id: i for i in listed.images}.get(one.config_digest)  # type: ignore[attr-defined]
        assert kept is not None, "the content the other tag names was removed"
        assert list(kept.repo_tags) == [refs[1]], "the removed tag is still there"
        assert kept.pin == A.PIN_STATE_PINNED
        last = agent.call("RemoveImages", A.RemoveImagesRequest(images=[refs[1]]))
        assert [(r.was_present, r.error_category) for r in last.results] == [(True, 0)]  # type: ignore[attr-defined]
        assert two.config_digest not in _held_ids(agent), "the last tag's content stayed"


def test_digest_references_work_for_pull_list_and_remove(
    testenv: TestEnv, backend: Backend
) -> None:
    image = testenv.registry_client().push_image(unique("agent/digest"), "v2")
    agent = backend.agent
    for ref in (image.digest_ref, f"{image.name}:{image.tag}@{image.digest}"):
        end = final(agent.pull(order(ref, pin=True)), ref)
        assert end.phase in (A.PHASE_SUCCEEDED, A.PHASE_ALREADY_PRESENT), end.error_message
        assert end.image_id == image.config_digest
        assert end.repo_digest == image.digest
        assert end.pin == backend.pinned
    removed = agent.call("RemoveImages", A.RemoveImagesRequest(images=[image.digest_ref]))
    assert removed.results[0].was_present  # type: ignore[attr-defined]
    listed = agent.call("ListImages", A.ListImagesRequest())
    assert image.config_digest not in {i.id for i in listed.images}  # type: ignore[attr-defined]


def test_insufficient_disk_refuses_the_pull_with_the_numbers(testenv: TestEnv) -> None:
    image = testenv.registry_client().push_image(unique("agent/disk"), "v1")
    agent = testenv.start_agent(
        testenv.nodes[0], lease=False, extra_args=("--min-free-disk=99.99%",), name="agent-disk"
    )
    try:
        end = final(agent.pull(order(image.ref)), image.ref)
    finally:
        agent.stop()
    assert end.error_category == A.ERROR_CATEGORY_INSUFFICIENT_DISK
    assert "bytes free of" in end.error_message
    assert "99.99%" in end.error_message
    with NodeRuntime(testenv.nodes[0].runtime_endpoint) as cri:
        assert cri.status(image.ref) is None


def test_a_pull_that_takes_the_disk_below_the_minimum_is_stopped(testenv: TestEnv) -> None:
    """Free space is checked at a pull's start, when the image's size is not known: a
    pull that then takes the image filesystem below --min-free-disk is stopped (else a
    large image drives the node into the kubelet's evictions) and its content left to
    containerd's garbage collection."""
    image = testenv.registry_client().push_image(unique("agent/big"), "v1", 48 << 20, 3)
    with (
        RegistryProxy(testenv.registry.host, rate=12 << 20) as slow,  # about 4 s of pull
        contextlib.ExitStack() as stack,
    ):
        containerd = Containerd(testenv.workdir, unique("disk-node"), [slow.host])
        containerd.start()
        stack.callback(containerd.stop)
        st = os.statvfs(containerd.root)
        minimum = st.f_bavail * st.f_frsize - (16 << 20)  # crossed a second or so in
        agent = testenv.start_agent(
            node_name=unique("disk-node"),
            runtime_endpoint=containerd.endpoint,
            lease=False,
            extra_args=(f"--min-free-disk={minimum}",),
            name=unique("agent-disk"),
        )
        stack.callback(agent.stop)
        ref = f"{slow.host}/{image.ref.split('/', 1)[1]}"
        end = final(agent.pull(order(ref)), ref)
        assert end.error_category == A.ERROR_CATEGORY_INSUFFICIENT_DISK, end
        assert end.error_message.startswith("pull stopped: image filesystem has"), end
        with NodeRuntime(containerd.endpoint) as cri:
            assert cri.status(ref) is None

        # Once containerd's garbage collection has taken what was downloaded, the space is
        # back above the minimum; sent again (the coordinator's retry), the pull is still
        # refused at its start: its size is known now, and downloading as much again to be
        # stopped again would waste the link.
        def free() -> int:
            st = os.statvfs(containerd.root)
            return st.f_bavail * st.f_frsize

        wait_for("the space to come back", lambda: free() > minimum + (4 << 20), timeout=30)
        time.sleep(FS_CACHE_SECONDS + 0.5)  # the agent's last reading is older than that
        again = final(agent.pull(order(ref)), ref)
        assert again.error_category == A.ERROR_CATEGORY_INSUFFICIENT_DISK, again
        assert "the image needs" in again.error_message, again
        assert agent.process.log_path.read_text().count(f"runtime pull of {ref} started") == 1


def test_node_info_reports_docker_without_pinning(docker_agent: AgentProcess) -> None:
    info = docker_agent.call("GetNodeInfo", A.GetNodeInfoRequest())
    assert (info.runtime_name, info.runtime_api) == ("docker", "docker")  # type: ignore[attr-defined]
    assert info.runtime_version.startswith("20.10")  # type: ignore[attr-defined]
    assert not info.pinning_supported  # type: ignore[attr-defined]
    assert info.image_fs_capacity_bytes > 0  # type: ignore[attr-defined]


def test_node_info_reports_containerd_and_its_image_filesystem(
    agents: dict[str, AgentProcess],
) -> None:
    info = agents["node-1"].call("GetNodeInfo", A.GetNodeInfoRequest())
    assert info.node_name == "node-1"  # type: ignore[attr-defined]
    assert info.runtime_name == "containerd"  # type: ignore[attr-defined]
    assert info.runtime_version.startswith("v2.")  # type: ignore[attr-defined]
    assert info.runtime_api == "cri+containerd"  # type: ignore[attr-defined]
    assert info.pinning_supported  # type: ignore[attr-defined]
    assert info.image_fs_capacity_bytes > 0  # type: ignore[attr-defined]


def test_health_follows_the_runtime_down_and_back(testenv: TestEnv) -> None:
    """Readiness follows the runtime; liveness does not (the DaemonSet's liveness probe
    asks for `liveness`: a restart cannot bring the runtime back)."""
    with own_node(testenv, "health-node") as (containerd, agent):
        assert agent.health() == health_pb2.HealthCheckResponse.SERVING
        assert agent.health("fledged.agent.v1.Agent") == health_pb2.HealthCheckResponse.SERVING
        assert agent.health(LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING
        containerd.stop()
        agent.process.wait_until(
            lambda: agent.health() == health_pb2.HealthCheckResponse.NOT_SERVING,
            timeout=15,
            what="NOT_SERVING after containerd stopped",
        )
        assert agent.health(LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING
        containerd.start()
        agent.process.wait_until(
            agent.serving, timeout=15, what="SERVING after containerd returned"
        )


def read_lease(testenv: TestEnv, node: str) -> tuple[client.V1ObjectMeta, client.V1LeaseSpec]:
    lease = client.CoordinationV1Api(testenv.api_client()).read_namespaced_lease(
        lease_name(node), AGENT_NAMESPACE
    )
    assert lease.metadata is not None
    assert lease.spec is not None
    return lease.metadata, lease.spec


def test_agents_register_and_renew_their_leases(
    testenv: TestEnv, agents: dict[str, AgentProcess]
) -> None:
    for node, agent in agents.items():
        meta, spec = read_lease(testenv, node)
        assert spec.holder_identity == node
        assert (meta.annotations or {})["kubefledged.io/agent-endpoint"] == agent.address
        assert (meta.labels or {})["kubefledged.io/node"] == node
    first = read_lease(testenv, "node-1")[1]
    first_renewal = first.renew_time
    assert first_renewal is not None
    assert first.acquire_time is not None  # when this agent process took the Lease

    def renewed() -> bool:
        later = read_lease(testenv, "node-1")[1]
        return bool(
            later.renew_time is not None
            and later.renew_time > first_renewal
            and later.acquire_time == first.acquire_time  # the same process renews
        )

    agents["node-1"].process.wait_until(renewed, timeout=10, what="Lease renewal")


def test_a_renewal_caught_on_a_silent_connection_ends_and_the_next_one_renews(
    testenv: TestEnv,
) -> None:
    """A flaky link can leave the agent's connection to the apiserver half-open: no
    answer, no error. The renewal caught on it times out, and the next goes over a new
    connection (without a timeout the agent never renewed again, and its node was taken
    for gone for good)."""
    relay = RegistryProxy(testenv.apiserver.url.removeprefix("https://")).start()
    try:
        kubeconfig = testenv.workdir / "kubeconfig-agent-through-relay"
        kubeconfig.write_text(
            testenv.agent_identity()
            .kubeconfig.read_text()
            .replace(testenv.apiserver.url, f"https://{relay.host}")
        )
        node = unique("silent")
        agent = testenv.start_agent(
            testenv.nodes[0], node_name=node, kubeconfig=kubeconfig, name="agent-silent"
        )
        try:
            agent.process.wait_until(
                lambda: read_lease(testenv, node)[1].renew_time is not None,
                timeout=10,
                what="the Lease",
            )
            relay.black_hole()  # the connection the agent keeps goes silent
            silenced = read_lease(testenv, node)[1].renew_time
            assert silenced is not None

            def renewed_after() -> bool:
                later = read_lease(testenv, node)[1].renew_time
                return later is not None and later > silenced + timedelta(seconds=3)

            agent.process.wait_until(renewed_after, timeout=20, what="a renewal after the silence")
            relay.stop()  # now out of reach altogether: the agent still stops cleanly
            agent.stop()
            assert agent.process.proc is not None
            assert agent.process.proc.returncode == 0, agent.process.log_tail()
            assert "could not delete Lease" in agent.process.log_path.read_text()
        finally:
            agent.stop()
            with contextlib.suppress(client.ApiException):  # left behind on purpose above
                client.CoordinationV1Api(testenv.api_client()).delete_namespaced_lease(
                    lease_name(node), AGENT_NAMESPACE
                )
    finally:
        relay.stop()


def test_an_agent_on_an_ipv6_pod_address_publishes_an_endpoint_the_coordinator_dials(
    testenv: TestEnv,
) -> None:
    """The chart advertises status.podIP, a bare IPv6 address on IPv6 clusters: the Lease
    said `::1:PORT`, which gRPC dials as the host `::1:PORT` on port 443, so no agent of
    such a cluster could be reached."""
    node = unique("v6-node")
    agent = testenv.start_agent(
        node_name=node,
        runtime_endpoint=testenv.nodes[0].runtime_endpoint,
        extra_args=("--listen=[::]:0", "--advertise-address=::1"),
        wait_serving=False,
    )
    try:
        deadline = time.monotonic() + 30
        endpoint = None
        while endpoint is None:
            assert time.monotonic() < deadline, "the agent never published its Lease"
            try:
                meta, _ = read_lease(testenv, node)
                endpoint = (meta.annotations or {})["kubefledged.io/agent-endpoint"]
            except client.ApiException:
                time.sleep(0.2)
        assert endpoint.startswith("[::1]:")

        async def listed() -> int:
            pool = AgentPool(None)
            try:
                return len((await pool.get(endpoint).list_images(node)).images)
            finally:
                await pool.close()

        assert asyncio.run(listed()) >= 0  # answered through the published endpoint
    finally:
        agent.stop()


def test_a_stopped_agent_deletes_its_lease(testenv: TestEnv) -> None:
    agent = testenv.start_agent(testenv.nodes[0], node_name="lease-check", name="agent-lease")
    api = client.CoordinationV1Api(testenv.api_client())
    agent.process.wait_until(
        lambda: api.read_namespaced_lease("fledged-agent-lease-check", AGENT_NAMESPACE) is not None,
        timeout=10,
        what="Lease created",
    )
    agent.stop()
    with pytest.raises(client.ApiException) as err:
        api.read_namespaced_lease("fledged-agent-lease-check", AGENT_NAMESPACE)
    assert err.value.status == 404


def test_an_agent_stopping_with_a_pull_under_way_does_not_renew_its_lease_back(
    testenv: TestEnv,
) -> None:
    """With a pull stream open the server's stop waits out its grace period; the
    renewals went on meanwhile, found the deleted Lease gone and made it again: the
    coordinator took the exited agent for alive for a Lease duration."""
    node = unique("lease-grace")
    api = client.CoordinationV1Api(testenv.api_client())
    with RegistryProxy(testenv.registry.host, stall=True) as stall:
        agent = testenv.start_agent(testenv.nodes[0], node_name=node, name=f"agent-{node}")
        agent.process.wait_until(
            lambda: api.read_namespaced_lease(lease_name(node), AGENT_NAMESPACE) is not None,
            timeout=10,
            what="Lease created",
        )
        _stopped_mid_pull(agent, stall, f"{stall.host}/agent/lease-grace:v1")
    with pytest.raises(client.ApiException) as err:
        api.read_namespaced_lease(lease_name(node), AGENT_NAMESPACE)
    assert err.value.status == 404


def test_mtls_refuses_clients_without_a_certificate_from_the_ca(testenv: TestEnv) -> None:
    ca = testenv.ca
    server = ca.issue("agent-server", "fledged-agent", ips=("127.0.0.1",), server=True)
    good = ca.issue("coordinator-client", "fledged-coordinator", client=True)
    other_ca = CertificateAuthority(testenv.workdir / "pki-other", name="other-ca")
    stranger = other_ca.issue("stranger", "fledged-coordinator", client=True)
    agent = testenv.start_agent(
        testenv.nodes[0],
        lease=False,
        name="agent-mtls",
        extra_args=(
            f"--tls-cert={server.cert}",
            f"--tls-key={server.key}",
            f"--tls-client-ca={ca.cert_path}",
        ),
    )
    root = ca.cert_path.read_bytes()

    def node_info(channel: grpc.Channel) -> agent_pb2.NodeInfo:
        with channel:
            return agent_pb2_grpc.AgentStub(channel).GetNodeInfo(A.GetNodeInfoRequest(), timeout=5)

    def with_cert(files: CertFiles | None) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(
            root,
            files.key.read_bytes() if files else None,
            files.cert.read_bytes() if files else None,
        )
        return grpc.secure_channel(agent.address, creds)

    try:
        assert node_info(with_cert(good)).runtime_name == "containerd"
        for refused in (with_cert(None), with_cert(stranger), grpc.insecure_channel(agent.address)):
            with pytest.raises(grpc.RpcError) as err:
                node_info(refused)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        agent.stop()


def test_metrics_count_pulls_by_result(testenv: TestEnv, agents: dict[str, AgentProcess]) -> None:
    agent = agents["node-2"]
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for name in (
        "fledged_agent_pulls_total",
        "fledged_agent_pull_duration_seconds_bucket",
        "fledged_agent_pulled_bytes_total",
        "fledged_agent_pulls_in_flight",
        "fledged_agent_pinned_images",
        "fledged_agent_runtime_up 1.0",
    ):
        assert name in text


def test_an_order_for_another_node_is_refused(agents: dict[str, AgentProcess]) -> None:
    agent = agents["node-1"]
    with agent.channel() as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        mine = stub.GetNodeInfo(
            A.GetNodeInfoRequest(), timeout=5, metadata=(("x-fledged-node", "node-1"),)
        )
        assert mine.node_name == "node-1"
        with pytest.raises(grpc.RpcError) as err:
            stub.GetNodeInfo(
                A.GetNodeInfoRequest(), timeout=5, metadata=(("x-fledged-node", "node-2"),)
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "serves node 'node-1', not 'node-2'" in str(err.value.details())
        stream = stub.PullImages(
            A.PullImagesRequest(images=[A.ImagePull(image="r.io/x:1")]),
            timeout=5,
            metadata=(("x-fledged-node", "node-2"),),
        )
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
