"""Pull secrets to per-image credentials, matched to registries as the kubelet does.

Pure functions: the Kubernetes adapter fetches the Secret objects, this module reads
them. Credentials are never logged; errors name the secret, never its content.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from common.reference import DOCKER_HUB, ImageRef, parse, registry_matches, same_registry

DOCKERCONFIGJSON = "kubernetes.io/dockerconfigjson"
DOCKERCFG = "kubernetes.io/dockercfg"


class SecretError(ValueError):
    """A pull secret is unusable; the message names it and says why."""


@dataclass(frozen=True)
class RegistryAuth:
    registry: str  # host[:port]; docker.io for Docker Hub
    path: str  # optional repository path prefix the entry is limited to
    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    server_address: str = ""


def _entry_key(key: str) -> tuple[str, str]:
    """Registry host and path prefix from a docker-config key (`https://r:5000/v1/`, `r/ns`)."""
    text = key.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    host, _, path = text.partition("/")
    host = host.lower()
    if host in {"index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}:
        host = DOCKER_HUB
    path = path.strip("/")
    if path in ("v1", "v2"):
        path = ""
    return host, path


def parse_secret(name: str, secret_type: str, data: Mapping[str, str]) -> list[RegistryAuth]:
    """Registry entries of one Secret (`data` values are base64, as in the API)."""
    if secret_type == DOCKERCONFIGJSON:
        raw = data.get(".dockerconfigjson")
    elif secret_type == DOCKERCFG:
        raw = data.get(".dockercfg")
    else:
        raise SecretError(
            f"secret {name!r} has type {secret_type!r}; pull secrets must be "
            f"{DOCKERCONFIGJSON} or {DOCKERCFG}"
        )
    if not raw:
        raise SecretError(f"secret {name!r} of type {secret_type} has no data")
    try:
        doc = json.loads(base64.b64decode(raw, validate=True))
    except (ValueError, RecursionError) as err:  # binascii, Unicode and JSON errors alike
        # RecursionError: JSON nested deeper than the parser's stack (a 266 KB Secret
        # reaches it): it ended the coordinator at every start.
        raise SecretError(f"secret {name!r} does not hold valid docker config JSON") from err
    if not isinstance(doc, dict):
        raise SecretError(f"secret {name!r} does not hold a docker config JSON object")
    entries = doc.get("auths") if secret_type == DOCKERCONFIGJSON else doc
    if not isinstance(entries, dict):
        raise SecretError(f"secret {name!r} has no registry entries")
    out = []
    for key, value in entries.items():
        if not isinstance(value, dict):
            raise SecretError(f"secret {name!r}: entry for {key!r} is not an object")
        username, password = str(value.get("username", "")), str(value.get("password", ""))
        auth = str(value.get("auth", ""))
        if auth and not username:
            try:
                username, _, password = base64.b64decode(auth).decode().partition(":")
            except ValueError as err:  # not base64, not ASCII, not UTF-8 underneath
                raise SecretError(
                    f"secret {name!r}: entry for {key!r} has a bad auth field"
                ) from err
        host, path = _entry_key(key)
        out.append(
            RegistryAuth(
                registry=host,
                path=path,
                username=username,
                password=password,
                auth=auth,
                identity_token=str(value.get("identitytoken", "")),
                server_address=key,
            )
        )
    return out


@functools.lru_cache(maxsize=4096)
def credentials_for_key(key: str, auths: tuple[RegistryAuth, ...]) -> tuple[RegistryAuth, ...]:
    """`credentials_for` by image key, remembered: each node of a fleet-wide order asks
    the same question for each image."""
    return tuple(credentials_for(parse(key), auths)) if auths else ()


def credentials_for(ref: ImageRef, auths: Sequence[RegistryAuth]) -> list[RegistryAuth]:
    """Entries that apply to `ref`, most specific first (kubelet's order: longer paths,
    then a named registry before a wildcard one). A wildcard entry is addressed to the
    registry it matched: containerd drops credentials addressed to another host."""
    named: list[RegistryAuth] = []
    wildcard: list[RegistryAuth] = []
    for a in auths:
        if a.path and ref.path != a.path and not ref.path.startswith(a.path + "/"):
            continue
        if same_registry(a.registry, ref.domain):
            named.append(a)
        elif registry_matches(a.registry, ref.domain):
            wildcard.append(replace(a, server_address=ref.domain))
    return sorted(named, key=lambda a: -len(a.path)) + sorted(wildcard, key=lambda a: -len(a.path))
