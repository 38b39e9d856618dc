"""cluster/ files pass the validators their consumers run: Ray's launcher schema, the KubeRay CRD schemas
(what the API server enforces), and Ray Serve's config schema. Broken copies must fail, so the checks bite."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRDS = Path(os.environ.get("GENART_KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay-crds"))
MANIFESTS = {  # file -> (kind, CRD file, where the RayCluster spec sits inside .spec)
    "raycluster.yaml": ("RayCluster", "ray.io_rayclusters.yaml", None),
    "rayjob.yaml": ("RayJob", "ray.io_rayjobs.yaml", "rayClusterSpec"),
    "rayservice.yaml": ("RayService", "ray.io_rayservices.yaml", "rayClusterConfig"),
}
# The args genart.serve.app:build reads (the contract with the serving code).
SERVE_ARG_KEYS = {"models", "index", "max_upload_mb", "max_pixels", "request_timeout_s", "max_queued_requests", "autoscaling",
                  "api_key_env", "num_gpus_per_replica", "num_cpus_per_replica"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------- Ray cluster launcher


def test_aws_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(CLUSTER / "aws.yaml")
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))  # the file as written: no unknown keys
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs after merging the AWS defaults

    gpu = config["available_node_types"]["ray.worker.gpu"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1 and gpu["node_config"]["InstanceType"].startswith("g")
    for node_type in config["available_node_types"].values():
        assert "Arn" in node_type["node_config"]["IamInstanceProfile"]  # S3 through the instance role, no keys
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(config[commands])
        # the Serve app's API key (serve.yaml's api_key_env) for the Ray processes that build it: without it the
        # API on the 0.0.0.0 proxy needs no key
        assert 'GENART_API_KEY="$(cat ~/.genart_api_key)"' in " ".join(config[commands])
    assert "~/.ray/auth_token" in config["file_mounts"] and "~/.genart_api_key" in config["file_mounts"]
    serve_args = load(CLUSTER / "serve.yaml")["applications"][0]["args"]
    assert serve_args["api_key_env"] == "GENART_API_KEY"


def test_aws_launcher_commands_are_valid_bash():
    config = load(CLUSTER / "aws.yaml")
    keys = ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
            "worker_start_ray_commands")
    for command in (c for key in keys for c in config[key]):
        checked = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert checked.returncode == 0, f"{command!r}: {checked.stderr}"


@pytest.mark.parametrize("breakage", ["unknown_key", "wrong_type", "head_type_missing"])
def test_broken_launcher_config_fails(breakage):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(CLUSTER / "aws.yaml")
    if breakage == "unknown_key":
        config["available_node_types"]["ray.worker.gpu"]["max_worker"] = 4
    elif breakage == "wrong_type":
        config["max_workers"] = "four"
    else:
        config["head_node_type"] = "ray.head.typo"
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(config))


# ---------------------------------------------------------------- KubeRay CRDs


def _to_jsonschema(node):
    """An OpenAPI v3 schema from a CRD, as the Kubernetes API server applies it, in JSON-Schema terms."""
    if isinstance(node, list):
        return [_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _to_jsonschema(value) for key, value in node.items() if not key.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    # `kubectl apply` validates strictly by default: a field the schema does not know is an error, not dropped.
    if out.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(crd_file: str, version: str = "v1") -> jsonschema.Draft4Validator:
    """Validator for one CRD version. CEL rules (x-kubernetes-validations) are not evaluated here."""
    crd = load(CRDS / crd_file)
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert entry["served"] and entry["storage"], f"{crd_file} {version} is not the served storage version"
    return jsonschema.Draft4Validator(_to_jsonschema(entry["schema"]["openAPIV3Schema"]))


def check_manifest(manifest: dict, kind: str, crd_file: str) -> None:
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    errors = sorted(crd_validator(crd_file).iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        raise jsonschema.ValidationError(
            "; ".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
        )


def cluster_spec(manifest: dict, key: str | None) -> dict:
    return manifest["spec"][key] if key else manifest["spec"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_matches_crd(name):
    kind, crd_file, key = MANIFESTS[name]
    manifest = load(CLUSTER / "kuberay" / name)
    check_manifest(manifest, kind, crd_file)

    spec = cluster_spec(manifest, key)
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] < gpu["maxReplicas"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    pods = [spec["headGroupSpec"]["template"], gpu["template"]]
    for container in (c for pod in pods for c in pod["spec"]["containers"]):
        assert container["image"] == f"rayproject/ray:{ray.__version__}-py311"


def _head_container(spec: dict) -> dict:
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


BREAKAGES = {  # name -> (change to the RayCluster spec, what the error must point at)
    "unknown_field": (lambda spec: _head_container(spec).update(imagee="x"), "imagee"),
    "wrong_type": (lambda spec: spec["workerGroupSpecs"][0].update(maxReplicas="four"), "maxReplicas"),
    "bad_quantity": (lambda spec: _head_container(spec)["resources"]["limits"].update(memory="8 GB"), "limits.memory"),
    "bad_enum": (lambda spec: spec["authOptions"].update(mode="password"), "authOptions.mode"),
    "missing_required": (lambda spec: spec["workerGroupSpecs"][0].pop("groupName"), "groupName"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
@pytest.mark.parametrize("name", MANIFESTS)
def test_broken_kuberay_manifest_fails(name, breakage):
    kind, crd_file, key = MANIFESTS[name]
    manifest = load(CLUSTER / "kuberay" / name)
    change, points_at = BREAKAGES[breakage]
    change(cluster_spec(manifest, key))
    with pytest.raises(jsonschema.ValidationError, match=points_at):
        check_manifest(manifest, kind, crd_file)


def test_rayjob_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    manifest = load(CLUSTER / "kuberay" / "rayjob.yaml")
    runtime_env = RuntimeEnv(**yaml.safe_load(manifest["spec"]["runtimeEnvYAML"]))
    assert runtime_env["working_dir"].endswith(".zip") and runtime_env["pip"]
    assert manifest["spec"]["entrypoint"].startswith("genart train workflows/configs/")


# ---------------------------------------------------------------- Ray Serve


def serve_apps(config: dict) -> list[dict]:
    """Validate a Serve config file the way `serve deploy` does, plus a check for keys Ray would ignore."""
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    # Ray's schema ignores unknown keys (forward compatibility), which would hide a misspelt setting.
    sections = [(config, ServeDeploySchema), (config.get("http_options", {}), HTTPOptionsSchema)]
    sections += [(app, ServeApplicationSchema) for app in config["applications"]]
    for section, schema in sections:
        unknown = set(section) - set(schema.model_fields)
        if unknown:
            raise ValueError(f"{schema.__name__} does not know {sorted(unknown)}")
    return config["applications"]


def test_serve_config_passes_rays_serve_schema():
    (app,) = serve_apps(load(CLUSTER / "serve.yaml"))
    assert app["import_path"] == "genart.serve.app:build"
    assert set(app["args"]) == SERVE_ARG_KEYS
    assert set(app["args"]["autoscaling"]) == {"min_replicas", "max_replicas", "target_ongoing_requests"}
    assert all(isinstance(uri, str) and uri for uri in app["args"]["models"].values())
    from genart.serve.config import parse_args

    settings = parse_args(app["args"])  # genart's own schema: the replicas get a share of a GPU node's GPU
    # one deployment per model at most (styles share one) plus the search index's: one replica of each fits a GPU
    assert 0 < settings.num_gpus_per_replica * (len(settings.models) + bool(settings.index)) <= 1


def test_rayservice_runs_the_same_serve_app():
    manifest = load(CLUSTER / "kuberay" / "rayservice.yaml")
    (k8s_app,) = serve_apps(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (app,) = serve_apps(load(CLUSTER / "serve.yaml"))
    # Only addition on Kubernetes: runtime_env pip, since the stock image has no genart.
    assert k8s_app.pop("runtime_env")["pip"]
    assert k8s_app == app


@pytest.mark.parametrize("breakage", ["no_import_path", "bad_field", "bad_port"])
def test_broken_serve_config_fails(breakage):
    config = load(CLUSTER / "serve.yaml")
    app = config["applications"][0]
    if breakage == "no_import_path":
        del app["import_path"]
    elif breakage == "bad_field":
        app["num_replica"] = 2
    else:
        config["http_options"]["port"] = "eighty"
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError too
        serve_apps(config)
