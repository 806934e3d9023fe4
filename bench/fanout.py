"""Fan-out: create -> Ready of one image on 5 real simulated nodes (real containerd per
node, real agents, real coordinator and apiserver) against pulling the same amount
directly through CRI on the same 5 nodes at once.

Every round uses images never pulled before (fresh seeds), so nothing is cached. The
direct reference is the slowest of five concurrent CRI PullImage calls (one per node):
the same work with the same contention, without kube-fledged. The slowest single pull
with the other nodes idle is reported too. The cache is created and waited for as a
user does it: `kubectl apply`, then `kubectl wait --for=condition=Ready`.

Each round is broken down from the processes' own logs (the coordinator at debug
level, the agents): where the time goes from `kubectl apply` to `kubectl wait`
returning. Results: results/fanout.md.

    .venv/bin/python -m bench.fanout [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from tests.coordinator.helpers import cache_manifest, kubectl
from tests.testenv import TestEnv
from tests.testenv.proxy import RegistryProxy
from tests.testenv.runtime import NodeRuntime

RESULTS = Path(__file__).parent / "results" / "fanout.md"
NODES, SIZE, LAYERS = 5, 50 << 20, 5


def timed_pull(endpoint: str, ref: str) -> float:
    with NodeRuntime(endpoint) as cri:
        started = time.perf_counter()
        cri.pull(ref, timeout=600)
        return time.perf_counter() - started


STAGES = (
    ("apply", "kubectl apply started"),
    ("event", "the coordinator's informer saw the cache"),
    ("order", "first pull batch sent"),
    ("streams", "last node's agent received its batch"),
    ("pulled", "last runtime pull ended (agent)"),
    ("answer", "last answer received by the coordinator"),
    ("written", "status with Ready written"),
    ("seen", "kubectl wait returned"),
)
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def stamps(path: Path, needle: str) -> list[float]:
    """Times (epoch seconds) of the log lines of `path` containing `needle`."""
    out = []
    for line in path.read_text().splitlines():
        match = STAMP.match(line)
        if match and needle in line:
            when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            out.append(when.replace(tzinfo=UTC).timestamp())
    return out


def breakdown(env: TestEnv, key: str, ref: str, applied: float, seen: float) -> dict[str, float]:
    """Seconds from `applied` to each stage of one cache's creation."""
    logs = env.logs
    coordinator = logs / "coordinator.log"
    agents = [logs / f"agent-{n.name}.log" for n in env.nodes]
    times = {
        "apply": applied,
        "event": min(stamps(coordinator, f"cache {key} changed: queued")),
        "order": min(stamps(coordinator, f"pull batch {key}/")),
        "streams": max(min(stamps(a, f"pull batch {key}/")) for a in agents),
        "pulled": max(max(stamps(a, f"runtime pull of {ref} ended")) for a in agents),
        "answer": max(stamps(coordinator, f"answered {ref}: PHASE_SUCCEEDED")),
        "written": min(stamps(coordinator, f"status of {key} written: Succeeded")),
        "seen": seen,
    }
    return {stage: times[stage] - applied for stage, _ in STAGES}


