"""A worker (or the results sink) in a child process, configured through the environment as in a container.

Used by the integration tests and the quickstart: start it, wait for /readyz, read /metrics,
then SIGTERM (drain) or SIGKILL (crash) it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from devtools.kafka_broker import free_ports


class WorkerProcess:
    def __init__(self, log_path: Path, cwd: Path | None = None, module: str = "stream_worker",
                 extra_env: dict | None = None, command: str = "run", arguments: Sequence[str] = (),
                 **settings) -> None:
        """``settings`` are config keys as ``section__key=value`` (e.g. ``kafka__group_id="g"``);
        ``module`` is what ``python -m`` runs (tests substitute a fault-injecting wrapper), with
        the sub-command ``command`` (``run``, ``sink``, ``replay``...) and its ``arguments``."""
        self.port = free_ports(1)[0]
        values = {"metrics__port": self.port, "metrics__host": "127.0.0.1", "logging__format": "text", **settings}
        environ = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_WORKER__")}
        environ.update({f"STREAM_WORKER__{k.upper()}": str(v) for k, v in values.items()})
        environ.update(extra_env or {})
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, command, *arguments], env=environ, cwd=cwd,
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str) -> float:
        """Sum of the samples of ``name`` (with or without labels) on /metrics."""
        _, text = self.get("/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout} s:\n{self.tail()}")

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self.log.close()
