"""Start and always stop Flower's processes for the engine tests.

Every process is started in its own session, so stopping its process group
also stops what it spawned (SuperExec, ServerApp and ClientApp subprocesses).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            # run the apps in this environment instead of installing the FAB's dependencies
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    return env


def wait_for_port(port: int, timeout: float = 60.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts connections on ``port`` (a service is ready), bounded in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g} s")


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` (connections of a stopped server in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def pids_matching(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            out.append(int(cmdline.parent.name))
    return out


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is not installed (pip install 'flwr[simulation]')"
    return path


def run_config_arg(settings: dict) -> str:
    """``--run-config`` text: strings quoted, numbers and booleans bare."""

    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        return f"'{v}'" if isinstance(v, str) else str(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in settings.items())


class Processes:
    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs = env, logs
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], *, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        p = subprocess.Popen(argv, env=env or self.env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, p))
        return p

    def kill(self, name: str) -> None:
        """SIGKILL the named process's whole group (it and what it spawned), as a crash would."""
        for n, p in self.procs:
            if n == name:
                _signal_group(p, signal.SIGKILL)
                p.wait(timeout=10)

    def stop(self) -> None:
        for _, p in self.procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p, signal.SIGKILL)
            p.wait(timeout=10)

    def alive_groups(self, wait_s: float = 15.0) -> list[int]:
        """Process groups of ours that still have a live (non-zombie) member after
        ``wait_s`` seconds (grandchildren take a moment to die); must be empty after stop."""
        groups = {p.pid for _, p in self.procs}
        deadline = time.monotonic() + wait_s
        while (left := sorted(groups & _live_groups())) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def log_tail(self, n: int = 3000) -> str:
        return "\n".join(f"--- {name}\n" + (self.logs / f"{name}.log").read_text(errors="replace")[-n:] for name, _ in self.procs)


def _live_groups() -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            out.add(int(fields[2]))  # state, ppid, pgrp
    return out


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def processes(env: dict[str, str], logs: Path):
    procs = Processes(env, logs)
    try:
        yield procs
    finally:
        procs.stop()
