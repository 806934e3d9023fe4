"""The agent's pure decisions: error categories, flags, the disk guard, progress sums."""

from __future__ import annotations

import asyncio

import pytest

from agent.config import DiskThreshold, parse_args
from agent.errors import Category, classify_message
from agent.puller import disk_refusal
from agent.runtime import Credentials, ImageRecord, PinState
from agent.runtime.containerd_progress import (
    PullProgressTracker,
    manifest_blobs,
    pick_platform_manifest,
    tracking,
)
from agent.runtime.cri import auth_config, honours_pins
from agent.runtime.docker import LayerProgress, docker_ref
from common.reference import parse
from common.units import parse_duration, parse_size


@pytest.mark.parametrize(
    ("message", "category"),
    [
        (
            'failed to resolve reference "r/x:v1": r/x:v1: not found',
            Category.NOT_FOUND,
        ),
        ("manifest for r/x:v1 not found: manifest unknown", Category.NOT_FOUND),
        (
            "pull access denied, repository does not exist or may require authorization: "
            "authorization failed: no basic auth credentials",
            Category.UNAUTHORIZED,
        ),
        ("unexpected status from HEAD request: 401 Unauthorized", Category.UNAUTHORIZED),
        ("dial tcp 127.0.0.1:1: connect: connection refused", Category.REGISTRY_UNAVAILABLE),
        ("lookup reg.example: no such host", Category.REGISTRY_UNAVAILABLE),
        ("503 Service Unavailable", Category.REGISTRY_UNAVAILABLE),
        ("write /var/lib/x: no space left on device", Category.INSUFFICIENT_DISK),
        ("invalid reference format: repository name must be lowercase", Category.INVALID_REFERENCE),
        ("context deadline exceeded", Category.DEADLINE_EXCEEDED),
        ("something nobody expected", Category.INTERNAL),
        # Seen in CI: the port held "404", which once read as an HTTP 404.
        (
            'failed to pull and unpack image "127.0.0.1:44047/agent/down:v1": failed to resolve '
            'image: failed to do request: Head "https://127.0.0.1:44047/v2/agent/down/manifests/'
            'v1": dial tcp 127.0.0.1:44047: connect: connection refused',
            Category.REGISTRY_UNAVAILABLE,
        ),
        ("dial tcp reg.example:4040: i/o timeout", Category.REGISTRY_UNAVAILABLE),
        (
            'Head "https://reg.example/v2/not-found-unauthorized/manifests/sha256:'
            '404a": dial tcp: connection reset by peer',
            Category.REGISTRY_UNAVAILABLE,
        ),
        # containerd's own records missing mid-pull (a layer collected during an unpack,
        # a parent snapshot gone): a race to retry, not a missing image.
        (
            'failed to pull and unpack image "r/x:v1": failed to extract layer sha256:'
            + "a" * 64
            + ": failed to get reader from content store: content digest sha256:"
            + "b" * 64
            + ": not found",
            Category.INTERNAL,
        ),
        (
            'failed to pull and unpack image "r/x:v1": failed to prepare extraction snapshot '
            '"extract-1-sha256:c": parent snapshot sha256:d does not exist: not found',
            Category.INTERNAL,
        ),
        (
            'failed to pull and unpack image "r/x:v1": failed to resolve reference "r/x:v1": '
            "r/x:v1: not found",
            Category.NOT_FOUND,
        ),
        # containerd 2's words for the same
        (
            'failed to pull and unpack image "r/x:v1": failed to resolve image: r/x:v1: not found',
            Category.NOT_FOUND,
        ),
        ("unexpected status code 404 (Not Found)", Category.NOT_FOUND),
        ("unexpected status code: 404", Category.NOT_FOUND),
    ],
)
def test_runtime_messages_map_to_categories(message: str, category: Category) -> None:
    assert classify_message(message) == category


