"""The ImageCache controller, shaped like Kubernetes' sample-controller.

Informer events only enqueue keys. Workers take a key and run `reconcile`, which reads
the cache from the local store, asks the planner what to do, hands the orders to the
node registry and offers the new status to the debounced status writer. Retries live
in one place: a failed reconcile is requeued with per-key backoff.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubernetes import client

from common.reference import ImageRef, InvalidReference, parse

from . import api
from .gate import Wanted
from .gating import NodeGate
from .kube import SECRET_TTL, Informer, KubeWriter, Obj, metadata_only, now_iso
from .metrics import CoordinatorMetrics
from .model import AgentInfo
from .nodes import NodeRegistry
from .pairs import Counts
from .plan import CacheView, OthersWant, Plan, PlanMemo, Settings, plan_cache
from .secrets import RegistryAuth, SecretError, credentials_for, parse_secret
from .status import (
    build_status,
    comparable,
    events_for,
    fit_status,
    status_room,
)

log = logging.getLogger(__name__)

AGENT_LEASE_SELECTOR = "app.kubernetes.io/component=agent"
NODE_LEASE_LABEL = "kubefledged.io/node"
ENDPOINT_ANNOTATION = "kubefledged.io/agent-endpoint"
TLS_ANNOTATION = "kubefledged.io/agent-tls"
STATUS_MIN_INTERVAL = 1.0  # seconds between two status writes of one cache
NODE_CHANGE_BATCH = 0.25  # seconds at most node answers gather before a cache is replanned
PLAN_SHARE = 20  # a cheap cache waits this many times its reconcile's cost before a replan
SLOW_RECONCILE = 0.2  # seconds of planning and sending worth a log line
COSTLY_RECONCILE = 0.02  # seconds: past this, a cache is replanned at most once a status interval
PIN_SWEEP_EVERY = 10.0  # seconds between sweeps for pins no cache wants any more
FIRST_LISTINGS_WAIT = 15.0  # seconds at most the agents' first listings hold back workers
TAKEOVER_GRACE = 45.0  # seconds a new coordinator waits for agents it has not seen yet


@dataclass(frozen=True)
class ControllerConfig:
    agent_namespace: str
    settings: Settings
    refresh_every: float  # 0: off
    workers: int = 4
    status_interval: float = STATUS_MIN_INTERVAL
    watch_namespace: str | None = None
    byte_progress_max_nodes: int = 1000
    gate_taint: str = ""  # node readiness gating's taint key; empty: off
    gate_deadline: float = 600.0
    gate_deadline_text: str = "10m"


def replan_delay(cost: float, status_interval: float) -> float:
    """How long node answers gather before a cache is replanned, so a burst from many
    nodes makes one reconcile rather than one each, keeping planning to a small share
    of the coordinator's time: a cheap reconcile (a small cache) waits PLAN_SHARE times
    its cost, up to NODE_CHANGE_BATCH; a costly one (thousands of nodes) a whole status
    interval, as its status cannot be written more often anyway. The last answer to a
    cache's orders does not wait at all (Controller.orders_answered)."""
    delay = min(NODE_CHANGE_BATCH, PLAN_SHARE * cost)
    if cost > COSTLY_RECONCILE:
        delay = max(delay, status_interval, 2 * cost)
    return delay


def agent_from_lease(lease: Mapping[str, Any]) -> AgentInfo | None:
    meta, spec = lease.get("metadata") or {}, lease.get("spec") or {}
    node = (meta.get("labels") or {}).get(NODE_LEASE_LABEL) or spec.get("holderIdentity")
    endpoint = (meta.get("annotations") or {}).get(ENDPOINT_ANNOTATION)
    renew = spec.get("renewTime")
    if not node or not endpoint or not renew:
        return None
    renewed = datetime.fromisoformat(str(renew).replace("Z", "+00:00")).timestamp()
    return AgentInfo(
        node=node,
        endpoint=endpoint,
        tls=(meta.get("annotations") or {}).get(TLS_ANNOTATION) == "true",
        expires=renewed + float(spec.get("leaseDurationSeconds") or 40),
        acquired=str(spec.get("acquireTime") or ""),
    )


