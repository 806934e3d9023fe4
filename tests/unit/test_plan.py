"""The planner's rules, as plain functions over plain data."""

from __future__ import annotations

from dataclasses import replace

from common.reference import parse
from coordinator.api import CacheList, CacheSpec
from coordinator.desired import CacheView
from coordinator.images import ImageKey
from coordinator.model import (
    AgentInfo,
    Inventory,
    NodeImage,
    NodeObservation,
    OrderPhase,
    PullRecord,
)
from coordinator.pairs import PairPhase
from coordinator.plan import Settings
from tests.unit.planning import Plan, plan_cache

NOW = 1_000_000.0
A = ImageKey("reg.io/app/a:v1")
B = ImageKey("reg.io/app/b:v1")
NODES = {"n1": {"zone": "a"}, "n2": {"zone": "a"}, "n3": {"zone": "b"}}


def image(
    ref: str, pinned: bool = False, owned: bool = False, digest: str = "sha256:" + "1" * 64
) -> NodeImage:
    parsed = parse(ref)
    return NodeImage(
        image_id="sha256:id-" + ref,
        tags=frozenset({ImageKey(f"{parsed.name}:{parsed.tag}")}),
        digests=frozenset({ImageKey(f"{parsed.name}@{digest}")}),
        pinned=pinned,
        pin_owned=owned,
        size=10,
    )


def node(*images: NodeImage, alive: bool = True, pinning: bool = True) -> NodeObservation:
    return NodeObservation(
        agent=AgentInfo("n", "127.0.0.1:1", False, NOW + (1000 if alive else -10)),
        inventory=Inventory(list(images), NOW),
        pinning_supported=pinning,
    )


def view(*lists: CacheList, **kw: object) -> CacheView:
    return CacheView(key="ns/c", generation=1, spec=CacheSpec(tuple(lists), ()), **kw)  # type: ignore[arg-type]


def other(*lists: CacheList) -> CacheView:
    """Another cache, wanting what its lists say."""
    return CacheView(key="ns/other", generation=1, spec=CacheSpec(tuple(lists), ()))


def everything_list(*images: str, pin: bool = True, **selector: str) -> CacheList:
    return CacheList(tuple(images), tuple(sorted(selector.items())), pin)


def test_missing_images_are_ordered_once_per_node_with_the_pin_wish() -> None:
    obs = {"n1": node(), "n2": node(), "n3": node()}
    plan = plan_cache(view(everything_list(A)), NODES, obs, Settings(), NOW)
    assert {n: [(i.image, i.pin, i.always) for i in items] for n, items in plan.pulls.items()} == {
        "n1": [(A, True, False)],
        "n2": [(A, True, False)],
        "n3": [(A, True, False)],
    }
    assert not plan.settled


def test_orders_in_flight_are_not_sent_again_and_report_progress() -> None:
    busy = node()
    busy.pulls[A] = PullRecord(OrderPhase.PULLING, bytes_done=5, bytes_total=10)
    plan = plan_cache(
        view(everything_list(A, zone="a")),
        NODES,
        {"n1": busy, "n2": node(image(A, True))},
        Settings(),
        NOW,
    )
    assert not plan.pulls
    states = {p.node: (p.phase, p.bytes_done, p.bytes_total) for p in plan.pairs}
    assert states == {"n1": (PairPhase.PULLING, 5, 10), "n2": (PairPhase.READY, 0, 0)}


def test_present_images_are_ready_and_lost_pins_are_restored() -> None:
    obs = {"n1": node(image(A, pinned=False)), "n2": node(image(A, pinned=True))}
    plan = plan_cache(view(everything_list(A, zone="a")), NODES, obs, Settings(), NOW)
    assert plan.pins == {"n1": [(A, True)]}
    assert not plan.pulls
    assert all(p.phase == PairPhase.READY for p in plan.pairs)


def test_runtimes_without_pinning_get_no_pin_orders() -> None:
    obs = {"n3": node(image(A, pinned=False), pinning=False)}
    plan = plan_cache(view(everything_list(A, zone="b")), NODES, obs, Settings(), NOW)
    assert not plan.pins
    assert plan.settled


