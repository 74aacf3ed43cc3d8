"""One typed configuration, read from ``config.yaml`` with environment overrides, checked once.

Environment variables ``STREAM_WORKER__<SECTION>__<KEY>`` override the file (values are parsed
as YAML, so ``[a, b]``, ``3`` and ``true`` work): containers change settings without a new file.
Every problem is reported with the dotted key that caused it. Secrets never live in the file:
the SASL password comes from ``STREAM_WORKER_SASL_PASSWORD`` or ``kafka.sasl_password_file``, the
results database's from ``STREAM_WORKER_SINK_PASSWORD`` or ``sink.password_file``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stream_worker.engine.precision import MODES
from stream_worker.io.schema_registry import COMPATIBILITY_LEVELS

ENV_PREFIX = "STREAM_WORKER__"
SASL_PASSWORD_ENV = "STREAM_WORKER_SASL_PASSWORD"
SINK_PASSWORD_ENV = "STREAM_WORKER_SINK_PASSWORD"


class ConfigError(ValueError):
    """A setting is missing, unknown, of the wrong type or out of range; the message names it."""


@dataclass
class KafkaConfig:
    bootstrap_servers: list[str] = field(default_factory=lambda: ["127.0.0.1:9092"])
    input_topics: list[str] = field(default_factory=lambda: ["apogee.spectra"])
    output_topic: str = "apogee.results"
    result_format: str = "json"
    schema_registry_url: str | None = None
    schema_compatibility: str | None = "BACKWARD"
    dead_letter_topic: str = "apogee.deadletter"
    group_id: str = "stream-worker"
    client_id: str = "stream-worker"
    delivery: str = "at_least_once"
    transactional_id: str | None = None
    auto_offset_reset: str = "earliest"
    rebalance_protocol: str = "eager"
    session_timeout_ms: int = 45_000
    max_poll_interval_ms: int = 300_000
    request_timeout_ms: int = 30_000
    transaction_timeout_ms: int = 60_000
    compression_type: str | None = "gzip"
    max_request_size: int = 4_194_304
    producer_batch_bytes: int = 131_072
    fetch_max_bytes: int = 52_428_800
    max_partition_fetch_bytes: int = 4_194_304
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password_file: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True


@dataclass
class BatchingConfig:
    max_spectra: int = 64
    max_wait_seconds: float = 0.5


@dataclass
class EngineConfig:
    weights: str | None = None
    weights_sha256: str | None = None
    allow_random_weights: bool = False
    device: str = "auto"
    num_draws: int = 20
    seed: int = 0
    precision: str = "exact"
    kernels: str = "measure"
    fft: bool = True
    batch_size: int | None = None
    chunk_spectra: int = 64
    num_threads: int | None = None


@dataclass
class InputsConfig:
    data_roots: list[str] = field(default_factory=list)
    max_message_bytes: int = 4_000_000


@dataclass
class MetricsConfig:
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = 9108


@dataclass
class LoggingConfig:
    level: str = "INFO"
    format: str = "json"
    repeat_summary_seconds: float = 30.0


@dataclass
class WorkerConfig:
    shutdown_grace_seconds: float = 30.0
    poll_timeout_ms: int = 200
    max_batches_in_flight: int = 2
    producer_rebuild_seconds: float = 120.0
    commit_timeout_seconds: float = 20.0
    ready_stall_seconds: float = 120.0
    live_stall_seconds: float = 300.0


@dataclass
class SinkConfig:
    """``stream-worker sink``: the results topic into a PostgreSQL table."""

    database: str = "host=127.0.0.1 port=5432 dbname=apogee user=stream_worker"
    password_file: str | None = None
    db_schema: str = "apogee"
    topic: str | None = None
    group_id: str = "stream-worker-sink"
    dead_letter_topic: str | None = None
    max_rows: int = 500
    connect_timeout_seconds: float = 10.0
    retry_max_seconds: float = 30.0
    ready_stall_seconds: float = 120.0
    live_stall_seconds: float = 300.0


@dataclass
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    sink: SinkConfig = field(default_factory=SinkConfig)

    def sasl_password(self) -> str | None:
        """The SASL password from the environment or the configured file, never from YAML."""
        return _secret(SASL_PASSWORD_ENV, self.kafka.sasl_password_file, "kafka.sasl_password_file")

    def sink_password(self) -> str | None:
        """The results database's password from the environment or the configured file, never from
        YAML; ``None`` leaves it to libpq (``PGPASSWORD``, ``~/.pgpass``, or no password)."""
        return _secret(SINK_PASSWORD_ENV, self.sink.password_file, "sink.password_file")


def _secret(env: str, path: str | None, key: str) -> str | None:
    if env in os.environ:
        return os.environ[env]
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read it: {exc}") from exc
    return None


CHOICES = {
    "kafka.delivery": ("at_least_once", "exactly_once"),
    "kafka.auto_offset_reset": ("earliest", "latest"),
    "kafka.rebalance_protocol": ("eager", "cooperative"),
    "kafka.compression_type": (None, "gzip", "lz4", "zstd", "snappy"),
    "kafka.security_protocol": ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    "kafka.sasl_mechanism": (None, "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
    "kafka.schema_compatibility": (None, *COMPATIBILITY_LEVELS),
    "engine.precision": tuple(MODES),
    "logging.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
    "logging.format": ("json", "text"),
}
POSITIVE = {
    "kafka.session_timeout_ms", "kafka.max_poll_interval_ms", "kafka.request_timeout_ms", "kafka.transaction_timeout_ms",
    "kafka.max_request_size", "kafka.producer_batch_bytes", "kafka.fetch_max_bytes", "kafka.max_partition_fetch_bytes",
    "batching.max_spectra", "batching.max_wait_seconds", "engine.batch_size", "engine.chunk_spectra",
    "engine.num_threads", "inputs.max_message_bytes", "worker.shutdown_grace_seconds", "worker.poll_timeout_ms",
    "worker.max_batches_in_flight", "worker.producer_rebuild_seconds",
    "worker.commit_timeout_seconds", "worker.ready_stall_seconds", "worker.live_stall_seconds", "sink.max_rows", "sink.connect_timeout_seconds", "sink.retry_max_seconds",
    "sink.ready_stall_seconds", "sink.live_stall_seconds",
}
SECRET_KEYS = {"sasl_password", "password", "ssl_password"}


def _coerce(value, hint, key: str):
    """``value`` as type ``hint`` (the dataclass annotation), or a ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, found {value!r}")
        (inner,) = typing.get_args(hint)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, found {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, found {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, found {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, found {value!r}")
    raise TypeError(f"unsupported config type {hint} for {key}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, found {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        dotted = f"{prefix}{key}"
        if key in SECRET_KEYS:
            raise ConfigError(
                f"{dotted}: secrets do not belong in the config file; set {SASL_PASSWORD_ENV} or "
                f"kafka.sasl_password_file (Kafka), {SINK_PASSWORD_ENV} or sink.password_file (the results database)"
            )
        if key not in names:
            raise ConfigError(f"{dotted}: unknown setting (known: {', '.join(sorted(names))})")
    values = {}
    for name in names & set(data):
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, data[name] or {}, f"{prefix}{name}.")
        else:
            values[name] = _coerce(data[name], hint, f"{prefix}{name}")
    return cls(**values)


def _env_overrides(environ: typing.Mapping[str, str]) -> dict:
    overrides: dict = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX):].split("__")]
        if len(path) != 2 or not all(path):
            raise ConfigError(f"{name}: expected {ENV_PREFIX}<SECTION>__<KEY>")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path[0]}.{path[1]} (from {name}): not valid YAML: {exc}") from exc
        overrides.setdefault(path[0], {})[path[1]] = value
    return overrides


