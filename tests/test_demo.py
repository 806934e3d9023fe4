"""`make demo` works: the README's first command, run end to end without a terminal."""

from __future__ import annotations

import subprocess
import sys

from tests.testenv.paths import REPO_ROOT


def test_the_demo_caches_the_sample_and_reports_what_each_node_holds() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.testenv.demo", "--exit-when-done"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "imagecache1   Succeeded   8/8     3/3" in out
    assert "what each node's containerd holds" in out
    # node-1 is not tier=backend: it holds the two images for every node, not the third.
    assert out.count("│ node-1 │") == 2
    assert out.count("│ yes    │") == 8
    assert "kubefledged.io/purge-imagecache=" in out
    assert "stopping every process" in out
