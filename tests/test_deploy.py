"""What can be checked of the deployment without a Docker engine or a cluster: docker-compose.yml, the
Dockerfiles in deploy/ and the Kubernetes manifests in deploy/k8s parse, point at real paths, use real
commands and settings, publish nothing beyond 127.0.0.1, and validate against the Kubernetes schemas."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ENV_EXAMPLE = ROOT / ".env.example"
NAMESPACE = "lbgat"
# Kubernetes versions the manifests must validate against: an older supported one and the newest schema.
K8S_VERSIONS = ("1.30.0", "latest")


# -- helpers -----------------------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not KEY=VALUE"
            pairs[key] = value
    return pairs


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current += " " + line.removesuffix("\\").strip() if current else line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            word, _, rest = current.partition(" ")
            instructions.append((word.upper(), rest.strip()))
            current = ""
    assert not current, f"{path.name}: a line continuation runs past the end"
    return instructions


def arg_default(path: Path, name: str) -> str:
    for word, rest in dockerfile_instructions(path):
        if word == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"{path.name}: no ARG {name}=<default>")


def exec_form(rest: str) -> list[str]:
    value = yaml.safe_load(rest)
    assert isinstance(value, list), f"not the exec (JSON) form: {rest}"
    return value


def dockerfile_of(service: dict[str, Any]) -> Path:
    build = service["build"]
    return ROOT / build["context"] / build.get("dockerfile", "Dockerfile")


def serve_flags() -> set[str]:
    from service.client.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {flag for action in sub.choices["serve"]._actions for flag in action.option_strings}


@cache
def ray_start_flags() -> frozenset[str]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ray's CLI module imports Ray Serve, which warns about pydantic
        from ray.scripts.scripts import start

    return frozenset(opt for param in start.params for opt in param.opts)


def check_lbgat_serve(argv: list[str], where: str) -> None:
    assert argv[:2] == ["lbgat", "serve"], f"{where}: {argv}"
    flags = serve_flags()
    for arg in argv[2:]:
        if arg.startswith("-"):
            assert arg.split("=", 1)[0] in flags, f"{where}: `lbgat serve` has no flag {arg}"
    assert argv[argv.index("--host") + 1] == "0.0.0.0", f"{where}: a container must listen on 0.0.0.0"


def check_ray_start(argv: list[str], where: str) -> None:
    assert argv[:2] == ["ray", "start"], f"{where}: {argv}"
    for arg in argv[2:]:
        assert arg.startswith("--"), f"{where}: unexpected argument {arg}"
        assert arg.split("=", 1)[0] in ray_start_flags(), f"{where}: `ray start` has no flag {arg}"
    assert "--block" in argv, f"{where}: `ray start` must stay in the foreground (--block)"


def settings_env_names() -> set[str]:
    from service.settings import ServiceSettings
    from workers.settings import StoreSettings, env_name

    return {env_name(field) for cls in (ServiceSettings, StoreSettings) for field in cls.model_fields}


# -- Dockerfiles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Dockerfile.api", "Dockerfile.ray", "Dockerfile.trainer"])
def test_dockerfile_copies_existing_paths(name):
    instructions = dockerfile_instructions(DEPLOY / name)
    assert instructions[0][0] in ("FROM", "ARG"), f"{name} starts with {instructions[0][0]}"
    copies = [shlex.split(rest) for word, rest in instructions if word == "COPY"]
    assert copies, f"{name} copies nothing"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for args in copies:
        for source in [a for a in args if not a.startswith("--")][:-1]:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: not in the repository"
            assert source not in ignored, f"{name}: COPY {source}, which .dockerignore leaves out"


def test_trainer_dockerfile_runs_a_preset():
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile.trainer")
    args = exec_form(next(rest for word, rest in instructions if word == "CMD"))
    from api_schemas.presets import PRESETS

    assert args[0] == "train" and args[args.index("--preset") + 1] in PRESETS


def test_api_image_installs_only_the_service_extra_and_runs_lbgat_serve():
    path = DEPLOY / "Dockerfile.api"
    instructions = dockerfile_instructions(path)
    assert instructions[0] == ("ARG", "PYTHON_VERSION=3.11")
    assert next(rest for word, rest in instructions if word == "FROM").endswith("-slim")
    installs = [rest for word, rest in instructions if word == "RUN" and "pip install" in rest]
    assert len(installs) == 1, installs
    requirements = re.findall(r'"([^"]+)"', installs[0].split("&&")[0])
    assert requirements == [".[service]", "ray[default]==${RAY_VERSION}"], requirements
    assert "torch" not in installs[0].split("&&")[0], "the API image must not install torch"
    assert (
        "service"
        in __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"][
            "optional-dependencies"
        ]
    )
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0"), "the API must run as a non-root user"
    healthcheck = next(rest for word, rest in instructions if word == "HEALTHCHECK")
    assert "/healthz" in healthcheck and "8000" in healthcheck
    check_lbgat_serve(exec_form(next(rest for word, rest in instructions if word == "CMD")), path.name)


def test_ray_image_installs_the_workers_extra_and_can_run_the_job_entrypoint():
    import importlib.util

    from service.settings import ServiceSettings

    path = DEPLOY / "Dockerfile.ray"
    instructions = dockerfile_instructions(path)
    assert "pytorch/pytorch" in arg_default(path, "BASE_IMAGE") and "cuda" in arg_default(path, "BASE_IMAGE")
    install = next(rest for word, rest in instructions if word == "RUN" and "pip install" in rest)
    assert '".[workers]"' in install and '"ray[default,train,tune]==${RAY_VERSION}"' in install
    users = [rest for word, rest in instructions if word == "USER"]
    assert users[-1] == "ray"
    # What the control plane asks Ray to run must import on the nodes.
    settings = ServiceSettings(_env_file=None)
    entrypoint = settings.worker_entrypoint.format(python=settings.worker_python, job_id="x").split()
    assert entrypoint[1] == "-m" and importlib.util.find_spec(entrypoint[2]) is not None
    assert f"import torch, ray, {entrypoint[2]}" in install
    check_ray_start(exec_form(next(rest for word, rest in instructions if word == "CMD")), path.name)


def test_ray_version_is_the_same_everywhere():
    version = arg_default(DEPLOY / "Dockerfile.api", "RAY_VERSION")
    assert arg_default(DEPLOY / "Dockerfile.ray", "RAY_VERSION") == version
    assert env_example()["RAY_VERSION"] == version
    for name in ("ray-head", "api"):
        assert services()[name]["build"]["args"]["RAY_VERSION"] == f"${{RAY_VERSION:-{version}}}"
    assert load_k8s("raycluster.yaml")[0]["spec"]["rayVersion"] == version


# -- docker-compose.yml ------------------------------------------------------------------------------


def test_compose_services_have_an_image_or_a_build_from_existing_dockerfiles():
    assert {"minio", "minio-init", "postgres", "ray-head", "ray-gpu-worker", "ray-cpu-worker", "api"} <= set(
        services()
    )
    for name, service in services().items():
        assert "image" in service or "build" in service, f"{name}: neither image nor build"
        if "build" in service:
            assert dockerfile_of(service).is_file(), f"{name}: {dockerfile_of(service)} missing"
    assert dockerfile_of(services()["api"]).name == "Dockerfile.api"
    for name in ("ray-head", "ray-gpu-worker", "ray-cpu-worker"):
        assert dockerfile_of(services()[name]).name == "Dockerfile.ray", name
        assert services()[name]["image"] == services()["ray-head"]["image"]


def test_compose_publishes_ports_on_localhost_only():
    published = {}
    for name, service in services().items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), (
                f"{name}: {port} listens beyond localhost"
            )
            published[name] = port
    assert set(published) == {"api", "ray-head", "minio", "prometheus", "grafana"}, published
    assert published["ray-head"].endswith(":8265") and published["api"].endswith(":8000")
    assert published["prometheus"].endswith(":9090") and published["grafana"].endswith(":3000")
    assert published["minio"].endswith(":9001"), "only MinIO's console is published, not its S3 port"
    for name in ("postgres", "ray-gpu-worker", "ray-cpu-worker", "minio-init"):
        assert "expose" not in services()[name]


def test_compose_volumes_are_declared_or_repository_paths():
    declared = set(compose()["volumes"])
    used = set()
    for name, service in services().items():
        for volume in service.get("volumes", []):
            match = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(:ro|:rw)?", volume)
            assert match, f"{name}: {volume} is not SOURCE:TARGET[:ro]"
            source, target = match.group(1), match.group(2)
            assert target.startswith("/"), f"{name}: {volume}"
            if source.startswith(("./", "${")):
                continue  # a bind mount of a repository folder (data, runs) or of DATA_DIR
            assert source in declared, f"{name}: volume {source} is not declared under volumes:"
            used.add(source)
    assert (
        used
        == declared
        == {
            "postgres-data",
            "minio-data",
            "api-state",
            "prometheus-data",
            "grafana-data",
            "grafana-dashboards",
        }
    )
    assert "postgres-data:/var/lib/postgresql/data" in services()["postgres"]["volumes"]
    assert "minio-data:/data" in services()["minio"]["volumes"]
    assert "api-state:/var/lib/lbgat" in services()["api"]["volumes"]


def test_compose_variables_have_defaults_or_come_from_the_env_example():
    text = (ROOT / "docker-compose.yml").read_text()
    example = env_example()
    # ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}; $${VAR} is the container's own variable.
    found = re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?][^}]*)?\}", text)
    assert found
    variables = {}
    for var, modifier in found:
        variables.setdefault(var, set()).add(modifier[:2] if modifier else "")
    for var, modifiers in variables.items():
        has_default = any(m.lstrip(":").startswith("-") for m in modifiers)
        assert has_default or var in example, f"${{{var}}} has no default and is not in .env.example"
        if any(m.lstrip(":").startswith("?") for m in modifiers):
            assert var in example, f"{var} is required by compose but missing from .env.example"
    for secret in (
        "POSTGRES_PASSWORD",
        "MINIO_ROOT_PASSWORD",
        "S3_SECRET_KEY",
        "RAY_AUTH_TOKEN",
        "ADMIN_TOKEN",
    ):
        assert variables[secret] == {":?"}, f"{secret} must be required (no default secret)"
        assert "CHANGE-ME" in example[secret]
    assert not [k for k in example if k not in variables], "stale entries in .env.example"
    # The same .env is read by `lbgat serve` in this directory: it must hold no LBGAT_* setting.
    assert not [k for k in example if k.startswith("LBGAT_")]
    assert len(example["MINIO_ROOT_PASSWORD"]) >= 8, "MinIO refuses root passwords under 8 characters"


def test_compose_starts_in_order_on_healthy_dependencies():
    for name, service in services().items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services(), f"{name} depends on unknown {dependency}"
            condition = condition["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services()[dependency], (
                    f"{name} waits for {dependency}'s health check"
                )
            else:
                assert condition == "service_completed_successfully", f"{name}: {condition}"
                assert services()[dependency].get("restart") == "no", f"{dependency} is a one-shot"
    api = services()["api"]["depends_on"]
    assert api == {
        "postgres": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
        "ray-head": {"condition": "service_healthy"},
    }
    assert services()["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    for worker in ("ray-gpu-worker", "ray-cpu-worker"):
        assert services()[worker]["depends_on"]["ray-head"] == {"condition": "service_healthy"}
    assert "healthcheck" in services()["api"]
    assert "mc mb --ignore-existing" in services()["minio-init"]["command"][0]


def test_compose_ray_nodes_share_a_token_with_the_api_and_have_the_store():
    api_env = services()["api"]["environment"]
    assert api_env["LBGAT_RAY_ADDRESS"] == "http://ray-head:8265"
    assert api_env["LBGAT_PASS_STORE_CREDENTIALS"] == "false"
    for name in ("ray-head", "ray-gpu-worker", "ray-cpu-worker"):
        env = services()[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"] == api_env["LBGAT_RAY_AUTH_TOKEN"], name
        for key in (
            "LBGAT_ARTIFACT_STORE",
            "LBGAT_S3_ENDPOINT",
            "LBGAT_S3_ACCESS_KEY",
            "LBGAT_S3_SECRET_KEY",
        ):
            assert env[key] == api_env[key], f"{name}: {key} differs from the API's"
    known = settings_env_names()
    assert not [k for k in api_env if k not in known], "api: LBGAT_* variables that no setting reads"


def test_compose_commands_use_real_flags_and_gpus_only_where_meant():
    check_lbgat_serve(services()["api"]["command"], "compose api")
    head = services()["ray-head"]["command"]
    check_ray_start(head, "compose ray-head")
    assert "--head" in head and "--num-gpus=0" in head and "--dashboard-host=0.0.0.0" in head
    for name in ("ray-gpu-worker", "ray-cpu-worker"):
        command = services()[name]["command"]
        check_ray_start(command, f"compose {name}")
        assert "--address=ray-head:6379" in command
    gpu = services()["ray-gpu-worker"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "profiles" not in gpu, "the GPU worker is part of the default stack"
    cpu = services()["ray-cpu-worker"]
    assert cpu["profiles"] == ["cpu"] and "--num-gpus=0" in cpu["command"] and "deploy" not in cpu
    assert "deploy" not in services()["ray-head"], "the head holds no GPU"
    for name in ("trainer", "trainer-cpu"):
        assert services()[name]["profiles"], f"{name} is a tool, not part of `docker compose up`"


# -- Kubernetes --------------------------------------------------------------------------------------


def load_k8s(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def kustomization_dirs() -> list[Path]:
    return [K8S, K8S / "optional"]


@pytest.mark.parametrize("folder", kustomization_dirs(), ids=lambda p: p.name)
def test_kustomization_lists_exactly_the_manifests(folder):
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), f"{folder.name}: listed twice"
    present = sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present, f"{folder.name}: kustomization lists {listed}, folder has {present}"
    assert not list(folder.glob("*.yml")), "use .yaml"
    commented = re.findall(r"^#\s+- (\w+)$", (folder / "kustomization.yaml").read_text(), re.MULTILINE)
    for component in commented:
        assert (folder / component / "kustomization.yaml").is_file(), component


def all_manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for folder in kustomization_dirs():
        for path in sorted(folder.glob("*.yaml")):
            if path.name != "kustomization.yaml":
                where = str(path.relative_to(K8S))
                docs += [(where, doc) for doc in load_k8s(where)]
    return docs


def validate_core(doc: dict[str, Any], where: str) -> None:
    import kubernetes_validate

    for version in K8S_VERSIONS:
        version = kubernetes_validate.latest_version() if version == "latest" else version
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            raise AssertionError(
                f"{where}: {doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}"
            ) from None


def test_core_manifests_validate_against_the_kubernetes_schemas():
    kinds = set()
    for where, doc in all_manifests():
        if doc["apiVersion"].startswith("ray.io/"):
            continue  # a CRD: checked by test_raycluster_*
        validate_core(doc, where)
        kinds.add(doc["kind"])
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{where}: {doc['metadata']['name']}"
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "ServiceAccount"} <= kinds


def test_the_validator_does_refuse_a_broken_manifest():
    deployment = next(doc for _, doc in all_manifests() if doc["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = [8000]
    with pytest.raises(AssertionError, match="livenessProbe"):
        validate_core(broken, "broken")


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for where, doc in all_manifests():
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            specs.append((f"{where}:{doc['metadata']['name']}", doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "RayCluster":
            specs.append((f"{where}:head", doc["spec"]["headGroupSpec"]["template"]["spec"]))
            for group in doc["spec"]["workerGroupSpecs"]:
                specs.append((f"{where}:{group['groupName']}", group["template"]["spec"]))
    return specs


def test_pods_reference_existing_secrets_and_configmaps_and_drop_privileges():
    secrets = {
        doc["metadata"]["name"]: set(doc.get("stringData", {})) | set(doc.get("data", {}))
        for _, doc in all_manifests()
        if doc["kind"] == "Secret"
    }
    configmaps = {doc["metadata"]["name"] for _, doc in all_manifests() if doc["kind"] == "ConfigMap"}
    assert {"lbgat-metrics", "lbgat-grafana"} <= set(secrets)
    for where, spec in pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, f"{where}: volume {volume['name']}"
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, f"{where}: volume {volume['name']}"
        for container in spec.get("initContainers", []) + spec["containers"]:
            assert container["resources"]["limits"], f"{where}/{container['name']}: no limits"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, f"{where}: {source}"
                else:
                    assert source["configMapRef"]["name"] in configmaps, f"{where}: {source}"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], f"{where}: {env['name']} -> {ref}"


def test_secrets_are_marked_templates_and_the_pods_refuse_them():
    for where, doc in all_manifests():
        if doc["kind"] == "Secret":
            values = doc["stringData"]
            assert any("CHANGE-ME" in v for v in values.values()), f"{where}: {doc['metadata']['name']}"
            assert "data" not in doc, f"{where}: templates use stringData"
            assert "TEMPLATE" in (K8S / where).read_text().splitlines()[0]
    guarded = [
        where
        for where, spec in pod_specs()
        if any(c["name"] == "check-secrets" for c in spec.get("initContainers", []))
    ]
    assert any("lbgat-api" in w for w in guarded) and any(w.endswith(":head") for w in guarded), guarded


def test_api_deployment_probes_settings_and_image():
    (deployment,) = [
        doc
        for _, doc in all_manifests()
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "lbgat-api"
    ]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("lbgat-orchestrator/api:")
    check_lbgat_serve(container["command"], "k8s api")
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["ports"][0]["containerPort"] == 8000
    (service,) = [
        doc
        for _, doc in all_manifests()
        if doc["kind"] == "Service" and doc["metadata"]["name"] == "lbgat-api"
    ]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # Every LBGAT_* key the API gets is a setting the service or the store reads.
    known = settings_env_names()
    (config,) = load_k8s("configmap.yaml")
    env = {e["name"]: e for e in container["env"]}
    assert env["LBGAT_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "lbgat-metrics",
        "key": "METRICS_TOKEN",
    }
    keys = set(config["data"]) | {
        k
        for _, doc in all_manifests()
        if doc["kind"] == "Secret"
        for k in doc["stringData"]
        if k.startswith("LBGAT_")
    }
    assert not sorted(k for k in keys if k not in known)
    assert config["data"]["LBGAT_PASS_STORE_CREDENTIALS"] == "false"


def test_raycluster_has_a_gpu_worker_group_with_autoscaling_bounds():
    (cluster,) = load_k8s("raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["namespace"] == NAMESPACE
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    for key, value in head["rayStartParams"].items():
        assert isinstance(value, str), f"rayStartParams.{key} must be a string"
        assert f"--{key}" in ray_start_flags(), f"`ray start` has no flag --{key}"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for group in groups:
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert isinstance(group["rayStartParams"], dict)
        container = group["template"]["spec"]["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert (
            container["resources"]["limits"]["nvidia.com/gpu"]
            == container["resources"]["requests"]["nvidia.com/gpu"]
        )
    for container in [head_container] + [g["template"]["spec"]["containers"][0] for g in groups]:
        assert container["image"].startswith("lbgat-orchestrator/ray:")
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "lbgat-ray-auth"
        assert {"configMapRef": {"name": "lbgat-config"}} in container["envFrom"]
        assert {"secretRef": {"name": "lbgat-s3"}} in container["envFrom"]
    autoscaler_env = {e["name"] for e in spec["autoscalerOptions"]["env"]}
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= autoscaler_env
    # The API reaches the head through the Service KubeRay creates: <name>-head-svc.
    (config,) = load_k8s("configmap.yaml")
    assert config["data"]["LBGAT_RAY_ADDRESS"] == f"http://{cluster['metadata']['name']}-head-svc:8265"


kubectl = shutil.which("kubectl")


@pytest.mark.skipif(kubectl is None, reason="kubectl (kustomize) is not installed")
@pytest.mark.parametrize("with_optional", [False, True], ids=["external", "in-cluster"])
def test_kustomize_renders_and_the_result_validates(with_optional):
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.relpath(K8S, tmp)
        overlay = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [base],
        }
        if with_optional:
            overlay["components"] = [f"{base}/optional"]
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
        out = subprocess.run([kubectl, "kustomize", tmp], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    for doc in docs:
        if not doc["apiVersion"].startswith("ray.io/"):
            validate_core(doc, "kustomize output")
    kinds = [doc["kind"] for doc in docs]
    assert kinds.count("RayCluster") == 1 and ("StatefulSet" in kinds) == with_optional
    images = re.findall(r"image: (\S+)", out.stdout)
    assert not [i for i in images if i.startswith("lbgat-orchestrator/")], (
        "kustomize images: left an image unset"
    )
    (config,) = [
        doc for doc in docs if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "lbgat-config"
    ]
    assert (config["data"]["LBGAT_S3_ENDPOINT"] == "minio:9000") == with_optional


# -- metrics: Prometheus, Grafana, the Ray dashboard -------------------------------------------------

MONITORING = DEPLOY / "monitoring"
promtool = shutil.which("promtool")


def compose_prometheus() -> dict[str, Any]:
    return yaml.safe_load((MONITORING / "prometheus.yml").read_text())


def k8s_docs(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in all_manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def k8s_prometheus() -> dict[str, Any]:
    return yaml.safe_load(k8s_docs("ConfigMap", "lbgat-prometheus")["data"]["prometheus.yml"])


def scrape_jobs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_ray_serves_the_service_discovery_that_prometheus_reads():
    """Both Prometheus configurations find the Ray nodes through the head's /api/prometheus/sd,
    a route of this Ray release's dashboard (the HTTP form of prom_metrics_service_discovery.json)."""
    import inspect

    from ray.dashboard.modules.reporter import reporter_head

    assert '@routes.get("/api/prometheus/sd")' in inspect.getsource(reporter_head)
    compose_sd = scrape_jobs(compose_prometheus())["ray"]["http_sd_configs"][0]
    k8s_sd = scrape_jobs(k8s_prometheus())["ray"]["http_sd_configs"][0]
    head = services()["ray-head"]["command"]
    assert (
        compose_sd["url"]
        == f"http://ray-head:{head[head.index('--dashboard-port=8265')].split('=')[1]}/api/prometheus/sd"
    )
    (cluster,) = load_k8s("raycluster.yaml")
    assert k8s_sd["url"] == f"http://{cluster['metadata']['name']}-head-svc:8265/api/prometheus/sd"
    for sd in (compose_sd, k8s_sd):
        assert sd["authorization"]["type"] == "Bearer", "the dashboard has Ray's token auth on"


