"""Run what a built image contains without a container engine, through buildah.

``podman run`` cannot manage cgroups on these machines, but ``buildah run --isolation chroot``
runs a command in a working container made from the image: as the image's user, with its
environment and working directory, on the host's network (so the image reaches the tests' local
broker on loopback, and they reach its /metrics port). What a Kubernetes pod spec adds is done
here the same way: ``readOnlyRootFilesystem`` by binding each top-level directory of the image
read-only over itself (buildah keeps ``/run`` writable for its own files), the ``/tmp`` emptyDir
as a tmpfs, a weights volume as a read-only bind mount.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

WRITABLE = {"tmp", "run", "dev", "proc", "sys"}
"""Top-level directories not bound read-only: /tmp gets a tmpfs, /run is buildah's, the rest are the kernel's."""


@dataclass(frozen=True)
class ImageConfig:
    """The runtime half of an image's configuration (Docker format: it keeps the HEALTHCHECK)."""

    name: str
    user: str
    entrypoint: list[str]
    cmd: list[str]
    labels: dict[str, str]
    healthcheck: list[str]
    stop_signal: str


def inspect_image(name: str) -> ImageConfig:
    info = json.loads(subprocess.run(["buildah", "inspect", "--type", "image", name], check=True,
                                     capture_output=True, text=True).stdout)
    config = info["Docker"]["config"]
    return ImageConfig(
        name=name, user=config.get("User", ""), entrypoint=config.get("Entrypoint") or [],
        cmd=config.get("Cmd") or [], labels=config.get("Labels") or {},
        healthcheck=(config.get("Healthcheck") or {}).get("Test") or [], stop_signal=config.get("StopSignal", ""),
    )


class WorkingContainer:
    """One working container of ``image``; :meth:`start` runs commands in it, :meth:`remove` ends it."""

    def __init__(self, image: ImageConfig) -> None:
        self.image = image
        self.id = subprocess.run(["buildah", "from", "--pull-never", image.name], check=True,
                                 capture_output=True, text=True).stdout.strip()
        self.rootfs = Path(subprocess.run(["buildah", "mount", self.id], check=True,
                                          capture_output=True, text=True).stdout.strip())
        self.started: list[subprocess.Popen] = []

    def start(self, argv: list[str], env: dict[str, str] | None = None, volumes: dict[Path, str] | None = None,
              user: str | None = None, **popen) -> subprocess.Popen:
        """``argv`` as the image's user (or ``user``) on the read-only root; ``volumes`` maps host
        paths to read-only container paths."""
        command = ["buildah", "run", "--isolation", "chroot", "--network", "host", "--user", user or self.image.user,
                   "--mount", "type=tmpfs,destination=/tmp"]
        volumes = volumes or {}
        for inside in volumes.values():  # the mount points, made first as a runtime does: a read-only
            (self.rootfs / inside.lstrip("/")).mkdir(parents=True, exist_ok=True)  # parent takes none later
        for entry in sorted(os.listdir(self.rootfs)):
            mounted_over = f"/{entry}" in volumes.values()
            if entry not in WRITABLE and not mounted_over and not (self.rootfs / entry).is_symlink():
                command += ["-v", f"{self.rootfs / entry}:/{entry}:ro"]
        for host, inside in volumes.items():
            command += ["-v", f"{host}:{inside}:ro"]
        for key, value in (env or {}).items():
            command += ["-e", f"{key}={value}"]
        process = subprocess.Popen([*command, self.id, "--", *argv], **popen)
        self.started.append(process)
        return process

    def run(self, argv: list[str], timeout: float = 120, **options) -> subprocess.CompletedProcess:
        process = self.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)
        out, err = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def signal(self, process: subprocess.Popen, signum: int = signal.SIGTERM) -> None:
        """Sends ``signum`` to the command itself, as a runtime signals a container's PID 1:
        buildah does not forward signals to what it runs, it kills it. That is the first process
        below buildah's own (``buildah run`` → ``buildah-chroot-runtime`` → ``buildah-chroot-exec``)."""
        pid = process.pid
        while Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].startswith(b"buildah"):
            # Go forks from any of its threads: a child is listed under the thread that made it.
            (pid,) = {int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                      for child in (task / "children").read_text().split()}
        os.kill(pid, signum)

    def remove(self) -> None:
        """Kills what still runs (killing buildah alone would leave the command running) and
        deletes the container."""
        for process in self.started:
            if process.poll() is None:
                try:
                    self.signal(process, signal.SIGKILL)
                except (OSError, ValueError):  # it ended meanwhile
                    pass
                process.wait(30)
        subprocess.run(["buildah", "umount", self.id], capture_output=True)
        subprocess.run(["buildah", "rm", self.id], capture_output=True)
