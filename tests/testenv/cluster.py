"""The whole test environment as one object: used by pytest fixtures, `make demo` and
the benchmarks alike.

Start-up order: CA, etcd, registries (their ports go into containerd's and dockerd's
registry config), then the apiserver, containerd instances and dockerd in parallel.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client

from .containerd import Containerd
from .dockerd import Dockerd
from .images import RegistryClient
from .kube import ApiServer, Etcd, Identity, client_for
from .nodes import SimNode, node_labels, register_node
from .pki import CertificateAuthority
from .procs import ManagedProcess
from .registry import Registry

AUTH_USER = "fledged"
AUTH_PASSWORD = "s3cret-pull-password"  # test-only credentials of the htpasswd registry


class TestEnv:
    """Real etcd, kube-apiserver, registries, containerd per node and dockerd on loopback."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        nodes: int = 3,
        node_label_sets: dict[str, dict[str, str]] | None = None,
        with_docker: bool = True,
        workdir: Path | None = None,
    ) -> None:
        # Short paths: unix socket paths must stay under 108 bytes.
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="fledged-", dir="/tmp"))
        self.logs = self.workdir / "logs"
        self._node_count = nodes
        self._node_label_sets = node_label_sets or {}
        self._with_docker = with_docker
        self.ca = CertificateAuthority(self.workdir / "pki")
        self.etcd = Etcd(self.workdir)
        self.registry = Registry(self.workdir, "registry")
        self.auth_registry = Registry(
            self.workdir, "auth-registry", credentials=(AUTH_USER, AUTH_PASSWORD)
        )
        hosts = [self.registry.host, self.auth_registry.host]
        self.apiserver = ApiServer(self.workdir, self.etcd, self.ca)
        self.nodes = [
            SimNode(
                name=f"node-{i}",
                containerd=Containerd(self.workdir, f"node-{i}", hosts),
                labels=node_labels(f"node-{i}", self._node_label_sets.get(f"node-{i}")),
            )
            for i in range(1, nodes + 1)
        ]
        self.dockerd = Dockerd(self.workdir, hosts) if with_docker else None
        self._api_client: client.ApiClient | None = None
        self._started: list[ManagedProcess] = []

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> TestEnv:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self._run_start(self.etcd.process, self.etcd.start)
        self._run_start(self.registry.process, self.registry.start)
        self._run_start(self.auth_registry.process, self.auth_registry.start)
        starters = [(self.apiserver.process, self.apiserver.start)]
        starters += [(n.containerd.process, n.containerd.start) for n in self.nodes]
        if self.dockerd:
            starters.append((self.dockerd.process, self.dockerd.start))
        with ThreadPoolExecutor(max_workers=len(starters)) as pool:
            futures = [pool.submit(self._run_start, proc, fn) for proc, fn in starters]
            for future in futures:
                future.result()
        core = client.CoreV1Api(self.api_client())
        for node in self.nodes:
            register_node(core, node.name, node.labels)

    def _run_start(self, process: ManagedProcess, start: object) -> None:
        self._started.append(process)
        start()  # type: ignore[operator]

    def stop(self) -> None:
        """Stops every process, in reverse start order."""
        if self._api_client is not None:
            self._api_client.close()  # type: ignore[no-untyped-call]
            self._api_client = None
        for process in reversed(self._started):
            process.stop()
        self._started.clear()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TestEnv:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- access ----------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.apiserver.admin.kubeconfig

    def api_client(self) -> client.ApiClient:
        """The admin's client (system:masters), shared."""
        if self._api_client is None:
            self._api_client = client_for(self.kubeconfig)
        return self._api_client

    def identity(self, user: str, groups: tuple[str, ...] = ()) -> Identity:
        return self.apiserver.identity(user, groups)

    def registry_client(self, authenticated: bool = False) -> RegistryClient:
        if authenticated:
            return RegistryClient(self.auth_registry.host, (AUTH_USER, AUTH_PASSWORD))
        return RegistryClient(self.registry.host)

    def node(self, name: str) -> SimNode:
        return next(n for n in self.nodes if n.name == name)

    def processes(self) -> list[ManagedProcess]:
        return list(self._started)

    def log_report(self, lines: int = 30) -> str:
        parts = [f"--- {p.name} ({p.log_path}) ---\n{p.log_tail(lines)}" for p in self._started]
        return "\n".join(parts)


@contextlib.contextmanager
def running_testenv(**kwargs: object) -> Iterator[TestEnv]:
    env = TestEnv(**kwargs)  # type: ignore[arg-type]
    env.start()
    try:
        yield env
    finally:
        env.stop()
