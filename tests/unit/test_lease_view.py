"""Agents are taken for gone by their Leases only as of the last news of the Leases.

The coordinator once took every agent for gone while it could not see the API server
(a restart of the control plane longer than a Lease): its watch was silent, so no
renewal came, and every cache was written Failed the moment the API server was back,
before the agents' renewals were read again. The real apiserver restart is in
tests/coordinator/test_resilience.py; here, the rule as plain functions."""

from __future__ import annotations

from coordinator.agents import AgentPool
from coordinator.model import AgentInfo, NodeObservation, observed
from coordinator.nodes import NodeRegistry

NOW = 1_000_000.0
DURATION = 40.0


def _agent(renewed_at: float, renew_time: str = "r1") -> AgentInfo:
    return AgentInfo(
        "n1",
        "10.0.0.1:9445",
        False,
        expires=renewed_at + DURATION,
        acquired="a",
        renew_time=renew_time,
        duration=DURATION,
    )


def _fleet() -> tuple[NodeRegistry, NodeObservation]:
    registry = NodeRegistry(AgentPool(None), lambda node, delay: None, 60.0)
    obs = registry.observation("n1")
    obs.set_agent(observed(_agent(NOW), None, NOW), NOW)
    registry.leases_seen(NOW)
    return registry, obs


def test_a_lease_run_out_without_news_since_is_to_be_confirmed_not_gone() -> None:
    registry, obs = _fleet()
    later = NOW + DURATION + 5
    assert obs.alive(later)  # nothing read since NOW: our silence, not the agent's
    assert obs.unconfirmed(later)
    registry.leases_seen(later)  # a read confirms: nothing renewed
    assert not obs.alive(later)
    assert not obs.unconfirmed(later)


def test_a_renewal_the_confirming_read_finds_keeps_the_agent() -> None:
    registry, obs = _fleet()
    later = NOW + DURATION + 5
    renewal = observed(_agent(later, renew_time="r2"), obs.agent, later)
    obs.set_agent(renewal, later)
    registry.leases_seen(later)
    assert obs.alive(later)
    assert obs.alive(later + DURATION - 1)


def test_after_an_unreadable_api_server_every_agent_gets_a_whole_lease() -> None:
    registry, obs = _fleet()
    registry.leases_unreadable()  # a confirming read failed: nobody could renew
    back = NOW + 3 * DURATION
    assert obs.alive(back)
    registry.leases_seen(back)  # the API server answers again, nothing renewed yet
    assert obs.alive(back + DURATION - 1)  # time to renew
    assert not obs.unconfirmed(back + DURATION - 1)


def test_an_observation_without_a_tracked_view_judges_by_the_clock() -> None:
    obs = NodeObservation()
    obs.set_agent(observed(_agent(NOW), None, NOW), NOW)
    assert obs.alive(NOW + DURATION - 1)
    assert not obs.alive(NOW + DURATION + 1)
