"""What each node should hold, from every cache at once. Pure data, no I/O.

Each live cache has a share of every node its lists select: images it wants there
(pinned or not), images it removes there (an edit took them out of a list, or a
purge), images whose pin it lifts (it is being deleted). A node's desired state is the
union of its shares, one `Desire` per image with fixed precedence: want beats remove,
and any pin beats unpin. Editing, purging or deleting a cache is an edit of its
shares; the nodes whose share changed are the ones to plan again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .api import CacheList, CacheSpec
from .images import ImageKey, image_key
from .secrets import RegistryAuth

Selector = tuple[tuple[str, str], ...]
Removal = tuple[str, Selector]  # an image (as the cache spells it) leaving a list's nodes


@dataclass(frozen=True)
class CacheView:
    """One cache as the coordinator acts on it now. `applied` and `removing` are what
    must survive a restart (kept in the status, read back once when the coordinator
    first sees the cache)."""

    key: str
    generation: int
    # None when the spec is invalid: the lists last applied are then held as they were
    # (an edit the coordinator refuses changes nothing on the nodes, pins included).
    spec: CacheSpec | None
    applied: tuple[CacheList, ...] = ()
    removing: tuple[Removal, ...] = ()
    deleting: bool = False
    purge: bool = False
    purged_generation: int | None = None
    refresh_since: float | None = None
    # When this process first saw the spec's generation: pulls that failed for good
    # before it are tried once more (an edit, or a cache made anew, is worth a try).
    edited: float | None = None
    # The pull Secrets as they are now (names and versions): a pull refused as
    # Unauthorized with other credentials is tried again.
    credentials: str = ""
    auths: tuple[RegistryAuth, ...] = field(default=(), repr=False)

    @property
    def dormant(self) -> bool:
        """Purged at this generation: hold no images until an edit or a refresh."""
        return (
            self.purged_generation == self.generation
            and not self.purge
            and self.refresh_since is None
        )

    @property
    def wants(self) -> bool:
        return not self.deleting and not self.purge and not self.dormant


def list_pairs(lists: Iterable[CacheList]) -> set[Removal]:
    return {(image, cl.node_selector) for cl in lists for image in cl.images}


def open_removals(view: CacheView) -> tuple[Removal, ...]:
    """Images that left the spec and are still to go from their old lists' nodes."""
    lists = view.spec.lists if view.spec is not None else view.applied
    return tuple(sorted(set(view.removing) | (list_pairs(view.applied) - list_pairs(lists))))


def _matches(selector: Selector, labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector)


@dataclass(frozen=True, eq=False)
class Share:
    """One cache's share of one node. Shared by every node the same lists select."""

    view: CacheView
    lists: tuple[int, ...]  # indexes of the spec's lists that select the node
    wants: tuple[tuple[ImageKey, bool], ...] = ()  # image, pin wanted
    removes: tuple[tuple[ImageKey, Removal], ...] = ()  # edit removals open here
    purges: tuple[ImageKey, ...] = ()
    unpins: tuple[ImageKey, ...] = ()  # deletion: lift our pin

    @property
    def empty(self) -> bool:
        return not (self.wants or self.removes or self.purges or self.unpins)


class CacheForm:
    """A cache's view parsed once, and its shares by the lists a node matches."""

    def __init__(self, view: CacheView) -> None:
        self.view = view
        self.lists = view.spec.lists if view.spec is not None else view.applied
        self.removals = open_removals(view) if view.spec is not None else ()
        self._selectors = sorted({sel for _, sel in self.removals})
        self._deleting = sorted(
            list_pairs(self.lists) | list_pairs(view.applied) | set(view.removing)
        )
        self._shares: dict[tuple[tuple[int, ...], tuple[Selector, ...]], Share] = {}
        self.spelling: dict[ImageKey, str] = {}
        for cl in self.lists:
            for image in cl.images:
                self.spelling.setdefault(image_key(image), image)

    def share(self, labels: Mapping[str, str]) -> Share | None:
        """The share of a node with these labels (None: nothing there)."""
        view = self.view
        if view.deleting:
            entries = self._deleting
            matched = tuple(i for i, (_, sel) in enumerate(entries) if _matches(sel, labels))
            selectors: tuple[Selector, ...] = ()
        else:
            matched = tuple(i for i, cl in enumerate(self.lists) if cl.matches(labels))
            selectors = tuple(s for s in self._selectors if _matches(s, labels))
        share = self._shares.get((matched, selectors))
        if share is None:
            share = self._shares[matched, selectors] = self._make(matched, selectors)
        return None if share.empty else share

    def _make(self, matched: tuple[int, ...], selectors: tuple[Selector, ...]) -> Share:
        view = self.view
        if view.deleting:
            keys = dict.fromkeys(image_key(self._deleting[i][0]) for i in matched)
            return Share(view, (), unpins=tuple(sorted(keys)))
        pins: dict[ImageKey, bool] = {}
        for i in matched:
            for image in self.lists[i].images:
                key = image_key(image)
                pins[key] = pins.get(key, False) or self.lists[i].pin
        removes = tuple(
            (key, entry)
            for entry in self.removals
            if entry[1] in selectors and (key := image_key(entry[0])) not in pins
        )
        if view.purge:
            return Share(view, matched, removes=removes, purges=tuple(sorted(pins)))
        wants = tuple(sorted(pins.items())) if view.wants else ()
        return Share(view, matched, wants=wants, removes=removes)


@dataclass(slots=True)
class Desire:
    """One image on one node, merged over every cache's share of the node."""

    want: bool = False
    pin: bool = False
    remove: bool = False
    wave: int | None = None  # the largest wave size of the caches wanting it; None: none
    refresh_since: float | None = None  # the latest refresh asked by a cache wanting it
    edited: float | None = None  # the latest edit of a cache wanting it (CacheView.edited)
    credentials: str = ""  # the wanting caches' pull Secrets (names and versions)
    auths: tuple[RegistryAuth, ...] = ()
    caches: tuple[str, ...] = ()  # the caches wanting it


