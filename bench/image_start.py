"""How long each role of the project's image takes to import its code at start, inside
the image as the pods run it (read-only root filesystem, no bytecode written): the part
of a restart or rollout before the process serves.

    .venv/bin/python -m bench.image_start --runs 5

Builds the image from the checked-out sources (tools/build-image.sh, cached), loads it
into a Docker daemon of its own and times the imports of each entry point in fresh
containers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.testenv.dockerd import Dockerd
from tests.testenv.project_image import built_archive, content_key

RESULTS = Path(__file__).parent / "results" / "image_start.md"
ROLES = {
    "agent": "agent.main, agent.server, agent.lease",
    "coordinator": "coordinator.main",
}
PROBE = (
    "import json, resource, time\n"
    "t = time.perf_counter()\n"
    "import {modules}\n"
    "print(json.dumps([time.perf_counter() - t, "
    "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))\n"
)


def measure(client: object, image: str, modules: str, runs: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(runs):
        logs = client.containers.run(  # type: ignore[attr-defined]
            image,
            ["/venv/bin/python", "-c", PROBE.format(modules=modules)],
            read_only=True,
            network_mode="none",
            user="0:0",  # the test base's root directory is 0700 under Docker's vfs
            remove=True,
        )
        seconds, rss = json.loads(logs.decode().strip().splitlines()[-1])
        out.append((float(seconds), float(rss)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    archive = built_archive()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fledged-image-start-") as folder:
        dockerd = Dockerd(Path(folder), [])
        dockerd.start()
        try:
            client = dockerd.client()
            try:
                with archive.open("rb") as data:
                    (image,) = client.images.load(data.read())
                tag = image.tags[0]
                for role, modules in ROLES.items():
                    runs = measure(client, tag, modules, args.runs)
                    seconds = [s for s, _ in runs]
                    rss = [r for _, r in runs]
                    rows.append(
                        f"| {role} | {statistics.median(seconds):.2f} s "
                        f"| {' '.join(f'{s:.2f}' for s in seconds)} "
                        f"| {statistics.median(rss):.1f} MiB |"
                    )
                    print(rows[-1], flush=True)
            finally:
                client.close()
        finally:
            dockerd.process.stop()  # dockerd unmounts its data root as it stops
    lines = [
        "# Start of the image's roles: importing their code",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}; "
        f"image kube-fledged-py:{content_key(archive)}; fresh container per run, read-only "
        f"root filesystem, as the pods run it; {args.runs} runs, medians.",
        "",
        "| role | import time | all runs | peak RSS after the imports |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    args.results.write_text("\n".join(lines))
    print(args.results.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
