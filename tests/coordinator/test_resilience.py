"""A killed coordinator loses nothing; two replicas elect one leader; the wave size
keeps nodes from pulling one image all at once."""

from __future__ import annotations

import functools
import itertools
import json
import re
import signal
import threading
import time
import urllib.error
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client

from common.wire import (
    COMPONENT_LABELS,
    ENDPOINT_ANNOTATION,
    NODE_LABEL,
    TLS_ANNOTATION,
    lease_name,
)
from coordinator.api import FINALIZER
from coordinator.kube import KubeWriter
from coordinator.metrics import CoordinatorMetrics
from coordinator.pairs import Counts
from coordinator.statuswriter import StatusWriter
from tests.conftest import unique
from tests.coordinator.helpers import (
    agents_logged,
    apply,
    cache_manifest,
    events,
    extra_node,
    get_cache,
    kubectl,
    node_images,
    runtime_images,
    stand_in,
    wait_for,
    wait_status,
)
from tests.testenv import TestEnv
from tests.testenv.agents import AGENT_NAMESPACE, AgentProcess, CoordinatorProcess
from tests.testenv.proxy import RegistryProxy
from tests.testenv.runtime import NodeRuntime

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def pull_intervals(testenv: TestEnv, image: str) -> dict[str, tuple[float, float]]:
    """Per node, when its agent's runtime pull of `image` started and ended (agent logs)."""
    out = {}
    for node in ("node-1", "node-2", "node-3"):
        start = end = None
        for line in (testenv.logs / f"agent-{node}.log").read_text().splitlines():
            stamp = LOG_TIME.match(line)
            if not stamp or image not in line:
                continue
            when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if f"runtime pull of {image} started" in line:
                start = when
            elif f"runtime pull of {image} ended" in line:
                end = when
        if start is not None and end is not None:
            out[node] = (start, end)
    return out


ALL = ("node-1", "node-2", "node-3")


