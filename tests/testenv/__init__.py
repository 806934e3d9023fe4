"""The real local test environment: etcd, kube-apiserver, registries, containerd per
simulated node and dockerd, all started on loopback by the test suite itself."""

from .cluster import AUTH_PASSWORD, AUTH_USER, TestEnv, dockerconfig_secret, pull_secret
from .images import PushedImage, RegistryClient
from .nodes import SimNode
from .paths import MissingBinary

__all__ = [
    "AUTH_PASSWORD",
    "AUTH_USER",
    "MissingBinary",
    "PushedImage",
    "RegistryClient",
    "SimNode",
    "TestEnv",
    "dockerconfig_secret",
    "pull_secret",
]
