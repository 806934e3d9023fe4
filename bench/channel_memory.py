"""What one agent connection costs the coordinator: memory per connected channel and
per open pull stream, through the coordinator's own AgentPool, against bench/fleet.py's
simulated agents (one endpoint per node, as in the scale benchmark).

The scale benchmark's peak RSS is mostly this times the fleet size, so this is the
floor under any coordinator model. The client runs in a child process of its own (the
fleet's servers would otherwise count in its RSS); malloc's own count of the bytes in
use is reported beside RSS, to tell gRPC's allocations from the allocator's overhead.

    .venv/bin/python -m bench.channel_memory --nodes 2000
    .venv/bin/python -m bench.channel_memory --nodes 2000 --tls \
        --results bench/results/channel_memory_tls.md
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fleet import Fleet, mtls

RESULTS = Path(__file__).parent / "results" / "channel_memory.md"
IMAGES = 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


def _usage() -> tuple[float, float]:
    """RSS and malloc's bytes in use, KiB."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    rss = next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return float(rss), (info.uordblks + info.hblkhd) / 1024


async def _client(endpoints: list[str], tls: list[str] | None) -> dict[str, Any]:
    from coordinator.agents import AgentPool, TlsConfig
    from protos.fledged.agent.v1 import agent_pb2

    n = len(endpoints)
    pool = AgentPool(TlsConfig(Path(tls[0]), Path(tls[1]), Path(tls[2])) if tls else None)
    rss0, used0 = _usage()
    clients = [pool.get(e) for e in endpoints]
    await asyncio.gather(*(c.node_info(f"sim-{i:05d}") for i, c in enumerate(clients)))
    await asyncio.sleep(0.5)
    rss1, used1 = _usage()
    request = agent_pb2.PullImagesRequest(
        images=[
            agent_pb2.ImagePull(image=f"registry.bench.local/app/img-{i}:v1") for i in range(IMAGES)
        ],
        progress=agent_pb2.PROGRESS_OUTCOMES,
    ).SerializeToString()
    streams = [c.pull(f"sim-{i:05d}", request, limit=600) for i, c in enumerate(clients)]
    # Each waits for its first event (the simulated pulls take an hour): all stay open.
    tasks = [asyncio.ensure_future(anext(aiter(s))) for s in streams]
    await asyncio.sleep(3)
    rss2, used2 = _usage()
    for task in tasks:
        task.cancel()
    return {
        "nodes": n,
        "channel_rss_kib": (rss1 - rss0) / n,
        "channel_used_kib": (used1 - used0) / n,
        "stream_rss_kib": (rss2 - rss1) / n,
        "stream_used_kib": (used2 - used1) / n,
        "pending": sum(not t.done() for t in tasks),
    }


def run(nodes: int, tls: bool) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * nodes + 4096)), hard))
    with tempfile.TemporaryDirectory() as tmp:
        credentials, client_files = mtls(Path(tmp)) if tls else (None, [])
        fleet = Fleet(max(1, nodes // 40), 3600.0, nodes, credentials).start()
        endpoints = Path(tmp) / "endpoints.json"
        endpoints.write_text(json.dumps(fleet.endpoints))
        out = subprocess.run(
            [sys.executable, "-m", "bench.channel_memory", "--client", str(endpoints)]
            + [f"--client-tls={f}" for f in client_files],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tls", action="store_true", help="mTLS, as --agent-tls-auto")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--client-tls", action="append", help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.client:
        endpoints = json.loads(Path(args.client).read_text())
        print(json.dumps(asyncio.run(_client(endpoints, args.client_tls))), flush=True)
        os._exit(0)  # the open streams need no goodbye
    rounds = []
    for _ in range(args.rounds):
        rounds.append(run(args.nodes, args.tls))
        print(json.dumps(rounds[-1]), flush=True)
    lines = [
        "# What one agent connection costs the coordinator",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.nodes} simulated agents"
        + (" serving mTLS (as under --agent-tls-auto)" if args.tls else "")
        + ", one endpoint each (bench/fleet.py), reached through the coordinator's "
        "AgentPool; a connection is a channel after one GetNodeInfo, a stream a PullImages "
        f"of {IMAGES} images left open. KiB per node; malloc's bytes in use beside RSS. "
        "Each row is one round in a fresh process.",
        "",
        "| round | channel RSS | channel malloc'd | pull stream RSS | pull stream malloc'd |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(rounds, 1):
        lines.append(
            f"| {i} | {r['channel_rss_kib']:.1f} | {r['channel_used_kib']:.1f} | "
            f"{r['stream_rss_kib']:.1f} | {r['stream_used_kib']:.1f} |"
        )
    args.results.write_text("\n".join(lines) + "\n")
    print(args.results.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