@pytest.mark.parametrize(
    ("message", "image", "category"),
    [
        (  # containerd: the repository's name is not the registry's answer
            'failed to pull and unpack image "r:5000/team/denied:v1": failed to resolve '
            "image: r:5000/team/denied:v1: not found",
            "r:5000/team/denied:v1",
            Category.NOT_FOUND,
        ),
        (  # Docker
            "manifest for r:5000/unauthorized:v1 not found: manifest unknown: manifest unknown",
            "r:5000/unauthorized:v1",
            Category.NOT_FOUND,
        ),
        (  # Docker Hub's short form, and the registry's own words still count
            "pull access denied for toomanyrequests, repository does not exist or may "
            "require 'docker login': denied: requested access to the resource is denied",
            "toomanyrequests",
            Category.UNAUTHORIZED,
        ),
        (  # a bare one-word name may be the error's own word: left as it is
            "pull access denied for denied, repository does not exist or may require "
            "'docker login': denied: requested access to the resource is denied",
            "denied",
            Category.UNAUTHORIZED,
        ),
        (  # by digest
            'failed to pull and unpack image "docker.io/team/unauthorized@sha256:'
            + "a" * 64
            + '": failed to resolve reference "docker.io/team/unauthorized@sha256:'
            + "a" * 64
            + '": not found',
            "team/unauthorized@sha256:" + "a" * 64,
            Category.NOT_FOUND,
        ),
    ],
)
def test_the_image_s_own_name_does_not_decide_the_category(
    message: str, image: str, category: Category
) -> None:
    assert classify_message(message, image) == category


