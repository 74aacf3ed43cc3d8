"""``stream-worker sink`` processes against the real broker and the real PostgreSQL server:
every result stored once, through SIGKILLs, a database outage and a database that stops
answering; bad records dead-lettered."""

from __future__ import annotations

import random
import time

import pytest
from kafka import KafkaProducer

from devtools.kafka_broker import local_topic_config
from devtools.postgres_server import LocalPostgres
from devtools.worker_process import WorkerProcess
from stream_worker.sink.loop import POLL_TIMEOUT_MS
from tests.results import WEIGHTS_B, encoded, later, result_record
from tests.services import unique_topic
from tests.streaming import REPO, consume, committed_total, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class SinkSetup:
    """A results topic (3 partitions), a dead-letter topic, a schema and a group for one test."""

    def __init__(self, broker, postgres, tmp_path) -> None:
        self.broker, self.postgres, self.tmp_path = broker, postgres, tmp_path
        self.results, self.dead_letters = unique_topic("results"), unique_topic("dlq")
        self.group, self.schema = unique_topic("sink"), unique_topic("sink").replace("-", "_")
        broker.create_topic(self.results, 3, local_topic_config("output"))
        broker.create_topic(self.dead_letters, 1, local_topic_config("dead_letter"))
        self.sinks: list[WorkerProcess] = []

    def start(self, **settings) -> WorkerProcess:
        values = {
            "kafka__bootstrap_servers": f"[{self.broker.bootstrap}]", "kafka__output_topic": self.results,
            "kafka__dead_letter_topic": self.dead_letters, "kafka__session_timeout_ms": 6000,
            "sink__database": self.postgres.conninfo, "sink__db_schema": self.schema, "sink__group_id": self.group,
            "sink__max_rows": 50, "sink__retry_max_seconds": 2, **settings,
        }
        sink = WorkerProcess(self.tmp_path / f"sink{len(self.sinks)}.log", cwd=REPO, command="sink",
                             extra_env={"STREAM_WORKER_SINK_PASSWORD": self.postgres.password}, **values)
        self.sinks.append(sink)
        return sink

    def produce(self, messages: list[tuple[bytes | None, bytes | None]]) -> None:
        producer = KafkaProducer(bootstrap_servers=self.broker.bootstrap, acks="all", linger_ms=20)
        for key, value in messages:
            producer.send(self.results, key=key, value=value)
        producer.flush()
        producer.close()

    def produce_records(self, records: list[dict]) -> None:
        self.produce([(r["spectrum_id"].encode(), encoded(r)) for r in records])

    def query(self, text: str, *args):
        with self.postgres.connect() as connection:
            return connection.execute(text.replace("{schema}", self.schema), args).fetchall()

    def rows(self) -> int:
        try:
            return self.query("SELECT count(*) FROM {schema}.results")[0][0]
        except Exception:  # the sink has not created its tables yet
            return 0

    def stored_offsets(self) -> int:
        return int(self.query("SELECT coalesce(sum(next_offset), 0) FROM {schema}.sink_offsets WHERE group_id = %s",
                              self.group)[0][0])

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


@pytest.fixture
def setup(kafka_broker, postgres_server, tmp_path):
    prepared = SinkSetup(kafka_broker, postgres_server, tmp_path)
    yield prepared
    prepared.close()


def test_results_become_rows_bad_records_dead_letters_and_a_reprocessed_spectrum_replaces_its_row(setup):
    records = [result_record(f"star-{i:04d}") for i in range(300)]
    setup.produce_records(records[:150])
    setup.produce([(b"bad-json", b"{not json"), (b"star-x", encoded(result_record("star-y"))),
                   (b"bad-teff", encoded(result_record("bad-teff", teff="hot")))])
    setup.produce_records(records[150:])
    sink = setup.start()
    sink.wait_ready()
    wait_until(lambda: setup.rows() == 300, 60, "300 rows")
    dead = consume(setup.broker.bootstrap, setup.dead_letters, expected=3, timeout=30)
    reasons = sorted(dict(m.headers)["dlq.reason"].decode() for m in dead)
    assert reasons == ["decode_error", "key_mismatch", "schema_mismatch"]
    assert {m.key for m in dead} == {b"bad-json", b"star-x", b"bad-teff"}  # the evidence, unchanged
    assert wait_until(lambda: setup.stored_offsets() == 303, 10, "offsets past every message") >= 0
    assert sink.metric("stream_worker_sink_rows_written_total") == 300
    assert sink.metric("stream_worker_sink_dead_letters_total") == 3
    wait_until(lambda: committed_total(setup.broker.bootstrap, setup.group, setup.results) == 303, 20,
               "the group's offsets (for the lag) caught up")

    reprocessed = result_record("star-0007", processed_at=later(records[7]["processed_at"], 3600), weights=WEIGHTS_B,
                                teff=5432.0)
    setup.produce_records([reprocessed])
    wait_until(lambda: setup.query("SELECT teff FROM {schema}.results WHERE spectrum_id = 'star-0007'") == [(5432.0,)],
               30, "the reprocessed record replacing the row")
    assert setup.rows() == 300
    assert setup.query("SELECT spectrum_id, teff FROM {schema}.results_history") == [("star-0007", 4800.0)]
    assert sink.terminate() == 0


