"""Coordinator at scale: create -> Ready for one ImageCache of 20 images over a
simulated fleet of N nodes, against the real apiserver and the real coordinator.

Node objects (shaped as kubelets register them: bench/nodes.py) and agent Leases
are real API objects; the agents are bench/fleet.py's
simulated ones, one gRPC endpoint per node as with real agents (pulls take
--pull-seconds, at most 2 at once per node, as the real agent's default). With
--wave, the cache sets maxConcurrentNodesPerImage: a fleet-wide wave rollout.
Reported per fleet size: time to Ready / ideal (the simulated pull
time one node needs), coordinator peak RSS and CPU seconds, and the apiserver's write
requests during the operation (from its /metrics). Results: results/coordinator_scale.md.

    .venv/bin/python -m bench.coordinator_scale --nodes 100 1000 5000
    .venv/bin/python -m bench.coordinator_scale --nodes 1000 --wave 50 \
        --results bench/results/coordinator_wave.md
    .venv/bin/python -m bench.coordinator_scale --nodes 1000 5000 --tls \
        --results bench/results/coordinator_scale_tls.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import ssl
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client

from bench.fleet import Fleet, mtls
from bench.nodes import kubelet_node
from common.wire import (
    COMPONENT_LABELS,
    ENDPOINT_ANNOTATION,
    NODE_LABEL,
    TLS_ANNOTATION,
    lease_name,
)
from tests.coordinator.helpers import apply, cache_manifest, wait_for, wait_status
from tests.testenv import TestEnv
from tests.testenv.agents import AGENT_NAMESPACE

RESULTS = Path(__file__).parent / "results" / "coordinator_scale.md"
IMAGES = 20
WRITE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def api_writes(env: TestEnv) -> dict[str, float]:
    """Write requests the apiserver has served so far, by resource."""
    ctx = ssl.create_default_context(cafile=str(env.ca.cert_path))
    certs = env.ca.directory
    ctx.load_cert_chain(certs / "user-kubernetes-admin.crt", certs / "user-kubernetes-admin.key")
    with urllib.request.urlopen(f"{env.apiserver.url}/metrics", context=ctx, timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = WRITE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group("labels")))
        if labels.get("verb") in ("POST", "PUT", "PATCH", "DELETE"):
            key = labels.get("resource", "") + (
                "/" + labels["subresource"] if labels.get("subresource") else ""
            )
            out[key] = out.get(key, 0) + float(match.group("value"))
    return out


def spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        q: round(ordered[min(len(ordered) - 1, int(f * len(ordered)))], 2)
        for q, f in (("min", 0.0), ("p50", 0.5), ("p90", 0.9), ("max", 1.0))
    }


def proc_usage(pid: int) -> tuple[float, float]:
    """Peak RSS (MiB) and CPU seconds of a process so far."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return hwm / 1024, (int(fields[11]) + int(fields[12])) / tick


def make_fleet(env: TestEnv, nodes: int, fleet: Fleet, tls: bool) -> None:
    core = client.CoreV1Api(env.api_client())
    leases = client.CoordinationV1Api(env.api_client())
    now = datetime.now(UTC)

    def one(i: int) -> None:
        name = f"sim-{i:05d}"
        body: Any = kubelet_node(name, i)  # the client sends a dict body as it is
        core.create_node(body)
        leases.create_namespaced_lease(
            AGENT_NAMESPACE,
            client.V1Lease(
                metadata=client.V1ObjectMeta(
                    name=lease_name(name),
                    labels={**COMPONENT_LABELS, NODE_LABEL: name},
                    annotations={
                        ENDPOINT_ANNOTATION: fleet.endpoint_for(i),
                        **({TLS_ANNOTATION: "true"} if tls else {}),
                    },
                ),
                # Not renewed during the run: long enough to outlive it.
                spec=client.V1LeaseSpec(
                    holder_identity=name, lease_duration_seconds=7200, renew_time=now
                ),
            ),
        )

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(nodes)))


