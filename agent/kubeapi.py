"""The agent's few calls to the Kubernetes API: one Lease, over one kept connection.

Not the kubernetes client: importing it (its configuration, dynamic client, informers
and streams, and their dependencies) costs about 14 MiB of the resident memory of the
agent on every node, for four calls on one object. In a pod the
agent uses its service account (the token re-read at each call: bound tokens rotate);
outside one (tests, development) a kubeconfig with a token or a client certificate.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
Obj = dict[str, Any]
# A kept connection the apiserver has closed meanwhile (an idle timeout) fails at once
# in one of these ways: the request is sent again, once, on a new one. Were it applied
# after all, the second sending meets a conflict (the Lease's resourceVersion) and the
# renewal fails once, as any error would.
_STALE = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    BrokenPipeError,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)


class ApiConfigError(ValueError):
    """No usable way to reach the API server; the message says what is missing."""


class ApiError(Exception):
    """The API server refused a call; `status` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"({status}) {message}")
        self.status = status


@dataclass(frozen=True)
class ApiTarget:
    """Where the API server is and how to prove who we are."""

    scheme: str
    host: str
    port: int
    prefix: str  # the server URL's path, if any (an API proxy's)
    context: ssl.SSLContext | None  # None: plain HTTP
    token: str = ""
    token_file: Path | None = None

    def bearer(self) -> str:
        if self.token_file is not None:
            return self.token_file.read_text().strip()
        return self.token


def in_cluster(account: Path = SERVICE_ACCOUNT) -> ApiTarget:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise ApiConfigError("not in a pod (KUBERNETES_SERVICE_HOST/PORT unset): give --kubeconfig")
    token, ca = account / "token", account / "ca.crt"
    for path in (token, ca):
        if not path.is_file():
            raise ApiConfigError(f"{path} is missing: is the service account token mounted?")
    return ApiTarget(
        "https", host, int(port), "", ssl.create_default_context(cafile=str(ca)), token_file=token
    )


def from_kubeconfig(path: str | Path) -> ApiTarget:
    """The current context of the kubeconfig at `path`: a server, with a CA or TLS
    verification off, and a token, a token file or a client certificate."""
    import yaml  # here: a pod's agent, which never reads a kubeconfig, is spared 1.7 MiB

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ApiConfigError(f"cannot read kubeconfig {path}: {err}") from err
    base = path.parent

    def named(kind: str, name: object) -> Obj:
        for entry in doc.get(kind) or []:
            if isinstance(entry, dict) and entry.get("name") == name:
                return entry.get(kind[:-1]) or {}
        raise ApiConfigError(f"kubeconfig {path}: no {kind[:-1]} named {name!r}")

    current = doc.get("current-context")
    if not current:
        raise ApiConfigError(f"kubeconfig {path} has no current-context")
    context = named("contexts", current)
    cluster, user = named("clusters", context.get("cluster")), named("users", context.get("user"))
    for unsupported in ("exec", "auth-provider", "username"):
        if unsupported in user:
            raise ApiConfigError(
                f"kubeconfig {path}: the agent takes a token or a client certificate, "
                f"not {unsupported!r} credentials"
            )
    server = urlsplit(str(cluster.get("server") or ""))
    if server.scheme not in ("https", "http") or not server.hostname:
        raise ApiConfigError(f"kubeconfig {path}: bad server {cluster.get('server')!r}")
    tls: ssl.SSLContext | None = None
    if server.scheme == "https":
        tls = ssl.create_default_context()
        if cluster.get("insecure-skip-tls-verify"):
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE
        else:
            ca = _pem(cluster, "certificate-authority", base)
            if ca is not None:
                tls.load_verify_locations(cadata=ca.decode())
        cert, key = (_pem(user, f"client-{k}", base) for k in ("certificate", "key"))
        if cert is not None and key is not None:
            _load_cert_chain(tls, cert, key)
    token_file = user.get("tokenFile")
    return ApiTarget(
        server.scheme,
        server.hostname,
        server.port or (443 if server.scheme == "https" else 80),
        server.path.rstrip("/"),
        tls,
        token=str(user.get("token") or ""),
        token_file=base / token_file if token_file else None,
    )


