"""The node's kubelet credential provider plugins, run by the agent as the kubelet runs them.

On EKS, GKE and AKS the nodes pull from their cloud's registry without any pull Secret:
the kubelet execs a plugin (ecr-credential-provider, ...) named in its
`--image-credential-provider-config` for images its `matchImages` cover. kube-fledged
pulled through the kubelet, so its caches of such images needed no Secret either; the
agent pulls through the runtime, so it reads the same config and execs the same plugins
(`credentialprovider.kubelet.k8s.io` request on stdin, response on stdout), caching
answers for as long as they say. Their credentials come after the cache's Secrets', as
the kubelet orders the keyrings. Parsing and matching are plain functions; only
`NodeCredentials.lookup` runs processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.reference import InvalidReference, parse, registry_matches
from common.units import parse_duration

from .runtime import Credentials

log = logging.getLogger(__name__)

CONFIG_API_VERSIONS = frozenset({"kubelet.config.k8s.io/v1", "kubelet.config.k8s.io/v1beta1"})
PLUGIN_API_VERSIONS = frozenset(
    {
        "credentialprovider.kubelet.k8s.io/v1",
        "credentialprovider.kubelet.k8s.io/v1beta1",
        "credentialprovider.kubelet.k8s.io/v1alpha1",
    }
)
EXEC_TIMEOUT = 60.0  # a plugin not answered by then is killed


class ConfigError(ValueError):
    """The credential provider config cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Provider:
    name: str
    match_images: tuple[str, ...]
    default_cache_duration: float
    api_version: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PluginAnswer:
    cache_key_type: str  # Image, Registry or Global
    cache_duration: float | None  # None: the provider's default
    auth: tuple[tuple[str, str, str], ...]  # (pattern, username, password)


