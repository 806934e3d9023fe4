"""The promise, measured: pod create -> Ready on a real kubelet node through a throttled
registry, for an image an ImageCache put on the node, for the same kind of image pulled
on the node beforehand directly through CRI (the floor), and for one not on the node
(the kubelet pulls it). Then a Deployment of 2 replicas per kubelet node scaled from 0,
with its image cached or not.

Two kubelet nodes (tests/testenv/kubelet.py), each with its own containerd and a
kube-fledged agent, the real coordinator and apiserver; the registry is reached
through the suite's proxy at --rate-mb (shared by all connections, as one link).
Results: results/pod_start.md.

    .venv/bin/python -m bench.pod_start [--rounds 3] [--rate-mb 25] [--size-mb 50]
"""

from __future__ import annotations

import argparse
import functools
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kubernetes import client

from tests.coordinator.helpers import apply, cache_manifest, wait_for, wait_status
from tests.testenv import TestEnv
from tests.testenv.kubelet import ControlPlaneExtras, KubeletCluster, KubeletNode
from tests.testenv.proxy import RegistryProxy
from tests.testenv.runtime import NodeRuntime
from tests.testenv.workload import PAUSE_C, push_program_image, static_binary

RESULTS = Path(__file__).parent / "results" / "pod_start.md"
LABEL = "fledged.bench/kubelet"
NAMESPACE = "default"


def pod(name: str, node: str, image: str) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"bench": name}),
        spec=client.V1PodSpec(
            node_name=node,
            containers=[
                client.V1Container(name="c", image=image, image_pull_policy="IfNotPresent")
            ],
            termination_grace_period_seconds=1,
        ),
    )


def ready_pods(core: client.CoreV1Api, selector: str) -> int:
    items = core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
    return sum(
        any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
        for p in items
        if p.status is not None
    )


def all_ready(core: client.CoreV1Api, name: str, count: int) -> bool:
    return ready_pods(core, f"bench={name}") == count


