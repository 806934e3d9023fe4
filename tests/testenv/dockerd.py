"""A real Docker daemon (Debian's docker.io) with the vfs driver and no networking setup."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .paths import binary
from .procs import ManagedProcess, unix_socket_ready


class Dockerd:
    def __init__(self, workdir: Path, insecure_registries: Iterable[str]) -> None:
        self.dir = workdir / "dockerd"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "docker.sock"
        self.endpoint = f"unix://{self.socket}"
        config = self.dir / "daemon.json"
        config.write_text("{}\n")  # keep /etc/docker/daemon.json out of the test
        argv: list[str | Path] = [
            binary("dockerd"),
            f"--config-file={config}",
            f"--data-root={self.dir / 'data'}",
            f"--exec-root={self.dir / 'exec'}",
            f"--pidfile={self.dir / 'docker.pid'}",
            f"--host=unix://{self.socket}",
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--ip-forward=false",  # its default turns the host's forwarding on for good
        ]
        argv += [f"--insecure-registry={host}" for host in insecure_registries]
        self.process = ManagedProcess("dockerd", argv, workdir / "logs" / "dockerd.log")

    def start(self) -> None:
        self.process.start()
        self.process.wait_until(self._pings, timeout=60, what="dockerd /_ping")

    def client(self) -> Any:
        """A Docker SDK client of this daemon (the caller closes it)."""
        import docker

        return docker.DockerClient(base_url=self.endpoint, timeout=30)

    def _pings(self) -> bool:
        if not unix_socket_ready(self.socket):
            return False
        client = self.client()
        try:
            return bool(client.ping())
        finally:
            client.close()
