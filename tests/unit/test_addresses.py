"""Listen-address flags: two servers of one process on one port are a usage error, not
a traceback (the coordinator's HTTP servers) or a silent split (the agent's gRPC
servers bind with SO_REUSEPORT and would share the port's connections)."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from agent.config import parse_args as agent_args
from common.addresses import shared_port, split_address
from coordinator.config import parse_args as coordinator_args
from tests.testenv.procs import free_port


def test_addresses_split_into_host_and_port() -> None:
    assert split_address(":8080") == ("0.0.0.0", 8080)  # what prometheus_client can bind
    assert split_address("127.0.0.1:9445") == ("127.0.0.1", 9445)
    assert split_address("[::1]:9445") == ("::1", 9445)
    for bad in ("8080", "host:", "host:http", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            split_address(bad)


def test_servers_on_one_port_clash_where_their_hosts_overlap() -> None:
    assert shared_port({"--a": ":8080", "--b": "127.0.0.1:8080"}) == (
        "--a and --b both listen on port 8080"
    )
    assert shared_port({"--a": "10.0.0.1:8080", "--b": "10.0.0.2:8080"}) is None
    assert shared_port({"--a": "127.0.0.1:0", "--b": "127.0.0.1:0"}) is None  # system's pick
    assert shared_port({"--a": ":8080", "--b": None, "--c": ""}) is None


def test_the_coordinator_refuses_metrics_and_probes_on_one_port(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        coordinator_args(["--metrics-bind-address=:8080", "--health-probe-bind-address=:8080"])
    assert "--metrics-bind-address and --health-probe-bind-address" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        coordinator_args(["--metrics-bind-address=8080"])
    assert "'8080' is not HOST:PORT" in capsys.readouterr().err
    assert coordinator_args(["--metrics-bind-address=:8080"]).metrics_bind_address == ":8080"


def test_the_agent_refuses_two_of_its_servers_on_one_port(
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["--node-name=n1", "--no-lease"]
    with pytest.raises(SystemExit):
        agent_args([*base, "--listen=0.0.0.0:9445", "--health-listen=127.0.0.1:9445"])
    assert "--listen and --health-listen both listen on port 9445" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        agent_args([*base, "--listen=9445"])
    assert "is not HOST:PORT" in capsys.readouterr().err
    cfg, _ = agent_args([*base, "--listen=0.0.0.0:9445", "--health-listen=0.0.0.0:9446"])
    assert cfg.health_listen == "0.0.0.0:9446"


def test_an_address_without_a_host_serves_metrics_on_every_interface() -> None:
    """`--metrics-listen=:9447` (the agent) crashed: prometheus_client cannot resolve ""."""
    host, port = split_address(f":{free_port()}")
    server, thread = start_http_server(port, addr=host, registry=CollectorRegistry())
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
