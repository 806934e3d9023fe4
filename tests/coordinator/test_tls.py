"""The agent channel under mTLS made by the coordinator itself (--agent-tls-auto)."""

from __future__ import annotations

import asyncio
import base64
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from kubernetes import client

from common.pki import CertificateAuthority
from coordinator.agents import AgentPool, TlsConfig
from coordinator.tlsbootstrap import AGENT_SECRET, CA_SECRET, SERVER_NAME, AgentTls, needs_issuing
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


def _secret_files(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, bytes]:
    secret = core.read_namespaced_secret(name, namespace)
    return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}


def _version(core: client.CoreV1Api, namespace: str) -> str:
    meta = core.read_namespaced_secret(AGENT_SECRET, namespace).metadata
    assert meta is not None
    return str(meta.resource_version)


def _replace_agent_secret(core: client.CoreV1Api, namespace: str, files: dict[str, bytes]) -> None:
    secret = core.read_namespaced_secret(AGENT_SECRET, namespace)
    secret.data = {k: base64.b64encode(v).decode() for k, v in files.items()}
    core.replace_namespaced_secret(AGENT_SECRET, namespace, secret)


def test_the_agents_certificate_is_issued_anew_before_it_expires_or_when_its_ca_changed(
    testenv: TestEnv, tmp_path: Path
) -> None:
    """The agents' certificate was made once and never renewed: 825 days after install
    every agent became unreachable; and a CA Secret deleted and made again left it
    signed by a CA the coordinator no longer trusts. Against the real apiserver."""
    core = client.CoreV1Api(testenv.api_client())
    namespace = unique("fledged-renew")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    tls = AgentTls(testenv.api_client(), namespace, tmp_path)
    assert tls.renew()  # made: the CA, the agents' Secret, our client files
    ca_files = _secret_files(core, namespace, CA_SECRET)
    ca = CertificateAuthority.from_pem(ca_files["ca.crt"], ca_files["ca.key"])
    now = datetime.now(UTC)
    first = _secret_files(core, namespace, AGENT_SECRET)
    assert not needs_issuing(ca, first["ca.crt"], first["tls.crt"], now)
    version = _version(core, namespace)
    assert not tls.renew()  # all current: nothing written
    assert _version(core, namespace) == version

    other = CertificateAuthority.create("someone-else")
    cert, key = other.issue(SERVER_NAME, dns_names=(SERVER_NAME,), server=True)
    _replace_agent_secret(
        core, namespace, {"ca.crt": other.cert_pem, "tls.crt": cert, "tls.key": key}
    )
    tls.renew()
    renewed = _secret_files(core, namespace, AGENT_SECRET)
    assert renewed["ca.crt"] == ca.cert_pem
    assert not needs_issuing(ca, renewed["ca.crt"], renewed["tls.crt"], now)

    cert, key = ca.issue(
        SERVER_NAME, dns_names=(SERVER_NAME,), server=True, validity=timedelta(days=30)
    )
    _replace_agent_secret(core, namespace, {"ca.crt": ca.cert_pem, "tls.crt": cert, "tls.key": key})
    assert "expires" in needs_issuing(ca, ca.cert_pem, cert, now)
    tls.renew()
    later = _secret_files(core, namespace, AGENT_SECRET)
    assert later["tls.crt"] != cert
    assert not needs_issuing(ca, later["ca.crt"], later["tls.crt"], now)

    # our own client certificate, close to expiring, is issued anew too
    cert, key = ca.issue("kube-fledged-coordinator", client=True, validity=timedelta(days=10))
    tls.config.cert.write_bytes(cert)
    tls.config.key.write_bytes(key)
    assert tls.renew()
    assert not needs_issuing(ca, tls.config.ca.read_bytes(), tls.config.cert.read_bytes(), now)
    core.delete_namespace(namespace)


def test_an_agent_serves_a_certificate_issued_anew_without_a_restart(
    testenv: TestEnv, tmp_path: Path
) -> None:
    """The kubelet updates a mounted Secret in place; the agent read its TLS files once,
    so a renewed certificate (or a new CA) reached it only with a restart of every
    agent pod. It reads them again at each new connection."""
    first, second = CertificateAuthority.create("ca-1"), CertificateAuthority.create("ca-2")
    served = tmp_path / "agent"
    served.mkdir()

    def mount(ca: CertificateAuthority) -> None:
        """As the kubelet's atomic writer does: each file swapped in whole."""
        cert, key = ca.issue(SERVER_NAME, dns_names=(SERVER_NAME,), server=True)
        for name, data in (("ca.crt", ca.cert_pem), ("tls.key", key), ("tls.crt", cert)):
            (served / f".{name}").write_bytes(data)
            os.replace(served / f".{name}", served / name)

    def client_files(ca: CertificateAuthority, name: str) -> TlsConfig:
        folder = tmp_path / name
        folder.mkdir()
        cert, key = ca.issue("kube-fledged-coordinator", client=True)
        for file, data in (("ca.crt", ca.cert_pem), ("tls.crt", cert), ("tls.key", key)):
            (folder / file).write_bytes(data)
        return TlsConfig(folder / "ca.crt", folder / "tls.crt", folder / "tls.key", SERVER_NAME)

    async def lists(tls: TlsConfig, endpoint: str) -> bool:
        pool = AgentPool(tls)
        try:
            await pool.get(endpoint).list_images("renew-node")
            return True
        except grpc.RpcError:
            return False
        finally:
            await pool.close()

    mount(first)
    agent = testenv.start_agent(
        node_name="renew-node",
        runtime_endpoint=testenv.nodes[0].runtime_endpoint,
        lease=False,
        name=unique("agent-renew"),
        extra_args=(
            f"--tls-cert={served / 'tls.crt'}",
            f"--tls-key={served / 'tls.key'}",
            f"--tls-client-ca={served / 'ca.crt'}",
        ),
    )
    try:
        old, new = client_files(first, "old"), client_files(second, "new")
        assert asyncio.run(lists(old, agent.address))
        assert not asyncio.run(lists(new, agent.address))
        mount(second)
        assert asyncio.run(lists(new, agent.address))  # no restart
        assert not asyncio.run(lists(old, agent.address))
        assert "serving the new ones" in agent.process.log_tail()
    finally:
        agent.stop()
