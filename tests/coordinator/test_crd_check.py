"""Moving from kube-fledged with helm: helm installs a chart's CRDs only when none
exists, so kube-fledged's CRD (no status subresource, only its own status fields) stays.
Against the real apiserver: the coordinator waits, not ready, saying what to apply,
and starts once the CRD is ours, taking over kube-fledged's caches without a restart."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from coordinator.crdcheck import crd_problem
from tests.conftest import reported
from tests.coordinator.helpers import get_cache, kubectl, wait_for, wait_status
from tests.testenv import TestEnv
from tests.testenv.agents import CoordinatorProcess
from tests.testenv.paths import REPO_ROOT

OUR_CRD = REPO_ROOT / "deploy" / "crds" / "kubefledged.io_imagecaches.yaml"


def kube_fledged_crd() -> dict[str, Any]:
    """The shape of kube-fledged v0.10's ImageCache CRD: v1alpha2 served, its spec and
    status fields declared, no status subresource."""
    string = {"type": "string"}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "imagecaches.kubefledged.io"},
        "spec": {
            "group": "kubefledged.io",
            "scope": "Namespaced",
            "names": {
                "plural": "imagecaches",
                "singular": "imagecache",
                "kind": "ImageCache",
                "shortNames": ["ic"],
            },
            "versions": [
                {
                    "name": "v1alpha2",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "cacheSpec": {
                                            "type": "array",
                                            "items": {
                                                "type": "object",
                                                "properties": {
                                                    "images": {"type": "array", "items": string},
                                                    "nodeSelector": {
                                                        "type": "object",
                                                        "additionalProperties": string,
                                                    },
                                                },
                                            },
                                        },
                                        "imagePullSecrets": {
                                            "type": "array",
                                            "items": {
                                                "type": "object",
                                                "properties": {"name": string},
                                            },
                                        },
                                    },
                                },
                                "status": {
                                    "type": "object",
                                    "properties": {
                                        name: string
                                        for name in (
                                            "status",
                                            "reason",
                                            "message",
                                            "startTime",
                                            "completionTime",
                                        )
                                    },
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


def test_which_crds_are_fit() -> None:
    ours = next(d for d in yaml.safe_load_all(OUR_CRD.read_text()) if d)
    assert crd_problem(ours) is None
    assert "not installed" in str(crd_problem(None))
    theirs = kube_fledged_crd()
    assert "no status subresource" in str(crd_problem(theirs))
    theirs["spec"]["versions"][0]["subresources"] = {"status": {}}
    problem = str(crd_problem(theirs))
    assert "lacks spec.cacheSpec[].pin, spec.maxConcurrentNodesPerImage" in problem
    assert "status.appliedLists" in problem
    theirs["spec"]["versions"][0]["name"] = "v1alpha1"
    assert "does not serve v1alpha2" in str(crd_problem(theirs))


@pytest.fixture(scope="module")
def bare() -> Iterator[TestEnv]:
    """An apiserver of its own, without our CRD."""
    env = TestEnv(nodes=0, with_docker=False)
    with reported("crd check cluster", env):
        env.start()
        try:
            yield env
        finally:
            env.cleanup()


def readyz(coordinator: CoordinatorProcess) -> int:
    url = f"http://127.0.0.1:{coordinator.health_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_a_coordinator_waits_for_its_crd_and_takes_over_kube_fledgeds_caches(
    bare: TestEnv, tmp_path: Path
) -> None:
    theirs = tmp_path / "kube-fledged-crd.yaml"
    theirs.write_text(yaml.safe_dump(kube_fledged_crd()))
    kubectl(bare, "apply", "-f", str(theirs))
    kubectl(bare, "wait", "--for=condition=Established", "crd/imagecaches.kubefledged.io")
    # A cache as kube-fledged left it: its status written with the object.
    cache = {
        "apiVersion": "kubefledged.io/v1alpha2",
        "kind": "ImageCache",
        "metadata": {"name": "legacy", "namespace": "default"},
        "spec": {"cacheSpec": [{"images": ["registry.invalid/app:v1"]}]},
        "status": {
            "status": "Succeeded",
            "reason": "ImageCacheCreate",
            "message": "All requested images pulled succesfully to respective nodes",
            "startTime": "2026-01-01T00:00:00Z",
        },
    }
    client.CustomObjectsApi(bare.api_client()).create_namespaced_custom_object(
        "kubefledged.io", "v1alpha2", "default", "imagecaches", cache
    )
    coordinator = CoordinatorProcess(bare.workdir, bare.kubeconfig, name="coordinator-crd")
    coordinator.start(wait_ready=False)
    try:
        taken_over(bare, coordinator)
    finally:
        coordinator.stop()


def taken_over(bare: TestEnv, coordinator: CoordinatorProcess) -> None:
    log = coordinator.process.log_path
    wait_for(
        "the coordinator to say why it does not start",
        lambda: "no status subresource" in log.read_text(),
        timeout=30,
    )
    assert "kubectl apply --server-side --force-conflicts -f deploy/crds/" in log.read_text()
    assert readyz(coordinator) == 503
    time.sleep(1)
    assert (get_cache(bare, "default", "legacy") or {})["status"]["reason"] == "ImageCacheCreate"

    kubectl(bare, "apply", "--server-side", "--force-conflicts", "-f", str(OUR_CRD))
    wait_for("the coordinator to start", lambda: readyz(coordinator) == 200, timeout=30)
    assert "the ImageCache CRD is fit now; starting" in log.read_text()
    obj = wait_status(bare, "default", "legacy", "Failed", reason="NoMatchingNodes")
    assert obj["status"]["observedGeneration"] == 1
    assert coordinator.process.alive()