def _check(config: Config) -> Config:
    for section in dataclasses.fields(config):
        for item in dataclasses.fields(getattr(config, section.name)):
            key = f"{section.name}.{item.name}"
            value = getattr(getattr(config, section.name), item.name)
            if key in CHOICES and value not in CHOICES[key]:
                raise ConfigError(f"{key}: must be one of {CHOICES[key]}, found {value!r}")
            if key in POSITIVE and value is not None and value <= 0:
                raise ConfigError(f"{key}: must be positive, found {value!r}")
    _check_result_format(config.kafka)
    _check_kernels(config.engine.kernels)
    _check_sink(config.sink)
    if not config.kafka.input_topics:
        raise ConfigError("kafka.input_topics: at least one input topic is needed")
    if config.engine.num_draws < 0 or config.engine.num_draws == 1:
        raise ConfigError(f"engine.num_draws: must be 0 (no uncertainties) or at least 2, found {config.engine.num_draws}")
    if config.logging.repeat_summary_seconds < 0:
        raise ConfigError(f"logging.repeat_summary_seconds: must be 0 (write every line) or more, "
                          f"found {config.logging.repeat_summary_seconds}")
    if not 0 < config.metrics.port < 65536:
        raise ConfigError(f"metrics.port: must be a TCP port, found {config.metrics.port}")
    worker = config.worker
    if worker.live_stall_seconds <= max(worker.ready_stall_seconds, worker.commit_timeout_seconds,
                                        worker.producer_rebuild_seconds):
        raise ConfigError("worker.live_stall_seconds: must exceed worker.ready_stall_seconds, "
                          "worker.commit_timeout_seconds and worker.producer_rebuild_seconds (liveness must not "
                          "restart a worker that is still waiting out a commit or replacing its producer)")
    if config.kafka.producer_batch_bytes > config.kafka.max_request_size:
        raise ConfigError("kafka.producer_batch_bytes: must not exceed kafka.max_request_size")
    if config.kafka.max_poll_interval_ms <= config.kafka.session_timeout_ms:
        raise ConfigError("kafka.max_poll_interval_ms: must exceed kafka.session_timeout_ms")
    if config.inputs.max_message_bytes + 65_536 > config.kafka.max_request_size:
        raise ConfigError(
            "inputs.max_message_bytes: must be at least 64 KiB below kafka.max_request_size, "
            "so that a dead letter (the input plus headers) can always be published"
        )
    if config.kafka.sasl_mechanism and not config.kafka.security_protocol.startswith("SASL"):
        raise ConfigError("kafka.sasl_mechanism: set kafka.security_protocol to SASL_PLAINTEXT or SASL_SSL too")
    if config.kafka.security_protocol.startswith("SASL") and not config.kafka.sasl_mechanism:
        raise ConfigError("kafka.sasl_mechanism: required with a SASL security protocol")
    return config