def test_compose_prometheus_reads_its_tokens_from_secrets_and_scrapes_the_api():
    prometheus = services()["prometheus"]
    config = compose_prometheus()
    jobs = scrape_jobs(config)
    assert set(jobs) == {"ray", "lbgat"}
    secrets = compose()["secrets"]
    files = {f"/run/secrets/{name}": secrets[name]["environment"] for name in prometheus["secrets"]}
    ray_file = jobs["ray"]["http_sd_configs"][0]["authorization"]["credentials_file"]
    assert files[ray_file] == "RAY_AUTH_TOKEN"
    api = jobs["lbgat"]
    assert api["static_configs"][0]["targets"] == ["api:8000"] and api["metrics_path"] == "/metrics"
    assert files[api["authorization"]["credentials_file"]] == "METRICS_TOKEN"
    assert services()["api"]["environment"]["LBGAT_METRICS_TOKEN"].startswith("${METRICS_TOKEN:?")
    assert "CHANGE-ME" in env_example()["METRICS_TOKEN"]
    mount = next(v for v in prometheus["volumes"] if v.startswith("./deploy/monitoring/prometheus.yml:"))
    assert f"--config.file={mount.split(':')[1]}" in prometheus["command"]


def test_k8s_prometheus_mounts_the_files_its_config_names():
    deployment = k8s_docs("Deployment", "lbgat-prometheus")
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_file = next(a for a in container["args"] if a.startswith("--config.file=")).split("=", 1)[1]
    assert config_file == f"{mounts['config']}/prometheus.yml"
    assert volumes["config"]["configMap"]["name"] == "lbgat-prometheus"
    secret_dirs = {
        mounts[name]: volumes[name]["secret"]["secretName"] for name in mounts if "secret" in volumes[name]
    }
    secrets = {d["metadata"]["name"]: d["stringData"] for _, d in all_manifests() if d["kind"] == "Secret"}
    jobs = scrape_jobs(k8s_prometheus())
    for credentials in (
        jobs["ray"]["http_sd_configs"][0]["authorization"]["credentials_file"],
        jobs["lbgat"]["authorization"]["credentials_file"],
    ):
        folder, key = credentials.rsplit("/", 1)
        assert key in secrets[secret_dirs[folder]], credentials
    service = k8s_docs("Service", "lbgat-api")
    assert jobs["lbgat"]["static_configs"][0]["targets"] == [
        f"lbgat-api:{service['spec']['ports'][0]['port']}"
    ]


