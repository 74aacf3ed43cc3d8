"""A node of a 3-node Kafka cluster dies under a running worker: what is lost, what is duplicated,
how long results stall, and what the probes said.

``python -m bench.failover [--rounds 2] [--spectra 400] [--rate 20]``: a real 3-node KRaft cluster
on loopback (topics with replication factor 3 and ``min.insync.replicas`` 2, as in production),
one worker (2 batches in flight), spectra arriving at ``--rate`` a second. Some seconds in, the
node that is the **leader** of an input partition, the active **controller**, or the group
(at-least-once) / transaction (exactly-once) **coordinator** is SIGKILLed and restarted on its
data directory ``--down`` seconds later. Per run: inputs, results (read_committed for
exactly-once), missing, duplicates, dead letters, the **stall** (the longest time without a new
result from the kill on) and the probes' transitions. Rounds interleave the scenarios; the section
of ``BENCHMARKS.md`` is rewritten. The failover tests (``tests/test_failover.py``) run the same
:func:`run` smaller and assert on it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaConsumer

from bench.pipelining import update_benchmarks, value_range
from bench.run import machine
from devtools.kafka_broker import LocalKafkaCluster
from tests.streaming import Topics, consume, produce_spectra, small_weights, small_worker

REPO = Path(__file__).resolve().parent.parent
DELIVERIES = ("at_least_once", "exactly_once")
TARGETS = ("leader", "controller", "coordinator")
BEGIN, END = "<!-- bench.failover: begin -->", "<!-- bench.failover: end -->"


@dataclass
class Outcome:
    delivery: str
    target: str
    roles: list[str]  # what the killed node was
    inputs: int
    outputs: int
    missing: int
    duplicates: int
    dead_letters: int
    stall_s: float
    back_s: float  # when the killed node was started again, after the kill
    transitions: list[str] = field(default_factory=list)
    worker_exit: int | None = None  # None: still running after the run, as it should be
    settings: dict = field(default_factory=dict)  # worker settings other than the defaults

    @property
    def run_as(self) -> str:
        """The delivery mode, and any setting changed from the defaults."""
        return self.delivery + "".join(f", {key.replace('__', '.')} {value}" for key, value in self.settings.items())

    def row(self) -> str:
        return (f"| {self.run_as} | {self.target} ({', '.join(self.roles)}) | {self.inputs} | {self.outputs} | "
                f"{self.missing} | {self.duplicates} | {self.dead_letters} | {self.stall_s:.1f} | "
                f"{'; '.join(self.transitions) or 'always 200'} |")


class Arrivals(threading.Thread):
    """Every result of the output topic from the start, with its arrival time (monotonic)."""

    def __init__(self, bootstrap: str, topic: str, read_committed: bool) -> None:
        super().__init__(daemon=True)
        self.consumer = KafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
            group_id=None, isolation_level="read_committed" if read_committed else "read_uncommitted")
        self.seen: list[tuple[float, str]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for batch in self.consumer.poll(timeout_ms=100).values():
                now = time.monotonic()
                self.seen += [(now, message.key.decode()) for message in batch]
        self.consumer.close()

    def wait_for(self, ids: set[str], timeout: float, settle: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while not ids <= {key for _, key in self.seen} and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(settle)  # late duplicates
        self.done.set()
        self.join(10)



def longest_gap(arrivals: list[float], moment: float) -> float:
    """The stall: the longest time without a new result from ``moment`` to the last result
    (infinite when none came after it)."""
    times = [moment] + sorted(t for t in arrivals if t > moment)
    return max(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else float("inf")


class ProbeWatch(threading.Thread):
    """Polls the worker's /readyz and /healthz and keeps each change of status, timed from ``origin``."""

    def __init__(self, worker, origin: float, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.worker, self.origin, self.interval = worker, origin, interval
        self.status = {"/readyz": 200, "/healthz": 200}
        self.transitions: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            for path, before in self.status.items():
                try:
                    status, why = self.worker.get(path)
                except OSError as exc:
                    status, why = 0, str(exc)
                if status != before:
                    self.status[path] = status
                    detail = f" ({why.strip()[:60]})" if status != 200 else ""
                    self.transitions.append(f"{path[1:]} {status} at {time.monotonic() - self.origin:+.0f} s{detail}")


def roles(cluster: LocalKafkaCluster, topics: Topics, delivery: str, transactional_id: str) -> dict[str, int]:
    """The node of each role a failover can hit: the leader of input partition 0, the active
    controller, and the coordinators the worker uses."""
    found = {"input leader": cluster.leader(topics.input, 0), "controller": cluster.controller(),
             "group coordinator": cluster.group_coordinator(topics.group)}
    if delivery == "exactly_once":
        found["transaction coordinator"] = cluster.transaction_coordinator(transactional_id)
    return found


def target_role(target: str, delivery: str) -> str:
    if target == "coordinator":
        return "transaction coordinator" if delivery == "exactly_once" else "group coordinator"
    return {"leader": "input leader", "controller": "controller"}[target]


def run(cluster: LocalKafkaCluster, work_dir: Path, weights: Path, delivery: str, target: str, spectra: int = 300,
        rate: float = 20.0, kill_after_s: float = 5.0, down_s: float = 15.0, timeout_s: float = 240.0,
        **settings) -> Outcome:
    """One failover: ``spectra`` arrive at ``rate`` a second; ``kill_after_s`` in, the ``target``
    node is killed, and started again ``down_s`` later. ``settings``: more worker settings."""
    topics = Topics().create(cluster)
    transactional_id = f"{topics.group}-tx"
    exactly_once = delivery == "exactly_once"
    worker = small_worker(cluster.bootstrap, topics, weights, work_dir / f"{target}-{delivery}-{topics.group}.log",
                          kafka__delivery=delivery, kafka__transactional_id=transactional_id,
                          batching__max_spectra=8, **settings)
    try:
        worker.wait_ready(120)
        arrivals = Arrivals(cluster.bootstrap, topics.output, read_committed=exactly_once)
        arrivals.start()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            producing = pool.submit(produce_spectra, cluster.bootstrap, topics.input, spectra,
                                    f"fo-{uuid.uuid4().hex[:6]}", per_second=rate)
            time.sleep(kill_after_s)
            found = roles(cluster, topics, delivery, transactional_id)
            node = found[target_role(target, delivery)]
            held = [f"node {node}", *(role for role, holder in found.items() if holder == node)]
            killed = time.monotonic()
            probes = ProbeWatch(worker, killed)
            probes.start()
            cluster.kill(node)
            time.sleep(down_s)
            cluster.start_node(node)
            back_s = time.monotonic() - killed
            ids = producing.result(timeout_s)
        arrivals.wait_for(set(ids), timeout_s)
        probes.done.set()
        probes.join(5)
        results = Counter(key for _, key in arrivals.seen)
        dead_letters = len(consume(cluster.bootstrap, topics.dead_letter, 0, timeout=10, settle=2))
        worker_exit = worker.process.poll()
        if worker_exit is None:
            try:
                worker.terminate(timeout=120)  # a drain may wait out a commit timeout and the grace period
            except subprocess.TimeoutExpired:
                probes.transitions.append("no exit 120 s after SIGTERM (killed)")
        return Outcome(delivery, target, held, len(ids), sum(results.values()), len(set(ids) - set(results)),
                       sum(results.values()) - len(results), dead_letters, longest_gap([t for t, _ in arrivals.seen], killed), back_s,
                       probes.transitions, worker_exit, settings)
    finally:
        worker.close()


BEFORE = {"worker__commit_timeout_seconds": 60}
"""The commit timeout before it was a setting: a transactional producer that lost its coordinator
sent nothing until it broke the wait."""


def section(outcomes: list[Outcome], rounds: int, spectra: int, rate: float, down_s: float) -> str:
    stalls: dict[tuple[str, str], list[float]] = {}
    for outcome in outcomes:
        stalls.setdefault((outcome.run_as, outcome.target), []).append(outcome.stall_s)
    lines = [
        BEGIN,
        "## Failover: a node of a 3-node cluster killed under the worker (`python -m bench.failover`)",
        "",
        f"{machine()}. {spectra} spectra at {rate:g}/s per run, RF 3 / min ISR 2, one worker (2 batches in "
        f"flight, defaults otherwise); SIGKILL 5 s in, the node restarted {down_s:g} s later; {rounds} rounds "
        "interleaved. *Stall*: the longest time without a new result from the kill on (read_committed for "
        "exactly-once). The last run of each round is the old commit timeout (60 s) for comparison.",
        "",
        "| delivery | killed (its roles) | inputs | results | missing | duplicates | dead letters | stall s | probes |",
        "|---|---|---|---|---|---|---|---|---|",
        *(outcome.row() for outcome in outcomes),
        "",
        "| delivery | killed | stall s (range) |",
        "|---|---|---|",
        *(f"| {delivery} | {target} | {value_range(values, 1)} |" for (delivery, target), values in stalls.items()),
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--spectra", type=int, default=400)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--down", type=float, default=15.0)
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    args = parser.parse_args()
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp, LocalKafkaCluster(Path(tmp) / "cluster") as cluster:
        weights = small_weights(Path(tmp))
        for _ in range(args.rounds):
            for target in TARGETS:
                for delivery in DELIVERIES:
                    cluster.wait_in_sync()
                    outcomes.append(run(cluster, Path(tmp), weights, delivery, target, args.spectra, args.rate,
                                        down_s=args.down))
                    print(outcomes[-1].row(), flush=True)
            cluster.wait_in_sync()
            outcomes.append(run(cluster, Path(tmp), weights, "exactly_once", "coordinator", args.spectra, args.rate,
                                down_s=args.down, **BEFORE))
            print(outcomes[-1].row(), flush=True)
    update_benchmarks(args.output, section(outcomes, args.rounds, args.spectra, args.rate, args.down))


if __name__ == "__main__":
    main()