def test_sizes_and_durations_parse_like_kubernetes_quantities_and_go_durations() -> None:
    assert parse_size("10Gi") == 10 * 2**30
    assert parse_size("500M") == 500 * 10**6
    assert parse_size("1024") == 1024
    assert parse_duration("5m") == 300
    assert parse_duration("1h30m") == 5400
    assert parse_duration("250ms") == 0.25
    assert parse_duration("0s") == 0
    for bad in ("5 minutes", "", "m5"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_disk_guard_refuses_below_the_threshold_and_says_by_how_much() -> None:
    ten_percent = DiskThreshold.parse("10%")
    assert disk_refusal(free=200, capacity=1000, threshold=ten_percent) is None
    refusal = disk_refusal(free=50, capacity=1000, threshold=ten_percent)
    assert refusal is not None
    assert "50 bytes free of 1000 (5.0%)" in refusal
    assert "minimum of 10% (100 bytes)" in refusal
    assert disk_refusal(free=10, capacity=0, threshold=ten_percent) is None  # unknown: allow
    assert disk_refusal(free=10, capacity=10**9, threshold=DiskThreshold.parse("1Gi")) is not None
    # an image known to need more than the space above the minimum (its last pull stopped)
    gib = DiskThreshold.parse("1Gi")
    assert disk_refusal(free=3 << 30, capacity=10 << 30, threshold=gib, needs=1 << 30) is None
    refused = disk_refusal(free=3 << 30, capacity=10 << 30, threshold=gib, needs=5 << 30)
    assert refused is not None
    assert "the image needs 5368709120 bytes more" in refused


def test_agent_flags_validate_and_default() -> None:
    cfg, lease = parse_args(["--node-name=n1", "--min-free-disk=5Gi", "--no-lease"])
    assert cfg.node_name == "n1"
    assert not lease
    assert cfg.min_free_disk.bytes == 5 * 2**30
    assert cfg.max_concurrent_pulls == 2
    assert cfg.default_pull_deadline == 300
    with pytest.raises(SystemExit):
        parse_args([])  # no node name
    with pytest.raises(SystemExit):
        parse_args(["--node-name=n", "--tls-cert=c"])  # cert without key
    with pytest.raises(SystemExit):  # a plugin config without the plugins' directory
        parse_args(["--node-name=n", "--image-credential-provider-config=/etc/c.yaml"])


def test_docker_layer_progress_is_monotonic_and_sums_layers() -> None:
    p = LayerProgress()
    assert p.update({"status": "Pulling fs layer", "id": "a"}) is None
    first = p.update(
        {"status": "Downloading", "id": "a", "progressDetail": {"current": 10, "total": 100}}
    )
    second = p.update(
        {"status": "Downloading", "id": "b", "progressDetail": {"current": 5, "total": 50}}
    )
    done = p.update({"status": "Download complete", "id": "a", "progressDetail": {}})
    assert first is not None
    assert (first.bytes_done, first.bytes_total) == (10, 100)
    assert second is not None
    assert (second.bytes_done, second.bytes_total) == (15, 150)
    assert done is not None
    assert (done.bytes_done, done.bytes_total) == (105, 150)


def test_manifest_helpers_pick_the_platform_and_list_blobs() -> None:
    index = {
        "manifests": [
            {"digest": "sha256:arm", "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": "sha256:amd", "platform": {"os": "linux", "architecture": "amd64"}},
        ]
    }
    assert pick_platform_manifest(index, "linux", "amd64") == "sha256:amd"
    assert pick_platform_manifest(index, "linux", "s390x") is None
    manifest = {
        "config": {"digest": "sha256:c", "size": 7},
        "layers": [{"digest": "sha256:l1", "size": 10}, {"digest": "sha256:l2", "size": 20}],
    }
    assert manifest_blobs(manifest) == {"sha256:c": 7, "sha256:l1": 10, "sha256:l2": 20}


def test_cri_server_address_gets_a_scheme_and_docker_hub_its_api_host() -> None:
    assert auth_config(Credentials(server_address="reg:5000")).server_address == "https://reg:5000"
    hub = auth_config(Credentials(server_address="https://index.docker.io/v1/"))
    assert hub.server_address == "https://registry-1.docker.io"
    assert auth_config(Credentials(username="u")).server_address == ""


@pytest.mark.parametrize(
    ("version", "honoured"),
    [
        ("1.6.20~ds1", False),
        ("v1.6.38", False),
        ("1.7.24", True),
        ("v2.2.0", True),
        ("v10.0.1", True),
        ("main-dev", True),
    ],
)
def test_pins_count_from_containerd_1_7(version: str, honoured: bool) -> None:
    assert honours_pins(version) is honoured


def test_credentials_never_show_secrets_in_repr() -> None:
    text = repr(Credentials(server_address="r", username="u", password="hunter2", auth="c2VjcmV0"))
    assert "hunter2" not in text
    assert "c2VjcmV0" not in text


def test_docker_refs_drop_the_tag_when_a_digest_pins_the_content() -> None:
    digest = "sha256:" + "b" * 64
    assert docker_ref(f"r.io/a:v1@{digest}") == f"r.io/a@{digest}"
    assert docker_ref("r.io/a:v1") == "r.io/a:v1"


def test_the_answers_digest_is_the_one_of_the_ordered_repository() -> None:
    """Docker lists Docker Hub repositories short (`nginx@...`); content under several
    repositories has a manifest digest in each, and the order's own is the one to report
    (it was the first listed, whatever its repository); another's is none."""
    record = ImageRecord(
        "sha256:" + "c" * 64,
        ("bitnami/nginx:1", "nginx:1"),
        ("bitnami/nginx@sha256:" + "a" * 64, "nginx@sha256:" + "b" * 64),
        100,
        PinState.UNSUPPORTED,
    )
    assert record.digest_for("docker.io/library/nginx") == "sha256:" + "b" * 64
    assert record.digest_for("docker.io/bitnami/nginx") == "sha256:" + "a" * 64
    assert record.digest_for("registry.example/other") == ""  # none there


class _BrokenTracker(PullProgressTracker):
    """Fails as a manifest without a `digest` entry made the real one fail."""

    def __init__(self) -> None:
        super().__init__(None, (), parse("r.io/a:1"), "amd64", lambda p: None, 0.001)  # type: ignore[arg-type]

    async def poll_once(self) -> None:
        raise KeyError("digest")


async def test_a_progress_tracker_that_fails_leaves_the_pull_its_own_outcome() -> None:
    """Byte progress is best effort: a tracker that raised anything but an RpcError
    replaced the pull's outcome (a success reported as an Internal failure)."""
    async with tracking(_BrokenTracker()):
        await asyncio.sleep(0.05)  # the tracker fails meanwhile

    async def failing_pull() -> None:
        async with tracking(_BrokenTracker()):
            await asyncio.sleep(0.05)
            raise ValueError("the pull's own failure")

    with pytest.raises(ValueError, match="the pull's own"):
        await failing_pull()
