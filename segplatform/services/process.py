"""Local services as process groups: launch, wait until ready, stop, find by instance marker.

Every service of the local platform (``ray start --block``, ``mlflow server``, ``weed mini``) runs
the same way: its command starts in a new session (its own process group, so stopping it never
signals another process of the user), with stdin from ``/dev/null`` and stdout and stderr appended
to one log file. ``ServiceProcess`` holds one such process; the functions below stop a process
group (SIGTERM, then SIGKILL) and find the processes a service started, also those that left its
group, by the instance marker ``INSTANCE_ENV_VAR`` in their environment or a path on their
command line.

Example::

    service = ServiceProcess(Path("/tmp/web/http.log"))
    pid = service.launch([sys.executable, "-m", "http.server", "8123"], cwd=Path("/tmp/web"))

    def stop() -> None:
        terminate_process_group(pid)
        service.release()

    service.wait_ready(
        lambda: port_is_open("127.0.0.1", 8123),
        timeout=30.0,
        poll_interval=0.2,
        stop=stop,
        error=RuntimeError,
        exited="http.server exited during start-up; log",
        timed_out="http.server did not answer within 30 s; log",
    )
    ...
    stop()
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import psutil

# Environment variable that marks every process started for one service instance; children
# inherit it, so processes that left the service's process group are still found.
INSTANCE_ENV_VAR = "SEGPLATFORM_INSTANCE"


def venv_executable(name: str) -> str:
    """The console script ``name`` next to this Python interpreter (the project's venv), else
    the bare ``name`` (looked up on PATH)."""
    script = Path(sys.executable).with_name(name)
    return str(script) if script.exists() else name


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def wait_while(condition: Callable[[], bool], timeout: float, poll_interval: float) -> None:
    """Call ``condition`` every ``poll_interval`` s while it holds, for at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and condition():
        time.sleep(poll_interval)


def send_signal(pid: int, signal_number: int, *, group: bool = False) -> None:
    """Send ``signal_number`` to process ``pid`` (or to process group ``pid`` when ``group``);
    a process that is gone or not ours is left alone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, signal_number)
        else:
            os.kill(pid, signal_number)


def terminate_process_group(
    pgid: int, timeout: float = 15.0, first_signal: int = signal.SIGTERM
) -> None:
    """Send ``first_signal`` to process group ``pgid``, wait for it to empty, then SIGKILL."""
    send_signal(pgid, first_signal, group=True)
    wait_while(lambda: _group_alive(pgid), timeout, 0.1)
    send_signal(pgid, signal.SIGKILL, group=True)


def _group_alive(pgid: int) -> bool:
    for process in psutil.process_iter(["pid"]):
        # A process may exit between the listing and the look-up (ProcessLookupError).
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


def kill_processes(processes: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL what is left."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5)


def processes_marked(marker_prefix: str, paths: tuple[str, ...] = ()) -> list[psutil.Process]:
    """This user's processes whose environment has ``INSTANCE_ENV_VAR`` starting with
    ``marker_prefix`` or whose command line mentions one of ``paths``.

    The current process and its ancestors are never returned (a shell that ran
    ``segplatform local down --state-dir DIR`` mentions the path too).
    """
    protected = {os.getpid(), *(parent.pid for parent in psutil.Process().parents())}
    found = []
    for process in psutil.process_iter(["pid", "uids"]):
        if process.pid in protected:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if process.info["uids"] is not None and process.info["uids"].real != os.getuid():
                continue
            environ = psutil.Process(process.pid).environ()
            if environ.get(INSTANCE_ENV_VAR, "").startswith(marker_prefix):
                found.append(process)
                continue
            cmdline = " ".join(process.cmdline())
            if any(path and path in cmdline for path in paths):
                found.append(process)
    return found


def marked_process_alive(pid: int, marker: str) -> bool:
    """Whether process ``pid`` runs (not a zombie) and carries ``marker`` in its environment
    (a reused pid does not)."""
    with contextlib.suppress(psutil.Error, OSError):
        process = psutil.Process(pid)
        return (
            process.status() != psutil.STATUS_ZOMBIE
            and process.environ().get(INSTANCE_ENV_VAR) == marker
        )
    return False


class ServiceProcess:
    """One service command run in its own process group, its output appended to ``log_path``."""

    def __init__(self, log_path: Path, *, tail_lines: int = 40) -> None:
        self.log_path = log_path
        # Lines of the log that start-up errors quote.
        self.tail_lines = tail_lines
        # The process this object launched; None before ``launch`` and after ``release``.
        self.popen: subprocess.Popen[bytes] | None = None
        self._log_file: BinaryIO | None = None

    @property
    def pid(self) -> int | None:
        """Process id (and process group id) of the launched command, or None."""
        return self.popen.pid if self.popen is not None else None

    def running(self) -> bool:
        """Whether the launched command still runs."""
        return self.popen is not None and self.popen.poll() is None

    def exited(self) -> bool:
        """Whether the launched command has ended (False when nothing was launched)."""
        return self.popen is not None and self.popen.poll() is not None

    def launch(self, command: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> int:
        """Start ``command`` in ``cwd`` as a new session (own process group) with ``env`` (None:
        this process's environment); returns its pid, which is also its process group id."""
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in release()
        self.popen = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group and session
        )
        return self.popen.pid

    def wait_ready(
        self,
        ready: Callable[[], bool],
        *,
        timeout: float,
        poll_interval: float,
        stop: Callable[[], None],
        error: type[Exception],
        exited: str,
        timed_out: str,
        has_exited: Callable[[], bool] | None = None,
    ) -> None:
        """Poll ``ready()`` every ``poll_interval`` s until it is true. When the command exits
        first (``has_exited()``, by default ``self.exited()``) or ``timeout`` s pass, call
        ``stop()`` and raise ``error("<exited or timed_out>:\\n<log tail>")``."""
        has_exited = has_exited or self.exited
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if has_exited():
                tail = self.log_tail()
                stop()
                raise error(f"{exited}:\n{tail}")
            if ready():
                return
            time.sleep(poll_interval)
        tail = self.log_tail()
        stop()
        raise error(f"{timed_out}:\n{tail}")

    def log_tail(self, lines: int | None = None) -> str:
        """The last ``lines`` (default ``tail_lines``) lines of the log ("" if unreadable)."""
        count = self.tail_lines if lines is None else lines
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-count:])
        except OSError:
            return ""

    def release(self, timeout: float = 5.0) -> None:
        """Reap the launched command (waiting up to ``timeout`` s, sending no signal), close the
        log and forget the process."""
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
            self.popen = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