def test_a_killed_coordinator_resumes_a_cache_without_pulling_anything_twice(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """The successor asks for outcomes only (as for a large fleet): the agents' pulls
    under way are joined, not repeated, and their outcomes are enough to finish."""
    image = testenv.registry_client().push_image(unique("ic/restart"), "v1", size=6 << 20, layers=2)
    with RegistryProxy(testenv.registry.host, rate=2 << 20) as slow:  # 9 s for 3 nodes
        testenv.add_registry_host(slow.host)
        ref = image.ref.replace(image.registry, slow.host)
        apply(testenv, cache_manifest("survivor", namespace, [{"images": [ref]}]))

        def pulling() -> bool:
            status = (get_cache(testenv, namespace, "survivor") or {}).get("status") or {}
            return status.get("status") == "Processing" and any(
                n.get("bytesDone", 0) > 0 for n in status.get("nodes") or ()
            )

        wait_for("pulls under way", pulling, timeout=30, interval=0.1)
        args, name = ("--byte-progress-max-nodes=0",), unique("coordinator-successor")
        with stand_in(testenv, coordinator, args, name, kill=True):
            obj = wait_status(testenv, namespace, "survivor", "Succeeded", timeout=60)
    assert obj["status"]["ready"] == "3/3"
    for node in ("node-1", "node-2", "node-3"):
        log = (testenv.logs / f"agent-{node}.log").read_text()
        assert re.search(rf"pull batch .*\(outcomes only\): {re.escape(ref)}$", log, re.M)
    access = testenv.registry.process.log_path.read_text()
    for digest in image.layer_digests:
        assert access.count(f"GET /v2/{image.repository}/blobs/{digest}") == 3  # once per node


def test_an_apiserver_restart_breaks_no_watch_for_good(
    testenv: TestEnv,
    coordinator: CoordinatorProcess,
    agents: dict[str, AgentProcess],
    namespace: str,
) -> None:
    """The apiserver dies under a running coordinator and its agents and comes back
    after longer than the agents' Leases last (10 s here), as a control plane's
    upgrade or crash may: their watches and renewals fail meanwhile, then resume, and
    neither process exits. No agent is taken for gone for the coordinator's own
    blindness (the caches were written Failed, with Warning Events, before the
    agents' Leases were read again); caches edited and created afterwards are served."""
    registry = testenv.registry_client()
    before, edited, created = (registry.push_image(unique("ic/apirestart"), "v1") for _ in range(3))
    apply(testenv, cache_manifest("before-restart", namespace, [{"images": [before.ref]}]))
    wait_status(testenv, namespace, "before-restart", "Succeeded")
    coordinator_pid = coordinator.process.proc.pid if coordinator.process.proc else None
    leases = client.CoordinationV1Api(testenv.api_client())

    def renewed(node: str) -> datetime:
        spec = leases.read_namespaced_lease(lease_name(node), AGENT_NAMESPACE).spec
        assert spec is not None
        assert spec.renew_time is not None
        return spec.renew_time

    def renewed_since(node: str) -> bool:
        return renewed(node) > renewals[node]

    renewals = {node: renewed(node) for node in agents}
    log_before = coordinator.process.log_path.stat().st_size
    testenv.apiserver.restart(down=11.0, sig=signal.SIGKILL)

    assert coordinator.process.alive(), coordinator.process.log_tail()
    assert coordinator.process.proc is not None
    assert coordinator.process.proc.pid == coordinator_pid
    lists = [{"images": [before.ref, edited.ref]}]
    apply(testenv, cache_manifest("before-restart", namespace, lists))
    apply(testenv, cache_manifest("after-restart", namespace, [{"images": [created.ref]}]))
    wait_status(testenv, namespace, "before-restart", "Succeeded")
    wait_status(testenv, namespace, "after-restart", "Succeeded")
    for node in agents:
        held = node_images(testenv, node)
        assert {before.ref, edited.ref, created.ref} <= held.keys(), node
    for node, agent in agents.items():
        assert agent.process.alive(), agent.process.log_tail()
        wait_for(f"{node}'s agent to renew its Lease", functools.partial(renewed_since, node))
    for name in ("before-restart", "after-restart"):
        warnings = [e for e in events(testenv, namespace, name) if e[0] == "Warning"]
        assert not warnings, (name, warnings)
    with coordinator.process.log_path.open("rb") as log:
        log.seek(log_before)
        assert b"is gone" not in log.read()


def test_a_cache_deleted_while_no_coordinator_runs_is_released_by_the_next_one(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """The deletion is read from the object, not remembered: the next coordinator
    lifts the deleted cache's pins, keeps the one another cache still wants, and lets
    the object go."""
    registry = testenv.registry_client()
    shared = registry.push_image(unique("ic/shared"), "v1")
    own = registry.push_image(unique("ic/own"), "v1")
    apply(testenv, cache_manifest("keeper", namespace, [{"images": [shared.ref]}]))
    apply(testenv, cache_manifest("leaver", namespace, [{"images": [shared.ref, own.ref]}]))
    wait_status(testenv, namespace, "keeper", "Succeeded")
    wait_status(testenv, namespace, "leaver", "Succeeded")
    coordinator.kill()
    try:
        kubectl(testenv, "-n", namespace, "delete", "ic", "leaver", "--wait=false")
        assert get_cache(testenv, namespace, "leaver") is not None  # held by our finalizer
    finally:
        coordinator.restart()
    wait_for(
        "the deleted cache to be released",
        lambda: get_cache(testenv, namespace, "leaver") is None,
        timeout=30,
    )
    for node in ("node-1", "node-2", "node-3"):
        held = node_images(testenv, node)
        assert held.get(own.ref) is False, f"{own.ref} still pinned on {node}"
        assert held.get(shared.ref) is True, f"{shared.ref} lost its pin on {node}"
    assert wait_status(testenv, namespace, "keeper", "Succeeded")["status"]["ready"] == "3/3"


def test_pulls_of_a_cache_deleted_while_no_coordinator_ran_are_cancelled_by_the_next(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """Pulls outlive the coordinator that ordered them (the work is not lost to a
    restart). The next one has no record of them, but each agent's listing names its
    pulls under way: those of a cache deleted meanwhile are cancelled, not downloaded
    to the end on every node."""
    image = testenv.registry_client().push_image(unique("ic/orphan"), "v1", 24 << 20, 3)
    with RegistryProxy(testenv.registry.host, rate=3 << 20) as slow:  # 24 s for 3 nodes
        testenv.add_registry_host(slow.host)
        ref = image.ref.replace(image.registry, slow.host)

        apply(testenv, cache_manifest("orphan", namespace, [{"images": [ref]}]))
        wait_for(
            "the pulls to start",
            lambda: agents_logged(testenv, f"runtime pull of {ref} started", ALL),
        )
        coordinator.kill()
        try:
            kubectl(testenv, "-n", namespace, "delete", "ic", "orphan", "--wait=false")
        finally:
            coordinator.restart()
        wait_for(
            "the pulls to stop",
            lambda: agents_logged(testenv, f"pull of {ref} cancelled", ALL),
            timeout=30,
        )
        assert slow.sent_during(2) < 1 << 20  # 6 MiB, had a pull gone on
        assert slow.bytes_sent < image.content_size * len(ALL) // 2, slow.bytes_sent
    wait_for("the cache to go", lambda: get_cache(testenv, namespace, "orphan") is None)
    for node in ALL:
        assert ref not in node_images(testenv, node), node


def test_the_wave_size_keeps_one_node_at_a_time_on_an_image(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    image = testenv.registry_client().push_image(unique("ic/wave"), "v1", size=3 << 20)
    with RegistryProxy(testenv.registry.host, rate=4 << 20) as slow:
        testenv.add_registry_host(slow.host)
        ref = image.ref.replace(image.registry, slow.host)
        manifest = cache_manifest("wave", namespace, [{"images": [ref]}])
        manifest["spec"]["maxConcurrentNodesPerImage"] = 1
        apply(testenv, manifest)
        wait_status(testenv, namespace, "wave", "Succeeded", timeout=60)
    intervals = sorted(pull_intervals(testenv, ref).values())
    assert len(intervals) == 3
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert start >= end, f"pulls overlapped: {intervals}"


def test_two_replicas_elect_one_leader_and_the_standby_takes_over_when_it_dies(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    lease_name = unique("leader-test")
    args = (
        "--leader-elect",
        f"--leader-election-id={lease_name}",
        f"--watch-namespace={namespace}",
    )
    first = testenv.start_coordinator(args, name=f"{lease_name}-a")
    second = testenv.start_coordinator(args, name=f"{lease_name}-b")
    api = client.CoordinationV1Api(testenv.api_client())

    def holder() -> str | None:
        try:
            spec = api.read_namespaced_lease(lease_name, "kube-fledged").spec
        except client.ApiException:
            return None
        return spec.holder_identity if spec else None

    try:
        leader_id = wait_for("a leader", holder, timeout=20)
        logs = {p: p.process.log_path.read_text() for p in (first, second)}
        leaders = [p for p, text in logs.items() if "became the leader" in text]
        assert len(leaders) == 1
        leader = leaders[0]
        standby = second if leader is first else first
        assert "informers synced" not in logs[standby]  # the standby does nothing
        leader.kill()  # no clean release: the standby must wait out the Lease
        wait_for("the standby to lead", lambda: holder() not in (None, leader_id), timeout=30)
        wait_for(
            "the standby to start its controller",
            lambda: "informers synced" in standby.process.log_path.read_text(),
            timeout=10,
        )
        image = testenv.registry_client().push_image(unique("ic/leader"), "v1")
        apply(testenv, cache_manifest("led", namespace, [{"images": [image.ref]}]))
        wait_status(testenv, namespace, "led", "Succeeded", timeout=30)
        # The new leader serves its namespace (the suite's own coordinator does too, so
        # the proof is in the new leader's log, not in the status).
        wait_for(
            "the new leader to reconcile the cache",
            lambda: f"reconciled {namespace}/led" in standby.process.log_path.read_text(),
            timeout=15,
        )
        assert f"reconciled {namespace}/led" not in leader.process.log_path.read_text()
    finally:
        first.stop()
        second.stop()


def test_a_coordinator_without_api_rights_stays_unready_and_still_stops(
    testenv: TestEnv, coordinator: CoordinatorProcess
) -> None:
    nobody = testenv.identity(unique("no-rights"))
    blind = CoordinatorProcess(testenv.workdir, nobody.kubeconfig, name=unique("coordinator-blind"))
    blind.start(wait_ready=False)
    try:
        blind.process.wait_until(
            lambda: "forbidden" in blind.process.log_path.read_text().lower(),
            timeout=20,
            what="the informers' 403",
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            blind.ready()
        assert err.value.code == 503
        assert blind.process.alive()
    finally:
        started = time.monotonic()
        blind.stop()
    assert time.monotonic() - started < 10  # SIGTERM is honoured while waiting to sync


def test_a_cache_deleted_while_reconciled_is_not_patched_and_not_an_error(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """Its finalizer or annotations patched after it went (a namespace deleted under
    it): the patch finds nothing, which is no error (it was one, logged with its
    traceback and retried)."""
    writer = KubeWriter(testenv.api_client())
    image = testenv.registry_client().push_image(unique("ic/gone"), "v1")
    apply(testenv, cache_manifest("gone", namespace, [{"images": [image.ref]}]))
    assert writer.patch_metadata(namespace, "gone", {"annotations": {"example.com/a": "1"}})
    kubectl(testenv, "-n", namespace, "delete", "ic/gone", "--wait=true")
    assert not writer.patch_metadata(namespace, "gone", {"annotations": {"example.com/a": None}})


def test_finalizers_are_set_on_their_own_condition_not_the_caches_version(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """The finalizer patch against the real apiserver (the coordinator stopped so
    nothing else writes): a status write and a spec edit after our read do not fail
    it (they did, 409, on the version read); a finalizer another controller added
    since our read is not erased; a cache made anew under the name is not patched from
    the old one's copy."""
    custom = client.CustomObjectsApi(testenv.api_client())
    writer = KubeWriter(testenv.api_client())
    manifest = cache_manifest("fin", namespace, [{"images": ["reg.invalid/a:v1"]}])
    coordinator.stop()
    try:
        apply(testenv, manifest)
        read = get_cache(testenv, namespace, "fin") or {}
        writer.replace_status({**read, "status": {"status": "Processing"}})
        apply(testenv, cache_manifest("fin", namespace, [{"images": ["reg.invalid/b:v1"]}]))
        assert writer.set_finalizers(read, [FINALIZER])
        read = get_cache(testenv, namespace, "fin") or {}
        assert read["metadata"]["finalizers"] == [FINALIZER]

        theirs = "example.com/theirs"
        custom.patch_namespaced_custom_object(
            "kubefledged.io", "v1alpha2", namespace, "imagecaches", "fin",
            [{"op": "add", "path": "/metadata/finalizers/-", "value": theirs}],
            _content_type="application/json-patch+json",
        )  # fmt: skip
        assert not writer.set_finalizers(read, [])
        now = get_cache(testenv, namespace, "fin") or {}
        assert now["metadata"]["finalizers"] == [FINALIZER, theirs]

        assert writer.set_finalizers(now, [])
        kubectl(testenv, "-n", namespace, "delete", "ic/fin", "--wait=true")
        apply(testenv, manifest)
        assert not writer.set_finalizers(now, [FINALIZER])  # the old one's copy
        assert "finalizers" not in (get_cache(testenv, namespace, "fin") or {})["metadata"]
        kubectl(testenv, "-n", namespace, "delete", "ic/fin", "--wait=true")
    finally:
        coordinator.restart()


def test_a_status_write_that_meets_a_concurrent_change_retries_on_a_fresh_read(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """The status writer against the real apiserver, with a real concurrent update
    between its read and its write (the coordinator stopped so nothing else writes)."""
    image = testenv.registry_client().push_image(unique("ic/contended"), "v1")
    apply(testenv, cache_manifest("contended", namespace, [{"images": [image.ref]}]))
    wait_status(testenv, namespace, "contended", "Succeeded", timeout=30)
    coordinator.stop()
    try:
        custom = client.CustomObjectsApi(testenv.api_client())

        class Contended(KubeWriter):
            """A real writer; someone else updates the cache right after its first read."""

            reads = 0

            def get_cache(self, ns: str, name: str) -> dict[str, Any] | None:
                obj = super().get_cache(ns, name)
                self.reads += 1
                if self.reads == 1:
                    custom.patch_namespaced_custom_object(
                        "kubefledged.io", "v1alpha2", ns, "imagecaches", name,
                        {"metadata": {"annotations": {"example.com/touched": "yes"}}},
                    )  # fmt: skip
                return obj

        writer = Contended(testenv.api_client())
        before = (get_cache(testenv, namespace, "contended") or {})["status"]
        ours = {**before, "message": "written after a conflict"}
        counts = Counts(nodes=3, images=1, totals={image.ref: 3}, failed={})
        StatusWriter(writer, 0.0, CoordinatorMetrics())._write(
            f"{namespace}/contended", ours, counts
        )
        obj = get_cache(testenv, namespace, "contended") or {}
        assert writer.reads == 2  # the 409 led to a fresh read, then a write that held
        assert obj["status"]["message"] == "written after a conflict"
        assert obj["metadata"]["annotations"]["example.com/touched"] == "yes"
    finally:
        coordinator.restart()


def test_a_status_write_for_a_cache_deleted_since_its_read_is_dropped(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """The cache deleted between the writer's read and its write (its namespace
    deleted, say): nothing to write, no error (it was a warning with the apiserver's
    whole answer, and a retry)."""
    apply(testenv, cache_manifest("going", namespace, [{"images": ["reg.invalid/a:v1"]}]))
    wait_for("its finalizer", lambda: (get_cache(testenv, namespace, "going") or {})
             .get("metadata", {}).get("finalizers"))  # fmt: skip
    custom = client.CustomObjectsApi(testenv.api_client())

    class Deleting(KubeWriter):
        """A real writer; the cache goes right after its read."""

        def get_cache(self, ns: str, name: str) -> dict[str, Any] | None:
            obj = super().get_cache(ns, name)
            custom.patch_namespaced_custom_object(
                "kubefledged.io", "v1alpha2", ns, "imagecaches", name,
                {"metadata": {"finalizers": None}},
            )  # fmt: skip
            custom.delete_namespaced_custom_object(
                "kubefledged.io", "v1alpha2", ns, "imagecaches", name
            )
            return obj

    counts = Counts(nodes=3, images=1, totals={}, failed={})
    status = {"status": "Processing", "message": "never written"}
    writer = StatusWriter(Deleting(testenv.api_client()), 0.0, CoordinatorMetrics())
    assert writer._write(f"{namespace}/going", status, counts) is None
    assert get_cache(testenv, namespace, "going") is None


def test_the_refresh_timer_repulls_a_moved_tag_without_any_annotation(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """--image-cache-refresh-frequency on its own (the suite's coordinator has it off)."""
    registry = testenv.registry_client()
    repo = unique("ic/timer")
    old = registry.push_image(repo, "latest", seed="old")
    apply(testenv, cache_manifest("timed", namespace, [{"images": [old.ref]}]))
    wait_status(testenv, namespace, "timed", "Succeeded")
    new = registry.push_image(repo, "latest", seed="new")
    args, name = ("--image-cache-refresh-frequency=3s",), unique("coordinator-timer")
    with stand_in(testenv, coordinator, args, name):

        def on_every_node() -> bool:
            for node in ("node-1", "node-2", "node-3"):
                with NodeRuntime(testenv.node(node).runtime_endpoint) as cri:
                    held = cri.status(old.ref)  # what the tag means on the node now
                if held is None or held.id != new.config_digest:
                    return False
            return True

        wait_for("the timer to re-pull the moved tag on every node", on_every_node, timeout=40)
        obj = wait_for(
            "the new digest in status",
            lambda: (
                (o := get_cache(testenv, namespace, "timed"))
                and o["status"]["images"][0].get("digest") == new.digest
                and o["status"]["status"] == "Succeeded"
                and o
            ),
            timeout=20,
        )
        assert "kubefledged.io/refresh-imagecache" not in (obj["metadata"].get("annotations") or {})


def test_an_agent_killed_mid_pull_is_reported_and_its_successor_finishes_the_pull(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """SIGKILL leaves the agent's Lease behind, and the successor listens at the same
    address: the Lease's new acquireTime is what tells the coordinator."""
    image = testenv.registry_client().push_image(unique("ic/crash"), "v1", size=8 << 20)
    pool = unique("crash")
    with extra_node(testenv, unique("node-crash"), {"fledged.test/pool": pool}) as node:
        with RegistryProxy(testenv.registry.host, rate=1 << 20) as slow:  # 8 s
            node.containerd.add_registry_host(slow.host)
            ref = image.ref.replace(image.registry, slow.host)
            lists = [{"images": [ref], "nodeSelector": {"fledged.test/pool": pool}}]
            apply(testenv, cache_manifest("crash", namespace, lists))

            def pulling() -> bool:
                status = (get_cache(testenv, namespace, "crash") or {}).get("status") or {}
                return any(n.get("bytesDone", 0) > 0 for n in status.get("nodes") or ())

            wait_for("the pull under way", pulling, timeout=30, interval=0.1)
            node.agent.process.kill()

            def lost() -> dict[str, Any] | None:
                obj = get_cache(testenv, namespace, "crash") or {}
                failed = (obj.get("status", {}).get("failures") or {}).get(ref) or [{}]
                return obj if failed[0].get("reason") == "AgentUnavailable" else None

            obj = wait_for("the lost agent in status", lost, timeout=15)
            assert "lost the agent" in obj["status"]["failures"][ref][0]["message"]
            node.agent.start()  # same address, new process
            obj = wait_status(testenv, namespace, "crash", "Succeeded", timeout=60)
        assert obj["status"]["ready"] == "1/1"
        assert "failures" not in obj["status"]
        log = coordinator.process.log_path.read_text()
        assert re.search(rf"node {node.name}: a new agent process at .*; 1 order\(s\) lost", log)
        with NodeRuntime(node.containerd.endpoint) as cri:
            held = cri.status(ref)
        assert held is not None
        assert held.id == image.config_digest


def test_an_agent_on_a_node_whose_clock_is_minutes_behind_is_not_taken_for_gone(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """Node clocks drift (an edge node without NTP): the agent renews its Lease on time,
    but every renewTime is five minutes old by the coordinator's clock. Renewals are
    judged by when the coordinator sees them, as Kubernetes judges node Leases, so the
    node is served; once the renewals stop, it is gone within the Lease's duration."""
    image = testenv.registry_client().push_image(unique("ic/skew"), "v1")
    pool = unique("skew")
    with extra_node(testenv, unique("node-skew"), {"fledged.test/pool": pool}, lease=False) as node:
        leases = client.CoordinationV1Api(testenv.api_client())
        name = lease_name(node.name)
        acquired = datetime.now(UTC) - timedelta(minutes=5)
        stop = threading.Event()

        def lease(resource_version: str | None = None) -> client.V1Lease:
            return client.V1Lease(
                metadata=client.V1ObjectMeta(
                    name=name,
                    namespace=AGENT_NAMESPACE,
                    labels={**COMPONENT_LABELS, NODE_LABEL: node.name},
                    annotations={ENDPOINT_ANNOTATION: node.agent.address, TLS_ANNOTATION: "false"},
                    resource_version=resource_version,
                ),
                spec=client.V1LeaseSpec(
                    holder_identity=node.name,
                    lease_duration_seconds=10,
                    acquire_time=acquired,
                    renew_time=datetime.now(UTC) - timedelta(minutes=5),
                ),
            )

        def renew() -> None:  # the agent's registrar, on a node five minutes behind
            leases.create_namespaced_lease(AGENT_NAMESPACE, lease())
            while not stop.wait(1.0):
                current = leases.read_namespaced_lease(name, AGENT_NAMESPACE).metadata
                version = current.resource_version if current is not None else None
                leases.replace_namespaced_lease(name, AGENT_NAMESPACE, lease(version))

        renewer = threading.Thread(target=renew, daemon=True)
        renewer.start()
        try:
            lists = [{"images": [image.ref], "nodeSelector": {"fledged.test/pool": pool}}]
            apply(testenv, cache_manifest("skew", namespace, lists))
            obj = wait_status(testenv, namespace, "skew", "Succeeded", timeout=60)
            assert obj["status"]["ready"] == "1/1"
            assert runtime_images(node.containerd.endpoint).get(image.ref) is True
            gone = f"agent of node {node.name} is gone"
            seen = coordinator.process.log_path.read_text().count(gone)  # its first sight, maybe
            stop.set()
            renewer.join(timeout=10)
            wait_for(
                "the coordinator to take the agent for gone",
                lambda: coordinator.process.log_path.read_text().count(gone) > seen,
                timeout=30,
            )
        finally:
            stop.set()
            renewer.join(timeout=10)
            leases.delete_namespaced_lease(name, AGENT_NAMESPACE)


def _apply_all(testenv: TestEnv, manifests: list[dict[str, Any]]) -> None:
    """Many caches in one kubectl call, as `kubectl apply -f dir/` would send them."""
    kubectl(
        testenv,
        "apply",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}),
    )


def test_deleting_many_caches_at_once_keeps_the_coordinator_and_releases_every_one(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """The reported defect: caches deleted while their status writes were under way
    killed the status writer (KeyError), then the coordinator, leaving finalizers and
    pins behind. 30 caches pulling slowly and 30 failing, then one mass delete."""
    image = testenv.registry_client().push_image(unique("ic/mass"), "v1", size=2 << 20)
    with RegistryProxy(testenv.registry.host, rate=1 << 20) as slow:
        testenv.add_registry_host(slow.host)
        ref = image.ref.replace(image.registry, slow.host)
        caches = [cache_manifest(f"slow-{i}", namespace, [{"images": [ref]}]) for i in range(30)]
        caches += [
            cache_manifest(f"dead-{i}", namespace, [{"images": [f"127.0.0.1:1/ic/none-{i}:v1"]}])
            for i in range(30)
        ]
        _apply_all(testenv, caches)

        def all_have_a_status() -> bool:
            items = client.CustomObjectsApi(testenv.api_client()).list_namespaced_custom_object(
                "kubefledged.io", "v1alpha2", namespace, "imagecaches"
            )["items"]  # type: ignore[index]
            return len(items) == 60 and all(i.get("status") for i in items)

        wait_for("every cache to have a status", all_have_a_status, timeout=60)
        kubectl(testenv, "-n", namespace, "delete", "ic", "--all", "--wait=false")

        def none_left() -> bool:
            return not client.CustomObjectsApi(testenv.api_client()).list_namespaced_custom_object(
                "kubefledged.io", "v1alpha2", namespace, "imagecaches"
            )["items"]  # type: ignore[index]

        wait_for("every cache to be released and gone", none_left, timeout=90)
    assert coordinator.process.alive()
    log = coordinator.process.log_path.read_text()
    assert "died" not in log
    assert "KeyError" not in log
    for node in ("node-1", "node-2", "node-3"):
        wait_for(
            f"{node} to hold no pin of the deleted caches",
            lambda node=node: node_images(testenv, node).get(ref) in (None, False),  # type: ignore[misc]
            timeout=30,
        )


def test_a_status_too_large_for_the_object_is_cut_down_and_written_once(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """The reported defect: 2 lists of long references, all NotFound, made a ~2 MB
    status the apiserver refused ("Request Entity Too Large") over and over while the
    cache stayed Processing. Now the detail is cut to fit and says what it left out."""
    host = testenv.registry.host
    lists = [
        {"images": [f"{host}/{'a' * 180}/l{n}-{i:03d}-{'b' * 40}:{'t' * 128}" for i in range(250)]}
        for n in range(2)
    ]
    kubectl(
        testenv, "create", "-f", "-", stdin=json.dumps(cache_manifest("huge", namespace, lists))
    )
    obj = wait_status(
        testenv, namespace, "huge", "Failed", "ImagePullFailedForSomeImages", timeout=120
    )
    status = obj["status"]
    assert status["ready"] == "0/1500"
    assert len(status["appliedLists"][0]["images"]) == 250  # what is acted on stays whole
    omitted = status["omitted"]
    assert omitted["failedImages"] + len(status["failures"]) == 500
    assert omitted["images"] + len(status["images"]) == 500
    first = sorted(status["failures"])[0]
    assert {f["reason"] for f in status["failures"][first]} == {"NotFound"}
    assert len(json.dumps(obj)) < 1_500_000
    log = coordinator.process.log_path.read_text()
    assert log.count(f"status of {namespace}/huge not written") <= 1
    warnings = [e for e in events(testenv, namespace, "huge") if e[1] == "ImagePullFailed"]
    assert len(warnings) <= 11  # one per image for the first ten, then one summary
