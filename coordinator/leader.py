"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does:
acquire when free or expired, renew while leading, and stop leading (the process
exits) when renewal has failed for longer than the renew deadline."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from kubernetes import client

log = logging.getLogger(__name__)


class LeaderElector:
    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
    ) -> None:
        self._api = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self._duration = lease_duration
        self._deadline = renew_deadline
        self._retry = retry_period
        self._call_timeout = renew_deadline / 2  # an attempt that hangs ends in time for the next
        self._renewed: float | None = None  # monotonic start of the last renewal that held
        # Another holder's record as last seen, and when (monotonic): its Lease runs out
        # a duration after we saw it change, whatever its renewTime says by its clock.
        self._seen: tuple[object, ...] | None = None
        self._seen_at = 0.0
        # A thread of its own: the default pool's few threads (cores + 4) can all be
        # waiting on a slow apiserver for the workers' calls, and a renewal queued
        # behind them past the deadline ends our leadership.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leader-election")

    def leading(self) -> bool:
        """Whether the Lease was renewed within the renew deadline (shorter than the
        Lease's duration, so no standby can have taken it yet). Work is fenced on this,
        not on `hold` returning: a process paused or starved past the deadline must
        not act as a second leader in the moment before `hold` notices."""
        return self._renewed is not None and time.monotonic() - self._renewed < self._deadline

    def try_acquire_or_renew(self) -> bool:
        """One attempt (blocking). True while this identity holds the Lease."""
        now = datetime.now(UTC)
        try:
            lease = self._api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=self._call_timeout
            )
        except client.ApiException as err:
            if err.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=self.identity,
                    lease_duration_seconds=int(self._duration),
                    acquire_time=now,
                    renew_time=now,
                    lease_transitions=0,
                ),
            )
            try:
                self._api.create_namespaced_lease(
                    self.namespace, body, _request_timeout=self._call_timeout
                )
                return True
            except client.ApiException as create_err:
                if create_err.status == 409:
                    return False
                raise
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity
        duration = spec.lease_duration_seconds or self._duration
        if holder and holder != self.identity and not self._expired(spec, duration):
            return False  # held by another, and not expired
        if holder != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.holder_identity = self.identity
        spec.renew_time = now
        spec.lease_duration_seconds = int(self._duration)
        lease.spec = spec
        try:
            self._api.replace_namespaced_lease(
                self.name, self.namespace, lease, _request_timeout=self._call_timeout
            )
        except client.ApiException as err:
            if err.status == 409:
                return False  # someone else wrote first
            raise
        return True

    def _expired(self, spec: client.V1LeaseSpec, duration: float) -> bool:
        """As client-go judges it: by our clock, from when we saw the record change (the
        holder's clock may be skewed; its renewTime is only compared for a change)."""
        record = (spec.holder_identity, spec.renew_time, spec.lease_transitions)
        now = time.monotonic()
        if record != self._seen:
            self._seen, self._seen_at = record, now
        return now - self._seen_at > duration

    async def _attempt(self) -> bool:
        started = time.monotonic()  # the Lease's renewTime is taken at about this moment
        try:
            loop = asyncio.get_running_loop()
            held = await loop.run_in_executor(self._thread, self.try_acquire_or_renew)
        except Exception as err:
            log.warning("leader election Lease %s/%s: %s", self.namespace, self.name, err)
            return False
        if held:
            self._renewed = started
        return held

    async def acquire(self) -> None:
        log.info("waiting to lead (Lease %s/%s) as %s", self.namespace, self.name, self.identity)
        while True:
            if await self._attempt():
                break
            await asyncio.sleep(self._retry)
        log.info("became the leader")

    async def hold(self) -> None:
        """Returns when leadership is lost."""
        while True:
            await asyncio.sleep(self._retry)
            if not await self._attempt() and not self.leading():
                log.error("lost leadership (no renewal for %.0fs)", self._deadline)
                return

    def release(self) -> None:
        """Gives the Lease up on a clean shutdown so a standby takes over at once."""
        try:
            lease = self._api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=self._call_timeout
            )
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            self._api.replace_namespaced_lease(
                self.name, self.namespace, lease, _request_timeout=self._call_timeout
            )
        except client.ApiException as err:
            log.warning("could not release leadership: %s", err.reason)
        except Exception as err:  # the apiserver out of reach: the Lease runs out instead
            log.warning("could not release leadership: %s", err)