class StatusWriter:
    """At most one status write per cache per interval; conflicts retried on a fresh read."""

    def __init__(self, kube: KubeWriter, interval: float, metrics: CoordinatorMetrics) -> None:
        self._kube = kube
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
        """The newest status wins; Events are derived when it is written."""
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
            due = self._last.get(key, 0) + self._interval
            if self._changes_state(key, status):
                due = now  # a new status or reason is news: only progress is throttled
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
        old = self._written.get(key)
        if old is None:
            return True
        return (old.get("status"), old.get("reason")) != (new.get("status"), new.get("reason"))

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


class Controller:
    def __init__(
        self,
        api_client: client.ApiClient,
        kube: KubeWriter,
        registry: NodeRegistry,
        config: ControllerConfig,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self.metrics = metrics or CoordinatorMetrics()
        self._api = api_client
        self._kube = kube
        self._registry = registry
        self._config = config
        self.queue: Any = None
        self.status = StatusWriter(kube, config.status_interval, self.metrics)
        self._refreshing: dict[str, float] = {}
        self._reconcile_seconds: dict[str, float] = {}
        self._specs: dict[str, tuple[str, api.CacheSpec | None, str]] = {}
        self._memos: dict[str, PlanMemo] = {}
        self._started = time.monotonic()
        self.gate_queue: Any = None
        self.gate = (
            NodeGate(
                kube,
                config.gate_taint,
                config.gate_deadline,
                config.gate_deadline_text,
                self._wanted_on,
                registry.observations.get,
                lambda key: self.caches.store.get(key),
            )
            if config.gate_taint
            else None
        )
        custom = client.CustomObjectsApi(api_client)
        if config.watch_namespace:
            list_caches: Any = custom.list_namespaced_custom_object
            cache_kwargs: dict[str, Any] = {"namespace": config.watch_namespace}
        else:
            list_caches = custom.list_cluster_custom_object
            cache_kwargs = {}
        self.caches = Informer(
            "imagecaches",
            api_client,
            list_caches,
            self._on_cache,
            group=api.GROUP,
            version=api.VERSION,
            plural=api.PLURAL,
            **cache_kwargs,
        )
        self.nodes = Informer(
            "nodes",
            api_client,
            client.CoreV1Api(api_client).list_node,
            self._on_node,
            transform=metadata_only,
        )
        self.leases = Informer(
            "agent-leases",
            api_client,
            client.CoordinationV1Api(api_client).list_namespaced_lease,
            self._on_lease,
            namespace=config.agent_namespace,
            label_selector=AGENT_LEASE_SELECTOR,
        )

    # -- event handlers: they only enqueue (run on the loop, through Informer's post) ---

    def _on_cache(self, key: str, old: Obj | None, new: Obj | None) -> None:
        """Our own status write coming back is no news: a cache over thousands of nodes
        would otherwise be replanned once more for every status write."""
        if old is not None and new is not None and _intent(old) == _intent(new):
            status = comparable(new.get("status") or {})
            if status == comparable(old.get("status") or {}):
                return  # metadata only (our finalizer going on, labels)
            written = self.status.last_written(key)
            if written is not None and status == comparable(written):
                return
        log.debug("cache %s changed: queued", key)
        self.queue.add(key)
        self._recheck_gate()

    def _on_node(self, key: str, old: Obj | None, new: Obj | None) -> None:
        old_labels = (old or {}).get("metadata", {}).get("labels")
        new_labels = (new or {}).get("metadata", {}).get("labels")
        if new is None:
            self._registry.forget_node(key)
        changed = old is None or new is None or old_labels != new_labels
        if self.gate is not None:
            if self.gate.saw_node(key, new):
                self.gate_queue.add(key)
            # The caches count the nodes behind the gate and released from it.
            changed = changed or _gate_facts(old) != _gate_facts(new)
        if changed:
            self.enqueue_all()

    def _on_lease(self, key: str, old: Obj | None, new: Obj | None) -> None:
        agent = agent_from_lease(new) if new else None
        before = agent_from_lease(old) if old else None
        node = agent.node if agent else before.node if before else None
        if node:
            self._registry.set_agent(node, agent)

    def node_changed(self, node: str) -> None:
        """The registry's callback: something changed on `node`."""
        if self.gate is not None and node in self.gate.gated:
            self.gate_queue.add(node)
        for key in list(self.caches.store):
            cost = self._reconcile_seconds.get(key, 0.0)
            self.queue.add_after(key, replan_delay(cost, self._config.status_interval))

    def orders_answered(self, key: str) -> None:
        """The registry's callback: every pull order `key` sent has its answer. The
        outcome goes to the status now, not after a batching delay."""
        if key in self.caches.store:
            self.queue.add(key)

    def _recheck_gate(self) -> None:
        """What a cache wants changed: every node behind the gate may be done (or not)."""
        if self.gate is not None:
            for node in self.gate.gated:
                self.gate_queue.add(node)

    def _wanted_on(self, node: str) -> list[Wanted]:
        """Every image the live caches select for `node`, pinned if any of them pins it."""
        labels = (self.nodes.store.get(node) or {}).get("metadata", {}).get("labels") or {}
        found: dict[str, tuple[bool, list[str]]] = {}
        for (key, _), spec in self._live_specs():
            for cache_list in spec.lists:
                if cache_list.matches(labels):
                    for image in cache_list.images:
                        pin, caches = found.get(image, (False, []))
                        found[image] = (pin or cache_list.pin, [*caches, key])
        return [
            Wanted(image, parse(image), pin, tuple(sorted(set(caches))))
            for image, (pin, caches) in sorted(found.items())
        ]

    async def _gate_worker(self) -> None:
        """Releases gated nodes one at a time, as their decisions come due."""
        assert self.gate is not None
        while True:
            node = await self.gate_queue.get()
            if node is None:
                return
            try:
                decision = self.gate.check(node, time.time())
                if decision is not None and decision.release:
                    await self.gate.release(node, decision)
                    self.enqueue_all()  # the caches' gate counts
                elif decision is not None:
                    self.gate_queue.add_after(node, max(1.0, decision.wait))
                self.gate_queue.forget(node)
            except Exception:
                log.exception("gate check of node %s failed; requeued", node)
                self.gate_queue.add_rate_limited(node)
            finally:
                self.gate_queue.done(node)

    def enqueue_all(self) -> None:
        for key in list(self.caches.store):
            self.queue.add(key)

    # -- the loop --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, ready: threading.Event | None = None) -> None:
        """Serves until `stop`; sets `ready` once every informer has listed."""
        from .workqueue import WorkQueue

        loop = asyncio.get_running_loop()
        self.queue = WorkQueue()
        self.gate_queue = WorkQueue()
        for informer in (self.nodes, self.leases, self.caches):
            informer.start(post=loop.call_soon_threadsafe)
        for informer in (self.nodes, self.leases, self.caches):
            # A missing CRD or RBAC keeps an informer from listing: wait, but stay stoppable.
            while not await asyncio.to_thread(informer.synced.wait, 1.0):
                if stop.is_set():
                    return
        log.info(
            "informers synced: %d caches, %d nodes, %d agent leases",
            len(self.caches.store),
            len(self.nodes.store),
            len(self.leases.store),
        )
        unlisted = await self._registry.first_listings(FIRST_LISTINGS_WAIT)
        if unlisted:
            log.warning("%d agent(s) not listed yet; reconciling without them", unlisted)
        if ready is not None:
            ready.set()
        tasks = [
            asyncio.create_task(self._worker(i), name=f"worker-{i}")
            for i in range(self._config.workers)
        ]
        tasks.append(asyncio.create_task(self.status.run(), name="status-writer"))
        tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        if self.gate is not None:
            tasks.append(asyncio.create_task(self._gate_worker(), name="node-gate"))
        self.enqueue_all()
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not waiter and task.exception() is not None:
                log.error("controller task %s died", task.get_name(), exc_info=task.exception())
        self.queue.shutdown()
        self.gate_queue.shutdown()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for informer in (self.nodes, self.leases, self.caches):
            informer.stop()
        if any(t is not waiter and not t.cancelled() and t.exception() for t in done):
            raise RuntimeError("a controller task died")

    async def _worker(self, index: int) -> None:
        while True:
            key = await self.queue.get()
            if key is None:
                return
            try:
                with self.metrics.reconcile_duration.time():
                    await self.reconcile(key)
                log.debug("reconciled %s", key)
                self.metrics.reconciles.labels("success").inc()
                self.queue.forget(key)
            except Exception:
                log.exception("reconcile of %s failed; requeued", key)
                self.metrics.reconciles.labels("error").inc()
                self.queue.add_rate_limited(key)
            finally:
                self.queue.done(key)

    async def _housekeeping(self) -> None:
        """Lease expiry, periodic inventory resync and the refresh timer."""
        alive: dict[str, bool] = {}
        last_refresh = last_sweep = time.time()
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            if now - last_sweep >= PIN_SWEEP_EVERY:
                last_sweep = now
                self.sweep_pins(now)
            self.metrics.agents_alive.set(sum(alive.values()))
            self.metrics.agents_listed.set(
                sum(obs.inventory is not None for obs in self._registry.observations.values())
            )
            self.metrics.agent_channels.set(self._registry.channels)
            if self.gate is not None:
                self.metrics.gated_nodes.set(len(self.gate.gated))
            for node, obs in self._registry.observations.items():
                state = obs.agent is not None and obs.agent.alive(now)
                if alive.get(node) != state:
                    alive[node] = state
                    if not state:
                        log.warning("agent of node %s is gone (Lease expired or missing)", node)
                    self.enqueue_all()
            for node in self._registry.resync_due(now):
                self._registry.resync(node)
            every = self._config.refresh_every
            if every > 0 and now - last_refresh >= every:
                last_refresh = now
                for key in self.caches.store:
                    self._refreshing.setdefault(key, now)
                self.enqueue_all()

    def sweep_pins(self, now: float) -> None:
        """Lifts pins kube-fledged set that no cache wants any more on that node.

        Covers what no single cache's reconcile sees: a node that left a list's
        selector, or a cache deleted while the node's agent was away.
        """
        wanted_lists = [cl for _, spec in self._live_specs() for cl in spec.lists if cl.pin]
        nodes = self._node_labels()
        for node, obs in self._registry.observations.items():
            if obs.agent is None or not obs.agent.alive(now) or obs.inventory is None:
                continue
            if obs.pins_in_flight or any(r.in_flight for r in obs.pulls.values()):
                continue
            labels = nodes.get(node, {})
            keep = set()
            for cache_list in wanted_lists:
                if cache_list.matches(labels):
                    for image in cache_list.images:
                        held = obs.inventory.lookup(parse(image))
                        if held is not None:
                            keep.add(held.image_id)
            stale = [
                i.image_id for i in obs.inventory.images if i.pin_owned and i.image_id not in keep
            ]
            if stale:
                log.info("node %s: lifting %d pin(s) no cache wants: %s", node, len(stale), stale)
                self._registry.submit_pins(node, [(image_id, False) for image_id in stale])

    # -- reconcile -------------------------------------------------------------------

    def _spec(self, key: str, obj: Obj) -> tuple[api.CacheSpec | None, str]:
        version = str(obj["metadata"].get("resourceVersion"))
        cached = self._specs.get(key)
        if cached is None or cached[0] != version:
            try:
                spec, error = api.parse_spec(obj), ""
            except api.SpecError as err:
                spec, error = None, str(err)
            cached = self._specs[key] = (version, spec, error)
        return cached[1], cached[2]

    def _node_labels(self) -> dict[str, dict[str, str]]:
        return {k: (o["metadata"].get("labels") or {}) for k, o in self.nodes.store.items()}

    def _live_specs(
        self, exclude: str | None = None
    ) -> list[tuple[tuple[str, int], api.CacheSpec]]:
        """Specs of the caches that want images now (not deleting, valid, not purged),
        each with its key and generation."""
        specs = []
        for key, obj in self.caches.store.items():
            if key == exclude or obj["metadata"].get("deletionTimestamp"):
                continue
            spec, _ = self._spec(key, obj)
            status = obj.get("status") or {}
            dormant = status.get("purgedGeneration") == obj["metadata"].get("generation")
            if spec is not None and not dormant:
                specs.append(((key, int(obj["metadata"].get("generation") or 0)), spec))
        return specs

    def _others(
        self, key: str, node_labels: Mapping[str, Mapping[str, str]]
    ) -> tuple[OthersWant, tuple[tuple[str, int], ...]]:
        """What the other caches want, and a token that changes when that may change."""
        live = self._live_specs(exclude=key)
        caches = [spec for _, spec in live]

        def want(node: str, ref: ImageRef) -> tuple[bool, bool]:
            labels = node_labels.get(node, {})
            wanted = pinned = False
            for spec in caches:
                for cache_list in spec.lists:
                    if cache_list.matches(labels) and any(
                        _same(image, ref) for image in cache_list.images
                    ):
                        wanted = True
                        pinned = pinned or cache_list.pin
            return wanted, pinned

        return want, tuple(sorted(token for token, _ in live))

    def _needs_wave(self, spec: api.CacheSpec | None) -> bool:
        """In-flight counts cost a pass over every node: only needed with a wave size."""
        wave = spec.max_concurrent_nodes_per_image if spec else None
        return bool(wave or self._config.settings.wave)

    def _credentials(
        self, namespace: str, spec: api.CacheSpec
    ) -> tuple[list[RegistryAuth], list[str], str]:
        """What may log in, what is wrong with the Secrets, and which versions of them
        were read (a change retries pulls refused as Unauthorized)."""
        auths: list[RegistryAuth] = []
        errors = []
        versions = []
        for name in spec.pull_secrets:
            secret = self._kube.get_secret(namespace, name)
            meta = secret.metadata if secret is not None else None
            versions.append(f"{name}={meta.resource_version if meta is not None else '-'}")
            if secret is None:
                errors.append(f"imagePullSecret {name!r} not found in namespace {namespace!r}")
                continue
            try:
                data = {k: str(v) for k, v in (secret.data or {}).items()}
                auths.extend(parse_secret(name, secret.type or "", data))
            except SecretError as err:
                errors.append(str(err))
        return auths, errors, ",".join(versions)

    async def reconcile(self, key: str) -> None:
        log.debug("reconciling %s", key)
        obj = self.caches.store.get(key)
        if obj is None:
            self.status.forget(key)
            self._refreshing.pop(key, None)
            self._specs.pop(key, None)
            self._memos.pop(key, None)
            self._reconcile_seconds.pop(key, None)
            return
        meta = obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        deleting = bool(meta.get("deletionTimestamp"))
        finalizers = list(meta.get("finalizers") or [])
        if deleting and api.FINALIZER not in finalizers:
            return
        annotations = meta.get("annotations") or {}
        if api.REFRESH_ANNOTATION in annotations:
            self._refreshing.setdefault(key, time.time())
        spec, spec_error = self._spec(key, obj)
        auths: list[RegistryAuth] = []
        secret_errors: list[str] = []
        credentials = ""
        if spec is not None and spec.pull_secrets and not deleting:
            auths, secret_errors, credentials = await asyncio.to_thread(
                self._credentials, namespace, spec
            )
        previous = self.status.last_written(key) or obj.get("status") or {}
        removing = tuple(
            (str(r["image"]), tuple(sorted((r.get("nodeSelector") or {}).items())))
            for r in previous.get("removing") or ()
        )
        view = CacheView(
            key=key,
            generation=int(meta.get("generation") or 0),
            spec=spec,
            applied=api.applied_lists(previous),
            removing=removing,
            deleting=deleting,
            purge=api.PURGE_ANNOTATION in annotations,
            purged_generation=previous.get("purgedGeneration"),
            refresh_since=self._refreshing.get(key),
            credentials=credentials,
        )
        nodes = self._node_labels()
        now = time.time()
        started = time.monotonic()
        others, others_token = self._others(key, nodes)
        plan = plan_cache(
            view,
            nodes,
            self._registry.observations,
            others,
            self._registry.in_flight_by_image() if self._needs_wave(spec) else {},
            self._config.settings,
            now,
            memo=self._memos.setdefault(key, PlanMemo()),
            others_token=others_token,
        )
        planned = time.monotonic()
        self._dispatch(key, plan, auths, credentials)
        # What paces replanning: the work on the event loop, not the waits on the API.
        self._reconcile_seconds[key] = time.monotonic() - started
        if self._reconcile_seconds[key] > SLOW_RECONCILE:
            log.info(
                "%s: planning %d nodes took %.2fs, sending %d pull batches %.2fs",
                key,
                len(plan.tally.nodes),
                planned - started,
                sum(1 for items in plan.pulls.values() if items),
                time.monotonic() - planned,
            )
        if deleting:
            if plan.finalize_done:
                log.info("%s: pins lifted; releasing the finalizer", key)
                await asyncio.to_thread(
                    self._kube.patch_metadata,
                    namespace,
                    name,
                    {
                        "finalizers": [f for f in finalizers if f != api.FINALIZER],
                        "resourceVersion": meta["resourceVersion"],
                    },
                )
            return
        hold = self._takeover_hold(key, obj, plan)
        if hold:
            self.queue.add_after(key, hold)  # the predecessor's status stands meanwhile
        else:
            status = build_status(view, plan, previous, now_iso(), spec_error, secret_errors)
            if self.gate is not None:
                gated, released = self.gate.counts(plan.tally.nodes, self.nodes.store)
                status["nodesGated"], status["nodesReleased"] = gated, released
            self.status.offer(key, status, plan.tally.counts())
        if not deleting and api.FINALIZER not in finalizers:
            # After the first orders and status: its round trip is not on their way. Pins they set
            # before it lands are lifted by the pin sweep if the cache goes meanwhile.
            await asyncio.to_thread(
                self._kube.patch_metadata,
                namespace,
                name,
                {
                    "finalizers": [*finalizers, api.FINALIZER],
                    "resourceVersion": meta["resourceVersion"],
                },
            )
        await self._finish_operations(key, obj, view, plan)
        retry = plan.next_retry
        if retry is not None:
            self.queue.add_after(key, max(0.5, retry - now))
        if credentials and (secret_errors or plan.tally.failed):
            # No Secret is watched: look again for one created or fixed meanwhile.
            self.queue.add_after(key, SECRET_TTL)

    def _takeover_hold(self, key: str, obj: Obj, plan: Plan) -> float:
        """Seconds to leave the status a predecessor wrote as it is: on a takeover, until
        every node the cache selects has shown an agent, or a grace period has passed.
        A coordinator restarting beside an agent (an upgrade rolls both) would otherwise
        report as unavailable nodes whose agent is only restarting."""
        if not plan.tally.unknown or not obj.get("status") or self.status.last_written(key):
            return 0.0
        return max(0.0, TAKEOVER_GRACE - (time.monotonic() - self._started))

    async def _finish_operations(self, key: str, obj: Obj, view: CacheView, plan: Plan) -> None:
        meta = obj["metadata"]
        annotations = meta.get("annotations") or {}
        done = []
        if view.purge and plan.purge_done:
            done.append(api.PURGE_ANNOTATION)
        if view.refresh_since is not None and plan.refresh_done:
            self._refreshing.pop(key, None)
            if api.REFRESH_ANNOTATION in annotations:
                done.append(api.REFRESH_ANNOTATION)
        if done:
            await asyncio.sleep(self._config.status_interval)  # let the final status land first
            await asyncio.to_thread(
                self._kube.patch_metadata,
                meta["namespace"],
                meta["name"],
                {"annotations": {a: None for a in done}},
            )
            log.info("%s: %s done", key, ", ".join(done))

    def _dispatch(
        self, key: str, plan: Plan, auths: list[RegistryAuth], credentials: str = ""
    ) -> None:
        def creds(image: str) -> list[RegistryAuth]:
            try:
                return credentials_for(parse(image), auths)
            except InvalidReference:
                return []

        detailed = len(plan.tally.nodes) <= self._config.byte_progress_max_nodes
        self.metrics.orders.labels("pull").inc(sum(len(items) for items in plan.pulls.values()))
        self._registry.submit_pulls(plan.pulls, creds, key, detailed, credentials)
        for node, changes in plan.pins.items():
            if changes:
                for _, pinned in changes:
                    self.metrics.orders.labels("pin" if pinned else "unpin").inc()
                self._registry.submit_pins(node, changes)
        for node, images in plan.removals.items():
            if images:
                self.metrics.orders.labels("remove").inc(len(images))
                self._registry.submit_removals(node, images)


def _gate_facts(obj: Obj | None) -> tuple[Any, ...]:
    """What of a Node node readiness gating reads: its taints and our release note."""
    meta = (obj or {}).get("metadata") or {}
    released = (meta.get("annotations") or {}).get(api.GATE_RELEASED_ANNOTATION)
    return ((obj or {}).get("spec") or {}).get("taints"), released


def _intent(obj: Obj) -> tuple[Any, ...]:
    """What of a cache the user (or a deletion) changes. Not its status, nor its
    finalizers: the one change there worth acting on is ours being stripped, which the
    next reconcile puts back anyway."""
    meta = obj.get("metadata") or {}
    return (
        obj.get("spec"),
        meta.get("generation"),
        meta.get("annotations"),
        meta.get("deletionTimestamp"),
    )


def _same(image: str, ref: ImageRef) -> bool:
    try:
        return parse(image).canonical == ref.canonical
    except InvalidReference:
        return False
