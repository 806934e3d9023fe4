"""A pull Secret the coordinator cannot read (Forbidden: RBAC tightened; or the
apiserver failing) is an error of that cache's status, not an exception: it failed
every reconcile of the cache (no status, only retries in the log) and, at start, the
coordinator itself. An apiserver failing after a Secret was read once keeps the last
read. The apiserver here is a stand-in CoreV1Api: what is tested is the reading."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from kubernetes import client

from coordinator import kube
from coordinator.api import CacheList, CacheSpec
from coordinator.controller import Controller, ControllerConfig
from coordinator.kube import KubeWriter
from coordinator.nodes import NodeRegistry
from coordinator.plan import Settings


def _secret(name: str) -> client.V1Secret:
    auth = base64.b64encode(b"u:p").decode()
    config = json.dumps({"auths": {"reg.io": {"auth": auth}}}).encode()
    return client.V1Secret(
        metadata=client.V1ObjectMeta(name=name, resource_version="7"),
        type="kubernetes.io/dockerconfigjson",
        data={".dockerconfigjson": base64.b64encode(config).decode()},
    )


class _Core:
    """Answers per Secret name: a Secret, or an ApiException to raise."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers

    def read_namespaced_secret(self, name: str, namespace: str) -> client.V1Secret:
        answer = self.answers[name]
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, client.V1Secret)
        return answer


def _controller(answers: dict[str, Any]) -> Controller:
    api = client.ApiClient()
    writer = KubeWriter(api)
    writer._core = _Core(answers)  # type: ignore[assignment]
    registry = NodeRegistry(None, lambda node, delay: None, 60.0)  # type: ignore[arg-type]
    config = ControllerConfig(agent_namespace="ns", settings=Settings(), refresh_every=0)
    return Controller(api, writer, registry, config)


def test_a_forbidden_secret_is_a_status_error_and_the_others_still_log_in() -> None:
    ctrl = _controller(
        {"denied": client.ApiException(status=403, reason="Forbidden"), "ok": _secret("ok")}
    )
    spec = CacheSpec((CacheList(("reg.io/a:1",), ()),), pull_secrets=("denied", "ok"))
    auths, errors, versions = ctrl._credentials("ns", spec)
    assert errors == ["imagePullSecret 'denied' in namespace 'ns' cannot be read: 403 Forbidden"]
    assert [a.registry for a in auths] == ["reg.io"]
    assert versions == "denied=?,ok=7"


def test_an_apiserver_failing_after_a_read_keeps_the_last_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core = _Core({"ok": _secret("ok")})
    writer = KubeWriter(client.ApiClient())
    writer._core = core  # type: ignore[assignment]
    assert writer.get_secret("ns", "ok") is not None
    monkeypatch.setattr(kube, "SECRET_TTL", 0.0)  # due to be read again
    core.answers["ok"] = client.ApiException(status=503, reason="Service Unavailable")
    kept = writer.get_secret("ns", "ok")
    assert kept is not None
    assert kept.metadata is not None
    assert kept.metadata.resource_version == "7"
    core.answers["ok"] = client.ApiException(status=403, reason="Forbidden")
    with pytest.raises(client.ApiException):
        writer.get_secret("ns", "ok")  # refused is news: not hidden behind the last read
