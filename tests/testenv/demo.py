"""`make demo`: starts the local cluster and leaves it up to explore by hand.

Today it shows the foundation: a real apiserver, three simulated nodes each with its
own containerd, and the local registries with a few demo images pushed. The agent and
the coordinator join this demo as they land (see the README's status section).
"""

from __future__ import annotations

import signal
import sys
import time

from tests.testenv import TestEnv
from tests.testenv.runtime import NodeRuntime

DEMO_IMAGES = (("demo/tiny", "v1", 64 * 1024, 1), ("demo/medium", "v1", 8 << 20, 4))


def main() -> int:
    env = TestEnv(nodes=3, with_docker=False)
    print(f"starting the local cluster in {env.workdir} ...", flush=True)
    env.start()
    try:
        registry = env.registry_client()
        pushed = [
            registry.push_image(repo, tag, size, layers) for repo, tag, size, layers in DEMO_IMAGES
        ]
        with NodeRuntime(env.nodes[0].runtime_endpoint) as node:
            node.pull(pushed[0].ref)
            held = [t for img in node.list() for t in img.repo_tags]
        print("\nThe local cluster is up:")
        print(f"  export KUBECONFIG={env.kubeconfig}")
        print(
            f"  {env.apiserver.process.argv[0].rsplit('/', 1)[0]}/kubectl get nodes --show-labels"
        )
        for node_ in env.nodes:
            print(f"  {node_.name}: containerd at {node_.runtime_endpoint}")
        print(f"  registry {env.registry.url} holds: " + ", ".join(p.ref for p in pushed))
        print(f"  node-1 pulled through CRI and now holds: {', '.join(held)}")
        print(f"  logs: {env.logs}")
        print("\nPress Ctrl-C to stop every process.", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping ...", flush=True)
        env.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
