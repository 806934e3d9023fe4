"""The project's image as built from the Dockerfile (tools/build-image.sh): what its
pods need that only the built image can show."""

from __future__ import annotations

import json
import tarfile

from tests.testenv.project_image import built_archive

SITE = "venv/lib/python3.11/site-packages/"
# Imported by the two commands at start.
STARTUP = (
    "agent/server.py",
    "agent/kubeapi.py",
    "agent/runtime/cri.py",
    "coordinator/main.py",
    "coordinator/controller.py",
    "common/reference.py",
    "grpc/__init__.py",
    "google/protobuf/message.py",
    "kubernetes/client/api_client.py",
    "kubernetes/watch/watch.py",
)


def _pyc(source: str) -> str:
    folder, _, name = source.rpartition("/")
    return f"{SITE}{folder}/__pycache__/{name.removesuffix('.py')}.cpython-311.pyc"


def test_the_image_holds_bytecode_for_what_its_commands_import_at_start() -> None:
    """The pods' root filesystem is read-only: a module without bytecode in the image
    is compiled at every start (the coordinator took 1.2 s to import its code instead
    of 0.5 s, `bench/results/image_start.md`). The bytecode of the rest of the
    dependencies stays out (50 MB for the kubernetes client alone)."""
    archive = built_archive()
    names: set[str] = set()
    with tarfile.open(archive) as image:
        member = image.extractfile("manifest.json")
        assert member is not None
        (entry,) = json.load(member)
        for layer in entry["Layers"]:
            data = image.extractfile(layer)
            assert data is not None
            with tarfile.open(fileobj=data) as files:
                names.update(files.getnames())
    assert f"{SITE}agent/server.py" in names, "no venv layer found"
    missing = [source for source in STARTUP if _pyc(source) not in names]
    assert not missing, f"compiled at every start: {missing}"
    compiled = sum(1 for n in names if n.startswith(SITE + "kubernetes/") and n.endswith(".pyc"))
    sources = sum(1 for n in names if n.startswith(SITE + "kubernetes/") and n.endswith(".py"))
    assert compiled < sources, "every module of the kubernetes client compiled, used or not"
