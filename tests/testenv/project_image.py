"""The project's own image, as users run it: built from the Dockerfile by
tools/build-image.sh (cached by content) and pushed to the suite's registry, from where
kubelet nodes pull it."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

from .images import OCI_CONFIG, OCI_LAYER_TAR, Blob, PushedImage, RegistryClient
from .paths import REPO_ROOT

BUILD_TIMEOUT = 1800.0  # cold: debootstrap and pip install; warm: nothing to do
REPOSITORY = "kube-fledged-py"


def built_archive() -> Path:
    """The `docker save` archive of the image of the checked-out sources."""
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "tools" / "build-image.sh")],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"tools/build-image.sh failed:\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def content_key(archive: Path) -> str:
    """The sources' hash the build named the archive after (kube-fledged-py-<key>.tar)."""
    return archive.stem.rsplit("-", 1)[1]


def push_archive(registry: RegistryClient, archive: Path, *tags: str) -> list[PushedImage]:
    """Pushes a `docker save` archive as an OCI image under each of `tags` (its layers
    uncompressed, as saved: the registry is local)."""
    with tarfile.open(archive) as tar:

        def read(name: str) -> bytes:
            member = tar.extractfile(name)
            assert member is not None, f"{name} missing from {archive}"
            return member.read()

        (entry,) = json.loads(read("manifest.json"))
        config = Blob(OCI_CONFIG, read(entry["Config"]))
        layers = [Blob(OCI_LAYER_TAR, read(name)) for name in entry["Layers"]]
    return [registry.push_layers(REPOSITORY, tag, config, layers) for tag in tags]


def push_project_image(registry: RegistryClient, *tags: str) -> PushedImage:
    """Builds (or reuses) the image and pushes it as <registry>/kube-fledged-py under its
    content key and each of `tags` (the same content under another tag makes a
    DaemonSet roll); returns the content key's image."""
    archive = built_archive()
    return push_archive(registry, archive, content_key(archive), *tags)[0]
