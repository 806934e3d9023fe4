"""No API call waits forever: an apiserver address that accepts connections and never
answers (what a half-open connection looks like to the caller) ends the call within the
client's timeout, for calls that name no timeout of their own."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from kubernetes import client

from coordinator.apiclient import kube_client


@pytest.fixture
def black_hole() -> object:
    """A TCP port that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_call_to_an_apiserver_that_never_answers_ends_at_the_timeout(
    tmp_path: Path, black_hole: int
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {{server: "https://127.0.0.1:{black_hole}", insecure-skip-tls-verify: true}}
users:
- name: u
  user: {{token: t}}
contexts:
- name: x
  context: {{cluster: c, user: u}}
current-context: x
"""
    )
    api = kube_client(str(kubeconfig), timeout=(1.0, 1.0))
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            client.CoordinationV1Api(api).read_namespaced_lease("l", "ns")
        except BaseException as err:  # what ends it is the point, not its type
            outcome.append(err)

    started = time.monotonic()
    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(timeout=30)
    assert not caller.is_alive(), "the call still waits on an apiserver that never answers"
    assert outcome, "the call cannot have succeeded"
    assert time.monotonic() - started < 30
