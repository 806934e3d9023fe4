"""Listen addresses given as flags (HOST:PORT), checked once at start: a typo, or two
of a process's servers on one port, ends in a usage error rather than a traceback or,
with gRPC, a silent split (gRPC binds with SO_REUSEPORT, so a second server on the
same port binds too, and the kernel deals each connection to one or the other)."""

from __future__ import annotations

from collections.abc import Mapping

ANY_HOST = frozenset({"0.0.0.0", "::", "*"})


def split_address(text: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT; the host may be a bracketed IPv6 address, or empty
    for every interface, given as 0.0.0.0 (prometheus_client cannot resolve "")."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.removeprefix("[").removesuffix("]") or "0.0.0.0", int(port)


def shared_port(addresses: Mapping[str, str | None]) -> str | None:
    """Why two of the named addresses (flag -> HOST:PORT, None or empty: not served)
    cannot both be listened on, or None. Port 0 leaves the choice to the system."""
    bound = [(flag, *split_address(text)) for flag, text in addresses.items() if text]
    for i, (flag, host, port) in enumerate(bound):
        for other, other_host, other_port in bound[i + 1 :]:
            overlap = host == other_host or host in ANY_HOST or other_host in ANY_HOST
            if port and port == other_port and overlap:
                return f"{flag} and {other} both listen on port {port}"
    return None
