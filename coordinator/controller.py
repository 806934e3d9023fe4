"""The controller, shaped like Kubernetes' sample-controller, with two kinds of keys.

Informer events only enqueue keys. A cache key's reconcile turns the cache into its
shares of the nodes (`desired.py`) and queues the nodes whose share changed; it also
writes the cache's status, a projection of its nodes' results (`projection.py`),
through the debounced status writer, and handles its finalizer and annotations. A
node key's reconcile compares the node's desired state, from every cache at once,
with what the node holds, and sends the node its one batch of orders. Both are
level-triggered and safe to run any number of times; a failed one is requeued with
per-key backoff.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

import urllib3
from kubernetes import client

from common.wire import AGENT_LEASE_SELECTOR, ENDPOINT_ANNOTATION, NODE_LABEL, TLS_ANNOTATION

from . import api
from .coreapi import CoreV1
from .desired import CacheView, Desired, NodeDesired, Removal, ShareChange, open_removals
from .gate import Wanted
from .gating import NodeGate
from .images import ImageKey
from .kube import (
    SECRET_TTL,
    Informer,
    KubeWriter,
    Obj,
    metadata_only,
    now_iso,
    without_managed_fields,
)
from .metrics import CoordinatorMetrics
from .model import AgentInfo
from .nodes import NodeRegistry
from .plan import NodeResult, Settings, plan_node
from .projection import CacheProjection
from .refresh import Refreshes
from .secrets import RegistryAuth, SecretError, credentials_for_key, parse_secret
from .status import build_status, comparable, next_purged_generation
from .statuswriter import StatusWriter
from .workqueue import WorkQueue

log = logging.getLogger(__name__)

STATUS_MIN_INTERVAL = 1.0  # seconds between two status writes of one cache
NODE_CHANGE_BATCH = 0.25  # seconds at most node results gather before a cache is projected
PLAN_SHARE = 20  # a cheap cache waits this many times its reconcile's cost before a replan
COSTLY_RECONCILE = 0.02  # seconds: past this, a cache is replanned at most once a status interval
WORKER_TURN = 0.005  # seconds of node plans a worker runs before letting answers and writes in
FIRST_LISTINGS_WAIT = 15.0  # seconds at most the agents' first listings hold back workers
CONFIRM_RETRY = 5.0  # seconds between reads of the agents' Leases while they fail
TAKEOVER_GRACE = 45.0  # seconds a new coordinator waits for agents it has not seen yet
CACHE, NODE, GATE = "cache", "node", "gate"
Key = tuple[str, str]  # (CACHE, "namespace/name"), (NODE or GATE, "name")
NO_LABELS: Mapping[str, str] = MappingProxyType({})


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
    """How long node results gather before a cache's status is projected again, so a
    burst of answers from many nodes makes one status rather than one each, keeping
    that to a small share of the coordinator's time: a cheap cache waits PLAN_SHARE
    times its cost, up to NODE_CHANGE_BATCH; a costly one (thousands of nodes) a whole
    status interval, as its status cannot be written more often anyway. The last
    answer to a cache's orders does not wait at all (Controller.orders_answered)."""
    delay = min(NODE_CHANGE_BATCH, PLAN_SHARE * cost)
    if cost > COSTLY_RECONCILE:
        delay = max(delay, status_interval, 2 * cost)
    return delay


def agent_from_lease(lease: Mapping[str, Any]) -> AgentInfo | None:
    meta, spec = lease.get("metadata") or {}, lease.get("spec") or {}
    node = (meta.get("labels") or {}).get(NODE_LABEL) or spec.get("holderIdentity")
    endpoint = (meta.get("annotations") or {}).get(ENDPOINT_ANNOTATION)
    renew = spec.get("renewTime")
    if not node or not endpoint or not renew:
        return None
    renewed = datetime.fromisoformat(str(renew).replace("Z", "+00:00")).timestamp()
    duration = float(spec.get("leaseDurationSeconds") or 40)
    return AgentInfo(
        node=node,
        endpoint=endpoint,
        tls=(meta.get("annotations") or {}).get(TLS_ANNOTATION) == "true",
        expires=renewed + duration,  # by the node's clock: `observed` dates it by ours
        acquired=str(spec.get("acquireTime") or ""),
        renew_time=str(renew),
        duration=duration,
    )


