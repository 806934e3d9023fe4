"""ImageCaches end to end: kubectl, the real apiserver, the coordinator, real agents on
three simulated nodes with their own containerd, and real registries."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from kubernetes import client

from common.reference import InvalidReference
from common.reference import parse as parse_reference
from tests.conftest import unique
from tests.coordinator.helpers import (
    GROUP,
    PLURAL,
    VERSION,
    agents_logged,
    apply,
    cache_manifest,
    events,
    extra_node,
    get_cache,
    kubectl,
    node_images,
    stand_in,
    wait_for,
    wait_status,
)
from tests.testenv import AUTH_PASSWORD, AUTH_USER, TestEnv, dockerconfig_secret, pull_secret
from tests.testenv.agents import AGENT_NAMESPACE, AgentProcess, CoordinatorProcess
from tests.testenv.images import PushedImage
from tests.testenv.proxy import RegistryProxy
from tests.testenv.runtime import NodeRuntime

ALL = ("node-1", "node-2", "node-3")
EDGE = ("node-1", "node-2")
ENDPOINT = "kubefledged.io/agent-endpoint"  # the annotation carrying an agent's address


def test_a_kube_fledged_manifest_caches_its_images_on_the_selected_nodes(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    registry = testenv.registry_client()
    everywhere = registry.push_image(unique("ic/all"), "v1")
    edge = registry.push_image(unique("ic/edge"), "v1", size=1 << 20, layers=2)
    # Exactly the shape of kube-fledged's sample: no field of ours.
    manifest = cache_manifest(
        "imagecache1",
        namespace,
        [
            {"images": [everywhere.ref]},
            {"images": [edge.ref], "nodeSelector": {"fledged.test/tier": "edge"}},
        ],
    )
    apply(testenv, manifest)
    waited = kubectl(
        testenv, "-n", namespace, "wait", "--for=condition=Ready", "--timeout=60s", "ic/imagecache1"
    )
    assert "condition met" in waited.stdout
    obj = get_cache(testenv, namespace, "imagecache1")
    assert obj is not None
    status = obj["status"]
    assert (status["status"], status["reason"]) == ("Succeeded", "ImagesPulledSuccessfully")
    assert status["ready"] == "5/5"
    assert status["imagesReady"] == "2/2"
    assert status["startTime"]
    assert status["completionTime"]
    assert "failures" not in status
    digests = {i["image"]: i["digest"] for i in status["images"]}
    assert digests == {everywhere.ref: everywhere.digest, edge.ref: edge.digest}
    for node in ALL:
        held = node_images(testenv, node)
        assert held.get(everywhere.ref) is True, f"{node} should hold {everywhere.ref} pinned"
        assert (edge.ref in held) == (node in EDGE)
    # The coordinator's metrics count the agents it has heard from (every node here).
    wait_for(
        "the metrics to count the listed agents",
        lambda: coordinator.metric("fledged_coordinator_agents_listed") >= len(ALL),
        timeout=5,
    )
    assert coordinator.metric('fledged_coordinator_orders_total{kind="pull"}') >= 5
    table = kubectl(testenv, "-n", namespace, "get", "ic", "-o", "wide").stdout
    assert "Succeeded" in table
    assert "5/5" in table
    assert "ImagesPulledSuccessfully" in table
    # Events are recorded just after the status they describe: wait for them.
    wait_for(
        "the ImagesPulledSuccessfully Event",
        lambda: (
            ("Normal", "ImagesPulledSuccessfully")
            in [(t, r) for t, r, _ in events(testenv, namespace, "imagecache1")]
        ),
        timeout=10,
    )


@pytest.mark.parametrize(
    ("lists", "complaint"),
    [
        ([], "cacheSpec"),
        ([{"images": []}], "images"),
        ([{"images": ["127.0.0.1:5000/a:v1", "127.0.0.1:5000/a:v1"]}], "Duplicate value"),
        (
            [{"images": ["Not A Reference"]}],
            "invalid image reference Not A Reference: expected [registry[:port]/]repository",
        ),
        ([{"images": ["r.io/a@sha256:" + "0" * 32]}], "a sha256 digest is 64 lowercase"),
        ([{"images": ["r.io/a@sha256:" + "A" * 64]}], "a sha256 digest is 64 lowercase"),
        ([{"images": ["r.io/" + "a" * 251 + ":v1"]}], "longer than 255 characters"),
    ],
)
def test_the_apiserver_rejects_invalid_caches_with_a_clear_message(
    testenv: TestEnv,
    coordinator: CoordinatorProcess,
    namespace: str,
    lists: list[dict[str, Any]],
    complaint: str,
) -> None:
    result = kubectl(
        testenv,
        "apply",
        "-f",
        "-",
        stdin=json.dumps(cache_manifest("bad", namespace, lists)),
        check=False,
    )
    assert result.returncode != 0
    assert complaint in result.stderr, result.stderr


REFERENCES = [  # each refused by the apiserver exactly when the coordinator's parser refuses it
    "nginx",
    "nginx:1.27",
    "Nginx:1.27",
    "library/nginx@sha256:" + "a" * 64,
    "r.io/a@sha256:" + "a" * 63,
    "r.io/a@sha256:" + "a" * 64 + "0",
    "r.io/a:v1@sha512:" + "b" * 128,
    "r.io:5000/team/app:" + "t" * 128,
    "r.io:5000/team/app:" + "t" * 129,
    "r.io/" + "a" * 249,
    "r.io/" + "a" * 251,
    "a/" + "b" * 243,  # docker.io/a/... is 255
    "a/" + "b" * 244,
    "b" * 237,  # docker.io/library/... is 255
    "b" * 238,
    "localhost/" + "c" * 245,
    "localhost/" + "c" * 246,
    "r.io/a:",
    "r.io//a",
    "-r.io/a",
]


def test_the_apiserver_and_the_coordinator_refuse_the_same_references(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    for index, ref in enumerate(REFERENCES):
        manifest = cache_manifest(f"ref-{index}", namespace, [{"images": [ref]}])
        result = kubectl(
            testenv,
            "create",
            "--dry-run=server",
            "-f",
            "-",
            stdin=json.dumps(manifest),
            check=False,
        )
        try:
            parse_reference(ref)
            valid = True
        except InvalidReference:
            valid = False
        assert (result.returncode == 0) == valid, (ref, result.stderr)
        if not valid:
            assert f"invalid image reference {ref}" in result.stderr


def test_a_null_node_selector_value_is_refused_not_read_as_every_node(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """kubectl create and server-side apply send the null; the CRD keeps it (nullable)
    so its rule can refuse it. (Client-side kubectl apply drops nulls before sending.)"""
    manifest = cache_manifest(
        "nullsel", namespace, [{"images": ["r.io/a:v1"], "nodeSelector": {"zone": None}}]
    )
    for args in (("create",), ("apply", "--server-side")):
        result = kubectl(testenv, *args, "-f", "-", stdin=json.dumps(manifest), check=False)
        assert result.returncode != 0, args
        assert "a null value would select every node" in result.stderr


def test_failures_are_reported_per_image_and_node_and_aggregated_in_events(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    good = testenv.registry_client().push_image(unique("ic/good"), "v1")
    missing = f"{testenv.registry.host}/{unique('ic/missing')}:v1"
    apply(testenv, cache_manifest("partial", namespace, [{"images": [good.ref, missing]}]))
    obj = wait_status(testenv, namespace, "partial", "Failed", "ImagePullFailedForSomeImages")
    failures = obj["status"]["failures"]
    assert list(failures) == [missing]
    assert sorted(f["node"] for f in failures[missing]) == list(ALL)
    assert {f["reason"] for f in failures[missing]} == {"NotFound"}
    assert obj["status"]["ready"] == "3/6"

    def pull_failed() -> list[str]:
        return [m for _, r, m in events(testenv, namespace, "partial") if r == "ImagePullFailed"]

    wait_for("the ImagePullFailed Event", pull_failed, timeout=10)
    time.sleep(1)  # a per-node Event would have followed by now
    warnings = pull_failed()
    assert len(warnings) == 1  # one Event per image, not one per node
    assert "failed on 3 of 3 nodes" in warnings[0]
    assert "NotFound" in warnings[0]


def test_a_selector_matching_no_node_is_reported_then_acted_on_when_a_node_matches(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    image = testenv.registry_client().push_image(unique("ic/later"), "v1")
    label = unique("gpu")
    apply(
        testenv,
        cache_manifest(
            "later",
            namespace,
            [{"images": [image.ref], "nodeSelector": {"fledged.test/pool": label}}],
        ),
    )
    obj = wait_status(testenv, namespace, "later", "Failed", "NoMatchingNodes")
    assert "matches no node" in obj["status"]["message"]
    core = client.CoreV1Api(testenv.api_client())
    core.patch_node("node-3", {"metadata": {"labels": {"fledged.test/pool": label}}})
    try:
        wait_status(testenv, namespace, "later", "Succeeded", timeout=30)
        assert node_images(testenv, "node-3").get(image.ref) is True
    finally:
        core.patch_node("node-3", {"metadata": {"labels": {"fledged.test/pool": None}}})


def test_a_node_without_a_live_agent_is_a_clear_per_node_failure(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    image = testenv.registry_client().push_image(unique("ic/orphan"), "v1")
    pool = unique("agentless")
    core = client.CoreV1Api(testenv.api_client())
    core.create_node(
        client.V1Node(metadata=client.V1ObjectMeta(name=pool, labels={"fledged.test/pool": pool}))
    )
    try:
        apply(
            testenv,
            cache_manifest(
                "orphan",
                namespace,
                [{"images": [image.ref], "nodeSelector": {"fledged.test/pool": pool}}],
            ),
        )
        obj = wait_status(testenv, namespace, "orphan", "Failed")
        entry = obj["status"]["failures"][image.ref][0]
        assert (entry["node"], entry["reason"]) == (pool, "AgentUnavailable")
        assert "no agent" in entry["message"]
    finally:
        core.delete_node(pool)


def test_an_image_removed_from_the_spec_is_unpinned_and_removed_unless_another_cache_wants_it(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    registry = testenv.registry_client()
    keep, drop, shared = (
        registry.push_image(unique(f"ic/{n}"), "v1") for n in ("keep", "drop", "shared")
    )
    apply(
        testenv, cache_manifest("editme", namespace, [{"images": [keep.ref, drop.ref, shared.ref]}])
    )
    apply(
        testenv,
        cache_manifest(
            "other",
            namespace,
            [{"images": [shared.ref], "nodeSelector": {"fledged.test/zone": "a"}}],
        ),
    )
    wait_status(testenv, namespace, "editme", "Succeeded")
    wait_status(testenv, namespace, "other", "Succeeded")
    apply(testenv, cache_manifest("editme", namespace, [{"images": [keep.ref]}]))

    def settled() -> bool:
        held = {n: node_images(testenv, n) for n in ALL}
        return all(drop.ref not in held[n] for n in ALL) and shared.ref not in held["node-3"]

    wait_for("removed images to leave the nodes", settled, timeout=30)
    for node in ALL:
        held = node_images(testenv, node)
        assert held[keep.ref] is True
        if node in EDGE:  # the other cache still wants it there, pinned
            assert held[shared.ref] is True
    obj = wait_status(testenv, namespace, "editme", "Succeeded")
    assert "removing" not in obj["status"]
    assert obj["status"]["ready"] == "3/3"


def test_a_tag_dropped_from_one_cache_leaves_the_content_another_cache_names_by_another_tag(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """One content under two tags, one per cache. Dropping the tag from its cache takes
    that tag off the nodes and nothing else: the other cache's tag stays, pinned, never
    deleted and pulled again (its record is the one made by the first pull)."""
    registry = testenv.registry_client()
    repo = unique("ic/twotags")
    one = registry.push_image(repo, "one", seed=repo)
    two = registry.push_image(repo, "two", seed=repo)
    keep = registry.push_image(unique("ic/keep"), "v1")
    apply(testenv, cache_manifest("by-one", namespace, [{"images": [keep.ref, one.ref]}]))
    apply(testenv, cache_manifest("by-two", namespace, [{"images": [two.ref]}]))
    wait_status(testenv, namespace, "by-one", "Succeeded")
    wait_status(testenv, namespace, "by-two", "Succeeded")

    def created(node: str) -> object:
        with NodeRuntime(testenv.node(node).runtime_endpoint) as cri:
            return cri.image_record(two.ref).created_at

    before = {n: created(n) for n in ALL}
    apply(testenv, cache_manifest("by-one", namespace, [{"images": [keep.ref]}]))
    wait_for(
        "the dropped tag to leave the nodes",
        lambda: all(one.ref not in node_images(testenv, n) for n in ALL),
        timeout=30,
    )
    obj = wait_status(testenv, namespace, "by-one", "Succeeded")
    assert "removing" not in obj["status"]
    for node in ALL:
        assert node_images(testenv, node).get(two.ref) is True, f"{two.ref} lost on {node}"
        assert created(node) == before[node], f"{two.ref} was deleted and pulled again on {node}"
    assert wait_status(testenv, namespace, "by-two", "Succeeded")["status"]["ready"] == "3/3"


def test_deleting_a_cache_unpins_its_images_and_releases_the_object(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    image = testenv.registry_client().push_image(unique("ic/delete"), "v1")
    apply(testenv, cache_manifest("gone", namespace, [{"images": [image.ref]}]))
    obj = wait_status(testenv, namespace, "gone", "Succeeded")
    assert "kubefledged.io/unpin-images" in obj["metadata"]["finalizers"]
    kubectl(testenv, "-n", namespace, "delete", "ic", "gone", "--timeout=30s")
    assert get_cache(testenv, namespace, "gone") is None
    for node in ALL:
        assert node_images(testenv, node).get(image.ref) is False, (
            f"{image.ref} still pinned on {node}"
        )


def test_creating_editing_and_deleting_caches_fails_no_reconcile(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """A cache's first reconcile sends its orders, writes its status, then adds its
    finalizer: that patch was conditional on the version read, which the status write
    (or an edit meanwhile) had changed, so it failed with a conflict at nearly every
    creation, logged as an error with its traceback and counted as a failed reconcile.
    The caches here are created, edited at once, and deleted: no reconcile fails."""
    registry = testenv.registry_client()
    first, second = (registry.push_image(unique(f"ic/quiet-{x}"), "v1") for x in "ab")
    names = [f"quiet-{i}" for i in range(4)]
    for name in names:
        apply(testenv, cache_manifest(name, namespace, [{"images": [first.ref]}]))
    for name in names:
        apply(testenv, cache_manifest(name, namespace, [{"images": [first.ref, second.ref]}]))
    for name in names:
        obj = wait_status(testenv, namespace, name, "Succeeded")
        assert obj["metadata"]["finalizers"] == ["kubefledged.io/unpin-images"]
    kubectl(testenv, "-n", namespace, "delete", "ic", *names, "--timeout=30s")
    log = coordinator.process.log_path.read_text()
    failed = [n for n in names if f"reconcile of cache {namespace}/{n} failed" in log]
    assert not failed, coordinator.process.log_tail(80)


def test_pulls_no_cache_wants_any_more_stop_on_every_node(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """An image edited out of a cache while it is pulled, then the cache deleted while
    its other image is: both pulls stop on every node (the runtime hangs up on the
    registry), and no node is left holding either. Before, each ran to its end on
    every node: a mistaken fleet-wide cache of large images, deleted at once, was still
    downloaded everywhere (on edge links too)."""
    registry = testenv.registry_client()
    pushed = [registry.push_image(unique(f"ic/unwanted-{x}"), "v1", 24 << 20, 3) for x in "ab"]
    size = sum(image.content_size for image in pushed) * len(ALL)
    with RegistryProxy(testenv.registry.host, rate=6 << 20) as slow:  # 24 s for the lot
        testenv.add_registry_host(slow.host)
        a, b = (image.ref.replace(image.registry, slow.host) for image in pushed)

        apply(testenv, cache_manifest("mistake", namespace, [{"images": [a, b]}]))
        wait_for(
            "both pulls under way",
            lambda: agents_logged(testenv, f"runtime pull of {b} started", ALL),
        )
        apply(testenv, cache_manifest("mistake", namespace, [{"images": [b]}]))
        wait_for(
            "the edited-out pull to stop",
            lambda: agents_logged(testenv, f"pull of {a} cancelled", ALL),
        )
        kubectl(testenv, "-n", namespace, "delete", "ic", "mistake", "--timeout=30s")
        wait_for(
            "the other pull to stop", lambda: agents_logged(testenv, f"pull of {b} cancelled", ALL)
        )
        assert slow.sent_during(2) < 1 << 20  # 12 MiB, had any pull gone on
        assert slow.bytes_sent < size // 2, (slow.bytes_sent, size)
    for node in ALL:
        held = node_images(testenv, node)
        assert a not in held, node
        assert b not in held, node


def test_the_purge_annotation_removes_the_images_then_itself(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    image = testenv.registry_client().push_image(unique("ic/purge"), "v1")
    apply(
        testenv,
        cache_manifest(
            "purgeme",
            namespace,
            [{"images": [image.ref], "nodeSelector": {"fledged.test/zone": "a"}}],
        ),
    )
    wait_status(testenv, namespace, "purgeme", "Succeeded", "ImagesPulledSuccessfully")
    kubectl(
        testenv, "-n", namespace, "annotate", "ic", "purgeme", "kubefledged.io/purge-imagecache="
    )

    def purged() -> dict[str, object] | None:
        obj = get_cache(testenv, namespace, "purgeme") or {}
        annotations = obj.get("metadata", {}).get("annotations") or {}
        done = obj.get("status", {}).get("reason") == "ImagesDeletedSuccessfully"
        return obj if done and "kubefledged.io/purge-imagecache" not in annotations else None

    wait_for("purge to finish", purged, timeout=30)
    for node in EDGE:
        assert image.ref not in node_images(testenv, node)


def test_the_refresh_annotation_repulls_a_moved_tag_and_reports_the_new_digest(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    registry = testenv.registry_client()
    repo = unique("ic/moving")
    old = registry.push_image(repo, "latest", seed="old")
    apply(testenv, cache_manifest("fresh", namespace, [{"images": [old.ref]}]))
    obj = wait_status(testenv, namespace, "fresh", "Succeeded")
    assert obj["status"]["images"][0]["digest"] == old.digest
    new = registry.push_image(repo, "latest", seed="new")
    kubectl(
        testenv, "-n", namespace, "annotate", "ic", "fresh", "kubefledged.io/refresh-imagecache="
    )

    def refreshed() -> dict[str, object] | None:
        obj = get_cache(testenv, namespace, "fresh") or {}
        annotations = obj.get("metadata", {}).get("annotations") or {}
        images = obj.get("status", {}).get("images") or [{}]
        done = images[0].get("digest") == new.digest and images[0].get("nodesReady") == 3
        return obj if done and "kubefledged.io/refresh-imagecache" not in annotations else None

    wait_for("refresh to report the new digest", refreshed, timeout=40)


def test_pull_secrets_authenticate_and_a_missing_one_is_a_clear_failure(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    private = testenv.registry_client(authenticated=True).push_image(unique("ic/private"), "v1")
    core = client.CoreV1Api(testenv.api_client())
    core.create_namespaced_secret(
        namespace, pull_secret(namespace, "regcred", private.registry, AUTH_PASSWORD)
    )
    apply(
        testenv,
        cache_manifest("private", namespace, [{"images": [private.ref]}], secrets=["regcred"]),
    )
    wait_status(testenv, namespace, "private", "Succeeded")
    for node in ALL:
        assert node_images(testenv, node).get(private.ref) is True

    other = testenv.registry_client(authenticated=True).push_image(unique("ic/private2"), "v1")
    apply(
        testenv,
        cache_manifest("nosecret", namespace, [{"images": [other.ref]}], secrets=["absent"]),
    )
    obj = wait_status(testenv, namespace, "nosecret", "Failed")
    status = obj["status"]
    assert status["reason"] == "ImagePullSecretInvalid"
    assert "imagePullSecret 'absent' not found" in status["message"]
    assert {f["reason"] for f in status["failures"][other.ref]} == {"Unauthorized"}
    logs = coordinator.process.log_path.read_text() + "".join(
        a.read_text() for a in testenv.logs.glob("agent-*.log")
    )
    assert AUTH_PASSWORD not in logs


def test_a_pull_secret_entry_with_a_wildcard_host_serves_the_hosts_it_matches(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """The kubelet matches docker-config keys as globs, a label at a time (`*.azurecr.io`,
    `*.dkr.ecr.<region>.amazonaws.com`), so kube-fledged's Secrets may hold such keys: the
    entry serves the registry it matches, on every runtime."""
    private = testenv.registry_client(authenticated=True).push_image(unique("ic/glob"), "v1")
    host, _, port = private.registry.rpartition(":")
    assert host == "127.0.0.1"
    auth = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    entries = {f"127.0.0.*:{port}": {"auth": auth}, f"*.0.0.1:{port}9": {"auth": "eDp5"}}
    client.CoreV1Api(testenv.api_client()).create_namespaced_secret(
        namespace, dockerconfig_secret(namespace, "globcred", {"auths": entries})
    )
    apply(
        testenv,
        cache_manifest("glob", namespace, [{"images": [private.ref]}], secrets=["globcred"]),
    )
    wait_status(testenv, namespace, "glob", "Succeeded")
    for node in ALL:
        assert node_images(testenv, node).get(private.ref) is True


def test_a_pull_secret_created_after_the_cache_is_picked_up_without_a_refresh(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """Secret and cache applied in the wrong order: the pulls first fail as Unauthorized,
    then succeed once the Secret exists (the coordinator looks again for it)."""
    private = testenv.registry_client(authenticated=True).push_image(unique("ic/late"), "v1")
    apply(
        testenv,
        cache_manifest("latecred", namespace, [{"images": [private.ref]}], secrets=["latecred"]),
    )
    obj = wait_status(testenv, namespace, "latecred", "Failed")
    assert {f["reason"] for f in obj["status"]["failures"][private.ref]} == {"Unauthorized"}
    core = client.CoreV1Api(testenv.api_client())
    core.create_namespaced_secret(
        namespace, pull_secret(namespace, "latecred", private.registry, AUTH_PASSWORD)
    )
    obj = wait_status(testenv, namespace, "latecred", "Succeeded", timeout=60)
    assert "pullSecretErrors" not in obj["status"]
    reasons = {reason for _, reason, _ in events(testenv, namespace, "latecred")}
    assert "ImageCacheUpdate" not in reasons  # nothing was edited: the retry is a refresh
    assert "ImageCacheRefresh" in reasons
    assert "kubefledged.io/refresh-imagecache" not in (obj["metadata"].get("annotations") or {})
    for node in ALL:
        assert node_images(testenv, node).get(private.ref) is True


def test_a_pull_secret_with_a_non_ascii_auth_field_is_reported_as_invalid(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """The reported defect: the reconcile failed on it (UnicodeEncodeError) and the
    cache never had a status. Every field of a Secret is untrusted input."""
    image = testenv.registry_client().push_image(unique("ic/badsecret"), "v1")
    config = {"auths": {image.registry: {"auth": "dXNlcjpwYXNz\u00e9"}}}
    core = client.CoreV1Api(testenv.api_client())
    core.create_namespaced_secret(namespace, dockerconfig_secret(namespace, "accented", config))
    manifest = cache_manifest("accented", namespace, [{"images": [image.ref]}], ["accented"])
    apply(testenv, manifest)
    obj = wait_status(testenv, namespace, "accented", "Failed", "ImagePullSecretInvalid")
    assert "secret 'accented'" in obj["status"]["message"]
    assert "bad auth field" in obj["status"]["message"]
    assert obj["status"]["ready"] == "3/3"  # the public image was pulled all the same


def test_a_node_that_leaves_a_selector_has_its_pin_lifted(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    image = testenv.registry_client().push_image(unique("ic/leaver"), "v1")
    pool = unique("pool")
    core = client.CoreV1Api(testenv.api_client())
    for node in EDGE:
        core.patch_node(node, {"metadata": {"labels": {"fledged.test/pool": pool}}})
    try:
        apply(
            testenv,
            cache_manifest(
                "leaver",
                namespace,
                [{"images": [image.ref], "nodeSelector": {"fledged.test/pool": pool}}],
            ),
        )
        wait_status(testenv, namespace, "leaver", "Succeeded")
        assert all(node_images(testenv, n).get(image.ref) is True for n in EDGE)
        core.patch_node("node-2", {"metadata": {"labels": {"fledged.test/pool": None}}})
        wait_for(
            "node-2's pin to be lifted",
            lambda: node_images(testenv, "node-2").get(image.ref) is False,
            timeout=40,
        )
        assert node_images(testenv, "node-1").get(image.ref) is True
        obj = wait_status(testenv, namespace, "leaver", "Succeeded")
        assert obj["status"]["ready"] == "1/1"
    finally:
        core.patch_node("node-1", {"metadata": {"labels": {"fledged.test/pool": None}}})


def test_an_edit_the_coordinator_refuses_changes_nothing_on_the_nodes(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """The apiserver takes a list naming one image twice in two spellings (`x` and
    `x:latest` are different strings); the coordinator refuses it. Refused, the edit must
    leave the nodes as they were: it lifted every pin of the cache on every node."""
    image = testenv.registry_client().push_image(unique("ic/refused"), "latest")
    bare = image.ref.removesuffix(":latest")
    apply(testenv, cache_manifest("refused", namespace, [{"images": [image.ref]}]))
    wait_status(testenv, namespace, "refused", "Succeeded")
    assert all(node_images(testenv, n).get(image.ref) is True for n in ALL)
    apply(testenv, cache_manifest("refused", namespace, [{"images": [image.ref, bare]}]))
    obj = wait_status(testenv, namespace, "refused", "Failed", "CacheSpecValidationFailed")
    assert "twice" in obj["status"]["message"]
    time.sleep(3)  # the old code's unpin orders went out in the same reconcile
    pinned = {n: node_images(testenv, n).get(image.ref) for n in ALL}
    assert pinned == dict.fromkeys(ALL, True)
    apply(testenv, cache_manifest("refused", namespace, [{"images": [image.ref]}]))
    wait_status(testenv, namespace, "refused", "Succeeded")
    assert all(node_images(testenv, n).get(image.ref) is True for n in ALL)


def test_a_wrong_password_fails_as_unauthorized_everywhere_and_leaks_nowhere(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    private = testenv.registry_client(authenticated=True).push_image(unique("ic/wrongpw"), "v1")
    wrong = "not-the-password-" + unique("x")
    core = client.CoreV1Api(testenv.api_client())
    core.create_namespaced_secret(
        namespace, pull_secret(namespace, "badcred", private.registry, wrong)
    )
    apply(
        testenv,
        cache_manifest("wrongpw", namespace, [{"images": [private.ref]}], secrets=["badcred"]),
    )
    obj = wait_status(testenv, namespace, "wrongpw", "Failed", "ImagePullFailedForSomeImages")
    failures = obj["status"]["failures"][private.ref]
    assert sorted(f["node"] for f in failures) == list(ALL)
    assert {f["reason"] for f in failures} == {"Unauthorized"}
    wait_for(
        "the failure Events",
        lambda: any(r == "ImagePullFailed" for _, r, _ in events(testenv, namespace, "wrongpw")),
        timeout=10,
    )
    shown = json.dumps(obj) + json.dumps(events(testenv, namespace, "wrongpw"))
    logs = coordinator.process.log_path.read_text() + "".join(
        a.read_text() for a in testenv.logs.glob("agent-*.log")
    )
    for secret in (wrong, base64.b64encode(f"{AUTH_USER}:{wrong}".encode()).decode()):
        assert secret not in shown
        assert secret not in logs


def test_a_wrong_password_for_an_image_already_present_is_caught_only_by_pulling_always(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """What a cache says of a private image already on its nodes, with a wrong password:
    by default (IfNotPresent) it is present, so Succeeded: the status reports presence,
    not authorization (the README's security section says why). With
    --image-pull-policy=Always a coordinator pulls every image once per node at its
    first sync, present or not, so the registry checks the credentials."""
    private = testenv.registry_client(authenticated=True).push_image(unique("ic/present"), "v1")
    core = client.CoreV1Api(testenv.api_client())
    core.create_namespaced_secret(namespace, pull_secret(namespace, "good", private.registry))
    core.create_namespaced_secret(
        namespace, pull_secret(namespace, "bad", private.registry, "wrong-" + unique("pw"))
    )
    lists = [{"images": [private.ref]}]
    apply(testenv, cache_manifest("owner", namespace, lists, secrets=["good"]))
    wait_status(testenv, namespace, "owner", "Succeeded")
    apply(testenv, cache_manifest("trusting", namespace, lists, secrets=["bad"]))
    obj = wait_status(testenv, namespace, "trusting", "Succeeded")
    assert obj["status"]["ready"] == "3/3"
    for name in ("owner", "trusting"):  # unpinned, the image stays on the nodes
        kubectl(testenv, "-n", namespace, "delete", "imagecache", name)
    for node in ALL:
        assert node_images(testenv, node).get(private.ref) is False
    with stand_in(testenv, coordinator, ("--image-pull-policy=Always",), "coordinator-always"):
        apply(testenv, cache_manifest("checking", namespace, lists, secrets=["bad"]))
        obj = wait_status(testenv, namespace, "checking", "Failed", "ImagePullFailedForSomeImages")
        failures = obj["status"]["failures"][private.ref]
        assert {f["reason"] for f in failures} == {"Unauthorized"}
        assert sorted(f["node"] for f in failures) == list(ALL)
        for node in ALL:  # still there: a refused pull removes nothing
            assert private.ref in node_images(testenv, node)


def test_editing_adds_images_and_a_new_selector_moves_them(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    registry = testenv.registry_client()
    first, added = (registry.push_image(unique(f"ic/{n}"), "v1") for n in ("first", "added"))
    zone_a = {"fledged.test/zone": "a"}
    apply(
        testenv,
        cache_manifest("mover", namespace, [{"images": [first.ref], "nodeSelector": zone_a}]),
    )
    wait_status(testenv, namespace, "mover", "Succeeded")
    apply(
        testenv,
        cache_manifest(
            "mover", namespace, [{"images": [first.ref, added.ref], "nodeSelector": zone_a}]
        ),
    )
    wait_status(testenv, namespace, "mover", "Succeeded")
    for node in EDGE:
        assert node_images(testenv, node).get(added.ref) is True
    # The list now selects zone b: the images leave zone a and arrive on node-3.
    apply(
        testenv,
        cache_manifest(
            "mover",
            namespace,
            [{"images": [first.ref, added.ref], "nodeSelector": {"fledged.test/zone": "b"}}],
        ),
    )

    def moved() -> bool:
        held = {n: node_images(testenv, n) for n in ALL}
        gone = all(first.ref not in held[n] and added.ref not in held[n] for n in EDGE)
        return (
            gone and held["node-3"].get(first.ref) is True and held["node-3"].get(added.ref) is True
        )

    wait_for("images to follow the new selector", moved, timeout=40)
    obj = wait_status(testenv, namespace, "mover", "Succeeded")
    assert obj["status"]["ready"] == "2/2"


def test_a_node_that_joins_later_gets_the_images_without_a_refresh(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    image = testenv.registry_client().push_image(unique("ic/joiner"), "v1")
    pool = unique("late")
    apply(
        testenv,
        cache_manifest(
            "joiner",
            namespace,
            [{"images": [image.ref], "nodeSelector": {"fledged.test/pool": pool}}],
        ),
    )
    wait_status(testenv, namespace, "joiner", "Failed", "NoMatchingNodes")
    with extra_node(testenv, unique("node-late"), {"fledged.test/pool": pool}) as node:
        obj = wait_status(testenv, namespace, "joiner", "Succeeded", timeout=30)
        assert obj["status"]["ready"] == "1/1"
        with NodeRuntime(node.containerd.endpoint) as cri:
            status = cri.status(image.ref)
            assert status is not None
            assert status.pinned
        # The agent restarts at a new address (as a pod does): the coordinator closes
        # its channel to the old one and dials the new one. One channel per agent
        # endpoint in the Leases, whatever other tests left behind.
        leases = client.CoordinationV1Api(testenv.api_client())

        def one_channel_per_endpoint() -> bool:
            items = leases.list_namespaced_lease(
                AGENT_NAMESPACE, label_selector="app.kubernetes.io/component=agent"
            ).items
            endpoints = {
                ((i.metadata and i.metadata.annotations) or {}).get(ENDPOINT) for i in items
            }
            channels = coordinator.metric("fledged_coordinator_agent_channels")
            return channels == len(endpoints - {None})

        wait_for("one channel per agent", one_channel_per_endpoint, timeout=15)
        node.agent.stop()  # deletes its Lease
        wait_for("the old agent's channel to close", one_channel_per_endpoint, timeout=15)
        node.agent = testenv.start_agent(
            node_name=node.name,
            runtime_endpoint=node.containerd.endpoint,
            name=f"agent-{node.name}-again",
        )
        obj = wait_status(testenv, namespace, "joiner", "Succeeded")
        assert obj["status"]["ready"] == "1/1"
        wait_for("a channel to the new agent", one_channel_per_endpoint, timeout=15)


def test_one_refresh_annotation_pulls_once_though_the_cache_changes_meanwhile(
    testenv: TestEnv,
    coordinator: CoordinatorProcess,
    agents: dict[str, AgentProcess],
    namespace: str,
) -> None:
    """While the refresh runs the cache keeps changing (another annotation, as a GitOps
    tool or a user might set): the reconcile after the refresh's end still reads the
    refresh annotation in its copy, and must not take it for a second request."""
    image = testenv.registry_client().push_image(unique("ic/once"), "v1")
    apply(testenv, cache_manifest("once", namespace, [{"images": [image.ref]}]))
    wait_status(testenv, namespace, "once", "Succeeded")
    before = {n: agents[n].metric("fledged_agent_runtime_pulls_total") for n in ALL}
    kubectl(
        testenv, "-n", namespace, "annotate", "ic", "once", "kubefledged.io/refresh-imagecache="
    )
    custom = client.CustomObjectsApi(testenv.api_client())
    poke, deadline = 0, time.monotonic() + 40
    while time.monotonic() < deadline:
        obj = get_cache(testenv, namespace, "once") or {}
        if "kubefledged.io/refresh-imagecache" not in (obj["metadata"].get("annotations") or {}):
            break
        poke += 1
        custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            "once",
            {"metadata": {"annotations": {"fledged.test/poke": str(poke)}}},
        )
        time.sleep(0.05)
    else:
        raise AssertionError("the refresh annotation was never removed")
    time.sleep(2.5)  # a second refresh would start within a second of the first's end
    pulls = {n: agents[n].metric("fledged_agent_runtime_pulls_total") - before[n] for n in ALL}
    assert pulls == {n: 1 for n in ALL}, pulls
    obj = wait_status(testenv, namespace, "once", "Succeeded")
    assert "kubefledged.io/refresh-imagecache" not in obj["metadata"]["annotations"]


def _records_of(testenv: TestEnv, node: str, repo: str) -> dict[str, dict[str, str]]:
    """containerd's records on `node` of `repo`'s images, ids of those images included."""
    with NodeRuntime(testenv.node(node).runtime_endpoint) as cri:
        records = cri.records()
        ids = {
            img.id
            for img in cri.list()
            if any(repo in n for n in (*img.repo_tags, *img.repo_digests))
        }
    return {name: labels for name, labels in records.items() if repo in name or name in ids}


def _refresh(testenv: TestEnv, namespace: str, name: str, digest: str) -> None:
    kubectl(testenv, "-n", namespace, "annotate", "ic", name, "kubefledged.io/refresh-imagecache=")

    def done() -> bool:
        obj = get_cache(testenv, namespace, name) or {}
        annotations = obj.get("metadata", {}).get("annotations") or {}
        images = obj.get("status", {}).get("images") or [{}]
        return (
            "kubefledged.io/refresh-imagecache" not in annotations
            and images[0].get("digest") == digest
            and images[0].get("nodesReady") == 3
        )

    wait_for(f"refresh of {name} to {digest}", done, timeout=40)


def _assert_held_once(testenv: TestEnv, node: str, repo: str, image: PushedImage) -> None:
    records = _records_of(testenv, node, repo)
    digests = {n for n in records if "@sha256:" in n}
    assert digests == {f"{image.ref.rsplit(':', 1)[0]}@{image.digest}"}, records
    assert len(records) == 3, records  # tag, digest reference, id
    unpinned = [n for n, labels in records.items() if "io.cri-containerd.pinned" not in labels]
    assert not unpinned, records


def test_a_refresh_that_moves_a_tag_removes_what_it_replaced_and_purge_leaves_nothing(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    """Checked through containerd's own records (tags, digest references, ids): after
    each move exactly one version is held, pinned on every record; an unchanged refresh
    keeps the pin on every record too; purge leaves no version behind."""
    registry = testenv.registry_client()
    repo = unique("ic/moved")
    image = registry.push_image(repo, "v1", seed=f"{repo}-0")  # content no other test has
    apply(testenv, cache_manifest("mover", namespace, [{"images": [image.ref]}]))
    wait_status(testenv, namespace, "mover", "Succeeded")
    _refresh(testenv, namespace, "mover", image.digest)  # same content
    for move in range(1, 4):
        for node in ALL:
            _assert_held_once(testenv, node, repo, image)
        image = registry.push_image(repo, "v1", seed=f"{repo}-{move}")
        _refresh(testenv, namespace, "mover", image.digest)
    for node in ALL:
        _assert_held_once(testenv, node, repo, image)
    kubectl(testenv, "-n", namespace, "annotate", "ic", "mover", "kubefledged.io/purge-imagecache=")
    wait_for(
        "purge to leave nothing of the repository",
        lambda: all(not _records_of(testenv, node, repo) for node in ALL),
        timeout=40,
    )
