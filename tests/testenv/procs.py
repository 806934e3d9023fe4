"""Child processes of the test environment: started in their own process group, logged
to a file each, and always stopped, so a run leaves no process behind."""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_LIVE: set[ManagedProcess] = set()


class ComponentError(RuntimeError):
    """A component of the test environment failed to start or answer."""


class ManagedProcess:
    """One long-running binary; its output goes to `log_path`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str | Path],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"=== start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # own process group: stop() reaches its children
            )
        _LIVE.add(self)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
        """Signals the whole process group, then kills what is left after `timeout`."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        # Children that outlived their parent still carry its process group id.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        _LIVE.discard(self)

    def kill(self) -> None:
        """Stops at once, as a crash or an OOM kill would."""
        self.stop(timeout=5, sig=signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(
        self, check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
    ) -> None:
        """Polls `check` until true; fails early, with the log, if the process dies."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise ComponentError(
                    f"{self.name} exited with code {code} before {what}:\n{self.log_tail()}"
                )
            try:
                if check():
                    return
            except Exception as exc:  # the component is still coming up
                last_error = exc
            time.sleep(interval)
        raise ComponentError(
            f"{self.name}: timed out after {timeout:.0f}s waiting for {what}"
            f" (last error: {last_error}):\n{self.log_tail()}"
        )


def log_report(processes: Sequence[ManagedProcess], lines: int = 30) -> str:
    """The tail of each process's log, under its name and path."""
    return "\n".join(f"--- {p.name} ({p.log_path}) ---\n{p.log_tail(lines)}" for p in processes)


_HANDED_OUT: set[int] = set()
# Below Linux's default ephemeral range (32768-60999) and above the 10xxx ports that
# Kubernetes components default to.
_QUIET_PORTS = range(20000, 32768)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port that is free now and that no earlier call in this process returned.

    Taken from below the kernel's ephemeral range, so an outgoing connection cannot
    take it before the component we hand it to binds it; and never handed out twice,
    since the kernel's own pick (bind to port 0) can return the port it just gave
    the previous caller, who has not bound it yet: two components then share a port
    and one fails with "Address already in use".
    """
    low = min(_QUIET_PORTS.stop, _ephemeral_low())
    for _ in range(200 if low > _QUIET_PORTS.start else 0):
        port = random.randrange(_QUIET_PORTS.start, low)
        if port not in _HANDED_OUT and _bindable(port):
            _HANDED_OUT.add(port)
            return port
    while True:  # the quiet range is used up (or the host's ephemeral range starts low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def unix_socket_ready(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(str(path)) == 0


def stop_all() -> None:
    """Safety net for crashes and Ctrl-C: nothing started here outlives the interpreter."""
    for proc in list(_LIVE):
        proc.stop(timeout=5)


atexit.register(stop_all)
