"""A real Prometheus server (the Debian ``prometheus`` binary) scraping the stream worker.

Tests check the worker's metrics the way an operator would see them: scraped, stored and
queried with PromQL, alerting/recording rules included, rather than by parsing /metrics text.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from devtools.kafka_broker import LocalService, ServiceError, ServiceProcess, free_ports, log_tail

log = logging.getLogger(__name__)

JOB_NAME = "stream-worker"


def prometheus_binary() -> str:
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not os.access(binary, os.X_OK):
        raise ServiceError("the prometheus binary is missing: run scripts/install-services")
    return binary


class LocalPrometheus(LocalService):
    """Prometheus on 127.0.0.1 scraping ``scrape_targets`` (host:port) as job ``stream-worker``.

    Scrapes and rule evaluations run every second by default so tests see new values quickly.
    Even so, the first sample appears about 5 s after start: Prometheus 2.42 throttles target
    discovery updates to one per 5 s and has no flag to change that, so give wait_for() a margin.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        scrape_targets: Sequence[str],
        port: int | None = None,
        scrape_interval: str = "1s",
        rule_files: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.scrape_targets = list(scrape_targets)
        self.port = port or free_ports(1)[0]
        self.scrape_interval = scrape_interval
        self.rule_files = [Path(path).resolve() for path in rule_files]
        self.config_path = self.data_dir / "prometheus.yml"
        self._process = ServiceProcess("prometheus", self.data_dir / "prometheus.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalPrometheus:
        binary = prometheus_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._process.start(
            [binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            cwd=self.data_dir,
        )
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        """Block until /-/ready answers 200 (config loaded, TSDB open)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self._process.running:
                raise self._error(f"prometheus exited (code {self._process.returncode})")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        log.info("prometheus ready at %s", self.url)
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise self._error(f"{self.url}/-/ready not OK after {timeout:.0f}s")
            time.sleep(0.1)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Evaluate an instant query; return the API's ``data.result`` list."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # bad queries come back as 400 with a JSON error body
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 30,
        interval: float = 0.5,
    ) -> list[dict[str, Any]]:
        """Poll ``query(promql)`` until ``predicate(result)`` holds; return that result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{promql!r} did not satisfy the predicate within {timeout:.0f}s; last result: {result}")
            time.sleep(interval)

    def _write_config(self) -> None:
        config: dict[str, Any] = {
            "global": {
                "scrape_interval": self.scrape_interval,
                # The default 10s timeout would exceed a 1s interval, which Prometheus rejects.
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": "1s",
            },
            "scrape_configs": [{"job_name": JOB_NAME, "static_configs": [{"targets": self.scrape_targets}]}],
        }
        if self.rule_files:
            config["rule_files"] = [str(path) for path in self.rule_files]
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def _error(self, message: str) -> ServiceError:
        return ServiceError(f"{message}\n{log_tail(self._process.log_path)}")
