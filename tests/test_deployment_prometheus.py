"""The dashboard's and the alert rules' PromQL against a real Prometheus scraping a real worker.

A ``stream-worker run`` subprocess (a small model, real Kafka broker from the fixtures) processes
real apStar spectra sent by ``stream-worker produce`` plus a few undecodable messages; a real
Prometheus scrapes it as job "stream-worker" and loads k8s/prometheus/stream-worker-rules.yml.
Then every dashboard query (Grafana variables substituted), every variable query and every rule
expression must evaluate without error, the core panels must show data, and every rule must
evaluate healthy. The worker must drain and exit 0 on SIGTERM.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path

import pytest
import yaml
from kafka import KafkaProducer

from devtools.kafka_broker import free_ports
from tests.services import unique_topic
from tests.test_deployment import RULES_FILE, all_promql, dashboard_targets, grafana_to_promql

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
SPECTRA_FILES = sorted(DATA.glob("apStar-*.fits"))
SPECTRA_PER_PRODUCE = 6  # the files' coadds and visits (--visits)
GARBAGE = [b"garbage", b"\x00\x01 not a spectrum", b'{"schema_version": 1']
# Panels an operator reads first: each of their queries must return data.
CORE_PANELS = ("Throughput", "End-to-end latency", "Consumer lag per partition", "Result flags by bit",
               "Dead letters by reason", "Workers (scraped pods)", "Results / s")


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def wait_until(condition, timeout: float, what: str, worker: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if worker.poll() is not None:
            pytest.fail(f"the worker exited ({worker.returncode}) while waiting for {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f}s; worker log:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def values(result: list[dict]) -> list[float]:
    return [float(item["value"][1]) for item in result]


@pytest.fixture
def small_weights(tmp_path: Path, tiny_model) -> Path:
    import torch

    path = tmp_path / "small-weights.pt"
    torch.save(tiny_model.state_dict(), path)
    return path


def test_dashboard_and_rule_queries_on_a_real_worker(kafka_broker, prometheus_factory, small_weights, tmp_path):
    if not (shutil.which("prometheus") or os.access("/usr/bin/prometheus", os.X_OK)):
        pytest.skip("the prometheus binary is missing: run scripts/install-services")
    topic, results, dead = unique_topic("deploy-in"), unique_topic("deploy-out"), unique_topic("deploy-dlq")
    kafka_broker.create_topic(topic, 3)
    kafka_broker.create_topic(results, 1)
    kafka_broker.create_topic(dead, 1)
    (port,) = free_ports(1)
    env = {
        **os.environ,
        "STREAM_WORKER__KAFKA__BOOTSTRAP_SERVERS": f"[{kafka_broker.bootstrap}]",
        "STREAM_WORKER__KAFKA__INPUT_TOPICS": f"[{topic}]",
        "STREAM_WORKER__KAFKA__OUTPUT_TOPIC": results,
        "STREAM_WORKER__KAFKA__DEAD_LETTER_TOPIC": dead,
        "STREAM_WORKER__KAFKA__GROUP_ID": unique_topic("deploy-group"),
        "STREAM_WORKER__METRICS__HOST": "127.0.0.1",
        "STREAM_WORKER__METRICS__PORT": str(port),
        "STREAM_WORKER__ENGINE__WEIGHTS": str(small_weights),
        "STREAM_WORKER__ENGINE__NUM_DRAWS": "4",
        "STREAM_WORKER__ENGINE__DEVICE": "cpu",
        "STREAM_WORKER__ENGINE__NUM_THREADS": "1",
        "STREAM_WORKER__INPUTS__DATA_ROOTS": f"[{DATA}]",
        "STREAM_WORKER__BATCHING__MAX_WAIT_SECONDS": "0.2",
        "STREAM_WORKER__LOGGING__FORMAT": "text",
    }
    log = tmp_path / "worker.log"
    with open(log, "wb") as log_file:
        worker = subprocess.Popen([sys.executable, "-m", "stream_worker", "run"], cwd=REPO, env=env,
                                  stdout=log_file, stderr=subprocess.STDOUT)
    try:
        # Prometheus starts while the worker loads; it finds its target only ~5 s after start.
        prometheus = prometheus_factory([f"127.0.0.1:{port}"], rule_files=[RULES_FILE])
        wait_until(lambda: http_status(f"http://127.0.0.1:{port}/readyz") == 200, 90, "/readyz 200", worker, log)
        assert http_status(f"http://127.0.0.1:{port}/healthz") == 200
        prometheus.wait_for('stream_worker_ready{job="stream-worker"} == 1', bool, timeout=30)

        # Real spectra, twice (two bursts, several batches), and messages that must be dead-lettered.
        for _ in range(2):
            subprocess.run([sys.executable, "-m", "stream_worker", "produce", *map(str, SPECTRA_FILES), "--visits",
                            "--topic", topic, "--bootstrap", kafka_broker.bootstrap],
                           cwd=REPO, env=env, check=True, capture_output=True, timeout=60)
        with closing(KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")) as producer:
            for value in GARBAGE:
                producer.send(topic, value)
            producer.flush()

        expected = 2 * SPECTRA_PER_PRODUCE
        prometheus.wait_for(f'sum(stream_worker_records_published_total{{job="stream-worker"}}) >= {expected}',
                            bool, timeout=60)
        prometheus.wait_for(f'sum(stream_worker_dead_letters_total{{job="stream-worker"}}) >= {len(GARBAGE)}',
                            bool, timeout=30)
        # Rates need a sample after the last increase; the latency quantile then has a value.
        latency = grafana_to_promql(next(t["expr"] for title, t in dashboard_targets()
                                         if title == "End-to-end latency" and t["legendFormat"] == "p95"))
        prometheus.wait_for(latency, lambda r: bool(r) and all(math.isfinite(v) for v in values(r)), timeout=30)
        prometheus.wait_for('sum(stream_worker_consumer_lag{job="stream-worker"})', bool, timeout=30)

        # 1. Every expression evaluates.
        failures = []
        for where, promql in all_promql():
            try:
                prometheus.query(promql)
            except RuntimeError as exc:
                failures.append(f"{where}: {exc}")
        assert not failures, "\n".join(failures)

        # 2. The core panels show data.
        for title, target in dashboard_targets():
            if title in CORE_PANELS:
                result = prometheus.query(grafana_to_promql(target["expr"]))
                assert result, f"panel {title!r} query {target['refId']} returned nothing: {target['expr']}"
                if title == "End-to-end latency":
                    assert all(math.isfinite(v) and v >= 0 for v in values(result)), (title, result)
        by_reason = {item["metric"].get("reason"): float(item["value"][1]) for item in prometheus.query(
            'sum by (reason) (stream_worker_dead_letters_total{job="stream-worker"})')}
        assert by_reason.get("decode_error", 0) >= 1, by_reason
        lag = prometheus.query('sum by (topic, partition) (stream_worker_consumer_lag{job="stream-worker"})')
        assert {item["metric"]["topic"] for item in lag} == {topic}
        assert {item["metric"]["partition"] for item in lag} == {"0", "1", "2"}
        assert values(prometheus.query('count(stream_worker_ready{job="stream-worker"})')) == [1.0]

        # 3. The rules, loaded by Prometheus, evaluate without error.
        def rule_states():
            with urllib.request.urlopen(f"{prometheus.url}/api/v1/rules", timeout=10) as response:
                return [r for g in json.load(response)["data"]["groups"] for r in g["rules"]]

        prometheus_rules = rule_states()
        assert {r["name"] for r in prometheus_rules} == {
            r["alert"] for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"]}
        deadline = time.monotonic() + 10
        while any(r["lastEvaluation"].startswith("0001") for r in prometheus_rules) and time.monotonic() < deadline:
            time.sleep(0.5)
            prometheus_rules = rule_states()
        assert all(r["health"] == "ok" for r in prometheus_rules), [
            (r["name"], r["health"], r.get("lastError")) for r in prometheus_rules if r["health"] != "ok"]
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        try:
            returncode = worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
            pytest.fail(f"the worker did not stop within 60 s of SIGTERM:\n{log.read_text()[-4000:]}")
    assert returncode == 0, f"worker exit code {returncode}:\n{log.read_text()[-4000:]}"
