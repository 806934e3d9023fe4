"""Real kubelet nodes beside the simulated ones: kube-controller-manager and
kube-scheduler for the control plane, and per node a containerd that runs containers
(runc through containerd-shim-runc-v2, CNI bridge) with a kubelet in front of it.

Each node's containerd and kubelet share a mount namespace of their own, in which the
runtime's usual paths (/run/containerd, /var/lib/containerd) are that node's
directories, as on a machine of its own: a DaemonSet's hostPath of the socket, the
chart's default, reaches each node's own containerd.

Everything host-wide a kubelet touches is recorded before it starts and put back when
it stops (`HostState`): sysctls, iptables chains, directories, mounts, cgroups, bridges,
network namespaces and the containerd shims, which outlive their containerd.
See ../shared/FACTS.md ("A real kubelet on this machine") for why each setting is here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kubernetes import client

from .containerd import Containerd
from .kube import POD_API_ADDRESS, ApiServer
from .paths import BIN_DIR, binary
from .procs import ManagedProcess, free_port, log_report
from .proxy import RegistryProxy

# The kubelet sets the first three; the CNI bridge plugin (isGateway) turns forwarding on.
SYSCTLS = (
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
)
# Where a node's runtime keeps its socket and its images (the chart's containerd preset).
NODE_PATHS = ("/run/containerd", "/var/lib/containerd")
HOST_DIRS = (
    "/var/log/containers",
    "/var/log/pods",
    "/usr/libexec/kubernetes",
    "/var/lib/cni",
    "/run/netns",
    "/var/lib/kubelet",
    *NODE_PATHS,  # the mount points of the nodes' own directories
)
CGROUP_ROOT = Path("/sys/fs/cgroup")
SHIM = "containerd-shim-runc-v2"
# Kubelet clusters may start in threads (one runs beside the suite): one at a time
# records, changes or restores the host, so none takes another's changes for its own.
HOST_LOCK = threading.RLock()


def _iptables_chains() -> set[str]:
    chains = set()
    for tool in ("iptables-save", "ip6tables-save"):
        if shutil.which(tool) is None:
            continue
        out = subprocess.run([tool], capture_output=True, text=True, check=False).stdout
        table = ""
        for line in out.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                chains.add(f"{tool.split('-')[0]} {table} {line[1:].split()[0]}")
    return chains


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def mounts_under(prefix: str | Path) -> list[str]:
    prefix = str(prefix)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix.rstrip("/") + "/")]


def _cgroup_dirs(name: str) -> list[Path]:
    return [d / name for d in CGROUP_ROOT.iterdir() if (d / name).exists()]


def _processes(needle: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            pids.append(int(entry.name))
    return pids


@dataclass
class HostSnapshot:
    """What a kubelet node may change on the host, as found."""

    sysctls: dict[str, str]
    chains: set[str]
    dirs: dict[str, bool]
    links: set[str]
    netns: set[str]
    cgroups: set[str]  # hierarchy/top-level group
    mounts: set[str]
    shims: set[int]

    @classmethod
    def take(cls) -> HostSnapshot:
        netns = Path("/run/netns")
        with open("/proc/self/mountinfo") as f:
            mounts = {line.split()[4] for line in f}
        return cls(
            sysctls={k: Path("/proc/sys", k).read_text().strip() for k in SYSCTLS},
            chains=_iptables_chains(),
            dirs={d: Path(d).exists() for d in HOST_DIRS},
            links=_links(),
            netns=set(os.listdir(netns)) if netns.exists() else set(),
            cgroups={
                f"{top.name}/{d.name}"
                for top in CGROUP_ROOT.iterdir()
                if top.is_dir()
                for d in top.iterdir()
                if d.is_dir()
            },
            mounts=mounts,
            shims=set(_processes(SHIM)),
        )

    def differences(self, other: HostSnapshot) -> list[str]:
        out = []
        for key in SYSCTLS:
            if self.sysctls[key] != other.sysctls[key]:
                out.append(f"sysctl {key}: {self.sysctls[key]} -> {other.sysctls[key]}")
        out += [f"iptables chain added: {c}" for c in sorted(other.chains - self.chains)]
        out += [
            f"directory added: {d}" for d, there in other.dirs.items() if there and not self.dirs[d]
        ]
        out += [f"link added: {link}" for link in sorted(other.links - self.links)]
        out += [f"netns added: {n}" for n in sorted(other.netns - self.netns)]
        out += [f"cgroup added: {c}" for c in sorted(other.cgroups - self.cgroups)]
        out += [f"mount added: {m}" for m in sorted(other.mounts - self.mounts)]
        out += [f"shim left running: pid {p}" for p in sorted(other.shims - self.shims)]
        return out


@dataclass
class HostState:
    """Puts the host back as `before` found it; also what a node left under `workdir`."""

    before: HostSnapshot = field(default_factory=HostSnapshot.take)

    def restore(
        self, workdir: Path, cgroup_names: list[str], containerd_sockets: list[Path]
    ) -> None:
        for socket in containerd_sockets:  # shims outlive containerd, in their own groups
            for pid in _processes(f"-address {socket}"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
        for point in sorted(mounts_under(str(workdir)), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        for name in cgroup_names:
            for top in _cgroup_dirs(name):
                _remove_cgroup(top)
        after = HostSnapshot.take()
        for key in SYSCTLS:
            if after.sysctls[key] != self.before.sysctls[key]:
                Path("/proc/sys", key).write_text(self.before.sysctls[key])
        for chain in sorted(after.chains - self.before.chains):
            tool, table, name = chain.split()
            subprocess.run([tool, "-t", table, "-F", name], check=False, capture_output=True)
            subprocess.run([tool, "-t", table, "-X", name], check=False, capture_output=True)
        for link in after.links - self.before.links:
            subprocess.run(["ip", "link", "del", link], check=False, capture_output=True)
        for ns in after.netns - self.before.netns:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        for d, there in self.before.dirs.items():
            if not there and Path(d).exists():
                for point in sorted(mounts_under(d), key=len, reverse=True):
                    subprocess.run(["umount", "-l", point], check=False, capture_output=True)
                shutil.rmtree(d, ignore_errors=True)


def own_mounts(binds: Mapping[str, Path]) -> list[str]:
    """An argv prefix: the command runs in a new private mount namespace in which each
    host path (a key) shows its directory (the value). Nothing mounted there, by the
    command or its children, is seen on the host; it all goes with the last process."""
    script = " && ".join(f'mount --bind "${i + 1}" {target}' for i, target in enumerate(binds))
    script += f' && shift {len(binds)} && exec "$@"'
    return [
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", script, "node-mounts", *(str(v) for v in binds.values()),
    ]  # fmt: skip


def _remove_cgroup(path: Path) -> None:
    """Kills what still runs in the group (a pod's processes outlive a stopped kubelet),
    then rmdir bottom-up: cgroupfs removes only a group with no tasks and no children."""
    for _ in range(50):
        if not path.exists():
            return
        for procs in path.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            path.rmdir()
        time.sleep(0.1)


class ControlPlaneExtras:
    """kube-controller-manager (ServiceAccounts, their tokens, kube-root-ca.crt,
    Deployments, DaemonSets) and kube-scheduler, against the suite's apiserver."""

    def __init__(self, workdir: Path, apiserver: ApiServer) -> None:
        admin = apiserver.admin.kubeconfig
        logs = workdir / "logs"
        self.controller_manager = ManagedProcess(
            "kube-controller-manager",
            [
                binary("kube-controller-manager"),
                f"--kubeconfig={admin}",
                f"--authentication-kubeconfig={admin}",
                f"--authorization-kubeconfig={admin}",
                f"--service-account-private-key-file={apiserver.sa_keys.key}",
                f"--root-ca-file={apiserver.ca.cert_path}",
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={workdir / 'kcm-certs'}",
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller",
                "--v=1",
            ],
            logs / "kube-controller-manager.log",
        )
        self.scheduler = ManagedProcess(
            "kube-scheduler",
            [
                binary("kube-scheduler"),
                f"--kubeconfig={admin}",
                f"--authentication-kubeconfig={admin}",
                f"--authorization-kubeconfig={admin}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={workdir / 'scheduler-certs'}",
                "--v=1",
            ],
            logs / "kube-scheduler.log",
        )

    def processes(self) -> list[ManagedProcess]:
        return [self.controller_manager, self.scheduler]

    def start(self) -> None:
        self.controller_manager.start()
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self.controller_manager.stop()


class KubeletNode:
    """One real node: its containerd (runs containers), CNI bridge, cgroup root and
    kubelet, named after the loopback address its kubelet listens on (127.0.0.N), so
    the apiserver reaches it for `kubectl logs` and `exec`."""

    def __init__(
        self,
        workdir: Path,
        index: int,
        apiserver: ApiServer,
        registry_hosts: list[str],
        pause_image: str,
        labels: dict[str, str] | None = None,
        kubelet_config: dict[str, object] | None = None,
        kubelet_flags: tuple[str, ...] = (),
    ) -> None:
        self.index = index
        self.labels = dict(labels or {})
        self.address = f"127.0.0.{index + 1}"
        self.name = self.address
        self.dir = workdir / f"kubelet-{index}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cgroup = f"fledged-kubelet-{index}-{os.getpid()}"
        self.bridge = f"fl{os.getpid() % 10000}k{index}"
        cni_dir = self.dir / "cni"
        cni_dir.mkdir(exist_ok=True)
        (cni_dir / "10-bridge.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": f"fledged-{index}",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": self.bridge,
                            "isGateway": True,
                            "ipMasq": False,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": f"10.244.{100 + index}.0/24"}]],
                                # Through the bridge: the host, other nodes' pods, the
                                # apiserver's relay (POD_API_ADDRESS).
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(self.dir / "ipam"),
                            },
                        }
                    ],
                }
            )
        )
        extra = (
            '\n[plugins."io.containerd.cri.v1.runtime"]\n'
            "  restrict_oom_score_adj = true\n\n"
            '[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]\n'
            f'  Root = "{self.dir / "runc"}"\n\n'
            '[plugins."io.containerd.cri.v1.runtime".cni]\n'
            '  bin_dirs = ["/usr/lib/cni"]\n'
            f'  conf_dir = "{cni_dir}"\n\n'
            '[plugins."io.containerd.cri.v1.images".pinned_images]\n'
            f'  sandbox = "{pause_image}"\n'
        )
        path = f"{BIN_DIR}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        self.containerd = Containerd(
            workdir,
            f"kubelet-{index}-ctr",
            registry_hosts,
            extra_config=extra,
            env={**os.environ, "PATH": path},
            socket=self.dir / "run-containerd" / "containerd.sock",
        )
        # Seen from the node's mount namespace, its socket and store at the usual paths.
        self.binds = dict(
            zip(NODE_PATHS, (self.containerd.socket.parent, self.containerd.root), strict=True)
        )
        for source in self.binds.values():
            source.mkdir(parents=True, exist_ok=True)
        self.containerd.run_under(own_mounts(self.binds))
        identity = apiserver.identity(f"system:node:{self.name}", ("system:masters",))
        self.port = free_port()
        self.healthz_port = free_port()
        config: dict[str, object] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.address,
            "port": self.port,
            "readOnlyPort": 0,
            "healthzBindAddress": self.address,
            "healthzPort": self.healthz_port,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.cgroup}",
            "failCgroupV1": False,
            "failSwapOn": False,
            "makeIPTablesUtilChains": False,
            "volumePluginDir": str(self.dir / "volume-plugins"),
            "podLogsDir": str(self.dir / "pod-logs"),
            "authentication": {
                "anonymous": {"enabled": True},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(apiserver.ca.cert_path)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "serializeImagePulls": False,
            "resolvConf": "",
            "containerRuntimeEndpoint": self.containerd.endpoint,
            "imageServiceEndpoint": self.containerd.endpoint,
            "registerNode": True,
            "nodeStatusReportFrequency": "10s",
            "nodeStatusUpdateFrequency": "2s",
            "syncFrequency": "5s",
            **(kubelet_config or {}),
        }
        config_path = self.dir / "kubelet.yaml"
        config_path.write_text(yaml.safe_dump(config))
        argv: list[str | Path] = [
            binary("kubelet"),
            f"--config={config_path}",
            f"--kubeconfig={identity.kubeconfig}",
            # Its Hostname address is what the apiserver prefers for logs and exec (a
            # loopback --node-ip is refused: "nodeIP can't be loopback address").
            f"--hostname-override={self.name}",
            f"--root-dir={self.dir / 'root'}",
            f"--cert-dir={self.dir / 'pki'}",
            "--v=1",
            *kubelet_flags,
        ]
        if labels:
            argv.append("--node-labels=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())))
        self._kubelet_argv = [str(a) for a in argv]
        self.kubelet = ManagedProcess(
            f"kubelet-{index}", argv, workdir / "logs" / f"kubelet-{index}.log"
        )

    def _make_cgroup(self) -> None:
        """The cgroup root in every v1 hierarchy, cpuset filled from its parent's."""
        for top in CGROUP_ROOT.iterdir():
            if not top.is_dir() or top.name == "unified":
                continue
            d = top / self.cgroup
            d.mkdir(exist_ok=True)
            if top.name == "cpuset":
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (d / knob).write_text((top / knob).read_text())

    def start(self) -> None:
        self._make_cgroup()
        for target in self.binds:
            Path(target).mkdir(parents=True, exist_ok=True)  # a mount point; removed at restore
        self.containerd.start()
        # The kubelet joins containerd's mount namespace: the volumes it mounts for a
        # pod must be where runc, started by containerd, looks for them.
        self.kubelet.argv = [
            "nsenter",
            f"--mount=/proc/{self.containerd.process.pid}/ns/mnt",
            "--",
            *self._kubelet_argv,
        ]
        self.kubelet.start()

    def node_mounts(self) -> list[str]:
        """Mount points in the node's own mount namespace (not on the host)."""
        with open(f"/proc/{self.containerd.process.pid}/mountinfo") as f:
            return [line.split()[4] for line in f]

    def ready(self, core: client.CoreV1Api) -> bool:
        try:
            node = core.read_node(self.name)
        except client.ApiException:
            return False
        conditions = (node.status.conditions if node.status else None) or []
        return any(c.type == "Ready" and c.status == "True" for c in conditions)

    def stop(self) -> None:
        self.kubelet.stop()
        self.containerd.stop()


class KubeletCluster:
    """The kubelet nodes of a test session with their control plane, and the host as
    they found it; `stop` leaves nothing behind (processes, mounts, cgroups, links)."""

    def __init__(
        self,
        workdir: Path,
        nodes: list[KubeletNode],
        extras: ControlPlaneExtras,
        apiserver: ApiServer | None = None,
    ) -> None:
        """With `apiserver`, pods reach it at `api_host`:`api_port` (a relay on a
        host-only address: an apiserver on loopback is out of a pod's reach)."""
        self.workdir = workdir
        self.nodes = nodes
        self.extras = extras
        self.host: HostState | None = None  # recorded when it starts
        self.api_link = f"fl{os.getpid() % 10000}api"
        self.api_relay = (
            RegistryProxy(f"127.0.0.1:{apiserver.port}", listen_host=POD_API_ADDRESS)
            if apiserver
            else None
        )
        self._relay_started = False

    def processes(self) -> list[ManagedProcess]:
        """Every process of the nodes and their control plane (for log reports)."""
        own = [p for n in self.nodes for p in (n.containerd.process, n.kubelet)]
        return [*self.extras.processes(), *own]

    def log_report(self, lines: int = 30) -> str:
        """The processes' logs, then every container's (what `kubectl logs` shows)."""
        parts = [log_report(self.processes(), lines)]
        for node in self.nodes:
            for path in sorted((node.dir / "pod-logs").glob("*/*/*.log")):
                tail = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                parts.append(f"--- container log {path} ---\n{tail}")
        return "\n".join(parts)

    @property
    def api_host(self) -> str:
        return POD_API_ADDRESS

    @property
    def api_port(self) -> int:
        assert self.api_relay is not None, "made without the apiserver"
        return self.api_relay.port

    def _start_api_relay(self) -> None:
        """A bridge with no ports holds the address: no dummy links on every host."""
        assert self.api_relay is not None
        for cmd in (
            ["ip", "link", "add", self.api_link, "type", "bridge"],
            ["ip", "addr", "add", f"{POD_API_ADDRESS}/32", "dev", self.api_link],
            ["ip", "link", "set", self.api_link, "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True)
        self.api_relay.start()
        self._relay_started = True

    def start(self, core: client.CoreV1Api, timeout: float = 120) -> None:
        with HOST_LOCK:
            self.host = HostState()
            if self.api_relay is not None:
                self._start_api_relay()
            self.extras.start()
            for node in self.nodes:
                node.start()
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.kubelet.wait_until(
                lambda n=node: n.ready(core),  # type: ignore[misc]
                timeout=max(1.0, deadline - time.monotonic()),
                what=f"node {node.name} Ready",
            )

    def stop(self, core: client.CoreV1Api | None = None) -> None:
        for node in self.nodes:
            node.stop()
        self.extras.stop()
        if self.api_relay is not None and self._relay_started:
            self.api_relay.stop()
        if self.host is not None:
            with HOST_LOCK:
                self.host.restore(
                    self.workdir,
                    [n.cgroup for n in self.nodes],
                    [n.containerd.socket for n in self.nodes],
                )
        if core is not None:
            for node in self.nodes:
                with contextlib.suppress(client.ApiException):
                    core.delete_node(node.name)
