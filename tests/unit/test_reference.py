"""Image references are parsed and normalized as Docker and containerd do."""

from __future__ import annotations

import pytest

from common.reference import (
    InvalidReference,
    normalize,
    parse,
    registry_matches,
    registry_of_server_address,
)

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("nginx", "docker.io/library/nginx:latest"),
        ("nginx:1.27", "docker.io/library/nginx:1.27"),
        ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
        ("index.docker.io/library/nginx:1", "docker.io/library/nginx:1"),
        # distribution folds only index.docker.io; containerd keeps these as written
        ("registry-1.docker.io/x/y", "registry-1.docker.io/x/y:latest"),
        ("registry-1.docker.io/library/nginx", "registry-1.docker.io/library/nginx:latest"),
        ("registry.hub.docker.com/nginx:1", "registry.hub.docker.com/nginx:1"),
        ("localhost/app", "localhost/app:latest"),
        ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000/team/app:v1"),
        ("quay.io/a/b/c:tag_1.0-x", "quay.io/a/b/c:tag_1.0-x"),
        (f"ghcr.io/org/app@{DIGEST}", f"ghcr.io/org/app@{DIGEST}"),
        (f"ghcr.io/org/app:v2@{DIGEST}", f"ghcr.io/org/app:v2@{DIGEST}"),
        ("[::1]:5000/app:v1", "[::1]:5000/app:v1"),
    ],
)
def test_references_normalize_to_their_canonical_form(text: str, canonical: str) -> None:
    assert normalize(text) == canonical


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        (" nginx", "padded"),
        ("Nginx", "lowercase"),
        ("nginx:", "bad tag"),
        ("nginx:bad tag", "bad tag"),
        ("nginx@sha256:abc", "bad digest"),
        ("nginx@sha256:" + "a" * 40, "64 hex"),
        ("nginx@md5", "bad digest"),
        ("registry.io/", "bad repository"),
        ("registry.io//x", "bad repository"),
        ("a" * 300, "longer than"),
    ],
)
def test_bad_references_are_refused_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(InvalidReference, match=why):
        parse(text)


def test_parts_of_a_reference() -> None:
    ref = parse(f"127.0.0.1:5000/team/app:v1@{DIGEST}")
    assert (ref.domain, ref.hostname, ref.path, ref.tag, ref.digest) == (
        "127.0.0.1:5000",
        "127.0.0.1",
        "team/app",
        "v1",
        DIGEST,
    )
    assert ref.name == "127.0.0.1:5000/team/app"
    assert not ref.is_mutable
    assert parse("nginx:1").is_mutable


@pytest.mark.parametrize(
    ("server", "registry"),
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("docker.io", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("http://127.0.0.1:5000", "127.0.0.1:5000"),
        ("Quay.IO/some/path", "quay.io"),
    ],
)
def test_server_addresses_name_their_registry(server: str, registry: str) -> None:
    assert registry_of_server_address(server) == registry


@pytest.mark.parametrize(
    ("pattern", "domain", "matches"),
    [  # the kubelet's rules, from the docker-config documentation's examples
        ("*.kubernetes.io", "abc.kubernetes.io", True),
        ("*.kubernetes.io", "abc.def.kubernetes.io", False),  # a label at a time
        ("*.kubernetes.io", "kubernetes.io", False),
        ("*.*.kubernetes.io", "abc.def.kubernetes.io", True),
        ("prefix.*.io", "prefix.kubernetes.io", True),
        ("*-good.kubernetes.io", "prefix-good.kubernetes.io", True),
        ("*-good.kubernetes.io", "prefix-bad.kubernetes.io", False),
        ("*.dkr.ecr.*.amazonaws.com", "1234.dkr.ecr.eu-west-1.amazonaws.com", True),
        ("reg?.io", "reg1.io", True),
        ("reg[0-9].io", "reg7.io", True),
        ("reg[^0-9].io", "reg7.io", False),  # Go's negation
        ("reg[^0-9].io", "regx.io", True),
        # the port must be the same, absent on both or equal
        ("127.0.0.*:5000", "127.0.0.1:5000", True),
        ("127.0.0.*:5000", "127.0.0.1:5001", False),
        ("127.0.0.*:5000", "127.0.0.1", False),
        ("*.io", "reg.io:5000", False),
        # no glob: only the same registry, Docker Hub under any of its names
        ("reg.io", "reg.io", True),
        ("reg.io", "other.io", False),
        ("docker.io", "registry-1.docker.io", True),
        ("[::1]:5000", "[::1]:5000", True),  # brackets of an IPv6 address are no class
        ("[::1]:5000", "[::2]:5000", False),
    ],
)
def test_registry_patterns_match_as_the_kubelet_matches_them(
    pattern: str, domain: str, matches: bool
) -> None:
    assert registry_matches(pattern, domain) is matches
