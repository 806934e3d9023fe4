"""The contract between the coordinator and the agents, defined once for both sides.

An agent registers with a coordination.k8s.io Lease named for its node, labelled so
the coordinator's informer finds it, annotated with the address to dial; every gRPC
call names the node it is meant for in a header, so an agent refuses orders meant for
another node (a stale Lease, a reused pod IP).
"""

from __future__ import annotations

LEASE_PREFIX = "fledged-agent-"
COMPONENT_LABEL = "app.kubernetes.io/component"
COMPONENT_LABELS = {
    "app.kubernetes.io/name": "kube-fledged",
    COMPONENT_LABEL: "agent",
}
AGENT_LEASE_SELECTOR = f"{COMPONENT_LABEL}=agent"  # what the coordinator lists
NODE_LABEL = "kubefledged.io/node"  # on the Lease: the node the agent serves
ENDPOINT_ANNOTATION = "kubefledged.io/agent-endpoint"  # host:port to dial
TLS_ANNOTATION = "kubefledged.io/agent-tls"  # "true" when the agent serves mTLS
VERSION_ANNOTATION = "kubefledged.io/agent-version"
NODE_HEADER = "x-fledged-node"  # gRPC metadata on every call: the node it is for


def lease_name(node: str) -> str:
    return f"{LEASE_PREFIX}{node}"
