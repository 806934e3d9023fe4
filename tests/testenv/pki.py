"""The test environment's certificates, as files, from common.pki's CA."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from common.pki import CertificateAuthority as _CA
from common.pki import key_pem, new_key, public_key_pem

_VALIDITY = datetime.timedelta(days=2)


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


class CertificateAuthority:
    """A throwaway CA whose certificate and leaves live in `directory`."""

    def __init__(self, directory: Path, name: str = "fledged-test-ca") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._ca = _CA.create(name, _VALIDITY)
        self.cert_path = directory / f"{name}.crt"
        _write(self.cert_path, self._ca.cert_pem)

    def issue(
        self,
        name: str,
        common_name: str,
        organizations: tuple[str, ...] = (),
        dns_names: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        server: bool = False,
        client: bool = False,
    ) -> CertFiles:
        cert, key = self._ca.issue(
            common_name, organizations, dns_names, ips, server, client, _VALIDITY
        )
        files = CertFiles(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        _write(files.cert, cert)
        _write(files.key, key, private=True)
        return files


def signing_keypair(directory: Path, name: str) -> CertFiles:
    """A bare key pair (PEM public key in `cert`), e.g. for service-account tokens."""
    key = new_key()
    files = CertFiles(directory / f"{name}.pub", directory / f"{name}.key")
    _write(files.key, key_pem(key), private=True)
    _write(files.cert, public_key_pem(key))
    return files
