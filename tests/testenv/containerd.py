"""Real containerd 2.x, one instance per simulated node, each with its own root and socket."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc

from .images import host_arch
from .paths import binary
from .procs import ManagedProcess, unix_socket_ready

K8S_NAMESPACE = "k8s.io"


def write_hosts_toml(certs_d: Path, registry_hosts: Iterable[str]) -> None:
    """Points containerd's registry config path at each local registry over plain HTTP."""
    for host in registry_hosts:
        folder = certs_d / host
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts.toml").write_text(
            f'server = "http://{host}"\n\n'
            f'[host."http://{host}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )


class Containerd:
    """A containerd with the CRI plugin; `endpoint` is what an agent is given."""

    BINARY: str | None = None  # None: the suite's own build (2.x)

    def __init__(
        self,
        workdir: Path,
        name: str,
        registry_hosts: Iterable[str],
        extra_config: str = "",
        env: dict[str, str] | None = None,
        socket: Path | None = None,
    ) -> None:
        """`extra_config`: TOML appended to the config (a kubelet node's CRI runtime
        settings); `env`: the daemon's environment (its shim on PATH); `socket`: where
        it listens (default: in its own directory)."""
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = socket or self.dir / "containerd.sock"
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        self.endpoint = f"unix://{self.socket}"
        self.root = self.dir / "root"
        self.certs_d = certs_d = self.dir / "certs.d"
        write_hosts_toml(certs_d, registry_hosts)
        config = self.dir / "config.toml"
        config.write_text(self._config(certs_d, extra_config))
        self.process = ManagedProcess(
            f"containerd-{name}",
            [self.BINARY or binary("containerd"), "--config", config],
            workdir / "logs" / f"containerd-{name}.log",
            env=env,
        )

    def _listen(self) -> str:
        """Where the daemon listens, the same in every config format."""
        return (
            f'[grpc]\n  address = "{self.socket}"\n\n[ttrpc]\n  address = "{self.socket}.ttrpc"\n\n'
        )

    def _config(self, certs_d: Path, extra_config: str) -> str:
        return (
            "version = 3\n"
            f'root = "{self.root}"\n'
            f'state = "{self.dir / "state"}"\n'
            f'temp = "{self.dir / "tmp"}"\n'
            # Plugins that are host-global or need kernel features a test node lacks.
            "disabled_plugins = [\n"
            '  "io.containerd.nri.v1.nri",\n'
            '  "io.containerd.snapshotter.v1.btrfs",\n'
            '  "io.containerd.snapshotter.v1.zfs",\n'
            '  "io.containerd.snapshotter.v1.devmapper",\n'
            '  "io.containerd.snapshotter.v1.blockfile",\n'
            '  "io.containerd.snapshotter.v1.erofs",\n'
            '  "io.containerd.tracing.processor.v1.otlp",\n'
            '  "io.containerd.internal.v1.tracing",\n'
            "]\n\n" + self._listen() + "[debug]\n"
            '  level = "info"\n\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{self.dir / "opt"}"\n\n'
            '[plugins."io.containerd.cri.v1.images"]\n'
            '  snapshotter = "native"\n\n'
            '[plugins."io.containerd.cri.v1.images".registry]\n'
            f'  config_path = "{certs_d}"\n\n'
            # CRI pulls go through the transfer service, which unpacks only into the
            # snapshotters listed here (the default names overlayfs).
            '[plugins."io.containerd.transfer.v1.local"]\n'
            f'  config_path = "{certs_d}"\n\n'
            '[[plugins."io.containerd.transfer.v1.local".unpack_config]]\n'
            f'  platform = "linux/{host_arch()}"\n'
            '  snapshotter = "native"\n'
            '  differ = "walking"\n' + extra_config
        )

    def run_under(self, prefix: Sequence[str]) -> None:
        """Runs the daemon under `prefix` (a kubelet node's own mount namespace)."""
        self.process.argv = [*prefix, *self.process.argv]

    def start(self) -> None:
        self.process.start()
        self.process.wait_until(self._serving, timeout=60, what="containerd CRI ImageService")

    def add_registry_host(self, host: str) -> None:
        """Makes another plain-HTTP registry reachable (containerd reads this per pull)."""
        write_hosts_toml(self.certs_d, [host])

    def stop(self) -> None:
        self.process.stop()

    def _serving(self) -> bool:
        if not unix_socket_ready(self.socket):
            return False
        from protos.cri.runtime.v1 import api_pb2, api_pb2_grpc

        with grpc.insecure_channel(self.endpoint) as channel:
            api_pb2_grpc.ImageServiceStub(channel).ImageFsInfo(
                api_pb2.ImageFsInfoRequest(), timeout=2
            )
        return True

    def channel(self) -> grpc.Channel:
        """A synchronous channel to this containerd (CRI and containerd services alike)."""
        return grpc.insecure_channel(self.endpoint)


class DebianContainerd(Containerd):
    """Debian 12's own containerd package (1.6), whose CRI ignores pin labels: what a
    node still on 1.6 runs. Its config is the version 2 format, CRI in one plugin."""

    BINARY = "/usr/bin/containerd"

    def _config(self, certs_d: Path, extra_config: str) -> str:
        return (
            "version = 2\n"
            f'root = "{self.root}"\n'
            f'state = "{self.dir / "state"}"\n'
            "disabled_plugins = [\n"
            '  "io.containerd.snapshotter.v1.btrfs",\n'
            '  "io.containerd.snapshotter.v1.zfs",\n'
            '  "io.containerd.snapshotter.v1.devmapper",\n'
            '  "io.containerd.snapshotter.v1.aufs",\n'
            '  "io.containerd.tracing.processor.v1.otlp",\n'
            '  "io.containerd.internal.v1.tracing",\n'
            "]\n\n" + self._listen() + '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{self.dir / "opt"}"\n\n'
            '[plugins."io.containerd.grpc.v1.cri".containerd]\n'
            '  snapshotter = "native"\n\n'
            '[plugins."io.containerd.grpc.v1.cri".registry]\n'
            f'  config_path = "{certs_d}"\n' + extra_config
        )
