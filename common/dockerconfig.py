"""Docker config files (`auths` of config.json, the legacy .dockercfg map) read into
registry entries, and matched to images as the kubelet matches them.

Shared by the coordinator (pull Secrets) and the agent (the node's own config.json).
Pure functions; errors name their source (`what`), never a credential.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from common.reference import ImageRef, registry_matches, registry_of_server_address, same_registry


class DockerConfigError(ValueError):
    """A docker config is unusable; the message names it and says why."""


@dataclass(frozen=True)
class RegistryAuth:
    registry: str  # host[:port]; docker.io for Docker Hub
    path: str  # optional repository path prefix the entry is limited to
    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    server_address: str = ""


def entry_key(key: str) -> tuple[str, str]:
    """Registry host and path prefix from a docker-config key (`https://r:5000/v1/`, `r/ns`)."""
    path = key.strip().split("://", 1)[-1].partition("/")[2].strip("/")
    return registry_of_server_address(key), "" if path in ("v1", "v2") else path


def registry_entries(entries: object, what: str) -> list[RegistryAuth]:
    """The registry entries of a docker config's host -> entry map (`what` names its
    source in errors: "secret 'x'", a file's path)."""
    if not isinstance(entries, dict):
        raise DockerConfigError(f"{what} has no registry entries")
    out = []
    for key, value in entries.items():
        if not isinstance(value, dict):
            raise DockerConfigError(f"{what}: entry for {key!r} is not an object")
        username, password = str(value.get("username", "")), str(value.get("password", ""))
        auth = str(value.get("auth", ""))
        if auth and not username:
            try:
                username, _, password = base64.b64decode(auth).decode().partition(":")
            except ValueError as err:  # not base64, not ASCII, not UTF-8 underneath
                raise DockerConfigError(f"{what}: entry for {key!r} has a bad auth field") from err
        host, path = entry_key(key)
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
