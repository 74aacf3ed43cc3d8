"""The results sink's core: which messages it stores and how (rows.py), and its tables,
migrations and transactions against a real PostgreSQL server (store.py)."""

from __future__ import annotations

import json

import jsonschema
import psycopg
import pytest
from kafka.structs import TopicPartition

from stream_worker.config import ConfigError, load_config
from stream_worker.io.serializers import serializer
from stream_worker.sink.rows import RECORD_COLUMNS, SOURCE_COLUMNS, RejectedRecord, RowReader
from stream_worker.sink.store import MIGRATIONS, ResultStore, StoreError, migrate
from stream_worker.streaming.outgoing import dead_letter_message
from tests.results import WEIGHTS_B, Message, encoded, later, message_of, result_record
from tests.services import unique_topic
from tests.streaming import REPO

TP = TopicPartition("apogee.results", 0)
READER = RowReader(serializer("json").decode)


# ---------------------------------------------------------------- rows (no database)

def test_a_published_record_becomes_a_row_of_every_field_and_where_it_was_read():
    record = result_record("2M00000001-visit-1")
    row = READER.row(message_of(record, offset=41, partition=2))
    assert row.spectrum_id == "2M00000001-visit-1"
    values = dict(zip(RECORD_COLUMNS + SOURCE_COLUMNS, row.values))
    assert values["result_topic"] == "apogee.results" and values["result_partition"] == 2 and values["result_offset"] == 41
    assert values["processed_at"].isoformat() == "2026-12-01T10:00:00+00:00"
    assert {k: v for k, v in values.items() if k in record and k not in ("processed_at", "published_at")} == \
        {k: v for k, v in record.items() if k not in ("processed_at", "published_at")}


@pytest.mark.parametrize("message, reason, says", [
    (Message(b"\x00\x01 not json", b"x"), "decode_error", "not a result record"),
    (Message(b"[1, 2]", b"x"), "decode_error", "JSON object"),
    (Message(None, b"x"), "decode_error", "tombstone"),
    (message_of(result_record("x", teff=float("nan"))), "decode_error", "NaN"),
    (message_of(result_record("x", schema_version=1)), "schema_version", "version 2"),
    (message_of(result_record("x", teff=-3.0)), "schema_mismatch", "teff"),
    (message_of(result_record("x", unexpected=1)), "schema_mismatch", "unexpected"),
    (message_of(result_record("x", result_flags=1)), "schema_mismatch", "must be null"),
    (message_of(result_record("x", processed_at="2026-13-45T10:00:00.000Z")), "schema_mismatch", "processed_at"),
    (Message(encoded(result_record("x")), b"y"), "key_mismatch", "'y'"),
])
def test_what_is_not_a_published_record_is_rejected_with_a_reason(message, reason, says):
    with pytest.raises(RejectedRecord) as caught:
        READER.row(message)
    assert caught.value.reason == reason and says in str(caught.value)


