"""The agent channel under mTLS made by the coordinator itself (--agent-tls-auto)."""

from __future__ import annotations

import base64

import grpc
import pytest
from grpc_health.v1 import health_pb2
from kubernetes import client

from coordinator.tlsbootstrap import AGENT_SECRET, CA_SECRET
from protos.fledged.agent.v1 import agent_pb2, agent_pb2_grpc
from tests.conftest import unique
from tests.coordinator.helpers import apply, cache_manifest, wait_for
from tests.testenv import TestEnv
from tests.testenv.agents import CoordinatorProcess
from tests.testenv.containerd import Containerd
from tests.testenv.nodes import node_labels, register_node
from tests.testenv.procs import free_port


def test_the_coordinator_makes_the_mtls_material_and_caches_through_it(
    testenv: TestEnv, coordinator: CoordinatorProcess, namespace: str
) -> None:
    core = client.CoreV1Api(testenv.api_client())
    agent_ns = unique("fledged-tls")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=agent_ns)))
    tls_coordinator = testenv.start_coordinator(
        ("--agent-tls-auto", f"--agent-namespace={agent_ns}", f"--watch-namespace={namespace}"),
        name=f"coordinator-{agent_ns}",
    )
    node = unique("tls-node")
    containerd = Containerd(testenv.workdir, node, [testenv.registry.host])
    containerd.start()
    try:
        secret = core.read_namespaced_secret(AGENT_SECRET, agent_ns)
        assert set(secret.data or {}) == {"ca.crt", "tls.crt", "tls.key"}
        ca_secret = core.read_namespaced_secret(CA_SECRET, agent_ns)
        assert set(ca_secret.data or {}) == {"ca.crt", "ca.key"}
        folder = testenv.workdir / agent_ns
        folder.mkdir()
        for key, value in (secret.data or {}).items():  # as the DaemonSet's Secret volume would
            (folder / key).write_bytes(base64.b64decode(value))
        health_port = free_port()
        register_node(core, node, node_labels(node, {"fledged.test/pool": node}))
        agent = testenv.start_agent(
            node_name=node,
            runtime_endpoint=containerd.endpoint,
            namespace=agent_ns,
            name=f"agent-{node}",
            extra_args=(
                f"--tls-cert={folder / 'tls.crt'}",
                f"--tls-key={folder / 'tls.key'}",
                f"--tls-client-ca={folder / 'ca.crt'}",
                f"--health-listen=127.0.0.1:{health_port}",
            ),
        )
        # The kubelet's probe port answers in plaintext; the agent port refuses it.
        assert agent.health() == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(agent.address) as plain, pytest.raises(grpc.RpcError):
            agent_pb2_grpc.AgentStub(plain).GetNodeInfo(agent_pb2.GetNodeInfoRequest(), timeout=5)

        image = testenv.registry_client().push_image(unique("ic/tls"), "v1")
        apply(
            testenv,
            cache_manifest(
                "over-mtls",
                namespace,
                [{"images": [image.ref], "nodeSelector": {"fledged.test/pool": node}}],
            ),
        )
        # Only the mTLS coordinator knows this agent (its Lease is in agent_ns): the
        # image on the node's containerd proves the orders went over mTLS.
        wait_for(
            "the image on the mTLS node",
            lambda: _held(containerd, image.ref),
            timeout=40,
        )
        log = tls_coordinator.process.log_path.read_text()
        assert "created Secret" in log
    finally:
        tls_coordinator.stop()
        containerd.stop()
        core.delete_node(node)


def _held(containerd: Containerd, ref: str) -> bool:
    from tests.testenv.runtime import NodeRuntime

    with NodeRuntime(containerd.endpoint) as cri:
        status = cri.status(ref)
        return status is not None and status.pinned
