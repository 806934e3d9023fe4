"""The coordinator's Kubernetes client: the kubernetes library's, never waiting forever.

(The agent has its own, `agent/kubeapi.py`: it makes four calls on one Lease.)
"""

from __future__ import annotations

from typing import Any

from kubernetes import client, config

# Seconds to connect, and to wait between bytes of an answer, for any API call that
# names no timeout of its own (watches name theirs).
REQUEST_TIMEOUT = (10.0, 60.0)
Timeout = float | tuple[float, float]


class TimedApiClient(client.ApiClient):
    """An ApiClient that never waits forever. The library's calls have no timeout by
    default, so one sent on a connection that went half-open (a flaky link, a NAT or
    load balancer that forgot it, an apiserver gone without a FIN) waits for good, and
    the loop that made it stops with it: an agent's Lease renewal, the leader's."""

    def __init__(self, configuration: client.Configuration, timeout: Timeout) -> None:
        super().__init__(configuration)
        self.timeout = timeout

    def call_api(
        self,
        method: str,
        url: str,
        header_params: Any = None,
        body: Any = None,
        post_params: Any = None,
        _request_timeout: Timeout | None = None,
    ) -> Any:
        return super().call_api(
            method, url, header_params, body, post_params, _request_timeout or self.timeout
        )


def kube_client(kubeconfig: str | None, timeout: Timeout = REQUEST_TIMEOUT) -> client.ApiClient:
    """A client from `kubeconfig`, or the pod's service account when None."""
    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return TimedApiClient(configuration, timeout)