def timed(start: Callable[[], object], done: Callable[[], bool], timeout: float = 600) -> float:
    started = time.perf_counter()
    start()
    wait_for("pods to be Ready", done, timeout=timeout, interval=0.02)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate-mb", type=float, default=25.0)
    parser.add_argument("--size-mb", type=int, default=50)
    args = parser.parse_args()
    # A SIGTERM still runs the teardown below: kubelet nodes change the host.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = TestEnv(nodes=0, with_docker=False)
    env.start()
    proxy = RegistryProxy(env.registry.host, rate=args.rate_mb * (1 << 20)).start()
    cluster: KubeletCluster | None = None
    agents = []
    rows: dict[str, list[float]] = {"cached": [], "floor": [], "uncached": []}
    scale: dict[str, list[float]] = {"cached": [], "uncached": []}
    try:
        env.install_crds()
        env.start_coordinator(("--log-level=info",))
        registry = env.registry_client()
        program = static_binary(env.workdir, "pause", PAUSE_C)
        pause = push_program_image(registry, "fledged/pause", "v1", program)
        hosts = [env.registry.host, proxy.host]
        nodes = [
            KubeletNode(env.workdir, i, env.apiserver, hosts, pause.ref, labels={LABEL: "true"})
            for i in (1, 2)
        ]
        cluster = KubeletCluster(env.workdir, nodes, ControlPlaneExtras(env.workdir, env.apiserver))
        core = client.CoreV1Api(env.api_client())
        apps = client.AppsV1Api(env.api_client())
        cluster.start(core)
        agents = [
            env.start_agent(
                node_name=n.name, runtime_endpoint=n.containerd.endpoint, name=f"agent-k{n.index}"
            )
            for n in nodes
        ]
        wait_for(
            "the default ServiceAccount",
            lambda: core.list_namespaced_service_account(NAMESPACE).items,
            timeout=60,
        )
        size = args.size_mb << 20

        def image(name: str) -> str:
            pushed = push_program_image(
                registry, f"bench/{name}", "v1", program, padding=size, seed=name
            )
            return pushed.ref.replace(pushed.registry, proxy.host)

        for r in range(args.rounds):
            node = nodes[r % 2]
            cached, floor, uncached = (
                image(f"cached-{r}"),
                image(f"floor-{r}"),
                image(f"uncached-{r}"),
            )
            selector = {LABEL: "true"}
            apply(
                env,
                cache_manifest(
                    f"c{r}", NAMESPACE, [{"images": [cached], "nodeSelector": selector}]
                ),
            )
            wait_status(env, NAMESPACE, f"c{r}", "Succeeded", timeout=600)
            with NodeRuntime(node.containerd.endpoint) as cri:
                cri.pull(floor, timeout=600)
            for kind, ref in (("cached", cached), ("floor", floor), ("uncached", uncached)):
                name = f"{kind}-{r}"
                seconds = timed(
                    functools.partial(
                        core.create_namespaced_pod, NAMESPACE, pod(name, node.name, ref)
                    ),
                    functools.partial(all_ready, core, name, 1),
                )
                rows[kind].append(seconds)
                core.delete_namespaced_pod(name, NAMESPACE, grace_period_seconds=0)
            print(
                f"round {r} on {node.name}: "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in rows.items()),
                flush=True,
            )
            for kind in ("cached", "uncached"):
                ref = image(f"deploy-{kind}-{r}")
                if kind == "cached":
                    apply(
                        env,
                        cache_manifest(
                            f"d{r}", NAMESPACE, [{"images": [ref], "nodeSelector": selector}]
                        ),
                    )
                    wait_status(env, NAMESPACE, f"d{r}", "Succeeded", timeout=600)
                name = f"deploy-{kind}-{r}"
                deployment = client.V1Deployment(
                    metadata=client.V1ObjectMeta(name=name),
                    spec=client.V1DeploymentSpec(
                        replicas=0,
                        selector=client.V1LabelSelector(match_labels={"bench": name}),
                        template=client.V1PodTemplateSpec(
                            metadata=client.V1ObjectMeta(labels={"bench": name}),
                            spec=client.V1PodSpec(
                                node_selector=selector,
                                containers=[
                                    client.V1Container(
                                        name="c", image=ref, image_pull_policy="IfNotPresent"
                                    )
                                ],
                                termination_grace_period_seconds=1,
                            ),
                        ),
                    ),
                )
                apps.create_namespaced_deployment(NAMESPACE, deployment)
                replicas = 2 * len(nodes)
                seconds = timed(
                    functools.partial(
                        apps.patch_namespaced_deployment_scale,
                        name,
                        NAMESPACE,
                        {"spec": {"replicas": replicas}},
                    ),
                    functools.partial(all_ready, core, name, replicas),
                )
                scale[kind].append(seconds)
                apps.delete_namespaced_deployment(name, NAMESPACE)
            print(
                f"round {r} scale-out: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in scale.items()),
                flush=True,
            )
    finally:
        for agent in agents:
            agent.stop()
        if cluster is not None:
            cluster.stop(client.CoreV1Api(env.api_client()))
        proxy.stop()
        env.cleanup()
    med = {k: statistics.median(v) for k, v in rows.items()}
    smed = {k: statistics.median(v) for k, v in scale.items()}
    lines = [
        "# Pod start on a real kubelet node: cached, pulled beforehand, or not on the node",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        "2 kubelet nodes (one containerd each), "
        f"a {args.size_mb} MB image (a static binary and padding), registry throttled to "
        f"{args.rate_mb:g} MB/s; {args.rounds} rounds, medians. Targets: cached / floor <= 1.10; "
        "uncached / cached reported.",
        "",
        "| pod create -> Ready | cached (ImageCache) | floor (pulled beforehand through CRI) "
        "| not on the node | cached / floor | uncached / cached |",
        "|---|---|---|---|---|---|",
        f"| median | {med['cached']:.2f}s | {med['floor']:.2f}s | {med['uncached']:.2f}s "
        f"| {med['cached'] / med['floor']:.2f} | {med['uncached'] / med['cached']:.1f} |",
        "",
        "Rounds (cached / floor / uncached): "
        + "; ".join(
            f"{c:.2f}/{f:.2f}/{u:.2f}s"
            for c, f, u in zip(rows["cached"], rows["floor"], rows["uncached"], strict=True)
        ),
        "",
        f"Deployment of {2 * 2} replicas (2 per kubelet node) scaled from 0, until all Ready: "
        f"cached {smed['cached']:.2f}s, not cached {smed['uncached']:.2f}s "
        "(rounds, cached/not: "
        + ", ".join(f"{c:.2f}/{u:.2f}s" for c, u in zip(*scale.values(), strict=True))
        + ").",
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print(RESULTS.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