def _check_sink(sink: SinkConfig) -> None:
    from psycopg.conninfo import conninfo_to_dict

    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", sink.db_schema):
        raise ConfigError(f"sink.db_schema: must be a lower-case PostgreSQL name (letters, digits, _), "
                          f"found {sink.db_schema!r}")
    try:
        options = conninfo_to_dict(sink.database)
    except Exception as exc:  # psycopg.ProgrammingError, whose text says where the string is wrong
        raise ConfigError(f"sink.database: not a libpq connection string: {str(exc).strip()}") from None
    if "password" in options:
        raise ConfigError(f"sink.database: holds a password; secrets do not belong in the config file: "
                          f"set {SINK_PASSWORD_ENV} or sink.password_file")
    if sink.live_stall_seconds <= max(sink.ready_stall_seconds, sink.retry_max_seconds, sink.connect_timeout_seconds):
        raise ConfigError("sink.live_stall_seconds: must exceed sink.ready_stall_seconds, sink.retry_max_seconds and "
                          "sink.connect_timeout_seconds (liveness must not restart a sink that is still waiting out "
                          "a retry pause or a connection attempt)")


def _check_kernels(value: str) -> None:
    from stream_worker.engine.precision import parse_plan

    if value not in ("measure", "rules"):
        try:
            parse_plan(value)
        except ValueError as exc:
            raise ConfigError(f"engine.kernels: must be measure, rules or a plan's label as logged: {exc}") from None


def _check_result_format(kafka: KafkaConfig) -> None:
    from stream_worker.io.serializers import FORMATS, message_formats, serializer

    name = kafka.result_format
    if name not in FORMATS or not serializer(name).for_messages:  # imports only the named format's module
        raise ConfigError(f"kafka.result_format: must be a format that encodes one record per message "
                          f"({', '.join(message_formats())}), found {name!r}")
    if serializer(name).bind is not None and not kafka.schema_registry_url:
        raise ConfigError(f"kafka.schema_registry_url: required with kafka.result_format {name} (the schema "
                          f"registry's Confluent-compatible API, e.g. http://registry:8080/apis/ccompat/v7)")
    url = urllib.parse.urlsplit(kafka.schema_registry_url or "http://x")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"kafka.schema_registry_url: must be an http(s) URL, found {kafka.schema_registry_url!r}")
    if url.username or url.password:
        raise ConfigError("kafka.schema_registry_url: holds credentials; secrets do not belong in the config file")


def load_config(path: str | os.PathLike | None = None, environ: typing.Mapping[str, str] | None = None) -> Config:
    """Reads ``path`` (defaults only when None), applies environment overrides, validates."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, found {type(data).__name__}")
    for section, values in _env_overrides(os.environ if environ is None else environ).items():
        if not isinstance(data.get(section) or {}, dict):
            raise ConfigError(f"{section}: expected a mapping, found {data[section]!r}")
        data[section] = {**(data.get(section) or {}), **values}
    return _check(_build(Config, data, ""))