def test_nodes_without_a_live_agent_fail_clearly() -> None:
    obs = {"n1": node(alive=False)}
    plan = plan_cache(view(everything_list(A, zone="a")), NODES, obs, Settings(), NOW)
    reasons = {p.node: (p.phase, p.reason) for p in plan.pairs}
    assert reasons == {
        "n1": (PairPhase.AGENT_UNAVAILABLE, "AgentUnavailable"),
        "n2": (PairPhase.AGENT_UNAVAILABLE, "AgentUnavailable"),
    }
    assert "expired" in plan.pairs[0].message
    assert "no agent" in plan.pairs[1].message


def test_transient_failures_retry_after_backoff_and_permanent_ones_wait_for_a_refresh() -> None:
    flaky, missing = node(), node()
    flaky.pulls[A] = PullRecord(
        OrderPhase.FAILED, finished=NOW - 10, category="RegistryUnavailable", failures=1
    )
    missing.pulls[A] = PullRecord(
        OrderPhase.FAILED, finished=NOW - 10, category="NotFound", failures=1
    )
    obs = {"n1": flaky, "n2": missing}
    settings = Settings(retry_base=30)
    plan = plan_cache(view(everything_list(A, zone="a")), NODES, obs, settings, NOW)
    assert not plan.pulls
    assert plan.next_retry == NOW + 20
    later = plan_cache(view(everything_list(A, zone="a")), NODES, obs, settings, NOW + 25)
    assert list(later.pulls) == ["n1"]
    refresh = plan_cache(
        view(everything_list(A, zone="a"), refresh_since=NOW),
        NODES,
        obs,
        settings,
        NOW + 25,
    )
    assert sorted(refresh.pulls) == ["n1", "n2"]


def test_a_permanent_failure_is_tried_again_once_after_an_edit_or_for_a_new_cache() -> None:
    """A NotFound outlived the cache that ordered the pull: a cache made anew for the
    same image (or the image put back in an edit) read Failed at once, with no pull and
    no retry, until a refresh. The README promises an edit retries too."""
    missing = node()
    missing.pulls[A] = PullRecord(
        OrderPhase.FAILED, finished=NOW - 10, category="NotFound", failures=1
    )
    obs = {"n1": missing}
    nodes = {"n1": {"zone": "a"}}
    before = plan_cache(view(everything_list(A), edited=NOW - 50), nodes, obs, Settings(), NOW)
    assert not before.pulls  # the failure came after the edit: it stands
    assert [(p.phase, p.reason) for p in before.pairs] == [(PairPhase.FAILED, "NotFound")]
    after = plan_cache(view(everything_list(A), edited=NOW - 5), nodes, obs, Settings(), NOW)
    assert [str(i.image) for i in after.pulls["n1"]] == [A]


def test_records_of_images_no_cache_mentions_are_forgotten_unless_in_flight() -> None:
    obs = node()
    c = ImageKey("reg.io/app/c:v1")
    obs.pulls_ordered([B], {})
    obs.pulls[A] = PullRecord(OrderPhase.FAILED, finished=NOW - 5, category="NotFound")
    obs.pulls[c] = PullRecord(OrderPhase.DONE, finished=NOW - 5)
    obs.pulls_forgotten({c})
    assert sorted(obs.pulls) == [B, c]  # B is in flight: it stays until answered
    assert obs.slots.pulling == {B: 1}


def test_the_wave_size_holds_back_nodes_beyond_it() -> None:
    obs = {n: node() for n in NODES}
    plan = plan_cache(view(everything_list(A)), NODES, obs, Settings(wave=2), NOW)
    assert sum(len(v) for v in plan.pulls.values()) == 2
    assert sum(p.phase == PairPhase.QUEUED for p in plan.pairs) == 1
    busy = plan_cache(view(everything_list(A)), NODES, obs, Settings(wave=2), NOW, in_flight={A: 2})
    assert not busy.pulls


def test_a_refresh_repulls_mutable_tags_with_always_but_not_digests() -> None:
    digest_ref = ImageKey("reg.io/app/c@sha256:" + "2" * 64)
    present = node(
        image(A, pinned=True),
        NodeImage("sha256:c", frozenset(), frozenset({digest_ref}), True, True, 1),
    )
    plan = plan_cache(
        view(everything_list(A, digest_ref, zone="b"), refresh_since=NOW - 1),
        NODES,
        {"n3": present},
        Settings(),
        NOW,
    )
    assert [(i.image, i.always) for i in plan.pulls["n3"]] == [(A, True)]
    present.pulls[A] = PullRecord(OrderPhase.DONE, finished=NOW)
    done = plan_cache(
        view(everything_list(A, digest_ref, zone="b"), refresh_since=NOW - 1),
        NODES,
        {"n3": present},
        Settings(),
        NOW,
    )
    assert done.refresh_done


