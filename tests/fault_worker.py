"""``python -m tests.fault_worker run``: the real worker with faults injected, for reliability tests.

FAULT_KILL_AT_COMMIT=N   SIGKILL itself at the N-th offset commit: after the batch's records are
                         published and acknowledged, before its offsets are committed.
FAULT_SLOW_BATCH_S=S     the first batch spends S extra seconds in the engine (a hung batch).
"""

import os
import signal
import sys
import time

from kafka import KafkaConsumer

from stream_worker.cli import main
from stream_worker.streaming import batch as pipeline

kill_at = int(os.environ.get("FAULT_KILL_AT_COMMIT", "0"))
slow_seconds = float(os.environ.get("FAULT_SLOW_BATCH_S", "0"))
commits = 0
batches = 0

if kill_at:
    real_commit = KafkaConsumer.commit

    def commit(self, *args, **kwargs):
        global commits
        commits += 1
        if commits == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_commit(self, *args, **kwargs)

    KafkaConsumer.commit = commit

if slow_seconds:
    real_run = pipeline.Pipeline.run

    def run(self, messages):
        global batches
        batches += 1
        if batches == 1:
            time.sleep(slow_seconds)
        return real_run(self, messages)

    pipeline.Pipeline.run = run

sys.exit(main())
