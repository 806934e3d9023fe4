"""KEP-2535 (the kubelet verifies pull credentials of images already on the node; beta
and on by default since 1.35) against images we cached, with the real kubelet: what a
pod without pull secrets gets of a private image an ImageCache put on its node.

- `NeverVerifyPreloadedImages` (the default): the kubelet did not pull the image, so it
  counts as preloaded: the pod starts from it, no credentials asked.
- `AlwaysVerify`: the kubelet checks every image: the pod without credentials is
  refused (the kubelet's anonymous pull is refused by the registry); a pod with the
  right pull secret starts, after the kubelet checked it with the registry.
The README's security section says what an operator should set.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes import client

from tests.conftest import unique
from tests.coordinator.helpers import apply, cache_manifest, wait_for, wait_status
from tests.realnodes.conftest import RealNodes, kubelet_nodes
from tests.realnodes.pods import pod_events, pod_on, running, waiting_reason
from tests.testenv import TestEnv, pull_secret
from tests.testenv.workload import PAUSE_C, push_program_image, static_binary

LABEL = "fledged.test/credentials"
POLICY = "imagePullCredentialsVerificationPolicy"


@pytest.fixture(scope="module")
def nodes(testenv: TestEnv, coordinator: object) -> Iterator[RealNodes]:
    """One kubelet node per policy."""
    specs: dict[int, tuple[dict[str, str], dict[str, object]]] = {
        7: ({LABEL: "preloaded"}, {POLICY: "NeverVerifyPreloadedImages"}),
        8: ({LABEL: "always"}, {POLICY: "AlwaysVerify"}),
    }
    with kubelet_nodes(testenv, specs) as made:
        yield made


def test_a_pod_without_pull_secrets_and_a_cached_private_image(
    nodes: RealNodes, testenv: TestEnv, namespace: str
) -> None:
    core = client.CoreV1Api(testenv.api_client())
    program = static_binary(testenv.workdir, "pause", PAUSE_C)
    repo = unique("private/app")
    image = push_program_image(
        testenv.registry_client(authenticated=True), repo, "v1", program, seed=repo
    )
    core.create_namespaced_secret(
        namespace,
        pull_secret(namespace, "pull", testenv.auth_registry.host),
    )
    apply(
        testenv,
        cache_manifest(
            "private",
            namespace,
            [{"images": [image.ref], "nodeSelector": {LABEL: v}} for v in ("preloaded", "always")],
            secrets=["pull"],
        ),
    )
    assert wait_status(testenv, namespace, "private", "Succeeded")["status"]["ready"] == "2/2"
    wait_for(
        "the default ServiceAccount",
        lambda: core.list_namespaced_service_account(namespace).items,
        timeout=30,
    )
    preloaded, always = nodes.nodes
    access_log = testenv.auth_registry.process.log_path

    def manifest_requests() -> int:
        return access_log.read_text().count(f"/v2/{repo}/manifests/")

    def refused_requests() -> int:
        lines = access_log.read_text().splitlines()
        return sum(f"/v2/{repo}/manifests/" in line and '" 401 ' in line for line in lines)

    # NeverVerifyPreloadedImages: the pod starts from the cached image, no registry asked.
    asked = manifest_requests()
    core.create_namespaced_pod(namespace, pod_on("trusting", preloaded.name, image.ref))
    wait_for("the pod to run", lambda: running(core, namespace, "trusting"), timeout=60)
    assert not [e for e in pod_events(core, namespace, "trusting") if e[0] == "Pulling"]
    assert manifest_requests() == asked

    # AlwaysVerify: refused without credentials, though the image is on the node.
    refusals = refused_requests()
    core.create_namespaced_pod(namespace, pod_on("anonymous", always.name, image.ref))
    reason = wait_for(
        "the kubelet to refuse the pod's image",
        lambda: (
            waiting_reason(core, namespace, "anonymous") in ("ErrImagePull", "ImagePullBackOff")
            and waiting_reason(core, namespace, "anonymous")
        ),
        timeout=60,
    )
    assert reason
    assert not running(core, namespace, "anonymous")
    failed = [m for r, m in pod_events(core, namespace, "anonymous") if r == "Failed"]
    assert any("authoriz" in m for m in failed), failed
    assert refused_requests() > refusals  # the kubelet asked, without credentials

    # AlwaysVerify with the pull secret: the kubelet checks it with the registry, then runs.
    asked = manifest_requests()
    core.create_namespaced_pod(
        namespace, pod_on("credentialed", always.name, image.ref, pull_secrets=("pull",))
    )
    wait_for("the pod to run", lambda: running(core, namespace, "credentialed"), timeout=60)
    assert manifest_requests() > asked


def test_a_cached_public_image_under_always_verify_asks_the_registry_once(
    nodes: RealNodes, testenv: TestEnv, namespace: str
) -> None:
    """AlwaysVerify checks public images too: the first pod asks the registry (an
    anonymous pull, which the registry grants); the kubelet then records that and a
    second pod starts without asking."""
    core = client.CoreV1Api(testenv.api_client())
    program = static_binary(testenv.workdir, "pause", PAUSE_C)
    repo = unique("public/app")
    image = push_program_image(testenv.registry_client(), repo, "v1", program, seed=repo)
    apply(
        testenv,
        cache_manifest(
            "public", namespace, [{"images": [image.ref], "nodeSelector": {LABEL: "always"}}]
        ),
    )
    wait_status(testenv, namespace, "public", "Succeeded")
    wait_for(
        "the default ServiceAccount",
        lambda: core.list_namespaced_service_account(namespace).items,
        timeout=30,
    )
    access_log = testenv.registry.process.log_path

    def manifest_requests() -> int:
        return access_log.read_text().count(f"/v2/{repo}/manifests/")

    always = nodes.nodes[1]
    counts = [manifest_requests()]
    for name in ("first", "second"):
        core.create_namespaced_pod(namespace, pod_on(name, always.name, image.ref))
        wait_for("the pod to run", lambda n=name: running(core, namespace, n), timeout=60)  # type: ignore[misc]
        counts.append(manifest_requests())
    assert counts[1] > counts[0], counts  # the first pod: verified with the registry
    assert counts[2] == counts[1], counts  # the second: the kubelet's record suffices
