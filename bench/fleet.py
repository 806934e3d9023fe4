"""A simulated fleet of agents for the coordinator's scale benchmark.

One gRPC endpoint per simulated node, as real agents have one each: every node has a
loopback address of its own (127.x.y.z), so the coordinator opens one channel (one
connection) per node, 5,000 of them for 5,000 nodes. The nodes are spread over a
number of gRPC servers, each listening on one port of every loopback address (a
listener per node would need two descriptors per node here, over the machine's limit
at 10,000 nodes); a call's `x-fledged-node` header says which node it is for, as the
coordinator sends it to real agents. Pulls take a set time and obey the same per-node
concurrency cap as the real agent. The coordinator under test is the real one; only
the runtime behind the agents is simulated.

Each server accepts new calls one at a time on the simulator's single event loop, so
with too few of them the simulator, not the coordinator, delays a fleet-wide order:
20 servers for 5,000 nodes held the last orders back by several seconds; the scale
benchmark uses 250. (Before, 250 servers also meant 250 connections: 20 nodes shared
each endpoint, which understated what 5,000 real agents cost the coordinator.)
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from common.reference import parse
from common.wire import NODE_HEADER
from protos.fledged.agent.v1 import agent_pb2, agent_pb2_grpc

A = agent_pb2


@dataclass
class SimNodeState:
    images: dict[str, tuple[str, str, bool]] = field(
        default_factory=dict
    )  # ref -> id, digest, pinned
    slots: asyncio.Lock = field(default_factory=asyncio.Lock)  # held by two pulls at once
    pulls: int = 0
    ordered_at: float = 0.0  # time.monotonic() of the node's first order
    done_at: float = 0.0  # of its last simulated pull's end


@functools.lru_cache(maxsize=4096)
def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class FakeAgent(agent_pb2_grpc.AgentServicer):
    def __init__(self, pull_seconds: float) -> None:
        self.pull_seconds = pull_seconds
        self.nodes: dict[str, SimNodeState] = {}
        self.first_order = 0.0  # time.monotonic() of the first PullImages call, 0: none yet
        self.last_pull_end = 0.0  # of the last simulated pull to end

    def _node(self, context: Any) -> SimNodeState:
        name = dict(context.invocation_metadata()).get(NODE_HEADER, "")
        return self.nodes.setdefault(name, SimNodeState())

    async def PullImages(self, request: Any, context: Any) -> AsyncIterator[agent_pb2.PullEvent]:
        """Two pulls at a time per node, as the agent's default cap. As in the agent,
        pulls go on while their events are being sent: one task per batch runs them
        (not one per image, so the simulator stays light next to the coordinator it
        measures) and the stream sends what it reports."""
        node = self._node(context)
        self.first_order = self.first_order or time.monotonic()
        node.ordered_at = node.ordered_at or time.monotonic()
        detailed = request.progress != A.PROGRESS_OUTCOMES  # as the real agent decides
        events: asyncio.Queue[agent_pb2.PullEvent | None] = asyncio.Queue()
        task = asyncio.create_task(self._run_batch(node, list(request.images), detailed, events))
        try:
            while (event := await events.get()) is not None:
                yield event
        finally:
            task.cancel()

    async def _run_batch(
        self,
        node: SimNodeState,
        pulls: list[agent_pb2.ImagePull],
        detailed: bool,
        events: asyncio.Queue[agent_pb2.PullEvent | None],
    ) -> None:
        pending = []
        for pull in pulls:
            ref = parse(pull.image).canonical
            if pull.policy != A.PULL_POLICY_ALWAYS and ref in node.images:
                image_id, digest, _pinned = node.images[ref]
                events.put_nowait(
                    A.PullEvent(
                        image=pull.image,
                        phase=A.PHASE_ALREADY_PRESENT,
                        image_id=image_id,
                        repo_digest=digest,
                    )
                )
            else:
                pending.append((pull, ref))
        if detailed:
            for pull, _ in pending[2:]:
                events.put_nowait(A.PullEvent(image=pull.image, phase=A.PHASE_WAITING))
        for i in range(0, len(pending), 2):
            pair = pending[i : i + 2]
            async with node.slots:  # the node's two slots, whatever the batch
                if detailed:
                    for pull, _ in pair:
                        events.put_nowait(
                            A.PullEvent(
                                image=pull.image, phase=A.PHASE_PULLING, bytes_total=1 << 20
                            )
                        )
                await asyncio.sleep(self.pull_seconds)
            self.last_pull_end = node.done_at = time.monotonic()
            for pull, ref in pair:
                node.pulls += 1
                image_id, digest = _digest("id" + ref), _digest("manifest" + ref)
                node.images[ref] = (image_id, digest, pull.pin)
                events.put_nowait(
                    A.PullEvent(
                        image=pull.image,
                        phase=A.PHASE_SUCCEEDED,
                        image_id=image_id,
                        repo_digest=digest,
                        size=1 << 20,
                        bytes_done=1 << 20,
                        bytes_total=1 << 20,
                        pin=A.PIN_STATE_PINNED if pull.pin else A.PIN_STATE_UNPINNED,
                    )
                )
        events.put_nowait(None)

    async def ListImages(self, request: Any, context: Any) -> agent_pb2.ListImagesResponse:
        node = self._node(context)
        out = []
        for ref, (image_id, digest, pinned) in node.images.items():
            name = ref.rsplit(":", 1)[0]
            out.append(
                A.ImageInfo(
                    id=image_id,
                    repo_tags=[ref],
                    repo_digests=[f"{name}@{digest}"],
                    size=1 << 20,
                    pin=A.PIN_STATE_PINNED if pinned else A.PIN_STATE_UNPINNED,
                    pinned_by_fledged=pinned,
                )
            )
        return A.ListImagesResponse(images=out)

    async def GetNodeInfo(self, request: Any, context: Any) -> agent_pb2.NodeInfo:
        return A.NodeInfo(
            runtime_name="simulated", runtime_api="cri+containerd", pinning_supported=True
        )

    async def SetPinned(self, request: Any, context: Any) -> agent_pb2.SetPinnedResponse:
        node = self._node(context)
        results = []
        for image in request.images:
            ref = parse(image).canonical
            if ref in node.images:
                image_id, digest, _ = node.images[ref]
                node.images[ref] = (image_id, digest, request.pinned)
            results.append(
                A.PinResult(
                    image=image, pin=A.PIN_STATE_PINNED if request.pinned else A.PIN_STATE_UNPINNED
                )
            )
        return A.SetPinnedResponse(results=results)

    async def CancelPulls(self, request: Any, context: Any) -> agent_pb2.CancelPullsResponse:
        """No benchmark cancels: simulated pulls run to their end."""
        results = [A.CancelResult(image=i, was_running=False) for i in request.images]
        return A.CancelPullsResponse(results=results)

    async def RemoveImages(self, request: Any, context: Any) -> agent_pb2.RemoveImagesResponse:
        node = self._node(context)
        results = [
            A.RemoveResult(
                image=i, was_present=node.images.pop(parse(i).canonical, None) is not None
            )
            for i in request.images
        ]
        return A.RemoveImagesResponse(results=results)


ServerCredentials = Callable[[], grpc.ServerCredentials]


def mtls(directory: Path) -> tuple[ServerCredentials, list[str]]:
    """Certificates as --agent-tls-auto makes them: the agents' server credentials
    (client certificates required; made per server: the agent's reload their files at
    each handshake, and one such object serves one server), and the coordinator's CA,
    cert and key files."""
    from agent.server import tls_credentials
    from coordinator.tlsbootstrap import SERVER_NAME
    from tests.testenv.pki import CertificateAuthority

    ca = CertificateAuthority(directory)
    server = ca.issue("agent", SERVER_NAME, dns_names=(SERVER_NAME,), server=True)
    client = ca.issue("coordinator", "fledged-coordinator", client=True)
    credentials = functools.partial(tls_credentials, server.cert, server.key, ca.cert_path)
    return credentials, [str(ca.cert_path), str(client.cert), str(client.key)]


def node_address(index: int) -> str:
    """A loopback address of node `index`'s own (up to 16 million)."""
    index += 1
    return f"127.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}"