@pytest.mark.skipif(promtool is None, reason="promtool (Debian's prometheus package) is not installed")
@pytest.mark.parametrize("which", ["compose", "k8s"])
def test_prometheus_configs_pass_promtool(which, tmp_path):
    config = compose_prometheus() if which == "compose" else k8s_prometheus()
    # promtool checks that credentials files exist: point them at stand-ins
    for job in config["scrape_configs"]:
        for auth in [job.get("authorization")] + [
            sd.get("authorization") for sd in job.get("http_sd_configs", [])
        ]:
            if auth:
                stand_in = tmp_path / auth["credentials_file"].strip("/").replace("/", "_")
                stand_in.write_text("token")
                auth["credentials_file"] = str(stand_in)
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_ray_dashboard_is_wired_to_prometheus_and_grafana():
    from ray.dashboard.modules.metrics import metrics_head

    names = (
        metrics_head.PROMETHEUS_HOST_ENV_VAR,
        metrics_head.PROMETHEUS_NAME_ENV_VAR,
        metrics_head.GRAFANA_HOST_ENV_VAR,
        metrics_head.GRAFANA_IFRAME_HOST_ENV_VAR,
    )
    assert names == (
        "RAY_PROMETHEUS_HOST",
        "RAY_PROMETHEUS_NAME",
        "RAY_GRAFANA_HOST",
        "RAY_GRAFANA_IFRAME_HOST",
    )
    compose_env = services()["ray-head"]["environment"]
    assert compose_env["RAY_PROMETHEUS_HOST"] == "http://prometheus:9090"
    assert compose_env["RAY_GRAFANA_HOST"] == "http://grafana:3000"
    assert compose_env["RAY_GRAFANA_IFRAME_HOST"] == "http://127.0.0.1:${GRAFANA_PORT:-3000}"
    assert services()["grafana"]["ports"] == ["127.0.0.1:${GRAFANA_PORT:-3000}:3000"]
    assert "RAY_GRAFANA_HOST" not in services()["ray-gpu-worker"]["environment"], "the head's alone"
    (cluster,) = load_k8s("raycluster.yaml")
    head_env = {
        e["name"]: e.get("value")
        for e in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    }
    for service_name, variable in (
        ("lbgat-prometheus", "RAY_PROMETHEUS_HOST"),
        ("lbgat-grafana", "RAY_GRAFANA_HOST"),
    ):
        port = k8s_docs("Service", service_name)["spec"]["ports"][0]["port"]
        assert head_env[variable] == f"http://{service_name}:{port}"
    assert head_env["RAY_GRAFANA_IFRAME_HOST"].startswith("http://127.0.0.1:")
    # the data source the embedded panels ask for exists, under that name, pointing at Prometheus
    compose_source = yaml.safe_load(
        (MONITORING / "grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    k8s_source = yaml.safe_load(
        k8s_docs("ConfigMap", "lbgat-grafana-provisioning")["data"]["datasources.yaml"]
    )
    for source, env, host in ((compose_source, compose_env, "http://prometheus:9090"),
                              (k8s_source, head_env, head_env["RAY_PROMETHEUS_HOST"])):  # fmt: skip
        (ds,) = source["datasources"]
        assert ds["name"] == env["RAY_PROMETHEUS_NAME"] == "Prometheus" and ds["url"] == host
    grafana_env = services()["grafana"]["environment"]
    assert (
        grafana_env["GF_SECURITY_ALLOW_EMBEDDING"] == "true"
        and grafana_env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    )
    k8s_grafana = k8s_docs("Deployment", "lbgat-grafana")["spec"]["template"]["spec"]
    k8s_grafana_env = {e["name"]: e["value"] for e in k8s_grafana["containers"][0]["env"]}
    assert k8s_grafana_env["GF_SECURITY_ALLOW_EMBEDDING"] == "true"


def test_grafana_provisions_the_dashboards_that_service_grafana_writes(tmp_path):
    # compose: the one-shot writes into the volume that Grafana's provider reads
    oneshot = services()["grafana-dashboards"]
    assert oneshot["restart"] == "no" and oneshot["image"] == services()["api"]["image"]
    assert oneshot["command"][:3] == ["python", "-m", "service.grafana"]
    out_dir = oneshot["command"][3]
    assert f"grafana-dashboards:{out_dir}" in oneshot["volumes"]
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/lbgat.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"grafana-dashboards:{path}:ro" in services()["grafana"]["volumes"]
    assert (
        "./deploy/monitoring/grafana/provisioning:/etc/grafana/provisioning:ro"
        in services()["grafana"]["volumes"]
    )
    assert services()["grafana"]["depends_on"]["grafana-dashboards"] == {
        "condition": "service_completed_successfully"
    }
    dockerfile = (DEPLOY / "Dockerfile.api").read_text()
    assert f"install -d -o lbgat -g lbgat {out_dir}" in dockerfile, "the volume must be writable by uid 10001"
    # k8s: the init container writes where the Grafana container's provider reads
    spec = k8s_docs("Deployment", "lbgat-grafana")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    k8s_provider = yaml.safe_load(
        k8s_docs("ConfigMap", "lbgat-grafana-provisioning")["data"]["dashboards.yaml"]
    )
    k8s_path = k8s_provider["providers"][0]["options"]["path"]
    assert init["image"].startswith("lbgat-orchestrator/api:") and init["command"] == [
        "python",
        "-m",
        "service.grafana",
        k8s_path,
    ]
    grafana_mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    assert grafana_mounts[k8s_path] == next(
        m["name"] for m in init["volumeMounts"] if m["mountPath"] == k8s_path
    )
    # what it writes: Ray's generated dashboards (this Ray release's) and ours
    from service.grafana import main

    assert main([str(tmp_path)]) == 0
    ours = json.loads((tmp_path / "lbgat" / "lbgat.json").read_text())
    assert ours["uid"] == "lbgat-queue-training"
    ray_files = {p.name for p in (tmp_path / "ray").glob("*.json")}
    assert {"default_grafana_dashboard.json", "train_grafana_dashboard.json"} <= ray_files
    for name in ray_files:
        assert json.loads((tmp_path / "ray" / name).read_text())["panels"]


def test_our_dashboard_queries_the_metrics_that_exist():
    from service.grafana import all_queries, lbgat_dashboard
    from service.metrics import ServiceMetrics
    from workers.metrics_export import GAUGES

    rendered = ServiceMetrics().render().decode()
    service_names = set(re.findall(r"^# TYPE (\S+)", rendered, re.MULTILINE)) | {
        "lbgat_jobs",
        "lbgat_jobs_state_seconds_max",
        "lbgat_jobs_state_seconds_mean",
    }  # the queue gauges are read from a database at scrape time
    ray_names = {f"ray_{name}" for name in GAUGES}
    titles = [p["title"] for p in lbgat_dashboard()["panels"] if p["type"] != "row"]
    assert {"Queue depth per state", "Accuracy per experiment", "Images/s per experiment"} <= set(titles)
    used = set()
    for query in all_queries():
        for name in re.findall(r"\b(?:ray_)?lbgat_[a-z_]+\b", query):
            name = name.removesuffix("_bucket")
            used.add(name)
            assert name in service_names | ray_names, f"{name} in {query!r} is exported by nothing"
    assert {
        "lbgat_jobs",
        "lbgat_jobs_state_seconds_max",
        "ray_lbgat_train_accuracy",
        "ray_lbgat_train_images_per_second",
    } <= used


@pytest.mark.skipif(promtool is None, reason="promtool (Debian's prometheus package) is not installed")
def test_our_dashboard_queries_parse(tmp_path):
    from service.grafana import all_queries

    rules = {
        "groups": [
            {
                "name": "lbgat",
                "rules": [{"record": f"lbgat:q{i}", "expr": q} for i, q in enumerate(all_queries())],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