def ideal_seconds(nodes: int, pull_seconds: float, wave: int | None) -> float:
    """The least time the pulls can take: each node pulls 2 images at a time; with a
    wave, at most `wave` nodes pull one image at once, IMAGES x wave pulls in all."""
    per_node = pull_seconds * math.ceil(IMAGES / 2)
    if not wave:
        return per_node
    at_once = min(IMAGES * wave, 2 * nodes)
    return max(per_node, pull_seconds * math.ceil(IMAGES * nodes / at_once))


def open_files(needed: int) -> None:
    """One connection per node, on both sides (the fleet's accepted sockets, the
    coordinator's channels; it inherits the limit): raise the limit as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def run_one(
    nodes: int, pull_seconds: float, servers: int, wave: int | None, tls: bool
) -> dict[str, Any]:
    open_files(nodes + 4096)
    env = TestEnv(nodes=0, with_docker=False)
    env.start()
    try:
        env.install_crds()
        credentials, files = mtls(env.workdir / "agent-tls") if tls else (None, [])
        fleet = Fleet(servers, pull_seconds, nodes, credentials).start()
        started = time.monotonic()
        make_fleet(env, nodes, fleet, tls)
        print(f"{nodes} nodes and Leases created in {time.monotonic() - started:.0f}s", flush=True)
        tls_flags = (
            [f"--agent-tls-{k}={f}" for k, f in zip(("ca", "cert", "key"), files, strict=True)]
            if tls
            else []
        )
        coordinator = env.start_coordinator(
            ("--log-level=info", "--workers=4", *tls_flags),
            # Ready after its first listings: 10,000 agents take over 30 s on 2 cores.
            ready_timeout=max(30.0, nodes / 100),
        )
        listed = time.monotonic()
        wait_for(
            "the coordinator to list the fleet",
            lambda: coordinator.metric("fledged_coordinator_agents_listed") >= nodes,
            timeout=300,
            interval=0.5,
        )
        print(f"fleet listed by the coordinator in {time.monotonic() - listed:.0f}s", flush=True)
        time.sleep(2)  # the clock starts on a coordinator at rest
        before = api_writes(env)
        _, cpu_before = proc_usage(coordinator.process.pid)
        sim_before = resource.getrusage(resource.RUSAGE_SELF)
        plans_before = coordinator.metric("fledged_coordinator_node_plans_total")
        images = [f"registry.bench.local/app/img-{i}:v1" for i in range(IMAGES)]
        t0 = time.monotonic()
        manifest = cache_manifest("scale", "default", [{"images": images}])
        if wave:
            manifest["spec"]["maxConcurrentNodesPerImage"] = wave
        apply(env, manifest)
        obj = wait_status(env, "default", "scale", "Succeeded", timeout=1800, interval=0.25)
        status = obj["status"]
        elapsed = time.monotonic() - t0
        after = api_writes(env)
        rss, cpu = proc_usage(coordinator.process.pid)
        sim_after = resource.getrusage(resource.RUSAGE_SELF)
        plans = coordinator.metric("fledged_coordinator_node_plans_total") - plans_before
        pulls = sum(n.pulls for n in fleet.agent.nodes.values())
        sim = fleet.agent
        writes = {
            k: after.get(k, 0) - before.get(k, 0)
            for k in after
            if after.get(k, 0) - before.get(k, 0)
        }
        ideal = ideal_seconds(nodes, pull_seconds, wave)
        result = {
            "nodes": nodes,
            "wave": wave,
            "tls": tls,
            "connections": len(set(fleet.endpoints)),
            "ready_s": elapsed,
            "ideal_s": ideal,
            "ratio": elapsed / ideal,
            "rss_mib": rss,
            "cpu_s": cpu,
            "operation_cpu_s": cpu - cpu_before,
            "node_plans": plans,
            # this process: the simulated fleet's thread, and a status poll every 0.25 s
            "fleet_cpu_s": sim_after.ru_utime
            + sim_after.ru_stime
            - sim_before.ru_utime
            - sim_before.ru_stime,
            "pulls": pulls,
            "first_order_s": sim.first_order - t0,  # the coordinator's first order
            "last_pull_end_s": sim.last_pull_end - t0,  # when the fleet's work was done
            # when nodes got their orders, and how long their pulls took, over the fleet
            "ordered_s": spread([n.ordered_at - t0 for n in sim.nodes.values()]),
            "pulling_s": spread([n.done_at - n.ordered_at for n in sim.nodes.values()]),
            "writes": writes,
            "ready": status.get("ready"),
        }
        print(json.dumps(result), flush=True)
        for line in coordinator.process.log_path.read_text().splitlines():
            if "planning" in line:
                print("  coordinator:", line, flush=True)
        return result
    finally:
        env.cleanup()


def write(
    results: list[dict[str, Any]],
    pull_seconds: float,
    servers: int,
    wave: int | None,
    path: Path,
    note: str,
) -> None:
    waves = (
        f" Wave rollout: maxConcurrentNodesPerImage {wave}, so at most {wave} nodes pull "
        "one image at once and the ideal is the pulls' total over the wave's capacity."
        if wave
        else f" The ideal create -> Ready is {pull_seconds * math.ceil(IMAGES / 2):g}s "
        "whatever the fleet size."
    )
    lines = [
        "# Coordinator at scale: one ImageCache of 20 images over N simulated nodes",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores. "
        "Real apiserver and coordinator (one process, 4 workers); one simulated agent "
        f"endpoint per node (as many connections as nodes) over {servers} gRPC servers on "
        f"loopback; each simulated pull takes {pull_seconds:g}s, at most 2 at once per "
        f"node.{waves} Targets: 5,000 nodes <= 1.5x ideal, coordinator peak RSS <= 400 MB, "
        "API writes grow with images, not images x nodes." + (f" {note}" if note else ""),
        "",
        "Orders reached the nodes: seconds after `kubectl apply`, first / median / last. "
        "A node's pulls: seconds from its order to its last pull's end, median / max "
        f"(ideal {pull_seconds * math.ceil(IMAGES / 2):g}). Last pull: when the fleet's "
        "work was done.",
        "",
        "| nodes | connections | create -> Ready | ideal | ratio | coordinator peak RSS "
        "| coordinator CPU (of it, the operation) | simulated fleet's CPU | node plans "
        "| orders reached nodes "
        "| a node's pulls | last pull | pulls | API writes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        writes = ", ".join(f"{k}: {v:.0f}" for k, v in sorted(r["writes"].items()))
        ordered, pulling = r["ordered_s"], r["pulling_s"]
        lines.append(
            f"| {r['nodes']} | {r['connections']}{' (mTLS)' if r.get('tls') else ''} | "
            f"{r['ready_s']:.1f}s | "
            f"{r['ideal_s']:.0f}s | {r['ratio']:.2f} | "
            f"{r['rss_mib']:.0f} MiB | {r['cpu_s']:.1f}s ({r['operation_cpu_s']:.1f}s) | "
            f"{r['fleet_cpu_s']:.1f}s | {r['node_plans']:.0f} | "
            f"{ordered['min']:.1f} / {ordered['p50']:.1f} / {ordered['max']:.1f}s | "
            f"{pulling['p50']:.1f} / {pulling['max']:.1f}s | {r['last_pull_end_s']:.1f}s | "
            f"{r['pulls']} | {writes} |"
        )
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--pull-seconds", type=float, default=1.0)
    parser.add_argument("--servers", type=int, default=250)
    parser.add_argument("--wave", type=int, default=0, help="maxConcurrentNodesPerImage")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="a sentence for the results' header")
    parser.add_argument(
        "--tls", action="store_true", help="agents serve mTLS (the chart's default)"
    )
    args = parser.parse_args()
    wave = args.wave or None
    results = [run_one(n, args.pull_seconds, args.servers, wave, args.tls) for n in args.nodes]
    write(results, args.pull_seconds, args.servers, wave, args.results, args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