class Fleet:
    """`servers` gRPC servers in a thread of their own, sharing one FakeAgent, with
    `endpoints` endpoints over them (one per simulated node, each its own address)."""

    def __init__(
        self,
        servers: int,
        pull_seconds: float,
        endpoints: int,
        credentials: ServerCredentials | None = None,
    ) -> None:
        """`credentials`: serve TLS (as agents do under --agent-tls-auto) instead of
        plaintext."""
        self.agent = FakeAgent(pull_seconds)
        self._credentials = credentials
        self.servers = max(1, min(servers, endpoints))
        self.size = endpoints
        self.endpoints: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)

    def start(self) -> Fleet:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("fleet did not start")
        return self

    def endpoint_for(self, index: int) -> str:
        """Node `index`'s own endpoint."""
        return self.endpoints[index]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        servers = []
        ports = []
        for _ in range(self.servers):
            server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 10_000)])
            agent_pb2_grpc.add_AgentServicer_to_server(self.agent, server)
            address = "0.0.0.0:0"  # every loopback address
            ports.append(
                server.add_secure_port(address, self._credentials())
                if self._credentials is not None
                else server.add_insecure_port(address)
            )
            await server.start()
            servers.append(server)
        # node i on server i % servers: neighbours spread out
        self.endpoints = [f"{node_address(i)}:{ports[i % len(ports)]}" for i in range(self.size)]
        assert len(set(self.endpoints)) == self.size
        self._ready.set()
        await asyncio.Event().wait()
