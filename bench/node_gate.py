"""Node readiness gating, measured: a Deployment scaled onto a freshly joined kubelet
node, through a throttled registry, with the node gated (it joins with the startup
taint; the coordinator removes it once the node holds the cached image) or not (it
joins without the taint: the kubelet and our agent pull at once). Reported: the Node
Ready -> all pods Ready (the Deployment is created then), and how many pods pulled
their image themselves.

One kubelet node at a time (tests/testenv/kubelet.py), a fresh one and a fresh image
per round and kind; the real coordinator (--node-gate-taint) and an agent per node.
Results: results/node_gate.md.

    .venv/bin/python -m bench.node_gate [--rounds 3] [--rate-mb 25] [--size-mb 50]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from pathlib import Path

from kubernetes import client

from bench.pod_start import ready_pods
from tests.coordinator.helpers import apply, cache_manifest, wait_for
from tests.realnodes.pods import pod_events
from tests.realnodes.test_node_gate import deployment
from tests.testenv import TestEnv
from tests.testenv.kubelet import ControlPlaneExtras, KubeletCluster, KubeletNode
from tests.testenv.proxy import RegistryProxy
from tests.testenv.workload import PAUSE_C, push_program_image, static_binary

RESULTS = Path(__file__).parent / "results" / "node_gate.md"
TAINT = {"key": "kubefledged.io/caching", "effect": "NoSchedule"}
LABEL = "fledged.test/gated-kubelet"  # what tests.realnodes.test_node_gate.deployment selects
NAMESPACE = "default"
REPLICAS = 4


def pod_names(core: client.CoreV1Api, selector: str) -> list[str]:
    items = core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
    return [str(p.metadata.name) for p in items if p.metadata is not None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate-mb", type=float, default=25.0)
    parser.add_argument("--size-mb", type=int, default=50)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # teardown puts the host back
    env = TestEnv(nodes=0, with_docker=False)
    env.start()
    proxy = RegistryProxy(env.registry.host, rate=args.rate_mb * (1 << 20)).start()
    rows: dict[str, list[tuple[float, int]]] = {"gated": [], "ungated": []}
    try:
        env.install_crds()
        env.start_coordinator(("--log-level=info", "--node-gate-taint=kubefledged.io/caching"))
        registry = env.registry_client()
        program = static_binary(env.workdir, "pause", PAUSE_C)
        pause = push_program_image(registry, "fledged/pause", "v1", program)
        core = client.CoreV1Api(env.api_client())
        apps = client.AppsV1Api(env.api_client())
        index = 0
        for r in range(args.rounds):
            for kind in ("gated", "ungated") if r % 2 == 0 else ("ungated", "gated"):
                index += 1
                name = f"{kind}-{r}"
                pushed = push_program_image(
                    registry, f"bench/{name}", "v1", program, padding=args.size_mb << 20, seed=name
                )
                image = pushed.ref.replace(pushed.registry, proxy.host)
                apply(
                    env,
                    cache_manifest(
                        name, NAMESPACE, [{"images": [image], "nodeSelector": {LABEL: name}}]
                    ),
                )
                settings: dict[str, object] = (
                    {"registerWithTaints": [TAINT]} if kind == "gated" else {}
                )
                node = KubeletNode(
                    env.workdir,
                    index,
                    env.apiserver,
                    [env.registry.host, proxy.host],
                    pause.ref,
                    labels={LABEL: name},
                    kubelet_config=settings,
                )
                cluster = KubeletCluster(
                    env.workdir, [node], ControlPlaneExtras(env.workdir, env.apiserver)
                )
                cluster.start(core)  # returns once the Node is Ready
                started = time.perf_counter()
                agent = env.start_agent(
                    node_name=node.name,
                    runtime_endpoint=node.containerd.endpoint,
                    name=f"agent-{name}",
                )
                try:
                    wait_for(
                        "the default ServiceAccount",
                        lambda: core.list_namespaced_service_account(NAMESPACE).items,
                        timeout=60,
                    )
                    made = deployment(name, image, REPLICAS)
                    made.spec.template.spec.node_selector = {LABEL: name}  # type: ignore[union-attr]
                    apps.create_namespaced_deployment(NAMESPACE, made)
                    wait_for(
                        "all pods Ready",
                        lambda n=name: ready_pods(core, f"app={n}") == REPLICAS,  # type: ignore[misc]
                        timeout=600,
                        interval=0.05,
                    )
                    seconds = time.perf_counter() - started
                    pulled = sum(
                        any(reason == "Pulling" for reason, _ in pod_events(core, NAMESPACE, pod))
                        for pod in pod_names(core, f"app={name}")
                    )
                    rows[kind].append((seconds, pulled))
                    print(
                        f"round {r} {kind}: {seconds:.2f}s, {pulled}/{REPLICAS} pods pulled",
                        flush=True,
                    )
                    apps.delete_namespaced_deployment(name, NAMESPACE)
                finally:
                    agent.stop()
                    cluster.stop(core)
    finally:
        proxy.stop()
        env.cleanup()
    lines = [
        "# Node readiness gating: a Deployment onto a freshly joined kubelet node",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; one kubelet node per round and "
        f"kind, a {args.size_mb} MB image cached by an ImageCache selecting the node, registry "
        f"throttled to {args.rate_mb:g} MB/s; a Deployment of {REPLICAS} replicas created as the "
        f"Node turns Ready; {args.rounds} rounds, kinds taking turns first, medians.",
        "",
        "| Node Ready -> all pods Ready | median | pods that pulled the image themselves |",
        "|---|---|---|",
    ]
    for kind, label in (("gated", "gated (joins with the taint)"), ("ungated", "not gated")):
        median = statistics.median(s for s, _ in rows[kind])
        pulls = ", ".join(f"{p}/{REPLICAS}" for _, p in rows[kind])
        lines.append(f"| {label} | {median:.2f}s | {pulls} |")
    lines += [
        "",
        "Rounds (gated / not gated): "
        + "; ".join(
            f"{g[0]:.2f}/{u[0]:.2f}s" for g, u in zip(rows["gated"], rows["ungated"], strict=True)
        ),
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print(RESULTS.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
