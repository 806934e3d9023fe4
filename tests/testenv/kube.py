"""A real control plane: etcd and kube-apiserver with TLS, client certificates and RBAC."""

from __future__ import annotations

import json
import signal
import ssl
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml
from kubernetes import client

from coordinator.apiclient import kube_client

from .paths import binary
from .pki import CertFiles, CertificateAuthority, signing_keypair
from .procs import ManagedProcess, free_port

SERVICE_CIDR = "10.0.0.0/24"
# Where pods of kubelet nodes reach the apiserver (a relay on a host-only address while
# kubelet nodes run: pods cannot reach loopback); named in the serving certificate.
POD_API_ADDRESS = "10.244.0.1"


@dataclass(frozen=True)
class Identity:
    """A client-certificate user of the apiserver and its kubeconfig."""

    user: str
    groups: tuple[str, ...]
    kubeconfig: Path


def write_kubeconfig(path: Path, server: str, ca: Path, client: CertFiles, user: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "fledged-test",
                "cluster": {"server": server, "certificate-authority": str(ca)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate": str(client.cert), "client-key": str(client.key)},
            }
        ],
        "contexts": [
            {"name": "fledged-test", "context": {"cluster": "fledged-test", "user": user}}
        ],
        "current-context": "fledged-test",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def client_for(kubeconfig: Path) -> client.ApiClient:
    """An API client acting as the identity in `kubeconfig`."""
    return kube_client(str(kubeconfig))


class Etcd:
    def __init__(self, workdir: Path) -> None:
        self.client_port = free_port()
        peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        self.process = ManagedProcess(
            "etcd",
            [
                binary("etcd"),
                "--name=default",
                f"--data-dir={workdir / 'etcd'}",
                f"--listen-client-urls={self.url}",
                f"--advertise-client-urls={self.url}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync",  # test data only; fsync would dominate on small disks
                "--log-level=warn",
            ],
            workdir / "logs" / "etcd.log",
        )

    def start(self) -> None:
        self.process.start()
        self.process.wait_until(self._healthy, timeout=30, what="etcd /health")

    def _healthy(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
            return bool(json.load(resp).get("health") == "true")


class ApiServer:
    """kube-apiserver on loopback; `admin` is in system:masters, others get nothing."""

    def __init__(self, workdir: Path, etcd: Etcd, ca: CertificateAuthority) -> None:
        self.workdir = workdir / "apiserver"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ca = ca
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        serving = ca.issue(
            "apiserver",
            "kube-apiserver",
            dns_names=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            ips=("127.0.0.1", "10.0.0.1", POD_API_ADDRESS),
            server=True,
        )
        self.sa_keys = signing_keypair(self.workdir, "service-account")
        self.admin = self.identity("kubernetes-admin", ("system:masters",))
        self.process = ManagedProcess(
            "kube-apiserver",
            [
                binary("kube-apiserver"),
                f"--etcd-servers={etcd.url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={ca.cert_path}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={self.sa_keys.cert}",
                f"--service-account-signing-key-file={self.sa_keys.key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--cert-dir={self.workdir / 'certs'}",
                "--allow-privileged=true",
                # The endpoint of the `kubernetes` Service would be 127.0.0.1, which
                # Endpoints reject; nothing in the tests reaches the apiserver that way.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--v=1",
            ],
            workdir / "logs" / "kube-apiserver.log",
        )

    def identity(self, user: str, groups: tuple[str, ...] = ()) -> Identity:
        """A new client-certificate user with its own kubeconfig (RBAC decides its rights)."""
        safe = user.replace(":", "_")
        cert = self.ca.issue(f"user-{safe}", user, organizations=groups, client=True)
        path = write_kubeconfig(
            self.workdir / f"kubeconfig-{safe}", self.url, self.ca.cert_path, cert, user
        )
        return Identity(user, groups, path)

    def start(self) -> None:
        self.process.start()
        self.process.wait_until(self._ready, timeout=120, what="kube-apiserver /readyz")

    def restart(self, down: float = 0.0, sig: int = signal.SIGTERM) -> None:
        """Stopped by `sig`, then started again on the same port and etcd after `down`
        seconds, as an upgrade or a crash of the control plane does."""
        self.process.stop(sig=sig)
        time.sleep(down)
        self.start()

    def _ready(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.ca.cert_path))
        admin_cert = self.ca.directory / "user-kubernetes-admin.crt"
        ctx.load_cert_chain(admin_cert, self.ca.directory / "user-kubernetes-admin.key")
        with urllib.request.urlopen(f"{self.url}/readyz", context=ctx, timeout=5) as resp:
            return bool(resp.status == 200)
