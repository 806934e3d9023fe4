"""Real agent processes (`python -m agent.main`), one per simulated node or ad hoc."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.fledged.agent.v1 import agent_pb2, agent_pb2_grpc

from .paths import REPO_ROOT
from .procs import ManagedProcess, free_port

AGENT_NAMESPACE = "kube-fledged"


class AgentProcess:
    """An agent serving one runtime; `stub()` talks to it."""

    def __init__(
        self,
        workdir: Path,
        node_name: str,
        runtime_endpoint: str,
        runtime: str = "cri",
        kubeconfig: Path | None = None,
        extra_args: Sequence[str] = (),
        name: str | None = None,
        namespace: str = AGENT_NAMESPACE,
    ) -> None:
        self.node_name = node_name
        self.port = free_port()
        self.metrics_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        argv: list[str | Path] = [
            sys.executable,
            "-m",
            "agent.main",
            f"--node-name={node_name}",
            f"--listen={self.address}",
            f"--runtime={runtime}",
            f"--runtime-endpoint={runtime_endpoint}",
            f"--metrics-listen=127.0.0.1:{self.metrics_port}",
            f"--namespace={namespace}",
            "--health-interval=1s",
            "--lease-renew-interval=2s",
            "--lease-duration=10s",
            "--log-level=debug",
        ]
        argv += [f"--kubeconfig={kubeconfig}"] if kubeconfig else ["--no-lease"]
        argv += list(extra_args)
        self.tls = any(a.startswith("--tls-cert") for a in extra_args)
        self.health_address = next(
            (a.split("=", 1)[1] for a in extra_args if a.startswith("--health-listen=")), None
        )
        label = name or f"agent-{node_name}"
        self.process = ManagedProcess(label, argv, workdir / "logs" / f"{label}.log", cwd=REPO_ROOT)

    def start(self, wait_serving: bool = True) -> AgentProcess:
        self.process.start()
        if self.tls and not self.health_address:
            self.process.wait_until(self._listening, timeout=30, what="agent port")
        elif wait_serving:
            self.process.wait_until(self.serving, timeout=30, what="agent health SERVING")
        return self

    def stop(self) -> None:
        self.process.stop()

    def _listening(self) -> bool:
        from .procs import port_open

        return port_open(self.port)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(self.health_address or self.address) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=3
            )
            return int(resp.status)

    def serving(self) -> bool:
        return bool(self.health() == health_pb2.HealthCheckResponse.SERVING)

    def pull(
        self,
        *pulls: agent_pb2.ImagePull,
        timeout: float = 120,
        progress: agent_pb2.Progress.ValueType = agent_pb2.PROGRESS_UNSPECIFIED,
    ) -> list[agent_pb2.PullEvent]:
        """All events of one batch, in the order the agent sent them."""
        request = agent_pb2.PullImagesRequest(images=pulls, progress=progress)
        with self.channel() as channel:
            return list(agent_pb2_grpc.AgentStub(channel).PullImages(request, timeout=timeout))

    def call(self, method: str, request: object, timeout: float = 30) -> object:
        with self.channel() as channel:
            return getattr(agent_pb2_grpc.AgentStub(channel), method)(request, timeout=timeout)

    def metric(self, name: str) -> float:
        return read_metric(self.metrics_port, name)


def read_metric(port: int, name: str) -> float:
    """The value of one unlabelled sample on a local /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{}"):
                return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


class CoordinatorProcess:
    """`python -m coordinator.main` against the test apiserver."""

    def __init__(
        self,
        workdir: Path,
        kubeconfig: Path,
        extra_args: Sequence[str] = (),
        name: str = "coordinator",
        ready_timeout: float = 30,
    ) -> None:
        # A coordinator listing thousands of agents takes longer to become ready.
        self.ready_timeout = ready_timeout
        self.metrics_port = free_port()
        self.health_port = free_port()
        argv: list[str | Path] = [
            sys.executable,
            "-m",
            "coordinator.main",
            f"--kubeconfig={kubeconfig}",
            f"--agent-namespace={AGENT_NAMESPACE}",
            f"--metrics-bind-address=127.0.0.1:{self.metrics_port}",
            f"--health-probe-bind-address=127.0.0.1:{self.health_port}",
            "--image-cache-refresh-frequency=0s",
            "--image-pull-deadline-duration=60s",
            "--log-level=debug",
            *extra_args,
        ]
        self.process = ManagedProcess(name, argv, workdir / "logs" / f"{name}.log", cwd=REPO_ROOT)

    def start(self, wait_ready: bool = True) -> CoordinatorProcess:
        self.process.start()
        if wait_ready:
            self.process.wait_until(
                self.ready, timeout=self.ready_timeout, what="coordinator /readyz"
            )
        return self

    def ready(self) -> bool:
        """/readyz, and /healthz too: every start checks the event loop's heartbeat."""
        import urllib.request

        for path in ("/readyz", "/healthz"):
            url = f"http://127.0.0.1:{self.health_port}{path}"
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status != 200:
                    return False
        return True

    def metric(self, name: str) -> float:
        return read_metric(self.metrics_port, name)

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        """SIGKILL, as an OOM kill or a node crash would."""
        self.process.kill()

    def restart(self) -> None:
        self.process.start()
        self.process.wait_until(self.ready, timeout=self.ready_timeout, what="coordinator /readyz")
