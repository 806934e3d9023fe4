"""kube-fledged installed as users install it, on real kubelet nodes of a cluster of its
own: the project's image built from its Dockerfile and pulled by the kubelets, `helm
install` of deploy/chart and `kubectl apply -k` of deploy/ with only values a user sets
(the image, and the apiserver's address, as kube-fledged's own install docs set it where
the `kubernetes` Service does not route: no kube-proxy here).

The agent DaemonSet rolls out and passes the kubelet's gRPC probes, the coordinator
Deployment elects one leader, and the sample cache lands on the nodes as the kubelet and
containerd see them. A rolling update to a new image tag completes while the cache stays
Ready; a coordinator pod deleted in the middle of a pull is replaced and the cache
converges. The tests run in file order, each on the install the one before left.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from kubernetes import client

from common.reference import parse
from tests.conftest import reported
from tests.coordinator.helpers import get_cache, kubectl, wait_for, wait_status
from tests.realnodes.conftest import pause_image
from tests.realnodes.pods import NODE_IMAGES_WAIT, node_image_names, pod_on, running
from tests.testenv import AUTH_PASSWORD, AUTH_USER, PushedImage, TestEnv, pull_secret
from tests.testenv.credentials import write_provider_config
from tests.testenv.demo import SAMPLE, SIZES, adapt_sample
from tests.testenv.kubelet import ControlPlaneExtras, KubeletCluster, KubeletNode
from tests.testenv.paths import BIN_DIR, REPO_ROOT, binary
from tests.testenv.project_image import push_project_image
from tests.testenv.proxy import RegistryProxy
from tests.testenv.workload import PAUSE_C, push_program_image, static_binary

CHART = REPO_ROOT / "deploy" / "chart" / "kube-fledged"
NAMESPACE = "kube-fledged"
CHART_IMAGE = "ghcr.io/kube-fledged/kube-fledged-py"  # what the manifests name
AGENT_PODS = "app.kubernetes.io/component=agent"
COORDINATOR_PODS = "app.kubernetes.io/component=coordinator"
LEADER_LEASE = "kube-fledged-coordinator"
ROLLOUT_TAG = "rollout"


@dataclass
class UserCluster:
    env: TestEnv
    cluster: KubeletCluster
    image: PushedImage  # the project's, under its content key
    credential_providers: tuple[Path, Path]  # the kubelets' plugin config and bin dir
    sample: dict[str, Any] = field(default_factory=dict)  # as applied

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.env.api_client())

    def user_values(self, tag: str) -> list[str]:
        """What a user sets: the image, and the apiserver's address for the pods."""
        return [
            f"image.repository={self.image.name}",
            f"image.tag={tag}",
            f"k8sServiceHost={self.cluster.api_host}",
            f"k8sServicePort={self.cluster.api_port}",
            # as on EKS: the kubelets' own credential provider plugins, for the agents too
            f"agent.credentialProviders.config={self.credential_providers[0]}",
            f"agent.credentialProviders.binDir={self.credential_providers[1]}",
        ]


@pytest.fixture(scope="module")
def user() -> Iterator[UserCluster]:
    """A cluster of two kubelet nodes (no simulated ones: a DaemonSet's pods must all
    run) with its own apiserver, registries and control plane; nothing of kube-fledged
    yet but its image in the registry and the CRD-less apiserver."""
    env = TestEnv(nodes=0, with_docker=False, agent_namespace=False)
    cluster: KubeletCluster | None = None
    with reported("install cluster", env):
        env.start()
        try:
            registry = env.registry_client()
            image = push_project_image(registry, ROLLOUT_TAG)
            pause = pause_image(env)
            hosts = [env.registry.host, env.auth_registry.host]
            providers = credential_providers(env)
            flags = (
                f"--image-credential-provider-config={providers[0]}",
                f"--image-credential-provider-bin-dir={providers[1]}",
            )
            nodes = [
                KubeletNode(env.workdir, 3, env.apiserver, hosts, pause.ref, kubelet_flags=flags),
                # The sample's second list selects tier=backend.
                KubeletNode(
                    env.workdir,
                    4,
                    env.apiserver,
                    hosts,
                    pause.ref,
                    {"tier": "backend"},
                    kubelet_flags=flags,
                ),
            ]
            cluster = KubeletCluster(
                env.workdir,
                nodes,
                ControlPlaneExtras(env.workdir, env.apiserver),
                apiserver=env.apiserver,
            )
            with reported("install cluster's kubelet nodes", cluster):
                cluster.start(client.CoreV1Api(env.api_client()))
                yield UserCluster(env, cluster, image, providers)
        finally:
            if cluster is not None:
                cluster.stop(client.CoreV1Api(env.api_client()))
            env.cleanup()


