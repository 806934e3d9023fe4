"""`make demo`: kube-fledged on a local cluster, end to end, in one command.

Starts the real test environment (kube-apiserver, three simulated nodes each with its
own containerd, registries), the agents and the coordinator as processes; pushes demo
images named like those in deploy/samples/imagecache.yaml; applies that sample with
its images moved to the local registry (one of them private, behind the sample's pull
secret); shows the cache's progress live; then what each node holds. The cluster stays
up for trying edits, refresh and purge by hand until Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from typing import Any, cast

import yaml
from kubernetes import client
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from common.reference import parse
from tests.testenv import TestEnv, pull_secret
from tests.testenv.paths import REPO_ROOT, binary
from tests.testenv.proxy import RegistryProxy
from tests.testenv.runtime import NodeRuntime

SAMPLE = REPO_ROOT / "deploy" / "samples" / "imagecache.yaml"
NAMESPACE = "kube-fledged"
SIZES = {"nginx": (24 << 20, 3), "echoserver": (6 << 20, 2), "node": (48 << 20, 4)}
PRIVATE = "node"  # this one is served by the registry that demands the pull secret
LINK_RATE = 24 << 20  # bytes/s: a slowed link, so progress is visible


def adapt_sample(
    sample: dict[str, Any], public: str, private: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """The sample with each image moved to a local registry; and original -> local."""
    moved: dict[str, str] = {}
    for cache_list in sample["spec"]["cacheSpec"]:
        local = []
        for image in cache_list["images"]:
            ref = parse(image)
            host = private if ref.path.endswith(PRIVATE) else public
            moved[image] = f"{host}/{ref.path}:{ref.tag or 'latest'}"
            local.append(moved[image])
        cache_list["images"] = local
    return sample, moved


def render(status: dict[str, Any]) -> Group:
    summary = Table.grid(padding=(0, 2))
    summary.add_row(
        f"[bold]{status.get('status', 'Pending')}[/]",
        f"reason: {status.get('reason', '-')}",
        f"image x node ready: {status.get('ready', '-')}",
    )
    bars = Progress(
        TextColumn("{task.description}", justify="left"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    for image in status.get("images") or ():
        done_nodes, total_nodes = image["nodesReady"], image["nodesTotal"]
        pulling = image.get("bytesTotal", 0)
        detail = f"{done_nodes}/{total_nodes} nodes"
        if pulling:
            detail += (
                f"  {image.get('bytesDone', 0) / 2**20:.1f}/{pulling / 2**20:.1f} MiB in flight"
            )
        bars.add_task(
            image["image"].split("/", 1)[1],
            total=total_nodes or 1,
            completed=done_nodes,
            detail=detail,
        )
    nodes = Table(
        "node", "ready", "pulling", "bytes", title="nodes still working", title_justify="left"
    )
    for row in status.get("nodes") or ():
        got = row.get("bytesDone", 0) / 2**20
        want = row.get("bytesTotal", 0) / 2**20
        nodes.add_row(
            row["node"],
            f"{row['ready']}/{row['total']}",
            ", ".join(i.split("/", 1)[1] for i in row.get("pulling", ())) or "-",
            f"{got:.1f}/{want:.1f} MiB" if want else "-",
        )
    return Group(summary, bars, nodes) if nodes.row_count else Group(summary, bars)


def watch(env: TestEnv, name: str, console: Console, timeout: float = 300) -> dict[str, Any]:
    api = client.CustomObjectsApi(env.api_client())
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    with Live(render(status), console=console, refresh_per_second=4, transient=False) as live:
        while time.monotonic() < deadline:
            obj = cast(
                dict[str, Any],
                api.get_namespaced_custom_object(
                    "kubefledged.io", "v1alpha2", NAMESPACE, "imagecaches", name
                ),
            )
            status = obj.get("status") or {}
            live.update(render(status))
            current = status.get("observedGeneration") == obj["metadata"]["generation"]
            if current and status.get("status") in ("Succeeded", "Failed"):
                break
            time.sleep(0.5)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--exit-when-done", action="store_true", help="stop after the report (for tests)"
    )
    args = parser.parse_args(argv)
    console = Console()
    labels = {"node-2": {"tier": "backend"}, "node-3": {"tier": "backend"}}
    env = TestEnv(nodes=3, node_label_sets=labels, with_docker=False)
    console.print(f"[bold]kube-fledged demo[/]: starting a local cluster in {env.workdir} ...")
    env.start()
    proxies: list[RegistryProxy] = []
    try:
        env.install_crds()
        env.start_agents()
        coordinator = env.start_coordinator(("--log-level=info",))
        console.print("apiserver, 3 nodes with containerd, 3 agents and the coordinator are up")
        public = RegistryProxy(env.registry.host, rate=LINK_RATE).start()
        private = RegistryProxy(env.auth_registry.host, rate=LINK_RATE).start()
        proxies += [public, private]
        for proxy in proxies:
            env.add_registry_host(proxy.host)
        sample = yaml.safe_load(SAMPLE.read_text())
        sample, moved = adapt_sample(sample, public.host, private.host)
        for original, local in moved.items():
            ref = parse(local)
            size, layers = next(v for k, v in SIZES.items() if ref.path.endswith(k))
            registry = env.registry_client(authenticated=ref.domain == private.host)
            registry.push_image(ref.path, ref.tag or "latest", size=size, layers=layers)
            console.print(f"pushed {original} as {local} ({size >> 20} MiB, {layers} layers)")
        core = client.CoreV1Api(env.api_client())
        core.create_namespaced_secret(
            NAMESPACE,
            pull_secret(NAMESPACE, sample["spec"]["imagePullSecrets"][0]["name"], private.host),
        )
        kubectl = [str(binary("kubectl")), f"--kubeconfig={env.kubeconfig}"]
        subprocess.run(
            [*kubectl, "apply", "-f", "-"], input=yaml.safe_dump(sample), text=True, check=True
        )
        status = watch(env, sample["metadata"]["name"], console)
        console.print()
        subprocess.run([*kubectl, "-n", NAMESPACE, "get", "ic", "-o", "wide"], check=False)
        table = Table(
            "node",
            "image",
            "pinned",
            title="what each node's containerd holds",
            title_justify="left",
        )
        for node in env.nodes:
            with NodeRuntime(node.runtime_endpoint) as cri:
                for image in cri.list():
                    for tag in image.repo_tags:
                        table.add_row(node.name, tag, "yes" if image.pinned else "no")
        console.print(table)
        kube = f"kubectl -n {NAMESPACE}"
        hints = [
            "\nTry it by hand:",
            f"  export KUBECONFIG={env.kubeconfig}",
            f"  alias kubectl={binary('kubectl')}",
            f"  {kube} get ic -o yaml",
            f"  {kube} edit ic imagecache1",
            f"  {kube} annotate ic imagecache1 kubefledged.io/refresh-imagecache=",
            f"  {kube} annotate ic imagecache1 kubefledged.io/purge-imagecache=",
            f"  {kube} delete ic imagecache1",
            f"Logs: {env.logs} (coordinator: {coordinator.process.log_path.name})",
        ]
        for line in hints:
            console.print(line, soft_wrap=True, highlight=False)
        if args.exit_when_done:
            return 0 if status.get("status") == "Succeeded" else 1
        console.print("\n[bold]Ctrl-C[/] stops every process.")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        console.print("stopping every process ...")
        for proxy in proxies:
            proxy.stop()
        env.cleanup()


if __name__ == "__main__":
    sys.exit(main())