def test_an_agent_restart_keeps_what_the_node_held_ready_and_orders_nothing() -> None:
    """A DaemonSet rolling update: the old agent's Lease goes, a new process comes and
    lists the node. Meanwhile what the node held at its last listing stays Ready; what
    it lacked waits (AgentUnavailable, then Pending), and nothing is ordered."""
    obs = node(image(A, pinned=True, owned=True))
    cache = view(everything_list(A, B, zone="b"))
    agent = obs.agent
    assert agent is not None
    obs.set_agent(None, NOW)  # the Lease deleted by the agent on its way out
    gone = plan_cache(cache, NODES, {"n3": obs}, Settings(), NOW)
    assert {p.image: p.phase for p in gone.pairs} == {
        A: PairPhase.READY,
        B: PairPhase.AGENT_UNAVAILABLE,
    }
    assert gone.tally.ready == 1
    assert gone.tally.unknown == 0  # its agent was seen: the node is known, only away
    never = plan_cache(cache, NODES, {}, Settings(), NOW)
    assert never.tally.unknown == 1  # no agent ever: a new coordinator may wait for one
    fresh = NodeObservation()
    fresh.set_agent(agent, NOW)  # alive, never listed
    first = plan_cache(cache, NODES, {"n3": fresh}, Settings(), NOW)
    assert first.tally.unknown == 1
    obs.set_agent(replace(agent, acquired="new"), NOW)  # the new process, not listed yet
    listing = plan_cache(cache, NODES, {"n3": obs}, Settings(), NOW)
    assert {p.image: p.phase for p in listing.pairs} == {A: PairPhase.READY, B: PairPhase.PENDING}
    assert not listing.has_orders
    obs.listed(Inventory([image(A, pinned=True, owned=True)], NOW), True)  # listed
    listed = plan_cache(cache, NODES, {"n3": obs}, Settings(), NOW)
    assert [i.image for i in listed.pulls["n3"]] == [B]


def test_pull_policy_always_pulls_a_present_image_once_at_first_sync() -> None:
    """As kube-fledged's Jobs with imagePullPolicy Always: the registry is asked (and
    checks the credentials) even for an image the node holds; once per node."""
    present = node(image(A, pinned=True, owned=True))
    always = Settings(always_pull=True)
    plan = plan_cache(view(everything_list(A, zone="b")), NODES, {"n3": present}, always, NOW)
    assert [(i.image, i.always) for i in plan.pulls["n3"]] == [(A, True)]
    default = plan_cache(
        view(everything_list(A, zone="b")), NODES, {"n3": present}, Settings(), NOW
    )
    assert not default.pulls["n3"]
    present.pulls[A] = PullRecord(OrderPhase.DONE, finished=NOW)
    again = plan_cache(view(everything_list(A, zone="b")), NODES, {"n3": present}, always, NOW)
    assert not again.pulls["n3"]
    assert again.settled
    # Refused by the registry: a failure, though the node holds the image.
    present.pulls[A] = PullRecord(OrderPhase.FAILED, finished=NOW, category="Unauthorized")
    refused = plan_cache(view(everything_list(A, zone="b")), NODES, {"n3": present}, always, NOW)
    assert [(p.phase, p.reason) for p in refused.pairs] == [(PairPhase.FAILED, "Unauthorized")]


def test_images_that_left_the_spec_are_removed_except_where_another_cache_wants_them() -> None:
    obs = {
        "n1": node(image(A, True, True), image(B, True, True)),
        "n3": node(image(A, True, True), image(B, True, True)),
    }

    others = [other(everything_list(B, pin=False, zone="b"))]  # n3 only, unpinned
    edited = view(everything_list(A), applied=(everything_list(A, B),))
    plan = plan_cache(edited, NODES, obs, Settings(), NOW, others)
    assert plan.removals == {"n1": [B]}
    assert plan.pins == {"n3": [(B, False)]}  # kept for the other cache, but no longer pinned by us
    assert plan.removing == ((B, ()),)


