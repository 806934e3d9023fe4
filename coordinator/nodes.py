"""The coordinator's view of every node and the orders in flight to its agent.

Owns one `NodeObservation` per node and every task that talks to an agent. Answers
and pull events update the observation, then `on_change(node)` tells the controller
which caches to look at again; nothing here decides what to order.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2

from common.reference import InvalidReference, parse
from protos.fledged.agent.v1 import agent_pb2

from .agents import AgentPool
from .model import (
    AgentInfo,
    Inventory,
    NodeObservation,
    OrderPhase,
    PullRecord,
    shared_image,
)
from .pairs import PullItem
from .secrets import RegistryAuth

log = logging.getLogger(__name__)

CATEGORY_NAMES = {
    agent_pb2.ERROR_CATEGORY_NOT_FOUND: "NotFound",
    agent_pb2.ERROR_CATEGORY_UNAUTHORIZED: "Unauthorized",
    agent_pb2.ERROR_CATEGORY_REGISTRY_UNAVAILABLE: "RegistryUnavailable",
    agent_pb2.ERROR_CATEGORY_DEADLINE_EXCEEDED: "DeadlineExceeded",
    agent_pb2.ERROR_CATEGORY_INVALID_REFERENCE: "InvalidReference",
    agent_pb2.ERROR_CATEGORY_INSUFFICIENT_DISK: "InsufficientDisk",
    agent_pb2.ERROR_CATEGORY_RUNTIME_UNAVAILABLE: "RuntimeUnavailable",
    agent_pb2.ERROR_CATEGORY_INTERNAL: "Internal",
}
AGENT_UNAVAILABLE = "AgentUnavailable"
LISTINGS_AT_ONCE = 64  # a restart over 5,000 nodes lists them a few dozen at a time
CHANNEL_CLOSE_GRACE = 30.0  # seconds calls on a channel no agent uses any more may finish
PROGRESS_NOTIFY_EVERY = 1.0  # seconds: progress reaches status at most this often per node
CredentialsFor = Callable[[str], Sequence[RegistryAuth]]  # image -> what may log in for it


def canonical(image: str) -> str:
    try:
        return parse(image).canonical
    except InvalidReference:
        return image


@functools.lru_cache(maxsize=65536)
def _normalized(name: str) -> str | None:
    try:
        return str(parse(name))
    except InvalidReference:
        return None


def _normalize_all(names: Sequence[str]) -> frozenset[str]:
    return frozenset(n for n in map(_normalized, names) if n is not None)


def _credentials(auth: RegistryAuth) -> agent_pb2.RegistryCredentials:
    return agent_pb2.RegistryCredentials(
        server_address=auth.server_address,
        username=auth.username,
        password=auth.password,
        auth=auth.auth,
        identity_token=auth.identity_token,
    )


def renewed(old: AgentInfo | None, new: AgentInfo | None, now: float) -> bool:
    """Only the Lease's renewal moved: the same agent process, not run out, and not
    shortened (plans made with the old expiry stay right until then)."""
    return (
        old is not None
        and new is not None
        and old.alive(now)
        and new.expires >= old.expires
        and same_process(old, new)
    )


def same_process(old: AgentInfo, new: AgentInfo) -> bool:
    return (old.node, old.endpoint, old.tls, old.acquired) == (
        new.node,
        new.endpoint,
        new.tls,
        new.acquired,
    )


def inventory_from(resp: agent_pb2.ListImagesResponse, now: float) -> Inventory:
    return Inventory(
        [
            shared_image(
                i.id,
                _normalize_all(i.repo_tags),
                _normalize_all(i.repo_digests),
                i.pin == agent_pb2.PIN_STATE_PINNED,
                i.pinned_by_fledged,
                i.size,
            )
            for i in resp.images
        ],
        now,
    )


class NodeRegistry:
    def __init__(
        self,
        pool: AgentPool,
        on_change: Callable[[str], None],
        pull_deadline: float,
        resync_every: float = 120.0,
        on_answered: Callable[[str], None] | None = None,
    ) -> None:
        self._pool = pool
        self._on_change = on_change
        self._on_answered = on_answered
        self._open_orders: Counter[str] = Counter()  # cache key -> pull orders unanswered
        self._deadline = pull_deadline
        self._resync_every = resync_every
        self.observations: dict[str, NodeObservation] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        self._last_notify: dict[str, float] = {}
        self._listings = asyncio.Semaphore(LISTINGS_AT_ONCE)
        self._users: Counter[str] = Counter()  # endpoint -> nodes whose agent is there
        self._listing: weakref.WeakSet[asyncio.Task[object]] = weakref.WeakSet()

    # -- bookkeeping -----------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, object], name: str) -> asyncio.Task[object]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _list(self, node: str) -> None:
        self._listing.add(self._spawn(self.sync(node), f"sync {node}"))

    async def first_listings(self, seconds: float) -> int:
        """Waits, at most `seconds`, for the listings under way (a coordinator that
        takes over lists every agent first): its first reconciles then report what the
        nodes hold, not that it has yet to look. Returns how many are still going."""
        pending = {t for t in self._listing if not t.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=seconds)
        return len(pending)

    def _finished(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("agent task %s failed", task.get_name(), exc_info=task.exception())

    @property
    def channels(self) -> int:
        return len(self._pool)

    def observation(self, node: str) -> NodeObservation:
        obs = self.observations.get(node)
        if obs is None:
            obs = self.observations[node] = NodeObservation()
        return obs

    def in_flight_by_image(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for obs in self.observations.values():
            for key, record in obs.pulls.items():
                if record.in_flight:
                    counts[key] = counts.get(key, 0) + 1
        return counts

    def _notify(self, node: str, progress_only: bool = False) -> None:
        now = time.monotonic()
        if progress_only and now - self._last_notify.get(node, 0) < PROGRESS_NOTIFY_EVERY:
            return
        self._last_notify[node] = now
        self._on_change(node)

    # -- agents ----------------------------------------------------------------------

    def set_agent(self, node: str, agent: AgentInfo | None) -> None:
        """A Lease appeared, changed or went away."""
        obs = self.observation(node)
        old = obs.agent
        obs.agent = agent
        self._move(old, agent)
        if renewed(old, agent, time.time()) and obs.inventory is not None:
            return  # the same agent, still alive and listed: nothing to plan anew
        obs.touch()
        new_process = agent is not None and (old is None or not same_process(old, agent))
        if agent is None or new_process:
            obs.unlist()
        if new_process:
            # Orders lost with the previous agent go to this one now, not after a backoff.
            lost = [
                key
                for key, record in obs.pulls.items()
                if record.phase is OrderPhase.FAILED and record.category == AGENT_UNAVAILABLE
            ]
            for key in lost:
                del obs.pulls[key]
            if old is not None:
                log.info(
                    "node %s: a new agent process at %s; %d order(s) lost with the previous "
                    "one will be sent again",
                    node,
                    agent.endpoint if agent else "-",
                    len(lost),
                )
        if agent is not None and (new_process or obs.inventory is None):
            self._list(node)
        self._notify(node)

    def forget_node(self, node: str) -> None:
        obs = self.observations.pop(node, None)
        if obs is not None:
            self._move(obs.agent, None)

    def _move(self, old: AgentInfo | None, new: AgentInfo | None) -> None:
        """Counts the nodes behind each endpoint; closes the channel of one that has
        none left (agent pods get a new address on every restart: without this, each
        restart would leave a channel behind)."""
        before = old.endpoint if old is not None else None
        after = new.endpoint if new is not None else None
        if before == after:
            return
        if after is not None:
            self._users[after] += 1
        if before is not None:
            self._users[before] -= 1
            if self._users[before] <= 0:
                del self._users[before]
                client = self._pool.discard(before)
                if client is not None:
                    self._spawn(client.close(CHANNEL_CLOSE_GRACE), f"close {before}")

    def resync_due(self, now: float) -> list[str]:
        return [
            node
            for node, obs in self.observations.items()
            if obs.agent is not None
            and obs.agent.alive(now)
            and obs.inventory is not None
            and now - obs.inventory.synced_at > self._resync_every
        ]

    def resync(self, node: str) -> None:
        self._list(node)

    async def sync(self, node: str, abilities: bool = True) -> bool:
        """Lists the node's images through its agent; with `abilities`, asks what its
        runtime can do too (needed once per agent process, not after every batch).
        Returns whether anything changed (and the controller was told)."""
        obs = self.observation(node)
        agent = obs.agent
        if agent is None:
            return False
        client = self._pool.get(agent.endpoint)
        try:
            async with self._listings:
                info = await client.node_info(node) if abilities else None
                listing = await client.list_images(node)
        except grpc.RpcError as err:
            log.warning(
                "cannot list images on %s (%s): %s",
                node,
                agent.endpoint,
                err.details() if hasattr(err, "details") else err,
            )
            return False
        if obs.agent is not agent:
            return False  # replaced meanwhile
        fresh = inventory_from(listing, time.time())
        same = (
            obs.inventory is not None
            and obs.inventory.same_images(fresh)
            and not obs.removal_errors
            and (info is None or info.pinning_supported == obs.pinning_supported)
        )
        obs.inventory = fresh
        if same:
            return False  # as the answers already told: nothing to plan anew
        if info is not None:
            obs.pinning_supported = info.pinning_supported
        obs.removal_errors.clear()
        obs.touch()
        self._notify(node)
        return True

    # -- orders ----------------------------------------------------------------------

    def submit_pulls(
        self,
        batches: Mapping[str, Sequence[PullItem]],
        credentials_for: CredentialsFor,
        cache_key: str,
        detailed: bool = True,
        credentials: str = "",
    ) -> None:
        """One PullImages call per node. `detailed`: ask for WAITING and byte progress
        too, not only outcomes. Each distinct order is built once for all nodes."""
        orders: dict[PullItem, agent_pb2.ImagePull] = {}
        deadline = duration_pb2.Duration(seconds=int(self._deadline))
        progress = agent_pb2.PROGRESS_FULL if detailed else agent_pb2.PROGRESS_OUTCOMES
        now = time.time()
        for node, items in batches.items():
            obs = self.observation(node)
            if obs.agent is None or not items:
                continue
            keys = [canonical(item.image) for item in items]
            obs.touch(*keys)
            for key, item in zip(keys, items, strict=True):
                old = obs.pulls.get(key)
                obs.pulls[key] = PullRecord(
                    OrderPhase.SENT,
                    started=now,
                    failures=old.failures if old else 0,
                    credentials=credentials,
                )
                if item not in orders:
                    orders[item] = agent_pb2.ImagePull(
                        image=item.image,
                        policy=agent_pb2.PULL_POLICY_ALWAYS
                        if item.always
                        else agent_pb2.PULL_POLICY_IF_NOT_PRESENT,
                        credentials=[_credentials(a) for a in credentials_for(item.image)],
                        deadline=deadline,
                        pin=item.pin,
                        replace=item.replace,
                    )
            request_id = f"{cache_key}/{uuid.uuid4().hex[:8]}"
            request = agent_pb2.PullImagesRequest(
                request_id=request_id, progress=progress, images=[orders[item] for item in items]
            )
            log.debug("pull batch %s to %s: %d image(s)", request_id, node, len(items))
            open_keys = set(keys)
            self._open_orders[cache_key] += len(open_keys)
            self._spawn(
                self._pull(node, obs.agent, request.SerializeToString(), open_keys, cache_key),
                f"pull {node} {request_id}",
            )

    async def _pull(
        self, node: str, agent: AgentInfo, request: bytes, open_keys: set[str], cache_key: str
    ) -> None:
        """`request`: the serialized PullImagesRequest for `open_keys`, ordered by the
        cache `cache_key`."""
        try:
            await self._stream_pull(node, agent, request, open_keys, cache_key)
        finally:
            self._answered(cache_key, len(open_keys))  # left unanswered: count them off too

    def _answered(self, cache_key: str, count: int) -> None:
        if not count:
            return
        self._open_orders[cache_key] -= count
        if self._open_orders[cache_key] <= 0:
            del self._open_orders[cache_key]
            if self._on_answered is not None:
                self._on_answered(cache_key)

    async def _stream_pull(
        self, node: str, agent: AgentInfo, request: bytes, open_keys: set[str], cache_key: str
    ) -> None:
        obs = self.observation(node)
        client = self._pool.get(agent.endpoint)
        overall = self._deadline * len(open_keys) + 60  # the agent enforces each pull's deadline
        try:
            async for event in client.pull(node, request, limit=overall):
                key = canonical(event.image)
                self._apply_event(obs, key, event)
                if event.phase in (
                    agent_pb2.PHASE_SUCCEEDED,
                    agent_pb2.PHASE_ALREADY_PRESENT,
                    agent_pb2.PHASE_FAILED,
                ):
                    log.debug(
                        "node %s answered %s: %s",
                        node,
                        event.image,
                        agent_pb2.Phase.Name(event.phase),
                    )
                    self._notify(node)
                    if key in open_keys:
                        open_keys.discard(key)
                        self._answered(cache_key, 1)
                else:
                    self._notify(node, progress_only=True)
        except grpc.RpcError as err:
            detail = err.details() if hasattr(err, "details") else err
            message = f"lost the agent at {agent.endpoint}: {detail}"
            log.warning("pull batch on %s broke: %s", node, message)
            now = time.time()
            obs.touch(*open_keys)
            for key in open_keys:
                record = obs.pulls.get(key)
                if record is not None and record.in_flight:
                    record.phase = OrderPhase.FAILED
                    record.category = AGENT_UNAVAILABLE
                    record.message = message
                    record.finished = now
                    record.failures += 1
            self._notify(node)
            return
        await self.sync(node, abilities=False)  # the batch changed the node: list it again

    @staticmethod
    def _apply_event(obs: NodeObservation, key: str, event: agent_pb2.PullEvent) -> None:
        obs.touch(key)
        record = obs.pulls.get(key)
        if record is None:
            record = obs.pulls[key] = PullRecord(OrderPhase.SENT, started=time.time())
        if event.phase == agent_pb2.PHASE_WAITING:
            record.phase = OrderPhase.WAITING
        elif event.phase == agent_pb2.PHASE_PULLING:
            record.phase = OrderPhase.PULLING
            record.bytes_done, record.bytes_total = event.bytes_done, event.bytes_total
        elif event.phase in (agent_pb2.PHASE_SUCCEEDED, agent_pb2.PHASE_ALREADY_PRESENT):
            record.phase = OrderPhase.DONE
            record.finished = time.time()
            record.failures = 0
            record.category = record.message = ""
            record.digest = event.repo_digest
            record.bytes_done, record.bytes_total = event.bytes_done, event.bytes_total
            if obs.inventory is not None:
                ref = parse(event.image)
                digest = event.repo_digest
                obs.add_pulled(
                    event.image_id,
                    _normalize_all([f"{ref.name}:{ref.tag}"] if ref.tag else []),
                    _normalize_all([f"{ref.name}@{digest}"] if digest else []),
                    event.pin == agent_pb2.PIN_STATE_PINNED,
                    event.size,
                )
        elif event.phase == agent_pb2.PHASE_FAILED:
            record.phase = OrderPhase.FAILED
            record.finished = time.time()
            record.failures += 1
            record.category = CATEGORY_NAMES.get(event.error_category, "Internal")
            record.message = event.error_message

    def submit_pins(self, node: str, changes: Sequence[tuple[str, bool]]) -> None:
        obs = self.observation(node)
        if obs.agent is None or not changes:
            return
        obs.touch()
        for image, _ in changes:
            obs.pins_in_flight.add(canonical(image))
        self._spawn(self._pin(node, obs.agent, list(changes)), f"pin {node}")

    async def _pin(self, node: str, agent: AgentInfo, changes: list[tuple[str, bool]]) -> None:
        obs = self.observation(node)
        client = self._pool.get(agent.endpoint)
        try:
            for pinned in (True, False):
                images = [image for image, p in changes if p is pinned]
                if images:
                    resp = await client.set_pinned(node, images, pinned)
                    for result in resp.results:
                        if result.error_category:
                            log.warning(
                                "%s %s on %s failed: %s",
                                "pin" if pinned else "unpin",
                                result.image,
                                node,
                                result.error_message,
                            )
        except grpc.RpcError as err:
            log.warning("pin changes on %s failed: %s", node, err)
        finally:
            obs.touch()
            for image, _ in changes:
                obs.pins_in_flight.discard(canonical(image))
        if not await self.sync(node, abilities=False):
            self._notify(node)  # the pins are no longer in flight, whatever they did

    def submit_removals(self, node: str, images: Sequence[str]) -> None:
        obs = self.observation(node)
        if obs.agent is None or not images:
            return
        obs.touch()
        for image in images:
            obs.removals_in_flight.add(canonical(image))
        self._spawn(self._remove(node, obs.agent, list(images)), f"remove {node}")

    async def _remove(self, node: str, agent: AgentInfo, images: list[str]) -> None:
        obs = self.observation(node)
        client = self._pool.get(agent.endpoint)
        try:
            resp = await client.remove(node, images)
            for result in resp.results:
                if result.error_category:
                    obs.removal_errors[canonical(result.image)] = result.error_message
                    log.warning(
                        "removing %s on %s failed: %s", result.image, node, result.error_message
                    )
                else:
                    obs.pulls.pop(canonical(result.image), None)
        except grpc.RpcError as err:
            log.warning("removals on %s failed: %s", node, err)
        finally:
            obs.touch()
            for image in images:
                obs.removals_in_flight.discard(canonical(image))
        errors = dict(obs.removal_errors)
        changed = await self.sync(node, abilities=False)
        if errors:
            obs.removal_errors.update(errors)  # kept (not retried) until the next resync
            obs.touch()
        if errors or not changed:
            self._notify(node)  # the removals are no longer in flight, whatever they did

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