# A credential provider plugin as the kubelet runs one (ecr-credential-provider on EKS):
# the request on stdin, the registry's credentials on stdout. A shell script, so that
# it runs on the host for the kubelet and in the agent's container alike.
PLUGIN = """#!/bin/sh
request=$(cat)
# The kubelet's requests are kept beside the plugin (the agents' mount is read-only).
{{ printf '%s\\n' "$request" >> "$(dirname "$0")/requests"; }} 2>/dev/null || true
printf '%s\\n' '{answer}'
"""
PLUGIN_NAME = "fledged-test-credential-provider"


def credential_providers(env: TestEnv) -> tuple[Path, Path]:
    """A kubelet CredentialProviderConfig whose plugin serves the private registry, and
    its bin dir (both in the environment's directory, removed with it)."""
    bin_dir = env.workdir / "credential-providers"
    bin_dir.mkdir()
    host, _, port = env.auth_registry.host.rpartition(":")
    auth = {env.auth_registry.host: {"username": AUTH_USER, "password": AUTH_PASSWORD}}
    answer = {
        "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
        "kind": "CredentialProviderResponse",
        "cacheKeyType": "Registry",
        "cacheDuration": "1m",
        "auth": auth,
    }
    plugin = bin_dir / PLUGIN_NAME
    plugin.write_text(PLUGIN.format(answer=json.dumps(answer)))
    plugin.chmod(0o755)
    glob = host.rsplit(".", 1)[0] + ".*"  # 127.0.0.*: a pattern, as the kubelet reads them
    config = write_provider_config(
        env.workdir / "credential-providers.yaml", PLUGIN_NAME, [f"{glob}:{port}"], "1m"
    )
    return config, bin_dir


