"""The Avro output format: a schema derived from ``result.v2.json``, the Confluent wire format,
a real schema registry (Apicurio) that enforces BACKWARD evolution, and a consumer that reads the
worker's results knowing nothing but the registry's URL."""

from __future__ import annotations

import io
import json
import struct
import urllib.request

import fastavro
import jsonschema
import pytest

from stream_worker.config import ConfigError, load_config
from stream_worker.core.records import result_json_schema
from stream_worker.io.schema_registry import RegistryRefused, RegistryUnavailable, SchemaRegistry
from stream_worker.io.serializers import message_serializer, serializer
from stream_worker.io.serializers.avro_records import avro_schema, bind
from stream_worker.sink.rows import RowReader
from tests.results import Message, result_record
from tests.services import unique_topic
from tests.streaming import Topics, consume, produce_spectra

FAILED = result_record("failed", teff=None, e_teff=None, logg=None, e_logg=None, fe_h=None, e_fe_h=None,
                       raw_e_teff=None, raw_e_logg=None, raw_e_fe_h=None, result_flags=1, flag_bad=True,
                       error_message="RuntimeError: boom", input_timestamp_ms=None, mjd=None, visit=None)


class MemoryRegistry:
    """The three calls ``bind`` and ``decode`` make, in memory (unit tests only; the real
    registry is below)."""

    def __init__(self) -> None:
        self.schemas: list[str] = []
        self.levels: dict[str, str] = {}

    def set_compatibility(self, subject: str, level: str) -> None:
        self.levels[subject] = level

    def register(self, subject: str, schema: str) -> int:
        if schema not in self.schemas:
            self.schemas.append(schema)
        return 100 + self.schemas.index(schema)

    def schema(self, schema_id: int) -> str:
        if not 0 <= schema_id - 100 < len(self.schemas):
            raise RegistryRefused(404, f"no schema {schema_id}")
        return self.schemas[schema_id - 100]


def test_the_avro_schema_is_the_json_schema_field_for_field():
    json_schema = result_json_schema()
    fields = avro_schema()["fields"]
    assert [f["name"] for f in fields] == json_schema["required"] == list(json_schema["properties"])
    by_name = {f["name"]: f for f in fields}
    assert by_name["teff"]["type"] == ["null", "double"] and by_name["teff"]["default"] is None
    assert by_name["input_timestamp_ms"]["type"] == ["null", "long"]
    assert by_name["spectrum_id"]["type"] == "string" and "default" not in by_name["spectrum_id"]
    assert by_name["result_flags"]["type"] == "long" and by_name["flag_bad"]["type"] == "boolean"
    assert by_name["spectrum_kind"]["type"] == "string"  # an enum as a string: a new kind breaks no reader
    assert by_name["teff"]["doc"].startswith("Effective temperature")
    with pytest.raises(ValueError, match="not fields of the result record: colour"):
        avro_schema(("spectrum_id", "colour"))


def test_messages_are_magic_byte_schema_id_and_avro_and_decode_to_the_same_record():
    registry = MemoryRegistry()
    avro = bind(registry, "apogee.results-value", "BACKWARD")
    assert registry.levels == {"apogee.results-value": "BACKWARD"}
    for record in (result_record("ok"), FAILED):
        value = avro.encode(record)
        assert value[0] == 0 and struct.unpack(">I", value[1:5]) == (100,)
        assert avro.decode(value) == record
        assert len(value) < len(serializer("json").encode(record)) / 2
    assert avro.content_type == "application/vnd.apogee.result+avro; version=2"
    assert bind(registry, "apogee.results-value", None).encode(FAILED) == avro.encode(FAILED)  # same schema, same id


def test_values_that_are_not_records_are_value_errors_and_an_absent_registry_is_not():
    registry = MemoryRegistry()
    avro = bind(registry, "s-value", None)
    good = avro.encode(result_record("ok"))
    for value, reason in [(b"{\"teff\": 1}", "not in the Confluent Avro wire format"),
                          (b"\x00\x00", "not in the Confluent Avro wire format"),
                          (b"\x00" + struct.pack(">I", 7) + good[5:], "schema id 7: no schema 7"),
                          (good[:-30], "Avro body does not match schema id 100"),
                          (good + b"\x00", "longer than a record of schema id 100")]:
        with pytest.raises(ValueError, match=reason):
            avro.decode(value)
    reader = RowReader(avro.decode)  # the sink: a bad value is a dead letter with a reason
    with pytest.raises(ValueError, match="decode_error|not a result record"):
        reader.record(Message(b"\x01junk", b"k"))

    class Down(MemoryRegistry):
        def schema(self, schema_id):
            raise RegistryUnavailable("schema registry unreachable")

    with pytest.raises(RegistryUnavailable) as raised:  # the message may be fine: never dead-letter it
        bind(Down(), "s-value", None).decode(good)
    assert not isinstance(raised.value, ValueError)


def test_infer_writes_an_avro_container_file_that_carries_its_schema():
    records = [{k: v for k, v in result_record(f"s{i}").items() if not k.startswith(("input_", "published"))}
               for i in range(3)]
    stream = io.BytesIO()
    serializer("avro").write(records, stream)
    stream.seek(0)
    reader = fastavro.reader(stream)
    assert list(reader) == records
    assert "input_topic" not in [f["name"] for f in reader.writer_schema["fields"]]


