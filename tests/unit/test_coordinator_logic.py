"""Status composition, pull-secret parsing, the spec parser, Lease reading and the
work queue, as plain functions."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from common.reference import parse
from coordinator.api import CacheList, CacheSpec, SpecError, parse_spec
from coordinator.controller import agent_from_lease
from coordinator.desired import CacheView
from coordinator.model import observed
from coordinator.pairs import PairPhase, PairState
from coordinator.projection import CacheProjection
from coordinator.secrets import SecretError, credentials_for, parse_secret
from coordinator.status import (
    MAX_FAILED_NODES_PER_IMAGE,
    MAX_IMAGE_EVENTS,
    build_status,
    comparable,
    events_for,
)
from coordinator.workqueue import WorkQueue

NOW = "2026-11-24T00:00:00Z"
SPEC = CacheSpec((CacheList(("r.io/a:1",), ()),), ())


def view(**kw: object) -> CacheView:
    return CacheView(key="ns/c", generation=3, spec=SPEC, **kw)  # type: ignore[arg-type]


def plan_of(*pairs: tuple[str, PairState]) -> CacheProjection:
    return CacheProjection.of_pairs(pairs)


def test_a_new_cache_in_progress_reads_like_kube_fledged() -> None:
    status = build_status(
        view(),
        plan_of(("n1", PairState("r.io/a:1", PairPhase.PULLING, bytes_done=1, bytes_total=4))),
        {},
        NOW,
    )
    assert (status["status"], status["reason"]) == ("Processing", "ImageCacheCreate")
    assert status["message"].startswith("Images are being pulled")
    assert status["startTime"] == NOW
    assert "completionTime" not in status
    assert status["nodes"] == [
        {
            "node": "n1",
            "ready": 0,
            "total": 1,
            "pulling": ["r.io/a:1"],
            "bytesDone": 1,
            "bytesTotal": 4,
        }
    ]
    ready, progressing = status["conditions"]
    assert (ready["type"], ready["status"], progressing["status"]) == ("Ready", "False", "True")


def test_success_failure_and_edit_reasons() -> None:
    ok = build_status(
        view(), plan_of(("n1", PairState("r.io/a:1", PairPhase.READY, digest="sha256:x"))), {}, NOW
    )
    assert (ok["status"], ok["reason"], ok["ready"], ok["imagesReady"]) == (
        "Succeeded",
        "ImagesPulledSuccessfully",
        "1/1",
        "1/1",
    )
    assert ok["images"] == [
        {"image": "r.io/a:1", "nodesReady": 1, "nodesTotal": 1, "digest": "sha256:x"}
    ]
    some_nodes = build_status(
        view(),
        plan_of(
            ("n1", PairState("r.io/a:1", PairPhase.READY)),
            ("n2", PairState("r.io/a:1", PairPhase.FAILED, "NotFound", "gone")),
        ),
        {},
        NOW,
    )
    assert some_nodes["reason"] == "ImagePullFailedOnSomeNodes"
    assert some_nodes["failures"] == {
        "r.io/a:1": [{"node": "n2", "reason": "NotFound", "message": "gone"}]
    }
    edited = build_status(
        view(),
        plan_of(("n1", PairState("r.io/a:1", PairPhase.PENDING))),
        {"observedGeneration": 2, "startTime": NOW},
        NOW,
    )
    assert edited["reason"] == "ImageCacheUpdate"
    retried = build_status(  # the same generation again: a retry after backoff, not an edit
        view(),
        plan_of(("n1", PairState("r.io/a:1", PairPhase.PENDING))),
        {**some_nodes, "observedGeneration": 3},
        NOW,
    )
    assert retried["reason"] == "ImageCacheRefresh"


def test_failures_are_bounded_per_image() -> None:
    pairs = [(f"n{i}", PairState("r.io/a:1", PairPhase.FAILED, "NotFound", "x")) for i in range(50)]
    status = build_status(view(), plan_of(*pairs), {}, NOW)
    entries = status["failures"]["r.io/a:1"]
    assert len(entries) == MAX_FAILED_NODES_PER_IMAGE + 1
    assert entries[-1]["message"] == f"and {50 - MAX_FAILED_NODES_PER_IMAGE} more nodes"
    assert status["reason"] == "ImagePullFailedForSomeImages"


def test_transition_events_are_sent_once_and_aggregate_per_image() -> None:
    pairs = [
        (f"n{i}", PairState("r.io/a:1", PairPhase.FAILED, "Unauthorized", "401")) for i in range(3)
    ]
    plan = plan_of(*pairs)
    new = build_status(view(), plan, {}, NOW)
    counts = plan.tally.counts()
    events = events_for({"status": "Processing", "reason": "ImageCacheCreate"}, new, counts)
    assert [(e.type, e.reason) for e in events] == [
        ("Warning", "ImagePullFailedForSomeImages"),
        ("Warning", "ImagePullFailed"),
    ]
    assert "failed on 3 of 3 nodes" in events[1].message
    assert events_for(new, new, counts) == []
    assert comparable(new) == comparable({**new, "startTime": "other"})


def test_a_cache_with_many_failed_images_sends_a_bounded_number_of_events() -> None:
    pairs = [
        ("n1", PairState(f"r.io/a{i:03d}:1", PairPhase.FAILED, "NotFound", "x")) for i in range(40)
    ]
    plan = plan_of(*pairs)
    new = build_status(view(), plan, {}, NOW)
    events = events_for({"status": "Processing"}, new, plan.tally.counts())
    assert len(events) == 1 + 1 + MAX_IMAGE_EVENTS
    assert events[1].message.startswith("30 more images failed")


def config_secret(
    entries: dict[str, dict[str, str]], kind: str = "kubernetes.io/dockerconfigjson"
) -> dict[str, str]:
    doc = {"auths": entries} if kind.endswith("json") else entries
    key = ".dockerconfigjson" if kind.endswith("json") else ".dockercfg"
    return {key: base64.b64encode(json.dumps(doc).encode()).decode()}


def test_pull_secrets_match_registries_as_the_kubelet_does() -> None:
    auth = base64.b64encode(b"hub-user:hub-pass").decode()
    entries = parse_secret(
        "regcred",
        "kubernetes.io/dockerconfigjson",
        config_secret(
            {
                "https://index.docker.io/v1/": {"auth": auth},
                "reg.io:5000": {"username": "u", "password": "p"},
                "reg.io:5000/team": {"username": "team", "password": "t"},
            }
        ),
    )
    hub = credentials_for(parse("nginx"), entries)
    assert [(c.username, c.password) for c in hub] == [("hub-user", "hub-pass")]
    # Docker Hub under its API host's name is its own image name, the same registry
    hub_alias = credentials_for(parse("registry-1.docker.io/library/nginx"), entries)
    assert [c.username for c in hub_alias] == ["hub-user"]
    team = credentials_for(parse("reg.io:5000/team/app:v1"), entries)
    assert [c.username for c in team] == ["team", "u"]  # most specific first
    assert credentials_for(parse("other.io/x"), entries) == []
    legacy = parse_secret(
        "old",
        "kubernetes.io/dockercfg",
        config_secret({"reg.io": {"auth": auth}}, "kubernetes.io/dockercfg"),
    )
    assert legacy[0].registry == "reg.io"


def test_a_wildcard_entry_serves_the_registry_it_matches_after_named_ones() -> None:
    entries = parse_secret(
        "regcred",
        "kubernetes.io/dockerconfigjson",
        config_secret(
            {
                "*.azurecr.io": {"username": "any", "password": "p"},
                "team.azurecr.io": {"username": "named", "password": "p"},
                "*.azurecr.io/ns": {"username": "any-ns", "password": "p"},
            }
        ),
    )
    found = credentials_for(parse("team.azurecr.io/ns/app:v1"), entries)
    assert [c.username for c in found] == ["named", "any-ns", "any"]
    # addressed to the host it matched (containerd drops credentials for another host)
    assert [c.server_address for c in found] == [
        "team.azurecr.io",
        "team.azurecr.io",
        "team.azurecr.io",
    ]
    assert credentials_for(parse("a.b.azurecr.io/app"), entries) == []


@pytest.mark.parametrize(
    ("kind", "data", "complaint"),
    [
        ("Opaque", {}, "must be"),
        ("kubernetes.io/dockerconfigjson", {}, "has no data"),
        (
            "kubernetes.io/dockerconfigjson",
            {".dockerconfigjson": "!!notbase64"},
            "valid docker config",
        ),
        (  # the reported defect: a non-ASCII auth field made the reconcile fail
            "kubernetes.io/dockerconfigjson",
            config_secret({"reg.io": {"auth": "dXNlcjpwYXNz\u00e9"}}),
            "bad auth field",
        ),
        (
            "kubernetes.io/dockerconfigjson",
            {".dockerconfigjson": "w6k="},  # base64 of a lone UTF-8 "é"
            "valid docker config",
        ),
        (
            "kubernetes.io/dockerconfigjson",
            {".dockerconfigjson": "4pyT"},  # base64 of "✓"
            "valid docker config",
        ),
        (
            "kubernetes.io/dockerconfigjson",
            {".dockerconfigjson": base64.b64encode(b"[1, 2]").decode()},
            "JSON object",
        ),
        (
            "kubernetes.io/dockerconfigjson",
            {".dockerconfigjson": "c2VjcmV0\u00e9"},  # not ASCII at all
            "valid docker config",
        ),
        (
            "kubernetes.io/dockercfg",
            config_secret({"reg.io": {"auth": "//79"}}, "kubernetes.io/dockercfg"),
            "bad auth field",  # base64 of bytes that are not UTF-8
        ),
    ],
)
def test_unusable_pull_secrets_say_why_without_their_content(
    kind: str, data: dict[str, str], complaint: str
) -> None:
    with pytest.raises(SecretError, match=complaint) as err:
        parse_secret("regcred", kind, data)
    assert "regcred" in str(err.value)


def test_no_secret_content_makes_the_parser_fail_other_than_with_a_secret_error() -> None:
    """Every field of a Secret is untrusted: random documents, values and encodings."""
    rng = random.Random(7)
    alphabet = 'aZ09+/=:é✓\x00\\"{}[] '

    def junk(depth: int = 0) -> Any:
        kind = rng.randrange(7 if depth < 3 else 4)
        if kind == 0:
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        if kind == 1:
            return rng.choice([None, True, 0, -1.5, 10**30])
        if kind == 2:
            return base64.b64encode(rng.randbytes(rng.randrange(16))).decode()
        if kind == 3:
            return "user:" + "".join(rng.choice(alphabet) for _ in range(4))
        if kind == 4:
            return [junk(depth + 1) for _ in range(rng.randrange(3))]
        keys = ["auths", "auth", "username", "password", "identitytoken", "reg.io", "é"]
        return {rng.choice(keys): junk(depth + 1) for _ in range(rng.randrange(4))}

    refusals = []
    for _ in range(3000):
        kind = rng.choice(["kubernetes.io/dockerconfigjson", "kubernetes.io/dockercfg"])
        key = ".dockerconfigjson" if kind.endswith("json") else ".dockercfg"
        doc = junk()
        if rng.random() < 0.5:
            doc = {"auths": {"reg.io": junk(1)}} if rng.random() < 0.5 else {"reg.io": junk(1)}
        raw = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
        value = base64.b64encode(raw).decode() if rng.random() < 0.9 else junk()
        try:
            parse_secret("fuzzed", kind, {key: str(value)})
        except SecretError as err:
            refusals.append(str(err))
    assert refusals
    assert all("fuzzed" in message for message in refusals)


def test_the_spec_parser_reports_what_to_fix() -> None:
    ok = parse_spec(
        {"spec": {"cacheSpec": [{"images": ["a"], "nodeSelector": {"z": "1"}, "pin": False}]}}
    )
    assert ok.lists[0] == CacheList(("a",), (("z", "1"),), False)
    for spec, complaint in (
        ({}, "non-empty list"),
        ({"cacheSpec": [{"images": ["a", "docker.io/library/a:latest"]}]}, "twice"),
        ({"cacheSpec": [{"images": ["UPPER"]}]}, "lowercase"),
    ):
        with pytest.raises(SpecError, match=complaint):
            parse_spec({"spec": spec})


def _lease(renew: datetime, acquired: str = "t0") -> dict[str, Any]:
    return {
        "metadata": {
            "labels": {"kubefledged.io/node": "n1"},
            "annotations": {"kubefledged.io/agent-endpoint": "10.0.0.5:9445"},
        },
        "spec": {
            "holderIdentity": "n1",
            "renewTime": renew.isoformat().replace("+00:00", "Z"),
            "acquireTime": acquired,
            "leaseDurationSeconds": 10,
        },
    }


def test_agent_leases_are_judged_by_when_renewals_are_seen_not_by_the_nodes_clock() -> None:
    now = datetime(2026, 12, 2, tzinfo=UTC)
    behind = now - timedelta(minutes=5)  # the node's clock is five minutes slow
    first = agent_from_lease(_lease(behind))
    assert first is not None
    seen = observed(first, None, now.timestamp())
    assert not seen.alive(now.timestamp())  # first sight: dated by its renewTime
    renewal = agent_from_lease(_lease(behind + timedelta(seconds=2)))
    assert renewal is not None
    later = now.timestamp() + 2
    renewed_seen = observed(renewal, seen, later)
    assert renewed_seen.expires == later + 10  # a renewal seen lasts a duration from now
    again = observed(renewal, renewed_seen, later + 8)  # the same record again (a resync)
    assert again.expires == later + 10
    assert not again.alive(later + 11)  # renewals stopped: gone a duration after the last
    ahead = agent_from_lease(_lease(now + timedelta(minutes=5)))  # a clock minutes fast
    assert ahead is not None
    assert observed(ahead, None, now.timestamp()).expires == now.timestamp() + 10
    other = agent_from_lease(_lease(behind, acquired="t1"))  # a new process: first sight
    assert other is not None
    assert not observed(other, renewed_seen, later).alive(later)


def test_agent_leases_give_endpoint_and_expiry() -> None:
    lease = {
        "metadata": {
            "labels": {"kubefledged.io/node": "n1"},
            "annotations": {"kubefledged.io/agent-endpoint": "10.0.0.5:9445"},
        },
        "spec": {
            "holderIdentity": "n1",
            "renewTime": "2026-11-24T00:00:00.000000Z",
            "leaseDurationSeconds": 40,
        },
    }
    agent = agent_from_lease(lease)
    assert agent is not None
    assert (agent.node, agent.endpoint, agent.tls) == ("n1", "10.0.0.5:9445", False)
    assert agent.alive(agent.expires - 1)
    assert not agent.alive(agent.expires + 1)
    assert agent_from_lease({"metadata": {}, "spec": {}}) is None


async def test_the_work_queue_dedups_requeues_dirty_keys_and_delays() -> None:
    queue: WorkQueue[str] = WorkQueue(base_delay=0.01)
    queue.add("a")
    queue.add("a")
    assert len(queue) == 1
    key = await queue.get()
    queue.add("a")  # while processing: once more afterwards, not concurrently
    assert len(queue) == 0
    queue.done(key)  # type: ignore[arg-type]
    assert await queue.get() == "a"
    queue.done("a")
    queue.add_after("b", 0.05)
    assert len(queue) == 0
    assert await asyncio.wait_for(queue.get(), 1) == "b"
    queue.shutdown()
    assert await queue.get() is None


async def test_adding_a_key_now_drops_its_pending_delayed_add() -> None:
    """A node's last answer plans it at once; the gather timer its earlier answers set
    would plan it once more for nothing (a node plan arms its own retry again)."""
    queue: WorkQueue[str] = WorkQueue()
    queue.add_after("n1", 0.05)
    queue.add_after("n2", 0.05)
    queue.add_now("n1")
    assert await queue.get() == "n1"
    queue.done("n1")
    assert await asyncio.wait_for(queue.get(), 1) == "n2"
    queue.done("n2")
    await asyncio.sleep(0.1)
    assert len(queue) == 0  # n1's timer is gone: planned once, not twice
