"""Where the test environment finds its binaries and keeps its files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("FLEDGED_TESTENV_BIN", REPO_ROOT / ".testenv" / "bin"))

# Built from pinned Go modules by tools/build-testenv.sh (`make testenv`).
BUILT = (
    "etcd",
    "kube-apiserver",
    "kubectl",
    "kubelet",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "helm",
)
# From Debian's packages (.ci/run installs them).
SYSTEM = {"docker-registry": "docker-registry", "dockerd": "docker.io", "htpasswd": "apache2-utils"}


class MissingBinary(RuntimeError):
    """A component the tests need is not installed; the message says how to get it."""


def binary(name: str) -> Path:
    if name in BUILT:
        path = BIN_DIR / name
        if not path.exists():
            raise MissingBinary(f"{name} not found in {BIN_DIR}: run `make testenv` to build it")
        return path
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if not found:
        pkg = SYSTEM.get(name, name)
        raise MissingBinary(f"{name} not found: install Debian's {pkg} (`make prereqs`)")
    return Path(found)
