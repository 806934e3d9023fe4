"""Self-registration: a coordination.k8s.io Lease per agent that carries its endpoint.

The coordinator finds live agents by listing these Leases; one not renewed within its
duration means the agent is gone. Works without a kubelet, so the test environment's
simulated nodes register exactly as real ones do.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from agent.kubeapi import ApiError, ApiTarget, KubeApi, LeaseClient, Obj
from common.wire import (
    COMPONENT_LABELS,
    ENDPOINT_ANNOTATION,
    NODE_LABEL,
    TLS_ANNOTATION,
    VERSION_ANNOTATION,
    lease_name,
)

log = logging.getLogger(__name__)


class LeaseRegistrar:
    def __init__(
        self,
        target: ApiTarget,
        namespace: str,
        node: str,
        endpoint: str,
        tls: bool,
        version: str,
        duration: float,
        renew_interval: float,
    ) -> None:
        self.namespace = namespace
        self.node = node
        self.name = lease_name(node)
        self._endpoint = endpoint
        self._tls = tls
        self._version = version
        self._duration = duration
        self._interval = renew_interval
        # A renewal that hangs (a half-open connection) ends by the next one's turn.
        self._leases = LeaseClient(KubeApi(target, max(1.0, min(renew_interval, 10.0))), namespace)
        self._acquired: datetime | None = None  # when this process took the Lease
        # A renewal runs in a thread that cancelling its task does not stop: the lock
        # and the flag keep one from writing the Lease back after `release` deleted it.
        self._writing = threading.Lock()
        self._released = False
        self._written = ""  # the resourceVersion of our last write
        # A thread of its own: the default pool's threads can all be held by runtime
        # calls (a hung Docker daemon: each SDK call waits 60 s), and the Lease must be
        # renewed whatever the runtime does, or the node's agent is taken for gone.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease")

    def _lease(self, spec: Obj, resource_version: str | None = None) -> Obj:
        metadata: Obj = {
            "name": self.name,
            "namespace": self.namespace,
            "labels": {**COMPONENT_LABELS, NODE_LABEL: self.node},
            "annotations": {
                ENDPOINT_ANNOTATION: self._endpoint,
                TLS_ANNOTATION: "true" if self._tls else "false",
                VERSION_ANNOTATION: self._version,
            },
        }
        if resource_version:
            metadata["resourceVersion"] = resource_version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": spec,
        }

    def renew_once(self) -> None:
        """Creates the Lease or renews it (blocking; run in a thread)."""
        with self._writing:
            if not self._released:
                self._renew()

    def _renew(self) -> None:
        now = datetime.now(UTC)
        taking_over = self._acquired is None
        if self._acquired is None:
            # A new acquireTime tells the coordinator this is a new agent process, even
            # at the same address: what it knew of the node is out of date.
            self._acquired = now
        spec: Obj = {
            "holderIdentity": self.node,
            "leaseDurationSeconds": max(1, int(self._duration)),
            "renewTime": micro_time(now),
            "acquireTime": micro_time(self._acquired),
        }
        try:
            current = self._leases.read(self.name)
        except ApiError as err:
            if err.status != 404:
                raise
            created = self._leases.create(self._lease(spec))
            self._written = _version(created)
            log.info(
                "registered Lease %s/%s for endpoint %s", self.namespace, self.name, self._endpoint
            )
            return
        transitions = int((current.get("spec") or {}).get("leaseTransitions") or 0)
        spec["leaseTransitions"] = transitions + 1 if taking_over else transitions
        replaced = self._leases.replace(self.name, self._lease(spec, _version(current)))
        self._written = _version(replaced)

    async def run(self) -> None:
        """Renews every interval until cancelled; API errors are retried, not fatal."""
        failing = False
        while True:
            try:
                await asyncio.get_running_loop().run_in_executor(self._thread, self.renew_once)
                if failing:
                    log.info("Lease renewal works again")
                failing = False
            except Exception as err:
                if not failing:
                    log.warning("cannot renew Lease %s/%s: %s", self.namespace, self.name, err)
                failing = True
            await asyncio.sleep(self._interval)

    def release(self) -> None:
        """Deletes the Lease on shutdown so the coordinator knows at once: after any
        renewal under way, and none after it (a renewal during the server's grace
        period found the Lease gone and made it again, so the coordinator took the
        agent for alive for a Lease duration after it exited). Only the Lease as we
        last wrote it: one a newer agent process of the node took over is its own."""
        with self._writing:
            self._released = True
            written = self._written
        if not written:
            return  # never registered
        try:
            self._leases.delete(self.name, written)
        except ApiError as err:
            if err.status == 409:
                log.info("Lease %s/%s taken over: left to its holder", self.namespace, self.name)
            elif err.status != 404:
                log.warning("could not delete Lease %s/%s: %s", self.namespace, self.name, err)
        except Exception as err:  # the apiserver out of reach: the Lease runs out instead
            log.warning("could not delete Lease %s/%s: %s", self.namespace, self.name, err)


def micro_time(when: datetime) -> str:
    """A MicroTime as the API writes it (RFC 3339 in UTC, microseconds)."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _version(lease: Obj) -> str:
    return str((lease.get("metadata") or {}).get("resourceVersion") or "")