def test_content_another_cache_wants_under_another_name_is_never_removed() -> None:
    """One content, three names: `v1` (left this cache's list), `v2` (another cache
    wants it) and the digest. Dropping `v1` asks the agent to take that tag only (it
    keeps the content for `v2`); a digest or a last tag of wanted content is not
    ordered at all (a runtime would take every name of the content with it)."""
    v1, v2 = ImageKey("reg.io/app/s:v1"), ImageKey("reg.io/app/s:v2")
    digest = ImageKey("reg.io/app/s@sha256:" + "1" * 64)
    shared = NodeImage(
        image_id="sha256:shared",
        tags=frozenset({v1, v2}),
        digests=frozenset({digest}),
        pinned=True,
        pin_owned=True,
        size=10,
    )

    def drop(key: ImageKey, held: NodeImage, wanted: ImageKey) -> Plan:
        """This cache drops `key` from its list; another wants `wanted`."""
        return plan_cache(
            view(everything_list(A), applied=(everything_list(A, key),)),
            NODES,
            {"n1": node(held, image(A, True, True))},
            Settings(),
            NOW,
            [other(everything_list(wanted))],
        )

    untagged = drop(v1, shared, v2)
    assert untagged.removals == {"n1": [v1]}
    assert not untagged.pins  # the content stays pinned for the other cache

    by_digest = drop(digest, shared, v2)
    assert not by_digest.removals
    assert by_digest.removing == ()

    last_tag = drop(v1, replace(shared, tags=frozenset({v1})), digest)
    assert not last_tag.removals
    assert last_tag.removing == ()


def test_purge_removes_every_image_then_reports_done() -> None:
    obs = {"n1": node(image(A, True, True)), "n2": node()}
    plan = plan_cache(view(everything_list(A, zone="a"), purge=True), NODES, obs, Settings(), NOW)
    assert plan.removals == {"n1": [A]}
    assert not plan.purge_done
    after = plan_cache(
        view(everything_list(A, zone="a"), purge=True),
        NODES,
        {"n1": node(), "n2": node()},
        Settings(),
        NOW,
    )
    assert after.purge_done
    assert {p.phase for p in after.pairs} == {PairPhase.REMOVED}


def test_a_purge_cancels_a_pull_under_way_and_removes_it_if_it_lands_anyway() -> None:
    """Purged while a pull ran: the image was absent, so the purge read done, and the
    pull then left it on the node (only unpinned), the status saying it was removed.
    The pull is cancelled now; one that ends as the cancel goes out is removed."""
    pulling = node()
    pulling.pulls_ordered([A], {})
    purge = view(everything_list(A), purge=True)
    plan = plan_cache(purge, {"n1": {}}, {"n1": pulling}, Settings(), NOW)
    assert plan.cancels == {"n1": [A]}
    assert not plan.purge_done
    assert [p.phase for p in plan.pairs] == [PairPhase.REMOVING]
    pulling.pull_cancelled(A)
    assert plan_cache(purge, {"n1": {}}, {"n1": pulling}, Settings(), NOW).purge_done
    landed = node(image(A, True, True))
    after = plan_cache(purge, {"n1": {}}, {"n1": landed}, Settings(), NOW)
    assert after.removals == {"n1": [A]}


def test_pulls_no_share_wants_are_cancelled_once_for_each_record() -> None:
    """A deleted cache, an image edited out, a node that left a selector: the pull in
    flight stops instead of downloading the image for nothing (every node, for a
    fleet-wide cache deleted by mistake)."""
    obs = node()
    obs.pulls_ordered([A, B], {})
    wants_b = view(everything_list(B))
    plan = plan_cache(wants_b, {"n1": {}}, {"n1": obs}, Settings(), NOW)
    assert plan.cancels == {"n1": [A]}  # B is wanted: it goes on
    assert not plan.pulls  # and is not ordered again
    obs.cancels_ordered([A])
    assert not plan_cache(wants_b, {"n1": {}}, {"n1": obs}, Settings(), NOW).cancels
    # The agent answered that no pull of A ran (the order had not reached it): once the
    # order says it is there, the cancel goes again.
    obs.pull_progress(A, True, 5, 10, NOW)
    assert plan_cache(wants_b, {"n1": {}}, {"n1": obs}, Settings(), NOW).cancels == {"n1": [A]}
    obs.pull_cancelled(A)
    assert A not in obs.pulls
    assert not obs.slots.pulling.get(A)
    assert not plan_cache(wants_b, {"n1": {}}, {"n1": obs}, Settings(), NOW).cancels
    # Wanted again, it is ordered at once (a cancel is no failure to back off from).
    both = view(everything_list(A, B))
    assert [
        i.image for i in plan_cache(both, {"n1": {}}, {"n1": obs}, Settings(), NOW).pulls["n1"]
    ] == [A]


