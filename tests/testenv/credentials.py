"""Kubelet credential provider configs, as the tests give them to agents and kubelets."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_provider_config(
    path: Path,
    plugin: str,
    match_images: list[str],
    cache: str,
    env: dict[str, str] | None = None,
) -> Path:
    """A CredentialProviderConfig at `path` with one provider, the plugin file `plugin`
    of the bin dir, its answers kept `cache` long by default."""
    provider: dict[str, object] = {
        "name": plugin,
        "matchImages": match_images,
        "defaultCacheDuration": cache,
        "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
    }
    if env:
        provider["env"] = [{"name": k, "value": v} for k, v in env.items()]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubelet.config.k8s.io/v1",
                "kind": "CredentialProviderConfig",
                "providers": [provider],
            }
        )
    )
    return path
