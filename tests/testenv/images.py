"""Builds small OCI images from scratch and pushes them to a registry over its HTTP API.

The tests make every image they pull, so no test depends on the internet. Layer
contents are seeded random bytes: incompressible, so an image's size is what was asked,
and reproducible, so the same seed gives the same digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import random
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urljoin

import requests

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"  # uncompressed


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes = field(repr=False)

    @property
    def digest(self) -> str:
        return sha256(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: object) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class PushedImage:
    """What was pushed; `ref` is what a runtime is asked to pull."""

    registry: str  # host:port
    repository: str
    tag: str
    digest: str  # of the manifest (or index) the tag points at
    config_digest: str  # of the host platform's config: the image id runtimes report
    layer_sizes: tuple[int, ...]  # compressed, as pulled
    layer_digests: tuple[str, ...]
    content_size: int  # manifest + config + layers of the host platform

    @property
    def ref(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"

    @property
    def digest_ref(self) -> str:
        return f"{self.registry}/{self.repository}@{self.digest}"

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"


def make_layer(size: int, rng: random.Random, index: int) -> tuple[Blob, str]:
    """A gzip tar layer holding one file of `size` random bytes; returns it and its diff id."""
    payload = rng.randbytes(size)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"data/layer-{index}.bin")
        info.size = size
        info.mtime = 0
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(payload))
    uncompressed = raw.getvalue()
    compressed = gzip.compress(uncompressed, compresslevel=1, mtime=0)
    return Blob(OCI_LAYER, compressed), sha256(uncompressed)


def make_image(total_size: int, layers: int, seed: str, arch: str) -> tuple[Blob, Blob, list[Blob]]:
    """Manifest, config and layers of one platform's image."""
    rng = random.Random(f"{seed}/{arch}")
    per_layer = max(1, total_size // layers)
    built = [make_layer(per_layer, rng, i) for i in range(layers)]
    config = Blob(
        OCI_CONFIG,
        json.dumps(
            {
                "architecture": arch,
                "os": "linux",
                "config": {"Labels": {"io.kubefledged.test/seed": seed}},
                "rootfs": {"type": "layers", "diff_ids": [diff for _, diff in built]},
            },
            sort_keys=True,
        ).encode(),
    )
    layers_only = [blob for blob, _ in built]
    return oci_manifest(config, layers_only), config, layers_only


def oci_manifest(config: Blob, layers: Sequence[Blob]) -> Blob:
    return Blob(
        OCI_MANIFEST,
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config.descriptor(),
                "layers": [blob.descriptor() for blob in layers],
            },
            sort_keys=True,
        ).encode(),
    )


class RegistryClient:
    """Just enough of the distribution API to push blobs and manifests."""

    def __init__(self, host: str, credentials: tuple[str, str] | None = None) -> None:
        self.host = host
        self.base = f"http://{host}"
        self.session = requests.Session()
        if credentials:
            self.session.auth = credentials

    def push_blob(self, repository: str, blob: Blob) -> None:
        url = f"{self.base}/v2/{repository}/blobs/{blob.digest}"
        if self.session.head(url, timeout=30).status_code == 200:
            return
        start = self.session.post(f"{self.base}/v2/{repository}/blobs/uploads/", timeout=30)
        start.raise_for_status()
        location = urljoin(self.base, start.headers["Location"])
        sep = "&" if "?" in location else "?"
        done = self.session.put(
            f"{location}{sep}digest={blob.digest}",
            data=blob.data,
            headers={"Content-Type": "application/octet-stream"},
            timeout=120,
        )
        done.raise_for_status()

    def put_manifest(self, repository: str, reference: str, manifest: Blob) -> str:
        resp = self.session.put(
            f"{self.base}/v2/{repository}/manifests/{reference}",
            data=manifest.data,
            headers={"Content-Type": manifest.media_type},
            timeout=30,
        )
        resp.raise_for_status()
        return manifest.digest

    def push_layers(
        self, repository: str, tag: str, config: Blob, layers: Sequence[Blob]
    ) -> PushedImage:
        """Pushes `layers`, `config` and a manifest of them under `tag`."""
        manifest = oci_manifest(config, layers)
        for blob in [*layers, config]:
            self.push_blob(repository, blob)
        digest = self.put_manifest(repository, tag, manifest)
        return self._pushed(repository, tag, digest, manifest, config, layers)

    def _pushed(
        self,
        repository: str,
        tag: str,
        digest: str,
        manifest: Blob,
        config: Blob,
        layers: Sequence[Blob],
    ) -> PushedImage:
        return PushedImage(
            registry=self.host,
            repository=repository,
            tag=tag,
            digest=digest,
            config_digest=config.digest,
            layer_sizes=tuple(b.size for b in layers),
            layer_digests=tuple(b.digest for b in layers),
            content_size=manifest.size + config.size + sum(b.size for b in layers),
        )

    def push_image(
        self,
        repository: str,
        tag: str,
        size: int = 64 * 1024,
        layers: int = 1,
        seed: str | None = None,
        platforms: tuple[str, ...] = (),
    ) -> PushedImage:
        """Pushes an image of about `size` bytes in `layers` layers under `tag`.

        With `platforms` (e.g. ("amd64", "arm64")) the tag points at an index with one
        image per architecture. Pushing again with another seed moves the tag to new
        content, as a rebuilt `latest` would.
        """
        seed = seed if seed is not None else f"{repository}:{tag}"
        arches = platforms or (host_arch(),)
        host = None
        manifests: list[tuple[str, Blob]] = []
        for arch in arches:
            manifest, config, blobs = make_image(size, layers, seed, arch)
            for blob in [*blobs, config]:
                self.push_blob(repository, blob)
            self.put_manifest(repository, manifest.digest, manifest)
            manifests.append((arch, manifest))
            if arch == host_arch():
                host = (manifest, config, blobs)
        if host is None:
            raise ValueError(f"platforms {arches} lack this host's architecture {host_arch()}")
        manifest, config, blobs = host
        top = manifest
        if platforms:
            top = Blob(
                OCI_INDEX,
                json.dumps(
                    {
                        "schemaVersion": 2,
                        "mediaType": OCI_INDEX,
                        "manifests": [
                            m.descriptor(platform={"architecture": arch, "os": "linux"})
                            for arch, m in manifests
                        ],
                    },
                    sort_keys=True,
                ).encode(),
            )
        digest = self.put_manifest(repository, tag, top)
        return self._pushed(repository, tag, digest, manifest, config, blobs)
