"""mTLS material for the agent channel, created by the coordinator itself: no scripts
to run, no caBundle to patch.

On start the coordinator makes sure two Secrets exist in its namespace: the CA
(`kube-fledged-ca`, readable by the coordinator only) and the agents' server
certificate with the CA certificate (`kube-fledged-agent-tls`, mounted by the
DaemonSet). Whichever replica comes first creates them; the others read them. Each
coordinator then issues itself a client certificate from the CA.
"""

from __future__ import annotations

import atexit
import base64
import logging
import shutil
import tempfile
from pathlib import Path

from kubernetes import client

from common.pki import CertificateAuthority

from .agents import TlsConfig

log = logging.getLogger(__name__)

CA_SECRET = "kube-fledged-ca"
AGENT_SECRET = "kube-fledged-agent-tls"
SERVER_NAME = "fledged-agent"


def _decode(secret: client.V1Secret, key: str) -> bytes:
    return base64.b64decode((secret.data or {})[key])


def _create_or_read(
    core: client.CoreV1Api, namespace: str, name: str, data: dict[str, bytes]
) -> client.V1Secret:
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(
            name=name,
            namespace=namespace,
            labels={"app.kubernetes.io/name": "kube-fledged"},
        ),
        type="Opaque",
        data={k: base64.b64encode(v).decode() for k, v in data.items()},
    )
    try:
        created: client.V1Secret = core.create_namespaced_secret(namespace, body)
        log.info("created Secret %s/%s", namespace, name)
        return created
    except client.ApiException as err:
        if err.status != 409:
            raise
    return core.read_namespaced_secret(name, namespace)  # another replica was first


def ensure_agent_tls(
    api: client.ApiClient, namespace: str, workdir: Path | None = None
) -> TlsConfig:
    """The CA and agent Secrets (created if absent) and this coordinator's client files."""
    core = client.CoreV1Api(api)
    try:
        ca_secret = core.read_namespaced_secret(CA_SECRET, namespace)
    except client.ApiException as err:
        if err.status != 404:
            raise
        fresh = CertificateAuthority.create("kube-fledged-agent-ca")
        ca_secret = _create_or_read(
            core, namespace, CA_SECRET, {"ca.crt": fresh.cert_pem, "ca.key": fresh.key_pem}
        )
    ca = CertificateAuthority.from_pem(_decode(ca_secret, "ca.crt"), _decode(ca_secret, "ca.key"))
    try:
        core.read_namespaced_secret(AGENT_SECRET, namespace)
    except client.ApiException as err:
        if err.status != 404:
            raise
        cert, key = ca.issue(SERVER_NAME, dns_names=(SERVER_NAME,), server=True)
        _create_or_read(
            core, namespace, AGENT_SECRET, {"ca.crt": ca.cert_pem, "tls.crt": cert, "tls.key": key}
        )
    cert, key = ca.issue("kube-fledged-coordinator", client=True)
    folder = workdir
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="fledged-tls-"))
        atexit.register(shutil.rmtree, folder, True)  # the client key leaves with us
    paths = {"ca.crt": ca.cert_pem, "tls.crt": cert, "tls.key": key}
    for name, data in paths.items():
        (folder / name).write_bytes(data)
    (folder / "tls.key").chmod(0o600)
    return TlsConfig(folder / "ca.crt", folder / "tls.crt", folder / "tls.key", SERVER_NAME)