def parse_config(text: str, source: str = "credential provider config") -> list[Provider]:
    """Providers of a kubelet CredentialProviderConfig (YAML or JSON)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not YAML: {err}") from err
    if not isinstance(doc, dict) or doc.get("kind") != "CredentialProviderConfig":
        raise ConfigError(f"{source}: not a CredentialProviderConfig")
    if doc.get("apiVersion") not in CONFIG_API_VERSIONS:
        raise ConfigError(f"{source}: unsupported apiVersion {doc.get('apiVersion')!r}")
    providers = []
    for i, raw in enumerate(doc.get("providers") or ()):
        where = f"{source}: providers[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: not an object")
        name = str(raw.get("name") or "")
        if not name or "/" in name or name in (".", ".."):
            raise ConfigError(f"{where}: name {name!r} must be a file name in the bin dir")
        match = raw.get("matchImages") or []
        if not match or not all(isinstance(m, str) and m for m in match):
            raise ConfigError(f"{where} ({name}): matchImages must list image patterns")
        api_version = str(raw.get("apiVersion") or "")
        if api_version not in PLUGIN_API_VERSIONS:
            raise ConfigError(f"{where} ({name}): unsupported apiVersion {api_version!r}")
        try:
            default = parse_duration(str(raw.get("defaultCacheDuration") or "0"))
        except ValueError as err:
            raise ConfigError(f"{where} ({name}): defaultCacheDuration: {err}") from err
        env = tuple((str(e["name"]), str(e.get("value", ""))) for e in raw.get("env") or ())
        args = tuple(str(a) for a in raw.get("args") or ())
        tokens = raw.get("tokenAttributes") or {}
        if isinstance(tokens, dict) and tokens and tokens.get("requireServiceAccount", True):
            # KEP-4412: the kubelet runs it with the pulling pod's service account token;
            # a cache pulls for no pod, so it has none to give.
            log.warning(
                "%s: %s needs a pod's service account token; a cache pulls for no pod, "
                "so images only it serves need a pull Secret in their cache",
                source,
                name,
            )
            continue
        providers.append(Provider(name, tuple(match), default, api_version, args, env))
    return providers


def image_matches(pattern: str, image: str) -> bool:
    """The kubelet's URLsMatchStr: the registry as a glob a label at a time, the same
    port, and the pattern's path a prefix of the image's."""
    p_host, _, p_path = pattern.partition("/")
    i_host, _, i_path = image.partition("/")
    return registry_matches(p_host.lower(), i_host.lower()) and i_path.startswith(p_path)


def parse_answer(out: bytes, provider: Provider) -> PluginAnswer:
    """A CredentialProviderResponse (raises ValueError with the reason)."""
    doc = json.loads(out)
    if not isinstance(doc, dict) or doc.get("kind") != "CredentialProviderResponse":
        raise ValueError("not a CredentialProviderResponse")
    if doc.get("apiVersion") != provider.api_version:
        raise ValueError(
            f"apiVersion {doc.get('apiVersion')!r}, the config says {provider.api_version!r}"
        )
    key_type = doc.get("cacheKeyType") or ""
    if key_type not in ("Image", "Registry", "Global"):
        raise ValueError(f"cacheKeyType {key_type!r} is not Image, Registry or Global")
    duration = doc.get("cacheDuration")
    auth = doc.get("auth") or {}
    if not isinstance(auth, dict):
        raise ValueError("auth is not an object")
    entries = tuple(
        (str(k), str((v or {}).get("username", "")), str((v or {}).get("password", "")))
        for k, v in auth.items()
    )
    return PluginAnswer(key_type, parse_duration(duration) if duration else None, entries)


def cache_key(key_type: str, image: str) -> str:
    if key_type == "Image":
        return image
    if key_type == "Registry":
        return image.partition("/")[0]
    return ""


def repository_of(image: str) -> str | None:
    """What the kubelet matches and asks plugins for: the image's repository, fully
    qualified, without tag or digest (`nginx:1.25` is `docker.io/library/nginx`)."""
    try:
        return parse(image).name
    except InvalidReference:
        return None  # the pull says what is wrong with it


def answer_credentials(answer: PluginAnswer, image: str) -> tuple[Credentials, ...]:
    """The answer's entries for `image` (a repository as `repository_of` gives it),
    addressed to its registry: containerd drops credentials addressed to another host
    (Docker Hub's, docker.io, the runtime addresses itself)."""
    host = image.partition("/")[0]
    return tuple(
        Credentials(server_address=host, username=user, password=password)
        for pattern, user, password in answer.auth
        if image_matches(pattern, image)
    )


class NodeCredentials:
    """Credentials the node's plugins give for an image, cached as they ask."""

    def __init__(
        self, providers: list[Provider], bin_dir: Path, environ: Mapping[str, str] | None = None
    ) -> None:
        self.providers = providers
        self._bin_dir = bin_dir
        self._environ = dict(os.environ if environ is None else environ)
        # provider name -> cache key -> (expiry on the monotonic clock, answer)
        self._cache: dict[str, dict[str, tuple[float, PluginAnswer]]] = {}

    @classmethod
    def from_files(cls, config: Path, bin_dir: Path) -> NodeCredentials:
        try:
            text = config.read_text()
        except OSError as err:
            raise ConfigError(f"credential provider config {config}: {err}") from err
        return cls(parse_config(text, str(config)), bin_dir)

    async def lookup(self, image: str) -> tuple[Credentials, ...]:
        """Every matching plugin's credentials for `image`; a plugin that fails is
        logged and skipped, as the kubelet does (the pull may still succeed without)."""
        repository = repository_of(image)
        if repository is None:
            return ()
        image = repository
        found: list[Credentials] = []
        for provider in self.providers:
            if not any(image_matches(p, image) for p in provider.match_images):
                continue
            answer = self._cached(provider, image)
            if answer is None:
                try:
                    answer = await self._exec(provider, image)
                except (OSError, ValueError, TimeoutError) as err:
                    log.warning("credential provider %s for %s: %s", provider.name, image, err)
                    continue
                self._remember(provider, image, answer)
            found.extend(answer_credentials(answer, image))
        return tuple(found)

    def _cached(self, provider: Provider, image: str) -> PluginAnswer | None:
        """An answer kept for the image, its registry or every image (keys of the three
        kinds cannot collide: a repository has a slash, a registry none, Global is "")."""
        now = time.monotonic()
        entries = self._cache.get(provider.name, {})
        for key in (image, image.partition("/")[0], ""):
            hit = entries.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        return None

    def _remember(self, provider: Provider, image: str, answer: PluginAnswer) -> None:
        duration = provider.default_cache_duration
        if answer.cache_duration is not None:
            duration = answer.cache_duration
        if duration <= 0:
            return
        now = time.monotonic()
        entries = self._cache.setdefault(provider.name, {})
        for key in [k for k, (expiry, _) in entries.items() if expiry <= now]:
            del entries[key]
        entries[cache_key(answer.cache_key_type, image)] = (now + duration, answer)

    async def _exec(self, provider: Provider, image: str) -> PluginAnswer:
        request = json.dumps(
            {
                "apiVersion": provider.api_version,
                "kind": "CredentialProviderRequest",
                "image": image,
            }
        ).encode()
        proc = await asyncio.create_subprocess_exec(
            str(self._bin_dir / provider.name),
            *provider.args,
            env={**self._environ, **dict(provider.env)},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(request), EXEC_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise TimeoutError(f"no answer within {EXEC_TIMEOUT:.0f}s") from None
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip()[-500:]
            raise ValueError(f"exited with {proc.returncode}: {text}")
        try:
            return parse_answer(out, provider)
        except (ValueError, AttributeError) as error:
            raise ValueError(f"bad answer: {error}") from error


def config_summary(providers: list[Provider]) -> str:
    return ", ".join(f"{p.name} ({', '.join(p.match_images)})" for p in providers) or "none"
