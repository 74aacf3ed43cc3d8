"""The pause a rebalance causes, through a real local broker: eager against cooperative.

``python -m bench.rebalance [--rounds 2] [--rate 100]``: spectra arrive at ``--rate`` a second on
8 partitions; worker A runs alone, then B joins (1 -> 2 workers), then C and D (2 -> 4). For
each growth, the **pause** of a partition is the worst latency (result arrival minus the input's
timestamp) of its results in the 15 s after the growth, minus the median latency before the
first growth: a partition kept by A all along (*kept*), and one that moved to a new worker
(*moved*). Rounds alternate the protocols; the section of ``BENCHMARKS.md`` is rewritten.
The trivial network at 0 draws, so the latency is the I/O path's and the pause stands out.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.kafka_e2e import TRIVIAL_SIZES, encoded, produce, receive
from bench.pipelining import update_benchmarks, value_range
from bench.run import machine
from devtools.kafka_broker import LocalKafka
from devtools.worker_process import WorkerProcess
from stream_worker.engine.network import ApogeeNet

REPO = Path(__file__).resolve().parent.parent
PROTOCOLS = ("eager", "cooperative")
PARTITIONS = 8
STEADY_S, GROWTH_S = 15.0, 15.0
BEGIN, END = "<!-- bench.rebalance: begin -->", "<!-- bench.rebalance: end -->"
_CALLBACK = re.compile(r"partitions (assigned|revoked): ")


def ownership(log_text: str) -> list[set[int]]:
    """The partitions a worker owned after each rebalance callback, from its log."""
    owned: set[int] = set()
    history = []
    for line in log_text.splitlines():
        found = _CALLBACK.search(line)
        if found:
            partitions = {int(p) for p in re.findall(r"-in\[(\d+)\]", line)}
            owned = owned | partitions if found.group(1) == "assigned" else owned - partitions
            history.append(set(owned))
    return history


def one_run(kafka: LocalKafka, tmp: Path, weights: Path, name: str, protocol: str, rate: float) -> dict:
    topics = {k: f"{name}-{k}" for k in ("in", "out", "dlq")}
    kafka.create_topic(topics["in"], PARTITIONS)
    kafka.create_topic(topics["out"], PARTITIONS)
    kafka.create_topic(topics["dlq"], 1)
    total_s = STEADY_S + 2 * GROWTH_S
    messages = encoded(int(rate * total_s), name)
    workers: list[WorkerProcess] = []

    def start(label: str) -> WorkerProcess:
        worker = WorkerProcess(tmp / f"{name}-{label}.log", cwd=REPO, kafka__bootstrap_servers=f"[{kafka.bootstrap}]",
                               kafka__input_topics=f"[{topics['in']}]", kafka__output_topic=topics["out"],
                               kafka__dead_letter_topic=topics["dlq"], kafka__group_id=name,
                               kafka__rebalance_protocol=protocol, kafka__session_timeout_ms=10000,
                               kafka__compression_type="null", engine__weights=weights, engine__num_draws=0,
                               batching__max_spectra=16, batching__max_wait_seconds=0.05, metrics__enabled="false")
        workers.append(worker)
        return worker

    try:
        first = start("a")
        received: list = []
        receiver = threading.Thread(target=lambda: received.extend(
            receive(kafka.bootstrap, topics["out"], len(messages), timeout=total_s + 120)))
        receiver.start()
        time.sleep(5)
        started = time.time()
        producer = threading.Thread(target=produce, args=(kafka.bootstrap, topics["in"], messages, rate))
        producer.start()
        growths = []
        time.sleep(STEADY_S)
        growths.append(time.time())
        start("b")
        time.sleep(GROWTH_S)
        growths.append(time.time())
        start("c"), start("d")
        producer.join()
        receiver.join()
        history = ownership(first.log_path.read_text())  # before it stops (and gives all back)
        if len(received) < len(messages):
            raise RuntimeError(f"only {len(received)} of {len(messages)} results\n"
                               + "\n".join(w.tail(20) for w in workers))
        arrivals = received
        for worker in workers:
            worker.terminate()
    finally:
        for worker in workers:
            worker.close()
    latencies = [(t, r["input_partition"], t - r["input_timestamp_ms"] / 1000) for t, r in arrivals]
    baseline = statistics.median(lat for t, _, lat in latencies if started + 3 < t < growths[0])
    owned = [partitions for partitions in history if partitions]  # eager: each join begins with none
    kept = owned[0] & owned[-1] if owned else set()
    result = {"protocol": protocol, "baseline_s": baseline, "results": len(arrivals), "inputs": len(messages),
              "kept": sorted(kept)}
    for label, at in zip(("1->2", "2->4"), growths):
        window = [(p, lat) for t, p, lat in latencies if at <= t < at + GROWTH_S]
        for kind, chosen in (("kept", lambda p: p in kept), ("moved", lambda p: p not in kept)):
            worst = [lat for p, lat in window if chosen(p)]
            result[f"{label} {kind}"] = (max(worst) - baseline) if worst else None
    return result


def measure(rounds: int, rate: float) -> list[dict]:
    runs = []
    with tempfile.TemporaryDirectory() as directory, LocalKafka(Path(directory) / "kafka") as kafka:
        tmp = Path(directory)
        weights = tmp / "trivial.pt"
        torch.save(ApogeeNet(**TRIVIAL_SIZES).state_dict(), weights)
        for round_ in range(rounds):
            for protocol in PROTOCOLS if round_ % 2 == 0 else PROTOCOLS[::-1]:
                print(f"round {round_ + 1} of {rounds}: {protocol} ...", file=sys.stderr)
                run = one_run(kafka, tmp, weights, f"r{round_}-{protocol}", protocol, rate)
                print(run, file=sys.stderr)
                runs.append(run)
    return runs


def section(runs: list[dict], rounds: int, rate: float) -> str:
    columns = ("1->2 kept", "1->2 moved", "2->4 kept", "2->4 moved")
    lines = [BEGIN, "## Rebalance pause: eager against cooperative (`python -m bench.rebalance`)", "",
             f"`python -m bench.rebalance --rounds {rounds} --rate {rate:g}` on {machine()}: {rate:g} spectra/s on "
             f"{PARTITIONS} partitions, worker A alone for {STEADY_S:.0f} s, then B joins (1 -> 2), "
             f"{GROWTH_S:.0f} s later C and D (2 -> 4). Pause = the worst latency of a partition's results in the "
             f"{GROWTH_S:.0f} s after a growth minus the median latency before it (range over rounds, seconds); "
             "*kept*: partitions A owned before and after (under eager every join takes them away and gives them back), *moved*: the others. Trivial network, 0 draws; "
             "`kafka.session_timeout_ms` 10000.", "",
             "| protocol | median latency before | " + " | ".join(columns) + " | results / inputs |",
             "|---|---|" + "---|" * len(columns) + "---|"]
    for protocol in PROTOCOLS:
        mine = [r for r in runs if r["protocol"] == protocol]
        cells = [value_range(measured, 2) if (measured := [r[c] for r in mine if r[c] is not None]) else "–"
                 for c in columns]
        counts = ", ".join(f"{r['results']} / {r['inputs']}" for r in mine)
        lines.append(f"| {protocol} | {value_range([r['baseline_s'] for r in mine], 3)} | " + " | ".join(cells)
                     + f" | {counts} |")
    return "\n".join(lines + [END]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    args = parser.parse_args()
    update_benchmarks(args.output, section(measure(args.rounds, args.rate), args.rounds, args.rate))


if __name__ == "__main__":
    main()
