"""Process plumbing both binaries share: the Kubernetes client and signal handling."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from kubernetes import client, config

log = logging.getLogger(__name__)


def kube_client(kubeconfig: str | None) -> client.ApiClient:
    """A client from `kubeconfig`, or the pod's service account when None."""
    if kubeconfig:
        api: client.ApiClient = config.new_client_from_config(kubeconfig)  # type: ignore[no-untyped-call]
        return api
    config.load_incluster_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM or SIGINT sets `stop` for a graceful drain; a second one exits at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: exiting at once")
            os._exit(1)
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
