"""Real OCI registries: Debian's docker-registry (distribution 2.8), anonymous or htpasswd."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from .paths import binary
from .procs import ManagedProcess, free_port


class Registry:
    """One docker-registry on its own loopback port; with credentials it demands basic auth."""

    def __init__(
        self, workdir: Path, name: str, credentials: tuple[str, str] | None = None
    ) -> None:
        self.name = name
        self.credentials = credentials
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        root = workdir / name
        root.mkdir(parents=True, exist_ok=True)
        config: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(root / "data")},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": f"fledged-test-{name}"},
        }
        if credentials:
            htpasswd = root / "htpasswd"
            user, password = credentials
            line = subprocess.run(
                [str(binary("htpasswd")), "-nbB", user, password],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            htpasswd.write_text(line + "\n")
            config["auth"] = {"htpasswd": {"realm": "fledged-test", "path": str(htpasswd)}}
        config_path = root / "config.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.process = ManagedProcess(
            f"registry-{name}",
            [binary("docker-registry"), "serve", config_path],
            workdir / "logs" / f"registry-{name}.log",
        )

    def start(self) -> None:
        self.process.start()
        self.process.wait_until(self._answers, timeout=30, what="registry /v2/")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=2) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError as err:
            return err.code == 401 and self.credentials is not None
