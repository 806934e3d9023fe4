"""Pull secrets to per-image credentials, matched to registries as the kubelet does.

Pure functions: the Kubernetes adapter fetches the Secret objects, this module reads
them. Credentials are never logged; errors name the secret, never its content.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Mapping

from common.dockerconfig import (
    DockerConfigError,
    RegistryAuth,
    credentials_for,
    registry_entries,
)
from common.reference import parse

__all__ = ["RegistryAuth", "SecretError", "credentials_for", "credentials_for_key", "parse_secret"]

DOCKERCONFIGJSON = "kubernetes.io/dockerconfigjson"
DOCKERCFG = "kubernetes.io/dockercfg"


# A pull secret is unusable; the message names it and says why.
SecretError = DockerConfigError


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
    return registry_entries(entries, f"secret {name!r}")


@functools.lru_cache(maxsize=4096)
def credentials_for_key(key: str, auths: tuple[RegistryAuth, ...]) -> tuple[RegistryAuth, ...]:
    """`credentials_for` by image key, remembered: each node of a fleet-wide order asks
    the same question for each image."""
    return tuple(credentials_for(parse(key), auths)) if auths else ()
