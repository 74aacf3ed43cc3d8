"""End to end through a real local broker: sustained throughput and latency of a worker process,
against the engine alone and against the I/O path alone (a trivial model).

``python -m bench.kafka_e2e --spectra N [--precision exact|fast] [--draws 20]`` prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from kafka import KafkaConsumer, KafkaProducer

from bench.engine import real_spectra
from devtools.kafka_broker import LocalKafka
from devtools.samples import consumed
from devtools.worker_process import WorkerProcess
from stream_worker.core.spectrum import Spectrum
from stream_worker.engine.estimator import Estimator
from stream_worker.engine.network import ApogeeNet
from stream_worker.engine.weights import load_model, random_model
from stream_worker.io.files import FileReader
from stream_worker.io.wire import encode_inline
from stream_worker.streaming.batch import Pipeline

REPO = Path(__file__).resolve().parent.parent
TRIVIAL_SIZES = dict(channels=(1, 1), kernel_size=2, pooled_length=1, linear_width=1, linear_layers=0)


def encoded(n: int, prefix: str) -> list[tuple[bytes, bytes]]:
    flux, ivar, ids = real_spectra(n)
    return [(f"{prefix}-{i}".encode(), encode_inline(Spectrum(f"{prefix}-{i}", flux[i], ivar[i])))
            for i in range(n)]


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], per_second: float | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, compression_type=None,
                             max_request_size=4_194_304)
    started = time.monotonic()
    for i, (key, value) in enumerate(messages):
        if per_second:
            time.sleep(max(0.0, started + i / per_second - time.monotonic()))
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def receive(bootstrap: str, topic: str, count: int, timeout: float,
            on_arrivals=lambda count: None) -> list[tuple[float, dict]]:
    """(arrival time, record) for ``count`` records; latency is arrival minus the input's timestamp.
    ``on_arrivals(n)`` is called as the records come in (n so far)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    arrivals, deadline = [], time.monotonic() + timeout
    while len(arrivals) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=50).values():
            now = time.time()
            arrivals += [(now, json.loads(m.value)) for m in batch]
            on_arrivals(len(arrivals))
    consumer.close()
    if len(arrivals) < count:
        raise RuntimeError(f"only {len(arrivals)} of {count} records within {timeout} s")
    return arrivals


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_worker_phase(kafka: LocalKafka, tmp: Path, name: str, weights: Path | None, n: int, paced: float | None,
                     batch: int, module: str = "stream_worker", extra_env: dict | None = None, **settings) -> dict:
    """Backlog (``paced`` None): all ``n`` messages wait in the topic before the worker starts;
    the sustained rate is counted after the first batch of ``batch`` results (its warm-up and
    wait for the group are not throughput): (n - batch) over the time from that batch's last
    result to the last result, and so is the worker process's CPU time per spectrum. Paced:
    messages arrive at ``paced`` per second while it runs; the latencies are what matters."""
    topics = {k: f"{name}-{k}" for k in ("in", "out", "dlq")}
    kafka.create_topic(topics["in"], 4)
    kafka.create_topic(topics["out"], 4)
    kafka.create_topic(topics["dlq"], 1)
    messages = encoded(n, name)
    if paced is None:
        produce(kafka.bootstrap, topics["in"], messages)
    engine = {"engine__weights": weights} if weights else {"engine__allow_random_weights": "true"}
    worker = WorkerProcess(tmp / f"{name}.log", cwd=REPO, module=module, extra_env=extra_env,
                           kafka__bootstrap_servers=f"[{kafka.bootstrap}]",
                           kafka__input_topics=f"[{topics['in']}]", kafka__output_topic=topics["out"],
                           kafka__dead_letter_topic=topics["dlq"], kafka__group_id=name,
                           kafka__compression_type="null", batching__max_spectra=batch, **engine, **settings)
    try:
        worker.wait_ready(120)
        started = time.time()
        if paced is not None:
            produce(kafka.bootstrap, topics["in"], messages, per_second=paced)
        cpu: list[float] = []

        def sample_cpu(count: int) -> None:
            if (count >= batch and not cpu) or (count >= n and len(cpu) == 1):
                cpu.append(cpu_seconds(worker.process.pid))

        arrivals = receive(kafka.bootstrap, topics["out"], n, timeout=1800, on_arrivals=sample_cpu)
        assert worker.terminate() == 0
    finally:
        worker.close()
    latencies = sorted(t - r["input_timestamp_ms"] / 1000 for t, r in arrivals)
    times = sorted(t for t, _ in arrivals)
    rate = (n - batch) / (times[-1] - times[batch - 1]) if n >= 2 * batch else n / (times[-1] - started)
    counted = n - sum(1 for t, _ in arrivals if t <= times[batch - 1])
    cpu_ms = 1000 * (cpu[1] - cpu[0]) / counted if len(cpu) == 2 and counted > 0 else None
    return {"spectra": n, "spectra_per_s": rate, "offered_per_s": paced, "engine_share": engine_share(arrivals),
            "cpu_ms_per_spectrum": cpu_ms,
            "latency_p50_s": statistics.median(latencies), "latency_p99_s": latencies[int(0.99 * (n - 1))]}


