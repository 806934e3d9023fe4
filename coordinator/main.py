"""Command line of the coordinator (the Deployment)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fledged-coordinator",
        description="Reconciles ImageCache resources into pull and remove orders for node agents.",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig for running out of cluster")
    parser.add_argument("--image-pull-deadline-duration", default="5m")
    parser.add_argument("--image-cache-refresh-frequency", default="15m")
    parser.add_argument("--image-pull-policy", default="IfNotPresent")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    print("\nfledged-coordinator: reconciling is not implemented yet.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
