"""Fan-out: create -> Ready of one image on 5 real simulated nodes (real containerd per
node, real agents, real coordinator and apiserver) against pulling the same amount
directly through CRI on the same 5 nodes at once.

Every round uses images never pulled before (fresh seeds), so nothing is cached. The
direct reference is the slowest of five concurrent CRI PullImage calls (one per node):
the same work with the same contention, without kube-fledged. The slowest single pull
with the other nodes idle is reported too. Results: results/fanout.md.

    .venv/bin/python -m bench.fanout [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.coordinator.helpers import apply, cache_manifest, get_cache, wait_for
from tests.testenv import TestEnv
from tests.testenv.runtime import NodeRuntime

RESULTS = Path(__file__).parent / "results" / "fanout.md"
NODES, SIZE, LAYERS = 5, 50 << 20, 5


def timed_pull(endpoint: str, ref: str) -> float:
    with NodeRuntime(endpoint) as cri:
        started = time.perf_counter()
        cri.pull(ref, timeout=600)
        return time.perf_counter() - started


def ready_on_all(env: TestEnv, name: str) -> bool:
    status = (get_cache(env, "default", name) or {}).get("status") or {}
    return bool(status.get("status") == "Succeeded" and status.get("ready") == f"{NODES}/{NODES}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    env = TestEnv(nodes=NODES, with_docker=False)
    env.start()
    rows: list[dict[str, float]] = []
    try:
        env.install_crds()
        env.start_agents()
        env.start_coordinator(("--log-level=info",))
        registry = env.registry_client()
        endpoints = [n.runtime_endpoint for n in env.nodes]
        for r in range(args.rounds):
            cached = registry.push_image(f"fanout/cached-{r}", "v1", size=SIZE, layers=LAYERS)
            direct = registry.push_image(f"fanout/direct-{r}", "v1", size=SIZE, layers=LAYERS)
            alone = registry.push_image(f"fanout/alone-{r}", "v1", size=SIZE, layers=LAYERS)
            with ThreadPoolExecutor(NODES) as pool:
                concurrent = max(pool.map(timed_pull, endpoints, [direct.ref] * NODES))
            single = max(timed_pull(e, alone.ref) for e in endpoints)
            name = f"fanout-{r}"
            started = time.perf_counter()
            apply(env, cache_manifest(name, "default", [{"images": [cached.ref]}]))
            ready_now = functools.partial(ready_on_all, env, name)
            wait_for(f"{name} to be Ready", ready_now, timeout=600, interval=0.05)
            ready = time.perf_counter() - started
            rows.append({"ready": ready, "concurrent": concurrent, "single": single})
            print(
                f"round {r}: Ready {ready:.2f}s, 5 direct at once {concurrent:.2f}s, "
                f"slowest alone {single:.2f}s",
                flush=True,
            )
    finally:
        env.cleanup()
    ready = statistics.median(x["ready"] for x in rows)
    concurrent = statistics.median(x["concurrent"] for x in rows)
    single = statistics.median(x["single"] for x in rows)
    rounds = "; ".join(f"{x['ready']:.2f}/{x['concurrent']:.2f}/{x['single']:.2f}s" for x in rows)
    lines = [
        "# Fan-out: create -> Ready on 5 simulated nodes vs direct CRI pulls",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {SIZE >> 20} MB image in "
        f"{LAYERS} layers, fresh each round; {args.rounds} rounds, medians. Target: <= 1.2.",
        "",
        "| create -> Ready | slowest of 5 direct pulls at once | ratio "
        "| slowest single pull, nodes idle | ratio |",
        "|---|---|---|---|---|",
        f"| {ready:.2f}s | {concurrent:.2f}s | {ready / concurrent:.2f} "
        f"| {single:.2f}s | {ready / single:.2f} |",
        "",
        f"Rounds (Ready / 5 at once / alone): {rounds}",
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print(RESULTS.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