def test_sigkill_mid_stream_and_restarts_store_every_record_exactly_once(setup):
    total = 3000
    records = [result_record(f"star-{i:05d}") for i in range(total)]
    random.Random(1).shuffle(records)
    setup.produce_records(records)
    stored_at_kill = []
    for kill_after in (400, 1600):
        sink = setup.start(sink__max_rows=20)  # small transactions: the kills land between and inside them
        wait_until(lambda: setup.rows() >= kill_after, 120, f"{kill_after} rows")
        sink.kill()
        stored_at_kill.append(setup.stored_offsets())
    last = setup.start(sink__max_rows=20)
    last.wait_ready()
    wait_until(lambda: setup.stored_offsets() == total, 120, "every offset stored")
    assert setup.query("SELECT count(*), count(DISTINCT spectrum_id) FROM {schema}.results") == [(total, total)]
    assert {r for (r,) in setup.query("SELECT spectrum_id FROM {schema}.results")} == {r["spectrum_id"] for r in records}
    assert setup.rows() == total
    # The last sink started where the database said, not where the group's offsets were: it
    # wrote exactly the rows that were missing.
    assert last.metric("stream_worker_sink_rows_written_total") == total - stored_at_kill[-1]
    assert "from the database at offset" in last.tail(400)
    assert last.terminate() == 0
    print(f"\nkills at {stored_at_kill} stored offsets; the last sink wrote {total - stored_at_kill[-1]} rows")


def test_a_database_outage_is_retried_until_every_record_is_stored(kafka_broker, tmp_path_factory, tmp_path):
    with LocalPostgres(tmp_path_factory.mktemp("postgres-outage")) as postgres:
        setup = SinkSetup(kafka_broker, postgres, tmp_path)
        try:
            setup.produce_records([result_record(f"before-{i}") for i in range(100)])
            sink = setup.start()
            sink.wait_ready()
            wait_until(lambda: setup.rows() == 100, 60, "the first 100 rows")
            postgres.stop()
            setup.produce_records([result_record(f"during-{i}") for i in range(100)])
            wait_until(lambda: sink.get("/readyz")[0] == 503, 30, "readiness to fail")
            assert "storing failed" in sink.get("/readyz")[1]
            assert sink.metric("stream_worker_sink_transaction_failures_total") >= 1
            postgres.start()
            postgres.wait_ready()
            wait_until(lambda: setup.rows() == 200, 60, "every row after the outage")
            wait_until(lambda: sink.get("/readyz")[0] == 200, 30, "readiness to come back")
            assert setup.stored_offsets() == 200
            assert sink.terminate() == 0
        finally:
            setup.close()


def test_a_database_that_stops_answering_fails_the_probes_until_it_answers_again(kafka_broker, tmp_path_factory,
                                                                                  tmp_path):
    """PostgreSQL frozen (SIGSTOP: its connections stay open, nothing answers, nothing fails)
    while results arrive: the sink waits inside its transaction, so only the time since its last
    committed transaction can tell. /readyz turns 503 after sink.ready_stall_seconds, /healthz
    (Kubernetes restarts the pod) after sink.live_stall_seconds; once the database answers, the
    transaction completes and both are 200 again, every record stored once."""
    with LocalPostgres(tmp_path_factory.mktemp("postgres-frozen")) as postgres:
        setup = SinkSetup(kafka_broker, postgres, tmp_path)
        try:
            setup.produce_records([result_record(f"before-{i}") for i in range(50)])
            sink = setup.start(sink__ready_stall_seconds=3, sink__live_stall_seconds=6, sink__connect_timeout_seconds=2)
            sink.wait_ready()
            wait_until(lambda: setup.rows() == 50, 60, "the first 50 rows")
            postgres.freeze()
            try:
                frozen = time.monotonic()
                setup.produce_records([result_record(f"during-{i}") for i in range(50)])
                wait_until(lambda: sink.get("/readyz")[0] == 503, 30, "readiness to fail")
                unready = time.monotonic() - frozen
                assert "sink.ready_stall_seconds = 3 s" in sink.get("/readyz")[1]
                wait_until(lambda: sink.get("/healthz")[0] == 503, 30, "liveness to fail")
                dead = time.monotonic() - frozen
                assert "sink.live_stall_seconds = 6 s" in sink.get("/healthz")[1]
                assert sink.metric("stream_worker_sink_stalled_seconds") > 6
            finally:
                postgres.thaw()
            wait_until(lambda: setup.rows() == 100, 60, "every row once the database answers")
            wait_until(lambda: sink.get("/readyz")[0] == 200 and sink.get("/healthz")[0] == 200, 30,
                       "both probes to come back")
            assert setup.stored_offsets() == 100
            print(f"\nfrozen database: /readyz 503 {unready:.1f} s, /healthz 503 {dead:.1f} s after the freeze")
            assert 3 - POLL_TIMEOUT_MS / 1000 <= unready < dead  # counted from the idle poll before the results came
            assert sink.terminate() == 0
        finally:
            setup.close()