def test_a_rejected_record_becomes_a_dead_letter_the_published_schema_accepts():
    """Consumers of the dead-letter topic validate its headers: the sink's reasons are in the enum."""
    schema = json.loads((REPO / "stream_worker" / "schemas" / "dead-letter-headers.v1.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    bad = Message(encoded(result_record("x")), b"y", offset=12)
    with pytest.raises(RejectedRecord) as caught:
        READER.row(bad)
    for reason, text in ((caught.value.reason, str(caught.value)), ("database_rejected", "DataError: out of range")):
        letter = dead_letter_message(bad, reason, text, "apogee.deadletter", 1 << 20)
        headers = {k: v.decode() for k, v in letter.headers}
        validator.validate(headers)
        assert headers["dlq.reason"] == reason and headers["dlq.source.offset"] == "12"
        assert (letter.key, letter.value) == (bad.key, bad.value)


def test_the_columns_are_the_schema_fields():
    schema = json.loads((REPO / "stream_worker" / "schemas" / "result.v2.json").read_text())
    assert list(RECORD_COLUMNS) == list(schema["properties"]) and set(RECORD_COLUMNS) == set(schema["required"])


# ---------------------------------------------------------------- config

def test_the_database_password_never_comes_from_the_config(tmp_path):
    with pytest.raises(ConfigError, match="sink.database: holds a password"):
        load_config(None, {"STREAM_WORKER__SINK__DATABASE": "host=db password=hunter2"})
    with pytest.raises(ConfigError, match="sink.password: secrets do not belong"):
        load_config(None, {"STREAM_WORKER__SINK__PASSWORD": "hunter2"})
    secret = tmp_path / "password"
    secret.write_text("from-file\n")
    config = load_config(None, {"STREAM_WORKER__SINK__PASSWORD_FILE": str(secret)})
    assert config.sink_password() == "from-file"
    with pytest.raises(ConfigError, match="sink.password_file: cannot read it"):
        load_config(None, {"STREAM_WORKER__SINK__PASSWORD_FILE": str(tmp_path / "none")}).sink_password()


@pytest.mark.parametrize("key, value, says", [
    ("DATABASE", "host='unterminated", "sink.database: not a libpq connection string"),
    ("DB_SCHEMA", "Results-1", "sink.db_schema"),
    ("MAX_ROWS", "0", "sink.max_rows: must be positive"),
])
def test_bad_sink_settings_name_their_key(key, value, says):
    with pytest.raises(ConfigError, match=says):
        load_config(None, {f"STREAM_WORKER__SINK__{key}": value})


# ---------------------------------------------------------------- the database

@pytest.fixture
def store(postgres_server):
    result_store = ResultStore(postgres_server.conninfo, postgres_server.password,
                               unique_topic("sink").replace("-", "_"), "sink-group")
    yield result_store
    result_store.close()


def query(store, text, *args):
    return store.open().execute(text, args).fetchall()


def put(store, messages, offsets=None):
    with store.transaction() as transaction:
        refused = transaction.upsert([READER.row(m) for m in messages])
        transaction.advance(offsets or {TP: messages[-1].offset + 1})
    return refused


@pytest.mark.integration
def test_the_tables_are_created_once_and_their_columns_are_the_records_fields(store):
    connection = store.open()
    assert migrate(connection, store.db_schema) == len(MIGRATIONS)  # again: nothing to do
    assert query(store, "SELECT version FROM schema_migrations") == [(v,) for v in range(1, len(MIGRATIONS) + 1)]
    columns = [name for (name,) in query(store, "SELECT column_name FROM information_schema.columns WHERE "
                                         "table_schema = %s AND table_name = 'results' ORDER BY ordinal_position",
                                         store.db_schema)]
    assert columns == [*RECORD_COLUMNS, *SOURCE_COLUMNS, "stored_at"]
    indexed = {name for (name,) in query(store, "SELECT indexname FROM pg_indexes WHERE schemaname = %s "
                                         "AND tablename = 'results'", store.db_schema)}
    assert {"results_source_id", "results_mjd", "results_result_flags"} <= indexed


@pytest.mark.integration
def test_a_database_newer_than_the_sink_is_refused(store):
    store.open().execute("INSERT INTO schema_migrations (version, applied_by) VALUES (%s, 'the future')",
                         (len(MIGRATIONS) + 1,))
    store.close()
    with pytest.raises(StoreError, match=f"version {len(MIGRATIONS) + 1}, newer than this sink"):
        store.open()


@pytest.mark.integration
def test_rows_and_offsets_are_stored_together_and_offsets_never_move_back(store):
    assert put(store, [message_of(result_record(f"s{i}"), offset=i) for i in range(10)]) == []
    assert query(store, "SELECT count(*) FROM results") == [(10,)]
    assert store.offsets(TP.topic) == {TP: 10}
    with pytest.raises(RuntimeError):
        with store.transaction() as transaction:  # a failure inside the block stores nothing
            transaction.upsert([READER.row(message_of(result_record("s99"), offset=99))])
            transaction.advance({TP: 100})
            raise RuntimeError("crash before the commit")
    assert query(store, "SELECT count(*) FROM results") == [(10,)] and store.offsets(TP.topic) == {TP: 10}
    put(store, [message_of(result_record("s3"), offset=3)])
    assert store.offsets(TP.topic) == {TP: 10}


@pytest.mark.integration
def test_a_newer_record_replaces_the_row_an_older_one_does_not_and_the_old_model_is_kept(store):
    first = result_record("star", teff=4800.0)
    put(store, [message_of(first, offset=0)])
    newer = result_record("star", processed_at=later(first["processed_at"], 60), weights=WEIGHTS_B, teff=5100.0)
    put(store, [message_of(newer, offset=1)])
    older = result_record("star", processed_at=later(first["processed_at"], 30), teff=4000.0)
    put(store, [message_of(older, offset=2)])
    assert query(store, "SELECT teff, weights_sha256, result_offset FROM results") == [(5100.0, WEIGHTS_B, 1)]
    assert query(store, "SELECT teff, weights_sha256, result_offset FROM results_history") == \
        [(4800.0, first["weights_sha256"], 0)]
    same_model = result_record("star", processed_at=later(first["processed_at"], 90), weights=WEIGHTS_B, teff=5101.0)
    put(store, [message_of(same_model, offset=3)])  # a redelivery by the same model: no history
    assert query(store, "SELECT count(*) FROM results_history") == [(1,)]
    assert query(store, "SELECT teff FROM results") == [(5101.0,)]


@pytest.mark.integration
def test_rows_the_database_refuses_are_returned_and_the_others_stored(store):
    messages = [message_of(result_record("good-1"), offset=0),
                message_of(result_record("huge", input_offset=2**70), offset=1),
                message_of(result_record("nul", origin="a\x00b"), offset=2),
                message_of(result_record("good-2"), offset=3)]
    refused = put(store, messages)
    assert [(row.spectrum_id, "range" in text or "NUL" in text) for row, text in refused] == \
        [("huge", True), ("nul", True)]
    assert query(store, "SELECT spectrum_id FROM results ORDER BY 1") == [("good-1",), ("good-2",)]
    assert store.offsets(TP.topic) == {TP: 4}


@pytest.mark.integration
def test_a_broken_connection_is_reopened(store, postgres_server):
    put(store, [message_of(result_record("before"), offset=0)])
    with postgres_server.connect(autocommit=True) as admin:  # as a server restart or a network cut would
        admin.execute("SELECT pg_terminate_backend(%s)", (store.connection.info.backend_pid,))
    with pytest.raises(psycopg.OperationalError):
        put(store, [message_of(result_record("lost"), offset=1)])
    put(store, [message_of(result_record("after"), offset=2)])
    assert query(store, "SELECT spectrum_id FROM results ORDER BY 1") == [("after",), ("before",)]
