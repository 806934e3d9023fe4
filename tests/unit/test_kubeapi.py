"""The agent's own Kubernetes API client (agent/kubeapi.py): kubeconfig and service
account credentials, errors, timeouts and its kept connection, against small local
HTTP(S) servers. Against the real apiserver it runs in every agent Lease test."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.kubeapi import ApiConfigError, ApiError, KubeApi, from_kubeconfig, in_cluster
from tests.testenv.pki import CertificateAuthority

REPO = Path(__file__).resolve().parents[2]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # connections are kept unless the server says otherwise
    seen: list[tuple[str, str, str, str]]  # method, path, Authorization, client CN
    close_after_answer = False

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        peer = ""
        if isinstance(self.connection, ssl.SSLSocket):
            cert: Any = self.connection.getpeercert() or {}
            peer = {k: v for ((k, v),) in cert.get("subject", ())}.get("commonName", "")
        self.seen.append((self.command, self.path, self.headers.get("Authorization", ""), peer))
        answer: dict[str, Any]
        if self.path.startswith("/page/"):  # a proxy's page, not the apiserver's JSON
            status = int(self.path.rsplit("/", 1)[1])
            page = b"<html><body>Bad Gateway</body></html>"
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        if self.path.endswith("/missing"):
            status, answer = 404, {"kind": "Status", "message": 'leases "missing" not found'}
        else:
            status, answer = 200, {"echo": json.loads(body) if body else None}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        if self.close_after_answer:  # as an apiserver dropping an idle connection
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


def _serve(tls: ssl.SSLContext | None = None, close: bool = False) -> Iterator[Any]:
    seen: list[tuple[str, str, str, str]] = []
    handler = type("Handler", (_Handler,), {"seen": seen, "close_after_answer": close})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, seen
    finally:
        server.shutdown()
        server.server_close()


def _kubeconfig(path: Path, cluster: dict[str, Any], user: dict[str, Any]) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": cluster}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_a_kubeconfig_with_inline_certificates_reaches_an_mtls_server(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    server_files = ca.issue("server", "apiserver", ips=("127.0.0.1",), server=True)
    client_files = ca.issue("client", "system:node:n1", client=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(str(server_files.cert), str(server_files.key))
    tls.verify_mode = ssl.CERT_REQUIRED
    tls.load_verify_locations(str(ca.cert_path))
    for server, seen in _serve(tls):
        kubeconfig = _kubeconfig(
            tmp_path / "kubeconfig",
            {
                "server": f"https://127.0.0.1:{server.server_port}",
                "certificate-authority-data": _b64(ca.cert_path),
            },
            {
                "client-certificate-data": _b64(client_files.cert),
                "client-key-data": _b64(client_files.key),
            },
        )
        api = KubeApi(from_kubeconfig(kubeconfig), timeout=5)
        assert api.request("PUT", "/x", {"a": 1}) == {"echo": {"a": 1}}
        with pytest.raises(ApiError) as err:
            api.request("GET", "/apis/x/missing")
        assert err.value.status == 404
        assert 'leases "missing" not found' in str(err.value)
        assert [(m, p, cn) for m, p, _, cn in seen] == [
            ("PUT", "/x", "system:node:n1"),
            ("GET", "/apis/x/missing", "system:node:n1"),
        ]


def test_a_kubeconfig_with_files_and_a_token_file_relative_to_it(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    server_files = ca.issue("server", "apiserver", ips=("127.0.0.1",), server=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(str(server_files.cert), str(server_files.key))
    (tmp_path / "token").write_text("first\n")
    for server, seen in _serve(tls):
        kubeconfig = _kubeconfig(
            tmp_path / "kubeconfig",
            {
                "server": f"https://127.0.0.1:{server.server_port}/prefix/",
                "certificate-authority": "pki/fledged-test-ca.crt",
            },
            {"tokenFile": "token"},
        )
        api = KubeApi(from_kubeconfig(kubeconfig), timeout=5)
        api.request("GET", "/a")
        (tmp_path / "token").write_text("rotated\n")  # as the kubelet renews a bound token
        api.request("GET", "/b")
        assert [(p, auth) for _, p, auth, _ in seen] == [
            ("/prefix/a", "Bearer first"),
            ("/prefix/b", "Bearer rotated"),
        ]


def test_a_server_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    ours, theirs = (
        CertificateAuthority(tmp_path / "a", "ours"),
        CertificateAuthority(tmp_path / "b", "theirs"),
    )
    server_files = theirs.issue("server", "apiserver", ips=("127.0.0.1",), server=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(str(server_files.cert), str(server_files.key))
    for server, _ in _serve(tls):
        kubeconfig = _kubeconfig(
            tmp_path / "kubeconfig",
            {
                "server": f"https://127.0.0.1:{server.server_port}",
                "certificate-authority": str(ours.cert_path),
            },
            {"token": "t"},
        )
        with pytest.raises(ssl.SSLError):
            KubeApi(from_kubeconfig(kubeconfig), timeout=5).request("GET", "/a")


@pytest.mark.parametrize(
    ("user", "why"),
    [
        ({"exec": {"command": "aws"}}, "'exec'"),
        ({"auth-provider": {"name": "gcp"}}, "'auth-provider'"),
        ({"username": "u", "password": "p"}, "'username'"),
    ],
)
def test_credentials_the_agent_cannot_use_are_refused_by_name(
    tmp_path: Path, user: dict[str, Any], why: str
) -> None:
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", {"server": "https://k:6443"}, user)
    with pytest.raises(ApiConfigError, match=why):
        from_kubeconfig(kubeconfig)


def test_a_broken_kubeconfig_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ApiConfigError, match="cannot read kubeconfig"):
        from_kubeconfig(tmp_path / "absent")
    no_context = tmp_path / "no-context"
    no_context.write_text("apiVersion: v1\nkind: Config\n")
    with pytest.raises(ApiConfigError, match="no current-context"):
        from_kubeconfig(no_context)
    bad_server = _kubeconfig(tmp_path / "bad-server", {"server": "k:6443"}, {"token": "t"})
    with pytest.raises(ApiConfigError, match="bad server"):
        from_kubeconfig(bad_server)


def test_in_a_pod_the_service_account_is_used_and_its_absence_is_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ApiConfigError, match="give --kubeconfig"):
        in_cluster(tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(ApiConfigError, match="token mounted"):
        in_cluster(tmp_path)
    ca = CertificateAuthority(tmp_path)
    (tmp_path / "ca.crt").write_bytes(ca.cert_path.read_bytes())
    (tmp_path / "token").write_text("sa-token")
    target = in_cluster(tmp_path)
    assert (target.host, target.port, target.bearer()) == ("fd00::1", 443, "sa-token")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_kept_connection_the_server_dropped_is_replaced_without_an_error(
    tmp_path: Path, scheme: str
) -> None:
    tls = None
    if scheme == "https":
        ca = CertificateAuthority(tmp_path / "pki")
        files = ca.issue("server", "apiserver", ips=("127.0.0.1",), server=True)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(str(files.cert), str(files.key))
    for server, seen in _serve(tls, close=True):
        cluster: dict[str, Any] = {"server": f"{scheme}://127.0.0.1:{server.server_port}"}
        if tls is not None:
            cluster["certificate-authority"] = "pki/fledged-test-ca.crt"
        api = KubeApi(from_kubeconfig(_kubeconfig(tmp_path / "kubeconfig", cluster, {})), 5)
        for _ in range(3):
            assert api.request("POST", "/leases", {"n": 1}) == {"echo": {"n": 1}}
        assert len(seen) == 3  # each sent once, though the connection kept was gone


def test_an_answer_that_is_not_json_is_an_api_error_with_its_text(tmp_path: Path) -> None:
    for server, _ in _serve():
        cluster = {"server": f"http://127.0.0.1:{server.server_port}"}
        api = KubeApi(from_kubeconfig(_kubeconfig(tmp_path / "kubeconfig", cluster, {})), 5)
        for status in (502, 200):
            with pytest.raises(ApiError, match="Bad Gateway") as err:
                api.request("GET", f"/page/{status}")
            assert err.value.status == status


def test_a_call_to_a_server_that_never_answers_ends_at_the_timeout(tmp_path: Path) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # connections complete in the backlog; nothing is ever said
    try:
        kubeconfig = _kubeconfig(
            tmp_path / "kubeconfig",
            {
                "server": f"https://127.0.0.1:{silent.getsockname()[1]}",
                "insecure-skip-tls-verify": True,
            },
            {"token": "t"},
        )
        api = KubeApi(from_kubeconfig(kubeconfig), timeout=1)
        started = time.monotonic()
        with pytest.raises(TimeoutError):  # during the TLS handshake
            api.request("GET", "/a")
        assert time.monotonic() - started < 10
    finally:
        silent.close()


def test_the_agent_loads_neither_the_kubernetes_client_nor_the_docker_sdk() -> None:
    """Both cost the agent on every node memory it does not need: the kubernetes
    client (about 14 MiB) and, on a CRI node, the Docker SDK with requests
    (about 7 MiB); YAML (1.7 MiB) too, needed only to read a kubeconfig or a credential
    provider config."""
    code = (
        "import sys\n"
        "from agent.config import parse_args\n"
        "from agent.server import make_runtime\n"
        "from agent.lease import LeaseRegistrar\n"
        "from agent.kubeapi import ApiTarget\n"
        "cfg, _ = parse_args(['--node-name=n1', '--runtime-endpoint=unix:///x.sock'])\n"
        "make_runtime(cfg)\n"
        "target = ApiTarget('https', 'k', 1, '', None)\n"
        "LeaseRegistrar(target, 'ns', 'n1', 'a:1', False, 'v', 40, 10)\n"
        "heavy = {'kubernetes', 'docker', 'requests', 'urllib3', 'yaml'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
