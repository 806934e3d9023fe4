"""The kubelet's credential provider protocol as the agent speaks it: the config, the
matching of images, the answers and their caching (plugins are real processes here)."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from agent.credproviders import (
    ConfigError,
    NodeCredentials,
    PluginAnswer,
    Provider,
    answer_credentials,
    image_matches,
    parse_answer,
    parse_config,
)
from common.units import parse_duration

V1 = "credentialprovider.kubelet.k8s.io/v1"
CONFIG = """
apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: ecr-credential-provider
    matchImages: ["*.dkr.ecr.*.amazonaws.com", "*.dkr.ecr.*.amazonaws.com.cn"]
    defaultCacheDuration: 12h
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: [get-credentials]
    env:
      - {name: AWS_PROFILE, value: example}
"""


def test_a_kubelet_config_reads_as_its_providers() -> None:
    (p,) = parse_config(CONFIG)
    assert p.name == "ecr-credential-provider"
    assert p.match_images == ("*.dkr.ecr.*.amazonaws.com", "*.dkr.ecr.*.amazonaws.com.cn")
    assert p.default_cache_duration == 12 * 3600
    assert p.args == ("get-credentials",)
    assert p.env == (("AWS_PROFILE", "example"),)


def test_a_provider_that_needs_a_pods_service_account_token_is_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """KEP-4412's tokenAttributes: the kubelet gives such a plugin the pulling pod's
    token; a cache pulls for no pod. Unless the token is optional, it is not run."""
    needs = CONFIG.replace(
        "    env:",
        "    tokenAttributes: {serviceAccountTokenAudience: registry.example}\n    env:",
    )
    assert parse_config(needs) == []
    assert "needs a pod's service account token" in caplog.text
    optional = CONFIG.replace(
        "    env:",
        "    tokenAttributes: {serviceAccountTokenAudience: r, requireServiceAccount: false}\n"
        "    env:",
    )
    assert [p.name for p in parse_config(optional)] == ["ecr-credential-provider"]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("kind: Pod", "not a CredentialProviderConfig"),
        ("{kind: CredentialProviderConfig, apiVersion: v9}", "unsupported apiVersion"),
        (CONFIG.replace("ecr-credential-provider", "../bin/sh"), "must be a file name"),
        (
            CONFIG.replace('["*.dkr.ecr.*.amazonaws.com", "*.dkr.ecr.*.amazonaws.com.cn"]', "[]"),
            "matchImages",
        ),
        (
            CONFIG.replace("apiVersion: credentialprovider.kubelet.k8s.io/v1", "apiVersion: x"),
            "unsupported apiVersion 'x'",
        ),
        (CONFIG.replace("12h", "twelve hours"), "defaultCacheDuration"),
        ("providers: [", "not YAML"),
    ],
)
def test_a_config_the_kubelet_would_refuse_is_refused_with_the_reason(
    text: str, complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint):
        parse_config(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("12h", 43200.0),
        ("1h30m", 5400.0),
        ("90s", 90.0),
        ("0", 0.0),
        ("1.5m", 90.0),
        ("250ms", 0.25),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["12", "h", "1x", "1h 2m", "-1s"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("pattern", "image", "matches"),
    [
        ("*.dkr.ecr.*.amazonaws.com", "123.dkr.ecr.eu-west-1.amazonaws.com/app:v1", True),
        ("*.dkr.ecr.*.amazonaws.com", "123.dkr.ecr.eu-west-1.amazonaws.com.cn/app", False),
        ("gcr.io", "gcr.io/project/app@sha256:" + "a" * 64, True),
        ("gcr.io/project", "gcr.io/project/app:v1", True),  # the path a prefix
        ("gcr.io/project", "gcr.io/other/app:v1", False),
        ("reg.io:5000", "reg.io:5000/app", True),
        ("reg.io:5000", "reg.io/app", False),
        ("*.io", "reg.io:5000/app", False),
    ],
)
def test_images_match_as_the_kubelet_matches_them(pattern: str, image: str, matches: bool) -> None:
    assert image_matches(pattern, image) is matches


PROVIDER = Provider("p", ("reg.io",), 0.0, V1)


def test_an_answer_of_another_version_or_kind_is_refused() -> None:
    good = {"apiVersion": V1, "kind": "CredentialProviderResponse", "cacheKeyType": "Image"}
    assert parse_answer(json.dumps(good).encode(), PROVIDER).cache_key_type == "Image"
    for bad, complaint in [
        ({**good, "apiVersion": "credentialprovider.kubelet.k8s.io/v1beta1"}, "apiVersion"),
        ({**good, "kind": "Nope"}, "not a CredentialProviderResponse"),
        ({**good, "cacheKeyType": "Pod"}, "cacheKeyType"),
    ]:
        with pytest.raises(ValueError, match=complaint):
            parse_answer(json.dumps(bad).encode(), PROVIDER)


PLUGIN = """#!{python}
import json, os, sys
request = json.load(sys.stdin)
assert request["kind"] == "CredentialProviderRequest", request
with open(os.environ["CALLS"], "a") as calls:
    calls.write(request["image"] + " " + " ".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAIL"):
    sys.exit("no credentials today")
print(json.dumps({{
    "apiVersion": "{version}",
    "kind": "CredentialProviderResponse",
    "cacheKeyType": os.environ["KEY_TYPE"],
    "cacheDuration": os.environ.get("DURATION", ""),
    "auth": {{"*.example.com": {{"username": "u", "password": "p"}},
              "other.io": {{"username": "x", "password": "y"}}}},
}}))
"""


def plugin(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "fake-provider"
    path.parent.mkdir()
    path.write_text(PLUGIN.format(python=sys.executable, version=V1))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def node_credentials(tmp_path: Path, key_type: str, **env: str) -> NodeCredentials:
    bin_dir = plugin(tmp_path).parent
    provider = Provider(
        "fake-provider",
        ("*.example.com",),
        3600.0,
        V1,
        ("get-credentials",),
        (("CALLS", str(tmp_path / "calls")), ("KEY_TYPE", key_type), *env.items()),
    )
    return NodeCredentials([provider], bin_dir, environ={})


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_a_plugin_answer_serves_the_images_it_matches_and_is_kept_per_registry(
    tmp_path: Path,
) -> None:
    creds = node_credentials(tmp_path, "Registry")

    async def run() -> None:
        (first,) = await creds.lookup("a.example.com/app:v1")
        assert (first.username, first.password) == ("u", "p")
        assert first.server_address == "a.example.com"  # containerd's host check
        await creds.lookup("a.example.com/other:v2")  # same registry: kept
        assert calls(tmp_path) == ["a.example.com/app get-credentials"]  # the repository
        await creds.lookup("b.example.com/app:v1")  # another registry: asked
        assert len(calls(tmp_path)) == 2
        assert await creds.lookup("not-matched.io/app:v1") == ()  # never asked
        assert len(calls(tmp_path)) == 2

    asyncio.run(run())


def test_image_keyed_answers_are_kept_per_repository_and_zero_duration_not_at_all(
    tmp_path: Path,
) -> None:
    per_image = node_credentials(tmp_path, "Image")

    async def run() -> None:
        await per_image.lookup("a.example.com/app:v1")
        await per_image.lookup("a.example.com/app:v2")  # the kubelet asks by repository
        await per_image.lookup("a.example.com/other:v1")
        assert len(calls(tmp_path)) == 2
        uncached = node_credentials(tmp_path / "x", "Global", DURATION="0s")
        await uncached.lookup("a.example.com/app:v1")
        await uncached.lookup("a.example.com/app:v1")
        assert len(calls(tmp_path / "x")) == 2

    (tmp_path / "x").mkdir()
    asyncio.run(run())


def test_a_failing_plugin_gives_no_credentials_and_is_asked_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    creds = node_credentials(tmp_path, "Global", FAIL="1")

    async def run() -> None:
        assert await creds.lookup("a.example.com/app:v1") == ()
        assert await creds.lookup("a.example.com/app:v1") == ()

    asyncio.run(run())
    assert len(calls(tmp_path)) == 2
    assert "no credentials today" in caplog.text


def test_images_are_matched_and_asked_for_by_their_repository_as_the_kubelet_does(
    tmp_path: Path,
) -> None:
    """The kubelet looks credentials up by the repository, fully qualified: a Docker Hub
    short name matches `docker.io` and `*.*` patterns, and tags share one answer."""
    creds = node_credentials(tmp_path, "Image")
    provider = creds.providers[0]
    creds.providers[0] = replace(provider, match_images=("*.*",))

    async def run() -> None:
        assert await creds.lookup("nginx:1.25") == ()  # asked; its answer is for other hosts
        assert await creds.lookup("nginx@sha256:" + "a" * 64) == ()  # the same answer
        assert await creds.lookup("Not A Reference") == ()  # not asked

    asyncio.run(run())
    assert calls(tmp_path) == ["docker.io/library/nginx get-credentials"]
    answer = PluginAnswer("Global", None, (("docker.io", "hub", "p"), ("*.io", "any", "p")))
    found = answer_credentials(answer, "docker.io/library/nginx")
    assert [(c.server_address, c.username) for c in found] == [
        ("docker.io", "hub"),
        ("docker.io", "any"),
    ]


def test_a_missing_plugin_is_logged_not_raised(tmp_path: Path) -> None:
    creds = NodeCredentials([PROVIDER], tmp_path, environ={})
    assert asyncio.run(creds.lookup("reg.io/app")) == ()


def test_an_agent_given_an_unusable_config_stops_at_start_saying_why(tmp_path: Path) -> None:
    """A usage error at start (exit 2, the file and the reason), not a node whose
    private pulls fail one by one later."""
    bad = tmp_path / "config.yaml"
    bad.write_text(CONFIG.replace("12h", "twelve hours"))
    for config, complaint in [(bad, "defaultCacheDuration"), (tmp_path / "none", "No such file")]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.main",
                "--node-name=n",
                "--no-lease",
                "--listen=127.0.0.1:0",
                f"--image-credential-provider-config={config}",
                f"--image-credential-provider-bin-dir={tmp_path}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=Path(__file__).parents[2],
        )
        assert done.returncode == 2
        assert str(config) in done.stderr
        assert complaint in done.stderr
