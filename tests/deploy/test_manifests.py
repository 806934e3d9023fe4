"""The install paths against the real apiserver, with the real kubectl and helm:
kustomize and Helm create the same objects, server-side dry runs are clean, each role
has exactly the rights it needs, and the DaemonSet probes a port the agent serves."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from grpc_health.v1 import health_pb2

from agent.health import LIVENESS_SERVICE
from tests.testenv import TestEnv
from tests.testenv.agents import AgentProcess
from tests.testenv.paths import REPO_ROOT, binary
from tests.testenv.procs import ManagedProcess

CHART = REPO_ROOT / "deploy" / "chart" / "kube-fledged"
COORDINATOR = "system:serviceaccount:kube-fledged:kube-fledged-coordinator"
AGENT = "system:serviceaccount:kube-fledged:kube-fledged-agent"


def run(*argv: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], input=stdin, capture_output=True, text=True, timeout=120
    )


def helm_template(*values: str) -> str:
    args: list[str | Path] = [
        binary("helm"),
        "template",
        "kube-fledged",
        CHART,
        "--namespace",
        "kube-fledged",
    ]
    for value in values:
        args += ["--set", value]
    result = run(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def kubectl(env: TestEnv, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run(binary("kubectl"), f"--kubeconfig={env.kubeconfig}", *args, stdin=stdin)


def objects(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def installed(testenv: TestEnv) -> Iterator[None]:
    """The suite's cluster, for tests that apply the manifests there. What they apply
    stays for the later RBAC questions, but not the workloads: once kubelet nodes join
    (tests/realnodes) they would run, without the images or Secrets they need."""
    yield
    deleted = kubectl(
        testenv,
        "-n",
        "kube-fledged",
        "delete",
        "daemonset,deployment",
        "-l",
        "app.kubernetes.io/name=kube-fledged",
        "--ignore-not-found",
    )
    assert deleted.returncode == 0, deleted.stderr


def test_the_kustomize_base_is_the_rendered_chart() -> None:
    rendered = "\n".join(
        line
        for line in helm_template("createNamespace=true").splitlines()
        if not line.startswith("# Source:")
    )
    committed = (REPO_ROOT / "deploy" / "base" / "kube-fledged.yaml").read_text()
    assert objects(rendered) == objects(committed), "deploy/base is stale: run `make manifests`"


@pytest.mark.parametrize("runtime", ["crio", "docker", "k3s"])
def test_each_runtime_overlay_matches_the_charts_preset(testenv: TestEnv, runtime: str) -> None:
    built = kubectl(testenv, "kustomize", str(REPO_ROOT / "deploy" / "overlays" / runtime))
    assert built.returncode == 0, built.stderr

    def daemonset(docs: list[dict[str, Any]]) -> dict[str, Any]:
        ds = next(d for d in docs if d["kind"] == "DaemonSet")
        spec = ds["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        volumes = {v["name"]: v.get("hostPath") for v in spec["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        return {"env": env, "volumes": volumes, "mounts": mounts}

    assert daemonset(objects(built.stdout)) == daemonset(
        objects(helm_template(f"runtime={runtime}"))
    )


@pytest.mark.usefixtures("installed")
def test_kustomize_and_helm_install_cleanly_on_a_real_apiserver(testenv: TestEnv) -> None:
    kustomized = kubectl(testenv, "apply", "-k", str(REPO_ROOT / "deploy"), "--dry-run=server")
    assert kustomized.returncode == 0, kustomized.stderr
    applied = kubectl(testenv, "apply", "-k", str(REPO_ROOT / "deploy"))
    assert applied.returncode == 0, applied.stderr
    for kind, name in (
        ("deployment", "kube-fledged-coordinator"),
        ("daemonset", "kube-fledged-agent"),
        ("service", "kube-fledged-coordinator-metrics"),
        ("serviceaccount", "kube-fledged-agent"),
        ("role", "kube-fledged-agent"),
    ):
        got = kubectl(testenv, "-n", "kube-fledged", "get", kind, name)
        assert got.returncode == 0, got.stderr
    assert kubectl(testenv, "get", "crd", "imagecaches.kubefledged.io").returncode == 0
    chart = helm_template()
    dry = kubectl(testenv, "apply", "-f", "-", "--dry-run=server", stdin=chart)
    assert dry.returncode == 0, dry.stderr
    helmed = kubectl(testenv, "apply", "-f", "-", stdin=chart)
    assert helmed.returncode == 0, helmed.stderr


def can_i(env: TestEnv, who: str, *args: str) -> bool:
    result = kubectl(env, "auth", "can-i", f"--as={who}", *args)
    return result.stdout.strip() == "yes"


@pytest.mark.parametrize(
    ("who", "question", "allowed"),
    [
        (COORDINATOR, ("watch", "imagecaches.kubefledged.io", "--all-namespaces"), True),
        (COORDINATOR, ("update", "imagecaches.kubefledged.io/status", "-n", "team-a"), True),
        (COORDINATOR, ("patch", "imagecaches.kubefledged.io", "-n", "team-a"), True),
        (COORDINATOR, ("list", "nodes"), True),
        (COORDINATOR, ("create", "events", "-n", "team-a"), True),
        (COORDINATOR, ("get", "secrets", "-n", "team-a"), True),  # pull secrets, by name
        (COORDINATOR, ("list", "secrets", "-n", "team-a"), False),
        # the agents' certificate, issued anew before it expires; no other Secret
        (COORDINATOR, ("update", "secrets/kube-fledged-agent-tls", "-n", "kube-fledged"), True),
        (COORDINATOR, ("update", "secrets/kube-fledged-ca", "-n", "kube-fledged"), False),
        (COORDINATOR, ("update", "secrets", "-n", "team-a"), False),
        (COORDINATOR, ("watch", "leases.coordination.k8s.io", "-n", "kube-fledged"), True),
        (COORDINATOR, ("create", "leases.coordination.k8s.io", "-n", "team-a"), False),
        (COORDINATOR, ("delete", "nodes"), False),
        (COORDINATOR, ("patch", "nodes"), False),  # only with node gating on
        (COORDINATOR, ("create", "pods", "-n", "kube-fledged"), False),
        # its own CRD read at start (one helm kept from kube-fledged is said), none other
        (COORDINATOR, ("get", "crd/imagecaches.kubefledged.io"), True),
        (COORDINATOR, ("get", "crd/leases.example.io"), False),
        (COORDINATOR, ("update", "crd/imagecaches.kubefledged.io"), False),
        (AGENT, ("update", "leases.coordination.k8s.io", "-n", "kube-fledged"), True),
        (AGENT, ("get", "leases.coordination.k8s.io", "-n", "default"), False),
        (AGENT, ("get", "secrets", "-n", "kube-fledged"), False),
        (AGENT, ("list", "nodes"), False),
        (AGENT, ("list", "imagecaches.kubefledged.io", "--all-namespaces"), False),
    ],
)
@pytest.mark.usefixtures("installed")
def test_each_role_has_what_it_needs_and_nothing_more(
    testenv: TestEnv, who: str, question: tuple[str, ...], allowed: bool
) -> None:
    applied = kubectl(testenv, "apply", "-k", str(REPO_ROOT / "deploy"))
    assert applied.returncode == 0, applied.stderr
    assert can_i(testenv, who, *question) is allowed


@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize(
    "manifests",
    [
        lambda: helm_template("coordinator.nodeGate.taint=kubefledged.io/caching"),
        lambda: (
            run(
                binary("kubectl"), "kustomize", REPO_ROOT / "deploy" / "overlays" / "node-gate"
            ).stdout
        ),
    ],
    ids=["helm", "kustomize"],
)
def test_node_gating_lets_the_coordinator_patch_nodes_and_passes_its_flags(
    testenv: TestEnv, manifests: Any
) -> None:
    rendered = manifests()
    deployment = next(d for d in objects(rendered) if d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--node-gate-taint=kubefledged.io/caching" in args
    assert "--node-gate-deadline=10m" in args
    applied = kubectl(testenv, "apply", "-f", "-", stdin=rendered)
    assert applied.returncode == 0, applied.stderr
    try:
        assert can_i(testenv, COORDINATOR, "patch", "nodes")
        assert not can_i(testenv, COORDINATOR, "delete", "nodes")
    finally:  # back to the install the other tests expect
        restored = kubectl(testenv, "apply", "-f", "-", stdin=helm_template())
        assert restored.returncode == 0, restored.stderr
        assert not can_i(testenv, COORDINATOR, "patch", "nodes")


@pytest.mark.usefixtures("installed")
def test_a_coordinator_serving_one_namespace_reads_secrets_only_there(testenv: TestEnv) -> None:
    assert kubectl(testenv, "create", "namespace", "team-only").returncode in (0, 1)
    chart = helm_template("coordinator.watchNamespace=team-only")
    applied = kubectl(testenv, "apply", "-f", "-", stdin=chart)
    assert applied.returncode == 0, applied.stderr
    try:
        assert can_i(testenv, COORDINATOR, "get", "secrets", "-n", "team-only")
        assert not can_i(testenv, COORDINATOR, "get", "secrets", "-n", "team-b")
    finally:  # back to the cluster-wide install the other tests expect
        restored = kubectl(testenv, "apply", "-f", "-", stdin=helm_template())
        assert restored.returncode == 0, restored.stderr


def test_the_daemonsets_probes_reach_the_agents_health_service(testenv: TestEnv) -> None:
    ds = next(d for d in objects(helm_template("tls.auto=false")) if d["kind"] == "DaemonSet")
    container = ds["spec"]["template"]["spec"]["containers"][0]
    probe_port = container["readinessProbe"]["grpc"]["port"]
    assert container["livenessProbe"]["grpc"] == {"port": probe_port, "service": LIVENESS_SERVICE}
    assert "service" not in container["readinessProbe"]["grpc"]  # the runtime's answer
    assert probe_port in {p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    # Run the agent exactly as the manifest configures it, on node-1's containerd.
    env.update(
        FLEDGED_NODE_NAME="node-1",
        FLEDGED_NAMESPACE="kube-fledged",
        FLEDGED_RUNTIME_ENDPOINT=testenv.nodes[0].runtime_endpoint,
        FLEDGED_NO_LEASE="true",
        PATH="/usr/bin:/bin",
    )
    import sys

    process = ManagedProcess(
        "agent-as-deployed",
        [sys.executable, "-m", "agent.main"],
        testenv.logs / "agent-as-deployed.log",
        env=env,
        cwd=REPO_ROOT,
    )
    process.start()
    try:
        probe = AgentProcess.__new__(AgentProcess)
        probe.address = probe.health_address = f"127.0.0.1:{probe_port}"
        process.wait_until(
            lambda: probe.health() == health_pb2.HealthCheckResponse.SERVING,
            timeout=30,
            what="SERVING on the probe port",
        )
        assert probe.health(LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING
    finally:
        process.stop()


def test_no_probe_runs_before_its_container_can_listen() -> None:
    """A probe without an initial delay can run at its container's first instant: the
    kubelet's first probe comes at a random point of its first period when the kubelet
    itself started less than a period ago. Nothing listens yet then, and the pod gets a
    Warning Event (a coordinator liveness probe did so in CI)."""
    workloads = [d for d in objects(helm_template()) if d["kind"] in ("Deployment", "DaemonSet")]
    assert workloads
    for workload in workloads:
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                if kind in container:
                    where = (workload["metadata"]["name"], container["name"], kind)
                    assert container[kind].get("initialDelaySeconds", 0) >= 1, where