@dataclass(frozen=True, eq=False)
class NodeDesired:
    shares: tuple[tuple[str, Share], ...]  # (cache key, share), by cache key
    items: Mapping[ImageKey, Desire]  # by key

    def wanted(self, key: ImageKey) -> bool:
        desire = self.items.get(key)
        return desire is not None and desire.want


NOTHING = NodeDesired((), {})


def merge(shares: tuple[tuple[str, Share], ...], default_wave: int | None) -> NodeDesired:
    items: dict[ImageKey, Desire] = {}
    credentials: dict[ImageKey, set[str]] = {}
    for cache, share in shares:
        view = share.view
        wave = (view.spec.max_concurrent_nodes_per_image if view.spec else None) or default_wave
        for key, pin in share.wants:
            desire = items.get(key)
            if desire is None:
                desire = items[key] = Desire(wave=wave)
            elif not desire.want:
                desire.wave = wave
            elif desire.wave is not None:
                desire.wave = None if wave is None else max(desire.wave, wave)
            desire.want = True
            desire.pin = desire.pin or pin
            if view.refresh_since is not None:
                desire.refresh_since = max(desire.refresh_since or 0.0, view.refresh_since)
            if view.edited is not None:
                desire.edited = max(desire.edited or 0.0, view.edited)
            if view.credentials:
                credentials.setdefault(key, set()).add(view.credentials)
            desire.auths += view.auths
            desire.caches += (cache,)
        for key in (*(k for k, _ in share.removes), *share.purges):
            items.setdefault(key, Desire()).remove = True
        for key in share.unpins:
            items.setdefault(key, Desire())
    for key, versions in credentials.items():
        items[key].credentials = "|".join(sorted(versions))
    return NodeDesired(shares, {k: items[k] for k in sorted(items)})


@dataclass(frozen=True)
class ShareChange:
    cache: str
    node: str
    share: Share | None  # None: the cache has no share of the node any more


class Desired:
    """Every cache's share of every node, kept as caches and node labels change."""

    def __init__(self, default_wave: int | None = None) -> None:
        self._wave = default_wave
        self.forms: dict[str, CacheForm] = {}
        self._labels: dict[str, Mapping[str, str]] = {}
        self._by_node: dict[str, dict[str, Share]] = {}
        self._by_cache: dict[str, dict[str, Share]] = {}
        self._desired: dict[str, NodeDesired] = {}
        self._merged: dict[tuple[int, ...], NodeDesired] = {}

    def _put(self, cache: str, node: str, share: Share | None, out: list[ShareChange]) -> None:
        shares = self._by_node.get(node, {})
        if shares.get(cache) is share:
            return
        if share is None:
            shares.pop(cache, None)
            self._by_cache.get(cache, {}).pop(node, None)
        else:
            self._by_node.setdefault(node, shares)[cache] = share
            self._by_cache.setdefault(cache, {})[node] = share
        self._desired.pop(node, None)
        out.append(ShareChange(cache, node, share))

    def set_cache(self, view: CacheView) -> list[ShareChange]:
        """The cache's shares as its view asks, over every node known."""
        old = self.forms.get(view.key)
        if old is not None and old.view == view:
            return []
        form = self.forms[view.key] = CacheForm(view)
        self._merged.clear()
        out: list[ShareChange] = []
        for node, labels in self._labels.items():
            self._put(view.key, node, form.share(labels), out)
        return out

    def drop_cache(self, cache: str) -> list[ShareChange]:
        self.forms.pop(cache, None)
        self._merged.clear()
        out: list[ShareChange] = []
        for node in list(self._by_cache.pop(cache, {})):
            self._put(cache, node, None, out)
        return out

    def set_node(self, node: str, labels: Mapping[str, str] | None) -> list[ShareChange]:
        """The node's labels (None: the Node is gone). The informer replaces a Node's
        labels on every change, so the same object means the same labels."""
        out: list[ShareChange] = []
        if labels is None:
            self._labels.pop(node, None)
            for cache in list(self._by_node.get(node, {})):
                self._put(cache, node, None, out)
            self._by_node.pop(node, None)
            self._desired.pop(node, None)
            return out
        if self._labels.get(node) is labels:
            return out
        self._labels[node] = labels
        for cache, form in self.forms.items():
            self._put(cache, node, form.share(labels), out)
        return out

    def node(self, node: str) -> NodeDesired:
        desired = self._desired.get(node)
        if desired is None:
            shares = tuple(sorted(self._by_node.get(node, {}).items()))
            if not shares:
                desired = NOTHING
            else:
                ids = tuple(id(s) for _, s in shares)
                desired = self._merged.get(ids)
                if desired is None:
                    desired = self._merged[ids] = merge(shares, self._wave)
            self._desired[node] = desired
        return desired

    def nodes_of(self, cache: str) -> Mapping[str, Share]:
        return self._by_cache.get(cache, {})

    def unmatched(self, cache: str) -> list[CacheList]:
        """The cache's lists that select no node."""
        form = self.forms.get(cache)
        if form is None or form.view.deleting:
            return []
        hit = {i for share in self.nodes_of(cache).values() for i in share.lists}
        if len(hit) < len(form.lists):  # a list may select nodes where it has no share
            for labels in self._labels.values():
                hit.update(i for i, cl in enumerate(form.lists) if cl.matches(labels))
                if len(hit) == len(form.lists):
                    break
        return [cl for i, cl in enumerate(form.lists) if i not in hit]
