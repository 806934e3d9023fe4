"""Sizes and durations as Kubernetes users write them (`10Gi`, `5m`, `1h30m`)."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTPE]i?|[kMGTPE])?[bB]?\s*$")
_UNITS = {
    None: 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")


def parse_size(text: str) -> int:
    """Bytes from `500Mi`, `10G`, `1048576`."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 500Mi, 10Gi, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_duration(text: str) -> float:
    """Seconds from a Go-style duration (`5m`, `1h30m`, `250ms`, `0s`)."""
    text = text.strip()
    if text == "0":  # Go's one unitless duration
        return 0.0
    if not text or _DURATION_RE.sub("", text):
        raise ValueError(f"not a duration: {text!r} (examples: 30s, 5m, 1h30m)")
    scale = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in _DURATION_RE.findall(text))
