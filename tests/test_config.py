import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream_worker.config import Config, ConfigError, load_config

CONFIG = Path(__file__).parent.parent / "config.yaml"


def test_shipped_config_documents_the_defaults():
    assert load_config(CONFIG, environ={}) == Config()


def test_every_setting_is_in_the_shipped_config():
    import dataclasses

    import yaml

    shipped = yaml.safe_load(CONFIG.read_text())
    for section in dataclasses.fields(Config):
        names = {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
        assert set(shipped[section.name]) == names, section.name


def test_environment_overrides(tmp_path):
    env = {
        "STREAM_WORKER__KAFKA__BOOTSTRAP_SERVERS": "[kafka-0:9092, kafka-1:9092]",
        "STREAM_WORKER__BATCHING__MAX_WAIT_SECONDS": "2",
        "STREAM_WORKER__ENGINE__WEIGHTS": "$MWM_ASTRA/pipelines/ANet/deconstructed_model",
        "STREAM_WORKER__KAFKA__INPUT_TOPICS": "a,b",
        "STREAM_WORKER__ENGINE__FFT": "false",
    }
    config = load_config(CONFIG, environ=env)
    assert config.kafka.bootstrap_servers == ["kafka-0:9092", "kafka-1:9092"]
    assert config.batching.max_wait_seconds == 2.0
    assert config.engine.weights.startswith("$MWM_ASTRA")
    assert config.kafka.input_topics == ["a", "b"]
    assert config.engine.fft is False


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("kafka:\n  bootstrap_server: x\n", "kafka.bootstrap_server: unknown setting"),
        ("batching:\n  max_spectra: lots\n", "batching.max_spectra: expected an integer"),
        ("batching:\n  max_spectra: 0\n", "batching.max_spectra: must be positive"),
        ("engine:\n  num_draws: 1\n", "engine.num_draws"),
        ("kafka:\n  delivery: sometimes\n", "kafka.delivery: must be one of"),
        ("kafka:\n  sasl_password: hunter2\n", "kafka.sasl_password: secrets do not belong"),
        ("metrics:\n  enabled: yes please\n", "metrics.enabled: expected true or false"),
        ("telemetry: {}\n", "telemetry: unknown setting"),
        ("kafka:\n  security_protocol: SASL_SSL\n", "kafka.sasl_mechanism: required"),
        ("- just a list\n", "expected a mapping"),
        ("kafka:\n  result_format: xml\n", "kafka.result_format: must be a format that encodes one record"),
        ("kafka:\n  result_format: fits\n", "kafka.result_format: must be a format that encodes one record"),
        ("engine:\n  precision: bf16\n", "engine.precision: must be one of"),
        ("engine:\n  kernels: fastest\n", "engine.kernels: must be measure, rules or a plan's label"),
        ("logging:\n  repeat_summary_seconds: -1\n", "logging.repeat_summary_seconds: must be 0"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, yaml_text, key):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        load_config(path, environ={})


def test_bad_environment_override_names_the_key():
    with pytest.raises(ConfigError, match="worker.poll_timeout_ms: expected an integer"):
        load_config(None, environ={"STREAM_WORKER__WORKER__POLL_TIMEOUT_MS": "soon"})
    with pytest.raises(ConfigError, match="STREAM_WORKER__KAFKA: expected"):
        load_config(None, environ={"STREAM_WORKER__KAFKA": "x"})


def test_missing_config_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_sasl_password_comes_from_env_or_file(tmp_path, monkeypatch):
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    config = load_config(None, environ={"STREAM_WORKER__KAFKA__SASL_PASSWORD_FILE": str(secret)})
    monkeypatch.delenv("STREAM_WORKER_SASL_PASSWORD", raising=False)
    assert config.sasl_password() == "s3cret"
    monkeypatch.setenv("STREAM_WORKER_SASL_PASSWORD", "from-env")
    assert config.sasl_password() == "from-env"


def test_tls_and_sasl_settings_reach_the_kafka_clients(tmp_path, monkeypatch):
    from stream_worker.streaming.kafka_clients import security_options

    monkeypatch.setenv("STREAM_WORKER_SASL_PASSWORD", "pw")
    config = load_config(None, environ={
        "STREAM_WORKER__KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "STREAM_WORKER__KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "STREAM_WORKER__KAFKA__SASL_USERNAME": "apogee",
        "STREAM_WORKER__KAFKA__SSL_CAFILE": "/etc/ca.pem",
    })
    assert security_options(config) == {
        "security_protocol": "SASL_SSL", "ssl_cafile": "/etc/ca.pem", "ssl_certfile": None, "ssl_keyfile": None,
        "ssl_check_hostname": True, "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "apogee",
        "sasl_plain_password": "pw",
    }
    assert security_options(load_config(None, environ={})) == {"security_protocol": "PLAINTEXT"}


def test_a_producer_batch_larger_than_a_request_is_refused():
    with pytest.raises(ConfigError, match="^kafka.producer_batch_bytes: must not exceed kafka.max_request_size"):
        load_config(None, {"STREAM_WORKER__KAFKA__PRODUCER_BATCH_BYTES": "8388608"})


@pytest.mark.parametrize("environment, spin_count", [
    ({}, "10000"),  # libgomp's 300,000 spins burned a core between the worker's small operations
    ({"GOMP_SPINCOUNT": "77"}, "77"),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, None),  # a spin count would override passive waiting's
])
def test_openmp_spinning_is_bounded_unless_the_environment_says_otherwise(environment, spin_count):
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    shown = subprocess.run([sys.executable, "-c", "import os, stream_worker; print(os.environ.get('GOMP_SPINCOUNT'))"],
                           env={**clean, **environment}, capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert shown == str(spin_count)
