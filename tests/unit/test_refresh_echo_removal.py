"""The removal of a refresh annotation our copy still shows after its refresh ended is
conditional on that copy: in CI a blind removal, landing a second later, erased the
annotation of the next refresh the user had set meanwhile, which then never ran."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client

from coordinator import api
from coordinator.controller import Controller


class Writer:
    def __init__(self, status: int | None = None) -> None:
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self._status = status

    def patch_metadata(self, namespace: str, name: str, metadata: dict[str, Any]) -> bool:
        """As KubeWriter's: False when the cache is gone (404), other failures raised."""
        self.patches.append((namespace, name, metadata))
        if self._status == 404:
            return False
        if self._status is not None:
            raise client.ApiException(status=self._status, reason="Conflict")
        return True


META = {"namespace": "ns", "name": "c", "resourceVersion": "41"}


async def test_the_echo_removal_carries_the_copys_resource_version() -> None:
    writer = Writer()
    await Controller._remove_echo(SimpleNamespace(_kube=writer), "ns/c", META)  # type: ignore[arg-type]
    assert writer.patches == [
        ("ns", "c", {"annotations": {api.REFRESH_ANNOTATION: None}, "resourceVersion": "41"})
    ]


async def test_a_cache_changed_since_the_copy_keeps_its_annotation_quietly() -> None:
    for status in (409, 404):  # changed since (maybe a new request), or gone
        writer = Writer(status)
        await Controller._remove_echo(SimpleNamespace(_kube=writer), "ns/c", META)  # type: ignore[arg-type]
        assert len(writer.patches) == 1


async def test_other_failures_are_not_swallowed() -> None:
    writer = Writer(500)
    with pytest.raises(client.ApiException):
        await Controller._remove_echo(SimpleNamespace(_kube=writer), "ns/c", META)  # type: ignore[arg-type]
