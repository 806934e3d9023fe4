"""The core/v1 requests the coordinator makes, sent through the client's own ApiClient.

kubernetes' CoreV1Api makes the same requests, but importing it loads 254 model
modules and the validators of its 1,200 methods: 21 MiB of the coordinator's resident
memory (a twentieth of its 400 MB budget at 5,000 nodes) for seven requests. The
ApiClient still does what matters: configuration, auth, serialization, errors
(`ApiException`), and the models of what is read and written."""

from __future__ import annotations

from typing import Any

from kubernetes import client

Obj = dict[str, Any]
# The client's argument names whose query names are not their camelCase.
_RENAMED = {"_continue": "continue"}


def query_name(arg: str) -> str:
    """`resource_version` -> `resourceVersion`: list and watch calls (the informer, the
    client's Watch) pass the client's argument names."""
    if arg in _RENAMED:
        return _RENAMED[arg]
    head, *rest = arg.split("_")
    return head + "".join(part.title() for part in rest)


class CoreV1:
    """The calls of CoreV1Api the coordinator uses, with the same names and answers."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api_client = api

    def _send(
        self,
        method: str,
        path: str,
        params: dict[str, str],
        body: Any = None,
        *,
        returns: str = "object",
        content_type: str = "application/json",
        preload: bool = True,
        timeout: Any = None,
        **query: Any,
    ) -> Any:
        """The decoded answer (`returns`: a model's name, or "object" for plain JSON);
        without `preload`, the open urllib3 response (lists and watches read it)."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        request = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            path_params=params,
            query_params=[(query_name(k), v) for k, v in query.items() if v is not None],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*request, _request_timeout=timeout)
        if not preload:
            if not 200 <= response.status <= 299:
                response.read()  # type: ignore[no-untyped-call]
                raise client.ApiException.from_response(http_resp=response, body=None, data=None)
            return response.response
        response.read()  # type: ignore[no-untyped-call]
        return self.api_client.response_deserialize(response, {"2XX": returns}).data

    def list_node(
        self, _preload_content: bool = True, _request_timeout: Any = None, **query: Any
    ) -> Any:
        """Lists, or watches with `watch=True`: the informer's and Watch's list call."""
        return self._send(
            "GET", "/api/v1/nodes", {}, preload=_preload_content, timeout=_request_timeout, **query
        )

    def read_node(self, name: str) -> Obj:
        """The Node as plain JSON (the coordinator edits and reports it as such)."""
        node: Obj = self._send("GET", "/api/v1/nodes/{name}", {"name": name})
        return node

    def patch_node(self, name: str, body: Obj) -> Obj:
        """A strategic merge patch, as CoreV1Api sends an object body."""
        node: Obj = self._send(
            "PATCH",
            "/api/v1/nodes/{name}",
            {"name": name},
            body,
            content_type="application/strategic-merge-patch+json",
        )
        return node

    def read_namespaced_secret(self, name: str, namespace: str) -> client.V1Secret:
        path = "/api/v1/namespaces/{namespace}/secrets/{name}"
        secret: client.V1Secret = self._send(
            "GET", path, {"namespace": namespace, "name": name}, returns="V1Secret"
        )
        return secret

    def create_namespaced_secret(self, namespace: str, body: client.V1Secret) -> client.V1Secret:
        path = "/api/v1/namespaces/{namespace}/secrets"
        secret: client.V1Secret = self._send(
            "POST", path, {"namespace": namespace}, body, returns="V1Secret"
        )
        return secret

    def replace_namespaced_secret(
        self, name: str, namespace: str, body: client.V1Secret
    ) -> client.V1Secret:
        path = "/api/v1/namespaces/{namespace}/secrets/{name}"
        secret: client.V1Secret = self._send(
            "PUT", path, {"namespace": namespace, "name": name}, body, returns="V1Secret"
        )
        return secret

    def create_namespaced_event(self, namespace: str, body: client.CoreV1Event) -> Obj:
        """The Event as created (plain JSON: its name is what a repeat patches)."""
        path = "/api/v1/namespaces/{namespace}/events"
        event: Obj = self._send("POST", path, {"namespace": namespace}, body)
        return event

    def patch_namespaced_event(self, name: str, namespace: str, body: Obj) -> None:
        """A strategic merge patch, as client-go's recorder counts a repeat."""
        self._send(
            "PATCH",
            "/api/v1/namespaces/{namespace}/events/{name}",
            {"namespace": namespace, "name": name},
            body,
            content_type="application/strategic-merge-patch+json",
        )
