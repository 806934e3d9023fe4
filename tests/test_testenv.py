"""The test environment is real: a real apiserver with RBAC, containerd pulling through
CRI, dockerd pulling through its SDK, an htpasswd registry, and CRI-visible pinning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import docker
import grpc
import pytest
from kubernetes import client

from protos.cri.runtime.v1 import api_pb2
from tests.conftest import unique
from tests.coordinator.helpers import wait_for
from tests.testenv import AUTH_PASSWORD, AUTH_USER, TestEnv
from tests.testenv.dockerd import Dockerd
from tests.testenv.kube import client_for
from tests.testenv.kubelet import mounts_under
from tests.testenv.paths import binary
from tests.testenv.runtime import PINNED_LABEL, NodeRuntime

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.testenv.kubefledged.io"},
    "spec": {
        "group": "testenv.kubefledged.io",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {"size": {"type": "integer"}},
                            }
                        },
                    }
                },
            }
        ],
    },
}


def kubectl(
    kubeconfig: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary("kubectl")), f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_kubectl_manages_a_custom_resource_and_rbac_denies_an_unbound_identity(
    testenv: TestEnv, namespace: str, tmp_path: Path
) -> None:
    admin = testenv.kubeconfig
    applied = kubectl(admin, "apply", "-f", "-", stdin=json.dumps(WIDGET_CRD))
    assert applied.returncode == 0, applied.stderr
    established = kubectl(
        admin,
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/widgets.testenv.kubefledged.io",
    )
    assert established.returncode == 0, established.stderr

    widget = {
        "apiVersion": "testenv.kubefledged.io/v1",
        "kind": "Widget",
        "metadata": {"name": "w1", "namespace": namespace},
        "spec": {"size": 3},
    }
    created = kubectl(admin, "create", "-f", "-", stdin=json.dumps(widget))
    assert created.returncode == 0, created.stderr
    got = kubectl(admin, "-n", namespace, "get", "widget", "w1", "-o", "json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["spec"] == {"size": 3}
    deleted = kubectl(admin, "-n", namespace, "delete", "widget", "w1", "--wait=true")
    assert deleted.returncode == 0, deleted.stderr
    gone = kubectl(admin, "-n", namespace, "get", "widget", "w1")
    assert gone.returncode != 0
    assert "NotFound" in gone.stderr

    nobody = testenv.identity("fledged-nobody")
    denied = kubectl(nobody.kubeconfig, "-n", namespace, "get", "widgets")
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr
    assert "fledged-nobody" in denied.stderr
    api = client.CoreV1Api(client_for(nobody.kubeconfig))
    with pytest.raises(client.ApiException) as err:
        api.list_namespaced_secret(namespace)
    assert err.value.status == 403


def test_containerd_pulls_lists_and_removes_through_cri(testenv: TestEnv) -> None:
    image = testenv.registry_client().push_image(unique("cri/pull"), "v1", size=256 * 1024)
    with NodeRuntime(testenv.nodes[0].runtime_endpoint) as node:
        assert node.status(image.ref) is None
        image_ref = node.pull(image.ref)
        assert image_ref == image.config_digest

        listed = {img.id: img for img in node.list()}
        assert image.config_digest in listed
        entry = listed[image.config_digest]
        assert image.ref in entry.repo_tags
        assert f"{image.name}@{image.digest}" in entry.repo_digests
        assert entry.size >= sum(image.layer_sizes)

        node.remove(image.ref)
        assert node.status(image.ref) is None
        assert image.config_digest not in {img.id for img in node.list()}
    # The image was pulled onto node-1 only: each node has its own store.
    with NodeRuntime(testenv.nodes[1].runtime_endpoint) as other:
        assert image.config_digest not in {img.id for img in other.list()}


def test_dockerd_pulls_the_same_image_through_the_docker_sdk(testenv: TestEnv) -> None:
    assert testenv.dockerd is not None
    image = testenv.registry_client().push_image(unique("docker/pull"), "v1", size=128 * 1024)
    sdk = docker.DockerClient(base_url=testenv.dockerd.endpoint, timeout=60)
    try:
        pulled = sdk.images.pull(image.name, tag=image.tag)
        assert pulled.id == image.config_digest
        assert f"{image.name}@{image.digest}" in pulled.attrs["RepoDigests"]
        sdk.images.remove(image.ref)
        with pytest.raises(docker.errors.ImageNotFound):
            sdk.images.get(image.ref)
    finally:
        sdk.close()


@pytest.mark.env
def test_a_dockerd_of_the_suite_leaves_the_hosts_forwarding_as_it_found_it() -> None:
    """dockerd turns net.ipv4.ip_forward on at start unless told not to; the suite's
    (and the image build's) must not change the host."""
    knob = Path("/proc/sys/net/ipv4/ip_forward")
    found = knob.read_text()
    knob.write_text("0")
    workdir = Path(tempfile.mkdtemp(prefix="fl-", dir="/tmp"))  # socket paths stay short
    dockerd = Dockerd(workdir, [])
    try:
        dockerd.start()
        assert knob.read_text().strip() == "0"
    finally:
        dockerd.process.stop()
        knob.write_text(found)
        for point in sorted(mounts_under(workdir), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False)  # a daemon that died early
        shutil.rmtree(workdir, ignore_errors=True)


def test_authenticated_registry_refuses_anonymous_pulls_and_accepts_credentials(
    testenv: TestEnv,
) -> None:
    image = testenv.registry_client(authenticated=True).push_image(unique("auth/pull"), "v1")
    with NodeRuntime(testenv.nodes[0].runtime_endpoint) as node:
        with pytest.raises(grpc.RpcError) as err:
            node.pull(image.ref)
        assert "authorization failed: no basic auth credentials" in str(err.value.details())
        # The refusal came from the registry itself, as HTTP 401 on the manifest.
        access_log = testenv.auth_registry.process.log_path.read_text()
        assert f'/v2/{image.repository}/manifests/{image.tag} HTTP/1.1" 401' in access_log

        # containerd's CRI compares url.Parse(server_address).Host with the registry
        # host, so the address needs a scheme; a bare "host:port" is rejected.
        auth = api_pb2.AuthConfig(
            username=AUTH_USER, password=AUTH_PASSWORD, server_address=f"http://{image.registry}"
        )
        assert node.pull(image.ref, auth=auth) == image.config_digest
        node.remove(image.ref)


def test_pinned_label_set_through_containerd_is_reported_by_cri(testenv: TestEnv) -> None:
    image = testenv.registry_client().push_image(unique("pin/label"), "v1")
    with NodeRuntime(testenv.nodes[0].runtime_endpoint) as node:
        node.pull(image.ref)
        status = node.status(image.ref)
        assert status is not None
        assert not status.pinned

        def pinned() -> bool:
            status = node.status(image.ref)
            assert status is not None
            return status.pinned

        # CRI learns of a label change from containerd's image events, a moment later.
        record = node.set_label(image.ref, PINNED_LABEL, "pinned")
        assert record.labels[PINNED_LABEL] == "pinned"
        wait_for("CRI to report the pin", pinned, timeout=10, interval=0.05)
        node.set_label(image.ref, PINNED_LABEL, None)
        wait_for("CRI to report the pin gone", lambda: not pinned(), timeout=10, interval=0.05)
        node.remove(image.ref)


def test_multi_arch_index_resolves_to_this_hosts_image(testenv: TestEnv) -> None:
    image = testenv.registry_client().push_image(
        unique("multi/arch"), "v1", platforms=("amd64", "arm64")
    )
    with NodeRuntime(testenv.nodes[0].runtime_endpoint) as node:
        assert node.pull(image.ref) == image.config_digest
        status = node.status(image.ref)
        assert status is not None
        assert f"{image.name}@{image.digest}" in status.repo_digests
        node.remove(image.ref)


def test_moving_a_tag_gives_new_content_under_the_same_reference(testenv: TestEnv) -> None:
    registry = testenv.registry_client()
    repo = unique("moving/tag")
    first = registry.push_image(repo, "latest", seed="first")
    second = registry.push_image(repo, "latest", seed="second")
    assert first.ref == second.ref
    assert first.digest != second.digest
    with NodeRuntime(testenv.nodes[0].runtime_endpoint) as node:
        assert node.pull(second.ref) == second.config_digest
        node.remove(second.ref)


def test_a_stopped_environment_leaves_no_process_behind() -> None:
    env = TestEnv(nodes=1, with_docker=True)
    env.start()
    try:
        pids = [p.pid for p in env.processes()]
        assert len(pids) == 6  # etcd, 2 registries, apiserver, containerd, dockerd
    finally:
        env.cleanup()
    survivors = []
    for pid in pids:
        try:
            os.killpg(pid, 0)
            survivors.append(pid)
        except ProcessLookupError:
            pass
    assert not survivors, f"process groups still alive: {survivors}"
