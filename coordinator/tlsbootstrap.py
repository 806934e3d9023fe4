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
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from kubernetes import client

from common.pki import CertificateAuthority

from .agents import TlsConfig
from .coreapi import CoreV1

log = logging.getLogger(__name__)

CA_SECRET = "kube-fledged-ca"
AGENT_SECRET = "kube-fledged-agent-tls"
SERVER_NAME = "fledged-agent"
# Certificates are issued anew this long before they expire (they last 825 days).
RENEW_BEFORE = timedelta(days=90)
RENEW_EVERY = 12 * 3600.0  # seconds between the running coordinator's checks


def _decode(secret: client.V1Secret, key: str) -> bytes:
    return base64.b64decode((secret.data or {})[key])


def _create_or_read(
    core: CoreV1, namespace: str, name: str, data: dict[str, bytes]
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


def needs_issuing(ca: CertificateAuthority, ca_pem: bytes, cert_pem: bytes, now: datetime) -> str:
    """Why a certificate (with the CA bundle beside it) must be issued anew: "" if it
    is this CA's and not close to expiring. The agents' certificate was never renewed
    (every agent unreachable 825 days after install), and a CA Secret deleted and made
    again left it signed by a CA the coordinator no longer presents."""
    if ca_pem.strip() != ca.cert_pem.strip():
        return "its CA bundle is not the current CA"
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return "it was not issued by the current CA"
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return f"it expires at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    return ""


def _agent_secret(core: CoreV1, namespace: str, ca: CertificateAuthority) -> None:
    """The agents' Secret, made or issued anew when `needs_issuing` says so. The agents
    load a changed certificate without a restart (the kubelet updates the mounted
    Secret within a minute or two), so an expiring one is replaced in place."""
    try:
        secret = core.read_namespaced_secret(AGENT_SECRET, namespace)
    except client.ApiException as err:
        if err.status != 404:
            raise
        secret = None
    if secret is not None:
        held = secret.data or {}
        why = (
            needs_issuing(
                ca, _decode(secret, "ca.crt"), _decode(secret, "tls.crt"), datetime.now(UTC)
            )
            if {"ca.crt", "tls.crt", "tls.key"} <= set(held)
            else "it lacks ca.crt, tls.crt or tls.key"
        )
        if not why:
            return
    cert, key = ca.issue(SERVER_NAME, dns_names=(SERVER_NAME,), server=True)
    data = {"ca.crt": ca.cert_pem, "tls.crt": cert, "tls.key": key}
    if secret is None:
        _create_or_read(core, namespace, AGENT_SECRET, data)
        return
    log.warning(
        "issuing the agents' certificate anew (Secret %s/%s): %s", namespace, AGENT_SECRET, why
    )
    secret.data = {k: base64.b64encode(v).decode() for k, v in data.items()}
    try:  # on the version read: another replica that did it first wins
        core.replace_namespaced_secret(AGENT_SECRET, namespace, secret)
    except client.ApiException as err:
        if err.status == 403:  # an install whose RBAC predates renewal: keep serving
            log.error(
                "cannot issue the agents' certificate anew (%s): the coordinator needs "
                "`update` on Secret %s/%s",
                err.reason,
                namespace,
                AGENT_SECRET,
            )
        elif err.status != 409:
            raise


class AgentTls:
    """The mTLS material of the agent channel, kept current while the coordinator runs:
    `renew` issues the agents' certificate and this coordinator's client certificate
    anew before they expire (RENEW_BEFORE)."""

    def __init__(self, api: client.ApiClient, namespace: str, folder: Path | None = None) -> None:
        self._core = CoreV1(api)
        self._namespace = namespace
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix="fledged-tls-"))
            atexit.register(shutil.rmtree, folder, True)  # the client key leaves with us
        self.config = TlsConfig(
            folder / "ca.crt", folder / "tls.crt", folder / "tls.key", SERVER_NAME
        )

    def _ca(self) -> CertificateAuthority:
        try:
            ca_secret = self._core.read_namespaced_secret(CA_SECRET, self._namespace)
        except client.ApiException as err:
            if err.status != 404:
                raise
            fresh = CertificateAuthority.create("kube-fledged-agent-ca")
            ca_secret = _create_or_read(
                self._core,
                self._namespace,
                CA_SECRET,
                {"ca.crt": fresh.cert_pem, "ca.key": fresh.key_pem},
            )
        return CertificateAuthority.from_pem(
            _decode(ca_secret, "ca.crt"), _decode(ca_secret, "ca.key")
        )

    def renew(self) -> bool:
        """Makes sure the CA, the agents' Secret and this coordinator's client files are
        current (blocking). Returns whether the client files changed: channels dialled
        with the old ones should go."""
        ca = self._ca()
        _agent_secret(self._core, self._namespace, ca)
        files = self.config
        if files.cert.exists() and not needs_issuing(
            ca, files.ca.read_bytes(), files.cert.read_bytes(), datetime.now(UTC)
        ):
            return False
        cert, key = ca.issue("kube-fledged-coordinator", client=True)
        for path, data in ((files.ca, ca.cert_pem), (files.cert, cert), (files.key, key)):
            path.write_bytes(data)
        files.key.chmod(0o600)
        return True