def engine_share(arrivals: list[tuple[float, dict]]) -> float | None:
    """The share of the worker's time its engine computed, from the records alone: the spectra of one
    engine chunk share one ``inference_seconds`` (the chunk's seconds per spectrum), and from the first
    chunk's results to the last's the worker spent the later chunks' engine time plus its overheads
    (Kafka, decoding, records). Unlike a comparison with a separate engine-alone run, this does not
    depend on the machine running at the same speed in both."""
    chunks: dict[float, list[float]] = {}
    for arrived, record in arrivals:
        chunks.setdefault(record["inference_seconds"], []).append(arrived)
    ordered = sorted((min(times), seconds * len(times)) for seconds, times in chunks.items())
    if len(ordered) < 2:
        return None
    return sum(engine for _, engine in ordered[1:]) / (ordered[-1][0] - ordered[0][0])


def engine_alone(weights: Path | None, n: int, **settings) -> float:
    model = load_model(weights, device="cpu") if weights else random_model(device="cpu")
    estimator = Estimator(model, **settings)
    flux, ivar, ids = real_spectra(n)
    estimator.estimate(flux[:2], ivar[:2], ids[:2])
    started = time.perf_counter()
    estimator.estimate(flux, ivar, ids)
    return n / (time.perf_counter() - started)


def pipeline_alone(trivial: Path, n: int, batch: int = 256) -> float:
    """The worker's per-message work without Kafka (decode, validate, preprocess, the trivial
    network, records, JSON): what the I/O path would reach if the Kafka clients cost nothing."""
    now = int(time.time() * 1000)
    messages = [consumed(value, key=key, offset=i, topic="in", timestamp=now)
                for i, (key, value) in enumerate(encoded(n, "alone"))]
    pipeline = Pipeline(Estimator(load_model(trivial, device="cpu"), num_draws=0), FileReader([]), "out", "dlq",
                        4_194_304)
    pipeline.run(messages[:batch])
    started = time.perf_counter()
    for start in range(0, n, batch):
        pipeline.run(messages[start:start + batch])
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spectra", type=int, default=256, help="backlog: four batches of 64 by default")
    parser.add_argument("--io-spectra", type=int, default=3000)
    parser.add_argument("--precision", default="exact")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--weights", default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as directory, LocalKafka(Path(directory) / "kafka") as kafka:
        tmp = Path(directory)
        trivial = tmp / "trivial.pt"
        torch.save(ApogeeNet(**TRIVIAL_SIZES).state_dict(), trivial)
        results["io_path"] = run_worker_phase(kafka, tmp, "io", trivial, args.io_spectra, None, 256,
                                              engine__num_draws=0)
        results["io_pipeline_alone_per_s"] = pipeline_alone(trivial, min(args.io_spectra, 2048))
        engine = dict(engine__num_draws=args.draws, engine__precision=args.precision)
        # the engine alone right before and right after the worker, on as many spectra: this machine's
        # speed drifts over minutes, and the mean of the two brackets the worker's conditions
        alone = [engine_alone(args.weights, args.spectra, num_draws=args.draws, precision=args.precision)]
        results["backlog"] = run_worker_phase(kafka, tmp, "backlog", args.weights, args.spectra, None, 64, **engine)
        alone.append(engine_alone(args.weights, args.spectra, num_draws=args.draws, precision=args.precision))
        results["engine_alone_runs_per_s"] = alone
        results["engine_alone_per_s"] = statistics.mean(alone)
        paced = 0.5 * results["backlog"]["spectra_per_s"]
        results["paced"] = run_worker_phase(kafka, tmp, "paced", args.weights, max(12, args.spectra // 4), paced,
                                            64, **engine)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
