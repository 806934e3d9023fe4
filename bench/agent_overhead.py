"""Agent overhead: a pull through the agent versus a direct CRI PullImage of the same
image into a fresh store, on real containerd and a real registry.

Before every timed pull the image is deleted with containerd's images API using
`sync=true`, which runs containerd's garbage collector before answering, and the run
checks that none of the image's blobs are left in the content store; otherwise a
"fresh" pull would only unpack (see ../shared/FACTS.md). Modes alternate within each
round. Results go to bench/results/agent_overhead.md.

    .venv/bin/python -m bench.agent_overhead [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from protos.containerd.services.content.v1 import content_pb2
from protos.containerd.services.images.v1 import images_pb2
from protos.fledged.agent.v1 import agent_pb2
from tests.testenv import PushedImage, TestEnv
from tests.testenv.agents import AgentProcess
from tests.testenv.runtime import NodeRuntime

RESULTS = Path(__file__).parent / "results" / "agent_overhead.md"
CASES = (
    ("1 MB, 1 layer", 1 << 20, 1),
    ("100 MB, 1 layer", 100 << 20, 1),
    ("100 MB, 10 layers", 100 << 20, 10),
)


@dataclass
class CaseResult:
    name: str
    direct: list[float]
    agent: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.agent) / statistics.median(self.direct)

    def summary(self) -> str:
        direct, agent = statistics.median(self.direct), statistics.median(self.agent)
        return f"direct {direct:.3f}s, agent {agent:.3f}s, ratio {self.ratio:.3f}"

    def row(self) -> str:
        direct = " ".join(f"{x:.2f}" for x in self.direct)
        agent = " ".join(f"{x:.2f}" for x in self.agent)
        return (
            f"| {self.name} | {statistics.median(self.direct):.3f} | "
            f"{statistics.median(self.agent):.3f} | {self.ratio:.3f} | {direct} | {agent} |"
        )


def wipe(node: NodeRuntime, image: PushedImage) -> None:
    """Deletes every record of the image with a synchronous GC; checks the blobs are gone."""
    records = node.ctr_images.List(
        images_pb2.ListImagesRequest(), metadata=node.metadata, timeout=30
    ).images
    for record in records:
        if (
            record.name.startswith(image.name)
            or record.target.digest == image.digest
            or record.name == image.config_digest
        ):
            node.ctr_images.Delete(
                images_pb2.DeleteImageRequest(name=record.name, sync=True),
                metadata=node.metadata,
                timeout=60,
            )
    left = []
    for digest in (*image.layer_digests, image.config_digest, image.digest):
        try:
            node.ctr_content.Info(
                content_pb2.InfoRequest(digest=digest), metadata=node.metadata, timeout=10
            )
            left.append(digest)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
    if left:
        raise RuntimeError(f"content store still holds {left}: the next pull would not be fresh")


def direct_pull(node: NodeRuntime, image: PushedImage) -> float:
    started = time.perf_counter()
    node.pull(image.ref, timeout=600)
    return time.perf_counter() - started


def agent_pull(agent: AgentProcess, image: PushedImage) -> float:
    started = time.perf_counter()
    events = agent.pull(agent_pb2.ImagePull(image=image.ref), timeout=600)
    elapsed = time.perf_counter() - started
    if events[-1].phase != agent_pb2.PHASE_SUCCEEDED:
        raise RuntimeError(f"agent pull failed: {events[-1]}")
    return elapsed


def idle_usage(pid: int, seconds: float = 10.0) -> tuple[float, float]:
    """RSS (MiB) and CPU share (%) of an idle process over `seconds`."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    before, start = cpu(), time.monotonic()
    time.sleep(seconds)
    share = 100 * (cpu() - before) / (time.monotonic() - start)
    rss = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return rss / 1024, share


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    env = TestEnv(nodes=1, with_docker=False)
    env.start()
    try:
        node = env.nodes[0]
        # With its Lease, as in a cluster: the Lease's client is part of what it holds.
        agent = env.start_agent(node, name="agent-bench")
        rss, cpu = idle_usage(agent.process.pid)
        registry = env.registry_client()
        results = []
        with NodeRuntime(node.runtime_endpoint) as cri:
            for name, size, layers in CASES:
                image = registry.push_image(
                    f"bench/{size}-{layers}", "v1", size=size, layers=layers
                )
                result = CaseResult(name, [], [])
                for round_ in range(args.rounds):
                    order = ("direct", "agent") if round_ % 2 == 0 else ("agent", "direct")
                    for mode in order:
                        wipe(cri, image)
                        if mode == "direct":
                            result.direct.append(direct_pull(cri, image))
                        else:
                            result.agent.append(agent_pull(agent, image))
                wipe(cri, image)
                print(f"{name}: {result.summary()}", flush=True)
                results.append(result)
        after, _ = idle_usage(agent.process.pid, seconds=2.0)
        write(results, args.rounds, rss, cpu, after)
    finally:
        env.cleanup()
    return 0


def write(results: list[CaseResult], rounds: int, rss: float, cpu: float, after: float) -> None:
    lines = [
        "# Agent overhead: pull through the agent / direct CRI PullImage",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}; "
        "containerd 2.x (native snapshotter), "
        "local docker-registry over loopback. Fresh content store before every pull "
        "(images deleted with a synchronous GC; blobs checked gone). "
        f"{rounds} rounds per mode, modes alternating; medians. Target: ratio <= 1.05.",
        "",
        "| image | direct CRI (median s) | through the agent (median s) | ratio "
        "| all direct | all agent |",
        "|---|---|---|---|---|---|",
    ]
    lines += [r.row() for r in results]
    lines += [
        "",
        f"Agent idle: RSS {rss:.1f} MiB, CPU {cpu:.2f}% of one core "
        "(10 s window, runtime health checked every 1 s, Lease renewed every 2 s); "
        f"RSS {after:.1f} MiB after the pulls.",
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print(RESULTS.read_text())


if __name__ == "__main__":
    sys.exit(main())
