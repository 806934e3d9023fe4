"""The debounced status writer: at most one status write per cache per interval (a
change of state or reason goes at once), conflicts retried on a fresh read, a status
too large for the object cut to fit, and the Events a change of state is worth."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client

from .kube import KubeWriter
from .metrics import CoordinatorMetrics
from .pairs import Counts
from .status import comparable, events_for, fit_status, status_room

log = logging.getLogger(__name__)


class StatusWriter:
    """At most one status write per cache per interval; conflicts retried on a fresh read."""

    def __init__(
        self,
        kube: KubeWriter,
        interval: float,
        metrics: CoordinatorMetrics,
        leading: Callable[[], bool] = lambda: True,
    ) -> None:
        self._kube = kube
        self._leading = leading
        self._metrics = metrics
        self._interval = interval
        self._pending: dict[str, tuple[dict[str, Any], Counts]] = {}
        self._written: dict[str, dict[str, Any]] = {}
        self._last: dict[str, float] = {}
        self._refused: dict[str, dict[str, Any]] = {}  # too large even when cut down
        self._wake = asyncio.Event()

    def last_written(self, key: str) -> dict[str, Any] | None:
        return self._written.get(key)

    def offer(self, key: str, status: dict[str, Any], counts: Counts) -> None:
        """The newest status wins; Events are derived when it is written. One equal to
        the last written is no work (each write reads the cache first: a cache with a
        failure is reconciled every few seconds, for as long as it lasts)."""
        written = self._written.get(key)
        if written is not None and comparable(written) == comparable(status):
            self._pending.pop(key, None)  # an older one waiting is superseded by this one
            return
        self._pending[key] = (status, counts)
        self._wake.set()

    def forget(self, key: str) -> None:
        self._pending.pop(key, None)
        self._written.pop(key, None)
        self._last.pop(key, None)
        self._refused.pop(key, None)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            later = await self._write_due()
            if later is not None:
                asyncio.get_running_loop().call_later(
                    max(0.0, later - time.monotonic()), self._wake.set
                )

    async def _write_due(self) -> float | None:
        """Writes each pending status whose time has come; returns when to look again.

        Caches come and go while a write is awaited (a mass delete forgets hundreds):
        each key is looked up afresh, and one cache's trouble is logged, never fatal."""
        now = time.monotonic()
        later = None
        for key in list(self._pending):
            entry = self._pending.get(key)
            if entry is None:
                continue  # forgotten while an earlier write was awaited
            status, counts = entry
            if key in self._refused and self._refused[key] == comparable(status):
                del self._pending[key]
                continue
            if not self._leading():
                return None  # a status from a process that may no longer lead: never written
            due = self._last.get(key, 0) + self._interval
            if self._changes_state(key, status):
                due = now  # news (a new state, reason or extent): only progress is throttled
            if due > now:
                later = min(later or due, due)
                continue
            del self._pending[key]
            self._last[key] = now
            try:
                written = await asyncio.to_thread(self._write, key, status, counts)
                if written is not None and key in self._last:  # not forgotten meanwhile
                    self._written[key] = written
                    log.debug(
                        "status of %s written: %s %s %s",
                        key,
                        written.get("status"),
                        written.get("reason"),
                        written.get("ready"),
                    )
            except StatusTooLarge as err:
                log.error("status of %s not written: %s; not retried until it changes", key, err)
                self._refused[key] = comparable(status)
            except Exception as err:
                log.warning("status of %s not written: %s; retrying", key, err)
                if key in self._last:  # still wanted: not forgotten meanwhile
                    self._pending.setdefault(key, (status, counts))
                    later = min(later or now + 2, now + 2)
        return later

    def _changes_state(self, key: str, new: Mapping[str, Any]) -> bool:
        """A new status or reason, or pairs that joined or left (a node left a selector:
        its pin is lifted at once, the status says so as soon)."""
        old = self._written.get(key)
        if old is None:
            return True
        return _state(old) != _state(new)

    def _write(self, key: str, status: dict[str, Any], counts: Counts) -> dict[str, Any] | None:
        """Runs in a thread; returns the status as written (cut to fit the object size
        limit), None when the cache is gone."""
        ns, name = key.split("/", 1)
        small = False  # the apiserver refused the status cut to the computed budget
        for _ in range(5):
            fresh = self._kube.get_cache(ns, name)
            if fresh is None:
                return None
            before = fresh.get("status") or {}
            fitted = fit_status(status, 0 if small else status_room(fresh))
            if comparable(before) != comparable(fitted):
                fresh["status"] = fitted
                try:
                    self._kube.replace_status(fresh)
                    self._metrics.status_writes.inc()
                except client.ApiException as err:
                    if err.status == 409:
                        continue  # changed meanwhile: read again
                    if err.status == 404:
                        return None  # deleted since the read: nothing to write
                    if _too_large(err):
                        if small:
                            message = (
                                "status not written: the object is too large even with the "
                                "smallest status (shorten the spec or split the cache)"
                            )
                            self._kube.event(fresh, "Warning", "StatusTooLarge", message)
                            raise StatusTooLarge(str(err.reason)) from err
                        small = True
                        continue
                    raise
            for event in events_for(before, fitted, counts):
                self._kube.event(fresh, event.type, event.reason, event.message)
            return fitted
        raise RuntimeError("status kept conflicting")


class StatusTooLarge(Exception):
    """The apiserver refused even the smallest status: retrying the same is pointless."""


def _too_large(err: client.ApiException) -> bool:
    """etcd's "request is too large" comes back as a 500; the apiserver's own limit as 413."""
    text = f"{err.reason} {err.body}".lower()
    return err.status == 413 or (err.status == 500 and "too large" in text)


def _state(status: Mapping[str, Any]) -> tuple[Any, ...]:
    extent = str(status.get("ready", "")).partition("/")[2]
    return status.get("status"), status.get("reason"), extent
