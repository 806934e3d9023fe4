"""Issuing the agents' certificate anew needs `update` on its Secret, which installs
made before renewal existed do not grant: the coordinator must keep starting and
serving with the certificate it has, and say what it lacks. The apiserver here is a
stand-in: the rest of renewal is tested against the real one (tests/coordinator)."""

from __future__ import annotations

import base64
import logging
from datetime import timedelta
from typing import Any

import pytest
from kubernetes import client

from common.pki import CertificateAuthority
from coordinator.tlsbootstrap import AGENT_SECRET, SERVER_NAME, _agent_secret


class _Core:
    def __init__(self, secret: client.V1Secret) -> None:
        self.secret = secret

    def read_namespaced_secret(self, name: str, namespace: str) -> client.V1Secret:
        return self.secret

    def replace_namespaced_secret(self, *args: Any) -> None:
        raise client.ApiException(status=403, reason="Forbidden")


def test_a_renewal_the_rbac_forbids_keeps_the_certificate_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ca = CertificateAuthority.create("ca")
    cert, key = ca.issue(SERVER_NAME, server=True, validity=timedelta(days=10))
    files = {"ca.crt": ca.cert_pem, "tls.crt": cert, "tls.key": key}
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name=AGENT_SECRET, resource_version="1"),
        data={k: base64.b64encode(v).decode() for k, v in files.items()},
    )
    with caplog.at_level(logging.ERROR):
        _agent_secret(_Core(secret), "kube-fledged", ca)  # type: ignore[arg-type]
    assert "needs `update` on Secret kube-fledged/kube-fledged-agent-tls" in caplog.text
