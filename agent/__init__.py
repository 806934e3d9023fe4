"""The node agent: pulls, pins and removes images through the node's container runtime."""

from importlib import metadata

try:
    __version__ = metadata.version("kube-fledged")
except metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"
