"""A pull Secret the coordinator cannot read (Forbidden: RBAC tightened; or the
apiserver failing) is an error of that cache's status, not an exception: it failed
every reconcile of the cache (no status, only retries in the log) and, at start, the
coordinator itself. An apiserver failing after a Secret was read once keeps the last
read. The apiserver here is a stand-in CoreV1Api: what is tested is the reading."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
import urllib3
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


@pytest.mark.parametrize(
    "failure",
    [
        client.ApiException(status=429, reason="Too Many Requests"),
        urllib3.exceptions.ReadTimeoutError(None, "/api/v1/secrets", "read timed out"),  # type: ignore[arg-type]
        urllib3.exceptions.ProtocolError("Connection aborted."),
    ],
)
def test_a_throttled_or_timed_out_read_keeps_the_last_read(
    monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    """Priority and fairness answers 429 under load, and a read can time out: no news
    about the Secret. They flipped the cache to Failed (ImagePullSecretInvalid) and sent
    its pulls without credentials until the next read."""
    core = _Core({"ok": _secret("ok")})
    writer = KubeWriter(client.ApiClient())
    writer._core = core  # type: ignore[assignment]
    assert writer.get_secret("ns", "ok") is not None
    monkeypatch.setattr(kube, "SECRET_TTL", 0.0)
    core.answers["ok"] = failure
    kept = writer.get_secret("ns", "ok")
    assert kept is not None
    assert kept.metadata is not None
    assert kept.metadata.resource_version == "7"


def _nested_config(depth: int) -> client.V1Secret:
    doc = '{"auths":' + "[" * depth + "]" * depth + "}"
    return client.V1Secret(
        metadata=client.V1ObjectMeta(name="deep", resource_version="3"),
        type="kubernetes.io/dockerconfigjson",
        data={".dockerconfigjson": base64.b64encode(doc.encode()).decode()},
    )


async def test_a_secret_nested_too_deep_is_a_status_error_not_a_crash_at_start() -> None:
    """JSON nested deeper than the parser's stack raises RecursionError, not ValueError:
    it escaped the Secret's parsing, and at start ended the coordinator (every start:
    a crash loop, every cache unserved) for one tenant's Secret of 200 KB."""
    ctrl = _controller({"deep": _nested_config(100_000), "ok": _secret("ok")})
    spec = CacheSpec((CacheList(("reg.io/a:1",), ()),), pull_secrets=("deep", "ok"))
    auths, errors, _ = ctrl._credentials("ns", spec)
    assert errors == ["secret 'deep' does not hold valid docker config JSON"]
    assert [a.registry for a in auths] == ["reg.io"]
    ctrl.caches.store["ns/c"] = {
        "metadata": {"namespace": "ns", "name": "c", "uid": "u", "generation": 1},
        "spec": {"cacheSpec": [{"images": ["reg.io/a:1"]}], "imagePullSecrets": [{"name": "deep"}]},
    }
    await ctrl._prime()
    assert ctrl.desired.forms["ns/c"].view.spec is not None


async def test_a_cache_whose_shares_fail_at_start_holds_what_it_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever else goes wrong with one cache at start, the others are served, and it
    keeps its lists on the nodes (no share would lift its pins) until its reconcile."""
    ctrl = _controller({})
    applied = {"appliedLists": [{"images": ["reg.io/held:1"]}]}
    for name in ("bad", "good"):
        ctrl.caches.store[f"ns/{name}"] = {
            "metadata": {"namespace": "ns", "name": name, "uid": name, "generation": 1},
            "spec": {"cacheSpec": [{"images": [f"reg.io/{name}:1"]}]},
            "status": applied,
        }
    share = ctrl._share

    async def failing(key: str, obj: dict[str, Any]) -> Any:
        if key == "ns/bad":
            raise RuntimeError("unexpected")
        return await share(key, obj)

    monkeypatch.setattr(ctrl, "_share", failing)
    await ctrl._prime()
    held = ctrl.desired.forms["ns/bad"].view
    assert held.spec is None
    assert [cl.images for cl in held.applied] == [("reg.io/held:1",)]
    assert ctrl.desired.forms["ns/good"].view.spec is not None


def test_secrets_no_cache_reads_any_more_are_not_kept_in_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each Secret read stayed in memory (its credentials with it) for the process's
    life, though the cache naming it was long gone."""
    core = _Core({"old": _secret("old"), "new": _secret("new")})
    writer = KubeWriter(client.ApiClient())
    writer._core = core  # type: ignore[assignment]
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    writer.get_secret("ns", "old")
    clock[0] += kube.SECRET_KEEP + 1
    writer.get_secret("ns", "new")
    assert set(writer._secrets) == {("ns", "new")}
