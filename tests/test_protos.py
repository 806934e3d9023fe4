"""The generated Python under protos/ is exactly what `make protos` produces now."""

from __future__ import annotations

from pathlib import Path

from protos import generate


def test_committed_generated_code_matches_a_fresh_generation(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    fresh = generate.generated_files(tmp_path)
    committed = generate.generated_files(generate.REPO_ROOT)
    assert fresh, "protoc generated nothing"
    assert fresh == committed, "generated file set differs: run `make protos` and commit"
    stale = [
        str(p)
        for p in fresh
        if (tmp_path / p).read_bytes() != (generate.REPO_ROOT / p).read_bytes()
    ]
    assert not stale, f"stale generated code, run `make protos` and commit: {stale}"


def test_runtime_stubs_use_the_published_package_and_service_names() -> None:
    from protos.containerd.services.content.v1 import content_pb2
    from protos.containerd.services.images.v1 import images_pb2
    from protos.containerd.services.version.v1 import version_pb2
    from protos.cri.runtime.v1 import api_pb2

    assert api_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name == (
        "runtime.v1.ImageService"
    )
    assert api_pb2.Image.DESCRIPTOR.fields_by_name["pinned"].number == 8
    assert images_pb2.DESCRIPTOR.services_by_name["Images"].full_name == (
        "containerd.services.images.v1.Images"
    )
    assert content_pb2.Status.DESCRIPTOR.fields_by_name["total"].number == 5
    assert version_pb2.DESCRIPTOR.package == "containerd.services.version.v1"
