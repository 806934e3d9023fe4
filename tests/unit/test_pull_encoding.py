"""A pull order's request, encoded image by image and concatenated, is the message the
agent would get from building it whole (the protobuf merge rule the encoder relies on)."""

from __future__ import annotations

from google.protobuf import duration_pb2

from coordinator.nodes import encoded_pull
from coordinator.secrets import RegistryAuth, credentials_for_key
from protos.fledged.agent.v1 import agent_pb2

AUTH = RegistryAuth("reg.io", "team", username="u", password="p", server_address="reg.io")
OTHER = RegistryAuth("other.io", "", username="x", password="y")


def test_concatenated_parts_are_the_whole_request() -> None:
    parts = [
        ("reg.io/team/app:v1", False, True, False, (AUTH,)),
        ("reg.io/team/db:v2", True, False, True, ()),
    ]
    head = agent_pb2.PullImagesRequest(request_id="ns/c/1", progress=agent_pb2.PROGRESS_OUTCOMES)
    wire = head.SerializeToString() + b"".join(encoded_pull(*p, 600) for p in parts)
    whole = agent_pb2.PullImagesRequest(
        request_id="ns/c/1",
        progress=agent_pb2.PROGRESS_OUTCOMES,
        images=[
            agent_pb2.ImagePull(
                image="reg.io/team/app:v1",
                policy=agent_pb2.PULL_POLICY_IF_NOT_PRESENT,
                credentials=[
                    agent_pb2.RegistryCredentials(
                        server_address="reg.io", username="u", password="p"
                    )
                ],
                deadline=duration_pb2.Duration(seconds=600),
                pin=True,
            ),
            agent_pb2.ImagePull(
                image="reg.io/team/db:v2",
                policy=agent_pb2.PULL_POLICY_ALWAYS,
                deadline=duration_pb2.Duration(seconds=600),
                replace=True,
            ),
        ],
    )
    assert agent_pb2.PullImagesRequest.FromString(wire) == whole


def test_remembered_credentials_match_by_registry_and_path() -> None:
    auths = (AUTH, OTHER)
    assert credentials_for_key("reg.io/team/app:v1", auths) == (AUTH,)
    assert credentials_for_key("reg.io/elsewhere/app:v1", auths) == ()
    assert credentials_for_key("other.io/app:v1", auths) == (OTHER,)
    assert credentials_for_key("other.io/app:v1", ()) == ()