def test_avro_needs_a_registry_url_without_credentials():
    with pytest.raises(ConfigError, match="kafka.schema_registry_url: required with kafka.result_format avro"):
        load_config(environ={"STREAM_WORKER__KAFKA__RESULT_FORMAT": "avro"})
    with pytest.raises(ConfigError, match="kafka.schema_registry_url: must be an http"):
        load_config(environ={"STREAM_WORKER__KAFKA__RESULT_FORMAT": "avro",
                             "STREAM_WORKER__KAFKA__SCHEMA_REGISTRY_URL": "registry:8081"})
    with pytest.raises(ConfigError, match="kafka.schema_registry_url: holds credentials"):
        load_config(environ={"STREAM_WORKER__KAFKA__SCHEMA_REGISTRY_URL": "https://u:p@registry/apis/ccompat/v7"})
    with pytest.raises(ConfigError, match="kafka.schema_compatibility: must be one of"):
        load_config(environ={"STREAM_WORKER__KAFKA__SCHEMA_COMPATIBILITY": "SIDEWAYS"})
    config = load_config(environ={"STREAM_WORKER__KAFKA__RESULT_FORMAT": "avro",
                                  "STREAM_WORKER__KAFKA__SCHEMA_REGISTRY_URL": "http://registry:8080/apis/ccompat/v7"})
    assert (config.kafka.result_format, config.kafka.schema_compatibility) == ("avro", "BACKWARD")
    with pytest.raises(ValueError, match="needs a schema registry: set kafka.schema_registry_url"):
        message_serializer("avro", "t")


def test_an_unreachable_registry_is_reported_with_its_address():
    with pytest.raises(RegistryUnavailable, match=r"unreachable \(GET http://127.0.0.1:9/apis/ccompat/v7/subjects\)"):
        message_serializer("avro", "t", "http://127.0.0.1:9/apis/ccompat/v7", wait_s=0)


# ---------------------------------------------------------------- a real registry (Apicurio)

def evolved(change) -> str:
    schema = avro_schema()
    change(schema["fields"])
    return json.dumps(schema)


@pytest.mark.integration
def test_the_registry_enforces_backward_evolution_on_the_topics_subject(schema_registry):
    topic = unique_topic("avro")
    subject = f"{topic}-value"
    registry = SchemaRegistry(schema_registry.url)
    avro = message_serializer("avro", topic, schema_registry.url, "BACKWARD")
    assert registry.compatibility(subject) == "BACKWARD"
    first = struct.unpack(">I", avro.encode(FAILED)[1:5])[0]
    assert message_serializer("avro", topic, schema_registry.url).encode(FAILED) == avro.encode(FAILED)

    # the documented rule: a new field must have a default (nullable, default null) ...
    added = evolved(lambda f: f.append({"name": "alpha_m", "type": ["null", "double"], "default": None}))
    assert registry.register(subject, added) != first
    # ... and a field without one, or a changed type, is refused
    with pytest.raises(RegistryRefused) as refused:
        registry.register(subject, evolved(lambda f: f.append({"name": "c_m", "type": "double"})))
    assert refused.value.status == 409
    with pytest.raises(RegistryRefused, match="HTTP 409"):
        registry.register(subject, evolved(lambda f: f[8].update(type=["null", "string"])))  # teff as text

    # a record written by the newer schema is still read (its extra field included)
    newer = json.loads(added)
    value = io.BytesIO()
    value.write(b"\x00" + struct.pack(">I", registry.register(subject, added)))
    fastavro.schemaless_writer(value, fastavro.parse_schema(newer), {**result_record("n"), "alpha_m": 0.1})
    assert avro.decode(value.getvalue())["alpha_m"] == 0.1


@pytest.mark.integration
def test_start_up_stops_with_the_registrys_reason_when_it_refuses_our_schema(schema_registry):
    topic = unique_topic("avro")
    registry = SchemaRegistry(schema_registry.url)
    registry.set_compatibility(f"{topic}-value", "BACKWARD")
    registry.register(f"{topic}-value", evolved(lambda f: f[8].update(type=["null", "string"])))
    with pytest.raises(RegistryRefused, match="HTTP 409.*Incompatible.*/fields/8"):
        message_serializer("avro", topic, schema_registry.url, "BACKWARD")


def read_with_only_the_registry(registry_url: str, value: bytes) -> dict:
    """What any registry-aware consumer does: no project code, no schema file."""
    assert value[0] == 0
    schema_id = struct.unpack(">I", value[1:5])[0]
    with urllib.request.urlopen(f"{registry_url}/schemas/ids/{schema_id}") as response:
        schema = fastavro.parse_schema(json.loads(json.loads(response.read())["schema"]))
    return fastavro.schemaless_reader(io.BytesIO(value[5:]), schema, None)


@pytest.mark.integration
@pytest.mark.parametrize("batches_in_flight", [2])
def test_a_consumer_that_knows_only_the_registry_reads_the_workers_results(kafka_broker, schema_registry,
                                                                          worker_factory):
    topics = Topics().create(kafka_broker, partitions=2)
    ids = produce_spectra(kafka_broker.bootstrap, topics.input, 12, "avro")
    worker = worker_factory(kafka_broker, topics, kafka__result_format="avro",
                            kafka__schema_registry_url=schema_registry.url)
    messages = consume(kafka_broker.bootstrap, topics.output, len(ids), settle=0.5)
    assert worker.terminate() == 0
    records = [read_with_only_the_registry(schema_registry.url, m.value) for m in messages]
    assert sorted(r["spectrum_id"] for r in records) == ids
    for message, record in zip(messages, records):
        jsonschema.validate(record, result_json_schema())
        assert message.key.decode() == record["spectrum_id"] and record["teff"] > 0 and record["e_teff"] > 0
        assert dict(message.headers)["content-type"] == b"application/vnd.apogee.result+avro; version=2"
    assert SchemaRegistry(schema_registry.url).compatibility(f"{topics.output}-value") == "BACKWARD"
    # the results sink reads the same messages through the format's decode
    reader = RowReader(message_serializer("avro", topics.output, schema_registry.url).decode)
    assert sorted(reader.row(m).spectrum_id for m in messages) == ids
