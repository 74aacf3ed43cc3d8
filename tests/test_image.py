"""The container image: built from the real Dockerfile by ``scripts/build-image`` (buildah,
daemonless, where no Docker engine runs), then what it contains runs as its own user against the
real local broker the way Kubernetes runs it (k8s/base): read-only root filesystem, a writable
/tmp, settings from the environment, weights from a mounted directory.

Marked ``image`` and ``slow``: a cold build downloads torch's CUDA wheels (~3 GB; a rebuild
reuses buildah's layers). ``.ci/run`` runs it with the rest.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

import pytest

from devtools.quickstart import publish_apstar
from tests.container import WorkingContainer, inspect_image
from tests.helpers import DATA, DWARF_FILE, GIANT_FILE
from tests.streaming import REPO, Topics, committed_total, consume, records, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.image]

METRICS_PORT = 9108
"""The image's metrics port: its HEALTHCHECK asks this one, so the run test cannot move it."""


@pytest.fixture(scope="module")
def image():
    """Builds the image once per run; its key=value summary from scripts/build-image and its config."""
    if shutil.which("buildah") is None and shutil.which("apt-get") is None:
        pytest.skip("neither buildah nor apt-get (to install it) is on this machine")
    started = time.monotonic()
    # buildah even where a Docker engine runs: the tests run the image through buildah's storage.
    result = subprocess.run(["bash", str(REPO / "scripts" / "build-image"), "--engine", "buildah"],
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, f"scripts/build-image failed:\n{result.stderr[-6000:]}"
    facts = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    print(f"image {facts['image']}: built in {time.monotonic() - started:.0f} s, {facts['size']}")
    return facts, inspect_image(facts["image"])


@pytest.fixture
def container(image):
    container = WorkingContainer(image[1])
    yield container
    container.remove()


def test_image_runs_as_its_user_with_its_labels_and_nothing_from_the_build(image, container):
    facts, config = image
    package_version = version("stream-worker")
    assert config.user == "10001:10001"
    assert container.run(["id", "-u"]).stdout.strip() == "10001"
    labels = {k.removeprefix("org.opencontainers.image."): v for k, v in config.labels.items()}
    assert labels["title"] == "stream-worker" and labels["version"] == package_version
    assert labels["base.name"] == facts["base"] and labels["licenses"] == "BSD-3-Clause"
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert labels["revision"].removesuffix("-dirty") == revision
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", labels["created"])
    assert config.entrypoint == ["stream-worker"] and config.stop_signal == "SIGTERM"

    assert container.run(["stream-worker", "--version"]).stdout.strip() == f"stream-worker {package_version}"
    pip_check = container.run(["pip", "check"])
    assert pip_check.returncode == 0, pip_check.stdout + pip_check.stderr
    compilers = container.run(["sh", "-c", "for c in gcc cc c++ g++ clang make; do command -v $c; done; true"])
    assert compilers.stdout == "", f"compilers in the runtime image: {compilers.stdout}"

    # Read-only even for root, as readOnlyRootFilesystem makes it; /tmp is the writable place.
    probe = container.run(["sh", "-c", "touch /tmp/probe && touch /etc/probe"], user="0:0")
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr, probe.stderr

    root = container.rootfs
    leftovers = [p for p in ["src", "root/.cache", "tmp/.cache"] if (root / p).exists()]
    leftovers += [str(p.relative_to(root)) for p in (root / "opt" / "venv").rglob("*")
                  if p.name == ".cache" or p.suffix == ".whl"]
    assert leftovers == [], f"build leftovers in the runtime image: {leftovers}"
    assert not list((root / "opt/venv/lib/python3.11/site-packages/stream_worker/models").glob("*.pt")), \
        "weights are mounted, never baked into the image"
    size, unit = facts["size"].split()
    assert unit == "GB" and float(size) < 8, "the image grew by more than a stray copy of the CUDA wheels would explain"


def _metrics_port_is_free() -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", METRICS_PORT)) != 0


def _get(path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}{path}", timeout=2) as response:
            return response.status
    except OSError:
        return 0


def test_image_entrypoint_consumes_real_spectra_passes_its_healthcheck_and_drains(image, container, kafka_broker,
                                                                                   tmp_path):
    _, config = image
    assert _metrics_port_is_free(), f"port {METRICS_PORT} (the image's /healthz) is taken on this machine"
    topics = Topics().create(kafka_broker, partitions=3)
    models = tmp_path / "models"
    models.mkdir()
    for name in ("apogeenet-demo.pt", "apogeenet-demo.json"):
        shutil.copy(REPO / "stream_worker" / "models" / name, models / name)
    env = {  # as k8s/base sets them
        "STREAM_WORKER__KAFKA__BOOTSTRAP_SERVERS": f"[{kafka_broker.bootstrap}]",
        "STREAM_WORKER__KAFKA__INPUT_TOPICS": f"[{topics.input}]",
        "STREAM_WORKER__KAFKA__OUTPUT_TOPIC": topics.output,
        "STREAM_WORKER__KAFKA__DEAD_LETTER_TOPIC": topics.dead_letter,
        "STREAM_WORKER__KAFKA__GROUP_ID": topics.group,
        "STREAM_WORKER__ENGINE__WEIGHTS": "/models/apogeenet/apogeenet-demo.pt",
        "STREAM_WORKER__INPUTS__DATA_ROOTS": "[/data]",
    }
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        started = time.monotonic()
        worker = container.start(config.entrypoint + config.cmd, env=env, volumes={models: "/models/apogeenet", DATA: "/data"},
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            def ready() -> bool:
                assert worker.poll() is None, f"the worker exited with {worker.returncode}:\n{log_path.read_text()}"
                return _get("/readyz") == 200

            time_to_ready = wait_until(ready, 180, "the image's worker to be ready", interval=0.2)
            ids = publish_apstar(kafka_broker.bootstrap, topics.input, [GIANT_FILE, DWARF_FILE], worker_dir="/data")
            sent = time.monotonic()
            results = records(consume(kafka_broker.bootstrap, topics.output, len(ids), timeout=120))
            results_seconds = time.monotonic() - sent
            dead = consume(kafka_broker.bootstrap, topics.dead_letter, 1, timeout=30)

            healthcheck = config.healthcheck
            assert healthcheck[0] == "CMD", healthcheck
            health = container.run(healthcheck[1:], timeout=10)
            assert health.returncode == 0, health.stdout + health.stderr

            drain_started = time.monotonic()
            container.signal(worker)
            code = worker.wait(60)
            drain_seconds = time.monotonic() - drain_started
        finally:
            container.remove()  # stops the worker if the test failed before it exited
    text = log_path.read_text(errors="replace")
    assert code == 0, text[-4000:]
    assert sorted(r["spectrum_id"] for r in results) == sorted(ids)
    assert all(math.isfinite(r["teff"]) and r["model_name"] == "apogeenet-demo.pt" for r in results
               if r["teff"] is not None)
    assert len(dead) == 1 and dict(dead[0].headers)["dlq.reason"]
    assert committed_total(kafka_broker.bootstrap, topics.group, topics.input) == len(ids) + 1
    assert "Read-only file system" not in text and "Traceback" not in text, text[-4000:]
    first_line = json.loads(text.splitlines()[0])  # the image logs JSON lines, as Kubernetes collects them
    assert first_line["level"]
    print(f"image run: ready in {time_to_ready:.1f} s, "
          f"{len(ids) + 1} messages in, {len(results)} results + {len(dead)} dead letter out in "
          f"{results_seconds:.1f} s, drained and exited 0 in {drain_seconds:.1f} s")