def helm(user: UserCluster, *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [str(binary("helm")), f"--kubeconfig={user.env.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"helm {' '.join(args)}: {done.stderr}"
    return done.stdout


def rollout(user: UserCluster, kind_name: str, timeout: int = 300) -> None:
    kubectl(
        user.env,
        "-n",
        NAMESPACE,
        "rollout",
        "status",
        kind_name,
        f"--timeout={timeout}s",
        timeout=timeout + 30,
    )


def get(user: UserCluster, *args: str) -> dict[str, Any]:
    """An object or list as kubectl prints it."""
    out = kubectl(user.env, "-n", NAMESPACE, "get", *args, "-o", "json").stdout
    return cast(dict[str, Any], json.loads(out))


def pods(user: UserCluster, selector: str) -> list[dict[str, Any]]:
    """The selector's pods, but those on their way out."""
    items = get(user, "pods", "-l", selector)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def leader(user: UserCluster) -> str:
    """The leading coordinator's pod (its identity is <pod name>_<random>)."""
    holder = str(get(user, "lease", LEADER_LEASE)["spec"].get("holderIdentity") or "")
    return holder.rsplit("_", 1)[0]


def metric(pod: dict[str, Any], port: int, name: str) -> float:
    """One sample of a pod's /metrics, read from the host through the pod network."""
    url = f"http://{pod['status']['podIP']}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def assert_installed(user: UserCluster, tag: str) -> None:
    """Both agents Ready through the kubelet's gRPC probes, one per node, running `tag`
    and registered by Lease at their pod IP; two coordinators Ready, one leading."""
    rollout(user, "daemonset/kube-fledged-agent")
    rollout(user, "deployment/kube-fledged-coordinator")
    agents = pods(user, AGENT_PODS)
    assert sorted(p["spec"]["nodeName"] for p in agents) == sorted(
        n.name for n in user.cluster.nodes
    )
    for pod in agents:
        assert ready(pod), pod["status"]
        container = pod["spec"]["containers"][0]
        assert container["image"] == f"{user.image.name}:{tag}"
        assert "grpc" in container["readinessProbe"]
        assert "grpc" in container["livenessProbe"]
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 0, pod["status"]
    leases = get(user, "leases", "-l", AGENT_PODS)["items"]
    endpoints = {
        (lease["metadata"].get("annotations") or {}).get("kubefledged.io/agent-endpoint")
        for lease in leases
    }
    assert {f"{p['status']['podIP']}:9445" for p in agents} <= endpoints, endpoints
    coordinators = wait_for(
        "two Ready coordinators",
        lambda: (
            len(ready_pods := [p for p in pods(user, COORDINATOR_PODS) if ready(p)]) == 2
            and ready_pods
        ),
        timeout=60,
    )

    def leading() -> dict[str, float] | None:
        """Each coordinator's fledged_coordinator_is_leader, once the Lease's holder is
        the one that says 1 (it takes over a moment after winning the Lease)."""
        holder = leader(user)
        values = {
            p["metadata"]["name"]: metric(p, 8080, "fledged_coordinator_is_leader")
            for p in coordinators
        }
        return values if values.get(holder) == 1.0 and sum(values.values()) == 1.0 else None

    wait_for("one coordinator leading, the Lease's holder", leading, timeout=60)


def ctr_images(node: KubeletNode) -> dict[str, dict[str, str]]:
    """name -> labels, from containerd's own listing (the ctr CLI)."""
    out = subprocess.run(
        [
            str(BIN_DIR / "ctr"),
            f"--address={node.containerd.socket}",
            "--namespace=k8s.io",
            "images",
            "list",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    images = {}
    for line in out.splitlines()[1:]:
        cols = line.split()
        labels = dict(kv.split("=", 1) for kv in cols[-1].split(",") if "=" in kv)
        images[cols[0]] = labels
    return images


def test_helm_install_rolls_out_the_agents_and_elects_one_coordinator(
    user: UserCluster,
) -> None:
    """The README's command, with the image and the apiserver address set."""
    sets = [arg for value in user.user_values(user.image.tag) for arg in ("--set", value)]
    helm(user, "install", "kube-fledged", str(CHART), "-n", NAMESPACE, "--create-namespace", *sets)
    assert_installed(user, user.image.tag)
    # The CRD came with the chart; the coordinator made the agents' mTLS material.
    kubectl(user.env, "get", "crd", "imagecaches.kubefledged.io")
    for secret in ("kube-fledged-agent-tls",):
        assert user.core.read_namespaced_secret(secret, NAMESPACE).data


def test_the_sample_cache_lands_on_the_kubelet_nodes(user: UserCluster) -> None:
    """deploy/samples/imagecache.yaml, its images moved to the local registries (one of
    them private, behind the sample's pull secret), checked through the kubelet's node
    status and containerd's own listing."""
    sample, moved = adapt_sample(
        yaml.safe_load(SAMPLE.read_text()), user.env.registry.host, user.env.auth_registry.host
    )
    for local in moved.values():
        ref = parse(local)
        size, layers = next(v for k, v in SIZES.items() if ref.path.endswith(k))
        registry = user.env.registry_client(authenticated=ref.domain == user.env.auth_registry.host)
        registry.push_image(ref.path, ref.tag or "latest", size=size >> 3, layers=layers)
    secret_name = sample["spec"]["imagePullSecrets"][0]["name"]
    user.core.create_namespaced_secret(
        NAMESPACE, pull_secret(NAMESPACE, secret_name, user.env.auth_registry.host)
    )
    kubectl(user.env, "apply", "-f", "-", stdin=yaml.safe_dump(sample))
    user.sample = sample
    name = sample["metadata"]["name"]
    obj = wait_status(user.env, NAMESPACE, name, "Succeeded", timeout=120)
    assert obj["status"]["ready"] == "5/5", obj["status"]  # 2 images x 2 nodes + 1 backend
    wanted = {
        node.name: {
            image
            for cache_list in sample["spec"]["cacheSpec"]
            if all(
                node.labels.get(k) == v for k, v in (cache_list.get("nodeSelector") or {}).items()
            )
            for image in cache_list["images"]
        }
        for node in user.cluster.nodes
    }
    assert sorted(len(v) for v in wanted.values()) == [2, 3]
    for node in user.cluster.nodes:
        wait_for(
            f"{node.name}'s status to list its cached images",
            lambda n=node: node_image_names(user.core, n.name) >= wanted[n.name],  # type: ignore[misc]
            timeout=NODE_IMAGES_WAIT,
        )
        held = ctr_images(node)
        for image in wanted[node.name]:
            assert held[image].get("io.cri-containerd.pinned") == "pinned", (image, held[image])
    assert_no_probe_failed(user)


def test_a_cache_of_a_private_image_needs_no_secret_where_the_kubelet_needs_none(
    user: UserCluster,
) -> None:
    """The nodes' kubelets have a credential provider plugin for the private registry
    (as EKS nodes have for ECR): pods need no pull Secret, and neither does a cache,
    whose agents run the same plugin from the same config, mounted by the chart."""
    program = static_binary(user.env.workdir, "pause", PAUSE_C)
    private = push_program_image(  # content of its own (the nodes' pause is pinned)
        user.env.registry_client(authenticated=True), "iam/app", "v1", program, seed="iam"
    )
    cache = {
        "apiVersion": "kubefledged.io/v1alpha2",
        "kind": "ImageCache",
        "metadata": {"name": "no-secret", "namespace": NAMESPACE},
        "spec": {"cacheSpec": [{"images": [private.ref]}]},
    }
    kubectl(user.env, "apply", "-f", "-", stdin=yaml.safe_dump(cache))
    try:
        obj = wait_status(user.env, NAMESPACE, "no-secret", "Succeeded", timeout=120)
        assert obj["status"]["reason"] == "ImagesPulledSuccessfully"
        for node in user.cluster.nodes:
            assert ctr_images(node)[private.ref].get("io.cri-containerd.pinned") == "pinned"
        # The kubelet reads the same config: a pod pulling the image itself, no Secret.
        pod = pod_on("no-secret", user.cluster.nodes[0].name, private.ref)
        assert pod.spec is not None
        pod.spec.containers[0].image_pull_policy = "Always"
        user.core.create_namespaced_pod(NAMESPACE, pod)
        wait_for("the pod to run", lambda: running(user.core, NAMESPACE, "no-secret"), timeout=60)
        # The kubelet asks for the repository, without the tag, as the agents ask.
        requests = (user.credential_providers[1] / "requests").read_text().splitlines()
        assert {json.loads(r)["image"] for r in requests} == {private.ref.rpartition(":")[0]}
    finally:
        kubectl(user.env, "-n", NAMESPACE, "delete", "pod", "no-secret", "--ignore-not-found")
        kubectl(user.env, "-n", NAMESPACE, "delete", "imagecache", "no-secret", "--wait")


def assert_no_probe_failed(user: UserCluster) -> None:
    """The kubelet records each failed probe as a Warning Event (Unhealthy) on the pod.
    Without an initial delay a probe can run as the container starts, before anything
    listens (a kubelet started less than a period ago probes at a random point of its
    first period), and the liveness probes first run 10 s after the start (a service
    named wrong fails there): the pods are given 15 s, then none may have failed a
    probe of any kind."""
    selected = pods(user, AGENT_PODS) + pods(user, COORDINATOR_PODS)
    for pod in selected:
        started = pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
        age = time.time() - datetime.fromisoformat(started).timestamp()
        time.sleep(max(0.0, 15 - age))
    events = get(user, "events", "--field-selector", "reason=Unhealthy")["items"]
    names = {p["metadata"]["name"] for p in selected}
    failed = [
        (e["involvedObject"]["name"], e["message"])
        for e in events
        if e["involvedObject"]["name"] in names
    ]
    assert not failed, failed


def test_a_rolling_update_completes_while_the_cache_stays_ready(user: UserCluster) -> None:
    """helm upgrade to another tag of the same image: every agent and coordinator pod is
    replaced, and the cache reads Ready all along."""
    name = user.sample["metadata"]["name"]
    seen: list[tuple[float, Any, Any]] = []
    unready: list[dict[str, Any]] = []  # whole statuses, for the failure message
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            st = (get_cache(user.env, NAMESPACE, name) or {}).get("status") or {}
            cond: dict[str, Any] = next(
                (c for c in st.get("conditions") or () if c["type"] == "Ready"), {}
            )
            seen.append((time.monotonic(), st.get("status"), cond.get("status")))
            if st.get("status") != "Succeeded":
                unready.append(st)
            time.sleep(0.2)

    before = {p["metadata"]["name"] for p in pods(user, AGENT_PODS)}
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        sets = [arg for value in user.user_values(ROLLOUT_TAG) for arg in ("--set", value)]
        helm(user, "upgrade", "kube-fledged", str(CHART), "-n", NAMESPACE, *sets)
        assert_installed(user, ROLLOUT_TAG)
        time.sleep(3)  # the new pods' first reconciles, watched too
    finally:
        stop.set()
        watcher.join()
    assert not before & {p["metadata"]["name"] for p in pods(user, AGENT_PODS)}
    assert len(seen) > 10
    assert {(s, r) for _, s, r in seen} == {("Succeeded", "True")}, unready[:3]
    assert_no_probe_failed(user)  # the new pods' too


def test_a_coordinator_pod_deleted_mid_pull_is_replaced_and_the_cache_converges(
    user: UserCluster,
) -> None:
    proxy = RegistryProxy(user.env.registry.host, rate=2 << 20).start()
    try:
        for node in user.cluster.nodes:
            node.containerd.add_registry_host(proxy.host)
        pushed = user.env.registry_client().push_image("slow/app", "v1", size=12 << 20, layers=2)
        ref = pushed.ref.replace(pushed.registry, proxy.host)
        cache = {
            "apiVersion": "kubefledged.io/v1alpha2",
            "kind": "ImageCache",
            "metadata": {"name": "slow", "namespace": NAMESPACE},
            "spec": {"cacheSpec": [{"images": [ref]}]},
        }
        kubectl(user.env, "apply", "-f", "-", stdin=json.dumps(cache))

        def pulling() -> bool:
            st = (get_cache(user.env, NAMESPACE, "slow") or {}).get("status") or {}
            return any(i.get("bytesDone") for i in st.get("images") or ())

        wait_for("bytes in flight", pulling, timeout=60, interval=0.1)
        old = leader(user)
        kubectl(user.env, "-n", NAMESPACE, "delete", "pod", old, "--wait=false")
        wait_status(user.env, NAMESPACE, "slow", "Succeeded", timeout=180)
        assert leader(user) != old

        def replaced() -> set[str] | None:
            names = {p["metadata"]["name"] for p in pods(user, COORDINATOR_PODS) if ready(p)}
            return names if len(names) == 2 and old not in names else None

        wait_for("the Deployment to replace the pod", replaced, timeout=120)
        status = (get_cache(user.env, NAMESPACE, "slow") or {})["status"]
        assert status["ready"] == "2/2", status
    finally:
        proxy.stop()


def test_kubectl_apply_k_installs_the_same_and_takes_over_the_caches(
    user: UserCluster, tmp_path: Path
) -> None:
    """After `helm uninstall` (the CRD, the caches and the namespace stay), a kustomize
    overlay of deploy/ as a user writes one: the image and the apiserver address."""
    helm(user, "uninstall", "kube-fledged", "-n", NAMESPACE, "--wait")
    wait_for("the agents to go", lambda: not pods(user, AGENT_PODS), timeout=120)
    env_patch = [
        {
            "op": "add",
            "path": "/spec/template/spec/containers/0/env/-",
            "value": {"name": key, "value": str(value)},
        }
        for key, value in (
            ("KUBERNETES_SERVICE_HOST", user.cluster.api_host),
            ("KUBERNETES_SERVICE_PORT", user.cluster.api_port),
        )
    ]
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(REPO_ROOT / "deploy", tmp_path)],  # kustomize: relative
        "images": [{"name": CHART_IMAGE, "newName": user.image.name, "newTag": user.image.tag}],
        "patches": [
            {"target": {"kind": kind, "name": name}, "patch": json.dumps(env_patch)}
            for kind, name in (
                ("DaemonSet", "kube-fledged-agent"),
                ("Deployment", "kube-fledged-coordinator"),
            )
        ],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    kubectl(user.env, "apply", "-k", str(tmp_path), timeout=120)
    assert_installed(user, user.image.tag)
    # The caches made under the helm install are served on: edited, they converge.
    name = user.sample["metadata"]["name"]
    kubectl(
        user.env,
        "-n",
        NAMESPACE,
        "annotate",
        "imagecache",
        name,
        "kubefledged.io/refresh-imagecache=",
    )
    wait_for(
        "the refresh to be done",
        lambda: (
            "kubefledged.io/refresh-imagecache"
            not in (
                (get_cache(user.env, NAMESPACE, name) or {})["metadata"].get("annotations") or {}
            )
        ),
        timeout=120,
    )
    obj = wait_status(user.env, NAMESPACE, name, "Succeeded", timeout=60)
    assert obj["status"]["ready"] == "5/5"
