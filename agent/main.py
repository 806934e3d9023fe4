"""Entry point of `fledged-agent` (the DaemonSet)."""

from __future__ import annotations

import asyncio
import sys

from common import logs

from .config import parse_args
from .server import serve


def main(argv: list[str] | None = None) -> int:
    cfg, register_lease = parse_args(argv)
    logs.setup(cfg.log_format, cfg.log_level)
    return asyncio.run(serve(cfg, register_lease))


if __name__ == "__main__":
    sys.exit(main())
