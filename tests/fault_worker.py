"""``python -m tests.fault_worker run``: the real worker with faults injected, for reliability tests.

FAULT_KILL_AT_COMMIT=N   SIGKILL itself at the N-th offset commit: after the batch's records are
                         published and acknowledged, before its offsets are committed.
FAULT_KILL_AT_SEND=N     SIGKILL itself at the N-th message handed to the producer: in the middle
                         of publishing a batch (the ones after it still in the engine or collected).
FAULT_SLOW_BATCH_S=S     the first batch spends S extra seconds in the engine (a hung batch).
FAULT_ENGINE_DELAY_S=S   every batch spends S extra seconds in the engine (so batches queue up).
FAULT_FREEZE_BROKER=PID:CLASS.METHOD:N:S   SIGSTOP the broker (process group PID) for S seconds
                         just before kafka-python's N-th call of CLASS.METHOD, a class of
                         kafka.producer.transaction_manager (``TransactionManager.begin_commit``,
                         ``TxnOffsetCommitHandler.__init__``...): the request it makes then reaches
                         a broker that carries it out only after its client has given up on it.

Before a SIGKILL it logs how many batches were in flight and at which stage.
"""

import os
import signal
import sys
import threading
import time

from kafka import KafkaConsumer, KafkaProducer
from kafka.producer import transaction_manager

from stream_worker.cli import main
from stream_worker.streaming import batch as pipeline
from stream_worker.streaming import worker as worker_module

kill_at_commit = int(os.environ.get("FAULT_KILL_AT_COMMIT", "0"))
kill_at_send = int(os.environ.get("FAULT_KILL_AT_SEND", "0"))
slow_seconds = float(os.environ.get("FAULT_SLOW_BATCH_S", "0"))
delay_seconds = float(os.environ.get("FAULT_ENGINE_DELAY_S", "0"))
counts = {"commit": 0, "send": 0, "batch": 0}
workers: list = []

real_init = worker_module.Worker.__init__


def init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    workers.append(self)


worker_module.Worker.__init__ = init


def kill_at(kind: str, limit: int) -> None:
    counts[kind] += 1
    if counts[kind] == limit:
        batches = workers[0].batches if workers else []
        stages = ["published" if b.sent is not None else "finished" if b.result is not None else
                  "in the engine" for b in batches]
        print(f"fault: SIGKILL at {kind} {limit} with {len(batches)} batches in flight: {', '.join(stages)}; "
              f"{len(workers[0].pending) if workers else 0} messages collected", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def kill_before(cls, name: str, kind: str, limit: int) -> None:
    """``cls.name`` SIGKILLs the process on its ``limit``-th call, before doing anything."""
    real = getattr(cls, name)

    def wrapped(self, *args, **kwargs):
        kill_at(kind, limit)
        return real(self, *args, **kwargs)

    setattr(cls, name, wrapped)


if kill_at_commit:
    kill_before(KafkaConsumer, "commit", "commit", kill_at_commit)
if kill_at_send:
    kill_before(KafkaProducer, "send", "send", kill_at_send)

freeze_broker = os.environ.get("FAULT_FREEZE_BROKER", "")
if freeze_broker:
    broker_group, call, at, seconds = freeze_broker.split(":")
    frozen_class, method = call.split(".")
    frozen_class = getattr(transaction_manager, frozen_class)
    real_call = getattr(frozen_class, method)

    def frozen_call(self, *args, **kwargs):
        counts[call] = counts.get(call, 0) + 1
        if counts[call] == int(at):
            print(f"fault: broker frozen for {seconds} s at {call} {at}", file=sys.stderr, flush=True)
            os.killpg(int(broker_group), signal.SIGSTOP)
            threading.Timer(float(seconds), os.killpg, (int(broker_group), signal.SIGCONT)).start()
        return real_call(self, *args, **kwargs)

    setattr(frozen_class, method, frozen_call)

if slow_seconds or delay_seconds:
    real_infer = pipeline.Pipeline.infer

    def infer(self, prepared):
        counts["batch"] += 1
        time.sleep(delay_seconds + (slow_seconds if counts["batch"] == 1 else 0))
        return real_infer(self, prepared)

    pipeline.Pipeline.infer = infer

sys.exit(main())
