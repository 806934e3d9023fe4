"""Adapters to the node's container runtime, all behind the `Runtime` protocol."""

from .base import (
    Credentials,
    FsUsage,
    ImageRecord,
    PinState,
    Progress,
    ProgressCallback,
    Runtime,
    RuntimeInfo,
)

__all__ = [
    "Credentials",
    "FsUsage",
    "ImageRecord",
    "PinState",
    "Progress",
    "ProgressCallback",
    "Runtime",
    "RuntimeInfo",
]
