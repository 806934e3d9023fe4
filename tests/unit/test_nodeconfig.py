"""The node's docker config file as the agent reads it: matched as the kubelet matches
pull Secrets, read again when it changes, and a missing or broken one gives nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

import pytest

from agent.nodeconfig import NodeDockerConfig, read_config
from common.dockerconfig import DockerConfigError

AUTH = base64.b64encode(b"user:secret").decode()


def write(path: Path, doc: object) -> None:
    path.write_text(json.dumps(doc))
    st = path.stat()  # a later write in the same tick must still read as a change
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_config_json_and_legacy_dockercfg_read_alike(tmp_path: Path) -> None:
    current, legacy = tmp_path / "config.json", tmp_path / ".dockercfg"
    write(current, {"auths": {"reg.io": {"auth": AUTH}}})
    write(legacy, {"reg.io": {"auth": AUTH}})
    for path in (current, legacy):
        (entry,) = read_config(path)
        assert (entry.registry, entry.username, entry.password) == ("reg.io", "user", "secret")
    write(current, ["not", "an", "object"])
    with pytest.raises(DockerConfigError, match="not a docker config JSON object"):
        read_config(current)


def test_the_file_is_read_again_when_it_changes_and_a_bad_one_gives_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.json"
    node = NodeDockerConfig(path)

    def lookup(image: str) -> list[tuple[str, str, str]]:
        found = asyncio.run(node.lookup(image))
        return [(c.server_address, c.username, c.password) for c in found]

    assert lookup("reg.io/app:v1") == []  # not there (yet)
    assert "not found" in caplog.text
    write(path, {"auths": {"reg.io": {"auth": AUTH}, "*.corp.example": {"auth": AUTH}}})
    assert lookup("reg.io/app:v1") == [("reg.io", "user", "secret")]
    assert lookup("a.corp.example/app") == [("a.corp.example", "user", "secret")]  # a glob
    assert lookup("other.io/app") == []
    write(path, {"auths": {"reg.io": {"username": "new", "password": "pw"}}})
    assert lookup("reg.io/app:v1") == [("reg.io", "new", "pw")]
    path.write_text("{not json")
    assert lookup("reg.io/app:v1") == []
    assert "node docker config unused" in caplog.text
