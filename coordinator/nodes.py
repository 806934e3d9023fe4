"""gRPC orders to the agents and their answers: the one writer of every node's
`NodeObservation`.

Owns one observation per node and every task that talks to an agent. Answers and pull
events change the observation through its methods, then `on_change(node, delay)`
tells the controller the node is worth planning again, at once or after answers have
gathered for `delay` seconds; nothing here decides what to order.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2

from protos.fledged.agent.v1 import agent_pb2

from .agents import AgentClient, AgentPool
from .images import ImageKey, image_key, key_or_none, ref_of
from .model import (
    AgentInfo,
    Inventory,
    LeaseView,
    NodeObservation,
    Pulled,
    names,
    observed,
    shared_image,
)
from .pairs import PullItem
from .secrets import RegistryAuth
from .waves import WaveSlots

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
OUTCOMES = frozenset(
    {
        agent_pb2.PHASE_SUCCEEDED,
        agent_pb2.PHASE_ALREADY_PRESENT,
        agent_pb2.PHASE_FAILED,
        agent_pb2.PHASE_CANCELLED,
    }
)
LISTINGS_AT_ONCE = 64  # a restart over 5,000 nodes lists them a few dozen at a time
LISTING_TRIES = 3  # listings taken again when a pull answer came in meanwhile
RELIST_AFTER = 5.0  # seconds before a failed listing is tried again (then doubling)
UNLISTED_AFTER = 2  # failed listings in a row before the node's pairs say why
CHANNEL_CLOSE_GRACE = 30.0  # seconds calls on a channel no agent uses any more may finish
PROGRESS_NOTIFY_EVERY = 1.0  # seconds: progress reaches status at most this often per node
ANSWERS_GATHER = 0.25  # seconds answers that leave orders open gather before a replan
# ... and when only outcomes are asked for (a cache over --byte-progress-max-nodes): its
# status is written at most once a second anyway, and a node's answers come every pull
OUTCOMES_GATHER = 5.0
CredentialsFor = Callable[[str], Sequence[RegistryAuth]]  # image -> what may log in for it


def _cancelling() -> bool:
    """Whether this task itself is being cancelled. grpc.aio ends the calls of a channel
    we closed with CancelledError too (an endpoint no node uses any more), which is the
    agent lost, not a stop."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _credentials(auth: RegistryAuth) -> agent_pb2.RegistryCredentials:
    return agent_pb2.RegistryCredentials(
        server_address=auth.server_address,
        username=auth.username,
        password=auth.password,
        auth=auth.auth,
        identity_token=auth.identity_token,
    )


@functools.lru_cache(maxsize=4096)
def encoded_pull(
    image: str,
    always: bool,
    pin: bool,
    replace: bool,
    auths: tuple[RegistryAuth, ...],
    deadline: int,
) -> bytes:
    """One image's part of a serialized PullImagesRequest. Serialized messages append
    their repeated fields when concatenated (the protobuf encoding's merge rule), so a
    fleet-wide order encodes each image once, not once per node (100,000 messages built
    and serialized for 5,000 nodes x 20 images)."""
    item = agent_pb2.ImagePull(
        image=image,
        policy=agent_pb2.PULL_POLICY_ALWAYS if always else agent_pb2.PULL_POLICY_IF_NOT_PRESENT,
        credentials=[_credentials(a) for a in auths],
        deadline=duration_pb2.Duration(seconds=deadline),
        pin=pin,
        replace=replace,
    )
    return agent_pb2.PullImagesRequest(images=[item]).SerializeToString()


@functools.lru_cache(maxsize=256)
def _request(
    label: str, progress: agent_pb2.Progress.ValueType, images: bytes
) -> tuple[str, bytes]:
    """The id and serialized PullImagesRequest of a batch. The id names the batch's
    content (a log correlation id, nothing else reads it), so nodes ordered alike share
    one request: gRPC keeps it for the stream's life (~1 KiB for 20 images, 5 MiB over
    5,000 nodes)."""
    request_id = f"{label}/{hashlib.sha256(images).hexdigest()[:8]}"
    head = agent_pb2.PullImagesRequest(request_id=request_id, progress=progress)
    return request_id, head.SerializeToString() + images


