"""The kubelet's own image garbage collector against our pins: on a node whose GC takes
every unused image, the images of a pinned list stay, those of a `pin: false` list go,
as does an image in no cache. Read from the kubelet's log and containerd's CRI."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from tests.conftest import reported
from tests.coordinator.helpers import wait_for
from tests.realnodes.gc_cluster import GC_CLUSTER, GC_PERIOD, Prepared
from tests.testenv.runtime import NodeRuntime

GC_PASS = "Disk usage on image filesystem is over the high threshold"
REMOVED = re.compile(r'"Removing image to free bytes" imageID="([^"]+)"')


@pytest.fixture(scope="session")
def gc_node() -> Iterator[Prepared]:
    """Started at collection (tests/conftest.py), so its GC pass is due by now."""
    try:
        with reported("GC node", GC_CLUSTER):
            yield GC_CLUSTER.wait()
    finally:
        GC_CLUSTER.stop()


def _log_since(prepared: Prepared) -> str:
    with open(prepared.node.kubelet.log_path, errors="replace") as f:
        f.seek(prepared.log_offset)
        return f.read()


def test_the_kubelets_image_gc_keeps_pinned_images_and_collects_the_rest(
    gc_node: Prepared,
) -> None:
    # A pass after the cache was done: the first due from the kubelet's start, or the
    # next one. The first may free nothing, though the images are there and unused: the
    # kubelet logged "freed 0 bytes" for it once (its image detection, on the same
    # 5-minute period, had not listed them yet), then collects them at the next pass.
    due = gc_node.kubelet_started + 2 * GC_PERIOD + 60
    log = wait_for(
        "a GC pass of the kubelet that collects the three unpinned images",
        lambda: text if len(set(REMOVED.findall(text := _log_since(gc_node)))) >= 3 else None,
        timeout=max(60.0, due - time.monotonic()),
        interval=2,
    )
    assert GC_PASS in log
    removed = set(REMOVED.findall(_log_since(gc_node)))
    assert log
    for image in [*gc_node.unpinned, gc_node.bystander]:
        assert image.config_digest in removed, (image.ref, removed)
    for image in gc_node.pinned:
        assert image.config_digest not in removed, (image.ref, removed)
    with NodeRuntime(gc_node.node.containerd.endpoint) as cri:
        held = {img.id: img.pinned for img in cri.list()}
    for image in gc_node.pinned:
        assert held.get(image.config_digest) is True, (image.ref, held)
    assert gc_node.bystander.config_digest not in held