@dataclass
class RestartState:
    """What of a cache must survive a coordinator restart: read from its status once,
    when this coordinator first sees the cache, then kept here (and written back)."""

    applied: tuple[api.CacheList, ...]
    removing: tuple[Removal, ...]
    purged_generation: int | None

    @classmethod
    def read(cls, status: Mapping[str, Any]) -> RestartState:
        removing = tuple(
            (str(r["image"]), tuple(sorted((r.get("nodeSelector") or {}).items())))
            for r in status.get("removing") or ()
        )
        return cls(api.applied_lists(status), removing, status.get("purgedGeneration"))


@dataclass
class CacheState:
    """The controller's own record of one cache."""

    restart: RestartState
    uid: str = ""  # the object's: a cache deleted and made again under its name is new
    projection: CacheProjection = field(default_factory=CacheProjection)
    spec: tuple[str, api.CacheSpec | None, str] = ("", None, "")  # version, spec, error
    valid: api.CacheSpec | None = None  # the last valid spec: its Secrets while one is not
    cost: float = 0.0  # seconds its last reconcile took on the event loop
    answered: bool = False  # its last pull order was answered: project at once
    done: bool = False  # no pair open when last projected: more of that is no news
    generation: tuple[int, float] = (0, 0.0)  # the spec's, and when first seen here

    def edited(self, generation: int) -> float:
        """When this process first saw `generation` (wall clock)."""
        if self.generation[0] != generation:
            self.generation = (generation, time.time())
        return self.generation[1]