def inventory_from(resp: agent_pb2.ListImagesResponse, now: float) -> Inventory:
    return Inventory(
        [
            shared_image(
                i.id,
                names(i.repo_tags),
                names(i.repo_digests),
                i.pin == agent_pb2.PIN_STATE_PINNED,
                i.pinned_by_fledged,
                i.size,
            )
            for i in resp.images
        ],
        now,
    )


@functools.lru_cache(maxsize=16384)
def _answer_names(image: str, digest: str) -> tuple[frozenset[ImageKey], frozenset[ImageKey], str]:
    """The tag and digest keys an answer adds, and its digest: one object for each for
    the whole fleet (each answer's strings are new; a pull record keeps the digest)."""
    ref = ref_of(image_key(image))
    return (
        names([f"{ref.name}:{ref.tag}"] if ref.tag else []),
        names([f"{ref.name}@{digest}"] if digest else []),
        digest,
    )


# One int object for each size the fleet reports alike (pull records keep two).
_shared_size = functools.lru_cache(maxsize=16384)(int)


def pulled_from(event: agent_pb2.PullEvent) -> Pulled:
    """A pull's answer: the image joins the node under its tag and its digest."""
    tags, digests, digest = _answer_names(event.image, event.repo_digest)
    return Pulled(
        image_id=event.image_id,
        tags=tags,
        digests=digests,
        pinned=event.pin == agent_pb2.PIN_STATE_PINNED,
        size=event.size,
        digest=digest,
        bytes_done=_shared_size(event.bytes_done),
        bytes_total=_shared_size(event.bytes_total),
    )