def _pem(section: Obj, field: str, base: Path) -> bytes | None:
    """`field`-data (base64) or the file `field` names (relative to the kubeconfig)."""
    data = section.get(f"{field}-data")
    if data:
        return base64.b64decode(data)
    name = section.get(field)
    return (base / name).read_bytes() if name else None


def _load_cert_chain(tls: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """ssl loads a certificate only from files: written to a private one, then gone."""
    with tempfile.TemporaryDirectory(prefix="fledged-agent-") as folder:
        pem = Path(folder) / "client.pem"
        pem.touch(mode=0o600)
        pem.write_bytes(cert.rstrip(b"\n") + b"\n" + key)
        tls.load_cert_chain(str(pem))


class KubeApi:
    """JSON calls over one connection kept between them; thread-safe (one at a time).
    Every call ends within `timeout` seconds per step (connecting, each read): a
    connection gone half-open fails the call, and the next goes over a new one."""

    def __init__(self, target: ApiTarget, timeout: float) -> None:
        self._target = target
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> http.client.HTTPConnection:
        t = self._target
        if t.context is None:
            return http.client.HTTPConnection(t.host, t.port, timeout=self._timeout)
        return http.client.HTTPSConnection(t.host, t.port, timeout=self._timeout, context=t.context)

    def request(self, method: str, path: str, body: Obj | None = None) -> Obj:
        """The decoded answer; ApiError for a status of 400 or more."""
        headers = {"Accept": "application/json", "User-Agent": "fledged-agent"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        with self._lock:
            token = self._target.bearer()
            if token:
                headers["Authorization"] = f"Bearer {token}"
            for attempt in (1, 2):
                reused = self._conn is not None
                conn = self._conn = self._conn or self._connect()
                try:
                    conn.request(method, self._target.prefix + path, payload, headers)
                    response = conn.getresponse()
                    data = response.read()
                    break
                except _STALE:
                    self.close_connection()
                    if not reused or attempt == 2:
                        raise
                except BaseException:
                    self.close_connection()
                    raise
        try:
            answer = json.loads(data) if data else {}
        except ValueError:  # not the apiserver's JSON: a proxy's page, say
            answer = {"message": data[:200].decode(errors="replace")}
            if response.status < 400:
                raise ApiError(response.status, f"not JSON: {answer['message']!r}") from None
        if response.status >= 400:
            message = answer.get("message") if isinstance(answer, dict) else None
            raise ApiError(response.status, str(message or response.reason))
        return answer if isinstance(answer, dict) else {}

    def close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class LeaseClient:
    """Read, create, replace and delete one namespace's Leases."""

    def __init__(self, api: KubeApi, namespace: str) -> None:
        self._api = api
        self._base = LEASES.format(namespace=quote(namespace, safe=""))

    def read(self, name: str) -> Obj:
        return self._api.request("GET", f"{self._base}/{quote(name, safe='')}")

    def create(self, lease: Obj) -> Obj:
        return self._api.request("POST", self._base, lease)

    def replace(self, name: str, lease: Obj) -> Obj:
        return self._api.request("PUT", f"{self._base}/{quote(name, safe='')}", lease)

    def delete(self, name: str, resource_version: str) -> None:
        """Only the Lease as of `resource_version` (ApiError 409 when it changed since)."""
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"resourceVersion": resource_version},
        }
        self._api.request("DELETE", f"{self._base}/{quote(name, safe='')}", options)


def api_target(kubeconfig: str | None) -> ApiTarget:
    """The API server of `kubeconfig`, or of the pod's service account when None."""
    return from_kubeconfig(kubeconfig) if kubeconfig else in_cluster()