class Controller:
    def __init__(
        self,
        api_client: client.ApiClient,
        kube: KubeWriter,
        registry: NodeRegistry,
        config: ControllerConfig,
        metrics: CoordinatorMetrics | None = None,
        leading: Callable[[], bool] = lambda: True,
    ) -> None:
        """`leading`: whether this process still holds leadership (always, without
        leader election); nothing is ordered or written once it says no."""
        self.metrics = metrics or CoordinatorMetrics()
        self._leading = leading
        self._api = api_client
        self._kube = kube
        self._registry = registry
        self._config = config
        self.queue: WorkQueue[Key] = WorkQueue()
        self.status = StatusWriter(kube, config.status_interval, self.metrics, leading)
        self.desired = Desired(config.settings.wave)
        self._caches: dict[str, CacheState] = {}
        self._results: dict[str, NodeResult] = {}  # every node's last plan
        self.refreshes = Refreshes()
        self._started = time.monotonic()
        self._confirming: asyncio.Task[None] | None = None  # a read of the Leases under way
        self._confirm_at = 0.0  # monotonic: no read before (one failed: the API is away)
        registry.slots.wake = self._wake
        registry.date_answer = self.refreshes.date
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
            CoreV1(api_client).list_node,
            self._on_node,
            transform=metadata_only,
        )
        self.leases = Informer(
            "agent-leases",
            api_client,
            client.CoordinationV1Api(api_client).list_namespaced_lease,
            self._on_lease,
            transform=without_managed_fields,
            namespace=config.agent_namespace,
            label_selector=AGENT_LEASE_SELECTOR,
        )

    # -- event handlers: they only enqueue (run on the loop, through Informer's post) ---

    def _on_cache(self, key: str, old: Obj | None, new: Obj | None) -> None:
        """Our own status write coming back is no news."""
        if new is not None and api.REFRESH_ANNOTATION not in _annotations(new):
            self.refreshes.removed(key)
        if old is not None and new is not None and _intent(old) == _intent(new):
            status = comparable(new.get("status") or {})
            if status == comparable(old.get("status") or {}):
                return  # metadata only (our finalizer going on, labels)
            written = self.status.last_written(key)
            if written is not None and status == comparable(written):
                return
        log.debug("cache %s changed: queued", key)
        self.queue.add((CACHE, key))

    def _on_node(self, key: str, old: Obj | None, new: Obj | None) -> None:
        old_labels = (old or {}).get("metadata", {}).get("labels")
        new_labels = (new or {}).get("metadata", {}).get("labels")
        if old is None or new is None or old_labels != new_labels:
            self.queue.add((NODE, key))
        if self.gate is not None:
            if self.gate.saw_node(key, new):
                self.queue.add((GATE, key))
            if _gate_facts(old) != _gate_facts(new):  # the caches count gated nodes
                for cache, _ in self.desired.node(key).shares:
                    self.queue.add((CACHE, cache))

    def _on_lease(self, key: str, old: Obj | None, new: Obj | None) -> None:
        """The registry owns the observation; it calls `node_changed` if this matters."""
        self._registry.leases_seen(time.time())
        self._lease_changed(old, new)

    def _lease_changed(self, old: Obj | None, new: Obj | None) -> None:
        agent = agent_from_lease(new) if new else None
        before = agent_from_lease(old) if old else None
        node = agent.node if agent else before.node if before else None
        if node:
            self._registry.set_agent(node, agent)

    def node_changed(self, node: str, delay: float = 0.0) -> None:
        """The registry's callback: something changed on `node`; answers that close no
        cache's orders gather for `delay` seconds before the node is planned again. A
        node plan arms its own retry again, so planning now supersedes a pending one."""
        if delay <= 0:
            self.queue.add_now((NODE, node))
        else:
            self.queue.add_after((NODE, node), delay)

    def orders_answered(self, key: str) -> None:
        """The registry's callback: every pull order serving cache `key` has its answer.
        The outcome goes to the status as soon as the node's result is in."""
        state = self._caches.get(key)
        if state is not None:
            state.answered = True

    def _wake(self, node: str) -> None:
        """A wave slot the node waits for is free."""
        self.queue.add((NODE, node))

    def enqueue_all(self) -> None:
        for key in list(self.caches.store):
            self.queue.add((CACHE, key))
        for node in list(self.nodes.store):
            self.queue.add((NODE, node))

    # -- the loop --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, ready: threading.Event | None = None) -> None:
        """Serves until `stop`; sets `ready` once every informer has listed."""
        loop = asyncio.get_running_loop()
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
        await self._prime()
        if ready is not None:
            ready.set()
        tasks = [
            asyncio.create_task(self._worker(i), name=f"worker-{i}")
            for i in range(self._config.workers)
        ]
        tasks.append(asyncio.create_task(self.status.run(), name="status-writer"))
        tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        self.enqueue_all()
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not waiter and task.exception() is not None:
                log.error("controller task %s died", task.get_name(), exc_info=task.exception())
        self.queue.shutdown()
        if self._confirming is not None:
            tasks.append(self._confirming)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for informer in (self.nodes, self.leases, self.caches):
            informer.stop()
        if any(t is not waiter and not t.cancelled() and t.exception() for t in done):
            raise RuntimeError("a controller task died")

    async def _prime(self) -> None:
        """Every cache's shares before any node is planned: a node planned with some
        cache missing would see that cache's pins as nobody's and lift them."""
        for node, obj in self.nodes.store.items():
            self.desired.set_node(node, obj["metadata"].get("labels") or NO_LABELS)
        for key, obj in list(self.caches.store.items()):
            if self.caches.store.get(key) is not obj:
                continue
            try:
                await self._share(key, obj)
            except Exception:  # one cache's trouble must not keep every other one unserved
                log.exception("%s: cannot make its shares at start; its reconcile retries", key)
                # Meanwhile it holds what it last applied, as an invalid spec does.
                restart = RestartState.read(obj.get("status") or {})
                held = CacheView(
                    key=key,
                    generation=int(obj["metadata"].get("generation") or 0),
                    spec=None,
                    applied=restart.applied,
                    purged_generation=restart.purged_generation,
                )
                self._apply(self.desired.set_cache(held))

    async def _worker(self, index: int) -> None:
        """Node keys never wait on I/O, so a worker plans them back to back for a turn
        (WORKER_TURN) before it lets answers and writes in. A fleet-wide order's plans
        then reach the last nodes in about the time they cost, instead of each one
        waiting behind every answer the first nodes sent meanwhile."""
        yielded = time.monotonic()
        while True:
            key = await self.queue.get()
            if key is None:
                return
            if not self._leading():
                self.queue.done(key)
                log.error("leadership not renewed in time: stopping before acting on %s", key)
                return  # run() ends, and the process with it
            kind, name = key
            try:
                if kind == NODE:
                    self.reconcile_node(name)
                elif kind == GATE:
                    await self.reconcile_gate(name)
                else:
                    with self.metrics.reconcile_duration.time():
                        await self.reconcile(name)
                    log.debug("reconciled %s", name)
                    self.metrics.reconciles.labels("success").inc()
                self.queue.forget(key)
            except Exception:
                log.exception("reconcile of %s %s failed; requeued", kind, name)
                if kind == CACHE:
                    self.metrics.reconciles.labels("error").inc()
                self.queue.add_rate_limited(key)
            finally:
                self.queue.done(key)
            if time.monotonic() - yielded >= WORKER_TURN:
                await asyncio.sleep(0)
                yielded = time.monotonic()

    async def _housekeeping(self) -> None:
        """Lease expiry, periodic inventory resync and the refresh timer."""
        alive: dict[str, bool] = {}
        last_refresh = time.time()
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            observations = self._registry.observations
            self.metrics.agents_alive.set(sum(alive.values()))
            self.metrics.agents_listed.set(
                sum(obs.inventory is not None for obs in observations.values())
            )
            self.metrics.agent_channels.set(self._registry.channels)
            if self.gate is not None:
                self.metrics.gated_nodes.set(len(self.gate.gated))
            unconfirmed = False
            for node, obs in observations.items():
                state = obs.alive(now)
                unconfirmed = unconfirmed or obs.unconfirmed(now)
                if alive.get(node) != state:
                    alive[node] = state
                    if not state:
                        log.warning("agent of node %s is gone (Lease expired or missing)", node)
                    self.queue.add((NODE, node))
            if unconfirmed and self._confirming is None and time.monotonic() >= self._confirm_at:
                self._confirming = asyncio.create_task(self._confirm_leases())
            for node in [n for n in alive if n not in observations]:
                del alive[node]
            for node in self._registry.resync_due(now):
                self._registry.resync(node)
            every = self._config.refresh_every
            if every > 0 and now - last_refresh >= every:
                last_refresh = now
                self.refresh_all(now)

    async def _confirm_leases(self) -> None:
        """Some agent's Lease ran out by the clock, but not as of the last news of the
        Leases: they are read from the API server before anyone is taken for gone (the
        watch may have gone silent; if the read fails, the API server is out of reach,
        and no agent could renew meanwhile: nobody is taken for gone)."""
        started = time.time()
        try:
            leases = await asyncio.to_thread(self.leases.read)
        except Exception as err:
            if not self._registry.view.unreachable:
                log.warning(
                    "cannot read the agents' Leases (%s): no agent is taken for gone until "
                    "they can be read",
                    err,
                )
            self._registry.leases_unreadable()
            self._confirm_at = time.monotonic() + CONFIRM_RETRY
            return
        finally:
            self._confirming = None
        for key, obj in self.leases.store.items():
            if key not in leases:
                self._lease_changed(obj, None)
        for key, obj in leases.items():
            self._lease_changed(self.leases.store.get(key), obj)
        self._registry.leases_seen(started)

    def refresh_all(self, now: float) -> None:
        """--image-cache-refresh-frequency: every cache refreshes, but a purged one (or
        one being purged), as kube-fledged's refresh worker skips it: the timer undid
        every purge within a period, pulling and pinning it all back."""
        keys = [key for key, obj in self.caches.store.items() if not self._purged(key, obj)]
        self.refreshes.timer(keys, now)
        for key in keys:
            self.queue.add((CACHE, key))

    def _purged(self, key: str, obj: Obj) -> bool:
        meta = obj["metadata"]
        if api.PURGE_ANNOTATION in (meta.get("annotations") or {}):
            return True
        state = self._caches.get(key)
        restart = state.restart if state is not None else RestartState.read(obj.get("status") or {})
        return restart.purged_generation == int(meta.get("generation") or 0)

    # -- nodes -----------------------------------------------------------------------

    def reconcile_node(self, node: str) -> None:
        """The node's desired state against what it holds: its one batch of orders,
        and its result into every cache with a share of it. No await: the wave slots
        it takes are counted before any other node is planned."""
        self.metrics.node_plans.inc()
        obj = self.nodes.store.get(node)
        labels = obj["metadata"].get("labels") or NO_LABELS if obj is not None else None
        self._apply(self.desired.set_node(node, labels), planning=node)
        if obj is None:
            self._registry.forget_node(node)
            self._registry.slots.wait(node, {})
            self._results.pop(node, None)
            return
        desired = self.desired.node(node)
        now = time.time()
        observation = self._registry.observations.get(node)
        previous = self._results.get(node)
        result = plan_node(node, desired, observation, self._config.settings, now, previous)
        if observation is not None and len(observation.pulls) > len(result.pairs):
            observation.pulls_forgotten(desired.items)
        self._results[node] = result
        self._dispatch(node, desired, result)
        result.pulls.clear()  # sent: kept for the node's life, 100,000 items at 5,000 nodes
        self._registry.slots.wait(node, result.queued)
        for cache, share in desired.shares:
            state = self._caches.get(cache)
            if state is not None:
                state.projection.put(node, share, result)
                self._project(cache, state)
        retry = result.next_retry
        if retry is not None:
            self.queue.add_after((NODE, node), max(0.5, retry - now))
        if self.gate is not None and node in self.gate.gated:
            self.queue.add((GATE, node))  # its images may all be there now

    def _wanted_on(self, node: str) -> list[Wanted]:
        """What the node's desired state wants there (every live cache at once)."""
        return [
            Wanted(self._spelled(desire.caches, key), key, desire.pin, desire.caches)
            for key, desire in self.desired.node(node).items.items()
            if desire.want
        ]

    def _spelled(self, caches: tuple[str, ...], key: ImageKey) -> str:
        """An image as the first of its caches spells it (what its users wrote)."""
        form = self.desired.forms.get(caches[0]) if caches else None
        return form.spelling.get(key, key) if form is not None else key

    async def reconcile_gate(self, node: str) -> None:
        """Node readiness gating: the node's taint goes once its desired state is
        there, only images failed for good are missing, or its deadline has passed."""
        assert self.gate is not None
        decision = self.gate.check(node, time.time())
        if decision is None:
            return  # not gated (any more)
        if not decision.release:
            self.queue.add_after((GATE, node), max(1.0, decision.wait))
            return
        await self.gate.release(node, decision)
        for cache, _ in self.desired.node(node).shares:
            self.queue.add((CACHE, cache))  # their gate counts

    def _apply(self, changes: list[ShareChange], planning: str | None = None) -> None:
        """Shares changed: the nodes concerned are planned again, and the caches'
        projections forget the nodes they no longer have."""
        for change in changes:
            state = self._caches.get(change.cache)
            if state is not None:
                state.projection.share_changed(change.node, change.share)
                if change.share is None:
                    self._project(change.cache, state)
            if change.node != planning:
                self.queue.add((NODE, change.node))

    def _project(self, key: str, state: CacheState) -> None:
        """The cache's projection moved: its status is worth building again, at once
        for news (its last order answered, nothing left open), else after a batch."""
        projection = state.projection
        if projection.pending:
            return
        done = projection.tally.open == 0
        news = state.answered or (done and not state.done)
        state.answered, state.done = False, done
        if news:
            self.queue.add((CACHE, key))
        else:
            self.queue.add_after(
                (CACHE, key), replan_delay(state.cost, self._config.status_interval)
            )

    def _dispatch(self, node: str, desired: NodeDesired, result: NodeResult) -> None:
        items = desired.items

        def creds(image: str) -> tuple[RegistryAuth, ...]:
            desire = items.get(ImageKey(image))
            return credentials_for_key(image, desire.auths) if desire else ()

        if result.pulls:
            caches = {c for item in result.pulls for c in item.caches}
            limit = self._config.byte_progress_max_nodes
            detailed = all(len(self.desired.nodes_of(c)) <= limit for c in caches)
            versions = {k: d.credentials for k, d in items.items() if d.credentials}
            self.metrics.orders.labels("pull").inc(len(result.pulls))
            self._registry.submit_pulls({node: result.pulls}, creds, detailed, versions)
        if result.pins:
            for _, pinned in result.pins:
                self.metrics.orders.labels("pin" if pinned else "unpin").inc()
            if any(not pinned for _, pinned in result.pins):
                lifted = [n for n, p in result.pins if not p]
                log.info("node %s: lifting %d pin(s) no cache wants: %s", node, len(lifted), lifted)
            self._registry.submit_pins(node, result.pins)
        if result.removals:
            self.metrics.orders.labels("remove").inc(len(result.removals))
            self._registry.submit_removals(node, result.removals)
        if result.cancels:
            self.metrics.orders.labels("cancel").inc(len(result.cancels))
            log.info(
                "node %s: cancelling %d pull(s) no cache wants: %s",
                node,
                len(result.cancels),
                list(result.cancels),
            )
            self._registry.submit_cancels(node, result.cancels)
            result.cancels = ()

    # -- caches ----------------------------------------------------------------------

    def _spec(self, state: CacheState, obj: Obj) -> tuple[api.CacheSpec | None, str]:
        version = str(obj["metadata"].get("resourceVersion"))
        if state.spec[0] != version:
            try:
                state.spec = (version, api.parse_spec(obj), "")
            except api.SpecError as err:
                state.spec = (version, None, str(err))
        return state.spec[1], state.spec[2]

    def _credentials(
        self, namespace: str, spec: api.CacheSpec
    ) -> tuple[list[RegistryAuth], list[str], str]:
        """What may log in, what is wrong with the Secrets, and which versions of them
        were read (a change retries pulls refused as Unauthorized)."""
        auths: list[RegistryAuth] = []
        errors = []
        versions = []
        for name in spec.pull_secrets:
            try:
                secret = self._kube.get_secret(namespace, name)
            except (client.ApiException, urllib3.exceptions.HTTPError) as err:
                # Forbidden, or the apiserver failing with none read before: said in the
                # status (it was an exception that failed every reconcile of the cache,
                # and the coordinator's start) and asked again with the next reconcile.
                why = f"{err.status} {err.reason}" if isinstance(err, client.ApiException) else err
                errors.append(
                    f"imagePullSecret {name!r} in namespace {namespace!r} cannot be read: {why}"
                )
                versions.append(f"{name}=?")
                continue
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

    async def _share(self, key: str, obj: Obj) -> tuple[CacheView, CacheState, str, list[str]]:
        """The cache as it asks now, turned into its shares of the nodes. Returns the
        view, the controller's record, the spec's error and the Secrets' errors."""
        meta = obj["metadata"]
        uid = str(meta.get("uid") or "")
        state = self._caches.get(key)
        if state is not None and state.uid != uid:
            # Deleted and made again before a reconcile saw it gone (the two events met
            # in the queue): nothing of the old one (its applied lists, its purge) is
            # the new one's.
            self._forget(key)
            state = None
        if state is None:
            state = CacheState(RestartState.read(obj.get("status") or {}), uid)
            self._caches[key] = state
        deleting = bool(meta.get("deletionTimestamp"))
        annotations = meta.get("annotations") or {}
        echo = self.refreshes.seen(
            key, api.REFRESH_ANNOTATION in annotations, time.time(), time.monotonic()
        )
        if echo:  # our removal not seen yet; if it never shows, the annotation is new then
            self.queue.add_after((CACHE, key), echo)
        spec, spec_error = self._spec(state, obj)
        state.valid = spec or state.valid
        auths: list[RegistryAuth] = []
        secret_errors: list[str] = []
        credentials = ""
        # An invalid spec holds the lists last applied, with the Secrets they came with.
        secrets_of = state.valid
        if secrets_of is not None and secrets_of.pull_secrets and not deleting:
            auths, secret_errors, credentials = await asyncio.to_thread(
                self._credentials, meta["namespace"], secrets_of
            )
        restart = state.restart
        view = CacheView(
            key=key,
            generation=int(meta.get("generation") or 0),
            spec=spec,
            applied=restart.applied,
            removing=restart.removing,
            deleting=deleting,
            purge=api.PURGE_ANNOTATION in annotations,
            purged_generation=restart.purged_generation,
            refresh_since=self.refreshes.since(key),
            edited=state.edited(int(meta.get("generation") or 0)),
            credentials=credentials,
            auths=tuple(auths),
        )
        if spec is not None:  # lists that left the spec are removals now
            restart.removing = open_removals(view)
            restart.applied = spec.lists
            view = CacheView(
                **{**view.__dict__, "applied": restart.applied, "removing": restart.removing}
            )
        self._apply(self.desired.set_cache(view))
        return view, state, spec_error, secret_errors

    def _forget(self, key: str) -> None:
        self.status.forget(key)
        self.refreshes.forget(key)
        self._caches.pop(key, None)
        self._apply(self.desired.drop_cache(key))

    async def reconcile(self, key: str) -> None:
        log.debug("reconciling %s", key)
        obj = self.caches.store.get(key)
        if obj is None:
            self._forget(key)
            return
        meta = obj["metadata"]
        deleting = bool(meta.get("deletionTimestamp"))
        finalizers = list(meta.get("finalizers") or [])
        if deleting and api.FINALIZER not in finalizers:
            self._forget(key)  # going without us: its pins are nobody's now
            return
        view, state, spec_error, secret_errors = await self._share(key, obj)
        projection = state.projection
        if deleting:
            if projection.finalize_done:
                log.info("%s: pins lifted; releasing the finalizer", key)
                await self._set_finalizers(key, obj, [f for f in finalizers if f != api.FINALIZER])
            return
        if not projection.pending:
            started = time.monotonic()
            self._write_status(key, obj, view, state, spec_error, secret_errors)
            # What paces status projection: the work on the event loop, not the API's waits.
            state.cost = time.monotonic() - started
        if api.FINALIZER not in finalizers:
            # After the shares and the first orders: its round trip is not on their way.
            # Pins set before it lands are lifted by the nodes' pin rule if the cache goes.
            await self._set_finalizers(key, obj, [*finalizers, api.FINALIZER])
        if not projection.pending:
            await self._finish_operations(key, obj, view, state)
        if view.credentials and (secret_errors or projection.tally.failed):
            # No Secret is watched: look again for one created or fixed meanwhile.
            self.queue.add_after((CACHE, key), SECRET_TTL)

    async def _set_finalizers(self, key: str, obj: Obj, finalizers: list[str]) -> None:
        if not await asyncio.to_thread(self._kube.set_finalizers, obj, finalizers):
            log.debug("%s: gone or its finalizers changed; its watch event follows", key)

    def _write_status(
        self,
        key: str,
        obj: Obj,
        view: CacheView,
        state: CacheState,
        spec_error: str,
        secret_errors: list[str],
    ) -> None:
        projection = state.projection
        restart = state.restart
        still_open = projection.open_removals(restart.removing)
        if still_open != restart.removing:
            restart.removing = still_open  # done on every node: the shares drop them
            projection.close_removals(still_open)
            self.queue.add((CACHE, key))
        restart.purged_generation = next_purged_generation(view, projection.purge_done)
        hold = self._takeover_hold(key, obj, projection)
        if hold:
            self.queue.add_after((CACHE, key), hold)  # the predecessor's status stands meanwhile
            return
        form = self.desired.forms.get(key)
        spelling = form.spelling if form is not None else {}
        previous = self.status.last_written(key) or obj.get("status") or {}
        status = build_status(
            view,
            projection,
            previous,
            now_iso(),
            spec_error,
            secret_errors,
            unmatched=self.desired.unmatched(key),
            removing=still_open,
            spell=lambda image: spelling.get(ImageKey(image), image),
        )
        if self.gate is not None:
            gated, released = self.gate.counts(self.desired.nodes_of(key), self.nodes.store)
            status["nodesGated"], status["nodesReleased"] = gated, released
        self.status.offer(key, status, projection.tally.counts())

    def _takeover_hold(self, key: str, obj: Obj, projection: CacheProjection) -> float:
        """Seconds to leave the status a predecessor wrote as it is: on a takeover, until
        every node the cache selects has shown an agent, or a grace period has passed.
        A coordinator restarting beside an agent (an upgrade rolls both) would otherwise
        report as unavailable nodes whose agent is only restarting."""
        if not projection.tally.unknown or not obj.get("status") or self.status.last_written(key):
            return 0.0
        return max(0.0, TAKEOVER_GRACE - (time.monotonic() - self._started))

    async def _finish_operations(
        self, key: str, obj: Obj, view: CacheView, state: CacheState
    ) -> None:
        meta = obj["metadata"]
        annotations = meta.get("annotations") or {}
        projection = state.projection
        done = []
        if view.purge and projection.purge_done:
            done.append(api.PURGE_ANNOTATION)
        annotated = api.REFRESH_ANNOTATION in annotations
        if view.refresh_since is not None and projection.settled:
            self.refreshes.finished(key, annotated, time.monotonic())
            if annotated:
                done.append(api.REFRESH_ANNOTATION)
        elif annotated and self.refreshes.echoing(key, time.monotonic()):
            await self._remove_echo(key, meta)
        if done:
            await asyncio.sleep(self._config.status_interval)  # let the final status land first
            removed = await asyncio.to_thread(
                self._kube.patch_metadata,
                meta["namespace"],
                meta["name"],
                {"annotations": {a: None for a in done}},
            )
            if removed:
                log.info("%s: %s done", key, ", ".join(done))
            else:
                log.debug("%s: deleted before its %s ended", key, ", ".join(done))

    async def _remove_echo(self, key: str, meta: Obj) -> None:
        """Our copy still shows the annotation of a refresh that has ended: removed
        already (the watch has not shown it yet), or the removal failed. It is removed
        again only from the object our copy shows: if the cache changed since, the
        annotation on it may be a new request set meanwhile (a blind removal erased
        one in CI), which its own watch event brings as new."""
        removal: Obj = {
            "annotations": {api.REFRESH_ANNOTATION: None},
            "resourceVersion": meta["resourceVersion"],
        }
        try:
            patched = await asyncio.to_thread(
                self._kube.patch_metadata, meta["namespace"], meta["name"], removal
            )
        except client.ApiException as err:
            if err.status != 409:
                raise
            patched = False
        if not patched:
            log.debug("%s: the refresh annotation changed since our copy; left alone", key)
            return
        log.info("%s: %s done", key, api.REFRESH_ANNOTATION)


def _annotations(obj: Obj) -> Mapping[str, Any]:
    return (obj.get("metadata") or {}).get("annotations") or {}


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
