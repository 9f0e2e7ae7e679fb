"""What can be checked of the container files without a Docker engine: they parse and point at real paths."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_services_build_from_existing_dockerfiles():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"], "no services"
    for name, service in compose["services"].items():
        dockerfile = ROOT / service["build"]["context"] / service["build"]["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        for volume in service.get("volumes", []):
            host, container = volume.split(":")[:2]
            assert host.startswith("./") and container.startswith("/work/"), volume


def test_trainer_dockerfile_copies_existing_paths_and_runs_a_preset():
    lines = (ROOT / "deploy" / "Dockerfile.trainer").read_text().splitlines()
    copies = [shlex.split(line)[1:-1] for line in lines if line.startswith("COPY ")]
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    cmd = next(line for line in lines if line.startswith("CMD "))
    args = yaml.safe_load(cmd.removeprefix("CMD "))
    from api_schemas.presets import PRESETS

    assert args[0] == "train" and args[args.index("--preset") + 1] in PRESETS