class NodeRegistry:
    def __init__(
        self,
        pool: AgentPool,
        on_change: Callable[[str, float], None],
        pull_deadline: float,
        resync_every: float = 120.0,
        on_answered: Callable[[str], None] | None = None,
        slots: WaveSlots | None = None,
    ) -> None:
        self._pool = pool
        self._on_change = on_change  # (node, seconds to gather more first)
        self._on_answered = on_answered
        self._open_orders: Counter[str] = Counter()  # cache key -> pull orders unanswered
        self._deadline = pull_deadline
        self._resync_every = resync_every
        self.slots = slots if slots is not None else WaveSlots()
        self.view = LeaseView()
        self.observations: dict[str, NodeObservation] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        self._last_notify: dict[str, float] = {}
        self._listings = asyncio.Semaphore(LISTINGS_AT_ONCE)
        self._users: Counter[str] = Counter()  # endpoint -> nodes whose agent is there
        self._listing: weakref.WeakSet[asyncio.Task[object]] = weakref.WeakSet()
        self._listing_failures: dict[str, int] = {}
        self._syncing: Counter[str] = Counter()  # node -> its listings under way or queued
        self._relists: dict[str, asyncio.TimerHandle] = {}
        # The date a pull's success is recorded with: its time unless the controller
        # dates it by refresh starts (Refreshes.date), so that answers alike are shared.
        self.date_answer: Callable[[float], float] | None = None

    # -- bookkeeping -----------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, object], name: str) -> asyncio.Task[object]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _list(self, node: str, abilities: bool = True) -> None:
        self._listing.add(self._spawn(self.sync(node, abilities), f"sync {node}"))

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
            obs = self.observations[node] = NodeObservation(slots=self.slots, view=self.view)
        return obs

    def _notify(self, node: str, progress_only: bool = False, delay: float = 0.0) -> None:
        now = time.monotonic()
        if progress_only and now - self._last_notify.get(node, 0) < PROGRESS_NOTIFY_EVERY:
            return
        self._last_notify[node] = now
        self._on_change(node, delay)

    # -- agents ----------------------------------------------------------------------

    def leases_seen(self, when: float) -> None:
        """News of the agents' Leases, as they were at `when` (see LeaseView). The
        first after a failed read gives every agent a whole Lease from now."""
        view = self.view
        if view.unreachable:
            log.info("the agents' Leases can be read again: each agent has a whole Lease to renew")
            view.unreachable = False
            now = time.time()
            for obs in self.observations.values():
                obs.grace(now)
        view.seen = when

    def leases_unreadable(self) -> None:
        self.view.unreachable = True

    def set_agent(self, node: str, agent: AgentInfo | None) -> None:
        """A Lease appeared, changed or went away."""
        obs = self.observation(node)
        old = obs.agent
        version = obs.version
        now = time.time()
        if agent is not None:
            agent = observed(agent, old, now)
        relist, lost = obs.set_agent(agent, now)
        self._move(old, agent)
        if obs.version == version:
            return  # only the renewal moved
        if lost or (old is not None and agent is not None and not old.same_process(agent)):
            log.info(
                "node %s: a new agent process at %s; %d order(s) lost with the previous "
                "one will be sent again",
                node,
                agent.endpoint if agent else "-",
                lost,
            )
        # A renewal of a process not listed yet asks again, unless a failed listing's
        # retry is already set (its backoff would be undone at every renewal).
        retrying = (
            node in self._relists
            and old is not None
            and agent is not None
            and old.same_process(agent)
        )
        if relist and not retrying:
            self._list(node)
        self._notify(node)

    def forget_node(self, node: str) -> None:
        obs = self.observations.pop(node, None)
        if obs is not None:
            obs.forget()
            self._move(obs.agent, None)
        self._last_notify.pop(node, None)
        self._listing_failures.pop(node, None)
        timer = self._relists.pop(node, None)
        if timer is not None:
            timer.cancel()

    def _client(self, agent: AgentInfo) -> AgentClient:
        """The channel to `agent`, taken only while it is the node's agent (when work
        for it is queued, or a listing's turn comes): if the agent moves before the work
        runs, that channel is closed and the work fails as out of reach. Taken later,
        the pool would dial anew an address no node uses, a channel nobody would close."""
        return self._pool.get(agent.endpoint)

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
        """Nodes whose last listing is older than the resync period, but for those
        being listed (or waiting to be, behind LISTINGS_AT_ONCE) or waiting to try a
        failed listing again: asked every second, slow listings (hung agents, 30 s
        each) piled up a new listing of every such node each second, without bound."""
        return [
            node
            for node, obs in self.observations.items()
            if obs.alive(now)
            and obs.inventory is not None
            and now - obs.inventory.synced_at > self._resync_every
            and node not in self._syncing
            and node not in self._relists
        ]

    def resync(self, node: str) -> None:
        self._list(node)

    def _relist(self, node: str, agent: AgentInfo, abilities: bool) -> None:
        """A listing failed: until one succeeds, what the node's last answers left
        unsure (pins that look unwanted) waits, so try again while the process lives."""
        self._relists.pop(node, None)
        obs = self.observations.get(node)
        if (
            obs is not None
            and self._still(node, obs, agent)
            and obs.alive(time.time())  # expired: the periodic resync takes over once renewed
        ):
            self._list(node, abilities)

    async def sync(self, node: str, abilities: bool = True) -> bool:
        """Lists the node's images through its agent; with `abilities`, asks what its
        runtime can do too (needed once per agent process, not after every batch).
        Returns whether anything changed (and the controller was told)."""
        self._syncing[node] += 1
        try:
            return await self._sync(node, abilities)
        finally:
            self._syncing[node] -= 1
            if self._syncing[node] <= 0:
                del self._syncing[node]

    def _still(self, node: str, obs: NodeObservation, agent: AgentInfo) -> bool:
        """Whether a listing begun through `agent` still counts: the node is still known
        (a plan forgets one without a Node, closing its channel) and served by the same
        agent process (one that moved is listed anew through its new address)."""
        current = obs.agent
        return (
            self.observations.get(node) is obs
            and current is not None
            and current.same_process(agent)
        )

    async def _sync(self, node: str, abilities: bool) -> bool:
        obs = self.observation(node)
        agent = obs.agent
        if agent is None:
            return False
        try:
            async with self._listings:
                if not self._still(node, obs, agent):
                    return False  # it moved while this waited its turn: listed anew
                client = self._client(agent)
                info = await client.node_info(node) if abilities else None
                for _ in range(LISTING_TRIES):
                    answers = obs.answers
                    listing = await client.list_images(node)
                    if obs.answers == answers:
                        break
                else:  # answers keep coming: the sync at the end of their batch lists
                    return False
        except grpc.RpcError as err:
            if not self._still(node, obs, agent):
                log.debug(
                    "listing %s through %s ended: its agent moved or its node went",
                    node,
                    agent.endpoint,
                )
                return False  # the new process is listed anew
            failures = self._listing_failures[node] = self._listing_failures.get(node, 0) + 1
            retry = min(self._resync_every, RELIST_AFTER * 2 ** (failures - 1))
            detail = str(err.details() if hasattr(err, "details") else err)
            log.warning(
                "cannot list images on %s (%s), trying again in %gs: %s",
                node,
                agent.endpoint,
                retry,
                detail,
            )
            if failures >= UNLISTED_AFTER and obs.agent is not None:
                before = obs.version
                obs.listing_failed(detail)
                if obs.version != before:
                    self._notify(node)
            old = self._relists.pop(node, None)
            if old is not None:
                old.cancel()
            self._relists[node] = asyncio.get_running_loop().call_later(
                retry, self._relist, node, agent, abilities
            )
            return False
        self._listing_failures.pop(node, None)
        if not self._still(node, obs, agent):
            return False  # another process took over meanwhile: it is listed anew
        fresh = inventory_from(listing, time.time())
        pulling = [key for image in listing.pulling if (key := key_or_none(image)) is not None]
        if not obs.listed(fresh, info.pinning_supported if info is not None else None, pulling):
            return False  # as the answers already told: nothing to plan anew
        self._notify(node)
        return True

    # -- orders ----------------------------------------------------------------------

    def submit_pulls(
        self,
        batches: Mapping[str, Sequence[PullItem]],
        credentials_for: CredentialsFor,
        detailed: bool = True,
        versions: Mapping[ImageKey, str] | None = None,
    ) -> None:
        """One PullImages call per node. `detailed`: ask for WAITING and byte progress
        too, not only outcomes; `versions`: the pull Secrets each image goes with."""
        deadline = int(self._deadline)
        progress = agent_pb2.PROGRESS_FULL if detailed else agent_pb2.PROGRESS_OUTCOMES
        for node, items in batches.items():
            obs = self.observation(node)
            if obs.agent is None or not items:
                continue
            keys = [image_key(item.image) for item in items]
            obs.pulls_ordered(keys, versions or {})
            images = b"".join(
                encoded_pull(
                    item.image,
                    item.always,
                    item.pin,
                    item.replace,
                    tuple(credentials_for(item.image)),
                    deadline,
                )
                for item in items
            )
            caches = sorted({c for item in items for c in item.caches})
            label = (
                (caches[0] if len(caches) == 1 else f"{caches[0]}+{len(caches) - 1}")
                if caches
                else node
            )
            request_id, request = _request(label, progress, images)
            log.debug("pull batch %s to %s: %d image(s)", request_id, node, len(items))
            waiting = {key: item.caches for key, item in zip(keys, items, strict=True)}
            for item in items:
                self._open_orders.update(item.caches)
            gather = ANSWERS_GATHER if detailed else OUTCOMES_GATHER
            self._spawn(
                self._stream_pull(
                    node, obs.agent, self._client(obs.agent), request, waiting, gather
                ),
                f"pull {node} {request_id}",
            )

    def _answered(self, caches: tuple[str, ...]) -> bool:
        """Counts one answer off for each of `caches`; True if it was the last of one."""
        last = False
        for cache in caches:
            self._open_orders[cache] -= 1
            if self._open_orders[cache] <= 0:
                del self._open_orders[cache]
                last = True
                if self._on_answered is not None:
                    self._on_answered(cache)
        return last

    async def _stream_pull(
        self,
        node: str,
        agent: AgentInfo,
        client: AgentClient,
        request: bytes,
        waiting: dict[ImageKey, tuple[str, ...]],
        gather: float,
    ) -> None:
        """`request`: the serialized PullImagesRequest for the images of `waiting`, each
        with the caches waiting for its answer; `gather`: how long answers that close
        nothing gather before the node is planned again."""
        obs = self.observation(node)
        # The agent enforces each pull's deadline, from when the pull starts there: the
        # node's earlier batches still running go first, so the limit counts them too
        # (a batch of one behind a long one was cut, "lost the agent", while it waited).
        running = sum(1 for record in obs.pulls.values() if record.in_flight)
        overall = self._deadline * max(len(waiting), running) + 60
        try:
            async for event in client.pull(node, request, limit=overall):
                key = image_key(event.image)
                self._apply_event(obs, key, event, self.date_answer)
                if event.phase in OUTCOMES:
                    log.debug(
                        "node %s answered %s: %s",
                        node,
                        event.image,
                        agent_pb2.Phase.Name(event.phase),
                    )
                    caches = waiting.pop(key, None)
                    last = caches is not None and self._answered(caches)
                    self._notify(node, delay=0.0 if last or not waiting else gather)
                else:
                    self._notify(node, progress_only=True, delay=ANSWERS_GATHER)
            if waiting:  # ended cleanly but short: those orders are not in flight any more
                message = f"the agent at {agent.endpoint} ended the batch without answering"
                log.warning("pull batch on %s: %s for %d image(s)", node, message, len(waiting))
                obs.pulls_lost(waiting, message, time.time())
                self._notify(node)
        except (grpc.RpcError, asyncio.CancelledError) as err:
            if isinstance(err, asyncio.CancelledError):
                if _cancelling():
                    raise  # we are stopping: nothing to record
                detail: object = "its channel was closed (the agent moved)"
            else:
                detail = err.details() if hasattr(err, "details") else err
            message = f"lost the agent at {agent.endpoint}: {detail}"
            log.warning("pull batch on %s broke: %s", node, message)
            obs.pulls_lost(waiting, message, time.time())
            self._notify(node)
            return
        finally:
            for caches in waiting.values():  # left unanswered: count them off too
                self._answered(caches)
            waiting.clear()
        await self.sync(node, abilities=False)  # the batch changed the node: list it again

    @staticmethod
    def _apply_event(
        obs: NodeObservation,
        key: ImageKey,
        event: agent_pb2.PullEvent,
        date: Callable[[float], float] | None = None,
    ) -> None:
        """`date`: what a success is dated (`date_answer`)."""
        now = time.time()
        if event.phase == agent_pb2.PHASE_WAITING:
            obs.pull_progress(key, False, 0, 0, now)
        elif event.phase == agent_pb2.PHASE_PULLING:
            obs.pull_progress(key, True, event.bytes_done, event.bytes_total, now)
        elif event.phase in (agent_pb2.PHASE_SUCCEEDED, agent_pb2.PHASE_ALREADY_PRESENT):
            obs.pull_succeeded(key, pulled_from(event), date(now) if date else now)
        elif event.phase == agent_pb2.PHASE_FAILED:
            category = CATEGORY_NAMES.get(event.error_category, "Internal")
            obs.pull_failed(key, category, event.error_message, now)
        elif event.phase == agent_pb2.PHASE_CANCELLED:
            obs.pull_cancelled(key)

    def submit_pins(self, node: str, changes: Sequence[tuple[str, bool]]) -> None:
        obs = self.observation(node)
        if obs.agent is None or not changes:
            return
        held = obs.inventory
        ids = [held.resolve(name) if held is not None else name for name, _ in changes]
        obs.pins_ordered(ids)
        pin = self._pin(node, self._client(obs.agent), list(changes), ids)
        self._spawn(pin, f"pin {node}")

    async def _pin(
        self, node: str, client: AgentClient, changes: list[tuple[str, bool]], ids: list[str]
    ) -> None:
        obs = self.observation(node)
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
        except (grpc.RpcError, asyncio.CancelledError) as err:
            if isinstance(err, asyncio.CancelledError) and _cancelling():
                raise
            log.warning("pin changes on %s failed: %s", node, str(err) or "channel closed")
        finally:
            obs.pins_answered(ids)
        if not await self.sync(node, abilities=False):
            self._notify(node)  # the pins are no longer in flight, whatever they did

    def submit_cancels(self, node: str, images: Sequence[ImageKey]) -> None:
        obs = self.observation(node)
        if obs.agent is None or not images:
            return
        obs.cancels_ordered(images)
        cancel = self._cancel(node, obs.agent, self._client(obs.agent), list(images))
        self._spawn(cancel, f"cancel {node}")

    async def _cancel(
        self, node: str, agent: AgentInfo, client: AgentClient, images: list[ImageKey]
    ) -> None:
        """The streams that ordered the pulls hear of each stop (CANCELLED); a pull that
        was not running any more has its outcome on its stream as usual."""
        obs = self.observation(node)
        try:
            resp = await client.cancel_pulls(node, images)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("node %s: its agent cannot cancel pulls (an older version)", node)
                if obs.agent is not None and obs.agent.same_process(agent):
                    obs.cancels_refused()
            else:
                log.warning("cancelling pulls on %s failed: %s", node, err.details())
            return
        except asyncio.CancelledError:
            if _cancelling():
                raise
            return  # the channel closed: the agent moved
        over = [r.image for r in resp.results if not r.was_running]
        if over:
            log.debug("node %s: pulls no longer running, not cancelled: %s", node, over)

    def submit_removals(self, node: str, images: Sequence[ImageKey]) -> None:
        obs = self.observation(node)
        if obs.agent is None or not images:
            return
        obs.removals_ordered(images)
        self._spawn(self._remove(node, self._client(obs.agent), list(images)), f"remove {node}")

    async def _remove(self, node: str, client: AgentClient, images: list[ImageKey]) -> None:
        obs = self.observation(node)
        errors: dict[ImageKey, str] = {}
        removed: list[ImageKey] = []
        try:
            resp = await client.remove(node, images)
            for result in resp.results:
                key = image_key(result.image)
                if result.error_category:
                    errors[key] = result.error_message
                    log.warning(
                        "removing %s on %s failed: %s", result.image, node, result.error_message
                    )
                else:
                    removed.append(key)
        except (grpc.RpcError, asyncio.CancelledError) as err:
            if isinstance(err, asyncio.CancelledError) and _cancelling():
                raise
            log.warning("removals on %s failed: %s", node, str(err) or "channel closed")
        finally:
            obs.removals_answered(images, removed, errors)
        changed = await self.sync(node, abilities=False)
        if errors:
            obs.removals_answered((), (), errors)  # kept (not retried) until the next resync
        if errors or not changed:
            self._notify(node)  # the removals are no longer in flight, whatever they did

    async def close(self) -> None:
        for timer in self._relists.values():
            timer.cancel()
        self._relists.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
