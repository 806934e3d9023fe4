"""The coordinator over a fleet at rest: N Nodes shaped as kubelets register them
(bench/nodes.py), N agent Leases renewed every 10 s as the agents' default renews
them, and no ImageCache. Reported: the coordinator's peak RSS once it has listed the
fleet (a real Node is ~15 KB of JSON: the list alone is what a 5,000-node cluster
costs it before any cache), and its CPU while the Leases renew (the cost of the
agents' heartbeats, which no other benchmark renews). Results: results/idle_fleet.md.

    .venv/bin/python -m bench.idle_fleet --nodes 2000 5000
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client

from bench.coordinator_scale import make_fleet, open_files, proc_usage
from bench.fleet import Fleet
from common.wire import lease_name
from tests.coordinator.helpers import wait_for
from tests.testenv import TestEnv
from tests.testenv.agents import AGENT_NAMESPACE

RESULTS = Path(__file__).parent / "results" / "idle_fleet.md"
RENEW_SECONDS = 10.0  # the agent's --lease-renew-interval default


def run_one(nodes: int, seconds: float) -> dict[str, Any]:
    open_files(nodes + 4096)
    env = TestEnv(nodes=0, with_docker=False)
    env.start()
    try:
        env.install_crds()
        fleet = Fleet(100, 1.0, nodes).start()
        make_fleet(env, nodes, fleet, tls=False)
        coordinator = env.start_coordinator(("--log-level=info", "--workers=4"))
        wait_for(
            "the coordinator to list the fleet",
            lambda: coordinator.metric("fledged_coordinator_agents_listed") >= nodes,
            timeout=300,
            interval=0.5,
        )
        time.sleep(5)
        pid = coordinator.process.pid
        listed_rss, _ = proc_usage(pid)
        leases = client.CoordinationV1Api(env.api_client())

        def renew(i: int) -> None:
            patch = {"spec": {"renewTime": datetime.now(UTC).isoformat()}}
            leases.patch_namespaced_lease(lease_name(f"sim-{i:05d}"), AGENT_NAMESPACE, patch)

        _, cpu0 = proc_usage(pid)
        t0 = time.monotonic()
        renewed = 0
        late = 0
        with ThreadPoolExecutor(24) as pool:
            while time.monotonic() - t0 < seconds:
                start = time.monotonic()
                list(pool.map(renew, range(nodes)))
                renewed += nodes
                left = RENEW_SECONDS - (time.monotonic() - start)
                if left > 0:
                    time.sleep(left)
                else:
                    late += 1  # this machine could not renew the fleet in 10 s
        elapsed = time.monotonic() - t0
        rss, cpu1 = proc_usage(pid)
        result = {
            "nodes": nodes,
            "listed_rss_mib": listed_rss,
            "rss_mib": rss,
            "renewals_per_s": renewed / elapsed,
            "late_rounds": late,
            "cpu_cores": (cpu1 - cpu0) / elapsed,
        }
        print(result, flush=True)
        return result
    finally:
        env.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, nargs="+", default=[2000])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = [run_one(n, args.seconds) for n in args.nodes]
    lines = [
        "# The coordinator over a fleet at rest",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Real apiserver and "
        "coordinator; Nodes shaped as kubelets register them (bench/nodes.py, 50 status "
        "images each); one agent Lease per node, all renewed every "
        f"{RENEW_SECONDS:g} s for {args.seconds:g} s; no ImageCache. Peak RSS: the "
        "coordinator's VmHWM once it has listed the fleet, and at the end.",
        "",
        "| nodes | peak RSS after listing | peak RSS at the end | Lease renewals/s "
        "| coordinator CPU while they renew | late renewal rounds |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['nodes']} | {r['listed_rss_mib']:.0f} MiB | {r['rss_mib']:.0f} MiB | "
            f"{r['renewals_per_s']:.0f} | {r['cpu_cores']:.3f} core | {r['late_rounds']} |"
        )
    args.results.write_text("\n".join(lines) + "\n")
    print(args.results.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
