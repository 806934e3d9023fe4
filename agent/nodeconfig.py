"""The node's own docker config (the kubelet's `<root-dir>/config.json`), for images no
Secret of the cache serves.

Clusters that keep registry credentials on the nodes rather than in Secrets put them
there; the kubelet reads it for every pull, and so did kube-fledged's Jobs. The agent
reads the same file, again whenever it changes, and matches its entries to images as
the kubelet does (common/dockerconfig.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from common.dockerconfig import DockerConfigError, RegistryAuth, credentials_for, registry_entries
from common.reference import InvalidReference, parse

from .runtime import Credentials

log = logging.getLogger(__name__)


def read_config(path: Path) -> list[RegistryAuth]:
    """The entries of a config.json (`auths`), or of a legacy .dockercfg map."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise DockerConfigError(f"{path}: not a docker config JSON file: {err}") from err
    if not isinstance(doc, dict):
        raise DockerConfigError(f"{path}: not a docker config JSON object")
    return registry_entries(doc.get("auths", doc), str(path))


class NodeDockerConfig:
    """The file's credentials per image; a missing or broken file gives none (logged
    once per change), as the kubelet goes on without it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._auths: list[RegistryAuth] = []

    def _current(self) -> list[RegistryAuth]:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = (0, -1)
        if stamp != self._stamp:
            self._stamp = stamp
            self._auths = []
            if stamp[1] < 0:
                log.warning("node docker config %s not found: unused until it is", self.path)
            else:
                try:
                    self._auths = read_config(self.path)
                except DockerConfigError as err:
                    log.warning("node docker config unused: %s", err)
        return self._auths

    async def lookup(self, image: str) -> tuple[Credentials, ...]:
        auths = self._current()
        if not auths:
            return ()
        try:
            ref = parse(image)
        except InvalidReference:
            return ()
        return tuple(Credentials.of(a) for a in credentials_for(ref, auths))
