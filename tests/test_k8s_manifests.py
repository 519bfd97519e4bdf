"""deploy/k8s: every rendered object validates against the Kubernetes API schemas (offline, the
schemas kubernetes-validate ships), and what matters is checked on the rendered objects: probes
on each model's ready endpoint, the restricted admin APIs and their key, grace > drain, the HPA's
metrics and their prometheus-adapter rules, GPUs only in the gpu overlay, non-root, the PDB, the
headless Service. Rendering uses `kubectl kustomize` where it exists, else the small renderer
below (checked equal to kubectl's output where both exist); no cluster is needed."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from serving import tensors

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
# Kubernetes versions the manifests must be valid for: a few still supported ones and the newest.
K8S_VERSIONS = ("1.29.0", "1.32.0", kubernetes_validate.latest_version())
MODELS = {tensors.GPT_MODEL, tensors.GENERATE_MODEL, tensors.TOKENIZER_MODEL}
ADMIN_APIS = {"model-repository", "model-config", "shared-memory", "statistics", "trace", "logging"}
DRAIN_TIMEOUT_S = 30  # issue 14's --drain-timeout default; Triton's --exit-timeout-secs here
KUBECTL = shutil.which("kubectl")


# --- rendering -------------------------------------------------------------------------------

def _merge(base: dict, patch: dict) -> None:
    """The part of a strategic merge patch these overlays use: maps merge, lists of named
    objects (containers, env, volumes) merge by name, any other list or value replaces."""
    for key, value in patch.items():
        old = base.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            _merge(old, value)
        elif (isinstance(value, list) and isinstance(old, list)
              and all(isinstance(x, dict) and "name" in x for x in old + value)):
            by_name = {item["name"]: item for item in old}
            for item in value:
                if item["name"] in by_name:
                    _merge(by_name[item["name"]], item)
                else:
                    old.append(item)
        else:
            base[key] = copy.deepcopy(value)


def render_python(directory: Path) -> list[dict]:
    """`kustomize build` for what deploy/k8s uses: resources (files, bases) and patches (path)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    assert not unsupported, f"{directory}: the test renderer does not do {sorted(unsupported)}"
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render_python(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path"}, f"{directory}: only patches with a path: {patch}"
        for doc in yaml.safe_load_all((directory / patch["path"]).read_text()):
            (target,) = [o for o in objects if (o["kind"], o["metadata"]["name"]) == (doc["kind"], doc["metadata"]["name"])]
            _merge(target, doc)
    return objects


def render_kubectl(directory: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _by_key(objects: list[dict]) -> dict[tuple[str, str], dict]:
    keyed = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(keyed) == len(objects), "two objects of one kind share a name"
    return keyed


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> str:
    return request.param


_RENDERED: dict[str, dict] = {}


def rendered(name: str) -> dict[tuple[str, str], dict]:
    if name not in _RENDERED:
        directory = K8S / "overlays" / name
        _RENDERED[name] = _by_key(render_kubectl(directory) if KUBECTL else render_python(directory))
    return copy.deepcopy(_RENDERED[name])


def triton(objects: dict) -> tuple[dict, dict]:
    pod = objects["Deployment", "gptpipe-triton"]["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "triton"]
    return pod, container


def flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return value


# --- rendering and schemas -----------------------------------------------------------------

@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: nothing to compare the renderer with")
def test_the_python_renderer_gives_what_kubectl_kustomize_gives(overlay: str) -> None:
    directory = K8S / "overlays" / overlay
    assert _by_key(render_python(directory)) == _by_key(render_kubectl(directory))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(overlay: str, version: str) -> None:
    objects = rendered(overlay)
    assert {kind for kind, _ in objects} == {"Deployment", "Service", "PodDisruptionBudget",
                                             "HorizontalPodAutoscaler", "PersistentVolumeClaim"}
    for obj in objects.values():
        kubernetes_validate.validate(obj, version, strict=True)  # raises on any error


def test_the_schema_check_catches_a_misspelled_field() -> None:
    deployment = rendered("gpu")["Deployment", "gptpipe-triton"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


# --- Triton ----------------------------------------------------------------------------------

def test_readiness_and_startup_check_each_models_ready_endpoint(overlay: str) -> None:
    _, container = triton(rendered(overlay))
    for probe in ("readinessProbe", "startupProbe"):
        argv = container[probe]["exec"]["command"]
        assert argv[:3] == ["python3", "-m", "serving.health"]
        assert set(flag_pairs(argv)["--models"].split(",")) == MODELS
        assert flag_pairs(argv)["--url"] == f"127.0.0.1:{port(container, 'http')}"
        # the check's own bound fits inside the kubelet's
        assert float(flag_pairs(argv)["--timeout"]) < container[probe]["timeoutSeconds"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 300


def flag_pairs(argv: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--")}


def port(container: dict, name: str) -> int:
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return number


def test_triton_loads_the_read_only_repository_once_and_restricts_the_admin_apis(overlay: str) -> None:
    pod, container = triton(rendered(overlay))
    args = container["command"]
    assert args[0] == "tritonserver"
    assert flag(args, "--model-control-mode") == "none"
    assert flag(args, "--strict-readiness") == "true"
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == flag(args, "--model-repository")]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    for option in ("--http-restricted-api", "--grpc-restricted-protocol"):
        apis, key = flag(args, option).split(":", 1)
        assert set(apis.split(",")) == ADMIN_APIS  # health, metadata and inference stay open
        assert key == "admin-key=$(GPTPIPE_ADMIN_KEY)"
    (env,) = [e for e in container["env"] if e["name"] == "GPTPIPE_ADMIN_KEY"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "gptpipe-keys", "key": "admin-key"}


def test_the_grace_period_outlasts_prestop_plus_the_drain(overlay: str) -> None:
    pod, container = triton(rendered(overlay))
    drain = int(flag(container["command"], "--exit-timeout-secs"))
    assert drain == DRAIN_TIMEOUT_S
    (pre_stop,) = [int(a) for a in container["lifecycle"]["preStop"]["exec"]["command"][1:]]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 5


def test_gpus_are_asked_for_in_the_gpu_overlay_only() -> None:
    for overlay_name in OVERLAYS:
        objects = rendered(overlay_name)
        for (kind, name), obj in objects.items():
            if kind != "Deployment":
                continue
            for container in obj["spec"]["template"]["spec"]["containers"]:
                resources = container["resources"]
                gpus = {k: resources.get(k, {}).get("nvidia.com/gpu") for k in ("requests", "limits")}
                if overlay_name == "gpu" and name == "gptpipe-triton":
                    assert gpus == {"requests": 1, "limits": 1}
                else:
                    assert gpus == {"requests": None, "limits": None}, f"{overlay_name}/{name} asks for a GPU"
                assert set(resources) == {"requests", "limits"} and resources["requests"]["memory"]
        assert ("nvidia.com/gpu" in yaml.safe_dump(list(objects.values()))) == (overlay_name == "gpu")


def test_every_pod_runs_as_the_images_non_root_user(overlay: str) -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    for (kind, name), obj in rendered(overlay).items():
        if kind != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and (str(ctx["runAsUser"]), str(ctx["runAsGroup"])) == user, name
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
            assert sc.get("runAsUser", ctx["runAsUser"]) != 0


def test_the_pdb_covers_the_triton_pods_and_leaves_replicas_serving(overlay: str) -> None:
    objects = rendered(overlay)
    labels = objects["Deployment", "gptpipe-triton"]["spec"]["template"]["metadata"]["labels"]
    pdb = objects["PodDisruptionBudget", "gptpipe-triton"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] < objects["HorizontalPodAutoscaler", "gptpipe-triton"]["spec"]["minReplicas"]
    frontend_labels = objects["Deployment", "gptpipe-openai"]["spec"]["template"]["metadata"]["labels"]
    assert objects["PodDisruptionBudget", "gptpipe-openai"]["spec"]["selector"]["matchLabels"].items() <= frontend_labels.items()


def test_triton_is_behind_a_headless_service_the_frontend_is_given(overlay: str) -> None:
    objects = rendered(overlay)
    _, container = triton(objects)
    labels = objects["Deployment", "gptpipe-triton"]["spec"]["template"]["metadata"]["labels"]
    service = objects["Service", "gptpipe-triton"]["spec"]
    assert service["clusterIP"] == "None" and not service.get("publishNotReadyAddresses", False)
    assert service["selector"].items() <= labels.items()
    ports = {p["name"]: p for p in service["ports"]}
    assert {p["targetPort"] for p in ports.values()} == {p["name"] for p in container["ports"]}
    assert "replicas" not in objects["Deployment", "gptpipe-triton"]["spec"]  # the HPA owns it

    frontend = objects["Deployment", "gptpipe-openai"]["spec"]["template"]["spec"]["containers"][0]
    argv = frontend["command"]
    assert argv[:2] == ["gptpipe", "openai"]
    pairs = flag_pairs(argv)
    assert set(pairs) == {"--url", "--host", "--port", "--served-model-name", "--api-key"}
    assert pairs["--url"] == f"dns:///gptpipe-triton:{ports['grpc']['port']}"  # routed, even with one pod now
    assert pairs["--api-key"] == "$(GPTPIPE_API_KEY)" and pairs["--host"] == "0.0.0.0"
    keys = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in frontend["env"] if "valueFrom" in e}
    assert keys == {"GPTPIPE_API_KEY": {"name": "gptpipe-keys", "key": "api-key"},
                    "GPTPIPE_ADMIN_KEY": {"name": "gptpipe-keys", "key": "admin-key"}}
    front_service = objects["Service", "gptpipe-openai"]["spec"]
    assert front_service.get("clusterIP") != "None" and front_service["ports"][0]["targetPort"] == "http"
    assert int(pairs["--port"]) == port(frontend, "http")
    assert ("Secret", "gptpipe-keys") not in objects  # keys are made per cluster, never shipped


def test_prometheus_scrapes_triton_and_the_frontend(overlay: str) -> None:
    objects = rendered(overlay)
    for name, port_name in (("gptpipe-triton", "metrics"), ("gptpipe-openai", "http")):
        template = objects["Deployment", name]["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        container = template["spec"]["containers"][0]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) == port(container, port_name)


# --- autoscaling -----------------------------------------------------------------------------

def adapter_rules() -> dict[str, dict]:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    return {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}


def test_the_hpa_scales_triton_on_serving_metrics_the_adapter_rules_provide(overlay: str) -> None:
    objects = rendered(overlay)
    hpa = objects["HorizontalPodAutoscaler", "gptpipe-triton"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gptpipe-triton"}
    assert {m["type"] for m in hpa["metrics"]} == {"Pods"}  # no CPU or memory
    names = {m["pods"]["metric"]["name"] for m in hpa["metrics"]}
    rules = adapter_rules()
    assert names == set(rules) == {"avg_time_queue_us", "gptpipe_kv_occupancy"}
    queue = rules["avg_time_queue_us"]["metricsQuery"]
    assert "nv_inference_queue_duration_us{<<.LabelMatchers>>}" in queue
    assert "nv_inference_request_success{<<.LabelMatchers>>}" in queue
    for rule in rules.values():
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
        assert re.fullmatch(rule["name"]["matches"], series)
    # conservative scale-down: a removed replica drops the KV caches of its sequences
    down = hpa["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 600
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"])
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]


def test_the_kv_occupancy_rule_reads_gauges_the_gpt_model_exports() -> None:
    step_py = (ROOT / "serving" / "engine" / "step.py").read_text()  # the gpt model's metrics
    query = adapter_rules()["gptpipe_kv_occupancy"]["metricsQuery"]
    used = set(re.findall(r"(gptpipe_\w+)\{", query))
    assert used == {"gptpipe_kv_active_sequences", "gptpipe_kv_free_slots"}
    for name in used:
        assert re.search(rf'"gauge", "{name}"', step_py), f"the gpt model exports no gauge {name}"


# --- the flags against a real tritonserver ------------------------------------------------------

def _status(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_manifests_restriction_flags_work_on_a_real_tritonserver(tmp_path, triton_server_factory) -> None:
    """Triton itself parses the flags as written in the manifest: admin APIs refused without the
    key (HTTP 403, gRPC error) and answered with it; health and inference stay open."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from tests.triton_fixtures import write_echo_repository

    _, container = triton(rendered("cpu"))
    key = "test-admin-key-123"
    flags = [a.replace("$(GPTPIPE_ADMIN_KEY)", key) for a in container["command"] if "restricted" in a]
    assert len(flags) == 2
    server = triton_server_factory(write_echo_repository(tmp_path / "repo"), extra_args=flags)
    base = f"http://{server.http_url}"
    admin = {"admin-key": key}
    assert _status(f"{base}/v2/health/ready") == 200
    assert _status(f"{base}/v2/models/echo/ready") == 200
    for path, data in (("/v2/models/echo/config", None), ("/v2/repository/index", b"{}"),
                       ("/v2/models/echo/stats", None), ("/v2/logging", None), ("/v2/systemsharedmemory/status", None)):
        assert _status(f"{base}{path}", data=data) == 403, path
        assert _status(f"{base}{path}", admin, data) == 200, path
        assert _status(f"{base}{path}", {"admin-key": "wrong"}, data) == 403, path
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException):
            client.get_model_config("echo", client_timeout=10)
        with pytest.raises(InferenceServerException, match="triton-grpc-protocol-admin-key"):
            client.get_model_config("echo", headers=admin, client_timeout=10)  # HTTP's header name
        # over gRPC, Triton expects the key's name with a prefix
        grpc_admin = {"triton-grpc-protocol-admin-key": key}
        assert client.get_model_config("echo", headers=grpc_admin, client_timeout=10).config.name == "echo"
        assert client.is_model_ready("echo", client_timeout=10)
    finally:
        client.close()
    # and the readiness probe's command, pointed at this server, says ready / not ready
    probe = container["readinessProbe"]["exec"]["command"]
    pairs = flag_pairs(probe)
    argv = [a.replace(pairs["--url"], server.http_url).replace(pairs["--models"], "echo") for a in probe]
    run = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    argv = [a.replace(pairs["--url"], server.http_url) for a in probe]  # gpt, generate, tokenizer: absent
    run = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=30)
    assert run.returncode == 1 and "/v2/models/gpt/ready: HTTP 400" in run.stderr, run.stderr


def test_the_readme_commands_name_real_overlays() -> None:
    readme = (K8S / "README.md").read_text()
    for command in re.findall(r"^kubectl apply -k (\S+)$", readme, re.M):
        assert (ROOT / command / "kustomization.yaml").is_file(), command
    assert "kubectl apply -k deploy/k8s/overlays/gpu" in readme


@pytest.mark.skipif(KUBECTL is None, reason="the README's overlay uses JSON patches and images: kubectl renders them")
def test_the_readmes_baked_image_overlay_drops_the_volume_and_validates(tmp_path) -> None:
    readme = (K8S / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "$patch: delete" in b]
    overlay = yaml.safe_load(block)
    (base,) = overlay["resources"]
    overlay["resources"] = [os.path.relpath(K8S / "overlays" / Path(base).name, tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    out = subprocess.run([KUBECTL, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(tmp_path)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    objects = _by_key([d for d in yaml.safe_load_all(out) if d])
    assert ("PersistentVolumeClaim", "gptpipe-model-repository") not in objects
    pod, container = triton(objects)
    assert {v["name"] for v in pod["volumes"]} == {"dshm", "tmp"}
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/dev/shm", "/tmp"}
    assert container["image"] == "registry.example.com/gptpipe-triton-gpt2:1"
    assert flag(container["command"], "--model-repository") == "/models"  # now the image's own files
    for obj in objects.values():
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
