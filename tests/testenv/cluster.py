"""The whole test environment as one object: used by pytest fixtures, `make demo` and
the benchmarks alike.

Start-up order: CA, etcd, registries (their ports go into containerd's and dockerd's
registry config), then the apiserver, containerd instances and dockerd in parallel.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kubernetes import client

from .agents import AGENT_NAMESPACE, AgentProcess, CoordinatorProcess
from .containerd import Containerd
from .dockerd import Dockerd
from .images import RegistryClient
from .kube import ApiServer, Etcd, Identity, client_for
from .nodes import SimNode, node_labels, register_node
from .paths import REPO_ROOT, binary
from .pki import CertificateAuthority
from .procs import ManagedProcess, log_report
from .registry import Registry

AGENT_USER = "fledged-agent"
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
        agent_namespace: bool = True,
    ) -> None:
        """`agent_namespace`: create the agents' namespace (off where an install, as
        users run it, makes it)."""
        # Short paths: unix socket paths must stay under 108 bytes.
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="fledged-", dir="/tmp"))
        self.logs = self.workdir / "logs"
        self._node_count = nodes
        self._node_label_sets = node_label_sets or {}
        self._with_docker = with_docker
        self._agent_namespace = agent_namespace
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
        self._agent_identity: Identity | None = None
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
        if self._agent_namespace:
            core.create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=AGENT_NAMESPACE))
            )

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

    # -- agents ----------------------------------------------------------------------

    def agent_identity(self) -> Identity:
        """A client-certificate user with only the Lease rights an agent needs."""
        if self._agent_identity is None:
            ensure_agent_rbac(self.api_client(), AGENT_USER)
            self._agent_identity = self.identity(AGENT_USER)
        return self._agent_identity

    def start_agent(
        self,
        node: SimNode | None = None,
        *,
        node_name: str | None = None,
        runtime_endpoint: str | None = None,
        runtime: str = "cri",
        lease: bool = True,
        extra_args: tuple[str, ...] = (),
        name: str | None = None,
        wait_serving: bool = True,
        namespace: str = AGENT_NAMESPACE,
        kubeconfig: Path | None = None,
    ) -> AgentProcess:
        """Starts a real agent process; it is stopped with the environment.

        With `lease` it registers in `namespace` (as the least-privileged agent user in
        the default namespace, as the admin elsewhere), or as `kubeconfig` says."""
        if not lease:
            kubeconfig = None
        elif kubeconfig is None:
            default = namespace == AGENT_NAMESPACE
            kubeconfig = self.agent_identity().kubeconfig if default else self.kubeconfig
        agent = AgentProcess(
            self.workdir,
            node_name or (node.name if node else "unnamed"),
            runtime_endpoint or (node.runtime_endpoint if node else ""),
            runtime=runtime,
            kubeconfig=kubeconfig,
            extra_args=extra_args,
            name=name,
            namespace=namespace,
        )
        self._started.append(agent.process)
        agent.start(wait_serving=wait_serving)
        return agent

    def start_agents(self) -> list[AgentProcess]:
        """One agent per node, registered by Lease, as the DaemonSet would run them."""
        return [self.start_agent(node) for node in self.nodes]

    def install_crds(self) -> None:
        """Applies deploy/crds with the real kubectl and waits until they are served."""
        kubectl = [str(binary("kubectl")), f"--kubeconfig={self.kubeconfig}"]
        subprocess.run(
            [*kubectl, "apply", "-k", str(REPO_ROOT / "deploy" / "crds")],
            check=True,
            capture_output=True,
            timeout=60,
        )
        subprocess.run(
            [
                *kubectl,
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/imagecaches.kubefledged.io",
            ],
            check=True,
            capture_output=True,
            timeout=90,
        )

    def start_coordinator(
        self,
        extra_args: tuple[str, ...] = (),
        name: str = "coordinator",
        ready_timeout: float = 30,
    ) -> CoordinatorProcess:
        """A real coordinator process (admin identity) serving every namespace."""
        coordinator = CoordinatorProcess(
            self.workdir, self.kubeconfig, extra_args, name, ready_timeout
        )
        self._started.append(coordinator.process)
        coordinator.start()
        return coordinator

    def add_registry_host(self, host: str) -> None:
        """Makes another plain-HTTP registry (e.g. a proxy) reachable from every node."""
        for node in self.nodes:
            node.containerd.add_registry_host(host)

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
        return log_report(self._started, lines)


def pull_secret(
    namespace: str, name: str, host: str, password: str = AUTH_PASSWORD
) -> client.V1Secret:
    """A kubernetes.io/dockerconfigjson Secret with the authenticated registry's user."""
    auth = base64.b64encode(f"{AUTH_USER}:{password}".encode()).decode()
    return dockerconfig_secret(namespace, name, {"auths": {host: {"auth": auth}}})


def dockerconfig_secret(namespace: str, name: str, config: object) -> client.V1Secret:
    """A kubernetes.io/dockerconfigjson Secret holding `config` as it is given."""
    return client.V1Secret(
        metadata=client.V1ObjectMeta(name=name, namespace=namespace),
        type="kubernetes.io/dockerconfigjson",
        data={".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()},
    )


def ensure_agent_rbac(api: client.ApiClient, user: str) -> None:
    """A Role on Leases in the agent namespace, bound to `user` (idempotent)."""
    rbac = client.RbacAuthorizationV1Api(api)
    role = client.V1Role(
        metadata=client.V1ObjectMeta(name="fledged-agent-test"),
        rules=[
            client.V1PolicyRule(
                api_groups=["coordination.k8s.io"],
                resources=["leases"],
                verbs=["get", "create", "update", "delete"],
            )
        ],
    )
    binding = client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="fledged-agent-test"),
        role_ref=client.V1RoleRef(
            api_group="rbac.authorization.k8s.io", kind="Role", name="fledged-agent-test"
        ),
        subjects=[
            client.RbacV1Subject(kind="User", name=user, api_group="rbac.authorization.k8s.io")
        ],
    )
    try:
        rbac.create_namespaced_role(AGENT_NAMESPACE, role)
    except client.ApiException as err:
        if err.status != 409:
            raise
    try:
        rbac.create_namespaced_role_binding(AGENT_NAMESPACE, binding)
    except client.ApiException as err:
        if err.status != 409:
            raise
