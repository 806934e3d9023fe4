"""Images that run: a static binary built here with gcc, packed as an OCI image and
pushed to the suite's registry. The pause image of the kubelet nodes' sandboxes is one
(no sandbox image can be pulled from outside), and so are the pods' workloads."""

from __future__ import annotations

import gzip
import io
import json
import random
import subprocess
import tarfile
from pathlib import Path

from .images import (
    OCI_CONFIG,
    OCI_LAYER,
    Blob,
    PushedImage,
    RegistryClient,
    host_arch,
    sha256,
)

# Says it started (for `kubectl logs`), then waits for SIGTERM or SIGINT and exits 0:
# a sandbox's pause process, or a workload that runs until its pod is deleted.
PAUSE_C = r"""
#include <signal.h>
#include <unistd.h>
static void done(int sig) { (void)sig; _exit(0); }
int main(void) {
    signal(SIGTERM, done);
    signal(SIGINT, done);
    write(1, "fledged workload started\n", 25);
    for (;;) pause();
}
"""


def static_binary(workdir: Path, name: str, source: str) -> Path:
    """Compiles `source` (C) into a static binary under `workdir`, once."""
    out = workdir / "bin" / name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run(
        ["gcc", "-static", "-Os", "-s", "-o", str(out), str(src)], check=True, capture_output=True
    )
    return out


def _layer(files: dict[str, tuple[bytes, int]]) -> tuple[Blob, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = 0
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))
    uncompressed = raw.getvalue()
    return Blob(OCI_LAYER, gzip.compress(uncompressed, compresslevel=1, mtime=0)), sha256(
        uncompressed
    )


def push_program_image(
    registry: RegistryClient,
    repository: str,
    tag: str,
    program: Path,
    padding: int = 0,
    seed: str = "",
) -> PushedImage:
    """An image whose entrypoint is `program`; `padding` random bytes in a second layer
    make it as large as a test needs (a pull worth measuring)."""
    layers = [_layer({"pause": (program.read_bytes(), 0o755)})]
    if padding:
        rng = random.Random(seed or f"{repository}:{tag}")
        layers.append(_layer({"data/padding.bin": (rng.randbytes(padding), 0o644)}))
    config = Blob(
        OCI_CONFIG,
        json.dumps(
            {
                "architecture": host_arch(),
                "os": "linux",
                "config": {"Entrypoint": ["/pause"], "Labels": {"io.kubefledged.test/seed": seed}},
                "rootfs": {"type": "layers", "diff_ids": [diff for _, diff in layers]},
            },
            sort_keys=True,
        ).encode(),
    )
    return registry.push_layers(repository, tag, config, [b for b, _ in layers])
