"""Command line of the node agent (the DaemonSet)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fledged-agent",
        description="Pulls and keeps images on this node through its container runtime.",
    )
    parser.add_argument("--node-name", help="name of the Node this agent serves")
    parser.add_argument("--listen", default="0.0.0.0:9445", help="gRPC listen address")
    parser.add_argument(
        "--runtime", choices=["cri", "docker"], default="cri", help="runtime API to use"
    )
    parser.add_argument(
        "--runtime-endpoint",
        default="unix:///run/containerd/containerd.sock",
        help="runtime socket",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    print("\nfledged-agent: serving is not implemented yet.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