def one_round(r: int, size: int, rate: float | None) -> tuple[dict[str, float], dict[str, float]]:
    """One round on a fresh test environment (containerd slows down as its store fills,
    so rounds sharing one would favour whichever goes first); the direct pulls and the
    cache take turns at going first. `rate`: bytes/s through the suite's throttling
    proxy, for both, to make pulls long."""
    env = TestEnv(nodes=NODES, with_docker=False)
    env.start()
    try:
        env.install_crds()
        env.start_agents()
        env.start_coordinator(("--log-level=debug",))
        registry = env.registry_client()
        host = env.registry.host
        proxy = RegistryProxy(env.registry.host, rate=rate).start() if rate else None
        if proxy is not None:
            env.add_registry_host(proxy.host)
            host = proxy.host
        endpoints = [n.runtime_endpoint for n in env.nodes]
        cached = registry.push_image(f"fanout/cached-{r}", "v1", size=size, layers=LAYERS)
        direct = registry.push_image(f"fanout/direct-{r}", "v1", size=size, layers=LAYERS)
        alone = registry.push_image(f"fanout/alone-{r}", "v1", size=size, layers=LAYERS)
        cached_ref, direct_ref, alone_ref = (
            i.ref.replace(i.registry, host) for i in (cached, direct, alone)
        )

        def pull_directly() -> float:
            with ThreadPoolExecutor(NODES) as pool:
                return max(pool.map(timed_pull, endpoints, [direct_ref] * NODES))

        def cache() -> tuple[float, dict[str, float]]:
            name = f"fanout-{r}"
            manifest = json.dumps(cache_manifest(name, "default", [{"images": [cached_ref]}]))
            applied = time.time()
            started = time.perf_counter()
            kubectl(env, "apply", "-f", "-", stdin=manifest)
            kubectl(env, "wait", f"ic/{name}", "--for=condition=Ready", "--timeout=600s")
            ready = time.perf_counter() - started
            seen = time.time()
            time.sleep(0.2)  # let the last log lines reach their files
            return ready, breakdown(env, f"default/{name}", cached_ref, applied, seen)

        if r % 2:
            ready, stages = cache()
            concurrent = pull_directly()
        else:
            concurrent = pull_directly()
            ready, stages = cache()
        single = max(timed_pull(e, alone_ref) for e in endpoints)
        if proxy is not None:
            proxy.stop()
    finally:
        env.cleanup()
    return {"ready": ready, "concurrent": concurrent, "single": single}, stages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=SIZE >> 20)
    parser.add_argument(
        "--rate-mb", type=float, default=0, help="throttle the registry to this many MB/s"
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    size, rate = args.size_mb << 20, args.rate_mb * (1 << 20) or None
    rows: list[dict[str, float]] = []
    stages_all: list[dict[str, float]] = []
    for r in range(args.rounds):
        row, stages = one_round(r, size, rate)
        rows.append(row)
        stages_all.append(stages)
        print(
            f"round {r}: Ready {row['ready']:.2f}s, 5 direct at once {row['concurrent']:.2f}s, "
            f"slowest alone {row['single']:.2f}s; "
            + ", ".join(f"{k} {v:.3f}" for k, v in stages.items()),
            flush=True,
        )
    ready = statistics.median(x["ready"] for x in rows)
    concurrent = statistics.median(x["concurrent"] for x in rows)
    single = statistics.median(x["single"] for x in rows)
    rounds = "; ".join(f"{x['ready']:.2f}/{x['concurrent']:.2f}/{x['single']:.2f}s" for x in rows)
    lines = [
        "# Fan-out: create -> Ready on 5 simulated nodes vs direct CRI pulls",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.size_mb} MB image in "
        f"{LAYERS} layers, fresh each round"
        + (f", registry throttled to {args.rate_mb:g} MB/s" if rate else "")
        + f"; {args.rounds} rounds, each on a fresh test environment, medians.",
        "",
        "| create -> Ready | slowest of 5 direct pulls at once | ratio "
        "| slowest single pull, nodes idle | ratio |",
        "|---|---|---|---|---|",
        f"| {ready:.2f}s | {concurrent:.2f}s | {ready / concurrent:.2f} "
        f"| {single:.2f}s | {ready / single:.2f} |",
        "",
        f"Rounds (Ready / 5 at once / alone): {rounds}",
        "",
        "Where the time goes, per round: seconds after `kubectl apply` started (from the",
        "coordinator's debug log and the agents' logs; the last column is the time from the",
        "last pull's end to `kubectl wait` returning).",
        "",
        "| round | " + " | ".join(stage for stage, _ in STAGES) + " | after the pulls |",
        "|---" * (len(STAGES) + 2) + "|",
        *(
            f"| {i} | "
            + " | ".join(f"{st[stage]:.3f}" for stage, _ in STAGES)
            + f" | {st['seen'] - st['pulled']:.3f} |"
            for i, st in enumerate(stages_all)
        ),
        "",
        "Stages: " + "; ".join(f"{stage}: {what}" for stage, what in STAGES) + ".",
        "",
    ]
    args.results.write_text("\n".join(lines))
    print(args.results.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
