"""The test environment's port picker: two components must never be given one port
(CI once started a coordinator with its metrics and health servers on the same port)."""

from __future__ import annotations

import socket

from tests.testenv.procs import _ephemeral_low, free_port


def test_free_port_never_hands_out_a_port_twice() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_free_ports_lie_below_the_ephemeral_range_an_outgoing_connection_draws_from() -> None:
    low = _ephemeral_low()
    ports = [free_port() for _ in range(50)]
    assert all(p < low for p in ports), [p for p in ports if p >= low]


def test_a_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert s.getsockname()[1] == port
