"""The deployment files: docker-compose.yml as Compose itself reads it (with and without the `gpu` profile), the
Dockerfile's torch pin, and what .dockerignore keeps out of every image. Images are not built here."""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ALWAYS = {"postgres", "redis", "minio", "minio-setup", "migrate", "api", "worker-cpu"}


def compose_command() -> list[str]:
    """`docker compose` (the plugin) or `docker-compose` (the standalone 1.x), whichever this machine has."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor `docker-compose` is installed (e.g. apt-get install docker-compose)")


def compose_config(*profile: str) -> dict:
    result = subprocess.run([*compose_command(), *profile, "config"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def test_compose_up_needs_no_gpu_and_the_gpu_profile_adds_the_gpu_worker():
    plain, gpu = compose_config(), compose_config("--profile", "gpu")
    assert ALWAYS <= set(plain) and set(gpu) == ALWAYS | {"worker-gpu"}
    for services in (plain, gpu):
        assert all(not services[name].get("profiles") for name in ALWAYS), "a plain `up` must start these"
    # Compose 1.x lists a profiled service in `config` anyway, marked; the plugin leaves it out.
    assert plain.get("worker-gpu", {"profiles": ["gpu"]})["profiles"] == ["gpu"]
    worker_gpu = gpu["worker-gpu"]
    assert worker_gpu["build"]["target"] == "worker-gpu"
    assert worker_gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "gpu" in worker_gpu["command"] and "cpu" in gpu["worker-cpu"]["command"]


def test_compose_services_start_in_order_on_healthy_dependencies():
    services = compose_config("--profile", "gpu")
    for name in ("postgres", "redis", "minio", "api"):
        assert services[name]["healthcheck"]["test"], name
    assert any("/healthz" in part for part in services["api"]["healthcheck"]["test"])
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["modelpress", "migrate"]
    for name in ("api", "worker-cpu", "worker-gpu"):
        needs = services[name]["depends_on"]
        assert needs["migrate"]["condition"] == "service_completed_successfully", name
        assert needs["minio-setup"]["condition"] == "service_completed_successfully", name
        assert needs["redis"]["condition"] == "service_healthy", name


def test_compose_images_are_pinned():
    for name, service in compose_config("--profile", "gpu").items():
        if "build" not in service:
            repository, _, tag = service["image"].rpartition(":")
            assert repository and tag and tag != "latest", f"{name}: pin {service['image']!r} to a version"


def test_the_dockerfile_pins_the_torch_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project.get("optional-dependencies", {}).get("worker", [])
    pins = [r.split("==", 1)[1] for r in requirements if re.match(r"torch\s*==", r)]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.findall(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.MULTILINE) == pins
    assert {"api", "worker-cpu", "worker-gpu"} <= set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.MULTILINE))


def test_dockerignore_keeps_environments_secrets_and_history_out_of_images():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".modelpress", ".git"} <= ignored
