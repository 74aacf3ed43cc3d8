"""A real schema registry: Apicurio Registry, its Quarkus runner from Maven Central, on loopback.

The Avro output format's claim is that any registry-aware consumer can read the results knowing
only the registry's URL, so the tests run a real registry rather than a mock of its API.
Apicurio serves the Confluent-compatible API (``/apis/ccompat/v7``) that the worker speaks;
2.6 runs on Java 17 like the broker (3.x needs Java 21), keeps its schemas in memory (a fresh
registry per start) and is ready in a few seconds. The distribution (``-all.tar.gz``, ~140 MB)
is fetched once with Maven into ``${STREAM_WORKER_CACHE:-~/.cache/stream_worker}``.

Command line::

    python -m devtools.schema_registry fetch
    python -m devtools.schema_registry run [--port P]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from devtools.kafka_broker import LocalService, ServiceError, ServiceProcess, cache_root, free_ports, log_tail

log = logging.getLogger(__name__)

APICURIO_VERSION = "2.6.13.Final"
ARTIFACT = f"io.apicurio:apicurio-registry-app:{APICURIO_VERSION}:tar.gz:all"
CCOMPAT_PATH = "/apis/ccompat/v7"


def fetch_registry() -> Path:
    """The runner jar, resolved and unpacked into the cache unless already there (locked, so
    that concurrent test processes do not unpack into the same directory at once)."""
    home = cache_root() / f"apicurio-registry-{APICURIO_VERSION}"
    runner = home / "app" / f"apicurio-registry-app-{APICURIO_VERSION}-runner.jar"
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if runner.exists():
            return runner
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError("Maven (mvn) is needed to fetch Apicurio Registry: run scripts/install-services")
        download = home / "download"
        shutil.rmtree(download, ignore_errors=True)
        log.info("resolving %s into %s", ARTIFACT, home)
        started = time.monotonic()
        proc = subprocess.run([mvn, "-q", "-B", "dependency:copy", f"-Dartifact={ARTIFACT}",
                               f"-DoutputDirectory={download}"], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"mvn exited with {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        unpacked = home / "app.partial"
        shutil.rmtree(unpacked, ignore_errors=True)
        with tarfile.open(next(download.glob("*.tar.gz"))) as archive:
            archive.extractall(unpacked, filter="data")
        shutil.rmtree(home / "app", ignore_errors=True)
        unpacked.rename(home / "app")  # whole or absent: the runner's presence means complete
        shutil.rmtree(download)
        log.info("Apicurio Registry %s ready in %.1fs", APICURIO_VERSION, time.monotonic() - started)
    return runner


class LocalSchemaRegistry(LocalService):
    """Apicurio Registry on 127.0.0.1:``port``, schemas in memory (gone when it stops)."""

    def __init__(self, data_dir: str | Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_ports(1)[0]
        self._process = ServiceProcess("schema-registry", self.data_dir / "registry.log")

    @property
    def url(self) -> str:
        """The Confluent-compatible API's base: what ``kafka.schema_registry_url`` is set to."""
        return f"http://127.0.0.1:{self.port}{CCOMPAT_PATH}"

    def start(self) -> LocalSchemaRegistry:
        runner = fetch_registry()
        java = shutil.which("java")
        if java is None:
            raise ServiceError("java not found: Apicurio Registry needs Java 17+ (scripts/install-services)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [java, "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                f"-Dquarkus.http.port={self.port}", "-Dquarkus.http.host=127.0.0.1",
                "-Dquarkus.management.enabled=false", "-Dquarkus.log.level=WARN",
                "-Dquarkus.log.category.\"io.quarkus\".level=INFO", "-jar", str(runner)]
        self._process.start(argv, cwd=self.data_dir)
        return self

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self._process.running:
                raise ServiceError(f"schema registry exited (code {self._process.returncode})\n"
                                   f"{log_tail(self._process.log_path)}")
            try:
                with urllib.request.urlopen(self.url + "/subjects", timeout=2) as response:
                    json.loads(response.read())
                log.info("schema registry ready at %s", self.url)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError) as exc:
                if time.monotonic() > deadline:
                    raise ServiceError(f"schema registry not ready at {self.url} after {timeout:.0f}s: {exc}\n"
                                       f"{log_tail(self._process.log_path)}") from exc
            time.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.schema_registry")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="resolve Apicurio Registry into the cache")
    run = sub.add_parser("run", help="run a registry until Ctrl-C")
    run.add_argument("--port", type=int, default=None)
    run.add_argument("--data-dir", type=Path, default=Path("/tmp/stream-worker-registry"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "fetch":
        print(fetch_registry())
        return 0
    with LocalSchemaRegistry(args.data_dir, args.port) as registry:
        registry.serve(f"schema_registry_url: {registry.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