def test_pulls_a_predecessor_ordered_are_cancelled_if_no_share_wants_them() -> None:
    """This process has no record of them; the agent's listing names them."""
    obs = node()
    obs.pulls_ordered([B], {})
    c = ImageKey("reg.io/app/c:v1")
    assert obs.listed(Inventory([], NOW), None, [A, B, c])
    assert obs.unordered == frozenset({A, c})  # B is ours, in flight
    wants_c = view(everything_list(B, c))
    plan = plan_cache(wants_c, {"n1": {}}, {"n1": obs}, Settings(), NOW)
    assert plan.cancels == {"n1": [A]}
    # c, wanted, is ordered: the order joins the pull under way there (B's is ours).
    assert [i.image for i in plan.pulls["n1"]] == [c]
    obs.cancels_ordered([A])
    assert obs.unordered == frozenset({c})
    assert not plan_cache(wants_c, {"n1": {}}, {"n1": obs}, Settings(), NOW).cancels
    assert not obs.listed(Inventory([], NOW), None, [c, B])  # nothing new
    assert obs.listed(Inventory([], NOW), None, [])
    assert obs.unordered is None


def test_an_agent_that_cannot_cancel_lets_its_pulls_run() -> None:
    obs = node()
    obs.pulls_ordered([A], {})
    obs.cancels_refused()
    assert not plan_cache(
        view(everything_list(B)), {"n1": {}}, {"n1": obs}, Settings(), NOW
    ).cancels
    obs.set_agent(AgentInfo("n", "127.0.0.1:2", False, NOW + 1000, acquired="t2"), NOW)
    assert not obs.cancel_unsupported  # a new agent process may well cancel


def test_a_purged_cache_stays_empty_until_edited_or_refreshed() -> None:
    dormant = view(everything_list(A), purged_generation=1)
    plan = plan_cache(dormant, NODES, {n: node() for n in NODES}, Settings(), NOW)
    assert not plan.pulls
    edited = CacheView(key="ns/c", generation=2, spec=dormant.spec, purged_generation=1)
    assert plan_cache(edited, NODES, {n: node() for n in NODES}, Settings(), NOW).pulls


def test_deletion_lifts_only_pins_this_cache_set_and_nobody_else_wants() -> None:
    obs = {
        "n1": node(image(A, pinned=True, owned=True)),
        "n2": node(image(A, pinned=True, owned=False)),  # pinned by someone else
        "n3": node(image(A, pinned=True, owned=True)),
    }

    others = [other(everything_list(A, zone="b"))]  # wanted pinned on n3
    plan = plan_cache(view(everything_list(A), deleting=True), NODES, obs, Settings(), NOW, others)
    assert plan.pins == {"n1": [(A, False)]}
    assert not plan.finalize_done
    clear = {"n1": node(image(A)), "n2": obs["n2"], "n3": obs["n3"]}
    assert plan_cache(
        view(everything_list(A), deleting=True), NODES, clear, Settings(), NOW, others
    ).finalize_done


def test_lists_that_match_no_node_are_named() -> None:
    plan = plan_cache(view(everything_list(A, zone="z")), NODES, {}, Settings(), NOW)
    assert [cl.selector_text() for cl in plan.unmatched] == ["zone=z"]


def test_a_pull_refused_as_unauthorized_is_tried_again_once_the_secrets_change() -> None:
    refused = node()
    refused.pulls[A] = PullRecord(
        OrderPhase.FAILED,
        finished=NOW - 10,
        category="Unauthorized",
        failures=1,
        credentials="regcred=-",
    )
    obs = {"n1": refused}
    same = plan_cache(
        view(everything_list(A, zone="a"), credentials="regcred=-"),
        NODES, obs, Settings(), NOW,
    )  # fmt: skip
    assert not same.pulls
    assert same.pairs[0].phase == PairPhase.FAILED
    fixed = plan_cache(
        view(everything_list(A, zone="a"), credentials="regcred=42"),
        NODES, obs, Settings(), NOW,
    )  # fmt: skip
    assert list(fixed.pulls) == ["n1"]
    # Refused again (say another cache with other Secrets tried meanwhile): backoff now.
    refused.pulls[A] = replace(refused.pulls[A], failures=2)
    again = plan_cache(
        view(everything_list(A, zone="a"), credentials="regcred=43"),
        NODES, obs, Settings(retry_base=30), NOW,
    )  # fmt: skip
    assert not again.pulls
    assert again.next_retry == NOW - 10 + 60
