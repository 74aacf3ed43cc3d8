"""The deployment artefacts: Dockerfile, Kubernetes manifests, alert rules, Grafana dashboard.

Everything is checked with the real tools where they exist on this machine (installed by
scripts/install-deploy-tools): kustomize renders every overlay; kubernetes-validate checks the
built-in kinds against the Kubernetes OpenAPI schemas; the custom resources are checked against
tests/data/crds/ (strict schemas) and, where node is there, the upstream CRD schemas compiled
into the @kubernetes-models npm packages; promtool checks and unit-tests the rules; hadolint
lints the Dockerfile. A test skips, naming the missing tool, only when that tool is absent.

Beyond syntax, the manifests are checked against the worker itself: the env overrides load
with stream_worker.config, the container's arguments parse with the CLI, every metric the
rules and the dashboard query exists in stream_worker.streaming.metrics, topic sizes, partition
counts and autoscaler limits agree with config.yaml, and the NVIDIA device plugin's GPU sharing
config agrees with what the shared-GPU pods request and with docs/deployment.md.

``python -m tests.test_deployment`` rewrites k8s/prometheus/prometheusrule.yaml from
k8s/prometheus/stream-worker-rules.yml.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRDS = REPO / "tests" / "data" / "crds"
RULES_FILE = K8S / "prometheus" / "stream-worker-rules.yml"
RULES_TEST_FILE = K8S / "prometheus" / "stream-worker-rules.test.yml"
PROMETHEUSRULE_FILE = K8S / "prometheus" / "prometheusrule.yaml"
DASHBOARD_FILE = K8S / "grafana" / "stream-worker-dashboard.json"
BASE_CONFIG = K8S / "base" / "config.yaml"
DEVICE_PLUGIN = "components/gpu-shared/device-plugin"  # the NVIDIA device plugin's sharing config
DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"

CACHE = Path(os.environ.get("STREAM_WORKER_CACHE", Path.home() / ".cache" / "stream_worker"))
DEPLOY_TOOLS = CACHE / "deploy-tools"  # scripts/install-deploy-tools puts kustomize and the npm models here

OVERLAYS = ("gpu", "cpu", "hpa", "gpu-shared")
GPU_RESOURCE = {"gpu": "nvidia.com/gpu", "hpa": "nvidia.com/gpu", "gpu-shared": "nvidia.com/gpu.shared"}
KUSTOMIZATIONS = tuple(f"overlays/{o}" for o in OVERLAYS) + ("kafka-topics", DEVICE_PLUGIN)
# Kubernetes versions the manifests must be valid for (schemas shipped by kubernetes-validate).
K8S_VERSIONS = ("1.30.0", "1.34.0")
BUILTIN_GROUPS = {"v1", "apps/v1", "policy/v1", "autoscaling/v2"}

# Grafana variables, replaced the way Grafana would before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "${datasource}": "prometheus",
    "$namespace": ".*",
    "$job": "stream-worker",
}


# ---------------------------------------------------------------------------------------- tools


def find_kustomize() -> list[str] | None:
    """The kustomize command: $KUSTOMIZE, the pinned one from install-deploy-tools, one on PATH,
    then `kubectl kustomize` (kubectl embeds kustomize)."""
    candidates = [os.environ.get("KUSTOMIZE"), str(DEPLOY_TOOLS / "bin" / "kustomize"), shutil.which("kustomize"),
                  str(Path.home() / "go" / "bin" / "kustomize")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return [candidate, "build"]
    kubectl = shutil.which("kubectl")
    if kubectl and subprocess.run([kubectl, "kustomize", "--help"], capture_output=True).returncode == 0:
        return [kubectl, "kustomize"]
    return None


def require_tool(name: str) -> str:
    path = shutil.which(name) or (str(Path(sys.executable).parent / name)
                                  if os.access(Path(sys.executable).parent / name, os.X_OK) else None)
    if path is None:
        pytest.skip(f"{name} is not installed: run scripts/install-deploy-tools (or scripts/install-services)")
    return path


@cache
def render(kustomization: str) -> tuple[dict, ...]:
    command = find_kustomize()
    if command is None:
        pytest.skip("no kustomize (nor kubectl kustomize) found: run scripts/install-deploy-tools")
    result = subprocess.run([*command, str(K8S / kustomization)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{shlex.join(command)} k8s/{kustomization} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def by_kind(docs, kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs, kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def deployment(docs, name: str = "stream-worker") -> dict:
    """The worker's Deployment (or, by name, the sink's: stream-worker-sink)."""
    (found,) = [doc for doc in by_kind(docs, "Deployment") if doc["metadata"]["name"] == name]
    return found


def container(docs, name: str = "stream-worker") -> dict:
    (c,) = deployment(docs, name)["spec"]["template"]["spec"]["containers"]
    return c


@cache
def base_config() -> dict:
    return yaml.safe_load(BASE_CONFIG.read_text())


@cache
def rules() -> dict:
    return yaml.safe_load(RULES_FILE.read_text())


@cache
def dashboard() -> dict:
    return json.loads(DASHBOARD_FILE.read_text())


def worker_metric_names() -> set[str]:
    """Every series name the worker and the sink expose (histograms: _bucket/_sum/_count), plus up."""
    from stream_worker.sink.metrics import SinkMetrics
    from stream_worker.streaming.metrics import Metrics

    names = {"up"}
    for family in [*Metrics().registry.collect(), *SinkMetrics().registry.collect()]:
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        elif family.type == "counter":
            names |= {f"{family.name}_total"}
        else:
            names.add(family.name)
    return names


def metrics_in(expr: str) -> set[str]:
    names = set(re.findall(r"\b(?:stream_worker|process)_[a-z0-9_]+", expr))
    return names | ({"up"} if re.search(r"\bup\s*\{", expr) else set())


def dashboard_targets() -> Iterator[tuple[str, dict]]:
    def walk(panels):
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    for panel in walk(dashboard()["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr


def all_promql() -> list[tuple[str, str]]:
    """(where, PromQL) for every rule and every dashboard query, Grafana variables substituted."""
    queries = [(f"rule {rule.get('alert') or rule.get('record')}", rule["expr"])
               for group in rules()["groups"] for rule in group["rules"]]
    queries += [(f"panel {title!r} {target['refId']}", grafana_to_promql(target["expr"]))
                for title, target in dashboard_targets()]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"])
            assert match, variable["definition"]
            queries.append((f"variable {variable['name']}", grafana_to_promql(match.group(1))))
    return queries


# ----------------------------------------------------------------------- PrometheusRule source


def prometheusrule_text() -> str:
    """k8s/prometheus/prometheusrule.yaml as generated from the plain rule file."""
    source = RULES_FILE.read_text()
    groups = source[source.index("\ngroups:") + 1:]
    return (
        "# GENERATED from stream-worker-rules.yml by `python -m tests.test_deployment`; do not edit.\n"
        "# The label \"release\" must match your Prometheus's ruleSelector (kube-prometheus-stack: the\n"
        "# Helm release name).\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: stream-worker\n"
        "  labels:\n"
        "    release: kube-prometheus-stack\n"
        "spec:\n" + "".join(f"  {line}" if line.strip() else line for line in groups.splitlines(keepends=True))
    )


# ------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_kustomization_renders(kustomization):
    docs = render(kustomization)
    kinds = sorted(doc["kind"] for doc in docs)
    if kustomization == "kafka-topics":
        assert kinds == ["KafkaTopic"] * 3
    elif kustomization == DEVICE_PLUGIN:
        assert kinds == ["ConfigMap"]
        assert docs[0]["metadata"] == {"name": "device-plugin-config", "namespace": "gpu-operator",
                                       "labels": {"app.kubernetes.io/part-of": "apogee-streaming"}}
    else:
        autoscaler = "HorizontalPodAutoscaler" if kustomization.endswith("hpa") else "ScaledObject"
        assert kinds == sorted(["ConfigMap", "ConfigMap", "Deployment", "Deployment", "PersistentVolumeClaim",
                                "PodDisruptionBudget", "PodMonitor", "PodMonitor", "PrometheusRule", "Service",
                                "ServiceAccount", autoscaler])
        assert {doc["metadata"].get("namespace") for doc in docs} == {"apogee"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_builtin_kinds_validate_against_kubernetes_schemas(kustomization, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for doc in render(kustomization):
        if doc["apiVersion"] in BUILTIN_GROUPS:
            kubernetes_validate.validate(doc, version, strict=True)


def crd_schemas() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in sorted(CRDS.glob("*.json")):
        schema = json.loads(path.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        key = (schema["properties"]["apiVersion"]["const"], schema["properties"]["kind"]["const"])
        schemas[key] = schema
    return schemas


def custom_resources() -> list[dict]:
    return [doc for k in KUSTOMIZATIONS for doc in render(k) if doc["apiVersion"] not in BUILTIN_GROUPS]


def test_custom_resources_validate_against_strict_crd_schemas():
    schemas = crd_schemas()
    for doc in custom_resources():
        key = (doc["apiVersion"], doc["kind"])
        assert key in schemas, f"no CRD schema for {key} under tests/data/crds/"
        errors = sorted(jsonschema.Draft202012Validator(schemas[key]).iter_errors(doc), key=lambda e: e.path)
        assert not errors, f"{key} {doc['metadata']['name']}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_strict_crd_schemas_reject_what_the_api_server_would():
    """The vendored schemas are not vacuous: typical mistakes fail."""
    schemas = crd_schemas()
    scaled = one(render("overlays/gpu"), "ScaledObject")
    bad = json.loads(json.dumps(scaled))
    bad["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 200  # must be a string
    bad["spec"]["maxReplicas"] = 12  # the HPA's spelling, not KEDA's
    errors = list(jsonschema.Draft202012Validator(schemas[("keda.sh/v1alpha1", "ScaledObject")]).iter_errors(bad))
    assert len(errors) == 2
    topic = by_kind(render("kafka-topics"), "KafkaTopic")[0]
    bad = json.loads(json.dumps(topic))
    bad["spec"]["partitions"] = "12"
    assert not jsonschema.Draft202012Validator(schemas[("kafka.strimzi.io/v1beta2", "KafkaTopic")]).is_valid(bad)


def test_custom_resources_validate_against_upstream_crd_models(tmp_path):
    """KEDA and Prometheus Operator CRD schemas as compiled in the @kubernetes-models npm packages."""
    node = shutil.which("node")
    modules = DEPLOY_TOOLS / "crd-models" / "node_modules"
    if node is None or not (modules / "@kubernetes-models" / "keda").is_dir():
        pytest.skip("node or the @kubernetes-models packages are missing: run scripts/install-deploy-tools")
    resources = [doc for doc in custom_resources() if doc["apiVersion"] != "kafka.strimzi.io/v1beta2"]
    (tmp_path / "resources.json").write_text(json.dumps(resources))
    result = subprocess.run([node, str(CRDS / "npm" / "validate.mjs"), str(modules), str(tmp_path / "resources.json")],
                            capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0 and len(lines) == len(resources), result.stdout + result.stderr
    assert {line["kind"] for line in lines} == {
        "keda.sh/v1alpha1/ScaledObject", "monitoring.coreos.com/v1/PodMonitor", "monitoring.coreos.com/v1/PrometheusRule"}


# ------------------------------------------------------------------------------- the worker pod


def test_base_config_has_the_same_keys_as_the_top_level_config():
    top = yaml.safe_load((REPO / "config.yaml").read_text())
    base = base_config()
    assert {s: sorted(v) for s, v in base.items()} == {s: sorted(v) for s, v in top.items()}
    assert base["kafka"]["bootstrap_servers"] == ["my-cluster-kafka-bootstrap.kafka:9092"]
    assert base["engine"]["weights"] == "/models/apogeenet/deconstructed_model"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_environment_loads_as_a_valid_config(overlay):
    """What the container sees, config.yaml plus env overrides, passes stream_worker's own checks."""
    from stream_worker.config import ENV_PREFIX, SASL_PASSWORD_ENV, load_config

    env = container(render(f"overlays/{overlay}"))["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), names
    plain = {e["name"]: e["value"] for e in env if "value" in e}
    overrides = {k: v for k, v in plain.items() if k.startswith(ENV_PREFIX)}
    assert all(re.fullmatch(r"STREAM_WORKER__[A-Z_]+__[A-Z_]+", k) for k in overrides), overrides
    config = load_config(BASE_CONFIG, environ=overrides)
    assert config.engine.device == {"gpu": "cuda", "cpu": "cpu", "hpa": "cuda", "gpu-shared": "cuda"}[overlay]
    if overlay in ("cpu", "gpu-shared"):  # pods that share a node's cores: torch threads = the CPU limit
        assert config.engine.num_threads == int(container(render(f"overlays/{overlay}"))["resources"]["limits"]["cpu"])
    # A GPU that other pods are busy on is no place to time the kernels at start-up.
    assert config.engine.kernels == ("rules" if overlay == "gpu-shared" else "measure")
    assert config.engine.weights.startswith("/models/")
    assert config.metrics.port == 9108
    # The SASL password: only from the optional Secret, never a literal.
    (secret,) = [e for e in env if e["name"] == SASL_PASSWORD_ENV]
    assert secret["valueFrom"]["secretKeyRef"] == {"name": "stream-worker-kafka", "key": "password", "optional": True}
    assert not any("password" in k.lower() for k in overrides)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_container_arguments_run_the_worker_with_the_mounted_config(overlay):
    from stream_worker.cli import build_parser

    c = container(render(f"overlays/{overlay}"))
    assert "command" not in c  # the image's ENTRYPOINT, stream-worker
    args = build_parser().parse_args(c["args"])
    assert args.command == "run" and str(args.config) == "/etc/stream-worker/config.yaml"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_security_probes_volumes_and_shutdown(overlay):
    docs = render(f"overlays/{overlay}")
    spec = deployment(docs)["spec"]
    pod = spec["template"]["spec"]
    c = container(docs)
    assert "replicas" not in spec, "the autoscaler owns the replica count"
    assert pod["terminationGracePeriodSeconds"] == 60 > base_config()["worker"]["shutdown_grace_seconds"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsUser"] == 10001 and sc["runAsNonRoot"] is True
    assert c["ports"] == [{"name": "metrics", "containerPort": 9108, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == {"/etc/stream-worker", "/models", "/tmp"}
    weights = volumes[mounts["/models"]["name"]]
    assert mounts["/models"]["readOnly"] is True
    assert weights["persistentVolumeClaim"] == {"claimName": "apogeenet-weights", "readOnly": True}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert one(docs, "PersistentVolumeClaim")["metadata"]["name"] == "apogeenet-weights"
    # The config volume is the generated ConfigMap, hash suffix and all, holding k8s/base/config.yaml.
    config_map_name = volumes[mounts["/etc/stream-worker"]["name"]]["configMap"]["name"]
    (config_map,) = [cm for cm in by_kind(docs, "ConfigMap") if cm["metadata"]["name"] == config_map_name]
    assert re.fullmatch(r"stream-worker-config-[a-z0-9]{10}", config_map_name)
    assert config_map["data"] == {"config.yaml": BASE_CONFIG.read_text()}
    # Image set by kustomize's images: transformer.
    assert c["image"] == "registry.example.org/apogee/stream-worker:0.1.0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_overlays_ask_for_one_gpu_and_the_cpu_overlay_for_none(overlay):
    docs = render(f"overlays/{overlay}")
    c = container(docs)
    pod = deployment(docs)["spec"]["template"]["spec"]
    if overlay in GPU_RESOURCE:
        # One whole GPU, or one shared slice of one (never both).
        gpu = {k: v for k, v in c["resources"]["limits"].items() if k.startswith("nvidia.com/")}
        assert gpu == {GPU_RESOURCE[overlay]: "1"}
        assert not any(k.startswith("nvidia.com/") for k in c["resources"]["requests"])
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    else:
        assert "nvidia.com/gpu" not in json.dumps(pod)
        assert c["resources"]["requests"]["cpu"] == c["resources"]["limits"]["cpu"]


def device_plugin_configs() -> dict[str, dict]:
    """The NVIDIA device plugin's configs, by node label value, as the plugin would read them."""
    (config_map,) = render(DEVICE_PLUGIN)
    return {key: yaml.safe_load(text) for key, text in config_map["data"].items()}


def test_the_device_plugin_config_shares_gpus_as_the_shared_resource_the_pods_ask_for():
    """A node labelled nvidia.com/device-plugin.config=<key> advertises each GPU `replicas` times
    as nvidia.com/gpu.shared, the resource the gpu-shared overlay's pods request one of."""
    configs = device_plugin_configs()
    assert set(configs) == {"default", "stream-worker-time-slicing", "stream-worker-mps"}
    for key in configs:  # node label values
        assert re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", key), key
    # Unlabelled nodes: the plugin's fallback key "default", no sharing (whole GPUs, overlay gpu).
    assert configs["default"] == {"version": "v1"}
    time_slicing = configs["stream-worker-time-slicing"]
    mps = configs["stream-worker-mps"]
    assert set(time_slicing) == set(mps) == {"version", "sharing"}
    assert time_slicing["version"] == mps["version"] == "v1"
    assert set(time_slicing["sharing"]) == {"timeSlicing"} and set(mps["sharing"]) == {"mps"}
    sliced, spaced = time_slicing["sharing"]["timeSlicing"], mps["sharing"]["mps"]
    assert sliced == {"renameByDefault": True, "failRequestsGreaterThanOne": True, "resources": sliced["resources"]}
    assert spaced == sliced, "time-slicing and MPS: the same resource name, replicas and request rule"
    (resource,) = sliced["resources"]
    assert set(resource) == {"name", "replicas"} and resource["name"] == "nvidia.com/gpu"
    replicas = resource["replicas"]
    assert isinstance(replicas, int) and replicas >= 2
    # renameByDefault: the plugin advertises <name>.shared, which is what the pods ask for, one each
    # (failRequestsGreaterThanOne refuses more).
    limits = container(render("overlays/gpu-shared"))["resources"]["limits"]
    assert f"{resource['name']}.shared" == GPU_RESOURCE["gpu-shared"] and limits[GPU_RESOURCE["gpu-shared"]] == "1"
    # More slices per GPU than KEDA may ever start workers would only strand them.
    assert replicas <= one(render("overlays/gpu-shared"), "ScaledObject")["spec"]["maxReplicaCount"]
    # The docs state the same number, the label values and the resource name.
    doc = " ".join(DEPLOYMENT_DOC.read_text().split())
    stated = [re.findall(pattern, doc) for pattern in (
        r"ships with `replicas: (\d+)`", r"nvidia\.com/gpu\.shared: (\d+) per GPU", r"`nvidia\.com/gpu\.replicas=(\d+)`")]
    assert stated == [[str(replicas)]] * 3, f"docs/deployment.md says replicas {stated}, the ConfigMap has {replicas}"
    for needle in ("nvidia.com/device-plugin.config=stream-worker-time-slicing", "stream-worker-mps",
                   "nvidia.com/gpu.shared", "k8s/overlays/gpu-shared", "devicePlugin.config",
                   "the overlap benchmark", "host cost"):
        assert needle in doc, f"docs/deployment.md does not mention {needle}"


def test_the_shared_gpu_overlay_is_the_gpu_overlay_but_for_the_gpu_request_and_the_engine_settings():
    exclusive, shared = deployment(render("overlays/gpu")), deployment(render("overlays/gpu-shared"))
    exclusive, shared = json.loads(json.dumps(exclusive)), json.loads(json.dumps(shared))
    for chosen, resource in ((exclusive, "nvidia.com/gpu"), (shared, "nvidia.com/gpu.shared")):
        c = chosen["spec"]["template"]["spec"]["containers"][0]
        del c["resources"]["limits"][resource]
        c["env"] = [e for e in c["env"] if e["name"] not in ("STREAM_WORKER__ENGINE__NUM_THREADS",
                                                             "STREAM_WORKER__ENGINE__KERNELS")]
    assert shared == exclusive
    assert one(render("overlays/gpu-shared"), "ScaledObject") == one(render("overlays/gpu"), "ScaledObject")


def test_service_and_podmonitor_scrape_the_metrics_port_as_job_stream_worker():
    docs = render("overlays/gpu")
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9108, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (monitor,) = [m["spec"] for m in by_kind(docs, "PodMonitor") if m["metadata"]["name"] == "stream-worker"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    assert [e["port"] for e in monitor["podMetricsEndpoints"]] == ["metrics"]
    # job = the value of the pod label named by jobLabel: what the rules and dashboard select.
    assert pod_labels[monitor["jobLabel"]] == "stream-worker"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_sink_runs_the_same_image_on_the_same_config_with_its_password_from_a_secret(overlay):
    from stream_worker.cli import build_parser
    from stream_worker.config import ENV_PREFIX, SINK_PASSWORD_ENV, load_config

    docs = render(f"overlays/{overlay}")
    sink, worker = deployment(docs, "stream-worker-sink"), deployment(docs)
    c, pod = container(docs, "stream-worker-sink"), sink["spec"]["template"]["spec"]
    assert build_parser().parse_args(c["args"]).command == "sink" and "command" not in c
    assert c["image"] == container(docs)["image"]
    assert pod["volumes"][0] == worker["spec"]["template"]["spec"]["volumes"][0]  # the generated ConfigMap
    overrides = {e["name"]: e["value"] for e in c["env"] if "value" in e and e["name"].startswith(ENV_PREFIX)}
    config = load_config(BASE_CONFIG, environ=overrides)
    assert config.sink.topic is None and config.kafka.output_topic == "apogee.results"
    (secret,) = [e for e in c["env"] if e["name"] == SINK_PASSWORD_ENV]
    assert secret["valueFrom"]["secretKeyRef"] == {"name": "stream-worker-sink-db", "key": "password"}  # required
    assert "password" not in config.sink.database
    # At most one sink per results partition: more would idle.
    assert 1 <= sink["spec"]["replicas"] <= topics()[config.kafka.output_topic]["spec"]["partitions"]
    # Hardened like the worker; no GPU, no weights.
    assert c["securityContext"] == container(docs)["securityContext"]
    assert pod["securityContext"] == worker["spec"]["template"]["spec"]["securityContext"]
    assert "nvidia.com" not in json.dumps(sink) and "weights" not in json.dumps(pod["volumes"])
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_worker_and_sink_pods_are_selected_apart_and_scraped_as_their_own_jobs():
    docs = render("overlays/gpu")
    worker_pod = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    sink_pod = deployment(docs, "stream-worker-sink")["spec"]["template"]["metadata"]["labels"]
    monitors = {m["metadata"]["name"]: m["spec"] for m in by_kind(docs, "PodMonitor")}
    selectors = {
        "worker Deployment": deployment(docs)["spec"]["selector"]["matchLabels"],
        "worker PodMonitor": monitors["stream-worker"]["selector"]["matchLabels"],
        "Service": one(docs, "Service")["spec"]["selector"],
        "PodDisruptionBudget": one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    }
    for what, selector in selectors.items():
        assert selector.items() <= worker_pod.items() and not selector.items() <= sink_pod.items(), what
    for selector in (deployment(docs, "stream-worker-sink")["spec"]["selector"]["matchLabels"],
                     monitors["stream-worker-sink"]["selector"]["matchLabels"]):
        assert selector.items() <= sink_pod.items() and not selector.items() <= worker_pod.items()
    assert sink_pod[monitors["stream-worker-sink"]["jobLabel"]] == "stream-worker-sink"
    assert [e["port"] for e in monitors["stream-worker-sink"]["podMetricsEndpoints"]] == ["metrics"]


# ------------------------------------------------------------------------ autoscaling and topics


def topics() -> dict[str, dict]:
    return {t["spec"]["topicName"]: t for t in render("kafka-topics")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_exactly_one_autoscaler_capped_at_the_input_partitions(overlay):
    docs = render(f"overlays/{overlay}")
    scaled, hpas = by_kind(docs, "ScaledObject"), by_kind(docs, "HorizontalPodAutoscaler")
    assert len(scaled) + len(hpas) == 1, "KEDA and the HPA must never scale the same Deployment"
    kafka = base_config()["kafka"]
    (input_topic,) = kafka["input_topics"]
    partitions = topics()[input_topic]["spec"]["partitions"]
    assert partitions == 12
    if scaled:
        spec = scaled[0]["spec"]
        assert spec["scaleTargetRef"]["name"] == "stream-worker"
        assert spec["minReplicaCount"] == 1 and spec["maxReplicaCount"] == partitions
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert meta["consumerGroup"] == kafka["group_id"] == "stream-worker"
        assert meta["topic"] == input_topic == "apogee.spectra"
        assert meta["bootstrapServers"].split(",") == kafka["bootstrap_servers"]
        assert meta["offsetResetPolicy"] == kafka["auto_offset_reset"]
        assert int(meta["lagThreshold"]) == 200
        # the scaler's known pitfalls (docs/deployment.md, "Scaling"): even steps, real lag only
        assert meta["ensureEvenDistributionOfPartitions"] == "true" and meta["excludePersistentLag"] == "false"
        assert meta["allowIdleConsumers"] == "false" and "limitToPartitionsWithLag" not in meta
    else:
        spec = hpas[0]["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "stream-worker"}
        assert spec["minReplicas"] == 1 and spec["maxReplicas"] == partitions
        (metric,) = spec["metrics"]
        assert metric["type"] == "External"
        assert metric["external"]["metric"]["name"] in worker_metric_names()
        assert metric["external"]["metric"]["selector"]["matchLabels"] == {"topic": input_topic}


def test_topics_match_the_worker_config_and_the_message_size_limits():
    kafka, inputs = base_config()["kafka"], base_config()["inputs"]
    found = topics()
    assert set(found) == {*kafka["input_topics"], kafka["output_topic"], kafka["dead_letter_topic"]}
    bootstrap_cluster, bootstrap_namespace = re.fullmatch(
        r"(.+)-kafka-bootstrap\.([a-z0-9-]+):\d+", kafka["bootstrap_servers"][0]).groups()
    for name, topic in found.items():
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == bootstrap_cluster
        assert topic["metadata"]["namespace"] == bootstrap_namespace
        config = topic["spec"]["config"]
        # The producer's largest request fits, and so does the largest input plus dead-letter headers.
        assert config["max.message.bytes"] == kafka["max_request_size"] == 4194304
        assert config["max.message.bytes"] >= inputs["max_message_bytes"] + 65536
        assert kafka["max_partition_fetch_bytes"] >= config["max.message.bytes"]
        assert config["min.insync.replicas"] < topic["spec"]["replicas"]
        assert config["retention.ms"] >= 7 * 24 * 3600 * 1000


def test_the_results_topic_keeps_the_latest_record_of_each_spectrum_and_local_topics_are_alike():
    """Compacted on spectrum_id (and deleted after retention); inputs and dead letters are never
    compacted (each is evidence). The quickstart's and the tests' topics take these settings."""
    from devtools.kafka_broker import TOPIC_ROLES, local_topic_config

    kafka, found = base_config()["kafka"], topics()
    assert TOPIC_ROLES == {"input": kafka["input_topics"][0], "output": kafka["output_topic"],
                           "dead_letter": kafka["dead_letter_topic"]}
    results = found[kafka["output_topic"]]["spec"]["config"]
    assert results["cleanup.policy"] == "compact,delete" and results["min.compaction.lag.ms"] >= 3600 * 1000
    for role, name in TOPIC_ROLES.items():
        config = found[name]["spec"]["config"]
        if role != "output":
            assert config["cleanup.policy"] == "delete", name
        local = local_topic_config(role)
        assert local == {k: str(v) for k, v in config.items() if k != "min.insync.replicas"}, name
        assert local["cleanup.policy"] == config["cleanup.policy"]


# -------------------------------------------------------------------------- rules and dashboard


def test_prometheusrule_groups_are_the_plain_rule_file():
    assert yaml.safe_load(PROMETHEUSRULE_FILE.read_text()) == yaml.safe_load(prometheusrule_text()), \
        "k8s/prometheus/prometheusrule.yaml is stale: run `python -m tests.test_deployment`"
    for overlay in OVERLAYS:
        rule = one(render(f"overlays/{overlay}"), "PrometheusRule")
        assert rule["spec"]["groups"] == rules()["groups"]


def test_alerts_cover_the_failure_modes_and_use_real_metrics():
    alerts = {r["alert"]: r for g in rules()["groups"] for r in g["rules"] if "alert" in r}
    assert {"StreamWorkerDown", "StreamWorkerLagGrowing", "StreamWorkerNoProgress", "StreamWorkerDeadLetterRateHigh",
            "StreamWorkerFlagBadJump", "StreamWorkerBatchesSlow"} <= set(alerts)
    assert {"StreamWorkerSinkDown", "StreamWorkerSinkLagging", "StreamWorkerSinkTransactionFailures",
            "StreamWorkerSinkNoProgress", "StreamWorkerSinkDeadLetters"} <= set(alerts)
    known = worker_metric_names()
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        used = metrics_in(rule["expr"])
        assert used and used <= known, f"{name}: unknown metrics {used - known}"
        job = "stream-worker-sink" if name.startswith("StreamWorkerSink") else "stream-worker"
        assert f'job="{job}"' in rule["expr"], name
        assert all(m.startswith("stream_worker_sink_") == (job == "stream-worker-sink")
                   for m in used - {"up", "process_start_time_seconds"}), name


def test_promtool_checks_the_rules(tmp_path):
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "rules", str(RULES_FILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # The PrometheusRule as the operator hands it to Prometheus.
    spec_file = tmp_path / "from-prometheusrule.yml"
    spec_file.write_text(yaml.safe_dump(yaml.safe_load(PROMETHEUSRULE_FILE.read_text())["spec"]))
    result = subprocess.run([promtool, "check", "rules", str(spec_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts():
    promtool = require_tool("promtool")
    tested = yaml.safe_load(RULES_TEST_FILE.read_text())
    alerts = {case["alertname"] for test in tested["tests"] for case in test.get("alert_rule_test", [])}
    assert len(alerts) >= 2
    result = subprocess.run([promtool, "test", "rules", RULES_TEST_FILE.name], cwd=RULES_TEST_FILE.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_a_grafana_dashboard_with_a_datasource_variable():
    board = dashboard()
    assert board["uid"] == "stream-worker" and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [p for p in board["panels"]]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in panels:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_panels_cover_what_an_operator_watches():
    exprs = {title: [] for title, _ in dashboard_targets()}
    for title, target in dashboard_targets():
        exprs[title].append(target["expr"])
    text = {title: " ".join(e) for title, e in exprs.items()}

    def panel_with(*needles):
        found = [t for t, e in text.items() if all(n in e for n in needles)]
        assert found, f"no panel queries {needles}"
        return found

    panel_with("stream_worker_records_published_total", "stream_worker_messages_consumed_total")  # throughput
    for q in ("0.5", "0.95", "0.99"):
        panel_with(f"histogram_quantile({q}, sum by (le) (rate(stream_worker_end_to_end_latency_seconds_bucket")
    panel_with("stream_worker_batch_size_spectra")
    panel_with("stream_worker_inference_seconds_bucket")
    panel_with("sum by (topic, partition) (stream_worker_consumer_lag")
    panel_with("sum by (flag) (rate(stream_worker_result_flags_total")
    panel_with("sum by (reason) (rate(stream_worker_dead_letters_total")
    panel_with("count(stream_worker_ready")
    panel_with("stream_worker_sink_rows_written_total", "stream_worker_sink_dead_letters_total")
    panel_with("sum by (topic, partition) (stream_worker_sink_consumer_lag")
    panel_with("stream_worker_sink_transaction_seconds_bucket", "stream_worker_sink_transaction_failures_total")
    known = worker_metric_names()
    for title, target in dashboard_targets():
        used = metrics_in(target["expr"])
        assert used and used <= known, f"{title}: unknown metrics {used - known}"
        job = '"$job-sink"' if any(m.startswith("stream_worker_sink_") for m in used) else '"$job"'
        assert f"job={job}" in target["expr"] and 'namespace=~"$namespace"' in target["expr"], title


def test_dashboard_configmap_is_generated_from_the_json_file():
    for overlay in OVERLAYS:
        (cm,) = [c for c in by_kind(render(f"overlays/{overlay}"), "ConfigMap")
                 if c["metadata"]["name"] == "stream-worker-dashboard"]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["data"] == {"stream-worker-dashboard.json": DASHBOARD_FILE.read_text()}


# --------------------------------------------------------------------------------- the image


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_hadolint_passes():
    hadolint = require_tool("hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "info", "Dockerfile"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_worker_as_non_root_with_a_healthcheck():
    from stream_worker.cli import build_parser

    instructions = dockerfile_instructions()
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    ops = {op: arg for op, arg in final}
    args = [arg for op, arg in instructions if op == "ARG" and arg.startswith("PYTHON_IMAGE=")]
    assert args == ["PYTHON_IMAGE=python:3.11-slim-bookworm"]
    assert ops["USER"] == "10001:10001"
    assert "http://127.0.0.1:9108/healthz" in ops["HEALTHCHECK"] and '"python"' in ops["HEALTHCHECK"]
    assert "curl" not in ops["HEALTHCHECK"]
    argv = json.loads(ops["ENTRYPOINT"]) + json.loads(ops["CMD"])
    assert argv[0] == "stream-worker"
    parsed = build_parser().parse_args(argv[1:])
    assert parsed.command == "run" and str(parsed.config) == "/etc/stream-worker/config.yaml"
    labels = " ".join(arg for op, arg in final if op == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert "EXPOSE" in ops and ops["EXPOSE"] == "9108"
    # Weights are mounted, never copied in.
    copied = " ".join(arg for op, arg in instructions if op in ("COPY", "ADD"))
    assert "models" not in copied and ".pt" not in copied and not any(op == "ADD" for op, _ in instructions)


def test_the_healthcheck_command_tells_a_live_worker_from_a_dead_one():
    from devtools.kafka_broker import free_ports
    from stream_worker.streaming.metrics import HealthServer, Metrics

    (final_healthcheck,) = [arg for op, arg in dockerfile_instructions() if op == "HEALTHCHECK"]
    argv = json.loads(final_healthcheck[final_healthcheck.index("CMD") + 3:])
    assert argv[0] == "python"
    (port,) = free_ports(1)
    argv = [sys.executable, *[a.replace("127.0.0.1:9108", f"127.0.0.1:{port}") for a in argv[1:]]]
    assert subprocess.run(argv, capture_output=True, timeout=30).returncode != 0  # nothing listening
    server = HealthServer(Metrics(), lambda: (False, "no partitions assigned"), "127.0.0.1", port).start()
    try:
        assert subprocess.run(argv, capture_output=True, timeout=30).returncode == 0  # alive, even if not ready
    finally:
        server.stop()


def test_dockerfile_copies_only_what_dockerignore_lets_through():
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    assert (REPO / ".dockerignore").read_text().splitlines().count("*") == 1
    for op, arg in dockerfile_instructions():
        if op != "COPY" or arg.startswith("--from"):
            continue
        *sources, _destination = arg.split()
        for source in sources:
            assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"
            assert (REPO / source).exists(), f"COPY {source}: no such file"


def test_requirements_lock_pins_the_agreed_versions_with_hashes():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    text = (REPO / "requirements.lock").read_text()
    entries = re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+) \\\n\s+--hash=sha256:([0-9a-f]{64})$", text, re.M)
    requirement_lines = [line for line in text.splitlines() if line and not line.startswith(("#", " "))]
    assert len(entries) == len(requirement_lines) > 20, "every requirement needs ==version and one sha256"
    pins = {Requirement(name).name.lower(): v for name, v, _ in entries}
    assert pins["torch"] == "2.15.0" and pins["numpy"] == "2.4.6" and pins["kafka-python"] == "3.0.12"
    assert pins["astropy"] == "8.0.2" and "kafka-python[crc32c]==3.0.12" in text and "crc32c" in pins
    assert pins["prometheus-client"] == version("prometheus-client")
    assert pins["pyyaml"] == version("pyyaml")
    # And they satisfy the ranges the package declares.
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for line in declared:
        requirement = Requirement(line)
        assert requirement.specifier.contains(pins[requirement.name.lower()]), line


if __name__ == "__main__":
    PROMETHEUSRULE_FILE.write_text(prometheusrule_text())
    print(f"wrote {PROMETHEUSRULE_FILE.relative_to(REPO)}")
